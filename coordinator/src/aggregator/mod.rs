//! The edge aggregator (`starling-coordinator aggregator init | serve`): a tier between devices and the
//! root coordinator. Devices speak the ordinary device protocol to it and cannot tell it from the root: it
//! enrols them (their one-time tokens are spent at the root), hands them the root's task for the open round
//! (the manifest signed by the root, checked here and again on the device), serves the root's models from
//! a cache, and takes their updates — each stored and flushed in the spool before its ack. Once its cohort
//! is complete, or at the cut-off before the root's deadline, it forwards one weighted partial sum
//! ([`crate::round_core::cohort_sum`], the same rule the root's flat round applies) over mutual TLS, as a
//! key enrolled at the root with the aggregator role. The root's work per round then grows with
//! aggregators, not devices.
//!
//! When the root's rounds are secure (its task carries secure-aggregation settings), the aggregator runs
//! SecAgg+ with its cohort ([`secure`]): it fixes the cohort, runs the phases, and forwards only the
//! unmasked cohort sum.
//!
//! Trust: without secure aggregation the aggregator sees its cohort's individual updates, as a flat root
//! does; with it, only its cohort's sum. The root sees only sums of cohorts. An aggregator cannot forge
//! models (devices verify the root's signature) nor enrol a key without a device token; it can drop
//! devices or forge its cohort's sum (the root bounds the sum's norm under DP, nothing more).
//!
//! What must never live here: round policy (the root's [`crate::round_core`]), aggregation rules beyond
//! the cohort's sum, or protocol decoding (starling-protocol).

pub mod config;
pub mod http;
pub mod secure;
pub mod spool;
pub mod upstream;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use starling_protocol::bulk::BulkHeader;
use starling_protocol::manifest::ManifestVerifier;
use starling_protocol::message::{
    BlobKind, Decline, Enrol, EnrolFor, ErrorCode, ErrorReply, Forward, Message, NoTask,
    RosterDevices, SecAggRequest, SecAggTask, Task,
};
use starling_protocol::update::{decode_update, validate_update, UpdateLimits};
use starling_protocol::{
    AdapterSchema, Digest, EnrolmentToken, Fingerprint, ModelVersion, RoundId, SigningIdentity,
    UpdateId,
};
use starling_transport::client::TaskReply;
use starling_transport::server::ServerControl;
use starling_transport::{
    Access, Authorizer, Client, Handler, Limits, Request, Response, Server, TransportError,
};

use crate::round_core::{cohort_sum, PartialSum};
use crate::secagg::MIN_COHORT;
use crate::strategy::ClientUpdate;
pub use config::AggregatorConfig;
use http::{bump, AggregatorMetrics};
use secure::{CohortError, Masked, SecureCohort, Tick};
use spool::{Spool, SpoolError, SpooledUpdate};
use upstream::{Up, Upstream};

/// Largest blob fetched from the root on devices' behalf (a base model bundle).
const MAX_BLOB: u64 = 16 << 30;
/// Adapter versions kept in the cache.
const CACHED_ADAPTERS: usize = 8;

/// Errors of the aggregator.
#[derive(Debug, thiserror::Error)]
pub enum AggregatorError {
    /// The spool failed.
    #[error(transparent)]
    Spool(#[from] SpoolError),
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// A setting is wrong (an address, a key).
    #[error("{0}")]
    Setting(String),
    /// The root could not be reached or refused.
    #[error("the root coordinator: {0}")]
    Root(#[from] TransportError),
    /// The root's task is not signed by the root's key, or its manifest does not read.
    #[error("the root's task for round {round}: {detail}")]
    Task {
        /// The round.
        round: RoundId,
        /// Why.
        detail: String,
    },
    /// A spooled update does not decode (it was checked before it was stored: the spool is damaged).
    #[error("a spooled update of round {round}: {source}")]
    Update {
        /// The round.
        round: RoundId,
        /// Why.
        source: starling_protocol::ProtocolError,
    },
    /// The cohort's sum failed.
    #[error("summing the cohort: {0}")]
    Sum(#[from] crate::round_core::CoreError),
    /// The secure cohort's parameters are unusable.
    #[error("secure aggregation: {0}")]
    SecAgg(#[from] starling_secagg::SecAggError),
    /// A key file.
    #[error("key {path}: {detail}")]
    Key {
        /// The file.
        path: String,
        /// Why.
        detail: String,
    },
    /// Files of the aggregator directory.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// Files inside an aggregator directory.
#[derive(Debug, Clone)]
pub struct AggregatorLayout {
    /// The directory.
    pub dir: PathBuf,
}

impl AggregatorLayout {
    /// The layout of `dir`.
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
        }
    }
    /// aggregator.toml.
    pub fn config(&self) -> PathBuf {
        self.dir.join("aggregator.toml")
    }
    /// Its TLS key (PKCS#8 DER, owner-only): its identity towards devices and the root.
    pub fn tls_key(&self) -> PathBuf {
        self.dir.join("keys/tls.pk8")
    }
    /// The spool (sled).
    pub fn spool(&self) -> PathBuf {
        self.dir.join("spool")
    }
    /// The addresses of the running `aggregator serve`.
    pub fn serving(&self) -> PathBuf {
        self.dir.join("serve.json")
    }
}

/// What `aggregator init` needs.
#[derive(Debug, Clone)]
pub struct InitRequest {
    /// Directory to create.
    pub dir: PathBuf,
    /// The root's QUIC endpoint.
    pub root: String,
    /// The root's enrolment endpoint.
    pub root_enrol: String,
    /// The root's TLS fingerprint (hex).
    pub pin: String,
    /// The root's model-signing key (hex).
    pub signing_key: String,
    /// The aggregator token the root's operator issued (`enrol --role aggregator`).
    pub token: String,
    /// This aggregator's name.
    pub name: String,
    /// Devices' QUIC endpoint (default 0.0.0.0:7500).
    pub listen: Option<SocketAddr>,
    /// Devices' enrolment endpoint (default 0.0.0.0:7501).
    pub enrol_listen: Option<SocketAddr>,
}

fn resolve(addr: &str) -> Result<SocketAddr, AggregatorError> {
    use std::net::ToSocketAddrs;
    addr.to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| AggregatorError::Setting(format!("{addr:?} is not a reachable HOST:PORT")))
}

fn limits() -> Limits {
    // The root's roster of devices can be long: its frame cap is the protocol's hard cap.
    Limits {
        max_frame: starling_protocol::frame::MAX_FRAME_HARD,
        ..Limits::default()
    }
}

/// `aggregator init`: creates the directory and key, enrols the key at the root under the aggregator role
/// (the token must have been issued with `--role aggregator`), writes aggregator.toml. Returns the
/// aggregator's TLS fingerprint (what its devices pin).
pub async fn init(r: &InitRequest) -> Result<Fingerprint, AggregatorError> {
    let layout = AggregatorLayout::new(&r.dir);
    if layout.config().exists() {
        return Err(AggregatorError::Setting(format!(
            "{} already holds an aggregator",
            r.dir.display()
        )));
    }
    let mut network = config::AggregatorNetwork::default();
    if let Some(a) = r.listen {
        network.listen = a;
    }
    if let Some(a) = r.enrol_listen {
        network.enrol_listen = a;
    }
    let cfg = AggregatorConfig {
        root: config::RootSection {
            address: r.root.clone(),
            pin: r.pin.clone(),
            signing_key: r.signing_key.clone(),
            name: r.name.clone(),
        },
        network,
        cohort: config::CohortConfig::default(),
    };
    // Checks the pin and the signing key before anything is created.
    let cfg = AggregatorConfig::parse(&cfg.document(), "the init arguments")?;
    let token = EnrolmentToken::parse(&r.token)
        .map_err(|_| AggregatorError::Setting("--token is not an enrolment token".into()))?;
    let pin = cfg.pin().map_err(AggregatorError::Setting)?;
    let root = resolve(&r.root)?;
    let enrol_at = resolve(&r.root_enrol)?;
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| AggregatorError::Io { path, source }
    };
    let key_path = layout.tls_key();
    let key = if key_path.is_file() {
        read_key(&key_path)?
    } else {
        std::fs::create_dir_all(r.dir.join("keys")).map_err(io(&r.dir))?;
        let key = SigningIdentity::generate().map_err(|e| AggregatorError::Key {
            path: key_path.display().to_string(),
            detail: e.to_string(),
        })?;
        crate::ops::write_private(&key_path, &key.pkcs8_der()).map_err(|e| {
            AggregatorError::Key {
                path: key_path.display().to_string(),
                detail: format!("{e:#}"),
            }
        })?;
        key
    };
    let client = Client::new(&key, pin, root, limits())?.with_enrolment(enrol_at);
    let enrolled = client.enrol(&token, &r.name).await;
    client.close().await;
    enrolled?;
    std::fs::write(layout.config(), cfg.document()).map_err(io(&layout.config()))?;
    Ok(key.fingerprint())
}

/// Reads the aggregator's PKCS#8 key.
fn read_key(path: &Path) -> Result<SigningIdentity, AggregatorError> {
    crate::service::read_key(path).map_err(|e| AggregatorError::Key {
        path: path.display().to_string(),
        detail: e.to_string(),
    })
}

/// The open round as the aggregator holds it.
struct Round {
    /// The root's task (its deadline is the root's).
    task: Option<Arc<Task>>,
    /// The task's adapter schema (from its verified manifest).
    schema: Option<AdapterSchema>,
    /// The model version the task trains (its verified manifest's).
    version: ModelVersion,
    /// Devices taken into the cohort.
    selected: HashSet<Fingerprint>,
    /// Devices whose update is spooled.
    uploaded: HashSet<Fingerprint>,
    /// The last round forwarded (or given up).
    forwarded: Option<RoundId>,
    /// When a device last joined the cohort (or the round was taken or resumed), system ms.
    last_join: u64,
    /// When the round was taken from the root (or resumed), system ms.
    taken_at: u64,
    /// The root's secure-aggregation settings for the round (its rounds are secure).
    template: Option<SecAggTask>,
    /// The secure cohort, once fixed.
    secure: Option<SecureCohort>,
}

impl Round {
    /// The round still gathering updates.
    fn open(&self) -> Option<&Arc<Task>> {
        self.task
            .as_ref()
            .filter(|t| self.forwarded.is_none_or(|f| f < t.round))
    }
}

impl Default for Round {
    fn default() -> Self {
        Self {
            task: None,
            schema: None,
            version: ModelVersion(0),
            selected: HashSet::new(),
            uploaded: HashSet::new(),
            forwarded: None,
            last_join: 0,
            taken_at: 0,
            template: None,
            secure: None,
        }
    }
}

/// Where a round's cohort stands.
#[derive(Debug, Clone, Copy)]
struct Cohort {
    /// Updates spooled.
    uploaded: usize,
    /// Devices taken.
    selected: usize,
    /// When a device last joined (system ms).
    last_join: u64,
}

/// What to do with a round's cohort now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Due {
    /// Keep gathering.
    Wait,
    /// Forward the partial sum.
    Forward,
    /// The cut-off passed with too few devices: decline the round.
    GiveUp,
}

impl Cohort {
    /// Forward when full; or when every device taken has uploaded (at least `min`) and none joined for
    /// `quiet_ms`; or at the cut-off with at least `min`. Give up at the cut-off with fewer.
    fn due(&self, c: &config::CohortConfig, now: u64, cutoff: u64) -> Due {
        let quiet = self.uploaded >= c.min
            && self.uploaded == self.selected
            && now.saturating_sub(self.last_join) >= c.quiet_ms;
        if self.uploaded >= c.size || quiet || (now >= cutoff && self.uploaded >= c.min) {
            Due::Forward
        } else if now >= cutoff {
            Due::GiveUp
        } else {
            Due::Wait
        }
    }
}

/// Models fetched from the root on devices' behalf.
#[derive(Default)]
struct Cache {
    manifests: HashMap<ModelVersion, starling_protocol::SignedManifest>,
    adapters: Vec<(ModelVersion, Arc<[u8]>)>,
    base: Option<Arc<[u8]>>,
}

/// The aggregator's copy of its devices at the root: whom it admits and whom it refuses as revoked.
#[derive(Debug, Default)]
struct RosterCopy {
    /// The root's roster generation it was read at.
    generation: u64,
    /// Active devices: admitted.
    active: HashSet<Fingerprint>,
    /// Devices revoked at the root: refused as revoked (any other stranger hears "not enrolled").
    revoked: HashSet<Fingerprint>,
}

impl RosterCopy {
    fn new(generation: u64, devices: &RosterDevices) -> Self {
        Self {
            generation,
            active: devices.active.iter().copied().collect(),
            revoked: devices.revoked.iter().copied().collect(),
        }
    }
}

/// A running edge aggregator.
pub struct Aggregator {
    cfg: AggregatorConfig,
    layout: AggregatorLayout,
    spool: Spool,
    fingerprint: Fingerprint,
    root_key: [u8; 32],
    upstream: Upstream,
    clock: crate::service::Clock,
    roster_due: AtomicU64,
    round: Mutex<Round>,
    roster: RwLock<RosterCopy>,
    /// The device endpoint's connections (set once it is bound): a revoked device's are closed.
    control: std::sync::OnceLock<ServerControl>,
    cache: Mutex<Cache>,
    latest: AtomicU64,
    wake: tokio::sync::Notify,
    /// What `/healthz` and `/readyz` report.
    health: crate::service::Health,
    /// What `/metrics` reports.
    metrics: AggregatorMetrics,
}

impl std::fmt::Debug for Aggregator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Aggregator")
            .field("fingerprint", &self.fingerprint)
            .finish()
    }
}

/// The id of an aggregator's partial sum for a round: the same after a restart, so a resend is a
/// duplicate at the root.
fn forward_id(aggregator: &Fingerprint, round: RoundId) -> UpdateId {
    let d = Digest::of(
        &[
            &b"starling forward "[..],
            &aggregator.0[..],
            &round.0.to_be_bytes()[..],
        ]
        .concat(),
    );
    let mut id = [0u8; 16];
    id.copy_from_slice(&d.0[..16]);
    UpdateId(id)
}

impl Aggregator {
    /// Opens an aggregator directory made by `aggregator init`: its configuration, key and spool (with
    /// whatever round and updates it held when it stopped). Must be called inside a tokio runtime.
    pub fn open(dir: &Path) -> Result<Self, AggregatorError> {
        let layout = AggregatorLayout::new(dir);
        let cfg = AggregatorConfig::load(&layout.config())?;
        let key = read_key(&layout.tls_key())?;
        let pin = cfg.pin().map_err(AggregatorError::Setting)?;
        let client = Client::new(&key, pin, resolve(&cfg.root.address)?, limits())?
            .with_software(format!("starling-aggregator {}", env!("CARGO_PKG_VERSION")));
        let upstream = Upstream::Quic {
            client: Box::new(client),
            session: tokio::sync::Mutex::new(None),
        };
        Self::with_upstream(
            layout,
            cfg,
            key.fingerprint(),
            upstream,
            crate::service::Clock::System,
        )
    }

    /// An aggregator in front of a root in this process (the simulator's `[topology]`): its spool in
    /// `dir`, its configuration `cfg` (the root's address and pin unused), `key` enrolled at the root under
    /// the aggregator role (`root` made with `key`'s fingerprint), time read from `clock`. It runs no endpoints and no loop of its own: its
    /// driver calls [`Handler::handle`] for devices and [`Aggregator::poll`] for the work towards the root.
    pub fn local(
        dir: &Path,
        cfg: AggregatorConfig,
        key: &SigningIdentity,
        root: upstream::LocalRoot,
        clock: crate::service::Clock,
    ) -> Result<Self, AggregatorError> {
        let me = key.fingerprint();
        let upstream = Upstream::Local(Arc::new(root));
        Self::with_upstream(AggregatorLayout::new(dir), cfg, me, upstream, clock)
    }

    /// In front of a local root behind a simulated uplink: hands the root the partial sums whose
    /// transfer is over (see [`upstream::LocalRoot::deliver`]); the root's refusals.
    pub async fn deliver(&self) -> Vec<String> {
        match &self.upstream {
            Upstream::Local(l) => l.deliver().await,
            Upstream::Quic { .. } => Vec::new(),
        }
    }

    fn with_upstream(
        layout: AggregatorLayout,
        cfg: AggregatorConfig,
        fingerprint: Fingerprint,
        upstream: Upstream,
        clock: crate::service::Clock,
    ) -> Result<Self, AggregatorError> {
        let spool = Spool::open(&layout.spool())?;
        let root_key = cfg.signing_key().map_err(AggregatorError::Setting)?;
        let mut round = Round {
            forwarded: spool.forwarded()?,
            last_join: clock.now(),
            taken_at: clock.now(),
            ..Round::default()
        };
        if let Some(task) = spool.task()? {
            let manifest = ManifestVerifier::new(vec![root_key])
                .verify(&task.manifest)
                .map_err(|e| AggregatorError::Task {
                    round: task.round,
                    detail: e.to_string(),
                })?;
            round.selected = spool.selected(task.round)?;
            round.uploaded = spool
                .updates(task.round)?
                .into_iter()
                .map(|u| u.client)
                .collect();
            round.schema = Some(manifest.adapter_schema);
            round.version = manifest.version;
            round.template = task.secagg.clone();
            round.secure = spool.secure(task.round)?;
            tracing::info!(
                round = task.round.0,
                selected = round.selected.len(),
                spooled = round.uploaded.len(),
                "resuming the spooled round"
            );
            round.task = Some(Arc::new(task));
        }
        let roster = spool
            .roster()?
            .map(|(g, d)| RosterCopy::new(g, &d))
            .unwrap_or_default();
        Ok(Self {
            cfg,
            layout,
            spool,
            fingerprint,
            root_key,
            upstream,
            clock,
            roster_due: AtomicU64::new(0),
            round: Mutex::new(round),
            roster: RwLock::new(roster),
            control: std::sync::OnceLock::new(),
            cache: Mutex::new(Cache::default()),
            latest: AtomicU64::new(0),
            wake: tokio::sync::Notify::new(),
            health: crate::service::Health::default(),
            metrics: AggregatorMetrics::default(),
        })
    }

    /// The key its devices pin.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// The open round, its cohort, the roster and the root, as JSON (`/api/status`).
    pub fn status_document(&self) -> serde_json::Value {
        let r = self.lock();
        let open = r.open().map(|t| t.round.0);
        let (generation, devices, revoked) = self.roster.read().map_or((0, 0, 0), |r| {
            (r.generation, r.active.len(), r.revoked.len())
        });
        serde_json::json!({
            "name": self.cfg.root.name,
            "fingerprint": self.fingerprint.to_hex(),
            "root": self.cfg.root.address,
            "round": open,
            "version": open.map(|_| r.version.0),
            "cohort_size": self.cfg.cohort.size,
            "selected": if open.is_some() { r.selected.len() } else { 0 },
            "spooled": if open.is_some() { r.uploaded.len() } else { 0 },
            "forwarded": r.forwarded.map(|f| f.0),
            "roster_generation": generation,
            "roster_devices": devices,
            "roster_revoked": revoked,
            "secure": r.template.is_some(),
            "secure_phase": r.secure.as_ref().filter(|_| open.is_some())
                .map(|c| c.state.phase.to_string()),
            "ready": self.health.ready(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Round> {
        self.round.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// When devices must have uploaded and the cohort is forwarded at the latest.
    fn cutoff(&self, task: &Task) -> u64 {
        task.deadline_unix_ms
            .saturating_sub(self.cfg.cohort.forward_margin_ms)
    }

    /// The time on this aggregator's clock, ms since the Unix epoch.
    fn now(&self) -> u64 {
        self.clock.now()
    }

    /// The way to the root, opened if it is not.
    async fn session(&self) -> Result<Up, AggregatorError> {
        let (up, opened) = self.upstream.open().await?;
        if let Some(latest) = opened {
            self.latest.fetch_max(latest.0, Ordering::Relaxed);
            if matches!(up, Up::Session(_)) {
                tracing::info!(root = %self.cfg.root.address, "connected to the root");
            }
        }
        Ok(up)
    }

    /// Forgets a session that failed (the next call reconnects).
    async fn reset_session(&self) {
        self.upstream.reset().await;
    }

    /// Runs the device endpoints and the work towards the root until `shutdown` resolves, then drains.
    /// `on_bound` sees the bound endpoints (to print them).
    pub async fn serve_until(
        self: Arc<Self>,
        on_bound: impl FnOnce(&Server, Option<SocketAddr>),
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), AggregatorError> {
        let key = read_key(&self.layout.tls_key())?;
        let net = &self.cfg.network;
        let server = Server::bind(
            net.listen,
            net.enrol_listen,
            &key,
            self.clone(),
            self.clone(),
            Limits::default(),
            crate::config::enrolment_limits(
                net.enrol_burst_per_address,
                net.enrol_per_address_per_minute,
            )
            .map_err(AggregatorError::Setting)?,
        )?;
        let _ = self.control.set(server.control());
        let (stop_http, stopped) = tokio::sync::oneshot::channel::<()>();
        let http = if net.http {
            let listener = tokio::net::TcpListener::bind(net.http_listen)
                .await
                .map_err(|source| AggregatorError::Io {
                    path: format!("the HTTP endpoint {}", net.http_listen),
                    source,
                })?;
            let addr = listener.local_addr().ok();
            let app = http::router(self.clone());
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
        on_bound(&server, http.as_ref().and_then(|(a, _)| *a));
        self.health.set_ready();
        // The session with the root first (its latest version is what devices are welcomed with); the
        // loop retries if the root is away.
        match tokio::time::timeout(Duration::from_secs(5), self.session()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::info!("the root: {e}; retrying"),
            Err(_) => tracing::info!("the root did not answer within 5 s; retrying"),
        }
        let me = self.clone();
        let work = tokio::spawn(async move { me.upstream_loop().await });
        shutdown.await;
        self.health.set_draining();
        tracing::info!("draining: finishing the exchanges in flight");
        work.abort();
        let left = server
            .drain(
                Duration::from_millis(net.drain_retry_after_ms),
                Duration::from_millis(net.drain_wait_ms),
            )
            .await;
        if left > 0 {
            tracing::warn!(left, "exchanges still in flight when the drain ended");
        }
        self.upstream.close().await;
        let _ = stop_http.send(());
        if let Some((_, task)) = http {
            let _ = task.await;
        }
        tracing::info!("stopped after draining");
        Ok(())
    }

    /// Towards the root, forever: keep the roster fresh, take each round's task, forward each cohort.
    async fn upstream_loop(self: Arc<Self>) {
        let poll = Duration::from_millis(self.cfg.cohort.poll_ms);
        let mut failures = 0u32;
        loop {
            self.health.ticked(self.now());
            match self.poll().await {
                Ok(()) => failures = 0,
                Err(e) => {
                    failures = failures.saturating_add(1);
                    if failures == 1 || failures.is_power_of_two() {
                        tracing::warn!("the root: {e}");
                    }
                    self.reset_session().await;
                }
            }
            // A complete cohort wakes the loop at once.
            let _ = tokio::time::timeout(poll, self.wake.notified()).await;
        }
    }

    /// One pass of the work towards the root (the serving loop runs it every `poll_ms`; an in-process
    /// driver calls it itself): re-read the roster when due, take the root's task for a new round, and
    /// forward the cohort (or decline the round) when its rule says so.
    pub async fn poll(&self) -> Result<(), AggregatorError> {
        let session = self.session().await?;
        let now = self.now();
        if now >= self.roster_due.load(Ordering::Relaxed) {
            self.refresh_roster(&session).await?;
            self.roster_due
                .store(now + self.cfg.cohort.roster_ms, Ordering::Relaxed);
        }
        if let TaskReply::Task(task) = session.request_task().await? {
            self.take_task(*task)?;
        }
        let (open, secure) = {
            let r = self.lock();
            (r.open().cloned(), r.template.is_some())
        };
        let Some(task) = open else {
            return Ok(());
        };
        if secure {
            return self.secure_step(&session, &task).await;
        }
        let (uploaded, selected, last_join) = {
            let r = self.lock();
            (r.uploaded.len(), r.selected.len(), r.last_join)
        };
        let cohort = Cohort {
            uploaded,
            selected,
            last_join,
        };
        let due = cohort.due(&self.cfg.cohort, self.now(), self.cutoff(&task));
        if due == Due::Forward {
            let partial = self.cohort_partial(&task)?;
            self.forward(&session, &task, partial).await?;
        } else if due == Due::GiveUp {
            self.give_up(
                &session,
                &task,
                format!(
                    "edge aggregator: {uploaded} of the {} devices needed",
                    self.cfg.cohort.min
                ),
            )
            .await?;
        }
        Ok(())
    }

    /// One pass over a secure round: fix the cohort once it is full, or quiet with enough devices; close
    /// SecAgg+ phases; forward the unmasked sum, or decline the round when a phase fell short.
    async fn secure_step(&self, session: &Up, task: &Task) -> Result<(), AggregatorError> {
        let now = self.now();
        let c = &self.cfg.cohort;
        let min = c.min.max(MIN_COHORT);
        let tick = {
            let mut guard = self.lock();
            let r = &mut *guard;
            // The cohort forms in the first quarter of the time the round leaves here at most (it is
            // fixed earlier when full, or quiet with enough devices): the rest is for training and the
            // four phases.
            let cutoff = self.cutoff(task);
            let forming_ends = r.taken_at + cutoff.saturating_sub(r.taken_at) / 4;
            match r.secure.as_mut() {
                None => {
                    let n = r.selected.len();
                    let quiet = now.saturating_sub(r.last_join) >= c.quiet_ms;
                    if n >= min && (quiet || now >= forming_ends) {
                        self.fix_cohort(r, task)?;
                        Tick::Wait
                    } else if now >= forming_ends {
                        Tick::Failed(format!(
                            "{n} devices asked for the secure round, {min} needed"
                        ))
                    } else {
                        Tick::Wait
                    }
                }
                Some(cohort) => {
                    let tick = self.change_secure(
                        cohort,
                        |c| c.tick(now, min),
                        |t| matches!(t, Tick::Phase(_)),
                    )?;
                    if let Tick::Phase(phase) = &tick {
                        tracing::info!(round = task.round.0, %phase, "secure cohort phase");
                    }
                    tick
                }
            }
        };
        match tick {
            Tick::Wait | Tick::Phase(_) => Ok(()),
            Tick::Unmasked(partial) => self.forward(session, task, partial).await,
            Tick::Failed(why) => {
                self.give_up(
                    session,
                    task,
                    format!("edge aggregator, secure cohort: {why}"),
                )
                .await
            }
        }
    }

    /// Applies `change` to a copy of `cohort`; when `changed` says the copy differs, stores it (flushed)
    /// and only then puts it in place — what a device hears of is on disk first, and a failed write
    /// leaves the cohort as it was.
    fn change_secure<T>(
        &self,
        cohort: &mut SecureCohort,
        change: impl FnOnce(&mut SecureCohort) -> T,
        changed: impl FnOnce(&T) -> bool,
    ) -> Result<T, SpoolError> {
        let mut next = cohort.clone();
        let out = change(&mut next);
        if changed(&out) {
            self.spool.put_secure(&next)?;
            *cohort = next;
        }
        Ok(out)
    }

    /// Fixes the secure cohort of `task`'s round as the devices taken so far, stored before any device
    /// hears of it.
    fn fix_cohort(&self, r: &mut Round, task: &Task) -> Result<(), AggregatorError> {
        let Some(template) = &r.template else {
            return Ok(());
        };
        let cohort = SecureCohort::fix(
            task.round,
            template,
            r.selected.iter().copied().collect(),
            &self.fingerprint.0,
            self.now(),
            self.cutoff(task),
            self.cfg.cohort.secure_phase_ms,
        )?;
        self.spool.put_secure(&cohort)?;
        tracing::info!(
            round = task.round.0,
            devices = cohort.roster.len(),
            neighbours = cohort.task.params.neighbours,
            threshold = cohort.task.params.threshold,
            modulus_bits = cohort.task.params.bits,
            "secure cohort fixed"
        );
        r.secure = Some(cohort);
        Ok(())
    }

    /// Declines `task`'s round at the root with `reason` and closes it here.
    async fn give_up(
        &self,
        session: &Up,
        task: &Task,
        reason: String,
    ) -> Result<(), AggregatorError> {
        tracing::warn!(round = task.round.0, "declining the round: {reason}");
        let declined = session
            .decline(Decline {
                round: task.round,
                code: ErrorCode::Unavailable,
                reason,
            })
            .await;
        if let Err(e) = declined {
            tracing::info!("declining round {}: {e}", task.round.0);
        }
        bump(&self.metrics.rounds_given_up);
        self.close_round(task.round)
    }

    /// Re-reads the root's roster if it changed.
    async fn refresh_roster(&self, session: &Up) -> Result<(), AggregatorError> {
        let known = self.roster.read().map_or(0, |r| r.generation);
        let r = session.roster(known).await?;
        if let Some(devices) = r.devices {
            let (n, revoked) = (devices.active.len(), devices.revoked.len());
            let copy = RosterCopy::new(r.generation, &devices);
            // Refused from here on; then out of the cohort; only then is the new roster spooled: a
            // restart in between re-reads the old roster, sees the revocation again and repeats the
            // (idempotent) removal, so a spooled update of a revoked device is never forwarded.
            let newly: Vec<Fingerprint> = match self.roster.write() {
                Ok(mut w) => {
                    let newly = copy.revoked.difference(&w.revoked).copied().collect();
                    *w = copy;
                    newly
                }
                Err(_) => Vec::new(),
            };
            for client in newly {
                self.revoked(client)?;
            }
            self.spool.put_roster(r.generation, &devices)?;
            tracing::info!(devices = n, revoked, "roster updated");
        }
        Ok(())
    }

    /// `client` was revoked at the root (and is refused here from now on): its connections close, and
    /// the open cohort stops waiting for it and drops an update it sent — as the root's own round does,
    /// except in a secure cohort past its keys phase, where a masked input is already inside the sum.
    fn revoked(&self, client: Fingerprint) -> Result<(), AggregatorError> {
        let closed = self.control.get().map_or(0, |c| c.disconnect(&client));
        let mut guard = self.lock();
        let r = &mut *guard;
        let Some(round) = r.open().map(|t| t.round) else {
            tracing::info!(client = %client, closed, "revoked at the root");
            return Ok(());
        };
        let left = match r.secure.as_mut() {
            Some(cohort) => {
                self.change_secure(cohort, |c| c.decline(&client), |counted| *counted)?
            }
            None => {
                let left = r.selected.remove(&client);
                if left {
                    self.spool.unselect(round, &client)?;
                }
                if r.uploaded.remove(&client) {
                    self.spool.drop_updates_of(round, &client)?;
                }
                left
            }
        };
        tracing::info!(client = %client, closed, left_the_open_round = left, "revoked at the root");
        Ok(())
    }

    /// Takes the root's task for a round this aggregator has not taken yet (signature checked).
    fn take_task(&self, task: Task) -> Result<(), AggregatorError> {
        {
            let r = self.lock();
            let known = r.task.as_ref().is_some_and(|t| t.round >= task.round)
                || r.forwarded.is_some_and(|f| f >= task.round);
            if known {
                return Ok(());
            }
        }
        let manifest = ManifestVerifier::new(vec![self.root_key])
            .verify(&task.manifest)
            .map_err(|e| AggregatorError::Task {
                round: task.round,
                detail: e.to_string(),
            })?;
        self.spool.put_task(&task)?;
        self.latest.fetch_max(manifest.version.0, Ordering::Relaxed);
        let mut r = self.lock();
        tracing::info!(
            round = task.round.0,
            version = manifest.version.0,
            "round opened at the root"
        );
        r.selected.clear();
        r.uploaded.clear();
        r.last_join = self.now();
        r.taken_at = r.last_join;
        r.schema = Some(manifest.adapter_schema);
        r.version = manifest.version;
        r.template = task.secagg.clone();
        r.secure = None;
        if r.template.is_some() && self.cfg.cohort.size < MIN_COHORT {
            tracing::warn!(
                "the root's rounds are secure and cohort.size is {}: a secure cohort needs {MIN_COHORT}",
                self.cfg.cohort.size,
            );
        }
        r.task = Some(Arc::new(task));
        Ok(())
    }

    /// Marks `round` done here (forwarded or given up) and drops its spooled updates.
    fn close_round(&self, round: RoundId) -> Result<(), AggregatorError> {
        self.spool.set_forwarded(round)?;
        let mut r = self.lock();
        r.forwarded = Some(round);
        r.selected.clear();
        r.uploaded.clear();
        r.secure = None;
        Ok(())
    }

    /// The weighted sum of the spooled cohort of `task`'s round ([`cohort_sum`], the root's own rule).
    fn cohort_partial(&self, task: &Task) -> Result<PartialSum, AggregatorError> {
        let round = task.round;
        let schema = self.lock().schema.clone().ok_or(AggregatorError::Task {
            round,
            detail: "no adapter schema".into(),
        })?;
        let updates = self.spool.updates(round)?;
        let clip = task.dp.user.map(|u| u.clip());
        tokio::task::block_in_place(|| {
            let mut decoded = Vec::with_capacity(updates.len());
            for u in &updates {
                let d = decode_update(&u.body, &schema, &UpdateLimits::default())
                    .map_err(|source| AggregatorError::Update { round, source })?;
                decoded.push((u.num_examples, d, u.train_loss));
            }
            let views: Vec<(ClientUpdate<'_>, f32)> = decoded
                .iter()
                .map(|(n, d, l)| {
                    (
                        ClientUpdate {
                            num_examples: *n,
                            delta: d,
                        },
                        *l,
                    )
                })
                .collect();
            Ok::<_, AggregatorError>(cohort_sum(&views, clip)?)
        })
    }

    /// Forwards the cohort's partial sum of `task`'s round; the round is closed here once the root
    /// acknowledged it (or refused it for good).
    async fn forward(
        &self,
        session: &Up,
        task: &Task,
        sum: PartialSum,
    ) -> Result<(), AggregatorError> {
        crate::failpoint::hit("aggregator-forwarding");
        let round = task.round;
        let (schema, version) = {
            let r = self.lock();
            (r.schema.clone(), r.version)
        };
        let Some(schema) = schema else {
            return Ok(());
        };
        let clip = task.dp.user.map(|u| u.clip());
        let body: Vec<u8> = sum.sum.iter().flat_map(|v| v.to_le_bytes()).collect();
        let header = Forward {
            update_id: forward_id(&self.fingerprint, round),
            round,
            model_version: version,
            schema: schema.hash(),
            count: sum.count as u32,
            weight: sum.weight,
            loss: sum.loss,
            clip,
            body: BulkHeader::describe(&body),
        };
        match session.forward(header, &body).await {
            Ok(ack) => {
                tracing::info!(
                    round = round.0,
                    devices = sum.count,
                    duplicate = ack.duplicate,
                    "forwarded the cohort's partial sum"
                );
                bump(&self.metrics.partials_forwarded);
                self.close_round(round)
            }
            Err(TransportError::Remote {
                code:
                    ErrorCode::LateUpdate
                    | ErrorCode::WrongModelVersion
                    | ErrorCode::SchemaMismatch
                    | ErrorCode::BadRequest,
                message,
            }) => {
                tracing::warn!(
                    round = round.0,
                    "the root refused the partial sum: {message}"
                );
                self.close_round(round)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// A device asks for work: the root's task if the cohort has room (or already holds it).
    fn task_for(&self, client: Fingerprint) -> Response {
        let wait = |reason: String| {
            Response::Message(Message::NoTask(NoTask {
                retry_after_ms: self.cfg.cohort.retry_after_ms,
                reason,
            }))
        };
        let now = self.now();
        let mut r = self.lock();
        let Some(task) = r.open().cloned() else {
            return wait("waiting for the root's next round".into());
        };
        if now >= self.cutoff(&task) {
            return wait(format!("round {} is closing here", task.round.0));
        }
        if r.template.is_some() {
            return self.secure_task_for(&mut r, &task, client, now);
        }
        if r.uploaded.contains(&client) {
            return wait("update already received".into());
        }
        if !r.selected.contains(&client) {
            if r.selected.len() >= self.cfg.cohort.size {
                return wait(format!("round {}'s cohort here is full", task.round.0));
            }
            if let Err(refused) = self.take_into_cohort(&mut r, task.round, client, now, "cohort") {
                return refused;
            }
        }
        let mut t = (*task).clone();
        t.deadline_unix_ms = self.cutoff(&task);
        Response::Message(Message::Task(Box::new(t)))
    }

    /// Takes `client` into `round`'s cohort (stored first); the answer for the device if storage failed.
    fn take_into_cohort(
        &self,
        r: &mut Round,
        round: RoundId,
        client: Fingerprint,
        now: u64,
        what: &str,
    ) -> Result<(), Response> {
        if let Err(e) = self.spool.select(round, &client) {
            tracing::error!("spooling a cohort entry: {e}");
            return Err(Response::error(
                ErrorCode::Unavailable,
                "storage failed; retry",
            ));
        }
        r.selected.insert(client);
        r.last_join = now;
        tracing::info!(
            round = round.0,
            client = %client,
            "device {} of {} taken into the {what}",
            r.selected.len(),
            self.cfg.cohort.size
        );
        Ok(())
    }

    /// A device asks for work in a secure round: while the cohort forms it is taken and told to come
    /// back; once the cohort is fixed (full, or quiet with enough devices) its members get the task with
    /// their part in SecAgg+.
    fn secure_task_for(
        &self,
        r: &mut Round,
        task: &Arc<Task>,
        client: Fingerprint,
        now: u64,
    ) -> Response {
        let wait = |retry_after_ms, reason: String| {
            Response::Message(Message::NoTask(NoTask {
                retry_after_ms,
                reason,
            }))
        };
        let size = self.cfg.cohort.size.max(MIN_COHORT);
        if r.secure.is_none() && !r.selected.contains(&client) {
            if let Err(refused) = self.take_into_cohort(r, task.round, client, now, "secure cohort")
            {
                return refused;
            }
            if r.selected.len() >= size {
                if let Err(e) = self.fix_cohort(r, task) {
                    tracing::error!("fixing the secure cohort: {e}");
                    return Response::error(ErrorCode::Unavailable, "storage failed; retry");
                }
            }
        }
        let Some(cohort) = &r.secure else {
            return wait(
                self.cfg.cohort.retry_after_ms.min(1_000),
                format!(
                    "round {}'s secure cohort is forming here: {} of {size} devices",
                    task.round.0,
                    r.selected.len()
                ),
            );
        };
        match cohort.task_for(&client) {
            Some(sa) => {
                let mut t = (**task).clone();
                t.deadline_unix_ms = cohort.cutoff;
                t.secagg = Some(sa);
                Response::Message(Message::Task(Box::new(t)))
            }
            None if cohort.id(&client).is_some() => wait(
                self.cfg.cohort.retry_after_ms,
                format!("round {}'s secure phases are under way", task.round.0),
            ),
            None => wait(
                self.cfg.cohort.retry_after_ms,
                format!("round {}'s secure cohort here is full", task.round.0),
            ),
        }
    }

    /// A device's SecAgg+ step in the open secure round; a change is stored before the device hears of it.
    fn secagg(&self, client: Fingerprint, request: SecAggRequest) -> Response {
        let mut guard = self.lock();
        let r = &mut *guard;
        let open = r.open().map(|t| t.round);
        let Some(cohort) = r
            .secure
            .as_mut()
            .filter(|c| open == Some(c.round) && c.round == request.round)
        else {
            return Response::error(
                ErrorCode::LateUpdate,
                format!("no secure round {} is open here", request.round.0),
            );
        };
        let retry = self.cfg.cohort.retry_after_ms.min(1_000);
        let stepped = self.change_secure(
            cohort,
            |c| c.step(&client, request.step, retry),
            |o| o.as_ref().is_ok_and(|o| o.changed),
        );
        match stepped {
            Ok(Ok(outcome)) => {
                if outcome.changed {
                    self.wake.notify_one();
                }
                Response::Message(Message::SecAggReply(Box::new(outcome.reply)))
            }
            Ok(Err(e)) => Response::error(ErrorCode::BadRequest, e.to_string()),
            Err(e) => {
                tracing::error!("spooling the secure cohort: {e}");
                Response::error(ErrorCode::Unavailable, "storage failed; retry")
            }
        }
    }

    /// A device's masked input in a secure round: added to the cohort's masked sum, which is stored and
    /// flushed before the ack.
    fn take_masked(
        &self,
        r: &mut Round,
        client: Fingerprint,
        update_id: UpdateId,
        body: &[u8],
    ) -> Response {
        let ack = |duplicate| crate::service::ack(update_id, duplicate);
        let Some(cohort) = r.secure.as_mut() else {
            return Response::error(ErrorCode::BadRequest, "not in this round's secure cohort");
        };
        let now = self.now();
        let taken = self.change_secure(
            cohort,
            |c| c.masked(&client, body, now),
            |m| matches!(m, Ok(Masked::New)),
        );
        match taken {
            Ok(Ok(Masked::Duplicate)) => ack(true),
            Ok(Ok(Masked::New)) => {
                crate::failpoint::hit("aggregator-update-spooled");
                r.uploaded.insert(client);
                self.wake.notify_one();
                ack(false)
            }
            Ok(Err(e @ CohortError::Closed(_))) => {
                Response::error(ErrorCode::LateUpdate, e.to_string())
            }
            Ok(Err(e)) => Response::error(ErrorCode::BadRequest, e.to_string()),
            Err(e) => {
                tracing::error!("spooling a masked input: {e}");
                Response::error(ErrorCode::Unavailable, "storage failed; retry")
            }
        }
    }

    /// A device's update: checked against the open round and the task's schema, spooled and flushed
    /// before the ack.
    fn upload(
        &self,
        client: Fingerprint,
        header: &starling_protocol::message::Upload,
        body: &[u8],
    ) -> Response {
        let reply = self.take_update(client, header, body);
        let counter = match &reply {
            Response::Message(Message::Ack(a)) if a.duplicate => &self.metrics.updates_duplicate,
            Response::Message(Message::Ack(_)) => {
                self.metrics
                    .upload_bytes
                    .fetch_add(body.len() as u64, Ordering::Relaxed);
                &self.metrics.updates_accepted
            }
            _ => &self.metrics.updates_refused,
        };
        bump(counter);
        reply
    }

    fn take_update(
        &self,
        client: Fingerprint,
        header: &starling_protocol::message::Upload,
        body: &[u8],
    ) -> Response {
        let ack = |duplicate| crate::service::ack(header.update_id, duplicate);
        match self.spool.has_update(&header.update_id) {
            Ok(true) => return ack(true),
            Ok(false) => {}
            Err(e) => {
                tracing::error!("reading the spool: {e}");
                return Response::error(ErrorCode::Unavailable, "storage failed; retry");
            }
        }
        let mut r = self.lock();
        let Some(task) = r.open().cloned() else {
            return Response::error(ErrorCode::LateUpdate, "no round is open here");
        };
        if header.round != task.round {
            return Response::error(
                ErrorCode::LateUpdate,
                format!(
                    "round {} is closed; round {} is open",
                    header.round.0, task.round.0
                ),
            );
        }
        if header.model_version != r.version {
            return Response::error(
                ErrorCode::WrongModelVersion,
                format!("round {} trains version {}", task.round.0, r.version.0),
            );
        }
        let Some(schema) = r.schema.clone() else {
            return Response::error(ErrorCode::Unavailable, "the round is not ready; retry");
        };
        if header.schema != schema.hash() {
            return Response::error(ErrorCode::SchemaMismatch, "another adapter schema");
        }
        if r.template.is_some() {
            return self.take_masked(&mut r, client, header.update_id, body);
        }
        if !r.selected.contains(&client) {
            return Response::error(ErrorCode::BadRequest, "not in this round's cohort");
        }
        if r.uploaded.contains(&client) {
            return Response::error(
                ErrorCode::BadRequest,
                "this device's update for the round is already stored",
            );
        }
        if let Err(e) = validate_update(body, &schema, &UpdateLimits::default()) {
            return Response::error(
                ErrorCode::BadRequest,
                format!("update does not decode: {e}"),
            );
        }
        let spooled = SpooledUpdate {
            update_id: header.update_id,
            client,
            num_examples: header.num_examples,
            train_loss: header.metrics.train_loss,
            body: body.to_vec(),
        };
        if let Err(e) = self.spool.put_update(task.round, &spooled) {
            tracing::error!("spooling an update: {e}");
            return Response::error(ErrorCode::Unavailable, "storage failed; retry");
        }
        crate::failpoint::hit("aggregator-update-spooled");
        r.uploaded.insert(client);
        tracing::info!(
            round = task.round.0,
            "update {} of {} spooled",
            r.uploaded.len(),
            self.cfg.cohort.size
        );
        if r.uploaded.len() >= self.cfg.cohort.size {
            self.wake.notify_one();
        }
        ack(false)
    }

    /// A device declines the round: its place in the cohort is freed.
    fn decline(&self, client: Fingerprint, d: &Decline) -> Response {
        tracing::warn!(client = %client, round = d.round.0, code = %d.code, "task declined: {}", d.reason);
        let mut r = self.lock();
        let open = r.open().is_some_and(|t| t.round == d.round);
        if let Some(cohort) = r.secure.as_mut().filter(|_| open) {
            if let Err(e) = self.change_secure(cohort, |c| c.decline(&client), |counted| *counted) {
                tracing::error!("spooling a decline: {e}");
            }
        } else if open && r.selected.remove(&client) {
            if let Err(e) = self.spool.unselect(d.round, &client) {
                tracing::error!("spooling a decline: {e}");
            }
        }
        Response::Message(Message::NoTask(NoTask {
            retry_after_ms: self.cfg.cohort.retry_after_ms,
            reason: "decline recorded".into(),
        }))
    }

    /// A manifest from the cache, or from the root (the device verifies the root's signature itself).
    async fn manifest(&self, version: Option<ModelVersion>) -> Response {
        if let Some(v) = version {
            if let Some(m) = self.cache_lock().manifests.get(&v).cloned() {
                return Response::Message(Message::Manifest(m));
            }
        }
        let fetched = async {
            let s = self.session().await?;
            Ok::<_, AggregatorError>(s.manifest(version).await?)
        }
        .await;
        match fetched {
            Ok(m) => {
                if let Ok(body) = ManifestVerifier::new(vec![self.root_key]).verify(&m) {
                    self.cache_lock().manifests.insert(body.version, m.clone());
                }
                Response::Message(Message::Manifest(m))
            }
            Err(e) => self.upstream_failed(e).await,
        }
    }

    /// A blob from the cache, or fetched from the root once (the device checks it against the manifest).
    async fn fetch(&self, version: ModelVersion, kind: BlobKind) -> Response {
        {
            let c = self.cache_lock();
            let hit = match kind {
                // Every version names the same base bundle.
                BlobKind::Base => c.base.clone(),
                BlobKind::Adapter => c
                    .adapters
                    .iter()
                    .find(|(v, _)| *v == version)
                    .map(|(_, b)| b.clone()),
            };
            if let Some(b) = hit {
                return Response::Blob(b);
            }
        }
        let fetched = async {
            let s = self.session().await?;
            Ok::<_, AggregatorError>(s.fetch(version, kind, MAX_BLOB).await?)
        }
        .await;
        match fetched {
            Ok(bytes) => {
                let bytes: Arc<[u8]> = bytes.into();
                let mut c = self.cache_lock();
                match kind {
                    BlobKind::Base => c.base = Some(bytes.clone()),
                    BlobKind::Adapter => {
                        c.adapters.push((version, bytes.clone()));
                        if c.adapters.len() > CACHED_ADAPTERS {
                            c.adapters.remove(0);
                        }
                    }
                }
                Response::Blob(bytes)
            }
            Err(e) => self.upstream_failed(e).await,
        }
    }

    fn cache_lock(&self) -> MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What a device hears when the root did not answer a request made for it.
    async fn upstream_failed(&self, e: AggregatorError) -> Response {
        match e {
            AggregatorError::Root(TransportError::Remote { code, message }) => {
                Response::error(code, message)
            }
            e => {
                tracing::warn!("the root: {e}");
                self.reset_session().await;
                Response::error(ErrorCode::Unavailable, "the root is unreachable; retry")
            }
        }
    }
}

impl Authorizer for Aggregator {
    fn access(&self, client: &Fingerprint) -> Access {
        match self.roster.read() {
            Ok(r) if r.active.contains(client) => Access::Allowed,
            Ok(r) if r.revoked.contains(client) => Access::Revoked,
            _ => Access::NotEnrolled,
        }
    }
}

impl Handler for Aggregator {
    fn latest_model(&self) -> ModelVersion {
        ModelVersion(self.latest.load(Ordering::Relaxed))
    }

    fn max_upload_bytes(&self) -> u64 {
        self.lock()
            .task
            .as_ref()
            .map_or(64 << 20, |t| t.max_update_bytes)
    }

    async fn handle(&self, client: Fingerprint, request: Request) -> Response {
        match request {
            Request::Task(_) => self.task_for(client),
            Request::Manifest(m) => self.manifest(m.version).await,
            Request::Fetch(f) => self.fetch(f.version, f.kind).await,
            Request::Decline(d) => self.decline(client, &d),
            Request::Upload { header, body } => self.upload(client, &header, &body),
            Request::SecAgg(r) => self.secagg(client, *r),
            Request::Forward { .. } | Request::EnrolFor(_) | Request::Roster(_) => Response::error(
                ErrorCode::BadRequest,
                "an edge aggregator serves devices, not aggregators",
            ),
        }
    }

    async fn enrol(&self, client: Fingerprint, request: Enrol) -> Result<(), ErrorReply> {
        let name = request.name.clone();
        let enrolled = async {
            let s = self.session().await?;
            Ok::<_, AggregatorError>(
                s.enrol_for(EnrolFor {
                    client,
                    enrol: request,
                })
                .await?,
            )
        }
        .await;
        match enrolled {
            Ok(_) => {
                // Kept in the spool's copy too: a restart before the next roster read still admits it.
                let generation = self.roster.write().ok().map(|mut r| {
                    r.active.insert(client);
                    r.generation
                });
                if let Some(generation) = generation {
                    if let Err(e) = self.spool.add_to_roster(generation, &client) {
                        tracing::error!("spooling the roster: {e}");
                    }
                }
                tracing::info!(client = %client, name, "device enrolled at the root");
                Ok(())
            }
            Err(AggregatorError::Root(TransportError::Remote { code, message })) => {
                Err(ErrorReply { code, message })
            }
            Err(e) => {
                tracing::warn!("enrolling a device at the root: {e}");
                self.reset_session().await;
                Err(ErrorReply {
                    code: ErrorCode::Unavailable,
                    message: "the root is unreachable; retry".into(),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cohort_is_forwarded_when_full_quiet_or_cut_off_and_given_up_short() {
        let c = config::CohortConfig {
            size: 10,
            min: 3,
            quiet_ms: 5_000,
            ..config::CohortConfig::default()
        };
        let at = |uploaded, selected, last_join, now| {
            Cohort {
                uploaded,
                selected,
                last_join,
            }
            .due(&c, now, 100_000)
        };
        assert_eq!(at(10, 10, 0, 1_000), Due::Forward, "full");
        assert_eq!(at(4, 4, 1_000, 5_999), Due::Wait, "not quiet long enough");
        assert_eq!(
            at(4, 4, 1_000, 6_000),
            Due::Forward,
            "every device taken uploaded, quiet"
        );
        assert_eq!(
            at(4, 5, 1_000, 60_000),
            Due::Wait,
            "one device still training"
        );
        assert_eq!(
            at(2, 2, 1_000, 60_000),
            Due::Wait,
            "too few to forward early"
        );
        assert_eq!(
            at(4, 5, 1_000, 100_000),
            Due::Forward,
            "the cut-off, enough"
        );
        assert_eq!(
            at(2, 5, 1_000, 100_000),
            Due::GiveUp,
            "the cut-off, too few"
        );
    }
}
