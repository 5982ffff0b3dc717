//! The gateway's errors, answered in the Anthropic error shape so that an unmodified SDK
//! raises its usual exception classes (and retries where the real API would be retried),
//! and the pure mapping from upstream HTTP statuses to Anthropic error types.
//!
//! Upstream errors are *not* turned into `GatewayError`s: they reach the client unchanged
//! (status, body, retry headers). These errors are the gateway's own: bad input, not
//! ready, the model queue full, the upstream unreachable or silent. Domain errors arrive as
//! the engine's [`ErrorClass`], the same classes `http::error` renders in the API's shape.

use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::auth::limit::Limited;
use crate::auth::Denied;
use crate::engine::{EngineError, ErrorClass};

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The request cannot be handled as sent (not JSON, unknown constitution, ...).
    #[error("{0}")]
    InvalidRequest(String),
    /// The body is not sent as JSON (`content-type`).
    #[error("send the body as application/json")]
    UnsupportedMediaType,
    #[error("request body is larger than the gateway's limit")]
    BodyTooLarge,
    /// The model and constitutions are still loading, or the service is stopping.
    #[error("not ready")]
    NotReady,
    /// No Charter key in `x-charter-key`, or not a valid one (401).
    #[error("{0}")]
    Unauthorized(String),
    /// The key may not do this: a missing scope, a constitution outside its list (403).
    #[error("{0}")]
    Forbidden(String),
    /// Over the key's rate limit (429).
    #[error("rate limited")]
    RateLimited(Limited),
    /// The evaluation queue is full.
    #[error("evaluation queue full")]
    Overloaded { retry_after_secs: u64 },
    /// No answer from the upstream API (connect failure, reset).
    #[error("upstream unreachable: {0}")]
    UpstreamUnreachable(String),
    /// The upstream API did not answer in time.
    #[error("upstream timed out")]
    UpstreamTimeout,
    /// The upstream API answered something that is not the Messages wire format.
    #[error("upstream answered badly: {0}")]
    UpstreamProtocol(String),
    /// A bug or a model failure: logged with detail, answered generically.
    #[error("internal: {0}")]
    Internal(String),
}

impl GatewayError {
    /// Status, Anthropic error type and the message the client sees.
    pub fn parts(&self) -> (StatusCode, &'static str, String) {
        match self {
            GatewayError::InvalidRequest(m) => {
                (StatusCode::BAD_REQUEST, "invalid_request_error", m.clone())
            }
            GatewayError::UnsupportedMediaType => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid_request_error",
                "send the body as application/json (content-type)".into(),
            ),
            GatewayError::BodyTooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "request_too_large",
                "request body is larger than the gateway's limit".into(),
            ),
            GatewayError::NotReady => (
                StatusCode::SERVICE_UNAVAILABLE,
                "api_error",
                "the gateway is starting or stopping; retry shortly".into(),
            ),
            GatewayError::Unauthorized(m) => {
                (StatusCode::UNAUTHORIZED, "authentication_error", m.clone())
            }
            GatewayError::Forbidden(m) => (StatusCode::FORBIDDEN, "permission_error", m.clone()),
            GatewayError::RateLimited(limited) => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                format!(
                    "over this Charter key's rate of {} {} per {} s; retry after the retry-after delay",
                    limited.state.burst,
                    limited.state.unit.as_str(),
                    limited.state.window_secs
                ),
            ),
            GatewayError::Overloaded { .. } => (
                overloaded(),
                "overloaded_error",
                "the gateway's evaluation queue is full; retry after the retry-after delay".into(),
            ),
            GatewayError::UpstreamUnreachable(_) => (
                StatusCode::BAD_GATEWAY,
                "api_error",
                "the gateway could not reach the upstream API".into(),
            ),
            GatewayError::UpstreamTimeout => (
                StatusCode::GATEWAY_TIMEOUT,
                "timeout_error",
                "the upstream API did not answer in time".into(),
            ),
            GatewayError::UpstreamProtocol(_) => (
                StatusCode::BAD_GATEWAY,
                "api_error",
                "the upstream API sent an answer the gateway could not read".into(),
            ),
            GatewayError::Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "api_error",
                "internal gateway error".into(),
            ),
        }
    }

    /// The Anthropic error object (`{"type": "error", "error": {...}}`).
    pub fn body(&self) -> serde_json::Value {
        let (_, kind, message) = self.parts();
        error_body(kind, &message)
    }
}

/// Anthropic's "overloaded" status, 529.
pub fn overloaded() -> StatusCode {
    StatusCode::from_u16(529).unwrap_or(StatusCode::SERVICE_UNAVAILABLE)
}

pub fn error_body(kind: &str, message: &str) -> serde_json::Value {
    serde_json::json!({"type": "error", "error": {"type": kind, "message": message}})
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        let (status, _, _) = self.parts();
        match &self {
            GatewayError::Internal(detail) => {
                tracing::error!(error = %detail, "gateway internal error")
            }
            GatewayError::UpstreamUnreachable(detail) | GatewayError::UpstreamProtocol(detail) => {
                tracing::warn!(error = %detail, "upstream failure")
            }
            GatewayError::InvalidRequest(_)
            | GatewayError::UnsupportedMediaType
            | GatewayError::BodyTooLarge
            | GatewayError::Unauthorized(_)
            | GatewayError::Forbidden(_)
            | GatewayError::RateLimited(_)
            | GatewayError::NotReady
            | GatewayError::Overloaded { .. }
            | GatewayError::UpstreamTimeout => {}
        }
        let mut response = (status, axum::Json(self.body())).into_response();
        let headers = response.headers_mut();
        match self {
            GatewayError::Overloaded { retry_after_secs } => {
                headers.insert("retry-after", HeaderValue::from(retry_after_secs));
                headers.insert("x-should-retry", HeaderValue::from_static("true"));
            }
            GatewayError::NotReady => {
                headers.insert("retry-after", HeaderValue::from_static("1"));
                headers.insert("x-should-retry", HeaderValue::from_static("true"));
            }
            GatewayError::RateLimited(limited) => {
                headers.insert("retry-after", HeaderValue::from(limited.retry_after_secs));
                let (policy, state) = limited.state.headers();
                for (name, value) in [("ratelimit-policy", policy), ("ratelimit", state)] {
                    if let Ok(value) = HeaderValue::from_str(&value) {
                        headers.append(name, value);
                    }
                }
                headers.insert("x-should-retry", HeaderValue::from_static("true"));
            }
            GatewayError::InvalidRequest(_)
            | GatewayError::Unauthorized(_)
            | GatewayError::Forbidden(_)
            | GatewayError::UnsupportedMediaType
            | GatewayError::BodyTooLarge
            | GatewayError::UpstreamUnreachable(_)
            | GatewayError::UpstreamTimeout
            | GatewayError::UpstreamProtocol(_)
            | GatewayError::Internal(_) => {}
        }
        response
    }
}

impl From<EngineError> for GatewayError {
    fn from(err: EngineError) -> Self {
        ErrorClass::from(err).into()
    }
}

impl From<ErrorClass> for GatewayError {
    fn from(class: ErrorClass) -> Self {
        match class {
            ErrorClass::UnknownConstitution(id) => GatewayError::InvalidRequest(format!(
                "no constitution with id {id:?}; GET /v1/constitutions lists them"
            )),
            ErrorClass::Overloaded { retry_after_secs } => {
                GatewayError::Overloaded { retry_after_secs }
            }
            // Retrying cannot help, so not an overload (which SDKs retry).
            ErrorClass::OverShare { units, max_units } => GatewayError::InvalidRequest(format!(
                "the texts to evaluate need {units} model queue units; one request may hold \
                 at most {max_units} (batching.max_request_share): send a shorter prompt"
            )),
            ErrorClass::Stopped => GatewayError::NotReady,
            ErrorClass::Internal(detail) => GatewayError::Internal(detail),
        }
    }
}

impl From<Denied> for GatewayError {
    fn from(denied: Denied) -> Self {
        match denied {
            Denied::NoKey => GatewayError::Unauthorized(
                "this gateway needs a Charter API key in the x-charter-key header \
                 (x-api-key and Authorization carry the Anthropic key upstream)"
                    .into(),
            ),
            Denied::BadKey => GatewayError::Unauthorized(
                "the Charter API key in x-charter-key is not valid (unknown or revoked)".into(),
            ),
            Denied::Scope(scope) => GatewayError::Forbidden(format!(
                "this Charter key lacks the scope {:?} these routes need",
                scope.as_str()
            )),
            Denied::Constitution(id) => {
                GatewayError::Forbidden(format!("this Charter key may not use constitution {id:?}"))
            }
            Denied::Limited(limited) => GatewayError::RateLimited(limited),
            Denied::Unavailable(detail) => {
                tracing::warn!(error = %detail, "API keys cannot be read");
                GatewayError::NotReady
            }
        }
    }
}

/// What an upstream non-2xx answer means, the way the SDKs read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamFailure {
    pub status: u16,
    /// The Anthropic error type for the status (`rate_limit_error`, ...).
    pub kind: &'static str,
    /// Whether an SDK would retry it: `x-should-retry` when present, else 408, 409, 429
    /// and every status >= 500.
    pub retryable: bool,
}

/// Maps an upstream status (and its headers) to a failure; `None` for 1xx-3xx.
/// Pure: the SDKs' own rules, so the gateway describes upstream errors as a client would.
pub fn upstream_failure(status: StatusCode, headers: &HeaderMap) -> Option<UpstreamFailure> {
    let code = status.as_u16();
    if code < 400 {
        return None;
    }
    let kind = match code {
        400 => "invalid_request_error",
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        504 => "timeout_error",
        529 => "overloaded_error",
        c if c >= 500 => "api_error",
        _ => "invalid_request_error",
    };
    let retryable = match headers
        .get("x-should-retry")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
    {
        Some("true") => true,
        Some("false") => false,
        _ => matches!(code, 408 | 409 | 429) || code >= 500,
    };
    Some(UpstreamFailure {
        status: code,
        kind,
        retryable,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(code: u16, should_retry: Option<&str>) -> Option<UpstreamFailure> {
        let mut headers = HeaderMap::new();
        if let Some(v) = should_retry {
            headers.insert("x-should-retry", v.parse().unwrap());
        }
        upstream_failure(StatusCode::from_u16(code).unwrap(), &headers)
    }

    #[test]
    fn success_and_redirects_are_not_failures() {
        assert_eq!(failure(200, None), None);
        assert_eq!(failure(304, None), None);
    }

    #[test]
    fn statuses_map_to_anthropic_types_and_sdk_retry_rules() {
        let cases = [
            (400, "invalid_request_error", false),
            (401, "authentication_error", false),
            (402, "billing_error", false),
            (403, "permission_error", false),
            (404, "not_found_error", false),
            (408, "invalid_request_error", true),
            (409, "invalid_request_error", true),
            (413, "request_too_large", false),
            (422, "invalid_request_error", false),
            (429, "rate_limit_error", true),
            (500, "api_error", true),
            (502, "api_error", true),
            (504, "timeout_error", true),
            (529, "overloaded_error", true),
        ];
        for (code, kind, retryable) in cases {
            let f = failure(code, None).unwrap();
            assert_eq!(
                (f.status, f.kind, f.retryable),
                (code, kind, retryable),
                "{code}"
            );
        }
    }

    #[test]
    fn x_should_retry_overrides() {
        assert!(!failure(529, Some("false")).unwrap().retryable);
        assert!(failure(400, Some("true")).unwrap().retryable);
        assert!(failure(429, Some("maybe")).unwrap().retryable);
    }

    #[test]
    fn own_errors_use_the_anthropic_shape() {
        let err = GatewayError::Overloaded {
            retry_after_secs: 2,
        };
        let (status, kind, _) = err.parts();
        assert_eq!(status.as_u16(), 529);
        assert_eq!(kind, "overloaded_error");
        assert_eq!(err.body()["type"], "error");
        assert_eq!(err.body()["error"]["type"], "overloaded_error");
        let internal = GatewayError::Internal("db password x".into());
        assert!(!internal.body().to_string().contains("password"));
    }
}
