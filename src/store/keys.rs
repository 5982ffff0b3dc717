//! The `api_keys` table: what `charter keys` and the admin API write, and what every
//! replica reads to authenticate a request. Rows hold the sha256 of a key, never the key.
//!
//! Owns the SQL of keys, on its own lazily connected pool (keys are needed even with
//! `audit.enabled = false`). Must not: know key formats, scopes or HTTP (`auth` does),
//! or log a row's hash.

use std::time::Duration;

use sqlx::Row;
use tokio::sync::OnceCell;

use super::db::{on_pool, Db};
use super::StoreError;
use crate::config::DatabaseConfig;

/// One row of `api_keys`, as stored. `Debug` leaves the hash out.
#[derive(Clone)]
pub struct KeyRow {
    pub id: String,
    pub name: String,
    /// Hex sha256 of the whole key.
    pub secret_sha256: String,
    /// Comma-separated scope names.
    pub scopes: String,
    pub constitution: Option<String>,
    /// Comma-separated allowed constitution ids; `None`: any.
    pub constitutions: Option<String>,
    pub rate_rps: Option<f64>,
    pub rate_tps: Option<f64>,
    pub created_ms: i64,
    pub revoked_ms: Option<i64>,
}

impl std::fmt::Debug for KeyRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRow")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("scopes", &self.scopes)
            .field("revoked_ms", &self.revoked_ms)
            .finish_non_exhaustive()
    }
}

const COLUMNS: &str = "id, name, secret_sha256, scopes, constitution, constitutions, rate_rps, \
                       rate_tps, created_ms, revoked_ms";

macro_rules! key_from_row {
    ($row:ident) => {
        Ok::<KeyRow, sqlx::Error>(KeyRow {
            id: $row.try_get("id")?,
            name: $row.try_get("name")?,
            secret_sha256: $row.try_get("secret_sha256")?,
            scopes: $row.try_get("scopes")?,
            constitution: $row.try_get("constitution")?,
            constitutions: $row.try_get("constitutions")?,
            rate_rps: $row.try_get("rate_rps")?,
            rate_tps: $row.try_get("rate_tps")?,
            created_ms: $row.try_get("created_ms")?,
            revoked_ms: $row.try_get("revoked_ms")?,
        })
    };
}

/// The keys' database: the audit database (`database.url`), on a pool of its own made
/// at first use.
pub struct KeyStore {
    config: DatabaseConfig,
    db: OnceCell<Db>,
}

impl KeyStore {
    pub fn new(config: &DatabaseConfig) -> Self {
        KeyStore {
            config: config.clone(),
            db: OnceCell::new(),
        }
    }

    async fn db(&self) -> Result<&Db, StoreError> {
        self.db
            .get_or_try_init(|| async {
                let wait = Duration::from_millis(self.config.query_timeout_ms.max(1000));
                Db::connect_lazy(&self.config, wait).map_err(StoreError::from)
            })
            .await
    }

    /// Applies pending migrations (the `api_keys` table is one of them).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        self.db().await?.migrate().await?;
        Ok(())
    }

    pub async fn insert(&self, key: &KeyRow) -> Result<(), StoreError> {
        on_pool!(self.db().await?, pool => {
            sqlx::query(&format!(
                "INSERT INTO api_keys ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
            ))
            .bind(&key.id)
            .bind(&key.name)
            .bind(&key.secret_sha256)
            .bind(&key.scopes)
            .bind(key.constitution.as_deref())
            .bind(key.constitutions.as_deref())
            .bind(key.rate_rps)
            .bind(key.rate_tps)
            .bind(key.created_ms)
            .bind(key.revoked_ms)
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    pub async fn get(&self, id: &str) -> Result<Option<KeyRow>, StoreError> {
        let row = on_pool!(self.db().await?, pool => {
            let row = sqlx::query(&format!("SELECT {COLUMNS} FROM api_keys WHERE id = $1"))
                .bind(id)
                .fetch_optional(pool)
                .await?;
            row.map(|row| key_from_row!(row)).transpose()?
        });
        Ok(row)
    }

    /// Every key, revoked ones too, oldest first.
    pub async fn list(&self) -> Result<Vec<KeyRow>, StoreError> {
        let rows = on_pool!(self.db().await?, pool => {
            sqlx::query(&format!("SELECT {COLUMNS} FROM api_keys ORDER BY created_ms, id"))
                .fetch_all(pool)
                .await?
                .into_iter()
                .map(|row| key_from_row!(row))
                .collect::<Result<Vec<_>, _>>()?
        });
        Ok(rows)
    }

    /// Marks a key revoked (once: a second revoke keeps the first time); the row after,
    /// `None` when there is no such key.
    pub async fn revoke(&self, id: &str, now_ms: i64) -> Result<Option<KeyRow>, StoreError> {
        on_pool!(self.db().await?, pool => {
            sqlx::query("UPDATE api_keys SET revoked_ms = $1 WHERE id = $2 AND revoked_ms IS NULL")
                .bind(now_ms)
                .bind(id)
                .execute(pool)
                .await?;
        });
        self.get(id).await
    }

    /// Keys not revoked.
    pub async fn count_active(&self) -> Result<i64, StoreError> {
        let n = on_pool!(self.db().await?, pool => {
            sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM api_keys WHERE revoked_ms IS NULL")
                .fetch_one(pool)
                .await?
        });
        Ok(n)
    }

    pub async fn close(&self) {
        if let Some(db) = self.db.get() {
            db.close().await;
        }
    }
}
