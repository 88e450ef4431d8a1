//! The client session: a device's protocol life as a plain state machine (DESIGN.md §3).
//!
//! A driver feeds it [`Event`]s — connected, task offered, model prepared, trained, acknowledged,
//! connection lost — each with an explicit `now` in milliseconds, and carries out the [`Action`]s it answers
//! in order: connect, ask for a task, prepare (fetch and cache) a model, check eligibility, train, persist,
//! upload, decline, wait, stop. The QUIC driver ([`crate::driver`]) and the simulator drive the very same
//! session; it never sleeps, reads a clock, touches a file or a socket, or draws randomness.
//!
//! The rules it keeps:
//! - a manifest must be signed by the trusted key, newer than the held one (or the held one itself) and
//!   its adapter must hash to what it names; anything else is refused and the previous model kept;
//! - an update is persisted (with the privacy charge that producing it spent) before its first upload, is
//!   re-sent with the same id until acknowledged, and a round it was computed for is never trained again;
//! - a task that would take the device's example-level ε past its `max_epsilon` is declined, with a typed
//!   reason the coordinator records; with a limit set, a task without DP-SGD is declined too;
//! - a task outside the training window waits for the window; an ineligible device waits and asks again;
//! - a revoked or unknown key, or an untrusted coordinator, stops the session with that error;
//! - in a secure round (the task carries SecAgg+ parameters) the update never leaves in the clear: after
//!   training the device advertises keys, shares its secrets with its neighbours, uploads its update
//!   masked, and reveals only the shares a consistent unmasking request asks for (never both of one
//!   peer's); every step's state is persisted before its message is sent, and re-sent unchanged after a
//!   crash. A device excluded from a phase drops out of the round; the coordinator carries on without it.
//!
//! What must never live here: I/O of any kind, training itself, or protocol encoding.

use rand::SeedableRng;
use starling_privacy::{accountant, AccountantKind, DpEvent, GaussianMechanism};
use starling_protocol::backoff::Backoff;
use starling_protocol::bulk::BulkHeader;
use starling_protocol::message::{
    ErrorCode, SecAggReply, SecAggStep, SecAggTask, Task, UpdateMetrics, Upload,
};
use starling_protocol::Refusal;
use starling_protocol::{
    from_hex, hex, Digest, Fingerprint, Manifest, ManifestVerifier, ModelVersion, RoundId,
    SignedManifest, UpdateId,
};
use starling_secagg::protocol::EncryptedShares;
use starling_secagg::{Client as SecAggClient, ClientState, PublicKeys, Reveal};

use crate::config::TimeWindow;

/// Milliseconds on the driver's clock (Unix time on a device, simulated time in a simulation).
pub type Millis = u64;

/// The model version a device holds: verified manifest and the digests of what it names.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HeldModel {
    /// The version.
    pub version: u64,
    /// The signed manifest exactly as verified.
    pub manifest: SignedManifest,
    /// SHA-256 (hex) of the base model bundle.
    pub base_digest: String,
    /// SHA-256 (hex) of the adapter blob.
    pub adapter_digest: String,
}

impl HeldModel {
    /// The SHA-256 of the base bundle.
    pub fn base(&self) -> Option<Digest> {
        Digest::from_hex(&self.base_digest)
    }

    /// The SHA-256 of the adapter blob.
    pub fn adapter(&self) -> Option<Digest> {
        Digest::from_hex(&self.adapter_digest)
    }
}

/// An update computed and persisted, not yet acknowledged.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PendingUpdate {
    /// The round it answers.
    pub round: u64,
    /// Its idempotency key (hex of 16 bytes), fixed when it was computed.
    pub update_id: String,
    /// The model version it was trained from.
    pub model_version: u64,
    /// The adapter schema hash (hex).
    pub schema: String,
    /// Training sequences behind it (its FedAvg weight).
    pub num_examples: u64,
    /// Training figures reported with it.
    pub metrics: UpdateMetrics,
    /// Size of the encoded update.
    pub body_size: u64,
    /// SHA-256 (hex) of the encoded update.
    pub body_digest: String,
    /// The round whose file holds the body, when the update was carried over from a round that closed
    /// without it (see [`Progress::carried`]); `None`: `round`.
    #[serde(default)]
    pub stored_as: Option<u64>,
    /// What the update was trained under (training, LoRA, DP and encoding terms of its task, as a
    /// digest): a carried update answers only a task with the same terms.
    #[serde(default)]
    pub terms: String,
}

impl PendingUpdate {
    /// The round under which the driver stored the body.
    pub fn body_round(&self) -> u64 {
        self.stored_as.unwrap_or(self.round)
    }
    /// The update id as bytes.
    pub fn id(&self) -> Option<UpdateId> {
        from_hex(&self.update_id)
            .and_then(|b| <[u8; 16]>::try_from(b).ok())
            .map(UpdateId)
    }

    /// The `Upload` header announcing this update with `body` (`None` if the stored id or schema is
    /// malformed: the update can never be sent as computed).
    pub fn upload_header(&self, body: &[u8]) -> Option<Upload> {
        Some(Upload {
            update_id: self.id()?,
            round: RoundId(self.round),
            model_version: ModelVersion(self.model_version),
            schema: Digest::from_hex(&self.schema)?,
            num_examples: self.num_examples,
            metrics: self.metrics,
            body: BulkHeader::describe(body),
        })
    }
}

/// One example-level privacy charge: the DP-SGD steps of one round's training.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Charge {
    /// The round trained.
    pub round: u64,
    /// The mechanism's steps (q, effective σ, steps).
    pub event: DpEvent,
    /// The device's total ε after this charge.
    pub epsilon_after: f64,
}

/// User-level privacy as published in the manifest of the model the device holds.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct UserLevel {
    /// ε spent by the federation up to that version.
    pub epsilon: f64,
    /// Its δ.
    pub delta: f64,
}

/// A note of the last thing that went wrong, for `status`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ErrorNote {
    /// When (driver clock).
    pub at_ms: u64,
    /// What.
    pub message: String,
}

/// Where a device stands in a secure round: what it must send next, or what it waits for.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum SecAggStage {
    /// Keys drawn: advertise them.
    Advertise(PublicKeys),
    /// Keys advertised: waiting for the neighbours' keys.
    AwaitRoster,
    /// Shares encrypted: send them (the same bytes after a crash).
    Shares(Vec<EncryptedShares>),
    /// Shares sent: waiting for the shares the neighbours sent this device.
    AwaitMailbox,
    /// Shares in: the driver masks the stored update.
    Masking,
    /// The masked update is stored: upload it.
    Uploading,
    /// Masked update acknowledged: waiting for the unmasking request.
    AwaitUnmask,
    /// Shares to reveal (recorded in the state, so a later request for the other kind is refused).
    Reveals(Vec<Reveal>),
}

/// A device's secure round in progress.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SecAggProgress {
    /// The round.
    pub round: u64,
    /// The protocol state: this device's secret keys, self-mask seed and the shares it holds for its
    /// neighbours (it never leaves the device).
    pub state: ClientState,
    /// What comes next.
    pub stage: SecAggStage,
}

/// Everything the session persists (the driver writes it on [`Action::Persist`]).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    /// The client id the coordinator assigned (hex fingerprint).
    pub client_id: Option<String>,
    /// The model version held.
    pub held: Option<HeldModel>,
    /// Rounds an update was computed for: never trained again.
    pub trained_rounds: Vec<u64>,
    /// Rounds whose update was acknowledged.
    pub rounds_joined: Vec<u64>,
    /// The update computed and not yet acknowledged.
    pub pending: Option<PendingUpdate>,
    /// The example-level privacy ledger (DP-SGD), oldest first.
    pub charges: Vec<Charge>,
    /// User-level ε of the held model, as its signed manifest states it.
    pub user_level: Option<UserLevel>,
    /// Tasks declined.
    pub declined: u64,
    /// The round declined last (its task is not evaluated again).
    pub declined_round: Option<u64>,
    /// The last error.
    pub last_error: Option<ErrorNote>,
    /// The secure round in progress, if any.
    #[serde(default)]
    pub secagg: Option<SecAggProgress>,
    /// An update whose round closed without it (the coordinator abandoned the round, or restarted and
    /// lost it): offered to the next round trained from the same model version under the same terms
    /// instead of training again, so it never costs a second privacy charge.
    #[serde(default)]
    pub carried: Option<PendingUpdate>,
}

impl Progress {
    /// Example-level ε spent so far.
    pub fn epsilon(&self) -> f64 {
        self.charges.last().map_or(0.0, |c| c.epsilon_after)
    }
}

/// The session's settings.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Model-signing keys whose manifests are accepted.
    pub signing_keys: Vec<[u8; 32]>,
    /// Largest example-level ε the device spends in total (`None`: no limit).
    pub max_epsilon: Option<f64>,
    /// δ of the device's ledger.
    pub delta: f64,
    /// Accountant of the device's ledger.
    pub accountant: AccountantKind,
    /// Local-time training window.
    pub window: Option<TimeWindow>,
    /// First reconnection delay, ms.
    pub backoff_base_ms: u64,
    /// Longest reconnection delay, ms.
    pub backoff_max_ms: u64,
    /// Seed of the backoff jitter.
    pub seed: u64,
    /// How long to wait before asking again after a refused model, a failed training or an ineligible
    /// device, ms.
    pub retry_ms: u64,
}

/// What happened, as the driver tells it.
#[derive(Debug)]
pub enum Event {
    /// The driver starts (or restarts) the session.
    Start,
    /// A session with the coordinator is open.
    Connected {
        /// The id the coordinator knows this device by.
        client_id: Fingerprint,
    },
    /// Connecting failed, or the connection was lost during an exchange.
    Disconnected {
        /// What happened.
        error: String,
        /// A refusal that retrying cannot fix, if it was one.
        refusal: Option<Refusal>,
    },
    /// The coordinator closed the connection because it is stopping (a drain before a restart or an
    /// upgrade) and asked devices to come back after this long.
    Drained {
        /// When to reconnect, in milliseconds from now.
        retry_after_ms: u64,
    },
    /// The coordinator offered a task.
    TaskOffered {
        /// The task.
        task: Box<Task>,
        /// Local time of day, minutes since midnight (for the training window).
        local_minute: u16,
    },
    /// The coordinator has no task now (also its answer to a decline).
    NoTask {
        /// Ask again after this long.
        retry_after_ms: u64,
    },
    /// The model of the task is ready: the base is cached and verified against the manifest, and the local
    /// text is tokenized.
    Prepared {
        /// The adapter blob fetched for a new version (already stored by its digest); `None` if the task
        /// trains the model already held.
        adapter: Option<Vec<u8>>,
        /// Training tokens on the device (sizes DP-SGD's sampling rate).
        train_tokens: u64,
    },
    /// Preparing the model failed.
    PrepareFailed {
        /// What happened.
        error: String,
        /// Why it failed.
        kind: PrepareFailure,
    },
    /// The eligibility check ran.
    Eligibility {
        /// Whether the device may train now.
        allowed: bool,
        /// Its output, for the log.
        detail: String,
    },
    /// Training finished; the encoded update is stored where the driver keeps pending updates.
    Trained(Box<PendingUpdate>),
    /// Training failed.
    TrainingFailed {
        /// What happened.
        error: String,
    },
    /// The coordinator acknowledged the pending update: it is durable there.
    Acked {
        /// The update acknowledged.
        update_id: UpdateId,
    },
    /// The coordinator answered a request with a typed error.
    Refused {
        /// Its code.
        code: ErrorCode,
        /// Its message.
        message: String,
    },
    /// The coordinator answered a secure-aggregation step.
    SecAgg(SecAggReply),
    /// The driver masked the pending update (its stored body is now the masked one).
    Masked {
        /// Size of the masked body.
        body_size: u64,
        /// SHA-256 (hex) of the masked body.
        body_digest: String,
    },
    /// Masking the pending update failed.
    MaskFailed {
        /// What happened.
        error: String,
    },
    /// A wait the session asked for may be over.
    Timer,
    /// The device is shutting down (SIGTERM, Ctrl-C).
    Shutdown,
}

/// Why preparing a model failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrepareFailure {
    /// The bytes do not match the signed manifest: refuse this version, keep the previous one.
    Tampered,
    /// The network failed: reconnect and try again.
    Transient,
    /// The device cannot take this task (e.g. it would not fit in `max_memory_mb`): decline it.
    Decline(ErrorCode),
    /// A local failure (disk, unreadable data): report and try again later.
    Local,
}

/// What the driver must do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Open a session with the coordinator.
    Connect,
    /// Ask for work.
    RequestTask {
        /// The version held.
        held: Option<ModelVersion>,
    },
    /// Make the task's model ready: base bundle (cached by digest, verified against the manifest), the
    /// adapter of a new version (fetched and stored by digest) and the local text tokenized for it.
    Prepare {
        /// The task.
        task: Box<Task>,
        /// Its verified manifest.
        manifest: Box<Manifest>,
        /// Whether the adapter must be fetched (a version not held yet).
        fetch_adapter: bool,
    },
    /// Run the eligibility check.
    CheckEligibility,
    /// Train for the task, starting from the held adapter; store the encoded update, then report
    /// [`Event::Trained`].
    Train {
        /// The task.
        task: Box<Task>,
        /// Its manifest (the held model).
        manifest: Box<Manifest>,
        /// DP-SGD's Poisson sampling rate, as accounted (when the task asks for DP-SGD).
        dp_sampling_rate: Option<f64>,
    },
    /// Write [`Session::progress`] durably before doing anything else.
    Persist,
    /// Upload the pending update (its body from where the driver stored it).
    Upload(PendingUpdate),
    /// The update of `round` is acknowledged or dead: its stored body may go.
    DiscardPending {
        /// The round.
        round: u64,
    },
    /// Tell the coordinator this device declines the round's task.
    Decline {
        /// The round.
        round: RoundId,
        /// Why, typed.
        code: ErrorCode,
        /// Why, for the operator.
        reason: String,
    },
    /// Send a secure-aggregation step; report the answer as [`Event::SecAgg`].
    SecAgg {
        /// The round.
        round: RoundId,
        /// The step.
        step: SecAggStep,
    },
    /// Replace the pending update's stored body (it must still hash to the pending update's digest) by
    /// its masked form ([`crate::secure::mask_body`] with this state), then report [`Event::Masked`].
    Mask {
        /// The round.
        round: u64,
        /// The device's protocol state, shares in.
        state: Box<ClientState>,
    },
    /// Send [`Event::Timer`] at this time (or earlier on shutdown).
    Wait {
        /// When.
        until: Millis,
    },
    /// The session is over.
    Stop {
        /// Why.
        reason: String,
        /// Whether it ends in an error (revoked, not enrolled, untrusted coordinator).
        error: bool,
    },
}

/// What a wait leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    Connect,
    RequestTask,
    Upload,
    SecAgg,
}

#[derive(Debug)]
enum Phase {
    Idle,
    Connecting,
    AwaitingTask,
    Preparing {
        task: Box<Task>,
        manifest: Box<Manifest>,
    },
    Eligibility {
        task: Box<Task>,
        manifest: Box<Manifest>,
        dp_sampling_rate: Option<f64>,
        event: Option<DpEvent>,
    },
    Training {
        event: Option<DpEvent>,
        secagg: Option<SecAggTask>,
        terms: String,
    },
    Uploading,
    SecAgg,
    Masking,
    Declining,
    Waiting {
        until: Millis,
        then: Next,
    },
    Stopped,
}

/// A device's session (see the module docs).
#[derive(Debug)]
pub struct Session {
    cfg: SessionConfig,
    progress: Progress,
    verifier: ManifestVerifier,
    backoff: Backoff,
    phase: Phase,
    /// Randomness for secure rounds' keys and shares (from the OS on a device, from the seed in a
    /// simulation); none: secure tasks are declined.
    rng: Option<rand_chacha::ChaCha20Rng>,
}

impl Session {
    /// A session resuming from `progress` (a fresh [`Progress`] on first start).
    pub fn new(cfg: SessionConfig, progress: Progress) -> Self {
        let mut verifier = ManifestVerifier::new(cfg.signing_keys.clone());
        if let Some(h) = &progress.held {
            verifier = verifier.holding(ModelVersion(h.version), h.manifest.digest());
        }
        let backoff = Backoff::new(
            std::time::Duration::from_millis(cfg.backoff_base_ms),
            std::time::Duration::from_millis(cfg.backoff_max_ms),
            cfg.seed,
        );
        Self {
            cfg,
            progress,
            verifier,
            backoff,
            phase: Phase::Idle,
            rng: None,
        }
    }

    /// Gives the session a source of secret randomness (secure rounds draw keys and shares from it):
    /// a fresh OS seed at every start on a device, a seed-derived one in a simulation.
    pub fn with_entropy(mut self, seed: [u8; 32]) -> Self {
        self.rng = Some(rand_chacha::ChaCha20Rng::from_seed(seed));
        self
    }

    /// What is persisted.
    pub fn progress(&self) -> &Progress {
        &self.progress
    }

    /// Whether the session has stopped.
    pub fn stopped(&self) -> bool {
        matches!(self.phase, Phase::Stopped)
    }

    fn held_version(&self) -> Option<ModelVersion> {
        self.progress.held.as_ref().map(|h| ModelVersion(h.version))
    }

    fn note(&mut self, now: Millis, message: String) {
        tracing::warn!("{message}");
        self.progress.last_error = Some(ErrorNote {
            at_ms: now,
            message,
        });
    }

    fn wait(&mut self, until: Millis, then: Next) -> Action {
        self.phase = Phase::Waiting { until, then };
        Action::Wait { until }
    }

    fn stop(&mut self, reason: String, error: bool) -> Vec<Action> {
        self.phase = Phase::Stopped;
        vec![Action::Persist, Action::Stop { reason, error }]
    }

    fn request_task(&mut self) -> Vec<Action> {
        self.phase = Phase::AwaitingTask;
        vec![Action::RequestTask {
            held: self.held_version(),
        }]
    }

    fn upload_pending(&mut self) -> Vec<Action> {
        match self.progress.pending.clone() {
            Some(p) => {
                self.phase = Phase::Uploading;
                vec![Action::Upload(p)]
            }
            None => self.request_task(),
        }
    }

    fn reconnect_later(&mut self, now: Millis) -> Vec<Action> {
        let delay = self.backoff.next_delay().as_millis() as u64;
        vec![self.wait(now.saturating_add(delay), Next::Connect)]
    }

    /// Refuses an offered model (`what` says which and why), keeps the one held, asks again later.
    fn refuse_model(&mut self, now: Millis, what: String) -> Vec<Action> {
        let held = self
            .held_version()
            .map_or("none".into(), |v| v.0.to_string());
        self.note(now, format!("{what}; keeping version {held}"));
        self.retry_later(now)
    }

    fn retry_later(&mut self, now: Millis) -> Vec<Action> {
        vec![
            Action::Persist,
            self.wait(now.saturating_add(self.cfg.retry_ms), Next::RequestTask),
        ]
    }

    /// Feeds one event; returns what the driver must do, in order.
    pub fn handle(&mut self, now: Millis, event: Event) -> Vec<Action> {
        if self.stopped() {
            return Vec::new();
        }
        match event {
            Event::Start => {
                self.phase = Phase::Connecting;
                vec![Action::Connect]
            }
            Event::Shutdown => self.stop("shutting down".into(), false),
            Event::Connected { client_id } => {
                self.backoff.reset();
                self.progress.client_id = Some(client_id.to_hex());
                if self.progress.secagg.is_some() {
                    self.secagg_continue()
                } else {
                    self.upload_pending()
                }
            }
            Event::SecAgg(reply) => self.secagg_reply(now, reply),
            Event::Masked {
                body_size,
                body_digest,
            } => {
                let (Phase::Masking, Some(p), Some(sa)) = (
                    &self.phase,
                    self.progress.pending.as_mut(),
                    self.progress.secagg.as_mut(),
                ) else {
                    return Vec::new();
                };
                p.body_size = body_size;
                p.body_digest = body_digest;
                sa.stage = SecAggStage::Uploading;
                let mut a = vec![Action::Persist];
                a.extend(self.upload_pending());
                a
            }
            Event::MaskFailed { error } => self.secagg_drop(now, format!("masking: {error}")),
            Event::Disconnected { error, refusal } => self.disconnected(now, error, refusal),
            Event::Drained { retry_after_ms } => {
                // Spread a fleet's return over one backoff step instead of all at the same instant.
                let jitter = self.backoff.jitter_ms(self.cfg.backoff_base_ms);
                let after = retry_after_ms.saturating_add(jitter);
                self.note(
                    now,
                    format!(
                        "the coordinator is restarting; reconnecting in {} ms",
                        after
                    ),
                );
                vec![self.wait(now.saturating_add(after), Next::Connect)]
            }
            Event::Timer => match self.phase {
                Phase::Waiting { until, then } if now >= until => match then {
                    Next::Connect => {
                        self.phase = Phase::Connecting;
                        vec![Action::Connect]
                    }
                    Next::RequestTask => self.request_task(),
                    Next::Upload => self.upload_pending(),
                    Next::SecAgg => self.secagg_continue(),
                },
                _ => Vec::new(),
            },
            Event::NoTask { retry_after_ms } => {
                vec![self.wait(now.saturating_add(retry_after_ms), Next::RequestTask)]
            }
            Event::TaskOffered { task, local_minute } => self.task_offered(now, task, local_minute),
            Event::Prepared {
                adapter,
                train_tokens,
            } => self.prepared(now, adapter, train_tokens),
            Event::PrepareFailed { error, kind } => match kind {
                PrepareFailure::Transient => {
                    self.note(now, format!("preparing the model failed: {error}"));
                    self.reconnect_later(now)
                }
                PrepareFailure::Tampered | PrepareFailure::Local => {
                    self.refuse_model(now, format!("refusing the offered model ({error})"))
                }
                PrepareFailure::Decline(code) => {
                    let round = match &self.phase {
                        Phase::Preparing { task, .. } => task.round,
                        _ => return self.retry_later(now),
                    };
                    self.decline(now, round, code, error)
                }
            },
            Event::Eligibility { allowed, detail } => {
                match std::mem::replace(&mut self.phase, Phase::Idle) {
                    Phase::Eligibility {
                        task,
                        manifest,
                        dp_sampling_rate,
                        event,
                    } if allowed => {
                        self.phase = Phase::Training {
                            event,
                            secagg: task.secagg.clone(),
                            terms: task_terms(&task),
                        };
                        vec![Action::Train {
                            task,
                            manifest,
                            dp_sampling_rate,
                        }]
                    }
                    Phase::Eligibility { .. } => {
                        tracing::info!("not eligible to train now: {detail}");
                        vec![self.wait(now.saturating_add(self.cfg.retry_ms), Next::RequestTask)]
                    }
                    other => {
                        self.phase = other;
                        Vec::new()
                    }
                }
            }
            Event::Trained(update) => self.trained(now, *update),
            Event::TrainingFailed { error } => {
                self.note(now, format!("training failed: {error}"));
                self.retry_later(now)
            }
            Event::Acked { update_id } => {
                let Some(p) = self.progress.pending.clone() else {
                    return self.request_task();
                };
                if p.id() != Some(update_id) {
                    return self.upload_pending();
                }
                tracing::info!(round = p.round, "update acknowledged");
                self.progress.pending = None;
                self.progress.rounds_joined.push(p.round);
                let mut a = vec![
                    Action::Persist,
                    Action::DiscardPending {
                        round: p.body_round(),
                    },
                ];
                match self.progress.secagg.as_mut() {
                    Some(sa) if sa.round == p.round => {
                        sa.stage = SecAggStage::AwaitUnmask;
                        a.extend(self.secagg_continue());
                    }
                    _ => a.extend(self.request_task()),
                }
                a
            }
            Event::Refused { code, message } => self.refused(now, code, message),
        }
    }

    fn disconnected(
        &mut self,
        now: Millis,
        error: String,
        refusal: Option<Refusal>,
    ) -> Vec<Action> {
        let reason = match refusal {
            Some(Refusal::Revoked) => Some("the coordinator revoked this device's key"),
            Some(Refusal::NotEnrolled) => Some("the coordinator does not know this device's key"),
            Some(Refusal::UntrustedCoordinator) => {
                Some("the coordinator's key is not the pinned one")
            }
            None => None,
        };
        if let Some(r) = reason {
            let message = format!("{r} ({error})");
            self.note(now, message.clone());
            return self.stop(message, true);
        }
        self.note(now, format!("disconnected ({error}); reconnecting"));
        self.reconnect_later(now)
    }

    fn task_offered(&mut self, now: Millis, task: Box<Task>, local_minute: u16) -> Vec<Action> {
        if self.progress.secagg.is_some() {
            return self.secagg_continue();
        }
        if self.progress.pending.is_some() {
            return self.upload_pending();
        }
        if task.secagg.is_some() && self.rng.is_none() {
            let why = "a secure round needs a source of randomness this session was not given";
            return self.decline(now, task.round, ErrorCode::Unavailable, why.into());
        }
        let round = task.round.0;
        if let Some(actions) = self.offer_carried(&task) {
            return actions;
        }
        if self.progress.trained_rounds.contains(&round)
            || self.progress.declined_round == Some(round)
        {
            // Trained once already (its update was acknowledged or refused): never spend privacy twice.
            return vec![self.wait(now.saturating_add(self.cfg.retry_ms), Next::RequestTask)];
        }
        let held = self.progress.held.as_ref();
        let (manifest, fetch_adapter) = match held {
            Some(h) if h.manifest == task.manifest => match self.verifier_body(&h.manifest) {
                Some(m) => (m, false),
                None => {
                    self.note(now, "the held manifest no longer verifies".into());
                    return self.retry_later(now);
                }
            },
            _ => match self.verifier.verify(&task.manifest) {
                Ok(m) => (m, true),
                Err(e) => {
                    return self
                        .refuse_model(now, format!("refusing the manifest of round {round}: {e}"));
                }
            },
        };
        if let Some(w) = self.cfg.window {
            if !w.contains(local_minute) {
                let minutes = u64::from(w.minutes_until_open(local_minute));
                tracing::info!(round, "outside the training window; waiting {minutes} min");
                return vec![self.wait(now.saturating_add(minutes * 60_000), Next::RequestTask)];
            }
        }
        self.phase = Phase::Preparing {
            task: task.clone(),
            manifest: Box::new(manifest.clone()),
        };
        vec![Action::Prepare {
            task,
            manifest: Box::new(manifest),
            fetch_adapter,
        }]
    }

    /// Answers `task` with the carried update if it was trained from the task's model version under the
    /// same terms (the round that closed without it published nothing, so the next round usually trains
    /// from the same version): relabelled for this round with a fresh id, sent without training again.
    /// A carried update that no longer fits (a newer model, other terms) is discarded. `None`: train.
    fn offer_carried(&mut self, task: &Task) -> Option<Vec<Action>> {
        let carried = self.progress.carried.take()?;
        let version = self.verifier_body(&task.manifest).map(|m| m.version.0);
        let fits = task.secagg.is_none()
            && version == Some(carried.model_version)
            && carried.terms == task_terms(task)
            && carried.round < task.round.0
            && !self.progress.trained_rounds.contains(&task.round.0);
        if !fits {
            tracing::info!(
                round = carried.round,
                "the update kept from a closed round does not fit this task; discarded"
            );
            return Some(vec![
                Action::Persist,
                Action::DiscardPending {
                    round: carried.body_round(),
                },
                self.wait(0, Next::RequestTask),
            ]);
        }
        let mut p = carried;
        tracing::info!(
            from = p.round,
            to = task.round.0,
            "sending the update kept from a round that closed without it (no new training, no new charge)"
        );
        p.stored_as = Some(p.body_round());
        p.update_id = hex(&carried_id(&p.update_id, task.round.0));
        p.round = task.round.0;
        self.progress.trained_rounds.push(p.round);
        self.progress.pending = Some(p);
        let mut a = vec![Action::Persist];
        a.extend(self.upload_pending());
        Some(a)
    }

    /// The body of the held manifest (verified when it was accepted).
    fn verifier_body(&self, signed: &SignedManifest) -> Option<Manifest> {
        ManifestVerifier::new(self.cfg.signing_keys.clone())
            .verify(signed)
            .ok()
    }

    fn prepared(
        &mut self,
        now: Millis,
        adapter: Option<Vec<u8>>,
        train_tokens: u64,
    ) -> Vec<Action> {
        let Phase::Preparing { task, manifest } = std::mem::replace(&mut self.phase, Phase::Idle)
        else {
            return Vec::new();
        };
        let mut actions = Vec::new();
        if let Some(bytes) = adapter {
            match self.verifier.accept(&task.manifest, &bytes) {
                Ok(m) => {
                    tracing::info!(version = m.version.0, "model version verified and held");
                    self.progress.held = Some(HeldModel {
                        version: m.version.0,
                        manifest: task.manifest.clone(),
                        base_digest: m.base_digest.to_hex(),
                        adapter_digest: m.adapter_digest.to_hex(),
                    });
                    self.progress.user_level = (m.dp.epsilon_spent > 0.0).then_some(UserLevel {
                        epsilon: m.dp.epsilon_spent,
                        delta: m.dp.delta,
                    });
                    actions.push(Action::Persist);
                }
                Err(e) => {
                    let what = format!("refusing model version {}: {e}", manifest.version.0);
                    return self.refuse_model(now, what);
                }
            }
        }
        let (event, q) = match self.planned_event(&task, &manifest, train_tokens) {
            Ok(p) => p,
            Err(reason) => {
                actions.extend(self.decline(now, task.round, ErrorCode::BadRequest, reason));
                return actions;
            }
        };
        if let Some(max) = self.cfg.max_epsilon {
            let verdict = match event {
                None => Err("the task has no DP-SGD, so its ε is unbounded".to_string()),
                Some(ev) => {
                    let mut events: Vec<DpEvent> =
                        self.progress.charges.iter().map(|c| c.event).collect();
                    events.push(ev);
                    match accountant::epsilon(&events, self.cfg.delta, self.cfg.accountant) {
                        Ok(s) if s.epsilon <= max => Ok(()),
                        Ok(s) => Err(format!(
                            "the task would take this device's ε from {:.3} to {:.3}, past its max_epsilon {max}",
                            self.progress.epsilon(),
                            s.epsilon
                        )),
                        Err(e) => Err(format!("accounting the task failed: {e}")),
                    }
                }
            };
            if let Err(reason) = verdict {
                actions.extend(self.decline(now, task.round, ErrorCode::BudgetExhausted, reason));
                return actions;
            }
        }
        self.phase = Phase::Eligibility {
            task,
            manifest,
            dp_sampling_rate: q,
            event,
        };
        actions.push(Action::CheckEligibility);
        actions
    }

    /// The DP-SGD event a task's training charges (with the effective σ opendp certifies), and its q.
    fn planned_event(
        &self,
        task: &Task,
        manifest: &Manifest,
        train_tokens: u64,
    ) -> Result<(Option<DpEvent>, Option<f64>), String> {
        let Some(d) = task.dp.dp_sgd else {
            return Ok((None, None));
        };
        let sequences = train_tokens / u64::from(task.params.seq_len.max(1));
        if sequences == 0 {
            return Err("the device has too little text for one training sequence".into());
        }
        let q = if d.sampling_rate > 0.0 {
            d.sampling_rate
        } else {
            (f64::from(task.params.batch_size) / sequences as f64).min(1.0)
        };
        let mech = GaussianMechanism::with_multiplier(
            d.clip,
            d.noise_multiplier,
            manifest.adapter_schema.num_params(),
        )
        .map_err(|e| e.to_string())?;
        let event = DpEvent::new(
            q,
            mech.effective_noise_multiplier(),
            u64::from(task.params.local_steps),
        )
        .map_err(|e| e.to_string())?;
        Ok((Some(event), Some(q)))
    }

    fn decline(
        &mut self,
        now: Millis,
        round: RoundId,
        code: ErrorCode,
        reason: String,
    ) -> Vec<Action> {
        self.note(now, format!("declining round {}: {reason}", round.0));
        self.progress.declined += 1;
        self.progress.declined_round = Some(round.0);
        self.phase = Phase::Declining;
        vec![
            Action::Persist,
            Action::Decline {
                round,
                code,
                reason,
            },
        ]
    }

    fn trained(&mut self, now: Millis, mut update: PendingUpdate) -> Vec<Action> {
        let Phase::Training {
            event,
            secagg,
            terms,
        } = std::mem::replace(&mut self.phase, Phase::Idle)
        else {
            return Vec::new();
        };
        update.terms = terms;
        if let Some(ev) = event {
            let mut events: Vec<DpEvent> = self.progress.charges.iter().map(|c| c.event).collect();
            events.push(ev);
            // Charged in the same write that persists the update: whatever leaves the device is accounted.
            let after = accountant::epsilon(&events, self.cfg.delta, self.cfg.accountant)
                .map_or(f64::INFINITY, |s| s.epsilon);
            self.progress.charges.push(Charge {
                round: update.round,
                event: ev,
                epsilon_after: after,
            });
            // Reported with the update: what this round alone cost the device.
            update.metrics.epsilon_spent =
                accountant::epsilon(&[ev], self.cfg.delta, self.cfg.accountant)
                    .map_or(0.0, |s| s.epsilon);
        }
        let _ = now;
        tracing::info!(
            round = update.round,
            loss = update.metrics.train_loss,
            epsilon = self.progress.epsilon(),
            "trained"
        );
        self.progress.trained_rounds.push(update.round);
        let round = update.round;
        self.progress.pending = Some(update);
        if let Some(sa) = secagg {
            // Keys drawn and persisted before they are advertised.
            let drawn = match self.rng.as_mut() {
                Some(rng) => {
                    SecAggClient::new(sa.params.clone(), sa.id, rng).map_err(|e| e.to_string())
                }
                None => Err("no source of randomness".into()),
            };
            return match drawn {
                Ok((client, keys)) => {
                    self.progress.secagg = Some(SecAggProgress {
                        round,
                        state: client.snapshot(),
                        stage: SecAggStage::Advertise(keys),
                    });
                    let mut a = vec![Action::Persist];
                    a.extend(self.secagg_continue());
                    a
                }
                Err(e) => self.secagg_drop(now, format!("secure round {round}: {e}")),
            };
        }
        let mut a = vec![Action::Persist];
        a.extend(self.upload_pending());
        a
    }

    /// The next action of the secure round in progress, from its persisted stage.
    fn secagg_continue(&mut self) -> Vec<Action> {
        let Some(sa) = &self.progress.secagg else {
            return self.request_task();
        };
        let round = RoundId(sa.round);
        let step = match &sa.stage {
            SecAggStage::Advertise(keys) => SecAggStep::Keys(*keys),
            SecAggStage::AwaitRoster | SecAggStage::AwaitMailbox | SecAggStage::AwaitUnmask => {
                SecAggStep::Next
            }
            SecAggStage::Shares(m) => SecAggStep::Shares(m.clone()),
            SecAggStage::Reveals(r) => SecAggStep::Reveals(r.clone()),
            SecAggStage::Masking => {
                self.phase = Phase::Masking;
                return vec![Action::Mask {
                    round: sa.round,
                    state: Box::new(sa.state.clone()),
                }];
            }
            SecAggStage::Uploading => return self.upload_pending(),
        };
        self.phase = Phase::SecAgg;
        vec![Action::SecAgg { round, step }]
    }

    /// Leaves the secure round in progress (excluded, refused, or a local failure): its pending update
    /// is dropped — it never leaves unmasked — and the device asks for work again.
    fn secagg_drop(&mut self, now: Millis, why: String) -> Vec<Action> {
        self.note(now, format!("leaving the secure round: {why}"));
        let round = self.progress.secagg.take().map(|s| s.round);
        let mut a = vec![Action::Persist];
        if let Some(p) = self
            .progress
            .pending
            .take_if(|p| round.is_none_or(|r| r == p.round))
        {
            a.push(Action::DiscardPending {
                round: p.body_round(),
            });
        }
        a.extend(self.request_task());
        a
    }

    /// The coordinator's answer to a secure-aggregation step.
    fn secagg_reply(&mut self, now: Millis, reply: SecAggReply) -> Vec<Action> {
        if !matches!(self.phase, Phase::SecAgg) {
            return Vec::new();
        }
        let Some(sa) = self.progress.secagg.as_mut() else {
            return self.request_task();
        };
        let round = sa.round;
        let client = || SecAggClient::restore(sa.state.clone()).map_err(|e| e.to_string());
        let next = match (&sa.stage, reply) {
            (_, SecAggReply::Excluded { reason }) => {
                return self.secagg_drop(now, format!("round {round}: {reason}"));
            }
            (_, SecAggReply::Done) => {
                tracing::info!(round, "secure round done");
                self.progress.secagg = None;
                let mut a = vec![Action::Persist];
                // Nothing of the round stays behind (its masked update was acknowledged before `Done`).
                if let Some(p) = self.progress.pending.take_if(|p| p.round == round) {
                    a.push(Action::DiscardPending {
                        round: p.body_round(),
                    });
                }
                a.extend(self.request_task());
                return a;
            }
            (SecAggStage::Advertise(_), SecAggReply::Wait { retry_after_ms }) => {
                sa.stage = SecAggStage::AwaitRoster;
                Ok((true, Some(retry_after_ms)))
            }
            (SecAggStage::Shares(_), SecAggReply::Wait { retry_after_ms }) => {
                sa.stage = SecAggStage::AwaitMailbox;
                Ok((true, Some(retry_after_ms)))
            }
            (
                SecAggStage::AwaitRoster | SecAggStage::AwaitMailbox | SecAggStage::AwaitUnmask,
                SecAggReply::Wait { retry_after_ms },
            ) => Ok((false, Some(retry_after_ms))),
            (SecAggStage::AwaitRoster, SecAggReply::Roster(roster)) => {
                match (client(), self.rng.as_mut()) {
                    (Ok(mut c), Some(rng)) => c
                        .share_keys(&roster.into_iter().collect(), rng)
                        .map(|shares| {
                            sa.state = c.snapshot();
                            sa.stage = SecAggStage::Shares(shares);
                            (true, None)
                        })
                        .map_err(|e| e.to_string()),
                    (Err(e), _) => Err(e),
                    (_, None) => Err("no source of randomness".into()),
                }
            }
            (SecAggStage::AwaitMailbox, SecAggReply::Mailbox(mail)) => {
                client().and_then(|mut c| {
                    c.receive_shares(&mail).map_err(|e| e.to_string())?;
                    sa.state = c.snapshot();
                    sa.stage = SecAggStage::Masking;
                    Ok((true, None))
                })
            }
            (SecAggStage::AwaitUnmask, SecAggReply::Unmask { dropped, reported }) => {
                client().and_then(|mut c| {
                    // The consistency check: a peer named twice, or asked the other kind of share
                    // than before, is refused here and the device leaves the round.
                    let reveals = c.unmask(&dropped, &reported).map_err(|e| e.to_string())?;
                    sa.state = c.snapshot();
                    sa.stage = SecAggStage::Reveals(reveals);
                    Ok((true, None))
                })
            }
            (stage, other) => Err(format!(
                "unexpected answer {other:?} at stage {}",
                match stage {
                    SecAggStage::Advertise(_) => "advertise",
                    SecAggStage::AwaitRoster => "await-roster",
                    SecAggStage::Shares(_) => "shares",
                    SecAggStage::AwaitMailbox => "await-mailbox",
                    SecAggStage::Masking => "masking",
                    SecAggStage::Uploading => "uploading",
                    SecAggStage::AwaitUnmask => "await-unmask",
                    SecAggStage::Reveals(_) => "reveals",
                }
            )),
        };
        match next {
            Err(e) => self.secagg_drop(now, format!("round {round}: {e}")),
            Ok((persist, wait)) => {
                let mut a = Vec::new();
                if persist {
                    a.push(Action::Persist);
                }
                match wait {
                    Some(ms) => a.push(self.wait(now.saturating_add(ms), Next::SecAgg)),
                    None => a.extend(self.secagg_continue()),
                }
                a
            }
        }
    }

    fn refused(&mut self, now: Millis, code: ErrorCode, message: String) -> Vec<Action> {
        match code {
            ErrorCode::Revoked | ErrorCode::NotEnrolled => {
                let m = format!("the coordinator refused this device ({code}): {message}");
                self.note(now, m.clone());
                return self.stop(m, true);
            }
            ErrorCode::RateLimited | ErrorCode::Unavailable | ErrorCode::Internal => {
                self.note(
                    now,
                    format!("coordinator busy ({code}: {message}); retrying"),
                );
                let delay = self.backoff.next_delay().as_millis() as u64;
                let then = if self.progress.secagg.is_some() {
                    Next::SecAgg
                } else if matches!(self.phase, Phase::Uploading) {
                    Next::Upload
                } else {
                    Next::RequestTask
                };
                return vec![self.wait(now.saturating_add(delay), then)];
            }
            _ => {}
        }
        if self.progress.secagg.is_some() {
            return self.secagg_drop(now, format!("refused ({code}): {message}"));
        }
        if matches!(self.phase, Phase::Uploading) {
            if let Some(p) = self.progress.pending.take() {
                self.note(
                    now,
                    format!("update for round {} refused ({code}): {message}", p.round),
                );
                let mut a = vec![Action::Persist];
                if code == ErrorCode::LateUpdate && !p.terms.is_empty() {
                    // Its round closed without it: kept for the next round from the same model, whose
                    // task it answers as well — training again would charge the privacy ledger twice.
                    if let Some(old) = self.progress.carried.replace(p) {
                        a.push(Action::DiscardPending {
                            round: old.body_round(),
                        });
                    }
                } else {
                    // The coordinator will never count this update (it is unusable): dropped. Its
                    // privacy charge stays: the update was computed.
                    a.push(Action::DiscardPending {
                        round: p.body_round(),
                    });
                }
                a.extend(self.request_task());
                return a;
            }
        }
        self.note(now, format!("request refused ({code}): {message}"));
        self.retry_later(now)
    }
}

/// The terms of a task an update answers, as a digest (hex): training parameters, LoRA, DP and
/// encoding. Two tasks with the same terms from the same model version ask for the same computation.
pub fn task_terms(task: &Task) -> String {
    let terms = serde_json::json!({
        "params": task.params, "dp": task.dp, "lora": task.lora, "encoding": task.encoding,
        "max_update_bytes": task.max_update_bytes,
    });
    Digest::of(terms.to_string().as_bytes()).to_hex()
}

/// The id of a carried update relabelled for `round`: derived from its first id, so a device that
/// crashes after persisting it sends the same id again.
fn carried_id(first: &str, round: u64) -> [u8; 16] {
    let mut input = first.as_bytes().to_vec();
    input.extend_from_slice(&round.to_be_bytes());
    let d = Digest::of(&input);
    let mut id = [0u8; 16];
    id.copy_from_slice(&d.0[..16]);
    id
}

/// Hex of an update id (how [`PendingUpdate::update_id`] stores it).
pub fn update_id_hex(id: &UpdateId) -> String {
    hex(&id.0)
}

#[cfg(test)]
mod tests;
