//! Batch-1 GEMV on a layer far larger than the last-level cache: the packed Q4 kernels (W4A8 and
//! weight-only on f32 activations) against f32 GEMV (matrixmultiply) on the same shape, and
//! against the bandwidth of a plain streaming read of the same number of bytes, all measured in
//! this run with the same thread count.
//!
//!     cargo bench -p sqil-kernels-cpu --bench gemv [-- --threads 2 --n 16384 --k 16384]
//!
//! Effective bandwidth counts every byte a kernel must read: packed weights, group scales and
//! group sums (W4A8), and the activations.

mod common;
use common::*;
use sqil_kernels_cpu::{gemv_q4f32, gemv_q4q8, isa, quantize_input, sgemm, PackedQ4};

/// Sums `buf` on `threads` threads with 32-byte loads (the streaming-read reference).
fn stream_read(buf: &[u64], threads: usize) -> u64 {
    let chunk = buf.len().div_ceil(threads);
    std::thread::scope(|s| {
        let hs: Vec<_> = buf
            .chunks(chunk)
            .map(|c| {
                s.spawn(move || {
                    let mut acc = [0u64; 4];
                    for q in c.chunks_exact(4) {
                        for i in 0..4 {
                            acc[i] = acc[i].wrapping_add(q[i]);
                        }
                    }
                    acc.iter().fold(0u64, |a, &b| a.wrapping_add(b))
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).fold(0u64, u64::wrapping_add)
    })
}

fn main() {
    let threads = arg("--threads", 2);
    let (n, k) = (arg("--n", 16384), arg("--k", 16384));
    let group = 64;
    let mut rnd = common::xorshift();
    let q: Vec<i8> = (0..n * k).map(|_| (rnd() % 16) as i8 - 8).collect();
    let scales: Vec<f32> = (0..n * k / group).map(|_| 0.01 + (rnd() % 100) as f32 * 1e-4).collect();
    let w = PackedQ4::pack(&q, &scales, n, k, group).unwrap();
    drop(q);
    let x: Vec<f32> = (0..k).map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0).collect();
    let xq = quantize_input(&x, 0.02, 0, &w);
    let mut y = vec![0f32; n];
    let q4_bytes = w.bytes() as f64 + k as f64;
    let t_q4q8 = best(5, || gemv_q4q8(&w, &xq, None, &mut y, threads));
    let q4f_bytes = (w.blocks.len() * 16 + 4 * w.scales.len()) as f64 + 4.0 * k as f64;
    let t_q4f = best(5, || gemv_q4f32(&w, &x, None, &mut y, threads));
    drop(w);
    // The same number of bytes read plainly.
    let words = (q4_bytes as usize).div_ceil(8);
    let buf: Vec<u64> = (0..words as u64).collect();
    let mut sink = 0u64;
    let t_stream = best(5, || sink = sink.wrapping_add(stream_read(&buf, threads)));
    drop(buf);
    // f32 GEMV of the same shape (the FP32 peer): y = W x, W [n, k] row-major, 4 bytes per weight.
    let wf: Vec<f32> = (0..n * k).map(|i| ((i % 13) as f32 - 6.0) * 0.01).collect();
    let t_f32 = best(3, || sgemm(n, k, 1, 1.0, &wf, (k, 1), &x, (1, 1), 0.0, &mut y, (1, 1)));
    let gbs = |b: f64, t: f64| b / t / 1e9;
    let stream = gbs(q4_bytes, t_stream);
    println!("GEMV [{n} x {k}], group {group}, {threads} threads, kernels {:?}, {}", isa(), cpu_model());
    println!("  streaming read ({:.0} MiB):  {:8.3} ms  {:6.2} GB/s", q4_bytes / 1048576.0, t_stream * 1e3, stream);
    println!(
        "  W4A8  q4 x int8:            {:8.3} ms  {:6.2} GB/s  ({:.0}% of streaming read)",
        t_q4q8 * 1e3,
        gbs(q4_bytes, t_q4q8),
        100.0 * gbs(q4_bytes, t_q4q8) / stream
    );
    println!(
        "  W4A32 q4 x f32:             {:8.3} ms  {:6.2} GB/s  ({:.0}% of streaming read)",
        t_q4f * 1e3,
        gbs(q4f_bytes, t_q4f),
        100.0 * gbs(q4f_bytes, t_q4f) / stream
    );
    println!(
        "  f32 GEMV (matrixmultiply):  {:8.3} ms  {:6.2} GB/s; W4A8 speed-up over f32 {:.2}x",
        t_f32 * 1e3,
        gbs(4.0 * (n * k) as f64, t_f32),
        t_f32 / t_q4q8
    );
    std::hint::black_box(sink);
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}
