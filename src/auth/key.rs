//! What a key is: its format, its hash, its scopes, and the policy it is created with.
//!
//! A key is `chk_<16 hex: id>_<64 hex: 32 random bytes>`. The id part is not secret: it is
//! the key's id (`key_<16 hex>`) in listings and audit records, and the row a request's
//! key is looked up by. The database keeps the sha256 of the whole key; a presented key
//! is hashed and compared with it in constant time ([`subtle`]).

use std::collections::BTreeSet;

use serde::Serialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::store::keys::KeyRow;

/// What a key may do. Each scope opens exactly its routes (README.md, "API keys").
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Scope {
    /// `POST /v1/evaluate`.
    #[serde(rename = "evaluate")]
    Evaluate,
    /// The Anthropic gateway: `/v1/messages`, `/v1/messages/count_tokens`, `/v1/models`.
    #[serde(rename = "gateway")]
    Gateway,
    /// The audit query API: `/v1/evaluations`, `/v1/evaluations/{id}`, `/v1/stats`.
    #[serde(rename = "audit:read")]
    AuditRead,
    /// Key management: `/v1/admin/keys`.
    #[serde(rename = "admin")]
    Admin,
    /// `GET /metrics`.
    #[serde(rename = "metrics")]
    Metrics,
}

impl Scope {
    pub const ALL: [Scope; 5] = [
        Scope::Evaluate,
        Scope::Gateway,
        Scope::AuditRead,
        Scope::Admin,
        Scope::Metrics,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Evaluate => "evaluate",
            Scope::Gateway => "gateway",
            Scope::AuditRead => "audit:read",
            Scope::Admin => "admin",
            Scope::Metrics => "metrics",
        }
    }

    pub fn parse(s: &str) -> Result<Scope, String> {
        Scope::ALL
            .into_iter()
            .find(|scope| scope.as_str() == s.trim())
            .ok_or_else(|| {
                format!(
                    "unknown scope {s:?}; scopes: evaluate, gateway, audit:read, admin, metrics"
                )
            })
    }

    /// A comma-separated list: at least one scope, each known.
    pub fn parse_list(s: &str) -> Result<BTreeSet<Scope>, String> {
        let scopes = split_list(s)
            .map(Scope::parse)
            .collect::<Result<BTreeSet<_>, _>>()?;
        if scopes.is_empty() {
            return Err("give at least one scope".into());
        }
        Ok(scopes)
    }
}

/// Items of a comma-separated list, trimmed, empty ones skipped.
pub fn split_list(s: &str) -> impl Iterator<Item = &str> {
    s.split(',').map(str::trim).filter(|x| !x.is_empty())
}

/// A new key: the key (shown once) and the row to store.
pub struct NewKey {
    pub key: String,
    pub row: KeyRow,
}

/// What a key is created with (the CLI's and the admin API's options).
#[derive(Debug, Clone, Default)]
pub struct KeySpec {
    pub name: String,
    pub scopes: BTreeSet<Scope>,
    /// Default constitution; with `constitutions` and no default, the first allowed one.
    pub constitution: Option<String>,
    /// Allowed constitutions; empty: any.
    pub constitutions: Vec<String>,
    /// Requests per second (per replica).
    pub rate: Option<f64>,
    /// Texts per second (per replica).
    pub text_rate: Option<f64>,
}

impl KeySpec {
    /// Checks the options and makes the key.
    pub fn create(mut self, now_ms: i64) -> Result<NewKey, String> {
        let name = self.name.trim().to_string();
        if name.is_empty() || name.len() > 200 || name.chars().any(char::is_control) {
            return Err("name: give 1 to 200 printable characters".into());
        }
        if self.scopes.is_empty() {
            return Err("scopes: give at least one scope".into());
        }
        for (field, rate) in [("rate", self.rate), ("text_rate", self.text_rate)] {
            if rate.is_some_and(|r| !(r.is_finite() && r > 0.0 && r <= 1e6)) {
                return Err(format!("{field}: must be a number above 0 (per second)"));
            }
        }
        if self.constitutions.iter().any(|c| c.contains(',')) {
            return Err("constitutions: ids hold no commas".into());
        }
        match (&self.constitution, self.constitutions.first()) {
            (Some(c), Some(_)) if !self.constitutions.contains(c) => {
                return Err(format!(
                    "constitution: {c:?} is not one of the allowed constitutions"
                ))
            }
            (None, Some(first)) => self.constitution = Some(first.clone()),
            _ => {}
        }
        let (key, id) = generate();
        let row = KeyRow {
            id,
            name,
            secret_sha256: hash(&key),
            scopes: self
                .scopes
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(","),
            constitution: self.constitution,
            constitutions: (!self.constitutions.is_empty()).then(|| self.constitutions.join(",")),
            rate_rps: self.rate,
            rate_tps: self.text_rate,
            created_ms: now_ms,
            revoked_ms: None,
        };
        Ok(NewKey { key, row })
    }
}

/// A fresh key and its id, from the operating system's random source.
fn generate() -> (String, String) {
    let mut bytes = [0u8; 40];
    getrandom::fill(&mut bytes).expect("the operating system's random source");
    let id = hex::encode(&bytes[..8]);
    let secret = hex::encode(&bytes[8..]);
    (format!("chk_{id}_{secret}"), format!("key_{id}"))
}

/// Hex sha256 of a key, as stored.
pub fn hash(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// The id a presented key claims (`key_<16 hex>`), if it has the shape of a key.
pub fn claimed_id(key: &str) -> Option<String> {
    let rest = key.strip_prefix("chk_")?;
    let (id, secret) = rest.split_once('_')?;
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex(id, 16) && hex(secret, 64)).then(|| format!("key_{}", id.to_ascii_lowercase()))
}

/// Whether `key` is the one whose hash is `stored`, in time independent of where they
/// differ.
pub fn matches(key: &str, stored: &str) -> bool {
    let presented = hash(key);
    presented.as_bytes().ct_eq(stored.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(scopes: &str) -> KeySpec {
        KeySpec {
            name: "ci".into(),
            scopes: Scope::parse_list(scopes).unwrap(),
            ..KeySpec::default()
        }
    }

    #[test]
    fn keys_are_random_claim_their_id_and_match_only_their_hash() {
        let a = spec("evaluate").create(1).unwrap();
        let b = spec("evaluate").create(1).unwrap();
        assert_ne!(a.key, b.key);
        assert_eq!(claimed_id(&a.key).as_deref(), Some(a.row.id.as_str()));
        assert!(matches(&a.key, &a.row.secret_sha256));
        assert!(!matches(&b.key, &a.row.secret_sha256));
        assert!(!a.row.secret_sha256.contains(&a.key[20..]));
        assert!(!format!("{:?}", a.row).contains(&a.row.secret_sha256));
        for bad in [
            "",
            "chk_",
            "sk-ant-x",
            "chk_0123_abcd",
            &a.key[..a.key.len() - 1],
        ] {
            assert_eq!(claimed_id(bad), None, "{bad}");
        }
    }

    #[test]
    fn scopes_parse_by_name_and_reject_unknown_ones() {
        let all = Scope::parse_list("evaluate, gateway,audit:read,admin,metrics").unwrap();
        assert_eq!(all.len(), 5);
        assert!(Scope::parse_list("evaluate,audit").is_err());
        assert!(Scope::parse_list(" , ").is_err());
        assert_eq!(
            spec("metrics,evaluate").create(0).unwrap().row.scopes,
            "evaluate,metrics"
        );
    }

    #[test]
    fn the_policy_is_checked_at_creation() {
        let mut s = spec("evaluate");
        s.constitutions = vec!["strict".into(), "default".into()];
        let row = s.clone().create(0).unwrap().row;
        assert_eq!(row.constitution.as_deref(), Some("strict"));
        assert_eq!(row.constitutions.as_deref(), Some("strict,default"));
        s.constitution = Some("other".into());
        assert!(s.create(0).err().unwrap().contains("constitution"));
        let mut s = spec("evaluate");
        s.rate = Some(0.0);
        assert!(s.create(0).err().unwrap().starts_with("rate"));
        let mut s = spec("evaluate");
        s.name = " ".into();
        assert!(s.create(0).is_err());
    }
}
