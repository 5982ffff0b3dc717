//! The one mapping from every error to an HTTP response.
//!
//! Policy: every error body has the shape
//! `{"error": {"type": "...", "message": "...", "field": "..."?}}` with a stable,
//! machine-readable `type` and, for bad input, the offending `field`. 4xx messages say
//! what to fix. 5xx bodies stay generic; the detail goes to the log, once. Domain errors
//! arrive classified ([`ErrorClass`], shared with the gateway, which renders the same
//! classes in the Anthropic shape); every match here is exhaustive (no `_` arm), so a new
//! variant forces a decision. A retry delay comes with the error (the model queue sets
//! it); nothing patches a response afterwards.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::auth::limit::Limited;
use crate::auth::Denied;
use crate::engine::{EngineError, ErrorClass};
use crate::store::StoreError;

#[derive(Debug)]
pub enum AppError {
    /// The body is not valid JSON.
    MalformedJson(String),
    /// The body is JSON but a field is missing, of the wrong type, empty or out of range.
    Invalid {
        field: String,
        message: String,
    },
    /// A text or a batch is larger than the configured limit.
    TooLarge {
        field: String,
        message: String,
    },
    /// The whole body is larger than the configured limit.
    BodyTooLarge,
    /// hyper could not parse the request (its request line or headers).
    MalformedRequest,
    /// The request line's URI is longer than hyper reads (64 KiB).
    UriTooLong,
    /// The request head is larger than hyper reads.
    HeadersTooLarge,
    UnsupportedMediaType,
    NotFound {
        field: Option<String>,
        message: String,
    },
    Overloaded {
        retry_after_secs: u64,
    },
    /// One request needs more of the model queue than `batching.max_request_share` lets
    /// it hold.
    OverShare {
        units: usize,
        max_units: usize,
    },
    NotReady,
    /// No API key, or not a valid one (401).
    Unauthorized(String),
    /// The key may not do this (403): a missing scope, or a constitution outside its list.
    Forbidden {
        field: Option<String>,
        message: String,
    },
    /// Over the key's rate limit (429, with `Retry-After` and `RateLimit` headers).
    RateLimited(Limited),
    /// A dependency (the audit database) is down: logged, answered 503.
    Unavailable(String),
    Timeout,
    /// An internal failure: logged with detail, answered generically.
    Internal(String),
}

#[derive(Serialize)]
struct Body<'a> {
    error: ErrorBody<'a>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
}

impl AppError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        AppError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            AppError::MalformedJson(_) => StatusCode::BAD_REQUEST,
            AppError::Invalid { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            AppError::TooLarge { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            AppError::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            AppError::MalformedRequest => StatusCode::BAD_REQUEST,
            AppError::UriTooLong => StatusCode::URI_TOO_LONG,
            AppError::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            AppError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            AppError::NotFound { .. } => StatusCode::NOT_FOUND,
            AppError::Overloaded { .. } => StatusCode::TOO_MANY_REQUESTS,
            AppError::OverShare { .. } => StatusCode::TOO_MANY_REQUESTS,
            AppError::NotReady => StatusCode::SERVICE_UNAVAILABLE,
            AppError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            AppError::Forbidden { .. } => StatusCode::FORBIDDEN,
            AppError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            AppError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            AppError::Timeout => StatusCode::REQUEST_TIMEOUT,
            AppError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            AppError::MalformedJson(_) => "malformed_json",
            AppError::Invalid { .. } => "invalid_field",
            AppError::TooLarge { .. } => "too_large",
            AppError::BodyTooLarge => "body_too_large",
            AppError::MalformedRequest => "malformed_request",
            AppError::UriTooLong => "uri_too_long",
            AppError::HeadersTooLarge => "headers_too_large",
            AppError::UnsupportedMediaType => "unsupported_media_type",
            AppError::NotFound { .. } => "not_found",
            AppError::Overloaded { .. } => "overloaded",
            AppError::OverShare { .. } => "over_request_share",
            AppError::NotReady => "not_ready",
            AppError::Unauthorized(_) => "unauthorized",
            AppError::Forbidden { .. } => "forbidden",
            AppError::RateLimited(_) => "rate_limited",
            AppError::Unavailable(_) => "unavailable",
            AppError::Timeout => "timeout",
            AppError::Internal(_) => "internal",
        }
    }
}

impl From<EngineError> for AppError {
    fn from(err: EngineError) -> Self {
        ErrorClass::from(err).into()
    }
}

impl From<ErrorClass> for AppError {
    fn from(class: ErrorClass) -> Self {
        match class {
            ErrorClass::UnknownConstitution(id) => AppError::NotFound {
                field: Some("constitution".into()),
                message: format!(
                    "no constitution with id {id:?}; GET /v1/constitutions lists them"
                ),
            },
            ErrorClass::Overloaded { retry_after_secs } => {
                AppError::Overloaded { retry_after_secs }
            }
            ErrorClass::OverShare { units, max_units } => AppError::OverShare { units, max_units },
            ErrorClass::Stopped => AppError::NotReady,
            ErrorClass::Internal(detail) => AppError::Internal(detail),
        }
    }
}

impl From<Denied> for AppError {
    fn from(denied: Denied) -> Self {
        match denied {
            Denied::NoKey => AppError::Unauthorized(
                "this route needs an API key: send `Authorization: Bearer KEY` or \
                 `x-charter-key: KEY` (`charter keys create` makes one)"
                    .into(),
            ),
            Denied::BadKey => {
                AppError::Unauthorized("the API key is not valid (unknown or revoked)".into())
            }
            Denied::Scope(scope) => AppError::Forbidden {
                field: None,
                message: format!(
                    "this key lacks the scope {:?} this route needs",
                    scope.as_str()
                ),
            },
            Denied::Constitution(id) => AppError::Forbidden {
                field: Some("constitution".into()),
                message: format!("this key may not use constitution {id:?}"),
            },
            Denied::Limited(limited) if limited.over_burst => AppError::TooLarge {
                field: "texts".into(),
                message: format!(
                    "more texts in one request than this key's text rate allows at once ({})",
                    limited.state.burst
                ),
            },
            Denied::Limited(limited) => AppError::RateLimited(limited),
            Denied::Unavailable(detail) => AppError::Unavailable(detail),
        }
    }
}

impl From<StoreError> for AppError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Database(e) if crate::store::db::is_transient(&e) => {
                AppError::Unavailable(format!("audit database: {e}"))
            }
            StoreError::Database(e) => AppError::Internal(format!("audit database: {e}")),
            StoreError::Migrate(e) => AppError::Internal(format!("audit migration: {e}")),
            StoreError::Spool(e) => AppError::Internal(format!("audit spool: {e}")),
        }
    }
}

impl AppError {
    /// The message the client sees and the field it concerns. 5xx messages stay generic.
    fn message(&self) -> (String, Option<String>) {
        match self {
            AppError::MalformedJson(m) => (format!("request body is not valid JSON: {m}"), None),
            AppError::Invalid { field, message } | AppError::TooLarge { field, message } => {
                (message.clone(), Some(field.clone()))
            }
            AppError::BodyTooLarge => (
                "request body is larger than the configured limit".into(),
                None,
            ),
            AppError::MalformedRequest => ("the request is not valid HTTP/1.1".into(), None),
            AppError::UriTooLong => (
                "the URL is longer than the server reads (64 KiB)".into(),
                None,
            ),
            AppError::HeadersTooLarge => (
                "the request's headers are larger than the server reads".into(),
                None,
            ),
            AppError::UnsupportedMediaType => ("send the body as application/json".into(), None),
            AppError::NotFound { field, message } => (message.clone(), field.clone()),
            AppError::Overloaded { .. } => (
                "the model queue is full; retry after the Retry-After delay".into(),
                None,
            ),
            AppError::OverShare { units, max_units } => (
                format!(
                    "this request needs {units} model queue units (one per text plus one per \
                     KiB of text); one request may hold at most {max_units} \
                     (batching.max_request_share of batching.queue_capacity): send fewer or \
                     shorter texts"
                ),
                Some("texts".into()),
            ),
            AppError::NotReady => (
                "the service is starting or stopping; retry shortly".into(),
                None,
            ),
            AppError::Unauthorized(m) => (m.clone(), None),
            AppError::Forbidden { field, message } => (message.clone(), field.clone()),
            AppError::RateLimited(limited) => (
                format!(
                    "over this key's rate of {} {} per {} s; retry after the Retry-After delay",
                    limited.state.burst,
                    limited.state.unit.as_str(),
                    limited.state.window_secs
                ),
                None,
            ),
            AppError::Unavailable(_) => (
                "the audit database is unavailable; retry shortly".into(),
                None,
            ),
            AppError::Timeout => (
                "the request took longer than the configured timeout".into(),
                None,
            ),
            AppError::Internal(_) => ("internal error".into(), None),
        }
    }

    /// The JSON error body, for answers written outside axum (the connection layer).
    pub fn json_body(&self) -> Vec<u8> {
        let (message, field) = self.message();
        serde_json::to_vec(&Body {
            error: ErrorBody {
                kind: self.kind(),
                message: &message,
                field: field.as_deref(),
            },
        })
        .unwrap_or_default()
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let status = self.status();
        if let AppError::Unavailable(detail) = &self {
            tracing::warn!(error = %detail, "dependency unavailable");
        }
        if let AppError::Internal(detail) = &self {
            tracing::error!(error = %detail, "internal error");
        }
        let body = (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            self.json_body(),
        );
        let mut response = (status, body).into_response();
        match self {
            AppError::Overloaded { retry_after_secs } => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
            }
            AppError::NotReady | AppError::Unavailable(_) => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            AppError::RateLimited(limited) => {
                crate::http::auth::limited_headers(response.headers_mut(), &limited);
            }
            AppError::Unauthorized(_) => {
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"charter\""),
                );
            }
            AppError::MalformedJson(_)
            | AppError::Invalid { .. }
            | AppError::TooLarge { .. }
            | AppError::BodyTooLarge
            | AppError::MalformedRequest
            | AppError::UriTooLong
            | AppError::HeadersTooLarge
            | AppError::UnsupportedMediaType
            | AppError::NotFound { .. }
            | AppError::OverShare { .. }
            | AppError::Forbidden { .. }
            | AppError::Timeout
            | AppError::Internal(_) => {}
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn body(err: AppError) -> (StatusCode, serde_json::Value, Option<String>) {
        let response = err.into_response();
        let status = response.status();
        let retry = response
            .headers()
            .get(header::RETRY_AFTER)
            .map(|v| v.to_str().unwrap().to_string());
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        (status, serde_json::from_slice(&bytes).unwrap(), retry)
    }

    #[tokio::test]
    async fn one_shape_with_type_and_field() {
        let (status, json, _) = body(AppError::invalid("texts[2]", "must not be empty")).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(json["error"]["type"], "invalid_field");
        assert_eq!(json["error"]["field"], "texts[2]");
        let (status, json, retry) = body(AppError::Overloaded {
            retry_after_secs: 3,
        })
        .await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(json["error"]["type"], "overloaded");
        assert_eq!(retry.as_deref(), Some("3"));
    }

    #[tokio::test]
    async fn internal_details_stay_in_the_log() {
        let (status, json, _) = body(AppError::Internal("secret path /etc/x".into())).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(json["error"]["message"], "internal error");
    }

    #[tokio::test]
    async fn unknown_constitution_is_404_on_field() {
        let (status, json, _) = body(EngineError::UnknownConstitution("nope".into()).into()).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(json["error"]["field"], "constitution");
    }
}
