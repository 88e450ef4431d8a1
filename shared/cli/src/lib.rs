//! starling-cli: the command-line front ends both binaries share — model loading and sampling options
//! (clap), `generate`, and the operator's model commands (`import`, `inspect`, `logits`).
//!
//! This is the binaries' edge, so errors are `anyhow` with context; library code stays typed. What must
//! never live here: protocol, training loops or device logic (`starling-client` owns fine-tuning).

pub mod config;
pub mod failpoint;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;

use starling_model::chat::{ChatTemplate, Message};
use starling_model::{generate, Backend, Llama, LoraAdapter, QuantType, SamplingConfig, Tokenizer};

/// Which model to load and how.
#[derive(Debug, Clone, Args)]
pub struct ModelOpts {
    /// Model directory (HF checkpoint or Starling container).
    #[arg(long, default_value = "assets/models/starling-tiny")]
    pub model: PathBuf,
    /// Store frozen weights as f32, q8_0 or q4_0 (HF checkpoints are quantized on load).
    #[arg(long)]
    pub quant: Option<QuantType>,
    /// burn CPU backend.
    #[arg(long, value_enum, default_value_t = Backend::Flex)]
    pub backend: Backend,
    /// PEFT LoRA adapter directory to apply.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
}

impl ModelOpts {
    /// Loads model, optional adapter and tokenizer.
    pub fn load(&self) -> anyhow::Result<(Llama, Option<LoraAdapter>, Tokenizer)> {
        let (model, adapter) = self.load_model()?;
        let tok = Tokenizer::for_model_dir(&self.model, model.config.vocab_size)?;
        Ok((model, adapter, tok))
    }

    /// Loads model and optional adapter (no tokenizer: for commands that take token ids).
    pub fn load_model(&self) -> anyhow::Result<(Llama, Option<LoraAdapter>)> {
        let device = self.backend.device();
        let model = Llama::load(&self.model, self.quant, &device)
            .with_context(|| format!("loading model {}", self.model.display()))?;
        let adapter = match &self.adapter {
            Some(dir) => Some(
                LoraAdapter::load_peft(dir, &model.config, &device)
                    .with_context(|| format!("loading adapter {}", dir.display()))?,
            ),
            None => None,
        };
        Ok((model, adapter))
    }
}

/// How to sample text.
#[derive(Debug, Clone, Args)]
pub struct SampleOpts {
    /// Text to continue.
    #[arg(long, default_value = "ROMEO.\n")]
    pub prompt: String,
    /// Most new tokens.
    #[arg(long, default_value_t = 200)]
    pub max_tokens: usize,
    /// Softmax temperature (0 = greedy).
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f32,
    /// Keep the k most likely tokens (0 = all).
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// Nucleus sampling threshold.
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Ask a chat model: this user message, formatted with the model's chat template (its
    /// tokenizer_config.json, which `model import` writes from a GGUF file's template) instead of
    /// `--prompt`; prints the answer only.
    #[arg(long, conflicts_with = "prompt")]
    pub chat: Option<String>,
    /// With `--chat`: a system message first (else the template's default, if it has one).
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
}

impl SampleOpts {
    /// The sampling configuration these options describe.
    pub fn config(&self) -> SamplingConfig {
        SamplingConfig {
            max_new_tokens: self.max_tokens,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: self.seed,
            stop_tokens: Vec::new(),
        }
    }
}

/// Continues `prompt` with `model` (+ adapter) and returns the text.
pub fn sample_text(
    model: &Llama,
    adapter: Option<&LoraAdapter>,
    tok: &Tokenizer,
    s: &SampleOpts,
) -> anyhow::Result<String> {
    let ids = tok.encode(&s.prompt)?;
    let out = generate(model, adapter, &ids, &s.config())?;
    Ok(tok.decode(&out))
}

/// Arguments of `generate` (the same in both binaries).
#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    /// Model, adapter and backend.
    #[command(flatten)]
    pub model: ModelOpts,
    /// Prompt and sampling.
    #[command(flatten)]
    pub sample: SampleOpts,
}

/// `generate`: prints a continuation and the decoding speed.
pub fn run_generate(a: &GenerateArgs) -> anyhow::Result<()> {
    let (m, s) = (&a.model, &a.sample);
    let (model, adapter, tok) = m.load()?;
    let mut s = s.clone();
    let chat = s.chat.take();
    if let Some(user) = &chat {
        let template = ChatTemplate::load(&m.model)?.with_context(|| {
            format!(
                "{} has no chat template (tokenizer_config.json with chat_template): use --prompt",
                m.model.display()
            )
        })?;
        let mut messages = Vec::new();
        if let Some(system) = &s.system {
            messages.push(Message::new("system", system));
        }
        messages.push(Message::new("user", user));
        s.prompt = template.render(&messages, true)?;
    }
    let t = Instant::now();
    let text = sample_text(&model, adapter.as_ref(), &tok, &s)?;
    let secs = t.elapsed().as_secs_f64();
    if chat.is_some() {
        println!("{}", text.trim_end());
    } else {
        println!("{}{}", s.prompt, text);
    }
    eprintln!("[{} tokens in {secs:.2}s]", tok.encode(&text)?.len());
    Ok(())
}

/// Arguments of `model import`.
#[derive(Debug, Clone, Args)]
pub struct ImportArgs {
    /// HuggingFace checkpoint directory (config.json + model.safetensors [+ tokenizer.json,
    /// tokenizer_config.json]; model_type llama, mistral or qwen2), or a `llama` / `qwen2` `.gguf` file (Q8_0, Q4_0 and Q4_1 tensors
    /// kept bit for bit or converted; F32, F16, BF16, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K and Q6_K
    /// decoded, then stored as `--quant`; a `gpt2` byte-level BPE vocabulary becomes a
    /// tokenizer.json, the chat template a tokenizer_config.json).
    pub hf_dir: PathBuf,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Storage of the frozen weights. Default: q8_0 for an HF checkpoint; for a GGUF file, every
    /// tensor in a format Starling runs natively (q8_0, q4_0, q4_1) keeps it bit for bit, other
    /// quantized tensors become q8_0 and float ones f32.
    #[arg(long, value_enum)]
    pub quant: Option<QuantType>,
}

/// `model import`: HF checkpoint or GGUF file → Starling container (quantized), tokenizer copied along.
pub fn run_import(a: &ImportArgs) -> anyhow::Result<()> {
    let device = Backend::Flex.device();
    let mut gguf_tokenizer = None;
    let mut chat = None;
    let model = if a.hf_dir.extension().is_some_and(|e| e == "gguf") {
        let g = starling_model::gguf::Gguf::read(&a.hf_dir, starling_model::io::MAX_WEIGHTS_BYTES)?;
        gguf_tokenizer = starling_model::gguf::tokenizer_json(&g, &a.hf_dir)?;
        chat = starling_model::gguf::chat_template(&g)
            .with_context(|| format!("the chat template of {}", a.hf_dir.display()))?;
        starling_model::gguf::import(&g, &a.hf_dir, a.quant, &device)?
    } else {
        Llama::load(&a.hf_dir, Some(a.quant.unwrap_or(QuantType::Q8_0)), &device)
            .with_context(|| format!("importing {}", a.hf_dir.display()))?
    };
    model
        .save(&a.out)
        .with_context(|| format!("writing {}", a.out.display()))?;
    let tok = a.hf_dir.join("tokenizer.json");
    if let Some(json) = gguf_tokenizer {
        // The GGUF file's own vocabulary, as a tokenizer.json beside the weights.
        starling_model::io::write_atomic(&a.out.join("tokenizer.json"), json.as_bytes())
            .with_context(|| format!("writing {}", a.out.join("tokenizer.json").display()))?;
    } else if tok.is_file() {
        Tokenizer::from_file(&tok)?;
        std::fs::copy(&tok, a.out.join("tokenizer.json"))
            .with_context(|| format!("copying {}", tok.display()))?;
    }
    // The chat template travels as HF keeps it: tokenizer_config.json (checked before it is copied).
    let chat = match chat {
        Some(c) => Some(c),
        None if a.hf_dir.is_dir() => ChatTemplate::load(&a.hf_dir)?,
        None => None,
    };
    if let Some(c) = &chat {
        let path = a.out.join(starling_model::chat::CONFIG_FILE);
        starling_model::io::write_atomic(&path, c.config_json().as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    println!(
        "imported {} → {} ({}, {} parameters, {:.2} MB of weights, {:.3} bytes/param)",
        a.hf_dir.display(),
        a.out.display(),
        model.quant,
        model.config.num_parameters(),
        model.resident_weight_bytes() as f64 / 1e6,
        model.resident_weight_bytes() as f64 / model.config.num_parameters() as f64
    );
    Ok(())
}

/// Arguments of `model export`.
#[derive(Debug, Clone, clap::Args)]
pub struct ExportArgs {
    /// Model directory (a Starling container or an HF checkpoint).
    pub model: PathBuf,
    /// Write a llama-architecture GGUF file here (runs in llama.cpp and Ollama).
    #[arg(long)]
    pub gguf: PathBuf,
    /// A PEFT LoRA adapter directory to merge into the weights before export (needs `--merge`).
    #[arg(long, requires = "merge")]
    pub adapter: Option<PathBuf>,
    /// Merge `--adapter` into the weights (`W + s·B·A`, requantized to the model's format): the
    /// exported file is the fine-tuned model, which llama.cpp and Ollama run as it is.
    #[arg(long, requires = "adapter")]
    pub merge: bool,
}

/// `model export --gguf`: a model directory (with an adapter merged, if given) → GGUF, weights in
/// their stored format.
pub fn run_export(a: &ExportArgs) -> anyhow::Result<()> {
    let device = Backend::Flex.device();
    let mut model = Llama::load(&a.model, None, &device)
        .with_context(|| format!("loading {}", a.model.display()))?;
    let tokenizer = Tokenizer::for_model_dir(&a.model, model.config.vocab_size)?;
    if let Some(dir) = &a.adapter {
        let adapter = LoraAdapter::load_peft(dir, &model.config, &device)
            .with_context(|| format!("loading the adapter {}", dir.display()))?;
        model = adapter.merge_into(&model)?;
    }
    let bytes = starling_model::gguf::export(&model, &tokenizer)?.to_bytes();
    starling_model::io::write_atomic(&a.gguf, &bytes)
        .with_context(|| format!("writing {}", a.gguf.display()))?;
    println!(
        "exported {} → {} ({}, {} bytes)",
        a.model.display(),
        a.gguf.display(),
        model.quant,
        bytes.len()
    );
    Ok(())
}

/// `model inspect`: architecture and storage of a model directory, as text or JSON.
pub fn run_inspect(path: &std::path::Path, json: bool) -> anyhow::Result<()> {
    let model = Llama::load(path, None, &Backend::Flex.device())
        .with_context(|| format!("loading {}", path.display()))?;
    let c = &model.config;
    let v = serde_json::json!({
        "path": path.display().to_string(),
        "config": c,
        "storage": model.quant.name(),
        "parameters": c.num_parameters(),
        "resident_weight_bytes": model.resident_weight_bytes(),
        "bytes_per_parameter": model.resident_weight_bytes() as f64 / c.num_parameters() as f64,
        "tokenizer": if path.join("tokenizer.json").is_file() { "tokenizer.json" } else { "byte-level" },
    });
    if json {
        println!("{v}");
    } else {
        println!("{}", serde_json::to_string_pretty(&v)?);
    }
    Ok(())
}

/// `model logits`: logits of the last position (or all) for given ids, as JSON.
pub fn run_logits(m: &ModelOpts, ids: &[u32], all: bool) -> anyhow::Result<()> {
    let (model, adapter) = m.load_model()?;
    if ids.is_empty() {
        bail!("--ids needs at least one token id");
    }
    // Checked here: the model reads training ids' NO_LOSS mark, which a user's id must not carry.
    if let Some(bad) = ids.iter().find(|&&i| i as usize >= model.config.vocab_size) {
        bail!(
            "token id {bad} is outside the vocabulary of {} tokens",
            model.config.vocab_size
        );
    }
    let logits = model.forward(ids, 1, adapter.as_ref(), None, None)?;
    let [_, seq, vocab] = logits.dims();
    let values = logits
        .into_data()
        .try_into_vec::<f32>()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let rows: Vec<&[f32]> = values.chunks_exact(vocab).collect();
    let v = if all {
        serde_json::json!({"ids": ids, "logits": rows})
    } else {
        serde_json::json!({"ids": ids, "position": seq - 1, "logits": rows[seq - 1]})
    };
    println!("{v}");
    Ok(())
}
