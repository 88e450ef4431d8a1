//! Model benchmarks: LoRA training (forward + backward + AdamW, frozen base) and KV-cache decoding on
//! random weights of a named shape, with tokens/s, an MFU estimate and peak RSS.

use std::time::Instant;

use anyhow::Result;
use clap::ValueEnum;
use starling_model::generate::SamplingConfig;
use starling_model::{
    generate, Backend, Llama, LlamaConfig, LoraAdapter, LoraConfig, QuantType, Target, TrainConfig,
    Trainer,
};

use starling_model::train::Engine;

use super::peak_rss;

/// Benchmark model shapes.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Shape {
    #[value(name = "S", alias = "s")]
    /// hidden 256, 4 layers, 4 heads, 2 kv heads, intermediate 688, vocab 512, seq 128, batch 8.
    S,
    #[value(name = "M", alias = "m")]
    /// SmolLM2-135M: hidden 576, 30 layers, 9 heads, 3 kv heads, intermediate 1536, vocab 49152.
    M,
}

impl Shape {
    /// The model configuration, sequence length and batch of the shape.
    pub fn config(self) -> (LlamaConfig, usize, usize) {
        let (h, l, nh, nkv, i, v, tied, seq, batch) = match self {
            Shape::S => (256, 4, 4, 2, 688, 512, false, 128, 8),
            Shape::M => (576, 30, 9, 3, 1536, 49152, true, 256, 4),
        };
        let c = LlamaConfig {
            vocab_size: v,
            hidden_size: h,
            intermediate_size: i,
            num_hidden_layers: l,
            num_attention_heads: nh,
            num_key_value_heads: nkv,
            head_dim: h / nh,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            tie_word_embeddings: tied,
            max_position_embeddings: 2048,
            bos_token_id: None,
            eos_token_ids: vec![],
        };
        (c, seq, batch)
    }
}

/// Peak f32 FLOP/s of this machine's cores at the clock /proc/cpuinfo reports: cores × 2 FMA pipes × lanes
/// × 2 × clock, with 8 lanes (AVX2) except on AMD Zen 1 (family 0x17, model < 0x30), whose FMA pipes are
/// 128 bits wide (4 lanes). Boost clocks above the reported one make the resulting MFU an overestimate.
pub fn peak_flops() -> f64 {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| -> Option<String> {
        info.lines()
            .find(|l| l.split(':').next().is_some_and(|k| k.trim() == name))
            .and_then(|l| l.split(':').nth(1))
            .map(|v| v.trim().to_string())
    };
    let mhz = field("cpu MHz")
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(2500.0);
    let zen1 = field("vendor_id").as_deref() == Some("AuthenticAMD")
        && field("cpu family").as_deref() == Some("23")
        && field("model")
            .and_then(|v| v.parse::<u32>().ok())
            .is_some_and(|m| m < 0x30);
    let lanes = if zen1 { 4.0 } else { 8.0 };
    cores * 2.0 * lanes * 2.0 * mhz * 1e6
}

/// Times `steps` LoRA training steps (r = 8 over q, k, v, o) after one warm-up step; prints one line.
pub fn train(
    config: Shape,
    quant: QuantType,
    engine: Engine,
    backend: Backend,
    steps: usize,
) -> Result<()> {
    let (c, seq, batch) = config.config();
    let device = backend.device();
    let model = Llama::random(c.clone(), quant, &device, 1)?;
    let lora = LoraConfig::new(8, 16.0, 0.0, &[Target::Q, Target::K, Target::V, Target::O])?;
    let adapter = LoraAdapter::new(&c, lora, &device, 2);
    let cfg = TrainConfig {
        steps: steps + 1,
        batch_size: batch,
        seq_len: seq,
        engine,
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(adapter, cfg)?;
    let ids: Vec<u32> = (0..batch * seq)
        .map(|i| ((i * 7919 + 13) % c.vocab_size) as u32)
        .collect();
    trainer.step(&model, std::slice::from_ref(&ids))?; // warm-up
    let t = Instant::now();
    let mut loss = 0.0;
    for _ in 0..steps {
        loss = trainer.step(&model, std::slice::from_ref(&ids))?.loss;
    }
    let secs = t.elapsed().as_secs_f64();
    let tokens = (steps * batch * seq) as f64;
    // Frozen base: forward + input-gradient backward ≈ 2 × forward FLOPs (no weight grads).
    let flops = 2.0 * c.flops_per_token(seq / 2) * tokens;
    println!(
        "{}",
        serde_json::json!({
            "bench": "train", "config": format!("{config:?}"), "quant": quant.name(), "engine": engine.name(),
            "backend": backend.name(), "threads": rayon::current_num_threads(), "batch": batch, "seq": seq, "lora_rank": 8, "steps": steps, "seconds": secs,
            "tokens_per_s": tokens / secs, "gflops": flops / secs / 1e9, "mfu": flops / secs / peak_flops(),
            "peak_gflops": peak_flops() / 1e9, "final_loss": loss, "peak_rss_bytes": peak_rss(),
            "resident_weight_bytes": model.resident_weight_bytes(),
        })
    );
    Ok(())
}

/// Times greedy decoding of `tokens` new tokens with the KV cache (batch 1); prints one line.
pub fn decode(config: Shape, quant: QuantType, backend: Backend, tokens: usize) -> Result<()> {
    let (c, _, _) = config.config();
    let device = backend.device();
    let model = Llama::random(c.clone(), quant, &device, 1)?;
    let prompt: Vec<u32> = (0..16).map(|i| (i * 31 % c.vocab_size) as u32).collect();
    let cfg = SamplingConfig {
        max_new_tokens: tokens,
        temperature: 0.0,
        ..SamplingConfig::default()
    };
    let _ = generate(
        &model,
        None,
        &prompt,
        &SamplingConfig {
            max_new_tokens: 2,
            ..cfg.clone()
        },
    )?;
    let t = Instant::now();
    let out = generate(&model, None, &prompt, &cfg)?;
    let secs = t.elapsed().as_secs_f64();
    let n = out.len() as f64;
    let flops = c.flops_per_token(16 + out.len() / 2) * n;
    println!(
        "{}",
        serde_json::json!({
            "bench": "decode", "config": format!("{config:?}"), "quant": quant.name(), "backend": backend.name(),
            "new_tokens": out.len(), "seconds": secs, "tokens_per_s": n / secs,
            "gflops": flops / secs / 1e9, "mfu": flops / secs / peak_flops(),
            "peak_rss_bytes": peak_rss(), "resident_weight_bytes": model.resident_weight_bytes(),
            "weight_bytes_per_param": model.resident_weight_bytes() as f64 / c.num_parameters() as f64,
        })
    );
    Ok(())
}
