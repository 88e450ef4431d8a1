//! Quality of the shipped default base model and of its quantized forms, on held-out real text
//! (Hamlet was never seen in pretraining; see scripts/pretrain_base.py).

use std::path::Path;

use starling_model::data::TextData;
use starling_model::{eval_loss, Backend, Llama, QuantType, Tokenizer};

#[test]
fn quantized_perplexity_stays_close_to_f32_on_held_out_text() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = root.join("assets/models/starling-tiny");
    let tok = Tokenizer::for_model_dir(&dir, 259).unwrap();
    let tokens = TextData::eval_only(&root.join("assets/shakespeare/hamlet.txt"), &tok).unwrap();
    let device = Backend::default().device();
    let ppl = |q: QuantType| {
        let m = Llama::load(&dir, Some(q), &device).unwrap();
        eval_loss(&m, None, &tokens, 128, 48, 8).unwrap().exp()
    };
    let (f32_ppl, q8, q4) = (
        ppl(QuantType::F32),
        ppl(QuantType::Q8_0),
        ppl(QuantType::Q4_0),
    );
    println!("held-out perplexity per byte: f32 {f32_ppl:.4}  q8_0 {q8:.4}  q4_0 {q4:.4}");
    assert!(
        f32_ppl < 6.5,
        "the default model should have learned English: {f32_ppl}"
    );
    assert!(
        (q8 / f32_ppl - 1.0).abs() < 0.01,
        "q8_0 {q8} vs f32 {f32_ppl}"
    );
    assert!(q4 / f32_ppl - 1.0 < 0.08, "q4_0 {q4} vs f32 {f32_ppl}");
}
