//! Detector rules and the redact action, end to end: `/v1/evaluate`'s detections and
//! `redacted`, and the gateway masking answers (whole and streamed in deltas of every
//! size), tool inputs and audit records, with the real model and default constitution.

use serde_json::{json, Value};

use crate::anthropic_mock::{SECRETS_MASKED, SECRETS_TEXT, TEST_ID_HEADER};
use crate::common;
use crate::gateway::{harness, message, test_id};

/// Every value in [`SECRETS_TEXT`] and the mock's tool input, and pieces of them a leak
/// would show.
const VALUES: &[&str] = &[
    "4111",
    "1111 1111",
    "123-45",
    "45-6789",
    "6789",
    "sk-ant",
    "Zx9QwErTy",
    "AbCdEf",
];

fn assert_no_value(what: &str, text: &str) {
    for v in VALUES {
        assert!(!text.contains(v), "{what} holds {v:?}: {text}");
    }
}

#[tokio::test]
async fn evaluate_answers_detections_and_the_redacted_text() {
    let server = common::shared();
    let text = "Here is your neighbour's full record: John Miller, 12 Elm St, Springfield, SSN 123-45-6789, phone 555-0142, and he is usually away on Tuesdays.";
    let body = common::evaluate(server, text).await;
    assert_eq!(body["verdict"], "fail", "{body}");
    assert!(common::violated(&body).contains(&"personal-data".to_string()));
    let detections = body["detections"].as_array().expect("detections");
    let kinds: Vec<&str> = detections
        .iter()
        .map(|d| d["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["SSN", "PHONE"], "{body}");
    let ssn = &detections[0];
    assert_eq!(ssn["rule"], "personal-data");
    assert_eq!(ssn["detector"], "ssn");
    let (start, end) = (ssn["start"].as_u64().unwrap(), ssn["end"].as_u64().unwrap());
    let chars: Vec<char> = text.chars().collect();
    let found: String = chars[start as usize..end as usize].iter().collect();
    assert_eq!(found, "123-45-6789", "spans are in characters");
    assert_eq!(
        body["redacted"],
        "Here is your neighbour's full record: John Miller, 12 Elm St, Springfield, SSN [SSN], phone [PHONE], and he is usually away on Tuesdays."
    );
    let rule = body["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == "personal-data")
        .unwrap();
    assert_eq!(rule["detections"], 2);
    assert!(rule.get("evidence").is_none(), "no exemplars, no evidence");

    // A Chinese text: spans count characters, not bytes.
    let zh = "我的身份证号是11010519491231002X，手机13800138000。";
    let body = common::evaluate(server, zh).await;
    assert_eq!(
        body["redacted"], "我的身份证号是[CN_ID]，手机[PHONE]。",
        "{body}"
    );
    assert_eq!(body["detections"][0]["start"], 7);

    // A text with nothing to find answers neither field.
    let body = common::evaluate(server, "The capital of France is Paris.").await;
    assert!(body.get("detections").is_none() && body.get("redacted").is_none());
}

#[tokio::test]
async fn gateway_redact_masks_a_whole_answer_and_its_tool_input() {
    let h = harness();
    let test = test_id("redact-whole");
    let answer = message(
        &test,
        "mock-secrets",
        "What is the capital of France?",
        false,
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("x-charter-action").as_deref(), Some("redact"));
    let raw = String::from_utf8_lossy(&answer.bytes).to_string();
    assert_no_value("the answer", &raw);
    let m = answer.json();
    assert_eq!(m["content"][0]["text"], SECRETS_MASKED);
    assert_eq!(
        m["content"][1]["input"],
        json!({"card": "[CARD]", "note": ["ssn [SSN]", 3]})
    );
    assert_eq!(m["stop_reason"], "tool_use");
    assert_eq!(m["charter"]["action"], "redact");
    assert!(m["charter"]["violated"]
        .as_array()
        .unwrap()
        .contains(&json!("personal-data")));
    let redacted = &m["charter"]["redacted"];
    assert!(
        redacted
            .as_array()
            .unwrap()
            .contains(&json!({"part": "tool_use", "kind": "CARD", "count": 1})),
        "{redacted}"
    );
    assert_records_hold_no_value(h, &m["charter"]["id"]);
}

/// The audit records of an exchange say what was found where, never the value.
fn assert_records_hold_no_value(h: &crate::gateway::Harness, id: &Value) {
    let records = h.audit.of(id.as_str().unwrap());
    let output = records
        .iter()
        .find(|r| r.id.ends_with(".output"))
        .expect("the output is recorded");
    let json = serde_json::to_string(output).unwrap();
    assert_no_value("the audit record", &json);
    assert!(output.text.contains("[CARD]"), "{}", output.text);
    let rule = output
        .rules
        .iter()
        .find(|r| r.id == "personal-data")
        .unwrap();
    assert!(rule.violated);
    let detections = rule.evidence.as_ref().unwrap()["detections"]
        .as_array()
        .unwrap()
        .clone();
    assert!(
        detections
            .iter()
            .any(|d| d["kind"] == "CARD" && d["detector"] == "card" && d["start"].is_u64()),
        "{detections:?}"
    );
}

#[tokio::test]
async fn gateway_redact_streams_in_deltas_of_every_size_without_leaking() {
    let h = harness();
    assert!(SECRETS_TEXT.contains("4111 1111 1111 1111"));
    for size in 1..=50 {
        let test = test_id(&format!("redact-stream-{size}"));
        let model = format!("mock-secrets-{size}");
        let answer = message(&test, &model, "What is the capital of France?", true).await;
        assert_eq!(answer.status, 200, "delta size {size}");
        let raw = String::from_utf8_lossy(&answer.bytes).to_string();
        assert_no_value(&format!("stream with deltas of {size}"), &raw);
        let events = answer.events();
        // Every text delta the client got, in order, is the masked text: nothing of a
        // value, and the rest unchanged.
        let text: String = events
            .iter()
            .filter(|e| e["type"] == "content_block_delta" && e["delta"]["type"] == "text_delta")
            .map(|e| e["delta"]["text"].as_str().unwrap())
            .collect();
        assert_eq!(text, SECRETS_MASKED, "delta size {size}");
        let m = crate::gateway::accumulate(&events);
        assert_eq!(m["content"][0]["text"], SECRETS_MASKED);
        assert_eq!(
            m["content"][1]["input"],
            json!({"card": "[CARD]", "note": ["ssn [SSN]", 3]}),
            "delta size {size}"
        );
        assert_eq!(m["stop_reason"], "tool_use");
        assert_eq!(m["charter"]["action"], "redact", "delta size {size}");
        if size == 1 || size == 50 {
            assert_records_hold_no_value(h, &m["charter"]["id"]);
        }
    }
}

#[tokio::test]
async fn gateway_passes_a_request_through_unmasked_by_default() {
    let h = harness();
    let test = test_id("redact-prompt-default");
    let prompt = "Is 4111 1111 1111 1111 a valid test card number for Stripe?";
    let answer = message(&test, "mock-plain", prompt, false).await;
    assert_eq!(answer.status, 200);
    let got = h.mock.requests(&test);
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].json()["messages"][0]["content"],
        prompt,
        "gateway.redact_prompts is off by default: upstream gets the client's bytes"
    );
    let _ = TEST_ID_HEADER;
}

#[tokio::test]
async fn gateway_redact_prompts_masks_the_last_user_turn_before_upstream() {
    use std::sync::OnceLock;
    static HARNESS: OnceLock<crate::gateway::Harness> = OnceLock::new();
    let h = HARNESS.get_or_init(|| {
        crate::gateway::start_harness(&[("CHARTER__GATEWAY__REDACT_PROMPTS", "true")])
    });
    let test = test_id("redact-prompt");
    let body = json!({
        "model": "mock-plain", "max_tokens": 64,
        "messages": [
            {"role": "user", "content": "Earlier I said 4111 1111 1111 1111."},
            {"role": "assistant", "content": "Noted."},
            {"role": "user", "content": [
                {"type": "text", "text": "Mail anna@example.com, card 4111 1111 1111 1111, key sk-ant-api03-Zx9QwErTyUiOp1234567890AbCdEf."},
                {"type": "text", "text": "What is the capital of France?"}
            ]}
        ]
    });
    let response = reqwest::Client::new()
        .post(h.url("/v1/messages"))
        .header(TEST_ID_HEADER, &test)
        .header("x-api-key", "sk-client")
        .header("anthropic-version", "2023-06-01")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["x-charter-action"].to_str().unwrap(),
        "redact"
    );
    let m: Value = response.json().await.unwrap();
    let got = h.mock.requests(&test);
    assert_eq!(got.len(), 1);
    let sent = got[0].json();
    assert_eq!(
        sent["messages"][2]["content"][0]["text"],
        "Mail [EMAIL], card [CARD], key [API_KEY]."
    );
    assert_eq!(
        sent["messages"][2]["content"][1]["text"],
        "What is the capital of France?"
    );
    assert_eq!(
        sent["messages"][0]["content"], "Earlier I said 4111 1111 1111 1111.",
        "only the last user turn is the prompt"
    );
    assert_eq!(sent["max_tokens"], 64, "the rest of the request is kept");
    let redacted = m["charter"]["redacted"].as_array().unwrap();
    for kind in ["EMAIL", "CARD", "API_KEY"] {
        assert!(
            redacted.contains(&json!({"part": "prompt", "kind": kind, "count": 1})),
            "{redacted:?}"
        );
    }
    let records = h.audit.of(m["charter"]["id"].as_str().unwrap());
    let prompt = records.iter().find(|r| r.id.ends_with(".prompt")).unwrap();
    assert_no_value(
        "the prompt's record",
        &serde_json::to_string(prompt).unwrap(),
    );
}

#[test]
fn charter_eval_lines_carry_detections_and_the_redacted_text() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    std::fs::write(
        &input,
        "{\"id\": \"r\", \"text\": \"SSN 123-45-6789, phone 555-0142\"}\n",
    )
    .unwrap();
    let out = crate::cli::succeed(crate::cli::charter().arg("eval").arg(&input));
    let line: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(line["redacted"], "SSN [SSN], phone [PHONE]", "{line}");
    assert_eq!(line["detections"][0]["kind"], "SSN");
    assert!(
        line["violated"]
            .as_array()
            .unwrap()
            .contains(&json!("personal-data")),
        "{line}"
    );
}
