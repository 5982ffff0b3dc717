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
mod tests;
