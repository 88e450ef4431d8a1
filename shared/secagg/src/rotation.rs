//! A seeded random rotation that flattens a vector before it is rounded to integers, so every
//! coordinate of a sum of rotated vectors is close to a Gaussian of variance `‖sum‖² / words` whatever
//! the vectors were (one large value, one aligned direction across every device): what lets the
//! rotated encoding size its modulus from an L2 bound instead of the per-value worst case
//! (Kairouz, Liu, Steinke, "The Distributed Discrete Gaussian Mechanism", ICML 2021, §4).
//!
//! The transform is `H₂ · S₂ · P · H₁ · S₁` on the vector zero-padded to a multiple of a block `B`: `Sᵢ`
//! random signs, `Hᵢ` the orthonormal Walsh–Hadamard transform of each block of `B` words, `P` a random
//! permutation. One Hadamard transform over the whole vector would need it padded to a power of two (up
//! to twice the words on the wire); two block transforms with a permutation between spread any block's
//! mass over every block instead, with `B² ≥ 16 · len` so each second-stage block draws about sixteen
//! words from the first stage's. The padding is under `B ≈ 4√len` words (0.4 % of a million).
//! Everything is derived from a public seed: the rotation only has to be independent of the devices'
//! data, not secret.
//!
//! What must never live here: the integer encoding or anything of the protocol.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use sha2::{Digest, Sha256};

/// The block of the Walsh–Hadamard transforms for `len` values: the smallest power of two `B` with
/// `B² ≥ 16 · len`, and no larger than `len` rounded up to a power of two.
pub fn block_size(len: usize) -> usize {
    let mut b = 1usize;
    while b.saturating_mul(b) < len.saturating_mul(16) {
        b <<= 1;
    }
    len.max(1)
        .checked_next_power_of_two()
        .map_or(b, |p| b.min(p))
}

/// The words a rotated vector of `len` values has: `len` rounded up to a multiple of its block
/// (saturating: a length no vector can have, say from a peer's task, gives `usize::MAX`, not a panic).
pub fn padded_len(len: usize) -> usize {
    let b = block_size(len);
    len.div_ceil(b).saturating_mul(b)
}

/// The rotation of vectors of one length under one seed.
#[derive(Debug, Clone)]
pub struct Rotation {
    len: usize,
    block: usize,
    signs1: Vec<bool>,
    signs2: Vec<bool>,
    /// Word `i` after the permutation is word `perm[i]` before it.
    perm: Vec<u32>,
}

impl Rotation {
    /// The rotation of `len`-value vectors drawn from `seed` (the same seed and length give the same
    /// rotation on every platform).
    pub fn new(seed: &[u8; 32], len: usize) -> Self {
        let block = block_size(len);
        let words = padded_len(len);
        let key: [u8; 32] = Sha256::new()
            .chain_update(b"starling-secagg/rotation/v1")
            .chain_update(seed)
            .chain_update((len as u64).to_le_bytes())
            .finalize()
            .into();
        let mut rng = ChaCha20Rng::from_seed(key);
        let signs1 = (0..words).map(|_| rng.random::<bool>()).collect();
        let signs2 = (0..words).map(|_| rng.random::<bool>()).collect();
        let mut perm: Vec<u32> = (0..words as u32).collect();
        for i in (1..words).rev() {
            let j = rng.random_range(0..=i as u32) as usize;
            perm.swap(i, j);
        }
        Self {
            len,
            block,
            signs1,
            signs2,
            perm,
        }
    }

    /// Values in an unrotated vector.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the vectors are empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Words in a rotated vector.
    pub fn words(&self) -> usize {
        self.perm.len()
    }

    /// Rotates `values` (`len` of them; fewer are zero-padded, more are cut) into `words()` words.
    pub fn forward(&self, values: &[f64]) -> Vec<f64> {
        let mut y = vec![0f64; self.words()];
        for (o, v) in y.iter_mut().zip(values.iter().take(self.len)) {
            *o = *v;
        }
        flip(&mut y, &self.signs1);
        blocks_hadamard(&mut y, self.block);
        let mut z: Vec<f64> = self.perm.iter().map(|&i| y[i as usize]).collect();
        flip(&mut z, &self.signs2);
        blocks_hadamard(&mut z, self.block);
        z
    }

    /// Undoes [`Rotation::forward`]: `words()` words back to `len` values.
    pub fn inverse(&self, words: &[f64]) -> Vec<f64> {
        let mut z = words.to_vec();
        z.resize(self.words(), 0.0);
        blocks_hadamard(&mut z, self.block);
        flip(&mut z, &self.signs2);
        let mut y = vec![0f64; self.words()];
        for (&i, v) in self.perm.iter().zip(z) {
            y[i as usize] = v;
        }
        blocks_hadamard(&mut y, self.block);
        flip(&mut y, &self.signs1);
        y.truncate(self.len);
        y
    }
}

fn flip(v: &mut [f64], signs: &[bool]) {
    for (x, &s) in v.iter_mut().zip(signs) {
        if s {
            *x = -*x;
        }
    }
}

/// The orthonormal Walsh–Hadamard transform of each `block`-word block of `v` (its own inverse).
fn blocks_hadamard(v: &mut [f64], block: usize) {
    let norm = 1.0 / (block as f64).sqrt();
    for b in v.chunks_exact_mut(block) {
        let mut h = 1;
        while h < block {
            for i in (0..block).step_by(2 * h) {
                for j in i..i + h {
                    let (x, y) = (b[j], b[j + h]);
                    b[j] = x + y;
                    b[j + h] = x - y;
                }
            }
            h *= 2;
        }
        b.iter_mut().for_each(|x| *x *= norm);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_cover_the_length_with_little_padding() {
        assert_eq!(block_size(1), 1);
        assert_eq!(padded_len(0), 0);
        assert_eq!(padded_len(3), 4);
        assert_eq!(block_size(1_000_000), 4096);
        assert_eq!(padded_len(1_000_000), 1_003_520);
        // SmolLM2's rank-8 adapter on q and v (30 layers × 2 × 9,216) is a whole number of blocks.
        assert_eq!(padded_len(552_960), 552_960);
        assert!(padded_len(usize::MAX) >= usize::MAX - 1);
        for len in [1usize, 2, 5, 17, 100, 1000, 4097, 65_537, 300_001] {
            let b = block_size(len);
            assert!(b.is_power_of_two() && padded_len(len) >= len && padded_len(len) - len < b);
            assert!(b * b >= 16 * len || b >= len, "{len}");
        }
    }

    #[test]
    fn the_rotation_is_orthonormal_and_inverts() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        for len in [1usize, 3, 100, 5000] {
            let r = Rotation::new(&[7; 32], len);
            let x: Vec<f64> = (0..len).map(|_| rng.random_range(-1.0..1.0)).collect();
            let y = r.forward(&x);
            let norm = |v: &[f64]| v.iter().map(|a| a * a).sum::<f64>().sqrt();
            assert!(
                (norm(&x) - norm(&y)).abs() < 1e-9 * norm(&x).max(1.0),
                "{len}"
            );
            let back = r.inverse(&y);
            assert_eq!(back.len(), len);
            assert!(x.iter().zip(&back).all(|(a, b)| (a - b).abs() < 1e-9));
        }
        // The same seed and length give the same rotation; another seed another one.
        let x = vec![1.0; 50];
        assert_eq!(
            Rotation::new(&[1; 32], 50).forward(&x),
            Rotation::new(&[1; 32], 50).forward(&x)
        );
        assert_ne!(
            Rotation::new(&[1; 32], 50).forward(&x),
            Rotation::new(&[2; 32], 50).forward(&x)
        );
    }

    #[test]
    fn concentrated_vectors_come_out_flat() {
        // All the mass on one value, on one block, or spread evenly: after the rotation the largest
        // word stays within a few standard deviations of a flat vector's (‖x‖ / √words).
        let len = 100_000;
        let r = Rotation::new(&[3; 32], len);
        let flat = 1.0 / (r.words() as f64).sqrt();
        let one_hot = {
            let mut v = vec![0.0; len];
            v[12_345] = 1.0;
            v
        };
        let one_block: Vec<f64> = (0..len)
            .map(|i| if i < 1024 { 1.0 / 32.0 } else { 0.0 })
            .collect();
        let even = vec![1.0 / (len as f64).sqrt(); len];
        for (name, x) in [
            ("one value", one_hot),
            ("one block", one_block),
            ("even", even),
        ] {
            let y = r.forward(&x);
            let max = y.iter().fold(0f64, |m, v| m.max(v.abs()));
            let rms = (y.iter().map(|v| v * v).sum::<f64>() / y.len() as f64).sqrt();
            assert!(
                (rms / flat - 1.0).abs() < 1e-6,
                "{name}: rms {rms} vs {flat}"
            );
            // A Gaussian's largest of 10^5 draws is ≈ 4.4 σ; allow 6.
            assert!(max < 6.0 * flat, "{name}: largest word {:.2} σ", max / flat);
        }
    }
}
