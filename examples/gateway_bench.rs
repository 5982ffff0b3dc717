//! Benchmark: the latency the gateway's proxy path adds, evaluation excluded.
//!
//! `make bench-gateway` (or `cargo run --release --example gateway_bench -- [N]`) starts
//! the mock upstream of the tests and the gateway (the full router, with prompt screening
//! and output evaluation switched off, so no model is loaded), then times N sequential
//! requests of each kind directly against the mock and through the gateway, over
//! keep-alive connections on loopback:
//! - non-streaming `POST /v1/messages`: whole-response latency, p50 / p99;
//! - streaming `POST /v1/messages` (`stream: true`, ~950 characters in 136 text
//!   deltas): time to the first body byte and to the end of the stream, p50 / p99.
//!
//! Direct and gateway requests alternate, so both see the same machine load.
//!
//! The added latency is gateway minus direct. Figures go to BENCHMARKS.md.

#[path = "../tests/common/anthropic_mock.rs"]
mod anthropic_mock;

use std::sync::Arc;
use std::time::{Duration, Instant};

use charter::audit::LogSink;
use charter::config::Config;
use charter::state::AppState;
use futures_util::StreamExt;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2000);
    let mock = anthropic_mock::MockUpstream::start();
    let env = vec![
        ("CHARTER__GATEWAY__UPSTREAM_URL".to_string(), mock.url()),
        (
            "CHARTER__GATEWAY__SCREEN_PROMPTS".to_string(),
            "false".into(),
        ),
        (
            "CHARTER__GATEWAY__EVALUATE_OUTPUT".to_string(),
            "false".into(),
        ),
    ];
    let config = Config::load_from(None, env).expect("configuration");
    let state = AppState::new(config, Arc::new(LogSink));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gateway = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        axum::serve(listener, charter::http::router(state))
            .await
            .unwrap()
    });

    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(4)
        .build()
        .unwrap();
    let plain = serde_json::json!({"model": "mock-plain", "max_tokens": 64,
        "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    .to_string();
    let streamed =
        serde_json::json!({"model": "mock-long-harmful", "max_tokens": 512, "stream": true,
        "messages": [{"role": "user", "content": "Tell me about gardening."}]})
        .to_string();

    println!("gateway proxy path, evaluation off; {n} sequential requests per row, loopback");
    println!(
        "{:<34} {:>9} {:>9} {:>9}",
        "measurement", "p50 ms", "p99 ms", "mean ms"
    );
    let bases = [mock.url(), gateway.clone()];
    // Warm-up: connections, allocator, caches.
    for _ in 0..50 {
        for base in &bases {
            time(&client, base, &plain, false).await;
            time(&client, base, &streamed, true).await;
        }
    }
    // Direct and gateway requests alternate, so both see the same machine load.
    let mut samples: [[Vec<f64>; 3]; 2] = Default::default();
    for _ in 0..n {
        for (k, base) in bases.iter().enumerate() {
            samples[k][0].push(time(&client, base, &plain, false).await.1);
            let (first, whole) = time(&client, base, &streamed, true).await;
            samples[k][1].push(first);
            samples[k][2].push(whole);
        }
    }
    let rows: Vec<(&str, _, _, _)> = ["direct", "gateway"]
        .into_iter()
        .zip(samples)
        .map(|(label, [total, first, whole])| (label, stats(total), stats(first), stats(whole)))
        .collect();
    for (label, total, first, whole) in &rows {
        print_row(&format!("{label}: non-streaming"), total);
        print_row(&format!("{label}: stream first byte"), first);
        print_row(&format!("{label}: stream complete"), whole);
    }
    let (d, g) = (&rows[0], &rows[1]);
    println!("added by the gateway (gateway - direct):");
    for (what, a, b) in [
        ("non-streaming", &d.1, &g.1),
        ("stream first byte", &d.2, &g.2),
        ("stream complete", &d.3, &g.3),
    ] {
        println!(
            "{:<34} {:>9.3} {:>9.3} {:>9.3}",
            what,
            b.0 - a.0,
            b.1 - a.1,
            b.2 - a.2
        );
    }
}

/// One request: (time to the first body byte, time to the end), in milliseconds.
async fn time(client: &reqwest::Client, base: &str, body: &str, stream: bool) -> (f64, f64) {
    let started = Instant::now();
    let response = client
        .post(format!("{base}/v1/messages"))
        .header("x-api-key", "sk-bench")
        .header("anthropic-version", "2023-06-01")
        .header("content-type", "application/json")
        .body(body.to_string())
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .expect("answer");
    assert!(response.status().is_success(), "{}", response.status());
    let mut chunks = response.bytes_stream();
    let mut first = None;
    let mut bytes = 0;
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.expect("body");
        if first.is_none() && !chunk.is_empty() {
            first = Some(started.elapsed());
        }
        bytes += chunk.len();
    }
    assert!(bytes > 0 && (!stream || bytes > 1000));
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    (ms(first.unwrap_or_default()), ms(started.elapsed()))
}

/// (p50, p99, mean)
fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let pick = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    (
        pick(0.5),
        pick(0.99),
        v.iter().sum::<f64>() / v.len() as f64,
    )
}

fn print_row(label: &str, s: &(f64, f64, f64)) {
    println!("{:<34} {:>9.3} {:>9.3} {:>9.3}", label, s.0, s.1, s.2);
}
