//! starling-privacy: Starling's differential privacy — clipping, exact Gaussian noise, accountants and ledgers.
//!
//! What lives here: [`noise`] (the Gaussian mechanism on f32 vectors, its guarantee read from opendp's privacy
//! map, clipping, DP-FedAvg helpers), [`sampler`] (the fast exact discrete Gaussian sampler), [`rdp`] and [`pld`]
//! (accountants for the Poisson-subsampled Gaussian, ported from Google's dp_accounting and tested against it),
//! [`accountant`] (heterogeneous composition, ε↔δ, σ calibration), [`ledger`] (per-client and global budgets)
//! and [`ddg`] (Rényi-DP of the distributed discrete Gaussian under secure aggregation, tested against the
//! published reference).
//! What must never live here: burn, sockets, clocks or files — callers hand in vectors and get numbers back.

pub mod accountant;
pub mod ddg;
pub mod ledger;
pub mod noise;
pub mod pld;
pub mod rdp;
pub mod sampler;
mod special;

pub use accountant::{
    calibrate_noise_multiplier, AccountantKind, Checkpoint, DpEvent, PrivacySpent,
};
pub use ledger::{Budget, Ledger, LedgerEntry, LedgerScope};
pub use noise::{
    add_central_noise, clip_and_sum, clip_l2, l2_norm, privatize_client_delta, GaussianMechanism,
    NoisePlacement,
};

/// What can go wrong in privacy code: every variant names the parameter or input at fault.
#[derive(Debug, thiserror::Error)]
pub enum PrivacyError {
    /// A parameter outside its valid range (sampling rate, noise multiplier, δ, budget, ...).
    #[error("invalid privacy parameter: {0}")]
    InvalidParameter(String),
    /// A vector of the wrong length for the mechanism it was handed to.
    #[error("vector length {got} does not match the expected {expected}")]
    LengthMismatch {
        /// The length the mechanism was built for.
        expected: usize,
        /// The length received.
        got: usize,
    },
    /// A NaN or infinity where only finite values are allowed.
    #[error("non-finite value at index {index}")]
    NonFinite {
        /// Position of the first offending element.
        index: usize,
    },
    /// A noise multiplier so small that its privacy loss distribution would not fit in memory: its ε is
    /// enormous, and the RDP accountant handles it.
    #[error("the PLD of the Gaussian at noise multiplier {noise_multiplier} needs {buckets:.3e} buckets (at most {max}): its privacy loss is enormous; use the RDP accountant")]
    PldTooLarge {
        /// The noise multiplier σ.
        noise_multiplier: f64,
        /// The buckets its discretised PMF would take.
        buckets: f64,
        /// The most buckets allowed.
        max: usize,
    },
    /// Stored accounting state (a checkpoint of a composition) that does not read back as what was written,
    /// or does not belong to the events it is read back with.
    #[error("stored privacy accounting: {0}")]
    Corrupt(String),
    /// The operating system's entropy source failed.
    #[error("entropy source failed: {0}")]
    Entropy(String),
    /// opendp refused to build or map a measurement.
    #[error("opendp: {0}")]
    Opendp(String),
    /// A charge would take a ledger past its budget; nothing was recorded.
    #[error("privacy budget exceeded for {scope}: spending would reach ε = {would_reach:.4} (δ = {delta:e}) but the budget is ε = {budget:.4}")]
    BudgetExceeded {
        /// Whose budget (a client id or "global").
        scope: String,
        /// ε after the refused charge.
        would_reach: f64,
        /// The budget's δ.
        delta: f64,
        /// The budget's ε.
        budget: f64,
    },
    /// A serialized ledger that cannot be read.
    #[error("ledger is malformed: {0}")]
    Malformed(String),
}
