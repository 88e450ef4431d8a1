//! Simulator scale: rounds per second and peak RSS of `starling-sim`'s engine with many virtual clients
//! (an IID split of the whole corpus, or for populations larger than its speeches an IID sample per
//! client; the shipped model, a fixed cohort per round; optionally behind `--aggregators` edge
//! aggregators). Each population runs in a child process of its own, so its peak RSS is its own.

use anyhow::{Context, Result};

use crate::sim::{self, scenario::Scenario, RunOptions};

/// Arguments of `starling-bench sim`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Virtual clients (one measurement, in its own process, per value).
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    pub clients: Vec<usize>,
    /// Clients per round.
    #[arg(long, default_value_t = 100)]
    pub per_round: usize,
    /// Rounds to time.
    #[arg(long, default_value_t = 3)]
    pub rounds: u64,
    /// Local steps per client and round.
    #[arg(long, default_value_t = 1)]
    pub local_steps: u32,
    /// How the corpus becomes clients: `iid` (its speeches dealt once: up to ~40,000 clients), `sampled`
    /// (each client draws 8 speeches with replacement: any population), or `auto` (iid up to 20,000
    /// clients, sampled above).
    #[arg(long, default_value = "auto")]
    pub partition: String,
    /// Edge aggregators between the clients and the root (`[topology] aggregators`; 0: none).
    #[arg(long, default_value_t = 0)]
    pub aggregators: usize,
    /// Run one population in this process (what the parent spawns).
    #[arg(long, hide = true)]
    pub single: bool,
}

/// The partition `name` names for `clients` clients.
fn partition_for(name: &str, clients: usize) -> Result<&'static str> {
    Ok(match name {
        "iid" => "iid",
        "sampled" => "sampled",
        "auto" if clients > 20_000 => "sampled",
        "auto" => "iid",
        other => anyhow::bail!("--partition {other:?}: iid, sampled or auto"),
    })
}

/// The bench scenario for `clients` virtual clients.
pub fn scenario(
    clients: usize,
    per_round: usize,
    rounds: u64,
    local_steps: u32,
    partition: &str,
    aggregators: usize,
) -> Result<Scenario> {
    let text = format!(
        r#"
[simulation]
name = "bench-{clients}"
seed = 1
rounds = {rounds}
clients_per_round = {per_round}

[data]
partition = "{partition}"
works = "all"
clients = {clients}
min_bytes = 0

[devices]
startup_ms = 60000

[evaluation]
clients = 20
windows_per_client = 1
seq_len = 32
every = 1000

[rounds]
round_timeout_ms = 600000
retry_after_ms = 30000
presence_timeout_ms = 120000

[task]
local_steps = {local_steps}
batch_size = 4
seq_len = 32

[adapter]
rank = 4
targets = ["q", "v"]

[topology]
aggregators = {aggregators}
"#
    );
    Ok(Scenario::parse(&text, "bench scenario")?)
}

/// Runs the measurement(s) and prints one JSON line per population.
pub fn run(a: &Args) -> Result<()> {
    if a.single {
        let n = *a.clients.first().context("--clients is empty")?;
        let partition = partition_for(&a.partition, n)?;
        let s = scenario(
            n,
            a.per_round,
            a.rounds,
            a.local_steps,
            partition,
            a.aggregators,
        )?;
        let o = sim::run(&s, &RunOptions::default())?;
        let first = o.rounds.first().map_or(0.0, |r| r.wall_s);
        let last = o.rounds.last().map_or(0.0, |r| r.wall_s);
        let timed = (last - first).max(1e-9);
        println!(
            "{}",
            serde_json::json!({
                "bench": "sim",
                "clients": o.summary.clients,
                "partition": partition,
                "aggregators": a.aggregators,
                "clients_per_round": o.summary.clients_per_round,
                "rounds": o.summary.rounds,
                "local_steps": a.local_steps,
                "setup_s": first,
                "rounds_per_s": o.summary.rounds as f64 / timed,
                "s_per_round": timed / o.summary.rounds.max(1) as f64,
                "sim_time_s": o.summary.sim_time_s,
                "peak_rss_bytes": super::peak_rss(),
                "peak_rss_mib": super::peak_rss() as f64 / 1048576.0,
            })
        );
        return Ok(());
    }
    let exe = std::env::current_exe()?;
    for &n in &a.clients {
        let status = std::process::Command::new(&exe)
            .args([
                "sim",
                "--single",
                "--clients",
                &n.to_string(),
                "--per-round",
                &a.per_round.to_string(),
                "--rounds",
                &a.rounds.to_string(),
                "--local-steps",
                &a.local_steps.to_string(),
                "--partition",
                &a.partition,
                "--aggregators",
                &a.aggregators.to_string(),
            ])
            .status()
            .with_context(|| format!("running {}", exe.display()))?;
        anyhow::ensure!(status.success(), "the {n}-client run failed ({status})");
    }
    Ok(())
}
