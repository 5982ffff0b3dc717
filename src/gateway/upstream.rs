//! The upstream side: the one shared HTTP client and which headers cross the gateway in
//! each direction.
//!
//! The rules (pure functions, unit-tested): forward every header the client sent except
//! hop-by-hop ones, `host`, `content-length` (recomputed), the gateway's own
//! (`x-charter-*`, `x-request-id`) and, where the gateway must read the answer,
//! `accept-encoding` (the client gets a plain body it can decode either way). The client's
//! key (`x-api-key` or `Authorization: Bearer`) is forwarded as sent; only when it sent
//! none is the configured key injected as `x-api-key`. Back to the client goes every
//! upstream header except hop-by-hop ones (and `content-length` when the body changed):
//! `request-id`, `retry-after`, `retry-after-ms`, `x-should-retry`,
//! `anthropic-ratelimit-*`, `anthropic-organization-id` and whatever else upstream sends.
//! Nothing here logs a header value.

use std::time::Duration;

use axum::body::Bytes;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method};

use super::error::GatewayError;
use crate::config::{GatewayConfig, Secret};

/// Headers that describe one connection, not the message (RFC 9110 7.6.1), plus `host`.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// The header a client uses to pick a constitution for one request.
pub const CONSTITUTION_HEADER: &str = "x-charter-constitution";

/// The upstream API: base URL, shared client, fallback key.
pub struct Upstream {
    client: reqwest::Client,
    base: String,
    api_key: Option<Secret>,
}

impl Upstream {
    pub fn new(config: &GatewayConfig) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(config.connect_timeout_secs))
            .read_timeout(Duration::from_secs(config.idle_timeout_secs))
            .pool_idle_timeout(Duration::from_secs(90))
            // A proxy answers what upstream answered; it does not follow redirects.
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self {
            client,
            base: config.upstream_url.trim_end_matches('/').to_string(),
            api_key: config.api_key().cloned(),
        })
    }

    /// Headers to send upstream for a client request (see the module doc).
    pub fn request_headers(&self, incoming: &HeaderMap, keep_accept_encoding: bool) -> HeaderMap {
        forward_request_headers(incoming, self.api_key.as_ref(), keep_accept_encoding)
    }

    /// Sends one request; `path_and_query` starts with `/`. The response's body is not
    /// read here (streams stay streams).
    pub async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        headers: HeaderMap,
        body: Option<Bytes>,
    ) -> Result<reqwest::Response, GatewayError> {
        let url = format!("{}{}", self.base, path_and_query);
        let mut request = self.client.request(method, url).headers(headers);
        if let Some(body) = body {
            request = request.body(body);
        }
        request.send().await.map_err(transport_error)
    }
}

/// A transport failure (no HTTP answer) as a gateway error; never includes headers.
pub fn transport_error(err: reqwest::Error) -> GatewayError {
    if err.is_timeout() {
        GatewayError::UpstreamTimeout
    } else if err.is_decode() || err.is_body() {
        GatewayError::UpstreamProtocol(err.without_url().to_string())
    } else {
        GatewayError::UpstreamUnreachable(err.without_url().to_string())
    }
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(&name.as_str())
}

/// Which client headers go upstream (pure; see the module doc).
pub fn forward_request_headers(
    incoming: &HeaderMap,
    api_key: Option<&Secret>,
    keep_accept_encoding: bool,
) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(incoming.len() + 1);
    for (name, value) in incoming {
        let drop = is_hop_by_hop(name)
            || name == header::HOST
            || name == header::CONTENT_LENGTH
            || name.as_str().starts_with("x-charter-")
            || name.as_str() == "x-request-id"
            || (!keep_accept_encoding && name == header::ACCEPT_ENCODING);
        if !drop {
            out.append(name.clone(), value.clone());
        }
    }
    let has_key = out.contains_key("x-api-key") || out.contains_key(header::AUTHORIZATION);
    if !has_key {
        if let Some(key) = api_key {
            if let Ok(mut value) = HeaderValue::from_str(key.expose()) {
                value.set_sensitive(true);
                out.insert(HeaderName::from_static("x-api-key"), value);
            }
        }
    }
    out
}

/// Which upstream headers go back to the client (pure; see the module doc).
pub fn forward_response_headers(upstream: &HeaderMap, body_changed: bool) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(upstream.len());
    for (name, value) in upstream {
        let drop = is_hop_by_hop(name)
            || (body_changed
                && (name == header::CONTENT_LENGTH || name == header::CONTENT_ENCODING));
        if !drop {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn client_headers_pass_except_connection_and_our_own() {
        let incoming = headers(&[
            ("host", "gateway:8080"),
            ("connection", "keep-alive"),
            ("content-length", "42"),
            ("content-type", "application/json"),
            ("anthropic-version", "2023-06-01"),
            ("anthropic-beta", "a-2025,b-2026"),
            ("x-stainless-retry-count", "0"),
            ("x-api-key", "sk-client"),
            ("x-charter-constitution", "strict"),
            // The gateway's own API key never goes upstream.
            ("x-charter-key", "chk_0123456789abcdef_00"),
            ("x-request-id", "ours"),
            ("accept-encoding", "gzip"),
            ("user-agent", "Anthropic/Python 0.64.0"),
        ]);
        let out = forward_request_headers(&incoming, Some(&Secret::new("sk-gateway")), false);
        let names: Vec<&str> = out.keys().map(|k| k.as_str()).collect();
        assert_eq!(
            names,
            [
                "content-type",
                "anthropic-version",
                "anthropic-beta",
                "x-stainless-retry-count",
                "x-api-key",
                "user-agent"
            ]
        );
        assert_eq!(out["x-api-key"], "sk-client", "the client's key wins");
        assert_eq!(out["anthropic-beta"], "a-2025,b-2026");
        let out = forward_request_headers(&incoming, None, true);
        assert_eq!(out["accept-encoding"], "gzip");
    }

    #[test]
    fn configured_key_only_when_the_client_sent_none() {
        let key = Secret::new("sk-gateway");
        let out = forward_request_headers(&headers(&[]), Some(&key), false);
        assert_eq!(out["x-api-key"], "sk-gateway");
        assert!(out["x-api-key"].is_sensitive());
        let bearer = headers(&[("authorization", "Bearer sk-client")]);
        let out = forward_request_headers(&bearer, Some(&key), false);
        assert_eq!(out["authorization"], "Bearer sk-client");
        assert!(!out.contains_key("x-api-key"));
        assert!(forward_request_headers(&headers(&[]), None, false).is_empty());
    }

    #[test]
    fn upstream_headers_return_except_connection() {
        let up = headers(&[
            ("request-id", "req_1"),
            ("retry-after", "3"),
            ("retry-after-ms", "3000"),
            ("x-should-retry", "true"),
            ("anthropic-ratelimit-requests-remaining", "0"),
            ("anthropic-organization-id", "org"),
            ("transfer-encoding", "chunked"),
            ("content-length", "10"),
            ("content-type", "application/json"),
        ]);
        let out = forward_response_headers(&up, false);
        assert_eq!(out.len(), 8);
        assert!(!out.contains_key("transfer-encoding"));
        let out = forward_response_headers(&up, true);
        assert!(!out.contains_key("content-length"));
        assert_eq!(out["retry-after-ms"], "3000");
        assert_eq!(out["anthropic-ratelimit-requests-remaining"], "0");
    }
}
