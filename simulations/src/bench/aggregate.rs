//! Aggregation benchmark: FedAvg over K = 100 deltas of 1M f32, the root combining K = 100 edge
//! aggregators' partial sums of 1M values (the hierarchical round's root work), trimmed mean and median over
//! K = 20, each beside a plain copy of the same bytes in the same run (the memory-bandwidth ceiling). GB/s
//! counts the input bytes read.

use std::time::Instant;

use super::peak_rss;
use rayon::prelude::*;
use starling_coordinator::round_core::{PartialSum, RoundInput};
use starling_coordinator::strategy::{ClientUpdate, FedAvg, Median, Strategy, TrimmedMean};

/// Sizes of the aggregation benchmark.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Parameters per delta.
    #[arg(long, default_value_t = 1 << 20)]
    pub params: usize,
    /// Deltas for FedAvg.
    #[arg(long, default_value_t = 100)]
    pub fedavg_k: usize,
    /// Partial sums the root combines.
    #[arg(long, default_value_t = 100)]
    pub partials: usize,
    /// Deltas for the robust rules.
    #[arg(long, default_value_t = 20)]
    pub robust_k: usize,
    /// Timed repetitions (the best is reported).
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
}

/// The fastest of `repeats` runs of `f`, in seconds.
pub fn best(repeats: usize, mut f: impl FnMut()) -> f64 {
    (0..repeats.max(1))
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// Copies every delta into one destination buffer, in parallel chunks: the same bytes read as aggregation.
fn memcpy_all(deltas: &[Vec<f32>], dst: &mut [f32]) {
    for d in deltas {
        dst.par_chunks_mut(16 * 1024)
            .zip(d.par_chunks(16 * 1024))
            .for_each(|(o, i)| o.copy_from_slice(i));
    }
}

/// Runs the aggregation benchmark; prints one line per strategy.
pub fn run(a: &Args) -> anyhow::Result<()> {
    let threads = rayon::current_num_threads();
    let make = |k: usize| -> Vec<Vec<f32>> {
        (0..k)
            .map(|c| {
                (0..a.params)
                    .map(|i| ((i * 31 + c * 17) % 1000) as f32 * 1e-6 - 5e-4)
                    .collect()
            })
            .collect()
    };
    let report = |name: &str, k: usize, secs: f64, copy_secs: f64| {
        let bytes = (k * a.params * 4) as f64;
        println!(
            "{}",
            serde_json::json!({
                "bench": "aggregate", "strategy": name, "k": k, "params": a.params, "seconds": secs,
                "gb_per_s": bytes / secs / 1e9, "memcpy_gb_per_s": bytes / copy_secs / 1e9,
                "fraction_of_memcpy": copy_secs / secs, "threads": threads, "peak_rss_bytes": peak_rss(),
            })
        );
    };
    let mut dst = vec![0f32; a.params];

    let deltas = make(a.fedavg_k);
    let ups: Vec<ClientUpdate<'_>> = deltas
        .iter()
        .enumerate()
        .map(|(i, d)| ClientUpdate {
            num_examples: 10 + i as u64,
            delta: d,
        })
        .collect();
    let mut fedavg = FedAvg::new(1.0, 0.0)?;
    let secs = best(a.repeats, || {
        std::hint::black_box(fedavg.aggregate(&ups).map(|v| v.len()).unwrap_or(0));
    });
    let copy = best(a.repeats, || memcpy_all(&deltas, &mut dst));
    report("fedavg", a.fedavg_k, secs, copy);
    drop(ups);
    drop(deltas);

    let sums = make(a.partials);
    let partials: Vec<PartialSum> = sums
        .iter()
        .map(|s| PartialSum {
            sum: s.clone(),
            count: 10,
            weight: 10.0,
            loss: 1.0,
        })
        .collect();
    drop(sums);
    let secs = best(a.repeats, || {
        std::hint::black_box(
            RoundInput::from_partials(&partials, a.params).map_or(0, |i| i.count()),
        );
    });
    let sums: Vec<Vec<f32>> = partials.into_iter().map(|p| p.sum).collect();
    let copy = best(a.repeats, || memcpy_all(&sums, &mut dst));
    report("combine-partial-sums", a.partials, secs, copy);
    drop(sums);

    let deltas = make(a.robust_k);
    let ups: Vec<ClientUpdate<'_>> = deltas
        .iter()
        .map(|d| ClientUpdate {
            num_examples: 1,
            delta: d,
        })
        .collect();
    let copy = best(a.repeats, || memcpy_all(&deltas, &mut dst));
    let mut tm = TrimmedMean::new(0.1)?;
    let secs = best(a.repeats, || {
        std::hint::black_box(tm.aggregate(&ups).map(|v| v.len()).unwrap_or(0));
    });
    report("trimmed-mean(0.1)", a.robust_k, secs, copy);
    let secs = best(a.repeats, || {
        std::hint::black_box(Median.aggregate(&ups).map(|v| v.len()).unwrap_or(0));
    });
    report("median", a.robust_k, secs, copy);
    Ok(())
}
