//! The ONNX backend: a fastembed user-defined model on ONNX Runtime, loaded dynamically
//! from the library the set-up step fetched; or, for a graph that embeds a text's pieces
//! in the text's own call (`charter-model.json` `spans`), a session of its own
//! ([`SpanModel`]).

use std::path::Path;
use std::sync::OnceLock;

use fastembed::{
    InitOptionsUserDefined, OutputKey, Pooling, TextEmbedding, TokenizerFiles,
    UserDefinedEmbeddingModel,
};
use std::cell::RefCell;

use tokenizers::Tokenizer;

use super::spans::{Row, SpanModel};
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
    /// The session and its one tokenizer, which also gives the token offsets for pieces
    /// and lengths for batching (`token_offsets` lifts its truncation for the call). A
    /// second copy of the tokenizer would cost as much memory again: 52 MB for USE-m3's
    /// 128k-piece vocabulary (heaptrack, BENCHMARKS.md). Only the worker thread that owns
    /// the backend touches it.
    model: Runner,
}

enum Runner {
    Fastembed(RefCell<TextEmbedding>),
    Spans(SpanModel),
}

impl OnnxBackend {
    /// Loads the model folder (`model.onnx`, tokenizer files, `charter-model.json`).
    pub fn load(
        dir: &Path,
        library: &Path,
        intra_threads: usize,
        spinning: bool,
    ) -> Result<Self, EmbedError> {
        let info = ModelInfo::read(dir)?;
        let env = environment(library)?;
        if info.spans {
            let model = SpanModel::load(dir, &info, &env, intra_threads, spinning)?;
            return Ok(Self {
                info,
                model: Runner::Spans(model),
            });
        }
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
            // Spinning intra-op threads pick up the next op at once; sleeping ones must be
            // woken for each of the graph's ~200 ops (config `model.intra_spinning`).
            .with_session_config(
                "session.intra_op.allow_spinning",
                if spinning { "1" } else { "0" },
            )
            .with_auto_device(fastembed::AutoDevicePolicy::PreferCPU);
        let model = TextEmbedding::try_new_from_user_defined(user_model, options)
            .map_err(|e| EmbedError::Load(format!("{}: {e}", dir.display())))?;

        let mut backend = Self {
            info,
            model: Runner::Fastembed(RefCell::new(model)),
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
        let encoding = match &self.model {
            Runner::Fastembed(model) => {
                untruncated(&mut model.borrow_mut().tokenizer, |t| t.encode(text, false))
            }
            Runner::Spans(model) => {
                untruncated(&mut model.tokenizer.borrow_mut(), |t| t.encode(text, false))
            }
        }
        .map_err(|e| EmbedError::Inference(format!("tokenizer: {e}")))?;
        // A single encoding is not padded (batch-longest padding of one is itself); the
        // mask keeps that true should the padding ever change.
        Ok(encoding
            .get_offsets()
            .iter()
            .zip(encoding.get_attention_mask())
            .filter(|(_, &mask)| mask == 1)
            .map(|(&offsets, _)| offsets)
            .collect())
    }

    fn pools_spans(&self) -> bool {
        matches!(self.model, Runner::Spans(_))
    }

    fn embed_rows(&mut self, rows: &[Row]) -> Result<Vec<Vec<Vec<f32>>>, EmbedError> {
        match &mut self.model {
            Runner::Spans(model) => model.embed(rows),
            Runner::Fastembed(_) => super::embed_rows_alone(self, rows),
        }
    }

    fn embed(&mut self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let vectors = match &mut self.model {
            Runner::Spans(model) => {
                let rows: Vec<Row> = texts.iter().map(|&text| Row { text, spans: &[] }).collect();
                model
                    .embed(&rows)?
                    .into_iter()
                    .map(|mut v| v.swap_remove(0))
                    .collect()
            }
            Runner::Fastembed(model) if self.info.prefix.is_empty() => model
                .get_mut()
                .embed(texts, Some(texts.len().max(1)))
                .map_err(|e| EmbedError::Inference(e.to_string()))?,
            Runner::Fastembed(model) => {
                let prefixed: Vec<String> = texts
                    .iter()
                    .map(|t| format!("{}{t}", self.info.prefix))
                    .collect();
                model
                    .get_mut()
                    .embed(&prefixed, Some(texts.len().max(1)))
                    .map_err(|e| EmbedError::Inference(e.to_string()))?
            }
        };
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

/// Runs `f` on `tokenizer` with its truncation lifted, then puts the truncation back (also
/// when `f` fails). The session's tokenizer truncates at the model window, and with
/// tokenizers 0.23 a truncated encoding keeps no `overflowing` parts, so token counts
/// and piece offsets need the whole text.
fn untruncated<T>(
    tokenizer: &mut Tokenizer,
    f: impl FnOnce(&Tokenizer) -> tokenizers::Result<T>,
) -> tokenizers::Result<T> {
    let truncation = tokenizer.get_truncation().cloned();
    tokenizer.with_truncation(None)?;
    let result = f(tokenizer);
    tokenizer.with_truncation(truncation)?;
    result
}

#[cfg(test)]
mod tests {
    use tokenizers::models::wordlevel::WordLevel;
    use tokenizers::pre_tokenizers::whitespace::Whitespace;
    use tokenizers::{Tokenizer, TruncationParams};

    use super::untruncated;

    #[test]
    fn offsets_cover_the_whole_text_and_the_truncation_comes_back() {
        let vocab = ["[UNK]", "a", "b", "c"]
            .iter()
            .enumerate()
            .map(|(i, w)| (w.to_string(), i as u32))
            .collect();
        let model = WordLevel::builder()
            .vocab(vocab)
            .unk_token("[UNK]".into())
            .build()
            .unwrap();
        let mut tokenizer = Tokenizer::new(model);
        tokenizer.with_pre_tokenizer(Some(Whitespace {}));
        let window = TruncationParams {
            max_length: 3,
            ..Default::default()
        };
        tokenizer.with_truncation(Some(window.clone())).unwrap();
        let text = "a b c a b c a";
        assert_eq!(tokenizer.encode(text, false).unwrap().get_ids().len(), 3);
        let whole = untruncated(&mut tokenizer, |t| t.encode(text, false)).unwrap();
        assert_eq!(whole.get_ids().len(), 7);
        assert_eq!(whole.get_offsets()[6], (12, 13));
        let restored = tokenizer.get_truncation().expect("truncation restored");
        assert_eq!(restored.max_length, window.max_length);
        assert_eq!(tokenizer.encode(text, false).unwrap().get_ids().len(), 3);
    }
}
