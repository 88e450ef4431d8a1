//! A device's secure-aggregation work that touches the update itself: encoding a trained delta as
//! integers for a secure task, and masking the stored encoded update once the device's shares are in
//! ([`starling_secagg`] does the cryptography). The QUIC driver and the simulator both call these, so
//! a simulated device masks exactly as a deployed one.
//!
//! What must never live here: protocol state transitions (they are the session's) or I/O.

use rand::Rng;
use starling_protocol::message::SecAggTask;
use starling_secagg::mask::{pack, unpack};
use starling_secagg::{Client, ClientState, ParamsError, SecAggError};

/// A device's FedAvg weight in a secure round: 1 without a `weight_cap`, else `min(examples, cap) / cap`.
pub fn weight(task: &SecAggTask, examples: u64) -> f32 {
    if task.weight_cap == 0 {
        1.0
    } else {
        (examples.min(task.weight_cap) as f64 / task.weight_cap as f64) as f32
    }
}

/// A device's share of distributed discrete Gaussian noise (the task's user-level DP settings).
#[derive(Debug, Clone, Copy)]
pub struct NoiseShare {
    /// z: the shares of `clients` devices add up to standard deviation `z · l2_clip`.
    pub noise_multiplier: f64,
    /// The L2 bound the delta was clipped to.
    pub l2_clip: f64,
    /// Devices whose shares are guaranteed to be in the sum.
    pub clients: u64,
    /// Key of the noise stream (from the OS on a device).
    pub key: [u8; 32],
}

/// Encodes a delta for a secure task trained on `examples` sequences: with a `weight_cap`, the delta
/// times the device's weight followed by the weight times `clip`; clipped (per value, or the delta to L2
/// norm `clip` under the rotated encoding), scaled, stochastically rounded, plus the device's discrete
/// Gaussian noise share if given (integer steps, exact sampler), as 32-bit little-endian words (the
/// unmasked body the device keeps until it can mask it).
pub fn encode_delta(
    task: &SecAggTask,
    delta: &[f32],
    examples: u64,
    noise: Option<NoiseShare>,
    rng: &mut impl Rng,
) -> Result<Vec<u8>, SecAggError> {
    let mut values = delta.to_vec();
    if task.rotated.is_some() {
        // A delta with a non-finite value is left as it is: the encoding counts such values as 0 and
        // clips the whole vector to its bound.
        let _ = starling_privacy::noise::clip_l2(&mut values, f64::from(task.clip()));
    }
    if task.weight_cap > 0 {
        let w = weight(task, examples);
        values.iter_mut().for_each(|x| *x *= w);
        values.push(w * task.clip());
    }
    let Some(n) = noise else {
        return encode_values(task, &values, rng);
    };
    let enc = encoding_for(task, &values)?;
    let steps = enc.noise_steps(n.noise_multiplier, n.l2_clip, n.clients);
    // The encoding refuses noise it makes no room for (the rotated kind takes none).
    let enc = enc.with_noise(steps as f64)?;
    let mut draws = vec![0i64; values.len()];
    starling_privacy::sampler::fill_discrete_gaussian(&mut draws, steps, n.key)
        .map_err(|_| SecAggError::from(ParamsError::NoiseSteps(steps)))?;
    let words: Vec<u32> = enc
        .encode(&values, rng)
        .into_iter()
        .zip(draws)
        .map(|(w, z)| w.wrapping_add(z as i32 as u32))
        .collect();
    Ok(pack(&words, 32))
}

/// Encodes a secure round's values as they are (the weighted delta and the weight value, as
/// [`encode_delta`] lays them out; [`decode_body`] reads them back).
pub fn encode_values(
    task: &SecAggTask,
    values: &[f32],
    rng: &mut impl Rng,
) -> Result<Vec<u8>, SecAggError> {
    Ok(pack(&encoding_for(task, values)?.encode(values, rng), 32))
}

/// The task's encoding, refused for a number of values other than the task's.
fn encoding_for(
    task: &SecAggTask,
    values: &[f32],
) -> Result<starling_secagg::mask::Encoding, SecAggError> {
    let want = match &task.rotated {
        Some(r) => usize::try_from(r.values).unwrap_or(usize::MAX),
        None => task.params.len,
    };
    if values.len() != want {
        return Err(ParamsError::InputLength {
            got: values.len(),
            want,
        }
        .into());
    }
    task.encoding()
}

/// Decodes an unmasked body from [`encode_delta`] back to its values — the weighted delta, then the
/// weight value with a `weight_cap` (a simulated attacker transforms its delta this way).
pub fn decode_body(task: &SecAggTask, body: &[u8]) -> Result<Vec<f32>, SecAggError> {
    let words = unpack(body, 32, task.params.len)?;
    task.encoding()?.decode_sum(&words, 32)
}

/// Masks an encoded body (from [`encode_delta`]) with the device's round state: the bytes to upload,
/// packed at the round's modulus width.
pub fn mask_body(state: &ClientState, body: &[u8]) -> Result<Vec<u8>, SecAggError> {
    let client = Client::restore(state.clone())?;
    let params = client.params().clone();
    let words = unpack(body, 32, params.len)?;
    let masked = client.masked_input(&words)?;
    Ok(pack(&masked, params.bits))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use starling_secagg::RoundParams;

    #[test]
    fn a_noise_share_is_a_discrete_gaussian_of_the_planned_width_around_the_encoded_delta() {
        let task = SecAggTask {
            params: RoundParams {
                round: 1,
                clients: 4,
                neighbours: 3,
                threshold: 2,
                graph_seed: [1; 32],
                len: 20_000,
                bits: 20,
            },
            id: 0,
            clip_bits: 0.05f32.to_bits(),
            value_bits: 10,
            weight_cap: 0,
            rotated: None,
        };
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(3);
        let delta = vec![0.01f32; 20_000];
        let share = NoiseShare {
            noise_multiplier: 1.0,
            l2_clip: 0.5,
            clients: 4,
            key: [9; 32],
        };
        let noisy = decode_body(
            &task,
            &encode_delta(&task, &delta, 1, Some(share), &mut rng).unwrap(),
        )
        .unwrap();
        // 1.0 · 0.5 · 20,480 steps / √4 = 5,120 steps = 0.0125 in the delta's units.
        let want = 5120.0 * 0.05 / 1024.0;
        let n = noisy.len() as f64;
        let mean = noisy.iter().map(|&v| f64::from(v) - 0.01).sum::<f64>() / n;
        let sd = (noisy
            .iter()
            .map(|&v| (f64::from(v) - 0.01 - mean).powi(2))
            .sum::<f64>()
            / n)
            .sqrt();
        assert!(mean.abs() < 4.0 * want / n.sqrt(), "mean {mean}");
        assert!((sd / want - 1.0).abs() < 0.03, "sd {sd} vs {want}");
        // The same key gives the same share; no share, no noise beyond the rounding.
        let again = decode_body(
            &task,
            &encode_delta(&task, &delta, 1, Some(share), &mut rng).unwrap(),
        )
        .unwrap();
        assert!(noisy.iter().zip(&again).all(|(a, b)| (a - b).abs() < 1e-4));
        let quiet = decode_body(
            &task,
            &encode_delta(&task, &delta, 1, None, &mut rng).unwrap(),
        )
        .unwrap();
        assert!(quiet
            .iter()
            .all(|v| (v - 0.01).abs() <= 0.05 / 1024.0 + 1e-7));
    }
}
