//! QuantizeLinear, DequantizeLinear and the IR's FakeQuant, with exact integer semantics:
//! `x / scale` in f32, rounding half to even, saturation to the target range.

use super::{norm_axis, Cx};
use crate::dtype::DType;
use crate::error::{IrError, Result};
use crate::shape::ValueType;
use crate::tensor::{Data, Tensor};

/// For every element of `x_shape`, the flat index of its scale / zero point: one for the whole
/// tensor (a one-element scale), one per index along `axis` (a 1-D scale), or one per block of
/// `block` consecutive indices along `axis` (a scale of x's rank).
pub fn param_index(x_shape: &[usize], p_shape: &[usize], axis: i64, block: i64) -> Result<Vec<usize>> {
    let n: usize = x_shape.iter().product();
    let plen: usize = p_shape.iter().product();
    if plen == 1 && block == 0 {
        return Ok(vec![0; n]);
    }
    let ax = norm_axis(axis, x_shape.len())?;
    let inner: usize = x_shape[ax + 1..].iter().product();
    let dim = x_shape[ax];
    if block <= 0 {
        if p_shape.len() != 1 || p_shape[0] != dim {
            return Err(IrError::Invalid(format!(
                "per-axis scale {p_shape:?} does not match axis {ax} of {x_shape:?}"
            )));
        }
        let mut idx = Vec::with_capacity(n);
        for _ in 0..n / (dim * inner).max(1) {
            (0..dim).for_each(|k| idx.extend(std::iter::repeat_n(k, inner)));
        }
        return Ok(idx);
    }
    let b = block as usize;
    let mut want = x_shape.to_vec();
    want[ax] = dim.div_ceil(b);
    if p_shape != want.as_slice() {
        return Err(IrError::Invalid(format!(
            "blocked scale {p_shape:?} should be {want:?} for {x_shape:?} with block {b} on axis {ax}"
        )));
    }
    let mut idx = Vec::with_capacity(n);
    for outer in 0..n / (dim * inner).max(1) {
        for k in 0..dim {
            let base = (outer * want[ax] + k / b) * inner;
            idx.extend(base..base + inner);
        }
    }
    Ok(idx)
}

pub(crate) fn infer_quantize(cx: &Cx, output_dtype: Option<DType>) -> Result<Vec<ValueType>> {
    let x = cx.ty(0)?;
    let dtype = quant_dtype(cx.opt_ty(2).map(|t| t.dtype), output_dtype)?;
    Ok(vec![ValueType::new(dtype, x.shape.clone())])
}

fn quant_dtype(zp: Option<DType>, output_dtype: Option<DType>) -> Result<DType> {
    let d = match (zp, output_dtype) {
        (Some(z), Some(o)) if z != o => {
            return Err(IrError::Invalid(format!("QuantizeLinear: zero point is {z} but output_dtype is {o}")))
        }
        (Some(z), _) => z,
        (None, Some(o)) => o,
        (None, None) => DType::U8,
    };
    if !d.is_integer() || d.bits() > 16 {
        return Err(IrError::Unsupported(format!("quantization to {d}")));
    }
    Ok(d)
}

pub(crate) fn infer_dequantize(cx: &Cx) -> Result<Vec<ValueType>> {
    Ok(vec![ValueType::new(cx.ty(1)?.dtype, cx.ty(0)?.shape.clone())])
}

fn f32_or_f64(t: &Tensor, what: &str) -> Result<Vec<f64>> {
    match &t.data {
        Data::F64(v) => Ok(v.clone()),
        d if d.dtype().is_float() => Ok(d.to_f32_vec().into_iter().map(|x| x as f64).collect()),
        d => Err(IrError::Invalid(format!("{what} must be float, got {}", d.dtype()))),
    }
}

/// A per-tensor f32 scale's value.
fn one_f32(scale: &Tensor) -> Option<f32> {
    match &scale.data {
        Data::F32(v) if v.len() == 1 => Some(v[0]),
        _ => None,
    }
}

/// A per-tensor (or absent: 0) integer zero point's value.
fn one_int(zp: Option<&Tensor>) -> Option<i64> {
    match zp {
        None => Some(0),
        Some(z) if z.len() == 1 && z.dtype().is_integer() => Some(z.data.to_i64_vec()[0]),
        Some(_) => None,
    }
}

/// Whether QuantizeLinear / DequantizeLinear (`block` its block size) on these inputs takes the
/// per-tensor f32 path (`"f32 kernel"` in `sqil bench --profile`): not blocked, one f32 scale, one
/// integer zero point or none, and for QuantizeLinear an f32 input.
pub fn per_tensor_f32(x: &Tensor, scale: &Tensor, zp: Option<&Tensor>, block: i64, quantize: bool) -> bool {
    block == 0 && one_f32(scale).is_some() && one_int(zp).is_some() && (!quantize || matches!(x.data, Data::F32(_)))
}

pub(crate) fn quantize(
    x: &Tensor,
    scale: &Tensor,
    zp: Option<&Tensor>,
    axis: i64,
    block: i64,
    output_dtype: Option<DType>,
) -> Result<Tensor> {
    let dtype = quant_dtype(zp.map(Tensor::dtype), output_dtype)?;
    let (lo, hi) = dtype.int_range().expect("integer");
    if let (Data::F32(xv), Some(s), Some(z), 0) = (&x.data, one_f32(scale), one_int(zp), block) {
        // Per tensor on f32 (what the runtime serves): the same operations per value (the f32
        // division, ties to even, the zero point and the clamp in f64, the saturating cast)
        // without index tables or an f64 copy of the input.
        let (lo, hi) = (lo as f64, hi as f64);
        let q = xv.iter().map(|&v| (round_even(v / s) as f64 + z as f64).clamp(lo, hi) as i64);
        return Tensor::new(x.shape.clone(), Data::from_i64(dtype, q));
    }
    let idx = param_index(&x.shape, &scale.shape, axis, block)?;
    let zps = zp.map(|z| z.data.to_i64_vec());
    if let Some(z) = zp {
        param_index(&x.shape, &z.shape, axis, block)?;
    }
    let xv = f32_or_f64(x, "QuantizeLinear input")?;
    let sv = f32_or_f64(scale, "QuantizeLinear scale")?;
    let wide = x.dtype() == DType::F64;
    let q = xv.iter().zip(&idx).map(|(&v, &i)| {
        // The division happens in the input's precision (f32 unless the input is f64).
        let r = if wide { (v / sv[i]).round_ties_even() } else { round_even(v as f32 / sv[i] as f32) as f64 };
        let z = zps.as_ref().map_or(0, |z| z[i]);
        (r + z as f64).clamp(lo as f64, hi as f64) as i64
    });
    Tensor::new(x.shape.clone(), Data::from_i64(dtype, q))
}

/// QuantizeLinear of `x` to `dtype` (integer, saturating, round half to even).
pub fn quantize_values(
    x: &Tensor,
    scale: &Tensor,
    zp: Option<&Tensor>,
    axis: i64,
    block: i64,
    dtype: DType,
) -> Result<Tensor> {
    quantize(x, scale, zp, axis, block, Some(dtype))
}

pub(crate) fn dequantize(x: &Tensor, scale: &Tensor, zp: Option<&Tensor>, axis: i64, block: i64) -> Result<Tensor> {
    if !x.dtype().is_integer() {
        return Err(IrError::Unsupported(format!("DequantizeLinear of {}", x.dtype())));
    }
    if let Some(z) = zp {
        if z.dtype() != x.dtype() {
            return Err(IrError::Invalid(format!(
                "DequantizeLinear: zero point is {} but input is {}",
                z.dtype(),
                x.dtype()
            )));
        }
    }
    if let (Some(s), Some(z), 0) = (one_f32(scale), one_int(zp), block) {
        // Per tensor with an f32 scale (what the runtime serves): `(q - zero) as f32 * scale`
        // per value, written as f32 directly.
        let y = x.data.to_i64_vec().into_iter().map(|q| (q - z) as f32 * s).collect();
        return Tensor::new(x.shape.clone(), Data::F32(y));
    }
    let idx = param_index(&x.shape, &scale.shape, axis, block)?;
    let zps = zp.map(|z| z.data.to_i64_vec());
    if let Some(z) = zp {
        param_index(&x.shape, &z.shape, axis, block)?;
    }
    let xv = x.data.to_i64_vec();
    let sv = f32_or_f64(scale, "DequantizeLinear scale")?;
    let wide = scale.dtype() == DType::F64;
    let y = xv.iter().zip(&idx).map(|(&q, &i)| {
        let d = q - zps.as_ref().map_or(0, |z| z[i]);
        if wide {
            d as f64 * sv[i]
        } else {
            (d as f32 * sv[i] as f32) as f64
        }
    });
    Tensor::new(x.shape.clone(), Data::from_f64(scale.dtype(), y))
}

/// The integer range of a FakeQuant with `bits` bits.
pub fn fake_quant_range(bits: u8, signed: bool) -> (i64, i64) {
    if signed {
        (-(1i64 << (bits - 1)), (1i64 << (bits - 1)) - 1)
    } else {
        (0, (1i64 << bits) - 1)
    }
}

pub(crate) fn fake_quant(
    x: &Tensor,
    scale: &Tensor,
    zp: Option<&Tensor>,
    bits: u8,
    signed: bool,
    axis: i64,
    block: i64,
) -> Result<Tensor> {
    if !matches!(x.dtype(), DType::F32 | DType::F16 | DType::BF16) {
        return Err(IrError::Unsupported(format!("FakeQuant on {}", x.dtype())));
    }
    let (lo, hi) = fake_quant_range(bits, signed);
    let (lo, hi) = (lo as f32, hi as f32);
    if let (Data::F32(xv), true) = (&x.data, one_scale(scale, zp, bits, block)) {
        // One scale and zero point: the kernels' loop (AVX2 where the CPU has it), the same
        // IEEE operations as below (quotients beyond 2^22 saturate to lo or hi whatever their
        // rounding, since |lo|, |hi| <= 2^16).
        let s = scale.data.to_f32_vec()[0];
        let z = zp.map_or(0.0, |z| z.data.to_f32_vec()[0]);
        // Every value is written: a recycled buffer (a fresh one's pages fault in as they are
        // written: 1.7 ns per value on a batch of 64 images, 0.13 ns on one).
        let mut y = crate::pool::f32_buffer(xv.len());
        sqil_kernels_cpu::generic::fake_quant_into(xv, s, z, lo, hi, &mut y);
        return Tensor::new(x.shape.clone(), Data::F32(y));
    }
    let idx = param_index(&x.shape, &scale.shape, axis, block)?;
    let sv = scale.data.to_f32_vec();
    let zv = zp.map(|z| z.data.to_f32_vec());
    if let Some(z) = zp {
        param_index(&x.shape, &z.shape, axis, block)?;
    }
    let xv = x.data.to_f32_vec();
    let y = xv.iter().zip(&idx).map(|(&v, &i)| {
        let z = zv.as_ref().map_or(0.0, |z| z[i]);
        let q = (round_even(v / sv[i]) + z).clamp(lo, hi);
        (q - z) * sv[i]
    });
    let data = match x.dtype() {
        DType::F32 => Data::F32(y.collect()),
        dt => Data::from_f64(dt, y.map(f64::from)),
    };
    Tensor::new(x.shape.clone(), data)
}

/// Whether a FakeQuant has one scale and zero point (the case [`fake_quant`] runs on the kernels'
/// loop and [`fake_quant_post`] takes): one scale, no zero point or one, no blocks, at most 16
/// bits.
pub fn one_scale(scale: &Tensor, zp: Option<&Tensor>, bits: u8, block: i64) -> bool {
    scale.len() == 1 && block == 0 && zp.is_none_or(|z| z.len() == 1) && bits <= 16
}

/// A FakeQuant for which [`one_scale`] holds as the element-wise op a kernel applies to values
/// in place or to its outputs (`sqil_kernels_cpu::post_in_place`): the same operations as
/// [`fake_quant`] on that path, the same bits.
pub fn fake_quant_post(scale: &Tensor, zp: Option<&Tensor>, bits: u8, signed: bool) -> sqil_kernels_cpu::Post {
    let (lo, hi) = fake_quant_range(bits, signed);
    sqil_kernels_cpu::Post::FakeQuant {
        scale: scale.data.to_f32_vec()[0],
        zero: zp.map_or(0.0, |z| z.data.to_f32_vec()[0]),
        lo: lo as f32,
        hi: hi as f32,
    }
}

/// Round half to even, as `f32::round_ties_even` but without its libm call on baseline x86-64
/// (shared with the CPU kernels, so simulation and kernels round alike).
pub use sqil_kernels_cpu::generic::round_even;

#[cfg(test)]
mod tests {
    use super::round_even;

    #[test]
    fn round_even_matches_the_standard_library_bit_for_bit() {
        let special = [0.5f32, 1.5, 2.5, -0.5, -2.5, -0.3, 0.0, -0.0, 4_194_303.5, 4_194_304.5, 8_388_607.5, 1e9, -1e9];
        let mut x = 0x1234_5678u32;
        let random = (0..200_000).map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            f32::from_bits(x)
        });
        for v in special.into_iter().chain(random).filter(|v| !v.is_nan()) {
            assert_eq!(round_even(v).to_bits(), v.round_ties_even().to_bits(), "{v}");
        }
        assert!(round_even(f32::NAN).is_nan());
    }

    #[test]
    fn per_tensor_fake_quant_equals_the_general_path() {
        use crate::tensor::{Data, Tensor};
        // The one-scale loop against the indexed loop (a per-axis scale of equal values).
        let mut x = 0x9e37_79b9u32;
        let mut vals: Vec<f32> = (0..4001)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x as f32 / u32::MAX as f32 - 0.5) * 20.0
            })
            .collect();
        let special = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0, 0.05, -0.15, 1e30, -1e30, 5e5, 8.4e6];
        vals[..special.len()].copy_from_slice(&special);
        vals[4000] = 0.25;
        let t = Tensor::new(vec![4001], Data::F32(vals)).unwrap();
        for (bits, signed, zero) in [(8, true, 3.0f32), (4, true, 0.0), (8, false, 128.0), (16, true, -7.0)] {
            let one = |v: f32, n: usize| Tensor::new(vec![n], Data::F32(vec![v; n])).unwrap();
            let fast = super::fake_quant(&t, &one(0.1, 1), Some(&one(zero, 1)), bits, signed, 0, 0).unwrap();
            let slow = super::fake_quant(&t, &one(0.1, 4001), Some(&one(zero, 4001)), bits, signed, 0, 0).unwrap();
            let (f, s) = (fast.data.to_f32_vec(), slow.data.to_f32_vec());
            for (i, (a, b)) in f.iter().zip(&s).enumerate() {
                assert!(a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()), "bits {bits} at {i}: {a} vs {b}");
            }
        }
    }
}
