//! The background side of the store: the batched database writer, the spool's group
//! fsync, and the retention purge. Nothing here runs on the request path.
//!
//! The writer takes whatever is waiting in the in-memory queue (up to `audit.batch_size`)
//! and writes it in one transaction; under load batches grow by themselves while the
//! previous one commits (group commit). When the database fails it keeps the batch and
//! retries with backoff; meanwhile new records keep reaching the spool, and those that do
//! not fit in the queue are read back from the spool (replayed) once the database is back.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::db::{is_transient, Db};
use super::journal::{read_segment, Journal};
use super::metrics::Metrics;
use super::record::Entry;

/// An entry on its way to the database, with the spool segment holding it (none when
/// the spool could not be written).
pub struct Queued {
    pub seq: Option<u64>,
    pub entry: Entry,
}

pub struct Writer {
    pub db: Db,
    pub journal: Arc<Journal>,
    pub rx: mpsc::Receiver<Queued>,
    pub batch_size: usize,
    /// After a batch's first record, how long to wait for more.
    pub linger: Duration,
    pub migrate: bool,
    pub metrics: Arc<Metrics>,
    pub stop: watch::Receiver<bool>,
}

/// Exponential backoff between failed attempts, capped.
struct Backoff {
    next: Duration,
}

impl Backoff {
    const MIN: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(5);

    fn new() -> Self {
        Backoff { next: Self::MIN }
    }

    fn reset(&mut self) {
        self.next = Self::MIN;
    }

    fn step(&mut self) -> Duration {
        let now = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        now
    }
}

impl Writer {
    /// Runs until the stop signal, then makes a last attempt (at most `flush_timeout`) to
    /// write what is queued and spooled. What is still not written stays in the spool.
    pub async fn run(mut self, flush_timeout: Duration) {
        let mut prepared = false;
        let mut pending: Vec<Queued> = Vec::new();
        let mut backoff = Backoff::new();
        let mut failures_logged = 0u32;
        while !*self.stop.borrow() {
            let attempt = self.step(&mut prepared, &mut pending).await;
            match attempt {
                Ok(true) => {
                    backoff.reset();
                    failures_logged = 0;
                }
                Ok(false) => break, // the queue closed
                Err(e) => {
                    self.metrics.database_up.store(false, Ordering::Relaxed);
                    Metrics::add(&self.metrics.batch_failures, 1);
                    let delay = backoff.step();
                    // Every failure while it is fresh, then one in 20: an outage logs, it
                    // does not flood.
                    if failures_logged < 5 || failures_logged.is_multiple_of(20) {
                        tracing::warn!(
                            error = %e,
                            retry_in_ms = delay.as_millis() as u64,
                            queued = pending.len(),
                            "audit database write failed; records stay spooled"
                        );
                    }
                    failures_logged += 1;
                    let mut stop = self.stop.clone();
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = stop.wait_for(|s| *s) => {}
                    }
                }
            }
        }
        self.finish(flush_timeout, prepared, pending).await;
    }

    /// One unit of work: prepare the database, replay one spool segment, or write one
    /// batch. `Ok(false)` when there is nothing more to wait for.
    async fn step(
        &mut self,
        prepared: &mut bool,
        pending: &mut Vec<Queued>,
    ) -> Result<bool, Failure> {
        if !*prepared {
            self.prepare().await?;
            *prepared = true;
        }
        if let Some((seq, path)) = self.journal.next_replay() {
            self.replay(seq, &path).await?;
            return Ok(true);
        }
        if pending.is_empty() {
            let mut stop = self.stop.clone();
            tokio::select! {
                item = self.rx.recv() => match item {
                    Some(q) => pending.push(q),
                    None => return Ok(false),
                },
                _ = stop.wait_for(|s| *s) => return Ok(true),
            }
            // Group commit: what is already waiting, then whatever arrives within the
            // linger, up to a full batch. A stop request ends the wait early.
            let deadline = Instant::now() + self.linger;
            while pending.len() < self.batch_size {
                match self.rx.try_recv() {
                    Ok(q) => pending.push(q),
                    Err(mpsc::error::TryRecvError::Disconnected) => break,
                    Err(mpsc::error::TryRecvError::Empty) => {
                        if self.linger.is_zero() || *self.stop.borrow() {
                            break;
                        }
                        match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                            Ok(Some(q)) => pending.push(q),
                            Ok(None) | Err(_) => break,
                        }
                    }
                }
            }
        }
        self.write(pending).await?;
        Ok(true)
    }

    async fn prepare(&self) -> Result<(), Failure> {
        if self.migrate {
            let versions = self.db.migrate().await.map_err(Failure::Migrate)?;
            tracing::info!(
                database = self.db.dialect(),
                versions = ?versions,
                "audit database migrated"
            );
        } else {
            self.db.ping().await?;
        }
        self.metrics.database_up.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Writes a batch in one transaction and settles the spool's accounting; on a
    /// transient failure the batch is kept for the retry.
    async fn write(&self, pending: &mut Vec<Queued>) -> Result<(), Failure> {
        let entries: Vec<&Entry> = pending.iter().map(|q| &q.entry).collect();
        self.insert(&entries).await?;
        let mut per_segment: BTreeMap<u64, u64> = BTreeMap::new();
        for q in pending.iter() {
            if let Some(seq) = q.seq {
                *per_segment.entry(seq).or_default() += 1;
            }
        }
        Metrics::add(&self.metrics.stored, pending.len() as u64);
        pending.clear();
        for (seq, n) in per_segment {
            self.journal.committed(seq, n);
        }
        Ok(())
    }

    /// Inserts entries in one transaction. If the database refuses the batch for its data
    /// (not an outage), the entries are written one by one and the refused ones are set
    /// aside in `rejected.jsonl` instead of blocking every later record.
    async fn insert(&self, entries: &[&Entry]) -> Result<(), Failure> {
        match self.db.insert(entries).await {
            Ok(()) => {}
            Err(e) if is_transient(&e) => return Err(e.into()),
            Err(e) => {
                tracing::warn!(error = %e, entries = entries.len(), "audit batch refused; writing one by one");
                for entry in entries {
                    match self.db.insert(std::slice::from_ref(entry)).await {
                        Ok(()) => {}
                        Err(e) if is_transient(&e) => return Err(e.into()),
                        Err(e) => self.reject(entry, &e),
                    }
                }
            }
        }
        Metrics::add(&self.metrics.batches, 1);
        self.metrics.database_up.store(true, Ordering::Relaxed);
        Ok(())
    }

    fn reject(&self, entry: &Entry, err: &sqlx::Error) {
        Metrics::add(&self.metrics.rejected, 1);
        let id = match entry {
            Entry::Evaluation(e) => e.id.as_str(),
            Entry::Constitution(c) => c.version.as_str(),
        };
        let path = self.journal.dir().join("rejected.jsonl");
        let written = serde_json::to_vec(entry)
            .map_err(std::io::Error::other)
            .and_then(|mut line| {
                line.push(b'\n');
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)?;
                f.write_all(&line)?;
                f.sync_data()
            });
        match written {
            Ok(()) => {
                tracing::error!(id, error = %err, path = %path.display(), "the audit database refused a record; kept in the rejected file")
            }
            Err(e) => {
                Metrics::add(&self.metrics.dropped, 1);
                tracing::error!(id, error = %err, write_error = %e, "the audit database refused a record and it could not be set aside: lost");
            }
        }
    }

    /// Reads a spool segment back and writes it, in order, in batches.
    async fn replay(&self, seq: u64, path: &std::path::Path) -> Result<(), Failure> {
        let started = std::time::Instant::now();
        let owned = path.to_path_buf();
        let (entries, bad) = tokio::task::spawn_blocking(move || read_segment::<Entry>(&owned))
            .await
            .map_err(|e| Failure::Spool(std::io::Error::other(e.to_string())))?
            .map_err(Failure::Spool)?;
        for chunk in entries.chunks(self.batch_size.max(1)) {
            let refs: Vec<&Entry> = chunk.iter().collect();
            self.insert(&refs).await?;
        }
        Metrics::add(&self.metrics.replayed, entries.len() as u64);
        Metrics::add(&self.metrics.stored, entries.len() as u64);
        Metrics::add(&self.metrics.corrupt, bad as u64);
        self.journal.replayed(seq);
        tracing::info!(
            segment = seq,
            entries = entries.len(),
            unreadable_lines = bad,
            duration_ms = started.elapsed().as_millis() as u64,
            "audit spool segment replayed"
        );
        Ok(())
    }

    /// After the stop signal: close the queue, write what it holds and what is spooled
    /// (until `flush_timeout`), then seal the spool. Anything not written stays spooled
    /// and is replayed at the next start.
    async fn finish(mut self, flush_timeout: Duration, prepared: bool, mut pending: Vec<Queued>) {
        let started = Instant::now();
        let deadline = started + flush_timeout;
        self.rx.close();
        while let Ok(q) = self.rx.try_recv() {
            pending.push(q);
        }
        let total = pending.len();
        let flushed = tokio::time::timeout_at(deadline, async {
            if !prepared {
                self.prepare().await?;
            }
            while !pending.is_empty() {
                let rest = pending.split_off(pending.len().min(self.batch_size));
                self.write(&mut pending).await?;
                pending = rest;
            }
            while let Some((seq, path)) = self.journal.next_replay() {
                self.replay(seq, &path).await?;
            }
            Ok::<(), Failure>(())
        })
        .await;
        self.journal.seal();
        let synced = self.journal.sync();
        let spool = self.journal.stats();
        match (&flushed, synced) {
            (Ok(Ok(())), Ok(())) => tracing::info!(
                records = total,
                duration_ms = started.elapsed().as_millis() as u64,
                "audit queue flushed to the database"
            ),
            (_, Err(e)) => {
                tracing::error!(error = %e, spool_bytes = spool.bytes, "cannot fsync the audit spool at shutdown")
            }
            (Ok(Err(e)), Ok(())) => tracing::warn!(
                error = %e,
                spool_bytes = spool.bytes,
                spool_segments = spool.segments,
                "audit database unavailable at shutdown; records stay in the spool for the next start"
            ),
            (Err(_), Ok(())) => tracing::warn!(
                timeout_secs = flush_timeout.as_secs(),
                spool_bytes = spool.bytes,
                spool_segments = spool.segments,
                "audit flush timed out at shutdown; records stay in the spool for the next start"
            ),
        }
        self.db.close().await;
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration: {0}")]
    Migrate(sqlx::migrate::MigrateError),
    #[error("spool: {0}")]
    Spool(std::io::Error),
}

/// Fsyncs the spool every `interval` (group commit for power loss) and probes it while
/// it is failing, so `/readyz` recovers without traffic.
pub async fn sync_loop(
    journal: Arc<Journal>,
    metrics: Arc<Metrics>,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let j = Arc::clone(&journal);
        let synced = tokio::task::spawn_blocking(move || j.sync()).await;
        if let Ok(Err(e)) = synced {
            tracing::error!(error = %e, "cannot fsync the audit spool");
        }
        if !metrics.spool_writable.load(Ordering::Relaxed) {
            match journal.probe() {
                Ok(()) => {
                    metrics.spool_writable.store(true, Ordering::Relaxed);
                    tracing::info!("audit spool writable again");
                }
                Err(e) => tracing::debug!(error = %e, "audit spool still not writable"),
            }
        }
    }
}

/// Deletes records older than `retention` every `interval`. Several replicas may purge
/// at once: deletes are idempotent.
pub async fn purge_loop(
    db: Db,
    metrics: Arc<Metrics>,
    retention: Duration,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    // Not at once: the first start may still be migrating.
    let first = Instant::now() + interval.min(Duration::from_secs(30));
    let mut tick = tokio::time::interval_at(first, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let cutoff = chrono::Utc::now().timestamp_millis() - retention.as_millis() as i64;
        let started = std::time::Instant::now();
        match db.purge(cutoff).await {
            Ok(0) => {}
            Ok(n) => {
                Metrics::add(&metrics.purged, n);
                tracing::info!(
                    records = n,
                    cutoff = %super::record::rfc3339(cutoff),
                    duration_ms = started.elapsed().as_millis() as u64,
                    "audit records purged"
                );
            }
            Err(e) => {
                tracing::warn!(error = %e, "audit retention purge failed; retrying at the next interval")
            }
        }
    }
}
