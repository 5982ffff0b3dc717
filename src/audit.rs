//! What an evaluation leaves behind: the audit record, and the sink it is handed to.
//!
//! Every answered evaluation (API or gateway) becomes one [`AuditRecord`], handed to the
//! [`AuditSink`] *before* the response is sent. `record` must not block or fail the
//! request: the sink owns durability (queueing, batching, spooling) off the request path.
//! This module only defines the record and the seam; `store` implements the sink.

use serde::{Deserialize, Serialize};

use crate::constitution::Constitution;
use crate::evaluate::{Kind, RuleResult, TextResult, Verdict};

/// Where an evaluation came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Api,
    Gateway,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Api => "api",
            Source::Gateway => "gateway",
        }
    }
}

/// One rule's outcome, as recorded.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RecordedRule {
    pub id: String,
    pub score: f32,
    pub threshold: f32,
    pub violated: bool,
    /// Evidence of a violated rule (exemplar, similarity, span), as the API showed it;
    /// for a rule whose detectors found something, also `detections`: detector, kind and
    /// character span of each, never the value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evidence: Option<serde_json::Value>,
}

/// One evaluated text.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Unique and idempotent: writing the same id twice keeps one record.
    pub id: String,
    /// RFC 3339 UTC time the evaluation was answered.
    pub time: String,
    pub source: Source,
    /// The client's key id (never the key itself), when the request carried one.
    pub client_key_id: Option<String>,
    pub constitution_id: String,
    pub constitution_version: String,
    pub model: String,
    pub kind: Kind,
    pub verdict: Verdict,
    pub risk: f32,
    pub rules: Vec<RecordedRule>,
    pub latency_ms: f64,
    /// The evaluated text; the store keeps it, a salted hash or nothing, per its privacy
    /// setting.
    pub text: String,
    /// Request metadata (`context` of the API; for the gateway what was checked and the
    /// action taken).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<serde_json::Value>,
}

/// What a record says of an evaluation besides its text and result: where it came from,
/// who asked, what judged it, how long it took. One origin serves every text of a batch.
#[derive(Debug, Clone)]
pub struct Origin<'a> {
    pub source: Source,
    /// The client's key id (never the key itself), when the request carried one.
    pub client_key_id: Option<String>,
    pub constitution: &'a Constitution,
    pub model: &'a str,
    pub kind: Kind,
    pub latency_ms: f64,
    /// Request metadata, as [`AuditRecord::context`].
    pub context: Option<serde_json::Value>,
}

impl AuditRecord {
    /// The record `id` of one text's result. What the constitution's detectors find in
    /// the text is kept as detector, kind and place, never as the value: the stored text
    /// (and an evidence span's text) has every detected span masked, whatever the rule's
    /// action, and the counts are the record's own (found again in `text`, so a gateway
    /// result merged from windows is recorded right too).
    pub fn from_result(id: String, origin: &Origin<'_>, text: &str, result: &TextResult) -> Self {
        let Origin {
            source,
            ref client_key_id,
            constitution,
            model,
            kind,
            latency_ms,
            ref context,
        } = *origin;
        let found = constitution.detect(text);
        let rules = result
            .rules
            .iter()
            .map(|r| {
                let position = constitution.rules.iter().position(|x| x.id == r.id);
                let hits = found
                    .iter()
                    .find(|(i, _)| Some(*i) == position)
                    .map(|(_, hits)| hits.as_slice())
                    .unwrap_or_default();
                RecordedRule {
                    id: r.id.clone(),
                    score: r.score,
                    threshold: r.threshold,
                    violated: r.violated,
                    evidence: r
                        .violated
                        .then(|| recorded_evidence(constitution, r, text, hits)),
                }
            })
            .collect();
        AuditRecord {
            id,
            time: now_rfc3339(),
            source,
            client_key_id: client_key_id.clone(),
            constitution_id: constitution.id.clone(),
            constitution_version: constitution.version.clone(),
            model: model.to_string(),
            kind,
            verdict: result.verdict,
            risk: result.risk,
            rules,
            latency_ms,
            text: mask_all(constitution, text),
            context: context.clone(),
        }
    }
}

/// `text` with every span any rule's detectors find masked.
fn mask_all(constitution: &Constitution, text: &str) -> String {
    let found = constitution.detect(text);
    if found.is_empty() {
        return text.to_string();
    }
    let hits = found.into_iter().flat_map(|(_, hits)| hits).collect();
    crate::detect::mask(text, &crate::detect::resolve(hits))
}

/// A violated rule's evidence as recorded: the API's evidence (its span's text masked),
/// and what the rule's detectors found in the text, without the values.
fn recorded_evidence(
    constitution: &Constitution,
    rule: &RuleResult,
    text: &str,
    hits: &[crate::detect::Hit],
) -> serde_json::Value {
    let mut evidence = match &rule.evidence {
        Some(e) => {
            let mut e = e.clone();
            if let Some(span) = &mut e.span {
                span.text = mask_all(constitution, &span.text);
            }
            evidence_value(&e)
        }
        None => serde_json::json!({}),
    };
    if !hits.is_empty() {
        let chars = |b: usize| text[..b].chars().count();
        evidence["detections"] = hits
            .iter()
            .map(|h| {
                serde_json::json!({
                    "detector": h.detector,
                    "kind": h.kind,
                    "start": chars(h.start),
                    "end": chars(h.end),
                })
            })
            .collect();
    }
    evidence
}

/// Receives every audit record. Implementations must return quickly and never lose a
/// record silently.
pub trait AuditSink: Send + Sync + 'static {
    fn record(&self, record: AuditRecord);
}

/// Writes each record to the log (without its text). Used until a database store is
/// configured.
pub struct LogSink;

impl AuditSink for LogSink {
    fn record(&self, r: AuditRecord) {
        let violated: Vec<&str> = r
            .rules
            .iter()
            .filter(|x| x.violated)
            .map(|x| x.id.as_str())
            .collect();
        tracing::info!(
            target: "charter::audit",
            id = %r.id,
            source = r.source.as_str(),
            constitution = %r.constitution_id,
            version = %r.constitution_version,
            verdict = ?r.verdict,
            violated = ?violated,
            latency_ms = r.latency_ms,
            "evaluation"
        );
    }
}

/// Current UTC time as RFC 3339 with milliseconds.
pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The evidence as JSON, with its numbers written as the API writes them. `to_value`
/// would widen each `f32` to `f64` (0.4923832 becomes 0.49238321185112), so a stored
/// record would no longer equal the answer it records; the text form keeps the `f32`'s
/// shortest digits.
fn evidence_value<T: Serialize>(evidence: &T) -> serde_json::Value {
    serde_json::to_string(evidence)
        .and_then(|s| serde_json::from_str(&s))
        .unwrap_or_default()
}
