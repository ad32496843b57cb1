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

/// Where a reduction over `shape` reads, for back ends that run one output per thread: per output
/// slot (in order) the flat offset of its first element, and per reduced element the offset from
/// there, in the flat order the interpreter accumulates them. `None` when nothing is reduced
/// (empty axes with `noop`), which is a copy.
pub fn reduce_tables(shape: &[usize], axes: Option<Vec<i64>>, noop: bool) -> Result<Option<(Vec<usize>, Vec<usize>)>> {
    let Some(mask) = reduce_axes(axes, shape.len(), noop)? else { return Ok(None) };
    let st = strides_of(shape);
    // Odometer over the axes `pick` selects: the offsets of all their positions, row-major.
    let walk = |pick: bool| -> Vec<usize> {
        let mut offs = vec![0usize];
        for d in 0..shape.len() {
            if mask[d] == pick {
                let (len, step) = (shape[d], st[d]);
                offs = offs.iter().flat_map(|&o| (0..len).map(move |i| o + i * step)).collect();
            }
        }
        offs
    };
    Ok(Some((walk(false), walk(true))))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The tables' walk (per output its base, per reduced element its offset, in order) is the
    /// interpreter's: summing in f64 through them gives `reduce`'s bits for every axis set.
    #[test]
    fn reduce_tables_read_the_interpreters_elements() {
        let shape = [2usize, 3, 4, 5];
        let n: usize = shape.iter().product();
        // Values whose f64 sums depend on the order.
        let v: Vec<f32> = (0..n).map(|i| ((i * 7919 % 113) as f32 - 56.0) * 10f32.powi((i % 9) as i32 - 4)).collect();
        let x = Tensor::from_f32(shape.to_vec(), v.clone()).unwrap();
        for axes in [vec![0i64], vec![1], vec![3], vec![-1, 1], vec![0, 2], vec![0, 1, 2, 3], vec![]] {
            let (base, off) = reduce_tables(&shape, Some(axes.clone()), false).unwrap().unwrap();
            let want = reduce(
                ReduceOp::Mean,
                &x,
                Some(&Tensor::from_i64(vec![axes.len()], axes.clone()).unwrap()),
                true,
                false,
            )
            .unwrap()
            .data
            .to_f32_vec();
            assert_eq!(base.len(), want.len(), "{axes:?}");
            for (b, w) in base.iter().zip(&want) {
                let s = off.iter().fold(0f64, |a, &o| a + v[b + o] as f64) / off.len() as f64;
                assert_eq!((s as f32).to_bits(), w.to_bits(), "{axes:?}");
            }
        }
        assert!(reduce_tables(&shape, Some(vec![]), true).unwrap().is_none());
    }
}
