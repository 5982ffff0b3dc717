//! `POST /v1/evaluate`: one text or a batch against a constitution.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};

use super::error::AppError;
use super::extract::ApiJson;
use crate::audit::{AuditRecord, Origin, Source};
use crate::auth::Caller;
use crate::constitution::ConstitutionRef;
use crate::engine::{Evaluation, Timings};
use crate::evaluate::{Detection, Kind, RuleResult, TextResult, Verdict};
use crate::ids::{client_key_id, new_id};
use crate::state::AppState;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvaluateRequest {
    /// One text...
    #[serde(default)]
    pub text: Option<String>,
    /// ...or a batch of texts.
    #[serde(default)]
    pub texts: Option<Vec<String>>,
    /// Constitution id; the default one when absent.
    #[serde(default)]
    pub constitution: Option<String>,
    /// `prompt` or `response` (default `response`).
    #[serde(default)]
    pub kind: Kind,
    /// Free-form metadata kept with the evaluation (not used in scoring).
    #[serde(default)]
    pub context: Option<serde_json::Map<String, serde_json::Value>>,
}

/// One text's result, as returned in `results` of a batch.
#[derive(Debug, Serialize)]
pub struct TextOutcome {
    /// Absent when flattened into a single-text response, whose top-level `verdict` is
    /// this text's (a key must not appear twice in one JSON object).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verdict: Option<Verdict>,
    pub risk: f32,
    pub violated: Vec<String>,
    pub tokens: usize,
    pub windows: usize,
    pub rules: Vec<RuleResult>,
    /// What the rules' detectors found: rule, detector, kind and character span.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub detections: Vec<Detection>,
    /// The text with every span a `redact` rule found replaced by `[KIND]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redacted: Option<String>,
}

impl From<TextResult> for TextOutcome {
    fn from(r: TextResult) -> Self {
        TextOutcome {
            violated: r.violated().map(|x| x.id.clone()).collect(),
            verdict: Some(r.verdict),
            risk: r.risk,
            tokens: r.tokens,
            windows: r.windows,
            rules: r.rules,
            detections: r.detections,
            redacted: r.redacted,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct EvaluateResponse {
    pub id: String,
    /// `fail` when any text fails.
    pub verdict: Verdict,
    pub constitution: ConstitutionRef,
    pub model: String,
    pub kind: Kind,
    /// Single-text requests: that text's result, flattened here.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub single: Option<TextOutcome>,
    /// Batch requests: one result per text, in order.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub results: Option<Vec<TextOutcome>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context: Option<serde_json::Map<String, serde_json::Value>>,
    pub timings: Timings,
}

/// Checks the texts against the limits; returns them and whether it was a batch.
pub fn validate(
    req: &mut EvaluateRequest,
    max_chars: usize,
    max_texts: usize,
) -> Result<(Vec<String>, bool), AppError> {
    let (texts, batch) = match (req.text.take(), req.texts.take()) {
        (Some(_), Some(_)) => {
            return Err(AppError::invalid(
                "text",
                "give either `text` or `texts`, not both",
            ))
        }
        (Some(t), None) => (vec![t], false),
        (None, Some(ts)) => (ts, true),
        (None, None) => {
            return Err(AppError::invalid(
                "text",
                "missing `text` (or `texts` for a batch)",
            ))
        }
    };
    if batch && texts.is_empty() {
        return Err(AppError::invalid("texts", "must hold at least one text"));
    }
    if texts.len() > max_texts {
        return Err(AppError::TooLarge {
            field: "texts".into(),
            message: format!("{} texts; at most {max_texts} per request", texts.len()),
        });
    }
    for (i, t) in texts.iter().enumerate() {
        let field = || {
            if batch {
                format!("texts[{i}]")
            } else {
                "text".to_string()
            }
        };
        if t.trim().is_empty() {
            return Err(AppError::invalid(field(), "must not be empty"));
        }
        // PostgreSQL text cannot hold NUL: refused before evaluation, so the audited text
        // is always the evaluated one.
        if let Some(at) = t.chars().position(|c| c == '\0') {
            return Err(AppError::invalid(
                field(),
                format!("holds a NUL character (at character {at}); NUL is not accepted"),
            ));
        }
        // Cheap bound first: a string of more bytes than 4x the limit is over it anyway.
        if t.len() > max_chars && (t.len() > 4 * max_chars || t.chars().count() > max_chars) {
            return Err(AppError::TooLarge {
                field: field(),
                message: format!("text is longer than {max_chars} characters"),
            });
        }
    }
    if let Some(id) = &req.constitution {
        if id.trim().is_empty() {
            return Err(AppError::invalid(
                "constitution",
                "must not be empty when given",
            ));
        }
    }
    Ok((texts, batch))
}

pub fn response(
    id: String,
    kind: Kind,
    batch: bool,
    context: Option<serde_json::Map<String, serde_json::Value>>,
    evaluation: Evaluation,
) -> EvaluateResponse {
    let Evaluation {
        index,
        model: evaluation_model,
        mut results,
        timings,
    } = evaluation;
    let verdict = if results.iter().any(|r| r.verdict == Verdict::Fail) {
        Verdict::Fail
    } else {
        Verdict::Pass
    };
    let (single, results) = if batch {
        (
            None,
            Some(results.into_iter().map(TextOutcome::from).collect()),
        )
    } else {
        let single = results.pop().map(|r| TextOutcome {
            verdict: None,
            ..TextOutcome::from(r)
        });
        (single, None)
    };
    EvaluateResponse {
        id,
        verdict,
        constitution: index.constitution().reference(),
        model: evaluation_model.to_string(),
        kind,
        single,
        results,
        context,
        timings,
    }
}

#[tracing::instrument(skip_all, fields(texts, constitution, verdict))]
pub async fn evaluate(
    State(state): State<AppState>,
    caller: Option<Extension<Arc<Caller>>>,
    headers: HeaderMap,
    ApiJson(mut req): ApiJson<EvaluateRequest>,
) -> Result<Response, AppError> {
    let started = Instant::now();
    let caller = super::auth::caller(caller);
    let engine = state.engine().ok_or(AppError::NotReady)?;
    let limits = &state.config().limits;
    let (texts, batch) = validate(&mut req, limits.max_text_chars, limits.max_batch_texts)?;
    let span = tracing::Span::current();
    span.record("texts", texts.len());
    // The key's constitution (its default, one of its list), then its text rate.
    let requested = caller.constitution_for(req.constitution.as_deref());
    if let Some(id) = &requested {
        caller.permit(id)?;
    }
    let index = engine.constitution(requested.as_deref())?;
    caller.permit(&index.constitution().id)?;
    let text_rate = caller.take_texts(texts.len())?;
    let texts = Arc::new(texts);
    let evaluation = engine
        .evaluate(Arc::clone(&texts), Some(&index.constitution().id))
        .await?;
    let id = new_id();
    // Recorded before the response leaves: an answered evaluation is never missing
    // from the audit log.
    let origin = Origin {
        source: Source::Api,
        // The Charter key's id; without one, the id of a bearer key (`auth.mode = "none"`).
        client_key_id: caller.key_id.clone().or_else(|| client_key_id(&headers)),
        constitution: evaluation.index.constitution(),
        model: &evaluation.model,
        kind: req.kind,
        latency_ms: started.elapsed().as_secs_f64() * 1e3,
        context: req.context.clone().map(serde_json::Value::Object),
    };
    for (i, (text, result)) in texts.iter().zip(&evaluation.results).enumerate() {
        let record_id = if batch {
            format!("{id}.{i}")
        } else {
            id.clone()
        };
        let record = AuditRecord::from_result(record_id, &origin, text, result);
        state.audit().record(record);
    }
    let response = response(id, req.kind, batch, req.context, evaluation);
    span.record("constitution", response.constitution.id.as_str());
    span.record(
        "verdict",
        match response.verdict {
            Verdict::Pass => "pass",
            Verdict::Fail => "fail",
        },
    );
    let mut response = Json(response).into_response();
    if let Some(state) = text_rate {
        super::auth::rate_headers(response.headers_mut(), &state);
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(json: &str) -> EvaluateRequest {
        serde_json::from_str(json).unwrap()
    }

    fn field(err: AppError) -> String {
        match err {
            AppError::Invalid { field, .. } | AppError::TooLarge { field, .. } => field,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn single_and_batch() {
        assert_eq!(
            field(validate(&mut req(r#"{"text": "a\u0000b"}"#), 10, 2).unwrap_err()),
            "text"
        );
        assert_eq!(
            field(validate(&mut req(r#"{"texts": ["ok", "\u0000"]}"#), 10, 2).unwrap_err()),
            "texts[1]"
        );
        let (t, batch) = validate(&mut req(r#"{"text": "hi"}"#), 10, 2).unwrap();
        assert_eq!((t.len(), batch), (1, false));
        let (t, batch) = validate(&mut req(r#"{"texts": ["a", "b"]}"#), 10, 2).unwrap();
        assert_eq!((t.len(), batch), (2, true));
    }

    #[test]
    fn bad_inputs_name_their_field() {
        assert_eq!(
            field(validate(&mut req(r#"{}"#), 10, 2).unwrap_err()),
            "text"
        );
        assert_eq!(
            field(validate(&mut req(r#"{"text": "  "}"#), 10, 2).unwrap_err()),
            "text"
        );
        assert_eq!(
            field(validate(&mut req(r#"{"texts": []}"#), 10, 2).unwrap_err()),
            "texts"
        );
        assert_eq!(
            field(validate(&mut req(r#"{"texts": ["a", ""]}"#), 10, 2).unwrap_err()),
            "texts[1]"
        );
        assert_eq!(
            field(validate(&mut req(r#"{"texts": ["a", "b", "c"]}"#), 10, 2).unwrap_err()),
            "texts"
        );
        assert_eq!(
            field(validate(&mut req(r#"{"text": "12345678901"}"#), 10, 2).unwrap_err()),
            "text"
        );
        assert_eq!(
            field(validate(&mut req(r#"{"text": "a", "texts": ["b"]}"#), 10, 2).unwrap_err()),
            "text"
        );
        // Characters, not bytes: 10 Chinese characters are within a 10-character limit.
        validate(&mut req(r#"{"text": "一二三四五六七八九十"}"#), 10, 2).unwrap();
    }
}
