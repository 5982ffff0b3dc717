//! Constitutions: a TOML file of rules -> validated types with a content version.
//!
//! This module is pure: it reads files and validates them, and knows nothing of models,
//! scoring or HTTP. The format is documented in `constitution/README.md`; in short, a
//! file holds an `id`, a `description`, `[defaults]`, shared `compliant` exemplars and
//! `[[rules]]`, each rule with a principle (any language, or a table of languages),
//! category, severity, action, threshold, violating and compliant exemplars (inline or in
//! a JSONL file next to the constitution), and critique/revision instructions.
//!
//! A constitution's version is the sha256 of its content: the TOML bytes, every example
//! file it references and its calibration file, so any change to what decides a verdict
//! changes the version.

mod calibration;
mod parse;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::detect::{Detectors, Hit};

pub use calibration::{
    Calibration, EnsembleCalibration, LinearHead, RuleCalibration, CALIBRATION_SUFFIX,
};
pub use parse::{calibration_path, model_calibration_path, parse_file};

/// A validation error that names the file, the line (when known) and the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConstitutionError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConstitutionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if self.field.is_empty() {
            write!(f, ": {}", self.message)
        } else {
            write!(f, ": {}: {}", self.field, self.message)
        }
    }
}

impl std::error::Error for ConstitutionError {}

/// All the errors found in one file (validation does not stop at the first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConstitutionErrors(pub Vec<ConstitutionError>);

impl fmt::Display for ConstitutionErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, err) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{err}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConstitutionErrors {}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Low,
    Medium,
    High,
    Critical,
}

/// What the gateway does with an output that breaks the rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Return the output, with metadata naming the rule.
    Flag,
    /// Replace the output with a refusal.
    Block,
    /// Critique and revise the output (Constitutional AI), block if revision fails.
    Revise,
    /// Replace what the rule's detectors find by its kind (`[CARD]`) and pass the rest.
    Redact,
}

/// One exemplar text and where it came from.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Example {
    pub text: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Rule {
    pub id: String,
    pub category: String,
    /// The rule in natural language, keyed by language tag (`en`, `zh`, ...).
    pub principle: BTreeMap<String, String>,
    pub severity: Severity,
    pub action: Action,
    /// Score above which the rule is violated (before calibration).
    pub threshold: f32,
    pub critique: String,
    pub revision: String,
    /// What the gateway answers instead of a blocked prompt or answer that breaks this
    /// rule, keyed by language tag; empty: the gateway's `refusal_message`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub refusal: BTreeMap<String, String>,
    pub violating: Vec<Example>,
    /// The rule's own compliant exemplars (the shared ones are on the constitution).
    pub compliant: Vec<Example>,
    /// Built-in detectors the rule names (`detectors = ["card", ...]`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub detectors: Vec<String>,
    /// Its own regular expressions, as written.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub patterns: Vec<PatternSpec>,
    /// The detectors and patterns, compiled.
    #[serde(skip)]
    pub detect: Detectors,
}

/// A custom pattern as the file gives it: `{name, regex, kind}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PatternSpec {
    pub name: String,
    pub regex: String,
    pub kind: String,
}

impl Rule {
    /// The rule's refusal in `lang`, else in English, else in any language it has.
    pub fn refusal_in(&self, lang: &str) -> Option<&str> {
        self.refusal
            .get(lang)
            .or_else(|| self.refusal.get("en"))
            .or_else(|| self.refusal.values().next())
            .map(String::as_str)
    }

    /// Whether exemplars score the rule (it has violating ones); a rule with detectors
    /// only is judged by them alone and has no place in the exemplar index or the heads.
    pub fn scored(&self) -> bool {
        !self.violating.is_empty()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Constitution {
    pub id: String,
    pub description: String,
    /// sha256 of the content (TOML, example files, calibration), 16 hex digits.
    pub version: String,
    #[serde(skip)]
    pub path: PathBuf,
    /// Compliant exemplars every rule is contrasted with.
    pub shared_compliant: Vec<Example>,
    pub rules: Vec<Rule>,
    /// Fitted thresholds and heads, one per model: `<file stem>.calibration.json` (for
    /// the model it names), then `<file stem>.calibration.<model>.json` files.
    #[serde(skip)]
    pub calibrations: Vec<Calibration>,
}

/// A constitution as answers and records name it: its id and the version that judged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConstitutionRef {
    pub id: String,
    pub version: String,
}

impl Constitution {
    /// This constitution's id and version.
    pub fn reference(&self) -> ConstitutionRef {
        ConstitutionRef {
            id: self.id.clone(),
            version: self.version.clone(),
        }
    }

    pub fn rule(&self, id: &str) -> Option<&Rule> {
        self.rules.iter().find(|r| r.id == id)
    }

    /// Every exemplar, in index order: the shared compliant ones, then each scored rule's
    /// violating and compliant ones (a text may appear more than once).
    pub fn examples(&self) -> impl Iterator<Item = &Example> {
        self.shared_compliant.iter().chain(
            self.scored_rules()
                .flat_map(|r| r.violating.iter().chain(&r.compliant)),
        )
    }

    /// The rules exemplars score, in file order: the exemplar index's and the heads' rules.
    pub fn scored_rules(&self) -> impl Iterator<Item = &Rule> {
        self.rules.iter().filter(|r| r.scored())
    }

    /// What each rule's detectors find in `text`: (rule position, its hits in order,
    /// without overlaps), for the rules that found something.
    pub fn detect(&self, text: &str) -> Vec<(usize, Vec<Hit>)> {
        self.rules
            .iter()
            .enumerate()
            .filter(|(_, r)| !r.detect.is_empty())
            .map(|(i, r)| (i, r.detect.find(text)))
            .filter(|(_, hits)| !hits.is_empty())
            .collect()
    }

    /// What the `redact` rules' detectors find in `text`: the spans to mask, in order,
    /// without overlaps.
    pub fn redactions(&self, text: &str) -> Vec<Hit> {
        let mut hits = Vec::new();
        for rule in self.rules.iter().filter(|r| r.action == Action::Redact) {
            rule.detect.find_into(text, &mut hits);
        }
        crate::detect::resolve(hits)
    }

    /// Whether any rule redacts.
    pub fn redacts(&self) -> bool {
        self.rules
            .iter()
            .any(|r| r.action == Action::Redact && !r.detect.is_empty())
    }

    /// Whether any rule has detectors.
    pub fn has_detectors(&self) -> bool {
        self.rules.iter().any(|r| !r.detect.is_empty())
    }

    /// The calibration fitted for `model`, if any.
    pub fn calibration(&self, model: &str) -> Option<&Calibration> {
        self.calibrations.iter().find(|c| c.model == model)
    }

    /// Rules that can never be violated when `model` scores: rules without violating
    /// exemplars (and without detectors, which fire on their own), and, when its
    /// calibration has heads, rules it fitted no head for (no labelled violations of their
    /// category).
    pub fn silent_rules(&self, model: &str) -> Vec<&str> {
        let heads = self
            .calibration(model)
            .filter(|c| c.rules.values().any(|r| r.head.is_some()));
        self.rules
            .iter()
            .filter(|rule| rule.detect.is_empty())
            .filter(|rule| {
                rule.violating.is_empty()
                    || heads.is_some_and(|c| c.rules.get(&rule.id).is_none_or(|r| r.head.is_none()))
            })
            .map(|rule| rule.id.as_str())
            .collect()
    }

    /// The threshold on the mean margin of an ensemble of `model` and `with`, when the two
    /// were calibrated together and `with`'s calibration is still the one they used.
    pub fn ensemble_threshold(&self, model: &str, with: &str) -> Option<f32> {
        let e = self.calibration(model)?.ensemble.as_ref()?;
        let partner = self.calibration(with)?;
        (e.with == with && e.with_fitted_at == partner.fitted_at).then_some(e.threshold)
    }

    /// The threshold in force for a rule: the calibrated one for `model`, else the file's.
    pub fn threshold(&self, rule: &Rule, model: &str) -> f32 {
        self.calibration(model)
            .and_then(|c| c.rules.get(&rule.id))
            .map(|r| r.threshold)
            .unwrap_or(rule.threshold)
    }
}

/// Loads every `*.toml` constitution in a folder; errors name the file.
pub fn load_dir(dir: &Path) -> Result<Vec<Constitution>, ConstitutionErrors> {
    let entries = std::fs::read_dir(dir).map_err(|e| {
        ConstitutionErrors(vec![ConstitutionError {
            file: dir.to_path_buf(),
            line: None,
            field: String::new(),
            message: format!("cannot read constitution folder: {e}"),
        }])
    })?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    paths.sort();
    let mut out: Vec<Constitution> = Vec::new();
    let mut errors = Vec::new();
    for path in paths {
        match parse_file(&path) {
            Ok(c) => {
                if let Some(other) = out.iter().find(|o| o.id == c.id) {
                    errors.push(ConstitutionError {
                        file: path.clone(),
                        line: None,
                        field: "id".into(),
                        message: format!(
                            "constitution id {:?} is also used by {}",
                            c.id,
                            other.path.display()
                        ),
                    });
                } else {
                    out.push(c);
                }
            }
            Err(e) => errors.extend(e.0),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(ConstitutionErrors(errors))
    }
}
