//! Scenario files: one TOML file describes a whole simulated federation — model, data and partition, the
//! population of virtual devices, adversaries, evaluation — and carries the coordinator's own tables
//! (`[rounds]`, `[strategy]`, `[privacy]`, `[task]`, `[adapter]`, `[secure_aggregation]`) exactly as `coordinator.toml` spells
//! them, validated by the coordinator's own checks. Unknown keys are errors.
//!
//! What must never live here: running anything (that is [`super::run`]).

use std::path::{Path, PathBuf};

use starling_coordinator::config::{
    AdapterConfig, CoordinatorConfig, DpPlacement, PrivacyConfig, SecAggConfig, TaskConfig,
};
use starling_coordinator::engine::{EngineConfig, Selection};
use starling_coordinator::strategy::StrategyConfig;
use starling_model::QuantType;
use starling_privacy::{accountant, AccountantKind, DpEvent};
use starling_protocol::message::LocalOptimizer;

use super::SimError;

/// The scenario `starling-sim run` runs with no argument (scenarios/default.toml, embedded).
pub const DEFAULT: &str = include_str!("../../../scenarios/default.toml");

/// A whole scenario file.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Name, seed, model, size of the run.
    pub simulation: SimulationConfig,
    /// Data set and partition.
    #[serde(default)]
    pub data: DataConfig,
    /// The virtual devices: speed, bandwidth, dropouts.
    #[serde(default)]
    pub devices: DeviceConfig,
    /// Adversarial clients.
    #[serde(default)]
    pub attack: AttackConfig,
    /// How the published models are evaluated.
    #[serde(default)]
    pub evaluation: EvalConfig,
    /// The baselines `--baselines` adds.
    #[serde(default)]
    pub baselines: BaselineConfig,
    /// The coordinator's round engine (`[rounds]` of coordinator.toml; `rounds`, `seed` and `selection`
    /// come from `[simulation]`).
    #[serde(default)]
    pub rounds: EngineConfig,
    /// The coordinator's aggregation rule (`[strategy]` of coordinator.toml).
    #[serde(default)]
    pub strategy: StrategyConfig,
    /// User-level DP-FedAvg (`[privacy]` of coordinator.toml).
    #[serde(default)]
    pub privacy: PrivacyConfig,
    /// Local training each task asks for (`[task]` of coordinator.toml).
    #[serde(default)]
    pub task: TaskConfig,
    /// The LoRA adapter (`[adapter]` of coordinator.toml).
    #[serde(default)]
    pub adapter: AdapterConfig,
    /// Secure aggregation (`[secure_aggregation]` of coordinator.toml).
    #[serde(default)]
    pub secure_aggregation: SecAggConfig,
    /// A tier of edge aggregators between the devices and the root.
    #[serde(default)]
    pub topology: TopologyConfig,
}

/// The `[topology]` table: devices behind real edge aggregators (the coordinator's own, in this process)
/// in front of the root in hierarchical mode.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopologyConfig {
    /// Edge aggregators (0: devices talk to the coordinator itself). Device `c` sits behind aggregator
    /// `c mod aggregators`; each takes `⌈clients_per_round / aggregators⌉` devices a round, first come.
    pub aggregators: usize,
    /// An aggregator forwards its cohort early once every device it took uploaded and none joined for
    /// this long, ms (else when full, or at its cut-off `forward_margin_ms` before the root's deadline).
    pub quiet_ms: u64,
    /// The cut-off before the root's deadline, ms.
    pub forward_margin_ms: u64,
    /// Each aggregator's link to the root for partial sums: bandwidth, Mbit/s (a sum arrives once the
    /// sums before it and its own bytes are sent, plus the latency).
    pub uplink_mbps: f64,
    /// Its latency, ms.
    pub uplink_latency_ms: u64,
}

impl Default for TopologyConfig {
    fn default() -> Self {
        Self {
            aggregators: 0,
            quiet_ms: 5_000,
            forward_margin_ms: 10_000,
            uplink_mbps: 100.0,
            uplink_latency_ms: 20,
        }
    }
}

/// How many clients a round selects: a count (`10`) or a fraction of the connected ones (`0.05`).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum PerRound {
    /// Exactly this many.
    Count(usize),
    /// This fraction.
    Fraction(f64),
}

/// The `[simulation]` table.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimulationConfig {
    /// Name, shown in reports.
    pub name: String,
    /// Seed of everything: data partition, devices, selection, training, noise.
    pub seed: u64,
    /// Base model directory (HF checkpoint); relative paths are looked up from the current directory,
    /// then from the scenario file's directory, then from the Starling source tree.
    pub base_model: PathBuf,
    /// How devices hold the frozen weights.
    pub quant: QuantType,
    /// Rounds to publish.
    pub rounds: u64,
    /// Clients selected per round.
    pub clients_per_round: PerRound,
    /// User-level DP: the noise multiplier is calibrated so that `rounds` rounds spend at most this ε
    /// at `[privacy] delta` (needs `[privacy] mode` central or distributed).
    pub target_epsilon: Option<f64>,
    /// Coordinator ticks, simulated milliseconds apart.
    pub tick_ms: u64,
    /// Arithmetic of the clients' frozen-weight products: `f32`, or `bf16` (bf16 inputs, f32 sums;
    /// ~1.4× faster where the CPU has AVX512-BF16, f32 elsewhere; results then depend on the CPU).
    pub precision: starling_model::engine::Precision,
}

impl Default for SimulationConfig {
    fn default() -> Self {
        Self {
            name: "unnamed".into(),
            seed: 0,
            base_model: PathBuf::from("assets/models/starling-tiny"),
            quant: QuantType::Q8_0,
            rounds: 10,
            clients_per_round: PerRound::Count(10),
            target_epsilon: None,
            tick_ms: 1_000,
            precision: Default::default(),
        }
    }
}

/// Where the clients' text comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Dataset {
    /// The shipped Shakespeare corpus (LEAF-style), restricted to `works`.
    Shakespeare,
    /// `path` holds one sub-folder (or one `.txt` file) per client: the user's own text.
    Folder,
}

/// How the text is dealt to clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Partition {
    /// One client per (play, speaking role), as LEAF's Shakespeare (naturally non-IID).
    Roles,
    /// Speeches shuffled and dealt evenly to `clients` clients.
    Iid,
    /// Each play's speeches split across `clients` clients by Dirichlet(`alpha`) proportions.
    Dirichlet,
    /// One client per sub-folder or file of `path` (the folder data set).
    Folders,
    /// Populations larger than the corpus: each of `clients` clients draws `speeches_per_client`
    /// speeches uniformly, with replacement, from a training pool of the chosen works' speeches, and its
    /// test split from a disjoint test pool (`test_fraction` of the speeches). IID; clients overlap in
    /// text (a speech is in many clients' data, so user-level DP protects clients, not speeches).
    Sampled,
}

/// Which works of the corpus are used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Works {
    /// Those in assets/shakespeare/HELD_OUT: the base model never saw them.
    HeldOut,
    /// Every work (the base model saw most of them; for load tests).
    All,
}

/// The `[data]` table.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Shakespeare or a folder of the user's text.
    pub dataset: Dataset,
    /// The corpus directory (Shakespeare) or the folder of clients.
    pub path: PathBuf,
    /// How text is dealt to clients.
    pub partition: Partition,
    /// Which works (Shakespeare).
    pub works: Works,
    /// Clients (IID and Dirichlet: how many to make; roles and folders: at most this many, 0 = all).
    pub clients: usize,
    /// Dirichlet concentration α (small: each client sees few plays).
    pub alpha: f64,
    /// Fraction of each client's text, by order, held out as its test split.
    pub test_fraction: f64,
    /// Clients with less text than this (bytes) are left out, as LEAF leaves out tiny roles.
    pub min_bytes: usize,
    /// Speeches each client draws (the sampled partition).
    pub speeches_per_client: usize,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            dataset: Dataset::Shakespeare,
            path: PathBuf::from("assets/shakespeare"),
            partition: Partition::Roles,
            works: Works::HeldOut,
            clients: 0,
            alpha: 0.5,
            test_fraction: 0.2,
            min_bytes: 600,
            speeches_per_client: 8,
        }
    }
}

/// The `[devices]` table: heterogeneity of the virtual devices.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeviceConfig {
    /// Simulated milliseconds one local step takes on a device of speed 1.
    pub step_ms: u64,
    /// Device speed factors, drawn log-uniformly from [min, max] (0.25: four times slower).
    pub speed: [f64; 2],
    /// Uplink bandwidth in Mbit/s, drawn log-uniformly from [min, max].
    pub up_mbps: [f64; 2],
    /// Downlink bandwidth in Mbit/s, drawn log-uniformly from [min, max].
    pub down_mbps: [f64; 2],
    /// Round-trip latency of one request, simulated milliseconds.
    pub latency_ms: u64,
    /// Probability that a device given a task drops out before it reports (it goes offline).
    pub dropout: f64,
    /// How long a device that dropped out stays offline, simulated milliseconds.
    pub offline_ms: u64,
    /// Spread of the devices' first connection, simulated milliseconds.
    pub startup_ms: u64,
    /// Each device's example-level ε limit (its `max_epsilon`; `None`: no limit).
    pub max_epsilon: Option<f64>,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        Self {
            step_ms: 1_000,
            speed: [1.0, 1.0],
            up_mbps: [10.0, 10.0],
            down_mbps: [50.0, 50.0],
            latency_ms: 50,
            dropout: 0.0,
            offline_ms: 600_000,
            startup_ms: 1_000,
            max_epsilon: None,
        }
    }
}

/// What an adversarial client does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttackKind {
    /// Sends −scale × its honest delta.
    SignFlip,
    /// Sends scale × its honest delta (model replacement / boosting).
    Scale,
    /// Sends Gaussian noise with scale × the RMS of its honest delta.
    Noise,
    /// Trains honestly on corrupted text (bytes shuffled within each line).
    CorruptText,
    /// Colluders send one shared vector: the model's last published step reversed and times scale,
    /// −scale × (v_t − v_{t−1}), computed from public models — identical for every colluder without a
    /// channel between them (the inner-product manipulation of Xie et al., 2020). Identical updates
    /// are what Krum rewards. In the first round, with no step yet, its own delta sign-flipped.
    Collude,
}

/// The `[attack]` table.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AttackConfig {
    /// Fraction of the clients that are adversarial (chosen by the seed).
    pub fraction: f64,
    /// The attack.
    pub kind: AttackKind,
    /// Its strength (see [`AttackKind`]).
    pub scale: f32,
}

impl Default for AttackConfig {
    fn default() -> Self {
        Self {
            fraction: 0.0,
            kind: AttackKind::SignFlip,
            scale: 1.0,
        }
    }
}

/// The `[evaluation]` table.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Clients whose test splits are evaluated (a fixed seeded sample; 0 = all).
    pub clients: usize,
    /// Test windows of `seq_len` tokens per client, at most.
    pub windows_per_client: usize,
    /// Window length (0: the task's `seq_len`).
    pub seq_len: usize,
    /// Evaluate every this many rounds (the last round always).
    pub every: u64,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            clients: 0,
            windows_per_client: 2,
            seq_len: 0,
            every: 1,
        }
    }
}

/// The `[baselines]` table (used with `--baselines`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BaselineConfig {
    /// Local-only training: how many of the evaluated clients train alone (a seeded sample).
    pub local_only_clients: usize,
    /// Optimizer steps of the centralized baseline (default: rounds × the task's local steps).
    pub centralized_steps: Option<u64>,
    /// Sequences per step of the centralized baseline (default: the task's batch size).
    pub centralized_batch_size: Option<u32>,
    /// Learning rates the centralized baseline tries, each from the base adapter; the most accurate on the
    /// test set is reported, so the baseline is an upper bound on what these settings reach (default: the
    /// task's learning rate alone; f32, as the task's rate is).
    pub centralized_learning_rates: Vec<f32>,
    /// The centralized baseline's update rule (default: the task's). A federation whose devices run SGD
    /// (DP-FedAvg's local rule) is fairly compared with the best centralized model, which AdamW trains.
    pub centralized_optimizer: Option<LocalOptimizer>,
}

/// The centralized baseline's schedule, the scenario's defaults filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct CentralizedPlan {
    /// Optimizer steps.
    pub steps: u32,
    /// Sequences per step.
    pub batch_size: u32,
    /// The update rule.
    pub optimizer: LocalOptimizer,
    /// Learning rates to try, each from the base adapter.
    pub learning_rates: Vec<f32>,
}

impl Default for BaselineConfig {
    fn default() -> Self {
        Self {
            local_only_clients: 10,
            centralized_steps: None,
            centralized_batch_size: None,
            centralized_learning_rates: Vec::new(),
            centralized_optimizer: None,
        }
    }
}

/// The most learning rates `[baselines] centralized_learning_rates` may list (each is a training run).
pub const MAX_CENTRALIZED_TRIES: usize = 16;

/// The largest `[baselines] centralized_batch_size`.
pub const MAX_CENTRALIZED_BATCH: u32 = 4096;

impl BaselineConfig {
    /// The centralized baseline's settings for `scen`, defaults filled in from the task.
    pub fn centralized(&self, scen: &Scenario) -> CentralizedPlan {
        let steps = self.centralized_steps.map_or_else(
            || scen.federation_steps(),
            |s| s.min(u64::from(u32::MAX)) as u32,
        );
        let batch = self.centralized_batch_size.unwrap_or(scen.task.batch_size);
        let learning_rates = if self.centralized_learning_rates.is_empty() {
            vec![scen.task.learning_rate]
        } else {
            self.centralized_learning_rates.clone()
        };
        CentralizedPlan {
            steps,
            batch_size: batch,
            optimizer: self.centralized_optimizer.unwrap_or(scen.task.optimizer),
            learning_rates,
        }
    }

    fn check(&self) -> Result<(), String> {
        if let Some(s) = self.centralized_steps {
            if s == 0 || s > u64::from(u32::MAX) {
                return Err(format!(
                    "baselines.centralized_steps must lie in 1..={}",
                    u32::MAX
                ));
            }
        }
        if let Some(b) = self.centralized_batch_size {
            if b == 0 || b > MAX_CENTRALIZED_BATCH {
                return Err(format!(
                    "baselines.centralized_batch_size must lie in 1..={MAX_CENTRALIZED_BATCH}"
                ));
            }
        }
        if self.centralized_learning_rates.len() > MAX_CENTRALIZED_TRIES {
            return Err(format!(
                "baselines.centralized_learning_rates lists at most {MAX_CENTRALIZED_TRIES} rates (each is a training run)"
            ));
        }
        if self
            .centralized_learning_rates
            .iter()
            .any(|lr| !(lr.is_finite() && *lr > 0.0 && *lr <= 1.0))
        {
            return Err("baselines.centralized_learning_rates must lie in (0, 1]".into());
        }
        Ok(())
    }
}

impl Scenario {
    /// Parses and checks a scenario; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, SimError> {
        let s: Scenario = starling_cli::config::parse(text, origin)
            .map_err(|e| SimError::Scenario(e.to_string()))?;
        s.validate(origin)?;
        Ok(s)
    }

    /// Reads and checks a scenario file.
    pub fn load(path: &Path) -> Result<Self, SimError> {
        let text =
            starling_cli::config::read(path).map_err(|e| SimError::Scenario(e.to_string()))?;
        Self::parse(&text, &path.display().to_string())
    }

    /// The embedded default scenario.
    pub fn default_scenario() -> Result<Self, SimError> {
        Self::parse(DEFAULT, "scenarios/default.toml (embedded)")
    }

    /// Checks the scenario's values against each other and the coordinator's own validation (`origin`
    /// names it in the errors).
    pub fn validate(&self, origin: &str) -> Result<(), SimError> {
        let bad = |m: String| Err(SimError::Scenario(format!("{origin}: {m}")));
        let s = &self.simulation;
        if s.rounds == 0 {
            return bad("simulation.rounds must be at least 1".into());
        }
        match s.clients_per_round {
            PerRound::Count(0) => return bad("simulation.clients_per_round must be ≥ 1".into()),
            PerRound::Fraction(f) if !(f > 0.0 && f <= 1.0) => {
                return bad("simulation.clients_per_round as a fraction must lie in (0, 1]".into())
            }
            _ => {}
        }
        if s.tick_ms == 0 {
            return bad("simulation.tick_ms must be positive".into());
        }
        if let Some(e) = s.target_epsilon {
            if !(e > 0.0 && e.is_finite()) {
                return bad("simulation.target_epsilon must be positive".into());
            }
            if self.privacy.mode == DpPlacement::Off {
                return bad("simulation.target_epsilon needs [privacy] mode = \"central\" or \"distributed\"".into());
            }
            if self.privacy.mode == DpPlacement::Distributed && self.secure_aggregation.enabled {
                return bad("simulation.target_epsilon calibrates the Gaussian: with secure aggregation the \
                            distributed discrete Gaussian is accounted instead — set [privacy] \
                            noise_multiplier (plan it with `starling-coordinator privacy ddg-epsilon`)"
                    .into());
            }
        }
        let t = &self.topology;
        if t.aggregators > 0 && !(t.uplink_mbps > 0.0 && t.uplink_mbps.is_finite()) {
            return bad("topology.uplink_mbps must be positive".into());
        }
        let d = &self.data;
        if !(d.test_fraction > 0.0 && d.test_fraction < 1.0) {
            return bad("data.test_fraction must lie in (0, 1)".into());
        }
        if d.partition == Partition::Dirichlet && !(d.alpha > 0.0 && d.alpha.is_finite()) {
            return bad("data.alpha must be positive".into());
        }
        if matches!(
            d.partition,
            Partition::Iid | Partition::Dirichlet | Partition::Sampled
        ) && d.clients == 0
        {
            return bad(
                "data.clients must be set for the iid, dirichlet and sampled partitions".into(),
            );
        }
        if d.partition == Partition::Sampled && d.speeches_per_client < 2 {
            return bad("data.speeches_per_client must be at least 2".into());
        }
        if (d.dataset == Dataset::Folder) != (d.partition == Partition::Folders) {
            return bad(
                "the folder data set goes with partition = \"folders\" (and only it)".into(),
            );
        }
        let v = &self.devices;
        let range_ok = |r: [f64; 2]| r[0] > 0.0 && r[0] <= r[1] && r[1].is_finite();
        if !range_ok(v.speed) || !range_ok(v.up_mbps) || !range_ok(v.down_mbps) {
            return bad(
                "devices.speed, up_mbps and down_mbps are [min, max] with 0 < min ≤ max".into(),
            );
        }
        if !(0.0..1.0).contains(&v.dropout) {
            return bad("devices.dropout must lie in [0, 1)".into());
        }
        if v.step_ms == 0 {
            return bad("devices.step_ms must be positive".into());
        }
        if !(0.0..=1.0).contains(&self.attack.fraction) {
            return bad("attack.fraction must lie in [0, 1]".into());
        }
        if !(self.attack.scale.is_finite() && self.attack.scale >= 0.0) {
            return bad("attack.scale must be finite and ≥ 0".into());
        }
        if self.evaluation.windows_per_client == 0 || self.evaluation.every == 0 {
            return bad("evaluation.windows_per_client and evaluation.every must be ≥ 1".into());
        }
        if let Err(m) = self.baselines.check() {
            return bad(m);
        }
        // Checked for a population the size of one cohort (the real one is known when the data are).
        let cohort = match self.simulation.clients_per_round {
            PerRound::Count(m) => m.max(1),
            PerRound::Fraction(_) => 1,
        };
        self.coordinator_config(cohort, 1)?;
        Ok(())
    }

    /// The coordinator configuration this scenario runs, for a population of `clients` (the sampling rate
    /// of a target ε depends on it) and an adapter of `num_params` values (the certified noise multiplier
    /// does), checked by the coordinator's own validation.
    pub fn coordinator_config(
        &self,
        clients: usize,
        num_params: usize,
    ) -> Result<CoordinatorConfig, SimError> {
        let s = &self.simulation;
        let mut rounds = self.rounds.clone();
        rounds.rounds = Some(s.rounds);
        rounds.seed = s.seed;
        rounds.selection = match s.clients_per_round {
            PerRound::Count(m) => Selection::Count(m),
            PerRound::Fraction(q) => Selection::Fraction(q),
        };
        let per_round = self.per_round(clients);
        rounds.min_clients = rounds.min_clients.min(per_round).max(1);
        if self.secure_aggregation.enabled {
            // Every virtual device is online: a secure round waits for its whole cohort.
            rounds.min_clients = per_round;
        }
        rounds.min_updates = rounds.min_updates.min(per_round).max(1);
        let mut hierarchy = starling_coordinator::config::HierarchyConfig::default();
        let edges = self.topology.aggregators;
        if edges > 0 {
            // The root's rounds count aggregators: every one of them, each bringing its cohort; a
            // round needs as many aggregators as hold `min_updates` devices between them.
            let cohort = self.cohort_size(clients);
            if edges > per_round {
                return Err(SimError::Scenario(format!(
                    "topology.aggregators = {edges} exceeds the {per_round} devices a round takes: \
                     every aggregator needs a device"
                )));
            }
            let min = starling_coordinator::secagg::MIN_COHORT;
            if self.secure_aggregation.enabled && cohort < min {
                return Err(SimError::Scenario(format!(
                    "with secure aggregation each aggregator's cohort needs {min} devices or more; \
                     {per_round} devices a round over {edges} aggregators give {cohort}"
                )));
            }
            rounds.selection = Selection::Count(edges);
            rounds.min_clients = edges;
            rounds.min_updates = rounds.min_updates.div_ceil(cohort).clamp(1, edges);
            hierarchy.enabled = true;
            hierarchy.devices_per_round = per_round;
        }
        let mut privacy = self.privacy.clone();
        if let Some(target) = s.target_epsilon {
            // Behind aggregators the root charges every round at q = 1 (it does not see how each
            // aggregator picked its devices).
            let q = if edges > 0 {
                1.0
            } else {
                (per_round as f64 / clients.max(1) as f64).min(1.0)
            };
            privacy.noise_multiplier = calibrate(target, q, s.rounds, &privacy, num_params)?;
            privacy.epsilon_budget = target;
        }
        let cfg = CoordinatorConfig {
            rounds,
            strategy: self.strategy.clone(),
            privacy,
            task: self.task.clone(),
            adapter: self.adapter.clone(),
            secure_aggregation: self.secure_aggregation.clone(),
            hierarchy,
            ..CoordinatorConfig::default()
        };
        cfg.validate("scenario")
            .map_err(|e| SimError::Scenario(e.to_string()))?;
        Ok(cfg)
    }

    /// Devices each edge aggregator takes a round (with `[topology] aggregators`).
    pub fn cohort_size(&self, clients: usize) -> usize {
        self.per_round(clients)
            .div_ceil(self.topology.aggregators.max(1))
            .max(1)
    }

    /// The optimizer steps a device of the federation would take in the whole run (rounds × local
    /// steps, at most `u32::MAX`): the baselines' default schedule length.
    pub fn federation_steps(&self) -> u32 {
        self.simulation
            .rounds
            .saturating_mul(u64::from(self.task.local_steps))
            .min(u64::from(u32::MAX)) as u32
    }

    /// Clients selected per round out of `clients`.
    pub fn per_round(&self, clients: usize) -> usize {
        match self.simulation.clients_per_round {
            PerRound::Count(m) => m.min(clients.max(1)),
            PerRound::Fraction(q) => {
                ((q * clients as f64).round() as usize).clamp(1, clients.max(1))
            }
        }
    }
}

/// The smallest noise multiplier whose certified value keeps `rounds` rounds at sampling rate `q`
/// within `target` ε at the configured δ.
pub fn calibrate(
    target: f64,
    q: f64,
    rounds: u64,
    privacy: &PrivacyConfig,
    num_params: usize,
) -> Result<f64, SimError> {
    let kind: AccountantKind = privacy.accountant;
    let mut z = accountant::calibrate_noise_multiplier(target, privacy.delta, q, rounds, kind)?;
    for _ in 0..200 {
        let eff = starling_coordinator::strategy::charged_multiplier(
            privacy.mode == DpPlacement::Central,
            privacy.clip,
            z,
            num_params.max(1),
        )?;
        let eps =
            accountant::epsilon(&[DpEvent::new(q, eff, rounds)?], privacy.delta, kind)?.epsilon;
        if eps <= target {
            return Ok(z);
        }
        z *= 1.002;
    }
    Err(SimError::Scenario(format!(
        "no noise multiplier reaches ε = {target} (q = {q}, {rounds} rounds)"
    )))
}

/// Resolves a path of a scenario: as given, then beside the scenario file, then in the source tree.
pub fn resolve(path: &Path, scenario_dir: Option<&Path>) -> PathBuf {
    if path.is_absolute() || path.exists() {
        return path.to_path_buf();
    }
    if let Some(d) = scenario_dir {
        let p = d.join(path);
        if p.exists() {
            return p;
        }
    }
    let tree = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path);
    if tree.exists() {
        return tree;
    }
    path.to_path_buf()
}
