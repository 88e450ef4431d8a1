//! Operator commands on a coordinator directory: `init`, `enrol`, `revoke`, `status`, `export`.
//! Each opens the store itself (sled locks it: while `serve` runs, these commands report that it is busy).

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use starling_model::{Backend, Llama, LoraAdapter};
use starling_protocol::manifest::{DpMode, DpRecord, Manifest};
use starling_protocol::{
    AdapterSchema, Digest, EnrolmentToken, Fingerprint, ModelVersion, RoundId, SigningIdentity,
};

use crate::config::CoordinatorConfig;
use crate::service::{now_ms, read_key, Layout};
use crate::store::{manifest_body, PendingToken, PublishedModel, Store};
use crate::strategy::StrategyState;
use starling_protocol::update::{adapter_bytes, adapter_values};

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
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
    for name in ["config.json", "model.safetensors", "tokenizer.json"] {
        let src = base_model.join(name);
        if src.exists() {
            std::fs::copy(&src, layout.base().join(name))
                .with_context(|| format!("copying {}", src.display()))?;
        }
    }
    let (_, adapter) = initial_adapter(&layout.base(), cfg)?;
    let schema = schema_of(&adapter)?;
    // Devices fetch the base as one bundle (config, weights, tokenizer); version 0 signs its digest.
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
        dp: DpRecord {
            mode: DpMode::Off,
            noise_multiplier: 0.0,
            clip: 0.0,
            epsilon_spent: 0.0,
            delta: 0.0,
        },
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

/// A fresh one-time enrolment token for a device called `name`, and the coordinator's pin and signing key.
pub fn enrol(dir: &Path, name: &str) -> anyhow::Result<(EnrolmentToken, Fingerprint, [u8; 32])> {
    let layout = Layout::new(dir);
    let store = open_store(&layout)?;
    let (token, hash) = EnrolmentToken::generate()?;
    store.add_token(
        hash,
        &PendingToken {
            name: name.to_string(),
            created_at: now_ms(),
        },
    )?;
    Ok((
        token,
        read_key(&layout.tls_key())?.fingerprint(),
        read_key(&layout.signing_key())?.public_key(),
    ))
}

/// Revokes a client given its fingerprint (hex) or its unique name.
pub fn revoke(dir: &Path, who: &str) -> anyhow::Result<Fingerprint> {
    let store = open_store(&Layout::new(dir))?;
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

fn open_store(layout: &Layout) -> anyhow::Result<Store> {
    Store::open(&layout.store()).with_context(|| {
        format!(
            "opening the store in {} (is `serve` running? it holds the store's lock)",
            layout.dir.display()
        )
    })
}

/// The status as JSON: clients, rounds, privacy, latest version (see [`crate::status::document`]). While
/// `serve` runs it holds the store's lock; the status then comes live from its status page.
pub fn status(dir: &Path) -> anyhow::Result<serde_json::Value> {
    let layout = Layout::new(dir);
    match Store::open(&layout.store()) {
        Ok(store) => Ok(crate::status::document(&store, now_ms())?),
        Err(locked) => live_status(&layout).with_context(|| {
            format!(
                "opening the store in {} failed ({locked}) and no running serve answered",
                dir.display()
            )
        }),
    }
}

/// The status from the running `serve`'s page (its address is in `serve.json`).
fn live_status(layout: &Layout) -> anyhow::Result<serde_json::Value> {
    use std::io::Read as _;
    let text = std::fs::read_to_string(layout.serving())
        .with_context(|| format!("reading {}", layout.serving().display()))?;
    let bound: serde_json::Value = serde_json::from_str(&text)?;
    let addr: std::net::SocketAddr = bound["http"]
        .as_str()
        .context("serve runs without a status page (network.http = false)")?
        .parse()?;
    let timeout = std::time::Duration::from_secs(10);
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    write!(
        s,
        "GET /api/status HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.take(16 << 20).read_to_end(&mut raw)?;
    let raw = String::from_utf8(raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").context("malformed HTTP reply")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("status page answered {}", head.lines().next().unwrap_or(""));
    }
    Ok(serde_json::from_str(body)?)
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
