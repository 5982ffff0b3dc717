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
    pub rules: BTreeMap<String, RuleCalibration>,
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
