//! The importer table: one entry per ONNX op_type. Most ops map to the IR op of the same name
//! with the same attributes; the entries here convert opset-specific forms (attributes that
//! later opsets turned into inputs, legacy Softmax, `Constant`'s value variants, ...).

use sqil_ir::{Attr, AttrMap, Graph, IrError, Op, Result, Tensor, ValueRef};
use std::collections::HashMap;

/// What an importer sees: the node's attributes and inputs, which it may extend with
/// constants (for attribute-to-input conversions), and the graph to add them to.
pub(crate) struct NodeCx<'a> {
    pub g: &'a mut Graph,
    pub opset: i64,
    pub attrs: AttrMap,
    pub inputs: Vec<Option<ValueRef>>,
    pub n_out: usize,
    pub name: String,
    pub op_type: String,
}

pub(crate) type Importer = fn(&mut NodeCx) -> Result<Op>;

impl NodeCx<'_> {
    /// The IR op of the same name, from the node's attributes.
    fn same(&mut self, op_type: &str) -> Result<Op> {
        Op::from_attrs(op_type, &self.attrs, self.n_out)
    }

    /// The IR op named as the node's op_type (the element-wise ops of `sqil_ir::ops::unary`).
    fn same_as_node(&mut self) -> Result<Op> {
        let op_type = std::mem::take(&mut self.op_type);
        self.same(&op_type)
    }

    /// Moves an ints attribute into input slot `slot` as an i64 constant.
    fn attr_to_input(&mut self, attr: &str, slot: usize) -> Result<()> {
        let Some(v) = self.attrs.opt_ints(attr)? else { return Ok(()) };
        self.attrs.0.remove(attr);
        let t = Tensor::from_i64(vec![v.len()], v)?;
        self.set_input(slot, format!("{}.{attr}", self.name), t);
        Ok(())
    }

    fn set_input(&mut self, slot: usize, name: String, t: Tensor) {
        let mut name = name;
        while self.g.find_value(&name).is_some() {
            name.push('_');
        }
        let v = self.g.add_const(name, t);
        if self.inputs.len() <= slot {
            self.inputs.resize(slot + 1, None);
        }
        self.inputs[slot] = Some(v);
    }

    /// Replaces an int attribute holding an ONNX type code by a dtype attribute.
    fn dtype_attr(&mut self, attr: &str) -> Result<()> {
        if let Some(code) = self.attrs.opt_int(attr)? {
            let d =
                crate::tensor::dtype_from_onnx(code as i32).map_err(|e| e.context(format!("attribute `{attr}`")))?;
            self.attrs.insert(attr, Attr::DType(d));
        }
        Ok(())
    }
}

macro_rules! same {
    ($($name:literal),* $(,)?) => {
        [$(($name, (|cx: &mut NodeCx| cx.same($name)) as Importer)),*]
    };
}

pub(crate) fn table() -> HashMap<&'static str, Importer> {
    let mut t: HashMap<&'static str, Importer> = HashMap::new();
    // Every element-wise function of the op table, attribute-free.
    t.extend(sqil_ir::ops::UNARY_OPS.iter().map(|d| (d.name, (|cx: &mut NodeCx| cx.same_as_node()) as Importer)));
    t.extend(same!(
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Pow",
        "LeakyRelu",
        "PRelu",
        "Elu",
        "Gelu",
        "Where",
        "MatMul",
        "Gemm",
        "Conv",
        "ConvTranspose",
        "MaxPool",
        "AveragePool",
        "GlobalAveragePool",
        "LayerNormalization",
        "BatchNormalization",
        "Flatten",
        "Reshape",
        "Transpose",
        "Concat",
        "Slice",
        "Gather",
        "Shape",
        "ConstantOfShape",
        "Identity",
        "Expand",
        "DequantizeLinear",
    ));
    t.insert("Constant", constant);
    t.insert("Clip", clip);
    t.insert("HardSigmoid", hard_sigmoid);
    t.insert("Squeeze", |cx| axes_input(cx, "Squeeze", 13));
    t.insert("Unsqueeze", |cx| axes_input(cx, "Unsqueeze", 13));
    t.insert("ReduceSum", |cx| axes_input(cx, "ReduceSum", 13));
    t.insert("ReduceMean", |cx| axes_input(cx, "ReduceMean", 18));
    t.insert("ReduceMax", |cx| axes_input(cx, "ReduceMax", 18));
    t.insert("Split", split);
    t.insert("Softmax", |cx| softmax(cx, "Softmax"));
    t.insert("LogSoftmax", |cx| softmax(cx, "LogSoftmax"));
    t.insert("Cast", cast);
    t.insert("CastLike", cast_like);
    t.insert("QuantizeLinear", quantize);
    t.insert("Dropout", dropout);
    t
}

fn constant(cx: &mut NodeCx) -> Result<Op> {
    let a = &cx.attrs;
    let t = if let Some(t) = a.opt_tensor("value")? {
        t
    } else if a.contains("value_float") {
        Tensor::scalar_f32(a.float("value_float", 0.0)?)
    } else if let Some(v) = a.opt_floats("value_floats")? {
        Tensor::from_f32(vec![v.len()], v)?
    } else if let Some(v) = a.opt_int("value_int")? {
        Tensor::from_i64(vec![], vec![v])?
    } else if let Some(v) = a.opt_ints("value_ints")? {
        Tensor::from_i64(vec![v.len()], v)?
    } else {
        let have: Vec<&String> = a.0.keys().collect();
        return Err(IrError::Unsupported(format!(
            "Constant with attributes {have:?} (sparse and string constants are not supported)"
        )));
    };
    Ok(Op::Const(t))
}

fn clip(cx: &mut NodeCx) -> Result<Op> {
    if cx.opset < 11 {
        for (slot, (k, default)) in [("min", f32::MIN), ("max", f32::MAX)].into_iter().enumerate() {
            if cx.attrs.contains(k) {
                let v = cx.attrs.float(k, default)?;
                cx.set_input(slot + 1, format!("{}.{k}", cx.name), Tensor::scalar_f32(v));
            }
        }
    }
    Ok(Op::Clip)
}

/// HardSigmoid `max(0, min(1, alpha x + beta))` (MobileNetV3's gate) as the IR ops it is made of:
/// a Mul and an Add of constants in x's type, then Clip to [0, 1] (each on the runtime's fast
/// paths, and in every back end).
fn hard_sigmoid(cx: &mut NodeCx) -> Result<Op> {
    let (alpha, beta) = (cx.attrs.float("alpha", 0.2)?, cx.attrs.float("beta", 0.5)?);
    let x =
        cx.inputs.first().copied().flatten().ok_or_else(|| IrError::Invalid("HardSigmoid needs an input".into()))?;
    let dtype = cx.g.value(x).ty.dtype;
    let scalar = |v: f32| Tensor::new(vec![], sqil_ir::Data::from_f64(dtype, std::iter::once(v as f64)));
    let name = cx.name.clone();
    // Value names not yet in the graph (an unnamed node's are ".alpha", ...).
    let fresh = |g: &Graph, what: &str| {
        let mut n = format!("{name}.{what}");
        while g.find_value(&n).is_some() {
            n.push('_');
        }
        n
    };
    let a = cx.g.add_const(fresh(cx.g, "alpha"), scalar(alpha)?);
    let (mul, add) = (Op::Binary(sqil_ir::ops::BinaryOp::Mul), Op::Binary(sqil_ir::ops::BinaryOp::Add));
    let scaled = cx.g.add_inferred(format!("{name}.scale"), mul, &[Some(x), Some(a)], fresh(cx.g, "scaled"))?;
    let b = cx.g.add_const(fresh(cx.g, "beta"), scalar(beta)?);
    let shifted = cx.g.add_inferred(format!("{name}.shift"), add, &[Some(scaled), Some(b)], fresh(cx.g, "shifted"))?;
    cx.inputs = vec![Some(shifted)];
    cx.set_input(1, format!("{name}.lo"), scalar(0.0)?);
    cx.set_input(2, format!("{name}.hi"), scalar(1.0)?);
    cx.attrs.0.remove("alpha");
    cx.attrs.0.remove("beta");
    Ok(Op::Clip)
}

/// Ops whose `axes` became an input at opset `since`.
fn axes_input(cx: &mut NodeCx, op: &str, since: i64) -> Result<Op> {
    if cx.opset < since {
        cx.attr_to_input("axes", 1)?;
    }
    cx.attrs.0.remove("axes");
    cx.same(op)
}

fn split(cx: &mut NodeCx) -> Result<Op> {
    if cx.opset < 13 {
        cx.attr_to_input("split", 1)?;
    }
    if let Some(k) = cx.attrs.opt_int("num_outputs")? {
        if k as usize != cx.n_out {
            return Err(IrError::Invalid(format!("Split: num_outputs = {k} but the node has {} outputs", cx.n_out)));
        }
    }
    cx.same("Split")
}

fn softmax(cx: &mut NodeCx, op: &str) -> Result<Op> {
    if cx.opset < 13 {
        // Before opset 13 the input was coerced to 2-D at `axis` (default 1).
        let axis = cx.attrs.int("axis", 1)?;
        cx.attrs.insert("axis", Attr::Int(axis));
        cx.attrs.insert("coerce_2d", Attr::Int(1));
    }
    cx.same(op)
}

fn cast(cx: &mut NodeCx) -> Result<Op> {
    cx.dtype_attr("to")?;
    cx.same("Cast")
}

/// CastLike(x, like) is Cast to like's element type.
fn cast_like(cx: &mut NodeCx) -> Result<Op> {
    let like = cx
        .inputs
        .get(1)
        .copied()
        .flatten()
        .ok_or_else(|| IrError::Invalid("CastLike needs its `target_type` input".into()))?;
    let to = cx.g.value(like).ty.dtype;
    cx.inputs.truncate(1);
    cx.attrs.insert("to", Attr::DType(to));
    cx.same("Cast")
}

fn quantize(cx: &mut NodeCx) -> Result<Op> {
    cx.dtype_attr("output_dtype")?;
    if cx.attrs.int("precision", 0)? != 0 {
        return Err(IrError::Unsupported("QuantizeLinear with a `precision` attribute".into()));
    }
    cx.same("QuantizeLinear")
}

fn dropout(cx: &mut NodeCx) -> Result<Op> {
    // Inference semantics: identity. A mask output or training_mode input needs training.
    if cx.n_out > 1 || cx.inputs.get(2).copied().flatten().is_some() {
        return Err(IrError::Unsupported("Dropout with a mask output or training_mode input".into()));
    }
    cx.inputs.truncate(1);
    Ok(Op::Identity)
}
