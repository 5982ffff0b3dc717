use std::collections::BTreeMap;
use std::sync::Arc;

use super::*;
use crate::constitution::{Constitution, Example, Rule};
use crate::embed::{ModelInfo, Piece};

fn ex(text: &str) -> Example {
    Example {
        text: text.into(),
        source: None,
    }
}

fn rule(id: &str, threshold: f32, violating: &[&str], compliant: &[&str]) -> Rule {
    Rule {
        id: id.into(),
        category: id.into(),
        principle: BTreeMap::from([("en".into(), format!("no {id}"))]),
        severity: Severity::High,
        action: Action::Block,
        threshold,
        critique: String::new(),
        revision: String::new(),
        refusal: BTreeMap::new(),
        violating: violating.iter().map(|t| ex(t)).collect(),
        compliant: compliant.iter().map(|t| ex(t)).collect(),
        detectors: Vec::new(),
        patterns: Vec::new(),
        detect: Default::default(),
    }
}

fn model() -> ModelInfo {
    ModelInfo {
        id: "toy".into(),
        description: String::new(),
        output: "x".into(),
        pooling: "none".into(),
        max_tokens: 16,
        prefix: String::new(),
        dim: 3,
        neighbour_dims: None,
        spans: false,
        licence: String::new(),
    }
}

/// Toy space: axis 0 = "weapons", axis 1 = "privacy", axis 2 = "benign".
fn toy_vector(text: &str) -> Vec<f32> {
    let v = match text {
        "bomb" | "gun" => [1.0, 0.0, 0.0],
        "address" => [0.0, 1.0, 0.0],
        "kill python process" => [0.6, 0.0, 0.8],
        _ => [0.0, 0.0, 1.0],
    };
    v.to_vec()
}

fn index(shared: &[&str]) -> Index {
    let constitution = Constitution {
        id: "toy".into(),
        description: String::new(),
        version: "v".into(),
        path: "toy.toml".into(),
        shared_compliant: shared.iter().map(|t| ex(t)).collect(),
        rules: vec![
            rule("weapons", 0.1, &["bomb", "gun"], &["kill python process"]),
            rule("privacy", 0.1, &["address"], &[]),
        ],
        calibrations: Vec::new(),
    };
    let texts = Index::exemplar_texts(&constitution);
    // Distinct texts, each once, whatever list they came from.
    let mut unique = texts.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), texts.len());
    assert_eq!(
        texts.len(),
        4 + shared
            .iter()
            .filter(|s| !["bomb", "gun", "address", "kill python process"].contains(s))
            .count()
    );
    let vectors = texts.iter().map(|t| toy_vector(t)).collect();
    Index::new(Arc::new(constitution), &model(), vectors).unwrap()
}

fn embedded(text: &str, pieces: &[(&str, [f32; 3])]) -> TextEmbedding {
    TextEmbedding {
        pieces: pieces
            .iter()
            .map(|(p, v)| {
                let start = text.find(p).unwrap();
                Piece {
                    start,
                    end: start + p.len(),
                    tokens: p.split_whitespace().count(),
                    vector: v.to_vec(),
                }
            })
            .collect(),
        tokens: text.split_whitespace().count(),
        truncated: false,
    }
}

#[test]
fn violating_text_fails_the_right_rule_with_evidence() {
    let idx = index(&["hello"]);
    let text = "how to make a bomb";
    let r = evaluate(&idx, text, &embedded(text, &[(text, [0.95, 0.0, 0.31])]), 1);
    assert_eq!(r.verdict, Verdict::Fail);
    let weapons = &r.rules[0];
    assert!(weapons.violated);
    assert!(!r.rules[1].violated);
    assert!(
        weapons.evidence.as_ref().unwrap().exemplar == "bomb"
            || weapons.evidence.as_ref().unwrap().exemplar == "gun"
    );
    assert!(
        weapons.evidence.as_ref().unwrap().span.is_none(),
        "single-piece texts carry no span"
    );
    // risk is the largest margin, positive exactly on fail.
    let margin = weapons.score - weapons.threshold;
    assert!((r.risk - margin).abs() < 1e-6 && r.risk > 0.0);
}

#[test]
fn compliant_exemplars_pull_lookalikes_below_threshold() {
    let idx = index(&[]);
    let text = "kill python process";
    let r = evaluate(&idx, text, &embedded(text, &[(text, [0.6, 0.0, 0.8])]), 1);
    assert_eq!(r.verdict, Verdict::Pass, "{r:?}");
    assert!(r.risk <= 0.0);
    assert_eq!(
        r.rules[0]
            .evidence
            .as_ref()
            .unwrap()
            .compliant_exemplar
            .as_deref(),
        Some("kill python process")
    );
}

#[test]
fn the_best_window_decides_and_is_reported_as_span() {
    let idx = index(&["hello"]);
    let text = "a long harmless preamble ... then ask where she lives";
    let r = evaluate(
        &idx,
        text,
        &embedded(
            text,
            &[
                (text, [0.0, 0.2, 0.98]),
                ("a long harmless preamble", [0.0, 0.0, 1.0]),
                ("then ask where she lives", [0.0, 0.9, 0.44]),
            ],
        ),
        1,
    );
    assert_eq!(r.windows, 2);
    let privacy = &r.rules[1];
    assert!(privacy.violated, "{r:?}");
    let span = privacy.evidence.as_ref().unwrap().span.as_ref().unwrap();
    assert_eq!(span.text, "then ask where she lives");
    assert_eq!(span.start, text.chars().count() - span.text.chars().count());
}

#[test]
fn top_k_averages_the_nearest() {
    let idx = index(&[]);
    let text = "gun talk";
    // Similar to "gun" and "bomb" (both [1,0,0]) => top-2 mean = top-1.
    let one = evaluate(&idx, text, &embedded(text, &[(text, [1.0, 0.0, 0.0])]), 1);
    let two = evaluate(&idx, text, &embedded(text, &[(text, [1.0, 0.0, 0.0])]), 2);
    assert!((one.rules[0].score - two.rules[0].score).abs() < 1e-6);
    // Privacy has a single violating exemplar: k larger than the list is clamped.
    let many = evaluate(&idx, text, &embedded(text, &[(text, [0.0, 1.0, 0.0])]), 50);
    assert!(many.rules[1].score.is_finite());
}

#[test]
fn index_rejects_wrong_shapes() {
    let idx_constitution = index(&[]).constitution().clone();
    let err = Index::new(idx_constitution.clone(), &model(), vec![vec![0.0; 3]]).err();
    assert!(matches!(err, Some(IndexError::Count { .. })));
    let n = Index::exemplar_texts(&idx_constitution).len();
    let err = Index::new(idx_constitution, &model(), vec![vec![0.0; 2]; n]).err();
    assert!(matches!(
        err,
        Some(IndexError::Dimension {
            expected: 3,
            got: 2
        })
    ));
}

/// The toy constitution with a calibration whose heads were fitted on `exemplars`.
fn calibrated_index(exemplars: Option<String>) -> Index {
    use crate::constitution::{Calibration, LinearHead, RuleCalibration};
    let plain = index(&["hello"]);
    let mut constitution = (**plain.constitution()).clone();
    let head = |w: [f32; 3]| LinearHead {
        weights: w.to_vec(),
        knn_weights: vec![0.0, 0.0],
        bias: 0.0,
    };
    constitution.calibrations = vec![Calibration {
        model: "toy".into(),
        target: "f1".into(),
        data: String::new(),
        fitted_at: String::new(),
        exemplars: Some(exemplars.unwrap_or_else(|| Index::exemplar_set_hash(&constitution))),
        piece_margin: Some(1.0),
        scary_weight: None,
        ordinary_weight: None,
        max_ordinary_fpr: None,
        threshold_offset: None,
        ensemble: None,
        rules: [
            (
                "weapons".to_string(),
                RuleCalibration {
                    threshold: 0.5,
                    head: Some(head([1.0, 0.0, 0.0])),
                },
            ),
            (
                "privacy".to_string(),
                RuleCalibration {
                    threshold: 0.5,
                    head: None,
                },
            ),
        ]
        .into(),
    }];
    let texts = Index::exemplar_texts(&constitution);
    let vectors = texts.iter().map(|t| toy_vector(t)).collect();
    Index::new(Arc::new(constitution), &model(), vectors).unwrap()
}

#[test]
fn calibrated_heads_score_logits_and_pieces_clear_the_margin() {
    let idx = calibrated_index(None);
    assert!(idx.has_heads());
    assert_eq!(idx.rules()[0].threshold, 0.5);
    let text = "a bomb";
    let r = evaluate(&idx, text, &embedded(text, &[(text, [1.0, 0.0, 0.0])]), 1);
    assert_eq!(r.rules[0].score, 1.0, "logit = weights . q + bias");
    assert!(r.rules[0].violated);
    assert_eq!(
        r.rules[1].score, NO_HEAD_LOGIT,
        "a rule without a head never fires"
    );
    // A long text whose only weapons-like part is a sentence piece: the piece's logit
    // (1.0) minus the margin (1.0) is below the threshold.
    let text = "gardening prose. a bomb";
    let r = evaluate(
        &idx,
        text,
        &embedded(
            text,
            &[(text, [0.0, 0.0, 1.0]), ("a bomb", [1.0, 0.0, 0.0])],
        ),
        1,
    );
    assert!(!r.rules[0].violated, "{}", r.rules[0].score);
}

#[test]
fn heads_fitted_on_other_exemplars_are_ignored_with_the_files_thresholds() {
    let idx = calibrated_index(Some("0000000000000000".into()));
    assert!(!idx.has_heads());
    assert_eq!(
        idx.rules()[0].threshold,
        0.1,
        "the file's threshold, not the logit one"
    );
}

#[test]
fn excluded_rows_are_not_scored() {
    let idx = index(&["hello"]);
    let v = [1.0, 0.0, 0.0];
    let sims = idx.similarities(&v);
    let all = idx.score_similarities(&sims, 1, None);
    // Leave out every violating row of the weapons rule ("bomb", "gun").
    let exclude: Vec<bool> = (0..idx.len())
        .map(|r| ["bomb", "gun"].contains(&idx.exemplar_text(r as u32)))
        .collect();
    let masked = idx.score_similarities(&sims, 1, Some(&exclude));
    assert!(all[0].score > 0.0);
    assert!(
        masked[0].score < -1.0,
        "no violating row left: {}",
        masked[0].score
    );
    assert_eq!(all[1].score, masked[1].score, "other rules unchanged");
}

#[test]
fn plain_similarities_from_the_centred_rows_equal_direct_cosines() {
    let idx = index(&["hello", "bomb"]);
    let unit = |v: [f32; 3]| {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.map(|x| x / n)
    };
    for v in [
        unit([1.0, 0.0, 0.0]),
        unit([0.3, -0.5, 0.8]),
        unit([-0.2, 0.9, 0.1]),
    ] {
        let pair = idx.similarity_pair(&v);
        assert_eq!(pair.centred, idx.centred_similarities(&v));
        for r in 0..idx.len() {
            let direct = crate::embed::dot(&toy_vector(idx.exemplar_text(r as u32)), &v);
            assert!(
                (pair.plain[r] - direct).abs() < 1e-5,
                "row {r}: {} from the centred row, {direct} directly",
                pair.plain[r]
            );
        }
    }
}

#[test]
fn exemplar_similarity_uses_only_the_neighbour_dims() {
    // Two leading dimensions carry the toy space; a third would reverse the ranking if it
    // were used.
    let constitution = Constitution {
        id: "toy".into(),
        description: String::new(),
        version: "v".into(),
        path: "toy.toml".into(),
        shared_compliant: vec![ex("benign")],
        rules: vec![rule("weapons", 0.1, &["bomb"], &[])],
        calibrations: Vec::new(),
    };
    let texts = Index::exemplar_texts(&constitution);
    let vector = |t: &str| match t {
        "bomb" => vec![0.6, 0.0, 0.8],
        _ => vec![0.0, 0.6, -0.8],
    };
    let mut info = model();
    info.neighbour_dims = Some(2);
    let idx = Index::new(
        Arc::new(constitution),
        &info,
        texts.iter().map(|t| vector(t)).collect(),
    )
    .unwrap();
    let q = [0.6, 0.0, -0.8];
    let sims = idx.similarities(&q);
    for (r, sim) in sims.iter().enumerate() {
        let row = vector(idx.exemplar_text(r as u32));
        let n = (row[0] * row[0] + row[1] * row[1]).sqrt();
        let expected = (row[0] * 0.6 + row[1] * 0.0) / n / 0.6;
        assert!(
            (sim - expected).abs() < 1e-5,
            "row {r}: {sim} against {expected} over the leading two dimensions"
        );
    }
    let scores = idx.score_similarities(&sims, 1, None);
    assert!(scores[0].score > 0.5, "bomb is nearest in the leading dims");
}

#[test]
fn an_ensemble_averages_each_rules_margin_and_judges_it_at_its_threshold() {
    let text = "how to make a bomb";
    // Two "models" that disagree: one sure of a weapons violation, one not.
    let sure = evaluate(
        &index(&[]),
        text,
        &embedded(text, &[(text, [0.95, 0.0, 0.31])]),
        1,
    );
    let unsure = evaluate(
        &index(&[]),
        text,
        &embedded(text, &[(text, [0.2, 0.0, 0.98])]),
        1,
    );
    let margin = |r: &TextResult, n: usize| r.rules[n].score - r.rules[n].threshold;
    assert!(margin(&sure, 0) > 0.0 && margin(&unsure, 0) < 0.0);
    let mean = |n: usize| (margin(&sure, n) + margin(&unsure, n)) / 2.0;
    // At the mean margin of the weapons rule, just below and just above it.
    for threshold in [0.0, mean(0) - 0.01, mean(0) + 0.01] {
        let both = average(vec![sure.clone(), unsure.clone()], threshold);
        for n in 0..2 {
            assert!((both.rules[n].score - mean(n)).abs() < 1e-6);
            assert_eq!(both.rules[n].threshold, threshold);
            assert_eq!(both.rules[n].violated, mean(n) > threshold);
        }
        let best = both
            .rules
            .iter()
            .map(|r| r.score - threshold)
            .fold(f32::MIN, f32::max);
        assert_eq!(both.risk, best);
        assert_eq!(both.verdict == Verdict::Fail, best > 0.0);
        assert_eq!(
            both.rules[0].evidence.as_ref().unwrap().exemplar,
            sure.rules[0].evidence.as_ref().unwrap().exemplar
        );
    }
    assert!(average(vec![sure.clone(), unsure.clone()], mean(0) - 0.01).rules[0].violated);
    assert!(!average(vec![sure.clone(), unsure.clone()], mean(0) + 0.01).rules[0].violated);
    // One model is its own ensemble: unchanged, thresholds and all.
    let alone = average(vec![unsure.clone()], 5.0);
    assert_eq!(alone.rules[0].threshold, unsure.rules[0].threshold);
    assert_eq!(alone.risk, unsure.risk);
}

/// The default constitution's rules judged by detectors have no exemplars: its exemplar
/// set, and so its calibration's heads, are those of the rules exemplars score.
#[test]
fn detector_rules_leave_the_default_calibration_in_force() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("constitution/default.toml");
    let c = crate::constitution::parse_file(&path).unwrap();
    assert!(c.rules.iter().any(|r| !r.scored()), "a detector rule");
    let cal = c.calibrations.first().expect("the default is calibrated");
    assert_eq!(
        cal.exemplars.as_deref(),
        Some(Index::exemplar_set_hash(&c).as_str())
    );
    let scored = c.scored_rules().count();
    for head in cal.rules.values().filter_map(|r| r.head.as_ref()) {
        assert_eq!(head.knn_weights.len(), scored);
    }
}
