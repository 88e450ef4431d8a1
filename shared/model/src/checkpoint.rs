//! Loading and saving whole models: HuggingFace checkpoints (`config.json` + `model.safetensors`
//! with f32/f16/bf16 tensors) and Starling's quantized container.
//!
//! The container is an ordinary safetensors file, so standard tools can list it. Each quantized
//! matrix is a `U8` tensor holding its GGUF blocks (row-major, [`crate::quant`] describes the block
//! layouts) under the HF tensor name; the header's `__metadata__` carries
//! `"starling.format": "starling-q/1"` and `"starling.quant"`, a JSON object mapping each matrix
//! name to `{"type": "q8_0"|"q4_0"|"f32", "shape": [rows, cols]}`. Norm weights stay F32 tensors.
//! Nothing here runs the model.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use burn::tensor::Device;
use safetensors::Dtype;

use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::io::{write_atomic, write_safetensors, OutTensor, TensorFile};
use crate::lora::Target;
use crate::model::{Block, Frozen, Llama};
use crate::quant::{QMatrix, QuantType};

/// Metadata key that marks Starling's quantized container and its version.
pub const FORMAT_KEY: &str = "starling.format";
/// Current container version.
pub const FORMAT_VALUE: &str = "starling-q/1";
/// Metadata key of the per-matrix storage map.
pub const QUANT_KEY: &str = "starling.quant";

/// HF name of a block projection.
fn proj_name(layer: usize, t: Target) -> String {
    format!("model.layers.{layer}.{}.weight", t.module_path())
}

/// The HF name of `t`'s bias in `layer` (Qwen2's q/k/v biases).
fn bias_name(layer: usize, t: Target) -> String {
    format!("model.layers.{layer}.{}.bias", t.module_path())
}

/// Reads matrices from either an HF checkpoint or a Starling container.
struct Source {
    file: TensorFile,
    /// For containers: name → (type, rows, cols).
    quant: Option<HashMap<String, (QuantType, usize, usize)>>,
    /// Requested storage for HF checkpoints.
    target: QuantType,
}

impl Source {
    fn open(path: &Path, requested: Option<QuantType>) -> Result<Self> {
        let file = TensorFile::open(path)?;
        let bad = |message: String| ModelError::Safetensors {
            path: path.to_path_buf(),
            message,
        };
        let quant = match file.metadata().get(FORMAT_KEY) {
            None => None,
            Some(v) if v == FORMAT_VALUE => {
                let map_text = file
                    .metadata()
                    .get(QUANT_KEY)
                    .ok_or_else(|| bad(format!("missing `{QUANT_KEY}` metadata")))?;
                let raw: BTreeMap<String, serde_json::Value> = serde_json::from_str(map_text)
                    .map_err(|e| bad(format!("`{QUANT_KEY}` metadata: {e}")))?;
                let mut map = HashMap::new();
                for (name, v) in raw {
                    let kind = v
                        .get("type")
                        .and_then(|t| t.as_str())
                        .and_then(QuantType::from_name)
                        .ok_or_else(|| bad(format!("`{name}`: unknown storage type")))?;
                    let shape: Vec<usize> = v
                        .get("shape")
                        .and_then(|s| s.as_array())
                        .map(|a| {
                            a.iter()
                                .filter_map(|x| x.as_u64().map(|n| n as usize))
                                .collect()
                        })
                        .unwrap_or_default();
                    if shape.len() != 2 {
                        return Err(bad(format!("`{name}`: shape must be [rows, cols]")));
                    }
                    map.insert(name, (kind, shape[0], shape[1]));
                }
                Some(map)
            }
            Some(other) => return Err(bad(format!("unknown container version `{other}`"))),
        };
        Ok(Self {
            file,
            quant,
            target: requested.unwrap_or(QuantType::F32),
        })
    }

    /// For a container, the format its matrices are stored in (`f32` when none is quantized);
    /// `None` for an HF checkpoint.
    fn stored_kind(&self) -> Option<QuantType> {
        self.quant
            .as_ref()
            .map(|m| main_kind(m.values().map(|v| v.0)))
    }

    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        self.file.f32(name, &[len])
    }

    /// A `rows × cols` matrix in the requested storage (falls back to f32 when `cols` is not a
    /// multiple of the block size, as llama.cpp does).
    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<QMatrix> {
        match &self.quant {
            None => {
                let values = self.file.f32(name, &[rows, cols])?;
                let kind = self.target.for_row_len(cols);
                QMatrix::quantize(rows, cols, &values, kind)
            }
            Some(map) => {
                let &(kind, r, c) = map.get(name).ok_or_else(|| ModelError::MissingTensor {
                    path: self.file.path().to_path_buf(),
                    name: name.to_string(),
                })?;
                if (r, c) != (rows, cols) {
                    return Err(ModelError::ShapeMismatch {
                        path: self.file.path().to_path_buf(),
                        name: name.to_string(),
                        found: vec![r, c],
                        expected: vec![rows, cols],
                    });
                }
                let (_, bytes) = self.file.u8(name)?;
                QMatrix::from_bytes(rows, cols, kind, bytes).map_err(|e| ModelError::Safetensors {
                    path: self.file.path().to_path_buf(),
                    message: format!("`{name}`: {e}"),
                })
            }
        }
    }
}

/// How the weights in `dir` are stored, read from the safetensors header alone: `Some(kind)` for a
/// Starling container (its matrices' format, which loading keeps), `None` for an HF checkpoint (quantized
/// on load to whatever is asked). Lets a caller size a model before loading it.
pub fn stored_quant(dir: &Path) -> Result<Option<QuantType>> {
    use std::io::Read as _;
    let path = dir.join("model.safetensors");
    let bad = |message: String| ModelError::Safetensors {
        path: path.clone(),
        message,
    };
    let mut f = std::fs::File::open(&path).map_err(|e| ModelError::io(&path, e))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|e| ModelError::io(&path, e))?;
    let len = u64::from_le_bytes(len);
    if len > 100 << 20 {
        return Err(bad(format!("header of {len} bytes")));
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header)
        .map_err(|e| ModelError::io(&path, e))?;
    let json: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| bad(format!("header: {e}")))?;
    let meta = &json["__metadata__"];
    if meta[FORMAT_KEY].as_str() != Some(FORMAT_VALUE) {
        return Ok(None);
    }
    let map: BTreeMap<String, serde_json::Value> = meta[QUANT_KEY]
        .as_str()
        .and_then(|t| serde_json::from_str(t).ok())
        .ok_or_else(|| bad(format!("missing or malformed `{QUANT_KEY}` metadata")))?;
    Ok(Some(main_kind(map.values().filter_map(|v| {
        v["type"].as_str().and_then(QuantType::from_name)
    }))))
}

/// The format of a container: that of most of its quantized matrices (rows whose width does not
/// divide into blocks stay f32 in any container; an imported GGUF file may mix formats, as
/// SmolLM2's Q4_1 file with its Q8_0 embedding), f32 when none is quantized.
pub fn main_kind(kinds: impl Iterator<Item = QuantType>) -> QuantType {
    let mut counts: Vec<(QuantType, usize)> = Vec::new();
    for k in kinds.filter(|k| *k != QuantType::F32) {
        match counts.iter_mut().find(|(q, _)| *q == k) {
            Some((_, n)) => *n += 1,
            None => counts.push((k, 1)),
        }
    }
    // The first most frequent one (max_by_key would keep the last of equals).
    counts
        .iter()
        .fold(
            None,
            |best: Option<(QuantType, usize)>, &(k, n)| match best {
                Some((_, m)) if m >= n => best,
                _ => Some((k, n)),
            },
        )
        .map_or(QuantType::F32, |(k, _)| k)
}

impl Llama {
    /// Loads a model directory: `config.json` plus `model.safetensors` (an HF checkpoint, quantized
    /// on load to `quant` if given, or a Starling container, whose stored format is kept).
    pub fn load(dir: &Path, quant: Option<QuantType>, device: &Device) -> Result<Self> {
        let config = LlamaConfig::from_hf_file(&dir.join("config.json"))?;
        let weights = dir.join("model.safetensors");
        if !weights.is_file() && dir.join("model.safetensors.index.json").is_file() {
            return Err(ModelError::Safetensors {
                path: weights,
                message: "sharded checkpoints are not supported; merge the shards into one model.safetensors".into(),
            });
        }
        let src = Source::open(&weights, quant)?;
        // A container keeps the format it was written in; an HF checkpoint gets the requested one.
        let kind = src.stored_kind().unwrap_or(src.target);
        if let Some(q) = quant.filter(|q| *q != kind) {
            return Err(ModelError::InvalidArgument(format!(
                "{} is stored as {kind}; re-import the original checkpoint to get {q}",
                weights.display()
            )));
        }
        let c = &config;
        let h = c.hidden_size;
        let embed = Arc::new(src.matrix("model.embed_tokens.weight", c.vocab_size, h)?);
        let mut blocks = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let proj = Target::ALL.map(|t| {
                let (fan_in, fan_out) = t.shape(c);
                src.matrix(&proj_name(i, t), fan_out, fan_in)
                    .map(|m| Frozen(Arc::new(m)))
            });
            let [q, k, v, o, g, u, d] = proj;
            let qkv_bias = if c.qkv_bias {
                let bias = |t: Target| src.vector(&bias_name(i, t), t.shape(c).1);
                Some([bias(Target::Q)?, bias(Target::K)?, bias(Target::V)?])
            } else {
                None
            };
            blocks.push(Block {
                attn_norm: src.vector(&format!("model.layers.{i}.input_layernorm.weight"), h)?,
                proj: [q?, k?, v?, o?, g?, u?, d?],
                mlp_norm: src.vector(
                    &format!("model.layers.{i}.post_attention_layernorm.weight"),
                    h,
                )?,
                qkv_bias,
            });
        }
        let norm = src.vector("model.norm.weight", h)?;
        let lm_head = if c.tie_word_embeddings {
            Frozen(embed.clone())
        } else {
            Frozen(Arc::new(src.matrix("lm_head.weight", c.vocab_size, h)?))
        };
        Ok(Self {
            config,
            quant: kind,
            embed,
            blocks,
            norm,
            lm_head,
            device: device.clone(),
        })
    }

    /// Saves the model as `config.json` + a Starling container `model.safetensors` in `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
        let mut tensors = Vec::new();
        let mut map = BTreeMap::new();
        let mut push_matrix = |name: String, m: &QMatrix| {
            map.insert(
                name.clone(),
                serde_json::json!({"type": m.kind().name(), "shape": [m.rows(), m.cols()]}),
            );
            let bytes = m.to_bytes();
            tensors.push(OutTensor {
                name,
                dtype: Dtype::U8,
                shape: vec![bytes.len()],
                data: bytes,
            });
        };
        push_matrix("model.embed_tokens.weight".into(), &self.embed);
        for (i, b) in self.blocks.iter().enumerate() {
            for t in Target::ALL {
                push_matrix(proj_name(i, t), &b.proj[t as usize].0);
            }
        }
        if !self.config.tie_word_embeddings {
            push_matrix("lm_head.weight".into(), &self.lm_head.0);
        }
        for (i, b) in self.blocks.iter().enumerate() {
            tensors.push(OutTensor::f32(
                format!("model.layers.{i}.input_layernorm.weight"),
                vec![b.attn_norm.len()],
                &b.attn_norm,
            ));
            tensors.push(OutTensor::f32(
                format!("model.layers.{i}.post_attention_layernorm.weight"),
                vec![b.mlp_norm.len()],
                &b.mlp_norm,
            ));
            for t in [Target::Q, Target::K, Target::V] {
                if let Some(v) = b.bias(t) {
                    tensors.push(OutTensor::f32(bias_name(i, t), vec![v.len()], v));
                }
            }
        }
        tensors.push(OutTensor::f32(
            "model.norm.weight",
            vec![self.norm.len()],
            &self.norm,
        ));
        let meta = HashMap::from([
            (FORMAT_KEY.to_string(), FORMAT_VALUE.to_string()),
            (
                QUANT_KEY.to_string(),
                serde_json::to_string(&map).expect("JSON map serialises"),
            ),
        ]);
        write_safetensors(&dir.join("model.safetensors"), &tensors, meta)?;
        write_atomic(
            &dir.join("config.json"),
            self.config.to_hf_json().as_bytes(),
        )
    }
}

impl Llama {
    /// A randomly initialised model (weights ~ N(0, 0.02), norms 1), for benchmarks and tests
    /// that need a given shape rather than a trained model.
    pub fn random(
        config: LlamaConfig,
        quant: QuantType,
        device: &Device,
        seed: u64,
    ) -> Result<Self> {
        use rand::SeedableRng;
        use rand_distr_normal::sample_normal;
        config.validate().map_err(ModelError::InvalidArgument)?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let c = &config;
        let mut matrix = |rows: usize, cols: usize| -> Result<QMatrix> {
            let values: Vec<f32> = (0..rows * cols)
                .map(|_| 0.02 * sample_normal(&mut rng))
                .collect();
            let kind = quant.for_row_len(cols);
            QMatrix::quantize(rows, cols, &values, kind)
        };
        // Biases from their own stream, so a model without them keeps the weights it always had.
        let mut bias_rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0xb1a5);
        let embed = Arc::new(matrix(c.vocab_size, c.hidden_size)?);
        let mut blocks = Vec::new();
        for _ in 0..c.num_hidden_layers {
            let mut proj = Vec::new();
            for t in Target::ALL {
                let (fan_in, fan_out) = t.shape(c);
                proj.push(Frozen(Arc::new(matrix(fan_out, fan_in)?)));
            }
            let proj: [Frozen; 7] = proj.try_into().expect("seven projections");
            let qkv_bias = c.qkv_bias.then(|| {
                [Target::Q, Target::K, Target::V].map(|t| {
                    (0..t.shape(c).1)
                        .map(|_| 0.1 * sample_normal(&mut bias_rng))
                        .collect()
                })
            });
            blocks.push(Block {
                attn_norm: vec![1.0; c.hidden_size],
                proj,
                mlp_norm: vec![1.0; c.hidden_size],
                qkv_bias,
            });
        }
        let lm_head = if c.tie_word_embeddings {
            Frozen(embed.clone())
        } else {
            Frozen(Arc::new(matrix(c.vocab_size, c.hidden_size)?))
        };
        Ok(Self {
            norm: vec![1.0; c.hidden_size],
            config,
            quant,
            embed,
            blocks,
            lm_head,
            device: device.clone(),
        })
    }
}

/// A standard normal sample by the polar method (used only for weight initialisation, never for
/// privacy noise).
mod rand_distr_normal {
    use rand::Rng;

    pub fn sample_normal(rng: &mut impl Rng) -> f32 {
        loop {
            let u: f64 = rng.random_range(-1.0..1.0);
            let v: f64 = rng.random_range(-1.0..1.0);
            let s = u * u + v * v;
            if s > 0.0 && s < 1.0 {
                return (u * (-2.0 * s.ln() / s).sqrt()) as f32;
            }
        }
    }
}
