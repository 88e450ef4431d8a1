//! Byzantine-robust rules: coordinate-wise median and trimmed mean (Yin et al. 2018), Krum and Multi-Krum
//! (Blanchard et al. 2017). They ignore example weights on purpose: a weight is a client's claim, and a
//! robust rule must not let one client buy influence by claiming many examples.

use rayon::prelude::*;

use super::{check, AggregateError, ClientUpdate, Strategy, CHUNK};

/// Applies `f` to the K values of every coordinate (parallel over chunks, one scratch buffer per chunk).
fn per_coordinate(
    updates: &[ClientUpdate<'_>],
    f: impl Fn(&mut [f32]) -> f32 + Sync,
) -> Result<Vec<f32>, AggregateError> {
    let n = check(updates)?;
    let k = updates.len();
    let mut out = vec![0f32; n];
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, dst)| {
        let start = c * CHUNK;
        let mut scratch = vec![0f32; k];
        for (j, o) in dst.iter_mut().enumerate() {
            for (s, u) in scratch.iter_mut().zip(updates) {
                *s = u.delta[start + j];
            }
            *o = f(&mut scratch);
        }
    });
    Ok(out)
}

/// Coordinate-wise median (the mean of the two middle values for an even count).
#[derive(Debug, Clone, Copy)]
pub struct Median;

impl Strategy for Median {
    fn name(&self) -> String {
        "median".into()
    }

    fn aggregate(&mut self, updates: &[ClientUpdate<'_>]) -> Result<Vec<f32>, AggregateError> {
        per_coordinate(updates, |v| {
            let k = v.len();
            let (_, hi, _) = v.select_nth_unstable_by(k / 2, f32::total_cmp);
            let hi = *hi;
            if k % 2 == 1 {
                hi
            } else {
                let lo = v[..k / 2].iter().copied().fold(f32::NEG_INFINITY, f32::max);
                0.5 * (lo + hi)
            }
        })
    }
}

/// Coordinate-wise β-trimmed mean: drop the ⌊βK⌋ largest and smallest values of each coordinate.
#[derive(Debug, Clone, Copy)]
pub struct TrimmedMean {
    beta: f32,
}

impl TrimmedMean {
    /// Trims a fraction `beta` ∈ [0, 0.5) from each end.
    pub fn new(beta: f32) -> Result<Self, AggregateError> {
        if !(0.0..0.5).contains(&beta) {
            return Err(AggregateError::InvalidParameter(format!(
                "trim β must lie in [0, 0.5), got {beta}"
            )));
        }
        Ok(Self { beta })
    }
}

impl Strategy for TrimmedMean {
    fn name(&self) -> String {
        format!("trimmed-mean(beta={})", self.beta)
    }

    fn aggregate(&mut self, updates: &[ClientUpdate<'_>]) -> Result<Vec<f32>, AggregateError> {
        let k = updates.len();
        let t = (self.beta * k as f32).floor() as usize;
        if k == 0 || k <= 2 * t {
            return Err(AggregateError::TooFew {
                strategy: "trimmed mean",
                needed: 2 * t + 1,
                got: k,
            });
        }
        per_coordinate(updates, |v| {
            v.sort_unstable_by(f32::total_cmp);
            let kept = &v[t..v.len() - t];
            kept.iter().map(|&x| f64::from(x)).sum::<f64>() as f32 / kept.len() as f32
        })
    }
}

/// Krum (m = 1) and Multi-Krum (mean of the m updates with the lowest Krum scores).
#[derive(Debug, Clone, Copy)]
pub struct Krum {
    byzantine: usize,
    m: usize,
}

impl Krum {
    /// Tolerates `byzantine` = f bad clients; averages the best `m` ≥ 1 updates.
    pub fn new(byzantine: usize, m: usize) -> Result<Self, AggregateError> {
        if m == 0 {
            return Err(AggregateError::InvalidParameter(
                "Multi-Krum m must be at least 1".into(),
            ));
        }
        Ok(Self { byzantine, m })
    }

    /// Krum scores: for each update, the sum of squared distances to its K − f − 2 nearest other updates.
    pub fn scores(&self, updates: &[ClientUpdate<'_>]) -> Result<Vec<f64>, AggregateError> {
        check(updates)?;
        let k = updates.len();
        let needed = 2 * self.byzantine + 3;
        if k < needed || k < self.m {
            return Err(AggregateError::TooFew {
                strategy: "krum",
                needed: needed.max(self.m),
                got: k,
            });
        }
        let pairs: Vec<(usize, usize)> = (0..k)
            .flat_map(|i| (i + 1..k).map(move |j| (i, j)))
            .collect();
        let d2: Vec<f64> = pairs
            .par_iter()
            .map(|&(i, j)| {
                updates[i]
                    .delta
                    .iter()
                    .zip(updates[j].delta)
                    .map(|(a, b)| f64::from(a - b).powi(2))
                    .sum()
            })
            .collect();
        let mut dist = vec![vec![0f64; k]; k];
        for (&(i, j), &d) in pairs.iter().zip(&d2) {
            dist[i][j] = d;
            dist[j][i] = d;
        }
        let nearest = k - self.byzantine - 2;
        Ok((0..k)
            .map(|i| {
                let mut others: Vec<f64> = (0..k).filter(|&j| j != i).map(|j| dist[i][j]).collect();
                others.sort_unstable_by(f64::total_cmp);
                others[..nearest].iter().sum()
            })
            .collect())
    }
}

impl Strategy for Krum {
    fn name(&self) -> String {
        if self.m == 1 {
            format!("krum(f={})", self.byzantine)
        } else {
            format!("multi-krum(f={},m={})", self.byzantine, self.m)
        }
    }

    fn aggregate(&mut self, updates: &[ClientUpdate<'_>]) -> Result<Vec<f32>, AggregateError> {
        let scores = self.scores(updates)?;
        let mut order: Vec<usize> = (0..updates.len()).collect();
        order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
        let chosen: Vec<ClientUpdate<'_>> = order[..self.m].iter().map(|&i| updates[i]).collect();
        let w = vec![1.0 / self.m as f32; self.m];
        super::weighted_sum(&chosen, &w)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::ups;
    use super::super::weighted_mean;
    use super::*;

    fn honest_plus_outliers() -> Vec<(u64, Vec<f32>)> {
        let mut v: Vec<(u64, Vec<f32>)> = (0..7)
            .map(|i| (10, vec![1.0 + 0.01 * i as f32, -1.0 - 0.01 * i as f32, 0.5]))
            .collect();
        // Two attackers: huge values, and a claim of many examples.
        v.push((1_000_000, vec![1e6, -1e6, 1e6]));
        v.push((1_000_000, vec![-1e6, 1e6, -1e6]));
        v
    }

    #[test]
    fn median_by_hand_odd_and_even() {
        let odd = vec![
            (1, vec![3.0, 1.0]),
            (1, vec![1.0, 2.0]),
            (1, vec![2.0, 9.0]),
        ];
        assert_eq!(Median.aggregate(&ups(&odd)).unwrap(), vec![2.0, 2.0]);
        let even = vec![
            (1, vec![4.0]),
            (1, vec![1.0]),
            (1, vec![2.0]),
            (1, vec![3.0]),
        ];
        assert_eq!(Median.aggregate(&ups(&even)).unwrap(), vec![2.5]);
    }

    #[test]
    fn trimmed_mean_by_hand() {
        let v = vec![
            (1, vec![1.0]),
            (1, vec![2.0]),
            (1, vec![3.0]),
            (1, vec![4.0]),
            (1, vec![100.0]),
        ];
        // β = 0.2, K = 5: drop one from each end → mean(2, 3, 4) = 3
        assert_eq!(
            TrimmedMean::new(0.2).unwrap().aggregate(&ups(&v)).unwrap(),
            vec![3.0]
        );
        assert_eq!(
            TrimmedMean::new(0.0).unwrap().aggregate(&ups(&v)).unwrap(),
            vec![22.0]
        );
        assert!(TrimmedMean::new(0.5).is_err());
        // β = 0.34 of three values trims one from each end: the median.
        let three = vec![(1, vec![7.0]), (1, vec![-50.0]), (1, vec![9.0])];
        assert_eq!(
            TrimmedMean::new(0.34)
                .unwrap()
                .aggregate(&ups(&three))
                .unwrap(),
            vec![7.0]
        );
    }

    #[test]
    fn krum_scores_by_hand() {
        // Points 0, 1, 2, 10 on a line; f = 0 → each score sums its K − 2 = 2 nearest squared distances.
        let v = vec![
            (1, vec![0.0]),
            (1, vec![1.0]),
            (1, vec![2.0]),
            (1, vec![10.0]),
        ];
        let s = Krum::new(0, 1).unwrap().scores(&ups(&v)).unwrap();
        assert_eq!(s, vec![1.0 + 4.0, 1.0 + 1.0, 1.0 + 4.0, 64.0 + 81.0]);
        assert_eq!(
            Krum::new(0, 1).unwrap().aggregate(&ups(&v)).unwrap(),
            vec![1.0]
        );
        // Multi-Krum m = 3: mean of 1, 0, 2 (ties broken by index) = 1
        assert_eq!(
            Krum::new(0, 3).unwrap().aggregate(&ups(&v)).unwrap(),
            vec![1.0]
        );
        assert!(matches!(
            Krum::new(1, 1).unwrap().aggregate(&ups(&v)),
            Err(AggregateError::TooFew { .. })
        ));
    }

    #[test]
    fn robust_rules_resist_injected_outliers_where_fedavg_does_not() {
        let v = honest_plus_outliers();
        let honest_centre = [1.03f32, -1.03, 0.5];
        let close = |got: &[f32]| {
            got.iter()
                .zip(&honest_centre)
                .all(|(a, b)| (a - b).abs() < 0.05)
        };
        assert!(close(&Median.aggregate(&ups(&v)).unwrap()));
        assert!(close(
            &TrimmedMean::new(0.25).unwrap().aggregate(&ups(&v)).unwrap()
        ));
        assert!(close(
            &Krum::new(2, 1).unwrap().aggregate(&ups(&v)).unwrap()
        ));
        assert!(close(
            &Krum::new(2, 4).unwrap().aggregate(&ups(&v)).unwrap()
        ));
        assert!(
            !close(&weighted_mean(&ups(&v)).unwrap()),
            "plain FedAvg is dragged away"
        );
    }
}
