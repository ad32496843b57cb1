//! Int4 convolutions on the W4A8 kernels: a Conv whose weight is a 2-4 bit FakeQuant of a
//! constant and whose input has a per-tensor int8 quantizer runs as int8 im2col (the input
//! quantized once per image, channels innermost, then each output position's window gathered
//! as rows of bytes) against the packed weights, writing the `[C_out, positions]` output
//! directly (the kernels' channel-major layout).
//!
//! The reduction axis of a convolution's packed rows is ordered `(tap, channel)`, not ONNX's
//! `(channel, tap)`: a window then gathers contiguous runs of `C` bytes, and the usual int4
//! scale layout of a Conv weight (blocks along the input channels, one scale per output channel
//! and tap, `[O, C / b, kh, kw]`) becomes contiguous groups of the packed row. Scales that vary
//! within a group of a multiple of 32 are not representable: such a Conv stays a reference op.

use crate::plan::{weight_quant, WeightQuant};
use sqil_ir::ops::quant::{fake_quant_range, param_index};
use sqil_ir::ops::ConvAttrs;
use sqil_ir::{Graph, Result, ValueRef};
use sqil_kernels_cpu::generic::{quantize_i8_into, round_even, QRow};
use sqil_kernels_cpu::{ConvGeometry, Layout, PackedQ4};
use std::cell::RefCell;

/// How a convolution's input becomes the rows of a Q4 step.
#[derive(Clone, Debug, PartialEq)]
pub struct Im2col {
    /// Input channels.
    pub channels: usize,
    /// The window geometry (input and output spatial extent, static when the plan is built;
    /// kernel, strides, dilations, padding).
    pub geo: ConvGeometry,
    /// Per (tap, output position) the flat input position, or `u32::MAX` in padding.
    pub table: Vec<u32>,
}

/// A Q4 convolution's weight, ints `[n, taps * C]` in `(tap, channel)` order, its scales
/// `[n, groups]`, `n`, `k`, `group` (0: one scale per output channel), or `None` when the
/// quantizer's scales are not constant over such groups.
pub(crate) type ConvWeight = (Vec<i8>, Vec<f32>, usize, usize, usize);

/// The geometry of Conv node `n` on input `x` and weight FakeQuant `w`, if it is a plain
/// (ungrouped) convolution over static spatial dimensions.
pub(crate) fn conv_geometry(g: &Graph, c: &ConvAttrs, x: ValueRef, w: ValueRef) -> Option<Im2col> {
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
    Some(Im2col { channels: xs[0], table: table.into_iter().map(|t| t.map_or(u32::MAX, |i| i as u32)).collect(), geo })
}

/// The int4 weight of a convolution (weight `w` = FakeQuant of a constant `[O, C, kernel...]`),
/// with the reduction axis in `(tap, channel)` order; see [`ConvWeight`].
pub(crate) fn conv_weight(g: &Graph, w: ValueRef, shape_only: bool) -> Result<Option<ConvWeight>> {
    let Some(WeightQuant { bits, axis, block_size, w: wt, scales: st }) = weight_quant(g, w) else { return Ok(None) };
    if wt.rank() < 3 {
        return Ok(None);
    }
    let (o, ch) = (wt.shape[0], wt.shape[1]);
    let taps: usize = wt.shape[2..].iter().product();
    let k = taps * ch;
    let idx = param_index(&wt.shape, &st.shape, axis, block_size)?;
    // Element (o, c, t) of the ONNX layout is idx[(o * ch + c) * taps + t]. Try one scale per
    // output channel, then groups of `gs` channels of one tap (gs a multiple of 32 dividing C).
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
        match (32..=ch).rev().filter(|gs| gs % 32 == 0 && ch % gs == 0).find(|&gs| uniform(Some(gs))) {
            Some(gs) => gs,
            None => return Ok(None),
        }
    };
    if shape_only {
        return Ok(Some((vec![], vec![], o, k, group)));
    }
    let (lo, hi) = fake_quant_range(bits, true);
    let (wv, sv) = (wt.data.to_f32_vec(), st.data.to_f32_vec());
    let groups = k.checked_div(group).unwrap_or(1);
    let mut q = vec![0i8; o * k];
    let mut scales = vec![0f32; o * groups];
    for r in 0..o {
        for c in 0..ch {
            for t in 0..taps {
                let i = (r * ch + c) * taps + t;
                let s = sv[idx[i]];
                let col = t * ch + c;
                q[r * k + col] = round_even(wv[i] / s).clamp(lo as f32, hi as f32) as i8;
                scales[r * groups + col.checked_div(group).unwrap_or(0)] = s;
            }
        }
    }
    Ok(Some((q, scales, o, k, group)))
}

/// `q * scale` of a packed convolution weight back in the ONNX `[O, C, taps]` layout.
pub(crate) fn dequantized_conv_weight(w: &PackedQ4, channels: usize) -> Vec<f32> {
    let taps = w.k / channels;
    let groups = w.groups();
    let mut out = vec![0f32; w.n * w.k];
    for r in 0..w.n {
        for t in 0..taps {
            for c in 0..channels {
                let col = t * channels + c;
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

/// `dst.copy_from_slice(src)`, with the usual channel counts at a length known when compiled
/// (a few vector moves instead of a `memcpy` call per run).
#[inline]
fn copy_run(dst: &mut [i8], src: &[i8]) {
    fn fixed<const N: usize>(dst: &mut [i8], src: &[i8]) {
        for (d, s) in dst.chunks_exact_mut(N).zip(src.chunks_exact(N)) {
            let d: &mut [i8; N] = d.try_into().expect("N");
            *d = s.try_into().expect("N");
        }
    }
    match dst.len() {
        n if n % 32 == 0 => fixed::<32>(dst, src),
        n if n % 16 == 0 => fixed::<16>(dst, src),
        _ => dst.copy_from_slice(src),
    }
}

/// Runs a Q4 convolution on `images` images `x` (`[N, C, input...]`, f32) with the int8 input
/// quantizer `(scale, zero, lo, hi)`; returns `[N, O, output...]` values (ReLU applied if asked).
#[allow(clippy::too_many_arguments)]
pub(crate) fn run(
    im: &Im2col,
    w: &PackedQ4,
    x: &[f32],
    images: usize,
    (scale, zero, lo, hi): (f32, i32, i32, i32),
    bias: Option<&[f32]>,
    relu: bool,
    threads: usize,
) -> Vec<f32> {
    let (ch, il, ol, taps) = (im.channels, im.geo.input_len(), im.geo.output_len(), im.geo.kernel_len());
    let groups = w.groups();
    let mut out = vec![0f32; images * w.n * ol];
    SCRATCH.with_borrow_mut(|s| {
        s.planes.resize(il * ch, 0);
        s.image.resize(il * ch, 0);
        s.rows.resize(ol * w.k_pad, 0);
        s.sums.resize(ol * groups, 0);
        s.bsums.resize(il * ch, 0);
        for (img, y) in x.chunks_exact(ch * il).zip(out.chunks_exact_mut(w.n * ol)) {
            // Quantize once (plane by plane, contiguous), then transpose to channels innermost.
            quantize_i8_into(img, scale, zero, lo, hi, &mut s.planes);
            for (p, px) in s.image.chunks_exact_mut(ch).enumerate() {
                for (c, d) in px.iter_mut().enumerate() {
                    *d = s.planes[c * il + p];
                }
            }
            // Sums of each position's channels in blocks of the group size (the whole row's
            // channels when the weight has one scale per output channel).
            let gs = if w.group >= w.k_pad { ch } else { w.group };
            let nb = ch / gs;
            for (px, bs) in s.image.chunks_exact(ch).zip(s.bsums.chunks_exact_mut(nb)) {
                for (sum, part) in bs.iter_mut().zip(px.chunks_exact(gs)) {
                    *sum = part.iter().map(|&v| v as i32).sum();
                }
            }
            // Gather each output position's window: `taps` runs of C bytes, padding = zero
            // point (adds nothing: the kernels sum (x - zero) * w), k_pad tail = 0 against zero
            // weights. The group sums come from the position sums (the tail adds nothing).
            let pad = zero.clamp(-128, 127) as i8;
            let per_channel = groups == 1;
            for (o, (row, sums)) in s.rows.chunks_exact_mut(w.k_pad).zip(s.sums.chunks_exact_mut(groups)).enumerate() {
                let mut total = 0;
                for t in 0..taps {
                    let dst = &mut row[t * ch..(t + 1) * ch];
                    let blocks = match im.table[t * ol + o] {
                        u32::MAX => {
                            dst.fill(pad);
                            None
                        }
                        p => {
                            let p = p as usize;
                            copy_run(dst, &s.image[p * ch..(p + 1) * ch]);
                            Some(&s.bsums[p * nb..(p + 1) * nb])
                        }
                    };
                    for b in 0..nb {
                        let v = blocks.map_or(pad as i32 * gs as i32, |bs| bs[b]);
                        if per_channel {
                            total += v;
                        } else {
                            sums[t * nb + b] = v;
                        }
                    }
                }
                if per_channel {
                    sums[0] = total;
                }
                row[w.k..].fill(0);
            }
            let xs: Vec<QRow> = s
                .rows
                .chunks_exact(w.k_pad)
                .zip(s.sums.chunks_exact(groups))
                .map(|(q, sums)| QRow { q, sums, zero, scale })
                .collect();
            sqil_kernels_cpu::gemm_q4q8_rows(w, &xs, bias, y, Layout::ChannelMajor, threads);
        }
    });
    if relu {
        out.iter_mut().for_each(|v| *v = v.max(0.0));
    }
    out
}
