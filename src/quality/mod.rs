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

mod data;
mod heads;
mod plot;
pub mod report;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use sha2::{Digest, Sha256};

use crate::constitution::{self, Calibration, Constitution, EnsembleCalibration, RuleCalibration};
use crate::embed::TextEmbedding;
use crate::engine::{Engine, EngineError};
use crate::evaluate::metrics::{fit_threshold, Target};
use crate::evaluate::{self, Index, Similarities};

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
pub struct Embedded {
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
) -> Result<Embedded, QualityError> {
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
    Ok(Embedded {
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
    embedded: &Embedded,
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
    embedded: &Embedded,
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
        data: {
            let main: Vec<&Item> = items
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
        },
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

/// Where `charter calibrate` writes a model's calibration: `<stem>.calibration.json`
/// unless that file holds another model's, then `<stem>.calibration.<model>.json`.
pub fn calibration_file(constitution: &Path, model: &str) -> PathBuf {
    let main = constitution::calibration_path(constitution);
    let extra = constitution::model_calibration_path(constitution, model);
    let main_model = std::fs::read(&main)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<Calibration>(&bytes).ok())
        .map(|c| c.model);
    match main_model {
        _ if extra.exists() => extra,
        Some(other) if other != model => extra,
        _ => main,
    }
}

/// What [`calibrate`] fitted: one file per model, and the scorer's out-of-fold figures.
pub struct Calibrated {
    pub files: Vec<(PathBuf, Calibration)>,
    /// With an ensemble: the threshold on the models' mean margin.
    pub ensemble_threshold: Option<f32>,
    /// Recall, false-positive rate and scary false-positive rate of the fitted threshold(s)
    /// on the data's out-of-group scores, as served (the ensemble's, with one).
    pub recall: f64,
    pub fpr: f64,
    pub scary_fpr: f64,
    /// Ordinary traffic per language, per `lang/kind` and per `file source`: its
    /// out-of-fold false-alarm rate and item count.
    pub ordinary_fpr: Vec<(String, f64, usize)>,
}

/// What `charter calibrate` fits, and how.
pub struct CalibrateOptions {
    /// The operating point of the shared threshold(s).
    pub target: Target,
    /// Learned heads (else one threshold on the kNN scores).
    pub heads: bool,
    /// Sample weight of safe-but-scary ok items in the heads' fit, per model.
    pub scary_weights: ScaryWeights,
    /// Sample weight of ordinary-traffic items in the heads' fit.
    pub ordinary_weight: f64,
    /// With ordinary traffic: raise the threshold until at most this share of it fails.
    pub max_ordinary_fpr: Option<f64>,
    /// Where to write every item's out-of-fold margins (the `items.jsonl` format).
    pub oof_items: Option<PathBuf>,
}

/// Sample weights of safe-but-scary ok items, per model: `W` for every model, or
/// `MODEL=W` entries and an optional bare `W` for the others, comma-separated
/// (`use-m3=20,10`). Without a bare `W`, unnamed models get [`head::SCARY_WEIGHT`].
///
/// [`head::SCARY_WEIGHT`]: crate::evaluate::head::SCARY_WEIGHT
#[derive(Debug, Clone, PartialEq)]
pub struct ScaryWeights {
    models: BTreeMap<String, f64>,
    others: f64,
}

impl ScaryWeights {
    pub fn for_model(&self, model: &str) -> f64 {
        self.models.get(model).copied().unwrap_or(self.others)
    }
}

impl std::str::FromStr for ScaryWeights {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let weight = |w: &str| match w.trim().parse::<f64>() {
            Ok(w) if w.is_finite() && w > 0.0 => Ok(w),
            _ => Err(format!("{w:?} is not a positive number")),
        };
        let mut models = BTreeMap::new();
        let mut others = None;
        for entry in s.split(',') {
            match entry.split_once('=') {
                Some((model, w)) if !model.trim().is_empty() => {
                    if models
                        .insert(model.trim().to_string(), weight(w)?)
                        .is_some()
                    {
                        return Err(format!("model {:?} is named twice", model.trim()));
                    }
                }
                Some(_) => return Err(format!("{entry:?} names no model (MODEL=W)")),
                None if others.is_some() => {
                    return Err("more than one weight for the other models".into())
                }
                None => others = Some(weight(entry)?),
            }
        }
        Ok(Self {
            models,
            others: others.unwrap_or(crate::evaluate::head::SCARY_WEIGHT),
        })
    }
}

/// One model's fitted calibration and its out-of-fold margins on the data.
struct MemberFit {
    calibration: Calibration,
    oof: Vec<Vec<f32>>,
}

/// With `heads`, a learned head per rule (on every item, features leave-own-group-out),
/// one shared logit threshold from grouped 5-fold out-of-fold logits and the sentence
/// margin; without, one shared threshold on the kNN scores (each item scored without its
/// fold's exemplars).
fn fit_member(
    index: &Index,
    data: &Data,
    embedded: &Embedded,
    options: &CalibrateOptions,
    top_k: usize,
) -> Result<MemberFit, QualityError> {
    let target = options.target;
    let items = &data.items;
    let lacking =
        || QualityError::Invalid("the data (or a fold of it) lacks one of the labels".into());
    let scary_weight = options.scary_weights.for_model(index.model());
    let params = FitParams {
        target,
        scary_weight,
        ordinary_weight: options.ordinary_weight,
        max_ordinary_fpr: options.max_ordinary_fpr,
    };
    let (oof, thresholds, fitted_heads, margin) = if options.heads {
        let cv = heads::HeadCv::new(index, items, embedded, FOLDS, params);
        let scored = cv.oof(&[]);
        let (t, margin) = cv.threshold_and_margin(&scored).ok_or_else(lacking)?;
        let mut oof = vec![Vec::new(); items.len()];
        for (i, s) in &scored {
            oof[*i] = s.margins(t, margin);
        }
        (oof, vec![t; index.rules().len()], cv.fit(&[]), Some(margin))
    } else {
        let positive: Vec<bool> = items.iter().map(Item::violation).collect();
        let scores = cv_rule_scores(index, items, embedded, top_k, FOLDS);
        let t = fit_shared_threshold(&scores, &positive, target).ok_or_else(lacking)?;
        let oof = scores
            .iter()
            .map(|s| s.iter().map(|x| x - t).collect())
            .collect();
        (
            oof,
            vec![t; index.rules().len()],
            vec![None; index.rules().len()],
            None,
        )
    };
    let with_heads = fitted_heads.iter().any(Option::is_some);
    let calibration = Calibration {
        model: index.model().to_string(),
        target: target.to_string(),
        data: format!("{} {}", data.describe(), items_sha(items)),
        fitted_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        exemplars: with_heads.then(|| Index::exemplar_set_hash(index.constitution())),
        piece_margin: margin.filter(|_| with_heads),
        scary_weight: with_heads.then_some(scary_weight),
        ordinary_weight: (with_heads && data.has_ordinary()).then_some(options.ordinary_weight),
        max_ordinary_fpr: options
            .max_ordinary_fpr
            .filter(|_| with_heads && data.has_ordinary()),
        ensemble: None,
        rules: index
            .rules()
            .iter()
            .zip(thresholds)
            .zip(fitted_heads)
            .map(|((r, threshold), head)| (r.id.clone(), RuleCalibration { threshold, head }))
            .collect::<BTreeMap<_, _>>(),
    };
    Ok(MemberFit { calibration, oof })
}

/// Fits the calibration of the configured model and writes it beside the constitution
/// ([`calibration_file`]). With `model.ensemble`, both models are fitted (one file each)
/// and the pair's threshold on the mean margin goes into the first model's file.
pub async fn calibrate(
    engine: &Arc<Engine>,
    constitution: Option<&str>,
    data: &Data,
    options: &CalibrateOptions,
) -> Result<Calibrated, QualityError> {
    let target = options.target;
    let index = engine.constitution(constitution)?;
    let items = &data.items;
    let mut members = vec![(Arc::clone(&index), false)];
    members.extend(engine.partner_index(&index).map(|p| (p, true)));
    let mut fits = Vec::new();
    for (member, partner) in &members {
        let embedded = embed_items(engine, member, items, *partner).await?;
        fits.push(fit_member(
            member,
            data,
            &embedded,
            options,
            engine.top_k(),
        )?);
    }
    let positive: Vec<bool> = items.iter().map(Item::violation).collect();
    let (risks, ensemble_threshold): (Vec<f32>, _) = if fits.len() > 1 {
        let oofs: Vec<&[Vec<f32>]> = fits.iter().map(|f| f.oof.as_slice()).collect();
        let mean = mean_margins(&oofs);
        let t = fit_shared_threshold(&mean, &positive, target)
            .ok_or_else(|| QualityError::Invalid("the data lacks one of the labels".into()))?;
        let second = fits[1].calibration.clone();
        fits[0].calibration.ensemble = Some(EnsembleCalibration {
            with: second.model,
            with_fitted_at: second.fitted_at,
            target: target.to_string(),
            threshold: t,
        });
        let thresholds = vec![t; index.rules().len()];
        (mean.iter().map(|m| risk(m, &thresholds)).collect(), Some(t))
    } else {
        (fits[0].oof.iter().map(|m| largest(m)).collect(), None)
    };
    let labelled: Vec<usize> = (0..items.len()).filter(|&i| !items[i].ordinary).collect();
    let c = crate::evaluate::metrics::Confusion::at(
        &labelled.iter().map(|&i| risks[i]).collect::<Vec<_>>(),
        &labelled.iter().map(|&i| positive[i]).collect::<Vec<_>>(),
        0.0,
    );
    let scary: Vec<usize> = (0..items.len())
        .filter(|&i| items[i].scary() && !items[i].ordinary)
        .collect();
    let scary_fp = scary.iter().filter(|&&i| risks[i] > 0.0).count();
    let mut ordinary_fpr: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for (item, &r) in items.iter().zip(&risks).filter(|(i, _)| i.ordinary) {
        for key in [
            item.lang.clone(),
            format!("{}/{}", item.lang, item.kind),
            format!("{} {}", item.set, item.source),
        ] {
            let e = ordinary_fpr.entry(key).or_default();
            e.0 += usize::from(r > 0.0);
            e.1 += 1;
        }
    }
    if let Some(path) = &options.oof_items {
        let rules: Vec<&str> = index.rules().iter().map(|r| r.id.as_str()).collect();
        let margins: Vec<Vec<f32>> = match ensemble_threshold {
            Some(_) => {
                let oofs: Vec<&[Vec<f32>]> = fits.iter().map(|f| f.oof.as_slice()).collect();
                mean_margins(&oofs)
            }
            None => fits[0].oof.clone(),
        };
        let lines = report::item_lines(items, &rules, &margins, &risks, &[])
            .map_err(|e| QualityError::Invalid(format!("per-item lines: {e}")))?;
        std::fs::write(path, lines).map_err(|e| QualityError::Write {
            path: path.clone(),
            message: e.to_string(),
        })?;
    }
    let mut files = Vec::new();
    for fit in fits {
        // After the first model's file is written, the second finds it taken.
        let path = calibration_file(&index.constitution().path, &fit.calibration.model);
        let write_err = |message: String| QualityError::Write {
            path: path.clone(),
            message,
        };
        let json = serde_json::to_string(&fit.calibration).map_err(|e| write_err(e.to_string()))?;
        std::fs::write(&path, json + "\n").map_err(|e| write_err(e.to_string()))?;
        files.push((path, fit.calibration));
    }
    Ok(Calibrated {
        files,
        ensemble_threshold,
        recall: c.recall(),
        fpr: c.false_positive_rate(),
        scary_fpr: scary_fp as f64 / scary.len().max(1) as f64,
        ordinary_fpr: ordinary_fpr
            .into_iter()
            .map(|(lang, (fp, n))| (lang, fp as f64 / n as f64, n))
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calibrate_writes_the_main_file_unless_it_holds_another_models() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.toml");
        let main = dir.path().join("t.calibration.json");
        assert_eq!(calibration_file(&path, "m"), main, "no file yet");
        std::fs::write(&main, r#"{"model": "m", "target": "f1", "rules": {}}"#).unwrap();
        assert_eq!(calibration_file(&path, "m"), main, "its own model");
        let extra = dir.path().join("t.calibration.e5.json");
        assert_eq!(
            calibration_file(&path, "e5"),
            extra,
            "another model's main file"
        );
        std::fs::write(&extra, r#"{"model": "e5", "target": "f1", "rules": {}}"#).unwrap();
        std::fs::remove_file(&main).unwrap();
        assert_eq!(calibration_file(&path, "e5"), extra, "its own file stays");
    }

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

    #[test]
    fn scary_weights_name_models_and_a_fallback() {
        let w: ScaryWeights = "use-m3=20, 10".parse().unwrap();
        assert_eq!(
            (w.for_model("use-m3"), w.for_model("e5-small")),
            (20.0, 10.0)
        );
        let w: ScaryWeights = "3".parse().unwrap();
        assert_eq!(w.for_model("use-m3"), 3.0);
        let w: ScaryWeights = "e5-small=6".parse().unwrap();
        assert_eq!(
            (w.for_model("e5-small"), w.for_model("use-m3")),
            (6.0, crate::evaluate::head::SCARY_WEIGHT)
        );
        let default: ScaryWeights = crate::evaluate::head::SCARY_WEIGHTS.parse().unwrap();
        assert_eq!(default.for_model("use-m3"), 20.0);
        for bad in [
            "0", "-1", "x", "use-m3=0", "=4", "a=1,a=2", "1,2", "inf", "",
        ] {
            assert!(bad.parse::<ScaryWeights>().is_err(), "{bad:?} parsed");
        }
    }
}
