//! One test per transition of the streaming guard's state machine, driven by hand: the
//! events upstream would send, the verdicts the engine would give.

use std::sync::Arc;

use serde_json::{json, Value};

use super::machine::{End, Event, Judgement, Machine, State, Step, WindowSizes};
use crate::constitution::{Action, Constitution, ConstitutionRef, Severity};
use crate::evaluate::{RuleResult, TextResult, Verdict};
use crate::gateway::error::GatewayError;
use crate::gateway::messages::{ActionTaken, Charter};
use crate::gateway::review;
use crate::gateway::sse::SseEvent;

fn meta() -> Charter {
    let constitution = ConstitutionRef {
        id: "default".into(),
        version: "abc".into(),
    };
    let mut meta = Charter::new("eval_1".into(), constitution);
    meta.checked.push("prompt");
    meta
}

fn machine(hold_back: usize) -> Machine {
    sized(hold_back, 20)
}

fn sized(hold_back: usize, context_chars: usize) -> Machine {
    let windows = WindowSizes {
        hold_back,
        context_chars,
    };
    Machine::new(meta(), windows, None)
}

/// A machine past `message_start`, nothing queued.
fn started(hold_back: usize) -> Machine {
    let mut m = machine(hold_back);
    m.event(start());
    sent(&mut m);
    m
}

fn event(data: Value) -> Event {
    Event::parse(&SseEvent {
        event: data["type"].as_str().map(str::to_string),
        data: data.to_string(),
    })
}

fn start() -> Event {
    event(json!({"type": "message_start", "message": {"usage": {"output_tokens": 1}}}))
}

fn block_start(index: u64, kind: &str) -> Event {
    let block = match kind {
        "text" => json!({"type": "text", "text": ""}),
        "tool_use" => json!({"type": "tool_use", "id": "t1", "name": "send", "input": {}}),
        other => json!({"type": other}),
    };
    event(json!({"type": "content_block_start", "index": index, "content_block": block}))
}

fn text(index: u64, text: &str) -> Event {
    event(json!({
        "type": "content_block_delta",
        "index": index,
        "delta": {"type": "text_delta", "text": text},
    }))
}

fn block_stop(index: u64) -> Event {
    event(json!({"type": "content_block_stop", "index": index}))
}

fn message_delta() -> Event {
    event(json!({
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn"},
        "usage": {"output_tokens": 7},
    }))
}

/// The data of every queued event, in order.
fn sent(m: &mut Machine) -> Vec<Value> {
    m.take_outbox()
        .iter()
        .map(|bytes| {
            let text = std::str::from_utf8(bytes).unwrap();
            let data = text.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
            serde_json::from_str(data).unwrap()
        })
        .collect()
}

fn types(events: &[Value]) -> Vec<&str> {
    events.iter().map(|e| e["type"].as_str().unwrap()).collect()
}

/// A verdict: one rule, violated with `action` when given.
fn verdict(action: Option<Action>) -> Result<Judgement, GatewayError> {
    let violated = action.is_some();
    let rule = RuleResult {
        id: "harm".into(),
        category: "harm".into(),
        severity: Severity::High,
        action: action.unwrap_or(Action::Block),
        score: if violated { 0.5 } else { 0.0 },
        threshold: 0.2,
        violated,
        evidence: None,
        detections: 0,
    };
    Ok(Judgement {
        result: TextResult {
            verdict: if violated {
                Verdict::Fail
            } else {
                Verdict::Pass
            },
            risk: rule.score - rule.threshold,
            tokens: 5,
            windows: 1,
            rules: vec![rule],
            detections: Vec::new(),
            redacted: None,
        },
        latency_ms: 2.0,
    })
}

fn no_refusal(_: &Charter) -> String {
    unreachable!("no refusal expected")
}

/// Passes the window being judged; the one text delta released.
fn passed_one_delta(m: &mut Machine) -> String {
    assert_eq!(m.judged(verdict(None), no_refusal), Step::Read);
    let out = sent(m);
    assert_eq!(types(&out), ["content_block_delta"]);
    out[0]["delta"]["text"].as_str().unwrap().to_string()
}

/// A machine inside text block 0, nothing queued.
fn in_text(hold_back: usize) -> Machine {
    let mut m = started(hold_back);
    m.event(block_start(0, "text"));
    sent(&mut m);
    m
}

/// A machine inside text block 0 with windows of `hold_back` characters after 4 of
/// context, nothing queued.
fn in_text_windows(hold_back: usize) -> Machine {
    let mut m = sized(hold_back, 4);
    m.event(start());
    m.event(block_start(0, "text"));
    sent(&mut m);
    m
}

/// A machine inside text block 0, with `held` held (below the hold-back).
fn holding(held: &str) -> Machine {
    let mut m = in_text(100);
    assert_eq!(m.event(text(0, held)), Step::Read);
    m
}

#[test]
fn message_start_moves_starting_to_between() {
    let mut m = machine(10);
    assert_eq!(m.state(), &State::Starting);
    assert_eq!(m.event(start()), Step::Read);
    assert_eq!(m.state(), &State::Between);
    assert_eq!(types(&sent(&mut m)), ["message_start"]);
}

#[test]
fn a_second_message_start_is_dropped() {
    let mut m = started(10);
    assert_eq!(m.event(start()), Step::Read);
    assert_eq!(m.state(), &State::Between);
    assert!(sent(&mut m).is_empty());
}

#[test]
fn a_text_block_start_opens_text() {
    let mut m = started(10);
    assert_eq!(m.event(block_start(0, "text")), Step::Read);
    assert_eq!(m.state(), &State::Text { index: 0 });
    assert_eq!(types(&sent(&mut m)), ["content_block_start"]);
}

#[test]
fn text_in_a_block_start_is_held_and_the_start_goes_out_empty() {
    let mut m = started(100);
    let with_text = json!({
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": "Hello"},
    });
    assert_eq!(m.event(event(with_text)), Step::Read);
    let out = sent(&mut m);
    assert_eq!(out[0]["content_block"]["text"], "");
    assert_eq!(out.len(), 1);
    // The held text goes out once judged.
    assert_eq!(m.event(block_stop(0)), Step::Judge("Hello".into()));
}

#[test]
fn text_below_the_hold_back_is_held() {
    let mut m = holding("Hello there");
    assert_eq!(m.event(text(0, ", friend")), Step::Read);
    assert!(sent(&mut m).is_empty());
    assert_eq!(m.state(), &State::Text { index: 0 });
}

#[test]
fn a_full_window_is_judged_and_a_pass_releases_what_no_later_window_holds() {
    let mut m = in_text_windows(10);
    assert_eq!(
        m.event(text(0, "abcdefghijklm")),
        Step::Judge("abcdefghij".into())
    );
    // The last 4 judged characters are the next window's context: still held.
    assert_eq!(passed_one_delta(&mut m), "abcdef");
    assert_eq!(m.event(text(0, "nopq")), Step::Read);
    assert_eq!(
        m.event(text(0, "rst")),
        Step::Judge("ghijklmnopqrst".into())
    );
    assert_eq!(passed_one_delta(&mut m), "ghijklmnop");
    // Everything held is judged: the block's end releases it without another window.
    assert_eq!(m.event(block_stop(0)), Step::Read);
    let out = sent(&mut m);
    assert_eq!(types(&out), ["content_block_delta", "content_block_stop"]);
    assert_eq!(out[0]["delta"]["text"], "qrst");
}

#[test]
fn one_long_delta_is_judged_window_by_window() {
    let mut m = in_text_windows(4);
    assert_eq!(m.event(text(0, "abcdefghij")), Step::Judge("abcd".into()));
    assert_eq!(
        m.judged(verdict(None), no_refusal),
        Step::Judge("abcdefgh".into())
    );
    // Nothing of the second window is released before it passes.
    assert!(sent(&mut m).is_empty());
    assert_eq!(passed_one_delta(&mut m), "abcd");
    assert_eq!(m.event(block_stop(0)), Step::Judge("efghij".into()));
}

#[test]
fn other_events_wait_behind_held_text_in_order() {
    let mut m = holding("Hello");
    assert_eq!(m.event(event(json!({"type": "ping"}))), Step::Read);
    assert_eq!(m.event(text(0, " world")), Step::Read);
    assert!(sent(&mut m).is_empty());
    assert_eq!(m.event(block_stop(0)), Step::Judge("Hello world".into()));
    assert_eq!(m.judged(verdict(None), no_refusal), Step::Resume);
    let out = sent(&mut m);
    assert_eq!(
        types(&out),
        ["content_block_delta", "ping", "content_block_delta"]
    );
    assert_eq!(out[2]["delta"]["text"], " world");
}

#[test]
fn an_event_after_the_last_held_text_goes_out_with_it() {
    let mut m = holding("Hello");
    m.event(event(json!({"type": "ping"})));
    assert_eq!(m.event(block_stop(0)), Step::Judge("Hello".into()));
    assert_eq!(m.judged(verdict(None), no_refusal), Step::Resume);
    assert_eq!(types(&sent(&mut m)), ["content_block_delta", "ping"]);
    assert_eq!(m.resume(), Step::Read);
    // Nothing stays held: a later thinking block passes at once.
    m.event(block_start(1, "thinking"));
    let thinking = json!({
        "type": "content_block_delta",
        "index": 1,
        "delta": {"type": "thinking_delta", "thinking": "Hm"},
    });
    m.event(event(thinking));
    assert_eq!(
        types(&sent(&mut m)),
        [
            "content_block_stop",
            "content_block_start",
            "content_block_delta"
        ]
    );
}

#[test]
fn an_event_after_unreleased_text_stays_behind_it() {
    let mut m = in_text_windows(10);
    m.event(text(0, "One. Tw"));
    m.event(event(json!({"type": "ping"})));
    assert!(sent(&mut m).is_empty());
    assert_eq!(m.event(text(0, "o more")), Step::Judge("One. Two m".into()));
    assert_eq!(passed_one_delta(&mut m), "One. T");
    assert_eq!(m.event(block_stop(0)), Step::Judge("wo more".into()));
    assert_eq!(m.judged(verdict(None), no_refusal), Step::Resume);
    let out = sent(&mut m);
    assert_eq!(
        types(&out),
        ["content_block_delta", "ping", "content_block_delta"]
    );
    assert_eq!(out[0]["delta"]["text"], "w");
    assert_eq!(out[2]["delta"]["text"], "o more");
}

#[test]
fn a_block_stop_releases_the_held_text_first_then_closes_the_block() {
    let mut m = holding("Hello");
    assert_eq!(m.event(block_stop(0)), Step::Judge("Hello".into()));
    assert_eq!(m.judged(verdict(None), no_refusal), Step::Resume);
    assert_eq!(sent(&mut m)[0]["delta"]["text"], "Hello");
    assert_eq!(m.resume(), Step::Read);
    assert_eq!(types(&sent(&mut m)), ["content_block_stop"]);
    assert_eq!(m.state(), &State::Between);
}

#[test]
fn blank_held_text_is_released_without_a_verdict() {
    let mut m = holding("  \n");
    assert_eq!(m.event(block_stop(0)), Step::Read);
    assert_eq!(
        types(&sent(&mut m)),
        ["content_block_delta", "content_block_stop"]
    );
}

#[test]
fn a_block_verdict_before_any_text_puts_the_refusal_in_the_open_block() {
    let mut m = holding("How to hurt");
    m.event(block_stop(0));
    let step = m.judged(verdict(Some(Action::Block)), |meta| {
        assert_eq!(meta.violated, ["harm"]);
        "I can't help with that.".into()
    });
    assert_eq!(step, Step::Stop);
    assert_eq!(m.state(), &State::Ended(End::Blocked));
    let out = sent(&mut m);
    // No empty text block: the refusal is the open block's text.
    assert_eq!(
        types(&out),
        [
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    assert_eq!(out[0]["index"], 0);
    assert_eq!(out[0]["delta"]["text"], "I can't help with that.");
    assert_eq!(out[1]["index"], 0);
    assert_eq!(out[2]["delta"]["stop_reason"], "refusal");
    // 11 characters came from upstream: 3 tokens, more than message_start's 1.
    assert_eq!(out[2]["usage"]["output_tokens"], 3);
    assert!(!out.iter().any(|e| e.to_string().contains("How to hurt")));
    let outcome = m.take_record().unwrap();
    assert_eq!(outcome.context["ended"], "blocked");
    assert_eq!(outcome.context["withheld_chars"], 11);
    assert_eq!(outcome.text, "How to hurt");
    assert!(matches!(m.meta().action, ActionTaken::Block));
    // The pending block stop is not sent after the refusal.
    assert_eq!(m.resume(), Step::Read);
    assert!(sent(&mut m).is_empty());
}

#[test]
fn a_block_verdict_after_released_text_closes_its_block_and_adds_the_refusal() {
    let mut m = in_text_windows(10);
    assert!(matches!(
        m.event(text(0, "Fine words. More")),
        Step::Judge(_)
    ));
    assert_eq!(passed_one_delta(&mut m), "Fine w");
    assert!(matches!(
        m.event(text(0, " and worse things")),
        Step::Judge(_)
    ));
    assert_eq!(
        m.judged(verdict(Some(Action::Block)), |_| "No.".into()),
        Step::Stop
    );
    let out = sent(&mut m);
    assert_eq!(
        types(&out),
        [
            "content_block_stop",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    assert_eq!(out[0]["index"], 0);
    assert_eq!(out[1]["index"], 1);
    assert_eq!(out[2]["delta"]["text"], "No.");
    // 33 characters generated: 9 tokens.
    assert_eq!(out[4]["usage"]["output_tokens"], 9);
}

#[test]
fn a_revise_verdict_blocks_too() {
    let mut m = holding("Half an answer");
    m.event(block_stop(0));
    let step = m.judged(verdict(Some(Action::Revise)), |_| "No.".into());
    assert_eq!(step, Step::Stop);
    assert_eq!(m.state(), &State::Ended(End::Blocked));
}

#[test]
fn a_flag_verdict_releases_and_flags() {
    let mut m = holding("Borderline");
    m.event(block_stop(0));
    assert_eq!(
        m.judged(verdict(Some(Action::Flag)), no_refusal),
        Step::Resume
    );
    assert_eq!(sent(&mut m)[0]["delta"]["text"], "Borderline");
    assert!(matches!(m.meta().action, ActionTaken::Flag));
    assert_eq!(m.meta().failed, Some("output"));
    assert_eq!(m.meta().verdict, Verdict::Fail);
}

#[test]
fn a_failed_evaluation_ends_with_an_error_event() {
    let mut m = holding("Hello");
    m.event(block_stop(0));
    let overloaded = Err(GatewayError::Overloaded {
        retry_after_secs: 1,
    });
    assert_eq!(m.judged(overloaded, no_refusal), Step::Stop);
    assert_eq!(m.state(), &State::Ended(End::Error));
    let out = sent(&mut m);
    assert_eq!(types(&out), ["error"]);
    assert_eq!(out[0]["error"]["type"], "overloaded_error");
    // Nothing was judged: nothing to record.
    assert!(m.take_record().is_none());
}

#[test]
fn other_blocks_pass_as_they_come() {
    let mut m = started(10);
    assert_eq!(m.event(block_start(0, "thinking")), Step::Read);
    assert_eq!(m.state(), &State::Passing { index: 0 });
    let thinking = json!({
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "thinking_delta", "thinking": "Let me see"},
    });
    assert_eq!(m.event(event(thinking)), Step::Read);
    assert_eq!(m.event(block_stop(0)), Step::Read);
    assert_eq!(
        types(&sent(&mut m)),
        [
            "content_block_start",
            "content_block_delta",
            "content_block_stop"
        ]
    );
    assert_eq!(m.state(), &State::Between);
}

#[test]
fn tool_use_without_redact_rules_passes() {
    let mut m = machine(10);
    m.event(start());
    assert_eq!(m.event(block_start(0, "tool_use")), Step::Read);
    assert_eq!(m.state(), &State::Passing { index: 0 });
}

fn redacting() -> Arc<Constitution> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pii.toml");
    let toml = "id = \"pii\"\n[[rules]]\nid = \"email\"\nprinciple = \"No addresses.\"\n\
                action = \"redact\"\ndetectors = [\"email\"]\n";
    std::fs::write(&path, toml).unwrap();
    Arc::new(crate::constitution::parse_file(&path).unwrap())
}

#[test]
fn a_tool_input_is_held_whole_and_sent_masked() {
    let windows = WindowSizes {
        hold_back: 10,
        context_chars: 20,
    };
    let mut m = Machine::new(meta(), windows, Some(redacting()));
    m.event(start());
    sent(&mut m);
    assert_eq!(m.event(block_start(1, "tool_use")), Step::Read);
    assert!(matches!(m.state(), State::ToolInput { index: 1, .. }));
    for piece in ["{\"to\": \"ann@exa", "mple.com\", \"n\": 1}"] {
        let delta = json!({
            "type": "content_block_delta",
            "index": 1,
            "delta": {"type": "input_json_delta", "partial_json": piece},
        });
        assert_eq!(m.event(event(delta)), Step::Read);
    }
    assert_eq!(types(&sent(&mut m)), ["content_block_start"]);
    assert_eq!(m.event(block_stop(1)), Step::Read);
    let out = sent(&mut m);
    assert_eq!(types(&out), ["content_block_delta", "content_block_stop"]);
    let input: Value =
        serde_json::from_str(out[0]["delta"]["partial_json"].as_str().unwrap()).unwrap();
    assert_eq!(input, json!({"to": "[EMAIL]", "n": 1}));
    assert_eq!(m.meta().redacted[0].part, "tool_use");
    assert_eq!(m.state(), &State::Between);
}

#[test]
fn message_delta_records_the_outcome_and_carries_the_metadata() {
    let mut m = holding("All fine.");
    assert_eq!(m.event(message_delta()), Step::Judge("All fine.".into()));
    assert_eq!(m.judged(verdict(None), no_refusal), Step::Resume);
    assert_eq!(m.resume(), Step::Read);
    let out = sent(&mut m);
    assert_eq!(types(&out), ["content_block_delta", "message_delta"]);
    assert_eq!(out[1]["charter"]["released_chars"], 9);
    assert_eq!(out[1]["charter"]["checked"], json!(["prompt", "output"]));
    let outcome = m.take_record().unwrap();
    assert_eq!(outcome.context["ended"], "message_stop");
    assert_eq!(outcome.context["output_tokens_reported"], 7);
    assert_eq!(outcome.windows, 1);
    // Recorded once: message_stop does not record again.
    assert_eq!(m.event(event(json!({"type": "message_stop"}))), Step::Stop);
    assert!(m.take_record().is_none());
}

#[test]
fn message_stop_ends_the_stream() {
    let mut m = started(10);
    assert_eq!(m.event(event(json!({"type": "message_stop"}))), Step::Stop);
    assert_eq!(m.state(), &State::Ended(End::Completed));
    assert_eq!(types(&sent(&mut m)), ["message_stop"]);
    assert_eq!(m.meta().released_chars, Some(0));
}

#[test]
fn an_upstream_error_event_drops_held_text_and_ends() {
    let mut m = holding("Unjudged");
    let error = json!({"type": "error", "error": {"type": "overloaded_error", "message": "x"}});
    assert_eq!(m.event(event(error)), Step::Stop);
    assert_eq!(m.state(), &State::Ended(End::Error));
    assert_eq!(types(&sent(&mut m)), ["error"]);
}

#[test]
fn an_upstream_failure_ends_with_an_error_event_after_the_record() {
    let mut m = holding("Hello");
    m.event(block_stop(0));
    m.judged(verdict(None), no_refusal);
    sent(&mut m);
    m.fail("upstream_failed", "api_error", "the upstream stream failed");
    assert_eq!(m.state(), &State::Ended(End::Error));
    let out = sent(&mut m);
    assert_eq!(types(&out), ["error"]);
    assert_eq!(out[0]["error"]["type"], "api_error");
    assert_eq!(m.take_record().unwrap().context["ended"], "upstream_failed");
}

#[test]
fn the_client_gone_ends_the_stream_and_sends_nothing_more() {
    let mut m = holding("Hello");
    m.event(block_stop(0));
    m.judged(verdict(None), no_refusal);
    m.client_gone();
    assert_eq!(m.state(), &State::Ended(End::ClientGone));
    assert!(sent(&mut m).is_empty());
    assert_eq!(
        m.take_record().unwrap().context["ended"],
        "client_disconnected"
    );
    assert_eq!(m.resume(), Step::Read);
    assert!(sent(&mut m).is_empty());
}

#[test]
fn an_ended_stream_takes_no_more_events() {
    let mut m = machine(10);
    m.event(start());
    m.event(event(json!({"type": "message_stop"})));
    sent(&mut m);
    assert_eq!(m.event(block_start(0, "text")), Step::Stop);
    assert_eq!(m.event(event(json!({"type": "ping"}))), Step::Stop);
    assert!(sent(&mut m).is_empty());
}

/// Feeds `text` to a machine in text block 0 in deltas of the sizes `sizes` cycles
/// through, then ends the block and the message; `fails` says which windows violate a
/// block rule. Returns the windows judged, in order, and the text released before the
/// refusal (if any).
fn stream(
    sizes: (usize, usize),
    text: &str,
    deltas: &[usize],
    fails: impl Fn(&str) -> bool,
) -> (Vec<String>, String) {
    let mut m = sized(sizes.0, sizes.1);
    let chars: Vec<char> = text.chars().collect();
    let mut events = vec![start(), block_start(0, "text")];
    let (mut at, mut k) = (0, 0);
    while at < chars.len() {
        let n = deltas[k % deltas.len()].min(chars.len() - at);
        events.push(self::text(0, &chars[at..at + n].iter().collect::<String>()));
        if k % 3 == 1 {
            events.push(event(json!({"type": "ping"})));
        }
        at += n;
        k += 1;
    }
    events.extend([block_stop(0), message_delta()]);
    let (mut judged, mut released) = (Vec::new(), String::new());
    'events: for e in events {
        let mut step = m.event(e);
        loop {
            for out in sent(&mut m) {
                if out["delta"]["type"] == "text_delta" && out["delta"]["text"] != "REFUSED" {
                    released.push_str(out["delta"]["text"].as_str().unwrap());
                }
            }
            step = match step {
                Step::Read => break,
                Step::Stop => break 'events,
                Step::Resume => m.resume(),
                Step::Judge(window) => {
                    let action = fails(&window).then_some(Action::Block);
                    judged.push(window);
                    m.judged(verdict(action), |_| "REFUSED".into())
                }
            };
        }
    }
    (judged, released)
}

/// Deltas of 1 to 9 characters, from a fixed seed.
fn uneven_deltas() -> Vec<usize> {
    let mut x: u32 = 7;
    (0..50)
        .map(|_| {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            1 + (x >> 16) as usize % 9
        })
        .collect()
}

const TEXTS: [&str; 3] = [
    "Tomatoes like sun. Water them early!   \n\n               Then BAD things follow here. The end.",
    "番茄喜欢阳光。早上浇水。然后是BAD的内容，最后结束了。还有一些文字。",
    "short BAD",
];

#[test]
fn a_stream_judges_the_non_streaming_windows_whatever_its_deltas() {
    for sizes in [(10, 4), (7, 0), (5, 12), (200, 100)] {
        for text in TEXTS {
            let expected = review::output_windows(&[text], sizes.0, sizes.1);
            for deltas in [vec![1], vec![3], vec![50], uneven_deltas()] {
                let (judged, released) = stream(sizes, text, &deltas, |_| false);
                assert_eq!(judged, expected, "{sizes:?} {deltas:?}");
                assert_eq!(released, text);
            }
        }
    }
}

#[test]
fn no_released_character_lies_in_a_failing_window() {
    for sizes in [(10, 4), (7, 0), (5, 12)] {
        for text in TEXTS {
            let windows = review::output_windows(&[text], sizes.0, sizes.1);
            // A window fails when it holds the B of BAD (a small window can cut the word).
            let first_failing = windows.iter().position(|w| w.contains('B')).unwrap();
            // Where that window starts (windows are slices of `text`).
            let start = windows[first_failing].as_ptr() as usize - text.as_ptr() as usize;
            for deltas in [vec![1], vec![3], vec![50], uneven_deltas()] {
                let (judged, released) = stream(sizes, text, &deltas, |w| w.contains('B'));
                assert_eq!(judged, windows[..=first_failing], "{sizes:?} {deltas:?}");
                assert!(text.starts_with(&released));
                assert!(released.len() <= start, "{sizes:?} {deltas:?}: {released}");
            }
        }
    }
}

#[test]
fn each_text_block_has_its_own_windows() {
    let blocks = ["One two three four five.", "Six seven eight."];
    let mut m = sized(5, 2);
    m.event(start());
    let mut judged = Vec::new();
    let mut deltas = Vec::new();
    for (i, block) in blocks.iter().enumerate() {
        let i = i as u64;
        let mut events = vec![block_start(i, "text")];
        let chars: Vec<char> = block.chars().collect();
        events.extend(
            chars
                .chunks(3)
                .map(|c| text(i, &c.iter().collect::<String>())),
        );
        events.push(block_stop(i));
        for e in events {
            let mut step = m.event(e);
            loop {
                deltas.extend(
                    sent(&mut m)
                        .into_iter()
                        .filter(|e| e["delta"]["type"] == "text_delta")
                        .map(|e| (e["index"].as_u64().unwrap(), e["delta"]["text"].clone())),
                );
                step = match step {
                    Step::Read => break,
                    Step::Stop => panic!("stopped"),
                    Step::Resume => m.resume(),
                    Step::Judge(window) => {
                        judged.push(window);
                        m.judged(verdict(None), no_refusal)
                    }
                };
            }
        }
    }
    assert_eq!(judged, review::output_windows(&blocks, 5, 2));
    for (i, block) in blocks.iter().enumerate() {
        let released: String = deltas
            .iter()
            .filter(|(index, _)| *index == i as u64)
            .map(|(_, t)| t.as_str().unwrap())
            .collect();
        assert_eq!(released, *block);
    }
}
