//! Whole SecAgg+ rounds in memory with real X25519, ChaCha20-Poly1305 and Shamir: the unmasked sum
//! equals the plain sum exactly with 0%, 10% and 30% of the clients dropping at each phase; too few
//! survivors cannot unmask; a client refuses to reveal both shares of one peer; a masked input is
//! uniform (chi-square); tampered or misaddressed messages are refused.

use std::collections::BTreeMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use starling_secagg::graph::default_params;
use starling_secagg::{
    Client, ClientId, Inconsistent, Malformed, ParamsError, RoundParams, SecAggError, Server,
};

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    /// Advertised keys, then gone: never shares.
    Advertised,
    /// Shared keys, then gone: no masked input.
    Shared,
    /// Sent its masked input, then gone: does not help unmask.
    Reported,
}

fn params(n: usize, len: usize, seed: u8) -> RoundParams {
    params_bits(n, len, seed, 32)
}

fn params_bits(n: usize, len: usize, seed: u8, bits: u32) -> RoundParams {
    let (k, t) = default_params(n);
    RoundParams {
        round: 7,
        clients: n,
        neighbours: k,
        threshold: t,
        graph_seed: [seed; 32],
        len,
        bits,
    }
}

/// Runs a round in which the clients in `gone` drop after `phase`; returns the server's result and
/// the plain wrapping sum of the inputs that reached it.
fn round(
    p: &RoundParams,
    gone: &[ClientId],
    phase: Phase,
    seed: u64,
) -> (Result<Vec<u32>, SecAggError>, Vec<u32>) {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let m = starling_secagg::mask::modulus_mask(p.bits);
    let inputs: Vec<Vec<u32>> = (0..p.clients)
        .map(|_| (0..p.len).map(|_| rng.random::<u32>() & m).collect())
        .collect();
    let mut server = Server::new(p.clone()).unwrap();
    let mut clients: BTreeMap<ClientId, Client> = BTreeMap::new();
    for id in 0..p.clients as ClientId {
        let (c, keys) = Client::new(p.clone(), id, &mut rng).unwrap();
        server.advertise(id, keys).unwrap();
        clients.insert(id, c);
    }
    let alive = |id: &ClientId, after: Phase| !(gone.contains(id) && phase == after);
    clients.retain(|id, _| alive(id, Phase::Advertised));
    let advertised = server.advertised().clone();
    for (id, c) in clients.iter_mut() {
        let msgs = c.share_keys(&advertised, &mut rng).unwrap();
        server.shares(*id, msgs).unwrap();
    }
    clients.retain(|id, _| alive(id, Phase::Shared));
    let mut plain = vec![0u32; p.len];
    for (id, c) in clients.iter_mut() {
        c.receive_shares(server.mailbox(*id)).unwrap();
        let y = c.masked_input(&inputs[*id as usize]).unwrap();
        server.masked_input(*id, &y).unwrap();
        for (s, v) in plain.iter_mut().zip(&inputs[*id as usize]) {
            *s = s.wrapping_add(*v);
        }
    }
    clients.retain(|id, _| alive(id, Phase::Reported));
    let (dropped, reported) = server.unmask_request();
    let mut reveals = Vec::new();
    for c in clients.values_mut() {
        reveals.extend(c.unmask(&dropped, &reported).unwrap());
    }
    plain.iter_mut().for_each(|w| *w &= m);
    (server.unmask(&reveals), plain)
}

/// A server and every client of `p` through phase 2: keys advertised, shares handed to the server.
fn through_sharing(p: &RoundParams, rng: &mut ChaCha20Rng) -> (Server, Vec<Client>) {
    let mut server = Server::new(p.clone()).unwrap();
    let mut clients: Vec<Client> = (0..p.clients as ClientId)
        .map(|id| {
            let (c, k) = Client::new(p.clone(), id, rng).unwrap();
            server.advertise(id, k).unwrap();
            c
        })
        .collect();
    let adv = server.advertised().clone();
    for c in clients.iter_mut() {
        let m = c.share_keys(&adv, rng).unwrap();
        server.shares(c.id(), m).unwrap();
    }
    (server, clients)
}

fn sample(n: usize, fraction: f64, seed: u64) -> Vec<ClientId> {
    let mut ids: Vec<ClientId> = (0..n as ClientId).collect();
    rand::seq::SliceRandom::shuffle(&mut ids[..], &mut ChaCha20Rng::seed_from_u64(seed));
    ids.truncate((n as f64 * fraction).round() as usize);
    ids
}

#[test]
fn the_unmasked_sum_is_the_plain_sum_with_dropouts_at_every_phase() {
    let n = 60;
    let p = params(n, 257, 3);
    assert_eq!((p.neighbours, p.threshold), (18, 10));
    for phase in [Phase::Advertised, Phase::Shared, Phase::Reported] {
        for fraction in [0.0, 0.1, 0.3] {
            let gone = sample(n, fraction, 11);
            let (sum, plain) = round(&p, &gone, phase, 5);
            assert_eq!(sum.unwrap(), plain, "{phase:?} {fraction}");
        }
    }
    // The default scale of the issue: 100 clients, 30% gone after sending their inputs; and a
    // 16-bit modulus (eight-bit values of 100 clients), with masked inputs packed on the wire.
    let p = params(100, 64, 4);
    let (sum, plain) = round(&p, &sample(100, 0.3, 12), Phase::Reported, 6);
    assert_eq!(sum.unwrap(), plain);
    let p = params_bits(100, 64, 4, 16);
    let (sum, plain) = round(&p, &sample(100, 0.1, 14), Phase::Shared, 7);
    let sum = sum.unwrap();
    assert_eq!(sum, plain);
    assert!(sum.iter().all(|&w| w < 1 << 16));
    // A real delta: encode, mask, unmask, decode — the sum of the clients' values, within the
    // stochastic rounding of each.
    let enc = starling_secagg::mask::Encoding::new(0.5, 12, 30).unwrap();
    let bits = enc.modulus_bits();
    let p = params_bits(30, 100, 9, bits);
    let mut rng = ChaCha20Rng::seed_from_u64(15);
    let deltas: Vec<Vec<f32>> = (0..30)
        .map(|_| (0..100).map(|_| rng.random_range(-0.5f32..0.5)).collect())
        .collect();
    let (mut server, mut clients) = through_sharing(&p, &mut rng);
    for (c, d) in clients.iter_mut().zip(&deltas) {
        c.receive_shares(server.mailbox(c.id())).unwrap();
        let y = c.masked_input(&enc.encode(d, &mut rng)).unwrap();
        let wire = starling_secagg::mask::pack(&y, bits);
        assert_eq!(wire.len(), (100 * bits as usize).div_ceil(8));
        let y = starling_secagg::mask::unpack(&wire, bits, 100).unwrap();
        server.masked_input(c.id(), &y).unwrap();
    }
    let (dropped, reported) = server.unmask_request();
    let reveals: Vec<_> = clients
        .iter_mut()
        .flat_map(|c| c.unmask(&dropped, &reported).unwrap())
        .collect();
    let got = enc
        .decode_sum(&server.unmask(&reveals).unwrap(), bits)
        .unwrap();
    for (i, g) in got.iter().enumerate() {
        let want: f32 = deltas.iter().map(|d| d[i]).sum();
        assert!((g - want).abs() <= 30.0 / enc.scale as f32, "{g} vs {want}");
    }
}

#[test]
fn fewer_survivors_than_the_threshold_cannot_unmask() {
    let n = 30;
    let p = params(n, 16, 5);
    let (sum, _) = round(&p, &sample(n, 0.8, 13), Phase::Reported, 7);
    assert!(
        matches!(sum, Err(SecAggError::NotEnoughShares { .. })),
        "{sum:?}"
    );
}

#[test]
fn a_client_never_reveals_both_shares_of_one_peer() {
    let n = 12;
    let p = params(n, 8, 6);
    let mut rng = ChaCha20Rng::seed_from_u64(8);
    let (server, mut clients) = through_sharing(&p, &mut rng);
    for c in clients.iter_mut() {
        c.receive_shares(server.mailbox(c.id())).unwrap();
    }
    let everyone: Vec<ClientId> = (0..n as ClientId).collect();
    let c = &mut clients[0];
    let peer = p.graph().unwrap().of(0)[0];
    // A request naming the same peer as dropped and as reported.
    let r = c.unmask(&[peer], &everyone);
    assert_eq!(r, Err(Inconsistent::DroppedAndReported(peer).into()));
    // Reported first (its self-mask share revealed), then claimed dropped: refused.
    let first = c.unmask(&[], &everyone).unwrap();
    assert!(first.iter().any(|r| r.of == peer));
    let others: Vec<ClientId> = everyone.iter().copied().filter(|&v| v != peer).collect();
    let r = c.unmask(&[peer], &others);
    assert_eq!(r, Err(Inconsistent::OtherShareRevealed(peer).into()));
}

#[test]
fn a_masked_input_is_uniform() {
    // Client 0's input is all zeros: its masked words must look uniform (chi-square on the top
    // byte of 2^16 words, 255 degrees of freedom; 330.5 is the 0.1% critical value).
    let p = params(10, 1 << 16, 7);
    let mut rng = ChaCha20Rng::seed_from_u64(9);
    let (server, mut clients) = through_sharing(&p, &mut rng);
    clients[0].receive_shares(server.mailbox(0)).unwrap();
    let y = clients[0].masked_input(&vec![0; 1 << 16]).unwrap();
    let mut counts = [0f64; 256];
    for w in &y {
        counts[(w >> 24) as usize] += 1.0;
    }
    let expected = y.len() as f64 / 256.0;
    let chi2: f64 = counts
        .iter()
        .map(|c| (c - expected).powi(2) / expected)
        .sum();
    assert!(chi2 < 330.5, "chi-square {chi2}");
    // And the low byte too (the mask covers every bit).
    let mut counts = [0f64; 256];
    for w in &y {
        counts[(w & 0xff) as usize] += 1.0;
    }
    let chi2: f64 = counts
        .iter()
        .map(|c| (c - expected).powi(2) / expected)
        .sum();
    assert!(chi2 < 330.5, "chi-square {chi2}");
}

#[test]
fn tampered_and_misaddressed_messages_are_refused() {
    let p = params(8, 4, 8);
    let mut rng = ChaCha20Rng::seed_from_u64(10);
    let mut server = Server::new(p.clone()).unwrap();
    let mut clients: Vec<Client> = (0..8)
        .map(|id| {
            let (c, k) = Client::new(p.clone(), id, &mut rng).unwrap();
            server.advertise(id, k).unwrap();
            c
        })
        .collect();
    assert!(server.advertise(3, server.advertised()[&3]).is_err());
    let adv = server.advertised().clone();
    let mut msgs = clients[1].share_keys(&adv, &mut rng).unwrap();
    // Misaddressed: the server refuses to forward shares to a non-neighbour or for someone else.
    let mut wrong = msgs.clone();
    wrong[0].from = 2;
    assert!(server.shares(1, wrong).is_err());
    // Two messages to one neighbour, or one of the wrong size: refused (nothing unbounded is kept).
    let mut twice = msgs.clone();
    twice.push(msgs[0].clone());
    assert!(server.shares(1, twice).is_err());
    let mut long = msgs.clone();
    long[0].ciphertext.push(0);
    assert!(server.shares(1, long).is_err());
    // Tampered: the recipient's authentication fails.
    let to = msgs[0].to;
    msgs[0].ciphertext[5] ^= 1;
    let recipient = &mut clients[to as usize];
    recipient.share_keys(&adv, &mut rng).unwrap();
    let r = recipient.receive_shares(&msgs[..1]);
    assert_eq!(r, Err(Malformed::Unauthenticated(msgs[0].from).into()));
    // A masked input of the wrong length, or from a client that never shared.
    assert_eq!(
        server.masked_input(1, &[0; 4]).unwrap_err(),
        Malformed::UnexpectedInput(1).into()
    );
    // Parameters that cannot be safe: a threshold that is not a majority of the neighbours.
    let mut bad = p.clone();
    bad.threshold = 1;
    let k = bad.neighbours.min(bad.clients - 1);
    assert_eq!(
        Server::new(bad).err(),
        Some(ParamsError::NotMajority { t: 1, k }.into())
    );
}

fn roundtrip<T: serde::Serialize + serde::de::DeserializeOwned>(x: &T) -> T {
    let cfg = bincode::config::standard();
    let bytes = bincode::serde::encode_to_vec(x, cfg).unwrap();
    bincode::serde::decode_from_slice(&bytes, cfg).unwrap().0
}

#[test]
fn a_round_survives_persisting_every_party_between_phases() {
    let n = 16;
    let p = params(n, 32, 10);
    let mut rng = ChaCha20Rng::seed_from_u64(16);
    let inputs: Vec<Vec<u32>> = (0..n)
        .map(|_| (0..32).map(|_| rng.random()).collect())
        .collect();
    let mut server = Server::new(p.clone()).unwrap();
    let mut states = Vec::new();
    for id in 0..n as ClientId {
        let (c, k) = Client::new(p.clone(), id, &mut rng).unwrap();
        server.advertise(id, k).unwrap();
        states.push(roundtrip(&c.snapshot()));
    }
    server = roundtrip(&server);
    let adv = server.advertised().clone();
    for st in states.iter_mut() {
        let mut c = Client::restore(st.clone()).unwrap();
        let m = c.share_keys(&adv, &mut rng).unwrap();
        server.shares(c.id(), m).unwrap();
        *st = roundtrip(&c.snapshot());
    }
    server = roundtrip(&server);
    let mut plain = vec![0u32; 32];
    for (st, x) in states.iter_mut().zip(&inputs).skip(2) {
        // Clients 0 and 1 drop after sharing.
        let mut c = Client::restore(st.clone()).unwrap();
        c.receive_shares(server.mailbox(c.id())).unwrap();
        server
            .masked_input(c.id(), &c.masked_input(x).unwrap())
            .unwrap();
        *st = roundtrip(&c.snapshot());
        for (s, v) in plain.iter_mut().zip(x) {
            *s = s.wrapping_add(*v);
        }
    }
    server = roundtrip(&server);
    let (dropped, reported) = server.unmask_request();
    assert_eq!(dropped, vec![0, 1]);
    let reveals: Vec<_> = states[2..]
        .iter()
        .flat_map(|st| {
            Client::restore(st.clone())
                .unwrap()
                .unmask(&dropped, &reported)
                .unwrap()
        })
        .collect();
    assert_eq!(server.unmask(&reveals).unwrap(), plain);
    // A resumed client still refuses what it refused before: the reveal was persisted.
    let mut c = Client::restore(states[2].clone()).unwrap();
    let revealed = c.unmask(&dropped, &reported).unwrap();
    let peer = revealed
        .iter()
        .find(|r| r.kind == starling_secagg::ShareKind::SelfMask)
        .unwrap()
        .of;
    let mut again = Client::restore(roundtrip(&c.snapshot())).unwrap();
    let others: Vec<ClientId> = reported.iter().copied().filter(|&v| v != peer).collect();
    let r = again.unmask(&[peer], &others);
    assert_eq!(r, Err(Inconsistent::OtherShareRevealed(peer).into()));
}

#[test]
fn the_persisted_server_never_holds_an_input_in_the_clear() {
    // One client reports an input of a recognisable constant; the server state written to disk
    // (fixed-width encoding) holds its masked sum, in which the constant does not appear.
    let p = params(6, 1 << 12, 11);
    let mut rng = ChaCha20Rng::seed_from_u64(17);
    let (mut server, mut clients) = through_sharing(&p, &mut rng);
    clients[0].receive_shares(server.mailbox(0)).unwrap();
    let input = vec![0x5a5a_5a5au32; 1 << 12];
    server
        .masked_input(0, &clients[0].masked_input(&input).unwrap())
        .unwrap();
    let cfg = bincode::config::standard().with_fixed_int_encoding();
    let bytes = bincode::serde::encode_to_vec(&server, cfg).unwrap();
    let hits = bytes
        .windows(4)
        .filter(|w| *w == 0x5a5a_5a5au32.to_le_bytes())
        .count();
    assert!(
        hits < 2,
        "{hits} copies of the input word in the stored state"
    );
}
