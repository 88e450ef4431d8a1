//! Model architecture configuration and its import from HuggingFace `config.json`.
//!
//! Both the older style (top-level `rope_theta`) and the newer one (`rope_parameters`) are read.
//! Llama-family decoders are accepted (`llama`, `mistral` without a sliding window, and `qwen2`, whose
//! query/key/value projections carry biases); anything this crate would compute wrongly (rope scaling,
//! sliding-window attention, other biases, other activations) is refused with a clear error rather
//! than silently mis-run. This module must never touch weights or tensors.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{ModelError, Result};
use crate::io::read_bounded;

/// Largest config file read (a Llama config is a few kilobytes).
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Architecture of a Llama-style decoder: sizes, attention layout, RoPE and normalisation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// Number of tokens in the vocabulary.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP.
    pub intermediate_size: usize,
    /// Number of decoder blocks.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (fewer than query heads for grouped-query attention).
    pub num_key_value_heads: usize,
    /// Width of one attention head.
    pub head_dim: usize,
    /// Epsilon inside RMSNorm.
    pub rms_norm_eps: f64,
    /// Base of the rotary position embedding frequencies.
    pub rope_theta: f64,
    /// Whether the output projection shares the token embedding matrix.
    pub tie_word_embeddings: bool,
    /// Longest sequence the model was trained for (generation refuses to go past it).
    pub max_position_embeddings: usize,
    /// Beginning-of-sequence token, if the model has one.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence tokens (generation stops at any of them).
    pub eos_token_ids: Vec<u32>,
    /// Whether the query, key and value projections add a bias (Qwen2 / Qwen2.5; Llama has none).
    #[serde(default)]
    pub qkv_bias: bool,
}

impl LlamaConfig {
    /// Reads and validates a HuggingFace `config.json`.
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let bytes = read_bounded(path, MAX_CONFIG_BYTES)?;
        Self::from_hf_json(&bytes, path)
    }

    /// Parses and validates the bytes of a HuggingFace `config.json`; `path` names it in errors.
    pub fn from_hf_json(bytes: &[u8], path: &Path) -> Result<Self> {
        let v: Value = serde_json::from_slice(bytes).map_err(|e| ModelError::Json {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let bad = |message: String| ModelError::Config {
            path: path.to_path_buf(),
            message,
        };
        let obj = v
            .as_object()
            .ok_or_else(|| bad("top level is not a JSON object".into()))?;
        let usize_field = |key: &str| -> Result<usize> {
            let x = obj
                .get(key)
                .ok_or_else(|| bad(format!("missing `{key}`")))?;
            x.as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| bad(format!("`{key}` must be a non-negative integer, found {x}")))
        };
        let opt_bool = |key: &str, default: bool| -> Result<bool> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(Value::Bool(b)) => Ok(*b),
                Some(x) => Err(bad(format!("`{key}` must be a boolean, found {x}"))),
            }
        };
        let model_type = obj.get("model_type").and_then(Value::as_str);
        if let Some(mt) = model_type {
            if !matches!(mt, "llama" | "mistral" | "qwen2") {
                return Err(bad(format!(
                    "model_type `{mt}` is not a supported decoder (llama, mistral, qwen2)"
                )));
            }
        }
        let qwen2 = model_type == Some("qwen2");
        if let Some(act) = obj.get("hidden_act").and_then(Value::as_str) {
            if act != "silu" {
                return Err(bad(format!(
                    "hidden_act `{act}` is not supported (only silu)"
                )));
            }
        }
        // Llama's attention_bias puts a bias on the output projection too, which Qwen2 never has.
        if opt_bool("attention_bias", false)? {
            return Err(bad(
                "attention_bias = true (biases on q, k, v and o) is not supported".into(),
            ));
        }
        if opt_bool("mlp_bias", false)? {
            return Err(bad("mlp_bias = true is not supported".into()));
        }
        if qwen2 {
            // Qwen2 configs always name a window; it applies only with use_sliding_window.
            if opt_bool("use_sliding_window", false)? {
                return Err(bad(
                    "use_sliding_window = true: sliding-window attention is not supported".into(),
                ));
            }
        } else if let Some(w) = obj.get("sliding_window") {
            if !w.is_null() {
                return Err(bad("sliding-window attention is not supported".into()));
            }
        }
        // Newer configs list each layer's attention kind.
        if let Some(kinds) = obj.get("layer_types") {
            let all_full = kinds
                .as_array()
                .is_some_and(|a| a.iter().all(|k| k.as_str() == Some("full_attention")));
            if !kinds.is_null() && !all_full {
                return Err(bad(format!(
                    "layer_types {kinds}: only full_attention layers are supported"
                )));
            }
        }
        let hidden_size = usize_field("hidden_size")?;
        let num_attention_heads = usize_field("num_attention_heads")?;
        let num_key_value_heads = match obj.get("num_key_value_heads") {
            None | Some(Value::Null) => num_attention_heads,
            Some(_) => usize_field("num_key_value_heads")?,
        };
        let head_dim = match obj.get("head_dim") {
            None | Some(Value::Null) => {
                if num_attention_heads == 0 {
                    return Err(bad("num_attention_heads must be positive".into()));
                }
                hidden_size / num_attention_heads
            }
            Some(_) => usize_field("head_dim")?,
        };
        let rope_theta = rope_theta(obj).map_err(bad)?;
        let rms_norm_eps = obj
            .get("rms_norm_eps")
            .map(|x| {
                x.as_f64()
                    .ok_or_else(|| bad(format!("`rms_norm_eps` must be a number, found {x}")))
            })
            .transpose()?
            .unwrap_or(1e-6);
        let token = |x: &Value| -> Result<u32> {
            x.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| {
                    bad(format!(
                        "token id must be a non-negative integer, found {x}"
                    ))
                })
        };
        let bos_token_id = match obj.get("bos_token_id") {
            None | Some(Value::Null) => None,
            Some(x) => Some(token(x)?),
        };
        let eos_token_ids = match obj.get("eos_token_id") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(xs)) => xs.iter().map(token).collect::<Result<_>>()?,
            Some(x) => vec![token(x)?],
        };
        let cfg = Self {
            vocab_size: usize_field("vocab_size")?,
            hidden_size,
            intermediate_size: usize_field("intermediate_size")?,
            num_hidden_layers: usize_field("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps,
            rope_theta,
            tie_word_embeddings: opt_bool("tie_word_embeddings", false)?,
            max_position_embeddings: match obj.get("max_position_embeddings") {
                None | Some(Value::Null) => 2048,
                Some(_) => usize_field("max_position_embeddings")?,
            },
            bos_token_id,
            eos_token_ids,
            qkv_bias: qwen2,
        };
        cfg.validate().map_err(bad)?;
        Ok(cfg)
    }

    /// Checks that the sizes are positive, consistent and within the bounds this crate runs.
    pub fn validate(&self) -> std::result::Result<(), String> {
        const MAX_DIM: usize = 1 << 16;
        let dims = [
            ("vocab_size", self.vocab_size, 1 << 21),
            ("hidden_size", self.hidden_size, MAX_DIM),
            ("intermediate_size", self.intermediate_size, 4 * MAX_DIM),
            ("num_hidden_layers", self.num_hidden_layers, 1024),
            ("num_attention_heads", self.num_attention_heads, 1024),
            ("num_key_value_heads", self.num_key_value_heads, 1024),
            ("head_dim", self.head_dim, 4096),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                1 << 22,
            ),
        ];
        for (name, value, max) in dims {
            if value == 0 || value > max {
                return Err(format!("`{name}` = {value} is outside 1..={max}"));
            }
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(format!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!(
                "head_dim ({}) must be even for RoPE",
                self.head_dim
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return Err(format!(
                "rope_theta ({}) must be a finite number > 1",
                self.rope_theta
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0 && self.rms_norm_eps < 1.0) {
            return Err(format!(
                "rms_norm_eps ({}) must be in (0, 1)",
                self.rms_norm_eps
            ));
        }
        for id in self.bos_token_id.iter().chain(&self.eos_token_ids) {
            if *id as usize >= self.vocab_size {
                return Err(format!("special token id {id} is outside the vocabulary"));
            }
        }
        Ok(())
    }

    /// Writes this config as a HuggingFace-style `config.json` (top-level `rope_theta`; a Qwen2
    /// config when the projections carry biases).
    pub fn to_hf_json(&self) -> String {
        // What tells the family apart: Qwen2's biases are implied by its type (and its window is
        // off); a Llama config says it has none.
        let (arch, model_type, family) = if self.qkv_bias {
            (
                "Qwen2ForCausalLM",
                "qwen2",
                serde_json::json!({"use_sliding_window": false}),
            )
        } else {
            (
                "LlamaForCausalLM",
                "llama",
                serde_json::json!({"attention_bias": false, "mlp_bias": false}),
            )
        };
        let mut v = serde_json::json!({
            "architectures": [arch],
            "model_type": model_type,
            "hidden_act": "silu",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids,
            "torch_dtype": "float32",
        });
        if let (Some(o), Some(extra)) = (v.as_object_mut(), family.as_object()) {
            o.extend(extra.clone());
        }
        serde_json::to_string_pretty(&v).expect("a JSON value always serialises") + "\n"
    }

    /// Number of parameters of the base model (embedding counted once when tied).
    pub fn num_parameters(&self) -> usize {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let bias = if self.qkv_bias { q + 2 * kv } else { 0 };
        let per_layer = h * q + 2 * h * kv + q * h + 3 * h * self.intermediate_size + 2 * h + bias;
        let embed = self.vocab_size * h;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        embed + head + self.num_hidden_layers * per_layer + h
    }

    /// Multiply-accumulate operations per token of a forward pass at context length `ctx`.
    pub fn flops_per_token(&self, ctx: usize) -> f64 {
        let h = self.hidden_size as f64;
        let q = (self.num_attention_heads * self.head_dim) as f64;
        let kv = (self.num_key_value_heads * self.head_dim) as f64;
        let i = self.intermediate_size as f64;
        let linear =
            2.0 * self.num_hidden_layers as f64 * (h * q * 2.0 + 2.0 * h * kv + 3.0 * h * i)
                + 2.0 * h * self.vocab_size as f64;
        let attention = 2.0 * self.num_hidden_layers as f64 * 2.0 * q * ctx as f64;
        linear + attention
    }
}

/// Reads the RoPE base from either config style, refusing any rope scaling we do not implement.
fn rope_theta(obj: &serde_json::Map<String, Value>) -> std::result::Result<f64, String> {
    let check_type = |t: Option<&Value>| -> std::result::Result<(), String> {
        match t.and_then(Value::as_str) {
            None | Some("default") => Ok(()),
            Some(other) => Err(format!(
                "rope type `{other}` is not supported (only default)"
            )),
        }
    };
    if let Some(scaling) = obj.get("rope_scaling") {
        if !scaling.is_null() {
            check_type(scaling.get("rope_type").or_else(|| scaling.get("type")))?;
        }
    }
    if let Some(params) = obj.get("rope_parameters") {
        if !params.is_null() {
            check_type(params.get("rope_type"))?;
            if let Some(t) = params.get("rope_theta") {
                return t.as_f64().ok_or_else(|| {
                    format!("`rope_parameters.rope_theta` must be a number, found {t}")
                });
            }
        }
    }
    match obj.get("rope_theta") {
        None | Some(Value::Null) => Ok(10000.0),
        Some(t) => t
            .as_f64()
            .ok_or_else(|| format!("`rope_theta` must be a number, found {t}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<LlamaConfig> {
        LlamaConfig::from_hf_json(s.as_bytes(), Path::new("config.json"))
    }

    const BASE: &str = r#"{"vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2"#;

    #[test]
    fn reads_both_rope_styles() {
        let a = parse(&format!("{BASE}, \"rope_theta\": 500000.0}}")).unwrap();
        assert_eq!(a.rope_theta, 500000.0);
        let b = parse(&format!(
            "{BASE}, \"rope_parameters\": {{\"rope_type\": \"default\", \"rope_theta\": 1000000.0}}}}"
        ))
        .unwrap();
        assert_eq!(b.rope_theta, 1e6);
        assert_eq!(b.head_dim, 16);
        assert_eq!(parse(&format!("{BASE}}}")).unwrap().rope_theta, 10000.0);
    }

    #[test]
    fn refuses_what_it_cannot_compute() {
        for extra in [
            r#""rope_scaling": {"rope_type": "llama3", "factor": 8.0}"#,
            r#""attention_bias": true"#,
            r#""hidden_act": "gelu""#,
            r#""model_type": "gpt2""#,
        ] {
            let text = format!("{BASE}, {extra}}}");
            let err = parse(&text).unwrap_err();
            assert!(matches!(err, ModelError::Config { .. }), "{extra}: {err}");
        }
        let gqa = BASE.replace("\"num_key_value_heads\": 2", "\"num_key_value_heads\": 3");
        assert!(matches!(
            parse(&format!("{gqa}}}")),
            Err(ModelError::Config { .. })
        ));
    }

    #[test]
    fn reads_qwen2_and_refuses_its_windowed_variant() {
        // As Qwen2.5-0.5B's config.json has it: a window named but not used, rope θ 1e6, tied.
        let qwen = format!(
            "{BASE}, \"model_type\": \"qwen2\", \"sliding_window\": 32768, \"use_sliding_window\": false, \
             \"max_window_layers\": 21, \"rope_theta\": 1000000.0, \"tie_word_embeddings\": true, \
             \"rope_scaling\": null}}"
        );
        let c = parse(&qwen).unwrap();
        assert!(c.qkv_bias && c.tie_word_embeddings);
        assert_eq!(c.rope_theta, 1e6);
        // Written back and read again: the same config (a Qwen2 one).
        let back = parse(&c.to_hf_json()).unwrap();
        assert_eq!(back, c);
        assert!(!parse(&format!("{BASE}}}")).unwrap().qkv_bias);
        for refused in [
            qwen.replace(
                "\"use_sliding_window\": false",
                "\"use_sliding_window\": true",
            ),
            qwen.replace(
                "\"rope_scaling\": null",
                "\"rope_scaling\": {\"type\": \"yarn\", \"factor\": 4.0}",
            ),
            qwen.replace(
                "\"rope_scaling\": null",
                "\"layer_types\": [\"full_attention\", \"sliding_attention\"]",
            ),
        ] {
            let err = parse(&refused).unwrap_err();
            assert!(matches!(err, ModelError::Config { .. }), "{refused}: {err}");
        }
    }

    #[test]
    fn malformed_input_is_a_typed_error() {
        assert!(matches!(parse("{"), Err(ModelError::Json { .. })));
        assert!(matches!(parse("[]"), Err(ModelError::Config { .. })));
        assert!(matches!(
            parse(r#"{"vocab_size": -1}"#),
            Err(ModelError::Config { .. })
        ));
        let huge =
            format!("{BASE}, \"hidden_size\": 99999999999}}").replace("\"hidden_size\": 64, ", "");
        assert!(matches!(parse(&huge), Err(ModelError::Config { .. })));
        let err = parse(r#"{"vocab_size": 10}"#).unwrap_err().to_string();
        assert!(
            err.contains("config.json") && err.contains("hidden_size"),
            "{err}"
        );
    }

    #[test]
    fn eos_may_be_a_list() {
        let c = parse(&format!(
            "{BASE}, \"eos_token_id\": [2, 3], \"bos_token_id\": 1}}"
        ))
        .unwrap();
        assert_eq!(c.eos_token_ids, vec![2, 3]);
        assert_eq!(c.bos_token_id, Some(1));
    }
}
