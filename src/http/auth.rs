//! Who may call a route: the guard every route but the probes sits behind. It reads the
//! request's key, asks [`crate::auth::Keys`] who sent it, checks the route's scope and
//! the key's request rate, and hands the [`Caller`] to the handler (request extensions);
//! refusals come in the route's own error shape (the API's JSON, or Anthropic's on the
//! gateway routes). Successful answers of a rate-limited key carry its `RateLimit`
//! headers.
//!
//! The key comes from `x-charter-key`, or on the API routes also from
//! `Authorization: Bearer`; on the gateway routes `Authorization` and `x-api-key` are the
//! Anthropic key and go upstream untouched. No key or hash is logged here.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;

use super::error::AppError;
use crate::auth::limit::{Limited, RateState};
use crate::auth::{Caller, Scope};
use crate::gateway::error::GatewayError;
use crate::state::AppState;

/// The header of a Charter API key (the only one on the gateway routes).
pub const KEY_HEADER: &str = "x-charter-key";

/// Which error shape a route answers in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    Api,
    Gateway,
}

#[derive(Clone)]
struct Guard {
    state: AppState,
    /// `None`: any valid key.
    scope: Option<Scope>,
    shape: Shape,
}

/// `router`'s routes behind the guard: a key with `scope` (any key for `None`), or none
/// where none is needed.
pub fn guarded<S: Clone + Send + Sync + 'static>(
    router: Router<S>,
    state: &AppState,
    scope: Option<Scope>,
    shape: Shape,
) -> Router<S> {
    let guard = Guard {
        state: state.clone(),
        scope,
        shape,
    };
    router.route_layer(axum::middleware::from_fn_with_state(guard, check))
}

/// The key a request carries for Charter. A bearer token counts only when it looks like
/// a Charter key (`chk_`): clients that sent another one to the API before keys existed
/// (it names them in audit records) keep working where no key is needed.
fn presented(headers: &HeaderMap, shape: Shape) -> Option<&str> {
    let own = headers.get(KEY_HEADER).and_then(|v| v.to_str().ok());
    match shape {
        Shape::Gateway => own,
        Shape::Api => own.or_else(|| {
            headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .filter(|k| k.trim_start().starts_with("chk_"))
        }),
    }
}

async fn check(State(guard): State<Guard>, mut request: Request, next: Next) -> Response {
    let key = presented(request.headers(), guard.shape);
    let decided = async {
        let caller = guard.state.keys().authenticate(key).await?;
        if let Some(scope) = guard.scope {
            caller.require(scope)?;
        }
        let rate = caller.take_request()?;
        Ok::<_, crate::auth::Denied>((caller, rate))
    }
    .await;
    match decided {
        Ok((caller, rate)) => {
            request.extensions_mut().insert(caller);
            let mut response = next.run(request).await;
            if let Some(rate) = rate {
                rate_headers(response.headers_mut(), &rate);
            }
            response
        }
        Err(denied) => match guard.shape {
            Shape::Api => AppError::from(denied).into_response(),
            Shape::Gateway => GatewayError::from(denied).into_response(),
        },
    }
}

/// The caller the guard let through (anyone when a handler runs without the guard).
pub fn caller(extension: Option<axum::Extension<Arc<Caller>>>) -> Arc<Caller> {
    extension.map_or_else(|| Arc::new(Caller::anyone()), |e| e.0)
}

/// `RateLimit-Policy` and `RateLimit` (appended: a request may show its request and its
/// text bucket).
pub fn rate_headers(headers: &mut HeaderMap, state: &RateState) {
    let (policy, now) = state.headers();
    for (name, value) in [("ratelimit-policy", policy), ("ratelimit", now)] {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.append(name, value);
        }
    }
}

/// A 429's headers: `Retry-After` and the bucket's `RateLimit` headers.
pub fn limited_headers(headers: &mut HeaderMap, limited: &Limited) {
    headers.insert(
        header::RETRY_AFTER,
        HeaderValue::from(limited.retry_after_secs),
    );
    rate_headers(headers, &limited.state);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gateway_reads_only_its_own_header() {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "Bearer sk-other".parse().unwrap());
        assert_eq!(presented(&h, Shape::Api), None, "not a Charter key");
        h.insert(header::AUTHORIZATION, "Bearer chk_x".parse().unwrap());
        assert_eq!(presented(&h, Shape::Api), Some("chk_x"));
        assert_eq!(presented(&h, Shape::Gateway), None);
        h.insert(KEY_HEADER, "chk_a".parse().unwrap());
        assert_eq!(presented(&h, Shape::Api), Some("chk_a"));
        assert_eq!(presented(&h, Shape::Gateway), Some("chk_a"));
    }
}
