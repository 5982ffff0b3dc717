//! `GET /healthz` (the process is up) and `GET /readyz` (model and constitutions loaded).

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

use crate::state::AppState;

pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    match state.readiness() {
        Ok(engine) => (
            StatusCode::OK,
            Json(json!({
                "status": "ready",
                "model": engine.model().as_ref(),
                "constitutions": engine.constitutions().len(),
                "queued": engine.embedder().queued()
                    + engine.partner().map_or(0, |p| p.queued()),
                "audit": audit(&state),
            })),
        ),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not_ready", "reason": reason, "audit": audit(&state)})),
        ),
    }
}

/// The audit store's state: the database may be down (records wait in the spool)
/// without the service being unready.
fn audit(state: &AppState) -> Value {
    match state.store() {
        Some(store) => {
            let spool = store.spool();
            json!({
                "database": if store.database_up() { "up" } else { "down" },
                "queued": store.queue_depth(),
                "spool_bytes": spool.bytes,
                "spool_segments": spool.segments,
                "spool_writable": store.unready_reason().is_none(),
            })
        }
        None => json!("disabled"),
    }
}
