//! Text generation with a KV cache: greedy, temperature, top-k and top-p sampling, seeded, stopping
//! at an end-of-sequence token or a token budget. The network itself lives in `model`.

use rand::{Rng, SeedableRng};

use std::sync::Arc;

use crate::error::{ModelError, Result};
use crate::infer::Runner;
use crate::lora::LoraAdapter;
use crate::model::{KvCache, Llama};

/// How to pick each next token.
#[derive(Debug, Clone)]
pub struct SamplingConfig {
    /// Most new tokens to produce.
    pub max_new_tokens: usize,
    /// Softmax temperature; 0 means greedy.
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1.0 = all).
    pub top_p: f32,
    /// Seed of the sampler.
    pub seed: u64,
    /// Tokens that end generation (the model's EOS by default).
    pub stop_tokens: Vec<u32>,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            seed: 0,
            stop_tokens: Vec::new(),
        }
    }
}

/// Picks a token from `logits` under `cfg`.
pub fn sample(logits: &[f32], cfg: &SamplingConfig, rng: &mut impl Rng) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |best, (i, &v)| {
                if v > best.1 {
                    (i, v)
                } else {
                    best
                }
            })
            .0 as u32
    };
    if cfg.temperature <= 0.0 {
        return argmax();
    }
    let mut idx: Vec<usize> = (0..logits.len())
        .filter(|&i| logits[i].is_finite())
        .collect();
    if idx.is_empty() {
        return argmax();
    }
    // Only the top k need sorting: select them first (a full sort of a 50k vocabulary per token
    // would cost more than the model's forward pass).
    if cfg.top_k > 0 && cfg.top_k < idx.len() {
        idx.select_nth_unstable_by(cfg.top_k - 1, |&a, &b| logits[b].total_cmp(&logits[a]));
        idx.truncate(cfg.top_k);
    }
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    let max = logits[idx[0]];
    let mut probs: Vec<f64> = idx
        .iter()
        .map(|&i| (((logits[i] - max) / cfg.temperature) as f64).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if cfg.top_p < 1.0 {
        let mut acc = 0.0;
        let keep = probs
            .iter()
            .position(|p| {
                acc += p;
                acc >= cfg.top_p as f64
            })
            .map_or(probs.len(), |i| i + 1);
        probs.truncate(keep);
        idx.truncate(keep);
    }
    let total: f64 = probs.iter().sum();
    let mut u = rng.random::<f64>() * total;
    for (p, &i) in probs.iter().zip(&idx) {
        if u < *p {
            return i as u32;
        }
        u -= p;
    }
    idx[idx.len() - 1] as u32
}

/// Continues `prompt` and returns only the new tokens, on the native inference path
/// ([`crate::infer`]: integer kernels, thread pool, LoRA at run time).
pub fn generate(
    model: &Llama,
    adapter: Option<&LoraAdapter>,
    prompt: &[u32],
    cfg: &SamplingConfig,
) -> Result<Vec<u32>> {
    let runner = Runner::new(Arc::new(model.clone()), adapter)?;
    generate_with(&runner, prompt, cfg)
}

/// Continues `prompt` with a prepared [`Runner`] and returns only the new tokens.
pub fn generate_with(runner: &Runner, prompt: &[u32], cfg: &SamplingConfig) -> Result<Vec<u32>> {
    let mut session = runner.session();
    sample_loop(runner.model(), prompt, cfg, |ids| session.next_logits(ids))
}

/// The decoding loop both paths share: `next` runs new ids after the ones it has seen and returns
/// the last position's logits.
fn sample_loop(
    model: &Llama,
    prompt: &[u32],
    cfg: &SamplingConfig,
    mut next: impl FnMut(&[u32]) -> Result<Vec<f32>>,
) -> Result<Vec<u32>> {
    check_prompt(model, prompt)?;
    let limit = model.config.max_position_embeddings;
    let mut stop = cfg.stop_tokens.clone();
    stop.extend(&model.config.eos_token_ids);
    let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
    let (mut out, mut seen) = (Vec::new(), 0);
    let mut next_input = prompt.to_vec();
    while out.len() < cfg.max_new_tokens && seen + next_input.len() < limit {
        let last = next(&next_input)?;
        seen += next_input.len();
        let tok = sample(&last, cfg, &mut rng);
        if stop.contains(&tok) {
            break;
        }
        out.push(tok);
        next_input = vec![tok];
    }
    Ok(out)
}

/// A prompt must hold a token and leave room in the context.
fn check_prompt(model: &Llama, prompt: &[u32]) -> Result<()> {
    if prompt.is_empty() {
        return Err(ModelError::InvalidArgument(
            "the prompt must contain at least one token".into(),
        ));
    }
    let limit = model.config.max_position_embeddings;
    if prompt.len() >= limit {
        return Err(ModelError::InvalidArgument(format!(
            "prompt of {} tokens leaves no room in the context of {limit}",
            prompt.len()
        )));
    }
    Ok(())
}

/// [`generate`] on the burn model (the reference the native path is tested against).
pub fn generate_reference(
    model: &Llama,
    adapter: Option<&LoraAdapter>,
    prompt: &[u32],
    cfg: &SamplingConfig,
) -> Result<Vec<u32>> {
    let mut cache = KvCache::new();
    sample_loop(model, prompt, cfg, |ids| {
        model.next_logits(ids, adapter, &mut cache)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_top_k_top_p() {
        let logits = [0.0f32, 3.0, 1.0, 2.0];
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let greedy = SamplingConfig {
            temperature: 0.0,
            ..Default::default()
        };
        assert_eq!(sample(&logits, &greedy, &mut rng), 1);
        let top1 = SamplingConfig {
            temperature: 1.0,
            top_k: 1,
            top_p: 1.0,
            ..Default::default()
        };
        for _ in 0..20 {
            assert_eq!(sample(&logits, &top1, &mut rng), 1);
        }
        let top2 = SamplingConfig {
            temperature: 1.0,
            top_k: 2,
            top_p: 1.0,
            ..Default::default()
        };
        let mut seen = [0usize; 4];
        for _ in 0..2000 {
            seen[sample(&logits, &top2, &mut rng) as usize] += 1;
        }
        assert_eq!(seen[0] + seen[2], 0);
        // p(1) = e^3 / (e^3 + e^2) = 0.731
        let p1 = seen[1] as f64 / 2000.0;
        assert!((p1 - 0.731).abs() < 0.04, "{p1}");
        // top_p = 0.5 keeps only the most likely token here.
        let nucleus = SamplingConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.5,
            ..Default::default()
        };
        for _ in 0..20 {
            assert_eq!(sample(&logits, &nucleus, &mut rng), 1);
        }
    }
}
