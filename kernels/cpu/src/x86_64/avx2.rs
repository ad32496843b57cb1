//! AVX2 + FMA kernels for packed Q4 weights (see `packed`): W4A8 GEMV with `vpmaddubsw`
//! (unsigned nibbles x signed int8 activations, exact int32 sums per group, then the shared
//! float epilogue, so results equal the generic kernel bit for bit) and weight-only W4 GEMV on
//! f32 activations (nibbles widened to f32 in registers, FMA accumulation).

use crate::generic::QRow;
use crate::packed::{ChannelTiles, PackedQ4, QK4};
use std::arch::x86_64::*;

/// The 32 nibbles of a block as unsigned bytes in element order (0-15 low lane, 16-31 high).
#[inline]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn unpack_u8(p: *const u8) -> __m256i {
    let raw = _mm_loadu_si128(p as *const __m128i);
    let mask = _mm_set1_epi8(0x0f);
    let lo = _mm_and_si128(raw, mask);
    let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
    _mm256_set_m128i(hi, lo)
}

#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn hsum_f32(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0b01));
    _mm_cvtss_f32(s)
}

/// Sums of four rows' int32 accumulators: lane j of the result is the total of `a[j]`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn reduce4(a: &[__m256i; 4]) -> __m128i {
    let h = _mm256_hadd_epi32(_mm256_hadd_epi32(a[0], a[1]), _mm256_hadd_epi32(a[2], a[3]));
    _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1))
}

/// The int32 accumulators (eight lanes to be summed) of blocks `i..end` of four rows against
/// `NC` inputs.
#[inline(always)]
pub(crate) unsafe fn group_sums<const NC: usize>(
    rp: [*const u8; 4],
    xp: [*const i8; NC],
    mut i: usize,
    end: usize,
    m4: __m256i,
    ones: __m256i,
) -> [[__m256i; 4]; NC] {
    let mut acc = [[_mm256_setzero_si256(); 4]; NC];
    while i + 2 <= end {
        let mut xl = [_mm256_setzero_si256(); NC];
        let mut xh = [_mm256_setzero_si256(); NC];
        for c in 0..NC {
            let a = _mm256_loadu_si256(xp[c].add(i * QK4) as *const __m256i);
            let b = _mm256_loadu_si256(xp[c].add(i * QK4 + QK4) as *const __m256i);
            xl[c] = _mm256_permute2x128_si256(a, b, 0x20);
            xh[c] = _mm256_permute2x128_si256(a, b, 0x31);
        }
        for j in 0..4 {
            let raw = _mm256_loadu_si256(rp[j].add(i * 16) as *const __m256i);
            let lo = _mm256_and_si256(raw, m4);
            let hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
            for c in 0..NC {
                let p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xl[c]), _mm256_maddubs_epi16(hi, xh[c]));
                acc[c][j] = _mm256_add_epi32(acc[c][j], _mm256_madd_epi16(p, ones));
            }
        }
        i += 2;
    }
    if i < end {
        single_block::<NC>(rp, xp, i, ones, &mut acc);
    }
    acc
}

/// Adds block `i` alone (a group's odd last block) of four rows against `NC` inputs to `acc`.
#[inline(always)]
pub(crate) unsafe fn single_block<const NC: usize>(
    rp: [*const u8; 4],
    xp: [*const i8; NC],
    i: usize,
    ones: __m256i,
    acc: &mut [[__m256i; 4]; NC],
) {
    let xv: [__m256i; NC] = std::array::from_fn(|c| _mm256_loadu_si256(xp[c].add(i * QK4) as *const __m256i));
    for j in 0..4 {
        let wv = unpack_u8(rp[j].add(i * 16));
        for c in 0..NC {
            acc[c][j] = _mm256_add_epi32(acc[c][j], _mm256_madd_epi16(_mm256_maddubs_epi16(wv, xv[c]), ones));
        }
    }
}

/// W4A8 for tile `t` of `w` (rows `4t..4t+4`, the last row repeated past `n`) against `NC`
/// inputs: per group the exact integer sums `sum_k (x[k] - zero) q[r, k]` of the four rows (one
/// pass over the weights serves every input), then the shared float epilogue on the four rows
/// at once (group scales and weight sums from the tile-major copies, one load each). Returns
/// the four outputs per input, equal bit for bit to `generic_q4q8_row`.
///
/// Blocks go in pairs: one 32-byte load holds two blocks' nibbles, whose low halves pair with
/// elements 0-15 of both blocks and high halves with 16-31 (the inputs are permuted to match
/// once per pair, for all four rows); two `vpmaddubsw` products are added in i16 (each at most
/// 2 * 15 * 128, so the sum fits) before one `vpmaddwd` widens them.
#[inline(always)]
pub(crate) unsafe fn tile_q4q8<const NC: usize, const VNNI: bool>(
    w: &PackedQ4,
    t: usize,
    xs: [QRow; NC],
    bias: Option<&[f32]>,
) -> [[f32; 4]; NC] {
    let groups = w.groups();
    let bpg = w.group / QK4;
    let bpr = w.k_pad / QK4;
    let ones = _mm256_set1_epi16(1);
    let m4 = _mm256_set1_epi8(0x0f);
    let rows = tile_rows(4 * t, w.n);
    let rp: [*const u8; 4] = std::array::from_fn(|j| w.blocks.as_ptr().add(rows[j] * bpr) as *const u8);
    let xp: [*const i8; NC] = std::array::from_fn(|c| xs[c].q.as_ptr());
    let zeros: [__m128i; NC] = std::array::from_fn(|c| _mm_set1_epi32(xs[c].zero));
    let ts = w.tile_scales.as_ptr().add(t * groups * 4);
    let tw = w.tile_sums.as_ptr().add(t * groups * 4);
    let mut accf = [_mm_setzero_ps(); NC];
    for g in 0..groups {
        let acc = if VNNI {
            super::avx512::group_sums_vnni::<NC>(rp, xp, g * bpg, (g + 1) * bpg, m4, ones)
        } else {
            group_sums::<NC>(rp, xp, g * bpg, (g + 1) * bpg, m4, ones)
        };
        let ws = _mm_loadu_si128(tw.add(g * 4) as *const __m128i);
        let sc = _mm_loadu_ps(ts.add(g * 4));
        for c in 0..NC {
            // sum (q + 8) x - 8 sum x - zero sum q = sum (x - zero) q, four rows at once.
            let v = _mm_sub_epi32(
                _mm_sub_epi32(reduce4(&acc[c]), _mm_set1_epi32(8 * *xs[c].sums.get_unchecked(g))),
                _mm_mullo_epi32(zeros[c], ws),
            );
            // The epilogue's order: product rounded, then added.
            accf[c] = _mm_add_ps(accf[c], _mm_mul_ps(_mm_cvtepi32_ps(v), sc));
        }
    }
    let b = match bias {
        Some(b) => _mm_set_ps(b[rows[3]], b[rows[2]], b[rows[1]], b[rows[0]]),
        None => _mm_setzero_ps(),
    };
    std::array::from_fn(|c| {
        let mut out = [0f32; 4];
        _mm_storeu_ps(out.as_mut_ptr(), _mm_add_ps(_mm_mul_ps(accf[c], _mm_set1_ps(xs[c].scale)), b));
        out
    })
}

/// The four rows of the tile starting at `r` (the last one repeated past `end`).
#[inline]
pub(crate) fn tile_rows(r: usize, end: usize) -> [usize; 4] {
    std::array::from_fn(|j| (r + j).min(end - 1))
}

/// W4A8 GEMV rows `rows` of `w` (`rows.start` a multiple of four), tile by tile (`VNNI`: the
/// AVX-512 VNNI group sums): the batch kernel on one input.
#[inline(always)]
pub(crate) unsafe fn gemv_rows_impl<const VNNI: bool>(
    w: &PackedQ4,
    x: QRow,
    bias: Option<&[f32]>,
    rows: std::ops::Range<usize>,
    y: &mut [f32],
) {
    gemm_impl::<VNNI>(w, rows, 1, |_| x, bias, y, (0, 1))
}

/// W4A8 of rows `rows` (start a multiple of four) on `n_in` inputs (`x(c)` the `c`-th): output
/// `(c, r)` goes to `y[c * cs + (r - rows.start) * rs]`. Tiles of four rows outer, inputs inner
/// in pairs: each weight tile is read from memory once for all the inputs and unpacked once per
/// pair.
#[inline(always)]
pub(crate) unsafe fn gemm_impl<'a, const VNNI: bool>(
    w: &PackedQ4,
    rows: std::ops::Range<usize>,
    n_in: usize,
    x: impl Fn(usize) -> QRow<'a>,
    bias: Option<&[f32]>,
    y: &mut [f32],
    (cs, rs): (usize, usize),
) {
    debug_assert!(rows.start.is_multiple_of(4));
    let mut r = rows.start;
    while r < rows.end {
        let n = (rows.end - r).min(4);
        let at = r - rows.start;
        let mut put = |c: usize, o: &[f32; 4]| {
            for (j, &v) in o[..n].iter().enumerate() {
                y[c * cs + (at + j) * rs] = v;
            }
        };
        let mut c = 0;
        while c + 2 <= n_in {
            let [o0, o1] = tile_q4q8::<2, VNNI>(w, r / 4, [x(c), x(c + 1)], bias);
            put(c, &o0);
            put(c + 1, &o1);
            c += 2;
        }
        if c < n_in {
            let [o] = tile_q4q8::<1, VNNI>(w, r / 4, [x(c)], bias);
            put(c, &o);
        }
        r += 4;
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
    gemv_rows_impl::<false>(w, x, bias, rows, y)
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
    gemm_impl::<false>(w, rows, xs.len(), |c| xs[c], bias, y, strides)
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

/// `quantize_level` on eight lanes `(scale, zero, lo, hi)`: divide, round half to even
/// (`vroundps`; the scalar add-magic rounding after bounding to 2^22 gives the same integers), add
/// the zero point, clamp with NaN kept (`vminps`/`vmaxps` return their second operand, the value,
/// when it is NaN).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn level8(x: __m256, (vs, vz, vlo, vhi): (__m256, __m256, __m256, __m256)) -> __m256 {
    let t = _mm256_div_ps(x, vs);
    let y = _mm256_add_ps(_mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), vz);
    _mm256_max_ps(vlo, _mm256_min_ps(vhi, y))
}

/// `quantize_i8` over a slice, 32 values per step: the levels ([`level8`]), NaN to 0 as `as i8`
/// does, then packed to bytes in order.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn avx2_quantize_i8(x: &[f32], scale: f32, zero: i32, lo: i32, hi: i32, out: &mut [i8]) {
    let n = x.len().min(out.len());
    let (z, lo, hi) = (zero as f32, lo.max(-128) as f32, hi.min(127) as f32);
    let v = (_mm256_set1_ps(scale), _mm256_set1_ps(z), _mm256_set1_ps(lo), _mm256_set1_ps(hi));
    let q = |p: *const f32| {
        let y = level8(_mm256_loadu_ps(p), v);
        _mm256_cvtps_epi32(_mm256_and_ps(y, _mm256_cmp_ps(y, y, _CMP_ORD_Q)))
    };
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    let mut i = 0;
    while i + 32 <= n {
        let p = x.as_ptr().add(i);
        let a = _mm256_packs_epi32(q(p), q(p.add(8)));
        let b = _mm256_packs_epi32(q(p.add(16)), q(p.add(24)));
        let v = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(a, b), order);
        _mm256_storeu_si256(out.as_mut_ptr().add(i) as *mut __m256i, v);
        i += 32;
    }
    for (d, &v) in out[i..n].iter_mut().zip(&x[i..n]) {
        *d = crate::generic::quantize_i8(v, scale, z, lo, hi);
    }
}

/// `fake_quant_into` eight lanes at a time: the levels ([`level8`]) back to values.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn avx2_fake_quant(x: &[f32], scale: f32, zero: f32, lo: f32, hi: f32, out: &mut [f32]) {
    let n = x.len().min(out.len());
    let v @ (vs, vz, _, _) = (_mm256_set1_ps(scale), _mm256_set1_ps(zero), _mm256_set1_ps(lo), _mm256_set1_ps(hi));
    let mut i = 0;
    while i + 8 <= n {
        let y = level8(_mm256_loadu_ps(x.as_ptr().add(i)), v);
        _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_mul_ps(_mm256_sub_ps(y, vz), vs));
        i += 8;
    }
    for (d, &v) in out[i..n].iter_mut().zip(&x[i..n]) {
        *d = crate::generic::fake_quant_one(v, scale, zero, lo, hi);
    }
}

/// An f32 vector `sgemm`'s direct path runs on: 8 lanes here, 16 with AVX-512 (`avx512.rs`).
/// Inlined into callers that enable the instructions.
pub(crate) trait F32Lanes: Copy {
    const LANES: usize;
    unsafe fn zero() -> Self;
    unsafe fn load(p: *const f32) -> Self;
    unsafe fn splat(v: f32) -> Self;
    /// `a * b + c`, rounded once.
    unsafe fn fmadd(a: Self, b: Self, c: Self) -> Self;
    unsafe fn store(self, p: *mut f32);
}

impl F32Lanes for __m256 {
    const LANES: usize = 8;
    #[inline(always)]
    unsafe fn zero() -> Self {
        _mm256_setzero_ps()
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        _mm256_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        _mm256_set1_ps(v)
    }
    #[inline(always)]
    unsafe fn fmadd(a: Self, b: Self, c: Self) -> Self {
        _mm256_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        _mm256_storeu_ps(p, self)
    }
}

/// `c = a @ b` with each output one FMA chain over k from zero (`sgemm`'s direct path), on
/// vectors `F`: tiles of up to four rows by `2 F::LANES` columns (per k, two loads of b's row and
/// a broadcast of a per row), then `F::LANES` columns; returns the first column not done (the
/// caller finishes the edge on narrower vectors or one output at a time). Column panels are
/// outermost: a panel of b (k x 2 lanes) stays in L1 while every row block uses it.
///
/// # Safety
/// As [`avx2_sgemm_direct`], and the CPU has `F`'s instructions.
#[inline(always)]
pub(crate) unsafe fn sgemm_direct_panels<F: F32Lanes>(
    (m, k, n): (usize, usize, usize),
    (ap, rsa, csa): (*const f32, usize, usize),
    (bp, rsb): (*const f32, usize),
    (cp, rsc): (*mut f32, usize),
) -> usize {
    /// Rows `i..i + R`, columns `j..j + V F::LANES`.
    #[inline(always)]
    unsafe fn tile<F: F32Lanes, const R: usize, const V: usize>(
        (ap, rsa, csa): (*const f32, usize, usize),
        (bp, rsb): (*const f32, usize),
        (cp, rsc): (*mut f32, usize),
        k: usize,
        (i, j): (usize, usize),
    ) {
        let mut acc = [[F::zero(); V]; R];
        for p in 0..k {
            let bv: [F; V] = std::array::from_fn(|v| F::load(bp.add(p * rsb + j + F::LANES * v)));
            for (r, acc) in acc.iter_mut().enumerate() {
                let av = F::splat(*ap.add((i + r) * rsa + p * csa));
                for v in 0..V {
                    acc[v] = F::fmadd(av, bv[v], acc[v]);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for (v, a) in acc.iter().enumerate() {
                a.store(cp.add((i + r) * rsc + j + F::LANES * v));
            }
        }
    }
    #[inline(always)]
    unsafe fn rows<F: F32Lanes, const V: usize>(
        a: (*const f32, usize, usize),
        b: (*const f32, usize),
        c: (*mut f32, usize),
        (m, k): (usize, usize),
        j: usize,
    ) {
        let mut i = 0;
        while i + 4 <= m {
            tile::<F, 4, V>(a, b, c, k, (i, j));
            i += 4;
        }
        match m - i {
            3 => tile::<F, 3, V>(a, b, c, k, (i, j)),
            2 => tile::<F, 2, V>(a, b, c, k, (i, j)),
            1 => tile::<F, 1, V>(a, b, c, k, (i, j)),
            _ => {}
        }
    }
    let (av, bv, cv) = ((ap, rsa, csa), (bp, rsb), (cp, rsc));
    let mut j = 0;
    while j + 2 * F::LANES <= n {
        rows::<F, 2>(av, bv, cv, (m, k), j);
        j += 2 * F::LANES;
    }
    if j + F::LANES <= n {
        rows::<F, 1>(av, bv, cv, (m, k), j);
        j += F::LANES;
    }
    j
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
    (rsa, csa): (usize, usize),
    b: &[f32],
    rsb: usize,
    c: &mut [f32],
    rsc: usize,
) {
    let (ap, bp, cp) = (a.as_ptr(), b.as_ptr(), c.as_mut_ptr());
    let j = sgemm_direct_panels::<__m256>((m, k, n), (ap, rsa, csa), (bp, rsb), (cp, rsc));
    for j in j..n {
        for i in 0..m {
            let mut acc = 0f32;
            for p in 0..k {
                acc = (*ap.add(i * rsa + p * csa)).mul_add(*bp.add(p * rsb + j), acc);
            }
            *cp.add(i * rsc + j) = acc;
        }
    }
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

/// `exp_nonpos` on four lanes: the same operations (the 2^n bits by 64-bit integer lanes).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_nonpos4(x: __m256d) -> __m256d {
    use crate::generic::{EXP_LN2_HI, EXP_LN2_LO, EXP_MAGIC, EXP_TAYLOR};
    let magic = _mm256_set1_pd(EXP_MAGIC);
    let t = _mm256_add_pd(_mm256_mul_pd(x, _mm256_set1_pd(std::f64::consts::LOG2_E)), magic);
    let n = _mm256_sub_pd(t, magic);
    let r = _mm256_sub_pd(
        _mm256_sub_pd(x, _mm256_mul_pd(n, _mm256_set1_pd(EXP_LN2_HI))),
        _mm256_mul_pd(n, _mm256_set1_pd(EXP_LN2_LO)),
    );
    let mut p = _mm256_set1_pd(EXP_TAYLOR[13]);
    for &c in EXP_TAYLOR[..13].iter().rev() {
        p = _mm256_add_pd(_mm256_mul_pd(p, r), _mm256_set1_pd(c));
    }
    let bits = _mm256_add_epi64(
        _mm256_sub_epi64(_mm256_castpd_si256(t), _mm256_set1_epi64x(EXP_MAGIC.to_bits() as i64)),
        _mm256_set1_epi64x(1023),
    );
    let y = _mm256_mul_pd(p, _mm256_castsi256_pd(_mm256_slli_epi64(bits, 52)));
    // Lanes at or below -708 are 0; NaN lanes (unordered: kept) carry NaN through p.
    _mm256_and_pd(y, _mm256_cmp_pd(x, _mm256_set1_pd(-708.0), _CMP_NLE_UQ))
}

/// [`exp_nonpos4`] on `K` vectors at once, each step for all of them before the next (the
/// polynomial's chains of dependent multiplies and adds interleave). The same operations per lane.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_nonpos4xk<const K: usize>(x: [__m256d; K]) -> [__m256d; K] {
    use crate::generic::{EXP_LN2_HI, EXP_LN2_LO, EXP_MAGIC, EXP_TAYLOR};
    let magic = _mm256_set1_pd(EXP_MAGIC);
    let t: [__m256d; K] =
        std::array::from_fn(|i| _mm256_add_pd(_mm256_mul_pd(x[i], _mm256_set1_pd(std::f64::consts::LOG2_E)), magic));
    let r: [__m256d; K] = std::array::from_fn(|i| {
        let n = _mm256_sub_pd(t[i], magic);
        _mm256_sub_pd(
            _mm256_sub_pd(x[i], _mm256_mul_pd(n, _mm256_set1_pd(EXP_LN2_HI))),
            _mm256_mul_pd(n, _mm256_set1_pd(EXP_LN2_LO)),
        )
    });
    let mut p = [_mm256_set1_pd(EXP_TAYLOR[13]); K];
    for &c in EXP_TAYLOR[..13].iter().rev() {
        let c = _mm256_set1_pd(c);
        for i in 0..K {
            p[i] = _mm256_add_pd(_mm256_mul_pd(p[i], r[i]), c);
        }
    }
    std::array::from_fn(|i| {
        let bits = _mm256_add_epi64(
            _mm256_sub_epi64(_mm256_castpd_si256(t[i]), _mm256_set1_epi64x(EXP_MAGIC.to_bits() as i64)),
            _mm256_set1_epi64x(1023),
        );
        let y = _mm256_mul_pd(p[i], _mm256_castsi256_pd(_mm256_slli_epi64(bits, 52)));
        _mm256_and_pd(y, _mm256_cmp_pd(x[i], _mm256_set1_pd(-708.0), _CMP_NLE_UQ))
    })
}

/// `softmax_rows` with the maximum, exponentials and division four or eight lanes at a time; the
/// four partial sums are the four lanes of one vector (element j into lane j mod 4).
///
/// # Safety
/// The CPU must support AVX2 and FMA; `x.len() == out.len()`, `dim > 0`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn avx2_softmax_rows(x: &[f32], dim: usize, out: &mut [f32]) {
    softmax_rows_impl::<false>(x, dim, out)
}

/// [`avx2_softmax_rows`]; with `WIDE` (AVX-512 F) the exponentials and divisions eight lanes at a
/// time, each vector's two halves added into the four partial sums in element order (the same
/// operations per element, the same sums: the same bits).
#[inline(always)]
pub(crate) unsafe fn softmax_rows_impl<const WIDE: bool>(x: &[f32], dim: usize, out: &mut [f32]) {
    let mut e = vec![0f64; dim.next_multiple_of(4)];
    let d4 = dim / 4 * 4;
    for (row, y) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        // The maximum: vmaxps returns its second operand, the running maximum, for a NaN value.
        let mut mv = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut j = 0;
        while j + 8 <= dim {
            mv = _mm256_max_ps(_mm256_loadu_ps(row.as_ptr().add(j)), mv);
            j += 8;
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), mv);
        let m = lanes.iter().chain(&row[j..]).fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
        let vm = _mm256_set1_pd(m);
        let mut sum = _mm256_setzero_pd();
        let mut j = 0;
        if WIDE {
            while j + 32 <= d4 {
                let v = super::avx512::exp_nonpos8xk::<4>(std::array::from_fn(|i| {
                    _mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(row.as_ptr().add(j + 8 * i))), _mm512_set1_pd(m))
                }));
                for (i, v) in v.iter().enumerate() {
                    _mm512_storeu_pd(e.as_mut_ptr().add(j + 8 * i), *v);
                    sum = _mm256_add_pd(sum, _mm512_castpd512_pd256(*v));
                    sum = _mm256_add_pd(sum, _mm512_extractf64x4_pd::<1>(*v));
                }
                j += 32;
            }
        }
        // Four independent exponentials at a time (their long dependency chains overlap), added
        // into the sum in element order.
        while j + 16 <= d4 {
            let v = exp_nonpos4xk::<4>(std::array::from_fn(|i| {
                _mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(row.as_ptr().add(j + 4 * i))), vm)
            }));
            for (i, v) in v.iter().enumerate() {
                _mm256_storeu_pd(e.as_mut_ptr().add(j + 4 * i), *v);
                sum = _mm256_add_pd(sum, *v);
            }
            j += 16;
        }
        while j < d4 {
            let v = exp_nonpos4(_mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(row.as_ptr().add(j))), vm));
            _mm256_storeu_pd(e.as_mut_ptr().add(j), v);
            sum = _mm256_add_pd(sum, v);
            j += 4;
        }
        let mut s = [0f64; 4];
        _mm256_storeu_pd(s.as_mut_ptr(), sum);
        for (j, &v) in row.iter().enumerate().skip(d4) {
            e[j] = crate::generic::exp_nonpos(v as f64 - m);
            s[j % 4] += e[j];
        }
        let total = (s[0] + s[1]) + (s[2] + s[3]);
        let vt = _mm256_set1_pd(total);
        let mut j = 0;
        if WIDE {
            let vt8 = _mm512_set1_pd(total);
            while j + 8 <= d4 {
                let q = _mm512_div_pd(_mm512_loadu_pd(e.as_ptr().add(j)), vt8);
                _mm256_storeu_ps(y.as_mut_ptr().add(j), _mm512_cvtpd_ps(q));
                j += 8;
            }
        }
        while j < d4 {
            let q = _mm256_div_pd(_mm256_loadu_pd(e.as_ptr().add(j)), vt);
            _mm_storeu_ps(y.as_mut_ptr().add(j), _mm256_cvtpd_ps(q));
            j += 4;
        }
        for j in d4..dim {
            y[j] = (e[j] / total) as f32;
        }
    }
}

/// An input of the channel-lane kernel: its int8 values as runs of equal length (a row: one run;
/// a convolution window: one run of C values per tap).
pub(crate) trait LaneInput: Copy {
    /// Whether the values are stored with the sign bit flipped (`x + 128` as unsigned bytes).
    const FLIPPED: bool;
    /// Values per run (a multiple of four); `usize::MAX` for one unbounded run.
    fn run(&self) -> usize;
    /// The first value of run `t`.
    fn run_ptr(&self, t: usize) -> *const i8;
    fn zero(&self) -> i32;
    fn scale(&self) -> f32;
}

impl LaneInput for QRow<'_> {
    const FLIPPED: bool = false;
    fn run(&self) -> usize {
        usize::MAX
    }
    fn run_ptr(&self, _: usize) -> *const i8 {
        self.q.as_ptr()
    }
    fn zero(&self) -> i32 {
        self.zero
    }
    fn scale(&self) -> f32 {
        self.scale
    }
}

impl LaneInput for crate::generic::QWindow<'_> {
    const FLIPPED: bool = true;
    fn run(&self) -> usize {
        self.run
    }
    fn run_ptr(&self, t: usize) -> *const i8 {
        // In bounds: `conv_q4q8_windows` checks every offset against the image.
        self.image.as_ptr().wrapping_add(self.offsets[t] as usize)
    }
    fn zero(&self) -> i32 {
        self.zero
    }
    fn scale(&self) -> f32 {
        self.scale
    }
}

/// W4A8 of one block of 32 output channels against `NP` inputs with the channels in vector lanes
/// (weights from [`ChannelTiles`]): each input's four bytes at a time broadcast, made unsigned by
/// flipping the sign bit (`x + 128`), `vpmaddubsw` against the 32 channels' four weights; i16
/// sums over up to eight quads (at most 8 * 2 * 255 * 8 = 32640, so they fit), widened per eight
/// quads; per group the exact sum less `(128 + zero) * sum(q)` is `sum (x - zero) q`, scaled in
/// the shared epilogue's order. No horizontal reductions: every lane is one channel. The inputs'
/// values are read run by run ([`LaneInput`]; runs of a multiple of four values never split a
/// quad), so a convolution window needs no gathering.
#[inline(always)]
pub(crate) unsafe fn channel_block<const NP: usize, X: LaneInput, const VNNI: bool>(
    w: &PackedQ4,
    t: &ChannelTiles,
    cb: usize,
    xs: [X; NP],
) -> [[__m256; 4]; NP] {
    let groups = w.groups();
    let quads = w.group / 4;
    let ones = _mm256_set1_epi16(1);
    let flip = _mm256_set1_epi8(-128i8);
    let run = xs[0].run();
    // The position in the runs (the same for every input): run `tap`, value `off` of it.
    let (mut tap, mut off) = (0usize, 0usize);
    let mut xp: [*const i8; NP] = std::array::from_fn(|c| xs[c].run_ptr(0));
    let mut accf = [[_mm256_setzero_ps(); 4]; NP];
    for g in 0..groups {
        let mut acc = [[_mm256_setzero_si256(); 4]; NP];
        let base = t.data.as_ptr().add((cb * groups + g) * quads * 128);
        let mut quad = 0;
        if VNNI {
            acc = super::avx512::lane_group_vnni::<NP, X>(base, quads, &xs, (&mut tap, &mut off, &mut xp));
            quad = quads;
        }
        while quad < quads {
            let end = (quad + 8).min(quads);
            let mut acc16 = [[_mm256_setzero_si256(); 4]; NP];
            while quad < end {
                if off == run {
                    tap += 1;
                    off = 0;
                    xp = std::array::from_fn(|c| xs[c].run_ptr(tap));
                }
                let wp = base.add(quad * 128);
                let wv: [__m256i; 4] = std::array::from_fn(|j| _mm256_loadu_si256(wp.add(32 * j) as *const __m256i));
                for c in 0..NP {
                    let x4 = std::ptr::read_unaligned(xp[c].add(off) as *const i32);
                    let xb =
                        if X::FLIPPED { _mm256_set1_epi32(x4) } else { _mm256_xor_si256(_mm256_set1_epi32(x4), flip) };
                    for j in 0..4 {
                        acc16[c][j] = _mm256_add_epi16(acc16[c][j], _mm256_maddubs_epi16(xb, wv[j]));
                    }
                }
                off += 4;
                quad += 1;
            }
            for c in 0..NP {
                for j in 0..4 {
                    acc[c][j] = _mm256_add_epi32(acc[c][j], _mm256_madd_epi16(acc16[c][j], ones));
                }
            }
        }
        let at = (cb * groups + g) * 32;
        for c in 0..NP {
            let zc = _mm256_set1_epi32(128 + xs[c].zero());
            for j in 0..4 {
                let ws = _mm256_loadu_si256(t.sums.as_ptr().add(at + 8 * j) as *const __m256i);
                let sc = _mm256_loadu_ps(t.scales.as_ptr().add(at + 8 * j));
                let v = _mm256_sub_epi32(acc[c][j], _mm256_mullo_epi32(zc, ws));
                // The epilogue's order: product rounded, then added.
                accf[c][j] = _mm256_add_ps(accf[c][j], _mm256_mul_ps(_mm256_cvtepi32_ps(v), sc));
            }
        }
    }
    accf
}

/// The short forms' walk over the inputs' runs (`walk`: the run and the offset in it): the first
/// value of the next group (`group` values, within one run) of each input.
#[inline(always)]
pub(crate) unsafe fn short_group_inputs<const NP: usize, X: LaneInput>(
    xs: &[X; NP],
    group: usize,
    (tap, off): &mut (usize, usize),
) -> [*const i8; NP] {
    if *off == xs[0].run() {
        *tap += 1;
        *off = 0;
    }
    let xp = std::array::from_fn(|c| xs[c].run_ptr(*tap).add(*off));
    *off += group;
    xp
}

/// [`channel_block`] for groups of eight quads (32 values) that lie within one run (the run a
/// multiple of the group: a convolution's per-tap scales, or a row): each group's i16 sums are
/// widened straight into its float update, so no int32 accumulators stay live, and a group's
/// quads run without a run check. Same arithmetic, so the same bits.
#[inline(always)]
pub(crate) unsafe fn channel_block_short<const NP: usize, const J: usize, X: LaneInput>(
    w: &PackedQ4,
    t: &ChannelTiles,
    (cb, j0): (usize, usize),
    xs: [X; NP],
) -> [[__m256; J]; NP] {
    let groups = w.groups();
    const QUADS: usize = 8;
    debug_assert!(w.group == 4 * QUADS && (xs[0].run() == usize::MAX || xs[0].run().is_multiple_of(w.group)));
    let ones = _mm256_set1_epi16(1);
    let flip = _mm256_set1_epi8(-128i8);
    let zc: [__m256i; NP] = std::array::from_fn(|c| _mm256_set1_epi32(128 + xs[c].zero()));
    let same_zero = xs.iter().all(|x| x.zero() == xs[0].zero());
    let mut accf = [[_mm256_setzero_ps(); J]; NP];
    let mut walk = (0usize, 0usize);
    for g in 0..groups {
        let xp = short_group_inputs(&xs, w.group, &mut walk);
        let base = t.data.as_ptr().add((cb * groups + g) * QUADS * 128);
        let mut acc16 = [[_mm256_setzero_si256(); J]; NP];
        for quad in 0..QUADS {
            let wp = base.add(quad * 128 + 32 * j0);
            let wv: [__m256i; J] = std::array::from_fn(|j| _mm256_loadu_si256(wp.add(32 * j) as *const __m256i));
            for c in 0..NP {
                let x4 = std::ptr::read_unaligned(xp[c].add(4 * quad) as *const i32);
                let xb = if X::FLIPPED { _mm256_set1_epi32(x4) } else { _mm256_xor_si256(_mm256_set1_epi32(x4), flip) };
                for j in 0..J {
                    acc16[c][j] = _mm256_add_epi16(acc16[c][j], _mm256_maddubs_epi16(xb, wv[j]));
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
                let v = _mm256_sub_epi32(_mm256_madd_epi16(acc16[c][j], ones), zw);
                // The epilogue's order: product rounded, then added.
                accf[c][j] = _mm256_add_ps(accf[c][j], _mm256_mul_ps(_mm256_cvtepi32_ps(v), sc));
            }
        }
    }
    accf
}

/// Channels `8 j0 .. 8 (j0 + J)` of block `cb` on `xs` (the short form, up to six inputs at a time;
/// with `VNNI` the whole block, `J` = 4, on 512-bit registers), scaled, biased and staged into
/// `tile` (column `c` for input `c` of `xs`).
#[inline(always)]
unsafe fn stage_part<X: LaneInput, const J: usize, const VNNI: bool>(
    w: &PackedQ4,
    t: &ChannelTiles,
    (cb, j0): (usize, usize),
    xs: &[X],
    b: &[f32; 32],
    tile: &mut [[f32; SHORT_TILE]; 32],
) {
    let mut c = 0;
    while c < xs.len() {
        let np = (xs.len() - c).min(6);
        let mut acc = [[_mm256_setzero_ps(); J]; 6];
        macro_rules! run {
            ($($n:literal => [$($i:literal),*]),*) => {
                match np {
                    $($n => {
                        if VNNI {
                            let a = super::avx512::lane_short_vnni::<$n, X>(w, t, cb, [$(xs[c + $i]),*]);
                            for (o, a) in acc.iter_mut().zip(&a) {
                                o.copy_from_slice(&a[..J]);
                            }
                        } else {
                            let a = channel_block_short::<$n, J, X>(w, t, (cb, j0), [$(xs[c + $i]),*]);
                            acc[..$n].copy_from_slice(&a);
                        }
                    })*
                    _ => unreachable!("1 to 6 inputs"),
                }
            };
        }
        run!(6 => [0, 1, 2, 3, 4, 5], 5 => [0, 1, 2, 3, 4], 4 => [0, 1, 2, 3], 3 => [0, 1, 2], 2 => [0, 1], 1 => [0]);
        for (i, acc) in acc[..np].iter().enumerate() {
            let scale = _mm256_set1_ps(xs[c + i].scale());
            for (j, a) in acc.iter().enumerate() {
                let mut out = [0f32; 8];
                let bj = _mm256_loadu_ps(b.as_ptr().add(8 * (j0 + j)));
                _mm256_storeu_ps(out.as_mut_ptr(), _mm256_add_ps(_mm256_mul_ps(*a, scale), bj));
                for (l, &v) in out.iter().enumerate() {
                    tile[8 * (j0 + j) + l][c + i] = v;
                }
            }
        }
        c += np;
    }
}

/// Inputs staged per block by the short form before each channel's outputs are written.
const SHORT_TILE: usize = 12;

/// The short form's block of 32 channels on every input: half the block (16 channels, two
/// registers) at a time against up to six inputs (twelve i16 accumulators, two weight registers
/// and a broadcast: no spills; with VNNI the whole block on 512-bit registers), the outputs
/// staged per twelve inputs so each channel's are written together (contiguous when the inputs
/// are adjacent in `y`: a convolution's channel-major output).
#[inline(always)]
unsafe fn short_block<X: LaneInput, const VNNI: bool>(
    w: &PackedQ4,
    t: &ChannelTiles,
    xs: &[X],
    b: &[f32; 32],
    y: &mut [f32],
    (cs, rs): (usize, usize),
    (cb, rows, r0): (usize, usize, usize),
) {
    const TILE: usize = SHORT_TILE;
    let mut tile = [[0f32; TILE]; 32];
    for c0 in (0..xs.len()).step_by(TILE) {
        let np_all = (xs.len() - c0).min(TILE);
        if VNNI {
            // All 32 channels at once on 512-bit registers.
            stage_part::<X, 4, true>(w, t, (cb, 0), &xs[c0..c0 + np_all], b, &mut tile);
        } else {
            for h in 0..2 {
                stage_part::<X, 2, false>(w, t, (cb, 2 * h), &xs[c0..c0 + np_all], b, &mut tile);
            }
        }
        for (l, row) in tile[..rows].iter().enumerate() {
            let at = (32 * cb + l - r0) * rs + c0 * cs;
            if cs == 1 && np_all == TILE {
                // A fixed length: inlined moves, not a call.
                y[at..at + TILE].copy_from_slice(row);
            } else {
                for (i, &v) in row[..np_all].iter().enumerate() {
                    y[at + i * cs] = v;
                }
            }
        }
    }
}

/// W4A8 of rows `rows_in` of `w` (start a multiple of 32) on a batch of inputs with the channels
/// in vector lanes (see [`channel_block`]); output `(c, r)` goes to `y[c * cs + (r -
/// rows_in.start) * rs]`.
#[inline(always)]
pub(crate) unsafe fn channels_impl<X: LaneInput, const VNNI: bool>(
    w: &PackedQ4,
    xs: &[X],
    bias: Option<&[f32]>,
    y: &mut [f32],
    (cs, rs): (usize, usize),
    rows_in: std::ops::Range<usize>,
) {
    debug_assert!(rows_in.start.is_multiple_of(32) && rows_in.end <= w.n);
    let t = w.channel_tiles();
    let r0 = rows_in.start;
    // Groups of eight quads inside one run take the short form (with VNNI its 512-bit variant).
    let short = w.group == 32 && xs.first().is_some_and(|x| x.run() == usize::MAX || x.run().is_multiple_of(w.group));
    let mut b = [0f32; 32];
    for cb in r0 / 32..rows_in.end.div_ceil(32) {
        let rows = (rows_in.end - 32 * cb).min(32);
        b.fill(0.0);
        if let Some(bias) = bias {
            b[..rows].copy_from_slice(&bias[32 * cb..32 * cb + rows]);
        }
        if short {
            short_block::<X, VNNI>(w, t, xs, &b, y, (cs, rs), (cb, rows, r0));
            continue;
        }
        let mut c = 0;
        while c < xs.len() {
            // Two inputs at a time, the last alone.
            let (acc, np) = if c + 2 <= xs.len() {
                (channel_block::<2, X, VNNI>(w, t, cb, [xs[c], xs[c + 1]]), 2)
            } else {
                let [a0] = channel_block::<1, X, VNNI>(w, t, cb, [xs[c]]);
                ([a0, [_mm256_setzero_ps(); 4]], 1)
            };
            for (i, acc) in acc[..np].iter().enumerate() {
                let mut out = [0f32; 32];
                let scale = _mm256_set1_ps(xs[c + i].scale());
                for (j, a) in acc.iter().enumerate() {
                    let v = _mm256_add_ps(_mm256_mul_ps(*a, scale), _mm256_loadu_ps(b.as_ptr().add(8 * j)));
                    _mm256_storeu_ps(out.as_mut_ptr().add(8 * j), v);
                }
                for (l, &v) in out[..rows].iter().enumerate() {
                    y[(c + i) * cs + (32 * cb + l - r0) * rs] = v;
                }
            }
            c += np;
        }
    }
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
    channels_impl::<X, false>(w, xs, bias, y, strides, rows)
}
