//! Lowered integer steps, defined once: which Gemm / MatMul / Conv nodes of a FakeQuant graph run
//! as one int4 step (convolutions: `conv`, int8 im2col) (a 2-4 bit symmetric weight FakeQuant of a constant, per channel or in groups
//! of a multiple of 32 along K (a last group K cuts short is padded with zero weights), an optional constant bias, and a per-tensor activation FakeQuant
//! with constant parameters, or float inputs), and that step's one arithmetic definition
//! ([`run_q4_linear`]): the input quantized as FakeQuant does, exact int32 sums per group, then the
//! f32 epilogue `(sum_g float(s_g) * scale_g) * x_scale + bias` in group order, through the int4
//! kernels (every SIMD kernel is bit-identical to the generic one). The reference interpreter
//! evaluates such nodes with it ([`run_q4_layer`]), and the CPU plan executes it, so the
//! simulation and the artifact agree bit for bit on these steps by construction.

pub mod conv;

use crate::graph::{Graph, NodeId, ValueRef};
use crate::ops::fused::Arg;
use crate::ops::quant::{fake_quant_range, param_index};
use crate::ops::Op;
use crate::tensor::Tensor;
use crate::{IrError, Result};
use conv::{conv_geometry, conv_weight, Im2col};
use sqil_kernels_cpu::generic::{quantize_input_into, round_even, QuantizedInput};
use sqil_kernels_cpu::PackedQ4;
use std::cell::RefCell;

/// How a Q4 layer's input is treated.
#[derive(Clone, Debug, PartialEq)]
pub enum ActQuant {
    /// Quantized in the step: `q = clamp(round(x / scale) + zero, lo, hi)` (FakeQuant semantics).
    Int { scale: f32, zero: i32, lo: i32, hi: i32 },
    /// Float activations (weight-only quantization).
    Float,
}

/// A weight a Q4 step can absorb: signed ints `[n, k]` row-major, scales, n, k, group.
pub type Q4Weight = (Vec<i8>, Vec<f32>, usize, usize, usize);

/// A signed 2-4 bit FakeQuant of a constant with constant scales and no zero point (a weight an
/// int4 step can absorb): bits, axis, block size, the float weight and the scales.
pub struct WeightQuant<'g> {
    pub bits: u8,
    pub axis: i64,
    pub block_size: i64,
    pub w: &'g Tensor,
    pub scales: &'g Tensor,
}

pub fn weight_quant(g: &Graph, w: ValueRef) -> Option<WeightQuant<'_>> {
    let Op::FakeQuant { bits, signed: true, axis, block_size } = g.node(w.node).op else { return None };
    let ins = g.inputs_of(w.node);
    let (Some(wt), Some(st)) = (ins[0].and_then(|v| g.const_value(v)), ins[1].and_then(|v| g.const_value(v))) else {
        return None;
    };
    (bits <= 4 && ins.get(2).copied().flatten().is_none()).then_some(WeightQuant {
        bits,
        axis,
        block_size,
        w: wt,
        scales: st,
    })
}

/// The weight FakeQuant a Q4 step can absorb, or `None` (`shape_only`: no ints or scales).
pub fn q4_weight(g: &Graph, w: ValueRef, trans_b: bool, shape_only: bool) -> Result<Option<Q4Weight>> {
    let Some(WeightQuant { bits, axis, block_size, w: wt, scales: st }) = weight_quant(g, w) else { return Ok(None) };
    if wt.rank() != 2 {
        return Ok(None);
    }
    // Layout as [n, k]: Gemm trans_b stores [n, k]; MatMul / Gemm without trans_b store [k, n].
    let (n, k) = if trans_b { (wt.shape[0], wt.shape[1]) } else { (wt.shape[1], wt.shape[0]) };
    let (red_axis, chan_axis) = if trans_b { (1, 0) } else { (0, 1) };
    let ax = if axis < 0 { axis + 2 } else { axis } as usize;
    let group = match (st.len(), block_size) {
        (len, 0) if len == n && ax == chan_axis => 0,
        // One scale for the whole tensor: per channel, every channel's the same.
        (1, 0) => 0,
        (len, b) if b > 0 && ax == red_axis && len == n * k.div_ceil(b as usize) => {
            let b = b as usize;
            if k.div_ceil(b) == 1 {
                0
            } else if b.is_multiple_of(32) {
                b // a last group that k cuts short is padded with zero weights (PackedQ4::pack)
            } else {
                return Ok(None);
            }
        }
        _ => return Ok(None),
    };
    if shape_only {
        return Ok(Some((vec![], vec![], n, k, group)));
    }
    let idx = param_index(&wt.shape, &st.shape, axis, block_size)?;
    let (lo, hi) = fake_quant_range(bits, true);
    let (wv, sv) = (wt.data.to_f32_vec(), st.data.to_f32_vec());
    let mut q = vec![0i8; n * k];
    let mut scales = vec![0f32; if group == 0 { n } else { n * k.div_ceil(group) }];
    for (i, (&v, &si)) in wv.iter().zip(&idx).enumerate() {
        let (r, c) = if trans_b { (i / k, i % k) } else { (i % n, i / n) };
        q[r * k + c] = round_even(v / sv[si]).clamp(lo as f32, hi as f32) as i8;
        let gi = match group {
            0 => r,
            g => r * k.div_ceil(g) + c / g,
        };
        scales[gi] = sv[si];
    }
    Ok(Some((q, scales, n, k, group)))
}

/// An activation FakeQuant a Q4 step can fold in: per-tensor, constant scale and zero.
pub fn act_quant(g: &Graph, x: ValueRef) -> Option<(ValueRef, ActQuant)> {
    let Op::FakeQuant { bits, signed: true, .. } = g.node(x.node).op else { return None };
    if bits > 8 {
        return None;
    }
    let ins = g.inputs_of(x.node);
    let s = ins[1].and_then(|v| g.const_value(v))?;
    if s.len() != 1 {
        return None;
    }
    let z = match ins.get(2).copied().flatten() {
        Some(v) => {
            let z = g.const_value(v)?;
            if z.len() != 1 {
                return None;
            }
            z.data.to_f32_vec()[0]
        }
        None => 0.0,
    };
    if z.fract() != 0.0 {
        return None;
    }
    let (lo, hi) = fake_quant_range(bits, true);
    Some((ins[0]?, ActQuant::Int { scale: s.data.to_f32_vec()[0], zero: z as i32, lo: lo as i32, hi: hi as i32 }))
}

/// The packed layer, or with `stored` (the caller swaps in an artifact's weights) only its shape.
pub fn packed(q: &[i8], scales: &[f32], n: usize, k: usize, group: usize, stored: bool) -> Result<PackedQ4> {
    if stored {
        let k_pad = PackedQ4::padded_k(k, group);
        return Ok(PackedQ4::from_parts(n, k, k_pad, if group == 0 { k_pad } else { group }, vec![], vec![], vec![]));
    }
    PackedQ4::pack(q, scales, n, k, group).map_err(IrError::Internal)
}

/// The linear map a node computes first, and the values it reads: the node's own op, or for a
/// `Fused` node (the fusion pass's kernels) its first stage when that stage reads node inputs
/// only (a GEMM or convolution with its epilogue in the later stages). `None` otherwise.
pub fn linear_site(g: &Graph, n: NodeId) -> Option<(&Op, Vec<Option<ValueRef>>)> {
    let ins = g.inputs_of(n);
    match &g.node(n).op {
        Op::Fused(f) => {
            let st = f.stages.first()?;
            if !matches!(st.op, Op::Gemm { .. } | Op::MatMul | Op::Conv(_)) {
                return None;
            }
            let mapped = st
                .args
                .iter()
                .map(|a| match a {
                    None => Some(None),
                    Some(Arg::Input(i)) => Some(ins.get(*i).copied().flatten()),
                    Some(Arg::Stage(_)) => None,
                })
                .collect::<Option<Vec<_>>>()?;
            Some((&st.op, mapped))
        }
        op @ (Op::Gemm { .. } | Op::MatMul | Op::Conv(_)) => Some((op, ins)),
        _ => None,
    }
}

/// The constant bias at input 2 of a linear site: `Some(None)` when absent, `None` when not constant.
pub fn const_bias(g: &Graph, ins: &[Option<ValueRef>]) -> Option<Option<Vec<f32>>> {
    match ins.get(2).copied().flatten() {
        Some(b) => g.const_value(b).map(|t| Some(t.data.to_f32_vec())),
        None => Some(None),
    }
}

/// Whether `g` quantizes any activation to integers (a FakeQuant of a computed value).
pub fn has_int_activations(g: &Graph, order: &[NodeId]) -> bool {
    order.iter().any(|&n| {
        matches!(g.node(n).op, Op::FakeQuant { .. })
            && g.inputs_of(n).first().copied().flatten().is_some_and(|x| g.const_value(x).is_none())
    })
}

/// The int4 linear step at Gemm / MatMul node `n`, if it is one. With `stored` the weight is only
/// shaped (an artifact supplies the packed values). With `exact_float`, a layer with float inputs
/// is not one: it stays the reference Gemm / MatMul on its dequantized weights, the simulation's
/// arithmetic, because a later integer activation quantizer would turn the W4 x f32 kernel's
/// last-bit differences into whole quantization steps.
pub fn q4_linear(g: &Graph, n: NodeId, stored: bool, exact_float: bool) -> Result<Option<Q4Layer>> {
    let Some((op, ins)) = linear_site(g, n) else { return Ok(None) };
    let (trans_b, bias) = match op {
        &Op::Gemm { alpha, beta, trans_a: false, trans_b }
            if alpha == 1.0 && (beta == 1.0 || ins.get(2).copied().flatten().is_none()) =>
        {
            let Some(bias) = const_bias(g, &ins) else { return Ok(None) };
            (trans_b, bias)
        }
        Op::MatMul => (false, None),
        _ => return Ok(None),
    };
    let (Some(x), Some(w)) = (ins[0], ins[1]) else { return Ok(None) };
    // Gemm takes [rows, k]; MatMul any [..., rows, k] (a transformer's [batch, tokens, d]),
    // run as one batch of rows.
    let rank = g.value(x).ty.rank();
    if rank < 2 || (rank != 2 && !matches!(op, Op::MatMul)) {
        return Ok(None);
    }
    let Some((q, scales, nn, k, group)) = q4_weight(g, w, trans_b, stored)? else { return Ok(None) };
    if bias.as_ref().is_some_and(|b| b.len() != nn) {
        return Ok(None);
    }
    let (x, act) = act_quant(g, x).unwrap_or((x, ActQuant::Float));
    if exact_float && matches!(act, ActQuant::Float) {
        return Ok(None);
    }
    let w = packed(&q, &scales, nn, k, group, stored)?;
    Ok(Some(Q4Layer { x, act, w, bias, conv: None }))
}

thread_local! {
    /// Quantized activations of the int4 steps, reused from call to call on each thread.
    static SCRATCH: RefCell<Vec<QuantizedInput>> = const { RefCell::new(Vec::new()) };
}

/// The int4 linear step on input `xt` (`[..., rows, k]`, f32): `[..., rows, n]` (the step's one
/// arithmetic definition; see the module header). `name` is for errors.
pub fn run_q4_linear(
    name: &str,
    act: &ActQuant,
    w: &PackedQ4,
    bias: Option<&[f32]>,
    xt: &Tensor,
    threads: usize,
) -> Result<Tensor> {
    if xt.rank() < 2 || xt.shape[xt.rank() - 1] != w.k {
        return Err(IrError::Invalid(format!("{name}: input {:?}, expected [..., rows, {}]", xt.shape, w.k)));
    }
    let rows = xt.len() / w.k.max(1);
    let xv = xt.data.f32_cow();
    let mut out = crate::pool::f32_buffer(rows * w.n);
    match act {
        ActQuant::Int { scale, zero, lo, hi } => SCRATCH.with_borrow_mut(|xs| {
            if xs.len() < rows {
                xs.resize_with(rows, QuantizedInput::default);
            }
            for (xr, q) in xv.chunks(w.k).zip(xs.iter_mut()) {
                quantize_input_into(xr, *scale, *zero, *lo, *hi, w, q);
            }
            sqil_kernels_cpu::gemm_q4q8(w, &xs[..rows], bias, &mut out, threads);
            // FakeQuant keeps a NaN input, and every output sums it (NaN x 0 is NaN); the int8
            // quantizer cannot hold one.
            for (q, yr) in xs[..rows].iter().zip(out.chunks_mut(w.n)) {
                if q.nan {
                    yr.fill(f32::NAN);
                }
            }
        }),
        ActQuant::Float if rows > 1 => {
            // The rows padded to k_pad, then one batched pass (each row the GEMV's arithmetic).
            let mut padded = vec![0f32; rows * w.k_pad];
            for (xr, pr) in xv.chunks(w.k).zip(padded.chunks_mut(w.k_pad)) {
                pr[..w.k].copy_from_slice(xr);
            }
            sqil_kernels_cpu::gemm_q4f32(w, &padded, rows, bias, &mut out, threads);
        }
        ActQuant::Float => {
            let mut padded = vec![0f32; w.k_pad];
            for (xr, yr) in xv.chunks(w.k).zip(out.chunks_mut(w.n)) {
                padded[..w.k].copy_from_slice(xr);
                sqil_kernels_cpu::gemv_q4f32(w, &padded, bias, yr, threads);
            }
        }
    }
    let mut shape = xt.shape.clone();
    *shape.last_mut().expect("rank >= 2") = w.n;
    Tensor::from_f32(shape, out)
}

/// An int4 step: the input value before any activation quantizer, how the step treats it, the
/// packed weight and the bias; a linear map ([`q4_linear`]) or, with `conv`, a convolution through
/// int8 im2col ([`q4_conv`]).
#[derive(Clone, Debug)]
pub struct Q4Layer {
    pub x: ValueRef,
    pub act: ActQuant,
    pub w: PackedQ4,
    pub bias: Option<Vec<f32>>,
    pub conv: Option<Box<Im2col>>,
}

/// The Q4 convolution at Conv node `n`, if it is one: int8 activations (per-tensor, zero point
/// inside int8), a 2-4 bit weight whose scales fit the packed groups, static geometry.
pub fn q4_conv(g: &Graph, n: NodeId, stored: bool) -> Result<Option<Q4Layer>> {
    let Some((Op::Conv(c), ins)) = linear_site(g, n) else { return Ok(None) };
    let (Some(x), Some(w)) = (ins[0], ins[1]) else { return Ok(None) };
    let Some(bias) = const_bias(g, &ins) else { return Ok(None) };
    let Some((xq, act)) = act_quant(g, x) else { return Ok(None) };
    if !matches!(act, ActQuant::Int { zero, .. } if (-128..=127).contains(&zero)) {
        return Ok(None);
    }
    let Some(mut im) = conv_geometry(g, c, x, w) else { return Ok(None) };
    let Some((q, scales, nn, k, group)) = conv_weight(g, w, stored)? else { return Ok(None) };
    im.run = conv::conv_run(im.channels, im.geo.kernel_len(), group);
    if bias.as_ref().is_some_and(|b| b.len() != nn) || k != im.geo.kernel_len() * im.run {
        return Ok(None);
    }
    let w = packed(&q, &scales, nn, k, group, stored)?;
    Ok(Some(Q4Layer { x: xq, act, w, bias, conv: Some(Box::new(im)) }))
}

/// The int4 step at node `n` (a Conv as [`q4_conv`], a Gemm / MatMul as [`q4_linear`], with
/// `stored` and `exact_float` as there), if it is one.
pub fn q4_layer(g: &Graph, n: NodeId, stored: bool, exact_float: bool) -> Result<Option<Q4Layer>> {
    if let Some((Op::Conv(_), _)) = linear_site(g, n) {
        return q4_conv(g, n, stored);
    }
    q4_linear(g, n, stored, exact_float)
}

/// An int4 step on input `xt`, the element-wise `post` ops that follow it (its fused ReLU, a
/// Clip, a FakeQuant: [`sqil_kernels_cpu::Post`]) applied to its outputs: a convolution's
/// `[N, C, in...]` to `[N, O, out...]`, a linear map as [`run_q4_linear`]. The one arithmetic
/// definition every back end runs; `name` is for errors.
#[allow(clippy::too_many_arguments)]
pub fn run_q4_layer(
    name: &str,
    act: &ActQuant,
    w: &PackedQ4,
    bias: Option<&[f32]>,
    conv: Option<&Im2col>,
    post: &[sqil_kernels_cpu::Post],
    xt: &Tensor,
    threads: usize,
) -> Result<Tensor> {
    let Some(im) = conv else {
        let mut out = run_q4_linear(name, act, w, bias, xt, threads)?;
        match &mut out.data {
            crate::tensor::Data::F32(v) => sqil_kernels_cpu::post_in_place(v, post),
            _ if post.is_empty() => {}
            _ => return Err(IrError::Internal(format!("{name}: element-wise ops after a non-f32 output"))),
        }
        return Ok(out);
    };
    let per = im.channels * im.geo.input_len();
    let ActQuant::Int { scale, zero, lo, hi } = *act else {
        return Err(IrError::Internal(format!("{name}: a Q4 convolution needs int activations")));
    };
    if xt.rank() != im.geo.input.len() + 2 || xt.shape[1..] != [&[im.channels][..], &im.geo.input].concat() {
        return Err(IrError::Invalid(format!(
            "{name}: input {:?}, expected [batch, {}, {:?}]",
            xt.shape, im.channels, im.geo.input
        )));
    }
    let images = xt.len() / per.max(1);
    let out = conv::run(im, w, &xt.data.f32_cow(), images, (scale, zero, lo, hi), bias, post, threads);
    let mut shape = vec![images, w.n];
    shape.extend(&im.geo.output);
    Tensor::from_f32(shape, out)
}

/// A Q4 step's layer as [`run_q4_layer`] takes it: activation quantizer, weights, bias, im2col.
pub type Q4Args<'a> = (&'a ActQuant, &'a PackedQ4, Option<&'a [f32]>, Option<&'a Im2col>);

/// A depthwise Conv as [`run_depthwise_chain`] takes it: weights, bias, attributes, epilogue, and
/// the weights laid out by tap when the plan made that layout.
pub type DepthwiseLayer<'a> = (
    &'a Tensor,
    Option<&'a Tensor>,
    &'a crate::ops::ConvAttrs,
    &'a [sqil_kernels_cpu::Post],
    Option<&'a sqil_kernels_cpu::generic::DepthwiseTaps>,
);

/// A depthwise Conv (`attrs`, weights `w`, bias `b`, its epilogue `post`) with the pointwise Q4
/// convolution before it (`source`: the layer, its epilogue and its input) or its own input
/// (`source` a plain tensor), and the pointwise Q4 convolution after it (`next`: the layer and
/// its epilogue), each value between them read by the next step only, in one pass
/// ([`conv::run_depthwise_chain`]): the last step's output as the steps would give it, bit for
/// bit, or `Ok(None)` where the chain does not take this path (then the caller runs the steps).
pub fn run_depthwise_chain(
    source: Result<(Q4Args, &[sqil_kernels_cpu::Post], &Tensor), &Tensor>,
    (w, b, attrs, post, taps): DepthwiseLayer,
    next: Option<(Q4Args, &[sqil_kernels_cpu::Post])>,
    threads: usize,
) -> Result<Option<Tensor>> {
    // The source's images and the depthwise's input shape.
    let (xt, dw_in) = match source {
        Err(x) => (x, x.shape.clone()),
        Ok(((_, qw, _, Some(im)), _, xt)) => {
            let mut mid = vec![xt.shape.first().copied().unwrap_or(0), qw.n];
            mid.extend(&im.geo.output);
            (xt, mid)
        }
        Ok(_) => return Ok(None),
    };
    let per = xt.shape.iter().skip(1).product::<usize>();
    if xt.dtype() != crate::DType::F32 || xt.rank() < 3 || per == 0 {
        return Ok(None);
    }
    let images = xt.shape[0];
    let Some(geo) = attrs.depthwise_geometry(&dw_in, &w.shape).ok().flatten() else { return Ok(None) };
    let channels = dw_in[1];
    if b.is_some_and(|b| b.len() != channels) || w.len() != channels * geo.kernel_len() {
        return Ok(None);
    }
    let (wv, bv) = (w.data.f32_cow(), b.map(|b| b.data.f32_cow()));
    let dw = sqil_kernels_cpu::generic::DepthwiseArgs { weights: &wv, geo: &geo, bias: bv.as_deref(), post, taps };
    let x = xt.data.f32_cow();
    let int = |a: &ActQuant| match *a {
        ActQuant::Int { scale, zero, lo, hi } => Some((scale, zero, lo, hi)),
        ActQuant::Float => None,
    };
    let src = match source {
        Err(_) => conv::ChainSource::Image(&x),
        Ok(((act, qw, bias, Some(im)), post, xt)) => {
            let Some(quant) = int(act) else { return Ok(None) };
            if xt.shape[1..] != [&[im.channels][..], &im.geo.input].concat() {
                return Ok(None);
            }
            conv::ChainSource::Pointwise { im, w: qw, x: &x, quant, bias, post }
        }
        Ok(_) => return Ok(None),
    };
    let next = match next {
        None => None,
        Some(((act, qw, bias, Some(im)), post)) => match int(act) {
            Some(quant) => Some(conv::ChainNext { im, w: qw, quant, bias, post }),
            None => return Ok(None),
        },
        Some(_) => return Ok(None),
    };
    let (n_out, out_geo) = match &next {
        Some(n) => (n.w.n, n.im.geo.output.clone()),
        None => (channels, geo.output.clone()),
    };
    let Some(out) = conv::run_depthwise_chain(src, images, &dw, next, threads) else { return Ok(None) };
    let mut shape = vec![images, n_out];
    shape.extend(out_geo);
    Tensor::from_f32(shape, out).map(Some)
}
