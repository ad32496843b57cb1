//! Any IR graph (a training graph: forward with LSQ FakeQuant, the `Vjp` backward graph, the QRD
//! loss) lowered for the GPU at a fixed batch, independent of any device: `GraphProgram` is one
//! f32 buffer per value, the constants to upload once, and a step list of cuBLAS GEMMs (fp32,
//! TF32 off: the CPU trainer's precision) and kernels generated for this graph. `GpuGraph`
//! (driver feature, `graph_exec.rs`) runs it.
//!
//! Every element-wise op, reduction and gradient that is not a GEMM is one generated
//! *map-reduce* kernel: an iteration space (the op's full broadcast shape, dimensions marked kept
//! or reduced), operands read at offsets computed from the coordinates (broadcasting, quantizer
//! groups), an expression per element, and, when dimensions are reduced, a block per output
//! summing in double in a fixed order (deterministic). Values known on the host (constants,
//! shapes, anything computed only from them) are evaluated once at lowering with the reference
//! interpreter's ops; reshapes alias their input's buffer.
//!
//! Arithmetic: FakeQuant forward is the CPU's bit for bit (IEEE division, round half even, no
//! fma); GEMMs sum in cuBLAS's order and reductions in the block's, so losses and gradients
//! agree with the CPU trainer within [`GRAD_TOL`] rather than exactly.

use crate::error::Result;
use sqil_ir::ops::{BinaryOp, ReduceOp, UnaryOp};
use sqil_ir::{DType, Dim, Graph, Op, Tensor, ValueRef, ValueType};
use std::collections::HashMap;

/// Largest |GPU - CPU| of a loss or gradient relative to the largest |value| of that tensor that
/// the device check accepts (f32 sums in another order; quantizer steps at rounding ties may
/// flip an element, which moves an LSQ step gradient by one element's share).
pub const GRAD_TOL: f32 = 1e-3;

/// One step of a [`GraphProgram`].
#[derive(Clone, Debug)]
pub enum GStep {
    /// A generated kernel of [`GraphProgram::source`]: `out` then `ins` as pointer arguments,
    /// `grid` blocks of `block` threads.
    Kernel { name: String, out: usize, ins: Vec<usize>, grid: u32, block: u32, label: String },
    /// Row-major `c[b] = alpha op(x[b]) op(y[b]) + beta c[b]` over `batch` matrices
    /// (`op(x)` is `[m, k]`, stored `[k, m]` when `tx`; per-matrix strides `sx`, `sy`, 0 for a
    /// shared operand; `c` dense).
    Gemm(GemmStep),
}

#[derive(Clone, Debug)]
pub struct GemmStep {
    pub x: usize,
    pub tx: bool,
    pub y: usize,
    pub ty: bool,
    pub c: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub batch: usize,
    pub sx: usize,
    pub sy: usize,
    pub alpha: f32,
    pub beta: f32,
    pub label: String,
}

/// A graph lowered for the GPU at a fixed batch (see the module header).
#[derive(Clone, Debug, Default)]
pub struct GraphProgram {
    /// Element count of every buffer.
    pub bufs: Vec<usize>,
    /// Buffers filled once, before the first run.
    pub consts: Vec<(usize, Vec<f32>)>,
    /// The graph's inputs: name, buffer, concrete shape.
    pub inputs: Vec<(String, usize, Vec<usize>)>,
    /// The graph's outputs: buffer and concrete shape (a value known on the host is stored in a
    /// constant buffer).
    pub outputs: Vec<(usize, Vec<usize>)>,
    pub steps: Vec<GStep>,
    /// The generated kernels, one CUDA translation unit.
    pub source: String,
}

impl GraphProgram {
    /// Bytes of device memory the buffers take.
    pub fn bytes(&self) -> usize {
        self.bufs.iter().sum::<usize>() * 4
    }
}

/// Where a value lives during lowering.
#[derive(Clone)]
enum Val {
    Host(Tensor),
    Dev(usize),
}

/// A map-reduce kernel: see the module header. Coordinates are `c0..` over `dims`.
struct MapReduce {
    dims: Vec<usize>,
    kept: Vec<bool>,
    /// (buffer, offset expression)
    operands: Vec<(usize, String)>,
    /// The per-element value, over `v0..` (the operands, as float).
    expr: String,
    /// Elements for which this is false contribute nothing (ragged quantizer groups).
    guard: Option<String>,
    /// The output from `acc` (double: the sum, or the element when nothing is reduced), over
    /// the kept coordinates.
    post: String,
}

struct Lowerer {
    p: GraphProgram,
    kernels: usize,
    /// Constant buffers made from host values, by value.
    uploaded: HashMap<ValueRef, usize>,
}

fn unsupported(what: impl Into<String>) -> crate::Error {
    crate::Error::Unsupported(what.into())
}

fn known(ty: &ValueType, what: &str) -> Result<Vec<usize>> {
    ty.known_shape().map(|s| s.to_vec()).ok_or_else(|| unsupported(format!("{what}: shape {ty} is not known")))
}

/// Row-major strides of `shape`.
fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// The offset of an operand of shape `op` broadcast (numpy rules, right-aligned) over the
/// iteration space `full`, as an expression in the coordinates `c{base + j}`.
fn bcast_off(op: &[usize], full: &[usize], base: usize) -> String {
    let st = strides(op);
    let lead = full.len() - op.len();
    let terms: Vec<String> = (0..op.len())
        .filter(|&i| op[i] != 1)
        .map(|i| if st[i] == 1 { format!("c{}", base + lead + i) } else { format!("c{}*{}LL", base + lead + i, st[i]) })
        .collect();
    if terms.is_empty() {
        "0".into()
    } else {
        terms.join("+")
    }
}

/// The reduced-and-kept marking of `full` for an unbroadcast to `target` (right-aligned): a dim
/// is kept where `target` has it with the same size.
fn unbroadcast_kept(full: &[usize], target: &[usize]) -> Result<Vec<bool>> {
    let lead = full.len().checked_sub(target.len()).ok_or_else(|| unsupported("unbroadcast to a larger rank"))?;
    (0..full.len())
        .map(|j| {
            if j < lead {
                return Ok(false);
            }
            let t = target[j - lead];
            if t == full[j] && t != 1 {
                Ok(true)
            } else if t == 1 {
                Ok(false)
            } else {
                Err(unsupported(format!("unbroadcast of {full:?} to {target:?}")))
            }
        })
        .collect()
}

fn cu_f32(v: f32) -> String {
    if v.is_nan() {
        "__int_as_float(0x7fc00000)".into()
    } else if v.is_infinite() {
        if v > 0.0 { "__int_as_float(0x7f800000)" } else { "__int_as_float(0xff800000)" }.into()
    } else {
        format!("{:?}f", v)
    }
}

fn unary_fwd(u: UnaryOp) -> String {
    u.def().cuda.replace("{a}", "v0")
}

/// `d/dx u(x)` as CUDA over `v0` (x), for the unary ops whose gradient runs on the GPU.
fn unary_df(u: UnaryOp) -> Option<&'static str> {
    Some(match u {
        UnaryOp::Relu => "(v0 > 0.0f ? 1.0 : 0.0)",
        UnaryOp::Neg => "-1.0",
        UnaryOp::Abs => "(v0 > 0.0f ? 1.0 : (v0 < 0.0f ? -1.0 : 0.0))",
        UnaryOp::Tanh => "(1.0 - tanh((double)v0) * tanh((double)v0))",
        UnaryOp::Sigmoid => "(1.0 / (1.0 + exp(-(double)v0)) * (1.0 - 1.0 / (1.0 + exp(-(double)v0))))",
        UnaryOp::Exp => "exp((double)v0)",
        UnaryOp::Log => "(1.0 / (double)v0)",
        UnaryOp::Sqrt => "(0.5 / sqrt((double)v0))",
        UnaryOp::Softplus => "(1.0 / (1.0 + exp(-(double)v0)))",
        UnaryOp::Erf => "(1.1283791670955126 * exp(-(double)v0 * (double)v0))",
        _ => return None,
    })
}

fn binary_fwd(b: BinaryOp) -> &'static str {
    match b {
        BinaryOp::Add => "__fadd_rn(v0, v1)",
        BinaryOp::Sub => "__fsub_rn(v0, v1)",
        BinaryOp::Mul => "__fmul_rn(v0, v1)",
        BinaryOp::Div => "__fdiv_rn(v0, v1)",
        BinaryOp::Pow => "(float)pow((double)v0, (double)v1)",
    }
}

/// `dy * d(a op b)/d(input wrt)` over `v0` (a), `v1` (b), `v2` (dy), in double.
fn binary_df(b: BinaryOp, wrt: usize) -> &'static str {
    match (b, wrt) {
        (BinaryOp::Add, _) | (BinaryOp::Sub, 0) => "(double)v2",
        (BinaryOp::Sub, _) => "-(double)v2",
        (BinaryOp::Mul, 0) => "(double)v2 * (double)v1",
        (BinaryOp::Mul, _) => "(double)v2 * (double)v0",
        (BinaryOp::Div, 0) => "(double)v2 / (double)v1",
        (BinaryOp::Div, _) => "-(double)v2 * (double)v0 / ((double)v1 * (double)v1)",
        (BinaryOp::Pow, 0) => "(double)v2 * (double)v1 * pow((double)v0, (double)v1 - 1.0)",
        (BinaryOp::Pow, _) => "(double)v2 * pow((double)v0, (double)v1) * log((double)v0)",
    }
}

impl Lowerer {
    fn buf(&mut self, len: usize) -> usize {
        self.p.bufs.push(len.max(1));
        self.p.bufs.len() - 1
    }

    /// The device buffer of `v` (a host value is uploaded once as a constant).
    fn dev(&mut self, v: ValueRef, vals: &HashMap<ValueRef, Val>) -> Result<usize> {
        match vals.get(&v) {
            Some(Val::Dev(b)) => Ok(*b),
            Some(Val::Host(t)) => {
                if let Some(&b) = self.uploaded.get(&v) {
                    return Ok(b);
                }
                if !t.dtype().is_float() {
                    return Err(unsupported(format!("a {} tensor on the GPU", t.dtype())));
                }
                let data = t.data.to_f32_vec();
                let b = self.buf(data.len());
                self.p.consts.push((b, data));
                self.uploaded.insert(v, b);
                Ok(b)
            }
            None => Err(unsupported("a value used before it is computed")),
        }
    }

    /// Emits `mr` writing a new buffer of the kept dims' size; returns it.
    fn emit(&mut self, mr: MapReduce, label: &str) -> Result<usize> {
        let out_len: usize = mr.dims.iter().zip(&mr.kept).filter(|(_, k)| **k).map(|(d, _)| d).product();
        let red_len: usize = mr.dims.iter().zip(&mr.kept).filter(|(_, k)| !**k).map(|(d, _)| d).product();
        let out = self.buf(out_len);
        self.emit_into(out, mr, label, out_len, red_len)?;
        Ok(out)
    }

    fn emit_into(&mut self, out: usize, mr: MapReduce, label: &str, out_len: usize, red_len: usize) -> Result<()> {
        let name = format!("g{}", self.kernels);
        self.kernels += 1;
        let params: Vec<String> = (0..mr.operands.len()).map(|i| format!("const float* __restrict__ p{i}")).collect();
        let mut s = format!(
            "// {label}\nextern \"C\" __global__ void {name}(float* __restrict__ out{}{}) {{\n",
            if params.is_empty() { "" } else { ", " },
            params.join(", ")
        );
        // Decompose an index over a subset of the dims (last fastest) into coordinates.
        let decompose = |idx: &str, which: bool| -> String {
            let mut t = format!("  {{ long long t = {idx};\n");
            for j in (0..mr.dims.len()).rev().filter(|&j| mr.kept[j] == which) {
                t += &format!("  c{j} = t % {}LL; t /= {}LL;\n", mr.dims[j], mr.dims[j]);
            }
            t + "  }\n"
        };
        let coords: Vec<String> = (0..mr.dims.len()).map(|j| format!("c{j} = 0")).collect();
        let loads: String =
            mr.operands.iter().enumerate().map(|(i, (_, off))| format!("    float v{i} = p{i}[{off}];\n")).collect();
        let value = |body: &str| match &mr.guard {
            Some(g) => format!("    if ({g}) {{\n{loads}    {body}\n    }}\n"),
            None => format!("{loads}    {body}\n"),
        };
        if red_len == 1 {
            s += &format!(
                "  long long o = (long long)blockIdx.x * blockDim.x + threadIdx.x;\n  if (o >= {out_len}LL) return;\n"
            );
            if !coords.is_empty() {
                s += &format!("  long long {};\n", coords.join(", "));
            }
            s += &decompose("o", true);
            s += "  double acc = 0.0;\n";
            s += &value(&format!("acc = (double)({});", mr.expr));
            s += &format!("  out[o] = (float)({});\n}}\n", mr.post);
            let grid = out_len.div_ceil(256) as u32;
            self.p.source += &s;
            self.p.steps.push(GStep::Kernel {
                name,
                out,
                ins: mr.operands.iter().map(|o| o.0).collect(),
                grid,
                block: 256,
                label: label.into(),
            });
        } else {
            s += "  long long o = blockIdx.x;\n";
            if !coords.is_empty() {
                s += &format!("  long long {};\n", coords.join(", "));
            }
            s += &decompose("o", true);
            s += &format!(
                "  double acc = 0.0;\n  for (long long r = threadIdx.x; r < {red_len}LL; r += blockDim.x) {{\n"
            );
            s += &decompose("r", false).replace("\n  ", "\n    ");
            s += &value(&format!("acc += (double)({});", mr.expr));
            s += "  }\n  __shared__ double sh[256];\n  sh[threadIdx.x] = acc;\n  __syncthreads();\n";
            s += "  for (int w = 128; w > 0; w >>= 1) {\n    if (threadIdx.x < w) sh[threadIdx.x] += sh[threadIdx.x + w];\n    __syncthreads();\n  }\n";
            s += &format!("  if (threadIdx.x == 0) {{ acc = sh[0]; out[o] = (float)({}); }}\n}}\n", mr.post);
            self.p.source += &s;
            self.p.steps.push(GStep::Kernel {
                name,
                out,
                ins: mr.operands.iter().map(|o| o.0).collect(),
                grid: out_len as u32,
                block: 256,
                label: label.into(),
            });
        }
        Ok(())
    }
}

/// The element-wise map over `shape` with the operands broadcast to it.
fn map(shape: &[usize], operands: Vec<(usize, &[usize])>, expr: String) -> MapReduce {
    MapReduce {
        dims: shape.to_vec(),
        kept: vec![true; shape.len()],
        operands: operands.into_iter().map(|(b, s)| (b, bcast_off(s, shape, 0))).collect(),
        expr,
        guard: None,
        post: "acc".into(),
    }
}

/// The scale (or zero point) offset of a FakeQuant over `x` with scale shape `s`, in x's own
/// coordinates `c0..` (for element-wise kernels over x: ragged groups need no guard).
fn scale_off_in_x(x: &[usize], s: &[usize], axis: i64, block: i64) -> Result<String> {
    let slen: usize = s.iter().product();
    if slen == 1 && block == 0 {
        return Ok("0".into());
    }
    let ax = sqil_ir::ops::norm_axis(axis, x.len()).map_err(crate::Error::Ir)?;
    if block <= 0 {
        return Ok(format!("c{ax}"));
    }
    let ss = strides(s);
    Ok((0..x.len())
        .map(|j| if j == ax { format!("(c{j}/{block}LL)*{}LL", ss[j]) } else { format!("c{j}*{}LL", ss[j]) })
        .collect::<Vec<_>>()
        .join("+"))
}

/// The scale index of element coordinates for a FakeQuant over `x` with scale shape `s`:
/// (iteration dims, kept-for-scale marks, x offset, scale offset, guard, per-scale count
/// expression). A blocked axis is split into (block index, position in block).
#[allow(clippy::type_complexity)]
fn quant_space(
    x: &[usize],
    s: &[usize],
    axis: i64,
    block: i64,
) -> Result<(Vec<usize>, Vec<bool>, String, String, Option<String>, String)> {
    let slen: usize = s.iter().product();
    let n: usize = x.iter().product();
    let ident = bcast_off(x, x, 0);
    if slen == 1 && block == 0 {
        return Ok((x.to_vec(), vec![false; x.len()], ident, "0".into(), None, format!("{n}.0")));
    }
    let ax = sqil_ir::ops::norm_axis(axis, x.len()).map_err(crate::Error::Ir)?;
    if block <= 0 {
        let kept: Vec<bool> = (0..x.len()).map(|j| j == ax).collect();
        return Ok((x.to_vec(), kept, ident, format!("c{ax}"), None, format!("{}.0", n / x[ax].max(1))));
    }
    let b = block as usize;
    let nb = x[ax].div_ceil(b);
    let bs = b.min(x[ax]);
    // dims: x's with axis -> (nb, bs): coordinate j < ax as is, ax -> (c_ax block, c_{ax+1} pos).
    let mut dims = x[..ax].to_vec();
    dims.extend([nb, bs]);
    dims.extend(&x[ax + 1..]);
    let kept: Vec<bool> = (0..dims.len()).map(|j| j != ax + 1).collect();
    let xs = strides(x);
    let ss = strides(s);
    let mut xo = vec![];
    let mut so = vec![];
    for j in 0..x.len() {
        let (xc, sc) = if j < ax {
            (format!("c{j}"), format!("c{j}"))
        } else if j == ax {
            (format!("(c{ax}*{b}LL+c{})", ax + 1), format!("c{ax}"))
        } else {
            (format!("c{}", j + 1), format!("c{}", j + 1))
        };
        xo.push(format!("{xc}*{}LL", xs[j]));
        so.push(format!("{sc}*{}LL", ss[j]));
    }
    let ragged = !x[ax].is_multiple_of(bs);
    let guard = ragged.then(|| format!("c{ax}*{b}LL+c{} < {}LL", ax + 1, x[ax]));
    // Elements per scale: the block's length (the last may be short) times the other dims that
    // share it (none: every other dim is kept).
    let count = format!("(double)min({b}LL, {}LL - c{ax}*{b}LL)", x[ax]);
    Ok((dims, kept, xo.join("+"), so.join("+"), guard, count))
}

/// Lowers `g` for the GPU with every symbolic input dimension set to `batch`.
pub fn lower_graph(g: &Graph, batch: usize) -> Result<GraphProgram> {
    let mut lw = Lowerer { p: GraphProgram::default(), kernels: 0, uploaded: HashMap::new() };
    lw.p.source = "// generated by sqil (crates/cuda/src/graph.rs)\n".into();
    let mut vals: HashMap<ValueRef, Val> = HashMap::new();
    let mut types: HashMap<ValueRef, ValueType> = HashMap::new();
    let order = g.topo_order().map_err(crate::Error::Ir)?;
    for &n in &order {
        let node = g.node(n);
        let what = g.describe(n);
        let ins = g.inputs_of(n);
        let outv = ValueRef { node: n, slot: 0 };
        match &node.op {
            Op::Input => {
                let ty = &node.outputs[0].ty;
                let shape: Vec<usize> = ty
                    .shape
                    .iter()
                    .map(|d| match d {
                        Dim::Known(k) => Ok(*k),
                        Dim::Sym(_) => Ok(batch),
                        Dim::Unknown => {
                            Err(unsupported(format!("input `{}` has an unknown dimension", node.outputs[0].name)))
                        }
                    })
                    .collect::<Result<_>>()?;
                if ty.dtype != DType::F32 {
                    return Err(unsupported(format!(
                        "input `{}` is {}, the GPU runs f32",
                        node.outputs[0].name, ty.dtype
                    )));
                }
                let b = lw.buf(shape.iter().product());
                lw.p.inputs.push((node.outputs[0].name.clone(), b, shape.clone()));
                types.insert(outv, ValueType::new(DType::F32, shape.iter().map(|&d| Dim::Known(d)).collect()));
                vals.insert(outv, Val::Dev(b));
                continue;
            }
            Op::Const(t) => {
                types.insert(outv, ValueType::new(t.dtype(), t.shape.iter().map(|&d| Dim::Known(d)).collect()));
                vals.insert(outv, Val::Host(t.clone()));
                continue;
            }
            _ => {}
        }
        // Concrete output types from the concrete input types and the host-known inputs.
        let in_tys: Vec<Option<ValueType>> = ins.iter().map(|v| v.and_then(|v| types.get(&v).cloned())).collect();
        let ty_refs: Vec<Option<&ValueType>> = in_tys.iter().map(Option::as_ref).collect();
        let host: Vec<Option<&Tensor>> = ins
            .iter()
            .map(|v| {
                v.and_then(|v| match vals.get(&v) {
                    Some(Val::Host(t)) => Some(t),
                    _ => None,
                })
            })
            .collect();
        let nout = node.outputs.len();
        let out_tys = node.op.infer(&ty_refs, &host, nout).map_err(|e| crate::Error::Ir(e.context(what.clone())))?;
        let all_host = ins.iter().all(|v| v.is_none_or(|v| matches!(vals.get(&v), Some(Val::Host(_)))));
        if all_host || matches!(node.op, Op::Shape { .. }) {
            // Evaluated once here (a Shape needs only its input's concrete type).
            let outs = if let Op::Shape { start, end } = &node.op {
                let x = ty_refs[0]
                    .and_then(|t| t.known_shape())
                    .ok_or_else(|| unsupported(format!("{what}: unknown shape")))?;
                let r = x.len() as i64;
                let clampi = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
                let (a, b) = (clampi(*start), end.map_or(x.len(), clampi));
                let dims: Vec<i64> = x[a..b.max(a)].iter().map(|&d| d as i64).collect();
                vec![Tensor::from_i64(vec![dims.len()], dims).map_err(crate::Error::Ir)?]
            } else {
                node.op.eval(&host, nout).map_err(|e| crate::Error::Ir(e.context(what.clone())))?
            };
            for (slot, t) in outs.into_iter().enumerate() {
                let v = ValueRef { node: n, slot };
                types.insert(v, ValueType::new(t.dtype(), t.shape.iter().map(|&d| Dim::Known(d)).collect()));
                vals.insert(v, Val::Host(t));
            }
            continue;
        }
        if nout != 1 {
            return Err(unsupported(format!("{what}: a node with {nout} outputs on the GPU")));
        }
        let oshape = known(&out_tys[0], &what)?;
        if !out_tys[0].dtype.is_float() {
            return Err(unsupported(format!("{what}: a {} result on the GPU", out_tys[0].dtype)));
        }
        let shape_of = |v: Option<ValueRef>| -> Result<Vec<usize>> {
            let v = v.ok_or_else(|| unsupported(format!("{what}: an absent input")))?;
            known(types.get(&v).ok_or_else(|| unsupported("untyped value"))?, &what)
        };
        let label = what.clone();
        let result: usize = match &node.op {
            Op::Identity | Op::Reshape { .. } | Op::Flatten { .. } | Op::Squeeze | Op::Unsqueeze => {
                lw.dev(ins[0].ok_or_else(|| unsupported("no input"))?, &vals)?
            }
            Op::Unary(u) => {
                let x = lw.dev(ins[0].unwrap(), &vals)?;
                let xs = shape_of(ins[0])?;
                lw.emit(map(&oshape, vec![(x, &xs)], unary_fwd(*u)), &label)?
            }
            Op::Binary(b) => {
                let (a, c) = (lw.dev(ins[0].unwrap(), &vals)?, lw.dev(ins[1].unwrap(), &vals)?);
                let (as_, cs) = (shape_of(ins[0])?, shape_of(ins[1])?);
                lw.emit(map(&oshape, vec![(a, &as_), (c, &cs)], binary_fwd(*b).into()), &label)?
            }
            Op::LeakyRelu { alpha } => {
                let x = lw.dev(ins[0].unwrap(), &vals)?;
                lw.emit(
                    map(&oshape, vec![(x, &oshape)], format!("v0 < 0.0f ? __fmul_rn(v0, {}) : v0", cu_f32(*alpha))),
                    &label,
                )?
            }
            Op::Clip => {
                let bound = |i: usize, d: f32| -> Result<f32> {
                    match ins.get(i).copied().flatten() {
                        None => Ok(d),
                        Some(v) => match vals.get(&v) {
                            Some(Val::Host(t)) => Ok(t.data.to_f32_vec()[0]),
                            _ => Err(unsupported(format!("{what}: bounds computed on the device"))),
                        },
                    }
                };
                let (lo, hi) = (bound(1, f32::NEG_INFINITY)?, bound(2, f32::INFINITY)?);
                let x = lw.dev(ins[0].unwrap(), &vals)?;
                lw.emit(
                    map(
                        &oshape,
                        vec![(x, &oshape)],
                        format!("v0 < {} ? {} : (v0 > {} ? {} : v0)", cu_f32(lo), cu_f32(lo), cu_f32(hi), cu_f32(hi)),
                    ),
                    &label,
                )?
            }
            Op::FakeQuant { bits, signed, axis, block_size } => {
                let xs = shape_of(ins[0])?;
                let ss = shape_of(ins[1])?;
                let (x, s) = (lw.dev(ins[0].unwrap(), &vals)?, lw.dev(ins[1].unwrap(), &vals)?);
                let (lo, hi) = sqil_ir::ops::quant::fake_quant_range(*bits, *signed);
                let so = scale_off_in_x(&xs, &ss, *axis, *block_size)?;
                let mut operands = vec![(x, bcast_off(&xs, &xs, 0)), (s, so.clone())];
                let z = match ins.get(2).copied().flatten() {
                    Some(zv) => {
                        operands.push((lw.dev(zv, &vals)?, so));
                        "v2"
                    }
                    None => "0.0f",
                };
                let expr = format!(
                    "__fmul_rn(__fsub_rn(fminf(fmaxf(__fadd_rn(rintf(__fdiv_rn(v0, v1)), {z}), {lo}.0f), {hi}.0f), {z}), v1)"
                );
                let mr = MapReduce {
                    dims: xs.clone(),
                    kept: vec![true; xs.len()],
                    operands,
                    expr,
                    guard: None,
                    post: "acc".into(),
                };
                lw.emit(mr, &label)?
            }
            Op::Reduce { op: r @ (ReduceOp::Mean | ReduceOp::Sum), noop_with_empty_axes, .. } => {
                let xs = shape_of(ins[0])?;
                let x = lw.dev(ins[0].unwrap(), &vals)?;
                let axes: Vec<usize> = match ins.get(1).copied().flatten().map(|v| vals.get(&v)) {
                    Some(Some(Val::Host(t))) => t
                        .data
                        .to_i64_vec()
                        .iter()
                        .map(|&a| sqil_ir::ops::norm_axis(a, xs.len()))
                        .collect::<std::result::Result<_, _>>()
                        .map_err(crate::Error::Ir)?,
                    Some(_) => return Err(unsupported(format!("{what}: axes computed on the device"))),
                    None if *noop_with_empty_axes => (0..0).collect(),
                    None => (0..xs.len()).collect(),
                };
                let count: usize = axes.iter().map(|&a| xs[a]).product();
                let kept: Vec<bool> = (0..xs.len()).map(|j| !axes.contains(&j)).collect();
                let post = if *r == ReduceOp::Mean { format!("acc / {}.0", count.max(1)) } else { "acc".into() };
                let mr = MapReduce {
                    dims: xs.clone(),
                    kept,
                    operands: vec![(x, bcast_off(&xs, &xs, 0))],
                    expr: "v0".into(),
                    guard: None,
                    post,
                };
                lw.emit(mr, &label)?
            }
            Op::Gemm { alpha, beta, trans_a, trans_b } => {
                let a_s = shape_of(ins[0])?;
                let (a, b) = (lw.dev(ins[0].unwrap(), &vals)?, lw.dev(ins[1].unwrap(), &vals)?);
                let (m, k) = if *trans_a { (a_s[1], a_s[0]) } else { (a_s[0], a_s[1]) };
                let nn = oshape[1];
                let c = match ins.get(2).copied().flatten() {
                    Some(cv) if *beta != 0.0 => {
                        let cs = shape_of(Some(cv))?;
                        let cb = lw.dev(cv, &vals)?;
                        lw.emit(
                            map(&oshape, vec![(cb, &cs)], format!("__fmul_rn(v0, {})", cu_f32(*beta))),
                            &format!("{label} (bias)"),
                        )?
                    }
                    _ => lw.buf(m * nn),
                };
                let has_c = ins.get(2).copied().flatten().is_some() && *beta != 0.0;
                lw.p.steps.push(GStep::Gemm(GemmStep {
                    x: a,
                    tx: *trans_a,
                    y: b,
                    ty: *trans_b,
                    c,
                    m,
                    n: nn,
                    k,
                    batch: 1,
                    sx: 0,
                    sy: 0,
                    alpha: *alpha,
                    beta: if has_c { 1.0 } else { 0.0 },
                    label,
                }));
                c
            }
            Op::MatMul => {
                let (a_s, b_s) = (shape_of(ins[0])?, shape_of(ins[1])?);
                let (a, b) = (lw.dev(ins[0].unwrap(), &vals)?, lw.dev(ins[1].unwrap(), &vals)?);
                let gs = matmul_geometry(&a_s, &b_s, &oshape)
                    .ok_or_else(|| unsupported(format!("{what}: MatMul of {a_s:?} x {b_s:?} on the GPU")))?;
                let c = lw.buf(oshape.iter().product());
                lw.p.steps.push(GStep::Gemm(GemmStep {
                    x: a,
                    tx: false,
                    y: b,
                    ty: false,
                    c,
                    m: gs.m,
                    n: gs.n,
                    k: gs.k,
                    batch: gs.nb,
                    sx: gs.sa,
                    sy: gs.sb,
                    alpha: 1.0,
                    beta: 0.0,
                    label,
                }));
                c
            }
            Op::Vjp { op, wrt, arity } => {
                let wrt = *wrt;
                let fwd: Vec<Option<ValueRef>> = ins[..*arity].to_vec();
                let dyv = ins
                    .get(*arity)
                    .copied()
                    .flatten()
                    .ok_or_else(|| unsupported(format!("{what}: no output gradient")))?;
                if ins.len() > arity + 1 && ins[arity + 1..].iter().any(Option::is_some) {
                    return Err(unsupported(format!("{what}: gradients through several outputs on the GPU")));
                }
                let dys = shape_of(Some(dyv))?;
                let dy = lw.dev(dyv, &vals)?;
                vjp(&mut lw, &vals, op, &fwd, wrt, dy, &dys, &oshape, &label, &shape_of)?
            }
            op => return Err(unsupported(format!("{what}: {} on the GPU", op.name()))),
        };
        if lw.p.bufs[result] < oshape.iter().product::<usize>() {
            return Err(unsupported(format!("{what}: internal size mismatch")));
        }
        types.insert(outv, ValueType::new(DType::F32, oshape.iter().map(|&d| Dim::Known(d)).collect()));
        vals.insert(outv, Val::Dev(result));
    }
    for &o in &g.outputs {
        let b = lw.dev(o, &vals)?;
        let shape = known(types.get(&o).ok_or_else(|| unsupported("untyped output"))?, "output")?;
        lw.p.outputs.push((b, shape));
    }
    Ok(lw.p)
}

struct MatMulGeo {
    m: usize,
    k: usize,
    n: usize,
    nb: usize,
    sa: usize,
    sb: usize,
}

/// Batched MatMul as strided GEMMs: equal batch dims, or a rank-2 operand shared by all.
fn matmul_geometry(a: &[usize], b: &[usize], out: &[usize]) -> Option<MatMulGeo> {
    if a.len() < 2 || b.len() < 2 {
        return None;
    }
    let (m, k, n) = (a[a.len() - 2], a[a.len() - 1], b[b.len() - 1]);
    let batch = &out[..out.len() - 2];
    let nb: usize = batch.iter().product();
    let stride = |s: &[usize], per: usize| -> Option<usize> {
        let sb = &s[..s.len() - 2];
        if sb.iter().product::<usize>() == 1 {
            Some(0)
        } else if sb == batch {
            Some(per)
        } else {
            None
        }
    };
    Some(MatMulGeo { m, k, n, nb, sa: stride(a, m * k)?, sb: stride(b, k * n)? })
}

#[allow(clippy::too_many_arguments)]
fn vjp(
    lw: &mut Lowerer,
    vals: &HashMap<ValueRef, Val>,
    op: &Op,
    fwd: &[Option<ValueRef>],
    wrt: usize,
    dy: usize,
    dys: &[usize],
    oshape: &[usize],
    label: &str,
    shape_of: &dyn Fn(Option<ValueRef>) -> Result<Vec<usize>>,
) -> Result<usize> {
    let what = || format!("{label}: the gradient of {} with respect to input {wrt}", op.name());
    let input =
        |i: usize| fwd.get(i).copied().flatten().ok_or_else(|| unsupported(format!("{}: an absent input", what())));
    Ok(match op {
        Op::Identity | Op::Reshape { .. } | Op::Flatten { .. } | Op::Squeeze | Op::Unsqueeze if wrt == 0 => dy,
        Op::Unary(u) if wrt == 0 => {
            let df = unary_df(*u).ok_or_else(|| unsupported(what()))?;
            let x = lw.dev(input(0)?, vals)?;
            let xs = shape_of(Some(input(0)?))?;
            lw.emit(map(&xs, vec![(x, &xs), (dy, dys)], format!("(double)v1 * {df}")), label)?
        }
        Op::LeakyRelu { alpha } if wrt == 0 => {
            let x = lw.dev(input(0)?, vals)?;
            let xs = shape_of(Some(input(0)?))?;
            lw.emit(
                map(
                    &xs,
                    vec![(x, &xs), (dy, dys)],
                    format!("v0 < 0.0f ? (double)v1 * {} : (double)v1", cu_f32(*alpha)),
                ),
                label,
            )?
        }
        Op::Clip if wrt == 0 => {
            let bound = |i: usize, d: f32| -> Result<f32> {
                match fwd.get(i).copied().flatten() {
                    None => Ok(d),
                    Some(v) => match vals.get(&v) {
                        Some(Val::Host(t)) => Ok(t.data.to_f32_vec()[0]),
                        _ => Err(unsupported(what())),
                    },
                }
            };
            let (lo, hi) = (bound(1, f32::NEG_INFINITY)?, bound(2, f32::INFINITY)?);
            let x = lw.dev(input(0)?, vals)?;
            let xs = shape_of(Some(input(0)?))?;
            lw.emit(
                map(
                    &xs,
                    vec![(x, &xs), (dy, dys)],
                    format!("(v0 >= {} && v0 <= {}) ? (double)v1 : 0.0", cu_f32(lo), cu_f32(hi)),
                ),
                label,
            )?
        }
        Op::Binary(b) => {
            let (a, c) = (lw.dev(input(0)?, vals)?, lw.dev(input(1)?, vals)?);
            let (as_, cs) = (shape_of(Some(input(0)?))?, shape_of(Some(input(1)?))?);
            let target = if wrt == 0 { &as_ } else { &cs };
            let kept = unbroadcast_kept(dys, target)?;
            let mr = MapReduce {
                dims: dys.to_vec(),
                kept,
                operands: vec![(a, bcast_off(&as_, dys, 0)), (c, bcast_off(&cs, dys, 0)), (dy, bcast_off(dys, dys, 0))],
                expr: binary_df(*b, wrt).into(),
                guard: None,
                post: "acc".into(),
            };
            lw.emit(mr, label)?
        }
        Op::Reduce { op: r @ (ReduceOp::Mean | ReduceOp::Sum), noop_with_empty_axes, .. } if wrt == 0 => {
            let xs = shape_of(Some(input(0)?))?;
            let axes: Vec<usize> = match fwd.get(1).copied().flatten().map(|v| vals.get(&v)) {
                Some(Some(Val::Host(t))) => t
                    .data
                    .to_i64_vec()
                    .iter()
                    .map(|&a| sqil_ir::ops::norm_axis(a, xs.len()))
                    .collect::<std::result::Result<_, _>>()
                    .map_err(crate::Error::Ir)?,
                Some(_) => return Err(unsupported(what())),
                None if *noop_with_empty_axes => vec![],
                None => (0..xs.len()).collect(),
            };
            let count: usize = axes.iter().map(|&a| xs[a]).product();
            let scale = if *r == ReduceOp::Mean { 1.0 / count.max(1) as f64 } else { 1.0 };
            let kept_shape: Vec<usize> = (0..xs.len()).map(|d| if axes.contains(&d) { 1 } else { xs[d] }).collect();
            lw.emit(map(&xs, vec![(dy, &kept_shape)], format!("(double)v0 * {scale:?}")), label)?
        }
        Op::Gemm { alpha, beta, trans_a, trans_b } => {
            let (a_s, b_s) = (shape_of(Some(input(0)?))?, shape_of(Some(input(1)?))?);
            let (m, nn) = (dys[0], dys[1]);
            let k = if *trans_a { a_s[0] } else { a_s[1] };
            if wrt == 2 {
                let cs = shape_of(Some(input(2)?))?;
                let kept = unbroadcast_kept(dys, &cs)?;
                let mr = MapReduce {
                    dims: dys.to_vec(),
                    kept,
                    operands: vec![(dy, bcast_off(dys, dys, 0))],
                    expr: format!("(double)v0 * {:?}", *beta as f64),
                    guard: None,
                    post: "acc".into(),
                };
                return lw.emit(mr, label);
            }
            let (a, b) = (lw.dev(input(0)?, vals)?, lw.dev(input(1)?, vals)?);
            let (x, tx, y, ty, gm, gk, gn) = match (wrt, *trans_a, *trans_b) {
                (0, true, tb) => (b, tb, dy, true, k, nn, m),
                (0, false, tb) => (dy, false, b, !tb, m, nn, k),
                (1, ta, true) => (dy, true, a, ta, nn, m, k),
                (1, ta, false) => (a, !ta, dy, false, k, m, nn),
                _ => return Err(unsupported(what())),
            };
            let out_len = if wrt == 0 { a_s.iter().product() } else { b_s.iter().product::<usize>() };
            let c = lw.buf(out_len);
            lw.p.steps.push(GStep::Gemm(GemmStep {
                x,
                tx,
                y,
                ty,
                c,
                m: gm,
                n: gn,
                k: gk,
                batch: 1,
                sx: 0,
                sy: 0,
                alpha: *alpha,
                beta: 0.0,
                label: label.into(),
            }));
            c
        }
        Op::MatMul if wrt <= 1 => {
            let (a_s, b_s) = (shape_of(Some(input(0)?))?, shape_of(Some(input(1)?))?);
            let geo = matmul_geometry(&a_s, &b_s, dys).ok_or_else(|| unsupported(what()))?;
            let (a, b) = (lw.dev(input(0)?, vals)?, lw.dev(input(1)?, vals)?);
            let (m, k, n, nb) = (geo.m, geo.k, geo.n, geo.nb);
            let c = lw.buf(oshape.iter().product());
            let step = match wrt {
                // dA[t] = dY[t] B[t]^T; a shared A would need a sum over t.
                0 if geo.sa != 0 || nb == 1 => GemmStep {
                    x: dy,
                    tx: false,
                    y: b,
                    ty: true,
                    c,
                    m,
                    n: k,
                    k: n,
                    batch: nb,
                    sx: m * n,
                    sy: geo.sb,
                    alpha: 1.0,
                    beta: 0.0,
                    label: label.into(),
                },
                // dB[t] = A[t]^T dY[t].
                1 if geo.sb != 0 || nb == 1 => GemmStep {
                    x: a,
                    tx: true,
                    y: dy,
                    ty: false,
                    c,
                    m: k,
                    n,
                    k: m,
                    batch: nb,
                    sx: geo.sa,
                    sy: m * n,
                    alpha: 1.0,
                    beta: 0.0,
                    label: label.into(),
                },
                // A shared B: dB = sum_t A[t]^T dY[t] = A_flat^T dY_flat (rows of every t stacked).
                1 if geo.sa != 0 => GemmStep {
                    x: a,
                    tx: true,
                    y: dy,
                    ty: false,
                    c,
                    m: k,
                    n,
                    k: nb * m,
                    batch: 1,
                    sx: 0,
                    sy: 0,
                    alpha: 1.0,
                    beta: 0.0,
                    label: label.into(),
                },
                _ => return Err(unsupported(what())),
            };
            lw.p.steps.push(GStep::Gemm(step));
            c
        }
        Op::FakeQuant { bits, signed, axis, block_size } if wrt <= 1 => {
            let xs = shape_of(Some(input(0)?))?;
            let ss = shape_of(Some(input(1)?))?;
            let (x, s) = (lw.dev(input(0)?, vals)?, lw.dev(input(1)?, vals)?);
            let (lo, hi) = sqil_ir::ops::quant::fake_quant_range(*bits, *signed);
            let (dims, kept, xo, so, guard, count) = quant_space(&xs, &ss, *axis, *block_size)?;
            // dy has x's layout: read at x's offset.
            let mut operands = vec![(x, xo.clone()), (s, so.clone()), (dy, xo)];
            let z = match fwd.get(2).copied().flatten() {
                Some(zv) => {
                    operands.push((lw.dev(zv, vals)?, so));
                    "v3"
                }
                None => "0.0f",
            };
            let q = format!("__fadd_rn(rintf(__fdiv_rn(v0, v1)), {z})");
            if wrt == 0 {
                // Element-wise over x's own coordinates (ragged groups included).
                let so = scale_off_in_x(&xs, &ss, *axis, *block_size)?;
                let mut ops = vec![(x, bcast_off(&xs, &xs, 0)), (s, so.clone()), (dy, bcast_off(&xs, &xs, 0))];
                if let Some(zv) = fwd.get(2).copied().flatten() {
                    ops.push((lw.dev(zv, vals)?, so));
                }
                let mr = MapReduce {
                    kept: vec![true; xs.len()],
                    dims: xs.clone(),
                    operands: ops,
                    expr: format!("({q} >= {lo}.0f && {q} <= {hi}.0f) ? (double)v2 : 0.0"),
                    guard: None,
                    post: "acc".into(),
                };
                lw.emit(mr, label)?
            } else {
                let qp = (hi as f64).max(1.0);
                let expr = format!(
                    "(double)v2 * ({q} < {lo}.0f ? (double)({lo}.0f - {z}) : ({q} > {hi}.0f ? (double)({hi}.0f - {z}) : (double)__fsub_rn(rintf(__fdiv_rn(v0, v1)), __fdiv_rn(v0, v1))))"
                );
                let mr = MapReduce { dims, kept, operands, expr, guard, post: format!("acc / sqrt({count} * {qp:?})") };
                lw.emit(mr, label)?
            }
        }
        _ => return Err(unsupported(what())),
    })
}
