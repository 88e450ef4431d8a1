//! The native inference path: the forward pass of [`Llama`] on plain f32 buffers with a KV cache,
//! for generation and evaluation. The burn model (`model`) stays the reference; this path is what
//! devices and the simulator run.
//!
//! - Decoding (a few rows at a time): each activation row is quantized to 8-bit blocks once per
//!   matrix product ([`ActQ8`]) and dotted against the Q8_0 / Q4_0 / Q4_1 weight blocks with integer
//!   multiply-adds ([`crate::kernels`], AVX2 / NEON / portable, detected at run time) — llama.cpp's
//!   scheme; f32 weights use an f32 dot. Q, K and V are one job, gate and up are one job.
//! - Prefill (more rows): weights are expanded a tile of rows at a time into a per-thread scratch
//!   and multiplied with a GEMM.
//! - The rows of every product are split across the threads of a [`Pool`] (spinning workers, no
//!   per-job thread wake-ups); attention is split by head.
//! - A LoRA adapter is applied at run time (`x·Aᵀ` once per product, then `s·B` added to the output
//!   rows each thread owns), or merged into the weights beforehand ([`crate::lora::LoraAdapter::merge_into`]).
//!
//! Tests compare the logits with the burn model (`tests/infer.rs`). This module reads no files and
//! knows nothing of tokenizers or sampling.

use std::sync::Arc;

use crate::error::{ModelError, Result};
use crate::kernels::{
    dot_f32, gemv_f32, gemv_q4_0, gemv_q4_0x8, gemv_q4_1, gemv_q8_0, mix, scores, ActQ8, Isa,
};
use crate::lora::{LoraAdapter, Target};
use crate::model::Llama;
use crate::pool::{split, Pool};
use crate::quant::{QMatrix, Storage, QK};

/// Rows up to which a product runs as integer dot products per row; above, tiles + GEMM.
const GEMV_MAX_ROWS: usize = 8;
/// The same for interleaved Q4_0, whose eight-row kernel beats expanding the weights for a GEMM
/// up to prompts of this length (measured on the M shape: 594 against 297 prompt tokens/s).
const GEMV_MAX_ROWS_Q4_0X8: usize = 64;
/// Weight rows a thread runs at a time through every input row on the integer path.
const ROW_CHUNK: usize = 16;
/// Weight rows expanded at a time per thread on the GEMM path.
const TILE: usize = 64;

/// A raw pointer that may cross to the pool's threads; every use writes a range no other thread
/// touches during the job.
#[derive(Clone, Copy)]
struct SyncPtr(*mut f32);
impl SyncPtr {
    /// The pointer `i` values further (a method, so closures capture the whole `Sync` wrapper).
    fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}
// SAFETY: see the type's documentation; jobs partition the pointed-to buffer.
unsafe impl Send for SyncPtr {}
// SAFETY: as above.
unsafe impl Sync for SyncPtr {}

/// One adapted projection at run time: `y += scale · B · (A · x)`.
#[derive(Debug, Clone)]
struct RtLora {
    /// `r × in`, row-major.
    a: Vec<f32>,
    /// `out × r`, row-major (row `o` is contiguous).
    b: Vec<f32>,
    rank: usize,
    scale: f32,
}

/// A model prepared for fast inference: the weights (shared, still quantized), an optional LoRA
/// adapter applied at run time, the kernels' instruction set and the thread pool.
#[derive(Debug, Clone)]
pub struct Runner {
    model: Arc<Llama>,
    lora: Vec<[Option<RtLora>; 7]>,
    isa: Isa,
    pool: Arc<Pool>,
}

/// One matrix product of a job: the weights, an optional LoRA and the output buffer (`m × rows`).
struct Product<'a> {
    w: &'a QMatrix,
    lora: Option<&'a RtLora>,
    /// `m × rank` values of `x · Aᵀ`, when `lora` is set.
    u: &'a [f32],
    out: SyncPtr,
}

impl Runner {
    /// Prepares `model` (and `adapter`, applied at run time) with the global pool and the best
    /// instruction set of this CPU.
    pub fn new(model: Arc<Llama>, adapter: Option<&LoraAdapter>) -> Result<Self> {
        Self::with(model, adapter, Pool::global(), Isa::detect())
    }

    /// As [`Runner::new`] with a given pool and instruction set (tests and benchmarks).
    pub fn with(
        model: Arc<Llama>,
        adapter: Option<&LoraAdapter>,
        pool: Arc<Pool>,
        isa: Isa,
    ) -> Result<Self> {
        let c = &model.config;
        let mut lora: Vec<[Option<RtLora>; 7]> = (0..c.num_hidden_layers)
            .map(|_| Default::default())
            .collect();
        if let Some(a) = adapter {
            model.check_adapter(a)?;
            let scale = a.config.scaling();
            for (li, slots) in lora.iter_mut().enumerate() {
                for t in Target::ALL {
                    if let Some(p) = a.pair(li, t) {
                        let values = |x: &burn::tensor::Tensor<2>| -> Result<Vec<f32>> {
                            x.to_data()
                                .convert::<f32>()
                                .try_into_vec::<f32>()
                                .map_err(|e| ModelError::InvalidArgument(format!("{e:?}")))
                        };
                        slots[t as usize] = Some(RtLora {
                            a: values(&p.a)?,
                            b: values(&p.b)?,
                            rank: a.config.rank,
                            scale,
                        });
                    }
                }
            }
        }
        Ok(Self {
            model,
            lora,
            isa,
            pool,
        })
    }

    /// The model this runner runs.
    pub fn model(&self) -> &Llama {
        &self.model
    }

    /// The instruction set of the kernels.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// Threads used per product.
    pub fn threads(&self) -> usize {
        self.pool.threads()
    }

    /// A new decoding session (empty KV cache).
    pub fn session(&self) -> Session<'_> {
        let c = &self.model.config;
        Session {
            runner: self,
            k: vec![vec![Vec::new(); c.num_key_value_heads]; c.num_hidden_layers],
            v: vec![vec![Vec::new(); c.num_key_value_heads]; c.num_hidden_layers],
            len: 0,
            rope: Vec::new(),
        }
    }

    /// Logits of every position of `ids` (row-major `ids.len() × vocab`), from an empty cache.
    pub fn logits_all(&self, ids: &[u32]) -> Result<Vec<f32>> {
        self.session().forward(ids, true)
    }

    /// `out[m × rows] = x[m × cols] · Wᵀ (+ LoRA)` for each product, all in one pool job.
    fn products(&self, x: &[f32], m: usize, prods: &[Product<'_>]) {
        let total: usize = prods.iter().map(|p| p.w.rows()).sum();
        let isa = self.isa;
        let interleaved = prods
            .iter()
            .all(|p| matches!(p.w.storage(), Storage::Q4_0x8(_)));
        let gemv_max = if interleaved {
            GEMV_MAX_ROWS_Q4_0X8
        } else {
            GEMV_MAX_ROWS
        };
        if m <= gemv_max {
            let cols = prods[0].w.cols();
            let quantized = prods
                .iter()
                .any(|p| !matches!(p.w.storage(), Storage::F32(_)));
            let acts: Vec<ActQ8> = if quantized {
                x.chunks_exact(cols)
                    .map(|row| {
                        let mut a = ActQ8::default();
                        a.quantize(row);
                        a
                    })
                    .collect()
            } else {
                Vec::new()
            };
            self.pool.run(&|t| {
                let range = split(t, self.pool.threads(), total);
                let mut base = 0;
                for p in prods {
                    let n = p.w.rows();
                    // Interleaved Q4_0 runs in groups of eight rows: every thread rounds the
                    // boundaries the same way, so the shares stay disjoint and complete.
                    let align = if matches!(p.w.storage(), Storage::Q4_0x8(_)) {
                        8
                    } else {
                        1
                    };
                    let round = |v: usize| ((v.min(n) + align / 2) / align * align).min(n);
                    let lo = round(range.start.max(base) - base);
                    let hi = round(range.end.min(base + n).saturating_sub(base));
                    base += n;
                    if lo >= hi {
                        continue;
                    }
                    let k = p.w.cols();
                    let bpr = k / QK;
                    // Chunks of rows stay in cache while every input row passes over them.
                    let mut buf = [0.0f32; ROW_CHUNK];
                    let mut c0 = lo;
                    while c0 < hi {
                        let c1 = (c0 + ROW_CHUNK).min(hi);
                        let ys = &mut buf[..c1 - c0];
                        for j in 0..m {
                            match p.w.storage() {
                                Storage::F32(v) => {
                                    gemv_f32(isa, &v[c0 * k..c1 * k], &x[j * k..(j + 1) * k], ys)
                                }
                                Storage::Q8_0(b) => {
                                    gemv_q8_0(isa, &b[c0 * bpr..c1 * bpr], &acts[j], ys)
                                }
                                Storage::Q4_0(b) => {
                                    gemv_q4_0(isa, &b[c0 * bpr..c1 * bpr], &acts[j], ys)
                                }
                                Storage::Q4_1(b) => {
                                    gemv_q4_1(isa, &b[c0 * bpr..c1 * bpr], &acts[j], ys)
                                }
                                Storage::Q4_0x8(b) => {
                                    gemv_q4_0x8(isa, &b[c0 / 8 * bpr..c1 / 8 * bpr], &acts[j], ys)
                                }
                            }
                            if let Some(l) = p.lora {
                                let u = &p.u[j * l.rank..(j + 1) * l.rank];
                                for (i, y) in ys.iter_mut().enumerate() {
                                    let r = c0 + i;
                                    *y += l.scale
                                        * dot_f32(isa, &l.b[r * l.rank..(r + 1) * l.rank], u);
                                }
                            }
                            // SAFETY: rows c0..c1 of output row j belong to this thread alone.
                            unsafe {
                                std::ptr::copy_nonoverlapping(
                                    ys.as_ptr(),
                                    p.out.at(j * n + c0),
                                    c1 - c0,
                                )
                            };
                        }
                        c0 = c1;
                    }
                }
            });
            return;
        }
        // GEMM path: tiles of TILE weight rows, dealt round the threads in contiguous runs.
        let tiles: Vec<(usize, usize)> = prods
            .iter()
            .enumerate()
            .flat_map(|(pi, p)| (0..p.w.rows().div_ceil(TILE)).map(move |t| (pi, t * TILE)))
            .collect();
        self.pool.run(&|t| {
            let mut scratch = Vec::new();
            for &(pi, r0) in &tiles[split(t, self.pool.threads(), tiles.len())] {
                let p = &prods[pi];
                let (n, k) = (p.w.rows(), p.w.cols());
                let nt = TILE.min(n - r0);
                let w: &[f32] = match p.w.storage() {
                    Storage::F32(v) => &v[r0 * k..(r0 + nt) * k],
                    _ => {
                        scratch.resize(nt * k, 0.0);
                        for (i, row) in scratch.chunks_exact_mut(k).enumerate() {
                            p.w.dequantize_row(r0 + i, row);
                        }
                        &scratch
                    }
                };
                // SAFETY: columns r0..r0+nt of every output row belong to this tile alone; the
                // GEMM writes exactly m rows of nt values at stride n.
                unsafe { gemm_raw(x, w, m, nt, k, p.out.at(r0), n, 0.0) };
                if let Some(l) = p.lora {
                    let b = &l.b[r0 * l.rank..(r0 + nt) * l.rank];
                    // SAFETY: as above; accumulates s · U · Bᵀ into the same columns.
                    unsafe { gemm_raw(p.u, b, m, nt, l.rank, p.out.at(r0), n, l.scale) };
                }
            }
        });
    }
}

/// `dst[m × n] (stride ldo) = Σ_k a[m × k] · b[n × k]`, or `dst += beta · …` when `beta != 0`
/// (beta is then the factor on the product), single-threaded.
///
/// # Safety
/// `dst` must be valid for writes of `m` rows of `n` values at stride `ldo`, and no other thread
/// may touch those values during the call.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_raw(
    a: &[f32],
    b: &[f32],
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    ldo: usize,
    beta: f32,
) {
    assert!(a.len() >= m * k && b.len() >= n * k);
    let (alpha, factor, read) = if beta == 0.0 {
        (0.0, 1.0, false)
    } else {
        (1.0, beta, true)
    };
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        ldo as isize,
        read,
        a.as_ptr(),
        1,
        k as isize,
        b.as_ptr(),
        k as isize,
        1,
        alpha,
        factor,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

/// A decoding session: the KV cache of one sequence and the positions it holds.
#[derive(Debug)]
pub struct Session<'r> {
    runner: &'r Runner,
    /// Per layer, per kv head: keys, `[position][head_dim]` (a head's keys are contiguous).
    k: Vec<Vec<Vec<f32>>>,
    /// Per layer, per kv head: values, same layout.
    v: Vec<Vec<Vec<f32>>>,
    len: usize,
    /// Rotary (cos, sin) per position, `head_dim / 2` each, grown as positions are reached.
    rope: Vec<(Vec<f32>, Vec<f32>)>,
}

impl Session<'_> {
    /// Positions already in the cache.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Runs `ids` after the cached positions and returns the logits of the last one (`vocab`).
    pub fn next_logits(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        self.forward(ids, false)
    }

    /// Runs `ids` after the cached positions; returns the logits of every new position
    /// (`ids.len() × vocab`) when `all`, else of the last one.
    pub fn forward(&mut self, ids: &[u32], all: bool) -> Result<Vec<f32>> {
        let r = self.runner;
        let model = &*r.model;
        let c = &model.config;
        if ids.is_empty() {
            return Err(ModelError::InvalidArgument(
                "nothing to run: no token ids".into(),
            ));
        }
        let m = ids.len();
        let (h, hd) = (c.hidden_size, c.head_dim);
        let (nh, nkv) = (c.num_attention_heads, c.num_key_value_heads);
        let limit = c.max_position_embeddings;
        if self.len + m > limit {
            return Err(ModelError::InvalidArgument(format!(
                "{} positions exceed the model's context of {limit}",
                self.len + m
            )));
        }
        let mut x = model.embed.gather_rows(ids)?;
        self.grow_rope(self.len + m, c.rope_theta, hd);
        let (qd, kvd, inter) = (nh * hd, nkv * hd, c.intermediate_size);
        let mut xn = vec![0.0f32; m * h];
        let mut q = vec![0.0f32; m * qd];
        let mut kn = vec![0.0f32; m * kvd];
        let mut vn = vec![0.0f32; m * kvd];
        let mut att = vec![0.0f32; m * qd];
        let mut o = vec![0.0f32; m * h];
        let mut gate = vec![0.0f32; m * inter];
        let mut up = vec![0.0f32; m * inter];
        for (li, block) in model.blocks.iter().enumerate() {
            let lora = &r.lora[li];
            rms_norm_rows(&x, &block.attn_norm, c.rms_norm_eps, &mut xn);
            let u = |t: Target, inp: &[f32]| lora_u(r.isa, lora[t as usize].as_ref(), inp, m);
            let (uq, uk, uv) = (u(Target::Q, &xn), u(Target::K, &xn), u(Target::V, &xn));
            r.products(
                &xn,
                m,
                &[
                    product(&block.proj[0].0, lora[0].as_ref(), &uq, &mut q),
                    product(&block.proj[1].0, lora[1].as_ref(), &uk, &mut kn),
                    product(&block.proj[2].0, lora[2].as_ref(), &uv, &mut vn),
                ],
            );
            block.add_bias(Target::Q, &mut q, qd, 0);
            block.add_bias(Target::K, &mut kn, kvd, 0);
            block.add_bias(Target::V, &mut vn, kvd, 0);
            for i in 0..m {
                let (cos, sin) = &self.rope[self.len + i];
                for hq in q[i * qd..(i + 1) * qd].chunks_exact_mut(hd) {
                    rope(hq, cos, sin);
                }
                for hk in kn[i * kvd..(i + 1) * kvd].chunks_exact_mut(hd) {
                    rope(hk, cos, sin);
                }
            }
            for i in 0..m {
                for g in 0..nkv {
                    let at = i * kvd + g * hd..i * kvd + (g + 1) * hd;
                    self.k[li][g].extend_from_slice(&kn[at.clone()]);
                    self.v[li][g].extend_from_slice(&vn[at]);
                }
            }
            self.attention(li, &q, m, &mut att);
            let uo = u(Target::O, &att);
            r.products(
                &att,
                m,
                &[product(&block.proj[3].0, lora[3].as_ref(), &uo, &mut o)],
            );
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            rms_norm_rows(&x, &block.mlp_norm, c.rms_norm_eps, &mut xn);
            let (ug, uu) = (u(Target::Gate, &xn), u(Target::Up, &xn));
            r.products(
                &xn,
                m,
                &[
                    product(&block.proj[4].0, lora[4].as_ref(), &ug, &mut gate),
                    product(&block.proj[5].0, lora[5].as_ref(), &uu, &mut up),
                ],
            );
            for (g, u) in gate.iter_mut().zip(&up) {
                *g = *g / (1.0 + (-*g).exp()) * u;
            }
            let ud = u(Target::Down, &gate);
            r.products(
                &gate,
                m,
                &[product(&block.proj[6].0, lora[6].as_ref(), &ud, &mut o)],
            );
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
        }
        self.len += m;
        let rows = if all { m } else { 1 };
        let last = &x[(m - rows) * h..];
        let mut normed = vec![0.0f32; rows * h];
        rms_norm_rows(last, &model.norm, c.rms_norm_eps, &mut normed);
        let mut logits = vec![0.0f32; rows * c.vocab_size];
        r.products(
            &normed,
            rows,
            &[product(&model.lm_head.0, None, &[], &mut logits)],
        );
        Ok(logits)
    }

    /// Causal grouped-query attention of the `m` newest positions over the cache of layer `li`,
    /// heads split across the pool.
    fn attention(&self, li: usize, q: &[f32], m: usize, out: &mut [f32]) {
        let r = self.runner;
        let c = &r.model.config;
        let (hd, nh, nkv) = (c.head_dim, c.num_attention_heads, c.num_key_value_heads);
        let (qd, rep) = (nh * hd, nh / nkv);
        let scale = 1.0 / (hd as f32).sqrt();
        let (keys, values) = (&self.k[li], &self.v[li]);
        let start = self.len; // cache positions before this call
        let outp = SyncPtr(out.as_mut_ptr());
        let isa = r.isa;
        let job = |t: usize| {
            let mut w = Vec::new();
            let mut acc = vec![0.0f32; hd];
            for head in split(t, r.pool.threads(), nh) {
                let g = head / rep;
                for i in 0..m {
                    let qi = &q[i * qd + head * hd..i * qd + (head + 1) * hd];
                    let ctx = start + i + 1;
                    w.resize(ctx, 0.0);
                    scores(isa, qi, &keys[g][..ctx * hd], scale, &mut w);
                    let max = w.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
                    let mut sum = 0.0f32;
                    for s in w.iter_mut() {
                        *s = (*s - max).exp();
                        sum += *s;
                    }
                    let inv = 1.0 / sum;
                    w.iter_mut().for_each(|s| *s *= inv);
                    mix(isa, &w, &values[g][..ctx * hd], &mut acc);
                    // SAFETY: head `head` of row i is written by the thread that owns the head.
                    unsafe {
                        std::ptr::copy_nonoverlapping(acc.as_ptr(), outp.at(i * qd + head * hd), hd)
                    };
                }
            }
        };
        let work = m * (start + m) * nh * hd;
        if work < 1 << 15 {
            // Too little to be worth a dispatch: every share on this thread.
            for t in 0..r.pool.threads() {
                job(t);
            }
        } else {
            r.pool.run(&job);
        }
    }

    /// Extends the rotary tables to `n` positions (HF's layout, angles in f64 rounded once).
    fn grow_rope(&mut self, n: usize, theta: f64, hd: usize) {
        let half = hd / 2;
        while self.rope.len() < n {
            let p = self.rope.len() as f64;
            let (mut cos, mut sin) = (Vec::with_capacity(half), Vec::with_capacity(half));
            for i in 0..half {
                let inv = 1.0 / theta.powf((2 * i) as f64 / hd as f64);
                cos.push((p * inv).cos() as f32);
                sin.push((p * inv).sin() as f32);
            }
            self.rope.push((cos, sin));
        }
    }
}

/// A product writing into `out`.
fn product<'a>(
    w: &'a QMatrix,
    lora: Option<&'a RtLora>,
    u: &'a [f32],
    out: &mut [f32],
) -> Product<'a> {
    debug_assert!(out.len().is_multiple_of(w.rows()));
    Product {
        w,
        lora,
        u,
        out: SyncPtr(out.as_mut_ptr()),
    }
}

/// `x · Aᵀ` (`m × rank`) for an adapted projection, else nothing.
fn lora_u(isa: Isa, l: Option<&RtLora>, x: &[f32], m: usize) -> Vec<f32> {
    let Some(l) = l else { return Vec::new() };
    let k = x.len() / m;
    let mut u = vec![0.0f32; m * l.rank];
    for (xr, ur) in x.chunks_exact(k).zip(u.chunks_exact_mut(l.rank)) {
        gemv_f32(isa, &l.a, xr, ur);
    }
    u
}

/// RMSNorm of each row: `x / sqrt(mean(x²) + eps) · w`.
fn rms_norm_rows(x: &[f32], w: &[f32], eps: f64, out: &mut [f32]) {
    let h = w.len();
    for (xr, or) in x.chunks_exact(h).zip(out.chunks_exact_mut(h)) {
        let ms = xr.iter().map(|v| (v * v) as f64).sum::<f64>() / h as f64;
        let inv = (1.0 / (ms + eps).sqrt()) as f32;
        for ((o, v), g) in or.iter_mut().zip(xr).zip(w) {
            *o = v * inv * g;
        }
    }
}

/// Rotates one head in place (HF's rotate-half convention).
fn rope(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = cos.len();
    for i in 0..half {
        let (a, b) = (x[i], x[i + half]);
        x[i] = a * cos[i] - b * sin[i];
        x[i + half] = b * cos[i] + a * sin[i];
    }
}
