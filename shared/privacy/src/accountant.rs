//! Accounting front door: a run is a list of [`DpEvent`]s (steps of the Poisson-subsampled Gaussian, possibly
//! with different rates and noise), composed by the RDP or the PLD accountant into ε for a δ or δ for an ε (a
//! [`Composition`] grows the same composition one event at a time), and σ calibration for a target (ε, δ).
//! What must never live here: noise or clipping (see [`crate::noise`]).

use std::sync::Arc;

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

/// The composed PLD of all events (identity when there are none).
pub fn compose_pld(events: &[DpEvent]) -> Result<pld::Pld, PrivacyError> {
    match Composition::of(events, AccountantKind::Pld)?.state {
        State::Pld { pld, .. } => Ok(pld),
        _ => Err(PrivacyError::InvalidParameter(
            "an event without noise has no PLD (its ε is infinite)".into(),
        )),
    }
}

/// A growing list of events composed by one accountant, one event at a time in order: the PLD of the
/// events so far, or their summed RDP over [`rdp::default_orders`]. [`epsilon`] and [`delta`] fold their
/// whole list through it, so a composition extended event by event gives the same ε to the bit, at the
/// cost of one composition per new event. A ledger keeps one, so that charging round n does not compose
/// all n rounds again.
#[derive(Clone, Debug)]
pub struct Composition {
    state: State,
}

/// What a composition holds. `last` is the last event composed and its own PLD or RDP: rounds at one rate
/// and multiplier compute it once (a tenth of a second for a PLD at σ ≈ 0.37, as much as the composition).
#[derive(Clone, Debug)]
enum State {
    /// The composed privacy loss distribution.
    Pld {
        pld: pld::Pld,
        last: Option<(DpEvent, Arc<pld::Pld>)>,
    },
    /// RDP per order of [`rdp::default_orders`], summed over the events.
    Rdp {
        total: Vec<f64>,
        last: Option<(DpEvent, Arc<Vec<f64>>)>,
    },
    /// An event without noise was composed by this accountant: ε is infinite from then on.
    NonPrivate(AccountantKind),
}

impl Composition {
    /// No events yet (ε = 0) for the `kind` accountant.
    pub fn new(kind: AccountantKind) -> Self {
        let state = match kind {
            AccountantKind::Pld => State::Pld {
                pld: pld::Pld::identity(pld::DEFAULT_DISCRETIZATION),
                last: None,
            },
            AccountantKind::Rdp => State::Rdp {
                total: vec![0.0; rdp::default_orders().len()],
                last: None,
            },
        };
        Self { state }
    }

    /// All `events` composed in order (each checked).
    pub fn of(events: &[DpEvent], kind: AccountantKind) -> Result<Self, PrivacyError> {
        let mut c = Self::new(kind);
        for e in events {
            c = c.then(e)?;
        }
        Ok(c)
    }

    /// The accountant composing.
    pub fn kind(&self) -> AccountantKind {
        match self.state {
            State::Pld { .. } => AccountantKind::Pld,
            State::Rdp { .. } => AccountantKind::Rdp,
            State::NonPrivate(kind) => kind,
        }
    }

    /// This composition followed by `e` (checked first).
    pub fn then(&self, e: &DpEvent) -> Result<Self, PrivacyError> {
        e.validate()?;
        if e.is_noop() {
            return Ok(self.clone());
        }
        if e.is_non_private() {
            return Ok(Self {
                state: State::NonPrivate(self.kind()),
            });
        }
        let state = match &self.state {
            State::Pld { pld: acc, last } => {
                let one = match last {
                    Some((l, one)) if l == e => Arc::clone(one),
                    _ => Arc::new(
                        pld::Pld::subsampled_gaussian(
                            e.noise_multiplier,
                            e.sampling_rate,
                            pld::DEFAULT_DISCRETIZATION,
                        )?
                        .self_compose(e.steps),
                    ),
                };
                State::Pld {
                    pld: acc.compose(&one),
                    last: Some((*e, one)),
                }
            }
            State::Rdp { total, last } => {
                let one = match last {
                    Some((l, one)) if l == e => Arc::clone(one),
                    _ => {
                        let orders = rdp::default_orders();
                        let r = rdp::subsampled_gaussian_rdp(
                            e.sampling_rate,
                            e.noise_multiplier,
                            &orders,
                        )?;
                        Arc::new(r.into_iter().map(|x| x * e.steps as f64).collect())
                    }
                };
                State::Rdp {
                    total: total.iter().zip(one.iter()).map(|(t, x)| t + x).collect(),
                    last: Some((*e, one)),
                }
            }
            // ε is infinite already: nothing more to compose.
            State::NonPrivate(_) => return Ok(self.clone()),
        };
        Ok(Self { state })
    }

    /// ε for `delta` after the events composed so far (infinite once one of them had no noise).
    pub fn epsilon(&self, delta: f64) -> Result<PrivacySpent, PrivacyError> {
        check_delta(delta)?;
        let (epsilon, rdp_order) = match &self.state {
            State::NonPrivate(_) => (f64::INFINITY, None),
            State::Pld { pld, .. } => (pld.epsilon_for_delta(delta), None),
            State::Rdp { total, .. } => {
                let (eps, order) = rdp::epsilon_from_rdp(&rdp::default_orders(), total, delta)?;
                (eps, Some(order))
            }
        };
        Ok(PrivacySpent {
            epsilon,
            delta,
            accountant: self.kind(),
            rdp_order,
        })
    }

    /// δ for `epsilon` after the events composed so far (1 once one of them had no noise).
    pub fn delta(&self, epsilon: f64) -> Result<f64, PrivacyError> {
        if epsilon.is_nan() || epsilon < 0.0 {
            return Err(PrivacyError::InvalidParameter(format!(
                "ε must be >= 0, got {epsilon}"
            )));
        }
        Ok(match &self.state {
            State::NonPrivate(_) => 1.0,
            State::Pld { pld, .. } => pld.delta_for_epsilon(epsilon).clamp(0.0, 1.0),
            State::Rdp { total, .. } => {
                rdp::delta_from_rdp(&rdp::default_orders(), total, epsilon)?.0
            }
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
    Composition::of(events, kind)?.epsilon(delta)
}

/// δ for `epsilon` after all `events`.
pub fn delta(events: &[DpEvent], epsilon: f64, kind: AccountantKind) -> Result<f64, PrivacyError> {
    if epsilon.is_nan() || epsilon < 0.0 {
        return Err(PrivacyError::InvalidParameter(format!(
            "ε must be >= 0, got {epsilon}"
        )));
    }
    Composition::of(events, kind)?.delta(epsilon)
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
    fn a_composition_grown_event_by_event_equals_the_whole_list() {
        let a = DpEvent::new(0.01, 1.1, 3).unwrap();
        let b = DpEvent::new(0.02, 0.9, 1).unwrap();
        let noop = DpEvent::new(0.0, 1.0, 5).unwrap();
        // Repeats reuse the last step's PLD or RDP; a no-op event changes nothing.
        let events = [a, a, noop, b, b, a];
        for kind in [AccountantKind::Pld, AccountantKind::Rdp] {
            let mut grown = Composition::new(kind);
            for (i, e) in events.iter().enumerate() {
                grown = grown.then(e).unwrap();
                let whole = &events[..=i];
                assert_eq!(
                    grown.epsilon(1e-6).unwrap(),
                    epsilon(whole, 1e-6, kind).unwrap()
                );
                assert_eq!(grown.delta(2.0).unwrap(), delta(whole, 2.0, kind).unwrap());
            }
            assert_eq!(grown.kind(), kind);
            // Once an event without noise is composed, ε stays infinite.
            let open = grown
                .then(&DpEvent::new(0.5, 0.0, 1).unwrap())
                .unwrap()
                .then(&a)
                .unwrap();
            assert_eq!(open.epsilon(1e-6).unwrap().epsilon, f64::INFINITY);
            assert_eq!(open.delta(2.0).unwrap(), 1.0);
            assert!(grown
                .then(&DpEvent {
                    sampling_rate: 2.0,
                    ..a
                })
                .is_err());
        }
    }

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
