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

/// Int8 multiply-accumulates per second (in G) of the W4A8 kernels' inner step on the
/// instructions they dispatch to here: with AVX-512 VNNI `vpdpbusd` on 512-bit registers (64
/// unsigned x signed byte products summed four to an int32 lane), else AVX2 `vpmaddubsw` (32
/// products summed in pairs) with an i16 `vpaddw` accumulate; weights loaded from L1 (with VNNI
/// two vectors per sixteen instructions, as the channel-lane kernels load them), inputs
/// broadcast. `None` without AVX2.
pub fn int8_gmacs() -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    if crate::isa() == crate::Isa::Avx512Vnni {
        let w: Vec<i8> = (0..4096).map(|i| (i % 15) as i8 - 7).collect();
        // SAFETY: isa() checked AVX-512 F/BW/VNNI; `w` holds 64 vectors of 64 bytes.
        let t = best(|| unsafe { x86::dpbusd(&w, ROUNDS) });
        return Some((ROUNDS * 64 * 64) as f64 / t / 1e9);
    }
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        let w: Vec<i8> = (0..2048).map(|i| (i % 15) as i8 - 7).collect();
        // SAFETY: AVX2 detected above; `w` holds 64 vectors of 32 bytes.
        let t = best(|| unsafe { x86::maddubs(&w, ROUNDS) });
        return Some((ROUNDS * 64 * 32) as f64 / t / 1e9);
    }
    None
}

/// The instructions [`int8_gmacs`] measures here, for reports.
pub fn int8_instruction() -> &'static str {
    if crate::isa() == crate::Isa::Avx512Vnni {
        "vpdpbusd (512-bit)"
    } else {
        "vpmaddubsw (256-bit)"
    }
}

/// f32 multiply-accumulates per second (in G) of FMA on independent chains at the widest
/// vectors the CPU has (512-bit with AVX-512 F: what a peer's f32 kernels use there; else 256-bit,
/// 8 per instruction). `None` without AVX2 and FMA.
pub fn f32_gmacs() -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512 F detected above.
        let t = best(|| unsafe { x86::fma512(ROUNDS * 8) });
        return Some((ROUNDS * 8 * 12 * 16) as f64 / t / 1e9);
    }
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: AVX2 and FMA detected above.
        let t = best(|| unsafe { x86::fma(ROUNDS * 8) });
        return Some((ROUNDS * 8 * 12 * 8) as f64 / t / 1e9);
    }
    None
}

/// Read bandwidth in GB/s of one core streaming over a buffer of `bytes` (best of three timed
/// passes after a warm-up pass; passes repeated to at least 64 MiB per timing): at a few MiB the
/// last-level cache's rate, at hundreds of MiB memory's. What a batch-1 layer whose weights do
/// not stay in the core's own caches between runs is held against. `None` without AVX2.
pub fn read_gbs(bytes: usize) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        let buf = vec![1u8; bytes.max(4096).next_multiple_of(256)];
        let passes = (64usize << 20).div_ceil(buf.len()).max(1);
        // SAFETY: AVX2 detected above; the buffer's length is a multiple of 256 bytes.
        let run = || (0..passes).fold(0u64, |a, _| a ^ unsafe { x86::read_all(std::hint::black_box(&buf)) });
        run();
        let t = best(run);
        return Some((passes * buf.len()) as f64 / t / 1e9);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = bytes;
    None
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// XOR of every 32-byte vector of `buf` (eight independent chains), folded to 64 bits.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn read_all(buf: &[u8]) -> u64 {
        let mut acc = [_mm256_setzero_si256(); 8];
        for chunk in buf.chunks_exact(256) {
            for (i, a) in acc.iter_mut().enumerate() {
                *a = _mm256_xor_si256(*a, _mm256_loadu_si256(chunk.as_ptr().add(32 * i) as *const __m256i));
            }
        }
        let s = acc.iter().fold(_mm256_setzero_si256(), |s, a| _mm256_xor_si256(s, *a));
        (_mm256_extract_epi64::<0>(s) ^ _mm256_extract_epi64::<3>(s)) as u64
    }

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

    /// Sixteen `vpdpbusd` chains per step against two weight vectors loaded from L1 (the channel
    /// lane kernels' step: a block's two 512-bit weight vectors, each input broadcast). One full
    /// load per instruction instead measured 286-346 GMAC/s on a core whose instruction rate is
    /// 540: the 512-bit loads, not the dot products, were the limit.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn dpbusd(w: &[i8], rounds: usize) -> u64 {
        assert!(w.len() >= 8 * 64);
        let mut acc = [_mm512_setzero_si512(); 16];
        let (mut a, mut b) = (_mm512_set1_epi32(0x0102_0304), _mm512_set1_epi32(0x0506_0708));
        for _ in 0..rounds {
            std::arch::asm!("/* {0} {1} */", inout(zmm_reg) a, inout(zmm_reg) b, options(nomem, nostack));
            for k in 0..4 {
                let w0 = _mm512_loadu_si512(w.as_ptr().add(128 * k) as *const __m512i);
                let w1 = _mm512_loadu_si512(w.as_ptr().add(128 * k + 64) as *const __m512i);
                for (j, acc) in acc.iter_mut().enumerate() {
                    let x = if j / 2 % 2 == 0 { a } else { b };
                    *acc = _mm512_dpbusd_epi32(*acc, x, if j % 2 == 0 { w0 } else { w1 });
                }
            }
        }
        let s = acc.iter().fold(_mm512_setzero_si512(), |s, a| _mm512_add_epi32(s, *a));
        _mm512_reduce_add_epi32(s) as u64
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn fma512(rounds: usize) -> u64 {
        let mut acc: [__m512; 12] = std::array::from_fn(|i| _mm512_set1_ps(i as f32 * 1e-3));
        let (mut m, mut c) = (_mm512_set1_ps(0.999), _mm512_set1_ps(1e-4));
        for _ in 0..rounds {
            std::arch::asm!("/* {0} {1} */", inout(zmm_reg) m, inout(zmm_reg) c, options(nomem, nostack));
            for a in acc.iter_mut() {
                *a = _mm512_fmadd_ps(*a, m, c);
            }
        }
        let s = acc.iter().fold(_mm512_setzero_ps(), |s, a| _mm512_add_ps(s, *a));
        _mm512_reduce_add_ps(s).to_bits() as u64
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
