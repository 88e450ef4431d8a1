//! `starling-client`: the device binary — join a federation (`enrol`, `run`, `status`), or fine-tune and
//! generate locally (`finetune`, `generate`).

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use starling_cli::{run_generate, GenerateArgs};
use starling_client::commands::{enrol, status, EnrolRequest};
use starling_client::driver::{RunOptions, Runtime};
use starling_client::local::{run_finetune, FinetuneArgs};
use starling_client::state::StateDir;

/// Starling device client.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Enrol this device with a coordinator: create its key, register it with a one-time token, and
    /// write STATE/client.toml (every setting with its default, commented).
    ///
    /// Example (the values `starling-coordinator enrol` printed):
    ///   starling-client enrol --dir device --coordinator 127.0.0.1:7870 --token stk1_... \
    ///       --pin 3f1c... --signing-key 9a0b... --name kitchen-pi
    #[command(verbatim_doc_comment)]
    Enrol {
        /// State directory to create.
        #[arg(long)]
        dir: PathBuf,
        /// The coordinator's QUIC endpoint, HOST:PORT.
        #[arg(long)]
        coordinator: String,
        /// Its enrolment endpoint, HOST:PORT (default: the same host, the next port).
        #[arg(long)]
        enrol_address: Option<String>,
        /// The one-time enrolment token.
        #[arg(long)]
        token: String,
        /// The coordinator's TLS key fingerprint to pin (64 hex digits).
        #[arg(long)]
        pin: String,
        /// The coordinator's model-signing key to trust (64 hex digits).
        #[arg(long)]
        signing_key: String,
        /// This device's name.
        #[arg(long, default_value = "device")]
        name: String,
    },
    /// Take part in federated rounds until stopped (SIGTERM / Ctrl-C): connect with backoff, verify and
    /// fetch models, train on the local text, upload until acknowledged. Resumes after a crash.
    ///
    /// Example:
    ///   starling-client run --dir device --data ~/notes
    #[command(verbatim_doc_comment)]
    Run {
        /// State directory made by `enrol`.
        #[arg(long)]
        dir: PathBuf,
        /// Text files or directories of .txt files to train on.
        #[arg(long, num_args = 1.., required = true)]
        data: Vec<PathBuf>,
        /// Wait this long (ms) before asking again after a refused model, a failed training or an
        /// ineligible check.
        #[arg(long, default_value_t = 30_000)]
        retry_ms: u64,
        /// Reproducible training for experiments and tests: batches drawn from this seed and the round
        /// instead of the OS (ignored by tasks with DP-SGD, whose noise must stay unpredictable).
        #[arg(long)]
        training_seed: Option<u64>,
    },
    /// Show the enrolled coordinator, the model version held, rounds joined, ε spent and the last error.
    ///
    /// Example:
    ///   starling-client status --dir device --json
    #[command(verbatim_doc_comment)]
    Status {
        /// State directory.
        #[arg(long)]
        dir: PathBuf,
        /// One line of JSON.
        #[arg(long)]
        json: bool,
    },
    /// Fine-tune a LoRA adapter on local text files and write it in PEFT format (no coordinator).
    ///
    /// Example:
    ///   starling-client finetune --model assets/models/starling-tiny --quant q8_0 \
    ///       --data assets/shakespeare/sonnets.txt --out runs/sonnets --steps 60 --rank 8
    #[command(verbatim_doc_comment)]
    Finetune(Box<FinetuneArgs>),
    /// Generate text from a model (optionally with an adapter).
    ///
    /// Example:
    ///   starling-client generate --model assets/models/starling-tiny --adapter runs/sonnets \
    ///       --prompt "Shall I compare thee" --max-tokens 200 --temperature 0.7 --seed 1
    #[command(verbatim_doc_comment)]
    Generate(GenerateArgs),
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn run(
    dir: PathBuf,
    data: Vec<PathBuf>,
    retry_ms: u64,
    training_seed: Option<u64>,
) -> anyhow::Result<ExitCode> {
    let opts = RunOptions {
        data,
        progress_bar: std::io::stdout().is_terminal(),
        retry_ms,
        training_seed,
    };
    let runtime = Runtime::open(StateDir::new(&dir), opts)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let outcome = rt.block_on(runtime.run(shutdown_signal()))?;
    if outcome.error {
        eprintln!("starling-client: stopped: {}", outcome.reason);
        return Ok(ExitCode::from(3));
    }
    tracing::info!("stopped: {}", outcome.reason);
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    if !matches!(cli.cmd, Cmd::Run { .. }) {
        // Rust ignores SIGPIPE, so printing into a closed pipe (`status --json | head`) panics. The
        // one-shot commands take the default and end quietly; `run` keeps ignoring it.
        // SAFETY: setting a signal's disposition to the default before any thread is started.
        #[cfg(unix)]
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let result = match cli.cmd {
        Cmd::Enrol {
            dir,
            coordinator,
            enrol_address,
            token,
            pin,
            signing_key,
            name,
        } => enrol(&EnrolRequest {
            dir: dir.clone(),
            coordinator,
            enrol: enrol_address,
            token,
            pin,
            signing_key,
            name,
        })
        .map(|(id, _)| {
            println!(
                "{}",
                serde_json::json!({"enrolled": true, "client_id": id.to_hex(),
                    "config": dir.join("client.toml").display().to_string()})
            );
            ExitCode::SUCCESS
        }),
        Cmd::Run {
            dir,
            data,
            retry_ms,
            training_seed,
        } => run(dir, data, retry_ms, training_seed),
        Cmd::Status { dir, json } => status(&dir).and_then(|s| {
            if json {
                println!("{s}");
            } else {
                println!("{}", serde_json::to_string_pretty(&s)?);
            }
            Ok(ExitCode::SUCCESS)
        }),
        Cmd::Finetune(a) => run_finetune(&a).map(|()| ExitCode::SUCCESS),
        Cmd::Generate(a) => run_generate(&a).map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("starling-client: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
