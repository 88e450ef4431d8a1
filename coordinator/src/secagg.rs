//! Secure aggregation in the round engine: the settings (`[secure_aggregation]`), the parameters a
//! round fixes at selection, and the SecAgg+ server of one round with its phases and their deadlines —
//! plain data the driver persists after every change, so a restarted coordinator resumes the protocol
//! where it stood (or abandons the round), and never holds a device's input in the clear.
//!
//! Phases of a secure round (after selection): **advertise** (until every selected device that did not
//! decline has sent its keys — devices train first, then advertise — or the round's deadline),
//! **share** (until every advertiser has sent its encrypted shares, or `phase_timeout_ms`), **masked**
//! (masked inputs arrive as uploads), **unmask** (reveals); then the engine asks the driver to aggregate
//! the unmasked sum. A phase that closes with fewer survivors than the threshold or `min_updates`
//! abandons the round.
//!
//! What must never live here: sockets, clocks, files, or randomness not derived from the seed.

use std::collections::BTreeSet;

use sha2::{Digest as _, Sha256};
use starling_protocol::message::{RotatedTask, SecAggReply, SecAggStep, SecAggTask};
use starling_protocol::RoundId;
use starling_secagg::graph::default_params;
use starling_secagg::mask::Encoding;
use starling_secagg::{ClientId, Malformed, Reveal, RoundParams, SecAggError, Server};

use crate::engine::Millis;

/// The `[secure_aggregation]` table of coordinator.toml.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecAggConfig {
    /// Whether rounds run SecAgg+ (the coordinator learns only the sum of the deltas).
    pub enabled: bool,
    /// Neighbours per device in the round's graph (0: ≈ 3·log₂ n, even, from Bell et al.).
    pub neighbours: usize,
    /// Shares that reconstruct a secret (0: a majority of the neighbours).
    pub threshold: usize,
    /// How deltas become integers: `per-value` (each value clipped to `[-clip, clip]` at `value_bits`;
    /// the modulus wide enough that no sum can wrap) or `rotated` (the delta clipped to L2 norm `clip`,
    /// randomly rotated, summed modulo `2^modulus_bits`; a sum can wrap with a small probability and is
    /// then refused — see `starling_secagg::mask`).
    pub encoding: SecAggEncoding,
    /// Per value: each delta value is clipped to `[-clip, clip]`. Rotated: the delta's L2 norm bound.
    pub clip: f32,
    /// Per value: resolution, `2^value_bits` integer steps per `clip`.
    pub value_bits: u32,
    /// Rotated: the modulus' bits (each value a device masks and sends is this wide).
    pub modulus_bits: u32,
    /// Longest time each phase after the first (shares, masked inputs, reveals) may stay open, ms.
    pub phase_timeout_ms: u64,
    /// FedAvg weights under masking: 0 weighs every device the same; `c > 0` weighs a device by
    /// `min(examples, c) / c` — it sends its delta times its weight and the weight itself as one more
    /// masked value, so the coordinator learns only the weighted sum and the total weight.
    pub weight_cap: u64,
}

impl Default for SecAggConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            neighbours: 0,
            threshold: 0,
            encoding: SecAggEncoding::PerValue,
            clip: 0.05,
            value_bits: 10,
            modulus_bits: 16,
            phase_timeout_ms: 60_000,
            weight_cap: 0,
        }
    }
}

/// How a secure round's deltas become integers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SecAggEncoding {
    /// Each value clipped and scaled alone; no sum can wrap (exact).
    PerValue,
    /// The delta L2-clipped and rotated; the modulus a chosen width (modular clipping).
    Rotated,
}

impl SecAggConfig {
    /// The per-value integer encoding for sums of up to `clients` deltas (refused when such a sum could
    /// wrap): the grid distributed noise is drawn on.
    pub fn encoding(&self, clients: usize) -> Result<Encoding, SecAggError> {
        Encoding::new(self.clip, self.value_bits, clients)
    }

    /// Whether deltas are rotated (the rotated encoding).
    pub fn rotated(&self) -> bool {
        self.encoding == SecAggEncoding::Rotated
    }

    /// Values a device encodes for a delta of `len` values: the delta, and one weight value with a
    /// `weight_cap`.
    pub fn values(&self, len: usize) -> usize {
        len + usize::from(self.weight_cap > 0)
    }

    /// The words a masked input of a `len`-value delta has.
    pub fn words(&self, len: usize) -> usize {
        let values = self.values(len);
        if self.rotated() {
            starling_secagg::rotation::padded_len(values)
        } else {
            values
        }
    }

    /// Device `id`'s part in a round with `params`, its deltas of `len` values.
    pub fn task(&self, params: RoundParams, id: u32, len: usize) -> SecAggTask {
        SecAggTask {
            params,
            id,
            clip_bits: self.clip.to_bits(),
            value_bits: self.value_bits,
            weight_cap: self.weight_cap,
            rotated: self.rotated().then(|| RotatedTask {
                values: self.values(len) as u64,
            }),
        }
    }

    /// How far, in L2, one device's encoded delta can lie from its clipped delta in a round of
    /// `clients` devices (`len` values): one integer step per word.
    pub fn rounding(&self, clients: usize, len: usize) -> Result<f64, SecAggError> {
        // Only the encoding matters here, not the graph.
        let params = RoundParams {
            round: 0,
            clients,
            neighbours: 0,
            threshold: 0,
            graph_seed: [0; 32],
            len: self.words(len),
            bits: self.modulus_bits,
        };
        let words = params.len as f64;
        Ok(words.sqrt() / self.task(params, 0, len).encoding()?.scale)
    }

    /// The parameters of round `round` with `clients` selected devices and `len` values per delta (one
    /// more word, the device's weight, with `weight_cap`), each device adding noise of standard deviation
    /// `noise_steps` to each value: graph seeded from the engine's seed and the round, modulus the fewest
    /// bits that cannot wrap.
    pub fn params(
        &self,
        seed: u64,
        round: RoundId,
        clients: usize,
        len: usize,
        noise_steps: u64,
    ) -> Result<RoundParams, SecAggError> {
        let (k0, t0) = default_params(clients);
        let k = if self.neighbours == 0 {
            k0
        } else {
            self.neighbours
        };
        let t = match (self.threshold, self.neighbours) {
            (0, 0) => t0,
            (0, _) => k.min(clients.saturating_sub(1)) / 2 + 1,
            (t, _) => t,
        };
        let mut h = Sha256::new();
        h.update(b"starling secagg graph");
        h.update(seed.to_le_bytes());
        h.update(round.0.to_le_bytes());
        let params = RoundParams {
            round: round.0,
            clients,
            neighbours: k,
            threshold: t,
            graph_seed: h.finalize().into(),
            len: self.words(len),
            bits: if self.rotated() {
                self.modulus_bits
            } else {
                self.encoding(clients)?
                    .with_noise(noise_steps as f64)?
                    .modulus_bits()
            },
        };
        params.graph()?;
        // The devices' encoding for this round (refused when the modulus is too narrow for it).
        self.task(params.clone(), 0, len).encoding()?;
        Ok(params)
    }
}

/// The parameters of an edge aggregator's cohort of `clients` devices in a round whose root handed the
/// aggregator `template` (the root's secure-aggregation settings for the round: encoding, words, graph
/// seed): the neighbour graph and threshold sized for the cohort (Bell et al.'s ≈ 3·log₂ n, a majority
/// of the neighbours), the graph seed bound to the aggregator (`salt`: its key's fingerprint), and the
/// fewest modulus bits a sum of `clients` encoded deltas cannot wrap (the root's modulus under the rotated
/// encoding, whose scale then grows for the smaller cohort). The aggregator keeps cohorts of at least
/// [`MIN_COHORT`].
pub fn cohort_params(
    template: &starling_protocol::message::SecAggTask,
    clients: usize,
    salt: &[u8],
) -> Result<RoundParams, SecAggError> {
    let (neighbours, threshold) = default_params(clients);
    let mut h = Sha256::new();
    h.update(b"starling secagg cohort graph");
    h.update(template.params.graph_seed);
    h.update(salt);
    let params = RoundParams {
        round: template.params.round,
        clients,
        neighbours,
        threshold,
        graph_seed: h.finalize().into(),
        len: template.params.len,
        bits: match template.rotated {
            Some(_) => template.params.bits,
            None => Encoding::new(template.clip(), template.value_bits, clients)?.modulus_bits(),
        },
    };
    params.graph()?;
    SecAggTask {
        params: params.clone(),
        ..template.clone()
    }
    .encoding()?;
    Ok(params)
}

/// Fewest devices whose inputs a secure sum may hold: a sum of two reveals each input to the other.
pub const MIN_COHORT: usize = 3;

/// Where a secure round is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SecAggPhase {
    /// Devices train, then send their public keys.
    Advertise,
    /// Devices send encrypted shares for their neighbours.
    Share,
    /// Devices upload masked inputs.
    Masked,
    /// Devices reveal shares.
    Unmask,
}

/// The phase's name in status documents and logs: `advertise`, `share`, `masked`, `unmask`.
impl std::fmt::Display for SecAggPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SecAggPhase::Advertise => "advertise",
            SecAggPhase::Share => "share",
            SecAggPhase::Masked => "masked",
            SecAggPhase::Unmask => "unmask",
        })
    }
}

/// One round's secure aggregation as persisted (public keys, ciphertexts, the running sum of masked
/// inputs and the revealed shares: never an input in the clear).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SecAggRound {
    /// The current phase.
    pub phase: SecAggPhase,
    /// When the current phase closes at the latest (after the advertise phase).
    pub phase_deadline: Millis,
    /// The SecAgg+ server.
    pub server: Server,
    /// Devices whose reveals arrived.
    pub revealed: BTreeSet<ClientId>,
    /// The shares revealed so far.
    pub reveals: Vec<Reveal>,
    /// Why the round cannot finish, once it cannot (the engine abandons it).
    pub failed: Option<String>,
}

/// What a step did.
#[derive(Debug, Clone, PartialEq)]
pub struct StepOutcome {
    /// The answer for the device.
    pub reply: SecAggReply,
    /// Whether the round's state changed (the driver persists it before answering).
    pub changed: bool,
}

impl SecAggRound {
    /// A round in its advertise phase.
    pub fn new(params: RoundParams) -> Result<Self, SecAggError> {
        Ok(Self {
            phase: SecAggPhase::Advertise,
            phase_deadline: Millis::MAX,
            server: Server::new(params)?,
            revealed: BTreeSet::new(),
            reveals: Vec::new(),
            failed: None,
        })
    }

    /// The round's parameters.
    pub fn params(&self) -> &RoundParams {
        self.server.params()
    }

    /// One device's step; `retry_after_ms` is what a device told to wait waits.
    pub fn step(
        &mut self,
        id: ClientId,
        step: SecAggStep,
        retry_after_ms: u64,
    ) -> Result<StepOutcome, SecAggError> {
        let wait = SecAggReply::Wait { retry_after_ms };
        let out = |reply, changed| Ok(StepOutcome { reply, changed });
        let excluded = |why: &str| {
            out(
                SecAggReply::Excluded {
                    reason: why.to_string(),
                },
                false,
            )
        };
        if let Some(why) = &self.failed {
            return excluded(why);
        }
        let advertised = self.server.advertised().contains_key(&id);
        let shared = self.server.has_shared(id);
        let has_reported = self.server.has_reported(id);
        match (step, self.phase) {
            (SecAggStep::Keys(keys), SecAggPhase::Advertise) => {
                if advertised {
                    if self.server.advertised().get(&id) == Some(&keys) {
                        return out(wait, false); // a retry
                    }
                    return Err(Malformed::OtherKeys(id).into());
                }
                self.server.advertise(id, keys)?;
                out(wait, true)
            }
            (SecAggStep::Keys(_), _) => excluded("the advertise phase is over"),
            (SecAggStep::Shares(msgs), SecAggPhase::Share) if advertised && !shared => {
                self.server.shares(id, msgs)?;
                out(wait, true)
            }
            (SecAggStep::Shares(_), SecAggPhase::Share) if shared => out(wait, false),
            (SecAggStep::Shares(_), _) => excluded("not in the share phase for this device"),
            (SecAggStep::Reveals(r), SecAggPhase::Unmask) if has_reported => {
                if self.revealed.contains(&id) {
                    return out(SecAggReply::Done, false);
                }
                if r.iter().any(|x| x.from != id) {
                    return Err(Malformed::RevealSender(id).into());
                }
                self.reveals.extend(r);
                self.revealed.insert(id);
                out(SecAggReply::Done, true)
            }
            (SecAggStep::Reveals(_), _) => excluded("not in the unmask phase for this device"),
            (SecAggStep::Next, SecAggPhase::Advertise) if advertised => out(wait, false),
            (SecAggStep::Next, SecAggPhase::Share) if advertised && !shared => {
                let neighbours = self.server.neighbours(id);
                let roster = neighbours
                    .into_iter()
                    .filter_map(|j| self.server.advertised().get(&j).map(|k| (j, *k)))
                    .collect();
                out(SecAggReply::Roster(roster), false)
            }
            (SecAggStep::Next, SecAggPhase::Share) if shared => out(wait, false),
            (SecAggStep::Next, SecAggPhase::Masked) if shared && !has_reported => out(
                SecAggReply::Mailbox(self.server.mailbox(id).to_vec()),
                false,
            ),
            (SecAggStep::Next, SecAggPhase::Masked) if has_reported => out(wait, false),
            (SecAggStep::Next, SecAggPhase::Unmask) if has_reported => {
                if self.revealed.contains(&id) {
                    out(SecAggReply::Done, false)
                } else {
                    let (dropped, reported) = self.server.unmask_request();
                    out(SecAggReply::Unmask { dropped, reported }, false)
                }
            }
            (SecAggStep::Next, _) => excluded("this device missed a phase of the round"),
        }
    }

    /// Adds a device's masked input (packed words) to the sum, in the masked phase.
    pub fn masked(&mut self, id: ClientId, packed: &[u8]) -> Result<(), SecAggError> {
        if self.phase != SecAggPhase::Masked {
            return Err(Malformed::OutOfPhase(id).into());
        }
        let p = self.server.params();
        let words = starling_secagg::mask::unpack(packed, p.bits, p.len)?;
        self.server.masked_input(id, &words)
    }

    /// Whether every device still expected in the current phase has answered (`expected` are the
    /// roster ids of the selected devices that did not decline, for the advertise phase).
    pub fn all_in(&self, expected: impl Iterator<Item = ClientId>) -> bool {
        let s = &self.server;
        let mut advertised = s.advertised().keys().copied();
        match self.phase {
            SecAggPhase::Advertise => {
                let keys = s.advertised();
                expected.into_iter().all(|c| keys.contains_key(&c))
            }
            SecAggPhase::Share => advertised.all(|c| s.has_shared(c)),
            SecAggPhase::Masked => advertised.all(|c| !s.has_shared(c) || s.has_reported(c)),
            SecAggPhase::Unmask => {
                advertised.all(|c| !s.has_reported(c) || self.revealed.contains(&c))
            }
        }
    }

    /// Closes the current phase at `now`: moves to the next one (`Ok(false)`), or says the round can
    /// be unmasked (`Ok(true)`), or fails with why the round must be abandoned (too few survivors:
    /// `need` is the most of the threshold and the engine's `min_updates`).
    pub fn close_phase(
        &mut self,
        now: Millis,
        timeout_ms: u64,
        min_updates: usize,
    ) -> Result<bool, String> {
        let need = self.params().threshold.max(min_updates);
        let (dropped, reported) = self.server.unmask_request();
        let (have, what) = match self.phase {
            SecAggPhase::Advertise => (self.server.advertised().len(), "advertised keys"),
            SecAggPhase::Share => (dropped.len() + reported.len(), "shared keys"),
            SecAggPhase::Masked => (reported.len(), "sent masked inputs"),
            SecAggPhase::Unmask => (self.revealed.len(), "revealed shares"),
        };
        if have < need {
            let why = format!("{have} devices {what}, {need} needed");
            self.failed = Some(why.clone());
            return Err(why);
        }
        self.phase_deadline = now.saturating_add(timeout_ms);
        self.phase = match self.phase {
            SecAggPhase::Advertise => SecAggPhase::Share,
            SecAggPhase::Share => SecAggPhase::Masked,
            SecAggPhase::Masked => SecAggPhase::Unmask,
            SecAggPhase::Unmask => return Ok(true),
        };
        Ok(false)
    }

    /// The sum of the reported inputs (reduced modulo `2^bits`) and how many devices it holds, once
    /// the reveals are in; an error when a secret lacks `t` shares.
    pub fn unmask(&self) -> Result<(Vec<u32>, usize), SecAggError> {
        let (_, reported) = self.server.unmask_request();
        Ok((self.server.unmask(&self.reveals)?, reported.len()))
    }
}
