//! Models that embed a text's pieces in the text's own forward pass.
//!
//! USE-m3 is a convolutional encoder: every token gets n-gram features, and the sentence
//! embedding is a DNN over their sum. The set-up's graph (`tools/convert_use.py`) takes a
//! third input, `spans` ([batch, pieces, seq], 1 on a piece's tokens), and returns each
//! piece's DNN embedding (`span_embedding`) and the per-token features
//! (`token_features`), so the sentence pieces of a long text cost one model call instead
//! of a second pass over every token. A piece then sees its tokens' features in context
//! (a few tokens at its edges differ from the piece embedded alone) and, like a text
//! embedded alone, its text's `<s>` and `</s>`: measured on dev's long texts, the
//! piece's views have a mean cosine of 0.976 to the piece embedded alone (0.81 without
//! the special tokens), and the piece margins are calibrated on these vectors.
//!
//! fastembed has no way to pass a third input, so these models run on an ONNX Runtime
//! session of their own, built with the options fastembed uses (graph optimisation level
//! 3, the intra-op threads and spinning of the config), and the model folder's own
//! tokenizer.

use std::cell::RefCell;
use std::path::Path;

use ort::session::builder::GraphOptimizationLevel;
use ort::session::{HasSelectedOutputs, OutputSelector, RunOptions, Session};
use ort::value::Tensor;
use tokenizers::{Tokenizer, TruncationParams};

use super::{EmbedError, ModelInfo};

/// Width of the sentence embedding and of the per-token features in the views layout:
/// `[embedding | max view | mean view] / sqrt(3)`.
const EMB_DIM: usize = 512;
const FEATS_DIM: usize = 1280;

/// One model call's input: a text and the byte ranges of its pieces.
#[derive(Clone, Copy)]
pub struct Row<'a> {
    pub text: &'a str,
    pub spans: &'a [(usize, usize)],
}

/// Per row: the row text's vector, then one per span.
type RowVectors = Vec<Vec<Vec<f32>>>;

pub struct SpanModel {
    /// Truncates at the model window; `token_offsets` lifts that for its call.
    pub(super) tokenizer: RefCell<Tokenizer>,
    session: Session,
    /// The fixed vector the max view is centred by (the graph's `max_centre`).
    centre: Vec<f32>,
    /// Outputs asked for by a call with pieces, and by one without.
    all_outputs: RunOptions<HasSelectedOutputs>,
    views_only: RunOptions<HasSelectedOutputs>,
}

impl SpanModel {
    pub fn load(
        dir: &Path,
        info: &ModelInfo,
        environment: &ort::environment::Environment,
        intra_threads: usize,
        spinning: bool,
    ) -> Result<Self, EmbedError> {
        let load = |what: &str, e: &dyn std::fmt::Display| {
            EmbedError::Load(format!("{}: {what}: {e}", dir.display()))
        };
        let model = std::fs::read(dir.join("model.onnx")).map_err(|e| load("model.onnx", &e))?;
        let session = Session::builder(environment)
            .map_err(|e| load("session", &e))?
            .with_optimization_level(GraphOptimizationLevel::Level3)
            .map_err(|e| load("session", &e))?
            .with_intra_threads(intra_threads)
            .map_err(|e| load("session", &e))?
            .with_config_entry(
                "session.intra_op.allow_spinning",
                if spinning { "1" } else { "0" },
            )
            .map_err(|e| load("session", &e))?
            // ONNX Runtime's memory patterns plan one block per input shape; every call here
            // has its own shape (texts x tokens x pieces), and keeping them cost 30 MB of
            // resident memory (bench/rss.sh: 303 MB ready with them, 268-275 without),
            // with no throughput lost.
            .with_memory_pattern(false)
            .map_err(|e| load("session", &e))?
            .commit_from_memory(&model)
            .map_err(|e| load("session", &e))?;
        if !session.inputs().iter().any(|i| i.name() == "spans") {
            return Err(EmbedError::Load(format!(
                "{}: charter-model.json says the graph takes `spans`, model.onnx has no such \
                 input (run `make setup` to rebuild the model)",
                dir.display()
            )));
        }
        if info.dim != EMB_DIM + 2 * FEATS_DIM {
            return Err(EmbedError::Load(format!(
                "{}: a model with `spans` must give the {}-d views, the descriptor says {}",
                dir.display(),
                EMB_DIM + 2 * FEATS_DIM,
                info.dim
            )));
        }
        let mut tokenizer = Tokenizer::from_file(dir.join("tokenizer.json"))
            .map_err(|e| load("tokenizer.json", &e))?;
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: info.max_tokens,
                ..Default::default()
            }))
            .map_err(|e| load("tokenizer.json", &e))?;
        tokenizer.with_padding(None);
        let outputs = |names: &[&str]| {
            let selector = names
                .iter()
                .fold(OutputSelector::no_default(), |o, n| o.with(*n));
            RunOptions::new()
                .map(|o| o.with_outputs(selector))
                .map_err(|e| load("run options", &e))
        };
        let mut model = Self {
            tokenizer: RefCell::new(tokenizer),
            session,
            centre: Vec::new(),
            all_outputs: outputs(&[
                "sentence_views",
                "span_embedding",
                "token_features",
                "max_centre",
            ])?,
            views_only: outputs(&["sentence_views"])?,
        };
        // The warm-up call also reads the graph's `max_centre`.
        model.run(&[Row {
            text: "Charter warm-up",
            spans: &[],
        }])?;
        if model.centre.len() != FEATS_DIM {
            return Err(EmbedError::Load(format!(
                "{}: max_centre has {} values, not {FEATS_DIM}",
                dir.display(),
                model.centre.len()
            )));
        }
        Ok(model)
    }

    /// Per row: the text's vector (the graph's views), then one per span.
    pub fn embed(&mut self, rows: &[Row]) -> Result<RowVectors, EmbedError> {
        self.run(rows)
    }

    /// The first call (the warm-up) also keeps the graph's `max_centre`.
    fn run(&mut self, rows: &[Row]) -> Result<RowVectors, EmbedError> {
        let fail = |e: &dyn std::fmt::Display| EmbedError::Inference(e.to_string());
        let encodings = {
            let tokenizer = self.tokenizer.borrow();
            rows.iter()
                .map(|r| tokenizer.encode(r.text, true))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| fail(&format!("tokenizer: {e}")))?
        };
        let b = rows.len();
        let l = encodings.iter().map(|e| e.len()).max().unwrap_or(0).max(1);
        // No pieces in the call: an empty `spans` ([b, 0, l]) skips the piece part.
        let p = rows.iter().map(|r| r.spans.len()).max().unwrap_or(0);
        let mut ids = vec![0i64; b * l];
        let mut mask = vec![0i64; b * l];
        let mut spans = vec![0f32; b * p * l];
        // Token positions of each span, for the pooling below.
        let mut members: Vec<Vec<Vec<usize>>> = Vec::with_capacity(b);
        for (r, (row, enc)) in rows.iter().zip(&encodings).enumerate() {
            for (t, &id) in enc.get_ids().iter().enumerate() {
                ids[r * l + t] = id as i64;
                mask[r * l + t] = 1;
            }
            let special = enc.get_special_tokens_mask();
            let offsets = enc.get_offsets();
            let ends: Vec<usize> = (0..enc.len()).filter(|&t| special[t] == 1).collect();
            let mut row_members = Vec::with_capacity(row.spans.len());
            for (s, &(start, end)) in row.spans.iter().enumerate() {
                let mut tokens: Vec<usize> = (0..enc.len())
                    .filter(|&t| special[t] == 0 && offsets[t].0 >= start && offsets[t].1 <= end)
                    .collect();
                if !tokens.is_empty() {
                    tokens.extend(&ends);
                }
                for &t in &tokens {
                    spans[(r * p + s) * l + t] = 1.0;
                }
                row_members.push(tokens);
            }
            members.push(row_members);
        }
        let tensor_i64 = |v: Vec<i64>| Tensor::from_array(([b, l], v)).map_err(|e| fail(&e));
        let inputs = ort::inputs![
            "input_ids" => tensor_i64(ids)?,
            "attention_mask" => tensor_i64(mask)?,
            "spans" => Tensor::from_array(([b, p, l], spans)).map_err(|e| fail(&e))?,
        ];
        // A call without pieces asks for the text views alone, so ONNX Runtime does not
        // copy the token features out (measured: short-text p50 1.95 -> 1.75 ms).
        let pieces = p > 0 || self.centre.is_empty();
        let options = if pieces {
            &self.all_outputs
        } else {
            &self.views_only
        };
        let outputs = self
            .session
            .run_with_options(inputs, options)
            .map_err(|e| fail(&e))?;
        let get = |name: &str| {
            outputs[name]
                .try_extract_tensor::<f32>()
                .map(|(_, data)| data)
                .map_err(|e| fail(&format!("{name}: {e}")))
        };
        let dim = EMB_DIM + 2 * FEATS_DIM;
        let views = get("sentence_views")?;
        let mismatch =
            || EmbedError::Inference("the model's outputs do not have the views layout".into());
        if views.len() != b * dim {
            return Err(mismatch());
        }
        let wholes = views.chunks_exact(dim).map(|v| vec![v.to_vec()]);
        if !pieces {
            return Ok(wholes.collect());
        }
        if self.centre.is_empty() {
            self.centre = get("max_centre")?.to_vec();
        }
        let span_embedding = get("span_embedding")?;
        let features = get("token_features")?;
        if span_embedding.len() != b * p * EMB_DIM || features.len() != b * l * FEATS_DIM {
            return Err(mismatch());
        }
        let out = wholes
            .zip(members)
            .enumerate()
            .map(|(r, (mut vectors, row_members))| {
                for (s, tokens) in row_members.iter().enumerate() {
                    if tokens.is_empty() {
                        // No token of the row lies inside the range: the row stands in.
                        vectors.push(vectors[0].clone());
                        continue;
                    }
                    let emb = &span_embedding[(r * p + s) * EMB_DIM..(r * p + s + 1) * EMB_DIM];
                    let feats = tokens
                        .iter()
                        .map(|&t| &features[(r * l + t) * FEATS_DIM..(r * l + t + 1) * FEATS_DIM]);
                    vectors.push(piece_views(emb, feats, &self.centre));
                }
                vectors
            })
            .collect();
        Ok(out)
    }
}

/// The views of a piece, laid out as the graph lays out a text's:
/// `[embedding | unit(max - centre) | unit(mean)] / sqrt(3)`.
pub fn piece_views<'a>(
    embedding: &[f32],
    features: impl Iterator<Item = &'a [f32]>,
    centre: &[f32],
) -> Vec<f32> {
    let mut max = vec![f32::NEG_INFINITY; centre.len()];
    let mut sum = vec![0f32; centre.len()];
    let mut n = 0usize;
    for f in features {
        for ((m, s), &x) in max.iter_mut().zip(sum.iter_mut()).zip(f) {
            *m = m.max(x);
            *s += x;
        }
        n += 1;
    }
    for (m, c) in max.iter_mut().zip(centre) {
        *m -= c;
    }
    let third = (1.0f32 / 3.0).sqrt();
    let unit = |v: &mut [f32]| {
        let norm = crate::embed::dot(v, v).sqrt().max(1e-12);
        v.iter_mut().for_each(|x| *x *= third / norm);
    };
    if n > 0 {
        sum.iter_mut().for_each(|x| *x /= n as f32);
    }
    unit(&mut max);
    unit(&mut sum);
    let mut out = Vec::with_capacity(embedding.len() + 2 * centre.len());
    out.extend(embedding.iter().map(|x| x * third));
    out.extend(max);
    out.extend(sum);
    out
}

#[cfg(test)]
mod tests {
    use super::piece_views;

    #[test]
    fn piece_views_are_three_unit_parts_scaled_by_one_over_root_three() {
        let emb = [0.6f32, 0.8];
        let f1 = [1.0f32, 0.0, 2.0];
        let f2 = [3.0f32, -1.0, 0.0];
        let centre = [1.0f32, 0.0, 0.0];
        let v = piece_views(&emb, [&f1[..], &f2[..]].into_iter(), &centre);
        let third = (1.0f32 / 3.0).sqrt();
        assert_eq!(v.len(), 2 + 3 + 3);
        assert!((v[0] - 0.6 * third).abs() < 1e-6 && (v[1] - 0.8 * third).abs() < 1e-6);
        // max (3, 0, 2) minus centre (1, 0, 0) = (2, 0, 2), unit = (1, 0, 1) / sqrt 2.
        let r = third / 2f32.sqrt();
        for (got, want) in v[2..5].iter().zip([r, 0.0, r]) {
            assert!((got - want).abs() < 1e-6, "{got} {want}");
        }
        // mean (2, -0.5, 1), norm sqrt(5.25).
        let n = 5.25f32.sqrt();
        for (got, want) in v[5..].iter().zip([2.0 / n, -0.5 / n, 1.0 / n]) {
            assert!((got - want * third).abs() < 1e-6);
        }
        let total: f32 = v.iter().map(|x| x * x).sum();
        assert!((total - 1.0).abs() < 1e-5, "unit overall: {total}");
    }
}
