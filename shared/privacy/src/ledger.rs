//! Privacy ledgers: a record of every charge against a privacy budget, refusing any charge that would exceed it.
//! A per-client ledger lives on the device (example-level ε of DP-SGD); the global ledger lives at the
//! coordinator (user-level ε of DP-FedAvg rounds). Both serialize to JSON for durable storage by their owner.
//! What must never live here: storage or clocks — the owner persists the ledger it is handed back.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::accountant::{Checkpoint, Composition};
use crate::{AccountantKind, DpEvent, PrivacyError, PrivacySpent};

/// A privacy budget: the largest ε allowed at this δ.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Budget {
    /// The ε ceiling.
    pub epsilon: f64,
    /// The δ at which ε is measured.
    pub delta: f64,
}

/// Whose privacy a ledger tracks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LedgerScope {
    /// Example-level privacy of one device's data (DP-SGD).
    Client(String),
    /// User-level privacy across all rounds at the coordinator (DP-FedAvg).
    Global,
}

impl std::fmt::Display for LedgerScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LedgerScope::Client(id) => write!(f, "client {id}"),
            LedgerScope::Global => write!(f, "the global (user-level) ledger"),
        }
    }
}

/// One accepted charge.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// What was released (a run, a round).
    pub label: String,
    /// The mechanism steps charged.
    pub event: DpEvent,
    /// Total ε after this charge.
    pub epsilon_after: f64,
}

/// A budget and the charges made against it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ledger {
    scope: LedgerScope,
    budget: Budget,
    accountant: AccountantKind,
    entries: Vec<LedgerEntry>,
    /// What the accountant already worked out for this ledger (never stored: rebuilt on demand).
    #[serde(skip)]
    cache: AccountingCache,
}

/// What a ledger's accountant already computed, so that a coordinator's preview of a round (before
/// devices train), its check at aggregation and its charge run the accountant once, and a charge extends
/// the composition of the events before it rather than composing all of them again (at 100 rounds of PLD,
/// composing all over again took 12 s a call, and a restart's rebuild of the ledger about ten minutes;
/// see [`Composition`] for how runs of identical rounds keep both short). The entries only ever grow by
/// [`Ledger::charge`], and a ledger's δ and accountant never change, so a length names the events a value
/// was computed on.
#[derive(Default)]
struct AccountingCache(std::sync::Mutex<Cached>);

#[derive(Clone, Default)]
struct Cached {
    /// The composition of the first `.0` entries.
    composed: Option<(usize, Arc<Composition>)>,
    /// The last preview: ε after `.1` on the first `.0` entries, and the composition it made.
    preview: Option<(usize, DpEvent, PrivacySpent, Arc<Composition>)>,
}

impl AccountingCache {
    fn get(&self) -> Cached {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn update(&self, f: impl FnOnce(&mut Cached)) {
        f(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()));
    }
}

impl Clone for AccountingCache {
    fn clone(&self) -> Self {
        Self(std::sync::Mutex::new(self.get()))
    }
}

impl std::fmt::Debug for AccountingCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AccountingCache")
    }
}

/// A cache is not part of a ledger's value: two ledgers with the same charges are equal.
impl PartialEq for AccountingCache {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Ledger {
    /// An empty ledger with a checked budget.
    pub fn new(
        scope: LedgerScope,
        budget: Budget,
        accountant: AccountantKind,
    ) -> Result<Self, PrivacyError> {
        check_budget(&budget)?;
        Ok(Self {
            scope,
            budget,
            accountant,
            entries: Vec::new(),
            cache: AccountingCache::default(),
        })
    }

    /// Whose ledger this is.
    pub fn scope(&self) -> &LedgerScope {
        &self.scope
    }

    /// The budget.
    pub fn budget(&self) -> Budget {
        self.budget
    }

    /// The accepted charges, oldest first.
    pub fn entries(&self) -> &[LedgerEntry] {
        &self.entries
    }

    fn events(&self) -> Vec<DpEvent> {
        self.entries.iter().map(|e| e.event).collect()
    }

    /// ε spent so far at the budget's δ.
    pub fn spent(&self) -> f64 {
        self.entries.last().map_or(0.0, |e| e.epsilon_after)
    }

    /// ε left before the budget is reached.
    pub fn remaining(&self) -> f64 {
        (self.budget.epsilon - self.spent()).max(0.0)
    }

    /// ε the ledger would show after `event`, without charging it. The answer is remembered until the
    /// ledger changes, so [`Ledger::check`] and [`Ledger::charge`] of the same event do not run the
    /// accountant again; only `event` is composed onto the entries' composition.
    pub fn preview(&self, event: DpEvent) -> Result<PrivacySpent, PrivacyError> {
        let len = self.entries.len();
        let cached = self.cache.get();
        if let Some((at, e, spent, _)) = cached.preview {
            if at == len && e == event {
                return Ok(spent);
            }
        }
        let before = match cached.composed {
            Some((at, c)) if at == len => c,
            _ => self.composition()?,
        };
        let after = Arc::new(before.then(&event)?);
        let spent = after.epsilon(self.budget.delta)?;
        self.cache
            .update(|c| c.preview = Some((len, event, spent, after)));
        Ok(spent)
    }

    /// ε after `event` if it stays within budget, else [`PrivacyError::BudgetExceeded`]; charges nothing
    /// (for callers that must refuse before doing the private work).
    pub fn check(&self, event: DpEvent) -> Result<PrivacySpent, PrivacyError> {
        let after = self.preview(event)?;
        if after.epsilon.is_nan() || after.epsilon > self.budget.epsilon {
            return Err(PrivacyError::BudgetExceeded {
                scope: self.scope.to_string(),
                would_reach: after.epsilon,
                delta: self.budget.delta,
                budget: self.budget.epsilon,
            });
        }
        Ok(after)
    }

    /// Charges `event` if the total stays within budget; otherwise records nothing and returns
    /// [`PrivacyError::BudgetExceeded`].
    pub fn charge(
        &mut self,
        label: impl Into<String>,
        event: DpEvent,
    ) -> Result<PrivacySpent, PrivacyError> {
        self.check(event)?;
        self.record(label, event)
    }

    /// Records `event`, a release that already happened, whatever the budget: a ledger never forgets what
    /// was spent. For an owner that checked the budget before the private work and must account for it
    /// even if the budget was lowered since (the next check then refuses); everything else charges.
    pub fn record(
        &mut self,
        label: impl Into<String>,
        event: DpEvent,
    ) -> Result<PrivacySpent, PrivacyError> {
        let after = self.preview(event)?;
        let len = self.entries.len();
        self.entries.push(LedgerEntry {
            label: label.into(),
            event,
            epsilon_after: after.epsilon,
        });
        // The preview just answered composed this very event onto these entries.
        self.cache.update(|c| {
            if let Some((at, e, _, composed)) = &c.preview {
                if *at == len && *e == event {
                    c.composed = Some((len + 1, Arc::clone(composed)));
                }
            }
        });
        Ok(after)
    }

    /// The ledger as JSON, for its owner to store.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// A ledger read back from JSON, its budget and events re-checked and its ε recomputed (a stored total is
    /// never trusted; see [`Ledger::with_entries`]).
    pub fn from_json(text: &str) -> Result<Self, PrivacyError> {
        let ledger: Ledger =
            serde_json::from_str(text).map_err(|e| PrivacyError::Malformed(e.to_string()))?;
        Self::with_entries(
            ledger.scope,
            ledger.budget,
            ledger.accountant,
            ledger.entries,
        )
    }

    /// A ledger of charges made before (an owner's stored record), its budget and events re-checked and its
    /// ε recomputed, never read back. Every entry is kept, whatever the budget: a budget lowered below
    /// what was spent shows as exhausted. Each entry's ε after it is recomputed where a run of identical
    /// steps ends (and after every entry with RDP); inside a PLD run, which composes as one
    /// self-composition, recomputing every entry would cost one self-composition each, so a stored value
    /// is kept only clamped between the ε computed before the run and the ε at its end (the two bounds
    /// it must lie within; a missing or corrupt value reads as the end's).
    pub fn with_entries(
        scope: LedgerScope,
        budget: Budget,
        accountant: AccountantKind,
        entries: Vec<LedgerEntry>,
    ) -> Result<Self, PrivacyError> {
        Self::resume(scope, budget, accountant, entries, None)
    }

    /// [`Ledger::with_entries`], resuming the composition from `checkpoint` (a [`Ledger::checkpoint`] the
    /// owner stored, taken on a prefix of these entries) so that only the entries after it are composed.
    /// The entries it covers keep their stored ε, clamped to lie between 0 and the ε the checkpoint
    /// recomputes at its end and made non-decreasing (a missing or corrupt value reads as that end's);
    /// the total is recomputed as always. A checkpoint that does not belong to these entries or does not
    /// read back is [`PrivacyError::Corrupt`]: the owner then reads the ledger back without it.
    pub fn resume(
        scope: LedgerScope,
        budget: Budget,
        accountant: AccountantKind,
        mut entries: Vec<LedgerEntry>,
        checkpoint: Option<&Checkpoint>,
    ) -> Result<Self, PrivacyError> {
        check_budget(&budget)?;
        let (mut composed, start) = match checkpoint {
            Some(cp) if accountant == AccountantKind::Pld => {
                // Only the covered entries: the loop below composes the rest, computing ε where runs end.
                let covered = entries.get(..cp.events).unwrap_or(&entries);
                let events: Vec<DpEvent> = covered.iter().map(|e| e.event).collect();
                let resumed = Composition::resume(cp, &events)?;
                let at = resumed.epsilon(budget.delta)?.epsilon;
                let mut floor = 0.0f64;
                for e in &mut entries[..cp.events] {
                    e.epsilon_after = bounded(e.epsilon_after, floor, at);
                    floor = e.epsilon_after;
                }
                // The checkpoint's own end is computed, not clamped.
                if let Some(last) = cp.events.checked_sub(1) {
                    entries[last].epsilon_after = at;
                }
                (resumed, cp.events)
            }
            Some(_) => {
                return Err(PrivacyError::Corrupt(
                    "a PLD checkpoint for a ledger of another accountant".into(),
                ))
            }
            None => (Composition::new(accountant), 0),
        };
        let mut run_start = start;
        let mut before = start
            .checked_sub(1)
            .map_or(0.0, |i| entries[i].epsilon_after);
        for i in start..entries.len() {
            composed = composed.then(&entries[i].event)?;
            if let Some(next) = entries.get(i + 1) {
                if composed.continues_run(&next.event) {
                    continue;
                }
            }
            let after = composed.epsilon(budget.delta)?.epsilon;
            for e in &mut entries[run_start..i] {
                e.epsilon_after = bounded(e.epsilon_after, before, after);
            }
            entries[i].epsilon_after = after;
            (run_start, before) = (i + 1, after);
        }
        let ledger = Self {
            scope,
            budget,
            accountant,
            entries,
            cache: AccountingCache::default(),
        };
        let len = ledger.entries.len();
        ledger
            .cache
            .update(|c| c.composed = Some((len, Arc::new(composed))));
        Ok(ledger)
    }

    /// The checkpoint of this ledger's composition, for its owner to store beside its entries and hand to
    /// [`Ledger::resume`] when it reads them back (`None` for RDP, which recomputes in milliseconds). It
    /// holds the PLD of the runs of identical rounds that ended (a few MB), so an owner stores it after a
    /// charge that started a new run.
    pub fn checkpoint(&self) -> Result<Option<Checkpoint>, PrivacyError> {
        Ok(self.composition()?.checkpoint(&self.events()))
    }

    /// Whether the last entry began a run of identical steps (a sampling rate or multiplier other than
    /// the entry before's): where an owner stores a [`Ledger::checkpoint`], since inside a run the
    /// entries after one compose as one.
    pub fn last_starts_run(&self) -> bool {
        match self.entries.as_slice() {
            [.., before, last] => {
                (before.event.sampling_rate, before.event.noise_multiplier)
                    != (last.event.sampling_rate, last.event.noise_multiplier)
            }
            [_] => true,
            [] => false,
        }
    }

    /// The composition of every entry: the cached one, or composed now and cached.
    fn composition(&self) -> Result<Arc<Composition>, PrivacyError> {
        let len = self.entries.len();
        if let Some((at, c)) = self.cache.get().composed {
            if at == len {
                return Ok(c);
            }
        }
        let c = Arc::new(Composition::of(&self.events(), self.accountant)?);
        self.cache
            .update(|k| k.composed = Some((len, Arc::clone(&c))));
        Ok(c)
    }
}

/// A stored ε kept within the two values recomputed around it (a NaN reads as the upper one).
fn bounded(stored: f64, lower: f64, upper: f64) -> f64 {
    if stored.is_nan() {
        upper
    } else {
        stored.max(lower).min(upper)
    }
}

fn check_budget(b: &Budget) -> Result<(), PrivacyError> {
    if !(b.epsilon > 0.0 && b.epsilon.is_finite() && b.delta > 0.0 && b.delta < 1.0) {
        return Err(PrivacyError::InvalidParameter(format!(
            "budget needs ε > 0 finite and δ in (0, 1), got ε = {}, δ = {}",
            b.epsilon, b.delta
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accountant;

    #[test]
    fn cached_accounting_equals_the_accountant_on_the_whole_list() {
        let budget = Budget {
            epsilon: 100.0,
            delta: 1e-5,
        };
        for kind in [AccountantKind::Pld, AccountantKind::Rdp] {
            let mut l = Ledger::new(LedgerScope::Global, budget, kind).unwrap();
            let mut events = Vec::new();
            // Rounds whose sampling rate changes with the eligible population, one charged twice in a row.
            for (i, q) in [0.01, 0.012, 0.012, 0.009].into_iter().enumerate() {
                let round = DpEvent::new(q, 1.0, 1).unwrap();
                events.push(round);
                let whole = accountant::epsilon(&events, budget.delta, kind).unwrap();
                // Previewed (computed), checked and charged (remembered): the whole list's ε to the bit.
                assert_eq!(l.preview(round).unwrap(), whole, "{kind:?} round {i}");
                assert_eq!(l.check(round).unwrap(), whole);
                assert_eq!(l.charge(format!("round {i}"), round).unwrap(), whole);
                // The ledger grew: the same event now costs more, computed afresh.
                events.push(round);
                let next = accountant::epsilon(&events, budget.delta, kind).unwrap();
                events.pop();
                assert_eq!(l.preview(round).unwrap(), next);
                assert!(next.epsilon > whole.epsilon);
            }
            // Another event is never answered from the cache, and a ledger read back (no cache) agrees.
            let other = DpEvent::new(0.02, 1.0, 1).unwrap();
            events.push(other);
            let whole = accountant::epsilon(&events, budget.delta, kind).unwrap();
            assert_eq!(l.preview(other).unwrap(), whole);
            let back = Ledger::from_json(&l.to_json()).unwrap();
            assert_eq!(back, l);
            assert_eq!(back.preview(other).unwrap(), whole);
        }
    }

    #[test]
    fn refuses_the_charge_that_would_exceed_and_keeps_the_rest() {
        let budget = Budget {
            epsilon: 1.0,
            delta: 1e-5,
        };
        let mut l = Ledger::new(LedgerScope::Global, budget, AccountantKind::Rdp).unwrap();
        let round = DpEvent::new(1.0, 10.0, 1).unwrap();
        let mut accepted = 0;
        loop {
            match l.charge(format!("round {accepted}"), round) {
                Ok(s) => {
                    assert!(s.epsilon <= 1.0);
                    accepted += 1;
                }
                Err(PrivacyError::BudgetExceeded { would_reach, .. }) => {
                    assert!(would_reach > 1.0);
                    break;
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert!(accepted > 1);
        assert_eq!(l.entries().len(), accepted);
        let back = Ledger::from_json(&l.to_json()).unwrap();
        assert_eq!(back, l);
        assert!(l.spent() <= 1.0 && l.remaining() >= 0.0);
    }

    #[test]
    fn tampered_or_malformed_ledgers_are_rejected_or_recomputed() {
        let mut l = Ledger::new(
            LedgerScope::Client("dev-1".into()),
            Budget {
                epsilon: 8.0,
                delta: 1e-5,
            },
            AccountantKind::Rdp,
        )
        .unwrap();
        l.charge("run", DpEvent::new(0.01, 1.0, 100).unwrap())
            .unwrap();
        let honest = l.spent();
        let tampered = l.to_json().replace(&format!("{honest}"), "0.0");
        assert_eq!(Ledger::from_json(&tampered).unwrap().spent(), honest);
        assert!(Ledger::from_json("{not json").is_err());
        assert!(
            Ledger::from_json(&l.to_json().replace("1e-5", "2.0").replace("0.00001", "2.0"))
                .is_err()
        );
        assert!(Ledger::new(
            LedgerScope::Global,
            Budget {
                epsilon: -1.0,
                delta: 1e-5
            },
            AccountantKind::Pld
        )
        .is_err());
    }

    #[test]
    fn a_ledger_resumed_from_its_checkpoint_equals_the_one_composed_again() {
        let budget = Budget {
            epsilon: 100.0,
            delta: 1e-5,
        };
        // A population that grows (q moves every round), then holds (a run), then moves again.
        let qs = [
            0.010, 0.011, 0.012, 0.013, 0.013, 0.013, 0.013, 0.014, 0.015,
        ];
        let mut live = Ledger::new(LedgerScope::Global, budget, AccountantKind::Pld).unwrap();
        let mut checkpoints = Vec::new();
        for (i, q) in qs.into_iter().enumerate() {
            live.charge(format!("round {i}"), DpEvent::new(q, 1.0, 1).unwrap())
                .unwrap();
            checkpoints.push(live.checkpoint().unwrap().unwrap());
        }
        let entries = live.entries().to_vec();
        let again = Ledger::with_entries(
            LedgerScope::Global,
            budget,
            AccountantKind::Pld,
            entries.clone(),
        )
        .unwrap();
        assert_eq!(again.spent(), live.spent());
        // From a checkpoint after every round (the last ones inside the run of 0.013, where the run
        // goes on past the checkpoint): the same ε to the bit, at every entry.
        for cp in &checkpoints {
            let resumed = Ledger::resume(
                LedgerScope::Global,
                budget,
                AccountantKind::Pld,
                entries.clone(),
                Some(cp),
            )
            .unwrap();
            assert_eq!(
                resumed.entries(),
                again.entries(),
                "from {} events",
                cp.events
            );
            // It goes on charging as the live ledger does.
            let next = DpEvent::new(0.016, 1.0, 1).unwrap();
            assert_eq!(resumed.preview(next).unwrap(), live.preview(next).unwrap());
        }
        // Inside a run, a checkpoint holds no PLD at all until the run ends; a round that starts a new
        // run stores the composition of the ones before it.
        assert!(checkpoints[0].before.is_empty());
        assert!(!checkpoints[3].before.is_empty());
        assert_eq!(checkpoints[6].before, checkpoints[3].before);
        assert_eq!(checkpoints[6].run.unwrap().steps, 4);
        // Stored ε inside the covered entries is kept within its bounds, and the checkpoint's end is
        // recomputed.
        let mut tampered = entries.clone();
        tampered[1].epsilon_after = 1e9;
        tampered[2].epsilon_after = f64::NAN;
        tampered[4].epsilon_after = -3.0;
        let cp = &checkpoints[4];
        let r = Ledger::resume(
            LedgerScope::Global,
            budget,
            AccountantKind::Pld,
            tampered,
            Some(cp),
        )
        .unwrap();
        let at = again.entries()[4].epsilon_after;
        assert_eq!(r.entries()[1].epsilon_after, at);
        assert_eq!(r.entries()[2].epsilon_after, at);
        assert_eq!(r.entries()[4].epsilon_after, at);
        assert_eq!(r.spent(), again.spent());
        // A checkpoint of other events, of more events than there are, with bad bytes, or for RDP:
        // refused, and the owner reads the ledger back without it.
        let corrupt = |cp: &Checkpoint, kind| {
            matches!(
                Ledger::resume(LedgerScope::Global, budget, kind, entries.clone(), Some(cp)),
                Err(PrivacyError::Corrupt(_))
            )
        };
        let mut other = checkpoints[5].clone();
        other.events_hash ^= 1;
        assert!(corrupt(&other, AccountantKind::Pld));
        let mut longer = checkpoints[8].clone();
        longer.events = entries.len() + 1;
        assert!(corrupt(&longer, AccountantKind::Pld));
        let mut bad = checkpoints[8].clone();
        bad.before.truncate(100);
        assert!(corrupt(&bad, AccountantKind::Pld));
        let mut no_run = checkpoints[8].clone();
        no_run.run = None;
        assert!(corrupt(&no_run, AccountantKind::Pld));
        assert!(corrupt(&checkpoints[8], AccountantKind::Rdp));
        let rdp = Ledger::with_entries(LedgerScope::Global, budget, AccountantKind::Rdp, entries)
            .unwrap();
        assert!(rdp.checkpoint().unwrap().is_none());
    }

    #[test]
    fn a_ledger_read_back_recomputes_each_run_and_bounds_what_is_inside_it() {
        let budget = Budget {
            epsilon: 100.0,
            delta: 1e-5,
        };
        let (a, b) = (
            DpEvent::new(0.01, 1.1, 1).unwrap(),
            DpEvent::new(0.02, 1.1, 1).unwrap(),
        );
        let mut l = Ledger::new(LedgerScope::Global, budget, AccountantKind::Pld).unwrap();
        for (i, e) in [a, a, a, b, b].into_iter().enumerate() {
            l.charge(format!("round {i}"), e).unwrap();
        }
        assert_eq!(Ledger::from_json(&l.to_json()).unwrap(), l);
        let eps: Vec<f64> = l.entries().iter().map(|e| e.epsilon_after).collect();
        // Inside the second run a value lowered below the first run's end, and a missing one, are
        // bounded by what the runs compute; the ends are recomputed whatever is stored.
        let mut entries = l.entries().to_vec();
        entries[3].epsilon_after = 0.0;
        entries[1].epsilon_after = f64::NAN;
        entries[4].epsilon_after = 0.0;
        let back = Ledger::with_entries(LedgerScope::Global, budget, AccountantKind::Pld, entries)
            .unwrap();
        let got: Vec<f64> = back.entries().iter().map(|e| e.epsilon_after).collect();
        assert_eq!(got, vec![eps[0], eps[2], eps[2], eps[2], eps[4]]);
        assert_eq!(back.spent(), l.spent());
        // A budget lowered below what was spent keeps every charge and shows as exhausted.
        let lowered = Budget {
            epsilon: eps[1],
            ..budget
        };
        let strict = Ledger::with_entries(
            LedgerScope::Global,
            lowered,
            AccountantKind::Pld,
            l.entries().to_vec(),
        )
        .unwrap();
        assert_eq!(strict.entries().len(), 5);
        assert_eq!(strict.spent(), l.spent());
        assert_eq!(strict.remaining(), 0.0);
        assert!(matches!(
            strict.check(DpEvent::new(1e-6, 1.1, 1).unwrap()),
            Err(PrivacyError::BudgetExceeded { .. })
        ));
        // A release that already happened is recorded past the budget; a charge is refused.
        let mut strict = strict;
        assert!(strict.charge("round 5", b).is_err());
        let after = strict.record("round 5", b).unwrap();
        assert_eq!(strict.entries().len(), 6);
        assert_eq!(strict.spent(), after.epsilon);
        assert!(after.epsilon > l.spent());
    }
}
