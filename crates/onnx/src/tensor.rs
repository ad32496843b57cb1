//! TensorProto <-> IR tensors, including raw data, typed fields and external data files.

use onnx_protobuf::{tensor_proto::DataLocation, Message, TensorProto};
use sqil_ir::{DType, Data, IrError, Result, Tensor};
use std::path::Path;

/// IR dtype of an ONNX `TensorProto.DataType` code; unsupported codes name the ONNX type.
pub fn dtype_from_onnx(code: i32) -> Result<DType> {
    Ok(match code {
        1 => DType::F32,
        2 => DType::U8,
        3 => DType::I8,
        4 => DType::U16,
        5 => DType::I16,
        6 => DType::I32,
        7 => DType::I64,
        9 => DType::Bool,
        10 => DType::F16,
        11 => DType::F64,
        12 => DType::U32,
        13 => DType::U64,
        16 => DType::BF16,
        21 => DType::U4,
        22 => DType::I4,
        c => {
            let name = match c {
                0 => "UNDEFINED",
                8 => "STRING",
                14 => "COMPLEX64",
                15 => "COMPLEX128",
                17 => "FLOAT8E4M3FN",
                18 => "FLOAT8E4M3FNUZ",
                19 => "FLOAT8E5M2",
                20 => "FLOAT8E5M2FNUZ",
                23 => "FLOAT4E2M1",
                24 => "FLOAT8E8M0",
                25 => "UINT2",
                26 => "INT2",
                _ => "an unknown type",
            };
            return Err(IrError::Unsupported(format!("ONNX element type {name} (code {c})")));
        }
    })
}

/// ONNX `TensorProto.DataType` code of an IR dtype.
pub fn dtype_to_onnx(d: DType) -> i32 {
    match d {
        DType::F32 => 1,
        DType::U8 => 2,
        DType::I8 => 3,
        DType::U16 => 4,
        DType::I16 => 5,
        DType::I32 => 6,
        DType::I64 => 7,
        DType::Bool => 9,
        DType::F16 => 10,
        DType::F64 => 11,
        DType::U32 => 12,
        DType::U64 => 13,
        DType::BF16 => 16,
        DType::U4 => 21,
        DType::I4 => 22,
    }
}

/// Reads the bytes of an externally stored tensor, relative to the model's folder.
fn external_bytes(t: &TensorProto, base: Option<&Path>) -> Result<Vec<u8>> {
    let mut location = None;
    let (mut offset, mut length) = (0u64, None);
    for e in &t.external_data {
        let num = |v: &str| {
            v.parse::<u64>().map_err(|_| {
                IrError::Invalid(format!("tensor `{}`: external_data {} = `{v}` is not a number", t.name, e.key))
            })
        };
        match e.key.as_str() {
            "location" => location = Some(e.value.clone()),
            "offset" => offset = num(&e.value)?,
            "length" => length = Some(num(&e.value)?),
            _ => {}
        }
    }
    let loc =
        location.ok_or_else(|| IrError::Invalid(format!("tensor `{}` is external but has no location", t.name)))?;
    let rel = Path::new(&loc);
    if rel.is_absolute() || rel.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
        return Err(IrError::Invalid(format!(
            "tensor `{}`: external data location `{loc}` must stay inside the model's folder",
            t.name
        )));
    }
    let base = base.ok_or_else(|| {
        IrError::Invalid(format!("tensor `{}` is stored in `{loc}`, but the model was not loaded from a file", t.name))
    })?;
    let path = base.join(rel);
    let bad = |why: String| IrError::Invalid(format!("tensor `{}`: external data {}: {why}", t.name, path.display()));
    // The file the location names, symlinks resolved: a regular file inside the model's folder
    // (checked before opening: a FIFO or device is never opened).
    let real = path.canonicalize().map_err(|e| bad(format!("{e}")))?;
    let root = base.canonicalize().map_err(|e| bad(format!("the model's folder: {e}")))?;
    if !real.starts_with(&root) {
        return Err(bad(format!("resolves to {}, outside the model's folder", real.display())));
    }
    let meta = std::fs::metadata(&real).map_err(|e| bad(format!("{e}")))?;
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    let size = meta.len();
    let end = match length {
        Some(l) => offset.checked_add(l),
        None => Some(size),
    };
    let end = match end {
        Some(end) if offset <= end && end <= size => end,
        _ => {
            let len = length.map_or("to the end".to_string(), |l| format!("length {l} bytes"));
            return Err(bad(format!("offset {offset}, {len}: beyond the end of the file ({size} bytes)")));
        }
    };
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(&real).map_err(|e| bad(format!("{e}")))?;
    f.seek(SeekFrom::Start(offset)).map_err(|e| bad(format!("{e}")))?;
    let mut bytes = vec![0u8; (end - offset) as usize];
    f.read_exact(&mut bytes).map_err(|e| bad(format!("{e}")))?;
    Ok(bytes)
}

/// Converts a TensorProto; `base` is the model's folder, for external data.
pub fn tensor_from_proto(t: &TensorProto, base: Option<&Path>) -> Result<Tensor> {
    let dtype = dtype_from_onnx(t.data_type).map_err(|e| e.context(format!("tensor `{}`", t.name)))?;
    let shape: Vec<usize> = t
        .dims
        .iter()
        .map(|&d| {
            usize::try_from(d).map_err(|_| IrError::Invalid(format!("tensor `{}` has negative dimension {d}", t.name)))
        })
        .collect::<Result<_>>()?;
    let n = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| IrError::Invalid(format!("tensor `{}` is too large", t.name)))?;
    let external = t.data_location.enum_value() == Ok(DataLocation::EXTERNAL);
    let data = if external || !t.raw_data.is_empty() {
        let raw = if external { external_bytes(t, base)? } else { t.raw_data.clone() };
        Data::from_le_bytes(dtype, &raw, n)
    } else {
        typed_fields(t, dtype, n)
    }
    .map_err(|e| e.context(format!("tensor `{}`", t.name)))?;
    Tensor::new(shape, data).map_err(|e| e.context(format!("tensor `{}`", t.name)))
}

fn typed_fields(t: &TensorProto, dtype: DType, n: usize) -> Result<Data> {
    let check = |len: usize| -> Result<()> {
        if len == n {
            Ok(())
        } else {
            Err(IrError::Invalid(format!("{n} elements of {dtype} expected, the tensor holds {len}")))
        }
    };
    let i32s = &t.int32_data;
    Ok(match dtype {
        DType::F32 => {
            check(t.float_data.len())?;
            Data::F32(t.float_data.clone())
        }
        DType::F64 => {
            check(t.double_data.len())?;
            Data::F64(t.double_data.clone())
        }
        DType::I64 => {
            check(t.int64_data.len())?;
            Data::I64(t.int64_data.clone())
        }
        DType::U64 | DType::U32 => {
            check(t.uint64_data.len())?;
            Data::from_i64(dtype, t.uint64_data.iter().map(|&v| v as i64))
        }
        DType::F16 => {
            check(i32s.len())?;
            Data::F16(i32s.iter().map(|&v| half::f16::from_bits(v as u16)).collect())
        }
        DType::BF16 => {
            check(i32s.len())?;
            Data::BF16(i32s.iter().map(|&v| half::bf16::from_bits(v as u16)).collect())
        }
        DType::I4 | DType::U4 => {
            // int32_data holds the packed bytes, two values each.
            let bytes: Vec<u8> = i32s.iter().map(|&v| v as u8).collect();
            Data::from_le_bytes(dtype, &bytes, n)?
        }
        _ => {
            check(i32s.len())?;
            Data::from_i64(dtype, i32s.iter().map(|&v| v as i64))
        }
    })
}

/// Reads a serialised TensorProto file (the `input_0.pb` files of ONNX's node tests).
pub fn load_tensor_file(path: &Path) -> Result<(String, Tensor)> {
    let bytes = std::fs::read(path).map_err(|e| IrError::Invalid(format!("{}: {e}", path.display())))?;
    let t = TensorProto::parse_from_bytes(&bytes)
        .map_err(|e| IrError::Invalid(format!("{}: not a TensorProto: {e}", path.display())))?;
    let tensor = tensor_from_proto(&t, path.parent()).map_err(|e| e.context(path.display().to_string()))?;
    Ok((t.name.clone(), tensor))
}
