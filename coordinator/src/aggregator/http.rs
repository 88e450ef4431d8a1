//! The edge aggregator's read-only HTTP endpoint for supervisors and operators: `/healthz` (the loop
//! towards the root is alive), `/readyz` (devices are served, not draining), `/metrics` (Prometheus) and
//! `/api/status` (the open round, its cohort, the roster, the root session). Unauthenticated: bind it to a
//! pod-local or operator-only address. What must never live here: anything that changes state.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use super::Aggregator;

/// Counters of a running aggregator.
#[derive(Debug, Default)]
pub struct AggregatorMetrics {
    /// Device updates spooled and acknowledged.
    pub updates_accepted: AtomicU64,
    /// Retries of spooled updates (acknowledged again).
    pub updates_duplicate: AtomicU64,
    /// Device updates refused.
    pub updates_refused: AtomicU64,
    /// Bytes of accepted device updates.
    pub upload_bytes: AtomicU64,
    /// Partial sums the root acknowledged.
    pub partials_forwarded: AtomicU64,
    /// Rounds given up (too few devices by the cut-off, or refused by the root).
    pub rounds_given_up: AtomicU64,
}

/// Adds one to a counter.
pub(crate) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// The routes for `aggregator`.
pub fn router(aggregator: Arc<Aggregator>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/status", get(status))
        .with_state(aggregator)
}

async fn healthz(State(a): State<Arc<Aggregator>>) -> Response {
    crate::http::liveness(&a.health, "the loop towards the root")
}

async fn readyz(State(a): State<Arc<Aggregator>>) -> Response {
    crate::http::readiness(&a.health)
}

async fn status(State(a): State<Arc<Aggregator>>) -> Response {
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        a.status_document().to_string(),
    )
        .into_response()
}

async fn metrics(State(a): State<Arc<Aggregator>>) -> Response {
    use std::fmt::Write as _;
    let m = &a.metrics;
    let doc = a.status_document();
    let mut out = String::new();
    let mut put = |name: &str, kind: &str, help: &str, v: f64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
        );
    };
    let n = |c: &AtomicU64| c.load(Ordering::Relaxed) as f64;
    put(
        "starling_aggregator_updates_accepted_total",
        "counter",
        "Device updates spooled and acknowledged.",
        n(&m.updates_accepted),
    );
    put(
        "starling_aggregator_updates_duplicate_total",
        "counter",
        "Retries of spooled updates, acknowledged again.",
        n(&m.updates_duplicate),
    );
    put(
        "starling_aggregator_updates_refused_total",
        "counter",
        "Device updates refused.",
        n(&m.updates_refused),
    );
    put(
        "starling_aggregator_upload_bytes_total",
        "counter",
        "Bytes of accepted device updates.",
        n(&m.upload_bytes),
    );
    put(
        "starling_aggregator_partials_forwarded_total",
        "counter",
        "Partial sums the root acknowledged.",
        n(&m.partials_forwarded),
    );
    put(
        "starling_aggregator_rounds_given_up_total",
        "counter",
        "Rounds given up: too few devices by the cut-off, or refused by the root.",
        n(&m.rounds_given_up),
    );
    let g = |k: &str| doc[k].as_f64().unwrap_or(0.0);
    put(
        "starling_aggregator_cohort_selected",
        "gauge",
        "Devices taken into the open round's cohort.",
        g("selected"),
    );
    put(
        "starling_aggregator_cohort_spooled",
        "gauge",
        "Updates of the open round in the spool.",
        g("spooled"),
    );
    put(
        "starling_aggregator_roster_devices",
        "gauge",
        "Active devices in the copy of the root's roster.",
        g("roster_devices"),
    );
    let phase = a.lock().secure.as_ref().map_or(0.0, |c| {
        use crate::secagg::SecAggPhase as P;
        match c.state.phase {
            P::Advertise => 1.0,
            P::Share => 2.0,
            P::Masked => 3.0,
            P::Unmask => 4.0,
        }
    });
    put(
        "starling_aggregator_secure_phase",
        "gauge",
        "The open secure cohort's SecAgg+ phase: 0 none (or forming), 1 keys, 2 shares, 3 masked inputs, 4 reveals.",
        phase,
    );
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
        .into_response()
}
