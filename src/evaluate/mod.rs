//! Scoring: embeddings of a text's pieces + a constitution's exemplar index -> per-rule
//! scores, verdicts and evidence. Pure computation: no I/O, no model, no HTTP.
//!
//! A rule's score for one piece is the mean similarity of the piece's `top_k` nearest
//! violating exemplars minus that of its `top_k` nearest compliant exemplars (the rule's
//! own and the constitution's shared ones). Similarity to the principle text alone is
//! near chance, so the exemplars carry the rule. A text's rule score is the highest over
//! its pieces (the whole text, and windows of long texts), so a violation hidden after a
//! long harmless preamble still counts. The rule is violated when the score exceeds the
//! threshold in force (calibrated for this model, else the file's); `risk` is the largest
//! score-minus-threshold over rules, so `risk > 0` exactly when the verdict is `fail`.
//!
//! When the constitution's calibration has learned heads for this model and exemplar set
//! ([`head`]), a rule's score is instead its head's logit over the piece's embedding and
//! kNN features, and a sentence piece of a long text counts only above the calibrated
//! margin. Evidence is the same nearest exemplars either way.

mod detections;
pub mod head;
mod index;
pub mod metrics;

use serde::Serialize;

use crate::constitution::{Action, Severity};
use crate::embed::TextEmbedding;

pub use detections::{apply_detectors, Detection, DETECTOR_MARGIN};
pub use index::{Index, IndexError, Similarities, NO_HEAD_LOGIT};

/// Whether the text is a user's prompt or a model's response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Prompt,
    #[default]
    Response,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Prompt => "prompt",
            Kind::Response => "response",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Pass,
    Fail,
}

/// The matched span of a long text (character offsets into the text).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Span {
    pub start: usize,
    pub end: usize,
    pub text: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Evidence {
    /// The violating exemplar nearest to the text.
    pub exemplar: String,
    pub similarity: f32,
    /// The compliant exemplar nearest to the text, when the rule has any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compliant_exemplar: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compliant_similarity: Option<f32>,
    /// For texts scored in windows: the window that scored highest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub span: Option<Span>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RuleResult {
    pub id: String,
    pub category: String,
    pub severity: Severity,
    pub action: Action,
    pub score: f32,
    pub threshold: f32,
    pub violated: bool,
    /// The nearest exemplars (rules scored by exemplars).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub evidence: Option<Evidence>,
    /// How many identifiers the rule's detectors found (listed in the text's
    /// `detections`).
    #[serde(skip_serializing_if = "is_zero")]
    pub detections: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

#[derive(Debug, Clone, Serialize)]
pub struct TextResult {
    pub verdict: Verdict,
    /// Largest score-minus-threshold over rules; > 0 exactly when the verdict is fail.
    pub risk: f32,
    /// Tokens in the text, and whether it was scored in windows.
    pub tokens: usize,
    pub windows: usize,
    pub rules: Vec<RuleResult>,
    /// What the rules' detectors found (character spans into the text).
    pub detections: Vec<Detection>,
    /// The text with the spans of `redact` rules masked, when they found any.
    pub redacted: Option<String>,
}

impl TextResult {
    pub fn violated(&self) -> impl Iterator<Item = &RuleResult> {
        self.rules.iter().filter(|r| r.violated)
    }
}

/// Scores one embedded text against an index. `text` is the text the pieces index into.
pub fn evaluate(index: &Index, text: &str, embedded: &TextEmbedding, top_k: usize) -> TextResult {
    evaluate_excluding(index, text, embedded, top_k, None)
}

/// [`evaluate`] without the exemplar rows where `exclude` is true (cross-validation).
pub fn evaluate_excluding(
    index: &Index,
    text: &str,
    embedded: &TextEmbedding,
    top_k: usize,
    exclude: Option<&[bool]>,
) -> TextResult {
    let mut best: Vec<Option<index::PieceScore>> = vec![None; index.rules().len()];
    let mut best_piece = vec![0usize; index.rules().len()];
    for (p, piece) in embedded.pieces.iter().enumerate() {
        let sims = index.similarity_pair(&piece.vector);
        let mut scores = index.score_similarities(&sims.plain, top_k, exclude);
        if let Some(logits) = index.head_logits(&piece.vector, &sims.centred, exclude) {
            // A sentence piece of a long text must clear the margin: a long harmless
            // text has many pieces, each a chance to score high by luck.
            let margin = if p == 0 { 0.0 } else { index.piece_margin() };
            for (s, l) in scores.iter_mut().zip(logits) {
                s.score = l - margin;
            }
        }
        for (r, s) in scores.into_iter().enumerate() {
            if best[r].as_ref().is_none_or(|b| s.score > b.score) {
                best[r] = Some(s);
                best_piece[r] = p;
            }
        }
    }
    let windows = embedded.pieces.len().saturating_sub(1);
    let mut risk = f32::NEG_INFINITY;
    let rules: Vec<RuleResult> = index
        .rules()
        .iter()
        .zip(best)
        .zip(best_piece)
        .map(|((rule, score), p)| {
            let score = score.expect("every piece scores every rule");
            let margin = score.score - rule.threshold;
            risk = risk.max(margin);
            let span = (windows > 0 && p > 0).then(|| {
                let piece = &embedded.pieces[p];
                Span {
                    start: text[..piece.start].chars().count(),
                    end: text[..piece.end].chars().count(),
                    text: text[piece.start..piece.end].to_string(),
                }
            });
            RuleResult {
                id: rule.id.clone(),
                category: rule.category.clone(),
                severity: rule.severity,
                action: rule.action,
                score: score.score,
                threshold: rule.threshold,
                violated: margin > 0.0,
                detections: 0,
                evidence: Some(Evidence {
                    exemplar: excerpt(index.exemplar_text(score.nearest_violating.0)),
                    similarity: score.nearest_violating.1,
                    compliant_exemplar: score
                        .nearest_compliant
                        .map(|(i, _)| excerpt(index.exemplar_text(i))),
                    compliant_similarity: score.nearest_compliant.map(|(_, s)| s),
                    span,
                }),
            }
        })
        .collect();
    let verdict = if rules.iter().any(|r| r.violated) {
        Verdict::Fail
    } else {
        Verdict::Pass
    };
    TextResult {
        verdict,
        risk: if risk.is_finite() { risk } else { 0.0 },
        tokens: embedded.tokens,
        windows,
        rules,
        detections: Vec::new(),
        redacted: None,
    }
}

/// The ensemble's result for one text from each model's result (same constitution, same
/// rule order): a rule's score is the mean over the models of its margin (the model's
/// score minus its threshold in force), violated above `threshold` (fitted by
/// `charter calibrate` for the pair, else 0). Evidence, spans and token counts are the
/// first model's.
pub fn average(results: Vec<TextResult>, threshold: f32) -> TextResult {
    let mut results = results.into_iter();
    let mut first = results.next().expect("an ensemble has at least one model");
    let others: Vec<TextResult> = results.collect();
    if others.is_empty() {
        return first;
    }
    let models = (others.len() + 1) as f32;
    let mut risk = f32::NEG_INFINITY;
    for (r, rule) in first.rules.iter_mut().enumerate() {
        let margins: f32 = others
            .iter()
            .map(|o| {
                debug_assert_eq!(o.rules[r].id, rule.id);
                o.rules[r].score - o.rules[r].threshold
            })
            .sum();
        rule.score = (rule.score - rule.threshold + margins) / models;
        rule.threshold = threshold;
        rule.violated = rule.score > threshold;
        risk = risk.max(rule.score - threshold);
    }
    first.risk = if risk.is_finite() { risk } else { 0.0 };
    first.verdict = if first.rules.iter().any(|r| r.violated) {
        Verdict::Fail
    } else {
        Verdict::Pass
    };
    first
}

/// Longest exemplar text shown as evidence, in characters.
pub const EXCERPT_CHARS: usize = 280;

/// The first [`EXCERPT_CHARS`] characters of an exemplar, marked when cut.
fn excerpt(text: &str) -> String {
    match text.char_indices().nth(EXCERPT_CHARS) {
        None => text.to_string(),
        Some((cut, _)) => format!("{}…", &text[..cut]),
    }
}

#[cfg(test)]
mod tests;
