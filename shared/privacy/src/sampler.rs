//! The fast exact discrete Gaussian sampler: Canonne–Kamath–Steinke (2020) over 64/128-bit integers, driven by
//! ChaCha20 keyed from the operating system, parallel over chunks.
//!
//! It draws from exactly the distribution opendp's `sample_discrete_gaussian` draws from (P(z) ∝ exp(-z²/2s²) for
//! an integer scale `s`); it only replaces opendp's arbitrary-precision arithmetic by machine integers where they
//! are wide enough, and falls back to opendp's own arbitrary-precision Bernoulli where they are not. No floating
//! point takes part in any random decision. What must never live here: a Box–Muller or `rand_distr::Normal`
//! draw, or any other floating-point sampler.

use dashu::{integer::UBig, rational::RBig};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::PrivacyError;

/// The random source behind privacy noise: ChaCha20, a cryptographically secure generator.
pub type NoiseRng = ChaCha20Rng;

/// Largest integer scale the fast sampler accepts (the 128-bit arithmetic below is sized for it).
pub const MAX_INT_SCALE: u64 = 1 << 24;

/// A fresh noise generator keyed with 256 bits from the operating system's entropy source.
pub fn os_rng() -> Result<NoiseRng, PrivacyError> {
    let mut seed = [0u8; 32];
    opendp::traits::samplers::fill_bytes(&mut seed)
        .map_err(|e| PrivacyError::Entropy(e.to_string()))?;
    Ok(NoiseRng::from_seed(seed))
}

/// Uniform integer in `[0, bound)` (`bound > 0`), exactly, by Lemire's multiply-and-reject method.
#[inline]
fn below_u64(rng: &mut NoiseRng, bound: u64) -> u64 {
    debug_assert!(bound > 0);
    let mut m = u128::from(rng.next_u64()) * u128::from(bound);
    let mut low = m as u64;
    if low < bound {
        let threshold = bound.wrapping_neg() % bound;
        while low < threshold {
            m = u128::from(rng.next_u64()) * u128::from(bound);
            low = m as u64;
        }
    }
    (m >> 64) as u64
}

/// Uniform integer in `[0, bound)` (`bound > 0`) for 128-bit bounds, by masking and rejection.
#[inline]
fn below_u128(rng: &mut NoiseRng, bound: u128) -> u128 {
    if let Ok(small) = u64::try_from(bound) {
        return u128::from(below_u64(rng, small));
    }
    let mask = u128::MAX >> (bound - 1).leading_zeros();
    loop {
        let v = ((u128::from(rng.next_u64()) << 64) | u128::from(rng.next_u64())) & mask;
        if v < bound {
            return v;
        }
    }
}

/// Bernoulli(num / den) for `num <= den`, exactly.
#[inline]
fn bernoulli_rational(rng: &mut NoiseRng, num: u128, den: u128) -> bool {
    below_u128(rng, den) < num
}

/// Bernoulli(exp(-num/den)) for `num/den ∈ [0, 1]` (CKS Algorithm 1, first part). `None` when `den·k` overflows.
#[inline]
fn bernoulli_exp1(rng: &mut NoiseRng, num: u128, den: u128) -> Option<bool> {
    let mut k: u128 = 1;
    loop {
        let d = den.checked_mul(k)?;
        if bernoulli_rational(rng, num, d) {
            k += 1;
        } else {
            return Some(k % 2 == 1);
        }
    }
}

/// Bernoulli(exp(-num/den)) for any `num/den >= 0` (CKS Algorithm 1). `None` when machine integers overflow.
#[inline]
fn bernoulli_exp(rng: &mut NoiseRng, mut num: u128, den: u128) -> Option<bool> {
    while num > den {
        if bernoulli_exp1(rng, 1, 1)? {
            num -= den;
        } else {
            return Some(false);
        }
    }
    bernoulli_exp1(rng, num, den)
}

/// Bernoulli(exp(-x)) for a rational `x >= 0` in arbitrary precision, built on opendp's exact rational
/// Bernoulli; the slow path for the (astronomically rare) candidates whose arithmetic exceeds 128 bits.
fn bernoulli_exp_big(mut x: RBig) -> Result<bool, PrivacyError> {
    let bern = |p: RBig| {
        opendp::traits::samplers::sample_bernoulli_rational(p)
            .map_err(|e| PrivacyError::Entropy(e.to_string()))
    };
    let exp1 = |x: RBig| -> Result<bool, PrivacyError> {
        let mut k = UBig::ONE;
        loop {
            if bern(x.clone() / RBig::from(k.clone()))? {
                k += UBig::ONE;
            } else {
                return Ok(k % 2u8 == 1);
            }
        }
    };
    while x > RBig::ONE {
        if exp1(RBig::ONE)? {
            x -= RBig::ONE;
        } else {
            return Ok(false);
        }
    }
    exp1(x)
}

/// Number of successes before the first failure of Bernoulli(exp(-1)) trials (CKS Algorithm 2, slow geometric).
#[inline]
fn geometric_exp1(rng: &mut NoiseRng) -> u64 {
    let mut k = 0;
    // `bernoulli_exp1(1, 1)` never overflows: the loop stops long before `k` nears 2^128.
    while bernoulli_exp1(rng, 1, 1).unwrap_or(false) {
        k += 1;
    }
    k
}

/// Discrete Laplace with integer scale `t >= 1`: P(y) ∝ exp(-|y|/t) (CKS Algorithm 2, as opendp implements it).
#[inline]
fn discrete_laplace(rng: &mut NoiseRng, t: u64) -> i64 {
    loop {
        let positive = rng.next_u32() & 1 == 1;
        let mut u = below_u64(rng, t);
        // Bernoulli(exp(-u/t)) with u < t never overflows 128 bits.
        while !bernoulli_exp(rng, u128::from(u), u128::from(t)).unwrap_or(false) {
            u = below_u64(rng, t);
        }
        let v = geometric_exp1(rng);
        let magnitude = v.saturating_mul(t).saturating_add(u);
        if positive || magnitude != 0 {
            let magnitude = magnitude.min(i64::MAX as u64) as i64;
            return if positive { magnitude } else { -magnitude };
        }
    }
}

/// One draw of the discrete Gaussian with integer scale `s` (P(z) ∝ exp(-z²/2s²)), `1 <= s <= MAX_INT_SCALE`.
pub fn discrete_gaussian(rng: &mut NoiseRng, s: u64) -> Result<i64, PrivacyError> {
    if s == 0 || s > MAX_INT_SCALE {
        return Err(PrivacyError::InvalidParameter(format!(
            "integer noise scale {s} must lie in [1, {MAX_INT_SCALE}]"
        )));
    }
    let t = s + 1; // floor(s) + 1
    let s2 = u128::from(s) * u128::from(s);
    let t128 = u128::from(t);
    // bias = (|c| - s²/t)² / (2s²) = (|c|·t - s²)² / (2·s²·t²)
    let den = 2 * s2 * t128 * t128; // ≤ 2^99 for s ≤ 2^24
    loop {
        let c = discrete_laplace(rng, t);
        let ct = u128::from(c.unsigned_abs()) * t128;
        let a = ct.abs_diff(s2);
        let accept = match a.checked_mul(a) {
            Some(num) => bernoulli_exp(rng, num, den),
            None => None,
        };
        let accept = match accept {
            Some(b) => b,
            None => {
                let a = RBig::from(UBig::from(a));
                bernoulli_exp_big(a.clone() * a / RBig::from(UBig::from(den)))?
            }
        };
        if accept {
            return Ok(c);
        }
    }
}

/// Fills `out` with independent discrete Gaussian draws of integer scale `s`, in parallel chunks; each chunk has
/// its own ChaCha20 stream of the one key, so the result depends only on the key and the length.
pub fn fill_discrete_gaussian(out: &mut [i64], s: u64, key: [u8; 32]) -> Result<(), PrivacyError> {
    use rayon::prelude::*;
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .try_for_each(|(i, chunk)| {
            let mut rng = NoiseRng::from_seed(key);
            rng.set_stream(i as u64);
            for v in chunk.iter_mut() {
                *v = discrete_gaussian(&mut rng, s)?;
            }
            Ok(())
        })
}

/// Elements per parallel chunk (one ChaCha20 stream each).
pub(crate) const CHUNK: usize = 16 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_below_is_in_range_and_covers_it() {
        let mut rng = NoiseRng::seed_from_u64(1);
        let mut seen = [0u32; 7];
        for _ in 0..7000 {
            seen[below_u64(&mut rng, 7) as usize] += 1;
        }
        assert!(seen.iter().all(|&n| (850..1150).contains(&n)), "{seen:?}");
        let big = (1u128 << 90) + 3;
        for _ in 0..1000 {
            assert!(below_u128(&mut rng, big) < big);
        }
    }

    #[test]
    fn bernoulli_exp_matches_its_probability() {
        let mut rng = NoiseRng::seed_from_u64(2);
        for &(num, den) in &[(1u128, 2u128), (3, 1), (7, 3), (0, 5)] {
            let n = 200_000;
            let hits = (0..n)
                .filter(|_| bernoulli_exp(&mut rng, num, den) == Some(true))
                .count() as f64;
            let p = (-(num as f64) / den as f64).exp();
            let sd = (p * (1.0 - p) / n as f64).sqrt().max(1e-9);
            assert!(
                ((hits / n as f64) - p).abs() < 5.0 * sd,
                "{num}/{den}: {} vs {p}",
                hits / n as f64
            );
        }
    }

    #[test]
    fn big_bernoulli_exp_agrees_with_the_fast_one() {
        let n = 20_000;
        let hits = (0..n)
            .filter(|_| bernoulli_exp_big(RBig::from(7) / RBig::from(3)).unwrap_or(false))
            .count() as f64;
        let p = (-7.0f64 / 3.0).exp();
        let sd = (p * (1.0 - p) / n as f64).sqrt();
        assert!((hits / n as f64 - p).abs() < 5.0 * sd);
    }

    #[test]
    fn rejects_out_of_range_scales() {
        let mut rng = NoiseRng::seed_from_u64(3);
        assert!(discrete_gaussian(&mut rng, 0).is_err());
        assert!(discrete_gaussian(&mut rng, MAX_INT_SCALE + 1).is_err());
    }

    #[test]
    fn filling_is_reproducible_from_the_key_and_independent_of_threads() {
        let mut a = vec![0i64; 3 * CHUNK + 5];
        let mut b = a.clone();
        fill_discrete_gaussian(&mut a, 1000, [9; 32]).unwrap();
        fill_discrete_gaussian(&mut b, 1000, [9; 32]).unwrap();
        assert_eq!(a, b);
        let mut c = a.clone();
        fill_discrete_gaussian(&mut c, 1000, [8; 32]).unwrap();
        assert_ne!(a, c);
    }
}
