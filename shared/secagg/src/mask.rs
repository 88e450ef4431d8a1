//! Arithmetic in Z_{2^32}: masks expanded from 32-byte seeds with a stream cipher (ChaCha20), and
//! the fixed-point encoding of a model delta (clip, scale, unbiased stochastic rounding) whose sum
//! over every client provably stays clear of wrap-around. Nothing here knows of clients or keys.

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

/// Fixed-point encoding of deltas into Z_{2^32}: each value clipped to `[-clip, clip]`, multiplied
/// by `scale` and rounded stochastically (unbiased: E[round(v)] = v), stored in two's complement.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Encoding {
    /// Largest magnitude of one value.
    pub clip: f32,
    /// Integer steps per unit.
    pub scale: f64,
    /// Most clients whose encoded values are summed.
    pub max_clients: usize,
    /// Standard deviation, in integer steps, of the noise share each client adds to each value (0:
    /// none); the modulus leaves room for 7 standard deviations of the summed noise.
    pub noise_sigma: f64,
}

/// Standard deviations of the summed noise the modulus makes room for (a value wraps with probability
/// below 3·10⁻¹²).
const NOISE_ROOM: f64 = 7.0;

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
        }
        .checked()
    }

    /// The same encoding with each client adding integer noise of standard deviation `sigma` steps to
    /// each value (refused when the noisy sum could wrap).
    pub fn with_noise(self, sigma: f64) -> Result<Self, SecAggError> {
        if !(sigma.is_finite() && sigma >= 0.0) {
            return Err(ParamsError::NoiseSigma(sigma).into());
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

    /// The largest magnitude a sum can reach (values, rounding, and the noise room).
    fn bound(&self) -> f64 {
        let n = self.max_clients as f64;
        n * (f64::from(self.clip) * self.scale + 1.0) + NOISE_ROOM * self.noise_sigma * n.sqrt()
    }

    fn checked(self) -> Result<Self, SecAggError> {
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

    /// Encodes `values` (non-finite values count as 0).
    pub fn encode(&self, values: &[f32], rng: &mut impl Rng) -> Vec<u32> {
        values
            .iter()
            .map(|&v| {
                let v = if v.is_finite() { v } else { 0.0 };
                let x = f64::from(v.clamp(-self.clip, self.clip)) * self.scale;
                let floor = x.floor();
                let q = floor + f64::from(u8::from(rng.random::<f64>() < x - floor));
                (q as i64) as i32 as u32
            })
            .collect()
    }

    /// The fewest bits of modulus that hold any sum of up to `max_clients` encoded values without
    /// wrapping (sums lie in `[-B, B]`, `B = max_clients · (clip · scale + 1)` plus 7 standard deviations
    /// of the summed noise, so `2B < 2^bits`).
    pub fn modulus_bits(&self) -> u32 {
        ((2.0 * self.bound() + 1.0).log2().ceil() as u32).clamp(1, 32)
    }

    /// Decodes a sum of encoded vectors reduced modulo `2^bits` (read as a signed `bits`-bit
    /// number) back to floats.
    pub fn decode_sum(&self, sum: &[u32], bits: u32) -> Vec<f32> {
        let m = modulus_mask(bits);
        sum.iter()
            .map(|&w| {
                let w = i64::from(w & m);
                let signed = if bits < 32 && w >= 1i64 << (bits - 1) {
                    w - (1i64 << bits)
                } else if bits >= 32 {
                    i64::from(w as u32 as i32)
                } else {
                    w
                };
                (signed as f64 / self.scale) as f32
            })
            .collect()
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
        assert!((e.decode_sum(&[sum], bits)[0] - 50.0).abs() < 1e-3);
        let least = e.encode(&[-1.0], &mut rng)[0];
        let sum = (0..1000).fold(0u32, |s, _| s.wrapping_add(least)) & m;
        assert!((e.decode_sum(&[sum], bits)[0] + 50.0).abs() < 1e-3);
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
}
