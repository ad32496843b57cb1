//! One W4A8 convolution read in place (the pixel CNN's int4 layers: 32 channels in and out, 3x3,
//! one scale per output channel and tap) against this core's int8 and f32 ceilings measured in
//! the same run (`sqil_kernels_cpu::peak`), and the CNN's spatial softmax, on one thread.
//!
//!     cargo bench -p sqil-kernels-cpu --bench conv [-- --side 39 --channels 32 --reps 200]

mod common;
use common::*;
use sqil_kernels_cpu::generic::QWindow;
use sqil_kernels_cpu::{conv_q4q8_windows, isa, peak, Layout, PackedQ4};
use std::time::Instant;

fn main() {
    let (side, ch, reps) = (arg("--side", 39), arg("--channels", 32), arg("--reps", 200));
    let (n, taps, out_side) = (32usize, 9usize, side - 2);
    let k = taps * ch;
    let mut rnd = common::xorshift();
    let q: Vec<i8> = (0..n * k).map(|_| (rnd() % 16) as i8 - 8).collect();
    let scales: Vec<f32> = (0..n * taps).map(|_| 0.01 + (rnd() % 100) as f32 * 1e-4).collect();
    let w = PackedQ4::pack(&q, &scales, n, k, ch).unwrap();
    // Channels innermost, sign bits flipped (the kernel's form).
    let image: Vec<i8> = (0..side * side * ch).map(|_| rnd() as i8).collect();
    let offsets: Vec<u32> = (0..out_side * out_side)
        .flat_map(|p| {
            let (r, c) = (p / out_side, p % out_side);
            (0..taps).map(move |t| (((r + t / 3) * side + c + t % 3) * ch) as u32)
        })
        .collect();
    let xs: Vec<QWindow> = offsets
        .chunks_exact(taps)
        .map(|o| QWindow { image: &image, offsets: o, run: ch, zero: 3, scale: 0.02 })
        .collect();
    let mut y = vec![0f32; n * xs.len()];
    let bias = vec![0.1f32; n];
    conv_q4q8_windows(&w, &xs, Some(&bias), &mut y, Layout::ChannelMajor);
    let t = (0..reps)
        .map(|_| {
            let t = Instant::now();
            conv_q4q8_windows(&w, &xs, Some(&bias), &mut y, Layout::ChannelMajor);
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min);
    let macs = (n * k * xs.len()) as f64;
    let (i8_peak, f32_peak) = (peak::int8_gmacs().unwrap_or(f64::NAN), peak::f32_gmacs().unwrap_or(f64::NAN));
    let rate = macs / t / 1e9;
    println!("conv 3x3 {ch}->{n} on {side}x{side}, kernels {:?}, one thread", isa());
    println!(
        "  W4A8 in place:  {:8.1} us  {:6.1} GMAC/s  ({:.0}% of the int8 ceiling)",
        t * 1e6,
        rate,
        100.0 * rate / i8_peak
    );
    println!(
        "  int8 ceiling ({}): {i8_peak:6.1} GMAC/s; f32 FMA ceiling {f32_peak:6.1} GMAC/s",
        peak::int8_instruction()
    );
    // The CNN's spatial softmax: 32 rows of 35 x 35 (sqil's exact f64 exponential).
    let x: Vec<f32> = (0..32 * 1225).map(|i| ((i * 7919) % 1000) as f32 * 0.01 - 5.0).collect();
    let mut out = vec![0f32; x.len()];
    let ts = (0..reps)
        .map(|_| {
            let t = Instant::now();
            sqil_kernels_cpu::generic::softmax_rows(&x, 1225, &mut out);
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min);
    println!("  softmax 32 x 1225:  {:8.1} us  {:5.2} ns per element", ts * 1e6, ts * 1e9 / x.len() as f64);
    std::hint::black_box(&out);
    std::hint::black_box(&y);
}
