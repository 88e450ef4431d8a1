//! The result schema of a simulation run: per-round metrics (`metrics.jsonl`, `metrics.csv`), the baselines,
//! the summary (`summary.json`) and the whole outcome. What must never live here: how a run computes them.

use super::*;

/// One published round, as `metrics.jsonl` records it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RoundMetrics {
    /// The round id (round 0: the base model before any round).
    pub round: u64,
    /// The model version it published.
    pub version: u64,
    /// Test loss over the evaluated clients (NaN-free; `null` when not evaluated this round).
    pub test_loss: Option<f64>,
    /// exp(test loss).
    pub perplexity: Option<f64>,
    /// Next-token accuracy.
    pub accuracy: Option<f64>,
    /// User-level ε spent by the federation (coordinator's ledger), at its δ.
    pub epsilon_user: f64,
    /// Largest example-level ε any device spent (the devices' ledgers).
    pub epsilon_device_max: f64,
    /// Mean example-level ε over devices that trained.
    pub epsilon_device_mean: f64,
    /// Clients selected (behind `[topology]` aggregators: the devices the selected aggregators take).
    pub selected: usize,
    /// Updates aggregated.
    pub participants: usize,
    /// Selected devices that dropped out.
    pub dropouts: usize,
    /// Tasks declined by devices.
    pub declined: usize,
    /// Uploads the coordinator refused (late, wrong version).
    pub refused: usize,
    /// Mean local training loss of the aggregated updates.
    pub train_loss: f64,
    /// Bytes devices sent since the previous round.
    pub bytes_up: u64,
    /// Bytes devices received since the previous round (tasks, adapters; base model bundles separately).
    pub bytes_down: u64,
    /// Base model bundles fetched since the previous round, bytes.
    pub base_bytes_down: u64,
    /// Rounds abandoned before this one was published (too few updates by the deadline).
    pub abandoned_before: u64,
    /// Simulated time at publication, seconds.
    pub sim_time_s: f64,
    /// Wall-clock time since the start of the run, seconds (the only field that varies between runs).
    pub wall_s: f64,
}

/// The baselines `--baselines` adds.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Baselines {
    /// Centralized LoRA on the union of the training data (no DP): the most accurate of its tries.
    pub centralized: Scores,
    /// Optimizer steps of the centralized baseline.
    pub centralized_steps: u64,
    /// Sequences per step of the centralized baseline.
    pub centralized_batch_size: u32,
    /// The centralized baseline's update rule (`adamw`, `sgd` in `summary.json`).
    pub centralized_optimizer: LocalOptimizer,
    /// The learning rate of the reported centralized try.
    pub centralized_learning_rate: f32,
    /// Every centralized try (one per learning rate), in the order the scenario lists them.
    pub centralized_tries: Vec<CentralizedTry>,
    /// Local-only training (each sampled client alone), scored on each client's own test split.
    pub local_only: Scores,
    /// The final federated model on the same clients' test splits.
    pub federated_on_local_clients: Scores,
    /// The base model on the same clients' test splits.
    pub base_on_local_clients: Scores,
    /// How many clients trained alone.
    pub local_only_clients: usize,
}

/// One centralized training run of the baselines.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CentralizedTry {
    /// Its learning rate.
    pub learning_rate: f32,
    /// Its scores on the test set.
    pub scores: Scores,
}

/// The whole run, as `summary.json` records it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Summary {
    /// Scenario name.
    pub scenario: String,
    /// Its seed.
    pub seed: u64,
    /// Memory or QUIC.
    pub transport: Transport,
    /// Virtual clients.
    pub clients: usize,
    /// Clients selected per round.
    pub clients_per_round: usize,
    /// Clients whose test splits are evaluated.
    pub eval_clients: usize,
    /// Adversarial clients.
    pub attackers: usize,
    /// Rounds published.
    pub rounds: u64,
    /// Rounds abandoned.
    pub rounds_abandoned: u64,
    /// The coordinator's strategy.
    pub strategy: String,
    /// Noise multiplier of user-level DP (0 when off).
    pub noise_multiplier: f64,
    /// The base model's scores.
    pub base: Scores,
    /// The final model's scores.
    pub final_scores: Scores,
    /// Final user-level ε.
    pub epsilon_user: f64,
    /// δ of user-level ε.
    pub delta_user: f64,
    /// Final largest device-level ε.
    pub epsilon_device_max: f64,
    /// Total bytes up.
    pub bytes_up: u64,
    /// Total bytes down (without base bundles).
    pub bytes_down: u64,
    /// Total base-bundle bytes down.
    pub base_bytes_down: u64,
    /// Baselines, with `--baselines`.
    pub baselines: Option<Baselines>,
    /// Fraction of the gap between base and centralized accuracy the federation closed (`None` when the
    /// centralized baseline is not more accurate than the base model).
    pub gap_closed: Option<f64>,
    /// The same for test loss (`None` when the centralized baseline's loss is not lower).
    pub gap_closed_loss: Option<f64>,
    /// SHA-256 (hex) of every published adapter, version by version.
    pub adapter_digests: Vec<String>,
    /// Simulated time, seconds.
    pub sim_time_s: f64,
    /// Wall-clock time, seconds.
    pub wall_s: f64,
}

/// A finished simulation.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// One line per published round (round 0: the base model).
    pub rounds: Vec<RoundMetrics>,
    /// The summary.
    pub summary: Summary,
    /// The final adapter's values.
    pub final_adapter: Vec<f32>,
    /// Version 0's adapter values (where training started).
    pub initial_adapter: Vec<f32>,
}
