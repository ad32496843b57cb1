//! Neural-network ops: pooling, softmax, layer and batch normalisation. Accumulation is in f64.

use super::broadcast::broadcast_indices;
use super::linalg::{AutoPad, ConvAttrs};
use super::{norm_axis, Cx, Ex};
use crate::attrs::{Attr, AttrMap};
use crate::dtype::DType;
use crate::error::{IrError, Result};
use crate::shape::{Dim, ValueType};
use crate::tensor::{Data, Tensor};
use sqil_kernels_cpu::ConvGeometry;

/// Attributes of MaxPool and AveragePool.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolAttrs {
    pub auto_pad: AutoPad,
    pub ceil_mode: bool,
    /// AveragePool only: divide by the window size including padding.
    pub count_include_pad: bool,
    pub dilations: Vec<i64>,
    pub kernel_shape: Vec<i64>,
    pub pads: Vec<i64>,
    pub strides: Vec<i64>,
    /// MaxPool only: 1 = column-major indices.
    pub storage_order: i64,
}

impl PoolAttrs {
    pub fn from_attrs(a: &AttrMap) -> Result<PoolAttrs> {
        let p = PoolAttrs {
            auto_pad: AutoPad::parse(&a.string("auto_pad", "NOTSET")?)?,
            ceil_mode: a.int("ceil_mode", 0)? != 0,
            count_include_pad: a.int("count_include_pad", 0)? != 0,
            dilations: a.ints("dilations")?,
            kernel_shape: a.ints("kernel_shape")?,
            pads: a.ints("pads")?,
            strides: a.ints("strides")?,
            storage_order: a.int("storage_order", 0)?,
        };
        if p.kernel_shape.is_empty() || p.kernel_shape.iter().any(|&k| k < 1) {
            return Err(IrError::Invalid(format!("pooling needs a positive kernel_shape, got {:?}", p.kernel_shape)));
        }
        Ok(p)
    }

    pub fn attrs(&self) -> Vec<(&'static str, Attr)> {
        vec![
            ("auto_pad", Attr::Str(self.auto_pad.name().into())),
            ("ceil_mode", Attr::Int(self.ceil_mode as i64)),
            ("count_include_pad", Attr::Int(self.count_include_pad as i64)),
            ("dilations", Attr::Ints(self.dilations.clone())),
            ("kernel_shape", Attr::Ints(self.kernel_shape.clone())),
            ("pads", Attr::Ints(self.pads.clone())),
            ("strides", Attr::Ints(self.strides.clone())),
            ("storage_order", Attr::Int(self.storage_order)),
        ]
    }

    /// `(pads_begin, pads_end, output)` per spatial axis, following the ONNX reference
    /// (ceil mode drops a last window that would start in the end padding).
    pub fn geometry(&self, input: &[Option<usize>]) -> Result<super::linalg::Geometry> {
        let n = self.kernel_shape.len();
        if input.len() != n {
            return Err(IrError::Invalid(format!("kernel_shape has {n} axes, input has {} spatial axes", input.len())));
        }
        let s = ConvAttrs::list(&self.strides, n, 1, "strides")?;
        let dil = ConvAttrs::list(&self.dilations, n, 1, "dilations")?;
        let pads = ConvAttrs::list(&self.pads, 2 * n, 0, "pads")?;
        let (mut pb, mut pe) = (pads[..n].to_vec(), pads[n..].to_vec());
        let mut out = vec![];
        for d in 0..n {
            let k = self.kernel_shape[d];
            let ext = dil[d] * (k - 1) + 1;
            let Some(i) = input[d].map(|i| i as i64) else {
                out.push(None);
                continue;
            };
            let o = match self.auto_pad {
                AutoPad::NotSet => {
                    let num = i + pb[d] + pe[d] - ext;
                    if self.ceil_mode {
                        let mut o = num.div_euclid(s[d]) + 1 + (num.rem_euclid(s[d]) != 0) as i64;
                        if (o - 1) * s[d] >= i + pb[d] {
                            o -= 1;
                        }
                        o
                    } else {
                        num.div_euclid(s[d]) + 1
                    }
                }
                AutoPad::Valid => {
                    pb[d] = 0;
                    pe[d] = 0;
                    (i - ext).div_euclid(s[d]) + 1
                }
                AutoPad::SameUpper | AutoPad::SameLower => {
                    let o = (i - 1).div_euclid(s[d]) + 1;
                    let total = ((o - 1) * s[d] + ext - i).max(0);
                    let small = total / 2;
                    (pb[d], pe[d]) = if self.auto_pad == AutoPad::SameUpper {
                        (small, total - small)
                    } else {
                        (total - small, small)
                    };
                    o
                }
            };
            if o < 1 {
                return Err(IrError::Invalid(format!(
                    "pooling axis {d}: input {i} with kernel extent {ext} gives an empty output"
                )));
            }
            out.push(Some(o as usize));
        }
        Ok((pb, pe, out))
    }

    /// The window geometry over the `spatial` input dims, and AveragePool's divisor per output
    /// position (the taps it averages), as the reference ops use them: for code generators.
    pub fn windows(&self, spatial: &[usize]) -> Result<(ConvGeometry, Vec<usize>)> {
        let (geo, pe) = self.conv_geometry(spatial)?;
        let counts = average_pool_counts(self, &geo, &pe, &geo.gather_table());
        Ok((geo, counts))
    }

    fn conv_geometry(&self, input: &[usize]) -> Result<(ConvGeometry, Vec<i64>)> {
        let n = input.len();
        let spatial: Vec<Option<usize>> = input.iter().map(|&d| Some(d)).collect();
        let (pb, pe, out) = self.geometry(&spatial)?;
        let geo = ConvGeometry {
            input: input.to_vec(),
            kernel: self.kernel_shape.iter().map(|&k| k as usize).collect(),
            strides: ConvAttrs::list(&self.strides, n, 1, "strides")?.iter().map(|&v| v as usize).collect(),
            dilations: ConvAttrs::list(&self.dilations, n, 1, "dilations")?.iter().map(|&v| v as usize).collect(),
            pads_begin: pb.iter().map(|&p| p as isize).collect(),
            output: out.into_iter().map(|o| o.expect("known input")).collect(),
        };
        Ok((geo, pe))
    }
}

pub(crate) fn infer_pool(cx: &Cx, p: &PoolAttrs, outputs: usize) -> Result<Vec<ValueType>> {
    let x = cx.ty(0)?;
    if x.rank() < 3 {
        return Err(IrError::Invalid(format!("pooling needs rank >= 3, got {x}")));
    }
    let input: Vec<Option<usize>> = x.shape[2..].iter().map(Dim::known).collect();
    let (_, _, out) = p.geometry(&input)?;
    let mut shape = x.shape[..2].to_vec();
    shape.extend(out.into_iter().map(|o| o.map_or(Dim::Unknown, Dim::Known)));
    let mut v = vec![ValueType::new(x.dtype, shape.clone())];
    if outputs > 1 {
        v.push(ValueType::new(DType::I64, shape));
    }
    Ok(v)
}

pub(crate) fn infer_global_pool(cx: &Cx) -> Result<Vec<ValueType>> {
    let x = cx.ty(0)?;
    if x.rank() < 3 {
        return Err(IrError::Invalid(format!("GlobalAveragePool needs rank >= 3, got {x}")));
    }
    let mut shape = x.shape[..2].to_vec();
    shape.extend(std::iter::repeat_n(Dim::Known(1), x.rank() - 2));
    Ok(vec![ValueType::new(x.dtype, shape)])
}

fn float_vec(t: &Tensor, op: &str) -> Result<Vec<f64>> {
    if !t.dtype().is_float() {
        return Err(IrError::Unsupported(format!("{op} on {}", t.dtype())));
    }
    Ok(t.data.to_f64_vec())
}

fn pool_out_shape(x: &Tensor, geo: &ConvGeometry) -> Vec<usize> {
    let mut s = x.shape[..2].to_vec();
    s.extend(&geo.output);
    s
}

/// A 2-D pooling geometry as the kernels take it (`Pool2d`), where it is one: two spatial axes,
/// no padding before them that is negative.
fn pool2d(geo: &ConvGeometry) -> Option<sqil_kernels_cpu::generic::Pool2d> {
    if geo.kernel.len() != 2 || geo.pads_begin.iter().any(|&p| p < 0) {
        return None;
    }
    Some(sqil_kernels_cpu::generic::Pool2d {
        h: geo.input[0],
        w: geo.input[1],
        kh: geo.kernel[0],
        kw: geo.kernel[1],
        sy: geo.strides[0],
        sx: geo.strides[1],
        dy: geo.dilations[0],
        dx: geo.dilations[1],
        py: geo.pads_begin[0] as usize,
        px: geo.pads_begin[1] as usize,
        oh: geo.output[0],
        ow: geo.output[1],
    })
}

pub(crate) fn max_pool(x: &Tensor, p: &PoolAttrs, outputs: usize) -> Result<Vec<Tensor>> {
    if x.rank() < 3 {
        return Err(IrError::Invalid(format!("MaxPool needs rank >= 3, got {:?}", x.shape)));
    }
    let (geo, _) = p.conv_geometry(&x.shape[2..])?;
    let (il, ol) = (geo.input_len(), geo.output_len());
    let planes = x.shape[0] * x.shape[1];
    let spatial = &x.shape[2..];
    // Column-major index of a row-major flat position within one plane.
    let col_major = |flat: usize| -> usize {
        let mut rem = flat;
        let mut pos = vec![0; spatial.len()];
        for d in (0..spatial.len()).rev() {
            pos[d] = rem % spatial[d];
            rem /= spatial[d];
        }
        let mut idx = 0;
        for d in (0..spatial.len()).rev() {
            idx = idx * spatial[d] + pos[d];
        }
        idx
    };
    if let (Data::F32(v), 1) = (&x.data, outputs) {
        // The f32 path the runtime serves (no indices asked): the same choice per output (the
        // first of the window's largest values, in kernel order; comparisons are exact in f32),
        // kernel positions in the outer loop so each pass reads the plane in order.
        if let Some(g) = pool2d(&geo).filter(|_| il > 0) {
            // 2-D windows read directly (the kernels' loop: vectors of outputs inside the plane).
            let mut out = crate::pool::f32_buffer(planes * ol);
            sqil_kernels_cpu::generic::max_pool2d_planes(v, planes, &g, &mut out);
            return Ok(vec![Tensor::new(pool_out_shape(x, &geo), Data::F32(out))?]);
        }
        let mut out = vec![f32::NEG_INFINITY; planes * ol];
        let table = geo.gather_table();
        let kl = geo.kernel_len();
        let mut seen = vec![false; ol];
        for pl in 0..planes {
            let plane = &v[pl * il..(pl + 1) * il];
            let best = &mut out[pl * ol..(pl + 1) * ol];
            seen.iter_mut().for_each(|s| *s = false);
            for k in 0..kl {
                for (o, t) in table[k * ol..(k + 1) * ol].iter().enumerate() {
                    if let Some(i) = *t {
                        let val = plane[i];
                        if !seen[o] || val > best[o] {
                            best[o] = val;
                            seen[o] = true;
                        }
                    }
                }
            }
        }
        return Ok(vec![Tensor::new(pool_out_shape(x, &geo), Data::F32(out))?]);
    }
    let table = geo.gather_table();
    let mut vals = Vec::with_capacity(planes * ol);
    let mut idxs = Vec::with_capacity(planes * ol);
    let pick = |getv: &dyn Fn(usize) -> f64, vals: &mut Vec<f64>, idxs: &mut Vec<i64>| {
        for pl in 0..planes {
            for o in 0..ol {
                let mut best: Option<(f64, usize)> = None;
                for k in 0..geo.kernel_len() {
                    if let Some(i) = table[k * ol + o] {
                        let v = getv(pl * il + i);
                        if best.is_none_or(|(b, _)| v > b) {
                            best = Some((v, i));
                        }
                    }
                }
                let (v, i) = best.unwrap_or((f64::NEG_INFINITY, 0));
                vals.push(v);
                let within = if p.storage_order == 1 { col_major(i) } else { i };
                idxs.push((pl * il + within) as i64);
            }
        }
    };
    let data = match &x.data {
        Data::F32(v) => {
            pick(&|i| v[i] as f64, &mut vals, &mut idxs);
            Data::F32(vals.into_iter().map(|v| v as f32).collect())
        }
        Data::I8(v) => {
            pick(&|i| v[i] as f64, &mut vals, &mut idxs);
            Data::I8(vals.into_iter().map(|v| v as i8).collect())
        }
        Data::U8(v) => {
            pick(&|i| v[i] as f64, &mut vals, &mut idxs);
            Data::U8(vals.into_iter().map(|v| v as u8).collect())
        }
        d => {
            let v = float_vec(x, "MaxPool").map_err(|_| IrError::Unsupported(format!("MaxPool on {}", d.dtype())))?;
            pick(&|i| v[i], &mut vals, &mut idxs);
            Data::from_f64(d.dtype(), vals.into_iter())
        }
    };
    let shape = pool_out_shape(x, &geo);
    let mut out = vec![Tensor::new(shape.clone(), data)?];
    if outputs > 1 {
        out.push(Tensor::new(shape, Data::I64(idxs))?);
    }
    Ok(out)
}

pub(crate) fn average_pool(x: &Tensor, p: &PoolAttrs) -> Result<Tensor> {
    if x.rank() < 3 {
        return Err(IrError::Invalid(format!("AveragePool needs rank >= 3, got {:?}", x.shape)));
    }
    let (geo, pe) = p.conv_geometry(&x.shape[2..])?;
    let planes = x.shape[0] * x.shape[1];
    if let (Data::F32(v), Some(g)) = (&x.data, pool2d(&geo).filter(|g| g.two_by_two() && pe.iter().all(|&e| e == 0))) {
        // The 2 x 2 / 2 window without padding (four values in every window, whichever way the
        // padding counts): the same chain and division over pairs of rows.
        let mut out = crate::pool::f32_buffer(planes * g.oh * g.ow);
        sqil_kernels_cpu::generic::row_pair_planes(
            v,
            planes,
            &g,
            &mut out,
            sqil_kernels_cpu::generic::avg_pool_row_pairs,
        );
        return Tensor::new(pool_out_shape(x, &geo), Data::F32(out));
    }
    let table = geo.gather_table();
    let (il, ol, kl) = (geo.input_len(), geo.output_len(), geo.kernel_len());
    let counts = average_pool_counts(p, &geo, &pe, &table);
    if let Data::F32(v) = &x.data {
        // The f32 path the runtime serves: per output the same f64 chain (from `Iterator::sum`'s
        // -0.0, the window's taps inside the input in kernel order), every output of a plane
        // advanced tap by tap (independent chains), then the same division, rounded once.
        let mut out = Vec::with_capacity(planes * ol);
        let mut acc = vec![-0.0f64; ol];
        for plane in v.chunks_exact(il.max(1)).take(planes) {
            acc.fill(-0.0);
            for taps in table.chunks_exact(ol.max(1)).take(kl) {
                for (a, t) in acc.iter_mut().zip(taps) {
                    if let Some(i) = *t {
                        *a += plane[i] as f64;
                    }
                }
            }
            out.extend(acc.iter().zip(&counts).map(|(&s, &c)| (s / c.max(1) as f64) as f32));
        }
        return Tensor::new(pool_out_shape(x, &geo), Data::F32(out));
    }
    let v = float_vec(x, "AveragePool")?;
    let mut out = Vec::with_capacity(planes * ol);
    for pl in 0..planes {
        for o in 0..ol {
            let s: f64 = (0..kl).filter_map(|k| table[k * ol + o]).map(|i| v[pl * il + i]).sum();
            out.push(s / counts[o].max(1) as f64);
        }
    }
    Tensor::new(pool_out_shape(x, &geo), Data::from_f64(x.dtype(), out.into_iter()))
}

/// AveragePool's divisor per output position: the taps inside the input, or, when padding
/// counts, inside `[-pads_begin, input + pads_end)`.
fn average_pool_counts(p: &PoolAttrs, geo: &ConvGeometry, pe: &[i64], table: &[Option<usize>]) -> Vec<usize> {
    let (ol, kl) = (geo.output_len(), geo.kernel_len());
    if p.count_include_pad {
        let padded = ConvGeometry {
            input: geo
                .input
                .iter()
                .enumerate()
                .map(|(d, &i)| (i as isize + geo.pads_begin[d] + pe[d] as isize) as usize)
                .collect(),
            pads_begin: vec![0; geo.input.len()],
            ..geo.clone()
        };
        let t = padded.gather_table();
        (0..ol).map(|o| (0..kl).filter(|k| t[k * ol + o].is_some()).count()).collect()
    } else {
        (0..ol).map(|o| (0..kl).filter(|k| table[k * ol + o].is_some()).count()).collect()
    }
}

/// The gradient of a pooling op with respect to its input, given the output gradient `g`:
/// MaxPool routes each output's gradient to the (first) maximum of its window, AveragePool
/// spreads it over the window's taps, GlobalAveragePool over the whole plane.
pub(crate) fn pool_vjp(op: &super::Op, x: &Tensor, g: &[f64]) -> Result<Vec<f64>> {
    let mut r = vec![0f64; x.len()];
    match op {
        super::Op::MaxPool(p) => {
            let row_major = PoolAttrs { storage_order: 0, ..p.clone() };
            let idx = max_pool(x, &row_major, 2)?.pop().expect("MaxPool indices").data.to_i64_vec();
            for (&i, &d) in idx.iter().zip(g) {
                r[i as usize] += d;
            }
        }
        super::Op::AveragePool(p) => {
            let (geo, pe) = p.conv_geometry(&x.shape[2..])?;
            let table = geo.gather_table();
            let (il, ol, kl) = (geo.input_len(), geo.output_len(), geo.kernel_len());
            let counts = average_pool_counts(p, &geo, &pe, &table);
            for pl in 0..x.shape[0] * x.shape[1] {
                for o in 0..ol {
                    let d = g[pl * ol + o] / counts[o].max(1) as f64;
                    for i in (0..kl).filter_map(|k| table[k * ol + o]) {
                        r[pl * il + i] += d;
                    }
                }
            }
        }
        super::Op::GlobalAveragePool => {
            let il: usize = x.shape[2..].iter().product();
            for (pl, c) in r.chunks_mut(il.max(1)).enumerate() {
                c.iter_mut().for_each(|v| *v = g[pl] / il as f64);
            }
        }
        _ => return Err(IrError::Internal(format!("pool_vjp of {}", op.name()))),
    }
    Ok(r)
}

pub(crate) fn global_average_pool(x: &Tensor) -> Result<Tensor> {
    if x.rank() < 3 {
        return Err(IrError::Invalid(format!("GlobalAveragePool needs rank >= 3, got {:?}", x.shape)));
    }
    let il: usize = x.shape[2..].iter().product();
    let mut shape = x.shape[..2].to_vec();
    shape.extend(std::iter::repeat_n(1, x.rank() - 2));
    // Each plane's f64 sum in order over its count, f32 values read directly (no f64 copy).
    fn means<T: Copy + Into<f64>>(v: &[T], il: usize) -> impl Iterator<Item = f64> + '_ {
        v.chunks(il.max(1)).map(move |c| c.iter().map(|&e| e.into()).sum::<f64>() / il as f64)
    }
    let data = match &x.data {
        Data::F32(v) if il > 0 => Data::F32(plane_means_f32(v, il)),
        Data::F32(v) => Data::F32(means(v, il).map(|m| m as f32).collect()),
        _ => {
            let v = float_vec(x, "GlobalAveragePool")?;
            Data::from_f64(x.dtype(), means(&v, il))
        }
    };
    Tensor::new(shape, data)
}

/// Each plane's mean of `v` (planes of `il` values) as `global_average_pool` defines it: the f64
/// sum in order from the neutral element `Iterator::sum` starts from, divided by `il`, rounded
/// to f32 (the sums by `plane_sums_f64`: the same additions in the same order, planes in
/// vector lanes where the CPU has them).
fn plane_means_f32(v: &[f32], il: usize) -> Vec<f32> {
    let init: f64 = std::iter::empty::<f64>().sum();
    let planes = v.len() / il;
    let mut out = crate::pool::f32_buffer(planes);
    // The sums in a buffer kept per thread (a squeeze-and-excitation block pools once per image:
    // allocating the sums each time showed in the allocator's profile).
    PLANE_SUMS.with_borrow_mut(|sums| {
        sums.resize(planes, 0.0);
        sqil_kernels_cpu::generic::plane_sums_f64(v, il, init, sums);
        for (o, &a) in out.iter_mut().zip(sums.iter()) {
            *o = (a / il as f64) as f32;
        }
    });
    out
}

thread_local! {
    /// [`plane_means_f32`]'s f64 sums.
    static PLANE_SUMS: std::cell::RefCell<Vec<f64>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Softmax / LogSoftmax in f64 with sqil's exponential (`exp_nonpos`, the same bits on every
/// back end) and its summation order (four interleaved partial sums, see `softmax_rows`).
pub(crate) fn softmax(x: &Tensor, axis: i64, coerce_2d: bool, log: bool) -> Result<Tensor> {
    if !x.dtype().is_float() {
        return Err(IrError::Unsupported(format!("Softmax on {}", x.dtype())));
    }
    let ax = norm_axis(axis, x.rank())?;
    let (dim, inner) = if coerce_2d || x.rank() == 0 {
        (x.shape[ax..].iter().product::<usize>(), 1)
    } else {
        (x.shape[ax], x.shape[ax + 1..].iter().product::<usize>())
    };
    if let Data::F32(v) = &x.data {
        // f32 rows: the kernels' loop (AVX2 or AVX-512 where the CPU has it), same operations.
        let rows =
            if log { sqil_kernels_cpu::generic::log_softmax_rows } else { sqil_kernels_cpu::generic::softmax_rows };
        let mut out = crate::pool::f32_buffer(v.len());
        if inner == 1 || v.is_empty() {
            rows(v, dim, &mut out);
        } else {
            // Not the innermost axis: each `[dim, inner]` block transposed to `inner` rows of
            // `dim` values, run as rows, and transposed back (each output the same operations
            // on the same values in the same order).
            let (mut t, mut r) = (vec![0f32; dim * inner], vec![0f32; dim * inner]);
            for (xb, ob) in v.chunks_exact(dim * inner).zip(out.chunks_exact_mut(dim * inner)) {
                for (j, xr) in xb.chunks_exact(inner).enumerate() {
                    for (i, &a) in xr.iter().enumerate() {
                        t[i * dim + j] = a;
                    }
                }
                rows(&t, dim, &mut r);
                for (j, or) in ob.chunks_exact_mut(inner).enumerate() {
                    for (i, o) in or.iter_mut().enumerate() {
                        *o = r[i * dim + j];
                    }
                }
            }
        }
        return Tensor::new(x.shape.clone(), Data::F32(out));
    }
    let v = float_vec(x, "Softmax")?;
    let mut out = vec![0f64; v.len()];
    let outer = v.len().checked_div(dim * inner).unwrap_or(0);
    for o in 0..outer {
        for i in 0..inner {
            let at = |j: usize| o * dim * inner + j * inner + i;
            let m = (0..dim).map(|j| v[at(j)]).fold(f64::NEG_INFINITY, f64::max);
            // Each exponential once: kept in `out`, then divided by their sum.
            let mut s = [0f64; 4];
            for j in 0..dim {
                let e = sqil_kernels_cpu::generic::exp_nonpos(v[at(j)] - m);
                out[at(j)] = e;
                s[j % 4] += e;
            }
            let s = (s[0] + s[1]) + (s[2] + s[3]);
            for j in 0..dim {
                out[at(j)] = if log { v[at(j)] - m - s.ln() } else { out[at(j)] / s };
            }
        }
    }
    Tensor::new(x.shape.clone(), Data::from_f64(x.dtype(), out.into_iter()))
}

pub(crate) fn infer_layer_norm(cx: &Cx, axis: i64, outputs: usize) -> Result<Vec<ValueType>> {
    let x = cx.ty(0)?;
    let ax = norm_axis(axis, x.rank())?;
    let mut v = vec![x.clone()];
    let mut stat = x.shape[..ax].to_vec();
    stat.extend(std::iter::repeat_n(Dim::Known(1), x.rank() - ax));
    for _ in 1..outputs {
        v.push(ValueType::new(DType::F32, stat.clone()));
    }
    Ok(v)
}

pub(crate) fn layer_norm(
    x: &Tensor,
    scale: &Tensor,
    b: Option<&Tensor>,
    axis: i64,
    eps: f32,
    outputs: usize,
) -> Result<Vec<Tensor>> {
    if !x.dtype().is_float() {
        float_vec(x, "LayerNormalization")?;
    }
    let ax = norm_axis(axis, x.rank())?;
    let norm_shape = &x.shape[ax..];
    let inner: usize = norm_shape.iter().product();
    let fit = |t: &Tensor, what: &str| -> Result<Vec<f64>> {
        if crate::shape::broadcast_shapes(&[&t.shape, norm_shape]).as_deref() != Some(norm_shape) {
            return Err(IrError::Invalid(format!(
                "LayerNormalization {what} {:?} does not broadcast to {norm_shape:?}",
                t.shape
            )));
        }
        let tv = t.data.to_f64_vec();
        Ok(broadcast_indices(&t.shape, norm_shape).into_iter().map(|i| tv[i]).collect())
    };
    let s = fit(scale, "scale")?;
    let bias = b.map(|b| fit(b, "bias")).transpose()?;
    let outer = x.len().checked_div(inner).unwrap_or(0);
    let bias = bias.unwrap_or_else(|| vec![0.0; inner]);
    let ((means, inv), y) = if let Data::F32(xv) = &x.data {
        // f32 in and out: no f64 copies of the tensor.
        let mut y = crate::pool::f32_buffer(xv.len());
        (sqil_kernels_cpu::generic::layer_norm_f32(xv, (inner, outer), (&s, &bias), eps, &mut y), Data::F32(y))
    } else {
        let v = float_vec(x, "LayerNormalization")?;
        let mut y = vec![0f64; v.len()];
        let stats = sqil_kernels_cpu::generic::layer_norm_rows(&v, (inner, outer), (&s, &bias), eps, &mut y, |t| t);
        (stats, Data::from_f64(x.dtype(), y.into_iter()))
    };
    let mut stat_shape = x.shape[..ax].to_vec();
    stat_shape.extend(std::iter::repeat_n(1, x.rank() - ax));
    let mut out = vec![Tensor::new(x.shape.clone(), y)?];
    for stat in [means, inv].into_iter().take(outputs.saturating_sub(1)) {
        out.push(Tensor::new(stat_shape.clone(), Data::from_f64(DType::F32, stat.into_iter()))?);
    }
    Ok(out)
}

pub(crate) fn infer_batch_norm(cx: &Cx, outputs: usize) -> Result<Vec<ValueType>> {
    let x = cx.ty(0)?;
    if x.rank() < 2 {
        return Err(IrError::Invalid(format!("BatchNormalization needs rank >= 2, got {x}")));
    }
    let mut v = vec![x.clone()];
    for i in 1..outputs {
        let t = cx.ty(2 + i)?;
        v.push(t.clone());
    }
    Ok(v)
}

/// BatchNormalization's scale, B, mean and var (inputs 1-4) in f64, each checked to hold one
/// value per channel of `c`.
fn batch_norm_params(x: &Ex, c: usize) -> Result<[Vec<f64>; 4]> {
    let chan = |i: usize, what: &str| -> Result<Vec<f64>> {
        let t = x.get(i)?;
        if t.len() != c {
            return Err(IrError::Invalid(format!("BatchNormalization {what} has {} elements, expected {c}", t.len())));
        }
        Ok(t.data.to_f64_vec())
    };
    Ok([chan(1, "scale")?, chan(2, "B")?, chan(3, "mean")?, chan(4, "var")?])
}

pub(crate) fn batch_norm(x: &Ex, eps: f32, momentum: f32, training: bool, outputs: usize) -> Result<Vec<Tensor>> {
    let xt = x.get(0)?;
    if let (false, Data::F32(v), true) = (training, &xt.data, xt.rank() >= 2) {
        // Inference on f32: the same f64 operations per element, `(x - mean) * k + bias` with
        // `k = scale / sqrt(var + eps)` per channel, without converting the input to f64 first.
        let c = xt.shape[1];
        let [scale, bias, mean, var] = batch_norm_params(x, c)?;
        let inner: usize = xt.shape[2..].iter().product();
        let mut y = Vec::with_capacity(v.len());
        for (i, plane) in v.chunks(inner.max(1)).enumerate() {
            let ci = i % c;
            let (m, k, b) = (mean[ci], scale[ci] / (var[ci] + eps as f64).sqrt(), bias[ci]);
            y.extend(plane.iter().map(|&e| ((e as f64 - m) * k + b) as f32));
        }
        return Ok(vec![Tensor::new(xt.shape.clone(), Data::F32(y))?]);
    }
    let v = float_vec(xt, "BatchNormalization")?;
    if xt.rank() < 2 {
        return Err(IrError::Invalid(format!("BatchNormalization needs rank >= 2, got {:?}", xt.shape)));
    }
    let c = xt.shape[1];
    let [scale, bias, mut mean, mut var] = batch_norm_params(x, c)?;
    let inner: usize = xt.shape[2..].iter().product();
    let n = xt.shape[0];
    let mut running = None;
    if training {
        let cnt = (n * inner) as f64;
        let mut bm = vec![0f64; c];
        let mut bv = vec![0f64; c];
        for ci in 0..c {
            let vals = (0..n).flat_map(|ni| v[(ni * c + ci) * inner..(ni * c + ci + 1) * inner].iter());
            bm[ci] = vals.clone().sum::<f64>() / cnt;
            bv[ci] = vals.map(|x| (x - bm[ci]) * (x - bm[ci])).sum::<f64>() / cnt;
        }
        let m = momentum as f64;
        let rm: Vec<f64> = mean.iter().zip(&bm).map(|(r, b)| r * m + b * (1.0 - m)).collect();
        let rv: Vec<f64> = var.iter().zip(&bv).map(|(r, b)| r * m + b * (1.0 - m)).collect();
        running = Some((rm, rv));
        mean = bm;
        var = bv;
    }
    let mut y = vec![0f64; v.len()];
    for ni in 0..n {
        for ci in 0..c {
            let k = scale[ci] / (var[ci] + eps as f64).sqrt();
            let base = (ni * c + ci) * inner;
            for j in 0..inner {
                y[base + j] = (v[base + j] - mean[ci]) * k + bias[ci];
            }
        }
    }
    let mut out = vec![Tensor::new(xt.shape.clone(), Data::from_f64(xt.dtype(), y.into_iter()))?];
    if let Some((rm, rv)) = running {
        for (i, r) in [rm, rv].into_iter().enumerate().take(outputs.saturating_sub(1)) {
            let like = x.get(3 + i)?;
            out.push(Tensor::new(like.shape.clone(), Data::from_f64(like.dtype(), r.into_iter()))?);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    /// AveragePool's 2 x 2 / 2 window (the row-pair kernel: planes paired end to end, or plane
    /// by plane when the height is odd) equals the definition's chain per output, with widths
    /// and heights odd and even, mixed magnitudes and signed zeros.
    #[test]
    fn average_pool_two_by_two_equals_the_chain() {
        use super::*;
        let mut seed = 11u64;
        let mut next = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            match seed >> 60 {
                0 => -0.0,
                1 => 1.0e18,
                2 => -1.0e18,
                _ => ((seed >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 2e3,
            }
        };
        let p = PoolAttrs {
            auto_pad: AutoPad::NotSet,
            ceil_mode: false,
            count_include_pad: false,
            dilations: vec![],
            kernel_shape: vec![2, 2],
            pads: vec![],
            strides: vec![2, 2],
            storage_order: 0,
        };
        for shape in [[2usize, 3, 6, 7], [1, 2, 5, 4], [1, 1, 8, 16], [3, 1, 3, 9], [1, 1, 2, 2]] {
            let [n, c, h, w] = shape;
            let v: Vec<f32> = (0..n * c * h * w).map(|_| next()).collect();
            let y = average_pool(&Tensor::from_f32(shape.to_vec(), v.clone()).unwrap(), &p).unwrap();
            let (oh, ow) = (h / 2, w / 2);
            assert_eq!(y.shape, vec![n, c, oh, ow]);
            let got = y.as_f32().unwrap();
            for (i, g) in got.iter().enumerate() {
                let (pl, oy, ox) = (i / (oh * ow), i / ow % oh, i % ow);
                let at = |dy: usize, dx: usize| v[pl * h * w + (2 * oy + dy) * w + 2 * ox + dx] as f64;
                let want = ((-0.0 + at(0, 0) + at(0, 1) + at(1, 0) + at(1, 1)) / 4.0) as f32;
                assert_eq!(g.to_bits(), want.to_bits(), "{shape:?} output {i}");
            }
        }
    }

    /// The eight-chain plane means equal the definition (one in-order f64 sum per plane from
    /// `Iterator::sum`'s start) bit for bit: plane counts off the blocks of eight, NaN, both
    /// infinities, planes of zeros of either sign, a subnormal, mixed magnitudes.
    #[test]
    fn plane_means_equal_the_in_order_sums() {
        let mut seed = 7u64;
        let mut next = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 2e3
        };
        for (planes, il) in [(1usize, 1usize), (3, 5), (8, 7), (13, 49), (17, 1), (24, 121), (9, 2)] {
            let mut v: Vec<f32> = (0..planes * il).map(|_| next()).collect();
            v[0] = f32::NAN;
            if planes > 2 {
                v[il..2 * il].fill(-0.0);
                v[2 * il] = f32::INFINITY;
            }
            if planes > 4 {
                v[3 * il..4 * il].fill(0.0);
                v[4 * il] = 1e-40;
            }
            if planes > 9 {
                v[9 * il] = f32::NEG_INFINITY;
            }
            let want: Vec<u32> = v
                .chunks(il)
                .map(|c| ((c.iter().map(|&e| e as f64).sum::<f64>() / il as f64) as f32).to_bits())
                .collect();
            let got: Vec<u32> = super::plane_means_f32(&v, il).iter().map(|m| m.to_bits()).collect();
            assert_eq!(got, want, "{planes} planes of {il}");
        }
    }
}
