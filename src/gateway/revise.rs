//! The Constitutional-AI loop for outputs that break a `revise` rule: ask the upstream
//! model to critique the response with each violated rule's critique instruction, then to
//! rewrite it with the revision instruction, evaluate the rewrite, and repeat up to
//! `gateway.max_revise_rounds` times. A rewrite is used only when it passes (or only
//! breaks `flag` rules); anything else, an upstream failure included, ends in a block.
//!
//! The calls go to the same upstream, model, key and `anthropic-*` headers as the client's
//! request, non-streaming; their token usage is counted apart (`charter.extra_usage`),
//! never added to the usage the client is billed for.

use axum::http::{HeaderMap, Method};
use serde_json::{json, Value};

use super::error::{upstream_failure, GatewayError};
use super::messages::{self, Usage};
use super::review::{self, Checked, Decision};
use super::Exchange;
use crate::evaluate::{Kind, TextResult};

const CRITIC_SYSTEM: &str = "You review an AI assistant's response against written principles. \
Be specific and brief; quote the parts that break a principle.";

const REVISER_SYSTEM: &str = "You rewrite an AI assistant's response so that it follows written \
principles. Reply with the rewritten response only, exactly as the assistant would say it to \
the user, with no preamble and no mention of the critique.";

/// How the loop ended.
pub struct Outcome {
    /// The rewrite that passed, its `stop_reason` and its evaluation.
    pub revision: Option<(String, Value, Checked)>,
    pub rounds: u32,
    pub extra_usage: Usage,
    /// Why no rewrite is used, when none is.
    pub note: Option<String>,
}

/// Runs the loop for `response` (which `first` found breaking a revise rule).
pub async fn run(ex: &Exchange, response: &str, first: &Checked) -> Result<Outcome, GatewayError> {
    let max_rounds = ex.gw.config().gateway.max_revise_rounds;
    let mut outcome = Outcome {
        revision: None,
        rounds: 0,
        extra_usage: Usage::default(),
        note: None,
    };
    let mut current = response.to_string();
    let mut violations = first.result.clone();
    for round in 1..=max_rounds {
        outcome.rounds = round;
        let rules = instructions(first, &violations);
        let critique_body = critique_request(ex, &current, &rules);
        let (critique, _) = match call(ex, critique_body, &mut outcome.extra_usage).await {
            Ok(reply) => reply,
            Err(note) => {
                outcome.note = Some(format!("critique call failed: {note}"));
                return Ok(outcome);
            }
        };
        let revision_body = revision_request(ex, &current, &critique, &rules);
        let (revision, stop_reason) = match call(ex, revision_body, &mut outcome.extra_usage).await
        {
            Ok(reply) => reply,
            Err(note) => {
                outcome.note = Some(format!("revision call failed: {note}"));
                return Ok(outcome);
            }
        };
        if revision.trim().is_empty() {
            outcome.note = Some("the revision was empty".into());
            return Ok(outcome);
        }
        let checked = review::check_output(&ex.gw, &ex.engine, &revision, &ex.constitution).await?;
        let decision = review::decide(&checked.result);
        ex.record(
            &format!("revision{round}"),
            Kind::Response,
            &checked,
            &revision,
            json!({
                "part": "revision",
                "round": round,
                "stream": false,
                "checked_chars": checked.chars,
                "decision": format!("{decision:?}").to_lowercase(),
                "request_id": ex.request_id,
            }),
        );
        match decision {
            // What a redact rule finds in the revision is masked when it is sent.
            Decision::Pass | Decision::Flag | Decision::Redact => {
                outcome.revision = Some((revision, stop_reason, checked));
                return Ok(outcome);
            }
            Decision::Block => {
                outcome.note = Some(format!(
                    "the revision of round {round} broke a block rule ({})",
                    violated_ids(&checked.result).join(",")
                ));
                return Ok(outcome);
            }
            Decision::Revise => {
                current = revision;
                violations = checked.result;
            }
        }
    }
    outcome.note = Some(format!(
        "still breaks a revise rule after {max_rounds} round(s)"
    ));
    Ok(outcome)
}

fn violated_ids(result: &TextResult) -> Vec<String> {
    result.violated().map(|r| r.id.clone()).collect()
}

/// One violated rule's principle and instructions.
struct RuleInstructions {
    id: String,
    principle: String,
    critique: String,
    revision: String,
}

/// The rules to address: those `current` violates (any action), with their text from the
/// constitution (`{principle}` filled in).
fn instructions(first: &Checked, current: &TextResult) -> Vec<RuleInstructions> {
    let constitution = first.index.constitution();
    current
        .violated()
        .filter_map(|r| constitution.rule(&r.id))
        .map(|rule| {
            let principle = rule
                .principle
                .get("en")
                .or_else(|| rule.principle.values().next())
                .cloned()
                .unwrap_or_default();
            RuleInstructions {
                id: rule.id.clone(),
                critique: rule.critique.replace("{principle}", &principle),
                revision: rule.revision.replace("{principle}", &principle),
                principle,
            }
        })
        .collect()
}

fn exchange_text(ex: &Exchange, response: &str) -> String {
    let request = ex.user_text.as_deref().unwrap_or("(no text)");
    format!("<request>\n{request}\n</request>\n\n<response>\n{response}\n</response>")
}

fn critique_request(ex: &Exchange, response: &str, rules: &[RuleInstructions]) -> Value {
    let mut prompt = format!(
        "Here is a request from a user and a response from an AI assistant.\n\n{}\n\n\
         The response may break these principles:\n",
        exchange_text(ex, response)
    );
    for r in rules {
        prompt.push_str(&format!(
            "- {} ({}). Critique request: {}\n",
            r.principle, r.id, r.critique
        ));
    }
    prompt.push_str("\nWrite the critique only.");
    json!({
        "model": ex.model,
        "max_tokens": ex.gw.config().gateway.critique_max_tokens,
        "system": CRITIC_SYSTEM,
        "messages": [{"role": "user", "content": prompt}],
    })
}

fn revision_request(
    ex: &Exchange,
    response: &str,
    critique: &str,
    rules: &[RuleInstructions],
) -> Value {
    let mut prompt = format!(
        "Here is a request from a user, a response from an AI assistant and a critique of \
         the response.\n\n{}\n\n<critique>\n{critique}\n</critique>\n\n",
        exchange_text(ex, response)
    );
    for r in rules {
        prompt.push_str(&format!("Revision request ({}): {}\n", r.id, r.revision));
    }
    prompt.push_str("\nWrite only the revised response.");
    json!({
        "model": ex.model,
        "max_tokens": ex.max_tokens,
        "system": REVISER_SYSTEM,
        "messages": [{"role": "user", "content": prompt}],
    })
}

/// One non-streaming upstream call; the reply's text and `stop_reason`, or why it failed
/// (for the metadata note). Usage is added to `usage` either way it was reported.
async fn call(ex: &Exchange, body: Value, usage: &mut Usage) -> Result<(String, Value), String> {
    let mut headers: HeaderMap = ex.upstream_headers.clone();
    headers.insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/json"),
    );
    let bytes = serde_json::to_vec(&body).map_err(|e| e.to_string())?;
    let response = ex
        .gw
        .upstream
        .send(
            Method::POST,
            &ex.path_and_query,
            headers,
            Some(bytes.into()),
        )
        .await
        .map_err(|e| e.to_string())?;
    if let Some(failure) = upstream_failure(response.status(), response.headers()) {
        return Err(format!("{} ({})", failure.kind, failure.status));
    }
    let limit = ex.gw.config().gateway.max_response_bytes;
    let bytes = super::read_limited(response, limit)
        .await
        .map_err(|e| e.to_string())?;
    let message: Value = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
    if !messages::is_message(&message) {
        return Err("the reply is not a message".into());
    }
    usage.add(Usage::of(&message));
    Ok((
        messages::response_text(&message),
        message["stop_reason"].clone(),
    ))
}
