//! The CUDA kernels without a GPU and with one.
//!
//! - Every `.cu` source compiles with NVRTC for Hopper and Ampere (CI points LD_LIBRARY_PATH at
//!   the `nvidia-cuda-nvrtc` wheel; `SQIL_REQUIRE_NVRTC=1` makes a missing NVRTC a failure).
//! - The host-side packing round-trips (the CUDA layout holds exactly the given weights).
//! - With a driver and a device: every kernel instance against the CPU reference; without,
//!   the test prints why it skips.

use sqil_cuda::{compile, dequantize, pack, Gpu, GROUP, SOURCES};

#[test]
fn every_kernel_source_compiles_with_nvrtc() {
    if !sqil_cuda::nvrtc_present() {
        assert!(
            std::env::var("SQIL_REQUIRE_NVRTC").as_deref() != Ok("1"),
            "NVRTC missing and SQIL_REQUIRE_NVRTC=1 (LD_LIBRARY_PATH should hold the nvidia-cuda-nvrtc wheel's lib)"
        );
        eprintln!(
            "skipping: libnvrtc not found (pip install nvidia-cuda-nvrtc==13.0.*; LD_LIBRARY_PATH=.../nvidia/cu13/lib)"
        );
        return;
    }
    let cache = std::env::temp_dir().join(format!("sqil-ptx-{}", std::process::id()));
    std::env::set_var("SQIL_CACHE", &cache);
    for (name, src) in SOURCES {
        for arch in ["compute_90", "compute_80"] {
            let ptx = compile(name, src, arch).unwrap_or_else(|e| panic!("{name} for {arch}: {e}"));
            // Gpu::function finds kernels by these PTX entry lines.
            assert!(ptx.contains(".visible .entry sqil_"), "{name}: no `.visible .entry` line");
            if *name == "q4_gemv.cu" {
                for b in sqil_cuda::BATCHES {
                    assert!(
                        ptx.contains(&format!(".visible .entry sqil_q4_gemv_b{b}(")),
                        "{name}: no entry for batch {b}"
                    );
                }
            }
            // The second call reads the cache.
            assert_eq!(compile(name, src, arch).unwrap(), ptx);
        }
    }
    // A kernel that does not compile is an error naming the file, not a panic.
    let e = compile("broken.cu", "extern \"C\" __global__ void k() { undefined_thing(); }", "compute_90").unwrap_err();
    assert!(e.to_string().contains("broken.cu"), "{e}");
    std::fs::remove_dir_all(&cache).ok();
}

#[test]
fn packing_holds_the_weights() {
    let (n, k) = (5usize, 200usize);
    let q: Vec<i8> = (0..n * k).map(|i| ((i * 7) % 16) as i8 - 8).collect();
    let s: Vec<f32> = (0..n * k.div_ceil(GROUP)).map(|i| 0.5 + i as f32 * 0.25).collect();
    let w = pack(&q, &s, n, k);
    assert_eq!(w.k, 256);
    let d = dequantize(&w);
    for r in 0..n {
        for c in 0..w.k {
            let want = if c < k { q[r * k + c] as f32 * s[r * 2 + c / GROUP] } else { 0.0 };
            assert_eq!(d[r * w.k + c], want, "row {r} col {c}");
        }
    }
    // The tensor-core layout holds every weight once, where the B fragments expect it: lane tig,
    // word wd, pair p -> elements 128 j + 16 (2 wd + p / 2) + 8 (p % 2) + 2 tig (+ 1).
    let m = sqil_cuda::mma_words(&w);
    assert_eq!(m.len(), w.words.len());
    let mut seen = vec![false; n * w.k];
    for (i, &v) in m.iter().enumerate() {
        let (wd, tig, j, r) = (i % 4, i / 4 % 4, i / 16 % (w.k / 128), i / 16 / (w.k / 128));
        for p in 0..4 {
            let e = 128 * j + 16 * (2 * wd + p / 2) + 8 * (p % 2) + 2 * tig;
            for (off, shift) in [(0, 4 * p), (1, 16 + 4 * p)] {
                let want = if e + off < k { q[r * k + e + off] } else { 0 };
                assert_eq!(((v >> shift) & 15) as i8 - 8, want, "row {r} element {}", e + off);
                assert!(!std::mem::replace(&mut seen[r * w.k + e + off], true), "element {} twice", e + off);
            }
        }
    }
    assert!(seen.iter().all(|&s| s));
    // The int8 tensor-core layout: byte i of word wd of lane tig holds elements 128 j + 32 wd +
    // 4 tig + i (low nibble) and that + 16 (high nibble).
    let m8 = sqil_cuda::mma8_words(&w);
    assert_eq!(m8.len(), w.words.len());
    let mut seen = vec![false; n * w.k];
    for (i, &v) in m8.iter().enumerate() {
        let (wd, tig, j, r) = (i % 4, i / 4 % 4, i / 16 % (w.k / 128), i / 16 / (w.k / 128));
        for b in 0..4 {
            let e = 128 * j + 32 * wd + 4 * tig + b;
            for (off, shift) in [(0, 8 * b), (16, 8 * b + 4)] {
                let want = if e + off < k { q[r * k + e + off] } else { 0 };
                assert_eq!(((v >> shift) & 15) as i8 - 8, want, "row {r} element {}", e + off);
                assert!(!std::mem::replace(&mut seen[r * w.k + e + off], true), "element {} twice", e + off);
            }
        }
    }
    assert!(seen.iter().all(|&s| s));
}

/// The dense 3- and 2-bit layout holds exactly the given weights, read back as its doc says.
#[test]
fn dense_packing_follows_the_documented_layout() {
    for bits in [3u32, 2] {
        let (n, k) = (3, 200);
        let off = 1i32 << (bits - 1);
        let q: Vec<i8> = (0..n * k).map(|i| ((i * 7 + i / 5) % (2 * off as usize)) as i8 - off as i8).collect();
        let kp = k.div_ceil(GROUP) * GROUP;
        let w = sqil_cuda::pack_dense(&q, &vec![1.0; n * kp / 32], n, k, 32, bits);
        assert_eq!((w.k, w.lo.len(), w.hi.len()), (256, n * 4 * 4, if bits == 3 { n * 4 * 2 } else { 0 }));
        for r in 0..n {
            for e in 0..kp {
                let (c, i, t, j) = (e / 64, (e % 64) / 16, (e % 16) / 2, e % 2);
                let mut u = (w.lo[(r * kp / 64 + c) * 4 + i] >> (16 * j + 2 * t)) & 3;
                if bits == 3 {
                    u |= ((w.hi[(r * kp / 64 + c) * 2 + i / 2] >> (16 * j + 8 * (i % 2) + t)) & 1) << 2;
                }
                let want = if e < k { q[r * k + e] as i32 } else { 0 };
                assert_eq!(u as i32 - off, want, "{bits} bits, row {r}, element {e}");
            }
        }
    }
}

#[test]
fn kernels_agree_with_the_cpu_reference_on_a_gpu() {
    let gpu = match Gpu::new() {
        Ok(g) => g,
        Err(e) => {
            eprintln!("skipping: {e}");
            return;
        }
    };
    let exe = env!("CARGO_BIN_EXE_sqil-cuda-bench");
    let out = std::process::Command::new(exe).arg("check").output().unwrap();
    assert!(out.status.success(), "{} failed on {}:\n{}", exe, gpu.name, String::from_utf8_lossy(&out.stdout));
}

/// The exact W4A8 GEMM's weight layout decoded as its kernels decode it (two's-complement
/// nibbles; byte i of word wd: low nibble term 32 wd + 4 tig + i, high nibble that term + 16; lane
/// 4 g + tig of tile t is row 8 t + g) gives back every weight, padding rows, terms and blocks as
/// zeros; and every instance the host can launch has a PTX entry.
#[test]
fn w4a8_layout_holds_the_weights() {
    let (n, k) = (13usize, 200usize);
    let q: Vec<i8> = (0..n * k).map(|i| ((i * 11 + i / 7) % 16) as i8 - 8).collect();
    let host = pack(&q, &vec![1.0; n * k.div_ceil(GROUP)], n, k);
    let kq = host.k / 128 + 1; // one block of padding, as for a group spanning two blocks
    let words = sqil_cuda::w4a8_words(&host, kq);
    let tiles = n.div_ceil(8);
    assert_eq!(words.len(), tiles * kq * 128);
    for tile in 0..tiles {
        for j in 0..kq {
            for lane in 0..32 {
                let (g, tig) = (lane / 4, lane % 4);
                for wd in 0..4 {
                    let word = words[((tile * kq + j) * 32 + lane) * 4 + wd];
                    for i in 0..4 {
                        let byte = (word >> (8 * i)) & 0xff;
                        for (half, nib) in [(0, byte & 15), (16, byte >> 4)] {
                            let v = ((nib << 4) as u8 as i8) >> 4;
                            let (row, term) = (tile * 8 + g, 128 * j + 32 * wd + 4 * tig + i + half);
                            let want = if row < n && term < k { q[row * k + term] } else { 0 };
                            assert_eq!(v, want, "tile {tile} quad {j} lane {lane} word {wd} byte {i} half {half}");
                        }
                    }
                }
            }
        }
    }
    if sqil_cuda::nvrtc_present() {
        let src = SOURCES.iter().find(|(name, _)| *name == "q4_gemv.cu").unwrap().1;
        let ptx = compile("q4_gemv.cu", src, "compute_90").unwrap();
        for (name, ..) in sqil_cuda::W4A8_INSTANCES {
            assert!(ptx.contains(&format!(".visible .entry {name}(")), "no PTX entry for {name}");
        }
    }
}

/// The GPU's elementary functions (`fp16.cuh`: sqil_exp_nonpos and the functions built on it)
/// take the CPU's constants: ln 2's split, log2 e and the rounding constant, by their bits, and
/// the Taylor and atanh coefficients as the same divisions (each evaluated once, correctly
/// rounded, on both sides).
#[test]
fn the_gpu_elementary_functions_take_the_cpus_constants() {
    use sqil_kernels_cpu::generic as g;
    let src = sqil_cuda::FP16_CUH;
    for (what, bits) in [
        ("ln2_hi", g::EXP_LN2_HI.to_bits()),
        ("ln2_lo", g::EXP_LN2_LO.to_bits()),
        ("log2e", std::f64::consts::LOG2_E.to_bits()),
    ] {
        assert!(src.contains(&format!("{what} = __longlong_as_double({bits:#018x}LL)")), "{what}: {bits:#018x}");
    }
    assert_eq!(g::EXP_MAGIC, 6755399441055744.0);
    assert!(src.contains("#define SQIL_EXP_MAGIC 6755399441055744.0"));
    // 1 / k!, k = 0..=13, as the literal divisions the CUDA array holds.
    let fact = |k: u64| (1..=k).product::<u64>().max(1) as f64;
    for (k, &c) in g::EXP_TAYLOR.iter().enumerate() {
        assert_eq!(c, 1.0 / fact(k as u64), "EXP_TAYLOR[{k}]");
        if k >= 2 {
            assert!(src.contains(&format!("1.0 / {}.0", fact(k as u64) as u64)), "1 / {k}! in fp16.cuh");
        }
    }
    assert_eq!(g::ATANH_SERIES[17], 1.0 / 35.0);
    assert_eq!(g::TANH_TAYLOR, [-1.0 / 3.0, 2.0 / 15.0, -17.0 / 315.0]);
    assert_eq!(g::EXPM1_TAYLOR, [1.0 / 2.0, 1.0 / 6.0, 1.0 / 24.0, 1.0 / 120.0]);
    assert_eq!(g::TANH_SMALL, 1.0 / 1024.0);
}

/// `sqil_math.cuh` computes the CPU's bits: the file compiled as C on the host (the CUDA
/// rounding intrinsics as plain IEEE double operations, no contraction), each function against
/// its definition in `sqil_kernels_cpu::generic` on 200 000 values (zeros, subnormals, the
/// branch edges, |x| up to 800, infinities, NaN), bit for bit. (The device's double operations
/// are the same IEEE operations; the GPU tests check the kernels that call them.)
#[test]
fn the_gpu_elementary_functions_are_the_cpus_on_the_host() {
    use sqil_kernels_cpu::generic as g;
    if std::process::Command::new("cc").arg("--version").output().is_err() {
        assert!(std::env::var("SQIL_REQUIRE_CROSS").as_deref() != Ok("1"), "cc missing and SQIL_REQUIRE_CROSS=1");
        eprintln!("skipping: no C compiler");
        return;
    }
    let dir = std::env::temp_dir().join(format!("sqil-math-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let prelude = r#"#include <math.h>
#include <stdio.h>
#include <string.h>
#define __device__
#define __forceinline__ static inline
#define __dadd_rn(a, b) ((a) + (b))
#define __dsub_rn(a, b) ((a) - (b))
#define __dmul_rn(a, b) ((a) * (b))
#define __ddiv_rn(a, b) ((a) / (b))
#define __fdiv_rn(a, b) ((a) / (b))
static inline double __longlong_as_double(long long v) { double d; memcpy(&d, &v, 8); return d; }
static inline long long __double_as_longlong(double d) { long long v; memcpy(&v, &d, 8); return v; }
"#;
    let main = r#"
int main(void) {
    unsigned long long b;
    while (scanf("%llx", &b) == 1) {
        double x = __longlong_as_double((long long)b);
        double r[5] = {sqil_exp_nonpos(-fabs(x)), sqil_sigmoid(x), sqil_tanh(x), sqil_softplus(x), sqil_elu(x, 0.75)};
        for (int i = 0; i < 5; i++) printf("%llx ", (unsigned long long)__double_as_longlong(r[i]));
        printf("\n");
    }
    return 0;
}
"#;
    let src = format!("{prelude}{}{main}", sqil_cuda::SQIL_MATH_CUH);
    std::fs::write(dir.join("math.c"), src).unwrap();
    let exe = dir.join("math");
    let out = std::process::Command::new("cc")
        .args(["-O2", "-std=c11", "-ffp-contract=off", "-fno-fast-math", "-w"])
        .arg(dir.join("math.c"))
        .arg("-o")
        .arg(&exe)
        .arg("-lm")
        .output()
        .unwrap();
    assert!(out.status.success(), "cc: {}", String::from_utf8_lossy(&out.stderr));
    let mut r = sqil_ir::testing::Rng::new(3);
    let mut xs: Vec<f64> = vec![0.0, -0.0, 1e-310, -1e-310, 1.0 / 1024.0, -1.0 / 1024.0, 708.0, -708.0, 709.0, 800.0];
    xs.extend([f64::INFINITY, f64::NEG_INFINITY, f64::NAN]);
    for i in 0..200_000 {
        let u = r.unit() as f64;
        // Mostly f32 inputs (what the kernels pass), spread over magnitudes 2^-30 .. 2^9.
        let x = u.signum() * 2f64.powf(u.abs() * 39.0 - 30.0) * (1.0 + (i % 7) as f64 / 7.0);
        xs.push(if i % 2 == 0 { x as f32 as f64 } else { x });
    }
    let input: String = xs.iter().map(|x| format!("{:x}\n", x.to_bits())).collect();
    let mut child = std::process::Command::new(&exe)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || std::io::Write::write_all(&mut stdin, input.as_bytes()).unwrap());
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let mut n = 0;
    for (line, &x) in text.lines().zip(&xs) {
        let got: Vec<u64> = line.split_whitespace().map(|h| u64::from_str_radix(h, 16).unwrap()).collect();
        let want = [g::exp_nonpos(-x.abs()), g::sigmoid(x), g::tanh(x), g::softplus(x), g::elu(x, 0.75)];
        for (k, (&gb, w)) in got.iter().zip(want).enumerate() {
            let same = gb == w.to_bits() || (w.is_nan() && f64::from_bits(gb).is_nan());
            assert!(same, "function {k} at {x:e}: {:e} vs the CPU's {w:e}", f64::from_bits(gb));
        }
        n += 1;
    }
    assert_eq!(n, xs.len(), "the program answered every value");
    let _ = std::fs::remove_dir_all(dir);
}
