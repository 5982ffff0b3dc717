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
//!
//! Fairness: one request may hold at most `max_request_share` of the queue (beyond it,
//! [`EmbedError::OverShare`]), and the worker serves the jobs it holds in rounds, one
//! bucket of each per round, taking newly arrived jobs between rounds; so a short request
//! waits for one bucket of a huge one, not for all of it. Cancellation: a job whose caller
//! is gone (its deadline passed and the handler was dropped, or its client disconnected)
//! is dropped before its next bucket: its remaining rows are never embedded and its room
//! is freed.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
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
    /// Most work units one request may hold (a share of `capacity`).
    pub max_request_units: usize,
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
    max_request_units: usize,
    retry_after_secs: u64,
    info: ModelInfo,
    workers: std::sync::Mutex<Vec<JoinHandle<()>>>,
    counters: Arc<Counters>,
    started: Instant,
}

/// What the queue has done, for `/readyz` and the tests: rows embedded, rows dropped
/// because their caller was gone, and when a request last found the queue full.
#[derive(Default)]
struct Counters {
    rows_embedded: AtomicU64,
    rows_cancelled: AtomicU64,
    /// Milliseconds since start of the last refusal for want of room, plus one (0: never).
    last_full_ms: AtomicU64,
}

impl Counters {
    fn note_embedded(&self, rows: usize) {
        self.rows_embedded.fetch_add(rows as u64, Ordering::Relaxed);
    }

    fn note_cancelled(&self, rows: usize) {
        self.rows_cancelled
            .fetch_add(rows as u64, Ordering::Relaxed);
    }
}

/// The queue's state, as `/readyz` reports it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct QueueStatus {
    /// Work units queued or running, and the queue's room.
    pub units: usize,
    pub capacity: usize,
    /// Most units one request may hold (`batching.max_request_share` of the capacity).
    pub max_request_units: usize,
    /// A request was refused for want of room within the last `retry_after_secs` (at
    /// least one second).
    pub saturated: bool,
    /// Rows the model embedded, and rows dropped unembedded because their caller was
    /// gone (timed out or disconnected), since start.
    pub rows_embedded: u64,
    pub rows_cancelled: u64,
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
        let counters = Arc::new(Counters::default());
        let mut workers = Vec::with_capacity(backends.len());
        for (i, backend) in backends.into_iter().enumerate() {
            let rx = rx.clone();
            let counters = Arc::clone(&counters);
            let handle = std::thread::Builder::new()
                .name(format!("charter-model-{i}"))
                .spawn(move || Worker::new(backend, config, counters).run(rx))
                .map_err(|e| EmbedError::Load(format!("cannot start model thread: {e}")))?;
            workers.push(handle);
        }
        Ok(Self {
            inner: Arc::new(Inner {
                tx,
                permits: Arc::new(Semaphore::new(config.capacity)),
                capacity: config.capacity,
                max_request_units: config.max_request_units.clamp(1, config.capacity),
                retry_after_secs: config.retry_after_secs,
                info,
                workers: std::sync::Mutex::new(workers),
                counters,
                started: Instant::now(),
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

    /// `texts` cut into consecutive slices of at most `max_texts` texts that each fit in
    /// what one request may hold (a text too big alone is a slice of its own).
    pub fn slices<'a>(&self, texts: &'a [String], max_texts: usize) -> Vec<&'a [String]> {
        let mut out = Vec::new();
        let (mut start, mut units) = (0, 0);
        for (i, text) in texts.iter().enumerate() {
            let u = work_units(text);
            if i > start && (i - start >= max_texts || units + u > self.inner.max_request_units) {
                out.push(&texts[start..i]);
                (start, units) = (i, 0);
            }
            units += u;
        }
        if start < texts.len() {
            out.push(&texts[start..]);
        }
        out
    }

    /// The queue's state: room used, saturation, rows embedded and cancelled.
    pub fn status(&self) -> QueueStatus {
        let inner = &self.inner;
        let last_full = inner.counters.last_full_ms.load(Ordering::Relaxed);
        let window = Duration::from_secs(inner.retry_after_secs.max(1));
        let saturated = last_full > 0
            && inner
                .started
                .elapsed()
                .saturating_sub(Duration::from_millis(last_full - 1))
                < window;
        QueueStatus {
            units: self.queued(),
            capacity: inner.capacity,
            max_request_units: inner.max_request_units,
            saturated,
            rows_embedded: inner.counters.rows_embedded.load(Ordering::Relaxed),
            rows_cancelled: inner.counters.rows_cancelled.load(Ordering::Relaxed),
        }
    }

    /// Embeds `texts` (with windows when `windows` is given). Fails at once with
    /// [`EmbedError::OverShare`] when the request alone needs more than its share of the
    /// queue, and with [`EmbedError::Overloaded`] when the queue has no room left for it.
    /// Dropping the returned future cancels the work: rows not yet embedded never are.
    pub async fn embed(
        &self,
        texts: Arc<Vec<String>>,
        windows: Option<WindowSpec>,
    ) -> Result<Embedded, EmbedError> {
        let units: usize = texts.iter().map(|t| work_units(t)).sum();
        let inner = &self.inner;
        if units > inner.max_request_units {
            return Err(EmbedError::OverShare {
                units,
                max_units: inner.max_request_units,
            });
        }
        let permit = Arc::clone(&inner.permits)
            .try_acquire_many_owned(units.max(1) as u32)
            .map_err(|_| {
                let now_ms = inner.started.elapsed().as_millis() as u64;
                inner
                    .counters
                    .last_full_ms
                    .store(now_ms + 1, Ordering::Relaxed);
                EmbedError::Overloaded {
                    retry_after_secs: inner.retry_after_secs,
                }
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

/// Queue room a text holds: one unit, plus one per KiB.
fn work_units(text: &str) -> usize {
    1 + text.len() / 1024
}

/// One row of a model call and where its vectors go: text and piece of its job; its text
/// range and token count; and, with a backend that [`Backend::pools_spans`], the other
/// pieces that lie inside the row (their indices, and byte ranges relative to the row's
/// start).
struct Slot {
    text: usize,
    piece: usize,
    tokens: usize,
    start: usize,
    end: usize,
    span_pieces: Vec<usize>,
    spans: Vec<(usize, usize)>,
}

/// A job the worker has taken: its planned result, the rows not yet embedded (sorted by
/// token length, shortest first) and how many of the current round's rows are its.
struct Active {
    job: Job,
    result: Result<Vec<TextEmbedding>, EmbedError>,
    pending: VecDeque<Slot>,
    in_round: usize,
    taken: Instant,
}

impl Active {
    /// The caller is gone (its deadline passed, or its client disconnected): nobody
    /// waits for the rest of its rows.
    fn cancelled(&self) -> bool {
        self.job.reply.is_closed()
    }

    fn done(&self) -> bool {
        self.pending.is_empty() && self.in_round == 0
    }
}

struct Worker<B> {
    backend: B,
    config: QueueConfig,
    /// Text tokens that fit the model window (window minus specials and prefix).
    capacity: usize,
    counters: Arc<Counters>,
}

impl<B: Backend> Worker<B> {
    fn new(backend: B, config: QueueConfig, counters: Arc<Counters>) -> Self {
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
            counters,
        }
    }

    /// Serves jobs in rounds until the channel closes and every taken job is answered.
    /// Between rounds it takes the jobs that arrived (waiting only when it has none) and
    /// drops cancelled ones; each round embeds the next bucket of every job it holds, so a
    /// short request waits for at most one bucket of a long one, never for all of it.
    fn run(mut self, rx: crossbeam_channel::Receiver<Job>) {
        let mut active: Vec<Active> = Vec::new();
        loop {
            if active.is_empty() {
                match rx.recv() {
                    Ok(job) => self.take(job, &mut active),
                    Err(_) => return,
                }
            }
            // Take what is already waiting, without waiting for more.
            let mut texts = 0;
            while texts < self.config.max_batch_size * 4 {
                match rx.try_recv() {
                    Ok(job) => {
                        texts += job.texts.len();
                        self.take(job, &mut active);
                    }
                    Err(_) => break,
                }
            }
            self.drop_cancelled(&mut active);
            if !active.is_empty() {
                self.round(&mut active);
            }
        }
    }

    /// Plans a job's rows, or drops it when its caller is already gone (its texts are
    /// not even tokenised). A job without rows is answered at once.
    fn take(&mut self, job: Job, active: &mut Vec<Active>) {
        if job.reply.is_closed() {
            self.counters.note_cancelled(job.texts.len());
            return;
        }
        let taken = Instant::now();
        let mut slots = Vec::new();
        let result = self.plan(&job, &mut slots);
        slots.sort_by_key(|s| s.tokens);
        let job = Active {
            job,
            result,
            pending: slots.into(),
            in_round: 0,
            taken,
        };
        if job.done() {
            answer(job);
        } else {
            active.push(job);
        }
    }

    /// Drops the jobs whose callers are gone: their rows are never embedded and their
    /// queue room is freed.
    fn drop_cancelled(&self, active: &mut Vec<Active>) {
        active.retain(|a| {
            let cancelled = a.cancelled();
            if cancelled {
                let rows = a.pending.len() + a.in_round;
                tracing::debug!(rows, "caller gone; dropping its queued rows");
                self.counters.note_cancelled(rows);
            }
            !cancelled
        });
    }

    /// One round: the next bucket of every job (by the same length bucketing a job alone
    /// would get), pooled, sorted by length and run in buckets, shortest first. Rows of a
    /// job cancelled during the round are skipped; a job is answered as soon as its last
    /// row is embedded (a short text does not wait for the long ones gathered with it).
    fn round(&mut self, active: &mut Vec<Active>) {
        let mut rest: Vec<(usize, Slot)> = Vec::new();
        for (j, a) in active.iter_mut().enumerate() {
            let take = bucket_len(&self.config, a.pending.iter().map(|s| s.tokens));
            a.in_round = take;
            rest.extend(a.pending.drain(..take).map(|s| (j, s)));
        }
        rest.sort_by_key(|(_, s)| s.tokens);
        let mut rest: VecDeque<(usize, Slot)> = rest.into();
        // Answered jobs leave a hole, so that the round's job indices stay valid.
        let mut jobs: Vec<Option<Active>> = active.drain(..).map(Some).collect();
        let gone =
            |jobs: &[Option<Active>], j: usize| jobs[j].as_ref().is_none_or(Active::cancelled);
        loop {
            // Rows of callers gone since the round began are skipped, not embedded.
            rest.retain(|(j, _)| !gone(&jobs, *j));
            if rest.is_empty() {
                break;
            }
            let n = bucket_len(&self.config, rest.iter().map(|(_, s)| s.tokens));
            let bucket: Vec<(usize, Slot)> = rest.drain(..n).collect();
            self.embed_bucket(&mut jobs, &bucket);
            for (j, _) in &bucket {
                let finished = jobs[*j].as_mut().is_some_and(|a| {
                    a.in_round -= 1;
                    a.done()
                });
                if finished {
                    answer(jobs[*j].take().expect("a finished job"));
                }
            }
        }
        active.extend(jobs.into_iter().flatten());
        self.drop_cancelled(active);
    }

    /// Runs one model call and stores its vectors in their jobs' results (or the error).
    fn embed_bucket(&mut self, jobs: &mut [Option<Active>], bucket: &[(usize, Slot)]) {
        let rows: Vec<Row> = bucket
            .iter()
            .map(|(j, s)| Row {
                text: &jobs[*j].as_ref().expect("a job with rows left").job.texts[s.text]
                    [s.start..s.end],
                spans: &s.spans,
            })
            .collect();
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| self.backend.embed_rows(&rows)))
            .unwrap_or_else(|_| Err(EmbedError::Inference("the model panicked".into())))
            .and_then(|vectors| {
                let whole = vectors.len() == bucket.len()
                    && bucket
                        .iter()
                        .zip(&vectors)
                        .all(|((_, s), v)| v.len() == 1 + s.spans.len());
                whole.then_some(vectors).ok_or_else(|| {
                    EmbedError::Inference("the model returned too few vectors".into())
                })
            });
        self.counters.note_embedded(bucket.len());
        match outcome {
            Ok(vectors) => {
                for ((j, slot), row) in bucket.iter().zip(vectors) {
                    if let Some(Active { result: Ok(r), .. }) = jobs[*j].as_mut() {
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
                for (j, _) in bucket {
                    if let Some(a) = jobs[*j].as_mut() {
                        a.result = Err(err.clone());
                    }
                }
            }
        }
    }

    /// Tokenises a job's texts and plans their pieces, adding one slot per piece.
    fn plan(&self, job: &Job, slots: &mut Vec<Slot>) -> Result<Vec<TextEmbedding>, EmbedError> {
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
}

/// How many of the length-sorted rows (their token counts) the next model call takes:
/// at most `max_batch_size`, padded tokens (rows x longest) within `max_batch_tokens`, the
/// longest at most `bucket_ratio` times the shortest; always at least one.
fn bucket_len(config: &QueueConfig, tokens: impl Iterator<Item = usize>) -> usize {
    let mut tokens = tokens.map(|t| t.max(1));
    let Some(shortest) = tokens.next() else {
        return 0;
    };
    let mut count = 1;
    for longest in tokens {
        let next = count + 1;
        if next > config.max_batch_size
            || next * (longest + 2) > config.max_batch_tokens
            || longest as f32 > shortest as f32 * config.bucket_ratio
        {
            break;
        }
        count = next;
    }
    count
}

/// Answers a finished job: its queue room is freed first, so a caller that sends its
/// next request as soon as it has this answer finds the room.
fn answer(active: Active) {
    let Active {
        job, result, taken, ..
    } = active;
    let Job {
        reply,
        enqueued,
        _permit,
        ..
    } = job;
    drop(_permit);
    let _ = reply.send(result.map(|texts| Embedded {
        texts,
        queue_time: taken.saturating_duration_since(enqueued),
        model_time: taken.elapsed(),
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
}
