//! Privacy benchmarks: Starling's exact Gaussian sampler beside opendp's own on the same vectors, and the
//! global ledger's accounting cost per round and at a restart.

use std::time::Instant;

use anyhow::Result;
use starling_privacy::noise::{invoke_opendp, opendp_gaussian};
use starling_privacy::{
    accountant, AccountantKind, Budget, DpEvent, GaussianMechanism, Ledger, LedgerScope,
};

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

/// Prints one JSON line per accountant for a coordinator's global ledger over `rounds` rounds at sampling
/// rate `q` and multiplier `sigma`: the seconds of one round's accounting (preview before the round, check
/// and charge at aggregation: the coordinator's calls) at the first, middle and last round; the seconds of
/// composing the whole list afresh at the last round (a lower bound on what every one of those calls
/// cost before the ledger composed incrementally: that code also rebuilt each round's own PLD); and the
/// seconds to read the ledger back at a restart.
pub fn ledger(rounds: usize, q: f64, sigma: f64) -> Result<()> {
    let budget = Budget {
        epsilon: 1e6,
        delta: 1e-5,
    };
    let event = DpEvent::new(q, sigma, 1)?;
    for kind in [AccountantKind::Pld, AccountantKind::Rdp] {
        let mut l = Ledger::new(LedgerScope::Global, budget, kind)?;
        let mut per_round = Vec::new();
        let total = Instant::now();
        for r in 1..=rounds.max(1) {
            let t = Instant::now();
            l.preview(event)?;
            l.check(event)?;
            l.charge(format!("round {r}"), event)?;
            if r == 1 || r == rounds.div_ceil(2) || r == rounds {
                per_round
                    .push(serde_json::json!({"round": r, "seconds": t.elapsed().as_secs_f64()}));
            }
        }
        let total = total.elapsed().as_secs_f64();
        let events: Vec<DpEvent> = l.entries().iter().map(|e| e.event).collect();
        let t = Instant::now();
        let whole = accountant::epsilon(&events, budget.delta, kind)?;
        let recompose = t.elapsed().as_secs_f64();
        let json = l.to_json();
        let t = Instant::now();
        let back = Ledger::from_json(&json)?;
        let restore = t.elapsed().as_secs_f64();
        anyhow::ensure!(
            back.spent() == whole.epsilon && l.spent() == whole.epsilon,
            "the ledger's ε {} differs from the accountant's {} on its events",
            l.spent(),
            whole.epsilon
        );
        println!(
            "{}",
            serde_json::json!({
                "bench": "privacy_ledger", "accountant": kind, "rounds": rounds, "sampling_rate": q,
                "noise_multiplier": sigma, "epsilon": whole.epsilon, "delta": budget.delta,
                "round_seconds": per_round, "all_rounds_seconds": total,
                "recompose_seconds": recompose, "restore_seconds": restore,
                "peak_rss_bytes": peak_rss(),
            })
        );
    }
    Ok(())
}
