//! The engine: the model workers plus every loaded constitution's exemplar index, and the
//! one `evaluate` operation that the HTTP API, the CLI and the gateway all call.
//!
//! It ties the pure domain modules together (constitution -> embed -> evaluate) and owns
//! their lifecycle (load at start, embed exemplars once per load), but knows nothing of
//! HTTP or of how results are shown.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::constitution::{self, Constitution, ConstitutionErrors};
use crate::embed::{EmbedError, Embedder, OnnxBackend, QueueConfig, WindowSpec};
use crate::evaluate::{self, Index, IndexError, TextResult};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("unknown constitution {0:?}")]
    UnknownConstitution(String),
    #[error(transparent)]
    Embed(#[from] EmbedError),
    #[error("invalid constitution:\n{0}")]
    Constitution(#[from] ConstitutionErrors),
    #[error("cannot index constitution: {0}")]
    Index(#[from] IndexError),
    #[error("no constitution with the default id {0:?} was loaded")]
    MissingDefault(String),
}

/// Whether the text is a user's prompt or a model's response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Prompt,
    #[default]
    Response,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Prompt => "prompt",
            Kind::Response => "response",
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct Timings {
    pub queue_ms: f64,
    pub model_ms: f64,
    pub score_ms: f64,
    pub total_ms: f64,
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

pub struct Evaluation {
    pub index: Arc<Index>,
    pub results: Vec<TextResult>,
    pub timings: Timings,
}

/// Loaded constitutions by id, and which one is the default.
struct Registry {
    default: String,
    indexes: BTreeMap<String, Arc<Index>>,
}

pub struct Engine {
    embedder: Embedder,
    top_k: usize,
    windows: WindowSpec,
    registry: RwLock<Arc<Registry>>,
}

impl Engine {
    /// Loads the model (on blocking threads) and every constitution in the configured
    /// folder, embedding their exemplars once.
    pub async fn load(config: &Config) -> Result<Self, EngineError> {
        let embedder = start_embedder(config).await?;
        let engine = Self {
            embedder,
            top_k: config.scoring.top_k,
            windows: WindowSpec {
                tokens: config.scoring.window_tokens,
                stride: config.scoring.window_stride,
            },
            registry: RwLock::new(Arc::new(Registry {
                default: config.constitutions.default.clone(),
                indexes: BTreeMap::new(),
            })),
        };
        let dir = config.constitutions.dir.clone();
        let constitutions = tokio::task::spawn_blocking(move || constitution::load_dir(&dir))
            .await
            .map_err(|e| EmbedError::Load(format!("constitution loader panicked: {e}")))??;
        let mut indexes = BTreeMap::new();
        for c in constitutions {
            let index = engine.index(c).await?;
            indexes.insert(index.constitution().id.clone(), Arc::new(index));
        }
        let default = config.constitutions.default.clone();
        if !indexes.contains_key(&default) {
            return Err(EngineError::MissingDefault(default));
        }
        *engine.registry.write().unwrap_or_else(|e| e.into_inner()) =
            Arc::new(Registry { default, indexes });
        crate::embed::release_freed_memory();
        Ok(engine)
    }

    /// Embeds a constitution's exemplars (once) and builds its index.
    pub async fn index(&self, constitution: Constitution) -> Result<Index, EngineError> {
        let started = Instant::now();
        let texts = Arc::new(Index::exemplar_texts(&constitution));
        let mut vectors = Vec::with_capacity(texts.len());
        // In slices, so a big constitution does not take the whole queue at once.
        for chunk in texts.chunks(256) {
            let embedded = self.embed_with_retry(Arc::new(chunk.to_vec())).await?;
            vectors.extend(
                embedded
                    .texts
                    .into_iter()
                    .map(|mut t| t.pieces.swap_remove(0).vector),
            );
        }
        let index = Index::new(Arc::new(constitution), self.embedder.info(), vectors)?;
        if index.stale_heads() {
            tracing::warn!(
                constitution = %index.constitution().id,
                "calibration heads do not match the exemplar set or the model's output width: ignored, the file's thresholds apply (run charter calibrate)"
            );
        }
        tracing::info!(
            constitution = %index.constitution().id,
            version = %index.constitution().version,
            rules = index.rules().len(),
            exemplars = index.len(),
            scorer = if index.has_heads() { "head" } else { "knn" },
            duration_ms = started.elapsed().as_millis() as u64,
            "constitution indexed"
        );
        Ok(index)
    }

    /// Start-up embedding waits for queue room instead of failing on a busy queue.
    async fn embed_with_retry(
        &self,
        texts: Arc<Vec<String>>,
    ) -> Result<crate::embed::Embedded, EmbedError> {
        loop {
            match self.embedder.embed(Arc::clone(&texts), None).await {
                Err(EmbedError::Overloaded) => tokio::time::sleep(Duration::from_millis(20)).await,
                other => return other,
            }
        }
    }

    pub fn embedder(&self) -> &Embedder {
        &self.embedder
    }

    /// Embeds texts as evaluation does (the whole text, and sentence pieces of long ones),
    /// without scoring: `charter bench` and `calibrate` score them many ways.
    pub async fn embed(
        &self,
        texts: Arc<Vec<String>>,
    ) -> Result<crate::embed::Embedded, EngineError> {
        Ok(self.embedder.embed(texts, Some(self.windows)).await?)
    }

    /// Nearest exemplars averaged per side (`scoring.top_k`).
    pub fn top_k(&self) -> usize {
        self.top_k
    }

    fn registry(&self) -> Arc<Registry> {
        Arc::clone(&self.registry.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// The index of constitution `id`, or of the default one.
    pub fn constitution(&self, id: Option<&str>) -> Result<Arc<Index>, EngineError> {
        let registry = self.registry();
        let id = id.unwrap_or(&registry.default);
        registry
            .indexes
            .get(id)
            .cloned()
            .ok_or_else(|| EngineError::UnknownConstitution(id.to_string()))
    }

    pub fn constitutions(&self) -> Vec<Arc<Index>> {
        self.registry().indexes.values().cloned().collect()
    }

    pub fn default_constitution(&self) -> String {
        self.registry().default.clone()
    }

    /// Evaluates texts against a constitution (the default when `None`).
    pub async fn evaluate(
        &self,
        texts: Arc<Vec<String>>,
        constitution: Option<&str>,
    ) -> Result<Evaluation, EngineError> {
        let started = Instant::now();
        let index = self.constitution(constitution)?;
        let embedded = self
            .embedder
            .embed(Arc::clone(&texts), Some(self.windows))
            .await?;
        let scoring = Instant::now();
        let results = texts
            .iter()
            .zip(&embedded.texts)
            .map(|(text, emb)| evaluate::evaluate(&index, text, emb, self.top_k))
            .collect();
        let timings = Timings {
            queue_ms: ms(embedded.queue_time),
            model_ms: ms(embedded.model_time),
            score_ms: ms(scoring.elapsed()),
            total_ms: ms(started.elapsed()),
        };
        Ok(Evaluation {
            index,
            results,
            timings,
        })
    }
}

async fn start_embedder(config: &Config) -> Result<Embedder, EmbedError> {
    let dir = config.model_dir();
    let library = config.runtime_library();
    let workers = config.model.workers;
    let threads = config.model.intra_threads;
    let spinning = config.model.intra_spinning;
    let queue = QueueConfig {
        max_batch_tokens: config.batching.max_batch_tokens,
        max_batch_size: config.batching.max_batch_size,
        bucket_ratio: config.batching.bucket_ratio,
        capacity: config.batching.queue_capacity,
    };
    let started = Instant::now();
    let backends = tokio::task::spawn_blocking(move || {
        (0..workers)
            .map(|_| OnnxBackend::load(&dir, &library, threads, spinning))
            .collect::<Result<Vec<_>, _>>()
    })
    .await
    .map_err(|e| EmbedError::Load(format!("model loader panicked: {e}")))??;
    let embedder = Embedder::start(backends, queue)?;
    tracing::info!(
        model = %embedder.info().id,
        dim = embedder.info().dim,
        workers,
        intra_threads = threads,
        intra_spinning = spinning,
        duration_ms = started.elapsed().as_millis() as u64,
        "model loaded"
    );
    Ok(embedder)
}
