//! The Gaussian mechanism on f32 vectors: opendp's measurement states the guarantee, the fast sampler draws it.
//!
//! [`GaussianMechanism`] builds opendp's `make_gaussian` over `Vec<f32>` with L2 sensitivity `C`, noise scale `σ`
//! and granularity `2^k`, and reads the guarantee (zero-concentrated DP, ρ) from opendp's privacy map. Releasing a
//! vector `x` then means: round each `x_i` to the nearest multiple of `2^k` (ties up), add `2^k·Z_i` with `Z_i`
//! an exact discrete Gaussian of integer scale `σ/2^k`, and round the result to the nearest f32 — exactly what
//! opendp's measurement computes, but with [`crate::sampler`] instead of arbitrary-precision arithmetic. `k` is
//! chosen so that `σ/2^k ∈ [2^20, 2^21)`, and `σ` is rounded *up* to a multiple of `2^k` (relative change below
//! 1e-6), so the noise is never smaller than asked. Clipping and the DP-FedAvg helpers live here too.
//! What must never live here: noise from anything but the exact sampler, or a guarantee not read from opendp.

use dashu::{integer::IBig, rational::RBig};
use opendp::{
    core::Measurement,
    domains::{AtomDomain, VectorDomain},
    measurements::make_gaussian,
    measures::ZeroConcentratedDivergence,
    metrics::L2Distance,
    traits::CastInternalRational,
};

use crate::{sampler, PrivacyError};

/// Granularity bits: the integer noise scale lies in `[2^SCALE_BITS, 2^(SCALE_BITS+1))`.
const SCALE_BITS: i32 = 20;

/// opendp's Gaussian measurement over f32 vectors of a fixed length, as built by [`GaussianMechanism`].
pub type OpendpGaussian = Measurement<
    VectorDomain<AtomDomain<f32>>,
    L2Distance<f32>,
    ZeroConcentratedDivergence,
    Vec<f32>,
>;

/// Additive Gaussian noise for f32 vectors of one length, with its opendp-stated privacy guarantee.
pub struct GaussianMechanism {
    sensitivity: f32,
    scale: f64,
    k: i32,
    int_scale: u64,
    dim: usize,
    rho: f64,
    measurement: OpendpGaussian,
}

impl std::fmt::Debug for GaussianMechanism {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GaussianMechanism")
            .field("sensitivity", &self.sensitivity)
            .field("scale", &self.scale)
            .field("k", &self.k)
            .field("dim", &self.dim)
            .field("rho", &self.rho)
            .finish()
    }
}

impl GaussianMechanism {
    /// Noise of standard deviation (at least) `scale` for vectors of length `dim` whose L2 sensitivity is
    /// `sensitivity`.
    pub fn new(sensitivity: f64, scale: f64, dim: usize) -> Result<Self, PrivacyError> {
        if !(sensitivity.is_finite() && sensitivity > 0.0) {
            return Err(PrivacyError::InvalidParameter(format!(
                "L2 sensitivity must be positive and finite, got {sensitivity}"
            )));
        }
        if !(scale.is_finite() && scale > 1e-30 && scale < 1e30) {
            return Err(PrivacyError::InvalidParameter(format!(
                "noise scale must lie in (1e-30, 1e30), got {scale}"
            )));
        }
        if dim == 0 {
            return Err(PrivacyError::InvalidParameter(
                "vector length must be positive".into(),
            ));
        }
        let k = scale.log2().floor() as i32 - SCALE_BITS;
        let int_scale = (scale * 2f64.powi(-k)).ceil() as u64;
        let scale = int_scale as f64 * 2f64.powi(k);
        // Round the sensitivity up to an f32 so the guarantee is never computed for a smaller one.
        let mut sens = sensitivity as f32;
        if f64::from(sens) < sensitivity {
            sens = sens.next_up();
        }
        let measurement = opendp_gaussian(scale, dim, Some(k))?;
        let rho = measurement
            .map(&sens)
            .map_err(|e| PrivacyError::Opendp(e.to_string()))?;
        Ok(Self {
            sensitivity: sens,
            scale,
            k,
            int_scale,
            dim,
            rho,
            measurement,
        })
    }

    /// Noise for sensitivity `clip` at `noise_multiplier · clip` standard deviation (the DP-SGD convention).
    pub fn with_multiplier(
        clip: f64,
        noise_multiplier: f64,
        dim: usize,
    ) -> Result<Self, PrivacyError> {
        Self::new(clip, noise_multiplier * clip, dim)
    }

    /// The standard deviation actually added (≥ the one asked for, by less than one part in a million).
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// The L2 sensitivity the guarantee is stated for.
    pub fn sensitivity(&self) -> f64 {
        f64::from(self.sensitivity)
    }

    /// The noise granularity exponent: outputs are multiples of `2^k` before the final rounding to f32.
    pub fn granularity_exponent(&self) -> i32 {
        self.k
    }

    /// The vector length this mechanism was built for.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The guarantee opendp's privacy map states: ρ-zCDP for one release.
    pub fn rho(&self) -> f64 {
        self.rho
    }

    /// The noise multiplier to account with: `1/sqrt(2ρ)`, i.e. σ over the sensitivity *including* the extra
    /// sensitivity opendp charges for rounding inputs to the `2^k` grid (slightly below `scale/sensitivity`).
    pub fn effective_noise_multiplier(&self) -> f64 {
        1.0 / (2.0 * self.rho).sqrt()
    }

    /// opendp's own measurement (slow, arbitrary precision): the reference the fast path is tested against.
    pub fn opendp_measurement(&self) -> &OpendpGaussian {
        &self.measurement
    }

    /// Adds noise to `v` in place with a generator keyed from the operating system.
    pub fn add_noise(&self, v: &mut [f32]) -> Result<(), PrivacyError> {
        let mut key = [0u8; 32];
        opendp::traits::samplers::fill_bytes(&mut key)
            .map_err(|e| PrivacyError::Entropy(e.to_string()))?;
        self.add_noise_with_key(v, key)
    }

    /// Adds noise with an explicit 256-bit key: reproducible, for simulations and tests. Noise whose key an
    /// adversary knows protects nothing; deployed code calls [`GaussianMechanism::add_noise`].
    pub fn add_noise_with_key(&self, v: &mut [f32], key: [u8; 32]) -> Result<(), PrivacyError> {
        if v.len() != self.dim {
            return Err(PrivacyError::LengthMismatch {
                expected: self.dim,
                got: v.len(),
            });
        }
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(PrivacyError::NonFinite { index: i });
        }
        let mut z = vec![0i64; v.len()];
        sampler::fill_discrete_gaussian(&mut z, self.int_scale, key)?;
        let k = self.k;
        for (x, &zi) in v.iter_mut().zip(&z) {
            *x = release(*x, zi, k);
        }
        Ok(())
    }
}

/// opendp's Gaussian measurement over non-NaN f32 vectors of length `dim` with noise scale `scale` and
/// granularity `2^k` (`None`: opendp's own default granularity). [`GaussianMechanism`] builds its guarantee
/// with this; benchmarks and tests use it to run opendp's sampler as the reference.
pub fn opendp_gaussian(
    scale: f64,
    dim: usize,
    k: Option<i32>,
) -> Result<OpendpGaussian, PrivacyError> {
    let domain = VectorDomain::new(AtomDomain::<f32>::new_non_nan()).with_size(dim);
    make_gaussian::<_, _, ZeroConcentratedDivergence>(
        domain,
        L2Distance::<f32>::default(),
        scale,
        k,
    )
    .map_err(|e| PrivacyError::Opendp(e.to_string()))
}

/// Runs an opendp measurement on `v` and returns its release; opendp's errors become [`PrivacyError::Opendp`].
pub fn invoke_opendp(m: &OpendpGaussian, v: &[f32]) -> Result<Vec<f32>, PrivacyError> {
    m.invoke(&v.to_vec())
        .map_err(|e| PrivacyError::Opendp(e.to_string()))
}

/// `x` rounded to the nearest multiple of `2^k` (ties up), as an exact integer count of `2^k`; `None` when the
/// count does not fit comfortably in an i64.
fn to_grid(x: f32, k: i32) -> Option<i64> {
    if x == 0.0 {
        return Some(0);
    }
    let bits = x.to_bits();
    let exp = ((bits >> 23) & 0xff) as i32;
    let frac = i64::from(bits & 0x7f_ffff);
    let (m, e) = if exp == 0 {
        (frac, -149)
    } else {
        (frac | 0x80_0000, exp - 150)
    };
    let m = if x < 0.0 { -m } else { m };
    // x = m · 2^e; count = floor(m · 2^(e-k) + 1/2)
    let shift = e - k;
    if shift >= 0 {
        if shift > 36 {
            return None;
        }
        Some(m << shift)
    } else {
        let s = -shift;
        if s > 62 {
            return Some(0); // |m| < 2^24, so |x/2^k| < 2^-38: rounds to 0 either side
        }
        Some((m + (1i64 << (s - 1))) >> s)
    }
}

/// The released value: `(grid(x) + z)·2^k` rounded once to the nearest f32 — opendp's float pipeline.
fn release(x: f32, z: i64, k: i32) -> f32 {
    if let Some(n) = to_grid(x, k) {
        if let Some(sum) = n.checked_add(z) {
            if sum.unsigned_abs() < (1u64 << 53) {
                // Exact in f64 (53-bit integer times a power of two in range), then one rounding to f32.
                return (sum as f64 * 2f64.powi(k)) as f32;
            }
        }
    }
    // Rare: huge values. The arbitrary-precision path opendp itself takes.
    let rx = RBig::try_from(x).unwrap_or(RBig::ZERO);
    let n = nearest_multiple_of_2k(rx, k);
    f32::from_rational(times_2k(RBig::from(n + IBig::from(z)), k))
}

/// `x` rounded to the nearest multiple of `2^k` (ties up), in units of `2^k`, in arbitrary precision: the
/// rounding opendp's `make_float_to_bigint` applies (`floor((2·x/2^k + 1) / 2)`).
fn nearest_multiple_of_2k(x: RBig, k: i32) -> IBig {
    let (num, den) = times_2k(x, -k).into_parts();
    let den = IBig::from(den);
    let a: IBig = num << 1;
    // floor division for a possibly negative numerator
    let q = if a >= IBig::ZERO {
        &a / &den
    } else {
        (a - &den + IBig::ONE) / &den
    };
    (q + IBig::ONE) >> 1usize
}

/// `x · 2^k` exactly.
fn times_2k(x: RBig, k: i32) -> RBig {
    let (num, den) = x.into_parts();
    if k < 0 {
        RBig::from_parts(num, den << (-k) as usize)
    } else {
        RBig::from_parts(num << k as usize, den)
    }
}

/// Scales `v` so its L2 norm is at most `bound`; returns the norm before clipping. Errors on non-finite input.
pub fn clip_l2(v: &mut [f32], bound: f64) -> Result<f64, PrivacyError> {
    if !(bound.is_finite() && bound > 0.0) {
        return Err(PrivacyError::InvalidParameter(format!(
            "clip bound must be positive, got {bound}"
        )));
    }
    let norm = l2_norm(v)?;
    if norm > bound {
        // Multiply in f64 and round down the factor a hair so rounding never pushes the norm above the bound.
        let factor = bound / norm * (1.0 - 1e-6);
        for x in v.iter_mut() {
            *x = (f64::from(*x) * factor) as f32;
        }
    }
    Ok(norm)
}

/// L2 norm of `v` accumulated in f64; errors on NaN or infinity.
pub fn l2_norm(v: &[f32]) -> Result<f64, PrivacyError> {
    let mut s = 0.0f64;
    for (i, &x) in v.iter().enumerate() {
        if !x.is_finite() {
            return Err(PrivacyError::NonFinite { index: i });
        }
        s += f64::from(x) * f64::from(x);
    }
    Ok(s.sqrt())
}

/// Clips each row of `per_example` (a row-major `[n, dim]` matrix of per-example gradients) to L2 norm `bound`
/// and returns their sum; the sum then has L2 sensitivity `bound` under adding or removing one example.
pub fn clip_and_sum(
    per_example: &mut [f32],
    dim: usize,
    bound: f64,
) -> Result<Vec<f32>, PrivacyError> {
    if dim == 0 || !per_example.len().is_multiple_of(dim) {
        return Err(PrivacyError::LengthMismatch {
            expected: dim,
            got: per_example.len(),
        });
    }
    let mut sum = vec![0f64; dim];
    for row in per_example.chunks_mut(dim) {
        clip_l2(row, bound)?;
        for (s, &x) in sum.iter_mut().zip(row.iter()) {
            *s += f64::from(x);
        }
    }
    Ok(sum.into_iter().map(|x| x as f32).collect())
}

/// Where DP-FedAvg's Gaussian noise is added.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoisePlacement {
    /// The coordinator adds N(0, σ²C²) to the sum of clipped deltas.
    Central,
    /// Each of `n` guaranteed clients adds N(0, σ²C²/n) to its clipped delta; the sum carries N(0, σ²C²).
    Distributed {
        /// The number of clients whose noise is guaranteed to be in the sum.
        clients: u32,
    },
}

/// User-level DP-FedAvg on one client delta: clip it to `clip` and, in distributed placement, add this client's
/// share of the noise. Returns the norm before clipping.
pub fn privatize_client_delta(
    delta: &mut [f32],
    clip: f64,
    noise_multiplier: f64,
    placement: NoisePlacement,
) -> Result<f64, PrivacyError> {
    let norm = clip_l2(delta, clip)?;
    if let NoisePlacement::Distributed { clients } = placement {
        if clients == 0 {
            return Err(PrivacyError::InvalidParameter(
                "distributed noise needs at least one client".into(),
            ));
        }
        let share = noise_multiplier * clip / f64::from(clients).sqrt();
        GaussianMechanism::new(clip, share, delta.len())?.add_noise(delta)?;
    }
    Ok(norm)
}

/// User-level DP-FedAvg at the coordinator: add central noise N(0, σ²C²) to the sum of clipped deltas.
pub fn add_central_noise(
    sum: &mut [f32],
    clip: f64,
    noise_multiplier: f64,
) -> Result<GaussianMechanism, PrivacyError> {
    let mech = GaussianMechanism::with_multiplier(clip, noise_multiplier, sum.len())?;
    mech.add_noise(sum)?;
    Ok(mech)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_rounding_matches_opendp() {
        for &k in &[-30, -20, -5, 0, 3] {
            for &x in &[
                0.0f32, 1.0, -1.0, 0.3, -0.3, 1e-20, -1e-20, 12345.678, -7.5e-3, 2.5, -2.5,
            ] {
                let ours = to_grid(x, k).map(IBig::from);
                let theirs = nearest_multiple_of_2k(RBig::try_from(x).unwrap(), k);
                if let Some(o) = ours {
                    assert_eq!(o, theirs, "x={x} k={k}");
                }
            }
        }
    }

    #[test]
    fn release_rounds_like_opendp() {
        for &k in &[-40, -21, -3] {
            for &(x, z) in &[
                (0.1f32, 12345i64),
                (-3.7, -987654),
                (1e-9, 1),
                (5.0, 0),
                (-1e-30, -3),
            ] {
                let n = nearest_multiple_of_2k(RBig::try_from(x).unwrap(), k);
                let want = f32::from_rational(times_2k(RBig::from(n + IBig::from(z)), k));
                assert_eq!(
                    release(x, z, k).to_bits(),
                    want.to_bits(),
                    "x={x} z={z} k={k}"
                );
            }
        }
    }

    #[test]
    fn scale_is_rounded_up_and_rho_is_the_gaussian_one() {
        let m = GaussianMechanism::new(1.0, 1.1, 1000).unwrap();
        assert!(m.scale() >= 1.1 && m.scale() < 1.1 * (1.0 + 1e-6));
        // ρ = Δ²/(2σ²) with Δ inflated by opendp's rounding allowance 2^k·sqrt(n): a relative hair above.
        let plain = 1.0 / (2.0 * m.scale() * m.scale());
        assert!(
            m.rho() >= plain && m.rho() < plain * 1.001,
            "{} vs {plain}",
            m.rho()
        );
        assert!(m.effective_noise_multiplier() <= 1.1 + 1e-6);
    }

    #[test]
    fn bad_inputs_are_errors() {
        assert!(GaussianMechanism::new(0.0, 1.0, 3).is_err());
        assert!(GaussianMechanism::new(1.0, f64::NAN, 3).is_err());
        assert!(GaussianMechanism::new(1.0, 1.0, 0).is_err());
        let m = GaussianMechanism::new(1.0, 1.0, 3).unwrap();
        assert!(matches!(
            m.add_noise(&mut [1.0, 2.0]),
            Err(PrivacyError::LengthMismatch { .. })
        ));
        assert!(matches!(
            m.add_noise(&mut [1.0, f32::NAN, 2.0]),
            Err(PrivacyError::NonFinite { index: 1 })
        ));
        let mut v = [f32::INFINITY];
        assert!(clip_l2(&mut v, 1.0).is_err());
    }

    #[test]
    fn clipping_bounds_the_norm_and_keeps_small_vectors() {
        let mut v = vec![3.0f32, 4.0];
        assert_eq!(clip_l2(&mut v, 1.0).unwrap(), 5.0);
        assert!(l2_norm(&v).unwrap() <= 1.0);
        assert!((v[0] - 0.6).abs() < 1e-5 && (v[1] - 0.8).abs() < 1e-5);
        let mut w = vec![0.1f32, 0.2];
        clip_l2(&mut w, 1.0).unwrap();
        assert_eq!(w, vec![0.1, 0.2]);
        let mut rows = vec![3.0f32, 4.0, 0.0, 0.5];
        let s = clip_and_sum(&mut rows, 2, 1.0).unwrap();
        assert!((s[0] - 0.6).abs() < 1e-5 && (s[1] - 1.3).abs() < 1e-5);
    }

    #[test]
    fn noise_has_the_stated_scale() {
        let m = GaussianMechanism::new(1.0, 2.0, 200_000).unwrap();
        let mut v = vec![0.5f32; 200_000];
        m.add_noise_with_key(&mut v, [5; 32]).unwrap();
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
        let var = v
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / (n - 1.0);
        assert!((mean - 0.5).abs() < 5.0 * 2.0 / n.sqrt(), "{mean}");
        assert!((var / 4.0 - 1.0).abs() < 5.0 * (2.0 / n).sqrt(), "{var}");
    }

    #[test]
    fn distributed_shares_add_up_to_the_central_noise() {
        let n = 16u32;
        let dim = 50_000;
        let mut total = vec![0f32; dim];
        for _ in 0..n {
            let mut d = vec![0f32; dim];
            privatize_client_delta(&mut d, 1.0, 1.5, NoisePlacement::Distributed { clients: n })
                .unwrap();
            for (t, x) in total.iter_mut().zip(&d) {
                *t += x;
            }
        }
        let var = total.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>() / dim as f64;
        assert!((var / 2.25 - 1.0).abs() < 0.05, "{var}");
        let mut d = vec![3.0f32, 4.0];
        assert_eq!(
            privatize_client_delta(&mut d, 1.0, 1.0, NoisePlacement::Central).unwrap(),
            5.0
        );
        assert!(l2_norm(&d).unwrap() <= 1.0);
    }
}
