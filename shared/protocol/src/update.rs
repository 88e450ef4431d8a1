//! Update deltas on the wire: a flat `f32` vector over the adapter's tensors in the canonical order of an
//! [`AdapterSchema`], encoded as plain little-endian f32 or as int8 blocks with one f32 scale each and
//! unbiased stochastic rounding (E[decoded] = delta, so averaging many clients' int8 updates is unbiased).
//!
//! Layout of an encoded update (all integers little-endian):
//! `"SLUD" | format version u8 (1) | encoding u8 (0 f32, 1 int8) | reserved u16 (0) | block u32 (0 for f32) |
//! schema hash [32] | count u64 | payload`, where the f32 payload is `count × f32` and the int8 payload is,
//! per block of `block` values (the last one shorter), `scale f32 | values i8 × n`.
//! Decoding checks the magic, the schema hash, the count against the schema, the exact byte length (with
//! checked arithmetic, before allocating) and that every value and scale is finite.
//! What must never live here: aggregation or privacy (the coordinator and starling-privacy own those).

use rand_core::RngCore;

use crate::{codec, Digest, ProtocolError};

const MAGIC: &[u8; 4] = b"SLUD";
const FORMAT_VERSION: u8 = 1;
/// Bytes before the payload.
pub const HEADER_BYTES: usize = 4 + 1 + 1 + 2 + 4 + 32 + 8;
/// The most parameters an adapter schema may describe (2^31: 8 GiB of f32).
pub const MAX_PARAMS: u64 = 1 << 31;
/// Default int8 block length.
pub const INT8_BLOCK_DEFAULT: u32 = 64;

/// One adapter tensor: its PEFT name and shape.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TensorSpec {
    /// PEFT tensor name, e.g. `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`.
    pub name: String,
    /// Dimensions, outermost first.
    pub shape: Vec<u64>,
}

/// The adapter's tensors in canonical order (sorted by name): what a flat delta's positions mean.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AdapterSchema {
    tensors: Vec<TensorSpec>,
}

impl AdapterSchema {
    /// A schema over `tensors` in canonical (name-sorted) order; refuses empty schemas, duplicate names,
    /// zero dimensions and sizes above [`MAX_PARAMS`].
    pub fn new(mut tensors: Vec<TensorSpec>) -> Result<Self, ProtocolError> {
        tensors.sort_by(|a, b| a.name.cmp(&b.name));
        let s = Self { tensors };
        s.validate()?;
        Ok(s)
    }

    /// The schema of 2-D tensors given as `(name, [rows, cols])` (an adapter's own description of itself).
    pub fn from_matrices(
        specs: impl IntoIterator<Item = (String, [usize; 2])>,
    ) -> Result<Self, ProtocolError> {
        Self::new(
            specs
                .into_iter()
                .map(|(name, [r, c])| TensorSpec {
                    name,
                    shape: vec![r as u64, c as u64],
                })
                .collect(),
        )
    }

    /// Checks a schema that came from outside (e.g. inside a manifest): sorted, unique, sizes in range.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        if self.tensors.is_empty() {
            return Err(ProtocolError::InvalidSchema("no tensors".into()));
        }
        for w in self.tensors.windows(2) {
            if w[0].name >= w[1].name {
                return Err(ProtocolError::InvalidSchema(format!(
                    "tensor names not strictly sorted at {:?}",
                    w[1].name
                )));
            }
        }
        self.checked_len().map(|_| ())
    }

    fn checked_len(&self) -> Result<u64, ProtocolError> {
        let mut total: u64 = 0;
        for t in &self.tensors {
            if t.name.is_empty() || t.shape.is_empty() || t.shape.contains(&0) {
                return Err(ProtocolError::InvalidSchema(format!(
                    "tensor {:?} has an empty name or shape, or a zero dimension",
                    t.name
                )));
            }
            let n = t
                .shape
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .filter(|&n| n <= MAX_PARAMS)
                .ok_or_else(|| {
                    ProtocolError::InvalidSchema(format!("tensor {:?} is too large", t.name))
                })?;
            total = total
                .checked_add(n)
                .filter(|&t| t <= MAX_PARAMS)
                .ok_or_else(|| ProtocolError::InvalidSchema("adapter is too large".into()))?;
        }
        Ok(total)
    }

    /// The tensors, in canonical order.
    pub fn tensors(&self) -> &[TensorSpec] {
        &self.tensors
    }

    /// Total number of values (the flat delta's length).
    pub fn num_params(&self) -> usize {
        // Validated at construction (≤ 2^31), so this neither overflows nor truncates on 64-bit targets.
        self.tensors
            .iter()
            .map(|t| t.shape.iter().product::<u64>() as usize)
            .sum()
    }

    /// The schema's identity: SHA-256 over a domain tag and its canonical encoding.
    pub fn hash(&self) -> Digest {
        let mut bytes = b"starling-adapter-schema/1\0".to_vec();
        bytes.extend_from_slice(&codec::encode(self));
        Digest::of(&bytes)
    }
}

/// How a delta is encoded on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Encoding {
    /// Little-endian f32, 4 bytes per value, exact.
    F32,
    /// Blocks of `block` int8 values with one f32 scale, stochastic rounding: ≈1.06 bytes per value at 64.
    Int8 {
        /// Values per block (1 ..= 65536).
        block: u32,
    },
}

impl Encoding {
    /// Encoded size in bytes (header included) of `count` values, or `None` on overflow.
    pub fn encoded_len(self, count: u64) -> Option<u64> {
        let payload = match self {
            Encoding::F32 => count.checked_mul(4)?,
            Encoding::Int8 { block } => {
                let block = u64::from(block);
                if block == 0 {
                    return None;
                }
                count.checked_add(count.div_ceil(block).checked_mul(4)?)?
            }
        };
        payload.checked_add(HEADER_BYTES as u64)
    }
}

/// What a receiver accepts: its own caps, independent of what the sender claims.
#[derive(Debug, Clone, Copy)]
pub struct UpdateLimits {
    /// Refuse int8 encodings.
    pub allow_int8: bool,
    /// Largest accepted int8 block.
    pub max_block: u32,
}

impl Default for UpdateLimits {
    fn default() -> Self {
        Self {
            allow_int8: true,
            max_block: 65_536,
        }
    }
}

/// The fixed-size header of an encoded update, readable without decoding the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpdateHeader {
    /// The encoding of the payload.
    pub encoding: Encoding,
    /// The adapter schema the delta is laid out by.
    pub schema: Digest,
    /// Number of values.
    pub count: u64,
}

/// Encodes `delta` (laid out by `schema`) with `encoding`; `rng` drives int8 stochastic rounding.
pub fn encode_update(
    schema: &AdapterSchema,
    delta: &[f32],
    encoding: Encoding,
    rng: &mut impl RngCore,
) -> Result<Vec<u8>, ProtocolError> {
    if delta.len() != schema.num_params() {
        return Err(ProtocolError::Malformed {
            what: "update",
            detail: format!(
                "delta has {} values, schema {}",
                delta.len(),
                schema.num_params()
            ),
        });
    }
    if let Some(i) = delta.iter().position(|x| !x.is_finite()) {
        return Err(ProtocolError::NonFinite { index: i as u64 });
    }
    let block = match encoding {
        Encoding::F32 => 0,
        Encoding::Int8 { block } if (1..=65_536).contains(&block) => block,
        Encoding::Int8 { block } => {
            return Err(ProtocolError::Malformed {
                what: "update",
                detail: format!("int8 block {block} outside 1..=65536"),
            })
        }
    };
    let len = encoding
        .encoded_len(delta.len() as u64)
        .and_then(|l| usize::try_from(l).ok())
        .ok_or_else(|| ProtocolError::Malformed {
            what: "update",
            detail: "too large".into(),
        })?;
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(MAGIC);
    out.push(FORMAT_VERSION);
    out.push(match encoding {
        Encoding::F32 => 0,
        Encoding::Int8 { .. } => 1,
    });
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&block.to_le_bytes());
    out.extend_from_slice(&schema.hash().0);
    out.extend_from_slice(&(delta.len() as u64).to_le_bytes());
    match encoding {
        Encoding::F32 => {
            for x in delta {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
        Encoding::Int8 { .. } => {
            for chunk in delta.chunks(block as usize) {
                let max = chunk.iter().fold(0f32, |m, x| m.max(x.abs()));
                let scale = max / 127.0;
                out.extend_from_slice(&scale.to_le_bytes());
                let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                for &x in chunk {
                    out.push(stochastic_round(x * inv, rng) as u8);
                }
            }
        }
    }
    debug_assert_eq!(out.len(), len);
    Ok(out)
}

/// `y` rounded to one of its two neighbouring integers with probabilities that make it unbiased,
/// clamped to [-127, 127].
fn stochastic_round(y: f32, rng: &mut impl RngCore) -> i8 {
    let y = y.clamp(-127.0, 127.0);
    let lo = y.floor();
    let p = y - lo;
    // 24 random bits: a uniform in [0, 1) on the f32 grid, so P(u < p) = p for p on that grid.
    let u = (rng.next_u32() >> 8) as f32 * (1.0 / 16_777_216.0);
    let q = if u < p { lo + 1.0 } else { lo };
    q.clamp(-127.0, 127.0) as i8
}

/// A published adapter blob (what a manifest's `adapter_digest` hashes): the adapter's flat values, laid
/// out by its schema, as little-endian f32.
pub fn adapter_bytes(flat: &[f32]) -> Vec<u8> {
    flat.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The values of an adapter blob written by [`adapter_bytes`], checked: a whole number of f32 values,
/// every one finite.
pub fn adapter_values(bytes: &[u8]) -> Result<Vec<f32>, ProtocolError> {
    let bad = |detail: String| ProtocolError::Malformed {
        what: "adapter blob",
        detail,
    };
    if !bytes.len().is_multiple_of(4) {
        return Err(bad(format!(
            "{} bytes are not a whole number of f32 values",
            bytes.len()
        )));
    }
    let values: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    if let Some(i) = values.iter().position(|x| !x.is_finite()) {
        return Err(bad(format!("value {i} is not finite")));
    }
    Ok(values)
}

/// Reads the fixed header of an encoded update.
pub fn peek_header(bytes: &[u8]) -> Result<UpdateHeader, ProtocolError> {
    let bad = |detail: &str| ProtocolError::Malformed {
        what: "update",
        detail: detail.into(),
    };
    let h = bytes.get(..HEADER_BYTES).ok_or(ProtocolError::Truncated {
        expected: HEADER_BYTES as u64,
        got: bytes.len() as u64,
    })?;
    if &h[..4] != MAGIC {
        return Err(bad("bad magic"));
    }
    if h[4] != FORMAT_VERSION {
        return Err(bad(&format!("unknown update format version {}", h[4])));
    }
    if h[6..8] != [0, 0] {
        return Err(bad("reserved bytes are not zero"));
    }
    let block = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    let encoding = match (h[5], block) {
        (0, 0) => Encoding::F32,
        (1, b) if b > 0 => Encoding::Int8 { block: b },
        (e, b) => return Err(bad(&format!("unknown encoding {e} with block {b}"))),
    };
    let mut schema = [0u8; 32];
    schema.copy_from_slice(&h[12..44]);
    let mut count = [0u8; 8];
    count.copy_from_slice(&h[44..52]);
    Ok(UpdateHeader {
        encoding,
        schema: Digest(schema),
        count: u64::from_le_bytes(count),
    })
}

/// The header of an encoded update and its payload, once schema hash, count, accepted encoding and exact
/// length are checked (everything but the values).
fn checked_update<'a>(
    bytes: &'a [u8],
    schema: &AdapterSchema,
    limits: &UpdateLimits,
) -> Result<(UpdateHeader, &'a [u8]), ProtocolError> {
    let h = peek_header(bytes)?;
    let expected_schema = schema.hash();
    if h.schema != expected_schema {
        return Err(ProtocolError::SchemaMismatch {
            expected: expected_schema,
            got: h.schema,
        });
    }
    let n = schema.num_params();
    if h.count != n as u64 {
        return Err(ProtocolError::Malformed {
            what: "update",
            detail: format!("{} values declared, schema has {n}", h.count),
        });
    }
    if let Encoding::Int8 { block } = h.encoding {
        if !limits.allow_int8 || block > limits.max_block {
            return Err(ProtocolError::Malformed {
                what: "update",
                detail: format!("int8 block {block} not accepted"),
            });
        }
    }
    let want = h.encoding.encoded_len(h.count).unwrap_or(u64::MAX);
    if bytes.len() as u64 != want {
        return Err(ProtocolError::Truncated {
            expected: want,
            got: bytes.len() as u64,
        });
    }
    Ok((h, &bytes[HEADER_BYTES..]))
}

/// Whether an int8 block's scale is usable: finite, not negative, and finite times 127 (the largest
/// product a block can make).
fn scale_ok(scale: f32) -> bool {
    scale.is_finite() && scale >= 0.0 && (scale * 127.0).is_finite()
}

/// The index of the first non-finite value among little-endian f32 `words` (every exponent bit set: an
/// infinity or a NaN). Scans 64 values at a time without branching (vectorized), then finds the index in
/// the block that has one.
fn first_non_finite(words: &[u8]) -> Option<usize> {
    const EXPONENT: u32 = 0x7f80_0000;
    let bad = |c: &[u8]| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) & EXPONENT == EXPONENT;
    words.chunks(256).enumerate().find_map(|(b, block)| {
        let any = block
            .chunks_exact(4)
            .fold(0u32, |acc, c| acc | u32::from(bad(c)));
        if any == 0 {
            None
        } else {
            block.chunks_exact(4).position(bad).map(|i| b * 64 + i)
        }
    })
}

/// Checks an encoded update for `schema` exactly as [`decode_update`] does (the same errors, the same first
/// non-finite index) without producing the values: what a receiver that stores the bytes as they came
/// needs, at memory speed and with no allocation.
pub fn validate_update(
    bytes: &[u8],
    schema: &AdapterSchema,
    limits: &UpdateLimits,
) -> Result<(), ProtocolError> {
    let (h, payload) = checked_update(bytes, schema, limits)?;
    match h.encoding {
        Encoding::F32 => match first_non_finite(payload) {
            Some(i) => Err(ProtocolError::NonFinite { index: i as u64 }),
            None => Ok(()),
        },
        Encoding::Int8 { block } => {
            let block = block as usize;
            for (k, b) in payload.chunks(4 + block).enumerate() {
                if !scale_ok(f32::from_le_bytes([b[0], b[1], b[2], b[3]])) {
                    return Err(ProtocolError::NonFinite {
                        index: (k * block) as u64,
                    });
                }
            }
            Ok(())
        }
    }
}

/// Decodes an update for `schema`: schema hash, count, exact length and finiteness are all checked before
/// the delta is returned.
pub fn decode_update(
    bytes: &[u8],
    schema: &AdapterSchema,
    limits: &UpdateLimits,
) -> Result<Vec<f32>, ProtocolError> {
    let (h, payload) = checked_update(bytes, schema, limits)?;
    let n = schema.num_params();
    let mut out = Vec::with_capacity(n);
    match h.encoding {
        Encoding::F32 => {
            if let Some(i) = first_non_finite(payload) {
                return Err(ProtocolError::NonFinite { index: i as u64 });
            }
            out.extend(
                payload
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            );
        }
        Encoding::Int8 { block } => {
            let block = block as usize;
            let mut rest = payload;
            while out.len() < n {
                let m = block.min(n - out.len());
                let (head, tail) = rest.split_at(4 + m);
                let scale = f32::from_le_bytes([head[0], head[1], head[2], head[3]]);
                if !scale_ok(scale) {
                    return Err(ProtocolError::NonFinite {
                        index: out.len() as u64,
                    });
                }
                out.extend(head[4..].iter().map(|&q| f32::from(q as i8) * scale));
                rest = tail;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapter_blobs_round_trip_and_refuse_bad_bytes() {
        let flat = [0.0f32, -1.5, 3.25e-7, f32::MAX];
        assert_eq!(adapter_values(&adapter_bytes(&flat)).unwrap(), flat);
        assert!(adapter_values(&[0u8; 7])
            .unwrap_err()
            .to_string()
            .contains("whole number"));
        let nan = adapter_bytes(&[1.0, f32::NAN]);
        assert!(adapter_values(&nan)
            .unwrap_err()
            .to_string()
            .contains("value 1"));
    }
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn schema() -> AdapterSchema {
        AdapterSchema::new(vec![
            TensorSpec {
                name: "layers.0.q.lora_B".into(),
                shape: vec![16, 4],
            },
            TensorSpec {
                name: "layers.0.q.lora_A".into(),
                shape: vec![4, 16],
            },
            TensorSpec {
                name: "layers.1.v.lora_A".into(),
                shape: vec![4, 9],
            },
        ])
        .unwrap()
    }

    fn delta(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 1e-3)
            .collect()
    }

    #[test]
    fn schema_is_canonical_and_validated() {
        let s = schema();
        assert_eq!(s.tensors()[0].name, "layers.0.q.lora_A");
        assert_eq!(s.num_params(), 64 + 64 + 36);
        let mut reordered = s.tensors().to_vec();
        reordered.reverse();
        assert_eq!(AdapterSchema::new(reordered).unwrap().hash(), s.hash());
        let dup = vec![
            TensorSpec {
                name: "a".into(),
                shape: vec![1],
            },
            TensorSpec {
                name: "a".into(),
                shape: vec![2],
            },
        ];
        assert!(AdapterSchema::new(dup).is_err());
        assert!(AdapterSchema::new(vec![]).is_err());
        assert!(AdapterSchema::new(vec![TensorSpec {
            name: "a".into(),
            shape: vec![0, 3]
        }])
        .is_err());
        assert!(AdapterSchema::new(vec![TensorSpec {
            name: "a".into(),
            shape: vec![1 << 32, 1 << 32]
        }])
        .is_err());
        let other = AdapterSchema::new(vec![TensorSpec {
            name: "a".into(),
            shape: vec![3],
        }])
        .unwrap();
        assert_ne!(other.hash(), s.hash());
    }

    #[test]
    fn f32_round_trips_exactly() {
        let s = schema();
        let d = delta(s.num_params());
        let bytes =
            encode_update(&s, &d, Encoding::F32, &mut ChaCha8Rng::seed_from_u64(1)).unwrap();
        assert_eq!(
            bytes.len() as u64,
            Encoding::F32.encoded_len(d.len() as u64).unwrap()
        );
        assert_eq!(
            decode_update(&bytes, &s, &UpdateLimits::default()).unwrap(),
            d
        );
    }

    #[test]
    fn int8_is_close_and_unbiased() {
        let s = schema();
        let d = delta(s.num_params());
        let enc = Encoding::Int8 { block: 64 };
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let trials = 4000;
        let mut mean = vec![0f64; d.len()];
        for _ in 0..trials {
            let bytes = encode_update(&s, &d, enc, &mut rng).unwrap();
            let back = decode_update(&bytes, &s, &UpdateLimits::default()).unwrap();
            for ((m, &b), &x) in mean.iter_mut().zip(&back).zip(&d) {
                // One quantization step per block at most.
                assert!((b - x).abs() <= 0.05 / 127.0 + 1e-7, "{b} vs {x}");
                *m += f64::from(b) / trials as f64;
            }
        }
        // Unbiased: the mean over trials approaches the value; the error of a mean of `trials` draws
        // bounded in one step of 0.05/127 is at most step/2/sqrt(trials) per σ — allow 5σ.
        let step = 0.05f64 / 127.0;
        let tol = 5.0 * step / 2.0 / (trials as f64).sqrt();
        for (m, &x) in mean.iter().zip(&d) {
            assert!((m - f64::from(x)).abs() < tol, "mean {m} vs {x}");
        }
        let bytes = encode_update(&s, &d, enc, &mut rng).unwrap();
        assert_eq!(bytes.len() as u64, enc.encoded_len(d.len() as u64).unwrap());
        assert!(decode_update(
            &bytes,
            &s,
            &UpdateLimits {
                allow_int8: false,
                max_block: 64
            }
        )
        .is_err());
    }

    #[test]
    fn hostile_updates_are_typed_errors() {
        let s = schema();
        let d = delta(s.num_params());
        let good = encode_update(&s, &d, Encoding::F32, &mut ChaCha8Rng::seed_from_u64(1)).unwrap();
        let lim = UpdateLimits::default();
        // Wrong schema.
        let other = AdapterSchema::new(vec![TensorSpec {
            name: "x".into(),
            shape: vec![164],
        }])
        .unwrap();
        assert!(matches!(
            decode_update(&good, &other, &lim),
            Err(ProtocolError::SchemaMismatch { .. })
        ));
        // Every truncation.
        for cut in 0..good.len() {
            assert!(decode_update(&good[..cut], &s, &lim).is_err());
        }
        // NaN and infinity.
        let mut nan = good.clone();
        nan[HEADER_BYTES + 8..HEADER_BYTES + 12].copy_from_slice(&f32::NAN.to_le_bytes());
        assert_eq!(
            decode_update(&nan, &s, &lim),
            Err(ProtocolError::NonFinite { index: 2 })
        );
        let mut bad = d.clone();
        bad[5] = f32::INFINITY;
        assert!(encode_update(&s, &bad, Encoding::F32, &mut ChaCha8Rng::seed_from_u64(1)).is_err());
        // A count that overflows the length arithmetic.
        let mut huge = good.clone();
        huge[44..52].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode_update(&huge, &s, &lim).is_err());
        // Bad magic, reserved bytes, unknown encoding.
        for (i, v) in [(0usize, b'X'), (6, 1), (5, 9)] {
            let mut b = good.clone();
            b[i] = v;
            assert!(decode_update(&b, &s, &lim).is_err());
        }
        // Negative int8 scale.
        let mut q = encode_update(
            &s,
            &d,
            Encoding::Int8 { block: 64 },
            &mut ChaCha8Rng::seed_from_u64(3),
        )
        .unwrap();
        q[HEADER_BYTES..HEADER_BYTES + 4].copy_from_slice(&(-1.0f32).to_le_bytes());
        assert!(matches!(
            decode_update(&q, &s, &lim),
            Err(ProtocolError::NonFinite { .. })
        ));
        // A finite scale whose product with a quantized value overflows (found by the property test).
        q[HEADER_BYTES..HEADER_BYTES + 4].copy_from_slice(&f32::MAX.to_le_bytes());
        assert!(matches!(
            decode_update(&q, &s, &lim),
            Err(ProtocolError::NonFinite { .. })
        ));
    }

    #[test]
    fn validation_says_exactly_what_decoding_says() {
        let s = schema();
        let n = s.num_params();
        let lim = UpdateLimits::default();
        let mut cases = Vec::new();
        for enc in [
            Encoding::F32,
            Encoding::Int8 { block: 64 },
            Encoding::Int8 { block: 7 },
        ] {
            let good =
                encode_update(&s, &delta(n), enc, &mut ChaCha8Rng::seed_from_u64(5)).unwrap();
            for cut in [0, 10, HEADER_BYTES, good.len() - 1] {
                cases.push(good[..cut].to_vec());
            }
            // Every byte of the header and a stride of the payload set to values that break it.
            for i in (0..good.len()).step_by(3) {
                for v in [0x00u8, 0x7f, 0x80, 0xff] {
                    let mut b = good.clone();
                    b[i] = v;
                    cases.push(b);
                }
            }
            cases.push(good);
        }
        // Non-finite f32 values at every position of a block, and in later blocks.
        let good = encode_update(
            &s,
            &delta(n),
            Encoding::F32,
            &mut ChaCha8Rng::seed_from_u64(5),
        )
        .unwrap();
        for i in [0, 1, 63, 64, 65, 100, n - 1] {
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let mut b = good.clone();
                let at = HEADER_BYTES + 4 * i;
                b[at..at + 4].copy_from_slice(&bad.to_le_bytes());
                cases.push(b);
            }
        }
        let mut errors = 0;
        for c in &cases {
            let decoded = decode_update(c, &s, &lim).map(|_| ());
            errors += usize::from(decoded.is_err());
            assert_eq!(validate_update(c, &s, &lim), decoded);
        }
        assert!(
            errors > 100 && errors < cases.len(),
            "{errors} of {}",
            cases.len()
        );
        let mut late = good.clone();
        late[HEADER_BYTES + 4 * 100..HEADER_BYTES + 404].copy_from_slice(&f32::NAN.to_le_bytes());
        late[HEADER_BYTES + 4 * 130..HEADER_BYTES + 524].copy_from_slice(&f32::NAN.to_le_bytes());
        assert_eq!(
            validate_update(&late, &s, &lim),
            Err(ProtocolError::NonFinite { index: 100 })
        );
    }
}
