//! The ONNX backend: a fastembed user-defined model on ONNX Runtime, loaded dynamically
//! from the library the set-up step fetched.

use std::path::Path;
use std::sync::OnceLock;

use fastembed::{
    InitOptionsUserDefined, OutputKey, Pooling, TextEmbedding, TokenizerFiles,
    UserDefinedEmbeddingModel,
};
use tokenizers::Tokenizer;

use super::{Backend, EmbedError, ModelInfo};

/// ONNX Runtime allows one environment per process, ever (ort refuses a second even after
/// the first is dropped), so it is made once and shared by every session; the library
/// path of the first call wins.
static ENVIRONMENT: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();

fn environment(library: &Path) -> Result<ort::environment::Environment, EmbedError> {
    ENVIRONMENT
        .get_or_init(|| {
            if !library.is_file() {
                return Err(format!(
                    "ONNX Runtime library {} not found (run `make setup`, or set model.runtime_library)",
                    library.display()
                ));
            }
            ort::init_from(library)
                .map_err(|e| format!("cannot load ONNX Runtime from {}: {e}", library.display()))?
                .with_name("charter")
                .with_telemetry(false)
                .build()
                .map_err(|e| format!("cannot start ONNX Runtime: {e}"))
        })
        .clone()
        .map_err(EmbedError::Load)
}

pub struct OnnxBackend {
    info: ModelInfo,
    model: TextEmbedding,
    /// The model's tokenizer without truncation or padding: token offsets for windows and
    /// lengths for batching.
    tokenizer: Tokenizer,
}

impl OnnxBackend {
    /// Loads the model folder (`model.onnx`, tokenizer files, `charter-model.json`).
    pub fn load(dir: &Path, library: &Path, intra_threads: usize) -> Result<Self, EmbedError> {
        let info = ModelInfo::read(dir)?;
        let env = environment(library)?;
        let read = |name: &str| {
            std::fs::read(dir.join(name)).map_err(|e| {
                EmbedError::Load(format!("cannot read {}: {e}", dir.join(name).display()))
            })
        };
        let tokenizer_files = TokenizerFiles {
            tokenizer_file: read("tokenizer.json")?,
            config_file: read("config.json")?,
            special_tokens_map_file: read("special_tokens_map.json")?,
            tokenizer_config_file: read("tokenizer_config.json")?,
        };
        let pooling = match info.pooling.as_str() {
            "mean" => Pooling::Mean,
            // A 2-D output passes through fastembed's CLS pooling unchanged.
            "cls" | "none" => Pooling::Cls,
            other => {
                return Err(EmbedError::Load(format!(
                    "{}: unknown pooling {other:?} (mean, cls, none)",
                    dir.display()
                )))
            }
        };
        let output: &'static str = match info.output.as_str() {
            "sentence_embedding" => "sentence_embedding",
            "last_hidden_state" => "last_hidden_state",
            // One leak per model load, bounded by the number of loads.
            other => Box::leak(other.to_string().into_boxed_str()),
        };
        let mut user_model = UserDefinedEmbeddingModel::new(read("model.onnx")?, tokenizer_files)
            .with_pooling(pooling);
        user_model.output_key = Some(OutputKey::ByName(output));
        let options = InitOptionsUserDefined::new()
            .with_environment(env)
            .with_max_length(info.max_tokens)
            .with_intra_threads(intra_threads)
            // Idle intra-op threads sleep instead of spinning: on a small machine the HTTP
            // threads need those cycles between model calls.
            .with_session_config("session.intra_op.allow_spinning", "0")
            .with_auto_device(fastembed::AutoDevicePolicy::PreferCPU);
        let model = TextEmbedding::try_new_from_user_defined(user_model, options)
            .map_err(|e| EmbedError::Load(format!("{}: {e}", dir.display())))?;

        let mut tokenizer = model.tokenizer.clone();
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| EmbedError::Load(e.to_string()))?;
        let mut backend = Self {
            info,
            model,
            tokenizer,
        };
        // Warm-up call, which also checks the descriptor's `dim` against the model: a wrong
        // one would corrupt every score later.
        backend.embed(&["Charter warm-up"])?;
        Ok(backend)
    }
}

impl Backend for OnnxBackend {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn token_offsets(&self, text: &str) -> Result<Vec<(usize, usize)>, EmbedError> {
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| EmbedError::Inference(format!("tokenizer: {e}")))?;
        Ok(encoding.get_offsets().to_vec())
    }

    fn embed(&mut self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let result = if self.info.prefix.is_empty() {
            self.model.embed(texts, Some(texts.len().max(1)))
        } else {
            let prefixed: Vec<String> = texts
                .iter()
                .map(|t| format!("{}{t}", self.info.prefix))
                .collect();
            self.model.embed(&prefixed, Some(texts.len().max(1)))
        };
        let vectors = result.map_err(|e| EmbedError::Inference(e.to_string()))?;
        if let Some(v) = vectors.iter().find(|v| v.len() != self.info.dim) {
            return Err(EmbedError::Inference(format!(
                "model {} returned {} dimensions, its descriptor says {}",
                self.info.id,
                v.len(),
                self.info.dim
            )));
        }
        Ok(vectors)
    }
}
