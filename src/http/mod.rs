//! HTTP: connections (`conn`: the accept loop, its cap and timeouts), routes, the JSON
//! extractor, the one error mapping, and the tower-http layers (request ids, tracing,
//! timeouts, body limits, panics). Holds no rules logic: handlers
//! validate input, call the [`crate::engine::Engine`] and shape its results.

pub mod audit;
pub mod auth;
pub mod conn;
pub mod constitutions;
pub mod error;
pub mod evaluate;
pub mod extract;
pub mod health;
pub mod keys;
pub mod messages;

use std::time::Duration;

use axum::body::Body;
use axum::extract::DefaultBodyLimit;
use axum::http::{header, HeaderName, Request, Response, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::auth::Scope;
use crate::ids::REQUEST_ID;
use crate::state::AppState;
use auth::{guarded, Shape, KEY_HEADER};
use error::AppError;

/// The API's routes, each group behind the guard with the scope it needs (the probes
/// need none; the constitutions any key).
fn api_routes(state: &AppState) -> Router<AppState> {
    let scoped = |router, scope| guarded(router, state, scope, Shape::Api);
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .merge(scoped(
            Router::new().route("/v1/evaluate", post(evaluate::evaluate)),
            Some(Scope::Evaluate),
        ))
        .merge(scoped(
            Router::new()
                .route("/v1/constitutions", get(constitutions::list))
                .route("/v1/constitutions/{id}", get(constitutions::get)),
            None,
        ))
        .merge(scoped(
            Router::new()
                .route("/v1/evaluations", get(audit::list))
                .route("/v1/evaluations/{id}", get(audit::get))
                .route("/v1/stats", get(audit::stats)),
            Some(Scope::AuditRead),
        ))
        .merge(scoped(
            Router::new().route("/metrics", get(audit::metrics)),
            Some(Scope::Metrics),
        ))
        .merge(scoped(keys::router(), Some(Scope::Admin)))
}

/// The API routes with every layer applied.
pub fn router(state: AppState) -> Router {
    let config = state.config();
    let timeout = Duration::from_secs(config.server.request_timeout_secs);
    let body_limit = config.server.body_limit_bytes;
    let cors = cors_layer(config);
    let router = api_routes(&state)
        .fallback(not_found)
        .with_state(state.clone())
        // Innermost first: each `layer` wraps everything above it.
        .layer(RequestBodyLimitLayer::new(body_limit))
        .layer(DefaultBodyLimit::disable())
        .layer(TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, timeout))
        .layer(CatchPanicLayer::custom(|_| {
            AppError::Internal("handler panicked".into()).into_response()
        }))
        .layer(axum::middleware::map_response(shape_layer_errors))
        // The gateway's routes bring their own body limit, deadlines and error shape.
        .merge(messages::router(state))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(
            TraceLayer::new_for_http()
                // Error responses are logged where they arise (5xx once, with detail);
                // 503 from /readyz while loading is normal.
                .on_failure(tower_http::trace::DefaultOnFailure::new().level(tracing::Level::DEBUG))
                .make_span_with(|req: &Request<Body>| {
                let id = req
                    .headers()
                    .get(REQUEST_ID)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-");
                tracing::info_span!("request", method = %req.method(), path = %req.uri().path(), request_id = %id)
            }),
        )
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        .layer(SetSensitiveRequestHeadersLayer::new([
            header::AUTHORIZATION,
            header::PROXY_AUTHORIZATION,
            header::COOKIE,
            HeaderName::from_static("x-api-key"),
            HeaderName::from_static(KEY_HEADER),
        ]));
    match cors {
        Some(cors) => router.layer(cors),
        None => router,
    }
}

/// CORS for the configured origins (`server.cors_origins`, checked at load), or none: then
/// a browser refuses other sites' pages a cross-origin JSON request at its preflight.
fn cors_layer(config: &crate::config::Config) -> Option<tower_http::cors::CorsLayer> {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let origins = config.server.cors().ok().flatten()?;
    let allow = if origins.is_empty() {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins)
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([
                axum::http::Method::GET,
                axum::http::Method::POST,
                axum::http::Method::DELETE,
            ])
            .allow_headers([
                header::CONTENT_TYPE,
                header::AUTHORIZATION,
                HeaderName::from_static("x-api-key"),
                HeaderName::from_static(KEY_HEADER),
                HeaderName::from_static("anthropic-version"),
                HeaderName::from_static("anthropic-beta"),
                REQUEST_ID,
            ])
            .expose_headers([
                REQUEST_ID,
                HeaderName::from_static("x-charter-action"),
                header::RETRY_AFTER,
                HeaderName::from_static("ratelimit"),
                HeaderName::from_static("ratelimit-policy"),
            ])
            .max_age(Duration::from_secs(600)),
    )
}

async fn not_found() -> AppError {
    AppError::NotFound {
        field: None,
        message: "no such route".into(),
    }
}

/// Layers (timeout, body limit) and axum's router (405) answer with bodies of their own;
/// give them the API's error shape.
async fn shape_layer_errors(response: Response<Body>) -> Response<Body> {
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json || !(response.status().is_client_error() || response.status().is_server_error()) {
        return response;
    }
    let error = match response.status() {
        StatusCode::REQUEST_TIMEOUT => AppError::Timeout,
        StatusCode::PAYLOAD_TOO_LARGE => AppError::BodyTooLarge,
        StatusCode::METHOD_NOT_ALLOWED => AppError::NotFound {
            field: None,
            message: "method not allowed on this route".into(),
        },
        _ => return response,
    };
    let mut shaped = error.into_response();
    if response.status() == StatusCode::METHOD_NOT_ALLOWED {
        *shaped.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
        if let Some(allow) = response.headers().get(header::ALLOW) {
            shaped.headers_mut().insert(header::ALLOW, allow.clone());
        }
    }
    shaped
}
