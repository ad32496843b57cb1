//! Int4 convolutions on the W4A8 kernels: a Conv whose weight is a 2-4 bit FakeQuant of a
//! constant and whose input has a per-tensor int8 quantizer runs as int8 im2col (the input
//! quantized once per image, channels innermost, then each output position's window gathered
//! as rows of bytes) against the packed weights, writing the `[C_out, positions]` output
//! directly (the kernels' channel-major layout).
//!
//! The reduction axis of a convolution's packed rows is ordered `(tap, channel)`, not ONNX's
//! `(channel, tap)`: a window then gathers contiguous runs of `C` bytes, and the usual int4
//! scale layout of a Conv weight (blocks along the input channels, one scale per output channel
//! and tap, `[O, ceil(C / b), kh, kw]`) becomes contiguous groups of the packed row. Blocks that
//! do not tile the channels (40 channels in blocks of 32, 16 channels in blocks of 32 per tap)
//! pad each tap's run of C to the next multiple of the block (zero weights, zero bytes: see
//! [`Im2col::run`]); a 1 x 1 convolution needs no padding (its last group is short, as a linear
//! layer's). Scales that vary within a block of a multiple of 32, or blocks that would pad a run
//! to more than twice its channels, are not taken: such a Conv stays a float op.

use super::{weight_quant, WeightQuant};
use crate::graph::{Graph, ValueRef};
use crate::ops::quant::{fake_quant_range, param_index};
use crate::ops::ConvAttrs;
use crate::Result;
use sqil_kernels_cpu::generic::DepthwiseArgs;
use sqil_kernels_cpu::generic::{quantize_i8_into, round_even, transpose_i8, transpose_i8_xor, QRow, QWindow};
use sqil_kernels_cpu::{post_in_place, ConvGeometry, Layout, PackedQ4, Post};
use std::cell::RefCell;

/// A float Conv's per-image input shape (`[C, spatial...]`) and the im2col gather table of its
/// geometry for that shape.
pub type ConvTable = (Vec<usize>, Vec<Option<usize>>);

/// How a convolution's input becomes the rows of a Q4 step.
#[derive(Clone, Debug, PartialEq)]
pub struct Im2col {
    /// Input channels.
    pub channels: usize,
    /// The window geometry (input and output spatial extent, static when the plan is built;
    /// kernel, strides, dilations, padding).
    pub geo: ConvGeometry,
    /// Per (output position, tap) the flat input position, or `u32::MAX` in padding (position
    /// major: one window's entries are adjacent).
    pub table: Vec<u32>,
    /// `table` as byte offsets into the channels-innermost image (`position * C`), padding at
    /// the zero-point run kept past the image (`input_len * C`): the in-place kernel's windows
    /// (empty if they overflow u32).
    pub offsets: Vec<u32>,
    /// A 1 x 1 convolution whose every output position reads the same input position (stride 1,
    /// no padding): the image's channel planes are its im2col rows' columns as they are.
    pub pointwise: bool,
    /// Bytes per tap in a packed row: `channels`, or with several taps and scale blocks that do
    /// not tile the channels, `channels` rounded up to the block (the packed row's `k` is
    /// `taps * run`; the weights past `channels` in each run are zero, and so are the row's
    /// bytes there). Set by [`conv_weight`]'s caller from the weight's `k`.
    pub run: usize,
}

/// A Q4 convolution's weight, ints `[n, taps * run]` in `(tap, channel)` order (`run` as
/// [`conv_run`]), its scales `[n, groups]`, `n`, `k` (`taps * run`), `group` (0: one scale per
/// output channel), or `None` when the quantizer's scales are not constant over such groups.
pub type ConvWeight = (Vec<i8>, Vec<f32>, usize, usize, usize);

/// The geometry of Conv node `n` on input `x` and weight FakeQuant `w`, if it is a plain
/// (ungrouped) convolution over static spatial dimensions.
pub fn conv_geometry(g: &Graph, c: &ConvAttrs, x: ValueRef, w: ValueRef) -> Option<Im2col> {
    if c.group != 1 {
        return None;
    }
    let xs = g.value(x).ty.shape.iter().skip(1).map(|d| d.known()).collect::<Option<Vec<usize>>>()?;
    let ws = g.value(w).ty.known_shape()?;
    if xs.len() < 2 || ws.len() != xs.len() + 1 || ws[1] != xs[0] {
        return None;
    }
    let mut full = vec![1];
    full.extend(&xs);
    let geo = c.input_geometry(&full, &ws).ok()?;
    let table = geo.gather_table();
    if geo.input_len() >= u32::MAX as usize {
        return None;
    }
    let (taps, ol) = (geo.kernel_len(), geo.output_len());
    let table: Vec<u32> =
        (0..ol * taps).map(|i| table[(i % taps) * ol + i / taps].map_or(u32::MAX, |p| p as u32)).collect();
    // Empty when the image's bytes overflow u32 (then the windows are gathered).
    let (ch, il) = (xs[0] as u64, geo.input_len() as u64);
    let offsets = if (il + 1) * ch <= u32::MAX as u64 {
        table.iter().map(|&p| (if p == u32::MAX { il * ch } else { p as u64 * ch }) as u32).collect()
    } else {
        vec![]
    };
    let pointwise = taps == 1 && ol == geo.input_len() && table.iter().enumerate().all(|(o, &p)| p as usize == o);
    Some(Im2col { channels: xs[0], table, geo, offsets, pointwise, run: xs[0] })
}

/// The im2col gather table of a float Conv node on input `x` with weight `w` over static
/// spatial dimensions (the reference op builds it on every call; a plan keeps it).
pub fn float_conv_table(g: &Graph, c: &ConvAttrs, x: ValueRef, w: ValueRef) -> Option<Box<ConvTable>> {
    let xs = g.value(x).ty.shape.iter().skip(1).map(|d| d.known()).collect::<Option<Vec<usize>>>()?;
    let geo = c.input_geometry(&[&[1], &xs[..]].concat(), &g.value(w).ty.known_shape()?).ok()?;
    Some(Box::new((xs, geo.gather_table())))
}

/// Bytes per tap in the packed row of a convolution over `ch` channels and `taps` taps in groups
/// of `group` (0: one per output channel): `ch`, unless several taps meet groups that do not
/// tile the channels, where each tap's run is padded to the next multiple of the group.
pub fn conv_run(ch: usize, taps: usize, group: usize) -> usize {
    if taps > 1 && group > 0 && !ch.is_multiple_of(group) {
        ch.next_multiple_of(group)
    } else {
        ch
    }
}

/// The int4 weight of a convolution (weight `w` = FakeQuant of a constant `[O, C, kernel...]`),
/// with the reduction axis in `(tap, channel)` order; see [`ConvWeight`].
pub fn conv_weight(g: &Graph, w: ValueRef, shape_only: bool) -> Result<Option<ConvWeight>> {
    let Some(WeightQuant { bits, axis, block_size, w: wt, scales: st }) = weight_quant(g, w) else { return Ok(None) };
    if wt.rank() < 3 {
        return Ok(None);
    }
    let (o, ch) = (wt.shape[0], wt.shape[1]);
    let taps: usize = wt.shape[2..].iter().product();
    let idx = param_index(&wt.shape, &st.shape, axis, block_size)?;
    // Element (o, c, t) of the ONNX layout is idx[(o * ch + c) * taps + t]. Try one scale per
    // output channel, then blocks of `gs` channels of one tap (gs a multiple of 32): of the blocks
    // the scales allow, the largest that tiles the channels (the only kind taken before partial
    // blocks were, so earlier artifacts' stored groups and their simulation stay as they were);
    // else, a last block short, the one padding the rows least, then the largest.
    let scale_of = |r: usize, c: usize, t: usize| idx[(r * ch + c) * taps + t];
    let uniform = |gs: Option<usize>| {
        (0..o).all(|r| {
            (0..taps).all(|t| {
                (0..ch).all(|c| {
                    scale_of(r, c, t)
                        == match gs {
                            None => scale_of(r, 0, 0),
                            Some(gs) => scale_of(r, c - c % gs, t),
                        }
                })
            })
        })
    };
    let group = if uniform(None) {
        0
    } else {
        let fits: Vec<usize> = (32..=ch.next_multiple_of(32)).step_by(32).filter(|&gs| uniform(Some(gs))).collect();
        let tiling = fits.iter().rev().find(|&&gs| ch.is_multiple_of(gs)).copied();
        match tiling.or_else(|| fits.into_iter().min_by_key(|&gs| (conv_run(ch, taps, gs), usize::MAX - gs))) {
            // A run padded past twice its channels (a 3-channel image in blocks of 32) stays
            // float: the padding's multiply-adds would cost more than the int8 kernels save.
            Some(gs) if conv_run(ch, taps, gs) <= 2 * ch => gs,
            _ => return Ok(None),
        }
    };
    let run = conv_run(ch, taps, group);
    let k = taps * run;
    if shape_only {
        return Ok(Some((vec![], vec![], o, k, group)));
    }
    let (lo, hi) = fake_quant_range(bits, true);
    let (wv, sv) = (wt.data.to_f32_vec(), st.data.to_f32_vec());
    let groups = if group == 0 { 1 } else { k.div_ceil(group) };
    let mut q = vec![0i8; o * k];
    let mut scales = vec![0f32; o * groups];
    for r in 0..o {
        for c in 0..ch {
            for t in 0..taps {
                let i = (r * ch + c) * taps + t;
                let s = sv[idx[i]];
                let col = t * run + c;
                q[r * k + col] = round_even(wv[i] / s).clamp(lo as f32, hi as f32) as i8;
                scales[r * groups + col.checked_div(group).unwrap_or(0)] = s;
            }
        }
    }
    Ok(Some((q, scales, o, k, group)))
}

/// `q * scale` of a packed convolution weight (`taps` runs per row, see [`Im2col::run`]) back in
/// the ONNX `[O, C, taps]` layout.
pub fn dequantized_conv_weight(w: &PackedQ4, channels: usize, taps: usize) -> Vec<f32> {
    let run = w.k / taps.max(1);
    let groups = w.groups();
    let mut out = vec![0f32; w.n * channels * taps];
    for r in 0..w.n {
        for t in 0..taps {
            for c in 0..channels {
                let col = t * run + c;
                out[(r * channels + c) * taps + t] = w.get(r, col) as f32 * w.scales[r * groups + col / w.group];
            }
        }
    }
    out
}

#[derive(Default)]
struct Scratch {
    /// One image quantized, `[C, positions]`.
    planes: Vec<i8>,
    /// The same, `[positions, C]`.
    image: Vec<i8>,
    /// The im2col rows, `[out positions, k_pad]`.
    rows: Vec<i8>,
    /// Their group sums, `[out positions, groups]`.
    sums: Vec<i32>,
    /// Per input position, sums of its channels in blocks of the group size.
    bsums: Vec<i32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Copies `n` bytes in 32- and 8-byte moves (a window's runs are a few dozen bytes: a `memcpy`
/// call each costs more than the copy).
///
/// # Safety
/// `src` and `dst` valid for `n` bytes, not overlapping.
#[inline(always)]
unsafe fn copy_bytes(src: *const i8, dst: *mut i8, n: usize) {
    let mut i = 0;
    while i + 32 <= n {
        (dst.add(i) as *mut [u8; 32]).write_unaligned((src.add(i) as *const [u8; 32]).read_unaligned());
        i += 32;
    }
    while i + 8 <= n {
        (dst.add(i) as *mut u64).write_unaligned((src.add(i) as *const u64).read_unaligned());
        i += 8;
    }
    while i < n {
        *dst.add(i) = *src.add(i);
        i += 1;
    }
}

/// Gathers every output position's window of the int8 image (`[positions, C]`) as a row of
/// `rows` (`k_pad` bytes: `taps` runs of C bytes in tap order, each at a multiple of `im.run`,
/// padding = `pad`, the zero point, the bytes between runs and the tail past `k` zero) and its
/// group sums into `sums` from the per-position channel-block sums `bsums` (`nb` blocks of `gs`
/// channels, the last one short when `gs` does not divide C; one group per row when `per_row`).
#[allow(clippy::too_many_arguments)]
fn gather(
    im: &Im2col,
    windows: &[u32],
    image: &[i8],
    (bsums, nb, gs): (&[i32], usize, usize),
    pad: i8,
    (k, k_pad, groups, per_row): (usize, usize, usize, bool),
    rows: &mut [i8],
    sums: &mut [i32],
) {
    let (ch, run, taps, il) = (im.channels, im.run, im.geo.kernel_len(), im.geo.input_len());
    assert!(rows.len() >= windows.len() / taps * k_pad && sums.len() >= windows.len() / taps * groups);
    assert!(run >= ch && k == taps * run && groups == if per_row { 1 } else { taps * nb });
    assert!(per_row || nb * gs == run || run == ch, "blocks of {gs} channels do not fill runs of {run}");
    assert!(image.len() >= im.geo.input_len() * ch);
    for ((row, sums), window) in
        rows.chunks_exact_mut(k_pad).zip(sums.chunks_exact_mut(groups)).zip(windows.chunks_exact(taps))
    {
        let mut total = 0;
        for (t, &at) in window.iter().enumerate() {
            let dst = &mut row[t * run..t * run + ch];
            let blocks = if at == u32::MAX {
                dst.fill(pad);
                None
            } else {
                let p = at as usize;
                assert!(p < il, "gather table entry {p} beyond the input's {il} positions");
                // SAFETY: p < il and the image holds il * C bytes (asserted); dst is C bytes.
                unsafe { copy_bytes(image.as_ptr().add(p * ch), dst.as_mut_ptr(), ch) };
                Some(&bsums[p * nb..(p + 1) * nb])
            };
            for b in 0..nb {
                // A padding tap's block sum: `pad` times the block's channels.
                let v = blocks.map_or(pad as i32 * gs.min(ch - b * gs) as i32, |bs| bs[b]);
                if per_row {
                    total += v;
                } else {
                    sums[t * nb + b] = v;
                }
            }
        }
        if per_row {
            sums[0] = total;
        }
        if run > ch {
            row[..k].chunks_exact_mut(run).for_each(|r| r[ch..].fill(0));
        }
        row[k..].fill(0);
    }
}

/// A 1 x 1 convolution takes the pointwise kernel (positions in vector lanes) rather than the
/// row kernels with at least this many positions, or with rows shorter than
/// [`POINTWISE_LONG_ROW`] channels.
const POINTWISE_MIN_POSITIONS: usize = 64;

/// With AVX2 (eight lanes, four channels per `vpmaddubsw`), the fewest positions per image with which
/// a 1 x 1 convolution takes the pointwise kernel; below, the row kernels (MobileNetV3's layers on
/// 3 x 3 and 6 x 6 maps were slower in the lanes).
const AVX2_POINTWISE_MIN_POSITIONS: usize = 100;
const POINTWISE_LONG_ROW: usize = 384;

/// Maps of up to this many positions run several images side by side in the pointwise kernel's
/// lanes ([`sqil_kernels_cpu::pointwise_q4q8_images`]), [`POINTWISE_IMAGES`] at a time. Per
/// image, four images against one on this project's 2-vCPU Xeon (one core, `cargo bench -p
/// sqil-kernels-cpu --bench pointwise`, the same bits): MobileNetV3's 3 x 3 layers 1.4-1.5x,
/// MobileNetV2's and EfficientNet-B0's 320 -> 1280 head 1.5x, MobileNetV3's 6 x 6 layers
/// 1.2-1.3x; an 11 x 11 map (121 positions, 94% of the lanes used by one image) 0.9x.
const POINTWISE_GROUP_MAX_POSITIONS: usize = 64;
/// How many images [`POINTWISE_GROUP_MAX_POSITIONS`] puts side by side: a plan's batch comes
/// in runs of four or eight (`sqil_runtime::exec::sample_chunk`).
const POINTWISE_IMAGES: usize = 4;

/// How many of `images` images go side by side into the pointwise kernel's lanes at a time: up
/// to [`POINTWISE_IMAGES`] where the maps `fit` ([`POINTWISE_GROUP_MAX_POSITIONS`]), else one.
fn lane_group(fit: bool, images: usize) -> usize {
    if fit {
        POINTWISE_IMAGES.min(images).max(1)
    } else {
        1
    }
}

/// Output positions per block on one thread: a block's int8 rows (`BLOCK * k_pad` bytes) stay
/// in the L1/L2 cache between the gather and the kernel.
const BLOCK: usize = 64;

/// Runs a Q4 convolution on `images` images `x` (`[N, C, input...]`, f32) with the int8 input
/// quantizer `(scale, zero, lo, hi)`; returns `[N, O, output...]` values with the `post` ops
/// applied (in the pointwise kernel's registers, else over each image's outputs while they are in
/// cache).
#[allow(clippy::too_many_arguments)]
pub fn run(
    im: &Im2col,
    w: &PackedQ4,
    x: &[f32],
    images: usize,
    (scale, zero, lo, hi): (f32, i32, i32, i32),
    bias: Option<&[f32]>,
    post: &[Post],
    threads: usize,
) -> Vec<f32> {
    let (ch, il, ol, taps) = (im.channels, im.geo.input_len(), im.geo.output_len(), im.geo.kernel_len());
    let pad = zero.clamp(-128, 127) as i8;
    let mut out = crate::pool::f32_buffer(images * w.n * ol);
    // On one thread with AVX2 the kernel reads each window in place from the image (no
    // gathering): per window the byte offsets of its taps' runs, padding taps at a run of C
    // zero-point bytes kept past the image. A run padded past C to whole groups (16 channels in
    // groups of 32) reads the next position's bytes there, against zero weights: it adds exactly
    // nothing (the kernel's zero-point correction is by weight sums), so padded runs read in
    // place too, the image followed by `run` bytes.
    let in_place = threads <= 1
        && !im.offsets.is_empty()
        && w.k == w.k_pad
        && im.run >= ch
        && im.run.is_multiple_of(4)
        && (w.group.is_multiple_of(im.run) || im.run.is_multiple_of(w.group))
        && sqil_kernels_cpu::isa() != sqil_kernels_cpu::Isa::Generic;
    // Positions in lanes pay off unless a few positions meet long rows (MobileNetV2 at 84 x 84,
    // one core: its 1 x 1 layers 1.2-6x faster at 9-1764 positions, except 480 channels at 9
    // positions, where the row kernels were 1.2x faster), or there is one position (a
    // squeeze-and-excitation layer on the pooled vector: one lane of sixteen used; MobileNetV3's
    // [576 x 144] 7.3 -> 1.4 us on the row kernels). Several images of a small map side by side
    // fill the lanes whatever the rows' length (MobileNetV3's [96 x 576] on 3 x 3, batch 64:
    // 552 us on the row kernels, 481 four images at a time in the lanes).
    let fit = (sqil_kernels_cpu::POINTWISE_IMAGE_MIN_POSITIONS..=POINTWISE_GROUP_MAX_POSITIONS).contains(&il);
    let group = lane_group(fit, images);
    let pointwise = im.pointwise
        && threads <= 1
        && w.k == ch
        && il > 1
        && (group > 1 || il >= POINTWISE_MIN_POSITIONS || ch < POINTWISE_LONG_ROW)
        && (-128..=127).contains(&zero);
    // Whether any input was NaN, as the quantizer saw it (no second scan of the images).
    let mut any_nan = false;
    SCRATCH.with_borrow_mut(|s| {
        // A 1 x 1 convolution on one thread with AVX-512 VNNI or AVX2: positions in vector lanes
        // on the planes as they are (no transpose, no windows), `group` images at a time.
        let lanes = match sqil_kernels_cpu::isa() {
            sqil_kernels_cpu::Isa::Avx512Vnni => true,
            sqil_kernels_cpu::Isa::Avx2 => il >= AVX2_POINTWISE_MIN_POSITIONS,
            sqil_kernels_cpu::Isa::Generic => false,
        };
        if pointwise && lanes {
            s.planes.resize(group * il * ch, 0);
            for (imgs, y) in x.chunks(group * ch * il).zip(out.chunks_mut(group * w.n * ol)) {
                let n = imgs.len() / (ch * il);
                // The images one after the other, as the planes hold them (one value at a time).
                any_nan |= quantize_i8_into(imgs, scale, zero, lo, hi, &mut s.planes[..imgs.len()]);
                let done = sqil_kernels_cpu::pointwise_q4q8_images(w, &s.planes, (n, il), zero, scale, bias, post, y);
                assert!(done, "the pointwise kernel needs AVX2");
            }
            return;
        }
        s.planes.resize(il * ch, 0);
        s.image.resize(il * ch + im.run.max(ch), 0);
        for (img, y) in x.chunks_exact(ch * il).zip(out.chunks_exact_mut(w.n * ol)) {
            // Quantize once (plane by plane, contiguous), then transpose to channels innermost.
            any_nan |= quantize_i8_into(img, scale, zero, lo, hi, &mut s.planes);
            if in_place {
                // The lane kernel's form: sign bits flipped on the way (x + 128 as unsigned).
                transpose_i8_xor(&s.planes, ch, il, &mut s.image, 0x80);
                s.image[il * ch..].fill(pad ^ i8::MIN);
                let xs: Vec<QWindow> = im
                    .offsets
                    .chunks_exact(taps)
                    .map(|offsets| QWindow { image: &s.image, offsets, run: im.run, zero, scale })
                    .collect();
                debug_assert!(im.offsets.iter().all(|&o| o as usize + im.run <= s.image.len()));
                // SAFETY: the offsets are positions times C, at most the padding run's
                // `il * C` (built with the geometry), and the image holds `il * C + run` bytes
                // (run >= C).
                let done =
                    unsafe { sqil_kernels_cpu::conv_q4q8_windows_unchecked(w, &xs, bias, y, Layout::ChannelMajor) };
                assert!(done, "the in-place convolution kernel needs AVX2");
                post_in_place(y, post);
                continue;
            }
            transpose_i8(&s.planes, ch, il, &mut s.image);
            gathered(im, w, s, y, (scale, zero, pad), bias, threads);
            post_in_place(y, post);
        }
    });
    // (Every post op keeps NaN: applying them before the NaN windows are written is the same.)
    if any_nan {
        nan_windows(im, w.n, x, images, &mut out);
    }
    out
}

/// What feeds a depthwise convolution in [`run_depthwise_chain`]: its input images (`[images,
/// C, positions]` values), or a pointwise Q4 convolution on its own input (`x`, as [`run`] takes
/// it, with its int8 quantizer, bias and epilogue).
pub enum ChainSource<'a> {
    Image(&'a [f32]),
    Pointwise {
        im: &'a Im2col,
        w: &'a PackedQ4,
        x: &'a [f32],
        quant: (f32, i32, i32, i32),
        bias: Option<&'a [f32]>,
        post: &'a [Post],
    },
}

/// A pointwise Q4 convolution that a depthwise convolution feeds in [`run_depthwise_chain`].
pub struct ChainNext<'a> {
    pub im: &'a Im2col,
    pub w: &'a PackedQ4,
    pub quant: (f32, i32, i32, i32),
    pub bias: Option<&'a [f32]>,
    pub post: &'a [Post],
}

/// A depthwise convolution `dw` with a pointwise Q4 convolution feeding it (where the source
/// is one) and one it feeds (`next`), per image in one pass
/// ([`sqil_kernels_cpu::depthwise_chain`]), each value between them read only by the next step:
/// returns the last step's outputs (`[images, channels, output...]`), the same bits as [`run`]
/// and the depthwise Conv one after the other, or `None` where this path does not apply, and the
/// caller runs the steps: on more than one thread, a convolution that is not pointwise, an input
/// NaN (which an int8 quantizer cannot carry: [`run`] marks its outputs), or what the kernel does
/// not take.
pub fn run_depthwise_chain(
    source: ChainSource,
    images: usize,
    dw: &DepthwiseArgs,
    next: Option<ChainNext>,
    threads: usize,
) -> Option<Vec<f32>> {
    let (il, ol) = (dw.geo.input_len(), dw.geo.output_len());
    let channels = dw.weights.len() / dw.geo.kernel_len().max(1);
    let int8 = |zero: i32| (-128..=127).contains(&zero);
    let fits = |im: &Im2col, w: &PackedQ4, zero: i32| im.pointwise && w.k == im.channels && int8(zero);
    if threads > 1 || next.as_ref().is_some_and(|n| !fits(n.im, n.w, n.quant.1) || n.im.geo.input_len() != ol) {
        return None;
    }
    let per_out = next.as_ref().map_or(channels, |n| n.w.n) * ol;
    let mut out = crate::pool::f32_buffer(images * per_out);
    fn output<'b>(next: Option<&'b ChainNext>, y: &'b mut [f32]) -> sqil_kernels_cpu::ChainOut<'b> {
        match next {
            Some(n) => sqil_kernels_cpu::ChainOut::Pointwise { w: n.w, quant: n.quant, bias: n.bias, post: n.post, y },
            None => sqil_kernels_cpu::ChainOut::Image(y),
        }
    }
    let done = |c| c == sqil_kernels_cpu::Chain::Done;
    // Several images side by side in the pointwise convolutions' lanes where their maps are
    // small (as `run`'s pointwise path), each image then having the positions the kernel needs.
    let pointwise_in = matches!(source, ChainSource::Pointwise { .. });
    let small = (pointwise_in && il <= POINTWISE_GROUP_MAX_POSITIONS)
        || (next.is_some() && ol <= POINTWISE_GROUP_MAX_POSITIONS);
    let group = lane_group(small && (next.is_none() || ol >= sqil_kernels_cpu::POINTWISE_IMAGE_MIN_POSITIONS), images);
    let outs = out.chunks_mut(group * per_out);
    match source {
        ChainSource::Image(x) => {
            for (imgs, y) in x.get(..images * channels * il)?.chunks(group * channels * il).zip(outs) {
                let n = imgs.len() / (channels * il);
                let input = sqil_kernels_cpu::ChainIn::Image(imgs);
                if !done(sqil_kernels_cpu::depthwise_chain_images(n, input, dw, output(next.as_ref(), y))) {
                    return None;
                }
            }
        }
        ChainSource::Pointwise { im, w, x, quant: (scale, zero, lo, hi), bias, post } => {
            let ch = im.channels;
            if !fits(im, w, zero) || im.geo.input_len() != il {
                return None;
            }
            SCRATCH.with_borrow_mut(|s| {
                s.planes.resize(group * il * ch, 0);
                for (imgs, y) in x.get(..images * ch * il)?.chunks(group * ch * il).zip(outs) {
                    let n = imgs.len() / (ch * il);
                    let planes = &mut s.planes[..imgs.len()];
                    if quantize_i8_into(imgs, scale, zero, lo, hi, planes) {
                        return None;
                    }
                    let planes = &*planes;
                    let input = sqil_kernels_cpu::ChainIn::Pointwise { w, planes, zero, scale, bias, post };
                    if !done(sqil_kernels_cpu::depthwise_chain_images(n, input, dw, output(next.as_ref(), y))) {
                        return None;
                    }
                }
                Some(())
            })?;
        }
    }
    Some(out)
}

/// Outputs whose window holds a NaN input become NaN, as in the simulation (FakeQuant keeps a
/// NaN, and NaN x 0 is NaN), which the int8 quantizer cannot represent. Called only when the
/// quantizer saw a NaN.
fn nan_windows(im: &Im2col, n: usize, x: &[f32], images: usize, out: &mut [f32]) {
    let (ch, il, ol, taps) = (im.channels, im.geo.input_len(), im.geo.output_len(), im.geo.kernel_len());
    for (img, y) in x.chunks_exact(ch * il).zip(out.chunks_exact_mut(n * ol)).take(images) {
        let bad: Vec<bool> = (0..il).map(|p| (0..ch).any(|c| img[c * il + p].is_nan())).collect();
        for (o, window) in im.table.chunks_exact(taps).enumerate() {
            if window.iter().any(|&p| p != u32::MAX && bad[p as usize]) {
                (0..n).for_each(|r| y[r * ol + o] = f32::NAN);
            }
        }
    }
}

/// One image of a Q4 convolution through gathered im2col rows (the portable path, and the
/// threaded one): the image already quantized in `s.image` (`[positions, C]`); output
/// channel-major into `y`.
fn gathered(
    im: &Im2col,
    w: &PackedQ4,
    s: &mut Scratch,
    y: &mut [f32],
    (scale, zero, pad): (f32, i32, i8),
    bias: Option<&[f32]>,
    threads: usize,
) {
    let (ch, il, ol, taps) = (im.channels, im.geo.input_len(), im.geo.output_len(), im.geo.kernel_len());
    let groups = w.groups();
    let rows = if threads <= 1 { BLOCK.min(ol) } else { ol };
    s.rows.resize(rows * w.k_pad, 0);
    s.sums.resize(rows * groups, 0);
    // Sums of each position's channels in blocks of the group size (the whole row's channels
    // when the weight has one scale per output channel).
    let gs = if w.group >= w.k_pad { ch } else { w.group };
    let nb = ch.div_ceil(gs);
    s.bsums.resize(il * nb, 0);
    for (px, bs) in s.image[..il * ch].chunks_exact(ch).zip(s.bsums.chunks_exact_mut(nb)) {
        for (sum, part) in bs.iter_mut().zip(px.chunks(gs)) {
            *sum = part.iter().map(|&v| v as i32).sum();
        }
    }
    // Each output position's window: padding = zero point (adds nothing: the kernels sum
    // (x - zero) * w), k_pad tail = 0 against zero weights; the group sums from the position
    // sums. One thread: blocks of positions, each gathered and multiplied while its rows are in
    // cache, written into the channel rows of the output at their offset. Threads: all
    // positions gathered, then threads over the output channels.
    let block = if threads <= 1 { BLOCK } else { ol };
    for start in (0..ol).step_by(block.max(1)) {
        let end = (start + block).min(ol);
        let windows = &im.table[start * taps..end * taps];
        let geo = (w.k, w.k_pad, groups, groups == 1);
        gather(im, windows, &s.image, (&s.bsums, nb, gs), pad, geo, &mut s.rows, &mut s.sums);
        let xs: Vec<QRow> = s.rows[..(end - start) * w.k_pad]
            .chunks_exact(w.k_pad)
            .zip(s.sums.chunks_exact(groups))
            .map(|(q, sums)| QRow { q, sums, zero, scale })
            .collect();
        let layout = if block >= ol { Layout::ChannelMajor } else { Layout::ChannelStride(ol) };
        sqil_kernels_cpu::gemm_q4q8_rows(w, &xs, bias, &mut y[start..], layout, threads);
    }
}
