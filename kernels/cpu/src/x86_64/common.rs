//! Shared pieces of the x86-64 kernels: AVX2-width building blocks (nibble unpacking, the
//! W4A8 group sums, reductions, the exact exponential) and the drivers (W4A8 tiles and
//! channel lanes, the direct f32 GEMM, softmax rows) generic over the instruction set's part
//! ([`Sums`], [`F32Lanes`]). `avx2.rs` and `avx512.rs` implement those and hold the entry
//! points; this module imports neither of them.

use crate::generic::QRow;
use crate::packed::{ChannelTiles, PackedQ4, QK4};
use std::arch::x86_64::*;

/// The instruction-set part of the drivers in this module: the W4A8 integer sums and the
/// softmax's wide steps, on AVX2 ([`super::avx2::Avx2`]) or AVX-512 VNNI
/// ([`super::avx512::Vnni`]). Each ISA's entry points instantiate the drivers with their own
/// implementation, so this module imports neither (`x86_64`: common <- avx2, common <- avx512).
/// Every implementation computes the same exact integer sums and the same float operations per
/// lane: the results are equal bit for bit.
pub(crate) trait Sums {
    /// Whether the short lane form takes a whole block of 32 channels at once (512-bit registers).
    const WIDE: bool;
    /// The int32 accumulators (eight lanes to be summed) of blocks `i..end` of four rows against
    /// `NC` inputs ([`group_sums`] is the AVX2 form).
    unsafe fn group_sums<const NC: usize>(
        rp: [*const u8; 4],
        xp: [*const i8; NC],
        i: usize,
        end: usize,
        m4: __m256i,
        ones: __m256i,
    ) -> [[__m256i; 4]; NC];
    /// The exact int32 sums of one group (`quads` quads at `base`, the `ChannelTiles` layout) of 32
    /// channels against `NP` inputs, walking the inputs' runs (`pos`: run, offset, pointers), as
    /// four vectors of eight channels per input ([`channel_block`]'s epilogue form).
    unsafe fn lane_group<const NP: usize, X: LaneInput>(
        base: *const i8,
        quads: usize,
        xs: &[X; NP],
        pos: (&mut usize, &mut usize, &mut [*const i8; NP]),
    ) -> [[__m256i; 4]; NP];
    /// The short lane form: channels `8 j0 .. 8 (j0 + J)` of block `cb` (`at = (cb, j0)`), float
    /// sums per input (`J` = 4 when [`Sums::WIDE`]).
    unsafe fn lane_short<const NP: usize, const J: usize, X: LaneInput>(
        w: &PackedQ4,
        t: &ChannelTiles,
        at: (usize, usize),
        xs: [X; NP],
    ) -> [[__m256; J]; NP];
    /// Softmax: `e[j] = exp_nonpos(e[j])` in place for the `j` the instruction set computes wider
    /// than four lanes, from 0; returns the `j` reached.
    unsafe fn softmax_exp(e: &mut [f64]) -> usize;
    /// Softmax: the quotients `(e[j] / total) as f32` ([`quotient4`]'s screen, `inv = 1 /
    /// total`) done wider than four lanes, from 0; returns the `j` reached.
    unsafe fn softmax_quot(e: &[f64], inv: f64, total: f64, y: &mut [f32]) -> usize;
}

/// Relative bound used by the quotient screens (`avx2::round_quotient8`, `avx512::round_quotient16`): above twice the largest
/// relative distance between `x * fl(1 / s)` and `fl(x / s)` (three roundings: about `3 * 2^-24`).
pub(crate) const QUOTIENT_SCREEN: f32 = 1.0 / (1 << 21) as f32;

/// The reciprocal the quotient screens multiply by: `fl(1 / s)` where it is a normal number, else
/// NaN (a subnormal reciprocal of a huge scale has fewer bits than the screen's bound assumes, an
/// infinite one of a tiny scale none): then every lane takes the division.
pub(crate) fn screen_reciprocal(scale: f32) -> f32 {
    let r = 1.0 / scale;
    if r.is_normal() {
        r
    } else {
        f32::NAN
    }
}

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
pub(crate) unsafe fn hsum_f32(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0b01));
    _mm_cvtss_f32(s)
}

/// Sums of four rows' int32 accumulators: lane j of the result is the total of `a[j]`.
#[inline]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn reduce4(a: &[__m256i; 4]) -> __m128i {
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
pub(crate) unsafe fn tile_q4q8<const NC: usize, S: Sums>(
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
        let acc = S::group_sums::<NC>(rp, xp, g * bpg, (g + 1) * bpg, m4, ones);
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

/// W4A8 GEMV rows `rows` of `w` (`rows.start` a multiple of four), tile by tile (`S`: the
/// instruction set's group sums): the batch kernel on one input.
#[inline(always)]
pub(crate) unsafe fn gemv_rows_impl<S: Sums>(
    w: &PackedQ4,
    x: QRow,
    bias: Option<&[f32]>,
    rows: std::ops::Range<usize>,
    y: &mut [f32],
) {
    gemm_impl::<S>(w, rows, 1, |_| x, bias, y, (0, 1))
}

/// W4A8 of rows `rows` (start a multiple of four) on `n_in` inputs (`x(c)` the `c`-th): output
/// `(c, r)` goes to `y[c * cs + (r - rows.start) * rs]`. Tiles of four rows outer, inputs inner
/// in pairs: each weight tile is read from memory once for all the inputs and unpacked once per
/// pair.
#[inline(always)]
pub(crate) unsafe fn gemm_impl<'a, S: Sums>(
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
            let [o0, o1] = tile_q4q8::<2, S>(w, r / 4, [x(c), x(c + 1)], bias);
            put(c, &o0);
            put(c + 1, &o1);
            c += 2;
        }
        if c < n_in {
            let [o] = tile_q4q8::<1, S>(w, r / 4, [x(c)], bias);
            put(c, &o);
        }
        r += 4;
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
    unsafe fn mul(a: Self, b: Self) -> Self;
    /// `a + b`, rounded once.
    unsafe fn add(a: Self, b: Self) -> Self;
    /// `LANES` signed bytes at `p`, each converted to f32 (exactly).
    unsafe fn from_i8(p: *const i8) -> Self;
    /// The first `n` lanes (`n <= LANES`) to `p`, nothing past them (a masked store).
    unsafe fn store_first(self, p: *mut f32, n: usize);
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
    #[inline(always)]
    unsafe fn mul(a: Self, b: Self) -> Self {
        _mm256_mul_ps(a, b)
    }
    #[inline(always)]
    unsafe fn add(a: Self, b: Self) -> Self {
        _mm256_add_ps(a, b)
    }
    #[inline(always)]
    unsafe fn from_i8(p: *const i8) -> Self {
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i)))
    }
    #[inline(always)]
    unsafe fn store_first(self, p: *mut f32, n: usize) {
        let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        _mm256_maskstore_ps(p, mask, self)
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
        (i, j, jb): (usize, usize, usize),
    ) {
        let mut acc = [[F::zero(); V]; R];
        for p in 0..k {
            let bv: [F; V] = std::array::from_fn(|v| F::load(bp.add(p * rsb + jb + F::LANES * v)));
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
        (j, jb): (usize, usize),
    ) {
        let mut i = 0;
        // Six rows of two vectors where there are 32 registers (512-bit lanes): twelve FMA chains
        // in flight rather than eight, more than the two units' latency needs.
        if F::LANES >= 16 && V == 2 {
            while i + 6 <= m {
                tile::<F, 6, V>(a, b, c, k, (i, j, jb));
                i += 6;
            }
        }
        while i + 4 <= m {
            tile::<F, 4, V>(a, b, c, k, (i, j, jb));
            i += 4;
        }
        match m - i {
            3 => tile::<F, 3, V>(a, b, c, k, (i, j, jb)),
            2 => tile::<F, 2, V>(a, b, c, k, (i, j, jb)),
            1 => tile::<F, 1, V>(a, b, c, k, (i, j, jb)),
            _ => {}
        }
    }
    let (av, bv, cv) = ((ap, rsa, csa), (bp, rsb), (cp, rsc));
    let mut j = 0;
    // With several row blocks, each panel of b is first copied to consecutive rows of 2 lanes:
    // b's rows lie `rsb` floats apart, and at power-of-two strides (256, 1024 columns) a panel's
    // rows fall into a few L1 sets and evict each other (49 x 256 x 256: 26 -> 60+ GMAC/s on
    // AVX-512). The copy changes no arithmetic.
    // (Only where a panel of two vectors exists; the thread's buffer, taken for the call and
    // given back: a zeroed allocation per call cost an attention head's small products 5% of a
    // transformer's time at batch 64, and every value is written before it is read.)
    let with_panel = m >= 8 && n >= 2 * F::LANES;
    let mut panel = if with_panel { SGEMM_PANEL.take() } else { Vec::new() };
    if with_panel {
        panel.resize(k * 2 * F::LANES, 0.0);
        panel.truncate(k * 2 * F::LANES);
    }
    if m <= 2 {
        // One or two rows (a batch-1 layer): a tile of two vectors would be two FMA chains
        // waiting on each other's latency; eight (four on 256-bit) keep the FMA units busy.
        if F::LANES >= 16 {
            while j + 8 * F::LANES <= n {
                rows::<F, 8>(av, bv, cv, (m, k), (j, j));
                j += 8 * F::LANES;
            }
        }
        while j + 4 * F::LANES <= n {
            rows::<F, 4>(av, bv, cv, (m, k), (j, j));
            j += 4 * F::LANES;
        }
    }
    while j + 2 * F::LANES <= n {
        if panel.is_empty() {
            rows::<F, 2>(av, bv, cv, (m, k), (j, j));
        } else {
            for (p, row) in panel.chunks_exact_mut(2 * F::LANES).enumerate() {
                std::ptr::copy_nonoverlapping(bp.add(p * rsb + j), row.as_mut_ptr(), 2 * F::LANES);
            }
            rows::<F, 2>(av, (panel.as_ptr(), 2 * F::LANES), cv, (m, k), (j, 0));
        }
        j += 2 * F::LANES;
    }
    if j + F::LANES <= n {
        rows::<F, 1>(av, bv, cv, (m, k), (j, j));
        j += F::LANES;
    }
    if with_panel {
        SGEMM_PANEL.set(panel);
    }
    j
}

thread_local! {
    /// [`sgemm_direct_panels`]'s copy of a panel of b.
    static SGEMM_PANEL: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// `exp_nonpos` on four lanes: the same operations (the 2^n bits by 64-bit integer lanes).
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn exp_nonpos4(x: __m256d) -> __m256d {
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
    let y = _mm256_mul_pd(p, pow2_of4(t));
    // Lanes at or below -708 are 0; NaN lanes (unordered: kept) carry NaN through p.
    _mm256_and_pd(y, _mm256_cmp_pd(x, _mm256_set1_pd(-708.0), _CMP_NLE_UQ))
}

/// [`crate::generic::sigmoid_f32`] on AVX2: the screened estimate on eight vectors of four f64
/// lanes at a time (eight independent chains: with four, the degree-10 polynomial's dependent
/// multiply-adds left the units idle, 2.28 -> 1.42 ns a value), a vector it cannot vouch for by
/// the definition's operations (`exp_nonpos` on four lanes); the last values four at a time.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn sigmoid_f32(x: &[f32], out: &mut [f32]) {
    let (one, sign) = (_mm256_set1_pd(1.0), _mm256_set1_pd(-0.0));
    let step = |v: __m256d, e: __m256d| {
        let num = _mm256_blendv_pd(e, one, _mm256_cmp_pd(v, _mm256_setzero_pd(), _CMP_GE_OQ));
        _mm256_cvtpd_ps(_mm256_div_pd(num, _mm256_add_pd(one, e)))
    };
    let n = x.len();
    let mut i = 0;
    while i + 32 <= n {
        let v: [__m256d; 8] = std::array::from_fn(|j| _mm256_cvtps_pd(_mm_loadu_ps(x.as_ptr().add(i + 4 * j))));
        // The screened form (`generic::sigmoid_screened`); a vector with a lane it cannot vouch
        // for is recomputed by the definition.
        let (y, sure) = sigmoid_screened4xk::<8>(v);
        for j in 0..8 {
            let y = if sure[j] { y[j] } else { step(v[j], exp_nonpos4(_mm256_or_pd(v[j], sign))) };
            _mm_storeu_ps(out.as_mut_ptr().add(i + 4 * j), y);
        }
        i += 32;
    }
    while i + 4 <= n {
        let v = _mm256_cvtps_pd(_mm_loadu_ps(x.as_ptr().add(i)));
        _mm_storeu_ps(out.as_mut_ptr().add(i), step(v, exp_nonpos4(_mm256_or_pd(v, sign))));
        i += 4;
    }
    for j in i..n {
        out[j] = crate::generic::sigmoid(x[j] as f64) as f32;
    }
}

/// `2^n` on four f64 lanes from `t = x log2 e + EXP_MAGIC` (n in t's low bits: the reductions of
/// the f64 exponentials), by the exponent field: n + 1023 shifted into place.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn pow2_of4(t: __m256d) -> __m256d {
    use crate::generic::EXP_MAGIC;
    let bits = _mm256_add_epi64(
        _mm256_sub_epi64(_mm256_castpd_si256(t), _mm256_set1_epi64x(EXP_MAGIC.to_bits() as i64)),
        _mm256_set1_epi64x(1023),
    );
    _mm256_castsi256_pd(_mm256_slli_epi64::<52>(bits))
}

/// The fused reduction of the screened exponentials (`generic::exp_taylor10`'s): `x = n ln 2 + r`
/// with `t = fma(x, log2 e, EXP_MAGIC)` (for [`pow2_of4`]) and `r` by two fused multiply-adds with
/// the split ln 2 (`n` times its high part exact for |n| < 2^11).
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn exp_split4(x: __m256d) -> (__m256d, __m256d) {
    use crate::generic::{EXP_LN2_HI, EXP_LN2_LO, EXP_MAGIC};
    let magic = _mm256_set1_pd(EXP_MAGIC);
    let t = _mm256_fmadd_pd(x, _mm256_set1_pd(std::f64::consts::LOG2_E), magic);
    let n = _mm256_sub_pd(t, magic);
    let r = _mm256_fnmadd_pd(n, _mm256_set1_pd(EXP_LN2_HI), x);
    (t, _mm256_fnmadd_pd(n, _mm256_set1_pd(EXP_LN2_LO), r))
}

/// `generic::exp_taylor10` on four f64 lanes, `K` vectors interleaved (its stages one after
/// another over the `K` vectors): the estimate of the AVX2 exponential and sigmoid (at `-|x|`).
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn exp_taylor4xk<const K: usize>(x: [__m256d; K]) -> [__m256d; K] {
    use crate::generic::SCREEN_TAYLOR;
    let (mut t, mut r) = (x, x);
    for i in 0..K {
        (t[i], r[i]) = exp_split4(x[i]);
    }
    let mut p = [_mm256_set1_pd(SCREEN_TAYLOR[10]); K];
    for &c in SCREEN_TAYLOR[..10].iter().rev() {
        let c = _mm256_set1_pd(c);
        for i in 0..K {
            p[i] = _mm256_fmadd_pd(p[i], r[i], c);
        }
    }
    std::array::from_fn(|i| _mm256_mul_pd(p[i], pow2_of4(t[i])))
}

/// `generic::sigmoid_screened` on four f64 lanes, `K` vectors interleaved ([`exp_taylor4xk`] at
/// `-|v|`): the results rounded to f32 and, per vector, whether every lane's rounding is certain
/// to be the definition's.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn sigmoid_screened4xk<const K: usize>(v: [__m256d; K]) -> ([__m128; K], [bool; K]) {
    let (one, sign) = (_mm256_set1_pd(1.0), _mm256_set1_pd(-0.0));
    // -|v|: the sign bit set.
    let na: [__m256d; K] = v.map(|v| _mm256_or_pd(v, sign));
    let e = exp_taylor4xk::<K>(na);
    let mut sure = [false; K];
    let y = std::array::from_fn(|i| {
        let num = _mm256_blendv_pd(e[i], one, _mm256_cmp_pd(v[i], _mm256_setzero_pd(), _CMP_GE_OQ));
        let y = _mm256_div_pd(num, _mm256_add_pd(one, e[i]));
        let far = far_from_halfway4(y);
        let inside =
            _mm256_castpd_si256(_mm256_cmp_pd(na[i], _mm256_set1_pd(-crate::generic::SCREEN_MAX_ABS), _CMP_GT_OQ));
        sure[i] = _mm256_movemask_pd(_mm256_castsi256_pd(_mm256_and_si256(far, inside))) == 0xf;
        _mm256_cvtpd_ps(y)
    });
    (y, sure)
}

/// The lanes of `y` whose low 29 bits (the bits f32 rounding drops) lie more than
/// `SCREEN_MARGIN` units from the halfway pattern `2^28` (all ones), as
/// `generic::far_from_halfway`.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn far_from_halfway4(y: __m256d) -> __m256i {
    use crate::generic::SCREEN_MARGIN;
    let low = _mm256_and_si256(_mm256_castpd_si256(y), _mm256_set1_epi64x((1 << 29) - 1));
    let off = _mm256_sub_epi64(low, _mm256_set1_epi64x(1 << 28));
    _mm256_or_si256(
        _mm256_cmpgt_epi64(off, _mm256_set1_epi64x(SCREEN_MARGIN)),
        _mm256_cmpgt_epi64(_mm256_set1_epi64x(-SCREEN_MARGIN), off),
    )
}

/// sqil's tanh (`generic::tanh`) of `v` on four f64 lanes, given `a = |v|` and `e =
/// exp_nonpos(-2a)`: both branches computed and the one the definition takes kept per lane, the
/// sign of `v` put back (the same operations per lane).
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn tanh4(v: __m256d, a: __m256d, e: __m256d) -> __m256d {
    use crate::generic::{TANH_SMALL, TANH_TAYLOR};
    let (one, sign) = (_mm256_set1_pd(1.0), _mm256_set1_pd(-0.0));
    let a2 = _mm256_mul_pd(a, a);
    let poly = _mm256_add_pd(_mm256_set1_pd(TANH_TAYLOR[1]), _mm256_mul_pd(a2, _mm256_set1_pd(TANH_TAYLOR[2])));
    let poly = _mm256_add_pd(_mm256_set1_pd(TANH_TAYLOR[0]), _mm256_mul_pd(a2, poly));
    let small = _mm256_add_pd(a, _mm256_mul_pd(_mm256_mul_pd(a, a2), poly));
    let big = _mm256_div_pd(_mm256_sub_pd(one, e), _mm256_add_pd(one, e));
    let t = _mm256_blendv_pd(big, small, _mm256_cmp_pd(a, _mm256_set1_pd(TANH_SMALL), _CMP_LT_OQ));
    // copysign(t, v): t's magnitude bits, v's sign bit.
    _mm256_or_pd(_mm256_andnot_pd(sign, t), _mm256_and_pd(sign, v))
}

/// [`crate::generic::tanh_f32`] on AVX2: four values per step in f64 ([`tanh4`]), the same
/// operations per lane as the definition.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn tanh_f32(x: &[f32], out: &mut [f32]) {
    let sign = _mm256_set1_pd(-0.0);
    let finish = |v: __m256d, a: __m256d, e: __m256d| _mm256_cvtpd_ps(tanh4(v, a, e));
    let n = x.len();
    let mut i = 0;
    while i + 16 <= n {
        let v: [__m256d; 4] = std::array::from_fn(|j| _mm256_cvtps_pd(_mm_loadu_ps(x.as_ptr().add(i + 4 * j))));
        let a: [__m256d; 4] = std::array::from_fn(|j| _mm256_andnot_pd(sign, v[j]));
        let e = exp_nonpos4xk::<4>(std::array::from_fn(|j| _mm256_mul_pd(a[j], _mm256_set1_pd(-2.0))));
        for j in 0..4 {
            _mm_storeu_ps(out.as_mut_ptr().add(i + 4 * j), finish(v[j], a[j], e[j]));
        }
        i += 16;
    }
    while i + 4 <= n {
        let v = _mm256_cvtps_pd(_mm_loadu_ps(x.as_ptr().add(i)));
        let a = _mm256_andnot_pd(sign, v);
        _mm_storeu_ps(out.as_mut_ptr().add(i), finish(v, a, exp_nonpos4(_mm256_mul_pd(a, _mm256_set1_pd(-2.0)))));
        i += 4;
    }
    for j in i..n {
        out[j] = crate::generic::tanh(x[j] as f64) as f32;
    }
}

/// Four-lane map of f32 values through an f64 function of `exp_nonpos(arg(v))`: `arg` gives the
/// exponent's argument, `finish(v, e)` the result (f64 lanes); four vectors per step.
#[inline(always)]
unsafe fn map_exp4(
    x: &[f32],
    out: &mut [f32],
    arg: impl Fn(__m256d) -> __m256d,
    finish: impl Fn(__m256d, __m256d) -> __m256d,
    scalar: impl Fn(f64) -> f64,
) {
    let n = x.len();
    let mut i = 0;
    while i + 16 <= n {
        let v: [__m256d; 4] = std::array::from_fn(|j| _mm256_cvtps_pd(_mm_loadu_ps(x.as_ptr().add(i + 4 * j))));
        let e = exp_nonpos4xk::<4>(std::array::from_fn(|j| arg(v[j])));
        for j in 0..4 {
            _mm_storeu_ps(out.as_mut_ptr().add(i + 4 * j), _mm256_cvtpd_ps(finish(v[j], e[j])));
        }
        i += 16;
    }
    while i + 4 <= n {
        let v = _mm256_cvtps_pd(_mm_loadu_ps(x.as_ptr().add(i)));
        _mm_storeu_ps(out.as_mut_ptr().add(i), _mm256_cvtpd_ps(finish(v, exp_nonpos4(arg(v)))));
        i += 4;
    }
    for j in i..n {
        out[j] = scalar(x[j] as f64) as f32;
    }
}

/// [`crate::generic::softplus_f32`] on AVX2 (the same operations per lane).
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn softplus_f32(x: &[f32], out: &mut [f32]) {
    use crate::generic::ATANH_SERIES;
    let sign = _mm256_set1_pd(-0.0);
    let two = _mm256_set1_pd(2.0);
    let finish = |v: __m256d, t: __m256d| {
        let s = _mm256_div_pd(t, _mm256_add_pd(two, t));
        let z = _mm256_mul_pd(s, s);
        let mut p = _mm256_set1_pd(ATANH_SERIES[17]);
        for &c in ATANH_SERIES[..17].iter().rev() {
            p = _mm256_add_pd(_mm256_mul_pd(p, z), _mm256_set1_pd(c));
        }
        let l = _mm256_mul_pd(_mm256_mul_pd(two, s), p);
        // max(x, 0) as `x > 0 ? x : 0` (NaN: 0, and the NaN comes through l).
        let m = _mm256_and_pd(v, _mm256_cmp_pd(v, _mm256_setzero_pd(), _CMP_GT_OQ));
        _mm256_add_pd(m, l)
    };
    map_exp4(x, out, |v| _mm256_or_pd(v, sign), finish, crate::generic::softplus)
}

/// [`crate::generic::elu_f32`] on AVX2 (the same operations per lane; lanes at or above 0 keep x).
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn elu_f32(x: &[f32], alpha: f32, out: &mut [f32]) {
    use crate::generic::{EXPM1_TAYLOR as C, TANH_SMALL};
    let (a, one) = (_mm256_set1_pd(alpha as f64), _mm256_set1_pd(1.0));
    let finish = |v: __m256d, e: __m256d| {
        let c = |i: usize| _mm256_set1_pd(C[i]);
        let p = _mm256_add_pd(c(2), _mm256_mul_pd(v, c(3)));
        let p = _mm256_add_pd(c(1), _mm256_mul_pd(v, p));
        let p = _mm256_add_pd(c(0), _mm256_mul_pd(v, p));
        let taylor = _mm256_add_pd(v, _mm256_mul_pd(_mm256_mul_pd(v, v), p));
        let small = _mm256_cmp_pd(v, _mm256_set1_pd(-TANH_SMALL), _CMP_GT_OQ);
        let m1 = _mm256_blendv_pd(_mm256_sub_pd(e, one), taylor, small);
        _mm256_blendv_pd(v, _mm256_mul_pd(a, m1), _mm256_cmp_pd(v, _mm256_setzero_pd(), _CMP_LT_OQ))
    };
    // The exponent of a lane at or above 0 is never used: its argument is clamped to 0.
    let arg = |v: __m256d| _mm256_min_pd(v, _mm256_setzero_pd());
    map_exp4(x, out, arg, finish, |v| crate::generic::elu(v, alpha as f64))
}

/// [`exp_nonpos4`] on `K` vectors at once, each step for all of them before the next (the
/// polynomial's chains of dependent multiplies and adds interleave). The same operations per lane.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn exp_nonpos4xk<const K: usize>(x: [__m256d; K]) -> [__m256d; K] {
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
        let y = _mm256_mul_pd(p[i], pow2_of4(t[i]));
        _mm256_and_pd(y, _mm256_cmp_pd(x[i], _mm256_set1_pd(-708.0), _CMP_NLE_UQ))
    })
}

/// Values of a block of rows [`softmax_rows_impl`] takes through each pass at once (their f64
/// exponentials, 16 KiB, stay in L1 between the passes).
const SOFTMAX_BLOCK: usize = 2048;

/// [`avx2_softmax_rows`]; with `WIDE` (AVX-512 F) the exponentials and quotients eight lanes at a
/// time. Blocks of rows go through four passes, each over the whole block so that independent
/// vectors keep the units busy (a row of 49 values had left the exponential's 28-step dependency
/// chain waiting): the differences `x - max` of each row, their exponentials, the rows' sums (four
/// rows at a time, element j into lane j mod 4 in order: the definition's four partial sums), and
/// the quotients ([`quotient4`]). The same operations per element as the definition: the same
/// bits.
#[inline(always)]
pub(crate) unsafe fn softmax_rows_impl<S: Sums>(x: &[f32], dim: usize, out: &mut [f32], log: bool) {
    let rows = x.len() / dim;
    let per = (SOFTMAX_BLOCK / dim).clamp(1, rows.max(1));
    // Taken out of the thread's slot, not borrowed in a closure: a closure would not inherit
    // the caller's target features, and the vector helpers would not inline.
    let (mut e, mut totals) = SOFTMAX_SCRATCH.take();
    // Grown, never shrunk; every value read below is written first.
    if e.len() < per * dim {
        e.resize(per * dim, 0.0);
    }
    // The rows' sums, then (for LogSoftmax) their maxima.
    if totals.len() < 2 * per {
        totals.resize(2 * per, 0.0);
    }
    softmax_blocks::<S>(x, dim, out, (per, log), &mut e, &mut totals);
    SOFTMAX_SCRATCH.set((e, totals));
}

thread_local! {
    /// [`softmax_rows_impl`]'s exponentials and row sums, kept between calls.
    static SOFTMAX_SCRATCH: std::cell::Cell<(Vec<f64>, Vec<f64>)> = const { std::cell::Cell::new((Vec::new(), Vec::new())) };
}

/// The passes of [`softmax_rows_impl`] over blocks of `per` rows, on its scratch buffers.
#[inline(always)]
unsafe fn softmax_blocks<S: Sums>(
    x: &[f32],
    dim: usize,
    out: &mut [f32],
    (per, log): (usize, bool),
    e: &mut [f64],
    totals: &mut [f64],
) {
    let rows = x.len() / dim;
    let (totals, maxima) = totals.split_at_mut(per);
    let d4 = dim / 4 * 4;
    for b0 in (0..rows).step_by(per) {
        let nb = per.min(rows - b0);
        let n = nb * dim;
        let xs = &x[b0 * dim..b0 * dim + n];
        for ((row, d), mx) in xs.chunks_exact(dim).zip(e.chunks_exact_mut(dim)).zip(maxima.iter_mut()) {
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
            *mx = m;
            let vm = _mm256_set1_pd(m);
            for j in (0..d4).step_by(4) {
                _mm256_storeu_pd(
                    d.as_mut_ptr().add(j),
                    _mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(row.as_ptr().add(j))), vm),
                );
            }
            for j in d4..dim {
                d[j] = row[j] as f64 - m;
            }
        }
        // The exponentials, in place: wider first where the instruction set has them, then four
        // vectors at a time (independent chains), one, and the last values.
        let ep = e.as_mut_ptr();
        let mut j = S::softmax_exp(&mut e[..n]);
        while j + 16 <= n {
            let v = exp_nonpos4xk::<4>(std::array::from_fn(|i| _mm256_loadu_pd(ep.add(j + 4 * i))));
            for (i, v) in v.iter().enumerate() {
                _mm256_storeu_pd(ep.add(j + 4 * i), *v);
            }
            j += 16;
        }
        while j + 4 <= n {
            _mm256_storeu_pd(ep.add(j), exp_nonpos4(_mm256_loadu_pd(ep.add(j))));
            j += 4;
        }
        for v in &mut e[j..n] {
            *v = crate::generic::exp_nonpos(*v);
        }
        let mut r = 0;
        while r + 4 <= nb {
            totals[r..r + 4].copy_from_slice(&row_totals::<4>(&e[r * dim..(r + 4) * dim], dim));
            r += 4;
        }
        for r in r..nb {
            totals[r] = row_totals::<1>(&e[r * dim..(r + 1) * dim], dim)[0];
        }
        let ys = &mut out[b0 * dim..b0 * dim + n];
        if log {
            // `(x - max) - ln(total)` per value, as the definition's f64 operations.
            for (((row, y), &total), &m) in
                xs.chunks_exact(dim).zip(ys.chunks_exact_mut(dim)).zip(totals.iter()).zip(maxima.iter())
            {
                let ls = total.ln();
                let (vm, vl) = (_mm256_set1_pd(m), _mm256_set1_pd(ls));
                for j in (0..d4).step_by(4) {
                    let v = _mm256_cvtps_pd(_mm_loadu_ps(row.as_ptr().add(j)));
                    _mm_storeu_ps(y.as_mut_ptr().add(j), _mm256_cvtpd_ps(_mm256_sub_pd(_mm256_sub_pd(v, vm), vl)));
                }
                for j in d4..dim {
                    y[j] = (row[j] as f64 - m - ls) as f32;
                }
            }
            continue;
        }
        for ((ev, y), &total) in e.chunks_exact(dim).zip(ys.chunks_exact_mut(dim)).zip(totals.iter()) {
            let inv = 1.0 / total;
            let mut j = S::softmax_quot(ev, inv, total, y);
            while j + 4 <= dim {
                quotient4(ev.as_ptr().add(j), inv, total, y.as_mut_ptr().add(j));
                j += 4;
            }
            for j in j..dim {
                y[j] = (ev[j] / total) as f32;
            }
        }
    }
}

/// The softmax sums of `R` consecutive rows of `dim` exponentials: per row, element j added into
/// partial sum j mod 4 in order (one vector lane each), then `(s0 + s1) + (s2 + s3)`; the rows'
/// chains interleaved.
#[inline(always)]
unsafe fn row_totals<const R: usize>(e: &[f64], dim: usize) -> [f64; R] {
    let d4 = dim / 4 * 4;
    let mut acc = [_mm256_setzero_pd(); R];
    for j in (0..d4).step_by(4) {
        for (r, a) in acc.iter_mut().enumerate() {
            *a = _mm256_add_pd(*a, _mm256_loadu_pd(e.as_ptr().add(r * dim + j)));
        }
    }
    std::array::from_fn(|r| {
        let mut s = [0f64; 4];
        _mm256_storeu_pd(s.as_mut_ptr(), acc[r]);
        for j in d4..dim {
            s[j % 4] += e[r * dim + j];
        }
        (s[0] + s[1]) + (s[2] + s[3])
    })
}

/// Below and above 1 by 2^-48: the interval [`quotient4`] rounds to f32 at both ends.
pub(crate) const QUOT_LO: f64 = 1.0 - 1.0 / (1u64 << 48) as f64;
pub(crate) const QUOT_HI: f64 = 1.0 + 1.0 / (1u64 << 48) as f64;

/// Four of softmax's `(e / total) as f32`, where `inv = 1 / total` (rounded): `q = e * inv` is
/// within 2^-52 relative of the exact quotient, and so of its f64 rounding `e / total` (2^-53);
/// f32 rounding is monotonic, so where `q (1 - 2^-48)` and `q (1 + 2^-48)` (each within an f64 unit
/// of the exact product, the interval still holding `e / total`) round to the same f32, that is
/// the f32 of `e / total`. Where a lane's ends differ (about once in 2^24: the quotient near a
/// halfway point of f32), or are NaN, the four are divided.
#[inline(always)]
pub(crate) unsafe fn quotient4(e: *const f64, inv: f64, total: f64, y: *mut f32) {
    let ev = _mm256_loadu_pd(e);
    let q = _mm256_mul_pd(ev, _mm256_set1_pd(inv));
    let lo = _mm256_cvtpd_ps(_mm256_mul_pd(q, _mm256_set1_pd(QUOT_LO)));
    let hi = _mm256_cvtpd_ps(_mm256_mul_pd(q, _mm256_set1_pd(QUOT_HI)));
    let v = if _mm_movemask_ps(_mm_cmpeq_ps(lo, hi)) == 0xf {
        lo
    } else {
        _mm256_cvtpd_ps(_mm256_div_pd(ev, _mm256_set1_pd(total)))
    };
    _mm_storeu_ps(y, v);
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

/// A row (`q`, `zero`, `scale` fields: one unbounded run) as a [`LaneInput`], its bytes stored
/// as they are or with the sign bit flipped.
macro_rules! row_lane_input {
    ($row:ident, $flipped:expr) => {
        impl LaneInput for $row<'_> {
            const FLIPPED: bool = $flipped;
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
    };
}

row_lane_input!(QRow, false);

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
pub(crate) unsafe fn channel_block<const NP: usize, X: LaneInput, S: Sums>(
    w: &PackedQ4,
    t: &ChannelTiles,
    cb: usize,
    xs: [X; NP],
) -> [[__m256; 4]; NP] {
    let groups = w.groups();
    let quads = w.group / 4;
    // The position in the runs (the same for every input): run `tap`, value `off` of it.
    let (mut tap, mut off) = (0usize, 0usize);
    let mut xp: [*const i8; NP] = std::array::from_fn(|c| xs[c].run_ptr(0));
    let mut accf = [[_mm256_setzero_ps(); 4]; NP];
    for g in 0..groups {
        let base = t.data.as_ptr().add((cb * groups + g) * quads * 128);
        let acc = S::lane_group::<NP, X>(base, quads, &xs, (&mut tap, &mut off, &mut xp));
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

/// Where [`stage_part`] puts a block's outputs: input `c`'s eight channels `8 j .. 8 j + 8` at
/// `y + at + c * cs + 8 j` (a batch of GEMVs' rows with all 32 channels of the block inside each,
/// or [`short_block`]'s staging tile).
pub(crate) struct PartOut {
    y: *mut f32,
    at: usize,
    cs: usize,
}

/// Channels `8 j0 .. 8 (j0 + J)` of block `cb` on `xs` (the short form, up to six inputs at a time;
/// with a wide `S` the whole block, `J` = 4, on 512-bit registers), scaled, biased and written
/// where `out` says.
#[inline(always)]
pub(crate) unsafe fn stage_part<X: LaneInput, const J: usize, S: Sums>(
    w: &PackedQ4,
    t: &ChannelTiles,
    (cb, j0): (usize, usize),
    xs: &[X],
    b: &[f32; 32],
    out: &mut PartOut,
) {
    let mut c = 0;
    while c < xs.len() {
        let np = (xs.len() - c).min(6);
        let mut acc = [[_mm256_setzero_ps(); J]; 6];
        macro_rules! run {
            ($($n:literal => [$($i:literal),*]),*) => {
                match np {
                    $($n => {
                        let a = S::lane_short::<$n, J, X>(w, t, (cb, j0), [$(xs[c + $i]),*]);
                        acc[..$n].copy_from_slice(&a);
                    })*
                    _ => unreachable!("1 to 6 inputs"),
                }
            };
        }
        run!(6 => [0, 1, 2, 3, 4, 5], 5 => [0, 1, 2, 3, 4], 4 => [0, 1, 2, 3], 3 => [0, 1, 2], 2 => [0, 1], 1 => [0]);
        for (i, acc) in acc[..np].iter().enumerate() {
            let scale = _mm256_set1_ps(xs[c + i].scale());
            for (j, a) in acc.iter().enumerate() {
                let bj = _mm256_loadu_ps(b.as_ptr().add(8 * (j0 + j)));
                let v = _mm256_add_ps(_mm256_mul_ps(*a, scale), bj);
                let PartOut { y, at, cs } = out;
                _mm256_storeu_ps(y.add(*at + (c + i) * *cs + 8 * (j0 + j)), v);
            }
        }
        c += np;
    }
}

/// [`stage_part`] over all 32 channels of block `cb`: at once on 512-bit registers with a wide `S`,
/// else in two halves of 16.
#[inline(always)]
unsafe fn stage_block<X: LaneInput, S: Sums>(
    w: &PackedQ4,
    t: &ChannelTiles,
    cb: usize,
    xs: &[X],
    b: &[f32; 32],
    out: &mut PartOut,
) {
    if S::WIDE {
        stage_part::<X, 4, S>(w, t, (cb, 0), xs, b, out);
    } else {
        for h in 0..2 {
            stage_part::<X, 2, S>(w, t, (cb, 2 * h), xs, b, out);
        }
    }
}

/// Inputs staged per block by the short form before each channel's outputs are written.
pub(crate) const SHORT_TILE: usize = 16;

/// The short form's block of 32 channels on every input: half the block (16 channels, two
/// registers) at a time against up to six inputs (twelve i16 accumulators, two weight registers
/// and a broadcast: no spills; with VNNI the whole block on 512-bit registers), the outputs
/// staged per sixteen inputs so each channel's are written together (contiguous when the inputs
/// are adjacent in `y`: a convolution's channel-major output).
#[inline(always)]
pub(crate) unsafe fn short_block<X: LaneInput, S: Sums>(
    w: &PackedQ4,
    t: &ChannelTiles,
    xs: &[X],
    b: &[f32; 32],
    y: &mut [f32],
    (cs, rs): (usize, usize),
    (cb, rows, r0): (usize, usize, usize),
) {
    const TILE: usize = SHORT_TILE;
    if rs == 1 && rows == 32 {
        // A batch of GEMVs' rows with the whole block inside each: every vector of eight
        // channels is eight consecutive outputs of one input, stored where it goes (staged, each
        // value was a scalar store into the tile and a copy out of it).
        let at = 32 * cb - r0;
        assert!(xs.is_empty() || at + (xs.len() - 1) * cs + 32 <= y.len(), "short_block: output rows");
        stage_block::<X, S>(w, t, cb, xs, b, &mut PartOut { y: y.as_mut_ptr(), at, cs });
        return;
    }
    // Staged input-major (each input's 32 channels a vector store at a time), then written.
    let mut tile = [[0f32; 32]; TILE];
    for c0 in (0..xs.len()).step_by(TILE) {
        let np_all = (xs.len() - c0).min(TILE);
        let staged = &mut PartOut { y: tile.as_mut_ptr().cast(), at: 0, cs: 32 };
        stage_block::<X, S>(w, t, cb, &xs[c0..c0 + np_all], b, staged);
        if rs == 1 {
            // One row of outputs per input (a batch of GEMVs, the block's last channels).
            for (i, row) in tile[..np_all].iter().enumerate() {
                let at = 32 * cb - r0 + (c0 + i) * cs;
                y[at..at + rows].copy_from_slice(&row[..rows]);
            }
            continue;
        }
        // Channel-major (a convolution's output): where the inputs are adjacent in `y`, eight
        // inputs by eight channels through a register transpose, each channel's eight outputs
        // one store (value by value, the stores had cost as much as the products on short
        // rows); the rest value by value.
        let mut i0 = 0;
        while cs == 1 && i0 + 8 <= np_all {
            for j in 0..rows.div_ceil(8) {
                let v = crate::generic::transpose8(std::array::from_fn(|i| {
                    _mm256_loadu_ps(tile[i0 + i].as_ptr().add(8 * j))
                }));
                for (l, v) in v.iter().enumerate().take(rows - 8 * j) {
                    let at = (32 * cb + 8 * j + l - r0) * rs + c0 + i0;
                    _mm256_storeu_ps(y[at..at + 8].as_mut_ptr(), *v);
                }
            }
            i0 += 8;
        }
        for (i, row) in tile[..np_all].iter().enumerate().skip(i0) {
            for (l, &v) in row[..rows].iter().enumerate() {
                y[(32 * cb + l - r0) * rs + (c0 + i) * cs] = v;
            }
        }
    }
}

/// A row of int8 values stored with the sign bit flipped (`x + 128` as unsigned bytes): a
/// [`QRow`]'s values made ready for `vpdpbusd`'s unsigned operand once per layer, instead of by an
/// XOR per broadcast in every block of 32 channels.
#[derive(Clone, Copy)]
pub(crate) struct FlippedRow<'a> {
    pub(crate) q: &'a [i8],
    pub(crate) zero: i32,
    pub(crate) scale: f32,
}

row_lane_input!(FlippedRow, true);

/// Block `cb`'s bias (its `rows` channels; zero past them, and everywhere without a bias) into `b`:
/// what the lane kernels add per block of 32 channels.
#[inline(always)]
pub(crate) fn block_bias(bias: Option<&[f32]>, (cb, rows): (usize, usize), b: &mut [f32; 32]) {
    b.fill(0.0);
    if let Some(bias) = bias {
        b[..rows].copy_from_slice(&bias[32 * cb..32 * cb + rows]);
    }
}

/// Fewest output rows for which the AVX2 lane kernel flips its inputs' sign bits once per call
/// rather than per broadcast (see [`channels_impl`]).
pub(crate) const FLIP_MIN_ROWS_AVX2: usize = 128;

thread_local! {
    /// [`channels_impl`]'s flipped copy of its inputs.
    static FLIP_SCRATCH: std::cell::Cell<Vec<i8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// W4A8 of rows `rows_in` of `w` (start a multiple of 32) on a batch of inputs with the channels
/// in vector lanes (see [`channel_block`]); output `(c, r)` goes to `y[c * cs + (r -
/// rows_in.start) * rs]`.
#[inline(always)]
pub(crate) unsafe fn channels_impl<X: LaneInput, S: Sums>(
    w: &PackedQ4,
    xs: &[X],
    bias: Option<&[f32]>,
    y: &mut [f32],
    (cs, rs): (usize, usize),
    rows_in: std::ops::Range<usize>,
) {
    debug_assert!(rows_in.start.is_multiple_of(32) && rows_in.end <= w.n);
    // Several inputs over several blocks: flip their bytes once (the values every block reads:
    // `k_pad` per row), the same bytes the per-broadcast XOR makes. On AVX2 only from
    // [`FLIP_MIN_ROWS_AVX2`] rows: the copy of a convolution's im2col rows for two blocks had
    // cost more than the XORs it saved.
    let flip_rows = if S::WIDE { 33 } else { FLIP_MIN_ROWS_AVX2 };
    if !X::FLIPPED && xs.len() >= 4 && rows_in.len() >= flip_rows && xs.iter().all(|x| x.run() == usize::MAX) {
        let len = w.k_pad;
        // A buffer kept per thread: no allocation (nor fresh pages) per call.
        let mut flipped = FLIP_SCRATCH.take();
        flipped.clear();
        flipped.resize(xs.len() * len, 0);
        for (x, dst) in xs.iter().zip(flipped.chunks_exact_mut(len)) {
            // SAFETY: the kernel reads `k_pad` values of each row from `run_ptr(0)`.
            let src = std::slice::from_raw_parts(x.run_ptr(0), len);
            for (d, &v) in dst.iter_mut().zip(src) {
                *d = v ^ i8::MIN;
            }
        }
        let rows: Vec<FlippedRow> = xs
            .iter()
            .zip(flipped.chunks_exact(len))
            .map(|(x, q)| FlippedRow { q, zero: x.zero(), scale: x.scale() })
            .collect();
        channels_impl::<FlippedRow, S>(w, &rows, bias, y, (cs, rs), rows_in);
        drop(rows);
        FLIP_SCRATCH.set(flipped);
        return;
    }
    let t = w.channel_tiles();
    let r0 = rows_in.start;
    // Groups of eight quads inside one run take the short form (a wide `S`: its 512-bit variant);
    // on AVX2 groups of any multiple of eight quads from four inputs (one input ran faster on
    // the long form: the whole block per pass over it).
    let short = (w.group == 32 || (!S::WIDE && w.group.is_multiple_of(32) && xs.len() >= 4))
        && xs.first().is_some_and(|x| x.run() == usize::MAX || x.run().is_multiple_of(w.group));
    let mut b = [0f32; 32];
    for cb in r0 / 32..rows_in.end.div_ceil(32) {
        let rows = (rows_in.end - 32 * cb).min(32);
        block_bias(bias, (cb, rows), &mut b);
        if short {
            short_block::<X, S>(w, t, xs, &b, y, (cs, rs), (cb, rows, r0));
            continue;
        }
        let mut c = 0;
        while c < xs.len() {
            // Four inputs at a time with 512-bit sums (eight int32 accumulators: each weight
            // vector loaded feeds four inputs; the inputs are independent lanes, so the bits do
            // not depend on how many go together; eight spill and ran 20% slower), else two; the
            // last alone.
            let (acc, np): ([[__m256; 4]; 4], usize) = if S::WIDE && c + 4 <= xs.len() {
                let a = channel_block::<4, X, S>(w, t, cb, [xs[c], xs[c + 1], xs[c + 2], xs[c + 3]]);
                (std::array::from_fn(|i| if i < 4 { a[i] } else { [_mm256_setzero_ps(); 4] }), 4)
            } else if c + 2 <= xs.len() {
                let a = channel_block::<2, X, S>(w, t, cb, [xs[c], xs[c + 1]]);
                (std::array::from_fn(|i| if i < 2 { a[i] } else { [_mm256_setzero_ps(); 4] }), 2)
            } else {
                let [a0] = channel_block::<1, X, S>(w, t, cb, [xs[c]]);
                (std::array::from_fn(|i| if i < 1 { a0 } else { [_mm256_setzero_ps(); 4] }), 1)
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

/// `avx2_sgemm_direct`'s body (8-lane panels, then the last columns one output at a time), also
/// the AVX-512 form's remainder: each output the same FMA chain over k from zero.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn sgemm_direct8(
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
    if j < n {
        // The last (fewer than eight) columns: the narrow form of the same chains (vectorized
        // over a's rows; one chain at a time was latency-bound: attention scores over 50 tokens
        // spent as long on their last 2 columns as on the first 48).
        let b_rest = b.get(j..).unwrap_or(&[]);
        crate::generic::sgemm_chain(m, k, n - j, a, (rsa, csa), b_rest, (rsb, 1), &mut c[j..], (rsc, 1));
    }
}

/// Whether a FakeQuant's zero point and level bounds are integers with `lo <= hi`, small enough
/// (below 2^20 in magnitude) that `lo - zero - 1/4` and `hi - zero + 1/4` are exact in f32: what
/// the level tests (`store_levels16`, `store_levels8`) assume.
pub(crate) fn integral_levels(zero: f32, lo: f32, hi: f32) -> bool {
    let int = |x: f32| x.abs() <= 1_048_576.0 && x.fract() == 0.0;
    int(zero) && int(lo) && int(hi) && lo <= hi
}

/// `op` then the FakeQuant `(scale, zero, lo, hi)` by their definitions, value by value: the
/// level kernels' path for a vector whose estimate they cannot vouch for.
#[inline(always)]
pub(crate) fn definition_levels(v: &mut [f32], op: crate::generic::Post, (scale, zero, lo, hi): (f32, f32, f32, f32)) {
    let post = [op, crate::generic::Post::FakeQuant { scale, zero, lo, hi }];
    for e in v {
        *e = crate::generic::post_one(*e, &post);
    }
}

/// The scale's reciprocal where the level kernels take a FakeQuant `(scale, zero, lo, hi)`: a
/// positive scale with a normal reciprocal and integer levels ([`integral_levels`]).
pub(crate) fn level_reciprocal((scale, zero, lo, hi): (f32, f32, f32, f32)) -> Option<f32> {
    let rcp = 1.0 / scale;
    (scale > 0.0 && rcp.is_normal() && integral_levels(zero, lo, hi)).then_some(rcp)
}

/// The steps of the level kernels over `len` values: none unless they take the FakeQuant
/// ([`level_reciprocal`]); else `step(i, eight, rcp)` at each `wide` values (eight vectors: four
/// left a third of the SiLU kernel's time to its chains' latency on a Zen 5 core), then once at
/// `wide / 2` if they are left (four vectors). Returns how many values the steps did (a multiple
/// of `wide / 2`).
#[inline(always)]
pub(crate) fn level_steps(
    len: usize,
    wide: usize,
    (scale, zero, lo, hi): (f32, f32, f32, f32),
    mut step: impl FnMut(usize, bool, f32),
) -> usize {
    let Some(rcp) = level_reciprocal((scale, zero, lo, hi)) else { return 0 };
    let mut i = 0;
    while i + wide <= len {
        step(i, true, rcp);
        i += wide;
    }
    if i + wide / 2 <= len {
        step(i, false, rcp);
        i += wide / 2;
    }
    i
}

/// The constants of the SiLU level kernels' f32 `e^-x` (`avx512::silu_est`, `avx2::silu_est8`):
/// `k = -round(x log2 e)` by the `MAGIC` addition, `r = x + k ln 2` with `ln 2` split so that
/// `k * LN2_HI` is exact for `|k| < 2^12` (its low 12 bits are zero) and `LN2_LO` the rest to f32's
/// precision (`ln 2` to about `2^-44` in all), then `e^-r` by its degree-6 Taylor polynomial
/// (alternating signs, highest power first).
pub(crate) mod exp_neg_f32 {
    pub const LOG2E: f32 = std::f32::consts::LOG2_E;
    pub const LN2_HI: f32 = f32::from_bits(0x3f31_7000);
    pub const LN2_LO: f32 = (std::f64::consts::LN_2 - LN2_HI as f64) as f32;
    pub const MAGIC: f32 = 12_582_912.0;
    pub const TAYLOR: [f32; 7] = [1.0 / 720.0, -1.0 / 120.0, 1.0 / 24.0, -1.0 / 6.0, 0.5, -1.0, 1.0];
}

/// The arguments of the depthwise levels kernels (`avx2::avx2_depthwise_levels`,
/// `avx512::avx512_depthwise_levels`) past the epilogue form: the outputs by position (`acc`)
/// with `(cp, channels, positions)`, the bias, the epilogue ops, the next layer's quantizer
/// `(scale, zero, lo, hi)` and the levels' bytes (`stage`).
pub(crate) type LevelsArgs<'a> = (
    &'a [f32],
    (usize, usize, usize),
    Option<&'a [f32]>,
    &'a [crate::generic::Post],
    (f32, i32, i32, i32),
    &'a mut [u32],
);

/// Four channels' 32 bytes (`p0..p3`, positions in order) as four vectors of 32-bit words, one
/// per position with channel `c` in byte `c`, positions 0-7, 8-15, 16-23 and 24-31: bytes
/// interleaved by pairs of channels, then by pairs of pairs, then the 128-bit halves put in
/// order. The pointwise kernels' quad layout (`avx2::interleave_quads`,
/// `avx512::avx512_interleave_quads`).
///
/// # Safety
/// AVX2.
#[inline]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn quads32(p0: __m256i, p1: __m256i, p2: __m256i, p3: __m256i) -> [__m256i; 4] {
    let (a, b) = (_mm256_unpacklo_epi8(p0, p1), _mm256_unpackhi_epi8(p0, p1));
    let (c, d) = (_mm256_unpacklo_epi8(p2, p3), _mm256_unpackhi_epi8(p2, p3));
    let (ac0, ac1) = (_mm256_unpacklo_epi16(a, c), _mm256_unpackhi_epi16(a, c));
    let (bd0, bd1) = (_mm256_unpacklo_epi16(b, d), _mm256_unpackhi_epi16(b, d));
    // Within 128-bit lanes: ac0 = positions 0-3 | 16-19, ac1 = 4-7 | 20-23, bd0 = 8-11 | 24-27,
    // bd1 = 12-15 | 28-31.
    [
        _mm256_permute2x128_si256::<0x20>(ac0, ac1),
        _mm256_permute2x128_si256::<0x20>(bd0, bd1),
        _mm256_permute2x128_si256::<0x31>(ac0, ac1),
        _mm256_permute2x128_si256::<0x31>(bd0, bd1),
    ]
}

/// The folded epilogue of a clamp then a FakeQuant (`PostForm` `f`), as the vector epilogues
/// (`avx2::PostVec8`, `avx512::PostVec16`) take it: whether the pair folds into one range of
/// levels, and that range less the zero point widened by 1/4, `(ka - 1/4, kb + 1/4)`. The clamp
/// then the FakeQuant is the FakeQuant's level clamped to the levels of the clamp's bounds (the
/// level is a non-decreasing function of the value), so both fold into one range of levels: for
/// a positive scale whose multiples up to the levels stay finite, integer levels, and an ordered
/// clamp. Without a clamp the range is the FakeQuant's own levels.
pub(crate) fn folded_levels(f: crate::generic::PostForm) -> (bool, f32, f32) {
    let (lo, hi) = f.clamp.unwrap_or((f32::NEG_INFINITY, f32::INFINITY));
    let (s, z, qlo, qhi) = f.fq.unwrap_or((1.0, 0.0, 0.0, 0.0));
    let fold = f.fq.is_some() && s > 0.0 && s <= f32::MAX / 1_048_576.0 && integral_levels(z, qlo, qhi) && lo <= hi;
    let level = |v: f32| crate::generic::quantize_level(v, s, z, qlo, qhi) - z;
    let (ka, kb) = if f.clamp.is_some() { (level(lo), level(hi)) } else { (qlo - z, qhi - z) };
    (fold, ka - 0.25, kb + 0.25)
}

#[cfg(test)]
mod tests {
    use super::Sums;

    /// The quantizers' quotient screens (`round_quotient8`, `round_quotient16`): the integers of
    /// `x * fl(1/s)` where the screen vouches for them, else the division's, equal to
    /// `round(x / s)` on the values where the product alone rounds the other way.
    #[test]
    fn quantizer_quotients_near_halfway_points_are_divided() {
        use std::arch::x86_64::*;
        if crate::isa() == crate::Isa::Generic {
            eprintln!("skipped: no AVX2 on this CPU");
            return;
        }
        // Values at and beside the f32 nearest to every half-way point (k + 1/2) s, multiples of
        // s, and the special values, for scales whose reciprocal is inexact, subnormal (the
        // largest scales: screen_reciprocal sends them to the division) or infinite (zero).
        let mut cases: Vec<(f32, f32)> = Vec::new();
        for s in [
            1.0f32 / 255.0,
            6.0 / 255.0,
            0.0123,
            0.1,
            3.0,
            7.0e-4,
            1.0e-30,
            3.0e30,
            2.0e38,
            1.1e38,
            3.0e38,
            3.3e38,
            -0.37,
            0.0,
        ] {
            let mut xs = vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0, 1.0e-40, -1.0e-45, 1.0e38];
            for k in -300i32..300 {
                let half = ((k as f64 + 0.5) * s as f64) as f32;
                for j in -8i32..=8 {
                    xs.push(f32::from_bits(half.to_bits().wrapping_add_signed(j)));
                }
                xs.push(k as f32 * s);
            }
            cases.extend(xs.into_iter().map(|x| (x, s)));
        }
        let want: Vec<u32> = cases.iter().map(|&(x, s)| (x / s).round_ties_even().to_bits()).collect();
        // The product alone rounds some of them the other way: the screen is what keeps the bits.
        let products = cases.iter().zip(&want).filter(|((x, s), w)| (x * (1.0 / s)).round_ties_even().to_bits() != **w);
        assert!(products.count() > 100, "the cases test the screen");
        let n = cases.len() / 16 * 16;
        // Each width's form on the cases, `lanes` at a time: (x, s, fl(1/s)) in, the integers out.
        type Lanes<'a> = &'a dyn Fn(&[f32], &[f32], &[f32], &mut [f32]);
        let screened = |lanes: usize, f: Lanes| -> Vec<u32> {
            let mut got = vec![0f32; n];
            for (c, g) in cases[..n].chunks_exact(lanes).zip(got.chunks_exact_mut(lanes)) {
                let (x, s): (Vec<f32>, Vec<f32>) = c.iter().copied().unzip();
                let r: Vec<f32> = s.iter().map(|&s| super::screen_reciprocal(s)).collect();
                f(&x, &s, &r, g);
            }
            got.iter().map(|v| v.to_bits()).collect()
        };
        // SAFETY: isa() checked AVX2; eight lanes each.
        let eight = |x: &[f32], s: &[f32], r: &[f32], g: &mut [f32]| unsafe {
            let [x, s, r] = [x, s, r].map(|v| _mm256_loadu_ps(v.as_ptr()));
            _mm256_storeu_ps(g.as_mut_ptr(), crate::x86_64::avx2::round_quotient8(x, s, r));
        };
        assert_eq!(screened(8, &eight), want[..n]);
        if crate::isa() == crate::Isa::Avx512Vnni {
            // SAFETY: isa() checked AVX-512 F; sixteen lanes each.
            let sixteen = |x: &[f32], s: &[f32], r: &[f32], g: &mut [f32]| unsafe {
                let [x, s, r] = [x, s, r].map(|v| _mm512_loadu_ps(v.as_ptr()));
                _mm512_storeu_ps(g.as_mut_ptr(), crate::x86_64::avx512::round_quotient16(x, s, r));
            };
            assert_eq!(screened(16, &sixteen), want[..n]);
        }
    }

    /// The quotient screen: `e = t m` over `total = t` (a small odd integer) with `m` an f32
    /// halfway point is exactly `m`, which f32 rounds to even, while `e * (1/t)` can fall an f64
    /// unit beside `m` and round the other way: there only the division gives the definition's
    /// bits. Each width's screen must notice (such values among plain ones in every vector).
    #[test]
    fn softmax_quotients_near_f32_halfway_points_are_divided() {
        if crate::isa() == crate::Isa::Generic {
            eprintln!("skipped: no AVX2 on this CPU");
            return;
        }
        // The first total with values whose unscreened product rounds the wrong way.
        let (total, mut e) = (3..200)
            .step_by(2)
            .map(|t| {
                let t = t as f64;
                let e: Vec<f64> = (0..4000u32)
                    .map(|k| {
                        let v = f32::from_bits(0.3f32.to_bits() + k);
                        t * (v as f64 + (f32::from_bits(v.to_bits() + 1) as f64 - v as f64) / 2.0)
                    })
                    .filter(|&e| ((e * (1.0 / t)) as f32).to_bits() != ((e / t) as f32).to_bits())
                    .take(8)
                    .collect();
                (t, e)
            })
            .find(|(_, e)| e.len() == 8)
            .expect("a total whose reciprocal rounds products the wrong way");
        let inv = 1.0 / total;
        // Plain values between them.
        e = e.iter().enumerate().flat_map(|(k, &v)| [v, 0.1 * (k + 1) as f64, 0.7, v]).collect();
        let want: Vec<f32> = e.iter().map(|&v| (v / total) as f32).collect();
        let mut got = vec![0f32; e.len()];
        for j in (0..e.len()).step_by(4) {
            // SAFETY: isa() checked AVX2; four values at j.
            unsafe { super::quotient4(e.as_ptr().add(j), inv, total, got.as_mut_ptr().add(j)) };
        }
        assert_eq!(
            got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        if crate::isa() == crate::Isa::Avx512Vnni {
            let mut got = vec![0f32; e.len()];
            // SAFETY: isa() checked AVX-512 F; `got` holds `e.len()` values.
            let done = unsafe { crate::x86_64::avx512::Vnni::softmax_quot(&e, inv, total, &mut got) };
            assert_eq!(done, e.len());
            assert_eq!(
                got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
    }
}

/// The shape of [`conv_direct`]'s convolution: input channels, the phase-split planes' padded
/// rows `hp` and values per phase row `jl`; output channels; kernel, strides, dilations; output.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DirectConv {
    pub c: usize,
    pub hp: usize,
    pub jl: usize,
    pub m: usize,
    pub kernel: (usize, usize),
    pub strides: (usize, usize),
    pub dilations: (usize, usize),
    pub out: (usize, usize),
}

/// One image's convolution (one group) computed directly: per output row, `R` output channels
/// by up to `VMAX` vectors of output columns at a time, each output the FMA chain over `(c, ky,
/// kx)` in im2col's order from +0 (`sgemm_chain`'s chain on im2col's rows: the same bits). `xp`
/// holds the input planes zero-padded and split by column phase: value `j` of phase `f` of padded
/// row `y` of channel `c` at `((c * hp + y) * sw + f) * jl + j` is input column `j * sw + f` less
/// the left padding, so tap `kx` of output columns `ox..ox + lanes` is one contiguous load at
/// phase `(kx * dw) % sw`, offset `ox + (kx * dw) / sw`. `w` is `[m, c, kh, kw]`; `out` `[m, oh,
/// ow]` gets the chains (no bias).
///
/// # Safety
/// `F`'s instructions; `xp` holds `c * hp * sw * jl` values with `jl >= ow` rounded up to the
/// lanes plus `(kw - 1) * dw / sw + 1`, and `hp >= (oh - 1) * sh + (kh - 1) * dh + 1`.
#[inline(always)]
pub(crate) unsafe fn conv_direct<F: F32Lanes, const R: usize, const VMAX: usize>(
    xp: &[f32],
    w: &[f32],
    d: DirectConv,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    let (oh, ow) = d.out;
    let (kh, kw) = d.kernel;
    debug_assert!(out.len() >= d.m * oh * ow && w.len() >= d.m * d.c * kh * kw);
    debug_assert!(bias.is_none_or(|b| b.len() >= d.m));
    let step = VMAX * F::LANES;
    let ((sh, sw), (dh, dw)) = (d.strides, d.dilations);
    // Where tap (c, ky, kx), in the chain's order, reads output row 0's first column.
    let mut taps = Vec::with_capacity(d.c * kh * kw);
    for c in 0..d.c {
        for ky in 0..kh {
            for kx in 0..kw {
                taps.push(((c * d.hp + ky * dh) * sw + (kx * dw) % sw) * d.jl + (kx * dw) / sw);
            }
        }
    }
    // The weights by block of R channels, tap-major within it (`[block][tap][R]`, channels past
    // `m` repeating the last one): a tile's broadcasts then read one pointer at fixed offsets
    // (R pointers, one per channel, did not fit the registers beside 24 accumulators and were
    // reloaded from the stack at every tap).
    let nt = taps.len();
    let blocks = d.m.div_ceil(R);
    let mut wt = vec![0f32; blocks * nt * R];
    for (b, block) in wt.chunks_exact_mut(nt * R).enumerate() {
        for (t, at) in block.chunks_exact_mut(R).enumerate() {
            for (j, v) in at.iter_mut().enumerate() {
                *v = w[(b * R + j).min(d.m - 1) * nt + t];
            }
        }
    }
    for oy in 0..oh {
        let row = oy * sh * sw * d.jl;
        for r0 in (0..d.m).step_by(R) {
            let wb = &wt[r0 / R * nt * R..(r0 / R + 1) * nt * R];
            let mut ox = 0;
            while ox < ow {
                let at = (oy, r0, ox, row);
                match (ow - ox).div_ceil(F::LANES).min(VMAX) {
                    1 => conv_direct_tile::<F, R, 1>(xp, wb, &taps, d, at, bias, out),
                    2 if VMAX >= 2 => conv_direct_tile::<F, R, 2>(xp, wb, &taps, d, at, bias, out),
                    _ => conv_direct_tile::<F, R, VMAX>(xp, wb, &taps, d, at, bias, out),
                }
                ox += step;
            }
        }
    }
}

/// [`conv_direct`]'s tile: output row `oy` (its planes' offset `row`), channels `r0..r0 + R` (past
/// `m`: the last one again, not stored; their weights `wb`, `[tap][R]`), columns `ox..ox + V
/// lanes` (stored up to `ow`); `taps` the planes' offset of each tap in the chain's order; each
/// chain's `+ bias[channel]` (one addition) as it is stored.
#[inline(always)]
unsafe fn conv_direct_tile<F: F32Lanes, const R: usize, const V: usize>(
    xp: &[f32],
    w: &[f32],
    taps: &[usize],
    d: DirectConv,
    (oy, r0, ox, row): (usize, usize, usize, usize),
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    let (oh, ow) = d.out;
    debug_assert!(w.len() >= taps.len() * R);
    let (x0, wp) = (xp.as_ptr().add(row + ox), w.as_ptr());
    let mut acc = [[F::zero(); V]; R];
    for (t, &off) in taps.iter().enumerate() {
        let xrow = x0.add(off);
        let xv: [F; V] = std::array::from_fn(|v| F::load(xrow.add(v * F::LANES)));
        for (j, acc) in acc.iter_mut().enumerate() {
            let wb = F::splat(*wp.add(t * R + j));
            for v in 0..V {
                acc[v] = F::fmadd(xv[v], wb, acc[v]);
            }
        }
    }
    let ol = oh * ow;
    for (j, acc) in acc.iter().enumerate() {
        if r0 + j >= d.m {
            break;
        }
        let b = bias.map(|b| F::splat(b[r0 + j]));
        for (v, a) in acc.iter().enumerate() {
            let at = ox + v * F::LANES;
            if at >= ow {
                break;
            }
            let a = &match b {
                Some(b) => F::add(*a, b),
                None => *a,
            };
            let dst = out.as_mut_ptr().add((r0 + j) * ol + oy * ow + at);
            if at + F::LANES <= ow {
                a.store(dst);
            } else {
                a.store_first(dst, ow - at);
            }
        }
    }
}

/// A depthwise convolution's taps on `F::LANES` channels per vector (`generic::depthwise_lanes_avx2`'s
/// buffers: `bp` the padded image `[row, column, cp]`, `wtp` the weights by tap `[tap][cp]`,
/// `offs` each tap's offset from a window's start; `cp` a multiple of the lanes). Eight output
/// positions at a time, running on across output rows (a 6 x 6 or 11 x 11 map is mostly rows'
/// ends): eight independent chains, a 512-bit FMA's latency times the two FMA pipes of a Zen 5
/// core (four left half of them idle). Positions outer and channel blocks inner, so a block's
/// eight windows are read for every channel block while in L1; with `TWO`, two channel blocks
/// at a time where there are two (sixteen chains, the second block's loads at a fixed
/// displacement from the same registers). Then the last positions one at a time. Each lane is
/// one FMA chain from +0 over the taps in (row, column) order whatever the blocking, so every
/// width gives the same bits; writes `acc[position * cp + channel]` for every position and
/// channel below `cp`.
///
/// # Safety
/// The caller's target features cover `F`'s instructions; the pointers hold the buffers above.
#[inline(always)]
pub(crate) unsafe fn depthwise_taps<F: F32Lanes, const TWO: bool>(
    bp: *const f32,
    wtp: *const f32,
    offs: &[usize],
    (oh, ow, sh, sw, wp, cp): (usize, usize, usize, usize, usize, usize),
    acc: *mut f32,
) {
    let (ol, l) = (oh * ow, F::LANES);
    // Where position o's window starts in the buffer (its first tap at offset 0).
    let start = |o: usize| (o / ow * sh * wp + o % ow * sw) * cp;
    let mut o = 0;
    while o + TAP_POSITIONS <= ol {
        let base: [usize; TAP_POSITIONS] = std::array::from_fn(|v| start(o + v));
        let mut c0 = 0;
        while c0 < cp {
            // Each window a base register, each tap's offset an index register.
            let pv: [*const f32; TAP_POSITIONS] = std::array::from_fn(|v| bp.add(base[v] + c0));
            let out = acc.add(o * cp + c0);
            c0 += l * if TWO && cp - c0 >= 2 * l {
                store_taps(taps_block::<F, 2, TAP_POSITIONS>(&pv, wtp.add(c0), offs, cp), out, cp)
            } else {
                store_taps(taps_block::<F, 1, TAP_POSITIONS>(&pv, wtp.add(c0), offs, cp), out, cp)
            };
        }
        o += TAP_POSITIONS;
    }
    // The last positions one at a time, each over several channel blocks at once (one chain
    // per block: a block alone waits on the FMA's latency at every tap; a 3 x 3 map ends with
    // one such position, a 6 x 6 map with four).
    for o in o..ol {
        let mut c0 = 0;
        while c0 < cp {
            let (pv, wc, out) = ([bp.add(start(o) + c0)], wtp.add(c0), acc.add(o * cp + c0));
            c0 += l * match (cp - c0) / l {
                8.. => store_taps(taps_block::<F, 8, 1>(&pv, wc, offs, cp), out, cp),
                4.. => store_taps(taps_block::<F, 4, 1>(&pv, wc, offs, cp), out, cp),
                2.. => store_taps(taps_block::<F, 2, 1>(&pv, wc, offs, cp), out, cp),
                _ => store_taps(taps_block::<F, 1, 1>(&pv, wc, offs, cp), out, cp),
            };
        }
    }
}

/// Output positions per block of [`depthwise_taps`].
const TAP_POSITIONS: usize = 8;

/// [`depthwise_taps`]' chains for `P` positions (`pv`, their windows) and `B` consecutive
/// channel blocks from the weights `wc`: `B * P` independent chains,
/// each over the taps in order (loops, not closures: a closure would not take the caller's
/// target features).
#[inline(always)]
unsafe fn taps_block<F: F32Lanes, const B: usize, const P: usize>(
    pv: &[*const f32; P],
    wc: *const f32,
    offs: &[usize],
    cp: usize,
) -> [[F; P]; B] {
    let mut a = [[F::zero(); P]; B];
    for (t, &off) in offs.iter().enumerate() {
        for (h, a) in a.iter_mut().enumerate() {
            let w = F::load(wc.add(t * cp + h * F::LANES));
            for (v, a) in a.iter_mut().enumerate() {
                *a = F::fmadd(w, F::load(pv[v].add(off + h * F::LANES)), *a);
            }
        }
    }
    a
}

/// [`taps_block`]'s sums to `out` (the block's first position and channel; positions `cp`
/// apart, channel blocks `F::LANES`); returns the channel blocks stored.
#[inline(always)]
unsafe fn store_taps<F: F32Lanes, const B: usize, const P: usize>(a: [[F; P]; B], out: *mut f32, cp: usize) -> usize {
    for (h, a) in a.iter().enumerate() {
        for (v, a) in a.iter().enumerate() {
            a.store(out.add(v * cp + h * F::LANES));
        }
    }
    B
}

/// [`crate::dequant::dequant_gemm`] for one row on vectors `F`: per `V` vectors of columns `V`
/// chains, each weight rebuilt as `f32(level) * scale` (one rounding) before its FMA, the scales
/// loaded once per group; the last columns in passes of `V / 2`, `V / 4`, ... vectors, so every
/// pass has a constant count of chains, which stay in registers (a count known only at run time
/// kept them on the stack: a store and a reload around every FMA).
///
/// # Safety
/// `F`'s instructions; `x` holds `w.k` values, `y` `w.n`; the levels and scales are in panels of
/// `PANEL` columns (`DequantRows::new`), a multiple of `V * F::LANES`.
#[inline(always)]
pub(crate) unsafe fn dequant_gemv<F: F32Lanes, const V: usize>(
    w: &crate::dequant::DequantRows,
    x: &[f32],
    y: &mut [f32],
) {
    const { assert!(crate::dequant::PANEL.is_multiple_of(V * F::LANES) && V.is_power_of_two() && V <= 8) };
    let mut j0 = 0;
    while j0 < w.n {
        let nv = (w.n - j0).div_ceil(F::LANES);
        // A pass of `p` vectors from j0 (a multiple of `p * LANES`) stays inside one panel.
        j0 = match nv {
            _ if nv >= V => dequant_pass::<F, V>(w, x, y, j0),
            _ if nv >= 4 && V > 4 => dequant_pass::<F, 4>(w, x, y, j0),
            _ if nv >= 2 && V > 2 => dequant_pass::<F, 2>(w, x, y, j0),
            _ => dequant_pass::<F, 1>(w, x, y, j0),
        };
    }
}

/// One pass of [`dequant_gemv`]: `P` vectors of columns from `j0`, the last one's columns past
/// `n` not stored; returns the next pass's first column.
#[inline(always)]
unsafe fn dequant_pass<F: F32Lanes, const P: usize>(
    w: &crate::dequant::DequantRows,
    x: &[f32],
    y: &mut [f32],
    j0: usize,
) -> usize {
    let (k, n) = (w.k, w.n);
    let (l0, s0, np) = w.panel(j0);
    let (lp, sp) = (w.levels.as_ptr().add(l0), w.scales.as_ptr().add(s0));
    let mut acc = [F::zero(); P];
    let mut sc = [F::zero(); P];
    for g in 0..k.div_ceil(w.group) {
        for (v, s) in sc.iter_mut().enumerate() {
            *s = F::load(sp.add(g * np + F::LANES * v));
        }
        for p in g * w.group..((g + 1) * w.group).min(k) {
            let xb = F::splat(*x.get_unchecked(p));
            for v in 0..P {
                let wv = F::mul(F::from_i8(lp.add(p * np + F::LANES * v)), sc[v]);
                acc[v] = F::fmadd(xb, wv, acc[v]);
            }
        }
    }
    for (v, a) in acc.iter().enumerate() {
        let at = j0 + F::LANES * v;
        a.store_first(y.as_mut_ptr().add(at), n.saturating_sub(at).min(F::LANES));
    }
    j0 + F::LANES * P
}

/// erfc's rational forms in `s = 1 / x^2` on [1.25, 1 / 0.35) and [1 / 0.35, 6): fdlibm's `ra`
/// / `sa` and `rb` / `sb` (`s_erf.c`, as `libm::erf` has them), padded with leading zeros to one
/// length (a zero highest coefficient leaves Horner's form as it was).
pub(crate) const ERFC_R: [[f64; 8]; 2] = [
    [
        f64::from_bits(0xBF84_3412_600D_6435),
        f64::from_bits(0xBFE6_3416_E4BA_7360),
        f64::from_bits(0xC025_1E04_41B0_E726),
        f64::from_bits(0xC04F_300A_E4CB_A38D),
        f64::from_bits(0xC064_4CB1_8428_2266),
        f64::from_bits(0xC067_135C_EBCC_ABB2),
        f64::from_bits(0xC054_5265_57E4_D2F2),
        f64::from_bits(0xC023_A0EF_C69A_C25C),
    ],
    [
        f64::from_bits(0xBF84_3412_39E8_6F4A),
        f64::from_bits(0xBFE9_93BA_70C2_85DE),
        f64::from_bits(0xC031_C209_555F_995A),
        f64::from_bits(0xC064_145D_43C5_ED98),
        f64::from_bits(0xC083_EC88_1375_F228),
        f64::from_bits(0xC090_0461_6A2E_5992),
        f64::from_bits(0xC07E_384E_9BDC_383F),
        0.0,
    ],
];
/// See [`ERFC_R`] (the constant term 1 first).
pub(crate) const ERFC_S: [[f64; 9]; 2] = [
    [
        1.0,
        f64::from_bits(0x4033_A6B9_BD70_7687),
        f64::from_bits(0x4061_350C_526A_E721),
        f64::from_bits(0x407B_290D_D58A_1A71),
        f64::from_bits(0x4084_2B19_21EC_2868),
        f64::from_bits(0x407A_D021_5770_0314),
        f64::from_bits(0x405B_28A3_EE48_AE2C),
        f64::from_bits(0x401A_47EF_8E48_4A93),
        f64::from_bits(0xBFAE_EFF2_EE74_9A62),
    ],
    [
        1.0,
        f64::from_bits(0x403E_568B_261D_5190),
        f64::from_bits(0x4074_5CAE_221B_9F0A),
        f64::from_bits(0x4098_02EB_189D_5118),
        f64::from_bits(0x40A8_FFB7_688C_246A),
        f64::from_bits(0x40A3_F219_CEDF_3BE6),
        f64::from_bits(0x407D_A874_E79F_E763),
        f64::from_bits(0xC036_70E2_4271_2D62),
        0.0,
    ],
];
