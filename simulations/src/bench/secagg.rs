//! Secure-aggregation benchmark: whole SecAgg+ rounds in memory (real X25519, ChaCha20-Poly1305,
//! Shamir and ChaCha20 masks) with `clients` devices, a delta of `params` values encoded at 8 bits
//! (an int8 upload's range), and a fraction of the devices dropping after sharing their keys, so the
//! coordinator must rebuild their pairwise masks. Prints per-client compute time and bytes sent (with
//! the ratio to a plain int8 upload of the same delta) and the coordinator's unmasking time.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::Result;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use rayon::prelude::*;
use starling_secagg::graph::default_params;
use starling_secagg::mask::{pack, Encoding};
use starling_secagg::{Client, ClientId, RoundParams, Server};

use super::peak_rss;

/// One device's masked input with the seconds it took and the bytes it puts on the wire.
type Masked = (ClientId, Vec<u32>, f64, usize);

/// Sizes of the secure-aggregation benchmark.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Devices per round (each population is one round).
    #[arg(long, value_delimiter = ',', default_value = "100,1000")]
    pub clients: Vec<usize>,
    /// Values in each device's delta.
    #[arg(long, default_value_t = 1_000_000)]
    pub params: usize,
    /// Fraction of devices that drop after sharing their keys.
    #[arg(long, default_value_t = 0.1)]
    pub dropout: f64,
}

/// Runs one round per population and prints one JSON line each.
pub fn run(a: &Args) -> Result<()> {
    for &n in &a.clients {
        round(n, a.params, a.dropout)?;
    }
    Ok(())
}

fn round(n: usize, len: usize, dropout: f64) -> Result<()> {
    let (k, t) = default_params(n);
    // ±128 steps per value: the range of an int8 delta.
    let enc = Encoding::new(1.0, 7, n)?;
    let bits = enc.modulus_bits();
    let p = RoundParams {
        round: 1,
        clients: n,
        neighbours: k,
        threshold: t,
        graph_seed: [5; 32],
        len,
        bits,
    };
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let mut server = Server::new(p.clone())?;
    let mut clients: Vec<(Client, ChaCha20Rng)> = Vec::with_capacity(n);
    let mut client_s = vec![0f64; n];
    let mut sent = vec![0usize; n];
    for id in 0..n as ClientId {
        let mut crng = ChaCha20Rng::seed_from_u64(1000 + u64::from(id));
        let t0 = Instant::now();
        let (c, keys) = Client::new(p.clone(), id, &mut crng)?;
        client_s[id as usize] += t0.elapsed().as_secs_f64();
        sent[id as usize] += 64;
        server.advertise(id, keys)?;
        clients.push((c, crng));
    }
    let advertised = server.advertised().clone();
    for (c, crng) in clients.iter_mut() {
        let t0 = Instant::now();
        let msgs = c.share_keys(&advertised, crng)?;
        client_s[c.id() as usize] += t0.elapsed().as_secs_f64();
        sent[c.id() as usize] += msgs.iter().map(|m| m.ciphertext.len() + 8).sum::<usize>();
        server.shares(c.id(), msgs)?;
    }
    let gone = (n as f64 * dropout).round() as usize;
    let mut order: Vec<usize> = (0..n).collect();
    rand::seq::SliceRandom::shuffle(&mut order[..], &mut rng);
    let gone: Vec<usize> = order[..gone].to_vec();
    let mut alive: Vec<(Client, ChaCha20Rng)> = clients
        .into_iter()
        .filter(|(c, _)| !gone.contains(&(c.id() as usize)))
        .collect();
    // Each device encodes, masks and packs its delta (in parallel across devices: each one's own time
    // is measured).
    let mailboxes: BTreeMap<ClientId, Vec<_>> = alive
        .iter()
        .map(|(c, _)| (c.id(), server.mailbox(c.id()).to_vec()))
        .collect();
    // A few devices at a time, so only their masked inputs are in memory at once.
    let batch = 2 * rayon::current_num_threads();
    for group in alive.chunks_mut(batch) {
        let outputs: Vec<Result<Masked>> = group
            .par_iter_mut()
            .map(|(c, crng)| {
                let delta: Vec<f32> = (0..len)
                    .map(|_| crng.random_range(-0.01f32..0.01))
                    .collect();
                let t0 = Instant::now();
                c.receive_shares(&mailboxes[&c.id()])?;
                let y = c.masked_input(&enc.encode(&delta, crng))?;
                let wire = pack(&y, bits);
                Ok((c.id(), y, t0.elapsed().as_secs_f64(), wire.len()))
            })
            .collect();
        for o in outputs {
            let (id, y, secs, bytes) = o?;
            client_s[id as usize] += secs;
            sent[id as usize] += bytes;
            server.masked_input(id, &y)?;
        }
    }
    let (dropped, reported) = server.unmask_request();
    let mut reveals = Vec::new();
    for (c, _) in alive.iter_mut() {
        let t0 = Instant::now();
        let r = c.unmask(&dropped, &reported)?;
        client_s[c.id() as usize] += t0.elapsed().as_secs_f64();
        sent[c.id() as usize] += r.len() * (4 + 4 + 1 + 1 + 32);
        reveals.extend(r);
    }
    let t0 = Instant::now();
    let sum = server.unmask(&reveals)?;
    let unmask_s = t0.elapsed().as_secs_f64();
    let reporting: Vec<usize> = reported.iter().map(|&i| i as usize).collect();
    let mean = |v: &[f64]| reporting.iter().map(|&i| v[i]).sum::<f64>() / reporting.len() as f64;
    let mean_bytes =
        reporting.iter().map(|&i| sent[i] as f64).sum::<f64>() / reporting.len() as f64;
    // A plain int8 upload: one byte per value plus a 4-byte scale per 1M values (header ignored).
    let int8 = len as f64 + 4.0;
    println!(
        "{}",
        serde_json::json!({
            "bench": "secagg", "clients": n, "params": len, "neighbours": k, "threshold": t,
            "modulus_bits": bits, "dropped_after_sharing": dropped.len(), "reported": reported.len(),
            "client_seconds_mean": mean(&client_s), "client_bytes_sent_mean": mean_bytes,
            "client_bytes_vs_int8_upload": mean_bytes / int8,
            "coordinator_unmask_seconds": unmask_s, "sum_words": sum.len(),
            "threads": rayon::current_num_threads(), "peak_rss_bytes": peak_rss(),
        })
    );
    Ok(())
}
