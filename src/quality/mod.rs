//! Quality of verdicts on labelled data: `charter bench` (the report) and `charter
//! calibrate` (fitted thresholds). Owns the labelled-data format (../shared/bench: JSONL
//! with `id`, `text`, `label`, `lang`, `kind`, `category`, `source`), grouped
//! cross-validation, the report and its PNG. It embeds through the [`Engine`] and scores
//! with [`crate::evaluate`]; it knows nothing of HTTP.
//!
//! Grouped cross-validation: the default constitution's exemplars come from the
//! development set (an exemplar's `source` is `dev:<item id>`), so an item scored against
//! the full constitution would find itself. Items are split into [`FOLDS`] folds by group
//! (the id before `#`); an item of fold f is scored without the exemplars of any group of
//! fold f, and every fitted parameter it is judged by (thresholds, heads) is fitted on the
//! other folds only.

mod calibrate;
mod data;
mod heads;
mod plot;
pub mod report;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use sha2::{Digest, Sha256};

use crate::constitution::{Calibration, Constitution};
use crate::embed::TextEmbedding;
use crate::engine::{Engine, EngineError};
use crate::evaluate::metrics::{fit_threshold, Target};
use crate::evaluate::{self, Index, Similarities};

pub use calibrate::{calibrate, calibration_file, CalibrateOptions, Calibrated, ScaryWeights};
pub use data::{fold_of, group_of, Data, DataFile, Item, ORDINARY_FIT_PER_SOURCE};
pub use heads::FitParams;
pub use report::Report;

/// Folds of the grouped cross-validation.
pub const FOLDS: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum QualityError {
    #[error("{path}:{line}: {message}")]
    Data {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {message}")]
    Write { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// Per exemplar row of an index (in [`Index::exemplar_texts`] order), the groups of the
/// labelled items it was taken from (`source = "dev:<id>"` or `"item:<id>"`).
pub fn row_groups(constitution: &Constitution) -> Vec<Vec<String>> {
    let texts = Index::exemplar_texts(constitution);
    let row: HashMap<&str, usize> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut groups = vec![Vec::new(); texts.len()];
    for example in constitution.examples() {
        if let Some(id) = example
            .source
            .as_deref()
            .and_then(|s| s.strip_prefix("dev:").or_else(|| s.strip_prefix("item:")))
        {
            groups[row[example.text.as_str()]].push(group_of(id).to_string());
        }
    }
    groups
}

/// The items embedded, and every piece's similarity to every exemplar row (computed once;
/// each fold then leaves rows out).
pub struct EmbeddedItems {
    pub texts: Vec<TextEmbedding>,
    /// Per item and piece: plain and centred similarities to every exemplar row, computed
    /// once here for the kNN scores, the heads' features and every refit.
    pub sims: Vec<Vec<Similarities>>,
    /// Embedding, and scoring through the serving path, in seconds.
    pub embed_secs: f64,
    pub score_secs: f64,
}

/// Embeds every item (chunks of 32, one at a time: each model call then holds the same
/// texts on every run, so int8 activation scales and the fitted file are reproducible) and times the
/// serving path: embedding plus [`evaluate::evaluate`] against the full index.
/// `partner` embeds with the ensemble's second model (`index` must be its index).
pub async fn embed_items(
    engine: &Arc<Engine>,
    index: &Index,
    items: &[Item],
    partner: bool,
) -> Result<EmbeddedItems, QualityError> {
    use futures_util::StreamExt;
    let started = Instant::now();
    let chunks: Vec<Arc<Vec<String>>> = items
        .chunks(32)
        .map(|c| Arc::new(c.iter().map(|i| i.text.clone()).collect()))
        .collect();
    let mut stream = futures_util::stream::iter(chunks.into_iter().map(|texts| {
        let engine = Arc::clone(engine);
        async move { engine.embed(texts, partner).await }
    }))
    .buffered(1);
    let mut texts = Vec::with_capacity(items.len());
    while let Some(out) = stream.next().await {
        texts.extend(out?.texts);
    }
    let embed_secs = started.elapsed().as_secs_f64();
    let scoring = Instant::now();
    for (item, emb) in items.iter().zip(&texts) {
        std::hint::black_box(evaluate::evaluate(index, &item.text, emb, engine.top_k()));
    }
    let score_secs = scoring.elapsed().as_secs_f64();
    let sims = texts
        .iter()
        .map(|t| {
            t.pieces
                .iter()
                .map(|p| index.similarity_pair(&p.vector))
                .collect()
        })
        .collect();
    Ok(EmbeddedItems {
        texts,
        sims,
        embed_secs,
        score_secs,
    })
}

/// Which exemplar rows each fold must not see: rows taken from any group of that fold's
/// items (groups that are not in the data are never left out).
pub fn fold_exclusions(items: &[Item], row_groups: &[Vec<String>], folds: usize) -> Vec<Vec<bool>> {
    let mut fold_groups: Vec<HashSet<&str>> = vec![HashSet::new(); folds];
    for item in items {
        fold_groups[fold_of(item.group(), folds)].insert(item.group());
    }
    fold_groups
        .iter()
        .map(|groups| {
            row_groups
                .iter()
                .map(|gs| gs.iter().any(|g| groups.contains(g.as_str())))
                .collect()
        })
        .collect()
}

/// Raw per-rule scores (before thresholds) of every item, each scored without the
/// exemplars of its fold: the best piece per rule, as serving does (kNN scores, or the
/// heads' logits with the piece margin when the index has heads).
pub fn cv_rule_scores(
    index: &Index,
    items: &[Item],
    embedded: &EmbeddedItems,
    top_k: usize,
    folds: usize,
) -> Vec<Vec<f32>> {
    let exclusions = fold_exclusions(items, &row_groups(index.constitution()), folds);
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let exclude = &exclusions[fold_of(item.group(), folds)];
            let mut best = vec![f32::NEG_INFINITY; index.rules().len()];
            for (p, sims) in embedded.sims[i].iter().enumerate() {
                let vector = &embedded.texts[i].pieces[p].vector;
                let scores: Vec<f32> = match index.head_logits(vector, &sims.centred, Some(exclude))
                {
                    Some(logits) => {
                        let margin = if p == 0 { 0.0 } else { index.piece_margin() };
                        logits.into_iter().map(|l| l - margin).collect()
                    }
                    None => index
                        .score_similarities(&sims.plain, top_k, Some(exclude))
                        .into_iter()
                        .map(|s| s.score)
                        .collect(),
                };
                for (b, s) in best.iter_mut().zip(scores) {
                    *b = b.max(s);
                }
            }
            best
        })
        .collect()
}

/// The largest of an item's per-rule margins: its risk (`> 0` exactly when it fails).
pub fn largest(margins: &[f32]) -> f32 {
    margins.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

/// The overall risk at per-rule thresholds: the largest score minus threshold.
pub fn risk(scores: &[f32], thresholds: &[f32]) -> f32 {
    scores
        .iter()
        .zip(thresholds)
        .map(|(s, t)| s - t)
        .fold(f32::NEG_INFINITY, f32::max)
}

/// One threshold shared by every rule, aimed at `target` over the items' overall risk
/// (the best rule score). Raw kNN scores share a scale (a cosine difference), and so do
/// the logits of class-balanced heads.
pub fn fit_shared_threshold(scores: &[Vec<f32>], positive: &[bool], target: Target) -> Option<f32> {
    let best: Vec<f32> = scores.iter().map(|s| largest(s)).collect();
    fit_threshold(&best, positive, target)
}

/// How `charter bench` came by the thresholds it judges with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThresholdSource {
    /// The constitution file's (no calibration for this model).
    File,
    /// A calibration fitted on other data (none of the items is an exemplar): used as it is.
    Calibration,
    /// A calibration fitted on this data, or data whose items are exemplars: refitted per
    /// fold on the other folds of this data.
    RefitPerFold,
}

impl ThresholdSource {
    pub fn as_str(self) -> &'static str {
        match self {
            ThresholdSource::File => "constitution file",
            ThresholdSource::Calibration => "calibration file (fitted on other data)",
            ThresholdSource::RefitPerFold => "calibration refitted on the other folds",
        }
    }
}

/// One model's cross-validated margins (score minus threshold in force, per rule).
pub struct MemberCv {
    /// Per item: its margins under the fits made without its fold.
    pub test: Vec<Vec<f32>>,
    /// Per outer fold, per item outside it (empty inside it): the margins the fold's
    /// thresholds were fitted on (inner out-of-fold for heads). An ensemble threshold
    /// for that fold is fitted on them.
    pub train: Vec<Vec<Vec<f32>>>,
    pub source: ThresholdSource,
}

impl MemberCv {
    /// Margins that do not depend on the fold (thresholds not fitted on these items).
    fn fixed(
        margins: Vec<Vec<f32>>,
        fold: &[usize],
        folds: usize,
        source: ThresholdSource,
    ) -> Self {
        let train = (0..folds)
            .map(|f| {
                margins
                    .iter()
                    .zip(fold)
                    .map(|(m, &g)| if g == f { Vec::new() } else { m.clone() })
                    .collect()
            })
            .collect();
        Self {
            test: margins,
            train,
            source,
        }
    }
}

/// Whether a calibration was fitted on these items, or on data that shares items with the
/// exemplars (a slice of the set the exemplars came from): then it is refitted on the
/// other folds, never trusted as it is.
fn fitted_here(calibration: &Calibration, index: &Index, items: &[Item]) -> bool {
    let exemplar_groups: HashSet<String> = row_groups(index.constitution())
        .into_iter()
        .flatten()
        .collect();
    calibration.data.contains(&items_sha(items))
        || items.iter().any(|i| exemplar_groups.contains(i.group()))
}

/// One model's margins per item and rule, with thresholds (and heads) that never came
/// from the item's own fold. The item's risk is the largest.
pub fn member_cv(
    index: &Index,
    items: &[Item],
    embedded: &EmbeddedItems,
    scores: &[Vec<f32>],
    folds: usize,
) -> Result<MemberCv, QualityError> {
    let fold: Vec<usize> = items.iter().map(|i| fold_of(i.group(), folds)).collect();
    let in_force: Vec<f32> = index.rules().iter().map(|r| r.threshold).collect();
    let less = |s: &[f32], t: &[f32]| -> Vec<f32> { s.iter().zip(t).map(|(s, t)| s - t).collect() };
    let calibration = index
        .constitution()
        .calibration(index.model())
        // Stale heads are not served, so their file's thresholds are what counts.
        .filter(|_| !index.stale_heads());
    let as_is = |source| {
        let margins = scores.iter().map(|s| less(s, &in_force)).collect();
        Ok(MemberCv::fixed(margins, &fold, folds, source))
    };
    let Some(calibration) = calibration else {
        return as_is(ThresholdSource::File);
    };
    if !fitted_here(calibration, index, items) {
        return as_is(ThresholdSource::Calibration);
    }
    let target: Target = calibration
        .target
        .parse()
        .map_err(|e| QualityError::Invalid(format!("calibration target: {e}")))?;
    let lacking = |f: usize| QualityError::Invalid(format!("fold {f} lacks one of the labels"));
    let mut test = vec![Vec::new(); items.len()];
    let mut train = vec![vec![Vec::new(); items.len()]; folds];
    if index.has_heads() {
        let params = FitParams {
            target,
            scary_weight: calibration
                .scary_weight
                .unwrap_or(crate::evaluate::head::LEGACY_SCARY_WEIGHT),
            ordinary_weight: calibration.ordinary_weight.unwrap_or(1.0),
            max_ordinary_fpr: calibration.max_ordinary_fpr,
        };
        let cv = heads::HeadCv::new(index, items, embedded, folds, params);
        for (f, train) in train.iter_mut().enumerate() {
            let m = cv.fold_margins(f).ok_or_else(|| lacking(f))?;
            for (i, margins) in m.inner {
                train[i] = margins;
            }
            for (i, margins) in m.outer {
                test[i] = margins;
            }
        }
    } else {
        let positive: Vec<bool> = items.iter().map(Item::violation).collect();
        for (f, train) in train.iter_mut().enumerate() {
            let rows: Vec<usize> = (0..items.len()).filter(|&i| fold[i] != f).collect();
            let t = fit_shared_threshold(
                &rows.iter().map(|&i| scores[i].clone()).collect::<Vec<_>>(),
                &rows.iter().map(|&i| positive[i]).collect::<Vec<_>>(),
                target,
            )
            .ok_or_else(|| lacking(f))?;
            let thresholds = vec![t; index.rules().len()];
            for i in 0..items.len() {
                let m = less(&scores[i], &thresholds);
                if fold[i] == f {
                    test[i] = m;
                } else {
                    train[i] = m;
                }
            }
        }
    }
    Ok(MemberCv {
        test,
        train,
        source: ThresholdSource::RefitPerFold,
    })
}

/// Per item and rule, the mean of the models' margins.
fn mean_margins(members: &[&[Vec<f32>]]) -> Vec<Vec<f32>> {
    let n = members.len() as f32;
    (0..members[0].len())
        .map(|i| {
            let mut sum = members[0][i].clone();
            for m in &members[1..] {
                for (s, x) in sum.iter_mut().zip(&m[i]) {
                    *s += x;
                }
            }
            sum.iter().map(|s| s / n).collect()
        })
        .collect()
}

/// How an ensemble's threshold on the mean margin is found.
pub enum EnsembleThreshold {
    /// Fixed: the pair's calibrated threshold (fitted elsewhere), or 0 without one.
    Fixed(f32),
    /// Refitted per outer fold on the fold's training margins, aimed at `target`.
    Refit(Target),
}

/// An ensemble's cross-validated margins per item and rule: the mean of the models'
/// margins minus the ensemble threshold of the item's fold.
pub fn ensemble_cv(
    cvs: &[MemberCv],
    items: &[Item],
    folds: usize,
    threshold: EnsembleThreshold,
) -> Result<Vec<Vec<f32>>, QualityError> {
    let tests: Vec<&[Vec<f32>]> = cvs.iter().map(|c| c.test.as_slice()).collect();
    let mut margins = mean_margins(&tests);
    let fold: Vec<usize> = items.iter().map(|i| fold_of(i.group(), folds)).collect();
    let taus: Vec<f32> = match threshold {
        EnsembleThreshold::Fixed(t) => vec![t; folds],
        EnsembleThreshold::Refit(target) => (0..folds)
            .map(|f| {
                let trains: Vec<&[Vec<f32>]> = cvs.iter().map(|c| c.train[f].as_slice()).collect();
                let mean = mean_margins(&trains);
                let rows: Vec<usize> = (0..items.len()).filter(|&i| fold[i] != f).collect();
                fit_shared_threshold(
                    &rows.iter().map(|&i| mean[i].clone()).collect::<Vec<_>>(),
                    &rows
                        .iter()
                        .map(|&i| items[i].violation())
                        .collect::<Vec<_>>(),
                    target,
                )
                .ok_or_else(|| QualityError::Invalid(format!("fold {f} lacks one of the labels")))
            })
            .collect::<Result<_, _>>()?,
    };
    for (m, &f) in margins.iter_mut().zip(&fold) {
        for x in m.iter_mut() {
            *x -= taus[f];
        }
    }
    Ok(margins)
}

/// A fingerprint of the items (ids and labels), so bench can tell the calibration's data.
fn items_sha(items: &[Item]) -> String {
    let mut h = Sha256::new();
    for i in items {
        h.update(i.id.as_bytes());
        h.update(b"\0");
        h.update(i.label.as_bytes());
        h.update(b"\n");
    }
    format!("items={}", &hex::encode(h.finalize())[..16])
}

/// The report's account of the data: every file, and the headline file's counts.
fn data_info(data: &Data) -> report::DataInfo {
    let primary = data.primary_set();
    let main: Vec<&Item> = data
        .items
        .iter()
        .filter(|i| !i.ordinary && i.set == primary)
        .collect();
    report::DataInfo {
        files: data.files.clone(),
        path: data.files[0].path.display().to_string(),
        sha256: data.files[0].sha256.clone(),
        items: main.len(),
        violations: main.iter().filter(|i| i.violation()).count(),
        ok: main.iter().filter(|i| !i.violation()).count(),
        scary: main.iter().filter(|i| i.scary()).count(),
    }
}

/// What `charter bench` wrote.
pub struct Benched {
    pub report: Report,
    pub json: PathBuf,
    pub png: PathBuf,
    /// One JSON line per item: its cross-validated risk, verdict and margins.
    pub items: PathBuf,
}

/// Scores the data with grouped cross-validation, writes `report.json`, `report.png` and
/// `items.jsonl` into `out`.
pub async fn bench(
    engine: &Arc<Engine>,
    constitution: Option<&str>,
    data: &Data,
    out: &Path,
) -> Result<Benched, QualityError> {
    let index = engine.constitution(constitution)?;
    let items = &data.items;
    // Each model of an ensemble in turn; a rule's margin is their mean, as served.
    let mut members = vec![(Arc::clone(&index), false)];
    members.extend(engine.partner_index(&index).map(|p| (p, true)));
    let (mut embed_secs, mut score_secs) = (0.0, 0.0);
    let mut cvs = Vec::new();
    for (member, partner) in &members {
        let embedded = embed_items(engine, member, items, *partner).await?;
        let scores = cv_rule_scores(member, items, &embedded, engine.top_k(), FOLDS);
        cvs.push(member_cv(member, items, &embedded, &scores, FOLDS)?);
        embed_secs += embedded.embed_secs;
        score_secs += embedded.score_secs;
    }
    let mut sources: Vec<&str> = cvs.iter().map(|c| c.source.as_str()).collect();
    let margins = match members.get(1) {
        None => cvs.swap_remove(0).test,
        Some((second, _)) => {
            let calibration = index.constitution().calibration(index.model());
            let (threshold, source) = match index
                .constitution()
                .ensemble_threshold(index.model(), second.model())
                .zip(calibration)
            {
                None => (EnsembleThreshold::Fixed(0.0), "ensemble threshold 0"),
                Some((_, c)) if fitted_here(c, &index, items) => {
                    let target = c.ensemble.as_ref().map_or("", |e| e.target.as_str());
                    let target: Target = target.parse().map_err(|e| {
                        QualityError::Invalid(format!("ensemble calibration target: {e}"))
                    })?;
                    (
                        EnsembleThreshold::Refit(target),
                        "ensemble threshold refitted on the other folds",
                    )
                }
                Some((t, _)) => (EnsembleThreshold::Fixed(t), "ensemble threshold calibrated"),
            };
            sources.push(source);
            ensemble_cv(&cvs, items, FOLDS, threshold)?
        }
    };
    let risks: Vec<f32> = margins.iter().map(|m| largest(m)).collect();
    let rules: Vec<&str> = index.rules().iter().map(|r| r.id.as_str()).collect();
    let primary = data.primary_set();
    let (auc, at_thresholds, other_sets, ordinary) =
        report::all_metrics(items, &risks, &margins, &rules, &primary);
    // One model: its margins were moved out of `cvs` and are `margins` themselves.
    let models: Vec<(&str, &[Vec<f32>])> = members
        .iter()
        .map(|(m, _)| m.model())
        .zip(cvs.iter().map(|c| c.test.as_slice()))
        .collect();
    let lines = report::item_lines(items, &rules, &margins, &risks, &models)
        .map_err(|e| QualityError::Invalid(format!("per-item lines: {e}")))?;
    let secs = embed_secs + score_secs;
    let c = index.constitution();
    let report = Report {
        data: data_info(data),
        constitution: c.id.clone(),
        version: c.version.clone(),
        model: engine.model().to_string(),
        scorer: members
            .iter()
            .map(|(m, _)| if m.has_heads() { "head" } else { "knn" })
            .collect::<Vec<_>>()
            .join("+"),
        cross_validation: format!(
            "grouped {FOLDS}-fold CV (no item sees exemplars or fits from its fold's groups)"
        ),
        thresholds: sources.join("; "),
        auc,
        at_thresholds,
        other_sets,
        ordinary,
        throughput: report::Throughput {
            texts: items.len(),
            embed_secs,
            score_secs,
            texts_per_sec: items.len() as f64 / secs.max(1e-9),
        },
        date: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        machine: format!(
            "{} cores available",
            std::thread::available_parallelism().map_or(0, |n| n.get())
        ),
    };
    let write_err = |path: &Path, message: String| QualityError::Write {
        path: path.to_path_buf(),
        message,
    };
    std::fs::create_dir_all(out).map_err(|e| write_err(out, e.to_string()))?;
    let json = out.join("report.json");
    let text =
        serde_json::to_string_pretty(&report).map_err(|e| write_err(&json, e.to_string()))?;
    std::fs::write(&json, text + "\n").map_err(|e| write_err(&json, e.to_string()))?;
    let png = out.join("report.png");
    plot::write_png(&png, &report, items, &risks).map_err(|e| write_err(&png, e))?;
    let items_path = out.join("items.jsonl");
    std::fs::write(&items_path, lines).map_err(|e| write_err(&items_path, e.to_string()))?;
    Ok(Benched {
        report,
        json,
        png,
        items: items_path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_and_folds_are_stable() {
        assert_eq!(group_of("xstest:12#refusal"), "xstest:12");
        assert_eq!(group_of("cold:1"), "cold:1");
        let f = fold_of("xstest:12", 5);
        assert!(f < 5);
        assert_eq!(f, fold_of("xstest:12", 5));
        // Many groups spread over every fold.
        let mut seen = [0usize; 5];
        for i in 0..500 {
            seen[fold_of(&format!("g{i}"), 5)] += 1;
        }
        assert!(seen.iter().all(|&n| n > 60), "{seen:?}");
    }

    #[test]
    fn risk_is_the_largest_margin_and_shared_threshold_hits_recall() {
        assert_eq!(risk(&[0.1, 0.5], &[0.0, 0.6]), 0.1);
        let scores: Vec<Vec<f32>> = (0..10).map(|i| vec![i as f32 / 10.0, 0.0]).collect();
        let positive: Vec<bool> = (0..10).map(|i| i >= 5).collect();
        let t = fit_shared_threshold(&scores, &positive, Target::Recall(0.8)).unwrap();
        let hits = (5..10).filter(|&i| scores[i][0] > t).count();
        assert_eq!(hits, 4, "highest threshold keeping recall >= 0.8: {t}");
    }

    #[test]
    fn exclusions_cover_exactly_the_folds_groups() {
        let item = |id: &str| Item {
            id: id.into(),
            text: "t".into(),
            label: "ok".into(),
            lang: String::new(),
            kind: String::new(),
            category: String::new(),
            source: String::new(),
            ..Default::default()
        };
        let items = vec![item("a#1"), item("b")];
        let rows = vec![
            vec!["a".to_string()],
            vec!["b".to_string()],
            vec![],
            vec!["zzz".to_string()],
        ];
        let ex = fold_exclusions(&items, &rows, 5);
        let fa = fold_of("a", 5);
        let fb = fold_of("b", 5);
        assert!(ex[fa][0] && ex[fb][1]);
        assert!(
            !ex[fa][2] && !ex[fa][3] && !ex[fb][3],
            "unlabelled rows always stay"
        );
        for (f, rows) in ex.iter().enumerate() {
            assert_eq!(rows[0], f == fa);
        }
    }

    #[test]
    fn item_lines_carry_each_items_margins_and_with_an_ensemble_each_models() {
        let item = |id: &str, label: &str| Item {
            id: id.into(),
            text: "t".into(),
            label: label.into(),
            lang: "en".into(),
            kind: "prompt".into(),
            category: String::new(),
            source: "s".into(),
            ..Default::default()
        };
        let items = vec![item("xstest:1#a", "ok"), item("b", "violation")];
        let member = |test: Vec<Vec<f32>>| MemberCv {
            test,
            train: Vec::new(),
            source: ThresholdSource::RefitPerFold,
        };
        let first = member(vec![vec![0.5, -1.0], vec![2.0, 1.0]]);
        let second = member(vec![vec![-1.5, -2.0], vec![1.0, 0.0]]);
        let mean = vec![vec![-0.5, -1.5], vec![1.5, 0.5]];
        let risks: Vec<f32> = mean.iter().map(|m| largest(m)).collect();
        let text = report::item_lines(
            &items,
            &["harm", "hate"],
            &mean,
            &risks,
            &[("m1", &first.test), ("m2", &second.test)],
        )
        .unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["id"], "xstest:1#a");
        assert_eq!(lines[0]["scary"], true);
        assert_eq!(lines[0]["fold"], fold_of("xstest:1", FOLDS));
        assert_eq!(lines[0]["risk"], -0.5);
        assert_eq!(lines[0]["verdict"], "pass");
        assert_eq!(lines[0]["models"]["m1"]["harm"], 0.5);
        assert_eq!(lines[0]["models"]["m2"]["hate"], -2.0);
        assert_eq!(lines[1]["margins"]["hate"], 0.5);
        assert_eq!(lines[1]["verdict"], "fail");
        // One model: no per-model copy of the margins.
        let single =
            report::item_lines(&items[..1], &["harm", "hate"], &mean[..1], &risks[..1], &[])
                .unwrap();
        assert!(!single.contains("models"), "{single}");
    }
}
