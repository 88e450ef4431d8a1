//! `starling-client`: the device-side binary. For now: local LoRA fine-tuning and generation.

use clap::{Parser, Subcommand};
use starling_model::cli::{run_finetune, run_generate, FinetuneArgs, GenerateArgs};

/// Starling device client.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Fine-tune a LoRA adapter on local text files and write it in PEFT format.
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

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Finetune(a) => run_finetune(&a),
        Cmd::Generate(a) => run_generate(&a),
    }
}
