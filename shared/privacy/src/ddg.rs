//! Rényi-DP accounting of the distributed discrete Gaussian mechanism (Kairouz, Liu, Steinke 2021, "The
//! Distributed Discrete Gaussian Mechanism for Federated Learning with Secure Aggregation"): each of `n`
//! clients clips its vector to L2 norm `c` on the integer grid, rounds it stochastically and adds its own
//! discrete Gaussian share `N_Z(0, s²)`; secure aggregation reveals only the sum, whose noise is a sum of
//! discrete Gaussians (not itself one — `τ` below prices the difference).
//!
//! - one step at order α (their Proposition 14): with `l2 = Δ₂/(√n·s)`, `l1 = Δ₁/(√n·s)`,
//!   `τ = 10·Σ_{k=1}^{n−1} exp(−2π²s²·k/(k+1))`, `ε(α) = min(α/2·l2² + τd, α/2·(l2² + 2·l1·τ + τ²d),
//!   α/2·(l2 + √d·τ)²)`;
//! - sensitivities after unbiased stochastic rounding: `Δ₂ = c + √d`, `Δ₁ = Δ₂·min(√d, Δ₂)` (their
//!   Theorem 1 at β = 0);
//! - Poisson subsampling at rate q: Zhu & Wang 2019, Theorem 5 (the upper bound, integer orders);
//! - (ε, δ) by the same RDP conversion as [`crate::rdp`].
//!
//! Checked against a transcription of Google's reference (`distributed_dp/accounting_utils.py`,
//! `ddgauss_epsilon`) by `tests/ddg_reference.rs`. Pure arithmetic: the sampler lives in [`crate::sampler`].

use crate::{rdp, special, DpEvent, PrivacyError};

/// The integer RDP orders the reference uses: 2..=128 and 256.
pub fn orders() -> Vec<u64> {
    let mut v: Vec<u64> = (2..=128).collect();
    v.push(256);
    v
}

/// `steps` rounds of the distributed discrete Gaussian, each sampled at rate `q`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DdgEvent {
    /// Clients whose noise shares add up (the guaranteed number in a round's sum).
    pub clients: u64,
    /// Standard deviation of one client's discrete Gaussian share, in grid units.
    pub local_sigma: f64,
    /// L2 sensitivity of one client's rounded vector, in grid units.
    pub l2_sensitivity: f64,
    /// L1 sensitivity of one client's rounded vector, in grid units.
    pub l1_sensitivity: f64,
    /// Values in the vector.
    pub dim: u64,
    /// Poisson sampling rate of the clients, in (0, 1].
    pub q: f64,
    /// Rounds.
    pub steps: u64,
}

impl DdgEvent {
    /// An event for clients that clip to L2 norm `clip` (grid units) before stochastic rounding.
    pub fn new(
        clients: u64,
        local_sigma: f64,
        clip: f64,
        dim: u64,
        q: f64,
        steps: u64,
    ) -> Result<Self, PrivacyError> {
        let ok = clients >= 1
            && local_sigma.is_finite()
            && local_sigma > 0.0
            && clip.is_finite()
            && clip > 0.0
            && dim >= 1
            && q > 0.0
            && q <= 1.0;
        if !ok {
            return Err(PrivacyError::InvalidParameter(format!(
                "the distributed discrete Gaussian needs ≥ 1 client, σ > 0, clip > 0, d ≥ 1 and q in (0, 1] \
                 (got {clients}, {local_sigma}, {clip}, {dim}, {q})"
            )));
        }
        let d = dim as f64;
        let l2 = clip + d.sqrt();
        Ok(Self {
            clients,
            local_sigma,
            l2_sensitivity: l2,
            l1_sensitivity: l2 * d.sqrt().min(l2),
            dim,
            q,
            steps,
        })
    }

    /// `τ`: how far a sum of `n` discrete Gaussians is from one.
    pub fn tau(&self) -> f64 {
        let s2 = self.local_sigma * self.local_sigma;
        let c = 2.0 * std::f64::consts::PI * std::f64::consts::PI * s2;
        let mut sum = 0.0;
        for k in 1..self.clients {
            let k = k as f64;
            sum += (-c * k / (k + 1.0)).exp();
        }
        10.0 * sum
    }

    /// RDP of one unsampled round at `order` (Proposition 14).
    fn rdp_one(&self, order: f64, tau: f64) -> f64 {
        let root = (self.clients as f64).sqrt() * self.local_sigma;
        let (l2, l1) = (self.l2_sensitivity / root, self.l1_sensitivity / root);
        let d = self.dim as f64;
        let t1 = order / 2.0 * l2 * l2 + tau * d;
        let t2 = order / 2.0 * (l2 * l2 + 2.0 * l1 * tau + tau * tau * d);
        let t3 = order / 2.0 * (l2 + d.sqrt() * tau).powi(2);
        t1.min(t2).min(t3)
    }

    /// RDP of all `steps` rounds at each of `orders` (integer orders ≥ 2).
    pub fn rdp(&self, orders: &[u64]) -> Vec<f64> {
        let tau = self.tau();
        let eps = |a: u64| self.rdp_one(a as f64, tau);
        orders
            .iter()
            .map(|&a| {
                let one = if self.q >= 1.0 {
                    eps(a)
                } else {
                    subsampled(a, self.q, &eps).min(eps(a))
                };
                one * self.steps as f64
            })
            .collect()
    }
}

/// Zhu & Wang 2019, Theorem 5: RDP at integer order `alpha ≥ 2` of a mechanism with RDP `eps` under
/// Poisson subsampling at rate `q` in (0, 1).
fn subsampled(alpha: u64, q: f64, eps: &dyn Fn(u64) -> f64) -> f64 {
    let a = alpha as f64;
    let (lq, l1q) = (q.ln(), (-q).ln_1p());
    // log of ((1−q)^{α−1}·(αq − q + 1))
    let mut total = (a - 1.0) * l1q + (a * q - q + 1.0).ln();
    // C(α, 2)·q²·(1−q)^{α−2}·exp(ε(2))
    total = special::log_add(
        total,
        special::log_comb(a, 2.0) + 2.0 * lq + (a - 2.0) * l1q + eps(2),
    );
    for l in 3..=alpha {
        let lf = l as f64;
        let term =
            3f64.ln() + (lf - 1.0) * eps(l) + special::log_comb(a, lf) + (a - lf) * l1q + lf * lq;
        total = special::log_add(total, term);
    }
    total / (a - 1.0)
}

/// ε at `delta` of a composition of distributed discrete Gaussian events, with the optimal order.
pub fn epsilon(events: &[DdgEvent], delta: f64) -> Result<(f64, f64), PrivacyError> {
    epsilon_with(&[], events, delta)
}

/// ε at `delta` of rounds of the subsampled Gaussian (`gaussian`, e.g. central DP-FedAvg) composed with
/// distributed discrete Gaussian rounds, by RDP over the integer orders both are computed at.
pub fn epsilon_with(
    gaussian: &[DpEvent],
    events: &[DdgEvent],
    delta: f64,
) -> Result<(f64, f64), PrivacyError> {
    let ord = orders();
    let as_f64: Vec<f64> = ord.iter().map(|&a| a as f64).collect();
    let mut total = vec![0.0; ord.len()];
    for g in gaussian
        .iter()
        .filter(|g| g.steps > 0 && g.sampling_rate > 0.0)
    {
        let r = rdp::subsampled_gaussian_rdp(g.sampling_rate, g.noise_multiplier, &as_f64)?;
        for (t, x) in total.iter_mut().zip(r) {
            *t += x * g.steps as f64;
        }
    }
    for e in events {
        for (t, r) in total.iter_mut().zip(e.rdp(&ord)) {
            *t += r;
        }
    }
    rdp::epsilon_from_rdp(&as_f64, &total, delta)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn more_noise_or_fewer_rounds_spend_less_and_tau_vanishes_for_wide_shares() {
        let e = |s: f64, steps| DdgEvent::new(100, s, 20_480.0, 41_000, 0.3, steps).unwrap();
        let eps = |ev| epsilon(&[ev], 1e-5).unwrap().0;
        assert!(eps(e(3000.0, 10)) < eps(e(2000.0, 10)));
        assert!(eps(e(2000.0, 5)) < eps(e(2000.0, 10)));
        // Composition adds RDP: two events of 5 rounds are one of 10.
        let (a, b) = (
            epsilon(&[e(2000.0, 5), e(2000.0, 5)], 1e-5).unwrap().0,
            eps(e(2000.0, 10)),
        );
        assert!((a - b).abs() < 1e-9 * b, "{a} vs {b}");
        assert_eq!(e(2000.0, 1).tau(), 0.0);
        assert!(DdgEvent::new(10, 0.5, 10.0, 8, 1.0, 1).unwrap().tau() > 0.01);
        // Composed with Gaussian rounds: more than either alone; with none, the same as alone.
        let g = DpEvent::new(0.3, 1.0, 10).unwrap();
        let alone = eps(e(2000.0, 10));
        assert_eq!(epsilon_with(&[], &[e(2000.0, 10)], 1e-5).unwrap().0, alone);
        assert!(epsilon_with(&[g], &[e(2000.0, 10)], 1e-5).unwrap().0 > alone);
        assert!(DdgEvent::new(0, 1.0, 1.0, 1, 1.0, 1).is_err());
        assert!(DdgEvent::new(1, 1.0, 1.0, 1, 0.0, 1).is_err());
        assert!(DdgEvent::new(1, f64::NAN, 1.0, 1, 1.0, 1).is_err());
    }
}
