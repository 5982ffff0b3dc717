//! The files beside a constitution: its JSONL example files and its calibration files,
//! each read relative to the TOML file and hashed into the version.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_spanned::Spanned;
use sha2::{Digest, Sha256};

use super::Errors;
use crate::constitution::{Calibration, Example, Rule, CALIBRATION_SUFFIX};

/// One line of an examples file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExampleLine {
    text: String,
    #[serde(default)]
    label: Option<String>,
    #[serde(default)]
    source: Option<String>,
    /// Language tag, for readers of the file; scoring does not need it.
    #[serde(default)]
    #[allow(dead_code)]
    lang: Option<String>,
}

/// The calibration file that belongs to a constitution file: `<stem>.calibration.json`,
/// for whichever model it names.
pub fn calibration_path(path: &Path) -> PathBuf {
    path.with_file_name(format!("{}{CALIBRATION_SUFFIX}", file_stem(path)))
}

/// The calibration file for one more model: `<stem>.calibration.<model>.json`.
pub fn model_calibration_path(path: &Path, model: &str) -> PathBuf {
    path.with_file_name(format!("{}.calibration.{model}.json", file_stem(path)))
}

fn file_stem(path: &Path) -> &str {
    path.file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("constitution")
}

/// Every calibration file of a constitution, in a fixed order: the main one, then one
/// per further model (the model its name says), sorted.
fn calibration_files(path: &Path) -> Vec<(PathBuf, Option<String>)> {
    let mut files = vec![(calibration_path(path), None)];
    let prefix = format!("{}.calibration.", file_stem(path));
    let mut extra: Vec<(PathBuf, Option<String>)> = path
        .parent()
        .and_then(|dir| std::fs::read_dir(dir).ok())
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let model = name.strip_prefix(&prefix)?.strip_suffix(".json")?;
            (!model.is_empty()).then(|| (e.path(), Some(model.to_string())))
        })
        .collect();
    extra.sort();
    files.extend(extra);
    files
}

/// The constitution's calibration files (the main one, then one per further model):
/// each read is hashed into the version and checked against the rules.
pub(super) fn read_calibrations(
    errors: &mut Errors<'_>,
    hasher: &mut Sha256,
    path: &Path,
    rules: &[Rule],
) -> Vec<Calibration> {
    let mut calibrations: Vec<Calibration> = Vec::new();
    for (calibration_file, named_model) in calibration_files(path) {
        let cal_bytes = match std::fs::read(&calibration_file) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                errors.in_file(&calibration_file, None, "", format!("cannot read: {e}"));
                continue;
            }
        };
        hasher.update(b"\0calibration\0");
        hasher.update(&cal_bytes);
        let cal = match serde_json::from_slice::<Calibration>(&cal_bytes) {
            Ok(cal) => cal,
            Err(e) => {
                errors.in_file(&calibration_file, Some(e.line()), "", e.to_string());
                continue;
            }
        };
        for rule_id in cal.rules.keys() {
            if !rules.iter().any(|r| &r.id == rule_id) {
                errors.in_file(
                    &calibration_file,
                    None,
                    &format!("rules.{rule_id}"),
                    "calibration names a rule the constitution does not have",
                );
            }
        }
        if named_model.as_ref().is_some_and(|m| *m != cal.model) {
            errors.in_file(
                &calibration_file,
                None,
                "model",
                format!(
                    "the file name is for model {:?} but the calibration is for {:?}",
                    named_model.unwrap_or_default(),
                    cal.model
                ),
            );
        } else if calibrations.iter().any(|c| c.model == cal.model) {
            errors.in_file(
                &calibration_file,
                None,
                "model",
                format!("a second calibration for model {:?}", cal.model),
            );
        } else {
            calibrations.push(cal);
        }
    }
    calibrations
}

/// Reads a JSONL examples file referenced from the constitution (path relative to it),
/// hashing its bytes into the version. Returns (example, label) pairs.
pub(super) fn read_examples(
    errors: &mut Errors<'_>,
    hasher: &mut Sha256,
    base: &Path,
    file: &Spanned<String>,
    field: &str,
) -> Vec<(Example, Option<String>)> {
    let rel = Path::new(file.get_ref());
    if rel.is_absolute()
        || rel
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        errors.at(
            Some(file.span()),
            field,
            "must be a relative path inside the constitution folder",
        );
        return Vec::new();
    }
    let path = base.join(rel);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => {
            errors.at(
                Some(file.span()),
                field,
                format!("cannot read {}: {e}", path.display()),
            );
            return Vec::new();
        }
    };
    hasher.update(b"\0file\0");
    hasher.update(file.get_ref().as_bytes());
    hasher.update(b"\0");
    hasher.update(text.as_bytes());
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<ExampleLine>(line) {
            Ok(ExampleLine {
                text,
                label,
                source,
                lang: _,
            }) => {
                if text.trim().is_empty() {
                    errors.in_file(&path, Some(n + 1), "text", "empty exemplar text");
                    continue;
                }
                if let Some(l) = &label {
                    if !matches!(l.as_str(), "violating" | "violation" | "compliant" | "ok") {
                        errors.in_file(
                            &path,
                            Some(n + 1),
                            "label",
                            format!("{l:?} is not one of violating, compliant"),
                        );
                        continue;
                    }
                }
                out.push((Example { text, source }, label));
            }
            Err(e) => errors.in_file(&path, Some(n + 1), "", e.to_string()),
        }
    }
    out
}
