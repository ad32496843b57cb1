//! `sqil-cuda-bench`: correctness and speed of sqil's CUDA int4 kernels, in one run.
//!
//! ```text
//! sqil-cuda-bench check [--small]  # every kernel instance vs the CPU reference (exit 1 on failure)
//! sqil-cuda-bench gemv [--iters N] # int4 GEMV vs cuBLAS FP16, batch 1/4/16, L2 flushed: JSON lines
//! sqil-cuda-bench w4a8 [--iters N] [--shapes S] [--only half_t2,lean_t2]
//!                                  # the exact W4A8 GEMM (every instance, checked bit for bit) vs
//!                                  # cuBLAS FP16, the W4A16 GEMV and the weight-read floor, batch 1/4/16
//!                                  # (--only: the instances whose names contain one of these)
//! sqil-cuda-bench check-w4a8       # the exact W4A8 GEMM alone vs its reference (also part of check)
//! sqil-cuda-bench explore [--iters N]
//!                                  # batch-1 GEMV variants (chunks in flight, L1 policy, rows per
//!                                  # warp, block size) and cuBLAS, L2 flushed by memset and by reads
//! sqil-cuda-bench vla [--layers L] # Llama-style decoder linears (hidden 4096, MLP 11008), batch 1
//! sqil-cuda-bench policy ARTIFACT STATES.npy [STATES1.npy ...] [--iters N] [--profile] [--prefixes]
//!                                  # a compiled policy on the GPU (launches, CUDA graph, persistent
//!                                  # program) vs the CPU runtime; --profile: per step; --prefixes:
//!                                  # the program of the first n steps, per n (where its time goes)
//! ```
//! Without a driver or device it prints why and exits 0 (nothing to measure here).

use cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{sys::CUevent_flags, CudaSlice, LaunchConfig, PushKernelArg};
use half::f16;
use sqil_cuda::{dequantize, pack, pack_dense, ActQuant, DeviceQ4, Gpu, HostQ4, HostQd, GROUP, W4A8_INSTANCES};

/// Vendor peak HBM bandwidth (bytes/s) by device name, for the "fraction of peak" column.
fn peak_bw(name: &str) -> f64 {
    if name.contains("H200") {
        4.8e12
    } else if name.contains("H100") {
        3.35e12
    } else {
        f64::NAN
    }
}

/// A small deterministic generator (xorshift), so runs are repeatable.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

fn random_q4(n: usize, k: usize, seed: u64) -> HostQ4 {
    let mut r = Rng(seed | 1);
    let q: Vec<i8> = (0..n * k).map(|_| (r.next() % 16) as i8 - 8).collect();
    let s: Vec<f32> = (0..n * k.div_ceil(GROUP)).map(|_| 0.01 + 0.02 * r.uniform().abs()).collect();
    pack(&q, &s, n, k)
}

/// Random `bits`-bit weights `[n, k]` with scales per `group`, packed densely, and the float
/// weights they stand for (`[n, k padded]`, from the ints and scales, not from the packing).
fn random_dense(n: usize, k: usize, bits: u32, group: usize, seed: u64) -> (HostQd, Vec<f32>) {
    let mut r = Rng(seed | 1);
    let levels = 1u64 << bits;
    let q: Vec<i8> = (0..n * k).map(|_| (r.next() % levels) as i8 - (levels / 2) as i8).collect();
    let kp = k.div_ceil(GROUP) * GROUP;
    let s: Vec<f32> = (0..n * kp / group).map(|_| 0.01 + 0.02 * r.uniform().abs()).collect();
    let wf = (0..n * kp)
        .map(|i| {
            let (row, c) = (i / kp, i % kp);
            if c < k {
                q[row * k + c] as f32 * s[row * (kp / group) + c / group]
            } else {
                0.0
            }
        })
        .collect();
    (pack_dense(&q, &s, n, k, group, bits), wf)
}

fn err<E: std::fmt::Debug>(e: E) -> sqil_cuda::Error {
    sqil_cuda::Error::Device(format!("{e:?}"))
}

fn check(gpu: &Gpu, small: bool) -> Result<bool, sqil_cuda::Error> {
    let mut ok = true;
    // Dense 3- and 2-bit GEMV (batch 1) against the float weights the ints and scales stand for.
    for &(n, k) in &[(1usize, 128usize), (37, 200), (256, 15), (300, 4096), (64, 11008)] {
        for bits in [3u32, 2] {
            for group in [32usize, 128] {
                let (w, wf) = random_dense(n, k, bits, group, (n * 7 + k + bits as usize) as u64);
                let dw = gpu.upload_dense(&w)?;
                let mut r = Rng(11);
                let x: Vec<f16> =
                    (0..w.k).map(|i| if i < k { f16::from_f32(r.uniform() * 4.0) } else { f16::ZERO }).collect();
                let bias: Vec<f16> = (0..n).map(|_| f16::from_f32(r.uniform())).collect();
                let (dx, db) = (gpu.stream.clone_htod(&x).map_err(err)?, gpu.stream.clone_htod(&bias).map_err(err)?);
                for inst in [format!("sqil_q{bits}_gemv_s4_r4"), format!("sqil_q{bits}_gemv_b1")] {
                    let mut dy = gpu.stream.alloc_zeros::<f16>(n).map_err(err)?;
                    gpu.qd_gemv_instance(&gpu.stream, &dw, &dx, Some(&db), &mut dy, false, (&inst, 4))?;
                    let y = gpu.stream.clone_dtoh(&dy).map_err(err)?;
                    let (mut worst, mut scale) = (0f32, 1e-6f32);
                    for row in 0..n {
                        let want: f32 =
                            (0..w.k).map(|c| x[c].to_f32() * wf[row * w.k + c]).sum::<f32>() + bias[row].to_f32();
                        scale = scale.max(want.abs());
                        worst = worst.max((y[row].to_f32() - want).abs());
                    }
                    let rel = worst / scale;
                    let pass = rel <= 2e-3;
                    ok &= pass;
                    println!(
                    "{{\"check\": \"{inst}\", \"n\": {n}, \"k\": {k}, \"group\": {group}, \"max_rel_err\": {rel:.2e}, \"pass\": {pass}}}"
                );
                }
            }
        }
    }
    let shapes: &[(usize, usize)] = if small {
        &[(1, 128), (3, 256), (37, 200), (256, 15), (5, 4096), (3, 8192)]
    } else {
        &[(1, 128), (3, 256), (37, 200), (256, 15), (4096, 4096), (1000, 11008)]
    };
    for &(n, k) in shapes {
        let w = random_q4(n, k, (n * 31 + k) as u64);
        let wd = dequantize(&w);
        let dw = gpu.upload(&w)?;
        let mut r = Rng(7);
        let bias: Vec<f16> = (0..n).map(|_| f16::from_f32(r.uniform())).collect();
        let db = gpu.stream.clone_htod(&bias).map_err(err)?;
        for batch in 1..=16usize {
            let x: Vec<f16> = (0..batch * w.k)
                .map(|i| if i % w.k < k { f16::from_f32(r.uniform() * 4.0) } else { f16::ZERO })
                .collect();
            let dx = gpu.stream.clone_htod(&x).map_err(err)?;
            let mut dy = gpu.stream.alloc_zeros::<f16>(batch * n).map_err(err)?;
            gpu.q4_gemv(&dw, &dx, Some(&db), &mut dy, batch)?;
            let y = gpu.stream.clone_dtoh(&dy).map_err(err)?;
            let mut worst = 0f32;
            let mut scale = 1e-6f32;
            for b in 0..batch {
                for row in 0..n {
                    let want: f32 =
                        (0..w.k).map(|c| x[b * w.k + c].to_f32() * wd[row * w.k + c]).sum::<f32>() + bias[row].to_f32();
                    scale = scale.max(want.abs());
                    worst = worst.max((y[b * n + row].to_f32() - want).abs());
                }
            }
            let rel = worst / scale;
            // fp16 output (2^-11 relative) and half2 partial sums of eight products.
            let pass = rel <= 2e-3;
            ok &= pass;
            if !pass || batch == 1 || batch == 16 {
                println!(
                    "{{\"check\": \"q4_gemv\", \"n\": {n}, \"k\": {k}, \"batch\": {batch}, \"max_rel_err\": {rel:.2e}, \"pass\": {pass}}}"
                );
            }
            // W4A8 on the int8 tensor cores, against the same math on the CPU: each token
            // quantized to int8 (max |x| / 127, round half to even), exact products.
            let mut scratch = gpu.w4a8_scratch(w.k)?;
            gpu.q4_gemm_w4a8(&dw, &dx, Some(&db), &mut dy, batch, &mut scratch)?;
            let y8 = gpu.stream.clone_dtoh(&dy).map_err(err)?;
            let (mut worst8, mut scale8) = (0f32, 1e-6f32);
            for b in 0..batch {
                let xr = &x[b * w.k..(b + 1) * w.k];
                let m = xr.iter().fold(0f32, |m, v| m.max(v.to_f32().abs()));
                let sx = if m > 0.0 { m / 127.0 } else { 1.0 };
                let xq: Vec<f32> =
                    xr.iter().map(|v| (v.to_f32() / sx).round_ties_even().clamp(-127.0, 127.0) * sx).collect();
                for row in 0..n {
                    let want: f32 = (0..w.k).map(|c| xq[c] * wd[row * w.k + c]).sum::<f32>() + bias[row].to_f32();
                    scale8 = scale8.max(want.abs());
                    worst8 = worst8.max((y8[b * n + row].to_f32() - want).abs());
                }
            }
            let rel8 = worst8 / scale8;
            let pass8 = rel8 <= 2e-3;
            ok &= pass8;
            if !pass8 || batch == 1 || batch == 16 {
                println!(
                    "{{\"check\": \"q4_gemm_w4a8\", \"n\": {n}, \"k\": {k}, \"batch\": {batch}, \"max_rel_err\": {rel8:.2e}, \"pass\": {pass8}}}"
                );
            }
        }
    }
    Ok(ok)
}

/// How the L2 is emptied of a kernel's data before each timed call.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Flush {
    /// A 512 MiB memset: the L2 is left full of dirty lines, whose write-back competes with the
    /// timed kernel's reads.
    Memset,
    /// A kernel reading 512 MiB: the L2 is left holding clean lines.
    Read,
}

/// Times `f` `iters` times with CUDA events, the L2 flushed (a 512 MiB memset) before each.
fn time_flushed(
    gpu: &Gpu,
    flush: &mut CudaSlice<u8>,
    iters: usize,
    f: impl FnMut() -> Result<(), sqil_cuda::Error>,
) -> Result<f64, sqil_cuda::Error> {
    time_with(gpu, flush, Flush::Memset, iters, f)
}

/// [`time_flushed`] with a choice of flush.
fn time_with(
    gpu: &Gpu,
    flush: &mut CudaSlice<u8>,
    how: Flush,
    iters: usize,
    mut f: impl FnMut() -> Result<(), sqil_cuda::Error>,
) -> Result<f64, sqil_cuda::Error> {
    let reader = gpu.function("sqil_flush_read")?;
    let mut sink = gpu.stream.alloc_zeros::<u32>(1).map_err(err)?;
    let start = gpu.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(err)?;
    let end = gpu.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(err)?;
    for _ in 0..3 {
        f()?;
    }
    let mut times = vec![];
    for _ in 0..iters {
        match how {
            Flush::Memset => gpu.stream.memset_zeros(flush).map_err(err)?,
            Flush::Read => {
                let words = (flush.len() / 16) as u64;
                let cfg = LaunchConfig { grid_dim: (132 * 8, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
                let mut l = gpu.stream.launch_builder(&reader);
                l.arg(&*flush).arg(&words).arg(&mut sink);
                // SAFETY: the kernel reads `words` 16-byte words of `flush` and may write one u32.
                unsafe { l.launch(cfg) }.map_err(err)?;
            }
        }
        start.record(&gpu.stream).map_err(err)?;
        f()?;
        end.record(&gpu.stream).map_err(err)?;
        end.synchronize().map_err(err)?;
        times.push(start.elapsed_ms(&end).map_err(err)? as f64 * 1e-3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

fn cublas_gemv(
    blas: &CudaBlas,
    w: &CudaSlice<f16>,
    x: &CudaSlice<f16>,
    y: &mut CudaSlice<f16>,
    n: usize,
    k: usize,
    batch: usize,
) -> Result<(), sqil_cuda::Error> {
    // y[b, n] = x[b, :] . W[n, :]: column-major C (n x batch) = W^T(k x n as stored)^T x X (k x batch).
    let cfg = GemmConfig {
        transa: cublasOperation_t::CUBLAS_OP_T,
        transb: cublasOperation_t::CUBLAS_OP_N,
        m: n as i32,
        n: batch as i32,
        k: k as i32,
        alpha: f16::ONE,
        lda: k as i32,
        ldb: k as i32,
        beta: f16::ZERO,
        ldc: n as i32,
    };
    // SAFETY: the buffers hold n*k, batch*k and batch*n values, as the config says.
    unsafe { blas.gemm(cfg, w, x, y) }.map_err(err)
}

fn bench_gemv(gpu: &Gpu, iters: usize) -> Result<(), sqil_cuda::Error> {
    let blas = CudaBlas::new(gpu.stream.clone()).map_err(err)?;
    let mut flush = gpu.stream.alloc_zeros::<u8>(512 << 20).map_err(err)?;
    let peak = peak_bw(&gpu.name);
    let mut scratch = gpu.w4a8_scratch(11008usize.div_ceil(GROUP) * GROUP)?;
    for &(n, k) in &[(4096usize, 4096usize), (11008, 4096), (4096, 11008), (8192, 8192)] {
        // Shapes as (out, in): "4096x11008" in the issue is in=4096 -> out=11008 and the reverse.
        let w = random_q4(n, k, 42);
        let dw: DeviceQ4 = gpu.upload(&w)?;
        let wf: Vec<f16> = dequantize(&w).iter().map(|&v| f16::from_f32(v)).collect();
        let dwf = gpu.stream.clone_htod(&wf).map_err(err)?;
        for batch in [1usize, 4, 16] {
            let x: Vec<f16> =
                (0..batch * k).map(|i| f16::from_f32(((i * 7919) % 1000) as f32 / 1000.0 - 0.5)).collect();
            let dx = gpu.stream.clone_htod(&x).map_err(err)?;
            let mut dy = gpu.stream.alloc_zeros::<f16>(batch * n).map_err(err)?;
            let t4 = time_flushed(gpu, &mut flush, iters, || gpu.q4_gemv(&dw, &dx, None, &mut dy, batch))?;
            let t16 = time_flushed(gpu, &mut flush, iters, || cublas_gemv(&blas, &dwf, &dx, &mut dy, n, k, batch))?;
            let t8 = time_flushed(gpu, &mut flush, iters, || {
                gpu.q4_gemm_w4a8(&dw, &dx, None, &mut dy, batch, &mut scratch)
            })?;
            let bytes4 = (n * k / 2 + n * k / GROUP * 2 + batch * (k + n) * 2) as f64;
            let bytes16 = (n * k * 2 + batch * (k + n) * 2) as f64;
            if batch == 1 {
                // Dense 3- and 2-bit weights (groups of 128) in the same run.
                for bits in [3u32, 2] {
                    let (wd, _) = random_dense(n, k, bits, GROUP, 42);
                    let dwd = gpu.upload_dense(&wd)?;
                    let tb = time_flushed(gpu, &mut flush, iters, || cublas_gemv(&blas, &dwf, &dx, &mut dy, n, k, 1))?;
                    let bytes = (n * k * bits as usize / 8 + n * k / GROUP * 2 + (k + n) * 2) as f64;
                    for inst in [format!("sqil_q{bits}_gemv_s4_r4"), format!("sqil_q{bits}_gemv_b1")] {
                        let t = time_flushed(gpu, &mut flush, iters, || {
                            gpu.qd_gemv_instance(&gpu.stream, &dwd, &dx, None, &mut dy, false, (&inst, 4))
                        })?;
                        println!(
                            "{{\"gpu\": {:?}, \"shape\": \"{k}->{n}\", \"batch\": 1, \"bits\": {bits}, \"kernel\": \"{inst}\", \"us\": {:.2}, \"gbs\": {:.0}, \"peak_frac\": {:.3}, \"cublas_f16_us\": {:.2}, \"speedup\": {:.2}}}",
                            gpu.name,
                            t * 1e6,
                            bytes / t / 1e9,
                            bytes / t / peak,
                            tb * 1e6,
                            tb / t
                        );
                    }
                }
            }
            println!(
                "{{\"gpu\": {:?}, \"shape\": \"{k}->{n}\", \"batch\": {batch}, \"q4_us\": {:.2}, \"q4_gbs\": {:.0}, \"q4_peak_frac\": {:.3}, \"cublas_f16_us\": {:.2}, \"cublas_gbs\": {:.0}, \"speedup\": {:.2}, \"w4a8_us\": {:.2}, \"w4a8_speedup\": {:.2}}}",
                gpu.name,
                t4 * 1e6,
                bytes4 / t4 / 1e9,
                bytes4 / t4 / peak,
                t16 * 1e6,
                bytes16 / t16 / 1e9,
                t16 / t4,
                t8 * 1e6,
                t16 / t8
            );
        }
    }
    Ok(())
}

/// Batch-1 GEMV variants against the default kernel and cuBLAS, under both flushes: one JSON
/// line per (shape, flush, variant), each variant's outputs checked equal to the default's.
fn bench_explore(gpu: &Gpu, iters: usize) -> Result<(), sqil_cuda::Error> {
    let blas = CudaBlas::new(gpu.stream.clone()).map_err(err)?;
    let mut flush = gpu.stream.alloc_zeros::<u8>(512 << 20).map_err(err)?;
    let peak = peak_bw(&gpu.name);
    // (entry point, rows per block, threads per block, batch)
    let variants: &[(&str, u32, u32, usize)] = &[
        ("sqil_q4_gemv_b1", 4, 128, 1),
        ("sqil_q4_gemv_s4_r4_b1", 4, 128, 1),
        ("sqil_q4_gemv_s2_r4_b1", 4, 64, 1),
        ("sqil_q4_gemv_s4_r2_b1", 2, 128, 1),
        ("sqil_q4_gemv_s4_r8_b1", 8, 128, 1),
        ("sqil_q4_gemv_s8_r4_b1", 4, 256, 1),
        ("sqil_q4_gemv_r4_b4", 16, 128, 4),
        ("sqil_q4_gemv_s4_r4_b4", 4, 128, 4),
        ("sqil_q4_gemv_s4_r2_b4", 2, 128, 4),
        ("sqil_q4_gemv_b16", 4, 128, 16),
        ("sqil_q4_mma_t2_s8", 16, 256, 16),
        ("sqil_q4_mma_t2_s8_p", 16, 256, 16),
        ("sqil_q4_mma_t4_s8_p", 32, 256, 16),
        ("sqil_q4_mma_t2_s8", 16, 256, 8),
        ("sqil_q4_mma_t2_s8_p", 16, 256, 8),
    ];
    for &(n, k) in &[(4096usize, 4096usize), (11008, 4096), (4096, 11008), (8192, 8192)] {
        let w = random_q4(n, k, 42);
        let dw: DeviceQ4 = gpu.upload(&w)?;
        let dwf = gpu.stream.alloc_zeros::<f16>(n * k).map_err(err)?;
        let x: Vec<f16> = (0..16 * k).map(|i| f16::from_f32(((i * 7919) % 1000) as f32 / 1000.0 - 0.5)).collect();
        let dx = gpu.stream.clone_htod(&x).map_err(err)?;
        let mut dy = gpu.stream.alloc_zeros::<f16>(16 * n).map_err(err)?;
        // The CPU reference of every variant's outputs (batch 16; smaller batches are its first
        // rows).
        let wd = dequantize(&w);
        let want: Vec<f32> = (0..16 * n)
            .map(|i| {
                let (b, r) = (i / n, i % n);
                (0..k).map(|c| wd[r * k + c] * x[b * k + c].to_f32()).sum()
            })
            .collect();
        let scale = want.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
        for how in [Flush::Memset, Flush::Read] {
            let tb = time_with(gpu, &mut flush, how, iters, || cublas_gemv(&blas, &dwf, &dx, &mut dy, n, k, 1))?;
            println!(
                "{{\"gpu\": {:?}, \"shape\": \"{k}->{n}\", \"flush\": \"{how:?}\", \"kernel\": \"cublas_f16\", \"us\": {:.2}, \"gbs\": {:.0}}}",
                gpu.name,
                tb * 1e6,
                (n * k * 2) as f64 / tb / 1e9
            );
            for &(name, rpb, threads, batch) in variants {
                let t = time_with(gpu, &mut flush, how, iters, || {
                    gpu.q4_gemv_instance(&gpu.stream, &dw, &dx, None, &mut dy, batch, false, (name, rpb, threads))
                })?;
                let got = gpu.stream.clone_dtoh(&dy).map_err(err)?;
                let diff = got[..batch * n].iter().zip(&want).map(|(a, b)| (a.to_f32() - b).abs()).fold(0f32, f32::max)
                    / scale;
                let bytes = (n * k / 2 + n * k / GROUP * 2 + batch * (k + n) * 2) as f64;
                println!(
                    "{{\"gpu\": {:?}, \"shape\": \"{k}->{n}\", \"flush\": \"{how:?}\", \"kernel\": \"{name}\", \"batch\": {batch}, \"threads\": {threads}, \"us\": {:.2}, \"gbs\": {:.0}, \"peak_frac\": {:.3}, \"vs_cublas_b1\": {:.2}, \"max_rel_diff\": {diff:.1e}}}",
                    gpu.name,
                    t * 1e6,
                    bytes / t / 1e9,
                    bytes / t / peak,
                    tb / t
                );
            }
            let mut scratch = gpu.w4a8_scratch(k)?;
            let batch = 16;
            for inst in [("sqil_q4_mma8_t2_s8", 16, 256), ("sqil_q4_mma8_t4_s8", 32, 256)] {
                let t = time_with(gpu, &mut flush, how, iters, || {
                    gpu.q4_gemm_w4a8_instance(&dw, &dx, None, &mut dy, batch, &mut scratch, inst)
                })?;
                println!(
                    "{{\"gpu\": {:?}, \"shape\": \"{k}->{n}\", \"flush\": \"{how:?}\", \"kernel\": \"{} (w4a8, with quantization)\", \"batch\": {batch}, \"us\": {:.2}, \"vs_cublas_b1\": {:.2}}}",
                    gpu.name,
                    inst.0,
                    t * 1e6,
                    tb / t
                );
            }
        }
    }
    Ok(())
}

fn bench_vla(gpu: &Gpu, layers: usize, iters: usize) -> Result<(), sqil_cuda::Error> {
    let (h, m) = (4096usize, 11008usize);
    // Per layer: q, k, v, o (h -> h), gate, up (h -> m), down (m -> h).
    let shapes = [(h, h), (h, h), (h, h), (h, h), (m, h), (m, h), (h, m)];
    let blas = CudaBlas::new(gpu.stream.clone()).map_err(err)?;
    let mut q4 = vec![];
    let mut f16w = vec![];
    for l in 0..layers {
        for (i, &(n, k)) in shapes.iter().enumerate() {
            let w = random_q4(n, k, (l * 7 + i) as u64 + 1);
            q4.push(gpu.upload(&w)?);
            // The FP16 baseline's weights (values do not matter for timing).
            f16w.push(gpu.stream.alloc_zeros::<f16>(n * k).map_err(err)?);
        }
    }
    let xin = gpu.stream.alloc_zeros::<f16>(m).map_err(err)?;
    let mut yout = gpu.stream.alloc_zeros::<f16>(m).map_err(err)?;
    let mut flush = gpu.stream.alloc_zeros::<u8>(512 << 20).map_err(err)?;
    let t4 = time_flushed(gpu, &mut flush, iters, || {
        for w in &q4 {
            gpu.q4_gemv(w, &xin, None, &mut yout, 1)?;
        }
        Ok(())
    })?;
    let t16 = time_flushed(gpu, &mut flush, iters, || {
        for (w, &(n, k)) in f16w.iter().zip(shapes.iter().cycle()) {
            cublas_gemv(&blas, w, &xin, &mut yout, n, k, 1)?;
        }
        Ok(())
    })?;
    let params: usize = shapes.iter().map(|(n, k)| n * k).sum::<usize>() * layers;
    let bytes4 = params as f64 * (0.5 + 2.0 / GROUP as f64);
    let peak = peak_bw(&gpu.name);
    println!(
        "{{\"gpu\": {:?}, \"vla_layers\": {layers}, \"params\": {params}, \"q4_ms_per_token\": {:.3}, \"cublas_f16_ms_per_token\": {:.3}, \"speedup\": {:.2}, \"q4_bandwidth_limit_ms\": {:.3}, \"q4_frac_of_limit\": {:.3}}}",
        gpu.name,
        t4 * 1e3,
        t16 * 1e3,
        t16 / t4,
        bytes4 / peak * 1e3,
        bytes4 / peak / t4
    );
    Ok(())
}

/// A compiled policy on the GPU: agreement with the CPU runtime on the given states, then
/// per-action latency (copy in, steps, copy out) eager and from the CUDA graph, and the CPU
/// runtime's, in one run.
fn bench_policy(
    gpu: &Gpu,
    artifact: &str,
    states: &[String],
    iters: usize,
    profile: bool,
    prefixes: bool,
) -> Result<(), sqil_cuda::Error> {
    use ndarray_npy::ReadNpyExt;
    let policy = sqil_runtime::Policy::load(std::path::Path::new(artifact)).map_err(|e| e.to_string())?;
    let sizes = policy.input_sizes();
    if states.len() != sizes.len() {
        return Err(format!("{artifact}: {} inputs, {} state files", sizes.len(), states.len()).into());
    }
    let mut per_input = vec![];
    for p in states {
        let f = std::fs::File::open(p).map_err(|e| sqil_cuda::Error::Device(format!("{p}: {e}")))?;
        let a = ndarray::ArrayD::<f32>::read_npy(f).map_err(|e| sqil_cuda::Error::Device(format!("{p}: {e}")))?;
        per_input.push(a.iter().copied().collect::<Vec<f32>>());
    }
    let rows = per_input.iter().zip(&sizes).map(|(v, d)| v.len() / d).min().unwrap_or(0).min(64);
    // Per state: its inputs concatenated (the GPU policy's one copy in) and as CPU feeds.
    let state = |r: usize| -> Vec<f32> {
        per_input.iter().zip(&sizes).flat_map(|(v, &d)| v[r * d..(r + 1) * d].iter().copied()).collect()
    };
    let cpu = |r: usize| -> Result<Vec<f32>, sqil_cuda::Error> {
        let feeds = per_input
            .iter()
            .zip(policy.input_shapes())
            .zip(&sizes)
            .map(|((v, shape), &d)| {
                let dims: Vec<usize> =
                    shape.iter().enumerate().map(|(i, x)| if i == 0 { 1 } else { x.known().unwrap_or(1) }).collect();
                sqil_ir::Tensor::from_f32(dims, v[r * d..(r + 1) * d].to_vec())
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        // Several outputs: one action vector, concatenated in order (as the GPU policy writes it).
        Ok(policy.run(&feeds).map_err(|e| e.to_string())?.iter().flat_map(|t| t.data.to_f32_vec()).collect())
    };
    use sqil_cuda::policy::Mode;
    // Where the setup's time goes (stderr, one JSON line per phase).
    let t_setup = std::time::Instant::now();
    let phase = |what: &str| {
        eprintln!("{{\"policy\": {artifact:?}, \"phase\": {what:?}, \"s\": {:.2}}}", t_setup.elapsed().as_secs_f64())
    };
    let mut gp = sqil_cuda::policy::GpuPolicy::new(gpu, &policy)?;
    phase("upload and compile");
    let eager: Vec<Vec<f32>> = (0..rows).map(|r| gp.act(gpu, &state(r))).collect::<Result<_, _>>()?;
    phase("launches");
    gp.capture(gpu)?;
    phase("capture and choice");
    let chosen = gp.mode();
    let (mut worst, mut scale) = (0f32, 1e-6f32);
    for (r, first) in eager.iter().enumerate() {
        let s = state(r);
        let want = cpu(r)?;
        // Launches, graph replay and the persistent program compute the same bits.
        let mut got = vec![];
        for mode in [Mode::Graph, Mode::Persistent] {
            if gp.set_mode(mode).is_ok() {
                got = gp.act(gpu, &s)?;
                if got != *first {
                    return Err(format!("{artifact}: state {r}: {mode:?} differs from launches").into());
                }
            }
        }
        for (g, w) in got.iter().zip(&want) {
            scale = scale.max(w.abs());
            worst = worst.max((g - w).abs());
        }
    }
    let rel = worst / scale;
    phase("check against the CPU");
    let time = |f: &mut dyn FnMut() -> Result<(), sqil_cuda::Error>| -> Result<f64, sqil_cuda::Error> {
        for _ in 0..20 {
            f()?;
        }
        let mut t = vec![];
        for _ in 0..iters {
            let t0 = std::time::Instant::now();
            f()?;
            t.push(t0.elapsed().as_secs_f64());
        }
        t.sort_by(f64::total_cmp);
        Ok(t[t.len() / 2])
    };
    let s0 = state(0);
    if profile {
        // The same policy (profile switches it to launches and back): a second policy's steps
        // would wait forever behind this one's running persistent program.
        for (label, us) in gp.profile(gpu, &s0, 50)? {
            println!("{{\"gpu\": {:?}, \"policy\": {artifact:?}, \"step\": {label:?}, \"us\": {us:.2}}}", gpu.name);
        }
        phase("profile");
    }
    // Per action, state in and action out through host memory, each path in turn.
    let chosen_grid = gp.persistent_grid();
    let mut per_mode = vec![];
    for (mode, cluster) in
        [(Mode::Steps, false), (Mode::Graph, false), (Mode::Persistent, false), (Mode::Persistent, true)]
    {
        if gp.has_persistent() {
            gp.set_mode(Mode::Steps)?;
            let _ = gp.set_persistent_cluster(cluster);
            gp.set_persistent_blocks(None)?;
        }
        let ok = gp.persistent_grid().is_none_or(|g| g.1 == cluster) || mode != Mode::Persistent;
        if ok && gp.set_mode(mode).is_ok() {
            per_mode.push(format!("{:.2}", time(&mut || gp.act(gpu, &s0).map(|_| ()))? * 1e6));
        } else {
            per_mode.push("null".into());
        }
    }
    // The program capped at 1, 2, 4 and 8 blocks, over the grid barrier and as one cluster (forms
    // capture does not try: they measured slower): "blocks" or "cluster blocks".
    let mut capped = vec![];
    if gp.has_persistent() {
        for cluster in [false, true] {
            gp.set_mode(Mode::Steps)?;
            if gp.set_persistent_cluster(cluster).is_err() {
                continue;
            }
            let full = {
                gp.set_persistent_blocks(None)?;
                gp.persistent_grid().map_or(0, |g| g.0)
            };
            for cap in [1u32, 2, 4, 8].into_iter().filter(|&c| c < full) {
                gp.set_mode(Mode::Steps)?;
                gp.set_persistent_blocks(Some(cap))?;
                if gp.set_mode(Mode::Persistent).is_ok() {
                    let us = time(&mut || gp.act(gpu, &s0).map(|_| ()))? * 1e6;
                    capped.push(format!("\"{}{cap}\": {us:.2}", if cluster { "cluster " } else { "" }));
                }
            }
        }
    }
    gp.set_mode(Mode::Steps)?;
    if let Some((blocks, c)) = chosen_grid {
        gp.set_persistent_cluster(c)?;
        gp.set_persistent_blocks(Some(blocks))?;
    }
    gp.set_mode(chosen)?;
    let t_act = time(&mut || gp.act(gpu, &s0).map(|_| ()))?;
    let t_cpu = time(&mut || cpu(0).map(|_| ()))?;
    println!(
        "{{\"gpu\": {:?}, \"policy\": {artifact:?}, \"steps\": {}, \"states\": {rows}, \"max_rel_err_vs_cpu\": {rel:.2e}, \"pass\": {}, \"mode\": \"{chosen:?}\", \"act_us\": {:.2}, \"eager_us\": {}, \"graph_us\": {}, \"persistent_us\": {}, \"cluster_us\": {}, \"capped_us\": {{{}}}, \"grid\": \"{:?}\", \"cpu_runtime_us\": {:.2}}}",
        gpu.name,
        gp.describe.len(),
        rel <= sqil_cuda::policy::GPU_TOL,
        t_act * 1e6,
        per_mode[0],
        per_mode[1],
        per_mode[2],
        per_mode[3],
        capped.join(", "),
        chosen_grid,
        t_cpu * 1e6
    );
    if rel > sqil_cuda::policy::GPU_TOL {
        return Err(format!("{artifact}: GPU vs CPU {rel:.2e} > GPU_TOL").into());
    }
    if prefixes && gp.has_persistent() {
        // Where the program's time goes: the program of the first n steps only (n = 0: the
        // handshake through host memory and the barrier that starts an action), in the chosen
        // form, per action. Its action is whatever the output buffer holds: timing only.
        let cluster = chosen_grid.is_some_and(|g| g.1);
        // Lowered once; each prefix is a copy cut after n of its steps.
        let whole = sqil_cuda::lower::lower(&policy)?;
        drop(gp);
        for n in 0..=whole.steps.len() {
            let mut l = whole.clone();
            l.steps.truncate(n);
            l.labels.truncate(n);
            l.describe.truncate(n);
            let last = l.labels.last().cloned().unwrap_or_else(|| "(handshake)".into());
            let mut p = sqil_cuda::policy::GpuPolicy::from_lowered(gpu, l)?;
            let _ = p.set_persistent_cluster(cluster);
            if p.set_mode(Mode::Persistent).is_err() {
                continue;
            }
            let us = time(&mut || p.act(gpu, &s0).map(|_| ()))? * 1e6;
            println!(
                "{{\"gpu\": {:?}, \"policy\": {artifact:?}, \"prefix\": {n}, \"cluster\": {cluster}, \"last_step\": {last:?}, \"us\": {us:.2}}}",
                gpu.name
            );
        }
    }
    Ok(())
}

/// Where a batch-1 GEMV's time goes, per benchmark shape and kind of L2 flush: the launch floor
/// (the split-K grid doing nothing), the split-K GEMV's weight reads alone (R = 2, 4 rows per
/// block), a grid-stride streaming read of the same bytes, the split-K GEMVs, and cuBLAS. The
/// weight reads bound any int4 GEMV of these weights from below.
fn bench_probe(gpu: &Gpu, iters: usize) -> Result<(), sqil_cuda::Error> {
    let blas = CudaBlas::new(gpu.stream.clone()).map_err(err)?;
    let mut flush = gpu.stream.alloc_zeros::<u8>(512 << 20).map_err(err)?;
    let mut sink = gpu.stream.alloc_zeros::<u32>(1).map_err(err)?;
    let peak = peak_bw(&gpu.name);
    let cfg = |grid: u32, threads: u32| LaunchConfig {
        grid_dim: (grid, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    for &(n, k) in &[(4096usize, 4096usize), (11008, 4096), (4096, 11008), (8192, 8192)] {
        let w = random_q4(n, k, 42);
        let dw: DeviceQ4 = gpu.upload(&w)?;
        let dwf = gpu.stream.alloc_zeros::<f16>(n * k).map_err(err)?;
        let x: Vec<f16> = (0..k).map(|i| f16::from_f32(((i * 7919) % 1000) as f32 / 1000.0 - 0.5)).collect();
        let dx = gpu.stream.clone_htod(&x).map_err(err)?;
        let mut dy = gpu.stream.alloc_zeros::<f16>(n).map_err(err)?;
        let bytes = (n * k / 2) as f64;
        let (ni, ki) = (n as i32, k as i32);
        let words = (n * k / 32) as u64;
        for how in [Flush::Memset, Flush::Read] {
            let mut rows: Vec<(String, f64)> = vec![];
            rows.push((
                "cublas_f16".into(),
                time_with(gpu, &mut flush, how, iters, || cublas_gemv(&blas, &dwf, &dx, &mut dy, n, k, 1))?,
            ));
            let (empty, reader) = (gpu.function("sqil_probe_empty")?, gpu.function("sqil_flush_read")?);
            for r in [2u32, 4] {
                let grid = (n as u32).div_ceil(r);
                let t = time_with(gpu, &mut flush, how, iters, || {
                    let mut l = gpu.stream.launch_builder(&empty);
                    l.arg(&mut sink);
                    // SAFETY: the kernel writes at most one u32 to `sink`.
                    unsafe { l.launch(cfg(grid, 128)) }.map(|_| ()).map_err(err)
                })?;
                rows.push((format!("empty grid ({grid} x 128)"), t));
                let rows_fn = gpu.function(&format!("sqil_probe_rows_r{r}"))?;
                let t = time_with(gpu, &mut flush, how, iters, || {
                    let mut l = gpu.stream.launch_builder(&rows_fn);
                    l.arg(&dw.words).arg(&ni).arg(&ki).arg(&mut sink);
                    // SAFETY: the kernel reads the n x k / 8 words of `dw.words` and may write `sink`.
                    unsafe { l.launch(cfg(grid, 128)) }.map(|_| ()).map_err(err)
                })?;
                rows.push((format!("weight reads alone, r{r}"), t));
            }
            for blocks in [132u32 * 4, 132 * 16] {
                let t = time_with(gpu, &mut flush, how, iters, || {
                    let mut l = gpu.stream.launch_builder(&reader);
                    l.arg(&dw.words).arg(&words).arg(&mut sink);
                    // SAFETY: reads `words` 16-byte words of `dw.words` (its n x k / 2 bytes).
                    unsafe { l.launch(cfg(blocks, 256)) }.map(|_| ()).map_err(err)
                })?;
                rows.push((format!("streaming read ({blocks} x 256)"), t));
            }
            for (name, rpb) in [("sqil_q4_gemv_s4_r2_b1", 2), ("sqil_q4_gemv_s4_r4_b1", 4)] {
                let t = time_with(gpu, &mut flush, how, iters, || {
                    gpu.q4_gemv_instance(&gpu.stream, &dw, &dx, None, &mut dy, 1, false, (name, rpb, 128))
                })?;
                rows.push((name.to_string(), t));
            }
            let tb = rows[0].1;
            for (what, t) in rows {
                println!(
                "{{\"gpu\": {:?}, \"shape\": \"{k}->{n}\", \"flush\": \"{how:?}\", \"probe\": {what:?}, \"us\": {:.2}, \"weight_gbs\": {:.0}, \"peak_frac\": {:.3}, \"vs_cublas\": {:.2}}}",
                gpu.name,
                t * 1e6,
                bytes / t / 1e9,
                bytes / t / peak,
                tb / t
            );
            }
        }
    }
    Ok(())
}

/// The fixed cost of one action, whatever the policy: a launch of an empty kernel and a stream
/// synchronisation; the same kernel reading 16 floats from page-locked host memory and writing
/// 16 back; a captured graph of 1 and of 5 empty kernels; and a persistent kernel answering a
/// sequence number written to host memory (the round trip with no launch at all).
fn bench_floor(gpu: &Gpu, iters: usize) -> Result<(), sqil_cuda::Error> {
    use cudarc::driver::{sys, LaunchConfig, PushKernelArg};
    let e = |e: cudarc::driver::DriverError| sqil_cuda::Error::Device(format!("{e:?}"));
    gpu.load_source(
        "sqil_probe",
        "extern \"C\" __global__ void sqil_probe_empty() {}\n\
         extern \"C\" __global__ void sqil_probe_rt(const float *in, float *out, int n) { const int i = threadIdx.x; if (i < n) out[i] = in[i] + 1.0f; }\n\
         extern \"C\" __global__ void sqil_probe_echo(volatile unsigned *seq, volatile unsigned *ack, unsigned rounds) {\n\
           if (threadIdx.x != 0) return;\n\
           for (unsigned r = 1; r <= rounds; r++) { while (seq[0] != r) {} ack[0] = r; __threadfence_system(); } }\n",
    )?;
    let stream = gpu.ctx.new_stream().map_err(e)?;
    let one = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (32, 1, 1), shared_mem_bytes: 0 };
    let empty = gpu.function("sqil_probe_empty")?;
    let rt = gpu.function("sqil_probe_rt")?;
    let echo = gpu.function("sqil_probe_echo")?;
    let med = |f: &mut dyn FnMut() -> Result<(), sqil_cuda::Error>| -> Result<f64, sqil_cuda::Error> {
        for _ in 0..50 {
            f()?;
        }
        let mut t = vec![];
        for _ in 0..iters {
            let t0 = std::time::Instant::now();
            f()?;
            t.push(t0.elapsed().as_secs_f64() * 1e6);
        }
        t.sort_by(f64::total_cmp);
        Ok(t[t.len() / 2])
    };
    let print = |what: &str, us: f64| println!("{{\"gpu\": {:?}, \"floor\": {what:?}, \"us\": {us:.2}}}", gpu.name);
    let t = med(&mut || {
        // SAFETY: an empty kernel.
        unsafe { stream.launch_builder(&empty).launch(one) }.map_err(e)?;
        stream.synchronize().map_err(e)
    })?;
    print("launch + sync", t);
    let flags = sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE;
    // SAFETY: zero-filled before use.
    let mut hin = unsafe { gpu.ctx.alloc_pinned_with_flags::<f32>(16, flags) }.map_err(e)?;
    let mut hout = unsafe { gpu.ctx.alloc_pinned_with_flags::<f32>(16, flags) }.map_err(e)?;
    hin.as_mut_slice().map_err(e)?.fill(1.0);
    hout.as_mut_slice().map_err(e)?.fill(0.0);
    let dptr = |p: *mut f32| -> Result<u64, sqil_cuda::Error> {
        let mut d = 0u64;
        // SAFETY: p is mapped page-locked memory of this context.
        unsafe { sys::cuMemHostGetDevicePointer_v2(&mut d, p as *mut _, 0).result().map_err(e)? };
        Ok(d)
    };
    let (din, dout) = (dptr(hin.as_mut_ptr().map_err(e)?)?, dptr(hout.as_mut_ptr().map_err(e)?)?);
    let n = 16i32;
    let t = med(&mut || {
        let mut l = stream.launch_builder(&rt);
        l.arg(&din).arg(&dout).arg(&n);
        // SAFETY: 16 floats each way in mapped host memory.
        unsafe { l.launch(one) }.map_err(e)?;
        stream.synchronize().map_err(e)
    })?;
    print("launch reading and writing host memory + sync", t);
    for nodes in [1usize, 5] {
        stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).map_err(e)?;
        for _ in 0..nodes {
            // SAFETY: an empty kernel.
            unsafe { stream.launch_builder(&empty).launch(one) }.map_err(e)?;
        }
        let g = stream
            .end_capture(sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH)
            .map_err(e)?
            .ok_or("empty graph")?;
        let t = med(&mut || {
            g.launch().map_err(e)?;
            stream.synchronize().map_err(e)
        })?;
        print(&format!("graph of {nodes} empty kernels + sync"), t);
    }
    // The persistent kernel: seq and ack in mapped host memory.
    let mut hs = unsafe { gpu.ctx.alloc_pinned_with_flags::<u32>(2, flags) }.map_err(e)?;
    hs.as_mut_slice().map_err(e)?.fill(0);
    let hp = hs.as_mut_ptr().map_err(e)?;
    let mut ds = 0u64;
    // SAFETY: mapped page-locked memory of this context.
    unsafe { sys::cuMemHostGetDevicePointer_v2(&mut ds, hp as *mut _, 0).result().map_err(e)? };
    let rounds = (iters + 50) as u32;
    let (dseq, dack) = (ds, ds + 4);
    let mut l = stream.launch_builder(&echo);
    l.arg(&dseq).arg(&dack).arg(&rounds);
    // SAFETY: two words of mapped host memory; the loop below answers every round.
    unsafe { l.launch(one) }.map_err(e)?;
    let mut r = 0u32;
    let t = med(&mut || {
        r += 1;
        // SAFETY: hp holds two u32 the kernel polls / writes; volatile accesses.
        unsafe {
            std::ptr::write_volatile(hp, r);
            let t0 = std::time::Instant::now();
            while std::ptr::read_volatile(hp.add(1)) != r {
                if t0.elapsed().as_secs() > 2 {
                    return Err("the persistent kernel did not answer".into());
                }
                std::hint::spin_loop();
            }
        }
        Ok(())
    })?;
    stream.synchronize().map_err(e)?;
    print("persistent kernel round trip", t);
    // The persistent program's handshake alone, in variants (one block of 256 threads, 64
    // values in, 8 out, host memory): 0 thread 0 polls a sequence word (volatile), the block
    // reads the values uncached, writes the action and a fenced answer word; 1 the block polls
    // tagged 64-bit words (ld.relaxed.sys, __syncthreads_and per round) and writes tagged words
    // (st.relaxed.sys); 2 as 1 with volatile loads and stores; 3 as 1 with thread 0 alone
    // polling the last word before the block reads all.
    gpu.load_source(
        "sqil_probe_hs",
        r#"
extern "C" __global__ void sqil_probe_hs(volatile unsigned *ctl, unsigned long long *obs, unsigned long long *act,
                                         float *buf, unsigned rounds, int mode)
{
    __shared__ int stop;
    for (unsigned want = 1; want <= rounds; want++) {
        if (mode == 0) {
            if (threadIdx.x == 0) { while (ctl[0] != want) {} }
            __syncthreads();
            if (threadIdx.x < 64) buf[threadIdx.x] = __ldcv((const float *)(obs + threadIdx.x));
            __syncthreads();
            if (threadIdx.x < 8) ((volatile float *)act)[threadIdx.x] = buf[threadIdx.x];
            __threadfence_system();
            __syncthreads();
            if (threadIdx.x == 0) ctl[1] = want;
            continue;
        }
        if (mode == 3 && threadIdx.x == 0) {
            unsigned long long v;
            do { asm volatile("ld.relaxed.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(obs + 63) : "memory"); } while ((unsigned)(v >> 32) != want);
        }
        for (;;) {
            int ok = 1;
            if (threadIdx.x < 64) {
                unsigned long long v;
                if (mode == 2) v = ((volatile unsigned long long *)obs)[threadIdx.x];
                else asm volatile("ld.relaxed.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(obs + threadIdx.x) : "memory");
                if ((unsigned)(v >> 32) != want) ok = 0; else buf[threadIdx.x] = __uint_as_float((unsigned)v);
            }
            if (threadIdx.x == 0) stop = ctl[0] == 0xffffffffu;
            if (__syncthreads_and(ok) || stop) break;
        }
        __syncthreads();
        if (threadIdx.x < 8) {
            const unsigned long long v = ((unsigned long long)want << 32) | __float_as_uint(buf[threadIdx.x]);
            if (mode == 2) ((volatile unsigned long long *)act)[threadIdx.x] = v;
            else asm volatile("st.relaxed.sys.global.u64 [%0], %1;" ::"l"(act + threadIdx.x), "l"(v) : "memory");
        }
    }
}
"#,
    )?;
    let hs = gpu.function("sqil_probe_hs")?;
    let scratch = stream.alloc_zeros::<f32>(64).map_err(e)?;
    for mode in 0..4i32 {
        let mut c = unsafe { gpu.ctx.alloc_pinned_with_flags::<u32>(2, flags) }.map_err(e)?;
        let mut o = unsafe { gpu.ctx.alloc_pinned_with_flags::<u64>(64, flags) }.map_err(e)?;
        let mut a = unsafe { gpu.ctx.alloc_pinned_with_flags::<u64>(8, flags) }.map_err(e)?;
        c.as_mut_slice().map_err(e)?.fill(0);
        o.as_mut_slice().map_err(e)?.fill(0);
        a.as_mut_slice().map_err(e)?.fill(0);
        let (cp, op, ap) = (c.as_mut_ptr().map_err(e)?, o.as_mut_ptr().map_err(e)?, a.as_mut_ptr().map_err(e)?);
        let dp = |p: *mut u8| -> Result<u64, sqil_cuda::Error> {
            let mut d = 0u64;
            // SAFETY: mapped page-locked memory of this context.
            unsafe { sys::cuMemHostGetDevicePointer_v2(&mut d, p as *mut _, 0).result().map_err(e)? };
            Ok(d)
        };
        let (dc, dob, da) = (dp(cp as *mut u8)?, dp(op as *mut u8)?, dp(ap as *mut u8)?);
        let rounds = (iters + 50) as u32;
        let mut l = stream.launch_builder(&hs);
        l.arg(&dc).arg(&dob).arg(&da).arg(&scratch).arg(&rounds).arg(&mode);
        let block = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the words above, mapped; the loop below feeds every round.
        unsafe { l.launch(block) }.map_err(e)?;
        let mut r = 0u32;
        let t = med(&mut || {
            r += 1;
            let t0 = std::time::Instant::now();
            // SAFETY: the mapped words above; atomics as the device reads / writes them whole.
            unsafe {
                for i in 0..64 {
                    std::sync::atomic::AtomicU64::from_ptr(op.add(i))
                        .store(((r as u64) << 32) | (i as f32).to_bits() as u64, std::sync::atomic::Ordering::Relaxed);
                }
                std::sync::atomic::AtomicU32::from_ptr(cp).store(r, std::sync::atomic::Ordering::Release);
                loop {
                    let ok = if mode == 0 {
                        std::ptr::read_volatile(cp.add(1)) == r
                    } else {
                        (0..8).all(|i| {
                            std::sync::atomic::AtomicU64::from_ptr(ap.add(i)).load(std::sync::atomic::Ordering::Relaxed)
                                >> 32
                                == r as u64
                        })
                    };
                    if ok {
                        break;
                    }
                    if t0.elapsed().as_secs() > 2 {
                        return Err(format!("handshake {mode}: no answer").into());
                    }
                }
            }
            Ok(())
        })?;
        stream.synchronize().map_err(e)?;
        print(&format!("handshake variant {mode}"), t);
    }
    // The persistent program's fixed cost (observation of 64 values in, 8 out) and its cost per
    // step: programs of 1, 4 and 16 empty steps (copy kernels with nothing to copy) over 1 to
    // 132 blocks, each step followed by the grid barrier.
    use sqil_cuda::lower::{KArg, LStep, Lowered};
    for grid in [1usize, 8, 32, 132] {
        for steps in [1usize, 4, 16] {
            let l = Lowered {
                bufs: vec![128],
                steps: (0..steps)
                    .map(|_| LStep::Kernel {
                        name: "sqil_copy_pairs".into(),
                        args: vec![KArg::Null, KArg::Null, KArg::Null, KArg::I32(0)],
                        threads: grid * 256,
                    })
                    .collect(),
                in_lens: vec![64],
                in_len: 64,
                output: 0,
                out_len: 8,
                out_lens: vec![8],
                describe: vec![],
                labels: vec![],
                sources: vec![],
            };
            let mut p = sqil_cuda::policy::GpuPolicy::from_lowered(gpu, l)?;
            for cluster in [false, true] {
                if p.set_persistent_cluster(cluster).is_err()
                    || p.set_mode(sqil_cuda::policy::Mode::Persistent).is_err()
                {
                    continue;
                }
                let obs = vec![0.5f32; 64];
                let t = med(&mut || p.act(gpu, &obs).map(|_| ()))?;
                let (g, c) = p.persistent_grid().unwrap_or((0, false));
                print(
                    &format!(
                        "persistent program: {steps} empty steps over {g} blocks{}",
                        if c { " (one cluster)" } else { "" }
                    ),
                    t,
                );
                p.set_mode(sqil_cuda::policy::Mode::Steps)?;
            }
        }
    }
    Ok(())
}

/// The CPU runtime's W4A8 arithmetic (what `sqil_q4_int` and `sqil_w4a8_mma` compute): per row
/// of `x` the levels of its static quantizer, per output and group the exact integer sum, `acc +=
/// float(sum) * scale` in group order, `* xscale`, `+ bias`, ReLU; a NaN input makes the row NaN.
#[allow(clippy::too_many_arguments)]
fn w4a8_reference(
    q: &[i8],
    scales: &[f32],
    (n, k, group): (usize, usize, usize),
    x: &[f32],
    batch: usize,
    quant: ActQuant,
    xscale: f32,
    bias: Option<&[f32]>,
    relu: bool,
) -> Vec<f32> {
    let groups = k.div_ceil(group);
    let mut y = vec![0f32; batch * n];
    for b in 0..batch {
        let row = &x[b * k..(b + 1) * k];
        let nan = row.iter().any(|v| v.is_nan());
        let lv: Vec<i32> = row
            .iter()
            .map(|&v| {
                ((v / quant.scale).round_ties_even() + quant.zero).clamp(quant.lo, quant.hi) as i32 - quant.zero as i32
            })
            .collect();
        for r in 0..n {
            let mut acc = 0f32;
            for g in 0..groups {
                let s: i32 = (g * group..((g + 1) * group).min(k)).map(|c| q[r * k + c] as i32 * lv[c]).sum();
                acc += s as f32 * scales[r * groups + g];
            }
            let mut out = acc * xscale;
            if let Some(bias) = bias {
                out += bias[r];
            }
            if relu && out < 0.0 {
                out = 0.0;
            }
            y[b * n + r] = if nan { f32::NAN } else { out };
        }
    }
    y
}

fn random_w4a8(n: usize, k: usize, group: usize, seed: u64) -> (Vec<i8>, Vec<f32>) {
    let mut r = Rng(seed | 1);
    let q: Vec<i8> = (0..n * k).map(|_| (r.next() % 16) as i8 - 8).collect();
    let s: Vec<f32> = (0..n * k.div_ceil(group)).map(|_| 0.01 + 0.02 * r.uniform().abs()).collect();
    (q, s)
}

/// Every exact W4A8 instance against [`w4a8_reference`], bit for bit: odd shapes (partial last
/// group, rows not a multiple of a block's), groups 32 to 512, an asymmetric and a symmetric
/// quantizer, bias and ReLU, and a NaN in one row.
fn check_w4a8(gpu: &Gpu) -> Result<bool, sqil_cuda::Error> {
    let mut ok = true;
    let quants = [
        ActQuant { scale: 4.0 / 255.0, zero: 131.0, lo: 0.0, hi: 255.0 },
        ActQuant { scale: 2.0 / 127.0, zero: 0.0, lo: -127.0, hi: 127.0 },
        ActQuant { scale: 0.01, zero: 0.0, lo: 0.0, hi: 255.0 },
    ];
    let mut scratch = gpu.w4a8_levels(4096)?;
    for &(n, k, group) in
        &[(37usize, 200usize, 32usize), (64, 128, 64), (100, 1000, 128), (300, 4096, 256), (33, 2048, 512), (8, 96, 32)]
    {
        let (q, sc) = random_w4a8(n, k, group, (n * 31 + k + group) as u64);
        let w = gpu.upload_w4a8(&q, &sc, n, k, group)?;
        let mut r = Rng(5 + n as u64);
        let bias: Vec<f32> = (0..n).map(|_| r.uniform()).collect();
        let db = gpu.stream.clone_htod(&bias).map_err(err)?;
        for (qi, &quant) in quants.iter().enumerate() {
            for batch in [1usize, 3, 8, 16] {
                let mut x: Vec<f32> = (0..batch * k).map(|_| r.uniform() * 2.5).collect();
                if batch == 3 {
                    x[k + k / 2] = f32::NAN;
                }
                let dx = gpu.stream.clone_htod(&x).map_err(err)?;
                let relu = qi == 1;
                let want = w4a8_reference(&q, &sc, (n, k, group), &x, batch, quant, 0.37, Some(&bias), relu);
                for (inst, &(name, .., half)) in W4A8_INSTANCES.iter().enumerate() {
                    if half && batch > 8 {
                        continue;
                    }
                    let mut dy = gpu.stream.alloc_zeros::<f32>(batch * n).map_err(err)?;
                    match gpu.w4a8_gemm(&w, &dx, quant, 0.37, Some(&db), relu, &mut dy, batch, &mut scratch, Some(inst))
                    {
                        Ok(()) => {}
                        // An instance whose warps cannot hold a whole group says so.
                        Err(e) if e.to_string().contains("shared memory") || e.to_string().contains("spans") => {
                            println!("{{\"check\": \"w4a8\", \"kernel\": \"{name}\", \"group\": {group}, \"skipped\": {:?}}}", e.to_string());
                            continue;
                        }
                        Err(e) => return Err(e),
                    }
                    let y = gpu.stream.clone_dtoh(&dy).map_err(err)?;
                    let bad = y
                        .iter()
                        .zip(&want)
                        .filter(|(a, b)| a.to_bits() != b.to_bits() && !(a.is_nan() && b.is_nan()))
                        .count();
                    ok &= bad == 0;
                    let first = y
                        .iter()
                        .zip(&want)
                        .position(|(a, b)| a.to_bits() != b.to_bits() && !(a.is_nan() && b.is_nan()));
                    let first = first
                        .map(|i| {
                            let same = want.iter().position(|v| v.to_bits() == y[i].to_bits());
                            // The levels as the kernel wrote them, against the host's layout.
                            let frag = gpu.stream.clone_dtoh(&scratch.frag).unwrap_or_default();
                            let kp = k.div_ceil(128) * 128;
                            let mut fbad = None;
                            let words = if half { 64 } else { 128 };
                            for (e, &word) in frag.iter().enumerate().take(kp / 32 * words) {
                                let (rr, lane, step) = if half {
                                    ((e & 1) << 1, (e >> 1) & 31, e >> 6)
                                } else {
                                    (e & 3, (e >> 2) & 31, e >> 7)
                                };
                                let token = (lane >> 2) + 8 * (rr & 1);
                                let kk = step * 32 + 4 * (lane & 3) + 16 * (rr >> 1);
                                let mut wd = 0u32;
                                for j in 0..4 {
                                    if token < batch && kk + j < k {
                                        let v = x[token * k + kk + j];
                                        if !v.is_nan() {
                                            let l = ((v / quant.scale).round_ties_even() + quant.zero)
                                                .clamp(quant.lo, quant.hi)
                                                - quant.lo;
                                            wd |= (l as u32 & 255) << (8 * j);
                                        }
                                    }
                                }
                                if wd != word && fbad.is_none() {
                                    fbad = Some(format!(
                                        "frag word {e} (token {token}, term {kk}): {word:08x} vs {wd:08x}"
                                    ));
                                }
                            }
                            format!(
                                "[{}, {}]: {} vs {} (equal to want[{same:?}]); {fbad:?}",
                                i / n,
                                i % n,
                                y[i],
                                want[i]
                            )
                        })
                        .unwrap_or_default();
                    println!(
                        "{{\"check\": \"w4a8\", \"kernel\": \"{name}\", \"shape\": \"{k}->{n}\", \"group\": {group}, \"quant\": {qi}, \"batch\": {batch}, \"outputs_differing\": {bad}, \"first\": {first:?}, \"pass\": {}}}",
                        bad == 0
                    );
                }
            }
        }
    }
    Ok(ok)
}

/// The exact W4A8 GEMM against cuBLAS FP16 and the weight-read floor, batches 1, 4 and 16, L2
/// flushed (memset) before each call: JSON lines; every instance's outputs equal the reference.
fn bench_w4a8(gpu: &Gpu, iters: usize, shapes: usize, only: Option<&str>) -> Result<(), sqil_cuda::Error> {
    let blas = CudaBlas::new(gpu.stream.clone()).map_err(err)?;
    let mut flush = gpu.stream.alloc_zeros::<u8>(512 << 20).map_err(err)?;
    let mut sink = gpu.stream.alloc_zeros::<u32>(1).map_err(err)?;
    let reader = gpu.function("sqil_flush_read")?;
    let rows_r4 = gpu.function("sqil_probe_rows_r4")?;
    let mut scratch = gpu.w4a8_levels(11008)?;
    let quant = ActQuant { scale: 1.0 / 255.0, zero: 128.0, lo: 0.0, hi: 255.0 };
    for &(n, k) in [(4096usize, 4096usize), (11008, 4096), (4096, 11008), (8192, 8192)].iter().take(shapes) {
        let group = GROUP;
        let (q, sc) = random_w4a8(n, k, group, 42);
        let w = gpu.upload_w4a8(&q, &sc, n, k, group)?;
        let h = pack(&q, &sc, n, k);
        let dq: DeviceQ4 = gpu.upload(&h)?;
        let wf: Vec<f16> = dequantize(&h).iter().map(|&v| f16::from_f32(v)).collect();
        let dwf = gpu.stream.clone_htod(&wf).map_err(err)?;
        // The floor: the int4 bytes read alone, by a streaming grid and by the split-K GEMV's grid.
        let words = (n * k / 32) as u64;
        let (ni, ki) = (n as i32, k as i32);
        let t_stream = time_flushed(gpu, &mut flush, iters, || {
            let mut l = gpu.stream.launch_builder(&reader);
            l.arg(&dq.words).arg(&words).arg(&mut sink);
            let cfg = LaunchConfig { grid_dim: (132 * 16, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: reads `words` 16-byte words of `dq.words` (its n x k / 2 bytes) and may write `sink`.
            unsafe { l.launch(cfg) }.map(|_| ()).map_err(err)
        })?;
        let t_rows = time_flushed(gpu, &mut flush, iters, || {
            let mut l = gpu.stream.launch_builder(&rows_r4);
            l.arg(&dq.words).arg(&ni).arg(&ki).arg(&mut sink);
            let cfg =
                LaunchConfig { grid_dim: ((n as u32).div_ceil(4), 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: the kernel reads the n x k / 8 words of `dq.words` and may write `sink`.
            unsafe { l.launch(cfg) }.map(|_| ()).map_err(err)
        })?;
        let floor = t_stream.min(t_rows);
        for batch in [1usize, 4, 16] {
            let mut r = Rng(9 + batch as u64);
            let x: Vec<f32> = (0..batch * k).map(|_| r.uniform() * 0.5).collect();
            let xh: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
            let (dx, dxh) = (gpu.stream.clone_htod(&x).map_err(err)?, gpu.stream.clone_htod(&xh).map_err(err)?);
            let mut dy = gpu.stream.alloc_zeros::<f32>(batch * n).map_err(err)?;
            let mut dyh = gpu.stream.alloc_zeros::<f16>(batch * n).map_err(err)?;
            let want = w4a8_reference(&q, &sc, (n, k, group), &x, batch, quant, 0.5, None, false);
            let t_cublas =
                time_flushed(gpu, &mut flush, iters, || cublas_gemv(&blas, &dwf, &dxh, &mut dyh, n, k, batch))?;
            let t_w4a16 = time_flushed(gpu, &mut flush, iters, || gpu.q4_gemv(&dq, &dxh, None, &mut dyh, batch))?;
            for (inst, &(name, .., half)) in W4A8_INSTANCES.iter().enumerate() {
                if (half && batch > 8) || only.is_some_and(|o| !o.split(',').any(|p| name.contains(p))) {
                    continue;
                }
                let t_levels = time_flushed(gpu, &mut flush, iters, || {
                    gpu.w4a8_levels_into(&w, &dx, quant, batch, &mut scratch, half)
                })?;
                gpu.w4a8_gemm(&w, &dx, quant, 0.5, None, false, &mut dy, batch, &mut scratch, Some(inst))?;
                let y = gpu.stream.clone_dtoh(&dy).map_err(err)?;
                let bad = y.iter().zip(&want).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
                let t_total = time_flushed(gpu, &mut flush, iters, || {
                    gpu.w4a8_gemm(&w, &dx, quant, 0.5, None, false, &mut dy, batch, &mut scratch, Some(inst))
                })?;
                let t_mma = time_flushed(gpu, &mut flush, iters, || {
                    gpu.w4a8_mma(&w, 0.5, None, false, &mut dy, batch, &scratch, Some(inst))
                })?;
                println!(
                    "{{\"gpu\": {:?}, \"shape\": \"{k}->{n}\", \"batch\": {batch}, \"kernel\": \"{name}\", \"outputs_differing\": {bad}, \"w4a8_us\": {:.2}, \"w4a8_mma_only_us\": {:.2}, \"levels_us\": {:.2}, \"cublas_f16_us\": {:.2}, \"w4a16_gemv_us\": {:.2}, \"read_floor_us\": {:.2}, \"vs_cublas\": {:.2}, \"mma_only_vs_cublas\": {:.2}, \"vs_floor\": {:.2}}}",
                    gpu.name,
                    t_total * 1e6,
                    t_mma * 1e6,
                    t_levels * 1e6,
                    t_cublas * 1e6,
                    t_w4a16 * 1e6,
                    floor * 1e6,
                    t_cublas / t_total,
                    t_cublas / t_mma,
                    t_total / floor
                );
            }
        }
    }
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opt = |name: &str, d: usize| {
        args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(d)
    };
    let flag = |name: &str| args.iter().any(|a| a == name);
    let gpu = match Gpu::new() {
        Ok(g) => g,
        Err(e) => {
            println!("skipping: {e}");
            return;
        }
    };
    eprintln!("GPU: {} (compute capability {}.{})", gpu.name, gpu.cc.0, gpu.cc.1);
    let res = match args.first().map(String::as_str) {
        Some("check") | None => check(&gpu, flag("--small")).and_then(|ok| Ok(check_w4a8(&gpu)? && ok)).map(|ok| {
            if !ok {
                std::process::exit(1)
            }
        }),
        Some("gemv") => bench_gemv(&gpu, opt("--iters", 50)),
        Some("w4a8") => {
            let only = args.iter().position(|a| a == "--only").and_then(|i| args.get(i + 1));
            bench_w4a8(&gpu, opt("--iters", 50), opt("--shapes", 4), only.map(String::as_str))
        }
        Some("check-w4a8") => check_w4a8(&gpu).map(|ok| {
            if !ok {
                std::process::exit(1)
            }
        }),
        Some("explore") => bench_explore(&gpu, opt("--iters", 50)),
        Some("probe") => bench_probe(&gpu, opt("--iters", 50)),
        Some("floor") => bench_floor(&gpu, opt("--iters", 2000)),
        Some("vla") => bench_vla(&gpu, opt("--layers", 32), opt("--iters", 10)),
        Some("policy") if args.len() >= 3 => {
            let states: Vec<String> = args[2..].iter().take_while(|a| !a.starts_with("--")).cloned().collect();
            bench_policy(&gpu, &args[1], &states, opt("--iters", 500), flag("--profile"), flag("--prefixes"))
        }
        Some(other) => {
            Err(format!("unknown mode `{other}`: check, gemv, explore, vla or policy ARTIFACT STATES.npy").into())
        }
    };
    if let Err(e) = res {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
}
