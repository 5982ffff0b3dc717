//! The audit store's counters and gauges, rendered in the Prometheus text format by
//! `GET /metrics`. Plain atomics: no metrics crate for a dozen numbers.

use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

#[derive(Default)]
pub struct Metrics {
    /// Records handed to the sink.
    pub records: AtomicU64,
    /// Entries written to the database by the writer (including replays; duplicates are
    /// no-ops in the database).
    pub stored: AtomicU64,
    /// Entries read back from the spool and written.
    pub replayed: AtomicU64,
    /// Entries that could not be appended to the spool.
    pub spool_failures: AtomicU64,
    /// Records neither spooled nor queued: lost. Each is also logged as an error.
    pub dropped: AtomicU64,
    /// Records the database refused (bad data, not an outage), kept in `rejected.jsonl`.
    pub rejected: AtomicU64,
    /// Spool lines that could not be read back.
    pub corrupt: AtomicU64,
    pub batches: AtomicU64,
    pub batch_failures: AtomicU64,
    pub purged: AtomicU64,
    pub database_up: AtomicBool,
    pub spool_writable: AtomicBool,
}

/// Values read at render time, not kept as counters.
pub struct Gauges {
    pub queue_depth: usize,
    pub queue_capacity: usize,
    pub spool_bytes: u64,
    pub spool_segments: usize,
}

fn get(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

impl Metrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn render(&self, gauges: &Gauges) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {value}");
        };
        metric(
            "charter_audit_records_total",
            "counter",
            "Audit records handed to the store.",
            get(&self.records),
        );
        metric(
            "charter_audit_stored_total",
            "counter",
            "Audit entries written to the database (replays included).",
            get(&self.stored),
        );
        metric(
            "charter_audit_replayed_total",
            "counter",
            "Audit entries read back from the spool and written to the database.",
            get(&self.replayed),
        );
        metric(
            "charter_audit_spool_write_failures_total",
            "counter",
            "Audit records that could not be appended to the spool.",
            get(&self.spool_failures),
        );
        metric(
            "charter_audit_dropped_total",
            "counter",
            "Audit records lost: neither spooled nor queued (each one is logged).",
            get(&self.dropped),
        );
        metric(
            "charter_audit_rejected_total",
            "counter",
            "Audit records the database refused, kept in the spool folder's rejected.jsonl.",
            get(&self.rejected),
        );
        metric(
            "charter_audit_spool_corrupt_lines_total",
            "counter",
            "Spool lines that could not be read back.",
            get(&self.corrupt),
        );
        metric(
            "charter_audit_batches_total",
            "counter",
            "Database transactions committed by the audit writer.",
            get(&self.batches),
        );
        metric(
            "charter_audit_batch_failures_total",
            "counter",
            "Audit writer transactions that failed (retried).",
            get(&self.batch_failures),
        );
        metric(
            "charter_audit_purged_total",
            "counter",
            "Audit records deleted by the retention purge.",
            get(&self.purged),
        );
        metric(
            "charter_audit_database_up",
            "gauge",
            "1 when the last database write or check succeeded.",
            u64::from(self.database_up.load(Ordering::Relaxed)),
        );
        metric(
            "charter_audit_spool_writable",
            "gauge",
            "1 when the spool accepts writes (else /readyz is 503).",
            u64::from(self.spool_writable.load(Ordering::Relaxed)),
        );
        metric(
            "charter_audit_queue_depth",
            "gauge",
            "Audit entries waiting in memory for the writer.",
            gauges.queue_depth as u64,
        );
        metric(
            "charter_audit_queue_capacity",
            "gauge",
            "Capacity of the in-memory audit queue.",
            gauges.queue_capacity as u64,
        );
        metric(
            "charter_audit_spool_bytes",
            "gauge",
            "Bytes in the spool not yet known to be in the database.",
            gauges.spool_bytes,
        );
        metric(
            "charter_audit_spool_segments",
            "gauge",
            "Spool segment files.",
            gauges.spool_segments as u64,
        );
        out
    }
}
