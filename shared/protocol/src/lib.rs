//! starling-protocol: everything that crosses the wire between a device and the coordinator, as bytes.
//!
//! - [`frame`]: length-prefixed frames whose length is checked against a cap before anything is allocated;
//! - [`message`]: the typed messages of a round (hello, task, manifest, model fetch, update, ack, error, goodbye),
//!   each frame carrying an explicit protocol version and message kind;
//! - [`bulk`]: model blobs and update deltas streamed in bounded chunks against a declared size and SHA-256;
//! - [`update`]: adapter schemas and the flat delta encodings (f32, int8 with unbiased stochastic rounding);
//! - [`manifest`]: ed25519-signed model manifests with rollback protection;
//! - [`identity`]: device and coordinator keys, fingerprints, one-time enrolment tokens;
//! - [`backoff`]: the reconnection policy both ends share (exponential backoff with full jitter), and
//!   [`Refusal`]: the refusals of a device's key that no retry can fix — so the device session, a sans-IO
//!   core, needs nothing of the transport.
//!
//! What must never live here: sockets, async runtimes, clocks or files — callers hand in bytes and the
//! current time. Every decoder takes its limits as parameters and returns a typed [`ProtocolError`].

pub mod backoff;
pub mod bulk;
mod codec;
pub mod frame;
pub mod identity;
pub mod manifest;
pub mod message;
pub mod update;

pub use bulk::{BulkDigest, BulkHeader, BulkReceiver};
pub use frame::{FrameDecoder, MAX_FRAME_DEFAULT};
pub use identity::{EnrolmentToken, Fingerprint, SigningIdentity, TokenHash};
pub use manifest::{DpMode, DpRecord, Manifest, ManifestVerifier, SignedManifest};
pub use message::{ErrorCode, Message, PROTOCOL_VERSION, SUPPORTED_VERSIONS};
pub use update::{AdapterSchema, Encoding, TensorSpec, UpdateLimits};

/// A SHA-256 digest: of a blob, a manifest body, an adapter schema.
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// The SHA-256 of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        use sha2::Digest as _;
        Self(sha2::Sha256::digest(bytes).into())
    }

    /// Lower-case hex, as operators see it.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    /// The digest written by [`Digest::to_hex`]; `None` for anything but 64 hex digits.
    pub fn from_hex(s: &str) -> Option<Self> {
        key_from_hex(s).map(Self)
    }
}

impl std::fmt::Debug for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Digest({})", &self.to_hex()[..16])
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// 32 bytes written as 64 hex digits (a digest, a public key); `None` for anything else.
pub fn key_from_hex(s: &str) -> Option<[u8; 32]> {
    from_hex(s).and_then(|b| <[u8; 32]>::try_from(b).ok())
}

/// Bytes from lower-case or upper-case hex; `None` for odd lengths or non-hex characters.
pub fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A refusal of a device by the coordinator, or of the coordinator by a device, that retrying cannot
/// fix: what a device runtime tells its operator (the transport maps its errors to it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The coordinator revoked this device's key.
    Revoked,
    /// The coordinator does not know this device's key (never enrolled, or enrolled elsewhere).
    NotEnrolled,
    /// The coordinator's key is not the pinned one (or its TLS is otherwise unacceptable).
    UntrustedCoordinator,
}

/// The round a task, update or manifest belongs to.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct RoundId(pub u64);

/// A published model version (0 is the base model with empty adapters).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct ModelVersion(pub u64);

/// Rounds read as "round 4" in text for people.
impl std::fmt::Display for RoundId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "round {}", self.0)
    }
}

/// Versions read as "version 3" in text for people.
impl std::fmt::Display for ModelVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "version {}", self.0)
    }
}

/// The client-chosen id of one update: re-sending the same id is idempotent.
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct UpdateId(pub [u8; 16]);

impl std::fmt::Debug for UpdateId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "UpdateId({})", hex(&self.0))
    }
}

/// Everything that can be wrong with bytes from a peer; each variant names the limit or field at fault.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ProtocolError {
    /// A frame declared a length above the receiver's cap (checked before allocating).
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    FrameTooLarge {
        /// The declared length.
        len: u64,
        /// The receiver's cap.
        max: u64,
    },
    /// The stream ended inside a frame or a bulk payload.
    #[error("truncated: expected {expected} bytes, got {got}")]
    Truncated {
        /// Bytes that were due.
        expected: u64,
        /// Bytes that arrived.
        got: u64,
    },
    /// A frame was sent with a protocol version this build does not speak.
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u16),
    /// Version negotiation found no version both sides speak.
    #[error("no common protocol version (peer offers {offered:?}, we speak {supported:?})")]
    NoCommonVersion {
        /// What the peer offered.
        offered: Vec<u16>,
        /// What this build speaks.
        supported: Vec<u16>,
    },
    /// A frame carried a message kind this build does not know.
    #[error("unknown message kind {0}")]
    UnknownMessageKind(u8),
    /// A message body did not decode as its kind's structure, or had trailing bytes.
    #[error("malformed {what}: {detail}")]
    Malformed {
        /// What was being decoded.
        what: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// A message arrived where the exchange expected another.
    #[error("unexpected message: expected {expected}, got {got}")]
    Unexpected {
        /// What the exchange expected.
        expected: &'static str,
        /// What arrived.
        got: &'static str,
    },
    /// A bulk payload declared more bytes than the receiver accepts.
    #[error("payload of {len} bytes exceeds the limit of {max}")]
    PayloadTooLarge {
        /// The declared size.
        len: u64,
        /// The receiver's cap.
        max: u64,
    },
    /// A bulk payload sent more bytes than it declared.
    #[error("payload overrun: declared {declared} bytes, received more")]
    Overrun {
        /// The declared size.
        declared: u64,
    },
    /// Received bytes do not hash to the declared digest.
    #[error("digest mismatch: declared {declared}, received {actual}")]
    DigestMismatch {
        /// The digest declared up front.
        declared: Digest,
        /// The digest of what arrived.
        actual: Digest,
    },
    /// A bulk payload's bytes do not hash to the BLAKE3 digest declared before them.
    #[error("bulk payload digest mismatch: declared {declared}, received {actual}")]
    BulkDigestMismatch {
        /// The digest declared up front.
        declared: bulk::BulkDigest,
        /// The digest of what arrived.
        actual: bulk::BulkDigest,
    },
    /// An update was encoded for another adapter schema.
    #[error("adapter schema mismatch: update is for {got}, expected {expected}")]
    SchemaMismatch {
        /// The receiver's schema hash.
        expected: Digest,
        /// The update's schema hash.
        got: Digest,
    },
    /// A value that must be finite was NaN or infinite.
    #[error("non-finite value at index {index}")]
    NonFinite {
        /// Position of the first non-finite value.
        index: u64,
    },
    /// An adapter schema is invalid (empty, unsorted, duplicate names, zero or overflowing shapes).
    #[error("invalid adapter schema: {0}")]
    InvalidSchema(String),
    /// A manifest signature does not verify.
    #[error("manifest signature does not verify")]
    BadSignature,
    /// A manifest is signed by a key this verifier does not trust.
    #[error("manifest signed by unknown key {0}")]
    UnknownKey(Fingerprint),
    /// A manifest is not newer than the one held (rollback or replay).
    #[error("manifest version {got} is not newer than held version {held}")]
    Rollback {
        /// Version held.
        held: u64,
        /// Version offered.
        got: u64,
    },
    /// A manifest names a parent that is not the manifest held.
    #[error("manifest parent {got:?} is not the held manifest {held}")]
    ParentMismatch {
        /// Digest of the held manifest.
        held: Digest,
        /// The parent the new manifest names.
        got: Option<Digest>,
    },
    /// A key or token had the wrong form.
    #[error("invalid {what}: {detail}")]
    InvalidKey {
        /// Which key or token.
        what: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// The operating system could not provide randomness.
    #[error("no randomness from the operating system: {0}")]
    Entropy(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_rejects_garbage() {
        let d = Digest::of(b"abc");
        assert_eq!(
            d.to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(from_hex(&d.to_hex()).unwrap(), d.0.to_vec());
        assert_eq!(Digest::from_hex(&d.to_hex()), Some(d));
        assert_eq!(Digest::from_hex("abcd"), None);
        assert_eq!(from_hex("abc"), None);
        assert_eq!(from_hex("zz"), None);
        assert_eq!(from_hex("é1"), None);
    }
}
