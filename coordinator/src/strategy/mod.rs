//! Aggregation strategies: how a round's client deltas become one step of the global adapter.
//!
//! Every strategy is a small type behind [`Strategy`] (Flower's shape: the engine does not know which one it
//! runs). Inputs are flat f32 deltas in the adapter schema's canonical order; the output is the step to add to
//! the global adapter. Server-side state (momentum, Adam moments) is exposed as [`StrategyState`] so the store
//! can persist it and a restarted coordinator continues bit-for-bit.
//! What must never live here: I/O, selection of clients, or privacy accounting (see `dp.rs` for the DP
//! wrapper, which only clips and noises and reports what it did).

mod bound;
mod decay;
mod dp;
mod fedavg;
mod fedopt;
mod robust;

pub use bound::NormBound;
pub use decay::CosineDecay;
pub use dp::{charged_multiplier, clipped_sum, DpFedAvg};
pub use fedavg::{FedAvg, FedAvgM};
pub use fedopt::{FedOpt, FedOptKind};
pub use robust::{Krum, Median, TrimmedMean};

use rayon::prelude::*;

/// Coordinates per parallel work item in the aggregation loops (64 KiB of f32 per update).
pub(crate) const CHUNK: usize = 16 * 1024;

/// One client's contribution to a round.
#[derive(Debug, Clone, Copy)]
pub struct ClientUpdate<'a> {
    /// Local training examples behind it (the FedAvg weight).
    pub num_examples: u64,
    /// The delta, in the adapter schema's canonical order.
    pub delta: &'a [f32],
}

/// Server-side state a strategy carries between rounds (empty for stateless ones).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StrategyState {
    /// Rounds aggregated so far.
    pub rounds: u64,
    /// Named state vectors (e.g. `"m"`, `"v"`).
    pub vectors: Vec<(String, Vec<f32>)>,
}

/// What can go wrong in aggregation.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AggregateError {
    /// No updates to aggregate.
    #[error("no updates to aggregate")]
    Empty,
    /// Updates of different lengths.
    #[error("update {index} has {got} values, expected {expected}")]
    LengthMismatch {
        /// Position of the offending update.
        index: usize,
        /// Length of the first update.
        expected: usize,
        /// Its length.
        got: usize,
    },
    /// The strategy needs more updates than arrived (e.g. Krum with f byzantine clients needs > 2f + 2).
    #[error("{strategy} needs at least {needed} updates, got {got}")]
    TooFew {
        /// The strategy.
        strategy: &'static str,
        /// Updates needed.
        needed: usize,
        /// Updates received.
        got: usize,
    },
    /// A strategy parameter is out of range.
    #[error("invalid strategy parameter: {0}")]
    InvalidParameter(String),
    /// Every update has zero examples, so weights are undefined.
    #[error("total example weight is zero")]
    ZeroWeight,
    /// Restored state does not fit the strategy or the delta length.
    #[error("strategy state does not match: {0}")]
    BadState(String),
    /// Privacy noise failed.
    #[error("privacy: {0}")]
    Privacy(String),
}

impl From<starling_privacy::PrivacyError> for AggregateError {
    fn from(e: starling_privacy::PrivacyError) -> Self {
        AggregateError::Privacy(e.to_string())
    }
}

/// One aggregation rule.
pub trait Strategy: Send {
    /// Stable name, recorded in manifests.
    fn name(&self) -> String;
    /// The FedProx proximal μ clients should use (0 unless the strategy is FedProx).
    fn proximal_mu(&self) -> f32 {
        0.0
    }
    /// The step to add to the global adapter for this round's updates.
    fn aggregate(&mut self, updates: &[ClientUpdate<'_>]) -> Result<Vec<f32>, AggregateError>;
    /// Whether the rule needs only the sum of the deltas, so it composes with secure aggregation (the
    /// coordinator never sees one delta alone): the FedAvg family, the server optimizers, DP-FedAvg.
    fn linear(&self) -> bool {
        false
    }
    /// The step for a round of which only the weighted sum of the deltas and the total `weight` are
    /// known (secure aggregation). A linear rule sees it as one update, their weighted mean.
    fn aggregate_sum(&mut self, sum: &[f32], weight: f64) -> Result<Vec<f32>, AggregateError> {
        if !self.linear() {
            return Err(AggregateError::InvalidParameter(format!(
                "{} needs every update, not only their sum",
                self.name()
            )));
        }
        if !(weight.is_finite() && weight > 0.0) {
            return Err(AggregateError::ZeroWeight);
        }
        let mean: Vec<f32> = sum
            .iter()
            .map(|x| (f64::from(*x) / weight) as f32)
            .collect();
        self.aggregate(&[ClientUpdate {
            num_examples: 1,
            delta: &mean,
        }])
    }
    /// State to persist after a round.
    fn state(&self) -> StrategyState {
        StrategyState::default()
    }
    /// Restores persisted state.
    fn restore(&mut self, state: StrategyState) -> Result<(), AggregateError> {
        if state.vectors.is_empty() {
            Ok(())
        } else {
            Err(AggregateError::BadState(format!(
                "{} keeps no vectors",
                self.name()
            )))
        }
    }
}

/// The common length of all deltas, or an error.
pub(crate) fn check(updates: &[ClientUpdate<'_>]) -> Result<usize, AggregateError> {
    let first = updates.first().ok_or(AggregateError::Empty)?.delta.len();
    for (i, u) in updates.iter().enumerate() {
        if u.delta.len() != first {
            return Err(AggregateError::LengthMismatch {
                index: i,
                expected: first,
                got: u.delta.len(),
            });
        }
    }
    Ok(first)
}

/// `Σ wᵢ·deltaᵢ` over coordinates, streamed chunk by chunk in parallel (each chunk reads every update once).
pub fn weighted_sum(
    updates: &[ClientUpdate<'_>],
    weights: &[f32],
) -> Result<Vec<f32>, AggregateError> {
    let n = check(updates)?;
    let mut out = vec![0f32; n];
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, acc)| {
        let start = c * CHUNK;
        for (u, &w) in updates.iter().zip(weights) {
            let src = &u.delta[start..start + acc.len()];
            for (a, &x) in acc.iter_mut().zip(src) {
                *a += w * x;
            }
        }
    });
    Ok(out)
}

/// The example-weighted mean of the deltas (FedAvg's average).
pub fn weighted_mean(updates: &[ClientUpdate<'_>]) -> Result<Vec<f32>, AggregateError> {
    check(updates)?;
    let total: f64 = updates.iter().map(|u| u.num_examples as f64).sum();
    if total <= 0.0 {
        return Err(AggregateError::ZeroWeight);
    }
    let weights: Vec<f32> = updates
        .iter()
        .map(|u| (u.num_examples as f64 / total) as f32)
        .collect();
    weighted_sum(updates, &weights)
}

/// Builds a strategy from its configuration.
pub fn build(config: &StrategyConfig) -> Result<Box<dyn Strategy>, AggregateError> {
    let inner: Box<dyn Strategy> = match config.kind {
        StrategyKind::FedAvg => Box::new(FedAvg::new(config.server_lr, 0.0)?),
        StrategyKind::FedProx => Box::new(FedAvg::new(config.server_lr, config.proximal_mu)?),
        StrategyKind::FedAvgM => Box::new(FedAvgM::new(config.server_lr, config.momentum)?),
        StrategyKind::FedAdam | StrategyKind::FedYogi | StrategyKind::FedAdagrad => {
            let kind = match config.kind {
                StrategyKind::FedAdam => FedOptKind::Adam,
                StrategyKind::FedYogi => FedOptKind::Yogi,
                _ => FedOptKind::Adagrad,
            };
            Box::new(FedOpt::new(
                kind,
                config.server_lr,
                config.beta1,
                config.beta2,
                config.tau,
            )?)
        }
        StrategyKind::Median => Box::new(Median),
        StrategyKind::TrimmedMean => Box::new(TrimmedMean::new(config.trim_beta)?),
        StrategyKind::Krum => Box::new(Krum::new(config.byzantine, 1)?),
        StrategyKind::MultiKrum => Box::new(Krum::new(config.byzantine, config.multi_krum_m)?),
    };
    let inner = match config.lr_decay_rounds {
        Some(h) => Box::new(CosineDecay::new(h, config.lr_decay_floor, inner)?),
        None => inner,
    };
    Ok(match config.norm_bound {
        Some(b) => Box::new(NormBound::new(b, inner)?),
        None => inner,
    })
}

/// Which aggregation rule.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum StrategyKind {
    /// Example-weighted mean (McMahan et al. 2017).
    FedAvg,
    /// FedAvg on the server; clients add the proximal term μ/2‖w − w_global‖² (Li et al. 2020).
    FedProx,
    /// FedAvg with server momentum (Hsu et al. 2019).
    FedAvgM,
    /// Server Adam on the averaged delta (Reddi et al. 2021).
    FedAdam,
    /// Server Yogi (Reddi et al. 2021).
    FedYogi,
    /// Server Adagrad (Reddi et al. 2021).
    FedAdagrad,
    /// Coordinate-wise median (Yin et al. 2018).
    Median,
    /// Coordinate-wise β-trimmed mean (Yin et al. 2018).
    TrimmedMean,
    /// Krum (Blanchard et al. 2017).
    Krum,
    /// Multi-Krum: mean of the m best-scored updates.
    MultiKrum,
}

/// Strategy settings (the `[strategy]` table of coordinator.toml).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StrategyConfig {
    /// The rule.
    pub kind: StrategyKind,
    /// Server learning rate η (1.0 for plain FedAvg; ~1e-2 for FedAdam/Yogi).
    pub server_lr: f32,
    /// FedAvgM momentum β.
    pub momentum: f32,
    /// FedOpt β₁.
    pub beta1: f32,
    /// FedOpt β₂.
    pub beta2: f32,
    /// FedOpt adaptivity τ.
    pub tau: f32,
    /// FedProx μ sent to clients.
    pub proximal_mu: f32,
    /// Trimmed mean: fraction trimmed from each end.
    pub trim_beta: f32,
    /// Krum: assumed number of byzantine clients f.
    pub byzantine: usize,
    /// Multi-Krum: updates averaged.
    pub multi_krum_m: usize,
    /// Clip every update to this L2 norm before the rule (norm bounding).
    pub norm_bound: Option<f32>,
    /// Decay the server step along a cosine over this many rounds (none: a constant rate).
    pub lr_decay_rounds: Option<u64>,
    /// The fraction of the server step left once `lr_decay_rounds` have passed.
    pub lr_decay_floor: f32,
}

impl Default for StrategyConfig {
    fn default() -> Self {
        Self {
            kind: StrategyKind::FedAvg,
            server_lr: 1.0,
            momentum: 0.9,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-3,
            proximal_mu: 0.01,
            trim_beta: 0.1,
            byzantine: 1,
            multi_krum_m: 3,
            norm_bound: None,
            lr_decay_rounds: None,
            lr_decay_floor: 0.0,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Updates from plain vectors.
    pub(crate) fn ups<'a>(v: &'a [(u64, Vec<f32>)]) -> Vec<ClientUpdate<'a>> {
        v.iter()
            .map(|(n, d)| ClientUpdate {
                num_examples: *n,
                delta: d,
            })
            .collect()
    }

    #[test]
    fn weighted_mean_by_hand() {
        let v = vec![(1, vec![1.0, 2.0]), (3, vec![5.0, -2.0])];
        // (1·1 + 3·5)/4 = 4, (1·2 − 3·2)/4 = −1
        assert_eq!(weighted_mean(&ups(&v)).unwrap(), vec![4.0, -1.0]);
        let zero = vec![(0, vec![1.0])];
        assert_eq!(weighted_mean(&ups(&zero)), Err(AggregateError::ZeroWeight));
        assert_eq!(weighted_mean(&[]), Err(AggregateError::Empty));
        let ragged = vec![(1, vec![1.0]), (1, vec![1.0, 2.0])];
        assert!(matches!(
            weighted_mean(&ups(&ragged)),
            Err(AggregateError::LengthMismatch { index: 1, .. })
        ));
    }

    #[test]
    fn streaming_sum_matches_a_plain_loop_across_chunk_boundaries_and_orders() {
        let n = CHUNK * 2 + 17;
        let v: Vec<(u64, Vec<f32>)> = (0..5)
            .map(|k| {
                (
                    k + 1,
                    (0..n)
                        .map(|i| ((i * (k as usize + 3)) % 101) as f32 * 0.01)
                        .collect(),
                )
            })
            .collect();
        let got = weighted_mean(&ups(&v)).unwrap();
        let total: f64 = v.iter().map(|(w, _)| *w as f64).sum();
        for i in [0, CHUNK - 1, CHUNK, n - 1] {
            let want: f64 = v
                .iter()
                .map(|(w, d)| *w as f64 * f64::from(d[i]))
                .sum::<f64>()
                / total;
            assert!((f64::from(got[i]) - want).abs() < 1e-5);
        }
        let mut rev = v.clone();
        rev.reverse();
        let again = weighted_mean(&ups(&rev)).unwrap();
        assert!(
            got.iter().zip(&again).all(|(a, b)| (a - b).abs() < 1e-5),
            "order-independent"
        );
    }

    #[test]
    fn config_builds_every_strategy_and_refuses_unknown_keys() {
        for kind in [
            StrategyKind::FedAvg,
            StrategyKind::FedProx,
            StrategyKind::FedAvgM,
            StrategyKind::FedAdam,
            StrategyKind::FedYogi,
            StrategyKind::FedAdagrad,
            StrategyKind::Median,
            StrategyKind::TrimmedMean,
            StrategyKind::Krum,
            StrategyKind::MultiKrum,
        ] {
            let s = build(&StrategyConfig {
                kind,
                norm_bound: Some(1.0),
                ..StrategyConfig::default()
            })
            .unwrap();
            assert!(!s.name().is_empty());
            let decayed = build(&StrategyConfig {
                kind,
                lr_decay_rounds: Some(100),
                ..StrategyConfig::default()
            })
            .unwrap();
            assert!(decayed.name().ends_with("+cosine(rounds=100,floor=0)"));
        }
        let prox = build(&StrategyConfig {
            kind: StrategyKind::FedProx,
            proximal_mu: 0.1,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(prox.proximal_mu(), 0.1);
        let bad: Result<StrategyConfig, _> =
            toml::from_str("kind = \"fed-avg\"\nlearning_rate = 1.0");
        assert!(bad.is_err());
        let ok: StrategyConfig =
            toml::from_str("kind = \"trimmed-mean\"\ntrim_beta = 0.2").unwrap();
        assert_eq!(ok.kind, StrategyKind::TrimmedMean);
    }
}
