//! The live view of a running coordinator over plain HTTP (axum): the status page (`/`: current round,
//! clients, loss and ε per round as a chart), its data (`/api/status`, the same document as `status --json`)
//! Prometheus metrics (`/metrics`), and probes for supervisors (`/healthz`: the round loop is alive;
//! `/readyz`: devices are being served, not draining). Bind it to a local or operator-only address: it is read-only but
//! unauthenticated.
//! What must never live here: anything that changes the coordinator's state, or the status document itself
//! (that is [`crate::status`]).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::service::{Coordinator, Health};

/// The page, self-contained (no external scripts, styles or fonts).
const PAGE: &str = include_str!("status.html");

/// The routes of the status server for `coordinator`.
pub fn router(coordinator: Arc<Coordinator>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/api/status", get(status))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(coordinator)
}

/// A loop silent this long is stuck: liveness fails and a supervisor restarts the process.
const STALL_MS: u64 = 30_000;

/// `/healthz` of a process whose `loop_name` (the round loop, the loop towards the root) ticks `health`.
pub(crate) fn liveness(health: &Health, loop_name: &str) -> Response {
    if health.live(crate::service::now_ms(), STALL_MS) {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{loop_name} has not run in 30 s\n"),
        )
            .into_response()
    }
}

/// `/readyz`: serving, draining or still starting.
pub(crate) fn readiness(health: &Health) -> Response {
    if health.ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else if health.draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n").into_response()
    }
}

async fn healthz(State(c): State<Arc<Coordinator>>) -> Response {
    liveness(c.health(), "the round loop")
}

async fn readyz(State(c): State<Arc<Coordinator>>) -> Response {
    readiness(c.health())
}

async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        PAGE,
    )
        .into_response()
}

fn failed(e: impl std::fmt::Display) -> Response {
    tracing::warn!("status page: {e}");
    (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response()
}

async fn status(State(c): State<Arc<Coordinator>>) -> Response {
    match tokio::task::spawn_blocking(move || c.status_document()).await {
        Ok(Ok(doc)) => (
            [
                (header::CONTENT_TYPE, "application/json"),
                (header::CACHE_CONTROL, "no-store"),
            ],
            doc.to_string(),
        )
            .into_response(),
        Ok(Err(e)) => failed(e),
        Err(e) => failed(e),
    }
}

async fn metrics(State(c): State<Arc<Coordinator>>) -> Response {
    match tokio::task::spawn_blocking(move || c.metrics().render(c.store())).await {
        Ok(Ok(text)) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Ok(Err(e)) => failed(e),
        Err(e) => failed(e),
    }
}
