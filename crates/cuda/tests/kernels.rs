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
