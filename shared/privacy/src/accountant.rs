//! Accounting front door: a run is a list of [`DpEvent`]s (steps of the Poisson-subsampled Gaussian, possibly
//! with different rates and noise), composed by the RDP or the PLD accountant into ε for a δ or δ for an ε (a
//! [`Composition`] grows the same composition one event at a time), and σ calibration for a target (ε, δ).
//! What must never live here: noise or clipping (see [`crate::noise`]).

use std::sync::{Arc, OnceLock};

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
    match &Composition::of(events, AccountantKind::Pld)?.state {
        State::Pld(p) => Ok(p.composed().as_ref().clone()),
        _ => Err(PrivacyError::InvalidParameter(
            "an event without noise has no PLD (its ε is infinite)".into(),
        )),
    }
}

/// A growing list of events composed by one accountant, one event at a time in order: the PLD of the
/// events so far, or their summed RDP over [`rdp::default_orders`]. [`epsilon`] and [`delta`] fold their
/// whole list through it, so a composition extended event by event gives the same ε to the bit. A ledger
/// keeps one, so that charging round n does not compose all n rounds again.
///
/// The PLD accountant groups consecutive steps at one sampling rate and noise multiplier into a run and
/// composes a run of n steps as one n-fold self-composition (one FFT raised to the n-th power, as
/// dp_accounting composes a `SelfComposedDpEvent`), then with the composition of the runs before it. A
/// round of a run costs one self-composition of the run so far, whatever its length; reading back a
/// ledger of n identical rounds costs one, not n convolutions of a growing support; and a ledger charged
/// round by round gives the ε that calibration computed for the same rounds as one event.
#[derive(Clone, Debug)]
pub struct Composition {
    state: State,
}

/// Consecutive steps at one sampling rate and noise multiplier, with one step's PLD (a tenth of a second
/// to build at σ ≈ 0.37, so a run builds it once).
#[derive(Clone, Debug)]
struct Run {
    sampling_rate: f64,
    noise_multiplier: f64,
    steps: u64,
    one: Arc<pld::Pld>,
}

impl Run {
    fn continues(&self, e: &DpEvent) -> bool {
        self.sampling_rate == e.sampling_rate && self.noise_multiplier == e.noise_multiplier
    }
}

/// The PLD accountant's state: the composition of the runs that ended (`None`: none did), and the current
/// run. Their composition is computed when first asked for (ε, δ, or the start of a new run), so that
/// folding a list of identical rounds costs one self-composition however long it is.
#[derive(Clone, Debug)]
struct PldRuns {
    runs: Option<(Option<Arc<pld::Pld>>, Run)>,
    composed: Arc<OnceLock<Arc<pld::Pld>>>,
}

impl PldRuns {
    /// The PLD of every step so far.
    fn composed(&self) -> &Arc<pld::Pld> {
        self.composed.get_or_init(|| {
            Arc::new(match &self.runs {
                None => pld::Pld::identity(pld::DEFAULT_DISCRETIZATION),
                Some((before, run)) => {
                    let this_run = run.one.self_compose(run.steps);
                    match before {
                        Some(b) => b.compose(&this_run),
                        None => this_run,
                    }
                }
            })
        })
    }

    fn then(&self, e: &DpEvent) -> Result<Self, PrivacyError> {
        let runs = match &self.runs {
            Some((before, run)) if run.continues(e) => {
                let steps = run
                    .steps
                    .checked_add(e.steps)
                    .ok_or_else(|| PrivacyError::InvalidParameter("more than 2^64 steps".into()))?;
                (
                    before.clone(),
                    Run {
                        steps,
                        ..run.clone()
                    },
                )
            }
            // A new run: everything so far comes before it.
            other => (
                other.as_ref().map(|_| Arc::clone(self.composed())),
                Run {
                    sampling_rate: e.sampling_rate,
                    noise_multiplier: e.noise_multiplier,
                    steps: e.steps,
                    one: Arc::new(pld::Pld::subsampled_gaussian(
                        e.noise_multiplier,
                        e.sampling_rate,
                        pld::DEFAULT_DISCRETIZATION,
                    )?),
                },
            ),
        };
        Ok(Self {
            runs: Some(runs),
            composed: Arc::default(),
        })
    }
}

/// What a composition holds.
#[derive(Clone, Debug)]
enum State {
    /// Privacy loss distributions, composed run by run.
    Pld(PldRuns),
    /// RDP per order of [`rdp::default_orders`], summed over the events; `last` is the last event and its
    /// own RDP, so that repeats compute it once.
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
            AccountantKind::Pld => State::Pld(PldRuns {
                runs: None,
                composed: Arc::default(),
            }),
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

    /// Whether composing `e` next costs nothing now: it continues the PLD accountant's current run (or
    /// is a no-op), so ε after it needs one self-composition whenever it is asked for. Otherwise ε is as
    /// cheap to ask after every event as at the end (RDP), or the run before `e` must be composed first.
    pub(crate) fn continues_run(&self, e: &DpEvent) -> bool {
        match &self.state {
            State::Pld(p) => {
                e.is_noop()
                    || p.runs
                        .as_ref()
                        .is_some_and(|(_, run)| !e.is_non_private() && run.continues(e))
            }
            _ => false,
        }
    }

    /// The accountant composing.
    pub fn kind(&self) -> AccountantKind {
        match self.state {
            State::Pld(_) => AccountantKind::Pld,
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
            State::Pld(p) => State::Pld(p.then(e)?),
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
            State::Pld(p) => (p.composed().epsilon_for_delta(delta), None),
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
            State::Pld(p) => p.composed().delta_for_epsilon(epsilon).clamp(0.0, 1.0),
            State::Rdp { total, .. } => {
                rdp::delta_from_rdp(&rdp::default_orders(), total, epsilon)?.0
            }
        })
    }
}

/// A PLD composition's state written out, so that a long composition resumes without composing its
/// events again: the PLD of the runs that ended before the current one, and that run. A coordinator
/// stores its global ledger's after every round, and a restart reads the ledger back from it: where the
/// sampling rate moves every round (a population that grows), each round is a run of its own and the
/// rebuild otherwise costs one convolution a round.
///
/// It names the events it covers (the first `events` of the list, and a hash of their rates, multipliers
/// and steps), so that it is only ever resumed on the list it was taken from; resumed, the composition
/// gives the ε of composing the whole list to the bit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// How many events it covers, from the first.
    pub events: usize,
    /// [`events_hash`] of those events.
    pub events_hash: u64,
    /// The PLD of the runs that ended before the current one ([`pld::Pld::to_bytes`]; empty: none did).
    pub before: Vec<u8>,
    /// The run in progress as one event of all its steps (`None`: nothing composed yet).
    pub run: Option<DpEvent>,
}

/// A hash of events' rates, multipliers and steps (FNV-1a over their bits): it tells a checkpoint's list
/// from another, and is not a defence against tampering (whoever can change a stored checkpoint can
/// change the stored events it would be checked against).
pub fn events_hash(events: &[DpEvent]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for e in events {
        let words = [
            e.sampling_rate.to_bits(),
            e.noise_multiplier.to_bits(),
            e.steps,
        ];
        for b in words.iter().flat_map(|w| w.to_le_bytes()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

impl Composition {
    /// This composition's checkpoint, taken after `events` (the list it composed): `None` for RDP, whose
    /// state is a few numbers recomputed in milliseconds, and after an event without noise.
    pub fn checkpoint(&self, events: &[DpEvent]) -> Option<Checkpoint> {
        let State::Pld(p) = &self.state else {
            return None;
        };
        let (before, run) = match &p.runs {
            None => (Vec::new(), None),
            Some((before, run)) => (
                before.as_ref().map_or_else(Vec::new, |b| b.to_bytes()),
                Some(DpEvent {
                    sampling_rate: run.sampling_rate,
                    noise_multiplier: run.noise_multiplier,
                    steps: run.steps,
                }),
            ),
        };
        Some(Checkpoint {
            events: events.len(),
            events_hash: events_hash(events),
            before,
            run,
        })
    }

    /// The PLD composition of all `events`, resumed from `checkpoint` (taken on their first
    /// `checkpoint.events`): only the events after it are composed. [`PrivacyError::Corrupt`] when the
    /// checkpoint does not cover a prefix of `events` or does not read back.
    pub fn resume(checkpoint: &Checkpoint, events: &[DpEvent]) -> Result<Self, PrivacyError> {
        let covered = events.get(..checkpoint.events).ok_or_else(|| {
            PrivacyError::Corrupt(format!(
                "a checkpoint of {} events for a list of {}",
                checkpoint.events,
                events.len()
            ))
        })?;
        if events_hash(covered) != checkpoint.events_hash {
            return Err(PrivacyError::Corrupt(
                "a checkpoint taken on other events".into(),
            ));
        }
        let runs = match &checkpoint.run {
            None if checkpoint.before.is_empty() => None,
            None => {
                return Err(PrivacyError::Corrupt(
                    "a checkpoint with runs before and none in progress".into(),
                ))
            }
            Some(run) => {
                run.validate()?;
                if run.is_noop() || run.is_non_private() {
                    return Err(PrivacyError::Corrupt(format!(
                        "a checkpoint's run of {} steps at q = {}, σ = {} is not a private one",
                        run.steps, run.sampling_rate, run.noise_multiplier
                    )));
                }
                let before = if checkpoint.before.is_empty() {
                    None
                } else {
                    let b = pld::Pld::from_bytes(&checkpoint.before)?;
                    if b.discretization() != pld::DEFAULT_DISCRETIZATION {
                        return Err(PrivacyError::Corrupt(format!(
                            "a checkpoint's PLD discretised at {}",
                            b.discretization()
                        )));
                    }
                    Some(Arc::new(b))
                };
                let one = pld::Pld::subsampled_gaussian(
                    run.noise_multiplier,
                    run.sampling_rate,
                    pld::DEFAULT_DISCRETIZATION,
                )?;
                Some((
                    before,
                    Run {
                        sampling_rate: run.sampling_rate,
                        noise_multiplier: run.noise_multiplier,
                        steps: run.steps,
                        one: Arc::new(one),
                    },
                ))
            }
        };
        let mut c = Self {
            state: State::Pld(PldRuns {
                runs,
                composed: Arc::default(),
            }),
        };
        for e in &events[checkpoint.events..] {
            c = c.then(e)?;
        }
        Ok(c)
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
        match epsilon(&[DpEvent::new(q, sigma, steps)?], delta, kind) {
            Ok(spent) => Ok(spent.epsilon),
            // Too little noise for a PLD to hold: far above any target.
            Err(PrivacyError::PldTooLarge { .. }) => Ok(f64::INFINITY),
            Err(e) => Err(e),
        }
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
    fn a_run_of_rounds_is_one_self_composition() {
        // A ledger charges one step a round; calibration asks about all the rounds as one event. Both
        // compose the run as one self-composition, so they agree to the bit.
        let round = DpEvent::new(0.01, 1.1, 1).unwrap();
        let rounds = vec![round; 40];
        let all_at_once = DpEvent { steps: 40, ..round };
        let grown = epsilon(&rounds, 1e-5, AccountantKind::Pld).unwrap();
        assert_eq!(
            grown,
            epsilon(&[all_at_once], 1e-5, AccountantKind::Pld).unwrap()
        );
        // Composing the 40 steps one convolution at a time gives the same ε to within the
        // discretisation's and truncation's rounding (both err upwards).
        let one = pld::Pld::subsampled_gaussian(1.1, 0.01, pld::DEFAULT_DISCRETIZATION).unwrap();
        let mut chained = one.clone();
        for _ in 1..40 {
            chained = chained.compose(&one);
        }
        let sequential = chained.epsilon_for_delta(1e-5);
        assert!(
            (grown.epsilon - sequential).abs() < 1e-6 * sequential,
            "run {} against step by step {sequential}",
            grown.epsilon
        );
        // A run that is interrupted starts again: a, a, b, a is (a∘a)∘b∘a, not a³∘b.
        let b = DpEvent::new(0.02, 1.1, 1).unwrap();
        let broken = epsilon(&[round, round, b, round], 1e-5, AccountantKind::Pld)
            .unwrap()
            .epsilon;
        let by_hand = {
            let pb = pld::Pld::subsampled_gaussian(1.1, 0.02, pld::DEFAULT_DISCRETIZATION).unwrap();
            one.self_compose(2).compose(&pb).compose(&one)
        };
        assert_eq!(broken, by_hand.epsilon_for_delta(1e-5));
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
