//! starling-secagg: secure aggregation (SecAgg+) so the coordinator learns only the sum of the
//! devices' deltas, surviving dropouts at every phase.
//!
//! - [`shamir`]: Shamir secret sharing over GF(2^8);
//! - [`graph`]: the round's sparse neighbour graph (Harary graph over a seeded permutation) and
//!   default neighbourhood size and threshold;
//! - [`mask`]: masks expanded with ChaCha20 in Z_{2^32}, and the fixed-point encodings of deltas (per
//!   value, exact; rotated, with modular clipping) with their wrap-around checks;
//! - [`rotation`]: the seeded random rotation the rotated encoding flattens vectors with;
//! - [`protocol`]: the four phases as sans-IO [`protocol::Client`] and [`protocol::Server`] state
//!   machines (X25519 agreement, ChaCha20-Poly1305 share encryption, the consistency check).
//!
//! This crate knows nothing of networks, clocks, files or models: the round engine, the device
//! session and the simulator carry its messages.

pub mod graph;
pub mod mask;
pub mod protocol;
pub mod rotation;
pub mod shamir;

pub use protocol::{
    Client, ClientId, ClientState, PublicKeys, Reveal, RoundParams, Server, ShareKind,
};

/// What can go wrong in secure aggregation.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum SecAggError {
    /// Parameters that cannot work (threshold, graph, encoding range).
    #[error("secure aggregation parameters: {0}")]
    Params(#[from] ParamsError),
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
    Malformed(#[from] Malformed),
    /// A request a client refuses because answering it could reveal a single input.
    #[error("inconsistent unmasking request refused: {0}")]
    Inconsistent(#[from] Inconsistent),
    /// A rotated sum whose spread says some of its coordinates wrapped around the modulus: decoding it
    /// would give wrong values, so it is not used.
    #[error("the unmasked sum likely wrapped around its 2^{bits} modulus ({expected:.2e} coordinates expected to have wrapped): the devices' updates were more aligned than the encoding allows for; raise secure_aggregation.modulus_bits")]
    Wrapped {
        /// Coordinates expected to have wrapped.
        expected: f64,
        /// Modulus bits.
        bits: u32,
    },
}

/// Why a set of secure-aggregation parameters cannot work.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum ParamsError {
    /// Shamir sharing with an impossible threshold.
    #[error("a threshold of {t} out of {n} shares is impossible (1 ≤ t ≤ n ≤ 255)")]
    ShareThreshold {
        /// Threshold.
        t: usize,
        /// Shares.
        n: usize,
    },
    /// A modulus outside 2^1..2^32.
    #[error("a modulus of 2^{0} (1 to 32 bits)")]
    Modulus(u32),
    /// A round's threshold outside 1..=neighbours (or more than 255 neighbours).
    #[error("threshold {t} with {k} neighbours (need 1 ≤ t ≤ k ≤ 255)")]
    Threshold {
        /// Threshold.
        t: usize,
        /// Neighbours.
        k: usize,
    },
    /// A threshold that is not a majority of the neighbours.
    #[error("threshold {t} is not a majority of {k} neighbours: two disjoint sets of responders could each unmask")]
    NotMajority {
        /// Threshold.
        t: usize,
        /// Neighbours.
        k: usize,
    },
    /// A client id outside the round's roster.
    #[error("client {0} is not in the roster")]
    NotInRoster(u32),
    /// A cohort too small or too large.
    #[error("secure aggregation needs 2 to {max} clients, not {n}")]
    Clients {
        /// Clients asked for.
        n: usize,
        /// The largest cohort.
        max: usize,
    },
    /// An odd neighbourhood size below the cohort (Harary graphs need it even).
    #[error("the neighbourhood size must be even (a Harary graph), not {0}")]
    OddNeighbourhood(usize),
    /// An encoding without a positive clip, 1–30 bits and a client.
    #[error("encoding needs a positive clip, 1–30 bits and at least one client (clip {clip}, {bits} bits, {max_clients} clients)")]
    Encoding {
        /// Clip bound.
        clip: f32,
        /// Bits of resolution.
        bits: u32,
        /// Clients per sum.
        max_clients: usize,
    },
    /// A noise standard deviation that is negative or not finite.
    #[error("a noise standard deviation of {0} steps")]
    NoiseSigma(f64),
    /// A noise share that cannot be drawn at this scale.
    #[error("a noise share of {0} steps cannot be drawn")]
    NoiseSteps(u64),
    /// Sums that could wrap around the modulus.
    #[error("{clients} clients' values (and noise) can reach {bound:.3e} ≥ 2^31: the masked sum would wrap; lower the bits or the clients per round")]
    Wrap {
        /// Clients per sum.
        clients: usize,
        /// The largest magnitude a sum could reach.
        bound: f64,
    },
    /// A rotated encoding whose modulus leaves a device's typical word under one integer step.
    #[error("a 2^{bits} modulus for {clients} clients leaves {steps:.2} steps per device's typical rotated value (at least 1 needed): raise the modulus bits or lower the clients per sum")]
    RotatedModulus {
        /// Modulus bits.
        bits: u32,
        /// Clients per sum.
        clients: usize,
        /// Steps per standard deviation of one device's rotated value.
        steps: f64,
    },
    /// Noise shares asked of the rotated encoding (its scale leaves no room for them).
    #[error("the rotated encoding takes no noise shares (its scale is sized for the values alone): use the per-value encoding with distributed noise")]
    RotatedNoise,
    /// An input of the wrong length for the round.
    #[error("{got} values for a round of {want}")]
    InputLength {
        /// Values given.
        got: usize,
        /// The round's length.
        want: usize,
    },
}

/// Why a secure-aggregation message, share or persisted state was refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum Malformed {
    /// Shamir shares with a zero or repeated abscissa, or of unequal lengths.
    #[error("shares with a zero or repeated abscissa or unequal lengths")]
    Shares,
    /// A low-order public key (its agreement would be predictable).
    #[error("a low-order public key (the agreement would be predictable)")]
    LowOrderKey,
    /// The AEAD key could not be set up.
    #[error("the AEAD key could not be set up")]
    AeadKey,
    /// Encrypting the shares failed.
    #[error("sealing shares failed")]
    Sealing,
    /// A persisted client state names a peer that is not its neighbour.
    #[error("a persisted state names a peer that is not a neighbour")]
    StateNeighbour,
    /// Two advertised keys are equal.
    #[error("two advertised keys are equal (a replayed key)")]
    ReplayedKey,
    /// Shares addressed to another client or from a non-neighbour.
    #[error("shares from {from} to {to} are not for client {me} from a neighbour")]
    Misaddressed {
        /// Sender.
        from: u32,
        /// Addressee.
        to: u32,
        /// This client.
        me: u32,
    },
    /// Shares that fail authentication.
    #[error("shares from {0} fail authentication")]
    Unauthenticated(u32),
    /// Decrypted shares of the wrong length or abscissa.
    #[error("shares from {0} are malformed")]
    BadShares(u32),
    /// An input of the wrong length.
    #[error("input of {got} words, the round's are {want}")]
    InputLength {
        /// Words given.
        got: usize,
        /// The round's length.
        want: usize,
    },
    /// No advertised keys for a neighbour.
    #[error("no advertised keys for {0}")]
    NoKeys(u32),
    /// Keys from a client outside the roster, or a second time.
    #[error("keys from {0}: not in the roster or sent twice")]
    UnexpectedKeys(u32),
    /// Shares from a client that advertised no keys, or a second time.
    #[error("shares from {0}: it advertised no keys or shared twice")]
    UnexpectedShares(u32),
    /// One encrypted share message that does not fit.
    #[error("shares from {from} to {to}: not a neighbour, a second message, or not {len} bytes")]
    ShareMessage {
        /// Sender.
        from: u32,
        /// Addressee.
        to: u32,
        /// The expected ciphertext length.
        len: usize,
    },
    /// A client that advertised keys twice, the second time other ones.
    #[error("client {0} sent other keys")]
    OtherKeys(u32),
    /// Reveals that name a sender other than the client that sent them.
    #[error("reveals from {0} name another sender")]
    RevealSender(u32),
    /// A masked input outside the masked-input phase.
    #[error("masked input from {0} outside the masked-input phase")]
    OutOfPhase(u32),
    /// A masked input from a client that shared no keys, a second one, or of the wrong length.
    #[error("masked input from {0}: it shared no keys, reported twice or sent the wrong length")]
    UnexpectedInput(u32),
    /// A revealed secret that is not 32 bytes.
    #[error("a 32-byte secret expected")]
    SecretLength,
    /// A packed byte string of the wrong length.
    #[error("{bytes} bytes cannot hold {len} words of {bits} bits")]
    Packing {
        /// Bytes given.
        bytes: usize,
        /// Words expected.
        len: usize,
        /// Bits per word.
        bits: u32,
    },
}

/// An unmasking request a client refuses because answering could reveal a single input.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum Inconsistent {
    /// A client named both dropped and reported.
    #[error("client {0} is named as dropped and as reported: revealing both shares would unmask its input")]
    DroppedAndReported(u32),
    /// A share asked for after the client's other share was revealed.
    #[error("client {0}'s other share was revealed already")]
    OtherShareRevealed(u32),
}
