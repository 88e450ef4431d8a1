//! Shamir secret sharing over GF(2^8), byte by byte: a secret of any length is split into shares
//! of the same length, any `t` of which give it back and fewer of which say nothing about it.
//!
//! The field is GF(2^8) with the AES polynomial x⁸ + x⁴ + x³ + x + 1; share abscissae are 1..=255,
//! so one secret has at most 255 shares (SecAgg+ neighbourhoods are far smaller). Nothing here knows
//! of keys, clients or rounds.

use rand::Rng;

use crate::{Malformed, ParamsError, SecAggError};

/// exp and log tables of GF(2^8) with generator 3.
const TABLES: ([u8; 512], [u8; 256]) = {
    let mut exp = [0u8; 512];
    let mut log = [0u8; 256];
    let mut x: u16 = 1;
    let mut i = 0;
    while i < 255 {
        exp[i] = x as u8;
        log[x as usize] = i as u8;
        // x · 3 = x · 2 + x, reduced by the AES polynomial.
        let mut x2 = x << 1;
        if x2 & 0x100 != 0 {
            x2 ^= 0x11b;
        }
        x = x2 ^ x;
        i += 1;
    }
    while i < 512 {
        exp[i] = exp[i - 255];
        i += 1;
    }
    (exp, log)
};

fn mul(a: u8, b: u8) -> u8 {
    if a == 0 || b == 0 {
        return 0;
    }
    let (exp, log) = &TABLES;
    exp[log[a as usize] as usize + log[b as usize] as usize]
}

fn inv(a: u8) -> u8 {
    debug_assert!(a != 0);
    let (exp, log) = &TABLES;
    exp[255 - log[a as usize] as usize]
}

/// One share: the abscissa (1..=255) and the polynomials' values there, one byte per secret byte.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Share {
    /// Abscissa, never 0.
    pub x: u8,
    /// One byte per byte of the secret.
    pub y: Vec<u8>,
}

/// Splits `secret` into `n` shares (abscissae 1..=n) any `t` of which reconstruct it.
pub fn split(
    secret: &[u8],
    t: usize,
    n: usize,
    rng: &mut impl Rng,
) -> Result<Vec<Share>, SecAggError> {
    if t == 0 || t > n || n > 255 {
        return Err(ParamsError::ShareThreshold { t, n }.into());
    }
    let mut shares: Vec<Share> = (1..=n)
        .map(|x| Share {
            x: x as u8,
            y: vec![0; secret.len()],
        })
        .collect();
    let mut coeffs = vec![0u8; t];
    for (i, &s) in secret.iter().enumerate() {
        coeffs[0] = s;
        rng.fill(&mut coeffs[1..]);
        for share in &mut shares {
            // Horner's rule at x.
            let mut acc = 0u8;
            for &c in coeffs.iter().rev() {
                acc = mul(acc, share.x) ^ c;
            }
            share.y[i] = acc;
        }
    }
    Ok(shares)
}

/// Reconstructs a secret from at least `t` shares (Lagrange interpolation at 0 over the first `t`).
pub fn combine(shares: &[Share], t: usize) -> Result<Vec<u8>, SecAggError> {
    if t == 0 || shares.len() < t {
        return Err(SecAggError::NotEnoughShares {
            have: shares.len(),
            need: t,
        });
    }
    let used = &shares[..t];
    let len = used[0].y.len();
    for (i, s) in used.iter().enumerate() {
        if s.x == 0 || s.y.len() != len || used[..i].iter().any(|o| o.x == s.x) {
            return Err(Malformed::Shares.into());
        }
    }
    // Lagrange basis at 0: l_i = Π_{j≠i} x_j / (x_j − x_i) (subtraction is xor).
    let basis: Vec<u8> = used
        .iter()
        .map(|si| {
            used.iter()
                .filter(|sj| sj.x != si.x)
                .fold(1u8, |acc, sj| mul(acc, mul(sj.x, inv(sj.x ^ si.x))))
        })
        .collect();
    Ok((0..len)
        .map(|b| {
            used.iter()
                .zip(&basis)
                .fold(0u8, |acc, (s, &l)| acc ^ mul(s.y[b], l))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn field_arithmetic_is_a_field() {
        for a in 1..=255u8 {
            assert_eq!(mul(a, inv(a)), 1, "{a}");
            assert_eq!(mul(a, 1), a);
        }
        // 0x53 · 0xCA = 1 in the AES field (FIPS-197's example of an inverse pair).
        assert_eq!(mul(0x53, 0xca), 1);
        assert_eq!(mul(0x57, 0x83), 0xc1);
    }

    #[test]
    fn any_t_shares_reconstruct_and_fewer_do_not() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
        let secret: Vec<u8> = (0..32).map(|i| (i * 37 + 5) as u8).collect();
        let (t, n) = (5, 12);
        let shares = split(&secret, t, n, &mut rng).unwrap();
        for start in 0..=n - t {
            let mut pick: Vec<Share> = shares[start..start + t].to_vec();
            pick.reverse();
            assert_eq!(combine(&pick, t).unwrap(), secret);
        }
        let mut scattered = vec![shares[11].clone(), shares[0].clone(), shares[6].clone()];
        scattered.extend([shares[3].clone(), shares[9].clone(), shares[2].clone()]);
        assert_eq!(combine(&scattered, t).unwrap(), secret);
        // t − 1 shares with any guessed t-th abscissa value give something else.
        assert!(matches!(
            combine(&shares[..t - 1], t),
            Err(SecAggError::NotEnoughShares { have: 4, need: 5 })
        ));
        assert_ne!(combine(&shares[..t - 1], t - 1).unwrap(), secret);
    }

    #[test]
    fn bad_parameters_and_shares_are_typed_errors() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(2);
        assert!(split(b"k", 0, 3, &mut rng).is_err());
        assert!(split(b"k", 4, 3, &mut rng).is_err());
        assert!(split(b"k", 2, 256, &mut rng).is_err());
        let s = split(b"key", 2, 3, &mut rng).unwrap();
        let dup = [s[0].clone(), s[0].clone()];
        assert_eq!(combine(&dup, 2), Err(Malformed::Shares.into()));
        let short = [s[0].clone(), Share { x: 2, y: vec![1] }];
        assert_eq!(combine(&short, 2), Err(Malformed::Shares.into()));
    }
}
