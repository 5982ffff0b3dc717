//! `GET /healthz` (the process is up) and `GET /readyz` (model and constitutions loaded,
//! and the model queue not saturated).

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

use crate::state::AppState;

pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// 200 when loaded and taking work; 503 while loading, and while the model queue is
/// saturated (it refused a request for want of room within the last `Retry-After`), so a
/// load balancer sends new work to other replicas until this one has room again.
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    match state.readiness() {
        Ok(engine) => {
            let queue = engine.embedder().status();
            let partner = engine.partner().map(|p| p.status());
            let saturated = queue.saturated || partner.as_ref().is_some_and(|p| p.saturated);
            let (status, word) = if saturated {
                (StatusCode::SERVICE_UNAVAILABLE, "saturated")
            } else {
                (StatusCode::OK, "ready")
            };
            (
                status,
                Json(json!({
                    "status": word,
                    "model": engine.model().as_ref(),
                    "constitutions": engine.constitutions().len(),
                    "queued": queue.units + partner.as_ref().map_or(0, |p| p.units),
                    "queue": queue,
                    "partner_queue": partner,
                    "audit": audit(&state),
                })),
            )
        }
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
