//! The direct depthwise convolution against the general convolution's arithmetic (im2col with the
//! geometry's gather table, then `sgemm_chain` per channel), bit for bit, over random 1-D and 2-D
//! geometries: strides, dilations, padding (negative too: windows starting inside the input),
//! signed zeros and infinities among the values; each layer twice in a row (the second call on the
//! padding the first left). With AVX-512 the tests run once more in a child
//! process with `SQIL_ISA=avx2` (the 8-lane taps).

mod common;
use proptest::prelude::*;
use sqil_kernels_cpu::{depthwise_conv, im2col, sgemm_chain, ConvGeometry};

/// A random 1-D (`two_d` false: the row arguments ignored) or 2-D geometry, its output extent from
/// the padded input (pads at the end: `extra`), at least one position; None where the window
/// does not fit. Returns the geometry, the effective (input rows, kernel rows) and the output.
#[allow(clippy::type_complexity)]
fn geometry(
    two_d: bool,
    (h, w): (usize, usize),
    (kh, kw): (usize, usize),
    (sh, sw): (usize, usize),
    (dh, dw): (usize, usize),
    (ph, pw): (isize, isize),
    extra: usize,
) -> Option<(ConvGeometry, (usize, usize), (usize, usize))> {
    let (h, kh, sh, dh, ph) = if two_d { (h, kh, sh, dh, ph) } else { (1, 1, 1, 1, 0) };
    let span = |n: usize, p: isize, k: usize, d: usize| n as isize + p + extra as isize - ((k - 1) * d + 1) as isize;
    let (oh, ow) = (span(h, ph, kh, dh), span(w, pw, kw, dw));
    if oh < 0 || ow < 0 || ph <= -(kh as isize) || pw <= -(kw as isize) {
        return None;
    }
    let (oh, ow) = (if two_d { oh as usize / sh + 1 } else { 1 }, ow as usize / sw + 1);
    let geo = if two_d {
        ConvGeometry {
            input: vec![h, w],
            kernel: vec![kh, kw],
            strides: vec![sh, sw],
            dilations: vec![dh, dw],
            pads_begin: vec![ph, pw],
            output: vec![oh, ow],
        }
    } else {
        ConvGeometry {
            input: vec![w],
            kernel: vec![kw],
            strides: vec![sw],
            dilations: vec![dw],
            pads_begin: vec![pw],
            output: vec![ow],
        }
    };
    Some((geo, (h, kh), (oh, ow)))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn depthwise_equals_im2col_and_the_chain(seed in any::<u64>(), channels in prop_oneof![1usize..40, 120usize..170], two_d in any::<bool>(),
                                             h in 1usize..12, w in 1usize..20, kh in 1usize..4, kw in 1usize..6,
                                             sh in 1usize..4, sw in 1usize..4, dh in 1usize..3, dw in 1usize..3,
                                             ph in -1isize..3, pw in -1isize..3, extra in 0usize..3) {
        let mut s = seed | 1;
        let mut r = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            match s % 89 {
                0 => -0.0,
                1 => f32::INFINITY,
                _ => ((s >> 11) as f64 / (1u64 << 53) as f64) as f32 * 4.0 - 2.0,
            }
        };
        let g = geometry(two_d, (h, w), (kh, kw), (sh, sw), (dh, dw), (ph, pw), extra);
        prop_assume!(g.is_some());
        let (geo, (h, kh), (oh, ow)) = g.unwrap();
        let (il, kl, ol) = (h * w, kh * kw, oh * ow);
        let x: Vec<f32> = (0..channels * il).map(|_| r()).collect();
        let k: Vec<f32> = (0..channels * kl).map(|_| r()).collect();
        let table = geo.gather_table();
        let mut want = vec![0f32; channels * ol];
        let mut cols = vec![0f32; kl * ol];
        for c in 0..channels {
            im2col(&x[c * il..(c + 1) * il], 1, &table, &geo, &mut cols);
            sgemm_chain(1, kl, ol, &k[c * kl..(c + 1) * kl], (kl, 1), &cols, (ol, 1), &mut want[c * ol..(c + 1) * ol], (ol, 1));
        }
        let mut got = vec![7f32; channels * ol];
        depthwise_conv(&x, &k, &geo, None, &[], &mut got);
        let bits = |v: &[f32]| v.iter().map(|x| if x.is_nan() { u32::MAX } else { x.to_bits() }).collect::<Vec<_>>();
        prop_assert_eq!(bits(&got), bits(&want));
        // The same layer again (the next image; the kernel finds the padding it zeroed for the
        // first call still zero and keeps it): the same outputs.
        let mut again = vec![7f32; channels * ol];
        depthwise_conv(&x, &k, &geo, None, &[], &mut again);
        prop_assert_eq!(bits(&again), bits(&want), "the same layer a second time");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(100))]

    /// 3 x 3 depthwise layers (MobileNet's) on rows of 1-40 output columns and 1-49 channels (the
    /// vector loops' every remainder), strides 1 and 2, padding 0 and 1: the chain's bits; with
    /// an epilogue, the chain plus the channel's bias (one f32 addition) through the ops' scalar
    /// definitions (Clip; Clip then a FakeQuant whose levels the outputs cross; a chain of no
    /// single form; SiLU and HardSwish).
    #[test]
    fn three_by_three_depthwise_equals_the_chain(seed in any::<u64>(), channels in 1usize..50, h in 3usize..12,
                                                  w in 3usize..42, s in 1usize..3, p in 0isize..2,
                                                  epilogue in 0usize..5) {
        use sqil_kernels_cpu::{post_one, Post};
        let mut st = seed | 1;
        let mut r = move || {
            st ^= st << 13;
            st ^= st >> 7;
            st ^= st << 17;
            match st % 89 {
                0 => -0.0,
                1 => f32::INFINITY,
                _ => ((st >> 11) as f64 / (1u64 << 53) as f64) as f32 * 4.0 - 2.0,
            }
        };
        let (geo, _, (oh, ow)) = geometry(true, (h, w), (3, 3), (s, s), (1, 1), (p, p), 0).expect("a 3 x 3 window fits");
        let (il, ol) = (h * w, oh * ow);
        let x: Vec<f32> = (0..channels * il).map(|_| r()).collect();
        let k: Vec<f32> = (0..channels * 9).map(|_| r()).collect();
        let table = geo.gather_table();
        let mut want = vec![0f32; channels * ol];
        let mut cols = vec![0f32; 9 * ol];
        for c in 0..channels {
            im2col(&x[c * il..(c + 1) * il], 1, &table, &geo, &mut cols);
            sgemm_chain(1, 9, ol, &k[c * 9..(c + 1) * 9], (9, 1), &cols, (ol, 1), &mut want[c * ol..(c + 1) * ol], (ol, 1));
        }
        let b: Vec<f32> = (0..channels).map(|_| r()).collect();
        let (bias, post): (Option<&[f32]>, &[Post]) = match epilogue {
            0 => (None, &[]),
            1 => (Some(&b), &[Post::Clip(0.0, 6.0)]),
            2 => (Some(&b), &[Post::Clip(-1.0, 6.0), Post::FakeQuant { scale: 0.05, zero: 3.0, lo: -128.0, hi: 127.0 }]),
            // Not one of the kernel's forms: op by op in registers.
            3 => (Some(&b), &[Post::FakeQuant { scale: 0.05, zero: 3.0, lo: -128.0, hi: 127.0 }, Post::LeakyRelu(0.1)]),
            // SiLU and HardSwish run over the outputs after the kernel.
            _ => (Some(&b), &[Post::Clip(-1.0, 6.0), Post::Silu, Post::HardSwish]),
        };
        if let Some(b) = bias {
            for (i, v) in want.iter_mut().enumerate() {
                *v = post_one(*v + b[i / ol], post);
            }
        }
        let mut got = vec![7f32; channels * ol];
        depthwise_conv(&x, &k, &geo, bias, post, &mut got);
        let bits = |v: &[f32]| v.iter().map(|x| if x.is_nan() { u32::MAX } else { x.to_bits() }).collect::<Vec<_>>();
        prop_assert_eq!(bits(&got), bits(&want));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// im2col computed from the geometry (1-D and 2-D) against the gather table's definition, bit
    /// for bit: strides, dilations, padding (negative too), several channels.
    #[test]
    fn direct_im2col_equals_the_table(seed in any::<u64>(), channels in 1usize..5, two_d in any::<bool>(),
                                       h in 1usize..12, w in 1usize..20, kh in 1usize..4, kw in 1usize..6,
                                       sh in 1usize..4, sw in 1usize..4, dh in 1usize..3, dw in 1usize..3,
                                       ph in -1isize..3, pw in -1isize..3, extra in 0usize..3) {
        let mut s = seed | 1;
        let mut r = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            if s % 53 == 0 { -0.0 } else { ((s >> 11) as f64 / (1u64 << 53) as f64) as f32 * 4.0 - 2.0 }
        };
        let g = geometry(two_d, (h, w), (kh, kw), (sh, sw), (dh, dw), (ph, pw), extra);
        prop_assume!(g.is_some());
        let (geo, (h, kh), (oh, ow)) = g.unwrap();
        let x: Vec<f32> = (0..channels * h * w).map(|_| r()).collect();
        let table = geo.gather_table();
        let n = channels * kh * kw * oh * ow;
        let (mut want, mut got) = (vec![7f32; n], vec![9f32; n]);
        sqil_kernels_cpu::generic::im2col_table(&x, channels, &table, &geo, &mut want);
        im2col(&x, channels, &table, &geo, &mut got);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        prop_assert_eq!(bits(&got), bits(&want));
    }
}

#[test]
fn the_avx2_form_agrees_too() {
    common::rerun_under_avx2(&["depthwise_equals_im2col_and_the_chain", "three_by_three_depthwise_equals_the_chain"]);
}
