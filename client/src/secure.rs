//! A device's secure-aggregation work that touches the update itself: encoding a trained delta as
//! integers for a secure task, and masking the stored encoded update once the device's shares are in
//! ([`starling_secagg`] does the cryptography). The QUIC driver and the simulator both call these, so
//! a simulated device masks exactly as a deployed one.
//!
//! What must never live here: protocol state transitions (they are the session's) or I/O.

use rand::Rng;
use starling_protocol::message::SecAggTask;
use starling_secagg::mask::{pack, unpack, Encoding};
use starling_secagg::{Client, ClientState, SecAggError};

/// The integer encoding a secure task asks for.
pub fn encoding(task: &SecAggTask) -> Result<Encoding, SecAggError> {
    Encoding::new(task.clip(), task.value_bits, task.params.clients)
}

/// A device's FedAvg weight in a secure round: 1 without a `weight_cap`, else `min(examples, cap) / cap`.
pub fn weight(task: &SecAggTask, examples: u64) -> f32 {
    if task.weight_cap == 0 {
        1.0
    } else {
        (examples.min(task.weight_cap) as f64 / task.weight_cap as f64) as f32
    }
}

/// Encodes a delta for a secure task trained on `examples` sequences: with a `weight_cap`, the delta
/// times the device's weight followed by the weight times `clip`; clipped, scaled, stochastically
/// rounded, as 32-bit little-endian words (the unmasked body the device keeps until it can mask it).
pub fn encode_delta(
    task: &SecAggTask,
    delta: &[f32],
    examples: u64,
    rng: &mut impl Rng,
) -> Result<Vec<u8>, SecAggError> {
    let mut values = delta.to_vec();
    if task.weight_cap > 0 {
        let w = weight(task, examples);
        values.iter_mut().for_each(|x| *x *= w);
        values.push(w * task.clip());
    }
    encode_values(task, &values, rng)
}

/// Encodes a secure round's values as they are (the weighted delta and the weight value, as
/// [`encode_delta`] lays them out; [`decode_body`] reads them back).
pub fn encode_values(
    task: &SecAggTask,
    values: &[f32],
    rng: &mut impl Rng,
) -> Result<Vec<u8>, SecAggError> {
    if values.len() != task.params.len {
        return Err(SecAggError::Params(format!(
            "{} values for a round of {}",
            values.len(),
            task.params.len
        )));
    }
    Ok(pack(&encoding(task)?.encode(values, rng), 32))
}

/// Decodes an unmasked body from [`encode_delta`] back to its values — the weighted delta, then the
/// weight value with a `weight_cap` (a simulated attacker transforms its delta this way).
pub fn decode_body(task: &SecAggTask, body: &[u8]) -> Result<Vec<f32>, SecAggError> {
    let words = unpack(body, 32, task.params.len)?;
    Ok(encoding(task)?.decode_sum(&words, 32))
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
