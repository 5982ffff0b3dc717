//! Text -> unit vectors. Owns the model: loading it (fastembed on ONNX Runtime, loaded
//! dynamically), the worker threads it runs on, the bounded queue in front of them, and
//! the cutting of long texts into token windows.
//!
//! Nothing here knows about rules, verdicts or HTTP. Callers hold an [`Embedder`] handle
//! and `await` embeddings; the model itself only ever runs on the worker threads started
//! by [`Embedder::start`], never on an async executor thread.

mod onnx;
mod queue;
mod spans;
mod windows;

use std::path::Path;

use serde::{Deserialize, Serialize};

pub use onnx::OnnxBackend;
pub use queue::{Embedded, Embedder, QueueConfig, QueueStatus};
pub use spans::Row;
pub use windows::{plan_windows, WindowSpec};

/// What the service must know about a model folder: `charter-model.json`, written by the
/// set-up step beside `model.onnx` and the tokenizer files.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelInfo {
    pub id: String,
    #[serde(default)]
    pub description: String,
    /// Output tensor holding the embedding.
    pub output: String,
    /// `none` (the output is already one vector per text), `mean` or `cls`.
    pub pooling: String,
    /// The model's window; longer inputs are truncated by the tokenizer.
    pub max_tokens: usize,
    /// Text prepended to every input (e5 wants `query: `).
    #[serde(default)]
    pub prefix: String,
    pub dim: usize,
    /// How many leading dimensions exemplar similarity (kNN features, evidence) uses;
    /// absent: all. The USE views model scores its 512-d sentence view against the
    /// exemplars and gives the learned heads all 3,072 (the same quality on dev as kNN
    /// over all of them, at a sixth of the cost per text).
    #[serde(default)]
    pub neighbour_dims: Option<usize>,
    /// The graph also takes `spans` and embeds a text's pieces in the text's own call
    /// (`spans.rs`); such a model runs on an ONNX Runtime session of its own.
    #[serde(default)]
    pub spans: bool,
    #[serde(default)]
    pub licence: String,
}

impl ModelInfo {
    pub fn read(dir: &Path) -> Result<Self, EmbedError> {
        let path = dir.join("charter-model.json");
        let bytes = std::fs::read(&path).map_err(|e| {
            EmbedError::Load(format!(
                "cannot read {}: {e} (run `make setup` to fetch the models)",
                path.display()
            ))
        })?;
        serde_json::from_slice(&bytes)
            .map_err(|e| EmbedError::Load(format!("{}: {e}", path.display())))
    }
}

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum EmbedError {
    /// The model or runtime could not be loaded.
    #[error("model load failed: {0}")]
    Load(String),
    /// The queue in front of the model is full; try again after `retry_after_secs`.
    #[error("the model queue is full")]
    Overloaded { retry_after_secs: u64 },
    /// One request needs more of the queue (`units`: one per text plus one per KiB of
    /// text) than one request may hold (`max_units`, `batching.max_request_share`).
    #[error("the request needs {units} queue units; one request may hold {max_units}")]
    OverShare { units: usize, max_units: usize },
    /// The model failed on an input.
    #[error("inference failed: {0}")]
    Inference(String),
    /// The workers are gone (shutting down).
    #[error("the model workers have stopped")]
    Stopped,
}

/// One embedded piece of a text: the whole text (first, possibly truncated to the model
/// window) or one window of it.
#[derive(Debug, Clone)]
pub struct Piece {
    /// Byte range of the text this piece covers.
    pub start: usize,
    pub end: usize,
    /// Tokens the model saw (without special tokens).
    pub tokens: usize,
    pub vector: Vec<f32>,
}

/// All pieces of one text: `pieces[0]` is the whole text; windows follow when the text is
/// longer than the window size asked for.
#[derive(Debug, Clone)]
pub struct TextEmbedding {
    pub pieces: Vec<Piece>,
    /// Tokens in the whole text (without special tokens).
    pub tokens: usize,
    /// The whole-text piece was cut at the model window.
    pub truncated: bool,
}

/// Loading leaves tens of megabytes freed but still resident: fastembed parses the
/// tokenizer and then keeps a clone of it, ONNX Runtime copies the model bytes, and
/// embedding the exemplars leaves its batches behind. Those are many small blocks in the
/// middle of the heap, which glibc keeps; `malloc_trim` hands their pages back to the
/// kernel. Called once, when the engine has loaded.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory; it is safe to call at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// A model the workers can run. The ONNX implementation is [`OnnxBackend`]; unit tests of
/// the queue use a deterministic fake.
pub trait Backend: Send + 'static {
    fn info(&self) -> &ModelInfo;
    /// Byte offsets of each token of `text` (no special tokens, no truncation).
    fn token_offsets(&self, text: &str) -> Result<Vec<(usize, usize)>, EmbedError>;
    /// One unit vector per input, in order.
    fn embed(&mut self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError>;
    /// Whether [`Backend::embed_rows`] embeds a row's spans in the row's own model call.
    fn pools_spans(&self) -> bool {
        false
    }
    /// Per row: the row text's vector, then one per span (byte ranges of the row's text).
    /// Only a backend that [`Backend::pools_spans`] is given spans; the others embed each
    /// row's text.
    fn embed_rows(&mut self, rows: &[Row]) -> Result<Vec<Vec<Vec<f32>>>, EmbedError> {
        embed_rows_alone(self, rows)
    }
}

/// [`Backend::embed_rows`] for a backend without spans: each row's text, one vector each.
fn embed_rows_alone<B: Backend + ?Sized>(
    backend: &mut B,
    rows: &[Row],
) -> Result<Vec<Vec<Vec<f32>>>, EmbedError> {
    let texts: Vec<&str> = rows.iter().map(|r| r.text).collect();
    Ok(backend
        .embed(&texts)?
        .into_iter()
        .map(|v| vec![v])
        .collect())
}

/// Dot product of two equally long vectors (cosine for unit vectors).
///
/// Sixteen independent accumulators let the compiler vectorise the loop (a plain
/// `zip().sum()` is a serial chain of float adds); on x86-64 CPUs with AVX2 and FMA the same
/// loop is compiled a second time for them and chosen at run time.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports the features the function is compiled for.
            return unsafe { dot_avx2(a, b) };
        }
    }
    dot_portable(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_portable(a, b)
}

#[inline(always)]
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 16;
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; LANES];
    let chunks = n / LANES;
    for i in 0..chunks {
        let (x, y) = (
            &a[i * LANES..(i + 1) * LANES],
            &b[i * LANES..(i + 1) * LANES],
        );
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for i in chunks * LANES..n {
        sum += a[i] * b[i];
    }
    sum
}

#[cfg(test)]
mod tests {
    #[test]
    fn dot_matches_the_plain_sum() {
        for n in [0, 1, 15, 16, 17, 384, 512, 515] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let plain: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((super::dot(&a, &b) - plain).abs() < 1e-4, "n={n}");
        }
    }
}
