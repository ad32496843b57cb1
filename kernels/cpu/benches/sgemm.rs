//! The policy GEMM (`sgemm_chain`: one FMA chain per output over k from +0) on the float layers
//! a quantized policy keeps (a first layer on the raw state, W4A16 by default; a transformer's
//! projections of float inputs), on one core, against `matrixmultiply` (the packed peer, its own
//! blocking and summation order) and this core's FMA ceiling measured in the same run.
//!
//!     cargo bench -p sqil-kernels-cpu --bench sgemm [-- --reps 50]

mod common;
use common::best_per_call_us;
use sqil_kernels_cpu::generic::{sgemm_chain, sgemm_packed};

fn main() {
    let ceiling = sqil_kernels_cpu::peak::f32_gmacs().unwrap_or(f64::NAN);
    println!("policy GEMM, one core, kernels {:?}; FMA ceiling {ceiling:.1} GMAC/s", sqil_kernels_cpu::isa());
    let reps = common::arg("--reps", 50);
    // (m rows, k, n, what uses it)
    let shapes = [
        (50usize, 256usize, 256usize, "ACT decoder query projection (50 tokens)"),
        (49, 256, 256, "ACT decoder memory projection (49 tokens)"),
        (64, 64, 1024, "4x1024 MLP first layer, batch 64"),
        (16, 64, 1024, "4x1024 MLP first layer, batch 16"),
        (64, 15, 256, "bc_hopper first layer, batch 64"),
        (4, 256, 256, "a float 256 -> 256 layer, batch 4"),
    ];
    let mut next = common::xorshift();
    for (m, k, n, what) in shapes {
        let mut draw = |len: usize| -> Vec<f32> { (0..len).map(|_| (next() % 2001) as f32 / 1000.0 - 1.0).collect() };
        let (a, b) = (draw(m * k), draw(k * n));
        let (mut c, mut peer) = (vec![0f32; m * n], vec![0f32; m * n]);
        let t = best_per_call_us(reps, || sgemm_chain(m, k, n, &a, (k, 1), &b, (n, 1), &mut c, (n, 1)));
        let tp = best_per_call_us(reps, || sgemm_packed(m, k, n, 1.0, &a, (k, 1), &b, (n, 1), 0.0, &mut peer, (n, 1)));
        // The definition, one output in four (the chains in order from +0).
        let exact = (0..m * n).step_by(4).all(|o| {
            let (i, j) = (o / n, o % n);
            let d = (0..k).fold(0f32, |acc, p| a[i * k + p].mul_add(b[p * n + j], acc));
            d.to_bits() == c[o].to_bits()
        });
        let macs = (m * k * n) as f64;
        println!(
            "  [{m:3} x {k:4}] x [{k:4} x {n:4}] {what}: {t:8.1} us ({:5.1} GMAC/s, {:3.0}% of the ceiling), matrixmultiply {tp:8.1} us: {:.2}x, {}",
            macs / t / 1e3,
            100.0 * macs / t / 1e3 / ceiling,
            tp / t,
            if exact { "the definition's bits" } else { "BITS DIFFER" }
        );
    }
}
