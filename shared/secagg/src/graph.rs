//! The SecAgg+ communication graph: each client shares its secrets with, and masks against, only
//! `k` neighbours instead of everyone (Bell et al. 2020). The graph is a Harary graph H(k, n) — a
//! ring on which each client is joined to the `k/2` nearest on either side — laid over a random
//! permutation of the clients fixed by the round's seed, so the coordinator cannot choose who
//! neighbours whom. Nothing here knows of keys or masks.

use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::SecAggError;

/// Neighbour lists of `n` clients (indices `0..n`), `k` neighbours each (`k` even, `k < n`; with
/// `k ≥ n − 1` everyone neighbours everyone), symmetric and a function of `seed` alone.
pub fn neighbours(n: usize, k: usize, seed: [u8; 32]) -> Result<Vec<Vec<usize>>, SecAggError> {
    if n < 2 {
        return Err(SecAggError::Params(format!(
            "secure aggregation needs at least 2 clients, not {n}"
        )));
    }
    if k < n - 1 && !k.is_multiple_of(2) {
        return Err(SecAggError::Params(format!(
            "the neighbourhood size must be even (a Harary graph), not {k}"
        )));
    }
    if k >= n - 1 {
        return Ok((0..n)
            .map(|i| (0..n).filter(|&j| j != i).collect())
            .collect());
    }
    let mut ring: Vec<usize> = (0..n).collect();
    ring.shuffle(&mut rand_chacha::ChaCha20Rng::from_seed(seed));
    let mut at = vec![0usize; n];
    for (p, &c) in ring.iter().enumerate() {
        at[c] = p;
    }
    Ok((0..n)
        .map(|c| {
            let p = at[c];
            let mut v: Vec<usize> = (1..=k / 2)
                .flat_map(|d| [ring[(p + d) % n], ring[(p + n - d) % n]])
                .collect();
            v.sort_unstable();
            v
        })
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
    }

    #[test]
    fn default_parameters() {
        assert_eq!(default_params(100), (20, 11));
        assert_eq!(default_params(1000), (30, 16));
        assert_eq!(default_params(5), (4, 3));
    }
}
