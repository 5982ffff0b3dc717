//! Charter: a constitutional-rules evaluation service.
//!
//! A constitution is a file of natural-language rules with violating and compliant
//! exemplars. Charter embeds exemplars and candidate texts with an ONNX sentence-embedding
//! model and answers, per rule, a score, a verdict and the evidence behind it.
//!
//! # Layout
//! - [`config`]: one typed configuration (defaults < file < `CHARTER__*` env).
//! - [`constitution`]: pure; TOML rules files -> validated types with a content version.
//! - [`embed`]: the model (fastembed on ONNX Runtime), its worker threads, the bounded
//!   batching queue in front of them, long-text windows.
//! - [`evaluate`]: pure; exemplar index, per-rule scores, verdicts, evidence.
//! - [`engine`]: model + loaded constitutions; the one `evaluate` operation that the HTTP
//!   API and the CLI call.
//! - [`audit`]: the audit record of every answered evaluation and the sink it goes to.
//! - [`gateway`]: the Anthropic Messages proxy (screen, evaluate, critique/revise, guarded
//!   streaming) behind `/v1/messages`, `/v1/messages/count_tokens` and `/v1/models`.
//! - [`store`]: the audit store: spool file, batched writer, SQLite/PostgreSQL, queries.
//! - [`http`]: routes, extractors, the one error mapping, tower-http layers.
//! - [`quality`]: labelled data, grouped cross-validation, the `bench` report (JSON +
//!   PNG) and `calibrate`.
//! - `main.rs`: the CLI (`serve`, `check`, `eval`, `bench`, `calibrate`); thin.
//!
//! The request path: `http::evaluate` validates -> `Engine::evaluate` -> `Embedder::embed`
//! (queue -> model thread: tokenise, window, bucket by length, ONNX Runtime) ->
//! `evaluate::evaluate` (exemplar similarities -> rule scores) -> JSON.

pub mod audit;
pub mod config;
pub mod constitution;
pub mod embed;
pub mod engine;
pub mod evaluate;
pub mod gateway;
pub mod http;
pub mod quality;
pub mod store;

use std::future::{Future, IntoFuture};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::net::TcpListener;

use crate::audit::AuditSink;
use crate::config::Config;
use crate::engine::Engine;
use crate::http::error::AppError;
use crate::store::Store;

/// Shared state of the HTTP handlers: configuration and, once loaded, the engine.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<AppInner>,
}

struct AppInner {
    config: Config,
    engine: OnceLock<Arc<Engine>>,
    audit: Arc<dyn AuditSink>,
    store: Option<Arc<Store>>,
}

impl AppState {
    pub fn new(config: Config, audit: Arc<dyn AuditSink>) -> Self {
        Self {
            inner: Arc::new(AppInner {
                config,
                engine: OnceLock::new(),
                audit,
                store: None,
            }),
        }
    }

    /// A state whose audit records go to `store`, which also answers the query API.
    pub fn with_store(config: Config, store: Arc<Store>) -> Self {
        Self {
            inner: Arc::new(AppInner {
                config,
                engine: OnceLock::new(),
                audit: store.sink(),
                store: Some(store),
            }),
        }
    }

    /// A state whose engine is already loaded (CLI, tests).
    pub fn with_engine(config: Config, engine: Arc<Engine>, audit: Arc<dyn AuditSink>) -> Self {
        let state = Self::new(config, audit);
        let _ = state.inner.engine.set(engine);
        state
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// Where audit records go.
    pub fn audit(&self) -> &dyn AuditSink {
        self.inner.audit.as_ref()
    }

    /// The audit store, unless `audit.enabled = false`.
    pub fn store(&self) -> Option<&Arc<Store>> {
        self.inner.store.as_ref()
    }

    /// The engine, or 503 while it is loading.
    pub fn engine(&self) -> Result<Arc<Engine>, AppError> {
        self.inner.engine.get().cloned().ok_or(AppError::NotReady)
    }

    /// The engine if the service is ready, else the reason it is not: still loading, or
    /// the audit spool cannot be written (records could be lost).
    pub fn readiness(&self) -> Result<Arc<Engine>, String> {
        if let Some(reason) = self.store().and_then(|s| s.unready_reason()) {
            return Err(reason);
        }
        self.inner
            .engine
            .get()
            .cloned()
            .ok_or_else(|| "loading model and constitutions".to_string())
    }

    /// Fills in the configured Retry-After of an overload error.
    pub fn map_overload(&self, err: AppError) -> AppError {
        match err {
            AppError::Overloaded { .. } => AppError::Overloaded {
                retry_after_secs: self.config().batching.retry_after_secs,
            },
            other => other,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Engine(#[from] engine::EngineError),
    #[error("server: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Store(#[from] store::StoreError),
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
    let result = serve(state.clone(), listener, shutdown).await;
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
                    let _ = state.inner.engine.set(Arc::new(engine));
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
    let server =
        axum::serve(listener, http::router(state.clone())).with_graceful_shutdown(async move {
            let mut stop_rx = stop_rx;
            let _ = stop_rx.wait_for(|stop| *stop).await;
        });
    let mut server = tokio::spawn(server.into_future());

    let mut load_error = None;
    tokio::select! {
        _ = shutdown => tracing::info!("shutdown requested; draining in-flight requests"),
        Some(err) = failed_rx.recv() => {
            tracing::error!(error = %err, "start-up failed");
            load_error = Some(err);
        }
        result = &mut server => {
            return result.map_err(|e| std::io::Error::other(e.to_string()))?.map_err(RunError::Io);
        }
    }
    let _ = stop_tx.send(true);
    loader.abort();
    let grace = Duration::from_secs(state.config().server.shutdown_timeout_secs);
    match tokio::time::timeout(grace, &mut server).await {
        Ok(result) => result.map_err(|e| std::io::Error::other(e.to_string()))??,
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

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
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
    }
}
