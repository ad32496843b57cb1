//! Elementwise ops: unary float functions, broadcast arithmetic, Where, Clip, PRelu, Gelu.
//!
//! Float math is evaluated in f64 and rounded once to the value's type, so f32 results are
//! correctly rounded for + - * / and within an ulp for transcendental functions.

use super::broadcast::{zip2, Broadcast, Over};
use super::{BinaryOp, Cx, UnaryOp};
use crate::error::{IrError, Result};
use crate::shape::{broadcast_dims, ValueType};
use crate::tensor::{Data, Tensor};
use half::{bf16, f16};

/// Type rule of broadcast ops: inputs `idx` broadcast, dtype taken from input `dtype_from`.
pub(crate) fn infer_broadcast(cx: &Cx, idx: &[usize], dtype_from: usize) -> Result<Vec<ValueType>> {
    let tys = idx.iter().map(|&i| cx.ty(i)).collect::<Result<Vec<_>>>()?;
    let shapes: Vec<&[crate::shape::Dim]> = tys.iter().map(|t| t.shape.as_slice()).collect();
    let shape = broadcast_dims(&shapes).ok_or_else(|| {
        IrError::Invalid(format!(
            "input shapes {} do not broadcast",
            tys.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(", ")
        ))
    })?;
    Ok(vec![ValueType::new(cx.ty(dtype_from)?.dtype, shape)])
}

/// Applies an f64 function to every element of a float tensor, keeping its type.
pub(crate) fn map_float(t: &Tensor, op: &str, f: impl Fn(f64) -> f64) -> Result<Tensor> {
    let data = match &t.data {
        Data::F32(v) => Data::F32(v.iter().map(|&x| f(x as f64) as f32).collect()),
        Data::F64(v) => Data::F64(v.iter().map(|&x| f(x)).collect()),
        Data::F16(v) => Data::F16(v.iter().map(|x| f16::from_f64(f(x.to_f64()))).collect()),
        Data::BF16(v) => Data::BF16(v.iter().map(|x| bf16::from_f64(f(x.to_f64()))).collect()),
        d => return Err(IrError::Unsupported(format!("{op} on {}", d.dtype()))),
    };
    Ok(Tensor { shape: t.shape.clone(), data })
}

fn map_int(t: &Tensor, f: impl Fn(i64) -> i64) -> Tensor {
    let v = t.data.to_i64_vec();
    Tensor { shape: t.shape.clone(), data: Data::from_i64(t.dtype(), v.into_iter().map(f)) }
}

pub(crate) fn unary(u: UnaryOp, t: &Tensor) -> Result<Tensor> {
    if t.dtype().is_integer() {
        match u {
            UnaryOp::Neg => return Ok(map_int(t, i64::wrapping_neg)),
            UnaryOp::Abs => return Ok(map_int(t, i64::wrapping_abs)),
            UnaryOp::Relu => return Ok(map_int(t, |x| x.max(0))),
            _ => {}
        }
    }
    if let (Data::F32(v), UnaryOp::Relu | UnaryOp::Neg | UnaryOp::Abs) = (&t.data, u) {
        // Exact in f32: no round trip through f64; one inlined loop per op (vectorized).
        let data = match u {
            UnaryOp::Relu => v.iter().map(|&x| if x < 0.0 { 0.0 } else { x }).collect(),
            UnaryOp::Neg => v.iter().map(|&x| -x).collect(),
            _ => v.iter().map(|&x| x.abs()).collect(),
        };
        return Ok(Tensor { shape: t.shape.clone(), data: Data::F32(data) });
    }
    if let (Data::F32(v), UnaryOp::Sqrt | UnaryOp::Reciprocal) = (&t.data, u) {
        // IEEE square root and division are correctly rounded, and rounding their f64 result once
        // more to f32 gives the correctly rounded f32 (double rounding is innocuous for them when
        // 53 >= 2 * 24 + 2): so the f32 operation is the definition's bits (vectorized).
        let data = match u {
            UnaryOp::Sqrt => v.iter().map(|&x| x.sqrt()).collect(),
            _ => v.iter().map(|&x| 1.0 / x).collect(),
        };
        return Ok(Tensor { shape: t.shape.clone(), data: Data::F32(data) });
    }
    if let (Data::F32(v), UnaryOp::HardSwish) = (&t.data, u) {
        // The definition's operations in f64 lanes (hard_swish_f32).
        let mut out = crate::pool::f32_buffer(v.len());
        sqil_kernels_cpu::generic::hard_swish_f32(v, &mut out);
        return Ok(Tensor { shape: t.shape.clone(), data: Data::F32(out) });
    }
    if let (Data::F32(v), UnaryOp::Exp | UnaryOp::Log) = (&t.data, u) {
        // libm's exp or log in f64 rounded once, through a screened vector form (exp_f32,
        // log_f32).
        let mut out = crate::pool::f32_buffer(v.len());
        match u {
            UnaryOp::Exp => sqil_kernels_cpu::generic::exp_f32(v, &mut out),
            _ => sqil_kernels_cpu::generic::log_f32(v, &mut out),
        }
        return Ok(Tensor { shape: t.shape.clone(), data: Data::F32(out) });
    }
    if let (Data::F32(v), UnaryOp::Erf) = (&t.data, u) {
        // libm's erf in f64 rounded once, fdlibm's operations vectorized on |x| < 1.25 (erf_f32).
        let mut out = crate::pool::f32_buffer(v.len());
        sqil_kernels_cpu::generic::erf_f32(v, &mut out);
        return Ok(Tensor { shape: t.shape.clone(), data: Data::F32(out) });
    }
    if let (Data::F32(v), UnaryOp::Sigmoid | UnaryOp::Tanh | UnaryOp::Softplus) = (&t.data, u) {
        // The definitions' own operations, four lanes at a time (sigmoid_f32, tanh_f32,
        // softplus_f32).
        let mut out = crate::pool::f32_buffer(v.len());
        match u {
            UnaryOp::Sigmoid => sqil_kernels_cpu::generic::sigmoid_f32(v, &mut out),
            UnaryOp::Tanh => sqil_kernels_cpu::generic::tanh_f32(v, &mut out),
            _ => sqil_kernels_cpu::generic::softplus_f32(v, &mut out),
        }
        return Ok(Tensor { shape: t.shape.clone(), data: Data::F32(out) });
    }
    map_float(t, u.def().name, u.def().f)
}

pub(crate) fn gelu(t: &Tensor, tanh: bool) -> Result<Tensor> {
    if let (true, Data::F32(v)) = (tanh, &t.data) {
        // The definition (gelu_tanh), eight lanes screened with AVX-512 (gelu_tanh_f32).
        let mut out = crate::pool::f32_buffer(v.len());
        sqil_kernels_cpu::generic::gelu_tanh_f32(v, &mut out);
        Ok(Tensor { shape: t.shape.clone(), data: Data::F32(out) })
    } else if tanh {
        map_float(t, "Gelu", sqil_kernels_cpu::generic::gelu_tanh)
    } else if let Data::F32(v) = &t.data {
        // The same f64 operations, erf vectorized as Erf's (gelu_erf_f32).
        let mut out = crate::pool::f32_buffer(v.len());
        sqil_kernels_cpu::generic::gelu_erf_f32(v, &mut out);
        Ok(Tensor { shape: t.shape.clone(), data: Data::F32(out) })
    } else {
        map_float(t, "Gelu", sqil_kernels_cpu::generic::gelu_erf)
    }
}

/// Integer and float arithmetic with the semantics of ONNX: integers wrap, integer division
/// truncates toward zero (division by zero gives 0 rather than trapping).
trait Arith: Copy {
    fn add(self, o: Self) -> Self;
    fn sub(self, o: Self) -> Self;
    fn mul(self, o: Self) -> Self;
    fn div(self, o: Self) -> Self;
}

macro_rules! arith_int {
    ($($t:ty),*) => {$(
        impl Arith for $t {
            fn add(self, o: Self) -> Self { self.wrapping_add(o) }
            fn sub(self, o: Self) -> Self { self.wrapping_sub(o) }
            fn mul(self, o: Self) -> Self { self.wrapping_mul(o) }
            fn div(self, o: Self) -> Self { self.checked_div(o).unwrap_or(0) }
        }
    )*};
}
arith_int!(i64, i32, i16, i8, u64, u32, u16, u8);

macro_rules! arith_float {
    ($($t:ty),*) => {$(
        impl Arith for $t {
            fn add(self, o: Self) -> Self { self + o }
            fn sub(self, o: Self) -> Self { self - o }
            fn mul(self, o: Self) -> Self { self * o }
            fn div(self, o: Self) -> Self { self / o }
        }
    )*};
}
arith_float!(f32, f64);

macro_rules! arith_half {
    ($($t:ty),*) => {$(
        impl Arith for $t {
            fn add(self, o: Self) -> Self { <$t>::from_f32(self.to_f32() + o.to_f32()) }
            fn sub(self, o: Self) -> Self { <$t>::from_f32(self.to_f32() - o.to_f32()) }
            fn mul(self, o: Self) -> Self { <$t>::from_f32(self.to_f32() * o.to_f32()) }
            fn div(self, o: Self) -> Self { <$t>::from_f32(self.to_f32() / o.to_f32()) }
        }
    )*};
}
arith_half!(f16, bf16);

fn arith<T: Arith>(o: BinaryOp, a: &[T], ash: &[usize], b: &[T], bsh: &[usize]) -> Result<(Vec<usize>, Vec<T>)> {
    match o {
        BinaryOp::Add => zip2(a, ash, b, bsh, T::add),
        BinaryOp::Sub => zip2(a, ash, b, bsh, T::sub),
        BinaryOp::Mul => zip2(a, ash, b, bsh, T::mul),
        BinaryOp::Div => zip2(a, ash, b, bsh, T::div),
        BinaryOp::Pow => unreachable!("Pow is computed in f64"),
    }
}

pub(crate) fn binary(o: BinaryOp, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if o == BinaryOp::Pow {
        return pow(a, b);
    }
    if let (Data::F32(x), Data::F32(y)) = (&a.data, &b.data) {
        // A copy of `a`, then the op in place where `b` broadcasts over it in a contiguous form
        // (no index gather; the buffer from the pool).
        if Over::of(&a.shape, &b.shape).is_some() {
            let mut out = crate::pool::f32_buffer(x.len());
            // (`copy_f32`: `memcpy`'s `rep movsb` is slow on misaligned pairs.)
            sqil_kernels_cpu::copy_f32(x, &mut out);
            if binary_f32_in_place(o, &mut out, &a.shape, y, &b.shape) {
                return Ok(Tensor { shape: a.shape.clone(), data: Data::F32(out) });
            }
        }
    }
    macro_rules! go {
        ($($v:ident),*) => {
            match (&a.data, &b.data) {
                $((Data::$v(x), Data::$v(y)) => {
                    let (shape, v) = arith(o, x, &a.shape, y, &b.shape)?;
                    Tensor { shape, data: Data::$v(v) }
                })*
                _ => {
                    return Err(if a.dtype() == b.dtype() {
                        IrError::Unsupported(format!("{o:?} on {}", a.dtype()))
                    } else {
                        IrError::Invalid(format!("{o:?} of mixed types {} and {}", a.dtype(), b.dtype()))
                    })
                }
            }
        };
    }
    Ok(go!(F32, F64, F16, BF16, I64, I32, I16, I8, U64, U32, U16, U8))
}

/// `x = x (op) b` for an f32 Add, Sub, Mul or Div, in place, where `b` (shape `bsh`) broadcasts
/// over `x` (shape `xsh`) in one of the contiguous forms of [`Over`]: one f32 operation per element
/// with `x` the first operand, the op's definition. Returns false (`x` untouched) otherwise.
pub fn binary_f32_in_place(o: BinaryOp, x: &mut [f32], xsh: &[usize], b: &[f32], bsh: &[usize]) -> bool {
    let Some(form) = Over::of(xsh, bsh) else { return false };
    if x.len() != xsh.iter().product::<usize>() || b.len() != bsh.iter().product::<usize>() {
        return false;
    }
    /// The loops of one op (a closure type each, so each inlines and vectorizes), on AVX2's
    /// registers where the CPU has them (the baseline's four-lane SSE form: a transformer's
    /// divisions and additions took twice as long). The same IEEE operation per value.
    fn dispatch(form: Over, x: &mut [f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Copy) {
        #[cfg(target_arch = "x86_64")]
        if sqil_kernels_cpu::isa() != sqil_kernels_cpu::Isa::Generic {
            // SAFETY: isa() checked AVX2 and FMA.
            return unsafe { apply_avx2(form, x, b, f) };
        }
        apply(form, x, b, f)
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn apply_avx2(form: Over, x: &mut [f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Copy) {
        apply(form, x, b, f)
    }
    #[inline(always)]
    fn apply(form: Over, x: &mut [f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Copy) {
        let zip = |x: &mut [f32], b: &[f32]| x.iter_mut().zip(b).for_each(|(v, &y)| *v = f(*v, y));
        let splat = |x: &mut [f32], y: f32| x.iter_mut().for_each(|v| *v = f(*v, y));
        match form {
            Over::Same => zip(x, b),
            Over::Scalar => splat(x, b[0]),
            Over::Tiled => x.chunks_exact_mut(b.len()).for_each(|r| zip(r, b)),
            Over::Block(n) => x.chunks_exact_mut(n).zip(b).for_each(|(r, &y)| splat(r, y)),
        }
    }
    match o {
        BinaryOp::Add => dispatch(form, x, b, |x, y| x + y),
        BinaryOp::Sub => dispatch(form, x, b, |x, y| x - y),
        BinaryOp::Mul => dispatch(form, x, b, |x, y| x * y),
        BinaryOp::Div => dispatch(form, x, b, |x, y| x / y),
        BinaryOp::Pow => return false,
    }
    true
}

/// The exponent of an f32 Pow that runs as f32 operations: one f32 value of 1, 2 or 0.5 that does
/// not widen the base's shape.
pub fn pow_f32_exponent(a: &Tensor, b: &Tensor) -> Option<f32> {
    let Data::F32(e) = &b.data else { return None };
    (matches!(a.data, Data::F32(_)) && e.len() == 1 && b.rank() <= a.rank() && matches!(e[0], 1.0 | 2.0 | 0.5))
        .then_some(e[0])
}

/// `a ^ b` for any numeric base and exponent types; the result has the base's type.
fn pow(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if let (Some(e), Data::F32(x)) = (pow_f32_exponent(a, b), &a.data) {
        // pow(x, 2) of an f32 is exact in f64 (48 bits), which libm's pow returns exactly, so its
        // f32 rounding is the f32 product; pow(x, 0.5) is sqrt(x) (correctly rounded, see Sqrt)
        // except at -0 (+0) and -inf (+inf); pow(x, 1) is x.
        let v = match e {
            2.0 => x.iter().map(|&v| v * v).collect(),
            0.5 => x.iter().map(|&v| if v == f32::NEG_INFINITY { f32::INFINITY } else { v.sqrt() + 0.0 }).collect(),
            _ => x.clone(),
        };
        return Tensor::from_f32(a.shape.clone(), v);
    }
    if a.dtype() == crate::DType::F32 && b.dtype() == crate::DType::F32 {
        let (shape, v) =
            zip2(a.as_f32()?, &a.shape, b.as_f32()?, &b.shape, |x: f32, y: f32| (x as f64).powf(y as f64) as f32)?;
        return Tensor::from_f32(shape, v);
    }
    let (x, y) = (a.data.to_f64_vec(), b.data.to_f64_vec());
    let (shape, v) = zip2(&x, &a.shape, &y, &b.shape, f64::powf)?;
    let data = if a.dtype().is_integer() {
        Data::from_i64(a.dtype(), v.into_iter().map(|r| r as i64))
    } else {
        Data::from_f64(a.dtype(), v.into_iter())
    };
    Tensor::new(shape, data)
}

pub(crate) fn prelu(x: &Tensor, slope: &Tensor) -> Result<Tensor> {
    if let (Data::F32(xv), Data::F32(sv)) = (&x.data, &slope.data) {
        // f32 arithmetic (one product, exact in f64 too, so the same bits as the general path);
        // a per-channel slope (one non-1 dimension, matching x's) runs as blocks of one slope.
        let f = |v: f32, s: f32| if v < 0.0 { v * s } else { v };
        let lead = x.rank().saturating_sub(slope.rank());
        let aligned: Vec<usize> = std::iter::repeat_n(1, lead).chain(slope.shape.iter().copied()).collect();
        let non1: Vec<usize> = (0..aligned.len()).filter(|&d| aligned[d] != 1).collect();
        if aligned.len() == x.rank() && non1.len() == 1 && aligned[non1[0]] == x.shape[non1[0]] {
            let d = non1[0];
            let inner: usize = x.shape[d + 1..].iter().product();
            let c = x.shape[d];
            let mut out = Vec::with_capacity(xv.len());
            for (bi, block) in xv.chunks(inner.max(1)).enumerate() {
                let s = sv[bi % c];
                out.extend(block.iter().map(|&v| f(v, s)));
            }
            return Tensor::new(x.shape.clone(), Data::F32(out));
        }
        let (shape, v) = zip2(xv, &x.shape, sv, &slope.shape, f)?;
        if shape != x.shape {
            return Err(IrError::Invalid(format!(
                "PRelu slope {:?} does not broadcast to input {:?}",
                slope.shape, x.shape
            )));
        }
        return Tensor::new(shape, Data::F32(v));
    }
    let (xs, ss) = (x.data.to_f64_vec(), slope.data.to_f64_vec());
    let (shape, v) = zip2(&xs, &x.shape, &ss, &slope.shape, |v, s| if v < 0.0 { v * s } else { v })?;
    if shape != x.shape {
        return Err(IrError::Invalid(format!(
            "PRelu slope {:?} does not broadcast to input {:?}",
            slope.shape, x.shape
        )));
    }
    data_like(x.dtype(), shape, v)
}

fn data_like(dtype: crate::DType, shape: Vec<usize>, v: Vec<f64>) -> Result<Tensor> {
    let data = if dtype.is_integer() {
        Data::from_i64(dtype, v.into_iter().map(|r| r as i64))
    } else {
        Data::from_f64(dtype, v.into_iter())
    };
    Tensor::new(shape, data)
}

/// Whether Where on these inputs takes its direct path ([`where_direct_shape`]).
pub fn where_direct(c: &Tensor, x: &Tensor, y: &Tensor) -> bool {
    where_direct_shape(c, x, y).is_some()
}

/// The output shape of Where's direct path, if it takes it: f32 branches, the condition and each
/// branch either the output's shape or one value.
fn where_direct_shape<'a>(c: &'a Tensor, x: &'a Tensor, y: &'a Tensor) -> Option<&'a [usize]> {
    let out = [c, x, y].into_iter().max_by_key(|t| (t.rank(), t.len())).expect("three");
    (matches!((&c.data, &x.data, &y.data), (Data::Bool(_), Data::F32(_), Data::F32(_)))
        && [c, x, y].iter().all(|t| t.shape == out.shape || (t.len() == 1 && t.rank() <= out.rank())))
    .then_some(&out.shape[..])
}

pub(crate) fn where_(c: &Tensor, x: &Tensor, y: &Tensor) -> Result<Tensor> {
    let Data::Bool(cond) = &c.data else {
        return Err(IrError::Invalid(format!("Where condition must be bool, got {}", c.dtype())));
    };
    if let (Some(shape), Data::F32(xv), Data::F32(yv)) = (where_direct_shape(c, x, y), &x.data, &y.data) {
        // A selection per element, nothing computed: each input indexed directly (one value
        // repeated) instead of through broadcast index tables.
        let at = |v: &[f32], i: usize| if v.len() == 1 { v[0] } else { v[i] };
        let n = shape.iter().product();
        let v = (0..n).map(|i| if cond[if cond.len() == 1 { 0 } else { i }] { at(xv, i) } else { at(yv, i) });
        return Tensor::from_f32(shape.to_vec(), v.collect());
    }
    let bc = Broadcast::new(&[&c.shape, &x.shape, &y.shape])?;
    let (ic, ix, iy) = (bc.indices(0), bc.indices(1), bc.indices(2));
    let both = Data::concat(&[&x.data, &y.data])?;
    let off = x.len();
    let idx: Vec<usize> = (0..bc.out_len()).map(|o| if cond[ic[o]] { ix[o] } else { off + iy[o] }).collect();
    Tensor::new(bc.out_shape.clone(), both.gather(&idx))
}

/// Clip's bounds as its f32 path takes them: each absent or empty (unbounded) or one f32 value;
/// `None` for any other bound.
pub fn clip_bounds_f32(min: Option<&Tensor>, max: Option<&Tensor>) -> Option<(f32, f32)> {
    let bound = |t: Option<&Tensor>, none: f32| match t {
        None => Some(none),
        Some(t) if t.is_empty() => Some(none),
        Some(t) if t.len() == 1 && t.dtype() == crate::DType::F32 => Some(t.data.to_f32_vec()[0]),
        Some(_) => None,
    };
    Some((bound(min, f32::NEG_INFINITY)?, bound(max, f32::INFINITY)?))
}

pub(crate) fn clip(x: &Tensor, min: Option<&Tensor>, max: Option<&Tensor>) -> Result<Tensor> {
    let bound = |t: Option<&Tensor>, what: &str| -> Result<Option<Tensor>> {
        match t {
            None => Ok(None),
            Some(t) if t.is_empty() => Ok(None),
            Some(t) if t.len() == 1 => Ok(Some(t.clone())),
            Some(t) => Err(IrError::Invalid(format!("Clip {what} must be a scalar, has shape {:?}", t.shape))),
        }
    };
    let (lo, hi) = (bound(min, "min")?, bound(max, "max")?);
    if x.dtype().is_integer() {
        let lo = lo.map_or(i64::MIN, |t| t.data.to_i64_vec()[0]);
        let hi = hi.map_or(i64::MAX, |t| t.data.to_i64_vec()[0]);
        return Ok(map_int(x, |v| v.max(lo).min(hi)));
    }
    if let (Data::F32(v), Some((lo, hi))) = (&x.data, clip_bounds_f32(lo.as_ref(), hi.as_ref())) {
        // f32 values and bounds: the same comparisons in f32 (exact: no rounding anywhere).
        let out = v.iter().map(|&v| sqil_kernels_cpu::generic::clip_f32(v, lo, hi)).collect();
        return Tensor::new(x.shape.clone(), Data::F32(out));
    }
    let lo = lo.map_or(f64::NEG_INFINITY, |t| t.data.to_f64_vec()[0]);
    let hi = hi.map_or(f64::INFINITY, |t| t.data.to_f64_vec()[0]);
    // numpy's order: raise to `min`, then cap at `max` (so min > max gives max everywhere).
    map_float(x, "Clip", |v| {
        let v = if v < lo { lo } else { v };
        if v > hi {
            hi
        } else {
            v
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The f32 fast path of the binary ops (a copy of `a`, the op in place over a contiguous
    /// broadcast of `b`) against the general gather by broadcast indices, bit for bit: every form
    /// of [`Over`], both operand orders (one of them not `a`'s shape: the gather), NaN,
    /// infinities, signed zeros.
    #[test]
    fn f32_binary_fast_path_equals_the_index_gather() {
        let cases: &[(&[usize], &[usize])] = &[
            (&[2, 3, 4], &[2, 3, 4]),
            (&[2, 3, 4], &[]),
            (&[2, 3, 4], &[1]),
            (&[2, 3, 4], &[4]),
            (&[2, 3, 4], &[1, 3, 4]),
            (&[2, 3, 4, 5], &[2, 3, 1, 1]),
            (&[2, 3, 4, 5], &[1, 3, 1, 1]),
            (&[3, 2], &[3, 1]),
            (&[1, 3], &[2, 1]),
            (&[4], &[2, 3, 4]),
        ];
        let special = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0, 1e-40, 3.5];
        let fill = |n: usize, k: usize| -> Vec<f32> {
            (0..n)
                .map(|i| {
                    if (i + k).is_multiple_of(5) {
                        special[(i + k) % 7]
                    } else {
                        (i as f32 * 0.37 - 2.0) * (k as f32 + 1.0)
                    }
                })
                .collect()
        };
        for &(ash, bsh) in cases {
            for (xs, ys) in [(ash, bsh), (bsh, ash)] {
                let x = fill(xs.iter().product(), 1);
                let y = fill(ys.iter().product(), 2);
                let (a, b) = (
                    Tensor::from_f32(xs.to_vec(), x.clone()).unwrap(),
                    Tensor::from_f32(ys.to_vec(), y.clone()).unwrap(),
                );
                for (o, f) in [
                    (BinaryOp::Add, (|p, q| p + q) as fn(f32, f32) -> f32),
                    (BinaryOp::Sub, |p, q| p - q),
                    (BinaryOp::Mul, |p, q| p * q),
                    (BinaryOp::Div, |p, q| p / q),
                ] {
                    let got = binary(o, &a, &b).unwrap();
                    let bc = Broadcast::new(&[xs, ys]).unwrap();
                    let want: Vec<f32> = bc.indices(0).iter().zip(bc.indices(1)).map(|(&i, j)| f(x[i], y[j])).collect();
                    assert_eq!(got.shape, bc.out_shape, "{o:?} {xs:?} {ys:?}");
                    let bits = |v: &[f32]| {
                        v.iter().map(|v| if v.is_nan() { 0x7fc0_0000 } else { v.to_bits() }).collect::<Vec<_>>()
                    };
                    assert_eq!(bits(got.as_f32().unwrap()), bits(&want), "{o:?} {xs:?} {ys:?}");
                }
            }
        }
    }
}
