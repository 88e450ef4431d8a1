//! starling-bench: every performance figure of Starling as JSON lines (one line per measurement).
//!
//! `train --config S|M [--quant f32|q8_0|q4_0] [--engine native|burn] [--backend flex|ndarray]`: LoRA
//! training throughput;
//! `decode --config M --quant q8_0|q4_0|f32 [--path native|burn] [--threads N] [--gguf-out F]`: prefill and
//! KV-cache decoding (scripts/bench_llamacpp.py runs llama.cpp beside it); `privacy`: exact Gaussian noise beside opendp's; `transport`: QUIC uploads,
//! handshakes and update codecs; `aggregate`: FedAvg / trimmed mean / median beside memcpy; `client`: the
//! device binary's size and its peak RSS during one real round; `sim`: the simulator's rounds per second and
//! peak RSS with thousands of virtual clients; `secagg`: secure aggregation's per-client cost and
//! the coordinator's unmasking time.

use anyhow::Result;
use clap::{Parser, Subcommand};
use starling_model::train::Engine;
use starling_model::{Backend, QuantType};
use starling_simulations::bench::{self, model::Shape};

#[derive(Parser)]
#[command(about = "Starling benchmarks; every figure is printed as one JSON line")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// LoRA training throughput (forward + backward + AdamW).
    Train {
        #[arg(long, value_enum, default_value_t = Shape::S)]
        config: Shape,
        #[arg(long, value_enum, default_value_t = QuantType::Q8_0)]
        quant: QuantType,
        /// Gradient implementation: the native engine, or burn's autodiff (the reference).
        #[arg(long, value_enum, default_value_t = Engine::Native)]
        engine: Engine,
        /// burn backend (used by the burn engine).
        #[arg(long, value_enum, default_value_t = Backend::Flex)]
        backend: Backend,
        /// Timed optimizer steps (after one warm-up step).
        #[arg(long, default_value_t = 5)]
        steps: usize,
    },
    /// Prefill and decoding throughput with the KV cache (batch 1, greedy), native path or burn.
    Decode(bench::model::DecodeArgs),
    /// Gaussian-noise throughput: Starling's exact sampler beside opendp's on the same vectors; the global
    /// ledger's accounting per round and at a restart.
    Privacy {
        /// Vector lengths noised by Starling's sampler.
        #[arg(long, value_delimiter = ',', default_value = "10000,100000,1000000")]
        sizes: Vec<usize>,
        /// Vector length noised by opendp's own (slow, arbitrary-precision) sampler.
        #[arg(long, default_value_t = 20_000)]
        opendp_size: usize,
        /// Noise multiplier σ/C (C = 1).
        #[arg(long, default_value_t = 1.0)]
        noise_multiplier: f64,
        /// Timed repetitions per size (the best is reported).
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// Rounds charged to a global ledger (0: skip the ledger figures).
        #[arg(long, default_value_t = 100)]
        ledger_rounds: usize,
        /// The ledger's rounds: sampling rate q (200 of 100,000 clients: scenarios/dp-population-fedavg.toml).
        #[arg(long, default_value_t = 0.002)]
        ledger_sampling_rate: f64,
        /// The ledger's rounds: noise multiplier σ.
        #[arg(long, default_value_t = 0.3665)]
        ledger_noise_multiplier: f64,
        /// Ledger patterns: `steady` (one sampling rate, PLD and RDP), `varying` (q moves every round, PLD).
        #[arg(long, value_delimiter = ',', default_value = "steady,varying")]
        ledger_patterns: Vec<bench::privacy::LedgerPattern>,
    },
    /// QUIC upload throughput beside raw quinn, handshakes/s, update encode/decode throughput.
    Transport(bench::transport::Args),
    /// Aggregation throughput (GB/s) beside a plain memcpy of the same bytes.
    Aggregate(bench::aggregate::Args),
    /// The device: stripped release size of starling-client, and its peak RSS during one real round
    /// (real coordinator and client processes) on the shipped model and on config M.
    Client(bench::client::Args),
    /// The simulator at scale: rounds per second and peak RSS with 1,000 and 10,000 virtual clients.
    Sim(bench::sim::Args),
    /// Secure aggregation: per-client time and bytes, coordinator unmasking time (100 and 1,000
    /// clients, 1M-value deltas).
    Secagg(bench::secagg::Args),
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Train {
            config,
            quant,
            engine,
            backend,
            steps,
        } => bench::model::train(config, quant, engine, backend, steps),
        Cmd::Decode(args) => bench::model::decode(&args),
        Cmd::Privacy {
            sizes,
            opendp_size,
            noise_multiplier,
            repeats,
            ledger_rounds,
            ledger_sampling_rate,
            ledger_noise_multiplier,
            ledger_patterns,
        } => {
            bench::privacy::run(&sizes, opendp_size, noise_multiplier, repeats.max(1))?;
            if ledger_rounds > 0 {
                bench::privacy::ledger(
                    ledger_rounds,
                    ledger_sampling_rate,
                    ledger_noise_multiplier,
                    &ledger_patterns,
                )?;
            }
            Ok(())
        }
        Cmd::Transport(args) => bench::transport::run(&args),
        Cmd::Aggregate(args) => bench::aggregate::run(&args),
        Cmd::Client(args) => bench::client::run(&args),
        Cmd::Sim(args) => bench::sim::run(&args),
        Cmd::Secagg(args) => bench::secagg::run(&args),
    }
}
