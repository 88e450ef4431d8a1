//! `starling-coordinator privacy`: budget planning for operators — ε of a planned DP-SGD or DP-FedAvg run, the
//! noise multiplier that meets a target ε, and ε of the distributed discrete Gaussian under secure aggregation.
//! Arithmetic only; it touches no store and no network.

use clap::{Args, Subcommand};
use starling_privacy::ddg::{self, DdgEvent};
use starling_privacy::{accountant, calibrate_noise_multiplier, AccountantKind, DpEvent};

/// Privacy planning commands.
#[derive(Subcommand)]
pub enum PrivacyCmd {
    /// ε of T steps of the Poisson-subsampled Gaussian mechanism.
    ///
    /// Example (DP-SGD, 1,000 steps at q = 1 %, σ = 1.1):
    ///   starling-coordinator privacy epsilon --sampling-rate 0.01 --noise-multiplier 1.1 --steps 1000 --delta 1e-5
    /// Example (user-level DP-FedAvg, 100 clients of 10,000 per round, 500 rounds):
    ///   starling-coordinator privacy epsilon --sampling-rate 0.01 --noise-multiplier 1.0 --steps 500 --delta 1e-6 --json
    #[command(verbatim_doc_comment)]
    Epsilon(EpsilonArgs),
    /// The smallest noise multiplier σ that keeps T steps at rate q within (ε, δ).
    ///
    /// Example:
    ///   starling-coordinator privacy noise --epsilon 3 --delta 1e-5 --sampling-rate 0.01 --steps 1000
    #[command(verbatim_doc_comment)]
    Noise(NoiseArgs),
    /// ε of T rounds of the distributed discrete Gaussian: n devices clip their deltas to L2 norm C, scale
    /// them to an integer grid, round stochastically and each add a discrete Gaussian share of standard
    /// deviation z·C/√n, summed under secure aggregation (Kairouz, Liu, Steinke 2021) — beside the
    /// continuous Gaussian's ε at the same z, the price of the grid.
    ///
    /// Example (100 devices a round of 300, a 41,000-value adapter, 2^10 steps per 0.05):
    ///   starling-coordinator privacy ddg-epsilon --clients 100 --clip 1 --noise-multiplier 1 --scale 20480 --dim 41000 --sampling-rate 0.33 --steps 12
    #[command(verbatim_doc_comment)]
    DdgEpsilon(DdgArgs),
}

/// Arguments of `privacy ddg-epsilon`.
#[derive(Args)]
pub struct DdgArgs {
    /// Devices whose noise shares are guaranteed to be in each round's sum.
    #[arg(long)]
    clients: u64,
    /// L2 clip bound C of one device's delta.
    #[arg(long)]
    clip: f64,
    /// Noise multiplier z: the shares add up to standard deviation z·C.
    #[arg(long)]
    noise_multiplier: f64,
    /// Integer grid steps per unit of the delta.
    #[arg(long)]
    scale: f64,
    /// Values in a delta.
    #[arg(long)]
    dim: u64,
    /// Poisson sampling rate of the devices.
    #[arg(long, default_value_t = 1.0)]
    sampling_rate: f64,
    /// Rounds.
    #[arg(long)]
    steps: u64,
    /// δ.
    #[arg(long, default_value_t = 1e-5)]
    delta: f64,
    /// One line of JSON.
    #[arg(long)]
    json: bool,
}

/// Arguments of `privacy epsilon`.
#[derive(Args)]
pub struct EpsilonArgs {
    /// Poisson sampling rate q (examples per step / examples, or clients per round / clients).
    #[arg(long)]
    sampling_rate: f64,
    /// Noise multiplier σ (noise standard deviation / clip bound).
    #[arg(long)]
    noise_multiplier: f64,
    /// Steps (DP-SGD) or rounds (DP-FedAvg).
    #[arg(long)]
    steps: u64,
    /// δ.
    #[arg(long, default_value_t = 1e-5)]
    delta: f64,
    /// Accountant: pld (tight) or rdp.
    #[arg(long, value_enum, default_value_t = AccountantKind::Pld)]
    accountant: AccountantKind,
    /// One line of JSON.
    #[arg(long)]
    json: bool,
}

/// Arguments of `privacy noise`.
#[derive(Args)]
pub struct NoiseArgs {
    /// Target ε.
    #[arg(long)]
    epsilon: f64,
    /// δ.
    #[arg(long, default_value_t = 1e-5)]
    delta: f64,
    /// Poisson sampling rate q.
    #[arg(long)]
    sampling_rate: f64,
    /// Steps or rounds.
    #[arg(long)]
    steps: u64,
    /// Accountant: pld (tight) or rdp.
    #[arg(long, value_enum, default_value_t = AccountantKind::Pld)]
    accountant: AccountantKind,
    /// One line of JSON.
    #[arg(long)]
    json: bool,
}

/// Runs one `privacy` command, printing its result.
pub fn run(cmd: PrivacyCmd) -> anyhow::Result<()> {
    match cmd {
        PrivacyCmd::Epsilon(a) => {
            let event = DpEvent::new(a.sampling_rate, a.noise_multiplier, a.steps)?;
            let spent = accountant::epsilon(&[event], a.delta, a.accountant)?;
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "epsilon": spent.epsilon, "delta": a.delta, "sampling_rate": a.sampling_rate,
                        "noise_multiplier": a.noise_multiplier, "steps": a.steps, "accountant": a.accountant,
                        "rdp_order": spent.rdp_order,
                    })
                );
            } else {
                println!(
                    "ε = {:.4} at δ = {:e} ({:?} accountant; q = {}, σ = {}, {} steps)",
                    spent.epsilon,
                    a.delta,
                    a.accountant,
                    a.sampling_rate,
                    a.noise_multiplier,
                    a.steps
                );
            }
        }
        PrivacyCmd::DdgEpsilon(a) => {
            if !(a.clients >= 1 && a.scale.is_finite() && a.scale > 0.0) {
                anyhow::bail!("ddg-epsilon needs --clients ≥ 1 and a positive --scale");
            }
            let local = a.noise_multiplier * a.clip * a.scale / (a.clients as f64).sqrt();
            let event = DdgEvent::new(
                a.clients,
                local,
                a.clip * a.scale,
                a.dim,
                a.sampling_rate,
                a.steps,
            )?;
            let (eps, order) = ddg::epsilon(&[event], a.delta)?;
            let gauss = DpEvent::new(a.sampling_rate, a.noise_multiplier, a.steps)
                .and_then(|e| accountant::epsilon(&[e], a.delta, AccountantKind::Rdp))?;
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "epsilon": eps, "rdp_order": order, "delta": a.delta, "clients": a.clients,
                        "local_sigma_grid": local, "l2_sensitivity_grid": event.l2_sensitivity,
                        "tau": event.tau(), "gaussian_epsilon": gauss.epsilon,
                        "sampling_rate": a.sampling_rate, "steps": a.steps,
                    })
                );
            } else {
                println!(
                    "ε = {eps:.4} at δ = {:e} (distributed discrete Gaussian, RDP order {order}; shares of σ = {local:.2} \
                     grid steps; the continuous Gaussian at z = {}: ε = {:.4})",
                    a.delta, a.noise_multiplier, gauss.epsilon
                );
            }
        }
        PrivacyCmd::Noise(a) => {
            let sigma = calibrate_noise_multiplier(
                a.epsilon,
                a.delta,
                a.sampling_rate,
                a.steps,
                a.accountant,
            )?;
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "noise_multiplier": sigma, "epsilon": a.epsilon, "delta": a.delta,
                        "sampling_rate": a.sampling_rate, "steps": a.steps, "accountant": a.accountant,
                    })
                );
            } else {
                println!(
                    "σ = {sigma:.4} keeps {} steps at q = {} within ε = {} at δ = {:e} ({:?} accountant)",
                    a.steps, a.sampling_rate, a.epsilon, a.delta, a.accountant
                );
            }
        }
    }
    Ok(())
}
