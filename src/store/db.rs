//! The database: SQLite or PostgreSQL behind one enum, with the same SQL for both where
//! the dialects agree (`$N` placeholders work in both; times are integers). Each
//! operation's body is written once and compiled for each pool by [`on_pool!`].
//!
//! This module owns SQL and connections; it knows nothing of the spool or of HTTP.

use std::borrow::Cow;
use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::pool::PoolOptions;
use sqlx::postgres::{PgConnectOptions, PgPool};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqliteSynchronous};
use sqlx::{QueryBuilder, Row};

use super::query::{Bucket, Cursor, ListFilter, Page, Stats, StatsQuery};
use super::record::{Entry, StoredConstitution, StoredEvaluation};
use crate::config::DatabaseConfig;

/// The migrations, compiled in. `migrations/README.md` says how to add one.
const SQLITE_MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "audit",
        include_str!("../../migrations/sqlite/0001_audit.sql"),
    ),
    (
        2,
        "api_keys",
        include_str!("../../migrations/sqlite/0002_api_keys.sql"),
    ),
];
const POSTGRES_MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "audit",
        include_str!("../../migrations/postgres/0001_audit.sql"),
    ),
    (
        2,
        "api_keys",
        include_str!("../../migrations/postgres/0002_api_keys.sql"),
    ),
];

/// Most rows per INSERT statement: 16 binds each stays far below both databases' limits.
const ROWS_PER_STATEMENT: usize = 256;

/// Splits `rows` into chunks whose lengths are powers of two (largest first, at most
/// [`ROWS_PER_STATEMENT`]). Each distinct row count is a distinct SQL text, which the
/// database parses and sqlx prepares and caches per connection; with arbitrary batch
/// sizes every batch would be a new statement (a cache miss and a parse each time), with
/// powers of two there are only nine shapes per table, all soon cached.
fn statement_chunks<T>(mut rows: &[T]) -> impl Iterator<Item = &[T]> {
    std::iter::from_fn(move || {
        if rows.is_empty() {
            return None;
        }
        let n = rows.len().min(ROWS_PER_STATEMENT);
        let size = 1usize << (usize::BITS - 1 - n.leading_zeros());
        let (chunk, rest) = rows.split_at(size);
        rows = rest;
        Some(chunk)
    })
}
/// Rows deleted per purge statement, so a purge never holds long locks.
const PURGE_CHUNK: i64 = 5000;

#[derive(Clone)]
pub enum Db {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Runs `$body` with `$pool` bound to the concrete pool of either database.
macro_rules! on_pool {
    ($db:expr, $pool:ident => $body:expr) => {
        match $db {
            Db::Sqlite($pool) => $body,
            Db::Postgres($pool) => $body,
        }
    };
}

// `store::keys` runs its statements on either pool the same way.
pub(crate) use on_pool;

/// Filters shared by the two stats queries (`e` is the evaluations table).
macro_rules! stats_filters {
    ($q:ident, $query:ident) => {
        if let Some(c) = &$query.constitution {
            $q.push(" AND e.constitution_id = ").push_bind(c.as_str());
        }
        if let Some(source) = $query.source {
            $q.push(" AND e.source = ").push_bind(source.as_str());
        }
    };
}

/// Decodes one `evaluations` row (the columns of [`Db::get`]) from either database.
macro_rules! evaluation_from_row {
    ($row:ident) => {{
        let decode = |what: &str, e: serde_json::Error| sqlx::Error::ColumnDecode {
            index: what.to_string(),
            source: Box::new(e),
        };
        let source: String = $row.try_get("source")?;
        let kind: String = $row.try_get("kind")?;
        let verdict: String = $row.try_get("verdict")?;
        let rules: String = $row.try_get("rules")?;
        let context: Option<String> = $row.try_get("context")?;
        Ok::<StoredEvaluation, sqlx::Error>(StoredEvaluation {
            id: $row.try_get("id")?,
            time_ms: $row.try_get("time_ms")?,
            source: serde_json::from_value(serde_json::Value::String(source))
                .map_err(|e| decode("source", e))?,
            client_key_id: $row.try_get("client_key_id")?,
            constitution_id: $row.try_get("constitution_id")?,
            constitution_version: $row.try_get("constitution_version")?,
            model: $row.try_get("model")?,
            kind: serde_json::from_value(serde_json::Value::String(kind))
                .map_err(|e| decode("kind", e))?,
            verdict: serde_json::from_value(serde_json::Value::String(verdict))
                .map_err(|e| decode("verdict", e))?,
            risk: $row.try_get("risk")?,
            rules: serde_json::from_str(&rules).map_err(|e| decode("rules", e))?,
            latency_ms: $row.try_get("latency_ms")?,
            text: $row.try_get("text")?,
            text_hash: $row.try_get("text_hash")?,
            context: context
                .map(|c| serde_json::from_str(&c))
                .transpose()
                .map_err(|e| decode("context", e))?,
        })
    }};
}

impl Db {
    /// A pool that connects on first use: the service starts (and spools) while the
    /// database is down. Fails only on a malformed URL. `acquire` bounds the wait for a
    /// connection (the writer's is `connect_timeout_secs`; the query API's is short, so
    /// it answers 503 fast during an outage).
    pub fn connect_lazy(config: &DatabaseConfig, acquire: Duration) -> Result<Db, sqlx::Error> {
        let url = config.url.expose();
        let timeout = Duration::from_secs(config.connect_timeout_secs);
        if url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(url)?
                .journal_mode(SqliteJournalMode::Wal)
                // FULL: a commit is on disk before the spool segment holding it is deleted.
                .synchronous(SqliteSynchronous::Full)
                .busy_timeout(timeout);
            Ok(Db::Sqlite(
                PoolOptions::new()
                    .max_connections(config.max_connections)
                    .acquire_timeout(acquire)
                    .connect_lazy_with(options),
            ))
        } else {
            let options = PgConnectOptions::from_str(url)?.application_name("charter");
            Ok(Db::Postgres(
                PoolOptions::new()
                    .max_connections(config.max_connections)
                    .acquire_timeout(acquire)
                    .connect_lazy_with(options),
            ))
        }
    }

    pub fn dialect(&self) -> &'static str {
        match self {
            Db::Sqlite(_) => "sqlite",
            Db::Postgres(_) => "postgres",
        }
    }

    fn migrator(&self) -> Migrator {
        let set = match self {
            Db::Sqlite(_) => SQLITE_MIGRATIONS,
            Db::Postgres(_) => POSTGRES_MIGRATIONS,
        };
        Migrator {
            migrations: Cow::Owned(
                set.iter()
                    .map(|(version, description, sql)| {
                        Migration::new(
                            *version,
                            Cow::Borrowed(*description),
                            MigrationType::Simple,
                            Cow::Borrowed(*sql),
                            false,
                        )
                    })
                    .collect(),
            ),
            // An older release keeps running against a schema migrated by a newer one
            // (rolling deploys); migrations are backward compatible for that reason.
            ignore_missing: true,
            // PostgreSQL: an advisory lock, so replicas starting together migrate once.
            locking: true,
            no_tx: false,
        }
    }

    /// Applies pending migrations; returns the versions known to this release.
    pub async fn migrate(&self) -> Result<Vec<i64>, sqlx::migrate::MigrateError> {
        let migrator = self.migrator();
        on_pool!(self, pool => migrator.run(pool).await)?;
        Ok(migrator.iter().map(|m| m.version).collect())
    }

    /// A cheap round trip.
    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        on_pool!(self, pool => sqlx::query("SELECT 1").execute(pool).await.map(|_| ()))
    }

    pub async fn close(&self) {
        on_pool!(self, pool => pool.close().await)
    }

    /// Writes entries in one transaction; ids already present are left as they are, so
    /// a replay or a retry never duplicates.
    pub async fn insert(&self, entries: &[&Entry]) -> Result<(), sqlx::Error> {
        let now = chrono::Utc::now().timestamp_millis();
        let evaluations: Vec<&StoredEvaluation> = entries
            .iter()
            .filter_map(|e| match e {
                Entry::Evaluation(x) => Some(x),
                Entry::Constitution(_) => None,
            })
            .collect();
        let constitutions: Vec<&StoredConstitution> = entries
            .iter()
            .filter_map(|e| match e {
                Entry::Constitution(x) => Some(x),
                Entry::Evaluation(_) => None,
            })
            .collect();
        let rules: Vec<(String, String)> = evaluations
            .iter()
            .map(|e| serde_json::to_string(&e.rules).unwrap_or_else(|_| "[]".into()))
            .zip(evaluations.iter().map(|e| {
                e.context
                    .as_ref()
                    .map(|c| c.to_string())
                    .unwrap_or_default()
            }))
            .collect();
        let violations: Vec<(&str, &str, i64)> = evaluations
            .iter()
            .flat_map(|e| {
                e.violated()
                    .map(move |rule| (e.id.as_str(), rule, e.time_ms))
            })
            .collect();
        on_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            for chunk in statement_chunks(&constitutions) {
                let mut q = QueryBuilder::new(
                    "INSERT INTO constitution_versions \
                     (constitution_id, version, definition, calibration, first_seen_ms) ",
                );
                q.push_values(chunk, |mut b, c| {
                    b.push_bind(c.id.as_str())
                        .push_bind(c.version.as_str())
                        .push_bind(c.definition.as_str())
                        .push_bind(c.calibration.as_deref())
                        .push_bind(c.time_ms);
                });
                q.push(" ON CONFLICT (constitution_id, version) DO NOTHING");
                q.build().execute(&mut *tx).await?;
            }
            let rows: Vec<(&StoredEvaluation, &(String, String))> =
                evaluations.iter().copied().zip(rules.iter()).collect();
            for chunk in statement_chunks(&rows) {
                let mut q = QueryBuilder::new(
                    "INSERT INTO evaluations (id, time_ms, source, client_key_id, \
                     constitution_id, constitution_version, model, kind, verdict, risk, rules, \
                     latency_ms, text, text_hash, context, stored_ms) ",
                );
                q.push_values(chunk, |mut b, (e, (rules, context))| {
                    b.push_bind(e.id.as_str())
                        .push_bind(e.time_ms)
                        .push_bind(e.source.as_str())
                        .push_bind(e.client_key_id.as_deref())
                        .push_bind(e.constitution_id.as_str())
                        .push_bind(e.constitution_version.as_str())
                        .push_bind(e.model.as_str())
                        .push_bind(e.kind.as_str())
                        .push_bind(verdict_str(e.verdict))
                        .push_bind(e.risk)
                        .push_bind(rules.as_str())
                        .push_bind(e.latency_ms)
                        .push_bind(e.text.as_deref())
                        .push_bind(e.text_hash.as_deref())
                        .push_bind((!context.is_empty()).then_some(context.as_str()))
                        .push_bind(now);
                });
                q.push(" ON CONFLICT (id) DO NOTHING");
                q.build().execute(&mut *tx).await?;
            }
            for chunk in statement_chunks(&violations) {
                let mut q = QueryBuilder::new(
                    "INSERT INTO evaluation_violations (evaluation_id, rule_id, time_ms) ",
                );
                q.push_values(chunk, |mut b, (id, rule, time_ms)| {
                    b.push_bind(*id).push_bind(*rule).push_bind(*time_ms);
                });
                q.push(" ON CONFLICT (evaluation_id, rule_id) DO NOTHING");
                q.build().execute(&mut *tx).await?;
            }
            tx.commit().await
        })
    }

    pub async fn get(&self, id: &str) -> Result<Option<StoredEvaluation>, sqlx::Error> {
        on_pool!(self, pool => {
            let row = sqlx::query(
                "SELECT id, time_ms, source, client_key_id, constitution_id, \
                 constitution_version, model, kind, verdict, risk, rules, latency_ms, text, \
                 text_hash, context FROM evaluations WHERE id = $1",
            )
            .bind(id)
            .fetch_optional(pool)
            .await?;
            row.map(|row| evaluation_from_row!(row)).transpose()
        })
    }

    /// One page of evaluations, newest first.
    pub async fn list(&self, filter: &ListFilter) -> Result<Page, sqlx::Error> {
        on_pool!(self, pool => {
            let mut q = QueryBuilder::new(
                "SELECT e.id, e.time_ms, e.source, e.client_key_id, e.constitution_id, \
                 e.constitution_version, e.model, e.kind, e.verdict, e.risk, e.rules, \
                 e.latency_ms, e.text, e.text_hash, e.context FROM evaluations e WHERE 1 = 1",
            );
            if let Some(verdict) = filter.verdict {
                q.push(" AND e.verdict = ").push_bind(verdict_str(verdict));
            }
            if let Some(source) = filter.source {
                q.push(" AND e.source = ").push_bind(source.as_str());
            }
            if let Some(c) = &filter.constitution {
                q.push(" AND e.constitution_id = ").push_bind(c.as_str());
            }
            if let Some(v) = &filter.version {
                q.push(" AND e.constitution_version = ").push_bind(v.as_str());
            }
            if let Some(from) = filter.from_ms {
                q.push(" AND e.time_ms >= ").push_bind(from);
            }
            if let Some(to) = filter.to_ms {
                q.push(" AND e.time_ms < ").push_bind(to);
            }
            if let Some(rule) = &filter.rule {
                q.push(
                    " AND EXISTS (SELECT 1 FROM evaluation_violations v \
                     WHERE v.evaluation_id = e.id AND v.rule_id = ",
                )
                .push_bind(rule.as_str())
                .push(")");
            }
            if let Some(cursor) = &filter.cursor {
                q.push(" AND (e.time_ms < ")
                    .push_bind(cursor.time_ms)
                    .push(" OR (e.time_ms = ")
                    .push_bind(cursor.time_ms)
                    .push(" AND e.id < ")
                    .push_bind(cursor.id.as_str())
                    .push("))");
            }
            // One more than asked tells whether there is a next page.
            q.push(" ORDER BY e.time_ms DESC, e.id DESC LIMIT ")
                .push_bind(i64::from(filter.limit) + 1);
            let rows = q.build().fetch_all(pool).await?;
            let mut items = rows
                .into_iter()
                .map(|row| evaluation_from_row!(row))
                .collect::<Result<Vec<_>, _>>()?;
            let next = if items.len() > filter.limit as usize {
                items.truncate(filter.limit as usize);
                items.last().map(|e| Cursor {
                    time_ms: e.time_ms,
                    id: e.id.clone(),
                })
            } else {
                None
            };
            Ok(Page { items, next })
        })
    }

    /// Counts per bucket: evaluations by verdict, and violations by rule.
    pub async fn stats(&self, query: &StatsQuery) -> Result<Stats, sqlx::Error> {
        let width = query.bucket.millis();
        on_pool!(self, pool => {
            // The width is ours (hour or day), not input: inlined, so that GROUP BY sees
            // one expression.
            let mut q = QueryBuilder::new(format!("SELECT (e.time_ms / {width}) * {width}"));
            q.push(" AS bucket, e.verdict, COUNT(*) AS n FROM evaluations e WHERE e.time_ms >= ")
                .push_bind(query.from_ms)
                .push(" AND e.time_ms < ")
                .push_bind(query.to_ms);
            stats_filters!(q, query);
            q.push(" GROUP BY bucket, e.verdict");
            let verdicts = q.build().fetch_all(pool).await?;

            let mut q = QueryBuilder::new(format!("SELECT (v.time_ms / {width}) * {width}"));
            q.push(
                    " AS bucket, v.rule_id, COUNT(*) AS n FROM evaluation_violations v \
                     JOIN evaluations e ON e.id = v.evaluation_id WHERE v.time_ms >= ",
                )
                .push_bind(query.from_ms)
                .push(" AND v.time_ms < ")
                .push_bind(query.to_ms);
            stats_filters!(q, query);
            q.push(" GROUP BY bucket, v.rule_id");
            let rules = q.build().fetch_all(pool).await?;

            let mut stats = Stats::default();
            for row in verdicts {
                let bucket: i64 = row.try_get("bucket")?;
                let verdict: String = row.try_get("verdict")?;
                let n: i64 = row.try_get("n")?;
                stats.add_verdict(bucket, &verdict, n as u64);
            }
            for row in rules {
                let bucket: i64 = row.try_get("bucket")?;
                let rule: String = row.try_get("rule_id")?;
                let n: i64 = row.try_get("n")?;
                stats.add_rule(bucket, rule, n as u64);
            }
            Ok(stats)
        })
    }

    /// Deletes evaluations answered before `cutoff_ms`, in chunks; returns how many.
    pub async fn purge(&self, cutoff_ms: i64) -> Result<u64, sqlx::Error> {
        let mut total = 0;
        on_pool!(self, pool => {
            loop {
                let mut tx = pool.begin().await?;
                let ids: Vec<String> = sqlx::query_scalar(
                    "SELECT id FROM evaluations WHERE time_ms < $1 LIMIT $2",
                )
                .bind(cutoff_ms)
                .bind(PURGE_CHUNK)
                .fetch_all(&mut *tx)
                .await?;
                if ids.is_empty() {
                    break;
                }
                for chunk in ids.chunks(ROWS_PER_STATEMENT) {
                    let mut q = QueryBuilder::new(
                        "DELETE FROM evaluation_violations WHERE evaluation_id IN (",
                    );
                    let mut sep = q.separated(", ");
                    for id in chunk {
                        sep.push_bind(id.as_str());
                    }
                    q.push(")");
                    q.build().execute(&mut *tx).await?;
                    let mut q = QueryBuilder::new("DELETE FROM evaluations WHERE id IN (");
                    let mut sep = q.separated(", ");
                    for id in chunk {
                        sep.push_bind(id.as_str());
                    }
                    q.push(")");
                    let done = q.build().execute(&mut *tx).await?;
                    total += done.rows_affected();
                }
                tx.commit().await?;
            }
            Ok(total)
        })
    }
}

fn verdict_str(v: crate::evaluate::Verdict) -> &'static str {
    match v {
        crate::evaluate::Verdict::Pass => "pass",
        crate::evaluate::Verdict::Fail => "fail",
    }
}

impl Bucket {
    pub fn millis(self) -> i64 {
        match self {
            Bucket::Hour => 3_600_000,
            Bucket::Day => 86_400_000,
        }
    }
}

/// Whether a database error may go away by itself (an outage, a lock, missing tables
/// before migrations ran) rather than being this data's fault.
pub fn is_transient(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            let message = db.message();
            // PostgreSQL SQLSTATE classes: 08 connection, 40 rollback (serialization,
            // deadlock), 53 resources, 57 operator intervention, 58 system, XX internal;
            // 42P01 undefined table (not migrated yet).
            let pg_transient = ["08", "40", "53", "57", "58", "XX"]
                .iter()
                .any(|class| code.starts_with(class))
                || code == "42P01";
            // SQLite (extended) result codes: BUSY 5, LOCKED 6, IOERR 10, FULL 13,
            // CANTOPEN 14, READONLY 8; and a missing table before migrations.
            let sqlite_code = code.parse::<i64>().ok().map(|c| c & 0xff);
            let sqlite_transient = matches!(sqlite_code, Some(5 | 6 | 8 | 10 | 13 | 14))
                || message.contains("no such table");
            pg_transient || sqlite_transient
        }
        sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::Decode(_)
        | sqlx::Error::Encode(_)
        | sqlx::Error::TypeNotFound { .. }
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::ColumnIndexOutOfBounds { .. } => false,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(dir: &str) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".sql"))
            .collect();
        names.sort();
        names
    }

    #[test]
    fn statements_have_power_of_two_row_counts_and_keep_every_row_in_order() {
        for n in [0usize, 1, 2, 3, 14, 255, 256, 257, 1000] {
            let rows: Vec<usize> = (0..n).collect();
            let chunks: Vec<&[usize]> = statement_chunks(&rows).collect();
            assert!(chunks
                .iter()
                .all(|c| c.len().is_power_of_two() && c.len() <= ROWS_PER_STATEMENT));
            let joined: Vec<usize> = chunks.concat();
            assert_eq!(joined, rows, "n = {n}");
        }
        let rows = [0u8; 14];
        let sizes: Vec<usize> = statement_chunks(&rows).map(<[u8]>::len).collect();
        assert_eq!(sizes, [8, 4, 2]);
    }

    #[test]
    fn compiled_in_migrations_match_the_folders() {
        for (dir, set) in [
            ("migrations/sqlite", SQLITE_MIGRATIONS),
            ("migrations/postgres", POSTGRES_MIGRATIONS),
        ] {
            let expected: Vec<String> = set
                .iter()
                .map(|(v, d, _)| format!("{v:04}_{d}.sql"))
                .collect();
            assert_eq!(listed(dir), expected, "{dir}");
            for (v, d, sql) in set {
                let on_disk = std::fs::read_to_string(format!("{dir}/{v:04}_{d}.sql")).unwrap();
                assert_eq!(&on_disk, sql);
            }
        }
        assert_eq!(
            SQLITE_MIGRATIONS.iter().map(|m| m.0).collect::<Vec<_>>(),
            POSTGRES_MIGRATIONS.iter().map(|m| m.0).collect::<Vec<_>>(),
            "both databases have the same versions"
        );
    }
}
