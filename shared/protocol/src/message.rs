//! The messages of a round, one per frame: `version u16 LE | kind u8 | body`, the body being the kind's
//! structure in the crate's canonical bincode encoding.
//!
//! Versions and kinds are explicit bytes rather than serde enum tags, so an unknown version or kind is a
//! typed error ([`ProtocolError::UnsupportedVersion`], [`ProtocolError::UnknownMessageKind`]) and not a
//! generic decode failure. Exchanges (each on its own bidirectional QUIC stream):
//! `Hello → Welcome`, `Enrol → Enrolled`, `TaskRequest → Task | NoTask`, `ManifestRequest → Manifest`,
//! `ModelFetch → Blob + bytes`, `Upload + bytes → Ack`, `Decline → NoTask`, `SecAgg → SecAggReply` (the
//! secure-aggregation steps of a round; the masked input itself travels as an `Upload`); any request may be
//! answered by `Error`; `Goodbye` ends a session. What must never live here: I/O or round logic.

use crate::bulk::BulkHeader;
use crate::identity::Fingerprint;
use crate::identity::SigningIdentity;
use crate::manifest::SignedManifest;
use crate::manifest::{DpMode, DpRecord, Manifest};
use crate::update::Encoding;
use crate::update::{AdapterSchema, TensorSpec};
use crate::{codec, Digest, ModelVersion, ProtocolError, RoundId, UpdateId};
use starling_secagg::protocol::EncryptedShares;
use starling_secagg::{PublicKeys, Reveal, RoundParams};

/// The protocol version this build speaks natively. Version 5: an aggregator's roster lists its revoked
/// devices beside its active ones (`RosterDevices`), so a revoked device hears "revoked" there too.
/// Version 4: a task names the local optimizer
/// (`TrainParams::optimizer`). Version 3: a secure task says whether its encoding is
/// rotated (`SecAggTask::rotated`). Version 2: bulk payloads declare a BLAKE3 digest (version 1 declared
/// SHA-256 in the same 32 bytes). An older peer is refused at its hello rather than misreading a task.
pub const PROTOCOL_VERSION: u16 = 5;
/// Every version this build can speak, newest last.
pub const SUPPORTED_VERSIONS: &[u16] = &[5];
/// Cap on free-text fields (names, reasons, error messages).
pub const MAX_TEXT: usize = 4096;

/// Opens a session: the versions the client speaks and what it runs.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Hello {
    /// Protocol versions the client speaks.
    pub versions: Vec<u16>,
    /// Client software and version, for the operator's logs.
    pub software: String,
}

/// The coordinator's answer to [`Hello`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Welcome {
    /// The version both will speak.
    pub version: u16,
    /// The client's id as the coordinator sees it (its key fingerprint).
    pub client_id: Fingerprint,
    /// The newest published model version.
    pub latest_model: ModelVersion,
}

/// Enrolment: the one exchange a not-yet-enrolled key may make (its key is the TLS client key).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Enrol {
    /// The one-time token the operator handed over.
    pub token: String,
    /// A human-readable device name.
    pub name: String,
}

/// Enrolment succeeded.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Enrolled {
    /// The client's id from now on.
    pub client_id: Fingerprint,
}

/// A client asks for work.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TaskRequest {
    /// The model version the client holds, if any.
    pub held_model: Option<ModelVersion>,
}

/// Local training hyper-parameters of a task.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainParams {
    /// Optimizer steps to run locally.
    pub local_steps: u32,
    /// Sequences per step.
    pub batch_size: u32,
    /// Tokens per sequence.
    pub seq_len: u32,
    /// Learning rate.
    pub learning_rate: f32,
    /// FedProx proximal term μ (0 = plain local training).
    pub fedprox_mu: f32,
    /// The local update rule.
    pub optimizer: LocalOptimizer,
}

/// The update rule a device trains with (its gradient-norm bound and decay are fixed by the client).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum LocalOptimizer {
    /// AdamW: every value moves by about the learning rate.
    #[default]
    #[serde(rename = "adamw")]
    AdamW,
    /// Plain SGD: the step is the learning rate times the gradient (DP-FedAvg's local rule).
    #[serde(rename = "sgd")]
    Sgd,
}

impl LocalOptimizer {
    /// Its name in configuration files and reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::AdamW => "adamw",
            Self::Sgd => "sgd",
        }
    }
}

/// Example-level DP-SGD a client must run while training (Poisson sampling, per-example clipping, noise).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DpSgdTask {
    /// Noise multiplier σ (> 0).
    pub noise_multiplier: f64,
    /// Per-example L2 clip bound C (> 0).
    pub clip: f64,
    /// Poisson sampling rate q in (0, 1]; 0 lets the client use batch size / its number of sequences.
    pub sampling_rate: f64,
    /// δ at which the device accounts ε, in (0, 1).
    pub delta: f64,
}

/// The user-level DP a task asks of a device for its whole delta (absent: none).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum UserDp {
    /// Clip the delta to this L2 norm (> 0); the coordinator adds the noise (central DP).
    Clip {
        /// The L2 bound.
        clip: f64,
    },
    /// Clip the delta to `clip` and add this device's share of the noise: the shares of `clients`
    /// devices add up to Gaussian noise of `noise_multiplier` × `clip` (distributed DP).
    ClipAndNoise {
        /// The L2 bound (> 0).
        clip: f64,
        /// The noise multiplier of the shares' sum (> 0).
        noise_multiplier: f64,
        /// Devices whose shares add up to the full noise (≥ 1).
        clients: u32,
    },
}

impl UserDp {
    /// The L2 bound of the delta.
    pub fn clip(&self) -> f64 {
        match *self {
            UserDp::Clip { clip } | UserDp::ClipAndNoise { clip, .. } => clip,
        }
    }

    /// The noise the device adds: (multiplier of the shares' sum, devices sharing it), if any.
    pub fn noise_share(&self) -> Option<(f64, u32)> {
        match *self {
            UserDp::Clip { .. } => None,
            UserDp::ClipAndNoise {
                noise_multiplier,
                clients,
                ..
            } => Some((noise_multiplier, clients)),
        }
    }

    /// Whether every number is finite and in range.
    fn valid(&self) -> bool {
        let clip = self.clip();
        clip.is_finite()
            && clip > 0.0
            && self
                .noise_share()
                .is_none_or(|(z, n)| z.is_finite() && z > 0.0 && n >= 1)
    }
}

/// Privacy settings a client must apply to its update and its training.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DpTask {
    /// User-level DP of the whole delta (`None`: no clipping, no device noise).
    pub user: Option<UserDp>,
    /// Example-level DP-SGD during local training, if asked for.
    pub dp_sgd: Option<DpSgdTask>,
}

impl DpTask {
    /// No DP at all.
    pub const OFF: DpTask = DpTask {
        user: None,
        dp_sgd: None,
    };
}

/// The LoRA adapter a task trains: its shapes are the manifest's schema, these are the settings the schema
/// cannot carry.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraSpec {
    /// Rank r.
    pub rank: u32,
    /// Scaling numerator α (the update is scaled by α / r).
    pub alpha: f32,
    /// Adapted projections (q, k, v, o, gate, up, down).
    pub targets: Vec<String>,
}

/// Work for one round.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Task {
    /// The round.
    pub round: RoundId,
    /// The model to start from, with its signed manifest.
    pub manifest: SignedManifest,
    /// Reply no later than this (milliseconds since the Unix epoch).
    pub deadline_unix_ms: u64,
    /// Local training settings.
    pub params: TrainParams,
    /// Privacy settings.
    pub dp: DpTask,
    /// The adapter's LoRA settings.
    pub lora: LoraSpec,
    /// How to encode the update.
    pub encoding: Encoding,
    /// Largest encoded update the coordinator accepts.
    pub max_update_bytes: u64,
    /// Secure aggregation: when set, the update is encoded as integers, masked and summed (SecAgg+), and
    /// the coordinator never sees it alone.
    pub secagg: Option<SecAggTask>,
}

/// A device's part in a round's secure aggregation.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SecAggTask {
    /// The round's parameters (roster size, neighbours, threshold, graph seed, words, modulus bits).
    pub params: RoundParams,
    /// This device's index in the roster.
    pub id: u32,
    /// Integer encoding: each delta value is clipped to `[-clip, clip]` (`clip` as f32 bits, so the
    /// struct stays `Eq`) and scaled to `2^value_bits` steps per `clip`.
    pub clip_bits: u32,
    /// Steps per `clip` as a power of two.
    pub value_bits: u32,
    /// 0: every device weighs the same; `c > 0`: the device sends `w·delta` and `w·clip` as a last
    /// value, `w = min(examples, c) / c`.
    pub weight_cap: u64,
    /// The rotated encoding (`starling_secagg::mask`), when set: the delta is clipped to L2 norm `clip`
    /// (`value_bits` unused), rotated and summed modulo the round's `2^bits`.
    pub rotated: Option<RotatedTask>,
}

/// The rotated encoding of a secure task.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RotatedTask {
    /// Values a device encodes (its delta, and its weight value with a `weight_cap`); the round's words
    /// are these padded to whole rotation blocks.
    pub values: u64,
}

impl SecAggTask {
    /// The clip bound as a float.
    pub fn clip(&self) -> f32 {
        f32::from_bits(self.clip_bits)
    }

    /// The integer encoding the task asks for (devices encode with it; the sum is decoded with it). A
    /// rotated task is refused when its values do not pad to the round's words.
    pub fn encoding(
        &self,
    ) -> Result<starling_secagg::mask::Encoding, starling_secagg::SecAggError> {
        use starling_secagg::mask::Encoding;
        let p = &self.params;
        let Some(r) = &self.rotated else {
            return Encoding::new(self.clip(), self.value_bits, p.clients);
        };
        let values = usize::try_from(r.values).unwrap_or(usize::MAX);
        let words = starling_secagg::rotation::padded_len(values);
        if words != p.len {
            return Err(starling_secagg::ParamsError::InputLength {
                got: words,
                want: p.len,
            }
            .into());
        }
        // With a weight value beside the delta (both scaled by the weight), the vector's norm is at most
        // √2 · clip.
        let norm = if self.weight_cap > 0 {
            self.clip() * std::f32::consts::SQRT_2
        } else {
            self.clip()
        };
        Encoding::rotated(self.clip(), norm, p.bits, p.clients, values, p.graph_seed)
    }
}

/// Largest neighbourhood a secure-aggregation message may describe (the graph's degree limit).
pub const MAX_SECAGG_NEIGHBOURS: usize = 255;
/// Largest roster a secure-aggregation message may name.
pub const MAX_SECAGG_CLIENTS: usize = starling_secagg::graph::MAX_CLIENTS;

/// One step of a device in a round's secure aggregation.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum SecAggStep {
    /// Phase 1: the device's public keys.
    Keys(PublicKeys),
    /// "What now?": answered with what the device's next phase needs, or `Wait`.
    Next,
    /// Phase 2: the device's encrypted shares, one message per neighbour.
    Shares(Vec<EncryptedShares>),
    /// Phase 4: the shares the unmasking request asked for.
    Reveals(Vec<Reveal>),
}

/// A secure-aggregation step for a round (answered by [`SecAggReply`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SecAggRequest {
    /// The round.
    pub round: RoundId,
    /// The step.
    pub step: SecAggStep,
}

/// The coordinator's answer to a [`SecAggRequest`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum SecAggReply {
    /// Taken; the phase is still open: ask `Next` after this long.
    Wait {
        /// Milliseconds.
        retry_after_ms: u64,
    },
    /// Phase 1 closed: the public keys of the device's neighbours that advertised.
    Roster(Vec<(u32, PublicKeys)>),
    /// Phase 2 closed: the shares the device's neighbours encrypted to it; send the masked input.
    Mailbox(Vec<EncryptedShares>),
    /// Phase 3 closed: reveal shares of the dropped clients' mask keys and the reporting clients'
    /// self-mask seeds.
    Unmask {
        /// Clients that shared keys but sent no masked input.
        dropped: Vec<u32>,
        /// Clients whose masked input is in the sum.
        reported: Vec<u32>,
    },
    /// The device's part in the round is over.
    Done,
    /// The device is out of this round's aggregation (it missed a phase, or the round was abandoned).
    Excluded {
        /// Why, for logs.
        reason: String,
    },
}

/// No work now.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NoTask {
    /// Ask again after this many milliseconds.
    pub retry_after_ms: u64,
    /// Why, for logs.
    pub reason: String,
}

/// Asks for a model version's signed manifest.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ManifestRequest {
    /// The version, or `None` for the newest.
    pub version: Option<ModelVersion>,
}

/// Which blob of a model version to fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum BlobKind {
    /// The adapter (what changes between versions).
    Adapter,
    /// The quantized frozen base model container.
    Base,
}

/// Asks for a blob; answered by [`Message::Blob`] followed by the bytes.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModelFetch {
    /// The model version.
    pub version: ModelVersion,
    /// Which blob.
    pub kind: BlobKind,
}

/// Training figures a client reports with its update.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct UpdateMetrics {
    /// Mean training loss over the local steps.
    pub train_loss: f32,
    /// Local steps run.
    pub steps: u32,
    /// Example-level ε the device spent on this update (0 without DP-SGD).
    pub epsilon_spent: f64,
}

/// Announces an update upload; the encoded update's bytes follow.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Upload {
    /// Idempotency key: re-sending the same id is acknowledged without counting twice.
    pub update_id: UpdateId,
    /// The round it answers.
    pub round: RoundId,
    /// The model version it was trained from.
    pub model_version: ModelVersion,
    /// The adapter schema it is laid out by.
    pub schema: Digest,
    /// Local training examples behind it (FedAvg weight).
    pub num_examples: u64,
    /// Training figures.
    pub metrics: UpdateMetrics,
    /// Size and digest of the encoded update that follows.
    pub body: BulkHeader,
}

/// An edge aggregator forwards its cohort's weighted partial sum for a round to the root; the sum's f32
/// values (little-endian, the adapter schema's length) follow. Answered with [`Message::Ack`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Forward {
    /// Idempotency key: one per aggregator and round, so a resend after a restart is a duplicate.
    pub update_id: UpdateId,
    /// The round it answers.
    pub round: RoundId,
    /// The model version its devices trained from.
    pub model_version: ModelVersion,
    /// The adapter schema it is laid out by.
    pub schema: Digest,
    /// Devices in the sum.
    pub count: u32,
    /// Σ of their weights (examples with DP off, one each under user-level DP).
    pub weight: f64,
    /// Σ of their training losses.
    pub loss: f64,
    /// The bound each delta was clipped to before summing (`None`: not clipped, DP off).
    pub clip: Option<f64>,
    /// Size and digest of the sum that follows.
    pub body: BulkHeader,
}

/// An edge aggregator registers a device's key with the one-time token the device presented to it.
/// Answered with [`Message::Enrolled`] or a typed error.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EnrolFor {
    /// The device's key fingerprint (from its TLS handshake with the aggregator).
    pub client: Fingerprint,
    /// What the device sent.
    pub enrol: Enrol,
}

/// An edge aggregator asks for the active device keys, unless its copy is of `generation`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RosterRequest {
    /// The generation the aggregator holds (0: none).
    pub generation: u64,
}

/// An aggregator's device keys (`None`: unchanged since the generation asked about).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Roster {
    /// This roster's generation (changes with every enrolment and revocation).
    pub generation: u64,
    /// The devices, if changed.
    pub devices: Option<RosterDevices>,
}

/// The devices of one aggregator's roster: those it admits and those revoked at the root.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RosterDevices {
    /// Active devices' fingerprints: admitted.
    pub active: Vec<Fingerprint>,
    /// Revoked devices' fingerprints: refused as revoked (not as strangers).
    pub revoked: Vec<Fingerprint>,
}

/// Most devices a roster may list, active and revoked together (16 MiB frames at 32 bytes each, with
/// room to spare).
pub const MAX_ROSTER: usize = 400_000;

/// The update is durably stored.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Ack {
    /// The update acknowledged.
    pub update_id: UpdateId,
    /// It had been received before (counted once).
    pub duplicate: bool,
}

/// What went wrong, in terms a client can act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ErrorCode {
    /// The request was malformed or out of place.
    BadRequest,
    /// The key is not enrolled.
    NotEnrolled,
    /// The key was revoked.
    Revoked,
    /// The enrolment token is unknown or used.
    BadToken,
    /// Too many requests; back off.
    RateLimited,
    /// The round is closed.
    LateUpdate,
    /// The update is for another model version.
    WrongModelVersion,
    /// The update is for another adapter schema.
    SchemaMismatch,
    /// Something exceeded a size cap.
    TooLarge,
    /// Bytes did not match their declared digest.
    DigestMismatch,
    /// The requested thing does not exist.
    NotFound,
    /// The privacy budget would be exceeded.
    BudgetExhausted,
    /// Temporarily unavailable; retry later.
    Unavailable,
    /// The coordinator failed internally.
    Internal,
}

/// Error codes read as words in text for people ("late update", not `LateUpdate`).
impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ErrorCode::BadRequest => "bad request",
            ErrorCode::NotEnrolled => "not enrolled",
            ErrorCode::Revoked => "revoked",
            ErrorCode::BadToken => "bad enrolment token",
            ErrorCode::RateLimited => "rate limited",
            ErrorCode::LateUpdate => "late update",
            ErrorCode::WrongModelVersion => "wrong model version",
            ErrorCode::SchemaMismatch => "adapter schema mismatch",
            ErrorCode::TooLarge => "too large",
            ErrorCode::DigestMismatch => "digest mismatch",
            ErrorCode::NotFound => "not found",
            ErrorCode::BudgetExhausted => "privacy budget exhausted",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal error",
        })
    }
}

/// A typed error reply.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ErrorReply {
    /// What kind of failure.
    pub code: ErrorCode,
    /// Details for logs.
    pub message: String,
}

/// A client declines the task of a round (answered by [`NoTask`]): its device policy forbids it, e.g. the
/// task would take the device past its own privacy budget.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Decline {
    /// The round declined.
    pub round: RoundId,
    /// Why, as a code the coordinator counts (`BudgetExhausted`, `TooLarge`, `Unavailable`, ...).
    pub code: ErrorCode,
    /// Details for the operator's log.
    pub reason: String,
}

/// Ends a session.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Goodbye {
    /// Why, for logs.
    pub reason: String,
}

/// Every message of the protocol.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// Client opens a session.
    Hello(Hello),
    /// Coordinator accepts it.
    Welcome(Welcome),
    /// Client enrols its key with a token.
    Enrol(Enrol),
    /// Enrolment succeeded.
    Enrolled(Enrolled),
    /// Client asks for work.
    TaskRequest(TaskRequest),
    /// Work for one round.
    Task(Box<Task>),
    /// No work now.
    NoTask(NoTask),
    /// Client asks for a signed manifest.
    ManifestRequest(ManifestRequest),
    /// A signed manifest.
    Manifest(SignedManifest),
    /// Client asks for a blob.
    ModelFetch(ModelFetch),
    /// A blob's size and digest; the bytes follow.
    Blob(BulkHeader),
    /// An update's header; the bytes follow.
    Upload(Box<Upload>),
    /// The update is durable.
    Ack(Ack),
    /// A typed error.
    Error(ErrorReply),
    /// End of session.
    Goodbye(Goodbye),
    /// Client declines a round's task.
    Decline(Decline),
    /// A secure-aggregation step.
    SecAgg(Box<SecAggRequest>),
    /// The answer to a secure-aggregation step.
    SecAggReply(Box<SecAggReply>),
    /// An edge aggregator's partial sum for a round.
    Forward(Box<Forward>),
    /// An edge aggregator enrols a device.
    EnrolFor(EnrolFor),
    /// An edge aggregator asks for the active devices.
    RosterRequest(RosterRequest),
    /// The active devices.
    Roster(Roster),
}

macro_rules! kinds {
    ($($variant:ident = $code:literal),* $(,)?) => {
        impl Message {
            /// The kind byte on the wire.
            pub fn kind(&self) -> u8 {
                match self { $(Message::$variant(_) => $code,)* }
            }

            /// The kind's name, for errors and logs.
            pub fn kind_name(&self) -> &'static str {
                match self { $(Message::$variant(_) => stringify!($variant),)* }
            }

            fn encode_body(&self) -> Vec<u8> {
                match self { $(Message::$variant(m) => codec::encode(m),)* }
            }

            fn decode_body(kind: u8, body: &[u8]) -> Result<Self, ProtocolError> {
                match kind {
                    $($code => Ok(Message::$variant(codec::decode(body, stringify!($variant))?)),)*
                    k => Err(ProtocolError::UnknownMessageKind(k)),
                }
            }
        }
    };
}

kinds! {
    Hello = 1, Welcome = 2, Enrol = 3, Enrolled = 4, TaskRequest = 5, Task = 6, NoTask = 7,
    ManifestRequest = 8, Manifest = 9, ModelFetch = 10, Blob = 11, Upload = 12, Ack = 13, Error = 14,
    Goodbye = 15, Decline = 16, SecAgg = 17, SecAggReply = 18, Forward = 19, EnrolFor = 20,
    RosterRequest = 21, Roster = 22,
}

impl Message {
    /// The frame payload: version, kind, body.
    pub fn encode(&self) -> Vec<u8> {
        let body = self.encode_body();
        let mut out = Vec::with_capacity(3 + body.len());
        out.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        out.push(self.kind());
        out.extend_from_slice(&body);
        out
    }

    /// Decodes a frame payload: unknown versions and kinds, malformed bodies, trailing bytes, oversized text
    /// and non-finite numbers are typed errors.
    pub fn decode(payload: &[u8]) -> Result<Self, ProtocolError> {
        let (head, body) = payload
            .split_at_checked(3)
            .ok_or(ProtocolError::Truncated {
                expected: 3,
                got: payload.len() as u64,
            })?;
        let version = u16::from_le_bytes([head[0], head[1]]);
        if !SUPPORTED_VERSIONS.contains(&version) {
            return Err(ProtocolError::UnsupportedVersion(version));
        }
        let m = Self::decode_body(head[2], body)?;
        m.validate()?;
        Ok(m)
    }

    /// Semantic checks that the structure alone cannot express.
    fn validate(&self) -> Result<(), ProtocolError> {
        let bad = |detail: &str| {
            Err(ProtocolError::Malformed {
                what: "message",
                detail: detail.into(),
            })
        };
        let long = |s: &str| s.len() > MAX_TEXT;
        match self {
            Message::Hello(h)
                if h.versions.is_empty() || h.versions.len() > 64 || long(&h.software) =>
            {
                bad("hello needs 1..=64 versions and short software text")
            }
            Message::Enrol(e) if long(&e.token) || long(&e.name) => bad("enrolment text too long"),
            Message::NoTask(n) if long(&n.reason) => bad("reason too long"),
            Message::Error(e) if long(&e.message) => bad("error text too long"),
            Message::Goodbye(g) if long(&g.reason) => bad("reason too long"),
            Message::Decline(d) if long(&d.reason) => bad("reason too long"),
            Message::Task(t)
                if t.lora.rank == 0
                    || !(t.lora.alpha.is_finite() && t.lora.alpha > 0.0)
                    || t.lora.targets.is_empty()
                    || t.lora.targets.len() > 7
                    || t.lora.targets.iter().any(|n| n.len() > 16) =>
            {
                bad("task LoRA settings out of range")
            }
            Message::Task(t)
                if t.dp.dp_sgd.is_some_and(|d| {
                    !(d.noise_multiplier.is_finite()
                        && d.noise_multiplier > 0.0
                        && d.clip.is_finite()
                        && d.clip > 0.0
                        && (0.0..=1.0).contains(&d.sampling_rate)
                        && d.delta > 0.0
                        && d.delta < 1.0)
                }) =>
            {
                bad("task DP-SGD settings out of range")
            }
            Message::Task(t)
                if !(t.params.learning_rate.is_finite()
                    && t.params.fedprox_mu.is_finite()
                    && t.params.fedprox_mu >= 0.0
                    && t.dp.user.is_none_or(|u| u.valid())) =>
            {
                bad("task parameters must be finite and in range")
            }
            Message::Task(t)
                if t.secagg.as_ref().is_some_and(|a| {
                    !(a.clip().is_finite()
                        && a.clip() > 0.0
                        && (1..=30).contains(&a.value_bits)
                        && (a.id as usize) < a.params.clients
                        && a.params.clients <= MAX_SECAGG_CLIENTS
                        && a.params.graph().is_ok())
                }) =>
            {
                bad("task secure-aggregation settings out of range")
            }
            Message::SecAgg(r) if !secagg_step_in_bounds(&r.step) => {
                bad("secure-aggregation step out of bounds")
            }
            Message::SecAggReply(r) if !secagg_reply_in_bounds(r) => {
                bad("secure-aggregation reply out of bounds")
            }
            Message::Upload(u)
                if !(u.metrics.train_loss.is_finite()
                    && u.metrics.epsilon_spent.is_finite()
                    && u.metrics.epsilon_spent >= 0.0) =>
            {
                bad("update metrics must be finite")
            }
            Message::Forward(f)
                if !(f.weight.is_finite()
                    && f.weight >= 0.0
                    && f.loss.is_finite()
                    && f.count > 0
                    && f.clip.is_none_or(|c| c.is_finite() && c > 0.0)) =>
            {
                bad("a partial sum needs devices, finite weights and loss, and a positive clip")
            }
            Message::EnrolFor(e) if long(&e.enrol.token) || long(&e.enrol.name) => {
                bad("enrolment text too long")
            }
            Message::Roster(r)
                if r.devices.as_ref().is_some_and(|d| {
                    d.active.len().saturating_add(d.revoked.len()) > MAX_ROSTER
                }) =>
            {
                bad("roster too long")
            }
            _ => Ok(()),
        }
    }
}

/// Whether a device's step stays within what one neighbourhood can hold.
fn secagg_step_in_bounds(step: &SecAggStep) -> bool {
    match step {
        SecAggStep::Keys(_) | SecAggStep::Next => true,
        SecAggStep::Shares(m) => {
            m.len() <= MAX_SECAGG_NEIGHBOURS
                && m.iter()
                    .all(|e| e.ciphertext.len() == starling_secagg::protocol::SHARES_CIPHERTEXT_LEN)
        }
        SecAggStep::Reveals(r) => {
            r.len() <= MAX_SECAGG_NEIGHBOURS && r.iter().all(|r| r.share.y.len() == 32)
        }
    }
}

/// Whether a coordinator's answer stays within one neighbourhood or one roster.
fn secagg_reply_in_bounds(reply: &SecAggReply) -> bool {
    match reply {
        SecAggReply::Roster(r) => r.len() <= MAX_SECAGG_NEIGHBOURS,
        SecAggReply::Mailbox(m) => {
            m.len() <= MAX_SECAGG_NEIGHBOURS
                && m.iter()
                    .all(|e| e.ciphertext.len() == starling_secagg::protocol::SHARES_CIPHERTEXT_LEN)
        }
        SecAggReply::Unmask { dropped, reported } => {
            dropped.len() + reported.len() <= MAX_SECAGG_CLIENTS
        }
        SecAggReply::Excluded { reason } => reason.len() <= MAX_TEXT,
        SecAggReply::Wait { .. } | SecAggReply::Done => true,
    }
}

/// The version both sides speak: the newest one offered that this build supports.
pub fn negotiate(offered: &[u16]) -> Result<u16, ProtocolError> {
    SUPPORTED_VERSIONS
        .iter()
        .rev()
        .find(|v| offered.contains(v))
        .copied()
        .ok_or_else(|| ProtocolError::NoCommonVersion {
            offered: offered.to_vec(),
            supported: SUPPORTED_VERSIONS.to_vec(),
        })
}

/// One message of every kind with plausible contents: for tests, fuzz seed corpora and documentation.
pub fn examples() -> Vec<Message> {
    let key = SigningIdentity::from_seed([3; 32]);
    let manifest = Manifest {
        version: ModelVersion(4),
        parent_digest: Some(Digest::of(b"p")),
        base_digest: Digest::of(b"b"),
        adapter_digest: Digest::of(b"a"),
        adapter_schema: AdapterSchema::new(vec![TensorSpec {
            name: "t".into(),
            shape: vec![2, 3],
        }])
        .expect("a one-tensor schema of 6 values is valid"),
        round: RoundId(4),
        strategy: "fedavg".into(),
        dp: DpRecord {
            mode: DpMode::Off,
            noise_multiplier: 0.0,
            clip: 0.0,
            epsilon_spent: 0.0,
            delta: 0.0,
        },
        created_at_unix_ms: 5,
    }
    .sign(&key);
    let body = BulkHeader::describe(b"delta");
    vec![
        Message::Hello(Hello {
            versions: vec![1],
            software: "starling-client 0.1".into(),
        }),
        Message::Welcome(Welcome {
            version: 1,
            client_id: key.fingerprint(),
            latest_model: ModelVersion(4),
        }),
        Message::Enrol(Enrol {
            token: "stk1_00".into(),
            name: "pi-7".into(),
        }),
        Message::Enrolled(Enrolled {
            client_id: key.fingerprint(),
        }),
        Message::TaskRequest(TaskRequest {
            held_model: Some(ModelVersion(3)),
        }),
        Message::Task(Box::new(Task {
            round: RoundId(4),
            manifest: manifest.clone(),
            deadline_unix_ms: 99,
            params: TrainParams {
                local_steps: 10,
                batch_size: 8,
                seq_len: 128,
                learning_rate: 1e-3,
                fedprox_mu: 0.01,
                optimizer: LocalOptimizer::Sgd,
            },
            dp: DpTask {
                user: Some(UserDp::ClipAndNoise {
                    clip: 1.0,
                    noise_multiplier: 0.8,
                    clients: 5,
                }),
                dp_sgd: Some(DpSgdTask {
                    noise_multiplier: 1.1,
                    clip: 1.0,
                    sampling_rate: 0.05,
                    delta: 1e-5,
                }),
            },
            lora: LoraSpec {
                rank: 8,
                alpha: 16.0,
                targets: vec!["q".into(), "v".into()],
            },
            encoding: Encoding::Int8 { block: 64 },
            max_update_bytes: 1 << 20,
            secagg: Some(SecAggTask {
                params: RoundParams {
                    round: 4,
                    clients: 3,
                    neighbours: 2,
                    threshold: 2,
                    graph_seed: [5; 32],
                    len: 6,
                    bits: 12,
                },
                id: 1,
                clip_bits: 0.5f32.to_bits(),
                value_bits: 7,
                weight_cap: 0,
                rotated: Some(RotatedTask { values: 5 }),
            }),
        })),
        Message::NoTask(NoTask {
            retry_after_ms: 500,
            reason: "waiting for clients".into(),
        }),
        Message::ManifestRequest(ManifestRequest { version: None }),
        Message::Manifest(manifest),
        Message::ModelFetch(ModelFetch {
            version: ModelVersion(4),
            kind: BlobKind::Adapter,
        }),
        Message::Blob(body),
        Message::Upload(Box::new(Upload {
            update_id: UpdateId([9; 16]),
            round: RoundId(4),
            model_version: ModelVersion(4),
            schema: Digest::of(b"s"),
            num_examples: 120,
            metrics: UpdateMetrics {
                train_loss: 1.5,
                steps: 10,
                epsilon_spent: 0.3,
            },
            body,
        })),
        Message::Ack(Ack {
            update_id: UpdateId([9; 16]),
            duplicate: false,
        }),
        Message::Forward(Box::new(Forward {
            update_id: UpdateId([8; 16]),
            round: RoundId(4),
            model_version: ModelVersion(4),
            schema: Digest::of(b"s"),
            count: 3,
            weight: 3.0,
            loss: 4.5,
            clip: Some(1.0),
            body,
        })),
        Message::EnrolFor(EnrolFor {
            client: key.fingerprint(),
            enrol: Enrol {
                token: "stk1_00".into(),
                name: "pi-8".into(),
            },
        }),
        Message::RosterRequest(RosterRequest { generation: 7 }),
        Message::Roster(Roster {
            generation: 8,
            devices: Some(RosterDevices {
                active: vec![key.fingerprint()],
                revoked: vec![Fingerprint([3; 32])],
            }),
        }),
        Message::Error(ErrorReply {
            code: ErrorCode::LateUpdate,
            message: "round 3 closed".into(),
        }),
        Message::Goodbye(Goodbye {
            reason: "done".into(),
        }),
        Message::Decline(Decline {
            round: RoundId(4),
            code: ErrorCode::BudgetExhausted,
            reason: "device ε budget".into(),
        }),
        Message::SecAgg(Box::new(SecAggRequest {
            round: RoundId(4),
            step: SecAggStep::Shares(vec![EncryptedShares {
                from: 1,
                to: 2,
                ciphertext: vec![7; starling_secagg::protocol::SHARES_CIPHERTEXT_LEN],
            }]),
        })),
        Message::SecAggReply(Box::new(SecAggReply::Unmask {
            dropped: vec![0],
            reported: vec![1, 2],
        })),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_round_trips() {
        let all = examples();
        assert_eq!(all.len(), 22);
        for m in all {
            let bytes = m.encode();
            assert_eq!(Message::decode(&bytes).unwrap(), m, "{}", m.kind_name());
        }
    }

    #[test]
    fn aggregator_messages_out_of_range_are_refused() {
        let forward = examples()
            .into_iter()
            .find_map(|m| match m {
                Message::Forward(f) => Some(f),
                _ => None,
            })
            .unwrap();
        for bad in [
            Forward {
                count: 0,
                ..(*forward).clone()
            },
            Forward {
                weight: f64::NAN,
                ..(*forward).clone()
            },
            Forward {
                loss: f64::INFINITY,
                ..(*forward).clone()
            },
            Forward {
                clip: Some(0.0),
                ..(*forward).clone()
            },
        ] {
            let bytes = Message::Forward(Box::new(bad)).encode();
            assert!(Message::decode(&bytes).is_err());
        }
        // The bound counts active and revoked devices together.
        let long = Message::Roster(Roster {
            generation: 1,
            devices: Some(RosterDevices {
                active: vec![Fingerprint([0; 32]); MAX_ROSTER],
                revoked: vec![Fingerprint([1; 32])],
            }),
        });
        assert!(Message::decode(&long.encode()).is_err());
    }

    #[test]
    fn unknown_versions_kinds_and_trailing_bytes_are_typed_errors() {
        let m = Message::Ack(Ack {
            update_id: UpdateId([1; 16]),
            duplicate: true,
        });
        let mut b = m.encode();
        b[0] = 9;
        assert_eq!(
            Message::decode(&b),
            Err(ProtocolError::UnsupportedVersion(9))
        );
        let mut b = m.encode();
        b[2] = 200;
        assert_eq!(
            Message::decode(&b),
            Err(ProtocolError::UnknownMessageKind(200))
        );
        let mut b = m.encode();
        b.push(0);
        assert!(matches!(
            Message::decode(&b),
            Err(ProtocolError::Malformed { .. })
        ));
        assert!(matches!(
            Message::decode(&[1]),
            Err(ProtocolError::Truncated { .. })
        ));
        // A body claiming a 2^60-byte string is refused without allocating it.
        let mut b = Message::Goodbye(Goodbye {
            reason: String::new(),
        })
        .encode();
        b.truncate(3);
        b.extend_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(matches!(
            Message::decode(&b),
            Err(ProtocolError::Malformed { .. })
        ));
        let long = Message::Goodbye(Goodbye {
            reason: "x".repeat(MAX_TEXT + 1),
        });
        assert!(Message::decode(&long.encode()).is_err());
    }

    #[test]
    fn a_task_whose_user_level_dp_is_out_of_range_is_refused() {
        let Some(Message::Task(task)) = examples()
            .into_iter()
            .find(|m| matches!(m, Message::Task(_)))
        else {
            panic!("no task example")
        };
        for user in [
            UserDp::Clip { clip: 0.0 },
            UserDp::Clip { clip: -1.0 },
            UserDp::Clip { clip: f64::NAN },
            UserDp::ClipAndNoise {
                clip: 1.0,
                noise_multiplier: 0.0,
                clients: 3,
            },
            UserDp::ClipAndNoise {
                clip: 1.0,
                noise_multiplier: f64::INFINITY,
                clients: 3,
            },
            UserDp::ClipAndNoise {
                clip: 1.0,
                noise_multiplier: 1.0,
                clients: 0,
            },
        ] {
            let mut t = task.clone();
            t.dp.user = Some(user);
            assert!(
                matches!(
                    Message::decode(&Message::Task(t).encode()),
                    Err(ProtocolError::Malformed { .. })
                ),
                "{user:?}"
            );
        }
        let mut off = task.clone();
        off.dp = DpTask::OFF;
        let m = Message::Task(off);
        assert_eq!(Message::decode(&m.encode()).unwrap(), m);
    }

    #[test]
    fn negotiation_picks_the_newest_common_version() {
        assert_eq!(negotiate(&[0, 5, 7]).unwrap(), 5);
        // Version 1 (SHA-256 bulk digests), version 2 (no rotated secure tasks), version 3 (no local
        // optimizer in a task) and version 4 (no revoked devices in a roster) are no longer spoken.
        assert!(matches!(
            negotiate(&[1, 2, 3, 4]),
            Err(ProtocolError::NoCommonVersion { .. })
        ));
        let mut v1 = Message::Goodbye(Goodbye { reason: "x".into() }).encode();
        v1[..2].copy_from_slice(&1u16.to_le_bytes());
        assert!(matches!(
            Message::decode(&v1),
            Err(ProtocolError::UnsupportedVersion(1))
        ));
    }
}
