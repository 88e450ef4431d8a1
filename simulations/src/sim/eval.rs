//! Evaluation of a model (base + adapter) on the clients' test splits: mean next-token loss, perplexity
//! and next-token (next-byte, for the byte-level model) accuracy, weighted by tokens over the evaluated
//! clients (for chat data, over the assistant turns' tokens only). The windows are fixed once per run, so every round is scored on the same text.
//!
//! What must never live here: training, or anything that changes the model.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;

use starling_model::data::{counted_targets, is_target, tokens};
use starling_model::infer::Runner;
use starling_model::{Llama, LoraAdapter, Tokenizer};

use super::data::Dataset;
use super::SimError;

/// The test windows of a run: per evaluated client, up to `windows` windows of `seq` tokens (a client
/// whose test split is shorter contributes one shorter window).
#[derive(Debug, Clone, Default)]
pub struct EvalSet {
    /// (client, window tokens).
    pub windows: Vec<(usize, Vec<u32>)>,
}

impl EvalSet {
    /// The windows of `clients` (all if empty) of `ds`.
    pub fn new(
        ds: &Dataset,
        tok: &Tokenizer,
        chat: Option<&starling_model::chat::ChatTemplate>,
        clients: &[usize],
        seq: usize,
        windows: usize,
    ) -> Result<Self, SimError> {
        let mut out = Vec::new();
        for &c in clients {
            let ids = ds.encode(ds.test(c), tok, chat)?;
            if ids.len() < 2 {
                continue;
            }
            let full: Vec<&[u32]> = ids.chunks_exact(seq).take(windows).collect();
            if full.is_empty() {
                out.push((c, ids.clone()));
            }
            out.extend(full.into_iter().map(|w| (c, w.to_vec())));
        }
        Ok(Self { windows: out })
    }

    /// A seeded sample of `n` clients out of `total` (all when `n` is 0 or ≥ total), sorted.
    pub fn sample(total: usize, n: usize, seed: u64) -> Vec<usize> {
        let mut all: Vec<usize> = (0..total).collect();
        if n > 0 && n < total {
            all.shuffle(&mut ChaCha8Rng::seed_from_u64(seed ^ 0xE7A1));
            all.truncate(n);
            all.sort_unstable();
        }
        all
    }

    /// Only the windows of `client`.
    pub fn of_client(&self, client: usize) -> EvalSet {
        EvalSet {
            windows: self
                .windows
                .iter()
                .filter(|(c, _)| *c == client)
                .cloned()
                .collect(),
        }
    }

    /// Predicted tokens in the set (those that count: not chat context).
    pub fn tokens(&self) -> u64 {
        self.windows
            .iter()
            .map(|(_, w)| counted_targets(w) as u64)
            .sum()
    }
}

/// Scores of one model on an [`EvalSet`].
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize)]
pub struct Scores {
    /// Mean next-token cross-entropy (nats).
    pub loss: f64,
    /// exp(loss).
    pub perplexity: f64,
    /// Fraction of next tokens predicted exactly (argmax).
    pub accuracy: f64,
    /// Predicted tokens.
    pub tokens: u64,
}

/// Scores `model` (+ `adapter`, applied at run time) on `set` with the native inference path —
/// the one devices run — one window at a time.
pub fn evaluate(
    model: &Llama,
    adapter: Option<&LoraAdapter>,
    set: &EvalSet,
) -> Result<Scores, SimError> {
    let runner = Runner::new(Arc::new(model.clone()), adapter)?;
    let (mut loss, mut correct, mut count) = (0f64, 0u64, 0u64);
    let vocab = model.config.vocab_size;
    for (_, w) in &set.windows {
        // Chat context (marked NO_LOSS) is read, never scored.
        let values = runner.logits_all(&tokens(w))?;
        for (t, row) in values
            .chunks_exact(vocab)
            .take(w.len().saturating_sub(1))
            .enumerate()
        {
            if !is_target(w[t + 1]) {
                continue;
            }
            let target = w[t + 1] as usize;
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let lse = max as f64
                + row
                    .iter()
                    .map(|&x| ((x - max) as f64).exp())
                    .sum::<f64>()
                    .ln();
            loss += lse - row[target] as f64;
            let argmax = row
                .iter()
                .enumerate()
                .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
                    if v > bv {
                        (i, v)
                    } else {
                        (bi, bv)
                    }
                })
                .0;
            correct += u64::from(argmax == target);
            count += 1;
        }
    }
    if count == 0 {
        return Err(SimError::Data(
            "no client has test text to evaluate on".into(),
        ));
    }
    let loss = loss / count as f64;
    Ok(Scores {
        loss,
        perplexity: loss.exp(),
        accuracy: correct as f64 / count as f64,
        tokens: count,
    })
}
