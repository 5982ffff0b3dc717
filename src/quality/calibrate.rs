//! `charter calibrate`: fits a constitution's heads and thresholds for the configured
//! model (and an ensemble's pair) on labelled data and ordinary traffic, and writes the
//! calibration file beside the constitution.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{
    cv_rule_scores, embed_items, fit_shared_threshold, heads, items_sha, largest, mean_margins,
    report, risk, Data, EmbeddedItems, FitParams, Item, QualityError, FOLDS,
};
use crate::constitution::{self, Calibration, EnsembleCalibration, RuleCalibration};
use crate::engine::Engine;
use crate::evaluate::metrics::Target;
use crate::evaluate::Index;

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
    /// Added to the fitted shared threshold (heads only): see
    /// [`Calibration::threshold_offset`].
    pub threshold_offset: f32,
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
    embedded: &EmbeddedItems,
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
        let t = t + options.threshold_offset;
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
        ordinary_weight: (with_heads && data.fits_ordinary()).then_some(options.ordinary_weight),
        max_ordinary_fpr: options
            .max_ordinary_fpr
            .filter(|_| with_heads && data.has_ordinary()),
        threshold_offset: Some(options.threshold_offset).filter(|o| with_heads && *o != 0.0),
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
