//! One typed configuration: built-in defaults < a TOML file < `CHARTER__SECTION__KEY`
//! environment variables (< command-line flags, applied by `main`).
//!
//! The defaults live in `src/config/defaults.toml`, compiled into the binary, so the file
//! that documents every key is also the one that sets it. README.md lists the keys.
//! This module owns parsing and validation of settings; it knows nothing of HTTP or models.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The built-in defaults, documented key by key.
pub const DEFAULTS_TOML: &str = include_str!("config/defaults.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("configuration: {field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub model: ModelConfig,
    pub batching: BatchingConfig,
    pub limits: LimitsConfig,
    pub constitutions: ConstitutionsConfig,
    pub scoring: ScoringConfig,
    pub log: LogConfig,
    pub gateway: GatewayConfig,
    pub database: DatabaseConfig,
    pub audit: AuditConfig,
    pub auth: AuthConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address the HTTP server listens on.
    pub bind: SocketAddr,
    /// Whole-request deadline; a request still running after it gets 408.
    pub request_timeout_secs: u64,
    /// Largest accepted request body.
    pub body_limit_bytes: usize,
    /// How long shutdown waits for in-flight requests before giving up.
    pub shutdown_timeout_secs: u64,
    /// Longest wait for a complete request head, from the connection opening or, on a
    /// kept-alive connection, from the previous response (so also the idle keep-alive
    /// timeout); the connection is closed after it.
    pub header_read_timeout_secs: u64,
    /// Most connections open at once; beyond it new ones wait in the listen backlog.
    pub max_connections: usize,
    /// Browser origins allowed to call the API (CORS), comma-separated, or `*`; empty:
    /// no CORS headers, so browsers keep other sites' pages out.
    #[serde(default)]
    pub cors_origins: String,
}

impl ServerConfig {
    /// The CORS origins: `None` when CORS is off, `Some(vec![])` for any origin (`*`).
    pub fn cors(&self) -> Result<Option<Vec<axum::http::HeaderValue>>, String> {
        let origins: Vec<&str> = self
            .cors_origins
            .split(',')
            .map(str::trim)
            .filter(|o| !o.is_empty())
            .collect();
        if origins.is_empty() {
            return Ok(None);
        }
        if origins == ["*"] {
            return Ok(Some(Vec::new()));
        }
        origins
            .iter()
            .map(|o| {
                let url = reqwest::Url::parse(o).map_err(|e| format!("{o:?}: {e}"))?;
                let bare = matches!(url.scheme(), "http" | "https")
                    && url.path() == "/"
                    && url.query().is_none()
                    && !o.ends_with('/');
                if !bare {
                    return Err(format!(
                        "{o:?} is not an origin (scheme://host[:port], or \"*\" alone)"
                    ));
                }
                axum::http::HeaderValue::from_str(o).map_err(|e| format!("{o:?}: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Model name: a folder under `<assets_dir>/models/` made by the set-up step.
    pub name: String,
    /// Explicit model folder; overrides `assets_dir/models/name` when set.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// Where the set-up step put models and ONNX Runtime.
    pub assets_dir: PathBuf,
    /// ONNX Runtime shared library; default `<assets_dir>/onnxruntime/libonnxruntime.so.*`.
    #[serde(default)]
    pub runtime_library: Option<PathBuf>,
    /// Model worker threads, each with its own session.
    pub workers: usize,
    /// ONNX Runtime intra-op threads per worker.
    pub intra_threads: usize,
    /// Whether idle intra-op threads spin briefly for the next op instead of sleeping.
    pub intra_spinning: bool,
    /// A second model folder under `<assets_dir>/models/`: every text is embedded by both
    /// and each rule's score is the mean of the two models' calibrated margins.
    #[serde(default)]
    pub ensemble: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchingConfig {
    /// Most padded tokens (texts x longest text) in one model call.
    pub max_batch_tokens: usize,
    /// Most texts in one model call.
    pub max_batch_size: usize,
    /// Longest/shortest token-length ratio allowed inside one model call.
    pub bucket_ratio: f32,
    /// Room of the queue in work units (one per text plus one per KiB of text); a
    /// request that finds too little room left gets 429.
    pub queue_capacity: usize,
    /// The largest share of `queue_capacity` one request may hold (0 < share <= 1); a
    /// bigger request gets 429 naming this key.
    pub max_request_share: f64,
    /// Seconds sent in `Retry-After` with a 429.
    pub retry_after_secs: u64,
}

impl BatchingConfig {
    /// Work units one request may hold: `max_request_share` of `queue_capacity`.
    pub fn max_request_units(&self) -> usize {
        ((self.queue_capacity as f64 * self.max_request_share) as usize).max(1)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Longest accepted text, in characters.
    pub max_text_chars: usize,
    /// Most texts in one batch request.
    pub max_batch_texts: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConstitutionsConfig {
    /// Folder of `*.toml` constitution files, loaded at start.
    pub dir: PathBuf,
    /// Constitution used when a request names none.
    pub default: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScoringConfig {
    /// Nearest exemplars averaged on each side (violating, compliant).
    pub top_k: usize,
    /// Texts longer than this many tokens are also scored sentence by sentence; a sentence
    /// longer than this is cut into windows of this many tokens.
    pub window_tokens: usize,
    /// Tokens between the starts of windows inside a long sentence.
    pub window_stride: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: LogFormat,
    /// tracing filter directive, e.g. `info` or `charter=debug,tower_http=info`.
    pub filter: String,
}

/// Dependencies whose debug and trace output floods a log (the tokenizer traces every
/// text: 470 MB in seconds at `trace`): held at `info` unless the filter names them.
const CHATTY_DEPENDENCIES: &[&str] = &[
    "tokenizers",
    "ort",
    "hyper",
    "hyper_util",
    "h2",
    "reqwest",
    "rustls",
    "sqlx",
];

impl LogConfig {
    /// The filter to install: `filter`, with every chatty dependency it does not name
    /// held at `info`.
    pub fn directives(&self) -> String {
        let mut out = self.filter.trim().to_string();
        for dep in CHATTY_DEPENDENCIES {
            let named = self.filter.split(',').any(|d| {
                let target = d.trim().split(['=', '[']).next().unwrap_or("");
                target == *dep || target.starts_with(&format!("{dep}::"))
            });
            if !named {
                if !out.is_empty() {
                    out.push(',');
                }
                out.push_str(&format!("{dep}=info"));
            }
        }
        out
    }
}

/// The Anthropic Messages gateway (`src/gateway/`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Base URL of the Anthropic API (or anything speaking it); paths are appended.
    pub upstream_url: String,
    /// Key sent upstream (as `x-api-key`) when the client sends none. Set it with
    /// `CHARTER__GATEWAY__API_KEY`; it is never logged.
    #[serde(default)]
    pub api_key: Option<Secret>,
    /// TCP + TLS connect deadline for upstream calls.
    pub connect_timeout_secs: u64,
    /// Whole deadline of a non-streaming exchange, critique and revision rounds included,
    /// and of a stream's response headers.
    pub request_timeout_secs: u64,
    /// Longest silence between two reads of an upstream body (streams included).
    pub idle_timeout_secs: u64,
    /// Largest accepted request body (Anthropic's own limit is 32 MB).
    pub body_limit_bytes: usize,
    /// Largest non-streaming upstream response the gateway reads.
    pub max_response_bytes: usize,
    /// Evaluate the last user turn before forwarding it.
    pub screen_prompts: bool,
    /// Also evaluate the system prompt (when `screen_prompts`).
    pub screen_system: bool,
    /// Earlier user turns screened with the new input (when `screen_prompts`): the last
    /// N user turns before it and the new input are evaluated as one more text, so a
    /// request spread over turns is seen whole. 0 (the default) screens the new input only.
    #[serde(default)]
    pub screen_history: usize,
    /// Evaluate the model's text output (and act on violations).
    pub evaluate_output: bool,
    /// Mask what the constitution's `redact` rules find (personal data, secrets) in the
    /// last user turn's text before the request goes upstream. Off by default: the
    /// request is then forwarded as the client's bytes.
    #[serde(default)]
    pub redact_prompts: bool,
    /// Characters of output text per evaluated window (`gateway::review::output_windows`,
    /// the same windows streamed or not); a stream holds this much back until it is
    /// evaluated.
    pub hold_back_chars: usize,
    /// Characters before each window evaluated with it; a stream releases them only once
    /// that window has passed too.
    pub context_chars: usize,
    /// Critique-and-revise rounds before a revise-rule violation is blocked.
    pub max_revise_rounds: u32,
    /// `max_tokens` of each critique call.
    pub critique_max_tokens: u32,
    /// Most tokens (input + output) the critique and revision calls of one request may
    /// spend upstream; a call that would not fit (its input estimated, its `max_tokens`
    /// lowered to what remains) is not made and the answer is blocked instead. 0: no cap.
    #[serde(default)]
    pub revise_max_tokens: u64,
    /// Constitution for requests that name none (header, key map); unset: `constitutions.default`.
    #[serde(default)]
    pub constitution: Option<String>,
    /// Constitution per client key id (`key_` + 12 hex digits of the key's sha256, as in
    /// the audit log).
    #[serde(default)]
    pub constitution_by_key: std::collections::BTreeMap<String, String>,
    /// Text of the refusal that replaces a blocked prompt or output.
    pub refusal_message: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `sqlite://FILE[?mode=rwc]` or `postgres://USER[:PASSWORD]@HOST[:PORT]/DB`.
    pub url: Secret,
    /// Connection pool size.
    pub max_connections: u32,
    /// How long one attempt waits for a connection (the writer).
    pub connect_timeout_secs: u64,
    /// How long a query of the query API waits for a connection: 503 after it.
    pub query_timeout_ms: u64,
    /// Apply pending migrations at start-up.
    pub migrate: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Keep audit records in the database; `false` only logs them.
    pub enabled: bool,
    /// What is stored of each evaluated text.
    pub text: TextPolicy,
    /// Key of the salted text hash (`text = "hash"`).
    pub text_salt: Secret,
    /// Records waiting in memory for the database writer.
    pub queue_capacity: usize,
    /// Most records per database transaction.
    pub batch_size: usize,
    /// How long the writer waits for more records after the first of a batch, so that
    /// transactions (and their commits) stay few under load. Off the request path.
    pub batch_linger_ms: u64,
    /// Folder of this process's spool (journal) files; one process per folder.
    pub spool_dir: PathBuf,
    /// Spool size beyond which records cannot be spooled.
    pub spool_max_bytes: u64,
    /// Interval of the spool's group fsync; 0 syncs every record before the response.
    pub fsync_interval_ms: u64,
    /// On shutdown, how long queued records may take to reach the database.
    pub flush_timeout_secs: u64,
    /// Age in days after which records are purged; 0 keeps them.
    pub retention_days: u64,
    /// Seconds between purges.
    pub purge_interval_secs: u64,
}

/// API keys (`src/auth/`): who may call which routes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// When a request must carry a key.
    pub mode: AuthMode,
    /// How long a replica trusts what it read of a key: a key revoked on another replica
    /// (or by `charter keys revoke`) stops working here within this many seconds.
    pub cache_secs: u64,
}

/// When a request must carry an API key.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Keys required, except on a loopback bind address, where a request without a key
    /// may do everything (a request with a key is checked and held to it). Bound to any
    /// other address with no key in the database, the service refuses to start.
    Auto,
    /// Keys required on every address; refuses to start with no key in the database.
    Keys,
    /// No keys: every request may do everything, on any address. Must be set explicitly.
    None,
}

/// What the audit store keeps of an evaluated text.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TextPolicy {
    /// The text itself.
    Full,
    /// HMAC-SHA256 of the text keyed with `audit.text_salt`: equal texts can be matched,
    /// the text cannot be read.
    Hash,
    /// Nothing.
    None,
}

/// A configuration value that must never be printed (passwords in URLs, salts): its
/// `Debug` shows only whether it is set.
#[derive(Clone, Deserialize, PartialEq, Eq, Default)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            f.write_str("\"\"")
        } else {
            f.write_str("\"<redacted>\"")
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

impl Config {
    /// Defaults, then `file` (if any), then `CHARTER__SECTION__KEY` variables.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_from(file, std::env::vars())
    }

    /// As [`Config::load`], with the environment given explicitly (tests).
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder().add_source(config::File::from_str(
            DEFAULTS_TOML,
            config::FileFormat::Toml,
        ));
        if let Some(path) = file {
            builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml));
        }
        let env: config::Map<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("CHARTER__"))
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix("CHARTER")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .source(Some(env)),
        );
        let config: Config = builder.build()?.try_deserialize()?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every value; errors name the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, message: &str| {
            Err(ConfigError::Invalid {
                field,
                message: message.to_string(),
            })
        };
        if self.server.header_read_timeout_secs == 0 {
            return invalid("server.header_read_timeout_secs", "must be at least 1");
        }
        if self.server.max_connections == 0 {
            return invalid("server.max_connections", "must be at least 1");
        }
        if let Err(e) = self.server.cors() {
            return invalid("server.cors_origins", &e);
        }
        if self.model.workers == 0 {
            return invalid("model.workers", "must be at least 1");
        }
        if self.model.intra_threads == 0 {
            return invalid("model.intra_threads", "must be at least 1");
        }
        if let Some(partner) = &self.model.ensemble {
            if partner.is_empty() || partner.contains(['/', '\\']) || partner.starts_with('.') {
                return invalid(
                    "model.ensemble",
                    "must name a model folder under assets_dir/models",
                );
            }
            if *partner == self.model.name {
                return invalid("model.ensemble", "must name another model than model.name");
            }
        }
        if self.batching.max_batch_size == 0 || self.batching.max_batch_tokens == 0 {
            return invalid("batching.max_batch_size", "batch limits must be at least 1");
        }
        if self.batching.bucket_ratio < 1.0 {
            return invalid("batching.bucket_ratio", "must be >= 1.0");
        }
        if self.batching.queue_capacity == 0 {
            return invalid("batching.queue_capacity", "must be at least 1");
        }
        if !(self.batching.max_request_share > 0.0 && self.batching.max_request_share <= 1.0) {
            return invalid("batching.max_request_share", "must be > 0 and <= 1");
        }
        if self.limits.max_text_chars == 0 || self.limits.max_batch_texts == 0 {
            return invalid("limits.max_text_chars", "limits must be at least 1");
        }
        if self.scoring.top_k == 0 {
            return invalid("scoring.top_k", "must be at least 1");
        }
        if self.scoring.window_stride == 0
            || self.scoring.window_stride > self.scoring.window_tokens
        {
            return invalid(
                "scoring.window_stride",
                "must be between 1 and scoring.window_tokens",
            );
        }
        let url = self.database.url.expose();
        if !(url.starts_with("sqlite:")
            || url.starts_with("postgres://")
            || url.starts_with("postgresql://"))
        {
            return invalid(
                "database.url",
                "must start with sqlite: or postgres:// (e.g. sqlite://charter.db?mode=rwc)",
            );
        }
        if self.database.max_connections < 2 {
            return invalid(
                "database.max_connections",
                "must be at least 2 (one writer, one for queries)",
            );
        }
        if self.database.connect_timeout_secs == 0 {
            return invalid("database.connect_timeout_secs", "must be at least 1");
        }
        if self.audit.text == TextPolicy::Hash && self.audit.text_salt.expose().len() < 16 {
            return invalid(
                "audit.text_salt",
                "must be at least 16 characters when audit.text = \"hash\"",
            );
        }
        if self.audit.queue_capacity == 0 || self.audit.batch_size == 0 {
            return invalid(
                "audit.queue_capacity",
                "audit.queue_capacity and audit.batch_size must be at least 1",
            );
        }
        if self.audit.purge_interval_secs == 0 {
            return invalid("audit.purge_interval_secs", "must be at least 1");
        }
        if self.auth.cache_secs > 3600 {
            return invalid("auth.cache_secs", "must be at most 3600");
        }
        self.gateway.validate()
    }

    /// The model folder this configuration selects.
    pub fn model_dir(&self) -> PathBuf {
        match &self.model.dir {
            Some(dir) => dir.clone(),
            None => self.model.assets_dir.join("models").join(&self.model.name),
        }
    }

    /// The folder of the ensemble's second model, when one is configured.
    pub fn ensemble_dir(&self) -> Option<PathBuf> {
        let name = self.model.ensemble.as_ref()?;
        Some(self.model.assets_dir.join("models").join(name))
    }

    /// The ONNX Runtime library this configuration selects: the configured path, or the
    /// one `libonnxruntime.so.*` the set-up step put under `assets_dir/onnxruntime`.
    pub fn runtime_library(&self) -> PathBuf {
        if let Some(path) = &self.model.runtime_library {
            return path.clone();
        }
        let dir = self.model.assets_dir.join("onnxruntime");
        std::fs::read_dir(&dir)
            .ok()
            .and_then(|entries| {
                entries
                    .filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| {
                        p.file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| n.starts_with("libonnxruntime.so"))
                    })
                    .max()
            })
            .unwrap_or_else(|| dir.join("libonnxruntime.so"))
    }
}

impl GatewayConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, message: String| Err(ConfigError::Invalid { field, message });
        match reqwest::Url::parse(&self.upstream_url) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.query().is_none() => {}
            _ => {
                return invalid(
                    "gateway.upstream_url",
                    format!(
                        "{:?} is not an http(s) base URL without a query",
                        self.upstream_url
                    ),
                )
            }
        }
        if self.hold_back_chars == 0 {
            return invalid("gateway.hold_back_chars", "must be at least 1".into());
        }
        for (field, secs) in [
            ("gateway.connect_timeout_secs", self.connect_timeout_secs),
            ("gateway.request_timeout_secs", self.request_timeout_secs),
            ("gateway.idle_timeout_secs", self.idle_timeout_secs),
        ] {
            if secs == 0 {
                return invalid(field, "must be at least 1".into());
            }
        }
        if self.body_limit_bytes == 0 || self.max_response_bytes == 0 {
            return invalid(
                "gateway.body_limit_bytes",
                "limits must be at least 1".into(),
            );
        }
        if self.critique_max_tokens == 0 {
            return invalid("gateway.critique_max_tokens", "must be at least 1".into());
        }
        if self.refusal_message.trim().is_empty() {
            return invalid("gateway.refusal_message", "must not be empty".into());
        }
        Ok(())
    }

    /// The configured key, unless it is empty (an empty env variable means "none").
    pub fn api_key(&self) -> Option<&Secret> {
        self.api_key
            .as_ref()
            .filter(|k| !k.expose().trim().is_empty())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn cors_origins_are_off_any_or_a_list_of_origins() {
        let cors = |origins: &str| {
            super::Config::load_from(
                None,
                [(
                    "CHARTER__SERVER__CORS_ORIGINS".to_string(),
                    origins.to_string(),
                )],
            )
            .map(|c| c.server.cors().unwrap())
        };
        assert_eq!(cors("").unwrap(), None);
        assert_eq!(cors("*").unwrap(), Some(Vec::new()));
        let two = cors("https://a.example, http://localhost:3000")
            .unwrap()
            .unwrap();
        assert_eq!(two.len(), 2);
        for bad in [
            "a.example",
            "https://a.example/path",
            "*,https://a.example",
            "ftp://x",
        ] {
            let err = cors(bad).unwrap_err().to_string();
            assert!(err.contains("server.cors_origins"), "{bad}: {err}");
        }
    }

    #[test]
    fn chatty_dependencies_stay_at_info_unless_named() {
        let log = |filter: &str| super::LogConfig {
            format: super::LogFormat::Text,
            filter: filter.into(),
        };
        let d = log("trace").directives();
        assert!(d.starts_with("trace,") && d.contains("tokenizers=info") && d.contains("ort=info"));
        let d = log("info,tokenizers=trace").directives();
        assert!(
            d.contains("tokenizers=trace") && !d.contains("tokenizers=info"),
            "{d}"
        );
        assert!(log("sqlx::query=debug")
            .directives()
            .contains("sqlx::query=debug"));
        assert!(!log("sqlx::query=debug").directives().contains("sqlx=info"));
        let all: tracing_subscriber::EnvFilter = log("debug").directives().parse().unwrap();
        assert!(all.to_string().contains("tokenizers=info"));
    }

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_load_and_validate() {
        let config = Config::load_from(None, env(&[])).unwrap();
        assert_eq!(config.model.name, "use-m3");
        assert_eq!(config.constitutions.default, "default");
        assert_eq!(config.model_dir(), PathBuf::from("assets/models/use-m3"));
    }

    #[test]
    fn file_overrides_defaults_and_env_overrides_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("charter.toml");
        std::fs::write(
            &path,
            "[server]\nbind = \"127.0.0.1:9000\"\n[limits]\nmax_batch_texts = 7\n",
        )
        .unwrap();
        let config = Config::load_from(
            Some(&path),
            env(&[
                ("CHARTER__LIMITS__MAX_BATCH_TEXTS", "9"),
                ("CHARTER__MODEL__NAME", "minilm-l6-int8"),
                ("UNRELATED", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(config.server.bind.port(), 9000);
        assert_eq!(config.limits.max_batch_texts, 9);
        assert_eq!(config.model.name, "minilm-l6-int8");
    }

    #[test]
    fn invalid_values_name_the_key() {
        let err = Config::load_from(None, env(&[("CHARTER__MODEL__WORKERS", "0")])).unwrap_err();
        assert!(err.to_string().contains("model.workers"), "{err}");
        let err = Config::load_from(None, env(&[("CHARTER__SERVER__BIND", "not-an-address")]))
            .unwrap_err();
        assert!(err.to_string().contains("bind"), "{err}");
    }

    #[test]
    fn audit_settings_validate_and_hide_secrets() {
        let err = Config::load_from(None, env(&[("CHARTER__AUDIT__TEXT", "hash")])).unwrap_err();
        assert!(err.to_string().contains("audit.text_salt"), "{err}");
        let config = Config::load_from(
            None,
            env(&[
                ("CHARTER__AUDIT__TEXT", "hash"),
                ("CHARTER__AUDIT__TEXT_SALT", "pepper-pepper-pepper"),
                (
                    "CHARTER__DATABASE__URL",
                    "postgres://charter:hunter2@db:5432/charter",
                ),
            ]),
        )
        .unwrap();
        assert_eq!(config.audit.text, TextPolicy::Hash);
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("pepper") && !shown.contains("hunter2"),
            "{shown}"
        );
        let err =
            Config::load_from(None, env(&[("CHARTER__DATABASE__URL", "mysql://x")])).unwrap_err();
        assert!(err.to_string().contains("database.url"), "{err}");
    }

    #[test]
    fn gateway_key_comes_from_env_and_is_never_shown() {
        let config = Config::load_from(
            None,
            env(&[
                ("CHARTER__GATEWAY__API_KEY", "sk-ant-very-secret"),
                (
                    "CHARTER__GATEWAY__CONSTITUTION_BY_KEY__KEY_0123456789AB",
                    "strict",
                ),
            ]),
        )
        .unwrap();
        assert_eq!(
            config.gateway.api_key().map(Secret::expose),
            Some("sk-ant-very-secret")
        );
        assert!(!format!("{config:?}").contains("very-secret"));
        assert_eq!(
            config.gateway.constitution_by_key.get("key_0123456789ab"),
            Some(&"strict".to_string())
        );
        let config = Config::load_from(None, env(&[("CHARTER__GATEWAY__API_KEY", "")])).unwrap();
        assert!(config.gateway.api_key().is_none());
        let err = Config::load_from(None, env(&[("CHARTER__GATEWAY__UPSTREAM_URL", "ftp://x")]))
            .unwrap_err();
        assert!(err.to_string().contains("gateway.upstream_url"), "{err}");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = Config::load_from(None, env(&[("CHARTER__SERVER__BINDD", "x")])).unwrap_err();
        assert!(err.to_string().contains("bindd"), "{err}");
    }
}
