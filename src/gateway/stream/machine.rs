//! The streaming guard's state machine: what the guard does with each upstream event and
//! each verdict, without I/O. The driver (`stream.rs`) reads upstream, evaluates the
//! windows the machine asks for, records the outcome and sends what the machine queued;
//! the machine decides what is held, released, masked, refused or ended, so every
//! transition is a plain method a unit test calls (`tests.rs`).
//!
//! States ([`State`]): `Starting` (no `message_start` yet) -> `Between` (no block open)
//! -> `Text` / `ToolInput` / `Passing` (a block open) -> back to `Between` on
//! `content_block_stop`; `Ended` is final (`message_stop`, a refusal, an error, the
//! client gone). Held text is judged by the driver between two calls: a transition that
//! needs a verdict returns [`Step::Judge`], and [`Machine::judged`] goes on from there
//! (with [`Step::Resume`] when an event waited for the verdict).

use std::sync::Arc;

use axum::body::Bytes;
use serde_json::{json, Value};

use crate::constitution::Constitution;
use crate::detect::{self, Hit};
use crate::evaluate::TextResult;
use crate::gateway::error::{error_body, GatewayError};
use crate::gateway::messages::{self, ActionTaken, Charter};
use crate::gateway::review::{self, Decision};
use crate::gateway::sse::{self, SseEvent};

/// Where the guarded stream is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum State {
    /// No `message_start` yet.
    Starting,
    /// `message_start` passed on; no content block open.
    Between,
    /// A text block is open: its deltas are held back and judged in windows.
    Text { index: u64 },
    /// A tool_use block is open while redacting: its input is gathered whole, to be sent
    /// masked as one `input_json_delta` when the block ends.
    ToolInput { index: u64, json: String },
    /// Another block is open (thinking, tool_use without redact rules): passed on.
    Passing { index: u64 },
    /// Nothing more is read or sent.
    Ended(End),
}

/// How a stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum End {
    /// Upstream's `message_stop` passed on.
    Completed,
    /// A block or revise rule: the refusal notice and the end events sent.
    Blocked,
    /// An `error` event sent: upstream's own, or ours for a failure.
    Error,
    /// The client hung up.
    ClientGone,
}

/// What the driver does after a transition (first sending what the machine queued).
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Step {
    /// Read the next upstream event.
    Read,
    /// Evaluate this window (one of `review::output_windows` of the open text block),
    /// then call [`Machine::judged`].
    Judge(String),
    /// An event waited for the verdict: call [`Machine::resume`].
    Resume,
    /// The stream is over.
    Stop,
}

/// One upstream event: its type, its data and its bytes as they came.
pub(super) struct Event {
    kind: String,
    data: Value,
    raw: Bytes,
}

impl Event {
    pub(super) fn parse(event: &SseEvent) -> Event {
        let data: Value = serde_json::from_str(&event.data).unwrap_or(Value::Null);
        let kind = data["type"]
            .as_str()
            .or(event.event.as_deref())
            .unwrap_or("")
            .to_string();
        Event {
            kind,
            raw: event.to_bytes(),
            data,
        }
    }

    /// Events that end a block or the message: the held text's last window is judged
    /// and the text released first.
    fn releases_first(&self) -> bool {
        matches!(
            self.kind.as_str(),
            "content_block_start" | "content_block_stop" | "message_delta"
        )
    }
}

/// A window's verdict, as the driver got it from the engine.
pub(super) struct Judgement {
    pub result: TextResult,
    pub latency_ms: f64,
}

/// What the output's audit record holds; the driver adds the index, the model and the
/// request id, and hands it to the sink before the final events are sent.
pub(super) struct OutputRecord {
    pub result: TextResult,
    /// Every character evaluated, released or withheld.
    pub text: String,
    pub chars: usize,
    pub windows: usize,
    pub latency_ms: f64,
    pub context: Value,
}

/// Text or another event waiting for the held text's verdict.
enum Held {
    Text { index: u64, text: String },
    Event(Bytes),
}

/// Sizes of the windows (`review::windows`).
#[derive(Debug, Clone, Copy)]
pub(super) struct WindowSizes {
    /// New characters per window (`gateway.hold_back_chars`).
    pub hold_back: usize,
    /// Characters before a window judged with it (`gateway.context_chars`): they stay
    /// held until the window that holds them as context has passed too.
    pub context_chars: usize,
}

pub(super) struct Machine {
    state: State,
    windows: WindowSizes,
    /// The constitution, when it has redact rules: held text is then released only up to
    /// where no identifier can be cut in two, masked.
    redactor: Option<Arc<Constitution>>,
    meta: Charter,
    held: Vec<Held>,
    held_chars: usize,
    /// Characters of the open text block judged: the end of its last judged window.
    block_judged: usize,
    /// Characters of the open text block released (the held text starts there).
    block_released: usize,
    /// The open text block (or the message) has ended: its last window may be short,
    /// and everything held goes out once it passes.
    finishing: bool,
    /// Where the window being judged ends, in characters of the open text block.
    judging_end: usize,
    /// One past the highest block index seen (where a notice block goes).
    next_index: u64,
    /// The end of the released text, where redact rules look for an identifier that
    /// the held text continues.
    context: String,
    released_chars: usize,
    checked_chars: usize,
    /// Every character evaluated (released or withheld), for the audit record.
    checked_text: String,
    judged_windows: usize,
    merged: Option<TextResult>,
    eval_ms: f64,
    /// Latest output token count upstream reported.
    output_tokens: u64,
    /// What upstream has generated so far (text, thinking, tool input), for the usage of
    /// a stream cut before upstream's own count came.
    generated: messages::TokenEstimate,
    /// Whether non-blank text went out in the open text block: a refusal closes such a
    /// block and adds its own; otherwise the notice goes into it, so no empty text block
    /// (which the Messages API rejects in a later turn's history) reaches the client.
    open_has_text: bool,
    /// The event that waits for the verdict.
    pending: Option<Event>,
    recorded: bool,
    record: Option<OutputRecord>,
    outbox: Vec<Bytes>,
}

impl Machine {
    pub(super) fn new(
        meta: Charter,
        windows: WindowSizes,
        redactor: Option<Arc<Constitution>>,
    ) -> Self {
        Machine {
            state: State::Starting,
            windows,
            redactor,
            meta,
            held: Vec::new(),
            held_chars: 0,
            block_judged: 0,
            block_released: 0,
            finishing: false,
            judging_end: 0,
            next_index: 0,
            context: String::new(),
            released_chars: 0,
            checked_chars: 0,
            checked_text: String::new(),
            judged_windows: 0,
            merged: None,
            eval_ms: 0.0,
            output_tokens: 0,
            generated: messages::TokenEstimate::default(),
            open_has_text: false,
            pending: None,
            recorded: false,
            record: None,
            outbox: Vec::new(),
        }
    }

    #[cfg(test)]
    pub(super) fn state(&self) -> &State {
        &self.state
    }

    #[cfg(test)]
    pub(super) fn meta(&self) -> &Charter {
        &self.meta
    }

    /// The events to send, in order.
    pub(super) fn take_outbox(&mut self) -> Vec<Bytes> {
        std::mem::take(&mut self.outbox)
    }

    /// The audit record's content, once the stream has ended (or its message_delta came)
    /// and some text was evaluated.
    pub(super) fn take_record(&mut self) -> Option<OutputRecord> {
        self.record.take()
    }

    /// An upstream event arrived.
    pub(super) fn event(&mut self, event: Event) -> Step {
        if matches!(self.state, State::Ended(_)) {
            return Step::Stop;
        }
        if event.releases_first() {
            if let Some(window) = self.end_text() {
                self.pending = Some(event);
                return Step::Judge(window);
            }
        }
        self.apply(event)
    }

    /// The event that waited for the held text's verdict goes on.
    pub(super) fn resume(&mut self) -> Step {
        match self.pending.take() {
            Some(event) => self.apply(event),
            None => Step::Read,
        }
    }

    /// The verdict on the window [`Step::Judge`] asked for. `refusal` gives the refusal
    /// text for the rules violated so far, when the stream is blocked.
    pub(super) fn judged(
        &mut self,
        verdict: Result<Judgement, GatewayError>,
        refusal: impl FnOnce(&Charter) -> String,
    ) -> Step {
        let end = self.judging_end;
        let checked = match verdict {
            Ok(checked) => checked,
            Err(err) => {
                tracing::warn!(error = %err, "stream window could not be evaluated");
                let (_, kind, message) = err.parts();
                self.fail("evaluation_failed", kind, &message);
                return Step::Stop;
            }
        };
        let text = self.held_text();
        self.judged_windows += 1;
        self.eval_ms += checked.latency_ms;
        // The window's new characters; its context was counted with the window before.
        let (from, to) = (
            self.block_judged - self.block_released,
            end - self.block_released,
        );
        self.checked_chars += to - from;
        self.checked_text
            .push_str(&text[char_byte(&text, from)..char_byte(&text, to)]);
        super::super::note_violations(&mut self.meta, &checked.result);
        let decision = review::decide(&checked.result);
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
                self.block(refusal);
                return Step::Stop;
            }
        }
        self.passed(end);
        match self.next_window() {
            Some(window) => Step::Judge(window),
            None if self.pending.is_some() => Step::Resume,
            None => Step::Read,
        }
    }

    /// Upstream failed (cut, unreadable, ended early): the stream ends with an error
    /// event of this Anthropic `kind`, after recording what was checked.
    pub(super) fn fail(&mut self, ended: &str, kind: &str, message: &str) {
        self.drop_held();
        self.pending = None;
        self.finish(ended);
        self.outbox.push(sse::event(&error_body(kind, message)));
        self.state = State::Ended(End::Error);
    }

    /// The client hung up: nothing more is sent; what was checked is recorded.
    pub(super) fn client_gone(&mut self) {
        self.finish("client_disconnected");
        self.outbox.clear();
        self.pending = None;
        self.state = State::Ended(End::ClientGone);
    }

    /// The transition an event makes, once nothing held waits for a verdict before it.
    fn apply(&mut self, event: Event) -> Step {
        let Event { kind, data, raw } = event;
        match kind.as_str() {
            "message_start" => self.message_start(&data, raw),
            "content_block_start" => self.block_start(data, raw),
            "content_block_delta" => self.block_delta(&data, raw),
            "content_block_stop" => self.block_stop(&data, raw),
            "message_delta" => self.message_delta(data),
            "message_stop" => {
                // A stream without message_delta is still recorded before it ends.
                self.finish("message_stop");
                self.outbox.push(raw);
                self.state = State::Ended(End::Completed);
                Step::Stop
            }
            "error" => {
                // Unevaluated text never reaches the client; the error does.
                self.drop_held();
                tracing::info!(error = %data["error"]["type"], "upstream error event passed on");
                self.finish("upstream_error");
                self.outbox.push(raw);
                self.state = State::Ended(End::Error);
                Step::Stop
            }
            // ping and event types added later: passed on, in order.
            _ => self.send_in_order(raw),
        }
    }

    fn message_start(&mut self, data: &Value, raw: Bytes) -> Step {
        if self.state != State::Starting {
            tracing::warn!("upstream sent a second message_start; dropped");
            return Step::Read;
        }
        self.state = State::Between;
        if let Some(n) = data["message"]["usage"]["output_tokens"].as_u64() {
            self.output_tokens = n;
        }
        self.outbox.push(raw);
        Step::Read
    }

    fn block_start(&mut self, data: Value, raw: Bytes) -> Step {
        let index = data["index"].as_u64().unwrap_or(self.next_index);
        self.next_index = self.next_index.max(index + 1);
        let block = &data["content_block"];
        match block["type"].as_str() {
            Some("text") => {
                self.state = State::Text { index };
                self.open_has_text = false;
                self.block_judged = 0;
                self.block_released = 0;
                self.finishing = false;
                let initial = block["text"].as_str().unwrap_or("");
                self.generated.add(initial);
                if initial.is_empty() {
                    self.outbox.push(raw);
                    return Step::Read;
                }
                // Text in the start event is held like a delta; the start goes out empty.
                let text = initial.to_string();
                let mut start = data.clone();
                start["content_block"]["text"] = json!("");
                self.outbox.push(sse::event(&start));
                self.hold_text(index, text)
            }
            Some("tool_use") if self.redactor.is_some() => {
                self.state = State::ToolInput {
                    index,
                    json: String::new(),
                };
                self.outbox.push(raw);
                Step::Read
            }
            _ => {
                self.state = State::Passing { index };
                self.outbox.push(raw);
                Step::Read
            }
        }
    }

    fn block_delta(&mut self, data: &Value, raw: Bytes) -> Step {
        let index = data["index"].as_u64();
        let delta = &data["delta"];
        for field in ["text", "thinking", "partial_json"] {
            self.generated.add(delta[field].as_str().unwrap_or(""));
        }
        match (&mut self.state, delta["type"].as_str()) {
            (State::Text { index: open }, Some("text_delta")) if Some(*open) == index => {
                let open = *open;
                let text = delta["text"].as_str().unwrap_or("").to_string();
                self.hold_text(open, text)
            }
            (State::ToolInput { index: open, json }, Some("input_json_delta"))
                if Some(*open) == index =>
            {
                json.push_str(delta["partial_json"].as_str().unwrap_or(""));
                Step::Read
            }
            _ => self.send_in_order(raw),
        }
    }

    fn block_stop(&mut self, data: &Value, raw: Bytes) -> Step {
        let state = std::mem::replace(&mut self.state, State::Between);
        if let State::ToolInput { index, json } = state {
            if data["index"].as_u64() != Some(index) {
                tracing::warn!("content_block_stop for another block while a tool input is held");
            }
            let delta = self.redacted_tool_input(index, json);
            self.outbox.push(delta);
        }
        self.outbox.push(raw);
        Step::Read
    }

    fn message_delta(&mut self, data: Value) -> Step {
        if let Some(n) = data["usage"]["output_tokens"].as_u64() {
            self.output_tokens = n;
        }
        self.finish("message_stop");
        let mut delta = data;
        delta["charter"] = json!(self.meta);
        self.outbox.push(sse::event(&delta));
        Step::Read
    }

    /// Holds a piece of text; asks for a verdict once a window is complete.
    fn hold_text(&mut self, index: u64, text: String) -> Step {
        self.held_chars += text.chars().count();
        self.held.push(Held::Text { index, text });
        match self.next_window() {
            Some(window) => Step::Judge(window),
            None => Step::Read,
        }
    }

    /// Queues an event now, or after the held text if there is some (order is kept).
    fn send_in_order(&mut self, raw: Bytes) -> Step {
        if self.held.is_empty() {
            self.outbox.push(raw);
        } else {
            self.held.push(Held::Event(raw));
        }
        Step::Read
    }

    fn drop_held(&mut self) {
        self.held.clear();
        self.held_chars = 0;
        self.block_judged = 0;
        self.block_released = 0;
        self.finishing = false;
    }

    fn held_text(&self) -> String {
        self.held
            .iter()
            .filter_map(|h| match h {
                Held::Text { text, .. } => Some(text.as_str()),
                Held::Event(_) => None,
            })
            .collect()
    }

    /// The open text block (or the message) ends: its last window, however short, is
    /// judged, and once it passes everything held goes out. Returns the window to judge
    /// first; `None` when nothing waits for a verdict (nothing held, or nothing left to
    /// judge, released at once).
    fn end_text(&mut self) -> Option<String> {
        if self.held.is_empty() {
            return None;
        }
        self.finishing = true;
        self.next_window()
    }

    /// The next window of the open text block to judge: window `k` covers its characters
    /// `[k * hold_back - context_chars, (k + 1) * hold_back)`, asked for once all of them
    /// have come (the last one when the block ends), so the windows are
    /// `review::output_windows`'s whatever the deltas were. A window of white space only
    /// passes unjudged, as there.
    fn next_window(&mut self) -> Option<String> {
        let size = self.windows.hold_back.max(1);
        loop {
            let received = self.block_released + self.held_chars;
            let unjudged = received - self.block_judged;
            if unjudged == 0 && self.finishing {
                self.release_rest();
                return None;
            }
            if unjudged == 0 || (unjudged < size && !self.finishing) {
                return None;
            }
            let end = (self.block_judged + size).min(received);
            let start = self
                .block_judged
                .saturating_sub(self.windows.context_chars)
                .saturating_sub(self.block_released);
            let text = self.held_text();
            let window =
                &text[char_byte(&text, start)..char_byte(&text, end - self.block_released)];
            if window.trim().is_empty() {
                self.passed(end);
                continue;
            }
            self.judging_end = end;
            return Some(window.to_string());
        }
    }

    /// The window ending at `end` passed: what no later window holds goes out (all of
    /// it when that was the block's last window).
    fn passed(&mut self, end: usize) {
        self.block_judged = end;
        if self.finishing && end == self.block_released + self.held_chars {
            self.release_rest();
            return;
        }
        let upto = end.saturating_sub(self.windows.context_chars);
        if upto > self.block_released {
            let text = self.held_text();
            let cut = char_byte(&text, upto - self.block_released);
            self.release_judged(&text, cut, false);
        }
    }

    /// The block's text is all judged: everything held goes out.
    fn release_rest(&mut self) {
        if !self.held.is_empty() {
            let text = self.held_text();
            self.release_judged(&text, text.len(), true);
        }
        self.block_judged = 0;
        self.block_released = 0;
        self.finishing = false;
    }

    /// Releases the held `text` (judged) up to byte `cut` (all of it when `all`: the
    /// block has ended): consecutive text pieces as one delta, other events as they came;
    /// what follows the cut stays held, in order.
    fn release_judged(&mut self, text: &str, cut: usize, all: bool) {
        let (cut, hits) = self.redaction_cut(text, cut, all);
        for h in hits.iter().filter(|h| h.start < cut) {
            self.meta.note_redacted("output", &h.kind, 1);
        }
        let held = std::mem::take(&mut self.held);
        let mut offset = 0;
        let mut pending: Option<(u64, String)> = None;
        for item in held {
            // Text from the cut on stays held, and so does everything after it; an event
            // right after released text goes out with it.
            let stays = match &item {
                Held::Text { .. } => offset >= cut,
                Held::Event(_) => offset > cut,
            };
            if stays || !self.held.is_empty() {
                self.held.push(item);
                continue;
            }
            match item {
                Held::Text { index, text: piece } => {
                    let (now, later) = piece.split_at((cut - offset).min(piece.len()));
                    let now = if hits.is_empty() {
                        now.to_string()
                    } else {
                        detect::mask_range(text, &hits, offset, offset + now.len())
                    };
                    offset += piece.len();
                    self.open_has_text |= !now.trim().is_empty();
                    match &mut pending {
                        Some((i, t)) if *i == index => t.push_str(&now),
                        _ => {
                            if let Some((i, t)) = pending.take() {
                                self.outbox.push(text_delta(i, &t));
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
                        self.outbox.push(text_delta(i, &t));
                    }
                    self.outbox.push(raw);
                }
            }
        }
        if let Some((i, t)) = pending.take() {
            self.outbox.push(text_delta(i, &t));
        }
        let released = &text[..cut];
        let released_chars = released.chars().count();
        self.released_chars += released_chars;
        self.block_released += released_chars;
        self.held_chars -= released_chars;
        self.context.push_str(released);
        self.context = review::tail(&self.context, self.windows.context_chars).to_string();
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
    fn redacted_tool_input(&mut self, index: u64, mut json: String) -> Bytes {
        if let Some(constitution) = self.redactor.clone() {
            match serde_json::from_str::<Value>(if json.is_empty() { "{}" } else { &json }) {
                Ok(mut input) => {
                    let mut meta = self.meta.clone();
                    let changed = messages::redact_strings(
                        &mut input,
                        "tool_use",
                        &mut super::super::masker(&constitution, &mut meta),
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
            "index": index,
            "delta": {"type": "input_json_delta", "partial_json": json},
        }))
    }

    /// Ends the stream with the refusal notice: the held text dropped, the open block
    /// closed, a notice block, `message_delta` (`stop_reason: "refusal"`), `message_stop`.
    fn block(&mut self, refusal: impl FnOnce(&Charter) -> String) {
        let withheld = self.held_chars;
        self.drop_held();
        self.pending = None;
        self.meta.action = ActionTaken::Block;
        self.meta.failed = Some("output");
        self.finish_with("blocked", withheld);
        let open = match &self.state {
            State::Text { index } | State::ToolInput { index, .. } | State::Passing { index } => {
                Some(*index)
            }
            State::Starting | State::Between | State::Ended(_) => None,
        };
        let empty_text = matches!(self.state, State::Text { .. }) && !self.open_has_text;
        self.state = State::Ended(End::Blocked);
        let refusal = refusal(&self.meta);
        let mut events = Vec::new();
        match open {
            // The open text block is still empty: the notice becomes its text.
            Some(index) if empty_text => {
                events.push(json!({"type": "content_block_delta", "index": index,
                                   "delta": {"type": "text_delta", "text": refusal}}));
                events.push(json!({"type": "content_block_stop", "index": index}));
            }
            Some(index) => {
                events.push(json!({"type": "content_block_stop", "index": index}));
                events.extend(messages::notice_block_events(self.next_index, &refusal));
            }
            None => events.extend(messages::notice_block_events(self.next_index, &refusal)),
        }
        // Upstream billed what it generated before the hang-up, not the count its
        // message_start carried (1): an estimate from what came, never below its count.
        let output_tokens = self.output_tokens.max(self.generated.tokens());
        events.extend(messages::end_events(output_tokens, "refusal", &self.meta));
        self.outbox.extend(events.iter().map(sse::event));
    }

    fn finish(&mut self, ended: &str) {
        self.finish_with(ended, self.held_chars);
    }

    /// Completes the metadata and makes the output's audit record (once; none when no
    /// text was evaluated).
    fn finish_with(&mut self, ended: &str, withheld_chars: usize) {
        if self.recorded {
            return;
        }
        self.recorded = true;
        self.meta.released_chars = Some(self.released_chars);
        let Some(result) = &self.merged else {
            return;
        };
        self.meta.checked.push("output");
        let context = json!({
            "part": "output",
            "stream": true,
            "checked": "every text block, in the windows of the non-streaming check",
            "windows": self.judged_windows,
            "hold_back_chars": self.windows.hold_back,
            "context_chars": self.windows.context_chars,
            "checked_chars": self.checked_chars,
            "released_chars": self.released_chars,
            "withheld_chars": withheld_chars,
            "action": self.meta.action.as_str(),
            "ended": ended,
            "output_tokens_reported": self.output_tokens,
            "output_tokens_estimated": self.generated.tokens(),
        });
        self.record = Some(OutputRecord {
            result: result.clone(),
            text: self.checked_text.clone(),
            chars: self.checked_chars,
            windows: self.judged_windows,
            latency_ms: self.eval_ms,
            context,
        });
    }
}

/// The byte offset of character `n` of `text` (its length when `n` is past the end).
fn char_byte(text: &str, n: usize) -> usize {
    text.char_indices().nth(n).map_or(text.len(), |(i, _)| i)
}

fn text_delta(index: u64, text: &str) -> Bytes {
    sse::event(&json!({
        "type": "content_block_delta",
        "index": index,
        "delta": {"type": "text_delta", "text": text},
    }))
}
