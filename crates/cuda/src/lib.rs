//! sqil's CUDA back end: int4 weight-only GEMV / small-batch GEMM kernels written as
//! `.cu` sources in `kernels/cuda`, embedded here and compiled at run time with NVRTC (the PTX
//! is cached on disk, keyed by source hash and GPU architecture), launched through cudarc, with
//! cuBLAS FP16 as the baseline.
//!
//! Without the `driver` feature (default on) the crate is the device-independent half only: the
//! kernel sources, the host weight layouts and the GPU lowering (`lower`), which `sqil-codegen`
//! prints as a standalone `.cu` file without linking cudarc.
//!
//! Everything loads the CUDA libraries dynamically: binaries build and run on machines without
//! CUDA; [`Gpu::new`] returns an error that says why (no driver, no device) instead of
//! panicking, and [`nvrtc_present`] tells whether kernels can be compiled here.

pub use error::{Error, Result};
use half::f16;

#[cfg(feature = "driver")]
pub mod collective;
pub mod error;
pub mod fused;
#[cfg(feature = "driver")]
mod gpu;
pub mod graph;
#[cfg(feature = "driver")]
pub mod graph_exec;
pub mod lower;
#[cfg(feature = "driver")]
pub mod policy;
#[cfg(feature = "driver")]
pub use gpu::*;

/// Every kernel source, by file name (each compiles on its own).
/// (The host prepends `fp16.cuh`, the PTX fp16 helpers, to each: NVRTC then needs no include path.)
pub const SOURCES: &[(&str, &str)] = &[
    (
        "q4_gemv.cu",
        concat!(
            include_str!("../../../kernels/cuda/fp16.cuh"),
            include_str!("../../../kernels/cuda/sqil_math.cuh"),
            include_str!("../../../kernels/cuda/q4_gemv.cu")
        ),
    ),
    (
        "policy_ops.cu",
        concat!(
            include_str!("../../../kernels/cuda/fp16.cuh"),
            include_str!("../../../kernels/cuda/sqil_math.cuh"),
            include_str!("../../../kernels/cuda/policy_ops.cu")
        ),
    ),
    ("bench.cu", include_str!("../../../kernels/cuda/bench.cu")),
];

/// The kernel files as written (for the standalone `.cu` emitter in sqil-codegen, which includes
/// each once).
/// `fp16.cuh` and `sqil_math.cuh` (sqil's elementary functions in double, the CPU's bits), the
/// prelude of every kernel source.
pub const FP16_CUH: &str =
    concat!(include_str!("../../../kernels/cuda/fp16.cuh"), include_str!("../../../kernels/cuda/sqil_math.cuh"));
/// sqil's elementary functions alone (the host test compiles them as C).
pub const SQIL_MATH_CUH: &str = include_str!("../../../kernels/cuda/sqil_math.cuh");

/// What `Gpu::load_source` compiles for generated source `src`: the prelude, then `src`.
pub fn full_source(src: &str) -> String {
    format!("{FP16_CUH}{src}")
}

/// The source a policy's generated kernel `name` (`lower::Lowered::sources`) compiles from on
/// its own: a layer with a generated epilogue (`lower::base_kernel`) instantiates
/// `policy_ops.cu`'s templates, so that file comes before it; a chain needs only the prelude.
pub fn generated_source(name: &str, src: &str) -> String {
    if lower::base_kernel(name) != name {
        format!("{FP16_CUH}{POLICY_OPS_CU}{src}")
    } else {
        full_source(src)
    }
}
pub const Q4_GEMV_CU: &str = include_str!("../../../kernels/cuda/q4_gemv.cu");
pub const POLICY_OPS_CU: &str = include_str!("../../../kernels/cuda/policy_ops.cu");

/// Group size of the CUDA int4 layout (fp16 scales per 128 weights of a row).
pub const GROUP: usize = 128;

/// Batches the GEMV kernel has instances for (`sqil_q4_gemv_b{B}`).
pub const BATCHES: [usize; 5] = [1, 2, 4, 8, 16];

/// The NVRTC architecture name for a compute capability (PTX for that virtual architecture).
pub fn arch_for(cc: (i32, i32)) -> &'static str {
    match cc {
        (9, _) => "compute_90",
        (8, 9) => "compute_89",
        (8, 6) => "compute_86",
        (8, _) => "compute_80",
        (10, _) => "compute_100",
        (12, _) => "compute_120",
        _ => "compute_75",
    }
}

/// int4 weights in the CUDA layout (see `kernels/cuda/q4_gemv.cu`), on the host.
#[derive(Clone, Debug)]
pub struct HostQ4 {
    pub n: usize,
    /// Padded to a multiple of [`GROUP`].
    pub k: usize,
    /// Weights per scale: 32, 64 or 128.
    pub group: usize,
    pub words: Vec<u32>,
    pub scales: Vec<f16>,
}

/// Where element `e` of a word's eight sits: element `2s` at bits `4s`, `2s + 1` at `16 + 4s`.
fn nibble_shift(e: usize) -> u32 {
    let i = (e % 8) as u32;
    if i.is_multiple_of(2) {
        2 * i
    } else {
        16 + 2 * (i - 1)
    }
}

impl HostQ4 {
    /// The stored nibble (`q + 8`) of row `r`, element `e`.
    pub fn nibble(&self, r: usize, e: usize) -> u32 {
        (self.words[r * self.k / 8 + e / 8] >> nibble_shift(e)) & 15
    }
}

/// Packs signed ints `q` (`[n, k]` row-major, in [-8, 7]) with per-group scales (`[n, k/128]`,
/// k rounded up) into the CUDA layout: k padded with zeros to a multiple of 128, each word's
/// nibbles interleaved for the half2 unpack.
pub fn pack(q: &[i8], scales: &[f32], n: usize, k: usize) -> HostQ4 {
    pack_grouped(q, scales, n, k, GROUP)
}

/// [`pack`] with `group` (32, 64 or 128) weights per scale; `scales` is `[n, ceil(k / 128) * 128
/// / group]`.
pub fn pack_grouped(q: &[i8], scales: &[f32], n: usize, k: usize, group: usize) -> HostQ4 {
    assert!(matches!(group, 32 | 64 | 128), "pack: group {group}");
    let kp = k.div_ceil(GROUP) * GROUP;
    assert_eq!(q.len(), n * k, "pack: q has {} values for [{n}, {k}]", q.len());
    assert_eq!(scales.len(), n * kp / group, "pack: scales");
    let mut words = vec![0u32; n * kp / 8];
    for r in 0..n {
        for i in 0..kp / 8 {
            let mut wd = 0u32;
            for e in 0..8 {
                let c = i * 8 + e;
                let v = if c < k { q[r * k + c] } else { 0 };
                assert!((-8..=7).contains(&v), "pack: weight {v} out of int4 range");
                wd |= ((v + 8) as u32) << nibble_shift(e);
            }
            words[r * kp / 8 + i] = wd;
        }
    }
    HostQ4 { n, k: kp, group, words, scales: scales.iter().map(|&s| f16::from_f32(s)).collect() }
}

/// 3- or 2-bit weights in the dense CUDA layout (`kernels/cuda/q4_gemv.cu`, `sqil_q3_gemv_b1` /
/// `sqil_q2_gemv_b1`), on the host: per row, chunks of 64 weights as four words of low bits
/// (`lo`) and, for 3 bits, two words of high bits (`hi`); fp16 scales per `group`.
#[derive(Clone, Debug)]
pub struct HostQd {
    pub n: usize,
    /// Padded to a multiple of [`GROUP`].
    pub k: usize,
    pub group: usize,
    pub bits: u32,
    pub lo: Vec<u32>,
    pub hi: Vec<u32>,
    pub scales: Vec<f16>,
}

/// Packs signed ints `q` (`[n, k]`, in the signed range of `bits` = 2 or 3) with per-group
/// scales (`[n, ceil(k / 128) * 128 / group]`, group 32, 64 or 128) in the dense layout: in chunk
/// word `i`, element `16 i + 2 t` at bits `2 t` (low bits of `q + 2^(bits-1)`) and `16 i + 2 t + 1`
/// at `16 + 2 t`; its high bit (3 bits) in high word `i / 2` at bit `8 (i % 2) + t` and `16 + 8 (i %
/// 2) + t`.
pub fn pack_dense(q: &[i8], scales: &[f32], n: usize, k: usize, group: usize, bits: u32) -> HostQd {
    assert!(matches!(bits, 2 | 3) && matches!(group, 32 | 64 | 128), "pack_dense: {bits} bits, group {group}");
    let kp = k.div_ceil(GROUP) * GROUP;
    assert_eq!(q.len(), n * k, "pack_dense: q");
    assert_eq!(scales.len(), n * kp / group, "pack_dense: scales");
    let off = 1i32 << (bits - 1);
    let chunks = kp / 64;
    let (mut lo, mut hi) = (vec![0u32; n * chunks * 4], vec![0u32; if bits == 3 { n * chunks * 2 } else { 0 }]);
    for r in 0..n {
        for c in 0..chunks {
            for i in 0..4 {
                for t in 0..8 {
                    for j in 0..2 {
                        let e = c * 64 + 16 * i + 2 * t + j;
                        let v = if e < k { q[r * k + e] as i32 } else { 0 };
                        assert!((-off..off).contains(&v), "pack_dense: weight {v} out of {bits}-bit range");
                        let u = (v + off) as u32;
                        lo[(r * chunks + c) * 4 + i] |= (u & 3) << (16 * j + 2 * t);
                        if bits == 3 {
                            hi[(r * chunks + c) * 2 + i / 2] |= ((u >> 2) & 1) << (16 * j + 8 * (i % 2) + t);
                        }
                    }
                }
            }
        }
    }
    HostQd { n, k: kp, group, bits, lo, hi, scales: scales.iter().map(|&s| f16::from_f32(s)).collect() }
}

/// The float weights the CUDA layout holds (`[n, k]`, padded k): the reference the kernels are
/// checked against.
pub fn dequantize(w: &HostQ4) -> Vec<f32> {
    let mut out = vec![0f32; w.n * w.k];
    for r in 0..w.n {
        for c in 0..w.k {
            let q = w.nibble(r, c) as i32 - 8;
            out[r * w.k + c] = q as f32 * w.scales[r * w.k / w.group + c / w.group].to_f32();
        }
    }
    out
}

/// Rearranges `w` for the tensor-core kernels: per row, group of 128 and lane `tig` of a quad,
/// four words, word `wd` built by `word(nibble, 128 j, tig, wd)` from the stored nibbles of the
/// row (`nibble(e)`: element `e`'s `q + 8`).
fn per_lane_words(w: &HostQ4, word: impl Fn(&dyn Fn(usize) -> u32, usize, usize, usize) -> u32) -> Vec<u32> {
    let groups = w.k / 128;
    let mut out = Vec::with_capacity(w.n * w.k / 8);
    for r in 0..w.n {
        let nib = |e: usize| w.nibble(r, e);
        for j in 0..groups {
            for tig in 0..4 {
                for wd in 0..4 {
                    out.push(word(&nib, 128 * j, tig, wd));
                }
            }
        }
    }
    out
}

/// The weights of `w` in the fp16 tensor-core kernels' layout (see `sqil_q4_mma_*` in
/// `kernels/cuda/q4_gemv.cu`): `[n][k / 128][4 lanes][4 words]`; word `wd` of lane `tig` holds
/// pair `p` (elements `e = 128 j + 16 (2 wd + p / 2) + 8 (p % 2) + 2 tig` and `e + 1`) at bits
/// `4p` and `16 + 4p`.
pub fn mma_words(w: &HostQ4) -> Vec<u32> {
    per_lane_words(w, |nib, base, tig, wd| {
        (0..4).fold(0u32, |v, p| {
            let e = base + 16 * (2 * wd + p / 2) + 8 * (p % 2) + 2 * tig;
            v | nib(e) << (4 * p) | nib(e + 1) << (16 + 4 * p)
        })
    })
}

/// The weights of `w` for the exact W4A8 GEMM (`sqil_w4a8_lean_*`, `sqil_w4a8_mma_*`): the
/// [`mma8_words`] uint4s regrouped per tile of 8 rows and block of 128 terms, lane `4 g + tig`
/// holding row `8 tile + g`'s uint4 for `tig`, so a warp's 32 loads are 512 contiguous bytes; each
/// nibble two's complement (`q & 15`, the kernels place it at the top of its byte as `16 q`);
/// rows padded to a multiple of 8 and blocks to `kqg` (whole groups) with zero weights.
pub fn w4a8_words(w: &HostQ4, kqg: usize) -> Vec<u32> {
    let m = mma8_words(w);
    let kq = w.k / 128;
    assert!(kqg >= kq, "w4a8_words: {kqg} blocks for {kq}");
    let tiles = w.n.div_ceil(8);
    let mut out = vec![0u32; tiles * kqg * 128];
    for tile in 0..tiles {
        for j in 0..kq {
            for lane in 0..32 {
                let (g, tig) = (lane / 4, lane % 4);
                let row = tile * 8 + g;
                if row < w.n {
                    let src = ((row * kq + j) * 4 + tig) * 4;
                    let dst = ((tile * kqg + j) * 32 + lane) * 4;
                    for (o, v) in out[dst..dst + 4].iter_mut().zip(&m[src..src + 4]) {
                        *o = v ^ 0x8888_8888;
                    }
                }
            }
        }
    }
    out
}

/// The weights of `w` in the int8 tensor-core kernels' layout (see `sqil_q4_mma8_*`): as
/// [`mma_words`], byte `i` of word `wd` of lane `tig` holding element `128 j + 32 wd + 4 tig + i`
/// (as `q + 8`) in its low nibble and that element + 16 in its high nibble.
pub fn mma8_words(w: &HostQ4) -> Vec<u32> {
    per_lane_words(w, |nib, base, tig, wd| {
        (0..4).fold(0u32, |v, i| {
            let e = base + 32 * wd + 4 * tig + i;
            v | (nib(e) | nib(e + 16) << 4) << (8 * i)
        })
    })
}
