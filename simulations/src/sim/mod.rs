//! The multi-client simulator behind `starling-sim`: a whole federation on one machine, on a simulated
//! clock, with the deployed logic end to end — the coordinator ([`Coordinator`]: round engine, strategies,
//! privacy ledger, DP-FedAvg, sled store, signed manifests) and, for every virtual device, the client
//! session ([`Session`]) and the local training ([`train_task`]) a real device runs. Nothing sleeps: a
//! priority queue of timed events advances the clock to the next thing that happens.
//!
//! A virtual device costs its data index, its seed and its persisted progress (its privacy ledger): while
//! it waits it is folded back into that [`Progress`] and its session is dropped, exactly as a device that
//! restarts between requests resumes from `progress.json`. Sessions, update bodies and training exist only
//! for the devices in a round, so memory grows with clients per round, not with clients.
//!
//! Modules: [`scenario`] (the scenario file), [`data`] (partitions), `run` (the fleet, the event queue, the
//! driver of each device's session, `run_loaded`), [`link`] (memory or QUIC), `attack` (adversarial
//! updates), [`eval`], `baselines`, `outcome` (the result schema), [`report`] (files and plots); this file
//! holds the errors, the run options, the seeded derivations and loading.
//!
//! What must never live here: a second implementation of anything a device or the coordinator does.

mod attack;
mod baselines;
pub mod data;
pub mod eval;
pub mod link;
mod outcome;
mod pool;
pub mod report;
mod run;
pub mod scenario;

use self::attack::corrupt;
use self::baselines::baselines;
pub use self::run::run_loaded;
use self::run::Sim;
pub use outcome::{Baselines, CentralizedTry, Outcome, RoundMetrics, Summary};

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::{ChaCha20Rng, ChaCha8Rng};
use starling_client::session::{Action, Event, HeldModel, Progress, Session, SessionConfig};
use starling_client::train::{train_task, TaskTraining};
use starling_coordinator::config::{CoordinatorConfig, DpPlacement};
use starling_coordinator::service::{read_key, Clock, Coordinator, Layout, OpenOptions};
use starling_model::{Backend, Llama, LoraAdapter, Tokenizer};
use starling_privacy::AccountantKind;
use starling_protocol::message::{
    BlobKind, Decline, LocalOptimizer, SecAggRequest, SecAggStep, Task,
};
use starling_protocol::update::{adapter_values, decode_update, encode_update, UpdateLimits};
use starling_protocol::{
    Digest, Encoding, EnrolmentToken, Fingerprint, ModelVersion, SigningIdentity, UpdateId,
};

use self::data::Dataset;
use self::eval::{evaluate, EvalSet, Scores};
use self::link::{Exchange, Fetched, Link};
use self::scenario::{AttackKind, Scenario};

/// What stops a simulation.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The scenario is invalid.
    #[error("scenario: {0}")]
    Scenario(String),
    /// The data could not be read or partitioned.
    #[error("data: {0}")]
    Data(String),
    /// The base model could not be loaded or run, or an adapter not built.
    #[error("model: {0}")]
    Model(#[from] starling_model::ModelError),
    /// The scenario's base model could not be loaded.
    #[error("the base model in {path}: {source}")]
    BaseModel {
        /// Its directory.
        path: String,
        /// Why.
        source: starling_model::ModelError,
    },
    /// Local training through the device's path failed.
    #[error("training: {0}")]
    Train(#[from] starling_client::train::TrainError),
    /// The coordinator failed.
    #[error("coordinator: {0}")]
    Coordinator(#[from] starling_coordinator::service::ServiceError),
    /// The privacy budget could not pay for a round: the coordinator paused rounds.
    #[error(
        "the privacy budget cannot pay for another round ({0}): raise privacy.epsilon_budget or \
         privacy.noise_multiplier, lower the rounds, or set simulation.target_epsilon to calibrate \
         the noise"
    )]
    BudgetSpent(String),
    /// An edge aggregator of the topology failed.
    #[error("edge aggregator: {0}")]
    Aggregator(#[from] starling_coordinator::aggregator::AggregatorError),
    /// The coordinator's store failed.
    #[error("coordinator store: {0}")]
    Store(#[from] starling_coordinator::store::StoreError),
    /// The coordinator directory could not be made (`init`).
    #[error("coordinator init: {0}")]
    Init(String),
    /// A version the coordinator published is missing from its store.
    #[error("version {0} is missing from the coordinator's store")]
    VersionMissing(u64),
    /// Bytes the simulation made or read do not encode or decode.
    #[error("protocol: {0}")]
    Protocol(#[from] starling_protocol::ProtocolError),
    /// The QUIC path failed.
    #[error("transport: {0}")]
    Transport(#[from] starling_transport::TransportError),
    /// The coordinator refused a virtual device's enrolment.
    #[error("enrolment refused: {0}")]
    Enrolment(String),
    /// Files could not be written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A plot could not be drawn.
    #[error("plot {caption}: {detail}")]
    Plot {
        /// The plot.
        caption: String,
        /// What plotters said.
        detail: String,
    },
    /// A result could not be written as JSON.
    #[error("writing JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// The coordinator configuration could not be written.
    #[error("coordinator configuration: {0}")]
    Config(#[from] toml::ser::Error),
    /// A secure round's bytes do not encode or decode.
    #[error("secure aggregation: {0}")]
    SecAgg(#[from] starling_secagg::SecAggError),
    /// Privacy calibration failed.
    #[error(transparent)]
    Privacy(#[from] starling_privacy::PrivacyError),
    /// The federation stopped making progress.
    #[error("the simulation stalled: {0}")]
    Stalled(String),
}

/// Which path devices use to reach the coordinator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    /// The coordinator's request handler, called in memory.
    #[default]
    Memory,
    /// Real QUIC with mutual TLS on 127.0.0.1.
    Quic,
}

/// How to run a scenario.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Memory or QUIC.
    pub transport: Transport,
    /// Also run the baselines (base model, centralized LoRA, local-only).
    pub baselines: bool,
    /// Directory of the scenario file (relative paths in it are looked up there too).
    pub scenario_dir: Option<PathBuf>,
    /// Where the coordinator's directory goes (a temporary directory if `None`).
    pub work_dir: Option<PathBuf>,
    /// Called after every published round (the progress bar).
    pub on_round: Option<fn(&RoundMetrics, u64)>,
    /// Threads that train devices ahead of the simulated clock (`None`: one per core; `Some(0)`: every
    /// training runs on the event loop's thread when it completes). The results do not depend on it.
    pub train_workers: Option<usize>,
}

/// A deterministic 64-bit value derived from the run's seed and a few labels.
pub fn derive(seed: u64, label: &str, a: u64, b: u64) -> u64 {
    let mut bytes = Vec::with_capacity(label.len() + 24);
    bytes.extend_from_slice(&seed.to_le_bytes());
    bytes.extend_from_slice(label.as_bytes());
    bytes.extend_from_slice(&a.to_le_bytes());
    bytes.extend_from_slice(&b.to_le_bytes());
    let d = Digest::of(&bytes);
    u64::from_le_bytes(d.0[..8].try_into().unwrap_or([0; 8]))
}

fn unit(seed: u64, label: &str, a: u64, b: u64) -> f64 {
    (derive(seed, label, a, b) >> 11) as f64 / (1u64 << 53) as f64
}

fn log_uniform(seed: u64, label: &str, c: u64, r: [f64; 2]) -> f64 {
    (r[0].ln() + unit(seed, label, c, 0) * (r[1].ln() - r[0].ln())).exp()
}

/// The device key of virtual client `c` (derived from the seed, so runs are reproducible).
pub fn device_identity(seed: u64, c: usize) -> SigningIdentity {
    let mut s = [0u8; 32];
    s[..8].copy_from_slice(&derive(seed, "device-key", c as u64, 0).to_le_bytes());
    s[8..16].copy_from_slice(&derive(seed, "device-key", c as u64, 1).to_le_bytes());
    s[16..24].copy_from_slice(&derive(seed, "device-key", c as u64, 2).to_le_bytes());
    s[24..].copy_from_slice(&derive(seed, "device-key", c as u64, 3).to_le_bytes());
    SigningIdentity::from_seed(s)
}

fn lora(model: &Llama, scen: &Scenario) -> Result<LoraAdapter, SimError> {
    let cfg = scen.adapter.lora_config()?;
    Ok(LoraAdapter::new(&model.config, cfg, &model.device, 0))
}

/// Trainable values of the scenario's adapter on `model`.
pub fn adapter_params(model: &Llama, scen: &Scenario) -> Result<usize, SimError> {
    Ok(lora(model, scen)?.num_parameters())
}

/// A LoRA adapter of the scenario's shape holding `flat`.
pub fn adapter_from(model: &Llama, scen: &Scenario, flat: &[f32]) -> Result<LoraAdapter, SimError> {
    let mut a = lora(model, scen)?;
    a.set_flat(flat)?;
    Ok(a)
}

/// The loaded pieces a run needs (shared by the baselines).
pub struct Loaded {
    /// The base model, quantized as the devices hold it.
    pub model: Llama,
    /// Its tokenizer.
    pub tok: Tokenizer,
    /// Its chat template (tokenizer_config.json), which chat data sets are rendered with.
    pub chat: Option<starling_model::chat::ChatTemplate>,
    /// The partitioned data.
    pub data: Dataset,
    /// The resolved base model directory.
    pub base_dir: PathBuf,
}

/// Loads the model and data of a scenario.
pub fn load(scen: &Scenario, scenario_dir: Option<&Path>) -> Result<Loaded, SimError> {
    let base_dir = scenario::resolve(&scen.simulation.base_model, scenario_dir);
    let device = Backend::default().device();
    let model = Llama::load(&base_dir, Some(scen.simulation.quant), &device).map_err(|source| {
        SimError::BaseModel {
            path: base_dir.display().to_string(),
            source,
        }
    })?;
    let tok = Tokenizer::for_model_dir(&base_dir, model.config.vocab_size)?;
    let chat = starling_model::chat::ChatTemplate::load(&base_dir)?;
    let data_dir = scenario::resolve(&scen.data.path, scenario_dir);
    let data = data::load(&scen.data, &data_dir, scen.simulation.seed)?;
    if data.chat && chat.is_none() {
        return Err(SimError::Data(format!(
            "{} holds chat conversations (.jsonl) and the base model {} has no chat template \
             (tokenizer_config.json)",
            data_dir.display(),
            base_dir.display()
        )));
    }
    if data.chat && scen.attack.kind == AttackKind::CorruptText {
        return Err(SimError::Data(
            "the corrupt-text attack rewrites plain text; it cannot run on chat conversations"
                .into(),
        ));
    }
    Ok(Loaded {
        model,
        tok,
        chat,
        data,
        base_dir,
    })
}

/// Runs a scenario to the end.
pub fn run(scen: &Scenario, opts: &RunOptions) -> Result<Outcome, SimError> {
    let loaded = load(scen, opts.scenario_dir.as_deref())?;
    run_loaded(scen, opts, &loaded)
}

fn published_adapter(coord: &Coordinator, v: u64) -> Result<Vec<u8>, SimError> {
    Ok(coord
        .store()
        .model(ModelVersion(v))?
        .ok_or(SimError::VersionMissing(v))?
        .adapter)
}

fn adapter_digest(coord: &Coordinator, v: u64) -> Result<String, SimError> {
    Ok(Digest::of(&published_adapter(coord, v)?).to_hex())
}

fn v0_adapter(coord: &Coordinator) -> Result<Vec<f32>, SimError> {
    Ok(adapter_values(&published_adapter(coord, 0)?)?)
}
