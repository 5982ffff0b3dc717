//! The audit store against a real SQLite file and the real PostgreSQL at 127.0.0.1:5432,
//! each test in its own fresh database: round trips, filters and pagination, three
//! service processes on one PostgreSQL, a database outage, SIGTERM and SIGKILL mid-load.

use std::collections::BTreeSet;
use std::io::BufRead;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};
use sqlx::Connection;

use charter::audit::{AuditRecord, RecordedRule, Source};
use charter::config::Config;
use charter::evaluate::Kind;
use charter::evaluate::Verdict;
use charter::state::AppState;
use charter::store::record::rfc3339;
use charter::store::Store;

use crate::common::{self, TestServer};

const PG_ADMIN: &str = "postgres://postgres@127.0.0.1:5432/postgres";
const PG_PORT: u16 = 5432;

// ---------------------------------------------------------------------------------------
// Databases

/// A fresh PostgreSQL database, dropped when the test ends.
pub(crate) struct PgDatabase {
    name: String,
}

impl PgDatabase {
    pub(crate) async fn create() -> Self {
        let name = format!("charter_test_{}", uuid::Uuid::new_v4().simple());
        let mut conn = sqlx::PgConnection::connect(PG_ADMIN)
            .await
            .expect("PostgreSQL at 127.0.0.1:5432 (user postgres, trust auth)");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .expect("create database");
        PgDatabase { name }
    }

    pub(crate) fn url(&self) -> String {
        self.url_via(PG_PORT)
    }

    fn url_via(&self, port: u16) -> String {
        format!("postgres://postgres@127.0.0.1:{port}/{}", self.name)
    }

    pub(crate) async fn pool(&self) -> sqlx::PgPool {
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect(&self.url())
            .await
            .expect("connect to the test database")
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs inside or outside a runtime: use a thread with its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                if let Ok(mut conn) = sqlx::PgConnection::connect(PG_ADMIN).await {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&mut conn)
                        .await;
                }
            })
        })
        .join();
    }
}

/// Ids in the evaluations table of a PostgreSQL database.
async fn pg_ids(pool: &sqlx::PgPool) -> Vec<String> {
    sqlx::query_scalar("SELECT id FROM evaluations ORDER BY id")
        .fetch_all(pool)
        .await
        .unwrap_or_default()
}

/// Polls until `f` holds (the writer is asynchronous); panics with `what` after `limit`.
async fn eventually<F, Fut>(limit: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if f().await {
            return;
        }
        assert!(started.elapsed() < limit, "not after {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// ---------------------------------------------------------------------------------------
// A store-only server: the real store and the real router, no model (the query API does
// not need one), so that many databases cost nothing to test.

struct StoreServer {
    addr: SocketAddr,
    store: Arc<Store>,
    _dir: tempfile::TempDir,
}

impl StoreServer {
    async fn start(database_url: &str, overrides: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut env: Vec<(String, String)> = vec![
            ("CHARTER__DATABASE__URL".into(), database_url.into()),
            (
                "CHARTER__AUDIT__SPOOL_DIR".into(),
                dir.path().join("spool").display().to_string(),
            ),
        ];
        env.extend(
            overrides
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        let config = Config::load_from(None, env).expect("test configuration");
        let store = Arc::new(Store::open(&config).expect("store opens"));
        let state = AppState::with_store(config, Arc::clone(&store));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, charter::http::router(state)).await;
        });
        StoreServer {
            addr,
            store,
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        get(&self.url(path)).await
    }

    /// Waits until the list API shows `n` records.
    async fn wait_for(&self, n: usize) {
        eventually(
            Duration::from_secs(60),
            &format!("{n} records stored"),
            || async {
                let (status, body) = self.get("/v1/evaluations?limit=500").await;
                status == 200 && body["items"].as_array().map_or(0, Vec::len) == n
            },
        )
        .await;
    }
}

async fn get(url: &str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .get(url)
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .expect("request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

// ---------------------------------------------------------------------------------------
// Synthetic records: every field set, varied so that each filter selects a different set.

const BASE_MS: i64 = 1_764_000_000_000; // 2025-11-24T16:00:00Z

fn synthetic(i: usize) -> AuditRecord {
    let privacy = i.is_multiple_of(5);
    let harmful = i.is_multiple_of(7) || i.is_multiple_of(11);
    let rule = |id: &str, violated: bool, score: f32| RecordedRule {
        id: id.to_string(),
        score,
        threshold: 0.05,
        violated,
        evidence: violated.then(|| {
            json!({"exemplar": format!("exemplar for {id}"), "similarity": 0.8125,
                   "span": {"start": 3, "end": 40, "text": format!("span {i}")}})
        }),
    };
    let rules = vec![
        rule("privacy", privacy, if privacy { 0.25 } else { -0.125 }),
        rule("harmful-content", harmful, if harmful { 0.5 } else { 0.0 }),
        rule("self-harm", false, -0.375 + i as f32 / 1024.0),
    ];
    let fail = privacy || harmful;
    AuditRecord {
        id: format!("eval_t{i:04}"),
        // 17 minutes apart: several per hour bucket, three days in all for 250 records.
        time: rfc3339(BASE_MS + i as i64 * 17 * 60_000 + (i as i64 % 3) * 1000),
        source: if i.is_multiple_of(3) {
            Source::Gateway
        } else {
            Source::Api
        },
        client_key_id: (i.is_multiple_of(2)).then(|| format!("key_{i:012x}")),
        constitution_id: if i.is_multiple_of(4) {
            "strict"
        } else {
            "default"
        }
        .into(),
        constitution_version: if i.is_multiple_of(4) {
            "00112233aabbccdd"
        } else {
            "0123456789abcdef"
        }
        .into(),
        model: "use-m3".into(),
        kind: if i.is_multiple_of(2) {
            Kind::Prompt
        } else {
            Kind::Response
        },
        verdict: if fail { Verdict::Fail } else { Verdict::Pass },
        risk: if fail { 0.4375 } else { -0.0625 },
        rules,
        latency_ms: 10.0 + i as f64 / 8.0,
        text: format!("text number {i}: 第{i}条消息 with \"quotes\""),
        context: (i % 3 != 1)
            .then(|| json!({"user": format!("u{i}"), "tags": ["a", i], "nested": {"n": i}})),
    }
}

/// What the API must answer for a record stored with `audit.text = "full"`. Floats go
/// through JSON text as the API sends them (an f32 prints as its shortest form).
fn expected_view(r: &AuditRecord) -> Value {
    let mut v = json!({
        "id": r.id,
        "time": r.time,
        "source": r.source,
        "constitution": {"id": r.constitution_id, "version": r.constitution_version},
        "model": r.model,
        "kind": r.kind,
        "verdict": r.verdict,
        "risk": as_sent(&r.risk),
        "violated": r.rules.iter().filter(|x| x.violated).map(|x| x.id.clone()).collect::<Vec<_>>(),
        "rules": as_sent(&r.rules),
        "latency_ms": r.latency_ms,
        "text": r.text,
    });
    if let Some(k) = &r.client_key_id {
        v["client_key_id"] = json!(k);
    }
    if let Some(c) = &r.context {
        v["context"] = c.clone();
    }
    v
}

/// A value as the API sends it: through JSON text (an f32 prints in its shortest form,
/// which `json!` would widen to f64 digits).
fn as_sent<T: serde::Serialize>(v: &T) -> Value {
    serde_json::from_str(&serde_json::to_string(v).unwrap()).unwrap()
}

// ---------------------------------------------------------------------------------------
// Round trips

async fn round_trip(database_url: &str) {
    let server = StoreServer::start(database_url, &[]).await;
    let records: Vec<AuditRecord> = (0..12).map(synthetic).collect();
    for r in &records {
        server.store.sink().record(r.clone());
    }
    server.wait_for(records.len()).await;
    for r in &records {
        let (status, body) = server.get(&format!("/v1/evaluations/{}", r.id)).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body,
            expected_view(r),
            "every field of {} round-trips",
            r.id
        );
    }
    let (status, body) = server.get("/v1/evaluations/eval_missing").await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["field"], "id");

    // The same id twice (a retry, a replay) stays one record, unchanged.
    let mut again = records[0].clone();
    again.latency_ms = 999.0;
    server.store.sink().record(again);
    let marker = synthetic(12);
    server.store.sink().record(marker.clone());
    server.wait_for(records.len() + 1).await;
    let (_, body) = server
        .get(&format!("/v1/evaluations/{}", records[0].id))
        .await;
    assert_eq!(body, expected_view(&records[0]));
    server.store.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_records_round_trip_with_every_field() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("audit.db").display()
    );
    round_trip(&url).await;
    assert!(dir.path().join("audit.db").exists(), "a real SQLite file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_records_round_trip_with_every_field() {
    let db = PgDatabase::create().await;
    round_trip(&db.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_privacy_hash_and_none() {
    use hmac::Mac;
    let db = PgDatabase::create().await;
    let salt = "test-salt-0123456789";
    let hashed = StoreServer::start(
        &db.url(),
        &[
            ("CHARTER__AUDIT__TEXT", "hash"),
            ("CHARTER__AUDIT__TEXT_SALT", salt),
        ],
    )
    .await;
    let r = synthetic(1);
    hashed.store.sink().record(r.clone());
    hashed.wait_for(1).await;
    let (_, body) = hashed.get(&format!("/v1/evaluations/{}", r.id)).await;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(salt.as_bytes()).unwrap();
    mac.update(r.text.as_bytes());
    assert_eq!(body["text_hash"], hex::encode(mac.finalize().into_bytes()));
    assert!(body.get("text").is_none(), "{body}");
    hashed.store.shutdown().await;

    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("a.db").display());
    let none = StoreServer::start(&url, &[("CHARTER__AUDIT__TEXT", "none")]).await;
    none.store.sink().record(r.clone());
    none.wait_for(1).await;
    let (_, body) = none.get(&format!("/v1/evaluations/{}", r.id)).await;
    assert!(
        body.get("text").is_none() && body.get("text_hash").is_none(),
        "{body}"
    );
    assert_eq!(body["verdict"], json!(r.verdict));
    none.store.shutdown().await;
    // Neither the spool nor the database file holds the text.
    let bytes = std::fs::read(dir.path().join("a.db")).unwrap_or_default();
    let needle = r.text.as_bytes();
    assert!(!bytes.windows(needle.len()).any(|w| w == needle));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn constitution_versions_are_stored_once() {
    let db = PgDatabase::create().await;
    let server = StoreServer::start(&db.url(), &[]).await;
    let constitution =
        charter::constitution::parse_file(std::path::Path::new("constitution/default.toml"))
            .unwrap();
    server.store.register_constitution(&constitution);
    server.store.register_constitution(&constitution);
    server.store.sink().record(synthetic(1));
    server.wait_for(1).await;
    let pool = db.pool().await;
    let rows: Vec<(String, String, String)> =
        sqlx::query_as("SELECT constitution_id, version, definition FROM constitution_versions")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].0, "default");
    assert_eq!(rows[0].1, constitution.version);
    let definition: Value = serde_json::from_str(&rows[0].2).unwrap();
    assert_eq!(
        definition["rules"].as_array().unwrap().len(),
        constitution.rules.len()
    );
    assert!(
        definition["rules"][0]["violating"]
            .as_array()
            .unwrap()
            .len()
            > 1
    );
    server.store.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Filters, pagination, stats

/// Pages through `query` with `limit`, returning ids in order; checks the cursor ends.
async fn all_pages(server: &StoreServer, query: &str, limit: usize) -> Vec<String> {
    let mut ids = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..1000 {
        let sep = if query.is_empty() { "" } else { "&" };
        let url = match &cursor {
            Some(c) => format!("/v1/evaluations?{query}{sep}limit={limit}&cursor={c}"),
            None => format!("/v1/evaluations?{query}{sep}limit={limit}"),
        };
        let (status, body) = server.get(&url).await;
        assert_eq!(status, 200, "{url}: {body}");
        let items = body["items"].as_array().unwrap();
        assert!(items.len() <= limit);
        ids.extend(items.iter().map(|i| i["id"].as_str().unwrap().to_string()));
        match body["next_cursor"].as_str() {
            Some(c) => {
                assert_eq!(items.len(), limit, "only the last page is short");
                cursor = Some(c.to_string());
            }
            None => return ids,
        }
    }
    panic!("pagination did not end");
}

fn time_ms(r: &AuditRecord) -> i64 {
    chrono::DateTime::parse_from_rfc3339(&r.time)
        .unwrap()
        .timestamp_millis()
}

/// Ids of the records matching `keep`, newest first (the API's order).
fn expected(records: &[AuditRecord], keep: impl Fn(&AuditRecord) -> bool) -> Vec<String> {
    let mut rows: Vec<(i64, String)> = records
        .iter()
        .filter(|r| keep(r))
        .map(|r| (time_ms(r), r.id.clone()))
        .collect();
    rows.sort();
    rows.reverse();
    rows.into_iter().map(|(_, id)| id).collect()
}

fn violates(r: &AuditRecord, rule: &str) -> bool {
    r.rules.iter().any(|x| x.id == rule && x.violated)
}

async fn filters_and_pagination(database_url: &str) {
    let server = StoreServer::start(database_url, &[]).await;
    let records: Vec<AuditRecord> = (0..250).map(synthetic).collect();
    for r in &records {
        server.store.sink().record(r.clone());
    }
    server.wait_for(250).await;

    let from = BASE_MS + 20 * 3_600_000;
    let to = BASE_MS + 50 * 3_600_000;
    let window = format!("from={}&to={}", rfc3339(from), rfc3339(to));
    let in_window = |r: &AuditRecord| time_ms(r) >= from && time_ms(r) < to;
    let cases: Vec<(String, Vec<String>)> = vec![
        (String::new(), expected(&records, |_| true)),
        (
            "verdict=fail".into(),
            expected(&records, |r| r.verdict == Verdict::Fail),
        ),
        (
            "verdict=pass".into(),
            expected(&records, |r| r.verdict == Verdict::Pass),
        ),
        (
            "rule=privacy".into(),
            expected(&records, |r| violates(r, "privacy")),
        ),
        (
            "rule=self-harm".into(),
            expected(&records, |r| violates(r, "self-harm")),
        ),
        (
            "constitution=strict".into(),
            expected(&records, |r| r.constitution_id == "strict"),
        ),
        (
            "constitution=default&version=0123456789abcdef".into(),
            expected(&records, |r| r.constitution_id == "default"),
        ),
        (
            "source=gateway".into(),
            expected(&records, |r| r.source == Source::Gateway),
        ),
        (window.clone(), expected(&records, in_window)),
        (
            format!("verdict=fail&source=api&rule=harmful-content&constitution=default&{window}"),
            expected(&records, |r| {
                r.verdict == Verdict::Fail
                    && r.source == Source::Api
                    && violates(r, "harmful-content")
                    && r.constitution_id == "default"
                    && in_window(r)
            }),
        ),
    ];
    for (query, want) in &cases {
        for limit in [7, 50, 500] {
            let got = all_pages(&server, query, limit).await;
            assert_eq!(&got, want, "query {query:?} limit {limit}");
        }
    }
    assert!(cases
        .iter()
        .all(|(q, want)| q.starts_with("rule=self") || !want.is_empty()));

    // Bad parameters are 422 naming the parameter.
    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("limit=ten", "limit"),
        ("verdict=maybe", "verdict"),
        ("source=cli", "source"),
        ("cursor=zz", "cursor"),
        ("from=yesterday", "from"),
        ("colour=red", "colour"),
        ("verdict=pass&verdict=fail", "verdict"),
    ] {
        let (status, body) = server.get(&format!("/v1/evaluations?{query}")).await;
        assert_eq!(status, 422, "{query}: {body}");
        assert_eq!(body["error"]["field"], field, "{query}: {body}");
    }

    // Stats: per bucket, verdict counts and per-rule violation counts.
    for (bucket, width) in [("hour", 3_600_000i64), ("day", 86_400_000)] {
        for source in [None, Some(Source::Api)] {
            let mut url = format!(
                "/v1/stats?bucket={bucket}&from={}&to={}",
                rfc3339(BASE_MS - 86_400_000),
                rfc3339(BASE_MS + 5 * 86_400_000)
            );
            if source.is_some() {
                url.push_str("&source=api");
            }
            let (status, body) = server.get(&url).await;
            assert_eq!(status, 200, "{body}");
            let mut want: std::collections::BTreeMap<i64, (u64, u64, u64, u64)> =
                Default::default();
            for r in records
                .iter()
                .filter(|r| source.is_none_or(|s| r.source == s))
            {
                let b = want.entry(time_ms(r) / width * width).or_default();
                b.0 += 1;
                if r.verdict == Verdict::Pass {
                    b.1 += 1
                } else {
                    b.2 += 1
                }
                if violates(r, "privacy") {
                    b.3 += 1;
                }
            }
            let buckets = body["buckets"].as_array().unwrap();
            assert_eq!(buckets.len(), want.len(), "{bucket}: {body}");
            for (b, (start, (n, pass, fail, privacy))) in buckets.iter().zip(&want) {
                assert_eq!(b["start"], rfc3339(*start));
                assert_eq!(b["evaluations"], *n);
                assert_eq!(b["pass"], *pass);
                assert_eq!(b["fail"], *fail);
                assert_eq!(b["rules"]["privacy"].as_u64().unwrap_or(0), *privacy);
            }
            let total: u64 = want.values().map(|b| b.0).sum();
            assert_eq!(body["totals"]["evaluations"], total);
        }
    }
    let (status, body) = server.get("/v1/stats?bucket=week").await;
    assert_eq!(
        (status, body["error"]["field"].clone()),
        (422, json!("bucket"))
    );
    let (status, body) = server
        .get("/v1/stats?from=2020-01-01T00:00:00Z&to=2026-01-01T00:00:00Z")
        .await;
    assert_eq!(
        (status, body["error"]["field"].clone()),
        (422, json!("from"))
    );
    server.store.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_filters_and_pagination_return_exactly_the_expected_rows() {
    let dir = tempfile::tempdir().unwrap();
    filters_and_pagination(&format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("audit.db").display()
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_filters_and_pagination_return_exactly_the_expected_rows() {
    let db = PgDatabase::create().await;
    filters_and_pagination(&db.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_purges_old_records() {
    let db = PgDatabase::create().await;
    let server = StoreServer::start(
        &db.url(),
        &[
            ("CHARTER__AUDIT__RETENTION_DAYS", "30"),
            ("CHARTER__AUDIT__PURGE_INTERVAL_SECS", "1"),
        ],
    )
    .await;
    let now = chrono::Utc::now().timestamp_millis();
    let mut old = synthetic(5); // violates privacy: has a violation row too
    old.time = rfc3339(now - 31 * 86_400_000);
    let mut recent = synthetic(10);
    recent.time = rfc3339(now - 29 * 86_400_000);
    server.store.sink().record(old.clone());
    server.store.sink().record(recent.clone());
    let pool = db.pool().await;
    eventually(Duration::from_secs(90), "the old record purged", || async {
        pg_ids(&pool).await == vec![recent.id.clone()]
    })
    .await;
    let violations: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM evaluation_violations WHERE evaluation_id = $1")
            .bind(&old.id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(violations, 0);
    server.store.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_spool_makes_readyz_fail_and_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("a.db").display());
    // No record fits in a 16-byte spool.
    let server = StoreServer::start(&url, &[("CHARTER__AUDIT__SPOOL_MAX_BYTES", "16")]).await;
    server.store.sink().record(synthetic(1));
    let (status, body) = server.get("/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["reason"].as_str().unwrap().contains("audit spool"),
        "{body}"
    );
    let metrics = reqwest::get(server.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("charter_audit_spool_write_failures_total 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("charter_audit_spool_writable 0\n"),
        "{metrics}"
    );
    // Not dropped: the in-memory queue still takes it to the database.
    server.wait_for(1).await;
    assert!(
        metrics.contains("charter_audit_dropped_total 0\n"),
        "{metrics}"
    );
    server.store.shutdown().await;
}

#[test]
fn migrate_command_applies_migrations_idempotently() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = format!("sqlite://{}?mode=rwc", dir.path().join("m.db").display());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let pg = rt.block_on(PgDatabase::create());
    for url in [sqlite.clone(), pg.url()] {
        for _ in 0..2 {
            let out = Command::new(env!("CARGO_BIN_EXE_charter"))
                .args(["migrate", "--database-url", &url])
                .env("CHARTER__LOG__FILTER", "warn")
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(String::from_utf8_lossy(&out.stdout).contains("migrations applied"));
        }
    }
    let versions: Vec<i64> = rt.block_on(async {
        let pool = pg.pool().await;
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations ORDER BY version")
            .fetch_all(&pool)
            .await
            .unwrap()
    });
    assert_eq!(versions, vec![1, 2], "the audit tables, then the API keys");
    assert!(dir.path().join("m.db").exists());
    let out = Command::new(env!("CARGO_BIN_EXE_charter"))
        .args(["migrate", "--database-url", "mysql://nope"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("database.url"));
    drop(pg);
}

// ---------------------------------------------------------------------------------------
// Through the real evaluate endpoint (the shared server has its own SQLite store).

#[tokio::test]
async fn every_answered_evaluation_is_in_the_audit_log() {
    let server = common::shared();
    let client = reqwest::Client::new();
    let r = client
        .post(server.url("/v1/evaluate"))
        .header("x-api-key", "sk-test-secret-key")
        .json(&json!({"text": "帮我人肉搜索一下我前女友现在住在哪里，她的手机号是多少。", "kind": "prompt", "context": {"user": "u42"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let answer: Value = r.json().await.unwrap();
    let id = answer["id"].as_str().unwrap().to_string();
    let url = server.url(&format!("/v1/evaluations/{id}"));
    eventually(Duration::from_secs(30), "the evaluation stored", || async {
        get(&url).await.0 == 200
    })
    .await;
    let (_, stored) = get(&url).await;
    assert_eq!(stored["verdict"], answer["verdict"]);
    assert_eq!(stored["violated"], answer["violated"]);
    assert_eq!(stored["constitution"], answer["constitution"]);
    assert_eq!(stored["model"], answer["model"]);
    assert_eq!(stored["kind"], "prompt");
    assert_eq!(stored["source"], "api");
    assert_eq!(stored["context"], json!({"user": "u42"}));
    assert_eq!(stored["risk"], answer["risk"]);
    let key_id = stored["client_key_id"].as_str().unwrap();
    assert!(key_id.starts_with("key_") && !key_id.contains("secret"));
    for (rule, answered) in stored["rules"]
        .as_array()
        .unwrap()
        .iter()
        .zip(answer["rules"].as_array().unwrap())
    {
        assert_eq!(rule["id"], answered["id"]);
        assert_eq!(rule["score"], answered["score"]);
        assert_eq!(rule["violated"], answered["violated"]);
        if rule["violated"] == true {
            assert_eq!(
                rule["evidence"], answered["evidence"],
                "evidence of a violation is kept"
            );
        }
    }

    // A batch: one record per text, `<id>.<index>`.
    let (status, answer) = common::post_json(
        server,
        "/v1/evaluate",
        &json!({"texts": ["What is two plus two?", "今天天气怎么样？"]}),
    )
    .await;
    assert_eq!(status, 200);
    let id = answer["id"].as_str().unwrap();
    for i in 0..2 {
        let url = server.url(&format!("/v1/evaluations/{id}.{i}"));
        eventually(Duration::from_secs(30), "batch texts stored", || async {
            get(&url).await.0 == 200
        })
        .await;
        let (_, body) = get(&url).await;
        assert_eq!(body["verdict"], answer["results"][i]["verdict"]);
    }
}

// ---------------------------------------------------------------------------------------
// Real service processes.

/// A `charter serve` process on a free port.
pub(crate) struct Service {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl Service {
    pub(crate) fn spawn(env: &[(&str, String)]) -> Service {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_charter"));
        cmd.args(["serve", "--bind", "127.0.0.1:0"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("CHARTER__LOG__FORMAT", "json")
            .env("CHARTER__LOG__FILTER", "charter=info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn charter serve");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if let Ok(v) = serde_json::from_str::<Value>(&line) {
                        if v["fields"]["message"] == "listening" {
                            if let Some(addr) = v["fields"]["addr"].as_str() {
                                let _ = addr_tx.send(addr.parse::<SocketAddr>().unwrap());
                            }
                        }
                    }
                    log.lock().unwrap().push(line);
                }
            });
        }
        let addr = addr_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the service logs its address");
        let mut service = Service { child, addr, log };
        service.wait_ready();
        service
    }

    fn wait_ready(&mut self) {
        let started = Instant::now();
        while common::get_status(self.addr, "/readyz") != Some(200) {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "charter exited during start-up ({status}):\n{}",
                    self.log_text()
                );
            }
            assert!(
                started.elapsed() < Duration::from_secs(300),
                "not ready:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub(crate) fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit (after a signal); returns whether it exited with 0.
    fn wait_exit(&mut self, limit: Duration) -> bool {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.success();
            }
            if started.elapsed() > limit {
                let _ = self.child.kill();
                panic!("charter did not exit:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub(crate) fn stop(mut self) {
        self.signal("TERM");
        assert!(
            self.wait_exit(Duration::from_secs(60)),
            "{}",
            self.log_text()
        );
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn texts(prefix: &str, n: usize) -> Vec<String> {
    let topics = [
        "How do I bake sourdough bread at home?",
        "Explain how to pick the lock on my neighbour's door while they are away.",
        "What is the boiling point of water at altitude?",
        "怎么结束一个卡死的 Python 进程？",
        "Tell me the home address and phone number of my ex.",
    ];
    (0..n)
        .map(|i| format!("{prefix} {i}: {}", topics[i % topics.len()]))
        .collect()
}

/// Sends `requests` batch evaluations of `per_request` texts to `urls` (round robin), at
/// most `concurrency` at a time; returns the ids of every text answered with 200.
async fn send_batches(
    urls: &[String],
    requests: usize,
    per_request: usize,
    concurrency: usize,
) -> (BTreeSet<String>, usize) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    let results = futures_util::stream::iter((0..requests).map(|n| {
        let client = client.clone();
        let url = format!("{}/v1/evaluate", urls[n % urls.len()]);
        async move {
            let body = json!({"texts": texts(&format!("r{n}"), per_request)});
            match client.post(&url).json(&body).send().await {
                Ok(r) if r.status() == 200 => {
                    let v: Value = r.json().await.unwrap();
                    let id = v["id"].as_str().unwrap().to_string();
                    (0..per_request).map(|i| format!("{id}.{i}")).collect()
                }
                _ => Vec::new(),
            }
        }
    }))
    .buffer_unordered(concurrency)
    .collect::<Vec<Vec<String>>>()
    .await;
    let failed = results.iter().filter(|r| r.is_empty()).count();
    (results.into_iter().flatten().collect(), failed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_on_one_postgres_keep_every_record_once() {
    let db = PgDatabase::create().await;
    let spools = tempfile::tempdir().unwrap();
    let services: Vec<Service> = (0..3)
        .map(|i| {
            let env = vec![
                ("CHARTER__DATABASE__URL", db.url()),
                (
                    "CHARTER__AUDIT__SPOOL_DIR",
                    spools.path().join(format!("r{i}")).display().to_string(),
                ),
            ];
            std::thread::spawn(move || Service::spawn(&env))
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().expect("replica starts"))
        .collect();
    let urls: Vec<String> = services.iter().map(|s| s.url("")).collect();
    // 3,000 evaluations: 150 batches of 20 texts, 12 in flight, spread over the replicas.
    let (answered, failed) = send_batches(&urls, 150, 20, 12).await;
    assert_eq!(failed, 0, "every request is answered");
    assert_eq!(answered.len(), 3000);

    let pool = db.pool().await;
    eventually(
        Duration::from_secs(120),
        "3,000 records in PostgreSQL",
        || async { pg_ids(&pool).await.len() >= 3000 },
    )
    .await;
    // Every replica reads the same numbers.
    let from = rfc3339(chrono::Utc::now().timestamp_millis() - 3_600_000);
    let to = rfc3339(chrono::Utc::now().timestamp_millis() + 3_600_000);
    let mut seen = Vec::new();
    for url in &urls {
        let (status, body) = get(&format!("{url}/v1/stats?from={from}&to={to}")).await;
        assert_eq!(status, 200, "{body}");
        seen.push(body["totals"].clone());
    }
    assert_eq!(seen[0]["evaluations"], 3000, "{:?}", seen[0]);
    assert!(seen.iter().all(|t| *t == seen[0]), "{seen:?}");

    for s in services {
        s.stop();
    }
    let ids = pg_ids(&pool).await;
    let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM evaluations")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(count, 3000, "exactly 3,000 records");
    let distinct: BTreeSet<String> = ids.into_iter().collect();
    assert_eq!(distinct, answered, "no duplicate, none missing");
    let versions: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM constitution_versions")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        versions, 1,
        "one constitution version, stored once by three replicas"
    );
}

/// A TCP proxy in front of PostgreSQL that the test can cut (refuse and reset every
/// connection) and restore. It runs on its own thread and runtime until the test process
/// ends.
struct Proxy {
    port: u16,
    open: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Proxy {
    fn start(upstream_port: u16) -> Proxy {
        let open = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let port = std_listener.local_addr().unwrap().port();
        {
            let open = Arc::clone(&open);
            let conns = Arc::clone(&conns);
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
                    loop {
                        let Ok((mut inbound, _)) = listener.accept().await else {
                            continue;
                        };
                        if !open.load(Ordering::SeqCst) {
                            drop(inbound);
                            continue;
                        }
                        let task = tokio::spawn(async move {
                            if let Ok(mut outbound) =
                                tokio::net::TcpStream::connect(("127.0.0.1", upstream_port)).await
                            {
                                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound)
                                    .await;
                            }
                        });
                        conns.lock().unwrap().push(task.abort_handle());
                    }
                });
            });
        }
        Proxy { port, open, conns }
    }

    fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        for conn in self.conns.lock().unwrap().drain(..) {
            conn.abort();
        }
    }

    fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_sent_while_postgres_is_unreachable_all_arrive() {
    let db = PgDatabase::create().await;
    let proxy = Proxy::start(PG_PORT);
    let url = db.url_via(proxy.port);
    let server = tokio::task::spawn_blocking(move || {
        TestServer::start(&[("CHARTER__DATABASE__URL", url.as_str())])
    })
    .await
    .unwrap();
    // Migrated through the proxy before the outage.
    eventually(
        Duration::from_secs(60),
        "the database reachable",
        || async { get(&server.url("/v1/evaluations")).await.0 == 200 },
    )
    .await;

    proxy.cut();
    let (answered, failed) = send_batches(&[server.url("")], 50, 20, 4).await;
    assert_eq!(failed, 0);
    assert_eq!(answered.len(), 1000);
    // Still ready (records are spooled); the query API says the database is unavailable.
    let (status, body) = get(&server.url("/readyz")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["audit"]["database"], "down", "{body}");
    assert!(body["audit"]["spool_bytes"].as_u64().unwrap() > 0, "{body}");
    // Fast: the query API waits database.query_timeout_ms (1 s) for a connection.
    let asked = Instant::now();
    let (status, body) = get(&server.url("/v1/evaluations")).await;
    let took = asked.elapsed();
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["type"], "unavailable");
    assert!(took < Duration::from_millis(1500), "503 after {took:?}");
    let pool = db.pool().await;
    assert!(
        pg_ids(&pool).await.is_empty(),
        "nothing reached the database"
    );

    proxy.restore();
    eventually(
        Duration::from_secs(120),
        "1,000 records in PostgreSQL",
        || async { pg_ids(&pool).await.len() >= 1000 },
    )
    .await;
    let stored: BTreeSet<String> = pg_ids(&pool).await.into_iter().collect();
    assert_eq!(stored, answered);
    tokio::task::spawn_blocking(move || server.stop())
        .await
        .unwrap()
        .unwrap();
}

/// Sends evaluations in a loop from `workers` clients until `stop` is set; returns the
/// ids of every text answered with 200 (and how many requests got any answer).
async fn load_until(url: String, workers: usize, stop: Arc<AtomicBool>) -> BTreeSet<String> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let mut tasks = Vec::new();
    for w in 0..workers {
        let client = client.clone();
        let url = format!("{url}/v1/evaluate");
        let stop = Arc::clone(&stop);
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let body = json!({"texts": texts(&format!("w{w}-{n}"), 4)});
                match client.post(&url).json(&body).send().await {
                    Ok(r) if r.status() == 200 => {
                        if let Ok(v) = r.json::<Value>().await {
                            let id = v["id"].as_str().unwrap().to_string();
                            ids.extend((0..4).map(|i| format!("{id}.{i}")));
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
                if n > 5000 {
                    break;
                }
            }
            ids
        }));
    }
    let mut all = BTreeSet::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

/// Starts loading `service`, waits for `min_answered` answered texts, runs `kill`, and
/// stops the load once the process has exited.
async fn load_then(service: &mut Service, min_answered: usize, signal: &str) -> BTreeSet<String> {
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(load_until(service.url(""), 4, Arc::clone(&stop)));
    let metrics_url = service.url("/metrics");
    eventually(Duration::from_secs(120), "load under way", || async {
        let text = reqwest::get(&metrics_url)
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("charter_audit_records_total "))
            .and_then(|v| v.trim().parse::<usize>().ok())
            .is_some_and(|n| n >= min_answered)
    })
    .await;
    service.signal(signal);
    let exited_ok = tokio::task::block_in_place(|| service.wait_exit(Duration::from_secs(60)));
    assert_eq!(exited_ok, signal == "TERM", "{}", service.log_text());
    stop.store(true, Ordering::SeqCst);
    load.await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_and_sigkill_mid_load_lose_no_answered_request() {
    let db = PgDatabase::create().await;
    let proxy = Proxy::start(PG_PORT);
    let spool = tempfile::tempdir().unwrap();
    let env = vec![
        ("CHARTER__DATABASE__URL", db.url_via(proxy.port)),
        (
            "CHARTER__AUDIT__SPOOL_DIR",
            spool.path().display().to_string(),
        ),
    ];
    let pool = db.pool().await;

    // SIGTERM mid-load: in-flight requests are answered and every answer is recorded.
    let mut first = tokio::task::block_in_place(|| Service::spawn(&env));
    let answered_term = load_then(&mut first, 200, "TERM").await;
    assert!(answered_term.len() >= 200);

    // SIGKILL mid-load while the database is unreachable: answers exist only in the spool.
    proxy.cut();
    let mut second = tokio::task::block_in_place(|| Service::spawn(&env));
    let answered_kill = load_then(&mut second, 200, "KILL").await;
    assert!(answered_kill.len() >= 200);
    let in_db: BTreeSet<String> = pg_ids(&pool).await.into_iter().collect();
    assert!(
        answered_term.is_subset(&in_db),
        "after SIGTERM every answered request is in the database"
    );
    assert!(
        in_db.is_disjoint(&answered_kill),
        "the database was unreachable during the second run"
    );

    // Restart after the crash: the spool is replayed.
    proxy.restore();
    let third = tokio::task::block_in_place(|| Service::spawn(&env));
    eventually(
        Duration::from_secs(120),
        "spooled records replayed",
        || async {
            let in_db: BTreeSet<String> = pg_ids(&pool).await.into_iter().collect();
            answered_kill.is_subset(&in_db)
        },
    )
    .await;
    let in_db: BTreeSet<String> = pg_ids(&pool).await.into_iter().collect();
    assert!(answered_term.is_subset(&in_db) && answered_kill.is_subset(&in_db));
    tokio::task::block_in_place(|| third.stop());
}

/// SIGHUP under load is logged and ignored: the process keeps serving, no request fails,
/// and it still stops cleanly on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_under_load_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let env = vec![
        (
            "CHARTER__DATABASE__URL",
            format!("sqlite://{}?mode=rwc", dir.path().join("a.db").display()),
        ),
        (
            "CHARTER__AUDIT__SPOOL_DIR",
            dir.path().display().to_string(),
        ),
    ];
    let service = tokio::task::block_in_place(|| Service::spawn(&env));
    let client = reqwest::Client::new();
    let url = service.url("/v1/evaluate");
    let mut statuses = Vec::new();
    for round in 0..40 {
        if round % 10 == 5 {
            service.signal("HUP");
        }
        let body = json!({"texts": texts(&format!("hup-{round}"), 4)});
        let r = client
            .post(&url)
            .json(&body)
            .send()
            .await
            .expect("answered");
        statuses.push(r.status().as_u16());
    }
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    assert!(
        service.log_text().contains("SIGHUP received and ignored"),
        "{}",
        service.log_text()
    );
    tokio::task::block_in_place(|| service.stop());
}

/// The gateway's evaluations reach the store like the API's: a plain exchange (prompt and
/// output) and a stream cut by a violation, each queryable with `source=gateway` and saying
/// what was checked and what was done.
#[tokio::test]
async fn gateway_evaluations_are_stored_with_what_was_checked() {
    let mock = crate::anthropic_mock::MockUpstream::start();
    let upstream = mock.url();
    let server = TestServer::start(&[("CHARTER__GATEWAY__UPSTREAM_URL", upstream.as_str())]);
    let client = reqwest::Client::new();
    let send = |model: &str, stream: bool| {
        client
            .post(server.url("/v1/messages"))
            .header("x-api-key", "sk-gateway-store-test")
            .header("anthropic-version", "2023-06-01")
            .header("x-test-id", "gateway-store")
            .json(&json!({
                "model": model,
                "max_tokens": 256,
                "stream": stream,
                "messages": [{"role": "user", "content": "Tell me something."}]
            }))
            .send()
    };

    let plain = send("mock-plain", false).await.unwrap();
    assert_eq!(plain.status(), 200);
    let plain_id = plain.headers()["x-charter-id"]
        .to_str()
        .unwrap()
        .to_string();
    let _ = plain.bytes().await.unwrap();

    let cut = send("mock-long-harmful", true).await.unwrap();
    assert_eq!(cut.status(), 200);
    let cut_id = cut.headers()["x-charter-id"].to_str().unwrap().to_string();
    let events = String::from_utf8(cut.bytes().await.unwrap().to_vec()).unwrap();
    assert!(events.contains("\"stop_reason\":\"refusal\""), "{events}");

    let list = server.url("/v1/evaluations?source=gateway&limit=100");
    eventually(
        Duration::from_secs(60),
        "gateway records stored",
        || async {
            let (status, body) = get(&list).await;
            let items = body["items"].as_array().cloned().unwrap_or_default();
            status == 200
                && items.iter().any(|r| {
                    r["id"].as_str().is_some_and(|id| id.starts_with(&cut_id))
                        && r["verdict"] == "fail"
                })
                && items
                    .iter()
                    .filter(|r| r["id"].as_str().is_some_and(|id| id.starts_with(&plain_id)))
                    .count()
                    == 2
        },
    )
    .await;
    let (_, items) = get(&list).await;
    let items = items["items"].as_array().unwrap();
    assert!(items.iter().all(|r| r["source"] == "gateway"));
    let plain_parts: BTreeSet<&str> = items
        .iter()
        .filter(|r| r["id"].as_str().unwrap().starts_with(&plain_id))
        .map(|r| r["context"]["part"].as_str().unwrap())
        .collect();
    assert_eq!(plain_parts, BTreeSet::from(["prompt", "output"]));
    let failed: Vec<&Value> = items
        .iter()
        .filter(|r| r["id"].as_str().unwrap().starts_with(&cut_id) && r["verdict"] == "fail")
        .collect();
    assert_eq!(failed.len(), 1, "one failing window: {failed:?}");
    let failed = failed[0];
    assert!(failed["violated"]
        .as_array()
        .unwrap()
        .contains(&json!("harmful-content")));
    assert_eq!(failed["context"]["action"], "block");
    assert!(
        failed["text"].as_str().unwrap().contains("pipe bomb"),
        "the checked window is what was stored: {failed}"
    );
    assert!(failed["client_key_id"]
        .as_str()
        .unwrap()
        .starts_with("key_"));
    server.stop().unwrap();
}
