//! Every Q4 kernel against its scalar reference, over random shapes, groups, zero points and
//! thread counts: W4A8 bit for bit (integer sums are exact and the float epilogue is shared),
//! W4 on f32 activations within `F32_ORDER_TOL` (only the summation order differs).

use proptest::prelude::*;
use sqil_kernels_cpu::generic::{generic_gemv_q4f32, generic_gemv_q4q8};
use sqil_kernels_cpu::{
    gemm_q4f32, gemm_q4q8, gemm_q4q8_rows, gemv_q4f32, gemv_q4q8, isa, quantize_input, Layout, PackedQ4,
};

struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }
    fn unit(&mut self) -> f32 {
        self.next() as f32 / (1u64 << 31) as f32 * 2.0 - 1.0
    }
}

fn layer(seed: u64, n: usize, k: usize, group: usize, bits: u32) -> PackedQ4 {
    let mut r = Lcg(seed);
    let half = 1i32 << (bits - 1);
    let q: Vec<i8> = (0..n * k).map(|_| (r.next() as i32 % (2 * half) - half) as i8).collect();
    let groups = PackedQ4::padded_k(k, group).checked_div(group).unwrap_or(1);
    let scales: Vec<f32> = (0..n * groups).map(|_| 0.01 + r.unit().abs() * 0.1).collect();
    PackedQ4::pack(&q, &scales, n, k, group).unwrap()
}

/// A batch of `batch` random inputs of `k` values quantized for `w` (scale 0.02, zero point
/// `zero(c)` for input c), and the reference outputs of each (`generic_gemv_q4q8`), `w.n` per input.
fn batch_and_reference(
    w: &PackedQ4,
    (k, batch): (usize, usize),
    r: &mut Lcg,
    zero: impl Fn(usize) -> i32,
    bias: Option<&[f32]>,
) -> (Vec<sqil_kernels_cpu::QuantizedInput>, Vec<f32>) {
    let xs: Vec<_> = (0..batch)
        .map(|c| {
            let x: Vec<f32> = (0..k).map(|_| r.unit() * 3.0).collect();
            quantize_input(&x, 0.02, zero(c), w)
        })
        .collect();
    let mut want = vec![0f32; batch * w.n];
    for (x, yc) in xs.iter().zip(want.chunks_mut(w.n)) {
        generic_gemv_q4q8(w, x, bias, yc);
    }
    (xs, want)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn q4q8_kernels_equal_the_reference(seed in any::<u64>(), n in 1usize..600, kb in 1usize..12, per_group in 0usize..3,
                                        zero in -20i32..20, bits in 2u32..5, threads in 1usize..4) {
        let k = kb * 64;
        let group = [0, 32, 64][per_group];
        let w = layer(seed, n, k, group, bits);
        let mut r = Lcg(seed ^ 7);
        let x: Vec<f32> = (0..k).map(|_| r.unit() * 3.0).collect();
        let xq = quantize_input(&x, 0.02, zero, &w);
        let bias: Vec<f32> = (0..n).map(|_| r.unit()).collect();
        let (mut want, mut got) = (vec![0f32; n], vec![0f32; n]);
        generic_gemv_q4q8(&w, &xq, Some(&bias), &mut want);
        gemv_q4q8(&w, &xq, Some(&bias), &mut got, threads);
        prop_assert_eq!(got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "isa {:?}", isa());
    }

    #[test]
    fn q4q8_batched_kernels_equal_the_reference(seed in any::<u64>(), n in 1usize..300, kb in 1usize..6, batch in 1usize..20,
                                                per_group in 0usize..3, threads in 1usize..4, shared in any::<bool>()) {
        let k = kb * 64;
        let w = layer(seed, n, k, [0, 32, 64][per_group], 4);
        // One zero point for the whole batch (a layer's static quantizer: the kernels' shared
        // corrections) or one per input.
        let zero = |c: usize| if shared { 4 } else { c as i32 - 3 };
        let (xs, want) = batch_and_reference(&w, (k, batch), &mut Lcg(seed ^ 5), zero, None);
        let mut got = vec![0f32; batch * n];
        gemm_q4q8(&w, &xs, None, &mut got, threads);
        prop_assert_eq!(got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
        // Channel-major output (a convolution's layout), threads over channels.
        let rows: Vec<_> = xs.iter().map(|x| x.row()).collect();
        let mut t = vec![0f32; batch * n];
        gemm_q4q8_rows(&w, &rows, None, &mut t, Layout::ChannelMajor, threads);
        for c in 0..batch {
            for r in 0..n {
                prop_assert_eq!(t[r * batch + c].to_bits(), want[c * n + r].to_bits(), "input {} channel {}", c, r);
            }
        }
        // Channel rows of a wider stride (a block of a convolution's positions), untouched gaps.
        let stride = batch + 3;
        let mut s = vec![-1f32; (n - 1) * stride + batch];
        gemm_q4q8_rows(&w, &rows, None, &mut s, Layout::ChannelStride(stride), threads);
        for (i, v) in s.iter().enumerate() {
            let (r, c) = (i / stride, i % stride);
            let want = if c < batch { want[c * n + r] } else { -1.0 };
            prop_assert_eq!(v.to_bits(), want.to_bits(), "strided: input {} channel {}", c, r);
        }
    }

    /// Batches of 16 or more (AMX tiles where the CPU has them), groups of 64, 128 or one per
    /// channel, a bias and a zero point per input or one for all.
    #[test]
    fn large_batches_equal_the_reference(seed in any::<u64>(), n in 1usize..200, kb in 1usize..6, batch in 16usize..70,
                                         per_group in 0usize..3, threads in 1usize..3, shared in any::<bool>()) {
        let k = kb * 128;
        let w = layer(seed, n, k, [0, 64, 128][per_group], 4);
        let mut r = Lcg(seed ^ 9);
        let bias: Vec<f32> = (0..n).map(|_| r.unit()).collect();
        let zero = |c: usize| if shared { -7 } else { (c % 41) as i32 - 20 };
        let (xs, want) = batch_and_reference(&w, (k, batch), &mut r, zero, Some(&bias));
        let mut got = vec![0f32; batch * n];
        gemm_q4q8(&w, &xs, Some(&bias), &mut got, threads);
        prop_assert_eq!(got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
    }

    /// Action heads (fewer than 16 output channels) on batches of 8 or more: the rows in vector
    /// lanes where the CPU has AVX-512 VNNI and the rows share their quantizer, the row kernels
    /// otherwise; any length (quads cut short), groups of 32, 64 or one per channel, every layout.
    #[test]
    fn action_heads_on_batches_equal_the_reference(seed in any::<u64>(), n in 1usize..20, k in 1usize..700,
                                                   batch in 6usize..90, per_group in 0usize..3, threads in 1usize..3,
                                                   shared in any::<bool>(), zero in -128i32..128) {
        let w = layer(seed, n, k, [0, 32, 64][per_group], 4);
        let mut r = Lcg(seed ^ 5);
        let bias: Vec<f32> = (0..n).map(|_| r.unit()).collect();
        let zero = |c: usize| if shared { zero } else { (c % 41) as i32 - 20 };
        let (xs, want) = batch_and_reference(&w, (k, batch), &mut r, zero, Some(&bias));
        let mut got = vec![0f32; batch * n];
        gemm_q4q8(&w, &xs, Some(&bias), &mut got, threads);
        prop_assert_eq!(got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
        let rows: Vec<_> = xs.iter().map(|x| x.row()).collect();
        let mut t = vec![0f32; batch * n];
        gemm_q4q8_rows(&w, &rows, Some(&bias), &mut t, Layout::ChannelMajor, 1);
        for (c, rr) in (0..batch).flat_map(|c| (0..n).map(move |rr| (c, rr))) {
            prop_assert_eq!(t[rr * batch + c].to_bits(), want[c * n + rr].to_bits(), "channel-major: input {} channel {}", c, rr);
        }
    }

    #[test]
    fn q4f32_kernels_match_the_reference(seed in any::<u64>(), n in 1usize..600, k in 1usize..700, per_group in 0usize..2, threads in 1usize..4) {
        let group = if per_group == 0 || k % 32 != 0 { 0 } else { 32 };
        let w = layer(seed, n, k, group, 4);
        let mut r = Lcg(seed ^ 3);
        let mut x: Vec<f32> = (0..k).map(|_| r.unit()).collect();
        x.resize(w.k_pad, 0.0);
        let (mut want, mut got) = (vec![0f32; n], vec![0f32; n]);
        let bias: Vec<f32> = (0..n).map(|_| r.unit()).collect();
        let bias = (seed % 2 == 0).then_some(&bias[..]);
        generic_gemv_q4f32(&w, &x, bias, &mut want);
        gemv_q4f32(&w, &x, bias, &mut got, threads);
        // One arithmetic on every CPU: bit for bit.
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        prop_assert_eq!(bits(&got), bits(&want), "{:?}", isa());
    }

    /// The batched weight-only kernel: each input row equals the reference GEMV bit for bit.
    #[test]
    fn q4f32_batches_match_the_reference(seed in any::<u64>(), n in 1usize..200, k in 1usize..400, batch in 1usize..11,
                                         per_group in 0usize..2, threads in 1usize..3) {
        let group = if per_group == 0 || k % 32 != 0 { 0 } else { 32 };
        let w = layer(seed, n, k, group, 4);
        let mut r = Lcg(seed ^ 11);
        let mut x = vec![0f32; batch * w.k_pad];
        for row in x.chunks_mut(w.k_pad) {
            for v in &mut row[..k] {
                *v = r.unit();
            }
        }
        let bias: Vec<f32> = (0..n).map(|_| r.unit()).collect();
        let bias = (seed % 2 == 0).then_some(&bias[..]);
        let mut want = vec![0f32; batch * n];
        for (xr, yr) in x.chunks(w.k_pad).zip(want.chunks_mut(n)) {
            generic_gemv_q4f32(&w, xr, bias, yr);
        }
        let mut got = vec![0f32; batch * n];
        gemm_q4f32(&w, &x, batch, bias, &mut got, threads);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        prop_assert_eq!(bits(&got), bits(&want), "{:?}", isa());
    }
}

#[test]
fn q4q8_matches_dequantized_float_math() {
    // The integer kernel against the float definition it implements (FakeQuant semantics):
    // sum_k ((qx - zero) * sx) * (qw * sw) + bias, in f64.
    let (n, k) = (17, 128);
    let w = layer(5, n, k, 64, 4);
    let mut r = Lcg(11);
    let x: Vec<f32> = (0..k).map(|_| r.unit() * 2.0).collect();
    let xq = quantize_input(&x, 0.017, 3, &w);
    let mut y = vec![0f32; n];
    gemv_q4q8(&w, &xq, None, &mut y, 1);
    for (row, &got) in y.iter().enumerate() {
        let want: f64 = (0..k)
            .map(|c| {
                let xd = (xq.q[c] as f64 - 3.0) * 0.017f32 as f64;
                xd * w.get(row, c) as f64 * w.scales[row * 2 + c / 64] as f64
            })
            .sum();
        assert!((got as f64 - want).abs() < 1e-5 * want.abs().max(1.0), "row {row}: {got} vs {want}");
    }
}

/// The vector FakeQuant (into a buffer and in place) against its scalar definition, on the
/// half-way neighbours of its scale, ties, the level bounds, huge values, NaN and infinities, at
/// lengths off the vector widths.
#[test]
fn fake_quant_matches_its_definition_per_element() {
    use sqil_kernels_cpu::generic::{fake_quant_in_place, fake_quant_into, fake_quant_one};
    for (s, z, lo, hi) in
        [(0.02f32, 0.0f32, -128.0f32, 127.0f32), (6.0 / 255.0, 128.0, 0.0, 255.0), (0.37, -3.0, -8.0, 7.0)]
    {
        let mut x: Vec<f32> = (-300i32..300)
            .flat_map(|k| {
                let half = ((k as f64 + 0.5) * s as f64) as f32;
                (-2i32..=2).map(move |j| f32::from_bits(half.to_bits().wrapping_add_signed(j)))
            })
            .collect();
        x.extend([f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0, 1e30, -1e30, 1e-40, 2.5 * s]);
        for len in [x.len(), 77, 31, 16, 1] {
            let want: Vec<u32> = x[..len].iter().map(|&v| fake_quant_one(v, s, z, lo, hi).to_bits()).collect();
            let mut got = vec![0f32; len];
            fake_quant_into(&x[..len], s, z, lo, hi, &mut got);
            let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), want, "into, scale {s}, length {len}");
            let mut v = x[..len].to_vec();
            fake_quant_in_place(&mut v, s, z, lo, hi);
            assert_eq!(bits(&v), want, "in place, scale {s}, length {len}");
        }
    }
}

#[test]
fn input_quantization_matches_fake_quant_per_element() {
    // The dispatched (AVX2 where present) quantizer against the scalar definition, on values
    // that hit ties, the clamp bounds, huge magnitudes and NaN.
    let w = layer(3, 4, 160, 32, 4);
    let mut r = Lcg(17);
    let mut x: Vec<f32> = (0..160).map(|_| r.unit() * 4.0).collect();
    x[..6].copy_from_slice(&[0.25, -0.75, 1e30, -1e30, f32::NAN, 2.5 * 0.02]);
    for zero in [-5, 0, 9] {
        let q = quantize_input(&x, 0.02, zero, &w);
        for (i, &v) in x.iter().enumerate() {
            let want = sqil_kernels_cpu::generic::quantize_i8(v, 0.02, zero as f32, -128.0, 127.0);
            assert_eq!(q.q[i], want, "x[{i}] = {v}, zero {zero}");
        }
        assert!(q.q[160..].iter().all(|&v| v == 0), "padding");
        let mut flat = vec![0i8; x.len()];
        sqil_kernels_cpu::generic::quantize_i8_into(&x, 0.02, zero, -128, 127, &mut flat);
        assert_eq!(flat, q.q[..160], "the slice quantizer");
        // Sub-ranges (4-bit activations), lengths off the 32-value steps, and more specials.
        let mut y = x.clone();
        y[40..48].copy_from_slice(&[f32::INFINITY, f32::NEG_INFINITY, -0.0, 0.01, -0.01, 0.03, -0.05, 8.4e6]);
        for (lo, hi) in [(-128, 127), (-8, 7), (0, 15)] {
            for len in [160, 77, 31, 1] {
                let mut out = vec![0i8; len];
                sqil_kernels_cpu::generic::quantize_i8_into(&y[..len], 0.02, zero, lo, hi, &mut out);
                for (i, (&v, &o)) in y.iter().zip(&out).enumerate() {
                    let want = sqil_kernels_cpu::generic::quantize_i8(v, 0.02, zero as f32, lo as f32, hi as f32);
                    assert_eq!(o, want, "y[{i}] = {v}, zero {zero}, range [{lo}, {hi}], length {len}");
                }
            }
        }
        for (g, s) in q.sums.iter().enumerate() {
            assert_eq!(*s, q.q[g * 32..(g + 1) * 32].iter().map(|&v| v as i32).sum::<i32>());
        }
        // At and beside the f32 nearest to every half-way point (k + 1/2) 0.02: the vector forms'
        // quotient screens must send these to the division.
        let near: Vec<f32> = (-140i32..140)
            .flat_map(|k| {
                let half = ((k as f64 + 0.5) * 0.02) as f32;
                (-3i32..=3).map(move |j| f32::from_bits(half.to_bits().wrapping_add_signed(j)))
            })
            .collect();
        let mut out = vec![0i8; near.len()];
        sqil_kernels_cpu::generic::quantize_i8_into(&near, 0.02, zero, -128, 127, &mut out);
        for (&v, &o) in near.iter().zip(&out) {
            assert_eq!(
                o,
                sqil_kernels_cpu::generic::quantize_i8(v, 0.02, zero as f32, -128.0, 127.0),
                "{v:e}, zero {zero}"
            );
        }
    }
}

#[test]
fn byte_transpose_matches_the_definition() {
    let mut r = Lcg(5);
    for (rows, cols) in [(1, 1), (8, 8), (32, 1681), (3, 7056), (17, 9), (64, 40), (9, 16), (16, 64), (40, 100)] {
        let src: Vec<i8> = (0..rows * cols).map(|_| (r.unit() * 127.0) as i8).collect();
        let mut dst = vec![0i8; rows * cols];
        sqil_kernels_cpu::generic::transpose_i8(&src, rows, cols, &mut dst);
        for i in 0..rows {
            for j in 0..cols {
                assert_eq!(dst[j * rows + i], src[i * cols + j], "[{rows} x {cols}] at ({i}, {j})");
            }
        }
        // With the sign bits flipped on the way, dispatched (AVX2 here) and plain.
        let mut generic = vec![0i8; rows * cols];
        sqil_kernels_cpu::generic::transpose_i8_xor(&src, rows, cols, &mut dst, 0x80);
        sqil_kernels_cpu::generic::generic_transpose_i8_xor(&src, rows, cols, &mut generic, 0x80);
        assert_eq!(dst, generic, "[{rows} x {cols}] flipped");
        for i in 0..rows {
            for j in 0..cols {
                assert_eq!(dst[j * rows + i], src[i * cols + j] ^ i8::MIN, "[{rows} x {cols}] flipped at ({i}, {j})");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// Convolution windows read in place equal the same windows gathered as im2col rows (the
    /// reference kernel), with padding taps at the image's zero-point run, for groups smaller
    /// than, equal to and larger than the channel count and one scale per channel.
    #[test]
    fn conv_windows_equal_gathered_rows(seed in any::<u64>(), n in 1usize..70, cs in 0usize..3, taps_m in 1usize..4,
                                        per_group in 0usize..3, zero in -9i32..9, positions in 1usize..40) {
        let ch = [4, 32, 64][cs];
        let taps = if ch == 4 { 8 * taps_m } else { taps_m + 2 };
        let k = taps * ch;
        let group = [0, 32, 64][per_group];
        prop_assume!(group == 0 || (k % group == 0 && (group % ch == 0 || ch % group == 0)));
        let w = layer(seed, n, k, group, 4);
        let mut r = Lcg(seed ^ 11);
        let (image, offsets) = image_and_offsets(&mut r, ch, ch, zero as i8, positions * taps);
        let rows: Vec<Vec<i8>> = offsets.chunks(taps).map(|o| o.iter().flat_map(|&at| image[at as usize..at as usize + ch].to_vec()).collect()).collect();
        let bias: Vec<f32> = (0..n).map(|_| r.unit()).collect();
        let (got, want) = windows_and_rows(&w, &image, &offsets, ch, &rows, zero, &bias);
        prop_assert_eq!(got, want);
    }
}

/// A random int8 image of 50 positions x `ch` channels followed by `tail` bytes of the zero point
/// `pad` (its padding run), and `count` window offsets: positions times `ch`, one in seven the
/// padding run's.
fn image_and_offsets(r: &mut Lcg, ch: usize, tail: usize, pad: i8, count: usize) -> (Vec<i8>, Vec<u32>) {
    let il = 50;
    let mut image: Vec<i8> = (0..il * ch).map(|_| (r.next() % 256) as u8 as i8).collect();
    image.extend(std::iter::repeat_n(pad, tail));
    let offsets = (0..count)
        .map(|_| if r.next().is_multiple_of(7) { (il * ch) as u32 } else { (r.next() as usize % il * ch) as u32 })
        .collect();
    (image, offsets)
}

/// `image`'s windows (`offsets`, `taps = offsets / rows` runs of `run` bytes each) read in place
/// by `conv_q4q8_windows` and, as the reference, `rows` (the windows' im2col rows) through
/// `generic_q4q8_row`: both outputs as bits, `[n][windows]` (the in-place side empty on a CPU
/// without the kernel).
fn windows_and_rows(
    w: &PackedQ4,
    image: &[i8],
    offsets: &[u32],
    run: usize,
    rows: &[Vec<i8>],
    zero: i32,
    bias: &[f32],
) -> (Vec<u32>, Vec<u32>) {
    let (n, positions) = (w.n, rows.len());
    let taps = offsets.len() / positions;
    let group = if w.group == 0 { w.k } else { w.group };
    let flipped: Vec<i8> = image.iter().map(|&v| v ^ i8::MIN).collect();
    let windows: Vec<_> = offsets
        .chunks(taps)
        .map(|o| sqil_kernels_cpu::generic::QWindow { image: &flipped, offsets: o, run, zero, scale: 0.03 })
        .collect();
    let sums: Vec<Vec<i32>> =
        rows.iter().map(|q| q.chunks(group).map(|c| c.iter().map(|&v| v as i32).sum()).collect()).collect();
    let mut want = vec![0f32; n * positions];
    for (c, (q, s)) in rows.iter().zip(&sums).enumerate() {
        let x = sqil_kernels_cpu::generic::QRow { q, sums: s, zero, scale: 0.03 };
        for row in 0..n {
            want[row * positions + c] = sqil_kernels_cpu::generic::generic_q4q8_row(w, x, Some(bias), row);
        }
    }
    let mut got = vec![0f32; n * positions];
    let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    if sqil_kernels_cpu::conv_q4q8_windows(w, &windows, Some(bias), &mut got, Layout::ChannelMajor) {
        (bits(&got), bits(&want))
    } else {
        (bits(&want), bits(&want))
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// Runs padded past the image's C channels to whole groups (16 or 20 channels in runs of 32,
    /// 40 in runs of 64: a layer whose channels do not fill its groups), the weights past C zero:
    /// read in place, each run takes the next position's bytes (or the bytes past the padding
    /// run) there, and the outputs equal the gathered im2col rows whose padded values are the
    /// zero point, bit for bit.
    #[test]
    fn padded_runs_read_in_place_equal_zero_padded_rows(seed in any::<u64>(), n in 1usize..70, cs in 0usize..3,
                                                        taps in 1usize..10, zero in -9i32..9, positions in 1usize..40) {
        let (ch, run) = [(16, 32), (20, 32), (40, 64)][cs];
        let group = 32;
        let k = taps * run;
        let mut r = Lcg(seed);
        let q: Vec<i8> = (0..n * k).map(|i| if i % run < ch { (r.next() % 16) as i8 - 8 } else { 0 }).collect();
        let scales: Vec<f32> = (0..n * (k / group)).map(|_| 0.01 + r.unit().abs() * 0.1).collect();
        let w = PackedQ4::pack(&q, &scales, n, k, group).unwrap();
        let pad = zero as i8;
        // The image, its zero-point run, then run - C bytes more for the padding run's reads.
        let (image, offsets) = image_and_offsets(&mut r, ch, run, pad, positions * taps);
        let rows: Vec<Vec<i8>> = offsets
            .chunks(taps)
            .map(|o| o.iter().flat_map(|&at| (0..run).map(|j| if j < ch { image[at as usize + j] } else { pad }).collect::<Vec<_>>()).collect())
            .collect();
        let bias: Vec<f32> = (0..n).map(|_| r.unit()).collect();
        let (got, want) = windows_and_rows(&w, &image, &offsets, run, &rows, zero, &bias);
        prop_assert_eq!(got, want);
    }
}

/// Layers past `LANES_MAX_BYTES` keep the half-byte tile kernel at batches 1-3 on AVX2 (the lane
/// kernel takes the smaller ones the property tests draw); with AVX-512 VNNI they take the
/// half-byte lane kernel like every layer of 16 channels or more: against the reference, with
/// threads.
#[test]
fn large_layers_take_the_half_byte_kernels_and_equal_the_reference() {
    let (n, k) = (1060, 4160);
    let w = layer(3, n, k, 64, 4);
    assert!(
        !sqil_kernels_cpu::lanes_at_small_batch(&w)
            && sqil_kernels_cpu::lanes_at_small_batch(&layer(3, 64, 256, 64, 4))
    );
    let vnni = sqil_kernels_cpu::isa() == sqil_kernels_cpu::Isa::Avx512Vnni;
    assert_eq!(sqil_kernels_cpu::row_lanes_at_small_batch(&w), vnni);
    let mut r = Lcg(9);
    let xs: Vec<_> = (0..3)
        .map(|c| {
            let x: Vec<f32> = (0..k).map(|_| r.unit() * 3.0).collect();
            quantize_input(&x, 0.02, 2 - c, &w)
        })
        .collect();
    let bias: Vec<f32> = (0..n).map(|_| r.unit()).collect();
    for batch in 1..=3 {
        let mut want = vec![0f32; batch * n];
        for (x, yc) in xs[..batch].iter().zip(want.chunks_mut(n)) {
            generic_gemv_q4q8(&w, x, Some(&bias), yc);
        }
        for threads in [1, 2] {
            let mut got = vec![0f32; batch * n];
            gemm_q4q8(&w, &xs[..batch], Some(&bias), &mut got, threads);
            assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "batch {batch}, {threads} threads");
        }
    }
    // A batch for the one-byte row kernel, whose blocks of a layer this size are unpacked from
    // the half bytes per call (no byte copy kept), with the batch's one zero point.
    let batch = sqil_kernels_cpu::BYTE_ROWS_MIN + 1;
    let xs: Vec<_> = (0..batch)
        .map(|_| {
            let x: Vec<f32> = (0..k).map(|_| r.unit() * 3.0).collect();
            quantize_input(&x, 0.02, -5, &w)
        })
        .collect();
    let mut want = vec![0f32; batch * n];
    for (x, yc) in xs.iter().zip(want.chunks_mut(n)) {
        generic_gemv_q4q8(&w, x, Some(&bias), yc);
    }
    let mut got = vec![0f32; batch * n];
    gemm_q4q8(&w, &xs, Some(&bias), &mut got, 1);
    assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "batch {batch}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// The pointwise-convolution kernel (positions in vector lanes) against the reference row of
    /// each position's channels, bit for bit: channel counts off the four-channel words, positions
    /// off the 16- and 32-lane blocks, groups of 32, 64 or one per channel, zero points across the
    /// int8 range, with and without a bias, and with each epilogue (ReLU; Clip; Clip then a
    /// FakeQuant whose levels the outputs cross; chains of no single form; HardSwish and SiLU
    /// over the outputs; HardSwish then a FakeQuant in registers through the level, SiLU then a
    /// FakeQuant over the outputs, each at a scale where some vectors hold a lane the estimate
    /// cannot vouch for and go through the definition: a wrong value there fails this, checked)
    /// against the ops' scalar definitions (AVX-512 VNNI and AVX2). Skips without AVX2.
    #[test]
    fn pointwise_conv_equals_the_reference_rows(seed in any::<u64>(), n in 1usize..70, ch in 1usize..100, p in 1usize..300,
                                                 per_group in 0usize..3, zero in -120i32..120, with_bias in any::<bool>(),
                                                 epilogue in 0usize..9) {
        use sqil_kernels_cpu::Post;
        let fq = Post::FakeQuant { scale: 0.013, zero: -3.0, lo: -128.0, hi: 127.0 };
        let fine = Post::FakeQuant { scale: 0.31, zero: 5.0, lo: -128.0, hi: 127.0 };
        let wide = Post::FakeQuant { scale: 0.03, zero: 5.0, lo: -2048.0, hi: 2047.0 };
        let post: &[Post] = match epilogue {
            0 => &[],
            1 => &[Post::Relu],
            2 => &[Post::Clip(-0.25, 0.5)],
            3 => &[Post::Clip(0.0, 6.0), fq],
            // Not one of the kernel's forms: op by op in registers.
            4 => &[fq, Post::Clip(-0.25, 0.5), Post::LeakyRelu(0.1)],
            // HardSwish and SiLU run over the outputs after the kernel.
            5 => &[Post::Relu, Post::HardSwish, fq, Post::Silu],
            // HardSwish then a FakeQuant: through the level in the kernel's epilogue; SiLU then
            // a FakeQuant: the level pass over the outputs.
            6 => &[Post::HardSwish, wide],
            7 => &[Post::Silu, fine],
            _ => &[Post::Silu, fine, Post::Clip(-1.0, 1.0)],
        };
        let group = [0, 32, 64][per_group];
        let group = if ch.next_multiple_of(32) % group.max(1) == 0 { group } else { 32 };
        let w = layer(seed, n, ch, group, 4);
        let mut r = Lcg(seed ^ 11);
        let x: Vec<f32> = (0..ch * p).map(|_| r.unit() * 3.0).collect();
        let mut planes = vec![0i8; ch * p];
        sqil_kernels_cpu::generic::quantize_i8_into(&x, 0.02, zero, -128, 127, &mut planes);
        let bias: Vec<f32> = (0..n).map(|_| r.unit()).collect();
        let bias = with_bias.then_some(&bias[..]);
        let mut got = vec![f32::NAN; n * p];
        if !sqil_kernels_cpu::pointwise_q4q8(&w, &planes, p, zero, 0.02, bias, post, &mut got) {
            return Ok(());
        }
        for o in 0..p {
            let mut q = vec![0i8; w.k_pad];
            for c in 0..ch {
                q[c] = planes[c * p + o];
            }
            let row = sqil_kernels_cpu::generic::QRow { q: &q, sums: &[], zero, scale: 0.02 };
            for rr in 0..n {
                let want = sqil_kernels_cpu::post_one(sqil_kernels_cpu::generic::generic_q4q8_row(&w, row, bias, rr), post);
                prop_assert_eq!(got[rr * p + o].to_bits(), want.to_bits(), "channel {} position {}", rr, o);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Several images side by side in the pointwise kernel's lanes (`pointwise_q4q8_images`)
    /// give each image's outputs as the kernel on that image alone, bit for bit, in place in the
    /// images' output: 1-5 images of 1-70 positions (below 8 positions, one at a time; a vector
    /// of 16 lanes spanning two or three images; image edges off the 16-lane vectors and the
    /// 32-position blocks), each epilogue form (in registers; HardSwish over the outputs), with
    /// and without a bias. Values past the images' outputs are left alone. Skips without AVX2.
    #[test]
    fn pointwise_images_side_by_side_equal_each_image_alone(seed in any::<u64>(), n in 1usize..40, ch in 1usize..80,
                                                             p in 1usize..70, images in 1usize..6, zero in -120i32..120,
                                                             with_bias in any::<bool>(), epilogue in 0usize..4) {
        use sqil_kernels_cpu::Post;
        let fq = Post::FakeQuant { scale: 0.013, zero: -3.0, lo: -128.0, hi: 127.0 };
        let post: &[Post] = match epilogue {
            0 => &[],
            1 => &[Post::Clip(0.0, 6.0), fq],
            2 => &[fq, Post::Clip(-0.25, 0.5), Post::LeakyRelu(0.1)],
            _ => &[Post::HardSwish, fq],
        };
        let w = layer(seed, n, ch, 32, 4);
        let mut r = Lcg(seed ^ 5);
        let x: Vec<f32> = (0..images * ch * p).map(|_| r.unit() * 3.0).collect();
        let mut planes = vec![0i8; images * ch * p];
        sqil_kernels_cpu::generic::quantize_i8_into(&x, 0.02, zero, -128, 127, &mut planes);
        let bias: Vec<f32> = (0..n).map(|_| r.unit()).collect();
        let bias = with_bias.then_some(&bias[..]);
        // One value past the outputs, which must stay as it is.
        let mut got = vec![f32::NAN; images * n * p + 1];
        got[images * n * p] = 7.0;
        if !sqil_kernels_cpu::pointwise_q4q8_images(&w, &planes, (images, p), zero, 0.02, bias, post, &mut got) {
            return Ok(());
        }
        prop_assert_eq!(got[images * n * p], 7.0);
        for g in 0..images {
            let mut want = vec![f32::NAN; n * p];
            let one = &planes[g * ch * p..(g + 1) * ch * p];
            prop_assert!(sqil_kernels_cpu::pointwise_q4q8(&w, one, p, zero, 0.02, bias, post, &mut want));
            for (i, (a, b)) in got[g * n * p..(g + 1) * n * p].iter().zip(&want).enumerate() {
                prop_assert_eq!(a.to_bits(), b.to_bits(), "image {} channel {} position {}", g, i / p, i % p);
            }
        }
    }
}

/// The chain tests' depthwise geometry: a window of `[(1, 1), (3, 3), (5, 5), (1, 3)][k]` with
/// stride `s` and padding `pad` on an `h x wd` map (the window's size at least; `two_d` false: a
/// 1-D row of `wd`), and its `(input positions, taps, output positions)`.
fn chain_geometry(
    two_d: bool,
    (h, wd): (usize, usize),
    k: usize,
    s: usize,
    pad: isize,
) -> (sqil_kernels_cpu::ConvGeometry, (usize, usize, usize)) {
    use sqil_kernels_cpu::ConvGeometry;
    let (kh, kw) = [(1, 1), (3, 3), (5, 5), (1, 3)][k];
    let (h, kh, s_h, p_h) = if two_d { (h.max(kh), kh, s, pad) } else { (1, 1, 1, 0) };
    let wd = wd.max(kw);
    let out = |n: usize, p: isize, k: usize, s: usize| (n as isize + 2 * p - k as isize) as usize / s + 1;
    let (oh, ow) = (out(h, p_h, kh, s_h), out(wd, pad, kw, s));
    let geo = if two_d {
        ConvGeometry {
            input: vec![h, wd],
            kernel: vec![kh, kw],
            strides: vec![s_h, s],
            dilations: vec![1, 1],
            pads_begin: vec![p_h, pad],
            output: vec![oh, ow],
        }
    } else {
        ConvGeometry {
            input: vec![wd],
            kernel: vec![kw],
            strides: vec![s],
            dilations: vec![1],
            pads_begin: vec![pad],
            output: vec![ow],
        }
    };
    (geo, (h * wd, kh * kw, oh * ow))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(160))]

    /// A depthwise convolution with what feeds it and what it feeds in one pass
    /// (`depthwise_chain`: an image or a pointwise W4A8 convolution written straight into the
    /// depthwise kernel's padded channels-last buffer; its outputs as an image or as the next
    /// pointwise convolution's int8 levels) equals the kernels one after the other, bit for bit:
    /// 1-D and 2-D images, 1 x 1 to 5 x 5 windows, strides 1 and 2, padding 0-2 (the buffer's
    /// every edge; positions no window reads), 1-70 channels (fewer than 8: not taken, nothing
    /// written), channel counts off the vector widths, each epilogue form on every step (HardSwish
    /// and SiLU over the outputs; before a pointwise convolution: not taken; a clamp and the next
    /// layer's own quantizer, whose levels are taken directly), with and without biases, a NaN
    /// in the image (into a pointwise convolution: reported, as its quantizer cannot
    /// carry it), with the weights laid out by tap when planned (`DepthwiseTaps`) or on the
    /// call. AVX-512 VNNI and AVX2; skips without AVX2.
    #[test]
    fn depthwise_chain_equals_the_steps(seed in any::<u64>(), n in 1usize..70, ch in 1usize..60, two_d in any::<bool>(),
                                        h in 1usize..12, wd in 1usize..40, k in 0usize..4, s in 1usize..3,
                                        pad in 0isize..3, posts in (0usize..7, 0usize..7, 0usize..7),
                                        with_bias in any::<bool>(), ends in (any::<bool>(), any::<bool>()),
                                        nan in 0usize..4, planned in any::<bool>()) {
        use sqil_kernels_cpu::{depthwise_chain, depthwise_conv, Chain, ChainIn, ChainOut, Post};
        let (pw_post, dw_post, next_post) = posts;
        let (from_pointwise, into_pointwise) = ends;
        let fq = Post::FakeQuant { scale: 0.013, zero: -3.0, lo: -128.0, hi: 127.0 };
        // The next pointwise convolution's input quantizer as a FakeQuant (a simulation's
        // epilogue before that layer: its levels are taken directly).
        let fq_next = Post::FakeQuant { scale: 0.05, zero: -2.0, lo: -128.0, hi: 127.0 };
        let forms: [&[Post]; 7] = [&[], &[Post::Relu], &[Post::Clip(0.0, 6.0), fq], &[fq, Post::Clip(-0.25, 0.5), Post::LeakyRelu(0.3)],
                                   &[Post::Clip(-1.0, 6.0), Post::Silu, Post::HardSwish],
                                   &[Post::Clip(0.0, 6.0), fq_next], &[fq_next]];
        let (geo, (p, kl, ol)) = chain_geometry(two_d, (h, wd), k, s, pad);
        let w = layer(seed, n, ch, 32, 4);
        let m2 = 1 + (seed % 40) as usize;
        let g2 = [0, 32, 64][(seed % 3) as usize];
        let w2 = layer(seed ^ 3, m2, n, if n.next_multiple_of(32) % g2.max(1) == 0 { g2 } else { 32 }, 4);
        let mut r = Lcg(seed ^ 5);
        let x: Vec<f32> = (0..ch * p).map(|_| r.unit() * 3.0).collect();
        let mut planes = vec![0i8; ch * p];
        sqil_kernels_cpu::generic::quantize_i8_into(&x, 0.02, 4, -128, 127, &mut planes);
        let bias: Vec<f32> = (0..n).map(|_| r.unit()).collect();
        let dk: Vec<f32> = (0..n * kl).map(|_| r.unit() * 2.0).collect();
        let db: Vec<f32> = (0..n).map(|_| r.unit()).collect();
        let b2: Vec<f32> = (0..m2).map(|_| r.unit()).collect();
        let (bias, db, b2) = if with_bias { (Some(&bias[..]), Some(&db[..]), Some(&b2[..])) } else { (None, None, None) };
        // The depthwise's input: the pointwise outputs, or an image (a NaN in it one time in four).
        let mut mid = vec![f32::NAN; n * p];
        if from_pointwise {
            if !sqil_kernels_cpu::pointwise_q4q8(&w, &planes, p, 4, 0.02, bias, forms[pw_post], &mut mid) {
                return Ok(());
            }
        } else {
            mid = (0..n * p).map(|_| r.unit() * 3.0).collect();
            if nan == 0 {
                let at = (seed as usize / 7) % mid.len();
                mid[at] = f32::NAN;
            }
        }
        let mut dwo = vec![0f32; n * ol];
        depthwise_conv(&mid, &dk, &geo, db, forms[dw_post], &mut dwo);
        let quant = (0.05f32, -2i32, -128i32, 127i32);
        let mut want = dwo.clone();
        let mut dw_nan = false;
        if into_pointwise {
            let mut planes2 = vec![0i8; n * ol];
            dw_nan = sqil_kernels_cpu::generic::quantize_i8_into(&dwo, quant.0, quant.1, quant.2, quant.3, &mut planes2);
            want = vec![0f32; m2 * ol];
            // (No AVX2: no pointwise kernel, nothing to chain; skipped.)
            if !sqil_kernels_cpu::pointwise_q4q8(&w2, &planes2, ol, quant.1, quant.0, b2, forms[next_post], &mut want) {
                return Ok(());
            }
        }
        let taps = sqil_kernels_cpu::generic::DepthwiseTaps::new(&dk, n, kl).filter(|_| planned);
        prop_assert_eq!(taps.is_some(), planned && n >= 8, "laid out by tap: {} channels", n);
        let dw = sqil_kernels_cpu::generic::DepthwiseArgs {
            weights: &dk,
            geo: &geo,
            bias: db,
            post: forms[dw_post],
            taps: taps.as_ref(),
        };
        let run = |y: &mut [f32]| {
            let input = if from_pointwise {
                ChainIn::Pointwise { w: &w, planes: &planes, zero: 4, scale: 0.02, bias, post: forms[pw_post] }
            } else {
                ChainIn::Image(&mid)
            };
            let output = if into_pointwise {
                ChainOut::Pointwise { w: &w2, quant, bias: b2, post: forms[next_post], y }
            } else {
                ChainOut::Image(y)
            };
            depthwise_chain(input, &dw, output)
        };
        let mut got = vec![f32::NAN; want.len()];
        let done = run(&mut got);
        // The same layer again (the next image: its padding left zero by the first call): the
        // same outputs.
        if done == Chain::Done {
            let mut again = vec![f32::NAN; want.len()];
            prop_assert_eq!(run(&mut again), Chain::Done);
            let bits = |v: &[f32]| v.iter().map(|x| if x.is_nan() { u32::MAX } else { x.to_bits() }).collect::<Vec<_>>();
            prop_assert_eq!(bits(&again), bits(&want), "the same layer a second time");
        }
        let vector = sqil_kernels_cpu::isa() != sqil_kernels_cpu::Isa::Generic;
        let expect = if n < 8 || (into_pointwise && dw_post == 4) || !vector {
            Chain::NotTaken
        } else if dw_nan {
            Chain::Nan
        } else {
            Chain::Done
        };
        prop_assert_eq!(done, expect, "{} channels", n);
        if done != Chain::Done {
            prop_assert!(got.iter().all(|v| v.is_nan()), "written though not done");
            return Ok(());
        }
        let bits = |v: &[f32]| v.iter().map(|x| if x.is_nan() { u32::MAX } else { x.to_bits() }).collect::<Vec<_>>();
        prop_assert_eq!(bits(&got), bits(&want));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// A chain over several images (`depthwise_chain_images`: the pointwise convolutions'
    /// positions of all of them side by side in the lanes, one padded buffer per image) gives each
    /// image's outputs as the chain on that image alone (which the test above holds to the steps),
    /// bit for bit: 1-4 images, 1-D and 2-D maps of 1 to 60 positions, each end a pointwise
    /// convolution or not, each epilogue form, a NaN in one image's input one time in four (into
    /// a pointwise convolution: reported for the run), with and without biases. Into a pointwise
    /// convolution, several images of fewer than 8 output positions each are not taken. Then
    /// one image and the images again (the padding's memo across image counts). AVX-512 VNNI and
    /// AVX2 (one image at a time there); skips without AVX2.
    #[test]
    fn depthwise_chain_images_equal_each_image_alone(seed in any::<u64>(), n in 8usize..40, ch in 1usize..40,
                                                     two_d in any::<bool>(), h in 1usize..8, wd in 1usize..12,
                                                     k in 0usize..4, s in 1usize..3, pad in 0isize..3,
                                                     posts in (0usize..5, 0usize..5, 0usize..5), with_bias in any::<bool>(),
                                                     ends in (any::<bool>(), any::<bool>()), images in 1usize..5,
                                                     nan in 0usize..4) {
        use sqil_kernels_cpu::{depthwise_chain, depthwise_chain_images, Chain, ChainIn, ChainOut, Post};
        let (pw_post, dw_post, next_post) = posts;
        let (from_pointwise, into_pointwise) = ends;
        let fq = Post::FakeQuant { scale: 0.013, zero: -3.0, lo: -128.0, hi: 127.0 };
        let forms: [&[Post]; 5] = [&[], &[Post::Relu], &[Post::Clip(0.0, 6.0), fq], &[fq, Post::Clip(-0.25, 0.5), Post::LeakyRelu(0.3)],
                                   &[Post::HardSwish, fq]];
        let (geo, (p, kl, ol)) = chain_geometry(two_d, (h, wd), k, s, pad);
        let w = layer(seed, n, ch, 32, 4);
        let m2 = 1 + (seed % 40) as usize;
        let w2 = layer(seed ^ 3, m2, n, 32, 4);
        let mut r = Lcg(seed ^ 5);
        let x: Vec<f32> = (0..images * ch * p).map(|_| r.unit() * 3.0).collect();
        let mut planes = vec![0i8; images * ch * p];
        sqil_kernels_cpu::generic::quantize_i8_into(&x, 0.02, 4, -128, 127, &mut planes);
        let mut mid: Vec<f32> = (0..images * n * p).map(|_| r.unit() * 3.0).collect();
        if nan == 0 {
            let at = (seed as usize / 7) % mid.len();
            mid[at] = f32::NAN;
        }
        let bias: Vec<f32> = (0..n).map(|_| r.unit()).collect();
        let dk: Vec<f32> = (0..n * kl).map(|_| r.unit() * 2.0).collect();
        let db: Vec<f32> = (0..n).map(|_| r.unit()).collect();
        let b2: Vec<f32> = (0..m2).map(|_| r.unit()).collect();
        let (bias, db, b2) = if with_bias { (Some(&bias[..]), Some(&db[..]), Some(&b2[..])) } else { (None, None, None) };
        let dw = sqil_kernels_cpu::generic::DepthwiseArgs { weights: &dk, geo: &geo, bias: db, post: forms[dw_post], taps: None };
        let quant = (0.05f32, -2i32, -128i32, 127i32);
        let per_out = if into_pointwise { m2 * ol } else { n * ol };
        // Images `at..at + count` through the chain.
        let run = |at: usize, count: usize, y: &mut [f32]| {
            let input = if from_pointwise {
                let planes = &planes[at * ch * p..(at + count) * ch * p];
                ChainIn::Pointwise { w: &w, planes, zero: 4, scale: 0.02, bias, post: forms[pw_post] }
            } else {
                ChainIn::Image(&mid[at * n * p..(at + count) * n * p])
            };
            let output = if into_pointwise {
                ChainOut::Pointwise { w: &w2, quant, bias: b2, post: forms[next_post], y }
            } else {
                ChainOut::Image(y)
            };
            if count == 1 { depthwise_chain(input, &dw, output) } else { depthwise_chain_images(count, input, &dw, output) }
        };
        let mut alone = vec![f32::NAN; images * per_out];
        let states: Vec<Chain> = (0..images).map(|i| run(i, 1, &mut alone[i * per_out..(i + 1) * per_out])).collect();
        let mut got = vec![f32::NAN; images * per_out];
        let done = run(0, images, &mut got);
        let expect = if (images > 1 && into_pointwise && ol < 8) || states.contains(&Chain::NotTaken) {
            Chain::NotTaken
        } else if states.contains(&Chain::Nan) {
            Chain::Nan
        } else {
            Chain::Done
        };
        prop_assert_eq!(done, expect, "each alone: {:?}", states);
        if done != Chain::Done {
            return Ok(());
        }
        let bits = |v: &[f32]| v.iter().map(|x| if x.is_nan() { u32::MAX } else { x.to_bits() }).collect::<Vec<_>>();
        prop_assert_eq!(bits(&got), bits(&alone));
        // One image, then all of them again: the same outputs.
        let mut one = vec![f32::NAN; per_out];
        prop_assert_eq!(run(0, 1, &mut one), Chain::Done);
        let mut again = vec![f32::NAN; images * per_out];
        prop_assert_eq!(run(0, images, &mut again), Chain::Done);
        prop_assert_eq!(bits(&again), bits(&alone));
    }
}
