//! Guarded streaming: upstream events in, events out, and no output text reaches the
//! client before it has been evaluated.
//!
//! Text deltas are held back (with any event that arrives between them, so order is kept)
//! and judged in exactly the windows the non-streaming check judges the same text in
//! (`review::output_windows`): within each text block, window `k` covers characters
//! `[k * hold_back_chars - context_chars, (k + 1) * hold_back_chars)`; it is judged as
//! soon as its last character has come (the block's last, shorter window when the block
//! ends). Where a window falls depends only on character offsets, so the windows, their
//! verdicts and the stream's verdict are the same whatever sizes upstream's deltas have,
//! and the same as the non-streaming verdict on the same answer. A character goes out only
//! once every window that holds it has passed: after window `k` passes, the text before
//! `(k + 1) * hold_back_chars - context_chars` (the next window's context stays held),
//! and all of it after the block's last window. So no released character lies in a window
//! that fails. The windows hold `1 + context_chars / hold_back_chars` times the output's
//! characters (1.5 with the defaults), each embedded once: the cost is linear in the
//! output. Fewer than `hold_back_chars + context_chars` characters plus one delta are
//! held (and, with redact rules, what `detect::release_point` keeps back).
//! Thinking and tool-use blocks pass as they come.
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
//! added (or, when no text went out in the open text block, the notice becomes its text:
//! an empty text block would make the client's next turn invalid), then `message_delta`
//! with `stop_reason: "refusal"` and an output token count no lower than an estimate of
//! what upstream generated, and `message_stop`, and upstream is hung up on. Exactly one `message_start` reaches the client, and every
//! stream ends with `message_stop` or an `error` event (upstream `error` events are passed
//! on; a cut connection, an unreadable event or a failed evaluation become one), never a
//! bare close. The audit record of the output (what was checked, released and withheld)
//! is handed to the sink before the final events are sent.
//!
//! The decisions live in a state machine (`machine.rs`: states `Starting`, `Between`,
//! `Text`, `ToolInput`, `Passing`, `Ended`; one method per transition; no I/O) with a unit
//! test per transition (`tests.rs`). This file is its driver: it reads upstream, has the
//! engine judge the windows the machine asks for, records the outcome and sends what the
//! machine queued.

mod machine;
#[cfg(test)]
mod tests;

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::StatusCode;
use axum::response::Response;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tracing::Instrument;

use super::messages::Charter;
use super::review;
use super::sse::SseParser;
use super::{add_headers, sse_response, upstream, Exchange};
use crate::evaluate::{Index, Kind};
use machine::{Event, Judgement, Machine, OutputRecord, Step, WindowSizes};

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
    let windows = WindowSizes {
        hold_back: config.hold_back_chars,
        context_chars: config.context_chars,
    };
    let guard = Guard {
        machine: Machine::new(meta, windows, redactor),
        ex,
        tx,
        index: None,
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

/// The driver: reads upstream, has the engine judge the windows the machine asks for,
/// records the outcome and sends what the machine queued.
struct Guard {
    machine: Machine,
    ex: Exchange,
    tx: mpsc::Sender<Bytes>,
    /// The index and model of the last judged window, for the audit record.
    index: Option<(Arc<Index>, Arc<str>)>,
}

impl Guard {
    async fn run(mut self, response: reqwest::Response) {
        let mut body = response.bytes_stream();
        let hold_back = self.ex.gw.config().gateway.hold_back_chars;
        let mut parser = SseParser::new(MAX_EVENT_BYTES.max(hold_back * 8));
        loop {
            // A client that hangs up stops the upstream read at once (and so the
            // generation upstream), not at the next event.
            let next = tokio::select! {
                chunk = body.next() => Some(chunk),
                _ = self.tx.closed() => None,
            };
            let Some(chunk) = next else {
                self.machine.client_gone();
                self.settle().await;
                return;
            };
            let chunk = match chunk {
                Some(Ok(chunk)) => chunk,
                Some(Err(err)) => {
                    let err = upstream::transport_error(err);
                    tracing::warn!(error = %err, "upstream stream failed");
                    // The Anthropic type of the gateway's own error (timeout or api).
                    let (_, kind, _) = err.parts();
                    self.machine
                        .fail("upstream_failed", kind, "the upstream stream failed");
                    self.settle().await;
                    return;
                }
                None => {
                    tracing::warn!(
                        partial_event = parser.has_partial(),
                        "upstream stream ended before message_stop"
                    );
                    self.machine.fail(
                        "upstream_ended_early",
                        "api_error",
                        "the upstream stream ended before message_stop",
                    );
                    self.settle().await;
                    return;
                }
            };
            let events = match parser.push(&chunk) {
                Ok(events) => events,
                Err(err) => {
                    tracing::warn!(error = %err, "unreadable upstream stream");
                    self.machine.fail(
                        "upstream_unreadable",
                        "api_error",
                        "the upstream stream could not be read",
                    );
                    self.settle().await;
                    return;
                }
            };
            for event in events {
                let step = self.machine.event(Event::parse(&event));
                if !self.drive(step).await {
                    return;
                }
            }
        }
    }

    /// Carries out `step` and the steps it leads to; false once the stream is over.
    async fn drive(&mut self, mut step: Step) -> bool {
        loop {
            if !self.settle().await {
                return false;
            }
            step = match step {
                Step::Read => return true,
                Step::Stop => return false,
                Step::Resume => self.machine.resume(),
                Step::Judge(window) => {
                    let ex = &self.ex;
                    let verdict = review::check_window(&ex.engine, &window, &ex.constitution)
                        .await
                        .map(|checked| {
                            self.index = Some((checked.index, checked.model));
                            Judgement {
                                result: checked.result,
                                latency_ms: checked.latency_ms,
                            }
                        });
                    self.machine.judged(verdict, |meta| ex.refusal(meta))
                }
            };
        }
    }

    /// Hands the outcome, when there is one, to the audit sink, then sends what the
    /// machine queued (so the record precedes the final events). False when the client
    /// is gone.
    async fn settle(&mut self) -> bool {
        if let Some(outcome) = self.machine.take_record() {
            self.record(outcome);
        }
        for bytes in self.machine.take_outbox() {
            if self.tx.send(bytes).await.is_err() {
                self.machine.client_gone();
                if let Some(outcome) = self.machine.take_record() {
                    self.record(outcome);
                }
                return false;
            }
        }
        true
    }

    fn record(&self, outcome: OutputRecord) {
        let Some((index, model)) = &self.index else {
            return;
        };
        let mut context = outcome.context;
        context["request_id"] = serde_json::json!(self.ex.request_id);
        let checked = review::Checked {
            index: Arc::clone(index),
            model: Arc::clone(model),
            result: outcome.result,
            chars: outcome.chars,
            chunks: outcome.windows,
            latency_ms: outcome.latency_ms,
        };
        self.ex
            .record("output", Kind::Response, &checked, &outcome.text, context);
    }
}
