//! The application state every handler shares: configuration, the engine once it has
//! loaded, where audit records go, the audit store, the gateway's service and the API
//! keys.
//!
//! Owns: the lifetime of these services (the engine is set once, when it has loaded).
//! Must not: know HTTP (handlers turn "not loaded yet" into their own answer) or hold
//! request logic.

use std::sync::{Arc, OnceLock};

use crate::audit::AuditSink;
use crate::auth::Keys;
use crate::config::Config;
use crate::engine::Engine;
use crate::gateway::Gateway;
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
    gateway: Arc<Gateway>,
    keys: Arc<Keys>,
}

impl AppState {
    pub fn new(config: Config, audit: Arc<dyn AuditSink>) -> Self {
        Self::build(config, audit, None)
    }

    /// A state whose audit records go to `store`, which also answers the query API.
    pub fn with_store(config: Config, store: Arc<Store>) -> Self {
        Self::build(config, store.sink(), Some(store))
    }

    /// A state whose engine is already loaded (CLI, tests).
    pub fn with_engine(config: Config, engine: Arc<Engine>, audit: Arc<dyn AuditSink>) -> Self {
        let state = Self::new(config, audit);
        state.set_engine(engine);
        state
    }

    fn build(config: Config, audit: Arc<dyn AuditSink>, store: Option<Arc<Store>>) -> Self {
        let gateway = Arc::new(Gateway::new(config.clone(), Arc::clone(&audit)));
        let keys = Arc::new(Keys::new(&config));
        Self {
            inner: Arc::new(AppInner {
                config,
                engine: OnceLock::new(),
                audit,
                store,
                gateway,
                keys,
            }),
        }
    }

    /// Makes the loaded engine available; a second call changes nothing.
    pub fn set_engine(&self, engine: Arc<Engine>) {
        let _ = self.inner.engine.set(engine);
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

    /// The Anthropic Messages proxy's service (its upstream client, configuration, sink).
    pub fn gateway(&self) -> &Arc<Gateway> {
        &self.inner.gateway
    }

    /// The API keys: who may call what.
    pub fn keys(&self) -> &Arc<Keys> {
        &self.inner.keys
    }

    /// The engine, or `None` while it is loading.
    pub fn engine(&self) -> Option<Arc<Engine>> {
        self.inner.engine.get().cloned()
    }

    /// The engine if the service is ready, else the reason it is not: still loading, or
    /// the audit spool cannot be written (records could be lost).
    pub fn readiness(&self) -> Result<Arc<Engine>, String> {
        if let Some(reason) = self.store().and_then(|s| s.unready_reason()) {
            return Err(reason);
        }
        self.engine()
            .ok_or_else(|| "loading model and constitutions".to_string())
    }
}
