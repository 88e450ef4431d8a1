//! Operator commands on a coordinator directory: `init`, `enrol`, `revoke`, `clients`, `status`, `pause`,
//! `resume`, `set-rounds`, `backup`, `restore`, `export`. Those that change or read a serving
//! coordinator go through its admin socket ([`crate::admin`]) when a `serve` answers there, and open the
//! store themselves when none does (sled locks the store while `serve` holds it).

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use starling_model::{Backend, Llama, LoraAdapter};
use starling_protocol::manifest::{DpRecord, Manifest};
use starling_protocol::{
    AdapterSchema, Digest, EnrolmentToken, Fingerprint, ModelVersion, RoundId, SigningIdentity,
};

use crate::admin::{AdminRequest, RoundSettings};
use crate::config::CoordinatorConfig;
use crate::service::{now_ms, read_key, Layout};
use crate::store::{manifest_body, ClientRole, PendingToken, PublishedModel, Store};
use crate::strategy::StrategyState;
use starling_protocol::update::{adapter_bytes, adapter_values};

/// Writes a new owner-only file (keys), synced to disk.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

/// The LoRA adapter of `cfg` for the base model in `base`, initialised from the configured seed.
pub fn initial_adapter(
    base: &Path,
    cfg: &CoordinatorConfig,
) -> anyhow::Result<(Llama, LoraAdapter)> {
    let device = Backend::default().device();
    let model = Llama::load(base, None, &device)
        .with_context(|| format!("loading base model {}", base.display()))?;
    let lora = cfg.adapter.lora_config()?;
    let adapter = LoraAdapter::new(&model.config, lora, &device, cfg.adapter.seed);
    Ok((model, adapter))
}

/// The protocol schema of an adapter.
pub fn schema_of(adapter: &LoraAdapter) -> anyhow::Result<AdapterSchema> {
    Ok(AdapterSchema::from_matrices(adapter.specs())?)
}

/// What `init` created.
#[derive(Debug)]
pub struct InitReport {
    /// The fingerprint clients pin.
    pub tls_fingerprint: Fingerprint,
    /// The model-signing public key clients trust.
    pub signing_key: [u8; 32],
    /// Trainable values of the adapter.
    pub adapter_params: usize,
}

/// Creates a coordinator directory: configuration, keys, store, base model copy and signed version 0.
pub fn init(dir: &Path, base_model: &Path, config: Option<&Path>) -> anyhow::Result<InitReport> {
    let (cfg, text) = match config {
        Some(p) => (CoordinatorConfig::load(p)?, std::fs::read_to_string(p)?),
        None => (
            CoordinatorConfig::default(),
            CoordinatorConfig::default_toml(),
        ),
    };
    init_with(dir, base_model, &cfg, &text, now_ms())
}

/// [`init`] with a configuration in hand (`text` is written as coordinator.toml) and version 0 dated `now`
/// (the simulator's clock).
pub fn init_with(
    dir: &Path,
    base_model: &Path,
    cfg: &CoordinatorConfig,
    text: &str,
    now: u64,
) -> anyhow::Result<InitReport> {
    let layout = Layout::new(dir);
    if layout.config().exists() || layout.store().exists() {
        bail!("{} already holds a coordinator", dir.display());
    }
    std::fs::create_dir_all(dir.join("keys"))?;
    std::fs::create_dir_all(layout.base())?;
    for name in starling_model::bundle::FILES {
        let src = base_model.join(name);
        if src.exists() {
            std::fs::copy(&src, layout.base().join(name))
                .with_context(|| format!("copying {}", src.display()))?;
        }
    }
    let (_, adapter) = initial_adapter(&layout.base(), cfg)?;
    let schema = schema_of(&adapter)?;
    // Devices fetch the base as one bundle (config, weights, tokenizer, chat template); version 0 signs
    // its digest.
    let bundle =
        starling_model::bundle::pack_dir(&layout.base()).context("bundling the base model")?;
    let tls = SigningIdentity::generate()?;
    let signing = SigningIdentity::generate()?;
    write_private(&layout.tls_key(), &tls.pkcs8_der())?;
    write_private(&layout.signing_key(), &signing.pkcs8_der())?;
    std::fs::write(layout.config(), text)?;
    let bytes = adapter_bytes(&adapter.to_flat());
    let manifest = Manifest {
        version: ModelVersion(0),
        parent_digest: None,
        base_digest: Digest::of(&bundle),
        adapter_digest: Digest::of(&bytes),
        adapter_schema: schema,
        round: RoundId(0),
        strategy: "init".into(),
        dp: DpRecord::OFF,
        created_at_unix_ms: now,
    };
    let store = Store::create(&layout.store())?;
    let model = PublishedModel {
        manifest: manifest.sign(&signing),
        adapter: bytes,
    };
    store.publish(
        ModelVersion(0),
        &model,
        None,
        None,
        &StrategyState::default(),
    )?;
    Ok(InitReport {
        tls_fingerprint: tls.fingerprint(),
        signing_key: signing.public_key(),
        adapter_params: adapter.num_parameters(),
    })
}

/// A fresh enrolment: the one-time token (shown once) and what the device pins and trusts.
#[derive(Debug)]
pub struct Enrolled {
    /// The device's name.
    pub name: String,
    /// The one-time token.
    pub token: EnrolmentToken,
    /// The coordinator's TLS fingerprint devices pin.
    pub fingerprint: Fingerprint,
    /// The model-signing key devices trust.
    pub signing_key: [u8; 32],
}

impl Enrolled {
    /// As `enrol --json` prints it.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name, "token": self.token.as_str(), "fingerprint": self.fingerprint.to_hex(),
            "signing_key": starling_protocol::hex(&self.signing_key),
        })
    }

    /// From what [`Enrolled::json`] wrote (the answer of a running `serve`).
    pub fn from_json(v: &serde_json::Value) -> anyhow::Result<Self> {
        let s = |k: &str| {
            v[k].as_str()
                .with_context(|| format!("the enrolment has no {k}"))
        };
        let key = starling_protocol::key_from_hex(s("signing_key")?)
            .context("the enrolment's signing key is not 32 bytes of hex")?;
        Ok(Self {
            name: s("name")?.to_string(),
            token: EnrolmentToken::parse(s("token")?)?,
            fingerprint: Fingerprint::from_hex(s("fingerprint")?)?,
            signing_key: key,
        })
    }
}

/// Issues an enrolment token in an open `store` of the coordinator laid out as `layout`.
pub fn enrol_in(
    store: &Store,
    layout: &Layout,
    name: &str,
    role: ClientRole,
) -> anyhow::Result<Enrolled> {
    if name.trim().is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
        bail!("a device name must be 1 to 128 printable characters");
    }
    let (token, hash) = EnrolmentToken::generate()?;
    store.add_token_for(
        hash,
        &PendingToken {
            name: name.to_string(),
            created_at: now_ms(),
        },
        role,
    )?;
    Ok(Enrolled {
        name: name.to_string(),
        token,
        fingerprint: read_key(&layout.tls_key())?.fingerprint(),
        signing_key: read_key(&layout.signing_key())?.public_key(),
    })
}

/// A fresh one-time enrolment token for a device (or, with `role`, an edge aggregator) called `name` —
/// through the running `serve` if there is one (its admin socket), else in the store directly.
pub fn enrol(dir: &Path, name: &str, role: ClientRole) -> anyhow::Result<Enrolled> {
    let request = AdminRequest::Enrol {
        name: name.into(),
        role,
    };
    if let Some(v) = live(dir, &request)? {
        return Enrolled::from_json(&v);
    }
    let layout = Layout::new(dir);
    enrol_in(&open_store(&layout)?, &layout, name, role)
}

/// Revokes a client of an open `store` given its fingerprint (hex) or its unique name.
pub fn revoke_in(store: &Store, who: &str) -> anyhow::Result<Fingerprint> {
    let fp = match Fingerprint::from_hex(who) {
        Ok(fp) => fp,
        Err(_) => {
            let matches: Vec<_> = store
                .clients()?
                .into_iter()
                .filter(|c| c.name == who)
                .collect();
            match matches.as_slice() {
                [one] => one.fingerprint,
                [] => bail!("no client named {who:?} (give its name or 64-hex fingerprint)"),
                _ => bail!(
                    "{} clients are named {who:?}: give the fingerprint",
                    matches.len()
                ),
            }
        }
    };
    if !store.revoke(&fp)? {
        bail!("no client with fingerprint {fp}");
    }
    Ok(fp)
}

/// Revokes a client by fingerprint or unique name: through the running `serve` (its connections close
/// at once and the open round stops waiting for it), else in the store (its next handshake is refused).
pub fn revoke(dir: &Path, who: &str) -> anyhow::Result<serde_json::Value> {
    let request = AdminRequest::Revoke { client: who.into() };
    if let Some(v) = live(dir, &request)? {
        return Ok(v);
    }
    let fp = revoke_in(&open_store(&Layout::new(dir))?, who)?;
    Ok(serde_json::json!({ "revoked": fp.to_hex(), "connections_closed": 0 }))
}

/// The enrolled devices of an open `store`, as JSON.
pub fn clients_in(store: &Store) -> anyhow::Result<serde_json::Value> {
    let clients: Vec<serde_json::Value> = store
        .clients()?
        .iter()
        .map(crate::status::client_json)
        .collect();
    Ok(serde_json::json!({ "clients": clients }))
}

/// The enrolled devices (live or from the store).
pub fn clients(dir: &Path) -> anyhow::Result<serde_json::Value> {
    if let Some(v) = live(dir, &AdminRequest::Clients)? {
        return Ok(v);
    }
    clients_in(&open_store(&Layout::new(dir))?)
}

/// Pauses (`true`) or resumes rounds: live, or recorded in the store for the next `serve`.
pub fn pause(dir: &Path, paused: bool) -> anyhow::Result<serde_json::Value> {
    let request = if paused {
        AdminRequest::Pause
    } else {
        AdminRequest::Resume
    };
    if let Some(v) = live(dir, &request)? {
        return Ok(v);
    }
    open_store(&Layout::new(dir))?.set_paused(paused)?;
    Ok(serde_json::json!({ "paused": paused, "round_open": null }))
}

/// Changes round settings from the next round on: live, or recorded in the store for the next `serve`.
pub fn set_rounds(dir: &Path, settings: &RoundSettings) -> anyhow::Result<serde_json::Value> {
    if settings.is_empty() {
        bail!("name at least one setting to change");
    }
    let request = AdminRequest::SetRounds {
        settings: settings.clone(),
    };
    if let Some(v) = live(dir, &request)? {
        return Ok(v);
    }
    let layout = Layout::new(dir);
    let store = open_store(&layout)?;
    let cfg = CoordinatorConfig::load(&layout.config())?;
    let current = store.round_settings()?.unwrap_or(cfg.rounds);
    let next = settings.apply(&current);
    current.check_change(&next, cfg.secure_aggregation.enabled)?;
    store.set_round_settings(Some(&next))?;
    Ok(serde_json::json!({ "rounds": next }))
}

/// Writes a backup of the coordinator to `out`: by the running `serve` (a consistent snapshot while it
/// serves), or from the stopped coordinator's store.
pub fn backup(dir: &Path, out: &Path) -> anyhow::Result<serde_json::Value> {
    // The running serve may have another working directory: give it an absolute path.
    let out = std::path::absolute(out).with_context(|| format!("resolving {}", out.display()))?;
    if let Some(v) = live(dir, &AdminRequest::Backup { out: out.clone() })? {
        return Ok(v);
    }
    let store = open_store(&Layout::new(dir))?;
    Ok(crate::backup::write(
        &out,
        &crate::backup::collect(dir, &store)?,
    )?)
}

/// Restores a backup into a new coordinator directory (serve it with `serve --dir`).
pub fn restore(from: &Path, dir: &Path) -> anyhow::Result<serde_json::Value> {
    let c = crate::backup::restore(from, dir)?;
    let store = Store::open(&Layout::new(dir).store())?;
    Ok(serde_json::json!({
        "dir": dir.display().to_string(),
        "bytes": c.bytes(),
        "latest_version": store.latest_version()?.map(|v| v.0),
        "clients": store.clients()?.len(),
    }))
}

/// The result of `request` from the `serve` running on `dir`, if one answers.
fn live(dir: &Path, request: &AdminRequest) -> anyhow::Result<Option<serde_json::Value>> {
    match crate::admin::call(dir, request)? {
        None => Ok(None),
        Some(reply) => match reply.error {
            Some(e) => Err(anyhow::anyhow!("the running serve refused: {e}")),
            None => Ok(Some(reply.result)),
        },
    }
}

fn open_store(layout: &Layout) -> anyhow::Result<Store> {
    Store::open(&layout.store()).with_context(|| {
        format!(
            "opening the store in {} (a serve holds it but its admin socket did not answer)",
            layout.dir.display()
        )
    })
}

/// The status as JSON: clients, rounds, privacy, latest version (see [`crate::status::document`]) — from
/// the running `serve` (admin socket), or from the store of a stopped coordinator.
pub fn status(dir: &Path) -> anyhow::Result<serde_json::Value> {
    if let Some(v) = live(dir, &AdminRequest::Status)? {
        return Ok(v);
    }
    let layout = Layout::new(dir);
    Ok(crate::status::document(&open_store(&layout)?, now_ms())?)
}

/// Writes version `version` as a PEFT adapter plus its signed manifest into `out`.
pub fn export(dir: &Path, version: u64, out: &Path) -> anyhow::Result<PathBuf> {
    let layout = Layout::new(dir);
    let store = open_store(&layout)?;
    let model = store
        .model(ModelVersion(version))?
        .with_context(|| format!("no version {version}"))?;
    let cfg = CoordinatorConfig::load(&layout.config())?;
    let (_, mut adapter) = initial_adapter(&layout.base(), &cfg)?;
    adapter.set_flat(&adapter_values(&model.adapter).context("the stored adapter")?)?;
    adapter.save_peft(out)?;
    std::fs::write(
        out.join("manifest.bin"),
        starling_protocol::Message::Manifest(model.manifest.clone()).encode(),
    )?;
    let m = manifest_body(&model.manifest)?;
    std::fs::write(
        out.join("manifest.txt"),
        format!("{m:#?}\nsigner: {}\n", model.manifest.signer),
    )?;
    Ok(out.to_path_buf())
}
