//! Accounting front door: a run is a list of [`DpEvent`]s (steps of the Poisson-subsampled Gaussian, possibly
//! with different rates and noise), composed by the RDP or the PLD accountant into ε for a δ or δ for an ε, and
//! σ calibration for a target (ε, δ). What must never live here: noise or clipping (see [`crate::noise`]).

use serde::{Deserialize, Serialize};

use crate::{pld, rdp, PrivacyError};

/// `steps` releases of the Gaussian mechanism with noise multiplier σ (noise std / L2 sensitivity), each on a
/// Poisson sample of rate q.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct DpEvent {
    /// Poisson sampling rate q ∈ [0, 1] (1 = every record takes part, e.g. user-level rounds with all clients).
    pub sampling_rate: f64,
    /// Noise multiplier σ ≥ 0 (0 = no noise: ε is infinite).
    pub noise_multiplier: f64,
    /// Number of identical steps.
    pub steps: u64,
}

impl DpEvent {
    /// An event after checking its parameters.
    pub fn new(
        sampling_rate: f64,
        noise_multiplier: f64,
        steps: u64,
    ) -> Result<Self, PrivacyError> {
        rdp::check_q_sigma(sampling_rate, noise_multiplier)?;
        Ok(Self {
            sampling_rate,
            noise_multiplier,
            steps,
        })
    }

    fn validate(&self) -> Result<(), PrivacyError> {
        rdp::check_q_sigma(self.sampling_rate, self.noise_multiplier)
    }

    fn is_noop(&self) -> bool {
        self.steps == 0 || self.sampling_rate == 0.0
    }

    fn is_non_private(&self) -> bool {
        !self.is_noop() && self.noise_multiplier == 0.0
    }
}

/// Which accountant composes the events.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum AccountantKind {
    /// Rényi DP over dp_accounting's order grid: fast, slightly loose.
    Rdp,
    /// Privacy loss distributions (connect-the-dots, 1e-4 discretisation): tight, slower.
    #[default]
    Pld,
}

/// ε spent at a δ, with how it was computed.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PrivacySpent {
    /// The ε.
    pub epsilon: f64,
    /// The δ it holds for.
    pub delta: f64,
    /// The accountant that computed it.
    pub accountant: AccountantKind,
    /// For RDP, the order that gave the smallest ε.
    pub rdp_order: Option<f64>,
}

fn check_delta(delta: f64) -> Result<(), PrivacyError> {
    if !(delta > 0.0 && delta < 1.0) {
        return Err(PrivacyError::InvalidParameter(format!(
            "δ must lie in (0, 1), got {delta}"
        )));
    }
    Ok(())
}

fn total_rdp(events: &[DpEvent], orders: &[f64]) -> Result<Vec<f64>, PrivacyError> {
    let mut total = vec![0.0; orders.len()];
    for e in events.iter().filter(|e| !e.is_noop()) {
        let r = rdp::subsampled_gaussian_rdp(e.sampling_rate, e.noise_multiplier, orders)?;
        for (t, x) in total.iter_mut().zip(r) {
            *t += x * e.steps as f64;
        }
    }
    Ok(total)
}

/// The composed PLD of all events (identity when there are none).
pub fn compose_pld(events: &[DpEvent]) -> Result<pld::Pld, PrivacyError> {
    let mut acc = PldComposition::new();
    for e in events {
        acc = acc.then(e)?;
    }
    if acc.non_private {
        return Err(PrivacyError::InvalidParameter(
            "an event without noise has no PLD (its ε is infinite)".into(),
        ));
    }
    Ok(acc.pld)
}

/// The PLD of a growing list of events, composed one event at a time in order: the same operations as
/// [`compose_pld`] on the whole list (so the same ε to the bit), at the cost of one composition per new
/// event. A ledger keeps one, so that charging round n does not compose all n rounds again.
#[derive(Clone, Debug)]
pub struct PldComposition {
    pld: pld::Pld,
    /// An event without noise was composed: ε is infinite (its PLD is not built).
    non_private: bool,
    /// The last event composed and its PLD: rounds at one rate and multiplier build it once (a tenth of a
    /// second at σ ≈ 0.37, as much as the composition).
    last: Option<(DpEvent, std::sync::Arc<pld::Pld>)>,
}

impl Default for PldComposition {
    fn default() -> Self {
        Self::new()
    }
}

impl PldComposition {
    /// No events yet (ε = 0).
    pub fn new() -> Self {
        Self {
            pld: pld::Pld::identity(pld::DEFAULT_DISCRETIZATION),
            non_private: false,
            last: None,
        }
    }

    /// This composition followed by `e` (checked first).
    pub fn then(&self, e: &DpEvent) -> Result<Self, PrivacyError> {
        e.validate()?;
        if e.is_noop() || self.non_private {
            return Ok(self.clone());
        }
        if e.is_non_private() {
            return Ok(Self {
                pld: self.pld.clone(),
                non_private: true,
                last: None,
            });
        }
        let step = match &self.last {
            Some((last, step)) if last == e => std::sync::Arc::clone(step),
            _ => std::sync::Arc::new(
                pld::Pld::subsampled_gaussian(
                    e.noise_multiplier,
                    e.sampling_rate,
                    pld::DEFAULT_DISCRETIZATION,
                )?
                .self_compose(e.steps),
            ),
        };
        Ok(Self {
            pld: self.pld.compose(&step),
            non_private: false,
            last: Some((*e, step)),
        })
    }

    /// ε for `delta` after the events composed so far (infinite once one of them had no noise).
    pub fn epsilon(&self, delta: f64) -> Result<PrivacySpent, PrivacyError> {
        check_delta(delta)?;
        Ok(PrivacySpent {
            epsilon: if self.non_private {
                f64::INFINITY
            } else {
                self.pld.epsilon_for_delta(delta)
            },
            delta,
            accountant: AccountantKind::Pld,
            rdp_order: None,
        })
    }
}

/// ε for `delta` after all `events`.
pub fn epsilon(
    events: &[DpEvent],
    delta: f64,
    kind: AccountantKind,
) -> Result<PrivacySpent, PrivacyError> {
    check_delta(delta)?;
    for e in events {
        e.validate()?;
    }
    if events.iter().any(DpEvent::is_non_private) {
        return Ok(PrivacySpent {
            epsilon: f64::INFINITY,
            delta,
            accountant: kind,
            rdp_order: None,
        });
    }
    match kind {
        AccountantKind::Rdp => {
            let orders = rdp::default_orders();
            let (eps, order) = rdp::epsilon_from_rdp(&orders, &total_rdp(events, &orders)?, delta)?;
            Ok(PrivacySpent {
                epsilon: eps,
                delta,
                accountant: kind,
                rdp_order: Some(order),
            })
        }
        AccountantKind::Pld => {
            let eps = compose_pld(events)?.epsilon_for_delta(delta);
            Ok(PrivacySpent {
                epsilon: eps,
                delta,
                accountant: kind,
                rdp_order: None,
            })
        }
    }
}

/// δ for `epsilon` after all `events`.
pub fn delta(events: &[DpEvent], epsilon: f64, kind: AccountantKind) -> Result<f64, PrivacyError> {
    if epsilon.is_nan() || epsilon < 0.0 {
        return Err(PrivacyError::InvalidParameter(format!(
            "ε must be >= 0, got {epsilon}"
        )));
    }
    for e in events {
        e.validate()?;
    }
    if events.iter().any(DpEvent::is_non_private) {
        return Ok(1.0);
    }
    match kind {
        AccountantKind::Rdp => {
            let orders = rdp::default_orders();
            Ok(rdp::delta_from_rdp(&orders, &total_rdp(events, &orders)?, epsilon)?.0)
        }
        AccountantKind::Pld => Ok(compose_pld(events)?
            .delta_for_epsilon(epsilon)
            .clamp(0.0, 1.0)),
    }
}

/// The smallest noise multiplier σ (to a relative 1e-4, always on the safe side) for which `steps` steps at
/// sampling rate `q` stay within (`target_epsilon`, `delta`).
pub fn calibrate_noise_multiplier(
    target_epsilon: f64,
    delta: f64,
    q: f64,
    steps: u64,
    kind: AccountantKind,
) -> Result<f64, PrivacyError> {
    if !(target_epsilon > 0.0 && target_epsilon.is_finite()) {
        return Err(PrivacyError::InvalidParameter(format!(
            "target ε must be positive, got {target_epsilon}"
        )));
    }
    if !(q > 0.0 && q <= 1.0) || steps == 0 {
        return Err(PrivacyError::InvalidParameter(
            "calibration needs q in (0, 1] and at least one step".into(),
        ));
    }
    let eps_at = |sigma: f64| -> Result<f64, PrivacyError> {
        Ok(epsilon(&[DpEvent::new(q, sigma, steps)?], delta, kind)?.epsilon)
    };
    let mut hi = 1.0;
    while eps_at(hi)? > target_epsilon {
        hi *= 2.0;
        if hi > 1e6 {
            return Err(PrivacyError::InvalidParameter(format!(
                "no noise multiplier below 1e6 reaches ε = {target_epsilon} at δ = {delta}"
            )));
        }
    }
    let mut lo = hi / 2.0;
    while lo > 1e-3 && eps_at(lo)? <= target_epsilon {
        hi = lo;
        lo /= 2.0;
    }
    while (hi - lo) > 1e-4 * hi {
        let mid = 0.5 * (lo + hi);
        if eps_at(mid)? <= target_epsilon {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Ok(hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_events_spend_nothing_and_noiseless_ones_everything() {
        for kind in [AccountantKind::Rdp, AccountantKind::Pld] {
            assert_eq!(epsilon(&[], 1e-5, kind).unwrap().epsilon, 0.0);
            let e = DpEvent::new(0.1, 0.0, 3).unwrap();
            assert!(epsilon(&[e], 1e-5, kind).unwrap().epsilon.is_infinite());
            assert_eq!(delta(&[e], 1.0, kind).unwrap(), 1.0);
        }
    }

    #[test]
    fn pld_is_tighter_than_rdp() {
        let e = [DpEvent::new(0.01, 1.1, 1000).unwrap()];
        let r = epsilon(&e, 1e-5, AccountantKind::Rdp).unwrap().epsilon;
        let p = epsilon(&e, 1e-5, AccountantKind::Pld).unwrap().epsilon;
        assert!(p < r && p > 0.5 * r, "pld {p} rdp {r}");
    }

    #[test]
    fn calibration_reaches_the_target_from_the_safe_side() {
        let sigma = calibrate_noise_multiplier(2.0, 1e-5, 0.01, 500, AccountantKind::Rdp).unwrap();
        let eps = epsilon(
            &[DpEvent::new(0.01, sigma, 500).unwrap()],
            1e-5,
            AccountantKind::Rdp,
        )
        .unwrap()
        .epsilon;
        assert!(eps <= 2.0 && eps > 1.99, "{sigma} {eps}");
    }

    #[test]
    fn bad_inputs_are_errors() {
        assert!(epsilon(&[], 0.0, AccountantKind::Rdp).is_err());
        assert!(DpEvent::new(2.0, 1.0, 1).is_err());
        assert!(calibrate_noise_multiplier(-1.0, 1e-5, 0.1, 10, AccountantKind::Rdp).is_err());
    }
}
