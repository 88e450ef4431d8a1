//! SecAgg+ for one edge aggregator's cohort: when the root's task for a round carries secure-aggregation
//! settings, the aggregator fixes its cohort (the devices that asked, sorted: their index is their id in
//! the protocol), runs the four phases of SecAgg+ with them — keys, encrypted shares, masked inputs,
//! reveals — exactly as a flat root does ([`crate::secagg::SecAggRound`]), and decodes the unmasked
//! cohort sum it forwards. The state here is plain data the aggregator writes to its spool after every
//! change, so a SIGKILLed aggregator resumes the protocol where it stood; it never holds a device's
//! delta in the clear.
//!
//! Trust model: the aggregator learns only its cohort's sum (unless more than the threshold of a
//! device's neighbours collude with it, as in flat SecAgg+); the root learns only the sums of cohorts —
//! finer than a flat secure round's one total, which is the price of the tier. Central DP noise is added
//! at the root, after it saw the cohort sums.
//!
//! What must never live here: sockets, clocks, files (the aggregator's), or decisions about when a
//! cohort is fixed.

use std::collections::BTreeSet;

use starling_protocol::message::{SecAggStep, SecAggTask};
use starling_protocol::{Fingerprint, RoundId};
use starling_secagg::{ClientId, SecAggError};

use crate::round_core::{decode_secure_sum, PartialSum};
use crate::secagg::{cohort_params, SecAggPhase, SecAggRound, StepOutcome, MIN_COHORT};

/// A fixed secure cohort and its SecAgg+ state.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SecureCohort {
    /// The round.
    pub round: RoundId,
    /// What each device's task carries (the cohort's parameters; `id` is set per device).
    pub task: SecAggTask,
    /// The devices, sorted: a device's index is its id in the protocol.
    pub roster: Vec<Fingerprint>,
    /// Devices that declined the task.
    pub declined: BTreeSet<ClientId>,
    /// When the keys phase closes at the latest (system ms).
    pub keys_deadline: u64,
    /// When every phase must be over (the cut-off before the root's deadline).
    pub cutoff: u64,
    /// The longest each phase after the keys stays open, ms.
    pub phase_ms: u64,
    /// The protocol's state.
    pub state: SecAggRound,
}

/// What a tick of the cohort did.
#[derive(Debug)]
pub enum Tick {
    /// The current phase is still open.
    Wait,
    /// A phase closed; the state changed (persist it).
    Phase(SecAggPhase),
    /// The sum is unmasked and decoded (no training losses: one more per-device signal).
    Unmasked(PartialSum),
    /// The round cannot finish here (too few devices in a phase), with why.
    Failed(String),
}

/// What became of a masked input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Masked {
    /// Added to the sum (persist before the ack).
    New,
    /// This device's input is already in the sum.
    Duplicate,
}

/// Why a masked input or step was not taken.
#[derive(Debug, thiserror::Error)]
pub enum CohortError {
    /// The device is not in the cohort.
    #[error("not in this round's secure cohort")]
    NotInCohort,
    /// The masked-input phase is not open.
    #[error("masked inputs are not taken now (the round is in its {0} phase)")]
    Closed(SecAggPhase),
    /// The protocol refused the message.
    #[error(transparent)]
    SecAgg(#[from] SecAggError),
}

impl SecureCohort {
    /// Fixes the cohort of `round` as `devices` at `now` under the root's `template`; `salt` binds the
    /// neighbour graph to this aggregator. The phases after the keys get `phase_ms` each before `cutoff`
    /// — or a quarter of the time left each when that is shorter, so the keys phase (training included)
    /// keeps at least a quarter.
    pub fn fix(
        round: RoundId,
        template: &SecAggTask,
        mut devices: Vec<Fingerprint>,
        salt: &[u8],
        now: u64,
        cutoff: u64,
        phase_ms: u64,
    ) -> Result<Self, SecAggError> {
        devices.sort();
        devices.dedup();
        let params = cohort_params(template, devices.len(), salt)?;
        let state = SecAggRound::new(params.clone())?;
        let phase = phase_ms.min(cutoff.saturating_sub(now) / 4);
        Ok(Self {
            round,
            task: SecAggTask {
                params,
                id: 0,
                ..template.clone()
            },
            roster: devices,
            declined: BTreeSet::new(),
            keys_deadline: cutoff.saturating_sub(phase.saturating_mul(3)),
            cutoff,
            phase_ms: phase,
            state,
        })
    }

    /// A device's id in the protocol.
    pub fn id(&self, client: &Fingerprint) -> Option<ClientId> {
        self.roster
            .binary_search(client)
            .ok()
            .map(|i| i as ClientId)
    }

    /// The device's part in the round, while devices may still start it (the keys phase).
    pub fn task_for(&self, client: &Fingerprint) -> Option<SecAggTask> {
        let id = self.id(client)?;
        (self.state.phase == SecAggPhase::Advertise && !self.declined.contains(&id)).then(|| {
            SecAggTask {
                id,
                ..self.task.clone()
            }
        })
    }

    /// A device's protocol step (persist when the outcome says `changed`).
    pub fn step(
        &mut self,
        client: &Fingerprint,
        step: SecAggStep,
        retry_after_ms: u64,
    ) -> Result<StepOutcome, CohortError> {
        let id = self.id(client).ok_or(CohortError::NotInCohort)?;
        Ok(self.state.step(id, step, retry_after_ms)?)
    }

    /// A device's masked input (words packed at the modulus width) at `now`.
    pub fn masked(
        &mut self,
        client: &Fingerprint,
        packed: &[u8],
        now: u64,
    ) -> Result<Masked, CohortError> {
        let id = self.id(client).ok_or(CohortError::NotInCohort)?;
        if self.state.server.has_reported(id) {
            return Ok(Masked::Duplicate);
        }
        if self.state.phase != SecAggPhase::Masked || now >= self.deadline() {
            return Err(CohortError::Closed(self.state.phase));
        }
        self.state.masked(id, packed)?;
        Ok(Masked::New)
    }

    /// A device declined the task: the keys phase stops waiting for it. Returns whether it counted.
    pub fn decline(&mut self, client: &Fingerprint) -> bool {
        match self.id(client) {
            Some(id) if self.state.phase == SecAggPhase::Advertise => self.declined.insert(id),
            _ => false,
        }
    }

    /// When the current phase closes at the latest.
    pub fn deadline(&self) -> u64 {
        match self.state.phase {
            SecAggPhase::Advertise => self.keys_deadline,
            _ => self.state.phase_deadline.min(self.cutoff),
        }
    }

    /// Closes the current phase at `now` if every device still expected answered or its deadline
    /// passed; a phase needs at least `min` devices (and the protocol's threshold).
    pub fn tick(&mut self, now: u64, min: usize) -> Tick {
        let expected = (0..self.roster.len() as ClientId).filter(|i| !self.declined.contains(i));
        if !(self.state.all_in(expected) || now >= self.deadline()) {
            return Tick::Wait;
        }
        match self
            .state
            .close_phase(now, self.phase_ms, min.max(MIN_COHORT))
        {
            Ok(false) => Tick::Phase(self.state.phase),
            Ok(true) => match self.unmasked() {
                Ok(input) => Tick::Unmasked(input),
                Err(e) => Tick::Failed(format!("the cohort's sum does not unmask: {e}")),
            },
            Err(why) => Tick::Failed(why),
        }
    }

    /// The decoded sum of the devices whose masked inputs are in it.
    fn unmasked(&self) -> Result<PartialSum, SecAggError> {
        let (words, count) = self.state.unmask()?;
        let (sum, weight) = decode_secure_sum(
            &self.task.encoding()?,
            self.task.weight_cap,
            &words,
            count,
            self.state.params().bits,
        )?;
        Ok(PartialSum {
            sum,
            count,
            weight,
            loss: 0.0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use starling_protocol::message::SecAggReply;
    use starling_secagg::mask::Encoding;
    use starling_secagg::Client;

    fn template(len: usize) -> SecAggTask {
        let cfg = crate::secagg::SecAggConfig {
            enabled: true,
            clip: 0.5,
            value_bits: 8,
            ..crate::secagg::SecAggConfig::default()
        };
        cfg.task(cfg.params(7, RoundId(4), 10, len, 0).unwrap(), 0, len)
    }

    /// Four devices run the protocol through the cohort; one leaves after sharing its keys. The
    /// decoded sum is the three others' encoded deltas, exactly.
    #[test]
    fn a_cohort_unmasks_the_sum_of_its_devices_with_one_dropped_after_sharing() {
        let len = 5;
        let devices: Vec<Fingerprint> = (0..4u8).map(|i| Fingerprint([i * 9 + 1; 32])).collect();
        let mut c = SecureCohort::fix(
            RoundId(4),
            &template(len),
            devices.iter().rev().copied().collect(),
            b"edge-a",
            0,
            1_000_000,
            1_000,
        )
        .unwrap();
        assert_eq!(c.roster, devices, "sorted");
        assert_eq!(c.state.params().clients, 4);
        assert!(c.task_for(&Fingerprint([99; 32])).is_none());
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(3);
        let mut clients: Vec<(Fingerprint, Client)> = Vec::new();
        for d in &devices {
            let t = c.task_for(d).unwrap();
            let (cl, keys) = Client::new(t.params.clone(), t.id, &mut rng).unwrap();
            let o = c.step(d, SecAggStep::Keys(keys), 100).unwrap();
            assert!(o.changed);
            clients.push((*d, cl));
        }
        assert!(matches!(c.tick(10, 3), Tick::Phase(SecAggPhase::Share)));
        assert!(
            c.task_for(&devices[0]).is_none(),
            "no new devices after the keys"
        );
        for (d, cl) in &mut clients {
            let SecAggReply::Roster(roster) = c.step(d, SecAggStep::Next, 100).unwrap().reply
            else {
                panic!()
            };
            let shares = cl
                .share_keys(&roster.into_iter().collect(), &mut rng)
                .unwrap();
            c.step(d, SecAggStep::Shares(shares), 100).unwrap();
        }
        assert!(matches!(c.tick(20, 3), Tick::Phase(SecAggPhase::Masked)));
        let gone = clients.pop().unwrap().0;
        let encoding = Encoding::new(0.5, 8, 4).unwrap();
        let bits = c.state.params().bits;
        let mut expected = vec![0f32; len];
        for (k, (d, cl)) in clients.iter_mut().enumerate() {
            let SecAggReply::Mailbox(mail) = c.step(d, SecAggStep::Next, 100).unwrap().reply else {
                panic!()
            };
            cl.receive_shares(&mail).unwrap();
            let values: Vec<f32> = (0..len)
                .map(|j| (k as f32 - 1.0) * 0.1 + j as f32 * 0.01)
                .collect();
            let words = encoding.encode(&values, &mut rng);
            for (e, w) in expected.iter_mut().zip(&words) {
                *e += *w as i32 as f32 / encoding.scale as f32;
            }
            let packed = starling_secagg::mask::pack(&cl.masked_input(&words).unwrap(), bits);
            assert_eq!(c.masked(d, &packed, 30).unwrap(), Masked::New);
            assert_eq!(c.masked(d, &packed, 30).unwrap(), Masked::Duplicate);
        }
        assert!(matches!(
            c.masked(&gone, &[0; 4], 30),
            Err(CohortError::Closed(_) | CohortError::SecAgg(_))
        ));
        // The masked phase closes at its deadline (the dropped device never sends).
        assert!(matches!(c.tick(31, 3), Tick::Wait));
        assert!(matches!(
            c.tick(20 + 1_000, 3),
            Tick::Phase(SecAggPhase::Unmask)
        ));
        for (d, cl) in &mut clients {
            let SecAggReply::Unmask { dropped, reported } =
                c.step(d, SecAggStep::Next, 100).unwrap().reply
            else {
                panic!()
            };
            assert_eq!(dropped, vec![3]);
            let reveals = cl.unmask(&dropped, &reported).unwrap();
            c.step(d, SecAggStep::Reveals(reveals), 100).unwrap();
        }
        let Tick::Unmasked(PartialSum {
            sum, count, weight, ..
        }) = c.tick(1_100, 3)
        else {
            panic!()
        };
        assert_eq!((count, weight), (3, 3.0));
        for (a, b) in sum.iter().zip(&expected) {
            assert!((a - b).abs() < 1e-6, "{sum:?} vs {expected:?}");
        }
    }

    #[test]
    fn a_phase_short_of_devices_fails_the_cohort() {
        let devices: Vec<Fingerprint> = (0..3u8).map(|i| Fingerprint([i + 1; 32])).collect();
        let mut c = SecureCohort::fix(
            RoundId(4),
            &template(3),
            devices.clone(),
            b"edge-b",
            0,
            10_000,
            1_000,
        )
        .unwrap();
        assert_eq!(c.keys_deadline, 7_000);
        assert!(c.decline(&Fingerprint([1; 32])));
        assert!(matches!(c.tick(6_999, 1), Tick::Wait));
        let Tick::Failed(why) = c.tick(7_000, 1) else {
            panic!()
        };
        assert!(why.contains("advertised"), "{why}");
        // Phases longer than the time left: each gets a quarter of it, the keys phase keeps a quarter.
        let c = SecureCohort::fix(
            RoundId(4),
            &template(3),
            devices,
            b"edge-b",
            2_000,
            10_000,
            60_000,
        )
        .unwrap();
        assert_eq!((c.phase_ms, c.keys_deadline), (2_000, 4_000));
    }
}
