//! Guarded streaming: upstream events in, events out, and no output text reaches the
//! client before it has been evaluated.
//!
//! Text deltas are held back (with any event that arrives between them, so order is kept)
//! until `gateway.hold_back_chars` characters are waiting or the text block ends; then the
//! held text is evaluated together with the last `gateway.context_chars` characters
//! already released (so a sentence cut by a window boundary is still seen whole) and,
//! when it passes, released as one `text_delta`. Each window costs one evaluation of at
//! most `context_chars + hold_back_chars` (+ one delta) characters, so the cost is linear
//! in the output and memory is bounded. Thinking and tool-use blocks pass as they come.
//!
//! With redact rules in the constitution, a release stops short of any tail of the held
//! text that could still grow into an identifier (`detect::release_point`: `4111 1111 `
//! waits for the rest of the card) and never inside one, and each released piece is
//! masked, so no character of a detected identifier reaches the client and the rest
//! arrives unchanged. A tool_use block's input is then held until the block ends and
//! sent masked as one `input_json_delta`.
//!
//! On a violation (a block or revise rule: a half-sent answer cannot be revised) the held
//! text is dropped, the open block is closed, a text block with the refusal notice is
//! added, then `message_delta` with `stop_reason: "refusal"` and `message_stop`, and
//! upstream is hung up on. Exactly one `message_start` reaches the client, and every
//! stream ends with `message_stop` or an `error` event (upstream `error` events are passed
//! on; a cut connection, an unreadable event or a failed evaluation become one), never a
//! bare close. The audit record of the output (what was checked, released and withheld)
//! is handed to the sink before the final events are sent.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::StatusCode;
use axum::response::Response;
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tracing::Instrument;

use super::error::error_body;
use super::messages::{self, ActionTaken, Charter};
use super::review::{self, Decision};
use super::sse::{self, SseParser};
use super::{add_headers, note_violations, sse_response, upstream, Exchange};
use crate::constitution::Constitution;
use crate::detect::{self, Hit};
use crate::evaluate::{Index, Kind, TextResult};

/// Events queued towards the client; small, so a slow client slows the upstream read
/// instead of growing memory.
const CLIENT_QUEUE: usize = 16;

/// Largest single upstream event accepted (text deltas are a few bytes; tool inputs and
/// signatures arrive in many small deltas).
const MAX_EVENT_BYTES: usize = 1 << 20;

/// Starts guarding `response` and answers the client with the guarded stream.
pub fn guard(ex: Exchange, response: reqwest::Response, meta: Charter) -> Response {
    let headers = upstream::forward_response_headers(response.headers(), true);
    let (tx, rx) = mpsc::channel::<Bytes>(CLIENT_QUEUE);
    // The verdict is not known yet: the headers name the evaluation and the constitution;
    // the outcome comes in `message_delta`'s `charter` field.
    let id_headers: Vec<(&'static str, String)> = meta
        .headers()
        .into_iter()
        .filter(|(name, _)| {
            matches!(
                *name,
                "x-charter-id" | "x-charter-constitution" | "x-charter-constitution-version"
            )
        })
        .collect();
    let config = &ex.gw.config().gateway;
    // Without the constitution no window could be evaluated either: the first release
    // ends the stream with an error.
    let redactor = ex.constitution().ok().filter(|c| c.redacts());
    let guard = Guard {
        redactor,
        tool: None,
        hold_back: config.hold_back_chars,
        context_chars: config.context_chars,
        ex,
        meta,
        tx,
        held: Vec::new(),
        held_chars: 0,
        carried: 0,
        text_block: None,
        open_block: None,
        next_index: 0,
        context: String::new(),
        released_chars: 0,
        checked_chars: 0,
        checked_text: String::new(),
        windows: 0,
        merged: None,
        index: None,
        eval_ms: 0.0,
        output_tokens: 0,
        started: false,
        recorded: false,
    };
    tokio::spawn(guard.run(response).in_current_span());
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|bytes| (Ok::<_, Infallible>(bytes), rx))
    });
    let mut out = sse_response(StatusCode::OK, headers, Body::from_stream(body));
    add_headers(&mut out, &id_headers);
    out
}

/// Text or another event waiting for the held text's evaluation.
enum Held {
    Text { index: u64, text: String },
    Event(Bytes),
}

/// Whether to keep reading upstream.
#[derive(Debug, PartialEq, Eq)]
enum Flow {
    Continue,
    Stop,
}

/// A tool call's input arriving in pieces, held whole so it can be masked.
struct ToolInput {
    index: u64,
    json: String,
}

struct Guard {
    /// The constitution, when it has redact rules: held text is then released only up to
    /// where no identifier can be cut in two, masked.
    redactor: Option<Arc<Constitution>>,
    /// The open tool_use block's input, while redacting.
    tool: Option<ToolInput>,
    ex: Exchange,
    meta: Charter,
    tx: mpsc::Sender<Bytes>,
    hold_back: usize,
    context_chars: usize,
    held: Vec<Held>,
    held_chars: usize,
    /// Held characters already evaluated once (an unfinished sentence carried over).
    carried: usize,
    /// Index of the open text block.
    text_block: Option<u64>,
    /// Index of the open block of any type.
    open_block: Option<u64>,
    /// One past the highest block index seen (where a notice block goes).
    next_index: u64,
    /// The end of the released text, evaluated again with the next window.
    context: String,
    released_chars: usize,
    checked_chars: usize,
    /// Every character evaluated (released or withheld), for the audit record.
    checked_text: String,
    windows: usize,
    merged: Option<TextResult>,
    index: Option<(Arc<Index>, Arc<str>)>,
    eval_ms: f64,
    /// Latest output token count upstream reported.
    output_tokens: u64,
    started: bool,
    recorded: bool,
}

impl Guard {
    async fn run(mut self, response: reqwest::Response) {
        let mut body = response.bytes_stream();
        let mut parser = SseParser::new(MAX_EVENT_BYTES.max(self.hold_back * 8));
        loop {
            // A client that hangs up stops the upstream read at once (and so the
            // generation upstream), not at the next event.
            let next = tokio::select! {
                chunk = body.next() => Some(chunk),
                _ = self.tx.closed() => None,
            };
            let Some(chunk) = next else {
                self.finish("client_disconnected");
                return;
            };
            let chunk = match chunk {
                Some(Ok(chunk)) => chunk,
                Some(Err(err)) => {
                    let err = upstream::transport_error(err);
                    tracing::warn!(error = %err, "upstream stream failed");
                    // The Anthropic type of the gateway's own error (timeout or api).
                    let (_, kind, _) = err.parts();
                    self.fail("upstream_failed", kind, "the upstream stream failed")
                        .await;
                    return;
                }
                None => {
                    tracing::warn!(
                        partial_event = parser.has_partial(),
                        "upstream stream ended before message_stop"
                    );
                    self.fail(
                        "upstream_ended_early",
                        "api_error",
                        "the upstream stream ended before message_stop",
                    )
                    .await;
                    return;
                }
            };
            let events = match parser.push(&chunk) {
                Ok(events) => events,
                Err(err) => {
                    tracing::warn!(error = %err, "unreadable upstream stream");
                    self.fail(
                        "upstream_unreadable",
                        "api_error",
                        "the upstream stream could not be read",
                    )
                    .await;
                    return;
                }
            };
            for event in events {
                if self.handle(event).await == Flow::Stop {
                    return;
                }
            }
        }
    }

    async fn handle(&mut self, event: sse::SseEvent) -> Flow {
        let raw = event.to_bytes();
        let data: Value = serde_json::from_str(&event.data).unwrap_or(Value::Null);
        let kind = data["type"]
            .as_str()
            .or(event.event.as_deref())
            .unwrap_or("")
            .to_string();
        match kind.as_str() {
            "message_start" => {
                if self.started {
                    tracing::warn!("upstream sent a second message_start; dropped");
                    return Flow::Continue;
                }
                self.started = true;
                if let Some(n) = data["message"]["usage"]["output_tokens"].as_u64() {
                    self.output_tokens = n;
                }
                self.send(raw).await
            }
            "content_block_start" => {
                if self.release(true).await == Flow::Stop {
                    return Flow::Stop;
                }
                let index = data["index"].as_u64().unwrap_or(self.next_index);
                self.next_index = self.next_index.max(index + 1);
                self.open_block = Some(index);
                let block = &data["content_block"];
                if block["type"].as_str() == Some("tool_use") && self.redactor.is_some() {
                    self.tool = Some(ToolInput {
                        index,
                        json: String::new(),
                    });
                }
                if block["type"].as_str() != Some("text") {
                    return self.send(raw).await;
                }
                self.text_block = Some(index);
                let initial = block["text"].as_str().unwrap_or("");
                if initial.is_empty() {
                    return self.send(raw).await;
                }
                // Text in the start event is held like a delta; the start goes out empty.
                let text = initial.to_string();
                let mut start = data.clone();
                start["content_block"]["text"] = json!("");
                if self.send(sse::event(&start)).await == Flow::Stop {
                    return Flow::Stop;
                }
                self.hold_text(index, text).await
            }
            "content_block_delta" => {
                let index = data["index"].as_u64();
                let delta = &data["delta"];
                if index.is_some()
                    && index == self.text_block
                    && delta["type"].as_str() == Some("text_delta")
                {
                    let text = delta["text"].as_str().unwrap_or("").to_string();
                    self.hold_text(index.unwrap_or(0), text).await
                } else if let Some(tool) = self
                    .tool
                    .as_mut()
                    .filter(|t| Some(t.index) == index)
                    .filter(|_| delta["type"].as_str() == Some("input_json_delta"))
                {
                    tool.json
                        .push_str(delta["partial_json"].as_str().unwrap_or(""));
                    Flow::Continue
                } else {
                    self.send_in_order(raw).await
                }
            }
            "content_block_stop" => {
                if self.release(true).await == Flow::Stop {
                    return Flow::Stop;
                }
                if data["index"].as_u64() == self.text_block {
                    self.text_block = None;
                }
                if let Some(tool) = self.tool.take() {
                    if data["index"].as_u64() == Some(tool.index) {
                        let delta = self.redacted_tool_input(tool);
                        if self.send(delta).await == Flow::Stop {
                            return Flow::Stop;
                        }
                    } else {
                        self.tool = Some(tool);
                    }
                }
                self.open_block = None;
                self.send(raw).await
            }
            "message_delta" => {
                if self.release(true).await == Flow::Stop {
                    return Flow::Stop;
                }
                if let Some(n) = data["usage"]["output_tokens"].as_u64() {
                    self.output_tokens = n;
                }
                self.finish("message_stop");
                let mut delta = data;
                delta["charter"] = json!(self.meta);
                self.send(sse::event(&delta)).await
            }
            "message_stop" => {
                // A stream without message_delta is still recorded before it ends.
                self.finish("message_stop");
                self.send(raw).await;
                Flow::Stop
            }
            "error" => {
                // Unevaluated text never reaches the client; the error does.
                self.drop_held();
                tracing::info!(error = %data["error"]["type"], "upstream error event passed on");
                self.finish("upstream_error");
                self.send(raw).await;
                Flow::Stop
            }
            // ping and event types added later: passed on, in order.
            _ => self.send_in_order(raw).await,
        }
    }

    /// Holds a piece of text; evaluates once `hold_back` new characters wait.
    async fn hold_text(&mut self, index: u64, text: String) -> Flow {
        self.held_chars += text.chars().count();
        self.held.push(Held::Text { index, text });
        if self.held_chars - self.carried >= self.hold_back {
            self.release(false).await
        } else {
            Flow::Continue
        }
    }

    /// Sends an event now, or after the held text if there is some (order is kept).
    async fn send_in_order(&mut self, raw: Bytes) -> Flow {
        if self.held.is_empty() {
            self.send(raw).await
        } else {
            self.held.push(Held::Event(raw));
            Flow::Continue
        }
    }

    fn drop_held(&mut self) {
        self.held.clear();
        self.held_chars = 0;
        self.carried = 0;
    }

    /// Evaluates the held text (with context) and, if it passes, releases it: all of it
    /// when `all` (the block or message ends), else up to its last sentence end, so an
    /// unfinished sentence is judged again, whole, in the next window. Blocks the stream
    /// if it does not pass.
    async fn release(&mut self, all: bool) -> Flow {
        if self.held.is_empty() {
            return Flow::Continue;
        }
        let text: String = self
            .held
            .iter()
            .filter_map(|h| match h {
                Held::Text { text, .. } => Some(text.as_str()),
                Held::Event(_) => None,
            })
            .collect();
        if !text.trim().is_empty() {
            let window = format!("{}{}", self.context, text);
            let checked =
                match review::check(&self.ex.gw, &self.ex.engine, &window, &self.ex.constitution)
                    .await
                {
                    Ok(checked) => checked,
                    Err(err) => {
                        tracing::warn!(error = %err, "stream window could not be evaluated");
                        let (_, kind, message) = err.parts();
                        self.drop_held();
                        self.fail("evaluation_failed", kind, &message).await;
                        return Flow::Stop;
                    }
                };
            self.windows += 1;
            self.eval_ms += checked.latency_ms;
            // Text carried over from the last window was counted then.
            let new_from = text
                .char_indices()
                .nth(self.carried)
                .map_or(text.len(), |(i, _)| i);
            self.checked_chars += self.held_chars - self.carried;
            self.checked_text.push_str(&text[new_from..]);
            note_violations(&mut self.meta, &checked);
            let decision = review::decide(&checked.result);
            self.index = Some((Arc::clone(&checked.index), Arc::clone(&checked.model)));
            self.merged = Some(match self.merged.take() {
                Some(m) => review::merge_two(m, checked.result),
                None => checked.result,
            });
            match decision {
                // What a redact rule found is masked below, as the text is released.
                Decision::Pass | Decision::Redact => {}
                Decision::Flag => {
                    self.meta.action = ActionTaken::Flag;
                    self.meta.failed.get_or_insert("output");
                }
                Decision::Revise | Decision::Block => {
                    self.block().await;
                    return Flow::Stop;
                }
            }
        }
        let cut = if all {
            text.len()
        } else {
            sentence_cut(&text).unwrap_or(text.len())
        };
        let (cut, hits) = self.redaction_cut(&text, cut, all);
        for h in hits.iter().filter(|h| h.start < cut) {
            self.meta.note_redacted("output", &h.kind, 1);
        }
        // Released: consecutive text pieces as one delta, other events as they came;
        // what follows the cut stays held, in order.
        let held = std::mem::take(&mut self.held);
        let mut offset = 0;
        let mut pending: Option<(u64, String)> = None;
        let mut out: Vec<Bytes> = Vec::new();
        for item in held {
            if offset >= cut {
                self.held.push(item);
                continue;
            }
            match item {
                Held::Text { index, text: piece } => {
                    let (now, later) = piece.split_at((cut - offset).min(piece.len()));
                    let now = if hits.is_empty() {
                        now.to_string()
                    } else {
                        detect::mask_range(&text, &hits, offset, offset + now.len())
                    };
                    offset += piece.len();
                    match &mut pending {
                        Some((i, t)) if *i == index => t.push_str(&now),
                        _ => {
                            if let Some((i, t)) = pending.take() {
                                out.push(text_delta(i, &t));
                            }
                            pending = Some((index, now));
                        }
                    }
                    if !later.is_empty() {
                        self.held.push(Held::Text {
                            index,
                            text: later.to_string(),
                        });
                    }
                }
                Held::Event(raw) => {
                    if let Some((i, t)) = pending.take() {
                        out.push(text_delta(i, &t));
                    }
                    out.push(raw);
                }
            }
        }
        if let Some((i, t)) = pending.take() {
            out.push(text_delta(i, &t));
        }
        let released = &text[..cut];
        let released_chars = released.chars().count();
        self.released_chars += released_chars;
        self.held_chars -= released_chars;
        self.carried = self.held_chars;
        self.context.push_str(released);
        self.context = review::tail(&self.context, self.context_chars).to_string();
        for bytes in out {
            if self.send(bytes).await == Flow::Stop {
                return Flow::Stop;
            }
        }
        Flow::Continue
    }

    /// With redact rules: where the held `text` may be cut (at most `cut`; unless `all`,
    /// not into what could still grow into an identifier, nor inside one) and the spans
    /// to mask, as byte offsets into `text`. Found in the released context plus the held
    /// text, so an identifier is seen whole.
    fn redaction_cut(&self, text: &str, cut: usize, all: bool) -> (usize, Vec<Hit>) {
        let Some(constitution) = &self.redactor else {
            return (cut, Vec::new());
        };
        let offset = self.context.len();
        let window = format!("{}{}", self.context, text);
        let found = constitution.redactions(&window);
        let cut = if all {
            cut
        } else {
            detect::release_point(&window, &found, offset + cut).saturating_sub(offset)
        };
        let hits = found
            .into_iter()
            .filter(|h| h.end > offset)
            .map(|h| Hit {
                start: h.start.saturating_sub(offset),
                end: h.end - offset,
                ..h
            })
            .collect();
        (cut, hits)
    }

    /// The whole input of a tool call as one `input_json_delta`, its strings masked.
    fn redacted_tool_input(&mut self, tool: ToolInput) -> Bytes {
        let mut json = tool.json;
        if let Some(constitution) = self.redactor.clone() {
            match serde_json::from_str::<Value>(if json.is_empty() { "{}" } else { &json }) {
                Ok(mut input) => {
                    let mut meta = self.meta.clone();
                    let changed = messages::redact_strings(
                        &mut input,
                        "tool_use",
                        &mut super::masker(&constitution, &mut meta),
                    );
                    if changed {
                        self.meta = meta;
                        json = input.to_string();
                    }
                }
                Err(err) => {
                    tracing::warn!(error = %err, "tool input is not JSON; passed on unmasked")
                }
            }
        }
        sse::event(&json!({
            "type": "content_block_delta",
            "index": tool.index,
            "delta": {"type": "input_json_delta", "partial_json": json},
        }))
    }

    /// Ends the stream with the refusal notice.
    async fn block(&mut self) {
        let withheld = self.held_chars;
        self.drop_held();
        self.meta.action = ActionTaken::Block;
        self.meta.failed = Some("output");
        self.finish_with("blocked", withheld);
        let mut events = Vec::new();
        if let Some(index) = self.open_block.take() {
            events.push(json!({"type": "content_block_stop", "index": index}));
        }
        let refusal = self.ex.refusal(&self.meta);
        events.extend(messages::notice_block_events(self.next_index, &refusal));
        events.extend(messages::end_events(
            self.output_tokens,
            "refusal",
            &self.meta,
        ));
        for event in events {
            if self.send(sse::event(&event)).await == Flow::Stop {
                return;
            }
        }
    }

    /// Ends the stream with an error event (after recording what was checked).
    async fn fail(&mut self, ended: &str, kind: &str, message: &str) {
        self.drop_held();
        self.finish(ended);
        self.send(sse::event(&error_body(kind, message))).await;
    }

    fn finish(&mut self, ended: &str) {
        self.finish_with(ended, self.held_chars);
    }

    /// Hands the output's audit record to the sink (once; nothing when no text was
    /// evaluated) and completes the metadata.
    fn finish_with(&mut self, ended: &str, withheld_chars: usize) {
        if self.recorded {
            return;
        }
        self.recorded = true;
        self.meta.released_chars = Some(self.released_chars);
        let (Some((index, model)), Some(result)) = (&self.index, &self.merged) else {
            return;
        };
        self.meta.checked.push("output");
        let checked = review::Checked {
            index: Arc::clone(index),
            model: Arc::clone(model),
            result: result.clone(),
            chars: self.checked_chars,
            chunks: self.windows,
            latency_ms: self.eval_ms,
        };
        let context = json!({
            "part": "output",
            "stream": true,
            "checked": "every text delta, in windows of held-back text plus context",
            "windows": self.windows,
            "hold_back_chars": self.hold_back,
            "context_chars": self.context_chars,
            "checked_chars": self.checked_chars,
            "released_chars": self.released_chars,
            "withheld_chars": withheld_chars,
            "action": self.meta.action.as_str(),
            "ended": ended,
            "output_tokens_reported": self.output_tokens,
            "request_id": self.ex.request_id,
        });
        review::record(
            &self.ex.gw,
            format!("{}.output", self.ex.id),
            self.ex.key_id.clone(),
            Kind::Response,
            &checked,
            &self.checked_text,
            context,
        );
    }

    async fn send(&mut self, bytes: Bytes) -> Flow {
        match self.tx.send(bytes).await {
            Ok(()) => Flow::Continue,
            Err(_) => {
                self.finish("client_disconnected");
                Flow::Stop
            }
        }
    }
}

/// Byte offset just after the last sentence end in `text` (a terminator followed by
/// whitespace, or a CJK terminator or newline anywhere), if that is not the very end.
fn sentence_cut(text: &str) -> Option<usize> {
    let mut cut = None;
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        let end = i + c.len_utf8();
        let next_is_space = chars.peek().is_some_and(|(_, n)| n.is_whitespace());
        let is_end = match c {
            '.' | '!' | '?' | ';' | ':' => next_is_space,
            '\n' | '。' | '！' | '？' | '；' => true,
            _ => false,
        };
        if is_end && end < text.len() {
            cut = Some(end);
        }
    }
    cut
}

fn text_delta(index: u64, text: &str) -> Bytes {
    sse::event(&json!({
        "type": "content_block_delta",
        "index": index,
        "delta": {"type": "text_delta", "text": text},
    }))
}

#[cfg(test)]
mod tests {
    use super::sentence_cut;

    #[test]
    fn cuts_after_the_last_finished_sentence() {
        assert_eq!(sentence_cut("One. Two. Thr"), Some(9));
        assert_eq!(sentence_cut("Version 2.5 is out"), None);
        assert_eq!(sentence_cut("Ends here."), None);
        assert_eq!(sentence_cut("第一句。第二"), Some("第一句。".len()));
        assert_eq!(sentence_cut("line\nnext"), Some(5));
        assert_eq!(sentence_cut("no boundary at all"), None);
    }
}
