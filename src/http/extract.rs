//! `ApiJson<T>`: a JSON body extractor whose rejections use our error shape: a body
//! without a JSON `content-type` is 415 (so a page on another site cannot post to the API
//! with a simple form or `text/plain` request), syntax errors and data after the JSON value
//! are 400 `malformed_json`, wrong or missing fields are 422 with the field's path, an
//! oversized body is 413.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::header;
use serde::de::DeserializeOwned;

use super::error::AppError;

pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = AppError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !crate::ids::is_json(req.headers().get(header::CONTENT_TYPE)) {
            return Err(AppError::UnsupportedMediaType);
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                AppError::BodyTooLarge
            } else {
                AppError::MalformedJson(rejection.body_text())
            }
        })?;
        parse(&bytes).map(ApiJson)
    }
}

/// Parses a JSON body, naming the offending field on data errors; anything but whitespace
/// after the value is malformed (`{"text":"a"}{"text":"b"}` is not one request).
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, AppError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let value = deserialize(de)?;
    de.end()
        .map_err(|e| AppError::MalformedJson(format!("data after the JSON value: {e}")))?;
    Ok(value)
}

fn deserialize<'de, T: DeserializeOwned>(
    de: &mut serde_json::Deserializer<serde_json::de::SliceRead<'de>>,
) -> Result<T, AppError> {
    serde_path_to_error::deserialize(de).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        match inner.classify() {
            serde_json::error::Category::Data => {
                let field = if path == "." {
                    missing_field(&inner)
                } else {
                    path
                };
                AppError::invalid(field, inner.to_string())
            }
            _ => AppError::MalformedJson(inner.to_string()),
        }
    })
}

/// serde reports a missing field at the parent path; pull the name out of the message.
fn missing_field(err: &serde_json::Error) -> String {
    let msg = err.to_string();
    msg.split('`')
        .nth(1)
        .map(str::to_string)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct T {
        text: String,
        #[serde(default)]
        n: Option<u32>,
    }

    #[test]
    fn syntax_is_malformed_data_is_invalid_with_field() {
        assert!(matches!(
            parse::<T>(b"{not json"),
            Err(AppError::MalformedJson(_))
        ));
        match parse::<T>(br#"{"text": 5}"#) {
            Err(AppError::Invalid { field, .. }) => assert_eq!(field, "text"),
            other => panic!("{other:?}"),
        }
        match parse::<T>(br#"{"n": 1}"#) {
            Err(AppError::Invalid { field, .. }) => assert_eq!(field, "text"),
            other => panic!("{other:?}"),
        }
        match parse::<T>(br#"{"text": "x", "n": -1}"#) {
            Err(AppError::Invalid { field, .. }) => assert_eq!(field, "n"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn data_after_the_value_is_malformed_whitespace_is_not() {
        assert!(matches!(
            parse::<T>(br#"{"text":"hi"}{"text":"second"}"#),
            Err(AppError::MalformedJson(m)) if m.contains("after the JSON value")
        ));
        assert!(matches!(
            parse::<T>(br#"{"text":"hi"} x"#),
            Err(AppError::MalformedJson(_))
        ));
        assert!(parse::<T>(b"{\"text\":\"hi\"}\n\t ").is_ok());
    }
}
