//! MaxPool's kernel (AVX2: eight outputs of a row at a time inside the plane) against the
//! definition written out here, bit for bit: geometries with padding, strides 1, 2 and 3,
//! dilations, planes narrower than a vector, NaN (first in a window or later), signed zeros; and
//! over several planes at once (the 2 x 2 / 2 window as pairs of rows). AveragePool's 2 x 2 / 2
//! rows the same way against its f64 chain.
//! And the strided copy (AVX2: 8 x 8 register transposes for a transposed source) against its
//! definition.

mod common;
use proptest::prelude::*;
use sqil_kernels_cpu::generic::{avg_pool_row_pairs, max_pool2d_f32, max_pool2d_planes, Pool2d};
use sqil_kernels_cpu::{copy_f32, copy_strided};

/// The definition: per output, the window's positions in row-major kernel order, padding
/// skipped; the first valid value, then each later one where `v > best`; -inf if none.
fn reference(plane: &[f32], g: &Pool2d) -> Vec<f32> {
    let mut out = vec![f32::NEG_INFINITY; g.oh * g.ow];
    for oy in 0..g.oh {
        for ox in 0..g.ow {
            let mut best: Option<f32> = None;
            for ky in 0..g.kh {
                for kx in 0..g.kw {
                    let y = (oy * g.sy + ky * g.dy) as isize - g.py as isize;
                    let x = (ox * g.sx + kx * g.dx) as isize - g.px as isize;
                    if y < 0 || x < 0 || y >= g.h as isize || x >= g.w as isize {
                        continue;
                    }
                    let v = plane[y as usize * g.w + x as usize];
                    best = Some(match best {
                        Some(b) if v > b => v,
                        Some(b) => b,
                        None => v,
                    });
                }
            }
            if let Some(b) = best {
                out[oy * g.ow + ox] = b;
            }
        }
    }
    out
}

/// `n` pool inputs from `seed`: NaN, signed zeros and -inf among eighths in [-4, 4) (ties and
/// NaN in every position of a window).
fn pool_values(seed: u64, n: usize) -> Vec<f32> {
    let mut next = common::xorshift(seed);
    (0..n)
        .map(|_| {
            let s = next();
            match s % 17 {
                0 => f32::NAN,
                1 => 0.0,
                2 => -0.0,
                3 => f32::NEG_INFINITY,
                _ => ((s >> 20) % 64) as f32 / 8.0 - 4.0,
            }
        })
        .collect()
}

/// The values' bits (NaN payloads as they are).
fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    #[test]
    fn max_pool_equals_the_definition(
        seed in any::<u64>(),
        (h, w) in (1usize..30, 1usize..40),
        (kh, kw) in (1usize..4, 1usize..4),
        (sy, sx) in (1usize..4, 1usize..4),
        (dy, dx) in (1usize..3, 1usize..3),
        (py, px) in (0usize..3, 0usize..3),
    ) {
        let (spy, spx) = ((kh - 1) * dy + 1, (kw - 1) * dx + 1);
        prop_assume!(h + 2 * py >= spy && w + 2 * px >= spx && py < spy && px < spx);
        let g = Pool2d {
            h, w, kh, kw, sy, sx, dy, dx, py, px,
            oh: (h + 2 * py - spy) / sy + 1,
            ow: (w + 2 * px - spx) / sx + 1,
        };
        let plane = pool_values(seed, h * w);
        let mut got = vec![1.5f32; g.oh * g.ow];
        max_pool2d_f32(&plane, &g, &mut got);
        prop_assert_eq!(bits(&got), bits(&reference(&plane, &g)), "{:?}", g);
    }

    #[test]
    fn average_pool_row_pairs_equal_the_definition(seed in any::<u64>(), rows in 1usize..6, w in 2usize..40) {
        // Values of every magnitude (the f64 sum rounds where exponents differ; +-2^60 and +-1
        // often in one window, where the order decides what cancels), NaN, infinities and signed
        // zeros; an odd width leaves its last column out.
        let ow = w / 2;
        let mut next = common::xorshift(seed);
        let src: Vec<f32> = (0..2 * rows * w)
            .map(|_| {
                let s = next();
                match s % 23 {
                    0 => f32::NAN,
                    1 => 0.0,
                    2 => -0.0,
                    3 => f32::INFINITY,
                    4 => 3.0e38,
                    // Far apart magnitudes: a sum's order decides what cancels.
                    5..=8 => [1.152_921_5e18, -1.152_921_5e18, 1.0, -1.0][(s % 23 - 5) as usize],
                    _ => f32::from_bits(((s >> 11) as u32 & 0x807f_ffff) | ((((s >> 40) % 60) as u32 + 100) << 23)),
                }
            })
            .collect();
        let mut got = vec![1.5f32; rows * ow];
        avg_pool_row_pairs(&src, w, ow, &mut got);
        let want: Vec<f32> = (0..rows * ow)
            .map(|i| {
                let (r, o) = (i / ow, i % ow);
                let at = |y: usize, x: usize| src[(2 * r + y) * w + 2 * o + x] as f64;
                let sum = [(0, 0), (0, 1), (1, 0), (1, 1)].iter().fold(-0.0f64, |acc, &(y, x)| acc + at(y, x));
                (sum / 4.0) as f32
            })
            .collect();
        let bits = |v: &[f32]| v.iter().map(|x| if x.is_nan() { 0x7fc0_0000 } else { x.to_bits() }).collect::<Vec<_>>();
        prop_assert_eq!(bits(&got), bits(&want));
    }

    #[test]
    fn max_pool_over_planes_equals_the_definition(
        seed in any::<u64>(),
        (h, w) in (1usize..20, 1usize..40),
        planes in 1usize..5,
        form in 0usize..3,
    ) {
        // The 2 x 2 / 2 window (rows paired across planes where h is even, an odd last row left
        // out), a 3 x 3 / 2 window with padding 1 (plane by plane), or a 2 x 2 / 2 window of
        // dilation 2 (with odd sides the classic window's output size: not taken for it).
        let g = match form {
            0 => {
                prop_assume!(h >= 2 && w >= 2);
                Pool2d { h, w, kh: 2, kw: 2, sy: 2, sx: 2, dy: 1, dx: 1, py: 0, px: 0, oh: h / 2, ow: w / 2 }
            }
            1 => Pool2d { h, w, kh: 3, kw: 3, sy: 2, sx: 2, dy: 1, dx: 1, py: 1, px: 1, oh: (h - 1) / 2 + 1, ow: (w - 1) / 2 + 1 },
            _ => {
                prop_assume!(h >= 3 && w >= 3);
                Pool2d { h, w, kh: 2, kw: 2, sy: 2, sx: 2, dy: 2, dx: 2, py: 0, px: 0, oh: (h - 3) / 2 + 1, ow: (w - 3) / 2 + 1 }
            }
        };
        let src = pool_values(seed, planes * h * w);
        let mut got = vec![1.5f32; planes * g.oh * g.ow];
        max_pool2d_planes(&src, planes, &g, &mut got);
        let want: Vec<f32> = src.chunks_exact(h * w).flat_map(|p| reference(p, &g)).collect();
        prop_assert_eq!(bits(&got), bits(&want), "{:?} x {}", g, planes);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    #[test]
    fn vector_copy_equals_the_slice_copy(len in 0usize..5000, from in 0usize..9, to in 0usize..9) {
        // Source and destination at every relative offset (the case `memcpy` is slow on), the
        // vector loop's lengths (1024 and up) and the tails; NaN bits kept.
        let src: Vec<f32> = (0..len + from).map(|i| if i % 7 == 3 { f32::from_bits(0x7fc0_1234) } else { i as f32 * 0.5 - 9.0 }).collect();
        let mut got = vec![0f32; len + to];
        copy_f32(&src[from..], &mut got[to..]);
        prop_assert_eq!(bits(&got[to..]), bits(&src[from..]));
        prop_assert!(got[..to].iter().all(|&v| v == 0.0));
    }

    #[test]
    fn strided_copy_equals_its_definition(rows in 1usize..40, cols in 1usize..40, pad in 0usize..5, transposed in any::<bool>()) {
        // A transposed source (`rs == 1`, `cs >= rows`) or a row-major one with padded rows.
        let (rs, cs) = if transposed { (1, rows + pad) } else { (cols + pad, 1) };
        let len = (rows - 1) * rs + (cols - 1) * cs + 1;
        let src: Vec<f32> = (0..len).map(|i| i as f32 * 0.25 - 3.0).collect();
        let mut got = vec![f32::NAN; rows * cols];
        copy_strided(&src, (rows, cols), (rs, cs), &mut got);
        let want: Vec<f32> = (0..rows * cols).map(|t| src[(t / cols) * rs + (t % cols) * cs]).collect();
        prop_assert_eq!(got, want);
    }
}
