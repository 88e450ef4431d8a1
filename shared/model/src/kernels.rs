//! Integer dot-product kernels of the inference path: activations quantized to 8-bit blocks once
//! per matrix-vector product, then dotted against Q8_0 / Q4_0 / Q4_1 weight blocks with integer
//! multiply-adds (llama.cpp's `vec_dot_q8_0_q8_0` / `vec_dot_q4_0_q8_0` / `vec_dot_q4_1_q8_1`
//! approach), and an f32 dot for unquantized weights.
//!
//! Each kernel has explicit SIMD through `std::arch` (AVX2 + FMA + F16C on x86-64, AVX-512 with VNNI
//! where the CPU has it, NEON on aarch64) chosen once at run time by feature detection
//! ([`Isa::detect`]), and a portable scalar fallback that every SIMD path is tested against. Nothing here knows of models, threads or files: only
//! slices of blocks and values.

use crate::quant::{BlockQ4_0, BlockQ4_0x8, BlockQ4_1, BlockQ8_0, QK};

/// The instruction set the kernels run on, detected once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// Plain Rust, every target.
    Portable,
    /// x86-64 with AVX2, FMA and F16C.
    Avx2,
    /// x86-64 with AVX2 and AVX-512 (F, BW, VL) with VNNI: the byte dot products of the quantized
    /// kernels run as `vpdpbusd` (AMD Zen 4, Intel Ice Lake and later).
    Avx512,
    /// aarch64 Advanced SIMD (always present on aarch64).
    Neon,
}

impl Isa {
    /// The best instruction set this CPU supports.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c")
            {
                if std::env::var_os("STARLING_NO_AVX512").is_none()
                    && std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("avx512vnni")
                {
                    return Self::Avx512;
                }
                return Self::Avx2;
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            if std::arch::is_aarch64_feature_detected!("neon") {
                return Self::Neon;
            }
        }
        Self::Portable
    }

    /// Every instruction set this CPU can run (the portable one first), for tests and benchmarks.
    pub fn available() -> Vec<Self> {
        match Self::detect() {
            Self::Portable => vec![Self::Portable],
            Self::Avx512 => vec![Self::Portable, Self::Avx2, Self::Avx512],
            best => vec![Self::Portable, best],
        }
    }

    /// Whether this is an x86-64 instruction set with AVX2 (AVX-512 machines have it too).
    pub fn has_avx2(self) -> bool {
        matches!(self, Self::Avx2 | Self::Avx512)
    }

    /// Lowercase name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Portable => "portable",
            Self::Avx2 => "avx2",
            Self::Avx512 => "avx512-vnni",
            Self::Neon => "neon",
        }
    }
}

/// A vector quantized to 8-bit blocks of [`QK`] values: value = `d[b] * qs[b * QK + i]`, with
/// every `qs` in −127..=127 (never −128, which the sign trick of the AVX2 kernels cannot negate).
#[derive(Debug, Clone, Default)]
pub struct ActQ8 {
    /// One scale per block.
    pub d: Vec<f32>,
    /// The quantized values, `QK` per block.
    pub qs: Vec<i8>,
    /// Σ qs of each block (the Q4_0 kernels fold the weights' −8 offset into it, the Q4_1 ones
    /// the weights' minimum).
    pub sums: Vec<i32>,
}

impl ActQ8 {
    /// Quantizes `x` (a multiple of [`QK`] long) into `self`, reusing its buffers.
    pub fn quantize(&mut self, x: &[f32]) {
        debug_assert!(x.len().is_multiple_of(QK));
        let blocks = x.len() / QK;
        self.d.resize(blocks, 0.0);
        self.qs.resize(x.len(), 0);
        self.sums.resize(blocks, 0);
        for (((xs, d), qs), sum) in x
            .chunks_exact(QK)
            .zip(self.d.iter_mut())
            .zip(self.qs.chunks_exact_mut(QK))
            .zip(self.sums.iter_mut())
        {
            let amax = xs.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            *d = amax / 127.0;
            let id = if amax > 0.0 { 127.0 / amax } else { 0.0 };
            for (q, v) in qs.iter_mut().zip(xs) {
                // |v · id| ≤ 127 up to rounding; the clamp keeps −128 out whatever the rounding.
                *q = (v * id).round().clamp(-127.0, 127.0) as i8;
            }
            *sum = qs.iter().map(|&q| q as i32).sum();
        }
    }

    /// Number of blocks.
    pub fn blocks(&self) -> usize {
        self.d.len()
    }
}

/// Dot product of a Q8_0 weight row with a quantized activation (same number of blocks).
#[inline]
pub fn dot_q8_0(isa: Isa, w: &[BlockQ8_0], x: &ActQ8) -> f32 {
    debug_assert_eq!(w.len(), x.blocks());
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx512` is only produced when the CPU reports AVX-512 F/BW/VL/VNNI and AVX2.
        Isa::Avx512 => unsafe { x512::dot_q8_0(w, &x.d, &x.qs) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` is only produced when the CPU reports AVX2, FMA and F16C.
        Isa::Avx2 => unsafe { x86::dot_q8_0(w, &x.d, &x.qs) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: `Isa::Neon` is only produced when the CPU reports NEON.
        Isa::Neon => unsafe { arm::dot_q8_0(w, &x.d, &x.qs) },
        _ => portable::dot_q8_0(w, &x.d, &x.qs),
    }
}

/// Dot product of a Q4_0 weight row with a quantized activation (same number of blocks).
#[inline]
pub fn dot_q4_0(isa: Isa, w: &[BlockQ4_0], x: &ActQ8) -> f32 {
    debug_assert_eq!(w.len(), x.blocks());
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `dot_q8_0`.
        Isa::Avx512 => unsafe { x512::dot_q4_0(w, &x.d, &x.qs, &x.sums) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` is only produced when the CPU reports AVX2, FMA and F16C.
        Isa::Avx2 => unsafe { x86::dot_q4_0(w, &x.d, &x.qs) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: `Isa::Neon` is only produced when the CPU reports NEON.
        Isa::Neon => unsafe { arm::dot_q4_0(w, &x.d, &x.qs) },
        _ => portable::dot_q4_0(w, &x.d, &x.qs),
    }
}

/// Dot product of a Q4_1 weight row with a quantized activation (same number of blocks):
/// `Σ_b d_w·d_x·Σ(nibble·q) + m_w·d_x·Σq`.
#[inline]
pub fn dot_q4_1(isa: Isa, w: &[BlockQ4_1], x: &ActQ8) -> f32 {
    debug_assert_eq!(w.len(), x.blocks());
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `dot_q8_0`.
        Isa::Avx512 => unsafe { x512::dot_q4_1(w, &x.d, &x.qs, &x.sums) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` is only produced when the CPU reports AVX2, FMA and F16C.
        Isa::Avx2 => unsafe { x86::dot_q4_1(w, &x.d, &x.qs, &x.sums) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: `Isa::Neon` is only produced when the CPU reports NEON.
        Isa::Neon => unsafe { arm::dot_q4_1(w, &x.d, &x.qs, &x.sums) },
        _ => portable::dot_q4_1(w, &x.d, &x.qs, &x.sums),
    }
}

/// `out[r] = W[r] · x` for the rows of a Q8_0 matrix (`out.len()` rows of `x.blocks()` blocks).
pub fn gemv_q8_0(isa: Isa, w: &[BlockQ8_0], x: &ActQ8, out: &mut [f32]) {
    let bpr = x.blocks();
    debug_assert_eq!(w.len(), bpr * out.len());
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `dot_q8_0`.
        Isa::Avx512 => unsafe { x512::gemv_q8_0(w, &x.d, &x.qs, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` is only produced when the CPU reports AVX2, FMA and F16C.
        Isa::Avx2 => unsafe { x86::gemv_q8_0(w, &x.d, &x.qs, out) },
        _ => {
            for (o, row) in out.iter_mut().zip(w.chunks_exact(bpr.max(1))) {
                *o = dot_q8_0(isa, row, x);
            }
        }
    }
}

/// `out[r] = W[r] · x` for the rows of a Q4_0 matrix (`out.len()` rows of `x.blocks()` blocks).
pub fn gemv_q4_0(isa: Isa, w: &[BlockQ4_0], x: &ActQ8, out: &mut [f32]) {
    let bpr = x.blocks();
    debug_assert_eq!(w.len(), bpr * out.len());
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `dot_q8_0`.
        Isa::Avx512 => unsafe { x512::gemv_q4_0(w, &x.d, &x.qs, &x.sums, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` is only produced when the CPU reports AVX2, FMA and F16C.
        Isa::Avx2 => unsafe { x86::gemv_q4_0(w, &x.d, &x.qs, out) },
        _ => {
            for (o, row) in out.iter_mut().zip(w.chunks_exact(bpr.max(1))) {
                *o = dot_q4_0(isa, row, x);
            }
        }
    }
}

/// `out[r] = W[r] · x` for the rows of a Q4_1 matrix (`out.len()` rows of `x.blocks()` blocks).
pub fn gemv_q4_1(isa: Isa, w: &[BlockQ4_1], x: &ActQ8, out: &mut [f32]) {
    let bpr = x.blocks();
    debug_assert_eq!(w.len(), bpr * out.len());
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `dot_q8_0`.
        Isa::Avx512 => unsafe { x512::gemv_q4_1(w, &x.d, &x.qs, &x.sums, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` is only produced when the CPU reports AVX2, FMA and F16C.
        Isa::Avx2 => unsafe { x86::gemv_q4_1(w, &x.d, &x.qs, &x.sums, out) },
        _ => {
            for (o, row) in out.iter_mut().zip(w.chunks_exact(bpr.max(1))) {
                *o = dot_q4_1(isa, row, x);
            }
        }
    }
}

/// `out[r] = W[r] · x` for the rows of a Q4_0 matrix interleaved by eight rows (`out.len()` rows,
/// a multiple of 8; `x.blocks()` blocks per row).
pub fn gemv_q4_0x8(isa: Isa, w: &[BlockQ4_0x8], x: &ActQ8, out: &mut [f32]) {
    let bpr = x.blocks();
    debug_assert!(out.len().is_multiple_of(8) && w.len() == bpr * out.len() / 8);
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `dot_q8_0`.
        Isa::Avx512 => unsafe { x512::gemv_q4_0x8(w, &x.d, &x.qs, &x.sums, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` is only produced when the CPU reports AVX2, FMA and F16C.
        Isa::Avx2 => unsafe { x86::gemv_q4_0x8(w, &x.d, &x.qs, &x.sums, out) },
        _ => {
            let mut row = vec![
                BlockQ4_0 {
                    d: half::f16::ZERO,
                    qs: [0; QK / 2]
                };
                bpr
            ];
            for (g, outs) in out.chunks_exact_mut(8).enumerate() {
                for (l, o) in outs.iter_mut().enumerate() {
                    for (b, slot) in row.iter_mut().enumerate() {
                        *slot = w[g * bpr + b].unpack(l);
                    }
                    *o = dot_q4_0(isa, &row, x);
                }
            }
        }
    }
}

/// `out[r] = W[r] · x` for the rows of an f32 matrix (`out.len()` rows of `x.len()` values).
pub fn gemv_f32(isa: Isa, w: &[f32], x: &[f32], out: &mut [f32]) {
    debug_assert_eq!(w.len(), x.len() * out.len());
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` is only produced when the CPU reports AVX2 and FMA (`scores` is
        // this product with a scale of one).
        Isa::Avx2 | Isa::Avx512 => unsafe { x86::scores(x, w, 1.0, out) },
        _ => {
            for (o, row) in out.iter_mut().zip(w.chunks_exact(x.len().max(1))) {
                *o = dot_f32(isa, row, x);
            }
        }
    }
}

/// f32 dot product of two equally long slices.
#[inline]
pub fn dot_f32(isa: Isa, a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` is only produced when the CPU reports AVX2 and FMA.
        Isa::Avx2 | Isa::Avx512 => unsafe { x86::dot_f32(a, b) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: `Isa::Neon` is only produced when the CPU reports NEON.
        Isa::Neon => unsafe { arm::dot_f32(a, b) },
        _ => portable::dot_f32(a, b),
    }
}

/// `y += alpha · x` over equally long slices.
#[inline]
pub fn axpy(isa: Isa, alpha: f32, x: &[f32], y: &mut [f32]) {
    debug_assert_eq!(x.len(), y.len());
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` is only produced when the CPU reports AVX2 and FMA.
        Isa::Avx2 | Isa::Avx512 => unsafe { x86::axpy(alpha, x, y) },
        _ => {
            for (o, v) in y.iter_mut().zip(x) {
                *o += alpha * v;
            }
        }
    }
}

/// Attention scores: `out[p] = scale · (q · keys[p])` for every row `p` of `keys`
/// (`out.len()` rows of `q.len()` values, contiguous).
#[inline]
pub fn scores(isa: Isa, q: &[f32], keys: &[f32], scale: f32, out: &mut [f32]) {
    debug_assert_eq!(keys.len(), q.len() * out.len());
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` is only produced when the CPU reports AVX2 and FMA.
        Isa::Avx2 | Isa::Avx512 => unsafe { x86::scores(q, keys, scale, out) },
        _ => {
            for (o, k) in out.iter_mut().zip(keys.chunks_exact(q.len().max(1))) {
                *o = scale * dot_f32(isa, q, k);
            }
        }
    }
}

/// Attention output: `out = Σ_p w[p] · values[p]` over the rows of `values` (`w.len()` rows of
/// `out.len()` values, contiguous); `out` is overwritten.
#[inline]
pub fn mix(isa: Isa, w: &[f32], values: &[f32], out: &mut [f32]) {
    debug_assert_eq!(values.len(), w.len() * out.len());
    out.iter_mut().for_each(|o| *o = 0.0);
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` is only produced when the CPU reports AVX2 and FMA.
        Isa::Avx2 | Isa::Avx512 => unsafe { x86::mix(w, values, out) },
        _ => {
            for (&a, v) in w.iter().zip(values.chunks_exact(out.len().max(1))) {
                axpy(isa, a, v, out);
            }
        }
    }
}

/// Plain Rust kernels: the reference the SIMD ones are tested against, and the fallback.
mod portable {
    use super::*;

    pub(super) fn dot_q8_0(w: &[BlockQ8_0], xd: &[f32], xq: &[i8]) -> f32 {
        let mut total = 0.0f32;
        for ((b, d), xs) in w.iter().zip(xd).zip(xq.chunks_exact(QK)) {
            let s: i32 =
                b.qs.iter()
                    .zip(xs)
                    .map(|(&a, &c)| a as i32 * c as i32)
                    .sum();
            total += b.d.to_f32() * d * s as f32;
        }
        total
    }

    pub(super) fn dot_q4_0(w: &[BlockQ4_0], xd: &[f32], xq: &[i8]) -> f32 {
        let mut total = 0.0f32;
        for ((b, d), xs) in w.iter().zip(xd).zip(xq.chunks_exact(QK)) {
            let (lo, hi) = xs.split_at(QK / 2);
            let mut s = 0i32;
            for j in 0..QK / 2 {
                s += ((b.qs[j] & 0x0f) as i32 - 8) * lo[j] as i32;
                s += ((b.qs[j] >> 4) as i32 - 8) * hi[j] as i32;
            }
            total += b.d.to_f32() * d * s as f32;
        }
        total
    }

    pub(super) fn dot_q4_1(w: &[BlockQ4_1], xd: &[f32], xq: &[i8], xs: &[i32]) -> f32 {
        let mut total = 0.0f32;
        for (((b, d), xs), sum) in w.iter().zip(xd).zip(xq.chunks_exact(QK)).zip(xs) {
            let (lo, hi) = xs.split_at(QK / 2);
            let mut s = 0i32;
            for j in 0..QK / 2 {
                s += (b.qs[j] & 0x0f) as i32 * lo[j] as i32;
                s += (b.qs[j] >> 4) as i32 * hi[j] as i32;
            }
            total += b.d.to_f32() * d * s as f32 + b.m.to_f32() * d * *sum as f32;
        }
        total
    }

    pub(super) fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
        let mut acc = [0.0f32; 8];
        let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
        let tail: f32 = ac
            .remainder()
            .iter()
            .zip(bc.remainder())
            .map(|(x, y)| x * y)
            .sum();
        for (x, y) in ac.zip(bc) {
            for i in 0..8 {
                acc[i] += x[i] * y[i];
            }
        }
        acc.iter().sum::<f32>() + tail
    }
}

#[cfg(target_arch = "x86_64")]
/// `out[r] = $dot(row r)` over the rows of `$w` (`$len` items each): a macro rather than a
/// function so the per-row dot stays inlined inside the caller's `target_feature` context (AVX2 and
/// AVX-512 kernels alike).
macro_rules! each_row {
    ($w:expr, $len:expr, $out:expr, |$row:ident| $dot:expr) => {{
        let len = $len;
        if len == 0 {
            $out.iter_mut().for_each(|o| *o = 0.0);
            return;
        }
        let rows = $out.len().min($w.len() / len);
        for r in 0..rows {
            let $row = $w.get_unchecked(r * len..(r + 1) * len);
            *$out.get_unchecked_mut(r) = $dot;
        }
    }};
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use half::f16;

    use super::*;

    /// Horizontal sum of eight floats.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// An f16 scale as f32 through the F16C instruction.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn half(h: f16) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h.to_bits() as i32)))
    }

    /// Σ w·x over 32 signed bytes each, as eight i32 lanes converted to floats. `x` must not hold
    /// −128 (its sign is moved onto it); `w` may.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn block_dot(w: __m256i, x: __m256i) -> __m256 {
        let aw = _mm256_sign_epi8(w, w); // |w| as unsigned bytes (−128 reads as 128)
        let sx = _mm256_sign_epi8(x, w); // x with w's sign
        let pairs = _mm256_maddubs_epi16(aw, sx); // ≤ 2 · 128 · 127: no i16 saturation
        _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }

    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `xq` holds `QK` values per block of `w`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_q8_0(w: &[BlockQ8_0], xd: &[f32], xq: &[i8]) -> f32 {
        let n = w.len().min(xd.len()).min(xq.len() / QK);
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i + 1 < n {
            for (k, acc) in [(i, &mut acc0), (i + 1, &mut acc1)] {
                let b = w.get_unchecked(k);
                let wv = _mm256_loadu_si256(b.qs.as_ptr() as *const __m256i);
                let xv = _mm256_loadu_si256(xq.as_ptr().add(k * QK) as *const __m256i);
                let d = _mm256_set1_ps(half(b.d) * *xd.get_unchecked(k));
                *acc = _mm256_fmadd_ps(d, block_dot(wv, xv), *acc);
            }
            i += 2;
        }
        if i < n {
            let b = w.get_unchecked(i);
            let wv = _mm256_loadu_si256(b.qs.as_ptr() as *const __m256i);
            let xv = _mm256_loadu_si256(xq.as_ptr().add(i * QK) as *const __m256i);
            let d = _mm256_set1_ps(half(b.d) * *xd.get_unchecked(i));
            acc0 = _mm256_fmadd_ps(d, block_dot(wv, xv), acc0);
        }
        hsum(_mm256_add_ps(acc0, acc1))
    }

    /// The 32 nibbles of a 4-bit block as unsigned bytes (0..16 low nibbles, 16..32 high ones).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn nibbles(qs: &[u8; QK / 2]) -> __m256i {
        let low = _mm_set1_epi8(0x0f);
        let q = _mm_loadu_si128(qs.as_ptr() as *const __m128i);
        let lo = _mm_and_si128(q, low);
        let hi = _mm_and_si128(_mm_srli_epi16(q, 4), low);
        _mm256_set_m128i(hi, lo)
    }

    /// The 32 values of a Q4_0 block as signed bytes: its nibbles centred on zero.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn unpack(b: &BlockQ4_0) -> __m256i {
        _mm256_sub_epi8(nibbles(&b.qs), _mm256_set1_epi8(8))
    }

    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `xq` holds `QK` values per block of `w`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_q4_0(w: &[BlockQ4_0], xd: &[f32], xq: &[i8]) -> f32 {
        let n = w.len().min(xd.len()).min(xq.len() / QK);
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i + 1 < n {
            for (k, acc) in [(i, &mut acc0), (i + 1, &mut acc1)] {
                let b = w.get_unchecked(k);
                let xv = _mm256_loadu_si256(xq.as_ptr().add(k * QK) as *const __m256i);
                let d = _mm256_set1_ps(half(b.d) * *xd.get_unchecked(k));
                *acc = _mm256_fmadd_ps(d, block_dot(unpack(b), xv), *acc);
            }
            i += 2;
        }
        if i < n {
            let b = w.get_unchecked(i);
            let xv = _mm256_loadu_si256(xq.as_ptr().add(i * QK) as *const __m256i);
            let d = _mm256_set1_ps(half(b.d) * *xd.get_unchecked(i));
            acc0 = _mm256_fmadd_ps(d, block_dot(unpack(b), xv), acc0);
        }
        hsum(_mm256_add_ps(acc0, acc1))
    }

    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `xq` holds `QK` values and `xs` one sum per
    /// block of `w`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_q4_1(w: &[BlockQ4_1], xd: &[f32], xq: &[i8], xs: &[i32]) -> f32 {
        let n = w.len().min(xd.len()).min(xs.len()).min(xq.len() / QK);
        let ones = _mm256_set1_epi16(1);
        let mut acc = _mm256_setzero_ps();
        let mut offset = 0.0f32;
        for i in 0..n {
            let b = w.get_unchecked(i);
            let xv = _mm256_loadu_si256(xq.as_ptr().add(i * QK) as *const __m256i);
            // Unsigned nibbles (≤ 15) times signed bytes (|x| ≤ 127): pairs ≤ 3810, no saturation.
            let dot = _mm256_madd_epi16(_mm256_maddubs_epi16(nibbles(&b.qs), xv), ones);
            let dx = *xd.get_unchecked(i);
            let d = _mm256_set1_ps(half(b.d) * dx);
            acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(dot), acc);
            offset += half(b.m) * dx * *xs.get_unchecked(i) as f32;
        }
        hsum(acc) + offset
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (j, acc) in acc.iter_mut().enumerate() {
                let x = _mm256_loadu_ps(a.as_ptr().add(i + 8 * j));
                let y = _mm256_loadu_ps(b.as_ptr().add(i + 8 * j));
                *acc = _mm256_fmadd_ps(x, y, *acc);
            }
            i += 32;
        }
        while i + 8 <= n {
            let x = _mm256_loadu_ps(a.as_ptr().add(i));
            let y = _mm256_loadu_ps(b.as_ptr().add(i));
            acc[0] = _mm256_fmadd_ps(x, y, acc[0]);
            i += 8;
        }
        let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut total = hsum(v);
        while i < n {
            total += a.get_unchecked(i) * b.get_unchecked(i);
            i += 1;
        }
        total
    }

    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `w` holds `out.len()` rows of `xd.len()` blocks.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn gemv_q8_0(w: &[BlockQ8_0], xd: &[f32], xq: &[i8], out: &mut [f32]) {
        each_row!(w, xd.len(), out, |row| dot_q8_0(row, xd, xq))
    }

    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `w` holds `out.len()` rows of `xd.len()` blocks.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn gemv_q4_0(w: &[BlockQ4_0], xd: &[f32], xq: &[i8], out: &mut [f32]) {
        each_row!(w, xd.len(), out, |row| dot_q4_0(row, xd, xq))
    }

    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `w` holds `out.len()` rows of `xd.len()` blocks.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn gemv_q4_1(
        w: &[BlockQ4_1],
        xd: &[f32],
        xq: &[i8],
        xs: &[i32],
        out: &mut [f32],
    ) {
        each_row!(w, xd.len(), out, |row| dot_q4_1(row, xd, xq, xs))
    }

    /// Eight rows at a time, one row per 32-bit lane: the nibbles are multiplied unsigned
    /// (`maddubs`) with the activation bytes broadcast to every lane, the −8 offset is taken off
    /// once per block through Σx, and the eight rows' scales are one vector.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `w` holds `out.len() / 8` groups of `xd.len()`
    /// interleaved blocks; `xq` and `xs` hold `xd.len()` blocks.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn gemv_q4_0x8(
        w: &[BlockQ4_0x8],
        xd: &[f32],
        xq: &[i8],
        xs: &[i32],
        out: &mut [f32],
    ) {
        let bpr = xd.len().min(xs.len()).min(xq.len() / QK);
        if bpr == 0 {
            out.iter_mut().for_each(|o| *o = 0.0);
            return;
        }
        let groups = (out.len() / 8).min(w.len() / bpr);
        let low = _mm256_set1_epi8(0x0f);
        let ones = _mm256_set1_epi16(1);
        for g in 0..groups {
            let mut acc = _mm256_setzero_ps();
            for b in 0..bpr {
                let blk = w.get_unchecked(g * bpr + b);
                let x = xq.as_ptr().add(b * QK) as *const i32;
                // |Σ| per 16-bit lane ≤ 8 products pairs of 15 · 127 · 2 = 30480: no overflow.
                let mut sum16 = _mm256_setzero_si256();
                for q in 0..4 {
                    let v = _mm256_loadu_si256(blk.qs.as_ptr().add(32 * q) as *const __m256i);
                    let lo = _mm256_and_si256(v, low);
                    let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                    let xl = _mm256_set1_epi32(x.add(q).read_unaligned());
                    let xh = _mm256_set1_epi32(x.add(4 + q).read_unaligned());
                    sum16 = _mm256_add_epi16(sum16, _mm256_maddubs_epi16(lo, xl));
                    sum16 = _mm256_add_epi16(sum16, _mm256_maddubs_epi16(hi, xh));
                }
                let dot = _mm256_sub_epi32(
                    _mm256_madd_epi16(sum16, ones),
                    _mm256_set1_epi32(8 * *xs.get_unchecked(b)),
                );
                let dw = _mm256_cvtph_ps(_mm_loadu_si128(blk.d.as_ptr() as *const __m128i));
                let scale = _mm256_mul_ps(dw, _mm256_set1_ps(*xd.get_unchecked(b)));
                acc = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(dot), acc);
            }
            _mm256_storeu_ps(out.as_mut_ptr().add(8 * g), acc);
        }
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA; `keys` holds `out.len()` rows of `q.len()` values.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn scores(q: &[f32], keys: &[f32], scale: f32, out: &mut [f32]) {
        each_row!(keys, q.len(), out, |key| scale * dot_f32(q, key))
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA; `values` holds `w.len()` rows of `out.len()` values.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn mix(w: &[f32], values: &[f32], out: &mut [f32]) {
        let d = out.len();
        if d == 0 {
            return;
        }
        let rows = w.len().min(values.len() / d);
        // Eight rows of accumulators stay in registers for head sizes up to 64.
        if d.is_multiple_of(8) && d <= 64 {
            let mut acc = [_mm256_setzero_ps(); 8];
            let lanes = d / 8;
            for p in 0..rows {
                let a = _mm256_set1_ps(*w.get_unchecked(p));
                let v = values.as_ptr().add(p * d);
                for (j, acc) in acc.iter_mut().enumerate().take(lanes) {
                    *acc = _mm256_fmadd_ps(a, _mm256_loadu_ps(v.add(8 * j)), *acc);
                }
            }
            for (j, acc) in acc.iter().enumerate().take(lanes) {
                _mm256_storeu_ps(out.as_mut_ptr().add(8 * j), *acc);
            }
            return;
        }
        for p in 0..rows {
            axpy(
                *w.get_unchecked(p),
                values.get_unchecked(p * d..(p + 1) * d),
                out,
            );
        }
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
        let n = x.len().min(y.len());
        let a = _mm256_set1_ps(alpha);
        let mut i = 0;
        while i + 8 <= n {
            let xv = _mm256_loadu_ps(x.as_ptr().add(i));
            let yv = _mm256_loadu_ps(y.as_ptr().add(i));
            _mm256_storeu_ps(y.as_mut_ptr().add(i), _mm256_fmadd_ps(a, xv, yv));
            i += 8;
        }
        while i < n {
            *y.get_unchecked_mut(i) += alpha * x.get_unchecked(i);
            i += 1;
        }
    }
}

/// AVX-512 VNNI kernels: `vpdpbusd` multiplies unsigned by signed bytes and adds each four products
/// into a 32-bit lane in one instruction (AVX2 needs `maddubs` + `madd`, and saturates at 16 bits on
/// the way). Q8_0 rows take two blocks per 512-bit register; the 4-bit formats accumulate straight
/// into 32-bit lanes.
#[cfg(target_arch = "x86_64")]
mod x512 {
    use std::arch::x86_64::*;

    use super::x86::{half, hsum, nibbles};
    use super::*;

    /// # Safety
    /// The CPU must support AVX-512 F/BW/VL/VNNI, AVX2, FMA and F16C; `xq` holds `QK` values per
    /// block of `w`, none of them −128.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn dot_q8_0(w: &[BlockQ8_0], xd: &[f32], xq: &[i8]) -> f32 {
        let n = w.len().min(xd.len()).min(xq.len() / QK);
        let zero = _mm512_setzero_si512();
        let mut acc = _mm512_setzero_ps();
        let mut i = 0;
        while i + 1 < n {
            let (a, b) = (w.get_unchecked(i), w.get_unchecked(i + 1));
            let wa = _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i);
            let wb = _mm256_loadu_si256(b.qs.as_ptr() as *const __m256i);
            let wv = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(wa), wb);
            let xv = _mm512_loadu_si512(xq.as_ptr().add(i * QK) as *const __m512i);
            // |w| as unsigned bytes (−128 reads as 128) times x with w's sign.
            let sx = _mm512_mask_sub_epi8(xv, _mm512_movepi8_mask(wv), zero, xv);
            let dot = _mm512_dpbusd_epi32(zero, _mm512_abs_epi8(wv), sx);
            let scale = _mm512_mask_blend_ps(
                0xff00,
                _mm512_set1_ps(half(a.d) * *xd.get_unchecked(i)),
                _mm512_set1_ps(half(b.d) * *xd.get_unchecked(i + 1)),
            );
            acc = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(dot), acc);
            i += 2;
        }
        let mut total = _mm512_reduce_add_ps(acc);
        if i < n {
            let b = w.get_unchecked(i);
            let wv = _mm256_loadu_si256(b.qs.as_ptr() as *const __m256i);
            let xv = _mm256_loadu_si256(xq.as_ptr().add(i * QK) as *const __m256i);
            let sx = _mm256_sign_epi8(xv, wv);
            let dot = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_abs_epi8(wv), sx);
            total += half(b.d) * *xd.get_unchecked(i) * hsum(_mm256_cvtepi32_ps(dot));
        }
        total
    }

    /// # Safety
    /// As [`dot_q8_0`]; `xs` holds one Σx per block.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn dot_q4_0(w: &[BlockQ4_0], xd: &[f32], xq: &[i8], xs: &[i32]) -> f32 {
        let n = w.len().min(xd.len()).min(xs.len()).min(xq.len() / QK);
        let mut acc = _mm256_setzero_ps();
        for i in 0..n {
            let b = w.get_unchecked(i);
            let xv = _mm256_loadu_si256(xq.as_ptr().add(i * QK) as *const __m256i);
            // Σ nibble·x − 8·Σx: the nibbles stay unsigned.
            let dot = _mm256_dpbusd_epi32(_mm256_setzero_si256(), nibbles(&b.qs), xv);
            let dot = _mm256_sub_epi32(
                dot,
                _mm256_setr_epi32(8 * *xs.get_unchecked(i), 0, 0, 0, 0, 0, 0, 0),
            );
            let d = _mm256_set1_ps(half(b.d) * *xd.get_unchecked(i));
            acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(dot), acc);
        }
        hsum(acc)
    }

    /// # Safety
    /// As [`dot_q4_0`].
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn dot_q4_1(w: &[BlockQ4_1], xd: &[f32], xq: &[i8], xs: &[i32]) -> f32 {
        let n = w.len().min(xd.len()).min(xs.len()).min(xq.len() / QK);
        let mut acc = _mm256_setzero_ps();
        let mut offset = 0.0f32;
        for i in 0..n {
            let b = w.get_unchecked(i);
            let xv = _mm256_loadu_si256(xq.as_ptr().add(i * QK) as *const __m256i);
            let dot = _mm256_dpbusd_epi32(_mm256_setzero_si256(), nibbles(&b.qs), xv);
            let dx = *xd.get_unchecked(i);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(half(b.d) * dx), _mm256_cvtepi32_ps(dot), acc);
            offset += half(b.m) * dx * *xs.get_unchecked(i) as f32;
        }
        hsum(acc) + offset
    }

    /// # Safety
    /// As [`dot_q8_0`]; `w` holds `out.len()` rows of `xd.len()` blocks.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn gemv_q8_0(w: &[BlockQ8_0], xd: &[f32], xq: &[i8], out: &mut [f32]) {
        each_row!(w, xd.len(), out, |row| dot_q8_0(row, xd, xq))
    }

    /// # Safety
    /// As [`dot_q4_0`]; `w` holds `out.len()` rows of `xd.len()` blocks.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn gemv_q4_0(
        w: &[BlockQ4_0],
        xd: &[f32],
        xq: &[i8],
        xs: &[i32],
        out: &mut [f32],
    ) {
        each_row!(w, xd.len(), out, |row| dot_q4_0(row, xd, xq, xs))
    }

    /// # Safety
    /// As [`dot_q4_1`]; `w` holds `out.len()` rows of `xd.len()` blocks.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn gemv_q4_1(
        w: &[BlockQ4_1],
        xd: &[f32],
        xq: &[i8],
        xs: &[i32],
        out: &mut [f32],
    ) {
        each_row!(w, xd.len(), out, |row| dot_q4_1(row, xd, xq, xs))
    }

    /// Eight interleaved rows per 32-bit lane, as the AVX2 kernel, with `vpdpbusd` accumulating the
    /// nibble × broadcast-activation products straight into the lanes.
    ///
    /// # Safety
    /// As [`dot_q8_0`]; `w` holds `out.len() / 8` groups of `xd.len()` interleaved blocks; `xq` and
    /// `xs` hold `xd.len()` blocks.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn gemv_q4_0x8(
        w: &[BlockQ4_0x8],
        xd: &[f32],
        xq: &[i8],
        xs: &[i32],
        out: &mut [f32],
    ) {
        let bpr = xd.len().min(xs.len()).min(xq.len() / QK);
        if bpr == 0 {
            out.iter_mut().for_each(|o| *o = 0.0);
            return;
        }
        let groups = (out.len() / 8).min(w.len() / bpr);
        let low = _mm256_set1_epi8(0x0f);
        for g in 0..groups {
            let mut acc = _mm256_setzero_ps();
            for b in 0..bpr {
                let blk = w.get_unchecked(g * bpr + b);
                let x = xq.as_ptr().add(b * QK) as *const i32;
                // Two independent chains (low and high nibbles) so the multiply-adds overlap.
                let mut dlo = _mm256_set1_epi32(-8 * *xs.get_unchecked(b));
                let mut dhi = _mm256_setzero_si256();
                for q in 0..4 {
                    let v = _mm256_loadu_si256(blk.qs.as_ptr().add(32 * q) as *const __m256i);
                    let lo = _mm256_and_si256(v, low);
                    let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                    let xl = _mm256_set1_epi32(x.add(q).read_unaligned());
                    let xh = _mm256_set1_epi32(x.add(4 + q).read_unaligned());
                    dlo = _mm256_dpbusd_epi32(dlo, lo, xl);
                    dhi = _mm256_dpbusd_epi32(dhi, hi, xh);
                }
                let dot = _mm256_add_epi32(dlo, dhi);
                let dw = _mm256_cvtph_ps(_mm_loadu_si128(blk.d.as_ptr() as *const __m128i));
                let scale = _mm256_mul_ps(dw, _mm256_set1_ps(*xd.get_unchecked(b)));
                acc = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(dot), acc);
            }
            _mm256_storeu_ps(out.as_mut_ptr().add(8 * g), acc);
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod arm {
    use std::arch::aarch64::*;

    use super::*;

    /// Σ w·x over 32 signed bytes each (two 16-byte halves), as four i32 lanes.
    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn block_dot(w0: int8x16_t, w1: int8x16_t, x0: int8x16_t, x1: int8x16_t) -> int32x4_t {
        let mut s = vdupq_n_s32(0);
        s = vpadalq_s16(s, vmull_s8(vget_low_s8(w0), vget_low_s8(x0)));
        s = vpadalq_s16(s, vmull_high_s8(w0, x0));
        s = vpadalq_s16(s, vmull_s8(vget_low_s8(w1), vget_low_s8(x1)));
        vpadalq_s16(s, vmull_high_s8(w1, x1))
    }

    /// # Safety
    /// The CPU must support NEON; `xq` holds `QK` values per block of `w`.
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn dot_q8_0(w: &[BlockQ8_0], xd: &[f32], xq: &[i8]) -> f32 {
        let n = w.len().min(xd.len()).min(xq.len() / QK);
        let mut acc = vdupq_n_f32(0.0);
        for i in 0..n {
            let b = w.get_unchecked(i);
            let x = xq.as_ptr().add(i * QK);
            let s = block_dot(
                vld1q_s8(b.qs.as_ptr()),
                vld1q_s8(b.qs.as_ptr().add(16)),
                vld1q_s8(x),
                vld1q_s8(x.add(16)),
            );
            let d = b.d.to_f32() * *xd.get_unchecked(i);
            acc = vfmaq_f32(acc, vcvtq_f32_s32(s), vdupq_n_f32(d));
        }
        vaddvq_f32(acc)
    }

    /// # Safety
    /// The CPU must support NEON; `xq` holds `QK` values per block of `w`.
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn dot_q4_0(w: &[BlockQ4_0], xd: &[f32], xq: &[i8]) -> f32 {
        let n = w.len().min(xd.len()).min(xq.len() / QK);
        let low = vdupq_n_u8(0x0f);
        let eight = vdupq_n_s8(8);
        let mut acc = vdupq_n_f32(0.0);
        for i in 0..n {
            let b = w.get_unchecked(i);
            let q = vld1q_u8(b.qs.as_ptr());
            let lo = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(q, low)), eight);
            let hi = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8::<4>(q)), eight);
            let x = xq.as_ptr().add(i * QK);
            let s = block_dot(lo, hi, vld1q_s8(x), vld1q_s8(x.add(16)));
            let d = b.d.to_f32() * *xd.get_unchecked(i);
            acc = vfmaq_f32(acc, vcvtq_f32_s32(s), vdupq_n_f32(d));
        }
        vaddvq_f32(acc)
    }

    /// # Safety
    /// The CPU must support NEON; `xq` holds `QK` values and `xs` one sum per block of `w`.
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn dot_q4_1(w: &[BlockQ4_1], xd: &[f32], xq: &[i8], xs: &[i32]) -> f32 {
        let n = w.len().min(xd.len()).min(xs.len()).min(xq.len() / QK);
        let low = vdupq_n_u8(0x0f);
        let mut acc = vdupq_n_f32(0.0);
        let mut offset = 0.0f32;
        for i in 0..n {
            let b = w.get_unchecked(i);
            let q = vld1q_u8(b.qs.as_ptr());
            // Nibbles are 0..=15: as signed bytes they keep their value.
            let lo = vreinterpretq_s8_u8(vandq_u8(q, low));
            let hi = vreinterpretq_s8_u8(vshrq_n_u8::<4>(q));
            let x = xq.as_ptr().add(i * QK);
            let s = block_dot(lo, hi, vld1q_s8(x), vld1q_s8(x.add(16)));
            let dx = *xd.get_unchecked(i);
            acc = vfmaq_f32(acc, vcvtq_f32_s32(s), vdupq_n_f32(b.d.to_f32() * dx));
            offset += b.m.to_f32() * dx * *xs.get_unchecked(i) as f32;
        }
        vaddvq_f32(acc) + offset
    }

    /// # Safety
    /// The CPU must support NEON.
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (mut acc0, mut acc1) = (vdupq_n_f32(0.0), vdupq_n_f32(0.0));
        let mut i = 0;
        while i + 8 <= n {
            acc0 = vfmaq_f32(
                acc0,
                vld1q_f32(a.as_ptr().add(i)),
                vld1q_f32(b.as_ptr().add(i)),
            );
            acc1 = vfmaq_f32(
                acc1,
                vld1q_f32(a.as_ptr().add(i + 4)),
                vld1q_f32(b.as_ptr().add(i + 4)),
            );
            i += 8;
        }
        let mut total = vaddvq_f32(vaddq_f32(acc0, acc1));
        while i < n {
            total += a.get_unchecked(i) * b.get_unchecked(i);
            i += 1;
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::quant::{QMatrix, QuantType};

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    #[test]
    fn activation_quantization_is_bounded_and_close() {
        let mut x = random(96, 1);
        x[40] = 0.0;
        x[64..96].iter_mut().for_each(|v| *v = 0.0); // an all-zero block
        let mut q = ActQ8::default();
        q.quantize(&x);
        assert_eq!(q.blocks(), 3);
        assert!(q.qs.iter().all(|&v| v != -128));
        assert_eq!(q.d[2], 0.0);
        for (b, xs) in x.chunks(QK).enumerate() {
            for (i, v) in xs.iter().enumerate() {
                let back = q.d[b] * q.qs[b * QK + i] as f32;
                assert!((back - v).abs() <= q.d[b] / 2.0 + 1e-7);
            }
        }
    }

    #[test]
    fn every_isa_gives_the_portable_results() {
        let k = 32 * 37; // an odd number of blocks exercises the unpaired tail
        let w = random(3 * k, 2);
        let mut x = random(k, 3);
        x[5] = -1.0; // exact extremes of a block
        let mut act = ActQ8::default();
        act.quantize(&x);
        let q8 = QMatrix::quantize(3, k, &w, QuantType::Q8_0).unwrap();
        let q4 = QMatrix::quantize(3, k, &w, QuantType::Q4_0).unwrap();
        let q41 = QMatrix::quantize(3, k, &w, QuantType::Q4_1).unwrap();
        let (
            crate::quant::Storage::Q8_0(b8),
            crate::quant::Storage::Q4_0(b4),
            crate::quant::Storage::Q4_1(b41),
        ) = (q8.storage(), q4.storage(), q41.storage())
        else {
            panic!("quantized storage expected");
        };
        // A weight block holding −128 (possible in imported files) is handled by every path.
        let mut b8 = b8.to_vec();
        b8[0].qs[3] = -128;
        let bpr = k / QK;
        for isa in Isa::available() {
            for r in 0..3 {
                let row8 = &b8[r * bpr..(r + 1) * bpr];
                let row4 = &b4[r * bpr..(r + 1) * bpr];
                let (p8, s8) = (
                    portable::dot_q8_0(row8, &act.d, &act.qs),
                    dot_q8_0(isa, row8, &act),
                );
                let (p4, s4) = (
                    portable::dot_q4_0(row4, &act.d, &act.qs),
                    dot_q4_0(isa, row4, &act),
                );
                assert!(
                    (p8 - s8).abs() <= 1e-4 * p8.abs().max(1.0),
                    "{isa:?} {p8} {s8}"
                );
                assert!(
                    (p4 - s4).abs() <= 1e-4 * p4.abs().max(1.0),
                    "{isa:?} {p4} {s4}"
                );
                let row41 = &b41[r * bpr..(r + 1) * bpr];
                let (p41, s41) = (
                    portable::dot_q4_1(row41, &act.d, &act.qs, &act.sums),
                    dot_q4_1(isa, row41, &act),
                );
                assert!(
                    (p41 - s41).abs() <= 1e-4 * p41.abs().max(1.0),
                    "{isa:?} q4_1 {p41} {s41}"
                );
                let wr = &w[r * k..(r + 1) * k];
                let exact: f32 = wr.iter().zip(&x).map(|(a, b)| a * b).sum();
                assert!((dot_f32(isa, wr, &x) - exact).abs() < 1e-3);
            }
            // Sixteen rows: the interleaved layout against the plain blocks.
            let w16 = random(16 * k, 11);
            let m16 = QMatrix::quantize(16, k, &w16, QuantType::Q4_0).unwrap();
            // Interleaved by hand: the layout is only chosen on AVX2 machines.
            let plain16: Vec<BlockQ4_0> = bytemuck::pod_collect_to_vec(&m16.to_bytes());
            let x8 = crate::quant::interleave_q4_0(&plain16, 16, bpr);
            let x8 = &x8[..];
            let mut g16 = vec![0.0; 16];
            gemv_q4_0x8(isa, x8, &act, &mut g16);
            let plain: Vec<BlockQ4_0> = bytemuck::pod_collect_to_vec(&m16.to_bytes());
            for r in 0..16 {
                let p = portable::dot_q4_0(&plain[r * bpr..(r + 1) * bpr], &act.d, &act.qs);
                assert!(
                    (g16[r] - p).abs() <= 1e-4 * p.abs().max(1.0),
                    "{isa:?} x8 row {r}"
                );
            }
            let (mut g8, mut g4, mut gf) = (vec![0.0; 3], vec![0.0; 3], vec![0.0; 3]);
            let mut g41 = vec![0.0; 3];
            gemv_q8_0(isa, &b8, &act, &mut g8);
            gemv_q4_0(isa, b4, &act, &mut g4);
            gemv_q4_1(isa, b41, &act, &mut g41);
            gemv_f32(isa, &w, &x, &mut gf);
            for r in 0..3 {
                assert_eq!(g8[r], dot_q8_0(isa, &b8[r * bpr..(r + 1) * bpr], &act));
                assert_eq!(g4[r], dot_q4_0(isa, &b4[r * bpr..(r + 1) * bpr], &act));
                assert_eq!(g41[r], dot_q4_1(isa, &b41[r * bpr..(r + 1) * bpr], &act));
                assert!((gf[r] - dot_f32(isa, &w[r * k..(r + 1) * k], &x)).abs() < 1e-4);
            }
            for d in [8, 24, 64, 72, 5] {
                let (q, keys) = (random(d, 8), random(d * 13, 9));
                let mut got = vec![0.0f32; 13];
                scores(isa, &q, &keys, 0.5, &mut got);
                let w = random(13, 10);
                let mut mixed = vec![1.0f32; d];
                mix(isa, &w, &keys, &mut mixed);
                for p in 0..13 {
                    let want: f32 = q.iter().zip(&keys[p * d..]).map(|(a, b)| a * b).sum();
                    assert!((got[p] - 0.5 * want).abs() < 1e-5, "{isa:?} d={d}");
                }
                for j in 0..d {
                    let want: f32 = (0..13).map(|p| w[p] * keys[p * d + j]).sum();
                    assert!((mixed[j] - want).abs() < 1e-5, "{isa:?} d={d}");
                }
            }
            for len in [0, 1, 7, 8, 9, 33] {
                let (a, b) = (random(len, 4), random(len, 5));
                let exact: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
                assert!((dot_f32(isa, &a, &b) - exact).abs() < 1e-5);
                let mut y = b.clone();
                axpy(isa, 0.5, &a, &mut y);
                for i in 0..len {
                    assert!((y[i] - (b[i] + 0.5 * a[i])).abs() < 1e-6);
                }
            }
        }
    }

    #[test]
    fn integer_dots_stay_within_activation_quantization_error() {
        let k = 32 * 18;
        let w = random(k, 6);
        let x = random(k, 7);
        let mut act = ActQ8::default();
        act.quantize(&x);
        for kind in [QuantType::Q8_0, QuantType::Q4_0, QuantType::Q4_1] {
            let m = QMatrix::quantize(1, k, &w, kind).unwrap();
            let wd = m.to_f32();
            let exact: f32 = wd.iter().zip(&x).map(|(a, b)| a * b).sum();
            let got = match m.storage() {
                crate::quant::Storage::Q8_0(b) => dot_q8_0(Isa::detect(), b, &act),
                crate::quant::Storage::Q4_0(b) => dot_q4_0(Isa::detect(), b, &act),
                crate::quant::Storage::Q4_1(b) => dot_q4_1(Isa::detect(), b, &act),
                _ => unreachable!("one row is stored in plain blocks"),
            };
            // Rounding x to 1/254 of its block maximum: a relative error well under 1%.
            let scale: f32 = wd.iter().map(|v| v.abs()).sum::<f32>() / 127.0;
            assert!((got - exact).abs() < scale, "{kind}: {got} vs {exact}");
        }
    }
}
