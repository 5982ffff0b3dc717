//! A rule's `detectors` and `patterns`: built-in detector names checked, custom regular
//! expressions compiled and checked, each error collected with its field.

use serde::Deserialize;
use serde_spanned::Spanned;

use super::{valid_id, Errors};
use crate::constitution::PatternSpec;
use crate::detect::{Builtin, Detectors, Pattern};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPattern {
    name: String,
    regex: String,
    kind: String,
}

/// A rule's `detectors` and `patterns`, checked: known names, no repeats, custom
/// expressions that compile, do not match the empty string, and have a name and a kind.
pub(super) fn parse_detectors(
    errors: &mut Errors<'_>,
    field: &dyn Fn(&str) -> String,
    names: &[Spanned<String>],
    raw_patterns: &[Spanned<RawPattern>],
) -> (Detectors, Vec<String>, Vec<PatternSpec>) {
    let mut detect = Detectors::default();
    let mut detectors = Vec::new();
    for (j, name) in names.iter().enumerate() {
        match Builtin::from_name(name.get_ref()) {
            Some(b) if detect.builtins.contains(&b) => errors.at(
                Some(name.span()),
                &field(&format!("detectors[{j}]")),
                format!("{:?} is listed twice", name.get_ref()),
            ),
            Some(b) => {
                detect.builtins.push(b);
                detectors.push(b.name().to_string());
            }
            None => {
                let known: Vec<&str> = Builtin::ALL.iter().map(|b| b.name()).collect();
                errors.at(
                    Some(name.span()),
                    &field(&format!("detectors[{j}]")),
                    format!(
                        "unknown detector {:?}; the built-in ones are {}",
                        name.get_ref(),
                        known.join(", ")
                    ),
                );
            }
        }
    }
    let mut patterns = Vec::new();
    for (j, raw) in raw_patterns.iter().enumerate() {
        let span = Some(raw.span());
        let p = raw.get_ref();
        let at = |name: &str| field(&format!("patterns[{j}].{name}"));
        if !valid_id(&p.name) || detect.patterns.iter().any(|q| q.name == p.name) {
            errors.at(
                span.clone(),
                &at("name"),
                "must be a unique name of 1-64 letters, digits, '-', '_' or '.'",
            );
        }
        let kind_ok = !p.kind.is_empty()
            && p.kind.len() <= 32
            && p.kind
                .bytes()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == b'_');
        if !kind_ok {
            errors.at(
                span.clone(),
                &at("kind"),
                "must be 1-32 upper-case letters, digits or '_' (it is shown as [KIND])",
            );
        }
        let regex = match regex::RegexBuilder::new(&p.regex)
            .size_limit(1 << 20)
            .build()
        {
            Ok(re) if re.is_match("") => {
                errors.at(span, &at("regex"), "matches the empty string");
                continue;
            }
            Ok(re) => re,
            Err(e) => {
                // The regex crate's message spans several lines with a caret under the
                // fault; one line keeps `file:line: field: message` readable.
                let message = e
                    .to_string()
                    .lines()
                    .map(str::trim)
                    .collect::<Vec<_>>()
                    .join(" ");
                errors.at(
                    span,
                    &at("regex"),
                    format!("invalid regular expression: {message}"),
                );
                continue;
            }
        };
        patterns.push(PatternSpec {
            name: p.name.clone(),
            regex: p.regex.clone(),
            kind: p.kind.clone(),
        });
        detect.patterns.push(Pattern {
            name: p.name.clone(),
            kind: p.kind.clone(),
            regex,
        });
    }
    (detect, detectors, patterns)
}
