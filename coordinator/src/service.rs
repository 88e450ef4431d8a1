//! The running coordinator: the QUIC driver of the round core. It owns the store and the base bundle, holds
//! the [`RoundCore`] (engine, strategy, ledger, keys) behind one lock, implements the transport's `Handler`
//! (requests) and `Authorizer` (handshakes), and ticks the engine, carrying out its actions: persist rounds,
//! hand the core the stored updates and parent adapter, write the version it signs. Policy — what a round
//! aggregates, charges and publishes, what a Task says — is the core's, never re-implemented here.
//!
//! Order of durability: a round is stored before its tasks are served; an update is stored and flushed
//! before the engine counts it and before the ack; a new version, its ledger charge, the strategy state and
//! the closing of the round are one store transaction. After a crash, [`Coordinator::open`] resumes the
//! open round with the updates already stored, re-aggregating if it was aggregating.
//! What must never live here: protocol decoding (starling-protocol), sockets (starling-transport), round
//! policy (crate::round_core).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use starling_protocol::message::{
    Ack, BlobKind, Decline, Enrol, ErrorCode, ErrorReply, Message, NoTask, RosterDevices,
    SecAggRequest,
};
use starling_protocol::update::{adapter_values, decode_update, validate_update, UpdateLimits};
use starling_protocol::{
    AdapterSchema, Digest, EnrolmentToken, Fingerprint, ModelVersion, RoundId, SigningIdentity,
    UpdateId,
};
use starling_transport::server::ServerControl;
use starling_transport::{Access, Authorizer, Handler, Limits, Request, Response, Server};

use crate::config::CoordinatorConfig;
use crate::engine::{Action, Engine, RoundRecord, TaskDecision, UpdateCheck, UpdateMeta};
use crate::round_core::PartialSum;
use crate::round_core::{CoreError, Restored, RoundCore, RoundInput};
use crate::status::{bump, Metrics};
use crate::store::{manifest_body, ClientRole, ClientStatus, Store, StoredPartial, StoredUpdate};

/// Files inside a coordinator directory.
pub struct Layout {
    /// The directory.
    pub dir: PathBuf,
}

impl Layout {
    /// The layout of `dir`.
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
        }
    }
    /// coordinator.toml.
    pub fn config(&self) -> PathBuf {
        self.dir.join("coordinator.toml")
    }
    /// The sled store.
    pub fn store(&self) -> PathBuf {
        self.dir.join("store")
    }
    /// The TLS key (PKCS#8 DER, owner-only).
    pub fn tls_key(&self) -> PathBuf {
        self.dir.join("keys/tls.pk8")
    }
    /// The model-signing key (PKCS#8 DER, owner-only).
    pub fn signing_key(&self) -> PathBuf {
        self.dir.join("keys/signing.pk8")
    }
    /// The addresses of the running `serve` (written when it binds).
    pub fn serving(&self) -> PathBuf {
        self.dir.join("serve.json")
    }
    /// The copy of the base model.
    pub fn base(&self) -> PathBuf {
        self.dir.join("base")
    }
}

/// Where a coordinator reads the time: the system clock in deployment, or a clock its driver sets (the
/// simulator runs the same coordinator on simulated time).
#[derive(Debug, Clone, Default)]
pub enum Clock {
    /// Milliseconds since the Unix epoch.
    #[default]
    System,
    /// Whatever the driver last stored, in milliseconds.
    Manual(Arc<std::sync::atomic::AtomicU64>),
}

impl Clock {
    /// The time now, in milliseconds.
    pub fn now(&self) -> u64 {
        match self {
            Clock::System => now_ms(),
            Clock::Manual(t) => t.load(std::sync::atomic::Ordering::SeqCst),
        }
    }
}

/// How [`Coordinator::open_with`] runs the coordinator besides its configuration.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// The clock (the system's unless a simulation sets its own).
    pub clock: Clock,
    /// Draws central DP noise from this fixed key: reproducible and **not private** — simulations only.
    pub simulation_noise_key: Option<[u8; 32]>,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Errors of the running coordinator.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The engine refused.
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
    /// The round core refused or failed.
    #[error(transparent)]
    Core(#[from] CoreError),
    /// The store holds no published version (the directory was not made by `init`).
    #[error("the store holds no published version: is this a directory made by `init`?")]
    NoPublishedVersion,
    /// A version the store should hold is missing.
    #[error("{0} is missing from the store")]
    VersionMissing(ModelVersion),
    /// The stored adapter of a version does not decode.
    #[error("the stored adapter of {version} is damaged: {source}")]
    StoredAdapter {
        /// The version.
        version: ModelVersion,
        /// Why it does not decode.
        source: starling_protocol::ProtocolError,
    },
    /// A stored update of the round being aggregated does not decode.
    #[error("a stored update of {round} is damaged: {source}")]
    StoredUpdate {
        /// The round.
        round: RoundId,
        /// Why it does not decode.
        source: starling_protocol::ProtocolError,
    },
    /// Updates the engine counted are not in the store.
    #[error("{round}: {stored} of the {counted} counted updates are stored")]
    UpdatesMissing {
        /// The round.
        round: RoundId,
        /// Found in the store.
        stored: usize,
        /// Counted by the engine.
        counted: usize,
    },
    /// The base model directory cannot be bundled.
    #[error("the base model in {path}: {source}")]
    BaseModel {
        /// The directory.
        path: String,
        /// Why.
        source: starling_model::ModelError,
    },
    /// The base model directory is not the one version 0 was signed for.
    #[error(
        "the base model in {path} is not the one version 0 was signed for (digest {found}, signed {signed})"
    )]
    BaseChanged {
        /// The directory.
        path: String,
        /// Its bundle's digest.
        found: Digest,
        /// The digest version 0 signed.
        signed: Digest,
    },
    /// A key file is unreadable.
    #[error("key {path}: {detail}")]
    Key {
        /// The file.
        path: String,
        /// Why.
        detail: String,
    },
}

/// The coordinator's state behind the QUIC endpoints.
pub struct Coordinator {
    store: Store,
    cfg: CoordinatorConfig,
    schema: AdapterSchema,
    /// The base model bundle devices fetch (its SHA-256 is the base digest every manifest names).
    base: Arc<[u8]>,
    inner: Mutex<RoundCore>,
    metrics: Metrics,
    clock: Clock,
    /// The coordinator directory.
    dir: PathBuf,
    /// The running endpoints' connections (set once `serve` has bound them).
    control: std::sync::OnceLock<ServerControl>,
    /// What `/healthz` and `/readyz` report.
    health: Health,
    /// The generation of the active-device roster edge aggregators copy: changes with every enrolment and
    /// revocation (and every start, so an aggregator re-reads it after a restart).
    roster: std::sync::atomic::AtomicU64,
    /// Why rounds were paused by the privacy budget (the refused round's reason), if they were.
    budget_pause: Mutex<Option<String>>,
}

/// Liveness and readiness of a serving coordinator.
#[derive(Debug, Default)]
pub struct Health {
    /// When the round loop last ticked (system milliseconds; 0: never).
    last_tick: std::sync::atomic::AtomicU64,
    /// Endpoints bound and serving.
    ready: std::sync::atomic::AtomicBool,
    /// Stopping: no new work is taken.
    draining: std::sync::atomic::AtomicBool,
}

impl Health {
    /// Whether the round loop ticked within `stall_ms` of `now` (liveness).
    pub fn live(&self, now: u64, stall_ms: u64) -> bool {
        let t = self.last_tick.load(std::sync::atomic::Ordering::Relaxed);
        t != 0 && now.saturating_sub(t) <= stall_ms
    }

    /// Whether devices are being served (readiness): bound, and not draining.
    pub fn ready(&self) -> bool {
        self.ready.load(std::sync::atomic::Ordering::Relaxed)
            && !self.draining.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the coordinator is draining.
    pub fn draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The loop ran at `now` (system milliseconds).
    pub fn ticked(&self, now: u64) {
        self.last_tick
            .store(now, std::sync::atomic::Ordering::Relaxed);
    }

    /// The endpoints are bound and serving.
    pub fn set_ready(&self) {
        self.ready.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Stopping: no new work is taken.
    pub fn set_draining(&self) {
        self.draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// How a draining `serve` treats devices (see [`Coordinator::serve_until`]).
#[derive(Debug, Clone, Copy)]
pub struct DrainSettings {
    /// How long to wait for the exchanges in flight (uploads being stored get their acks).
    pub wait: Duration,
    /// When devices are told to come back.
    pub retry_after: Duration,
}

impl Default for DrainSettings {
    fn default() -> Self {
        crate::config::NetworkConfig::default().drain()
    }
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator")
            .field("schema", &self.schema.hash())
            .finish()
    }
}

/// Reads a PKCS#8 key file written by `init`.
pub fn read_key(path: &Path) -> Result<SigningIdentity, ServiceError> {
    let key = |detail: String| ServiceError::Key {
        path: path.display().to_string(),
        detail,
    };
    let der = std::fs::read(path).map_err(|e| key(e.to_string()))?;
    SigningIdentity::from_pkcs8_der(&der).map_err(|e| key(e.to_string()))
}

impl Coordinator {
    /// Opens a coordinator directory made by `init`, resuming whatever round was open.
    pub fn open(dir: &Path, cfg: CoordinatorConfig) -> Result<Self, ServiceError> {
        Self::open_with(dir, cfg, OpenOptions::default())
    }

    /// [`Coordinator::open`] with a clock and noise source of the caller's (the simulator's).
    pub fn open_with(
        dir: &Path,
        cfg: CoordinatorConfig,
        opts: OpenOptions,
    ) -> Result<Self, ServiceError> {
        let layout = Layout::new(dir);
        let store = Store::open(&layout.store())?;
        let signing = read_key(&layout.signing_key())?;
        let latest = store
            .latest_version()?
            .ok_or(ServiceError::NoPublishedVersion)?;
        let v0 = store
            .model(ModelVersion(0))?
            .ok_or(ServiceError::VersionMissing(ModelVersion(0)))?;
        let m0 = manifest_body(&v0.manifest)?;
        let schema = m0.adapter_schema.clone();
        // The bundle devices fetch must be the one version 0 signed: a base directory changed since `init`
        // would hand devices a model no manifest vouches for.
        let base: Arc<[u8]> = starling_model::bundle::pack_dir(&layout.base())
            .map_err(|source| ServiceError::BaseModel {
                path: layout.base().display().to_string(),
                source,
            })?
            .into();
        if Digest::of(&base) != m0.base_digest {
            return Err(ServiceError::BaseChanged {
                path: layout.base().display().to_string(),
                found: Digest::of(&base),
                signed: m0.base_digest,
            });
        }
        // Round settings an operator changed on a running coordinator outlive its restarts.
        let rounds = store
            .round_settings()?
            .unwrap_or_else(|| cfg.rounds.clone());
        let mut engine = Engine::new(
            rounds,
            schema.hash(),
            latest,
            store.next_round()?,
            store.completed()?,
        )?;
        engine.set_paused(store.paused()?);
        // The clients a round selects (at least `min_clients` with a fraction).
        let cohort = match engine.config().selection {
            crate::engine::Selection::Count(m) => m,
            crate::engine::Selection::Fraction(_) => engine.config().min_clients,
        };
        // Behind aggregators the engine counts aggregators; DP-FedAvg's denominator counts devices.
        let dp_cohort = if cfg.hierarchy.enabled && cfg.hierarchy.devices_per_round > 0 {
            cfg.hierarchy.devices_per_round
        } else {
            cohort
        };
        // Behind edge aggregators SecAgg+ runs per cohort there; the root's engine counts partial sums.
        if cfg.secure_aggregation.enabled && !cfg.hierarchy.enabled {
            engine = engine.with_secure_aggregation(
                cfg.secure_aggregation.clone(),
                schema.num_params(),
                cohort,
                cfg.secagg_noise_steps(),
            )?;
        }
        let current = store.current_round()?;
        let dropped = store.prune_stale_updates(current.as_ref().map(|r| r.id))?;
        if dropped > 0 {
            tracing::info!(
                dropped,
                "dropped the deltas of closed rounds left by an interrupted run"
            );
        }
        if let Some(round) = current {
            // Updates of devices revoked since they were stored do not count.
            let mut stored: Vec<UpdateMeta> = Vec::new();
            for u in store.updates(round.id)? {
                if store
                    .client(&u.meta.client)?
                    .is_some_and(|c| c.status == ClientStatus::Active)
                {
                    stored.push(u.meta);
                }
            }
            let secagg = if cfg.secure_aggregation.enabled {
                store.secagg(round.id)?
            } else {
                None
            };
            tracing::info!(round = round.id.0, updates = stored.len(), "resuming round");
            engine.resume(round, &stored, secagg)?;
            // The time the coordinator was down is given back to the round: devices that trained while
            // it was away, or were cut off mid-upload, still make the deadline.
            if let Some(alive) = store.alive_at()? {
                let downtime = opts.clock.now().saturating_sub(alive);
                if downtime > 0 {
                    engine.extend_deadlines(downtime.max(cfg.rounds.resume_grace_ms));
                    if let Some(r) = engine.current() {
                        store.put_round(r)?;
                        tracing::info!(
                            round = r.id.0,
                            downtime_ms = downtime,
                            "the round's deadline moved by the downtime"
                        );
                    }
                }
            }
            // A secure round that had no stored state yet gets its fresh one on disk now.
            if let Some((id, state)) = engine.secagg() {
                store.put_secagg(id, state)?;
            }
        }
        let restored = Restored {
            strategy: store.strategy_state()?,
            charges: store.ledger()?,
            discrete: store.ledger_ddg()?,
            ledger_checkpoint: store.ledger_checkpoint().unwrap_or_else(|e| {
                tracing::warn!("the privacy ledger's checkpoint does not read back ({e})");
                None
            }),
        };
        let core = RoundCore::new(
            cfg.clone(),
            schema.clone(),
            m0.base_digest,
            signing,
            engine,
            dp_cohort,
            opts.simulation_noise_key,
            restored,
        )?;
        Ok(Self {
            base,
            store,
            cfg,
            schema,
            inner: Mutex::new(core),
            metrics: Metrics::default(),
            clock: opts.clock,
            dir: dir.to_path_buf(),
            control: std::sync::OnceLock::new(),
            health: Health::default(),
            roster: std::sync::atomic::AtomicU64::new(now_ms().max(1)),
            budget_pause: Mutex::new(None),
        })
    }

    /// Liveness and readiness (for `/healthz` and `/readyz`).
    pub fn health(&self) -> &Health {
        &self.health
    }

    /// Carries out an operator's request from the admin socket (see [`crate::admin`]).
    pub fn admin(&self, request: crate::admin::AdminRequest) -> crate::admin::AdminReply {
        use crate::admin::{AdminReply, AdminRequest};
        let layout = Layout::new(&self.dir);
        let result = match request {
            AdminRequest::Enrol { name, role } => {
                // Under the round lock: a backup taken meanwhile holds the token or not, never half of it.
                let _inner = self.lock();
                crate::ops::enrol_in(&self.store, &layout, &name, role).map(|e| e.json())
            }
            AdminRequest::Revoke { client } => self.revoke(&client),
            AdminRequest::Clients => crate::ops::clients_in(&self.store),
            AdminRequest::Status => self.status_document().map_err(anyhow::Error::from),
            AdminRequest::Pause | AdminRequest::Resume => {
                let paused = matches!(request, AdminRequest::Pause);
                let mut inner = self.lock();
                self.set_paused(&mut inner, paused, None)
                    .map_err(anyhow::Error::from)
                    .map(|()| {
                        tracing::info!(
                            paused,
                            "rounds {}",
                            if paused { "paused" } else { "resumed" }
                        );
                        serde_json::json!({
                            "paused": paused,
                            "round_open": inner.engine.current().map(|r| r.id.0),
                        })
                    })
            }
            AdminRequest::SetRounds { settings } => {
                let mut inner = self.lock();
                let next = settings.apply(inner.engine.config());
                match inner.engine.set_config(next.clone()) {
                    Ok(()) => self
                        .store
                        .set_round_settings(Some(&next))
                        .map_err(anyhow::Error::from)
                        .map(|()| {
                            tracing::info!("round settings changed from the next round on");
                            serde_json::json!({ "rounds": next })
                        }),
                    Err(e) => Err(anyhow::Error::from(e)),
                }
            }
            AdminRequest::Backup { out } => {
                let inner = self.lock();
                let taken = crate::backup::collect(&self.dir, &self.store);
                drop(inner);
                taken
                    .and_then(|c| crate::backup::write(&out, &c))
                    .map_err(anyhow::Error::from)
            }
        };
        match result {
            Ok(v) => AdminReply::ok(v),
            Err(e) => AdminReply::failed(format!("{e:#}")),
        }
    }

    /// Revokes a device at once: stored as revoked, its open connections closed, and the open round no
    /// longer waits for it (nor counts an update it sent).
    fn revoke(&self, who: &str) -> anyhow::Result<serde_json::Value> {
        let mut inner = self.lock();
        let fp = crate::ops::revoke_in(&self.store, who)?;
        let round_changed = inner.engine.revoked(fp);
        drop(inner);
        self.bump_roster();
        let closed = self.control.get().map_or(0, |c| c.disconnect(&fp));
        tracing::info!(client = %fp, closed, round_changed, "revoked");
        Ok(serde_json::json!({
            "revoked": fp.to_hex(),
            "connections_closed": closed,
            "left_the_open_round": round_changed,
        }))
    }

    /// The round in progress, if any.
    pub fn round(&self) -> Option<RoundRecord> {
        self.lock().engine.current().cloned()
    }

    /// Pauses or resumes rounds — persisted first, so a restart keeps them paused — with the privacy
    /// budget's reason when it paused them (`budget`); an operator's pause or resume clears that reason.
    fn set_paused(
        &self,
        inner: &mut RoundCore,
        paused: bool,
        budget: Option<String>,
    ) -> Result<(), crate::store::StoreError> {
        self.store.set_paused(paused)?;
        inner.engine.set_paused(paused);
        *self.budget_pause.lock().unwrap_or_else(|p| p.into_inner()) = budget;
        Ok(())
    }

    /// Pauses rounds because the privacy budget cannot pay for `round` (`what`: "not started" when its
    /// preview was refused, "refused" when its aggregation was): every later round would be refused
    /// too, so rounds wait for an operator to raise the budget and resume. Logged with the reason.
    fn pause_for_budget(
        &self,
        inner: &mut RoundCore,
        round: RoundId,
        what: &str,
        e: &starling_privacy::PrivacyError,
    ) -> Result<(), crate::store::StoreError> {
        self.set_paused(inner, true, Some(format!("round {} {what}: {e}", round.0)))?;
        tracing::error!(
            round = round.0,
            "rounds paused: the privacy budget cannot pay for another round \
             ({e}); raise privacy.epsilon_budget and resume, or stop"
        );
        Ok(())
    }

    /// Why rounds are paused by the privacy budget (the refused round and its reason), if they are:
    /// cleared when an operator pauses or resumes.
    pub fn budget_pause(&self) -> Option<String> {
        self.budget_pause
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The newest published version.
    pub fn latest(&self) -> ModelVersion {
        self.lock().engine.latest()
    }

    /// The time on this coordinator's clock.
    pub fn now(&self) -> u64 {
        self.clock.now()
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &CoordinatorConfig {
        &self.cfg
    }

    /// The adapter schema every update must follow.
    pub fn schema(&self) -> &AdapterSchema {
        &self.schema
    }

    /// The size of the base model bundle devices fetch once.
    pub fn base_bundle_len(&self) -> usize {
        self.base.len()
    }

    fn lock(&self) -> MutexGuard<'_, RoundCore> {
        // A panic while holding the lock cannot leave the engine half-updated in a way the store does not
        // also reflect; keep serving.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The store (for status and export).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Advances the engine to `now` and carries out its actions; returns true once training is finished.
    pub fn tick(&self, now: u64) -> Result<bool, ServiceError> {
        let mut inner = self.lock();
        let mut actions = inner
            .engine
            .pending_aggregation()
            .into_iter()
            .collect::<Vec<_>>();
        if actions.is_empty() {
            actions = inner.engine.tick(now);
        }
        for action in actions {
            match action {
                Action::RoundStarted(r) => {
                    // A round the privacy budget cannot pay for would be refused after its devices
                    // trained, and so would every later one: it never starts, and rounds pause
                    // (persisted) until an operator raises the budget and resumes.
                    if let Err(CoreError::Privacy(
                        e @ starling_privacy::PrivacyError::BudgetExceeded { .. },
                    )) = inner.preview_epsilon(&r)
                    {
                        inner.engine.abandon(r.id)?;
                        bump(&self.metrics.rounds_refused_privacy);
                        self.pause_for_budget(&mut inner, r.id, "not started", &e)?;
                        break;
                    }
                    self.store.put_round(&r)?;
                    self.persist_secagg(&inner)?;
                    tracing::info!(
                        round = r.id.0,
                        selected = r.selected.len(),
                        eligible = r.eligible,
                        "round started"
                    );
                }
                Action::SecAggPhase { round, phase } => {
                    self.persist_secagg(&inner)?;
                    tracing::info!(round = round.0, %phase, "secure aggregation phase");
                }
                Action::Aggregate { .. } | Action::AggregateSum { .. } => {
                    let (round, input) = match action {
                        Action::Aggregate { round, updates } if self.cfg.hierarchy.enabled => {
                            let input = self.decode_partials(&round, &updates)?;
                            (round, input)
                        }
                        Action::Aggregate { round, updates } => {
                            let input = self.decode_updates(&round, &updates)?;
                            (round, input)
                        }
                        Action::AggregateSum {
                            round,
                            sum,
                            count,
                            params,
                        } => {
                            let input = inner.secure_sum(&sum, count, &params)?;
                            (round, input)
                        }
                        _ => continue,
                    };
                    self.store.put_round(&round)?;
                    let started = std::time::Instant::now();
                    match self.publish(&mut inner, &round, &input, now) {
                        Ok(version) => {
                            crate::failpoint::hit("published");
                            self.metrics.last_aggregation_us.store(
                                started.elapsed().as_micros() as u64,
                                std::sync::atomic::Ordering::Relaxed,
                            );
                            self.store.prune_updates(round.id)?;
                            tracing::info!(
                                round = round.id.0,
                                version = version.0,
                                updates = input.count(),
                                "published"
                            );
                        }
                        Err(ServiceError::Core(CoreError::Privacy(e))) => {
                            tracing::warn!(round = round.id.0, "round refused: {e}");
                            bump(&self.metrics.rounds_refused_privacy);
                            inner.engine.abandon(round.id)?;
                            self.store.close_round()?;
                            if matches!(e, starling_privacy::PrivacyError::BudgetExceeded { .. }) {
                                // Checked when the round started; the budget was lowered since (a
                                // restart with a new configuration).
                                self.pause_for_budget(&mut inner, round.id, "refused", &e)?;
                            }
                        }
                        Err(e) => return Err(e),
                    }
                }
                Action::RoundAbandoned { round, received } => {
                    tracing::info!(
                        round = round.0,
                        received,
                        "round abandoned: too few updates"
                    );
                    if inner.engine.current().is_some_and(|r| r.id == round) {
                        inner.engine.abandon(round)?;
                    }
                    bump(&self.metrics.rounds_abandoned);
                    self.store.close_round()?;
                    self.store.prune_updates(round)?;
                }
                Action::Finished => tracing::info!("all rounds done"),
            }
        }
        Ok(inner.engine.finished())
    }

    /// Aggregates `round` in the core from what the store holds, writes the new version, its ledger charge,
    /// the strategy state and the round's close in one transaction, then commits it to the core.
    fn publish(
        &self,
        core: &mut RoundCore,
        round: &RoundRecord,
        input: &RoundInput,
        now: u64,
    ) -> Result<ModelVersion, ServiceError> {
        let parent = self
            .store
            .model(round.model_version)?
            .ok_or(ServiceError::VersionMissing(round.model_version))?;
        let parent =
            adapter_values(&parent.adapter).map_err(|source| ServiceError::StoredAdapter {
                version: round.model_version,
                source,
            })?;
        let latest = core.engine.latest();
        let latest = self
            .store
            .manifest_digest(latest)?
            .ok_or(ServiceError::VersionMissing(latest))?;
        let p = core.aggregate(round, input, &parent, latest, now)?;
        self.store.publish(
            p.version,
            &p.model,
            Some((p.round, p.charge)),
            p.discrete.as_ref(),
            &p.strategy,
        )?;
        core.commit(&p)?;
        // Only saves a restart time: a failure is logged, the round stands.
        match core.ledger_checkpoint() {
            Ok(Some(cp)) => {
                if let Err(e) = self.store.put_ledger_checkpoint(&cp) {
                    tracing::warn!("storing the privacy ledger's checkpoint: {e}");
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!("the privacy ledger's checkpoint: {e}"),
        }
        Ok(p.version)
    }

    /// Persists the open secure round's state (flushed), if there is one.
    fn persist_secagg(&self, inner: &RoundCore) -> Result<(), ServiceError> {
        if let Some((id, state)) = inner.engine.secagg() {
            self.store.put_secagg(id, state)?;
        }
        Ok(())
    }

    /// The stored updates `ids` of `round`, decoded.
    fn decode_updates(
        &self,
        round: &RoundRecord,
        ids: &[UpdateId],
    ) -> Result<RoundInput, ServiceError> {
        let stored = self.store.updates(round.id)?;
        let mut deltas = Vec::with_capacity(ids.len());
        let mut loss = 0f64;
        for u in stored.iter().filter(|u| ids.contains(&u.meta.update_id)) {
            let d = decode_update(&u.body, &self.schema, &UpdateLimits::default()).map_err(
                |source| ServiceError::StoredUpdate {
                    round: round.id,
                    source,
                },
            )?;
            deltas.push((u.meta.num_examples, d));
            loss += f64::from(u.train_loss);
        }
        if deltas.len() != ids.len() {
            return Err(ServiceError::UpdatesMissing {
                round: round.id,
                stored: deltas.len(),
                counted: ids.len(),
            });
        }
        Ok(RoundInput::Updates { deltas, loss })
    }

    /// The stored partial sums `ids` of `round` (forwarded by edge aggregators), combined.
    fn decode_partials(
        &self,
        round: &RoundRecord,
        ids: &[UpdateId],
    ) -> Result<RoundInput, ServiceError> {
        let partials: Vec<PartialSum> = self
            .store
            .partials(round.id)?
            .into_iter()
            .filter(|p| ids.contains(&p.meta.update_id))
            .map(|p| p.partial)
            .collect();
        if partials.len() != ids.len() {
            return Err(ServiceError::UpdatesMissing {
                round: round.id,
                stored: partials.len(),
                counted: ids.len(),
            });
        }
        let mut input = RoundInput::from_partials(&partials, self.schema.num_params())?;
        if let RoundInput::Sum { loss, .. } = &mut input {
            // Secure cohorts forward no training losses (one more per-device signal).
            if self.secure_cohorts().is_some() {
                *loss = None;
            }
        }
        Ok(input)
    }

    /// Whether `id` is the retry of an update or partial sum stored for a round that has closed since (its
    /// ack was lost): it is acknowledged again, counted nowhere.
    fn stored_for_a_closed_round(&self, id: &UpdateId) -> bool {
        match self.store.update_round(id) {
            Ok(Some(r)) => self.lock().engine.current().map(|c| c.id) != Some(r),
            _ => false,
        }
    }

    /// Behind aggregators with `[secure_aggregation]`: each cohort's sum is of integer-encoded deltas
    /// (SecAgg+ per cohort), each within an L2 distance of the device's delta — the one of a cohort of
    /// `devices_per_round`, the coarsest any cohort gets.
    fn secure_cohorts(&self) -> Option<SecureCohorts> {
        let sa = &self.cfg.secure_aggregation;
        if !(self.cfg.hierarchy.enabled && sa.enabled) {
            return None;
        }
        let n = self.cfg.hierarchy.secure_devices();
        Some(SecureCohorts {
            rounding: sa.rounding(n, self.schema.num_params()).ok()?,
        })
    }

    /// The secure-aggregation settings an edge aggregator runs its cohort's SecAgg+ with in `round`: the
    /// parameters a round of `[hierarchy] devices_per_round` devices would get (encoding, words, graph
    /// seed); the aggregator sizes the graph and the modulus for its own cohort
    /// ([`crate::secagg::cohort_params`]).
    fn cohort_template(&self, round: RoundId) -> Option<(starling_secagg::RoundParams, u32)> {
        let sa = &self.cfg.secure_aggregation;
        if !(self.cfg.hierarchy.enabled && sa.enabled) {
            return None;
        }
        let n = self.cfg.hierarchy.secure_devices();
        match sa.params(self.cfg.rounds.seed, round, n, self.schema.num_params(), 0) {
            Ok(p) => Some((p, 0)),
            Err(e) => {
                // Checked when the configuration loaded.
                tracing::error!("secure-aggregation settings for round {}: {e}", round.0);
                None
            }
        }
    }

    /// The roster changed (an enrolment or a revocation): aggregators re-read it.
    fn bump_roster(&self) {
        self.roster
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// An edge aggregator's partial sum: checked against the open round like an update (the aggregator
    /// is the engine's participant), its clip record against this configuration, stored and flushed
    /// before the ack.
    fn forward(
        &self,
        client: Fingerprint,
        header: &starling_protocol::message::Forward,
        body: &[u8],
    ) -> Response {
        let now = self.now();
        let p = &self.cfg.privacy;
        let clip = (p.mode != crate::config::DpPlacement::Off).then_some(p.clip);
        if header.clip != clip {
            bump(&self.metrics.updates_refused);
            let said =
                |c: Option<f64>| c.map_or("not clipped".to_string(), |c| format!("clipped to {c}"));
            return Response::error(
                ErrorCode::BadRequest,
                format!(
                    "the partial sum's deltas were {}; this root's rounds need them {}",
                    said(header.clip),
                    said(clip)
                ),
            );
        }
        let meta = UpdateMeta {
            update_id: header.update_id,
            client,
            round: header.round,
            model_version: header.model_version,
            schema: header.schema,
            num_examples: u64::from(header.count),
        };
        let ack = |duplicate| ack(header.update_id, duplicate);
        if self.stored_for_a_closed_round(&header.update_id) {
            return ack(true);
        }
        let mut inner = self.lock();
        match inner.engine.check_update(&meta, now) {
            Ok(UpdateCheck::Duplicate) => return ack(true),
            Ok(UpdateCheck::New) => {}
            Err(e) => {
                bump(&self.metrics.updates_refused);
                return Response::error(upload_code(&e), e.to_string());
            }
        }
        let len = self.schema.num_params();
        if body.len() != len * 4 {
            bump(&self.metrics.updates_refused);
            return Response::error(
                ErrorCode::BadRequest,
                format!(
                    "a partial sum holds {len} f32 values; got {} bytes",
                    body.len()
                ),
            );
        }
        let sum: Vec<f32> = body
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let secure = self.secure_cohorts();
        if let Err(why) = check_partial(&sum, header.count, header.weight, clip, secure) {
            bump(&self.metrics.updates_refused);
            return Response::error(ErrorCode::BadRequest, why);
        }
        let stored = StoredPartial {
            meta: meta.clone(),
            partial: PartialSum {
                sum,
                count: header.count as usize,
                weight: header.weight,
                loss: header.loss,
            },
            clip: header.clip,
        };
        if let Err(e) = self.store.put_partial(&stored) {
            tracing::error!("storing a partial sum: {e}");
            return Response::error(ErrorCode::Unavailable, "storage failed; retry");
        }
        crate::failpoint::hit("partial-stored");
        if let Err(e) = inner.engine.record_update(&meta, now) {
            return Response::error(ErrorCode::Internal, e.to_string());
        }
        bump(&self.metrics.updates_accepted);
        self.metrics
            .upload_bytes
            .fetch_add(body.len() as u64, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(
            round = header.round.0,
            aggregator = %client,
            devices = header.count,
            "partial sum {} of {} selected aggregators",
            inner.engine.received(),
            inner.engine.current().map_or(0, |r| r.selected.len())
        );
        ack(false)
    }

    /// An edge aggregator enrols a device with the token the device presented to it (device tokens only).
    fn enrol_for(
        &self,
        aggregator: Fingerprint,
        request: &starling_protocol::message::EnrolFor,
    ) -> Response {
        let bad = || {
            Response::error(
                ErrorCode::BadToken,
                "unknown or used device enrolment token",
            )
        };
        let Ok(token) = EnrolmentToken::parse(&request.enrol.token) else {
            return bad();
        };
        let enrolled = {
            let _inner = self.lock();
            self.store.enrol_as(
                token.hash(),
                request.client,
                self.now(),
                Some(ClientRole::Device),
                Some(aggregator),
            )
        };
        match enrolled {
            Ok(Some(rec)) => {
                self.bump_roster();
                tracing::info!(client = %request.client, name = rec.name, "enrolled through an aggregator");
                Response::Message(Message::Enrolled(starling_protocol::message::Enrolled {
                    client_id: request.client,
                }))
            }
            Ok(None) => bad(),
            Err(e) => Response::error(ErrorCode::Revoked, e.to_string()),
        }
    }

    /// The devices for edge aggregator `aggregator`'s copy (unless it holds this generation already):
    /// those that enrolled through it, and those enrolled at the root itself (before the tier existed)
    /// — not those of other aggregators, so each copy grows with its own devices (a device stays with
    /// the aggregator it enrolled through). Active ones are admitted there; revoked ones are listed so
    /// that the aggregator refuses them as revoked, as the root does.
    fn roster(&self, aggregator: Fingerprint, known: u64) -> Response {
        let generation = self.roster.load(std::sync::atomic::Ordering::SeqCst);
        let devices = if known == generation {
            None
        } else {
            let mut listed = RosterDevices::default();
            match self.store.clients() {
                Ok(all) => {
                    for c in all {
                        let mine = match self.store.enrolled_via(&c.fingerprint) {
                            Ok(via) => via.is_none_or(|a| a == aggregator),
                            Err(e) => {
                                tracing::error!("reading the roster: {e}");
                                return Response::error(
                                    ErrorCode::Unavailable,
                                    "storage failed; retry",
                                );
                            }
                        };
                        if !mine || self.store.role(&c.fingerprint).ok() != Some(ClientRole::Device)
                        {
                            continue;
                        }
                        match c.status {
                            ClientStatus::Active => listed.active.push(c.fingerprint),
                            ClientStatus::Revoked => listed.revoked.push(c.fingerprint),
                        }
                    }
                }
                Err(e) => {
                    tracing::error!("reading the roster: {e}");
                    return Response::error(ErrorCode::Unavailable, "storage failed; retry");
                }
            }
            Some(listed)
        };
        Response::Message(Message::Roster(starling_protocol::message::Roster {
            generation,
            devices,
        }))
    }

    /// A device's secure-aggregation step: the state is persisted before the answer leaves.
    fn secagg(&self, client: Fingerprint, request: SecAggRequest, now: u64) -> Response {
        let mut inner = self.lock();
        match inner
            .engine
            .secagg_step(client, request.round, request.step, now)
        {
            Ok(outcome) => {
                if outcome.changed {
                    if let Err(e) = self.persist_secagg(&inner) {
                        tracing::error!("storing the secure-aggregation state: {e}");
                        return Response::error(ErrorCode::Unavailable, "storage failed; retry");
                    }
                }
                Response::Message(Message::SecAggReply(Box::new(outcome.reply)))
            }
            Err(e) => {
                use crate::engine::EngineError as E;
                let code = match e {
                    E::LateUpdate { .. } => ErrorCode::LateUpdate,
                    _ => ErrorCode::BadRequest,
                };
                Response::error(code, e.to_string())
            }
        }
    }

    fn upload(
        &self,
        client: Fingerprint,
        header: &starling_protocol::message::Upload,
        body: Vec<u8>,
    ) -> Response {
        let now = self.now();
        let meta = UpdateMeta {
            update_id: header.update_id,
            client,
            round: header.round,
            model_version: header.model_version,
            schema: header.schema,
            num_examples: header.num_examples,
        };
        let ack = |duplicate| {
            if duplicate {
                bump(&self.metrics.updates_duplicate);
            }
            ack(header.update_id, duplicate)
        };
        if self.stored_for_a_closed_round(&header.update_id) {
            return ack(true);
        }
        let mut inner = self.lock();
        let checked = if inner.engine.secagg().is_some() {
            // A masked input: added to the round's masked sum, which is stored before the ack; the
            // input itself is never stored.
            // A duplicate is stored again too: its first try may have failed to store.
            let checked = inner.engine.record_masked(&meta, &body, now);
            if checked.is_ok() {
                if let Err(e) = self.persist_secagg(&inner) {
                    // The device re-sends it: a duplicate then, acknowledged once the state is stored.
                    tracing::error!("storing the secure-aggregation state: {e}");
                    return Response::error(ErrorCode::Unavailable, "storage failed; retry");
                }
            }
            checked
        } else {
            inner.engine.check_update(&meta, now)
        };
        match checked {
            Ok(UpdateCheck::Duplicate) => return ack(true),
            Ok(UpdateCheck::New) if inner.engine.secagg().is_some() => {
                crate::failpoint::hit("masked-input-stored");
                bump(&self.metrics.updates_accepted);
                self.metrics
                    .upload_bytes
                    .fetch_add(body.len() as u64, std::sync::atomic::Ordering::Relaxed);
                return ack(false);
            }
            Ok(UpdateCheck::New) => {}
            Err(e) => {
                bump(&self.metrics.updates_refused);
                return Response::error(upload_code(&e), e.to_string());
            }
        }
        // Checked as aggregation will decode it (stored as it came; decoded only when aggregated).
        if let Err(e) = validate_update(&body, &self.schema, &UpdateLimits::default()) {
            bump(&self.metrics.updates_refused);
            return Response::error(
                ErrorCode::BadRequest,
                format!("update does not decode: {e}"),
            );
        }
        crate::failpoint::hit("upload-received");
        let stored = StoredUpdate {
            meta: meta.clone(),
            train_loss: header.metrics.train_loss,
            body,
        };
        if let Err(e) = self.store.put_update(&stored) {
            tracing::error!("storing update: {e}");
            return Response::error(ErrorCode::Unavailable, "storage failed; retry");
        }
        crate::failpoint::hit("upload-stored");
        if let Err(e) = inner.engine.record_update(&meta, now) {
            return Response::error(ErrorCode::Internal, e.to_string());
        }
        bump(&self.metrics.updates_accepted);
        self.metrics.upload_bytes.fetch_add(
            stored.body.len() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        if let Some(r) = inner.engine.current() {
            tracing::info!(
                round = r.id.0,
                "update {} of {} selected ({} needed)",
                inner.engine.received(),
                r.selected.len(),
                self.cfg.rounds.min_updates
            );
        }
        ack(false)
    }

    /// Records a device's refusal of a round's task and tells it when to ask again.
    fn decline(&self, client: Fingerprint, d: &Decline, now: u64) -> Response {
        tracing::warn!(client = %client, round = d.round.0, code = %d.code, "task declined: {}", d.reason);
        bump(&self.metrics.tasks_declined);
        self.lock().engine.declined(client, d.round);
        let record = crate::store::DeclineRecord {
            round: d.round,
            code: format!("{:?}", d.code),
            reason: d.reason.clone(),
            at: now,
        };
        if let Err(e) = self.store.record_decline(&client, record) {
            tracing::error!("recording a decline: {e}");
        }
        Response::Message(Message::NoTask(NoTask {
            retry_after_ms: self.cfg.rounds.retry_after_ms,
            reason: "decline recorded".into(),
        }))
    }

    /// Runs the endpoints with `tls` as the server key until the configured rounds are done (forever if
    /// none are configured); `on_bound` sees the bound QUIC endpoints and the status page's address (to
    /// print them).
    pub async fn serve_with(
        self: Arc<Self>,
        tls: &SigningIdentity,
        limits: Limits,
        on_bound: impl FnOnce(&Server, Option<SocketAddr>),
    ) -> Result<(), anyhow::Error> {
        let drain = self.cfg.network.drain();
        self.serve_until(tls, limits, on_bound, std::future::pending(), drain)
            .await
    }

    /// [`Coordinator::serve_with`] that also stops when `shutdown` resolves (SIGTERM): it then drains —
    /// takes no new connection or exchange, lets the exchanges in flight finish (an upload being stored
    /// gets its ack), flushes the store, and closes every connection telling devices when to come back.
    /// Also answers the admin socket in the coordinator directory.
    pub async fn serve_until(
        self: Arc<Self>,
        tls: &SigningIdentity,
        limits: Limits,
        on_bound: impl FnOnce(&Server, Option<SocketAddr>),
        shutdown: impl std::future::Future<Output = ()>,
        drain: DrainSettings,
    ) -> Result<(), anyhow::Error> {
        let admin = crate::admin::AdminSocket::bind(&self.dir)
            .await
            .map_err(|e| anyhow::anyhow!("binding the admin socket: {e}"))?;
        let server = Server::bind(
            self.cfg.network.listen,
            self.cfg.network.enrol_listen,
            tls,
            self.clone(),
            self.clone(),
            limits,
            self.cfg
                .network
                .enrolment_limits()
                .map_err(anyhow::Error::msg)?,
        )?;
        let _ = self.control.set(server.control());
        let admin_task = tokio::spawn(admin.serve(self.clone()));
        let (stop_http, stopped) = tokio::sync::oneshot::channel::<()>();
        let http = if self.cfg.network.http {
            let listener = tokio::net::TcpListener::bind(self.cfg.network.http_listen)
                .await
                .map_err(|e| {
                    anyhow::anyhow!(
                        "binding the status page to {}: {e}",
                        self.cfg.network.http_listen
                    )
                })?;
            let addr = listener.local_addr()?;
            let app = crate::http::router(self.clone());
            let task = tokio::spawn(async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(async move {
                        let _ = stopped.await;
                    })
                    .await
            });
            Some((addr, task))
        } else {
            None
        };
        on_bound(&server, http.as_ref().map(|(a, _)| *a));
        self.health.set_ready();
        let mut interval = tokio::time::interval(Duration::from_millis(100));
        let mut last_alive = 0u64;
        tokio::pin!(shutdown);
        let drained = loop {
            tokio::select! {
                _ = interval.tick() => {}
                () = &mut shutdown => break true,
            }
            let me = self.clone();
            let finished = tokio::task::spawn_blocking(move || me.tick(me.now())).await??;
            let now = now_ms();
            self.health.ticked(now);
            if now.saturating_sub(last_alive) >= 1_000 {
                // The start of a downtime, should this process die: a restart gives it back to the round.
                self.store.mark_alive(self.now())?;
                last_alive = now;
            }
            if finished {
                break false;
            }
        };
        if drained {
            self.health.set_draining();
            tracing::info!("draining: finishing the exchanges in flight");
            let left = server.drain(drain.retry_after, drain.wait).await;
            if left > 0 {
                tracing::warn!(left, "exchanges still in flight when the drain ended");
            }
            self.store.mark_alive(self.now())?;
        } else {
            server.shutdown().await;
        }
        self.store.flush()?;
        admin_task.abort();
        let _ = stop_http.send(());
        if let Some((_, task)) = http {
            task.await??;
        }
        tracing::info!("stopped{}", if drained { " after draining" } else { "" });
        Ok(())
    }

    /// The status document (see [`crate::status::document`]) as of now.
    pub fn status_document(&self) -> Result<serde_json::Value, crate::store::StoreError> {
        crate::status::document(&self.store, self.now())
    }

    /// The running counters behind `/metrics`.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}

/// What the root knows of partial sums made under SecAgg+ per cohort.
#[derive(Debug, Clone, Copy)]
struct SecureCohorts {
    /// How far, in L2, a device's encoded delta can lie from its clipped delta (one integer step per
    /// word).
    rounding: f64,
}

/// What a partial sum must satisfy besides its length: finite values; from a secure cohort (`secure`),
/// at least [`crate::secagg::MIN_COHORT`] devices; and under user-level DP (`clip`) what the noise is
/// calibrated for — each of its `count` devices weighs one and contributed a delta of norm at most `clip`
/// (plus, from a secure cohort, the encoding's rounding), so the sum's norm is at most `count · clip`. A
/// sum beyond that was not clipped as the round requires (a faulty or compromised aggregator) and would
/// not be covered by the noise.
fn check_partial(
    sum: &[f32],
    count: u32,
    weight: f64,
    clip: Option<f64>,
    secure: Option<SecureCohorts>,
) -> Result<(), String> {
    if let Some(i) = sum.iter().position(|v| !v.is_finite()) {
        return Err(format!("the partial sum's value {i} is not finite"));
    }
    let min = crate::secagg::MIN_COHORT;
    if secure.is_some() && (count as usize) < min {
        return Err(format!(
            "a secure cohort of {count} devices: a sum of fewer than {min} reveals their inputs"
        ));
    }
    let Some(clip) = clip else {
        return Ok(());
    };
    if (weight - f64::from(count)).abs() > 1e-9 * f64::from(count).max(1.0) {
        return Err(format!(
            "under user-level DP each device weighs one: {count} devices cannot weigh {weight}"
        ));
    }
    let norm = sum
        .iter()
        .map(|v| f64::from(*v).powi(2))
        .sum::<f64>()
        .sqrt();
    // f32 rounding of the clipped deltas and of their sum: a relative slack of 1e-4; under SecAgg+ each
    // device's encoded delta is also within one integer step per word of its clipped delta.
    let rounding = secure.map_or(0.0, |s| s.rounding);
    let bound = (clip + rounding) * f64::from(count) * (1.0 + 1e-4);
    if norm > bound {
        return Err(format!(
            "the partial sum's norm {norm:.6} exceeds its {count} devices × clip {clip}: its deltas \
             were not clipped as the round requires"
        ));
    }
    Ok(())
}

/// The acknowledgement of update (or partial sum) `id` (the root's and an edge aggregator's).
pub(crate) fn ack(id: UpdateId, duplicate: bool) -> Response {
    Response::Message(Message::Ack(Ack {
        update_id: id,
        duplicate,
    }))
}

/// The error code a device (or aggregator) can act on for an engine's refusal of its upload.
fn upload_code(e: &crate::engine::EngineError) -> ErrorCode {
    use crate::engine::EngineError as E;
    match e {
        E::LateUpdate { .. } => ErrorCode::LateUpdate,
        E::WrongModelVersion { .. } => ErrorCode::WrongModelVersion,
        E::SchemaMismatch { .. } => ErrorCode::SchemaMismatch,
        _ => ErrorCode::BadRequest,
    }
}

impl Authorizer for Coordinator {
    fn access(&self, client: &Fingerprint) -> Access {
        match self.store.client(client) {
            Ok(Some(c)) if c.status == ClientStatus::Active => Access::Allowed,
            Ok(Some(_)) => Access::Revoked,
            Ok(None) => Access::NotEnrolled,
            Err(e) => {
                tracing::error!("client lookup failed: {e}");
                Access::NotEnrolled
            }
        }
    }
}

impl Handler for Coordinator {
    fn latest_model(&self) -> ModelVersion {
        self.lock().engine.latest()
    }

    fn max_upload_bytes(&self) -> u64 {
        if self.cfg.hierarchy.enabled {
            // A partial sum is f32 whatever encoding devices upload in.
            self.cfg
                .task
                .max_update_bytes
                .max(self.schema.num_params() as u64 * 4)
        } else {
            self.cfg.task.max_update_bytes
        }
    }

    async fn handle(&self, client: Fingerprint, request: Request) -> Response {
        let now = self.now();
        let _ = self.store.touch(&client, now);
        let role = match self.store.role(&client) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("reading a client's role: {e}");
                return Response::error(ErrorCode::Unavailable, "storage failed; retry");
            }
        };
        let hierarchy = self.cfg.hierarchy.enabled;
        let aggregator = role == ClientRole::Aggregator;
        match (&request, hierarchy, aggregator) {
            (Request::Task(_) | Request::Upload { .. } | Request::SecAgg(_), true, false) => {
                return Response::Message(Message::NoTask(NoTask {
                    retry_after_ms: self.cfg.rounds.retry_after_ms.max(10_000),
                    reason: "this coordinator is the root of a tier of edge aggregators: devices \
                             connect through one"
                        .into(),
                }));
            }
            (Request::Task(_), false, true) => {
                return Response::Message(Message::NoTask(NoTask {
                    retry_after_ms: self.cfg.rounds.retry_after_ms.max(10_000),
                    reason: "this coordinator is not in hierarchical mode ([hierarchy] enabled)"
                        .into(),
                }));
            }
            (Request::Upload { .. } | Request::SecAgg(_), _, true) => {
                return Response::error(
                    ErrorCode::BadRequest,
                    "an aggregator forwards partial sums, not updates",
                );
            }
            (Request::Forward { .. }, false, _) | (Request::Forward { .. }, _, false) => {
                return Response::error(
                    ErrorCode::BadRequest,
                    "only an enrolled edge aggregator of a root in hierarchical mode forwards partial sums",
                );
            }
            (Request::EnrolFor(_) | Request::Roster(_), _, false) => {
                return Response::error(
                    ErrorCode::BadRequest,
                    "only an enrolled edge aggregator enrols devices or reads the roster",
                );
            }
            _ => {}
        }
        match request {
            Request::Forward { header, body } => self.forward(client, &header, &body),
            Request::EnrolFor(r) => self.enrol_for(client, &r),
            Request::Roster(r) => self.roster(client, r.generation),
            Request::Task(_) => {
                let decision = self.lock().engine.task_request(client, now);
                match decision {
                    TaskDecision::Task {
                        round,
                        model_version,
                        deadline,
                        secagg,
                    } => {
                        bump(&self.metrics.tasks_offered);
                        let secagg = secagg.or_else(|| self.cohort_template(round));
                        match self.store.model(model_version) {
                            Ok(Some(model)) => {
                                let task =
                                    self.lock().task(round, model.manifest, deadline, secagg);
                                Response::Message(Message::Task(Box::new(task)))
                            }
                            _ => Response::error(ErrorCode::Internal, "model version missing"),
                        }
                    }
                    TaskDecision::NoTask {
                        retry_after_ms,
                        reason,
                    } => Response::Message(Message::NoTask(NoTask {
                        retry_after_ms,
                        reason: reason.into(),
                    })),
                }
            }
            Request::Manifest(m) => {
                let version = m.version.unwrap_or_else(|| self.lock().engine.latest());
                match self.store.model(version) {
                    Ok(Some(p)) => Response::Message(Message::Manifest(p.manifest)),
                    _ => Response::error(ErrorCode::NotFound, format!("no version {}", version.0)),
                }
            }
            Request::Fetch(f) => match f.kind {
                BlobKind::Adapter => match self.store.model(f.version) {
                    Ok(Some(p)) => Response::Blob(p.adapter.into()),
                    _ => {
                        Response::error(ErrorCode::NotFound, format!("no version {}", f.version.0))
                    }
                },
                BlobKind::Base => match self.store.model(f.version) {
                    Ok(Some(_)) => Response::Blob(self.base.clone()),
                    _ => {
                        Response::error(ErrorCode::NotFound, format!("no version {}", f.version.0))
                    }
                },
            },
            Request::Decline(d) => self.decline(client, &d, now),
            Request::SecAgg(r) => self.secagg(client, *r, now),
            Request::Upload { header, body } => {
                self.lock().engine.client_seen(client, now);
                self.upload(client, &header, body)
            }
        }
    }

    async fn enrol(&self, client: Fingerprint, request: Enrol) -> Result<(), ErrorReply> {
        let bad = || ErrorReply {
            code: ErrorCode::BadToken,
            message: "unknown or used enrolment token".into(),
        };
        let token = EnrolmentToken::parse(&request.token).map_err(|_| bad())?;
        let enrolled = {
            // Under the round lock, like every change a backup must see whole.
            let _inner = self.lock();
            self.store.enrol(token.hash(), client, self.now())
        };
        match enrolled {
            Ok(Some(rec)) => {
                self.bump_roster();
                tracing::info!(client = %client, name = rec.name, "enrolled");
                Ok(())
            }
            Ok(None) => Err(bad()),
            Err(e) => Err(ErrorReply {
                code: ErrorCode::Revoked,
                message: e.to_string(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::check_partial;

    #[test]
    fn a_partial_sum_beyond_its_devices_clip_or_weight_is_refused() {
        // Two deltas of norm 1 (the clip) in the same direction: norm 2 = 2 devices × clip 1.
        let sum = [1.2f32, 1.6];
        assert!(check_partial(&sum, 2, 2.0, Some(1.0), None).is_ok());
        let err = check_partial(&sum, 1, 1.0, Some(1.0), None).unwrap_err();
        assert!(err.contains("norm"), "{err}");
        let err = check_partial(&sum, 2, 7.0, Some(1.0), None).unwrap_err();
        assert!(err.contains("weighs one"), "{err}");
        // DP off: FedAvg weights by examples, any norm.
        assert!(check_partial(&[30.0, 40.0], 2, 70.0, None, None).is_ok());
        let err = check_partial(&[f32::NAN, 0.0], 2, 2.0, None, None).unwrap_err();
        assert!(err.contains("value 0"), "{err}");
    }

    #[test]
    fn a_secure_cohort_sum_has_its_rounding_slack_and_at_least_three_devices() {
        use super::SecureCohorts;
        // Three devices at the clip (norm 1 each, 4 values): the encoded values may sit one step
        // (0.01) from the clipped ones, so their sum's norm may reach 3 × (1 + 0.01·√4).
        let secure = Some(SecureCohorts {
            rounding: 0.01 * 4f64.sqrt(),
        });
        let sum = [3.06f32, 0.0, 0.0, 0.0];
        assert!(check_partial(&sum, 3, 3.0, Some(1.0), secure).is_ok());
        assert!(check_partial(&sum, 3, 3.0, Some(1.0), None).is_err());
        let err = check_partial(&[3.07, 0.0, 0.0, 0.0], 3, 3.0, Some(1.0), secure).unwrap_err();
        assert!(err.contains("norm"), "{err}");
        let err = check_partial(&[0.5, 0.0, 0.0, 0.0], 2, 2.0, None, secure).unwrap_err();
        assert!(err.contains("fewer than 3"), "{err}");
    }
}
