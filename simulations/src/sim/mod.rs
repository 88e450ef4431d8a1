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
//! What must never live here: a second implementation of anything a device or the coordinator does.

pub mod data;
pub mod eval;
pub mod link;
pub mod report;
pub mod scenario;

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
use starling_protocol::message::{BlobKind, Decline, SecAggRequest, SecAggStep, Task};
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
}

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
    /// Clients selected.
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
    /// Centralized LoRA on the union of the training data, same optimizer steps as the whole run.
    pub centralized: Scores,
    /// Optimizer steps of the centralized baseline.
    pub centralized_steps: u64,
    /// Local-only training (each sampled client alone), scored on each client's own test split.
    pub local_only: Scores,
    /// The final federated model on the same clients' test splits.
    pub federated_on_local_clients: Scores,
    /// The base model on the same clients' test splits.
    pub base_on_local_clients: Scores,
    /// How many clients trained alone.
    pub local_only_clients: usize,
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

/// When a device drops out of a round it was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Drop {
    /// Never.
    No,
    /// As it receives the task (before training).
    BeforeTraining,
    /// After training and persisting the update, before uploading it (it uploads when it returns) —
    /// in a secure round, before advertising its keys.
    BeforeUpload,
    /// A secure round: after advertising its keys, before sending its shares.
    AfterKeys,
    /// A secure round: after sending its shares, before its masked input.
    AfterShares,
    /// A secure round: after its masked input, before revealing shares.
    AfterMasked,
}

impl Drop {
    /// Whether a device in a secure round goes away instead of carrying out `action`.
    fn before(self, action: &Action) -> bool {
        matches!(
            (self, action),
            (
                Drop::AfterKeys,
                Action::SecAgg {
                    step: SecAggStep::Shares(_),
                    ..
                },
            ) | (
                Drop::AfterMasked,
                Action::SecAgg {
                    step: SecAggStep::Reveals(_),
                    ..
                },
            ) | (Drop::AfterShares, Action::Mask { .. } | Action::Upload(_))
        )
    }
}

/// A virtual device between requests: its persisted progress (the held model by version, shared).
struct Dormant {
    progress: Progress,
    held: Option<u64>,
}

/// A virtual device in the middle of something.
struct Active {
    session: Session,
    actions: VecDeque<Action>,
    inflight: Option<Action>,
    persisted: Progress,
    drop: Drop,
    /// The device's training tokens, tokenized once when it prepares a task.
    tokens: Option<Arc<Vec<u32>>>,
}

enum State {
    Dormant(Box<Dormant>),
    Active(Box<Active>),
    Stopped,
}

struct Device {
    fp: Fingerprint,
    speed: f64,
    up_bytes_per_ms: f64,
    down_bytes_per_ms: f64,
    attacker: bool,
    has_base: bool,
    state: State,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Tick,
    Wake,
    Complete,
}

#[derive(Default)]
struct Counters {
    bytes_up: u64,
    bytes_down: u64,
    base_bytes_down: u64,
    dropouts: usize,
    declined: usize,
    refused: usize,
}

/// Start of the simulated clock (a fixed Unix time, so manifests carry plausible dates).
const EPOCH_MS: u64 = 1_767_225_600_000;

struct Sim<'a> {
    scen: &'a Scenario,
    seed: u64,
    coord: Arc<Coordinator>,
    clock: Arc<AtomicU64>,
    link: Link,
    model: &'a Llama,
    tok: &'a Tokenizer,
    chat: Option<&'a starling_model::chat::ChatTemplate>,
    ds: &'a Dataset,
    devices: Vec<Device>,
    queue: BinaryHeap<Reverse<(u64, u64, Kind, usize)>>,
    seq: u64,
    session_cfg: SessionConfig,
    held: BTreeMap<u64, HeldModel>,
    adapters: HashMap<Digest, Arc<Vec<u8>>>,
    bodies: HashMap<(usize, u64), Vec<u8>>,
    counters: Counters,
    eps_max: f64,
    eps_sum: f64,
    eps_devices: usize,
    now: u64,
}

impl Sim<'_> {
    fn schedule(&mut self, at: u64, kind: Kind, c: usize) {
        self.seq += 1;
        self.queue.push(Reverse((at, self.seq, kind, c)));
    }

    fn set_clock(&self) {
        self.clock.store(EPOCH_MS + self.now, Ordering::SeqCst);
    }

    fn local_minute(&self) -> u16 {
        (((EPOCH_MS + self.now) / 60_000) % 1440) as u16
    }

    fn session_for(&self, c: usize, progress: Progress) -> Session {
        let mut cfg = self.session_cfg.clone();
        cfg.seed = derive(self.seed, "backoff", c as u64, 0);
        // Secure rounds' keys: derived from the seed (reproducible, not secret), a fresh stream per
        // (device, start time) as a device draws a fresh OS seed at every start.
        let mut entropy = [0u8; 32];
        for (i, chunk) in entropy.chunks_mut(8).enumerate() {
            chunk.copy_from_slice(
                &derive(
                    self.seed,
                    "entropy",
                    c as u64,
                    self.now ^ ((i as u64) << 56),
                )
                .to_le_bytes(),
            );
        }
        Session::new(cfg, progress).with_entropy(entropy)
    }

    /// Wakes device `c`: a dormant device restarts its session from its progress; an active one gets a timer.
    fn wake(&mut self, c: usize) -> Result<(), SimError> {
        let state = std::mem::replace(&mut self.devices[c].state, State::Stopped);
        match state {
            State::Stopped => Ok(()),
            State::Dormant(d) => {
                let mut progress = d.progress;
                progress.held = d.held.and_then(|v| self.held.get(&v).cloned());
                let session = self.session_for(c, progress.clone());
                self.devices[c].state = State::Active(Box::new(Active {
                    session,
                    actions: VecDeque::new(),
                    inflight: None,
                    persisted: progress,
                    drop: Drop::No,
                    tokens: None,
                }));
                self.feed(c, Event::Start)
            }
            State::Active(a) => {
                self.devices[c].state = State::Active(a);
                self.feed(c, Event::Timer)
            }
        }
    }

    /// Feeds an event to device `c`'s session and carries out the actions until one takes time.
    fn feed(&mut self, c: usize, first: Event) -> Result<(), SimError> {
        let mut events = VecDeque::from([first]);
        loop {
            let State::Active(a) = &mut self.devices[c].state else {
                return Ok(());
            };
            if a.inflight.is_some() {
                return Ok(());
            }
            // Every action of an event is carried out before the next event is fed, as the device driver does.
            let Some(action) = a.actions.pop_front() else {
                match events.pop_front() {
                    Some(ev) => {
                        let actions = a.session.handle(EPOCH_MS + self.now, ev);
                        a.actions.extend(actions);
                        continue;
                    }
                    None => return Ok(()),
                }
            };
            // Gone between two phases of a secure round (what it persisted survives). Drawn from the
            // round, not kept with the session: a device waiting between phases is folded and restarted.
            let secure_round = a.session.progress().secagg.as_ref().map(|s| s.round);
            if secure_round.is_some_and(|r| self.dropout(c, r).before(&action)) {
                self.crash(c);
                return Ok(());
            }
            let State::Active(a) = &mut self.devices[c].state else {
                return Ok(());
            };
            match action {
                Action::Persist => {
                    let before = a.persisted.epsilon();
                    a.persisted = a.session.progress().clone();
                    let after = a.persisted.epsilon();
                    self.note_epsilon(before, after);
                }
                Action::Stop { .. } => {
                    self.devices[c].state = State::Stopped;
                    return Ok(());
                }
                Action::DiscardPending { round } => {
                    self.bodies.remove(&(c, round));
                }
                Action::CheckEligibility => events.push_back(Event::Eligibility {
                    allowed: true,
                    detail: String::new(),
                }),
                Action::Mask { round, state } => {
                    // The device's own masking of its stored update, as the driver does it.
                    let body = self.bodies.get(&(c, round));
                    let digest_ok = body.is_some_and(|b| {
                        a.session.progress().pending.as_ref().is_some_and(|p| {
                            p.round == round && Digest::of(b).to_hex() == p.body_digest
                        })
                    });
                    let masked = match body {
                        Some(b) if digest_ok => {
                            starling_client::secure::mask_body(&state, b).map_err(|e| e.to_string())
                        }
                        _ => Err(format!("no encoded update stored for round {round}")),
                    };
                    events.push_back(match masked {
                        Ok(m) => {
                            let ev = Event::Masked {
                                body_size: m.len() as u64,
                                body_digest: Digest::of(&m).to_hex(),
                            };
                            self.bodies.insert((c, round), m);
                            ev
                        }
                        Err(error) => Event::MaskFailed { error },
                    });
                }
                Action::Wait { until } => {
                    let at = until.saturating_sub(EPOCH_MS).max(self.now + 1);
                    if a.actions.is_empty() && events.is_empty() {
                        self.fold(c);
                    }
                    self.schedule(at, Kind::Wake, c);
                    return Ok(());
                }
                other => {
                    let delay = self.start(c, &other);
                    if let State::Active(a) = &mut self.devices[c].state {
                        a.inflight = Some(other);
                    }
                    let at = self.now + delay.max(1);
                    self.schedule(at, Kind::Complete, c);
                    return Ok(());
                }
            }
        }
    }

    /// Folds an idle device back into its persisted progress.
    fn fold(&mut self, c: usize) {
        self.make_dormant(c, |a| a.session.progress().clone());
    }

    /// A device crashes: its session and anything not persisted are lost; it returns after `offline_ms`.
    fn crash(&mut self, c: usize) {
        self.make_dormant(c, |a| a.persisted);
        self.counters.dropouts += 1;
        let at = self.now + self.scen.devices.offline_ms.max(1);
        self.schedule(at, Kind::Wake, c);
    }

    /// Replaces an active device by the progress `keep` takes from it (the held model goes to the shared
    /// table by version).
    fn make_dormant(&mut self, c: usize, keep: impl FnOnce(Active) -> Progress) {
        let state = std::mem::replace(&mut self.devices[c].state, State::Stopped);
        let State::Active(a) = state else {
            self.devices[c].state = state;
            return;
        };
        let mut progress = keep(*a);
        let held = progress.held.take().map(|h| {
            let v = h.version;
            self.held.entry(v).or_insert(h);
            v
        });
        self.devices[c].state = State::Dormant(Box::new(Dormant { progress, held }));
    }

    /// How long an action takes on device `c` (its effect happens when it completes).
    fn start(&self, c: usize, action: &Action) -> u64 {
        let d = &self.devices[c];
        let latency = self.scen.devices.latency_ms;
        match action {
            Action::Connect | Action::RequestTask { .. } | Action::Decline { .. } => latency,
            Action::Prepare {
                fetch_adapter,
                manifest,
                ..
            } => {
                let mut bytes = 0f64;
                if *fetch_adapter {
                    bytes += manifest.adapter_schema.num_params() as f64 * 4.0;
                }
                if !d.has_base {
                    bytes += self.coord.base_bundle_len() as f64;
                }
                latency + (bytes / d.down_bytes_per_ms) as u64
            }
            Action::Train { task, .. } => {
                let steps = f64::from(task.params.local_steps);
                (steps * self.scen.devices.step_ms as f64 / d.speed) as u64
            }
            Action::Upload(p) => latency + (p.body_size as f64 / d.up_bytes_per_ms) as u64,
            Action::SecAgg { step, .. } => {
                let bytes = starling_protocol::Message::SecAgg(Box::new(SecAggRequest {
                    round: starling_protocol::RoundId(0),
                    step: step.clone(),
                }))
                .encode()
                .len();
                latency + (bytes as f64 / d.up_bytes_per_ms) as u64
            }
            _ => 0,
        }
    }

    /// Device `c`'s in-flight action completes now.
    fn complete(&mut self, c: usize) -> Result<(), SimError> {
        let (action, drop) = match &mut self.devices[c].state {
            State::Active(a) => match a.inflight.take() {
                Some(x) => (x, a.drop),
                None => return Ok(()),
            },
            _ => return Ok(()),
        };
        self.set_clock();
        let fp = self.devices[c].fp;
        let event = match action {
            Action::Connect => {
                let x = self.link.connect(c, fp);
                self.count(&x);
                x.event
            }
            Action::RequestTask { held } => {
                let x = self.link.request_task(c, fp, held, self.local_minute());
                self.count(&x);
                if let Event::TaskOffered { task, .. } = &x.event {
                    let drop = self.dropout(c, task.round.0);
                    if drop == Drop::BeforeTraining {
                        self.crash(c);
                        return Ok(());
                    }
                    if let State::Active(a) = &mut self.devices[c].state {
                        a.drop = drop;
                    }
                }
                x.event
            }
            Action::Prepare {
                task: _,
                manifest,
                fetch_adapter,
            } => self.prepare(c, fp, &manifest, fetch_adapter)?,
            Action::Train {
                task,
                manifest,
                dp_sampling_rate,
            } => {
                let ev = self.train(c, &task, &manifest, dp_sampling_rate)?;
                if drop == Drop::BeforeUpload {
                    // Persisted with its update (and its privacy charge), then the device goes away.
                    self.feed_persist_only(c, ev);
                    self.crash(c);
                    return Ok(());
                }
                ev
            }
            Action::Upload(p) => {
                let body = self
                    .bodies
                    .get(&(c, p.body_round()))
                    .cloned()
                    .unwrap_or_default();
                let x = self.link.upload(c, fp, &p, &body);
                self.count(&x);
                if let Event::Refused { .. } = x.event {
                    self.counters.refused += 1;
                }
                x.event
            }
            Action::SecAgg { round, step } => {
                let x = self.link.secagg(c, fp, SecAggRequest { round, step });
                self.count(&x);
                x.event
            }
            Action::Decline {
                round,
                code,
                reason,
            } => {
                self.counters.declined += 1;
                let x = self.link.decline(
                    c,
                    fp,
                    Decline {
                        round,
                        code,
                        reason,
                    },
                );
                self.count(&x);
                x.event
            }
            other => {
                return Err(SimError::Stalled(format!(
                    "device {c}: no completion for {other:?}"
                )))
            }
        };
        self.feed(c, event)
    }

    /// Feeds `Trained` and keeps only the persistence it causes (the device crashes right after).
    fn feed_persist_only(&mut self, c: usize, ev: Event) {
        if let State::Active(a) = &mut self.devices[c].state {
            let eps_before = a.session.progress().epsilon();
            for action in a.session.handle(EPOCH_MS + self.now, ev) {
                if action == Action::Persist {
                    a.persisted = a.session.progress().clone();
                }
            }
            let eps = a.session.progress().epsilon();
            self.note_epsilon(eps_before, eps);
        }
    }

    fn note_epsilon(&mut self, before: f64, after: f64) {
        if after > before {
            if before == 0.0 {
                self.eps_devices += 1;
            }
            self.eps_sum += after - before;
            self.eps_max = self.eps_max.max(after);
        }
    }

    fn count(&mut self, x: &Exchange) {
        self.counters.bytes_up += x.up;
        self.counters.bytes_down += x.down;
    }

    fn dropout(&self, c: usize, round: u64) -> Drop {
        let p = self.scen.devices.dropout;
        if p <= 0.0 {
            return Drop::No;
        }
        let u = unit(self.seed, "dropout", c as u64, round);
        if u >= p {
            return Drop::No;
        }
        // Spread evenly over the moments a device can go: before training, after it, and in a secure
        // round after each of its protocol messages.
        let kinds: &[Drop] = if self.scen.secure_aggregation.enabled {
            &[
                Drop::BeforeTraining,
                Drop::BeforeUpload,
                Drop::AfterKeys,
                Drop::AfterShares,
                Drop::AfterMasked,
            ]
        } else {
            &[Drop::BeforeTraining, Drop::BeforeUpload]
        };
        kinds[((u / p) * kinds.len() as f64) as usize % kinds.len()]
    }

    fn prepare(
        &mut self,
        c: usize,
        fp: Fingerprint,
        manifest: &starling_protocol::Manifest,
        fetch_adapter: bool,
    ) -> Result<Event, SimError> {
        let version = manifest.version;
        if !self.devices[c].has_base {
            // The base bundle is fetched once per device; over QUIC it really crosses the wire.
            let len = self.coord.base_bundle_len() as u64;
            if self.link.is_quic() {
                if let Fetched::Failed(ev) = self.link.fetch(c, fp, version, BlobKind::Base, len) {
                    return Ok(ev);
                }
            }
            self.devices[c].has_base = true;
            self.counters.base_bytes_down += len;
        }
        let adapter = if fetch_adapter {
            let n = manifest.adapter_schema.num_params() as u64;
            match self.link.fetch(c, fp, version, BlobKind::Adapter, n * 4) {
                Fetched::Bytes(b) => {
                    self.counters.bytes_down += b.len() as u64;
                    let digest = Digest::of(&b);
                    self.adapters
                        .entry(digest)
                        .or_insert_with(|| Arc::new(b.clone()));
                    Some(b)
                }
                Fetched::Failed(ev) => return Ok(ev),
            }
        } else {
            None
        };
        let tokens = Arc::new(self.tokens(c)?);
        let train_tokens = tokens.len() as u64;
        if let State::Active(a) = &mut self.devices[c].state {
            a.tokens = Some(tokens);
        }
        Ok(Event::Prepared {
            adapter,
            train_tokens,
        })
    }

    fn tokens(&self, c: usize) -> Result<Vec<u32>, SimError> {
        let text = self.ds.train(c);
        let text = if self.devices[c].attacker && self.scen.attack.kind == AttackKind::CorruptText {
            corrupt(text, derive(self.seed, "corrupt", c as u64, 0))
        } else {
            text.to_string()
        };
        self.ds.encode(&text, self.tok, self.chat)
    }

    fn train(
        &mut self,
        c: usize,
        task: &Task,
        manifest: &starling_protocol::Manifest,
        dp_sampling_rate: Option<f64>,
    ) -> Result<Event, SimError> {
        let failed = |error: String| Ok(Event::TrainingFailed { error });
        let State::Active(a) = &self.devices[c].state else {
            return failed("device is not running".into());
        };
        let Some(digest) = a
            .session
            .progress()
            .held
            .as_ref()
            .and_then(HeldModel::adapter)
        else {
            return failed("no model held".into());
        };
        let Some(blob) = self.adapters.get(&digest).cloned() else {
            return failed("the held adapter is not cached".into());
        };
        let start = match adapter_values(&blob) {
            Ok(v) => v,
            Err(e) => return failed(e.to_string()),
        };
        let tokens = match &a.tokens {
            Some(t) => t.clone(),
            None => Arc::new(self.tokens(c)?),
        };
        let round = task.round.0;
        let t = TaskTraining {
            model: self.model,
            task,
            manifest,
            start: &start,
            tokens: &tokens,
            dp_sampling_rate,
            seed: Some(derive(self.seed, "train", c as u64, round)),
            precision: self.scen.simulation.precision,
        };
        let mut trained = match train_task(&t, |_, _| true) {
            Ok(t) => t,
            Err(e) => return failed(e.to_string()),
        };
        if self.devices[c].attacker {
            trained.body = self.attack(c, round, task, manifest, &trained.body)?;
        }
        let id = derive(self.seed, "update-id", c as u64, round).to_le_bytes();
        let id2 = derive(self.seed, "update-id", c as u64, round ^ u64::MAX).to_le_bytes();
        let mut uid = [0u8; 16];
        uid[..8].copy_from_slice(&id);
        uid[8..].copy_from_slice(&id2);
        let pending = trained.pending(round, UpdateId(uid), manifest);
        self.bodies.insert((c, round), trained.body);
        Ok(Event::Trained(Box::new(pending)))
    }

    /// An adversarial device's update: its honest delta transformed by the attack.
    fn attack(
        &self,
        c: usize,
        round: u64,
        task: &Task,
        manifest: &starling_protocol::Manifest,
        body: &[u8],
    ) -> Result<Vec<u8>, SimError> {
        let kind = self.scen.attack.kind;
        if kind == AttackKind::CorruptText {
            return Ok(body.to_vec());
        }
        let schema = &manifest.adapter_schema;
        let mut delta = match &task.secagg {
            Some(sa) => starling_client::secure::decode_body(sa, body)?,
            None => decode_update(body, schema, &UpdateLimits::default())?,
        };
        let s = self.scen.attack.scale;
        // A secure round's weight value (after the delta) is left as it is.
        let weight = delta.split_off(schema.num_params().min(delta.len()));
        match kind {
            AttackKind::SignFlip => delta.iter_mut().for_each(|x| *x *= -s),
            AttackKind::Scale => delta.iter_mut().for_each(|x| *x *= s),
            AttackKind::Noise => {
                let rms = (delta.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>()
                    / delta.len().max(1) as f64)
                    .sqrt();
                let mut rng =
                    ChaCha8Rng::seed_from_u64(derive(self.seed, "noise", c as u64, round));
                for x in delta.iter_mut() {
                    *x = (data::normal(&mut rng) * rms * f64::from(s)) as f32;
                }
            }
            AttackKind::CorruptText => {}
        }
        let mut rng = ChaCha20Rng::seed_from_u64(derive(self.seed, "attack-enc", c as u64, round));
        Ok(match &task.secagg {
            Some(sa) => {
                delta.extend(weight);
                starling_client::secure::encode_values(sa, &delta, &mut rng)?
            }
            None => encode_update(schema, &delta, task.encoding, &mut rng)?,
        })
    }
}

/// Text with the bytes of each line shuffled (the corrupted-text attack's training data).
fn corrupt(text: &str, seed: u64) -> String {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let mut chars: Vec<char> = line.chars().collect();
        chars.shuffle(&mut rng);
        out.extend(chars);
        out.push('\n');
    }
    out
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

/// Runs a scenario on already loaded model and data.
pub fn run_loaded(scen: &Scenario, opts: &RunOptions, l: &Loaded) -> Result<Outcome, SimError> {
    let wall = Instant::now();
    let seed = scen.simulation.seed;
    let n = l.data.clients.len();
    let eval_seq = if scen.evaluation.seq_len > 0 {
        scen.evaluation.seq_len
    } else {
        scen.task.seq_len as usize
    };
    let eval_clients = EvalSet::sample(n, scen.evaluation.clients, seed);
    let evalset = EvalSet::new(
        &l.data,
        &l.tok,
        l.chat.as_ref(),
        &eval_clients,
        eval_seq,
        scen.evaluation.windows_per_client,
    )?;
    // The coordinator, initialised and opened as `init` + `serve` would, on the simulated clock.
    let tmp;
    let dir = match &opts.work_dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::tempdir().map_err(|source| SimError::Io {
                path: std::env::temp_dir().display().to_string(),
                source,
            })?;
            tmp.path().join("coordinator")
        }
    };
    let num_params = adapter_params(&l.model, scen)?;
    let cfg: CoordinatorConfig = scen.coordinator_config(n, num_params)?;
    let text = toml::to_string_pretty(&cfg)?;
    let init = starling_coordinator::ops::init_with(&dir, &l.base_dir, &cfg, &text, EPOCH_MS)
        .map_err(|e| SimError::Init(format!("{e:#}")))?;
    let clock = Arc::new(AtomicU64::new(EPOCH_MS));
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&derive(seed, "central-noise", 0, 0).to_le_bytes());
    // `init` has just closed the store: `Store::open` waits for sled's flusher to let go of its lock.
    let coord = Coordinator::open_with(
        &dir,
        cfg.clone(),
        OpenOptions {
            clock: Clock::Manual(clock.clone()),
            simulation_noise_key: Some(key),
        },
    )?;
    let coord = Arc::new(coord);
    let layout = Layout::new(&dir);
    let mut link = match opts.transport {
        Transport::Memory => Link::memory(coord.clone())?,
        Transport::Quic => {
            let tls = read_key(&layout.tls_key())?;
            Link::quic(coord.clone(), &tls)?
        }
    };
    // The population: keys, enrolment, speed, bandwidth, adversaries.
    let attackers = (scen.attack.fraction * n as f64).round() as usize;
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(derive(
        seed,
        "attackers",
        0,
        0,
    )));
    let mut is_attacker = vec![false; n];
    for &c in order.iter().take(attackers) {
        is_attacker[c] = true;
    }
    let mut devices = Vec::with_capacity(n);
    for (c, attacker) in is_attacker.into_iter().enumerate() {
        let id = device_identity(seed, c);
        let (token, hash) = EnrolmentToken::generate()?;
        coord.store().add_token(
            hash,
            &starling_coordinator::store::PendingToken {
                name: format!("sim-{c}"),
                created_at: EPOCH_MS,
            },
        )?;
        link.enrol(c, &id, &token)?;
        let d = &scen.devices;
        devices.push(Device {
            fp: id.fingerprint(),
            speed: log_uniform(seed, "speed", c as u64, d.speed),
            up_bytes_per_ms: log_uniform(seed, "up", c as u64, d.up_mbps) * 125.0,
            down_bytes_per_ms: log_uniform(seed, "down", c as u64, d.down_mbps) * 125.0,
            attacker,
            has_base: false,
            state: State::Dormant(Box::new(Dormant {
                progress: Progress::default(),
                held: None,
            })),
        });
    }
    let session_cfg = SessionConfig {
        signing_keys: vec![init.signing_key],
        max_epsilon: scen.devices.max_epsilon,
        delta: cfg.task.dp_sgd_delta,
        accountant: AccountantKind::Pld,
        window: None,
        backoff_base_ms: 1_000,
        backoff_max_ms: 60_000,
        seed: 0,
        retry_ms: cfg.rounds.retry_after_ms,
    };
    let mut sim = Sim {
        scen,
        seed,
        coord: coord.clone(),
        clock,
        link,
        model: &l.model,
        tok: &l.tok,
        chat: l.chat.as_ref(),
        ds: &l.data,
        devices,
        queue: BinaryHeap::new(),
        seq: 0,
        session_cfg,
        held: BTreeMap::new(),
        adapters: HashMap::new(),
        bodies: HashMap::new(),
        counters: Counters::default(),
        eps_max: 0.0,
        eps_sum: 0.0,
        eps_devices: 0,
        now: 0,
    };
    let startup = scen.devices.startup_ms.max(1);
    for c in 0..n {
        let at = (unit(seed, "start", c as u64, 0) * startup as f64) as u64;
        sim.schedule(at, Kind::Wake, c);
    }
    // The coordinator's first tick comes once every device's first request has arrived (connect and ask:
    // two round trips), so the first round samples from the whole population as later ones do.
    sim.schedule(
        startup + 2 * scen.devices.latency_ms + 1,
        Kind::Tick,
        usize::MAX,
    );

    // Round 0: the base model.
    let base_scores = evaluate(
        &l.model,
        Some(&adapter_from(&l.model, scen, &v0_adapter(&coord)?)?),
        &evalset,
    )?;
    let mut rounds = vec![RoundMetrics {
        round: 0,
        version: 0,
        test_loss: Some(base_scores.loss),
        perplexity: Some(base_scores.perplexity),
        accuracy: Some(base_scores.accuracy),
        epsilon_user: 0.0,
        epsilon_device_max: 0.0,
        epsilon_device_mean: 0.0,
        selected: 0,
        participants: 0,
        dropouts: 0,
        declined: 0,
        refused: 0,
        train_loss: 0.0,
        bytes_up: 0,
        bytes_down: 0,
        base_bytes_down: 0,
        abandoned_before: 0,
        sim_time_s: 0.0,
        wall_s: wall.elapsed().as_secs_f64(),
    }];
    if let Some(f) = opts.on_round {
        f(&rounds[0], scen.simulation.rounds);
    }
    let mut latest = 0u64;
    let mut started: BTreeMap<u64, usize> = BTreeMap::new();
    let mut published_rounds = std::collections::BTreeSet::new();
    let mut abandoned_seen = 0u64;
    let mut totals = Counters::default();
    let mut final_scores = base_scores;
    let mut digests = vec![adapter_digest(&coord, 0)?];
    let max_rounds = scen.simulation.rounds * 4 + 20;
    while let Some(Reverse((at, _, kind, c))) = sim.queue.pop() {
        sim.now = at;
        sim.set_clock();
        match kind {
            Kind::Wake => sim.wake(c)?,
            Kind::Complete => sim.complete(c)?,
            Kind::Tick => {
                let finished = coord.tick(EPOCH_MS + at)?;
                let current = coord.round();
                if let Some(r) = &current {
                    started.entry(r.id.0).or_insert(r.selected.len());
                }
                let open = current.as_ref().map(|r| r.id.0);
                let v = coord.latest().0;
                if v > latest {
                    latest = v;
                    let evaluate_now =
                        v % scen.evaluation.every == 0 || v >= scen.simulation.rounds || finished;
                    let mut m =
                        sim.round_metrics(v, &started, evaluate_now.then_some(&evalset), wall)?;
                    published_rounds.insert(m.round);
                    // Started rounds that are neither published nor open were abandoned.
                    let abandoned = started
                        .keys()
                        .filter(|id| !published_rounds.contains(*id) && Some(**id) != open)
                        .count() as u64;
                    m.abandoned_before = abandoned.saturating_sub(abandoned_seen);
                    abandoned_seen = abandoned;
                    if let (Some(loss), Some(acc)) = (m.test_loss, m.accuracy) {
                        final_scores = Scores {
                            loss,
                            perplexity: loss.exp(),
                            accuracy: acc,
                            tokens: evalset.tokens(),
                        };
                    }
                    digests.push(adapter_digest(&coord, v)?);
                    accumulate(&mut totals, &m);
                    if let Some(f) = opts.on_round {
                        f(&m, scen.simulation.rounds);
                    }
                    rounds.push(m);
                }
                if finished {
                    break;
                }
                if started.len() as u64 > max_rounds {
                    return Err(SimError::Stalled(format!(
                        "{} rounds started, {latest} published: too few updates arrive by the deadline \
                         (dropouts, the deadline, or clients per round against min_updates)",
                        started.len()
                    )));
                }
                let next = at + scen.simulation.tick_ms;
                sim.schedule(next, Kind::Tick, usize::MAX);
            }
        }
    }
    let abandoned = started.len() as u64 - published_rounds.len() as u64;
    let final_adapter = adapter_values(&published_adapter(&coord, latest)?)?;
    let initial_adapter = adapter_values(&published_adapter(&coord, 0)?)?;
    let sim_time_s = sim.now as f64 / 1000.0;
    let eps_user = rounds.last().map_or(0.0, |r| r.epsilon_user);
    let eps_dev = sim.eps_max;
    let Sim { link, .. } = sim;
    link.shutdown();
    let baselines = if opts.baselines {
        Some(baselines(
            scen,
            l,
            &evalset,
            &eval_clients,
            &final_adapter,
            &coord,
        )?)
    } else {
        None
    };
    let gap_closed = baselines.as_ref().and_then(|b| {
        let gap = b.centralized.accuracy - base_scores.accuracy;
        (gap > 0.0).then(|| (final_scores.accuracy - base_scores.accuracy) / gap)
    });
    let gap_closed_loss = baselines.as_ref().and_then(|b| {
        let gap = base_scores.loss - b.centralized.loss;
        (gap > 0.0).then(|| (base_scores.loss - final_scores.loss) / gap)
    });
    let summary = Summary {
        scenario: scen.simulation.name.clone(),
        seed,
        transport: opts.transport,
        clients: n,
        clients_per_round: scen.per_round(n),
        eval_clients: eval_clients.len(),
        attackers,
        rounds: latest,
        rounds_abandoned: abandoned,
        strategy: if cfg.privacy.mode == DpPlacement::Off {
            format!("{:?}", cfg.strategy.kind)
        } else {
            format!("DP-FedAvg ({:?})", cfg.privacy.mode)
        },
        noise_multiplier: if cfg.privacy.mode == DpPlacement::Off {
            0.0
        } else {
            cfg.privacy.noise_multiplier
        },
        base: base_scores,
        final_scores,
        epsilon_user: eps_user,
        delta_user: if cfg.privacy.mode == DpPlacement::Off {
            0.0
        } else {
            cfg.privacy.delta
        },
        epsilon_device_max: eps_dev,
        bytes_up: totals.bytes_up,
        bytes_down: totals.bytes_down,
        base_bytes_down: totals.base_bytes_down,
        baselines,
        gap_closed,
        gap_closed_loss,
        adapter_digests: digests,
        sim_time_s,
        wall_s: wall.elapsed().as_secs_f64(),
    };
    Ok(Outcome {
        rounds,
        summary,
        final_adapter,
        initial_adapter,
    })
}

fn accumulate(t: &mut Counters, m: &RoundMetrics) {
    t.bytes_up += m.bytes_up;
    t.bytes_down += m.bytes_down;
    t.base_bytes_down += m.base_bytes_down;
}

impl Sim<'_> {
    fn round_metrics(
        &mut self,
        version: u64,
        started: &BTreeMap<u64, usize>,
        evalset: Option<&EvalSet>,
        wall: Instant,
    ) -> Result<RoundMetrics, SimError> {
        let store = self.coord.store();
        let published = store
            .model(ModelVersion(version))?
            .ok_or(SimError::VersionMissing(version))?;
        let manifest = starling_coordinator::store::manifest_body(&published.manifest)?;
        let charge = store
            .ledger()?
            .into_iter()
            .find(|(r, _)| *r == manifest.round)
            .map(|(_, c)| c);
        let scores = match evalset {
            Some(set) => {
                let flat = adapter_values(&published.adapter)?;
                let adapter = adapter_from(self.model, self.scen, &flat)?;
                Some(evaluate(self.model, Some(&adapter), set)?)
            }
            None => None,
        };
        let c = std::mem::take(&mut self.counters);
        Ok(RoundMetrics {
            round: manifest.round.0,
            version,
            test_loss: scores.map(|s| s.loss),
            perplexity: scores.map(|s| s.perplexity),
            accuracy: scores.map(|s| s.accuracy),
            epsilon_user: manifest.dp.epsilon_spent,
            epsilon_device_max: self.eps_max,
            epsilon_device_mean: if self.eps_devices > 0 {
                self.eps_sum / self.eps_devices as f64
            } else {
                0.0
            },
            selected: started.get(&manifest.round.0).copied().unwrap_or(0),
            participants: charge.as_ref().map_or(0, |c| c.updates as usize),
            dropouts: c.dropouts,
            declined: c.declined,
            refused: c.refused,
            train_loss: charge
                .as_ref()
                .map_or(0.0, |c| f64::from(c.mean_train_loss)),
            bytes_up: c.bytes_up,
            bytes_down: c.bytes_down,
            base_bytes_down: c.base_bytes_down,
            abandoned_before: 0,
            sim_time_s: self.now as f64 / 1000.0,
            wall_s: wall.elapsed().as_secs_f64(),
        })
    }
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

/// Trains `steps` steps of LoRA from `start` on `tokens` with the task's other settings (the baseline
/// task: no DP), through the device's own training path; returns the trained adapter's values.
#[allow(clippy::too_many_arguments)]
fn train_alone(
    scen: &Scenario,
    model: &Llama,
    task_of: &Task,
    start: &[f32],
    tokens: &[u32],
    steps: u32,
    seed: u64,
) -> Result<Vec<f32>, SimError> {
    let manifest = starling_coordinator::store::manifest_body(&task_of.manifest)?;
    let mut task = task_of.clone();
    task.params.local_steps = steps;
    let t = TaskTraining {
        model,
        task: &task,
        manifest: &manifest,
        start,
        tokens,
        dp_sampling_rate: None,
        seed: Some(seed),
        precision: scen.simulation.precision,
    };
    let trained = train_task(&t, |_, _| true)?;
    let delta = decode_update(
        &trained.body,
        &manifest.adapter_schema,
        &UpdateLimits::default(),
    )?;
    Ok(start.iter().zip(&delta).map(|(a, d)| a + d).collect())
}

/// The task the coordinator would send for version 0 (built by the coordinator's one Task builder), with
/// no DP and f32 deltas: the baselines train with its settings.
fn baseline_task(coord: &Coordinator) -> Result<Task, SimError> {
    let v0 = coord
        .store()
        .model(ModelVersion(0))?
        .ok_or(SimError::VersionMissing(0))?;
    let mut task = starling_coordinator::round_core::task(
        coord.config(),
        starling_protocol::RoundId(0),
        v0.manifest,
        u64::MAX,
        0.0,
        None,
    );
    task.dp = starling_protocol::message::DpTask::OFF;
    task.encoding = Encoding::F32;
    task.max_update_bytes = u64::MAX;
    Ok(task)
}

fn baselines(
    scen: &Scenario,
    l: &Loaded,
    evalset: &EvalSet,
    eval_clients: &[usize],
    final_adapter: &[f32],
    coord: &Coordinator,
) -> Result<Baselines, SimError> {
    let seed = scen.simulation.seed;
    let task = baseline_task(coord)?;
    let start = v0_adapter(coord)?;
    let steps =
        (scen.simulation.rounds * u64::from(scen.task.local_steps)).min(u64::from(u32::MAX));
    let union = l
        .data
        .encode(&l.data.union_train(), &l.tok, l.chat.as_ref())?;
    let central = train_alone(
        scen,
        &l.model,
        &task,
        &start,
        &union,
        steps as u32,
        derive(seed, "central", 0, 0),
    )?;
    let centralized = evaluate(
        &l.model,
        Some(&adapter_from(&l.model, scen, &central)?),
        evalset,
    )?;
    // Local-only: a seeded sample of the evaluated clients, each trained alone for the same steps.
    let mut sample: Vec<usize> = eval_clients.to_vec();
    sample.shuffle(&mut ChaCha8Rng::seed_from_u64(derive(
        seed,
        "local-only",
        0,
        0,
    )));
    let mut picked = Vec::new();
    let (mut lo, mut fed, mut base) = (Acc::default(), Acc::default(), Acc::default());
    let fed_adapter = adapter_from(&l.model, scen, final_adapter)?;
    let base_adapter = adapter_from(&l.model, scen, &start)?;
    for c in sample {
        if picked.len() >= scen.baselines.local_only_clients {
            break;
        }
        let own = evalset.of_client(c);
        let tokens = l.data.encode(l.data.train(c), &l.tok, l.chat.as_ref())?;
        if own.windows.is_empty() || tokens.len() <= scen.task.seq_len as usize {
            continue;
        }
        picked.push(c);
        let alone = train_alone(
            scen,
            &l.model,
            &task,
            &start,
            &tokens,
            steps as u32,
            derive(seed, "alone", c as u64, 0),
        )?;
        lo.add(evaluate(
            &l.model,
            Some(&adapter_from(&l.model, scen, &alone)?),
            &own,
        )?);
        fed.add(evaluate(&l.model, Some(&fed_adapter), &own)?);
        base.add(evaluate(&l.model, Some(&base_adapter), &own)?);
    }
    Ok(Baselines {
        centralized,
        centralized_steps: steps,
        local_only: lo.scores(),
        federated_on_local_clients: fed.scores(),
        base_on_local_clients: base.scores(),
        local_only_clients: picked.len(),
    })
}

/// Token-weighted mean of several [`Scores`].
#[derive(Default)]
struct Acc {
    loss: f64,
    correct: f64,
    tokens: u64,
}

impl Acc {
    fn add(&mut self, s: Scores) {
        self.loss += s.loss * s.tokens as f64;
        self.correct += s.accuracy * s.tokens as f64;
        self.tokens += s.tokens;
    }

    fn scores(&self) -> Scores {
        if self.tokens == 0 {
            return Scores::default();
        }
        let loss = self.loss / self.tokens as f64;
        Scores {
            loss,
            perplexity: loss.exp(),
            accuracy: self.correct / self.tokens as f64,
            tokens: self.tokens,
        }
    }
}
