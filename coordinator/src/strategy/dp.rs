//! User-level DP-FedAvg (McMahan et al. 2018): clip every client's delta to C, sum, add Gaussian noise of
//! standard deviation z·C (central) — or rely on the clients' noise shares z·C/√n (distributed) — and divide
//! by the *expected* number of clients per round, a constant, so one client's influence on the step is at
//! most C / expected. The noisy mean then goes through the configured linear server rule (FedAvg's η,
//! FedAvgM's momentum, FedAdam/Yogi/Adagrad: DP-FedAvgM and DP-FedAdam) — post-processing, so the
//! guarantee is the noisy mean's. The noise comes from `starling-privacy` (exact, opendp-certified); the
//! engine charges the global ledger with the effective multiplier this type reports. It never does
//! accounting itself.

use starling_privacy::{clip_l2, GaussianMechanism, NoisePlacement, PrivacyError};

use super::{check, weighted_sum, AggregateError, ClientUpdate, Strategy, StrategyState};

/// The noise multiplier a DP-FedAvg round is charged at — the one rule the coordinator's ledger, this
/// strategy and the simulator's calibration share: for central noise (`central`), what opendp certifies
/// for the Gaussian mechanism that draws it over `len` values (a little below `z`: the noise grid); for
/// noise the devices add, `z` itself (their shares add up to it when the guaranteed devices report).
pub fn charged_multiplier(
    central: bool,
    clip: f64,
    z: f64,
    len: usize,
) -> Result<f64, PrivacyError> {
    if central && z > 0.0 {
        Ok(GaussianMechanism::with_multiplier(clip, z, len)?.effective_noise_multiplier())
    } else {
        Ok(z)
    }
}

/// The unweighted sum of the deltas, each first clipped to L2 norm `clip`: DP-FedAvg's sum at the root,
/// and an edge aggregator's share of it.
pub fn clipped_sum(updates: &[ClientUpdate<'_>], clip: f64) -> Result<Vec<f32>, AggregateError> {
    let mut clipped: Vec<Vec<f32>> = updates.iter().map(|u| u.delta.to_vec()).collect();
    for c in &mut clipped {
        clip_l2(c, clip)?;
    }
    let views: Vec<ClientUpdate<'_>> = clipped
        .iter()
        .map(|c| ClientUpdate {
            num_examples: 1,
            delta: c,
        })
        .collect();
    weighted_sum(&views, &vec![1.0; views.len()])
}

/// DP-FedAvg with a fixed denominator, its noisy mean stepped by a linear server rule.
pub struct DpFedAvg {
    clip: f64,
    noise_multiplier: f64,
    expected_clients: f64,
    placement: NoisePlacement,
    /// The server rule the noisy mean goes through (linear: it sees the mean as one update).
    server: Box<dyn Strategy>,
    /// Insecure, reproducible noise for simulations only (`None` in deployment: keys from the OS).
    simulation_key: Option<[u8; 32]>,
    rounds: u64,
    last_effective_multiplier: f64,
}

impl std::fmt::Debug for DpFedAvg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DpFedAvg")
            .field("clip", &self.clip)
            .field("noise_multiplier", &self.noise_multiplier)
            .field("expected_clients", &self.expected_clients)
            .field("placement", &self.placement)
            .field("server", &self.server.name())
            .finish()
    }
}

impl DpFedAvg {
    /// Clip bound C, noise multiplier z, expected clients per round, where the noise is added, and the
    /// server rule that steps by the noisy mean (it must be linear: a rule that needs every update would
    /// see one, the mean, and the sensitivity bound is the mean's).
    pub fn new(
        clip: f64,
        noise_multiplier: f64,
        expected_clients: f64,
        placement: NoisePlacement,
        server: Box<dyn Strategy>,
    ) -> Result<Self, AggregateError> {
        let ok = clip.is_finite()
            && clip > 0.0
            && noise_multiplier.is_finite()
            && noise_multiplier >= 0.0
            && expected_clients.is_finite()
            && expected_clients >= 1.0;
        if !ok {
            return Err(AggregateError::InvalidParameter(format!(
                "DP-FedAvg needs C > 0, z ≥ 0, expected clients ≥ 1 (got {clip}, {noise_multiplier}, \
                 {expected_clients})"
            )));
        }
        if !server.linear() {
            return Err(AggregateError::InvalidParameter(format!(
                "DP-FedAvg steps with a linear server rule (FedAvg, FedProx, FedAvgM, FedAdam, FedYogi, \
                 FedAdagrad); {} needs every update",
                server.name()
            )));
        }
        Ok(Self {
            clip,
            noise_multiplier,
            expected_clients,
            placement,
            server,
            simulation_key: None,
            rounds: 0,
            last_effective_multiplier: noise_multiplier,
        })
    }

    /// Draws the central noise from a fixed key (reproducible, **not private**): simulations and tests only.
    pub fn with_simulation_key(mut self, key: [u8; 32]) -> Self {
        self.simulation_key = Some(key);
        self
    }

    /// The noise multiplier to account for the last round: what opendp certifies for the central noise
    /// (slightly below the configured z because of the noise grid), or z for distributed noise.
    pub fn effective_noise_multiplier(&self) -> f64 {
        self.last_effective_multiplier
    }

    /// The clip bound C.
    pub fn clip(&self) -> f64 {
        self.clip
    }
}

impl Strategy for DpFedAvg {
    fn name(&self) -> String {
        let place = match self.placement {
            NoisePlacement::Central => "central".to_string(),
            NoisePlacement::Distributed { clients } => format!("distributed/{clients}"),
        };
        let dp = format!(
            "dp-fedavg(C={},z={},{place})",
            self.clip, self.noise_multiplier
        );
        // Plain FedAvg keeps the name manifests have always recorded.
        match self.server.name() {
            s if s == "fedavg" => dp,
            s => format!("{dp}+{s}"),
        }
    }

    fn proximal_mu(&self) -> f32 {
        self.server.proximal_mu()
    }

    /// The server rule's state, with the rounds noised so far (a restarted simulation draws the next
    /// round's noise from the stream it would have used, not the first round's again).
    fn state(&self) -> StrategyState {
        StrategyState {
            rounds: self.rounds,
            ..self.server.state()
        }
    }

    fn restore(&mut self, state: StrategyState) -> Result<(), AggregateError> {
        let rounds = state.rounds;
        self.server.restore(state)?;
        self.rounds = rounds;
        Ok(())
    }

    fn aggregate(&mut self, updates: &[ClientUpdate<'_>]) -> Result<Vec<f32>, AggregateError> {
        let n = check(updates)?;
        let sum = clipped_sum(updates, self.clip)?;
        self.noise_and_scale(sum, n)
    }

    fn linear(&self) -> bool {
        true
    }

    /// With secure aggregation the devices clipped their deltas (the task's user-level clip); the sum
    /// gets the same noise and the same fixed denominator.
    fn aggregate_sum(&mut self, sum: &[f32], weight: f64) -> Result<Vec<f32>, AggregateError> {
        if !(weight.is_finite() && weight > 0.0) {
            return Err(AggregateError::ZeroWeight);
        }
        self.noise_and_scale(sum.to_vec(), sum.len())
    }
}

impl DpFedAvg {
    /// Adds the central noise (if any) to the clipped sum and divides by the expected cohort.
    fn noise_and_scale(&mut self, mut sum: Vec<f32>, n: usize) -> Result<Vec<f32>, AggregateError> {
        if self.placement == NoisePlacement::Central && self.noise_multiplier > 0.0 {
            let mech = GaussianMechanism::with_multiplier(self.clip, self.noise_multiplier, n)?;
            match self.simulation_key {
                Some(key) => {
                    // A different stream every round.
                    let mut k = key;
                    for (b, r) in k[24..].iter_mut().zip(self.rounds.to_le_bytes()) {
                        *b ^= r;
                    }
                    mech.add_noise_with_key(&mut sum, k)?
                }
                None => mech.add_noise(&mut sum)?,
            }
            self.last_effective_multiplier = mech.effective_noise_multiplier();
        } else {
            self.last_effective_multiplier = self.noise_multiplier;
        }
        self.rounds += 1;
        let scale = 1.0 / self.expected_clients as f32;
        sum.iter_mut().for_each(|x| *x *= scale);
        self.server.aggregate_sum(&sum, 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::ups;
    use super::*;

    #[test]
    fn without_noise_it_is_a_clipped_sum_over_the_expected_count() {
        let v = vec![(5, vec![3.0, 4.0]), (1, vec![0.0, 0.5])];
        let mut s = DpFedAvg::new(1.0, 0.0, 4.0, NoisePlacement::Central, fedavg()).unwrap();
        // (0.6, 0.8) + (0, 0.5) = (0.6, 1.3), / 4
        let got = s.aggregate(&ups(&v)).unwrap();
        assert!((got[0] - 0.15).abs() < 1e-6 && (got[1] - 0.325).abs() < 1e-6);
    }

    #[test]
    fn central_noise_has_the_configured_spread_and_one_client_moves_the_step_at_most_c_over_m() {
        let dim = 200_000;
        let zeros = vec![(1, vec![0f32; dim])];
        let mut s = DpFedAvg::new(0.5, 2.0, 10.0, NoisePlacement::Central, fedavg())
            .unwrap()
            .with_simulation_key([7; 32]);
        let step = s.aggregate(&ups(&zeros)).unwrap();
        let mean = step.iter().map(|&x| f64::from(x)).sum::<f64>() / dim as f64;
        let sd = (step
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / dim as f64)
            .sqrt();
        let want = 2.0 * 0.5 / 10.0; // z·C / m
        assert!(mean.abs() < 5.0 * want / (dim as f64).sqrt(), "mean {mean}");
        assert!((sd / want - 1.0).abs() < 0.01, "sd {sd} vs {want}");
        // opendp charges the rounding of the inputs to the noise grid as extra sensitivity (≈ √d·2^k/2):
        // a little below z for a 200k-dimensional delta, never above.
        let eff = s.effective_noise_multiplier();
        assert!(eff <= 2.0 && eff > 1.99, "{eff}");
        // Sensitivity without noise: adding one huge client changes the step by at most C/m in L2.
        let mut quiet = DpFedAvg::new(0.5, 0.0, 10.0, NoisePlacement::Central, fedavg()).unwrap();
        let base = vec![(1, vec![0.1f32; 8]), (1, vec![-0.2f32; 8])];
        let mut more = base.clone();
        more.push((1, vec![1e9f32; 8]));
        let a = quiet.aggregate(&ups(&base)).unwrap();
        let b = quiet.aggregate(&ups(&more)).unwrap();
        let diff = a
            .iter()
            .zip(&b)
            .map(|(x, y)| f64::from(x - y).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!(diff <= 0.5 / 10.0 + 1e-6, "{diff}");
        assert!(DpFedAvg::new(0.0, 1.0, 10.0, NoisePlacement::Central, fedavg()).is_err());
        let median = Box::new(super::super::Median);
        let err = DpFedAvg::new(0.5, 1.0, 10.0, NoisePlacement::Central, median).unwrap_err();
        assert!(err.to_string().contains("needs every update"), "{err}");
    }

    /// A restored DP-FedAvg continues the simulation noise stream: the round after a restart gets the
    /// noise the uninterrupted run drew for it, over a stateless server rule too.
    #[test]
    fn a_restart_resumes_the_noise_stream() {
        let v = vec![(1, vec![0.5f32; 64]), (1, vec![-0.25f32; 64])];
        let make = || {
            DpFedAvg::new(1.0, 1.0, 2.0, NoisePlacement::Central, fedavg())
                .unwrap()
                .with_simulation_key([3; 32])
        };
        let mut run = make();
        let first = run.aggregate(&ups(&v)).unwrap();
        let state = run.state();
        assert_eq!(state.rounds, 1);
        let second = run.aggregate(&ups(&v)).unwrap();
        assert_ne!(first, second, "every round draws fresh noise");
        let mut restarted = make();
        restarted.restore(state).unwrap();
        assert_eq!(restarted.aggregate(&ups(&v)).unwrap(), second);
    }

    fn fedavg() -> Box<dyn Strategy> {
        Box::new(super::super::FedAvg::new(1.0, 0.0).unwrap())
    }

    /// DP-FedAvgM: the server's momentum runs on the noisy mean (post-processing) and is the state a
    /// restarted coordinator restores; plain FedAvg keeps the name manifests record.
    #[test]
    fn the_server_rule_steps_by_the_noisy_mean_and_keeps_its_state() {
        let v = vec![(1, vec![3.0, 4.0]), (1, vec![0.0, 0.5])];
        let momentum = || Box::new(super::super::FedAvgM::new(2.0, 0.5).unwrap());
        let mut s = DpFedAvg::new(1.0, 0.0, 4.0, NoisePlacement::Central, momentum()).unwrap();
        assert!(
            s.name().ends_with("+fedavgm(lr=2,beta=0.5)"),
            "{}",
            s.name()
        );
        assert_eq!(
            DpFedAvg::new(1.0, 0.0, 4.0, NoisePlacement::Central, fedavg())
                .unwrap()
                .name(),
            "dp-fedavg(C=1,z=0,central)"
        );
        // Mean (0.15, 0.325); m = mean, step 2·m; then m = 0.5·m + mean.
        let first = s.aggregate(&ups(&v)).unwrap();
        assert!((first[0] - 0.3).abs() < 1e-6 && (first[1] - 0.65).abs() < 1e-6);
        let state = s.state();
        let second = s.aggregate(&ups(&v)).unwrap();
        assert!((second[0] - 0.45).abs() < 1e-6 && (second[1] - 0.975).abs() < 1e-6);
        let mut restarted =
            DpFedAvg::new(1.0, 0.0, 4.0, NoisePlacement::Central, momentum()).unwrap();
        restarted.restore(state).unwrap();
        assert_eq!(restarted.aggregate(&ups(&v)).unwrap(), second);
        // Through secure aggregation's sum the same step.
        let mut summed = DpFedAvg::new(1.0, 0.0, 4.0, NoisePlacement::Central, momentum()).unwrap();
        let clipped = clipped_sum(&ups(&v), 1.0).unwrap();
        assert_eq!(summed.aggregate_sum(&clipped, 2.0).unwrap(), first);
    }
}
