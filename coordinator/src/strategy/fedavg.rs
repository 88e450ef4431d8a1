//! FedAvg (and FedProx, which aggregates the same way) and FedAvgM (server momentum).

use super::{check, weighted_mean, AggregateError, ClientUpdate, Strategy, StrategyState};

fn positive(name: &str, x: f32) -> Result<f32, AggregateError> {
    if x.is_finite() && x > 0.0 {
        Ok(x)
    } else {
        Err(AggregateError::InvalidParameter(format!(
            "{name} must be positive, got {x}"
        )))
    }
}

/// Example-weighted mean of the deltas, scaled by the server learning rate. With μ > 0 it is FedProx: the
/// server side is identical, the clients add the proximal term.
#[derive(Debug, Clone)]
pub struct FedAvg {
    server_lr: f32,
    mu: f32,
}

impl FedAvg {
    /// FedAvg with server learning rate `server_lr` (1.0 is McMahan et al.'s) and proximal μ for clients.
    pub fn new(server_lr: f32, mu: f32) -> Result<Self, AggregateError> {
        if !(mu.is_finite() && mu >= 0.0) {
            return Err(AggregateError::InvalidParameter(format!(
                "FedProx μ must be ≥ 0, got {mu}"
            )));
        }
        Ok(Self {
            server_lr: positive("server learning rate", server_lr)?,
            mu,
        })
    }
}

impl Strategy for FedAvg {
    fn name(&self) -> String {
        // The server rate is named unless it is McMahan et al.'s 1 (the name manifests have always
        // carried for plain FedAvg), so a manifest says which step made it.
        let lr = if self.server_lr == 1.0 {
            String::new()
        } else {
            format!("lr={}", self.server_lr)
        };
        match (self.mu > 0.0, lr.is_empty()) {
            (true, true) => format!("fedprox(mu={})", self.mu),
            (true, false) => format!("fedprox(mu={},{lr})", self.mu),
            (false, true) => "fedavg".into(),
            (false, false) => format!("fedavg({lr})"),
        }
    }

    fn proximal_mu(&self) -> f32 {
        self.mu
    }

    fn linear(&self) -> bool {
        true
    }

    fn aggregate(&mut self, updates: &[ClientUpdate<'_>]) -> Result<Vec<f32>, AggregateError> {
        let mut avg = weighted_mean(updates)?;
        if self.server_lr != 1.0 {
            avg.iter_mut().for_each(|x| *x *= self.server_lr);
        }
        Ok(avg)
    }
}

/// FedAvg with server momentum: `m ← β·m + Δ̄`, step `η·m`.
#[derive(Debug, Clone)]
pub struct FedAvgM {
    server_lr: f32,
    beta: f32,
    m: Vec<f32>,
    rounds: u64,
}

impl FedAvgM {
    /// Server learning rate η and momentum β ∈ [0, 1).
    pub fn new(server_lr: f32, beta: f32) -> Result<Self, AggregateError> {
        if !(0.0..1.0).contains(&beta) {
            return Err(AggregateError::InvalidParameter(format!(
                "momentum must lie in [0, 1), got {beta}"
            )));
        }
        Ok(Self {
            server_lr: positive("server learning rate", server_lr)?,
            beta,
            m: Vec::new(),
            rounds: 0,
        })
    }
}

impl Strategy for FedAvgM {
    fn name(&self) -> String {
        format!("fedavgm(lr={},beta={})", self.server_lr, self.beta)
    }

    fn linear(&self) -> bool {
        true
    }

    fn aggregate(&mut self, updates: &[ClientUpdate<'_>]) -> Result<Vec<f32>, AggregateError> {
        let n = check(updates)?;
        let avg = weighted_mean(updates)?;
        if self.m.len() != n {
            self.m = vec![0.0; n];
        }
        for (m, d) in self.m.iter_mut().zip(&avg) {
            *m = self.beta * *m + d;
        }
        self.rounds += 1;
        Ok(self.m.iter().map(|m| self.server_lr * m).collect())
    }

    fn state(&self) -> StrategyState {
        StrategyState {
            rounds: self.rounds,
            vectors: vec![("m".into(), self.m.clone())],
        }
    }

    fn restore(&mut self, state: StrategyState) -> Result<(), AggregateError> {
        match state.vectors.into_iter().find(|(k, _)| k == "m") {
            Some((_, m)) => {
                self.m = m;
                self.rounds = state.rounds;
                Ok(())
            }
            None if state.rounds == 0 => Ok(()),
            None => Err(AggregateError::BadState(
                "FedAvgM state lacks its momentum".into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::ups;
    use super::*;

    #[test]
    fn fedavg_weights_by_examples_and_scales_by_server_lr() {
        let v = vec![(10, vec![1.0, 0.0]), (30, vec![0.0, 1.0])];
        assert_eq!(
            FedAvg::new(1.0, 0.0).unwrap().aggregate(&ups(&v)).unwrap(),
            vec![0.25, 0.75]
        );
        assert_eq!(
            FedAvg::new(2.0, 0.0).unwrap().aggregate(&ups(&v)).unwrap(),
            vec![0.5, 1.5]
        );
        assert!(FedAvg::new(0.0, 0.0).is_err());
        assert!(FedAvg::new(1.0, -1.0).is_err());
    }

    #[test]
    fn names_say_the_server_rate_unless_it_is_one() {
        let name = |lr, mu| FedAvg::new(lr, mu).unwrap().name();
        assert_eq!(name(1.0, 0.0), "fedavg");
        assert_eq!(name(2.0, 0.0), "fedavg(lr=2)");
        assert_eq!(name(1.0, 0.01), "fedprox(mu=0.01)");
        assert_eq!(name(0.5, 0.01), "fedprox(mu=0.01,lr=0.5)");
        assert_eq!(
            FedAvgM::new(1.0, 0.9).unwrap().name(),
            "fedavgm(lr=1,beta=0.9)"
        );
    }

    #[test]
    fn fedavgm_accumulates_momentum_and_restores_it() {
        let v = vec![(1, vec![1.0])];
        let mut s = FedAvgM::new(1.0, 0.5).unwrap();
        assert_eq!(s.aggregate(&ups(&v)).unwrap(), vec![1.0]); // m = 1
        assert_eq!(s.aggregate(&ups(&v)).unwrap(), vec![1.5]); // m = 0.5 + 1
        let saved = s.state();
        let mut t = FedAvgM::new(1.0, 0.5).unwrap();
        t.restore(saved).unwrap();
        assert_eq!(
            t.aggregate(&ups(&v)).unwrap(),
            s.aggregate(&ups(&v)).unwrap()
        ); // 1.75 both
    }
}
