//! TOML -> [`Constitution`], collecting every error with its file, line and field.
//!
//! This file reads the TOML and validates the constitution and its rules;
//! `detectors` checks a rule's detectors and patterns; `files` reads the files beside
//! the TOML (example files, calibrations), hashing each into the version.

mod detectors;
mod files;

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use serde::Deserialize;
use serde_spanned::Spanned;
use sha2::{Digest, Sha256};

use super::{Action, Constitution, ConstitutionError, ConstitutionErrors, Example, Rule, Severity};
use detectors::{parse_detectors, RawPattern};
pub use files::{calibration_path, model_calibration_path};
use files::{read_calibrations, read_examples};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConstitution {
    id: Spanned<String>,
    #[serde(default)]
    description: String,
    #[serde(default)]
    defaults: RawDefaults,
    /// Compliant exemplars shared by every rule.
    #[serde(default)]
    compliant: Vec<RawExample>,
    /// JSONL file of shared compliant exemplars.
    #[serde(default)]
    compliant_file: Option<Spanned<String>>,
    #[serde(default)]
    rules: Vec<RawRule>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    severity: Option<Severity>,
    action: Option<Action>,
    threshold: Option<Spanned<f32>>,
    critique: Option<String>,
    revision: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    id: Spanned<String>,
    category: Option<Spanned<String>>,
    principle: Spanned<RawPrinciple>,
    severity: Option<Severity>,
    action: Option<Action>,
    threshold: Option<Spanned<f32>>,
    critique: Option<String>,
    revision: Option<String>,
    /// The gateway's answer to a blocked text breaking this rule: one text, or by language.
    refusal: Option<Spanned<RawPrinciple>>,
    #[serde(default)]
    violating: Vec<RawExample>,
    #[serde(default)]
    compliant: Vec<RawExample>,
    /// JSONL file with `{"text", "label": "violating"|"compliant", "source"?}` lines.
    examples_file: Option<Spanned<String>>,
    /// Built-in detectors by name.
    #[serde(default)]
    detectors: Vec<Spanned<String>>,
    /// Custom regular expressions.
    #[serde(default)]
    patterns: Vec<Spanned<RawPattern>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawPrinciple {
    One(String),
    ByLanguage(BTreeMap<String, String>),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawExample {
    Text(String),
    WithSource {
        text: String,
        source: Option<String>,
    },
}

impl From<RawExample> for Example {
    fn from(raw: RawExample) -> Self {
        match raw {
            RawExample::Text(text) => Example { text, source: None },
            RawExample::WithSource { text, source } => Example { text, source },
        }
    }
}

/// Collects errors for one file; converts byte offsets to line numbers.
struct Errors<'a> {
    file: &'a Path,
    source: &'a str,
    list: Vec<ConstitutionError>,
}

impl Errors<'_> {
    fn line_of(&self, offset: usize) -> usize {
        self.source[..offset.min(self.source.len())]
            .bytes()
            .filter(|&b| b == b'\n')
            .count()
            + 1
    }

    fn at(
        &mut self,
        span: Option<std::ops::Range<usize>>,
        field: &str,
        message: impl Into<String>,
    ) {
        let line = span.map(|s| self.line_of(s.start));
        self.list.push(ConstitutionError {
            file: self.file.to_path_buf(),
            line,
            field: field.to_string(),
            message: message.into(),
        });
    }

    fn in_file(
        &mut self,
        file: &Path,
        line: Option<usize>,
        field: &str,
        message: impl Into<String>,
    ) {
        self.list.push(ConstitutionError {
            file: file.to_path_buf(),
            line,
            field: field.to_string(),
            message: message.into(),
        });
    }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}

/// Reads, validates and versions one constitution file.
pub fn parse_file(path: &Path) -> Result<Constitution, ConstitutionErrors> {
    let bytes = std::fs::read(path).map_err(|e| {
        ConstitutionErrors(vec![ConstitutionError {
            file: path.to_path_buf(),
            line: None,
            field: String::new(),
            message: format!("cannot read: {e}"),
        }])
    })?;
    let source = String::from_utf8_lossy(&bytes).into_owned();
    let mut errors = Errors {
        file: path,
        source: &source,
        list: Vec::new(),
    };

    let raw: RawConstitution = match toml::from_str(&source) {
        Ok(raw) => raw,
        Err(e) => {
            let field = e
                .message()
                .split('`')
                .nth(1)
                .map(str::to_string)
                .unwrap_or_default();
            errors.at(e.span(), &field, e.message().trim().to_string());
            return Err(ConstitutionErrors(errors.list));
        }
    };

    let mut hasher = Sha256::new();
    hasher.update(&bytes);
    let base = path.parent().unwrap_or(Path::new("."));

    if !valid_id(raw.id.get_ref()) {
        errors.at(
            Some(raw.id.span()),
            "id",
            "must be 1-64 characters of letters, digits, '-', '_' or '.'",
        );
    }
    let default_threshold = match &raw.defaults.threshold {
        Some(t) => check_threshold(&mut errors, t, "defaults.threshold"),
        None => 0.0,
    };
    let default_critique = raw.defaults.critique.clone().unwrap_or_else(|| {
        "Identify specifically how the response breaks this principle: {principle}".into()
    });
    let default_revision = raw.defaults.revision.clone().unwrap_or_else(|| {
        "Rewrite the response so that it follows this principle, keeping everything helpful \
         that does not break it: {principle}"
            .into()
    });

    let defaults = RuleDefaults {
        severity: raw.defaults.severity,
        action: raw.defaults.action,
        threshold: default_threshold,
        critique: default_critique,
        revision: default_revision,
    };

    let mut shared_compliant: Vec<Example> = raw.compliant.into_iter().map(Example::from).collect();
    if let Some(file) = &raw.compliant_file {
        for (example, label) in
            read_examples(&mut errors, &mut hasher, base, file, "compliant_file")
        {
            if label.as_deref().is_some_and(|l| l != "compliant") {
                continue;
            }
            shared_compliant.push(example);
        }
    }

    let mut rules = Vec::with_capacity(raw.rules.len());
    let mut seen = HashSet::new();
    if raw.rules.is_empty() {
        errors.at(
            None,
            "rules",
            "a constitution needs at least one [[rules]] entry",
        );
    }
    for (i, r) in raw.rules.into_iter().enumerate() {
        let rule = parse_rule(&mut errors, &mut hasher, base, &defaults, i, r, &mut seen);
        rules.push(rule);
    }

    let calibrations = read_calibrations(&mut errors, &mut hasher, path, &rules);

    if !errors.list.is_empty() {
        return Err(ConstitutionErrors(errors.list));
    }
    let version = hex::encode(&hasher.finalize()[..8]);
    Ok(Constitution {
        id: raw.id.into_inner(),
        description: raw.description,
        version,
        path: path.to_path_buf(),
        shared_compliant,
        rules,
        calibrations,
    })
}

/// What a rule takes from `[defaults]` when it does not say.
struct RuleDefaults {
    severity: Option<Severity>,
    action: Option<Action>,
    threshold: f32,
    critique: String,
    revision: String,
}

/// Rule `i` of the file, validated (errors are collected, not returned); its example
/// file is read relative to `base` and hashed into the version.
fn parse_rule(
    errors: &mut Errors<'_>,
    hasher: &mut Sha256,
    base: &Path,
    defaults: &RuleDefaults,
    i: usize,
    r: RawRule,
    seen: &mut HashSet<String>,
) -> Rule {
    let field = |name: &str| format!("rules[{i}].{name}");
    let id = r.id.get_ref().clone();
    if !valid_id(&id) {
        errors.at(
            Some(r.id.span()),
            &field("id"),
            "must be 1-64 characters of letters, digits, '-', '_' or '.'",
        );
    } else if !seen.insert(id.clone()) {
        errors.at(
            Some(r.id.span()),
            &field("id"),
            format!("duplicate rule id {id:?}"),
        );
    }
    let principle = match r.principle.get_ref() {
        RawPrinciple::One(text) => BTreeMap::from([("en".to_string(), text.clone())]),
        RawPrinciple::ByLanguage(map) => map.clone(),
    };
    if principle.is_empty() || principle.values().any(|t| t.trim().is_empty()) {
        errors.at(
            Some(r.principle.span()),
            &field("principle"),
            "must not be empty",
        );
    }
    let refusal = match r.refusal.as_ref().map(|r| (r.get_ref(), r.span())) {
        None => BTreeMap::new(),
        Some((RawPrinciple::One(text), _)) => BTreeMap::from([("en".to_string(), text.clone())]),
        Some((RawPrinciple::ByLanguage(map), _)) => map.clone(),
    };
    if let Some(raw) = &r.refusal {
        if refusal.is_empty() || refusal.values().any(|t| t.trim().is_empty()) {
            errors.at(
                Some(raw.span()),
                &field("refusal"),
                "must not be empty when given",
            );
        }
    }
    let threshold = match &r.threshold {
        Some(t) => check_threshold(errors, t, &field("threshold")),
        None => defaults.threshold,
    };
    let mut violating: Vec<Example> = r.violating.into_iter().map(Example::from).collect();
    let mut compliant: Vec<Example> = r.compliant.into_iter().map(Example::from).collect();
    if let Some(file) = &r.examples_file {
        for (example, label) in read_examples(errors, hasher, base, file, &field("examples_file")) {
            match label.as_deref() {
                Some("violating") | Some("violation") => violating.push(example),
                Some("compliant") | Some("ok") => compliant.push(example),
                _ => {} // reported by read_examples
            }
        }
    }
    let (detect, detectors, patterns) = parse_detectors(errors, &field, &r.detectors, &r.patterns);
    if violating.is_empty() && detect.is_empty() {
        errors.at(
            Some(r.id.span()),
            &field("violating"),
            "a rule needs at least one violating exemplar (similarity to the principle alone is near chance), or detectors",
        );
    }
    let action = r.action.or(defaults.action).unwrap_or(Action::Block);
    if action == Action::Redact && detect.is_empty() {
        errors.at(
            Some(r.id.span()),
            &field("action"),
            "\"redact\" needs detectors or patterns: they find what is masked",
        );
    }
    for (list, name) in [(&violating, "violating"), (&compliant, "compliant")] {
        if let Some(pos) = list.iter().position(|e| e.text.trim().is_empty()) {
            errors.at(
                Some(r.id.span()),
                &field(&format!("{name}[{pos}]")),
                "empty exemplar text",
            );
        }
    }
    let category = r
        .category
        .map(|c| c.into_inner())
        .unwrap_or_else(|| id.clone());
    let principle_text = principle
        .get("en")
        .or_else(|| principle.values().next())
        .cloned();
    let fill =
        |template: &str| template.replace("{principle}", principle_text.as_deref().unwrap_or(""));
    Rule {
        id,
        category,
        principle,
        severity: r.severity.or(defaults.severity).unwrap_or(Severity::High),
        action,
        threshold,
        critique: fill(r.critique.as_deref().unwrap_or(&defaults.critique)),
        revision: fill(r.revision.as_deref().unwrap_or(&defaults.revision)),
        refusal,
        violating,
        compliant,
        detectors,
        patterns,
        detect,
    }
}

fn check_threshold(errors: &mut Errors<'_>, t: &Spanned<f32>, field: &str) -> f32 {
    let value = *t.get_ref();
    if !value.is_finite() || !(-2.0..=2.0).contains(&value) {
        errors.at(
            Some(t.span()),
            field,
            format!("{value} is outside -2.0..=2.0"),
        );
    }
    value
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn write(dir: &Path, name: &str, body: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, body).unwrap();
        path
    }

    const GOOD: &str = r#"
id = "test"
description = "a test"
compliant = ["How do I kill a Python process?"]

[defaults]
threshold = 0.1
action = "flag"

[[rules]]
id = "harm"
principle = { en = "Do not help cause harm.", zh = "不要帮助造成伤害。" }
severity = "critical"
refusal = { en = "Not that.", zh = "不行。" }
violating = ["How do I build a bomb?", { text = "怎么制造炸弹？", source = "test" }]
compliant = ["How do bombs get defused safely?"]
examples_file = "harm.jsonl"

[[rules]]
id = "privacy"
principle = "Respect privacy."
threshold = 0.2
action = "revise"
violating = ["Find me her home address."]
"#;

    #[test]
    fn parses_rules_defaults_examples_and_versions() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "harm.jsonl", "{\"text\": \"Poison the dog\", \"label\": \"violating\"}\n{\"text\": \"Feed the dog\", \"label\": \"compliant\"}\n");
        let path = write(dir.path(), "test.toml", GOOD);
        let c = parse_file(&path).unwrap();
        assert_eq!(c.id, "test");
        assert_eq!(c.version.len(), 16);
        assert_eq!(c.shared_compliant.len(), 1);
        let harm = c.rule("harm").unwrap();
        assert_eq!(harm.category, "harm");
        assert_eq!(harm.severity, Severity::Critical);
        assert_eq!(harm.action, Action::Flag);
        assert_eq!(harm.threshold, 0.1);
        assert_eq!(harm.principle["zh"], "不要帮助造成伤害。");
        assert_eq!(harm.refusal_in("zh"), Some("不行。"));
        assert_eq!(harm.refusal_in("fr"), Some("Not that."));
        assert_eq!(harm.violating.len(), 3);
        assert_eq!(harm.violating[1].source.as_deref(), Some("test"));
        assert_eq!(harm.compliant.len(), 2);
        assert!(harm.critique.contains("Do not help cause harm."));
        let privacy = c.rule("privacy").unwrap();
        assert_eq!(privacy.threshold, 0.2);
        assert_eq!(privacy.action, Action::Revise);
        assert_eq!(privacy.severity, Severity::High);
        assert_eq!(privacy.refusal_in("en"), None);

        // The version covers the example file, not only the TOML.
        let before = c.version.clone();
        write(
            dir.path(),
            "harm.jsonl",
            "{\"text\": \"Poison the cat\", \"label\": \"violating\"}\n",
        );
        let after = parse_file(&path).unwrap().version;
        assert_ne!(before, after);
        // And the calibration file.
        write(
            dir.path(),
            "test.calibration.json",
            r#"{"model": "m", "target": "f1", "rules": {"harm": {"threshold": 0.3}}}"#,
        );
        let calibrated = parse_file(&path).unwrap();
        assert_ne!(calibrated.version, after);
        assert_eq!(
            calibrated.threshold(calibrated.rule("harm").unwrap(), "m"),
            0.3
        );
        assert_eq!(
            calibrated.threshold(calibrated.rule("harm").unwrap(), "other"),
            0.1
        );
    }

    #[test]
    fn each_model_has_its_own_calibration_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "test.toml", GOOD);
        write(dir.path(), "harm.jsonl", "");
        let cal = |model: &str, t: f32| {
            format!(
                r#"{{"model": "{model}", "target": "f1", "rules": {{"harm": {{"threshold": {t}}}}}}}"#
            )
        };
        write(dir.path(), "test.calibration.json", &cal("m", 0.3));
        let one = parse_file(&path).unwrap();
        write(dir.path(), "test.calibration.e5.json", &cal("e5", 0.7));
        write(dir.path(), "test.calibration.v1.2.json", &cal("v1.2", 0.8));
        // Another constitution's files are not this one's.
        write(dir.path(), "test2.calibration.x.json", &cal("x", 0.9));
        let two = parse_file(&path).unwrap();
        assert_ne!(
            one.version, two.version,
            "every calibration file is versioned"
        );
        let harm = two.rule("harm").unwrap();
        assert_eq!(two.threshold(harm, "m"), 0.3);
        assert_eq!(two.threshold(harm, "e5"), 0.7);
        assert_eq!(two.threshold(harm, "v1.2"), 0.8, "a model id may hold dots");
        assert_eq!(two.threshold(harm, "x"), 0.1);
        let models: Vec<&str> = two.calibrations.iter().map(|c| c.model.as_str()).collect();
        assert_eq!(models, ["m", "e5", "v1.2"], "the main file first");
        std::fs::remove_file(dir.path().join("test.calibration.v1.2.json")).unwrap();

        // A file whose name and content disagree on the model is an error naming both.
        write(dir.path(), "test.calibration.e5.json", &cal("m", 0.7));
        let errs = parse_file(&path).unwrap_err().0;
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].field, "model");
        assert!(errs[0].file.ends_with("test.calibration.e5.json"));
        assert!(errs[0].message.contains("\"e5\"") && errs[0].message.contains("\"m\""));
        // Two calibrations for one model are an error too.
        std::fs::remove_file(dir.path().join("test.calibration.e5.json")).unwrap();
        write(dir.path(), "test.calibration.m.json", &cal("m", 0.7));
        let errs = parse_file(&path).unwrap_err().0;
        assert!(errs[0].message.contains("a second calibration"), "{errs:?}");
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let body = "id = \"x\"\n\n[[rules]]\nid = \"a\"\nprinciple = \"p\"\nthreshold = 7.0\nviolating = [\"v\"]\n\n[[rules]]\nid = \"a\"\nprinciple = \"\"\n[[rules]]\nid = \"b\"\nprinciple = \"p\"\nviolating = [\"v\"]\nrefusal = { en = \" \" }\n";
        let path = write(dir.path(), "bad.toml", body);
        let errs = parse_file(&path).unwrap_err().0;
        let text: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        assert!(
            text.iter()
                .any(|t| t.ends_with("bad.toml:6: rules[0].threshold: 7 is outside -2.0..=2.0")),
            "{text:?}"
        );
        assert!(
            text.iter()
                .any(|t| t.contains("bad.toml:10: rules[1].id: duplicate rule id")),
            "{text:?}"
        );
        assert!(
            text.iter()
                .any(|t| t.contains("bad.toml:11: rules[1].principle: must not be empty")),
            "{text:?}"
        );
        assert!(
            text.iter().any(|t| t.contains("rules[1].violating")),
            "{text:?}"
        );
        assert!(
            text.iter()
                .any(|t| t.contains("bad.toml:16: rules[2].refusal: must not be empty")),
            "{text:?}"
        );
    }

    #[test]
    fn syntax_and_type_errors_have_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "bad.toml", "id = \"x\"\n[[rules]]\nid = \"a\"\nprinciple = \"p\"\nseverity = \"extreme\"\nviolating = [\"v\"]\n");
        let err = parse_file(&path).unwrap_err().to_string();
        assert!(err.contains("bad.toml:5"), "{err}");
        assert!(err.contains("extreme"), "{err}");
        let path = write(dir.path(), "bad2.toml", "id = \"x\"\n[[rules]\n");
        let err = parse_file(&path).unwrap_err().to_string();
        assert!(err.contains("bad2.toml:2"), "{err}");
        let path = write(dir.path(), "bad3.toml", "id = \"x\"\nunknown_key = 1\n[[rules]]\nid=\"a\"\nprinciple=\"p\"\nviolating=[\"v\"]\n");
        let err = parse_file(&path).unwrap_err().to_string();
        assert!(
            err.contains("bad3.toml:2") && err.contains("unknown_key"),
            "{err}"
        );
    }

    #[test]
    fn example_file_errors_point_into_that_file() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "ex.jsonl", "{\"text\": \"ok\", \"label\": \"violating\"}\nnot json\n{\"text\": \"t\", \"label\": \"maybe\"}\n");
        let path = write(
            dir.path(),
            "c.toml",
            "id = \"c\"\n[[rules]]\nid = \"a\"\nprinciple = \"p\"\nexamples_file = \"ex.jsonl\"\n",
        );
        let text = parse_file(&path).unwrap_err().to_string();
        assert!(text.contains("ex.jsonl:2"), "{text}");
        assert!(text.contains("ex.jsonl:3: label"), "{text}");
        let path = write(
            dir.path(),
            "d.toml",
            "id = \"d\"\n[[rules]]\nid = \"a\"\nprinciple = \"p\"\nexamples_file = \"../escape.jsonl\"\n",
        );
        let text = parse_file(&path).unwrap_err().to_string();
        assert!(text.contains("d.toml:5: rules[0].examples_file"), "{text}");
    }

    #[test]
    fn detector_rules_need_no_exemplars_and_check_their_patterns() {
        let dir = tempfile::tempdir().unwrap();
        let good = "id = \"d\"\n[[rules]]\nid = \"harm\"\nprinciple = \"p\"\nviolating = [\"v\"]\n\n[[rules]]\nid = \"personal-data\"\nprinciple = \"p\"\naction = \"redact\"\ndetectors = [\"email\", \"card\"]\npatterns = [{ name = \"employee-id\", regex = \"EMP-[0-9]{6}\", kind = \"EMPLOYEE_ID\" }]\n";
        let path = write(dir.path(), "d.toml", good);
        let c = parse_file(&path).unwrap();
        let rule = c.rule("personal-data").unwrap();
        assert_eq!(rule.action, Action::Redact);
        assert!(!rule.scored());
        assert_eq!(rule.detectors, ["email", "card"]);
        assert_eq!(rule.patterns[0].kind, "EMPLOYEE_ID");
        assert_eq!(c.scored_rules().count(), 1);
        assert!(
            c.silent_rules("m").is_empty(),
            "detectors fire on their own"
        );
        let found = c.detect("mail a@b.io or EMP-123456");
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].0, 1);
        assert_eq!(found[0].1.len(), 2);

        let bad = "id = \"d\"\n[[rules]]\nid = \"pd\"\nprinciple = \"p\"\naction = \"redact\"\ndetectors = [\"emial\"]\npatterns = [\n  { name = \"x\", regex = \"EMP-[0-9\", kind = \"X\" },\n  { name = \"y\", regex = \"a*\", kind = \"lower\" },\n]\n\n[[rules]]\nid = \"r\"\nprinciple = \"p\"\naction = \"redact\"\nviolating = [\"v\"]\n";
        let path = write(dir.path(), "bad.toml", bad);
        let text: Vec<String> = parse_file(&path)
            .unwrap_err()
            .0
            .iter()
            .map(|e| e.to_string())
            .collect();
        let has = |needle: &str| text.iter().any(|t| t.contains(needle));
        assert!(
            has("bad.toml:6: rules[0].detectors[0]: unknown detector \"emial\""),
            "{text:?}"
        );
        assert!(
            has("bad.toml:8: rules[0].patterns[0].regex: invalid regular expression"),
            "{text:?}"
        );
        assert!(
            has("rules[0].patterns[1].regex: matches the empty string"),
            "{text:?}"
        );
        assert!(has("rules[0].patterns[1].kind"), "{text:?}");
        assert!(
            has("rules[1].action: \"redact\" needs detectors"),
            "{text:?}"
        );
        assert!(
            text.iter().all(|t| !t.contains('\n')),
            "one line per error: {text:?}"
        );
    }
}
