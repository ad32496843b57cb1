//! AVX2 + FMA kernels for packed Q4 weights (see `packed`): W4A8 GEMV with `vpmaddubsw`
//! (unsigned nibbles x signed int8 activations, exact int32 sums per group, then the shared
//! float epilogue, so results equal the generic kernel bit for bit) and weight-only W4 GEMV on
//! f32 activations (nibbles widened to f32 in registers, FMA accumulation); the AVX2
//! implementation of the shared drivers' [`Sums`] (`common.rs`).

use super::common::*;
use crate::generic::QRow;
use crate::packed::{ChannelTiles, PackedQ4, QK4};
use std::arch::x86_64::*;

/// The AVX2 integer sums (`vpmaddubsw` + `vpmaddwd`) and four-lane softmax steps.
pub(crate) struct Avx2;

impl Sums for Avx2 {
    const WIDE: bool = false;

    #[inline(always)]
    unsafe fn group_sums<const NC: usize>(
        rp: [*const u8; 4],
        xp: [*const i8; NC],
        i: usize,
        end: usize,
        m4: __m256i,
        ones: __m256i,
    ) -> [[__m256i; 4]; NC] {
        group_sums::<NC>(rp, xp, i, end, m4, ones)
    }

    /// Each input's four bytes at a time broadcast, made unsigned by flipping the sign bit
    /// (`x + 128`), `vpmaddubsw` against the 32 channels' four weights; i16 sums over up to eight
    /// quads (at most 8 * 2 * 255 * 8 = 32640, so they fit), widened per eight quads.
    #[inline(always)]
    unsafe fn lane_group<const NP: usize, X: LaneInput>(
        base: *const i8,
        quads: usize,
        xs: &[X; NP],
        (tap, off, xp): (&mut usize, &mut usize, &mut [*const i8; NP]),
    ) -> [[__m256i; 4]; NP] {
        let ones = _mm256_set1_epi16(1);
        let flip = _mm256_set1_epi8(-128i8);
        let run = xs[0].run();
        let mut acc = [[_mm256_setzero_si256(); 4]; NP];
        let mut quad = 0;
        while quad < quads {
            let end = (quad + 8).min(quads);
            let mut acc16 = [[_mm256_setzero_si256(); 4]; NP];
            while quad < end {
                if *off == run {
                    *tap += 1;
                    *off = 0;
                    *xp = std::array::from_fn(|c| xs[c].run_ptr(*tap));
                }
                let wp = base.add(quad * 128);
                let wv: [__m256i; 4] = std::array::from_fn(|j| _mm256_loadu_si256(wp.add(32 * j) as *const __m256i));
                for c in 0..NP {
                    let x4 = std::ptr::read_unaligned(xp[c].add(*off) as *const i32);
                    let xb =
                        if X::FLIPPED { _mm256_set1_epi32(x4) } else { _mm256_xor_si256(_mm256_set1_epi32(x4), flip) };
                    for j in 0..4 {
                        acc16[c][j] = _mm256_add_epi16(acc16[c][j], _mm256_maddubs_epi16(xb, wv[j]));
                    }
                }
                *off += 4;
                quad += 1;
            }
            for c in 0..NP {
                for j in 0..4 {
                    acc[c][j] = _mm256_add_epi32(acc[c][j], _mm256_madd_epi16(acc16[c][j], ones));
                }
            }
        }

        acc
    }

    #[inline(always)]
    unsafe fn lane_short<const NP: usize, const J: usize, X: LaneInput>(
        w: &PackedQ4,
        t: &ChannelTiles,
        at: (usize, usize),
        xs: [X; NP],
    ) -> [[__m256; J]; NP] {
        channel_block_short::<NP, J, X>(w, t, at, xs)
    }

    #[inline(always)]
    unsafe fn softmax_exp(_: &mut [f64]) -> usize {
        0
    }

    #[inline(always)]
    unsafe fn softmax_quot(_: &[f64], _: f64, _: f64, _: &mut [f32]) -> usize {
        0
    }
}

/// W4A8 GEMV rows `rows` of `w` (see `generic_gemv_q4q8`), in tiles of four rows.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `x.q` holds `w.k_pad` values, `y` `rows.len()` outputs.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn avx2_gemv_q4q8_rows(
    w: &PackedQ4,
    x: QRow,
    bias: Option<&[f32]>,
    rows: std::ops::Range<usize>,
    y: &mut [f32],
) {
    gemv_rows_impl::<Avx2>(w, x, bias, rows, y)
}

/// W4A8 of rows `rows` of `w` (start a multiple of four) on a batch of inputs: output `(c, r)`
/// goes to `y[c * cs + (r - rows.start) * rs]` (`(w.n, 1)`: one row of outputs per input;
/// `(1, xs.len())`: one row per output channel, as a convolution writes its `[C, H, W]` output).
///
/// # Safety
/// The CPU must support AVX2 and FMA; every `xs[c].q` holds `w.k_pad` values and every
/// `xs[c].sums` `w.groups()`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn avx2_gemm_q4q8(
    w: &PackedQ4,
    rows: std::ops::Range<usize>,
    xs: &[QRow],
    bias: Option<&[f32]>,
    y: &mut [f32],
    strides: (usize, usize),
) {
    gemm_impl::<Avx2>(w, rows, xs.len(), |c| xs[c], bias, y, strides)
}

/// Weight-only W4 GEMV on f32 activations, rows `rows`, bit for bit `generic_gemv_q4f32` (whose
/// arithmetic is this kernel's, lane for lane); `x` holds
/// at least `w.k_pad` values (zero-padded).
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn avx2_gemv_q4f32_rows(
    w: &PackedQ4,
    x: &[f32],
    bias: Option<&[f32]>,
    rows: std::ops::Range<usize>,
    y: &mut [f32],
) {
    let groups = w.groups();
    let bpg = w.group / QK4;
    let bpr = w.k_pad / QK4;
    let eight = _mm256_set1_epi32(8);
    let xp = x.as_ptr();
    for (out, r) in y.iter_mut().zip(rows) {
        let row = w.blocks.as_ptr().add(r * bpr) as *const u8;
        let mut total = _mm256_setzero_ps();
        for g in 0..groups {
            let mut acc = _mm256_setzero_ps();
            for b in 0..bpg {
                let i = g * bpg + b;
                let raw = _mm_loadu_si128(row.add(i * 16) as *const __m128i);
                let mask = _mm_set1_epi8(0x0f);
                let lo = _mm_and_si128(raw, mask); // elements 0..16
                let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask); // elements 16..32
                for (half, bytes) in [(0usize, lo), (16, hi)] {
                    let q0 = _mm256_sub_epi32(_mm256_cvtepu8_epi32(bytes), eight);
                    let q1 = _mm256_sub_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8)), eight);
                    let x0 = _mm256_loadu_ps(xp.add(i * QK4 + half));
                    let x1 = _mm256_loadu_ps(xp.add(i * QK4 + half + 8));
                    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q0), x0, acc);
                    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q1), x1, acc);
                }
            }
            total = _mm256_fmadd_ps(acc, _mm256_set1_ps(w.scales[r * groups + g]), total);
        }
        let h = hsum_f32(total);
        *out = bias.map_or(h, |b| h + b[r]);
    }
}

/// [`avx2_gemv_q4f32_rows`] on `inputs` inputs at once (`x` holds them one after another, `k_pad`
/// values each), every output channel: the weight blocks are unpacked once per `NC` inputs and
/// each (input, channel) pair runs the GEMV's arithmetic exactly (same fused multiply-adds in the
/// same order, same reductions). `y` is `[inputs, n]`.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `x` holds `inputs * k_pad` values, `y` `inputs * n`, `bias`
/// (if any) `n`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn avx2_gemm_q4f32(w: &PackedQ4, x: &[f32], inputs: usize, bias: Option<&[f32]>, y: &mut [f32]) {
    let mut c0 = 0;
    while c0 < inputs {
        match inputs - c0 {
            1 => gemm_q4f32_block::<1>(w, x, c0, bias, y),
            2 => gemm_q4f32_block::<2>(w, x, c0, bias, y),
            3 => gemm_q4f32_block::<3>(w, x, c0, bias, y),
            _ => gemm_q4f32_block::<4>(w, x, c0, bias, y),
        }
        c0 += (inputs - c0).min(4);
    }
}

#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn gemm_q4f32_block<const NC: usize>(w: &PackedQ4, x: &[f32], c0: usize, bias: Option<&[f32]>, y: &mut [f32]) {
    let groups = w.groups();
    let bpg = w.group / QK4;
    let bpr = w.k_pad / QK4;
    let eight = _mm256_set1_epi32(8);
    let mask = _mm_set1_epi8(0x0f);
    let xp: [*const f32; NC] = std::array::from_fn(|j| x.as_ptr().add((c0 + j) * w.k_pad));
    for r in 0..w.n {
        let row = w.blocks.as_ptr().add(r * bpr) as *const u8;
        let mut total = [_mm256_setzero_ps(); NC];
        for g in 0..groups {
            let mut acc = [_mm256_setzero_ps(); NC];
            for b in 0..bpg {
                let i = g * bpg + b;
                let raw = _mm_loadu_si128(row.add(i * 16) as *const __m128i);
                let lo = _mm_and_si128(raw, mask);
                let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
                for (half, bytes) in [(0usize, lo), (16, hi)] {
                    let q0 = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(bytes), eight));
                    let q1 =
                        _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8)), eight));
                    for j in 0..NC {
                        let x0 = _mm256_loadu_ps(xp[j].add(i * QK4 + half));
                        let x1 = _mm256_loadu_ps(xp[j].add(i * QK4 + half + 8));
                        acc[j] = _mm256_fmadd_ps(q0, x0, acc[j]);
                        acc[j] = _mm256_fmadd_ps(q1, x1, acc[j]);
                    }
                }
            }
            let sc = _mm256_set1_ps(w.scales[r * groups + g]);
            for j in 0..NC {
                total[j] = _mm256_fmadd_ps(acc[j], sc, total[j]);
            }
        }
        for j in 0..NC {
            let h = hsum_f32(total[j]);
            y[(c0 + j) * w.n + r] = bias.map_or(h, |b| h + b[r]);
        }
    }
}

/// A quantizer `(scale, zero, lo, hi)` in eight-lane vectors, with the scale's f32 reciprocal
/// for [`round_quotient8`].
#[derive(Clone, Copy)]
pub(crate) struct Quant8 {
    s: __m256,
    r: __m256,
    z: __m256,
    lo: __m256,
    hi: __m256,
}

impl Quant8 {
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn new(scale: f32, zero: f32, lo: f32, hi: f32) -> Quant8 {
        Quant8 {
            s: _mm256_set1_ps(scale),
            r: _mm256_set1_ps(screen_reciprocal(scale)),
            z: _mm256_set1_ps(zero),
            lo: _mm256_set1_ps(lo),
            hi: _mm256_set1_ps(hi),
        }
    }
}

/// `round_half_even(fl(x / s))` on eight lanes, as `vroundps(vdivps(x, s))` computes it, without
/// the division where it cannot change the integer: `q = x * r` with `r = fl(1 / s)` (normal: see
/// [`screen_reciprocal`]) is within
/// `|q| 2^-22` of `fl(x / s)` (three roundings of relative size 2^-24, subnormals aside: there
/// `|q| < 1/8` and both round to a zero of `x / s`'s sign), so where `|q - round(q)| + |q| 2^-21 <
/// 0.5` (one FMA, which can only round a sum of at least 0.5 to at least 0.5), `fl(x / s)`
/// lies strictly inside the same half-open unit around `round(q)` and rounds to it. Any other
/// lane (near a half-way point, NaN, infinite, a reciprocal that overflowed) sends the vector to
/// the division.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn round_quotient8(x: __m256, s: __m256, r: __m256) -> __m256 {
    const NEAR: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    let q = _mm256_mul_ps(x, r);
    let k = _mm256_round_ps(q, NEAR);
    let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let d = _mm256_and_ps(_mm256_sub_ps(q, k), abs);
    let t = _mm256_fmadd_ps(_mm256_and_ps(q, abs), _mm256_set1_ps(QUOTIENT_SCREEN), d);
    let ok = _mm256_cmp_ps(t, _mm256_set1_ps(0.5), _CMP_LT_OQ);
    if _mm256_movemask_ps(ok) == 0xff {
        k
    } else {
        _mm256_round_ps(_mm256_div_ps(x, s), NEAR)
    }
}

/// `quantize_level` on eight lanes: divide (through [`round_quotient8`]), round half to even
/// (`vroundps`; the scalar add-magic rounding after bounding to 2^22 gives the same integers), add
/// the zero point, clamp with NaN kept (`vminps`/`vmaxps` return their second operand, the value,
/// when it is NaN).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn level8(x: __m256, q: &Quant8) -> __m256 {
    let y = _mm256_add_ps(round_quotient8(x, q.s, q.r), q.z);
    _mm256_max_ps(q.lo, _mm256_min_ps(q.hi, y))
}

/// One FakeQuant of eight lanes, as [`fake_quant_ptr`] computes each vector: the levels
/// ([`level8`]) back to values.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn fake_quant8(x: __m256, scale: f32, zero: f32, lo: f32, hi: f32) -> __m256 {
    let q = Quant8::new(scale, zero, lo, hi);
    _mm256_mul_ps(_mm256_sub_ps(level8(x, &q), q.z), q.s)
}

/// The epilogue constants of a [`crate::generic::PostForm`] in eight-lane vectors: the clamp's
/// bounds, the FakeQuant's quantizer and, where the level can be taken directly (`fold`), the
/// bounds of the level less the zero point that the clamp and the FakeQuant's bounds leave, `[ka,
/// kb]` widened by 1/4 (`avx512::PostVec16` on eight lanes).
#[derive(Clone, Copy)]
pub(crate) struct PostVec8 {
    lo: __m256,
    hi: __m256,
    q: Quant8,
    ka: __m256,
    kb: __m256,
    fold: bool,
}

impl PostVec8 {
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn new(f: crate::generic::PostForm) -> PostVec8 {
        let (lo, hi) = f.clamp.unwrap_or((f32::NEG_INFINITY, f32::INFINITY));
        let (s, z, qlo, qhi) = f.fq.unwrap_or((1.0, 0.0, 0.0, 0.0));
        let (fold, ka, kb) = folded_levels(f);
        PostVec8 {
            lo: _mm256_set1_ps(lo),
            hi: _mm256_set1_ps(hi),
            q: Quant8::new(s, z, qlo, qhi),
            ka: _mm256_set1_ps(ka),
            kb: _mm256_set1_ps(kb),
            fold,
        }
    }

    /// With `fold`: the form's level less the zero point for each of 8 lanes, and whether every
    /// lane's is certain. `q = v fl(1 / s)` is within `|q| QUOTIENT_SCREEN / 2` of the
    /// definition's quotient `fl(v / s)` ([`round_quotient8`]); clamped to `[ka - 1/4, kb + 1/4]`
    /// and rounded to `k`, it is the definition's level wherever `|q_c - k| + |q|
    /// QUOTIENT_SCREEN < 1/2` (inside, the quotient rounds to `k`; at an end the quotient lies
    /// past it and the clamps give it: `avx512::PostVec16::level16`). NaN lanes fail the test.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn level8_folded(&self, v: __m256) -> (__m256, bool) {
        const NEAR: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
        let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        let q = _mm256_mul_ps(v, self.q.r);
        // vmaxps / vminps return their second operand, here q, when it is NaN.
        let qc = _mm256_min_ps(self.kb, _mm256_max_ps(self.ka, q));
        let k = _mm256_round_ps(qc, NEAR);
        let t = _mm256_fmadd_ps(
            _mm256_and_ps(q, abs),
            _mm256_set1_ps(QUOTIENT_SCREEN),
            _mm256_and_ps(_mm256_sub_ps(qc, k), abs),
        );
        (k, _mm256_movemask_ps(_mm256_cmp_ps(t, _mm256_set1_ps(0.5), _CMP_LT_OQ)) == 0xff)
    }

    /// The form's ops on eight lanes: [`crate::generic::post8`]'s operations for a clamp then a
    /// FakeQuant (the level through [`PostVec8::level8_folded`] where it is certain, `(k + 0) *
    /// s` as the FakeQuant writes `(level - zero) * s`, the `+ 0` making a `-0` level `+0`).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn apply<const CLAMP: bool, const FQ: bool>(&self, mut v: __m256) -> __m256 {
        if FQ && self.fold {
            let (k, sure) = self.level8_folded(v);
            if sure {
                return _mm256_mul_ps(_mm256_add_ps(k, _mm256_setzero_ps()), self.q.s);
            }
        }
        if CLAMP {
            v = _mm256_min_ps(self.hi, _mm256_max_ps(self.lo, v));
        }
        if FQ {
            // SAFETY: this function's target features are level8's.
            v = _mm256_mul_ps(_mm256_sub_ps(unsafe { level8(v, &self.q) }, self.q.z), self.q.s);
        }
        v
    }
}

/// Levels to int32, NaN to 0 (as `as i8` does).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn level_i32(y: __m256) -> __m256i {
    _mm256_cvtps_epi32(_mm256_and_ps(y, _mm256_cmp_ps(y, y, _CMP_ORD_Q)))
}

/// `quantize_i8` over a slice, 32 values per step: the levels ([`level8`]), NaN to 0 as `as i8`
/// does, then packed to bytes in order. Returns whether any of the values was NaN (seen on the
/// way: no second pass over the input).
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn avx2_quantize_i8(x: &[f32], scale: f32, zero: i32, lo: i32, hi: i32, out: &mut [i8]) -> bool {
    let n = x.len().min(out.len());
    let (z, lo, hi) = (zero as f32, lo.max(-128) as f32, hi.min(127) as f32);
    let v = &Quant8::new(scale, z, lo, hi);
    // A NaN input gives a NaN level (the clamp keeps it): OR of the unordered lanes.
    let mut bad = _mm256_setzero_ps();
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    let mut i = 0;
    while i + 32 <= n {
        let p = x.as_ptr().add(i);
        let y: [__m256; 4] = [
            level8(_mm256_loadu_ps(p), v),
            level8(_mm256_loadu_ps(p.add(8)), v),
            level8(_mm256_loadu_ps(p.add(16)), v),
            level8(_mm256_loadu_ps(p.add(24)), v),
        ];
        let unord = _mm256_or_ps(
            _mm256_or_ps(_mm256_cmp_ps(y[0], y[0], _CMP_UNORD_Q), _mm256_cmp_ps(y[1], y[1], _CMP_UNORD_Q)),
            _mm256_or_ps(_mm256_cmp_ps(y[2], y[2], _CMP_UNORD_Q), _mm256_cmp_ps(y[3], y[3], _CMP_UNORD_Q)),
        );
        bad = _mm256_or_ps(bad, unord);
        let a = _mm256_packs_epi32(level_i32(y[0]), level_i32(y[1]));
        let b = _mm256_packs_epi32(level_i32(y[2]), level_i32(y[3]));
        let v = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(a, b), order);
        _mm256_storeu_si256(out.as_mut_ptr().add(i) as *mut __m256i, v);
        i += 32;
    }
    let mut nan = _mm256_movemask_ps(bad) != 0;
    for (d, &v) in out[i..n].iter_mut().zip(&x[i..n]) {
        *d = crate::generic::quantize_i8(v, scale, z, lo, hi);
        nan |= v.is_nan();
    }
    nan
}

/// The sums of `q` per group of `group` bytes (a multiple of 32; `q.len()` a multiple of it) into
/// `sums`: each byte made unsigned (`x + 128`), `vpsadbw` against zero (eight at a time into four
/// 64-bit lanes), less `128 group`. Exact integers: equal to the scalar sums.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub unsafe fn avx2_group_sums_i8(q: &[i8], group: usize, sums: &mut Vec<i32>) {
    debug_assert!(group.is_multiple_of(32) && q.len().is_multiple_of(group));
    let flip = _mm256_set1_epi8(i8::MIN);
    let zero = _mm256_setzero_si256();
    sums.clear();
    for g in q.chunks_exact(group) {
        let mut acc = _mm256_setzero_si256();
        for c in g.chunks_exact(32) {
            let v = _mm256_xor_si256(_mm256_loadu_si256(c.as_ptr() as *const __m256i), flip);
            acc = _mm256_add_epi64(acc, _mm256_sad_epu8(v, zero));
        }
        let t = _mm_add_epi64(_mm256_castsi256_si128(acc), _mm256_extracti128_si256::<1>(acc));
        let total = _mm_cvtsi128_si64(t) + _mm_extract_epi64::<1>(t);
        sums.push((total - 128 * group as i64) as i32);
    }
}

/// `fake_quant_into` eight lanes at a time, the levels ([`level8`]) back to values: `n` values
/// from `x` to `out`, which may be the same buffer (each vector of eight is loaded before its
/// results are stored; the tail value by value).
///
/// # Safety
/// AVX2 and FMA; `x` readable and `out` writable for `n` values, either equal or disjoint.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn fake_quant_ptr(
    x: *const f32,
    out: *mut f32,
    n: usize,
    (scale, zero, lo, hi): (f32, f32, f32, f32),
) {
    let q = Quant8::new(scale, zero, lo, hi);
    let mut i = 0;
    while i + 8 <= n {
        let y = level8(_mm256_loadu_ps(x.add(i)), &q);
        _mm256_storeu_ps(out.add(i), _mm256_mul_ps(_mm256_sub_ps(y, q.z), q.s));
        i += 8;
    }
    while i < n {
        *out.add(i) = crate::generic::fake_quant_one(*x.add(i), scale, zero, lo, hi);
        i += 1;
    }
}

/// `avx512::avx512_phase_split2` on eight lanes: one zero-padded input row split into its two
/// column phases, through the input's quantizer `quant` where there is one (`padded[x] =
/// fq(src[x - lo])` for `lo <= x < lo + src.len()`, `+0` elsewhere, `fq` as [`fake_quant_ptr`]
/// computes it); `even[j] = padded[2 j]`, `odd[j] = padded[2 j + 1]` for every `j < even.len()`.
/// Eight values of each phase per step: sixteen padded values (two vectors; where they reach past
/// the row, through a zeroed copy, quantized, the padding lanes cleared after), then an in-lane
/// shuffle and a 64-bit permute per phase. (Split value by value, it was 28% of a 5 x 5 / 2 stem's
/// time.)
///
/// # Safety
/// AVX2 and FMA; `even` and `odd` hold the same number of values.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn avx2_phase_split2(
    src: &[f32],
    lo: usize,
    even: &mut [f32],
    odd: &mut [f32],
    quant: Option<(f32, f32, f32, f32)>,
) {
    debug_assert_eq!(even.len(), odd.len());
    let n = even.len().min(odd.len());
    let q = quant.map(|(s, z, l, h)| Quant8::new(s, z, l, h));
    // Eight padded values from x on: the row's lanes loaded and quantized, the others +0 (a
    // function, not a closure: a closure would not inherit this one's target features).
    #[inline(always)]
    unsafe fn load(src: &[f32], at: i64, q: Option<&Quant8>) -> __m256 {
        let len = src.len() as i64;
        if at >= len || at + 8 <= 0 {
            return _mm256_setzero_ps(); // all padding
        }
        let full = at >= 0 && at + 8 <= len;
        let v = if full {
            _mm256_loadu_ps(src.as_ptr().add(at as usize))
        } else {
            let mut t = [0f32; 8];
            for (l, t) in t.iter_mut().enumerate() {
                let i = at + l as i64;
                if (0..len).contains(&i) {
                    *t = src[i as usize];
                }
            }
            _mm256_loadu_ps(t.as_ptr())
        };
        let v = match q {
            Some(q) => _mm256_mul_ps(_mm256_sub_ps(level8(v, q), q.z), q.s),
            None => v,
        };
        if full {
            v
        } else {
            let idx = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(at as i32));
            let inside = _mm256_and_si256(
                _mm256_cmpgt_epi32(idx, _mm256_set1_epi32(-1)),
                _mm256_cmpgt_epi32(_mm256_set1_epi32(len as i32), idx),
            );
            _mm256_and_ps(v, _mm256_castsi256_ps(inside))
        }
    }
    let mut j = 0;
    while j < n {
        let at = 2 * j as i64 - lo as i64;
        let (a, b) = (load(src, at, q.as_ref()), load(src, at + 8, q.as_ref()));
        let (e, o) = even_odd8(a, b);
        if j + 8 <= n {
            _mm256_storeu_ps(even.as_mut_ptr().add(j), e);
            _mm256_storeu_ps(odd.as_mut_ptr().add(j), o);
        } else {
            let (mut te, mut to) = ([0f32; 8], [0f32; 8]);
            _mm256_storeu_ps(te.as_mut_ptr(), e);
            _mm256_storeu_ps(to.as_mut_ptr(), o);
            even[j..n].copy_from_slice(&te[..n - j]);
            odd[j..n].copy_from_slice(&to[..n - j]);
        }
        j += 8;
    }
}

/// `c = a @ b` with each output one FMA chain over k from zero (`sgemm`'s direct path): tiles of
/// four rows by 16 columns (eight accumulators; per k two loads of b's row, four broadcasts of
/// a), then 8-column and single-column edges with the same chain per output.
///
/// # Safety
/// The CPU must support AVX2 and FMA; every accessed element of `a` (`i * rsa + p * csa`), `b`
/// (`p * rsb + j`) and `c` (`i * rsc + j`) is in bounds.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn avx2_sgemm_direct(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    strides_a: (usize, usize),
    b: &[f32],
    rsb: usize,
    c: &mut [f32],
    rsc: usize,
) {
    sgemm_direct8(m, k, n, a, strides_a, b, rsb, c, rsc)
}

/// `sgemm_chain` for few columns: eight outputs at a time, each one FMA chain over p from +0 (the
/// same bits), the eight chains interleaved so their FMA latencies overlap.
///
/// # Safety
/// The CPU must support AVX2 and FMA; every accessed element of `a`, `b` and `c` is in bounds.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn avx2_sgemm_chain_narrow(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    (rsa, csa): (usize, usize),
    b: &[f32],
    (rsb, csb): (usize, usize),
    c: &mut [f32],
    (rsc, csc): (usize, usize),
) {
    let outputs = m * n;
    let mut o = 0;
    while o < outputs {
        let cnt = (outputs - o).min(8);
        let mut acc = [0f32; 8];
        let mut at = [0usize; 8];
        let mut bt = [0usize; 8];
        for q in 0..cnt {
            let (i, j) = ((o + q) / n, (o + q) % n);
            at[q] = i * rsa;
            bt[q] = j * csb;
        }
        for p in 0..k {
            for q in 0..8 {
                if q < cnt {
                    acc[q] = (*a.get_unchecked(at[q] + p * csa)).mul_add(*b.get_unchecked(p * rsb + bt[q]), acc[q]);
                }
            }
        }
        for (q, &v) in acc.iter().enumerate().take(cnt) {
            let (i, j) = ((o + q) / n, (o + q) % n);
            *c.get_unchecked_mut(i * rsc + j * csc) = v;
        }
        o += cnt;
    }
}

/// `generic_transpose_i8_xor` with four 8 x 8 tiles (32 columns) per register: eight rows of 32
/// bytes loaded, the same three rounds of masked swaps on 64-bit lanes, each lane's eight bytes
/// stored to its column; the edges (rows past a multiple of 8, columns past a multiple of 32) by
/// the plain version's byte loop.
///
/// # Safety
/// The CPU must support AVX2; `src` and `dst` hold at least `rows * cols` bytes.
#[target_feature(enable = "avx2")]
pub unsafe fn avx2_transpose_i8_xor(src: &[i8], rows: usize, cols: usize, dst: &mut [i8], xor: u8) {
    debug_assert!(src.len() >= rows * cols && dst.len() >= rows * cols);
    let (r8, c32) = (rows / 8 * 8, cols / 32 * 32);
    let splat = _mm256_set1_epi8(xor as i8);
    let (sp, dp) = (src.as_ptr(), dst.as_mut_ptr());
    for r in (0..r8).step_by(8) {
        for c in (0..c32).step_by(32) {
            let mut x: [__m256i; 8] = std::array::from_fn(|i| {
                _mm256_xor_si256(_mm256_loadu_si256(sp.add((r + i) * cols + c) as *const __m256i), splat)
            });
            macro_rules! round {
                ($shift:literal, $mask:expr, $d:literal) => {
                    let mask = _mm256_set1_epi64x($mask);
                    for i in (0..8).filter(|i| i & $d == 0) {
                        let t = _mm256_and_si256(_mm256_xor_si256(_mm256_srli_epi64::<$shift>(x[i]), x[i + $d]), mask);
                        x[i + $d] = _mm256_xor_si256(x[i + $d], t);
                        x[i] = _mm256_xor_si256(x[i], _mm256_slli_epi64::<$shift>(t));
                    }
                };
            }
            round!(8, 0x00ff_00ff_00ff_00ff, 1);
            round!(16, 0x0000_ffff_0000_ffff, 2);
            round!(32, 0x0000_0000_ffff_ffff, 4);
            // Lane k of x[i] is column c + 8k + i, rows r..r + 8.
            for (i, v) in x.iter().enumerate() {
                let mut lanes = [0u64; 4];
                _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, *v);
                for (k, l) in lanes.iter().enumerate() {
                    std::ptr::write_unaligned(dp.add((c + 8 * k + i) * rows + r) as *mut u64, *l);
                }
            }
        }
    }
    for r in 0..rows {
        let cs = if r < r8 { c32 } else { 0 };
        for c in cs..cols {
            *dp.add(c * rows + r) = *sp.add(r * cols + c) ^ xor as i8;
        }
    }
}

/// [`crate::generic::max_pool2d_f32`] with AVX2: in each output row whose windows' rows all lie
/// inside the plane, the outputs whose windows' columns do too, eight at a time (at least eight
/// of them; the last block overlapping the one before) (column stride 1:
/// one load per kernel position; 2: sixteen values split into even and odd; else a gather),
/// `best = max(v, best)` in kernel order from the first position (`vmaxps` returns its second
/// operand unless the first is greater: the definition's choice); every other output by
/// [`crate::generic::max_pool2d_cols`].
///
/// # Safety
/// The CPU must support AVX2 and FMA; `plane` holds `h * w` values, `dst` `oh * ow`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn avx2_max_pool2d_f32(plane: &[f32], g: &crate::generic::Pool2d, dst: &mut [f32]) {
    use crate::generic::max_pool2d_cols;
    // Outputs whose windows lie inside along one axis: o * s >= p and o * s + (k - 1) d - p < n.
    let inside = |k: usize, s: usize, d: usize, p: usize, n: usize, o_n: usize| {
        let lo = p.div_ceil(s.max(1));
        let span = (k - 1) * d;
        let hi = if n + p > span { ((n + p - span - 1) / s.max(1) + 1).min(o_n) } else { 0 };
        (lo.min(o_n), hi.max(lo.min(o_n)))
    };
    let (y0, y1) = inside(g.kh, g.sy, g.dy, g.py, g.h, g.oh);
    let (x0, x1) = inside(g.kw, g.sx, g.dx, g.px, g.w, g.ow);
    if g.kh == 0 || g.kw == 0 || x1 - x0 < 8 {
        return max_pool2d_cols(plane, g, dst, 0..g.oh, 0..g.ow);
    }
    max_pool2d_cols(plane, g, dst, 0..y0, 0..g.ow);
    max_pool2d_cols(plane, g, dst, y1..g.oh, 0..g.ow);
    let p = plane.as_ptr();
    let idx = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(g.sx as i32));
    for oy in y0..y1 {
        max_pool2d_cols(plane, g, dst, oy..oy + 1, 0..x0);
        max_pool2d_cols(plane, g, dst, oy..oy + 1, x1..g.ow);
        // Blocks of eight from x0, the last one ending at x1 (overlapping the one before: the
        // same outputs computed again, the same values).
        for ox in (x0..x1).step_by(8).map(|o| o.min(x1 - 8)) {
            let mut best = _mm256_setzero_ps();
            for ky in 0..g.kh {
                let row = p.add((oy * g.sy + ky * g.dy - g.py) * g.w);
                for kx in 0..g.kw {
                    let off = (oy * g.sy + ky * g.dy - g.py) * g.w + ox * g.sx + kx * g.dx - g.px;
                    let at = row.add(ox * g.sx + kx * g.dx - g.px);
                    let v = match g.sx {
                        1 => _mm256_loadu_ps(at),
                        // (Sixteen values read: the last one may lie past the plane.)
                        2 if off + 16 <= plane.len() => {
                            // The even values of sixteen.
                            even_odd8(_mm256_loadu_ps(at), _mm256_loadu_ps(at.add(8))).0
                        }
                        _ => _mm256_i32gather_ps::<4>(at, idx),
                    };
                    best = if ky == 0 && kx == 0 { v } else { _mm256_max_ps(v, best) };
                }
            }
            _mm256_storeu_ps(dst.as_mut_ptr().add(oy * g.ow + ox), best);
        }
    }
}

/// The even and the odd values of sixteen (`a` then `b`), each in order: per 128-bit lane
/// `[a0 a2 b0 b2 | a4 a6 b4 b6]` (and the odd ones), then the 64-bit pairs put in order. The
/// stride-2 phase split, the stride-2 max pool and the 2 x 2 row-pair pool.
#[inline(always)]
unsafe fn even_odd8(a: __m256, b: __m256) -> (__m256, __m256) {
    let e = _mm256_shuffle_ps::<0b10_00_10_00>(a, b);
    let o = _mm256_shuffle_ps::<0b11_01_11_01>(a, b);
    (
        _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(e))),
        _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(o))),
    )
}

/// [`crate::generic::max_pool_row_pairs`] with AVX2: the first `ow / 8 * 8` outputs of every row
/// (returned), eight per step: each input row's sixteen values split into even and odd lanes,
/// then `best = x00`, `vmaxps(x01, best)`, `vmaxps(x10, best)`, `vmaxps(x11, best)` (`v > best ?
/// v : best`, the definition's order and choice).
///
/// # Safety
/// The CPU must support AVX2 and FMA; `2 ow <= w`, `src` holds `2 w` values per row of `dst`
/// (`dst.len()` a multiple of `ow`).
#[target_feature(enable = "avx2,fma")]
pub unsafe fn avx2_max_pool_row_pairs(src: &[f32], w: usize, ow: usize, dst: &mut [f32]) -> usize {
    let o8 = ow / 8 * 8;
    let rows = dst.len() / ow;
    let split = |p: *const f32| even_odd8(_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)));
    for r in 0..rows {
        let (a, b) = (src.as_ptr().add(2 * r * w), src.as_ptr().add((2 * r + 1) * w));
        let d = dst.as_mut_ptr().add(r * ow);
        for o in (0..o8).step_by(8) {
            let (x00, x01) = split(a.add(2 * o));
            let (x10, x11) = split(b.add(2 * o));
            let best = _mm256_max_ps(x11, _mm256_max_ps(x10, _mm256_max_ps(x01, x00)));
            _mm256_storeu_ps(d.add(o), best);
        }
    }
    o8
}

/// [`crate::generic::avg_pool_row_pairs`] with AVX2: the first `ow / 4 * 4` outputs of every row
/// (returned), four per step: each input row's eight values split into even and odd (one
/// permute), widened to f64, added in the definition's order from -0, divided by 4, rounded once.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `2 ow <= w`, `src` holds `2 w` values per row of `dst`
/// (`dst.len()` a multiple of `ow`).
#[target_feature(enable = "avx2,fma")]
pub unsafe fn avx2_avg_pool_row_pairs(src: &[f32], w: usize, ow: usize, dst: &mut [f32]) -> usize {
    let o4 = ow / 4 * 4;
    let rows = dst.len() / ow;
    let idx = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    let (zero, four) = (_mm256_set1_pd(-0.0), _mm256_set1_pd(4.0));
    for r in 0..rows {
        let (a, b) = (src.as_ptr().add(2 * r * w), src.as_ptr().add((2 * r + 1) * w));
        let d = dst.as_mut_ptr().add(r * ow);
        for o in (0..o4).step_by(4) {
            let x = _mm256_permutevar8x32_ps(_mm256_loadu_ps(a.add(2 * o)), idx);
            let y = _mm256_permutevar8x32_ps(_mm256_loadu_ps(b.add(2 * o)), idx);
            let mut s = _mm256_add_pd(zero, _mm256_cvtps_pd(_mm256_castps256_ps128(x)));
            s = _mm256_add_pd(s, _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(x)));
            s = _mm256_add_pd(s, _mm256_cvtps_pd(_mm256_castps256_ps128(y)));
            s = _mm256_add_pd(s, _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(y)));
            _mm_storeu_ps(d.add(o), _mm256_cvtpd_ps(_mm256_div_pd(s, four)));
        }
    }
    o4
}

/// [`crate::generic::layer_norm_f32`] with AVX2: the partial sums j mod 4 are the four lanes of
/// one vector per row (four rows' chains interleaved), the outputs four lanes at a time; the same
/// f64 operations in the same order as [`crate::generic::layer_norm_rows`]: the same bits.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn avx2_layer_norm_f32(
    v: &[f32],
    (inner, outer): (usize, usize),
    (s, bias): (&[f64], &[f64]),
    eps: f32,
    out: &mut [f32],
) -> (Vec<f64>, Vec<f64>) {
    assert!(v.len() >= inner * outer && out.len() >= inner * outer && s.len() >= inner && bias.len() >= inner);
    let (mut means, mut inv) = (Vec::with_capacity(outer), Vec::with_capacity(outer));
    let mut r = 0;
    while r < outer {
        // Four rows at a time, then one.
        let k = if outer - r >= 4 { 4 } else { 1 };
        let p = |i: usize| v.as_ptr().add((r + i) * inner);
        let (m, var) = if k == 4 {
            norm_stats::<4>([p(0), p(1), p(2), p(3)], inner)
        } else {
            let (m, var) = norm_stats::<1>([p(0)], inner);
            ([m[0]; 4], [var[0]; 4])
        };
        for i in 0..k {
            means.push(m[i]);
            inv.push(1.0 / (var[i] + eps as f64).sqrt());
        }
        r += k;
    }
    let n4 = inner / 4 * 4;
    for (o, (&mean, &ri)) in means.iter().zip(&inv).enumerate() {
        let (x, y) = (v.as_ptr().add(o * inner), out.as_mut_ptr().add(o * inner));
        let (vm, vr) = (_mm256_set1_pd(mean), _mm256_set1_pd(ri));
        for j in (0..n4).step_by(4) {
            let d = _mm256_mul_pd(_mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(x.add(j))), vm), vr);
            let t = _mm256_add_pd(
                _mm256_mul_pd(d, _mm256_loadu_pd(s.as_ptr().add(j))),
                _mm256_loadu_pd(bias.as_ptr().add(j)),
            );
            _mm_storeu_ps(y.add(j), _mm256_cvtpd_ps(t));
        }
        for j in n4..inner {
            *y.add(j) = ((*x.add(j) as f64 - mean) * ri * s[j] + bias[j]) as f32;
        }
    }
    (means, inv)
}

/// The means and variances of `R` rows of `inner` f32 values at `p` (see
/// [`crate::generic::layer_norm_rows`]): the four partial sums of each as one vector's lanes.
#[inline(always)]
unsafe fn norm_stats<const R: usize>(p: [*const f32; R], inner: usize) -> ([f64; R], [f64; R]) {
    let n4 = inner / 4 * 4;
    let fold = |acc: __m256d, tail: &dyn Fn(usize) -> f64| {
        let mut s = [0f64; 4];
        _mm256_storeu_pd(s.as_mut_ptr(), acc);
        for j in n4..inner {
            s[j % 4] += tail(j);
        }
        ((s[0] + s[1]) + (s[2] + s[3])) / inner as f64
    };
    let mut acc = [_mm256_setzero_pd(); R];
    for j in (0..n4).step_by(4) {
        for r in 0..R {
            acc[r] = _mm256_add_pd(acc[r], _mm256_cvtps_pd(_mm_loadu_ps(p[r].add(j))));
        }
    }
    let m: [f64; R] = std::array::from_fn(|r| fold(acc[r], &|j| *p[r].add(j) as f64));
    let mut acc = [_mm256_setzero_pd(); R];
    for j in (0..n4).step_by(4) {
        for r in 0..R {
            let d = _mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(p[r].add(j))), _mm256_set1_pd(m[r]));
            acc[r] = _mm256_add_pd(acc[r], _mm256_mul_pd(d, d));
        }
    }
    let var = std::array::from_fn(|r| {
        fold(acc[r], &|j| {
            let d = *p[r].add(j) as f64 - m[r];
            d * d
        })
    });
    (m, var)
}

/// `softmax_rows` (`log_softmax_rows` with `log`) with the maximum, exponentials and division (or
/// the subtractions) four or eight lanes at a time; the four partial sums are the four lanes of
/// one vector (element j into lane j mod 4).
///
/// # Safety
/// The CPU must support AVX2 and FMA; `x.len() == out.len()`, `dim > 0`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn avx2_softmax_rows(x: &[f32], dim: usize, out: &mut [f32], log: bool) {
    softmax_rows_impl::<Avx2>(x, dim, out, log)
}

/// The loop of the screened f32 maps on four f64 lanes ([`avx2_exp_f32`], [`avx2_log_f32`]): `K`
/// vectors per step through `est` (each vector's f64 results and, as all-ones lanes, those its
/// range allows; all `K` at once, so it can interleave their chains), stored rounded to f32 where the screen ([`far_from_halfway4`]) takes every lane
/// of the step, else the step by `exact` (the definition); the last values by `exact`.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn screened_map4<const K: usize>(
    x: &[f32],
    out: &mut [f32],
    est: impl Fn([__m256d; K]) -> [(__m256d, __m256d); K],
    exact: impl Fn(&[f32], &mut [f32]),
) {
    let n = x.len();
    let mut i = 0;
    while i + 4 * K <= n {
        let mut sure = true;
        let v = std::array::from_fn(|j| _mm256_cvtps_pd(_mm_loadu_ps(x.as_ptr().add(i + 4 * j))));
        let y: [__m128; K] = est(v).map(|(y, ok)| {
            sure &= _mm256_movemask_pd(_mm256_and_pd(ok, _mm256_castsi256_pd(far_from_halfway4(y)))) == 0xf;
            _mm256_cvtpd_ps(y)
        });
        if sure {
            for (j, y) in y.iter().enumerate() {
                _mm_storeu_ps(out.as_mut_ptr().add(i + 4 * j), *y);
            }
        } else {
            exact(&x[i..i + 4 * K], &mut out[i..i + 4 * K]);
        }
        i += 4 * K;
    }
    exact(&x[i..], &mut out[i..]);
}

/// [`crate::generic::exp_f32`] on four f64 lanes, eight vectors per step ([`screened_map4`]): the
/// degree-10 estimate `generic::exp_taylor10` per lane ([`exp_taylor4xk`]), within 2^-41 of `e^x`
/// as the screen's margin needs (`generic::SCREEN_MARGIN`).
///
/// # Safety
/// The CPU must support AVX2 and FMA; `x.len() == out.len()`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn avx2_exp_f32(x: &[f32], out: &mut [f32]) {
    use crate::generic::{EXP_SCREEN_HI, EXP_SCREEN_LO};
    let (lo, hi) = (_mm256_set1_pd(EXP_SCREEN_LO), _mm256_set1_pd(EXP_SCREEN_HI));
    let est = |v: [__m256d; 8]| {
        let y = exp_taylor4xk::<8>(v);
        std::array::from_fn(|j| {
            let inside = _mm256_and_pd(_mm256_cmp_pd::<_CMP_GT_OQ>(v[j], lo), _mm256_cmp_pd::<_CMP_LT_OQ>(v[j], hi));
            (y[j], inside)
        })
    };
    screened_map4::<8>(x, out, est, crate::generic::generic_exp_f32)
}

/// [`crate::generic::log_f32`] on four f64 lanes, two vectors per step ([`screened_map4`]): the
/// operations of [`crate::generic::log_screened`] per lane.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `x.len() == out.len()`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn avx2_log_f32(x: &[f32], out: &mut [f32]) {
    use crate::generic::{EXP_LN2_HI, EXP_LN2_LO, LOG_SERIES, LOG_TWO52};
    let one = _mm256_set1_pd(1.0);
    let est = |vs: [__m256d; 2]| {
        std::array::from_fn(|j| {
            let v = vs[j];
            let bits = _mm256_castpd_si256(v);
            let ef = _mm256_or_si256(_mm256_srli_epi64::<52>(bits), _mm256_set1_epi64x(0x4330_0000_0000_0000));
            let e = _mm256_sub_pd(_mm256_castsi256_pd(ef), _mm256_set1_pd(LOG_TWO52 + 1023.0));
            let mb = _mm256_or_si256(
                _mm256_and_si256(bits, _mm256_set1_epi64x((1 << 52) - 1)),
                _mm256_set1_epi64x(1023 << 52),
            );
            let m = _mm256_castsi256_pd(mb);
            let big = _mm256_cmp_pd::<_CMP_GT_OQ>(m, _mm256_set1_pd(std::f64::consts::SQRT_2));
            let m = _mm256_blendv_pd(m, _mm256_mul_pd(m, _mm256_set1_pd(0.5)), big);
            let e = _mm256_blendv_pd(e, _mm256_add_pd(e, one), big);
            let s = _mm256_div_pd(_mm256_sub_pd(m, one), _mm256_add_pd(m, one));
            let z = _mm256_mul_pd(s, s);
            let mut p = _mm256_set1_pd(LOG_SERIES[7]);
            for &c in LOG_SERIES[..7].iter().rev() {
                p = _mm256_fmadd_pd(p, z, _mm256_set1_pd(c));
            }
            let lm = _mm256_mul_pd(_mm256_add_pd(s, s), p);
            let y = _mm256_fmadd_pd(e, _mm256_set1_pd(EXP_LN2_HI), _mm256_fmadd_pd(e, _mm256_set1_pd(EXP_LN2_LO), lm));
            let inside = _mm256_and_pd(
                _mm256_cmp_pd::<_CMP_GT_OQ>(v, _mm256_setzero_pd()),
                _mm256_cmp_pd::<_CMP_LT_OQ>(v, _mm256_set1_pd(f64::INFINITY)),
            );
            (y, inside)
        })
    };
    screened_map4::<2>(x, out, est, crate::generic::generic_log_f32)
}

/// [`crate::generic::softplus_f32`] with AVX2, eight vectors per step ([`screened_map4`]): the
/// estimate [`softplus_est4`], taken where the screen vouches for the f32 rounding of every lane
/// of a step; other steps by the definition's vector form (`common::softplus_f32`, the same bits
/// as `generic::softplus`).
///
/// # Safety
/// The CPU must support AVX2 and FMA; `x.len() == out.len()`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn avx2_softplus_f32(x: &[f32], out: &mut [f32]) {
    screened_map4::<8>(x, out, |v| softplus_est4::<8>(v), |x: &[f32], o: &mut [f32]| softplus_f32(x, o))
}

/// Terms of the atanh series in [`softplus_est4`]'s `ln(1 + t)`: with `s <= 1/3` the first left
/// out is below `9^-13 / 27`, 2^-46 of the sum.
const SOFTPLUS_EST_TERMS: usize = 13;

/// An estimate of softplus on `K` vectors, within 2^-40 of the definition's f64 result (relative)
/// on the lanes it covers, `-87 < x < 87` (a normal f32 result): `t` = e^-|x| by
/// [`exp_taylor4xk`] (within 2^-41), `ln(1 + t)` as the definition forms it (`s = t / (2 + t)`,
/// `2 s P(s^2)`) with the series' first [`SOFTPLUS_EST_TERMS`] terms by fused multiply-adds, then
/// `max(x, 0) +` it. `t`'s relative error carries over to `ln(1 + t)` at most as it is (`(1 + t)
/// ln(1 + t) >= t`), and adding `max(x, 0) >= 0` keeps the relative bound.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn softplus_est4<const K: usize>(v: [__m256d; K]) -> [(__m256d, __m256d); K] {
    use crate::generic::ATANH_SERIES;
    const N: usize = SOFTPLUS_EST_TERMS;
    let (two, zero) = (_mm256_set1_pd(2.0), _mm256_setzero_pd());
    let mut na = v;
    for a in &mut na {
        // -|x|: the sign bit set.
        *a = _mm256_or_pd(*a, _mm256_set1_pd(-0.0));
    }
    let t = exp_taylor4xk::<K>(na);
    let (mut s, mut z) = (t, t);
    for j in 0..K {
        s[j] = _mm256_div_pd(t[j], _mm256_add_pd(two, t[j]));
        z[j] = _mm256_mul_pd(s[j], s[j]);
    }
    let mut p = [_mm256_set1_pd(ATANH_SERIES[N - 1]); K];
    for &c in ATANH_SERIES[..N - 1].iter().rev() {
        for j in 0..K {
            p[j] = _mm256_fmadd_pd(p[j], z[j], _mm256_set1_pd(c));
        }
    }
    let mut out = [(zero, zero); K];
    for j in 0..K {
        let l = _mm256_mul_pd(_mm256_add_pd(s[j], s[j]), p[j]);
        let m = _mm256_and_pd(v[j], _mm256_cmp_pd(v[j], zero, _CMP_GT_OQ));
        let inside = _mm256_and_pd(
            _mm256_cmp_pd(v[j], _mm256_set1_pd(-87.0), _CMP_GT_OQ),
            _mm256_cmp_pd(v[j], _mm256_set1_pd(87.0), _CMP_LT_OQ),
        );
        out[j] = (_mm256_add_pd(m, l), inside);
    }
    out
}

/// [`crate::generic::elu_f32`] with AVX2, eight vectors per step ([`screened_map4`]): `x` itself at
/// or above 0, else `alpha m` with `m` an estimate of `e^x - 1` ([`expm1_est4`], within 2^-41),
/// taken where the screen vouches for the f32 rounding (every lane of the step); other steps by
/// the definition's vector form (`common::elu_f32`, the same bits as `generic::elu`).
///
/// # Safety
/// The CPU must support AVX2 and FMA; `x.len() == out.len()`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn avx2_elu_f32(x: &[f32], alpha: f32, out: &mut [f32]) {
    screened_map4::<8>(x, out, |v| elu_est4::<8>(v, alpha as f64), |x: &[f32], o: &mut [f32]| elu_f32(x, alpha, o))
}

/// [`avx2_elu_f32`]'s estimate on `K` vectors: per vector the values and the lanes it covers
/// ([`elu_takes4`]).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn elu_est4<const K: usize>(v: [__m256d; K], alpha: f64) -> [(__m256d, __m256d); K] {
    let a = _mm256_set1_pd(alpha);
    let mut u = v;
    for u in &mut u {
        *u = _mm256_min_pd(*u, _mm256_setzero_pd());
    }
    let m = expm1_est4::<K>(u);
    let mut out = [(_mm256_setzero_pd(), _mm256_setzero_pd()); K];
    for j in 0..K {
        let neg = _mm256_cmp_pd(v[j], _mm256_setzero_pd(), _CMP_LT_OQ);
        let y = _mm256_blendv_pd(v[j], _mm256_mul_pd(a, m[j]), neg);
        out[j] = (y, elu_takes4(v[j], y));
    }
    out
}

/// The lanes [`avx2_elu_f32`]'s estimate covers: `x >= 0` (the value itself), and `-700 < x < 0`
/// where `|y|` is at least 2^-125 (an f32 result that is normal: the screen reads the bits f32
/// rounding drops at that place). NaN is not covered.
#[inline(always)]
unsafe fn elu_takes4(v: __m256d, y: __m256d) -> __m256d {
    let ay = _mm256_andnot_pd(_mm256_set1_pd(-0.0), y);
    let normal = _mm256_or_pd(
        _mm256_cmp_pd(ay, _mm256_set1_pd(f64::from_bits(0x3820_0000_0000_0000)), _CMP_GE_OQ),
        _mm256_cmp_pd(ay, _mm256_setzero_pd(), _CMP_EQ_OQ),
    );
    let pos = _mm256_cmp_pd(v, _mm256_setzero_pd(), _CMP_GE_OQ);
    let inside = _mm256_and_pd(_mm256_cmp_pd(v, _mm256_set1_pd(-700.0), _CMP_GT_OQ), normal);
    _mm256_or_pd(pos, inside)
}

/// `1 / k!` for k = 0..=13: [`expm1_est4`]'s Taylor polynomial.
pub(crate) const EXPM1_TAYLOR13: [f64; 14] = {
    let mut c = [1f64; 14];
    let mut k = 1;
    while k < 14 {
        c[k] = c[k - 1] / k as f64;
        k += 1;
    }
    c
};

/// An estimate of `e^u - 1` for `-700 < u <= 0` on `K` vectors, within 2^-41 of it: with `u = n
/// ln 2 + r` (`|r| <= ln 2 / 2`, the split product exact as in [`exp_taylor4xk`]), `e^r - 1` by
/// its Taylor polynomial without the constant term (`r (1 + r (1/2 + r (1/6 + ...)))` to degree
/// 13: truncation below 0.35^13 / 14! = 1.1e-17 of `r`, no cancellation), then `2^n (e^r - 1) +
/// (2^n - 1)` in one fused multiply-add (`2^n - 1` exact; where n is 0 that is `e^r - 1` itself,
/// where n is minus one the two terms cancel by at most a factor 1.7, below that not at all).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn expm1_est4<const K: usize>(u: [__m256d; K]) -> [__m256d; K] {
    let (mut t, mut r) = (u, u);
    let mut p = [_mm256_set1_pd(EXPM1_TAYLOR13[13]); K];
    for i in 0..K {
        (t[i], r[i]) = exp_split4(u[i]);
    }
    for &c in EXPM1_TAYLOR13[1..13].iter().rev() {
        for i in 0..K {
            p[i] = _mm256_fmadd_pd(p[i], r[i], _mm256_set1_pd(c));
        }
    }
    let mut out = [_mm256_setzero_pd(); K];
    for i in 0..K {
        let s = pow2_of4(t[i]);
        let em1 = _mm256_mul_pd(r[i], p[i]);
        out[i] = _mm256_fmadd_pd(s, em1, _mm256_sub_pd(s, _mm256_set1_pd(1.0)));
    }
    out
}

/// [`crate::generic::hard_swish_f32`] with AVX2: four values per step in f64.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `x.len() == out.len()`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn avx2_hard_swish_f32(x: &[f32], out: &mut [f32]) {
    let (half, zero, one) = (_mm256_set1_pd(0.5), _mm256_setzero_pd(), _mm256_set1_pd(1.0));
    let sixth = _mm256_set1_pd(1.0 / 6.0);
    let n = x.len();
    let mut i = 0;
    while i + 4 <= n {
        let v = _mm256_cvtps_pd(_mm_loadu_ps(x.as_ptr().add(i)));
        // x / 6 as x * (1/6): see `generic::hard_swish_f32`.
        let t = _mm256_add_pd(_mm256_mul_pd(v, sixth), half);
        // clamp: below 0 -> 0, above 1 -> 1 (ordered comparisons: NaN stays).
        let t = _mm256_blendv_pd(t, zero, _mm256_cmp_pd(t, zero, _CMP_LT_OQ));
        let t = _mm256_blendv_pd(t, one, _mm256_cmp_pd(t, one, _CMP_GT_OQ));
        _mm_storeu_ps(out.as_mut_ptr().add(i), _mm256_cvtpd_ps(_mm256_mul_pd(v, t)));
        i += 4;
    }
    for j in i..n {
        out[j] = crate::generic::hard_swish(x[j] as f64) as f32;
    }
}

/// [`crate::generic::tanh_f32`] with AVX2. (A screened estimate through [`expm1_est4`] and
/// [`recip4`] measured no faster than these exact operations: 2.73 vs 2.81 ns a value.)
///
/// # Safety
/// The CPU must support AVX2 and FMA; `x.len() == out.len()`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn avx2_tanh_f32(x: &[f32], out: &mut [f32]) {
    tanh_f32(x, out)
}

/// [`crate::generic::sigmoid_f32`] with AVX2.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `x.len() == out.len()`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn avx2_sigmoid_f32(x: &[f32], out: &mut [f32]) {
    sigmoid_f32(x, out)
}

/// [`channel_block`] for groups of a multiple of eight quads (32 values) that lie within one run
/// (the run a multiple of the group: a convolution's per-tap scales, or a row): each eight quads'
/// i16 sums are widened (`vpmaddwd`) and added in int32, a group's quads run without a run
/// check, and the group's exact sum goes straight into its float update. Same arithmetic, so the
/// same bits.
#[inline(always)]
pub(crate) unsafe fn channel_block_short<const NP: usize, const J: usize, X: LaneInput>(
    w: &PackedQ4,
    t: &ChannelTiles,
    at: (usize, usize),
    xs: [X; NP],
) -> [[__m256; J]; NP] {
    // Groups of 32 on their own instance: one block of eight quads, its count known.
    if w.group == 32 {
        block_short::<NP, J, X, true>(w, t, at, xs)
    } else {
        block_short::<NP, J, X, false>(w, t, at, xs)
    }
}

#[inline(always)]
unsafe fn block_short<const NP: usize, const J: usize, X: LaneInput, const G32: bool>(
    w: &PackedQ4,
    t: &ChannelTiles,
    (cb, j0): (usize, usize),
    xs: [X; NP],
) -> [[__m256; J]; NP] {
    let groups = w.groups();
    const QUADS: usize = 8;
    let subs = if G32 { 1 } else { w.group / (4 * QUADS) };
    debug_assert!(
        w.group.is_multiple_of(4 * QUADS) && (xs[0].run() == usize::MAX || xs[0].run().is_multiple_of(w.group))
    );
    let ones = _mm256_set1_epi16(1);
    let flip = _mm256_set1_epi8(-128i8);
    let zc: [__m256i; NP] = std::array::from_fn(|c| _mm256_set1_epi32(128 + xs[c].zero()));
    let same_zero = xs.iter().all(|x| x.zero() == xs[0].zero());
    let mut accf = [[_mm256_setzero_ps(); J]; NP];
    let mut walk = (0usize, 0usize);
    for g in 0..groups {
        let xp = short_group_inputs(&xs, w.group, &mut walk);
        let base = t.data.as_ptr().add((cb * groups + g) * subs * QUADS * 128);
        let mut acc = [[_mm256_setzero_si256(); J]; NP];
        for s in 0..subs {
            let mut acc16 = [[_mm256_setzero_si256(); J]; NP];
            for quad in 0..QUADS {
                let wp = base.add((s * QUADS + quad) * 128 + 32 * j0);
                let wv: [__m256i; J] = std::array::from_fn(|j| _mm256_loadu_si256(wp.add(32 * j) as *const __m256i));
                for c in 0..NP {
                    let x4 = std::ptr::read_unaligned(xp[c].add(4 * (s * QUADS + quad)) as *const i32);
                    let xb =
                        if X::FLIPPED { _mm256_set1_epi32(x4) } else { _mm256_xor_si256(_mm256_set1_epi32(x4), flip) };
                    for j in 0..J {
                        acc16[c][j] = _mm256_add_epi16(acc16[c][j], _mm256_maddubs_epi16(xb, wv[j]));
                    }
                }
            }
            for c in 0..NP {
                for j in 0..J {
                    acc[c][j] = _mm256_add_epi32(acc[c][j], _mm256_madd_epi16(acc16[c][j], ones));
                }
            }
        }
        let at = (cb * groups + g) * 32 + 8 * j0;
        for j in 0..J {
            let ws = _mm256_loadu_si256(t.sums.as_ptr().add(at + 8 * j) as *const __m256i);
            let sc = _mm256_loadu_ps(t.scales.as_ptr().add(at + 8 * j));
            let zw0 = _mm256_mullo_epi32(zc[0], ws);
            for c in 0..NP {
                let zw = if same_zero { zw0 } else { _mm256_mullo_epi32(zc[c], ws) };
                let v = _mm256_sub_epi32(acc[c][j], zw);
                // The epilogue's order: product rounded, then added.
                accf[c][j] = _mm256_add_ps(accf[c][j], _mm256_mul_ps(_mm256_cvtepi32_ps(v), sc));
            }
        }
    }
    accf
}

/// W4A8 of rows `rows` of `w` (start a multiple of 32) on a batch of inputs (`QRow`s, or
/// convolution windows read in place: `QWindow`s) with the channels in vector lanes; output
/// `(c, r)` goes to `y[c * cs + (r - rows.start) * rs]`. Equal bit for bit to
/// `generic_q4q8_row`.
///
/// # Safety
/// The CPU must support AVX2 and FMA; every input holds `w.k_pad` values (a window: `w.k_pad /
/// run` offsets, each at most `image.len() - run`, `run` a multiple of four that divides
/// `w.group` or is a multiple of it).
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn avx2_channels<X: LaneInput>(
    w: &PackedQ4,
    xs: &[X],
    bias: Option<&[f32]>,
    y: &mut [f32],
    strides: (usize, usize),
    rows: std::ops::Range<usize>,
) {
    channels_impl::<X, Avx2>(w, xs, bias, y, strides, rows)
}

/// `|x|` on eight lanes (the sign bit cleared).
#[inline(always)]
unsafe fn abs8(x: __m256) -> __m256 {
    _mm256_andnot_ps(_mm256_set1_ps(-0.0), x)
}

/// The FakeQuant `(scale, zero, lo, hi)` of `op`'s outputs for the `8 K` values at `v[at..]`, per
/// vector from `(q, b, ok)` (an estimate of each output's quotient by the scale, a bound on its
/// distance from the definition's quotient, the lanes where the estimate may be taken, as a
/// movemask): `avx512::store_levels16`'s test and output on eight lanes. With `A = lo - zero`
/// and `B = hi - zero`, `q` is clamped to `[A - 1/4, B + 1/4]` and rounded to `k`; where every
/// lane is `ok` and `|q_c - k| + b < 1/2`, `k` is the definition's level less the zero point, and
/// the output is `(k + 0) * scale` (the FakeQuant's `(level - zero) * scale`, `-0` made `+0`).
/// NaN lanes (`vmaxps` / `vminps` keep their second operand, `q`, when it is NaN) and infinite
/// bounds fail the test; such a vector goes through the definition value by value.
#[inline(always)]
unsafe fn store_levels8<const K: usize>(
    v: &mut [f32],
    at: usize,
    est: [(__m256, __m256, i32); K],
    op: crate::generic::Post,
    (scale, zero, lo, hi): (f32, f32, f32, f32),
) {
    let (a, b) = (_mm256_set1_ps(lo - zero - 0.25), _mm256_set1_ps(hi - zero + 0.25));
    let mut outs = [(_mm256_setzero_ps(), false); K];
    for (o, &(q, bound, ok)) in outs.iter_mut().zip(&est) {
        let qc = _mm256_min_ps(b, _mm256_max_ps(a, q));
        let k = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(qc);
        let off = _mm256_add_ps(abs8(_mm256_sub_ps(qc, k)), bound);
        let near = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_LT_OQ>(off, _mm256_set1_ps(0.5)));
        *o = (_mm256_mul_ps(_mm256_add_ps(k, _mm256_setzero_ps()), _mm256_set1_ps(scale)), ok & near == 0xff);
    }
    for (j, &(y, sure)) in outs.iter().enumerate() {
        let at = at + 8 * j;
        if sure {
            _mm256_storeu_ps(v.as_mut_ptr().add(at), y);
        } else {
            definition_levels(&mut v[at..at + 8], op, (scale, zero, lo, hi));
        }
    }
}

/// SiLU then a FakeQuant in place over whole vectors of `v`, through the quantized level:
/// `avx512_silu_fake_quant`'s estimate and test on eight lanes. Per lane `e = e^-x` in f32 (the
/// same range reduction and degree-6 Taylor polynomial; `2^k` made from its exponent bits, `k` an
/// integer in `[-116, 116]` where the estimate is taken, so `p 2^k` is exact as `vscalefps`'s),
/// `s~ = 1 / (1 + e)` by a correctly rounded division (within `2^-24`, closer than the AVX-512
/// form's reciprocal estimate and Newton step, `2^-23.5`), `q~ = x s~ fl(1 / scale)`: within about
/// `2^-20.5` of the exact quotient, so the same bound `|q~| 2^-18 + 2^-100` holds with over four
/// times the room. A lane with `|x| >= 80` or NaN sends its vector to the definition. Returns how
/// many values were done (a multiple of 32; the caller finishes the rest); none unless the
/// scale's reciprocal is normal and the levels are integers.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn avx2_silu_fake_quant(v: &mut [f32], q4: (f32, f32, f32, f32)) -> usize {
    level_steps(v.len(), 64, q4, |i, eight, rcp| {
        if eight {
            let x: [__m256; 8] = std::array::from_fn(|j| _mm256_loadu_ps(v.as_ptr().add(i + 8 * j)));
            store_levels8(v, i, silu_est8(x, rcp), crate::generic::Post::Silu, q4)
        } else {
            let x: [__m256; 4] = std::array::from_fn(|j| _mm256_loadu_ps(v.as_ptr().add(i + 8 * j)));
            store_levels8(v, i, silu_est8(x, rcp), crate::generic::Post::Silu, q4)
        }
    })
}

/// [`avx2_silu_fake_quant`]'s estimates `(q, b, ok)` of `K` vectors `x`, `rcp` the scale's
/// reciprocal.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn silu_est8<const K: usize>(x: [__m256; K], rcp: f32) -> [(__m256, __m256, i32); K] {
    let rs = _mm256_set1_ps(rcp);
    use super::common::exp_neg_f32::{LN2_HI, LN2_LO, LOG2E, MAGIC, TAYLOR};
    let one = _mm256_set1_ps(1.0);
    // k = -round(x log2 e), r = x + k ln 2 in [-ln 2 / 2, ln 2 / 2]: e^-x = 2^k e^-r.
    let t = x.map(|x| _mm256_fmadd_ps(x, _mm256_set1_ps(-LOG2E), _mm256_set1_ps(MAGIC)));
    let k = t.map(|t| _mm256_sub_ps(t, _mm256_set1_ps(MAGIC)));
    let r: [__m256; K] = std::array::from_fn(|j| {
        let r = _mm256_fmadd_ps(k[j], _mm256_set1_ps(LN2_HI), x[j]);
        _mm256_fmadd_ps(k[j], _mm256_set1_ps(LN2_LO), r)
    });
    let mut p = [_mm256_set1_ps(TAYLOR[0]); K];
    for c in &TAYLOR[1..] {
        for j in 0..K {
            p[j] = _mm256_fmadd_ps(p[j], r[j], _mm256_set1_ps(*c));
        }
    }
    std::array::from_fn(|j| {
        // 2^k from its exponent bits (k an integer-valued float; garbage only on lanes not taken).
        let two_k = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(k[j]),
            _mm256_set1_epi32(127),
        )));
        let e = _mm256_mul_ps(p[j], two_k);
        let sig = _mm256_div_ps(one, _mm256_add_ps(one, e));
        let q = _mm256_mul_ps(_mm256_mul_ps(x[j], sig), rs);
        let b = _mm256_fmadd_ps(abs8(q), _mm256_set1_ps(1.0 / 262_144.0), _mm256_set1_ps(1e-30));
        let ok = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_LT_OQ>(abs8(x[j]), _mm256_set1_ps(80.0)));
        (q, b, ok)
    })
}

/// HardSwish then a FakeQuant in place over whole vectors of `v`, through the quantized level:
/// `avx512_hard_swish_fake_quant`'s estimate `q~ = x t~ fl(1 / scale)`, `t~ = clamp(fma(x,
/// fl(1/6), 1/2), 0, 1)`, and its bound `|x| fl(1 / scale) 2^-22 + |q~| 2^-20 + 2^-100`, on eight
/// lanes ([`store_levels8`]'s test). Returns how many values were done (a multiple of 32); none
/// unless the scale's reciprocal is normal and the levels are integers.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn avx2_hard_swish_fake_quant(v: &mut [f32], q4: (f32, f32, f32, f32)) -> usize {
    level_steps(v.len(), 64, q4, |i, eight, rcp| {
        if eight {
            let x: [__m256; 8] = std::array::from_fn(|j| _mm256_loadu_ps(v.as_ptr().add(i + 8 * j)));
            store_levels8(v, i, hard_swish_est8(x, rcp), crate::generic::Post::HardSwish, q4)
        } else {
            let x: [__m256; 4] = std::array::from_fn(|j| _mm256_loadu_ps(v.as_ptr().add(i + 8 * j)));
            store_levels8(v, i, hard_swish_est8(x, rcp), crate::generic::Post::HardSwish, q4)
        }
    })
}

/// [`avx2_hard_swish_fake_quant`]'s estimates `(q, b, ok)` of `K` vectors `x`.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn hard_swish_est8<const K: usize>(x: [__m256; K], rcp: f32) -> [(__m256, __m256, i32); K] {
    let rs = _mm256_set1_ps(rcp);
    let xbound = _mm256_set1_ps(rcp * (1.0 / 4_194_304.0));
    let (sixth, half, one, zero_v) =
        (_mm256_set1_ps(1.0 / 6.0), _mm256_set1_ps(0.5), _mm256_set1_ps(1.0), _mm256_setzero_ps());
    std::array::from_fn(|j| {
        let x = x[j];
        let t = _mm256_min_ps(one, _mm256_max_ps(zero_v, _mm256_fmadd_ps(x, sixth, half)));
        let q = _mm256_mul_ps(_mm256_mul_ps(x, t), rs);
        let b = _mm256_fmadd_ps(
            abs8(x),
            xbound,
            _mm256_fmadd_ps(abs8(q), _mm256_set1_ps(1.0 / 1_048_576.0), _mm256_set1_ps(1e-30)),
        );
        // An infinite or NaN input makes the bound infinite or NaN, which fails the test.
        (q, b, 0xff)
    })
}

/// W4A8 of rows `rows_in` of `w` (start a multiple of 32) on a few rows (`QRow`s) with the
/// channels in vector lanes and the weights read as half bytes ([`crate::packed::NibbleTiles`]:
/// half the bytes of [`ChannelTiles`], the traffic that bounds a batch-1 layer): per quad two
/// 32-byte loads hold 32 channels' four weights `q + 8` (channels 0-7 and 8-15 in the low
/// nibbles, 16-23 and 24-31 in the high), unpacked by a mask and a shift into four unsigned
/// vectors for `vpmaddubsw` against the row's four bytes broadcast (signed: no sign flip). i16
/// sums over eight quads (each pair at most 2 * 15 * 128, so eight fit), widened and added in
/// int32 per group; the group's exact `sum (x - zero) q` is that sum less `8 sum x` (the row's
/// group sum) and `zero sum q`, then the shared float epilogue in its order, so every output is
/// `generic_q4q8_row`'s bit for bit. Two rows per pass over a block (sharing each quad's
/// unpacked weights), the last alone; output `(c, r)` goes to `y[c * cs + (r - rows_in.start) *
/// rs]`.
///
/// # Safety
/// The CPU must support AVX2 and FMA; each row's `q` holds `w.k_pad` values and its `sums`
/// `w.groups()`; `w.group` is at most [`crate::NIBBLE_LANES_MAX_GROUP`]; `y` holds every output
/// index of these rows and inputs.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn avx2_nibble_rows(
    w: &PackedQ4,
    xs: &[QRow],
    bias: Option<&[f32]>,
    y: &mut [f32],
    (cs, rs): (usize, usize),
    rows_in: std::ops::Range<usize>,
) {
    debug_assert!(rows_in.start.is_multiple_of(32) && rows_in.end <= w.n);
    let t = w.nibble_tiles();
    let r0 = rows_in.start;
    let mut b = [0f32; 32];
    for cb in r0 / 32..rows_in.end.div_ceil(32) {
        let rows = (rows_in.end - 32 * cb).min(32);
        block_bias(bias, (cb, rows), &mut b);
        let mut c = 0;
        while c < xs.len() {
            // Two rows per pass share each quad's unpacked weights; the last alone.
            let (outs, np): ([[f32; 32]; 2], usize) = if c + 2 <= xs.len() {
                (nibble_block::<2>(w, t, cb, [xs[c], xs[c + 1]], &b), 2)
            } else {
                let [o] = nibble_block::<1>(w, t, cb, [xs[c]], &b);
                ([o, [0f32; 32]], 1)
            };
            for (i, out) in outs[..np].iter().enumerate() {
                let at = (c + i) * cs + (32 * cb - r0) * rs;
                if rs == 1 {
                    y[at..at + rows].copy_from_slice(&out[..rows]);
                } else {
                    for (l, &v) in out[..rows].iter().enumerate() {
                        y[at + l * rs] = v;
                    }
                }
            }
            c += np;
        }
    }
}

/// [`avx2_nibble_rows`] on block `cb` (32 channels) for `NP` rows: each row's 32 outputs
/// (scaled, plus `b`, the block's bias).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn nibble_block<const NP: usize>(
    w: &PackedQ4,
    t: &crate::packed::NibbleTiles,
    cb: usize,
    xs: [QRow; NP],
    b: &[f32; 32],
) -> [[f32; 32]; NP] {
    let (groups, quads) = (w.groups(), w.group / 4);
    let m4 = _mm256_set1_epi8(0x0f);
    let ones = _mm256_set1_epi16(1);
    let mut accf = [[_mm256_setzero_ps(); 4]; NP];
    for g in 0..groups {
        let base = t.data.as_ptr().add((cb * groups + g) * quads * 64);
        let xp: [*const i8; NP] = std::array::from_fn(|c| xs[c].q.as_ptr().add(g * w.group));
        let mut acc = [[_mm256_setzero_si256(); 4]; NP];
        for s in 0..quads / 8 {
            let mut a16 = [[_mm256_setzero_si256(); 4]; NP];
            for quad in 8 * s..8 * s + 8 {
                let pa = _mm256_loadu_si256(base.add(quad * 64) as *const __m256i);
                let pb = _mm256_loadu_si256(base.add(quad * 64 + 32) as *const __m256i);
                // Channels 0-7, 8-15, 16-23, 24-31.
                let wv = [
                    _mm256_and_si256(pa, m4),
                    _mm256_and_si256(pb, m4),
                    _mm256_and_si256(_mm256_srli_epi16::<4>(pa), m4),
                    _mm256_and_si256(_mm256_srli_epi16::<4>(pb), m4),
                ];
                for c in 0..NP {
                    let xb = _mm256_set1_epi32(std::ptr::read_unaligned(xp[c].add(4 * quad) as *const i32));
                    for j in 0..4 {
                        a16[c][j] = _mm256_add_epi16(a16[c][j], _mm256_maddubs_epi16(wv[j], xb));
                    }
                }
            }
            for c in 0..NP {
                for j in 0..4 {
                    acc[c][j] = _mm256_add_epi32(acc[c][j], _mm256_madd_epi16(a16[c][j], ones));
                }
            }
        }
        let at = (cb * groups + g) * 32;
        for j in 0..4 {
            let ws = _mm256_loadu_si256(t.sums.as_ptr().add(at + 8 * j) as *const __m256i);
            let sc = _mm256_loadu_ps(t.scales.as_ptr().add(at + 8 * j));
            for c in 0..NP {
                // sum (q + 8) x - 8 sum x - zero sum q = sum (x - zero) q.
                let corr = _mm256_set1_epi32(8 * *xs[c].sums.get_unchecked(g));
                let zw = _mm256_mullo_epi32(_mm256_set1_epi32(xs[c].zero), ws);
                let v = _mm256_sub_epi32(_mm256_sub_epi32(acc[c][j], corr), zw);
                // The epilogue's order: product rounded, then added.
                accf[c][j] = _mm256_add_ps(accf[c][j], _mm256_mul_ps(_mm256_cvtepi32_ps(v), sc));
            }
        }
    }
    std::array::from_fn(|c| {
        let mut out = [0f32; 32];
        let scale = _mm256_set1_ps(xs[c].scale);
        for (j, a) in accf[c].iter().enumerate() {
            let v = _mm256_add_ps(_mm256_mul_ps(*a, scale), _mm256_loadu_ps(b.as_ptr().add(8 * j)));
            _mm256_storeu_ps(out.as_mut_ptr().add(8 * j), v);
        }
        out
    })
}

/// fdlibm's erf on `K` vectors of four f64 lanes (each step over the `K` vectors before the
/// next, so the chains' latencies overlap) where |x| < 1.25 (`avx512::erf8`'s operations on
/// 256-bit registers: the same f64 bits as `libm::erf`), an estimate where 1.25 <= |x| < 6
/// ([`erf_tail4xk`], within 2^-44: the kernels take it where [`far_from_halfway4`] vouches for its
/// f32 rounding), and per vector as bit masks the lanes of the estimate and those left to
/// `libm::erf` (NaN, |x| >= 6).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn erf4_est<const K: usize>(x: [__m256d; K]) -> ([__m256d; K], [i32; K], [i32; K]) {
    use crate::generic::{ERF_EFX8, ERF_ERX, ERF_P, ERF_Q};
    let sign = _mm256_set1_pd(-0.0);
    let mut ax = [_mm256_setzero_pd(); K];
    let mut hi = [_mm256_setzero_pd(); K];
    let mut t = [_mm256_setzero_pd(); K];
    let mut p = [_mm256_setzero_pd(); K];
    let mut q = [_mm256_setzero_pd(); K];
    // (Loops, not `array::from_fn`: its closures were compiled apart, without this function's
    // target features, and every intrinsic in them became a call.)
    for i in 0..K {
        ax[i] = _mm256_andnot_pd(sign, x[i]);
        hi[i] = _mm256_cmp_pd(ax[i], _mm256_set1_pd(0.84375), _CMP_GE_OQ);
        t[i] = _mm256_blendv_pd(_mm256_mul_pd(x[i], x[i]), _mm256_sub_pd(ax[i], _mm256_set1_pd(1.0)), hi[i]);
        p[i] = _mm256_blendv_pd(_mm256_set1_pd(ERF_P[0][6]), _mm256_set1_pd(ERF_P[1][6]), hi[i]);
        q[i] = _mm256_blendv_pd(_mm256_set1_pd(ERF_Q[0][6]), _mm256_set1_pd(ERF_Q[1][6]), hi[i]);
    }
    for k in (0..6).rev() {
        for i in 0..K {
            let cp = _mm256_blendv_pd(_mm256_set1_pd(ERF_P[0][k]), _mm256_set1_pd(ERF_P[1][k]), hi[i]);
            let cq = _mm256_blendv_pd(_mm256_set1_pd(ERF_Q[0][k]), _mm256_set1_pd(ERF_Q[1][k]), hi[i]);
            p[i] = _mm256_add_pd(cp, _mm256_mul_pd(t[i], p[i]));
            q[i] = _mm256_add_pd(cq, _mm256_mul_pd(t[i], q[i]));
        }
    }
    let mut e = [_mm256_setzero_pd(); K];
    let mut tails = [0i32; K];
    let mut rests = [0i32; K];
    let mut any_tail = false;
    for i in 0..K {
        let (x, ax) = (x[i], ax[i]);
        let r = _mm256_div_pd(p[i], q[i]);
        let low = _mm256_add_pd(x, _mm256_mul_pd(x, r));
        let y = _mm256_sub_pd(_mm256_set1_pd(1.0), _mm256_sub_pd(_mm256_set1_pd(1.0 - ERF_ERX), r));
        // -y where x's sign bit is set (y is positive).
        let y = _mm256_or_pd(y, _mm256_and_pd(x, sign));
        let tiny = _mm256_mul_pd(
            _mm256_set1_pd(0.125),
            _mm256_add_pd(_mm256_mul_pd(_mm256_set1_pd(8.0), x), _mm256_mul_pd(_mm256_set1_pd(ERF_EFX8), x)),
        );
        let v = _mm256_blendv_pd(low, y, hi[i]);
        e[i] = _mm256_blendv_pd(v, tiny, _mm256_cmp_pd(ax, _mm256_set1_pd(1.0 / (1u64 << 28) as f64), _CMP_LT_OQ));
        let covered = _mm256_movemask_pd(_mm256_cmp_pd(ax, _mm256_set1_pd(1.25), _CMP_LT_OQ));
        let tail = _mm256_movemask_pd(_mm256_cmp_pd(ax, _mm256_set1_pd(6.0), _CMP_LT_OQ)) & !covered;
        (tails[i], rests[i]) = (tail, 0xf & !covered & !tail);
        any_tail |= tail != 0;
    }
    // The tail's estimate for every vector at once where any has a tail lane (its chains
    // interleaved like the rest), blended into the lanes that take it.
    if any_tail {
        let t = erf_tail4xk::<K>(x, ax);
        for i in 0..K {
            if tails[i] != 0 {
                e[i] = _mm256_blendv_pd(e[i], t[i], _mm256_castsi256_pd(lane_mask4(tails[i])));
            }
        }
    }
    (e, tails, rests)
}

/// `1 / q` to within 2^-45 for `|q|` between 2^-100 and 2^100: `vrcpps`'s estimate (within 1.5 x
/// 2^-12 on Intel and AMD alike) refined by two Newton steps in f64 (each squaring the error).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn recip4(q: __m256d) -> __m256d {
    let one = _mm256_set1_pd(1.0);
    let r = _mm256_cvtps_pd(_mm_rcp_ps(_mm256_cvtpd_ps(q)));
    let r = _mm256_fmadd_pd(r, _mm256_fnmadd_pd(q, r, one), r);
    _mm256_fmadd_pd(r, _mm256_fnmadd_pd(q, r, one), r)
}

/// All-ones in the lanes whose bit is set in `bits` (four lanes).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn lane_mask4(bits: i32) -> __m256i {
    let b = _mm256_and_si256(_mm256_set1_epi64x(bits as i64), _mm256_setr_epi64x(1, 2, 4, 8));
    _mm256_cmpeq_epi64(b, _mm256_setr_epi64x(1, 2, 4, 8))
}

/// An estimate of erf(x) for 1.25 <= |x| < 6 (`a = |x|`): fdlibm's erfc form `t = e^(-x^2 -
/// 0.5625 + R(s) / S(s)) / |x|` with the exponential in one piece by [`exp_taylor4xk`] (within
/// 2^-41; fdlibm splits x^2 to keep it exact, whose rounding here, at most 2^-48 of an exponent
/// below 37, adds 2^-48), then `1 - t` with x's sign. `t` is at most erfc(1.25) = 0.077, so the
/// estimate is within 0.077 x 2^-40.9 + 2^-53 of erf, under 2^-44 of a result of at least 0.92:
/// far inside the screen's 2^-36 ([`crate::generic::SCREEN_MARGIN`] units of 2^-52). The
/// kernels take it where [`far_from_halfway4`] vouches for its f32 rounding.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn erf_tail4xk<const K: usize>(x: [__m256d; K], a: [__m256d; K]) -> [__m256d; K] {
    let one = _mm256_set1_pd(1.0);
    let mut far = [one; K];
    let mut s = [one; K];
    for i in 0..K {
        far[i] = _mm256_cmp_pd(a[i], _mm256_set1_pd(1.0 / 0.35), _CMP_GE_OQ);
        s[i] = recip4(_mm256_mul_pd(a[i], a[i]));
    }
    // The coefficient of the form each lane takes.
    #[inline(always)]
    unsafe fn pick<const N: usize>(c: &[[f64; N]; 2], k: usize, far: __m256d) -> __m256d {
        _mm256_blendv_pd(_mm256_set1_pd(c[0][k]), _mm256_set1_pd(c[1][k]), far)
    }
    let mut r = [one; K];
    let mut q = [one; K];
    for i in 0..K {
        r[i] = pick(&ERFC_R, 7, far[i]);
        q[i] = pick(&ERFC_S, 8, far[i]);
    }
    // Horner's steps, R's seven and S's eight, each over the K vectors.
    for k in (0..8).rev() {
        for i in 0..K {
            if k < 7 {
                r[i] = _mm256_fmadd_pd(r[i], s[i], pick(&ERFC_R, k, far[i]));
            }
            q[i] = _mm256_fmadd_pd(q[i], s[i], pick(&ERFC_S, k, far[i]));
        }
    }
    let mut arg = [one; K];
    for i in 0..K {
        arg[i] = _mm256_fnmadd_pd(a[i], a[i], _mm256_fmsub_pd(r[i], recip4(q[i]), _mm256_set1_pd(0.5625)));
    }
    let ex = exp_taylor4xk::<K>(arg);
    let mut y = [one; K];
    for i in 0..K {
        y[i] = _mm256_fnmadd_pd(ex[i], recip4(a[i]), one);
        y[i] = _mm256_or_pd(y[i], _mm256_and_pd(x[i], _mm256_set1_pd(-0.0)));
    }
    y
}

/// `generic::erf_f32` (with `gelu`, `generic::gelu_erf_f32`) on four lanes with AVX2: fdlibm's
/// operations below 1.25 (the same f64 bits), the estimate of [`erf_tail4xk`] to 6 where its f32
/// rounding is certain to be the definition's (for Gelu only where `x / sqrt 2 > -2`, so that
/// `1 + erf` keeps its error relative to itself under 2^-40: erfc(2) = 0.0047), the other lanes and
/// the tail by the definitions.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `x.len() == out.len()`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn avx2_erf_f32(x: &[f32], out: &mut [f32], gelu: bool) {
    let n = x.len() / 4 * 4;
    let definition = if gelu { definition_gelu_erf } else { definition_erf };
    // Four vectors per step (their chains interleaved), then one.
    let mut i = 0;
    while i + 16 <= n {
        erf_step::<4>(&x[i..i + 16], &mut out[i..i + 16], gelu, definition);
        i += 16;
    }
    while i + 4 <= n {
        erf_step::<1>(&x[i..i + 4], &mut out[i..i + 4], gelu, definition);
        i += 4;
    }
    for (o, &v) in out[n..].iter_mut().zip(&x[n..]) {
        *o = definition(v);
    }
}

fn definition_erf(v: f32) -> f32 {
    libm::erf(v as f64) as f32
}

fn definition_gelu_erf(v: f32) -> f32 {
    crate::generic::gelu_erf(v as f64) as f32
}

/// [`avx2_erf_f32`] on `4 K` values (`xs`, `os`).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn erf_step<const K: usize>(xs: &[f32], os: &mut [f32], gelu: bool, definition: fn(f32) -> f32) {
    let v: [__m256d; K] = std::array::from_fn(|j| _mm256_cvtps_pd(_mm_loadu_ps(xs.as_ptr().add(4 * j))));
    // x / sqrt 2 as the definition divides (the lanes below 1.25 are its f64 bits).
    let mut xin = v;
    if gelu {
        for x in &mut xin {
            *x = _mm256_div_pd(*x, _mm256_set1_pd(std::f64::consts::SQRT_2));
        }
    }
    let (e, tail, rest) = erf4_est::<K>(xin);
    for j in 0..K {
        let y = if gelu {
            _mm256_mul_pd(_mm256_mul_pd(_mm256_set1_pd(0.5), v[j]), _mm256_add_pd(_mm256_set1_pd(1.0), e[j]))
        } else {
            e[j]
        };
        let o = &mut os[4 * j..4 * j + 4];
        _mm_storeu_ps(o.as_mut_ptr(), _mm256_cvtpd_ps(y));
        if tail[j] | rest[j] != 0 {
            let mut unsure = rest[j] | (tail[j] & !_mm256_movemask_pd(_mm256_castsi256_pd(far_from_halfway4(y))));
            if gelu {
                unsure |= tail[j] & _mm256_movemask_pd(_mm256_cmp_pd(xin[j], _mm256_set1_pd(-2.0), _CMP_LE_OQ));
            }
            for (l, (o, &v)) in o.iter_mut().zip(&xs[4 * j..4 * j + 4]).enumerate() {
                if unsure >> l & 1 != 0 {
                    *o = definition(v);
                }
            }
        }
    }
}

/// `generic::gelu_tanh_f32` on four lanes with AVX2 (`avx512_gelu_tanh_f32`'s operations and
/// screen), the tail and the unsure lanes by `generic::gelu_tanh`.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `x.len() == out.len()`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn avx2_gelu_tanh_f32(x: &[f32], out: &mut [f32]) {
    use crate::generic::gelu_tanh;
    let c = (2.0 / std::f64::consts::PI).sqrt();
    let (one, sign) = (_mm256_set1_pd(1.0), _mm256_set1_pd(-0.0));
    let n = x.len() / 4 * 4;
    for (xs, os) in x[..n].chunks_exact(4).zip(out[..n].chunks_exact_mut(4)) {
        let v = _mm256_cvtps_pd(_mm_loadu_ps(xs.as_ptr()));
        let x3 = _mm256_mul_pd(_mm256_mul_pd(_mm256_mul_pd(_mm256_set1_pd(0.044715), v), v), v);
        let u = _mm256_mul_pd(_mm256_set1_pd(c), _mm256_add_pd(v, x3));
        let a = _mm256_andnot_pd(sign, u);
        let t = tanh4(u, a, exp_nonpos4(_mm256_mul_pd(a, _mm256_set1_pd(-2.0))));
        let onept = _mm256_add_pd(one, t);
        let g = _mm256_mul_pd(_mm256_mul_pd(_mm256_set1_pd(0.5), v), onept);
        let far = far_from_halfway4(g);
        let ok = _mm256_and_pd(
            _mm256_cmp_pd(onept, _mm256_set1_pd(0.5), _CMP_GE_OQ),
            _mm256_cmp_pd(_mm256_andnot_pd(sign, g), _mm256_set1_pd(f64::from_bits(0x3870_0000_0000_0000)), _CMP_GE_OQ),
        );
        let sure = _mm256_movemask_pd(_mm256_and_pd(_mm256_castsi256_pd(far), ok));
        let y = _mm256_cvtpd_ps(g);
        if sure == 0xf {
            _mm_storeu_ps(os.as_mut_ptr(), y);
        } else {
            let mut ys = [0f32; 4];
            _mm_storeu_ps(ys.as_mut_ptr(), y);
            for (i, o) in os.iter_mut().enumerate() {
                *o = if sure >> i & 1 == 1 { ys[i] } else { gelu_tanh(xs[i] as f64) as f32 };
            }
        }
    }
    for (o, &v) in out[n..].iter_mut().zip(&x[n..]) {
        *o = gelu_tanh(v as f64) as f32;
    }
}

/// [`conv_direct`] on 8-lane vectors: six output channels by up to two vectors of columns
/// (twelve accumulators, two input vectors and a broadcast weight: fifteen of the sixteen
/// registers). Four channels by three vectors (twelve accumulators and three input vectors) left
/// no register for the weight: one accumulator lived on the stack, its FMA chain through a store
/// and a load each tap, and the kernel ran at half speed (`cargo bench --bench stem`, this AVX2
/// EPYC: ResNet-18's 7 x 7 / 2 stem 1062 -> 506 us, MobileNetV2's 3 x 3 / 2 110 -> 71 us).
///
/// # Safety
/// The CPU must support AVX2 and FMA; the buffers as `conv_direct` says.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn avx2_conv_direct(xp: &[f32], w: &[f32], d: DirectConv, bias: Option<&[f32]>, out: &mut [f32]) {
    conv_direct::<__m256, 6, 2>(xp, w, d, bias, out)
}

/// [`crate::dequant::dequant_gemm`] for one row on 8-lane vectors (`dequant_gemv`, four vectors
/// of columns per pass).
///
/// # Safety
/// AVX2 and FMA; `x` holds `w.k` values, `y` `w.n`.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn avx2_dequant_gemv(w: &crate::dequant::DequantRows, x: &[f32], y: &mut [f32]) {
    dequant_gemv::<__m256, 4>(w, x, y)
}

/// [`crate::pointwise_q4q8`] on AVX2 for one image: positions in the eight lanes, each output
/// exactly `generic::generic_q4q8_row` of its position's channels, then the ops `post` (the
/// longest prefix of ops applied in registers, [`crate::generic::post_split`]'s first part) on
/// the way to memory. The input planes (`[w.k][positions]` bytes) are first interleaved four
/// channels per 32-bit word with the sign bits flipped (`x4`: `[k.div_ceil(4)][p_pad]`, `x + 128`
/// as unsigned bytes, 0x80 past the channels and the positions; [`interleave_quads`], the
/// AVX-512 kernel's layout), so one `vpmaddubsw` against a broadcast weight quad
/// ([`PackedQ4::quad_words`]) gives two 16-bit sums of two channels' products for eight
/// positions. Each such sum is at most 2 x 255 x 8 = 4080 in size, so eight quads' add in 16 bits
/// exactly (at most 32 640) before one `vpmaddwd` by ones widens them to int32. Per group: its
/// integer sums less `128 + zero` times the group's weight sum (the flip's 128 and the zero
/// point), converted to f32 (round to nearest, as `as f32`), multiplied by the group's scale and
/// added to the f32 total (separately rounded, as the row's `acc += s as f32 * scale`); then
/// `total * scale + bias` (the bias, else +0.0, added as the row adds it). Four vectors of
/// positions per step share each weight broadcast; the last step takes the one to three vectors
/// left (`p_pad` is `positions` rounded up to 8). Quads past the last channel hold zero weights
/// (K padded to the group): they add nothing, so they are not read.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `planes` holds `w.k * positions` bytes, `y` `w.n *
/// positions` values, `bias` (if any) `w.n`; `x4` has `k.div_ceil(4) * p_pad` words; every op
/// of `post` is applied in registers ([`crate::generic::Post::in_registers`]).
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn avx2_pointwise_q4q8(
    w: &PackedQ4,
    planes: &[i8],
    positions: usize,
    (zero, scale): (i32, f32),
    bias: Option<&[f32]>,
    post: &[crate::generic::Post],
    x4: &mut [u32],
    y: &mut [f32],
) {
    let (live, p_pad) = (w.k.div_ceil(4), positions.next_multiple_of(8));
    assert!(x4.len() >= live * p_pad && planes.len() >= w.k * positions);
    interleave_quads(planes, w.k, positions, p_pad, &mut x4[..live * p_pad]);
    avx2_pointwise_q4q8_quads(w, x4, (positions, p_pad), (zero, scale), bias, post, y)
}

/// [`avx2_pointwise_q4q8`] on input already in its quad words (`x4`, `[k.div_ceil(4)][p_pad]`,
/// as [`interleave_quads`] lays them out, or the depthwise kernel's levels; words past the
/// positions are computed and dropped, whatever they hold).
///
/// # Safety
/// AVX2 and FMA; every op of `post` is applied in registers (the sizes are asserted).
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn avx2_pointwise_q4q8_quads(
    w: &PackedQ4,
    x4: &[u32],
    (positions, p_pad): (usize, usize),
    (zero, scale): (i32, f32),
    bias: Option<&[f32]>,
    post: &[crate::generic::Post],
    y: &mut [f32],
) {
    let live = w.k.div_ceil(4);
    assert!(p_pad.is_multiple_of(8) && p_pad >= positions && x4.len() >= live * p_pad && y.len() >= w.n * positions);
    assert!(bias.is_none_or(|b| b.len() >= w.n) && post.iter().all(|p| p.in_registers()));
    // Up to CHANNEL_LANES_MAX_POSITIONS, the channels in lanes where their blocks of 32 pad the
    // products less than the positions' vectors of eight would.
    if positions <= CHANNEL_LANES_MAX_POSITIONS
        && w.n >= crate::LANES_MIN_CHANNELS
        && w.n.next_multiple_of(32) * positions <= w.n * p_pad
    {
        return pointwise_by_channels(w, x4, (positions, p_pad), (zero, scale), bias, post, y);
    }
    let qw = w.quad_words();
    let kq = w.k_pad / 4;
    let form = crate::generic::PostForm::of(post);
    let pv = PostVec8::new(form);
    for r in 0..w.n {
        let args = PointwiseRow { w, wr: &qw[r * kq..(r + 1) * kq], r, live, p_pad, positions, zero, scale, bias };
        let out = y.as_mut_ptr().add(r * positions);
        crate::generic::by_post_form!(form, pointwise_row(&args, x4, out, (post, &pv)));
    }
}

/// The most positions with which [`avx2_pointwise_q4q8_quads`] takes the output channels in
/// vector lanes ([`pointwise_by_channels`]) rather than the positions: eight lanes of positions
/// leave 7 of 16 empty on a 3 x 3 map, and each output channel's row of weights is walked once
/// per eight positions. Measured on this project's AVX2 host (AMD EPYC, Zen 3), one core, the
/// zoo's 1 x 1 layers (`cargo bench -p sqil-kernels-cpu --bench pointwise`): [576 x 96] on 3 x 3
/// 21.0 -> 7.5 us, [288 x 48] on 6 x 6 13.9 -> 10.5; at 121 positions ([144 x 24] on 11 x 11) the
/// positions' lanes were ahead (9.4 against 13.4 us), and at 36 with 40 channels (8.7 against
/// 9.8 us: the second block of 32 channels mostly empty).
pub(crate) const CHANNEL_LANES_MAX_POSITIONS: usize = 64;

thread_local! {
    /// [`pointwise_by_channels`]'s image, `[p_pad][k_pad]` bytes, and its outputs by position.
    static BY_CHANNELS: std::cell::RefCell<(Vec<i8>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// [`avx2_pointwise_q4q8_quads`] with the output channels in vector lanes: the quad words
/// transposed to one run of `k_pad` bytes per position (sign bits already flipped, as the quads
/// hold them; `0x80`, a zero level, past them), each position's run a row of the channel-lane
/// kernel ([`FlippedRow`], [`avx2_channels`], channel-major outputs), then the `post` ops over the outputs. The same bits: every kernel's
/// output is `generic_q4q8_row`'s, and the ops are the same per value in registers or not.
#[target_feature(enable = "avx2,fma")]
unsafe fn pointwise_by_channels(
    w: &PackedQ4,
    x4: &[u32],
    (positions, p_pad): (usize, usize),
    (zero, scale): (i32, f32),
    bias: Option<&[f32]>,
    post: &[crate::generic::Post],
    y: &mut [f32],
) {
    let (live, kq, n) = (w.k.div_ceil(4), w.k_pad / 4, w.n);
    // The buffers taken from the thread's for the call (the work in this function's body: a
    // closure would not have its target features, and the intrinsics would be calls).
    let (mut image, mut by_position) = BY_CHANNELS.take();
    // Rows for every padded position (the transposes write eight), kept for the first.
    image.resize(p_pad * w.k_pad, 0);
    by_position.resize(positions * n, 0.0);
    let words = image.as_mut_ptr().cast::<u32>();
    // Eight quads of eight positions per register transpose, the last quads one at a time, then
    // the zero levels past them.
    let live8 = live / 8 * 8;
    for p0 in (0..positions).step_by(8) {
        for q0 in (0..live8).step_by(8) {
            let v = crate::generic::transpose8(std::array::from_fn(|i| {
                _mm256_loadu_ps(x4.as_ptr().add((q0 + i) * p_pad + p0).cast())
            }));
            for (j, v) in v.iter().enumerate() {
                _mm256_storeu_ps(words.add((p0 + j) * kq + q0).cast(), *v);
            }
        }
    }
    for p in 0..positions {
        for q in live8..live {
            words.add(p * kq + q).write_unaligned(x4[q * p_pad + p]);
        }
        for q in live..kq {
            words.add(p * kq + q).write_unaligned(0x8080_8080);
        }
    }
    {
        let image = &image[..];
        let rows: [FlippedRow; CHANNEL_LANES_MAX_POSITIONS] = std::array::from_fn(|p| {
            let p = p.min(positions - 1);
            FlippedRow { q: &image[p * w.k_pad..(p + 1) * w.k_pad], zero, scale }
        });
        // Position-major (each position's channels stored a vector at a time), then transposed
        // to channel-major eight positions by eight channels at a time: written channel-major
        // by the kernel, value by value, the stores had cost as much as the products.
        avx2_channels(w, &rows[..positions], bias, &mut by_position, (n, 1), 0..n);
    }
    let (src, dst) = (by_position.as_ptr(), y.as_mut_ptr());
    let (p8, n8) = (positions / 8 * 8, n / 8 * 8);
    for p0 in (0..p8).step_by(8) {
        for c0 in (0..n8).step_by(8) {
            let v = crate::generic::transpose8(std::array::from_fn(|j| _mm256_loadu_ps(src.add((p0 + j) * n + c0))));
            for (j, v) in v.iter().enumerate() {
                _mm256_storeu_ps(dst.add((c0 + j) * positions + p0), *v);
            }
        }
        for c in n8..n {
            for p in p0..p0 + 8 {
                *dst.add(c * positions + p) = *src.add(p * n + c);
            }
        }
    }
    for p in p8..positions {
        for c in 0..n {
            *dst.add(c * positions + p) = *src.add(p * n + c);
        }
    }
    BY_CHANNELS.set((image, by_position));
    crate::generic::post_in_place(&mut y[..w.n * positions], post);
}

/// [`crate::generic::depthwise_conv`]'s outputs (`acc`, `[position][cp]`, as the depthwise lanes
/// kernel leaves them) as the next pointwise convolution's int8 levels, per position eight
/// channels at a time: plus the bias, the `post` ops (those applied in registers, as the
/// depthwise kernel applies them), then the quantizer `(scale, zero, lo, hi)` as
/// [`avx2_quantize_i8`] computes it (the same levels: NaN to 0, the bounds within int8), each
/// level `+ 128` as a byte (the pointwise kernel's unsigned form), byte `c` of position `o` at
/// byte `o * cp + c` of `stage`: `avx512::avx512_depthwise_levels` on eight lanes. Returns
/// whether any of the `channels` values was NaN (the caller then takes the two steps' way).
///
/// # Safety
/// AVX2 and FMA (the sizes are asserted).
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn avx2_depthwise_levels(
    (acc, cp, channels, ol): (&[f32], usize, usize, usize),
    bias: Option<&[f32]>,
    post: &[crate::generic::Post],
    quant: (f32, i32, i32, i32),
    stage: &mut [u32],
) -> bool {
    assert!(cp.is_multiple_of(8) && cp >= channels && acc.len() >= ol * cp && stage.len() * 4 >= ol * cp);
    assert!(bias.is_none_or(|b| b.len() >= channels) && post.iter().all(|p| p.in_registers()));
    let f = crate::generic::PostForm::of(post);
    let a = (acc, (cp, channels, ol), bias, post, quant, stage);
    crate::generic::by_post_form!(f, levels_form(a, f))
}

/// [`avx2_depthwise_levels`] with one epilogue form.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn levels_form<const CHAIN: bool, const CLAMP: bool, const FQ: bool>(
    (acc, (cp, channels, ol), bias, post, (scale, zero, lo, hi), stage): super::common::LevelsArgs,
    form: crate::generic::PostForm,
) -> bool {
    let pv = PostVec8::new(form);
    let q = Quant8::new(scale, zero as f32, lo.max(-128) as f32, hi.min(127) as f32);
    let flip = _mm_set1_epi8(i8::MIN);
    // The levels' bytes 0-3 of each 128-bit lane (after two packs) to the low 8 bytes.
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    let mut nan = _mm256_setzero_ps();
    let mut bv = [0f32; 8];
    for c0 in (0..cp).step_by(8) {
        let cn = channels.saturating_sub(c0).min(8);
        if let Some(b) = bias {
            bv = [0.0; 8];
            bv[..cn].copy_from_slice(&b[c0..c0 + cn]);
        }
        let vb = _mm256_loadu_ps(bv.as_ptr());
        // The lanes that hold channels (a NaN past them is no value's).
        let real = _mm256_cmpgt_epi32(_mm256_set1_epi32(cn as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        let real = _mm256_castsi256_ps(real);
        for o in 0..ol {
            let v = _mm256_loadu_ps(acc.as_ptr().add(o * cp + c0));
            let v = if bias.is_some() { _mm256_add_ps(v, vb) } else { v };
            let v = if CHAIN { crate::generic::post8(v, post) } else { pv.apply::<CLAMP, FQ>(v) };
            let y = level8(v, &q);
            nan = _mm256_or_ps(nan, _mm256_and_ps(real, _mm256_cmp_ps(y, y, _CMP_UNORD_Q)));
            let l = level_i32(y);
            let b = _mm256_packs_epi16(_mm256_packs_epi32(l, l), _mm256_setzero_si256());
            let b = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(b, order));
            _mm_storel_epi64(stage.as_mut_ptr().add((o * cp + c0) / 4).cast(), _mm_xor_si128(b, flip));
        }
    }
    _mm256_movemask_ps(nan) != 0
}

/// The planes `[k][positions]` (bytes) as [`avx2_pointwise_q4q8`]'s quad words: `x4[q * p_pad +
/// p]` holds channels `4q..4q + 4` of position `p`, one byte each with the sign bit flipped
/// (`x + 128` as unsigned), 0x80 (zero) past `k` and past the positions (`x4.len() / p_pad`
/// rows). 32 positions of four channels per step: bytes interleaved by pairs, then by pairs of
/// pairs; the last step's bytes through a stack copy.
///
/// # Safety
/// AVX2; `planes` holds `k * positions` bytes, `p_pad >= positions`, `x4.len()` a multiple of
/// `p_pad` with at least `k.div_ceil(4)` rows.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn interleave_quads(planes: &[i8], k: usize, positions: usize, p_pad: usize, x4: &mut [u32]) {
    let kq = x4.len() / p_pad.max(1);
    assert!(planes.len() >= k * positions && p_pad >= positions && kq * 4 >= k);
    let flip = _mm256_set1_epi8(i8::MIN);
    for q in 0..kq {
        let dst = x4.as_mut_ptr().add(q * p_pad);
        let plane = |c: usize| (c < k).then(|| planes.as_ptr().add(c * positions));
        let ps = [plane(4 * q), plane(4 * q + 1), plane(4 * q + 2), plane(4 * q + 3)];
        let mut o = 0;
        while o < positions {
            let n = (positions - o).min(32);
            let ld = |pl: Option<*const i8>| match pl {
                Some(pl) if n == 32 => _mm256_loadu_si256(pl.add(o).cast()),
                Some(pl) => {
                    let mut t = [0i8; 32];
                    std::ptr::copy_nonoverlapping(pl.add(o), t.as_mut_ptr(), n);
                    _mm256_loadu_si256(t.as_ptr().cast())
                }
                None => _mm256_setzero_si256(),
            };
            let (p0, p1, p2, p3) = (ld(ps[0]), ld(ps[1]), ld(ps[2]), ld(ps[3]));
            let out = quads32(p0, p1, p2, p3);
            // Words past the positions hold 0x80 bytes (zeros); those past p_pad are not stored.
            for (i, v) in out.into_iter().enumerate() {
                let at = o + 8 * i;
                if at + 8 <= p_pad {
                    _mm256_storeu_si256(dst.add(at).cast(), _mm256_xor_si256(v, flip));
                } else if at < p_pad {
                    let mut t = [0u32; 8];
                    _mm256_storeu_si256(t.as_mut_ptr().cast(), _mm256_xor_si256(v, flip));
                    std::ptr::copy_nonoverlapping(t.as_ptr(), dst.add(at), p_pad - at);
                }
            }
            o += 32;
        }
        for at in o.min(p_pad)..p_pad {
            *dst.add(at) = 0x8080_8080;
        }
    }
}

/// One output channel of [`avx2_pointwise_q4q8`]: its weight quads `wr` and what the steps share.
struct PointwiseRow<'a> {
    w: &'a PackedQ4,
    wr: &'a [u32],
    r: usize,
    /// The quads that hold channels.
    live: usize,
    p_pad: usize,
    positions: usize,
    zero: i32,
    scale: f32,
    bias: Option<&'a [f32]>,
}

/// Every position of one output channel ([`avx2_pointwise_q4q8`]): four vectors per step, the
/// last step the one to three left.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn pointwise_row<const CHAIN: bool, const CLAMP: bool, const FQ: bool>(
    a: &PointwiseRow,
    x4: &[u32],
    out: *mut f32,
    post: (&[crate::generic::Post], &PostVec8),
) {
    let mut p0 = 0;
    while p0 + 32 <= a.p_pad {
        pointwise_row_block::<4, CHAIN, CLAMP, FQ>(a, x4, p0, out, post);
        p0 += 32;
    }
    match (a.p_pad - p0) / 8 {
        3 => pointwise_row_block::<3, CHAIN, CLAMP, FQ>(a, x4, p0, out, post),
        2 => pointwise_row_block::<2, CHAIN, CLAMP, FQ>(a, x4, p0, out, post),
        1 => pointwise_row_block::<1, CHAIN, CLAMP, FQ>(a, x4, p0, out, post),
        _ => {}
    }
}

/// `V` vectors of positions from `p0` of one output channel ([`avx2_pointwise_q4q8`]), through the
/// epilogue (`CHAIN`: the ops one by one, [`crate::generic::post8`]; else the form's clamp and
/// FakeQuant as `CLAMP` and `FQ` say) and stored where they are positions (the last vector's
/// lanes past them dropped).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn pointwise_row_block<const V: usize, const CHAIN: bool, const CLAMP: bool, const FQ: bool>(
    a: &PointwiseRow,
    x4: &[u32],
    p0: usize,
    out: *mut f32,
    (post, pv): (&[crate::generic::Post], &PostVec8),
) {
    let (groups, qpg) = (a.w.groups(), a.w.group / 4);
    let ones = _mm256_set1_epi16(1);
    let mut total = [_mm256_setzero_ps(); V];
    for g in 0..groups {
        let mut s = [_mm256_setzero_si256(); V];
        let (mut q, end) = (g * qpg, ((g + 1) * qpg).min(a.live));
        while q < end {
            // Eight quads' 16-bit sums (exact: see avx2_pointwise_q4q8), then widened.
            let stop = (q + 8).min(end);
            let mut h = [_mm256_setzero_si256(); V];
            for q in q..stop {
                let wv = _mm256_set1_epi32(*a.wr.get_unchecked(q) as i32);
                let xs = x4.as_ptr().add(q * a.p_pad + p0);
                for (v, h) in h.iter_mut().enumerate() {
                    *h = _mm256_add_epi16(*h, _mm256_maddubs_epi16(_mm256_loadu_si256(xs.add(8 * v).cast()), wv));
                }
            }
            for (s, h) in s.iter_mut().zip(h) {
                *s = _mm256_add_epi32(*s, _mm256_madd_epi16(h, ones));
            }
            q = stop;
        }
        let corr = _mm256_set1_epi32((128 + a.zero).wrapping_mul(a.w.sums[a.r * groups + g]));
        let sc = _mm256_set1_ps(a.w.scales[a.r * groups + g]);
        for (t, s) in total.iter_mut().zip(s) {
            *t = _mm256_add_ps(*t, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(s, corr)), sc));
        }
    }
    let (xscale, b) = (_mm256_set1_ps(a.scale), _mm256_set1_ps(a.bias.map_or(0.0, |b| b[a.r])));
    for (v, t) in total.iter().enumerate() {
        let yv = _mm256_add_ps(_mm256_mul_ps(*t, xscale), b);
        let yv = if CHAIN { crate::generic::post8(yv, post) } else { pv.apply::<CLAMP, FQ>(yv) };
        let p = p0 + 8 * v;
        if p + 8 <= a.positions {
            _mm256_storeu_ps(out.add(p), yv);
        } else if p < a.positions {
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), yv);
            std::ptr::copy_nonoverlapping(lanes.as_ptr(), out.add(p), a.positions - p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX2 SiLU level kernel's estimate `x sigma~(x)` (with a reciprocal of 1) is within
    /// `2^-20.5` of `x / (1 + e^-x)` (relative, in f64) on every lane it takes, and takes every
    /// lane with `|x| < 80`: one f32 in 997 of each sign up to 80, the bound its level test rests
    /// on with over four times the room (products of subnormal size within their rounding).
    #[test]
    fn silu_estimate_is_within_its_bound() {
        if !(std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")) {
            eprintln!("skipping silu_estimate_is_within_its_bound: no AVX2 and FMA");
            return;
        }
        let top = 80f32.to_bits();
        let xs: Vec<f32> = (0..top)
            .step_by(997)
            .flat_map(|b| [f32::from_bits(b), -f32::from_bits(b)])
            .chain([79.99, -79.99, 30.0, -30.0, 1e-30, -1e-30])
            .collect();
        let mut worst = 0f64;
        for c in xs.chunks_exact(8) {
            // SAFETY: AVX2 and FMA checked above; 8 values.
            let [(q, _, ok)] = unsafe { silu_est8([_mm256_loadu_ps(c.as_ptr())], 1.0) };
            assert_eq!(ok, 0xff, "a lane below 80 not taken: {c:?}");
            let mut got = [0f32; 8];
            // SAFETY: as above; 8 values.
            unsafe { _mm256_storeu_ps(got.as_mut_ptr(), q) };
            for (&x, &g) in c.iter().zip(&got) {
                let x = x as f64;
                let want = x / (1.0 + (-x).exp());
                if want.abs() >= f32::MIN_POSITIVE as f64 {
                    worst = worst.max(((g as f64 - want) / want).abs());
                } else {
                    assert!((g as f64 - want).abs() <= 2f64.powi(-149), "x {x}: {g} against {want}");
                }
            }
        }
        assert!(worst < 2f64.powf(-20.5), "worst relative error 2^{:.2}", worst.log2());
        eprintln!("SiLU estimate (AVX2): worst relative error 2^{:.2} over {} values", worst.log2(), xs.len());
    }

    /// `erf4_est` on a sweep of |x| < 6 (one f32 in 61 of each sign): below 1.25 `libm::erf`'s
    /// f64 bits; from there the estimate, within 2^12 units of the last place of `libm::erf`, so
    /// the screen's margin of 2^16 units holds with sixteen times the room; and the sweep meets
    /// estimates nearly halfway between two f32 that the screen sends to the definition (a margin
    /// of 0 would take some wrongly).
    #[test]
    fn erf_estimate_is_within_the_screen() {
        if !(std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")) {
            eprintln!("skipping erf_estimate_is_within_the_screen: no AVX2 and FMA");
            return;
        }
        let hi = 6f32.to_bits();
        let mut xs: Vec<f64> =
            (0..hi).step_by(61).flat_map(|b| [f32::from_bits(b) as f64, -f32::from_bits(b) as f64]).collect();
        xs.extend([0.0, -0.0, 1.25, -1.25, 0.84375, 1.0 / 0.35, 5.999, 1e-300]);
        xs.truncate(xs.len() / 4 * 4);
        let (mut worst, mut screened, mut tails) = (0u64, 0usize, 0usize);
        for c in xs.chunks_exact(4) {
            // SAFETY: AVX2 and FMA checked above; four values.
            let (got, tail, rest, far) = unsafe {
                let ([y], [tail], [rest]) = erf4_est::<1>([_mm256_loadu_pd(c.as_ptr())]);
                let mut got = [0f64; 4];
                _mm256_storeu_pd(got.as_mut_ptr(), y);
                (got, tail, rest, _mm256_movemask_pd(_mm256_castsi256_pd(far_from_halfway4(y))))
            };
            assert_eq!(rest, 0, "{c:?}: a lane below 6 left to libm");
            for (i, (&x, &g)) in c.iter().zip(&got).enumerate() {
                let want = libm::erf(x);
                if tail >> i & 1 == 0 {
                    assert_eq!(g.to_bits(), want.to_bits(), "erf({x:e}) below 1.25");
                    continue;
                }
                tails += 1;
                worst = worst.max(g.to_bits().abs_diff(want.to_bits()));
                if far >> i & 1 != 0 {
                    assert_eq!((g as f32).to_bits(), (want as f32).to_bits(), "erf({x:e}) screened as sure");
                } else {
                    screened += 1;
                }
            }
        }
        assert!(worst < 1 << 12, "erf estimate {worst} units from libm::erf");
        assert!(crate::generic::SCREEN_MARGIN as u64 >= worst << 4);
        assert!(screened > 0 && screened * 1000 < tails, "{screened} of {tails} screened out");
        eprintln!("erf tail estimate: worst {worst} units, {screened} of {tails} screened out");
    }

    /// An estimate on four lanes (`est`: each value and whether it covers the lane) against the
    /// definition `def` over `xs`: on every lane it covers, within 2^12 units of the definition's
    /// f64 result (the screen's margin of 2^16 holds with sixteen times the room), and where the
    /// screen vouches, the definition's f32; the lanes it leaves must satisfy `may_leave`; and
    /// the screen meets some results nearly halfway, fewer than one in 500.
    fn check_estimate(
        what: &str,
        xs: &[f64],
        est: impl Fn(__m256d) -> (__m256d, __m256d),
        def: impl Fn(f64) -> f64,
        may_leave: impl Fn(f64) -> bool,
    ) {
        let (mut worst, mut screened, mut left, mut covered) = (0u64, 0usize, 0usize, 0usize);
        for c in xs.chunks_exact(4) {
            // SAFETY: the callers checked AVX2 and FMA; four values.
            let (got, takes, far) = unsafe {
                let (y, takes) = est(_mm256_loadu_pd(c.as_ptr()));
                let mut got = [0f64; 4];
                _mm256_storeu_pd(got.as_mut_ptr(), y);
                (got, _mm256_movemask_pd(takes), _mm256_movemask_pd(_mm256_castsi256_pd(far_from_halfway4(y))))
            };
            for (i, (&x, &g)) in c.iter().zip(&got).enumerate() {
                if takes >> i & 1 == 0 {
                    assert!(may_leave(x), "{what}({x:e}) not covered");
                    left += 1;
                    continue;
                }
                covered += 1;
                let want = def(x);
                worst = worst.max(g.to_bits().abs_diff(want.to_bits()));
                if far >> i & 1 != 0 {
                    assert_eq!((g as f32).to_bits(), (want as f32).to_bits(), "{what}({x:e}) screened as sure");
                } else {
                    screened += 1;
                }
            }
        }
        assert!(worst < 1 << 12, "{what}: estimate {worst} units from the definition");
        assert!(crate::generic::SCREEN_MARGIN as u64 >= worst << 4);
        assert!(screened > 0 && screened * 500 < covered, "{what}: {screened} of {covered} screened out");
        eprintln!("{what} estimate: worst {worst} units, {screened} of {covered} screened out, {left} left");
    }

    /// Every `step`th f32 bit pattern of each sign up to 90, and `extra`, as f64 (a multiple of
    /// four values).
    fn sweep(step: usize, extra: &[f64]) -> Vec<f64> {
        let top = 90f32.to_bits();
        let mut xs: Vec<f64> =
            (0..top).step_by(step).flat_map(|b| [f32::from_bits(b) as f64, -f32::from_bits(b) as f64]).collect();
        xs.extend(extra);
        xs.truncate(xs.len() / 4 * 4);
        xs
    }

    /// The softplus estimate (`softplus_est4`) against its definition on a sweep (one f32 in 61
    /// of each sign up to 90): [`check_estimate`]; it covers every lane with |x| < 87.
    #[test]
    fn softplus_estimate_is_within_the_screen() {
        if !(std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")) {
            eprintln!("skipping softplus_estimate_is_within_the_screen: no AVX2 and FMA");
            return;
        }
        let xs = sweep(61, &[0.0, -0.0, -0.5, 0.25, 86.9, -86.9, 1e-30, -1e-30]);
        // SAFETY (in the closure): AVX2 and FMA checked above.
        let est = |v| unsafe { softplus_est4::<1>([v])[0] };
        check_estimate("softplus", &xs, est, crate::generic::softplus, |x| x.abs() >= 87.0);
    }

    /// The ELU estimate (`elu_est4`) against its definition on a sweep (one f32 in 61 of each
    /// sign up to 90), alpha 1 and 0.3: [`check_estimate`]; it covers every lane but tiny and
    /// huge ones.
    #[test]
    fn elu_estimate_is_within_the_screen() {
        if !(std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")) {
            eprintln!("skipping elu_estimate_is_within_the_screen: no AVX2 and FMA");
            return;
        }
        let xs = sweep(61, &[0.0, -0.0, -0.5, 0.25, -0.25, 1.0 / 1024.0, -1.0 / 1024.0, 349.0, -699.0]);
        for alpha in [1.0, 0.3f32 as f64] {
            // SAFETY (in the closure): AVX2 and FMA checked above.
            let est = |v| unsafe { elu_est4::<1>([v], alpha)[0] };
            let leave = |x: f64| x.abs() < 2f64.powi(-120) || x.abs() > 340.0;
            check_estimate(&format!("elu {alpha}"), &xs, est, |x| crate::generic::elu(x, alpha), leave);
        }
    }
}
