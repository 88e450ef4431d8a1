//! Frozen base weights stored quantized (GGUF's Q8_0, Q4_0 and Q4_1 block layouts) or in f32, and
//! the matmul kernels that read them.
//!
//! A block covers 32 consecutive values of one weight row and carries one f16 scale:
//! - Q8_0: `d: f16, qs: [i8; 32]` (34 bytes, 1.0625 bytes/value); value = `d * q`.
//! - Q4_0: `d: f16, qs: [u8; 16]` (18 bytes, 0.5625 bytes/value); byte `j` holds value `j` in its
//!   low nibble and value `j + 16` in its high nibble; value = `d * (nibble - 8)`.
//! - Q4_1: `d: f16, m: f16, qs: [u8; 16]` (20 bytes, 0.625 bytes/value); nibbles as Q4_0, value =
//!   `d * nibble + m` (an offset per block: what most published 4-bit GGUF files of small models use).
//!
//! The weights stay quantized in memory. `matmul_t` dequantizes them tile by tile (a few rows at a
//! time into a small per-thread scratch that stays in cache) and multiplies with an optimised GEMM;
//! for one to a few input rows (decoding) it uses a fused dot product straight over the blocks.
//! This module knows nothing of burn, files or model structure.

use bytemuck::{Pod, Zeroable};
use half::f16;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// Values per quantization block.
pub const QK: usize = 32;

/// How frozen weights are stored in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum QuantType {
    /// Plain 32-bit floats (4 bytes per value).
    F32,
    /// 8-bit blocks of 32 with an f16 scale (1.0625 bytes per value).
    #[value(name = "q8_0")]
    #[serde(rename = "q8_0")]
    Q8_0,
    /// 4-bit blocks of 32 with an f16 scale (0.5625 bytes per value).
    #[value(name = "q4_0")]
    #[serde(rename = "q4_0")]
    Q4_0,
    /// 4-bit blocks of 32 with an f16 scale and an f16 minimum (0.625 bytes per value).
    #[value(name = "q4_1")]
    #[serde(rename = "q4_1")]
    Q4_1,
}

impl QuantType {
    /// The lowercase name used in files and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Q8_0 => "q8_0",
            Self::Q4_0 => "q4_0",
            Self::Q4_1 => "q4_1",
        }
    }

    /// Parses the name used in files.
    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "f32" => Some(Self::F32),
            "q8_0" => Some(Self::Q8_0),
            "q4_0" => Some(Self::Q4_0),
            "q4_1" => Some(Self::Q4_1),
            _ => None,
        }
    }

    /// This format if rows of `cols` values can use it, else f32 (quantized formats need whole
    /// blocks; llama.cpp falls back the same way).
    pub fn for_row_len(self, cols: usize) -> Self {
        if cols.is_multiple_of(QK) {
            self
        } else {
            Self::F32
        }
    }

    /// Bytes one block of `QK` values occupies (for f32, `QK` floats).
    pub fn block_bytes(self) -> usize {
        match self {
            Self::F32 => 4 * QK,
            Self::Q8_0 => std::mem::size_of::<BlockQ8_0>(),
            Self::Q4_0 => std::mem::size_of::<BlockQ4_0>(),
            Self::Q4_1 => std::mem::size_of::<BlockQ4_1>(),
        }
    }
}

impl std::fmt::Display for QuantType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One Q8_0 block: scale and 32 signed 8-bit values (GGUF layout).
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct BlockQ8_0 {
    /// Scale.
    pub d: f16,
    /// Quantized values.
    pub qs: [i8; QK],
}

/// One Q4_0 block: scale and 32 packed 4-bit values (GGUF layout).
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct BlockQ4_0 {
    /// Scale.
    pub d: f16,
    /// Packed values: low nibble = value j, high nibble = value j + 16.
    pub qs: [u8; QK / 2],
}

/// One Q4_1 block: scale, minimum and 32 packed 4-bit values (GGUF layout).
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct BlockQ4_1 {
    /// Scale.
    pub d: f16,
    /// Minimum (the value of nibble 0).
    pub m: f16,
    /// Packed values: low nibble = value j, high nibble = value j + 16.
    pub qs: [u8; QK / 2],
}

/// Eight Q4_0 blocks of the same column from eight consecutive rows, interleaved so that one
/// 32-byte load holds four bytes of each row (the in-memory layout of Q4_0 matrices whose row count
/// is a multiple of 8; files keep GGUF's row-major blocks).
///
/// `qs[(g * 8 + l) * 4 + i]` is byte `4g + i` of row `l`'s block (`g` in 0..4): its low nibble is
/// value `4g + i`, its high nibble value `16 + 4g + i`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct BlockQ4_0x8 {
    /// The eight rows' scales.
    pub d: [f16; 8],
    /// The eight rows' packed values, interleaved by four bytes.
    pub qs: [u8; 128],
}

impl BlockQ4_0x8 {
    /// Interleaves the blocks of eight rows.
    pub fn pack(rows: [&BlockQ4_0; 8]) -> Self {
        let mut out = Self {
            d: [f16::ZERO; 8],
            qs: [0; 128],
        };
        for (l, b) in rows.iter().enumerate() {
            out.d[l] = b.d;
            for g in 0..4 {
                out.qs[(g * 8 + l) * 4..(g * 8 + l) * 4 + 4]
                    .copy_from_slice(&b.qs[4 * g..4 * g + 4]);
            }
        }
        out
    }

    /// The block of row `l` (0..8).
    pub fn unpack(&self, l: usize) -> BlockQ4_0 {
        let mut qs = [0u8; QK / 2];
        for g in 0..4 {
            qs[4 * g..4 * g + 4].copy_from_slice(&self.qs[(g * 8 + l) * 4..(g * 8 + l) * 4 + 4]);
        }
        BlockQ4_0 { d: self.d[l], qs }
    }
}

const _: () = assert!(std::mem::size_of::<BlockQ4_0x8>() == 8 * 18);
const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);
const _: () = assert!(std::mem::size_of::<BlockQ4_0>() == 18);
const _: () = assert!(std::mem::size_of::<BlockQ4_1>() == 20);

/// Storage of a weight matrix.
#[derive(Debug, Clone)]
enum Data {
    F32(Vec<f32>),
    Q8_0(Vec<BlockQ8_0>),
    Q4_0(Vec<BlockQ4_0>),
    Q4_1(Vec<BlockQ4_1>),
    /// Q4_0 with rows interleaved by eight: group `g`'s block column `b` at `g * blocks_per_row + b`.
    Q4_0x8(Vec<BlockQ4_0x8>),
}

/// Borrowed view of a matrix's stored values (row-major; `cols / QK` blocks per quantized row).
#[derive(Debug, Clone, Copy)]
pub enum Storage<'a> {
    /// Plain floats.
    F32(&'a [f32]),
    /// Q8_0 blocks.
    Q8_0(&'a [BlockQ8_0]),
    /// Q4_0 blocks.
    Q4_0(&'a [BlockQ4_0]),
    /// Q4_1 blocks.
    Q4_1(&'a [BlockQ4_1]),
    /// Q4_0 blocks interleaved by eight rows.
    Q4_0x8(&'a [BlockQ4_0x8]),
}

/// Row-major Q4_0 blocks (`rows` a multiple of 8, `bpr` blocks per row) interleaved by eight rows:
/// group `g`'s block column `b` at `g * bpr + b`.
pub fn interleave_q4_0(blocks: &[BlockQ4_0], rows: usize, bpr: usize) -> Vec<BlockQ4_0x8> {
    (0..rows / 8)
        .flat_map(|g| (0..bpr).map(move |b| (g, b)))
        .map(|(g, b)| BlockQ4_0x8::pack(std::array::from_fn(|l| &blocks[(8 * g + l) * bpr + b])))
        .collect()
}

/// Row `r` of an interleaved Q4_0 matrix (`bpr` blocks per row) as plain blocks.
fn plain_row(v: &[BlockQ4_0x8], bpr: usize, r: usize) -> Vec<BlockQ4_0> {
    v[(r / 8) * bpr..(r / 8 + 1) * bpr]
        .iter()
        .map(|blk| blk.unpack(r % 8))
        .collect()
}

/// Q4_0 blocks (row-major) of `rows` rows, interleaved by eight when the row count allows and this
/// CPU has the kernel that reads them (AVX2, AVX-512); elsewhere (NEON, portable) the plain layout feeds the
/// per-row kernels directly.
fn q4_0_data(blocks: Vec<BlockQ4_0>, rows: usize, cols: usize) -> Data {
    let bpr = cols / QK;
    if rows == 0 || !rows.is_multiple_of(8) || bpr == 0 || !crate::kernels::Isa::detect().has_avx2()
    {
        return Data::Q4_0(blocks);
    }
    let packed = interleave_q4_0(&blocks, rows, bpr);
    Data::Q4_0x8(packed)
}

/// A frozen `rows × cols` weight matrix (PyTorch's `[out, in]` orientation), possibly quantized.
#[derive(Debug, Clone)]
pub struct QMatrix {
    rows: usize,
    cols: usize,
    data: Data,
}

/// Quantizes one block of 32 values to Q8_0 exactly as llama.cpp's reference does.
fn quantize_q8_0(x: &[f32]) -> BlockQ8_0 {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut qs = [0i8; QK];
    for (q, v) in qs.iter_mut().zip(x) {
        *q = (v * id).round() as i8;
    }
    BlockQ8_0 {
        d: f16::from_f32(d),
        qs,
    }
}

/// Quantizes one block of 32 values to Q4_0 exactly as llama.cpp's reference does.
fn quantize_q4_0(x: &[f32]) -> BlockQ4_0 {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut qs = [0u8; QK / 2];
    for j in 0..QK / 2 {
        let q0 = ((x[j] * id + 8.5) as i32).min(15) as u8;
        let q1 = ((x[j + QK / 2] * id + 8.5) as i32).min(15) as u8;
        qs[j] = q0 | (q1 << 4);
    }
    BlockQ4_0 {
        d: f16::from_f32(d),
        qs,
    }
}

/// Quantizes one block of 32 values to Q4_1 exactly as llama.cpp's reference does.
fn quantize_q4_1(x: &[f32]) -> BlockQ4_1 {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        min = min.min(v);
        max = max.max(v);
    }
    let d = (max - min) / 15.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut qs = [0u8; QK / 2];
    for j in 0..QK / 2 {
        // As ggml: truncation of x + 0.5 through an 8-bit signed integer, capped at 15.
        let q0 = (((x[j] - min) * id + 0.5) as i8).min(15) as u8;
        let q1 = (((x[j + QK / 2] - min) * id + 0.5) as i8).min(15) as u8;
        qs[j] = q0 | (q1 << 4);
    }
    BlockQ4_1 {
        d: f16::from_f32(d),
        m: f16::from_f32(min),
        qs,
    }
}

#[inline]
fn dequant_q4_1(b: &BlockQ4_1, out: &mut [f32]) {
    let (d, m) = (b.d.to_f32(), b.m.to_f32());
    let (lo, hi) = out.split_at_mut(QK / 2);
    for j in 0..QK / 2 {
        lo[j] = (b.qs[j] & 0x0f) as f32 * d + m;
        hi[j] = (b.qs[j] >> 4) as f32 * d + m;
    }
}

/// Row `r` of row-major blocks (`bpr` to a row) into `out`, one block of [`QK`] values at a time
/// through `dequant` (a block format's own decoding, inlined: this runs in every tile expansion).
#[inline]
fn dequant_row<B>(
    blocks: &[B],
    r: usize,
    bpr: usize,
    out: &mut [f32],
    dequant: impl Fn(&B, &mut [f32]),
) {
    for (blk, o) in blocks[r * bpr..(r + 1) * bpr]
        .iter()
        .zip(out.chunks_exact_mut(QK))
    {
        dequant(blk, o);
    }
}

#[inline]
fn dequant_q8_0(b: &BlockQ8_0, out: &mut [f32]) {
    let d = b.d.to_f32();
    for (o, q) in out.iter_mut().zip(b.qs) {
        *o = d * q as f32;
    }
}

#[inline]
fn dequant_q4_0(b: &BlockQ4_0, out: &mut [f32]) {
    let d = b.d.to_f32();
    let (lo, hi) = out.split_at_mut(QK / 2);
    for j in 0..QK / 2 {
        lo[j] = d * ((b.qs[j] & 0x0f) as i32 - 8) as f32;
        hi[j] = d * ((b.qs[j] >> 4) as i32 - 8) as f32;
    }
}

/// Fused dot product of one Q8_0 row with `x`.
#[inline]
fn dot_q8_0(row: &[BlockQ8_0], x: &[f32]) -> f32 {
    let mut total = 0.0f32;
    for (b, xs) in row.iter().zip(x.chunks_exact(QK)) {
        let mut acc = [0.0f32; 8];
        for (qc, xc) in b.qs.chunks_exact(8).zip(xs.chunks_exact(8)) {
            for i in 0..8 {
                acc[i] += qc[i] as f32 * xc[i];
            }
        }
        total += b.d.to_f32() * acc.iter().sum::<f32>();
    }
    total
}

/// Fused dot product of one Q4_0 row with `x`.
#[inline]
fn dot_q4_0(row: &[BlockQ4_0], x: &[f32]) -> f32 {
    let mut total = 0.0f32;
    for (b, xs) in row.iter().zip(x.chunks_exact(QK)) {
        let (xl, xh) = xs.split_at(QK / 2);
        let mut acc = [0.0f32; 8];
        for c in 0..2 {
            for i in 0..8 {
                let q = b.qs[c * 8 + i];
                acc[i] += ((q & 0x0f) as i32 - 8) as f32 * xl[c * 8 + i]
                    + ((q >> 4) as i32 - 8) as f32 * xh[c * 8 + i];
            }
        }
        total += b.d.to_f32() * acc.iter().sum::<f32>();
    }
    total
}

/// Fused dot product of one Q4_1 row with `x`.
#[inline]
fn dot_q4_1(row: &[BlockQ4_1], x: &[f32]) -> f32 {
    let mut total = 0.0f32;
    for (b, xs) in row.iter().zip(x.chunks_exact(QK)) {
        let (xl, xh) = xs.split_at(QK / 2);
        let (mut acc, mut sum) = ([0.0f32; 8], [0.0f32; 8]);
        for c in 0..2 {
            for i in 0..8 {
                let q = b.qs[c * 8 + i];
                let (l, h) = (xl[c * 8 + i], xh[c * 8 + i]);
                acc[i] += (q & 0x0f) as f32 * l + (q >> 4) as f32 * h;
                sum[i] += l + h;
            }
        }
        total += b.d.to_f32() * acc.iter().sum::<f32>() + b.m.to_f32() * sum.iter().sum::<f32>();
    }
    total
}

/// Rows of `x` up to which `matmul_t` uses fused dot products instead of tiles + GEMM.
const GEMV_MAX_ROWS: usize = 4;

/// `out[m, n] = Σ_k a[m, k] · b[n, k]` for row-major `a` (`m × k`) and `b` (`n × k`), written
/// into row-major `out` with row stride `ldo`, single-threaded.
pub(crate) fn gemm_nt(
    a: &[f32],
    b: &[f32],
    m: usize,
    n: usize,
    k: usize,
    out: &mut [f32],
    ldo: usize,
) {
    assert!(a.len() >= m * k && b.len() >= n * k && (m == 0 || out.len() >= (m - 1) * ldo + n));
    // SAFETY: the bounds are checked above; `b` read with column stride k is `b^T` (k × n).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            ldo as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

impl QMatrix {
    /// Stores `values` (row-major `rows × cols`) in the requested format.
    ///
    /// Quantized formats need `cols` to be a multiple of 32 (the block size).
    pub fn quantize(rows: usize, cols: usize, values: &[f32], kind: QuantType) -> Result<Self> {
        if rows.checked_mul(cols) != Some(values.len()) {
            return Err(ModelError::InvalidArgument(format!(
                "matrix of {rows}×{cols} given {} values",
                values.len()
            )));
        }
        if kind != QuantType::F32 && !cols.is_multiple_of(QK) {
            return Err(ModelError::InvalidArgument(format!(
                "{kind} needs a row length that is a multiple of {QK}, found {cols}"
            )));
        }
        let data = match kind {
            QuantType::F32 => Data::F32(values.to_vec()),
            QuantType::Q8_0 => Data::Q8_0(values.par_chunks(QK).map(quantize_q8_0).collect()),
            QuantType::Q4_0 => q4_0_data(
                values.par_chunks(QK).map(quantize_q4_0).collect(),
                rows,
                cols,
            ),
            QuantType::Q4_1 => Data::Q4_1(values.par_chunks(QK).map(quantize_q4_1).collect()),
        };
        Ok(Self { rows, cols, data })
    }

    /// Rebuilds a quantized matrix from its stored blocks (as written by [`QMatrix::to_bytes`]).
    pub fn from_bytes(rows: usize, cols: usize, kind: QuantType, bytes: &[u8]) -> Result<Self> {
        let blocks_per_row = if kind == QuantType::F32 { 0 } else { cols / QK };
        let expected = match kind {
            QuantType::F32 => rows.checked_mul(cols).and_then(|n| n.checked_mul(4)),
            _ => rows
                .checked_mul(blocks_per_row)
                .and_then(|n| n.checked_mul(kind.block_bytes())),
        };
        if (kind != QuantType::F32 && !cols.is_multiple_of(QK)) || expected != Some(bytes.len()) {
            return Err(ModelError::InvalidArgument(format!(
                "{kind} matrix {rows}×{cols} cannot be made of {} bytes",
                bytes.len()
            )));
        }
        let data = match kind {
            QuantType::F32 => Data::F32(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            // pod_collect_to_vec copies, so the source needs no particular alignment.
            QuantType::Q8_0 => Data::Q8_0(bytemuck::pod_collect_to_vec(bytes)),
            QuantType::Q4_0 => q4_0_data(bytemuck::pod_collect_to_vec(bytes), rows, cols),
            QuantType::Q4_1 => Data::Q4_1(bytemuck::pod_collect_to_vec(bytes)),
        };
        Ok(Self { rows, cols, data })
    }

    /// The stored representation as little-endian bytes (blocks in row-major order).
    pub fn to_bytes(&self) -> Vec<u8> {
        match &self.data {
            Data::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Data::Q8_0(b) => bytemuck::cast_slice(b).to_vec(),
            Data::Q4_0(b) => bytemuck::cast_slice(b).to_vec(),
            Data::Q4_1(b) => bytemuck::cast_slice(b).to_vec(),
            Data::Q4_0x8(v) => {
                let bpr = self.cols / QK;
                let mut out =
                    Vec::with_capacity(self.rows * bpr * std::mem::size_of::<BlockQ4_0>());
                for r in 0..self.rows {
                    out.extend_from_slice(bytemuck::cast_slice(&plain_row(v, bpr, r)));
                }
                out
            }
        }
    }

    /// Number of rows (output features).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns (input features).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The storage format.
    pub fn kind(&self) -> QuantType {
        match self.data {
            Data::F32(_) => QuantType::F32,
            Data::Q8_0(_) => QuantType::Q8_0,
            Data::Q4_0(_) | Data::Q4_0x8(_) => QuantType::Q4_0,
            Data::Q4_1(_) => QuantType::Q4_1,
        }
    }

    /// The stored values, for kernels that read blocks directly.
    pub fn storage(&self) -> Storage<'_> {
        match &self.data {
            Data::F32(v) => Storage::F32(v),
            Data::Q8_0(b) => Storage::Q8_0(b),
            Data::Q4_0(b) => Storage::Q4_0(b),
            Data::Q4_1(b) => Storage::Q4_1(b),
            Data::Q4_0x8(b) => Storage::Q4_0x8(b),
        }
    }

    /// Bytes the weights occupy in memory.
    pub fn resident_bytes(&self) -> usize {
        match &self.data {
            Data::F32(v) => v.len() * 4,
            Data::Q8_0(b) => std::mem::size_of_val(b.as_slice()),
            Data::Q4_0(b) => std::mem::size_of_val(b.as_slice()),
            Data::Q4_1(b) => std::mem::size_of_val(b.as_slice()),
            Data::Q4_0x8(b) => std::mem::size_of_val(b.as_slice()),
        }
    }

    /// Writes row `r` as f32 values into `out` (`cols` long).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let c = self.cols;
        match &self.data {
            Data::F32(v) => out.copy_from_slice(&v[r * c..(r + 1) * c]),
            Data::Q8_0(b) => dequant_row(b, r, c / QK, out, dequant_q8_0),
            Data::Q4_0(b) => dequant_row(b, r, c / QK, out, dequant_q4_0),
            Data::Q4_1(b) => dequant_row(b, r, c / QK, out, dequant_q4_1),
            Data::Q4_0x8(v) => {
                let bpr = c / QK;
                let l = r % 8;
                for (blk, o) in v[(r / 8) * bpr..(r / 8 + 1) * bpr]
                    .iter()
                    .zip(out.chunks_exact_mut(QK))
                {
                    let d = blk.d[l].to_f32();
                    for g in 0..4 {
                        let bytes = &blk.qs[(g * 8 + l) * 4..(g * 8 + l) * 4 + 4];
                        for (i, &q) in bytes.iter().enumerate() {
                            o[4 * g + i] = d * ((q & 0x0f) as i32 - 8) as f32;
                            o[16 + 4 * g + i] = d * ((q >> 4) as i32 - 8) as f32;
                        }
                    }
                }
            }
        }
    }

    /// The whole matrix as row-major f32 values.
    pub fn to_f32(&self) -> Vec<f32> {
        if let Data::F32(v) = &self.data {
            return v.clone();
        }
        let mut out = vec![0.0f32; self.rows * self.cols];
        out.par_chunks_mut(self.cols)
            .enumerate()
            .for_each(|(r, o)| self.dequantize_row(r, o));
        out
    }

    /// Gathers rows `ids` as f32 (an embedding lookup); ids must be `< rows`.
    pub fn gather_rows(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let mut out = vec![0.0f32; ids.len() * self.cols];
        for (&id, o) in ids.iter().zip(out.chunks_exact_mut(self.cols)) {
            if id as usize >= self.rows {
                return Err(ModelError::TokenOutOfRange {
                    id,
                    vocab: self.rows,
                });
            }
            self.dequantize_row(id as usize, o);
        }
        Ok(out)
    }

    /// `y = x · Wᵀ` for `x` of `m × cols` (row-major); returns `m × rows`.
    ///
    /// Parallel over tiles of output features. Quantized weights are never expanded beyond one
    /// tile per thread.
    pub fn matmul_t(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(
            x.len(),
            m * self.cols,
            "matmul_t: input has the wrong length"
        );
        let (n, k) = (self.rows, self.cols);
        let mut y = vec![0.0f32; m * n];
        if m == 0 || n == 0 {
            return y;
        }
        if m <= GEMV_MAX_ROWS {
            // Decoding: memory-bound; read each weight block once and reuse it for every x row.
            let mut yt = vec![0.0f32; n * m]; // transposed: one contiguous chunk per weight row
            yt.par_chunks_mut(m * 64)
                .enumerate()
                .for_each(|(t, chunk)| {
                    for (i, out) in chunk.chunks_exact_mut(m).enumerate() {
                        let r = t * 64 + i;
                        // An interleaved row is unpacked once, not once per input row.
                        let unpacked = match &self.data {
                            Data::Q4_0x8(v) => plain_row(v, k / QK, r),
                            _ => Vec::new(),
                        };
                        for (j, o) in out.iter_mut().enumerate() {
                            let xr = &x[j * k..(j + 1) * k];
                            *o = match &self.data {
                                Data::F32(v) => v[r * k..(r + 1) * k]
                                    .iter()
                                    .zip(xr)
                                    .map(|(a, b)| a * b)
                                    .sum(),
                                Data::Q8_0(b) => dot_q8_0(&b[r * (k / QK)..(r + 1) * (k / QK)], xr),
                                Data::Q4_0(b) => dot_q4_0(&b[r * (k / QK)..(r + 1) * (k / QK)], xr),
                                Data::Q4_1(b) => dot_q4_1(&b[r * (k / QK)..(r + 1) * (k / QK)], xr),
                                Data::Q4_0x8(_) => dot_q4_0(&unpacked, xr),
                            };
                        }
                    }
                });
            for r in 0..n {
                for j in 0..m {
                    y[j * n + r] = yt[r * m + j];
                }
            }
            return y;
        }
        // Batched: tiles of TILE weight rows. Each task dequantizes its tile into a scratch buffer
        // (TILE × k floats) and runs a GEMM of x against it into its own output block.
        const TILE: usize = 64;
        let tiles: Vec<(usize, Vec<f32>)> = (0..n.div_ceil(TILE))
            .into_par_iter()
            .map(|t| {
                let r0 = t * TILE;
                let nt = TILE.min(n - r0);
                let mut block = vec![0.0f32; m * nt];
                match &self.data {
                    Data::F32(v) => gemm_nt(x, &v[r0 * k..(r0 + nt) * k], m, nt, k, &mut block, nt),
                    _ => {
                        let mut w = vec![0.0f32; nt * k];
                        for (i, row) in w.chunks_exact_mut(k).enumerate() {
                            self.dequantize_row(r0 + i, row);
                        }
                        gemm_nt(x, &w, m, nt, k, &mut block, nt);
                    }
                }
                (r0, block)
            })
            .collect();
        for (r0, block) in tiles {
            let nt = block.len() / m;
            for (j, src) in block.chunks_exact(nt).enumerate() {
                y[j * n + r0..j * n + r0 + nt].copy_from_slice(src);
            }
        }
        y
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    fn reference(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut y = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k)
                    .map(|t| x[i * k + t] as f64 * w[j * k + t] as f64)
                    .sum::<f64>() as f32;
            }
        }
        y
    }

    #[test]
    fn q8_0_matches_llama_cpp_reference_values() {
        // Block of 0..31 scaled: amax = 31/10, d = amax / 127, q = round(x / d).
        let x: Vec<f32> = (0..32).map(|i| i as f32 / 10.0).collect();
        let b = quantize_q8_0(&x);
        assert_eq!(b.d, f16::from_f32(3.1 / 127.0));
        assert_eq!(b.qs[31], 127);
        assert_eq!(b.qs[10], (1.0f32 / (3.1 / 127.0)).round() as i8);
        let mut out = [0.0; 32];
        dequant_q8_0(&b, &mut out);
        for (a, e) in out.iter().zip(&x) {
            assert!((a - e).abs() <= 3.1 / 127.0 / 2.0 + 1e-3);
        }
    }

    #[test]
    fn q4_0_matches_llama_cpp_reference_values() {
        // Largest-magnitude value is -2.0: d = -2 / -8 = 0.25, that value maps to nibble 0.
        let mut x = vec![0.0f32; 32];
        x[0] = -2.0;
        x[16] = 1.0;
        x[5] = 0.26;
        let b = quantize_q4_0(&x);
        assert_eq!(b.d.to_f32(), 0.25);
        assert_eq!(b.qs[0] & 0x0f, 0); // -2.0 / 0.25 + 8 = 0
        assert_eq!(b.qs[0] >> 4, 12); // 1.0 / 0.25 + 8 = 12
        assert_eq!(b.qs[5] & 0x0f, 9); // 0.26 / 0.25 + 8.5 = 9.54 -> 9
        let mut out = [0.0; 32];
        dequant_q4_0(&b, &mut out);
        assert_eq!(out[0], -2.0);
        assert_eq!(out[16], 1.0);
        assert_eq!(out[5], 0.25);
    }

    #[test]
    fn q4_1_matches_llama_cpp_reference_values() {
        // min -1, max 2: d = 3 / 15 = 0.2, m = -1; 0.5 → (1.5 / 0.2 + 0.5) = 8 (truncated);
        // 0.09 → (1.09 / 0.2 + 0.5) = 5.95 → 5.
        let mut x = vec![0.0f32; 32];
        x[0] = -1.0;
        x[17] = 2.0;
        x[3] = 0.5;
        x[4] = 0.09;
        let b = quantize_q4_1(&x);
        assert_eq!(b.d, f16::from_f32(0.2));
        assert_eq!(b.m.to_f32(), -1.0);
        assert_eq!(b.qs[0] & 0x0f, 0);
        assert_eq!(b.qs[1] >> 4, 15);
        assert_eq!(b.qs[3] & 0x0f, 8);
        assert_eq!(b.qs[4] & 0x0f, 5);
        assert_eq!(b.qs[5] & 0x0f, 5); // 0.0 → 5.5 → 5
        let mut out = [0.0; 32];
        dequant_q4_1(&b, &mut out);
        assert_eq!(out[0], -1.0);
        assert!((out[17] - 2.0).abs() < 1e-3);
        // The block format is GGUF's: the bytes are d, m, then the nibbles.
        let bytes = bytemuck::bytes_of(&b);
        assert_eq!(&bytes[..2], &b.d.to_le_bytes());
        assert_eq!(&bytes[2..4], &b.m.to_le_bytes());
        assert_eq!(&bytes[4..], &b.qs);
    }

    #[test]
    fn matmul_matches_dequantized_reference_for_every_format_and_size() {
        let (n, k) = (70, 96);
        let w = random(n * k, 1);
        for kind in [
            QuantType::F32,
            QuantType::Q8_0,
            QuantType::Q4_0,
            QuantType::Q4_1,
        ] {
            let q = QMatrix::quantize(n, k, &w, kind).unwrap();
            let wd = q.to_f32();
            for m in [1, 3, 4, 5, 17] {
                let x = random(m * k, 2 + m as u64);
                let y = q.matmul_t(&x, m);
                let r = reference(&x, &wd, m, n, k);
                let err = y
                    .iter()
                    .zip(&r)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f32::max);
                assert!(err < 1e-4, "{kind} m={m}: {err}");
            }
        }
    }

    #[test]
    fn quantization_error_is_small() {
        let (n, k) = (8, 256);
        let w = random(n * k, 3);
        let rel = |kind| {
            let d = QMatrix::quantize(n, k, &w, kind).unwrap().to_f32();
            let num: f32 = d.iter().zip(&w).map(|(a, b)| (a - b).powi(2)).sum();
            (num / w.iter().map(|v| v * v).sum::<f32>()).sqrt()
        };
        assert!(rel(QuantType::Q8_0) < 0.01);
        assert!(rel(QuantType::Q4_0) < 0.12);
        assert!(rel(QuantType::Q4_1) < 0.1);
    }

    #[test]
    fn resident_bytes_per_parameter() {
        let (n, k) = (64, 1024);
        let w = random(n * k, 4);
        let per = |kind| {
            QMatrix::quantize(n, k, &w, kind).unwrap().resident_bytes() as f64 / (n * k) as f64
        };
        assert_eq!(per(QuantType::Q8_0), 1.0625);
        assert_eq!(per(QuantType::Q4_0), 0.5625);
        assert_eq!(per(QuantType::Q4_1), 0.625);
    }

    #[test]
    fn bytes_round_trip_and_bad_lengths() {
        let w = random(4 * 64, 5);
        for kind in [
            QuantType::F32,
            QuantType::Q8_0,
            QuantType::Q4_0,
            QuantType::Q4_1,
        ] {
            let q = QMatrix::quantize(4, 64, &w, kind).unwrap();
            let b = q.to_bytes();
            let back = QMatrix::from_bytes(4, 64, kind, &b).unwrap();
            assert_eq!(back.to_f32(), q.to_f32());
            assert!(QMatrix::from_bytes(4, 64, kind, &b[..b.len() - 1]).is_err());
            assert!(QMatrix::from_bytes(usize::MAX, 64, kind, &b).is_err());
        }
        assert!(QMatrix::quantize(2, 33, &random(66, 6), QuantType::Q8_0).is_err());
    }

    #[test]
    fn interleaved_q4_0_keeps_the_file_bytes_and_the_values() {
        // 24 rows are interleaved in memory, 12 are not; the bytes and values are the same.
        let w = random(24 * 64, 7);
        let a = QMatrix::quantize(24, 64, &w, QuantType::Q4_0).unwrap();
        if crate::kernels::Isa::detect().has_avx2() {
            assert!(matches!(a.storage(), Storage::Q4_0x8(_)));
        }
        let b = QMatrix::quantize(12, 64, &w[..12 * 64], QuantType::Q4_0).unwrap();
        assert!(matches!(b.storage(), Storage::Q4_0(_)));
        let bytes = a.to_bytes();
        assert_eq!(&bytes[..b.to_bytes().len()], &b.to_bytes()[..]);
        assert_eq!(&a.to_f32()[..12 * 64], &b.to_f32()[..]);
        let back = QMatrix::from_bytes(24, 64, QuantType::Q4_0, &bytes).unwrap();
        assert_eq!(back.to_bytes(), bytes);
        assert_eq!(a.resident_bytes(), 24 * 2 * 18);
        let x = random(3 * 64, 8);
        assert_eq!(a.matmul_t(&x, 3)[..12], b.matmul_t(&x, 3)[..12]);
    }
}
