//! Local training for one task: the call a driver makes when the session says [`Action::Train`]
//! (crate::session::Action::Train). From the held adapter, it LoRA-trains on the device's text with the
//! task's settings (steps, batch, sequence length, learning rate, FedProx μ, DP-SGD), takes the delta,
//! applies user-level clipping and the device's noise share, and encodes it as the task asks.
//!
//! Every piece is the model and privacy crates' own (native training engine, opendp-certified noise,
//! accountants); nothing here draws noise or computes ε another way. What must never live here: I/O beyond
//! what the caller hands in, or protocol state.

use rand::{Rng, SeedableRng};
use starling_model::data::Batcher;
use starling_model::dp::{user_level_delta, DpSgd, DpSgdConfig};
use starling_model::{
    engine::Precision, Llama, LlamaConfig, LoraAdapter, LoraConfig, Optimizer, QuantType, Target,
    TrainConfig, Trainer,
};
use starling_privacy::{AccountantKind, NoisePlacement};
use starling_protocol::message::{LocalOptimizer, Task, UpdateMetrics};
use starling_protocol::update::encode_update;
use starling_protocol::{AdapterSchema, Digest, Manifest, UpdateId};

use crate::session::{update_id_hex, PendingUpdate};

/// What can go wrong while training for a task.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The model crate refused (bad settings, diverged training, too little data).
    #[error(transparent)]
    Model(#[from] starling_model::ModelError),
    /// Privacy machinery refused.
    #[error(transparent)]
    Privacy(#[from] starling_privacy::PrivacyError),
    /// Encoding the update failed.
    #[error(transparent)]
    Protocol(#[from] starling_protocol::ProtocolError),
    /// The task does not fit the model or the device.
    #[error("{0}")]
    Task(String),
    /// The caller asked training to stop (the device is shutting down).
    #[error("training interrupted")]
    Interrupted,
}

/// The LoRA adapter a task trains, holding the values of `flat`, checked against the manifest's schema.
pub fn task_adapter(
    model: &Llama,
    task: &Task,
    schema: &AdapterSchema,
    flat: &[f32],
) -> Result<LoraAdapter, TrainError> {
    let targets = task
        .lora
        .targets
        .iter()
        .map(|t| {
            Target::parse(t).ok_or_else(|| TrainError::Task(format!("unknown LoRA target {t:?}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let cfg = LoraConfig::new(task.lora.rank as usize, task.lora.alpha, 0.0, &targets)?;
    let mut adapter = LoraAdapter::new(&model.config, cfg, &model.device, 0);
    let own = AdapterSchema::from_matrices(adapter.specs())?;
    if own.hash() != schema.hash() {
        return Err(TrainError::Task(
            "the task's LoRA settings do not give the manifest's adapter schema (wrong base model?)".into(),
        ));
    }
    if flat.len() != schema.num_params() {
        return Err(TrainError::Task(format!(
            "the adapter blob holds {} values, the schema {}",
            flat.len(),
            schema.num_params()
        )));
    }
    adapter.set_flat(flat)?;
    Ok(adapter)
}

/// One task's training inputs.
pub struct TaskTraining<'a> {
    /// The frozen base model.
    pub model: &'a Llama,
    /// The task.
    pub task: &'a Task,
    /// Its verified manifest.
    pub manifest: &'a Manifest,
    /// The held adapter's values (the round's starting point).
    pub start: &'a [f32],
    /// The device's training tokens.
    pub tokens: &'a [u32],
    /// DP-SGD's sampling rate as the session accounted it (required when the task asks for DP-SGD).
    pub dp_sampling_rate: Option<f64>,
    /// `Some(seed)`: reproducible batches, dropout and noise (simulations, tests — a known seed protects
    /// nothing); `None`: noise and DP-SGD sampling from the operating system (devices).
    pub seed: Option<u64>,
    /// Arithmetic of the frozen-weight products (`[device] precision`; bf16 only where the CPU has
    /// AVX512-BF16).
    pub precision: Precision,
}

/// A trained, encoded update.
#[derive(Debug, Clone)]
pub struct TrainedUpdate {
    /// The encoded update (protocol update format).
    pub body: Vec<u8>,
    /// Training figures to report.
    pub metrics: UpdateMetrics,
    /// Training sequences on the device (the FedAvg weight).
    pub num_examples: u64,
    /// L2 norm of the delta before user-level clipping.
    pub delta_norm: f64,
}

impl TrainedUpdate {
    /// The session's record of this update for `round`, with idempotency key `id`, trained from `manifest`.
    pub fn pending(&self, round: u64, id: UpdateId, manifest: &Manifest) -> PendingUpdate {
        PendingUpdate {
            round,
            update_id: update_id_hex(&id),
            model_version: manifest.version.0,
            schema: manifest.adapter_schema.hash().to_hex(),
            num_examples: self.num_examples,
            metrics: self.metrics,
            body_size: self.body.len() as u64,
            body_digest: Digest::of(&self.body).to_hex(),
            stored_as: None,
            terms: String::new(),
        }
    }
}

/// Trains for a task; `on_step(step, loss)` sees each optimizer step (a progress bar, a log) and returns
/// whether to go on (false: [`TrainError::Interrupted`], nothing is produced).
pub fn train_task(
    t: &TaskTraining<'_>,
    mut on_step: impl FnMut(u32, f64) -> bool,
) -> Result<TrainedUpdate, TrainError> {
    let p = &t.task.params;
    let (seq, batch) = (p.seq_len as usize, p.batch_size as usize);
    let schema = &t.manifest.adapter_schema;
    let initial = task_adapter(t.model, t.task, schema, t.start)?;
    let sequences = t.tokens.len() / seq.max(1);
    if sequences == 0 || t.tokens.len() < seq + 1 {
        return Err(TrainError::Task(format!(
            "{} training tokens are too few for one sequence of {seq}",
            t.tokens.len()
        )));
    }
    let seed = t.seed.unwrap_or_else(|| {
        let mut b = [0u8; 8];
        let _ = starling_protocol::identity::os_random(&mut b);
        u64::from_le_bytes(b)
    });
    let cfg = TrainConfig {
        steps: p.local_steps as usize,
        batch_size: batch,
        seq_len: seq,
        grad_accum: 1,
        lr: f64::from(p.learning_rate),
        // A constant local learning rate, as FedAvg's analysis assumes; the server's optimizer schedules.
        warmup_steps: 0,
        min_lr_ratio: 1.0,
        weight_decay: 0.0,
        optimizer: match p.optimizer {
            LocalOptimizer::AdamW => Optimizer::AdamW,
            LocalOptimizer::Sgd => Optimizer::Sgd,
        },
        max_grad_norm: Some(1.0),
        seed,
        engine: t.precision.engine(),
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(initial.clone(), cfg)?;
    trainer.set_proximal(f64::from(p.fedprox_mu))?;
    let mut losses = Vec::with_capacity(p.local_steps as usize);
    match t.task.dp.dp_sgd {
        Some(d) => {
            let q = t.dp_sampling_rate.ok_or_else(|| {
                TrainError::Task("DP-SGD task without the accounted sampling rate".into())
            })?;
            let examples: Vec<Vec<u32>> = t.tokens.chunks_exact(seq).map(<[u32]>::to_vec).collect();
            let dp_cfg = DpSgdConfig {
                clip: d.clip,
                noise_multiplier: d.noise_multiplier,
                sampling_rate: q,
                delta: d.delta,
                accountant: AccountantKind::Pld,
            };
            let mut dp = DpSgd::new(dp_cfg, examples, trainer.adapter.num_parameters(), t.seed)?;
            for step in 0..p.local_steps {
                let s = dp.step(&mut trainer, t.model)?;
                if s.step.loss.is_finite() {
                    losses.push(s.step.loss);
                }
                if !on_step(step + 1, s.step.loss) {
                    return Err(TrainError::Interrupted);
                }
            }
        }
        None => {
            let mut batcher = Batcher::new(seq, batch, seed);
            for step in 0..p.local_steps {
                let micro = vec![batcher.sample(t.tokens)?];
                let s = trainer.step(t.model, &micro)?;
                losses.push(s.loss);
                if !on_step(step + 1, s.loss) {
                    return Err(TrainError::Interrupted);
                }
            }
        }
    }
    // In a secure round the device's noise share is added on the integer grid after encoding (the
    // distributed discrete Gaussian); here the delta is only clipped.
    let secure = t.task.secagg.is_some();
    let user = t.task.dp.user;
    let (delta, delta_norm) = match user {
        Some(u) => {
            let (z, placement) = match u.noise_share() {
                Some((z, clients)) if !secure => (z, NoisePlacement::Distributed { clients }),
                _ => (0.0, NoisePlacement::Central),
            };
            user_level_delta(&initial, &trainer.adapter, u.clip(), z, placement)?
        }
        None => {
            let (a, b) = (initial.to_flat(), trainer.adapter.to_flat());
            let d: Vec<f32> = b.iter().zip(&a).map(|(x, y)| x - y).collect();
            let norm = d.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
            (d, norm)
        }
    };
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed ^ 0x0e1c_0de5);
    let body = match &t.task.secagg {
        // A secure round: integers the device masks once its neighbours' shares are in.
        Some(sa) => {
            let noise = user.and_then(|u| {
                let (z, clients) = u.noise_share()?;
                Some(crate::secure::NoiseShare {
                    noise_multiplier: z,
                    l2_clip: u.clip(),
                    clients: u64::from(clients),
                    // Secret on a device; reproducible only where the caller fixed the seed (simulations).
                    key: match t.seed {
                        Some(_) => rng.random(),
                        None => rand::random(),
                    },
                })
            });
            crate::secure::encode_delta(sa, &delta, sequences as u64, noise, &mut rng)
                .map_err(|e| TrainError::Task(e.to_string()))?
        }
        None => encode_update(schema, &delta, t.task.encoding, &mut rng)?,
    };
    if body.len() as u64 > t.task.max_update_bytes {
        return Err(TrainError::Task(format!(
            "the encoded update ({} bytes) exceeds the coordinator's limit of {}",
            body.len(),
            t.task.max_update_bytes
        )));
    }
    let train_loss = if losses.is_empty() {
        0.0
    } else {
        (losses.iter().sum::<f64>() / losses.len() as f64) as f32
    };
    Ok(TrainedUpdate {
        body,
        metrics: UpdateMetrics {
            train_loss,
            steps: p.local_steps,
            epsilon_spent: 0.0,
        },
        num_examples: sequences as u64,
        delta_norm,
    })
}

/// Bytes per stored parameter of a frozen base of `quant`.
fn bytes_per_param(quant: QuantType) -> f64 {
    match quant {
        QuantType::F32 => 4.0,
        other => other.block_bytes() as f64 / starling_model::quant::QK as f64,
    }
}

/// An upper estimate of the memory (bytes) a task's training takes on this device: the resident base at
/// `quant`, and per worker thread the native engine's activations for the piece of its share it runs at
/// a time (whole sequences up to 256 token rows; DP-SGD passes hold at most 8 sequences), one expanded
/// layer, an output-head tile and a logits chunk, plus a fixed allowance for the runtime. Used to refuse
/// a task before anything is loaded. (SmolLM2-135M's shape, Q8_0, 4 × 256 tokens, 2 threads: 816 MB
/// estimated, 722 MB measured by `starling-bench train --config M`.)
pub fn training_memory_estimate(
    c: &LlamaConfig,
    quant: QuantType,
    task: &Task,
    threads: usize,
) -> u64 {
    let threads = threads.max(1);
    let (h, i, v) = (
        c.hidden_size as f64,
        c.intermediate_size as f64,
        c.vocab_size as f64,
    );
    let layers = c.num_hidden_layers as f64;
    let heads = c.num_attention_heads as f64;
    let seq = f64::from(task.params.seq_len);
    let batch = if task.dp.dp_sgd.is_some() {
        8.0
    } else {
        f64::from(task.params.batch_size)
    };
    let per_thread_seqs = (batch / threads as f64).ceil().max(1.0);
    let piece_seqs = per_thread_seqs.min((256.0 / seq.max(1.0)).floor().max(1.0));
    let weights = c.num_parameters() as f64 * bytes_per_param(quant);
    // Activations kept for the backward pass: ~6 hidden-wide and 3 intermediate-wide f32 rows per token
    // and layer (attention probabilities are recomputed, one block at a time: heads × 32 × seq).
    let per_token_layer = 6.0 * h + 3.0 * i;
    let activations = piece_seqs * seq * layers * per_token_layer * 4.0 + heads * 32.0 * seq * 4.0;
    let layer_params = (c.num_parameters() as f64 - v * h).max(0.0) / layers.max(1.0);
    let expanded = layer_params * 4.0;
    let head_tile = 8192f64.min(v) * h * 4.0;
    let logits = (piece_seqs * seq * v).min(8.0 * 1024.0 * 1024.0) * 4.0;
    let per_thread = activations + expanded + head_tile + logits;
    let runtime = 48.0 * 1024.0 * 1024.0;
    (weights + threads as f64 * per_thread + runtime) as u64
}
