//! Fitting and cross-validating the learned heads on labelled data.
//!
//! Every fit names the folds it must not learn from (`held`): their items are not
//! training rows and their groups' exemplar rows are left out of every kNN feature. A
//! training item's own group is left out of its features too (leave-own-group-out), as
//! it would be when a new text arrives. Thresholds come from out-of-fold logits.

use std::collections::HashMap;

use super::{
    fit_shared_threshold, fold_exclusions, fold_of, largest, row_groups, EmbeddedItems, Item,
};
use crate::constitution::LinearHead;
use crate::evaluate::head::{self, logit, TrainingSet, HEAD_K};
use crate::evaluate::metrics::Target;
use crate::evaluate::{Index, NO_HEAD_LOGIT};

/// Logits of one scored item: the whole text, and each sentence piece of a long text.
pub struct Scored {
    pub whole: Vec<f32>,
    pub pieces: Vec<Vec<f32>>,
}

impl Scored {
    /// Per rule: the best logit minus threshold `t`, pieces counting only above `margin`.
    pub fn margins(&self, t: f32, margin: f32) -> Vec<f32> {
        let mut best = self.whole.clone();
        for p in &self.pieces {
            for (b, &l) in best.iter_mut().zip(p) {
                *b = b.max(l - margin);
            }
        }
        for b in &mut best {
            *b -= t;
        }
        best
    }
}

pub struct HeadCv<'a> {
    index: &'a Index,
    items: &'a [Item],
    embedded: &'a EmbeddedItems,
    own_rows: Vec<Vec<usize>>,
    fold_rows: Vec<Vec<bool>>,
    pub fold: Vec<usize>,
    pub folds: usize,
    /// Per item: the rules it violates (empty when ok), `None` for a violation of a
    /// category no rule has.
    violates: Vec<Option<Vec<usize>>>,
    params: FitParams,
}

/// How heads and their shared threshold are fitted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FitParams {
    /// The operating point on the labelled items' whole-text logits.
    pub target: Target,
    /// Sample weight of safe-but-scary ok items.
    pub scary_weight: f64,
    /// Sample weight of ordinary-traffic items.
    pub ordinary_weight: f64,
    /// Raise the threshold until at most this share of the ordinary items of each
    /// language fail, and twice it of the hard ones (refusals) (out of fold, pieces
    /// counted as served).
    pub max_ordinary_fpr: Option<f64>,
}

impl<'a> HeadCv<'a> {
    pub fn new(
        index: &'a Index,
        items: &'a [Item],
        embedded: &'a EmbeddedItems,
        folds: usize,
        params: FitParams,
    ) -> Self {
        let groups = row_groups(index.constitution());
        let mut rows_of_group: HashMap<&str, Vec<usize>> = HashMap::new();
        for (row, gs) in groups.iter().enumerate() {
            for g in gs {
                rows_of_group.entry(g.as_str()).or_default().push(row);
            }
        }
        let own_rows = items
            .iter()
            .map(|i| rows_of_group.get(i.group()).cloned().unwrap_or_default())
            .collect();
        let violates = items
            .iter()
            .map(|item| {
                if !item.violation() {
                    return Some(Vec::new());
                }
                let rules: Vec<usize> = index
                    .rules()
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| r.category == item.category)
                    .map(|(n, _)| n)
                    .collect();
                (!rules.is_empty()).then_some(rules)
            })
            .collect();
        Self {
            index,
            items,
            embedded,
            own_rows,
            fold_rows: fold_exclusions(items, &groups, folds),
            fold: items.iter().map(|i| fold_of(i.group(), folds)).collect(),
            folds,
            violates,
            params,
        }
    }

    fn exclusion(&self, held: &[usize], own: Option<usize>) -> Vec<bool> {
        let mut ex = vec![false; self.index.len()];
        for &f in held {
            for (e, &x) in ex.iter_mut().zip(&self.fold_rows[f]) {
                *e |= x;
            }
        }
        if let Some(i) = own {
            for &r in &self.own_rows[i] {
                ex[r] = true;
            }
        }
        ex
    }

    /// Fits heads on the items outside the `held` folds.
    pub fn fit(&self, held: &[usize]) -> Vec<Option<LinearHead>> {
        let train: Vec<usize> = (0..self.items.len())
            .filter(|&i| self.items[i].fit && !held.contains(&self.fold[i]))
            .collect();
        let knn = train
            .iter()
            .map(|&i| {
                let ex = self.exclusion(held, Some(i));
                self.index
                    .knn_features(&self.embedded.sims[i][0].centred, HEAD_K, Some(&ex))
            })
            .collect();
        let set = TrainingSet {
            embeddings: train
                .iter()
                .map(|&i| self.embedded.texts[i].pieces[0].vector.as_slice())
                .collect(),
            knn,
            violates: train.iter().map(|&i| self.violates[i].clone()).collect(),
            scary: train.iter().map(|&i| self.items[i].scary()).collect(),
            ordinary: train.iter().map(|&i| self.items[i].ordinary).collect(),
            scary_weight: self.params.scary_weight,
            ordinary_weight: self.params.ordinary_weight,
        };
        head::fit(&set, self.index.rules().len())
    }

    /// Scores items with heads that were fitted without the `held` folds (the items
    /// must be in them), leaving those folds' exemplar rows out.
    pub fn score(
        &self,
        heads: &[Option<LinearHead>],
        items: &[usize],
        held: &[usize],
    ) -> Vec<Scored> {
        let ex = self.exclusion(held, None);
        items
            .iter()
            .map(|&i| {
                let logits = |p: usize| -> Vec<f32> {
                    let knn = self.index.knn_features(
                        &self.embedded.sims[i][p].centred,
                        HEAD_K,
                        Some(&ex),
                    );
                    let q = &self.embedded.texts[i].pieces[p].vector;
                    heads
                        .iter()
                        .map(|h| h.as_ref().map_or(NO_HEAD_LOGIT, |h| logit(h, q, &knn)))
                        .collect()
                };
                Scored {
                    whole: logits(0),
                    pieces: (1..self.embedded.sims[i].len()).map(logits).collect(),
                }
            })
            .collect()
    }

    /// Out-of-fold scores of every item outside `held`, each from heads fitted on the
    /// other folds outside `held`.
    pub fn oof(&self, held: &[usize]) -> Vec<(usize, Scored)> {
        let mut out = Vec::new();
        for g in (0..self.folds).filter(|g| !held.contains(g)) {
            let mut h = held.to_vec();
            h.push(g);
            let heads = self.fit(&h);
            let idx: Vec<usize> = (0..self.items.len())
                .filter(|&i| self.fold[i] == g)
                .collect();
            out.extend(idx.iter().copied().zip(self.score(&heads, &idx, &h)));
        }
        out
    }

    /// The shared threshold and the sentence margin, from out-of-fold scores. The
    /// threshold is aimed at the target on the labelled items' whole-text logits; the
    /// margin is what keeps a piece of a long text from failing it unless the piece scores
    /// above the 99th percentile of ok items' pieces. With a bound on ordinary false alarms,
    /// the threshold is then raised until at most that share of the ordinary items fail as
    /// served (whole text or a piece); raising it never lowers the pieces' bar.
    pub fn threshold_and_margin(&self, scored: &[(usize, Scored)]) -> Option<(f32, f32)> {
        let labelled: Vec<&(usize, Scored)> = scored
            .iter()
            .filter(|(i, _)| !self.items[*i].ordinary)
            .collect();
        let scores: Vec<Vec<f32>> = labelled.iter().map(|(_, s)| s.whole.clone()).collect();
        let positive: Vec<bool> = labelled
            .iter()
            .map(|(i, _)| self.items[*i].violation())
            .collect();
        let t0 = fit_shared_threshold(&scores, &positive, self.params.target)?;
        let mut benign: Vec<f32> = scored
            .iter()
            .filter(|(i, _)| !self.items[*i].violation())
            .flat_map(|(_, s)| s.pieces.iter().map(|p| largest(p)))
            .collect();
        benign.sort_by(f32::total_cmp);
        let p99 = if benign.is_empty() {
            f32::NEG_INFINITY
        } else {
            benign[((benign.len() - 1) as f64 * 0.99).round() as usize]
        };
        let margin_at = |t: f32| (p99 - t).max(0.0);
        let mut t = t0;
        if let Some(bound) = self.params.max_ordinary_fpr {
            // Served at threshold t, a piece fails above max(t, p99): an item fails at t
            // exactly when this risk is above t.
            // The bound holds in every language on its own, and twice the bound for the
            // hard ordinary items together (refusals: compliant answers that name what
            // they refuse, the guide's 1% and 2%).
            let mut by_lang: HashMap<&str, Vec<f32>> = HashMap::new();
            let mut hard: Vec<f32> = Vec::new();
            for (i, s) in scored.iter().filter(|(i, _)| self.items[*i].ordinary) {
                let risk = s
                    .pieces
                    .iter()
                    .map(|p| largest(p))
                    .filter(|&p| p > p99)
                    .fold(largest(&s.whole), f32::max);
                by_lang
                    .entry(self.items[*i].lang.as_str())
                    .or_default()
                    .push(risk);
                if self.items[*i].scary() {
                    hard.push(risk);
                }
            }
            let bounds = by_lang
                .values()
                .map(|r| (r, bound))
                .chain(std::iter::once((&hard, 2.0 * bound)));
            for (risks, bound) in bounds {
                if let Some(t_ord) = bound_threshold(risks, bound) {
                    t = t.max(t_ord);
                }
            }
        }
        Some((t, margin_at(t)))
    }

    /// Outer fold `f` of the grouped CV: heads fitted on the other folds, threshold and
    /// sentence margin from their inner out-of-fold scores. Returns the margins (per rule)
    /// of the other folds' items (inner out-of-fold, what the threshold was fitted on) and
    /// of fold `f`'s items, each as (item, margins).
    pub fn fold_margins(&self, f: usize) -> Option<FoldMargins> {
        let inner = self.oof(&[f]);
        let (t, margin) = self.threshold_and_margin(&inner)?;
        let heads = self.fit(&[f]);
        let idx: Vec<usize> = (0..self.items.len())
            .filter(|&i| self.fold[i] == f)
            .collect();
        let outer = idx
            .iter()
            .copied()
            .zip(self.score(&heads, &idx, &[f]))
            .map(|(i, s)| (i, s.margins(t, margin)))
            .collect();
        let inner = inner
            .into_iter()
            .map(|(i, s)| (i, s.margins(t, margin)))
            .collect();
        Some(FoldMargins { inner, outer })
    }
}

/// One outer fold's margins per rule: `inner` for the items the fold's fits learned from
/// (each out of its own inner fold), `outer` for the fold's own items.
pub struct FoldMargins {
    pub inner: Vec<(usize, Vec<f32>)>,
    pub outer: Vec<(usize, Vec<f32>)>,
}

/// The lowest threshold at which at most `bound` of `risks` lie above it (`risk > t`
/// fails); `None` without risks.
pub fn bound_threshold(risks: &[f32], bound: f64) -> Option<f32> {
    if risks.is_empty() {
        return None;
    }
    let mut sorted = risks.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let allowed = (bound * sorted.len() as f64).floor() as usize;
    Some(sorted[allowed.min(sorted.len() - 1)])
}

#[cfg(test)]
mod tests {
    use super::bound_threshold;

    #[test]
    fn bound_threshold_lets_at_most_the_bound_through() {
        let risks: Vec<f32> = (0..200).map(|i| i as f32).collect();
        let t = bound_threshold(&risks, 0.01).unwrap();
        assert_eq!(risks.iter().filter(|&&r| r > t).count(), 2);
        let t = bound_threshold(&risks, 0.0).unwrap();
        assert_eq!(risks.iter().filter(|&&r| r > t).count(), 0);
        // Ties at the cut are not let through.
        let t = bound_threshold(&[1.0, 1.0, 1.0, 0.0], 0.3).unwrap();
        assert_eq!(t, 1.0);
        assert_eq!(bound_threshold(&[], 0.1), None);
    }
}
