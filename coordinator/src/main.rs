//! `starling-coordinator`: the operator's binary — create a coordinator (`init`), enrol and revoke devices,
//! run rounds over QUIC (`serve`), watch them (`status`), export versions, prepare models and plan privacy.

mod privacy;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use starling_cli::{
    run_export, run_generate, run_import, run_inspect, run_logits, ExportArgs, GenerateArgs,
    ImportArgs, ModelOpts,
};

/// Starling aggregation coordinator.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a coordinator directory: keys, store, configuration, base model and signed version 0.
    ///
    /// Example:
    ///   starling-coordinator init --dir coord --base-model assets/models/starling-tiny [--config coordinator.toml]
    #[command(verbatim_doc_comment)]
    Init {
        /// Directory to create.
        #[arg(long)]
        dir: PathBuf,
        /// Base model directory (Starling container or HF checkpoint).
        #[arg(long)]
        base_model: PathBuf,
        /// Configuration to use (default: the documented defaults, written to DIR/coordinator.toml).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Run rounds: QUIC endpoints for devices and enrolment, until the configured rounds are done.
    ///
    /// Example:
    ///   starling-coordinator serve --dir coord
    #[command(verbatim_doc_comment)]
    Serve {
        /// Coordinator directory.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue a one-time enrolment token for a device (printed once, stored hashed).
    ///
    /// Example:
    ///   starling-coordinator enrol --dir coord --name kitchen-pi
    #[command(verbatim_doc_comment)]
    Enrol {
        /// Coordinator directory.
        #[arg(long)]
        dir: PathBuf,
        /// Device name.
        #[arg(long)]
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a device by name or fingerprint: its handshakes and live connections are refused.
    ///
    /// Example:
    ///   starling-coordinator revoke --dir coord kitchen-pi
    #[command(verbatim_doc_comment)]
    Revoke {
        /// Coordinator directory.
        #[arg(long)]
        dir: PathBuf,
        /// Device name or 64-hex fingerprint.
        client: String,
    },
    /// Show rounds, clients, ε spent and the latest version (from the running serve's page if it runs).
    ///
    /// Example:
    ///   starling-coordinator status --dir coord --json
    #[command(verbatim_doc_comment)]
    Status {
        /// Coordinator directory.
        #[arg(long)]
        dir: PathBuf,
        /// One line of JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write a model version as a PEFT adapter plus its signed manifest.
    ///
    /// Example:
    ///   starling-coordinator export --dir coord --version 3 --out exported/v3
    #[command(verbatim_doc_comment)]
    Export {
        /// Coordinator directory.
        #[arg(long)]
        dir: PathBuf,
        /// Version to export.
        #[arg(long)]
        version: u64,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
    },
    /// Prepare and verify base models.
    #[command(subcommand)]
    Model(ModelCmd),
    /// Plan privacy budgets: ε of a run, or the noise a target ε needs.
    #[command(subcommand)]
    Privacy(privacy::PrivacyCmd),
}

#[derive(Subcommand)]
enum ModelCmd {
    /// Import a HuggingFace Llama checkpoint or a GGUF file into Starling's (quantized) container.
    ///
    /// Example:
    ///   starling-coordinator model import ./SmolLM2-135M --out models/smol-q8 --quant q8_0
    ///   starling-coordinator model import tiny.gguf --out models/tiny --quant q8_0
    #[command(verbatim_doc_comment)]
    Import(ImportArgs),
    /// Export a model as a llama-architecture GGUF file (llama.cpp, Ollama).
    ///
    /// Example:
    ///   starling-coordinator model export assets/models/starling-tiny --gguf tiny.gguf
    #[command(verbatim_doc_comment)]
    Export(ExportArgs),
    /// Print a model's architecture, storage and size.
    ///
    /// Example:
    ///   starling-coordinator model inspect models/smol-q8 --json
    #[command(verbatim_doc_comment)]
    Inspect {
        /// Model directory.
        path: PathBuf,
        /// One line of JSON instead of pretty-printed JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print logits for token ids as JSON (last position, or all with --all) to verify an import.
    ///
    /// Example:
    ///   starling-coordinator model logits models/smol-q8 --ids 1,2,3 --json
    ///   starling-coordinator model logits ./hf-dir --ids 1,2,3 --adapter runs/sonnets --all --json
    #[command(verbatim_doc_comment)]
    Logits {
        /// Model directory.
        path: PathBuf,
        /// Comma-separated token ids.
        #[arg(long, value_delimiter = ',', required = true)]
        ids: Vec<u32>,
        /// PEFT adapter to apply.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// Quantize an HF checkpoint on load.
        #[arg(long)]
        quant: Option<starling_model::QuantType>,
        /// Print every position, not only the last.
        #[arg(long)]
        all: bool,
        /// Output JSON (the only format; accepted for clarity in scripts).
        #[arg(long)]
        json: bool,
    },
    /// Generate text from a model.
    ///
    /// Example:
    ///   starling-coordinator model generate --model assets/models/starling-tiny --prompt "ROMEO." --seed 3
    #[command(verbatim_doc_comment)]
    Generate(GenerateArgs),
}

fn serve(dir: &std::path::Path) -> anyhow::Result<()> {
    use starling_coordinator::service::{read_key, Coordinator, Layout};
    let layout = Layout::new(dir);
    let cfg = starling_coordinator::config::CoordinatorConfig::load(&layout.config())?;
    let tls = read_key(&layout.tls_key())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let coordinator = std::sync::Arc::new(
            Coordinator::open(dir, cfg)
                .with_context(|| format!("opening coordinator {}", dir.display()))?,
        );
        coordinator
            .serve_with(
                &tls,
                starling_transport::Limits::default(),
                |server, http| {
                    // One machine-readable line for scripts and tests (also kept in the directory, where
                    // `status` finds the live page while the store is locked), then logs.
                    let bound = serde_json::json!({
                        "listening": server.local_addr().map(|a| a.to_string()).unwrap_or_default(),
                        "enrol": server.enrol_addr().map(|a| a.to_string()).unwrap_or_default(),
                        "fingerprint": server.fingerprint().to_hex(),
                        "http": http.map(|a| a.to_string()),
                        "pid": std::process::id(),
                    });
                    println!("{bound}");
                    if let Err(e) = std::fs::write(layout.serving(), format!("{bound}\n")) {
                        tracing::warn!("writing {}: {e}", layout.serving().display());
                    }
                    if let Some(a) = http {
                        tracing::info!("status page: http://{a}/  metrics: http://{a}/metrics");
                    }
                },
            )
            .await
    })
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match Cli::parse().cmd {
        Cmd::Init {
            dir,
            base_model,
            config,
        } => {
            let r = starling_coordinator::ops::init(&dir, &base_model, config.as_deref())?;
            println!(
                "{}",
                serde_json::json!({
                    "dir": dir.display().to_string(), "fingerprint": r.tls_fingerprint.to_hex(),
                    "signing_key": starling_protocol::hex(&r.signing_key), "adapter_params": r.adapter_params,
                })
            );
            Ok(())
        }
        Cmd::Serve { dir } => serve(&dir),
        Cmd::Enrol { dir, name, json } => {
            let (token, fp, key) = starling_coordinator::ops::enrol(&dir, &name)?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"name": name, "token": token.as_str(), "fingerprint": fp.to_hex(),
                        "signing_key": starling_protocol::hex(&key)})
                );
            } else {
                println!("one-time token for {name} (shown once): {}", token.as_str());
                println!("coordinator fingerprint to pin:       {fp}");
                println!(
                    "model-signing key to trust:           {}",
                    starling_protocol::hex(&key)
                );
            }
            Ok(())
        }
        Cmd::Revoke { dir, client } => {
            let fp = starling_coordinator::ops::revoke(&dir, &client)?;
            println!("revoked {fp}");
            Ok(())
        }
        Cmd::Status { dir, json } => {
            let s = starling_coordinator::ops::status(&dir)?;
            if json {
                println!("{s}");
            } else {
                println!("{}", serde_json::to_string_pretty(&s)?);
            }
            Ok(())
        }
        Cmd::Export { dir, version, out } => {
            let p = starling_coordinator::ops::export(&dir, version, &out)?;
            println!("version {version} written to {}", p.display());
            Ok(())
        }
        Cmd::Model(ModelCmd::Import(a)) => run_import(&a),
        Cmd::Model(ModelCmd::Export(a)) => run_export(&a),
        Cmd::Model(ModelCmd::Inspect { path, json }) => run_inspect(&path, json),
        Cmd::Model(ModelCmd::Logits {
            path,
            ids,
            adapter,
            quant,
            all,
            json: _,
        }) => {
            let opts = ModelOpts {
                model: path.clone(),
                quant,
                backend: Default::default(),
                adapter,
            };
            run_logits(&opts, &ids, all).with_context(|| format!("logits of {}", path.display()))
        }
        Cmd::Model(ModelCmd::Generate(a)) => run_generate(&a),
        Cmd::Privacy(cmd) => privacy::run(cmd),
    }
}
