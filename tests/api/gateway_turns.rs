//! Every answer the gateway returns is a valid assistant turn: a client appends it to its
//! history and sends the next turn, and the mock upstream (which rejects what the real
//! Messages API rejects: empty or blank text blocks, unanswered tool calls) accepts it.
//! After each outcome (pass, flag, block, revise), non-streaming and streaming, through
//! raw HTTP; tests/sdk/ does the same through the real SDKs.

use serde_json::{json, Value};

use crate::anthropic_mock::{self as mock, TEST_ID_HEADER};
use crate::gateway::{accumulate, harness, post, test_id, Answer, FLAG_CLIENT_KEY};

const ASK: &str = "What is the capital of France?";

async fn send(test: &str, key: &str, body: &Value) -> Answer {
    post(
        "/v1/messages",
        &[(TEST_ID_HEADER, test), ("x-api-key", key)],
        body.to_string().as_bytes(),
    )
    .await
}

/// The assistant turn a client gets for `model` (the final message of a stream).
async fn first_turn(test: &str, key: &str, model: &str, stream: bool) -> Value {
    let body = json!({"model": model, "max_tokens": 256, "stream": stream,
                      "messages": [{"role": "user", "content": ASK}]});
    let answer = send(test, key, &body).await;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.bytes)
    );
    if stream {
        accumulate(&answer.events())
    } else {
        answer.json()
    }
}

/// What an SDK user does next: the answer's content appended as the assistant turn (tool
/// calls answered), a new user turn, sent on; the answer must be accepted.
async fn next_turn(test: &str, message: &Value) {
    let content = message["content"].clone();
    let mut reply: Vec<Value> = content
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["type"] == "tool_use")
        .map(|b| json!({"type": "tool_result", "tool_use_id": b["id"], "content": "18 C, sunny"}))
        .collect();
    reply.push(json!({"type": "text", "text": "Thanks. What else is worth seeing there?"}));
    let body = json!({"model": "mock-plain", "max_tokens": 256, "messages": [
        {"role": "user", "content": ASK},
        {"role": "assistant", "content": content},
        {"role": "user", "content": reply},
    ]});
    let next = format!("{test}-next");
    let answer = send(&next, "sk-client", &body).await;
    assert_eq!(
        answer.status,
        200,
        "the next turn after {message} was rejected: {}",
        String::from_utf8_lossy(&answer.bytes)
    );
    assert_eq!(answer.json()["content"][0]["text"], mock::PLAIN_TEXT);
    let got = harness().mock.requests(&next);
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].json()["messages"][1]["content"],
        content,
        "upstream got the turn as returned"
    );
}

/// The shape every assistant turn must have, and usage that fits the content.
fn assert_valid_turn(message: &Value, stream: bool) {
    assert_eq!(message["role"], "assistant");
    let blocks = message["content"].as_array().unwrap();
    assert!(!blocks.is_empty(), "{message}");
    for block in blocks {
        if block["type"] == "text" {
            let text = block["text"].as_str().unwrap();
            assert!(!text.trim().is_empty(), "a blank text block: {message}");
        }
    }
    let text_chars: usize = blocks
        .iter()
        .filter_map(|b| b["text"].as_str())
        .map(|t| t.chars().count())
        .sum();
    let output_tokens = message["usage"]["output_tokens"].as_u64().unwrap();
    let released = message["charter"]["released_chars"].as_u64().unwrap_or(0);
    if stream && released > 0 {
        // Upstream billed at least what was released (about 4 characters a token).
        assert!(
            output_tokens as f64 >= released as f64 / 8.0,
            "{output_tokens} tokens for {released} released characters: {message}"
        );
    }
    assert!(text_chars > 0 && output_tokens > 0, "{message}");
}

/// One outcome, streaming and not: the answer is a valid turn and the next turn passes.
async fn outcome(name: &str, key: &str, model: &str, actions: [&str; 2]) {
    for (stream, action) in [false, true].into_iter().zip(actions) {
        let test = test_id(&format!("turns-{name}-{stream}"));
        let message = first_turn(&test, key, model, stream).await;
        assert_eq!(message["charter"]["action"], action, "{message}");
        assert_valid_turn(&message, stream);
        next_turn(&test, &message).await;
    }
}

#[tokio::test]
async fn a_passed_answer_is_a_valid_next_turn() {
    outcome("pass", "sk-client", "mock-plain", ["none", "none"]).await;
    // Thinking, text and a tool call; the next turn answers the call.
    outcome("pass-rich", "sk-client", "mock-rich", ["none", "none"]).await;
}

#[tokio::test]
async fn a_flagged_answer_is_a_valid_next_turn() {
    outcome("flag", FLAG_CLIENT_KEY, "mock-harmful", ["flag", "flag"]).await;
}

#[tokio::test]
async fn a_blocked_answer_is_a_valid_next_turn() {
    outcome("block", "sk-client", "mock-harmful", ["block", "block"]).await;
    // Text released before the block: its block is closed, the refusal follows.
    outcome(
        "block-late",
        "sk-client",
        "mock-long-harmful",
        ["block", "block"],
    )
    .await;
}

#[tokio::test]
async fn a_blocked_stream_without_released_text_is_one_refusal_block() {
    let h = harness();
    let test = test_id("turns-block-shape");
    let message = first_turn(&test, "sk-client", "mock-harmful", true).await;
    let content = message["content"].as_array().unwrap();
    assert_eq!(content.len(), 1, "{message}");
    assert_eq!(content[0]["text"], h.refusal.as_str());
    assert_eq!(message["stop_reason"], "refusal");
    assert_eq!(message["charter"]["released_chars"], 0);
    assert!(
        message["usage"]["output_tokens"].as_u64().unwrap() > 1,
        "what upstream generated, not message_start's 1: {message}"
    );
}

#[tokio::test]
async fn a_revised_answer_is_a_valid_next_turn() {
    // A stream cannot be revised once text went out: the stream is blocked.
    outcome("revise", "sk-client", "mock-privacy", ["revise", "block"]).await;
}

#[tokio::test]
async fn the_mock_rejects_what_the_api_rejects() {
    let test = test_id("turns-mock");
    let bad = [
        json!([{"type": "text", "text": ""}]),
        json!([{"type": "text", "text": " \n"}]),
        json!([{"type": "tool_use", "id": "toolu_x", "name": "f", "input": {}}]),
        json!([]),
    ];
    for content in bad {
        let body = json!({"model": "mock-plain", "max_tokens": 8, "messages": [
            {"role": "user", "content": ASK},
            {"role": "assistant", "content": content},
            {"role": "user", "content": "and?"},
        ]});
        let answer = send(&test, "sk-client", &body).await;
        assert_eq!(answer.status, 400, "{content}");
        assert_eq!(answer.json()["error"]["type"], "invalid_request_error");
    }
}
