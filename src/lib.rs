//! Charter: a constitutional-rules evaluation service.
//!
//! A constitution is a file of natural-language rules with violating and compliant
//! exemplars. Charter embeds exemplars and candidate texts with an ONNX sentence-embedding
//! model and answers, per rule, a score, a verdict and the evidence behind it.
//!
//! # Layout
//! - [`config`]: one typed configuration (defaults < file < `CHARTER__*` env).
//! - [`constitution`]: pure; TOML rules files -> validated types with a content version.
//! - [`detect`]: pure; detectors of personal data and secrets (patterns confirmed by
//!   checksums), custom patterns, masking, the streaming hold-back.
//! - [`embed`]: the model (fastembed on ONNX Runtime), its worker threads, the bounded
//!   batching queue in front of them (fair across requests, cancellable), long-text
//!   windows.
//! - [`evaluate`]: pure; exemplar index, per-rule scores, verdicts, evidence.
//! - [`engine`]: model + loaded constitutions; the one `evaluate` operation that the HTTP
//!   API and the CLI call.
//! - [`ids`]: the request id header, evaluation ids, client key ids.
//! - [`auth`]: API keys (hashed in the audit database), scopes, per-key constitutions and
//!   rate limits; whether a key is needed on the bound address.
//! - [`audit`]: the audit record of every answered evaluation and the sink it goes to.
//! - [`gateway`]: the Anthropic Messages proxy (screen, evaluate, critique/revise, guarded
//!   streaming) behind `/v1/messages`, `/v1/messages/count_tokens` and `/v1/models`.
//! - [`store`]: the audit store: spool file, batched writer, SQLite/PostgreSQL, queries.
//! - [`state`]: `AppState`, what every handler shares.
//! - [`http`]: connections (accept loop, cap, timeouts), every route and handler (the
//!   gateway's too), extractors, the error mapping, tower-http layers.
//! - [`quality`]: labelled data, grouped cross-validation, the `bench` report (JSON +
//!   PNG) and `calibrate`.
//! - `main.rs` and `cli/` (the binary): the CLI, one file per command (`serve`,
//!   `migrate`, `check`, `eval`, `bench`, `calibrate`, `healthcheck`); thin.
//!
//! The request path: `http::evaluate` validates -> `Engine::evaluate` -> `Embedder::embed`
//! (queue -> model thread: tokenise, window, bucket by length, ONNX Runtime) ->
//! `evaluate::evaluate` (exemplar similarities -> rule scores) ->
//! `evaluate::apply_detectors` (detector rules, `redacted`) -> JSON.
//!
//! Floors (docs/ARCHITECTURE.md): a module imports only its own floor or below, checked
//! by the `layers` unit test. No file is over 800 lines (the `sizes` unit test) and no
//! function over 120 (clippy's `too_many_lines`, enabled below, bound in clippy.toml).

#![warn(clippy::too_many_lines)]

pub mod audit;
pub mod auth;
pub mod config;
pub mod constitution;
pub mod detect;
pub mod embed;
pub mod engine;
pub mod evaluate;
pub mod gateway;
pub mod http;
pub mod ids;
#[cfg(test)]
mod layers;
pub mod quality;
#[cfg(test)]
mod sizes;
pub mod state;
pub mod store;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::config::Config;
use crate::engine::Engine;
use crate::state::AppState;
use crate::store::Store;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Engine(#[from] engine::EngineError),
    #[error("server: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// Keys are required and none can be found (`auth::Keys::start`).
    #[error("{0}")]
    Auth(String),
}

/// Serves the API on `listener` until `shutdown` resolves, then drains in-flight requests
/// (at most `server.shutdown_timeout_secs`) and flushes the audit store (at most
/// `audit.flush_timeout_secs`; what is left stays in the spool). The model and
/// constitutions load in the background: `/healthz` answers at once, `/readyz` once they
/// are loaded. A load failure stops the server with an error.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let state = if config.audit.enabled {
        AppState::with_store(config.clone(), Arc::new(Store::open(&config)?))
    } else {
        AppState::new(config.clone(), Arc::new(audit::LogSink))
    };
    // Before the first request: whether keys are required on this address, and if so
    // that there is one.
    let keys = state
        .keys()
        .start(listener.local_addr()?, config.database.migrate);
    let result = match keys.await {
        Ok(()) => serve(state.clone(), listener, shutdown).await,
        Err(reason) => Err(RunError::Auth(reason)),
    };
    if let Some(store) = state.store() {
        store.shutdown().await;
    }
    result
}

async fn serve(
    state: AppState,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let (failed_tx, mut failed_rx) = tokio::sync::mpsc::channel::<engine::EngineError>(1);
    let loader = {
        let state = state.clone();
        tokio::spawn(async move {
            match Engine::load(state.config()).await {
                Ok(engine) => {
                    if let Some(store) = state.store() {
                        for index in engine.constitutions() {
                            store.register_constitution(index.constitution());
                        }
                    }
                    state.set_engine(Arc::new(engine));
                    tracing::info!("ready");
                }
                Err(err) => {
                    let _ = failed_tx.send(err).await;
                }
            }
        })
    };

    tracing::info!(addr = %listener.local_addr()?, "listening");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let limits = http::conn::ConnLimits {
        header_read_timeout: Duration::from_secs(state.config().server.header_read_timeout_secs),
        max_connections: state.config().server.max_connections,
    };
    let server = http::conn::serve(listener, http::router(state.clone()), limits, async move {
        let mut stop_rx = stop_rx;
        let _ = stop_rx.wait_for(|stop| *stop).await;
    });
    let mut server = tokio::spawn(server);

    let mut load_error = None;
    tokio::select! {
        _ = shutdown => tracing::info!("shutdown requested; draining in-flight requests"),
        Some(err) = failed_rx.recv() => {
            tracing::error!(error = %err, "start-up failed");
            load_error = Some(err);
        }
        result = &mut server => {
            return result.map_err(|e| std::io::Error::other(e.to_string()).into());
        }
    }
    let _ = stop_tx.send(true);
    loader.abort();
    let grace = Duration::from_secs(state.config().server.shutdown_timeout_secs);
    match tokio::time::timeout(grace, &mut server).await {
        Ok(result) => result.map_err(|e| std::io::Error::other(e.to_string()))?,
        Err(_) => {
            tracing::warn!(
                timeout_secs = grace.as_secs(),
                "in-flight requests did not finish in time"
            );
            server.abort();
        }
    }
    tracing::info!("stopped");
    match load_error {
        Some(err) => Err(err.into()),
        None => Ok(()),
    }
}

/// Resolves on SIGTERM or Ctrl-C. SIGHUP, which would end the process by default (a
/// terminal closing, or an operator expecting a reload), is logged and ignored: Charter
/// has no reload on SIGHUP yet (restart to change constitutions).
pub async fn shutdown_signal() {
    #[cfg(unix)]
    let hangup = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(mut s) => loop {
                s.recv().await;
                tracing::warn!(
                    "SIGHUP received and ignored: restart to load changed constitutions"
                );
            },
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let hangup = std::future::pending::<()>();
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
        _ = hangup => {},
    }
}
