//! Adaptive server optimizers of Reddi et al. 2021 ("Adaptive Federated Optimization", Algorithm 2):
//! with Δ the example-weighted mean delta,
//! `m ← β₁m + (1−β₁)Δ`;
//! Adagrad `v ← v + Δ²`, Adam `v ← β₂v + (1−β₂)Δ²`, Yogi `v ← v − (1−β₂)Δ²·sign(v − Δ²)`;
//! step `η·m / (√v + τ)`; `v` starts at τ² as in the paper, `m` at 0, no bias correction.

use super::{check, weighted_mean, AggregateError, ClientUpdate, Strategy, StrategyState};

/// Which second-moment rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FedOptKind {
    /// FedAdagrad.
    Adagrad,
    /// FedAdam.
    Adam,
    /// FedYogi.
    Yogi,
}

/// FedAdagrad / FedAdam / FedYogi.
#[derive(Debug, Clone)]
pub struct FedOpt {
    kind: FedOptKind,
    lr: f32,
    beta1: f32,
    beta2: f32,
    tau: f32,
    m: Vec<f32>,
    v: Vec<f32>,
    rounds: u64,
}

impl FedOpt {
    /// Server learning rate η, β₁, β₂ ∈ [0, 1), adaptivity τ > 0.
    pub fn new(
        kind: FedOptKind,
        lr: f32,
        beta1: f32,
        beta2: f32,
        tau: f32,
    ) -> Result<Self, AggregateError> {
        let ok = lr.is_finite()
            && lr > 0.0
            && (0.0..1.0).contains(&beta1)
            && (0.0..1.0).contains(&beta2)
            && tau.is_finite()
            && tau > 0.0;
        if !ok {
            return Err(AggregateError::InvalidParameter(format!(
                "FedOpt needs η > 0, β₁, β₂ ∈ [0, 1), τ > 0 (got {lr}, {beta1}, {beta2}, {tau})"
            )));
        }
        Ok(Self {
            kind,
            lr,
            beta1,
            beta2,
            tau,
            m: Vec::new(),
            v: Vec::new(),
            rounds: 0,
        })
    }
}

impl Strategy for FedOpt {
    fn name(&self) -> String {
        let k = match self.kind {
            FedOptKind::Adagrad => "fedadagrad",
            FedOptKind::Adam => "fedadam",
            FedOptKind::Yogi => "fedyogi",
        };
        format!(
            "{k}(lr={},b1={},b2={},tau={})",
            self.lr, self.beta1, self.beta2, self.tau
        )
    }

    fn linear(&self) -> bool {
        true
    }

    fn aggregate(&mut self, updates: &[ClientUpdate<'_>]) -> Result<Vec<f32>, AggregateError> {
        let n = check(updates)?;
        let d = weighted_mean(updates)?;
        if self.m.len() != n {
            self.m = vec![0.0; n];
            self.v = vec![self.tau * self.tau; n];
        }
        let (b1, b2) = (self.beta1, self.beta2);
        let mut step = Vec::with_capacity(n);
        for ((m, v), &g) in self.m.iter_mut().zip(self.v.iter_mut()).zip(&d) {
            *m = b1 * *m + (1.0 - b1) * g;
            let g2 = g * g;
            *v = match self.kind {
                FedOptKind::Adagrad => *v + g2,
                FedOptKind::Adam => b2 * *v + (1.0 - b2) * g2,
                FedOptKind::Yogi => *v - (1.0 - b2) * g2 * (*v - g2).signum(),
            };
            step.push(self.lr * *m / (v.sqrt() + self.tau));
        }
        self.rounds += 1;
        Ok(step)
    }

    fn state(&self) -> StrategyState {
        StrategyState {
            rounds: self.rounds,
            vectors: vec![("m".into(), self.m.clone()), ("v".into(), self.v.clone())],
        }
    }

    fn restore(&mut self, state: StrategyState) -> Result<(), AggregateError> {
        if state.rounds == 0 && state.vectors.iter().all(|(_, x)| x.is_empty()) {
            return Ok(());
        }
        let get = |k: &str| {
            state
                .vectors
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, x)| x.clone())
        };
        match (get("m"), get("v")) {
            (Some(m), Some(v)) if m.len() == v.len() => {
                self.m = m;
                self.v = v;
                self.rounds = state.rounds;
                Ok(())
            }
            _ => Err(AggregateError::BadState(
                "FedOpt state needs m and v of equal length".into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::ups;
    use super::*;

    #[test]
    fn one_round_by_hand() {
        // Δ = 0.5, τ = 0.1, β₁ = 0.9, β₂ = 0.99, η = 1: m = 0.05; v₀ = 0.01.
        let v = vec![(1, vec![0.5])];
        let cases = [
            (FedOptKind::Adagrad, 0.01 + 0.25),
            (FedOptKind::Adam, 0.99 * 0.01 + 0.01 * 0.25),
            // sign(v − Δ²) = sign(0.01 − 0.25) = −1 → v + 0.01·0.25
            (FedOptKind::Yogi, 0.01 + 0.01 * 0.25),
        ];
        for (kind, v1) in cases {
            let mut s = FedOpt::new(kind, 1.0, 0.9, 0.99, 0.1).unwrap();
            let got = s.aggregate(&ups(&v)).unwrap()[0];
            let want = 0.05 / ((v1 as f32).sqrt() + 0.1);
            assert!((got - want).abs() < 1e-6, "{kind:?}: {got} vs {want}");
        }
    }

    #[test]
    fn state_round_trips_and_bad_settings_are_refused() {
        let v = vec![(2, vec![0.3, -0.2]), (1, vec![0.1, 0.4])];
        let mut a = FedOpt::new(FedOptKind::Yogi, 0.01, 0.9, 0.99, 1e-3).unwrap();
        a.aggregate(&ups(&v)).unwrap();
        let mut b = FedOpt::new(FedOptKind::Yogi, 0.01, 0.9, 0.99, 1e-3).unwrap();
        b.restore(a.state()).unwrap();
        assert_eq!(
            a.aggregate(&ups(&v)).unwrap(),
            b.aggregate(&ups(&v)).unwrap()
        );
        assert!(FedOpt::new(FedOptKind::Adam, 0.01, 1.0, 0.99, 1e-3).is_err());
        assert!(FedOpt::new(FedOptKind::Adam, 0.01, 0.9, 0.99, 0.0).is_err());
        let mut c = FedOpt::new(FedOptKind::Adam, 0.01, 0.9, 0.99, 1e-3).unwrap();
        assert!(c
            .restore(StrategyState {
                rounds: 3,
                vectors: vec![("m".into(), vec![1.0])]
            })
            .is_err());
    }
}
