//! The Constitutional-AI loop for outputs that break a `revise` rule: ask the upstream
//! model to critique the response with each violated rule's critique instruction, then to
//! rewrite it with the revision instruction, evaluate the rewrite, and repeat up to
//! `gateway.max_revise_rounds` times. A rewrite is used only when it passes (or only
//! breaks `flag` rules); anything else, an upstream failure included, ends in a block.
//!
//! The calls go to the same upstream, model, key and `anthropic-*` headers as the client's
//! request, non-streaming; their token usage is counted apart (`charter.extra_usage` and
//! the `x-charter-revise-usage` header), never added to the usage the client is billed
//! for. `gateway.revise_max_tokens` caps it: a call is made only when its input (estimated
//! from its characters) fits in what remains, with `max_tokens` lowered to the rest; when
//! none fits, or a revision is cut short by that lower `max_tokens`, the answer is blocked.

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
        let (critique, _) = match budgeted(ex, critique_body, &mut outcome, "critique").await {
            Some(reply) => reply,
            None => return Ok(outcome),
        };
        let revision_body = revision_request(ex, &current, &critique, &rules);
        let (revision, stop_reason) =
            match budgeted(ex, revision_body, &mut outcome, "revision").await {
                Some(reply) => reply,
                None => return Ok(outcome),
            };
        if revision.trim().is_empty() {
            outcome.note = Some("the revision was empty".into());
            return Ok(outcome);
        }
        let checked =
            review::check_output(&ex.gw, &ex.engine, &[&revision], &ex.constitution).await?;
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

/// What `gateway.revise_max_tokens` leaves for a call of `body`: the `max_tokens` to send
/// (at most the one asked for), or `None` when its estimated input does not fit in what
/// remains of the budget after `spent`. A cap of 0 leaves every call as asked.
fn allowance(cap: u64, spent: Usage, body: &Value) -> Option<u64> {
    let wanted = body["max_tokens"].as_u64().unwrap_or(1);
    if cap == 0 {
        return Some(wanted);
    }
    let input = messages::estimate_tokens(&body.to_string());
    let left = cap.saturating_sub(spent.total()).saturating_sub(input);
    (left > 0).then(|| wanted.min(left))
}

/// One call within the budget; `None` (with the note set) when it could not be made, it
/// failed, or a revision was cut short by the budget's lower `max_tokens`.
async fn budgeted(
    ex: &Exchange,
    mut body: Value,
    outcome: &mut Outcome,
    what: &str,
) -> Option<(String, Value)> {
    let cap = ex.gw.config().gateway.revise_max_tokens;
    let wanted = body["max_tokens"].as_u64().unwrap_or(1);
    let Some(max_tokens) = allowance(cap, outcome.extra_usage, &body) else {
        outcome.note = Some(format!(
            "the {what} call does not fit in gateway.revise_max_tokens ({cap}; spent {})",
            outcome.extra_usage.total()
        ));
        return None;
    };
    body["max_tokens"] = json!(max_tokens);
    match call(ex, body, &mut outcome.extra_usage).await {
        Ok((_, stop_reason)) if max_tokens < wanted && stop_reason == "max_tokens" => {
            outcome.note = Some(format!(
                "the {what} was cut at gateway.revise_max_tokens ({cap})"
            ));
            None
        }
        Ok(reply) => Some(reply),
        Err(note) => {
            outcome.note = Some(format!("{what} call failed: {note}"));
            None
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_lowers_max_tokens_and_refuses_a_call_that_cannot_fit() {
        let body =
            json!({"max_tokens": 1000, "messages": [{"role": "user", "content": "x".repeat(400)}]});
        let input = messages::estimate_tokens(&body.to_string());
        let spent = |n| Usage {
            input_tokens: n,
            output_tokens: 0,
        };
        assert_eq!(allowance(0, spent(99_999), &body), Some(1000), "no cap");
        assert_eq!(allowance(10_000, spent(0), &body), Some(1000));
        assert_eq!(allowance(input + 300, spent(100), &body), Some(200));
        assert_eq!(allowance(input + 100, spent(100), &body), None);
        assert_eq!(
            allowance(50, spent(0), &body),
            None,
            "the input alone is over"
        );
    }
}
