//! Gaussian-noise benchmark: Starling's exact sampler beside opendp's own on the same vectors.

use std::time::Instant;

use anyhow::Result;
use starling_privacy::noise::{invoke_opendp, opendp_gaussian};
use starling_privacy::GaussianMechanism;

use super::peak_rss;

/// Prints one JSON line per (sampler, size): samples/s and the time to noise the vector once.
pub fn run(sizes: &[usize], opendp_size: usize, sigma: f64, repeats: usize) -> Result<()> {
    let threads = rayon::current_num_threads();
    let line = |sampler: &str, k: Option<i32>, n: usize, secs: f64| {
        println!(
            "{}",
            serde_json::json!({
                "bench": "privacy", "sampler": sampler, "noise_multiplier": sigma, "granularity_exponent": k,
                "size": n, "seconds": secs, "samples_per_s": n as f64 / secs,
                "seconds_per_1m": secs * 1e6 / n as f64, "threads": threads, "peak_rss_bytes": peak_rss(),
            })
        );
    };
    for &n in sizes {
        let mech = GaussianMechanism::with_multiplier(1.0, sigma, n)?;
        let mut v: Vec<f32> = (0..n).map(|i| ((i % 97) as f32 - 48.0) * 1e-3).collect();
        let mut best = f64::INFINITY;
        for _ in 0..repeats {
            let t = Instant::now();
            mech.add_noise(&mut v)?;
            best = best.min(t.elapsed().as_secs_f64());
        }
        line("starling", Some(mech.granularity_exponent()), n, best);
    }
    let n = opendp_size.max(1);
    let v: Vec<f32> = (0..n).map(|i| ((i % 97) as f32 - 48.0) * 1e-3).collect();
    let ours = GaussianMechanism::with_multiplier(1.0, sigma, n)?;
    let t = Instant::now();
    invoke_opendp(ours.opendp_measurement(), &v)?;
    line(
        "opendp",
        Some(ours.granularity_exponent()),
        n,
        t.elapsed().as_secs_f64(),
    );
    // opendp with its own default granularity: what a caller of make_gaussian gets without choosing k.
    let default_k = opendp_gaussian(ours.scale(), n, None)?;
    let t = Instant::now();
    invoke_opendp(&default_k, &v)?;
    line("opendp_default_k", None, n, t.elapsed().as_secs_f64());
    Ok(())
}
