//! `starling-client finetune`: LoRA fine-tuning on local text without a coordinator — train/eval loss,
//! DP-SGD and user-level clipping, a PEFT adapter written out, samples before and after. The device's
//! tool for trying a model on its own text; federated training is `run` (crate::driver).
//!
//! This is the binary's edge, so errors are `anyhow` with context.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use starling_cli::{sample_text, ModelOpts, SampleOpts};
use starling_model::data::{text_files, Batcher, TextData};
use starling_model::dp::{user_level_delta, DpSgd, DpSgdConfig};
use starling_model::train::Engine;
use starling_model::{eval_loss, LoraAdapter, LoraConfig, Optimizer, Target, TrainConfig, Trainer};

/// Arguments of `finetune`.
#[derive(Debug, Clone, Args)]
pub struct FinetuneArgs {
    /// Model and backend.
    #[command(flatten)]
    pub model: ModelOpts,
    /// Text files or directories of .txt files to train on.
    #[arg(long, num_args = 1.., default_value = "assets/shakespeare/sonnets.txt")]
    pub data: Vec<PathBuf>,
    /// Where to write the PEFT adapter.
    #[arg(long, default_value = "runs/adapter")]
    pub out: PathBuf,
    /// Optimizer steps.
    #[arg(long, default_value_t = 60)]
    pub steps: usize,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 128)]
    pub seq: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// LoRA alpha.
    #[arg(long, default_value_t = 16.0)]
    pub alpha: f32,
    /// LoRA dropout.
    #[arg(long, default_value_t = 0.0)]
    pub dropout: f32,
    /// Adapted projections (comma-separated: q,k,v,o,gate,up,down).
    #[arg(long, value_delimiter = ',', default_value = "q,k,v,o")]
    pub targets: Vec<String>,
    /// Peak learning rate.
    #[arg(long, default_value_t = 3e-3)]
    pub lr: f64,
    /// Warm-up steps.
    #[arg(long, default_value_t = 6)]
    pub warmup: usize,
    /// Decoupled weight decay.
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Update rule: `adamw` or `sgd`.
    #[arg(long, value_enum, default_value_t = Optimizer::AdamW)]
    pub optimizer: Optimizer,
    /// Gradient-norm clip (0 disables).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Fraction of each file held out for evaluation.
    #[arg(long, default_value_t = 0.1)]
    pub eval_fraction: f64,
    /// Seed of initialisation, batches and dropout.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Gradient implementation: `native` (fast, hand-derived backward) or `burn` (burn's autodiff,
    /// the reference; honours --backend).
    #[arg(long, value_enum, default_value_t = Engine::Native)]
    pub engine: Engine,
    /// Prompt to sample before and after training (empty: no samples).
    #[arg(long, default_value = "Shall I compare thee")]
    pub sample: String,
    /// Differential privacy (DP-SGD, user-level clipping).
    #[command(flatten)]
    pub dp: DpOpts,
}

/// Differential-privacy options of `finetune`.
#[derive(Debug, Clone, Args)]
pub struct DpOpts {
    /// DP-SGD noise multiplier σ (> 0 turns DP-SGD on: Poisson sampling, per-example clipping, Gaussian noise).
    #[arg(long, default_value_t = 0.0)]
    pub dp_noise_multiplier: f64,
    /// DP-SGD per-example gradient clip bound C.
    #[arg(long, default_value_t = 1.0)]
    pub dp_clip: f64,
    /// DP-SGD Poisson sampling rate q (default: --batch / number of training sequences).
    #[arg(long)]
    pub dp_sampling_rate: Option<f64>,
    /// δ at which ε is reported and budgeted.
    #[arg(long, default_value_t = 1e-5)]
    pub dp_delta: f64,
    /// Example-level ε budget: the run is refused before it starts if it would exceed it.
    #[arg(long)]
    pub dp_epsilon_budget: Option<f64>,
    /// Accountant for ε.
    #[arg(long, value_enum, default_value_t = starling_privacy::AccountantKind::Pld)]
    pub accountant: starling_privacy::AccountantKind,
    /// User-level DP: clip the whole adapter delta to this L2 norm after training (0: off).
    #[arg(long, default_value_t = 0.0)]
    pub user_clip: f64,
    /// User-level DP: noise multiplier of the delta's noise (this client's share when --user-noise-clients > 1).
    #[arg(long, default_value_t = 0.0)]
    pub user_noise_multiplier: f64,
    /// User-level DP: clients whose noise shares add up to the full noise (distributed DP-FedAvg).
    #[arg(long, default_value_t = 1)]
    pub user_noise_clients: u32,
}

/// `finetune`: LoRA fine-tuning with a progress bar, train/eval loss, adapter written in PEFT format.
pub fn run_finetune(a: &FinetuneArgs) -> anyhow::Result<()> {
    let (model, init, tok) = a.model.load()?;
    let files = text_files(&a.data)?;
    // Chat data (*.jsonl) is rendered with the model's own template and trains on assistant turns.
    let chat = starling_model::chat::ChatTemplate::load(&a.model.model)?;
    let data = TextData::load(&files, &tok, a.eval_fraction, chat.as_ref())?;
    eprintln!(
        "model {} ({} params, {} base, {:.1} MB resident), {} train / {} eval tokens from {} file(s)",
        a.model.model.display(),
        model.config.num_parameters(),
        model.quant,
        model.resident_weight_bytes() as f64 / 1e6,
        data.train.len(),
        data.eval.len(),
        files.len()
    );
    let targets = a
        .targets
        .iter()
        .map(|t| Target::parse(t.trim()).with_context(|| format!("unknown LoRA target `{t}`")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let adapter = match init {
        Some(ad) => ad,
        None => LoraAdapter::new(
            &model.config,
            LoraConfig::new(a.rank, a.alpha, a.dropout, &targets)?,
            &model.device,
            a.seed,
        ),
    };
    let cfg = TrainConfig {
        steps: a.steps,
        batch_size: a.batch,
        seq_len: a.seq,
        grad_accum: a.grad_accum,
        lr: a.lr,
        warmup_steps: a.warmup.min(a.steps),
        weight_decay: a.weight_decay,
        optimizer: a.optimizer,
        max_grad_norm: (a.max_grad_norm > 0.0).then_some(a.max_grad_norm),
        seed: a.seed,
        engine: a.engine,
        ..TrainConfig::default()
    };
    let eval_windows = 16;
    let eval =
        |ad: &LoraAdapter| eval_loss(&model, Some(ad), &data.eval, a.seq, eval_windows, a.batch);
    let sample = SampleOpts {
        prompt: a.sample.clone(),
        max_tokens: 160,
        temperature: 0.7,
        top_k: 40,
        top_p: 0.95,
        seed: a.seed,
        chat: None,
        system: None,
    };
    if !a.sample.is_empty() {
        println!(
            "--- before fine-tuning ---\n{}{}",
            a.sample,
            sample_text(&model, Some(&adapter), &tok, &sample)?
        );
    }
    let before = eval(&adapter)?;
    println!(
        "eval loss before: {before:.4} (perplexity {:.2})",
        before.exp()
    );
    let initial = adapter.clone();
    let mut trainer = Trainer::new(adapter, cfg.clone())?;
    let mut batcher = Batcher::new(a.seq, a.batch, a.seed);
    let mut dp = if a.dp.dp_noise_multiplier > 0.0 {
        let examples: Vec<Vec<u32>> = data
            .train
            .chunks_exact(a.seq)
            .map(<[u32]>::to_vec)
            .collect();
        let q =
            a.dp.dp_sampling_rate
                .unwrap_or(a.batch as f64 / examples.len().max(1) as f64)
                .min(1.0);
        let dp_cfg = DpSgdConfig {
            clip: a.dp.dp_clip,
            noise_multiplier: a.dp.dp_noise_multiplier,
            sampling_rate: q,
            delta: a.dp.dp_delta,
            accountant: a.dp.accountant,
        };
        let n_examples = examples.len();
        let dp = DpSgd::new(dp_cfg, examples, trainer.adapter.num_parameters(), None)?;
        let planned = dp.step_event(a.steps as u64)?;
        let planned_eps =
            starling_privacy::accountant::epsilon(&[planned], a.dp.dp_delta, a.dp.accountant)?;
        if let Some(budget) = a.dp.dp_epsilon_budget {
            let mut ledger = starling_privacy::Ledger::new(
                starling_privacy::LedgerScope::Client("local".into()),
                starling_privacy::Budget {
                    epsilon: budget,
                    delta: a.dp.dp_delta,
                },
                a.dp.accountant,
            )?;
            dp.charge_plan(&mut ledger, "finetune", a.steps as u64)?;
        }
        println!(
            "DP-SGD: {n_examples} sequences, q = {q:.4} (expected batch {:.1}), σ = {}, C = {}; \
             planned ε = {:.3} at δ = {:e} ({:?})",
            dp.expected_batch(),
            a.dp.dp_noise_multiplier,
            a.dp.dp_clip,
            planned_eps.epsilon,
            a.dp.dp_delta,
            a.dp.accountant
        );
        Some(dp)
    } else {
        None
    };
    let bar = indicatif::ProgressBar::new(a.steps as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .expect("static template"),
    );
    let t0 = Instant::now();
    for _ in 0..a.steps {
        let s = match dp.as_mut() {
            Some(dp) => dp.step(&mut trainer, &model)?.step,
            None => {
                let micro: Vec<Vec<u32>> = (0..a.grad_accum)
                    .map(|_| batcher.sample(&data.train))
                    .collect::<Result<_, _>>()?;
                trainer.step(&model, &micro)?
            }
        };
        bar.set_message(format!(
            "loss {:.4} |g| {:.3} lr {:.2e}",
            s.loss, s.grad_norm, s.lr
        ));
        bar.inc(1);
        if s.step % 20 == 0 || s.step == a.steps {
            let eps = match dp.as_ref() {
                Some(dp) => format!("  ε {:.3}", dp.epsilon()?),
                None => String::new(),
            };
            bar.println(format!(
                "step {:>4}  train loss {:.4}  grad norm {:.3}  lr {:.2e}{eps}",
                s.step, s.loss, s.grad_norm, s.lr
            ));
        }
    }
    bar.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    let tokens = (a.steps * a.grad_accum * a.batch * a.seq) as f64;
    if a.dp.user_clip > 0.0 {
        let placement = if a.dp.user_noise_clients > 1 {
            starling_privacy::NoisePlacement::Distributed {
                clients: a.dp.user_noise_clients,
            }
        } else {
            starling_privacy::NoisePlacement::Central
        };
        let (mut delta, norm) = user_level_delta(
            &initial,
            &trainer.adapter,
            a.dp.user_clip,
            a.dp.user_noise_multiplier,
            placement,
        )?;
        if a.dp.user_noise_multiplier > 0.0
            && placement == starling_privacy::NoisePlacement::Central
        {
            // A single device publishing its own delta: the "central" noise is added here.
            starling_privacy::add_central_noise(
                &mut delta,
                a.dp.user_clip,
                a.dp.user_noise_multiplier,
            )?;
        }
        let mut flat = initial.to_flat();
        for (p, d) in flat.iter_mut().zip(&delta) {
            *p += d;
        }
        trainer.adapter.set_flat(&flat)?;
        println!(
            "user-level DP: delta norm {norm:.4} clipped to {}, noise multiplier {} ({placement:?})",
            a.dp.user_clip, a.dp.user_noise_multiplier
        );
    }
    let after = eval(&trainer.adapter)?;
    println!(
        "eval loss after:  {after:.4} (perplexity {:.2})",
        after.exp()
    );
    println!(
        "trained {} steps in {secs:.1}s ({:.0} tokens/s)",
        a.steps,
        tokens / secs
    );
    if let Some(dp) = dp.as_ref() {
        println!(
            "privacy spent (example level): ε = {:.3} at δ = {:e} after {} DP-SGD steps ({:?} accountant)",
            dp.epsilon()?,
            a.dp.dp_delta,
            dp.steps(),
            a.dp.accountant
        );
    }
    trainer
        .adapter
        .save_peft(&a.out)
        .with_context(|| format!("writing adapter to {}", a.out.display()))?;
    println!(
        "adapter ({} parameters) written to {}",
        trainer.adapter.num_parameters(),
        a.out.display()
    );
    if !a.sample.is_empty() {
        println!(
            "--- after fine-tuning ---\n{}{}",
            a.sample,
            sample_text(&model, Some(&trainer.adapter), &tok, &sample)?
        );
    }
    if !after.is_finite() {
        bail!("evaluation loss is not finite");
    }
    Ok(())
}
