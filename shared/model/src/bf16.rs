//! Mixed-precision GEMM for the training engine's frozen-weight products: both inputs rounded to
//! bf16 (round to nearest, ties to even), products summed in f32 — PyTorch's `autocast(bfloat16)`
//! on CPU — on processors with AVX512-BF16, whose `vdpbf16ps` runs twice the f32 FMA rate (AMD Zen 4,
//! Intel Sapphire Rapids and later; measured here: 233 against 115 GFLOP/s per core).
//!
//! The right-hand operand (a frozen weight, `k × n`) is packed once per layer load into panels of
//! [`NR`] columns whose 32-bit lanes hold the bf16 pair `(B[2q][j], B[2q+1][j])`; the left-hand
//! operand (activations, `m × k`, row-major) is packed per product into tiles of [`MR`] rows. The
//! micro-kernel keeps a 12 × 32 block of `C` in 24 registers and streams both packs.
//!
//! What lives here: the packing, the kernel and [`available`]. What must never live here: the choice
//! of *when* bf16 is acceptable — that is the caller's precision setting (`engine::Precision`).

/// Columns of `B` per packed panel (two 16-lane vectors).
pub const NR: usize = 32;
/// Rows of `A` per packed tile (the kernel's register block is `MR × NR`).
pub const MR: usize = 12;
/// k-pairs per cache block: a panel's block (`KCP · NR` words, 16 KiB) stays in L1 while every
/// row tile of `A` passes over it.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const KCP: usize = 128;

/// Whether this CPU runs the bf16 kernels (x86-64 with AVX-512 F and BF16, and AVX-512 not turned
/// off with `STARLING_NO_AVX512`, which the quantized kernels honour too).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            std::env::var_os("STARLING_NO_AVX512").is_none()
                && std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bf16")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// bf16 bits of `x`, rounded to nearest with ties to even (NaN stays NaN): the rounding
/// `vcvtneps2bf16` applies to normal numbers.
pub fn round(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

/// The f32 value of bf16 bits.
pub fn widen(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

/// A `k × n` right-hand operand packed for the kernel: panel `p` (columns `p·NR ..`), pair `q`
/// holds `NR` words `lo = B[2q][j], hi = B[2q+1][j]`; odd `k` and the last panel are zero-padded.
#[derive(Default)]
pub struct PackedB {
    data: Vec<u32>,
    k: usize,
    n: usize,
}

impl PackedB {
    /// Rows of `B` (the product's inner dimension).
    pub fn k(&self) -> usize {
        self.k
    }

    /// Columns of `B`.
    pub fn n(&self) -> usize {
        self.n
    }

    fn kp(&self) -> usize {
        self.k.div_ceil(2)
    }

    fn shape(&mut self, k: usize, n: usize) {
        self.k = k;
        self.n = n;
        let len = n.div_ceil(NR) * k.div_ceil(2) * NR;
        // Every word, padding included, is written by the packers: no clearing needed.
        self.data.resize(len, 0);
    }

    /// Packs `B = Wᵀ` for a `W` of `n` rows of `k` values (`row(r, out)` writes row `r`): the
    /// forward orientation (`y = x·Wᵀ`). Panics unless this CPU is [`available`].
    pub fn pack_transposed(&mut self, n: usize, k: usize, mut row: impl FnMut(usize, &mut [f32])) {
        assert!(available(), "bf16: packing needs AVX512-BF16");
        self.shape(k, n);
        let kp = self.kp();
        // Rows are converted 16 at a time into word rows, then written 16 columns per pair.
        const ROWS: usize = 16;
        let mut words = vec![0u32; ROWS * kp];
        let mut values = vec![0.0f32; k];
        for r0 in (0..n.div_ceil(NR) * NR).step_by(ROWS) {
            for (i, dst) in words.chunks_exact_mut(kp).enumerate() {
                let r = r0 + i;
                if r < n {
                    row(r, &mut values);
                    // SAFETY: AVX512-BF16 is present (asserted).
                    unsafe { x86::to_pairs(&values, dst) };
                } else {
                    dst.fill(0);
                }
            }
            let (p, jj) = (r0 / NR, r0 % NR);
            for q in 0..kp {
                let out = &mut self.data[(p * kp + q) * NR + jj..][..ROWS];
                for (i, o) in out.iter_mut().enumerate() {
                    *o = words[i * kp + q];
                }
            }
        }
    }

    /// Packs `B = W` for a `W` of `k` rows of `n` values (`row(r, out)` writes row `r`): the
    /// backward orientation (`dx = dy·W`). Panics unless this CPU is [`available`].
    pub fn pack(&mut self, k: usize, n: usize, mut row: impl FnMut(usize, &mut [f32])) {
        assert!(available(), "bf16: packing needs AVX512-BF16");
        self.shape(k, n);
        let kp = self.kp();
        let panels = n.div_ceil(NR);
        let (mut lo, mut hi) = (vec![0.0f32; n], vec![0.0f32; n]);
        for q in 0..kp {
            row(2 * q, &mut lo);
            let has_hi = 2 * q + 1 < k;
            if has_hi {
                row(2 * q + 1, &mut hi);
            }
            for p in 0..panels {
                let out = &mut self.data[(p * kp + q) * NR..][..NR];
                // SAFETY: AVX512-BF16 is present (asserted); the kernel reads only `j < n`.
                unsafe { x86::interleave(&lo, has_hi.then_some(&hi[..]), p * NR, out) };
            }
        }
    }
}

/// `A` (`m × k`, row-major) packed into tiles of [`MR`] rows: tile `t`, pair `q` holds `MR` words
/// (rows past `m` repeat the last row; their results are never stored).
#[derive(Default)]
pub struct PackedA {
    data: Vec<u32>,
    row: Vec<u32>,
    m: usize,
    k: usize,
}

impl PackedA {
    /// Packs `m` rows of `k` values of `a` from `off`, row stride `lda`. Panics unless this CPU is
    /// [`available`].
    pub fn pack(&mut self, a: &[f32], off: usize, lda: usize, m: usize, k: usize) {
        assert!(available(), "bf16: packing needs AVX512-BF16");
        assert!(
            m == 0 || off + (m - 1) * lda + k <= a.len(),
            "bf16: left operand out of bounds"
        );
        self.m = m;
        self.k = k;
        let kp = k.div_ceil(2);
        let tiles = m.div_ceil(MR);
        self.data.resize(tiles * kp * MR, 0);
        self.row.resize(kp, 0);
        for t in 0..tiles {
            for i in 0..MR {
                let r = (t * MR + i).min(m - 1);
                // SAFETY: AVX512-BF16 is present (asserted); the row is in bounds (asserted).
                unsafe { x86::to_pairs(&a[off + r * lda..off + r * lda + k], &mut self.row) };
                let tile = &mut self.data[t * kp * MR..(t + 1) * kp * MR];
                for (q, &w) in self.row.iter().enumerate() {
                    tile[q * MR + i] = w;
                }
            }
        }
    }
}

/// `dst[m×n] = (acc ? dst : 0) + alpha · A·B` (`dst` row-major from `off`, stride `ld`; `m` from
/// `a`, `n` from `b`); `threads > 1` splits the row tiles across rayon's pool.
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    dst: &mut [f32],
    off: usize,
    ld: usize,
    acc: bool,
    a: &PackedA,
    b: &PackedB,
    alpha: f32,
    threads: usize,
) {
    let (m, n) = (a.m, b.n);
    assert_eq!(a.k, b.k, "bf16: inner dimensions differ");
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        n <= ld && off + (m - 1) * ld + n <= dst.len(),
        "bf16: output out of bounds"
    );
    assert!(available(), "bf16: the kernel needs AVX512-BF16");
    let tiles = m.div_ceil(MR);
    let out = Out(dst[off..].as_mut_ptr());
    let run = |t0: usize, t1: usize| {
        // SAFETY: AVX512-BF16 is present; every tile writes only its own rows `t·MR..` of `dst`
        // (bounds asserted above), so concurrent ranges of tiles never overlap.
        unsafe { x86::tiles(&out, ld, acc, a, b, alpha, t0..t1) };
    };
    let workers = threads.clamp(1, tiles);
    if workers == 1 {
        run(0, tiles);
    } else {
        use rayon::prelude::*;
        (0..workers)
            .into_par_iter()
            .for_each(|w| run(w * tiles / workers, (w + 1) * tiles / workers));
    }
}

/// The output pointer shared by the threads of one product (each writes its own rows).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
struct Out(*mut f32);
// SAFETY: the threads of `gemm` write disjoint row ranges through it.
unsafe impl Sync for Out {}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Out, PackedA, PackedB, KCP, MR, NR};
    use std::arch::x86_64::*;

    /// bf16 pairs of `src` (word `q` = `src[2q]` low, `src[2q+1]` high; an odd tail pairs with 0).
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
    pub(super) unsafe fn to_pairs(src: &[f32], dst: &mut [u32]) {
        let k = src.len();
        debug_assert!(dst.len() >= k.div_ceil(2));
        let mut j = 0;
        while j < k {
            let left = k - j;
            let (m0, m1) = (mask(left), mask(left.saturating_sub(16)));
            // SAFETY: the masked loads read only `src[j..k]`.
            let lo = _mm512_maskz_loadu_ps(m0, src.as_ptr().add(j));
            let hi = _mm512_maskz_loadu_ps(m1, src.as_ptr().add(j + 16));
            let words: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            let wm = mask(left.div_ceil(2));
            // SAFETY: the masked store writes only `dst[j/2 .. ceil(k/2)]`.
            _mm512_mask_storeu_epi32(dst.as_mut_ptr().add(j / 2).cast(), wm, words);
            j += 32;
        }
    }

    /// One pair row of a panel: `out[jj] = lo[c0+jj] | hi[c0+jj] << 16` for `c0 + jj < n`, else 0.
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
    pub(super) unsafe fn interleave(lo: &[f32], hi: Option<&[f32]>, c0: usize, out: &mut [u32]) {
        let n = lo.len();
        for h in 0..NR / 16 {
            let c = c0 + h * 16;
            let m = mask(n.saturating_sub(c));
            // SAFETY: the masked loads read only columns below `n` of rows of length `n`.
            let a = _mm512_maskz_loadu_ps(m, lo.as_ptr().add(c.min(n)));
            let b = match hi {
                Some(hi) => _mm512_maskz_loadu_ps(m, hi.as_ptr().add(c.min(n))),
                None => _mm512_setzero_ps(),
            };
            let a16: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(a));
            let b16: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(b));
            let words = _mm512_or_si512(
                _mm512_cvtepu16_epi32(a16),
                _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(b16)),
            );
            _mm512_storeu_si512(out.as_mut_ptr().add(h * 16).cast(), words);
        }
    }

    /// The low `n` lanes (all 16 from 16 on).
    fn mask(n: usize) -> __mmask16 {
        if n >= 16 {
            0xffff
        } else {
            ((1u32 << n) - 1) as __mmask16
        }
    }

    /// Row tiles `ts` of `C = (acc ? C : 0) + alpha·A·B`.
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
    pub(super) unsafe fn tiles(
        out: &Out,
        ld: usize,
        acc: bool,
        a: &PackedA,
        b: &PackedB,
        alpha: f32,
        ts: std::ops::Range<usize>,
    ) {
        let (m, n, kp) = (a.m, b.n, b.kp());
        let panels = n.div_ceil(NR);
        for q0 in (0..kp).step_by(KCP) {
            let qn = KCP.min(kp - q0);
            let overwrite = q0 == 0 && !acc;
            for p in 0..panels {
                let bp = b.data.as_ptr().add((p * kp + q0) * NR);
                let nc = NR.min(n - p * NR);
                for t in ts.clone() {
                    let ap = a.data.as_ptr().add((t * kp + q0) * MR);
                    let rows = MR.min(m - t * MR);
                    let c = out.0.add(t * MR * ld + p * NR);
                    kernel(ap, bp, qn, c, ld, rows, nc, alpha, overwrite);
                }
            }
        }
    }

    /// `C[rows × nc] (+)= alpha · Σ_q A[q] ⊗ B[q]` over `qn` pairs of one tile and one panel.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
    unsafe fn kernel(
        a: *const u32,
        b: *const u32,
        qn: usize,
        c: *mut f32,
        ld: usize,
        rows: usize,
        nc: usize,
        alpha: f32,
        overwrite: bool,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        for q in 0..qn {
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(q * NR).cast()));
            let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(q * NR + 16).cast()));
            let ar = a.add(q * MR);
            for (i, row) in acc.iter_mut().enumerate() {
                let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ar.add(i) as i32));
                row[0] = _mm512_dpbf16_ps(row[0], av, b0);
                row[1] = _mm512_dpbf16_ps(row[1], av, b1);
            }
        }
        let va = _mm512_set1_ps(alpha);
        let masks = [mask(nc), mask(nc.saturating_sub(16))];
        for (i, row) in acc.iter().enumerate().take(rows) {
            let cp = c.add(i * ld);
            for (h, &mk) in masks.iter().enumerate() {
                if mk == 0 {
                    continue;
                }
                let v = _mm512_mul_ps(row[h], va);
                let v = if overwrite {
                    v
                } else {
                    _mm512_add_ps(_mm512_maskz_loadu_ps(mk, cp.add(h * 16)), v)
                };
                _mm512_mask_storeu_ps(cp.add(h * 16), mk, v);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod x86 {
    //! No bf16 kernels off x86-64: [`super::available`] is false, so nothing here is reached.
    use super::{Out, PackedA, PackedB};

    pub(super) unsafe fn to_pairs(_: &[f32], _: &mut [u32]) {
        unreachable!("bf16 kernels are x86-64 only")
    }

    pub(super) unsafe fn interleave(_: &[f32], _: Option<&[f32]>, _: usize, _: &mut [u32]) {
        unreachable!("bf16 kernels are x86-64 only")
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn tiles(
        _: &Out,
        _: usize,
        _: bool,
        _: &PackedA,
        _: &PackedB,
        _: f32,
        _: std::ops::Range<usize>,
    ) {
        unreachable!("bf16 kernels are x86-64 only")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// `alpha · A·B` from the bf16-rounded inputs, summed in f64.
    fn reference(a: &[f32], b: &[f32], (m, n, k): (usize, usize, usize), alpha: f32) -> Vec<f32> {
        let r = |x: f32| widen(round(x)) as f64;
        let mut c = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let s: f64 = (0..k).map(|t| r(a[i * k + t]) * r(b[t * n + j])).sum();
                c[i * n + j] = (s * alpha as f64) as f32;
            }
        }
        c
    }

    fn random(len: usize, rng: &mut impl Rng) -> Vec<f32> {
        (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(round(1.0), 0x3f80);
        // 1 + 2⁻⁸ is halfway between 1 and 1 + 2⁻⁷: ties go to the even mantissa (1.0).
        assert_eq!(round(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(round(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(widen(round(-2.5)), -2.5);
        assert!(widen(round(f32::NAN)).is_nan());
    }

    /// Every shape edge (partial tiles and panels, odd k, several k blocks), both orientations,
    /// overwrite and accumulate, one and two threads, against the rounded-input reference.
    #[test]
    fn products_equal_the_rounded_reference() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX512-BF16 (the engine uses f32 here)");
            return;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for &(m, n, k) in &[
            (1, 1, 1),
            (13, 33, 7),
            (12, 32, 256),
            (25, 70, 301),
            (40, 17, 515),
        ] {
            let a = random(m * k, &mut rng);
            let b = random(k * n, &mut rng);
            let want = reference(&a, &b, (m, n, k), 0.5);
            let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
            let mut pa = PackedA::default();
            pa.pack(&a, 0, k, m, k);
            for transposed in [false, true] {
                let mut pb = PackedB::default();
                if transposed {
                    pb.pack_transposed(n, k, |r, o| o.copy_from_slice(&bt[r * k..(r + 1) * k]));
                } else {
                    pb.pack(k, n, |r, o| o.copy_from_slice(&b[r * n..(r + 1) * n]));
                }
                assert_eq!((pb.k(), pb.n()), (k, n));
                for threads in [1, 2] {
                    // Output inside a wider buffer: columns past n must stay untouched.
                    let ld = n + 3;
                    let mut c = vec![7.0f32; m * ld];
                    gemm(&mut c, 0, ld, false, &pa, &pb, 0.5, threads);
                    gemm(&mut c, 0, ld, true, &pa, &pb, 0.5, threads);
                    for i in 0..m {
                        for j in 0..ld {
                            let got = c[i * ld + j];
                            if j >= n {
                                assert_eq!(got, 7.0, "column {j} past n was written");
                                continue;
                            }
                            let w = 2.0 * want[i * n + j];
                            assert!(
                                (got - w).abs() <= 1e-5 * (1.0 + w.abs()) * (k as f32).sqrt(),
                                "{m}×{n}×{k} [{i},{j}]: {got} vs {w}"
                            );
                        }
                    }
                }
            }
        }
    }
}
