//! AVX2 + FMA kernels for packed Q4 weights (see `packed`): W4A8 GEMV with `vpmaddubsw`
//! (unsigned nibbles x signed int8 activations, exact int32 sums per group, then the shared
//! float epilogue, so results equal the generic kernel bit for bit) and weight-only W4 GEMV on
//! f32 activations (nibbles widened to f32 in registers, FMA accumulation).

use crate::generic::{reduce_lanes, QuantizedInput};
use crate::packed::{PackedQ4, QK4};
use std::arch::x86_64::*;

/// The 32 nibbles of a block as unsigned bytes in element order (0-15 low lane, 16-31 high).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn unpack_u8(p: *const u8) -> __m256i {
    let raw = _mm_loadu_si128(p as *const __m128i);
    let mask = _mm_set1_epi8(0x0f);
    let lo = _mm_and_si128(raw, mask);
    let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
    _mm256_set_m128i(hi, lo)
}

#[inline]
#[target_feature(enable = "avx2")]
unsafe fn hsum_i32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
    _mm_cvtsi128_si32(s)
}

#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn hsum_f32(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0b01));
    _mm_cvtss_f32(s)
}

/// One output of the W4A8 GEMV: row `r` of `w` against `x` (see `generic_gemv_q4q8`).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_q4q8(w: &PackedQ4, r: usize, x: &QuantizedInput, bias: f32) -> f32 {
    let groups = w.groups();
    let bpg = w.group / QK4;
    let bpr = w.k_pad / QK4;
    let ones = _mm256_set1_epi16(1);
    let xp = x.q.as_ptr();
    let row = w.blocks.as_ptr().add(r * bpr) as *const u8;
    let group_acc = |g: usize| -> __m256i {
        let mut acc = _mm256_setzero_si256();
        for b in 0..bpg {
            let i = g * bpg + b;
            let wv = unpack_u8(row.add(i * 16));
            let xv = _mm256_loadu_si256(xp.add(i * QK4) as *const __m256i);
            // (q + 8) * x in i16 pairs: |15 * 128 * 2| fits, no saturation.
            let p = _mm256_maddubs_epi16(wv, xv);
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p, ones));
        }
        acc
    };
    // Eight groups at a time: their accumulators reduce together with one hadd tree, and
    // the corrections `- 8 sum(x) - zero sum(q)` apply as vectors.
    let full = groups / 8 * 8;
    let zero = _mm256_set1_epi32(x.zero);
    let scales = w.scales.as_ptr().add(r * groups);
    let mut accf = _mm256_setzero_ps();
    let mut g = 0;
    while g < full {
        let a: [__m256i; 8] = std::array::from_fn(|j| group_acc(g + j));
        let h12 = _mm256_hadd_epi32(_mm256_hadd_epi32(a[0], a[1]), _mm256_hadd_epi32(a[2], a[3]));
        let h34 = _mm256_hadd_epi32(_mm256_hadd_epi32(a[4], a[5]), _mm256_hadd_epi32(a[6], a[7]));
        let sums =
            _mm256_add_epi32(_mm256_permute2x128_si256(h12, h34, 0x20), _mm256_permute2x128_si256(h12, h34, 0x31));
        let xs = _mm256_slli_epi32(_mm256_loadu_si256(x.sums.as_ptr().add(g) as *const __m256i), 3);
        let ws = _mm256_mullo_epi32(zero, _mm256_loadu_si256(w.sums.as_ptr().add(r * groups + g) as *const __m256i));
        let v = _mm256_sub_epi32(_mm256_sub_epi32(sums, xs), ws);
        // Lane l accumulates groups l, l + 8, ...: the epilogue's order (mul, then add).
        accf = _mm256_add_ps(accf, _mm256_mul_ps(_mm256_cvtepi32_ps(v), _mm256_loadu_ps(scales.add(g))));
        g += 8;
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), accf);
    for g in full..groups {
        // sum (q + 8) x - 8 sum x - zero sum q = sum (x - zero) q.
        let s = hsum_i32(group_acc(g)) - 8 * x.sums[g] - x.zero * w.sums[r * groups + g];
        lanes[g % 8] += s as f32 * *scales.add(g);
    }
    reduce_lanes(lanes) * x.scale + bias
}

/// W4A8 GEMV rows `rows` of `w` (see `generic_gemv_q4q8`).
///
/// # Safety
/// The CPU must support AVX2 and FMA; `x.q` holds `w.k_pad` values, `y` `rows.len()` outputs.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn avx2_gemv_q4q8_rows(
    w: &PackedQ4,
    x: &QuantizedInput,
    bias: Option<&[f32]>,
    rows: std::ops::Range<usize>,
    y: &mut [f32],
) {
    for (out, r) in y.iter_mut().zip(rows) {
        *out = dot_q4q8(w, r, x, bias.map_or(0.0, |b| b[r]));
    }
}

/// W4A8 on a batch: `y[c * w.n + r]` for every input `xs[c]` and every row, rows outer so each
/// weight row is read from memory once for the whole batch.
///
/// # Safety
/// The CPU must support AVX2 and FMA; every `xs[c].q` holds `w.k_pad` values and `y` has
/// `xs.len() * w.n` entries.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn avx2_gemm_q4q8(w: &PackedQ4, xs: &[QuantizedInput], bias: Option<&[f32]>, y: &mut [f32]) {
    for r in 0..w.n {
        let b = bias.map_or(0.0, |b| b[r]);
        for (c, x) in xs.iter().enumerate() {
            y[c * w.n + r] = dot_q4q8(w, r, x, b);
        }
    }
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
