//! The SecAgg+ communication graph: each client shares its secrets with, and masks against, only
//! `k` neighbours instead of everyone (Bell et al. 2020). The graph is a Harary graph H(k, n) — a
//! ring on which each client is joined to the `k/2` nearest on either side — laid over a random
//! permutation of the clients fixed by the round's seed, so the coordinator cannot choose who
//! neighbours whom. Nothing here knows of keys or masks.

use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::{ParamsError, SecAggError};

/// Most clients one round's graph may hold (bounds what a peer-supplied roster size can allocate:
/// the graph keeps one position per client).
pub const MAX_CLIENTS: usize = 1 << 22;

/// The neighbour graph of one round: `n` clients on a ring in a seeded random order, each joined to
/// the `k/2` nearest on either side (`k` even, `k < n`; with `k ≥ n − 1` everyone neighbours
/// everyone). Symmetric and a function of `(n, k, seed)` alone; it holds O(n) positions and lists a
/// client's neighbours on demand.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Graph {
    k: usize,
    ring: Vec<u32>,
    at: Vec<u32>,
}

impl Graph {
    /// The graph of `n` clients with `k` neighbours each, laid out by `seed`.
    pub fn new(n: usize, k: usize, seed: [u8; 32]) -> Result<Self, SecAggError> {
        if !(2..=MAX_CLIENTS).contains(&n) {
            return Err(ParamsError::Clients {
                n,
                max: MAX_CLIENTS,
            }
            .into());
        }
        if k < n - 1 && !k.is_multiple_of(2) {
            return Err(ParamsError::OddNeighbourhood(k).into());
        }
        let mut ring: Vec<u32> = (0..n as u32).collect();
        ring.shuffle(&mut rand_chacha::ChaCha20Rng::from_seed(seed));
        let mut at = vec![0u32; n];
        for (p, &c) in ring.iter().enumerate() {
            at[c as usize] = p as u32;
        }
        Ok(Self {
            k: k.min(n - 1),
            ring,
            at,
        })
    }

    /// Number of clients.
    pub fn len(&self) -> usize {
        self.ring.len()
    }

    /// Whether the graph has no clients (never, once built).
    pub fn is_empty(&self) -> bool {
        self.ring.is_empty()
    }

    /// Neighbours per client.
    pub fn degree(&self) -> usize {
        self.k
    }

    /// The sorted neighbours of client `c` (empty for a client outside the roster).
    pub fn of(&self, c: u32) -> Vec<u32> {
        let n = self.ring.len();
        let Some(&p) = self.at.get(c as usize) else {
            return Vec::new();
        };
        let mut v: Vec<u32> = if self.k >= n - 1 {
            (0..n as u32).filter(|&j| j != c).collect()
        } else {
            let p = p as usize;
            (1..=self.k / 2)
                .flat_map(|d| [self.ring[(p + d) % n], self.ring[(p + n - d) % n]])
                .collect()
        };
        v.sort_unstable();
        v
    }
}

/// Neighbour lists of `n` clients, `k` each, as [`Graph`] lays them out (every list at once).
pub fn neighbours(n: usize, k: usize, seed: [u8; 32]) -> Result<Vec<Vec<usize>>, SecAggError> {
    let g = Graph::new(n, k, seed)?;
    Ok((0..n as u32)
        .map(|c| g.of(c).into_iter().map(|j| j as usize).collect())
        .collect())
}

/// Default neighbourhood size and threshold for `n` clients: `k` = the even number nearest above
/// 3·log₂ n (Bell et al.: O(log n) suffices), capped at `n − 1`, and `t = ⌊k/2⌋ + 1` — a majority of
/// the neighbours, so no two disjoint sets of responders can each reach the threshold, and a client
/// survives the loss of up to `k − t` of its neighbours (just under half).
pub fn default_params(n: usize) -> (usize, usize) {
    let log = (n.max(2) as f64).log2();
    let mut k = (3.0 * log).ceil() as usize;
    k += k % 2;
    let k = k.min(n.saturating_sub(1)).max(1);
    (k, k / 2 + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_graph_is_k_regular_symmetric_and_fixed_by_the_seed() {
        for (n, k) in [(10, 4), (100, 20), (7, 6), (5, 8), (33, 2)] {
            let g = neighbours(n, k, [7; 32]).unwrap();
            let deg = k.min(n - 1);
            for (i, v) in g.iter().enumerate() {
                assert_eq!(v.len(), deg, "n={n} k={k}");
                assert!(!v.contains(&i));
                for &j in v {
                    assert!(g[j].contains(&i), "asymmetric at {i}-{j}");
                }
            }
            assert_eq!(g, neighbours(n, k, [7; 32]).unwrap());
        }
        assert_ne!(
            neighbours(100, 20, [1; 32]).unwrap(),
            neighbours(100, 20, [2; 32]).unwrap()
        );
        assert!(neighbours(10, 3, [0; 32]).is_err());
        assert!(neighbours(1, 0, [0; 32]).is_err());
        assert!(Graph::new(MAX_CLIENTS + 1, 20, [0; 32]).is_err());
        assert!(Graph::new(10, 4, [0; 32]).unwrap().of(10).is_empty());
    }

    #[test]
    fn default_parameters() {
        assert_eq!(default_params(100), (20, 11));
        assert_eq!(default_params(1000), (30, 16));
        assert_eq!(default_params(5), (4, 3));
    }
}
