//! The zoo encoders' depthwise layers on one core: the direct kernel (`depthwise_conv`, the
//! lanes kernel the plan runs: the image into the padded position-major buffer, the taps, the
//! outputs back to planes) against the general convolution's path (im2col with the gather table,
//! then the per-channel chain, `sgemm_chain`), measured in the same run, the outputs compared bit
//! for bit, and against this core's f32 FMA ceiling (`peak::f32_gmacs`) measured first.
//!
//!     cargo bench -p sqil-kernels-cpu --bench depthwise

mod common;
use common::best_per_call_us;
use sqil_kernels_cpu::generic::{im2col, sgemm_chain, ConvGeometry};
use sqil_kernels_cpu::{depthwise_conv, peak};

fn main() {
    let ceiling = peak::f32_gmacs();
    println!(
        "depthwise layers, one core, kernels {:?}, f32 FMA ceiling {}",
        sqil_kernels_cpu::isa(),
        ceiling.map_or("unmeasured".into(), |c| format!("{c:.1} GMAC/s"))
    );
    // (channels, image side, kernel side, stride, what uses it)
    let layers = [
        (16usize, 42usize, 3usize, 1usize, "MobileNetV2 / V3 first block, 42 x 42"),
        (48, 42, 3, 2, "MobileNetV2 / EfficientNet-B0 expansion, 42 -> 21"),
        (96, 21, 3, 1, "MobileNetV2 96 channels, 21 x 21"),
        (96, 21, 5, 2, "EfficientNet-B0 5 x 5, 21 -> 11"),
        (144, 11, 3, 1, "144 channels, 11 x 11"),
        (288, 6, 3, 1, "288 channels, 6 x 6"),
        (576, 3, 5, 1, "MobileNetV3 last blocks, 576 channels, 3 x 3"),
    ];
    for (c, h, k, s, what) in layers {
        let geo = ConvGeometry::square(h, k, s, k / 2);
        let o = geo.output[0];
        let (il, kl, ol) = (h * h, k * k, o * o);
        let x: Vec<f32> = (0..c * il).map(|i| ((i * 37 % 101) as f32) / 50.0 - 1.0).collect();
        let w: Vec<f32> = (0..c * kl).map(|i| ((i * 13 % 29) as f32) / 20.0 - 0.7).collect();
        let (mut chain_out, mut direct_out) = (vec![0f32; c * ol], vec![0f32; c * ol]);
        let mut cols = vec![0f32; kl * ol];
        let table = geo.gather_table();
        let reps = (2_000_000 / (c * ol * kl)).clamp(20, 20_000);
        let t_chain = best_per_call_us(reps, || {
            for ch in 0..c {
                im2col(&x[ch * il..(ch + 1) * il], 1, &table, &geo, &mut cols);
                sgemm_chain(
                    1,
                    kl,
                    ol,
                    &w[ch * kl..(ch + 1) * kl],
                    (kl, 1),
                    &cols,
                    (ol, 1),
                    &mut chain_out[ch * ol..(ch + 1) * ol],
                    (ol, 1),
                );
            }
        });
        let t_direct = best_per_call_us(reps, || depthwise_conv(&x, &w, &geo, None, &[], &mut direct_out));
        let macs = (c * kl * ol) as f64;
        let same = chain_out.iter().zip(&direct_out).all(|(a, b)| a.to_bits() == b.to_bits());
        let of =
            |t: f64| ceiling.map_or(String::new(), |p| format!(", {:.0}% of the ceiling", 100.0 * macs / t / 1e3 / p));
        println!(
            "  {what}: im2col + chain {t_chain:7.1} us, direct {t_direct:6.1} us ({:5.1} GMAC/s{}): {:.2}x, {}",
            macs / t_direct / 1e3,
            of(t_direct),
            t_chain / t_direct,
            if same { "same bits" } else { "BITS DIFFER" },
        );
    }
}
