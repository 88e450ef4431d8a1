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

/// How the sampling rate of a benchmarked ledger's rounds behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LedgerPattern {
    /// Every round at one rate: a fixed population (one run of identical rounds, which the PLD
    /// accountant composes as one self-composition). Measured for PLD and RDP.
    Steady,
    /// The rate moves by 1 % every round, as a population that changes between rounds does: every round
    /// starts a new run and is composed onto the rounds before it by one convolution. PLD only (RDP
    /// sums either way).
    Varying,
}

/// Prints one JSON line per accountant and pattern for a coordinator's global ledger over `rounds` rounds
/// at rate `q` and multiplier `sigma`: the seconds of one round's accounting (preview before the round,
/// check and charge at aggregation: the coordinator's calls) at the first, middle and last round; of all
/// rounds; of the accountant's ε on the whole list afresh; of reading the ledger back at a restart, from
/// its entries alone and resumed from its checkpoint; and the checkpoint's time and size.
pub fn ledger(rounds: usize, q: f64, sigma: f64, patterns: &[LedgerPattern]) -> Result<()> {
    let budget = Budget {
        epsilon: 1e6,
        delta: 1e-5,
    };
    let rounds = rounds.max(1);
    let mut runs = Vec::new();
    for &p in patterns {
        runs.push((AccountantKind::Pld, p));
    }
    if patterns.contains(&LedgerPattern::Steady) {
        runs.push((AccountantKind::Rdp, LedgerPattern::Steady));
    }
    for (kind, pattern) in runs {
        let event = |r: usize| {
            let q = match pattern {
                LedgerPattern::Varying if r.is_multiple_of(2) => q * 1.01,
                _ => q,
            };
            DpEvent::new(q, sigma, 1)
        };
        let mut l = Ledger::new(LedgerScope::Global, budget, kind)?;
        let mut per_round = Vec::new();
        let total = Instant::now();
        for r in 1..=rounds {
            let t = Instant::now();
            let e = event(r)?;
            l.preview(e)?;
            l.check(e)?;
            l.charge(format!("round {r}"), e)?;
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
        // What a coordinator stores after a round that starts a run, and a restart resumed from it.
        let t = Instant::now();
        let checkpoint = l.checkpoint()?;
        let checkpoint_s = t.elapsed().as_secs_f64();
        // Its stored size is the PLD's bytes and a few dozen more.
        let checkpoint_bytes = checkpoint.as_ref().map(|c| c.before.len());
        let t = Instant::now();
        let resumed = Ledger::resume(
            LedgerScope::Global,
            budget,
            kind,
            back.entries().to_vec(),
            checkpoint.as_ref(),
        )?;
        let resume = t.elapsed().as_secs_f64();
        anyhow::ensure!(
            back.spent() == whole.epsilon
                && l.spent() == whole.epsilon
                && resumed.spent() == whole.epsilon,
            "the ledger's ε {} (read back {}, resumed {}) differs from the accountant's {} on its events",
            l.spent(),
            back.spent(),
            resumed.spent(),
            whole.epsilon
        );
        println!(
            "{}",
            serde_json::json!({
                "bench": "privacy_ledger", "accountant": kind, "pattern": pattern, "rounds": rounds,
                "sampling_rate": q, "noise_multiplier": sigma, "epsilon": whole.epsilon,
                "delta": budget.delta, "round_seconds": per_round, "all_rounds_seconds": total,
                "recompose_seconds": recompose, "restore_seconds": restore,
                "checkpoint_seconds": checkpoint_s, "checkpoint_pld_bytes": checkpoint_bytes,
                "restore_from_checkpoint_seconds": resume,
                "peak_rss_bytes": peak_rss(),
            })
        );
    }
    Ok(())
}
