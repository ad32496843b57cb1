//! W4A8 on a batch (the GEMM a batched policy layer runs): the packed Q4 kernel on `--batch`
//! inputs for several layer shapes of the same MAC count, against this core's int8 dot-product
//! ceiling (`peak::int8_gmacs`, measured in this run), on one thread.
//!
//!     cargo bench -p sqil-kernels-cpu --bench gemm [-- --batch 64 --group 64]
//!
//! The first four shapes keep `n * k` fixed and move the weight block of 32 channels (`32 k`
//! bytes) through the first two cache levels, so the printout separates the compute rate from the
//! weight reads; the last three are a transformer's (d 256, MLP 1024: the ACT decoder's, whose
//! 50 tokens are `--batch 50`), where the reduction is short and each block's epilogue counts.

mod common;
use common::*;
use sqil_kernels_cpu::{gemm_q4q8, isa, peak, quantize_input, PackedQ4};

fn main() {
    let batch = arg("--batch", 64);
    let group = arg("--group", 64);
    let mut rnd = common::xorshift();
    let peak = peak::int8_gmacs();
    println!(
        "W4A8 GEMM, batch {batch}, group {group}, one thread, kernels {:?}; int8 ceiling ({}) {}",
        isa(),
        peak::int8_instruction(),
        peak.map_or("not measured".into(), |p| format!("{p:.1} GMAC/s"))
    );
    // The fixed-size shapes, then a transformer's (d 256, MLP 1024: the ACT decoder's).
    for (n, k) in [(1024, 1024), (4096, 256), (256, 4096), (2048, 512), (256, 256), (1024, 256), (256, 1024)] {
        let q: Vec<i8> = (0..n * k).map(|_| (rnd() % 16) as i8 - 8).collect();
        let scales: Vec<f32> = (0..n * k / group).map(|_| 0.01 + (rnd() % 100) as f32 * 1e-4).collect();
        let w = PackedQ4::pack(&q, &scales, n, k, group).unwrap();
        let xs: Vec<_> = (0..batch)
            .map(|b| {
                let x: Vec<f32> = (0..k).map(|i| (((i + 7 * b) * 37) % 101) as f32 / 50.0 - 1.0).collect();
                quantize_input(&x, 0.02, -3, &w)
            })
            .collect();
        let mut y = vec![0f32; batch * n];
        let t = best(20, || gemm_q4q8(&w, &xs, None, &mut y, 1));
        let gmacs = (batch * n * k) as f64 / t / 1e9;
        let of_peak = peak.map_or(String::new(), |p| format!("  {:.0}% of the ceiling", 100.0 * gmacs / p));
        println!("  [{n:5} x {k:5}]  {:8.1} us  {gmacs:6.1} GMAC/s{of_peak}", t * 1e6);
        std::hint::black_box(&y);
    }
}
