//! Dense tensors: the constants of the IR and the values of the interpreter.

use crate::dtype::DType;
use crate::error::{IrError, Result};
use half::{bf16, f16};

/// Typed element storage, row-major. `I4`/`U4` keep one value per byte (unpacked); see
/// [`pack_nibbles`] for the serialised layout.
#[derive(Clone, Debug, PartialEq)]
pub enum Data {
    F32(Vec<f32>),
    F64(Vec<f64>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    I64(Vec<i64>),
    I32(Vec<i32>),
    I16(Vec<i16>),
    I8(Vec<i8>),
    U64(Vec<u64>),
    U32(Vec<u32>),
    U16(Vec<u16>),
    U8(Vec<u8>),
    Bool(Vec<bool>),
    /// Values in [-8, 7].
    I4(Vec<i8>),
    /// Values in [0, 15].
    U4(Vec<u8>),
}

/// Applies a generic expression to the vector inside any [`Data`] variant and rewraps the result
/// in the same variant: `map_data!(data, v => v.clone())`.
#[macro_export]
macro_rules! map_data {
    ($data:expr, $v:ident => $e:expr) => {{
        use $crate::tensor::Data as D;
        match $data {
            D::F32($v) => D::F32($e),
            D::F64($v) => D::F64($e),
            D::F16($v) => D::F16($e),
            D::BF16($v) => D::BF16($e),
            D::I64($v) => D::I64($e),
            D::I32($v) => D::I32($e),
            D::I16($v) => D::I16($e),
            D::I8($v) => D::I8($e),
            D::U64($v) => D::U64($e),
            D::U32($v) => D::U32($e),
            D::U16($v) => D::U16($e),
            D::U8($v) => D::U8($e),
            D::Bool($v) => D::Bool($e),
            D::I4($v) => D::I4($e),
            D::U4($v) => D::U4($e),
        }
    }};
}

/// Evaluates a generic expression over the vector inside any [`Data`] variant.
#[macro_export]
macro_rules! with_data {
    ($data:expr, $v:ident => $e:expr) => {{
        use $crate::tensor::Data as D;
        match $data {
            D::F32($v) => $e,
            D::F64($v) => $e,
            D::F16($v) => $e,
            D::BF16($v) => $e,
            D::I64($v) => $e,
            D::I32($v) => $e,
            D::I16($v) => $e,
            D::I8($v) => $e,
            D::U64($v) => $e,
            D::U32($v) => $e,
            D::U16($v) => $e,
            D::U8($v) => $e,
            D::Bool($v) => $e,
            D::I4($v) => $e,
            D::U4($v) => $e,
        }
    }};
}

impl Data {
    pub fn dtype(&self) -> DType {
        match self {
            Data::F32(_) => DType::F32,
            Data::F64(_) => DType::F64,
            Data::F16(_) => DType::F16,
            Data::BF16(_) => DType::BF16,
            Data::I64(_) => DType::I64,
            Data::I32(_) => DType::I32,
            Data::I16(_) => DType::I16,
            Data::I8(_) => DType::I8,
            Data::U64(_) => DType::U64,
            Data::U32(_) => DType::U32,
            Data::U16(_) => DType::U16,
            Data::U8(_) => DType::U8,
            Data::Bool(_) => DType::Bool,
            Data::I4(_) => DType::I4,
            Data::U4(_) => DType::U4,
        }
    }

    pub fn len(&self) -> usize {
        with_data!(self, v => v.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `n` zeros (false, 0, +0.0) of `dtype`.
    pub fn zeros(dtype: DType, n: usize) -> Data {
        Data::from_f64(dtype, std::iter::repeat_n(0.0, n))
    }

    /// Builds data of `dtype` from f64 values with the conversion rules of [`Tensor::cast`].
    pub fn from_f64(dtype: DType, it: impl Iterator<Item = f64>) -> Data {
        match dtype {
            DType::F32 => Data::F32(it.map(|x| x as f32).collect()),
            DType::F64 => Data::F64(it.collect()),
            DType::F16 => Data::F16(it.map(f16::from_f64).collect()),
            DType::BF16 => Data::BF16(it.map(bf16::from_f64).collect()),
            DType::I64 => Data::I64(it.map(|x| x as i64).collect()),
            DType::I32 => Data::I32(it.map(|x| x as i32).collect()),
            DType::I16 => Data::I16(it.map(|x| x as i64 as i16).collect()),
            DType::I8 => Data::I8(it.map(|x| x as i64 as i8).collect()),
            DType::U64 => Data::U64(it.map(|x| x as u64).collect()),
            DType::U32 => Data::U32(it.map(|x| x as i64 as u32).collect()),
            DType::U16 => Data::U16(it.map(|x| x as i64 as u16).collect()),
            DType::U8 => Data::U8(it.map(|x| x as i64 as u8).collect()),
            DType::Bool => Data::Bool(it.map(|x| x != 0.0).collect()),
            DType::I4 | DType::U4 => Data::from_i64(dtype, it.map(|x| x as i64).collect::<Vec<_>>().into_iter()),
        }
    }

    /// Builds integer data of `dtype` from i64 values, wrapping like a C cast (int4 wraps to 4 bits).
    pub fn from_i64(dtype: DType, it: impl Iterator<Item = i64>) -> Data {
        match dtype {
            DType::I64 => Data::I64(it.collect()),
            DType::I32 => Data::I32(it.map(|x| x as i32).collect()),
            DType::I16 => Data::I16(it.map(|x| x as i16).collect()),
            DType::I8 => Data::I8(it.map(|x| x as i8).collect()),
            DType::U64 => Data::U64(it.map(|x| x as u64).collect()),
            DType::U32 => Data::U32(it.map(|x| x as u32).collect()),
            DType::U16 => Data::U16(it.map(|x| x as u16).collect()),
            DType::U8 => Data::U8(it.map(|x| x as u8).collect()),
            DType::Bool => Data::Bool(it.map(|x| x != 0).collect()),
            DType::I4 => Data::I4(it.map(|x| (((x as u8) << 4) as i8) >> 4).collect()),
            DType::U4 => Data::U4(it.map(|x| (x as u8) & 0xF).collect()),
            f => Data::from_f64(f, it.map(|x| x as f64)),
        }
    }

    /// Every element as f64 (exact for all types but the widest 64-bit integers).
    pub fn to_f64_vec(&self) -> Vec<f64> {
        match self {
            Data::F32(v) => v.iter().map(|&x| x as f64).collect(),
            Data::F64(v) => v.clone(),
            Data::F16(v) => v.iter().map(|x| x.to_f64()).collect(),
            Data::BF16(v) => v.iter().map(|x| x.to_f64()).collect(),
            Data::I64(v) => v.iter().map(|&x| x as f64).collect(),
            Data::I32(v) => v.iter().map(|&x| x as f64).collect(),
            Data::I16(v) => v.iter().map(|&x| x as f64).collect(),
            Data::I8(v) | Data::I4(v) => v.iter().map(|&x| x as f64).collect(),
            Data::U64(v) => v.iter().map(|&x| x as f64).collect(),
            Data::U32(v) => v.iter().map(|&x| x as f64).collect(),
            Data::U16(v) => v.iter().map(|&x| x as f64).collect(),
            Data::U8(v) | Data::U4(v) => v.iter().map(|&x| x as f64).collect(),
            Data::Bool(v) => v.iter().map(|&x| x as u8 as f64).collect(),
        }
    }

    /// The elements as f32, borrowed when they already are (no copy on the hot path).
    pub fn f32_cow(&self) -> std::borrow::Cow<'_, [f32]> {
        match self {
            Data::F32(v) => std::borrow::Cow::Borrowed(v),
            other => std::borrow::Cow::Owned(other.to_f32_vec()),
        }
    }

    /// Every element as f32; floats round, integers convert.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match self {
            Data::F32(v) => v.clone(),
            Data::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            Data::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
            other => other.to_f64_vec().into_iter().map(|x| x as f32).collect(),
        }
    }

    /// Every element of an integer or bool tensor as i64; floats truncate toward zero.
    pub fn to_i64_vec(&self) -> Vec<i64> {
        match self {
            Data::I64(v) => v.clone(),
            Data::I32(v) => v.iter().map(|&x| x as i64).collect(),
            Data::I16(v) => v.iter().map(|&x| x as i64).collect(),
            Data::I8(v) | Data::I4(v) => v.iter().map(|&x| x as i64).collect(),
            Data::U64(v) => v.iter().map(|&x| x as i64).collect(),
            Data::U32(v) => v.iter().map(|&x| x as i64).collect(),
            Data::U16(v) => v.iter().map(|&x| x as i64).collect(),
            Data::U8(v) | Data::U4(v) => v.iter().map(|&x| x as i64).collect(),
            Data::Bool(v) => v.iter().map(|&x| x as i64).collect(),
            other => other.to_f64_vec().into_iter().map(|x| x as i64).collect(),
        }
    }

    /// Picks elements by flat index, keeping the type.
    pub fn gather(&self, idx: &[usize]) -> Data {
        map_data!(self, v => idx.iter().map(|&i| v[i]).collect())
    }

    /// The elements at flat indices `r` (a contiguous run), keeping the type.
    pub fn range(&self, r: std::ops::Range<usize>) -> Data {
        map_data!(self, v => v[r.clone()].to_vec())
    }

    /// `outer` runs of `len` elements, run `o` from flat index `o * stride + start`, one after
    /// another, keeping the type: a part of a row-major tensor cut along one axis (a Split's
    /// output), copied run by run rather than element by element.
    pub fn runs(&self, outer: usize, stride: usize, start: usize, len: usize) -> Data {
        if let Data::F32(v) = self {
            // (Through `copy_f32`: `memcpy`'s `rep movsb` is slow on misaligned pairs.)
            let mut out = crate::pool::f32_buffer(outer * len);
            for (o, d) in out.chunks_exact_mut(len.max(1)).enumerate().take(outer) {
                sqil_kernels_cpu::copy_f32(&v[o * stride + start..o * stride + start + len], d);
            }
            return Data::F32(out);
        }
        map_data!(self, v => {
            let mut out = Vec::with_capacity(outer * len);
            for o in 0..outer {
                out.extend_from_slice(&v[o * stride + start..o * stride + start + len]);
            }
            out
        })
    }

    /// Parts of the same type joined along one axis of a row-major layout: for each of `outer`
    /// rows, part `k`'s run `o` (`chunks[k]` elements from `o * chunks[k]`) in order (a Concat's
    /// output), copied run by run.
    pub fn join_runs(parts: &[&Data], chunks: &[usize], outer: usize) -> Result<Data> {
        let first = parts.first().ok_or_else(|| IrError::Internal("join of nothing".into()))?;
        if parts.len() != chunks.len() {
            return Err(IrError::Internal("join_runs: a chunk per part".into()));
        }
        for p in parts {
            if p.dtype() != first.dtype() {
                return Err(IrError::Invalid(format!("concat of mixed types {} and {}", first.dtype(), p.dtype())));
            }
        }
        let total: usize = chunks.iter().sum::<usize>() * outer;
        if let Data::F32(_) = first {
            // (Through `copy_f32`, as `runs`; every value written.)
            let mut d = crate::pool::f32_buffer(total);
            let mut at = 0;
            for o in 0..outer {
                for (p, &c) in parts.iter().zip(chunks) {
                    let Data::F32(s) = p else { unreachable!("types checked above") };
                    sqil_kernels_cpu::copy_f32(&s[o * c..(o + 1) * c], &mut d[at..at + c]);
                    at += c;
                }
            }
            return Ok(Data::F32(d));
        }
        let mut out = map_data!(first, v => {
            let _ = v;
            Vec::with_capacity(total)
        });
        for o in 0..outer {
            for (p, &c) in parts.iter().zip(chunks) {
                macro_rules! ext {
                    ($($var:ident),*) => {
                        match (&mut out, p) {
                            $((Data::$var(d), Data::$var(s)) => d.extend_from_slice(&s[o * c..(o + 1) * c]),)*
                            _ => unreachable!("types checked above"),
                        }
                    };
                }
                ext!(F32, F64, F16, BF16, I64, I32, I16, I8, U64, U32, U16, U8, Bool, I4, U4);
            }
        }
        Ok(out)
    }

    /// Concatenation of several data of the same type: [`Data::join_runs`] of one run each.
    pub fn concat(parts: &[&Data]) -> Result<Data> {
        if parts.is_empty() {
            return Err(IrError::Internal("concat of nothing".into()));
        }
        let lens: Vec<usize> = parts.iter().map(|p| p.len()).collect();
        Data::join_runs(parts, &lens, 1)
    }

    /// Raw bytes of a little-endian, ONNX-style packed serialisation (int4 two per byte,
    /// low nibble first; bool one byte).
    pub fn to_le_bytes(&self) -> Vec<u8> {
        fn le<T: Copy, const N: usize>(v: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
            v.iter().flat_map(|&x| f(x)).collect()
        }
        match self {
            Data::F32(v) => le(v, f32::to_le_bytes),
            Data::F64(v) => le(v, f64::to_le_bytes),
            Data::F16(v) => le(v, f16::to_le_bytes),
            Data::BF16(v) => le(v, bf16::to_le_bytes),
            Data::I64(v) => le(v, i64::to_le_bytes),
            Data::I32(v) => le(v, i32::to_le_bytes),
            Data::I16(v) => le(v, i16::to_le_bytes),
            Data::I8(v) => v.iter().map(|&x| x as u8).collect(),
            Data::U64(v) => le(v, u64::to_le_bytes),
            Data::U32(v) => le(v, u32::to_le_bytes),
            Data::U16(v) => le(v, u16::to_le_bytes),
            Data::U8(v) => v.clone(),
            Data::Bool(v) => v.iter().map(|&x| x as u8).collect(),
            Data::I4(v) => pack_nibbles(v.iter().map(|&x| x as u8)),
            Data::U4(v) => pack_nibbles(v.iter().copied()),
        }
    }

    /// Inverse of [`Data::to_le_bytes`] for `n` elements; errors if `bytes` has the wrong length.
    pub fn from_le_bytes(dtype: DType, bytes: &[u8], n: usize) -> Result<Data> {
        let want = (n * dtype.bits()).div_ceil(8);
        if bytes.len() != want {
            return Err(IrError::Invalid(format!("{n} elements of {dtype} need {want} bytes, got {}", bytes.len())));
        }
        fn from<T, const N: usize>(b: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
            b.chunks_exact(N).map(|c| f(c.try_into().expect("exact chunk"))).collect()
        }
        Ok(match dtype {
            DType::F32 => Data::F32(from(bytes, f32::from_le_bytes)),
            DType::F64 => Data::F64(from(bytes, f64::from_le_bytes)),
            DType::F16 => Data::F16(from(bytes, f16::from_le_bytes)),
            DType::BF16 => Data::BF16(from(bytes, bf16::from_le_bytes)),
            DType::I64 => Data::I64(from(bytes, i64::from_le_bytes)),
            DType::I32 => Data::I32(from(bytes, i32::from_le_bytes)),
            DType::I16 => Data::I16(from(bytes, i16::from_le_bytes)),
            DType::I8 => Data::I8(bytes.iter().map(|&x| x as i8).collect()),
            DType::U64 => Data::U64(from(bytes, u64::from_le_bytes)),
            DType::U32 => Data::U32(from(bytes, u32::from_le_bytes)),
            DType::U16 => Data::U16(from(bytes, u16::from_le_bytes)),
            DType::U8 => Data::U8(bytes.to_vec()),
            DType::Bool => Data::Bool(bytes.iter().map(|&x| x != 0).collect()),
            DType::I4 => Data::I4(unpack_nibbles(bytes, n).map(|x| ((x << 4) as i8) >> 4).collect()),
            DType::U4 => Data::U4(unpack_nibbles(bytes, n).collect()),
        })
    }
}

/// Packs 4-bit values two per byte: element `2i` in the low nibble of byte `i`, element `2i+1`
/// in the high nibble; an odd count leaves the last high nibble zero. Only the low 4 bits of
/// each input are used.
pub fn pack_nibbles(vals: impl Iterator<Item = u8>) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, v) in vals.enumerate() {
        if i % 2 == 0 {
            out.push(v & 0xF);
        } else {
            *out.last_mut().expect("pushed above") |= (v & 0xF) << 4;
        }
    }
    out
}

/// Unpacks `n` 4-bit values (as raw nibbles in [0, 15]) laid out by [`pack_nibbles`].
pub fn unpack_nibbles(bytes: &[u8], n: usize) -> impl Iterator<Item = u8> + '_ {
    (0..n).map(move |i| (bytes[i / 2] >> (4 * (i % 2))) & 0xF)
}

/// A dense tensor: shape plus row-major data.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Data,
}

impl Tensor {
    /// Makes a tensor, checking that the data length matches the shape.
    pub fn new(shape: Vec<usize>, data: Data) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(IrError::Invalid(format!(
                "tensor of shape {shape:?} needs {n} elements, data has {}",
                data.len()
            )));
        }
        Ok(Tensor { shape, data })
    }

    pub fn from_f32(shape: Vec<usize>, v: Vec<f32>) -> Result<Tensor> {
        Tensor::new(shape, Data::F32(v))
    }

    pub fn from_i64(shape: Vec<usize>, v: Vec<i64>) -> Result<Tensor> {
        Tensor::new(shape, Data::I64(v))
    }

    pub fn scalar_f32(x: f32) -> Tensor {
        Tensor { shape: vec![], data: Data::F32(vec![x]) }
    }

    pub fn zeros(dtype: DType, shape: Vec<usize>) -> Tensor {
        let n = shape.iter().product();
        Tensor { shape, data: Data::zeros(dtype, n) }
    }

    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// The f32 elements, or an error naming the actual type.
    pub fn as_f32(&self) -> Result<&[f32]> {
        match &self.data {
            Data::F32(v) => Ok(v),
            d => Err(IrError::Invalid(format!("expected f32 tensor, got {}", d.dtype()))),
        }
    }

    /// Same data, new shape (element count must agree).
    pub fn reshaped(self, shape: Vec<usize>) -> Result<Tensor> {
        Tensor::new(shape, self.data)
    }

    /// Converts to another element type with ONNX `Cast` semantics: float -> int truncates toward
    /// zero (saturating at the i64 range, then wrapping like int -> int, int4 included),
    /// anything -> bool is `!= 0`.
    pub fn cast(&self, to: DType) -> Tensor {
        if self.dtype() == to {
            return self.clone();
        }
        let data = if to.is_integer() && !self.dtype().is_float() {
            Data::from_i64(to, self.data.to_i64_vec().into_iter())
        } else {
            Data::from_f64(to, self.data.to_f64_vec().into_iter())
        };
        Tensor { shape: self.shape.clone(), data }
    }

    /// Number of bytes of the packed serialisation.
    pub fn packed_bytes(&self) -> usize {
        (self.len() * self.dtype().bits()).div_ceil(8)
    }
}

/// Row-major strides (in elements) of a shape.
pub fn strides_of(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// The largest tensor (bytes) an op or a text literal may create: `SQIL_MAX_TENSOR_BYTES`,
/// default 16 GiB. Checked before allocating wherever a shape comes from data (a shape input, a
/// literal's declared shape), so a hostile model is an error, not an out-of-memory abort.
pub fn max_tensor_bytes() -> u64 {
    std::env::var("SQIL_MAX_TENSOR_BYTES").ok().and_then(|v| v.parse().ok()).unwrap_or(16 << 30)
}

/// The element count of `shape` for elements of `elem_bytes`, or an error naming `what` when the
/// count overflows or the bytes exceed [`max_tensor_bytes`].
pub fn checked_len(shape: &[usize], elem_bytes: usize, what: &str) -> crate::Result<usize> {
    let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    match n.and_then(|n| n.checked_mul(elem_bytes.max(1)).map(|b| (n, b))) {
        Some((n, b)) if (b as u64) <= max_tensor_bytes() => Ok(n),
        _ => Err(crate::IrError::Invalid(format!(
            "{what}: shape {shape:?} is larger than the {} bytes a tensor may hold (SQIL_MAX_TENSOR_BYTES)",
            max_tensor_bytes()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int4_packing_is_low_nibble_first_and_round_trips() {
        let d = Data::I4(vec![-8, 7, -1]);
        let b = d.to_le_bytes();
        assert_eq!(b, vec![0x78, 0x0F]);
        assert_eq!(Data::from_le_bytes(DType::I4, &b, 3).unwrap(), d);
        let u = Data::U4(vec![1, 15, 2, 0]);
        assert_eq!(Data::from_le_bytes(DType::U4, &u.to_le_bytes(), 4).unwrap(), u);
    }

    #[test]
    fn cast_truncates_and_wraps() {
        let t = Tensor::from_f32(vec![4], vec![-1.7, 2.9, 300.0, -0.2]).unwrap();
        assert_eq!(t.cast(DType::I32).data, Data::I32(vec![-1, 2, 300, 0]));
        let i = Tensor::new(vec![2], Data::I32(vec![300, -1])).unwrap();
        assert_eq!(i.cast(DType::U8).data, Data::U8(vec![44, 255]));
        assert_eq!(i.cast(DType::Bool).data, Data::Bool(vec![true, true]));
    }

    #[test]
    fn wrong_length_is_an_error() {
        assert!(Tensor::from_f32(vec![2, 2], vec![1.0]).is_err());
        assert!(Data::from_le_bytes(DType::F32, &[0, 0, 0], 1).is_err());
    }
}
