//! The device's one-shot commands: `enrol` (key, one-time token, `client.toml`) and `status` (what the
//! state directory says). `run` is [`crate::driver`]. Errors are `anyhow` here: this is the binary's edge.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use starling_protocol::{EnrolmentToken, Fingerprint};
use starling_transport::Client;

use crate::config::{
    ClientConfig, CoordinatorSection, DeviceSection, NetworkSection, PrivacySection,
};
use crate::driver::{limits, resolve};
use crate::state::{write_atomic, StateDir};

/// Tries of an enrolment the coordinator refuses for its rate limit (about 5 minutes in all).
const ENROL_ATTEMPTS: u32 = 8;

/// What `enrol` needs.
#[derive(Debug, Clone)]
pub struct EnrolRequest {
    /// The state directory to create.
    pub dir: PathBuf,
    /// The coordinator's QUIC endpoint, `HOST:PORT`.
    pub coordinator: String,
    /// Its enrolment endpoint (`None`: the same host, the next port).
    pub enrol: Option<String>,
    /// The one-time token the operator handed over.
    pub token: String,
    /// The coordinator's TLS key fingerprint to pin (hex).
    pub pin: String,
    /// The coordinator's model-signing key to trust (hex).
    pub signing_key: String,
    /// This device's name.
    pub name: String,
}

/// The enrolment endpoint next to `addr` (same host, port + 1), as `starling-coordinator init` lays them out.
fn next_port(addr: &str) -> anyhow::Result<String> {
    let (host, port) = addr
        .rsplit_once(':')
        .context("--coordinator must be HOST:PORT")?;
    let port: u16 = port.parse().context("--coordinator has no valid port")?;
    Ok(format!(
        "{host}:{}",
        port.checked_add(1).context("no port after 65535")?
    ))
}

/// `enrol`: creates the device key (or reuses one left by a failed attempt), registers it with the one-time
/// token over the enrolment endpoint (which already pins the coordinator), then writes `client.toml`.
/// Returns the client id and the configuration written.
pub fn enrol(r: &EnrolRequest) -> anyhow::Result<(Fingerprint, ClientConfig)> {
    let dir = StateDir::new(&r.dir);
    if dir.config().exists() {
        bail!(
            "{} is already enrolled (it holds client.toml); use another --dir",
            r.dir.display()
        );
    }
    let enrol_addr = match &r.enrol {
        Some(a) => a.clone(),
        None => next_port(&r.coordinator)?,
    };
    let cfg = ClientConfig {
        coordinator: CoordinatorSection {
            address: r.coordinator.clone(),
            enrol_address: enrol_addr.clone(),
            pin: r.pin.clone(),
            signing_key: r.signing_key.clone(),
            name: r.name.clone(),
        },
        device: DeviceSection::default(),
        privacy: PrivacySection::default(),
        network: NetworkSection::default(),
    };
    // Validates the addresses' form, the pin and the signing key before anything is created.
    let cfg = ClientConfig::parse(&cfg.document(), "the enrolment arguments")?;
    let token = EnrolmentToken::parse(&r.token).context("--token is not an enrolment token")?;
    let pin = cfg.pin().map_err(anyhow::Error::msg)?;
    let addr = resolve(&cfg.coordinator.address).map_err(anyhow::Error::msg)?;
    let enrol_at = resolve(&enrol_addr).map_err(anyhow::Error::msg)?;
    let key = if dir.key().is_file() {
        dir.load_key()?
    } else {
        dir.create_key()?
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let id = runtime.block_on(async {
        let client = Client::new(&key, pin, addr, limits(&cfg))?.with_enrolment(enrol_at);
        // The enrolment endpoint refuses connections from an address that made too many attempts; its
        // limit refills within minutes, so wait and try again rather than fail.
        let mut backoff = starling_transport::backoff::Backoff::new(
            std::time::Duration::from_secs(5),
            std::time::Duration::from_secs(60),
            u64::from(std::process::id()),
        );
        let id = loop {
            match client.enrol(&token, &r.name).await {
                Err(e)
                    if starling_transport::client::is_rate_limited(&e)
                        && backoff.attempts() < ENROL_ATTEMPTS =>
                {
                    let wait = backoff.next_delay().max(std::time::Duration::from_secs(1));
                    eprintln!(
                        "the coordinator's enrolment endpoint at {enrol_addr} is rate limiting \
                         enrolments; retrying in {} s",
                        wait.as_secs()
                    );
                    tokio::time::sleep(wait).await;
                }
                other => break other,
            }
        };
        client.close().await;
        id
    });
    let id = id.map_err(|e| match starling_transport::client::refusal(&e) {
        Some(starling_transport::client::Refusal::UntrustedCoordinator) => anyhow::anyhow!(
            "the server at {enrol_addr} is not the coordinator whose fingerprint was pinned ({e})"
        ),
        _ if starling_transport::client::is_rate_limited(&e) => anyhow::anyhow!(
            "enrolment at {enrol_addr} failed: the coordinator is still rate limiting enrolments from \
             this address after {ENROL_ATTEMPTS} tries; try again in a few minutes"
        ),
        _ => anyhow::anyhow!("enrolment at {enrol_addr} failed: {e}"),
    })?;
    if id != key.fingerprint() {
        bail!("the coordinator assigned id {id}, not this device's key fingerprint");
    }
    write_atomic(&dir.config(), cfg.document().as_bytes())?;
    Ok((id, cfg))
}

/// `status`: the state directory as a JSON document (enrolled coordinator, model held, rounds, ε, errors).
pub fn status(dir: &Path) -> anyhow::Result<serde_json::Value> {
    let state = StateDir::new(dir);
    if !state.is_enrolled() {
        bail!(
            "{} holds no enrolled device (run `starling-client enrol` first)",
            dir.display()
        );
    }
    let cfg = ClientConfig::load(&state.config())?;
    let key = state.load_key()?;
    let p = state.load_progress()?;
    Ok(serde_json::json!({
        "dir": dir.display().to_string(),
        "name": cfg.coordinator.name,
        "client_id": key.fingerprint().to_hex(),
        "coordinator": cfg.coordinator.address,
        "pinned_fingerprint": cfg.coordinator.pin,
        "model_version": p.held.as_ref().map(|h| h.version),
        "base_digest": p.held.as_ref().map(|h| h.base_digest.clone()),
        "rounds_joined": p.rounds_joined.len(),
        "last_round": p.rounds_joined.last(),
        "pending_update_round": p.pending.as_ref().map(|u| u.round),
        "epsilon_spent": p.epsilon(),
        "epsilon_delta": cfg.privacy.delta,
        "max_epsilon": (cfg.privacy.max_epsilon > 0.0).then_some(cfg.privacy.max_epsilon),
        "user_level_epsilon": p.user_level.map(|u| u.epsilon),
        "user_level_delta": p.user_level.map(|u| u.delta),
        "declined": p.declined,
        "last_error": p.last_error.as_ref().map(|e| e.message.clone()),
        "last_error_unix_ms": p.last_error.as_ref().map(|e| e.at_ms),
    }))
}
