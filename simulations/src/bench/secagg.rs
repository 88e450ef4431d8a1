//! Secure-aggregation benchmark: whole SecAgg+ rounds in memory (real X25519, ChaCha20-Poly1305,
//! Shamir and ChaCha20 masks) with `clients` devices, a delta of `params` values, and a fraction of the
//! devices dropping after sharing their keys, so the coordinator must rebuild their pairwise masks. Each
//! population runs twice: the **per-value** encoding at an int8 delta's resolution (±128 steps per
//! value, clip at the deltas' largest value; exact, the modulus wide enough that no sum wraps) and the
//! **rotated** encoding at `--rotated-bits` (modular clipping, see `starling_secagg::mask`). The deltas
//! share a direction (`--shared`: each is `s·u + √(1−s²)·vᵢ` at norm 1, so two devices' cosine is s²).
//! Prints per-client compute time and bytes sent (with the ratio to a plain int8 upload of the same
//! delta, per-tensor scale, and to Starling's int8 upload, 64-value blocks), the coordinator's unmasking
//! time, and the decoded sum's relative error beside the error of summing the devices' int8 uploads.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::Result;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use rayon::prelude::*;
use starling_protocol::update::{decode_update, encode_update, AdapterSchema, TensorSpec};
use starling_secagg::graph::default_params;
use starling_secagg::mask::{pack, Encoding};
use starling_secagg::{Client, ClientId, RoundParams, Server};

use super::peak_rss;

/// One device's masked input with the seconds it took, the bytes it puts on the wire, its delta and
/// its int8 upload decoded.
type Masked = (ClientId, Vec<u32>, f64, usize, Vec<f32>, Vec<f32>);

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
    /// Modulus bits of the rotated encoding.
    #[arg(long, default_value_t = 15)]
    pub rotated_bits: u32,
    /// The deltas' shared direction (0: independent; 1: every device the same delta).
    #[arg(long, default_value_t = 0.3)]
    pub shared: f64,
}

/// Runs two rounds per population (per-value and rotated encoding) and prints one JSON line each.
pub fn run(a: &Args) -> Result<()> {
    anyhow::ensure!((0.0..=1.0).contains(&a.shared), "--shared lies in [0, 1]");
    for &n in &a.clients {
        let deltas = Deltas::new(a.params, a.shared);
        // ±128 steps per value up to the deltas' largest value: an int8 delta's resolution.
        let per_value = Encoding::new(deltas.largest, 7, n)?;
        round(n, a.params, a.dropout, "per-value", per_value, &deltas)?;
        let rotated = Encoding::rotated(1.0, 1.0, a.rotated_bits, n, a.params, [6; 32])?;
        round(n, a.params, a.dropout, "rotated", rotated, &deltas)?;
    }
    Ok(())
}

/// Device deltas of norm 1 sharing a direction: `s·u + √(1−s²)·vᵢ` with `u`, `vᵢ` random unit vectors.
struct Deltas {
    shared: Vec<f32>,
    s: f32,
    /// The largest value a delta is expected to have (6 standard deviations of one value).
    largest: f32,
}

impl Deltas {
    fn new(len: usize, s: f64) -> Self {
        let mut rng = ChaCha20Rng::seed_from_u64(77);
        Self {
            shared: unit(len, &mut rng),
            s: s as f32,
            largest: 6.0 / (len as f32).sqrt(),
        }
    }

    fn device(&self, rng: &mut ChaCha20Rng) -> Vec<f32> {
        let own = unit(self.shared.len(), rng);
        let r = (1.0 - self.s * self.s).sqrt();
        self.shared
            .iter()
            .zip(own)
            .map(|(u, v)| self.s * u + r * v)
            .collect()
    }
}

/// A random unit vector (Gaussian directions).
fn unit(len: usize, rng: &mut ChaCha20Rng) -> Vec<f32> {
    let v: Vec<f32> = (0..len)
        .map(|_| {
            let (a, b): (f64, f64) = (rng.random(), rng.random());
            ((-2.0 * (1.0 - a).ln()).sqrt() * (std::f64::consts::TAU * b).cos()) as f32
        })
        .collect();
    let norm = v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt() as f32;
    v.into_iter().map(|x| x / norm).collect()
}

fn round(
    n: usize,
    len: usize,
    dropout: f64,
    kind: &str,
    enc: Encoding,
    deltas: &Deltas,
) -> Result<()> {
    let (k, t) = default_params(n);
    let bits = enc.modulus_bits();
    let words = enc.words(len);
    let p = RoundParams {
        round: 1,
        clients: n,
        neighbours: k,
        threshold: t,
        graph_seed: [5; 32],
        len: words,
        bits,
    };
    let schema = AdapterSchema::new(vec![TensorSpec {
        name: "delta".into(),
        shape: vec![len as u64],
    }])?;
    let int8 = starling_protocol::update::Encoding::Int8 { block: 64 };
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
    // A few devices at a time, so only their masked inputs are in memory at once. Beside the secure
    // sum: the exact sum of the deltas, and the sum of their int8 uploads (decoded).
    let mut exact = vec![0f64; len];
    let mut int8_sum = vec![0f64; len];
    let batch = 2 * rayon::current_num_threads();
    for group in alive.chunks_mut(batch) {
        let outputs: Vec<Result<Masked>> = group
            .par_iter_mut()
            .map(|(c, crng)| {
                let delta = deltas.device(crng);
                let t0 = Instant::now();
                c.receive_shares(&mailboxes[&c.id()])?;
                let y = c.masked_input(&enc.encode(&delta, crng))?;
                let wire = pack(&y, bits);
                let secs = t0.elapsed().as_secs_f64();
                let upload = encode_update(&schema, &delta, int8, crng)?;
                let plain = decode_update(&upload, &schema, &Default::default())?;
                Ok((c.id(), y, secs, wire.len(), delta, plain))
            })
            .collect();
        for o in outputs {
            let (id, y, secs, bytes, delta, plain) = o?;
            client_s[id as usize] += secs;
            sent[id as usize] += bytes;
            server.masked_input(id, &y)?;
            for ((e, q), (d, p)) in exact
                .iter_mut()
                .zip(int8_sum.iter_mut())
                .zip(delta.iter().zip(plain))
            {
                *e += f64::from(*d);
                *q += f64::from(p);
            }
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
    let t0 = Instant::now();
    let decoded = enc.decode_sum(&sum, bits)?;
    let decode_s = t0.elapsed().as_secs_f64();
    let rel = |got: &mut dyn Iterator<Item = f64>| {
        let (mut err, mut norm) = (0f64, 0f64);
        for (g, w) in got.zip(&exact) {
            err += (g - w).powi(2);
            norm += w * w;
        }
        (err / norm).sqrt()
    };
    let secure_err = rel(&mut decoded.iter().map(|&v| f64::from(v)));
    let int8_err = rel(&mut int8_sum.iter().copied());
    let reporting: Vec<usize> = reported.iter().map(|&i| i as usize).collect();
    let mean = |v: &[f64]| reporting.iter().map(|&i| v[i]).sum::<f64>() / reporting.len() as f64;
    let mean_bytes =
        reporting.iter().map(|&i| sent[i] as f64).sum::<f64>() / reporting.len() as f64;
    // A plain int8 upload: one byte per value plus one 4-byte scale (header ignored); Starling's int8
    // upload has a scale per 64 values.
    let int8_bytes = len as f64 + 4.0;
    let starling_int8 = len as f64 + 4.0 * len.div_ceil(64) as f64;
    println!(
        "{}",
        serde_json::json!({
            "bench": "secagg", "encoding": kind, "clients": n, "params": len, "neighbours": k,
            "threshold": t, "modulus_bits": bits, "words": words, "shared": deltas.s,
            "dropped_after_sharing": dropped.len(), "reported": reported.len(),
            "client_seconds_mean": mean(&client_s), "client_bytes_sent_mean": mean_bytes,
            "client_bytes_vs_int8_upload": mean_bytes / int8_bytes,
            "client_bytes_vs_starling_int8_upload": mean_bytes / starling_int8,
            "sum_relative_error": secure_err, "int8_uploads_sum_relative_error": int8_err,
            "coordinator_unmask_seconds": unmask_s, "coordinator_decode_seconds": decode_s,
            "sum_words": sum.len(),
            "threads": rayon::current_num_threads(), "peak_rss_bytes": peak_rss(),
        })
    );
    Ok(())
}
