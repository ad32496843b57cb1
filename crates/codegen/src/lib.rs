//! Code generation back ends. `onnx`: writes a (quantized) graph as standard ONNX, QDQ form.

pub mod onnx;
