//! Data-movement ops: Reshape, Flatten, Transpose, (Un)Squeeze, Concat, Split, Slice, Gather,
//! Shape, ConstantOfShape, Expand. They work on every dtype by computing a flat source index
//! per output element and gathering.

use super::broadcast::{broadcast_indices, strided_indices};
use super::{norm_axis, Cx};
use crate::dtype::DType;
use crate::error::{IrError, Result};
use crate::shape::{broadcast_dims, broadcast_shapes, Dim, ValueType};
use crate::tensor::{strides_of, Data, Tensor};

fn one(dtype: DType, shape: Vec<Dim>) -> Result<Vec<ValueType>> {
    Ok(vec![ValueType::new(dtype, shape)])
}

/// Product of dimensions: known if all are; the symbol if exactly one symbol times known 1s.
fn dim_product(dims: &[Dim]) -> Dim {
    let mut known = 1usize;
    let mut sym = None;
    for d in dims {
        match d {
            Dim::Known(k) => known *= k,
            Dim::Sym(s) if sym.is_none() => sym = Some(s.clone()),
            _ => return Dim::Unknown,
        }
    }
    match sym {
        None => Dim::Known(known),
        Some(s) if known == 1 => Dim::Sym(s),
        Some(_) => Dim::Unknown,
    }
}

pub(crate) fn infer_flatten(cx: &Cx, axis: i64) -> Result<Vec<ValueType>> {
    let x = cx.ty(0)?;
    let ax = flatten_axis(axis, x.rank())?;
    one(x.dtype, vec![dim_product(&x.shape[..ax]), dim_product(&x.shape[ax..])])
}

fn flatten_axis(axis: i64, rank: usize) -> Result<usize> {
    let r = rank as i64;
    if axis < -r || axis > r {
        return Err(IrError::Invalid(format!("Flatten axis {axis} out of range for rank {rank}")));
    }
    Ok(if axis < 0 { (axis + r) as usize } else { axis as usize })
}

pub(crate) fn flatten(x: &Tensor, axis: i64) -> Result<Tensor> {
    let ax = flatten_axis(axis, x.rank())?;
    let shape = vec![x.shape[..ax].iter().product(), x.shape[ax..].iter().product()];
    x.clone().reshaped(shape)
}

/// Resolves a Reshape target against a concrete input shape.
/// The output shape of Reshape on `input` with the shape operand `target`.
pub fn reshape_target(input: &[usize], target: &[i64], allowzero: bool) -> Result<Vec<usize>> {
    let total: usize = input.iter().product();
    let mut out = Vec::with_capacity(target.len());
    let mut infer = None;
    for (i, &t) in target.iter().enumerate() {
        match t {
            -1 if infer.is_none() => {
                infer = Some(i);
                out.push(1);
            }
            0 if !allowzero => out.push(*input.get(i).ok_or_else(|| {
                IrError::Invalid(format!("Reshape: 0 at position {i} has no input dimension to copy"))
            })?),
            t if t >= 0 => out.push(t as usize),
            t => return Err(IrError::Invalid(format!("Reshape: invalid target dimension {t} in {target:?}"))),
        }
    }
    if let Some(i) = infer {
        let rest: usize = out.iter().product();
        if rest == 0 || !total.is_multiple_of(rest) {
            return Err(IrError::Invalid(format!("Reshape: cannot reshape {input:?} into {target:?}")));
        }
        out[i] = total / rest;
    }
    if out.iter().product::<usize>() != total {
        return Err(IrError::Invalid(format!("Reshape: cannot reshape {input:?} ({total} elements) into {target:?}")));
    }
    Ok(out)
}

pub(crate) fn infer_reshape(cx: &Cx, allowzero: bool) -> Result<Vec<ValueType>> {
    let x = cx.ty(0)?;
    let Some(target) = cx.konst_i64(1) else {
        let len = cx
            .ty(1)?
            .shape
            .first()
            .and_then(Dim::known)
            .ok_or_else(|| IrError::Invalid("Reshape: shape input must be 1-D of known length".into()))?;
        return one(x.dtype, vec![Dim::Unknown; len]);
    };
    if let Some(known) = x.known_shape() {
        let s = reshape_target(&known, &target, allowzero)?;
        return one(x.dtype, s.into_iter().map(Dim::Known).collect());
    }
    // Symbolic input: copy 0s, and solve -1 when the symbols cancel out.
    let mut out: Vec<Dim> = target
        .iter()
        .enumerate()
        .map(|(i, &t)| match t {
            0 if !allowzero => x.shape.get(i).cloned().unwrap_or(Dim::Unknown),
            t if t > 0 || (t == 0 && allowzero) => Dim::Known(t as usize),
            _ => Dim::Unknown,
        })
        .collect();
    if let Some(pos) = target.iter().position(|&t| t == -1) {
        let others: Vec<Dim> = out.iter().enumerate().filter(|(i, _)| *i != pos).map(|(_, d)| d.clone()).collect();
        out[pos] = solve_rest(&x.shape, &others);
    }
    one(x.dtype, out)
}

/// The dimension that makes `others` (times it) hold as many elements as `input`.
fn solve_rest(input: &[Dim], others: &[Dim]) -> Dim {
    let split = |ds: &[Dim]| -> Option<(usize, Vec<String>)> {
        let mut k = 1;
        let mut syms = vec![];
        for d in ds {
            match d {
                Dim::Known(n) => k *= n,
                Dim::Sym(s) => syms.push(s.clone()),
                Dim::Unknown => return None,
            }
        }
        Some((k, syms))
    };
    let (Some((ki, mut si)), Some((ko, so))) = (split(input), split(others)) else { return Dim::Unknown };
    for s in so {
        match si.iter().position(|x| *x == s) {
            Some(p) => {
                si.remove(p);
            }
            None => return Dim::Unknown,
        }
    }
    if ko == 0 || ki % ko != 0 {
        return Dim::Unknown;
    }
    match (ki / ko, si.len()) {
        (k, 0) => Dim::Known(k),
        (1, 1) => Dim::Sym(si.remove(0)),
        _ => Dim::Unknown,
    }
}

pub(crate) fn reshape(x: &Tensor, shape: &Tensor, allowzero: bool) -> Result<Tensor> {
    let target = reshape_target(&x.shape, &shape.data.to_i64_vec(), allowzero)?;
    x.clone().reshaped(target)
}

/// A Transpose's permutation of a value of rank `rank` (`perm` absent: the axes reversed), checked.
pub fn transpose_perm(perm: Option<&[i64]>, rank: usize) -> Result<Vec<usize>> {
    let p: Vec<usize> = match perm {
        None => (0..rank).rev().collect(),
        Some(p) => p.iter().map(|&a| norm_axis(a, rank)).collect::<Result<_>>()?,
    };
    let mut seen = vec![false; rank];
    if p.len() != rank || p.iter().any(|&a| std::mem::replace(&mut seen[a], true)) {
        return Err(IrError::Invalid(format!("Transpose: perm {perm:?} is not a permutation of rank {rank}")));
    }
    Ok(p)
}

pub(crate) fn infer_transpose(cx: &Cx, perm: Option<&[i64]>) -> Result<Vec<ValueType>> {
    let x = cx.ty(0)?;
    let p = transpose_perm(perm, x.rank())?;
    one(x.dtype, p.iter().map(|&a| x.shape[a].clone()).collect())
}

pub(crate) fn transpose(x: &Tensor, perm: Option<&[i64]>) -> Result<Tensor> {
    let p = transpose_perm(perm, x.rank())?;
    let st = strides_of(&x.shape);
    let shape: Vec<usize> = p.iter().map(|&a| x.shape[a]).collect();
    let strides: Vec<isize> = p.iter().map(|&a| st[a] as isize).collect();
    // The last two axes swapped, the others in place (attention's K^T: [B, H, T, D] ->
    // [B, H, D, T]), once axes that stay neighbours are merged (NHWC -> NCHW is [N, HW, C] ->
    // [N, C, HW]): each matrix through the kernels' tiled strided copy.
    if let (Data::F32(v), Some((rows, cols))) = (&x.data, swapped_matrices(&x.shape, &p)) {
        let mat = rows * cols;
        // (Every value written by the copies: a dead value's buffer, not a zeroed one.)
        let mut out = crate::pool::f32_buffer(v.len());
        if mat > 0 {
            for (src, dst) in v.chunks_exact(mat).zip(out.chunks_exact_mut(mat)) {
                sqil_kernels_cpu::copy_strided(src, (cols, rows), (1, cols), dst);
            }
        }
        return Tensor::new(shape, Data::F32(out));
    }
    // Trailing axes that stay in place move as contiguous runs (a transformer's head split
    // [B, T, H, D] -> [B, H, T, D] copies runs of D values): f32 runs of 4 or more are copied
    // run by run, not gathered element by element.
    let kept = (0..p.len()).rev().take_while(|&i| p[i] == i).count();
    let run: usize = x.shape[x.rank() - kept..].iter().product();
    if let (Data::F32(v), true) = (&x.data, run >= 4 && kept < x.rank()) {
        let outer = &shape[..shape.len() - kept];
        let ost = &strides[..strides.len() - kept];
        let starts = strided_indices(outer, ost, 0);
        let mut out = Vec::with_capacity(x.len());
        for s in starts {
            out.extend_from_slice(&v[s..s + run]);
        }
        return Tensor::new(shape, Data::F32(out));
    }
    Tensor::new(shape.clone(), x.data.gather(&strided_indices(&shape, &strides, 0)))
}

/// If transposing `shape` by `p` moves data as a batch of `rows x cols` matrices each
/// transposed (the others in place), once axes that stay neighbours in the output are merged:
/// `(rows, cols)`.
fn swapped_matrices(shape: &[usize], p: &[usize]) -> Option<(usize, usize)> {
    // Runs of output axes reading consecutive input axes, as (first input axis, extent).
    let mut runs: Vec<(usize, usize)> = vec![];
    for (i, &a) in p.iter().enumerate() {
        match runs.last_mut() {
            Some((first, len)) if i > 0 && a == p[i - 1] + 1 && *first + *len == a => *len += 1,
            _ => runs.push((a, 1)),
        }
    }
    let r = runs.len();
    let size = |&(a, n): &(usize, usize)| shape[a..a + n].iter().product::<usize>();
    // In place before the last two runs, which swap.
    let lead_in_place = runs[..r.saturating_sub(2)].windows(2).all(|w| w[0].0 + w[0].1 == w[1].0)
        && runs.first().is_some_and(|f| f.0 == 0 || r == 2);
    if r >= 2 && lead_in_place && runs[r - 1].0 + runs[r - 1].1 == runs[r - 2].0 {
        Some((size(&runs[r - 1]), size(&runs[r - 2])))
    } else {
        None
    }
}

fn axes_list(axes: &[i64], rank: usize, op: &str) -> Result<Vec<usize>> {
    let mut v: Vec<usize> = axes.iter().map(|&a| norm_axis(a, rank)).collect::<Result<_>>()?;
    v.sort_unstable();
    if v.windows(2).any(|w| w[0] == w[1]) {
        return Err(IrError::Invalid(format!("{op}: repeated axis in {axes:?}")));
    }
    Ok(v)
}

pub(crate) fn infer_squeeze(cx: &Cx) -> Result<Vec<ValueType>> {
    let x = cx.ty(0)?;
    let shape = match (cx.opt_ty(1), cx.konst_i64(1)) {
        (None, _) => x.shape.iter().filter(|d| **d != Dim::Known(1)).cloned().collect(),
        (Some(_), Some(axes)) => {
            let ax = axes_list(&axes, x.rank(), "Squeeze")?;
            for &a in &ax {
                if matches!(x.shape[a], Dim::Known(n) if n != 1) {
                    return Err(IrError::Invalid(format!("Squeeze: axis {a} of {x} is not 1")));
                }
            }
            x.shape.iter().enumerate().filter(|(i, _)| !ax.contains(i)).map(|(_, d)| d.clone()).collect()
        }
        (Some(a), None) => {
            // Axes known only at run time: the rank follows from their count.
            let n = a
                .shape
                .first()
                .and_then(Dim::known)
                .ok_or_else(|| IrError::Invalid("Squeeze axes must be 1-D of known length".into()))?;
            vec![
                Dim::Unknown;
                x.rank().checked_sub(n).ok_or_else(|| IrError::Invalid(format!("Squeeze: {n} axes for {x}")))?
            ]
        }
    };
    one(x.dtype, shape)
}

pub(crate) fn squeeze(x: &Tensor, axes: Option<&Tensor>) -> Result<Tensor> {
    let shape = match axes {
        None => x.shape.iter().copied().filter(|&d| d != 1).collect(),
        Some(a) => {
            let ax = axes_list(&a.data.to_i64_vec(), x.rank(), "Squeeze")?;
            if let Some(&bad) = ax.iter().find(|&&a| x.shape[a] != 1) {
                return Err(IrError::Invalid(format!("Squeeze: axis {bad} of {:?} is not 1", x.shape)));
            }
            x.shape.iter().enumerate().filter(|(i, _)| !ax.contains(i)).map(|(_, &d)| d).collect()
        }
    };
    x.clone().reshaped(shape)
}

fn unsqueeze_shape<T: Clone>(shape: &[T], axes: &[i64], one: T) -> Result<Vec<T>> {
    let rank = shape.len() + axes.len();
    let ax = axes_list(axes, rank, "Unsqueeze")?;
    let mut src = shape.iter();
    Ok((0..rank).map(|i| if ax.contains(&i) { one.clone() } else { src.next().expect("counted").clone() }).collect())
}

pub(crate) fn infer_unsqueeze(cx: &Cx) -> Result<Vec<ValueType>> {
    let x = cx.ty(0)?;
    match cx.konst_i64(1) {
        Some(axes) => one(x.dtype, unsqueeze_shape(&x.shape, &axes, Dim::Known(1))?),
        None => {
            let n = cx
                .ty(1)?
                .shape
                .first()
                .and_then(Dim::known)
                .ok_or_else(|| IrError::Invalid("Unsqueeze axes must be 1-D of known length".into()))?;
            one(x.dtype, vec![Dim::Unknown; x.rank() + n])
        }
    }
}

pub(crate) fn unsqueeze(x: &Tensor, axes: &Tensor) -> Result<Tensor> {
    let shape = unsqueeze_shape(&x.shape, &axes.data.to_i64_vec(), 1)?;
    x.clone().reshaped(shape)
}

pub(crate) fn infer_concat(cx: &Cx, axis: i64) -> Result<Vec<ValueType>> {
    let first = cx.ty(0)?;
    let ax = norm_axis(axis, first.rank())?;
    let mut shape = first.shape.clone();
    let mut sum = Some(0usize);
    for i in 0..cx.inputs.len() {
        let t = cx.ty(i)?;
        if t.rank() != first.rank() || t.dtype != first.dtype {
            return Err(IrError::Invalid(format!("Concat inputs differ: {first} and {t}")));
        }
        for (d, (have, new)) in shape.iter_mut().zip(&t.shape).enumerate() {
            if d == ax {
                sum = sum.zip(new.known()).map(|(a, b)| a + b);
            } else if let (Some(a), Some(b)) = (have.known(), new.known()) {
                if a != b {
                    return Err(IrError::Invalid(format!("Concat inputs differ off the axis: {first} and {t}")));
                }
            } else if *have == Dim::Unknown {
                *have = new.clone();
            }
        }
    }
    let single_sym =
        (0..cx.inputs.len()).filter(|&i| cx.inputs[i].is_some_and(|t| t.shape[ax] != Dim::Known(0))).count() == 1;
    shape[ax] = match sum {
        Some(s) => Dim::Known(s),
        None if single_sym => (0..cx.inputs.len())
            .map(|i| cx.inputs[i].expect("checked").shape[ax].clone())
            .find(|d| *d != Dim::Known(0))
            .unwrap_or(Dim::Unknown),
        None => Dim::Unknown,
    };
    one(first.dtype, shape)
}

pub(crate) fn concat(xs: &[&Tensor], axis: i64) -> Result<Tensor> {
    let first = xs.first().ok_or_else(|| IrError::Invalid("Concat of no inputs".into()))?;
    let ax = norm_axis(axis, first.rank())?;
    for t in xs {
        if t.rank() != first.rank() || t.shape.iter().enumerate().any(|(d, &n)| d != ax && n != first.shape[d]) {
            return Err(IrError::Invalid(format!(
                "Concat: shapes {:?} and {:?} differ off axis {ax}",
                first.shape, t.shape
            )));
        }
    }
    let outer: usize = first.shape[..ax].iter().product();
    let chunks: Vec<usize> = xs.iter().map(|t| t.shape[ax..].iter().product()).collect();
    let joined = Data::join_runs(&xs.iter().map(|t| &t.data).collect::<Vec<_>>(), &chunks, outer)?;
    let mut shape = first.shape.clone();
    shape[ax] = xs.iter().map(|t| t.shape[ax]).sum();
    Tensor::new(shape, joined)
}

fn split_sizes(dim: usize, split: Option<Vec<i64>>, outputs: usize) -> Result<Vec<usize>> {
    match split {
        Some(s) => {
            if s.len() != outputs || s.iter().any(|&v| v < 0) || s.iter().sum::<i64>() as usize != dim {
                return Err(IrError::Invalid(format!("Split sizes {s:?} do not cut {dim} into {outputs} parts")));
            }
            Ok(s.into_iter().map(|v| v as usize).collect())
        }
        None => {
            let chunk = dim.div_ceil(outputs.max(1));
            Ok((0..outputs).map(|i| chunk.min(dim.saturating_sub(i * chunk))).collect())
        }
    }
}

pub(crate) fn infer_split(cx: &Cx, axis: i64, outputs: usize) -> Result<Vec<ValueType>> {
    let x = cx.ty(0)?;
    let ax = norm_axis(axis, x.rank())?;
    let split = match (cx.opt_ty(1), cx.konst_i64(1)) {
        (None, _) => None,
        (Some(_), Some(s)) => Some(s),
        (Some(_), None) => {
            // Sizes known only at run time.
            let mut s = x.shape.clone();
            s[ax] = Dim::Unknown;
            return Ok(vec![ValueType::new(x.dtype, s); outputs]);
        }
    };
    let sizes: Vec<Dim> = match x.shape[ax].known() {
        Some(d) => split_sizes(d, split, outputs)?.into_iter().map(Dim::Known).collect(),
        None => match split {
            Some(s) => s.into_iter().map(|v| Dim::Known(v as usize)).collect(),
            None => vec![Dim::Unknown; outputs],
        },
    };
    Ok(sizes
        .into_iter()
        .map(|d| {
            let mut s = x.shape.clone();
            s[ax] = d;
            ValueType::new(x.dtype, s)
        })
        .collect())
}

pub(crate) fn split(x: &Tensor, split: Option<&Tensor>, axis: i64, outputs: usize) -> Result<Vec<Tensor>> {
    let ax = norm_axis(axis, x.rank())?;
    let sizes = split_sizes(x.shape[ax], split.map(|s| s.data.to_i64_vec()), outputs)?;
    // Each output is one run of `n * inner` values per index of the axes before `ax`.
    let outer: usize = x.shape[..ax].iter().product();
    let inner: usize = x.shape[ax + 1..].iter().product();
    let stride = x.shape[ax] * inner;
    let mut start = 0;
    sizes
        .into_iter()
        .map(|n| {
            let mut shape = x.shape.clone();
            shape[ax] = n;
            let t = Tensor::new(shape, x.data.runs(outer, stride, start * inner, n * inner));
            start += n;
            t
        })
        .collect()
}

/// Resolved `(start, step, count)` per axis of a Slice over `shape`.
fn slice_plan(
    shape: &[usize],
    starts: &[i64],
    ends: &[i64],
    axes: Option<Vec<i64>>,
    steps: Option<Vec<i64>>,
) -> Result<Vec<(i64, i64, usize)>> {
    let rank = shape.len();
    let axes = axes.unwrap_or_else(|| (0..starts.len() as i64).collect());
    let steps = steps.unwrap_or_else(|| vec![1; starts.len()]);
    if ends.len() != starts.len() || axes.len() != starts.len() || steps.len() != starts.len() {
        return Err(IrError::Invalid("Slice: starts, ends, axes and steps differ in length".into()));
    }
    let mut plan: Vec<(i64, i64, usize)> = shape.iter().map(|&d| (0, 1, d)).collect();
    let ax = axes_list(&axes, rank, "Slice")?;
    for (i, &a) in axes.iter().enumerate() {
        let a = norm_axis(a, rank)?;
        debug_assert!(ax.contains(&a));
        let d = shape[a] as i64;
        let step = steps[i];
        if step == 0 {
            return Err(IrError::Invalid("Slice: step 0".into()));
        }
        let fix = |v: i64| if v < 0 { v.saturating_add(d) } else { v };
        let (mut s, mut e) = (fix(starts[i]), fix(ends[i]));
        if step > 0 {
            s = s.clamp(0, d);
            e = e.clamp(0, d);
        } else {
            s = s.clamp(0, (d - 1).max(0));
            e = e.clamp(-1, d - 1);
        }
        let count =
            if step > 0 { (e - s + step - 1).div_euclid(step) } else { (s - e + (-step) - 1).div_euclid(-step) };
        plan[a] = (s, step, count.max(0) as usize);
    }
    Ok(plan)
}

pub(crate) fn infer_slice(cx: &Cx) -> Result<Vec<ValueType>> {
    let x = cx.ty(0)?;
    let (Some(starts), Some(ends)) = (cx.konst_i64(1), cx.konst_i64(2)) else {
        return one(x.dtype, vec![Dim::Unknown; x.rank()]);
    };
    let axes = if cx.opt_ty(3).is_some() {
        Some(cx.konst_i64(3).ok_or_else(|| IrError::Unsupported("Slice axes computed at run time".into()))?)
    } else {
        None
    };
    let steps = if cx.opt_ty(4).is_some() {
        Some(cx.konst_i64(4).ok_or_else(|| IrError::Unsupported("Slice steps computed at run time".into()))?)
    } else {
        None
    };
    let axes_n: Vec<i64> = axes.clone().unwrap_or_else(|| (0..starts.len() as i64).collect());
    let steps_n: Vec<i64> = steps.clone().unwrap_or_else(|| vec![1; starts.len()]);
    // Symbolic dimensions stay symbolic when sliced whole; other sliced ones become unknown.
    let probe: Vec<usize> = x.shape.iter().map(|d| d.known().unwrap_or(1 << 40)).collect();
    let plan = slice_plan(&probe, &starts, &ends, axes, steps)?;
    let mut shape = x.shape.clone();
    for (i, &a) in axes_n.iter().enumerate() {
        let a = norm_axis(a, x.rank())?;
        shape[a] = match &x.shape[a] {
            Dim::Known(_) => Dim::Known(plan[a].2),
            d if steps_n[i] == 1 && starts[i] == 0 && ends[i] >= (1 << 40) => d.clone(),
            _ => Dim::Unknown,
        };
    }
    one(x.dtype, shape)
}

pub(crate) fn slice(
    x: &Tensor,
    starts: &Tensor,
    ends: &Tensor,
    axes: Option<&Tensor>,
    steps: Option<&Tensor>,
) -> Result<Tensor> {
    let plan = slice_plan(
        &x.shape,
        &starts.data.to_i64_vec(),
        &ends.data.to_i64_vec(),
        axes.map(|a| a.data.to_i64_vec()),
        steps.map(|s| s.data.to_i64_vec()),
    )?;
    let st = strides_of(&x.shape);
    let shape: Vec<usize> = plan.iter().map(|p| p.2).collect();
    let strides: Vec<isize> = plan.iter().zip(&st).map(|(p, &s)| p.1 as isize * s as isize).collect();
    let base: isize = plan.iter().zip(&st).filter(|(p, _)| p.2 > 0).map(|(p, &s)| p.0 as isize * s as isize).sum();
    let idx = if shape.iter().product::<usize>() == 0 { vec![] } else { strided_indices(&shape, &strides, base) };
    Tensor::new(shape, x.data.gather(&idx))
}

pub(crate) fn infer_gather(cx: &Cx, axis: i64) -> Result<Vec<ValueType>> {
    let (x, i) = (cx.ty(0)?, cx.ty(1)?);
    let ax = norm_axis(axis, x.rank())?;
    let mut shape = x.shape[..ax].to_vec();
    shape.extend(i.shape.iter().cloned());
    shape.extend(x.shape[ax + 1..].iter().cloned());
    one(x.dtype, shape)
}

pub(crate) fn gather(x: &Tensor, indices: &Tensor, axis: i64) -> Result<Tensor> {
    let ax = norm_axis(axis, x.rank())?;
    if !indices.dtype().is_integer() {
        return Err(IrError::Invalid(format!("Gather indices must be integers, got {}", indices.dtype())));
    }
    let d = x.shape[ax] as i64;
    let ind: Vec<usize> = indices
        .data
        .to_i64_vec()
        .into_iter()
        .map(|i| {
            let j = if i < 0 { i + d } else { i };
            if (0..d).contains(&j) {
                Ok(j as usize)
            } else {
                Err(IrError::Invalid(format!("Gather index {i} out of range for axis of size {d}")))
            }
        })
        .collect::<Result<_>>()?;
    let outer: usize = x.shape[..ax].iter().product();
    let inner: usize = x.shape[ax + 1..].iter().product();
    let mut idx = Vec::with_capacity(outer * ind.len() * inner);
    for o in 0..outer {
        for &j in &ind {
            let base = (o * x.shape[ax] + j) * inner;
            idx.extend(base..base + inner);
        }
    }
    let mut shape = x.shape[..ax].to_vec();
    shape.extend(&indices.shape);
    shape.extend(&x.shape[ax + 1..]);
    Tensor::new(shape, x.data.gather(&idx))
}

/// The `[start, end)` dimension range a Shape op with these attributes reads from a value of
/// rank `rank` (negative bounds count from the end; both are clamped).
pub fn shape_range(rank: usize, start: i64, end: Option<i64>) -> (usize, usize) {
    let r = rank as i64;
    let fix = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
    let (s, e) = (fix(start), fix(end.unwrap_or(r)));
    (s, e.max(s))
}

pub(crate) fn infer_shape(cx: &Cx, start: i64, end: Option<i64>) -> Result<Vec<ValueType>> {
    let (s, e) = shape_range(cx.ty(0)?.rank(), start, end);
    one(DType::I64, vec![Dim::Known(e - s)])
}

pub(crate) fn shape(x: &Tensor, start: i64, end: Option<i64>) -> Tensor {
    let (s, e) = shape_range(x.rank(), start, end);
    Tensor { shape: vec![e - s], data: Data::I64(x.shape[s..e].iter().map(|&d| d as i64).collect()) }
}

fn shape_arg(t: &Tensor, op: &str) -> Result<Vec<usize>> {
    t.data
        .to_i64_vec()
        .into_iter()
        .map(|v| usize::try_from(v).map_err(|_| IrError::Invalid(format!("{op}: negative dimension {v}"))))
        .collect()
}

pub(crate) fn infer_constant_of_shape(cx: &Cx, value: &Tensor) -> Result<Vec<ValueType>> {
    if let Some(s) = cx.konst(0) {
        return one(value.dtype(), shape_arg(s, "ConstantOfShape")?.into_iter().map(Dim::Known).collect());
    }
    let len = cx
        .ty(0)?
        .shape
        .first()
        .and_then(Dim::known)
        .ok_or_else(|| IrError::Invalid("ConstantOfShape: shape input must be 1-D of known length".into()))?;
    one(value.dtype(), vec![Dim::Unknown; len])
}

pub(crate) fn constant_of_shape(s: &Tensor, value: &Tensor) -> Result<Tensor> {
    let shape = shape_arg(s, "ConstantOfShape")?;
    if value.len() != 1 {
        return Err(IrError::Invalid("ConstantOfShape value must have one element".into()));
    }
    let n = crate::tensor::checked_len(&shape, value.dtype().bits().div_ceil(8).max(1), "ConstantOfShape")?;
    Tensor::new(shape, value.data.gather(&vec![0; n]))
}

pub(crate) fn infer_expand(cx: &Cx) -> Result<Vec<ValueType>> {
    let x = cx.ty(0)?;
    let Some(s) = cx.konst(1) else {
        let len = cx
            .ty(1)?
            .shape
            .first()
            .and_then(Dim::known)
            .ok_or_else(|| IrError::Invalid("Expand: shape input must be 1-D of known length".into()))?;
        return one(x.dtype, vec![Dim::Unknown; len.max(x.rank())]);
    };
    let target: Vec<Dim> = shape_arg(s, "Expand")?.into_iter().map(Dim::Known).collect();
    let shape = broadcast_dims(&[&x.shape, &target])
        .ok_or_else(|| IrError::Invalid(format!("Expand: {x} does not broadcast to {target:?}")))?;
    one(x.dtype, shape)
}

pub(crate) fn expand(x: &Tensor, s: &Tensor) -> Result<Tensor> {
    let target = shape_arg(s, "Expand")?;
    let out = broadcast_shapes(&[&x.shape, &target])
        .ok_or_else(|| IrError::Invalid(format!("Expand: {:?} does not broadcast to {target:?}", x.shape)))?;
    crate::tensor::checked_len(&out, x.dtype().bits().div_ceil(8).max(1), "Expand")?;
    Tensor::new(out.clone(), x.data.gather(&broadcast_indices(&x.shape, &out)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Transpose's fast paths (batches of swapped matrices once neighbouring axes are merged;
    /// runs of trailing axes) against the element-by-element gather, and which perms are taken as
    /// swapped matrices.
    #[test]
    fn transpose_fast_paths_equal_the_gather() {
        let shape = [2usize, 3, 4, 5];
        let x = Tensor::from_f32(shape.to_vec(), (0..120).map(|i| i as f32 * 0.5 - 7.0).collect()).unwrap();
        type Case = (&'static [usize], Option<(usize, usize)>);
        let perms: [Case; 9] = [
            (&[0, 3, 1, 2], Some((12, 5))),
            (&[0, 2, 3, 1], Some((3, 20))),
            (&[0, 1, 3, 2], Some((4, 5))),
            (&[1, 2, 3, 0], Some((2, 60))),
            (&[3, 0, 1, 2], Some((24, 5))),
            (&[2, 3, 0, 1], Some((6, 20))),
            (&[0, 2, 1, 3], None),
            (&[1, 0, 2, 3], None),
            (&[3, 2, 1, 0], None),
        ];
        for (p, want) in perms {
            assert_eq!(swapped_matrices(&shape, p), want, "{p:?}");
            let p64: Vec<i64> = p.iter().map(|&a| a as i64).collect();
            let got = transpose(&x, Some(&p64)).unwrap();
            let st = strides_of(&shape);
            let out: Vec<usize> = p.iter().map(|&a| shape[a]).collect();
            let strides: Vec<isize> = p.iter().map(|&a| st[a] as isize).collect();
            let gathered = x.data.gather(&strided_indices(&out, &strides, 0));
            assert_eq!(got.shape, out, "{p:?}");
            assert_eq!(got.data.to_f32_vec(), gathered.to_f32_vec(), "{p:?}");
        }
    }
}
