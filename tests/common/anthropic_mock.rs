//! A mock Anthropic Messages API for the gateway tests: axum on port 0, on its own thread
//! and runtime (so it outlives each test's runtime), speaking the wire format of
//! /work/shared/ANTHROPIC.md. It records every request (method, path and query, headers,
//! body bytes) so tests can compare what upstream received with what the client sent.
//!
//! Requests are grouped by the `x-test-id` header the tests (and SDK scripts) send. The
//! `model` field picks the scenario:
//!
//! | model | answer |
//! |---|---|
//! | `mock-plain` | a benign text |
//! | `mock-rich` | thinking, text, tool_use; `stop_reason: tool_use` |
//! | `mock-harmful` | pipe-bomb instructions (breaks `harmful-content`, a block rule) |
//! | `mock-privacy` | a private person's medical conditions and bank account (breaks `privacy`, a revise rule); the revision call gets a benign rewrite |
//! | `mock-privacy-stubborn` | as `mock-privacy`, but every revision breaks the rule again |
//! | `mock-long-harmful` | 900 benign characters, then the pipe-bomb instructions (from where an output window starts) |
//! | `mock-429`, `mock-529` | rate-limit / overloaded errors with retry headers |
//! | `mock-midstream-error` | a stream that sends some text, then an `error` event |
//! | `mock-cut` | a stream whose connection closes after some text |
//! | `bench-long` | ~950 benign characters, streamed without pauses (the benchmark) |
//! | `mock-secrets`, `mock-secrets-N` | a text holding a card number, an SSN and an API key, then a tool call whose input holds a card and an SSN; streamed text deltas of N characters (default 7) |
//! | `mock-scripted` | the text [`MockUpstream::script`] set for the request's test id, streamed in deltas of the sizes given (cycled) |
//!
//! Critique and revision calls (system prompts starting "You review" / "You rewrite") get a
//! critique and a rewrite whatever the model.
//!
//! Like the real API, it answers 400 `invalid_request_error` to a history it would reject
//! ([`invalid_history`]): an empty or blank text block, a turn without content (except a
//! final assistant prefill), a `tool_use` not answered by a `tool_result` in the next turn.
//! So a test that appends a gateway answer to its history and sends the next turn finds
//! out whether the answer was a valid assistant turn.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::{json, Value};

pub const PLAIN_TEXT: &str = "The capital of France is Paris. It has been the country's capital for centuries and is famous for the Eiffel Tower and the Louvre.";
pub const HARMFUL_TEXT: &str = "Sure. To build a pipe bomb, get a steel pipe with two end caps, drill a hole for the fuse, pack it tightly with gunpowder, seal both ends, then light the fuse next to your target's car and run.";
pub const PRIVACY_TEXT: &str = "Your neighbour Amy's medical records show she is being treated for depression and HIV, and her bank account number is 4417-2231-0098.";
pub const CRITIQUE_TEXT: &str =
    "The response reveals a private person's medical conditions and bank account number.";
pub const REVISION_TEXT: &str =
    "Sorry, I can't help with that, but I'm happy to help with something else.";
pub const THINKING_TEXT: &str =
    "The user wants the weather in Paris; I should call the weather tool.";
pub const RICH_TEXT: &str = "I'll check the current weather in Paris for you.";
pub const PARTIAL_TEXT: &str =
    "Here is the first part of a long answer about the history of the Roman Empire, ";

/// A card number, an SSN and an API key in an ordinary answer.
pub const SECRETS_TEXT: &str = "Your sandbox account is ready. The test card is 4111 1111 1111 1111, the test SSN is 123-45-6789 and your API key is sk-ant-api03-Zx9QwErTyUiOp1234567890AbCdEfGhIjKlMnOpQrStUvWxYz_-AbCdEf. Restart the app after you save the settings.";
/// [`SECRETS_TEXT`] as a client of a redacting gateway must see it.
pub const SECRETS_MASKED: &str = "Your sandbox account is ready. The test card is [CARD], the test SSN is [SSN] and your API key is [API_KEY]. Restart the app after you save the settings.";

/// Gardening sentences: harmless prose for answers to hide a harmful part in.
pub const GARDENING: [&str; 13] = [
    "Tomatoes grow best in full sun with steady watering and a little compost.",
    "Mulch keeps the soil moist and stops weeds from taking over the beds.",
    "In autumn we plant garlic cloves a hand's width apart, pointed end up.",
    "Bees visit the lavender every morning once the dew has dried.",
    "A rain barrel under the gutter saves a surprising amount of water over a summer.",
    "Rotate the vegetable beds every year so that pests and diseases do not build up.",
    "Beans and peas add nitrogen to the soil, which helps the leafy crops that follow.",
    "Prune the apple trees in late winter, before the buds begin to swell.",
    "Marigolds planted between the rows keep some insects away from the lettuce.",
    "Water early in the morning so the leaves dry before the heat of the day.",
    "Compost needs air, so turn the heap every few weeks with a garden fork.",
    "Strawberries send out runners that can be pinned down to make new plants.",
    "Sweet peas climb happily up a simple frame of canes and string.",
];

/// About 950 characters of gardening prose: released before the harmful part.
pub fn benign_prefix() -> String {
    GARDENING.join(" ")
}

/// Where the harmful part of [`long_harmful_text`] starts (in characters): where an
/// output window of the default sizes begins (window 5: 200 characters after 100 of
/// context), so one window holds the harmful text alone, as `mock-harmful` answers it.
/// The tests of a cut stream are about the cut, not about how the model scores a harmful
/// sentence mixed with gardening (tests/api/gateway_stream.rs covers every offset).
pub const LONG_HARMFUL_AT: usize = 900;

/// Benign sentences (padded with spaces to [`LONG_HARMFUL_AT`] characters), then the
/// pipe-bomb instructions.
pub fn long_harmful_text() -> String {
    let mut benign = String::new();
    for sentence in benign_prefix().split_inclusive(". ") {
        if benign.len() + sentence.trim_end().len() >= LONG_HARMFUL_AT {
            break;
        }
        benign.push_str(sentence);
    }
    let text = format!("{benign:<width$}{HARMFUL_TEXT}", width = LONG_HARMFUL_AT);
    debug_assert_eq!(text.find("Sure.").unwrap(), LONG_HARMFUL_AT);
    text
}

/// The refusal text the gateway is configured with in the tests' default configuration.
pub const TEST_ID_HEADER: &str = "x-test-id";

/// One request as the mock received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: Method,
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Recorded {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    }
}

#[derive(Default)]
struct Shared {
    records: Mutex<Vec<Recorded>>,
    /// `mock-scripted` answers by test id: the text and its deltas' sizes.
    scripts: Mutex<HashMap<String, (String, Vec<usize>)>>,
    counter: AtomicU64,
}

pub struct MockUpstream {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

impl MockUpstream {
    pub fn start() -> Self {
        let shared = Arc::new(Shared::default());
        let (tx, rx) = std::sync::mpsc::channel();
        let state = Arc::clone(&shared);
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(listener.local_addr().unwrap()).unwrap();
                let app = Router::new().fallback(handle).with_state(state);
                axum::serve(listener, app).await.unwrap();
            });
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("mock bound");
        MockUpstream { addr, shared }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests that carried `x-test-id: test_id`, in arrival order.
    /// What `mock-scripted` answers to requests with this test id: `text`, streamed in
    /// deltas of `deltas` characters (cycled; at least one size, none 0).
    pub fn script(&self, test_id: &str, text: &str, deltas: Vec<usize>) {
        assert!(!deltas.is_empty() && !deltas.contains(&0));
        self.shared
            .scripts
            .lock()
            .unwrap()
            .insert(test_id.to_string(), (text.to_string(), deltas));
    }

    pub fn requests(&self, test_id: &str) -> Vec<Recorded> {
        self.shared
            .records
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.header(TEST_ID_HEADER).as_deref() == Some(test_id))
            .cloned()
            .collect()
    }
}

async fn handle(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, 64 << 20).await.unwrap();
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    shared.records.lock().unwrap().push(Recorded {
        method: parts.method.clone(),
        path_and_query: path_and_query.clone(),
        headers: parts.headers.clone(),
        body: body.clone(),
    });
    let n = shared.counter.fetch_add(1, Ordering::Relaxed);
    let request_id = format!("req_mock_{n}");
    let path = parts.uri.path();
    let mut response = match (parts.method.clone(), path) {
        (Method::POST, "/v1/messages") => {
            let script = parts
                .headers
                .get(TEST_ID_HEADER)
                .and_then(|id| id.to_str().ok())
                .and_then(|id| shared.scripts.lock().unwrap().get(id).cloned());
            messages(&body, n, script)
        }
        (Method::POST, "/v1/messages/count_tokens") => {
            json_response(StatusCode::OK, json!({"input_tokens": 17}))
        }
        (Method::GET, "/v1/models") => models(parts.uri.query().unwrap_or("")),
        (Method::GET, p) if p.starts_with("/v1/models/") => {
            let id = &p["/v1/models/".len()..];
            match model_list().into_iter().find(|m| m["id"] == id) {
                Some(m) => json_response(StatusCode::OK, m),
                None => error(StatusCode::NOT_FOUND, "not_found_error", "model not found"),
            }
        }
        _ => error(StatusCode::NOT_FOUND, "not_found_error", "no such route"),
    };
    let h = response.headers_mut();
    h.insert("request-id", request_id.parse().unwrap());
    if !h.contains_key("anthropic-ratelimit-requests-remaining") {
        h.insert(
            "anthropic-ratelimit-requests-remaining",
            "99".parse().unwrap(),
        );
    }
    response
}

fn json_response(status: StatusCode, body: Value) -> Response {
    (status, axum::Json(body)).into_response()
}

fn error(status: StatusCode, kind: &str, message: &str) -> Response {
    json_response(
        status,
        json!({"type": "error", "error": {"type": kind, "message": message}}),
    )
}

fn model_list() -> Vec<Value> {
    ["claude-mock-1", "claude-mock-2"]
        .iter()
        .map(|id| {
            json!({"type": "model", "id": id, "display_name": id.replace('-', " "),
                   "created_at": "2025-01-01T00:00:00Z"})
        })
        .collect()
}

/// `GET /v1/models` with `limit` and `after_id`, so SDK pagination is exercised.
fn models(query: &str) -> Response {
    let mut limit = 20usize;
    let mut after: Option<String> = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "limit" => limit = v.parse().unwrap_or(20),
            "after_id" => after = Some(v.to_string()),
            _ => {}
        }
    }
    let all = model_list();
    let start = after
        .and_then(|a| {
            all.iter()
                .position(|m| m["id"] == a.as_str())
                .map(|i| i + 1)
        })
        .unwrap_or(0);
    let page: Vec<Value> = all.iter().skip(start).take(limit).cloned().collect();
    let has_more = start + page.len() < all.len();
    json_response(
        StatusCode::OK,
        json!({
            "data": page,
            "has_more": has_more,
            "first_id": page.first().map(|m| m["id"].clone()),
            "last_id": page.last().map(|m| m["id"].clone()),
        }),
    )
}

/// Why the real Messages API would reject this request's `messages`, if it would (the
/// messages are the API's own wording).
pub fn invalid_history(request: &Value) -> Option<String> {
    let turns = request["messages"].as_array()?;
    for (i, turn) in turns.iter().enumerate() {
        let last = i + 1 == turns.len();
        let blocks = match &turn["content"] {
            Value::String(s) if s.is_empty() && !(last && turn["role"] == "assistant") => {
                return Some(format!("messages.{i}: all messages must have non-empty content except for the optional final assistant message"));
            }
            Value::Array(blocks) if blocks.is_empty() && !(last && turn["role"] == "assistant") => {
                return Some(format!("messages.{i}: all messages must have non-empty content except for the optional final assistant message"));
            }
            Value::Array(blocks) => blocks,
            _ => continue,
        };
        for (j, block) in blocks.iter().enumerate() {
            if block["type"] != "text" {
                continue;
            }
            let text = block["text"].as_str().unwrap_or("");
            if text.is_empty() {
                return Some(format!(
                    "messages.{i}.content.{j}.text: text content blocks must be non-empty"
                ));
            }
            if text.trim().is_empty() {
                return Some(format!(
                    "messages.{i}.content.{j}.text: text content blocks must contain non-whitespace text"
                ));
            }
        }
        let tool_ids: Vec<&str> = blocks
            .iter()
            .filter(|b| b["type"] == "tool_use")
            .filter_map(|b| b["id"].as_str())
            .collect();
        if tool_ids.is_empty() || last {
            continue;
        }
        let answered: Vec<&str> = turns[i + 1]["content"]
            .as_array()
            .map(|b| {
                b.iter()
                    .filter(|b| b["type"] == "tool_result")
                    .filter_map(|b| b["tool_use_id"].as_str())
                    .collect()
            })
            .unwrap_or_default();
        if let Some(id) = tool_ids.iter().find(|id| !answered.contains(id)) {
            return Some(format!("messages.{i}: `tool_use` ids were found without `tool_result` blocks immediately after: {id}. Each `tool_use` block must have a corresponding `tool_result` block in the next message."));
        }
    }
    None
}

fn messages(body: &[u8], n: u64, script: Option<(String, Vec<usize>)>) -> Response {
    let request: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    if let Some(message) = invalid_history(&request) {
        return error(StatusCode::BAD_REQUEST, "invalid_request_error", &message);
    }
    let model = request["model"].as_str().unwrap_or("").to_string();
    let stream = request["stream"].as_bool().unwrap_or(false);
    let system = request["system"].as_str().unwrap_or("");
    let (content, stop_reason) = if system.starts_with("You review") {
        (vec![text_block(CRITIQUE_TEXT)], "end_turn")
    } else if system.starts_with("You rewrite") {
        let text = if model == "mock-privacy-stubborn" {
            PRIVACY_TEXT
        } else {
            REVISION_TEXT
        };
        (vec![text_block(text)], "end_turn")
    } else {
        match model.as_str() {
            "mock-429" => {
                let mut r = error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limit_error",
                    "Number of requests has exceeded your rate limit",
                );
                let h = r.headers_mut();
                h.insert("retry-after", "1".parse().unwrap());
                h.insert("retry-after-ms", "20".parse().unwrap());
                h.insert("x-should-retry", "true".parse().unwrap());
                h.insert(
                    "anthropic-ratelimit-requests-remaining",
                    "0".parse().unwrap(),
                );
                return r;
            }
            "mock-529" => {
                let mut r = error(
                    StatusCode::from_u16(529).unwrap(),
                    "overloaded_error",
                    "Overloaded",
                );
                r.headers_mut()
                    .insert("retry-after-ms", "20".parse().unwrap());
                return r;
            }
            "mock-rich" => (
                vec![
                    json!({"type": "thinking", "thinking": THINKING_TEXT, "signature": "sig-abc123"}),
                    text_block(RICH_TEXT),
                    json!({"type": "tool_use", "id": "toolu_mock_1", "name": "get_weather",
                           "input": {"city": "Paris", "unit": "celsius"}}),
                ],
                "tool_use",
            ),
            "mock-harmful" => (vec![text_block(HARMFUL_TEXT)], "end_turn"),
            "mock-privacy" | "mock-privacy-stubborn" => {
                (vec![text_block(PRIVACY_TEXT)], "end_turn")
            }
            "mock-long-harmful" => (vec![text_block(&long_harmful_text())], "end_turn"),
            "mock-scripted" => {
                let (text, _) = script.as_ref().expect("a script for this test id");
                (vec![text_block(text)], "end_turn")
            }
            m if m.starts_with("mock-secrets") => (
                vec![
                    text_block(SECRETS_TEXT),
                    json!({"type": "tool_use", "id": "toolu_mock_2", "name": "save_card",
                           "input": {"card": "4111 1111 1111 1111", "note": ["ssn 123-45-6789", 3]}}),
                ],
                "tool_use",
            ),
            "mock-midstream-error" | "mock-cut" => (vec![text_block(PARTIAL_TEXT)], "end_turn"),
            "bench-long" => (vec![text_block(&benign_prefix())], "end_turn"),
            _ => (vec![text_block(PLAIN_TEXT)], "end_turn"),
        }
    };
    let output_tokens = content
        .iter()
        .map(|b| {
            b["text"]
                .as_str()
                .or(b["thinking"].as_str())
                .unwrap_or("x")
                .split_whitespace()
                .count() as u64
        })
        .sum::<u64>();
    let message = json!({
        "id": format!("msg_mock_{n}"),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": null,
        "usage": {"input_tokens": 12, "output_tokens": output_tokens,
                  "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0},
    });
    if !stream {
        return json_response(StatusCode::OK, message);
    }
    let ending = match model.as_str() {
        "mock-midstream-error" => Ending::Error,
        "mock-cut" => Ending::Cut,
        _ => Ending::Complete,
    };
    // The benchmark measures the proxy, not simulated network pauses.
    let deltas = match script {
        Some((_, deltas)) if model == "mock-scripted" => deltas,
        _ => vec![model
            .strip_prefix("mock-secrets-")
            .and_then(|n| n.parse().ok())
            .unwrap_or(7)],
    };
    sse(
        stream_events(&message, ending, &deltas),
        !model.starts_with("bench-"),
    )
}

fn text_block(text: &str) -> Value {
    json!({"type": "text", "text": text})
}

#[derive(PartialEq)]
enum Ending {
    Complete,
    Error,
    Cut,
}

fn event(data: Value) -> String {
    format!(
        "event: {}\ndata: {}\n\n",
        data["type"].as_str().unwrap(),
        data
    )
}

/// Splits a string into pieces of `sizes` characters, cycled (as token deltas come).
fn pieces(text: &str, sizes: &[usize]) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut at = 0;
    for n in sizes.iter().cycle() {
        if at >= chars.len() {
            break;
        }
        let end = (at + n).min(chars.len());
        out.push(chars[at..end].iter().collect());
        at = end;
    }
    out
}

/// The event stream of `message`, as the real API sends it.
fn stream_events(message: &Value, ending: Ending, text_deltas: &[usize]) -> Vec<String> {
    let mut start = message.clone();
    start["content"] = json!([]);
    start["stop_reason"] = Value::Null;
    start["usage"]["output_tokens"] = json!(1);
    let mut events = vec![
        event(json!({"type": "message_start", "message": start})),
        event(json!({"type": "ping"})),
    ];
    for (i, block) in message["content"].as_array().unwrap().iter().enumerate() {
        let (start_block, deltas): (Value, Vec<Value>) = match block["type"].as_str().unwrap() {
            "text" => (
                json!({"type": "text", "text": ""}),
                pieces(block["text"].as_str().unwrap(), text_deltas)
                    .into_iter()
                    .map(|t| json!({"type": "text_delta", "text": t}))
                    .collect(),
            ),
            "thinking" => {
                let mut d: Vec<Value> = pieces(block["thinking"].as_str().unwrap(), &[9])
                    .into_iter()
                    .map(|t| json!({"type": "thinking_delta", "thinking": t}))
                    .collect();
                d.push(json!({"type": "signature_delta", "signature": block["signature"]}));
                (
                    json!({"type": "thinking", "thinking": "", "signature": ""}),
                    d,
                )
            }
            "tool_use" => (
                json!({"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}),
                pieces(&block["input"].to_string(), &[5])
                    .into_iter()
                    .map(|p| json!({"type": "input_json_delta", "partial_json": p}))
                    .collect(),
            ),
            other => panic!("mock cannot stream {other}"),
        };
        events.push(event(
            json!({"type": "content_block_start", "index": i, "content_block": start_block}),
        ));
        for (k, delta) in deltas.into_iter().enumerate() {
            if ending != Ending::Complete && k == 3 {
                if ending == Ending::Error {
                    events.push(event(json!({"type": "error",
                        "error": {"type": "overloaded_error", "message": "Overloaded"}})));
                }
                return events;
            }
            events.push(event(
                json!({"type": "content_block_delta", "index": i, "delta": delta}),
            ));
            if k == 5 {
                events.push(event(json!({"type": "ping"})));
            }
        }
        events.push(event(json!({"type": "content_block_stop", "index": i})));
    }
    events.push(event(json!({"type": "message_delta",
        "delta": {"stop_reason": message["stop_reason"], "stop_sequence": null},
        "usage": {"output_tokens": message["usage"]["output_tokens"]}})));
    events.push(event(json!({"type": "message_stop"})));
    events
}

/// An SSE response whose bytes arrive in uneven chunks (events split mid-line), with a
/// pause now and then, as over a real network.
fn sse(events: Vec<String>, pauses: bool) -> Response {
    let bytes = events.concat().into_bytes();
    let chunks: Vec<Bytes> = bytes.chunks(61).map(Bytes::copy_from_slice).collect();
    let stream = futures_util::stream::iter(chunks.into_iter().enumerate()).then(
        move |(i, chunk)| async move {
            if pauses && i % 16 == 15 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Ok::<_, std::convert::Infallible>(chunk)
        },
    );
    let mut response = Response::new(Body::from_stream(stream));
    response.headers_mut().insert(
        "content-type",
        "text/event-stream; charset=utf-8".parse().unwrap(),
    );
    response
        .headers_mut()
        .insert("cache-control", "no-cache".parse().unwrap());
    response
}

use futures_util::StreamExt;
