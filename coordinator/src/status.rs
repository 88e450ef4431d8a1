//! What an operator sees of a coordinator: the status document (JSON: rounds, clients, ε, latest version),
//! built from the store by both `status` (stopped coordinator) and the live status page, and the counters
//! behind Prometheus `/metrics`.
//! What must never live here: anything that changes state (this is a read-only view), or HTTP plumbing.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use starling_protocol::{Manifest, ModelVersion};

use crate::store::{manifest_body, ClientStatus, Store, StoreError};

/// The status document of the coordinator whose store is `store`, as of `now` (Unix ms).
pub fn document(store: &Store, now: u64) -> Result<serde_json::Value, StoreError> {
    let clients = store.clients()?;
    let active = clients
        .iter()
        .filter(|c| c.status == ClientStatus::Active)
        .count();
    let (latest, model) = latest_manifest(store)?;
    let ledger = store.ledger()?;
    Ok(serde_json::json!({
        "now_unix_ms": now,
        "latest_version": latest.0,
        "rounds_completed": store.completed()?,
        "current_round": match store.current_round()? {
            None => None,
            Some(r) => {
                let secure = store.secagg(r.id)?;
                let updates = secure
                    .as_ref()
                    .map_or(store.update_count(r.id), |s| s.server.unmask_request().1.len());
                Some(serde_json::json!({
                    "id": r.id.0, "phase": format!("{:?}", r.phase).to_lowercase(),
                    "model_version": r.model_version.0, "selected": r.selected.len(), "eligible": r.eligible,
                    "updates": updates, "started_unix_ms": r.started_at, "deadline_unix_ms": r.deadline,
                    "secure_aggregation": secure.as_ref().map(secure_round),
                }))
            }
        },
        "clients": { "total": clients.len(), "active": active, "revoked": clients.len() - active,
            "list": clients.iter().map(client_json).collect::<Vec<_>>() },
        "paused": store.paused()?,
        "round_settings": store.round_settings()?,
        "epsilon_spent": model.as_ref().map_or(0.0, |m| m.dp.epsilon_spent),
        "delta": model.as_ref().map_or(0.0, |m| m.dp.delta),
        "strategy": model.as_ref().map(|m| m.strategy.clone()),
        "rounds": ledger.iter().map(|(r, c)| serde_json::json!({
            "round": r.0, "updates": c.updates, "mean_train_loss": c.mean_train_loss,
            "epsilon_after": c.epsilon_after, "sampling_rate": c.sampling_rate })).collect::<Vec<_>>(),
    }))
}

/// One enrolled device as the status document and `clients` show it.
pub fn client_json(c: &crate::store::ClientRecord) -> serde_json::Value {
    serde_json::json!({
        "fingerprint": c.fingerprint.to_hex(), "name": c.name,
        "status": format!("{:?}", c.status).to_lowercase(),
        "enrolled_unix_ms": c.enrolled_at, "last_seen_unix_ms": c.last_seen, "declines": c.declines,
        "last_decline": c.last_decline.as_ref().map(|d| serde_json::json!({
            "round": d.round.0, "code": d.code, "reason": d.reason, "at_unix_ms": d.at })),
    })
}

/// The status document as a short summary for a person at a terminal (`status` without `--json`).
pub fn summary(doc: &serde_json::Value) -> String {
    let mut out = String::new();
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    let _ = writeln!(
        out,
        "latest version {}, {} rounds completed{}",
        n(&doc["latest_version"]),
        n(&doc["rounds_completed"]),
        if doc["paused"].as_bool() == Some(true) {
            " — rounds paused"
        } else {
            ""
        }
    );
    match doc["current_round"].as_object() {
        Some(r) => {
            let left = n(&r["deadline_unix_ms"]).saturating_sub(n(&doc["now_unix_ms"])) / 1000;
            let _ = writeln!(
                out,
                "round {} {}: {} of {} selected devices reported (from version {}), deadline in {} s",
                n(&r["id"]),
                r["phase"].as_str().unwrap_or("?"),
                n(&r["updates"]),
                n(&r["selected"]),
                n(&r["model_version"]),
                left
            );
        }
        None => {
            let _ = writeln!(out, "no round open");
        }
    }
    let c = &doc["clients"];
    let _ = writeln!(
        out,
        "devices: {} enrolled, {} active, {} revoked",
        n(&c["total"]),
        n(&c["active"]),
        n(&c["revoked"])
    );
    if let Some(eps) = doc["epsilon_spent"].as_f64().filter(|e| *e > 0.0) {
        let _ = writeln!(
            out,
            "privacy: ε = {eps:.3} at δ = {:e}",
            doc["delta"].as_f64().unwrap_or(0.0)
        );
    }
    if let Some(rounds) = doc["rounds"].as_array() {
        for r in rounds.iter().rev().take(5).rev() {
            let _ = writeln!(
                out,
                "  round {:>4}: {:>4} updates, mean train loss {:.4}",
                n(&r["round"]),
                n(&r["updates"]),
                r["mean_train_loss"].as_f64().unwrap_or(0.0)
            );
        }
    }
    out.push_str("(--json for the whole document)\n");
    out
}

/// The `clients` document as a table for a person.
pub fn clients_table(doc: &serde_json::Value) -> String {
    let mut out = format!(
        "{:<24} {:<8} {:<16} FINGERPRINT\n",
        "NAME", "STATUS", "LAST SEEN (s ago)"
    );
    let now = crate::service::now_ms();
    for c in doc["clients"].as_array().into_iter().flatten() {
        let seen = c["last_seen_unix_ms"].as_u64().unwrap_or(0);
        let ago = if seen == 0 {
            "never".to_string()
        } else {
            (now.saturating_sub(seen) / 1000).to_string()
        };
        let _ = writeln!(
            out,
            "{:<24} {:<8} {:<16} {}",
            c["name"].as_str().unwrap_or_default(),
            c["status"].as_str().unwrap_or_default(),
            ago,
            c["fingerprint"].as_str().unwrap_or_default()
        );
    }
    out
}

/// Where a secure round stands: its phase, how many devices reached each step, its parameters.
fn secure_round(s: &crate::secagg::SecAggRound) -> serde_json::Value {
    let (dropped, reported) = s.server.unmask_request();
    let p = s.params();
    serde_json::json!({
        "phase": s.phase.to_string(),
        "phase_deadline_unix_ms": (s.phase != crate::secagg::SecAggPhase::Advertise).then_some(s.phase_deadline),
        "advertised": s.server.advertised().len(), "shared": dropped.len() + reported.len(),
        "masked_inputs": reported.len(), "revealed": s.revealed.len(),
        "neighbours": p.neighbours.min(p.clients.saturating_sub(1)), "threshold": p.threshold,
        "modulus_bits": p.bits,
    })
}

/// The latest published version and its manifest body (version 0 and none before `init` published it).
fn latest_manifest(store: &Store) -> Result<(ModelVersion, Option<Manifest>), StoreError> {
    let latest = store.latest_version()?.unwrap_or(ModelVersion(0));
    let manifest = store
        .model(latest)?
        .map(|m| manifest_body(&m.manifest))
        .transpose()?;
    Ok((latest, manifest))
}

/// Counters of a running coordinator (since it started); the store supplies the durable figures.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Updates stored and counted.
    pub updates_accepted: AtomicU64,
    /// Retries of updates already counted (acknowledged again).
    pub updates_duplicate: AtomicU64,
    /// Updates refused (late, wrong version or schema, undecodable).
    pub updates_refused: AtomicU64,
    /// Bytes of accepted update bodies.
    pub upload_bytes: AtomicU64,
    /// Tasks handed out.
    pub tasks_offered: AtomicU64,
    /// Tasks devices declined (their own policy: privacy budget, memory, ...).
    pub tasks_declined: AtomicU64,
    /// Rounds abandoned for too few updates.
    pub rounds_abandoned: AtomicU64,
    /// Rounds refused because the privacy budget would be exceeded.
    pub rounds_refused_privacy: AtomicU64,
    /// Duration of the last aggregate-and-publish, in microseconds.
    pub last_aggregation_us: AtomicU64,
}

/// Adds one to a counter.
pub fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Metrics {
    /// The Prometheus text exposition (format 0.0.4) of these counters and the store's figures.
    pub fn render(&self, store: &Store) -> Result<String, StoreError> {
        let mut out = String::new();
        let mut put = |name: &str, kind: &str, help: &str, samples: &[(&str, f64)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in samples {
                let _ = writeln!(out, "{name}{labels} {v}");
            }
        };
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed) as f64;
        put(
            "starling_updates_total",
            "counter",
            "Updates received since start, by outcome.",
            &[
                ("{outcome=\"accepted\"}", get(&self.updates_accepted)),
                ("{outcome=\"duplicate\"}", get(&self.updates_duplicate)),
                ("{outcome=\"refused\"}", get(&self.updates_refused)),
            ],
        );
        put(
            "starling_upload_bytes_total",
            "counter",
            "Bytes of accepted update bodies since start.",
            &[("", get(&self.upload_bytes))],
        );
        put(
            "starling_tasks_offered_total",
            "counter",
            "Training tasks handed out since start.",
            &[("", get(&self.tasks_offered))],
        );
        put(
            "starling_tasks_declined_total",
            "counter",
            "Training tasks devices declined since start (device privacy budget, memory, ...).",
            &[("", get(&self.tasks_declined))],
        );
        put(
            "starling_rounds_abandoned_total",
            "counter",
            "Rounds abandoned since start for too few updates.",
            &[("", get(&self.rounds_abandoned))],
        );
        put(
            "starling_rounds_refused_privacy_total",
            "counter",
            "Rounds refused since start because the privacy budget would be exceeded.",
            &[("", get(&self.rounds_refused_privacy))],
        );
        put(
            "starling_last_aggregation_seconds",
            "gauge",
            "Duration of the last aggregation and publication.",
            &[("", get(&self.last_aggregation_us) / 1e6)],
        );
        put(
            "starling_rounds_completed",
            "gauge",
            "Rounds aggregated into a published version (durable).",
            &[("", store.completed()? as f64)],
        );
        let (latest, manifest) = latest_manifest(store)?;
        put(
            "starling_model_version",
            "gauge",
            "Latest published model version.",
            &[("", latest.0 as f64)],
        );
        let current = store.current_round()?;
        put(
            "starling_current_round",
            "gauge",
            "Round in progress (0: none).",
            &[("", current.as_ref().map_or(0.0, |r| r.id.0 as f64))],
        );
        put(
            "starling_current_round_updates",
            "gauge",
            "Updates stored for the round in progress.",
            &[(
                "",
                current
                    .as_ref()
                    .map_or(0.0, |r| store.update_count(r.id) as f64),
            )],
        );
        let clients = store.clients()?;
        let active = clients
            .iter()
            .filter(|c| c.status == ClientStatus::Active)
            .count();
        put(
            "starling_clients",
            "gauge",
            "Enrolled clients, by status.",
            &[
                ("{status=\"active\"}", active as f64),
                ("{status=\"revoked\"}", (clients.len() - active) as f64),
            ],
        );
        let epsilon = manifest.map_or(0.0, |m| m.dp.epsilon_spent);
        put(
            "starling_epsilon_spent",
            "gauge",
            "Privacy loss ε spent by the published versions (global ledger).",
            &[("", epsilon)],
        );
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_valid_prometheus_text() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::create(&tmp.path().join("s")).unwrap();
        let m = Metrics::default();
        bump(&m.updates_accepted);
        bump(&m.updates_accepted);
        m.upload_bytes.fetch_add(4096, Ordering::Relaxed);
        let text = m.render(&store).unwrap();
        // Every sample line follows a TYPE line of its metric, names are valid, values parse.
        let mut declared = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut parts = rest.split(' ');
                declared.insert(parts.next().unwrap().to_string());
                assert!(matches!(parts.next(), Some("counter" | "gauge")));
            } else if !line.starts_with("# HELP ") {
                let (series, value) = line.rsplit_once(' ').unwrap();
                let name = series.split('{').next().unwrap();
                assert!(declared.contains(name), "{line}");
                assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
                value.parse::<f64>().unwrap();
            }
        }
        assert!(text.contains("starling_updates_total{outcome=\"accepted\"} 2\n"));
        assert!(text.contains("starling_upload_bytes_total 4096\n"));
        assert!(text.contains("starling_current_round 0\n"));
        let doc = document(&store, 7).unwrap();
        assert_eq!(doc["latest_version"], 0);
        assert!(doc["current_round"].is_null());
    }

    #[test]
    fn the_terminal_summary_reads_as_sentences() {
        let doc = serde_json::json!({
            "now_unix_ms": 10_000, "latest_version": 3, "rounds_completed": 3, "paused": true,
            "current_round": {"id": 4, "phase": "collecting", "updates": 2, "selected": 5,
                "model_version": 3, "deadline_unix_ms": 70_000},
            "clients": {"total": 6, "active": 5, "revoked": 1},
            "epsilon_spent": 1.5, "delta": 1e-5,
            "rounds": [{"round": 3, "updates": 5, "mean_train_loss": 1.25}],
        });
        let text = summary(&doc);
        assert_eq!(
            text,
            "latest version 3, 3 rounds completed — rounds paused\n\
             round 4 collecting: 2 of 5 selected devices reported (from version 3), deadline in 60 s\n\
             devices: 6 enrolled, 5 active, 1 revoked\n\
             privacy: ε = 1.500 at δ = 1e-5\n  round    3:    5 updates, mean train loss 1.2500\n\
             (--json for the whole document)\n"
        );
        let table = clients_table(&serde_json::json!({"clients": [
            {"name": "pi-1", "status": "active", "last_seen_unix_ms": 0, "fingerprint": "ab"}]}));
        assert!(table.lines().nth(1).unwrap().starts_with("pi-1"), "{table}");
        assert!(table.contains("never"), "{table}");
    }
}
