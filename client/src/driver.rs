//! The QUIC driver: runs a device's [`Session`] over `starling-transport` for days. It carries out the
//! session's actions — connect with backoff, ask for tasks, fetch and cache models by digest, check
//! eligibility, train on the local text, persist, upload until acknowledged, decline, wait — and feeds back
//! what happened. It owns the clock, the files (through [`StateDir`]), the threads and the sockets; the
//! session owns every decision.
//!
//! What must never live here: protocol decisions (they are the session's), or training math (crate::train
//! and the model crate).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use starling_model::data::{text_files, TextData};
use starling_model::{bundle, Llama, Tokenizer};
use starling_protocol::message::{BlobKind, Decline, SecAggRequest, Task};
use starling_protocol::{Digest, Manifest, UpdateId};
use starling_transport::client::{refusal, TaskReply};
use starling_transport::{Client, Limits, TransportError};

use crate::config::ClientConfig;
use crate::session::{Action, Event, PendingUpdate, PrepareFailure, Session, SessionConfig};
use crate::state::{StateDir, StateError};
use crate::train::{train_task, training_memory_estimate, TaskTraining};
use starling_protocol::update::adapter_values;

/// Largest base model bundle fetched.
const MAX_BASE_BYTES: u64 = 16 << 30;
/// The longest interval between keep-alive pings.
const KEEP_ALIVE_MAX: Duration = Duration::from_secs(5);
/// Time an eligibility command may take.
const ELIGIBILITY_TIMEOUT: Duration = Duration::from_secs(60);

/// Errors that end a run (everything else is retried or reported to the session).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The state directory failed (a full disk shows here).
    #[error(transparent)]
    State(#[from] StateError),
    /// The configuration is unusable.
    #[error("{0}")]
    Config(String),
    /// The QUIC endpoint could not be created.
    #[error("transport: {0}")]
    Transport(#[from] TransportError),
    /// The local text could not be read.
    #[error("local data: {0}")]
    Data(String),
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOutcome {
    /// Why it stopped.
    pub reason: String,
    /// Whether the stop is an error (revoked, not enrolled, untrusted coordinator).
    pub error: bool,
}

/// What a run needs besides the state directory.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Text files or directories of `.txt` files to train on.
    pub data: Vec<PathBuf>,
    /// Show a progress bar while training (when stdout is a terminal).
    pub progress_bar: bool,
    /// Wait this long before asking again after a refusal or an ineligible check.
    pub retry_ms: u64,
    /// Reproducible training (experiments and tests only): each round's batches from this seed and the
    /// round id instead of the OS. Tasks with DP-SGD ignore it — a known seed would make their noise
    /// predictable.
    pub training_seed: Option<u64>,
}

/// Milliseconds since the Unix epoch.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Minutes since local midnight.
fn local_minute() -> u16 {
    use chrono::Timelike;
    let t = chrono::Local::now();
    (t.hour() * 60 + t.minute()) as u16
}

/// Resolves `host:port` (a name or an address).
pub fn resolve(addr: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    addr.to_socket_addrs()
        .map_err(|e| format!("{addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr}: no address"))
}

/// The transport limits of a configuration.
pub fn limits(cfg: &ClientConfig) -> Limits {
    let idle = Duration::from_secs(cfg.network.idle_timeout_s);
    Limits {
        idle_timeout: idle,
        // A ping every few seconds at most: a restarted coordinator answers the next one with a stateless
        // reset (its reset key survives restarts), so a device notices within seconds and reconnects.
        keep_alive: (idle / 4).min(KEEP_ALIVE_MAX),
        exchange_timeout: Duration::from_secs(cfg.network.exchange_timeout_s),
        ..Limits::default()
    }
}

/// The loaded base model and the local text tokenized for it.
struct Loaded {
    base: Digest,
    model: Llama,
    tokens: Vec<u32>,
}

/// A device's runtime: state directory, configuration, key, caches.
pub struct Runtime {
    dir: StateDir,
    cfg: ClientConfig,
    opts: RunOptions,
    files: Vec<PathBuf>,
    loaded: Option<Loaded>,
    stop: Arc<AtomicBool>,
}

impl Runtime {
    /// Opens an enrolled state directory.
    pub fn open(dir: StateDir, opts: RunOptions) -> Result<Self, RunError> {
        if !dir.is_enrolled() {
            return Err(StateError::NotEnrolled(dir.root().display().to_string()).into());
        }
        let cfg = ClientConfig::load(&dir.config()).map_err(|e| RunError::Config(e.to_string()))?;
        let files = text_files(&opts.data).map_err(|e| RunError::Data(e.to_string()))?;
        Ok(Self {
            dir,
            cfg,
            opts,
            files,
            loaded: None,
            stop: Arc::new(AtomicBool::new(false)),
        })
    }

    fn session_config(&self) -> Result<SessionConfig, RunError> {
        let key = self.cfg.signing_key().map_err(RunError::Config)?;
        let p = &self.cfg.privacy;
        Ok(SessionConfig {
            signing_keys: vec![key],
            max_epsilon: (p.max_epsilon > 0.0).then_some(p.max_epsilon),
            delta: p.delta,
            accountant: p.accountant,
            window: self.cfg.window(),
            backoff_base_ms: self.cfg.network.backoff_base_ms,
            backoff_max_ms: self.cfg.network.backoff_max_ms,
            seed: now_ms(),
            retry_ms: self.opts.retry_ms,
        })
    }

    /// Runs the device until the session stops or `shutdown` resolves (SIGTERM, Ctrl-C).
    pub async fn run(
        mut self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<RunOutcome, RunError> {
        if self.cfg.device.threads > 0 {
            // Sizes the training engine's pool; fails only if a pool already exists (then it is kept).
            let _ = rayon::ThreadPoolBuilder::new()
                .num_threads(self.cfg.device.threads)
                .build_global();
        }
        let key = self.dir.load_key()?;
        let addr = resolve(&self.cfg.coordinator.address).map_err(RunError::Config)?;
        let pin = self.cfg.pin().map_err(RunError::Config)?;
        let client = Client::new(&key, pin, addr, limits(&self.cfg))?
            .with_software(format!("starling-client {}", env!("CARGO_PKG_VERSION")));
        // Secure rounds' keys come from a fresh seed drawn from the OS-seeded CSPRNG at every start.
        let session = Session::new(self.session_config()?, self.dir.load_progress()?)
            .with_entropy(rand::random());
        let stop = self.stop.clone();
        tokio::pin!(shutdown);
        let work = self.drive(session, &client);
        tokio::pin!(work);
        let out = tokio::select! {
            r = &mut work => r,
            () = &mut shutdown => {
                stop.store(true, Ordering::SeqCst);
                tracing::info!("shutting down");
                Ok(RunOutcome { reason: "shut down".into(), error: false })
            }
        };
        client.close().await;
        out
    }

    async fn drive(
        &mut self,
        mut session: Session,
        client: &Client,
    ) -> Result<RunOutcome, RunError> {
        let mut conn: Option<starling_transport::Session> = None;
        let mut events = VecDeque::from([Event::Start]);
        while let Some(event) = events.pop_front() {
            for action in session.handle(now_ms(), event) {
                match action {
                    Action::Persist => {
                        self.dir.save_progress(session.progress())?;
                        if session.progress().pending.is_some() {
                            starling_cli::failpoint::hit("update-persisted");
                        }
                    }
                    Action::Stop { reason, error } => {
                        if let Some(c) = conn.take() {
                            let _ = c.goodbye(&reason).await;
                        }
                        return Ok(RunOutcome { reason, error });
                    }
                    Action::Wait { until } => {
                        let delay = until.saturating_sub(now_ms());
                        tokio::time::sleep(Duration::from_millis(delay)).await;
                        events.push_back(Event::Timer);
                    }
                    Action::Connect => events.push_back(
                        match tokio::time::timeout(
                            Duration::from_secs(self.cfg.network.connect_timeout_s),
                            client.connect(),
                        )
                        .await
                        .unwrap_or_else(|_| {
                            Err(TransportError::Timeout(Duration::from_secs(
                                self.cfg.network.connect_timeout_s,
                            )))
                        }) {
                            Ok(s) => {
                                let id = s.welcome().client_id;
                                tracing::info!(latest = s.welcome().latest_model.0, "connected");
                                conn = Some(s);
                                Event::Connected { client_id: id }
                            }
                            Err(e) => disconnected(&e),
                        },
                    ),
                    Action::DiscardPending { round } => {
                        let path = self.dir.pending(round);
                        if let Err(e) = std::fs::remove_file(&path) {
                            if e.kind() != std::io::ErrorKind::NotFound {
                                tracing::warn!("removing {}: {e}", path.display());
                            }
                        }
                    }
                    Action::CheckEligibility => events.push_back(self.eligibility().await),
                    Action::Mask { round, state } => {
                        events.push_back(self.mask(&session, round, &state));
                    }
                    Action::Train {
                        task,
                        manifest,
                        dp_sampling_rate,
                    } => events.push_back(
                        self.train(&session, &task, &manifest, dp_sampling_rate)
                            .await?,
                    ),
                    other => {
                        let Some(c) = conn.as_ref() else {
                            events.push_back(Event::Disconnected {
                                error: "not connected".into(),
                                refusal: None,
                            });
                            continue;
                        };
                        let ev = self.exchange(c, other).await;
                        if matches!(ev, Event::Disconnected { .. }) {
                            conn = None;
                        }
                        events.push_back(ev);
                    }
                }
            }
        }
        Ok(RunOutcome {
            reason: "session ended".into(),
            error: false,
        })
    }

    /// The actions that talk to the coordinator over an open session.
    async fn exchange(&mut self, c: &starling_transport::Session, action: Action) -> Event {
        let reply = match action {
            Action::RequestTask { held } => match c.request_task(held).await {
                Ok(TaskReply::Task(task)) => {
                    tracing::info!(round = task.round.0, "task offered");
                    return Event::TaskOffered {
                        task,
                        local_minute: local_minute(),
                    };
                }
                Ok(TaskReply::NoTask(n)) => {
                    tracing::debug!("no task: {}", n.reason);
                    return Event::NoTask {
                        retry_after_ms: n.retry_after_ms,
                    };
                }
                Err(e) => e,
            },
            Action::Decline {
                round,
                code,
                reason,
            } => match c
                .decline(Decline {
                    round,
                    code,
                    reason,
                })
                .await
            {
                Ok(n) => {
                    return Event::NoTask {
                        retry_after_ms: n.retry_after_ms,
                    }
                }
                Err(e) => e,
            },
            Action::SecAgg { round, step } => match c.secagg(SecAggRequest { round, step }).await {
                Ok(reply) => return Event::SecAgg(reply),
                Err(e) => e,
            },
            Action::Upload(p) => match self.upload(c, &p).await {
                Ok(ev) => return ev,
                Err(e) => e,
            },
            Action::Prepare {
                task,
                manifest,
                fetch_adapter,
            } => return self.prepare(c, &task, &manifest, fetch_adapter).await,
            other => {
                return Event::Disconnected {
                    error: format!("driver cannot carry out {other:?} here"),
                    refusal: None,
                }
            }
        };
        transport_event(&reply)
    }

    /// Masks the pending update of a secure round in place (see [`Action::Mask`]).
    fn mask(&self, session: &Session, round: u64, state: &starling_secagg::ClientState) -> Event {
        let fail = |error: String| Event::MaskFailed { error };
        let Some(p) = session
            .progress()
            .pending
            .as_ref()
            .filter(|p| p.round == round)
        else {
            return fail(format!("no pending update for round {round}"));
        };
        let body = match self.pending_body(p) {
            Ok(b) => b,
            Err(e) => return fail(e),
        };
        let masked = match crate::secure::mask_body(state, &body) {
            Ok(m) => m,
            Err(e) => return fail(e.to_string()),
        };
        if let Err(e) = crate::state::write_atomic(&self.dir.pending(round), &masked) {
            return fail(e.to_string());
        }
        Event::Masked {
            body_size: masked.len() as u64,
            body_digest: Digest::of(&masked).to_hex(),
        }
    }

    /// The stored body of a pending update, checked against its recorded size and digest.
    fn pending_body(&self, p: &PendingUpdate) -> Result<Vec<u8>, String> {
        let path = self.dir.pending(p.body_round());
        match self.dir.read(&path, p.body_size) {
            Ok(b) if Digest::of(&b).to_hex() == p.body_digest => Ok(b),
            other => {
                let why = other
                    .err()
                    .map_or("digest differs".to_string(), |e| e.to_string());
                Err(format!("stored update {}: {why}", path.display()))
            }
        }
    }

    async fn upload(
        &self,
        c: &starling_transport::Session,
        p: &PendingUpdate,
    ) -> Result<Event, TransportError> {
        let body = match self.pending_body(p) {
            Ok(b) => b,
            // The stored update is gone or damaged: it can never be sent as computed.
            Err(message) => {
                return Ok(Event::Refused {
                    code: starling_protocol::ErrorCode::BadRequest,
                    message,
                })
            }
        };
        let Some(upload) = p.upload_header(&body) else {
            return Ok(Event::Refused {
                code: starling_protocol::ErrorCode::BadRequest,
                message: "stored update metadata is malformed".into(),
            });
        };
        tracing::info!(round = p.round, bytes = body.len(), "uploading update");
        let ack = c.upload(upload, &body).await?;
        Ok(Event::Acked {
            update_id: ack.update_id,
        })
    }

    /// Makes the task's model ready (see [`Action::Prepare`]).
    async fn prepare(
        &mut self,
        c: &starling_transport::Session,
        task: &Task,
        manifest: &Manifest,
        fetch_adapter: bool,
    ) -> Event {
        let fail = |error: String, kind| Event::PrepareFailed { error, kind };
        let base_dir = self.dir.base(&manifest.base_digest);
        let marker = base_dir.join(".bundle-sha256");
        if !marker.is_file() {
            tracing::info!(digest = %manifest.base_digest, "fetching the base model");
            let bytes = match c
                .fetch(manifest.version, BlobKind::Base, MAX_BASE_BYTES)
                .await
            {
                Ok(b) => b,
                Err(e) => return transport_prepare_failure(&e),
            };
            let actual = Digest::of(&bytes);
            if actual != manifest.base_digest {
                return fail(
                    format!(
                        "base model digest {actual} is not the signed {}",
                        manifest.base_digest
                    ),
                    PrepareFailure::Tampered,
                );
            }
            let tmp = base_dir.with_extension("partial");
            let _ = std::fs::remove_dir_all(&tmp);
            let written = bundle::unpack_to_dir(&bytes, &tmp)
                .map_err(|e| e.to_string())
                .and_then(|()| {
                    crate::state::write_atomic(
                        &tmp.join(".bundle-sha256"),
                        manifest.base_digest.to_hex().as_bytes(),
                    )
                    .map_err(|e| e.to_string())
                })
                .and_then(|()| std::fs::rename(&tmp, &base_dir).map_err(|e| e.to_string()));
            if let Err(e) = written {
                return fail(
                    format!("storing the base model: {e}"),
                    PrepareFailure::Local,
                );
            }
        }
        let quant = match starling_model::checkpoint::stored_quant(&base_dir) {
            Ok(q) => q,
            Err(e) => return fail(format!("base model: {e}"), PrepareFailure::Local),
        };
        let config = match starling_model::LlamaConfig::from_hf_file(&base_dir.join("config.json"))
        {
            Ok(c) => c,
            Err(e) => return fail(format!("base model: {e}"), PrepareFailure::Local),
        };
        let threads = match self.cfg.device.threads {
            0 => rayon::current_num_threads(),
            n => n,
        };
        let resident = quant.unwrap_or(self.cfg.device.quant);
        let need = training_memory_estimate(&config, resident, task, threads);
        let max = self.cfg.device.max_memory_mb.saturating_mul(1 << 20);
        if max > 0 && need > max {
            return fail(
                format!(
                    "the task needs about {} MB ({} parameters at {resident}, {threads} threads), more than max_memory_mb = {}",
                    need >> 20,
                    config.num_parameters(),
                    self.cfg.device.max_memory_mb
                ),
                PrepareFailure::Decline(starling_protocol::ErrorCode::TooLarge),
            );
        }
        if self.loaded.as_ref().map(|l| l.base) != Some(manifest.base_digest) {
            self.loaded = None;
            let load = || -> Result<Loaded, String> {
                let device = self.cfg.device.backend.device();
                let ask = if quant.is_none() {
                    Some(self.cfg.device.quant)
                } else {
                    None
                };
                let model = Llama::load(&base_dir, ask, &device).map_err(|e| e.to_string())?;
                let tok = Tokenizer::for_model_dir(&base_dir, model.config.vocab_size)
                    .map_err(|e| e.to_string())?;
                // Chat data (*.jsonl) is rendered with the base model's template (it travels in
                // the bundle) and trains on assistant turns only.
                let chat = starling_model::chat::ChatTemplate::load(&base_dir)
                    .map_err(|e| e.to_string())?;
                let data = TextData::load(&self.files, &tok, 0.0, chat.as_ref())
                    .map_err(|e| e.to_string())?;
                Ok(Loaded {
                    base: manifest.base_digest,
                    model,
                    tokens: data.train,
                })
            };
            match load() {
                Ok(l) => {
                    tracing::info!(
                        tokens = l.tokens.len(),
                        storage = %l.model.quant,
                        "base model loaded and local text tokenized"
                    );
                    self.loaded = Some(l)
                }
                Err(e) => return fail(e, PrepareFailure::Local),
            }
        }
        let train_tokens = self.loaded.as_ref().map_or(0, |l| l.tokens.len() as u64);
        let adapter = if fetch_adapter {
            let cached = self.dir.adapter(&manifest.adapter_digest);
            let max = manifest.adapter_schema.num_params() as u64 * 4;
            let bytes = match self.dir.read(&cached, max) {
                Ok(b) if Digest::of(&b) == manifest.adapter_digest => b,
                _ => match c.fetch(manifest.version, BlobKind::Adapter, max).await {
                    Ok(b) => b,
                    Err(e) => return transport_prepare_failure(&e),
                },
            };
            // Stored only when it is what the manifest names; the session verifies it either way.
            if Digest::of(&bytes) == manifest.adapter_digest {
                if let Err(e) = crate::state::write_atomic(&cached, &bytes) {
                    return fail(format!("storing the adapter: {e}"), PrepareFailure::Local);
                }
            }
            Some(bytes)
        } else {
            None
        };
        Event::Prepared {
            adapter,
            train_tokens,
        }
    }

    async fn eligibility(&self) -> Event {
        let cmd = self.cfg.device.eligibility_command.trim();
        if cmd.is_empty() {
            return Event::Eligibility {
                allowed: true,
                detail: String::new(),
            };
        }
        let run = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .kill_on_drop(true)
            .output();
        match tokio::time::timeout(ELIGIBILITY_TIMEOUT, run).await {
            Ok(Ok(out)) => Event::Eligibility {
                allowed: out.status.success(),
                detail: format!(
                    "eligibility command exited with {}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stdout).trim()
                ),
            },
            Ok(Err(e)) => Event::Eligibility {
                allowed: false,
                detail: format!("eligibility command failed to start: {e}"),
            },
            Err(_) => Event::Eligibility {
                allowed: false,
                detail: format!("eligibility command ran past {ELIGIBILITY_TIMEOUT:?}"),
            },
        }
    }

    async fn train(
        &mut self,
        session: &Session,
        task: &Task,
        manifest: &Manifest,
        dp_sampling_rate: Option<f64>,
    ) -> Result<Event, RunError> {
        let failed = |error: String| Ok(Event::TrainingFailed { error });
        let Some(held) = session.progress().held.as_ref() else {
            return failed("no model held".into());
        };
        let Some(digest) = held.adapter() else {
            return failed("held adapter digest is malformed".into());
        };
        let bytes = match self.dir.read(
            &self.dir.adapter(&digest),
            manifest.adapter_schema.num_params() as u64 * 4,
        ) {
            Ok(b) if Digest::of(&b) == digest => b,
            Ok(_) => return failed("the cached adapter no longer matches its digest".into()),
            Err(e) => return failed(e.to_string()),
        };
        let start = match adapter_values(&bytes) {
            Ok(v) => v,
            Err(e) => return failed(e.to_string()),
        };
        let Some(loaded) = self.loaded.take() else {
            return failed("the base model is not loaded".into());
        };
        let (task_c, manifest_c, stop) = (task.clone(), manifest.clone(), self.stop.clone());
        tracing::info!(
            round = task.round.0,
            version = manifest.version.0,
            steps = task.params.local_steps,
            dp_sgd = task.dp.dp_sgd.is_some(),
            "training"
        );
        let bar = self
            .opts
            .progress_bar
            .then(|| progress_bar(task.params.local_steps));
        let bar2 = bar.clone();
        let precision = self.cfg.device.precision;
        let training_seed = self.opts.training_seed;
        let joined = tokio::task::spawn_blocking(move || {
            let t = TaskTraining {
                model: &loaded.model,
                task: &task_c,
                manifest: &manifest_c,
                start: &start,
                tokens: &loaded.tokens,
                dp_sampling_rate,
                // DP-SGD's noise must never come from a seed someone else may know.
                seed: training_seed
                    .filter(|_| task_c.dp.dp_sgd.is_none())
                    .map(|s| s ^ task_c.round.0.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
                precision,
            };
            let r = train_task(&t, |step, loss| {
                if let Some(b) = &bar2 {
                    b.set_position(u64::from(step));
                    b.set_message(format!("loss {loss:.4}"));
                }
                !stop.load(Ordering::SeqCst)
            });
            (r, loaded)
        })
        .await;
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        let (result, loaded) = match joined {
            Ok(x) => x,
            Err(e) => return failed(format!("training thread: {e}")),
        };
        self.loaded = Some(loaded);
        let trained = match result {
            Ok(t) => t,
            Err(e) => return failed(e.to_string()),
        };
        let mut id = [0u8; 16];
        if let Err(e) = starling_protocol::identity::os_random(&mut id) {
            return failed(e.to_string());
        }
        // The body is on disk before the session persists the progress that names it.
        crate::state::write_atomic(&self.dir.pending(task.round.0), &trained.body)?;
        Ok(Event::Trained(Box::new(trained.pending(
            task.round.0,
            UpdateId(id),
            manifest,
        ))))
    }
}

fn progress_bar(steps: u32) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(u64::from(steps));
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "training {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
    ) {
        bar.set_style(style);
    }
    bar
}

/// The session event for a failed exchange: a typed refusal, or a lost connection.
pub fn transport_event(e: &TransportError) -> Event {
    match e {
        TransportError::Remote { code, message } if refusal(e).is_none() => Event::Refused {
            code: *code,
            message: message.clone(),
        },
        _ => disconnected(e),
    }
}

/// The session event for a failed connection (with the refusal it is, if permanent).
pub fn disconnected(e: &TransportError) -> Event {
    if let Some(after) = starling_transport::client::come_back_after(e) {
        return Event::Drained {
            retry_after_ms: after.as_millis() as u64,
        };
    }
    Event::Disconnected {
        error: e.to_string(),
        refusal: refusal(e),
    }
}

/// The session event for a failed model fetch: tampered bytes, a refusal, or a transient failure.
pub fn transport_prepare_failure(e: &TransportError) -> Event {
    match e {
        TransportError::Protocol(
            starling_protocol::ProtocolError::DigestMismatch { .. }
            | starling_protocol::ProtocolError::BulkDigestMismatch { .. },
        ) => Event::PrepareFailed {
            error: e.to_string(),
            kind: PrepareFailure::Tampered,
        },
        TransportError::Remote { .. } if refusal(e).is_none() => Event::PrepareFailed {
            error: e.to_string(),
            kind: PrepareFailure::Local,
        },
        _ if refusal(e).is_some() => disconnected(e),
        _ => Event::PrepareFailed {
            error: e.to_string(),
            kind: PrepareFailure::Transient,
        },
    }
}
