//! The zoo encoders' inverted-residual blocks as the plan runs them, one core: a pointwise W4A8
//! expansion (HardSwish, then the depthwise's input quantizer) written straight into a depthwise
//! convolution (HardSwish after it) over four images (`depthwise_chain_images`), against the
//! expansion alone (`pointwise_q4q8_images`) measured in the same run: what the depthwise part
//! of the pass costs, per image.
//!
//!     cargo bench -p sqil-kernels-cpu --bench chain

mod common;
use common::*;
use sqil_kernels_cpu::generic::{ConvGeometry, DepthwiseArgs, DepthwiseTaps};
use sqil_kernels_cpu::{depthwise_chain_images, pointwise_q4q8_images, Chain, ChainIn, ChainOut, PackedQ4, Post};

fn main() {
    println!("expansion + depthwise blocks, four images, one core, kernels {:?}", sqil_kernels_cpu::isa());
    // (input channels, expanded channels, map side, kernel side, stride, what uses it)
    let blocks = [
        (16usize, 72usize, 21usize, 3usize, 2usize, "MobileNetV3 16 -> 72, 3 x 3 / 2 on 21 x 21"),
        (24, 96, 11, 5, 2, "MobileNetV3 24 -> 96, 5 x 5 / 2 on 11 x 11"),
        (40, 240, 6, 5, 1, "MobileNetV3 40 -> 240, 5 x 5 on 6 x 6"),
        (48, 288, 6, 5, 2, "MobileNetV3 48 -> 288, 5 x 5 / 2 on 6 x 6"),
        (96, 576, 3, 5, 1, "MobileNetV3 96 -> 576, 5 x 5 on 3 x 3"),
        (24, 144, 11, 3, 1, "MobileNetV2 24 -> 144, 3 x 3 on 11 x 11"),
    ];
    let images = 4;
    let reps = if arg("--only", usize::MAX) == usize::MAX { 200 } else { 20_000 };
    let fq = Post::FakeQuant { scale: 0.05, zero: -3.0, lo: -128.0, hi: 127.0 };
    // `--only I`: block I alone (for a profiler).
    let only = arg("--only", usize::MAX);
    for (i, &(k, n, side, ks, s, what)) in blocks.iter().enumerate() {
        if only != usize::MAX && i != only {
            continue;
        }
        let mut rnd = xorshift();
        let q: Vec<i8> = (0..n * k).map(|_| (rnd() % 16) as i8 - 8).collect();
        let scales: Vec<f32> = (0..n * k.div_ceil(32)).map(|_| 0.01 + (rnd() % 100) as f32 * 1e-4).collect();
        let w = PackedQ4::pack(&q, &scales, n, k, 32).unwrap();
        let bias: Vec<f32> = (0..n).map(|i| (i % 7) as f32 * 0.1 - 0.3).collect();
        let p = side * side;
        let planes: Vec<i8> = (0..k * p * images).map(|_| rnd() as i8).collect();
        let geo = ConvGeometry::square(side, ks, s, ks / 2);
        let ol = geo.output[0] * geo.output[0];
        let dk: Vec<f32> = (0..n * ks * ks).map(|i| ((i * 13 % 29) as f32) / 20.0 - 0.7).collect();
        let db: Vec<f32> = (0..n).map(|i| (i % 5) as f32 * 0.01).collect();
        let taps = DepthwiseTaps::new(&dk, n, ks * ks).unwrap();
        let dw_post = [Post::HardSwish];
        let dw = DepthwiseArgs { weights: &dk, geo: &geo, bias: Some(&db), post: &dw_post, taps: Some(&taps) };
        let pw_post = [Post::HardSwish, fq];
        let mut y = vec![0f32; images * n * ol];
        let chain = best_per_call_us(reps, || {
            let input =
                ChainIn::Pointwise { w: &w, planes: &planes, zero: 3, scale: 0.02, bias: Some(&bias), post: &pw_post };
            assert_eq!(depthwise_chain_images(images, input, &dw, ChainOut::Image(&mut y)), Chain::Done);
        }) / images as f64;
        let mut mid = vec![0f32; images * n * p];
        let expand = best_per_call_us(reps, || {
            assert!(pointwise_q4q8_images(&w, &planes, (images, p), 3, 0.02, Some(&bias), &pw_post, &mut mid))
        }) / images as f64;
        println!(
            "  {what}: the pass {chain:6.2} us/image, the expansion alone {expand:6.2}, the rest {:6.2} ({} outputs, {} taps)",
            chain - expand,
            n * ol,
            n * ol * ks * ks
        );
    }
}
