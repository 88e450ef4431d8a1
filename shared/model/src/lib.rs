//! starling-model: the small language model every Starling device runs and fine-tunes.
//!
//! A Llama-style decoder written with burn ([`model`]) over frozen base weights that stay quantized
//! in memory ([`quant`]), LoRA adapters in HuggingFace PEFT format ([`lora`]), tokenizers
//! ([`tokenizer`]), HF checkpoint import and Starling's quantized container ([`checkpoint`]), a
//! trainer ([`train`]) and sampling with a KV cache ([`generate`]). This crate knows nothing of
//! networks or clocks: callers hand it paths and data.

pub mod backend;
pub mod bf16;
pub mod bundle;
pub mod chat;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod dp;
pub mod engine;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod infer;
pub mod io;
pub mod kernels;
pub mod lora;
pub mod model;
pub mod pool;
pub mod quant;
pub mod tokenizer;
pub mod train;

pub use backend::Backend;
pub use config::LlamaConfig;
pub use error::{ModelError, Result};
pub use generate::{generate, SamplingConfig};
pub use lora::{LoraAdapter, LoraConfig, Target};
pub use model::{KvCache, Llama};
pub use quant::{QMatrix, QuantType};
pub use tokenizer::Tokenizer;
pub use train::{eval_loss, Optimizer, TrainConfig, Trainer};
