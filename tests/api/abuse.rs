//! Abuse (issue 21): one huge request does not starve the others nor outlive its deadline,
//! a request over its share of the model queue is refused, a saturated queue shows in
//! `/readyz`; slow and idle connections are closed and cannot keep anyone out; hyper's
//! own error answers carry the JSON error body. Bounds here are generous (a loaded 2-core
//! box); tools/abuse_check.py measures the real figures.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::TestServer;

/// `count` texts of `chars` characters of ordinary sentences, distinct per `seed`.
fn long_texts(count: usize, chars: usize, seed: usize) -> Vec<String> {
    let words = [
        "the",
        "committee",
        "reviewed",
        "budget",
        "proposal",
        "meeting",
        "schedule",
        "river",
        "garden",
        "library",
        "station",
        "market",
        "teacher",
        "recipe",
        "travel",
        "weather",
    ];
    (0..count)
        .map(|t| {
            let mut text = String::with_capacity(chars + 64);
            let mut i = seed * 1000 + t * 7;
            while text.len() < chars {
                for k in 0..8 + i % 11 {
                    text.push_str(words[(i * 31 + k * 13) % words.len()]);
                    text.push(' ');
                }
                text.push_str(&format!("number {i}. "));
                i += 1;
            }
            text.truncate(chars);
            text
        })
        .collect()
}

/// Queue units of a batch, as the queue counts them.
fn units(texts: &[String]) -> u64 {
    texts.iter().map(|t| 1 + t.len() as u64 / 1024).sum()
}

async fn readyz(server: &TestServer) -> (u16, Value) {
    let r = reqwest::get(server.url("/readyz")).await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// Polls `/readyz` until `done` holds for its body (panics after `limit`).
async fn wait_queue(server: &TestServer, limit: Duration, done: impl Fn(&Value) -> bool) -> Value {
    let started = Instant::now();
    loop {
        let (_, body) = readyz(server).await;
        if done(&body["queue"]) {
            return body;
        }
        assert!(started.elapsed() < limit, "queue never got there: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn post_texts(server: &TestServer, texts: &[String]) -> reqwest::RequestBuilder {
    reqwest::Client::new()
        .post(server.url("/v1/evaluate"))
        .json(&json!({ "texts": texts }))
}

#[tokio::test]
async fn a_huge_batch_neither_starves_others_nor_outlives_its_deadline() {
    let server = TestServer::start(&[
        ("CHARTER__SERVER__REQUEST_TIMEOUT_SECS", "5"),
        ("CHARTER__SERVER__BODY_LIMIT_BYTES", "8388608"),
    ]);

    // Short requests from 6 clients, for as long as the huge batch runs.
    let stop = Arc::new(AtomicBool::new(false));
    let seen: Arc<Mutex<Vec<(Instant, u16)>>> = Arc::default();
    let clients: Vec<_> = (0..6)
        .map(|n| {
            let (url, stop, seen) = (server.url("/v1/evaluate"), stop.clone(), seen.clone());
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                let body = json!({"text": format!("Can you suggest a book about gardening? {n}")});
                while !stop.load(Ordering::Relaxed) {
                    let r = client.post(&url).json(&body).send().await.unwrap();
                    let status = r.status().as_u16();
                    seen.lock().unwrap().push((Instant::now(), status));
                }
            })
        })
        .collect();

    // 3.7 MB in 64 long texts: minutes of model work, so it meets its 5 s deadline.
    let big = long_texts(64, 57_800, 1);
    let sent = Instant::now();
    let r = post_texts(&server, &big).send().await.unwrap();
    let deadline = Instant::now();
    assert_eq!(r.status(), 408);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["type"], "timeout", "{body}");

    // Its work is dropped: its queue room comes back and rows were left unembedded.
    let after = wait_queue(&server, Duration::from_secs(20), |q| {
        q["units"].as_u64().unwrap() < units(&big)
    })
    .await;
    assert!(
        after["queue"]["rows_cancelled"].as_u64().unwrap() > 0,
        "{after}"
    );
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    let statuses: Vec<u16> = seen.iter().map(|(_, s)| *s).collect();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    // Served while the huge batch was in the queue, not after it.
    let during = seen
        .iter()
        .filter(|(t, _)| *t > sent + Duration::from_secs(1) && *t < deadline)
        .count();
    assert!(during > 0, "no short request answered while the batch ran");
    let idle = wait_queue(&server, Duration::from_secs(20), |q| q["units"] == 0).await;
    assert_eq!(idle["status"], "ready", "{idle}");
    server.stop().unwrap();
}

#[tokio::test]
async fn queue_share_saturation_and_disconnects() {
    let server = TestServer::start(&[
        ("CHARTER__SERVER__REQUEST_TIMEOUT_SECS", "8"),
        ("CHARTER__SERVER__BODY_LIMIT_BYTES", "8388608"),
    ]);

    // One request may hold half of the 8192 units: 4.5 MB is over it, whatever the load.
    let over = long_texts(64, 70_000, 2);
    let r = post_texts(&server, &over).send().await.unwrap();
    assert_eq!(r.status(), 429);
    assert!(
        r.headers().get("retry-after").is_none(),
        "retrying cannot help"
    );
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["type"], "over_request_share", "{body}");
    assert_eq!(body["error"]["field"], "texts", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("batching.max_request_share"), "{message}");
    assert!(message.contains(&units(&over).to_string()), "{message}");

    // Two requests within their share fill the queue; a third finds no room (429), and
    // /readyz says saturated (503) until the queue takes work again.
    let halves: Vec<Vec<String>> = (0..2).map(|s| long_texts(64, 61_000, 10 + s)).collect();
    let held: u64 = halves.iter().map(|h| units(h)).sum();
    let running: Vec<_> = halves
        .iter()
        .map(|h| tokio::spawn(post_texts(&server, h).send()))
        .collect();
    wait_queue(&server, Duration::from_secs(20), |q| {
        q["units"].as_u64().unwrap() >= held
    })
    .await;
    let third = long_texts(64, 10_000, 20);
    let r = post_texts(&server, &third).send().await.unwrap();
    assert_eq!(r.status(), 429);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["type"], "overloaded", "{body}");
    let (status, body) = readyz(&server).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["status"], "saturated", "{body}");
    assert_eq!(body["queue"]["saturated"], true, "{body}");
    for r in running {
        assert_eq!(r.await.unwrap().unwrap().status(), 408);
    }
    wait_queue(&server, Duration::from_secs(20), |q| q["units"] == 0).await;
    let started = Instant::now();
    while readyz(&server).await.0 != 200 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "still saturated"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A client that sends a huge batch and goes away: its work is dropped too.
    let cancelled = readyz(&server).await.1["queue"]["rows_cancelled"]
        .as_u64()
        .unwrap();
    let gone = serde_json::to_vec(&json!({"texts": long_texts(64, 57_800, 30)})).unwrap();
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let head = format!(
        "POST /v1/evaluate HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        gone.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&gone).await.unwrap();
    wait_queue(&server, Duration::from_secs(20), |q| {
        q["units"].as_u64().unwrap() > 0
    })
    .await;
    drop(stream);
    let after = wait_queue(&server, Duration::from_secs(20), |q| q["units"] == 0).await;
    assert!(
        after["queue"]["rows_cancelled"].as_u64().unwrap() > cancelled,
        "{after}"
    );
    server.stop().unwrap();
}

/// Accepted sockets of the server on `port` (an accept-queue socket has no inode yet).
fn accepted(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let local = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f[1].ends_with(&local) && f[3] == "01" && f[9] != "0"
        })
        .count()
}

/// Reads until the server closes the connection; returns what it sent, or `None` when it
/// is still open after `limit`.
async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let read = tokio::time::timeout(limit, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    read.ok().map(|_| got)
}

async fn healthz(addr: SocketAddr) -> u16 {
    let r = reqwest::Client::new()
        .get(format!("http://{addr}/healthz"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap();
    r.status().as_u16()
}

#[tokio::test]
async fn slow_and_idle_connections_are_closed_and_cannot_keep_others_out() {
    let server = TestServer::start(&[
        ("CHARTER__SERVER__HEADER_READ_TIMEOUT_SECS", "1"),
        ("CHARTER__SERVER__MAX_CONNECTIONS", "16"),
    ]);
    let addr = server.addr;

    // Slowloris: a request head trickled a header every 200 ms is cut off.
    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut cut = false;
    while started.elapsed() < Duration::from_secs(15) {
        if slow.write_all(b"x-slow: 1\r\n").await.is_err() {
            cut = true;
            break;
        }
        let mut buf = [0u8; 64];
        match tokio::time::timeout(Duration::from_millis(200), slow.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                cut = true;
                break;
            }
            Ok(Ok(_)) => panic!("the trickled request was answered"),
            Err(_) => {}
        }
    }
    assert!(cut, "a trickled request head was kept open for 15 s");

    // A kept-alive connection that goes quiet after its response is closed.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let got = read_until_closed(&mut idle, Duration::from_secs(15)).await;
    let got = String::from_utf8(got.expect("an idle keep-alive connection stayed open")).unwrap();
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");

    // 200 idle sockets against a cap of 16: /healthz still answers at once (idle ones
    // make room), and the server never holds more than the cap (+1 being admitted).
    let mut flood = Vec::new();
    for _ in 0..200 {
        flood.push(TcpStream::connect(addr).await.unwrap());
    }
    assert_eq!(healthz(addr).await, 200);
    let held = accepted(addr.port());
    assert!(held <= 17, "{held} connections accepted, cap 16");
    let closed = {
        let mut n = 0;
        for s in &mut flood {
            let mut buf = [0u8; 1];
            if let Ok(Ok(0)) =
                tokio::time::timeout(Duration::from_millis(1), s.read(&mut buf)).await
            {
                n += 1;
            }
        }
        n
    };
    assert!(closed > 0, "no idle socket was closed to make room");
    drop(flood);
    assert_eq!(healthz(addr).await, 200);
    server.stop().unwrap();
}

#[tokio::test]
async fn hyper_error_answers_have_json_bodies() {
    let server = crate::common::shared();
    // Headers far past hyper's read buffer (about 400 KB, adaptive: 500 KB read as it
    // arrives was accepted) answer 431.
    // A request target above 65,534 bytes: hyper answers 414 where it parses the whole
    // target at once; read in pieces (as CI's run showed) it may reach the router, which
    // answers 404. Either way the answer is a JSON error, never an empty body.
    let long_path: &[(u16, &str)] = &[(414, "uri_too_long"), (404, "not_found")];
    let cases: [(String, &[(u16, &str)]); 3] = [
        (
            format!("GET /{} HTTP/1.1\r\nhost: x\r\n\r\n", "a".repeat(70_000)),
            long_path,
        ),
        (
            format!(
                "GET / HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
                "a".repeat(2_000_000)
            ),
            &[(431, "headers_too_large")],
        ),
        (
            "NOT\u{1} HTTP\r\n\r\n".to_string(),
            &[(400, "malformed_request")],
        ),
    ];
    for (request, allowed) in cases {
        let stream = TcpStream::connect(server.addr).await.unwrap();
        // The server answers before it has read all of a large request and then closes
        // the connection; the unread rest makes that close a reset, which can discard an
        // answer not yet read. So the answer is read while the request is written.
        let (mut rx, mut tx) = stream.into_split();
        let reader =
            tokio::spawn(async move { read_answer(&mut rx, Duration::from_secs(20)).await });
        let _ = tx.write_all(request.as_bytes()).await;
        let got = reader.await.unwrap();
        let got = String::from_utf8(got).unwrap();
        let (head, body) = got
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("no complete answer: {got:?}"));
        let status: u16 = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{head}"));
        let kind = allowed
            .iter()
            .find(|(s, _)| *s == status)
            .map(|(_, k)| *k)
            .unwrap_or_else(|| panic!("status {status} not in {allowed:?}: {head}"));
        assert!(head.contains("content-type: application/json"), "{head}");
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or_else(|| panic!("no content-length: {head}"));
        assert_eq!(body.len(), length, "{head}\n{body}");
        let json: Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"]["type"], kind, "{json}");
    }
}

/// What the server wrote until it closed, reset, or went quiet after a complete answer
/// (head plus content-length bytes of body).
async fn read_answer(stream: &mut tokio::net::tcp::OwnedReadHalf, limit: Duration) -> Vec<u8> {
    let mut got = Vec::new();
    let _ = tokio::time::timeout(limit, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
            if answer_complete(&got) {
                return;
            }
        }
    })
    .await;
    got
}

fn answer_complete(got: &[u8]) -> bool {
    let text = String::from_utf8_lossy(got);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return false;
    };
    head.lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .and_then(|l| l.trim().parse::<usize>().ok())
        .is_some_and(|n| body.len() >= n)
}
