//! `starling-coordinator`: the operator's binary. For now: preparing and checking models.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use starling_model::cli::{
    run_generate, run_import, run_inspect, run_logits, GenerateArgs, ImportArgs, ModelOpts,
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
    /// Prepare and verify base models.
    #[command(subcommand)]
    Model(ModelCmd),
}

#[derive(Subcommand)]
enum ModelCmd {
    /// Import a HuggingFace Llama checkpoint into Starling's (quantized) container.
    ///
    /// Example:
    ///   starling-coordinator model import ./SmolLM2-135M --out models/smol-q8 --quant q8_0
    #[command(verbatim_doc_comment)]
    Import(ImportArgs),
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

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Model(ModelCmd::Import(a)) => run_import(&a),
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
    }
}
