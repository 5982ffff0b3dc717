//! The bounded queue in front of the model and the worker threads behind it.
//!
//! Requests never run the model themselves: they reserve room in the queue (a semaphore;
//! a full queue answers [`EmbedError::Overloaded`] at once, with the delay to wait, which
//! HTTP turns into 429 and `Retry-After`),
//! send a job over a channel and await a oneshot reply. Each worker thread owns one model
//! session. It takes every job that is waiting (up to a bound), tokenises the texts, cuts
//! them into pieces (with a model that pools spans, the pieces inside a text's window ride
//! along in the text's own row), sorts the rows by token length and runs them in buckets whose
//! padded size (texts x longest) stays under a token budget and whose longest piece is at
//! most `bucket_ratio` times the shortest, so little compute is spent on padding. There
//! is no artificial wait: while the model is busy, the next batch gathers by itself.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use super::windows::plan_windows;
use super::{Backend, EmbedError, ModelInfo, Piece, Row, TextEmbedding, WindowSpec};

#[derive(Debug, Clone, Copy)]
pub struct QueueConfig {
    pub max_batch_tokens: usize,
    pub max_batch_size: usize,
    pub bucket_ratio: f32,
    /// Queue size in work units: one per text plus one per KiB of text.
    pub capacity: usize,
    /// How long a refused caller is told to wait (`Retry-After`), carried by
    /// [`EmbedError::Overloaded`].
    pub retry_after_secs: u64,
}

/// What one call to [`Embedder::embed`] returns.
#[derive(Debug)]
pub struct Embedded {
    pub texts: Vec<TextEmbedding>,
    /// Time the job waited before a worker took it.
    pub queue_time: Duration,
    /// Time from the worker taking the job's batch to the job's last piece embedded.
    pub model_time: Duration,
}

struct Job {
    texts: Arc<Vec<String>>,
    windows: Option<WindowSpec>,
    enqueued: Instant,
    reply: oneshot::Sender<Result<Embedded, EmbedError>>,
    /// Released when the job is answered (or dropped), freeing queue room.
    _permit: OwnedSemaphorePermit,
}

/// A cheap, clonable handle to the model workers.
#[derive(Clone)]
pub struct Embedder {
    inner: Arc<Inner>,
}

struct Inner {
    tx: crossbeam_channel::Sender<Job>,
    permits: Arc<Semaphore>,
    capacity: usize,
    retry_after_secs: u64,
    info: ModelInfo,
    workers: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

impl Embedder {
    /// Starts one worker thread per backend. All backends must be the same model.
    pub fn start<B: Backend>(backends: Vec<B>, config: QueueConfig) -> Result<Self, EmbedError> {
        let info = backends
            .first()
            .ok_or_else(|| EmbedError::Load("no model workers".into()))?
            .info()
            .clone();
        let (tx, rx) = crossbeam_channel::unbounded::<Job>();
        let mut workers = Vec::with_capacity(backends.len());
        for (i, backend) in backends.into_iter().enumerate() {
            let rx = rx.clone();
            let handle = std::thread::Builder::new()
                .name(format!("charter-model-{i}"))
                .spawn(move || Worker::new(backend, config).run(rx))
                .map_err(|e| EmbedError::Load(format!("cannot start model thread: {e}")))?;
            workers.push(handle);
        }
        Ok(Self {
            inner: Arc::new(Inner {
                tx,
                permits: Arc::new(Semaphore::new(config.capacity)),
                capacity: config.capacity,
                retry_after_secs: config.retry_after_secs,
                info,
                workers: std::sync::Mutex::new(workers),
            }),
        })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.inner.info
    }

    /// Work units currently queued or running.
    pub fn queued(&self) -> usize {
        self.inner.capacity - self.inner.permits.available_permits()
    }

    /// Embeds `texts` (with windows when `windows` is given). Fails at once with
    /// [`EmbedError::Overloaded`] when the queue has no room.
    pub async fn embed(
        &self,
        texts: Arc<Vec<String>>,
        windows: Option<WindowSpec>,
    ) -> Result<Embedded, EmbedError> {
        let units: usize = texts.iter().map(|t| 1 + t.len() / 1024).sum();
        // A request bigger than the whole queue may still run alone.
        let units = units.clamp(1, self.inner.capacity) as u32;
        let permit = Arc::clone(&self.inner.permits)
            .try_acquire_many_owned(units)
            .map_err(|_| EmbedError::Overloaded {
                retry_after_secs: self.inner.retry_after_secs,
            })?;
        let (reply, rx) = oneshot::channel();
        let job = Job {
            texts,
            windows,
            enqueued: Instant::now(),
            reply,
            _permit: permit,
        };
        self.inner.tx.send(job).map_err(|_| EmbedError::Stopped)?;
        rx.await.map_err(|_| EmbedError::Stopped)?
    }

    /// Stops the workers once queued jobs are done (other handles must be dropped first
    /// for the channel to close; this waits for the threads that have already ended).
    pub fn join(self) {
        if let Ok(inner) = Arc::try_unwrap(self.inner) {
            let Inner { tx, workers, .. } = inner;
            drop(tx);
            for handle in workers.into_inner().unwrap_or_default() {
                let _ = handle.join();
            }
        }
    }
}

/// One row of a model call and where its vectors go: job, text, piece; its text range
/// and token count; and, with a backend that [`Backend::pools_spans`], the other pieces
/// that lie inside the row (their indices, and byte ranges relative to the row's start).
struct Slot {
    job: usize,
    text: usize,
    piece: usize,
    tokens: usize,
    start: usize,
    end: usize,
    span_pieces: Vec<usize>,
    spans: Vec<(usize, usize)>,
}

struct Worker<B> {
    backend: B,
    config: QueueConfig,
    /// Text tokens that fit the model window (window minus specials and prefix).
    capacity: usize,
}

impl<B: Backend> Worker<B> {
    fn new(backend: B, config: QueueConfig) -> Self {
        let info = backend.info();
        let prefix_tokens = if info.prefix.is_empty() {
            0
        } else {
            backend
                .token_offsets(&info.prefix)
                .map(|o| o.len())
                .unwrap_or(0)
        };
        let capacity = info.max_tokens.saturating_sub(2 + prefix_tokens).max(1);
        Self {
            backend,
            config,
            capacity,
        }
    }

    fn run(mut self, rx: crossbeam_channel::Receiver<Job>) {
        while let Ok(first) = rx.recv() {
            let mut texts = first.texts.len();
            let mut jobs = vec![first];
            // Take what is already waiting, without waiting for more.
            while texts < self.config.max_batch_size * 4 {
                match rx.try_recv() {
                    Ok(job) => {
                        texts += job.texts.len();
                        jobs.push(job);
                    }
                    Err(_) => break,
                }
            }
            self.process(jobs);
        }
    }

    fn process(&mut self, jobs: Vec<Job>) {
        let started = Instant::now();
        // A client that went away (timeout, disconnect) needs no answer.
        let jobs: Vec<Job> = jobs.into_iter().filter(|j| !j.reply.is_closed()).collect();
        if jobs.is_empty() {
            return;
        }
        let mut results: Vec<Result<Vec<TextEmbedding>, EmbedError>> =
            Vec::with_capacity(jobs.len());
        let mut slots = Vec::new();
        for (j, job) in jobs.iter().enumerate() {
            results.push(self.plan(j, job, &mut slots));
        }
        slots.sort_by_key(|s| s.tokens);

        // Each job is answered as soon as its last piece is embedded: buckets run
        // shortest first, so a short text does not wait for the long ones gathered with
        // it (at 32 clients that wait was most of the tail latency).
        let mut remaining = vec![0usize; jobs.len()];
        for slot in &slots {
            remaining[slot.job] += 1;
        }
        let mut jobs: Vec<Option<Job>> = jobs.into_iter().map(Some).collect();
        let mut results: Vec<Option<Result<Vec<TextEmbedding>, EmbedError>>> =
            results.into_iter().map(Some).collect();
        // Jobs without pieces (failed planning, or no texts) are answered now.
        for j in 0..jobs.len() {
            if remaining[j] == 0 {
                answer(&mut jobs[j], &mut results[j], started);
            }
        }

        let mut start = 0;
        while start < slots.len() {
            let end = self.bucket_end(&slots, start);
            let bucket = &slots[start..end];
            let rows: Vec<Row> = bucket
                .iter()
                .map(|s| {
                    let job = jobs[s.job].as_ref().expect("a job with pieces left");
                    Row {
                        text: &job.texts[s.text][s.start..s.end],
                        spans: &s.spans,
                    }
                })
                .collect();
            let outcome =
                std::panic::catch_unwind(AssertUnwindSafe(|| self.backend.embed_rows(&rows)))
                    .unwrap_or_else(|_| Err(EmbedError::Inference("the model panicked".into())))
                    .and_then(|vectors| {
                        let whole = vectors.len() == bucket.len()
                            && bucket
                                .iter()
                                .zip(&vectors)
                                .all(|(s, v)| v.len() == 1 + s.spans.len());
                        whole.then_some(vectors).ok_or_else(|| {
                            EmbedError::Inference("the model returned too few vectors".into())
                        })
                    });
            match outcome {
                Ok(vectors) => {
                    for (slot, row) in bucket.iter().zip(vectors) {
                        if let Some(Ok(r)) = &mut results[slot.job] {
                            let pieces =
                                std::iter::once(slot.piece).chain(slot.span_pieces.iter().copied());
                            for (piece, vector) in pieces.zip(row) {
                                r[slot.text].pieces[piece].vector = vector;
                            }
                        }
                    }
                }
                Err(err) => {
                    tracing::error!(error = %err, pieces = bucket.len(), "model call failed");
                    for slot in bucket {
                        results[slot.job] = Some(Err(err.clone()));
                    }
                }
            }
            for slot in bucket {
                remaining[slot.job] -= 1;
                if remaining[slot.job] == 0 {
                    answer(&mut jobs[slot.job], &mut results[slot.job], started);
                }
            }
            start = end;
        }
    }

    /// Tokenises a job's texts and plans their pieces, adding one slot per piece.
    fn plan(
        &self,
        j: usize,
        job: &Job,
        slots: &mut Vec<Slot>,
    ) -> Result<Vec<TextEmbedding>, EmbedError> {
        let mut out = Vec::with_capacity(job.texts.len());
        let first_slot = slots.len();
        for (t, text) in job.texts.iter().enumerate() {
            let offsets = match self.backend.token_offsets(text) {
                Ok(o) => o,
                Err(e) => {
                    slots.truncate(first_slot);
                    return Err(e);
                }
            };
            let planned = plan_windows(text, &offsets, self.capacity, job.windows);
            // With a backend that pools spans, the pieces inside the whole-text piece are
            // embedded in its call; the rest (past the model window) get rows of their own.
            let whole_slot = slots.len();
            let whole_end = planned[0].end;
            let pieces = planned
                .iter()
                .enumerate()
                .map(|(p, w)| {
                    if p > 0 && self.backend.pools_spans() && w.end <= whole_end {
                        let row = &mut slots[whole_slot];
                        row.span_pieces.push(p);
                        row.spans.push((w.start - row.start, w.end - row.start));
                    } else {
                        slots.push(Slot {
                            job: j,
                            text: t,
                            piece: p,
                            tokens: w.tokens,
                            start: w.start,
                            end: w.end,
                            span_pieces: Vec::new(),
                            spans: Vec::new(),
                        });
                    }
                    Piece {
                        start: w.start,
                        end: w.end,
                        tokens: w.tokens,
                        vector: Vec::new(),
                    }
                })
                .collect();
            out.push(TextEmbedding {
                pieces,
                tokens: offsets.len(),
                truncated: offsets.len() > self.capacity,
            });
        }
        Ok(out)
    }

    /// End (exclusive) of the bucket starting at `start` in length-sorted `slots`.
    fn bucket_end(&self, slots: &[Slot], start: usize) -> usize {
        let shortest = slots[start].tokens.max(1) as f32;
        let mut end = start + 1;
        while end < slots.len() {
            let count = end - start + 1;
            let longest = slots[end].tokens.max(1);
            if count > self.config.max_batch_size
                || count * (longest + 2) > self.config.max_batch_tokens
                || longest as f32 > shortest * self.config.bucket_ratio
            {
                break;
            }
            end += 1;
        }
        end
    }
}

/// Answers a finished job (once): its queue room is freed first, so a caller that sends
/// its next request as soon as it has this answer finds the room.
fn answer(
    job: &mut Option<Job>,
    result: &mut Option<Result<Vec<TextEmbedding>, EmbedError>>,
    started: Instant,
) {
    let (Some(job), Some(result)) = (job.take(), result.take()) else {
        return;
    };
    let queue_time = started.saturating_duration_since(job.enqueued);
    let Job { reply, _permit, .. } = job;
    drop(_permit);
    let _ = reply.send(result.map(|texts| Embedded {
        texts,
        queue_time,
        model_time: started.elapsed(),
    }));
}

#[cfg(test)]
mod tests {
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
}
