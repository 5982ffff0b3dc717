//! The Anthropic Messages proxy's routes: `POST /v1/messages` (query string kept, e.g.
//! `?beta=true`), and `POST /v1/messages/count_tokens`, `GET /v1/models`,
//! `GET /v1/models/{id}` passed through. They have their own limits: request bodies up to
//! `gateway.body_limit_bytes`, deadlines from `gateway.*_timeout_secs` (not the API's
//! `server.request_timeout_secs`: model answers take minutes), errors in the Anthropic
//! shape. The proxy's logic is [`crate::gateway`]'s.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tower_http::catch_panic::CatchPanicLayer;

use super::auth::Shape;
use crate::auth::{Caller, Scope};
use crate::gateway::{self, error::GatewayError};
use crate::state::AppState;

/// The gateway routes, with their own limits and error shape, behind a key with the
/// `gateway` scope (in `x-charter-key`) where keys are required.
pub fn router(state: AppState) -> Router {
    let routes = Router::new()
        .route("/v1/messages", post(messages))
        .route("/v1/messages/count_tokens", post(passthrough))
        .route("/v1/models", get(passthrough))
        .route("/v1/models/{id}", get(passthrough));
    super::auth::guarded(routes, &state, Some(Scope::Gateway), Shape::Gateway)
        .with_state(state)
        .layer(CatchPanicLayer::custom(|_| {
            GatewayError::Internal("gateway handler panicked".into()).into_response()
        }))
}

/// `count_tokens` and `models`: no model output, so the request and the answer cross
/// untouched.
async fn passthrough(State(state): State<AppState>, request: Request) -> Response {
    let deadline = Duration::from_secs(state.config().gateway.request_timeout_secs);
    match tokio::time::timeout(deadline, gateway::passthrough(state.gateway(), request)).await {
        Ok(Ok(response)) => response,
        Ok(Err(err)) => err.into_response(),
        Err(_) => GatewayError::UpstreamTimeout.into_response(),
    }
}

#[tracing::instrument(skip_all, fields(stream, constitution, action))]
async fn messages(
    State(state): State<AppState>,
    caller: Option<axum::Extension<Arc<Caller>>>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let caller = super::auth::caller(caller);
    // A gateway exchange is one text for the key's text rate.
    let texts = match caller.take_texts(1) {
        Ok(state) => state,
        Err(denied) => return GatewayError::from(denied).into_response(),
    };
    let deadline = Duration::from_secs(state.config().gateway.request_timeout_secs);
    let gw = std::sync::Arc::clone(state.gateway());
    let exchange = gateway::exchange(gw, || state.engine(), &caller, uri, headers, body);
    let mut response = match tokio::time::timeout(deadline, exchange).await {
        Ok(Ok(response)) => response,
        Ok(Err(err)) => err.into_response(),
        Err(_) => GatewayError::UpstreamTimeout.into_response(),
    };
    if let Some(texts) = texts {
        super::auth::rate_headers(response.headers_mut(), &texts);
    }
    tracing::debug!(
        status = response.status().as_u16(),
        duration_ms = started.elapsed().as_millis() as u64,
        "gateway exchange answered"
    );
    response
}
