//! API keys (issue 17): scopes, the 401/403/429 answers in both API shapes, per-key
//! constitutions and rates, keys shared by replicas over one PostgreSQL, nothing secret in
//! logs or audit tables, and the refusal to start on a network address without keys.
//! Keys are made by the real `charter keys` command; servers are the real ones.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use reqwest::header::HeaderMap;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::anthropic_mock::MockUpstream;
use crate::common::TestServer;

fn charter() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_charter"));
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("CHARTER__LOG__FILTER", "warn");
    cmd
}

/// `charter keys create --database-url URL ARGS...`: the key it prints.
fn create_key(database_url: &str, args: &[&str]) -> String {
    let out = charter()
        .args(["keys", "create", "--database-url", database_url])
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.lines().count(),
        1,
        "only the key on stdout: {stdout}"
    );
    assert!(stdout.starts_with("chk_"), "{stdout}");
    stdout
}

/// The id a key shows in listings and records (`key_` + its id part).
fn key_id(key: &str) -> String {
    format!("key_{}", &key[4..20])
}

struct Keyed {
    server: TestServer,
    _mock: MockUpstream,
    _dir: tempfile::TempDir,
    database_url: String,
    /// One key per scope, by scope name.
    by_scope: Vec<(&'static str, String)>,
    /// evaluate + gateway, constitution `flagonly` only.
    flagonly: String,
    /// audit:read at 20 requests/s.
    rated: String,
    /// evaluate at 10 texts/s.
    texts: String,
    /// gateway at 1 request/s.
    gateway_rated: String,
}

/// One server with `auth.mode = "keys"` on loopback, its keys made by the CLI before it
/// starts (it would refuse to start without one), the mock as upstream, and a second
/// constitution `flagonly`.
fn keyed() -> &'static Keyed {
    static KEYED: OnceLock<Keyed> = OnceLock::new();
    KEYED.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let database_url = format!("sqlite://{}?mode=rwc", dir.path().join("keys.db").display());
        let mut by_scope = Vec::new();
        for scope in ["evaluate", "gateway", "audit:read", "admin", "metrics"] {
            let key = create_key(&database_url, &["--name", scope, "--scopes", scope]);
            by_scope.push((scope, key));
        }
        let flagonly = create_key(
            &database_url,
            &[
                "--name",
                "flag",
                "--scopes",
                "evaluate,gateway",
                "--constitution",
                "flagonly",
            ],
        );
        let rated = create_key(
            &database_url,
            &["--name", "rated", "--scopes", "audit:read", "--rate", "20"],
        );
        let texts = create_key(
            &database_url,
            &[
                "--name",
                "texts",
                "--scopes",
                "evaluate",
                "--text-rate",
                "10",
            ],
        );
        let gateway_rated = create_key(
            &database_url,
            &["--name", "gw-rated", "--scopes", "gateway", "--rate", "1"],
        );
        let mock = MockUpstream::start();
        let constitutions = dir.path().join("constitution");
        crate::gateway::copy_dir(Path::new("constitution"), &constitutions);
        std::fs::write(
            constitutions.join("flagonly.toml"),
            crate::gateway::FLAG_ONLY,
        )
        .unwrap();
        let server = TestServer::start(&[
            ("CHARTER__AUTH__MODE", "keys"),
            ("CHARTER__AUTH__CACHE_SECS", "1"),
            ("CHARTER__DATABASE__URL", &database_url),
            (
                "CHARTER__AUDIT__SPOOL_DIR",
                &dir.path().join("spool").display().to_string(),
            ),
            (
                "CHARTER__CONSTITUTIONS__DIR",
                &constitutions.display().to_string(),
            ),
            ("CHARTER__GATEWAY__UPSTREAM_URL", &mock.url()),
        ]);
        Keyed {
            server,
            _mock: mock,
            _dir: dir,
            database_url,
            by_scope,
            flagonly,
            rated,
            texts,
            gateway_rated,
        }
    })
}

/// How a key is sent: the API's bearer, or the gateway's own header.
#[derive(Clone, Copy, PartialEq)]
enum Send {
    Bearer,
    Header,
}

struct Answer {
    status: u16,
    headers: HeaderMap,
    body: Value,
}

async fn call(
    server: &TestServer,
    method: &str,
    path: &str,
    key: Option<(&str, Send)>,
    body: Option<Value>,
) -> Answer {
    let client = reqwest::Client::new();
    let url = server.url(path);
    let mut request = match method {
        "GET" => client.get(url),
        "DELETE" => client.delete(url),
        _ => client.post(url),
    };
    request = match key {
        Some((key, Send::Bearer)) => request.bearer_auth(key),
        Some((key, Send::Header)) => request.header("x-charter-key", key),
        None => request,
    };
    if let Some(body) = body {
        request = request.json(&body);
    }
    let r = request
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let body = r.json().await.unwrap_or(Value::Null);
    Answer {
        status,
        headers,
        body,
    }
}

fn message() -> Value {
    json!({"model": "claude-mock-1", "max_tokens": 64,
           "messages": [{"role": "user", "content": "What is the capital of France?"}]})
}

/// Every guarded route: method, path, the scope it needs (`None`: any key), a body.
fn routes() -> Vec<(
    &'static str,
    &'static str,
    Option<&'static str>,
    Option<Value>,
)> {
    vec![
        (
            "POST",
            "/v1/evaluate",
            Some("evaluate"),
            Some(json!({"text": "Hello there."})),
        ),
        ("GET", "/v1/constitutions", None, None),
        ("GET", "/v1/constitutions/default", None, None),
        ("GET", "/v1/evaluations", Some("audit:read"), None),
        ("GET", "/v1/evaluations/eval_none", Some("audit:read"), None),
        ("GET", "/v1/stats", Some("audit:read"), None),
        ("GET", "/metrics", Some("metrics"), None),
        ("GET", "/v1/admin/keys", Some("admin"), None),
        ("POST", "/v1/messages", Some("gateway"), Some(message())),
        (
            "POST",
            "/v1/messages/count_tokens",
            Some("gateway"),
            Some(json!({"model": "claude-mock-1", "messages": []})),
        ),
        ("GET", "/v1/models", Some("gateway"), None),
        ("GET", "/v1/models/claude-mock-1", Some("gateway"), None),
    ]
}

fn assert_api_error(a: &Answer, status: u16, kind: &str, what: &str) {
    assert_eq!(a.status, status, "{what}: {}", a.body);
    assert_eq!(a.body["error"]["type"], kind, "{what}: {}", a.body);
    assert!(a.body["error"]["message"]
        .as_str()
        .is_some_and(|m| !m.is_empty()));
    assert!(
        a.body.get("type").is_none(),
        "the API's shape, not Anthropic's: {what}"
    );
}

fn assert_anthropic_error(a: &Answer, status: u16, kind: &str, what: &str) {
    assert_eq!(a.status, status, "{what}: {}", a.body);
    assert_eq!(a.body["type"], "error", "{what}: {}", a.body);
    assert_eq!(a.body["error"]["type"], kind, "{what}: {}", a.body);
    assert!(a.body["error"]["message"]
        .as_str()
        .is_some_and(|m| !m.is_empty()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_scope_opens_exactly_its_routes_and_refusals_come_in_each_apis_shape() {
    let k = keyed();
    let s = &k.server;
    for path in ["/healthz", "/readyz"] {
        assert_eq!(
            call(s, "GET", path, None, None).await.status,
            200,
            "{path} stays open"
        );
    }
    for (method, path, needs, body) in routes() {
        let gateway = needs == Some("gateway");
        let send = if gateway { Send::Header } else { Send::Bearer };
        // No key: 401 in the route's shape.
        let a = call(s, method, path, None, body.clone()).await;
        if gateway {
            assert_anthropic_error(&a, 401, "authentication_error", path);
        } else {
            assert_api_error(&a, 401, "unauthorized", path);
            assert_eq!(a.headers["www-authenticate"], "Bearer realm=\"charter\"");
        }
        // A key of the right shape that is not ours: 401.
        let forged = format!("chk_{}_{}", "0".repeat(16), "ab".repeat(32));
        let a = call(s, method, path, Some((&forged, send)), body.clone()).await;
        assert_eq!(a.status, 401, "forged key on {path}: {}", a.body);
        // Each scope's key: through where the route needs its scope (or any key), else 403.
        for (scope, key) in &k.by_scope {
            let a = call(s, method, path, Some((key, send)), body.clone()).await;
            let allowed = needs.is_none_or(|n| n == *scope);
            let what = format!("{scope} key on {method} {path}");
            if allowed {
                assert!(
                    ![401, 403].contains(&a.status),
                    "{what}: {} {}",
                    a.status,
                    a.body
                );
                assert!(a.status < 500 || gateway, "{what}: {} {}", a.status, a.body);
            } else if gateway {
                assert_anthropic_error(&a, 403, "permission_error", &what);
            } else {
                assert_api_error(&a, 403, "forbidden", &what);
            }
        }
    }
    // The gateway's key goes in its own header: `Authorization` is the Anthropic key's.
    let gateway_key = &k.by_scope[1].1;
    let a = call(
        s,
        "GET",
        "/v1/models",
        Some((gateway_key, Send::Bearer)),
        None,
    )
    .await;
    assert_anthropic_error(&a, 401, "authentication_error", "gateway key as a bearer");
    assert!(a.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("x-charter-key"));
    // The API takes either header.
    let eval_key = &k.by_scope[0].1;
    let a = call(
        s,
        "POST",
        "/v1/evaluate",
        Some((eval_key, Send::Header)),
        Some(json!({"text": "Hello."})),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    // No error body holds a key.
    let a = call(
        s,
        "GET",
        "/v1/evaluations",
        Some((eval_key, Send::Bearer)),
        None,
    )
    .await;
    assert!(!a.body.to_string().contains(&eval_key[4..]), "{}", a.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_carry_the_key_id_and_revoked_keys_stop_working() {
    let k = keyed();
    let s = &k.server;
    let admin = &k.by_scope[3].1;
    let audit = &k.by_scope[2].1;
    // A key made over the admin API, used, then revoked by the CLI.
    let made = call(
        s,
        "POST",
        "/v1/admin/keys",
        Some((admin, Send::Bearer)),
        Some(json!({"name": "made over http", "scopes": ["evaluate"]})),
    )
    .await;
    assert_eq!(made.status, 201, "{}", made.body);
    let key = made.body["key"].as_str().unwrap().to_string();
    let id = made.body["id"].as_str().unwrap().to_string();
    assert_eq!(id, key_id(&key));
    let text = format!("A note about gardening {}", uuid::Uuid::new_v4());
    let a = call(
        s,
        "POST",
        "/v1/evaluate",
        Some((&key, Send::Bearer)),
        Some(json!({"text": text})),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let eval_id = a.body["id"].as_str().unwrap().to_string();
    let started = Instant::now();
    let record = loop {
        let r = call(
            s,
            "GET",
            &format!("/v1/evaluations/{eval_id}"),
            Some((audit, Send::Bearer)),
            None,
        )
        .await;
        if r.status == 200 {
            break r.body;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "record stored: {}",
            r.body
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(record["client_key_id"], id.as_str(), "{record}");
    // The listing never shows a key or a hash.
    let list = call(
        s,
        "GET",
        "/v1/admin/keys",
        Some((admin, Send::Bearer)),
        None,
    )
    .await;
    let shown = list.body.to_string();
    assert!(
        shown.contains(&id) && !shown.contains(&key[21..]),
        "{shown}"
    );
    assert!(!shown.contains(&hex::encode(Sha256::digest(key.as_bytes()))));

    let out = charter()
        .args(["keys", "revoke", &id, "--database-url", &k.database_url])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Within auth.cache_secs (1 s here) the server refuses it.
    let started = Instant::now();
    loop {
        let a = call(
            s,
            "POST",
            "/v1/evaluate",
            Some((&key, Send::Bearer)),
            Some(json!({"text": "Hello again."})),
        )
        .await;
        if a.status == 401 {
            break;
        }
        assert_eq!(a.status, 200, "{}", a.body);
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "revoked key still works"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let gone = call(
        s,
        "DELETE",
        "/v1/admin/keys/key_0000000000000000",
        Some((admin, Send::Bearer)),
        None,
    )
    .await;
    assert_api_error(&gone, 404, "not_found", "revoking an unknown key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_keeps_to_its_constitutions() {
    let k = keyed();
    let s = &k.server;
    let key = &k.flagonly;
    // Its default is its one constitution.
    let a = call(
        s,
        "POST",
        "/v1/evaluate",
        Some((key, Send::Bearer)),
        Some(json!({"text": "Hi."})),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["constitution"]["id"], "flagonly", "{}", a.body);
    for other in ["default", "does-not-exist"] {
        let a = call(
            s,
            "POST",
            "/v1/evaluate",
            Some((key, Send::Bearer)),
            Some(json!({"text": "Hi.", "constitution": other})),
        )
        .await;
        assert_api_error(&a, 403, "forbidden", other);
        assert_eq!(a.body["error"]["field"], "constitution");
    }
    // Through the gateway: its default, and 403 for another one named in the header.
    let client = reqwest::Client::new();
    let r = client
        .post(s.url("/v1/messages"))
        .header("x-charter-key", key.as_str())
        .json(&message())
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-charter-constitution"], "flagonly");
    let r = client
        .post(s.url("/v1/messages"))
        .header("x-charter-key", key.as_str())
        .header("x-charter-constitution", "default")
        .json(&message())
        .send()
        .await
        .unwrap();
    let a = Answer {
        status: r.status().as_u16(),
        headers: r.headers().clone(),
        body: r.json().await.unwrap(),
    };
    assert_anthropic_error(&a, 403, "permission_error", "gateway, another constitution");
    // A key without a list may name any.
    let any = &k.by_scope[0].1;
    let a = call(
        s,
        "POST",
        "/v1/evaluate",
        Some((any, Send::Bearer)),
        Some(json!({"text": "Hi.", "constitution": "flagonly"})),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_rate_is_held_within_ten_percent_and_429_carries_the_headers() {
    let k = keyed();
    let s = &k.server;
    let configured = 20.0;
    let burst = 20.0;
    let client = reqwest::Client::new();
    let run_for = Duration::from_secs(5);
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..4 {
        let client = client.clone();
        let url = s.url("/v1/evaluations?limit=1");
        let key = k.rated.clone();
        workers.push(tokio::spawn(async move {
            let (mut ok, mut limited, mut sample) = (0u32, 0u32, None);
            while started.elapsed() < run_for {
                let r = client.get(&url).bearer_auth(&key).send().await.unwrap();
                match r.status().as_u16() {
                    200 => ok += 1,
                    429 => {
                        limited += 1;
                        if sample.is_none() {
                            let headers = r.headers().clone();
                            sample = Some((headers, r.json::<Value>().await.unwrap()));
                        }
                    }
                    other => panic!("status {other}"),
                }
            }
            (ok, limited, sample)
        }));
    }
    let (mut ok, mut limited, mut sample) = (0, 0, None);
    for w in workers {
        let (o, l, s) = w.await.unwrap();
        ok += o;
        limited += l;
        sample = sample.or(s);
    }
    let elapsed = started.elapsed().as_secs_f64();
    // A token bucket lets its burst through at once, then the rate.
    let measured = (f64::from(ok) - burst) / elapsed;
    eprintln!(
        "rate limit: configured {configured}/s, measured {measured:.2}/s \
         ({ok} answered, {limited} refused in {elapsed:.2} s)"
    );
    assert!(
        (measured - configured).abs() <= configured * 0.10,
        "measured {measured:.2}/s"
    );
    assert!(limited > 0);
    let (headers, body) = sample.unwrap();
    assert_eq!(body["error"]["type"], "rate_limited", "{body}");
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(headers["ratelimit-policy"], "\"requests\";q=20;w=1");
    assert!(headers["ratelimit"]
        .to_str()
        .unwrap()
        .starts_with("\"requests\";r=0;t="));
    // An answered request shows what is left.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let a = call(
        s,
        "GET",
        "/v1/evaluations?limit=1",
        Some((&k.rated, Send::Bearer)),
        None,
    )
    .await;
    assert_eq!(a.status, 200);
    assert!(a.headers["ratelimit"]
        .to_str()
        .unwrap()
        .starts_with("\"requests\";r="));

    // Texts: 10 per second; a batch over the bucket can never pass (422), one that fits
    // passes, the next is refused with the texts policy.
    let texts = |n: usize| json!({"texts": (0..n).map(|i| format!("Text number {i}.")).collect::<Vec<_>>()});
    let a = call(
        s,
        "POST",
        "/v1/evaluate",
        Some((&k.texts, Send::Bearer)),
        Some(texts(11)),
    )
    .await;
    assert_api_error(&a, 422, "too_large", "11 texts over a 10-text bucket");
    let a = call(
        s,
        "POST",
        "/v1/evaluate",
        Some((&k.texts, Send::Bearer)),
        Some(texts(10)),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let a = call(
        s,
        "POST",
        "/v1/evaluate",
        Some((&k.texts, Send::Bearer)),
        Some(texts(5)),
    )
    .await;
    assert_api_error(&a, 429, "rate_limited", "texts over the rate");
    assert_eq!(a.headers["ratelimit-policy"], "\"texts\";q=10;w=1");
    assert!(a.headers.contains_key("retry-after"));

    // The gateway's 429 is Anthropic's, with the same headers.
    let key = &k.gateway_rated;
    let first = call(s, "GET", "/v1/models", Some((key, Send::Header)), None).await;
    assert_eq!(first.status, 200, "{}", first.body);
    let a = call(s, "GET", "/v1/models", Some((key, Send::Header)), None).await;
    assert_anthropic_error(&a, 429, "rate_limit_error", "gateway over its rate");
    assert_eq!(a.headers["retry-after"], "1");
    assert_eq!(a.headers["x-should-retry"], "true");
    assert_eq!(a.headers["ratelimit-policy"], "\"requests\";q=1;w=1");
}

/// Every string a key could leak as: the key, its secret part, its sha256.
fn secrets(key: &str) -> Vec<String> {
    vec![
        key.to_string(),
        key[21..].to_string(),
        hex::encode(Sha256::digest(key.as_bytes())),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_in_one_postgres_work_on_every_replica_and_never_reach_logs_or_audit_tables() {
    let db = crate::store::PgDatabase::create().await;
    let url = db.url();
    let admin = create_key(&url, &["--name", "first admin", "--scopes", "admin"]);
    let eval = create_key(
        &url,
        &["--name", "cli", "--scopes", "evaluate,audit:read,gateway"],
    );
    let spools = tempfile::tempdir().unwrap();
    let replicas: Vec<crate::store::Service> = (0..2)
        .map(|i| {
            let env = vec![
                ("CHARTER__DATABASE__URL", url.clone()),
                (
                    "CHARTER__AUDIT__SPOOL_DIR",
                    spools.path().join(format!("r{i}")).display().to_string(),
                ),
                ("CHARTER__AUTH__MODE", "keys".to_string()),
                ("CHARTER__AUTH__CACHE_SECS", "1".to_string()),
                ("CHARTER__LOG__FILTER", "debug".to_string()),
                (
                    "CHARTER__GATEWAY__UPSTREAM_URL",
                    "http://127.0.0.1:9".to_string(),
                ),
            ];
            std::thread::spawn(move || crate::store::Service::spawn(&env))
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().expect("replica starts"))
        .collect();
    let client = reqwest::Client::new();
    let post = |url: String, key: String, body: Value| {
        let client = client.clone();
        async move {
            let r = client
                .post(url)
                .bearer_auth(key)
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    // A key made through replica 0's admin API.
    let (status, made) = post(
        replicas[0].url("/v1/admin/keys"),
        admin.clone(),
        json!({"name": "made on replica 0", "scopes": ["evaluate"]}),
    )
    .await;
    assert_eq!(status, 201, "{made}");
    let made_key = made["key"].as_str().unwrap().to_string();
    let mut evaluated = Vec::new();
    for replica in &replicas {
        for key in [&eval, &made_key] {
            let (status, body) = post(
                replica.url("/v1/evaluate"),
                key.clone(),
                json!({"text": "Keys go on every replica."}),
            )
            .await;
            assert_eq!(status, 200, "{body}");
            evaluated.push((body["id"].as_str().unwrap().to_string(), key_id(key)));
        }
        // Bodies that fail: a wrong key, a missing scope, a gateway call with the key as a
        // bearer (forwarded nowhere: refused first).
        let (status, _) = post(
            replica.url("/v1/evaluate"),
            format!("{admin}x"),
            json!({"text": "x"}),
        )
        .await;
        assert_eq!(status, 401);
        let (status, _) = post(replica.url("/v1/messages"), eval.clone(), message()).await;
        assert_eq!(status, 401);
    }
    // Revoked through replica 1, refused by replica 0 within its cache time.
    let r = client
        .delete(replicas[1].url(&format!("/v1/admin/keys/{}", key_id(&made_key))))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let started = Instant::now();
    loop {
        let (status, _) = post(
            replicas[0].url("/v1/evaluate"),
            made_key.clone(),
            json!({"text": "Still?"}),
        )
        .await;
        if status == 401 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "revoked key still works on replica 0"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let pool = db.pool().await;
    // Every evaluation stored, each with its key's id.
    let started = Instant::now();
    loop {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM evaluations")
            .fetch_one(&pool)
            .await
            .unwrap();
        if n as usize >= evaluated.len() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "records stored"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (id, key_id) in &evaluated {
        let stored: Option<String> =
            sqlx::query_scalar("SELECT client_key_id FROM evaluations WHERE id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(stored.as_deref(), Some(key_id.as_str()));
    }
    let logs: Vec<String> = replicas.iter().map(|r| r.log_text()).collect();
    for r in replicas {
        r.stop();
    }
    let listed = charter()
        .args(["keys", "list", "--json", "--database-url", &url])
        .output()
        .unwrap();
    assert!(listed.status.success());
    let listed = String::from_utf8_lossy(&listed.stdout).to_string();
    assert_eq!(listed.lines().count(), 3, "{listed}");
    assert!(listed.contains("\"revoked\":\"20"), "{listed}");
    // Everything the audit tables hold, as text.
    let mut tables = String::new();
    for table in [
        "evaluations",
        "evaluation_violations",
        "constitution_versions",
    ] {
        let rows: Vec<String> =
            sqlx::query_scalar(&format!("SELECT row_to_json(t)::text FROM {table} t"))
                .fetch_all(&pool)
                .await
                .unwrap();
        tables.push_str(&rows.join("\n"));
    }
    for (i, log) in logs.iter().enumerate() {
        assert!(
            log.contains("\"level\":\"DEBUG\""),
            "replica {i} logs at debug"
        );
        assert!(log.len() > 10_000, "replica {i} wrote a real log");
    }
    for key in [&admin, &eval, &made_key] {
        for secret in secrets(key) {
            for (i, log) in logs.iter().enumerate() {
                assert!(
                    !log.contains(&secret),
                    "replica {i}'s log holds a key or its hash"
                );
            }
            assert!(
                !tables.contains(&secret),
                "the audit tables hold a key or its hash"
            );
            assert!(
                !listed.contains(&secret),
                "the listing holds a key or its hash"
            );
        }
    }
    assert!(tables.contains(&key_id(&eval)), "the records carry key ids");
}

/// `charter serve` on `addr` with a fresh SQLite file; stderr is captured.
fn serve(dir: &Path, addr: &str, env: &[(&str, &str)]) -> std::process::Child {
    let mut cmd = charter();
    cmd.args(["serve", "--bind", addr])
        .env(
            "CHARTER__DATABASE__URL",
            format!("sqlite://{}?mode=rwc", dir.join("c.db").display()),
        )
        .env("CHARTER__AUDIT__SPOOL_DIR", dir.join("spool"))
        .env("CHARTER__LOG__FILTER", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits for `/healthz` on loopback:`port`, then stops the process with SIGTERM.
fn healthy_then_stop(mut child: std::process::Child, port: u16) {
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let started = Instant::now();
    while crate::common::get_status(addr, "/healthz") != Some(200) {
        if let Ok(Some(status)) = child.try_wait() {
            let out = child.wait_with_output().unwrap();
            panic!(
                "exited ({status}): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(started.elapsed() < Duration::from_secs(30), "not listening");
        std::thread::sleep(Duration::from_millis(100));
    }
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(child.wait().unwrap().success());
}

#[test]
fn a_network_address_without_keys_refuses_to_start_unless_auth_mode_is_none() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let addr = format!("0.0.0.0:{port}");
    let started = Instant::now();
    let out = serve(dir.path(), &addr, &[]).wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "refused before loading the model"
    );
    assert!(stderr.contains("refusing to serve on 0.0.0.0"), "{stderr}");
    assert!(
        stderr.contains("charter keys create --name admin --scopes admin"),
        "{stderr}"
    );
    assert!(stderr.contains("auth.mode"), "{stderr}");
    // `auth.mode = "keys"` on loopback refuses too.
    let out = serve(
        dir.path(),
        &format!("127.0.0.1:{port}"),
        &[("CHARTER__AUTH__MODE", "keys")],
    )
    .wait_with_output()
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    // Said explicitly, none starts; and with a key in the database, so does the default.
    healthy_then_stop(
        serve(dir.path(), &addr, &[("CHARTER__AUTH__MODE", "none")]),
        port,
    );
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("c.db").display());
    create_key(&url, &["--name", "admin", "--scopes", "admin"]);
    healthy_then_stop(serve(dir.path(), &addr, &[]), port);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_needs_no_key_but_checks_one_that_is_sent() {
    let s = crate::common::shared();
    let hello = || Some(json!({"text": "Hello."}));
    assert_eq!(
        call(s, "POST", "/v1/evaluate", None, hello()).await.status,
        200
    );
    for path in ["/v1/evaluations", "/metrics", "/v1/admin/keys"] {
        assert_eq!(call(s, "GET", path, None, None).await.status, 200, "{path}");
    }
    // Another service's bearer token is not a Charter key: served, as before keys.
    let a = call(
        s,
        "POST",
        "/v1/evaluate",
        Some(("sk-some-token", Send::Bearer)),
        hello(),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    // A Charter key that is not valid is refused, on loopback too.
    let forged = format!("chk_{}_{}", "1".repeat(16), "cd".repeat(32));
    for send in [Send::Bearer, Send::Header] {
        let a = call(s, "POST", "/v1/evaluate", Some((&forged, send)), hello()).await;
        assert_api_error(&a, 401, "unauthorized", "forged key on loopback");
    }
}
