//! Special functions the accountants need (log-space Gaussian tails, log-gamma, log-sum helpers), accurate far
//! into the tails where the naive formulas underflow. Nothing random and nothing privacy-specific lives here.

use std::f64::consts::{LN_2, PI, SQRT_2};

/// log(exp(a) + exp(b)) without overflow.
pub fn log_add(a: f64, b: f64) -> f64 {
    let (lo, hi) = if a < b { (a, b) } else { (b, a) };
    if lo == f64::NEG_INFINITY {
        return hi;
    }
    (lo - hi).exp().ln_1p() + hi
}

/// log(exp(a) - exp(b)) for a > b.
pub fn log_sub(a: f64, b: f64) -> f64 {
    if b == f64::NEG_INFINITY {
        return a;
    }
    a + (-(b - a).exp()).ln_1p()
}

/// log of the binomial coefficient C(n, k) for real n, k.
pub fn log_comb(n: f64, k: f64) -> f64 {
    libm::lgamma(n + 1.0) - libm::lgamma(k + 1.0) - libm::lgamma(n - k + 1.0)
}

/// log Φ(x), the log of the standard normal CDF, accurate for very negative x.
pub fn log_ndtr(x: f64) -> f64 {
    if x > 0.0 {
        (-0.5 * libm::erfc(x / SQRT_2)).ln_1p()
    } else if x > -37.0 {
        (0.5 * libm::erfc(-x / SQRT_2)).ln()
    } else {
        // Asymptotic expansion of the Mills ratio.
        let z = 1.0 / (x * x);
        let series = 1.0 - z + 3.0 * z * z - 15.0 * z * z * z + 105.0 * z * z * z * z;
        -0.5 * x * x - (-x).ln() - 0.5 * (2.0 * PI).ln() + series.ln()
    }
}

/// log(erfc(x)), accurate for large x (dp_accounting's `_log_erfc`).
pub fn log_erfc(x: f64) -> f64 {
    LN_2 + log_ndtr(-x * SQRT_2)
}

/// Φ(x), the standard normal CDF.
pub fn ndtr(x: f64) -> f64 {
    0.5 * libm::erfc(-x / SQRT_2)
}

/// The standard normal quantile of exp(log_p), for log_p < log(0.5): Newton's method on log Φ.
pub fn ndtri_log(log_p: f64) -> f64 {
    let mut x = -(-2.0 * log_p).sqrt();
    for _ in 0..100 {
        let lc = log_ndtr(x);
        // d/dx log Φ(x) = φ(x)/Φ(x) = exp(log φ(x) - log Φ(x))
        let log_pdf = -0.5 * x * x - 0.5 * (2.0 * PI).ln();
        let step = (lc - log_p) / (log_pdf - lc).exp();
        x -= step;
        if step.abs() < 1e-14 * x.abs().max(1.0) {
            break;
        }
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_ndtr_agrees_with_known_values() {
        // scipy.special.log_ndtr
        let cases = [
            (0.0, -LN_2),
            (-5.0, -15.064998393988725),
            (-40.0, -804.6084420137538),
            (3.0, -0.0013508099647481938),
        ];
        for (x, want) in cases {
            let got = log_ndtr(x);
            assert!(
                (got - want).abs() < 1e-10 * want.abs().max(1.0),
                "{x}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn quantile_inverts_the_cdf() {
        for lp in [-1.0, -10.0, -50.0 + 0.5f64.ln(), -700.0] {
            let x = ndtri_log(lp);
            assert!((log_ndtr(x) - lp).abs() < 1e-9 * lp.abs(), "{lp}");
        }
        // scipy.stats.norm.ppf(0.5 * exp(-50))
        assert!((ndtri_log(-50.0 + 0.5f64.ln()) - -9.745_474_864_965_935).abs() < 1e-8);
    }
}
