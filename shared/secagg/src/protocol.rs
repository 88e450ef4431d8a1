//! The SecAgg+ round as two sans-IO state machines, [`Client`] and [`Server`]: they take and return
//! messages and never touch a socket, a clock or a disk (the round engine, the device session and
//! the simulator drive them).
//!
//! Phases (Bonawitz et al. 2017 with Bell et al. 2020's sparse graph):
//! 1. **Advertise keys**: each client draws two X25519 key pairs — `c` (encrypting shares) and `s`
//!    (pairwise masks) — and a self-mask seed `b`, and sends the public keys.
//! 2. **Share keys**: each client Shamir-shares its `s` secret key and `b` among its graph
//!    neighbours (threshold `t`), each pair of shares encrypted with ChaCha20-Poly1305 under the
//!    key agreed from the `c` keys; the server only forwards ciphertexts.
//! 3. **Masked input**: `y = x + PRG(b) + Σ_{neighbours j that shared} ±PRG(s_ij)` in Z_{2^32}
//!    (`+` when `i < j`): pairwise masks cancel between clients that both report.
//! 4. **Unmasking**: the server names the neighbours that dropped after sharing and the ones that
//!    reported; each responding client reveals its share of a dropped client's `s` key or of a
//!    reporting client's `b` — **never both for one client** (a client refuses a request naming a
//!    peer in both lists, or asking the other kind for a peer it already answered). With `t` shares
//!    the server removes the self masks and the dropped clients' pairwise masks: it learns only the
//!    sum. Fewer than `t` shares for any client needed: the round cannot be unmasked.

use std::collections::{BTreeMap, BTreeSet};

use rand::Rng;
use rayon::prelude::*;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};
use sha2::{Digest, Sha256};
use x25519_dalek::{PublicKey, StaticSecret};

use crate::graph::Graph;
use crate::mask::{apply_mask, modulus_mask};
use crate::shamir::{combine, split, Share};
use crate::{Inconsistent, Malformed, ParamsError, SecAggError};

/// A client's index in the round's roster (`0..n`).
pub type ClientId = u32;

/// The parameters every party of one round agrees on.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RoundParams {
    /// Round number (bound into every key derivation, nonce context and mask).
    pub round: u64,
    /// Clients in the roster.
    pub clients: usize,
    /// Neighbours per client (even, or ≥ clients − 1 for a complete graph).
    pub neighbours: usize,
    /// Shares needed to reconstruct a secret.
    pub threshold: usize,
    /// Seed of the neighbour graph (from the round's public randomness).
    pub graph_seed: [u8; 32],
    /// Words in an input vector.
    pub len: usize,
    /// The modulus is `2^bits` (1..=32; [`crate::mask::Encoding::modulus_bits`] gives the fewest
    /// that cannot wrap): inputs, masks and sums are reduced to `bits` bits, and masked inputs
    /// travel packed at that width.
    pub bits: u32,
}

impl RoundParams {
    /// Checks the parameters and returns the neighbour graph they describe.
    pub fn graph(&self) -> Result<Graph, SecAggError> {
        if !(1..=32).contains(&self.bits) {
            return Err(ParamsError::Modulus(self.bits).into());
        }
        let k = self.neighbours.min(self.clients.saturating_sub(1));
        if self.threshold == 0 || self.threshold > k || k > 255 {
            return Err(ParamsError::Threshold {
                t: self.threshold,
                k,
            }
            .into());
        }
        if self.threshold * 2 <= k {
            return Err(ParamsError::NotMajority {
                t: self.threshold,
                k,
            }
            .into());
        }
        Graph::new(self.clients, self.neighbours, self.graph_seed)
    }
}

/// A client's advertised public keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PublicKeys {
    /// X25519 key for share encryption.
    pub c: [u8; 32],
    /// X25519 key for pairwise masks.
    pub s: [u8; 32],
}

/// One client's shares for one neighbour, encrypted to it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EncryptedShares {
    /// Sender.
    pub from: ClientId,
    /// Recipient.
    pub to: ClientId,
    /// ChaCha20-Poly1305 ciphertext of (abscissa, share of `s`, share of `b`).
    pub ciphertext: Vec<u8>,
}

/// Which secret of a peer a share reconstructs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ShareKind {
    /// The self-mask seed `b` of a client that reported.
    SelfMask,
    /// The pairwise-mask secret key `s` of a client that dropped.
    MaskKey,
}

/// A share revealed in the unmasking phase.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Reveal {
    /// The client revealing it.
    pub from: ClientId,
    /// Whose secret it is a share of.
    pub of: ClientId,
    /// Which secret.
    pub kind: ShareKind,
    /// The share.
    pub share: Share,
}

/// A key shared by two clients, derived from an X25519 agreement and bound to the round and pair.
fn agree(
    sk: &StaticSecret,
    pk: &[u8; 32],
    label: &[u8],
    round: u64,
    a: ClientId,
    b: ClientId,
) -> Result<[u8; 32], SecAggError> {
    let shared = sk.diffie_hellman(&PublicKey::from(*pk));
    if !shared.was_contributory() {
        return Err(Malformed::LowOrderKey.into());
    }
    let (lo, hi) = (a.min(b), a.max(b));
    Ok(Sha256::new()
        .chain_update(b"starling-secagg/agree/v1")
        .chain_update(label)
        .chain_update(round.to_le_bytes())
        .chain_update(lo.to_le_bytes())
        .chain_update(hi.to_le_bytes())
        .chain_update(shared.as_bytes())
        .finalize()
        .into())
}

/// The mask context of a pair or of a client's self mask.
fn context(round: u64, what: &[u8], a: ClientId, b: ClientId) -> Vec<u8> {
    let mut c = round.to_le_bytes().to_vec();
    c.extend_from_slice(what);
    c.extend_from_slice(&a.min(b).to_le_bytes());
    c.extend_from_slice(&a.max(b).to_le_bytes());
    c
}

/// Nonce and associated data of a share message: distinct per direction, bound to the round.
fn seal_params(round: u64, from: ClientId, to: ClientId) -> (Nonce, Vec<u8>) {
    let mut n = [0u8; 12];
    n[..4].copy_from_slice(&from.to_le_bytes());
    n[4..8].copy_from_slice(&to.to_le_bytes());
    let mut aad = round.to_le_bytes().to_vec();
    aad.extend_from_slice(&from.to_le_bytes());
    aad.extend_from_slice(&to.to_le_bytes());
    (Nonce::assume_unique_for_key(n), aad)
}

fn aead(key: &[u8; 32]) -> Result<LessSafeKey, SecAggError> {
    UnboundKey::new(&CHACHA20_POLY1305, key)
        .map(LessSafeKey::new)
        .map_err(|_| Malformed::AeadKey.into())
}

/// Bytes of one encrypted share message: abscissa, two 32-byte shares, the 16-byte tag.
pub const SHARES_CIPHERTEXT_LEN: usize = 1 + 32 + 32 + 16;

/// The abscissa a client's shares carry for its `j`-th neighbour.
fn abscissa(neighbours: &[ClientId], to: ClientId) -> Option<u8> {
    neighbours
        .iter()
        .position(|&v| v == to)
        .map(|p| (p + 1) as u8)
}

/// A client's round state as plain data, for the device to persist between phases (it holds the
/// client's secret keys and seed: it stays on the device).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ClientState {
    params: RoundParams,
    id: ClientId,
    c_sk: [u8; 32],
    s_sk: [u8; 32],
    b: [u8; 32],
    peers: BTreeMap<ClientId, PublicKeys>,
    held: BTreeMap<ClientId, (Share, Share)>,
    revealed: BTreeMap<ClientId, ShareKind>,
}

/// One client's side of a round.
pub struct Client {
    params: RoundParams,
    id: ClientId,
    c_sk: StaticSecret,
    s_sk: StaticSecret,
    b: [u8; 32],
    neighbours: Vec<ClientId>,
    /// The round's graph (to check the abscissae neighbours give this client).
    graph: Graph,
    /// Advertised keys of the neighbours that advertised.
    peers: BTreeMap<ClientId, PublicKeys>,
    /// Shares held for neighbours: (share of their `s`, share of their `b`).
    held: BTreeMap<ClientId, (Share, Share)>,
    /// What this client has revealed of whom.
    revealed: BTreeMap<ClientId, ShareKind>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Client({} of round {})", self.id, self.params.round)
    }
}

impl Client {
    /// Phase 1: a client with fresh keys and self-mask seed, and the public keys to advertise.
    pub fn new(
        params: RoundParams,
        id: ClientId,
        rng: &mut impl Rng,
    ) -> Result<(Self, PublicKeys), SecAggError> {
        let graph = params.graph()?;
        let neighbours = graph.of(id);
        if neighbours.is_empty() {
            return Err(ParamsError::NotInRoster(id).into());
        }
        let c_sk = StaticSecret::from(rng.random::<[u8; 32]>());
        let s_sk = StaticSecret::from(rng.random::<[u8; 32]>());
        let keys = PublicKeys {
            c: PublicKey::from(&c_sk).to_bytes(),
            s: PublicKey::from(&s_sk).to_bytes(),
        };
        Ok((
            Self {
                params,
                id,
                c_sk,
                s_sk,
                b: rng.random(),
                neighbours,
                graph,
                peers: BTreeMap::new(),
                held: BTreeMap::new(),
                revealed: BTreeMap::new(),
            },
            keys,
        ))
    }

    /// The round's parameters.
    pub fn params(&self) -> &RoundParams {
        &self.params
    }

    /// This client's index.
    pub fn id(&self) -> ClientId {
        self.id
    }

    /// The state to persist (secret: it never leaves the device).
    pub fn snapshot(&self) -> ClientState {
        ClientState {
            params: self.params.clone(),
            id: self.id,
            c_sk: self.c_sk.to_bytes(),
            s_sk: self.s_sk.to_bytes(),
            b: self.b,
            peers: self.peers.clone(),
            held: self.held.clone(),
            revealed: self.revealed.clone(),
        }
    }

    /// A client resumed from a persisted state (checked against the round's graph).
    pub fn restore(state: ClientState) -> Result<Self, SecAggError> {
        let graph = state.params.graph()?;
        let neighbours = graph.of(state.id);
        if neighbours.is_empty() {
            return Err(ParamsError::NotInRoster(state.id).into());
        }
        if state
            .peers
            .keys()
            .chain(state.held.keys())
            .any(|p| !neighbours.contains(p))
        {
            return Err(Malformed::StateNeighbour.into());
        }
        Ok(Self {
            params: state.params,
            id: state.id,
            c_sk: StaticSecret::from(state.c_sk),
            s_sk: StaticSecret::from(state.s_sk),
            b: state.b,
            neighbours,
            graph,
            peers: state.peers,
            held: state.held,
            revealed: state.revealed,
        })
    }

    /// Phase 2: shares of `s` and `b` for every neighbour that advertised keys, each encrypted to it.
    pub fn share_keys(
        &mut self,
        advertised: &BTreeMap<ClientId, PublicKeys>,
        rng: &mut impl Rng,
    ) -> Result<Vec<EncryptedShares>, SecAggError> {
        let t = self.params.threshold;
        self.peers = self
            .neighbours
            .iter()
            .filter_map(|v| advertised.get(v).map(|k| (*v, *k)))
            .collect();
        if self.peers.len() < t {
            return Err(SecAggError::NotEnoughShares {
                have: self.peers.len(),
                need: t,
            });
        }
        let distinct: BTreeSet<[u8; 32]> = self.peers.values().flat_map(|k| [k.c, k.s]).collect();
        if distinct.len() != 2 * self.peers.len() {
            return Err(Malformed::ReplayedKey.into());
        }
        let k = self.neighbours.len();
        let s_shares = split(&self.s_sk.to_bytes(), t, k, rng)?;
        let b_shares = split(&self.b, t, k, rng)?;
        let round = self.params.round;
        let mut out = Vec::with_capacity(self.peers.len());
        for (&to, keys) in &self.peers {
            // Peers were taken from the neighbour list, so each has an abscissa.
            let Some(x) = abscissa(&self.neighbours, to) else {
                continue;
            };
            let (s, b) = (&s_shares[x as usize - 1], &b_shares[x as usize - 1]);
            let mut plain = Vec::with_capacity(1 + 64 + 16);
            plain.push(s.x);
            plain.extend_from_slice(&s.y);
            plain.extend_from_slice(&b.y);
            let key = agree(&self.c_sk, &keys.c, b"enc", round, self.id, to)?;
            let (nonce, aad) = seal_params(round, self.id, to);
            aead(&key)?
                .seal_in_place_append_tag(nonce, Aad::from(aad), &mut plain)
                .map_err(|_| SecAggError::from(Malformed::Sealing))?;
            out.push(EncryptedShares {
                from: self.id,
                to,
                ciphertext: plain,
            });
        }
        Ok(out)
    }

    /// Phase 2, receiving: decrypts the shares neighbours sent this client. A message from a
    /// non-neighbour, to another client, or that fails authentication is refused.
    pub fn receive_shares(&mut self, msgs: &[EncryptedShares]) -> Result<(), SecAggError> {
        let round = self.params.round;
        for m in msgs {
            let keys = self
                .peers
                .get(&m.from)
                .filter(|_| m.to == self.id)
                .ok_or_else(|| {
                    SecAggError::from(Malformed::Misaddressed {
                        from: m.from,
                        to: m.to,
                        me: self.id,
                    })
                })?;
            let key = agree(&self.c_sk, &keys.c, b"enc", round, m.from, self.id)?;
            let (nonce, aad) = seal_params(round, m.from, self.id);
            let mut buf = m.ciphertext.clone();
            let plain = aead(&key)?
                .open_in_place(nonce, Aad::from(aad), &mut buf)
                .map_err(|_| SecAggError::from(Malformed::Unauthenticated(m.from)))?;
            let expected_x = abscissa(&self.graph.of(m.from), self.id);
            if plain.len() != 65 || Some(plain[0]) != expected_x {
                return Err(Malformed::BadShares(m.from).into());
            }
            let x = plain[0];
            self.held.insert(
                m.from,
                (
                    Share {
                        x,
                        y: plain[1..33].to_vec(),
                    },
                    Share {
                        x,
                        y: plain[33..65].to_vec(),
                    },
                ),
            );
        }
        Ok(())
    }

    /// Phase 3: the masked input `x + PRG(b) + Σ ±PRG(s_ij)` over the neighbours whose shares this
    /// client holds (they are the ones that reached phase 2).
    pub fn masked_input(&self, input: &[u32]) -> Result<Vec<u32>, SecAggError> {
        if input.len() != self.params.len {
            return Err(Malformed::InputLength {
                got: input.len(),
                want: self.params.len,
            }
            .into());
        }
        if self.held.len() < self.params.threshold {
            return Err(SecAggError::NotEnoughShares {
                have: self.held.len(),
                need: self.params.threshold,
            });
        }
        let round = self.params.round;
        let mut y = input.to_vec();
        apply_mask(
            &self.b,
            &context(round, b"self", self.id, self.id),
            1,
            &mut y,
        );
        for &j in self.held.keys() {
            let keys = self.peers.get(&j).ok_or(Malformed::NoKeys(j))?;
            let seed = agree(&self.s_sk, &keys.s, b"mask", round, self.id, j)?;
            let sign = if self.id < j { 1 } else { -1 };
            apply_mask(&seed, &context(round, b"pair", self.id, j), sign, &mut y);
        }
        let m = modulus_mask(self.params.bits);
        y.iter_mut().for_each(|w| *w &= m);
        Ok(y)
    }

    /// Phase 4: the shares the server asks for — of `s` for each neighbour in `dropped`, of `b` for
    /// each neighbour in `reported` — unless the request is inconsistent: a peer in both lists, a
    /// peer asked the other kind of than before, or fewer reporting clients than the threshold.
    pub fn unmask(
        &mut self,
        dropped: &[ClientId],
        reported: &[ClientId],
    ) -> Result<Vec<Reveal>, SecAggError> {
        let d: BTreeSet<ClientId> = dropped.iter().copied().collect();
        let r: BTreeSet<ClientId> = reported.iter().copied().collect();
        if let Some(both) = d.intersection(&r).next() {
            return Err(Inconsistent::DroppedAndReported(*both).into());
        }
        if r.len() < self.params.threshold {
            return Err(SecAggError::NotEnoughShares {
                have: r.len(),
                need: self.params.threshold,
            });
        }
        let mut out = Vec::new();
        for (set, kind) in [(&d, ShareKind::MaskKey), (&r, ShareKind::SelfMask)] {
            for &peer in set {
                let Some((s, b)) = self.held.get(&peer) else {
                    continue; // not a neighbour that shared with this client
                };
                if self.revealed.get(&peer).is_some_and(|&k| k != kind) {
                    return Err(Inconsistent::OtherShareRevealed(peer).into());
                }
                out.push(Reveal {
                    from: self.id,
                    of: peer,
                    kind,
                    share: if kind == ShareKind::MaskKey {
                        s.clone()
                    } else {
                        b.clone()
                    },
                });
            }
        }
        for r in &out {
            self.revealed.insert(r.of, r.kind);
        }
        Ok(out)
    }
}

/// The server's side of a round: forwards shares, sums masked inputs, unmasks the sum.
///
/// Serialisable, so the coordinator can persist it between phases: it holds public keys, ciphertexts
/// only the recipients can open, and the running sum of masked inputs — never an input in the clear.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Server {
    params: RoundParams,
    graph: Graph,
    keys: BTreeMap<ClientId, PublicKeys>,
    mailbox: BTreeMap<ClientId, Vec<EncryptedShares>>,
    shared: BTreeSet<ClientId>,
    sum: Vec<u32>,
    reported: BTreeSet<ClientId>,
}

impl Server {
    /// A server for one round.
    pub fn new(params: RoundParams) -> Result<Self, SecAggError> {
        let graph = params.graph()?;
        let sum = vec![0; params.len];
        Ok(Self {
            params,
            graph,
            keys: BTreeMap::new(),
            mailbox: BTreeMap::new(),
            shared: BTreeSet::new(),
            sum,
            reported: BTreeSet::new(),
        })
    }

    /// Phase 1: records a client's public keys (once).
    pub fn advertise(&mut self, id: ClientId, keys: PublicKeys) -> Result<(), SecAggError> {
        if id as usize >= self.params.clients || self.keys.contains_key(&id) {
            return Err(Malformed::UnexpectedKeys(id).into());
        }
        self.keys.insert(id, keys);
        Ok(())
    }

    /// The round's parameters.
    pub fn params(&self) -> &RoundParams {
        &self.params
    }

    /// A client's neighbours in the round's graph (empty for an id outside the roster).
    pub fn neighbours(&self, id: ClientId) -> Vec<ClientId> {
        self.graph.of(id)
    }

    /// The running sum of the masked inputs received (all a persisted state holds of any input).
    pub fn masked_sum(&self) -> &[u32] {
        &self.sum
    }

    /// Whether a client's shares were taken.
    pub fn has_shared(&self, id: ClientId) -> bool {
        self.shared.contains(&id)
    }

    /// Whether a client's masked input is in the sum.
    pub fn has_reported(&self, id: ClientId) -> bool {
        self.reported.contains(&id)
    }

    /// The keys advertised so far (what every client gets at the end of phase 1).
    pub fn advertised(&self) -> &BTreeMap<ClientId, PublicKeys> {
        &self.keys
    }

    /// Phase 2: takes a client's encrypted shares for forwarding.
    pub fn shares(
        &mut self,
        from: ClientId,
        msgs: Vec<EncryptedShares>,
    ) -> Result<(), SecAggError> {
        if !self.keys.contains_key(&from) || self.shared.contains(&from) {
            return Err(Malformed::UnexpectedShares(from).into());
        }
        let neighbours = self.graph.of(from);
        let mut to = BTreeSet::new();
        for m in &msgs {
            if m.from != from
                || !neighbours.contains(&m.to)
                || !to.insert(m.to)
                || m.ciphertext.len() != SHARES_CIPHERTEXT_LEN
            {
                return Err(Malformed::ShareMessage {
                    from,
                    to: m.to,
                    len: SHARES_CIPHERTEXT_LEN,
                }
                .into());
            }
        }
        for m in msgs {
            self.mailbox.entry(m.to).or_default().push(m);
        }
        self.shared.insert(from);
        Ok(())
    }

    /// The shares forwarded to `to` at the end of phase 2.
    pub fn mailbox(&self, to: ClientId) -> &[EncryptedShares] {
        self.mailbox.get(&to).map_or(&[], Vec::as_slice)
    }

    /// Phase 3: adds a client's masked input to the running sum.
    pub fn masked_input(&mut self, from: ClientId, y: &[u32]) -> Result<(), SecAggError> {
        if !self.shared.contains(&from)
            || self.reported.contains(&from)
            || y.len() != self.params.len
        {
            return Err(Malformed::UnexpectedInput(from).into());
        }
        for (s, v) in self.sum.iter_mut().zip(y) {
            *s = s.wrapping_add(*v);
        }
        self.reported.insert(from);
        Ok(())
    }

    /// Phase 4, asking: the clients that shared but did not report, and the ones that reported.
    pub fn unmask_request(&self) -> (Vec<ClientId>, Vec<ClientId>) {
        (
            self.shared.difference(&self.reported).copied().collect(),
            self.reported.iter().copied().collect(),
        )
    }

    /// Phase 4, finishing: removes the masks with the revealed shares and returns the sum of the
    /// reported inputs. Fails (the round is abandoned) when any secret lacks `t` valid shares.
    pub fn unmask(&self, reveals: &[Reveal]) -> Result<Vec<u32>, SecAggError> {
        let t = self.params.threshold;
        let round = self.params.round;
        let (dropped, reported) = self.unmask_request();
        // Valid shares only: from a reporting neighbour, at the abscissa the owner gave it.
        let mut by: BTreeMap<(ClientId, bool), Vec<Share>> = BTreeMap::new();
        let mut seen = BTreeSet::new();
        for r in reveals {
            let of = r.of as usize;
            let valid = of < self.graph.len()
                && self.reported.contains(&r.from)
                && abscissa(&self.graph.of(r.of), r.from) == Some(r.share.x)
                && r.share.y.len() == 32
                && seen.insert((r.from, r.of));
            if valid {
                by.entry((r.of, r.kind == ShareKind::SelfMask))
                    .or_default()
                    .push(r.share.clone());
            }
        }
        let secret = |of: ClientId, self_mask: bool| -> Result<[u8; 32], SecAggError> {
            let shares = by.get(&(of, self_mask)).map_or(&[][..], Vec::as_slice);
            let bytes = combine(shares, t)?;
            bytes
                .try_into()
                .map_err(|_| SecAggError::from(Malformed::SecretLength))
        };
        // Every mask to take off: (seed, context, sign). Reconstruction is cheap; expanding the
        // masks is the work, spread over the threads (each adds into its own buffer).
        let mut masks: Vec<([u8; 32], Vec<u8>, i8)> = Vec::new();
        for &v in &reported {
            masks.push((secret(v, true)?, context(round, b"self", v, v), -1));
        }
        for &u in &dropped {
            let s_sk = StaticSecret::from(secret(u, false)?);
            for v in self.graph.of(u) {
                if !self.reported.contains(&v) {
                    continue;
                }
                let pk = self.keys.get(&v).ok_or(Malformed::NoKeys(v))?;
                let seed = agree(&s_sk, &pk.s, b"mask", round, u, v)?;
                // v added its side with sign + if v < u: take it off.
                let sign = if v < u { -1 } else { 1 };
                masks.push((seed, context(round, b"pair", u, v), sign));
            }
        }
        let threads = rayon::current_num_threads().max(1);
        let per = masks.len().div_ceil(threads).max(1);
        let partials: Vec<Vec<u32>> = masks
            .par_chunks(per)
            .map(|chunk| {
                let mut acc = vec![0u32; self.params.len];
                for (seed, ctx, sign) in chunk {
                    apply_mask(seed, ctx, *sign, &mut acc);
                }
                acc
            })
            .collect();
        let mut sum = self.sum.clone();
        for p in partials {
            for (s, v) in sum.iter_mut().zip(p) {
                *s = s.wrapping_add(v);
            }
        }
        let m = modulus_mask(self.params.bits);
        sum.iter_mut().for_each(|w| *w &= m);
        Ok(sum)
    }
}
