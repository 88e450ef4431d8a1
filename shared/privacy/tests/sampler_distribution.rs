//! The fast exact sampler draws opendp's distribution: mean, variance, tails and Kolmogorov–Smirnov against the
//! exact discrete Gaussian CDF, and two-sample KS against opendp's own sampler, at several scales — for the
//! integer sampler and for the whole f32 mechanism (grid rounding, noise, rounding back).
//!
//! Our draws are seeded; opendp's come from OpenSSL and cannot be seeded, so the two-sample checks use a
//! critical value at α ≈ 1e-6 (c = 2.65): a correct sampler fails them about once in a million runs.

use rand::SeedableRng;
use starling_privacy::{sampler, GaussianMechanism};

/// Exact CDF of the discrete Gaussian with scale s on [-R, R] (mass beyond R·s is below 1e-300).
struct ExactDiscreteGaussian {
    lo: i64,
    cdf: Vec<f64>,
    variance: f64,
}

impl ExactDiscreteGaussian {
    fn new(s: f64) -> Self {
        let r = (40.0 * s).ceil() as i64;
        let w: Vec<f64> = (-r..=r)
            .map(|z| (-(z as f64).powi(2) / (2.0 * s * s)).exp())
            .collect();
        let total: f64 = w.iter().sum();
        let mut acc = 0.0;
        let cdf = w.iter().map(|x| {
            acc += x / total;
            acc
        });
        let cdf: Vec<f64> = cdf.collect();
        let variance = (-r..=r)
            .zip(&w)
            .map(|(z, x)| (z as f64).powi(2) * x / total)
            .sum();
        Self {
            lo: -r,
            cdf,
            variance,
        }
    }
    fn cdf(&self, z: i64) -> f64 {
        if z < self.lo {
            0.0
        } else {
            self.cdf.get((z - self.lo) as usize).copied().unwrap_or(1.0)
        }
    }
    fn tail(&self, t: i64) -> f64 {
        // P(|Z| > t)
        self.cdf(-t - 1) + (1.0 - self.cdf(t))
    }
}

fn ks_vs_exact(samples: &mut [i64], exact: &ExactDiscreteGaussian) -> f64 {
    samples.sort_unstable();
    let n = samples.len() as f64;
    let mut d = 0.0f64;
    let mut i = 0;
    while i < samples.len() {
        let z = samples[i];
        let mut j = i;
        while j < samples.len() && samples[j] == z {
            j += 1;
        }
        // empirical CDF just below z and at z, against the exact one
        d = d.max((i as f64 / n - exact.cdf(z - 1)).abs());
        d = d.max((j as f64 / n - exact.cdf(z)).abs());
        i = j;
    }
    d
}

fn ks_two_sample<T: PartialOrd + Copy>(a: &mut [T], b: &mut [T]) -> f64 {
    a.sort_by(|x, y| x.partial_cmp(y).unwrap());
    b.sort_by(|x, y| x.partial_cmp(y).unwrap());
    let (n, m) = (a.len() as f64, b.len() as f64);
    let (mut i, mut j, mut d) = (0, 0, 0.0f64);
    while i < a.len() && j < b.len() {
        let v = if a[i] <= b[j] { a[i] } else { b[j] };
        while i < a.len() && a[i] <= v {
            i += 1;
        }
        while j < b.len() && b[j] <= v {
            j += 1;
        }
        d = d.max((i as f64 / n - j as f64 / m).abs());
    }
    d
}

const C_TWO_SAMPLE: f64 = 2.65;

fn opendp_integer_draws(s: u64, n: usize) -> Vec<i64> {
    let scale = dashu::rational::RBig::from(s);
    (0..n)
        .map(|_| {
            let z = opendp::traits::samplers::sample_discrete_gaussian(scale.clone()).unwrap();
            i64::try_from(z).unwrap()
        })
        .collect()
}

#[test]
fn integer_sampler_is_the_discrete_gaussian_and_matches_opendp() {
    let mut rng = sampler::NoiseRng::seed_from_u64(42);
    for &s in &[1u64, 3, 10, 1000, 1 << 20] {
        let n = 200_000;
        let mut ours: Vec<i64> = (0..n)
            .map(|_| sampler::discrete_gaussian(&mut rng, s).unwrap())
            .collect();
        let exact = ExactDiscreteGaussian::new(s as f64);
        let nf = n as f64;
        let mean = ours.iter().map(|&z| z as f64).sum::<f64>() / nf;
        let var = ours.iter().map(|&z| (z as f64).powi(2)).sum::<f64>() / nf;
        let sd = exact.variance.sqrt();
        assert!(mean.abs() < 5.0 * sd / nf.sqrt(), "s={s}: mean {mean}");
        // Var of z² for a Gaussian is 2σ⁴.
        assert!(
            (var - exact.variance).abs() < 5.0 * (2.0f64).sqrt() * exact.variance / nf.sqrt(),
            "s={s}: var {var} vs {}",
            exact.variance
        );
        for k in [2.0, 3.0, 4.0] {
            let t = (k * s as f64) as i64;
            let p = exact.tail(t);
            let hits = ours.iter().filter(|&&z| z.abs() > t).count() as f64;
            let se = (p * (1.0 - p) / nf).sqrt();
            assert!(
                (hits / nf - p).abs() < 5.0 * se + 1.0 / nf,
                "s={s} tail {k}: {} vs {p}",
                hits / nf
            );
        }
        if s <= 1000 {
            let d = ks_vs_exact(&mut ours, &exact);
            assert!(d < 1.95 / nf.sqrt(), "s={s}: KS {d}");
            let m = 20_000;
            let mut theirs = opendp_integer_draws(s, m);
            let d2 = ks_two_sample(&mut ours, &mut theirs);
            let crit = C_TWO_SAMPLE * ((nf + m as f64) / (nf * m as f64)).sqrt();
            assert!(d2 < crit, "s={s}: two-sample KS vs opendp {d2} >= {crit}");
        }
    }
}

#[test]
fn f32_mechanism_matches_opendps_measurement() {
    for &(sigma, x) in &[(0.37f64, 0.1f32), (2.5, -3.0), (1e-3, 0.5)] {
        let n = 20_000;
        let mech = GaussianMechanism::new(1.0, sigma, n).unwrap();
        let mut ours = vec![x; n];
        mech.add_noise_with_key(&mut ours, [7; 32]).unwrap();
        let mut theirs = mech.opendp_measurement().invoke(&vec![x; n]).unwrap();
        let nf = n as f64;
        for (name, v) in [("ours", &ours), ("opendp", &theirs)] {
            let mean = v.iter().map(|&y| f64::from(y)).sum::<f64>() / nf;
            let var = v
                .iter()
                .map(|&y| (f64::from(y) - f64::from(x)).powi(2))
                .sum::<f64>()
                / nf;
            assert!(
                (mean - f64::from(x)).abs() < 5.0 * sigma / nf.sqrt(),
                "{name} σ={sigma}: mean {mean}"
            );
            assert!(
                (var / (sigma * sigma) - 1.0).abs() < 5.0 * (2.0 / nf).sqrt(),
                "{name} σ={sigma}: var {var}"
            );
        }
        let d = ks_two_sample(&mut ours, &mut theirs);
        let crit = C_TWO_SAMPLE * (2.0 / nf).sqrt();
        assert!(d < crit, "σ={sigma}: two-sample KS {d} >= {crit}");
    }
}
