//! Norm bounding (Sun et al. 2019): clip every update to an L2 bound before any rule sees it, so no single
//! client can move the model further than the bound whatever the rule.

use super::{AggregateError, ClientUpdate, Strategy, StrategyState};

/// Clips each update to `bound` and hands the clipped updates to the inner strategy.
pub struct NormBound {
    bound: f32,
    inner: Box<dyn Strategy>,
}

impl NormBound {
    /// Wraps `inner` with an L2 bound > 0.
    pub fn new(bound: f32, inner: Box<dyn Strategy>) -> Result<Self, AggregateError> {
        if !(bound.is_finite() && bound > 0.0) {
            return Err(AggregateError::InvalidParameter(format!(
                "norm bound must be positive, got {bound}"
            )));
        }
        Ok(Self { bound, inner })
    }
}

/// `delta` scaled to L2 norm at most `bound` (a copy only when it has to change).
pub fn clip(delta: &[f32], bound: f32) -> std::borrow::Cow<'_, [f32]> {
    let norm = delta
        .iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt();
    if norm <= f64::from(bound) {
        std::borrow::Cow::Borrowed(delta)
    } else {
        let s = (f64::from(bound) / norm) as f32;
        std::borrow::Cow::Owned(delta.iter().map(|&x| x * s).collect())
    }
}

impl Strategy for NormBound {
    fn name(&self) -> String {
        format!("{}+norm-bound({})", self.inner.name(), self.bound)
    }

    fn proximal_mu(&self) -> f32 {
        self.inner.proximal_mu()
    }

    fn aggregate(&mut self, updates: &[ClientUpdate<'_>]) -> Result<Vec<f32>, AggregateError> {
        let clipped: Vec<_> = updates.iter().map(|u| clip(u.delta, self.bound)).collect();
        let views: Vec<ClientUpdate<'_>> = updates
            .iter()
            .zip(&clipped)
            .map(|(u, c)| ClientUpdate {
                num_examples: u.num_examples,
                delta: c,
            })
            .collect();
        self.inner.aggregate(&views)
    }

    fn state(&self) -> StrategyState {
        self.inner.state()
    }

    fn restore(&mut self, state: StrategyState) -> Result<(), AggregateError> {
        self.inner.restore(state)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::ups;
    use super::super::FedAvg;
    use super::*;

    #[test]
    fn every_update_is_clipped_before_averaging() {
        let v = vec![(1, vec![3.0, 4.0]), (1, vec![0.3, 0.4])]; // norms 5 and 0.5
        let mut s = NormBound::new(1.0, Box::new(FedAvg::new(1.0, 0.0).unwrap())).unwrap();
        let got = s.aggregate(&ups(&v)).unwrap();
        // (0.6, 0.8) and (0.3, 0.4) averaged
        assert!((got[0] - 0.45).abs() < 1e-6 && (got[1] - 0.6).abs() < 1e-6);
        assert!(NormBound::new(0.0, Box::new(FedAvg::new(1.0, 0.0).unwrap())).is_err());
    }
}
