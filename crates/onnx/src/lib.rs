//! ONNX front end: reads a `ModelProto` (with external data) and builds the graph IR through a
//! table of importers keyed by op_type. The importer never optimises: it maps ONNX nodes to IR
//! ops one to one, converting opset-specific attribute forms to the IR's single form.

mod import;
mod ops;
mod tensor;

pub use import::{
    import_model, load_model, load_model_bytes, supported_ops, ImportOptions, MAX_IR_VERSION, OPSET_RANGE,
};
pub use tensor::{dtype_from_onnx, dtype_to_onnx, load_tensor_file, tensor_from_proto};
