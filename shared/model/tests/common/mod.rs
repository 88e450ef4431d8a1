//! Helpers shared by the model crate's integration tests. Only test fixtures live here.

use burn::tensor::{Tensor, TensorData};
use starling_model::{Llama, LlamaConfig, LoraAdapter, LoraConfig, Target};

/// Largest |x − y| relative to the largest |y|.
#[allow(dead_code)] // not every test file that includes this module uses it
pub fn rel_diff(x: &[f32], y: &[f32]) -> f32 {
    assert_eq!(x.len(), y.len());
    let scale = y.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-12);
    x.iter()
        .zip(y)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()))
        / scale
}

/// A two-layer model shape with `heads` query and `kv` key/value heads (vocabulary 61, hidden 64,
/// intermediate 96, rotary base 500, 256 positions), tied or untied head.
#[allow(dead_code)] // not every test file that includes this module uses it
pub fn small_config(heads: usize, kv: usize, tied: bool) -> LlamaConfig {
    LlamaConfig {
        vocab_size: 61,
        hidden_size: 64,
        intermediate_size: 96,
        num_hidden_layers: 2,
        num_attention_heads: heads,
        num_key_value_heads: kv,
        head_dim: 64 / heads,
        rms_norm_eps: 1e-5,
        rope_theta: 500.0,
        tie_word_embeddings: tied,
        max_position_embeddings: 256,
        bos_token_id: None,
        eos_token_ids: vec![],
        qkv_bias: false,
    }
}

/// A rank-4, α = 8 adapter on `targets` whose A and B hold a fixed pattern of multiples of `step`
/// (|value| ≤ 8·`step`): B is non-zero, so every gradient path is exercised, and the values are the
/// same on every run.
pub fn patterned_adapter(m: &Llama, targets: &[Target], dropout: f32, step: f32) -> LoraAdapter {
    let mut a = LoraAdapter::new(
        &m.config,
        LoraConfig::new(4, 8.0, dropout, targets).unwrap(),
        &m.device,
        3,
    );
    for (i, t) in a.tensors_mut().into_iter().enumerate() {
        let dims = t.dims();
        let vals: Vec<f32> = (0..dims[0] * dims[1])
            .map(|j| (((i * 131 + j * 7) % 17) as f32 - 8.0) * step)
            .collect();
        *t = Tensor::from_data(TensorData::new(vals, dims), &m.device);
    }
    a
}
