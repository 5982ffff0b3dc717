//! The audit store: every answered evaluation, kept in SQLite (default) or PostgreSQL
//! (several replicas), with nothing lost.
//!
//! The path of a record:
//! 1. `AuditSink::record` (on the request path, before the response): the text is
//!    replaced per `audit.text`, the record is appended to this process's spool file (one
//!    `write`, no fsync unless `audit.fsync_interval_ms = 0`) and offered to a bounded
//!    in-memory queue. A full queue costs nothing but a later read-back from the spool.
//! 2. The writer task drains the queue in batches, one transaction each, `ON CONFLICT DO
//!    NOTHING` on the record id; a committed batch releases its spool segment.
//! 3. When the database is down, batches are retried with backoff and the spool holds
//!    everything; spooled segments are replayed in order when it is back, and at start-up
//!    after a crash. On shutdown the queue is written (or left in the spool) and the
//!    spool is fsynced.
//!
//! It owns the database (migrations, SQL), the spool files and the background tasks;
//! it must not know HTTP (the query API in `http::audit` calls [`Store`]'s methods).

pub mod db;
pub mod journal;
pub mod keys;
pub mod metrics;
pub mod query;
pub mod record;
pub mod writer;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::audit::{AuditRecord, AuditSink};
use crate::config::Config;
use crate::constitution::Constitution;
use db::Db;
use journal::{Journal, SpoolError, SpoolStats};
use metrics::{Gauges, Metrics};
use query::{ListFilter, Page, Stats, StatsQuery};
use record::{Entry, StoredConstitution, StoredEvaluation, TextRule};
use writer::{Queued, Writer};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("audit database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("audit database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("audit spool: {0}")]
    Spool(#[from] SpoolError),
}

/// The store: the sink that request handlers record into, the query side, and the
/// handles to stop the background tasks.
pub struct Store {
    /// The query API's pool (the writer and the purge loop hold the other) (`database.query_timeout_ms` to get a connection).
    queries: Db,
    recorder: Arc<Recorder>,
    metrics: Arc<Metrics>,
    queue_capacity: usize,
    stop: watch::Sender<bool>,
    tasks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    flush_timeout: Duration,
}

/// The [`AuditSink`] half: cheap, synchronous, never fails the request.
pub struct Recorder {
    text: TextRule,
    journal: Arc<Journal>,
    queue: mpsc::Sender<Queued>,
    metrics: Arc<Metrics>,
    /// Last time (epoch ms) a spool failure was logged: failures are counted always and
    /// logged at most once a second.
    last_failure_log_ms: AtomicU64,
}

impl Store {
    /// Opens the spool (replaying what an earlier run left), a lazy database pool, and
    /// starts the writer, the spool's fsync and the retention purge. The database may be
    /// down: records wait in the spool. Must be called inside a tokio runtime.
    pub fn open(config: &Config) -> Result<Store, StoreError> {
        let audit = &config.audit;
        let journal = Arc::new(Journal::open(
            &audit.spool_dir,
            audit.spool_max_bytes,
            audit.fsync_interval_ms == 0,
        )?);
        let leftover = journal.stats();
        if leftover.segments > 0 {
            tracing::info!(
                segments = leftover.segments,
                bytes = leftover.bytes,
                "audit spool holds records from an earlier run; replaying them"
            );
        }
        let writer_wait = Duration::from_secs(config.database.connect_timeout_secs);
        let db = Db::connect_lazy(&config.database, writer_wait)?;
        // The query API's own pool: a short wait for a connection, so a query during an
        // outage is answered 503 at once instead of after the writer's connect timeout.
        let queries = Db::connect_lazy(
            &config.database,
            Duration::from_millis(config.database.query_timeout_ms),
        )?;
        let metrics = Arc::new(Metrics::default());
        metrics.spool_writable.store(true, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(audit.queue_capacity);
        let (stop, stop_rx) = watch::channel(false);
        let recorder = Arc::new(Recorder {
            text: TextRule::new(audit.text, audit.text_salt.clone()),
            journal: Arc::clone(&journal),
            queue: tx,
            metrics: Arc::clone(&metrics),
            last_failure_log_ms: AtomicU64::new(0),
        });
        let flush_timeout = Duration::from_secs(audit.flush_timeout_secs);
        let mut tasks = vec![tokio::spawn(
            Writer {
                db: db.clone(),
                journal: Arc::clone(&journal),
                rx,
                batch_size: audit.batch_size,
                linger: Duration::from_millis(audit.batch_linger_ms),
                migrate: config.database.migrate,
                metrics: Arc::clone(&metrics),
                stop: stop_rx.clone(),
            }
            .run(flush_timeout),
        )];
        let sync_every = if audit.fsync_interval_ms == 0 {
            Duration::from_secs(1)
        } else {
            Duration::from_millis(audit.fsync_interval_ms)
        };
        tasks.push(tokio::spawn(writer::sync_loop(
            Arc::clone(&journal),
            Arc::clone(&metrics),
            sync_every,
            stop_rx.clone(),
        )));
        if audit.retention_days > 0 {
            tasks.push(tokio::spawn(writer::purge_loop(
                db.clone(),
                Arc::clone(&metrics),
                Duration::from_secs(audit.retention_days * 86_400),
                Duration::from_secs(audit.purge_interval_secs),
                stop_rx,
            )));
        }
        tracing::info!(
            database = db.dialect(),
            spool = %audit.spool_dir.display(),
            text = ?audit.text,
            fsync_interval_ms = audit.fsync_interval_ms,
            "audit store open"
        );
        Ok(Store {
            queries,
            recorder,
            metrics,
            queue_capacity: audit.queue_capacity,
            stop,
            tasks: std::sync::Mutex::new(tasks),
            flush_timeout,
        })
    }

    /// Where request handlers hand their records.
    pub fn sink(&self) -> Arc<dyn AuditSink> {
        Arc::clone(&self.recorder) as Arc<dyn AuditSink>
    }

    /// Records a constitution version (stored once per id and version).
    pub fn register_constitution(&self, constitution: &Constitution) {
        self.recorder
            .submit(Entry::Constitution(StoredConstitution::new(constitution)));
    }

    pub async fn get(&self, id: &str) -> Result<Option<StoredEvaluation>, StoreError> {
        Ok(self.queries.get(id).await?)
    }

    pub async fn list(&self, filter: &ListFilter) -> Result<Page, StoreError> {
        Ok(self.queries.list(filter).await?)
    }

    pub async fn stats(&self, query: &StatsQuery) -> Result<Stats, StoreError> {
        Ok(self.queries.stats(query).await?)
    }

    /// Why the store cannot keep records now, if it cannot: the spool refuses writes.
    pub fn unready_reason(&self) -> Option<String> {
        (!self.metrics.spool_writable.load(Ordering::Relaxed))
            .then(|| "audit spool cannot be written".to_string())
    }

    pub fn spool(&self) -> SpoolStats {
        self.recorder.journal.stats()
    }

    pub fn database_up(&self) -> bool {
        self.metrics.database_up.load(Ordering::Relaxed)
    }

    pub fn queue_depth(&self) -> usize {
        self.queue_capacity - self.recorder.queue.capacity()
    }

    /// Prometheus text of the store's metrics.
    pub fn render_metrics(&self) -> String {
        let spool = self.spool();
        self.metrics.render(&Gauges {
            queue_depth: self.queue_depth(),
            queue_capacity: self.queue_capacity,
            spool_bytes: spool.bytes,
            spool_segments: spool.segments,
        })
    }

    /// Stops the background tasks after the writer has written what is queued (at most
    /// `audit.flush_timeout_secs`, then it stays in the spool) and fsynced the spool.
    /// Call after the server has stopped answering.
    pub async fn shutdown(&self) {
        let _ = self.stop.send(true);
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        // The writer bounds its own flush; the margin covers a hung database call.
        let limit = self.flush_timeout + Duration::from_secs(5);
        for task in tasks {
            if tokio::time::timeout(limit, task).await.is_err() {
                tracing::error!(
                    "audit task did not stop in time; unwritten records stay in the spool"
                );
            }
        }
    }
}

/// Applies the migrations for `charter migrate`; returns the database dialect and the
/// versions this release knows.
pub async fn migrate(
    config: &crate::config::DatabaseConfig,
) -> Result<(&'static str, Vec<i64>), StoreError> {
    let db = Db::connect_lazy(config, Duration::from_secs(config.connect_timeout_secs))?;
    let versions = db.migrate().await;
    db.close().await;
    Ok((db.dialect(), versions?))
}

impl Recorder {
    fn submit(&self, entry: Entry) {
        let line = match serde_json::to_vec(&entry) {
            Ok(mut line) => {
                line.push(b'\n');
                line
            }
            // Unreachable for our types (no maps with non-string keys); counted if not.
            Err(e) => {
                Metrics::add(&self.metrics.spool_failures, 1);
                tracing::error!(error = %e, "cannot serialize an audit entry");
                Vec::new()
            }
        };
        let seq = if line.is_empty() {
            None
        } else {
            match self.journal.append(&line) {
                Ok(seq) => {
                    self.metrics.spool_writable.store(true, Ordering::Relaxed);
                    Some(seq)
                }
                Err(e) => {
                    self.metrics.spool_writable.store(false, Ordering::Relaxed);
                    Metrics::add(&self.metrics.spool_failures, 1);
                    self.log_failure(&e);
                    None
                }
            }
        };
        match self.queue.try_send(Queued { seq, entry }) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(q) | mpsc::error::TrySendError::Closed(q)) => {
                match q.seq {
                    // In the spool: the writer reads it back from there.
                    Some(seq) => self.journal.mark_replay(seq),
                    None => {
                        Metrics::add(&self.metrics.dropped, 1);
                        let id = match &q.entry {
                            Entry::Evaluation(e) => e.id.as_str(),
                            Entry::Constitution(c) => c.version.as_str(),
                        };
                        tracing::error!(
                            id,
                            "audit record lost: the spool cannot be written and the queue is full"
                        );
                    }
                }
            }
        }
    }

    fn log_failure(&self, err: &SpoolError) {
        let now = chrono::Utc::now().timestamp_millis() as u64;
        let last = self.last_failure_log_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= 1000
            && self
                .last_failure_log_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::error!(
                error = %err,
                failures_total = self.metrics.spool_failures.load(Ordering::Relaxed),
                "cannot append to the audit spool; records are kept in memory only (/readyz is 503)"
            );
        }
    }
}

impl AuditSink for Recorder {
    fn record(&self, record: AuditRecord) {
        Metrics::add(&self.metrics.records, 1);
        self.submit(Entry::Evaluation(StoredEvaluation::new(record, &self.text)));
    }
}
