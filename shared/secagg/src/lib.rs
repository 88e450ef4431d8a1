//! starling-secagg: secure aggregation (SecAgg+) so the coordinator learns only the sum of the
//! devices' deltas, surviving dropouts at every phase.
//!
//! - [`shamir`]: Shamir secret sharing over GF(2^8);
//! - [`graph`]: the round's sparse neighbour graph (Harary graph over a seeded permutation) and
//!   default neighbourhood size and threshold;
//! - [`mask`]: masks expanded with ChaCha20 in Z_{2^32}, and the fixed-point encoding of deltas with
//!   its wrap-around check;
//! - [`protocol`]: the four phases as sans-IO [`protocol::Client`] and [`protocol::Server`] state
//!   machines (X25519 agreement, ChaCha20-Poly1305 share encryption, the consistency check).
//!
//! This crate knows nothing of networks, clocks, files or models: the round engine, the device
//! session and the simulator carry its messages.

pub mod graph;
pub mod mask;
pub mod protocol;
pub mod shamir;

pub use protocol::{
    Client, ClientId, ClientState, PublicKeys, Reveal, RoundParams, Server, ShareKind,
};

/// What can go wrong in secure aggregation.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum SecAggError {
    /// Parameters that cannot work (threshold, graph, encoding range).
    #[error("secure aggregation parameters: {0}")]
    Params(String),
    /// Fewer shares or survivors than the threshold: the round cannot be unmasked.
    #[error("{have} shares or survivors, {need} needed: the round cannot be unmasked")]
    NotEnoughShares {
        /// Available.
        have: usize,
        /// Needed.
        need: usize,
    },
    /// A message that does not fit the protocol (wrong sender or recipient, failed authentication).
    #[error("secure aggregation message refused: {0}")]
    Malformed(String),
    /// A request a client refuses because answering it could reveal a single input.
    #[error("inconsistent unmasking request refused: {0}")]
    Inconsistent(String),
}
