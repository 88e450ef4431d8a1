//! Starling's GGUF export runs in llama.cpp: the shipped model at Q8_0, exported, gives llama.cpp logits
//! (committed fixture, made by scripts/check_gguf_llamacpp.py with llama-cpp-python) within the
//! activation-quantization tolerance of Starling's own, with the same next token at every position.

use std::path::Path;

use starling_model::gguf::{export, import, Gguf};
use starling_model::{Backend, Llama, QuantType};

#[test]
fn the_exported_model_gives_llama_cpps_logits() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("shared/model/fixtures/gguf/llamacpp_logits.json"))
            .unwrap(),
    )
    .unwrap();
    let ids: Vec<u32> = fixture["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    let theirs: Vec<Vec<f32>> = fixture["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect();
    let device = Backend::default().device();
    let model = Llama::load(
        &root.join("assets/models/starling-tiny"),
        Some(QuantType::Q8_0),
        &device,
    )
    .unwrap();
    // Through the GGUF bytes llama.cpp read, and back.
    let path = Path::new("starling-tiny-q8.gguf");
    let g = Gguf::parse(
        &export(&model, &starling_model::Tokenizer::Byte)
            .unwrap()
            .to_bytes(),
        path,
    )
    .unwrap();
    let back = import(&g, path, None, &device).unwrap();
    let ours: Vec<f32> = back
        .forward(&ids, 1, None, None, None)
        .unwrap()
        .into_data()
        .iter::<f32>()
        .collect();
    let vocab = model.config.vocab_size;
    let (mut max, mut agree) = (0f32, 0);
    for (p, row) in theirs.iter().enumerate() {
        let mine = &ours[p * vocab..(p + 1) * vocab];
        for (a, b) in mine.iter().zip(row) {
            max = max.max((a - b).abs());
        }
        let argmax = |v: &[f32]| (0..v.len()).fold(0, |m, i| if v[i] > v[m] { i } else { m });
        agree += usize::from(argmax(mine) == argmax(row));
    }
    println!(
        "llama.cpp vs Starling: max |Δlogit| {max}, argmax agree {agree}/{}",
        theirs.len()
    );
    assert_eq!(theirs.len(), ids.len());
    assert!(max <= 0.15, "max |Δlogit| {max}");
    assert_eq!(agree, theirs.len());
}
