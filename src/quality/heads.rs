//! Fitting and cross-validating the learned heads on labelled data.
//!
//! Every fit names the folds it must not learn from (`held`): their items are not
//! training rows and their groups' exemplar rows are left out of every kNN feature. A
//! training item's own group is left out of its features too (leave-own-group-out), as
//! it would be when a new text arrives. Thresholds come from out-of-fold logits.

use std::collections::HashMap;

use super::{fit_shared_threshold, fold_exclusions, fold_of, largest, row_groups, Embedded, Item};
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
    embedded: &'a Embedded,
    own_rows: Vec<Vec<usize>>,
    fold_rows: Vec<Vec<bool>>,
    pub fold: Vec<usize>,
    pub folds: usize,
    /// Per item: the rules it violates (empty when ok), `None` for a violation of a
    /// category no rule has.
    violates: Vec<Option<Vec<usize>>>,
    scary_weight: f64,
}

impl<'a> HeadCv<'a> {
    pub fn new(
        index: &'a Index,
        items: &'a [Item],
        embedded: &'a Embedded,
        folds: usize,
        scary_weight: f64,
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
            scary_weight,
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
            .filter(|&i| !held.contains(&self.fold[i]))
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
            scary_weight: self.scary_weight,
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

    /// The shared threshold (aimed at `target` on whole-text logits) and the sentence
    /// margin (the 99th percentile of ok items' piece logits above it) from scores.
    pub fn threshold_and_margin(
        &self,
        scored: &[(usize, Scored)],
        target: Target,
    ) -> Option<(f32, f32)> {
        let scores: Vec<Vec<f32>> = scored.iter().map(|(_, s)| s.whole.clone()).collect();
        let positive: Vec<bool> = scored
            .iter()
            .map(|(i, _)| self.items[*i].violation())
            .collect();
        let t = fit_shared_threshold(&scores, &positive, target)?;
        let mut benign: Vec<f32> = scored
            .iter()
            .filter(|(i, _)| !self.items[*i].violation())
            .flat_map(|(_, s)| s.pieces.iter().map(|p| largest(p)))
            .collect();
        benign.sort_by(f32::total_cmp);
        let margin = if benign.is_empty() {
            0.0
        } else {
            (benign[((benign.len() - 1) as f64 * 0.99).round() as usize] - t).max(0.0)
        };
        Some((t, margin))
    }

    /// Outer fold `f` of the grouped CV: heads fitted on the other folds, threshold and
    /// sentence margin from their inner out-of-fold scores. Returns the margins (per rule)
    /// of the other folds' items (inner out-of-fold, what the threshold was fitted on) and
    /// of fold `f`'s items, each as (item, margins).
    pub fn fold_margins(&self, f: usize, target: Target) -> Option<FoldMargins> {
        let inner = self.oof(&[f]);
        let (t, margin) = self.threshold_and_margin(&inner, target)?;
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
