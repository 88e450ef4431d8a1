//! The native LoRA training engine: the forward pass of [`Llama`] with a LoRA adapter and its
//! hand-derived backward pass on plain row-major f32 buffers, producing the adapter's gradients.
//!
//! Why it exists: burn's autodiff (the reference path in `model` + `train`) records dozens of graph
//! nodes per layer, keeps every intermediate as its own tensor and must see the frozen weights as
//! whole f32 tensors. For LoRA over a frozen base almost all of that is waste. Here:
//! - the batch is split by sequence across the worker threads, and each thread runs the whole
//!   forward and backward of its sequences with single-threaded GEMMs, so no thread waits for
//!   another inside a step (their adapter gradients are summed at the end);
//! - the frozen weights stay quantized; each thread expands *one layer at a time* into a scratch
//!   buffer (q, k and v rows side by side, gate and up side by side), so q/k/v and gate/up are one
//!   GEMM each, forward and backward;
//! - without dropout the adapter is merged into the expanded layer (`W + s·B·A`, a rank-r update of
//!   the scratch), so the big GEMMs carry the LoRA path forward and backward and only the small
//!   products that A/B's gradients need remain;
//! - only the products a frozen base needs are computed: input gradients through frozen weights
//!   (none below the first layer's projections), weight gradients for A and B only;
//! - attention computes the causal lower triangle only (blocks of query rows see only the keys up
//!   to their last row), and the query heads sharing a kv head are stacked into one block, so each
//!   attention product is one GEMM per (sequence, kv head, block);
//! - buffers come from a per-thread pool that keeps a whole pass's activations between passes (no
//!   re-allocation or page faults per step) until the training run ends ([`release_buffers`]);
//! - per-sequence gradients (for DP-SGD's per-example clipping) come from the same pass: only the
//!   small A/B products are split by sequence;
//! - with [`Precision::Bf16`] on a CPU with AVX512-BF16 the frozen-weight products (every layer's
//!   projections, forward and backward) round their inputs to bf16 and sum in f32 ([`crate::bf16`]),
//!   at twice the f32 rate; attention, the output head, the norms and the adapters stay f32.
//!
//! Tests check loss and gradients against burn's autodiff on the same model (`tests/engine.rs`).
//! Nothing here knows of optimizers, files or privacy; it is only the differentiable network.

use gemm::Parallelism;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use crate::bf16::PackedB;
use crate::error::{ModelError, Result};
use crate::lora::{LoraAdapter, Target};
use crate::model::Llama;
use crate::quant::QMatrix;

/// Query rows per block of causal attention (a block sees the keys up to its last row only).
const ATT_BLOCK: usize = 32;
/// Vocabulary rows of the output head expanded at a time.
const HEAD_TILE: usize = 8192;
/// Token rows a thread runs forward and backward at a time: a thread's share of the batch is run in
/// pieces of whole sequences up to this many rows (at least one sequence), so the activations kept
/// for the backward pass are those of one piece, not of the share (measured on the 135M shape at
/// 4 × 256 tokens, 2 threads: the same speed, half the peak memory).
const RUN_ROWS: usize = 256;
/// Logit values held at a time per thread (rows of the head are processed in chunks of this size):
/// on the 135M shape (49,152 tokens) 2 chunks of 128 rows a piece, 25 MB each. Every chunk reads
/// the whole head twice (expanded or packed), so halving the chunks halves that work.
const LOGIT_BUDGET: usize = 1 << 23;

/// How the per-sequence losses are combined into the differentiated objective.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Reduction {
    /// `weight · Σ_s L_s`, one summed gradient (`weight = 1 / sequences` is the batch mean).
    Sum {
        /// Factor applied to every sequence's mean loss.
        weight: f64,
    },
    /// One gradient of `L_s` per sequence (per-example gradients for DP-SGD).
    PerSequence,
}

/// What one call computed.
#[derive(Debug, Clone)]
pub struct Gradients {
    /// Mean next-token loss of each sequence.
    pub losses: Vec<f64>,
    /// Flattened gradients in canonical tensor order ([`LoraAdapter::tensors`]): one vector for
    /// [`Reduction::Sum`], one per sequence for [`Reduction::PerSequence`].
    pub grads: Vec<Vec<f32>>,
}

/// The arithmetic of the frozen-weight products (`"f32"` or `"bf16"` in config files).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 throughout (the reference; equals burn's autodiff within 1e-4).
    #[default]
    F32,
    /// Inputs of the layers' frozen-weight products rounded to bf16, sums in f32 (autocast's
    /// mixed precision) where the CPU has AVX512-BF16 ([`crate::bf16::available`]); f32 elsewhere.
    Bf16,
}

impl Precision {
    /// Lowercase name, as config files spell it.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
        }
    }

    /// The precision the products actually run in on this CPU: bf16 only where
    /// [`crate::bf16::available`], f32 otherwise.
    pub fn effective(self) -> Self {
        match self {
            Self::Bf16 if crate::bf16::available() => Self::Bf16,
            _ => Self::F32,
        }
    }

    /// The native training engine that computes in this precision.
    pub fn engine(self) -> crate::train::Engine {
        match self {
            Self::F32 => crate::train::Engine::Native,
            Self::Bf16 => crate::train::Engine::NativeBf16,
        }
    }
}

/// LoRA dropout for one call: probability and the seed its masks derive from.
#[derive(Debug, Clone, Copy)]
pub struct DropoutSpec {
    /// Probability of zeroing an input value of an adapted projection.
    pub p: f32,
    /// Seed; the mask of (layer, target, sequence) is a function of it alone.
    pub seed: u64,
}

/// A strided read-only view of a matrix stored in a slice.
#[derive(Clone, Copy)]
struct View<'a> {
    data: &'a [f32],
    off: usize,
    rs: usize,
    cs: usize,
}

impl<'a> View<'a> {
    /// Row-major storage from `off` with row stride `ld`.
    fn rm(data: &'a [f32], off: usize, ld: usize) -> Self {
        View {
            data,
            off,
            rs: ld,
            cs: 1,
        }
    }

    /// The transposed view.
    fn t(self) -> Self {
        View {
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    fn assert_fits(&self, rows: usize, cols: usize) {
        if rows > 0 && cols > 0 {
            assert!(
                self.off + (rows - 1) * self.rs + (cols - 1) * self.cs < self.data.len(),
                "engine: matrix view out of bounds"
            );
        }
    }
}

/// `dst[m×n] = (acc ? dst : 0) + alpha · a[m×k] · b[k×n]`; `dst` row-major from `off`, stride `ld`.
#[allow(clippy::too_many_arguments)]
fn mm(
    dst: &mut [f32],
    off: usize,
    ld: usize,
    acc: bool,
    a: View,
    b: View,
    (m, n, k): (usize, usize, usize),
    alpha: f32,
    par: Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        off + (m - 1) * ld + n <= dst.len() && n <= ld,
        "engine: gemm output out of bounds"
    );
    if k == 0 {
        if !acc {
            for r in 0..m {
                dst[off + r * ld..off + r * ld + n].fill(0.0);
            }
        }
        return;
    }
    a.assert_fits(m, k);
    b.assert_fits(k, n);
    // SAFETY: every element the GEMM reads or writes lies inside the slices (checked above); the
    // output does not alias the inputs (it is a distinct `&mut`).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr().add(off),
            1,
            ld as isize,
            acc,
            a.data.as_ptr().add(a.off),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr().add(b.off),
            b.cs as isize,
            b.rs as isize,
            1.0,
            alpha,
            false,
            false,
            false,
            par,
        );
    }
}

/// Offsets of the rows of `rep` heads (`nr` rows each, `hd` wide, side by side from `off`, row
/// stride `ld`) in stacked head-major order: stacked row `k · nr + i` is row `i` of head `k`.
fn stacked_rows(
    off: usize,
    ld: usize,
    (nr, rep, hd): (usize, usize, usize),
) -> impl Iterator<Item = usize> {
    (0..rep * nr).map(move |j| off + (j % nr) * ld + (j / nr) * hd)
}

/// Copies the heads at `off` in `src` (see [`stacked_rows`]) into `out`, stacked head-major.
fn gather(src: &[f32], off: usize, ld: usize, heads: (usize, usize, usize), out: &mut [f32]) {
    let hd = heads.2;
    for (o, at) in out.chunks_exact_mut(hd).zip(stacked_rows(off, ld, heads)) {
        o.copy_from_slice(&src[at..at + hd]);
    }
}

/// The inverse of [`gather`]: writes the stacked rows of `src` back to their heads in `dst`.
fn scatter(src: &[f32], dst: &mut [f32], off: usize, ld: usize, heads: (usize, usize, usize)) {
    let hd = heads.2;
    for (r, at) in src.chunks_exact(hd).zip(stacked_rows(off, ld, heads)) {
        dst[at..at + hd].copy_from_slice(r);
    }
}

/// Where one block of causal attention lives: query rows `r0..r0 + nr` of one sequence for the
/// `rep` query heads that share one kv head, stacked head-major (`rep · nr` rows).
#[derive(Clone, Copy)]
struct AttBlock {
    /// Query rows in the block (per head).
    nr: usize,
    /// Keys the block sees: `r0 + nr` (causal).
    keys: usize,
    /// The block's first query row within its sequence.
    r0: usize,
    /// Offset in `qkv` (and `dqkv`) of the block's first query row and first stacked head.
    q: usize,
    /// Offsets in `qkv` of the kv head's keys and values (row 0 of the sequence).
    k: usize,
    v: usize,
    /// Offset in `att` (and `datt`) of the block's first row and first stacked head.
    att: usize,
}

/// Attention's shapes for one pass: how the probabilities are laid out and which blocks exist.
struct AttLayout {
    nseq: usize,
    t_len: usize,
    nkv: usize,
    rep: usize,
    hd: usize,
    /// Row widths of `qkv` and `att`.
    wq: usize,
    hq: usize,
}

impl AttLayout {
    fn nblk(&self) -> usize {
        self.t_len.div_ceil(ATT_BLOCK)
    }

    /// Values of one block's attention probabilities (`rep · ATT_BLOCK` rows of `t_len`).
    fn block_probs_len(&self) -> usize {
        self.rep * ATT_BLOCK * self.t_len
    }

    /// Every block, by sequence, kv head and query rows; forward and backward walk the same list.
    fn blocks(&self) -> impl Iterator<Item = AttBlock> + '_ {
        let (t, hd, nblk) = (self.t_len, self.hd, self.nblk());
        (0..self.nseq * self.nkv * nblk).map(move |i| {
            let (s, g, b) = (i / (self.nkv * nblk), i / nblk % self.nkv, i % nblk);
            let r0 = b * ATT_BLOCK;
            let nr = ATT_BLOCK.min(t - r0);
            let base = s * t * self.wq;
            AttBlock {
                nr,
                keys: r0 + nr,
                r0,
                q: base + r0 * self.wq + g * self.rep * hd,
                k: base + self.hq + g * hd,
                v: base + self.hq + self.nkv * hd + g * hd,
                att: (s * t + r0) * self.hq + g * self.rep * hd,
            }
        })
    }
}

/// The causal attention probabilities of block `blk` into `probs` (`rep · nr` rows of `t_len`, the
/// stacked query heads gathered into `qs` on the way): `softmax(scale · Q·Kᵀ)` over the keys each row
/// sees, zero beyond. The forward pass uses them at once; the backward pass computes them again
/// (flash attention's trade: a GEMM per block instead of keeping every layer's probabilities).
#[allow(clippy::too_many_arguments)]
fn block_probs(
    qkv: &[f32],
    blk: AttBlock,
    lay: &AttLayout,
    scale: f32,
    qs: &mut [f32],
    probs: &mut [f32],
    par: Parallelism,
) {
    let (t_len, hd) = (lay.t_len, lay.hd);
    let mrows = lay.rep * blk.nr;
    gather(qkv, blk.q, lay.wq, (blk.nr, lay.rep, hd), qs);
    mm(
        probs,
        0,
        t_len,
        false,
        View::rm(qs, 0, hd),
        View::rm(qkv, blk.k, lay.wq).t(),
        (mrows, blk.keys, hd),
        scale,
        par,
    );
    for (j, row) in probs[..mrows * t_len].chunks_exact_mut(t_len).enumerate() {
        let (live, dead) = row[..blk.keys].split_at_mut(blk.r0 + j % blk.nr + 1);
        let mx = live.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        live.iter_mut().for_each(|p| *p = exp(*p - mx));
        let inv = 1.0 / sum(live);
        live.iter_mut().for_each(|p| *p *= inv);
        dead.fill(0.0);
    }
}

/// Expands `rows` rows of `w` starting at `r0` into `out` (row-major, `w.cols()` wide).
fn expand(w: &QMatrix, r0: usize, rows: usize, out: &mut [f32]) {
    let c = w.cols();
    for (i, o) in out[..rows * c].chunks_exact_mut(c).enumerate() {
        w.dequantize_row(r0 + i, o);
    }
}

thread_local! {
    /// Buffers returned by finished passes on this thread, reused by the next (no page faults).
    static POOL: std::cell::RefCell<Vec<Vec<f32>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Bytes of returned buffers a thread keeps for reuse. A pass's buffers all come back at its end,
/// so this only bounds what the pool holds between passes: it is sized to keep a config-M pass's
/// activations (~1 GB per thread), whose re-allocation and page faults otherwise cost ~5 % of a
/// step. [`release_buffers`] hands everything back when a training run ends.
const POOL_MAX_BYTES: usize = 2 << 30;

/// The smallest pooled buffer with room for `len` values (empty if there is none).
fn pooled(len: usize) -> Vec<f32> {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        let fit = p
            .iter()
            .enumerate()
            .filter(|(_, v)| v.capacity() >= len)
            .min_by_key(|(_, v)| v.capacity())
            .map(|(i, _)| i);
        fit.map(|i| p.swap_remove(i)).unwrap_or_default()
    })
}

/// A zeroed buffer of `len` values, reusing a returned one when one is large enough.
fn buf(len: usize) -> Vec<f32> {
    let mut v = pooled(len);
    v.clear();
    v.resize(len, 0.0);
    v
}

/// A buffer of `len` values with arbitrary (stale but initialised) contents, for outputs that are
/// written in full before they are read.
fn scratch(len: usize) -> Vec<f32> {
    let mut v = pooled(len);
    v.resize(len, 0.0);
    v
}

/// Frees the buffers every worker thread (and the calling thread) keeps for reuse between passes;
/// call it when no more passes are coming soon (a [`crate::train::Trainer`] does when dropped).
pub fn release_buffers() {
    fn clear() {
        POOL.with(|p| *p.borrow_mut() = Vec::new());
    }
    clear();
    rayon::broadcast(|_| clear());
}

/// Returns buffers to this thread's pool (beyond its budget they are freed).
fn give<const N: usize>(bufs: [Vec<f32>; N]) {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        let mut held: usize = p.iter().map(|b| b.capacity() * 4).sum();
        for b in bufs {
            if b.capacity() > 0 && held + b.capacity() * 4 <= POOL_MAX_BYTES {
                held += b.capacity() * 4;
                p.push(b);
            }
        }
    });
}

/// `e^x` in f32 (Cephes' polynomial, relative error ~1e-7), written so that loops over slices
/// vectorize; inputs below -87 give ~1e-38 instead of 0.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23: adding it rounds to an integer
    let x = x.clamp(-87.0, 88.0);
    let k = x * std::f32::consts::LOG2_E + MAGIC;
    let n = k - MAGIC;
    let ni = k.to_bits().wrapping_sub(MAGIC.to_bits()) as i32;
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    y * f32::from_bits(((ni + 127) as u32) << 23)
}

/// Σ aᵢ·bᵢ·cᵢ with eight partial sums (so the loop vectorizes).
#[inline]
fn dot3(a: &[f32], b: &[f32], c: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb, cc) = (a.chunks_exact(8), b.chunks_exact(8), c.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .zip(cc.remainder())
        .map(|((x, y), z)| x * y * z)
        .sum();
    for ((x, y), z) in ca.zip(cb).zip(cc) {
        for i in 0..8 {
            acc[i] += x[i] * y[i] * z[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Σ aᵢ·bᵢ with eight partial sums.
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Σ aᵢ with eight partial sums.
#[inline]
fn sum(a: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let c = a.chunks_exact(8);
    let tail: f32 = c.remainder().iter().sum();
    for x in c {
        for i in 0..8 {
            acc[i] += x[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// RMSNorm of each row of `x` (`rows × h`) into `y`, saving `1/rms` per row in `inv`.
fn rms_forward(x: &[f32], w: &[f32], eps: f32, y: &mut [f32], inv: &mut [f32]) {
    let h = w.len();
    for ((xr, yr), iv) in x.chunks_exact(h).zip(y.chunks_exact_mut(h)).zip(inv) {
        let ms = dot(xr, xr) / h as f32;
        let r = 1.0 / (ms + eps).sqrt();
        *iv = r;
        for ((o, &a), &g) in yr.iter_mut().zip(xr).zip(w) {
            *o = a * r * g;
        }
    }
}

/// `y = x · inv · w` row by row: [`rms_forward`]'s output again from its saved `1/rms` (the backward
/// pass recomputes the normalised input rather than keeping it).
fn rms_apply(x: &[f32], w: &[f32], inv: &[f32], y: &mut [f32]) {
    let h = w.len();
    for ((xr, yr), &r) in x.chunks_exact(h).zip(y.chunks_exact_mut(h)).zip(inv) {
        for ((o, &a), &g) in yr.iter_mut().zip(xr).zip(w) {
            *o = a * r * g;
        }
    }
}

/// Backward of [`rms_forward`]: adds `∂L/∂x` to `dx` given `dy = ∂L/∂y`.
fn rms_backward(x: &[f32], w: &[f32], inv: &[f32], dy: &[f32], dx: &mut [f32]) {
    let h = w.len();
    for (((xr, dyr), dxr), &r) in x
        .chunks_exact(h)
        .zip(dy.chunks_exact(h))
        .zip(dx.chunks_exact_mut(h))
        .zip(inv)
    {
        let wx = dot3(xr, w, dyr);
        let c = r * r * r * wx / h as f32;
        for (((o, &a), &d), &g) in dxr.iter_mut().zip(xr).zip(dyr).zip(w) {
            *o += r * d * g - a * c;
        }
    }
}

/// Rotary tables `[seq × head_dim/2]` (cos, sin), computed in f64 like the burn model's.
fn rope_tables(theta: f64, hd: usize, seq: usize) -> (Vec<f32>, Vec<f32>) {
    let half = hd / 2;
    let mut cos = Vec::with_capacity(seq * half);
    let mut sin = Vec::with_capacity(seq * half);
    for p in 0..seq {
        for i in 0..half {
            let ang = p as f64 / theta.powf((2 * i) as f64 / hd as f64);
            cos.push(ang.cos() as f32);
            sin.push(ang.sin() as f32);
        }
    }
    (cos, sin)
}

/// Rotates (or, with `inverse`, back-propagates through the rotation of) `heads` heads of
/// `hd` values starting at column `col` of every row of `buf` (row stride `ld`, `seq` rows per
/// sequence).
#[allow(clippy::too_many_arguments)]
fn rope(
    buf: &mut [f32],
    ld: usize,
    col: usize,
    heads: usize,
    hd: usize,
    seq: usize,
    (cos, sin): (&[f32], &[f32]),
    inverse: bool,
) {
    let half = hd / 2;
    let sign = if inverse { -1.0 } else { 1.0 };
    for (r, row) in buf.chunks_exact_mut(ld).enumerate() {
        let t = r % seq;
        let (c, s) = (
            &cos[t * half..(t + 1) * half],
            &sin[t * half..(t + 1) * half],
        );
        for h in 0..heads {
            let x = &mut row[col + h * hd..col + (h + 1) * hd];
            let (x1, x2) = x.split_at_mut(half);
            for i in 0..half {
                let (a, b) = (x1[i], x2[i]);
                let si = sign * s[i];
                x1[i] = a * c[i] - b * si;
                x2[i] = b * c[i] + a * si;
            }
        }
    }
}

/// One adapted projection's matrices as flat f32.
struct LoraMats {
    a: Vec<f32>,
    b: Vec<f32>,
    fan_in: usize,
    fan_out: usize,
    /// Offsets of A and B in the flat canonical gradient.
    a_off: usize,
    b_off: usize,
}

/// One thread's result: per-sequence losses and its gradient vector(s).
type GroupOut = (Vec<f64>, Vec<Vec<f32>>);

/// What a call needs that is the same for every thread.
struct Ctx<'m> {
    model: &'m Llama,
    lora: Vec<[Option<LoraMats>; 7]>,
    rank: usize,
    scale: f32,
    dropout: Option<DropoutSpec>,
    seq: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
    grad_len: usize,
    reduction: Reduction,
    par: Parallelism,
    /// Adapters are merged into the expanded weights (no dropout): the LoRA forward only computes
    /// `u = x·Aᵀ`, and input gradients flow through the merged weights.
    merged: bool,
    /// The layers' frozen-weight products run in bf16 ([`Precision::Bf16`] on a capable CPU).
    bf16: bool,
}

/// A frozen layer weight (`rows × cols`, the projection's `out × in`) expanded to f32, and, in bf16
/// mode, packed for the pass that reads it next.
#[derive(Default)]
struct Frozen {
    f32: Vec<f32>,
    packed: PackedB,
    rows: usize,
    cols: usize,
}

impl Frozen {
    /// Sized for `rows × cols`; the f32 buffer (from the thread's pool) only when `f32` (bf16 mode
    /// packs straight from the quantized weights).
    fn new(rows: usize, cols: usize, f32: bool) -> Self {
        Self {
            f32: if f32 {
                scratch(rows * cols)
            } else {
                Vec::new()
            },
            packed: Default::default(),
            rows,
            cols,
        }
    }

    /// Packs the quantized `mats` (their rows stacked) for the forward pass (`y = x·Wᵀ`) or the
    /// backward pass (`dx = dy·W`).
    fn pack(&mut self, pass: Pass, mats: &[&QMatrix]) {
        let row = |mut r: usize, out: &mut [f32]| {
            for m in mats {
                if r < m.rows() {
                    m.dequantize_row(r, out);
                    return;
                }
                r -= m.rows();
            }
        };
        match pass {
            Pass::Forward => self.packed.pack_transposed(self.rows, self.cols, row),
            Pass::Backward => self.packed.pack(self.rows, self.cols, row),
        }
    }
}

/// Which pass a layer's weights are loaded for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pass {
    Forward,
    Backward,
}

thread_local! {
    /// The left operand of this thread's current bf16 product.
    static PACKED_A: std::cell::RefCell<crate::bf16::PackedA> = Default::default();
}

/// The frozen weights of one layer expanded to f32 (per thread).
struct LayerScratch {
    qkv: Frozen,
    o: Frozen,
    gu: Frozen,
    down: Frozen,
}

impl LayerScratch {
    /// Scratch sized for `model`'s layers, from the thread's pool (no f32 buffers in bf16 mode).
    fn new(model: &Llama, bf16: bool) -> Self {
        let c = &model.config;
        let (h, hd, i) = (c.hidden_size, c.head_dim, c.intermediate_size);
        let (hq, hkv) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
        Self {
            qkv: Frozen::new(hq + 2 * hkv, h, !bf16),
            o: Frozen::new(h, hq, !bf16),
            gu: Frozen::new(2 * i, h, !bf16),
            down: Frozen::new(h, i, !bf16),
        }
    }

    /// Expands `layer`'s frozen weights; when the context merges adapters, adds `scale · B·A` of
    /// every adapted projection to its rows, so the frozen GEMMs carry the LoRA path forward
    /// (`x·(W + sBA)ᵀ`) and backward (`dy·(W + sBA)`). In bf16 mode instead packs them for `pass`
    /// straight from their quantized rows (adapters are never merged there: rounding `W + sBA` to
    /// bf16 would round most of the small `sBA` away).
    fn load(&mut self, ctx: &Ctx, layer: usize, pass: Pass) {
        let model = ctx.model;
        let p = &model.blocks[layer].proj;
        let (q, k, v) = (&p[0].0, &p[1].0, &p[2].0);
        if ctx.bf16 {
            self.qkv.pack(pass, &[q, k, v]);
            self.o.pack(pass, &[&p[3].0]);
            self.gu.pack(pass, &[&p[4].0, &p[5].0]);
            self.down.pack(pass, &[&p[6].0]);
            return;
        }
        let h = q.cols();
        let qkv = &mut self.qkv.f32;
        qkv.resize((q.rows() + k.rows() + v.rows()) * h, 0.0);
        expand(q, 0, q.rows(), qkv);
        expand(k, 0, k.rows(), &mut qkv[q.rows() * h..]);
        expand(v, 0, v.rows(), &mut qkv[(q.rows() + k.rows()) * h..]);
        let o = &p[3].0;
        self.o.f32.resize(o.rows() * o.cols(), 0.0);
        expand(o, 0, o.rows(), &mut self.o.f32);
        let (g, u) = (&p[4].0, &p[5].0);
        let gu = &mut self.gu.f32;
        gu.resize((g.rows() + u.rows()) * h, 0.0);
        expand(g, 0, g.rows(), gu);
        expand(u, 0, u.rows(), &mut gu[g.rows() * h..]);
        let d = &p[6].0;
        self.down.f32.resize(d.rows() * d.cols(), 0.0);
        expand(d, 0, d.rows(), &mut self.down.f32);
        if !ctx.merged {
            return;
        }
        for t in Target::ALL {
            let Some(l) = ctx.lora[layer][t as usize].as_ref() else {
                continue;
            };
            let (dst, row0) = match t {
                Target::Q => (&mut self.qkv.f32, 0),
                Target::K => (&mut self.qkv.f32, q.rows()),
                Target::V => (&mut self.qkv.f32, q.rows() + k.rows()),
                Target::O => (&mut self.o.f32, 0),
                Target::Gate => (&mut self.gu.f32, 0),
                Target::Up => (&mut self.gu.f32, g.rows()),
                Target::Down => (&mut self.down.f32, 0),
            };
            mm(
                dst,
                row0 * l.fan_in,
                l.fan_in,
                true,
                View::rm(&l.b, 0, ctx.rank),
                View::rm(&l.a, 0, l.fan_in),
                (l.fan_out, l.fan_in, ctx.rank),
                ctx.scale,
                ctx.par,
            );
        }
    }

    /// Hands the f32 buffers back to the thread's pool.
    fn recycle(self) {
        give([self.qkv.f32, self.o.f32, self.gu.f32, self.down.f32]);
    }
}

/// What the backward pass needs of one adapted projection's forward.
struct LoraSaved {
    /// `drop(x) · Aᵀ`, `rows × rank`.
    u: Vec<f32>,
    /// The dropped-out input `drop(x)` when dropout is active (else the input itself is used).
    xd: Option<Vec<f32>>,
    /// The dropout mask (0 or 1/(1-p)) when dropout is active.
    mask: Option<Vec<f32>>,
}

/// Activations of one layer kept for the backward pass. What is cheap to recompute is not kept: the
/// normalised inputs (from `x_in`/`x_mid` and the saved `1/rms`) and sigmoid(gate) (from `gu`).
struct Saved {
    x_in: Vec<f32>,
    inv1: Vec<f32>,
    qkv: Vec<f32>,
    att: Vec<f32>,
    x_mid: Vec<f32>,
    inv2: Vec<f32>,
    gu: Vec<f32>,
    /// silu(gate) · up (empty unless the down projection is adapted).
    act: Vec<f32>,
    lora: [Option<LoraSaved>; 7],
}

impl Saved {
    /// Hands every buffer back to the thread's pool.
    fn recycle(self) {
        give([
            self.x_in, self.inv1, self.qkv, self.att, self.x_mid, self.inv2, self.gu, self.act,
        ]);
        for l in self.lora.into_iter().flatten() {
            give([l.u, l.xd.unwrap_or_default(), l.mask.unwrap_or_default()]);
        }
    }
}

impl Ctx<'_> {
    /// Dropout mask of `(layer, target)` for global sequences `seqs`, `seq` rows each.
    fn mask(
        &self,
        spec: DropoutSpec,
        layer: usize,
        t: Target,
        seqs: std::ops::Range<usize>,
        width: usize,
    ) -> Vec<f32> {
        let keep = 1.0 / (1.0 - spec.p);
        let mut out = Vec::with_capacity(seqs.len() * self.seq * width);
        for s in seqs {
            let key = spec.seed
                ^ (layer as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
                ^ (t as u64 + 1).wrapping_mul(0xbf58_476d_1ce4_e5b9)
                ^ (s as u64 + 1).wrapping_mul(0x94d0_49bb_1331_11eb);
            let mut rng = rand::rngs::StdRng::seed_from_u64(key);
            out.extend((0..self.seq * width).map(|_| {
                if rng.random::<f32>() < spec.p {
                    0.0
                } else {
                    keep
                }
            }));
        }
        out
    }

    /// LoRA forward of `(layer, t)` for input `x` (`rows × fan_in`): computes `u = drop(x)·Aᵀ` and,
    /// unless the adapter is merged into the weights, adds `scale · u·Bᵀ` into `y` (from column
    /// `col`, stride `ldy`); returns what the backward pass needs.
    #[allow(clippy::too_many_arguments)]
    fn lora_forward(
        &self,
        layer: usize,
        t: Target,
        seqs: std::ops::Range<usize>,
        x: &[f32],
        y: &mut [f32],
        col: usize,
        ldy: usize,
    ) -> Option<LoraSaved> {
        let l = self.lora[layer][t as usize].as_ref()?;
        let rows = seqs.len() * self.seq;
        let r = self.rank;
        let (mask, xd) = match self.dropout {
            Some(spec) if spec.p > 0.0 => {
                let mask = self.mask(spec, layer, t, seqs, l.fan_in);
                let xd: Vec<f32> = x.iter().zip(&mask).map(|(a, m)| a * m).collect();
                (Some(mask), Some(xd))
            }
            _ => (None, None),
        };
        let input = xd.as_deref().unwrap_or(x);
        let mut u = scratch(rows * r);
        mm(
            &mut u,
            0,
            r,
            false,
            View::rm(input, 0, l.fan_in),
            View::rm(&l.a, 0, l.fan_in).t(),
            (rows, r, l.fan_in),
            1.0,
            self.par,
        );
        if !self.merged {
            mm(
                y,
                col,
                ldy,
                true,
                View::rm(&u, 0, r),
                View::rm(&l.b, 0, r).t(),
                (rows, l.fan_out, r),
                self.scale,
                self.par,
            );
        }
        Some(LoraSaved { u, xd, mask })
    }

    /// LoRA backward of `(layer, t)` given `dy` (`rows × fan_out` from column `col`, stride `ldy`)
    /// and the forward input `x`: accumulates dA, dB into `grads` (one vector, or one per local
    /// sequence) and, when `dx` is given and the adapter is not merged into the weights (where the
    /// frozen GEMM already carried it), adds the input gradient into it.
    #[allow(clippy::too_many_arguments)]
    fn lora_backward(
        &self,
        layer: usize,
        t: Target,
        saved: &LoraSaved,
        x: &[f32],
        dy: &[f32],
        col: usize,
        ldy: usize,
        grads: &mut [Vec<f32>],
        dx: Option<&mut [f32]>,
    ) {
        let Some(l) = self.lora[layer][t as usize].as_ref() else {
            return;
        };
        let r = self.rank;
        let rows = saved.u.len() / r;
        let input = saved.xd.as_deref().unwrap_or(x);
        // du = scale · dy · B   (rows × r)
        let mut du = scratch(rows * r);
        mm(
            &mut du,
            0,
            r,
            false,
            View::rm(dy, col, ldy),
            View::rm(&l.b, 0, r),
            (rows, r, l.fan_out),
            self.scale,
            self.par,
        );
        let per = rows / grads.len();
        for (i, g) in grads.iter_mut().enumerate() {
            let r0 = i * per;
            // dB += scale · dyᵀ · u   (fan_out × r)
            mm(
                &mut g[l.b_off..l.b_off + l.fan_out * r],
                0,
                r,
                true,
                View::rm(dy, col + r0 * ldy, ldy).t(),
                View::rm(&saved.u, r0 * r, r),
                (l.fan_out, r, per),
                self.scale,
                self.par,
            );
            // dA += duᵀ · drop(x)   (r × fan_in)
            mm(
                &mut g[l.a_off..l.a_off + r * l.fan_in],
                0,
                l.fan_in,
                true,
                View::rm(&du, r0 * r, r).t(),
                View::rm(input, r0 * l.fan_in, l.fan_in),
                (r, l.fan_in, per),
                1.0,
                self.par,
            );
        }
        if let Some(dx) = dx.filter(|_| !self.merged) {
            match &saved.mask {
                None => mm(
                    dx,
                    0,
                    l.fan_in,
                    true,
                    View::rm(&du, 0, r),
                    View::rm(&l.a, 0, l.fan_in),
                    (rows, l.fan_in, r),
                    1.0,
                    self.par,
                ),
                Some(mask) => {
                    let mut tmp = scratch(rows * l.fan_in);
                    mm(
                        &mut tmp,
                        0,
                        l.fan_in,
                        false,
                        View::rm(&du, 0, r),
                        View::rm(&l.a, 0, l.fan_in),
                        (rows, l.fan_in, r),
                        1.0,
                        self.par,
                    );
                    for ((d, t), m) in dx.iter_mut().zip(&tmp).zip(mask) {
                        *d += t * m;
                    }
                    give([tmp]);
                }
            }
        }
        give([du]);
    }

    /// `y (+)= x·Wᵀ` through a frozen layer weight `w` (`n × k`; with `acc` the product is added to
    /// `y`, the residual stream), then the LoRA forward of each adapted `(target, column of y)`;
    /// what their backward needs goes into `lora`.
    #[allow(clippy::too_many_arguments)]
    fn project(
        &self,
        layer: usize,
        seqs: std::ops::Range<usize>,
        x: &[f32],
        w: &Frozen,
        y: &mut [f32],
        acc: bool,
        targets: &[(Target, usize)],
        lora: &mut [Option<LoraSaved>; 7],
    ) {
        let rows = seqs.len() * self.seq;
        let (n, k) = (w.rows, w.cols);
        if self.bf16 {
            self.bf16_product(y, n, acc, x, k, k, rows, &w.packed);
        } else {
            mm(
                y,
                0,
                n,
                acc,
                View::rm(x, 0, k),
                View::rm(&w.f32, 0, k).t(),
                (rows, n, k),
                1.0,
                self.par,
            );
        }
        for &(t, col) in targets {
            lora[t as usize] = self.lora_forward(layer, t, seqs.clone(), x, y, col, n);
        }
    }

    /// `dst (+)= a·B` in bf16: `a` is `rows × k` (row stride `lda`), `b` the packed `k × n` weight.
    #[allow(clippy::too_many_arguments)]
    fn bf16_product(
        &self,
        dst: &mut [f32],
        ld: usize,
        acc: bool,
        a: &[f32],
        lda: usize,
        k: usize,
        rows: usize,
        b: &PackedB,
    ) {
        let threads = match self.par {
            Parallelism::Rayon(t) => t.max(1),
            _ => 1,
        };
        // Taken out of the thread-local, not borrowed from it: a multi-threaded product lets this
        // thread steal other rayon work, which may be another pass needing its own pack.
        let mut p = PACKED_A.take();
        p.pack(a, 0, lda, rows, k);
        crate::bf16::gemm(dst, 0, ld, acc, &p, b, 1.0, threads);
        PACKED_A.set(p);
    }

    /// Backward of [`Ctx::project`] given `dy` (`rows × n`): the input gradient `dx = dy·W` (not
    /// computed when `dx` is `None`: nothing below needs it), then each adapted target's LoRA
    /// backward, which accumulates its A/B gradients into `grads` (and, unmerged, adds to `dx`).
    #[allow(clippy::too_many_arguments)]
    fn project_back(
        &self,
        layer: usize,
        saved: &[Option<LoraSaved>; 7],
        x: &[f32],
        w: &Frozen,
        rows: usize,
        dy: &[f32],
        mut dx: Option<&mut [f32]>,
        targets: &[(Target, usize)],
        grads: &mut [Vec<f32>],
    ) {
        let (n, k) = (w.rows, w.cols);
        if let Some(dx) = dx.as_deref_mut() {
            if self.bf16 {
                self.bf16_product(dx, k, false, dy, n, n, rows, &w.packed);
            } else {
                mm(
                    dx,
                    0,
                    k,
                    false,
                    View::rm(dy, 0, n),
                    View::rm(&w.f32, 0, k),
                    (rows, k, n),
                    1.0,
                    self.par,
                );
            }
        }
        for &(t, col) in targets {
            if let Some(ls) = &saved[t as usize] {
                self.lora_backward(layer, t, ls, x, dy, col, n, grads, dx.as_deref_mut());
            }
        }
    }

    /// Forward and backward of the sequences `seqs` (global indices; `ids` holds their tokens).
    fn run(&self, ids: &[u32], seqs: std::ops::Range<usize>) -> Result<GroupOut> {
        let m = self.model;
        let c = &m.config;
        let (h, hd, t_len) = (c.hidden_size, c.head_dim, self.seq);
        let (nh, nkv) = (c.num_attention_heads, c.num_key_value_heads);
        let rep = nh / nkv;
        let (hq, hkv, inter) = (nh * hd, nkv * hd, c.intermediate_size);
        let wq = hq + 2 * hkv;
        let nseq = seqs.len();
        let rows = nseq * t_len;
        let eps = c.rms_norm_eps as f32;
        let att_scale = 1.0 / (hd as f32).sqrt();
        let lay = AttLayout {
            nseq,
            t_len,
            nkv,
            rep,
            hd,
            wq,
            hq,
        };
        let par = self.par;
        let n_grads = match self.reduction {
            Reduction::Sum { .. } => 1,
            Reduction::PerSequence => nseq,
        };
        let mut grads = vec![vec![0.0f32; self.grad_len]; n_grads];

        // ---------------- forward ----------------
        // Ids marked NO_LOSS (chat context) are read as their tokens and never predicted.
        let mut x = m.embed.gather_rows(&crate::data::tokens(ids))?;
        // Targets per sequence: the positions whose next id counts.
        let counted: Vec<usize> = ids
            .chunks_exact(t_len)
            .map(crate::data::counted_targets)
            .collect();
        let mut w = LayerScratch::new(m, self.bf16);
        let mut saved: Vec<Saved> = Vec::with_capacity(c.num_hidden_layers);
        // The normalised input of the current projection (recomputed in the backward pass).
        let mut xn = scratch(rows * h);
        for (li, block) in m.blocks.iter().enumerate() {
            w.load(self, li, Pass::Forward);
            let mut inv1 = scratch(rows);
            rms_forward(&x, &block.attn_norm, eps, &mut xn, &mut inv1);
            let mut qkv = scratch(rows * wq);
            let mut lora: [Option<LoraSaved>; 7] = Default::default();
            self.project(
                li,
                seqs.clone(),
                &xn,
                &w.qkv,
                &mut qkv,
                false,
                &[(Target::Q, 0), (Target::K, hq), (Target::V, hq + hkv)],
                &mut lora,
            );
            // Qwen2's frozen biases: a constant shift, nothing to differentiate.
            for (t, col) in [(Target::Q, 0), (Target::K, hq), (Target::V, hq + hkv)] {
                block.add_bias(t, &mut qkv, wq, col);
            }
            let tables = (&self.cos[..], &self.sin[..]);
            rope(&mut qkv, wq, 0, nh, hd, t_len, tables, false);
            rope(&mut qkv, wq, hq, nkv, hd, t_len, tables, false);

            // Causal attention per (sequence, kv head, block of query rows): the query heads that
            // share the kv head are stacked (head-major) so each block is one GEMM per product.
            let mut probs = scratch(lay.block_probs_len());
            let mut att = scratch(rows * hq);
            let mut qs = scratch(rep * ATT_BLOCK * hd);
            let mut os = scratch(rep * ATT_BLOCK * hd);
            for blk in lay.blocks() {
                let (keys, mrows) = (blk.keys, rep * blk.nr);
                let heads = (blk.nr, rep, hd);
                block_probs(&qkv, blk, &lay, att_scale, &mut qs, &mut probs, par);
                mm(
                    &mut os,
                    0,
                    hd,
                    false,
                    View::rm(&probs, 0, t_len),
                    View::rm(&qkv, blk.v, wq),
                    (mrows, hd, keys),
                    1.0,
                    par,
                );
                scatter(&os, &mut att, blk.att, hq, heads);
            }
            give([qs, os, probs]);
            let mut x_in = scratch(x.len());
            x_in.copy_from_slice(&x);
            // x ← x + att·Woᵀ (+ LoRA o)
            self.project(
                li,
                seqs.clone(),
                &att,
                &w.o,
                &mut x,
                true,
                &[(Target::O, 0)],
                &mut lora,
            );
            let mut x_mid = scratch(x.len());
            x_mid.copy_from_slice(&x);
            let mut inv2 = scratch(rows);
            rms_forward(&x, &block.mlp_norm, eps, &mut xn, &mut inv2);
            let mut gu = scratch(rows * 2 * inter);
            self.project(
                li,
                seqs.clone(),
                &xn,
                &w.gu,
                &mut gu,
                false,
                &[(Target::Gate, 0), (Target::Up, inter)],
                &mut lora,
            );
            let mut act = scratch(rows * inter);
            for (a, row) in act.chunks_exact_mut(inter).zip(gu.chunks_exact(2 * inter)) {
                let (g, u) = row.split_at(inter);
                for ((o, &gv), &uv) in a.iter_mut().zip(g).zip(u) {
                    *o = gv / (1.0 + exp(-gv)) * uv;
                }
            }
            self.project(
                li,
                seqs.clone(),
                &act,
                &w.down,
                &mut x,
                true,
                &[(Target::Down, 0)],
                &mut lora,
            );
            if lora[Target::Down as usize].is_none() {
                // Only the down projection's adapter reads `act` again.
                give([std::mem::take(&mut act)]);
            }
            saved.push(Saved {
                x_in,
                inv1,
                qkv,
                att,
                x_mid,
                inv2,
                gu,
                act,
                lora,
            });
        }
        give([xn]);

        // ---------------- head, loss and its gradient ----------------
        let vocab = c.vocab_size;
        let mut invf = scratch(rows);
        let mut xf = scratch(rows * h);
        rms_forward(&x, &m.norm, eps, &mut xf, &mut invf);
        let mut dxf = buf(rows * h);
        let mut losses = vec![0.0f64; nseq];
        let head = &m.lm_head.0;
        // Equal chunks (256 rows at a budget of 170 are 2 × 128, not 170 + 86): each chunk reads the
        // whole head twice, so an uneven remainder costs as much as a full chunk.
        let chunk = rows.div_ceil(rows.div_ceil((LOGIT_BUDGET / vocab).clamp(1, rows)));
        let tile = HEAD_TILE.min(vocab);
        let single_tile = tile == vocab;
        // f32 mode expands a tile of the head at a time; bf16 mode packs it (forward and backward
        // orientations) straight from the quantized rows.
        let mut wt = scratch(if self.bf16 { 0 } else { tile * h });
        let (mut head_fwd, mut head_bwd) = (PackedB::default(), PackedB::default());
        // The head's rows from vocabulary row `v0` on, for the packers.
        let head_rows = |v0: usize| move |r: usize, o: &mut [f32]| head.dequantize_row(v0 + r, o);
        if single_tile {
            if self.bf16 {
                head_fwd.pack_transposed(vocab, h, head_rows(0));
                head_bwd.pack(vocab, h, head_rows(0));
            } else {
                expand(head, 0, vocab, &mut wt);
            }
        }
        let mut logits = scratch(chunk * vocab);
        // ∂(objective)/∂(one position's loss): the reduction's weight over the sequence's mean (over
        // the positions it counts; a sequence with none adds nothing).
        let weight = match self.reduction {
            Reduction::Sum { weight } => weight,
            Reduction::PerSequence => 1.0,
        } as f32;
        for r0 in (0..rows).step_by(chunk) {
            let nr = chunk.min(rows - r0);
            for v0 in (0..vocab).step_by(tile) {
                let nv = tile.min(vocab - v0);
                if self.bf16 {
                    if !single_tile {
                        head_fwd.pack_transposed(nv, h, head_rows(v0));
                    }
                    let (dst, a) = (&mut logits[v0..], &xf[r0 * h..]);
                    self.bf16_product(dst, vocab, false, a, h, h, nr, &head_fwd);
                    continue;
                }
                if !single_tile {
                    expand(head, v0, nv, &mut wt);
                }
                mm(
                    &mut logits,
                    v0,
                    vocab,
                    false,
                    View::rm(&xf, r0 * h, h),
                    View::rm(&wt, 0, h).t(),
                    (nr, nv, h),
                    1.0,
                    par,
                );
            }
            for i in 0..nr {
                let r = r0 + i;
                let (s, tpos) = (r / t_len, r % t_len);
                let row = &mut logits[i * vocab..(i + 1) * vocab];
                if tpos + 1 == t_len || !crate::data::is_target(ids[r + 1]) {
                    row.fill(0.0);
                    continue;
                }
                let wgt = weight / counted[s] as f32;
                let target = ids[r + 1] as usize;
                let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let z_target = row[target];
                row.iter_mut().for_each(|z| *z = exp(*z - mx));
                let total = sum(row);
                let lse = mx + total.ln();
                losses[s] += f64::from(lse - z_target);
                let f = wgt / total;
                row.iter_mut().for_each(|z| *z *= f);
                row[target] -= wgt;
            }
            for v0 in (0..vocab).step_by(tile) {
                let nv = tile.min(vocab - v0);
                if self.bf16 {
                    if !single_tile {
                        head_bwd.pack(nv, h, head_rows(v0));
                    }
                    let (dst, a) = (&mut dxf[r0 * h..], &logits[v0..]);
                    self.bf16_product(dst, h, true, a, vocab, nv, nr, &head_bwd);
                    continue;
                }
                if !single_tile {
                    expand(head, v0, nv, &mut wt);
                }
                mm(
                    &mut dxf,
                    r0 * h,
                    h,
                    true,
                    View::rm(&logits, v0, vocab),
                    View::rm(&wt, 0, h),
                    (nr, h, nv),
                    1.0,
                    par,
                );
            }
        }
        for (l, &n) in losses.iter_mut().zip(&counted) {
            *l /= n.max(1) as f64;
        }
        let mut dx = buf(rows * h);
        rms_backward(&x, &m.norm, &invf, &dxf, &mut dx);
        give([xf, dxf, logits, wt, invf]);

        // ---------------- backward through the layers ----------------
        let mut dbuf_i = scratch(rows * inter);
        let mut dgu = scratch(rows * 2 * inter);
        let mut dxn = scratch(rows * h);
        let mut xn = scratch(rows * h);
        let mut datt = scratch(rows * hq);
        let mut dqkv = scratch(rows * wq);
        let mut dp = scratch(rep * ATT_BLOCK * t_len);
        let mut dos = scratch(rep * ATT_BLOCK * hd);
        let mut dqs = scratch(rep * ATT_BLOCK * hd);
        let mut qs = scratch(rep * ATT_BLOCK * hd);
        let mut probs = scratch(lay.block_probs_len());
        for li in (0..c.num_hidden_layers).rev() {
            let sv = saved
                .pop()
                .ok_or_else(|| ModelError::InvalidArgument("engine: missing activations".into()))?;
            let block = &m.blocks[li];
            w.load(self, li, Pass::Backward);
            // MLP: x_out = x_mid + act·Wdᵀ; dx is ∂L/∂x_out.
            self.project_back(
                li,
                &sv.lora,
                &sv.act,
                &w.down,
                rows,
                &dx,
                Some(&mut dbuf_i),
                &[(Target::Down, 0)],
                &mut grads,
            );
            for ((drow, grow), dact) in dgu
                .chunks_exact_mut(2 * inter)
                .zip(sv.gu.chunks_exact(2 * inter))
                .zip(dbuf_i.chunks_exact(inter))
            {
                let (dg, du) = drow.split_at_mut(inter);
                let (g, u) = grow.split_at(inter);
                for j in 0..inter {
                    let gj = g[j];
                    let sj = 1.0 / (1.0 + exp(-gj));
                    du[j] = dact[j] * gj * sj;
                    dg[j] = dact[j] * u[j] * sj * (1.0 + gj * (1.0 - sj));
                }
            }
            rms_apply(&sv.x_mid, &block.mlp_norm, &sv.inv2, &mut xn);
            self.project_back(
                li,
                &sv.lora,
                &xn,
                &w.gu,
                rows,
                &dgu,
                Some(&mut dxn),
                &[(Target::Gate, 0), (Target::Up, inter)],
                &mut grads,
            );
            rms_backward(&sv.x_mid, &block.mlp_norm, &sv.inv2, &dxn, &mut dx);

            // Attention: x_mid = x_in + att·Woᵀ; dx is now ∂L/∂x_mid.
            self.project_back(
                li,
                &sv.lora,
                &sv.att,
                &w.o,
                rows,
                &dx,
                Some(&mut datt),
                &[(Target::O, 0)],
                &mut grads,
            );
            dqkv.fill(0.0);
            for blk in lay.blocks() {
                let (keys, mrows) = (blk.keys, rep * blk.nr);
                let heads = (blk.nr, rep, hd);
                gather(&datt, blk.att, hq, heads, &mut dos);
                block_probs(&sv.qkv, blk, &lay, att_scale, &mut qs, &mut probs, par);
                let (dov, qsv) = (View::rm(&dos, 0, hd), View::rm(&qs, 0, hd));
                let pblk = View::rm(&probs, 0, t_len);
                // dP = dAtt · Vᵀ
                let vv = View::rm(&sv.qkv, blk.v, wq);
                mm(
                    &mut dp,
                    0,
                    t_len,
                    false,
                    dov,
                    vv.t(),
                    (mrows, keys, hd),
                    1.0,
                    par,
                );
                // dV += Pᵀ · dAtt
                mm(
                    &mut dqkv,
                    blk.v,
                    wq,
                    true,
                    pblk.t(),
                    dov,
                    (keys, hd, mrows),
                    1.0,
                    par,
                );
                // dS = P ∘ (dP − rowsum(P ∘ dP)) · scale (in place in dp)
                for j in 0..mrows {
                    let p = &probs[j * t_len..j * t_len + keys];
                    let d = &mut dp[j * t_len..j * t_len + keys];
                    let pd = dot(p, d);
                    for (dv, &pv) in d.iter_mut().zip(p) {
                        *dv = pv * (*dv - pd) * att_scale;
                    }
                }
                let ds = View::rm(&dp, 0, t_len);
                // dQ = dS · K ; dK += dSᵀ · Q
                let kv = View::rm(&sv.qkv, blk.k, wq);
                mm(&mut dqs, 0, hd, false, ds, kv, (mrows, hd, keys), 1.0, par);
                scatter(&dqs, &mut dqkv, blk.q, wq, heads);
                mm(
                    &mut dqkv,
                    blk.k,
                    wq,
                    true,
                    ds.t(),
                    qsv,
                    (keys, hd, mrows),
                    1.0,
                    par,
                );
            }
            let tables = (&self.cos[..], &self.sin[..]);
            rope(&mut dqkv, wq, 0, nh, hd, t_len, tables, true);
            rope(&mut dqkv, wq, hq, nkv, hd, t_len, tables, true);
            // No input gradient below the first layer's projections: nothing there is trained.
            let need_dx = li > 0;
            rms_apply(&sv.x_in, &block.attn_norm, &sv.inv1, &mut xn);
            self.project_back(
                li,
                &sv.lora,
                &xn,
                &w.qkv,
                rows,
                &dqkv,
                need_dx.then_some(&mut dxn[..]),
                &[(Target::Q, 0), (Target::K, hq), (Target::V, hq + hkv)],
                &mut grads,
            );
            if need_dx {
                rms_backward(&sv.x_in, &block.attn_norm, &sv.inv1, &dxn, &mut dx);
            }
            sv.recycle();
        }
        give([dx, dbuf_i, dgu, dxn, datt, dqkv, dp, x, xn]);
        give([dos, dqs, qs, probs]);
        w.recycle();
        Ok((losses, grads))
    }
}

/// Loss and LoRA gradients of `model` + `adapter` on `ids`: `batch` sequences of equal length,
/// row-major. The frozen weights are only read.
pub fn lora_gradients(
    model: &Llama,
    adapter: &LoraAdapter,
    ids: &[u32],
    batch: usize,
    reduction: Reduction,
    dropout: Option<DropoutSpec>,
) -> Result<Gradients> {
    lora_gradients_in(
        Precision::F32,
        model,
        adapter,
        ids,
        batch,
        reduction,
        dropout,
    )
}

/// [`lora_gradients`] with the frozen-weight products in `precision`.
pub fn lora_gradients_in(
    precision: Precision,
    model: &Llama,
    adapter: &LoraAdapter,
    ids: &[u32],
    batch: usize,
    reduction: Reduction,
    dropout: Option<DropoutSpec>,
) -> Result<Gradients> {
    let c = &model.config;
    if batch == 0 || ids.is_empty() || !ids.len().is_multiple_of(batch) {
        return Err(ModelError::InvalidArgument(format!(
            "{} ids do not form a batch of {batch} sequences",
            ids.len()
        )));
    }
    let seq = ids.len() / batch;
    if seq < 2 {
        return Err(ModelError::InvalidArgument(
            "training sequences need at least 2 tokens".into(),
        ));
    }
    if let Some(&bad) = ids
        .iter()
        .find(|&&i| crate::data::token(i) as usize >= c.vocab_size)
    {
        return Err(ModelError::TokenOutOfRange {
            id: crate::data::token(bad),
            vocab: c.vocab_size,
        });
    }
    model.check_adapter(adapter)?;
    if let Some(d) = dropout {
        if !(0.0..1.0).contains(&d.p) {
            return Err(ModelError::InvalidArgument(format!(
                "dropout probability {} is outside [0, 1)",
                d.p
            )));
        }
    }
    let rank = adapter.config.rank;
    let mut off = 0;
    let mut lora = Vec::with_capacity(adapter.layers.len());
    for layer in &adapter.layers {
        let mut slots: [Option<LoraMats>; 7] = Default::default();
        for t in Target::ALL {
            if let Some(p) = &layer[t as usize] {
                let [_, fan_in] = p.a.dims();
                let [fan_out, _] = p.b.dims();
                let a: Vec<f32> = p.a.clone().into_data().iter::<f32>().collect();
                let b: Vec<f32> = p.b.clone().into_data().iter::<f32>().collect();
                slots[t as usize] = Some(LoraMats {
                    a,
                    b,
                    fan_in,
                    fan_out,
                    a_off: off,
                    b_off: off + rank * fan_in,
                });
                off += rank * fan_in + fan_out * rank;
            }
        }
        lora.push(slots);
    }
    let threads = rayon::current_num_threads().max(1);
    let groups = threads.min(batch);
    let bf16 = precision.effective() == Precision::Bf16;
    let (cos, sin) = rope_tables(c.rope_theta, c.head_dim, seq);
    let ctx = Ctx {
        model,
        lora,
        rank,
        scale: adapter.config.scaling(),
        dropout,
        seq,
        cos,
        sin,
        grad_len: off,
        reduction,
        merged: !bf16 && dropout.is_none_or(|d| d.p == 0.0),
        bf16,
        par: if groups == 1 && threads > 1 {
            Parallelism::Rayon(threads)
        } else {
            Parallelism::None
        },
    };
    let bounds: Vec<std::ops::Range<usize>> = (0..groups)
        .map(|g| g * batch / groups..(g + 1) * batch / groups)
        .collect();
    let per_run = (RUN_ROWS / seq).max(1);
    let parts: Vec<Result<GroupOut>> = bounds
        .par_iter()
        .map(|r| {
            let mut out: GroupOut = (Vec::new(), Vec::new());
            for start in (r.start..r.end).step_by(per_run) {
                let piece = start..(start + per_run).min(r.end);
                let part = ctx.run(&ids[piece.start * seq..piece.end * seq], piece)?;
                merge(&mut out, part, reduction);
            }
            Ok(out)
        })
        .collect();
    let mut all: GroupOut = (Vec::with_capacity(batch), Vec::new());
    for part in parts {
        merge(&mut all, part?, reduction);
    }
    let (losses, grads) = all;
    Ok(Gradients { losses, grads })
}

/// Appends `part`'s losses to `into`'s and combines the gradients as `reduction` says (one summed
/// vector, or one per sequence in order).
fn merge(into: &mut GroupOut, part: GroupOut, reduction: Reduction) {
    let (l, g) = part;
    into.0.extend(l);
    match reduction {
        Reduction::PerSequence => into.1.extend(g),
        Reduction::Sum { .. } => match into.1.first_mut() {
            None => into.1 = g,
            Some(acc) => {
                for (a, b) in acc.iter_mut().zip(&g[0]) {
                    *a += b;
                }
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_is_accurate_to_a_few_ulp() {
        let mut worst = 0.0f64;
        for i in -800_000..=800_000 {
            let x = i as f32 * 1e-4;
            let want = (x as f64).exp();
            let rel = ((exp(x) as f64 - want) / want).abs();
            worst = worst.max(rel);
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert!(exp(-1000.0) < 1e-37 && exp(-1000.0) >= 0.0);
        assert!(exp(1000.0).is_finite());
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn pooled_buffers_come_back_zeroed() {
        let mut a = buf(1000);
        a.iter_mut().for_each(|v| *v = 7.0);
        give([a]);
        let b = buf(900);
        assert_eq!(b.len(), 900);
        assert!(b.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn released_buffers_are_not_reused() {
        give([vec![1.0f32; 4096]]);
        assert!(pooled(4000).capacity() >= 4096);
        give([vec![1.0f32; 4096]]);
        release_buffers();
        assert_eq!(pooled(1).capacity(), 0);
    }

    #[test]
    fn rope_backward_is_the_transpose_of_rope() {
        let (cos, sin) = rope_tables(10_000.0, 8, 3);
        let x: Vec<f32> = (0..3 * 16).map(|i| (i as f32 * 0.37).sin()).collect();
        let d: Vec<f32> = (0..3 * 16).map(|i| (i as f32 * 0.11).cos()).collect();
        let (mut rx, mut bd) = (x.clone(), d.clone());
        rope(&mut rx, 16, 0, 2, 8, 3, (&cos, &sin), false);
        rope(&mut bd, 16, 0, 2, 8, 3, (&cos, &sin), true);
        // <rope(x), d> == <x, ropeᵀ(d)>
        let lhs: f32 = rx.iter().zip(&d).map(|(a, b)| a * b).sum();
        let rhs: f32 = x.iter().zip(&bd).map(|(a, b)| a * b).sum();
        assert!((lhs - rhs).abs() < 1e-5, "{lhs} vs {rhs}");
    }
}
