//! Code generation back ends. `onnx`: writes a (quantized) graph as standard ONNX, QDQ form.
//! `c`: a CPU plan as C99 source for firmware.

pub mod c;
pub mod onnx;
