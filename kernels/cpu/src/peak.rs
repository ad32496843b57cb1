//! This core's arithmetic ceilings, measured: what a kernel's rate is compared against in the
//! same run (the convolution benchmark, `sqil bench --peaks`). Each probe runs independent chains
//! of one instruction pattern long enough (~20 ms) to reach the core's sustained clock.

use std::time::Instant;

/// Seconds per call of `f` (best of three), which does `iters` rounds.
fn best(f: impl Fn() -> u64) -> f64 {
    (0..3)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(f());
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

const ROUNDS: usize = 200_000;

/// Int8 multiply-accumulates per second (in G) of AVX2 `vpmaddubsw` (32 unsigned x signed byte
/// products summed in pairs) with an i16 `vpaddw` accumulate, the weights loaded from L1 and the
/// inputs broadcast: the inner step of the W4A8 kernels. `None` without AVX2.
pub fn int8_gmacs() -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        let w: Vec<i8> = (0..2048).map(|i| (i % 15) as i8 - 7).collect();
        // SAFETY: AVX2 detected above; `w` holds 64 vectors of 32 bytes.
        let t = best(|| unsafe { x86::maddubs(&w, ROUNDS) });
        return Some((ROUNDS * 64 * 32) as f64 / t / 1e9);
    }
    None
}

/// f32 multiply-accumulates per second (in G) of 256-bit FMA (`vfmadd`, 8 per instruction) on
/// independent chains. `None` without AVX2 and FMA.
pub fn f32_gmacs() -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: AVX2 and FMA detected above.
        let t = best(|| unsafe { x86::fma(ROUNDS * 8) });
        return Some((ROUNDS * 8 * 12 * 8) as f64 / t / 1e9);
    }
    None
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn maddubs(w: &[i8], rounds: usize) -> u64 {
        assert!(w.len() >= 64 * 32);
        let mut acc = [_mm256_setzero_si256(); 8];
        let (mut a, mut b) = (_mm256_set1_epi32(0x0102_0304), _mm256_set1_epi32(0x0506_0708));
        for _ in 0..rounds {
            // The inputs change each round as far as the compiler knows.
            std::arch::asm!("/* {0} {1} */", inout(ymm_reg) a, inout(ymm_reg) b, options(nomem, nostack));
            for k in 0..8 {
                for (j, acc) in acc.iter_mut().enumerate() {
                    let wv = _mm256_loadu_si256(w.as_ptr().add(32 * (8 * k + j)) as *const __m256i);
                    let x = if j % 2 == 0 { a } else { b };
                    *acc = _mm256_add_epi16(*acc, _mm256_maddubs_epi16(x, wv));
                }
            }
        }
        let s = acc.iter().fold(_mm256_setzero_si256(), |s, a| _mm256_add_epi16(s, *a));
        _mm256_extract_epi64::<0>(s) as u64
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn fma(rounds: usize) -> u64 {
        let mut acc: [__m256; 12] = std::array::from_fn(|i| _mm256_set1_ps(i as f32 * 1e-3));
        let (mut m, mut c) = (_mm256_set1_ps(0.999), _mm256_set1_ps(1e-4));
        for _ in 0..rounds {
            std::arch::asm!("/* {0} {1} */", inout(ymm_reg) m, inout(ymm_reg) c, options(nomem, nostack));
            for a in acc.iter_mut() {
                *a = _mm256_fmadd_ps(*a, m, c);
            }
        }
        let s = acc.iter().fold(_mm256_setzero_ps(), |s, a| _mm256_add_ps(s, *a));
        _mm256_cvtss_f32(s).to_bits() as u64
    }
}
