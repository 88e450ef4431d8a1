//! Device benchmarks: the size of the stripped release `starling-client`, and the peak RSS of a real
//! `starling-client run` process during one real round against a real `starling-coordinator serve` (QUIC on
//! loopback) — on the shipped model, on config M (SmolLM2-135M's shape, random weights, Q8_0), and on the
//! real SmolLM2-135M-Instruct as `model import` leaves it (`--smollm2 DIR`: its Q4_1 blocks, its BPE
//! vocabulary).
//! Needs the release binaries: `cargo build --release -p starling-client -p starling-coordinator`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::procs::{self, Coordinator, Device};
use anyhow::{bail, Context, Result};
use starling_model::{Llama, QuantType};

use super::model::Shape;

/// Arguments of `starling-bench client`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Models to run a round on: `tiny` (the shipped model), `M` and/or `smollm2` (needs `--smollm2`).
    #[arg(long, value_delimiter = ',', default_value = "tiny,M")]
    pub models: Vec<String>,
    /// The imported SmolLM2 directory (`starling-coordinator model import
    /// ~/.cache/starling/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --out models/smollm2`).
    #[arg(long, default_value = "models/smollm2")]
    pub smollm2: PathBuf,
    /// Local steps of the round on the tiny model.
    #[arg(long, default_value_t = 20)]
    pub tiny_steps: u32,
    /// Local steps of the round on config M.
    #[arg(long, default_value_t = 2)]
    pub m_steps: u32,
    /// Training threads of the device.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
}

/// The workspace root (the shipped model and texts live there).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A process's peak resident set (VmHWM) in bytes, 0 when unreadable.
fn peak_rss_of(pid: u32) -> u64 {
    super::peak_rss_in(&format!("/proc/{pid}/status"))
}

/// Size of `binary`, and of a stripped copy (when `strip` is installed).
fn sizes(binary: &Path) -> Result<(u64, Option<u64>)> {
    let size = std::fs::metadata(binary)
        .with_context(|| format!("{} (build it with --release first)", binary.display()))?
        .len();
    let tmp = tempfile::tempdir()?;
    let copy = tmp.path().join("starling-client");
    std::fs::copy(binary, &copy)?;
    let stripped = std::process::Command::new("strip")
        .arg(&copy)
        .status()
        .ok()
        .filter(|s| s.success())
        .and_then(|_| std::fs::metadata(&copy).ok())
        .map(|m| m.len());
    Ok((size, stripped))
}

/// Runs the device benchmarks and prints one JSON line per figure.
pub fn run(a: &Args) -> Result<()> {
    let client = procs::binary("starling-client")?;
    let (size, stripped) = sizes(&client)?;
    println!(
        "{}",
        serde_json::json!({"bench": "client", "metric": "binary_size", "bytes": size,
            "stripped_bytes": stripped, "path": client.display().to_string()})
    );
    for m in &a.models {
        let (label, steps, batch, seq) = match m.as_str() {
            "tiny" => ("tiny", a.tiny_steps, 8, 128),
            "M" | "m" => {
                let (_, seq, batch) = Shape::M.config();
                ("M", a.m_steps, batch as u32, seq as u32)
            }
            // The same batch as M, on the real model.
            "smollm2" => {
                let (_, seq, batch) = Shape::M.config();
                ("smollm2", a.m_steps, batch as u32, seq as u32)
            }
            other => bail!("unknown model {other:?} (tiny, M or smollm2)"),
        };
        round(label, steps, batch, seq, a.threads, &a.smollm2)?;
    }
    Ok(())
}

/// The base model directory of `label`: the shipped model, the imported SmolLM2, or a random
/// config-M model stored as Q8_0.
fn base_model(label: &str, tmp: &Path, smollm2: &Path) -> Result<PathBuf> {
    if label == "tiny" {
        return Ok(root().join("assets/models/starling-tiny"));
    }
    if label == "smollm2" {
        let dir = if smollm2.is_absolute() {
            smollm2.to_path_buf()
        } else {
            root().join(smollm2)
        };
        if !dir.join("model.safetensors").is_file() {
            bail!(
                "{} holds no imported model: run scripts/fetch_smollm2.sh, then starling-coordinator \
                 model import ~/.cache/starling/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --out {}",
                dir.display(),
                dir.display()
            );
        }
        return Ok(dir);
    }
    let dir = tmp.join("base-m");
    let (config, _, _) = Shape::M.config();
    let model = Llama::random(
        config,
        QuantType::Q8_0,
        &starling_model::Backend::Flex.device(),
        1,
    )?;
    model.save(&dir)?;
    Ok(dir)
}

/// One round on `label`: coordinator and device processes; prints the device's peak RSS.
fn round(
    label: &str,
    steps: u32,
    batch: u32,
    seq: u32,
    threads: usize,
    smollm2: &Path,
) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let base = base_model(label, tmp.path(), smollm2)?;
    let config = format!(
        "[network]\nlisten = \"127.0.0.1:0\"\nenrol_listen = \"127.0.0.1:0\"\nhttp = false\n\
         [rounds]\nmin_clients = 1\nselection = {{ count = 1 }}\nmin_updates = 1\nrounds = 1\n\
         retry_after_ms = 100\n[task]\nlocal_steps = {steps}\nbatch_size = {batch}\nseq_len = {seq}\n\
         learning_rate = 0.002\n[adapter]\nrank = 8\ntargets = [\"q\", \"v\"]\n"
    );
    let coord = Coordinator::init(&tmp.path().join("coord"), &config, &base)?;
    let enrolment = coord.enrol("bench-device")?;
    let serving = coord.serve()?;
    let device = Device::enrol(&tmp.path().join("device"), &serving, &enrolment)?;
    device.edit_config("threads = 0", &format!("threads = {threads}"))?;
    let text = root().join("assets/shakespeare/hamlet.txt");
    let started = Instant::now();
    let proc = device.run(&text)?;
    let pid = proc.pid();
    let mut peak = 0;
    let done = loop {
        peak = peak.max(peak_rss_of(pid));
        if proc.printed("update acknowledged") {
            break true;
        }
        if started.elapsed() > Duration::from_secs(3600) {
            break false;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    peak = peak.max(peak_rss_of(pid));
    let secs = started.elapsed().as_secs_f64();
    proc.stop(60);
    serving.proc.stop(120);
    if !done {
        bail!("the {label} round did not finish within an hour");
    }
    println!(
        "{}",
        serde_json::json!({"bench": "client", "metric": "round_peak_rss", "model": label,
            "local_steps": steps, "batch": batch, "seq": seq, "threads": threads,
            "peak_rss_bytes": peak, "peak_rss_mb": peak as f64 / 1e6, "round_seconds": secs})
    );
    Ok(())
}
