//! API keys: who is calling, what they may do, how fast, and with which constitutions.
//!
//! Keys live hashed in the audit database (`store::keys`), so every replica knows every
//! key; [`Keys`] reads them through a short cache (`auth.cache_secs`: a revoked key stops
//! working everywhere within it) and answers a request's key with a [`Caller`]: its id
//! (what audit records carry), scopes, constitution policy and rate limits (`limit`,
//! per replica). `auth.mode` says when a key is required: `auto` (not on a loopback bind
//! address), `keys` (always) or `none` (never).
//!
//! Owns: the key format and hashing (`key`), the policy checks, the start-up refusal.
//! Must not: know HTTP (the handlers in `http::auth` render [`Denied`] in each API's
//! shape), log a key or its hash, or put either in an error.

pub mod key;
pub mod limit;

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::{AuthMode, Config};
use crate::store::keys::{KeyRow, KeyStore};
use crate::store::StoreError;
pub use key::Scope;
use limit::{Limit, Limited, RateState, Unit};

/// Why a request may not go on.
#[derive(Debug)]
pub enum Denied {
    /// No key, and one is required (401).
    NoKey,
    /// A key that is not one of ours, or revoked (401).
    BadKey,
    /// The key lacks the route's scope (403).
    Scope(Scope),
    /// The key may not use this constitution (403).
    Constitution(String),
    /// Over the key's rate (429).
    Limited(Limited),
    /// The key database cannot be read (503); the detail is for the log.
    Unavailable(String),
}

/// Most key ids remembered (found or not) before the cache is cleared.
const CACHE_MAX: usize = 10_000;

/// The key service every replica runs.
pub struct Keys {
    mode: AuthMode,
    /// Whether a request without a key may do everything (`auto` on a loopback address).
    open: AtomicBool,
    store: KeyStore,
    ttl: Duration,
    cache: Mutex<HashMap<String, Cached>>,
    /// Each key's buckets, kept across cache refreshes (one per key, also when two
    /// requests read the key at once).
    limits: Mutex<HashMap<String, Arc<Limits>>>,
}

struct Cached {
    fetched: Instant,
    /// `None`: no such key, or revoked.
    found: Option<(String, Arc<Caller>)>,
}

/// Who is calling: a key's id and policy, or anyone (no key needed).
pub struct Caller {
    /// The key's id (`key_<16 hex>`), `None` without a key.
    pub key_id: Option<String>,
    /// `None`: every scope (no key needed).
    scopes: Option<BTreeSet<Scope>>,
    /// The constitution of requests that name none.
    pub constitution: Option<String>,
    /// The constitutions the key may use; `None`: any.
    allowed: Option<Vec<String>>,
    limits: Arc<Limits>,
}

#[derive(Default)]
struct Limits {
    requests: Option<Limit>,
    texts: Option<Limit>,
}

impl Limits {
    fn new(row: &KeyRow) -> Limits {
        Limits {
            requests: row.rate_rps.map(|r| Limit::new(Unit::Requests, r)),
            texts: row.rate_tps.map(|r| Limit::new(Unit::Texts, r)),
        }
    }

    fn same_rates(&self, row: &KeyRow) -> bool {
        self.requests.as_ref().map(Limit::rate) == row.rate_rps
            && self.texts.as_ref().map(Limit::rate) == row.rate_tps
    }
}

impl Caller {
    /// Anyone, with every scope and no limit.
    pub fn anyone() -> Caller {
        Caller {
            key_id: None,
            scopes: None,
            constitution: None,
            allowed: None,
            limits: Arc::default(),
        }
    }

    fn from_row(row: &KeyRow, limits: Arc<Limits>) -> Caller {
        let list = |s: &str| key::split_list(s).map(str::to_string).collect::<Vec<_>>();
        Caller {
            key_id: Some(row.id.clone()),
            // An unknown name in the row (a newer release's scope) grants nothing here.
            scopes: Some(
                key::split_list(&row.scopes)
                    .filter_map(|s| Scope::parse(s).ok())
                    .collect(),
            ),
            constitution: row.constitution.clone(),
            allowed: row.constitutions.as_deref().map(list),
            limits,
        }
    }

    pub fn require(&self, scope: Scope) -> Result<(), Denied> {
        match &self.scopes {
            Some(scopes) if !scopes.contains(&scope) => Err(Denied::Scope(scope)),
            _ => Ok(()),
        }
    }

    /// The constitution to use when a request names `requested` (or none: the key's
    /// default, else `None` for the service's).
    pub fn constitution_for(&self, requested: Option<&str>) -> Option<String> {
        requested
            .map(str::to_string)
            .or_else(|| self.constitution.clone())
            .or_else(|| self.allowed.as_ref().and_then(|a| a.first().cloned()))
    }

    /// Whether the key may use constitution `id` (the resolved one).
    pub fn permit(&self, id: &str) -> Result<(), Denied> {
        match &self.allowed {
            Some(allowed) if !allowed.iter().any(|a| a == id) => {
                Err(Denied::Constitution(id.to_string()))
            }
            _ => Ok(()),
        }
    }

    /// One request off the key's request bucket; its state when the key has one.
    pub fn take_request(&self) -> Result<Option<RateState>, Denied> {
        take(self.limits.requests.as_ref(), 1)
    }

    /// `n` texts off the key's text bucket; its state when the key has one.
    pub fn take_texts(&self, n: usize) -> Result<Option<RateState>, Denied> {
        take(
            self.limits.texts.as_ref(),
            u32::try_from(n).unwrap_or(u32::MAX),
        )
    }
}

fn take(limit: Option<&Limit>, n: u32) -> Result<Option<RateState>, Denied> {
    match limit {
        None => Ok(None),
        Some(limit) => limit.take(n).map(Some).map_err(Denied::Limited),
    }
}

impl Keys {
    /// The service for `config`; the database is opened at first use. Until
    /// [`Keys::start`] sees the bound address, `server.bind` says whether it is loopback.
    pub fn new(config: &Config) -> Keys {
        let keys = Keys {
            mode: config.auth.mode,
            open: AtomicBool::new(false),
            store: KeyStore::new(&config.database),
            ttl: Duration::from_secs(config.auth.cache_secs),
            cache: Mutex::default(),
            limits: Mutex::default(),
        };
        keys.set_address(config.server.bind);
        keys
    }

    fn set_address(&self, addr: SocketAddr) {
        let open = match self.mode {
            AuthMode::None => true,
            AuthMode::Auto => addr.ip().is_loopback(),
            AuthMode::Keys => false,
        };
        self.open.store(open, Ordering::Relaxed);
    }

    /// Whether keys are required on this replica.
    pub fn required(&self) -> bool {
        !self.open.load(Ordering::Relaxed)
    }

    pub fn store(&self) -> &KeyStore {
        &self.store
    }

    /// Before serving on `addr`: with keys required, the database must hold at least one
    /// (else nobody could call the service and an operator would not know why); `none` on
    /// a network address is allowed but logged.
    pub async fn start(&self, addr: SocketAddr, migrate: bool) -> Result<(), String> {
        self.set_address(addr);
        if self.mode == AuthMode::None {
            if !addr.ip().is_loopback() {
                tracing::warn!(%addr, "auth.mode = \"none\": every request may do everything");
            }
            return Ok(());
        }
        if !self.required() {
            tracing::info!(%addr, "loopback address: requests without an API key are served");
            return Ok(());
        }
        let cannot = |e: StoreError| format!("cannot read API keys from the database: {e}");
        if migrate {
            self.store.migrate().await.map_err(cannot)?;
        }
        let active = self.store.count_active().await.map_err(cannot)?;
        if active == 0 {
            return Err(format!(
                "refusing to serve on {addr} without API keys: create the first one with \
                 `charter keys create --name admin --scopes admin` (same database.url), or \
                 set auth.mode = \"none\" to run without keys"
            ));
        }
        tracing::info!(%addr, keys = active, "API keys required");
        Ok(())
    }

    /// Who sent `presented` (a key from the request's headers, if any).
    pub async fn authenticate(&self, presented: Option<&str>) -> Result<Arc<Caller>, Denied> {
        if self.mode == AuthMode::None {
            return Ok(Arc::new(Caller::anyone()));
        }
        let Some(presented) = presented.map(str::trim).filter(|k| !k.is_empty()) else {
            return if self.required() {
                Err(Denied::NoKey)
            } else {
                Ok(Arc::new(Caller::anyone()))
            };
        };
        let id = key::claimed_id(presented).ok_or(Denied::BadKey)?;
        let (hash, caller) = self.lookup(&id).await?.ok_or(Denied::BadKey)?;
        if !key::matches(presented, &hash) {
            return Err(Denied::BadKey);
        }
        Ok(caller)
    }

    async fn lookup(&self, id: &str) -> Result<Option<(String, Arc<Caller>)>, Denied> {
        {
            let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(c) = cache.get(id).filter(|c| c.fetched.elapsed() < self.ttl) {
                return Ok(c.found.clone());
            }
        }
        let row = self
            .store
            .get(id)
            .await
            .map_err(|e| Denied::Unavailable(format!("API keys: {e}")))?
            .filter(|row| row.revoked_ms.is_none());
        let found = row.map(|row| {
            let limits = self.limits_of(&row);
            (
                row.secret_sha256.clone(),
                Arc::new(Caller::from_row(&row, limits)),
            )
        });
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= CACHE_MAX {
            cache.retain(|_, c| c.fetched.elapsed() < self.ttl);
            if cache.len() >= CACHE_MAX {
                cache.clear();
            }
        }
        cache.insert(
            id.to_string(),
            Cached {
                fetched: Instant::now(),
                found: found.clone(),
            },
        );
        Ok(found)
    }

    /// The key's buckets: the ones it has while its rates stay the same.
    fn limits_of(&self, row: &KeyRow) -> Arc<Limits> {
        let mut all = self.limits.lock().unwrap_or_else(|e| e.into_inner());
        match all.get(&row.id) {
            Some(limits) if limits.same_rates(row) => Arc::clone(limits),
            _ => {
                let limits = Arc::new(Limits::new(row));
                all.insert(row.id.clone(), Arc::clone(&limits));
                limits
            }
        }
    }

    /// Forgets what this replica read of a key (after revoking it here).
    pub fn forget(&self, id: &str) {
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }
}

/// A key as listed (never its hash).
#[derive(Debug, Serialize)]
pub struct KeyInfo {
    pub id: String,
    pub name: String,
    pub scopes: Vec<String>,
    pub constitution: Option<String>,
    pub constitutions: Option<Vec<String>>,
    /// Requests per second, per replica.
    pub rate: Option<f64>,
    /// Texts per second, per replica.
    pub text_rate: Option<f64>,
    pub created: String,
    pub revoked: Option<String>,
}

impl From<&KeyRow> for KeyInfo {
    fn from(row: &KeyRow) -> Self {
        let list = |s: &str| key::split_list(s).map(str::to_string).collect::<Vec<_>>();
        KeyInfo {
            id: row.id.clone(),
            name: row.name.clone(),
            scopes: list(&row.scopes),
            constitution: row.constitution.clone(),
            constitutions: row.constitutions.as_deref().map(list),
            rate: row.rate_rps,
            text_rate: row.rate_tps,
            created: crate::store::record::rfc3339(row.created_ms),
            revoked: row.revoked_ms.map(crate::store::record::rfc3339),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(constitutions: &[&str]) -> Caller {
        let mut spec = key::KeySpec {
            name: "t".into(),
            scopes: Scope::parse_list("evaluate").unwrap(),
            text_rate: Some(2.0),
            ..Default::default()
        };
        spec.constitutions = constitutions.iter().map(|c| c.to_string()).collect();
        let row = spec.create(0).unwrap().row;
        Caller::from_row(&row, Arc::new(Limits::new(&row)))
    }

    #[test]
    fn a_key_has_its_scopes_and_anyone_has_all() {
        let c = caller(&[]);
        assert!(c.require(Scope::Evaluate).is_ok());
        assert!(matches!(
            c.require(Scope::Admin),
            Err(Denied::Scope(Scope::Admin))
        ));
        assert!(Scope::ALL
            .iter()
            .all(|s| Caller::anyone().require(*s).is_ok()));
    }

    #[test]
    fn constitutions_default_to_the_keys_and_stay_in_its_list() {
        let c = caller(&["strict", "default"]);
        assert_eq!(c.constitution_for(None).as_deref(), Some("strict"));
        assert_eq!(c.constitution_for(Some("x")).as_deref(), Some("x"));
        assert!(c.permit("default").is_ok());
        assert!(matches!(c.permit("x"), Err(Denied::Constitution(id)) if id == "x"));
        let any = caller(&[]);
        assert_eq!(any.constitution_for(None), None);
        assert!(any.permit("x").is_ok());
    }

    #[test]
    fn requests_are_limited_per_key() {
        let c = caller(&[]);
        assert!(c.take_request().unwrap().is_none(), "no request rate");
        assert_eq!(c.take_texts(2).unwrap().unwrap().remaining, 0);
        assert!(matches!(c.take_texts(1), Err(Denied::Limited(_))));
    }
}
