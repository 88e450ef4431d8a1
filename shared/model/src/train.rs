//! LoRA fine-tuning: next-token cross-entropy, AdamW with decoupled weight decay (PyTorch's
//! semantics) or plain SGD, linear warm-up then cosine decay, gradient accumulation and global
//! gradient-norm clipping. Only the adapter's A/B tensors are ever updated; the base model is borrowed
//! immutably, so it cannot change.
//!
//! Data loading lives in `data`; the network in `model`. Privacy (per-example clipping and noise)
//! will hook in at `Trainer::step`, between the gradient and the optimizer.

use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor, TensorData};

use crate::data::eval_windows;
use crate::engine::{self, DropoutSpec, Reduction};
use crate::error::{ModelError, Result};
use crate::lora::{unflatten, LoraAdapter};
use crate::model::{Dropout, Llama};

/// Sequences per engine pass when computing per-example gradients: enough rows per thread for
/// efficient GEMMs, few enough that activations stay small on a device.
pub const EXAMPLES_PER_PASS: usize = 8;

/// Which implementation computes the gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Engine {
    /// The hand-derived forward/backward of `engine` (fast; the default).
    #[default]
    Native,
    /// burn's autodiff over the burn model (the reference).
    Burn,
    /// The native engine with the layers' frozen-weight products in bf16 (f32 sums) where the CPU
    /// has AVX512-BF16 — about 1.4× faster there, gradients within ~1 % of f32; elsewhere the same
    /// as `native`.
    NativeBf16,
}

impl Engine {
    /// Short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Native => "native",
            Self::Burn => "burn",
            Self::NativeBf16 => "native-bf16",
        }
    }

    /// The native engine's precision (`None` for burn).
    pub fn precision(self) -> Option<engine::Precision> {
        match self {
            Self::Native => Some(engine::Precision::F32),
            Self::NativeBf16 => Some(engine::Precision::Bf16),
            Self::Burn => None,
        }
    }
}

/// The update rule of each optimizer step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Optimizer {
    /// AdamW (decoupled weight decay, bias-corrected moments): each value moves by about the learning
    /// rate whatever its gradient's size. The default for training on one's own text.
    #[default]
    #[value(name = "adamw")]
    AdamW,
    /// Plain SGD (with the same decoupled weight decay): the step is the learning rate times the
    /// gradient. Federated DP-FedAvg's local rule: a delta's norm sits where the gradients are, so the
    /// clipped deltas of clients who agree add up.
    Sgd,
}

/// Optimisation hyper-parameters.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    /// Optimizer steps.
    pub steps: usize,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Micro-batches whose gradients are summed before one optimizer step.
    pub grad_accum: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Steps of linear warm-up from 0 to `lr`.
    pub warmup_steps: usize,
    /// Learning rate at the end of the cosine decay, as a fraction of `lr`.
    pub min_lr_ratio: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// The update rule.
    pub optimizer: Optimizer,
    /// Adam β₁.
    pub beta1: f64,
    /// Adam β₂.
    pub beta2: f64,
    /// Adam ε.
    pub eps: f64,
    /// Clip the global gradient norm to this value, if set.
    pub max_grad_norm: Option<f64>,
    /// Seed of data sampling and dropout.
    pub seed: u64,
    /// Gradient implementation.
    pub engine: Engine,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 100,
            batch_size: 8,
            seq_len: 128,
            grad_accum: 1,
            lr: 2e-3,
            warmup_steps: 10,
            min_lr_ratio: 0.1,
            weight_decay: 0.01,
            optimizer: Optimizer::AdamW,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            max_grad_norm: Some(1.0),
            seed: 0,
            engine: Engine::Native,
        }
    }
}

impl TrainConfig {
    /// Learning rate of optimizer step `step` (0-based): linear warm-up, then cosine decay.
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        self.lr * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine)
    }

    fn validate(&self) -> Result<()> {
        let ok = self.batch_size > 0
            && self.seq_len >= 2
            && self.grad_accum > 0
            && self.lr.is_finite()
            && self.lr > 0.0
            && (0.0..1.0).contains(&self.beta1)
            && (0.0..1.0).contains(&self.beta2)
            && self.eps > 0.0
            && self.weight_decay >= 0.0
            && (0.0..=1.0).contains(&self.min_lr_ratio)
            && self.max_grad_norm.is_none_or(|m| m > 0.0);
        if ok {
            Ok(())
        } else {
            Err(ModelError::InvalidArgument(format!(
                "invalid training configuration: {self:?}"
            )))
        }
    }
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy)]
pub struct StepStats {
    /// Step index (1-based after the step).
    pub step: usize,
    /// Mean training loss over the step's micro-batches.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate used.
    pub lr: f64,
}

/// Mean next-token cross-entropy of `logits` (`[b, t, v]`) against `ids` (`[b, t]`).
pub fn next_token_loss(logits: Tensor<3>, ids: &[u32], batch: usize) -> Tensor<1> {
    let [b, t, v] = logits.dims();
    debug_assert_eq!(b, batch);
    let n = b * (t - 1);
    let device = logits.device();
    let pred = logits.narrow(1, 0, t - 1).reshape([n, v]);
    let targets: Vec<i64> = ids
        .chunks_exact(t)
        .flat_map(|row| row[1..].iter().map(|&x| crate::data::token(x) as i64))
        .collect();
    // Each sequence's mean over the positions it counts (all of them unless ids are marked
    // NO_LOSS), averaged over the sequences.
    let weights: Vec<f32> = ids
        .chunks_exact(t)
        .flat_map(|row| {
            let counted = crate::data::counted_targets(row);
            row[1..].iter().map(move |&x| {
                if crate::data::is_target(x) {
                    1.0 / (counted as f32 * b as f32)
                } else {
                    0.0
                }
            })
        })
        .collect();
    let targets = Tensor::<2, Int>::from_data(TensorData::new(targets, [n, 1]), &device);
    let weights = Tensor::<2>::from_data(TensorData::new(weights, [n, 1]), &device);
    (log_softmax(pred, 1).gather(1, targets) * weights)
        .sum()
        .neg()
}

/// Sum of squares of a tensor as f64.
fn sum_sq(t: &Tensor<2>) -> f64 {
    t.clone().powi_scalar(2).sum().into_scalar::<f32>() as f64
}

/// AdamW's first and second moments, one pair per adapter tensor (canonical order).
struct Moments {
    m: Vec<Tensor<2>>,
    v: Vec<Tensor<2>>,
}

/// A LoRA fine-tuning run: adapter, optimizer state and schedule.
pub struct Trainer {
    /// The adapter being trained.
    pub adapter: LoraAdapter,
    /// Hyper-parameters.
    pub config: TrainConfig,
    /// AdamW's moments; `None` under SGD, which keeps no state (and allocates none).
    moments: Option<Moments>,
    step: usize,
    dropout: Dropout,
    /// FedProx: μ and the anchor (the round's starting adapter) of the proximal term μ/2·‖w − w₀‖².
    proximal: Option<(f64, Vec<Tensor<2>>)>,
}

impl Drop for Trainer {
    /// The engine's reusable activation buffers are only worth holding while a run goes on.
    fn drop(&mut self) {
        engine::release_buffers();
    }
}

impl Trainer {
    /// Starts training `adapter` (fresh AdamW moments under AdamW, no state under SGD).
    pub fn new(adapter: LoraAdapter, config: TrainConfig) -> Result<Self> {
        config.validate()?;
        let moments = matches!(config.optimizer, Optimizer::AdamW).then(|| {
            let m = adapter
                .tensors()
                .iter()
                .map(|t| t.zeros_like())
                .collect::<Vec<_>>();
            Moments { v: m.clone(), m }
        });
        let seed = config.seed;
        Ok(Self {
            adapter,
            config,
            moments,
            step: 0,
            dropout: Dropout::new(seed ^ 0x5eed_d20f),
            proximal: None,
        })
    }

    /// Adds FedProx's proximal term μ/2·‖w − w₀‖² to every step, anchored at the adapter's current values
    /// (the round's starting point): its gradient μ(w − w₀) joins each step's gradient before norm clipping.
    /// It depends only on public values, so it composes with DP-SGD as post-processing. μ = 0 removes it.
    pub fn set_proximal(&mut self, mu: f64) -> Result<()> {
        if !(mu.is_finite() && mu >= 0.0) {
            return Err(ModelError::InvalidArgument(format!(
                "proximal μ must be finite and non-negative, got {mu}"
            )));
        }
        self.proximal =
            (mu > 0.0).then(|| (mu, self.adapter.tensors().into_iter().cloned().collect()));
        Ok(())
    }

    /// Optimizer steps taken so far.
    pub fn steps_done(&self) -> usize {
        self.step
    }

    /// Gradients of the mean loss over `micro_batches` with respect to the adapter tensors, in
    /// canonical order, and that mean loss.
    pub fn gradients(
        &mut self,
        model: &Llama,
        micro_batches: &[Vec<u32>],
    ) -> Result<(Vec<Tensor<2>>, f64)> {
        let k = micro_batches.len();
        if k == 0 {
            return Err(ModelError::InvalidArgument(
                "a step needs at least one micro-batch".into(),
            ));
        }
        if self.config.engine.precision().is_some() {
            return self.native_gradients(model, micro_batches);
        }
        let mut grads: Option<Vec<Tensor<2>>> = None;
        let mut loss_sum = 0.0;
        for ids in micro_batches {
            let batch = ids.len() / self.config.seq_len;
            let mut tracked = self.adapter.clone();
            for t in tracked.tensors_mut() {
                *t = t.clone().autodiff().require_grad();
            }
            let logits =
                model.forward(ids, batch, Some(&tracked), None, Some(&mut self.dropout))?;
            let loss = next_token_loss(logits, ids, batch) / k as f64;
            let g = loss.backward();
            loss_sum += loss.clone().inner().into_scalar::<f32>() as f64;
            let step_grads: Vec<Tensor<2>> = tracked
                .tensors()
                .iter()
                .map(|t| {
                    t.grad(&g)
                        .unwrap_or_else(|| (*t).clone().inner().zeros_like())
                })
                .collect();
            grads = Some(match grads {
                None => step_grads,
                Some(acc) => acc
                    .into_iter()
                    .zip(step_grads)
                    .map(|(a, b)| a + b)
                    .collect(),
            });
        }
        Ok((grads.expect("at least one micro-batch"), loss_sum))
    }

    /// [`Trainer::gradients`] by the native engine.
    fn native_gradients(
        &mut self,
        model: &Llama,
        micro_batches: &[Vec<u32>],
    ) -> Result<(Vec<Tensor<2>>, f64)> {
        let k = micro_batches.len() as f64;
        let mut sum: Option<Vec<f32>> = None;
        let mut loss = 0.0;
        for ids in micro_batches {
            let batch = ids.len() / self.config.seq_len.max(1);
            let dropout = self.dropout_spec();
            let g = engine::lora_gradients_in(
                self.precision(),
                model,
                &self.adapter,
                ids,
                batch,
                Reduction::Sum {
                    weight: 1.0 / (batch as f64 * k),
                },
                dropout,
            )?;
            loss += g.losses.iter().sum::<f64>() / (g.losses.len() as f64 * k);
            let flat = g.grads.into_iter().next().unwrap_or_default();
            sum = Some(match sum {
                None => flat,
                Some(mut acc) => {
                    acc.iter_mut().zip(&flat).for_each(|(a, b)| *a += b);
                    acc
                }
            });
        }
        Ok((unflatten(&sum.unwrap_or_default(), &self.adapter)?, loss))
    }

    /// The native engine's precision (f32 when the burn engine asks for native gradients).
    fn precision(&self) -> engine::Precision {
        self.config.engine.precision().unwrap_or_default()
    }

    /// The native engine's dropout for the next micro-batch (none when the adapter has none).
    fn dropout_spec(&mut self) -> Option<DropoutSpec> {
        let p = self.adapter.config.dropout;
        (p > 0.0).then(|| DropoutSpec {
            p,
            seed: self.dropout.next_seed(),
        })
    }

    /// Per-example gradients (flattened, canonical order) and losses of `examples`, each its own
    /// mean next-token loss; DP-SGD clips these one by one.
    pub fn example_gradients(
        &mut self,
        model: &Llama,
        examples: &[&[u32]],
    ) -> Result<Vec<(Vec<f32>, f64)>> {
        let mut out = Vec::with_capacity(examples.len());
        if self.config.engine == Engine::Burn {
            for ex in examples {
                let (g, loss) = self.gradients(model, &[ex.to_vec()])?;
                out.push((crate::lora::flatten(&g), loss));
            }
            return Ok(out);
        }
        // Runs of equal length go through the engine together, a few at a time (activation memory
        // grows with every sequence in a pass).
        let mut i = 0;
        while i < examples.len() {
            let len = examples[i].len();
            let mut j = i + 1;
            while j < examples.len() && j - i < EXAMPLES_PER_PASS && examples[j].len() == len {
                j += 1;
            }
            let ids: Vec<u32> = examples[i..j].concat();
            let dropout = self.dropout_spec();
            let g = engine::lora_gradients_in(
                self.precision(),
                model,
                &self.adapter,
                &ids,
                j - i,
                Reduction::PerSequence,
                dropout,
            )?;
            out.extend(g.grads.into_iter().zip(g.losses));
            i = j;
        }
        Ok(out)
    }

    /// One optimizer step over `micro_batches` (each row-major `[batch_size, seq_len]`).
    pub fn step(&mut self, model: &Llama, micro_batches: &[Vec<u32>]) -> Result<StepStats> {
        let (grads, loss) = self.gradients(model, micro_batches)?;
        self.apply_gradients(grads, loss)
    }

    /// One optimizer step (AdamW or SGD) with given gradients (canonical order), after the configured
    /// norm clipping; `loss` is only reported. DP-SGD hands in its clipped, noised gradient here.
    pub fn apply_gradients(&mut self, mut grads: Vec<Tensor<2>>, loss: f64) -> Result<StepStats> {
        let step = self.step;
        let tensors = self.adapter.tensors().len();
        if grads.len() != tensors {
            return Err(ModelError::InvalidArgument(format!(
                "{} gradient tensors for {tensors} adapter tensors",
                grads.len(),
            )));
        }
        if !loss.is_finite() {
            return Err(ModelError::Diverged {
                step,
                what: "loss".into(),
            });
        }
        if let Some((mu, anchor)) = &self.proximal {
            grads = grads
                .into_iter()
                .zip(self.adapter.tensors())
                .zip(anchor)
                .map(|((g, p), a)| g + (p.clone() - a.clone()) * *mu)
                .collect();
        }
        let norm = grads.iter().map(sum_sq).sum::<f64>().sqrt();
        if !norm.is_finite() {
            return Err(ModelError::Diverged {
                step,
                what: "gradient norm".into(),
            });
        }
        if let Some(max) = self.config.max_grad_norm {
            let coef = max / (norm + 1e-6);
            if coef < 1.0 {
                grads = grads.into_iter().map(|g| g * coef).collect();
            }
        }
        let c = &self.config;
        let lr = c.lr_at(step);
        let params = self.adapter.tensors_mut().into_iter().zip(grads);
        match &mut self.moments {
            Some(Moments { m, v }) => {
                let t = (step + 1) as i32;
                let bc1 = 1.0 - c.beta1.powi(t);
                let bc2 = 1.0 - c.beta2.powi(t);
                for ((p, g), (m, v)) in params.zip(m.iter_mut().zip(v.iter_mut())) {
                    *m = m.clone() * c.beta1 + g.clone() * (1.0 - c.beta1);
                    *v = v.clone() * c.beta2 + g.powi_scalar(2) * (1.0 - c.beta2);
                    let update = (m.clone() / bc1) / ((v.clone() / bc2).sqrt() + c.eps);
                    *p = p.clone() * (1.0 - lr * c.weight_decay) - update * lr;
                }
            }
            None => {
                for (p, g) in params {
                    *p = p.clone() * (1.0 - lr * c.weight_decay) - g * lr;
                }
            }
        }
        self.step += 1;
        Ok(StepStats {
            step: self.step,
            loss,
            grad_norm: norm,
            lr,
        })
    }
}

/// Mean next-token loss of `model` (+ `adapter`) over consecutive windows of `seq` tokens.
pub fn eval_loss(
    model: &Llama,
    adapter: Option<&LoraAdapter>,
    tokens: &[u32],
    seq: usize,
    max_windows: usize,
    batch: usize,
) -> Result<f64> {
    let windows = eval_windows(tokens, seq, max_windows);
    if windows.is_empty() {
        return Err(ModelError::Data(format!(
            "evaluation needs at least {seq} tokens, found {}",
            tokens.len()
        )));
    }
    let mut total = 0.0;
    for chunk in windows.chunks(batch.max(1)) {
        let ids: Vec<u32> = chunk.concat();
        let logits = model.forward(&ids, chunk.len(), adapter, None, None)?;
        total += next_token_loss(logits, &ids, chunk.len()).into_scalar::<f32>() as f64
            * chunk.len() as f64;
    }
    Ok(total / windows.len() as f64)
}
