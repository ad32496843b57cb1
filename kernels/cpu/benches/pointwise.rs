//! The zoo encoders' 1 x 1 W4A8 convolutions (small maps, and three at 21 x 21 and 42 x 42), one core: one image's positions in
//! vector lanes (`pointwise_q4q8`) against several images' positions side by side in the lanes
//! (`pointwise_q4q8_images`), per image; the outputs compared bit for bit.
//!
//!     cargo bench -p sqil-kernels-cpu --bench pointwise

mod common;
use common::*;
use sqil_kernels_cpu::{pointwise_q4q8, pointwise_q4q8_images, PackedQ4};

fn main() {
    println!("1 x 1 W4A8 convolutions on small maps, one core, kernels {:?}", sqil_kernels_cpu::isa());
    // (output channels, input channels, positions, what uses it)
    let layers = [
        (576usize, 96usize, 9usize, "MobileNetV3 96 -> 576, 3 x 3"),
        (96, 576, 9, "MobileNetV3 576 -> 96, 3 x 3"),
        (96, 288, 9, "MobileNetV3 288 -> 96, 3 x 3"),
        (1280, 320, 9, "MobileNetV2 / EfficientNet-B0 head 320 -> 1280, 3 x 3"),
        (240, 40, 36, "MobileNetV3 40 -> 240, 6 x 6"),
        (40, 240, 36, "MobileNetV3 240 -> 40, 6 x 6"),
        (144, 24, 121, "24 -> 144, 11 x 11"),
        (48, 8, 1764, "8 -> 48, 42 x 42"),
        (8, 48, 1764, "48 -> 8, 42 x 42"),
        (96, 16, 441, "16 -> 96, 21 x 21"),
    ];
    for (n, k, p, what) in layers {
        let mut rnd = xorshift();
        let q: Vec<i8> = (0..n * k).map(|_| (rnd() % 16) as i8 - 8).collect();
        let groups = k.div_ceil(32);
        let scales: Vec<f32> = (0..n * groups).map(|_| 0.01 + (rnd() % 100) as f32 * 1e-4).collect();
        let w = PackedQ4::pack(&q, &scales, n, k, 32).unwrap();
        let bias: Vec<f32> = (0..n).map(|i| i as f32 * 0.01).collect();
        let mut line = format!("  {what}:");
        let mut one = 0.0;
        for images in [1usize, 2, 4, 8] {
            let planes: Vec<i8> = (0..k * p * images).map(|_| rnd() as i8).collect();
            let mut y = vec![0f32; n * p * images];
            let us = best_per_call_us(200, || {
                assert!(pointwise_q4q8_images(&w, &planes, (images, p), 3, 0.02, Some(&bias), &[], &mut y))
            }) / images as f64;
            let mut alone = vec![0f32; n * p * images];
            for (x, o) in planes.chunks_exact(k * p).zip(alone.chunks_exact_mut(n * p)) {
                assert!(pointwise_q4q8(&w, x, p, 3, 0.02, Some(&bias), &[], o));
            }
            let same = y.iter().zip(&alone).all(|(a, b)| a.to_bits() == b.to_bits());
            if images == 1 {
                one = us;
            }
            line +=
                &format!(" {images}: {us:6.2} us/image ({:.2}x{})", one / us, if same { "" } else { ", BITS DIFFER" });
        }
        println!("{line}");
    }
}
