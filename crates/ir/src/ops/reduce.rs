//! ReduceMean, ReduceSum, ReduceMax over a set of axes (given as an optional input).

use super::{norm_axis, Cx, ReduceOp};
use crate::error::{IrError, Result};
use crate::shape::{Dim, ValueType};
use crate::tensor::{strides_of, Data, Tensor};

/// Axes to reduce, or `None` for "no reduction" (empty axes with noop_with_empty_axes).
fn reduce_axes(axes: Option<Vec<i64>>, rank: usize, noop: bool) -> Result<Option<Vec<bool>>> {
    match axes {
        Some(a) if !a.is_empty() => {
            let mut mask = vec![false; rank];
            for x in a {
                mask[norm_axis(x, rank)?] = true;
            }
            Ok(Some(mask))
        }
        _ if noop => Ok(None),
        _ => Ok(Some(vec![true; rank])),
    }
}

pub(crate) fn infer_reduce(cx: &Cx, keepdims: bool, noop: bool) -> Result<Vec<ValueType>> {
    let x = cx.ty(0)?;
    let axes = match (cx.opt_ty(1), cx.konst_i64(1)) {
        (None, _) => None,
        (Some(_), Some(a)) => Some(a),
        (Some(a), None) => {
            // Axes known only at run time: only the rank can be inferred.
            let n = a
                .shape
                .first()
                .and_then(Dim::known)
                .ok_or_else(|| IrError::Invalid("Reduce axes must be 1-D of known length".into()))?;
            let rank = match (n, keepdims) {
                (0, _) if noop => return Ok(vec![x.clone()]),
                (_, true) => x.rank(),
                (0, false) => 0,
                (n, false) => x.rank().checked_sub(n).ok_or_else(|| IrError::Invalid(format!("{n} axes for {x}")))?,
            };
            return Ok(vec![ValueType::new(x.dtype, vec![Dim::Unknown; rank])]);
        }
    };
    let Some(mask) = reduce_axes(axes, x.rank(), noop)? else { return Ok(vec![x.clone()]) };
    let shape = x
        .shape
        .iter()
        .zip(&mask)
        .filter_map(|(d, &m)| match (m, keepdims) {
            (false, _) => Some(d.clone()),
            (true, true) => Some(Dim::Known(1)),
            (true, false) => None,
        })
        .collect();
    Ok(vec![ValueType::new(x.dtype, shape)])
}

pub(crate) fn reduce(op: ReduceOp, x: &Tensor, axes: Option<&Tensor>, keepdims: bool, noop: bool) -> Result<Tensor> {
    let Some(mask) = reduce_axes(axes.map(|a| a.data.to_i64_vec()), x.rank(), noop)? else { return Ok(x.clone()) };
    let kept: Vec<usize> = x.shape.iter().zip(&mask).map(|(&d, &m)| if m { 1 } else { d }).collect();
    let out_len: usize = kept.iter().product();
    let ks = strides_of(&kept);
    // Per axis, the step of the output slot (0 along reduced axes).
    let ost: Vec<usize> = (0..x.rank()).map(|d| if mask[d] { 0 } else { ks[d] }).collect();
    let count = x.len().checked_div(out_len).unwrap_or(0);
    let data = if (x.dtype().is_integer() || x.dtype() == crate::DType::Bool) && op != ReduceOp::Mean {
        let v = x.data.to_i64_vec();
        let init = if op == ReduceOp::Max { i64::MIN } else { 0 };
        let mut acc = vec![init; out_len];
        by_slot(&v, &x.shape, &ost, |s, e| {
            let a = &mut acc[s];
            *a = if op == ReduceOp::Max { (*a).max(e) } else { a.wrapping_add(e) };
        });
        Data::from_i64(x.dtype(), acc.into_iter())
    } else {
        if x.dtype() == crate::DType::Bool {
            return Err(IrError::Unsupported(format!("{op:?} on bool")));
        }
        let init = if op == ReduceOp::Max { f64::NEG_INFINITY } else { 0.0 };
        let mut acc = vec![init; out_len];
        let step = |a: &mut f64, e: f64| {
            *a = if op == ReduceOp::Max {
                if e > *a || e.is_nan() {
                    e
                } else {
                    *a
                }
            } else {
                *a + e
            };
        };
        match &x.data {
            // f32 values read directly (no f64 copy of the tensor): the same f64 steps.
            Data::F32(v) => by_slot(v, &x.shape, &ost, |s, e| step(&mut acc[s], e as f64)),
            d => by_slot(&d.to_f64_vec(), &x.shape, &ost, |s, e| step(&mut acc[s], e)),
        }
        if op == ReduceOp::Mean {
            acc.iter_mut().for_each(|a| *a /= count as f64);
        }
        Data::from_f64(x.dtype(), acc.into_iter())
    };
    let shape: Vec<usize> =
        if keepdims { kept } else { x.shape.iter().zip(&mask).filter(|(_, &m)| !m).map(|(&d, _)| d).collect() };
    Tensor::new(shape, data)
}

/// Calls `f(slot, value)` for every element of `v` (shape `shape`) in flat order, `slot` the
/// output index: the sum of each axis's position times its step `ost` (0 along reduced axes),
/// advanced by an odometer row by row (no division per element).
fn by_slot<T: Copy>(v: &[T], shape: &[usize], ost: &[usize], mut f: impl FnMut(usize, T)) {
    let Some(&inner) = shape.last() else {
        // A scalar: one element, one slot.
        return v.iter().for_each(|&e| f(0, e));
    };
    if inner == 0 {
        return;
    }
    let rank = shape.len();
    let (mut pos, mut base) = (vec![0usize; rank], 0usize);
    for row in v.chunks_exact(inner) {
        for (j, &e) in row.iter().enumerate() {
            f(base + j * ost[rank - 1], e);
        }
        for d in (0..rank - 1).rev() {
            pos[d] += 1;
            base += ost[d];
            if pos[d] < shape[d] {
                break;
            }
            base -= ost[d] * shape[d];
            pos[d] = 0;
        }
    }
}
