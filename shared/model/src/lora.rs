//! LoRA adapters: configuration, the trainable A/B matrices, and the HuggingFace PEFT file format
//! (`adapter_config.json` + `adapter_model.safetensors`, PEFT's tensor names), so adapters move
//! between Starling and PEFT unchanged.
//!
//! Only A and B live here; the frozen base is in `model`. Two orders exist and neither may depend on
//! hash-map iteration: the structural order of [`LoraAdapter::tensors`] (layer, then q,k,v,o,gate,up,
//! down, then A before B), used for gradients inside training; and the wire order of
//! [`LoraAdapter::to_flat`] / [`LoraAdapter::specs`] — tensors sorted by PEFT name, the canonical order of
//! starling-protocol's adapter schema — which is how update deltas and published adapters are laid out.

use std::collections::HashMap;
use std::path::Path;

use burn::tensor::{Device, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use serde_json::Value;

use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::io::{read_bounded, write_atomic, write_safetensors, OutTensor, TensorFile};

/// A projection inside a decoder block that LoRA can adapt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    /// Attention query projection.
    Q,
    /// Attention key projection.
    K,
    /// Attention value projection.
    V,
    /// Attention output projection.
    O,
    /// MLP gate projection.
    Gate,
    /// MLP up projection.
    Up,
    /// MLP down projection.
    Down,
}

impl Target {
    /// All targets in canonical order.
    pub const ALL: [Target; 7] = [
        Self::Q,
        Self::K,
        Self::V,
        Self::O,
        Self::Gate,
        Self::Up,
        Self::Down,
    ];

    /// PEFT / HuggingFace module name (`q_proj`, …).
    pub fn module_name(self) -> &'static str {
        match self {
            Self::Q => "q_proj",
            Self::K => "k_proj",
            Self::V => "v_proj",
            Self::O => "o_proj",
            Self::Gate => "gate_proj",
            Self::Up => "up_proj",
            Self::Down => "down_proj",
        }
    }

    /// Parses a module name (`q_proj`) or its short form (`q`).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|t| t.module_name() == s || t.module_name().trim_end_matches("_proj") == s)
    }

    /// Path of the module within a decoder block (`self_attn.q_proj`).
    pub fn module_path(self) -> String {
        let parent = match self {
            Self::Q | Self::K | Self::V | Self::O => "self_attn",
            _ => "mlp",
        };
        format!("{parent}.{}", self.module_name())
    }

    /// `(in_features, out_features)` of this projection for a model.
    pub fn shape(self, c: &LlamaConfig) -> (usize, usize) {
        let q = c.num_attention_heads * c.head_dim;
        let kv = c.num_key_value_heads * c.head_dim;
        match self {
            Self::Q => (c.hidden_size, q),
            Self::K | Self::V => (c.hidden_size, kv),
            Self::O => (q, c.hidden_size),
            Self::Gate | Self::Up => (c.hidden_size, c.intermediate_size),
            Self::Down => (c.intermediate_size, c.hidden_size),
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Hyper-parameters of a LoRA adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// Rank r of the update `B·A`.
    pub rank: usize,
    /// Scale numerator: the update is multiplied by `alpha / rank`.
    pub alpha: f32,
    /// Dropout probability on the adapter's input during training.
    pub dropout: f32,
    /// Projections that carry an adapter (sorted, no repeats).
    pub targets: Vec<Target>,
}

impl LoraConfig {
    /// Builds and validates a config.
    pub fn new(rank: usize, alpha: f32, dropout: f32, targets: &[Target]) -> Result<Self> {
        let mut targets = targets.to_vec();
        targets.sort();
        targets.dedup();
        let cfg = Self {
            rank,
            alpha,
            dropout,
            targets,
        };
        cfg.validate().map_err(ModelError::InvalidArgument)?;
        Ok(cfg)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        if self.rank == 0 || self.rank > 4096 {
            return Err(format!("LoRA rank {} is outside 1..=4096", self.rank));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(format!(
                "LoRA alpha {} must be a positive number",
                self.alpha
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(format!("LoRA dropout {} must be in [0, 1)", self.dropout));
        }
        if self.targets.is_empty() {
            return Err("LoRA needs at least one target module".into());
        }
        Ok(())
    }

    /// Multiplier of `B·A·x`.
    pub fn scaling(&self) -> f32 {
        self.alpha / self.rank as f32
    }
}

/// The trainable pair of one adapted projection: `A` is `[rank, in]`, `B` is `[out, rank]`.
#[derive(Debug, Clone)]
pub struct LoraPair {
    /// Down-projection, PEFT's `lora_A.weight`.
    pub a: Tensor<2>,
    /// Up-projection, PEFT's `lora_B.weight`.
    pub b: Tensor<2>,
}

/// A LoRA adapter for a whole model.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// Its hyper-parameters.
    pub config: LoraConfig,
    /// Per layer, per target (indexed by `Target as usize`): the pair, if that target is adapted.
    pub layers: Vec<[Option<LoraPair>; 7]>,
}

fn tensor(values: Vec<f32>, shape: [usize; 2], device: &Device) -> Tensor<2> {
    Tensor::from_data(TensorData::new(values, shape), device)
}

impl LoraAdapter {
    /// A fresh adapter initialised as PEFT does: A ~ U(-1/√in, 1/√in) (Kaiming-uniform with
    /// a = √5), B = 0, so the adapted model starts equal to the base.
    pub fn new(model: &LlamaConfig, config: LoraConfig, device: &Device, seed: u64) -> Self {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let r = config.rank;
        let layers = (0..model.num_hidden_layers)
            .map(|_| {
                let mut slots: [Option<LoraPair>; 7] = Default::default();
                for &t in &config.targets {
                    let (fan_in, fan_out) = t.shape(model);
                    let bound = 1.0 / (fan_in as f32).sqrt();
                    let a: Vec<f32> = (0..r * fan_in)
                        .map(|_| rng.random_range(-bound..bound))
                        .collect();
                    slots[t.index()] = Some(LoraPair {
                        a: tensor(a, [r, fan_in], device),
                        b: tensor(vec![0.0; fan_out * r], [fan_out, r], device),
                    });
                }
                slots
            })
            .collect();
        Self { config, layers }
    }

    /// The pair adapting `target` in `layer`, if any.
    pub fn pair(&self, layer: usize, target: Target) -> Option<&LoraPair> {
        self.layers
            .get(layer)
            .and_then(|l| l[target.index()].as_ref())
    }

    /// All trainable tensors in canonical order (layer, target, A then B).
    pub fn tensors(&self) -> Vec<&Tensor<2>> {
        self.layers
            .iter()
            .flat_map(|l| l.iter().flatten().flat_map(|p| [&p.a, &p.b]))
            .collect()
    }

    /// Mutable access to all trainable tensors in canonical order.
    pub fn tensors_mut(&mut self) -> Vec<&mut Tensor<2>> {
        self.layers
            .iter_mut()
            .flat_map(|l| l.iter_mut().flatten().flat_map(|p| [&mut p.a, &mut p.b]))
            .collect()
    }

    /// PEFT names of the tensors, in canonical order.
    pub fn tensor_names(&self) -> Vec<String> {
        let mut names = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            for t in Target::ALL {
                if l[t.index()].is_some() {
                    for ab in ["A", "B"] {
                        names.push(peft_name(i, t, ab));
                    }
                }
            }
        }
        names
    }

    /// Number of trainable values.
    pub fn num_parameters(&self) -> usize {
        self.tensors()
            .iter()
            .map(|t| t.dims().iter().product::<usize>())
            .sum()
    }

    /// Indices into [`LoraAdapter::tensors`] in wire order (sorted by PEFT name).
    fn wire_order(&self) -> Vec<usize> {
        let names = self.tensor_names();
        let mut order: Vec<usize> = (0..names.len()).collect();
        order.sort_by(|&a, &b| names[a].cmp(&names[b]));
        order
    }

    /// PEFT name and shape of every tensor, in wire order: the adapter schema of update deltas.
    pub fn specs(&self) -> Vec<(String, [usize; 2])> {
        let names = self.tensor_names();
        let tensors = self.tensors();
        self.wire_order()
            .into_iter()
            .map(|i| (names[i].clone(), tensors[i].dims()))
            .collect()
    }

    /// All trainable values flattened in wire order (the layout of an update delta).
    pub fn to_flat(&self) -> Vec<f32> {
        let tensors = self.tensors();
        flatten(
            &self
                .wire_order()
                .into_iter()
                .map(|i| tensors[i].clone())
                .collect::<Vec<_>>(),
        )
    }

    /// The model with this adapter merged into its frozen weights (`W + s·B·A` for every adapted
    /// projection), each merged matrix stored again in its own format: for running without the
    /// adapter, or exporting a fine-tuned model (GGUF). Quantized weights are requantized once.
    pub fn merge_into(&self, model: &crate::model::Llama) -> Result<crate::model::Llama> {
        model.check_adapter(self)?;
        let mut out = model.clone();
        let s = self.config.scaling();
        let r = self.config.rank;
        let values = |t: &Tensor<2>| -> Result<Vec<f32>> {
            t.to_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .map_err(|e| ModelError::InvalidArgument(format!("adapter tensor: {e:?}")))
        };
        for (li, block) in out.blocks.iter_mut().enumerate() {
            for t in Target::ALL {
                let Some(p) = self.pair(li, t) else { continue };
                let w = &block.proj[t.index()].0;
                let (rows, cols) = (w.rows(), w.cols());
                let (a, b) = (values(&p.a)?, values(&p.b)?);
                let mut merged = w.to_f32();
                for (o, row) in merged.chunks_exact_mut(cols).enumerate() {
                    for j in 0..r {
                        let f = s * b[o * r + j];
                        for (v, x) in row.iter_mut().zip(&a[j * cols..(j + 1) * cols]) {
                            *v += f * x;
                        }
                    }
                }
                let m = crate::quant::QMatrix::quantize(rows, cols, &merged, w.kind())?;
                block.proj[t.index()] = crate::model::Frozen(std::sync::Arc::new(m));
            }
        }
        Ok(out)
    }

    /// Overwrites the trainable values from a flat vector in wire order.
    pub fn set_flat(&mut self, flat: &[f32]) -> Result<()> {
        if flat.len() != self.num_parameters() {
            return Err(ModelError::InvalidArgument(format!(
                "flat adapter has {} values, the adapter {}",
                flat.len(),
                self.num_parameters()
            )));
        }
        let order = self.wire_order();
        let mut tensors = self.tensors_mut();
        let mut at = 0;
        for i in order {
            let t = &mut tensors[i];
            let dims = t.dims();
            let n = dims[0] * dims[1];
            let device = t.device();
            **t = Tensor::from_data(TensorData::new(flat[at..at + n].to_vec(), dims), &device);
            at += n;
        }
        Ok(())
    }

    /// Writes the adapter in HuggingFace PEFT format into `dir` (created if needed).
    pub fn save_peft(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
        let c = &self.config;
        let cfg = serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": null,
            "r": c.rank,
            "lora_alpha": c.alpha,
            "lora_dropout": c.dropout,
            "target_modules": c.targets.iter().map(|t| t.module_name()).collect::<Vec<_>>(),
            "bias": "none",
            "fan_in_fan_out": false,
            "use_rslora": false,
            "use_dora": false,
            "init_lora_weights": true,
            "inference_mode": true,
            "modules_to_save": null,
            "layers_to_transform": null,
            "rank_pattern": {},
            "alpha_pattern": {},
        });
        let text = serde_json::to_string_pretty(&cfg).expect("JSON value serialises") + "\n";
        write_atomic(&dir.join("adapter_config.json"), text.as_bytes())?;
        let names = self.tensor_names();
        let out: Vec<OutTensor> = names
            .into_iter()
            .zip(self.tensors())
            .map(|(n, t)| {
                let dims = t.dims();
                let values = t
                    .to_data()
                    .convert::<f32>()
                    .try_into_vec::<f32>()
                    .expect("f32 tensor");
                OutTensor::f32(n, dims.to_vec(), &values)
            })
            .collect();
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        write_safetensors(&dir.join("adapter_model.safetensors"), &out, meta)
    }

    /// Reads a PEFT LoRA adapter for `model`, refusing any feature it would apply wrongly.
    pub fn load_peft(dir: &Path, model: &LlamaConfig, device: &Device) -> Result<Self> {
        let cfg_path = dir.join("adapter_config.json");
        let bad = |message: String| ModelError::Adapter {
            path: cfg_path.clone(),
            message,
        };
        let bytes = read_bounded(&cfg_path, 1 << 20)?;
        let v: Value = serde_json::from_slice(&bytes).map_err(|e| ModelError::Json {
            path: cfg_path.clone(),
            message: e.to_string(),
        })?;
        let field = |k: &str| v.get(k).filter(|x| !x.is_null());
        if field("peft_type").and_then(Value::as_str).unwrap_or("LORA") != "LORA" {
            return Err(bad("peft_type is not LORA".into()));
        }
        for flag in ["use_dora", "fan_in_fan_out", "use_rslora"] {
            if field(flag).and_then(Value::as_bool).unwrap_or(false) {
                return Err(bad(format!("`{flag}` = true is not supported")));
            }
        }
        if field("bias").and_then(Value::as_str).unwrap_or("none") != "none" {
            return Err(bad("only bias = \"none\" is supported".into()));
        }
        for key in ["rank_pattern", "alpha_pattern"] {
            if field(key)
                .and_then(Value::as_object)
                .is_some_and(|m| !m.is_empty())
            {
                return Err(bad(format!("per-module `{key}` is not supported")));
            }
        }
        for key in ["modules_to_save", "layers_to_transform"] {
            if field(key).is_some_and(|x| x.as_array().is_none_or(|a| !a.is_empty())) {
                return Err(bad(format!("`{key}` is not supported")));
            }
        }
        let rank = field("r")
            .and_then(Value::as_u64)
            .ok_or_else(|| bad("`r` must be a positive integer".into()))?
            as usize;
        let alpha = field("lora_alpha").and_then(Value::as_f64).unwrap_or(8.0) as f32;
        let dropout = field("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0) as f32;
        let targets = match field("target_modules") {
            Some(Value::Array(xs)) => xs
                .iter()
                .map(|x| {
                    x.as_str()
                        .and_then(Target::parse)
                        .ok_or_else(|| bad(format!("unsupported target module {x}")))
                })
                .collect::<Result<Vec<_>>>()?,
            _ => return Err(bad("`target_modules` must be a list of module names".into())),
        };
        let config =
            LoraConfig::new(rank, alpha, dropout, &targets).map_err(|e| bad(e.to_string()))?;
        let file = TensorFile::open(&dir.join("adapter_model.safetensors"))?;
        let mut layers = Vec::with_capacity(model.num_hidden_layers);
        let mut used = 0;
        for i in 0..model.num_hidden_layers {
            let mut slots: [Option<LoraPair>; 7] = Default::default();
            for &t in &config.targets {
                let (fan_in, fan_out) = t.shape(model);
                let a = file.f32(&peft_name(i, t, "A"), &[rank, fan_in])?;
                let b = file.f32(&peft_name(i, t, "B"), &[fan_out, rank])?;
                for (name, vals) in [("A", &a), ("B", &b)] {
                    if vals.iter().any(|x| !x.is_finite()) {
                        return Err(ModelError::Adapter {
                            path: file.path().to_path_buf(),
                            message: format!("{} has non-finite values", peft_name(i, t, name)),
                        });
                    }
                }
                slots[t.index()] = Some(LoraPair {
                    a: tensor(a, [rank, fan_in], device),
                    b: tensor(b, [fan_out, rank], device),
                });
                used += 2;
            }
            layers.push(slots);
        }
        if let Some(extra) = file.names().find(|n| !n.contains("lora_")) {
            return Err(ModelError::Adapter {
                path: file.path().to_path_buf(),
                message: format!(
                    "unexpected tensor `{extra}` (only LoRA A/B matrices are supported)"
                ),
            });
        }
        let total = file.names().count();
        if total != used {
            return Err(ModelError::Adapter {
                path: file.path().to_path_buf(),
                message: format!("{total} tensors in file but the config implies {used}"),
            });
        }
        Ok(Self { config, layers })
    }
}

/// PEFT's name of one adapter tensor.
fn peft_name(layer: usize, t: Target, ab: &str) -> String {
    format!(
        "base_model.model.model.layers.{layer}.{}.lora_{ab}.weight",
        t.module_path()
    )
}

/// Concatenates tensors' values (row-major) into one flat vector.
pub fn flatten(tensors: &[Tensor<2>]) -> Vec<f32> {
    let mut out = Vec::with_capacity(tensors.iter().map(|t| t.dims()[0] * t.dims()[1]).sum());
    for t in tensors {
        out.extend(t.clone().into_data().iter::<f32>());
    }
    out
}

/// Splits a flat vector back into tensors shaped like the adapter's (canonical order).
pub fn unflatten(flat: &[f32], like: &LoraAdapter) -> Result<Vec<Tensor<2>>> {
    let mut out = Vec::new();
    let mut at = 0;
    for t in like.tensors() {
        let dims = t.dims();
        let n = dims[0] * dims[1];
        let part = flat
            .get(at..at + n)
            .ok_or_else(|| ModelError::InvalidArgument("flat gradient too short".into()))?;
        out.push(Tensor::from_data(
            TensorData::new(part.to_vec(), dims),
            &t.device(),
        ));
        at += n;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Backend;

    #[test]
    fn wire_order_sorts_by_peft_name_and_round_trips() {
        let c = LlamaConfig {
            vocab_size: 16,
            hidden_size: 8,
            intermediate_size: 16,
            num_hidden_layers: 12, // "layers.10" sorts before "layers.2"
            num_attention_heads: 2,
            num_key_value_heads: 1,
            head_dim: 4,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            tie_word_embeddings: true,
            max_position_embeddings: 64,
            bos_token_id: None,
            eos_token_ids: vec![],
            qkv_bias: false,
        };
        let device = Backend::default().device();
        let lora = LoraConfig::new(2, 4.0, 0.0, &[Target::Q, Target::V]).unwrap();
        let mut a = LoraAdapter::new(&c, lora, &device, 3);
        let specs = a.specs();
        assert!(specs.windows(2).all(|w| w[0].0 < w[1].0), "strictly sorted");
        // layers.0 (4 tensors), layers.1 (4), then layers.10 before layers.2.
        assert!(specs[8].0.contains("layers.10."), "{}", specs[8].0);
        let flat = a.to_flat();
        // The first values are the first-named tensor's.
        let first = a
            .tensor_names()
            .iter()
            .position(|n| *n == specs[0].0)
            .unwrap();
        let t0 = flatten(&[a.tensors()[first].clone()]);
        assert_eq!(&flat[..t0.len()], &t0[..]);
        let shifted: Vec<f32> = flat.iter().map(|x| x + 1.0).collect();
        a.set_flat(&shifted).unwrap();
        assert_eq!(a.to_flat(), shifted);
        assert!(a.set_flat(&shifted[1..]).is_err());
    }
}
