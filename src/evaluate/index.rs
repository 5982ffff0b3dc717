//! A constitution's exemplars embedded once per load: one row per distinct exemplar text,
//! and per rule the rows of its violating and compliant exemplars.

use std::collections::HashMap;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::constitution::{Action, Constitution, LinearHead, Severity};
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
    /// How many leading dimensions of the model's vectors exemplar similarity uses
    /// (`ModelInfo::neighbour_dims`); the rows below hold only those, re-normalised.
    sim_dim: usize,
    /// The mean exemplar vector, and every exemplar's unit vector minus it, re-normalised
    /// (row-major; the heads' kNN features: centring spreads out cosines that sit in a
    /// narrow band).
    centre: Vec<f32>,
    centred: Vec<f32>,
    /// Per row, |x - centre| and centre . u (u the centred row): with them a plain cosine
    /// comes from the centred one in O(1), so one matrix and one pass serve both (the
    /// 3,072-d views make the exemplar matrix 19 MB; a second copy would double that).
    deviation: Vec<f32>,
    centre_dot: Vec<f32>,
    /// Every compliant row (shared and rules' own): the heads' one compliant pool.
    pool: Vec<u32>,
    texts: Vec<String>,
    rules: Vec<IndexedRule>,
    heads: Option<Heads>,
    /// The calibration has heads for this model that do not fit this exemplar set.
    stale_heads: bool,
}

/// Learned heads in force (from the calibration), one per rule (`None`: never violated).
struct Heads {
    heads: Vec<Option<LinearHead>>,
    piece_margin: f32,
}

/// Logit of a rule that has no head (no labelled violations to fit one on).
pub const NO_HEAD_LOGIT: f32 = -30.0;

impl Index {
    /// The distinct exemplar texts of a constitution, in the order [`Index::new`] expects
    /// their vectors.
    pub fn exemplar_texts(constitution: &Constitution) -> Vec<String> {
        let mut seen = HashMap::new();
        let mut out = Vec::new();
        for example in constitution.examples() {
            if !seen.contains_key(example.text.as_str()) {
                seen.insert(example.text.as_str(), out.len());
                out.push(example.text.clone());
            }
        }
        out
    }

    /// sha256 of the exemplar set as the heads see it: every exemplar text in row order and
    /// each rule's violating and compliant rows. A head is tied to it.
    pub fn exemplar_set_hash(constitution: &Constitution) -> String {
        let mut h = Sha256::new();
        for t in Self::exemplar_texts(constitution) {
            h.update(t.as_bytes());
            h.update(b"\0");
        }
        for rule in constitution.scored_rules() {
            h.update(format!("\0rule {}\0", rule.id).as_bytes());
            for e in rule.violating.iter().chain([&crate::constitution::Example {
                text: "\0compliant".into(),
                source: None,
            }]) {
                h.update(e.text.as_bytes());
                h.update(b"\0");
            }
            for e in &rule.compliant {
                h.update(e.text.as_bytes());
                h.update(b"\0");
            }
        }
        hex::encode(h.finalize())[..16].to_string()
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
        // Only the neighbour dimensions of an exemplar are kept (the heads read the full
        // vector of the text being scored, never an exemplar's), and each vector is let go
        // as soon as it is copied: at start-up the full 3,072-d vectors are 19 MB.
        let sim_dim = model.neighbour_dims.unwrap_or(dim).clamp(1, dim.max(1));
        let mut flat = Vec::with_capacity(texts.len() * sim_dim);
        for v in vectors {
            if v.len() != dim {
                return Err(IndexError::Dimension {
                    expected: dim,
                    got: v.len(),
                });
            }
            flat.extend(neighbour_part(&v, sim_dim));
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
        // Heads count only when fitted for this model on this exemplar set; their
        // thresholds are logits, so without valid heads the file's thresholds stand.
        let calibration = constitution.calibration(&model.id);
        let has_heads = calibration.is_some_and(|c| c.rules.values().any(|r| r.head.is_some()));
        let heads_valid = has_heads
            && calibration.and_then(|c| c.exemplars.as_deref())
                == Some(Self::exemplar_set_hash(&constitution).as_str())
            && calibration.is_some_and(|c| {
                c.rules.values().filter_map(|r| r.head.as_ref()).all(|h| {
                    h.weights.len() == dim
                        && h.knn_weights.len() == constitution.scored_rules().count()
                })
            });
        let heads = heads_valid.then(|| {
            let c = calibration.expect("heads come from a calibration");
            Heads {
                heads: constitution
                    .scored_rules()
                    .map(|r| c.rules.get(&r.id).and_then(|x| x.head.clone()))
                    .collect(),
                piece_margin: c.piece_margin.unwrap_or(0.0),
            }
        });
        // Rules judged by detectors alone have no rows, no head and no threshold here.
        let rules = constitution
            .scored_rules()
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
                    threshold: if has_heads && !heads_valid {
                        rule.threshold
                    } else {
                        constitution.threshold(rule, &model.id)
                    },
                    violating: rows(&rule.violating),
                    compliant,
                }
            })
            .collect::<Vec<IndexedRule>>();
        let mut pool: Vec<u32> = rules.iter().flat_map(|r| r.compliant.clone()).collect();
        pool.sort_unstable();
        pool.dedup();
        let n = texts.len().max(1) as f32;
        let mut centre = vec![0f32; sim_dim];
        for row in flat.chunks_exact(sim_dim) {
            for (c, x) in centre.iter_mut().zip(row) {
                *c += x / n;
            }
        }
        let mut centred = Vec::with_capacity(flat.len());
        let mut deviation = Vec::with_capacity(texts.len());
        let mut centre_dot = Vec::with_capacity(texts.len());
        for row in flat.chunks_exact(sim_dim) {
            let (unit, norm) = centred_unit_norm(row, &centre);
            deviation.push(norm);
            centre_dot.push(crate::embed::dot(&centre, &unit));
            centred.extend_from_slice(&unit);
        }
        drop(flat);
        Ok(Self {
            model: model.id.clone(),
            constitution,
            sim_dim,
            centre,
            centred,
            deviation,
            centre_dot,
            pool,
            texts,
            rules,
            heads,
            stale_heads: has_heads && !heads_valid,
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
    pub fn similarities(&self, vector: &[f32]) -> Vec<f32> {
        self.similarity_pair(vector).plain
    }

    /// Plain and centred similarities of `vector` to every exemplar row, in one pass over
    /// the centred rows: with x = c + d_r u_r and v = c + |v - c| q,
    /// `v . x = v . c + d_r (|v - c| (q . u_r) + c . u_r)`.
    pub fn similarity_pair(&self, vector: &[f32]) -> Similarities {
        let vector = neighbour_part(vector, self.sim_dim);
        let (q, norm) = centred_unit_norm(&vector, &self.centre);
        let v_dot_c = crate::embed::dot(&vector, &self.centre);
        let centred: Vec<f32> = self
            .centred
            .chunks_exact(self.sim_dim)
            .map(|row| crate::embed::dot(row, &q))
            .collect();
        let plain = centred
            .iter()
            .zip(self.deviation.iter().zip(&self.centre_dot))
            .map(|(&cs, (&d, &cu))| v_dot_c + d * (norm * cs + cu))
            .collect();
        Similarities { plain, centred }
    }

    /// The calibration's heads were fitted on other exemplars (or shapes), so they are not
    /// used and the file's thresholds stand until `charter calibrate` runs again.
    pub fn stale_heads(&self) -> bool {
        self.stale_heads
    }

    /// Whether rule scores are learned heads' logits (else kNN cosine differences).
    pub fn has_heads(&self) -> bool {
        self.heads.is_some()
    }

    /// Whether rule `r` can ever be violated: with heads in force, only a rule with a head
    /// (a rule without one scores [`NO_HEAD_LOGIT`]); without, a rule with violating
    /// exemplars.
    pub fn can_fire(&self, r: usize) -> bool {
        match &self.heads {
            Some(h) => h.heads.get(r).is_some_and(Option::is_some),
            None => self
                .rules
                .get(r)
                .is_some_and(|rule| !rule.violating.is_empty()),
        }
    }

    /// How far a long text's sentence piece must score above the threshold to count.
    pub fn piece_margin(&self) -> f32 {
        self.heads.as_ref().map_or(0.0, |h| h.piece_margin)
    }

    /// Similarity of `vector`, centred like the rows, to every centred exemplar row.
    pub fn centred_similarities(&self, vector: &[f32]) -> Vec<f32> {
        let (q, _) = centred_unit_norm(&neighbour_part(vector, self.sim_dim), &self.centre);
        self.centred
            .chunks_exact(self.sim_dim)
            .map(|row| crate::embed::dot(row, &q))
            .collect()
    }

    /// The heads' kNN features from [`Index::centred_similarities`]: per rule, the mean
    /// of the `k` best violating rows minus that of the `k` best rows of the compliant
    /// pool, without the rows where `exclude` is true.
    pub fn knn_features(&self, csims: &[f32], k: usize, exclude: Option<&[bool]>) -> Vec<f32> {
        let mut scratch = Vec::new();
        let pool = top_k_mean(csims, &self.pool, k, exclude, &mut scratch).map_or(0.0, |m| m.0);
        self.rules
            .iter()
            .map(|rule| {
                top_k_mean(csims, &rule.violating, k, exclude, &mut scratch).map_or(-2.0, |m| m.0)
                    - pool
            })
            .collect()
    }

    /// The heads' logits for one piece, when the index has heads: from its whole vector
    /// and its centred similarities ([`Index::similarity_pair`]).
    pub fn head_logits(
        &self,
        vector: &[f32],
        csims: &[f32],
        exclude: Option<&[bool]>,
    ) -> Option<Vec<f32>> {
        let heads = self.heads.as_ref()?;
        let knn = self.knn_features(csims, super::head::HEAD_K, exclude);
        Some(
            heads
                .heads
                .iter()
                .map(|h| {
                    h.as_ref()
                        .map_or(NO_HEAD_LOGIT, |h| super::head::logit(h, vector, &knn))
                })
                .collect(),
        )
    }

    /// Every rule's score from a piece's [`Index::similarities`], leaving out the exemplar
    /// rows where `exclude` is true (cross-validation: an item is never scored against
    /// exemplars from its own group). A rule left with no violating row scores -2, below
    /// any cosine difference.
    pub fn score_similarities(
        &self,
        sims: &[f32],
        top_k: usize,
        exclude: Option<&[bool]>,
    ) -> Vec<PieceScore> {
        let mut scratch = Vec::new();
        self.rules
            .iter()
            .map(|rule| {
                let (violating, nearest_violating) =
                    match top_k_mean(sims, &rule.violating, top_k, exclude, &mut scratch) {
                        Some(v) => v,
                        None => (-2.0, (rule.violating[0], sims[rule.violating[0] as usize])),
                    };
                let (compliant, nearest_compliant) =
                    match top_k_mean(sims, &rule.compliant, top_k, exclude, &mut scratch) {
                        Some((m, n)) => (m, Some(n)),
                        None => (0.0, None),
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

/// Both kinds of similarity of one vector to every row ([`Index::similarity_pair`]).
pub struct Similarities {
    pub plain: Vec<f32>,
    pub centred: Vec<f32>,
}

/// The leading `dims` of `v`, re-normalised (all of a unit `v` comes back as it is).
fn neighbour_part(v: &[f32], dims: usize) -> Vec<f32> {
    let part = &v[..dims.min(v.len())];
    if part.len() == v.len() {
        return part.to_vec();
    }
    let norm = crate::embed::dot(part, part).sqrt().max(1e-12);
    part.iter().map(|x| x / norm).collect()
}

/// `(normalise(v - centre), |v - centre|)`.
fn centred_unit_norm(v: &[f32], centre: &[f32]) -> (Vec<f32>, f32) {
    let d: Vec<f32> = v.iter().zip(centre).map(|(a, b)| a - b).collect();
    let norm = d.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    (d.into_iter().map(|x| x / norm).collect(), norm)
}

/// Mean of the `k` largest `sims[rows]` (rows not excluded), and the row with the largest;
/// `None` when no row is left.
fn top_k_mean(
    sims: &[f32],
    rows: &[u32],
    k: usize,
    exclude: Option<&[bool]>,
    scratch: &mut Vec<f32>,
) -> Option<(f32, (u32, f32))> {
    scratch.clear();
    let mut nearest: Option<(u32, f32)> = None;
    for &r in rows {
        if exclude.is_some_and(|x| x[r as usize]) {
            continue;
        }
        let s = sims[r as usize];
        scratch.push(s);
        if nearest.is_none_or(|(_, b)| s > b) {
            nearest = Some((r, s));
        }
    }
    let nearest = nearest?;
    let k = k.min(scratch.len()).max(1);
    if k < scratch.len() {
        scratch.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    }
    let mean = scratch[..k].iter().sum::<f32>() / k as f32;
    Some((mean, nearest))
}
