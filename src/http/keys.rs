//! Key management over HTTP (scope `admin`), the same operations as `charter keys`:
//! `GET /v1/admin/keys`, `POST /v1/admin/keys` (the key is in this one answer only),
//! `DELETE /v1/admin/keys/{id}` (revoke; on other replicas within `auth.cache_secs`).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::AppError;
use super::extract::ApiJson;
use crate::auth::key::KeySpec;
use crate::auth::{KeyInfo, Scope};
use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/admin/keys", get(list).post(create))
        .route("/v1/admin/keys/{id}", delete(revoke))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    name: String,
    scopes: Vec<String>,
    #[serde(default)]
    constitution: Option<String>,
    #[serde(default)]
    constitutions: Vec<String>,
    /// Requests per second.
    #[serde(default)]
    rate: Option<f64>,
    /// Texts per second.
    #[serde(default)]
    text_rate: Option<f64>,
}

async fn list(State(state): State<AppState>) -> Result<Json<Value>, AppError> {
    let rows = state.keys().store().list().await?;
    let keys: Vec<KeyInfo> = rows.iter().map(KeyInfo::from).collect();
    Ok(Json(json!({ "keys": keys })))
}

async fn create(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<CreateKey>,
) -> Result<(StatusCode, Json<Value>), AppError> {
    let scopes = req
        .scopes
        .iter()
        .map(|s| Scope::parse(s))
        .collect::<Result<_, _>>()
        .map_err(|e| AppError::invalid("scopes", e))?;
    let spec = KeySpec {
        name: req.name,
        scopes,
        constitution: req.constitution,
        constitutions: req.constitutions,
        rate: req.rate,
        text_rate: req.text_rate,
    };
    let new = spec
        .create(chrono::Utc::now().timestamp_millis())
        .map_err(|e| {
            let field = e.split(':').next().unwrap_or("name").to_string();
            AppError::invalid(field, e)
        })?;
    state.keys().store().insert(&new.row).await?;
    tracing::info!(key_id = %new.row.id, name = %new.row.name, "API key created");
    let mut body = serde_json::to_value(KeyInfo::from(&new.row))
        .map_err(|e| AppError::Internal(e.to_string()))?;
    body["key"] = Value::String(new.key);
    Ok((StatusCode::CREATED, Json(body)))
}

async fn revoke(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<KeyInfo>, AppError> {
    let row = state
        .keys()
        .store()
        .revoke(&id, chrono::Utc::now().timestamp_millis())
        .await?
        .ok_or_else(|| AppError::NotFound {
            field: Some("id".into()),
            message: format!("no API key with id {id:?}"),
        })?;
    state.keys().forget(&id);
    tracing::info!(key_id = %row.id, "API key revoked");
    Ok(Json(KeyInfo::from(&row)))
}
