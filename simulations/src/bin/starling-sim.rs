//! starling-sim: runs a whole federation on one machine — the real coordinator and, for every virtual
//! device, the real client session and LoRA training — on a simulated clock, and writes its metrics and
//! plots.
//!
//!   starling-sim run                              # the embedded default scenario
//!   starling-sim run scenarios/dp.toml --baselines --out runs/dp
//!   starling-sim run scenarios/byzantine.toml --transport quic --rounds 2
//!   starling-sim show-default                     # prints the default scenario

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Mutex;

use anyhow::Context;
use clap::{Parser, Subcommand};
use starling_simulations::sim::{self, report, scenario::Scenario, RoundMetrics, Transport};

#[derive(Parser)]
#[command(
    name = "starling-sim",
    about = "Simulates a Starling federation: real coordinator, real device sessions and training, simulated clock"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs a scenario (the embedded default without SCENARIO) and writes metrics and plots.
    Run {
        /// A scenario file (see scenarios/).
        scenario: Option<PathBuf>,
        /// The results folder (default: runs/<scenario name>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// How devices reach the coordinator.
        #[arg(long, value_enum, default_value_t = Transport::Memory)]
        transport: Transport,
        /// Also run the base model, centralized LoRA and local-only training as baselines.
        #[arg(long)]
        baselines: bool,
        /// Override the scenario's number of rounds.
        #[arg(long)]
        rounds: Option<u64>,
        /// Override the scenario's seed.
        #[arg(long)]
        seed: Option<u64>,
        /// Keep the coordinator's directory (sled store, keys, signed versions) in this folder.
        #[arg(long)]
        keep_coordinator: Option<PathBuf>,
        /// Threads training devices ahead of the simulated clock (default: one per core; 0: none, each
        /// training runs when it completes). The results are the same with any number.
        #[arg(long)]
        train_workers: Option<usize>,
    },
    /// Prints the embedded default scenario (a starting point for your own).
    ShowDefault,
}

static BAR: Mutex<Option<indicatif::ProgressBar>> = Mutex::new(None);

fn on_round(m: &RoundMetrics, total: u64) {
    let Ok(mut guard) = BAR.lock() else { return };
    let bar = guard.get_or_insert_with(|| {
        let b = if std::io::stderr().is_terminal() {
            indicatif::ProgressBar::new(total)
        } else {
            indicatif::ProgressBar::hidden()
        };
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "round {pos}/{len} {bar:30} [{elapsed_precise}] {msg}",
        ) {
            b.set_style(style);
        }
        b
    });
    bar.set_position(m.version);
    let acc = m
        .accuracy
        .map_or(String::new(), |a| format!(" acc {:.2}%", a * 100.0));
    let loss = m
        .test_loss
        .map_or(String::new(), |l| format!("loss {l:.4}"));
    bar.set_message(format!(
        "{loss}{acc} ε {:.3} ({} updates)",
        m.epsilon_user, m.participants
    ));
    if !bar.is_hidden() {
        return;
    }
    eprintln!(
        "round {}/{total}: {loss}{acc} ε {:.3}, {} of {} selected reported, {} dropped out",
        m.version, m.epsilon_user, m.participants, m.selected, m.dropouts
    );
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::ShowDefault => {
            print!("{}", sim::scenario::DEFAULT);
            Ok(())
        }
        Cmd::Run {
            scenario,
            out,
            transport,
            baselines,
            rounds,
            seed,
            keep_coordinator,
            train_workers,
        } => {
            let mut scen = match &scenario {
                Some(p) => Scenario::load(p)?,
                None => Scenario::default_scenario()?,
            };
            if let Some(r) = rounds {
                anyhow::ensure!(r > 0, "--rounds must be at least 1");
                scen.simulation.rounds = r;
            }
            if let Some(s) = seed {
                scen.simulation.seed = s;
            }
            let out = out.unwrap_or_else(|| PathBuf::from("runs").join(&scen.simulation.name));
            if let Some(k) = &keep_coordinator {
                anyhow::ensure!(
                    !k.exists(),
                    "{} already exists (the coordinator directory must be new)",
                    k.display()
                );
            }
            eprintln!(
                "starling-sim: scenario {} ({} rounds, seed {}, {:?} transport)",
                scen.simulation.name, scen.simulation.rounds, scen.simulation.seed, transport
            );
            let opts = sim::RunOptions {
                transport,
                baselines,
                scenario_dir: scenario
                    .as_ref()
                    .and_then(|p| p.parent().map(|d| d.to_path_buf())),
                work_dir: keep_coordinator,
                on_round: Some(on_round),
                train_workers,
            };
            let outcome = sim::run(&scen, &opts).context("simulation failed")?;
            if let Ok(mut g) = BAR.lock() {
                if let Some(b) = g.take() {
                    b.finish_and_clear();
                }
            }
            let files = report::write(&out, &outcome)?;
            print!("{}", report::table(&outcome));
            println!("results in {}: {}", out.display(), files.join(", "));
            Ok(())
        }
    }
}
