//! Code generation back ends. `onnx`: writes a (quantized) graph as standard ONNX, QDQ form.
//! `c`: a CPU plan as C99 source for firmware. `cuda`: a policy lowered for the GPU as one
//! standalone `.cu` file.

pub mod c;
pub mod cuda;
pub mod onnx;
