//! Choice of burn CPU backend at run time (`--backend flex|ndarray`).
//!
//! burn 0.22 picks the backend from the device; both pure-Rust CPU backends are compiled in and
//! `starling-bench` compares them. Flex is the default: it is burn's successor to NdArray and was
//! the faster of the two in our benchmark (see README). Nothing else belongs here.

use burn::tensor::Device;

/// A burn CPU backend.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// burn-flex, burn's current pure-Rust CPU backend.
    #[default]
    Flex,
    /// burn-ndarray, the older (deprecated upstream) CPU backend.
    Ndarray,
}

impl Backend {
    /// The burn device of this backend.
    pub fn device(self) -> Device {
        match self {
            Self::Flex => Device::flex(),
            #[allow(deprecated)] // compiled in on purpose: benchmarked against flex
            Self::Ndarray => Device::ndarray(),
        }
    }

    /// Lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Flex => "flex",
            Self::Ndarray => "ndarray",
        }
    }
}
