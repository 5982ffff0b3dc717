//! `GET /healthz` (the process is up) and `GET /readyz` (model and constitutions loaded).

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

use crate::AppState;

pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    match state.readiness() {
        Ok(engine) => (
            StatusCode::OK,
            Json(json!({
                "status": "ready",
                "model": engine.embedder().info().id,
                "constitutions": engine.constitutions().len(),
                "queued": engine.embedder().queued(),
            })),
        ),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not_ready", "reason": reason})),
        ),
    }
}
