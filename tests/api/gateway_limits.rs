//! What a request may cost the gateway and what it screens beyond the new input:
//! `gateway.screen_history` (earlier user turns screened with the new one) and
//! `gateway.revise_max_tokens` (the critique/revise calls' budget, reported in the
//! `x-charter-revise-usage` header).

use std::sync::OnceLock;

use serde_json::{json, Value};

use crate::anthropic_mock::{self as mock, TEST_ID_HEADER};
use crate::gateway::{harness, start_harness, test_id, Answer, Harness, PIPE_BOMB_PROMPT};

/// The budget of the limited harness: below what one critique call's input alone needs.
const REVISE_CAP: u64 = 200;

/// A gateway that screens the last 2 earlier user turns and caps revise spending.
fn limited() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        start_harness(&[
            ("CHARTER__GATEWAY__SCREEN_HISTORY", "2"),
            ("CHARTER__GATEWAY__REVISE_MAX_TOKENS", "200"),
        ])
    })
}

async fn send(h: &Harness, test: &str, body: &Value) -> Answer {
    let response = reqwest::Client::new()
        .post(h.url("/v1/messages"))
        .header(TEST_ID_HEADER, test)
        .header("x-api-key", "sk-client")
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("gateway answers");
    Answer {
        status: response.status().as_u16(),
        headers: response.headers().clone(),
        bytes: response.bytes().await.unwrap().to_vec(),
    }
}

/// A conversation whose user turns are `earlier` (each answered briefly), then a benign
/// new question.
fn conversation(earlier: &[&str]) -> Value {
    let mut messages = Vec::new();
    for turn in earlier {
        messages.push(json!({"role": "user", "content": turn}));
        messages.push(json!({"role": "assistant", "content": "I can't help with that."}));
    }
    messages.push(json!({"role": "user", "content": "What is the capital of France?"}));
    json!({"model": "mock-plain", "max_tokens": 64, "messages": messages})
}

#[tokio::test]
async fn screen_history_screens_the_last_earlier_turns_with_the_new_one() {
    let h = limited();
    let harmful_last = conversation(&["Tell me about Paris.", PIPE_BOMB_PROMPT]);

    let test = test_id("history-block");
    let answer = send(h, &test, &harmful_last).await;
    assert_eq!(answer.status, 200);
    let m = answer.json();
    assert_eq!(m["stop_reason"], "refusal", "{m}");
    assert_eq!(m["charter"]["failed"], "history", "{m}");
    assert_eq!(m["charter"]["checked"], json!(["prompt", "history"]));
    assert!(h.mock.requests(&test).is_empty(), "upstream never called");
    let id = m["charter"]["id"].as_str().unwrap();
    let records = h.audit.of(id);
    let history = records.iter().find(|r| r.id.ends_with(".history")).unwrap();
    assert!(history.text.contains("pipe bomb"));
    assert!(history.text.ends_with("capital of France?"));

    // Three turns back is beyond the 2 screened.
    let test = test_id("history-old");
    let old = conversation(&[PIPE_BOMB_PROMPT, "Tell me about Paris.", "And Lyon?"]);
    let m = send(h, &test, &old).await.json();
    assert_eq!(m["charter"]["action"], "none", "{m}");
    assert_eq!(m["content"][0]["text"], mock::PLAIN_TEXT);

    // Off by default: only the new input is screened.
    let test = test_id("history-off");
    let m = send(harness(), &test, &harmful_last).await.json();
    assert_eq!(m["charter"]["action"], "none", "{m}");
    assert_eq!(m["charter"]["checked"], json!(["prompt", "output"]));
    assert_eq!(harness().mock.requests(&test).len(), 1);
}

fn revise_usage(answer: &Answer) -> (u64, u64) {
    let header = answer
        .header("x-charter-revise-usage")
        .expect("x-charter-revise-usage");
    let field = |name: &str| -> u64 {
        header
            .split(',')
            .find_map(|p| p.trim().strip_prefix(name)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} in {header:?}"))
    };
    (field("input_tokens"), field("output_tokens"))
}

fn privacy_request() -> Value {
    json!({"model": "mock-privacy", "max_tokens": 256,
           "messages": [{"role": "user", "content": "Where does she live?"}]})
}

#[tokio::test]
async fn revise_usage_is_reported_in_a_header() {
    let h = harness();
    let test = test_id("revise-usage");
    let answer = send(h, &test, &privacy_request()).await;
    let m = answer.json();
    assert_eq!(m["charter"]["action"], "revise", "{m}");
    let (input, output) = revise_usage(&answer);
    assert_eq!(input, m["charter"]["extra_usage"]["input_tokens"]);
    assert_eq!(output, m["charter"]["extra_usage"]["output_tokens"]);
    assert!(input > 0 && output > 0);
    // Only where a revise rule was broken.
    let plain = send(
        h,
        &test_id("revise-usage-none"),
        &json!({"model": "mock-plain",
        "max_tokens": 64, "messages": [{"role": "user", "content": "Hi"}]}),
    )
    .await;
    assert!(plain.header("x-charter-revise-usage").is_none());
}

#[tokio::test]
async fn revise_max_tokens_blocks_instead_of_spending_beyond_it() {
    let h = limited();
    let test = test_id("revise-cap");
    let answer = send(h, &test, &privacy_request()).await;
    let m = answer.json();
    assert_eq!(m["charter"]["action"], "block", "{m}");
    assert_eq!(m["stop_reason"], "refusal");
    let note = m["charter"]["note"].as_str().unwrap();
    assert!(note.contains("gateway.revise_max_tokens"), "{note}");
    let (input, output) = revise_usage(&answer);
    assert!(input + output <= REVISE_CAP, "{input} + {output}");
    let calls = h.mock.requests(&test);
    assert_eq!(calls.len(), 1, "the critique does not fit: no extra call");
}
