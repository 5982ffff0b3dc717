//! Unit tests of the model queue (src/embed/queue.rs).

use super::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Deterministic fake model: one "token" per whitespace-separated word, and a vector
/// that depends only on the text. Records the batches it was called with.
struct Fake {
    info: ModelInfo,
    calls: Arc<Mutex<Vec<Vec<String>>>>,
    delay: Duration,
    fail_on: Option<&'static str>,
    /// Embeds spans in the row's call, each as the fake vector of its own text.
    spans: bool,
}

fn info(max_tokens: usize) -> ModelInfo {
    ModelInfo {
        id: "fake".into(),
        description: String::new(),
        output: "x".into(),
        pooling: "none".into(),
        max_tokens,
        prefix: String::new(),
        dim: 4,
        neighbour_dims: None,
        spans: false,
        licence: String::new(),
    }
}

fn fake_vector(text: &str) -> Vec<f32> {
    let h = text
        .bytes()
        .fold(7u32, |h, b| h.wrapping_mul(31).wrapping_add(b as u32));
    vec![(h % 97) as f32, text.len() as f32, 1.0, 0.0]
}

impl Backend for Fake {
    fn info(&self) -> &ModelInfo {
        &self.info
    }
    fn token_offsets(&self, text: &str) -> Result<Vec<(usize, usize)>, EmbedError> {
        let mut out = Vec::new();
        let mut start = None;
        for (i, c) in text.char_indices() {
            match (c.is_whitespace(), start) {
                (false, None) => start = Some(i),
                (true, Some(s)) => {
                    out.push((s, i));
                    start = None;
                }
                _ => {}
            }
        }
        if let Some(s) = start {
            out.push((s, text.len()));
        }
        Ok(out)
    }
    fn embed(&mut self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError> {
        std::thread::sleep(self.delay);
        if let Some(bad) = self.fail_on {
            if texts.iter().any(|t| t.contains(bad)) {
                return Err(EmbedError::Inference("boom".into()));
            }
        }
        self.calls
            .lock()
            .unwrap()
            .push(texts.iter().map(|t| t.to_string()).collect());
        Ok(texts.iter().map(|t| fake_vector(t)).collect())
    }
    fn pools_spans(&self) -> bool {
        self.spans
    }
    fn embed_rows(&mut self, rows: &[Row]) -> Result<Vec<Vec<Vec<f32>>>, EmbedError> {
        let texts: Vec<&str> = rows.iter().map(|r| r.text).collect();
        let whole = self.embed(&texts)?;
        Ok(rows
            .iter()
            .zip(whole)
            .map(|(row, v)| {
                let spans = row.spans.iter().map(|&(s, e)| fake_vector(&row.text[s..e]));
                std::iter::once(v).chain(spans).collect()
            })
            .collect())
    }
}

fn config() -> QueueConfig {
    QueueConfig {
        max_batch_tokens: 64,
        max_batch_size: 4,
        bucket_ratio: 1.5,
        capacity: 16,
        max_request_units: 16,
        retry_after_secs: 3,
    }
}

fn start(delay: Duration, config: QueueConfig) -> (Embedder, Arc<Mutex<Vec<Vec<String>>>>) {
    let calls = Arc::new(Mutex::new(Vec::new()));
    let fake = Fake {
        info: info(12),
        calls: Arc::clone(&calls),
        delay,
        fail_on: Some("FAIL"),
        spans: false,
    };
    (Embedder::start(vec![fake], config).unwrap(), calls)
}

fn texts(list: &[&str]) -> Arc<Vec<String>> {
    Arc::new(list.iter().map(|s| s.to_string()).collect())
}

#[tokio::test]
async fn results_come_back_in_order_with_their_own_vectors() {
    let (embedder, _) = start(Duration::ZERO, config());
    let input = ["one", "two words", "three little words", "one"];
    let out = embedder.embed(texts(&input), None).await.unwrap();
    assert_eq!(out.texts.len(), 4);
    for (text, emb) in input.iter().zip(&out.texts) {
        assert_eq!(emb.pieces.len(), 1);
        assert_eq!(emb.pieces[0].vector, fake_vector(text));
    }
}

#[tokio::test]
async fn a_short_text_is_answered_before_the_long_ones_gathered_with_it() {
    let (embedder, _) = start(Duration::from_millis(40), config());
    // Keep the worker busy so that the next two jobs are gathered into one batch.
    let busy = {
        let e = embedder.clone();
        tokio::spawn(async move { e.embed(texts(&["busy"]), None).await })
    };
    tokio::time::sleep(Duration::from_millis(10)).await;
    let timed = |list: Vec<&'static str>| {
        let e = embedder.clone();
        tokio::spawn(async move {
            let out = e.embed(texts(&list), None).await.unwrap();
            (Instant::now(), out.model_time)
        })
    };
    let long = timed(vec!["c d e f g h i j"; 6]);
    let short = timed(vec!["a"]);
    busy.await.unwrap().unwrap();
    let (long_done, long_model) = long.await.unwrap();
    let (short_done, short_model) = short.await.unwrap();
    // "a" runs in the first bucket; the six long texts need two more calls.
    assert!(
        short_done < long_done,
        "the short text waited for the long ones"
    );
    assert!(
        short_model + Duration::from_millis(60) <= long_model,
        "short {short_model:?}, long {long_model:?}"
    );
}

#[tokio::test]
async fn batches_are_bucketed_by_length_and_bounded() {
    let (embedder, calls) = start(Duration::ZERO, config());
    let input = [
        "a",
        "b",
        "c d e f g h i j",
        "k",
        "l m n o p q r s",
        "t",
        "u v",
    ];
    embedder.embed(texts(&input), None).await.unwrap();
    let calls = calls.lock().unwrap();
    for batch in calls.iter() {
        assert!(batch.len() <= 4, "batch too big: {batch:?}");
        let lens: Vec<usize> = batch.iter().map(|t| t.split_whitespace().count()).collect();
        let (min, max) = (*lens.iter().min().unwrap(), *lens.iter().max().unwrap());
        assert!(
            max as f32 <= 1.5 * min as f32,
            "bucket mixes lengths: {batch:?}"
        );
        assert!(batch.len() * (max + 2) <= 64);
    }
    let total: usize = calls.iter().map(|b| b.len()).sum();
    assert_eq!(total, input.len());
}

#[tokio::test]
async fn long_texts_get_whole_piece_and_windows() {
    let (embedder, _) = start(Duration::ZERO, config());
    let words: Vec<String> = (0..30).map(|i| format!("w{i}")).collect();
    let text = words.join(" ");
    let out = embedder
        .embed(
            Arc::new(vec![text.clone()]),
            Some(WindowSpec {
                tokens: 8,
                stride: 6,
            }),
        )
        .await
        .unwrap();
    let emb = &out.texts[0];
    assert!(emb.truncated, "30 tokens exceed the 10-token capacity");
    assert_eq!(emb.tokens, 30);
    let whole = &emb.pieces[0];
    assert_eq!(&text[whole.start..whole.end], words[..10].join(" "));
    let last = emb.pieces.last().unwrap();
    assert_eq!(&text[last.start..last.end], words[22..].join(" "));
    for piece in &emb.pieces {
        assert_eq!(piece.vector, fake_vector(&text[piece.start..piece.end]));
    }
}

#[tokio::test]
async fn a_backend_that_pools_spans_embeds_the_pieces_inside_the_window_in_the_texts_call() {
    let calls = Arc::new(Mutex::new(Vec::new()));
    let fake = Fake {
        info: info(12),
        calls: Arc::clone(&calls),
        delay: Duration::ZERO,
        fail_on: None,
        spans: true,
    };
    let embedder = Embedder::start(vec![fake], config()).unwrap();
    // 10 tokens fit the window; sentences of 6 words: three inside, the rest past it.
    let text = (0..4)
        .map(|s| {
            (0..6)
                .map(|w| format!("s{s}w{w}"))
                .collect::<Vec<_>>()
                .join(" ")
                + "."
        })
        .collect::<Vec<_>>()
        .join(" ");
    let windows = Some(WindowSpec {
        tokens: 8,
        stride: 6,
    });
    let out = embedder
        .embed(Arc::new(vec![text.clone()]), windows)
        .await
        .unwrap();
    let emb = &out.texts[0];
    assert_eq!(emb.pieces.len(), 5, "the whole text and four sentences");
    for piece in &emb.pieces {
        assert_eq!(piece.vector, fake_vector(&text[piece.start..piece.end]));
    }
    // One row for the whole text (its window holds the first sentence), one per
    // sentence past the window; no row for the sentence inside it.
    let whole = &text[emb.pieces[0].start..emb.pieces[0].end];
    let rows: Vec<String> = calls.lock().unwrap().concat();
    assert_eq!(rows.len(), 4, "{rows:?}");
    assert!(rows.iter().any(|r| r == whole));
    let first = &text[emb.pieces[1].start..emb.pieces[1].end];
    assert!(!rows.iter().any(|r| r == first), "{rows:?}");
}

#[tokio::test]
async fn full_queue_is_overloaded_not_blocked() {
    let cfg = QueueConfig {
        capacity: 2,
        ..config()
    };
    // A slow model: the first job holds the queue for a long time.
    let (embedder, _) = start(Duration::from_millis(2000), cfg);
    let first = {
        let e = embedder.clone();
        tokio::spawn(async move { e.embed(texts(&["x", "y"]), None).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let err = embedder.embed(texts(&["z"]), None).await.unwrap_err();
    assert_eq!(
        err,
        EmbedError::Overloaded {
            retry_after_secs: 3
        }
    );
    // Refused while the first job still runs: it did not wait for room.
    assert!(
        !first.is_finished(),
        "the refusal must not wait for the queue to drain"
    );
    first.await.unwrap().unwrap();
    // Room again once the first job is answered.
    embedder.embed(texts(&["z"]), None).await.unwrap();
}

#[tokio::test]
async fn a_failing_bucket_fails_only_its_jobs() {
    let (embedder, _) = start(Duration::from_millis(20), config());
    let ok = {
        let e = embedder.clone();
        tokio::spawn(async move { e.embed(texts(&["fine text here"]), None).await })
    };
    let bad = embedder.embed(texts(&["FAIL"]), None).await;
    assert!(matches!(bad, Err(EmbedError::Inference(_))));
    assert!(ok.await.unwrap().is_ok());
}

#[tokio::test]
async fn abandoned_jobs_are_skipped() {
    let (embedder, calls) = start(Duration::from_millis(1000), config());
    let busy = {
        let e = embedder.clone();
        tokio::spawn(async move { e.embed(texts(&["first"]), None).await })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    // Queued behind "first", then abandoned.
    let abandoned = tokio::time::timeout(
        Duration::from_millis(10),
        embedder.embed(texts(&["abandoned"]), None),
    )
    .await;
    assert!(abandoned.is_err());
    busy.await.unwrap().unwrap();
    embedder.embed(texts(&["after"]), None).await.unwrap();
    let seen: Vec<String> = calls.lock().unwrap().iter().flatten().cloned().collect();
    assert!(!seen.contains(&"abandoned".to_string()), "{seen:?}");
}

/// `n` texts of `words` distinct words each (one row each, all in one length bucket).
fn many(n: usize, words: usize, tag: &str) -> Arc<Vec<String>> {
    Arc::new(
        (0..n)
            .map(|i| {
                (0..words)
                    .map(|w| format!("{tag}{i}w{w}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect(),
    )
}

type Calls = Arc<Mutex<Vec<Vec<String>>>>;
type Running = tokio::task::JoinHandle<Result<Embedded, EmbedError>>;

/// A queue of `capacity` units, `max_units` per request, whose model takes `delay` ms
/// a call.
fn sized(capacity: usize, max_units: usize, delay: u64) -> (Embedder, Calls) {
    let cfg = QueueConfig {
        capacity,
        max_request_units: max_units,
        ..config()
    };
    start(Duration::from_millis(delay), cfg)
}

/// A queue of `capacity` units whose model takes `delay` ms a call, already inside a job
/// of `rows` texts of 8 tokens (6 per model call of 64 tokens).
async fn inside_a_job(capacity: usize, delay: u64, rows: usize) -> (Embedder, Calls, Running) {
    let (embedder, calls) = sized(capacity, capacity, delay);
    let job = {
        let e = embedder.clone();
        tokio::spawn(async move { e.embed(many(rows, 8, "big"), None).await })
    };
    while calls.lock().unwrap().is_empty() {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    (embedder, calls, job)
}

#[tokio::test]
async fn a_cancelled_job_stops_between_buckets_and_frees_its_room() {
    let (embedder, calls, big) = inside_a_job(64, 20, 40).await;
    // The caller goes away while the worker is inside its job.
    big.abort();
    let status = loop {
        let status = embedder.status();
        if status.units == 0 {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let embedded: usize = calls.lock().unwrap().iter().map(Vec::len).sum();
    assert!(
        embedded < 40,
        "every row was embedded after the caller left"
    );
    assert_eq!(status.rows_cancelled as usize, 40 - embedded);
    // Nothing more of it runs.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let later: usize = calls.lock().unwrap().iter().map(Vec::len).sum();
    assert_eq!(later, embedded);
}

#[tokio::test]
async fn a_short_request_does_not_wait_for_a_huge_one() {
    // 120 rows: 20 model calls of 6.
    let (embedder, calls, huge) = inside_a_job(256, 10, 120).await;
    let short = embedder.embed(texts(&["quick one"]), None).await.unwrap();
    assert!(!huge.is_finished(), "the huge job finished first");
    // It joined at the next round: one bucket of the huge job, not all of them.
    let before: usize = calls.lock().unwrap().len();
    assert!(
        before < 10,
        "{before} model calls before the short text's answer"
    );
    assert_eq!(short.texts[0].pieces[0].vector, fake_vector("quick one"));
    let out = huge.await.unwrap().unwrap();
    assert_eq!(out.texts.len(), 120);
    for (i, t) in out.texts.iter().enumerate() {
        let text = &many(120, 8, "big")[i];
        assert_eq!(t.pieces[0].vector, fake_vector(text));
    }
}

#[tokio::test]
async fn a_request_over_its_share_is_refused_naming_the_limit() {
    let (embedder, calls) = sized(16, 8, 0);
    let err = embedder.embed(many(9, 1, "t"), None).await.unwrap_err();
    assert_eq!(
        err,
        EmbedError::OverShare {
            units: 9,
            max_units: 8
        }
    );
    assert!(calls.lock().unwrap().is_empty());
    // Not saturation: the queue had room.
    assert!(!embedder.status().saturated);
    embedder.embed(many(8, 1, "t"), None).await.unwrap();
}

#[tokio::test]
async fn a_refusal_for_room_marks_the_queue_saturated() {
    let (embedder, _) = sized(4, 4, 300);
    assert!(!embedder.status().saturated);
    let first = {
        let e = embedder.clone();
        tokio::spawn(async move { e.embed(many(4, 1, "a"), None).await })
    };
    while embedder.status().units < 4 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let err = embedder.embed(texts(&["b"]), None).await.unwrap_err();
    assert!(matches!(err, EmbedError::Overloaded { .. }));
    let status = embedder.status();
    assert!(status.saturated, "{status:?}");
    first.await.unwrap().unwrap();
}

#[tokio::test]
async fn slices_keep_each_request_within_its_share() {
    let (embedder, _) = sized(16, 5, 0);
    let list: Vec<String> = (0..12)
        .map(|i| {
            if i == 3 {
                "x".repeat(3000)
            } else {
                format!("t{i}")
            }
        })
        .collect();
    let slices = embedder.slices(&list, 4);
    assert_eq!(slices.concat(), list);
    for slice in &slices {
        let units: usize = slice.iter().map(|t| work_units(t)).sum();
        assert!(slice.len() <= 4 && units <= 5, "{slice:?}");
    }
}

#[test]
fn concurrent_callers_share_model_calls() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (embedder, calls) = start(
        Duration::from_millis(5),
        QueueConfig {
            capacity: 256,
            ..config()
        },
    );
    let done = Arc::new(AtomicUsize::new(0));
    rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..40 {
            let e = embedder.clone();
            let done = Arc::clone(&done);
            tasks.push(tokio::spawn(async move {
                let text = format!("text {i}");
                let out = e.embed(Arc::new(vec![text.clone()]), None).await.unwrap();
                assert_eq!(out.texts[0].pieces[0].vector, fake_vector(&text));
                done.fetch_add(1, Ordering::SeqCst);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    assert_eq!(done.load(Ordering::SeqCst), 40);
    let calls = calls.lock().unwrap();
    assert!(
        calls.len() < 40,
        "40 concurrent requests should share model calls, got {}",
        calls.len()
    );
}
