//! starling-client: the device runtime.
//!
//! - [`session`]: the sans-IO client session — a device's protocol life as a state machine (the QUIC driver
//!   and the simulator drive the same one);
//! - [`driver`]: the QUIC driver that runs a session for days over `starling-transport`;
//! - [`train`]: local training for one task (LoRA, FedProx, DP-SGD, user-level clipping, encoding);
//! - [`secure`]: a secure task's integer encoding and masking of the stored update;
//! - [`state`]: the state directory (key, progress, pending updates, model cache), written atomically;
//! - [`config`]: the `client.toml` settings;
//! - [`commands`]: `enrol` and `status`; [`local`]: `finetune` (no coordinator).
//!
//! What must never live here: coordinator logic (the two meet only in `starling-protocol`).

pub mod commands;
pub mod config;
pub mod driver;
pub mod local;
pub mod secure;
pub mod session;
pub mod state;
pub mod train;
