//! The Llama-style decoder: RMSNorm, rotary embeddings (HF's rotate-half convention), grouped-query
//! attention with a causal mask and KV cache, SwiGLU MLP, tied or untied output head, and Qwen2's
//! query/key/value biases.
//!
//! Frozen base weights are [`QMatrix`]es (f32, Q8_0, Q4_0 or Q4_1). Without autodiff the projections run
//! through the fused quantized kernels of [`crate::quant`]; under autodiff (training) they become
//! constant burn tensors, so gradients flow *through* them to the LoRA matrices but never *into*
//! them. Activations and LoRA are f32. Loading and saving live in `checkpoint`, training in
//! `train`, sampling in `generate`; this file is only the network.

use std::sync::Arc;

use burn::tensor::activation::{silu, softmax};
use burn::tensor::{Device, Tensor, TensorData};
use rand::{Rng, SeedableRng};

use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::lora::{LoraAdapter, Target};
use crate::quant::{QMatrix, QuantType};

/// A frozen projection `y = x · Wᵀ` with `W` of shape `[out, in]`.
#[derive(Debug, Clone)]
pub struct Frozen(pub Arc<QMatrix>);

impl Frozen {
    /// Applies the projection to `x` of shape `[n, in]`.
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let w = &self.0;
        let [n, _] = x.dims();
        let device = x.device();
        if x.is_autodiff() {
            // Training: a constant (non-tracked) tensor, so autodiff computes dx = dy · W and
            // records nothing for W itself.
            let wt =
                Tensor::<2>::from_data(TensorData::new(w.to_f32(), [w.rows(), w.cols()]), &device);
            x.matmul(wt.transpose())
        } else {
            let xs = x
                .into_data()
                .try_into_vec::<f32>()
                .expect("activations are f32");
            Tensor::from_data(TensorData::new(w.matmul_t(&xs, n), [n, w.rows()]), &device)
        }
    }
}

/// One decoder block's frozen weights.
#[derive(Debug, Clone)]
pub struct Block {
    /// RMSNorm weight before attention.
    pub attn_norm: Vec<f32>,
    /// Projections in `Target` order: q, k, v, o, gate, up, down.
    pub proj: [Frozen; 7],
    /// RMSNorm weight before the MLP.
    pub mlp_norm: Vec<f32>,
    /// Biases of the query, key and value projections (Qwen2), frozen like the weights.
    pub qkv_bias: Option<[Vec<f32>; 3]>,
}

impl Block {
    /// The bias `target`'s projection adds, if any (only q, k and v ever have one).
    pub fn bias(&self, target: Target) -> Option<&[f32]> {
        let b = self.qkv_bias.as_ref()?;
        match target {
            Target::Q => Some(&b[0]),
            Target::K => Some(&b[1]),
            Target::V => Some(&b[2]),
            _ => None,
        }
    }

    /// Adds `target`'s bias (if any) to every row of `y`, rows of `width` values whose columns
    /// `col..` hold the projection's output (the native paths keep q, k and v side by side or apart).
    pub fn add_bias(&self, target: Target, y: &mut [f32], width: usize, col: usize) {
        if let Some(b) = self.bias(target) {
            for row in y.chunks_exact_mut(width) {
                row[col..col + b.len()]
                    .iter_mut()
                    .zip(b)
                    .for_each(|(v, c)| *v += c);
            }
        }
    }
}

/// Key/value cache for incremental decoding: per layer `[batch, kv_heads, len, head_dim]`.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor<4>, Tensor<4>)>>,
    len: usize,
}

impl KvCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of positions already cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Randomness for LoRA dropout during training.
pub struct Dropout {
    rng: rand::rngs::StdRng,
}

impl Dropout {
    /// A seeded dropout source.
    pub fn new(seed: u64) -> Self {
        Self {
            rng: rand::rngs::StdRng::seed_from_u64(seed),
        }
    }

    /// A fresh seed for the native engine's masks (one per micro-batch).
    pub(crate) fn next_seed(&mut self) -> u64 {
        self.rng.random()
    }

    fn apply(&mut self, x: Tensor<2>, p: f32) -> Tensor<2> {
        if p <= 0.0 {
            return x;
        }
        let dims = x.dims();
        let keep = 1.0 / (1.0 - p);
        let mask: Vec<f32> = (0..dims[0] * dims[1])
            .map(|_| {
                if self.rng.random::<f32>() < p {
                    0.0
                } else {
                    keep
                }
            })
            .collect();
        let device = x.device();
        x * Tensor::from_data(TensorData::new(mask, dims), &device)
    }
}

/// A loaded Llama-style model with frozen (possibly quantized) base weights.
#[derive(Debug, Clone)]
pub struct Llama {
    /// Architecture.
    pub config: LlamaConfig,
    /// Storage format of the frozen projections and embedding.
    pub quant: QuantType,
    /// Token embedding `[vocab, hidden]`.
    pub embed: Arc<QMatrix>,
    /// Decoder blocks.
    pub blocks: Vec<Block>,
    /// Final RMSNorm weight.
    pub norm: Vec<f32>,
    /// Output head `[vocab, hidden]` (the embedding itself when tied).
    pub lm_head: Frozen,
    /// Device (backend) the activations live on.
    pub device: Device,
}

impl Llama {
    /// Bytes the frozen weights occupy in memory (the tied head counted once).
    pub fn resident_weight_bytes(&self) -> usize {
        let mut total = self.embed.resident_bytes() + 4 * self.norm.len();
        for b in &self.blocks {
            total += 4 * (b.attn_norm.len() + b.mlp_norm.len());
            total += 4 * b.qkv_bias.iter().flatten().map(Vec::len).sum::<usize>();
            total += b.proj.iter().map(|p| p.0.resident_bytes()).sum::<usize>();
        }
        if !self.config.tie_word_embeddings {
            total += self.lm_head.0.resident_bytes();
        }
        total
    }

    /// Checks that an adapter was made for this model's shapes.
    pub fn check_adapter(&self, adapter: &LoraAdapter) -> Result<()> {
        if adapter.layers.len() != self.config.num_hidden_layers {
            return Err(ModelError::Adapter {
                path: "<memory>".into(),
                message: format!(
                    "adapter has {} layers, model has {}",
                    adapter.layers.len(),
                    self.config.num_hidden_layers
                ),
            });
        }
        for (i, layer) in adapter.layers.iter().enumerate() {
            for t in Target::ALL {
                if let Some(p) = layer[t as usize].as_ref() {
                    let (fan_in, fan_out) = t.shape(&self.config);
                    let r = adapter.config.rank;
                    if p.a.dims() != [r, fan_in] || p.b.dims() != [fan_out, r] {
                        return Err(ModelError::Adapter {
                            path: "<memory>".into(),
                            message: format!("layer {i} {}: wrong shapes", t.module_name()),
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// Logits `[batch, seq, vocab]` for `ids` (row-major `[batch, seq]`).
    ///
    /// With a cache, the new positions continue after the cached ones and the cache is extended.
    /// With `dropout`, LoRA dropout is applied (training); LoRA tensors that are autodiff-tracked
    /// make the output differentiable with respect to them.
    pub fn forward(
        &self,
        ids: &[u32],
        batch: usize,
        adapter: Option<&LoraAdapter>,
        mut cache: Option<&mut KvCache>,
        mut dropout: Option<&mut Dropout>,
    ) -> Result<Tensor<3>> {
        let c = &self.config;
        if batch == 0 || ids.is_empty() || !ids.len().is_multiple_of(batch) {
            return Err(ModelError::InvalidArgument(format!(
                "{} ids do not form a batch of {batch} sequences",
                ids.len()
            )));
        }
        if let Some(a) = adapter {
            self.check_adapter(a)?;
        }
        let seq = ids.len() / batch;
        let offset = cache.as_ref().map_or(0, |k| k.len);
        let (h, hd) = (c.hidden_size, c.head_dim);
        let (nh, nkv) = (c.num_attention_heads, c.num_key_value_heads);
        let rep = nh / nkv;
        let n = batch * seq;
        // Training ids may carry the NO_LOSS mark (chat context): the model reads their tokens.
        let emb = self.embed.gather_rows(&crate::data::tokens(ids))?;
        let mut x = Tensor::<2>::from_data(TensorData::new(emb, [n, h]), &self.device);
        if adapter.is_some_and(|a| a.tensors().iter().any(|t| t.is_autodiff())) {
            x = x.autodiff();
        }
        let (cos, sin) = rope_tables(c, offset, seq, &self.device);
        let mask = causal_mask(seq, offset, rep, &self.device);
        let scale = 1.0 / (hd as f64).sqrt();
        if let Some(k) = cache.as_deref_mut() {
            if k.layers.len() != c.num_hidden_layers {
                k.layers = vec![None; c.num_hidden_layers];
            }
        }
        for (li, block) in self.blocks.iter().enumerate() {
            let xn = rms_norm(x.clone(), &block.attn_norm, c.rms_norm_eps, &self.device);
            let mut proj = |t: Target, inp: Tensor<2>| -> Tensor<2> {
                let mut base = block.proj[t as usize].forward(inp.clone());
                if let Some(b) = block.bias(t) {
                    let b = Tensor::<1>::from_data(
                        TensorData::new(b.to_vec(), [b.len()]),
                        &self.device,
                    );
                    base = base + b.unsqueeze::<2>();
                }
                match adapter.and_then(|a| a.pair(li, t)) {
                    None => base,
                    Some(p) => {
                        let s = adapter.map_or(1.0, |a| a.config.scaling());
                        let p_drop = adapter.map_or(0.0, |a| a.config.dropout);
                        let inp = match dropout.as_deref_mut() {
                            Some(d) => d.apply(inp, p_drop),
                            None => inp,
                        };
                        base + inp
                            .matmul(p.a.clone().transpose())
                            .matmul(p.b.clone().transpose())
                            * s
                    }
                }
            };
            let q = proj(Target::Q, xn.clone())
                .reshape([batch, seq, nh, hd])
                .swap_dims(1, 2);
            let k = proj(Target::K, xn.clone())
                .reshape([batch, seq, nkv, hd])
                .swap_dims(1, 2);
            let v = proj(Target::V, xn)
                .reshape([batch, seq, nkv, hd])
                .swap_dims(1, 2);
            let q = apply_rope(q, &cos, &sin);
            let mut k = apply_rope(k, &cos, &sin);
            let mut v = v;
            if let Some(kc) = cache.as_deref_mut() {
                if let Some((pk, pv)) = kc.layers[li].take() {
                    k = Tensor::cat(vec![pk, k], 2);
                    v = Tensor::cat(vec![pv, v], 2);
                }
                kc.layers[li] = Some((k.clone(), v.clone()));
            }
            let total = offset + seq;
            // Grouped-query attention without repeating K/V: fold the `rep` query heads that
            // share a KV head into the query-length axis.
            let q = q.reshape([batch, nkv, rep * seq, hd]);
            let scores = q.matmul(k.swap_dims(2, 3)) * scale + mask.clone().unsqueeze::<4>();
            let probs = softmax(scores, 3);
            let att = probs
                .matmul(v)
                .reshape([batch, nh, seq, hd])
                .swap_dims(1, 2)
                .reshape([n, nh * hd]);
            debug_assert_eq!(mask.dims(), [rep * seq, total]);
            x = x + proj(Target::O, att);
            let xn = rms_norm(x.clone(), &block.mlp_norm, c.rms_norm_eps, &self.device);
            let gate = proj(Target::Gate, xn.clone());
            let up = proj(Target::Up, xn);
            x = x + proj(Target::Down, silu(gate) * up);
        }
        if let Some(kc) = cache {
            kc.len += seq;
        }
        let x = rms_norm(x, &self.norm, c.rms_norm_eps, &self.device);
        Ok(self.lm_head.forward(x).reshape([batch, seq, c.vocab_size]))
    }
}

impl Llama {
    /// Runs `ids` (one sequence) after the cached positions and returns the last position's logits.
    pub fn next_logits(
        &self,
        ids: &[u32],
        adapter: Option<&LoraAdapter>,
        cache: &mut KvCache,
    ) -> Result<Vec<f32>> {
        let logits = self.forward(ids, 1, adapter, Some(cache), None)?;
        let [_, seq, vocab] = logits.dims();
        logits
            .narrow(1, seq - 1, 1)
            .reshape([vocab])
            .into_data()
            .try_into_vec::<f32>()
            .map_err(|e| ModelError::InvalidArgument(format!("logits: {e:?}")))
    }
}

/// RMSNorm over the last axis: `x / sqrt(mean(x²) + eps) * w`.
fn rms_norm(x: Tensor<2>, w: &[f32], eps: f64, device: &Device) -> Tensor<2> {
    let w = Tensor::<1>::from_data(TensorData::new(w.to_vec(), [w.len()]), device).unsqueeze::<2>();
    let var = x.clone().powi_scalar(2).mean_dim(1);
    x * (var + eps).sqrt().recip() * w
}

/// Cos/sin tables `[seq, head_dim]` for positions `offset..offset+seq` (HF layout: the half-size
/// frequency vector repeated twice), computed in f64 and rounded once.
fn rope_tables(
    c: &LlamaConfig,
    offset: usize,
    seq: usize,
    device: &Device,
) -> (Tensor<2>, Tensor<2>) {
    let hd = c.head_dim;
    let half = hd / 2;
    let mut cos = Vec::with_capacity(seq * hd);
    let mut sin = Vec::with_capacity(seq * hd);
    for p in offset..offset + seq {
        for _ in 0..2 {
            for i in 0..half {
                let inv = 1.0 / c.rope_theta.powf((2 * i) as f64 / hd as f64);
                let ang = p as f64 * inv;
                cos.push(ang.cos() as f32);
                sin.push(ang.sin() as f32);
            }
        }
    }
    (
        Tensor::from_data(TensorData::new(cos, [seq, hd]), device),
        Tensor::from_data(TensorData::new(sin, [seq, hd]), device),
    )
}

/// `x·cos + rotate_half(x)·sin` for `x` of shape `[batch, heads, seq, head_dim]`.
fn apply_rope(x: Tensor<4>, cos: &Tensor<2>, sin: &Tensor<2>) -> Tensor<4> {
    let [_, _, _, hd] = x.dims();
    let half = hd / 2;
    let x1 = x.clone().narrow(3, 0, half);
    let x2 = x.clone().narrow(3, half, half);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    x * cos.clone().unsqueeze::<4>() + rotated * sin.clone().unsqueeze::<4>()
}

/// Additive causal mask `[rep * seq, offset + seq]`: row `r` is query position `r % seq`.
fn causal_mask(seq: usize, offset: usize, rep: usize, device: &Device) -> Tensor<2> {
    let total = offset + seq;
    let mut m = vec![0.0f32; rep * seq * total];
    for r in 0..rep * seq {
        let qpos = offset + r % seq;
        for k in qpos + 1..total {
            m[r * total + k] = -1.0e30;
        }
    }
    Tensor::from_data(TensorData::new(m, [rep * seq, total]), device)
}
