//! The ONNX back end: writes an IR graph as an ONNX model at opset 21, the first opset with
//! int4/uint4 QuantizeLinear/DequantizeLinear and blocked (`block_size`) scales. Quantized
//! graphs must be lowered first (`lower-quant`): FakeQuant has no ONNX form.

use onnx_protobuf::{
    attribute_proto::AttributeType, tensor_shape_proto::dimension::Value as DimValue, tensor_shape_proto::Dimension,
    type_proto, AttributeProto, GraphProto, Message, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto,
};
use sqil_ir::{Attr, Dim, Graph, IrError, Op, Result, Tensor, ValueRef, ValueType};
use sqil_onnx::dtype_to_onnx;
use std::path::Path;

/// The opset the ONNX back end writes.
pub const OPSET: i64 = 21;
/// ONNX IR version 10 (the one that goes with opset 21).
pub const IR_VERSION: i64 = 10;

fn tensor_proto(name: &str, t: &Tensor) -> TensorProto {
    let mut p = TensorProto::new();
    p.name = name.to_string();
    p.dims = t.shape.iter().map(|&d| d as i64).collect();
    p.data_type = dtype_to_onnx(t.dtype());
    // Little-endian raw bytes; int4/uint4 packed two per byte, low nibble first.
    p.raw_data = t.data.to_le_bytes();
    p
}

fn value_info(name: &str, ty: &ValueType) -> ValueInfoProto {
    let mut shape = TensorShapeProto::new();
    for d in &ty.shape {
        let mut dim = Dimension::new();
        dim.value = match d {
            Dim::Known(n) => Some(DimValue::DimValue(*n as i64)),
            Dim::Sym(s) => Some(DimValue::DimParam(s.clone())),
            Dim::Unknown => None,
        };
        shape.dim.push(dim);
    }
    let mut tt = type_proto::Tensor::new();
    tt.elem_type = dtype_to_onnx(ty.dtype);
    tt.shape = protobuf::MessageField::some(shape);
    let mut tp = TypeProto::new();
    tp.value = Some(type_proto::Value::TensorType(tt));
    let mut v = ValueInfoProto::new();
    v.name = name.to_string();
    v.type_ = protobuf::MessageField::some(tp);
    v
}

fn attr_proto(name: &str, a: &Attr) -> AttributeProto {
    let mut p = AttributeProto::new();
    p.name = name.to_string();
    match a {
        Attr::Int(i) => {
            p.type_ = AttributeType::INT.into();
            p.i = *i;
        }
        Attr::DType(d) => {
            p.type_ = AttributeType::INT.into();
            p.i = dtype_to_onnx(*d) as i64;
        }
        Attr::Float(f) => {
            p.type_ = AttributeType::FLOAT.into();
            p.f = *f;
        }
        Attr::Ints(v) => {
            p.type_ = AttributeType::INTS.into();
            p.ints = v.clone();
        }
        Attr::Floats(v) => {
            p.type_ = AttributeType::FLOATS.into();
            p.floats = v.clone();
        }
        Attr::Str(s) => {
            p.type_ = AttributeType::STRING.into();
            p.s = s.as_bytes().to_vec();
        }
        Attr::Tensor(t) => {
            p.type_ = AttributeType::TENSOR.into();
            p.t = protobuf::MessageField::some(tensor_proto("", t));
        }
    }
    p
}

/// The ONNX attributes of a node (IR-only attributes dropped or converted).
fn onnx_attrs(g: &Graph, n: sqil_ir::NodeId) -> Result<Vec<AttributeProto>> {
    let node = g.node(n);
    let mut out = vec![];
    match &node.op {
        Op::Softmax { axis, coerce_2d } | Op::LogSoftmax { axis, coerce_2d } => {
            let rank = g.value(ValueRef { node: n, slot: 0 }).ty.rank() as i64;
            let last = *axis == -1 || *axis == rank - 1;
            if *coerce_2d && !last {
                return Err(IrError::Unsupported(format!(
                    "{}: opset-12 {} over a non-last axis has no opset-{OPSET} form",
                    g.describe(n),
                    node.op.name()
                )));
            }
            out.push(attr_proto("axis", &Attr::Int(*axis)));
        }
        Op::Split { axis, outputs } => {
            out.push(attr_proto("axis", &Attr::Int(*axis)));
            if g.inputs_of(n).get(1).copied().flatten().is_none() {
                out.push(attr_proto("num_outputs", &Attr::Int(*outputs as i64)));
            }
        }
        Op::Cast { to, .. } => out.push(attr_proto("to", &Attr::DType(*to))),
        Op::QuantizeLinear { axis, block_size, output_dtype, .. } => {
            out.push(attr_proto("axis", &Attr::Int(*axis)));
            out.push(attr_proto("block_size", &Attr::Int(*block_size)));
            if g.inputs_of(n).get(2).copied().flatten().is_none() {
                if let Some(d) = output_dtype {
                    out.push(attr_proto("output_dtype", &Attr::DType(*d)));
                }
            }
        }
        Op::Fused(_) | Op::Vjp { .. } => {
            return Err(IrError::Unsupported(format!(
                "{}: {} is internal to sqil and has no ONNX form (export before fusion)",
                g.describe(n),
                node.op.name()
            )))
        }
        Op::FakeQuant { .. } => {
            return Err(IrError::Unsupported(format!(
                "{}: FakeQuant has no ONNX form; run the lower-quant pass first",
                g.describe(n)
            )))
        }
        op => {
            // Attributes the op's ONNX form lacks (the IR's pool attributes are shared), and
            // empty lists, which ONNX spells by leaving the attribute out.
            let skip: &[&str] = match op {
                Op::MaxPool(_) => &["count_include_pad"],
                Op::AveragePool(_) => &["storage_order"],
                _ => &[],
            };
            out.extend(
                op.attrs()
                    .iter()
                    .filter(|(k, v)| !skip.contains(k) && !matches!(v, Attr::Ints(l) if l.is_empty()))
                    .map(|(k, v)| attr_proto(k, v)),
            )
        }
    }
    Ok(out)
}

/// Converts a graph into an ONNX model (opset 21). Constants become initializers.
pub fn to_model(g: &Graph) -> Result<ModelProto> {
    let mut gp = GraphProto::new();
    gp.name = g.name.clone();
    let vname = |v: ValueRef| g.value(v).name.clone();
    for &i in &g.inputs {
        gp.input.push(value_info(&g.node(i).outputs[0].name, &g.node(i).outputs[0].ty));
    }
    for n in g.topo_order()? {
        let node = g.node(n);
        match &node.op {
            Op::Input => {}
            Op::Const(t) => gp.initializer.push(tensor_proto(&node.outputs[0].name, t)),
            op => {
                let mut np = NodeProto::new();
                np.name = node.name.clone();
                np.op_type = op.name().to_string();
                let ins = g.inputs_of(n);
                let last = ins.iter().rposition(Option::is_some).map_or(0, |p| p + 1);
                np.input = ins[..last].iter().map(|v| v.map_or(String::new(), vname)).collect();
                np.output = node.outputs.iter().map(|o| o.name.clone()).collect();
                np.attribute = onnx_attrs(g, n)?;
                gp.node.push(np);
            }
        }
    }
    for &o in &g.outputs {
        gp.output.push(value_info(&vname(o), &g.value(o).ty));
    }
    let mut m = ModelProto::new();
    m.ir_version = IR_VERSION;
    m.producer_name = "sqil".into();
    m.producer_version = env!("CARGO_PKG_VERSION").into();
    let mut op = OperatorSetIdProto::new();
    op.domain = String::new();
    op.version = OPSET;
    m.opset_import.push(op);
    m.graph = protobuf::MessageField::some(gp);
    Ok(m)
}

/// Writes `g` as an ONNX file, atomically (temporary file, then rename).
pub fn save(g: &Graph, path: &Path) -> Result<()> {
    let bytes = to_model(g)?
        .write_to_bytes()
        .map_err(|e| IrError::Internal(format!("serialising ONNX for {}: {e}", path.display())))?;
    sqil_ir::write_atomic(path, &bytes)
}
