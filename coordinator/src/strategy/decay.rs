//! A server learning-rate schedule: the inner rule's step scaled by a cosine decay over the rounds
//! (Loshchilov & Hutter 2017), from 1 at the first round to a floor at the horizon, and the floor after it.
//! Every server rule here is linear in its rate (FedAvg and FedAvgM step by η times the mean or the
//! momentum, FedAdam/Yogi/Adagrad by η·m/(√v + τ)), so scaling the step is decaying η exactly; the moments
//! see the undecayed deltas. Under DP the noise on each step shrinks with the rate, which is what lets a
//! long noisy run settle. What must never live here: anything that changes what the rule averages.

use super::{AggregateError, ClientUpdate, Strategy, StrategyState};

/// The inner strategy's step times a cosine factor of the rounds aggregated so far.
pub struct CosineDecay {
    horizon: u64,
    floor: f32,
    rounds: u64,
    inner: Box<dyn Strategy>,
}

impl CosineDecay {
    /// Decays `inner`'s step over `horizon` ≥ 1 rounds to `floor` ∈ [0, 1] of it.
    pub fn new(horizon: u64, floor: f32, inner: Box<dyn Strategy>) -> Result<Self, AggregateError> {
        if horizon == 0 || !(0.0..=1.0).contains(&floor) {
            return Err(AggregateError::InvalidParameter(format!(
                "a server rate decay needs lr_decay_rounds ≥ 1 and lr_decay_floor in [0, 1] (got \
                 {horizon}, {floor})"
            )));
        }
        Ok(Self {
            horizon,
            floor,
            rounds: 0,
            inner,
        })
    }

    /// The factor on the step of the round after `rounds` aggregated ones: 1 at the first round,
    /// `floor` from round `horizon` + 1 on.
    pub fn factor(&self, rounds: u64) -> f32 {
        let t = rounds.min(self.horizon) as f64 / self.horizon as f64;
        let cos = 0.5 * (1.0 + (std::f64::consts::PI * t).cos());
        (f64::from(self.floor) + (1.0 - f64::from(self.floor)) * cos) as f32
    }

    fn scaled(&mut self, step: Vec<f32>) -> Vec<f32> {
        let f = self.factor(self.rounds);
        self.rounds += 1;
        if f == 1.0 {
            step
        } else {
            step.into_iter().map(|x| x * f).collect()
        }
    }
}

impl Strategy for CosineDecay {
    fn name(&self) -> String {
        format!(
            "{}+cosine(rounds={},floor={})",
            self.inner.name(),
            self.horizon,
            self.floor
        )
    }

    fn proximal_mu(&self) -> f32 {
        self.inner.proximal_mu()
    }

    fn aggregate(&mut self, updates: &[ClientUpdate<'_>]) -> Result<Vec<f32>, AggregateError> {
        let step = self.inner.aggregate(updates)?;
        Ok(self.scaled(step))
    }

    fn linear(&self) -> bool {
        self.inner.linear()
    }

    fn aggregate_sum(&mut self, sum: &[f32], weight: f64) -> Result<Vec<f32>, AggregateError> {
        let step = self.inner.aggregate_sum(sum, weight)?;
        Ok(self.scaled(step))
    }

    /// The inner rule's state, with the rounds this schedule has counted (a restart resumes the decay).
    fn state(&self) -> StrategyState {
        StrategyState {
            rounds: self.rounds,
            ..self.inner.state()
        }
    }

    fn restore(&mut self, state: StrategyState) -> Result<(), AggregateError> {
        let rounds = state.rounds;
        self.inner.restore(state)?;
        self.rounds = rounds;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::ups;
    use super::super::{FedAvg, FedOpt, FedOptKind};
    use super::*;

    #[test]
    fn the_factor_falls_from_one_to_the_floor_along_a_cosine() {
        let d = CosineDecay::new(4, 0.1, Box::new(FedAvg::new(1.0, 0.0).unwrap())).unwrap();
        let f: Vec<f32> = (0..7).map(|t| d.factor(t)).collect();
        assert_eq!(f[0], 1.0);
        // 0.1 + 0.9·(1 + cos(π/2))/2 = 0.55 at the half-way round.
        assert!((f[2] - 0.55).abs() < 1e-6, "{f:?}");
        assert!(f.windows(2).all(|w| w[1] <= w[0]), "{f:?}");
        assert!((f[4] - 0.1).abs() < 1e-6 && f[6] == f[4], "{f:?}");
    }

    #[test]
    fn the_step_is_the_inner_rules_step_times_the_factor_every_round() {
        let rounds: Vec<Vec<(u64, Vec<f32>)>> = (0..6)
            .map(|r| vec![(1, vec![0.1 * r as f32 - 0.2, 0.3]), (2, vec![0.5, -0.1])])
            .collect();
        let adam = || FedOpt::new(FedOptKind::Adam, 0.01, 0.9, 0.99, 1e-3).unwrap();
        let mut plain = adam();
        let mut decayed = CosineDecay::new(5, 0.0, Box::new(adam())).unwrap();
        for (t, r) in rounds.iter().enumerate() {
            let want = plain.aggregate(&ups(r)).unwrap();
            let got = decayed.aggregate(&ups(r)).unwrap();
            let f = decayed.factor(t as u64);
            for (g, w) in got.iter().zip(&want) {
                assert_eq!(*g, w * f, "round {t}");
            }
        }
        // The horizon passed with floor 0: the step is zero, the moments still move.
        assert_eq!(decayed.aggregate(&ups(&rounds[0])).unwrap(), vec![0.0, 0.0]);
        plain.aggregate(&ups(&rounds[0])).unwrap();
        assert_eq!(decayed.state().vectors, plain.state().vectors);
        assert_eq!(decayed.state().rounds, 7);
    }

    #[test]
    fn a_restored_schedule_resumes_where_it_stopped() {
        let r = vec![(1, vec![1.0, -1.0])];
        let mut a = CosineDecay::new(10, 0.0, Box::new(FedAvg::new(1.0, 0.0).unwrap())).unwrap();
        for _ in 0..4 {
            a.aggregate(&ups(&r)).unwrap();
        }
        let mut b = CosineDecay::new(10, 0.0, Box::new(FedAvg::new(1.0, 0.0).unwrap())).unwrap();
        b.restore(a.state()).unwrap();
        assert_eq!(
            a.aggregate(&ups(&r)).unwrap(),
            b.aggregate(&ups(&r)).unwrap()
        );
        assert!(a.linear() && a.name().ends_with("+cosine(rounds=10,floor=0)"));
    }

    #[test]
    fn a_horizon_of_zero_or_a_floor_outside_zero_to_one_is_refused() {
        let fedavg = || Box::new(FedAvg::new(1.0, 0.0).unwrap()) as Box<dyn Strategy>;
        assert!(CosineDecay::new(0, 0.0, fedavg()).is_err());
        assert!(CosineDecay::new(5, 1.5, fedavg()).is_err());
        assert!(CosineDecay::new(5, f32::NAN, fedavg()).is_err());
    }
}
