//! AVX-512 VNNI W4A8 kernels: the AVX2 kernels' tiles and epilogue with the integer part on
//! 512-bit registers, `vpdpbusd` (unsigned nibbles x signed int8, summed four to an int32 lane)
//! in place of `vpmaddubsw` + `vpmaddwd`. Integer sums are exact, so the results equal the generic
//! kernel bit for bit. Compiled everywhere; dispatched only where the CPU has AVX-512 F, BW and
//! VNNI (tested there: the property tests run whatever kernel the CPU dispatches).

use super::common::{
    block_bias, channels_impl, definition_levels, gemm_impl, gemv_rows_impl, level_reciprocal, level_steps,
    screen_reciprocal, sgemm_direct8, sgemm_direct_panels, short_group_inputs, single_block, softmax_rows_impl,
    F32Lanes, LaneInput, Sums, QUOTIENT_SCREEN,
};
use crate::generic::QRow;
use crate::packed::{ChannelTiles, PackedQ4, QK4};
use std::arch::x86_64::*;

/// The AVX-512 VNNI integer sums (`vpdpbusd`) and eight-lane softmax steps.
pub(crate) struct Vnni;

impl Sums for Vnni {
    const WIDE: bool = true;

    #[inline(always)]
    unsafe fn group_sums<const NC: usize>(
        rp: [*const u8; 4],
        xp: [*const i8; NC],
        i: usize,
        end: usize,
        m4: __m256i,
        ones: __m256i,
    ) -> [[__m256i; 4]; NC] {
        group_sums_vnni::<NC>(rp, xp, i, end, m4, ones)
    }

    #[inline(always)]
    unsafe fn lane_group<const NP: usize, X: LaneInput>(
        base: *const i8,
        quads: usize,
        xs: &[X; NP],
        pos: (&mut usize, &mut usize, &mut [*const i8; NP]),
    ) -> [[__m256i; 4]; NP] {
        lane_group_vnni::<NP, X>(base, quads, xs, pos)
    }

    #[inline(always)]
    unsafe fn lane_short<const NP: usize, const J: usize, X: LaneInput>(
        w: &PackedQ4,
        t: &ChannelTiles,
        (cb, _): (usize, usize),
        xs: [X; NP],
    ) -> [[__m256; J]; NP] {
        // The whole block of 32 channels at once (J = 4).
        let a = lane_short_vnni::<NP, X>(w, t, cb, xs);
        std::array::from_fn(|c| std::array::from_fn(|j| a[c][j]))
    }

    #[inline(always)]
    unsafe fn softmax_exp(e: &mut [f64]) -> usize {
        let (n, ep) = (e.len(), e.as_mut_ptr());
        let mut j = 0;
        while j + 32 <= n {
            let v = exp_nonpos8xk::<4>(std::array::from_fn(|i| _mm512_loadu_pd(ep.add(j + 8 * i))));
            for (i, v) in v.iter().enumerate() {
                _mm512_storeu_pd(ep.add(j + 8 * i), *v);
            }
            j += 32;
        }
        j
    }

    #[inline(always)]
    unsafe fn softmax_quot(e: &[f64], inv: f64, total: f64, y: &mut [f32]) -> usize {
        use super::common::{QUOT_HI, QUOT_LO};
        let mut j = 0;
        while j + 8 <= e.len() {
            // quotient4's screen on eight lanes.
            let ev = _mm512_loadu_pd(e.as_ptr().add(j));
            let q = _mm512_mul_pd(ev, _mm512_set1_pd(inv));
            let lo = _mm512_cvtpd_ps(_mm512_mul_pd(q, _mm512_set1_pd(QUOT_LO)));
            let hi = _mm512_cvtpd_ps(_mm512_mul_pd(q, _mm512_set1_pd(QUOT_HI)));
            let v = if _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(lo, hi)) == 0xff {
                lo
            } else {
                _mm512_cvtpd_ps(_mm512_div_pd(ev, _mm512_set1_pd(total)))
            };
            _mm256_storeu_ps(y.as_mut_ptr().add(j), v);
            j += 8;
        }
        j
    }
}

/// [`super::common::group_sums`] with the block pairs on 512-bit registers: the two blocks' 32
/// nibble bytes unpack to one 64-byte vector `[b0 0-15, b1 0-15, b0 16-31, b1 16-31]` and the
/// inputs' 128-bit lanes are reordered to match; the 16 lanes fold to the AVX2 form (8 lanes)
/// for the shared reduction.
#[inline(always)]
pub(crate) unsafe fn group_sums_vnni<const NC: usize>(
    rp: [*const u8; 4],
    xp: [*const i8; NC],
    mut i: usize,
    end: usize,
    m4: __m256i,
    ones: __m256i,
) -> [[__m256i; 4]; NC] {
    let mut acc = [[_mm512_setzero_si512(); 4]; NC];
    while i + 2 <= end {
        let xv: [__m512i; NC] = std::array::from_fn(|c| {
            let x = _mm512_loadu_si512(xp[c].add(i * QK4) as *const __m512i);
            _mm512_shuffle_i64x2::<0b11_01_10_00>(x, x)
        });
        for j in 0..4 {
            let raw = _mm256_loadu_si256(rp[j].add(i * 16) as *const __m256i);
            let lo = _mm256_and_si256(raw, m4);
            let hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
            let wv = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
            for c in 0..NC {
                acc[c][j] = _mm512_dpbusd_epi32(acc[c][j], wv, xv[c]);
            }
        }
        i += 2;
    }
    let mut out: [[__m256i; 4]; NC] = std::array::from_fn(|c| {
        std::array::from_fn(|j| {
            _mm256_add_epi32(_mm512_castsi512_si256(acc[c][j]), _mm512_extracti64x4_epi64::<1>(acc[c][j]))
        })
    });
    if i < end {
        single_block::<NC>(rp, xp, i, ones, &mut out);
    }
    out
}

/// W4A8 GEMV rows `rows` of `w` with VNNI (see `generic_gemv_q4q8`).
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VNNI, AVX2 and FMA; `x.q` holds `w.k_pad` values, `y`
/// `rows.len()` outputs.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
pub unsafe fn avx512_gemv_q4q8_rows(
    w: &PackedQ4,
    x: QRow,
    bias: Option<&[f32]>,
    rows: std::ops::Range<usize>,
    y: &mut [f32],
) {
    gemv_rows_impl::<Vnni>(w, x, bias, rows, y)
}

/// W4A8 on a batch with VNNI (see `avx2_gemm_q4q8`).
///
/// # Safety
/// As [`avx512_gemv_q4q8_rows`] and `avx2_gemm_q4q8`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
pub unsafe fn avx512_gemm_q4q8(
    w: &PackedQ4,
    rows: std::ops::Range<usize>,
    xs: &[QRow],
    bias: Option<&[f32]>,
    y: &mut [f32],
    strides: (usize, usize),
) {
    gemm_impl::<Vnni>(w, rows, xs.len(), |c| xs[c], bias, y, strides)
}

/// The exact int32 sums of one group (`quads` quads at `base` in the `ChannelTiles` layout: 32
/// channels x 4 bytes per quad) of 32 channels against `NP` inputs with `vpdpbusd` on 512-bit
/// registers (16 channels' four products summed into each int32 lane; no int16 stage), walking
/// the inputs' runs as `common::channel_block` does (`pos`: its run, offset and pointers). Returned
/// in the AVX2 kernel's form, four vectors of eight channels per input, for its epilogue.
#[inline(always)]
pub(crate) unsafe fn lane_group_vnni<const NP: usize, X: LaneInput>(
    base: *const i8,
    quads: usize,
    xs: &[X; NP],
    (tap, off, xp): (&mut usize, &mut usize, &mut [*const i8; NP]),
) -> [[__m256i; 4]; NP] {
    let flip = _mm512_set1_epi8(-128i8);
    let run = xs[0].run();
    let mut acc = [[_mm512_setzero_si512(); 2]; NP];
    if run == usize::MAX {
        // One unbounded run (a row): no run boundary to watch inside the loop.
        let (o, p) = (*off, *xp);
        for quad in 0..quads {
            let wp = base.add(quad * 128);
            let w0 = _mm512_loadu_si512(wp as *const __m512i);
            let w1 = _mm512_loadu_si512(wp.add(64) as *const __m512i);
            for c in 0..NP {
                let x4 = std::ptr::read_unaligned(p[c].add(o + 4 * quad) as *const i32);
                let xb = if X::FLIPPED { _mm512_set1_epi32(x4) } else { _mm512_xor_si512(_mm512_set1_epi32(x4), flip) };
                acc[c][0] = _mm512_dpbusd_epi32(acc[c][0], xb, w0);
                acc[c][1] = _mm512_dpbusd_epi32(acc[c][1], xb, w1);
            }
        }
        *off = o + 4 * quads;
        return std::array::from_fn(|c| {
            let [a, b] = acc[c];
            [
                _mm512_castsi512_si256(a),
                _mm512_extracti64x4_epi64::<1>(a),
                _mm512_castsi512_si256(b),
                _mm512_extracti64x4_epi64::<1>(b),
            ]
        });
    }
    for quad in 0..quads {
        if *off == run {
            *tap += 1;
            *off = 0;
            *xp = std::array::from_fn(|c| xs[c].run_ptr(*tap));
        }
        let wp = base.add(quad * 128);
        let w0 = _mm512_loadu_si512(wp as *const __m512i);
        let w1 = _mm512_loadu_si512(wp.add(64) as *const __m512i);
        for c in 0..NP {
            let x4 = std::ptr::read_unaligned(xp[c].add(*off) as *const i32);
            let xb = if X::FLIPPED { _mm512_set1_epi32(x4) } else { _mm512_xor_si512(_mm512_set1_epi32(x4), flip) };
            acc[c][0] = _mm512_dpbusd_epi32(acc[c][0], xb, w0);
            acc[c][1] = _mm512_dpbusd_epi32(acc[c][1], xb, w1);
        }
        *off += 4;
    }
    std::array::from_fn(|c| {
        let [a, b] = acc[c];
        [
            _mm512_castsi512_si256(a),
            _mm512_extracti64x4_epi64::<1>(a),
            _mm512_castsi512_si256(b),
            _mm512_extracti64x4_epi64::<1>(b),
        ]
    })
}

/// The short lane form (`avx2::channel_block_short`: groups of eight quads inside one run) with
/// VNNI: per quad two 512-bit weight vectors (the block's 32 channels), each input's four bytes
/// broadcast and `vpdpbusd` into int32 lanes, then per group the epilogue on 16 lanes at a time
/// (the same per-lane operations as the AVX2 form: equal bit for bit). Up to six inputs: twelve
/// int32 and twelve float accumulators fit the 32 registers.
#[inline(always)]
pub(crate) unsafe fn lane_short_vnni<const NP: usize, X: LaneInput>(
    w: &PackedQ4,
    t: &crate::packed::ChannelTiles,
    cb: usize,
    xs: [X; NP],
) -> [[__m256; 4]; NP] {
    const QUADS: usize = 8;
    debug_assert!(w.group == 4 * QUADS && (xs[0].run() == usize::MAX || xs[0].run().is_multiple_of(w.group)));
    let groups = w.groups();
    let flip = _mm512_set1_epi8(-128i8);
    let zc: [__m512i; NP] = std::array::from_fn(|c| _mm512_set1_epi32(128 + xs[c].zero()));
    let same_zero = xs.iter().all(|x| x.zero() == xs[0].zero());
    let mut accf = [[_mm512_setzero_ps(); 2]; NP];
    let mut walk = (0usize, 0usize);
    for g in 0..groups {
        let xp = short_group_inputs(&xs, w.group, &mut walk);
        let base = t.data.as_ptr().add((cb * groups + g) * QUADS * 128);
        let mut acc = [[_mm512_setzero_si512(); 2]; NP];
        for quad in 0..QUADS {
            let wp = base.add(quad * 128);
            let w0 = _mm512_loadu_si512(wp as *const __m512i);
            let w1 = _mm512_loadu_si512(wp.add(64) as *const __m512i);
            for c in 0..NP {
                let x4 = std::ptr::read_unaligned(xp[c].add(4 * quad) as *const i32);
                let xb = if X::FLIPPED { _mm512_set1_epi32(x4) } else { _mm512_xor_si512(_mm512_set1_epi32(x4), flip) };
                acc[c][0] = _mm512_dpbusd_epi32(acc[c][0], xb, w0);
                acc[c][1] = _mm512_dpbusd_epi32(acc[c][1], xb, w1);
            }
        }
        let at = (cb * groups + g) * 32;
        for h in 0..2 {
            let ws = _mm512_loadu_si512(t.sums.as_ptr().add(at + 16 * h) as *const __m512i);
            let sc = _mm512_loadu_ps(t.scales.as_ptr().add(at + 16 * h));
            let zw0 = _mm512_mullo_epi32(zc[0], ws);
            for c in 0..NP {
                let zw = if same_zero { zw0 } else { _mm512_mullo_epi32(zc[c], ws) };
                let v = _mm512_sub_epi32(acc[c][h], zw);
                // The epilogue's order: product rounded, then added.
                accf[c][h] = _mm512_add_ps(accf[c][h], _mm512_mul_ps(_mm512_cvtepi32_ps(v), sc));
            }
        }
    }
    let half = |v: __m512, hi: bool| {
        if hi {
            _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)))
        } else {
            _mm512_castps512_ps256(v)
        }
    };
    std::array::from_fn(|c| {
        let [a, b] = accf[c];
        [half(a, false), half(a, true), half(b, false), half(b, true)]
    })
}

impl F32Lanes for __m512 {
    const LANES: usize = 16;
    #[inline(always)]
    unsafe fn zero() -> Self {
        _mm512_setzero_ps()
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        _mm512_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        _mm512_set1_ps(v)
    }
    #[inline(always)]
    unsafe fn fmadd(a: Self, b: Self, c: Self) -> Self {
        _mm512_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        _mm512_storeu_ps(p, self)
    }
    #[inline(always)]
    unsafe fn mul(a: Self, b: Self) -> Self {
        _mm512_mul_ps(a, b)
    }
    #[inline(always)]
    unsafe fn add(a: Self, b: Self) -> Self {
        _mm512_add_ps(a, b)
    }
    #[inline(always)]
    unsafe fn from_i8(p: *const i8) -> Self {
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p as *const __m128i)))
    }
    #[inline(always)]
    unsafe fn store_first(self, p: *mut f32, n: usize) {
        _mm512_mask_storeu_ps(p, ((1u32 << n) - 1) as __mmask16, self)
    }
}

/// `avx2_sgemm_direct` with 16-lane FMAs (`sgemm_direct_panels` on 512-bit vectors: tiles of up
/// to four rows by 32 columns, then 16); the remaining columns (fewer than 16) by the AVX2 form.
/// Each output is the same FMA chain over k from zero, so the same bits.
///
/// # Safety
/// The CPU must support AVX-512 F, AVX2 and FMA; as `avx2_sgemm_direct`.
#[target_feature(enable = "avx512f,avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn avx512_sgemm_direct(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    (rsa, csa): (usize, usize),
    b: &[f32],
    rsb: usize,
    c: &mut [f32],
    rsc: usize,
) {
    let j = sgemm_direct_panels::<__m512>((m, k, n), (a.as_ptr(), rsa, csa), (b.as_ptr(), rsb), (c.as_mut_ptr(), rsc));
    if j < n {
        // The last columns: the same chains on 8 lanes and one.
        let b_rest = b.get(j..).unwrap_or(&[]); // empty when k is 0
        sgemm_direct8(m, k, n - j, a, (rsa, csa), b_rest, rsb, &mut c[j..], rsc);
    }
}

/// `exp_nonpos` on eight lanes, `K` vectors at once step by step (`common::exp_nonpos4xk` on
/// 512-bit registers: the same operations per lane). With its target features (not
/// `inline(always)` without them): the closures inside take the function's features, so their
/// intrinsics inline instead of running as calls (which made every AVX-512 user of this several
/// times slower than the AVX2 form).
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
pub(crate) unsafe fn exp_nonpos8xk<const K: usize>(x: [__m512d; K]) -> [__m512d; K] {
    use crate::generic::{EXP_LN2_HI, EXP_LN2_LO, EXP_MAGIC, EXP_TAYLOR};
    let magic = _mm512_set1_pd(EXP_MAGIC);
    let t: [__m512d; K] =
        std::array::from_fn(|i| _mm512_add_pd(_mm512_mul_pd(x[i], _mm512_set1_pd(std::f64::consts::LOG2_E)), magic));
    let r: [__m512d; K] = std::array::from_fn(|i| {
        let n = _mm512_sub_pd(t[i], magic);
        _mm512_sub_pd(
            _mm512_sub_pd(x[i], _mm512_mul_pd(n, _mm512_set1_pd(EXP_LN2_HI))),
            _mm512_mul_pd(n, _mm512_set1_pd(EXP_LN2_LO)),
        )
    });
    let mut p = [_mm512_set1_pd(EXP_TAYLOR[13]); K];
    for &c in EXP_TAYLOR[..13].iter().rev() {
        let c = _mm512_set1_pd(c);
        for i in 0..K {
            p[i] = _mm512_add_pd(_mm512_mul_pd(p[i], r[i]), c);
        }
    }
    std::array::from_fn(|i| {
        let y = _mm512_mul_pd(p[i], pow2_of8(t[i]));
        // Lanes at or below -708 are 0; NaN lanes (unordered: kept) carry NaN through p.
        _mm512_maskz_mov_pd(_mm512_cmp_pd_mask::<_CMP_NLE_UQ>(x[i], _mm512_set1_pd(-708.0)), y)
    })
}

/// [`crate::generic::hard_swish_f32`] on eight f64 lanes (`avx2_hard_swish_f32`'s operations).
///
/// # Safety
/// The CPU must support AVX-512 F, AVX2 and FMA; `x.len() == out.len()`.
#[target_feature(enable = "avx512f,avx2,fma")]
pub unsafe fn avx512_hard_swish_f32(x: &[f32], out: &mut [f32]) {
    let (half, zero, one) = (_mm512_set1_pd(0.5), _mm512_setzero_pd(), _mm512_set1_pd(1.0));
    let sixth = _mm512_set1_pd(1.0 / 6.0);
    let n = x.len();
    let mut i = 0;
    while i + 8 <= n {
        let v = _mm512_cvtps_pd(_mm256_loadu_ps(x.as_ptr().add(i)));
        // x / 6 as x * (1/6): see `generic::hard_swish_f32`.
        let t = _mm512_add_pd(_mm512_mul_pd(v, sixth), half);
        let t = _mm512_mask_blend_pd(_mm512_cmp_pd_mask::<_CMP_LT_OQ>(t, zero), t, zero);
        let t = _mm512_mask_blend_pd(_mm512_cmp_pd_mask::<_CMP_GT_OQ>(t, one), t, one);
        _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm512_cvtpd_ps(_mm512_mul_pd(v, t)));
        i += 8;
    }
    for j in i..n {
        out[j] = crate::generic::hard_swish(x[j] as f64) as f32;
    }
}

/// [`erf8`] with the uncovered lanes by `libm::erf`: `libm::erf` of every lane, bit for bit.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn erf8_all(x: __m512d) -> __m512d {
    let ([e], _, [tail], [rest]) = erf8::<1>([x]);
    let rest = tail | rest;
    if rest == 0 {
        return e;
    }
    let (mut xs, mut es) = ([0f64; 8], [0f64; 8]);
    _mm512_storeu_pd(xs.as_mut_ptr(), x);
    _mm512_storeu_pd(es.as_mut_ptr(), e);
    for i in 0..8 {
        if rest >> i & 1 == 1 {
            es[i] = libm::erf(xs[i]);
        }
    }
    _mm512_loadu_pd(es.as_ptr())
}

/// `generic::erf_lanes` with AVX-512.
///
/// # Safety
/// The CPU must support AVX-512 F, AVX2 and FMA.
#[target_feature(enable = "avx512f,avx2,fma")]
pub unsafe fn avx512_erf_lanes(x: &[f64; 8]) -> [f64; 8] {
    let mut out = [0f64; 8];
    _mm512_storeu_pd(out.as_mut_ptr(), erf8_all(_mm512_loadu_pd(x.as_ptr())));
    out
}

/// `generic::exp_taylor10` on eight f64 lanes, `K` vectors interleaved (`common::exp_taylor4xk`'s
/// operations on 512-bit registers: the same estimate per lane).
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn exp_taylor8xk<const K: usize>(x: [__m512d; K]) -> [__m512d; K] {
    use crate::generic::SCREEN_TAYLOR;
    let (mut t, mut r) = (x, x);
    for i in 0..K {
        (t[i], r[i]) = exp_split8(x[i]);
    }
    let mut p = [_mm512_set1_pd(SCREEN_TAYLOR[10]); K];
    for &c in SCREEN_TAYLOR[..10].iter().rev() {
        let c = _mm512_set1_pd(c);
        for i in 0..K {
            p[i] = _mm512_fmadd_pd(p[i], r[i], c);
        }
    }
    for i in 0..K {
        p[i] = _mm512_mul_pd(p[i], pow2_of8(t[i]));
    }
    p
}

/// `common::exp_split4` on eight lanes: `x = n ln 2 + r` with `t = fma(x, log2 e, EXP_MAGIC)` (n
/// in t's low bits, for [`pow2_of8`]) and `r` by two fused multiply-adds with the split ln 2.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn exp_split8(x: __m512d) -> (__m512d, __m512d) {
    use crate::generic::{EXP_LN2_HI, EXP_LN2_LO, EXP_MAGIC};
    let magic = _mm512_set1_pd(EXP_MAGIC);
    let t = _mm512_fmadd_pd(x, _mm512_set1_pd(std::f64::consts::LOG2_E), magic);
    let n = _mm512_sub_pd(t, magic);
    (t, _mm512_fnmadd_pd(n, _mm512_set1_pd(EXP_LN2_LO), _mm512_fnmadd_pd(n, _mm512_set1_pd(EXP_LN2_HI), x)))
}

/// `common::pow2_of4` on eight lanes: `2^n` from `t` of [`exp_split8`] by the exponent field.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn pow2_of8(t: __m512d) -> __m512d {
    use crate::generic::EXP_MAGIC;
    let bits = _mm512_add_epi64(
        _mm512_sub_epi64(_mm512_castpd_si512(t), _mm512_set1_epi64(EXP_MAGIC.to_bits() as i64)),
        _mm512_set1_epi64(1023),
    );
    _mm512_castsi512_pd(_mm512_slli_epi64::<52>(bits))
}

/// `1 / q` to within 2^-45 for `|q|` between 2^-100 and 2^100: `vrcp14pd`'s estimate (within
/// 2^-14) refined by two Newton steps (each squaring the error), as `avx2::recip4` from `vrcpps`.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn recip8(q: __m512d) -> __m512d {
    let one = _mm512_set1_pd(1.0);
    let r = _mm512_rcp14_pd(q);
    let r = _mm512_fmadd_pd(r, _mm512_fnmadd_pd(q, r, one), r);
    _mm512_fmadd_pd(r, _mm512_fnmadd_pd(q, r, one), r)
}

/// An estimate of erf(x) for 1.25 <= |x| < 6 (`a = |x|`) on eight f64 lanes, `K` vectors
/// interleaved: `avx2::erf_tail4xk`'s form (fdlibm's erfc form with the exponential in one piece
/// by [`exp_taylor8xk`], within 2^-44 of erf) on 512-bit registers.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn erf_tail8xk<const K: usize>(x: [__m512d; K], a: [__m512d; K]) -> [__m512d; K] {
    use super::common::{ERFC_R, ERFC_S};
    let one = _mm512_set1_pd(1.0);
    let mut far = [0 as __mmask8; K];
    let mut s = [one; K];
    for i in 0..K {
        far[i] = _mm512_cmp_pd_mask::<_CMP_GE_OQ>(a[i], _mm512_set1_pd(1.0 / 0.35));
        s[i] = recip8(_mm512_mul_pd(a[i], a[i]));
    }
    // The coefficient of the form each lane takes.
    #[inline(always)]
    unsafe fn pick<const N: usize>(c: &[[f64; N]; 2], k: usize, far: __mmask8) -> __m512d {
        _mm512_mask_blend_pd(far, _mm512_set1_pd(c[0][k]), _mm512_set1_pd(c[1][k]))
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
                r[i] = _mm512_fmadd_pd(r[i], s[i], pick(&ERFC_R, k, far[i]));
            }
            q[i] = _mm512_fmadd_pd(q[i], s[i], pick(&ERFC_S, k, far[i]));
        }
    }
    let mut arg = [one; K];
    for i in 0..K {
        arg[i] = _mm512_fnmadd_pd(a[i], a[i], _mm512_fmsub_pd(r[i], recip8(q[i]), _mm512_set1_pd(0.5625)));
    }
    let ex = exp_taylor8xk::<K>(arg);
    let sign = _mm512_set1_epi64(i64::MIN);
    let mut y = [one; K];
    for i in 0..K {
        let v = _mm512_fnmadd_pd(ex[i], recip8(a[i]), one);
        y[i] = _mm512_castsi512_pd(_mm512_or_si512(
            _mm512_castpd_si512(v),
            _mm512_and_si512(_mm512_castpd_si512(x[i]), sign),
        ));
    }
    y
}

/// fdlibm's erf on `K` vectors of eight f64 lanes where |x| < 1.25 (its operations, no fused
/// multiply-add: the same bits as `libm::erf`): the tiny form below 2^-28, the rational form in
/// x^2 below 0.84375, erx plus the rational form in |x| - 1 above; each step over the K vectors
/// before the next (one vector's chain of dependent multiplies and adds, then the division, left
/// the units idle). Per vector `|x|`, the mask of the lanes with 1.25 <= |x| < 6 (the tail) and of
/// the others it does not cover (|x| >= 6, NaN).
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn erf8<const K: usize>(x: [__m512d; K]) -> ([__m512d; K], [__m512d; K], [u8; K], [u8; K]) {
    use crate::generic::{ERF_EFX8, ERF_ERX, ERF_P, ERF_Q};
    let mut ax = x;
    let mut hi = [0 as __mmask8; K];
    let mut t = x;
    let mut p = x;
    let mut q = x;
    for i in 0..K {
        ax[i] = _mm512_abs_pd(x[i]);
        hi[i] = _mm512_cmp_pd_mask::<_CMP_GE_OQ>(ax[i], _mm512_set1_pd(0.84375));
        t[i] = _mm512_mask_blend_pd(hi[i], _mm512_mul_pd(x[i], x[i]), _mm512_sub_pd(ax[i], _mm512_set1_pd(1.0)));
        p[i] = _mm512_mask_blend_pd(hi[i], _mm512_set1_pd(ERF_P[0][6]), _mm512_set1_pd(ERF_P[1][6]));
        q[i] = _mm512_mask_blend_pd(hi[i], _mm512_set1_pd(ERF_Q[0][6]), _mm512_set1_pd(ERF_Q[1][6]));
    }
    for k in (0..6).rev() {
        for i in 0..K {
            let cp = _mm512_mask_blend_pd(hi[i], _mm512_set1_pd(ERF_P[0][k]), _mm512_set1_pd(ERF_P[1][k]));
            let cq = _mm512_mask_blend_pd(hi[i], _mm512_set1_pd(ERF_Q[0][k]), _mm512_set1_pd(ERF_Q[1][k]));
            p[i] = _mm512_add_pd(cp, _mm512_mul_pd(t[i], p[i]));
            q[i] = _mm512_add_pd(cq, _mm512_mul_pd(t[i], q[i]));
        }
    }
    let sign = _mm512_set1_epi64(i64::MIN);
    let mut e = x;
    let mut tails = [0u8; K];
    let mut rests = [0u8; K];
    for i in 0..K {
        let r = _mm512_div_pd(p[i], q[i]);
        let low = _mm512_add_pd(x[i], _mm512_mul_pd(x[i], r));
        let y = _mm512_sub_pd(_mm512_set1_pd(1.0), _mm512_sub_pd(_mm512_set1_pd(1.0 - ERF_ERX), r));
        // -y where x's sign bit is set (y is positive).
        let y = _mm512_castsi512_pd(_mm512_or_si512(
            _mm512_castpd_si512(y),
            _mm512_and_si512(_mm512_castpd_si512(x[i]), sign),
        ));
        let tiny = _mm512_mul_pd(
            _mm512_set1_pd(0.125),
            _mm512_add_pd(_mm512_mul_pd(_mm512_set1_pd(8.0), x[i]), _mm512_mul_pd(_mm512_set1_pd(ERF_EFX8), x[i])),
        );
        let v = _mm512_mask_blend_pd(hi[i], low, y);
        let small = _mm512_cmp_pd_mask::<_CMP_LT_OQ>(ax[i], _mm512_set1_pd(1.0 / (1u64 << 28) as f64));
        e[i] = _mm512_mask_blend_pd(small, v, tiny);
        let covered = _mm512_cmp_pd_mask::<_CMP_LT_OQ>(ax[i], _mm512_set1_pd(1.25));
        tails[i] = _mm512_cmp_pd_mask::<_CMP_LT_OQ>(ax[i], _mm512_set1_pd(6.0)) & !covered;
        rests[i] = !covered & !tails[i];
    }
    (e, ax, tails, rests)
}

/// [`erf8`] on `K` vectors with [`erf_tail8xk`]'s estimate in the tail's lanes (for every vector
/// of the step at once where any has such a lane), and per vector the masks of the estimate's
/// lanes and of those left to `libm::erf` (NaN, |x| >= 6): `avx2::erf4_est` on 512-bit registers.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
pub(crate) unsafe fn erf8_est<const K: usize>(x: [__m512d; K]) -> ([__m512d; K], [u8; K], [u8; K]) {
    let (mut e, ax, tails, rests) = erf8::<K>(x);
    // The tail's estimate for every vector at once where any has a tail lane (its chains
    // interleaved like the rest), blended into the lanes that take it.
    if tails.iter().any(|&t| t != 0) {
        let t = erf_tail8xk::<K>(x, ax);
        for i in 0..K {
            e[i] = _mm512_mask_blend_pd(tails[i], e[i], t[i]);
        }
    }
    (e, tails, rests)
}

/// `generic::erf_f32` (or with `gelu`, `generic::gelu_erf_f32`: `0.5 * x * (1 + erf(x / sqrt
/// 2))` in f64) on eight lanes, four vectors a step: fdlibm's operations below 1.25 (the same f64
/// bits), [`erf_tail8xk`]'s estimate to 6 where [`far_from_halfway8`] vouches for its f32 rounding
/// (for Gelu only where `x / sqrt 2 > -2`, so that `1 + erf` keeps its error relative to itself
/// under 2^-40: erfc(2) = 0.0047), the other lanes by the definitions; the last values through a
/// zero-padded vector. Each result rounded once (before: the estimate's lanes by `libm::erf` one at
/// a time, 21.4 ns a value on (-4, 4), slower than the scalar definition).
///
/// # Safety
/// The CPU must support AVX-512 F, AVX2 and FMA; `x.len() == out.len()`.
#[target_feature(enable = "avx512f,avx2,fma")]
pub unsafe fn avx512_erf_f32(x: &[f32], out: &mut [f32], gelu: bool) {
    let n = x.len();
    let mut i = 0;
    while i + 32 <= n {
        erf_step8::<4>(x.as_ptr().add(i), out.as_mut_ptr().add(i), 0xff, gelu);
        i += 32;
    }
    while i < n {
        // The chunk's lanes (all eight but in the last); the rest read and write nothing.
        let m = if n - i >= 8 { 0xff } else { (1u8 << (n - i)) - 1 };
        erf_step8::<1>(x.as_ptr().add(i), out.as_mut_ptr().add(i), m, gelu);
        i += 8;
    }
}

/// [`avx512_erf_f32`] on `8 K` values from `xs` to `os`, of the last vector only the lanes of
/// `last` (the others are all read and written).
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn erf_step8<const K: usize>(xs: *const f32, os: *mut f32, last: u8, gelu: bool) {
    let mask = |j: usize| if j + 1 == K { last } else { 0xff };
    let mut v = [_mm512_setzero_pd(); K];
    for (j, v) in v.iter_mut().enumerate() {
        *v = _mm512_cvtps_pd(_mm512_castps512_ps256(_mm512_maskz_loadu_ps(mask(j) as u16, xs.add(8 * j))));
    }
    // x / sqrt 2 as the definition divides (the lanes below 1.25 are its f64 bits).
    let mut xin = v;
    if gelu {
        for x in &mut xin {
            *x = _mm512_div_pd(*x, _mm512_set1_pd(std::f64::consts::SQRT_2));
        }
    }
    let (e, tail, rest) = erf8_est::<K>(xin);
    for j in 0..K {
        let y = if gelu {
            _mm512_mul_pd(_mm512_mul_pd(_mm512_set1_pd(0.5), v[j]), _mm512_add_pd(_mm512_set1_pd(1.0), e[j]))
        } else {
            e[j]
        };
        let o = os.add(8 * j);
        _mm512_mask_storeu_ps(o, mask(j) as u16, _mm512_castps256_ps512(_mm512_cvtpd_ps(y)));
        let mut unsure = (rest[j] | (tail[j] & !far_from_halfway8(y))) & mask(j);
        if gelu {
            unsure |= tail[j] & _mm512_cmp_pd_mask::<_CMP_LE_OQ>(xin[j], _mm512_set1_pd(-2.0)) & mask(j);
        }
        while unsure != 0 {
            let l = unsure.trailing_zeros() as usize;
            let x = *xs.add(8 * j + l) as f64;
            *o.add(l) = if gelu { crate::generic::gelu_erf(x) } else { libm::erf(x) } as f32;
            unsure &= unsure - 1;
        }
    }
}

/// `avx2::expm1_est4` on eight f64 lanes, `K` vectors interleaved (the same estimate per lane:
/// within 2^-41 of `e^u - 1` for `-700 < u <= 0`).
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn expm1_est8<const K: usize>(u: [__m512d; K]) -> [__m512d; K] {
    use super::avx2::EXPM1_TAYLOR13;
    let (mut t, mut r) = (u, u);
    for i in 0..K {
        (t[i], r[i]) = exp_split8(u[i]);
    }
    let mut p = [_mm512_set1_pd(EXPM1_TAYLOR13[13]); K];
    for &c in EXPM1_TAYLOR13[1..13].iter().rev() {
        for i in 0..K {
            p[i] = _mm512_fmadd_pd(p[i], r[i], _mm512_set1_pd(c));
        }
    }
    let mut out = p;
    for i in 0..K {
        let s = pow2_of8(t[i]);
        let em1 = _mm512_mul_pd(r[i], p[i]);
        out[i] = _mm512_fmadd_pd(s, em1, _mm512_sub_pd(s, _mm512_set1_pd(1.0)));
    }
    out
}

/// `generic::elu_f32` on AVX-512: `avx2_elu_f32`'s screened estimate (`alpha (e^x - 1)` by
/// [`expm1_est8`] below 0, x itself from 0) on four vectors of eight f64 lanes a step, taken where
/// the screen vouches for the f32 rounding of every lane of the step (the lanes it covers:
/// `avx2::elu_takes4`'s), else the step by the definition's vector form; the last values by it.
///
/// # Safety
/// The CPU must support AVX-512 F, AVX2 and FMA; `x.len() == out.len()`.
#[target_feature(enable = "avx512f,avx2,fma")]
pub unsafe fn avx512_elu_f32(x: &[f32], alpha: f32, out: &mut [f32]) {
    let a = _mm512_set1_pd(alpha as f64);
    let est = |v: [__m512d; 4]| {
        let mut u = v;
        for u in &mut u {
            *u = _mm512_min_pd(*u, _mm512_setzero_pd());
        }
        let m = expm1_est8::<4>(u);
        let mut out = [(_mm512_setzero_pd(), 0 as __mmask8); 4];
        for j in 0..4 {
            let neg = _mm512_cmp_pd_mask::<_CMP_LT_OQ>(v[j], _mm512_setzero_pd());
            let y = _mm512_mask_blend_pd(neg, v[j], _mm512_mul_pd(a, m[j]));
            // x >= 0, or -700 < x < 0 where |y| is 0 or at least 2^-125 (a normal f32 result);
            // NaN is not covered.
            let ay = _mm512_abs_pd(y);
            let normal = _mm512_cmp_pd_mask::<_CMP_GE_OQ>(ay, _mm512_set1_pd(f64::from_bits(0x3820_0000_0000_0000)))
                | _mm512_cmp_pd_mask::<_CMP_EQ_OQ>(ay, _mm512_setzero_pd());
            let pos = _mm512_cmp_pd_mask::<_CMP_GE_OQ>(v[j], _mm512_setzero_pd());
            let inside = _mm512_cmp_pd_mask::<_CMP_GT_OQ>(v[j], _mm512_set1_pd(-700.0)) & normal;
            out[j] = (y, pos | inside);
        }
        out
    };
    screened_map8::<4>(x, out, est, |x: &[f32], o: &mut [f32]| super::common::elu_f32(x, alpha, o))
}

/// sqil's tanh (`generic::tanh`) on eight f64 lanes given `a = |v|` and `e = exp_nonpos(-2a)`:
/// `common::tanh4`'s operations on 512-bit registers (the Taylor form below `TANH_SMALL`, else
/// `(1 - e) / (1 + e)`, v's sign put back): the same bits per lane.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn tanh8(v: __m512d, a: __m512d, e: __m512d) -> __m512d {
    use crate::generic::{TANH_SMALL, TANH_TAYLOR};
    let one = _mm512_set1_pd(1.0);
    let a2 = _mm512_mul_pd(a, a);
    let poly = _mm512_add_pd(_mm512_set1_pd(TANH_TAYLOR[1]), _mm512_mul_pd(a2, _mm512_set1_pd(TANH_TAYLOR[2])));
    let poly = _mm512_add_pd(_mm512_set1_pd(TANH_TAYLOR[0]), _mm512_mul_pd(a2, poly));
    let small = _mm512_add_pd(a, _mm512_mul_pd(_mm512_mul_pd(a, a2), poly));
    let big = _mm512_div_pd(_mm512_sub_pd(one, e), _mm512_add_pd(one, e));
    let t = _mm512_mask_blend_pd(_mm512_cmp_pd_mask::<_CMP_LT_OQ>(a, _mm512_set1_pd(TANH_SMALL)), big, small);
    // copysign(t, v): t's magnitude bits, v's sign bit.
    let sign = _mm512_set1_epi64(i64::MIN);
    _mm512_castsi512_pd(_mm512_or_si512(
        _mm512_andnot_si512(sign, _mm512_castpd_si512(t)),
        _mm512_and_si512(sign, _mm512_castpd_si512(v)),
    ))
}

/// `generic::tanh_f32` on AVX-512: four vectors of eight f64 lanes per step ([`exp_nonpos8xk`]
/// and [`tanh8`], the definition's operations per lane, so its bits), the last values (fewer than
/// 32) by the AVX2 form. (The AVX2 form on four lanes had served AVX-512 CPUs: 2.23 ns a value.)
///
/// # Safety
/// The CPU must support AVX-512 F, AVX2 and FMA; `x.len() == out.len()`.
#[target_feature(enable = "avx512f,avx2,fma")]
pub unsafe fn avx512_tanh_f32(x: &[f32], out: &mut [f32]) {
    let n = x.len();
    let mut i = 0;
    while i + 32 <= n {
        let mut v = [_mm512_setzero_pd(); 4];
        let mut a = v;
        let mut arg = v;
        for j in 0..4 {
            v[j] = _mm512_cvtps_pd(_mm256_loadu_ps(x.as_ptr().add(i + 8 * j)));
            a[j] = _mm512_abs_pd(v[j]);
            arg[j] = _mm512_mul_pd(a[j], _mm512_set1_pd(-2.0));
        }
        let e = exp_nonpos8xk::<4>(arg);
        for j in 0..4 {
            _mm256_storeu_ps(out.as_mut_ptr().add(i + 8 * j), _mm512_cvtpd_ps(tanh8(v[j], a[j], e[j])));
        }
        i += 32;
    }
    super::common::tanh_f32(&x[i..], &mut out[i..]);
}

/// `generic::gelu_tanh_f32` on eight f64 lanes: the definition's operations around sqil's tanh
/// (the Taylor form below `TANH_SMALL`, else `(1 - e) / (1 + e)`, `e = exp_nonpos(-2|u|)`), a
/// lane kept where `1 + tanh >= 0.5`, its result normal and its low 29 bits more than
/// `SCREEN_MARGIN` units from an f32 halfway point; the others by `generic::gelu_tanh`.
///
/// # Safety
/// The CPU must support AVX-512 F, AVX2 and FMA; `x.len() == out.len()`.
#[target_feature(enable = "avx512f,avx2,fma")]
pub unsafe fn avx512_gelu_tanh_f32(x: &[f32], out: &mut [f32]) {
    use crate::generic::{gelu_tanh, TANH_SMALL, TANH_TAYLOR};
    let c = (2.0 / std::f64::consts::PI).sqrt();
    let one = _mm512_set1_pd(1.0);
    let sign = _mm512_set1_epi64(i64::MIN);
    for (xs, os) in x.chunks(8).zip(out.chunks_mut(8)) {
        let m: u16 = (1 << xs.len()) - 1;
        let v = _mm512_cvtps_pd(_mm512_castps512_ps256(_mm512_maskz_loadu_ps(m, xs.as_ptr())));
        let x3 = _mm512_mul_pd(_mm512_mul_pd(_mm512_mul_pd(_mm512_set1_pd(0.044715), v), v), v);
        let u = _mm512_mul_pd(_mm512_set1_pd(c), _mm512_add_pd(v, x3));
        let a = _mm512_abs_pd(u);
        let [e] = exp_nonpos8xk::<1>([_mm512_mul_pd(a, _mm512_set1_pd(-2.0))]);
        let big = _mm512_div_pd(_mm512_sub_pd(one, e), _mm512_add_pd(one, e));
        let a2 = _mm512_mul_pd(a, a);
        let poly = _mm512_add_pd(_mm512_set1_pd(TANH_TAYLOR[1]), _mm512_mul_pd(a2, _mm512_set1_pd(TANH_TAYLOR[2])));
        let poly = _mm512_add_pd(_mm512_set1_pd(TANH_TAYLOR[0]), _mm512_mul_pd(a2, poly));
        let small = _mm512_add_pd(a, _mm512_mul_pd(_mm512_mul_pd(a, a2), poly));
        let t = _mm512_mask_blend_pd(_mm512_cmp_pd_mask::<_CMP_LT_OQ>(a, _mm512_set1_pd(TANH_SMALL)), big, small);
        let t = _mm512_castsi512_pd(_mm512_or_si512(
            _mm512_castpd_si512(t),
            _mm512_and_si512(_mm512_castpd_si512(u), sign),
        ));
        let onept = _mm512_add_pd(one, t);
        let g = _mm512_mul_pd(_mm512_mul_pd(_mm512_set1_pd(0.5), v), onept);
        let sure = far_from_halfway8(g)
            & _mm512_cmp_pd_mask::<_CMP_GE_OQ>(onept, _mm512_set1_pd(0.5))
            & _mm512_cmp_pd_mask::<_CMP_GE_OQ>(_mm512_abs_pd(g), _mm512_set1_pd(f64::from_bits(0x3870_0000_0000_0000)));
        let y = _mm512_cvtpd_ps(g);
        if sure as u16 & m == m {
            _mm512_mask_storeu_ps(os.as_mut_ptr(), m, _mm512_castps256_ps512(y));
        } else {
            let mut ys = [0f32; 8];
            _mm256_storeu_ps(ys.as_mut_ptr(), y);
            for (i, o) in os.iter_mut().enumerate() {
                *o = if sure >> i & 1 == 1 { ys[i] } else { gelu_tanh(xs[i] as f64) as f32 };
            }
        }
    }
}

/// The lanes of `y` whose low 29 bits (the bits f32 rounding drops) lie more than
/// `SCREEN_MARGIN` units from the halfway pattern `2^28`, as `generic::far_from_halfway`.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn far_from_halfway8(y: __m512d) -> __mmask8 {
    // `u = (bits - (2^28 - M)) mod 2^29` is `low - 2^28 + M` where that lies in [0, 2^29) and
    // past 2^28 + M where it wrapped, so `|low - 2^28| <= M` exactly when `u <= 2 M`: three
    // instructions (the absolute difference took four).
    use crate::generic::SCREEN_MARGIN;
    let shifted = _mm512_sub_epi64(_mm512_castpd_si512(y), _mm512_set1_epi64((1 << 28) - SCREEN_MARGIN));
    let u = _mm512_and_si512(shifted, _mm512_set1_epi64((1 << 29) - 1));
    _mm512_cmpgt_epu64_mask(u, _mm512_set1_epi64(2 * SCREEN_MARGIN))
}

/// The table of [`exp_table8xk`] in two registers: `2^(j/16)` (`generic::EXP2_16THS`) less each
/// index's `j << 48`. Adding the bits of `t` shifted left by 48 (n's low 16 bits, two's
/// complement, where `t = EXP_MAGIC + n` exactly) then adds `(n - j) << 48 = (n >> 4) << 52`,
/// the exponent of 2^(n >> 4), in integer arithmetic modulo 2^64: the same bits as subtracting
/// the magic's bits, shifting right by 4 and left by 52 (two instructions fewer per vector).
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn exp2_16ths_skewed() -> (__m512i, __m512i) {
    let skew: [i64; 16] = std::array::from_fn(|j| crate::generic::EXP2_16THS[j].to_bits() as i64 - ((j as i64) << 48));
    (_mm512_loadu_si512(skew.as_ptr().cast()), _mm512_loadu_si512(skew.as_ptr().add(8).cast()))
}

/// `generic::exp_table16` at `x` (at `-x` when `NEG`) on eight f64 lanes, `K` vectors
/// interleaved (its stages one after another over the `K` vectors), up to the table: each
/// vector's polynomial `e^r` and its `t`, which [`exp_table_scale8`] turns into the exponential.
/// The estimate of the exponential and of the sigmoid (`NEG` at `|x|`: the negation folded into
/// the multiply-adds' signs, the same roundings as negating first). The scaling is left to the
/// caller's per-vector step, where it interleaves with the other vectors' work; the AVX-512 sigmoid
/// measured 5% slower with every vector scaled first, or with `-|x|` formed by an instruction.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn exp_table8xk<const K: usize, const NEG: bool>(x: [__m512d; K]) -> ([__m512d; K], [__m512d; K]) {
    use crate::generic::{EXP_LN2_HI, EXP_LN2_LO, EXP_MAGIC};
    let (magic, c) = (_mm512_set1_pd(EXP_MAGIC), _mm512_set1_pd(16.0 * std::f64::consts::LOG2_E));
    let t = x.map(|x| if NEG { _mm512_fnmadd_pd(x, c, magic) } else { _mm512_fmadd_pd(x, c, magic) });
    let r: [__m512d; K] = std::array::from_fn(|j| {
        let n = _mm512_sub_pd(t[j], magic);
        let hi = _mm512_set1_pd(EXP_LN2_HI / 16.0);
        let r = if NEG { _mm512_fnmsub_pd(n, hi, x[j]) } else { _mm512_fnmadd_pd(n, hi, x[j]) };
        _mm512_fnmadd_pd(n, _mm512_set1_pd(EXP_LN2_LO / 16.0), r)
    });
    let mut p = [_mm512_set1_pd(1.0 / 120.0); K];
    for c in [1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        let c = _mm512_set1_pd(c);
        for j in 0..K {
            p[j] = _mm512_fmadd_pd(p[j], r[j], c);
        }
    }
    (p, t)
}

/// The last step of [`exp_table8xk`] for one vector: `p 2^(j/16) 2^(n >> 4)` for `n` in the low
/// bits of `t`, the table `tab` ([`exp2_16ths_skewed`]) looked up by one permute (it reads each
/// index's low four bits, which are n's: the magic's are zero).
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn exp_table_scale8(p: __m512d, t: __m512d, tab: (__m512i, __m512i)) -> __m512d {
    let tb = _mm512_castpd_si512(t);
    let scale = _mm512_add_epi64(_mm512_permutex2var_epi64(tab.0, tb, tab.1), _mm512_slli_epi64::<48>(tb));
    _mm512_mul_pd(p, _mm512_castsi512_pd(scale))
}

/// `generic::sigmoid_screened_table` on eight f64 lanes, `K` vectors interleaved
/// ([`exp_table8xk`] at `-|v|`): the results rounded to f32 and, per vector, the lanes whose
/// rounding is certain to be the definition's.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn sigmoid_screened8xk<const K: usize>(v: [__m512d; K]) -> ([__m256; K], [u8; K]) {
    let (one, tab) = (_mm512_set1_pd(1.0), exp2_16ths_skewed());
    let a: [__m512d; K] = v.map(|v| _mm512_abs_pd(v));
    let (p, t) = exp_table8xk::<K, true>(a);
    let mut sure = [0u8; K];
    let y = std::array::from_fn(|i| {
        let e = exp_table_scale8(p[i], t[i], tab);
        let num = _mm512_mask_blend_pd(_mm512_cmp_pd_mask::<_CMP_GE_OQ>(v[i], _mm512_setzero_pd()), e, one);
        let y = _mm512_div_pd(num, _mm512_add_pd(one, e));
        let inside = _mm512_cmp_pd_mask::<_CMP_LT_OQ>(a[i], _mm512_set1_pd(crate::generic::SCREEN_MAX_ABS));
        sure[i] = far_from_halfway8(y) & inside;
        _mm512_cvtpd_ps(y)
    });
    (y, sure)
}

/// [`crate::generic::sigmoid_f32`] on eight f64 lanes (`common::sigmoid_f32` on 512-bit
/// registers: the same operations per lane, so the same bits).
///
/// # Safety
/// The CPU must support AVX-512 F, AVX2 and FMA; `x.len() == out.len()`.
#[target_feature(enable = "avx512f,avx2,fma")]
pub unsafe fn avx512_sigmoid_f32(x: &[f32], out: &mut [f32]) {
    let n = x.len();
    let mut i = 0;
    // Four vectors per step (eight spill: slower), then one.
    while i + 32 <= n {
        sigmoid_block::<4>(x, out, i);
        i += 32;
    }
    while i + 8 <= n {
        sigmoid_block::<1>(x, out, i);
        i += 8;
    }
    for j in i..n {
        out[j] = crate::generic::sigmoid(x[j] as f64) as f32;
    }
}

/// [`avx512_sigmoid_f32`] on the `8 K` values at `x[i..]`: the screened form
/// (`generic::sigmoid_screened_table`); a vector with a lane it cannot vouch for is recomputed
/// by the definition.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn sigmoid_block<const K: usize>(x: &[f32], out: &mut [f32], i: usize) {
    let v: [__m512d; K] = std::array::from_fn(|j| _mm512_cvtps_pd(_mm256_loadu_ps(x.as_ptr().add(i + 8 * j))));
    let (y, sure) = sigmoid_screened8xk::<K>(v);
    // One branch for the K vectors in the common case (a branch per vector kept the vectors'
    // computations apart).
    if sure.iter().all(|&s| s == 0xff) {
        for (j, y) in y.iter().enumerate() {
            _mm256_storeu_ps(out.as_mut_ptr().add(i + 8 * j), *y);
        }
        return;
    }
    let one = _mm512_set1_pd(1.0);
    for j in 0..K {
        let y = if sure[j] == 0xff {
            y[j]
        } else {
            let na = _mm512_castsi512_pd(_mm512_or_si512(_mm512_castpd_si512(v[j]), _mm512_set1_epi64(i64::MIN)));
            let [e] = exp_nonpos8xk::<1>([na]);
            let num = _mm512_mask_blend_pd(_mm512_cmp_pd_mask::<_CMP_GE_OQ>(v[j], _mm512_setzero_pd()), e, one);
            _mm512_cvtpd_ps(_mm512_div_pd(num, _mm512_add_pd(one, e)))
        };
        _mm256_storeu_ps(out.as_mut_ptr().add(i + 8 * j), y);
    }
}

/// The loop of the screened f32 maps on eight f64 lanes ([`avx512_exp_f32`], [`avx512_log_f32`]):
/// `K` vectors per step through `est` (each vector's f64 results and the lanes its range
/// allows; all `K` at once, so it can interleave their chains), stored rounded to f32 where the screen ([`far_from_halfway8`]) takes every lane of
/// the step, else the step by `exact` (the definition); the last values by `exact`.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn screened_map8<const K: usize>(
    x: &[f32],
    out: &mut [f32],
    est: impl Fn([__m512d; K]) -> [(__m512d, __mmask8); K],
    exact: impl Fn(&[f32], &mut [f32]),
) {
    let n = x.len();
    let mut i = 0;
    while i + 8 * K <= n {
        let mut sure = true;
        let v = std::array::from_fn(|j| _mm512_cvtps_pd(_mm256_loadu_ps(x.as_ptr().add(i + 8 * j))));
        let y: [__m256; K] = est(v).map(|(y, ok)| {
            sure &= (far_from_halfway8(y) & ok) == 0xff;
            _mm512_cvtpd_ps(y)
        });
        if sure {
            for (j, y) in y.iter().enumerate() {
                _mm256_storeu_ps(out.as_mut_ptr().add(i + 8 * j), *y);
            }
        } else {
            exact(&x[i..i + 8 * K], &mut out[i..i + 8 * K]);
        }
        i += 8 * K;
    }
    exact(&x[i..], &mut out[i..]);
}

/// [`crate::generic::exp_f32`] on eight f64 lanes, four vectors per step ([`screened_map8`]): the
/// operations of [`crate::generic::exp_screened`] per lane ([`exp_table8xk`], [`exp_table_scale8`]).
///
/// # Safety
/// The CPU must support AVX-512 F, AVX2 and FMA; `x.len() == out.len()`.
#[target_feature(enable = "avx512f,avx2,fma")]
pub unsafe fn avx512_exp_f32(x: &[f32], out: &mut [f32]) {
    use crate::generic::{EXP_SCREEN_HI, EXP_SCREEN_LO};
    let tab = exp2_16ths_skewed();
    let (lo, hi) = (_mm512_set1_pd(EXP_SCREEN_LO), _mm512_set1_pd(EXP_SCREEN_HI));
    let est = |v: [__m512d; 4]| {
        let (p, t) = exp_table8xk::<4, false>(v);
        std::array::from_fn(|j| {
            let inside = _mm512_cmp_pd_mask::<_CMP_GT_OQ>(v[j], lo) & _mm512_cmp_pd_mask::<_CMP_LT_OQ>(v[j], hi);
            (exp_table_scale8(p[j], t[j], tab), inside)
        })
    };
    screened_map8::<4>(x, out, est, crate::generic::generic_exp_f32)
}

/// [`crate::generic::log_f32`] on eight f64 lanes, two vectors per step ([`screened_map8`]): the
/// operations of [`crate::generic::log_screened`] per lane.
///
/// # Safety
/// The CPU must support AVX-512 F, AVX2 and FMA; `x.len() == out.len()`.
#[target_feature(enable = "avx512f,avx2,fma")]
pub unsafe fn avx512_log_f32(x: &[f32], out: &mut [f32]) {
    use crate::generic::{EXP_LN2_HI, EXP_LN2_LO, LOG_SERIES, LOG_TWO52};
    let one = _mm512_set1_pd(1.0);
    let est = |vs: [__m512d; 2]| {
        std::array::from_fn(|j| {
            let v = vs[j];
            let bits = _mm512_castpd_si512(v);
            let ef = _mm512_or_si512(_mm512_srli_epi64::<52>(bits), _mm512_set1_epi64(0x4330_0000_0000_0000));
            let e = _mm512_sub_pd(_mm512_castsi512_pd(ef), _mm512_set1_pd(LOG_TWO52 + 1023.0));
            let mb = _mm512_or_si512(
                _mm512_and_si512(bits, _mm512_set1_epi64((1 << 52) - 1)),
                _mm512_set1_epi64(1023 << 52),
            );
            let m = _mm512_castsi512_pd(mb);
            let big = _mm512_cmp_pd_mask::<_CMP_GT_OQ>(m, _mm512_set1_pd(std::f64::consts::SQRT_2));
            let m = _mm512_mask_mul_pd(m, big, m, _mm512_set1_pd(0.5));
            let e = _mm512_mask_add_pd(e, big, e, one);
            let s = _mm512_div_pd(_mm512_sub_pd(m, one), _mm512_add_pd(m, one));
            let z = _mm512_mul_pd(s, s);
            let mut p = _mm512_set1_pd(LOG_SERIES[7]);
            for &c in LOG_SERIES[..7].iter().rev() {
                p = _mm512_fmadd_pd(p, z, _mm512_set1_pd(c));
            }
            let lm = _mm512_mul_pd(_mm512_add_pd(s, s), p);
            let y = _mm512_fmadd_pd(e, _mm512_set1_pd(EXP_LN2_HI), _mm512_fmadd_pd(e, _mm512_set1_pd(EXP_LN2_LO), lm));
            let inside = _mm512_cmp_pd_mask::<_CMP_GT_OQ>(v, _mm512_setzero_pd())
                & _mm512_cmp_pd_mask::<_CMP_LT_OQ>(v, _mm512_set1_pd(f64::INFINITY));
            (y, inside)
        })
    };
    screened_map8::<2>(x, out, est, crate::generic::generic_log_f32)
}

/// `avx2_softmax_rows` with eight-lane exponentials and divisions (equal bit for bit); `log`:
/// LogSoftmax.
///
/// # Safety
/// The CPU must support AVX-512 F, AVX2 and FMA; `x.len() == out.len()`, `dim > 0`.
#[target_feature(enable = "avx512f,avx2,fma")]
pub unsafe fn avx512_softmax_rows(x: &[f32], dim: usize, out: &mut [f32], log: bool) {
    softmax_rows_impl::<Vnni>(x, dim, out, log)
}

/// `avx2_channels` with the integer sums by `vpdpbusd` (the same int32 sums, the same epilogue:
/// equal bit for bit).
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VNNI, AVX2 and FMA; as `avx2_channels`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
pub(crate) unsafe fn avx512_channels<X: LaneInput>(
    w: &PackedQ4,
    xs: &[X],
    bias: Option<&[f32]>,
    y: &mut [f32],
    strides: (usize, usize),
    rows: std::ops::Range<usize>,
) {
    channels_impl::<X, Vnni>(w, xs, bias, y, strides, rows)
}

/// W4A8 of one block of 32 output channels against `NP` rows with the channels in vector lanes,
/// the weights as half bytes ([`crate::packed::NibbleTiles`]): per quad one 64-byte load of the
/// block's `q + 8` (channel c low nibble, c + 16 high), and `vpdpbusd` multiplies the whole bytes
/// and their masked high halves (unsigned) by each row's four signed bytes broadcast (the rows as
/// they are: no sign flip); per group the difference is the low channels' sum, a sixteenth of the
/// high halves' the high channels'. Per group the exact `sum (q + 8) x` less `8 sum(x)` (the row's
/// group sum) and `zero sum(q)` is `sum (x - zero) q`, the integer the other kernels reach, then the shared
/// epilogue per lane: equal bit for bit. `SPLIT` independent accumulator sets over alternate
/// quads (summed exactly per group) keep one or two rows from waiting on `vpdpbusd`'s latency.
/// `OWN_SUMS` (one row): the weights' group sums by `vpdpbusd` against ones from the bytes in
/// registers, not read from `sums` (a tenth of a layer's bytes at groups of 64).
#[inline(always)]
unsafe fn nibble_block<const NP: usize, const SPLIT: usize, const OWN_SUMS: bool>(
    w: &PackedQ4,
    t: &crate::packed::NibbleTiles,
    cb: usize,
    xs: [&QRow; NP],
) -> [[__m512; 2]; NP] {
    let groups = w.groups();
    let quads = w.group / 4;
    debug_assert!(quads.is_multiple_of(SPLIT));
    let m_hi = _mm512_set1_epi8(0xF0u8 as i8);
    let ones = _mm512_set1_epi8(1);
    let same_zero = xs.iter().all(|x| x.zero == xs[0].zero);
    let mut accf = [[_mm512_setzero_ps(); 2]; NP];
    for g in 0..groups {
        let base = t.data.as_ptr().add((cb * groups + g) * quads * 64);
        let xo = g * w.group;
        let mut acc = [[[_mm512_setzero_si512(); 2]; NP]; SPLIT];
        let mut own = [[_mm512_setzero_si512(); 2]; SPLIT];
        let mut quad = 0;
        while quad < quads {
            for (s, acc) in acc.iter_mut().enumerate() {
                // The whole bytes (`lo + 16 hi`) and their high halves (`16 hi`): one mask per
                // quad; the two channel halves are separated per group.
                let v = _mm512_loadu_si512(base.add((quad + s) * 64) as *const __m512i);
                let hi16 = _mm512_and_si512(v, m_hi);
                if OWN_SUMS {
                    own[s][0] = _mm512_dpbusd_epi32(own[s][0], v, ones);
                    own[s][1] = _mm512_dpbusd_epi32(own[s][1], hi16, ones);
                }
                for c in 0..NP {
                    let x4 = std::ptr::read_unaligned(xs[c].q.as_ptr().add(xo + 4 * (quad + s)) as *const i32);
                    let xb = _mm512_set1_epi32(x4);
                    acc[c][0] = _mm512_dpbusd_epi32(acc[c][0], v, xb);
                    acc[c][1] = _mm512_dpbusd_epi32(acc[c][1], hi16, xb);
                }
            }
            quad += SPLIT;
        }
        // Per row: sum (lo + 16 hi) x and sum 16 hi x, exact (|sum| < group * 255 * 128 < 2^31:
        // the dispatch keeps groups within `NIBBLE_LANES_MAX_GROUP`), into the low channels'
        // sum (the difference) and the high channels' (a sixteenth, exact).
        let halves: [[__m512i; 2]; NP] =
            std::array::from_fn(|c| nibble_halves::<SPLIT>(std::array::from_fn(|s| acc[s][c])));
        let at = (cb * groups + g) * 32;
        // The weights' sums from the bytes just read (`sum (q + 8) - 8 group`, the padding's
        // weights included, as the stored sums have them) instead of from memory: where the
        // weights stream from L3 at one row, their bytes bound the time, not `vpdpbusd`.
        let own: [__m512i; 2] = if OWN_SUMS {
            let eight = _mm512_set1_epi32(8 * w.group as i32);
            let [lo, hi] = nibble_halves::<SPLIT>(own);
            [_mm512_sub_epi32(lo, eight), _mm512_sub_epi32(hi, eight)]
        } else {
            [_mm512_setzero_si512(); 2]
        };
        for h in 0..2 {
            let ws =
                if OWN_SUMS { own[h] } else { _mm512_loadu_si512(t.sums.as_ptr().add(at + 16 * h) as *const __m512i) };
            let sc = _mm512_loadu_ps(t.scales.as_ptr().add(at + 16 * h));
            let zw0 = _mm512_mullo_epi32(_mm512_set1_epi32(xs[0].zero), ws);
            for c in 0..NP {
                let a = halves[c][h];
                let zw = if same_zero { zw0 } else { _mm512_mullo_epi32(_mm512_set1_epi32(xs[c].zero), ws) };
                let corr = _mm512_add_epi32(zw, _mm512_set1_epi32(8 * xs[c].sums[g]));
                let v = _mm512_sub_epi32(a, corr);
                // The epilogue's order: product rounded, then added.
                accf[c][h] = _mm512_add_ps(accf[c][h], _mm512_mul_ps(_mm512_cvtepi32_ps(v), sc));
            }
        }
    }
    accf
}

/// [`nibble_block`]'s split of its `SPLIT` sets of sums over the whole bytes (`lo + 16 hi`) and
/// the high halves (`16 hi`) into the low channels' sum (the difference) and the high channels'
/// (a sixteenth, exact).
#[inline(always)]
unsafe fn nibble_halves<const SPLIT: usize>(sets: [[__m512i; 2]; SPLIT]) -> [__m512i; 2] {
    let (mut whole, mut high) = (sets[0][0], sets[0][1]);
    for set in &sets[1..] {
        whole = _mm512_add_epi32(whole, set[0]);
        high = _mm512_add_epi32(high, set[1]);
    }
    [_mm512_sub_epi32(whole, high), _mm512_srai_epi32::<4>(high)]
}

/// W4A8 of rows `rows_in` of `w` (start a multiple of 32) on a batch of rows with the channels in
/// vector lanes and the weights as half bytes (see [`nibble_block`]): up to six rows per pass over a
/// block (twelve int32 and twelve float accumulators), one or two with split accumulators; output
/// `(c, r)` goes to `y[c * cs + (r - rows_in.start) * rs]`. Equal bit for bit to
/// `generic::generic_q4q8_row`.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VNNI; each row's `q` holds `w.k_pad` values and its `sums`
/// `w.groups()`; `y` holds every output index of these rows and inputs.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(crate) unsafe fn avx512_nibble_lanes(
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
            let mut acc = [[_mm512_setzero_ps(); 2]; 6];
            let left = xs.len() - c;
            let np = match left {
                1 => {
                    acc[0] = nibble_block::<1, 2, true>(w, t, cb, [&xs[c]])[0];
                    1
                }
                2 => {
                    acc[..2].copy_from_slice(&nibble_block::<2, 2, false>(w, t, cb, [&xs[c], &xs[c + 1]]));
                    2
                }
                3 => {
                    acc[..3].copy_from_slice(&nibble_block::<3, 1, false>(w, t, cb, [&xs[c], &xs[c + 1], &xs[c + 2]]));
                    3
                }
                4 | 8 => {
                    let a = nibble_block::<4, 1, false>(w, t, cb, std::array::from_fn(|i| &xs[c + i]));
                    acc[..4].copy_from_slice(&a);
                    4
                }
                5 | 9 => {
                    let a = nibble_block::<5, 1, false>(w, t, cb, std::array::from_fn(|i| &xs[c + i]));
                    acc[..5].copy_from_slice(&a);
                    5
                }
                _ => {
                    let a = nibble_block::<6, 1, false>(w, t, cb, std::array::from_fn(|i| &xs[c + i]));
                    acc[..6].copy_from_slice(&a);
                    6
                }
            };
            lane_rows_out(&acc[..np], &xs[c..c + np], &b, y, (cs, rs), (c, 32 * cb - r0, rows));
            c += np;
        }
    }
}

/// The row-lane kernels' last step for one block of 32 channels and the rows `xs` (the batch's
/// rows `c..`): each row's float sums times its scale, plus the block's bias `b` (product rounded,
/// then added), stored to `y[(c + i) * cs + (o + l) * rs]` for the block's `rows` live channels.
#[inline(always)]
unsafe fn lane_rows_out(
    acc: &[[__m512; 2]],
    xs: &[QRow],
    b: &[f32; 32],
    y: &mut [f32],
    (cs, rs): (usize, usize),
    (c, o, rows): (usize, usize, usize),
) {
    for (i, acc) in acc.iter().enumerate() {
        let scale = _mm512_set1_ps(xs[i].scale);
        let v = [
            _mm512_add_ps(_mm512_mul_ps(acc[0], scale), _mm512_loadu_ps(b.as_ptr())),
            _mm512_add_ps(_mm512_mul_ps(acc[1], scale), _mm512_loadu_ps(b.as_ptr().add(16))),
        ];
        let at = (c + i) * cs + o * rs;
        if rs == 1 {
            // Straight into the output (masked past `rows`), not through a staging copy.
            let dst = &mut y[at..at + rows];
            let (m0, m1) = (rows.min(16) as u32, rows.saturating_sub(16) as u32);
            _mm512_mask_storeu_ps(dst.as_mut_ptr(), ((1u32 << m0) - 1) as __mmask16, v[0]);
            if m1 > 0 {
                _mm512_mask_storeu_ps(dst.as_mut_ptr().add(16), ((1u32 << m1) - 1) as __mmask16, v[1]);
            }
        } else {
            let mut out = [0f32; 32];
            for (h, v) in v.iter().enumerate() {
                _mm512_storeu_ps(out.as_mut_ptr().add(16 * h), *v);
            }
            for (l, &v) in out[..rows].iter().enumerate() {
                y[at + l * rs] = v;
            }
        }
    }
}

/// W4A8 of one block of 32 output channels against `NP` rows with the channels in vector lanes
/// and the weights one signed byte each (`wb`: the block's half bytes unpacked by
/// [`unpack_nibble_block`], the [`ChannelTiles`] layout): per quad two 64-byte loads (the block's
/// 32 channels), each row's four bytes with the sign bit flipped (`x + 128`, unsigned, flipped
/// once per call into `xf`) broadcast, and `vpdpbusd` into int32 lanes that start each group at
/// `-(128 + zero) sum(q)` (`start`, for one zero shared by the rows; else per row from `zeros`),
/// so the group's sum is `sum (x - zero) q` with no correction after it; then per group one
/// conversion, product and addition per lane (the epilogue's order: product rounded, then added).
/// Equal bit for bit to the other kernels. Against [`nibble_block`]: per row and group 6
/// instructions besides `vpdpbusd` instead of 12, and no mask per quad per row pass.
#[inline(always)]
unsafe fn byte_block<const NP: usize>(
    w: &PackedQ4,
    (scales, sums): (&[f32], &[i32]),
    (cb, wb): (usize, *const i8),
    xf: [*const u8; NP],
    start: &[i32],
    zeros: Option<[i32; NP]>,
) -> [[__m512; 2]; NP] {
    let groups = w.groups();
    let quads = w.group / 4;
    let mut accf = [[_mm512_setzero_ps(); 2]; NP];
    for g in 0..groups {
        let base = wb.add(g * quads * 128);
        let at = (cb * groups + g) * 32;
        let mut acc: [[__m512i; 2]; NP] = match zeros {
            None => {
                let st = [
                    _mm512_loadu_si512(start.as_ptr().add(32 * g) as *const __m512i),
                    _mm512_loadu_si512(start.as_ptr().add(32 * g + 16) as *const __m512i),
                ];
                [st; NP]
            }
            Some(z) => std::array::from_fn(|c| {
                let zc = _mm512_set1_epi32(-(128 + z[c]));
                std::array::from_fn(|h| {
                    _mm512_mullo_epi32(zc, _mm512_loadu_si512(sums.as_ptr().add(at + 16 * h) as *const __m512i))
                })
            }),
        };
        let xo = g * w.group;
        // Four quads per step (groups hold a multiple of eight): one address per row per step,
        // the rest displacements, so the loop's scalar work stays off the vector ports.
        for q4 in (0..quads).step_by(4) {
            let xr: [*const u8; NP] = std::array::from_fn(|c| xf[c].add(xo + 4 * q4));
            for u in 0..4 {
                let wp = base.add((q4 + u) * 128);
                let w0 = _mm512_loadu_si512(wp as *const __m512i);
                let w1 = _mm512_loadu_si512(wp.add(64) as *const __m512i);
                for c in 0..NP {
                    let xb = _mm512_set1_epi32(std::ptr::read_unaligned(xr[c].add(4 * u) as *const i32));
                    acc[c][0] = _mm512_dpbusd_epi32(acc[c][0], xb, w0);
                    acc[c][1] = _mm512_dpbusd_epi32(acc[c][1], xb, w1);
                }
            }
        }
        for h in 0..2 {
            let sc = _mm512_loadu_ps(scales.as_ptr().add(at + 16 * h));
            for c in 0..NP {
                accf[c][h] = _mm512_add_ps(accf[c][h], _mm512_mul_ps(_mm512_cvtepi32_ps(acc[c][h]), sc));
            }
        }
    }
    accf
}

/// Block `cb` of the half-byte tiles as signed bytes in the [`ChannelTiles`] layout (per quad the
/// low nibbles, channels 0-15, then the high ones, channels 16-31, each less 8), into `wb`
/// (`groups * group * 32` bytes): five instructions per quad, once per block and call.
#[inline(always)]
unsafe fn unpack_nibble_block(t: &crate::packed::NibbleTiles, cb: usize, quads_per_block: usize, wb: &mut [i8]) {
    debug_assert!(wb.len() >= quads_per_block * 128);
    let (m4, eight) = (_mm512_set1_epi8(0x0F), _mm512_set1_epi8(8));
    let src = t.data.as_ptr().add(cb * quads_per_block * 64);
    for quad in 0..quads_per_block {
        let v = _mm512_loadu_si512(src.add(quad * 64) as *const __m512i);
        let lo = _mm512_sub_epi8(_mm512_and_si512(v, m4), eight);
        let hi = _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16::<4>(v), m4), eight);
        _mm512_storeu_si512(wb.as_mut_ptr().add(quad * 128) as *mut __m512i, lo);
        _mm512_storeu_si512(wb.as_mut_ptr().add(quad * 128 + 64) as *mut __m512i, hi);
    }
}

/// W4A8 of rows `rows_in` of `w` (start a multiple of 32) on a batch of rows with the channels in
/// vector lanes and the weights one signed byte each (see [`byte_block`]): up to six rows per pass
/// over a block (twelve int32 and twelve float accumulators); output `(c, r)` goes to
/// `y[c * cs + (r - rows_in.start) * rs]`. Equal bit for bit to `generic::generic_q4q8_row`.
/// Taken over [`avx512_nibble_lanes`] for batches of [`crate::BYTE_ROWS_MIN`] rows or more: half
/// the instructions per row and group besides `vpdpbusd` (the 4x1024 MLP at 64 rows: 1095-1098 ->
/// 975-996 us per batch here, min of 1000, three interleaved rounds).
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VNNI; each row's `q` holds `w.k_pad` values; `y` holds
/// every output index of these rows and inputs; `w.group` is at most
/// [`crate::NIBBLE_LANES_MAX_GROUP`] (int32 sums exact).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(crate) unsafe fn avx512_byte_rows(
    w: &PackedQ4,
    xs: &[QRow],
    bias: Option<&[f32]>,
    y: &mut [f32],
    (cs, rs): (usize, usize),
    rows_in: std::ops::Range<usize>,
) {
    debug_assert!(rows_in.start.is_multiple_of(32) && rows_in.end <= w.n);
    if xs.is_empty() {
        return;
    }
    let (groups, k) = (w.groups(), w.k_pad);
    let quads_per_block = groups * w.group / 4;
    // The weights as signed bytes: the layer's byte copy where it stays within
    // `LANES_MAX_BYTES` (built on first use, as the AVX2 lane kernel's; 10% faster here at 64
    // rows), else each block unpacked from the half bytes once per call (L1- or L2-resident
    // across the block's row passes; no second copy of a large layer kept).
    let bytes = crate::lanes_at_small_batch(w).then(|| w.channel_tiles());
    let halves = if bytes.is_none() { Some(w.nibble_tiles()) } else { None };
    let (scales, sums): (&[f32], &[i32]) = match (bytes, halves) {
        (Some(c), _) => (&c.scales, &c.sums),
        (None, Some(t)) => (&t.scales, &t.sums),
        (None, None) => unreachable!("one of the two layouts is built"),
    };
    // 64-byte aligned: each 64-byte load then touches one cache line (a split load costs two).
    let mut wb_buf = vec![0i8; if bytes.is_some() { 0 } else { quads_per_block * 128 } + 64];
    let off = wb_buf.as_ptr().align_offset(64);
    let wb = &mut wb_buf[off..off + if bytes.is_some() { 0 } else { quads_per_block * 128 }];
    // The rows' bytes as `vpdpbusd`'s unsigned operand (`x + 128`), flipped once per call.
    let mut xf = vec![0u8; xs.len() * k];
    let flip = _mm512_set1_epi8(-128i8);
    for (c, x) in xs.iter().enumerate() {
        let (src, dst) = (x.q.as_ptr(), xf.as_mut_ptr().add(c * k));
        for i in (0..k).step_by(64) {
            let m: __mmask64 = if k - i >= 64 { !0 } else { (1u64 << (k - i)) - 1 };
            let v = _mm512_maskz_loadu_epi8(m, src.add(i));
            _mm512_mask_storeu_epi8(dst.add(i) as *mut i8, m, _mm512_xor_si512(v, flip));
        }
    }
    let same_zero = xs.iter().all(|x| x.zero == xs[0].zero);
    // Per group of the block, `-(128 + zero) sum(q)` for the rows' shared zero.
    let mut start = vec![0i32; groups * 32];
    let zc = _mm512_set1_epi32(-(128 + xs[0].zero));
    let r0 = rows_in.start;
    let mut b = [0f32; 32];
    for cb in r0 / 32..rows_in.end.div_ceil(32) {
        let rows = (rows_in.end - 32 * cb).min(32);
        block_bias(bias, (cb, rows), &mut b);
        let wbase = match (bytes, halves) {
            (Some(c), _) => c.data.as_ptr().add(cb * quads_per_block * 128),
            (None, Some(t)) => {
                unpack_nibble_block(t, cb, quads_per_block, wb);
                wb.as_ptr()
            }
            (None, None) => unreachable!("one of the two layouts is built"),
        };
        if same_zero {
            for (i, st) in start.chunks_exact_mut(16).enumerate() {
                let ws = _mm512_loadu_si512(sums.as_ptr().add(cb * groups * 32 + 16 * i) as *const __m512i);
                _mm512_storeu_si512(st.as_mut_ptr() as *mut __m512i, _mm512_mullo_epi32(zc, ws));
            }
        }
        let mut c = 0;
        while c < xs.len() {
            let np = match xs.len() - c {
                left @ 1..=6 => left,
                7 | 8 => 4,
                9 => 5,
                _ => 6,
            };
            let p = |i: usize| xf.as_ptr().add((c + i) * k);
            let z = |i: usize| xs[c + i].zero;
            macro_rules! pass {
                ($n:literal) => {{
                    let zeros = if same_zero { None } else { Some(std::array::from_fn::<i32, $n, _>(z)) };
                    let a = byte_block::<$n>(w, (scales, sums), (cb, wbase), std::array::from_fn(p), &start, zeros);
                    lane_rows_out(&a, &xs[c..c + $n], &b, y, (cs, rs), (c, 32 * cb - r0, rows));
                }};
            }
            match np {
                1 => pass!(1),
                2 => pass!(2),
                3 => pass!(3),
                4 => pass!(4),
                5 => pass!(5),
                _ => pass!(6),
            }
            c += np;
        }
    }
}

/// Rows' int8 values (`rows[o].q`: position `o`, at least `4 * ceil(k / 4)` values each) into the
/// pointwise kernel's words, as [`avx512_interleave_quads`] writes them from planes: `x4[q * p_pad
/// + o]` holds values `4q..4q + 4` of row `o`, each byte with its sign bit flipped; values past `k`
/// and rows past `rows.len()` (up to `p_pad`, a multiple of 16) as 0x80 (zero). Sixteen rows by
/// sixteen quads at a time: one masked 64-byte load per row, the 16 x 16 word transpose in
/// registers ([`transpose16`]), one store per quad.
///
/// # Safety
/// The CPU must support AVX-512 F/BW (the sizes are asserted).
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn avx512_rows_to_quads(rows: &[QRow], k: usize, p_pad: usize, x4: &mut [u32]) {
    let live = k.div_ceil(4);
    assert!(p_pad.is_multiple_of(16) && p_pad >= rows.len() && x4.len() >= live * p_pad);
    assert!(rows.iter().all(|r| r.q.len() >= 4 * live));
    let flip = _mm512_set1_epi8(i8::MIN);
    for o0 in (0..p_pad).step_by(16) {
        for q0 in (0..live).step_by(16) {
            // The bytes of this block's quads that hold values (past k: zero, as the kernel's
            // padding weights multiply them).
            let bytes = (k - 4 * q0).min(64);
            let m: __mmask64 = if bytes == 64 { !0 } else { (1u64 << bytes) - 1 };
            let r: [__m512; 16] = std::array::from_fn(|i| {
                let v = match rows.get(o0 + i) {
                    // SAFETY: the row holds 4 * live >= 4 * q0 + bytes values.
                    Some(row) => _mm512_maskz_loadu_epi8(m, row.q.as_ptr().add(4 * q0)),
                    None => _mm512_setzero_si512(),
                };
                _mm512_castsi512_ps(_mm512_xor_si512(v, flip))
            });
            let t = transpose16(r);
            for (j, v) in t.iter().enumerate().take(live - q0) {
                _mm512_storeu_ps(x4.as_mut_ptr().add((q0 + j) * p_pad + o0) as *mut f32, *v);
            }
        }
    }
}

/// Interleaves four channel planes of an int8 image (`planes` `[C][P]`, C = `ch`) into the
/// pointwise kernel's words: `x4[q * p_pad + o]` holds channels `4q..4q + 4` of position `o`, one
/// byte each with the sign bit flipped (`x + 128` as unsigned, `vpdpbusd`'s unsigned operand);
/// channels past `ch` and positions past `p` as 0x80 (zero).
///
/// # Safety
/// The CPU must support AVX-512 F/BW and AVX2 (the buffer sizes are asserted).
#[target_feature(enable = "avx512f,avx512bw,avx2")]
pub unsafe fn avx512_interleave_quads(planes: &[i8], ch: usize, p: usize, p_pad: usize, x4: &mut [u32]) {
    avx512_interleave_quads_images(planes, ch, (1, p), p_pad, x4)
}

/// [`avx512_interleave_quads`] of `images` images of `p` positions each (`planes` holds them one
/// after the other, each `[C][p]`), side by side: position `o` of image `g` at word `g * p + o`
/// of each row; the words from `images * p` to `p_pad` as 0x80 (zero).
///
/// # Safety
/// The CPU must support AVX-512 F/BW and AVX2 (the buffer sizes are asserted).
#[target_feature(enable = "avx512f,avx512bw,avx2")]
pub unsafe fn avx512_interleave_quads_images(
    planes: &[i8],
    ch: usize,
    (images, p): (usize, usize),
    p_pad: usize,
    x4: &mut [u32],
) {
    let kq = x4.len() / p_pad;
    assert!(planes.len() >= images * ch * p && kq * 4 >= ch && p_pad >= images * p);
    for q in 0..kq {
        let row = &mut x4[q * p_pad..(q + 1) * p_pad];
        for g in 0..images {
            let image = &planes[g * ch * p..(g + 1) * ch * p];
            // The last image's run goes on to the row's end (zeros past its positions).
            let end = if g + 1 == images { p_pad } else { (g + 1) * p };
            interleave_run(image, ch, p, q, &mut row[g * p..end]);
        }
    }
}

/// Row `q` of [`avx512_interleave_quads`] for one image: `dst[o]` the quad of channels `4q..4q +
/// 4` of position `o`, 0x80 bytes past `p` positions and `ch` channels. 32 positions per step,
/// the last step's loads masked at `p` (a 3 x 3 map is one step).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx2")]
unsafe fn interleave_run(planes: &[i8], ch: usize, p: usize, q: usize, dst: &mut [u32]) {
    let flip = _mm256_set1_epi8(i8::MIN);
    let plane = |c: usize| if c < ch { Some(&planes[c * p..(c + 1) * p]) } else { None };
    let ps = [plane(4 * q), plane(4 * q + 1), plane(4 * q + 2), plane(4 * q + 3)];
    let len = dst.len();
    let mut o = 0;
    while o < p && o < len {
        let keep: u64 = if p - o >= 32 { u32::MAX as u64 } else { (1u64 << (p - o)) - 1 };
        let ld = |pl: Option<&[i8]>| match pl {
            // SAFETY: the mask keeps the bytes below p, the plane's length.
            Some(pl) => _mm512_castsi512_si256(_mm512_maskz_loadu_epi8(keep, pl.as_ptr().add(o))),
            None => _mm256_setzero_si256(),
        };
        let (p0, p1, p2, p3) = (ld(ps[0]), ld(ps[1]), ld(ps[2]), ld(ps[3]));
        let out = super::common::quads32(p0, p1, p2, p3);
        for (i, v) in out.into_iter().enumerate() {
            let (at, v) = (o + 8 * i, _mm512_castsi256_si512(_mm256_xor_si256(v, flip)));
            // Words past p hold zeros (0x80 bytes); those past the run are not stored.
            let words = len.saturating_sub(at).min(8);
            // SAFETY: the mask keeps the store within dst.
            _mm512_mask_storeu_epi32(
                dst.as_mut_ptr().add(at.min(len)) as *mut i32,
                ((1u32 << words) - 1) as __mmask16,
                v,
            );
        }
        o += 32;
    }
    dst[o.min(len)..].fill(0x8080_8080);
}

/// [`crate::generic::Post`] ops on sixteen lanes, as [`crate::generic::post8`] on eight: the
/// same comparisons (`vmaxps`/`vminps` return their second operand, the value, when it is NaN)
/// and the vector quantizer's operations (divide, round half to even, add the zero point,
/// clamp, subtract it, multiply by the scale).
///
/// # Safety
/// The CPU must support AVX-512 F.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
pub unsafe fn post16(mut v: __m512, post: &[crate::generic::Post]) -> __m512 {
    use crate::generic::Post;
    for p in post {
        v = match *p {
            Post::Relu => _mm512_max_ps(_mm512_setzero_ps(), v),
            Post::Clip(lo, hi) => _mm512_min_ps(_mm512_set1_ps(hi), _mm512_max_ps(_mm512_set1_ps(lo), v)),
            Post::FakeQuant { scale, zero, lo, hi } => FakeQuant16::new((scale, zero, lo, hi)).apply(v),
            // `v < 0` ordered: NaN and -0 keep `v`.
            Post::LeakyRelu(a) => {
                let neg = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(v, _mm512_setzero_ps());
                _mm512_mask_mul_ps(v, neg, v, _mm512_set1_ps(a))
            }
            // Not in registers (see `post_split`): lane by lane.
            p => {
                let mut a = [0f32; 16];
                _mm512_storeu_ps(a.as_mut_ptr(), v);
                a.iter_mut().for_each(|x| *x = crate::generic::post_one(*x, std::slice::from_ref(&p)));
                _mm512_loadu_ps(a.as_ptr())
            }
        };
    }
    v
}

/// `avx2_quantize_i8` on sixteen lanes, 64 values per step (the levels through
/// [`round_quotient16`], clamped with NaN kept, NaN to 0 as `as i8` does, narrowed by `vpmovsdb`:
/// the levels lie in [-128, 127]); the last values (fewer than 64) by the AVX2 form. The same
/// bytes. Returns whether any value was NaN.
///
/// # Safety
/// The CPU must support AVX-512 F, AVX2 and FMA.
#[target_feature(enable = "avx512f,avx2,fma")]
pub unsafe fn avx512_quantize_i8(x: &[f32], scale: f32, zero: i32, lo: i32, hi: i32, out: &mut [i8]) -> bool {
    let n = x.len().min(out.len());
    let fq = FakeQuant16::new((scale, zero as f32, lo.max(-128) as f32, hi.min(127) as f32));
    let mut ordered: __mmask16 = 0xffff;
    let mut i = 0;
    while i + 64 <= n {
        for j in 0..4 {
            let y = fq.level(_mm512_loadu_ps(x.as_ptr().add(i + 16 * j)));
            let ord = _mm512_cmp_ps_mask::<_CMP_ORD_Q>(y, y);
            ordered &= ord;
            let l = _mm512_maskz_cvtps_epi32(ord, y);
            _mm_storeu_si128(out.as_mut_ptr().add(i + 16 * j) as *mut __m128i, _mm512_cvtsepi32_epi8(l));
        }
        i += 64;
    }
    let rest = super::avx2::avx2_quantize_i8(&x[i..n], scale, zero, lo, hi, &mut out[i..n]);
    ordered != 0xffff || rest
}

/// `avx2::fake_quant_ptr` on sixteen lanes: `n` values from `x` to `out`, which may be the same buffer
/// (each vector loaded before its result is stored), the levels through [`round_quotient16`]
/// back to values; the last values (fewer than 16) by the AVX2 form. The same bits.
///
/// # Safety
/// AVX-512 F, AVX2 and FMA; `x` readable and `out` writable for `n` values, equal or disjoint.
#[target_feature(enable = "avx512f,avx2,fma")]
pub unsafe fn avx512_fake_quant_ptr(x: *const f32, out: *mut f32, n: usize, q: (f32, f32, f32, f32)) {
    let fq = FakeQuant16::new(q);
    let mut i = 0;
    while i + 16 <= n {
        _mm512_storeu_ps(out.add(i), fq.apply(_mm512_loadu_ps(x.add(i))));
        i += 16;
    }
    super::avx2::fake_quant_ptr(x.add(i), out.add(i), n - i, q);
}

/// A FakeQuant `(scale, zero, lo, hi)` on sixteen lanes (its constants broadcast once): the level
/// through [`round_quotient16`], clamped (NaN stays NaN; [`FakeQuant16::level`]), then `(level -
/// zero) * scale` ([`FakeQuant16::apply`]).
#[derive(Clone, Copy)]
struct FakeQuant16 {
    s: __m512,
    r: __m512,
    z: __m512,
    lo: __m512,
    hi: __m512,
}

impl FakeQuant16 {
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn new((scale, zero, lo, hi): (f32, f32, f32, f32)) -> FakeQuant16 {
        FakeQuant16 {
            s: _mm512_set1_ps(scale),
            r: _mm512_set1_ps(screen_reciprocal(scale)),
            z: _mm512_set1_ps(zero),
            lo: _mm512_set1_ps(lo),
            hi: _mm512_set1_ps(hi),
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn apply(&self, v: __m512) -> __m512 {
        _mm512_mul_ps(_mm512_sub_ps(self.level(v), self.z), self.s)
    }

    /// The clamped level as a float (NaN stays NaN): what [`avx512_quantize_i8`] stores as int8.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn level(&self, v: __m512) -> __m512 {
        _mm512_max_ps(self.lo, _mm512_min_ps(self.hi, _mm512_add_ps(round_quotient16(v, self.s, self.r), self.z)))
    }
}

/// One zero-padded input row split into its two column phases (a stride-2 direct convolution's
/// planes), through the input's quantizer `quant` where there is one: with `padded[x] = fq(src[x -
/// lo])` for `lo <= x < lo + src.len()` and `+0` elsewhere (`fq` the FakeQuant as
/// [`avx512_fake_quant_ptr`] computes it, or none), `even[j] = padded[2 j]` and `odd[j] = padded[2
/// j + 1]` for every `j < even.len()`. Sixteen values of each phase per step: two loads straight
/// from the row, masked where they reach past it (the padding), quantized, and two two-source
/// permutes; no padded copy of the row is written first (its stores, reloaded at once at another
/// alignment, could not be forwarded: the copy and split were a quarter of MobileNetV3's stem
/// without a quantizer).
///
/// # Safety
/// AVX-512 F, AVX2 and FMA; `even` and `odd` hold the same number of values.
#[target_feature(enable = "avx512f,avx2,fma")]
pub(crate) unsafe fn avx512_phase_split2(
    src: &[f32],
    lo: usize,
    even: &mut [f32],
    odd: &mut [f32],
    quant: Option<(f32, f32, f32, f32)>,
) {
    debug_assert_eq!(even.len(), odd.len());
    let (n, len) = (even.len(), src.len() as i64);
    let ie = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let io = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let q = quant.map(|q| FakeQuant16::new(q));
    // Sixteen padded values from x on: the row's lanes loaded and quantized, the others +0 (a
    // masked-off lane is not read, so the address may lie outside the row).
    let load = |x: i64| -> __m512 {
        let at = x - lo as i64;
        let mask = if at >= 0 && at + 16 <= len {
            0xffff
        } else if at >= len || at + 16 <= 0 {
            return _mm512_setzero_ps(); // all padding: nothing to load or quantize
        } else {
            let idx = _mm512_add_epi32(lanes, _mm512_set1_epi32(at as i32));
            _mm512_cmpge_epi32_mask(idx, _mm512_setzero_si512())
                & _mm512_cmplt_epi32_mask(idx, _mm512_set1_epi32(len as i32))
        };
        let v = _mm512_maskz_loadu_ps(mask, src.as_ptr().wrapping_offset(at as isize));
        match &q {
            Some(q) => _mm512_maskz_mov_ps(mask, q.apply(v)),
            None => v,
        }
    };
    let mut j = 0;
    while j < n {
        let (a, b) = (load(2 * j as i64), load(2 * j as i64 + 16));
        let (e, o) = (_mm512_permutex2var_ps(a, ie, b), _mm512_permutex2var_ps(a, io, b));
        let keep = if j + 16 <= n { 0xffff } else { (1u32 << (n - j)) as u16 - 1 };
        _mm512_mask_storeu_ps(even.as_mut_ptr().add(j), keep, e);
        _mm512_mask_storeu_ps(odd.as_mut_ptr().add(j), keep, o);
        j += 16;
    }
}

/// [`super::avx2::round_quotient8`] on sixteen lanes: `round_half_even(fl(x / s))` through `r =
/// fl(1 / s)` where the screen shows the product rounds to the same integer, else the division.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
pub(crate) unsafe fn round_quotient16(x: __m512, s: __m512, r: __m512) -> __m512 {
    const NEAR: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    let q = _mm512_mul_ps(x, r);
    let k = _mm512_roundscale_ps::<NEAR>(q);
    let d = _mm512_abs_ps(_mm512_sub_ps(q, k));
    let t = _mm512_fmadd_ps(_mm512_abs_ps(q), _mm512_set1_ps(QUOTIENT_SCREEN), d);
    if _mm512_cmp_ps_mask::<_CMP_LT_OQ>(t, _mm512_set1_ps(0.5)) == 0xffff {
        k
    } else {
        _mm512_roundscale_ps::<NEAR>(_mm512_div_ps(x, s))
    }
}

/// Pointwise W4A8 convolution on interleaved positions (see [`avx512_interleave_quads`]): for
/// each output channel r and position o, per group the exact `sum_c (x - zero) q` from
/// `vpdpbusd` on (x + 128, q) less `(128 + zero) * sum q`, then [`crate::generic::generic_q4q8_row`]'s
/// float steps (product, then add, in group order; `* scale`, `+ bias` or `+ 0`). Sixteen
/// positions per vector, four output channels per pass, two vectors per pass while more than 16
/// positions are left, else one; the `post` ops ([`post16`]) on each vector before it is stored.
/// `y` is `[n][p]`.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VNNI, AVX2 and FMA (the buffer sizes are asserted).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn avx512_pointwise_q4q8(
    w: &PackedQ4,
    qw: &[u32],
    x4: &[u32],
    p: usize,
    p_pad: usize,
    zero: i32,
    scale: f32,
    bias: Option<&[f32]>,
    post: &[crate::generic::Post],
    y: &mut [f32],
) {
    avx512_pointwise_q4q8_images(w, qw, x4, (1, p, p_pad), zero, scale, bias, post, y)
}

/// [`avx512_pointwise_q4q8`] on `images` images of `p` positions each, side by side in the
/// vector lanes (`x4` from [`avx512_interleave_quads_images`], `p_pad >= images * p` rounded up
/// to 16): `y` holds the images' outputs one after the other, each `[n][p]`, the values of
/// [`avx512_pointwise_q4q8`] on each image alone (every lane is its position's own sums). On a
/// small map (MobileNets' and EfficientNet's last blocks, 3 x 3 and 6 x 6) one image fills a few
/// lanes of each vector; several fill them, and each weight read serves them all.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VNNI, AVX2 and FMA (the buffer sizes are asserted).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn avx512_pointwise_q4q8_images(
    w: &PackedQ4,
    qw: &[u32],
    x4: &[u32],
    (images, p, p_pad): (usize, usize, usize),
    zero: i32,
    scale: f32,
    bias: Option<&[f32]>,
    post: &[crate::generic::Post],
    y: &mut [f32],
) {
    let (kq, live, all) = (w.k_pad / 4, w.k.div_ceil(4), images * p);
    assert!(images == 1 || p >= crate::POINTWISE_IMAGE_MIN_POSITIONS);
    assert!(qw.len() >= w.n * kq && x4.len() >= live * p_pad && p_pad >= all.next_multiple_of(16));
    assert!(y.len() >= w.n * all && bias.is_none_or(|b| b.len() >= w.n));
    let sink = Sink { y: y.as_mut_ptr(), ys: p, tile: false, image: w.n * p };
    pointwise_forms(w, qw, x4, (all, p_pad), zero, scale, bias, post, sink, |_| {});
}

/// [`avx512_pointwise_q4q8`] with each output position's channels written contiguously into a
/// depthwise kernel's padded buffer (`buf`, laid out as `m` says) instead of `[n][p]`: per block
/// of positions the kernel's rows go to a tile `[cp][32]`, the `rest` ops (those not applied in
/// registers) over it, then 8 x 8 register transposes put each kept position's `cp` lanes (the
/// `n` channels, then zeros) in its place. The values are the plane form's with `rest` applied
/// over its outputs, as the plan would. `p` positions may be several images' (`m.h * m.w` each,
/// side by side as [`avx512_interleave_quads_images`] lays them out), each into its own padded
/// image in `buf`, one after the other ([`crate::generic::PadMap::len`] values each).
///
/// # Safety
/// AVX-512 F/BW/VNNI, AVX2 and FMA (the sizes are asserted).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn avx512_pointwise_q4q8_padded(
    w: &PackedQ4,
    x4: &[u32],
    (p, p_pad): (usize, usize),
    zero: i32,
    scale: f32,
    bias: Option<&[f32]>,
    (post, rest): (&[crate::generic::Post], &[crate::generic::Post]),
    buf: &mut [f32],
    m: &crate::generic::PadMap,
) {
    const T: usize = 32;
    let (n, cp) = (w.n, m.cp);
    let qw = w.quad_words();
    let images = p / (m.h * m.w).max(1);
    assert!(x4.len() >= w.k.div_ceil(4) * p_pad && p_pad >= p.next_multiple_of(16) && p == images * m.h * m.w);
    assert!(cp >= n && cp.is_multiple_of(8) && buf.len() >= images * m.len());
    assert!(bias.is_none_or(|b| b.len() >= n));
    PADDED_TILE.with_borrow_mut(|tile| {
        // Rows past n stay zero: the lanes past the channels (the others are written first).
        let tile = crate::generic::aligned64(tile, cp * T);
        tile[n * T..cp * T].fill(0.0);
        let (tp, bp) = (tile.as_mut_ptr(), buf.as_mut_ptr());
        let sink = Sink { y: tp, ys: T, tile: true, image: 0 };
        // The image position (row, column, and the image's buffer offset) of the next block's
        // first position: blocks run in order, so it is carried along (no division per position).
        let mut next = (0, 0, 0);
        // SAFETY: this function's target features; the tile holds cp rows of T values and the
        // buffer is the one `m` describes (asserted above).
        let flush = |o0: usize| unsafe { flush_tile((tp, T, n, cp), (p - o0).min(T), rest, (bp, m), &mut next) };
        pointwise_forms(w, qw, x4, (p, p_pad), zero, scale, bias, post, sink, flush);
    });
}

/// [`avx512_pointwise_q4q8_padded`]'s tile (`[cp][t]` at `tp`, rows past `n` zero) of `left`
/// positions into the padded buffer: the `rest` ops over its `n` rows, then per 8 positions x 8
/// channels one register transpose, each position's eight lanes stored where `m` puts it (the
/// positions from `next`, the image position of the first and its image's buffer offset, which
/// is advanced past them). Its own function: a closure would not inherit the target features,
/// and the intrinsics would be calls.
///
/// # Safety
/// AVX2; `tp` holds `cp` rows of `t >= 8 * ceil(left / 8)` values, `bp` the buffers `m` describes
/// for every image the positions reach.
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn flush_tile(
    (tp, t, n, cp): (*mut f32, usize, usize, usize),
    left: usize,
    rest: &[crate::generic::Post],
    (bp, m): (*mut f32, &crate::generic::PadMap),
    next: &mut (usize, usize, usize),
) {
    if left == t {
        crate::generic::post_in_place(std::slice::from_raw_parts_mut(tp, n * t), rest);
    } else if !rest.is_empty() {
        // A short last block: its positions gathered into one run first (the ops over whole rows
        // would compute every unused column too, and a call per row costs more than the values),
        // in a buffer kept between calls (every value is written before it is read).
        SHORT_RUN.with_borrow_mut(|run| {
            if run.len() < n * left {
                run.resize(n * left, 0.0);
            }
            let run = &mut run[..n * left];
            for (r, d) in run.chunks_exact_mut(left).enumerate() {
                d.copy_from_slice(std::slice::from_raw_parts(tp.add(r * t), left));
            }
            crate::generic::post_in_place(run, rest);
            for (r, d) in run.chunks_exact(left).enumerate() {
                std::slice::from_raw_parts_mut(tp.add(r * t), left).copy_from_slice(d);
            }
        });
    }
    // Where the position at `next` goes (usize::MAX: read by no window), and `next` moved on
    // to the following position (the next image's first after an image's last).
    let advance = |next: &mut (usize, usize, usize)| {
        let at = m.at(next.0, next.1).map_or(usize::MAX, |a| a + next.2);
        next.1 += 1;
        if next.1 == m.w {
            *next = (next.0 + 1, 0, next.2);
            if next.0 == m.h {
                *next = (0, 0, next.2 + m.len());
            }
        }
        at
    };
    if cp.is_multiple_of(16) && t.is_multiple_of(16) {
        // Sixteen positions x sixteen channels per register transpose (half the shuffles per
        // value of the eight-lane form; the tile's rows hold 32 values, so a block past `left`
        // reads values it does not store).
        for j0 in (0..left).step_by(16) {
            let mut at = [usize::MAX; 16];
            for a in at.iter_mut().take(left - j0) {
                *a = advance(next);
            }
            for c0 in (0..cp).step_by(16) {
                let rows: [__m512; 16] = std::array::from_fn(|i| _mm512_loadu_ps(tp.add((c0 + i) * t + j0)));
                let v = transpose16(rows);
                for j in 0..16 {
                    if at[j] != usize::MAX {
                        _mm512_storeu_ps(bp.add(at[j] + c0), v[j]);
                    }
                }
            }
        }
        return;
    }
    for j0 in (0..left).step_by(8) {
        // Where each of the eight positions goes (usize::MAX: past the block, or read by no
        // window).
        let mut at = [usize::MAX; 8];
        for a in at.iter_mut().take(left - j0) {
            *a = advance(next);
        }
        let all = at.iter().all(|&a| a != usize::MAX);
        for c0 in (0..cp).step_by(8) {
            let mut rows = [_mm256_setzero_ps(); 8];
            for (i, r) in rows.iter_mut().enumerate() {
                *r = _mm256_loadu_ps(tp.add((c0 + i) * t + j0));
            }
            let v = crate::generic::transpose8(rows);
            if all {
                for j in 0..8 {
                    _mm256_storeu_ps(bp.add(at[j] + c0), v[j]);
                }
            } else {
                for j in 0..8 {
                    if at[j] != usize::MAX {
                        _mm256_storeu_ps(bp.add(at[j] + c0), v[j]);
                    }
                }
            }
        }
    }
}

/// The 16 x 16 transpose of `r` (row i lane j to row j lane i) in registers: pairs of rows
/// interleaved by 32 then 64 bits (each 128-bit lane then holds four rows of one column), then
/// the lanes gathered by two rounds of `vshuff32x4`.
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
    let t: [__m512; 16] = std::array::from_fn(|i| {
        let (a, b) = (r[i & !1], r[i | 1]);
        if i % 2 == 0 {
            _mm512_unpacklo_ps(a, b)
        } else {
            _mm512_unpackhi_ps(a, b)
        }
    });
    // u[4g + k]: column 4L + k of rows 4g..4g + 4 in lane L.
    let u: [__m512; 16] = std::array::from_fn(|i| {
        let (g, k) = (i / 4, i % 4);
        let (a, b) = (_mm512_castps_pd(t[4 * g + k / 2]), _mm512_castps_pd(t[4 * g + 2 + k / 2]));
        _mm512_castpd_ps(if k % 2 == 0 { _mm512_unpacklo_pd(a, b) } else { _mm512_unpackhi_pd(a, b) })
    });
    let mut c = [_mm512_setzero_ps(); 16];
    for k in 0..4 {
        let (v0, v1) = (_mm512_shuffle_f32x4::<0x88>(u[k], u[4 + k]), _mm512_shuffle_f32x4::<0xDD>(u[k], u[4 + k]));
        let (w0, w1) =
            (_mm512_shuffle_f32x4::<0x88>(u[8 + k], u[12 + k]), _mm512_shuffle_f32x4::<0xDD>(u[8 + k], u[12 + k]));
        c[k] = _mm512_shuffle_f32x4::<0x88>(v0, w0);
        c[8 + k] = _mm512_shuffle_f32x4::<0xDD>(v0, w0);
        c[4 + k] = _mm512_shuffle_f32x4::<0x88>(v1, w1);
        c[12 + k] = _mm512_shuffle_f32x4::<0xDD>(v1, w1);
    }
    c
}

thread_local! {
    /// [`avx512_pointwise_q4q8_padded`]'s tile of outputs, `[cp][32]`.
    static PADDED_TILE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// [`flush_tile`]'s short last block of positions, gathered for the ops not applied in
    /// registers.
    static SHORT_RUN: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// [`crate::generic::depthwise_conv`]'s outputs (`acc`, `[position][cp]`, as the depthwise lanes
/// kernel leaves them) as the next pointwise convolution's int8 levels, per position sixteen
/// channels at a time: plus the bias, the `post` ops (those applied in registers, as the
/// depthwise kernel applies them), then the quantizer `(scale, zero, lo, hi)` as
/// [`avx512_quantize_i8`] computes it (the same levels: NaN to 0, the bounds within int8), each
/// level `+ 128` as a byte (the pointwise kernel's unsigned form), byte `c` of position `o` at
/// byte `o * cp + c` of `stage`. Returns whether any of the `channels` values was NaN (the caller
/// then takes the two steps' way).
///
/// # Safety
/// AVX-512 F/BW, AVX2 and FMA (the sizes are asserted).
#[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn avx512_depthwise_levels(
    (acc, cp, channels, ol): (&[f32], usize, usize, usize),
    bias: Option<&[f32]>,
    post: &[crate::generic::Post],
    (scale, zero, lo, hi): (f32, i32, i32, i32),
    stage: &mut [u32],
) -> bool {
    assert!(cp.is_multiple_of(16) && cp >= channels && acc.len() >= ol * cp && stage.len() * 4 >= ol * cp);
    assert!(bias.is_none_or(|b| b.len() >= channels));
    let f = crate::generic::PostForm::of(post);
    let a = (acc, (cp, channels, ol), bias, post, (scale, zero, lo, hi), stage);
    crate::generic::by_post_form!(f, levels_form(a, f))
}

/// [`avx512_depthwise_levels`] with one epilogue form (as [`pointwise_blocks`] takes them).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
unsafe fn levels_form<const CHAIN: bool, const CLAMP: bool, const FQ: bool>(
    (acc, (cp, channels, ol), bias, post, (scale, zero, lo, hi), stage): super::common::LevelsArgs,
    form: crate::generic::PostForm,
) -> bool {
    let pv = PostVec16::new(form);
    let fq = FakeQuant16::new((scale, zero as f32, lo.max(-128) as f32, hi.min(127) as f32));
    let flip = _mm_set1_epi8(i8::MIN);
    let mut nan: __mmask16 = 0;
    let mut bv = vec![0f32; cp];
    if let Some(b) = bias {
        bv[..channels].copy_from_slice(&b[..channels]);
    }
    // The level straight from the value where the epilogue allows (`PostVec16::level16`): a
    // clamp (or none) then this quantizer is the quantizer's level clamped to the levels of the
    // clamp's bounds; a FakeQuant with this scale and zero point in between changes nothing but
    // its own bounds (the usual case: the simulation fake-quantizes what the next layer reads
    // with the quantizer that reads it; `fl(k s)` quantizes back to `k`, as `fl(fl(k s) / s)` is
    // within `|k| 2^-23` of it).
    let (qlo, qhi) = (lo.max(-128) as f32, hi.min(127) as f32);
    let direct = match form.fq {
        _ if CHAIN => None,
        None => Some((scale, zero as f32, qlo, qhi)),
        Some((s, z, ql, qh)) => (s == scale && z == zero as f32 && ql >= qlo && qh <= qhi).then_some((s, z, ql, qh)),
    };
    let lv = PostVec16::new(crate::generic::PostForm { clamp: form.clamp, fq: direct, chain: false });
    let same = direct.is_some() && lv.fold;
    for c0 in (0..cp).step_by(16) {
        let vb = _mm512_loadu_ps(bv.as_ptr().add(c0));
        // The lanes that hold channels (a NaN past them is no value's).
        let real = ((1u32 << (channels - c0).min(16)) - 1) as __mmask16;
        for o in 0..ol {
            let v = _mm512_loadu_ps(acc.as_ptr().add(o * cp + c0));
            let v = if bias.is_some() { _mm512_add_ps(v, vb) } else { v };
            let (k, sure) = if same { lv.level16(v) } else { (v, false) };
            let y = if sure {
                _mm512_add_ps(k, fq.z)
            } else {
                fq.level(if CHAIN { post16(v, post) } else { pv.apply::<CLAMP, FQ>(v) })
            };
            let ord = _mm512_cmp_ps_mask::<_CMP_ORD_Q>(y, y);
            nan |= !ord & real;
            let l = _mm512_cvtsepi32_epi8(_mm512_maskz_cvtps_epi32(ord, y));
            _mm_storeu_si128(stage.as_mut_ptr().add((o * cp + c0) / 4) as *mut __m128i, _mm_xor_si128(l, flip));
        }
    }
    nan != 0
}

/// The FakeQuant `(scale, zero, lo, hi)` of `op`'s outputs for the `16 K` values at `v[at..]`,
/// per vector from `(q, b, ok)`: an estimate `q` of each output's quotient by the scale, a bound `b` on its
/// distance from the definition's quotient, and the lanes `ok` where the estimate may be taken.
/// With `A = lo - zero` and `B = hi - zero` (the clamp's bounds less the zero point), `q` is first
/// clamped to `[A - 1/4, B + 1/4]` and rounded to `k`; where every lane is `ok` and `|q_c - k| + b
/// < 1/2`, `k` is the definition's level less the zero point: inside the interval the quotient
/// lies within `1/2` of `k` (so it rounds to `k`, which lies in `[A, B]`); at `B + 1/4` the bound
/// is below `1/4`, so the quotient exceeds `B` and rounds to `B` or beyond, which the clamp makes
/// `B` (and `A` below). The output is then `(k + 0) * scale`, as the FakeQuant writes `(level -
/// zero) * scale` (the `+ 0` makes a `-0` level `+0`, as `level - zero` does). NaN lanes (the
/// clamp keeps NaN) and infinite bounds fail the test. Otherwise the vector through the
/// definition (`op` then the FakeQuant), value by value (that vector only).
// Always inlined (no target_feature of its own, as `nibble_block`): a call passed the K
// estimates through memory.
#[inline(always)]
unsafe fn store_levels16<const K: usize>(
    v: &mut [f32],
    at: usize,
    est: [(__m512, __m512, __mmask16); K],
    op: crate::generic::Post,
    (scale, zero, lo, hi): (f32, f32, f32, f32),
) {
    // Every vector's output and test first, so the common case (all sure) has no branch between
    // the vectors.
    let outs = levels16(est, [0; K], (scale, zero, lo, hi));
    for (j, &(y, sure)) in outs.iter().enumerate() {
        let at = at + 16 * j;
        if sure {
            _mm512_storeu_ps(v.as_mut_ptr().add(at), y);
        } else {
            definition_levels(&mut v[at..at + 16], op, (scale, zero, lo, hi));
        }
    }
}

/// [`store_levels16`]'s outputs and tests: per vector of estimates `(q, b, ok)`, the FakeQuant's
/// output `(k + 0) * scale` and whether it is certain on every lane but those of `idle` (lanes no
/// one stores: their test is not needed).
#[inline(always)]
unsafe fn levels16<const K: usize>(
    est: [(__m512, __m512, __mmask16); K],
    idle: [__mmask16; K],
    (scale, zero, lo, hi): (f32, f32, f32, f32),
) -> [(__m512, bool); K] {
    let (a, b) = (_mm512_set1_ps(lo - zero - 0.25), _mm512_set1_ps(hi - zero + 0.25));
    // (Loops, not closures: a closure would not inherit the caller's target features.)
    let mut outs = [(_mm512_setzero_ps(), false); K];
    for ((o, &(q, bound, ok)), &idle) in outs.iter_mut().zip(&est).zip(&idle) {
        // vmaxps / vminps return their second operand, here q, when it is NaN.
        let qc = _mm512_min_ps(b, _mm512_max_ps(a, q));
        let k = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(qc);
        let off = _mm512_add_ps(_mm512_abs_ps(_mm512_sub_ps(qc, k)), bound);
        let sure = (ok & _mm512_cmp_ps_mask::<_CMP_LT_OQ>(off, _mm512_set1_ps(0.5))) | idle == 0xffff;
        *o = (_mm512_mul_ps(_mm512_add_ps(k, _mm512_setzero_ps()), _mm512_set1_ps(scale)), sure);
    }
    outs
}

/// HardSwish then a FakeQuant (`x * clamp(x / 6 + 1/2, 0, 1)` as
/// [`crate::generic::Post::HardSwish`] computes it, in f64 rounded once to f32, then `(scale,
/// zero, lo, hi)`) in place over whole vectors of `v`, through the quantized level, as
/// [`avx512_silu_fake_quant`] does for SiLU: per 16 lanes the estimate `q~ = x t~ fl(1 / scale)`
/// with `t~ = clamp(fma(x, fl(1/6), 1/2), 0, 1)` in f32. `t~` is within `2^-24` of the exact
/// clamp (the clamp is 1-Lipschitz), so `q~` is within `|x| 2^-24 / scale` plus three roundings
/// of the exact quotient, and the definition's `fl(fl(hard_swish(x)) / scale)` within two
/// roundings (its f64 steps add `|x| 2^-53`): where `|q~ - round(q~)| + |x| fl(1 / scale) 2^-22 +
/// |q~| 2^-20` (twice those bounds, plus `2^-100`) is the bound [`store_levels16`] tests against
/// (with `q~` clamped first, so lanes beyond the clamp's bounds are taken too). A lane near a
/// half-way point, NaN or an infinity (its bound is then infinite or NaN) sends its vector to the
/// definition. Returns how many values were done (a multiple of 64; the caller finishes the
/// rest); none unless the scale's reciprocal is normal and the levels are integers
/// ([`integral_levels`]).
///
/// # Safety
/// AVX-512 F, AVX2 and FMA.
#[target_feature(enable = "avx512f,avx2,fma")]
pub unsafe fn avx512_hard_swish_fake_quant(v: &mut [f32], q4: (f32, f32, f32, f32)) -> usize {
    level_steps(v.len(), 128, q4, |i, eight, rcp| {
        if eight {
            hard_swish_levels::<8>(v, i, rcp, q4)
        } else {
            hard_swish_levels::<4>(v, i, rcp, q4)
        }
    })
}

/// [`avx512_hard_swish_fake_quant`] on the `16 K` values at `v[i..]`, `rcp` the scale's
/// reciprocal.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn hard_swish_levels<const K: usize>(v: &mut [f32], i: usize, rcp: f32, q4: (f32, f32, f32, f32)) {
    let x: [__m512; K] = std::array::from_fn(|j| _mm512_loadu_ps(v.as_ptr().add(i + 16 * j)));
    store_levels16(v, i, hard_swish_est(x, rcp), crate::generic::Post::HardSwish, q4);
}

/// [`avx512_hard_swish_fake_quant`]'s estimates `(q, b, ok)` of `K` vectors `x`, `rcp` the
/// scale's reciprocal.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn hard_swish_est<const K: usize>(x: [__m512; K], rcp: f32) -> [(__m512, __m512, __mmask16); K] {
    let rs = _mm512_set1_ps(rcp);
    let xbound = _mm512_set1_ps(rcp * (1.0 / 4_194_304.0));
    let (sixth, half, one, zero_v) =
        (_mm512_set1_ps(1.0 / 6.0), _mm512_set1_ps(0.5), _mm512_set1_ps(1.0), _mm512_setzero_ps());
    std::array::from_fn(|j| {
        let x = x[j];
        let t = _mm512_min_ps(one, _mm512_max_ps(zero_v, _mm512_fmadd_ps(x, sixth, half)));
        let q = _mm512_mul_ps(_mm512_mul_ps(x, t), rs);
        let b = _mm512_fmadd_ps(
            _mm512_abs_ps(x),
            xbound,
            _mm512_fmadd_ps(_mm512_abs_ps(q), _mm512_set1_ps(1.0 / 1_048_576.0), _mm512_set1_ps(1e-30)),
        );
        // An infinite or NaN input makes the bound infinite or NaN, which fails the test.
        (q, b, 0xffff)
    })
}

/// SiLU then a FakeQuant (`x * sigmoid(x)` as [`crate::generic::Post::Silu`] computes it, then
/// `(scale, zero, lo, hi)`) in place over whole vectors of `v`, through the quantized level: only
/// the integer level reaches the output, and an f32 estimate decides it wherever its error cannot
/// move it. Per 16 lanes: `e = e^-x` in f32 (range reduction by a two-part `ln 2`, degree-6
/// Taylor polynomial on `|r| <= ln 2 / 2`, `2^k` by `vscalefps`), `s~ = 1 / (1 + e)` (by
/// `vrcp14ps` and one Newton step; for `x < 0` the large `e` is as exact relative to `1 + e` as
/// a small one, so no `e / (1 + e)` form and no blend), `q~ = x s~ fl(1 / scale)`. Relative to
/// the exact real quotient, `q~` is within about `2^-20.5` (the truncation `2^-22.5`, the
/// reduction's and the polynomial's roundings, the reciprocal's `2^-23.5`, then three more
/// roundings) and the definition's `fl(fl(x fl(sigmoid(x))) / scale)` within `2^-22.4` (three
/// roundings), so `|q~| 2^-18 + 2^-100` (over four times that bound, the second term for
/// subnormal products) is the bound [`store_levels16`] tests against, `q~` clamped first. A lane
/// near a half-way point, with `|x| >= 80` (past it `e` or `1 + e` leaves f32's normal range) or
/// NaN sends its vector to the definition, lane by lane. Then the output
/// `(level - zero) * scale` as the FakeQuant writes it. Returns how many values were done (a
/// multiple of 64; the caller finishes the rest); none unless the scale's reciprocal is normal
/// and the levels are integers ([`integral_levels`]).
///
/// # Safety
/// AVX-512 F, AVX2 and FMA.
#[target_feature(enable = "avx512f,avx2,fma")]
pub unsafe fn avx512_silu_fake_quant(v: &mut [f32], q4: (f32, f32, f32, f32)) -> usize {
    level_steps(
        v.len(),
        128,
        q4,
        |i, eight, rcp| {
            if eight {
                silu_levels::<8>(v, i, rcp, q4)
            } else {
                silu_levels::<4>(v, i, rcp, q4)
            }
        },
    )
}

/// [`avx512_silu_fake_quant`] on the `16 K` values at `v[i..]`, `rcp` the scale's reciprocal.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn silu_levels<const K: usize>(v: &mut [f32], i: usize, rcp: f32, q4: (f32, f32, f32, f32)) {
    let x: [__m512; K] = std::array::from_fn(|j| _mm512_loadu_ps(v.as_ptr().add(i + 16 * j)));
    store_levels16(v, i, silu_est(x, rcp), crate::generic::Post::Silu, q4);
}

/// [`avx512_silu_fake_quant`]'s estimates `(q, b, ok)` of `K` vectors `x`, `rcp` the scale's
/// reciprocal.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn silu_est<const K: usize>(x: [__m512; K], rcp: f32) -> [(__m512, __m512, __mmask16); K] {
    let rs = _mm512_set1_ps(rcp);
    use super::common::exp_neg_f32::{LN2_HI, LN2_LO, LOG2E, MAGIC, TAYLOR};
    let one = _mm512_set1_ps(1.0);
    // k = -round(x log2 e), r = x + k ln 2 in [-ln 2 / 2, ln 2 / 2]: e^-x = 2^k e^-r.
    let t = x.map(|x| _mm512_fmadd_ps(x, _mm512_set1_ps(-LOG2E), _mm512_set1_ps(MAGIC)));
    let k = t.map(|t| _mm512_sub_ps(t, _mm512_set1_ps(MAGIC)));
    let r: [__m512; K] = std::array::from_fn(|j| {
        let r = _mm512_fmadd_ps(k[j], _mm512_set1_ps(LN2_HI), x[j]);
        _mm512_fmadd_ps(k[j], _mm512_set1_ps(LN2_LO), r)
    });
    let mut p = [_mm512_set1_ps(TAYLOR[0]); K];
    for c in &TAYLOR[1..] {
        for j in 0..K {
            p[j] = _mm512_fmadd_ps(p[j], r[j], _mm512_set1_ps(*c));
        }
    }
    std::array::from_fn(|j| {
        // e^-x = p 2^k by vscalefps (k an integer in [-116, 116] where the estimate is taken, p
        // in [0.7, 1.5]: a normal result, exact).
        let e = _mm512_scalef_ps(p[j], k[j]);
        // 1 / (1 + e^-x) for either sign of x (a large e^-x, x < 0, is as exact relative to
        // 1 + e^-x as a small one), by a reciprocal estimate (within 2^-14) and one Newton step
        // (within about 2^-23.5): the division was most of the kernel's time.
        let d = _mm512_add_ps(one, e);
        let y0 = _mm512_rcp14_ps(d);
        let sig = _mm512_fmadd_ps(y0, _mm512_fnmadd_ps(d, y0, one), y0);
        let q = _mm512_mul_ps(_mm512_mul_ps(x[j], sig), rs);
        let b = _mm512_fmadd_ps(_mm512_abs_ps(q), _mm512_set1_ps(1.0 / 262_144.0), _mm512_set1_ps(1e-30));
        (q, b, _mm512_cmp_ps_mask::<_CMP_LT_OQ>(_mm512_abs_ps(x[j]), _mm512_set1_ps(80.0)))
    })
}

/// Per plane of `v` (`[planes][il]`), the f64 sum of its values in order from `init` (each
/// value converted exactly, one addition at a time), for the first planes in groups of eight:
/// eight planes in the lanes of one f64 vector (their values at eight positions transposed in
/// registers), up to four such vectors in flight. The same additions in the same order per
/// plane as the scalar loop. Returns how many planes were summed (a multiple of 8).
///
/// # Safety
/// AVX-512 F, AVX2 and FMA; `out` holds `v.len() / il` values.
#[target_feature(enable = "avx512f,avx2,fma")]
pub unsafe fn avx512_plane_sums(v: &[f32], il: usize, init: f64, out: &mut [f64]) -> usize {
    let planes = v.len() / il.max(1);
    assert!(il > 0 && out.len() >= planes);
    let mut p0 = 0;
    while p0 + 32 <= planes {
        plane_sums_block::<4>(v, il, init, p0, out);
        p0 += 32;
    }
    while p0 + 8 <= planes {
        plane_sums_block::<1>(v, il, init, p0, out);
        p0 += 8;
    }
    p0
}

/// [`avx512_plane_sums`] for planes `p0..p0 + 8 G`.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn plane_sums_block<const G: usize>(v: &[f32], il: usize, init: f64, p0: usize, out: &mut [f64]) {
    let vp = v.as_ptr();
    let mut acc = [_mm512_set1_pd(init); G];
    let il8 = il / 8 * 8;
    let mut j = 0;
    while j < il8 {
        for (g, a) in acc.iter_mut().enumerate() {
            let mut rows = [_mm256_setzero_ps(); 8];
            for (r, row) in rows.iter_mut().enumerate() {
                *row = _mm256_loadu_ps(vp.add((p0 + 8 * g + r) * il + j));
            }
            // Column c: the eight planes' values at position j + c.
            let cols = crate::generic::transpose8(rows);
            for c in cols {
                *a = _mm512_add_pd(*a, _mm512_cvtps_pd(c));
            }
        }
        j += 8;
    }
    for j in il8..il {
        for (g, a) in acc.iter_mut().enumerate() {
            let mut col = [0f32; 8];
            for (r, c) in col.iter_mut().enumerate() {
                *c = *vp.add((p0 + 8 * g + r) * il + j);
            }
            *a = _mm512_add_pd(*a, _mm512_cvtps_pd(_mm256_loadu_ps(col.as_ptr())));
        }
    }
    for (g, a) in acc.iter().enumerate() {
        _mm512_storeu_pd(out.as_mut_ptr().add(p0 + 8 * g), *a);
    }
}

/// Where [`pointwise_blocks`] stores its outputs: row `r`, position `o` at `y + r * ys + o`, or
/// with `tile` at `y + r * ys + (o - o0)` for the block starting at `o0` (a tile of `ys >= 32`
/// positions that the block's `flush` then empties). Positions of several images side by side
/// (`ys` positions each, [`avx512_pointwise_q4q8_images`]): position `o` of row `r` is image
/// `g = o / ys`'s position `o - g ys`, at `y + g * image + r * ys + (o - g ys)`.
#[derive(Clone, Copy)]
struct Sink {
    y: *mut f32,
    ys: usize,
    tile: bool,
    /// Values per image's outputs (`n * ys`); with one image, `ys` is every position.
    image: usize,
}

/// Per vector of 16 positions, each image part's store mask and its image's displacement
/// ([`pointwise_block`]).
type ImageParts = [(__mmask16, usize); IMAGE_PARTS];

/// Up to how many images one vector of 16 positions spans where each image has at least
/// [`crate::POINTWISE_IMAGE_MIN_POSITIONS`] (8) positions: a store per image part.
const IMAGE_PARTS: usize = 3;
const _: () = assert!(15usize.div_ceil(crate::POINTWISE_IMAGE_MIN_POSITIONS) < IMAGE_PARTS);

/// [`pointwise_blocks`] with one copy of the kernel per epilogue form (no per-vector dispatch on
/// the ops); `flush(o0)` after each block of positions.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn pointwise_forms(
    w: &PackedQ4,
    qw: &[u32],
    x4: &[u32],
    (p, p_pad): (usize, usize),
    zero: i32,
    scale: f32,
    bias: Option<&[f32]>,
    post: &[crate::generic::Post],
    sink: Sink,
    flush: impl FnMut(usize),
) {
    let f = crate::generic::PostForm::of(post);
    let act = act_levels(post).filter(|_| post.len() == 2);
    let a = (w, qw, x4, (p, p_pad), zero, scale, bias, (post, f));
    match (act.is_some(), f.chain, f.clamp.is_some(), f.fq.is_some()) {
        (true, ..) => pointwise_blocks::<false, false, false, true>(a, act, sink, flush),
        (_, true, ..) => pointwise_blocks::<true, false, false, false>(a, None, sink, flush),
        (_, _, false, false) => pointwise_blocks::<false, false, false, false>(a, None, sink, flush),
        (_, _, true, false) => pointwise_blocks::<false, true, false, false>(a, None, sink, flush),
        (_, _, false, true) => pointwise_blocks::<false, false, true, false>(a, None, sink, flush),
        (_, _, true, true) => pointwise_blocks::<false, true, true, false>(a, None, sink, flush),
    }
}

/// A HardSwish then a FakeQuant that a pointwise kernel applies in its epilogue through the
/// quantized level ([`act_levels`]): the FakeQuant's `(scale, zero, lo, hi)` and the scale's
/// reciprocal.
#[derive(Clone, Copy)]
pub(crate) struct ActLevels {
    q4: (f32, f32, f32, f32),
    rcp: f32,
}

/// Whether `post` starts with HardSwish then a FakeQuant that the level kernel takes
/// ([`avx512_hard_swish_fake_quant`]: a positive scale with a normal reciprocal, integer levels):
/// the pair a pointwise kernel then applies in registers, by the same estimates, test and
/// definition for the lanes they cannot vouch for. (SiLU then a FakeQuant stays a pass over the
/// outputs, `avx512_silu_fake_quant`: in the epilogue it measured no faster, EfficientNet-B0
/// batch 1 677 -> 678 us, batch 64 40.2 -> 40.4 ms; its estimate, not the pass's loads and
/// stores, is the cost.)
pub(crate) fn act_levels(post: &[crate::generic::Post]) -> Option<ActLevels> {
    use crate::generic::Post;
    match post {
        &[Post::HardSwish, Post::FakeQuant { scale, zero, lo, hi }, ..] => {
            let q4 = (scale, zero, lo, hi);
            level_reciprocal(q4).map(|rcp| ActLevels { q4, rcp })
        }
        _ => None,
    }
}

/// The ops the pointwise kernels ([`pointwise_forms`]) apply in their epilogue, and the rest:
/// [`crate::generic::post_split`]'s split, or a HardSwish and its FakeQuant ([`act_levels`]).
pub(crate) fn pointwise_split(post: &[crate::generic::Post]) -> (&[crate::generic::Post], &[crate::generic::Post]) {
    if act_levels(post).is_some() {
        post.split_at(2)
    } else {
        crate::generic::post_split(post)
    }
}

/// [`pointwise_forms`]'s arguments past the sink.
type PointwiseArgs<'a> = (
    &'a PackedQ4,
    &'a [u32],
    &'a [u32],
    (usize, usize),
    i32,
    f32,
    Option<&'a [f32]>,
    (&'a [crate::generic::Post], crate::generic::PostForm),
);

/// The epilogue constants of a [`crate::generic::PostForm`] in vectors: the clamp's bounds, the
/// FakeQuant's scale, zero point and level bounds, and where the level can be taken directly
/// (`fold`), the bounds of the level less the zero point that the clamp and the FakeQuant's
/// bounds leave, `[ka, kb]` (widened by 1/4: see [`PostVec16::level16`]).
#[derive(Clone, Copy)]
struct PostVec16 {
    lo: __m512,
    hi: __m512,
    fq: FakeQuant16,
    ka: __m512,
    kb: __m512,
    fold: bool,
}

impl PostVec16 {
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    fn new(f: crate::generic::PostForm) -> PostVec16 {
        let (lo, hi) = f.clamp.unwrap_or((f32::NEG_INFINITY, f32::INFINITY));
        let (s, z, qlo, qhi) = f.fq.unwrap_or((1.0, 0.0, 0.0, 0.0));
        let (fold, ka, kb) = super::common::folded_levels(f);
        PostVec16 {
            lo: _mm512_set1_ps(lo),
            hi: _mm512_set1_ps(hi),
            // SAFETY: this function's target features are FakeQuant16::new's.
            fq: unsafe { FakeQuant16::new((s, z, qlo, qhi)) },
            ka: _mm512_set1_ps(ka),
            kb: _mm512_set1_ps(kb),
            fold,
        }
    }

    /// With `fold`: the form's level less the zero point for each of 16 lanes, and whether every
    /// lane's is certain. `q = v fl(1 / s)` is within `|q| QUOTIENT_SCREEN / 2` of the
    /// definition's quotient `fl(v / s)` ([`round_quotient16`]); clamped to `[ka - 1/4, kb +
    /// 1/4]` and rounded to `k`, it is the definition's level wherever `|q_c - k| + |q|
    /// QUOTIENT_SCREEN < 1/2`, as [`store_levels16`] argues (inside, the quotient rounds to `k`;
    /// at an end the quotient lies past it and the clamps give it). NaN lanes fail the test.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    fn level16(&self, v: __m512) -> (__m512, bool) {
        let q = _mm512_mul_ps(v, self.fq.r);
        // vmaxps / vminps return their second operand, here q, when it is NaN.
        let qc = _mm512_min_ps(self.kb, _mm512_max_ps(self.ka, q));
        let k = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(qc);
        let t = _mm512_fmadd_ps(_mm512_abs_ps(q), _mm512_set1_ps(QUOTIENT_SCREEN), _mm512_abs_ps(_mm512_sub_ps(qc, k)));
        (k, _mm512_cmp_ps_mask::<_CMP_LT_OQ>(t, _mm512_set1_ps(0.5)) == 0xffff)
    }

    /// The form's ops on sixteen lanes: [`post16`]'s operations for a clamp then a FakeQuant
    /// (the level through [`PostVec16::level16`] where it is certain, `(k + 0) * s` as the
    /// FakeQuant writes `(level - zero) * s`, the `+ 0` making a `-0` level `+0`).
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    fn apply<const CLAMP: bool, const FQ: bool>(&self, mut v: __m512) -> __m512 {
        if FQ && self.fold {
            let (k, sure) = self.level16(v);
            if sure {
                return _mm512_mul_ps(_mm512_add_ps(k, _mm512_setzero_ps()), self.fq.s);
            }
        }
        if CLAMP {
            v = _mm512_min_ps(self.hi, _mm512_max_ps(self.lo, v));
        }
        if FQ {
            // SAFETY: this function's target features are FakeQuant16::apply's.
            v = unsafe { self.fq.apply(v) };
        }
        v
    }
}

/// [`avx512_pointwise_q4q8`]'s blocks of positions with one epilogue form: `CHAIN` runs the ops
/// one by one ([`post16`]), else the clamp and the FakeQuant as `CLAMP` and `FQ` say; `flush(o0)`
/// after the block at `o0`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
unsafe fn pointwise_blocks<const CHAIN: bool, const CLAMP: bool, const FQ: bool, const ACT: bool>(
    (w, qw, x4, (p, p_pad), zero, scale, bias, (post, form)): PointwiseArgs,
    act: Option<ActLevels>,
    sink: Sink,
    mut flush: impl FnMut(usize),
) {
    let pv = PostVec16::new(form);
    let mut o0 = 0;
    while o0 < p {
        if p - o0 > 16 {
            let epi = (post, &pv, act);
            pointwise_block::<2, CHAIN, CLAMP, FQ, ACT>(w, qw, x4, (p, p_pad, o0), zero, scale, bias, epi, sink);
            flush(o0);
            o0 += 32;
        } else {
            let epi = (post, &pv, act);
            pointwise_block::<1, CHAIN, CLAMP, FQ, ACT>(w, qw, x4, (p, p_pad, o0), zero, scale, bias, epi, sink);
            flush(o0);
            o0 += 16;
        }
    }
}

/// [`avx512_pointwise_q4q8`] for positions `o0..o0 + 16 V` (masked past `p`) of every output
/// channel, four channels per pass.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn pointwise_block<const V: usize, const CHAIN: bool, const CLAMP: bool, const FQ: bool, const ACT: bool>(
    w: &PackedQ4,
    qw: &[u32],
    x4: &[u32],
    (p, p_pad, o0): (usize, usize, usize),
    zero: i32,
    scale: f32,
    bias: Option<&[f32]>,
    (post, pv, act): (&[crate::generic::Post], &PostVec16, Option<ActLevels>),
    sink: Sink,
) {
    const R: usize = 4;
    let y = if sink.tile { sink.y } else { sink.y.add(o0) };
    // Quads past the last channel's hold zero weights (the padding of K to the group): they add
    // nothing to the sums, so they are neither read nor multiplied.
    let (n, kq, live, groups) = (w.n, w.k_pad / 4, w.k.div_ceil(4), w.groups());
    let qpg = w.group / 4;
    let xs = _mm512_set1_ps(scale);
    let masks: [__mmask16; V] = std::array::from_fn(|v| {
        let left = p.saturating_sub(o0 + 16 * v).min(16);
        ((1u32 << left) - 1) as __mmask16
    });
    // Several images side by side: each vector's lanes split by image, each part with its
    // image's displacement from the one-image address (`g * (image - ys)`).
    let several = !sink.tile && sink.ys < p;
    let parts: [ImageParts; V] = std::array::from_fn(|v| {
        let mut part = [(0, 0); IMAGE_PARTS];
        if several {
            let o = o0 + 16 * v;
            for (i, slot) in part.iter_mut().enumerate() {
                let g = o / sink.ys + i;
                let (a, b) = ((g * sink.ys).max(o), ((g + 1) * sink.ys).min(o + 16).min(p));
                if a < b {
                    let bits = ((1u32 << (b - o)) - 1) & !((1u32 << (a - o)) - 1);
                    *slot = (bits as __mmask16, g * (sink.image - sink.ys));
                }
            }
        }
        part
    });
    for r0 in (0..n).step_by(R) {
        // Rows past n repeat the last row (computed, not stored).
        let rows: [usize; R] = std::array::from_fn(|j| (r0 + j).min(n - 1));
        let mut accf = [[_mm512_setzero_ps(); V]; R];
        for g in 0..groups {
            let mut acc = [[_mm512_setzero_si512(); V]; R];
            for q in g * qpg..((g + 1) * qpg).min(live) {
                let xv: [__m512i; V] = std::array::from_fn(|v| {
                    if o0 + 16 * v < p_pad {
                        // SAFETY: o0 + 16 v + 16 <= p_pad (a multiple of 16) words in row q.
                        _mm512_loadu_si512(x4.as_ptr().add(q * p_pad + o0 + 16 * v) as *const _)
                    } else {
                        _mm512_setzero_si512()
                    }
                });
                for j in 0..R {
                    let wv = _mm512_set1_epi32(*qw.get_unchecked(rows[j] * kq + q) as i32);
                    for v in 0..V {
                        acc[j][v] = _mm512_dpbusd_epi32(acc[j][v], xv[v], wv);
                    }
                }
            }
            for j in 0..R {
                let corr = _mm512_set1_epi32((128 + zero) * w.sums[rows[j] * groups + g]);
                let sc = _mm512_set1_ps(w.scales[rows[j] * groups + g]);
                for v in 0..V {
                    let f = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[j][v], corr));
                    accf[j][v] = _mm512_add_ps(accf[j][v], _mm512_mul_ps(f, sc));
                }
            }
        }
        let bs: [__m512; R] = std::array::from_fn(|j| _mm512_set1_ps(bias.map_or(0.0, |b| b[rows[j]])));
        let at = (y, sink, several);
        if let (true, Some(act)) = (ACT, act) {
            // Every (row, vector)'s output first, then one test for them all (the common case
            // stores without a branch between the vectors). Rows past n and lanes past p are not
            // stored, so their tests do not count.
            let idle = |i: usize| if r0 + i / V < n { !masks[i % V] } else { 0xffff };
            if V == 2 {
                let pre: [__m512; 8] =
                    std::array::from_fn(|i| _mm512_add_ps(_mm512_mul_ps(accf[i / 2][i % V], xs), bs[i / 2]));
                let out = act_outputs::<8>(pre, std::array::from_fn(idle), act);
                for (i, &out) in out.iter().enumerate() {
                    if r0 + i / 2 < n && masks[i % V] != 0 {
                        sink_store::<V>(at, (rows[i / 2], i % V), out, (&masks, &parts));
                    }
                }
            } else {
                let pre: [__m512; 4] = std::array::from_fn(|i| _mm512_add_ps(_mm512_mul_ps(accf[i][0], xs), bs[i]));
                let out = act_outputs::<4>(pre, std::array::from_fn(idle), act);
                for (i, &out) in out.iter().enumerate() {
                    if r0 + i < n && masks[0] != 0 {
                        sink_store::<V>(at, (rows[i], 0), out, (&masks, &parts));
                    }
                }
            }
            continue;
        }
        for (j, &r) in rows.iter().enumerate() {
            if r0 + j >= n {
                break;
            }
            for v in 0..V {
                if masks[v] != 0 {
                    let out = _mm512_add_ps(_mm512_mul_ps(accf[j][v], xs), bs[j]);
                    let out = if CHAIN { post16(out, post) } else { pv.apply::<CLAMP, FQ>(out) };
                    sink_store::<V>(at, (r, v), out, (&masks, &parts));
                }
            }
        }
    }
}

/// [`pointwise_block`]'s store of row `r`'s vector `v` of outputs (`y` its first position's row
/// 0, `several` images side by side: per image part under its mask).
#[inline(always)]
unsafe fn sink_store<const V: usize>(
    (y, sink, several): (*mut f32, Sink, bool),
    (r, v): (usize, usize),
    out: __m512,
    (masks, parts): (&[__mmask16; V], &[ImageParts; V]),
) {
    if sink.tile {
        // SAFETY: a tile's rows hold 32 values. (Whole vectors: a masked store cannot forward to
        // the loads that read the tile right after.)
        _mm512_storeu_ps(y.add(r * sink.ys + 16 * v), out);
    } else if several {
        for &(mask, shift) in &parts[v] {
            if mask != 0 {
                // SAFETY: the mask's lanes are image g's positions, stored in its row r (the
                // address of lane 0 lies between the start of `y` and that of the first stored
                // lane).
                _mm512_mask_storeu_ps(y.add(r * sink.ys + 16 * v + shift), mask, out);
            }
        }
    } else {
        // SAFETY: the mask keeps the store within row r's p outputs.
        _mm512_mask_storeu_ps(y.add(r * sink.ys + 16 * v), masks[v], out);
    }
}

/// A HardSwish then its FakeQuant ([`ActLevels`]) on `K` vectors of pre-activation values, as
/// the level kernel computes them ([`hard_swish_est`], then [`levels16`]): each vector's outputs
/// where every lane but the `idle` ones is certain, else the two ops' definition lane by lane.
#[inline(always)]
unsafe fn act_outputs<const K: usize>(pre: [__m512; K], idle: [__mmask16; K], act: ActLevels) -> [__m512; K] {
    let est = hard_swish_est(pre, act.rcp);
    let outs = levels16(est, idle, act.q4);
    let mut y = [_mm512_setzero_ps(); K];
    for (i, &(out, sure)) in outs.iter().enumerate() {
        y[i] = if sure {
            out
        } else {
            let mut v = [0f32; 16];
            _mm512_storeu_ps(v.as_mut_ptr(), pre[i]);
            definition_levels(&mut v, crate::generic::Post::HardSwish, act.q4);
            _mm512_loadu_ps(v.as_ptr())
        };
    }
    y
}

/// [`super::common::conv_direct`] on 16-lane vectors: eight output channels by up to three
/// vectors of columns (24 accumulators of the 32 registers).
///
/// # Safety
/// The CPU must support AVX-512 F, AVX2 and FMA; the buffers as `conv_direct` says.
#[target_feature(enable = "avx512f,avx2,fma")]
pub(crate) unsafe fn avx512_conv_direct(
    xp: &[f32],
    w: &[f32],
    d: super::common::DirectConv,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    super::common::conv_direct::<__m512, 8, 3>(xp, w, d, bias, out)
}

/// [`crate::dequant::dequant_gemm`] for one row on 16-lane vectors (`common::dequant_gemv`,
/// eight vectors of columns per pass).
///
/// # Safety
/// AVX-512 F, AVX2 and FMA; `x` holds `w.k` values, `y` `w.n`.
#[target_feature(enable = "avx512f,avx2,fma")]
pub(crate) unsafe fn avx512_dequant_gemv(w: &crate::dequant::DequantRows, x: &[f32], y: &mut [f32]) {
    super::common::dequant_gemv::<__m512, 8>(w, x, y)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `erf8_est` on a sweep of |x| < 6 (one f32 in 61 of each sign; `avx2`'s test of `erf4_est`
    /// on eight lanes, four vectors a step): below 1.25 `libm::erf`'s f64 bits; from there the
    /// estimate, within 2^12 units of the last place of `libm::erf`, so the screen's margin of
    /// 2^16 units holds with sixteen times the room; and the sweep meets estimates nearly halfway
    /// between two f32 that the screen sends to the definition.
    #[test]
    fn erf_estimate_is_within_the_screen() {
        if !std::is_x86_feature_detected!("avx512f") {
            eprintln!("skipping erf_estimate_is_within_the_screen: no AVX-512 F");
            return;
        }
        let hi = 6f32.to_bits();
        let mut xs: Vec<f64> =
            (0..hi).step_by(61).flat_map(|b| [f32::from_bits(b) as f64, -f32::from_bits(b) as f64]).collect();
        xs.extend([0.0, -0.0, 1.25, -1.25, 0.84375, 1.0 / 0.35, 5.999, 1e-300]);
        xs.truncate(xs.len() / 32 * 32);
        let (mut worst, mut screened, mut tails) = (0u64, 0usize, 0usize);
        for c in xs.chunks_exact(32) {
            // SAFETY: AVX-512 F checked above (with it AVX2 and FMA); 32 values.
            let (got, tail, rest, far) = unsafe {
                let v: [__m512d; 4] = std::array::from_fn(|j| _mm512_loadu_pd(c.as_ptr().add(8 * j)));
                let (y, tail, rest) = erf8_est::<4>(v);
                let mut got = [0f64; 32];
                let mut far = [0u8; 4];
                for j in 0..4 {
                    _mm512_storeu_pd(got.as_mut_ptr().add(8 * j), y[j]);
                    far[j] = far_from_halfway8(y[j]);
                }
                (got, tail, rest, far)
            };
            assert_eq!(rest, [0; 4], "{c:?}: a lane below 6 left to libm");
            for (i, (&x, &g)) in c.iter().zip(&got).enumerate() {
                let want = libm::erf(x);
                if tail[i / 8] >> (i % 8) & 1 == 0 {
                    assert_eq!(g.to_bits(), want.to_bits(), "erf({x:e}) below 1.25");
                    continue;
                }
                tails += 1;
                worst = worst.max(g.to_bits().abs_diff(want.to_bits()));
                if far[i / 8] >> (i % 8) & 1 != 0 {
                    assert_eq!((g as f32).to_bits(), (want as f32).to_bits(), "erf({x:e}) screened as sure");
                } else {
                    screened += 1;
                }
            }
        }
        assert!(worst < 1 << 12, "erf estimate {worst} units from libm::erf");
        assert!(crate::generic::SCREEN_MARGIN as u64 >= worst << 4);
        assert!(screened > 0 && screened * 1000 < tails, "{screened} of {tails} screened out");
        eprintln!("erf tail estimate (AVX-512): worst {worst} units, {screened} of {tails} screened out");
    }

    /// The SiLU level kernel's estimate `x sigma~(x)` (with a reciprocal of 1) is within `2^-20.5`
    /// of `x / (1 + e^-x)` (relative, in f64) on every lane it takes, and takes every lane with
    /// `|x| < 80`: one f32 in 997 of each sign up to 80, the bound its level test rests on with
    /// over four times the room (products of subnormal size within their rounding).
    #[test]
    fn silu_estimate_is_within_its_bound() {
        if !std::is_x86_feature_detected!("avx512f") {
            eprintln!("skipping silu_estimate_is_within_its_bound: no AVX-512 F");
            return;
        }
        let top = 80f32.to_bits();
        let xs: Vec<f32> = (0..top)
            .step_by(997)
            .flat_map(|b| [f32::from_bits(b), -f32::from_bits(b)])
            .chain([79.99, -79.99, 30.0, -30.0, 1e-30, -1e-30])
            .collect();
        let mut worst = 0f64;
        for c in xs.chunks_exact(16) {
            // SAFETY: AVX-512 F checked above (AVX2 and FMA with it on every such CPU); 16 values.
            let [(q, _, ok)] = unsafe { silu_est([_mm512_loadu_ps(c.as_ptr())], 1.0) };
            assert_eq!(ok, 0xffff, "a lane below 80 not taken: {c:?}");
            let mut got = [0f32; 16];
            // SAFETY: as above; 16 values.
            unsafe { _mm512_storeu_ps(got.as_mut_ptr(), q) };
            for (&x, &g) in c.iter().zip(&got) {
                let x = x as f64;
                let want = x / (1.0 + (-x).exp());
                // (A subnormal product is within half its spacing, 2^-150: the level test's
                // 2^-100 term.)
                if want.abs() >= f32::MIN_POSITIVE as f64 {
                    worst = worst.max(((g as f64 - want) / want).abs());
                } else {
                    assert!((g as f64 - want).abs() <= 2f64.powi(-149), "x {x}: {g} against {want}");
                }
            }
        }
        assert!(worst < 2f64.powf(-20.5), "worst relative error 2^{:.2}", worst.log2());
        eprintln!("SiLU estimate: worst relative error 2^{:.2} over {} values", worst.log2(), xs.len());
    }

    /// `transpose16` moves row i lane j to row j lane i, for every (i, j).
    #[test]
    fn transpose16_transposes() {
        if !std::is_x86_feature_detected!("avx512f") {
            eprintln!("skipping transpose16: no AVX-512 F");
            return;
        }
        let a: Vec<f32> = (0..256).map(|v| v as f32).collect();
        // SAFETY: AVX-512 F checked above; each row reads 16 of the 256 values.
        let out = unsafe {
            let rows: [__m512; 16] = std::array::from_fn(|i| _mm512_loadu_ps(a.as_ptr().add(16 * i)));
            transpose16(rows)
        };
        let mut got = [0f32; 256];
        for (j, v) in out.iter().enumerate() {
            // SAFETY: as above; row j writes 16 of the 256 values.
            unsafe { _mm512_storeu_ps(got.as_mut_ptr().add(16 * j), *v) };
        }
        for i in 0..16 {
            for j in 0..16 {
                assert_eq!(got[16 * j + i], a[16 * i + j], "row {i} lane {j}");
            }
        }
    }
}
