//! `coordinator.toml`: every knob of the engine, strategy, privacy, task and network, with defaults.
//! Unknown keys are errors, so a typo never silently falls back to a default.

use std::net::SocketAddr;
use std::path::Path;

pub use starling_cli::config::ConfigError;
use starling_protocol::message::LocalOptimizer;

use crate::engine::{EngineConfig, Selection};
pub use crate::secagg::SecAggConfig;
use crate::secagg::MIN_COHORT;
use crate::strategy::StrategyConfig;

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoordinatorConfig {
    /// Where to listen.
    pub network: NetworkConfig,
    /// Round lifecycle.
    pub rounds: EngineConfig,
    /// Aggregation rule (ignored, except `server_lr`, when user-level DP is on: DP-FedAvg aggregates).
    pub strategy: StrategyConfig,
    /// User-level differential privacy across rounds.
    pub privacy: PrivacyConfig,
    /// What clients are asked to do.
    pub task: TaskConfig,
    /// The LoRA adapter every client trains.
    pub adapter: AdapterConfig,
    /// Secure aggregation (SecAgg+): the coordinator learns only the sum of a round's deltas.
    pub secure_aggregation: SecAggConfig,
    /// A tier of edge aggregators between devices and this coordinator (the root).
    pub hierarchy: HierarchyConfig,
}

/// Hierarchical mode: devices connect to edge aggregators (`starling-coordinator aggregator serve`), each
/// forwards one weighted partial sum per round, and this coordinator (the root) combines them. The round
/// settings (`[rounds]`) then count aggregators: `min_clients`, `selection` and `min_updates` are
/// aggregators, each bringing its cohort of devices.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HierarchyConfig {
    /// Serve edge aggregators instead of devices.
    pub enabled: bool,
    /// Devices a round expects across all aggregators: DP-FedAvg's fixed denominator under user-level DP
    /// (required then; the sum of the aggregators' cohort sizes).
    pub devices_per_round: usize,
}

impl HierarchyConfig {
    /// The devices a secure round's settings are sized for: `devices_per_round`, at least the smallest
    /// secure cohort.
    pub fn secure_devices(&self) -> usize {
        self.devices_per_round.max(MIN_COHORT)
    }
}

/// Listening addresses.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    /// QUIC protocol endpoint (ALPN starling/1).
    pub listen: SocketAddr,
    /// QUIC enrolment endpoint (ALPN starling-enrol/1).
    pub enrol_listen: SocketAddr,
    /// HTTP status page and Prometheus `/metrics` (read-only, unauthenticated: keep it local).
    pub http_listen: SocketAddr,
    /// Whether to serve the status page at all.
    pub http: bool,
    /// On SIGTERM: how long the exchanges in flight get to finish (an upload being stored gets its ack).
    pub drain_wait_ms: u64,
    /// On SIGTERM: when connected devices are told to come back (the restart's expected length).
    pub drain_retry_after_ms: u64,
    /// Enrolment attempts one address may make at once (devices provisioned behind one NAT share it).
    pub enrol_burst_per_address: u32,
    /// Enrolment attempts one address regains per minute after its burst.
    pub enrol_per_address_per_minute: f64,
}

/// The enrolment endpoint's rate limits from a burst and a per-minute refill per address (checked
/// positive), with the global limits left at their defaults.
pub fn enrolment_limits(
    burst: u32,
    per_minute: f64,
) -> Result<starling_transport::server::EnrolmentLimits, String> {
    if burst == 0 || !(per_minute.is_finite() && per_minute > 0.0) {
        return Err(
            "network.enrol_burst_per_address must be ≥ 1 and enrol_per_address_per_minute > 0"
                .into(),
        );
    }
    Ok(starling_transport::server::EnrolmentLimits {
        host_burst: burst,
        host_rate: per_minute / 60.0,
        ..Default::default()
    })
}

impl NetworkConfig {
    /// The enrolment endpoint's rate limits.
    pub fn enrolment_limits(&self) -> Result<starling_transport::server::EnrolmentLimits, String> {
        enrolment_limits(
            self.enrol_burst_per_address,
            self.enrol_per_address_per_minute,
        )
    }

    /// The drain these settings describe.
    pub fn drain(&self) -> crate::service::DrainSettings {
        crate::service::DrainSettings {
            wait: std::time::Duration::from_millis(self.drain_wait_ms),
            retry_after: std::time::Duration::from_millis(self.drain_retry_after_ms),
        }
    }
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 7870)),
            enrol_listen: SocketAddr::from(([0, 0, 0, 0], 7871)),
            http_listen: SocketAddr::from(([127, 0, 0, 1], 7872)),
            http: true,
            drain_wait_ms: 20_000,
            drain_retry_after_ms: 5_000,
            enrol_burst_per_address: 5,
            enrol_per_address_per_minute: 1.0,
        }
    }
}

/// Where user-level noise is added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DpPlacement {
    /// No user-level DP.
    Off,
    /// The coordinator adds N(0, z²C²) to the clipped sum.
    Central,
    /// Each client adds N(0, z²C²/n); the coordinator only clips and sums.
    Distributed,
}

/// User-level DP-FedAvg settings.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrivacyConfig {
    /// Off, central or distributed.
    pub mode: DpPlacement,
    /// L2 clip bound C of one client's delta.
    pub clip: f64,
    /// Noise multiplier z.
    pub noise_multiplier: f64,
    /// δ of the reported ε.
    pub delta: f64,
    /// ε budget; a round that would exceed it is refused.
    pub epsilon_budget: f64,
    /// Accountant.
    pub accountant: starling_privacy::AccountantKind,
    /// Distributed mode: clients whose noise shares add up to the full noise.
    pub noise_clients: u32,
}

impl Default for PrivacyConfig {
    fn default() -> Self {
        Self {
            mode: DpPlacement::Off,
            clip: 1.0,
            noise_multiplier: 1.0,
            delta: 1e-6,
            epsilon_budget: 10.0,
            accountant: starling_privacy::AccountantKind::Pld,
            noise_clients: 1,
        }
    }
}

/// Update encoding clients use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpdateEncoding {
    /// Exact f32.
    F32,
    /// int8 blocks with stochastic rounding.
    Int8,
}

/// Local training settings sent with each task.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TaskConfig {
    /// Local optimizer steps.
    pub local_steps: u32,
    /// Sequences per step.
    pub batch_size: u32,
    /// Tokens per sequence.
    pub seq_len: u32,
    /// Local learning rate.
    pub learning_rate: f32,
    /// Local update rule: `adamw` (the default) or `sgd` (DP-FedAvg's: see README "Differential privacy").
    pub optimizer: LocalOptimizer,
    /// Update encoding.
    pub encoding: UpdateEncoding,
    /// Values per int8 block.
    pub int8_block: u32,
    /// Largest encoded update accepted, bytes.
    pub max_update_bytes: u64,
    /// Example-level DP-SGD on each device: noise multiplier σ (0 = off).
    pub dp_sgd_noise_multiplier: f64,
    /// DP-SGD per-example clip bound C.
    pub dp_sgd_clip: f64,
    /// DP-SGD Poisson sampling rate q (0 = each device uses batch_size / its number of sequences).
    pub dp_sgd_sampling_rate: f64,
    /// δ at which devices account their example-level ε.
    pub dp_sgd_delta: f64,
}

impl Default for TaskConfig {
    fn default() -> Self {
        Self {
            local_steps: 20,
            batch_size: 8,
            seq_len: 128,
            learning_rate: 2e-3,
            optimizer: LocalOptimizer::AdamW,
            encoding: UpdateEncoding::F32,
            int8_block: 64,
            max_update_bytes: 256 << 20,
            dp_sgd_noise_multiplier: 0.0,
            dp_sgd_clip: 1.0,
            dp_sgd_sampling_rate: 0.0,
            dp_sgd_delta: 1e-5,
        }
    }
}

/// The adapter trained by every client.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdapterConfig {
    /// LoRA rank.
    pub rank: usize,
    /// LoRA alpha.
    pub alpha: f32,
    /// Target modules (q, k, v, o, gate, up, down).
    pub targets: Vec<String>,
    /// Seed of the initial A matrices (B starts at zero: version 0 leaves the base model unchanged).
    pub seed: u64,
}

impl Default for AdapterConfig {
    fn default() -> Self {
        Self {
            rank: 8,
            alpha: 16.0,
            targets: vec!["q".into(), "v".into()],
            seed: 0,
        }
    }
}

impl AdapterConfig {
    /// The model crate's LoRA settings for this adapter (unknown targets are refused by validation).
    pub fn lora_config(&self) -> Result<starling_model::LoraConfig, starling_model::ModelError> {
        let targets: Vec<starling_model::Target> = self
            .targets
            .iter()
            .filter_map(|t| starling_model::Target::parse(t))
            .collect();
        starling_model::LoraConfig::new(self.rank, self.alpha, 0.0, &targets)
    }
}

impl CoordinatorConfig {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::parse(
            &starling_cli::config::read(path)?,
            &path.display().to_string(),
        )
    }

    /// Parses and validates configuration text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let cfg: Self = starling_cli::config::parse(text, origin)?;
        cfg.validate(origin)?;
        Ok(cfg)
    }

    /// Checks every setting; `origin` names the configuration in errors.
    pub fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let cfg = self;
        let invalid = |m: String| ConfigError::Invalid {
            path: origin.into(),
            message: m,
        };
        cfg.rounds.validate().map_err(|e| invalid(e.to_string()))?;
        cfg.network.enrolment_limits().map_err(invalid)?;
        crate::strategy::build(&cfg.strategy).map_err(|e| invalid(e.to_string()))?;
        let p = &cfg.privacy;
        if p.mode != DpPlacement::Off
            && !(p.clip > 0.0
                && p.noise_multiplier >= 0.0
                && p.delta > 0.0
                && p.delta < 1.0
                && p.epsilon_budget > 0.0)
        {
            return Err(invalid(
                "privacy needs clip > 0, noise_multiplier ≥ 0, 0 < delta < 1, epsilon_budget > 0"
                    .into(),
            ));
        }
        if p.mode == DpPlacement::Distributed && p.noise_clients == 0 {
            return Err(invalid("privacy.noise_clients must be at least 1".into()));
        }
        if p.mode != DpPlacement::Off && !cfg.linear_strategy() {
            return Err(invalid(format!(
                "user-level DP clips each delta and noises their sum, and the server rule steps by \
                 that noisy mean: strategy {} needs every update; use fed-avg, fed-prox, fed-avg-m, \
                 fed-adam, fed-yogi or fed-adagrad (privacy.clip bounds each delta)",
                cfg.strategy_words()
            )));
        }
        let t = &cfg.task;
        if t.local_steps == 0
            || t.batch_size == 0
            || t.seq_len == 0
            || t.learning_rate.is_nan()
            || t.learning_rate <= 0.0
        {
            return Err(invalid(
                "task needs positive local_steps, batch_size, seq_len and learning_rate".into(),
            ));
        }
        if !(t.dp_sgd_noise_multiplier >= 0.0
            && t.dp_sgd_noise_multiplier.is_finite()
            && t.dp_sgd_clip > 0.0
            && t.dp_sgd_clip.is_finite()
            && (0.0..=1.0).contains(&t.dp_sgd_sampling_rate)
            && t.dp_sgd_delta > 0.0
            && t.dp_sgd_delta < 1.0)
        {
            return Err(invalid(
                "task DP-SGD needs noise_multiplier ≥ 0, clip > 0, 0 ≤ sampling_rate ≤ 1, 0 < delta < 1"
                    .into(),
            ));
        }
        if !(1..=65_536).contains(&t.int8_block) {
            return Err(invalid("task.int8_block must lie in 1..=65536".into()));
        }
        cfg.validate_secure_aggregation().map_err(invalid)?;
        cfg.validate_hierarchy().map_err(invalid)?;
        if cfg.adapter.rank == 0 || cfg.adapter.targets.is_empty() {
            return Err(invalid(
                "adapter needs rank ≥ 1 and at least one target".into(),
            ));
        }
        for t in &cfg.adapter.targets {
            if starling_model::Target::parse(t).is_none() {
                return Err(invalid(format!(
                    "unknown adapter target {t:?} (q, k, v, o, gate, up, down)"
                )));
            }
        }
        Ok(())
    }

    /// Whether the configured strategy is a function of the updates' weighted sum (what secure aggregation
    /// and edge aggregators deliver).
    fn linear_strategy(&self) -> bool {
        crate::strategy::build(&self.strategy)
            .map(|s| s.linear())
            .unwrap_or(false)
    }

    /// The configured strategy as the file names it (`"median"`, `"fed-avg" with norm_bound`).
    fn strategy_words(&self) -> String {
        use clap::ValueEnum as _;
        let name = self.strategy.kind.to_possible_value().map_or_else(
            || format!("{:?}", self.strategy.kind),
            |v| v.get_name().to_string(),
        );
        let bound = if self.strategy.norm_bound.is_some() {
            " with norm_bound"
        } else {
            ""
        };
        format!("{name:?}{bound}")
    }

    /// What a tier of aggregators cannot work with: a rule that needs every update (its result is not a
    /// function of partial sums; forwarding every update would make the root's work grow with devices
    /// again), distributed DP with secure aggregation (then SecAgg+ runs per cohort at the aggregators,
    /// and a cohort's sum would hold only part of the noise), and user-level DP without the expected
    /// device count.
    fn validate_hierarchy(&self) -> Result<(), String> {
        let h = &self.hierarchy;
        if !h.enabled {
            return Ok(());
        }
        if !self.linear_strategy() && self.privacy.mode == DpPlacement::Off {
            return Err(format!(
                "strategy {} needs every update, and edge aggregators forward only their cohort's sum: \
                 in hierarchical mode use fed-avg, fed-prox, fed-avg-m, fed-adam, fed-yogi or fed-adagrad",
                self.strategy_words()
            ));
        }
        if self.secure_aggregation.enabled && self.privacy.mode == DpPlacement::Distributed {
            return Err(
                "hierarchy with secure aggregation takes privacy.mode = off or central: under \
                 distributed DP each cohort's sum would carry only its devices' noise shares, and the \
                 root could not check a noisy partial sum's bound"
                    .into(),
            );
        }
        if self.privacy.mode != DpPlacement::Off && h.devices_per_round == 0 {
            return Err(
                "hierarchy with user-level DP needs hierarchy.devices_per_round (DP-FedAvg's fixed \
                 denominator: the devices a round expects across all aggregators)"
                    .into(),
            );
        }
        Ok(())
    }

    /// What secure aggregation cannot work with: a rule that needs every update (median, trimmed mean,
    /// Krum, norm bounding), central clipping of single deltas is done on devices instead; noise shares
    /// on devices need the distributed discrete Gaussian (its accountant exists, the device shares not yet);
    /// a cohort whose size is not fixed
    /// (the wrap-around bound and the graph are sized for `selection = { count = m }`).
    fn validate_secure_aggregation(&self) -> Result<(), String> {
        let sa = &self.secure_aggregation;
        if !sa.enabled {
            return Ok(());
        }
        // Behind edge aggregators SecAgg+ runs per cohort, each sized for its cohort (at least 3
        // devices): [rounds] counts aggregators, and the root checks the settings for a round's devices.
        let m = match self.rounds.selection {
            _ if self.hierarchy.enabled => self.hierarchy.secure_devices(),
            Selection::Count(m) => m,
            Selection::Fraction(_) => return Err(
                "secure_aggregation needs rounds.selection = { count = m }: the modulus and the \
                        neighbour graph are sized for a fixed cohort"
                    .into(),
            ),
        };
        if !self.hierarchy.enabled && (m < MIN_COHORT || self.rounds.min_clients < MIN_COHORT) {
            return Err(format!(
                "secure_aggregation needs cohorts of at least {MIN_COHORT} devices (a sum of two reveals \
                 each input to the other): rounds.selection count {m} and rounds.min_clients {} must be \
                 ≥ {MIN_COHORT}",
                self.rounds.min_clients
            ));
        }
        if self.privacy.mode == DpPlacement::Off && !self.linear_strategy() {
            return Err(format!(
                "strategy {} needs every update, and secure aggregation gives only their sum: use \
                 fed-avg, fed-prox, fed-avg-m, fed-adam, fed-yogi or fed-adagrad (norm bounding: set \
                 privacy.clip, devices clip their own deltas)",
                self.strategy_words()
            ));
        }
        if sa.weight_cap > 0 && self.privacy.mode != DpPlacement::Off {
            return Err(
                "secure_aggregation.weight_cap with user-level DP: DP-FedAvg weighs every \
                        device the same (its sensitivity bound needs it); set weight_cap = 0"
                    .into(),
            );
        }
        let noise = self.secagg_noise_steps();
        if self.privacy.mode == DpPlacement::Distributed && sa.rotated() {
            return Err(
                "secure_aggregation.encoding = \"rotated\" with privacy.mode = distributed: the \
                 devices' noise shares are drawn on the per-value encoding's grid (the rotated \
                 encoding's scale leaves no room for them); use encoding = \"per-value\", or central DP"
                    .into(),
            );
        }
        if sa.rotated() && !(2..=31).contains(&sa.modulus_bits) {
            return Err(format!(
                "secure_aggregation.modulus_bits {} must lie in 2..=31",
                sa.modulus_bits
            ));
        }
        if self.privacy.mode == DpPlacement::Distributed {
            let p = &self.privacy;
            if !(p.noise_multiplier > 0.0 && p.noise_multiplier.is_finite()) {
                return Err(
                    "secure_aggregation with privacy.mode = distributed needs noise_multiplier > 0"
                        .into(),
                );
            }
            if p.noise_clients as usize > self.rounds.min_updates {
                return Err(format!(
                    "privacy.noise_clients {} exceeds rounds.min_updates {}: a round could be aggregated \
                     with fewer noise shares than accounted",
                    p.noise_clients, self.rounds.min_updates
                ));
            }
            if !(1..=starling_privacy::sampler::MAX_INT_SCALE).contains(&noise) {
                return Err(format!(
                    "each device's noise share would be {noise} integer steps (needs 1 to {}): change \
                     secure_aggregation.value_bits or clip, or privacy.noise_multiplier",
                    starling_privacy::sampler::MAX_INT_SCALE
                ));
            }
        }
        sa.params(self.rounds.seed, starling_protocol::RoundId(0), m, 1, noise)
            .map_err(|e| format!("secure_aggregation: {e}"))?;
        if sa.phase_timeout_ms == 0 {
            return Err("secure_aggregation.phase_timeout_ms must be positive".into());
        }
        Ok(())
    }

    /// Under secure aggregation with `privacy.mode = distributed`: each device's discrete Gaussian share,
    /// in integer steps of the encoding (0 otherwise). Devices compute the same from their task.
    pub fn secagg_noise_steps(&self) -> u64 {
        let (sa, p) = (&self.secure_aggregation, &self.privacy);
        if !sa.enabled || p.mode != DpPlacement::Distributed {
            return 0;
        }
        sa.encoding(1).map_or(0, |e| {
            e.noise_steps(p.noise_multiplier, p.clip, u64::from(p.noise_clients))
        })
    }

    /// The documented default file written by `init`.
    pub fn default_toml() -> String {
        let body = toml::to_string_pretty(&Self::default()).unwrap_or_default();
        format!(
            "# Starling coordinator configuration. Every key is optional; unknown keys are errors.\n\
             # [network] listen (QUIC), enrol_listen (QUIC enrolment), http_listen (status page, /metrics), http,\n\
             #   drain_wait_ms, drain_retry_after_ms (SIGTERM: time for in-flight exchanges; when devices come back),\n\
             #   enrol_burst_per_address, enrol_per_address_per_minute (enrolment rate limit per address)\n\
             # [rounds] min_clients, selection ({{ fraction = q }} or {{ count = m }}), min_updates,\n\
             #   round_timeout_ms, presence_timeout_ms, rounds (omit: forever), seed, retry_after_ms,\n\
             #   resume_grace_ms (a restart moves the open round's deadline by the downtime, at least this)\n\
             # [strategy] kind = fed-avg | fed-prox | fed-avg-m | fed-adam | fed-yogi | fed-adagrad | median |\n\
             #   trimmed-mean | krum | multi-krum; server_lr, momentum, beta1, beta2, tau, proximal_mu,\n\
             #   trim_beta, byzantine, multi_krum_m, norm_bound, lr_decay_rounds, lr_decay_floor (a cosine\n\
             #   decay of the server step over that many rounds, to that fraction of it)\n\
             # [privacy] mode = off | central | distributed; clip, noise_multiplier, delta, epsilon_budget,\n\
             #   accountant = pld | rdp, noise_clients (with DP on, [strategy] is the server rule that steps by\n\
             #   the noisy mean: a linear kind, e.g. fed-avg-m for DP-FedAvgM)\n\
             # [task] local_steps, batch_size, seq_len, learning_rate, optimizer = adamw | sgd,\n\
             #   encoding = f32 | int8, int8_block, max_update_bytes,\n\
             #   dp_sgd_noise_multiplier (0 = no DP-SGD on devices), dp_sgd_clip,\n\
             #   dp_sgd_sampling_rate (0 = batch_size / the device's sequences), dp_sgd_delta\n\
             # [adapter] rank, alpha, targets, seed\n\
             # [secure_aggregation] enabled, neighbours (0 = ≈3·log2 n), threshold (0 = majority),\n\
             #   encoding = per-value (exact; clip per value, value_bits) | rotated (clip = L2 bound, modulus_bits;\n\
             #   a sum that likely wrapped is refused), phase_timeout_ms, weight_cap (0 = equal weights) —\n\
             #   needs selection = {{ count = m }}, min_clients ≥ 3 and a linear strategy\n\
             # [hierarchy] enabled (devices connect to edge aggregators; [rounds] then counts aggregators),\n\
             #   devices_per_round (DP-FedAvg's denominator under user-level DP); with [secure_aggregation]\n\
             #   each aggregator runs SecAgg+ with its own cohort\n\n{body}"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_round_trip_and_unknown_keys_are_refused() {
        let text = CoordinatorConfig::default_toml();
        assert_eq!(
            CoordinatorConfig::parse(&text, "x").unwrap(),
            CoordinatorConfig::default()
        );
        let typo = "[rounds]\nmin_client = 3\n";
        let err = CoordinatorConfig::parse(typo, "c.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("min_client"), "{err}");
        let bad = "[privacy]\nmode = \"central\"\nclip = 0.0\n";
        assert!(CoordinatorConfig::parse(bad, "c.toml").is_err());
        let sel = "[rounds]\nselection = { count = 5 }\nrounds = 3\n[strategy]\nkind = \"fed-adam\"\nserver_lr = 0.01\n";
        let c = CoordinatorConfig::parse(sel, "c.toml").unwrap();
        assert_eq!(c.rounds.selection, crate::engine::Selection::Count(5));
        assert_eq!(c.rounds.rounds, Some(3));
        assert!(CoordinatorConfig::parse("[adapter]\ntargets = [\"qq\"]\n", "c").is_err());
        // The local optimizer by its name; an unknown one is an error naming what is accepted.
        let sgd = CoordinatorConfig::parse("[task]\noptimizer = \"sgd\"\n", "c").unwrap();
        assert_eq!(sgd.task.optimizer, LocalOptimizer::Sgd);
        let err = CoordinatorConfig::parse("[task]\noptimizer = \"adam\"\n", "c")
            .unwrap_err()
            .to_string();
        assert!(err.contains("adamw") && err.contains("sgd"), "{err}");
    }

    #[test]
    fn hierarchy_takes_secure_cohorts_but_not_distributed_noise_or_whole_update_rules() {
        // Two aggregators a round; SecAgg+ runs per cohort at them, so the root's count is not a cohort.
        let tree = "[rounds]\nmin_clients = 2\nselection = { count = 2 }\nmin_updates = 2\n\
                    [hierarchy]\nenabled = true\n[secure_aggregation]\nenabled = true\n";
        CoordinatorConfig::parse(tree, "c").unwrap();
        // User-level DP needs the device count (DP-FedAvg's fixed denominator).
        let err = CoordinatorConfig::parse(&format!("{tree}[privacy]\nmode = \"central\"\n"), "c")
            .unwrap_err()
            .to_string();
        assert!(err.contains("devices_per_round"), "{err}");
        let central = tree.replace(
            "enabled = true\n[secure",
            "enabled = true\ndevices_per_round = 300\n[secure",
        ) + "[privacy]\nmode = \"central\"\n";
        CoordinatorConfig::parse(&central, "c").unwrap();
        for (extra, word) in [
            (
                "[privacy]\nmode = \"distributed\"\n",
                "privacy.mode = off or central",
            ),
            ("[strategy]\nkind = \"median\"\n", "needs every update"),
            ("[secure_aggregation]\nvalue_bits = 40\n", "30 bits"),
        ] {
            let text = if extra.starts_with("[secure") {
                tree.replace(
                    "[secure_aggregation]\nenabled = true\n",
                    "[secure_aggregation]\nenabled = true\nvalue_bits = 40\n",
                )
            } else {
                format!("{tree}{extra}")
            };
            let err = CoordinatorConfig::parse(&text, "c")
                .unwrap_err()
                .to_string();
            assert!(err.contains(word), "{extra}: {err}");
        }
    }

    #[test]
    fn secure_aggregation_refuses_what_cannot_work_on_a_masked_sum() {
        let ok = "[rounds]\nmin_clients = 5\nselection = { count = 10 }\n[secure_aggregation]\nenabled = true\n";
        CoordinatorConfig::parse(ok, "c").unwrap();
        for (extra, word) in [
            ("[strategy]\nkind = \"median\"\n", "needs every update"),
            (
                "[strategy]\nkind = \"trimmed-mean\"\n",
                "needs every update",
            ),
            (
                "[strategy]\nkind = \"krum\"\nbyzantine = 1\n",
                "needs every update",
            ),
            (
                "[strategy]\nkind = \"multi-krum\"\nbyzantine = 1\n",
                "needs every update",
            ),
            ("[strategy]\nnorm_bound = 1.0\n", "norm_bound"),
            (
                "[privacy]\nmode = \"central\"\n[strategy]\nkind = \"median\"\n",
                "noisy mean: strategy \"median\" needs every update",
            ),
            (
                "[privacy]\nmode = \"central\"\n[strategy]\nnorm_bound = 1.0\n",
                "with norm_bound needs every update",
            ),
            (
                "[privacy]\nmode = \"distributed\"\nnoise_clients = 5\n",
                "exceeds rounds.min_updates",
            ),
            (
                "[privacy]\nmode = \"distributed\"\nnoise_multiplier = 0.0\n",
                "noise_multiplier > 0",
            ),
        ] {
            let err = CoordinatorConfig::parse(&format!("{ok}{extra}"), "c")
                .unwrap_err()
                .to_string();
            assert!(err.contains(word), "{extra}: {err}");
        }
        for (cfg, word) in [
            ("[secure_aggregation]\nenabled = true\n", "count"),
            ("[rounds]\nmin_clients = 2\nselection = { count = 2 }\n[secure_aggregation]\nenabled = true\n", "at least 3"),
            // 1,000 devices × 2^22 steps per value would wrap around 2^32.
            ("[rounds]\nmin_clients = 1000\nselection = { count = 1000 }\n[secure_aggregation]\nenabled = true\nvalue_bits = 22\n", "wrap"),
            ("[rounds]\nmin_clients = 10\nselection = { count = 10 }\n[secure_aggregation]\nenabled = true\nthreshold = 3\nneighbours = 8\n", "majority"),
            // The rotated encoding: no device noise shares, and a modulus wide enough for its cohort.
            ("[rounds]\nmin_clients = 10\nselection = { count = 10 }\n[secure_aggregation]\nenabled = true\nencoding = \"rotated\"\n[privacy]\nmode = \"distributed\"\nnoise_clients = 5\n", "per-value"),
            ("[rounds]\nmin_clients = 1000\nselection = { count = 1000 }\n[secure_aggregation]\nenabled = true\nencoding = \"rotated\"\nmodulus_bits = 12\n", "steps per device"),
            ("[rounds]\nmin_clients = 10\nselection = { count = 10 }\n[secure_aggregation]\nenabled = true\nencoding = \"rotated\"\nmodulus_bits = 40\n", "2..=31"),
        ] {
            let err = CoordinatorConfig::parse(cfg, "c").unwrap_err().to_string();
            assert!(err.contains(word), "{cfg}: {err}");
        }
        let central =
            format!("{ok}[privacy]\nmode = \"central\"\n[strategy]\nkind = \"fed-adam\"\n");
        CoordinatorConfig::parse(&central, "c").unwrap();
        let rotated = ok.replace("enabled = true", "enabled = true\nencoding = \"rotated\"");
        let rotated = CoordinatorConfig::parse(&rotated, "c").unwrap();
        assert!(rotated.secure_aggregation.rotated());
        // The distributed discrete Gaussian: 2 guaranteed shares adding up to σ = 1.0 · C at 2^10 steps
        // per 0.05 — 1.0 · 0.5 · 20,480 / √2 = 7,240.8 → 7,241 steps each.
        let ddg = format!("{ok}[privacy]\nmode = \"distributed\"\nclip = 0.5\nnoise_clients = 2\n");
        assert_eq!(
            CoordinatorConfig::parse(&ddg, "c")
                .unwrap()
                .secagg_noise_steps(),
            7241
        );
    }
}
