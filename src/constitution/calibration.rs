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

/// `sigmoid(w . x + b)` on a unit embedding `x`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinearHead {
    pub weights: Vec<f32>,
    pub bias: f32,
}
