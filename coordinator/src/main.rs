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
    /// Log lines as text for a terminal, or as JSON (one object a line, for log collectors).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

/// How log lines are written (to stderr).
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object a line.
    Json,
}

/// What an enrolment token is for.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Role {
    /// A device that trains.
    Device,
    /// An edge aggregator that serves devices and forwards partial sums.
    Aggregator,
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
    /// Run rounds: QUIC endpoints for devices and enrolment, the admin socket (DIR/admin.sock) and the
    /// status page, until the configured rounds are done (forever without a round limit) or SIGTERM /
    /// Ctrl-C, which drain: in-flight uploads are acknowledged, the store flushed, devices told when to
    /// come back; then it exits 0.
    ///
    /// Example:
    ///   starling-coordinator serve --dir coord
    ///   starling-coordinator --log-format json serve --dir coord
    #[command(verbatim_doc_comment)]
    Serve {
        /// Coordinator directory.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue a one-time enrolment token for a device (printed once, stored hashed); works while `serve`
    /// runs (through its admin socket) and on a stopped coordinator.
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
        /// What the key will be: a device, or an edge aggregator (`aggregator init` spends its token).
        #[arg(long, value_enum, default_value_t = Role::Device)]
        role: Role,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a device by name or fingerprint: a running `serve` closes its connections at once and the
    /// open round stops waiting for it; its handshakes are refused from then on.
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
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the enrolled devices (live while `serve` runs).
    ///
    /// Example:
    ///   starling-coordinator clients --dir coord
    #[command(verbatim_doc_comment)]
    Clients {
        /// Coordinator directory.
        #[arg(long)]
        dir: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Pause rounds: the open round finishes, no new one starts (kept across restarts).
    ///
    /// Example:
    ///   starling-coordinator pause --dir coord
    #[command(verbatim_doc_comment)]
    Pause {
        /// Coordinator directory.
        #[arg(long)]
        dir: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Resume paused rounds.
    ///
    /// Example:
    ///   starling-coordinator resume --dir coord
    #[command(verbatim_doc_comment)]
    Resume {
        /// Coordinator directory.
        #[arg(long)]
        dir: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Change round settings from the next round on (live while `serve` runs; kept across restarts,
    /// overriding coordinator.toml's [rounds]).
    ///
    /// Example:
    ///   starling-coordinator set-rounds --dir coord --select-count 20 --min-updates 15
    #[command(verbatim_doc_comment)]
    SetRounds {
        /// Coordinator directory.
        #[arg(long)]
        dir: PathBuf,
        #[command(flatten)]
        settings: RoundArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write a consistent backup (configuration, keys, base model, store) to a file, owner-only; works
    /// while `serve` runs.
    ///
    /// Example:
    ///   starling-coordinator backup --dir coord --out coord-2026-12-06.backup
    #[command(verbatim_doc_comment)]
    Backup {
        /// Coordinator directory.
        #[arg(long)]
        dir: PathBuf,
        /// The backup file.
        #[arg(long)]
        out: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Restore a backup into a new coordinator directory, to `serve` it. Files already in place with the
    /// backup's exact bytes (keys mounted from a Secret) are kept.
    ///
    /// Example:
    ///   starling-coordinator restore --from coord-2026-12-06.backup --dir coord
    ///   starling-coordinator restore --from /seed/coordinator.backup --dir /var/lib/starling --if-empty
    #[command(verbatim_doc_comment)]
    Restore {
        /// The backup file.
        #[arg(long)]
        from: PathBuf,
        /// The directory to create.
        #[arg(long)]
        dir: PathBuf,
        /// Do nothing (and succeed) if the directory already holds a store: seeds a volume once, as a
        /// Kubernetes init container does on every start.
        #[arg(long)]
        if_empty: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
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
    /// Run an edge aggregator: devices connect to it as to a coordinator; it forwards one partial sum per
    /// round to the root (a coordinator with `[hierarchy] enabled = true`).
    #[command(subcommand)]
    Aggregator(AggregatorCmd),
}

// Parsed once per process: the size of the larger variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum AggregatorCmd {
    /// Create an aggregator directory and enrol its key at the root with a token issued by
    /// `enrol --role aggregator` there; prints the fingerprint its devices pin.
    ///
    /// Example:
    ///   starling-coordinator aggregator init --dir edge1 --root root.example:7400 \
    ///       --root-enrol root.example:7401 --pin HEX --signing-key HEX --token stk1_... --name edge-1
    #[command(verbatim_doc_comment)]
    Init {
        /// Directory to create.
        #[arg(long)]
        dir: PathBuf,
        /// The root's QUIC endpoint, HOST:PORT.
        #[arg(long)]
        root: String,
        /// The root's enrolment endpoint, HOST:PORT.
        #[arg(long)]
        root_enrol: String,
        /// The root's TLS fingerprint (hex, from its `enrol` output).
        #[arg(long)]
        pin: String,
        /// The root's model-signing key (hex).
        #[arg(long)]
        signing_key: String,
        /// The one-time aggregator token.
        #[arg(long)]
        token: String,
        /// This aggregator's name.
        #[arg(long)]
        name: String,
        /// Where devices connect (default 0.0.0.0:7500).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Where devices enrol (default 0.0.0.0:7501).
        #[arg(long)]
        enrol_listen: Option<std::net::SocketAddr>,
    },
    /// Serve devices and forward their cohorts' sums to the root until SIGTERM (then drain).
    ///
    /// Example:
    ///   starling-coordinator aggregator serve --dir edge1
    #[command(verbatim_doc_comment)]
    Serve {
        /// Aggregator directory.
        #[arg(long)]
        dir: PathBuf,
    },
}

/// Round settings `set-rounds` changes (the others keep their value).
#[derive(clap::Args)]
struct RoundArgs {
    /// Eligible clients needed before a round starts.
    #[arg(long)]
    min_clients: Option<usize>,
    /// Select this many clients a round.
    #[arg(long, conflicts_with = "select_fraction")]
    select_count: Option<usize>,
    /// Select this fraction of the eligible clients a round.
    #[arg(long)]
    select_fraction: Option<f64>,
    /// Updates needed to aggregate.
    #[arg(long)]
    min_updates: Option<usize>,
    /// Time from selection to the deadline, in milliseconds.
    #[arg(long)]
    round_timeout_ms: Option<u64>,
    /// What unselected clients are told to wait, in milliseconds.
    #[arg(long)]
    retry_after_ms: Option<u64>,
    /// Rounds to run in all (0: forever).
    #[arg(long)]
    rounds: Option<u64>,
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
    let cfg_drain = cfg.network.drain();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let coordinator = std::sync::Arc::new(
            Coordinator::open(dir, cfg)
                .with_context(|| format!("opening coordinator {}", dir.display()))?,
        );
        coordinator
            .serve_until(
                &tls,
                starling_transport::Limits::default(),
                |server, http| {
                    announce(server, http, &layout.serving());
                    if let Some(a) = http {
                        tracing::info!("status page: http://{a}/  metrics: http://{a}/metrics");
                    }
                },
                shutdown_signal(),
                cfg_drain,
            )
            .await
    })
}

/// One machine-readable line with the bound endpoints for scripts and tests, on stdout and in `file` (where
/// `status` finds the live page while the store is locked); `serve` and `aggregator serve` both print it.
fn announce(
    server: &starling_transport::Server,
    http: Option<std::net::SocketAddr>,
    file: &std::path::Path,
) {
    let bound = serde_json::json!({
        "listening": server.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        "enrol": server.enrol_addr().map(|a| a.to_string()).unwrap_or_default(),
        "fingerprint": server.fingerprint().to_hex(),
        "http": http.map(|a| a.to_string()),
        "pid": std::process::id(),
    });
    println!("{bound}");
    if let Err(e) = std::fs::write(file, format!("{bound}\n")) {
        tracing::warn!("writing {}: {e}", file.display());
    }
}

/// Resolves on SIGTERM (systemd, Kubernetes, `podman stop`) or Ctrl-C.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!("SIGTERM cannot be caught ({e}); stop with Ctrl-C");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = term => tracing::info!("SIGTERM: draining"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted: draining"),
    }
}

/// A JSON document as the user asked: one line (`--json`), or pretty-printed.
fn print_json(v: &serde_json::Value, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{v}");
    } else {
        println!("{}", serde_json::to_string_pretty(v)?);
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if !matches!(
        cli.cmd,
        Cmd::Serve { .. } | Cmd::Aggregator(AggregatorCmd::Serve { .. })
    ) {
        // Rust ignores SIGPIPE, so printing into a closed pipe (`status --json | head -c 100`) panics. The
        // one-shot commands take the default instead and end quietly; `serve` keeps ignoring it (a log
        // reader that goes away must not stop the coordinator).
        // SAFETY: setting a signal's disposition to the default before any thread is started.
        #[cfg(unix)]
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => logs.json().flatten_event(true).init(),
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
    match cli.cmd {
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
        Cmd::Enrol {
            dir,
            name,
            role,
            json,
        } => {
            let role = match role {
                Role::Device => starling_coordinator::store::ClientRole::Device,
                Role::Aggregator => starling_coordinator::store::ClientRole::Aggregator,
            };
            let e = starling_coordinator::ops::enrol(&dir, &name, role)?;
            if json {
                println!("{}", e.json());
            } else {
                println!(
                    "one-time token for {name} (shown once): {}",
                    e.token.as_str()
                );
                println!("coordinator fingerprint to pin:       {}", e.fingerprint);
                println!(
                    "model-signing key to trust:           {}",
                    starling_protocol::hex(&e.signing_key)
                );
            }
            Ok(())
        }
        Cmd::Revoke { dir, client, json } => {
            let r = starling_coordinator::ops::revoke(&dir, &client)?;
            if json {
                println!("{r}");
            } else {
                let closed = r["connections_closed"].as_u64().unwrap_or(0);
                println!(
                    "revoked {} ({closed} open connection{} closed)",
                    r["revoked"].as_str().unwrap_or_default(),
                    if closed == 1 { "" } else { "s" }
                );
            }
            Ok(())
        }
        Cmd::Clients { dir, json } => {
            let v = starling_coordinator::ops::clients(&dir)?;
            if json {
                println!("{v}");
            } else {
                print!("{}", starling_coordinator::status::clients_table(&v));
            }
            Ok(())
        }
        Cmd::Pause { dir, json } => {
            let v = starling_coordinator::ops::pause(&dir, true)?;
            if json {
                println!("{v}");
                return Ok(());
            }
            match v["round_open"].as_u64() {
                Some(r) => println!("paused: round {r} finishes, no new round starts"),
                None => println!("paused: no new round starts"),
            }
            Ok(())
        }
        Cmd::Resume { dir, json } => {
            let v = starling_coordinator::ops::pause(&dir, false)?;
            if json {
                println!("{v}");
            } else {
                println!("resumed: rounds start again");
            }
            Ok(())
        }
        Cmd::SetRounds {
            dir,
            settings,
            json,
        } => {
            let s = starling_coordinator::admin::RoundSettings {
                min_clients: settings.min_clients,
                select_count: settings.select_count,
                select_fraction: settings.select_fraction,
                min_updates: settings.min_updates,
                round_timeout_ms: settings.round_timeout_ms,
                retry_after_ms: settings.retry_after_ms,
                rounds: settings.rounds,
            };
            let v = starling_coordinator::ops::set_rounds(&dir, &s)?;
            if json {
                println!("{v}");
                return Ok(());
            }
            println!("round settings from the next round on:");
            print_json(&v["rounds"], false)
        }
        Cmd::Backup { dir, out, json } => {
            let v = starling_coordinator::ops::backup(&dir, &out)?;
            if json {
                println!("{v}");
                return Ok(());
            }
            println!(
                "backup written to {} ({} bytes)",
                v["backup"].as_str().unwrap_or_default(),
                v["bytes"]
            );
            Ok(())
        }
        Cmd::Restore {
            from,
            dir,
            if_empty,
            json,
        } => {
            if if_empty && dir.join("store").exists() {
                if json {
                    println!(
                        "{}",
                        serde_json::json!({"dir": dir.display().to_string(), "restored": false})
                    );
                } else {
                    println!("{} already holds a store: nothing restored", dir.display());
                }
                return Ok(());
            }
            let v = starling_coordinator::ops::restore(&from, &dir)?;
            if json {
                println!("{v}");
                return Ok(());
            }
            println!(
                "restored into {}: latest version {}, {} clients; start it with `starling-coordinator serve --dir {}`",
                dir.display(),
                v["latest_version"],
                v["clients"],
                dir.display()
            );
            Ok(())
        }
        Cmd::Status { dir, json } => {
            let s = starling_coordinator::ops::status(&dir)?;
            if json || !std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                print_json(&s, json)
            } else {
                print!("{}", starling_coordinator::status::summary(&s));
                Ok(())
            }
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
        Cmd::Aggregator(cmd) => aggregator(cmd),
    }
}

fn aggregator(cmd: AggregatorCmd) -> anyhow::Result<()> {
    use starling_coordinator::aggregator::{self as agg, Aggregator, AggregatorLayout};
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cmd {
        AggregatorCmd::Init {
            dir,
            root,
            root_enrol,
            pin,
            signing_key,
            token,
            name,
            listen,
            enrol_listen,
        } => {
            let request = agg::InitRequest {
                dir: dir.clone(),
                root,
                root_enrol,
                pin,
                signing_key,
                token,
                name,
                listen,
                enrol_listen,
            };
            let fp = runtime.block_on(agg::init(&request))?;
            println!(
                "{}",
                serde_json::json!({ "dir": dir.display().to_string(), "fingerprint": fp.to_hex() })
            );
            Ok(())
        }
        AggregatorCmd::Serve { dir } => runtime.block_on(async {
            let layout = AggregatorLayout::new(&dir);
            let a = std::sync::Arc::new(
                Aggregator::open(&dir)
                    .with_context(|| format!("opening aggregator {}", dir.display()))?,
            );
            a.serve_until(
                |server, http| announce(server, http, &layout.serving()),
                shutdown_signal(),
            )
            .await?;
            Ok(())
        }),
    }
}
