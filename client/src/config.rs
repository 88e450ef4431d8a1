//! `client.toml`: every setting of a device, with defaults. `enrol` writes it (each setting present with its
//! default and a comment); `run` reads it. Unknown keys are errors, so a typo never silently falls back to a
//! default. What must never live here: state that changes while the device runs (see [`crate::state`]).

use std::path::Path;

pub use starling_cli::config::ConfigError;

use starling_model::engine::Precision;
use starling_model::{Backend, QuantType};
use starling_privacy::AccountantKind;
use starling_protocol::Fingerprint;

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// The coordinator this device belongs to and how it is trusted.
    pub coordinator: CoordinatorSection,
    /// What the device lets training use, and when.
    #[serde(default)]
    pub device: DeviceSection,
    /// The device's own privacy budget.
    #[serde(default)]
    pub privacy: PrivacySection,
    /// Reconnection and timeouts.
    #[serde(default)]
    pub network: NetworkSection,
}

/// The coordinator: addresses and trust anchors written at enrolment.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorSection {
    /// Its QUIC protocol endpoint, `host:port`.
    pub address: String,
    /// Its enrolment endpoint, `host:port`.
    pub enrol_address: String,
    /// SHA-256 fingerprint (hex) of its TLS key: the only coordinator this device talks to.
    pub pin: String,
    /// Its model-signing public key (hex): the only signer of manifests this device accepts.
    pub signing_key: String,
    /// This device's name, as given at enrolment.
    pub name: String,
}

/// Device budgets and eligibility.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeviceSection {
    /// Worker threads for training (0: one per core).
    pub threads: usize,
    /// Refuse a task whose model and training would need more memory than this, in MB (0: no limit).
    pub max_memory_mb: u64,
    /// Train only inside this local-time window, `HH:MM-HH:MM` (may wrap past midnight; empty: any time).
    pub train_between: String,
    /// A command run (`sh -c`) before training: exit 0 means the device may train now (empty: always).
    pub eligibility_command: String,
    /// Storage of an HF-checkpoint base on this device (`q8_0`, `q4_0` or `f32`; a Starling container keeps
    /// the format it was published in).
    pub quant: QuantType,
    /// burn CPU backend for evaluation and the reference paths (`flex` or `ndarray`).
    pub backend: Backend,
    /// Arithmetic of training's frozen-weight products: `f32`, or `bf16` (bf16 inputs, f32 sums;
    /// ~1.4× faster where the CPU has AVX512-BF16, f32 elsewhere).
    pub precision: Precision,
}

impl Default for DeviceSection {
    fn default() -> Self {
        Self {
            threads: 0,
            max_memory_mb: 0,
            train_between: String::new(),
            eligibility_command: String::new(),
            quant: QuantType::Q8_0,
            backend: Backend::default(),
            precision: Precision::F32,
        }
    }
}

/// The device's own privacy ledger settings.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrivacySection {
    /// Largest example-level ε this device will spend in total (0: no limit). With a limit set, a task
    /// without DP-SGD is declined: its ε is unbounded.
    pub max_epsilon: f64,
    /// δ at which the device accounts ε.
    pub delta: f64,
    /// Accountant (`pld` or `rdp`).
    pub accountant: AccountantKind,
}

impl Default for PrivacySection {
    fn default() -> Self {
        Self {
            max_epsilon: 0.0,
            delta: 1e-5,
            accountant: AccountantKind::Pld,
        }
    }
}

/// Reconnection with backoff and the transport's timers.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkSection {
    /// First reconnection delay, ms (later ones double, with full jitter).
    pub backoff_base_ms: u64,
    /// Longest reconnection delay, ms.
    pub backoff_max_ms: u64,
    /// Time allowed for connecting (QUIC and TLS handshakes, version negotiation), seconds.
    pub connect_timeout_s: u64,
    /// Time allowed for one exchange (a model download included), seconds.
    pub exchange_timeout_s: u64,
    /// Close a silent connection after this long, seconds.
    pub idle_timeout_s: u64,
}

impl Default for NetworkSection {
    fn default() -> Self {
        Self {
            backoff_base_ms: 500,
            backoff_max_ms: 60_000,
            connect_timeout_s: 10,
            exchange_timeout_s: 300,
            idle_timeout_s: 60,
        }
    }
}

/// A daily window of local time in minutes since midnight, `[start, end)`; wraps when `end < start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeWindow {
    /// First minute inside the window.
    pub start: u16,
    /// First minute after the window.
    pub end: u16,
}

impl TimeWindow {
    /// Parses `HH:MM-HH:MM`.
    pub fn parse(s: &str) -> Option<Self> {
        let minute = |t: &str| -> Option<u16> {
            let (h, m) = t.trim().split_once(':')?;
            let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
            (h < 24 && m < 60).then_some(h * 60 + m)
        };
        let (a, b) = s.split_once('-')?;
        let (start, end) = (minute(a)?, minute(b)?);
        (start != end).then_some(Self { start, end })
    }

    /// Whether `minute` (since local midnight) lies inside the window.
    pub fn contains(&self, minute: u16) -> bool {
        if self.start < self.end {
            (self.start..self.end).contains(&minute)
        } else {
            minute >= self.start || minute < self.end
        }
    }

    /// Minutes from `minute` until the window next opens (0 inside it).
    pub fn minutes_until_open(&self, minute: u16) -> u16 {
        if self.contains(minute) {
            0
        } else {
            (self.start + 24 * 60 - minute) % (24 * 60)
        }
    }
}

impl ClientConfig {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::parse(
            &starling_cli::config::read(path)?,
            &path.display().to_string(),
        )
    }

    /// Parses and validates configuration text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let cfg: Self = starling_cli::config::parse(text, origin)?;
        cfg.validate().map_err(|message| ConfigError::Invalid {
            path: origin.into(),
            message,
        })?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), String> {
        let c = &self.coordinator;
        for (key, addr) in [("address", &c.address), ("enrol_address", &c.enrol_address)] {
            let port = addr.rsplit_once(':').and_then(|(h, p)| {
                (!h.is_empty()).then_some(())?;
                p.parse::<u16>().ok()
            });
            if port.is_none() {
                return Err(format!("coordinator.{key} {addr:?} is not HOST:PORT"));
            }
        }
        self.pin()?;
        self.signing_key()?;
        let d = &self.device;
        if !d.train_between.is_empty() && TimeWindow::parse(&d.train_between).is_none() {
            return Err(format!(
                "device.train_between {:?} is not HH:MM-HH:MM",
                d.train_between
            ));
        }
        let p = &self.privacy;
        if !(p.max_epsilon >= 0.0 && p.max_epsilon.is_finite()) {
            return Err("privacy.max_epsilon must be a finite number ≥ 0".into());
        }
        if !(p.delta > 0.0 && p.delta < 1.0) {
            return Err("privacy.delta must lie in (0, 1)".into());
        }
        let n = &self.network;
        if n.backoff_base_ms == 0 || n.backoff_max_ms < n.backoff_base_ms {
            return Err("network needs 0 < backoff_base_ms ≤ backoff_max_ms".into());
        }
        if n.exchange_timeout_s == 0 || n.connect_timeout_s == 0 || n.idle_timeout_s < 2 {
            return Err(
                "network needs connect_timeout_s ≥ 1, exchange_timeout_s ≥ 1 and idle_timeout_s ≥ 2"
                    .into(),
            );
        }
        Ok(())
    }

    /// The pinned coordinator fingerprint.
    pub fn pin(&self) -> Result<Fingerprint, String> {
        Fingerprint::from_hex(&self.coordinator.pin).map_err(|e| format!("coordinator.pin: {e}"))
    }

    /// The trusted model-signing key.
    pub fn signing_key(&self) -> Result<[u8; 32], String> {
        starling_protocol::key_from_hex(&self.coordinator.signing_key)
            .ok_or_else(|| "coordinator.signing_key must be 64 hex digits".to_string())
    }

    /// The training window, if one is set.
    pub fn window(&self) -> Option<TimeWindow> {
        TimeWindow::parse(&self.device.train_between)
    }

    /// The file `enrol` writes: the coordinator section filled in, every other setting at its default with a
    /// comment saying what it does.
    pub fn document(&self) -> String {
        let c = &self.coordinator;
        let d = &self.device;
        let p = &self.privacy;
        let n = &self.network;
        let accountant = match p.accountant {
            AccountantKind::Pld => "pld",
            AccountantKind::Rdp => "rdp",
        };
        format!(
            r#"# Starling device configuration (written by `starling-client enrol`). Unknown keys are errors.

[coordinator]
# The coordinator's QUIC endpoint and enrolment endpoint.
address = "{}"
enrol_address = "{}"
# SHA-256 of the coordinator's TLS key: no other server is ever trusted.
pin = "{}"
# The coordinator's model-signing key: manifests signed by any other key are refused.
signing_key = "{}"
# This device's name at enrolment.
name = {}

[device]
# Training threads (0: one per core).
threads = {}
# Refuse tasks whose model and training would need more memory than this, in MB (0: no limit).
max_memory_mb = {}
# Train only in this local-time window, "HH:MM-HH:MM" (may wrap past midnight; "": any time).
train_between = {}
# Run before training (sh -c); exit 0 means "may train now", e.g. charging and on an unmetered network.
eligibility_command = {}
# Storage of an HF-checkpoint base on this device: "q8_0", "q4_0" or "f32" (a Starling container keeps
# the format the coordinator published).
quant = "{}"
# burn CPU backend: "flex" or "ndarray".
backend = "{}"
# Training's frozen-weight products: "f32", or "bf16" (bf16 inputs, f32 sums: ~1.4x faster on CPUs
# with AVX512-BF16, such as AMD Zen 4; f32 on others).
precision = "{}"

[privacy]
# Largest example-level ε this device spends in total (0: no limit). With a limit, tasks without DP-SGD
# are declined, since their ε is unbounded.
max_epsilon = {:?}
# δ at which ε is accounted.
delta = {:e}
# Accountant: "pld" (tight) or "rdp".
accountant = "{accountant}"

[network]
# Reconnection backoff: first delay and cap, ms (exponential, full jitter).
backoff_base_ms = {}
backoff_max_ms = {}
# Time allowed for connecting (handshakes included), seconds: a coordinator that is down costs this long.
connect_timeout_s = {}
# Time allowed for one exchange, model downloads included, seconds.
exchange_timeout_s = {}
# Close a silent connection after this long, seconds.
idle_timeout_s = {}
"#,
            c.address,
            c.enrol_address,
            c.pin,
            c.signing_key,
            toml_string(&c.name),
            d.threads,
            d.max_memory_mb,
            toml_string(&d.train_between),
            toml_string(&d.eligibility_command),
            d.quant.name(),
            d.backend.name(),
            d.precision.name(),
            p.max_epsilon,
            p.delta,
            n.backoff_base_ms,
            n.backoff_max_ms,
            n.connect_timeout_s,
            n.exchange_timeout_s,
            n.idle_timeout_s,
        )
    }
}

/// A TOML basic string.
fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ClientConfig {
        ClientConfig {
            coordinator: CoordinatorSection {
                address: "127.0.0.1:7870".into(),
                enrol_address: "127.0.0.1:7871".into(),
                pin: "ab".repeat(32),
                signing_key: "cd".repeat(32),
                name: "kitchen \"pi\"".into(),
            },
            device: DeviceSection::default(),
            privacy: PrivacySection::default(),
            network: NetworkSection::default(),
        }
    }

    #[test]
    fn the_written_document_parses_back_and_unknown_keys_are_refused() {
        let c = sample();
        assert_eq!(ClientConfig::parse(&c.document(), "x").unwrap(), c);
        let typo = c.document().replace("max_memory_mb", "max_memory");
        let err = ClientConfig::parse(&typo, "client.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_memory"), "{err}");
        for (from, to) in [
            ("delta = 1e-5", "delta = 2.0"),
            ("train_between = \"\"", "train_between = \"25:00-01:00\""),
            ("address = \"127.0.0.1:7870\"", "address = \"nowhere\""),
            ("quant = \"q8_0\"", "quant = \"q3\""),
            ("backoff_base_ms = 500", "backoff_base_ms = 0"),
        ] {
            let text = c.document().replace(from, to);
            assert_ne!(text, c.document(), "{from}");
            assert!(ClientConfig::parse(&text, "c").is_err(), "{to}");
        }
        let pin = c.document().replace(&"ab".repeat(32), "abc");
        assert!(ClientConfig::parse(&pin, "c").is_err());
    }

    #[test]
    fn time_windows_wrap_past_midnight() {
        let w = TimeWindow::parse("23:30-01:00").unwrap();
        assert!(w.contains(23 * 60 + 45) && w.contains(30) && !w.contains(60));
        assert_eq!(w.minutes_until_open(23 * 60), 30);
        let day = TimeWindow::parse("01:00-06:00").unwrap();
        assert!(day.contains(60) && !day.contains(360));
        assert_eq!(day.minutes_until_open(7 * 60), 18 * 60);
        assert!(TimeWindow::parse("01:00-01:00").is_none());
        assert!(TimeWindow::parse("1-2").is_none());
    }
}
