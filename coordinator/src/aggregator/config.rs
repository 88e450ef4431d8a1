//! `aggregator.toml`: the root it forwards to (written by `aggregator init`), where it listens, and how it
//! gathers a round's cohort. Unknown keys are errors. What must never live here: state that changes while
//! the aggregator runs (that is the spool's).

use std::net::SocketAddr;
use std::path::Path;

pub use starling_cli::config::ConfigError;
use starling_protocol::Fingerprint;

/// The whole file.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregatorConfig {
    /// The root coordinator: address and trust anchors.
    pub root: RootSection,
    /// Where devices reach this aggregator.
    #[serde(default)]
    pub network: AggregatorNetwork,
    /// How a round's cohort is gathered and forwarded.
    #[serde(default)]
    pub cohort: CohortConfig,
}

/// The root coordinator this aggregator forwards to.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RootSection {
    /// Its QUIC protocol endpoint, `host:port`.
    pub address: String,
    /// SHA-256 fingerprint (hex) of its TLS key.
    pub pin: String,
    /// Its model-signing public key (hex): tasks whose manifest it did not sign are not handed on.
    pub signing_key: String,
    /// This aggregator's name at the root.
    pub name: String,
}

/// Listening addresses for devices.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AggregatorNetwork {
    /// QUIC protocol endpoint devices connect to.
    pub listen: SocketAddr,
    /// QUIC enrolment endpoint (devices' one-time tokens are checked at the root).
    pub enrol_listen: SocketAddr,
    /// HTTP endpoint for probes and metrics (`/healthz`, `/readyz`, `/metrics`, `/api/status`).
    pub http_listen: SocketAddr,
    /// Serve the HTTP endpoint.
    pub http: bool,
    /// On SIGTERM: how long exchanges in flight may take to finish, ms.
    pub drain_wait_ms: u64,
    /// On SIGTERM: when devices are told to come back, ms.
    pub drain_retry_after_ms: u64,
    /// Enrolment attempts one address may make at once (devices provisioned behind one NAT share it).
    pub enrol_burst_per_address: u32,
    /// Enrolment attempts one address regains per minute after its burst.
    pub enrol_per_address_per_minute: f64,
}

impl Default for AggregatorNetwork {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 7500)),
            enrol_listen: SocketAddr::from(([0, 0, 0, 0], 7501)),
            http_listen: SocketAddr::from(([0, 0, 0, 0], 7502)),
            http: true,
            drain_wait_ms: 10_000,
            drain_retry_after_ms: 2_000,
            enrol_burst_per_address: 5,
            enrol_per_address_per_minute: 1.0,
        }
    }
}

/// The cohort of one round.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CohortConfig {
    /// Devices this aggregator takes per round (the first that ask); it forwards as soon as all of them
    /// uploaded.
    pub size: usize,
    /// Fewest devices worth forwarding at the cut-off; with fewer the aggregator declines the round.
    pub min: usize,
    /// The cut-off: devices' deadline and the latest forward, this long before the root's deadline, ms.
    pub forward_margin_ms: u64,
    /// Forward before the cut-off once every device taken uploaded (at least `min`) and none joined for
    /// this long, ms: an aggregator with fewer devices than `size` does not hold the round to its deadline.
    pub quiet_ms: u64,
    /// How often the root is asked for work and the cohort checked, ms.
    pub poll_ms: u64,
    /// How often the active-device roster is re-read from the root, ms (a revocation takes effect here
    /// within this).
    pub roster_ms: u64,
    /// What devices are told when there is no work, ms.
    pub retry_after_ms: u64,
    /// When the root's rounds are secure (SecAgg+ per cohort): the longest each phase after the keys
    /// (shares, masked inputs, reveals) may stay open, ms — a quarter of the time left when the cohort
    /// is fixed, if that is shorter; the keys phase closes 3 such phases before the cut-off.
    pub secure_phase_ms: u64,
}

impl Default for CohortConfig {
    fn default() -> Self {
        Self {
            size: 100,
            min: 1,
            forward_margin_ms: 10_000,
            quiet_ms: 5_000,
            poll_ms: 500,
            roster_ms: 2_000,
            retry_after_ms: 2_000,
            secure_phase_ms: 15_000,
        }
    }
}

impl AggregatorConfig {
    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::parse(
            &starling_cli::config::read(path)?,
            &path.display().to_string(),
        )
    }

    /// Parses and validates text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let cfg: Self = starling_cli::config::parse(text, origin)?;
        let invalid = |m: &str| ConfigError::Invalid {
            path: origin.into(),
            message: m.into(),
        };
        let c = &cfg.cohort;
        if c.size == 0 || c.min == 0 || c.min > c.size {
            return Err(invalid("cohort needs 1 ≤ min ≤ size"));
        }
        if c.poll_ms == 0 || c.roster_ms == 0 || c.secure_phase_ms == 0 {
            return Err(invalid(
                "cohort.poll_ms, cohort.roster_ms and cohort.secure_phase_ms must be positive",
            ));
        }
        let n = &cfg.network;
        crate::config::enrolment_limits(n.enrol_burst_per_address, n.enrol_per_address_per_minute)
            .map_err(|e| invalid(&e))?;
        cfg.pin().map_err(|e| invalid(&e))?;
        cfg.signing_key().map_err(|e| invalid(&e))?;
        Ok(cfg)
    }

    /// The root's TLS fingerprint.
    pub fn pin(&self) -> Result<Fingerprint, String> {
        Fingerprint::from_hex(&self.root.pin).map_err(|e| format!("root.pin: {e}"))
    }

    /// The root's model-signing key.
    pub fn signing_key(&self) -> Result<[u8; 32], String> {
        starling_protocol::key_from_hex(&self.root.signing_key)
            .ok_or_else(|| "root.signing_key must be 64 hex digits".to_string())
    }

    /// The file as `aggregator init` writes it: every setting with a comment.
    pub fn document(&self) -> String {
        let body = toml::to_string_pretty(self).unwrap_or_default();
        format!(
            "# Starling edge aggregator. Unknown keys are errors.\n\
             # [root] address, pin, signing_key, name: the root coordinator (written by `aggregator init`)\n\
             # [network] listen, enrol_listen (devices' QUIC endpoints), http_listen, http (probes and\n\
             #   metrics), drain_wait_ms, drain_retry_after_ms, enrol_burst_per_address,\n\
             #   enrol_per_address_per_minute (enrolment rate limit per address)\n\
             # [cohort] size (devices per round), min (fewest worth forwarding at the cut-off),\n\
             #   forward_margin_ms (cut-off before the root's deadline), quiet_ms (forward early once every\n\
             #   device taken uploaded and none joined for this long), poll_ms, roster_ms, retry_after_ms,\n\
             #   secure_phase_ms (when the root's rounds are secure: each SecAgg+ phase after the keys)\n\n{body}"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> RootSection {
        RootSection {
            address: "127.0.0.1:7400".into(),
            pin: "ab".repeat(32),
            signing_key: "cd".repeat(32),
            name: "edge-1".into(),
        }
    }

    #[test]
    fn the_written_document_reads_back_and_bad_settings_are_refused() {
        let cfg = AggregatorConfig {
            root: root(),
            network: AggregatorNetwork::default(),
            cohort: CohortConfig::default(),
        };
        assert_eq!(AggregatorConfig::parse(&cfg.document(), "a").unwrap(), cfg);
        let text = cfg.document();
        for (from, to, word) in [
            ("min = 1", "min = 0", "min"),
            ("size = 100", "size = 0", "min"),
            ("poll_ms = 500", "poll_ms = 0", "poll_ms"),
            ("name = ", "nam = ", "nam"),
        ] {
            let err = AggregatorConfig::parse(&text.replacen(from, to, 1), "a")
                .unwrap_err()
                .to_string();
            assert!(err.contains(word), "{from}: {err}");
        }
        let bad_pin = text.replace(&"ab".repeat(32), "xyz");
        assert!(AggregatorConfig::parse(&bad_pin, "a")
            .unwrap_err()
            .to_string()
            .contains("root.pin"));
    }
}
