//! The ids a request carries or is given: the request id header, evaluation ids and the
//! non-secret id of a client's API key; and whether its body is declared JSON. Shared by
//! the API's handlers and the gateway.
//!
//! Owns: how these ids are made. Must not: import any other module of the crate.

use axum::http::{header, HeaderMap, HeaderName};

/// `application/json` or `application/*+json`, with any parameters (the test axum's own
/// `Json` extractor makes).
pub fn is_json(content_type: Option<&header::HeaderValue>) -> bool {
    let Some(mime) = content_type
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse::<mime::Mime>().ok())
    else {
        return false;
    };
    mime.type_() == mime::APPLICATION
        && (mime.subtype() == mime::JSON || mime.suffix() == Some(mime::JSON))
}

/// The request id header: set by the HTTP layer when absent, echoed in the response and
/// copied into gateway audit records.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// A stable, non-secret id for the API key a request carried (`x-api-key` or
/// `Authorization: Bearer`): `key_` and 12 hex digits of its sha256.
pub fn client_key_id(headers: &HeaderMap) -> Option<String> {
    use sha2::{Digest, Sha256};
    let key = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .or_else(|| {
            headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
        })?
        .trim();
    if key.is_empty() {
        return None;
    }
    Some(format!(
        "key_{}",
        &hex::encode(Sha256::digest(key.as_bytes()))[..12]
    ))
}

/// Time-ordered evaluation id.
pub fn new_id() -> String {
    format!("eval_{}", uuid::Uuid::now_v7().simple())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_json_content_types_are_json() {
        let v = |s: &'static str| header::HeaderValue::from_static(s);
        assert!(is_json(Some(&v("application/json"))));
        assert!(is_json(Some(&v("Application/JSON; charset=utf-8"))));
        assert!(is_json(Some(&v("application/merge-patch+json"))));
        assert!(!is_json(None));
        assert!(!is_json(Some(&v("text/plain"))));
        assert!(!is_json(Some(&v("application/x-www-form-urlencoded"))));
        assert!(!is_json(Some(&v("text/+json"))));
    }

    #[test]
    fn key_ids_hide_the_key() {
        let mut h = HeaderMap::new();
        assert_eq!(client_key_id(&h), None);
        h.insert("x-api-key", "sk-secret-1".parse().unwrap());
        let a = client_key_id(&h).unwrap();
        assert!(a.starts_with("key_") && !a.contains("secret"));
        let mut h2 = HeaderMap::new();
        h2.insert("authorization", "Bearer sk-secret-1".parse().unwrap());
        assert_eq!(
            client_key_id(&h2).unwrap(),
            a,
            "same key, same id, either header"
        );
    }
}
