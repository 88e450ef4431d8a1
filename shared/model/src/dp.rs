//! Differential privacy in training: DP-SGD (example-level) and user-level clipping/noising of a whole adapter
//! delta (DP-FedAvg's client side). The mechanisms, noise and accounting come from `starling-privacy`; this
//! module only computes per-example gradients and applies the result. What must never live here: noise drawn
//! any other way, or ε computed any other way.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use starling_privacy::{
    accountant, AccountantKind, DpEvent, GaussianMechanism, Ledger, NoisePlacement, PrivacySpent,
};

use crate::error::{ModelError, Result};
use crate::lora::{unflatten, LoraAdapter};
use crate::model::Llama;
use crate::train::{next_token_loss, StepStats, Trainer};

/// DP-SGD hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DpSgdConfig {
    /// Per-example L2 clip bound C of the LoRA gradient.
    pub clip: f64,
    /// Noise multiplier σ: the summed gradient gets N(0, σ²C²) per coordinate.
    pub noise_multiplier: f64,
    /// Poisson sampling rate q: each example joins a step's batch independently with probability q.
    pub sampling_rate: f64,
    /// δ at which ε is reported.
    pub delta: f64,
    /// Accountant for the reported ε.
    pub accountant: AccountantKind,
}

impl DpSgdConfig {
    fn validate(&self, examples: usize) -> Result<()> {
        let bad = |m: String| Err(ModelError::InvalidArgument(m));
        if !(self.clip > 0.0 && self.clip.is_finite()) {
            return bad(format!("DP clip bound must be positive, got {}", self.clip));
        }
        if !(self.noise_multiplier > 0.0 && self.noise_multiplier.is_finite()) {
            return bad(format!(
                "DP noise multiplier must be positive, got {}",
                self.noise_multiplier
            ));
        }
        if !(self.sampling_rate > 0.0 && self.sampling_rate <= 1.0) {
            return bad(format!(
                "sampling rate must lie in (0, 1], got {}",
                self.sampling_rate
            ));
        }
        if !(self.delta > 0.0 && self.delta < 1.0) {
            return bad(format!("δ must lie in (0, 1), got {}", self.delta));
        }
        if examples == 0 {
            return bad("DP-SGD needs at least one example".into());
        }
        Ok(())
    }
}

/// What one DP-SGD step did, with the privacy spent so far.
#[derive(Debug, Clone, Copy)]
pub struct DpStepStats {
    /// The optimizer step (loss is the mean over the sampled examples; NaN for an empty sample).
    pub step: StepStats,
    /// Examples in this step's Poisson sample.
    pub batch: usize,
    /// Examples whose gradient norm exceeded C and was clipped.
    pub clipped: usize,
}

/// A DP-SGD run over a fixed set of examples (each one training sequence).
pub struct DpSgd {
    config: DpSgdConfig,
    examples: Vec<Vec<u32>>,
    mechanism: GaussianMechanism,
    sampler: ChaCha20Rng,
    noise_key: Option<ChaCha20Rng>,
    steps: u64,
}

impl DpSgd {
    /// A run over `examples` for an adapter of `num_params` values. `seed = None` draws the Poisson samples
    /// and the noise from the operating system (deployment); `Some(seed)` makes both reproducible
    /// (simulations and tests — a known seed protects nothing).
    pub fn new(
        config: DpSgdConfig,
        examples: Vec<Vec<u32>>,
        num_params: usize,
        seed: Option<u64>,
    ) -> Result<Self> {
        config.validate(examples.len())?;
        let mechanism =
            GaussianMechanism::with_multiplier(config.clip, config.noise_multiplier, num_params)?;
        let (sampler, noise_key) = match seed {
            Some(s) => (
                ChaCha20Rng::seed_from_u64(s),
                Some(ChaCha20Rng::seed_from_u64(s ^ 0xd1ff_e7e7)),
            ),
            None => (starling_privacy::sampler::os_rng()?, None),
        };
        Ok(Self {
            config,
            examples,
            mechanism,
            sampler,
            noise_key,
            steps: 0,
        })
    }

    /// The expected batch size q·N that the noisy sum is divided by.
    pub fn expected_batch(&self) -> f64 {
        self.config.sampling_rate * self.examples.len() as f64
    }

    /// The event one step charges: q and the effective noise multiplier (σ over the sensitivity opendp states,
    /// which includes its grid-rounding allowance).
    pub fn step_event(&self, steps: u64) -> Result<DpEvent> {
        Ok(DpEvent::new(
            self.config.sampling_rate,
            self.mechanism.effective_noise_multiplier(),
            steps,
        )?)
    }

    /// Charges a planned run of `steps` steps to `ledger` before any is taken; refuses (records nothing) when
    /// the run would exceed the budget.
    pub fn charge_plan(
        &self,
        ledger: &mut Ledger,
        label: &str,
        steps: u64,
    ) -> Result<PrivacySpent> {
        Ok(ledger.charge(label, self.step_event(steps)?)?)
    }

    /// ε spent by the steps taken so far, at the configured δ.
    pub fn epsilon(&self) -> Result<f64> {
        if self.steps == 0 {
            return Ok(0.0);
        }
        Ok(accountant::epsilon(
            &[self.step_event(self.steps)?],
            self.config.delta,
            self.config.accountant,
        )?
        .epsilon)
    }

    /// Steps taken.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The gradient of one example's mean next-token loss, flattened in canonical order, and that loss.
    pub fn example_gradient(
        trainer: &mut Trainer,
        model: &Llama,
        example: &[u32],
    ) -> Result<(Vec<f32>, f64)> {
        trainer
            .example_gradients(model, &[example])?
            .pop()
            .ok_or_else(|| ModelError::InvalidArgument("no gradient for the example".into()))
    }

    /// Σ_i clip_C(∇ℓ_i) over `batch` (indices into the examples), accumulated in f64; also the mean loss and
    /// how many were clipped. This sum has L2 sensitivity C under adding or removing one example.
    pub fn clipped_sum(
        &self,
        trainer: &mut Trainer,
        model: &Llama,
        batch: &[usize],
    ) -> Result<(Vec<f32>, f64, usize)> {
        let dim = self.mechanism.dim();
        let mut sum = vec![0f64; dim];
        let (mut loss, mut clipped) = (0.0, 0);
        let examples = batch
            .iter()
            .map(|&i| {
                self.examples
                    .get(i)
                    .map(Vec::as_slice)
                    .ok_or_else(|| ModelError::InvalidArgument(format!("no example {i}")))
            })
            .collect::<Result<Vec<&[u32]>>>()?;
        // Per-example gradients in bounded chunks: each is clipped before it touches the sum.
        for chunk in examples.chunks(crate::train::EXAMPLES_PER_PASS) {
            for (mut g, l) in trainer.example_gradients(model, chunk)? {
                if g.len() != dim {
                    return Err(ModelError::InvalidArgument(format!(
                        "gradient has {} values, expected {dim}",
                        g.len()
                    )));
                }
                let norm = starling_privacy::clip_l2(&mut g, self.config.clip)?;
                clipped += usize::from(norm > self.config.clip);
                for (s, x) in sum.iter_mut().zip(&g) {
                    *s += f64::from(*x);
                }
                loss += l;
            }
        }
        let mean_loss = if batch.is_empty() {
            f64::NAN
        } else {
            loss / batch.len() as f64
        };
        Ok((
            sum.into_iter().map(|x| x as f32).collect(),
            mean_loss,
            clipped,
        ))
    }

    /// One DP-SGD step: Poisson-sample the examples, clip each gradient to C, sum, add N(0, σ²C²), divide by
    /// the expected batch size, and take the AdamW step (the trainer's own norm clipping is bypassed: the
    /// per-example clip replaces it).
    pub fn step(&mut self, trainer: &mut Trainer, model: &Llama) -> Result<DpStepStats> {
        let q = self.config.sampling_rate;
        let batch: Vec<usize> = (0..self.examples.len())
            .filter(|_| self.sampler.random::<f64>() < q)
            .collect();
        let (mut sum, loss, clipped) = self.clipped_sum(trainer, model, &batch)?;
        match &mut self.noise_key {
            Some(rng) => {
                let mut key = [0u8; 32];
                rng.fill(&mut key);
                self.mechanism.add_noise_with_key(&mut sum, key)?;
            }
            None => self.mechanism.add_noise(&mut sum)?,
        }
        let scale = 1.0 / self.expected_batch() as f32;
        for x in sum.iter_mut() {
            *x *= scale;
        }
        let grads = unflatten(&sum, &trainer.adapter)?;
        let saved = trainer.config.max_grad_norm.take();
        let stats = trainer.apply_gradients(grads, if loss.is_nan() { 0.0 } else { loss });
        trainer.config.max_grad_norm = saved;
        let mut stats = stats?;
        stats.loss = loss;
        self.steps += 1;
        Ok(DpStepStats {
            step: stats,
            batch: batch.len(),
            clipped,
        })
    }
}

/// User-level DP (the client side of DP-FedAvg): the delta `trained − initial`, clipped to L2 norm `clip`,
/// with this client's share of the noise when the placement is distributed. Returns the delta and its norm
/// before clipping.
pub fn user_level_delta(
    initial: &LoraAdapter,
    trained: &LoraAdapter,
    clip: f64,
    noise_multiplier: f64,
    placement: NoisePlacement,
) -> Result<(Vec<f32>, f64)> {
    let a = initial.to_flat();
    let b = trained.to_flat();
    if a.len() != b.len() {
        return Err(ModelError::InvalidArgument(
            "adapters of different shapes".into(),
        ));
    }
    let mut delta: Vec<f32> = b.iter().zip(&a).map(|(x, y)| x - y).collect();
    let norm =
        starling_privacy::privatize_client_delta(&mut delta, clip, noise_multiplier, placement)?;
    Ok((delta, norm))
}

/// Mean next-token loss of one example (a helper for tests and reports).
pub fn example_loss(model: &Llama, adapter: &LoraAdapter, example: &[u32]) -> Result<f64> {
    let logits = model.forward(example, 1, Some(adapter), None, None)?;
    Ok(f64::from(
        next_token_loss(logits, example, 1).into_scalar::<f32>(),
    ))
}
