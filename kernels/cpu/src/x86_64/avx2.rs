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

/// Weight-only W4 GEMV on f32 activations, rows `rows` (see `generic_gemv_q4f32`); `x` holds
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
        *out = hsum_f32(total) + bias.map_or(0.0, |b| b[r]);
    }
}

/// W4A8 of one block of 32 output channels against `NP` inputs with the channels in vector lanes
/// (weights from [`ChannelTiles`]): each input's four bytes at a time broadcast, made unsigned by
/// flipping the sign bit (`x + 128`), `vpmaddubsw` against the 32 channels' four weights; i16
/// sums over up to eight quads (at most 8 * 2 * 255 * 8 = 32640, so they fit), widened per eight
/// quads; per group the exact sum less `(128 + zero) * sum(q)` is `sum (x - zero) q`, scaled in
/// the shared epilogue's order. No horizontal reductions: every lane is one channel.
#[inline(always)]
unsafe fn channel_block<const NP: usize>(
    w: &PackedQ4,
    t: &ChannelTiles,
    cb: usize,
    xs: [QRow; NP],
) -> [[__m256; 4]; NP] {
    let groups = w.groups();
    let quads = w.group / 4;
    let ones = _mm256_set1_epi16(1);
    let flip = _mm256_set1_epi8(-128i8);
    let mut accf = [[_mm256_setzero_ps(); 4]; NP];
    for g in 0..groups {
        let mut acc = [[_mm256_setzero_si256(); 4]; NP];
        let base = t.data.as_ptr().add((cb * groups + g) * quads * 128);
        let mut quad = 0;
        while quad < quads {
            let end = (quad + 8).min(quads);
            let mut acc16 = [[_mm256_setzero_si256(); 4]; NP];
            while quad < end {
                let wp = base.add(quad * 128);
                let wv: [__m256i; 4] = std::array::from_fn(|j| _mm256_loadu_si256(wp.add(32 * j) as *const __m256i));
                for c in 0..NP {
                    let x4 = std::ptr::read_unaligned(xs[c].q.as_ptr().add(g * w.group + quad * 4) as *const i32);
                    let xb = _mm256_xor_si256(_mm256_set1_epi32(x4), flip);
                    for j in 0..4 {
                        acc16[c][j] = _mm256_add_epi16(acc16[c][j], _mm256_maddubs_epi16(xb, wv[j]));
                    }
                }
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
            let zc = _mm256_set1_epi32(128 + xs[c].zero);
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

/// W4A8 of every row of `w` on a batch of inputs with the channels in vector lanes (see
/// [`channel_block`]); output `(c, r)` goes to `y[c * cs + r * rs]`. Equal bit for bit to
/// `generic_q4q8_row`.
///
/// # Safety
/// The CPU must support AVX2 and FMA; every `xs[c].q` holds `w.k_pad` values.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn avx2_gemm_q4q8_channels(
    w: &PackedQ4,
    xs: &[QRow],
    bias: Option<&[f32]>,
    y: &mut [f32],
    (cs, rs): (usize, usize),
) {
    let t = w.channel_tiles();
    let mut b = [0f32; 32];
    for cb in 0..t.blocks {
        let rows = (w.n - 32 * cb).min(32);
        b.fill(0.0);
        if let Some(bias) = bias {
            b[..rows].copy_from_slice(&bias[32 * cb..32 * cb + rows]);
        }
        let mut put = |c: usize, acc: &[__m256; 4], x: QRow| {
            let mut out = [0f32; 32];
            for (j, a) in acc.iter().enumerate() {
                let v =
                    _mm256_add_ps(_mm256_mul_ps(*a, _mm256_set1_ps(x.scale)), _mm256_loadu_ps(b.as_ptr().add(8 * j)));
                _mm256_storeu_ps(out.as_mut_ptr().add(8 * j), v);
            }
            for (l, &v) in out[..rows].iter().enumerate() {
                y[c * cs + (32 * cb + l) * rs] = v;
            }
        };
        let mut c = 0;
        while c + 2 <= xs.len() {
            let [a0, a1] = channel_block::<2>(w, t, cb, [xs[c], xs[c + 1]]);
            put(c, &a0, xs[c]);
            put(c + 1, &a1, xs[c + 1]);
            c += 2;
        }
        if c < xs.len() {
            let [a0] = channel_block::<1>(w, t, cb, [xs[c]]);
            put(c, &a0, xs[c]);
        }
    }
}
