//! An image encoder's first convolution (three input channels, stride 2) on one core: the
//! direct kernel (`conv_direct_f32`) against im2col then the policy GEMM (`sgemm_chain`), the
//! path it replaces, measured in the same run; the two outputs compared bit for bit. Layers where
//! `conv_direct_takes` declines run direct here anyway, to show why they are declined.
//!
//!     cargo bench -p sqil-kernels-cpu --bench stem [-- --only I [--quant 1]]

mod common;
use common::best_per_call_us;
use sqil_kernels_cpu::generic::{conv_direct_run, conv_direct_takes, im2col, sgemm_chain, ConvGeometry};

fn main() {
    println!("first-layer convolutions, one core, kernels {:?}", sqil_kernels_cpu::isa());
    // (input channels, image side, output channels, kernel side, stride, padding, what uses it)
    let layers = [
        (3usize, 96usize, 64usize, 7usize, 2usize, 3usize, "ResNet-18 stem (96 x 96)"),
        (3, 84, 16, 3, 2, 1, "MobileNetV3 stem (84 x 84)"),
        (3, 84, 32, 3, 2, 1, "MobileNetV2 / EfficientNet-B0 stem (84 x 84)"),
        (3, 84, 64, 3, 1, 1, "3 x 3 / 1 to 64 (84 x 84)"),
        (4, 64, 128, 3, 1, 1, "RGB-D 3 x 3 / 1 to 128 (64 x 64)"),
        (1, 96, 32, 5, 2, 2, "grey 5 x 5 / 2 to 32 (96 x 96)"),
        (3, 64, 16, 5, 2, 2, "testdata NHWC CNN 5 x 5 / 2 to 16 (64 x 64)"),
        (3, 84, 64, 1, 1, 0, "1 x 1 to 64 (84 x 84)"),
    ];
    // `--only I`: layer I alone, the direct kernel only, many more calls (for a profiler).
    let only = common::arg("--only", usize::MAX);
    for (i, (c, h, m, k, s, p, what)) in layers.into_iter().enumerate() {
        if only != usize::MAX {
            if i == only {
                profile_direct(c, h, m, k, s, p);
            }
            continue;
        }
        let geo = ConvGeometry::square(h, k, s, p);
        let o = geo.output[0];
        let x: Vec<f32> = (0..c * h * h).map(|i| ((i * 37 % 101) as f32) / 50.0 - 1.0).collect();
        let w: Vec<f32> = (0..m * c * k * k).map(|i| ((i * 13 % 29) as f32) / 20.0 - 0.7).collect();
        let (kl, ol) = (k * k, o * o);
        let (mut gemm_out, mut direct_out) = (vec![0f32; m * ol], vec![0f32; m * ol]);
        let mut cols = vec![0f32; c * kl * ol];
        let table = geo.gather_table();
        let t_gemm = best_per_call_us(200, || {
            im2col(&x, c, &table, &geo, &mut cols);
            sgemm_chain(m, c * kl, ol, &w, (c * kl, 1), &cols, (ol, 1), &mut gemm_out, (ol, 1));
        });
        let t_direct =
            best_per_call_us(200, || assert!(conv_direct_run((&x, None), c, &w, m, &geo, None, &mut direct_out)));
        let macs = (m * c * kl * ol) as f64;
        let same = gemm_out.iter().zip(&direct_out).all(|(a, b)| a.to_bits() == b.to_bits());
        println!(
            "  {what}: im2col + GEMM {t_gemm:7.1} us ({:5.1} GMAC/s), direct {t_direct:7.1} us ({:5.1} GMAC/s): {:.2}x, {}, taken: {}",
            macs / t_gemm / 1e3,
            macs / t_direct / 1e3,
            t_gemm / t_direct,
            if same { "same bits" } else { "BITS DIFFER" },
            conv_direct_takes(kl, m)
        );
    }
}

/// Layer `(c, h, m, k, s, p)` by the direct kernel alone, 20 000 calls (`--only`).
fn profile_direct(c: usize, h: usize, m: usize, k: usize, s: usize, p: usize) {
    let geo = ConvGeometry::square(h, k, s, p);
    let o = geo.output[0];
    let x: Vec<f32> = (0..c * h * h).map(|i| ((i * 37 % 101) as f32) / 50.0 - 1.0).collect();
    let w: Vec<f32> = (0..m * c * k * k).map(|i| ((i * 13 % 29) as f32) / 20.0 - 0.7).collect();
    let mut out = vec![0f32; m * o * o];
    // `--quant 1`: through an int8 input quantizer, as a quantized policy's first layer.
    let quant = (common::arg("--quant", 0) == 1).then_some((0.02f32, 0.0f32, -128.0f32, 127.0f32));
    let t = best_per_call_us(20_000, || assert!(conv_direct_run((&x, quant), c, &w, m, &geo, None, &mut out)));
    println!("  direct {t:.1} us per call");
}
