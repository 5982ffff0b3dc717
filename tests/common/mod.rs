//! Test harness: the real server (`charter::run`) on port 0, the real model and the real
//! default constitution. One shared server serves most tests; tests that need their own
//! configuration start a private one.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use charter::config::Config;

/// A running server on its own thread and runtime, so it outlives each test's runtime.
pub struct TestServer {
    pub addr: SocketAddr,
    /// The audit database and spool, unless the configuration named its own.
    pub dir: Option<tempfile::TempDir>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<(), String>>>,
}

impl TestServer {
    /// Starts a server with the defaults plus `overrides` (`CHARTER__*` pairs) and waits
    /// until `/readyz` says ready.
    pub fn start(overrides: &[(&str, &str)]) -> Self {
        let env: Vec<(String, String)> = overrides
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let config = Config::load_from(None, env).expect("test configuration");
        Self::start_with(config)
    }

    pub fn start_with(mut config: Config) -> Self {
        let dir = private_audit_store(&mut config);
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                charter::run(config, listener, async move {
                    let _ = stop_rx.await;
                })
                .await
                .map_err(|e| e.to_string())
            })
        });
        let addr = addr_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("server bound");
        let server = Self {
            addr,
            dir,
            stop: Some(stop_tx),
            thread: Some(thread),
        };
        server.wait_ready(Duration::from_secs(300));
        server
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    fn wait_ready(&self, limit: Duration) {
        let started = Instant::now();
        loop {
            if get_status(self.addr, "/readyz") == Some(200) {
                return;
            }
            if self.thread.as_ref().is_some_and(|t| t.is_finished()) {
                panic!("server stopped during start-up");
            }
            assert!(
                started.elapsed() < limit,
                "server not ready after {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Sends the shutdown signal and waits for the server to stop.
    pub fn stop(mut self) -> Result<(), String> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.thread.take().unwrap().join().expect("server thread")
    }

    /// Sends the shutdown signal without waiting.
    pub fn signal_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    pub fn join(mut self) -> Result<(), String> {
        self.thread.take().unwrap().join().expect("server thread")
    }
}

/// Gives a server its own SQLite file and spool folder when its configuration uses the
/// defaults (one spool folder per process; tests must not write into the working tree).
pub fn private_audit_store(config: &mut Config) -> Option<tempfile::TempDir> {
    let defaults = Config::load_from(None, Vec::new()).expect("defaults");
    let default_db = config.database.url == defaults.database.url;
    let default_spool = config.audit.spool_dir == defaults.audit.spool_dir;
    if !(default_db || default_spool) {
        return None;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    if default_db {
        config.database.url = charter::config::Secret::new(format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("charter.db").display()
        ));
    }
    if default_spool {
        config.audit.spool_dir = dir.path().join("spool");
    }
    Some(dir)
}

/// The server shared by tests that use the default configuration.
pub fn shared() -> &'static TestServer {
    static SERVER: OnceLock<TestServer> = OnceLock::new();
    SERVER.get_or_init(|| TestServer::start(&[]))
}

/// Status of a plain GET, over std TCP (usable outside any runtime).
pub fn get_status(addr: SocketAddr, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response.split_whitespace().nth(1)?.parse().ok()
}

/// POSTs JSON to the server; returns status and parsed body.
pub async fn post_json(
    server: &TestServer,
    path: &str,
    body: &serde_json::Value,
) -> (u16, serde_json::Value) {
    let r = reqwest::Client::new()
        .post(server.url(path))
        .json(body)
        .send()
        .await
        .expect("request");
    let status = r.status().as_u16();
    let body = r.json().await.unwrap_or(serde_json::Value::Null);
    (status, body)
}

/// GET `path` and parse the JSON body.
pub async fn get_json(server: &TestServer, path: &str) -> serde_json::Value {
    reqwest::get(server.url(path))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

pub async fn evaluate(server: &TestServer, text: &str) -> serde_json::Value {
    let (status, body) =
        post_json(server, "/v1/evaluate", &serde_json::json!({"text": text})).await;
    assert_eq!(status, 200, "{body}");
    body
}

/// Ids of the violated rules in an evaluate response.
pub fn violated(body: &serde_json::Value) -> Vec<String> {
    body["violated"]
        .as_array()
        .map(|a| a.iter().map(|v| v.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}
