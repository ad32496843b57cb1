//! The direct first-layer convolution (`conv_direct_run`) against the path it replaces, im2col
//! then the policy GEMM (`sgemm_chain`), bit for bit: random 1-D and 2-D geometries (strides,
//! dilations, padding on either side or negative, windows up to 7 x 7), one to four input
//! channels, inputs with NaN, infinities and signed zeros, with and without a bias, with and without
//! the input's quantizer applied as the planes are copied. Run once on this CPU's kernels and
//! once more in a child process with `SQIL_ISA=avx2` (the 8-lane form).

mod common;
use proptest::prelude::*;
use sqil_kernels_cpu::generic::{conv_direct_f32, conv_direct_run, fake_quant_into, im2col, sgemm_chain, ConvGeometry};

/// The output extent of one axis (None: no output).
fn extent(input: usize, k: usize, s: usize, d: usize, pb: isize, pe: isize) -> Option<usize> {
    let span = (d * (k - 1) + 1) as isize;
    let room = input as isize + pb + pe - span;
    (room >= 0).then(|| room as usize / s + 1)
}

fn check(geo: &ConvGeometry, c: usize, m: usize, seed: u64) {
    let (kl, ol, il) = (geo.kernel_len(), geo.output_len(), geo.input_len());
    // Specials in one case of four: a NaN or an infinity reaches every output whose window holds it.
    let x = common::values(seed, c * il, seed.is_multiple_of(4));
    let w = common::values(seed ^ 0x5555, m * c * kl, false);
    // The input's quantizer in one case of three (levels the values cross, NaN kept): the
    // kernel's outputs are the convolution of the quantized image.
    let quant = (seed % 3 == 2).then_some((0.05f32, 3.0f32, -128.0f32, 127.0f32));
    let mut xq = x.clone();
    if let Some((s, z, lo, hi)) = quant {
        fake_quant_into(&x, s, z, lo, hi, &mut xq);
    }
    let mut cols = vec![0f32; c * kl * ol];
    im2col(&xq, c, &geo.gather_table(), geo, &mut cols);
    let mut want = vec![0f32; m * ol];
    sgemm_chain(m, c * kl, ol, &w, (c * kl, 1), &cols, (ol, 1), &mut want, (ol, 1));
    // A bias in one case of two: added after each chain, as the convolution's bias pass does.
    let bias = common::values(seed ^ 0x3333, m, false);
    let bias = (seed % 2 == 1).then_some(&bias[..]);
    if let Some(b) = bias {
        for (row, bv) in want.chunks_exact_mut(ol).zip(b) {
            row.iter_mut().for_each(|v| *v += bv);
        }
    }
    let mut got = vec![f32::NAN; m * ol];
    assert!(conv_direct_run((&x, quant), c, &w, m, geo, bias, &mut got), "not run: {geo:?}");
    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
        assert!(a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()), "{geo:?} c{c} m{m}: output {i} {a} vs {b}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn direct_convolution_equals_im2col_and_gemm(
        seed in any::<u64>(), two_d in any::<bool>(), c in 1usize..5, m in 1usize..21,
        h in 1usize..14, w in 1usize..40, kh in 1usize..8, kw in 1usize..8, sh in 1usize..4, sw in 1usize..4,
        dh in 1usize..3, dw in 1usize..3, pads in prop::array::uniform4(-1isize..4),
    ) {
        let (h, kh, sh, dh) = if two_d { (h, kh, sh, dh) } else { (1, 1, 1, 1) };
        let (Some(oh), Some(ow)) = (extent(h, kh, sh, dh, pads[0], pads[2]), extent(w, kw, sw, dw, pads[1], pads[3])) else {
            return Ok(());
        };
        let geo = if two_d {
            ConvGeometry { input: vec![h, w], kernel: vec![kh, kw], strides: vec![sh, sw], dilations: vec![dh, dw],
                           pads_begin: vec![pads[0], pads[1]], output: vec![oh, ow] }
        } else {
            ConvGeometry { input: vec![w], kernel: vec![kw], strides: vec![sw], dilations: vec![dw],
                           pads_begin: vec![pads[1]], output: vec![ow] }
        };
        check(&geo, c, m, seed);
    }
}

#[test]
fn stems_of_the_zoo_equal_im2col_and_gemm() {
    for (h, m, k, s, p) in [(96, 64, 7, 2, 3), (84, 16, 3, 2, 1), (84, 32, 3, 2, 1), (64, 24, 5, 1, 2)] {
        for seed in [6, 7] {
            check(&ConvGeometry::square(h, k, s, p), 3, m, seed);
        }
    }
}

#[test]
fn declines_what_it_cannot_run_or_would_not_speed_up() {
    let geo = ConvGeometry::square(8, 3, 1, 1);
    let x = vec![1f32; 5 * 64];
    let mut out = vec![0f32; 32 * 64];
    // Five input channels: im2col's.
    assert!(!conv_direct_run((&x, None), 5, &vec![0.5; 32 * 5 * 9], 32, &geo, None, &mut out));
    // A weight that is not finite (a padding tap's 0 * inf is NaN on the gathered path).
    let mut w = vec![0.5f32; 8 * 9];
    w[4] = f32::INFINITY;
    assert!(!conv_direct_run((&x, None), 1, &w, 8, &geo, None, &mut out));
    // A 1 x 1 convolution: im2col is a copy there, and the GEMM is faster.
    let one = ConvGeometry::square(8, 1, 1, 0);
    assert!(!conv_direct_f32((&x, None), 3, &[0.5; 32 * 3], 32, &one, None, &mut out));
    // 3 x 3 to 32 and 64 channels: taken with AVX-512, not with AVX2 (im2col and the GEMM
    // measured as fast or faster there); to 128 on both.
    let avx2 = sqil_kernels_cpu::isa() == sqil_kernels_cpu::Isa::Avx2;
    let mut wide = vec![0f32; 128 * 64];
    assert_eq!(conv_direct_f32((&x, None), 3, &[0.5; 64 * 27], 64, &geo, None, &mut wide), !avx2, "a 3 x 3 stem to 64");
    assert!(
        conv_direct_f32((&x, None), 3, &[0.5; 128 * 27], 128, &geo, None, &mut wide),
        "a 3 x 3 stem to 128 is taken"
    );
    assert_eq!(conv_direct_f32((&x, None), 3, &[0.5; 32 * 27], 32, &geo, None, &mut out), !avx2, "a 3 x 3 stem to 32");
    // A 5 x 5 window to 16 channels (testdata's NHWC CNN's stem): taken on both.
    let five = ConvGeometry::square(8, 5, 2, 2);
    assert!(conv_direct_f32((&x, None), 3, &[0.5; 16 * 75], 16, &five, None, &mut out), "a 5 x 5 stem to 16 is taken");
}

#[test]
fn the_avx2_form_agrees_too() {
    common::rerun_under_avx2(&["direct_convolution_equals_im2col_and_gemm", "stems_of_the_zoo_equal_im2col_and_gemm"]);
}
