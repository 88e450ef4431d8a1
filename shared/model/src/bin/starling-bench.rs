//! starling-bench: performance figures as JSON lines (one line per measurement).
//!
//! `train --config S|M [--quant f32|q8_0|q4_0] [--backend flex|ndarray]`: forward + backward +
//! AdamW on LoRA r=8 over q,k,v,o with a frozen base; `decode --config S|M --quant ...`: greedy
//! decoding with the KV cache. Each line carries tokens/s, an MFU estimate and peak RSS.
//! `privacy`: exact Gaussian noise samples/s of Starling's sampler beside opendp's own, and the time to
//! noise a 1M-parameter delta.

use std::time::Instant;

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};
use starling_model::generate::SamplingConfig;
use starling_model::{
    generate, Backend, Llama, LlamaConfig, LoraAdapter, LoraConfig, QuantType, Target, TrainConfig,
    Trainer,
};
use starling_privacy::noise::{invoke_opendp, opendp_gaussian};
use starling_privacy::GaussianMechanism;

/// Benchmark model shapes of the issue.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum Shape {
    #[value(name = "S", alias = "s")]
    /// hidden 256, 4 layers, 4 heads, 2 kv heads, intermediate 688, vocab 512, seq 128, batch 8.
    S,
    #[value(name = "M", alias = "m")]
    /// SmolLM2-135M: hidden 576, 30 layers, 9 heads, 3 kv heads, intermediate 1536, vocab 49152.
    M,
}

impl Shape {
    fn config(self) -> (LlamaConfig, usize, usize) {
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

#[derive(Parser)]
#[command(about = "Starling benchmarks; every figure is printed as one JSON line")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// LoRA training throughput (forward + backward + AdamW).
    Train {
        #[arg(long, value_enum, default_value_t = Shape::S)]
        config: Shape,
        #[arg(long, value_enum, default_value_t = QuantType::Q8_0)]
        quant: QuantType,
        #[arg(long, value_enum, default_value_t = Backend::Flex)]
        backend: Backend,
        /// Timed optimizer steps (after one warm-up step).
        #[arg(long, default_value_t = 5)]
        steps: usize,
    },
    /// Decoding throughput with the KV cache (batch 1, greedy).
    Decode {
        #[arg(long, value_enum, default_value_t = Shape::S)]
        config: Shape,
        #[arg(long, value_enum, default_value_t = QuantType::Q8_0)]
        quant: QuantType,
        #[arg(long, value_enum, default_value_t = Backend::Flex)]
        backend: Backend,
        /// New tokens to decode.
        #[arg(long, default_value_t = 64)]
        tokens: usize,
    },
    /// Gaussian-noise throughput: Starling's exact sampler beside opendp's on the same vectors.
    Privacy {
        /// Vector lengths noised by Starling's sampler.
        #[arg(long, value_delimiter = ',', default_value = "10000,100000,1000000")]
        sizes: Vec<usize>,
        /// Vector length noised by opendp's own (slow, arbitrary-precision) sampler.
        #[arg(long, default_value_t = 20_000)]
        opendp_size: usize,
        /// Noise multiplier σ/C (C = 1).
        #[arg(long, default_value_t = 1.0)]
        noise_multiplier: f64,
        /// Timed repetitions per size (the best is reported).
        #[arg(long, default_value_t = 3)]
        repeats: usize,
    },
}

/// Peak resident set size of this process in bytes (Linux VmHWM).
fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Peak f32 FLOP/s of this machine's cores: cores × 2 FMA units × 8 lanes (AVX2) × 2 × clock.
fn peak_flops() -> f64 {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let mhz = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("cpu MHz"))
                .and_then(|l| l.split(':').nth(1)?.trim().parse::<f64>().ok())
        })
        .unwrap_or(2500.0);
    cores * 2.0 * 8.0 * 2.0 * mhz * 1e6
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Train {
            config,
            quant,
            backend,
            steps,
        } => {
            let (c, seq, batch) = config.config();
            let device = backend.device();
            let model = Llama::random(c.clone(), quant, &device, 1)?;
            let lora =
                LoraConfig::new(8, 16.0, 0.0, &[Target::Q, Target::K, Target::V, Target::O])?;
            let adapter = LoraAdapter::new(&c, lora, &device, 2);
            let cfg = TrainConfig {
                steps: steps + 1,
                batch_size: batch,
                seq_len: seq,
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
                    "bench": "train", "config": format!("{config:?}"), "quant": quant.name(), "backend": backend.name(),
                    "batch": batch, "seq": seq, "lora_rank": 8, "steps": steps, "seconds": secs,
                    "tokens_per_s": tokens / secs, "gflops": flops / secs / 1e9, "mfu": flops / secs / peak_flops(),
                    "final_loss": loss, "peak_rss_bytes": peak_rss(),
                    "resident_weight_bytes": model.resident_weight_bytes(),
                })
            );
        }
        Cmd::Decode {
            config,
            quant,
            backend,
            tokens,
        } => {
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
        }
        Cmd::Privacy {
            sizes,
            opendp_size,
            noise_multiplier,
            repeats,
        } => bench_privacy(&sizes, opendp_size, noise_multiplier, repeats.max(1))?,
    }
    Ok(())
}

/// Prints one JSON line per (sampler, size): samples/s and the time to noise the vector once.
fn bench_privacy(sizes: &[usize], opendp_size: usize, sigma: f64, repeats: usize) -> Result<()> {
    let threads = rayon::current_num_threads();
    let line = |sampler: &str, k: Option<i32>, n: usize, secs: f64| {
        println!(
            "{}",
            serde_json::json!({
                "bench": "privacy", "sampler": sampler, "noise_multiplier": sigma, "granularity_exponent": k,
                "size": n, "seconds": secs, "samples_per_s": n as f64 / secs,
                "seconds_per_1m": secs * 1e6 / n as f64, "threads": threads, "peak_rss_bytes": peak_rss(),
            })
        );
    };
    for &n in sizes {
        let mech = GaussianMechanism::with_multiplier(1.0, sigma, n)?;
        let mut v: Vec<f32> = (0..n).map(|i| ((i % 97) as f32 - 48.0) * 1e-3).collect();
        let mut best = f64::INFINITY;
        for _ in 0..repeats {
            let t = Instant::now();
            mech.add_noise(&mut v)?;
            best = best.min(t.elapsed().as_secs_f64());
        }
        line("starling", Some(mech.granularity_exponent()), n, best);
    }
    let n = opendp_size.max(1);
    let v: Vec<f32> = (0..n).map(|i| ((i % 97) as f32 - 48.0) * 1e-3).collect();
    let ours = GaussianMechanism::with_multiplier(1.0, sigma, n)?;
    let t = Instant::now();
    invoke_opendp(ours.opendp_measurement(), &v)?;
    line(
        "opendp",
        Some(ours.granularity_exponent()),
        n,
        t.elapsed().as_secs_f64(),
    );
    // opendp with its own default granularity: what a caller of make_gaussian gets without choosing k.
    let default_k = opendp_gaussian(ours.scale(), n, None)?;
    let t = Instant::now();
    invoke_opendp(&default_k, &v)?;
    line("opendp_default_k", None, n, t.elapsed().as_secs_f64());
    Ok(())
}
