//! The engine: the model workers plus every loaded constitution's exemplar index, and the
//! one `evaluate` operation that the HTTP API, the CLI and the gateway all call.
//!
//! It ties the pure domain modules together (constitution -> embed -> evaluate) and owns
//! their lifecycle (load at start, embed exemplars once per load), but knows nothing of
//! HTTP or of how results are shown.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;

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

/// What an engine error means to the caller, whichever API answers it: the one
/// classification of domain errors, which `http::error` and `gateway::error` each render
/// in their own shape. Exhaustive on both sides, so a new variant forces a decision.
#[derive(Debug, Clone, PartialEq)]
pub enum ErrorClass {
    /// The request named a constitution that is not loaded (the caller's mistake, or the
    /// configuration's when it named the id).
    UnknownConstitution(String),
    /// The model queue is full; retry after this many seconds.
    Overloaded { retry_after_secs: u64 },
    /// The request alone needs more of the model queue (`units`) than one request may
    /// hold (`max_units`, `batching.max_request_share`); retrying will not help.
    OverShare { units: usize, max_units: usize },
    /// The model workers have stopped: the service is stopping.
    Stopped,
    /// A failure of ours (model, constitution, index): logged with this detail, answered
    /// generically.
    Internal(String),
}

impl From<EngineError> for ErrorClass {
    fn from(err: EngineError) -> Self {
        match err {
            EngineError::UnknownConstitution(id) => ErrorClass::UnknownConstitution(id),
            EngineError::Embed(e) => e.into(),
            EngineError::Constitution(e) => ErrorClass::Internal(e.to_string()),
            EngineError::Index(e) => ErrorClass::Internal(e.to_string()),
            EngineError::MissingDefault(id) => {
                ErrorClass::Internal(format!("missing default constitution {id}"))
            }
        }
    }
}

impl From<EmbedError> for ErrorClass {
    fn from(err: EmbedError) -> Self {
        match err {
            EmbedError::Overloaded { retry_after_secs } => {
                ErrorClass::Overloaded { retry_after_secs }
            }
            EmbedError::OverShare { units, max_units } => {
                ErrorClass::OverShare { units, max_units }
            }
            EmbedError::Stopped => ErrorClass::Stopped,
            EmbedError::Load(m) | EmbedError::Inference(m) => ErrorClass::Internal(m),
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
    /// The model that scored (`first+second` for an ensemble).
    pub model: Arc<str>,
    pub results: Vec<TextResult>,
    pub timings: Timings,
}

/// Loaded constitutions by id, and which one is the default.
struct Registry {
    default: String,
    indexes: BTreeMap<String, Arc<Index>>,
    /// With an ensemble: each constitution's index for the second model.
    partners: BTreeMap<String, Arc<Index>>,
}

pub struct Engine {
    embedder: Embedder,
    /// The ensemble's second model (`model.ensemble`), if configured.
    partner: Option<Embedder>,
    /// `first` or `first+second`.
    model: Arc<str>,
    top_k: usize,
    windows: WindowSpec,
    registry: RwLock<Arc<Registry>>,
}

impl Engine {
    /// Loads the model (on blocking threads) and every constitution in the configured
    /// folder, embedding their exemplars once.
    pub async fn load(config: &Config) -> Result<Self, EngineError> {
        let embedder = start_embedder(config, config.model_dir()).await?;
        let partner = match config.ensemble_dir() {
            Some(dir) => Some(start_embedder(config, dir).await?),
            None => None,
        };
        let model = match &partner {
            Some(p) => format!("{}+{}", embedder.info().id, p.info().id),
            None => embedder.info().id.clone(),
        };
        let engine = Self {
            embedder,
            partner,
            model: model.into(),
            top_k: config.scoring.top_k,
            windows: WindowSpec {
                tokens: config.scoring.window_tokens,
                stride: config.scoring.window_stride,
            },
            registry: RwLock::new(Arc::new(Registry {
                default: config.constitutions.default.clone(),
                indexes: BTreeMap::new(),
                partners: BTreeMap::new(),
            })),
        };
        let dir = config.constitutions.dir.clone();
        let constitutions = tokio::task::spawn_blocking(move || constitution::load_dir(&dir))
            .await
            .map_err(|e| EmbedError::Load(format!("constitution loader panicked: {e}")))??;
        let mut indexes = BTreeMap::new();
        let mut partners = BTreeMap::new();
        for c in constitutions {
            let id = c.id.clone();
            let partner_index = match &engine.partner {
                Some(partner) => Some(engine.index(partner, c.clone()).await?),
                None => None,
            };
            let index = engine.index(&engine.embedder, c).await?;
            if let Some(partner_index) = partner_index {
                warn_if_uncalibrated(&index, &partner_index);
                partners.insert(id.clone(), Arc::new(partner_index));
            }
            indexes.insert(id, Arc::new(index));
        }
        let default = config.constitutions.default.clone();
        if !indexes.contains_key(&default) {
            return Err(EngineError::MissingDefault(default));
        }
        *engine.registry.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(Registry {
            default,
            indexes,
            partners,
        });
        crate::embed::release_freed_memory();
        Ok(engine)
    }

    /// Embeds a constitution's exemplars (once) with one of the models and builds its index.
    async fn index(
        &self,
        embedder: &Embedder,
        constitution: Constitution,
    ) -> Result<Index, EngineError> {
        let started = Instant::now();
        let texts = Arc::new(Index::exemplar_texts(&constitution));
        let mut vectors = Vec::with_capacity(texts.len());
        // In slices, so a big constitution does not take the whole queue at once, each
        // within what one request may hold.
        for chunk in embedder.slices(&texts, 256) {
            let embedded = embed_with_retry(embedder, Arc::new(chunk.to_vec())).await?;
            vectors.extend(
                embedded
                    .texts
                    .into_iter()
                    .map(|mut t| t.pieces.swap_remove(0).vector),
            );
        }
        let index = Index::new(Arc::new(constitution), embedder.info(), vectors)?;
        if index.stale_heads() {
            tracing::warn!(
                constitution = %index.constitution().id,
                model = %index.model(),
                "calibration heads do not match the exemplar set or the model's output width: ignored, the file's thresholds apply (run charter calibrate)"
            );
        }
        tracing::info!(
            constitution = %index.constitution().id,
            version = %index.constitution().version,
            model = %index.model(),
            rules = index.rules().len(),
            exemplars = index.len(),
            scorer = if index.has_heads() { "head" } else { "knn" },
            duration_ms = started.elapsed().as_millis() as u64,
            "constitution indexed"
        );
        Ok(index)
    }

    pub fn embedder(&self) -> &Embedder {
        &self.embedder
    }

    /// The ensemble's second model, when configured.
    pub fn partner(&self) -> Option<&Embedder> {
        self.partner.as_ref()
    }

    /// The model that scores: `first`, or `first+second` for an ensemble.
    pub fn model(&self) -> &Arc<str> {
        &self.model
    }

    /// Embeds texts as evaluation does (the whole text, and sentence pieces of long ones),
    /// without scoring: `charter bench` and `calibrate` score them many ways. `partner`
    /// picks the ensemble's second model.
    pub async fn embed(
        &self,
        texts: Arc<Vec<String>>,
        partner: bool,
    ) -> Result<crate::embed::Embedded, EngineError> {
        let embedder = match (partner, &self.partner) {
            (false, _) => &self.embedder,
            (true, Some(p)) => p,
            (true, None) => {
                return Err(EmbedError::Load("no ensemble model is configured".into()).into())
            }
        };
        Ok(embedder.embed(texts, Some(self.windows)).await?)
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

    /// The ensemble's index of the same constitution for the second model.
    pub fn partner_index(&self, index: &Index) -> Option<Arc<Index>> {
        self.registry()
            .partners
            .get(&index.constitution().id)
            .cloned()
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
        let partner = self.partner.as_ref().zip(self.partner_index(&index));
        let windows = Some(self.windows);
        let (embedded, partner_embedded) =
            tokio::try_join!(self.embedder.embed(Arc::clone(&texts), windows), async {
                match partner {
                    Some((embedder, _)) => {
                        embedder.embed(Arc::clone(&texts), windows).await.map(Some)
                    }
                    None => Ok(None),
                }
            })?;
        let scoring = Instant::now();
        let mut results: Vec<TextResult> = texts
            .iter()
            .zip(&embedded.texts)
            .map(|(text, emb)| evaluate::evaluate(&index, text, emb, self.top_k))
            .collect();
        let (mut queue_time, mut model_time) = (embedded.queue_time, embedded.model_time);
        if let (Some((_, partner_index)), Some(second)) = (&partner, &partner_embedded) {
            let threshold = ensemble_threshold(&index, partner_index);
            results = results
                .into_iter()
                .zip(texts.iter().zip(&second.texts))
                .map(|(first, (text, emb))| {
                    let other = evaluate::evaluate(partner_index, text, emb, self.top_k);
                    evaluate::average(vec![first, other], threshold)
                })
                .collect();
            // The two models run side by side: the slower one is the wait.
            queue_time = queue_time.max(second.queue_time);
            model_time = model_time.max(second.model_time);
        }
        // Detector rules (patterns and checksums) join the exemplar scores.
        for (result, text) in results.iter_mut().zip(texts.iter()) {
            evaluate::apply_detectors(result, index.constitution(), text);
        }
        let timings = Timings {
            queue_ms: ms(queue_time),
            model_ms: ms(model_time),
            score_ms: ms(scoring.elapsed()),
            total_ms: ms(started.elapsed()),
        };
        Ok(Evaluation {
            index,
            model: Arc::clone(&self.model),
            results,
            timings,
        })
    }
}

/// An ensemble of uncalibrated models mixes scales (kNN cosine differences and logits),
/// and without its own threshold the mean margin is judged at 0: both are worth a warning.
fn warn_if_uncalibrated(first: &Index, second: &Index) {
    let id = &first.constitution().id;
    if !second.has_heads() {
        tracing::warn!(
            constitution = %id,
            model = %second.model(),
            "the ensemble's second model has no calibration (heads) for this constitution: its margins are kNN cosine differences, on another scale than calibrated logits (run charter calibrate with model.name set to it)"
        );
    }
    if first
        .constitution()
        .ensemble_threshold(first.model(), second.model())
        .is_none()
    {
        tracing::warn!(
            constitution = %id,
            "no ensemble threshold fitted for this pair of models (or the second model was calibrated again since): the mean margin is judged at 0 (run charter calibrate with model.ensemble set)"
        );
    }
}

/// The threshold on an ensemble's mean margin: the pair's calibrated one, else 0.
pub fn ensemble_threshold(first: &Index, second: &Index) -> f32 {
    first
        .constitution()
        .ensemble_threshold(first.model(), second.model())
        .unwrap_or(0.0)
}

/// Start-up embedding waits for queue room instead of failing on a busy queue.
async fn embed_with_retry(
    embedder: &Embedder,
    texts: Arc<Vec<String>>,
) -> Result<crate::embed::Embedded, EmbedError> {
    loop {
        match embedder.embed(Arc::clone(&texts), None).await {
            Err(EmbedError::Overloaded { .. }) => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            other => return other,
        }
    }
}

/// Loads one model (`model.workers` sessions from `dir`) and starts its queue.
async fn start_embedder(config: &Config, dir: std::path::PathBuf) -> Result<Embedder, EmbedError> {
    let library = config.runtime_library();
    let workers = config.model.workers;
    let threads = config.model.intra_threads;
    let spinning = config.model.intra_spinning;
    let queue = QueueConfig {
        max_batch_tokens: config.batching.max_batch_tokens,
        max_batch_size: config.batching.max_batch_size,
        bucket_ratio: config.batching.bucket_ratio,
        capacity: config.batching.queue_capacity,
        max_request_units: config.batching.max_request_units(),
        retry_after_secs: config.batching.retry_after_secs,
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
