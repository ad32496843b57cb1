//! Model-level import: signature, initializers, nodes in dependency order, output types.

use crate::ops::{table, NodeCx};
use crate::tensor::{dtype_from_onnx, tensor_from_proto};
use onnx_protobuf::{
    attribute_proto::AttributeType, tensor_shape_proto::dimension, type_proto, Message, ModelProto, NodeProto,
    ValueInfoProto,
};
use sqil_ir::{Attr, AttrMap, Dim, Graph, IrError, Result, Value, ValueRef, ValueType};
use std::collections::HashMap;
use std::path::Path;

/// Highest ONNX IR version accepted (onnx 1.22 writes up to 13; external data needs >= 6).
pub const MAX_IR_VERSION: i64 = 13;
/// Default-domain opsets accepted. Real exports are tested at 11 to 21; node tests of the
/// onnx 1.22 wheel reach 25 with unchanged semantics for the ops sqil covers.
pub const OPSET_RANGE: std::ops::RangeInclusive<i64> = 11..=25;

#[derive(Clone, Debug, Default)]
pub struct ImportOptions {
    /// Accept opsets outside [`OPSET_RANGE`] (the importer still applies per-version rules).
    pub any_opset: bool,
}

/// Op types the importer knows, sorted.
pub fn supported_ops() -> Vec<&'static str> {
    let mut v: Vec<_> = table().keys().copied().collect();
    v.sort_unstable();
    v
}

/// Reads and imports an ONNX file; external data is read relative to its folder.
pub fn load_model(path: &Path) -> Result<Graph> {
    let bytes = std::fs::read(path).map_err(|e| IrError::Invalid(format!("{}: {e}", path.display())))?;
    load_model_bytes(&bytes, path.parent()).map_err(|e| e.context(path.display().to_string()))
}

/// Imports a serialised model; `base` is the folder for external data, if any.
pub fn load_model_bytes(bytes: &[u8], base: Option<&Path>) -> Result<Graph> {
    let m = ModelProto::parse_from_bytes(bytes).map_err(|e| {
        IrError::Invalid(format!(
            "not a valid ONNX model (the protobuf does not parse: {e}); is the file truncated or of another format?"
        ))
    })?;
    import_model(&m, base, &ImportOptions::default())
}

fn value_type(v: &ValueInfoProto) -> Result<ValueType> {
    let what = || format!("value `{}`", v.name);
    let Some(type_proto::Value::TensorType(t)) = v.type_.as_ref().and_then(|t| t.value.as_ref()) else {
        return Err(IrError::Unsupported(format!("{}: only tensor types are supported", what())));
    };
    let dtype = dtype_from_onnx(t.elem_type).map_err(|e| e.context(what()))?;
    let shape =
        t.shape.as_ref().ok_or_else(|| IrError::Invalid(format!("{} has no shape (not even a rank)", what())))?;
    let dims = shape
        .dim
        .iter()
        .map(|d| match &d.value {
            Some(dimension::Value::DimValue(n)) if *n >= 0 => Dim::Known(*n as usize),
            Some(dimension::Value::DimParam(s)) if !s.is_empty() => Dim::Sym(s.clone()),
            _ => Dim::Unknown,
        })
        .collect();
    Ok(ValueType::new(dtype, dims))
}

/// Takes the more precise of an inferred and a declared type (declared symbols fill unknowns).
fn merge(inferred: &ValueType, declared: &ValueType) -> ValueType {
    if inferred.dtype != declared.dtype || inferred.rank() != declared.rank() {
        return inferred.clone();
    }
    let shape = inferred
        .shape
        .iter()
        .zip(&declared.shape)
        .map(|(i, d)| if *i == Dim::Unknown { d.clone() } else { i.clone() })
        .collect();
    ValueType::new(inferred.dtype, shape)
}

fn attr_of(a: &onnx_protobuf::AttributeProto, base: Option<&Path>) -> Result<Attr> {
    let ty = a
        .type_
        .enum_value()
        .map_err(|c| IrError::Unsupported(format!("attribute `{}` of unknown type {c}", a.name)))?;
    Ok(match ty {
        AttributeType::INT => Attr::Int(a.i),
        AttributeType::FLOAT => Attr::Float(a.f),
        AttributeType::INTS => Attr::Ints(a.ints.clone()),
        AttributeType::FLOATS => Attr::Floats(a.floats.clone()),
        AttributeType::STRING => Attr::Str(
            String::from_utf8(a.s.clone())
                .map_err(|_| IrError::Invalid(format!("attribute `{}` is not UTF-8", a.name)))?,
        ),
        AttributeType::TENSOR => Attr::Tensor(tensor_from_proto(&a.t, base)?),
        other => return Err(IrError::Unsupported(format!("attribute `{}` of type {other:?}", a.name))),
    })
}

fn node_label(n: &NodeProto, opset: i64) -> String {
    let name = if n.name.is_empty() { n.output.first().map_or("?", |s| s.as_str()) } else { n.name.as_str() };
    format!("node `{name}` ({}, opset {opset})", n.op_type)
}

/// Imports a parsed model.
pub fn import_model(m: &ModelProto, base: Option<&Path>, opts: &ImportOptions) -> Result<Graph> {
    if m.ir_version > MAX_IR_VERSION {
        return Err(IrError::Unsupported(format!(
            "ONNX IR version {} (sqil reads up to {MAX_IR_VERSION})",
            m.ir_version
        )));
    }
    let opset = m
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map(|o| o.version)
        .ok_or_else(|| IrError::Invalid("the model imports no version of the default ONNX opset".into()))?;
    if !opts.any_opset && !OPSET_RANGE.contains(&opset) {
        return Err(IrError::Unsupported(format!(
            "opset {opset} (sqil reads opsets {} to {})",
            OPSET_RANGE.start(),
            OPSET_RANGE.end()
        )));
    }
    let gp =
        m.graph.as_ref().ok_or_else(|| IrError::Invalid("the model has no graph (empty or truncated file?)".into()))?;
    let importers = table();
    let unsupported: Vec<String> = gp
        .node
        .iter()
        .filter(|n| !(n.domain.is_empty() || n.domain == "ai.onnx") || !importers.contains_key(n.op_type.as_str()))
        .map(|n| {
            let dom = if n.domain.is_empty() { String::new() } else { format!("{}::", n.domain) };
            format!("{dom}{} ({})", n.op_type, node_label(n, opset))
        })
        .collect();
    if !unsupported.is_empty() {
        return Err(IrError::Unsupported(format!(
            "{} unsupported node(s) at opset {opset}: {}",
            unsupported.len(),
            unsupported.join("; ")
        )));
    }

    let mut g = Graph::new(if gp.name.is_empty() { "main" } else { gp.name.as_str() });
    let mut values: HashMap<String, ValueRef> = HashMap::new();
    for t in &gp.initializer {
        let tensor = tensor_from_proto(t, base).map_err(|e| e.context("initializer"))?;
        values.insert(t.name.clone(), g.add_const(t.name.clone(), tensor));
    }
    if !gp.sparse_initializer.is_empty() {
        return Err(IrError::Unsupported("sparse initializers".into()));
    }
    for i in &gp.input {
        if values.contains_key(&i.name) {
            continue; // an initializer with a default value: treated as a constant
        }
        let ty = value_type(i).map_err(|e| e.context("graph input"))?;
        values.insert(i.name.clone(), g.add_input(i.name.clone(), ty));
    }
    let declared: HashMap<&str, &ValueInfoProto> =
        gp.value_info.iter().chain(&gp.output).map(|v| (v.name.as_str(), v)).collect();

    // Nodes in dependency order: ONNX requires topological order, but be lenient.
    let mut pending: Vec<&NodeProto> = gp.node.iter().collect();
    while !pending.is_empty() {
        let before = pending.len();
        let mut rest = vec![];
        for n in pending {
            if n.input.iter().any(|i| !i.is_empty() && !values.contains_key(i)) {
                rest.push(n);
                continue;
            }
            import_node(&mut g, &mut values, n, opset, base, &declared, &importers)
                .map_err(|e| e.context(format!("importing {}", node_label(n, opset))))?;
        }
        if rest.len() == before {
            let n = rest[0];
            let missing: Vec<&str> =
                n.input.iter().filter(|i| !i.is_empty() && !values.contains_key(*i)).map(|s| s.as_str()).collect();
            return Err(IrError::Invalid(format!(
                "{} reads undefined value(s) {missing:?} (or the graph has a cycle)",
                node_label(n, opset)
            )));
        }
        pending = rest;
    }
    for o in &gp.output {
        let v = *values
            .get(&o.name)
            .ok_or_else(|| IrError::Invalid(format!("graph output `{}` is produced by no node", o.name)))?;
        g.outputs.push(v);
    }
    sqil_ir::verify_input(&g)?;
    Ok(g)
}

fn import_node(
    g: &mut Graph,
    values: &mut HashMap<String, ValueRef>,
    n: &NodeProto,
    opset: i64,
    base: Option<&Path>,
    declared: &HashMap<&str, &ValueInfoProto>,
    importers: &HashMap<&'static str, crate::ops::Importer>,
) -> Result<()> {
    let mut attrs = AttrMap::new();
    for a in &n.attribute {
        if !a.ref_attr_name.is_empty() {
            return Err(IrError::Unsupported(format!("attribute `{}` refers to a function attribute", a.name)));
        }
        attrs.insert(a.name.clone(), attr_of(a, base)?);
    }
    // Trailing empty output names are absent optional outputs.
    let n_out = n.output.iter().rposition(|o| !o.is_empty()).map_or(0, |p| p + 1);
    let inputs: Vec<Option<ValueRef>> =
        n.input.iter().map(|i| if i.is_empty() { None } else { Some(values[i]) }).collect();
    let label = if n.name.is_empty() { n.output.first().cloned().unwrap_or_default() } else { n.name.clone() };
    let mut cx = NodeCx { g, opset, attrs, inputs, n_out, name: label.clone(), op_type: n.op_type.clone() };
    let op = importers[n.op_type.as_str()](&mut cx)?;
    let NodeCx { g, inputs, n_out, .. } = cx;
    let tys: Vec<Option<ValueType>> = inputs.iter().map(|v| v.map(|v| g.value(v).ty.clone())).collect();
    let ty_refs: Vec<Option<&ValueType>> = tys.iter().map(Option::as_ref).collect();
    let consts: Vec<_> = inputs.iter().map(|v| v.and_then(|v| g.const_value(v))).collect();
    let out_tys = op.infer(&ty_refs, &consts, n_out)?;
    if out_tys.len() < n_out {
        return Err(IrError::Invalid(format!(
            "node `{label}` ({}) declares {n_out} outputs, the op has {}",
            n.op_type,
            out_tys.len()
        )));
    }
    let outputs: Vec<Value> = (0..n_out)
        .map(|k| {
            let name = match n.output[k].as_str() {
                "" => format!("{label}.unused{k}"),
                s => s.to_string(),
            };
            let ty = match declared.get(name.as_str()).map(|d| value_type(d)) {
                Some(Ok(d)) => merge(&out_tys[k], &d),
                _ => out_tys[k].clone(),
            };
            Value { name, ty }
        })
        .collect();
    let names: Vec<String> = outputs.iter().map(|v| v.name.clone()).collect();
    let id = match op {
        // A Constant node becomes a Const whose value carries the node's output name.
        sqil_ir::Op::Const(t) => g.add_const(names[0].clone(), t).node,
        op => g.add_node(label, op, &inputs, outputs),
    };
    for (slot, name) in names.into_iter().enumerate() {
        if values.insert(name.clone(), ValueRef { node: id, slot }).is_some() {
            return Err(IrError::Invalid(format!("value `{name}` is defined twice")));
        }
    }
    Ok(())
}
