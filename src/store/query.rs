//! The query side's types: list filters, the opaque pagination cursor, stats queries and
//! their results. Pure: parsing and shaping only, no SQL.

use std::collections::BTreeMap;

use serde::Serialize;

use super::record::{rfc3339, StoredEvaluation};
use crate::audit::Source;
use crate::evaluate::Verdict;

/// `GET /v1/evaluations` filters; all optional except the page size.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub verdict: Option<Verdict>,
    /// Evaluations that violated this rule.
    pub rule: Option<String>,
    pub constitution: Option<String>,
    pub version: Option<String>,
    pub source: Option<Source>,
    /// Inclusive.
    pub from_ms: Option<i64>,
    /// Exclusive.
    pub to_ms: Option<i64>,
    pub cursor: Option<Cursor>,
    pub limit: u32,
}

/// Where the next page starts: after (time, id) in newest-first order. Opaque to clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub time_ms: i64,
    pub id: String,
}

impl Cursor {
    pub fn encode(&self) -> String {
        hex::encode(format!("{}:{}", self.time_ms, self.id))
    }

    pub fn decode(s: &str) -> Option<Cursor> {
        let raw = String::from_utf8(hex::decode(s).ok()?).ok()?;
        let (time, id) = raw.split_once(':')?;
        Some(Cursor {
            time_ms: time.parse().ok()?,
            id: id.to_string(),
        })
    }
}

pub struct Page {
    pub items: Vec<StoredEvaluation>,
    pub next: Option<Cursor>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Bucket {
    Hour,
    Day,
}

/// `GET /v1/stats`: a time range (from inclusive, to exclusive) cut into buckets.
#[derive(Debug, Clone)]
pub struct StatsQuery {
    pub from_ms: i64,
    pub to_ms: i64,
    pub bucket: Bucket,
    pub constitution: Option<String>,
    pub source: Option<Source>,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Counts {
    pub evaluations: u64,
    pub pass: u64,
    pub fail: u64,
    /// Evaluations that violated each rule.
    pub rules: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct StatsBucket {
    /// Start of the bucket (UTC).
    pub start: String,
    #[serde(flatten)]
    pub counts: Counts,
}

/// Counts by bucket start (epoch ms), plus totals.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    buckets: BTreeMap<i64, Counts>,
}

impl Stats {
    pub fn add_verdict(&mut self, bucket: i64, verdict: &str, n: u64) {
        let counts = self.buckets.entry(bucket).or_default();
        counts.evaluations += n;
        match verdict {
            "pass" => counts.pass += n,
            "fail" => counts.fail += n,
            _ => {}
        }
    }

    pub fn add_rule(&mut self, bucket: i64, rule: String, n: u64) {
        *self
            .buckets
            .entry(bucket)
            .or_default()
            .rules
            .entry(rule)
            .or_default() += n;
    }

    pub fn totals(&self) -> Counts {
        let mut total = Counts::default();
        for counts in self.buckets.values() {
            total.evaluations += counts.evaluations;
            total.pass += counts.pass;
            total.fail += counts.fail;
            for (rule, n) in &counts.rules {
                *total.rules.entry(rule.clone()).or_default() += n;
            }
        }
        total
    }

    /// Buckets that hold any evaluation, oldest first.
    pub fn buckets(&self) -> Vec<StatsBucket> {
        self.buckets
            .iter()
            .map(|(start, counts)| StatsBucket {
                start: rfc3339(*start),
                counts: counts.clone(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        let c = Cursor {
            time_ms: 1_764_000_000_123,
            id: "eval_0190.3".into(),
        };
        assert_eq!(Cursor::decode(&c.encode()), Some(c));
        assert_eq!(Cursor::decode("zz"), None);
        assert_eq!(Cursor::decode(&hex::encode("nocolon")), None);
        assert_eq!(Cursor::decode(&hex::encode("x:id")), None);
    }

    #[test]
    fn stats_total_over_buckets() {
        let mut s = Stats::default();
        s.add_verdict(0, "pass", 3);
        s.add_verdict(0, "fail", 2);
        s.add_verdict(3_600_000, "fail", 1);
        s.add_rule(0, "privacy".into(), 2);
        s.add_rule(3_600_000, "privacy".into(), 1);
        let t = s.totals();
        assert_eq!((t.evaluations, t.pass, t.fail), (6, 3, 3));
        assert_eq!(t.rules["privacy"], 3);
        let b = s.buckets();
        assert_eq!(b.len(), 2);
        assert_eq!(b[1].start, "1970-01-01T01:00:00.000Z");
    }
}
