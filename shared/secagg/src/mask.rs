//! Arithmetic in Z_{2^32}: masks expanded from 32-byte seeds with a stream cipher (ChaCha20), and
//! the fixed-point encodings of a model delta (scale, unbiased stochastic rounding) in two kinds:
//!
//! - **per value** (exact): each value clipped to `[-clip, clip]`, the modulus wide enough that no sum
//!   of `max_clients` encoded vectors can wrap — `log₂(2 · clients · steps)` bits, 18 for 1,000 devices
//!   at an int8 delta's ±128 steps;
//! - **rotated** (modular clipping): the vector clipped to an L2 bound and randomly rotated
//!   ([`crate::rotation`]) before rounding, the modulus a fixed number of bits and the scale the largest
//!   at which a sum fits it when every device sends the *same* vector at the bound (the sum's norm at
//!   its largest) with an expected 10⁻⁴ of its coordinates beyond the modulus ([`WRAP_SIZING`]; the
//!   rotation makes every coordinate of any fixed sum close to Gaussian). That is a probability, not
//!   the per-value kind's certainty: a decoded sum whose own spread says a wrap is likely (a device
//!   past the bound, a broken assumption) is refused ([`SecAggError::Wrapped`]) instead of being used.
//!   What it buys: the modulus is a chosen number of bits, and a device's steps are spent on its
//!   rotated vector's typical value (the rotation leaves no outliers) instead of the largest value the
//!   per-value clip must hold. Its cost is resolution: at 1,000 devices and 15 bits a device's typical
//!   rotated value spans ≈ 2.5 steps, so the rounding's share of a sum is larger than an int8 upload's
//!   unless the updates share a direction (`starling-bench secagg` prints both).
//!
//! Nothing here knows of clients or keys.

use rand::{Rng, RngCore, SeedableRng};
use sha2::{Digest, Sha256};

use crate::{Malformed, ParamsError, SecAggError};

/// Adds (`sign = 1`) or subtracts (`sign = -1`) the mask expanded from `seed` for `context` to
/// `out`, word by word modulo 2^32.
pub fn apply_mask(seed: &[u8; 32], context: &[u8], sign: i8, out: &mut [u32]) {
    let key: [u8; 32] = Sha256::new()
        .chain_update(b"starling-secagg/mask/v1")
        .chain_update((context.len() as u64).to_le_bytes())
        .chain_update(context)
        .chain_update(seed)
        .finalize()
        .into();
    let mut prg = rand_chacha::ChaCha20Rng::from_seed(key);
    let mut buf = [0u8; 4096];
    for chunk in out.chunks_mut(buf.len() / 4) {
        let bytes = &mut buf[..chunk.len() * 4];
        prg.fill_bytes(bytes);
        for (o, w) in chunk.iter_mut().zip(bytes.chunks_exact(4)) {
            let m = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
            *o = if sign >= 0 {
                o.wrapping_add(m)
            } else {
                o.wrapping_sub(m)
            };
        }
    }
}

/// `2^bits − 1`: the mask that reduces a word modulo `2^bits` (`bits` in 1..=32).
pub fn modulus_mask(bits: u32) -> u32 {
    if bits >= 32 {
        u32::MAX
    } else {
        (1u32 << bits) - 1
    }
}

/// Packs words of `bits` bits (each `< 2^bits`) little-endian into bytes: what goes on the wire.
pub fn pack(words: &[u32], bits: u32) -> Vec<u8> {
    let mut out = vec![0u8; (words.len() * bits as usize).div_ceil(8)];
    let mut at = 0usize;
    for &w in words {
        let w = u64::from(w & modulus_mask(bits));
        for i in 0..bits as usize {
            if w >> i & 1 == 1 {
                out[(at + i) / 8] |= 1 << ((at + i) % 8);
            }
        }
        at += bits as usize;
    }
    out
}

/// Unpacks `len` words of `bits` bits; refuses a byte string of the wrong length.
pub fn unpack(bytes: &[u8], bits: u32, len: usize) -> Result<Vec<u32>, SecAggError> {
    if !(1..=32).contains(&bits) || bytes.len() != (len * bits as usize).div_ceil(8) {
        return Err(Malformed::Packing {
            bytes: bytes.len(),
            len,
            bits,
        }
        .into());
    }
    let mut out = Vec::with_capacity(len);
    let mut at = 0usize;
    for _ in 0..len {
        let mut w = 0u32;
        for i in 0..bits as usize {
            let bit = bytes[(at + i) / 8] >> ((at + i) % 8) & 1;
            w |= u32::from(bit) << i;
        }
        out.push(w);
        at += bits as usize;
    }
    Ok(out)
}

/// Fixed-point encoding of deltas into Z_{2^32}: each value clipped to `[-clip, clip]` (per value), or
/// the vector clipped to an L2 bound and rotated (`rotated`), then multiplied by `scale` and rounded
/// stochastically (unbiased: E[round(v)] = v), stored in two's complement.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Encoding {
    /// Largest magnitude of one value (per value); the unit of the weight value (rotated).
    pub clip: f32,
    /// Integer steps per unit.
    pub scale: f64,
    /// Most clients whose encoded values are summed.
    pub max_clients: usize,
    /// Standard deviation, in integer steps, of the noise share each client adds to each value (0:
    /// none); the modulus leaves room for 7 standard deviations of the summed noise.
    pub noise_sigma: f64,
    /// The rotated kind's settings (`None`: per value).
    pub rotated: Option<Rotated>,
}

/// The rotated encoding's settings: a vector of `values` values, L2-clipped to `norm`, rotated under
/// `seed` into [`crate::rotation::padded_len`] words, summed modulo `2^bits`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rotated {
    /// Values in an unrotated vector.
    pub values: usize,
    /// L2 bound of a vector.
    pub norm: f32,
    /// Modulus bits.
    pub bits: u32,
    /// The rotation's public seed.
    pub seed: [u8; 32],
}

/// Standard deviations of the summed noise the modulus makes room for (a value wraps with probability
/// below 3·10⁻¹²).
const NOISE_ROOM: f64 = 7.0;

/// Coordinates of a worst-case rotated sum (every device's vector the same, at the L2 bound) the rotated
/// encoding's modulus expects to wrap: its scale makes room for as many standard deviations as keep the
/// expected count of `words` Gaussian coordinates beyond the modulus' half at this (≈ 6.5 σ for a million
/// words, 5.6 σ for 4,096). Ten times under [`WRAP_REFUSAL`], so a worst-case sum is not refused for the
/// noise of its estimated spread.
pub const WRAP_SIZING: f64 = 1e-4;

/// A decoded rotated sum is refused when its spread says more than this many of its coordinates wrapped
/// (expected count).
pub const WRAP_REFUSAL: f64 = 1e-3;

/// The standard deviations of a sum's coordinate the rotated encoding makes room for with `words` words
/// ([`WRAP_SIZING`]).
pub fn wrap_stddevs(words: usize) -> f64 {
    let (mut lo, mut hi) = (1.0f64, 40.0f64);
    for _ in 0..100 {
        let mid = 0.5 * (lo + hi);
        if words as f64 * erfc(mid / std::f64::consts::SQRT_2) > WRAP_SIZING {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    hi
}

/// The fewest words a rotated sum needs for its wrap check to mean anything (a spread estimated from
/// fewer is noise); shorter sums are decoded unchecked.
pub const WRAP_CHECK_WORDS: usize = 256;

impl Encoding {
    /// An encoding for sums of up to `max_clients` values of magnitude ≤ `clip` with `bits` bits of
    /// resolution per value, refused when such a sum could wrap around 2^32 (the configuration-time
    /// check: `max_clients · (clip · scale + 1) < 2^31`, the `+ 1` being stochastic rounding's
    /// extra step).
    pub fn new(clip: f32, bits: u32, max_clients: usize) -> Result<Self, SecAggError> {
        if !(clip.is_finite() && clip > 0.0 && (1..=30).contains(&bits)) || max_clients == 0 {
            return Err(ParamsError::Encoding {
                clip,
                bits,
                max_clients,
            }
            .into());
        }
        let scale = f64::from(1u32 << bits) / f64::from(clip);
        Self {
            clip,
            scale,
            max_clients,
            noise_sigma: 0.0,
            rotated: None,
        }
        .checked()
    }

    /// The rotated encoding of `values`-value vectors of L2 norm ≤ `norm` (`clip`: the unit of a weight
    /// value) for sums of up to `max_clients` of them modulo `2^bits`: the scale is the largest at which
    /// `k =` [`wrap_stddevs`] standard deviations of a worst-case sum fit, `(2^(bits−1) − 1)² ≥ k² · (s² ·
    /// norm² · n² / words + n / 4)` (the sum's norm at most `n · norm`, spread over the rotated words,
    /// plus the rounding's variance). Refused when that leaves a device's typical word under one step.
    pub fn rotated(
        clip: f32,
        norm: f32,
        bits: u32,
        max_clients: usize,
        values: usize,
        seed: [u8; 32],
    ) -> Result<Self, SecAggError> {
        let ok = clip.is_finite() && clip > 0.0 && norm.is_finite() && norm > 0.0;
        if !ok || !(2..=31).contains(&bits) || max_clients == 0 || values == 0 {
            return Err(ParamsError::Encoding {
                clip: norm,
                bits,
                max_clients,
            }
            .into());
        }
        let n = max_clients as f64;
        let words = crate::rotation::padded_len(values) as f64;
        let top = f64::from((1u32 << (bits - 1)) - 1);
        let room = (top / wrap_stddevs(words as usize)).powi(2) - n / 4.0;
        // Steps per standard deviation of one device's rotated word at the bound.
        let steps = room.max(0.0).sqrt() / n;
        if steps < 1.0 {
            return Err(ParamsError::RotatedModulus {
                bits,
                clients: max_clients,
                steps,
            }
            .into());
        }
        Ok(Self {
            clip,
            scale: steps * words.sqrt() / f64::from(norm),
            max_clients,
            noise_sigma: 0.0,
            rotated: Some(Rotated {
                values,
                norm,
                bits,
                seed,
            }),
        })
    }

    /// The same encoding with each client adding integer noise of standard deviation `sigma` steps to
    /// each value (refused when the noisy sum could wrap, and by the rotated encoding, whose scale makes
    /// no room for noise).
    pub fn with_noise(self, sigma: f64) -> Result<Self, SecAggError> {
        if !(sigma.is_finite() && sigma >= 0.0) {
            return Err(ParamsError::NoiseSigma(sigma).into());
        }
        if self.rotated.is_some() && sigma > 0.0 {
            return Err(ParamsError::RotatedNoise.into());
        }
        Self {
            noise_sigma: sigma,
            ..self
        }
        .checked()
    }

    /// One client's share of distributed noise, in integer steps: the shares of `clients` clients add up
    /// to standard deviation `noise_multiplier · l2_clip` (in the values' units), rounded up — more noise,
    /// never less, than accounted at the multiplier (the accountant is told this integer).
    pub fn noise_steps(&self, noise_multiplier: f64, l2_clip: f64, clients: u64) -> u64 {
        let s = noise_multiplier * l2_clip * self.scale / (clients.max(1) as f64).sqrt();
        if s.is_finite() && s > 0.0 {
            s.ceil() as u64
        } else {
            0
        }
    }

    /// The largest magnitude a per-value sum can reach (values, rounding, and the noise room).
    fn bound(&self) -> f64 {
        let n = self.max_clients as f64;
        n * (f64::from(self.clip) * self.scale + 1.0) + NOISE_ROOM * self.noise_sigma * n.sqrt()
    }

    fn checked(self) -> Result<Self, SecAggError> {
        if self.rotated.is_some() {
            return Ok(self);
        }
        let bound = self.bound();
        if bound >= 2f64.powi(31) {
            return Err(ParamsError::Wrap {
                clients: self.max_clients,
                bound,
            }
            .into());
        }
        Ok(self)
    }

    /// Words in an encoded vector of `values` values (the rotated kind pads to whole blocks).
    pub fn words(&self, values: usize) -> usize {
        match &self.rotated {
            Some(_) => crate::rotation::padded_len(values),
            None => values,
        }
    }

    /// Encodes `values` (non-finite values count as 0; the rotated kind takes its `values` of them, the
    /// missing ones as 0).
    pub fn encode(&self, values: &[f32], rng: &mut impl Rng) -> Vec<u32> {
        let finite = |v: f32| if v.is_finite() { v } else { 0.0 };
        let Some(r) = &self.rotated else {
            return values
                .iter()
                .map(|&v| {
                    round(
                        f64::from(finite(v).clamp(-self.clip, self.clip)) * self.scale,
                        rng,
                    )
                })
                .collect();
        };
        let mut x: Vec<f64> = values.iter().map(|&v| f64::from(finite(v))).collect();
        let norm = x.iter().map(|v| v * v).sum::<f64>().sqrt();
        let fit = if norm > f64::from(r.norm) {
            f64::from(r.norm) / norm
        } else {
            1.0
        };
        x.iter_mut().for_each(|v| *v *= fit * self.scale);
        crate::rotation::Rotation::new(&r.seed, r.values)
            .forward(&x)
            .into_iter()
            .map(|v| round(v, rng))
            .collect()
    }

    /// The fewest bits of modulus that hold any sum of up to `max_clients` encoded values without
    /// wrapping (per value: sums lie in `[-B, B]`, `B = max_clients · (clip · scale + 1)` plus 7 standard
    /// deviations of the summed noise, so `2B < 2^bits`); the rotated kind's fixed bits.
    pub fn modulus_bits(&self) -> u32 {
        match &self.rotated {
            Some(r) => r.bits,
            None => ((2.0 * self.bound() + 1.0).log2().ceil() as u32).clamp(1, 32),
        }
    }

    /// Decodes a sum of encoded vectors reduced modulo `2^bits` (read as a signed `bits`-bit
    /// number) back to floats; a rotated sum is rotated back, and refused when its spread says a
    /// coordinate likely wrapped.
    pub fn decode_sum(&self, sum: &[u32], bits: u32) -> Result<Vec<f32>, SecAggError> {
        let m = modulus_mask(bits);
        let signed = sum.iter().map(|&w| {
            let w = i64::from(w & m);
            if bits < 32 && w >= 1i64 << (bits - 1) {
                w - (1i64 << bits)
            } else if bits >= 32 {
                i64::from(w as u32 as i32)
            } else {
                w
            }
        });
        let Some(r) = &self.rotated else {
            return Ok(signed.map(|v| (v as f64 / self.scale) as f32).collect());
        };
        let signed: Vec<i64> = signed.collect();
        let expected = expected_wraps(&signed, bits);
        if expected > WRAP_REFUSAL {
            return Err(SecAggError::Wrapped { expected, bits });
        }
        let words: Vec<f64> = signed.iter().map(|&v| v as f64 / self.scale).collect();
        Ok(crate::rotation::Rotation::new(&r.seed, r.values)
            .inverse(&words)
            .into_iter()
            .map(|v| v as f32)
            .collect())
    }
}

/// `x` rounded up or down at random, unbiased, as a word in two's complement.
fn round(x: f64, rng: &mut impl Rng) -> u32 {
    let floor = x.floor();
    let q = floor + f64::from(u8::from(rng.random::<f64>() < x - floor));
    (q as i64) as i32 as u32
}

/// How many of a rotated sum's coordinates (signed, modulo `2^bits`) are expected to have wrapped: a
/// rotated sum's coordinates are close to Gaussian, so their spread (from the median absolute value,
/// which a few wrapped coordinates do not move) gives the chance of one beyond the modulus' half. Sums
/// shorter than [`WRAP_CHECK_WORDS`] give 0.
pub fn expected_wraps(signed: &[i64], bits: u32) -> f64 {
    if signed.len() < WRAP_CHECK_WORDS || !(2..=32).contains(&bits) {
        return 0.0;
    }
    let mut abs: Vec<u64> = signed.iter().map(|v| v.unsigned_abs()).collect();
    let mid = abs.len() / 2;
    let median = *abs.select_nth_unstable(mid).1 as f64;
    // A Gaussian's median absolute value is 0.6745 σ; a spread under one step is rounding alone.
    let sigma = (median / 0.674_489_75).max(0.5);
    let half = 2f64.powi(bits as i32 - 1);
    signed.len() as f64 * erfc(half / (sigma * std::f64::consts::SQRT_2))
}

/// The complementary error function (Numerical Recipes' Chebyshev fit, relative error below 1.2·10⁻⁷).
fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let r = t * poly.exp();
    if x >= 0.0 {
        r
    } else {
        2.0 - r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_round_trips_every_width() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(3);
        for bits in [1, 7, 8, 13, 16, 28, 31, 32] {
            let words: Vec<u32> = (0..37)
                .map(|_| rng.random::<u32>() & modulus_mask(bits))
                .collect();
            let bytes = pack(&words, bits);
            assert_eq!(bytes.len(), (37 * bits as usize).div_ceil(8));
            assert_eq!(unpack(&bytes, bits, 37).unwrap(), words);
            assert!(unpack(&bytes[1..], bits, 37).is_err());
        }
        assert!(unpack(&[], 0, 0).is_err());
    }

    #[test]
    fn masks_cancel_and_depend_on_seed_and_context() {
        let mut v = vec![5u32; 1000];
        apply_mask(&[1; 32], b"round 3", 1, &mut v);
        assert!(v.iter().filter(|&&w| w == 5).count() < 3);
        let mut w = v.clone();
        apply_mask(&[1; 32], b"round 4", -1, &mut w);
        assert_ne!(w, vec![5u32; 1000]);
        apply_mask(&[1; 32], b"round 3", -1, &mut v);
        assert_eq!(v, vec![5u32; 1000]);
    }

    #[test]
    fn stochastic_rounding_is_unbiased_and_sums_do_not_wrap() {
        let e = Encoding::new(0.05, 16, 1000).unwrap();
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(9);
        let values = vec![0.012_345f32; 20_000];
        let enc = e.encode(&values, &mut rng);
        let mean: f64 = enc.iter().map(|&w| f64::from(w as i32)).sum::<f64>() / enc.len() as f64;
        let want = 0.012_345 * e.scale;
        assert!((mean - want).abs() < 0.02, "{mean} vs {want}");
        // The largest sum the configuration allows decodes exactly.
        let bits = e.modulus_bits();
        assert_eq!(bits, 27); // 2 · 1000 · (2^16 + 1) + 1 ≤ 2^27
        let m = modulus_mask(bits);
        let most = e.encode(&[0.05], &mut rng)[0];
        let sum = (0..1000).fold(0u32, |s, _| s.wrapping_add(most)) & m;
        assert!((e.decode_sum(&[sum], bits).unwrap()[0] - 50.0).abs() < 1e-3);
        let least = e.encode(&[-1.0], &mut rng)[0];
        let sum = (0..1000).fold(0u32, |s, _| s.wrapping_add(least)) & m;
        assert!((e.decode_sum(&[sum], bits).unwrap()[0] + 50.0).abs() < 1e-3);
        // Values of ±128 steps (an int8 delta's range) for 100 clients fit a 15-bit modulus:
        // a masked input is 15/8 of an int8 upload.
        assert_eq!(Encoding::new(1.0, 7, 100).unwrap().modulus_bits(), 15);
        assert!(Encoding::new(0.05, 22, 1000).is_err());
        // Noise shares widen the modulus: 100 clients with σ = 2000 steps each add 7·2000·√100 to
        // 100·129: 2·152,900 + 1 needs 19 bits instead of 15.
        let quiet = Encoding::new(1.0, 7, 100).unwrap();
        assert_eq!(quiet.with_noise(2000.0).unwrap().modulus_bits(), 19);
        assert!(quiet.with_noise(1e9).is_err());
        assert!(quiet.with_noise(f64::NAN).is_err());
        assert!(Encoding::new(0.0, 16, 10).is_err());
        assert!(Encoding::new(f32::NAN, 16, 10).is_err());
    }

    /// Sums `n` encodings of `deltas(i)` modulo `2^bits` of `e`.
    fn masked_sum(
        e: &Encoding,
        n: usize,
        deltas: impl Fn(usize) -> Vec<f32>,
        rng: &mut impl Rng,
    ) -> (Vec<u32>, Vec<f64>) {
        let bits = e.modulus_bits();
        let mut sum = Vec::new();
        let mut exact = Vec::new();
        for i in 0..n {
            let d = deltas(i);
            let w = e.encode(&d, rng);
            sum.resize(w.len(), 0u32);
            exact.resize(d.len(), 0f64);
            for (s, w) in sum.iter_mut().zip(w) {
                *s = s.wrapping_add(w) & modulus_mask(bits);
            }
            for (x, d) in exact.iter_mut().zip(d) {
                *x += f64::from(d);
            }
        }
        (sum, exact)
    }

    fn rel_error(got: &[f32], want: &[f64]) -> f64 {
        let err: f64 = got
            .iter()
            .zip(want)
            .map(|(g, w)| (f64::from(*g) - w).powi(2))
            .sum();
        let norm: f64 = want.iter().map(|w| w * w).sum();
        (err / norm).sqrt()
    }

    #[test]
    fn rotated_sums_decode_even_when_every_device_sends_the_same_vector() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(4);
        let (n, len, bits) = (200, 3000, 13);
        let e = Encoding::rotated(0.1, 0.1, bits, n, len, [9; 32]).unwrap();
        assert_eq!(e.modulus_bits(), 13);
        assert_eq!(e.words(len), crate::rotation::padded_len(len));
        // The worst case the modulus is sized for: every device the same vector at the bound, all its
        // mass on one value (an unrotated sum of it would need log₂(2 · 200 · max) bits at any
        // resolution) and spread out.
        let mut one = vec![0f32; len];
        one[17] = 0.1;
        let spread: Vec<f32> = (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let norm = spread
            .iter()
            .map(|v| f64::from(*v).powi(2))
            .sum::<f64>()
            .sqrt() as f32;
        let spread: Vec<f32> = spread.iter().map(|v| v * 0.1 / norm).collect();
        for x in [one, spread] {
            let (sum, exact) = masked_sum(&e, n, |_| x.clone(), &mut rng);
            let got = e.decode_sum(&sum, bits).unwrap();
            assert_eq!(got.len(), len);
            // 200 devices' rounding (≈ 0.4 steps each, independent) against a sum 200× one vector.
            assert!(
                rel_error(&got, &exact) < 0.02,
                "{}",
                rel_error(&got, &exact)
            );
        }
        // Vectors past the bound are clipped to it.
        let big = vec![1.0f32; len];
        let (sum, _) = masked_sum(&e, 3, |_| big.clone(), &mut rng);
        let got = e.decode_sum(&sum, bits).unwrap();
        let norm = got
            .iter()
            .map(|v| f64::from(*v).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!((norm - 0.3).abs() < 0.01, "{norm}");
    }

    #[test]
    fn rotated_sums_of_independent_updates_are_unbiased_and_wrapped_sums_are_refused() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(5);
        let (n, len, bits) = (100, 2000, 12);
        let e = Encoding::rotated(0.1, 0.1, bits, n, len, [1; 32]).unwrap();
        let deltas: Vec<Vec<f32>> = (0..n)
            .map(|_| {
                (0..len)
                    .map(|_| rng.random_range(-0.002f32..0.002))
                    .collect()
            })
            .collect();
        let (sum, exact) = masked_sum(&e, n, |i| deltas[i].clone(), &mut rng);
        let got = e.decode_sum(&sum, bits).unwrap();
        // Each device's rounding is about a quarter of its typical rotated value here (≈ 2.9 steps);
        // independent devices' errors add up as their vectors do.
        let err = rel_error(&got, &exact);
        assert!(err > 0.05 && err < 0.3, "{err}");
        // The same sums 8× larger than the bound allows for (a device past its clip could do this)
        // overflow the 12-bit modulus: refused, not decoded wrong.
        let wide = Encoding::rotated(0.1, 0.8, bits, 2 * n, len, [1; 32]).unwrap();
        let x = vec![0.8 / (len as f32).sqrt(); len];
        let (sum, _) = masked_sum(&wide, 2 * n, |_| x.clone(), &mut rng);
        assert!(wide.decode_sum(&sum, bits).is_ok());
        let fold: Vec<u32> = sum
            .iter()
            .map(|w| w.wrapping_mul(8) & modulus_mask(bits))
            .collect();
        assert!(matches!(
            wide.decode_sum(&fold, bits),
            Err(SecAggError::Wrapped { .. })
        ));
        // Too small a modulus for the clients, noise shares, and nonsense are refused up front.
        assert!(Encoding::rotated(0.1, 0.1, 10, 1000, len, [1; 32]).is_err());
        assert!(e.with_noise(3.0).is_err());
        assert!(e.with_noise(0.0).is_ok());
        assert!(Encoding::rotated(0.1, f32::NAN, 16, 10, len, [1; 32]).is_err());
        assert!(Encoding::rotated(0.1, 0.1, 16, 10, 0, [1; 32]).is_err());
        assert!(Encoding::rotated(0.1, 0.1, 32, 10, 10, [1; 32]).is_err());
    }

    #[test]
    fn the_wrap_sizing_matches_gaussian_tails() {
        // 10⁻⁴ expected beyond ±kσ among n Gaussian coordinates: k = √2 · erfc⁻¹(10⁻⁴ / n).
        assert!((wrap_stddevs(1) - 3.8906).abs() < 1e-3);
        assert!(
            (wrap_stddevs(1_003_520) - 6.4675).abs() < 1e-3,
            "{}",
            wrap_stddevs(1_003_520)
        );
        assert!((erfc(1.0) - 0.157_299_21).abs() < 1e-7);
        assert!((erfc(-1.0) - 1.842_700_79).abs() < 1e-7);
        // Gaussian words at 1/8 of the modulus' half are expected to wrap ≈ 6·10⁻¹⁶ × n times; at 1/3,
        // many: the check reads the spread from the median.
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(6);
        let gauss = |sigma: f64, rng: &mut rand_chacha::ChaCha20Rng| -> Vec<i64> {
            (0..10_000)
                .map(|_| {
                    let (u, v): (f64, f64) = (rng.random(), rng.random());
                    let z = (-2.0 * (1.0 - u).ln()).sqrt() * (std::f64::consts::TAU * v).cos();
                    (z * sigma).round() as i64
                })
                .collect()
        };
        assert!(expected_wraps(&gauss(2048.0 / 8.0, &mut rng), 13) < 1e-9);
        assert!(expected_wraps(&gauss(4096.0 / 3.0, &mut rng), 13) > 10.0);
        assert_eq!(expected_wraps(&[1 << 20; 10], 13), 0.0);
    }
}
