//! CPU kernels that sqil's reference interpreter and (later) the CPU back end build on.
//!
//! This crate knows nothing of ONNX or of the graph IR: it works on plain slices with explicit
//! row and column strides, the layout convention of BLAS and of `matrixmultiply`.

pub mod generic;

pub use generic::{dgemm, im2col, sgemm, ConvGeometry};
