//! The Messages wire format, as far as the gateway reads and writes it: what to screen in
//! a request, the text of a response, refusals (as a message and as a stream), and the
//! `charter` metadata added to messages. Pure functions over JSON; no I/O.
//!
//! The request body itself is never rewritten: it is forwarded as the client's bytes, so
//! fields the gateway does not know reach upstream untouched.

use serde::Serialize;
use serde_json::{json, Value};

use crate::constitution::ConstitutionRef;
use crate::evaluate::Verdict;

/// What the gateway needs from a request body.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct RequestView {
    /// `stream: true` (the only thing that decides streaming; clients also send
    /// `Accept: application/json` when streaming).
    pub stream: bool,
    pub model: Option<String>,
    pub max_tokens: Option<u64>,
    /// Text blocks of the last user turn, joined by blank lines; `None` when it has none.
    pub last_user_text: Option<String>,
    /// The text of the user turns before the last one, at most the `history` asked for,
    /// oldest first (turns without text skipped).
    pub earlier_user_texts: Vec<String>,
    /// The system prompt's text; `None` when absent or empty.
    pub system_text: Option<String>,
}

/// Reads the fields the gateway uses, with the text of at most `history` user turns
/// before the last. Shapes it does not understand are left to upstream to judge (they
/// yield `None` here), except a body that is not a JSON object.
pub fn read_request(body: &Value, history: usize) -> Result<RequestView, String> {
    let obj = body
        .as_object()
        .ok_or_else(|| "the request body must be a JSON object".to_string())?;
    let mut user_turns = obj
        .get("messages")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .rev()
        .filter(|m| m.get("role").and_then(Value::as_str) == Some("user"));
    let last_user_text = user_turns.next().and_then(|m| turn_text(m.get("content")?));
    let mut earlier_user_texts: Vec<String> = user_turns
        .filter_map(|m| turn_text(m.get("content")?))
        .take(history)
        .collect();
    earlier_user_texts.reverse();
    Ok(RequestView {
        stream: obj.get("stream").and_then(Value::as_bool).unwrap_or(false),
        model: obj.get("model").and_then(Value::as_str).map(str::to_string),
        max_tokens: obj.get("max_tokens").and_then(Value::as_u64),
        last_user_text,
        earlier_user_texts,
        system_text: obj.get("system").and_then(content_text),
    })
}

/// The new input of a user turn: its text blocks and the text of its `tool_result` blocks
/// (a tool's output is read by the model like the user's words, so it is screened with
/// them), joined by blank lines.
pub fn turn_text(content: &Value) -> Option<String> {
    let text = match content {
        Value::String(s) => s.clone(),
        Value::Array(blocks) => blocks
            .iter()
            .filter_map(|b| match b.get("type").and_then(Value::as_str) {
                Some("text") => b.get("text").and_then(Value::as_str).map(str::to_string),
                Some("tool_result") => b.get("content").and_then(content_text),
                _ => None,
            })
            .collect::<Vec<_>>()
            .join("\n\n"),
        _ => return None,
    };
    (!text.trim().is_empty()).then_some(text)
}

/// Text of a `content` (or `system`) value: the string itself, or the `text` blocks of a
/// block list joined by blank lines. Images, documents, tool results are not text here.
pub fn content_text(content: &Value) -> Option<String> {
    let text = match content {
        Value::String(s) => s.clone(),
        Value::Array(blocks) => blocks
            .iter()
            .filter(|b| b.get("type").and_then(Value::as_str) == Some("text"))
            .filter_map(|b| b.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n\n"),
        _ => return None,
    };
    (!text.trim().is_empty()).then_some(text)
}

/// The text blocks of a response message, joined by blank lines (empty if none).
pub fn response_text(message: &Value) -> String {
    content_text(&message["content"]).unwrap_or_default()
}

/// The text of each text block of a response message, in order.
pub fn response_text_blocks(message: &Value) -> Vec<&str> {
    message["content"]
        .as_array()
        .map(|blocks| {
            blocks
                .iter()
                .filter(|b| b.get("type").and_then(Value::as_str) == Some("text"))
                .filter_map(|b| b.get("text").and_then(Value::as_str))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether a response message is one the gateway can evaluate (`type: message`).
pub fn is_message(message: &Value) -> bool {
    message.get("type").and_then(Value::as_str) == Some("message")
        && message.get("content").is_some_and(Value::is_array)
}

/// What the gateway did with an exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ActionTaken {
    /// Nothing violated.
    None,
    /// Returned as it was, with the violated rules named.
    Flag,
    /// Replaced by a refusal.
    Block,
    /// Replaced by a revision that passed.
    Revise,
    /// Passed with what the redact rules found masked (`[KIND]`).
    Redact,
}

impl ActionTaken {
    pub fn as_str(self) -> &'static str {
        match self {
            ActionTaken::None => "none",
            ActionTaken::Flag => "flag",
            ActionTaken::Block => "block",
            ActionTaken::Revise => "revise",
            ActionTaken::Redact => "redact",
        }
    }
}

/// Tokens spent upstream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
}

impl Usage {
    pub fn of(message: &Value) -> Self {
        Usage {
            input_tokens: message["usage"]["input_tokens"].as_u64().unwrap_or(0),
            output_tokens: message["usage"]["output_tokens"].as_u64().unwrap_or(0),
        }
    }

    pub fn add(&mut self, other: Usage) {
        self.input_tokens += other.input_tokens;
        self.output_tokens += other.output_tokens;
    }

    pub fn total(self) -> u64 {
        self.input_tokens + self.output_tokens
    }
}

/// Tokens of a text as a tokenizer roughly counts them, for budgets and for a stream cut
/// before upstream's own count: a CJK character about one token, other text about four
/// characters per token.
#[derive(Debug, Default, Clone, Copy)]
pub struct TokenEstimate {
    cjk: u64,
    other: u64,
}

impl TokenEstimate {
    pub fn add(&mut self, text: &str) {
        for c in text.chars() {
            if ('\u{3000}'..='\u{9fff}').contains(&c) || ('\u{ff00}'..='\u{ffef}').contains(&c) {
                self.cjk += 1;
            } else {
                self.other += 1;
            }
        }
    }

    pub fn tokens(self) -> u64 {
        self.cjk + self.other.div_ceil(4)
    }
}

/// [`TokenEstimate`] of one text.
pub fn estimate_tokens(text: &str) -> u64 {
    let mut estimate = TokenEstimate::default();
    estimate.add(text);
    estimate.tokens()
}

/// The `charter` field of a message (and of a stream's `message_delta`), and the source
/// of the `x-charter-*` headers.
#[derive(Debug, Clone, Serialize)]
pub struct Charter {
    /// Evaluation id; audit records of this exchange have this id or `<id>.<part>`.
    pub id: String,
    pub verdict: Verdict,
    pub action: ActionTaken,
    /// Rules the prompt or the output violated (for a revision: what the first output
    /// violated).
    pub violated: Vec<String>,
    pub constitution: ConstitutionRef,
    /// What was evaluated: `prompt`, `history` (earlier user turns with the new input,
    /// `gateway.screen_history`), `system`, `output`.
    pub checked: Vec<&'static str>,
    /// Which part failed (`prompt`, `history`, `system`, `output`), when one did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed: Option<&'static str>,
    /// Critique-and-revise rounds run.
    pub revise_rounds: u32,
    /// Tokens the critique and revision calls cost, on top of `usage`.
    pub extra_usage: Usage,
    /// Whether the output broke a revise rule, so the critique/revise loop ran (or was
    /// refused by `gateway.revise_max_tokens`): the `x-charter-revise-usage` header.
    #[serde(skip)]
    pub revise_tried: bool,
    /// Streams: characters of output text released to the client, all of them evaluated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub released_chars: Option<usize>,
    /// Why a revision could not be used, when it could not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// What was masked, where: kinds and counts, never the values.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub redacted: Vec<Redacted>,
}

/// Spans of one kind masked in one part of the exchange.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Redacted {
    /// `prompt`, `output` or `tool_use`.
    pub part: &'static str,
    pub kind: String,
    pub count: usize,
}

impl Charter {
    /// The metadata of an exchange before anything is checked: a pass, no action.
    pub fn new(id: String, constitution: ConstitutionRef) -> Self {
        Charter {
            id,
            verdict: Verdict::Pass,
            action: ActionTaken::None,
            violated: Vec::new(),
            constitution,
            checked: Vec::new(),
            failed: None,
            revise_rounds: 0,
            extra_usage: Usage::default(),
            revise_tried: false,
            released_chars: None,
            note: None,
            redacted: Vec::new(),
        }
    }

    /// Notes `count` masked spans of `kind` in `part`, and the action: a redaction is
    /// stronger than a flag, weaker than a block or a revision.
    pub fn note_redacted(&mut self, part: &'static str, kind: &str, count: usize) {
        match self
            .redacted
            .iter_mut()
            .find(|r| r.part == part && r.kind == kind)
        {
            Some(r) => r.count += count,
            None => self.redacted.push(Redacted {
                part,
                kind: kind.to_string(),
                count,
            }),
        }
        if matches!(self.action, ActionTaken::None | ActionTaken::Flag) {
            self.action = ActionTaken::Redact;
        }
    }
}

/// Masks the strings of a message's content: the text of `text` blocks and every
/// string inside a `tool_use` block's `input`. `mask` gets each string and its part
/// (`output` or `tool_use`) and answers the masked string when it changed something.
/// Returns whether anything changed.
pub fn redact_content(
    message: &mut Value,
    mask: &mut dyn FnMut(&str, &'static str) -> Option<String>,
) -> bool {
    let mut changed = false;
    let Some(blocks) = message.get_mut("content").and_then(Value::as_array_mut) else {
        return false;
    };
    for block in blocks {
        match block.get("type").and_then(Value::as_str) {
            Some("text") => {
                if let Some(text) = block.get("text").and_then(Value::as_str) {
                    if let Some(masked) = mask(text, "output") {
                        block["text"] = Value::String(masked);
                        changed = true;
                    }
                }
            }
            Some("tool_use") => {
                if let Some(input) = block.get_mut("input") {
                    changed |= redact_strings(input, "tool_use", mask);
                }
            }
            _ => {}
        }
    }
    changed
}

/// Masks every string (not keys) inside a JSON value.
pub fn redact_strings(
    value: &mut Value,
    part: &'static str,
    mask: &mut dyn FnMut(&str, &'static str) -> Option<String>,
) -> bool {
    match value {
        Value::String(s) => match mask(s, part) {
            Some(masked) => {
                *s = masked;
                true
            }
            None => false,
        },
        Value::Array(items) => items
            .iter_mut()
            .fold(false, |changed, v| redact_strings(v, part, mask) | changed),
        Value::Object(map) => map
            .values_mut()
            .fold(false, |changed, v| redact_strings(v, part, mask) | changed),
        _ => false,
    }
}

/// Masks the text of the last user turn of a request (a string content or its `text`
/// blocks). Returns whether anything changed.
pub fn redact_last_user_turn(
    body: &mut Value,
    mask: &mut dyn FnMut(&str, &'static str) -> Option<String>,
) -> bool {
    let Some(turn) = body
        .get_mut("messages")
        .and_then(Value::as_array_mut)
        .and_then(|m| {
            m.iter_mut()
                .rev()
                .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        })
    else {
        return false;
    };
    let Some(content) = turn.get_mut("content") else {
        return false;
    };
    match content {
        Value::String(s) => match mask(s, "prompt") {
            Some(masked) => {
                *s = masked;
                true
            }
            None => false,
        },
        Value::Array(blocks) => {
            let mut changed = false;
            for block in blocks {
                if block.get("type").and_then(Value::as_str) != Some("text") {
                    continue;
                }
                if let Some(text) = block.get("text").and_then(Value::as_str) {
                    if let Some(masked) = mask(text, "prompt") {
                        block["text"] = Value::String(masked);
                        changed = true;
                    }
                }
            }
            changed
        }
        _ => false,
    }
}

impl Charter {
    /// The `x-charter-*` response headers (`x-charter-revise-usage`: what the critique
    /// and revision calls spent, when they were needed).
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut headers = vec![
            ("x-charter-id", self.id.clone()),
            (
                "x-charter-verdict",
                match self.verdict {
                    Verdict::Pass => "pass",
                    Verdict::Fail => "fail",
                }
                .into(),
            ),
            ("x-charter-action", self.action.as_str().into()),
            ("x-charter-violated", self.violated.join(",")),
            ("x-charter-constitution", self.constitution.id.clone()),
            (
                "x-charter-constitution-version",
                self.constitution.version.clone(),
            ),
        ];
        if self.revise_tried {
            headers.push((
                REVISE_USAGE_HEADER,
                format!(
                    "input_tokens={}, output_tokens={}",
                    self.extra_usage.input_tokens, self.extra_usage.output_tokens
                ),
            ));
        }
        headers
    }
}

/// What the critique and revision calls of a request spent upstream.
pub const REVISE_USAGE_HEADER: &str = "x-charter-revise-usage";

/// A gateway-made message id (`msg_` like upstream's, marked as Charter's).
pub fn new_message_id() -> String {
    format!("msg_charter_{}", uuid::Uuid::now_v7().simple())
}

fn usage_json(usage: Usage) -> Value {
    json!({
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    })
}

/// A whole refusal message (a blocked prompt, non-streaming).
pub fn refusal_message(id: &str, model: &str, text: &str, charter: &Charter) -> Value {
    json!({
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": "refusal",
        "stop_sequence": null,
        "usage": usage_json(Usage::default()),
        "charter": charter,
    })
}

/// The events of a refusal stream (a blocked prompt, streaming): one `message_start`,
/// one text block with the notice, `message_delta` with `stop_reason: "refusal"`,
/// `message_stop`.
pub fn refusal_events(id: &str, model: &str, text: &str, charter: &Charter) -> Vec<Value> {
    let mut events = vec![json!({
        "type": "message_start",
        "message": {
            "id": id, "type": "message", "role": "assistant", "model": model,
            "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": usage_json(Usage::default()),
        }
    })];
    events.extend(notice_block_events(0, text));
    events.extend(end_events(
        Usage::default().output_tokens,
        "refusal",
        charter,
    ));
    events
}

/// A complete text block holding `text` at `index`.
pub fn notice_block_events(index: u64, text: &str) -> Vec<Value> {
    vec![
        json!({"type": "content_block_start", "index": index,
               "content_block": {"type": "text", "text": ""}}),
        json!({"type": "content_block_delta", "index": index,
               "delta": {"type": "text_delta", "text": text}}),
        json!({"type": "content_block_stop", "index": index}),
    ]
}

/// `message_delta` (with the `charter` metadata) and `message_stop`.
pub fn end_events(output_tokens: u64, stop_reason: &str, charter: &Charter) -> Vec<Value> {
    vec![
        json!({"type": "message_delta",
               "delta": {"stop_reason": stop_reason, "stop_sequence": null},
               "usage": {"output_tokens": output_tokens},
               "charter": charter}),
        json!({"type": "message_stop"}),
    ]
}

/// Replaces a response's content by a refusal (the output was blocked): same id, model and
/// usage (upstream billed for the output it produced), `stop_reason: "refusal"`.
pub fn blocked_response(mut message: Value, text: &str, charter: &Charter) -> Value {
    message["content"] = json!([{"type": "text", "text": text}]);
    message["stop_reason"] = json!("refusal");
    message["stop_sequence"] = Value::Null;
    message["charter"] = json!(charter);
    message
}

/// Replaces a response's text blocks by one block with the revision, where the first text
/// block was; other blocks (thinking, tool use) keep their places.
pub fn revised_response(
    mut message: Value,
    revision: &str,
    stop_reason: &Value,
    charter: &Charter,
) -> Value {
    let mut content = Vec::new();
    let mut placed = false;
    let mut has_tool_use = false;
    for block in message["content"].as_array().cloned().unwrap_or_default() {
        match block.get("type").and_then(Value::as_str) {
            Some("text") => {
                if !placed {
                    content.push(json!({"type": "text", "text": revision}));
                    placed = true;
                }
            }
            Some("tool_use") => {
                has_tool_use = true;
                content.push(block);
            }
            _ => content.push(block),
        }
    }
    if !placed {
        content.insert(0, json!({"type": "text", "text": revision}));
    }
    message["content"] = Value::Array(content);
    // A tool call still stands; otherwise the revision's own ending holds.
    if !has_tool_use && !stop_reason.is_null() {
        message["stop_reason"] = stop_reason.clone();
    }
    message["stop_sequence"] = Value::Null;
    message["charter"] = json!(charter);
    message
}

/// Adds `"charter": {...}` to a JSON object's bytes without re-serialising the rest, so
/// an answer that passed reaches the client as upstream's bytes plus one field.
/// `None` when the bytes do not end like an object.
pub fn with_charter_field(body: &[u8], charter: &Charter) -> Option<Vec<u8>> {
    let end = body.iter().rposition(|b| !b.is_ascii_whitespace())?;
    if body[end] != b'}' {
        return None;
    }
    let inner = body[..end].iter().rposition(|b| !b.is_ascii_whitespace())?;
    let empty = body[inner] == b'{';
    let field = serde_json::to_vec(charter).ok()?;
    let mut out = Vec::with_capacity(body.len() + field.len() + 16);
    out.extend_from_slice(&body[..end]);
    if !empty {
        out.push(b',');
    }
    out.extend_from_slice(b"\"charter\":");
    out.extend_from_slice(&field);
    out.push(b'}');
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_screened_turn_holds_its_text_and_its_tool_results() {
        let body = json!({"model": "m", "messages": [
            {"role": "user", "content": "earlier turn"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "t1", "content": "tool says A"},
                {"type": "tool_result", "tool_use_id": "t2",
                 "content": [{"type": "text", "text": "tool says B"}, {"type": "image", "source": {}}]},
                {"type": "text", "text": "and the user says C"},
            ]},
        ]});
        let view = read_request(&body, 0).unwrap();
        assert_eq!(
            view.last_user_text.as_deref(),
            Some("tool says A\n\ntool says B\n\nand the user says C")
        );
        let only_images = json!({"messages": [{"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "image", "source": {}}]}]}]});
        assert_eq!(read_request(&only_images, 0).unwrap().last_user_text, None);
    }

    #[test]
    fn earlier_user_turns_are_read_up_to_the_history_asked_for() {
        let body = json!({"messages": [
            {"role": "user", "content": "one"},
            {"role": "assistant", "content": "a"},
            {"role": "user", "content": [{"type": "image", "source": {}}]},
            {"role": "user", "content": "two"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "three"},
            {"role": "assistant", "content": "c"},
            {"role": "user", "content": "now"},
        ]});
        let view = |n| read_request(&body, n).unwrap();
        assert!(view(0).earlier_user_texts.is_empty());
        assert_eq!(view(1).earlier_user_texts, ["three"]);
        assert_eq!(view(2).earlier_user_texts, ["two", "three"]);
        assert_eq!(view(9).earlier_user_texts, ["one", "two", "three"]);
        assert_eq!(view(9).last_user_text.as_deref(), Some("now"));
    }

    #[test]
    fn tokens_are_estimated_per_script() {
        assert_eq!(estimate_tokens(""), 0);
        assert_eq!(estimate_tokens("abcde"), 2);
        assert_eq!(estimate_tokens("我不想活了"), 5);
        let mut n = TokenEstimate::default();
        n.add("abc");
        n.add("d。");
        assert_eq!(n.tokens(), 2);
    }

    fn charter() -> Charter {
        let constitution = ConstitutionRef {
            id: "default".into(),
            version: "abc".into(),
        };
        Charter {
            verdict: Verdict::Fail,
            action: ActionTaken::Block,
            violated: vec!["harmful-content".into()],
            checked: vec!["prompt", "output"],
            failed: Some("output"),
            ..Charter::new("eval_1".into(), constitution)
        }
    }

    #[test]
    fn redaction_reaches_text_blocks_tool_inputs_and_the_last_user_turn() {
        let mut mask =
            |s: &str, _part: &'static str| s.contains("4111").then(|| s.replace("4111", "[CARD]"));
        let mut message = json!({"type": "message", "content": [
            {"type": "text", "text": "card 4111"},
            {"type": "thinking", "thinking": "4111"},
            {"type": "tool_use", "id": "t", "name": "pay", "input": {"card": "4111", "n": [1, "x 4111"]}}
        ]});
        assert!(redact_content(&mut message, &mut mask));
        assert_eq!(message["content"][0]["text"], "card [CARD]");
        assert_eq!(
            message["content"][1]["thinking"], "4111",
            "thinking is not output text"
        );
        assert_eq!(message["content"][2]["input"]["card"], "[CARD]");
        assert_eq!(message["content"][2]["input"]["n"][1], "x [CARD]");
        let mut body = json!({"messages": [
            {"role": "user", "content": "first 4111"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [{"type": "text", "text": "pay 4111"}, {"type": "image"}]}
        ]});
        assert!(redact_last_user_turn(&mut body, &mut mask));
        assert_eq!(
            body["messages"][0]["content"], "first 4111",
            "only the last turn"
        );
        assert_eq!(body["messages"][2]["content"][0]["text"], "pay [CARD]");
        let mut charter = charter();
        charter.action = ActionTaken::Flag;
        charter.note_redacted("output", "CARD", 1);
        charter.note_redacted("output", "CARD", 2);
        assert_eq!(charter.action, ActionTaken::Redact);
        assert_eq!(charter.redacted[0].count, 3);
    }

    #[test]
    fn reads_the_last_user_turn_and_system() {
        let body = json!({
            "model": "claude-x", "max_tokens": 100, "stream": true,
            "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
            "messages": [
                {"role": "user", "content": "first"},
                {"role": "assistant", "content": "ok"},
                {"role": "user", "content": [
                    {"type": "image", "source": {}},
                    {"type": "text", "text": "second"},
                    {"type": "tool_result", "tool_use_id": "t", "content": "x"},
                    {"type": "text", "text": "third"}]},
                {"role": "assistant", "content": "prefill"}
            ],
            "unknown_field": {"kept": true}
        });
        let view = read_request(&body, 0).unwrap();
        assert_eq!(
            view,
            RequestView {
                stream: true,
                model: Some("claude-x".into()),
                max_tokens: Some(100),
                last_user_text: Some("second\n\nx\n\nthird".into()),
                earlier_user_texts: Vec::new(),
                system_text: Some("Be brief.".into()),
            }
        );
        assert!(read_request(&json!([1]), 0).is_err());
        let view = read_request(&json!({"messages": [{"role": "user", "content": 5}]}), 0).unwrap();
        assert_eq!(view.last_user_text, None);
        assert!(!view.stream);
    }

    #[test]
    fn charter_field_is_appended_to_the_original_bytes() {
        let body = br#"{"id":"msg_1", "content":[] }  "#;
        let out = with_charter_field(body, &charter()).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with(r#"{"id":"msg_1", "content":[] ,"charter":{"#));
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["charter"]["action"], "block");
        assert_eq!(v["charter"]["violated"][0], "harmful-content");
        let empty = with_charter_field(b"{}", &charter()).unwrap();
        serde_json::from_slice::<Value>(&empty).unwrap();
        assert!(with_charter_field(b"[1]", &charter()).is_none());
    }

    #[test]
    fn revision_keeps_tool_calls_and_thinking_in_place() {
        let message = json!({
            "type": "message", "stop_reason": "tool_use",
            "content": [
                {"type": "thinking", "thinking": "t", "signature": "s"},
                {"type": "text", "text": "bad 1"},
                {"type": "tool_use", "id": "tu", "name": "f", "input": {}},
                {"type": "text", "text": "bad 2"}
            ]
        });
        let out = revised_response(message, "good", &json!("end_turn"), &charter());
        let types: Vec<&str> = out["content"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["thinking", "text", "tool_use"]);
        assert_eq!(out["content"][1]["text"], "good");
        assert_eq!(out["stop_reason"], "tool_use");
        let out = revised_response(
            json!({"type": "message", "stop_reason": "max_tokens", "content": [{"type": "text", "text": "bad"}]}),
            "good",
            &json!("end_turn"),
            &charter(),
        );
        assert_eq!(out["stop_reason"], "end_turn");
    }

    #[test]
    fn refusal_stream_is_well_formed() {
        let events = refusal_events("msg_x", "m", "no", &charter());
        let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(
            types,
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        assert_eq!(events[4]["delta"]["stop_reason"], "refusal");
        let blocked = blocked_response(
            json!({"id": "msg_up", "type": "message", "content": [{"type": "text", "text": "bad"}], "usage": {"input_tokens": 3, "output_tokens": 9}}),
            "no",
            &charter(),
        );
        assert_eq!(blocked["id"], "msg_up");
        assert_eq!(
            blocked["usage"]["output_tokens"], 9,
            "usage stays upstream's"
        );
        assert_eq!(blocked["content"][0]["text"], "no");
    }
}
