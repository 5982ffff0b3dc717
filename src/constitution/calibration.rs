//! Calibration: thresholds (and optional linear heads) fitted by `charter calibrate`,
//! stored beside the constitution as `<stem>.calibration.json` and hashed into its version.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// File name suffix that replaces `.toml`.
pub const CALIBRATION_SUFFIX: &str = ".calibration.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Calibration {
    /// The model the fit applies to; ignored (file thresholds used) for any other model.
    pub model: String,
    /// How the thresholds were chosen, e.g. `f1` or `fpr=0.05`.
    pub target: String,
    /// Labelled data the fit came from (path and sha256), for the record.
    #[serde(default)]
    pub data: String,
    #[serde(default)]
    pub fitted_at: String,
    /// With heads: the sha256 of the exemplar set the heads' kNN features were computed
    /// against (heads fitted on other exemplars are ignored, with the file's thresholds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exemplars: Option<String>,
    /// With heads: how far a sentence piece of a long text must score above the threshold
    /// to count (the whole text counts as it is); keeps harmless long texts, whose many
    /// pieces each get a chance, from failing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub piece_margin: Option<f32>,
    /// With heads: the sample weight of safe-but-scary ok items in the fit (3 when absent,
    /// the weight of files written before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scary_weight: Option<f64>,
    /// With heads fitted on ordinary traffic too: the sample weight of its items.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ordinary_weight: Option<f64>,
    /// The bound on the false-alarm rate on ordinary traffic the threshold was raised to
    /// meet (out of fold), when one was set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ordinary_fpr: Option<f64>,
    /// Added to the fitted threshold: for an encoder fine-tuned on the calibration data,
    /// whose in-sample margins run higher than on new text, the cut measured on texts the
    /// encoder never saw (`tools/tune_cv.py`; the rules' thresholds already include it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold_offset: Option<f32>,
    /// With `model.ensemble`: the threshold on the two models' mean margin, fitted when
    /// this model and `with` were calibrated together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ensemble: Option<EnsembleCalibration>,
    pub rules: BTreeMap<String, RuleCalibration>,
}

/// The ensemble's own threshold: each rule's score is the mean of both models' margins
/// (score minus that model's threshold), violated above `threshold`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnsembleCalibration {
    /// The second model.
    pub with: String,
    /// `fitted_at` of the second model's calibration it was fitted with; another one
    /// makes this threshold stale (0 applies).
    pub with_fitted_at: String,
    pub target: String,
    pub threshold: f32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleCalibration {
    pub threshold: f32,
    /// Logistic-regression head on the embedding, when fitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<LinearHead>,
}

/// A rule's learned head: `logit = bias + weights . q + knn_weights . s` for a unit
/// embedding q and the text's kNN features s (one per rule); see `evaluate::head`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinearHead {
    pub weights: Vec<f32>,
    /// One weight per rule of the constitution, in file order.
    pub knn_weights: Vec<f32>,
    pub bias: f32,
}
