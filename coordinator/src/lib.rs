//! starling-coordinator: the aggregation side of Starling.
//!
//! - [`strategy`]: aggregation rules behind one trait (FedAvg family, server optimizers, robust rules,
//!   norm bounding, DP-FedAvg);
//! - [`engine`]: the sans-IO round engine (events in, actions out, explicit time: *when*); [`secagg`]: its
//!   secure-aggregation phases (SecAgg+ server, settings, per-phase deadlines);
//! - [`round_core`]: the sans-IO round policy (*what*: strategy, privacy charge, step, signing, the one Task
//!   builder), which every driver uses and none re-implements;
//! - [`store`]: durable state in sled (clients, tokens, rounds, updates, models, ledger);
//! - [`failpoint`]: named crash points for the SIGKILL recovery test (shared with the device binary);
//! - [`status`]: the status document and metrics; [`http`]: the live status page and `/metrics`;
//! - [`config`]: coordinator.toml; [`service`]: the QUIC driver of the core (`serve`); [`ops`]: operator commands;
//! - [`admin`]: the operator's authenticated channel into a running `serve` (a Unix socket);
//!   [`backup`]: consistent backups of a coordinator directory and their restore;
//! - [`aggregator`]: the edge aggregator (`aggregator serve`): devices' protocol in front, one partial sum
//!   per round to the root behind, a durable spool between.
//!
//! What must never live here: training or model code paths of the devices (those are the client's), and
//! in the engine and strategies, any I/O.

pub mod admin;
pub mod aggregator;
pub mod backup;
pub mod config;
pub mod engine;
pub use starling_cli::failpoint;
pub mod http;
pub mod ops;
pub mod round_core;
pub mod secagg;
pub mod service;
pub mod status;
pub mod store;
pub mod strategy;
