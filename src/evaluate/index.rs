//! A constitution's exemplars embedded once per load: one row per distinct exemplar text,
//! and per rule the rows of its violating and compliant exemplars.

use std::collections::HashMap;
use std::sync::Arc;

use crate::constitution::{Action, Constitution, Severity};
use crate::embed::ModelInfo;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum IndexError {
    #[error("expected {expected} exemplar vectors, got {got}")]
    Count { expected: usize, got: usize },
    #[error("exemplar vector has {got} dimensions, the model has {expected}")]
    Dimension { expected: usize, got: usize },
}

/// A rule as scoring needs it, with the threshold in force for this model.
#[derive(Debug, Clone)]
pub struct IndexedRule {
    pub id: String,
    pub category: String,
    pub severity: Severity,
    pub action: Action,
    pub threshold: f32,
    violating: Vec<u32>,
    /// The rule's own compliant exemplars and the shared ones.
    compliant: Vec<u32>,
}

/// One rule's score for one piece, with the nearest exemplars (row, similarity).
#[derive(Debug, Clone, Copy)]
pub struct PieceScore {
    pub score: f32,
    pub nearest_violating: (u32, f32),
    pub nearest_compliant: Option<(u32, f32)>,
}

pub struct Index {
    constitution: Arc<Constitution>,
    model: String,
    dim: usize,
    /// Row-major, one unit vector per distinct exemplar text.
    vectors: Vec<f32>,
    texts: Vec<String>,
    rules: Vec<IndexedRule>,
}

impl Index {
    /// The distinct exemplar texts of a constitution, in the order [`Index::new`] expects
    /// their vectors.
    pub fn exemplar_texts(constitution: &Constitution) -> Vec<String> {
        let mut seen = HashMap::new();
        let mut out = Vec::new();
        let all = constitution.shared_compliant.iter().chain(
            constitution
                .rules
                .iter()
                .flat_map(|r| r.violating.iter().chain(&r.compliant)),
        );
        for example in all {
            if !seen.contains_key(example.text.as_str()) {
                seen.insert(example.text.as_str(), out.len());
                out.push(example.text.clone());
            }
        }
        out
    }

    /// Builds the index from the vectors of [`Index::exemplar_texts`], in that order.
    pub fn new(
        constitution: Arc<Constitution>,
        model: &ModelInfo,
        vectors: Vec<Vec<f32>>,
    ) -> Result<Self, IndexError> {
        let texts = Self::exemplar_texts(&constitution);
        if vectors.len() != texts.len() {
            return Err(IndexError::Count {
                expected: texts.len(),
                got: vectors.len(),
            });
        }
        let dim = model.dim;
        let mut flat = Vec::with_capacity(texts.len() * dim);
        for v in &vectors {
            if v.len() != dim {
                return Err(IndexError::Dimension {
                    expected: dim,
                    got: v.len(),
                });
            }
            flat.extend_from_slice(v);
        }
        let row: HashMap<&str, u32> = texts
            .iter()
            .enumerate()
            .map(|(i, t)| (t.as_str(), i as u32))
            .collect();
        let rows = |examples: &[crate::constitution::Example]| -> Vec<u32> {
            let mut r: Vec<u32> = examples.iter().map(|e| row[e.text.as_str()]).collect();
            r.sort_unstable();
            r.dedup();
            r
        };
        let shared = rows(&constitution.shared_compliant);
        let rules = constitution
            .rules
            .iter()
            .map(|rule| {
                let mut compliant = rows(&rule.compliant);
                compliant.extend(&shared);
                compliant.sort_unstable();
                compliant.dedup();
                IndexedRule {
                    id: rule.id.clone(),
                    category: rule.category.clone(),
                    severity: rule.severity,
                    action: rule.action,
                    threshold: constitution.threshold(rule, &model.id),
                    violating: rows(&rule.violating),
                    compliant,
                }
            })
            .collect();
        Ok(Self {
            model: model.id.clone(),
            constitution,
            dim,
            vectors: flat,
            texts,
            rules,
        })
    }

    pub fn constitution(&self) -> &Arc<Constitution> {
        &self.constitution
    }

    pub fn model(&self) -> &str {
        &self.model
    }

    pub fn rules(&self) -> &[IndexedRule] {
        &self.rules
    }

    pub fn exemplar_text(&self, row: u32) -> &str {
        &self.texts[row as usize]
    }

    pub fn len(&self) -> usize {
        self.texts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.texts.is_empty()
    }

    /// Similarity of `vector` to every exemplar row.
    fn similarities(&self, vector: &[f32]) -> Vec<f32> {
        self.vectors
            .chunks_exact(self.dim)
            .map(|row| crate::embed::dot(row, vector))
            .collect()
    }

    /// Every rule's score for one piece vector.
    pub fn score_piece(&self, vector: &[f32], top_k: usize) -> Vec<PieceScore> {
        let sims = self.similarities(vector);
        let mut scratch = Vec::new();
        self.rules
            .iter()
            .map(|rule| {
                let (violating, nearest_violating) =
                    top_k_mean(&sims, &rule.violating, top_k, &mut scratch);
                let (compliant, nearest_compliant) = if rule.compliant.is_empty() {
                    (0.0, None)
                } else {
                    let (m, n) = top_k_mean(&sims, &rule.compliant, top_k, &mut scratch);
                    (m, Some(n))
                };
                PieceScore {
                    score: violating - compliant,
                    nearest_violating,
                    nearest_compliant,
                }
            })
            .collect()
    }
}

/// Mean of the `k` largest `sims[rows]`, and the row with the largest.
fn top_k_mean(sims: &[f32], rows: &[u32], k: usize, scratch: &mut Vec<f32>) -> (f32, (u32, f32)) {
    scratch.clear();
    scratch.extend(rows.iter().map(|&r| sims[r as usize]));
    let mut nearest = (rows[0], sims[rows[0] as usize]);
    for &r in rows {
        if sims[r as usize] > nearest.1 {
            nearest = (r, sims[r as usize]);
        }
    }
    let k = k.min(scratch.len()).max(1);
    if k < scratch.len() {
        scratch.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    }
    let mean = scratch[..k].iter().sum::<f32>() / k as f32;
    (mean, nearest)
}
