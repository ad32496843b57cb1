//! The op set of the IR. Each op has, in one place per family: its attributes (built from an
//! [`AttrMap`], printed back by [`Op::attrs`]), its type rule ([`Op::infer`]) and its reference
//! semantics ([`Op::eval`]).
//!
//! Inputs are positional and may be absent (`None`) where ONNX allows optional inputs. Where
//! ONNX changed an attribute into an input across opsets (Squeeze axes, Clip bounds, Split
//! sizes, Reduce axes), the IR always takes the input form; the importer converts.

mod broadcast;
mod elementwise;
pub mod fused;
pub mod grad;
mod linalg;
pub mod movement;
mod nn;
pub mod quant;
mod reduce;
mod shape_ops;
pub mod unary;

pub use broadcast::{broadcast_indices, strided_indices, Broadcast, Over};
pub use elementwise::{binary_f32_in_place, clip_bounds_f32};
pub use linalg::{conv_with_table, dense_weight_kn, gemm_dequant, matmul_strided, AutoPad, ConvAttrs, StridedF32};
pub use nn::PoolAttrs;
pub use reduce::reduce_tables;
pub use shape_ops::{reshape_target, shape_range, transpose_perm};
pub use unary::{UnaryDef, UnaryOp, UNARY_OPS};

use crate::attrs::{Attr, AttrMap};
use crate::dtype::DType;
use crate::error::{IrError, Result};
use crate::shape::ValueType;
use crate::tensor::Tensor;

/// Elementwise functions of two broadcast inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Pow,
}

/// Reductions over a set of axes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    Mean,
    Sum,
    Max,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// A graph input; has no inputs and one output.
    Input,
    /// A constant (an ONNX initializer or `Constant` node).
    Const(Tensor),
    Unary(UnaryOp),
    Binary(BinaryOp),
    LeakyRelu {
        alpha: f32,
    },
    Elu {
        alpha: f32,
    },
    /// `x * Phi(x)`; `tanh` selects the tanh approximation.
    Gelu {
        tanh: bool,
    },
    /// Inputs: x, slope (unidirectionally broadcast to x).
    PRelu,
    /// Inputs: condition (bool), x, y.
    Where,
    /// Inputs: x, min?, max?.
    Clip,
    MatMul,
    /// Inputs: A, B, C?.
    Gemm {
        alpha: f32,
        beta: f32,
        trans_a: bool,
        trans_b: bool,
    },
    /// Inputs: X, W, B?.
    Conv(ConvAttrs),
    /// Inputs: X, W, B?.
    ConvTranspose(ConvAttrs),
    /// Outputs: Y, Indices? (when the node has two outputs).
    MaxPool(PoolAttrs),
    AveragePool(PoolAttrs),
    GlobalAveragePool,
    /// `coerce_2d`: opset < 13 semantics (flatten at `axis` into a 2-D matrix).
    Softmax {
        axis: i64,
        coerce_2d: bool,
    },
    LogSoftmax {
        axis: i64,
        coerce_2d: bool,
    },
    /// Inputs: X, Scale, B?; outputs Y, Mean?, InvStdDev?.
    LayerNorm {
        axis: i64,
        epsilon: f32,
    },
    /// Inputs: X, scale, B, mean, var; outputs Y (+ running mean, var in training mode).
    BatchNorm {
        epsilon: f32,
        momentum: f32,
        training: bool,
    },
    Flatten {
        axis: i64,
    },
    /// Inputs: data, shape.
    Reshape {
        allowzero: bool,
    },
    Transpose {
        perm: Option<Vec<i64>>,
    },
    /// Inputs: data, axes?.
    Squeeze,
    /// Inputs: data, axes.
    Unsqueeze,
    Concat {
        axis: i64,
    },
    /// Inputs: input, split?; `outputs` results.
    Split {
        axis: i64,
        outputs: usize,
    },
    /// Inputs: data, starts, ends, axes?, steps?.
    Slice,
    /// Inputs: data, indices.
    Gather {
        axis: i64,
    },
    Shape {
        start: i64,
        end: Option<i64>,
    },
    /// Input: shape; `value` is a one-element tensor.
    ConstantOfShape {
        value: Tensor,
    },
    Identity,
    Cast {
        to: DType,
        saturate: bool,
    },
    /// Inputs: data, axes?.
    Reduce {
        op: ReduceOp,
        keepdims: bool,
        noop_with_empty_axes: bool,
    },
    /// Inputs: input, shape.
    Expand,
    /// Inputs: x, y_scale, y_zero_point?. Output type: zero point's, else `output_dtype`, else u8.
    QuantizeLinear {
        axis: i64,
        block_size: i64,
        output_dtype: Option<DType>,
        saturate: bool,
    },
    /// Inputs: x, x_scale, x_zero_point?.
    DequantizeLinear {
        axis: i64,
        block_size: i64,
    },
    /// Quantize then dequantize in one op, for simulation and training: inputs x, scale,
    /// zero_point? (integer-valued f32). `q = clamp(round_half_even(x / scale) + zp, qmin, qmax)`,
    /// `y = (q - zp) * scale`, with `[qmin, qmax]` = `[-2^(bits-1), 2^(bits-1)-1]` if signed else
    /// `[0, 2^bits-1]`. Scale is per tensor, per `axis`, or per block of `block_size` along `axis`.
    FakeQuant {
        bits: u8,
        signed: bool,
        axis: i64,
        block_size: i64,
    },
    /// Several ops run as one kernel (see [`fused`]).
    Fused(Box<fused::Fused>),
    /// The gradient of a loss with respect to input `wrt` of `op` (see [`grad`]). Inputs: the
    /// forward op's `arity` inputs (absent ones absent), then the output gradient.
    Vjp {
        op: Box<Op>,
        wrt: usize,
        arity: usize,
    },
}

const BINARY: [(&str, BinaryOp); 5] = [
    ("Add", BinaryOp::Add),
    ("Sub", BinaryOp::Sub),
    ("Mul", BinaryOp::Mul),
    ("Div", BinaryOp::Div),
    ("Pow", BinaryOp::Pow),
];

const REDUCE: [(&str, ReduceOp); 3] =
    [("ReduceMean", ReduceOp::Mean), ("ReduceSum", ReduceOp::Sum), ("ReduceMax", ReduceOp::Max)];

/// Every op name `from_attrs` accepts (the IR's op set, by ONNX name where one exists).
pub fn op_names() -> Vec<&'static str> {
    let mut v: Vec<&'static str> = UNARY_OPS.iter().map(|d| d.name).collect();
    v.extend(BINARY.iter().map(|p| p.0));
    v.extend(REDUCE.iter().map(|p| p.0));
    v.extend([
        "Input",
        "Const",
        "LeakyRelu",
        "Elu",
        "Gelu",
        "PRelu",
        "Where",
        "Clip",
        "MatMul",
        "Gemm",
        "Conv",
        "ConvTranspose",
        "MaxPool",
        "AveragePool",
        "GlobalAveragePool",
        "Softmax",
        "LogSoftmax",
        "LayerNormalization",
        "BatchNormalization",
        "Flatten",
        "Reshape",
        "Transpose",
        "Squeeze",
        "Unsqueeze",
        "Concat",
        "Split",
        "Slice",
        "Gather",
        "Shape",
        "ConstantOfShape",
        "Identity",
        "Cast",
        "Expand",
        "QuantizeLinear",
        "DequantizeLinear",
        "FakeQuant",
        "Fused",
        "Vjp",
    ]);
    v
}

fn b(x: bool) -> Attr {
    Attr::Int(x as i64)
}

impl Op {
    /// The op's name in the text format (the ONNX op_type where one exists).
    pub fn name(&self) -> &'static str {
        match self {
            Op::Input => "Input",
            Op::Const(_) => "Const",
            Op::Unary(u) => u.def().name,
            Op::Binary(o) => BINARY.iter().find(|p| p.1 == *o).expect("listed").0,
            Op::Reduce { op, .. } => REDUCE.iter().find(|p| p.1 == *op).expect("listed").0,
            Op::LeakyRelu { .. } => "LeakyRelu",
            Op::Elu { .. } => "Elu",
            Op::Gelu { .. } => "Gelu",
            Op::PRelu => "PRelu",
            Op::Where => "Where",
            Op::Clip => "Clip",
            Op::MatMul => "MatMul",
            Op::Gemm { .. } => "Gemm",
            Op::Conv(_) => "Conv",
            Op::ConvTranspose(_) => "ConvTranspose",
            Op::MaxPool(_) => "MaxPool",
            Op::AveragePool(_) => "AveragePool",
            Op::GlobalAveragePool => "GlobalAveragePool",
            Op::Softmax { .. } => "Softmax",
            Op::LogSoftmax { .. } => "LogSoftmax",
            Op::LayerNorm { .. } => "LayerNormalization",
            Op::BatchNorm { .. } => "BatchNormalization",
            Op::Flatten { .. } => "Flatten",
            Op::Reshape { .. } => "Reshape",
            Op::Transpose { .. } => "Transpose",
            Op::Squeeze => "Squeeze",
            Op::Unsqueeze => "Unsqueeze",
            Op::Concat { .. } => "Concat",
            Op::Split { .. } => "Split",
            Op::Slice => "Slice",
            Op::Gather { .. } => "Gather",
            Op::Shape { .. } => "Shape",
            Op::ConstantOfShape { .. } => "ConstantOfShape",
            Op::Identity => "Identity",
            Op::Cast { .. } => "Cast",
            Op::Expand => "Expand",
            Op::QuantizeLinear { .. } => "QuantizeLinear",
            Op::DequantizeLinear { .. } => "DequantizeLinear",
            Op::FakeQuant { .. } => "FakeQuant",
            Op::Fused(_) => "Fused",
            Op::Vjp { .. } => "Vjp",
        }
    }

    /// Builds an op from its name and attributes, filling in ONNX defaults. `outputs` is the
    /// node's number of outputs (needed by Split). Unknown names are `Unsupported`.
    pub fn from_attrs(name: &str, a: &AttrMap, outputs: usize) -> Result<Op> {
        if let Some(u) = UNARY_OPS.iter().find(|d| d.name == name).map(|d| d.op) {
            return Ok(Op::Unary(u));
        }
        if let Some((_, o)) = BINARY.iter().find(|p| p.0 == name) {
            return Ok(Op::Binary(*o));
        }
        if let Some((_, r)) = REDUCE.iter().find(|p| p.0 == name) {
            return Ok(Op::Reduce {
                op: *r,
                keepdims: a.int("keepdims", 1)? != 0,
                noop_with_empty_axes: a.int("noop_with_empty_axes", 0)? != 0,
            });
        }
        Ok(match name {
            "Input" => Op::Input,
            "Const" => {
                Op::Const(a.opt_tensor("value")?.ok_or_else(|| IrError::Invalid("Const needs a `value`".into()))?)
            }
            "LeakyRelu" => Op::LeakyRelu { alpha: a.float("alpha", 0.01)? },
            "Elu" => Op::Elu { alpha: a.float("alpha", 1.0)? },
            "Gelu" => Op::Gelu {
                tanh: match a.string("approximate", "none")?.as_str() {
                    "none" => false,
                    "tanh" => true,
                    o => return Err(IrError::Invalid(format!("Gelu: approximate must be none or tanh, got `{o}`"))),
                },
            },
            "PRelu" => Op::PRelu,
            "Where" => Op::Where,
            "Clip" => Op::Clip,
            "MatMul" => Op::MatMul,
            "Gemm" => Op::Gemm {
                alpha: a.float("alpha", 1.0)?,
                beta: a.float("beta", 1.0)?,
                trans_a: a.int("transA", 0)? != 0,
                trans_b: a.int("transB", 0)? != 0,
            },
            "Conv" => Op::Conv(ConvAttrs::from_attrs(a)?),
            "ConvTranspose" => Op::ConvTranspose(ConvAttrs::from_attrs(a)?),
            "MaxPool" => Op::MaxPool(PoolAttrs::from_attrs(a)?),
            "AveragePool" => Op::AveragePool(PoolAttrs::from_attrs(a)?),
            "GlobalAveragePool" => Op::GlobalAveragePool,
            "Softmax" => Op::Softmax { axis: a.int("axis", -1)?, coerce_2d: a.int("coerce_2d", 0)? != 0 },
            "LogSoftmax" => Op::LogSoftmax { axis: a.int("axis", -1)?, coerce_2d: a.int("coerce_2d", 0)? != 0 },
            "LayerNormalization" => Op::LayerNorm { axis: a.int("axis", -1)?, epsilon: a.float("epsilon", 1e-5)? },
            "BatchNormalization" => Op::BatchNorm {
                epsilon: a.float("epsilon", 1e-5)?,
                momentum: a.float("momentum", 0.9)?,
                training: a.int("training_mode", 0)? != 0,
            },
            "Flatten" => Op::Flatten { axis: a.int("axis", 1)? },
            "Reshape" => Op::Reshape { allowzero: a.int("allowzero", 0)? != 0 },
            "Transpose" => Op::Transpose { perm: a.opt_ints("perm")? },
            "Squeeze" => Op::Squeeze,
            "Unsqueeze" => Op::Unsqueeze,
            "Concat" => {
                Op::Concat { axis: a.opt_int("axis")?.ok_or_else(|| IrError::Invalid("Concat needs `axis`".into()))? }
            }
            "Split" => Op::Split { axis: a.int("axis", 0)?, outputs },
            "Slice" => Op::Slice,
            "Gather" => Op::Gather { axis: a.int("axis", 0)? },
            "Shape" => Op::Shape { start: a.int("start", 0)?, end: a.opt_int("end")? },
            "ConstantOfShape" => {
                Op::ConstantOfShape { value: a.opt_tensor("value")?.unwrap_or_else(|| Tensor::scalar_f32(0.0)) }
            }
            "Identity" => Op::Identity,
            "Cast" => Op::Cast {
                to: a.opt_dtype("to")?.ok_or_else(|| IrError::Invalid("Cast needs `to`".into()))?,
                saturate: a.int("saturate", 1)? != 0,
            },
            "Expand" => Op::Expand,
            "QuantizeLinear" => Op::QuantizeLinear {
                axis: a.int("axis", 1)?,
                block_size: a.int("block_size", 0)?,
                output_dtype: a.opt_dtype("output_dtype")?,
                saturate: a.int("saturate", 1)? != 0,
            },
            "DequantizeLinear" => Op::DequantizeLinear { axis: a.int("axis", 1)?, block_size: a.int("block_size", 0)? },
            "FakeQuant" => {
                let bits = a.int("bits", 8)?;
                if !(2..=16).contains(&bits) {
                    return Err(IrError::Invalid(format!("FakeQuant: bits must be in 2..=16, got {bits}")));
                }
                Op::FakeQuant {
                    bits: bits as u8,
                    signed: a.int("signed", 1)? != 0,
                    axis: a.int("axis", 1)?,
                    block_size: a.int("block_size", 0)?,
                }
            }
            "Vjp" => {
                let f = fused::Fused::decode("vjp", &a.string("op", "")?)?;
                let op = f.stages.into_iter().next().expect("one stage").op;
                Op::Vjp { op: Box::new(op), wrt: a.int("wrt", 0)? as usize, arity: a.int("arity", 1)? as usize }
            }
            "Fused" => {
                let kernel = a.string("kernel", "fused")?;
                let stages = a.string("stages", "")?;
                Op::Fused(Box::new(fused::Fused::decode(&kernel, &stages)?))
            }
            other => return Err(IrError::Unsupported(format!("op `{other}`"))),
        })
    }

    /// Every attribute with its value (defaults included), in a fixed order: the text format
    /// prints exactly these, and `from_attrs` of them rebuilds an equal op.
    pub fn attrs(&self) -> Vec<(&'static str, Attr)> {
        match self {
            Op::Const(t) => vec![("value", Attr::Tensor(t.clone()))],
            Op::Reduce { keepdims, noop_with_empty_axes, .. } => {
                vec![("keepdims", b(*keepdims)), ("noop_with_empty_axes", b(*noop_with_empty_axes))]
            }
            Op::LeakyRelu { alpha } | Op::Elu { alpha } => vec![("alpha", Attr::Float(*alpha))],
            Op::Gelu { tanh } => {
                vec![("approximate", Attr::Str(if *tanh { "tanh" } else { "none" }.into()))]
            }
            Op::Gemm { alpha, beta, trans_a, trans_b } => vec![
                ("alpha", Attr::Float(*alpha)),
                ("beta", Attr::Float(*beta)),
                ("transA", b(*trans_a)),
                ("transB", b(*trans_b)),
            ],
            Op::Conv(c) | Op::ConvTranspose(c) => c.attrs(),
            Op::MaxPool(p) | Op::AveragePool(p) => p.attrs(),
            Op::Softmax { axis, coerce_2d } | Op::LogSoftmax { axis, coerce_2d } => {
                vec![("axis", Attr::Int(*axis)), ("coerce_2d", b(*coerce_2d))]
            }
            Op::LayerNorm { axis, epsilon } => {
                vec![("axis", Attr::Int(*axis)), ("epsilon", Attr::Float(*epsilon))]
            }
            Op::BatchNorm { epsilon, momentum, training } => vec![
                ("epsilon", Attr::Float(*epsilon)),
                ("momentum", Attr::Float(*momentum)),
                ("training_mode", b(*training)),
            ],
            Op::Flatten { axis } | Op::Concat { axis } | Op::Gather { axis } | Op::Split { axis, .. } => {
                vec![("axis", Attr::Int(*axis))]
            }
            Op::Reshape { allowzero } => vec![("allowzero", b(*allowzero))],
            Op::Transpose { perm } => perm.iter().map(|p| ("perm", Attr::Ints(p.clone()))).collect(),
            Op::Shape { start, end } => {
                let mut v = vec![("start", Attr::Int(*start))];
                v.extend(end.map(|e| ("end", Attr::Int(e))));
                v
            }
            Op::ConstantOfShape { value } => vec![("value", Attr::Tensor(value.clone()))],
            Op::Cast { to, saturate } => vec![("to", Attr::DType(*to)), ("saturate", b(*saturate))],
            Op::QuantizeLinear { axis, block_size, output_dtype, saturate } => {
                let mut v = vec![
                    ("axis", Attr::Int(*axis)),
                    ("block_size", Attr::Int(*block_size)),
                    ("saturate", b(*saturate)),
                ];
                v.extend(output_dtype.map(|d| ("output_dtype", Attr::DType(d))));
                v
            }
            Op::DequantizeLinear { axis, block_size } => {
                vec![("axis", Attr::Int(*axis)), ("block_size", Attr::Int(*block_size))]
            }
            Op::FakeQuant { bits, signed, axis, block_size } => vec![
                ("bits", Attr::Int(*bits as i64)),
                ("signed", b(*signed)),
                ("axis", Attr::Int(*axis)),
                ("block_size", Attr::Int(*block_size)),
            ],
            Op::Vjp { op, wrt, arity } => {
                let f = fused::Fused {
                    kernel: "vjp".into(),
                    stages: vec![fused::Stage { op: (**op).clone(), args: vec![] }],
                };
                vec![
                    ("op", Attr::Str(f.encode().expect("vjp op encodes"))),
                    ("wrt", Attr::Int(*wrt as i64)),
                    ("arity", Attr::Int(*arity as i64)),
                ]
            }
            Op::Fused(f) => vec![
                ("kernel", Attr::Str(f.kernel.clone())),
                // Encoding fails only for stages `decode` would not have built.
                ("stages", Attr::Str(f.encode().expect("fused stages encode"))),
            ],
            _ => vec![],
        }
    }

    /// Number of outputs of a node with this op, when the op fixes it (`None`: set by the node,
    /// as for MaxPool's optional indices or LayerNorm's optional statistics).
    pub fn fixed_outputs(&self) -> Option<usize> {
        match self {
            Op::Split { outputs, .. } => Some(*outputs),
            Op::MaxPool(_) | Op::LayerNorm { .. } | Op::BatchNorm { .. } => None,
            _ => Some(1),
        }
    }

    /// Output types from input types. `consts` holds the values of inputs that are constants,
    /// which shape-carrying inputs (Reshape's shape, Slice's starts, ...) need for exact shapes.
    /// `outputs` is the node's number of outputs.
    pub fn infer(
        &self,
        inputs: &[Option<&ValueType>],
        consts: &[Option<&Tensor>],
        outputs: usize,
    ) -> Result<Vec<ValueType>> {
        let cx = Cx { inputs, consts };
        match self {
            Op::Input => Err(IrError::Internal("Input has no type rule; its type is declared".into())),
            Op::Const(t) => Ok(vec![ValueType::fixed(t.dtype(), &t.shape)]),
            Op::Unary(_) | Op::LeakyRelu { .. } | Op::Elu { .. } | Op::Gelu { .. } | Op::Identity => {
                Ok(vec![cx.ty(0)?.clone()])
            }
            Op::PRelu => Ok(vec![cx.ty(0)?.clone()]),
            Op::Clip => Ok(vec![cx.ty(0)?.clone()]),
            Op::Binary(_) => elementwise::infer_broadcast(&cx, &[0, 1], 0),
            Op::Where => elementwise::infer_broadcast(&cx, &[0, 1, 2], 1),
            Op::MatMul => linalg::infer_matmul(&cx),
            Op::Gemm { trans_a, trans_b, .. } => linalg::infer_gemm(&cx, *trans_a, *trans_b),
            Op::Conv(c) => linalg::infer_conv(&cx, c, false),
            Op::ConvTranspose(c) => linalg::infer_conv(&cx, c, true),
            Op::MaxPool(p) | Op::AveragePool(p) => nn::infer_pool(&cx, p, outputs),
            Op::GlobalAveragePool => nn::infer_global_pool(&cx),
            Op::Softmax { .. } | Op::LogSoftmax { .. } => Ok(vec![cx.ty(0)?.clone()]),
            Op::LayerNorm { axis, .. } => nn::infer_layer_norm(&cx, *axis, outputs),
            Op::BatchNorm { .. } => nn::infer_batch_norm(&cx, outputs),
            Op::Flatten { axis } => shape_ops::infer_flatten(&cx, *axis),
            Op::Reshape { allowzero } => shape_ops::infer_reshape(&cx, *allowzero),
            Op::Transpose { perm } => shape_ops::infer_transpose(&cx, perm.as_deref()),
            Op::Squeeze => shape_ops::infer_squeeze(&cx),
            Op::Unsqueeze => shape_ops::infer_unsqueeze(&cx),
            Op::Concat { axis } => shape_ops::infer_concat(&cx, *axis),
            Op::Split { axis, outputs } => shape_ops::infer_split(&cx, *axis, *outputs),
            Op::Slice => shape_ops::infer_slice(&cx),
            Op::Gather { axis } => shape_ops::infer_gather(&cx, *axis),
            Op::Shape { start, end } => shape_ops::infer_shape(&cx, *start, *end),
            Op::ConstantOfShape { value } => shape_ops::infer_constant_of_shape(&cx, value),
            Op::Cast { to, .. } => Ok(vec![ValueType::new(*to, cx.ty(0)?.shape.clone())]),
            Op::Reduce { keepdims, noop_with_empty_axes, .. } => {
                reduce::infer_reduce(&cx, *keepdims, *noop_with_empty_axes)
            }
            Op::Expand => shape_ops::infer_expand(&cx),
            Op::QuantizeLinear { output_dtype, .. } => quant::infer_quantize(&cx, *output_dtype),
            Op::DequantizeLinear { .. } => quant::infer_dequantize(&cx),
            Op::FakeQuant { .. } => Ok(vec![cx.ty(0)?.clone()]),
            Op::Fused(f) => f.infer(inputs, consts),
            Op::Vjp { wrt, arity, .. } => {
                let t =
                    cx.opt_ty(*wrt).ok_or_else(|| IrError::Invalid(format!("Vjp: forward input {wrt} is absent")))?;
                cx.ty(*arity)?;
                Ok(vec![ValueType::new(DType::F32, t.shape.clone())])
            }
        }
    }

    /// Which implementation evaluating this op on these inputs takes on the CPU (what `sqil
    /// bench --profile` prints per step): `"f32 kernel"` where it runs on f32 values directly
    /// (vectorized f32, or f64 lanes in registers where the definition is in f64: Softmax,
    /// LayerNorm, Sigmoid), `"data movement"` for layout ops (no arithmetic), and
    /// `"reference (f64)"` where the general element loop in f64 serves (correct, slow: the
    /// steps a fast path is still missing for). Decided by the same conditions as [`Op::eval`].
    pub fn cpu_path(&self, inputs: &[Option<&Tensor>], outputs: usize) -> &'static str {
        const F32: &str = "f32 kernel";
        const MOVE: &str = "data movement";
        const REF: &str = "reference (f64)";
        let Some(Some(x)) = inputs.first() else { return REF };
        let f32_in = matches!(x.data, crate::tensor::Data::F32(_));
        let all_f32 = inputs.iter().flatten().all(|t| matches!(t.data, crate::tensor::Data::F32(_)));
        match self {
            Op::Flatten { .. }
            | Op::Reshape { .. }
            | Op::Transpose { .. }
            | Op::Squeeze
            | Op::Unsqueeze
            | Op::Concat { .. }
            | Op::Split { .. }
            | Op::Slice
            | Op::Gather { .. }
            | Op::Shape { .. }
            | Op::ConstantOfShape { .. }
            | Op::Identity
            | Op::Cast { .. }
            | Op::Expand => MOVE,
            Op::QuantizeLinear { block_size: b, .. } | Op::DequantizeLinear { block_size: b, .. } => match inputs {
                [Some(x), Some(s), zp @ ..] => {
                    let q = matches!(self, Op::QuantizeLinear { .. });
                    if quant::per_tensor_f32(x, s, zp.first().copied().flatten(), *b, q) {
                        F32
                    } else {
                        REF
                    }
                }
                _ => REF,
            },
            Op::Where => match inputs {
                [Some(c), Some(x), Some(y)] if elementwise::where_direct(c, x, y) => MOVE,
                _ => REF,
            },
            _ if !f32_in => REF,
            Op::Unary(
                UnaryOp::Relu
                | UnaryOp::Neg
                | UnaryOp::Abs
                | UnaryOp::Sigmoid
                | UnaryOp::Tanh
                | UnaryOp::Softplus
                | UnaryOp::Exp
                | UnaryOp::Log
                | UnaryOp::HardSwish
                | UnaryOp::Sqrt
                | UnaryOp::Reciprocal
                | UnaryOp::Erf,
            )
            | Op::Gelu { .. }
            | Op::LeakyRelu { .. }
            | Op::Elu { .. } => F32,
            Op::Binary(BinaryOp::Add | BinaryOp::Sub | BinaryOp::Mul | BinaryOp::Div) if all_f32 => F32,
            Op::Binary(BinaryOp::Pow) => match inputs {
                [Some(a), Some(b)] if elementwise::pow_f32_exponent(a, b).is_some() => F32,
                _ => REF,
            },
            Op::BatchNorm { training: false, .. } if x.rank() >= 2 => F32,
            Op::MatMul | Op::Gemm { .. } | Op::Conv(_) | Op::ConvTranspose(_) | Op::LayerNorm { .. } => F32,
            Op::PRelu if all_f32 => F32,
            Op::Clip if all_f32 => F32,
            Op::MaxPool(_) if outputs == 1 => F32,
            Op::AveragePool(_) => F32,
            Op::GlobalAveragePool | Op::Reduce { .. } => F32,
            Op::Softmax { .. } | Op::LogSoftmax { .. } => F32,
            Op::FakeQuant { block_size, bits, .. } => {
                let per_tensor = inputs.get(1).copied().flatten().is_some_and(|s| s.len() == 1)
                    && inputs.get(2).copied().flatten().is_none_or(|z| z.len() == 1);
                if *block_size == 0 && *bits <= 16 && per_tensor {
                    F32
                } else {
                    REF
                }
            }
            _ => REF,
        }
    }

    /// Reference semantics: computes the outputs from concrete inputs. `outputs` is the node's
    /// number of outputs.
    pub fn eval(&self, inputs: &[Option<&Tensor>], outputs: usize) -> Result<Vec<Tensor>> {
        let x = Ex { inputs };
        let one = |t: Tensor| Ok(vec![t]);
        match self {
            Op::Input => Err(IrError::Internal("Input is fed, not evaluated".into())),
            Op::Const(t) => one(t.clone()),
            Op::Identity => one(x.get(0)?.clone()),
            Op::Unary(u) => one(elementwise::unary(*u, x.get(0)?)?),
            Op::LeakyRelu { alpha } => {
                let a = *alpha;
                if let crate::tensor::Data::F32(v) = &x.get(0)?.data {
                    // The f32 product is the f64 product of two f32 values (exact) rounded once.
                    let y = v.iter().map(|&v| if v < 0.0 { a * v } else { v }).collect();
                    return one(Tensor::new(x.get(0)?.shape.clone(), crate::tensor::Data::F32(y))?);
                }
                one(elementwise::map_float(x.get(0)?, "LeakyRelu", |v| if v < 0.0 { a as f64 * v } else { v })?)
            }
            Op::Elu { alpha } => {
                // sqil's ELU (`exp_nonpos` inside), vectorized on f32 values.
                if let crate::tensor::Data::F32(v) = &x.get(0)?.data {
                    let mut y = vec![0f32; v.len()];
                    sqil_kernels_cpu::generic::elu_f32(v, *alpha, &mut y);
                    return one(Tensor::new(x.get(0)?.shape.clone(), crate::tensor::Data::F32(y))?);
                }
                let a = *alpha as f64;
                one(elementwise::map_float(x.get(0)?, "Elu", |v| sqil_kernels_cpu::generic::elu(v, a))?)
            }
            Op::Gelu { tanh } => one(elementwise::gelu(x.get(0)?, *tanh)?),
            Op::Binary(o) => one(elementwise::binary(*o, x.get(0)?, x.get(1)?)?),
            Op::PRelu => one(elementwise::prelu(x.get(0)?, x.get(1)?)?),
            Op::Where => one(elementwise::where_(x.get(0)?, x.get(1)?, x.get(2)?)?),
            Op::Clip => one(elementwise::clip(x.get(0)?, x.opt(1), x.opt(2))?),
            Op::MatMul => one(linalg::matmul(x.get(0)?, x.get(1)?)?),
            Op::Gemm { alpha, beta, trans_a, trans_b } => {
                one(linalg::gemm(x.get(0)?, x.get(1)?, x.opt(2), *alpha, *beta, *trans_a, *trans_b)?)
            }
            Op::Conv(c) => one(linalg::conv(x.get(0)?, x.get(1)?, x.opt(2), c)?),
            Op::ConvTranspose(c) => one(linalg::conv_transpose(x.get(0)?, x.get(1)?, x.opt(2), c)?),
            Op::MaxPool(p) => nn::max_pool(x.get(0)?, p, outputs),
            Op::AveragePool(p) => one(nn::average_pool(x.get(0)?, p)?),
            Op::GlobalAveragePool => one(nn::global_average_pool(x.get(0)?)?),
            Op::Softmax { axis, coerce_2d } => one(nn::softmax(x.get(0)?, *axis, *coerce_2d, false)?),
            Op::LogSoftmax { axis, coerce_2d } => one(nn::softmax(x.get(0)?, *axis, *coerce_2d, true)?),
            Op::LayerNorm { axis, epsilon } => nn::layer_norm(x.get(0)?, x.get(1)?, x.opt(2), *axis, *epsilon, outputs),
            Op::BatchNorm { epsilon, momentum, training } => {
                nn::batch_norm(&x, *epsilon, *momentum, *training, outputs)
            }
            Op::Flatten { axis } => one(shape_ops::flatten(x.get(0)?, *axis)?),
            Op::Reshape { allowzero } => one(shape_ops::reshape(x.get(0)?, x.get(1)?, *allowzero)?),
            Op::Transpose { perm } => one(shape_ops::transpose(x.get(0)?, perm.as_deref())?),
            Op::Squeeze => one(shape_ops::squeeze(x.get(0)?, x.opt(1))?),
            Op::Unsqueeze => one(shape_ops::unsqueeze(x.get(0)?, x.get(1)?)?),
            Op::Concat { axis } => one(shape_ops::concat(&x.all()?, *axis)?),
            Op::Split { axis, outputs } => shape_ops::split(x.get(0)?, x.opt(1), *axis, *outputs),
            Op::Slice => one(shape_ops::slice(x.get(0)?, x.get(1)?, x.get(2)?, x.opt(3), x.opt(4))?),
            Op::Gather { axis } => one(shape_ops::gather(x.get(0)?, x.get(1)?, *axis)?),
            Op::Shape { start, end } => one(shape_ops::shape(x.get(0)?, *start, *end)),
            Op::ConstantOfShape { value } => one(shape_ops::constant_of_shape(x.get(0)?, value)?),
            Op::Cast { to, .. } => one(x.get(0)?.cast(*to)),
            Op::Reduce { op, keepdims, noop_with_empty_axes } => {
                one(reduce::reduce(*op, x.get(0)?, x.opt(1), *keepdims, *noop_with_empty_axes)?)
            }
            Op::Expand => one(shape_ops::expand(x.get(0)?, x.get(1)?)?),
            Op::QuantizeLinear { axis, block_size, output_dtype, .. } => {
                one(quant::quantize(x.get(0)?, x.get(1)?, x.opt(2), *axis, *block_size, *output_dtype)?)
            }
            Op::DequantizeLinear { axis, block_size } => {
                one(quant::dequantize(x.get(0)?, x.get(1)?, x.opt(2), *axis, *block_size)?)
            }
            Op::FakeQuant { bits, signed, axis, block_size } => {
                one(quant::fake_quant(x.get(0)?, x.get(1)?, x.opt(2), *bits, *signed, *axis, *block_size)?)
            }
            Op::Fused(f) => f.eval(inputs),
            Op::Vjp { op, wrt, arity } => {
                let split = (*arity).min(inputs.len());
                one(grad::vjp_multi(op, &inputs[..split], &inputs[split..], *wrt)?)
            }
        }
    }

    /// True for ops with no side effects whose outputs depend only on inputs (all of them today;
    /// `Input` excluded since it has no inputs to fold from).
    pub fn is_foldable(&self) -> bool {
        !matches!(self, Op::Input | Op::Const(_))
    }
}

/// Type-inference context: input types and the constant inputs.
pub(crate) struct Cx<'a> {
    inputs: &'a [Option<&'a ValueType>],
    consts: &'a [Option<&'a Tensor>],
}

impl Cx<'_> {
    fn ty(&self, i: usize) -> Result<&ValueType> {
        self.inputs.get(i).copied().flatten().ok_or_else(|| IrError::Invalid(format!("missing required input {i}")))
    }
    fn opt_ty(&self, i: usize) -> Option<&ValueType> {
        self.inputs.get(i).copied().flatten()
    }
    fn konst(&self, i: usize) -> Option<&Tensor> {
        self.consts.get(i).copied().flatten()
    }
    fn konst_i64(&self, i: usize) -> Option<Vec<i64>> {
        self.konst(i).map(|t| t.data.to_i64_vec())
    }
}

/// Evaluation context: the concrete inputs.
pub(crate) struct Ex<'a> {
    inputs: &'a [Option<&'a Tensor>],
}

impl<'a> Ex<'a> {
    fn get(&self, i: usize) -> Result<&'a Tensor> {
        self.opt(i).ok_or_else(|| IrError::Invalid(format!("missing required input {i}")))
    }
    fn opt(&self, i: usize) -> Option<&'a Tensor> {
        self.inputs.get(i).copied().flatten()
    }
    fn all(&self) -> Result<Vec<&'a Tensor>> {
        self.inputs
            .iter()
            .enumerate()
            .map(|(i, t)| t.ok_or_else(|| IrError::Invalid(format!("missing input {i}"))))
            .collect()
    }
}

/// Normalises a possibly negative axis against `rank`; errors if out of range.
pub fn norm_axis(axis: i64, rank: usize) -> Result<usize> {
    let r = rank as i64;
    if axis < -r || axis >= r {
        return Err(IrError::Invalid(format!("axis {axis} out of range for rank {rank}")));
    }
    Ok(if axis < 0 { (axis + r) as usize } else { axis as usize })
}
