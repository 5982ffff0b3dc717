//! Detector rules in a text's result: what the constitution's detectors found, each rule
//! that found something violated, and the text with the `redact` rules' spans masked.
//!
//! A rule with detectors only has no exemplar score: it fails exactly when a detector
//! finds something, its score is its threshold plus or minus [`DETECTOR_MARGIN`] (so
//! `risk > 0` still means `fail`). A rule with exemplars and detectors keeps its exemplar
//! score and also fails when a detector finds something.

use serde::Serialize;

use super::{RuleResult, TextResult, Verdict};
use crate::constitution::{Action, Constitution};
use crate::detect;

/// How far above (a detector found something) or below (nothing) its threshold a
/// detector rule scores.
pub const DETECTOR_MARGIN: f32 = 1.0;

/// One identifier a rule's detector found; `start..end` in characters of the text.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Detection {
    pub rule: String,
    pub detector: String,
    pub kind: String,
    pub start: usize,
    pub end: usize,
}

/// Adds the constitution's detector rules to `result` (the exemplar index's result for
/// `text`, whose rules are the scored ones in file order): every rule in file order, the
/// detections, `redacted`, and the verdict and risk again.
pub fn apply_detectors(result: &mut TextResult, constitution: &Constitution, text: &str) {
    if !constitution.has_detectors() {
        return;
    }
    let found = constitution.detect(text);
    let mut scored = std::mem::take(&mut result.rules).into_iter();
    let mut rules = Vec::with_capacity(constitution.rules.len());
    let mut masked = Vec::new();
    for (i, rule) in constitution.rules.iter().enumerate() {
        let mut r = if rule.scored() {
            scored
                .next()
                .expect("the index scores every rule with exemplars, in file order")
        } else {
            RuleResult {
                id: rule.id.clone(),
                category: rule.category.clone(),
                severity: rule.severity,
                action: rule.action,
                score: rule.threshold - DETECTOR_MARGIN,
                threshold: rule.threshold,
                violated: false,
                evidence: None,
                detections: 0,
            }
        };
        debug_assert_eq!(r.id, rule.id);
        if let Some((_, hits)) = found.iter().find(|(r, _)| *r == i) {
            r.detections = hits.len();
            r.score = r.score.max(r.threshold + DETECTOR_MARGIN);
            r.violated = true;
            result.detections.extend(hits.iter().map(|h| Detection {
                rule: rule.id.clone(),
                detector: h.detector.clone(),
                kind: h.kind.clone(),
                start: char_offset(text, h.start),
                end: char_offset(text, h.end),
            }));
            if rule.action == Action::Redact {
                masked.extend(hits.iter().cloned());
            }
        }
        rules.push(r);
    }
    result.rules = rules;
    result.detections.sort_by_key(|d| (d.start, d.end));
    let risk = result
        .rules
        .iter()
        .map(|r| r.score - r.threshold)
        .fold(f32::NEG_INFINITY, f32::max);
    result.risk = if risk.is_finite() { risk } else { 0.0 };
    result.verdict = if result.rules.iter().any(|r| r.violated) {
        Verdict::Fail
    } else {
        Verdict::Pass
    };
    if !masked.is_empty() {
        result.redacted = Some(detect::mask(text, &detect::resolve(masked)));
    }
}

/// The character offset of byte offset `byte` in `text`.
fn char_offset(text: &str, byte: usize) -> usize {
    text[..byte].chars().count()
}
