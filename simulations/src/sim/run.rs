//! One run of a scenario: the fleet of virtual devices (dormant between requests, active within one), the
//! event queue on the simulated clock, the driver that feeds each device's real session and carries out its
//! actions against the real coordinator, and the run itself (`run_loaded`: set-up, the loop, the outcome).
//! What must never live here: the scenario's schema, the result schema, the baselines or the attacks (their
//! own modules), or any policy of the coordinator or the device (their crates).

use super::pool::{CloseOnDrop, Job, Pool};
use super::*;
use starling_coordinator::aggregator::upstream::LocalRoot;
use starling_coordinator::aggregator::{Aggregator, AggregatorConfig};

/// When a device drops out of a round it was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Drop {
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
    pub(super) fn before(self, action: &Action) -> bool {
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
pub(super) struct Dormant {
    pub(super) progress: Progress,
    pub(super) held: Option<u64>,
}

/// A virtual device in the middle of something.
pub(super) struct Active {
    pub(super) session: Session,
    pub(super) actions: VecDeque<Action>,
    pub(super) inflight: Option<Action>,
    pub(super) persisted: Progress,
    pub(super) drop: Drop,
    /// The device's training tokens, tokenized once when it prepares a task.
    pub(super) tokens: Option<Arc<Vec<u32>>>,
}

pub(super) enum State {
    Dormant(Box<Dormant>),
    Active(Box<Active>),
    Stopped,
}

pub(super) struct Device {
    pub(super) fp: Fingerprint,
    pub(super) speed: f64,
    pub(super) up_bytes_per_ms: f64,
    pub(super) down_bytes_per_ms: f64,
    pub(super) attacker: bool,
    pub(super) has_base: bool,
    pub(super) state: State,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Kind {
    Tick,
    Wake,
    Complete,
}

#[derive(Default)]
pub(super) struct Counters {
    pub(super) bytes_up: u64,
    pub(super) bytes_down: u64,
    pub(super) base_bytes_down: u64,
    pub(super) dropouts: usize,
    pub(super) declined: usize,
    pub(super) refused: usize,
}

/// Start of the simulated clock (a fixed Unix time, so manifests carry plausible dates).
pub(super) const EPOCH_MS: u64 = 1_767_225_600_000;

pub(super) struct Sim<'a> {
    pub(super) scen: &'a Scenario,
    pub(super) seed: u64,
    pub(super) coord: Arc<Coordinator>,
    pub(super) clock: Arc<AtomicU64>,
    pub(super) link: Link,
    pub(super) model: &'a Llama,
    pub(super) tok: &'a Tokenizer,
    pub(super) chat: Option<&'a starling_model::chat::ChatTemplate>,
    pub(super) ds: &'a Dataset,
    pub(super) devices: Vec<Device>,
    pub(super) queue: BinaryHeap<Reverse<(u64, u64, Kind, usize)>>,
    pub(super) seq: u64,
    pub(super) session_cfg: SessionConfig,
    pub(super) held: BTreeMap<u64, HeldModel>,
    pub(super) adapters: HashMap<Digest, Arc<Vec<u8>>>,
    pub(super) bodies: HashMap<(usize, u64), Vec<u8>>,
    pub(super) counters: Counters,
    pub(super) eps_max: f64,
    pub(super) eps_sum: f64,
    pub(super) eps_devices: usize,
    pub(super) now: u64,
    /// Trainings started and not yet taken.
    pub(super) pool: &'a Pool<'a>,
}

impl Sim<'_> {
    pub(super) fn schedule(&mut self, at: u64, kind: Kind, c: usize) {
        self.seq += 1;
        self.queue.push(Reverse((at, self.seq, kind, c)));
    }

    pub(super) fn set_clock(&self) {
        self.clock.store(EPOCH_MS + self.now, Ordering::SeqCst);
    }

    pub(super) fn local_minute(&self) -> u16 {
        (((EPOCH_MS + self.now) / 60_000) % 1440) as u16
    }

    pub(super) fn session_for(&self, c: usize, progress: Progress) -> Session {
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
    pub(super) fn wake(&mut self, c: usize) -> Result<(), SimError> {
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
    pub(super) fn feed(&mut self, c: usize, first: Event) -> Result<(), SimError> {
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
                    if let Action::Train {
                        task,
                        manifest,
                        dp_sampling_rate,
                    } = &other
                    {
                        let due = self.now + delay.max(1);
                        self.start_training(c, task, manifest, *dp_sampling_rate, due)?;
                    }
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
    pub(super) fn fold(&mut self, c: usize) {
        self.make_dormant(c, |a| a.session.progress().clone());
    }

    /// A device crashes: its session and anything not persisted are lost; it returns after `offline_ms`.
    pub(super) fn crash(&mut self, c: usize) {
        self.make_dormant(c, |a| a.persisted);
        self.counters.dropouts += 1;
        let at = self.now + self.scen.devices.offline_ms.max(1);
        self.schedule(at, Kind::Wake, c);
    }

    /// Replaces an active device by the progress `keep` takes from it (the held model goes to the shared
    /// table by version).
    pub(super) fn make_dormant(&mut self, c: usize, keep: impl FnOnce(Active) -> Progress) {
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
    pub(super) fn start(&self, c: usize, action: &Action) -> u64 {
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
    pub(super) fn complete(&mut self, c: usize) -> Result<(), SimError> {
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
    pub(super) fn feed_persist_only(&mut self, c: usize, ev: Event) {
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

    pub(super) fn note_epsilon(&mut self, before: f64, after: f64) {
        if after > before {
            if before == 0.0 {
                self.eps_devices += 1;
            }
            self.eps_sum += after - before;
            self.eps_max = self.eps_max.max(after);
        }
    }

    pub(super) fn count(&mut self, x: &Exchange) {
        self.counters.bytes_up += x.up;
        self.counters.bytes_down += x.down;
    }

    pub(super) fn dropout(&self, c: usize, round: u64) -> Drop {
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

    pub(super) fn prepare(
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

    pub(super) fn tokens(&self, c: usize) -> Result<Vec<u32>, SimError> {
        let text = self.ds.train(c);
        let text = if self.devices[c].attacker && self.scen.attack.kind == AttackKind::CorruptText {
            corrupt(text, derive(self.seed, "corrupt", c as u64, 0))
        } else {
            text.to_string()
        };
        self.ds.encode(&text, self.tok, self.chat)
    }

    /// What device `c`'s training of `task` needs, or why it cannot train.
    fn training_job(
        &self,
        c: usize,
        task: &Task,
        manifest: &starling_protocol::Manifest,
        dp_sampling_rate: Option<f64>,
    ) -> Result<Result<Job, String>, SimError> {
        let State::Active(a) = &self.devices[c].state else {
            return Ok(Err("device is not running".into()));
        };
        let Some(digest) = a
            .session
            .progress()
            .held
            .as_ref()
            .and_then(HeldModel::adapter)
        else {
            return Ok(Err("no model held".into()));
        };
        let Some(blob) = self.adapters.get(&digest) else {
            return Ok(Err("the held adapter is not cached".into()));
        };
        let start = match adapter_values(blob) {
            Ok(v) => v,
            Err(e) => return Ok(Err(e.to_string())),
        };
        let tokens = match &a.tokens {
            Some(t) => t.clone(),
            None => Arc::new(self.tokens(c)?),
        };
        Ok(Ok(Job {
            task: task.clone(),
            manifest: manifest.clone(),
            start,
            tokens,
            dp_sampling_rate,
            seed: derive(self.seed, "train", c as u64, task.round.0),
            precision: self.scen.simulation.precision,
        }))
    }

    /// Device `c` starts training `task`: the training starts on the pool, due at simulated time `due`
    /// (one that cannot start is left to [`Sim::train`] to report).
    pub(super) fn start_training(
        &self,
        c: usize,
        task: &Task,
        manifest: &starling_protocol::Manifest,
        dp_sampling_rate: Option<f64>,
        due: u64,
    ) -> Result<(), SimError> {
        if let Ok(job) = self.training_job(c, task, manifest, dp_sampling_rate)? {
            self.pool.submit((c, task.round.0), due, job);
        }
        Ok(())
    }

    /// Device `c`'s training of `task` completes: its update (from the pool, or trained now).
    pub(super) fn train(
        &mut self,
        c: usize,
        task: &Task,
        manifest: &starling_protocol::Manifest,
        dp_sampling_rate: Option<f64>,
    ) -> Result<Event, SimError> {
        let round = task.round.0;
        let result = match self.pool.take((c, round)) {
            Some(r) => r,
            None => match self.training_job(c, task, manifest, dp_sampling_rate)? {
                Ok(job) => job.run(self.model),
                Err(e) => Err(e),
            },
        };
        let mut trained = match result {
            Ok(t) => t,
            Err(error) => return Ok(Event::TrainingFailed { error }),
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
}

/// The configuration of edge aggregator `name` in a `[topology]`: its share of the round's devices, its
/// forwarding rule, polling the root every simulator tick.
fn edge_config(
    scen: &Scenario,
    cfg: &CoordinatorConfig,
    clients: usize,
    name: &str,
    signing_key: &[u8; 32],
    root_pin: Fingerprint,
) -> AggregatorConfig {
    use starling_coordinator::aggregator::config::{AggregatorNetwork, CohortConfig, RootSection};
    let t = &scen.topology;
    let edges = t.aggregators.max(1);
    AggregatorConfig {
        root: RootSection {
            address: "in-process".into(),
            pin: root_pin.to_hex(),
            signing_key: Fingerprint(*signing_key).to_hex(),
            name: name.to_string(),
        },
        network: AggregatorNetwork::default(),
        cohort: CohortConfig {
            size: scen.cohort_size(clients),
            min: scen.rounds.min_updates.div_ceil(edges).max(1),
            forward_margin_ms: t.forward_margin_ms,
            quiet_ms: t.quiet_ms,
            poll_ms: scen.simulation.tick_ms,
            roster_ms: scen.simulation.tick_ms,
            retry_after_ms: cfg.rounds.retry_after_ms,
            secure_phase_ms: cfg.secure_aggregation.phase_timeout_ms,
        },
    }
}

/// How many bytes of trained updates (as f32 values) the pool may hold ahead of their completion.
const TRAINED_BYTES_AHEAD: usize = 256 << 20;

/// The free space `/dev/shm` must have for the simulated coordinator's state to go there (a container's
/// default of 64 MB would fill up at population scale: 100,000 clients' store takes ~100 MB).
const SHM_FREE_BYTES: u64 = 1 << 30;

/// Bytes free to an unprivileged user in the file system holding `path`; `None` where it cannot be told.
#[cfg(unix)]
fn free_bytes(path: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: an all-zero `statvfs` is a valid value of that plain C struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a valid struct for statvfs to fill.
    let ok = unsafe { libc::statvfs(c.as_ptr(), &mut st) } == 0;
    #[allow(clippy::unnecessary_cast)] // the fields' widths differ between platforms
    ok.then(|| (st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

#[cfg(not(unix))]
fn free_bytes(_: &std::path::Path) -> Option<u64> {
    None
}

/// A scratch directory for the simulated coordinator's state: in `/dev/shm` where it can be (Linux
/// without `TMPDIR` set, with [`SHM_FREE_BYTES`] free), else in the temporary directory. The simulated
/// coordinator is the deployed one, which flushes its store before it acknowledges an update; on a disk
/// those flushes were 40% of a population round's time (`scenarios/dp-population-fedavg.toml`), and a
/// simulation's state needs no disk.
fn scratch_dir() -> Result<tempfile::TempDir, SimError> {
    let shm = std::path::Path::new("/dev/shm");
    if std::env::var_os("TMPDIR").is_none()
        && shm.is_dir()
        && free_bytes(shm).is_some_and(|b| b >= SHM_FREE_BYTES)
    {
        if let Ok(t) = tempfile::Builder::new()
            .prefix("starling-sim")
            .tempdir_in(shm)
        {
            return Ok(t);
        }
    }
    tempfile::tempdir().map_err(|source| SimError::Io {
        path: std::env::temp_dir().display().to_string(),
        source,
    })
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
            tmp = scratch_dir()?;
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
    let tls = read_key(&layout.tls_key())?;
    let mut link = match opts.transport {
        Transport::Memory => Link::memory(coord.clone())?,
        Transport::Quic => Link::quic(coord.clone(), &tls)?,
    };
    // The edge aggregators (`[topology]`): real ones, enrolled at the root under their role, their
    // spools beside the coordinator's directory, on the simulated clock.
    let edges = (0..scen.topology.aggregators)
        .map(|a| {
            let id = device_identity(seed ^ 0xa66e_6a70_0000_0000, a);
            let name = format!("edge-{a}");
            link.enrol_aggregator(&id, &name)?;
            let cfg = edge_config(scen, &cfg, n, &name, &init.signing_key, tls.fingerprint());
            let t = &scen.topology;
            let root = LocalRoot::new(coord.clone(), id.fingerprint()).with_uplink(
                t.uplink_latency_ms,
                t.uplink_mbps,
                Clock::Manual(clock.clone()),
            );
            let edge = Aggregator::local(
                &dir.with_file_name(format!("{name}-spool")),
                cfg,
                &id,
                root,
                Clock::Manual(clock.clone()),
            )?;
            Ok::<_, SimError>(Arc::new(edge))
        })
        .collect::<Result<Vec<_>, _>>()?;
    link.set_edges(edges)?;
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
    // Trainings run on workers ahead of the simulated clock (`pool`); the results do not depend on them.
    let workers = opts
        .train_workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    // Finished updates waiting for their simulated completion hold at most ~256 MiB (f32 values).
    let pool = Pool::new(
        &l.model,
        (TRAINED_BYTES_AHEAD / (num_params.max(1) * 4)).max(2 * workers),
    );
    std::thread::scope(|scope| {
        let close = CloseOnDrop(&pool);
        for _ in 0..workers {
            scope.spawn(|| pool.work());
        }
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
            pool: &pool,
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
                    // Edge aggregators first: the partial sums whose transfer is over reach the root, then
                    // each polls it (takes a new round's task, forwards a cohort).
                    sim.counters.refused += sim.link.poll_edges()?;
                    let finished = coord.tick(EPOCH_MS + at)?;
                    if let Some(why) = coord.budget_pause() {
                        return Err(SimError::BudgetSpent(why));
                    }
                    let current = coord.round();
                    if let Some(r) = &current {
                        // Behind aggregators the root selects aggregators: count the devices they take.
                        let selected = match scen.topology.aggregators {
                            0 => r.selected.len(),
                            _ => (r.selected.len() * scen.cohort_size(n)).min(scen.per_round(n)),
                        };
                        started.entry(r.id.0).or_insert(selected);
                    }
                    let open = current.as_ref().map(|r| r.id.0);
                    let v = coord.latest().0;
                    if v > latest {
                        latest = v;
                        let evaluate_now = v % scen.evaluation.every == 0
                            || v >= scen.simulation.rounds
                            || finished;
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
        drop(close);
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
    })
}

pub(super) fn accumulate(t: &mut Counters, m: &RoundMetrics) {
    t.bytes_up += m.bytes_up;
    t.bytes_down += m.bytes_down;
    t.base_bytes_down += m.base_bytes_down;
}

impl Sim<'_> {
    pub(super) fn round_metrics(
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

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    #[test]
    fn free_space_is_told_for_a_directory_and_not_for_a_missing_one() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(free_bytes(tmp.path()).is_some_and(|b| b > 0));
        assert_eq!(free_bytes(&tmp.path().join("missing")), None);
        // The scratch directory exists, wherever it went.
        assert!(scratch_dir().unwrap().path().is_dir());
    }
}
