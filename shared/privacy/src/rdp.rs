//! Rényi-DP accountant for the Poisson-subsampled Gaussian mechanism (Mironov, Talwar, Zhang 2019), a port of
//! Google dp_accounting's `RdpAccountant` (integer and fractional orders, its default order grid, and its tight
//! RDP→(ε, δ) conversion), tested against dp_accounting's own numbers. Pure arithmetic: no sampling lives here.

use crate::{special, PrivacyError};

/// dp_accounting's `DEFAULT_RDP_ORDERS` (also Opacus' grid up to 63 plus the long tail): 1.1..10.9 by 0.1,
/// 11..63, and 128, 256, 512, 1024.
pub fn default_orders() -> Vec<f64> {
    let mut v: Vec<f64> = (1..100).map(|x| 1.0 + f64::from(x) / 10.0).collect();
    v.extend((11..64).map(f64::from));
    v.extend([128.0, 256.0, 512.0, 1024.0]);
    v
}

/// Steps after which the fractional-order series gives up (dp_accounting's `_MAX_STEPS_LOG_A_FRAC`).
const MAX_STEPS_LOG_A_FRAC: usize = 1000;

fn log_a_int(q: f64, sigma: f64, alpha: u64) -> f64 {
    let mut log_a = f64::NEG_INFINITY;
    let log1mq = (-q).ln_1p();
    let a = alpha as f64;
    for i in 0..=alpha {
        let i = i as f64;
        let log_coef = special::log_comb(a, i) + i * q.ln() + (a - i) * log1mq;
        let s = log_coef + (i * i - i) / (2.0 * sigma * sigma);
        log_a = special::log_add(log_a, s);
    }
    log_a
}

fn log_a_frac(q: f64, sigma: f64, alpha: f64) -> f64 {
    let (mut log_a0, mut log_a1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let z0 = sigma * sigma * (1.0 / q - 1.0).ln() + 0.5;
    let log1mq = (-q).ln_1p();
    let (mut last_s0, mut last_s1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    for i in 0..MAX_STEPS_LOG_A_FRAC {
        let i = i as f64;
        let log_coef = special::log_comb(alpha, i);
        let j = alpha - i;
        let log_t0 = log_coef + i * q.ln() + j * log1mq;
        let log_t1 = log_coef + j * q.ln() + i * log1mq;
        let log_e0 = 0.5f64.ln() + special::log_erfc((i - z0) / (std::f64::consts::SQRT_2 * sigma));
        let log_e1 = 0.5f64.ln() + special::log_erfc((z0 - j) / (std::f64::consts::SQRT_2 * sigma));
        let log_s0 = log_t0 + (i * i - i) / (2.0 * sigma * sigma) + log_e0;
        let log_s1 = log_t1 + (j * j - j) / (2.0 * sigma * sigma) + log_e1;
        log_a0 = special::log_add(log_a0, log_s0);
        log_a1 = special::log_add(log_a1, log_s1);
        let total = special::log_add(log_a0, log_a1);
        if log_s0 < last_s0 && log_s1 < last_s1 && log_s0.max(log_s1) < total - 30.0 {
            return total;
        }
        last_s0 = log_s0;
        last_s1 = log_s1;
    }
    // Did not converge: dp_accounting excludes the order the same way.
    f64::INFINITY
}

/// RDP of one step of the Poisson-subsampled Gaussian at each order (`q` sampling rate, `sigma` noise multiplier).
pub fn subsampled_gaussian_rdp(
    q: f64,
    sigma: f64,
    orders: &[f64],
) -> Result<Vec<f64>, PrivacyError> {
    check_q_sigma(q, sigma)?;
    Ok(orders
        .iter()
        .map(|&alpha| {
            if q == 0.0 {
                0.0
            } else if alpha.is_infinite() || sigma == 0.0 {
                f64::INFINITY
            } else if q == 1.0 {
                alpha / (2.0 * sigma * sigma)
            } else if alpha.fract() == 0.0 {
                log_a_int(q, sigma, alpha as u64) / (alpha - 1.0)
            } else {
                log_a_frac(q, sigma, alpha) / (alpha - 1.0)
            }
        })
        .collect())
}

pub(crate) fn check_q_sigma(q: f64, sigma: f64) -> Result<(), PrivacyError> {
    if !(0.0..=1.0).contains(&q) {
        return Err(PrivacyError::InvalidParameter(format!(
            "sampling rate must lie in [0, 1], got {q}"
        )));
    }
    if !(sigma >= 0.0 && sigma.is_finite()) {
        return Err(PrivacyError::InvalidParameter(format!(
            "noise multiplier must be finite and >= 0, got {sigma}"
        )));
    }
    Ok(())
}

/// The smallest ε over orders for the given δ (dp_accounting's `compute_epsilon`), with the optimal order.
pub fn epsilon_from_rdp(
    orders: &[f64],
    rdp: &[f64],
    delta: f64,
) -> Result<(f64, f64), PrivacyError> {
    if !(0.0..=1.0).contains(&delta) {
        return Err(PrivacyError::InvalidParameter(format!(
            "δ must lie in [0, 1], got {delta}"
        )));
    }
    if delta == 0.0 {
        return Ok(if rdp.iter().all(|&r| r == 0.0) {
            (0.0, 0.0)
        } else {
            (f64::INFINITY, 0.0)
        });
    }
    let mut best = (f64::INFINITY, orders.first().copied().unwrap_or(0.0));
    for (&a, &r) in orders.iter().zip(rdp) {
        let eps = if r < 0.0 || delta * delta + (-r).exp_m1() > 0.0 {
            0.0
        } else if a > 1.01 {
            r + (-1.0 / a).ln_1p() - (delta * a).ln() / (a - 1.0)
        } else {
            f64::INFINITY
        };
        if eps < best.0 {
            best = (eps, a);
        }
    }
    Ok((best.0.max(0.0), best.1))
}

/// The smallest δ over orders for the given ε (dp_accounting's `compute_delta`), with the optimal order.
pub fn delta_from_rdp(
    orders: &[f64],
    rdp: &[f64],
    epsilon: f64,
) -> Result<(f64, f64), PrivacyError> {
    if epsilon.is_nan() || epsilon < 0.0 {
        return Err(PrivacyError::InvalidParameter(format!(
            "ε must be >= 0, got {epsilon}"
        )));
    }
    let mut best = (f64::INFINITY, orders.first().copied().unwrap_or(0.0));
    for (&a, &r) in orders.iter().zip(rdp) {
        let mut logdelta = if r <= 0.0 {
            f64::NEG_INFINITY
        } else {
            0.5 * (-(-r).exp()).ln_1p()
        };
        if a > 1.01 {
            let bound = (a - 1.0) * (r - epsilon + (-1.0 / a).ln_1p()) - a.ln();
            logdelta = logdelta.min(bound);
        }
        if logdelta < best.0 {
            best = (logdelta, a);
        }
    }
    Ok((best.0.exp().min(1.0), best.1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_grid_is_dp_accountings() {
        let o = default_orders();
        assert_eq!(o.len(), 99 + 53 + 4);
        assert!((o[0] - 1.1).abs() < 1e-12 && o[98] == 10.9 && o[99] == 11.0 && o[155] == 1024.0);
    }

    #[test]
    fn full_batch_is_the_plain_gaussian() {
        let r = subsampled_gaussian_rdp(1.0, 2.0, &[2.0, 10.5]).unwrap();
        assert_eq!(r, vec![2.0 / 8.0, 10.5 / 8.0]);
        assert_eq!(
            subsampled_gaussian_rdp(0.0, 1.0, &[2.0]).unwrap(),
            vec![0.0]
        );
    }

    #[test]
    fn invalid_parameters_are_errors() {
        assert!(subsampled_gaussian_rdp(1.5, 1.0, &[2.0]).is_err());
        assert!(subsampled_gaussian_rdp(0.1, -1.0, &[2.0]).is_err());
        assert!(epsilon_from_rdp(&[2.0], &[1.0], -0.1).is_err());
        assert!(delta_from_rdp(&[2.0], &[1.0], f64::NAN).is_err());
    }
}
