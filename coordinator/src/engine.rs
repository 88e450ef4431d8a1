//! The round engine: a pure state machine. The driver (the QUIC server in `serve`, a simulation, a test)
//! feeds it what happened — a client was seen, asked for work, uploaded — with an explicit time in
//! milliseconds, and carries out what it answers: persist a round, aggregate, publish.
//!
//! Lifecycle of a round: wait until `min_clients` eligible clients were seen recently → select a sample
//! (fraction q or count m, uniformly without replacement, seeded by `(seed, round)` so a restarted
//! coordinator selects the same) → selected clients get the task when they ask → collect until every selected
//! client reported or the deadline passed → aggregate if at least `min_updates` arrived, else abandon and
//! start a new round → after the driver published the new version, the next round. Round ids only grow,
//! abandoned rounds included.
//!
//! Durability is the driver's, in this order: persist [`Action::RoundStarted`] before serving its tasks;
//! write an upload durably between [`Engine::check_update`] and [`Engine::record_update`], and only then ack.
//! What must never live here: sockets, clocks, threads, files, randomness not derived from the seed.

use std::collections::{BTreeMap, HashMap, HashSet};

use rand::seq::index::sample;
use rand::SeedableRng;
use starling_protocol::message::SecAggStep;
use starling_protocol::{Digest, Fingerprint, ModelVersion, RoundId, UpdateId};
use starling_secagg::{ClientId, RoundParams};

use crate::secagg::{SecAggConfig, SecAggPhase, SecAggRound, StepOutcome};

/// Milliseconds on the driver's clock (Unix time in deployment, simulated time in simulations).
pub type Millis = u64;

/// How many clients a round selects.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Selection {
    /// A fraction q of the eligible clients (at least one).
    Fraction(f64),
    /// Exactly m clients (or all eligible, if fewer — never fewer than `min_clients`).
    Count(usize),
}

/// Engine settings (the `[rounds]` table of coordinator.toml).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// Eligible clients needed before a round starts.
    pub min_clients: usize,
    /// How many of them a round selects.
    pub selection: Selection,
    /// Updates needed to aggregate; fewer by the deadline abandons the round.
    pub min_updates: usize,
    /// Time from selection to the deadline.
    pub round_timeout_ms: u64,
    /// A client counts as connected if seen this recently.
    pub presence_timeout_ms: u64,
    /// Rounds to run (`None`: forever).
    pub rounds: Option<u64>,
    /// Seed of client selection.
    pub seed: u64,
    /// What unselected clients are told to wait before asking again.
    pub retry_after_ms: u64,
    /// After a restart, the open round's deadline moves later by the time the coordinator was down, and
    /// by at least this much (milliseconds).
    pub resume_grace_ms: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            min_clients: 2,
            selection: Selection::Fraction(1.0),
            min_updates: 2,
            round_timeout_ms: 600_000,
            presence_timeout_ms: 120_000,
            rounds: None,
            seed: 0,
            retry_after_ms: 5_000,
            resume_grace_ms: 0,
        }
    }
}

impl EngineConfig {
    /// Checks that these settings may be replaced by `next` on a running federation: `next` is valid and,
    /// under secure aggregation (`secure`), keeps the selection and `min_updates` its parameters were
    /// sized for.
    pub fn check_change(&self, next: &EngineConfig, secure: bool) -> Result<(), EngineError> {
        next.validate()?;
        if secure && (next.selection != self.selection || next.min_updates != self.min_updates) {
            return Err(EngineError::Config(ConfigError::FixedUnderSecAgg));
        }
        Ok(())
    }

    /// Checks the settings; the message names the setting at fault.
    pub fn validate(&self) -> Result<(), EngineError> {
        let bad = |e| Err(EngineError::Config(e));
        match self.selection {
            Selection::Fraction(q) if !(q > 0.0 && q <= 1.0) => return bad(ConfigError::Fraction),
            Selection::Count(0) => return bad(ConfigError::Count),
            _ => {}
        }
        if self.min_clients == 0 {
            return bad(ConfigError::MinClients);
        }
        if self.min_updates == 0 {
            return bad(ConfigError::MinUpdates);
        }
        if self.round_timeout_ms == 0 {
            return bad(ConfigError::RoundTimeout);
        }
        Ok(())
    }
}

/// Where a round is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum RoundPhase {
    /// Tasks out, updates coming in.
    Collecting,
    /// Closed; the driver aggregates and publishes.
    Aggregating,
}

/// A round as it is persisted.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RoundRecord {
    /// The round.
    pub id: RoundId,
    /// The model version clients train from.
    pub model_version: ModelVersion,
    /// The selected clients.
    pub selected: Vec<Fingerprint>,
    /// When it started.
    pub started_at: Millis,
    /// When collection ends.
    pub deadline: Millis,
    /// Collecting or aggregating.
    pub phase: RoundPhase,
    /// Eligible clients when it was selected (for the sampling rate of DP accounting).
    pub eligible: usize,
}

/// What an upload claims, as the engine needs it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UpdateMeta {
    /// Idempotency key.
    pub update_id: UpdateId,
    /// Who sent it.
    pub client: Fingerprint,
    /// The round it answers.
    pub round: RoundId,
    /// The model version it was trained from.
    pub model_version: ModelVersion,
    /// Its adapter schema.
    pub schema: Digest,
    /// Its FedAvg weight.
    pub num_examples: u64,
}

/// The answer to a task request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskDecision {
    /// Train for this round.
    Task {
        /// The round.
        round: RoundId,
        /// The model to start from.
        model_version: ModelVersion,
        /// Report by then.
        deadline: Millis,
        /// In a secure round: its parameters and the device's roster index.
        secagg: Option<(RoundParams, ClientId)>,
    },
    /// Nothing to do now.
    NoTask {
        /// Ask again after this long.
        retry_after_ms: u64,
        /// Why.
        reason: &'static str,
    },
}

/// Whether an upload is new.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateCheck {
    /// Store it durably, then call [`Engine::record_update`], then ack.
    New,
    /// Already counted: ack again, store nothing.
    Duplicate,
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Persist this round before serving its tasks.
    RoundStarted(RoundRecord),
    /// The round closed with enough updates: persist the phase, aggregate these, publish, then call
    /// [`Engine::published`].
    Aggregate {
        /// The round, now in the aggregating phase.
        round: RoundRecord,
        /// The updates to aggregate, in id order.
        updates: Vec<UpdateId>,
    },
    /// A secure round closed with its sum unmasked: persist the phase, aggregate the sum, publish, then
    /// call [`Engine::published`].
    AggregateSum {
        /// The round, now in the aggregating phase.
        round: RoundRecord,
        /// The sum of the reported encoded deltas, modulo `2^bits` of the round's parameters.
        sum: Vec<u32>,
        /// The devices in the sum.
        count: usize,
        /// The round's parameters (for decoding the sum).
        params: RoundParams,
    },
    /// A secure round moved to another phase: persist its state ([`Engine::secagg`]).
    SecAggPhase {
        /// The round.
        round: RoundId,
        /// Its new phase.
        phase: SecAggPhase,
    },
    /// The round closed with too few updates; its stored updates may be dropped.
    RoundAbandoned {
        /// The round.
        round: RoundId,
        /// Updates that had arrived.
        received: usize,
    },
    /// The configured number of rounds is done.
    Finished,
}

/// Round settings that cannot work, by the setting at fault.
#[derive(Debug, Clone, Copy, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// `selection = { fraction = q }` outside (0, 1].
    #[error("selection fraction must lie in (0, 1]")]
    Fraction,
    /// `selection = { count = 0 }`.
    #[error("selection count must be at least 1")]
    Count,
    /// `min_clients = 0`.
    #[error("min_clients must be at least 1")]
    MinClients,
    /// `min_updates = 0`.
    #[error("min_updates must be at least 1")]
    MinUpdates,
    /// `round_timeout_ms = 0`.
    #[error("round_timeout_ms must be positive")]
    RoundTimeout,
    /// A change of selection or `min_updates` under secure aggregation.
    #[error(
        "selection and min_updates are fixed under secure aggregation (they size its parameters): \
         change them in coordinator.toml and restart"
    )]
    FixedUnderSecAgg,
}

/// Driver calls that do not fit the engine's state: bugs in a driver, never a peer's doing.
#[derive(Debug, Clone, Copy, thiserror::Error, PartialEq, Eq)]
pub enum Misuse {
    /// `resume` while a round is open.
    #[error("a round is already open")]
    RoundAlreadyOpen,
    /// A secure-aggregation state handed to an engine without secure aggregation.
    #[error("a secure-aggregation state for a coordinator without secure aggregation")]
    SecAggStateWithoutSecAgg,
    /// `record_update` in a secure round (its inputs go through `record_masked`).
    #[error("a secure round takes masked inputs (record_masked)")]
    MaskedInputsOnly,
    /// A call that needs an open round, with none open.
    #[error("no round is open")]
    NoRound,
    /// A call that needs a secure round, in a round in the clear.
    #[error("the open round is not secure")]
    NotSecure,
    /// `published` with a version not newer than the latest.
    #[error("{version} is not newer than {latest}")]
    VersionNotNewer {
        /// The version published.
        version: ModelVersion,
        /// The latest before it.
        latest: ModelVersion,
    },
    /// `published` for a round that is not aggregating.
    #[error("{0} is not aggregating")]
    NotAggregating(RoundId),
    /// `abandon` of a round that is not open.
    #[error("{0} is not open")]
    NotOpen(RoundId),
}

/// Refusals and misuse.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum EngineError {
    /// The update is for a round that is not collecting (closed, abandoned, or never existed).
    #[error("update for {got} refused: {}", match current {
        Some(c) => format!("{c} is collecting"),
        None => "no round is collecting".to_string(),
    })]
    LateUpdate {
        /// The update's round.
        got: RoundId,
        /// The collecting round, if any.
        current: Option<RoundId>,
    },
    /// The update was trained from another model version.
    #[error("update trained from model {got}, the round expects {expected}")]
    WrongModelVersion {
        /// The round's version.
        expected: ModelVersion,
        /// The update's version.
        got: ModelVersion,
    },
    /// The update is for another adapter schema.
    #[error("update for adapter schema {got}, expected {expected}")]
    SchemaMismatch {
        /// The model's schema.
        expected: Digest,
        /// The update's.
        got: Digest,
    },
    /// The client was not selected for this round.
    #[error("client not selected for {0}")]
    NotSelected(RoundId),
    /// The client already contributed another update to this round.
    #[error("client already sent an update for {0}")]
    AlreadyReported(RoundId),
    /// A driver call did not fit the engine's state (a bug in the driver).
    #[error("engine misuse: {0}")]
    Misuse(Misuse),
    /// A round setting is out of range.
    #[error("invalid round setting: {0}")]
    Config(ConfigError),
    /// Secure aggregation refused a message, or its settings give no parameters for a cohort (its own
    /// errors already say "secure aggregation").
    #[error(transparent)]
    SecAgg(#[from] starling_secagg::SecAggError),
    /// A secure-aggregation step for a round in the clear.
    #[error("{0} is not a secure round")]
    NotSecure(RoundId),
}

#[derive(Debug)]
struct Round {
    record: RoundRecord,
    received: BTreeMap<UpdateId, Fingerprint>,
    reported: HashMap<Fingerprint, UpdateId>,
    /// Selected clients that declined the task (their device's policy): they will send nothing.
    declined: HashSet<Fingerprint>,
    /// The secure aggregation of a secure round.
    secagg: Option<SecAggRound>,
}

impl Round {
    fn new(record: RoundRecord, secagg: Option<SecAggRound>) -> Self {
        Self {
            record,
            received: BTreeMap::new(),
            reported: HashMap::new(),
            declined: HashSet::new(),
            secagg,
        }
    }

    /// A selected client's index in the roster of a secure round.
    fn roster_id(&self, client: &Fingerprint) -> Option<ClientId> {
        self.record
            .selected
            .binary_search(client)
            .ok()
            .map(|i| i as ClientId)
    }

    /// Whether updates (masked inputs in a secure round) are taken at `now`.
    fn accepts_updates(&self, now: Millis) -> bool {
        self.record.phase == RoundPhase::Collecting
            && match &self.secagg {
                None => now < self.record.deadline,
                Some(s) => s.phase == SecAggPhase::Masked && now < s.phase_deadline,
            }
    }
}

/// The round engine.
#[derive(Debug)]
pub struct Engine {
    cfg: EngineConfig,
    schema: Digest,
    latest: ModelVersion,
    next_round: u64,
    completed: u64,
    seen: HashMap<Fingerprint, Millis>,
    round: Option<Round>,
    finished_reported: bool,
    /// Secure aggregation: its settings, the length of a delta and each device's noise share (steps).
    secagg: Option<(SecAggConfig, usize, u64)>,
    /// The operator paused rounds: the open one finishes, no new one starts.
    paused: bool,
    /// Settings the operator changed, taken on when the next round starts.
    next_cfg: Option<EngineConfig>,
}

impl Engine {
    /// A fresh engine: `latest` is the newest published version, `next_round` the first unused round id,
    /// `completed` the rounds aggregated so far (for the round limit).
    pub fn new(
        cfg: EngineConfig,
        schema: Digest,
        latest: ModelVersion,
        next_round: u64,
        completed: u64,
    ) -> Result<Self, EngineError> {
        cfg.validate()?;
        Ok(Self {
            cfg,
            schema,
            latest,
            next_round,
            completed,
            seen: HashMap::new(),
            round: None,
            finished_reported: false,
            secagg: None,
            paused: false,
            next_cfg: None,
        })
    }

    /// The settings rounds run with (those the next round takes on, once the operator changed them).
    pub fn config(&self) -> &EngineConfig {
        self.next_cfg.as_ref().unwrap_or(&self.cfg)
    }

    /// Changes the round settings from the next round on (the open round keeps its deadline and
    /// selection). Under secure aggregation the cohort's size is part of the protocol's parameters,
    /// checked at start-up, so selection and `min_updates` cannot change there.
    pub fn set_config(&mut self, cfg: EngineConfig) -> Result<(), EngineError> {
        self.cfg.check_change(&cfg, self.secagg.is_some())?;
        self.finished_reported = false;
        if self.round.is_none() {
            self.cfg = cfg;
            self.next_cfg = None;
        } else {
            self.next_cfg = Some(cfg);
        }
        Ok(())
    }

    /// Pauses (`true`) or resumes rounds: while paused the open round runs to its end and no new round
    /// starts; devices asking for work are told to wait.
    pub fn set_paused(&mut self, paused: bool) {
        self.paused = paused;
    }

    /// Whether rounds are paused.
    pub fn paused(&self) -> bool {
        self.paused
    }

    /// The operator revoked `client`: it is forgotten for selection, and the open round stops waiting
    /// for it. An update it already sent is dropped from the round (a stolen device's contribution is
    /// not trusted), except in a secure round, where a masked input is already inside the sum. Returns
    /// whether the open round changed.
    pub fn revoked(&mut self, client: Fingerprint) -> bool {
        self.seen.remove(&client);
        let Some(r) = &mut self.round else {
            return false;
        };
        if r.record.phase != RoundPhase::Collecting || !r.record.selected.contains(&client) {
            return false;
        }
        if r.secagg.is_none() {
            if let Some(id) = r.reported.remove(&client) {
                r.received.remove(&id);
            }
        } else if r.reported.contains_key(&client) {
            return false;
        }
        r.declined.insert(client)
    }

    /// Moves the open round's deadlines `by` milliseconds later: a coordinator that was down gives the
    /// round back the time it lost, so devices that trained are not cut off by a restart.
    pub fn extend_deadlines(&mut self, by: Millis) {
        if let Some(r) = &mut self.round {
            if r.record.phase == RoundPhase::Collecting {
                r.record.deadline = r.record.deadline.saturating_add(by);
                if let Some(s) = &mut r.secagg {
                    if s.phase_deadline != Millis::MAX {
                        s.phase_deadline = s.phase_deadline.saturating_add(by);
                    }
                }
            }
        }
    }

    /// Runs every round with secure aggregation (`len`: values in a delta; `noise_steps`: the standard
    /// deviation of each device's noise share, in integer steps, 0 without distributed noise). The
    /// settings are checked for a cohort of `max_clients` (the wrap-around bound of the encoding).
    pub fn with_secure_aggregation(
        mut self,
        cfg: SecAggConfig,
        len: usize,
        max_clients: usize,
        noise_steps: u64,
    ) -> Result<Self, EngineError> {
        cfg.params(
            self.cfg.seed,
            RoundId(0),
            max_clients.max(2),
            len,
            noise_steps,
        )?;
        self.secagg = Some((cfg, len, noise_steps));
        Ok(self)
    }

    /// The open round's secure-aggregation state (what the driver persists after every change).
    pub fn secagg(&self) -> Option<(RoundId, &SecAggRound)> {
        let r = self.round.as_ref()?;
        Some((r.record.id, r.secagg.as_ref()?))
    }

    /// A fresh secure-aggregation state for a round with `record`'s cohort, if rounds are secure.
    fn new_secagg(&self, record: &RoundRecord) -> Result<Option<SecAggRound>, EngineError> {
        let Some((cfg, len, noise)) = &self.secagg else {
            return Ok(None);
        };
        let params = cfg
            .params(
                self.cfg.seed,
                record.id,
                record.selected.len(),
                *len,
                *noise,
            )
            .and_then(SecAggRound::new)?;
        Ok(Some(params))
    }

    /// Resumes a persisted round with the updates already stored for it (after a restart) and, in a
    /// secure round, its stored secure-aggregation state (a fresh one if none was stored yet: then no
    /// device had sent anything).
    pub fn resume(
        &mut self,
        record: RoundRecord,
        stored: &[UpdateMeta],
        secagg: Option<SecAggRound>,
    ) -> Result<(), EngineError> {
        if self.round.is_some() {
            return Err(EngineError::Misuse(Misuse::RoundAlreadyOpen));
        }
        let secagg = match secagg {
            Some(s) if self.secagg.is_some() => Some(s),
            Some(_) => return Err(EngineError::Misuse(Misuse::SecAggStateWithoutSecAgg)),
            None => self.new_secagg(&record)?,
        };
        let mut round = Round::new(record, secagg);
        for u in stored.iter().filter(|u| u.round == round.record.id) {
            round.received.insert(u.update_id, u.client);
            round.reported.insert(u.client, u.update_id);
        }
        self.next_round = self.next_round.max(round.record.id.0 + 1);
        self.round = Some(round);
        Ok(())
    }

    /// The newest published version.
    pub fn latest(&self) -> ModelVersion {
        self.latest
    }

    /// The round in progress, if any.
    pub fn current(&self) -> Option<&RoundRecord> {
        self.round.as_ref().map(|r| &r.record)
    }

    /// Updates (masked inputs in a secure round) counted in the current round.
    pub fn received(&self) -> usize {
        self.round.as_ref().map_or(0, |r| match &r.secagg {
            Some(s) => s.server.unmask_request().1.len(),
            None => r.received.len(),
        })
    }

    /// Rounds aggregated so far.
    pub fn completed(&self) -> u64 {
        self.completed
    }

    /// Clients seen within the presence timeout.
    pub fn connected(&self, now: Millis) -> usize {
        self.eligible(now).len()
    }

    /// Whether the configured number of rounds is done.
    pub fn finished(&self) -> bool {
        self.cfg.rounds.is_some_and(|n| self.completed >= n)
    }

    /// A client connected or made a request.
    pub fn client_seen(&mut self, client: Fingerprint, now: Millis) {
        self.seen.insert(client, now);
    }

    /// A client asks for work.
    pub fn task_request(&mut self, client: Fingerprint, now: Millis) -> TaskDecision {
        self.client_seen(client, now);
        let wait = |reason| TaskDecision::NoTask {
            retry_after_ms: self.cfg.retry_after_ms,
            reason,
        };
        if self.finished() {
            return wait("training finished");
        }
        match &self.round {
            Some(r)
                if r.record.phase == RoundPhase::Collecting
                    && now < r.record.deadline
                    && r.secagg
                        .as_ref()
                        .is_none_or(|s| s.phase == SecAggPhase::Advertise) =>
            {
                if !r.record.selected.contains(&client) {
                    wait("not selected for this round")
                } else if r.reported.contains_key(&client) {
                    wait("update already received")
                } else if r.declined.contains(&client) {
                    wait("task declined")
                } else {
                    TaskDecision::Task {
                        round: r.record.id,
                        model_version: r.record.model_version,
                        deadline: r.record.deadline,
                        secagg: r
                            .secagg
                            .as_ref()
                            .and_then(|s| Some((s.params().clone(), r.roster_id(&client)?))),
                    }
                }
            }
            Some(_) => wait("round closing"),
            None if self.paused => wait("rounds are paused by the operator"),
            None => wait("waiting for clients"),
        }
    }

    /// Checks an upload before it is stored.
    pub fn check_update(&self, meta: &UpdateMeta, now: Millis) -> Result<UpdateCheck, EngineError> {
        let collecting = self
            .round
            .as_ref()
            .filter(|r| r.record.phase == RoundPhase::Collecting);
        let Some(r) = collecting else {
            return Err(EngineError::LateUpdate {
                got: meta.round,
                current: None,
            });
        };
        if r.received.contains_key(&meta.update_id) {
            return Ok(UpdateCheck::Duplicate);
        }
        if let (Some(s), Some(id)) = (&r.secagg, r.roster_id(&meta.client)) {
            if meta.round == r.record.id && s.server.has_reported(id) {
                // A masked input is counted once, whatever id a retry carries.
                return Ok(UpdateCheck::Duplicate);
            }
        }
        if meta.round != r.record.id || !r.accepts_updates(now) {
            return Err(EngineError::LateUpdate {
                got: meta.round,
                current: Some(r.record.id),
            });
        }
        if meta.model_version != r.record.model_version {
            return Err(EngineError::WrongModelVersion {
                expected: r.record.model_version,
                got: meta.model_version,
            });
        }
        if meta.schema != self.schema {
            return Err(EngineError::SchemaMismatch {
                expected: self.schema,
                got: meta.schema,
            });
        }
        if !r.record.selected.contains(&meta.client) {
            return Err(EngineError::NotSelected(r.record.id));
        }
        if r.reported.contains_key(&meta.client) {
            return Err(EngineError::AlreadyReported(r.record.id));
        }
        Ok(UpdateCheck::New)
    }

    /// Counts an update the driver has stored durably (after [`Engine::check_update`] said `New`).
    pub fn record_update(&mut self, meta: &UpdateMeta, now: Millis) -> Result<(), EngineError> {
        if self.round.as_ref().is_some_and(|r| r.secagg.is_some()) {
            return Err(EngineError::Misuse(Misuse::MaskedInputsOnly));
        }
        match self.check_update(meta, now)? {
            UpdateCheck::Duplicate => Ok(()),
            UpdateCheck::New => {
                let r = self
                    .round
                    .as_mut()
                    .ok_or(EngineError::Misuse(Misuse::NoRound))?;
                r.received.insert(meta.update_id, meta.client);
                r.reported.insert(meta.client, meta.update_id);
                Ok(())
            }
        }
    }

    /// Adds a masked input (`packed`: words at the round's modulus width) to a secure round's sum.
    /// On `New` the driver persists [`Engine::secagg`] before acknowledging.
    pub fn record_masked(
        &mut self,
        meta: &UpdateMeta,
        packed: &[u8],
        now: Millis,
    ) -> Result<UpdateCheck, EngineError> {
        let check = self.check_update(meta, now)?;
        if check == UpdateCheck::Duplicate {
            return Ok(check);
        }
        let r = self
            .round
            .as_mut()
            .ok_or(EngineError::Misuse(Misuse::NoRound))?;
        let id = r
            .roster_id(&meta.client)
            .ok_or(EngineError::NotSelected(r.record.id))?;
        let s = r
            .secagg
            .as_mut()
            .ok_or(EngineError::Misuse(Misuse::NotSecure))?;
        s.masked(id, packed)?;
        r.reported.insert(meta.client, meta.update_id);
        Ok(UpdateCheck::New)
    }

    /// A device's secure-aggregation step for `round`. When the outcome says `changed`, the driver
    /// persists [`Engine::secagg`] before answering.
    pub fn secagg_step(
        &mut self,
        client: Fingerprint,
        round: RoundId,
        step: SecAggStep,
        now: Millis,
    ) -> Result<StepOutcome, EngineError> {
        self.client_seen(client, now);
        let retry = self.cfg.retry_after_ms.min(1_000);
        let r = self
            .round
            .as_mut()
            .filter(|r| r.record.id == round && r.record.phase == RoundPhase::Collecting)
            .ok_or(EngineError::LateUpdate {
                got: round,
                current: None,
            })?;
        let id = r
            .roster_id(&client)
            .ok_or(EngineError::NotSelected(round))?;
        let s = r.secagg.as_mut().ok_or(EngineError::NotSecure(round))?;
        Ok(s.step(id, step, retry)?)
    }

    /// A selected client declined `round`'s task: it is not offered again, and the round closes as soon as
    /// every other selected client has reported. Returns whether it counted (a decline for another round, or
    /// from a client that was not selected or already reported, changes nothing).
    pub fn declined(&mut self, client: Fingerprint, round: RoundId) -> bool {
        match &mut self.round {
            Some(r)
                if r.record.id == round
                    && r.record.phase == RoundPhase::Collecting
                    && r.record.selected.contains(&client)
                    && !r.reported.contains_key(&client) =>
            {
                r.declined.insert(client)
            }
            _ => false,
        }
    }

    /// Advances time: starts, closes or abandons rounds.
    pub fn tick(&mut self, now: Millis) -> Vec<Action> {
        let mut actions = Vec::new();
        if self.round.as_ref().is_some_and(|r| r.secagg.is_some()) {
            self.tick_secure(now, &mut actions);
            if self.round.is_some() {
                return actions;
            }
        } else if let Some(r) = &mut self.round {
            let all_in = r
                .record
                .selected
                .iter()
                .all(|c| r.reported.contains_key(c) || r.declined.contains(c));
            match r.record.phase {
                RoundPhase::Collecting if all_in || now >= r.record.deadline => {
                    if r.received.len() >= self.cfg.min_updates {
                        r.record.phase = RoundPhase::Aggregating;
                        actions.push(Action::Aggregate {
                            round: r.record.clone(),
                            updates: r.received.keys().copied().collect(),
                        });
                    } else {
                        actions.push(Action::RoundAbandoned {
                            round: r.record.id,
                            received: r.received.len(),
                        });
                        self.round = None;
                    }
                }
                _ => {}
            }
            if self.round.is_some() {
                return actions;
            }
        }
        if let Some(cfg) = self.next_cfg.take() {
            self.cfg = cfg;
        }
        if self.finished() {
            if !self.finished_reported {
                self.finished_reported = true;
                actions.push(Action::Finished);
            }
            return actions;
        }
        if self.paused {
            return actions;
        }
        let eligible = self.eligible(now);
        if eligible.len() >= self.cfg.min_clients {
            let id = RoundId(self.next_round);
            self.next_round += 1;
            let selected = self.select(&eligible, id);
            let record = RoundRecord {
                id,
                model_version: self.latest,
                selected,
                started_at: now,
                deadline: now.saturating_add(self.cfg.round_timeout_ms),
                phase: RoundPhase::Collecting,
                eligible: eligible.len(),
            };
            match self.new_secagg(&record) {
                Ok(secagg) => {
                    actions.push(Action::RoundStarted(record.clone()));
                    self.round = Some(Round::new(record, secagg));
                }
                Err(e) => {
                    // Settings checked at start-up cannot fail here; if they do, the round is given up
                    // rather than run without the protection it was configured with.
                    tracing::error!(round = id.0, "secure aggregation: {e}");
                    actions.push(Action::RoundAbandoned {
                        round: id,
                        received: 0,
                    });
                }
            }
        }
        actions
    }

    /// Closes the phase of the open secure round when every device it waits for has answered or its
    /// deadline passed: moves on, asks for aggregation of the unmasked sum, or abandons the round.
    fn tick_secure(&mut self, now: Millis, actions: &mut Vec<Action>) {
        let Some(r) = &mut self.round else { return };
        let Some(timeout) = self.secagg.as_ref().map(|(c, ..)| c.phase_timeout_ms) else {
            return;
        };
        let min_updates = self.cfg.min_updates;
        let Some(s) = &mut r.secagg else { return };
        if r.record.phase != RoundPhase::Collecting {
            return;
        }
        let deadline = match s.phase {
            SecAggPhase::Advertise => r.record.deadline,
            _ => s.phase_deadline,
        };
        let expected = r
            .record
            .selected
            .iter()
            .enumerate()
            .filter(|(_, c)| !r.declined.contains(*c))
            .map(|(i, _)| i as ClientId);
        if !(s.all_in(expected) || now >= deadline) {
            return;
        }
        let outcome = s
            .close_phase(now, timeout, min_updates)
            .and_then(|done| match done {
                false => Ok(None),
                true => s.unmask().map(Some).map_err(|e| e.to_string()),
            });
        match outcome {
            Ok(None) => actions.push(Action::SecAggPhase {
                round: r.record.id,
                phase: s.phase,
            }),
            Ok(Some((sum, count))) => {
                r.record.phase = RoundPhase::Aggregating;
                actions.push(Action::AggregateSum {
                    round: r.record.clone(),
                    sum,
                    count,
                    params: s.params().clone(),
                });
            }
            Err(why) => {
                tracing::info!(round = r.record.id.0, "secure round abandoned: {why}");
                actions.push(Action::RoundAbandoned {
                    round: r.record.id,
                    received: s.server.unmask_request().1.len(),
                });
                self.round = None;
            }
        }
    }

    /// Re-issues the aggregation of a round found in the aggregating phase after a restart (a secure
    /// round's sum is unmasked again from its stored state).
    pub fn pending_aggregation(&self) -> Option<Action> {
        let r = self
            .round
            .as_ref()
            .filter(|r| r.record.phase == RoundPhase::Aggregating)?;
        Some(match &r.secagg {
            None => Action::Aggregate {
                round: r.record.clone(),
                updates: r.received.keys().copied().collect(),
            },
            Some(s) => match s.unmask() {
                Ok((sum, count)) => Action::AggregateSum {
                    round: r.record.clone(),
                    sum,
                    count,
                    params: s.params().clone(),
                },
                Err(e) => {
                    tracing::error!(
                        round = r.record.id.0,
                        "the stored round does not unmask: {e}"
                    );
                    Action::RoundAbandoned {
                        round: r.record.id,
                        received: s.server.unmask_request().1.len(),
                    }
                }
            },
        })
    }

    /// The driver published `version` as the result of `round`.
    pub fn published(&mut self, round: RoundId, version: ModelVersion) -> Result<(), EngineError> {
        match &self.round {
            Some(r) if r.record.id == round && r.record.phase == RoundPhase::Aggregating => {
                if version <= self.latest {
                    return Err(EngineError::Misuse(Misuse::VersionNotNewer {
                        version,
                        latest: self.latest,
                    }));
                }
                self.latest = version;
                self.completed += 1;
                self.round = None;
                Ok(())
            }
            _ => Err(EngineError::Misuse(Misuse::NotAggregating(round))),
        }
    }

    /// Aggregation failed (e.g. the privacy budget refused it): the round is dropped.
    pub fn abandon(&mut self, round: RoundId) -> Result<(), EngineError> {
        match &self.round {
            Some(r) if r.record.id == round => {
                self.round = None;
                Ok(())
            }
            _ => Err(EngineError::Misuse(Misuse::NotOpen(round))),
        }
    }

    fn eligible(&self, now: Millis) -> Vec<Fingerprint> {
        let mut v: Vec<Fingerprint> = self
            .seen
            .iter()
            .filter(|(_, &t)| now.saturating_sub(t) <= self.cfg.presence_timeout_ms)
            .map(|(c, _)| *c)
            .collect();
        v.sort();
        v
    }

    fn select(&self, eligible: &[Fingerprint], round: RoundId) -> Vec<Fingerprint> {
        let n = eligible.len();
        let m = match self.cfg.selection {
            Selection::Fraction(q) => ((q * n as f64).ceil() as usize).clamp(1, n),
            Selection::Count(m) => m.min(n),
        };
        let seed = self.cfg.seed ^ round.0.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut chosen: Vec<Fingerprint> = sample(&mut rng, n, m)
            .into_iter()
            .map(|i| eligible[i])
            .collect();
        chosen.sort();
        chosen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(i: u8) -> Fingerprint {
        Fingerprint([i; 32])
    }

    fn schema() -> Digest {
        Digest::of(b"schema")
    }

    fn engine(cfg: EngineConfig) -> Engine {
        Engine::new(cfg, schema(), ModelVersion(0), 1, 0).unwrap()
    }

    fn meta(client: u8, id: u8, round: u64) -> UpdateMeta {
        UpdateMeta {
            update_id: UpdateId([id; 16]),
            client: fp(client),
            round: RoundId(round),
            model_version: ModelVersion(0),
            schema: schema(),
            num_examples: 10,
        }
    }

    fn upload(e: &mut Engine, m: &UpdateMeta, now: Millis) -> Result<UpdateCheck, EngineError> {
        let c = e.check_update(m, now)?;
        e.record_update(m, now)?;
        Ok(c)
    }

    #[test]
    fn a_full_round_waits_selects_collects_aggregates_and_moves_on() {
        let cfg = EngineConfig {
            min_clients: 3,
            min_updates: 2,
            round_timeout_ms: 1000,
            ..Default::default()
        };
        let mut e = engine(cfg);
        e.client_seen(fp(1), 0);
        e.client_seen(fp(2), 0);
        assert!(e.tick(10).is_empty(), "two clients are not enough");
        assert!(matches!(
            e.task_request(fp(1), 10),
            TaskDecision::NoTask { .. }
        ));
        e.client_seen(fp(3), 20);
        let a = e.tick(20);
        let Action::RoundStarted(r) = &a[0] else {
            panic!("{a:?}")
        };
        assert_eq!(
            (r.id, r.selected.len(), r.deadline, r.eligible),
            (RoundId(1), 3, 1020, 3)
        );
        assert_eq!(
            e.task_request(fp(2), 30),
            TaskDecision::Task {
                round: RoundId(1),
                model_version: ModelVersion(0),
                deadline: 1020,
                secagg: None,
            }
        );
        assert_eq!(upload(&mut e, &meta(1, 1, 1), 40), Ok(UpdateCheck::New));
        assert_eq!(
            upload(&mut e, &meta(1, 1, 1), 41),
            Ok(UpdateCheck::Duplicate),
            "same id: acked, counted once"
        );
        assert_eq!(e.received(), 1);
        assert_eq!(
            e.check_update(&meta(1, 9, 1), 42),
            Err(EngineError::AlreadyReported(RoundId(1)))
        );
        assert!(matches!(
            e.task_request(fp(1), 43),
            TaskDecision::NoTask {
                reason: "update already received",
                ..
            }
        ));
        upload(&mut e, &meta(2, 2, 1), 50).unwrap();
        assert!(e.tick(60).is_empty(), "client 3 may still report");
        upload(&mut e, &meta(3, 3, 1), 70).unwrap();
        let a = e.tick(80);
        let Action::Aggregate { round, updates } = &a[0] else {
            panic!("{a:?}")
        };
        assert_eq!(round.phase, RoundPhase::Aggregating);
        assert_eq!(updates.len(), 3);
        assert!(matches!(
            e.check_update(&meta(1, 7, 1), 85),
            Err(EngineError::LateUpdate { .. })
        ));
        e.published(RoundId(1), ModelVersion(1)).unwrap();
        assert_eq!(e.latest(), ModelVersion(1));
        let a = e.tick(90);
        let Action::RoundStarted(r2) = &a[0] else {
            panic!("{a:?}")
        };
        assert_eq!((r2.id, r2.model_version), (RoundId(2), ModelVersion(1)));
        // An update for the closed round 1 is late; one trained from the old model is refused.
        assert!(matches!(
            e.check_update(&meta(1, 10, 1), 95),
            Err(EngineError::LateUpdate { .. })
        ));
        assert!(matches!(
            e.check_update(&meta(1, 11, 2), 95),
            Err(EngineError::WrongModelVersion { .. })
        ));
        let mut wrong = meta(1, 12, 2);
        wrong.model_version = ModelVersion(1);
        wrong.schema = Digest::of(b"other");
        assert!(matches!(
            e.check_update(&wrong, 95),
            Err(EngineError::SchemaMismatch { .. })
        ));
    }

    #[test]
    fn too_few_updates_by_the_deadline_abandon_the_round() {
        let cfg = EngineConfig {
            min_clients: 2,
            min_updates: 2,
            round_timeout_ms: 100,
            ..Default::default()
        };
        let mut e = engine(cfg);
        e.client_seen(fp(1), 0);
        e.client_seen(fp(2), 0);
        e.tick(0);
        upload(&mut e, &meta(1, 1, 1), 10).unwrap();
        assert!(e.tick(99).is_empty());
        assert!(matches!(
            e.check_update(&meta(2, 2, 1), 100),
            Err(EngineError::LateUpdate { .. })
        ));
        let a = e.tick(100);
        assert_eq!(
            a[0],
            Action::RoundAbandoned {
                round: RoundId(1),
                received: 1
            }
        );
        // Start over at once with the clients still present.
        assert!(matches!(&a[1], Action::RoundStarted(r) if r.id == RoundId(2)));
        // Clients seen long ago are no longer eligible: round 2 is abandoned and nothing starts.
        assert_eq!(
            e.tick(100_000_000),
            vec![Action::RoundAbandoned {
                round: RoundId(2),
                received: 0
            }]
        );
        assert!(e.tick(100_000_001).is_empty());
        e.client_seen(fp(1), 100_000_002);
        e.client_seen(fp(2), 100_000_002);
        let a = e.tick(100_000_003);
        assert!(
            matches!(&a[0], Action::RoundStarted(r) if r.id == RoundId(3)),
            "ids are never reused"
        );
    }

    #[test]
    fn selection_is_uniform_seeded_and_unselected_clients_are_refused() {
        let cfg = EngineConfig {
            min_clients: 10,
            selection: Selection::Count(3),
            seed: 5,
            ..Default::default()
        };
        let mut counts = HashMap::new();
        for round in 0..3000u64 {
            let mut e = Engine::new(cfg.clone(), schema(), ModelVersion(0), round, 0).unwrap();
            for i in 0..10 {
                e.client_seen(fp(i), 0);
            }
            let a = e.tick(0);
            let Action::RoundStarted(r) = &a[0] else {
                panic!()
            };
            assert_eq!(r.selected.len(), 3);
            for c in &r.selected {
                *counts.entry(*c).or_insert(0u32) += 1;
            }
            if round == 0 {
                let out = (0..10).map(fp).find(|c| !r.selected.contains(c)).unwrap();
                assert!(matches!(
                    e.task_request(out, 1),
                    TaskDecision::NoTask {
                        reason: "not selected for this round",
                        ..
                    }
                ));
                let mut m = meta(0, 1, r.id.0);
                m.client = out;
                assert_eq!(e.check_update(&m, 1), Err(EngineError::NotSelected(r.id)));
                // Same seed and round → same selection (a restarted coordinator agrees with itself).
                let mut again =
                    Engine::new(cfg.clone(), schema(), ModelVersion(0), round, 0).unwrap();
                for i in (0..10).rev() {
                    again.client_seen(fp(i), 0);
                }
                assert_eq!(again.tick(0)[0], a[0]);
            }
        }
        // 3000 rounds × 3/10: each client expects 900; chi-square with 9 dof, 99.9 % point ≈ 27.9.
        let chi2: f64 = counts
            .values()
            .map(|&c| (f64::from(c) - 900.0).powi(2) / 900.0)
            .sum();
        assert_eq!(counts.len(), 10);
        assert!(chi2 < 27.9, "chi2 {chi2}");
        let frac = EngineConfig {
            min_clients: 1,
            selection: Selection::Fraction(0.25),
            ..Default::default()
        };
        let mut e = engine(frac);
        for i in 0..10 {
            e.client_seen(fp(i), 0);
        }
        let Action::RoundStarted(r) = &e.tick(0)[0] else {
            panic!()
        };
        assert_eq!(r.selected.len(), 3, "ceil(0.25 · 10)");
    }

    #[test]
    fn a_resumed_round_continues_with_its_stored_updates_and_the_round_limit_holds() {
        let cfg = EngineConfig {
            min_clients: 2,
            min_updates: 2,
            rounds: Some(1),
            ..Default::default()
        };
        let mut e = engine(cfg.clone());
        e.client_seen(fp(1), 0);
        e.client_seen(fp(2), 0);
        let Action::RoundStarted(r) = e.tick(0).remove(0) else {
            panic!()
        };
        upload(&mut e, &meta(1, 1, 1), 5).unwrap();
        // Crash: a new engine resumes from what the store holds.
        let mut back = engine(cfg);
        back.resume(r.clone(), &[meta(1, 1, 1)], None).unwrap();
        assert_eq!(back.received(), 1);
        assert_eq!(
            upload(&mut back, &meta(1, 1, 1), 6),
            Ok(UpdateCheck::Duplicate)
        );
        upload(&mut back, &meta(2, 2, 1), 7).unwrap();
        let Action::Aggregate { round, updates } = back.tick(8).remove(0) else {
            panic!()
        };
        assert_eq!(updates, vec![UpdateId([1; 16]), UpdateId([2; 16])]);
        // Crash during aggregation: the aggregating round comes back and asks again.
        let mut again = engine(EngineConfig {
            rounds: Some(1),
            ..Default::default()
        });
        again
            .resume(round.clone(), &[meta(1, 1, 1), meta(2, 2, 1)], None)
            .unwrap();
        assert!(matches!(
            again.pending_aggregation(),
            Some(Action::Aggregate { .. })
        ));
        again.published(RoundId(1), ModelVersion(1)).unwrap();
        assert_eq!(again.tick(9), vec![Action::Finished]);
        assert!(again.tick(10).is_empty());
        assert!(matches!(
            again.task_request(fp(1), 11),
            TaskDecision::NoTask {
                reason: "training finished",
                ..
            }
        ));
        assert!(again.published(RoundId(1), ModelVersion(2)).is_err());
    }

    #[test]
    fn a_declined_task_is_not_offered_again_and_the_round_closes_without_waiting() {
        let cfg = EngineConfig {
            min_clients: 2,
            selection: Selection::Count(2),
            min_updates: 1,
            round_timeout_ms: 1000,
            ..Default::default()
        };
        let mut e = engine(cfg);
        e.client_seen(fp(1), 0);
        e.client_seen(fp(2), 0);
        assert!(matches!(e.tick(0)[0], Action::RoundStarted(_)));
        assert!(!e.declined(fp(1), RoundId(7)), "another round: ignored");
        assert!(!e.declined(fp(9), RoundId(1)), "not selected: ignored");
        assert!(e.declined(fp(1), RoundId(1)));
        assert!(matches!(
            e.task_request(fp(1), 5),
            TaskDecision::NoTask {
                reason: "task declined",
                ..
            }
        ));
        assert!(e.tick(6).is_empty(), "client 2 has not reported yet");
        upload(&mut e, &meta(2, 1, 1), 10).unwrap();
        let a = e.tick(11);
        assert!(
            matches!(&a[..], [Action::Aggregate { updates, .. }] if updates.len() == 1),
            "closes at once, long before the deadline: {a:?}"
        );
    }

    /// Drives a secure round of `n` devices through the engine with real SecAgg+ clients; devices in
    /// `gone[p]` stop after phase `p` (0: never advertise, 1: advertised, 2: shared, 3: sent their masked
    /// input); `restart` serialises and resumes the engine's state between every two phases. Returns the
    /// sum the engine unmasked (or `None` if it abandoned the round) and the plain sum of the inputs of
    /// the devices that reported.
    fn secure_round(n: u8, gone: [&[u8]; 4], restart: bool) -> (Option<Vec<u32>>, Vec<u32>) {
        use rand::Rng;
        use starling_protocol::message::SecAggReply;
        let len = 40;
        let cfg = EngineConfig {
            min_clients: n as usize,
            selection: Selection::Count(n as usize),
            min_updates: 2,
            round_timeout_ms: 1000,
            seed: 9,
            ..Default::default()
        };
        let sa = SecAggConfig {
            enabled: true,
            clip: 1.0,
            value_bits: 7,
            phase_timeout_ms: 100,
            ..Default::default()
        };
        let make = || {
            engine(cfg.clone())
                .with_secure_aggregation(sa.clone(), len, n as usize, 0)
                .unwrap()
        };
        let mut e = make();
        let bounce = |e: Engine| -> Engine {
            if !restart {
                return e;
            }
            let r = e.current().cloned().unwrap();
            let state: SecAggRound = bincode::serde::decode_from_slice(
                &bincode::serde::encode_to_vec(e.secagg().unwrap().1, bincode::config::standard())
                    .unwrap(),
                bincode::config::standard(),
            )
            .unwrap()
            .0;
            let mut back = make();
            back.resume(r, &[], Some(state)).unwrap();
            for i in 0..n {
                back.client_seen(fp(i), 0);
            }
            back
        };
        for i in 0..n {
            e.client_seen(fp(i), 0);
        }
        assert!(matches!(e.tick(0)[0], Action::RoundStarted(_)));
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(4);
        let encoding = sa.encoding(n as usize).unwrap();
        let mut devices = Vec::new();
        for i in 0..n {
            let TaskDecision::Task {
                secagg: Some((params, id)),
                ..
            } = e.task_request(fp(i), 1)
            else {
                panic!("a secure task")
            };
            let values: Vec<f32> = (0..len).map(|_| rng.random_range(-1.0..1.0)).collect();
            let input = encoding.encode(&values, &mut rng);
            devices.push((i, id, params, input));
        }
        let round = RoundId(1);
        let mut clients = Vec::new();
        for (i, id, params, input) in &devices {
            if gone[0].contains(i) {
                continue;
            }
            let (c, keys) = starling_secagg::Client::new(params.clone(), *id, &mut rng).unwrap();
            let o = e
                .secagg_step(fp(*i), round, SecAggStep::Keys(keys), 2)
                .unwrap();
            assert!(o.changed && matches!(o.reply, SecAggReply::Wait { .. }));
            clients.push((*i, c, input.clone()));
        }
        // Advertising closes when every device is in, or at the round's deadline.
        let at = if gone[0].is_empty() { 3 } else { 1000 };
        let a = e.tick(at);
        if a.iter().any(|a| matches!(a, Action::RoundAbandoned { .. })) {
            return (None, Vec::new());
        }
        assert!(
            matches!(
                a[..],
                [Action::SecAggPhase {
                    phase: SecAggPhase::Share,
                    ..
                }]
            ),
            "{a:?}"
        );
        e = bounce(e);
        clients.retain(|(i, ..)| !gone[1].contains(i));
        for (i, c, _) in &mut clients {
            let SecAggReply::Roster(roster) = e
                .secagg_step(fp(*i), round, SecAggStep::Next, at + 1)
                .unwrap()
                .reply
            else {
                panic!()
            };
            let shares = c
                .share_keys(&roster.into_iter().collect(), &mut rng)
                .unwrap();
            assert!(
                e.secagg_step(fp(*i), round, SecAggStep::Shares(shares), at + 1)
                    .unwrap()
                    .changed
            );
        }
        let at = at + 200;
        let a = e.tick(at);
        if a.iter().any(|a| matches!(a, Action::RoundAbandoned { .. })) {
            return (None, Vec::new());
        }
        e = bounce(e);
        clients.retain(|(i, ..)| !gone[2].contains(i));
        let bits = e.secagg().unwrap().1.params().bits;
        let mut plain = vec![0u32; len];
        for (k, (i, c, input)) in clients.iter_mut().enumerate() {
            let SecAggReply::Mailbox(mail) = e
                .secagg_step(fp(*i), round, SecAggStep::Next, at + 1)
                .unwrap()
                .reply
            else {
                panic!()
            };
            c.receive_shares(&mail).unwrap();
            let masked = c.masked_input(input).unwrap();
            let m = UpdateMeta {
                update_id: UpdateId([k as u8; 16]),
                client: fp(*i),
                round,
                model_version: ModelVersion(0),
                schema: schema(),
                num_examples: 1,
            };
            let packed = starling_secagg::mask::pack(&masked, bits);
            assert_eq!(e.record_masked(&m, &packed, at + 1), Ok(UpdateCheck::New));
            // A retry (even under another id) is counted once.
            let mut again = m.clone();
            again.update_id = UpdateId([200; 16]);
            assert_eq!(
                e.record_masked(&again, &packed, at + 1),
                Ok(UpdateCheck::Duplicate)
            );
            for (p, x) in plain.iter_mut().zip(input.iter()) {
                *p = p.wrapping_add(*x);
            }
        }
        plain
            .iter_mut()
            .for_each(|w| *w &= starling_secagg::mask::modulus_mask(bits));
        let at = at + 200;
        let a = e.tick(at);
        if a.iter().any(|a| matches!(a, Action::RoundAbandoned { .. })) {
            return (None, plain);
        }
        e = bounce(e);
        clients.retain(|(i, ..)| !gone[3].contains(i));
        for (i, c, _) in &mut clients {
            let SecAggReply::Unmask { dropped, reported } = e
                .secagg_step(fp(*i), round, SecAggStep::Next, at + 1)
                .unwrap()
                .reply
            else {
                panic!()
            };
            let reveals = c.unmask(&dropped, &reported).unwrap();
            let o = e
                .secagg_step(fp(*i), round, SecAggStep::Reveals(reveals), at + 1)
                .unwrap();
            assert_eq!(o.reply, SecAggReply::Done);
        }
        let a = e.tick(at + 200);
        match &a[..] {
            [Action::AggregateSum { sum, count, .. }] => {
                assert_eq!(
                    *count,
                    n as usize - gone[0].len() - gone[1].len() - gone[2].len()
                );
                // After a restart in the aggregating phase the same sum comes back.
                assert!(
                    matches!(e.pending_aggregation(), Some(Action::AggregateSum { sum: s, .. }) if s == *sum)
                );
                (Some(sum.clone()), plain)
            }
            [Action::RoundAbandoned { .. }, ..] => (None, plain),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_secure_round_unmasks_exactly_the_sum_with_dropouts_at_every_phase() {
        let (sum, plain) = secure_round(12, [&[], &[], &[], &[]], false);
        assert_eq!(sum.unwrap(), plain);
        // Dropouts at each phase (12 devices: 8 neighbours each... k = 10 capped at 11, t = 6).
        for gone in [
            [&[3u8][..], &[], &[], &[]],
            [&[], &[4u8][..], &[], &[]],
            [&[], &[], &[5u8, 6][..], &[]],
            [&[], &[], &[], &[7u8, 8][..]],
            [&[1u8][..], &[2u8][..], &[3u8][..], &[4u8][..]],
        ] {
            for restart in [false, true] {
                let (sum, plain) = secure_round(12, gone, restart);
                assert_eq!(sum.unwrap(), plain, "{gone:?}, restart {restart}");
            }
        }
        // Too few survivors: the round is abandoned, nothing is unmasked.
        let many: Vec<u8> = (0..7).collect();
        assert_eq!(secure_round(12, [&[], &[], &many, &[]], false).0, None);
        assert_eq!(secure_round(12, [&[], &[], &[], &many], true).0, None);
        assert_eq!(secure_round(12, [&many, &[], &[], &[]], false).0, None);
    }

    #[test]
    fn bad_settings_are_refused() {
        for cfg in [
            EngineConfig {
                selection: Selection::Fraction(0.0),
                ..Default::default()
            },
            EngineConfig {
                selection: Selection::Count(0),
                ..Default::default()
            },
            EngineConfig {
                min_updates: 0,
                ..Default::default()
            },
            EngineConfig {
                round_timeout_ms: 0,
                ..Default::default()
            },
        ] {
            assert!(Engine::new(cfg, schema(), ModelVersion(0), 1, 0).is_err());
        }
    }
}
