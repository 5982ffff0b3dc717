//! The Claude gateway: a drop-in Anthropic Messages API proxy that screens prompts,
//! evaluates outputs against a constitution and acts on violations (flag, block, or
//! critique-and-revise), streaming included.
//!
//! Routes: `POST /v1/messages` (query string kept, e.g. `?beta=true`);
//! `POST /v1/messages/count_tokens`, `GET /v1/models`, `GET /v1/models/{id}` pass through
//! verbatim. The client's body is forwarded as its bytes; headers cross as
//! [`upstream`] says. Upstream errors reach the client unchanged (the SDKs retry them
//! themselves; the gateway never retries). The gateway's own errors use the Anthropic
//! error shape ([`error`]).
//!
//! A `/v1/messages` exchange: pick the constitution (`x-charter-constitution` header, else
//! the Charter key's default, else `gateway.constitution_by_key[key id]`, else
//! `gateway.constitution`, else the default; one the Charter key may use);
//! screen the last user turn (and the system prompt if configured) and answer a violating
//! prompt with a refusal without calling upstream; forward; evaluate the output text
//! ([`review`]); act by the strictest violated rule's action ([`revise`] for revise;
//! for redact, mask what the constitution's redact rules find in the text blocks and tool
//! inputs); stream through [`stream`], which releases text only once evaluated (and,
//! with redact rules, only up to where no identifier can be cut in two, masked). With
//! `gateway.redact_prompts` the last user turn is masked before it goes upstream. Every
//! evaluation is handed to the audit sink before its outcome reaches the client; the
//! outcome is in the `x-charter-*` headers and the message's extra `charter` field
//! ([`messages::Charter`]).
//!
//! Owns: the proxy's logic and its service (configuration, audit sink, one shared upstream
//! client); the routes and deadlines are in `http::messages`. Must not: run the model (the
//! engine's queue does), retry upstream calls, log keys, or know the application state.

pub mod error;
pub mod messages;
mod review;
mod revise;
pub mod sse;
mod stream;
pub mod upstream;

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::audit::{AuditRecord, AuditSink, Origin, Source};
use crate::auth::Caller;
use crate::config::Config;
use crate::constitution::{Constitution, ConstitutionRef};
use crate::engine::{Engine, ErrorClass};
use crate::evaluate::{Kind, TextResult, Verdict};
use crate::ids::{client_key_id, new_id, REQUEST_ID};

use error::GatewayError;
use messages::{ActionTaken, Charter, RequestView};
use review::{Checked, Decision};
use upstream::{Upstream, CONSTITUTION_HEADER};

/// The gateway's service: its configuration, where audit records go, and the one shared
/// upstream client. Built once with the application state.
pub struct Gateway {
    config: Config,
    audit: Arc<dyn AuditSink>,
    upstream: Upstream,
}

impl Gateway {
    pub fn new(config: Config, audit: Arc<dyn AuditSink>) -> Self {
        // Only the TLS backend can fail to build, and rustls with bundled roots does not.
        let upstream = Upstream::new(&config.gateway).expect("the upstream HTTP client builds");
        Gateway {
            config,
            audit,
            upstream,
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Where audit records go.
    pub fn audit(&self) -> &dyn AuditSink {
        self.audit.as_ref()
    }
}

/// What one `/v1/messages` exchange carries through screening, forwarding and review.
pub struct Exchange {
    gw: Arc<Gateway>,
    engine: Arc<Engine>,
    /// Evaluation id (`eval_...`); audit records are `<id>.<part>`.
    id: String,
    key_id: Option<String>,
    constitution: String,
    model: String,
    max_tokens: u64,
    user_text: Option<String>,
    upstream_headers: HeaderMap,
    path_and_query: String,
    request_id: String,
}

/// `count_tokens` and `models`: no model output, so the request and the answer cross
/// untouched (headers as [`upstream`] says; bodies as bytes, streamed back).
pub async fn passthrough(gw: &Gateway, request: Request) -> Result<Response, GatewayError> {
    let (parts, body) = request.into_parts();
    let bytes = read_body(body, gw.config.gateway.body_limit_bytes).await?;
    let headers = gw.upstream.request_headers(&parts.headers, true);
    let body = (parts.method != Method::GET || !bytes.is_empty()).then_some(bytes);
    let response = gw
        .upstream
        .send(
            parts.method.clone(),
            path_and_query(&parts.uri),
            headers,
            body,
        )
        .await?;
    Ok(relay(response, &[]))
}

/// One `/v1/messages` exchange: read, screen, forward, review, act. `engine` answers the
/// engine once it has loaded; it is asked only when the exchange needs it (503 before).
pub async fn exchange(
    gw: Arc<Gateway>,
    engine: impl FnOnce() -> Option<Arc<Engine>>,
    caller: &Caller,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, GatewayError> {
    let config = &gw.config().gateway;
    if !crate::ids::is_json(headers.get(header::CONTENT_TYPE)) {
        return Err(GatewayError::UnsupportedMediaType);
    }
    let bytes = read_body(body, config.body_limit_bytes).await?;
    let value: Value = serde_json::from_slice(&bytes).map_err(|e| {
        GatewayError::InvalidRequest(format!("the request body is not valid JSON: {e}"))
    })?;
    let history = if config.screen_prompts {
        config.screen_history
    } else {
        0
    };
    let view = messages::read_request(&value, history).map_err(GatewayError::InvalidRequest)?;
    drop(value);
    let span = tracing::Span::current();
    span.record("stream", view.stream);
    let upstream_headers = gw.upstream.request_headers(&headers, false);
    let path_and_query = path_and_query(&uri).to_string();

    if !config.screen_prompts && !config.evaluate_output && !config.redact_prompts {
        let response = gw
            .upstream
            .send(Method::POST, &path_and_query, upstream_headers, Some(bytes))
            .await?;
        return Ok(relay(response, &[]));
    }

    let engine = engine().ok_or(GatewayError::NotReady)?;
    let constitution = select_constitution(&gw, &engine, &headers, caller)?;
    span.record("constitution", constitution.id.as_str());
    let ex = Exchange {
        engine,
        id: new_id(),
        // The Charter key's id; without one, the id of the Anthropic key sent upstream.
        key_id: caller.key_id.clone().or_else(|| client_key_id(&headers)),
        constitution: constitution.id.clone(),
        model: view.model.clone().unwrap_or_default(),
        max_tokens: view.max_tokens.unwrap_or(1024),
        user_text: view.last_user_text.clone(),
        upstream_headers,
        path_and_query,
        request_id: headers
            .get(REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string(),
        gw: Arc::clone(&gw),
    };
    let mut meta = Charter::new(ex.id.clone(), constitution);

    if config.screen_prompts {
        if let Some(response) = screen(&ex, &view, &mut meta).await? {
            span.record("action", "block");
            return Ok(response);
        }
    }

    let bytes = if config.redact_prompts {
        redact_prompt(&ex, bytes, &mut meta)?
    } else {
        bytes
    };

    let response = gw
        .upstream
        .send(
            Method::POST,
            &ex.path_and_query,
            ex.upstream_headers.clone(),
            Some(bytes),
        )
        .await?;
    if let Some(failure) = error::upstream_failure(response.status(), response.headers()) {
        tracing::info!(
            status = failure.status,
            kind = failure.kind,
            retryable = failure.retryable,
            "upstream error passed through"
        );
        return Ok(relay(response, &[]));
    }

    if view.stream {
        let is_sse = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("text/event-stream"));
        if !config.evaluate_output || !is_sse {
            return Ok(relay(response, &meta.headers()));
        }
        return Ok(stream::guard(ex, response, meta));
    }
    answer(&ex, response, meta).await
}

impl Exchange {
    /// Hands the evaluation of one `part` of the exchange (`prompt`, `system`, `output`,
    /// `revision1`, ...) to the audit sink, before the client sees its outcome; the
    /// record's id is `<exchange id>.<part>`.
    fn record(&self, part: &str, kind: Kind, checked: &Checked, text: &str, context: Value) {
        let origin = Origin {
            source: Source::Gateway,
            client_key_id: self.key_id.clone(),
            constitution: checked.index.constitution(),
            model: &checked.model,
            kind,
            latency_ms: checked.latency_ms,
            context: Some(context),
        };
        let id = format!("{}.{part}", self.id);
        self.gw
            .audit()
            .record(AuditRecord::from_result(id, &origin, text, &checked.result));
    }

    /// The constitution the exchange is judged by.
    fn constitution(&self) -> Result<Arc<Constitution>, GatewayError> {
        let index = self
            .engine
            .constitution(Some(&self.constitution))
            .map_err(ErrorClass::from)?;
        Ok(Arc::clone(index.constitution()))
    }

    /// The answer to a blocked prompt or output: the refusal of the most severe violated
    /// rule that has one (in the file's order among equals), in the language of the
    /// user's turn, else the gateway's `refusal_message`.
    fn refusal(&self, meta: &Charter) -> String {
        let lang = language_of(self.user_text.as_deref().unwrap_or(""));
        let constitution = self.constitution().ok();
        let mut chosen: Option<&crate::constitution::Rule> = None;
        for rule in constitution.iter().flat_map(|c| &c.rules) {
            if meta.violated.contains(&rule.id)
                && !rule.refusal.is_empty()
                && chosen.is_none_or(|c| rule.severity > c.severity)
            {
                chosen = Some(rule);
            }
        }
        chosen
            .and_then(|r| r.refusal_in(lang))
            .map(str::to_string)
            .unwrap_or_else(|| self.gw.config().gateway.refusal_message.clone())
    }
}

/// Masks what the constitution's redact rules find in a string, noting kinds and counts
/// (never values) in the metadata; `None` when nothing was found.
fn masker<'a>(
    constitution: &'a Constitution,
    meta: &'a mut Charter,
) -> impl FnMut(&str, &'static str) -> Option<String> + 'a {
    move |text, part| {
        let hits = constitution.redactions(text);
        if hits.is_empty() {
            return None;
        }
        let mut counts = std::collections::BTreeMap::<&str, usize>::new();
        for h in &hits {
            *counts.entry(h.kind.as_str()).or_default() += 1;
        }
        for (kind, count) in counts {
            meta.note_redacted(part, kind, count);
        }
        Some(crate::detect::mask(text, &hits))
    }
}

/// `gateway.redact_prompts`: the request with what the redact rules find in the last
/// user turn masked (the client's bytes when nothing was found).
fn redact_prompt(ex: &Exchange, bytes: Bytes, meta: &mut Charter) -> Result<Bytes, GatewayError> {
    let constitution = ex.constitution()?;
    if !constitution.redacts() {
        return Ok(bytes);
    }
    let mut value: Value = serde_json::from_slice(&bytes).map_err(|e| {
        GatewayError::InvalidRequest(format!("the request body is not valid JSON: {e}"))
    })?;
    if !messages::redact_last_user_turn(&mut value, &mut masker(&constitution, meta)) {
        return Ok(bytes);
    }
    let body = serde_json::to_vec(&value).map_err(|e| GatewayError::Internal(e.to_string()))?;
    Ok(body.into())
}

/// Masks a message's text blocks and tool inputs; the body to send when it changed.
fn redact_output(
    message: &mut Value,
    constitution: &Constitution,
    meta: &mut Charter,
) -> Result<Option<Vec<u8>>, GatewayError> {
    let mut charter = meta.clone();
    let changed = messages::redact_content(message, &mut masker(constitution, &mut charter));
    if !changed {
        return Ok(None);
    }
    *meta = charter;
    message["charter"] = json!(meta);
    serde_json::to_vec(message)
        .map(Some)
        .map_err(|e| GatewayError::Internal(e.to_string()))
}

/// A non-streaming answer: read it whole, review it when configured, and answer with the
/// upstream status and headers, the `x-charter-*` headers and the body to send.
async fn answer(
    ex: &Exchange,
    response: reqwest::Response,
    mut meta: Charter,
) -> Result<Response, GatewayError> {
    let config = &ex.gw.config().gateway;
    let status = response.status();
    let upstream_headers = upstream::forward_response_headers(response.headers(), true);
    let body = read_limited(response, config.max_response_bytes).await?;
    let (body, action) = if config.evaluate_output {
        review_output(ex, &body, &mut meta).await?
    } else {
        let body = messages::with_charter_field(&body, &meta).ok_or_else(|| {
            GatewayError::UpstreamProtocol("the response is not a JSON object".into())
        })?;
        (body, meta.action)
    };
    tracing::Span::current().record("action", action.as_str());
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    *response.headers_mut() = upstream_headers;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    add_headers(&mut response, &meta.headers());
    Ok(response)
}

/// The constitution for a request: header, else the Charter key's default, else key map,
/// else gateway default, else the engine default; one the Charter key may use (403). An
/// unknown id in the header is the client's error (400); in the configuration it is ours
/// (500).
fn select_constitution(
    gw: &Gateway,
    engine: &Engine,
    headers: &HeaderMap,
    caller: &Caller,
) -> Result<ConstitutionRef, GatewayError> {
    let config = &gw.config().gateway;
    let from_header = headers
        .get(CONSTITUTION_HEADER)
        .map(|v| {
            v.to_str().map(|s| s.trim().to_string()).map_err(|_| {
                GatewayError::InvalidRequest(format!("{CONSTITUTION_HEADER} is not text"))
            })
        })
        .transpose()?
        .filter(|s| !s.is_empty());
    if let Some(id) = &from_header {
        caller.permit(id)?;
    }
    let (id, by_client) = match from_header {
        Some(id) => (Some(id), true),
        None => {
            // The key's default (when it has one) is one it may use.
            let by_key = caller.constitution_for(None).or_else(|| {
                client_key_id(headers).and_then(|key| config.constitution_by_key.get(&key).cloned())
            });
            (by_key.or_else(|| config.constitution.clone()), false)
        }
    };
    let index = engine
        .constitution(id.as_deref())
        .map_err(|err| match ErrorClass::from(err) {
            ErrorClass::UnknownConstitution(id) if by_client => {
                GatewayError::InvalidRequest(format!(
                    "{CONSTITUTION_HEADER}: no constitution with id {id:?}; GET /v1/constitutions lists them"
                ))
            }
            ErrorClass::UnknownConstitution(id) => GatewayError::Internal(format!(
                "gateway configuration names unknown constitution {id:?}"
            )),
            class @ (ErrorClass::Overloaded { .. }
            | ErrorClass::OverShare { .. }
            | ErrorClass::Stopped
            | ErrorClass::Internal(_)) => {
                class.into()
            }
        })?;
    caller.permit(&index.constitution().id)?;
    Ok(index.constitution().reference())
}

/// Screens the last user turn (and, when configured, the system prompt and the last
/// `screen_history` earlier user turns with the new input, as one text). A prompt that
/// breaks a block or revise rule is answered here, without calling upstream.
async fn screen(
    ex: &Exchange,
    view: &RequestView,
    meta: &mut Charter,
) -> Result<Option<Response>, GatewayError> {
    let config = ex.gw.config();
    let max_chars = config.limits.max_text_chars;
    // Earlier turns and the new one read as one text: a request spread over turns, or
    // one turn's harm that the next builds on, is seen whole.
    let history = (!view.earlier_user_texts.is_empty()).then(|| {
        let mut turns = view.earlier_user_texts.clone();
        turns.extend(view.last_user_text.clone());
        turns.join("\n\n")
    });
    let mut parts: Vec<(&'static str, &str)> = Vec::new();
    if let Some(text) = &view.last_user_text {
        parts.push(("prompt", text));
    }
    if let Some(text) = &history {
        parts.push(("history", text));
    }
    if config.gateway.screen_system {
        if let Some(text) = &view.system_text {
            parts.push(("system", text));
        }
    }
    let mut decision = Decision::Pass;
    for (part, full) in parts {
        let what = match part {
            "history" => format!(
                "the last {} earlier user turns and the last user turn",
                view.earlier_user_texts.len()
            ),
            "system" => "the system prompt's text".to_string(),
            _ => "text blocks and tool results of the last user turn".to_string(),
        };
        // Long prompts are screened by their end, where the request usually is; the
        // audit record says how much was checked.
        let text = review::tail(full, max_chars);
        let checked = review::check(&ex.gw, &ex.engine, text, &ex.constitution).await?;
        let this = review::decide(&checked.result).for_prompt();
        ex.record(
            part,
            Kind::Prompt,
            &checked,
            text,
            json!({
                "part": part,
                "checked": what,
                "chars": full.chars().count(),
                "checked_chars": checked.chars,
                "decision": format!("{this:?}").to_lowercase(),
                "stream": view.stream,
                "request_id": ex.request_id,
            }),
        );
        meta.checked.push(part);
        note_violations(meta, &checked.result);
        if this != Decision::Pass && meta.failed.is_none() {
            meta.failed = Some(part);
        }
        if this == Decision::Block {
            decision = Decision::Block;
        } else if matches!(this, Decision::Flag | Decision::Redact) && decision == Decision::Pass {
            decision = Decision::Flag;
        }
    }
    match decision {
        Decision::Block => {
            meta.action = ActionTaken::Block;
            let refusal = &ex.refusal(meta);
            let id = messages::new_message_id();
            let response = if view.stream {
                let events = messages::refusal_events(&id, &ex.model, refusal, meta);
                let body: Vec<u8> = events.iter().flat_map(|e| sse::event(e).to_vec()).collect();
                sse_response(StatusCode::OK, HeaderMap::new(), Body::from(body))
            } else {
                let message = messages::refusal_message(&id, &ex.model, refusal, meta);
                axum::Json(message).into_response()
            };
            let mut response = response;
            add_headers(&mut response, &meta.headers());
            Ok(Some(response))
        }
        Decision::Flag => {
            meta.action = ActionTaken::Flag;
            Ok(None)
        }
        // A prompt is masked, if at all, by `gateway.redact_prompts`; here it is a flag.
        Decision::Redact => {
            meta.action = ActionTaken::Flag;
            Ok(None)
        }
        Decision::Pass | Decision::Revise => Ok(None),
    }
}

/// `zh` when Chinese characters are at least half as many as Latin letters (and present),
/// else `en`: enough to answer a user in the language they wrote in.
fn language_of(text: &str) -> &'static str {
    let (mut han, mut latin) = (0usize, 0usize);
    for c in text.chars() {
        if ('\u{4e00}'..='\u{9fff}').contains(&c) || ('\u{3400}'..='\u{4dbf}').contains(&c) {
            han += 1;
        } else if c.is_ascii_alphabetic() {
            latin += 1;
        }
    }
    if han > 0 && 2 * han >= latin {
        "zh"
    } else {
        "en"
    }
}

/// Adds a check's violated rules to the metadata (and turns the verdict to fail).
fn note_violations(meta: &mut Charter, result: &TextResult) {
    for rule in result.violated() {
        meta.verdict = Verdict::Fail;
        if !meta.violated.contains(&rule.id) {
            meta.violated.push(rule.id.clone());
        }
    }
}

/// Evaluates a non-streaming answer and acts on it; returns the body for the client.
async fn review_output(
    ex: &Exchange,
    body: &[u8],
    meta: &mut Charter,
) -> Result<(Vec<u8>, ActionTaken), GatewayError> {
    let message: Value = serde_json::from_slice(body)
        .map_err(|e| GatewayError::UpstreamProtocol(format!("the response is not JSON: {e}")))?;
    if !messages::is_message(&message) {
        return Err(GatewayError::UpstreamProtocol(
            "the response is not a message".into(),
        ));
    }
    let text = messages::response_text(&message);
    let constitution = ex.constitution()?;
    if text.trim().is_empty() {
        // Tool calls or thinking only: no text to evaluate, tool inputs to mask.
        let body = match redact_output(&mut message.clone(), &constitution, meta)? {
            Some(body) => body,
            None => messages::with_charter_field(body, meta)
                .ok_or_else(|| GatewayError::UpstreamProtocol("not a JSON object".into()))?,
        };
        return Ok((body, meta.action));
    }
    let blocks = messages::response_text_blocks(&message);
    let checked = review::check_output(&ex.gw, &ex.engine, &blocks, &ex.constitution).await?;
    let decision = review::decide(&checked.result);
    meta.checked.push("output");
    note_violations(meta, &checked.result);
    if decision != Decision::Pass && meta.failed.is_none() {
        meta.failed = Some("output");
    }
    let record = |meta: &Charter, checked: &Checked| {
        ex.record(
            "output",
            Kind::Response,
            checked,
            &text,
            json!({
                "part": "output",
                "stream": false,
                "checked": "every text block of the response, in windows",
                "checked_chars": checked.chars,
                "chunks": checked.chunks,
                "action": meta.action.as_str(),
                "revise_rounds": meta.revise_rounds,
                "extra_usage": meta.extra_usage,
                "note": meta.note,
                "upstream_message_id": message["id"],
                "request_id": ex.request_id,
            }),
        )
    };
    let out = match decision {
        Decision::Pass | Decision::Flag | Decision::Redact => {
            if decision == Decision::Flag {
                meta.action = ActionTaken::Flag;
            }
            // Masked before the record, so the record's action is the one taken.
            let redacted = redact_output(&mut message.clone(), &constitution, meta)?;
            record(meta, &checked);
            match redacted {
                Some(body) => body,
                None => messages::with_charter_field(body, meta)
                    .ok_or_else(|| GatewayError::UpstreamProtocol("not a JSON object".into()))?,
            }
        }
        Decision::Block => {
            meta.action = ActionTaken::Block;
            record(meta, &checked);
            let refusal = ex.refusal(meta);
            serde_json::to_vec(&messages::blocked_response(message.clone(), &refusal, meta))
                .map_err(|e| GatewayError::Internal(e.to_string()))?
        }
        Decision::Revise => {
            let outcome = revise::run(ex, &text, &checked).await?;
            meta.revise_tried = true;
            meta.revise_rounds = outcome.rounds;
            meta.extra_usage = outcome.extra_usage;
            meta.note = outcome.note;
            let out = match outcome.revision {
                Some((revision, stop_reason, _)) => {
                    meta.action = ActionTaken::Revise;
                    let mut out =
                        messages::revised_response(message.clone(), &revision, &stop_reason, meta);
                    // The revision, and the tool inputs kept, are masked like any answer.
                    redact_output(&mut out, &constitution, meta)?;
                    record(meta, &checked);
                    out["charter"] = json!(meta);
                    out
                }
                None => {
                    meta.action = ActionTaken::Block;
                    record(meta, &checked);
                    messages::blocked_response(message.clone(), &ex.refusal(meta), meta)
                }
            };
            serde_json::to_vec(&out).map_err(|e| GatewayError::Internal(e.to_string()))?
        }
    };
    Ok((out, meta.action))
}

fn path_and_query(uri: &Uri) -> &str {
    uri.path_and_query().map(|p| p.as_str()).unwrap_or("/")
}

/// Reads a client body up to `limit` bytes (413 above it).
async fn read_body(body: Body, limit: usize) -> Result<Bytes, GatewayError> {
    axum::body::to_bytes(body, limit).await.map_err(|err| {
        let too_large = std::error::Error::source(&err)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if too_large {
            GatewayError::BodyTooLarge
        } else {
            GatewayError::InvalidRequest(format!("could not read the request body: {err}"))
        }
    })
}

/// Reads an upstream body up to `limit` bytes.
pub(crate) async fn read_limited(
    response: reqwest::Response,
    limit: usize,
) -> Result<Bytes, GatewayError> {
    let mut out = Vec::new();
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(upstream::transport_error)?;
        if out.len() + chunk.len() > limit {
            return Err(GatewayError::UpstreamProtocol(format!(
                "the upstream response is larger than {limit} bytes"
            )));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out.into())
}

/// The upstream answer as it came: status, headers (minus hop-by-hop ones), body streamed.
fn relay(response: reqwest::Response, extra: &[(&'static str, String)]) -> Response {
    let status = response.status();
    let headers = upstream::forward_response_headers(response.headers(), false);
    let mut out = Response::new(Body::from_stream(response.bytes_stream()));
    *out.status_mut() = status;
    *out.headers_mut() = headers;
    add_headers(&mut out, extra);
    out
}

fn sse_response(status: StatusCode, headers: HeaderMap, body: Body) -> Response {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

fn add_headers(response: &mut Response, extra: &[(&'static str, String)]) {
    for (name, value) in extra {
        if let Ok(value) = HeaderValue::from_str(value) {
            response
                .headers_mut()
                .insert(HeaderName::from_static(name), value);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_language_is_the_one_most_written_in() {
        assert_eq!(super::language_of("我不想活了"), "zh");
        assert_eq!(super::language_of("请帮我 debug 这段 code"), "zh");
        assert_eq!(super::language_of("Translate 你好 into French"), "en");
        assert_eq!(super::language_of("I want to end it"), "en");
        assert_eq!(super::language_of(""), "en");
    }
}
