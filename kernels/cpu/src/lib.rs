//! CPU kernels that sqil's reference interpreter and the CPU back end (the runtime's plan) build on.
//!
//! This crate knows nothing of ONNX or of the graph IR: it works on plain slices with explicit
//! row and column strides, the layout convention of BLAS and of `matrixmultiply`.

pub mod dequant;
pub mod generic;
pub mod packed;
pub mod peak;
#[cfg(target_arch = "x86_64")]
pub mod x86_64;

pub use generic::{
    copy_f32, copy_strided, depthwise_conv, dgemm, im2col, post_in_place, post_one, quantize_input, sgemm, sgemm_chain,
    ConvGeometry, Post, QRow, QuantizedInput,
};
pub use packed::{BlockQ4, PackedQ4};

/// The best kernel family this CPU runs, chosen once at run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Generic,
    Avx2,
    /// AVX-512 F/BW/VNNI (the W4A8 kernels; the rest uses AVX2).
    Avx512Vnni,
}

/// The instruction set the dispatchers use on this CPU (`SQIL_ISA=generic` forces the
/// reference, `SQIL_ISA=avx2` caps it at AVX2).
pub fn isa() -> Isa {
    static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *ISA.get_or_init(|| {
        let cap = std::env::var("SQIL_ISA").unwrap_or_default();
        if cap == "generic" {
            return Isa::Generic;
        }
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            if cap != "avx2"
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vnni")
            {
                return Isa::Avx512Vnni;
            }
            return Isa::Avx2;
        }
        Isa::Generic
    })
}

/// Output channels per thread below which a GEMV stays on one thread.
pub const ROWS_PER_THREAD: usize = 256;

/// Without AVX-512 VNNI, layers whose one-byte-per-weight copy (`ChannelTiles`) stays within this
/// many bytes run the channel-lane W4A8 kernel at every batch size: it needs no horizontal
/// reductions and about half the instructions per weight of the tile kernel, reading a weight as
/// one byte from the cache. Larger layers, whose weights stream from memory, keep the half-byte
/// tile kernel below batch 4. (With VNNI, rows take the half-byte lane kernel at every size: see
/// [`row_lanes_at_small_batch`].)
pub const LANES_MAX_BYTES: usize = 4 << 20;

/// Fewest output channels for which batches of four or more inputs take the channel-lane kernel
/// (below, most of its 32 lanes would be padding).
pub const LANES_MIN_CHANNELS: usize = 16;

/// Whether the channel-lane kernel runs `w` at batches below four (see [`LANES_MAX_BYTES`]).
pub fn lanes_at_small_batch(w: &PackedQ4) -> bool {
    w.n.next_multiple_of(32) * w.k_pad <= LANES_MAX_BYTES
}

/// Whether the channel-lane kernel runs `w` on rows at batches below four: with AVX-512 VNNI (half
/// bytes: no larger copy to read) for layers of [`LANES_MIN_CHANNELS`] channels or more, else
/// [`lanes_at_small_batch`].
pub fn row_lanes_at_small_batch(w: &PackedQ4) -> bool {
    if nibble_lanes(w) {
        w.n >= LANES_MIN_CHANNELS
    } else {
        lanes_at_small_batch(w)
    }
}

/// The channel-lane W4A8 kernel for this CPU (AVX-512 VNNI sums where present, else AVX2).
///
/// # Safety
/// The CPU must support AVX2 and FMA; as `x86_64::avx2::avx2_channels`.
#[cfg(target_arch = "x86_64")]
unsafe fn lanes_kernel<X: x86_64::common::LaneInput>(
    w: &PackedQ4,
    xs: &[X],
    bias: Option<&[f32]>,
    y: &mut [f32],
    strides: (usize, usize),
    rows: std::ops::Range<usize>,
) {
    if isa() == Isa::Avx512Vnni {
        x86_64::avx512::avx512_channels(w, xs, bias, y, strides, rows)
    } else {
        x86_64::avx2::avx2_channels(w, xs, bias, y, strides, rows)
    }
}

/// Largest group the half-byte lane kernel takes: its int32 sums of whole weight bytes (up to
/// 255) times int8 inputs stay below 2^31 over a group of at most this many weights.
pub const NIBBLE_LANES_MAX_GROUP: usize = 65536;

/// Most rows that run on the AVX2 half-byte channel-lane kernel (`avx2_nibble_rows`: half the
/// weight bytes of the byte-tile kernel, unpacked in registers once per quad for two rows).
/// Measured on this project's AVX2 host (AMD EPYC, Zen 3), the 4x1024 MLP W4A8, interleaved
/// rounds: batch 1 70.7-79 -> 53.4-57.8 us, batch 2 91-101 either way, batch 3 155-171 -> 142-150
/// (bc_hopper batch 3 7.1-7.4 -> 6.8-6.9 us); at batch 4 the byte tiles' short form measured the
/// same (170-186 vs 176-183 us), so it keeps batch 4.
pub const AVX2_NIBBLE_ROWS_MAX: usize = 3;

/// Fewest rows that run on the one-byte row-lane kernel (`avx512_byte_rows`: half the
/// instructions per row and group besides `vpdpbusd`, on the layer's byte copy within
/// [`LANES_MAX_BYTES`], else on each block unpacked per call) rather than the half-byte one
/// (`avx512_nibble_lanes`). Measured on the 4x1024 MLP: the byte kernel ahead from 24 rows (4%,
/// 8% at 32, 11% at 64), behind at 16 and below (its twice larger weight reads).
pub const BYTE_ROWS_MIN: usize = 24;

/// Whether rows run on the half-byte channel-lane kernel (AVX-512 VNNI, groups within
/// [`NIBBLE_LANES_MAX_GROUP`]).
fn nibble_lanes(w: &PackedQ4) -> bool {
    isa() == Isa::Avx512Vnni && w.group <= NIBBLE_LANES_MAX_GROUP
}

/// The channel-lane W4A8 kernel for rows: with AVX-512 VNNI on half-byte weights
/// (`avx512_nibble_lanes`, no sign flip of the inputs), else [`lanes_kernel`].
///
/// # Safety
/// As [`lanes_kernel`]; each row's `sums` holds `w.groups()` values.
#[cfg(target_arch = "x86_64")]
unsafe fn row_lanes_kernel(
    w: &PackedQ4,
    xs: &[QRow],
    bias: Option<&[f32]>,
    y: &mut [f32],
    strides: (usize, usize),
    rows: std::ops::Range<usize>,
) {
    if nibble_lanes(w) && xs.len() >= BYTE_ROWS_MIN {
        x86_64::avx512::avx512_byte_rows(w, xs, bias, y, strides, rows)
    } else if nibble_lanes(w) {
        x86_64::avx512::avx512_nibble_lanes(w, xs, bias, y, strides, rows)
    } else if isa() == Isa::Avx2 && xs.len() <= AVX2_NIBBLE_ROWS_MAX && w.group <= NIBBLE_LANES_MAX_GROUP {
        x86_64::avx2::avx2_nibble_rows(w, xs, bias, y, strides, rows)
    } else {
        lanes_kernel(w, xs, bias, y, strides, rows)
    }
}

/// Splits rows over up to `threads` scoped threads when the layer is large enough, in chunks of
/// a multiple of `align` rows (the SIMD kernels' tiles: 4 rows, or 32 channels in lanes); `y`
/// holds `stride` outputs per row.
fn split_rows(
    n: usize,
    (threads, align): (usize, usize),
    min_rows: usize,
    stride: usize,
    y: &mut [f32],
    f: impl Fn(std::ops::Range<usize>, &mut [f32]) + Sync,
) {
    let t = threads.min(n / min_rows.max(1)).max(1);
    if t == 1 {
        return f(0..n, &mut y[..n * stride]);
    }
    let chunk = n.div_ceil(t).next_multiple_of(align);
    std::thread::scope(|s| {
        for (i, part) in y[..n * stride].chunks_mut(chunk * stride).enumerate() {
            let f = &f;
            s.spawn(move || f(i * chunk..i * chunk + part.len() / stride, part));
        }
    });
}

/// Runs `f(inputs' items, their outputs)` on `threads` threads, each a contiguous block of the
/// `inputs` inputs (`x_per` items of `x` and `y_per` values of `y` each); one thread runs in place.
fn split_inputs<X: Sync>(
    x: &[X],
    x_per: usize,
    inputs: usize,
    y: &mut [f32],
    y_per: usize,
    threads: usize,
    f: impl Fn(&[X], &mut [f32]) + Sync,
) {
    let (x, y) = (&x[..inputs * x_per], &mut y[..inputs * y_per]);
    let t = threads.clamp(1, inputs.max(1));
    if t == 1 {
        return f(x, y);
    }
    let per = inputs.div_ceil(t).max(1);
    std::thread::scope(|s| {
        for (xc, yc) in x.chunks(per * x_per).zip(y.chunks_mut(per * y_per)) {
            let f = &f;
            s.spawn(move || f(xc, yc));
        }
    });
}

/// W4A8 GEMV `y = W x + bias` with the best kernel for this CPU, over `threads` threads for
/// large layers. Every variant equals `generic::generic_gemv_q4q8` bit for bit.
pub fn gemv_q4q8(w: &PackedQ4, x: &QuantizedInput, bias: Option<&[f32]>, y: &mut [f32], threads: usize) {
    assert!(x.q.len() >= w.k_pad && x.sums.len() >= w.groups() && y.len() >= w.n);
    assert!(bias.is_none_or(|b| b.len() >= w.n));
    let x = x.row();
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: isa() checked AVX2 and FMA; the lengths are asserted above; every chunk of
        // rows starts at a multiple of 32.
        Isa::Avx2 | Isa::Avx512Vnni if row_lanes_at_small_batch(w) => {
            split_rows(w.n, (threads, 32), ROWS_PER_THREAD, 1, y, |rows, out| unsafe {
                row_lanes_kernel(w, &[x], bias, out, (w.n, 1), rows)
            })
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: isa() checked AVX2 and FMA; the lengths are asserted above.
        Isa::Avx2 => split_rows(w.n, (threads, 4), ROWS_PER_THREAD, 1, y, |rows, out| unsafe {
            x86_64::avx2::avx2_gemv_q4q8_rows(w, x, bias, rows, out)
        }),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: isa() checked AVX-512 F/BW/VNNI, AVX2 and FMA; the lengths are asserted above.
        Isa::Avx512Vnni => split_rows(w.n, (threads, 4), ROWS_PER_THREAD, 1, y, |rows, out| unsafe {
            x86_64::avx512::avx512_gemv_q4q8_rows(w, x, bias, rows, out)
        }),
        _ => {
            for (r, out) in y[..w.n].iter_mut().enumerate() {
                *out = generic::generic_q4q8_row(w, x, bias, r);
            }
        }
    }
}

/// W4A8 for a batch of quantized inputs: `y` is `[xs.len(), w.n]` row-major; see
/// [`gemm_q4q8_rows`].
pub fn gemm_q4q8(w: &PackedQ4, xs: &[QuantizedInput], bias: Option<&[f32]>, y: &mut [f32], threads: usize) {
    if xs.len() == 1 {
        return gemv_q4q8(w, &xs[0], bias, y, threads);
    }
    let rows: Vec<QRow> = xs.iter().map(QuantizedInput::row).collect();
    gemm_q4q8_rows(w, &rows, bias, y, Layout::InputMajor, threads)
}

/// Where a batched W4A8 kernel writes output `(input c, channel r)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// `y[c * n + r]`: one row of outputs per input (a batch of GEMVs).
    InputMajor,
    /// `y[r * inputs + c]`: one row per output channel (a convolution's `[C, H * W]` output).
    ChannelMajor,
    /// `y[r * stride + c]`: one row per output channel of `stride` values, the inputs filling the
    /// first of them (a block of a convolution's output positions); one thread.
    ChannelStride(usize),
}

impl Layout {
    /// The strides `(per input, per output channel)` of this layout for `n` channels and `inputs`
    /// inputs, having checked that `y_len` outputs hold them all.
    fn strides(self, n: usize, inputs: usize, y_len: usize) -> (usize, usize) {
        let (strides, need) = match self {
            Layout::InputMajor => ((n, 1), inputs * n),
            Layout::ChannelMajor => ((1, inputs), inputs * n),
            Layout::ChannelStride(stride) => {
                assert!(stride >= inputs, "channel stride {stride} below {inputs} inputs");
                ((1, stride), (n.max(1) - 1) * stride + inputs)
            }
        };
        assert!(y_len >= need, "{y_len} outputs for {inputs} inputs x {n} channels in {self:?}");
        strides
    }
}

/// A pointwise (1 x 1, stride 1, no padding) W4A8 convolution of one image with AVX-512 VNNI:
/// `planes` the image quantized by [`generic::quantize_i8_into`], channel-major `[C][positions]`
/// (C = `w.k`), into `y` `[w.n][positions]`; every output exactly [`generic::generic_q4q8_row`] of
/// that position's channels (its im2col row). Positions in vector lanes: the small-channel layers
/// of MobileNet-class CNNs (8-96 channels at 42 x 42) reach the row kernels as thousands of short
/// rows. The `post` ops ([`Post`]) are applied to each output before it is stored. AVX-512 VNNI:
/// sixteen lanes, four channels per `vpdpbusd`; AVX2: eight lanes, four channels per `vpmaddubsw`
/// (`x86_64::avx2::avx2_pointwise_q4q8`, one image at a time, the `post` ops in registers where
/// they are clamps and FakeQuants).
/// Returns false, writing nothing, on a CPU without AVX2 (or with `SQIL_ISA=generic`).
#[allow(clippy::too_many_arguments)]
pub fn pointwise_q4q8(
    w: &PackedQ4,
    planes: &[i8],
    positions: usize,
    zero: i32,
    scale: f32,
    bias: Option<&[f32]>,
    post: &[Post],
    y: &mut [f32],
) -> bool {
    pointwise_q4q8_images(w, planes, (1, positions), zero, scale, bias, post, y)
}

/// [`pointwise_q4q8`] of `images` images of `positions` positions each, one after the other in
/// `planes` (each `[C][positions]`) and in `y` (each `[w.n][positions]`): the same outputs, with
/// the images' positions side by side in the vector lanes where each has at least
/// [`POINTWISE_IMAGE_MIN_POSITIONS`] (one image at a time otherwise). On a small map one image
/// fills a few lanes of each vector (9 of 16 on a 3 x 3 map); several fill them, and each weight
/// read serves them all (`cargo bench -p sqil-kernels-cpu --bench pointwise`).
#[allow(clippy::too_many_arguments)]
pub fn pointwise_q4q8_images(
    w: &PackedQ4,
    planes: &[i8],
    (images, positions): (usize, usize),
    zero: i32,
    scale: f32,
    bias: Option<&[f32]>,
    post: &[Post],
    y: &mut [f32],
) -> bool {
    let all = images * positions;
    assert!(planes.len() >= w.k * all && y.len() >= w.n * all);
    assert!(bias.is_none_or(|b| b.len() >= w.n) && (-128..=127).contains(&zero));
    #[cfg(target_arch = "x86_64")]
    if isa() == Isa::Avx512Vnni && all > 0 {
        if images > 1 && positions < POINTWISE_IMAGE_MIN_POSITIONS {
            let (per_in, per_out) = (w.k * positions, w.n * positions);
            for (x, y) in planes.chunks_exact(per_in).zip(y.chunks_exact_mut(per_out)).take(images) {
                pointwise_q4q8_images(w, x, (1, positions), zero, scale, bias, post, y);
            }
            return true;
        }
        let p_pad = all.next_multiple_of(16);
        // The ops the kernel applies in registers, then the rest over its outputs.
        let (post, rest) = x86_64::avx512::pointwise_split(post);
        return X4.with_borrow_mut(|x4| {
            // The quads that hold channels (the padding's weights are zero: see the kernel).
            let x4 = generic::aligned64(x4, w.k.div_ceil(4) * p_pad);
            // SAFETY: isa() checked AVX-512 F/BW/VNNI (and AVX2, FMA); each image has at least
            // the positions the kernel needs (checked above).
            unsafe {
                x86_64::avx512::avx512_interleave_quads_images(planes, w.k, (images, positions), p_pad, x4);
                x86_64::avx512::avx512_pointwise_q4q8_images(
                    w,
                    w.quad_words(),
                    x4,
                    (images, positions, p_pad),
                    zero,
                    scale,
                    bias,
                    post,
                    y,
                );
            }
            generic::post_in_place(&mut y[..w.n * all], rest);
            true
        });
    }
    #[cfg(target_arch = "x86_64")]
    if isa() == Isa::Avx2 && all > 0 {
        let (per_in, per_out) = (w.k * positions, w.n * positions);
        // The ops the kernel applies in registers, then the rest over its outputs.
        let (reg, rest) = generic::post_split(post);
        return X4.with_borrow_mut(|x4| {
            let x4 = generic::aligned64(x4, w.k.div_ceil(4) * positions.next_multiple_of(8));
            for (x, y) in planes.chunks_exact(per_in).zip(y.chunks_exact_mut(per_out)).take(images) {
                // SAFETY: isa() checked AVX2 and FMA; the sizes are asserted above and x4 sized
                // here; `reg` holds ops applied in registers only.
                unsafe { x86_64::avx2::avx2_pointwise_q4q8(w, x, positions, (zero, scale), bias, reg, x4, y) };
                generic::post_in_place(y, rest);
            }
            true
        });
    }
    let _ = (planes, zero, scale, bias, post, y);
    false
}

/// The fewest positions per image with which [`pointwise_q4q8_images`] puts several images side
/// by side in the vector lanes (a vector of 16 lanes then spans at most three images).
pub const POINTWISE_IMAGE_MIN_POSITIONS: usize = 8;

#[cfg(target_arch = "x86_64")]
thread_local! {
    /// The pointwise kernels' interleaved positions ([`x86_64::avx512::avx512_interleave_quads`]).
    static X4: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// What feeds a depthwise convolution in [`depthwise_chain`].
#[derive(Clone, Copy)]
pub enum ChainIn<'a> {
    /// Its input image, `[channels, positions]`.
    Image(&'a [f32]),
    /// A pointwise W4A8 convolution's outputs, as [`pointwise_q4q8`] takes its arguments: the
    /// image quantized (`planes`, `[w.k][positions]`) under `(scale, zero)`, its `bias` and
    /// epilogue `post`.
    Pointwise { w: &'a PackedQ4, planes: &'a [i8], zero: i32, scale: f32, bias: Option<&'a [f32]>, post: &'a [Post] },
}

/// Where a depthwise convolution's outputs go in [`depthwise_chain`].
pub enum ChainOut<'a> {
    /// `[channels, output positions]`.
    Image(&'a mut [f32]),
    /// Into a pointwise W4A8 convolution: the outputs quantized by its input quantizer
    /// `(scale, zero, lo, hi)` as [`generic::quantize_i8_into`] does, then [`pointwise_q4q8`]
    /// with its `bias` and epilogue `post` into `y` (`[w.n][output positions]`).
    Pointwise {
        w: &'a PackedQ4,
        quant: (f32, i32, i32, i32),
        bias: Option<&'a [f32]>,
        post: &'a [Post],
        y: &'a mut [f32],
    },
}

/// How [`depthwise_chain`] went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chain {
    /// The outputs are written.
    Done,
    /// Not this path's (see [`depthwise_chain`]); nothing was computed.
    NotTaken,
    /// A depthwise output feeding a pointwise convolution was NaN, which its int8 quantizer
    /// cannot carry: nothing valid was written (the steps one by one mark what it reaches).
    Nan,
}

#[cfg(target_arch = "x86_64")]
thread_local! {
    /// The next pointwise convolution's levels in [`depthwise_chain`].
    static X4_OUT: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A depthwise convolution `dw` ([`generic::depthwise_conv`]) with what feeds it and what it feeds
/// in one pass, without the `[C, positions]` images between the steps: a pointwise W4A8
/// convolution before it ([`ChainIn::Pointwise`]) writes straight into the depthwise kernel's
/// padded channels-last buffer, and one after it ([`ChainOut::Pointwise`]) takes the depthwise
/// outputs as its int8 levels from the kernel's channels-last results. The outputs are those of
/// the steps one after the other, bit for bit. [`Chain::NotTaken`], nothing computed, where this
/// path does not apply: no AVX2; a depthwise of fewer than 8 channels, over 25 taps or
/// other than 1-D or 2-D; the pointwise convolutions' channels or positions not the depthwise's,
/// a zero point outside int8; into a pointwise convolution, a depthwise epilogue op not applied
/// in registers (HardSwish, SiLU).
pub fn depthwise_chain(input: ChainIn, dw: &generic::DepthwiseArgs, output: ChainOut) -> Chain {
    depthwise_chain_images(1, input, dw, output)
}

/// [`depthwise_chain`] on `images` images, one after the other in each buffer of `input` and
/// `output` (each image's as [`depthwise_chain`] takes it): the same outputs, with the pointwise
/// convolutions' positions of all the images side by side in the vector lanes
/// ([`pointwise_q4q8_images`]; each image then needs [`POINTWISE_IMAGE_MIN_POSITIONS`] output
/// positions where the chain feeds a pointwise convolution, else [`Chain::NotTaken`]).
pub fn depthwise_chain_images(images: usize, input: ChainIn, dw: &generic::DepthwiseArgs, output: ChainOut) -> Chain {
    let channels = dw.weights.len() / dw.geo.kernel_len().max(1);
    let (positions, ol) = (dw.geo.input_len(), dw.geo.output_len());
    if images == 0 {
        return Chain::NotTaken;
    }
    if let ChainIn::Pointwise { w, planes, zero, bias, .. } = input {
        if w.n != channels || planes.len() < images * w.k * positions || !(-128..=127).contains(&zero) {
            return Chain::NotTaken;
        }
        assert!(bias.is_none_or(|b| b.len() >= w.n));
    }
    if let ChainIn::Image(x) = input {
        if x.len() < images * channels * positions {
            return Chain::NotTaken;
        }
    }
    if let ChainOut::Pointwise { w, quant, bias, ref y, .. } = output {
        if w.k != channels || y.len() < images * w.n * ol || !(-128..=127).contains(&quant.1) {
            return Chain::NotTaken;
        }
        if images > 1 && ol < POINTWISE_IMAGE_MIN_POSITIONS {
            return Chain::NotTaken;
        }
        assert!(bias.is_none_or(|b| b.len() >= w.n));
    }
    #[cfg(target_arch = "x86_64")]
    if isa() == Isa::Avx512Vnni && positions > 0 {
        return X4.with_borrow_mut(|x4| {
            X4_OUT.with_borrow_mut(|x4_out| chain_avx512(images, input, dw, output, x4, x4_out))
        });
    }
    #[cfg(target_arch = "x86_64")]
    if isa() == Isa::Avx2 && positions > 0 {
        // One image at a time (the AVX2 pointwise kernel takes one image's positions).
        let (per_in, per_out) = (dw.geo.input_len(), dw.geo.output_len());
        let mut output = output;
        for i in 0..images {
            let input = match input {
                ChainIn::Image(x) => ChainIn::Image(&x[i * channels * per_in..(i + 1) * channels * per_in]),
                ChainIn::Pointwise { w, planes, zero, scale, bias, post } => {
                    let planes = &planes[i * w.k * per_in..(i + 1) * w.k * per_in];
                    ChainIn::Pointwise { w, planes, zero, scale, bias, post }
                }
            };
            let out = match output {
                ChainOut::Image(ref mut y) => {
                    ChainOut::Image(&mut y[i * channels * per_out..(i + 1) * channels * per_out])
                }
                ChainOut::Pointwise { w, quant, bias, post, ref mut y } => {
                    let y = &mut y[i * w.n * per_out..(i + 1) * w.n * per_out];
                    ChainOut::Pointwise { w, quant, bias, post, y }
                }
            };
            let done = X4.with_borrow_mut(|x4| X4_OUT.with_borrow_mut(|x4_out| chain_avx2(input, dw, out, x4, x4_out)));
            if done != Chain::Done {
                return done;
            }
        }
        return Chain::Done;
    }
    let _ = (input, output);
    Chain::NotTaken
}

thread_local! {
    /// [`chain_avx2`]'s pointwise outputs before the depthwise kernel's buffer, `[n][positions]`.
    #[cfg(target_arch = "x86_64")]
    static CHAIN_IMAGE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// [`depthwise_chain`] of one image on AVX2, its arguments checked, with the quad words' buffers
/// of the pointwise convolutions before and after: a pointwise convolution before the depthwise
/// one writes its outputs as an image (its ops not applied in registers over them), which is
/// copied into the depthwise kernel's buffer; the depthwise outputs go to the next pointwise
/// convolution as its levels (`avx2_depthwise_levels`) with no image, quantizer pass or
/// interleave between them.
#[cfg(target_arch = "x86_64")]
fn chain_avx2(
    input: ChainIn,
    dw: &generic::DepthwiseArgs,
    output: ChainOut,
    x4: &mut Vec<u32>,
    x4_out: &mut Vec<u32>,
) -> Chain {
    let channels = dw.weights.len() / dw.geo.kernel_len().max(1);
    let (positions, ol) = (dw.geo.input_len(), dw.geo.output_len());
    let fill = |buf: &mut [f32], m: &generic::PadMap| match input {
        ChainIn::Image(x) => generic::depthwise_image_into(x, dw.geo, channels, m, buf),
        ChainIn::Pointwise { w, planes, zero, scale, bias, post } => CHAIN_IMAGE.with_borrow_mut(|image| {
            let image = generic::aligned64(image, w.n * positions);
            let x4 = generic::aligned64(x4, w.k.div_ceil(4) * positions.next_multiple_of(8));
            let (reg, rest) = generic::post_split(post);
            // SAFETY: isa() checked AVX2 and FMA; the sizes were checked by the caller and the
            // buffers sized here; `reg` holds ops applied in registers only.
            unsafe { x86_64::avx2::avx2_pointwise_q4q8(w, planes, positions, (zero, scale), bias, reg, x4, image) };
            generic::post_in_place(image, rest);
            generic::depthwise_image_into(image, dw.geo, channels, m, buf)
        }),
    };
    let fed = (channels, 1);
    match output {
        ChainOut::Image(out) => match generic::depthwise_fed(dw, fed, fill, generic::DwOut::Planes(out)) {
            Some(_) => Chain::Done,
            None => Chain::NotTaken,
        },
        ChainOut::Pointwise { w, quant, bias, post, y } => {
            let o_pad = ol.next_multiple_of(8);
            let x4_out = generic::aligned64(x4_out, channels.div_ceil(4) * o_pad);
            let levels = generic::DwOut::Levels { quant, x4: &mut *x4_out, p_pad: o_pad };
            match generic::depthwise_fed(dw, fed, fill, levels) {
                None => Chain::NotTaken,
                Some(true) => Chain::Nan,
                Some(false) => {
                    let (reg, rest) = generic::post_split(post);
                    // SAFETY: isa() checked AVX2 and FMA; the levels hold ceil(w.k / 4) rows of
                    // o_pad words (w.k is the depthwise's channels), `y` w.n * ol values.
                    unsafe {
                        x86_64::avx2::avx2_pointwise_q4q8_quads(
                            w,
                            x4_out,
                            (ol, o_pad),
                            (quant.1, quant.0),
                            bias,
                            reg,
                            y,
                        )
                    };
                    generic::post_in_place(&mut y[..w.n * ol], rest);
                    Chain::Done
                }
            }
        }
    }
}

/// [`depthwise_chain_images`] on AVX-512 VNNI, its arguments checked, with the interleaved
/// levels' buffers of the pointwise convolution before and after.
#[cfg(target_arch = "x86_64")]
fn chain_avx512(
    images: usize,
    input: ChainIn,
    dw: &generic::DepthwiseArgs,
    output: ChainOut,
    x4: &mut Vec<u32>,
    x4_out: &mut Vec<u32>,
) -> Chain {
    let channels = dw.weights.len() / dw.geo.kernel_len().max(1);
    let (positions, ol) = (dw.geo.input_len(), dw.geo.output_len());
    let p_pad = (images * positions).next_multiple_of(16);
    let mut fill = |buf: &mut [f32], m: &generic::PadMap| match input {
        ChainIn::Image(x) => {
            for (x, buf) in x.chunks_exact(channels * positions).zip(buf.chunks_exact_mut(m.len())) {
                generic::depthwise_image_into(x, dw.geo, channels, m, buf)
            }
        }
        ChainIn::Pointwise { w, planes, zero, scale, bias, post } => {
            let x4 = generic::aligned64(x4, w.k.div_ceil(4) * p_pad);
            // SAFETY: isa() checked AVX-512 F/BW/VNNI (and AVX2, FMA); `m` describes each of
            // the images' buffers in `buf`.
            unsafe {
                x86_64::avx512::avx512_interleave_quads_images(planes, w.k, (images, positions), p_pad, x4);
                let split = x86_64::avx512::pointwise_split(post);
                x86_64::avx512::avx512_pointwise_q4q8_padded(
                    w,
                    x4,
                    (images * positions, p_pad),
                    zero,
                    scale,
                    bias,
                    split,
                    buf,
                    m,
                );
            }
        }
    };
    let fed = (channels, images);
    match output {
        ChainOut::Image(out) => match generic::depthwise_fed(dw, fed, &mut fill, generic::DwOut::Planes(out)) {
            Some(_) => Chain::Done,
            None => Chain::NotTaken,
        },
        ChainOut::Pointwise { w, quant, bias, post, y } => {
            let o_pad = (images * ol).next_multiple_of(16);
            let x4_out = generic::aligned64(x4_out, channels.div_ceil(4) * o_pad);
            let levels = generic::DwOut::Levels { quant, x4: &mut *x4_out, p_pad: o_pad };
            match generic::depthwise_fed(dw, fed, &mut fill, levels) {
                None => Chain::NotTaken,
                Some(true) => Chain::Nan,
                Some(false) => {
                    let (reg, rest) = x86_64::avx512::pointwise_split(post);
                    // SAFETY: isa() checked AVX-512 F/BW/VNNI, AVX2 and FMA; the levels hold
                    // ceil(w.k / 4) rows of o_pad words, `y` w.n * ol values per image, and
                    // several images have POINTWISE_IMAGE_MIN_POSITIONS positions each (checked).
                    unsafe {
                        x86_64::avx512::avx512_pointwise_q4q8_images(
                            w,
                            w.quad_words(),
                            x4_out,
                            (images, ol, o_pad),
                            quant.1,
                            quant.0,
                            bias,
                            reg,
                            y,
                        )
                    };
                    generic::post_in_place(&mut y[..images * w.n * ol], rest);
                    Chain::Done
                }
            }
        }
    }
}

/// W4A8 on a batch of inputs with the best kernel for this CPU; every variant equals
/// `generic::generic_q4q8_row` bit for bit. Threads split the inputs (`InputMajor`: each thread
/// reads every weight for its inputs) or the output channels (`ChannelMajor`).
pub fn gemm_q4q8_rows(w: &PackedQ4, xs: &[QRow], bias: Option<&[f32]>, y: &mut [f32], layout: Layout, threads: usize) {
    assert!(xs.iter().all(|x| x.q.len() >= w.k_pad && x.sums.len() >= w.groups()));
    assert!(bias.is_none_or(|b| b.len() >= w.n));
    let strides = layout.strides(w.n, xs.len(), y.len());
    let run = |rows: std::ops::Range<usize>, xs: &[QRow], y: &mut [f32]| match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: isa() checked AVX2 and FMA; the lengths are asserted above, and every caller
        // passes `y` holding each output index of its rows and inputs.
        Isa::Avx2 => unsafe { x86_64::avx2::avx2_gemm_q4q8(w, rows, xs, bias, y, strides) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, with AVX-512 F/BW/VNNI checked by isa().
        Isa::Avx512Vnni => unsafe { x86_64::avx512::avx512_gemm_q4q8(w, rows, xs, bias, y, strides) },
        _ => {
            for (c, &x) in xs.iter().enumerate() {
                for r in rows.clone() {
                    y[c * strides.0 + (r - rows.start) * strides.1] = generic::generic_q4q8_row(w, x, bias, r);
                }
            }
        }
    };
    // Batches of four inputs or more with the output channels in vector lanes (no horizontal
    // reductions); a channel-major layout only on one thread (threads split channels there).
    // A layer of few output channels (a policy's action head) would leave most of a 32-channel
    // block's lanes empty: batches of four or more take the row kernels there.
    let lanes = ((xs.len() >= 4 && w.n >= LANES_MIN_CHANNELS) || (xs.len() < 4 && row_lanes_at_small_batch(w)))
        && matches!(isa(), Isa::Avx2 | Isa::Avx512Vnni);
    // Sixteen inputs or more on AMX tiles where the CPU has them (the same arithmetic).
    #[cfg(target_arch = "x86_64")]
    let amx = isa() == Isa::Avx512Vnni && x86_64::amx::takes(w) && x86_64::amx::available();
    let inputs_run = |xs: &[QRow], y: &mut [f32]| {
        #[cfg(target_arch = "x86_64")]
        if amx && xs.len() >= 16 {
            // SAFETY: available() checked AMX and the tile state, isa() AVX-512 F, takes() the
            // group size; lengths asserted above; `y` holds every index of these inputs' outputs.
            return unsafe { x86_64::amx::gemm_q4q8(w, 0..w.n, xs, bias, y, strides) };
        }
        // A head of few channels: the rows in vector lanes (after AMX, which was not measured
        // against it: no AMX here).
        #[cfg(target_arch = "x86_64")]
        if head_lanes(w, xs, bias, y, strides) {
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if lanes {
            // SAFETY: isa() checked AVX2 and FMA; lengths asserted above; `y` holds every index
            // of these inputs' outputs.
            return unsafe { row_lanes_kernel(w, xs, bias, y, strides, 0..w.n) };
        }
        run(0..w.n, xs, y)
    };
    match layout {
        Layout::InputMajor => split_inputs(xs, 1, xs.len(), y, w.n, threads, inputs_run),
        Layout::ChannelMajor if lanes && threads <= 1 => inputs_run(xs, y),
        Layout::ChannelStride(_) if lanes => inputs_run(xs, y),
        Layout::ChannelStride(_) => run(0..w.n, xs, y),
        // Threads on channels only when each gets a few tiles and enough work.
        Layout::ChannelMajor => {
            let min_rows = (65536 / (xs.len() * w.k_pad).max(1)).max(8);
            split_rows(w.n, (threads, 4), min_rows, xs.len(), y, |rows, yc| run(rows, xs, yc))
        }
    }
}

/// Fewest rows a layer of fewer than [`LANES_MIN_CHANNELS`] output channels runs with the rows in
/// vector lanes ([`head_lanes`]). bc_hopper's [3 x 256] head, whole policy, interleaved: batch 64
/// 44.4 -> 41.0 us, 12 10.95 -> 10.55, 8 8.04 -> 7.78; at 4 the same (5.0 us either way).
pub const HEAD_LANES_MIN_ROWS: usize = 8;

#[cfg(target_arch = "x86_64")]
thread_local! {
    /// [`head_lanes`]' rows in the pointwise kernel's layout and its `[n][rows]` outputs.
    static HEAD: std::cell::RefCell<(Vec<u32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// W4A8 of a batch of rows (one zero point and scale) on a layer of few output channels (a
/// policy's action head) with the rows in vector lanes: [`pointwise_q4q8`]'s kernel with the rows
/// as its positions, each row's four-value quads moved straight into the kernel's interleaved
/// layout (no byte transpose), its `[n][rows]` outputs then written where `strides` puts output
/// `(row c, channel r)`: `y[c * strides.0 + r * strides.1]`. The channel-lane kernels would leave
/// most of a 32-channel block's lanes empty here and the row kernels reduce every group across
/// lanes; both kernels are [`generic::generic_q4q8_row`] per output, so the bits are the same.
/// Returns false, having done nothing, without AVX-512 VNNI, below [`HEAD_LANES_MIN_ROWS`] rows,
/// from [`LANES_MIN_CHANNELS`] channels, or where the rows' quantizers differ.
#[cfg(target_arch = "x86_64")]
fn head_lanes(w: &PackedQ4, xs: &[QRow], bias: Option<&[f32]>, y: &mut [f32], (cs, rs): (usize, usize)) -> bool {
    let Some(first) = xs.first() else { return false };
    let (zero, scale) = (first.zero, first.scale);
    if isa() != Isa::Avx512Vnni
        || xs.len() < HEAD_LANES_MIN_ROWS
        || w.n >= LANES_MIN_CHANNELS
        || !(-128..=127).contains(&zero)
        || !xs.iter().all(|x| x.zero == zero && x.scale.to_bits() == scale.to_bits())
    {
        return false;
    }
    let (p, live) = (xs.len(), w.k.div_ceil(4));
    let p_pad = p.next_multiple_of(16);
    HEAD.with_borrow_mut(|(x4, yt)| {
        let x4 = generic::aligned64(x4, live * p_pad);
        yt.resize(w.n * p, 0.0);
        // SAFETY: isa() checked AVX-512 F/BW/VNNI, AVX2 and FMA; the kernels assert the sizes
        // (every row holds `k_pad` >= 4 * live values: the caller asserts it).
        unsafe {
            x86_64::avx512::avx512_rows_to_quads(xs, w.k, p_pad, x4);
            x86_64::avx512::avx512_pointwise_q4q8(w, w.quad_words(), x4, p, p_pad, zero, scale, bias, &[], yt)
        };
        for (r, row) in yt.chunks_exact(p).enumerate() {
            for (c, &v) in row.iter().enumerate() {
                y[c * cs + r * rs] = v;
            }
        }
    });
    true
}

/// W4A8 of convolution windows read in place from their int8 image (see [`generic::QWindow`])
/// with the output channels in vector lanes, on one thread; `y` as [`gemm_q4q8_rows`] writes it
/// for `layout`. Runs on CPUs with AVX2 and returns true; elsewhere returns false having done
/// nothing (the caller gathers im2col rows instead). Equal bit for bit to the kernels on the
/// gathered rows.
pub fn conv_q4q8_windows(
    w: &PackedQ4,
    xs: &[generic::QWindow],
    bias: Option<&[f32]>,
    y: &mut [f32],
    layout: Layout,
) -> bool {
    for x in xs {
        assert!(x.offsets.iter().all(|&o| o as usize + x.run <= x.image.len()), "window offset beyond the image");
    }
    // SAFETY: every window's offsets were checked against its image just above.
    unsafe { conv_q4q8_windows_unchecked(w, xs, bias, y, layout) }
}

/// [`conv_q4q8_windows`] without the per-offset bounds check (the other checks stay).
///
/// # Safety
/// Every window's offsets are at most `image.len() - run` (a caller that built them from the
/// convolution's geometry once, as the runtime's plan does).
pub unsafe fn conv_q4q8_windows_unchecked(
    w: &PackedQ4,
    xs: &[generic::QWindow],
    bias: Option<&[f32]>,
    y: &mut [f32],
    layout: Layout,
) -> bool {
    for x in xs {
        assert!(x.run > 0 && x.run.is_multiple_of(4) && x.offsets.len() * x.run == w.k_pad, "window runs");
        assert!(w.group.is_multiple_of(x.run) || x.run.is_multiple_of(w.group), "runs against groups of {}", w.group);
    }
    assert!(bias.is_none_or(|b| b.len() >= w.n));
    let strides = layout.strides(w.n, xs.len(), y.len());
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: isa() checked AVX2 and FMA; windows (by the caller) and output extent asserted.
        Isa::Avx2 | Isa::Avx512Vnni => {
            unsafe { lanes_kernel(w, xs, bias, y, strides, 0..w.n) };
            true
        }
        _ => false,
    }
}

/// Weight-only W4 GEMV on f32 activations (`x` at least `w.k_pad` long, zero-padded), with the
/// best kernel for this CPU; bit for bit `generic::generic_gemv_q4f32` (one arithmetic on every CPU).
/// Weight-only W4 on a batch of float inputs (`x`: `inputs` rows of `k_pad` values, zero past
/// `k`; `y`: `[inputs, n]`), each row equal bit for bit to [`gemv_q4f32`] on it; threads split the
/// inputs.
pub fn gemm_q4f32(w: &PackedQ4, x: &[f32], inputs: usize, bias: Option<&[f32]>, y: &mut [f32], threads: usize) {
    assert!(x.len() >= inputs * w.k_pad && y.len() >= inputs * w.n && bias.is_none_or(|b| b.len() >= w.n));
    match isa() {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512Vnni if inputs > 1 => {
            // SAFETY: isa() checked AVX2 and FMA; each chunk's lengths follow from the assert.
            let run = |xc: &[f32], yc: &mut [f32]| unsafe {
                x86_64::avx2::avx2_gemm_q4f32(w, xc, yc.len() / w.n.max(1), bias, yc)
            };
            split_inputs(x, w.k_pad, inputs, y, w.n, threads, run);
        }
        _ => {
            for (xc, yc) in x.chunks(w.k_pad).zip(y.chunks_mut(w.n)).take(inputs) {
                gemv_q4f32(w, xc, bias, yc, threads);
            }
        }
    }
}

pub fn gemv_q4f32(w: &PackedQ4, x: &[f32], bias: Option<&[f32]>, y: &mut [f32], threads: usize) {
    assert!(x.len() >= w.k_pad && y.len() >= w.n && bias.is_none_or(|b| b.len() >= w.n));
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: isa() checked AVX2 and FMA; the lengths are asserted above.
        Isa::Avx2 | Isa::Avx512Vnni => split_rows(w.n, (threads, 4), ROWS_PER_THREAD, 1, y, |rows, out| unsafe {
            x86_64::avx2::avx2_gemv_q4f32_rows(w, x, bias, rows, out)
        }),
        _ => generic::generic_gemv_q4f32(w, x, bias, y),
    }
}
