//! What the store keeps: an audit record after the privacy setting is applied, and a
//! constitution version. These are the spool's lines and the database's rows; nothing
//! here touches a file or a database.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::audit::{AuditRecord, RecordedRule, Source};
use crate::config::{Secret, TextPolicy};
use crate::constitution::Constitution;
use crate::evaluate::{Kind, Verdict};

/// One spool line.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Entry {
    Evaluation(StoredEvaluation),
    Constitution(StoredConstitution),
}

/// An evaluation as stored: the audit record with its text replaced according to
/// `audit.text` and its time as epoch milliseconds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StoredEvaluation {
    pub id: String,
    pub time_ms: i64,
    pub source: Source,
    pub client_key_id: Option<String>,
    pub constitution_id: String,
    pub constitution_version: String,
    pub model: String,
    pub kind: Kind,
    pub verdict: Verdict,
    pub risk: f32,
    pub rules: Vec<RecordedRule>,
    pub latency_ms: f64,
    pub text: Option<String>,
    pub text_hash: Option<String>,
    pub context: Option<serde_json::Value>,
}

/// A constitution version: enough to explain, later, any verdict given under it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StoredConstitution {
    pub id: String,
    pub version: String,
    /// JSON of the constitution as loaded: rules, principles, thresholds, exemplars.
    pub definition: String,
    /// JSON of its calibration (fitted thresholds and heads), when it has one: the object
    /// for one model, an array of them when it is calibrated for several.
    pub calibration: Option<String>,
    pub time_ms: i64,
}

/// How texts are kept.
#[derive(Clone)]
pub struct TextRule {
    policy: TextPolicy,
    salt: Secret,
}

impl TextRule {
    pub fn new(policy: TextPolicy, salt: Secret) -> Self {
        TextRule { policy, salt }
    }

    /// (text, text_hash) to store for `text`.
    pub fn apply(&self, text: String) -> (Option<String>, Option<String>) {
        match self.policy {
            // PostgreSQL text cannot hold NUL; the replacement character keeps the rest.
            TextPolicy::Full if text.contains('\0') => (Some(text.replace('\0', "\u{FFFD}")), None),
            TextPolicy::Full => (Some(text), None),
            TextPolicy::Hash => (None, Some(self.hash(&text))),
            TextPolicy::None => (None, None),
        }
    }

    /// Hex HMAC-SHA256 of the text keyed with the salt: equal texts give equal hashes, and
    /// without the salt a guessed text cannot be checked against the store.
    pub fn hash(&self, text: &str) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(self.salt.expose().as_bytes())
            .expect("HMAC takes keys of any length");
        mac.update(text.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }
}

impl StoredEvaluation {
    pub fn new(record: AuditRecord, text: &TextRule) -> Self {
        let time_ms = chrono::DateTime::parse_from_rfc3339(&record.time)
            .map(|t| t.timestamp_millis())
            .unwrap_or_else(|_| chrono::Utc::now().timestamp_millis());
        let (text, text_hash) = text.apply(record.text);
        StoredEvaluation {
            id: record.id,
            time_ms,
            source: record.source,
            client_key_id: record.client_key_id,
            constitution_id: record.constitution_id,
            constitution_version: record.constitution_version,
            model: record.model,
            kind: record.kind,
            verdict: record.verdict,
            risk: record.risk,
            rules: record.rules,
            latency_ms: record.latency_ms,
            text,
            text_hash,
            context: record.context,
        }
    }

    /// Ids of the violated rules.
    pub fn violated(&self) -> impl Iterator<Item = &str> {
        self.rules
            .iter()
            .filter(|r| r.violated)
            .map(|r| r.id.as_str())
    }
}

impl StoredConstitution {
    pub fn new(constitution: &Constitution) -> Self {
        StoredConstitution {
            id: constitution.id.clone(),
            version: constitution.version.clone(),
            definition: serde_json::to_string(constitution).unwrap_or_default(),
            calibration: match constitution.calibrations.as_slice() {
                [] => None,
                [one] => serde_json::to_string(one).ok(),
                many => serde_json::to_string(many).ok(),
            },
            time_ms: chrono::Utc::now().timestamp_millis(),
        }
    }
}

/// Epoch milliseconds as RFC 3339 UTC with milliseconds.
pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// RFC 3339 (any offset) to epoch milliseconds.
pub fn parse_time(s: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.timestamp_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_policies() {
        let salt = Secret::new("0123456789abcdef");
        let full = TextRule::new(TextPolicy::Full, salt.clone());
        assert_eq!(full.apply("hi".into()), (Some("hi".into()), None));
        assert_eq!(
            full.apply("a\0b".into()).0.unwrap(),
            "a\u{FFFD}b",
            "NUL cannot be stored in PostgreSQL text"
        );
        let hash = TextRule::new(TextPolicy::Hash, salt);
        let (t, h) = hash.apply("hi".into());
        assert_eq!(t, None);
        let h = h.unwrap();
        assert_eq!(h.len(), 64);
        assert_eq!(hash.hash("hi"), h, "deterministic");
        let other = TextRule::new(TextPolicy::Hash, Secret::new("another-salt-0000"));
        assert_ne!(other.hash("hi"), h, "the salt matters");
        let none = TextRule::new(TextPolicy::None, Secret::default());
        assert_eq!(none.apply("hi".into()), (None, None));
    }

    #[test]
    fn times_round_trip() {
        let ms = parse_time("2026-11-29T01:02:03.456Z").unwrap();
        assert_eq!(rfc3339(ms), "2026-11-29T01:02:03.456Z");
        assert_eq!(parse_time("2026-11-29T02:02:03.456+01:00"), Some(ms));
        assert_eq!(parse_time("yesterday"), None);
    }
}
