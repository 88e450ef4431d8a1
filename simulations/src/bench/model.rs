//! Model benchmarks: LoRA training (forward + backward + AdamW, frozen base) and KV-cache decoding on
//! random weights of a named shape, with tokens/s, an MFU estimate and peak RSS.

use std::time::Instant;

use anyhow::Result;
use clap::ValueEnum;
use std::sync::Arc;

use starling_model::infer::Runner;
use starling_model::kernels::Isa;
use starling_model::pool::Pool;
use starling_model::{
    Backend, KvCache, Llama, LlamaConfig, LoraAdapter, LoraConfig, QuantType, Target, TrainConfig,
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
            qkv_bias: false,
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
            // What the frozen-weight products ran in (native-bf16 runs f32 on CPUs without AVX512-BF16).
            "products": engine.precision().unwrap_or_default().effective().name(),
        })
    );
    Ok(())
}

/// Which implementation `decode` times.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum InferPath {
    /// The native inference path (integer kernels, thread pool): what devices run.
    Native,
    /// The burn model with its KV cache (the reference).
    Burn,
}

/// Arguments of `starling-bench decode`.
#[derive(Debug, Clone, clap::Args)]
pub struct DecodeArgs {
    /// Model shape (random weights).
    #[arg(long, value_enum, default_value_t = Shape::S)]
    pub config: Shape,
    /// Storage of the weights.
    #[arg(long, value_enum, default_value_t = QuantType::Q8_0)]
    pub quant: QuantType,
    /// Implementation timed.
    #[arg(long, value_enum, default_value_t = InferPath::Native)]
    pub path: InferPath,
    /// burn backend (the burn path only).
    #[arg(long, value_enum, default_value_t = Backend::Flex)]
    pub backend: Backend,
    /// Prompt tokens (timed as prefill).
    #[arg(long, default_value_t = 32)]
    pub prompt: usize,
    /// New tokens decoded one at a time after the prompt.
    #[arg(long, default_value_t = 128)]
    pub tokens: usize,
    /// Threads of the native path (default: one per core; the burn path uses rayon's).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Also write the random weights as GGUF here, so llama.cpp can run the very same model
    /// (`scripts/bench_llamacpp.py`).
    #[arg(long)]
    pub gguf_out: Option<std::path::PathBuf>,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// Times a prefill of `prompt` tokens and the greedy decoding of `tokens` more (batch 1, KV
/// cache); prints one line.
pub fn decode(a: &DecodeArgs) -> Result<()> {
    let (c, _, _) = a.config.config();
    let device = a.backend.device();
    let model = Arc::new(Llama::random(c.clone(), a.quant, &device, a.seed)?);
    if let Some(out) = &a.gguf_out {
        let g = starling_model::gguf::export(&model, &starling_model::Tokenizer::Byte)?;
        starling_model::io::write_atomic(out, &g.to_bytes())?;
    }
    let prompt: Vec<u32> = (0..a.prompt.max(1))
        .map(|i| (i * 31 % c.vocab_size) as u32)
        .collect();
    let threads = a
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let argmax = |l: &[f32]| {
        l.iter()
            .enumerate()
            .fold(
                (0, f32::NEG_INFINITY),
                |b, (i, &v)| if v > b.1 { (i, v) } else { b },
            )
            .0 as u32
    };
    let (prefill_s, decode_s, isa) = match a.path {
        InferPath::Native => {
            let runner = Runner::with(
                model.clone(),
                None,
                Arc::new(Pool::new(threads)),
                Isa::detect(),
            )?;
            // Warm-up: page the weights in and let the workers start.
            runner.session().next_logits(&prompt[..1])?;
            let mut s = runner.session();
            let t = Instant::now();
            let mut next = argmax(&s.next_logits(&prompt)?);
            let prefill_s = t.elapsed().as_secs_f64();
            let t = Instant::now();
            for _ in 0..a.tokens {
                next = argmax(&s.next_logits(&[next])?);
            }
            (prefill_s, t.elapsed().as_secs_f64(), runner.isa().name())
        }
        InferPath::Burn => {
            let run = |ids: &[u32], cache: &mut KvCache| -> Result<u32> {
                Ok(argmax(&model.next_logits(ids, None, cache)?))
            };
            run(&prompt[..1], &mut KvCache::new())?;
            let mut cache = KvCache::new();
            let t = Instant::now();
            let mut next = run(&prompt, &mut cache)?;
            let prefill_s = t.elapsed().as_secs_f64();
            let t = Instant::now();
            for _ in 0..a.tokens {
                next = run(&[next], &mut cache)?;
            }
            (prefill_s, t.elapsed().as_secs_f64(), "burn")
        }
    };
    let n = a.tokens as f64;
    let flops = c.flops_per_token(prompt.len() + a.tokens / 2) * n;
    let weights = model.resident_weight_bytes() as f64;
    println!(
        "{}",
        serde_json::json!({
            "bench": "decode", "config": format!("{:?}", a.config), "quant": a.quant.name(),
            "path": format!("{:?}", a.path).to_lowercase(), "isa": isa, "threads": threads,
            "prompt_tokens": prompt.len(), "new_tokens": a.tokens,
            "prefill_seconds": prefill_s, "prefill_tokens_per_s": prompt.len() as f64 / prefill_s,
            "decode_seconds": decode_s, "decode_tokens_per_s": n / decode_s,
            "decode_gflops": flops / decode_s / 1e9,
            // Every weight is read once per decoded token: the memory traffic it sustains.
            "decode_weight_gb_per_s": weights * n / decode_s / 1e9,
            "peak_rss_bytes": peak_rss(), "resident_weight_bytes": model.resident_weight_bytes(),
            "weight_bytes_per_param": weights / c.num_parameters() as f64,
        })
    );
    Ok(())
}
