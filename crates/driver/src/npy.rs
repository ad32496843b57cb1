//! .npy input and output for `sqil run`; writes are atomic (temporary file, then rename).

use ndarray::ArrayD;
use ndarray_npy::{ReadNpyExt, WriteNpyExt};
use sqil_ir::{Data, Tensor};
use std::io::BufWriter;
use std::path::Path;

fn open(path: &Path) -> crate::Result<std::fs::File> {
    std::fs::File::open(path).map_err(|source| crate::Error::Io { path: path.to_path_buf(), source })
}

fn to_tensor<T: Clone>(a: ArrayD<T>, wrap: fn(Vec<T>) -> Data) -> crate::Result<Tensor> {
    let shape = a.shape().to_vec();
    let v = a.as_standard_layout().iter().cloned().collect::<Vec<T>>();
    Ok(Tensor::new(shape, wrap(v))?)
}

/// Reads an .npy array of f32, f64, f16, i64, i32, u8 or bool elements.
pub fn read(path: &Path) -> crate::Result<Tensor> {
    // The header's shape against the file's size first: nothing is allocated for a shape the
    // file cannot hold (or beyond SQIL_MAX_ARRAY_BYTES).
    sqil_data::check_npy_file(path).map_err(|e| format!("{}: {e}", path.display()))?;
    macro_rules! attempt {
        ($t:ty, $wrap:expr) => {
            if let Ok(a) = ArrayD::<$t>::read_npy(open(path)?) {
                return to_tensor(a, $wrap);
            }
        };
    }
    attempt!(f32, Data::F32);
    attempt!(f64, Data::F64);
    if let Ok(a) = ArrayD::<sqil_data::Half>::read_npy(open(path)?) {
        return to_tensor(a.mapv(|h| h.0), Data::F16);
    }
    attempt!(i64, Data::I64);
    attempt!(i32, Data::I32);
    attempt!(u8, Data::U8);
    attempt!(bool, Data::Bool);
    Err(format!(
        "{}: not an .npy file of f32, f64, f16, i64, i32, u8 or bool elements in C or Fortran order",
        path.display()
    )
    .into())
}

/// Writes a tensor as .npy (f32, f64, f16, i64, i32, u8, i8 or bool), atomically.
pub fn write(path: &Path, t: &Tensor) -> crate::Result<()> {
    let tmp = path.with_extension("npy.tmp");
    let r = write_via(path, &tmp, t);
    if r.is_err() {
        std::fs::remove_file(&tmp).ok(); // nothing left behind on a failed write
    }
    r
}

fn write_via(path: &Path, tmp: &Path, t: &Tensor) -> crate::Result<()> {
    let err = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    {
        let f = BufWriter::new(std::fs::File::create(tmp).map_err(|e| err(&e))?);
        macro_rules! put {
            ($v:expr) => {
                ArrayD::from_shape_vec(t.shape.clone(), $v.clone())
                    .map_err(|e| err(&e))?
                    .write_npy(f)
                    .map_err(|e| err(&e))?
            };
        }
        match &t.data {
            Data::F32(v) => put!(v),
            Data::F64(v) => put!(v),
            Data::F16(v) => put!(v.iter().map(|&h| sqil_data::Half(h)).collect::<Vec<_>>()),
            Data::I64(v) => put!(v),
            Data::I32(v) => put!(v),
            Data::U8(v) => put!(v),
            Data::I8(v) => put!(v),
            Data::Bool(v) => put!(v),
            d => return Err(format!("{}: cannot write {} arrays as .npy", path.display(), d.dtype()).into()),
        }
    }
    Ok(std::fs::rename(tmp, path).map_err(|e| err(&e))?)
}
