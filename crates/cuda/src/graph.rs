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
    /// `off`: element offsets added to `out` then each of `ins` (empty: none).
    Kernel { name: String, out: usize, ins: Vec<usize>, grid: u32, block: u32, label: String, off: Vec<usize> },
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
    /// Split-K: when above 1 (only with `batch` 1), `c` holds `split` partial products over
    /// consecutive `k / split` slices of the inner dimension (run as one batched GEMM, `sx` and
    /// `sy` unused), which a generated kernel after it sums in order (see [`split_k`]).
    pub split: usize,
    /// Element offsets into `x`, `y` and `c` where the matrices start (a slab of a batch).
    pub off: [usize; 3],
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

/// Reductions of at most this many elements per output run a thread per output (a block per
/// output would leave most of its threads idle: col2im sums a 3x3 window).
const SERIAL_REDUCTION: usize = 32;

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
    /// Kernels of [`Lowerer::emit_raw_into`] by operand count and body.
    raw_bodies: HashMap<String, String>,
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

    /// Emits a hand-shaped kernel: `body` is its code after the signature (`out`, then `p0..`
    /// for `ins`), run as `grid` blocks of 256 threads; writes a new buffer of `len` values.
    fn emit_raw(&mut self, len: usize, ins: Vec<usize>, body: &str, grid: usize, label: &str) -> usize {
        let out = self.buf(len);
        self.emit_raw_into(out, ins, body, grid, label, vec![]);
        out
    }

    /// [`Lowerer::emit_raw`] writing an existing buffer `out`, the pointers offset by `off`
    /// elements (`out` then `ins`; empty for none). A body already emitted with as many operands
    /// is launched again rather than compiled twice (the slabs of a convolution).
    fn emit_raw_into(&mut self, out: usize, ins: Vec<usize>, body: &str, grid: usize, label: &str, off: Vec<usize>) {
        let key = format!("{}\n{body}", ins.len());
        let name = match self.raw_bodies.get(&key) {
            Some(n) => n.clone(),
            None => {
                let name = format!("g{}", self.kernels);
                self.kernels += 1;
                let params: String = (0..ins.len()).map(|i| format!(", const float* __restrict__ p{i}")).collect();
                self.p.source += &format!(
                    "// {label}\nextern \"C\" __global__ void {name}(float* __restrict__ out{params}) {{\n{body}}}\n"
                );
                self.raw_bodies.insert(key, name.clone());
                name
            }
        };
        self.p.steps.push(GStep::Kernel {
            name,
            out,
            ins,
            grid: grid.max(1) as u32,
            block: 256,
            label: label.into(),
            off,
        });
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
        let (first, n0) = (self.p.source.len(), self.p.steps.len());
        let r = self.emit_wide(out, mr, label, out_len, red_len);
        // 32-bit index arithmetic where every index fits: a 64-bit division by a constant is
        // several times the instructions of a 32-bit one, and coordinate decomposition is most
        // of an element-wise kernel's work (an im2col decomposes seven coordinates per element).
        let fits = |n: usize| n < 1 << 31;
        let bufs_fit = self.p.steps[n0..].iter().all(|st| match st {
            GStep::Kernel { out, ins, .. } => std::iter::once(out).chain(ins).all(|&b| fits(self.p.bufs[b])),
            GStep::Gemm(_) => true,
        });
        if r.is_ok() && bufs_fit && fits(out_len.saturating_mul(red_len)) {
            let narrowed = narrow_indices(&self.p.source[first..]);
            self.p.source.truncate(first);
            self.p.source += &narrowed;
        }
        r
    }

    fn emit_wide(&mut self, out: usize, mr: MapReduce, label: &str, out_len: usize, red_len: usize) -> Result<()> {
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
        // Only the operands the expression reads as `v{i}` are loaded up front; an expression may
        // also read `p{i}[...]` itself where a load must wait for a test (Concat, Gather).
        let text = format!("{} {}", mr.expr, mr.guard.as_deref().unwrap_or(""));
        let loads: String = mr
            .operands
            .iter()
            .enumerate()
            .filter(|(i, _)| refs(&text, &format!("v{i}")))
            .map(|(i, (_, off))| format!("    float v{i} = p{i}[{off}];\n"))
            .collect();
        let value = |body: &str| match &mr.guard {
            Some(g) => format!("    if ({g}) {{\n{loads}    {body}\n    }}\n"),
            None => format!("{loads}    {body}\n"),
        };
        let ins: Vec<usize> = mr.operands.iter().map(|o| o.0).collect();
        let head = |s: &mut String, o: &str| {
            *s += &format!("  long long o = {o};\n");
            if !coords.is_empty() {
                *s += &format!("  long long {};\n", coords.join(", "));
            }
            *s += &decompose("o", true);
        };
        // Short sums, and medium ones with outputs enough to fill the GPU, run a thread per
        // output: neighbouring threads then read neighbouring elements wherever the innermost
        // dimension is kept (a blocked weight quantizer's step gradient sums 64 rows of a column
        // per output; a block per output would read them 64 cache lines apart).
        if red_len <= SERIAL_REDUCTION || (red_len <= 1024 && out_len >= 16384) {
            // A thread per output, the reduced elements (if any) summed in order.
            s += &format!("  if ((long long)blockIdx.x * blockDim.x + threadIdx.x >= {out_len}LL) return;\n");
            head(&mut s, "(long long)blockIdx.x * blockDim.x + threadIdx.x");
            s += "  double acc = 0.0;\n";
            if red_len == 1 {
                s += &value(&format!("acc = (double)({});", mr.expr));
            } else {
                s += &format!("  for (long long r = 0; r < {red_len}LL; r++) {{\n");
                s += &decompose("r", false).replace("\n  ", "\n    ");
                s += &value(&format!("acc += (double)({});", mr.expr));
                s += "  }\n";
            }
            s += &format!("  out[o] = (float)({});\n}}\n", mr.post);
            self.p.source += &s;
            let grid = out_len.div_ceil(256) as u32;
            self.p.steps.push(GStep::Kernel { name, out, ins, grid, block: 256, label: label.into(), off: vec![] });
            return Ok(());
        }
        // Blocks of 256 threads over the reduced elements; with few outputs, each output's
        // elements split over `parts` blocks whose double partial sums a second kernel adds in
        // order (deterministic either way).
        let parts = if out_len >= 1024 { 1 } else { red_len.div_ceil(8192).min(4096usize.div_ceil(out_len)).max(1) };
        let chunk = red_len.div_ceil(parts);
        head(&mut s, &format!("blockIdx.x / {parts}LL"));
        s += &format!(
            "  long long lo = (blockIdx.x % {parts}LL) * {chunk}LL, hi = min(lo + {chunk}LL, {red_len}LL);\n\
             double acc = 0.0;\n  for (long long r = lo + threadIdx.x; r < hi; r += blockDim.x) {{\n"
        );
        s += &decompose("r", false).replace("\n  ", "\n    ");
        s += &value(&format!("acc += (double)({});", mr.expr));
        s += "  }\n  __shared__ double sh[256];\n  sh[threadIdx.x] = acc;\n  __syncthreads();\n";
        s += "  for (int w = 128; w > 0; w >>= 1) {\n    if (threadIdx.x < w) sh[threadIdx.x] += sh[threadIdx.x + w];\n    __syncthreads();\n  }\n";
        if parts == 1 {
            s += &format!("  if (threadIdx.x == 0) {{ acc = sh[0]; out[o] = (float)({}); }}\n}}\n", mr.post);
            self.p.source += &s;
            self.p.steps.push(GStep::Kernel {
                name,
                out,
                ins,
                grid: out_len as u32,
                block: 256,
                label: label.into(),
                off: vec![],
            });
            return Ok(());
        }
        // Partial sums as doubles in a scratch buffer (two floats each; device allocations are
        // 256-byte aligned).
        s += "  if (threadIdx.x == 0) ((double*)out)[blockIdx.x] = sh[0];\n}\n";
        self.p.source += &s;
        let scratch = self.buf(2 * out_len * parts);
        self.p.steps.push(GStep::Kernel {
            name,
            out: scratch,
            ins,
            grid: (out_len * parts) as u32,
            block: 256,
            label: format!("{label} (partial sums)"),
            off: vec![],
        });
        let name2 = format!("g{}", self.kernels);
        self.kernels += 1;
        let mut t = format!(
            "// {label} (sum of partials)\nextern \"C\" __global__ void {name2}(float* __restrict__ out, const float* __restrict__ p0) {{\n\
             if ((long long)blockIdx.x * blockDim.x + threadIdx.x >= {out_len}LL) return;\n"
        );
        head(&mut t, "(long long)blockIdx.x * blockDim.x + threadIdx.x");
        t += &format!(
            "  const double* part = (const double*)p0;\n  double acc = 0.0;\n\
             for (long long k = 0; k < {parts}LL; k++) acc += part[o * {parts}LL + k];\n  out[o] = (float)({});\n}}\n",
            mr.post
        );
        self.p.source += &t;
        self.p.steps.push(GStep::Kernel {
            name: name2,
            out,
            ins: vec![scratch],
            grid: out_len.div_ceil(256) as u32,
            block: 256,
            label: label.into(),
            off: vec![],
        });
        Ok(())
    }
}

/// Kernel text with its 64-bit index arithmetic made 32-bit: `long long` becomes `int` and the
/// `LL` suffix of integer literals goes (for kernels whose every index and offset is below 2^31).
fn narrow_indices(src: &str) -> String {
    let src = src.replace("long long", "int");
    let b = src.as_bytes();
    let mut out = Vec::with_capacity(src.len());
    let mut i = 0;
    while i < b.len() {
        let literal_suffix = b[i] == b'L'
            && b.get(i + 1) == Some(&b'L')
            && i > 0
            && b[i - 1].is_ascii_digit()
            && !b.get(i + 2).is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_');
        if literal_suffix {
            i += 2;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    // Only ASCII bytes were removed: still UTF-8.
    String::from_utf8(out).unwrap_or(src)
}

/// Whether `text` names the identifier `id` (not as a prefix of a longer one: `v1` in `v10`).
fn refs(text: &str, id: &str) -> bool {
    text.match_indices(id).any(|(i, _)| {
        let before = text[..i].chars().next_back();
        let after = text[i + id.len()..].chars().next();
        !before.is_some_and(|c| c.is_alphanumeric() || c == '_')
            && !after.is_some_and(|c| c.is_alphanumeric() || c == '_')
    })
}

/// Block-wide sum and max of doubles (256 threads), shared by the row kernels.
const ROW_HELPERS: &str = r#"
__device__ double sqil_block_sum(double v, double* sh) {
  sh[threadIdx.x] = v;
  __syncthreads();
  for (int w = 128; w > 0; w >>= 1) {
    if (threadIdx.x < w) sh[threadIdx.x] += sh[threadIdx.x + w];
    __syncthreads();
  }
  double r = sh[0];
  __syncthreads();
  return r;
}
__device__ double sqil_block_max(double v, double* sh) {
  sh[threadIdx.x] = v;
  __syncthreads();
  for (int w = 128; w > 0; w >>= 1) {
    if (threadIdx.x < w) sh[threadIdx.x] = fmax(sh[threadIdx.x], sh[threadIdx.x + w]);
    __syncthreads();
  }
  double r = sh[0];
  __syncthreads();
  return r;
}
"#;

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

/// `order` with every node that reads only graph inputs and constants (a weight's quantizer)
/// moved to just before its first reader: a topological order may run all of them first, which
/// keeps every layer's quantized weight alive through the whole forward pass.
fn sink_leaf_ops(g: &Graph, order: Vec<sqil_ir::NodeId>) -> Vec<sqil_ir::NodeId> {
    let leaf = |n: sqil_ir::NodeId| matches!(g.node(n).op, Op::Input | Op::Const(_));
    let mut pending: Vec<sqil_ir::NodeId> = vec![];
    let mut out = Vec::with_capacity(order.len());
    for n in order {
        if !leaf(n) && g.inputs_of(n).iter().flatten().all(|v| leaf(v.node)) {
            pending.push(n);
            continue;
        }
        for v in g.inputs_of(n).into_iter().flatten() {
            if let Some(i) = pending.iter().position(|&p| p == v.node) {
                out.push(pending.remove(i));
            }
        }
        out.push(n);
    }
    out.extend(pending);
    out
}

/// Lowers `g` for the GPU with every symbolic input dimension set to `batch`.
pub fn lower_graph(g: &Graph, batch: usize) -> Result<GraphProgram> {
    let mut lw =
        Lowerer { p: GraphProgram::default(), kernels: 0, uploaded: HashMap::new(), raw_bodies: HashMap::new() };
    // Loaded by `Gpu::load_source`, which prepends the prelude (`FP16_CUH`: sqil_math.cuh too).
    lw.p.source = format!("// generated by sqil (crates/cuda/src/graph.rs)\n{ROW_HELPERS}");
    let mut vals: HashMap<ValueRef, Val> = HashMap::new();
    let mut types: HashMap<ValueRef, ValueType> = HashMap::new();
    let order = sink_leaf_ops(g, g.topo_order().map_err(crate::Error::Ir)?);
    for &n in &order {
        let node = g.node(n);
        let what = g.describe(n);
        let ins = g.inputs_of(n);
        let outv = ValueRef { node: n, slot: 0 };
        if vals.contains_key(&outv) {
            // Computed with a sibling (the fused quantizer gradients).
            continue;
        }
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
        if let Op::Split { axis, .. } = &node.op {
            let xv = ins[0].ok_or_else(|| unsupported(format!("{what}: no input")))?;
            let xs = known(types.get(&xv).ok_or_else(|| unsupported("untyped value"))?, &what)?;
            let ax = sqil_ir::ops::norm_axis(*axis, xs.len()).map_err(crate::Error::Ir)?;
            let x = lw.dev(xv, &vals)?;
            let mut start = 0;
            for (slot, t) in out_tys.iter().enumerate() {
                let shape = known(t, &what)?;
                let b = slab(&mut lw, x, &xs, &shape, ax, start, &format!("{what} ({slot})"))?;
                start += shape[ax];
                let v = ValueRef { node: n, slot };
                types.insert(v, ValueType::new(DType::F32, shape.iter().map(|&d| Dim::Known(d)).collect()));
                vals.insert(v, Val::Dev(b));
            }
            continue;
        }
        if let (Op::Vjp { op, wrt: 0, arity }, true) = (&node.op, matches!(node.op, Op::Vjp { .. })) {
            if let Op::Split { axis, .. } = op.as_ref() {
                // dx: each output's slab from its gradient (zero where an output has none).
                let xs = known(&out_tys[0], &what)?;
                let ax = sqil_ir::ops::norm_axis(*axis, xs.len()).map_err(crate::Error::Ir)?;
                let mut operands = vec![];
                let mut arms = vec![];
                let mut start = 0;
                for dyv in ins[*arity..].iter() {
                    let dv = dyv.ok_or_else(|| unsupported("absent"));
                    let shape = match dyv {
                        Some(v) => known(types.get(v).ok_or_else(|| unsupported("untyped value"))?, &what)?,
                        None => {
                            return Err(unsupported(format!("{what}: a Split output without a gradient on the GPU")))
                        }
                    };
                    let mut c = cs(xs.len());
                    c[ax] = format!("c{ax}-{start}LL");
                    let i = operands.len();
                    operands.push((lw.dev(dv?, &vals)?, offset(&c, &shape)));
                    start += shape[ax];
                    arms.push((start, format!("p{i}[{}]", offset(&c, &shape))));
                }
                let mut expr = "0.0f".to_string();
                for (end, load) in arms.into_iter().rev() {
                    expr = format!("(c{ax} < {end}LL ? {load} : {expr})");
                }
                let b = lw.emit(all_kept(&xs, operands, expr), &what)?;
                types.insert(outv, ValueType::new(DType::F32, xs.iter().map(|&d| Dim::Known(d)).collect()));
                vals.insert(outv, Val::Dev(b));
                continue;
            }
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
            // f32 to f32 (a half-precision model's casts once widened): the value itself.
            Op::Cast { to: DType::F32, .. }
                if ins[0].and_then(|v| types.get(&v)).is_some_and(|t| t.dtype == DType::F32) =>
            {
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
                let (lo, hi) = clip_bounds(&ins, &vals, &what)?;
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
            Op::FakeQuant { .. } => fake_quant_fwd(&mut lw, &node.op, &ins, &vals, &shape_of, &label)?,
            Op::Reduce { op: r @ (ReduceOp::Mean | ReduceOp::Sum), noop_with_empty_axes, .. } => {
                let xs = shape_of(ins[0])?;
                let x = lw.dev(ins[0].unwrap(), &vals)?;
                let axes = reduce_axes(ins.get(1).copied().flatten(), &vals, xs.len(), *noop_with_empty_axes, &what)?;
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
                    split: 1,
                    off: [0; 3],
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
                    split: 1,
                    off: [0; 3],
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
                match fused_quant_grads(&mut lw, g, n, &vals, &shape_of, &label)? {
                    Some(((mine, theirs), sibling, sib_shape)) => {
                        let sv = ValueRef { node: sibling, slot: 0 };
                        types
                            .insert(sv, ValueType::new(DType::F32, sib_shape.iter().map(|&d| Dim::Known(d)).collect()));
                        vals.insert(sv, Val::Dev(theirs));
                        mine
                    }
                    None => {
                        // The right operand of a MatMul / Gemm input gradient (dA = dY B^T): a large
                        // quantized weight is recomputed rather than kept (`REMAT_ELEMS`).
                        let reads_b = matches!(**op, Op::MatMul | Op::Gemm { .. }) && wrt == 0;
                        let remat = match fwd.get(1).copied().flatten() {
                            Some(b) if reads_b => rematerialized(&mut lw, g, b, &vals, &shape_of)?.map(|nb| (b, nb)),
                            _ => None,
                        };
                        let kept = remat.map(|(b, nb)| (b, vals.insert(b, Val::Dev(nb))));
                        let r = vjp(&mut lw, &vals, op, &fwd, wrt, dy, &dys, &oshape, &label, &shape_of);
                        if let Some((b, Some(old))) = kept {
                            vals.insert(b, old);
                        }
                        r?
                    }
                }
            }
            Op::Transpose { perm } => {
                let xs = shape_of(ins[0])?;
                let x = lw.dev(ins[0].unwrap(), &vals)?;
                transpose_fwd(&mut lw, x, &xs, &perm_of(perm, xs.len()), &label)?
            }
            Op::Concat { axis } => {
                let ax = sqil_ir::ops::norm_axis(*axis, oshape.len()).map_err(crate::Error::Ir)?;
                let mut parts = vec![];
                for v in ins.iter().flatten() {
                    let sh = shape_of(Some(*v))?;
                    if sh[ax] > 0 {
                        parts.push((lw.dev(*v, &vals)?, sh));
                    }
                }
                concat_fwd(&mut lw, &parts, ax, &oshape, &label)?
            }
            Op::Gather { axis } => {
                let xs = shape_of(ins[0])?;
                let ax = sqil_ir::ops::norm_axis(*axis, xs.len()).map_err(crate::Error::Ir)?;
                let (idx, is) = index_buffer(&mut lw, ins[1], &vals, &what)?;
                let x = lw.dev(ins[0].unwrap(), &vals)?;
                let ri = is.len();
                let ioff = offset(&(ax..ax + ri).map(|j| format!("c{j}")).collect::<Vec<_>>(), &is);
                let q = format!("((long long)p1[{ioff}] + ((long long)p1[{ioff}] < 0 ? {}LL : 0LL))", xs[ax]);
                let mut xc: Vec<String> = (0..ax).map(|j| format!("c{j}")).collect();
                xc.push(q);
                xc.extend((ax + 1..xs.len()).map(|j| format!("c{}", j + ri - 1)));
                let expr = format!("p0[{}]", offset(&xc, &xs));
                lw.emit(all_kept(&oshape, vec![(x, "0".into()), (idx, "0".into())], expr), &label)?
            }
            Op::Softmax { axis, coerce_2d: false } => {
                let xs = shape_of(ins[0])?;
                let ax = sqil_ir::ops::norm_axis(*axis, xs.len()).map_err(crate::Error::Ir)?;
                let x = lw.dev(ins[0].unwrap(), &vals)?;
                softmax_rows(&mut lw, x, None, &xs, ax, &label)
            }
            Op::LayerNorm { axis, epsilon } => {
                let xs = shape_of(ins[0])?;
                let ax = sqil_ir::ops::norm_axis(*axis, xs.len()).map_err(crate::Error::Ir)?;
                let d: usize = xs[ax..].iter().product();
                let sc = ins.get(1).copied().flatten().ok_or_else(|| unsupported(format!("{what}: no scale")))?;
                if shape_of(Some(sc))?.iter().product::<usize>() != d {
                    return Err(unsupported(format!("{what}: a broadcast LayerNorm scale on the GPU")));
                }
                let x = lw.dev(ins[0].unwrap(), &vals)?;
                let mut insb = vec![x, lw.dev(sc, &vals)?];
                let bias = match ins.get(2).copied().flatten() {
                    Some(b) => {
                        if shape_of(Some(b))?.iter().product::<usize>() != d {
                            return Err(unsupported(format!("{what}: a broadcast LayerNorm bias on the GPU")));
                        }
                        insb.push(lw.dev(b, &vals)?);
                        " + (double)p2[j]"
                    }
                    None => "",
                };
                let body = ln_stats(d, *epsilon)
                    + &format!("  for (long long j = threadIdx.x; j < {d}LL; j += 256) out[base + j] = (float)(((double)p0[base + j] - mean) * inv * (double)p1[j]{bias});\n");
                lw.emit_raw(xs.iter().product(), insb, &body, xs.iter().product::<usize>() / d.max(1), &label)
            }
            Op::Conv(c) => {
                let (xs, ws) = (shape_of(ins[0])?, shape_of(ins[1])?);
                let g = ConvGeo::of(c, &xs, &ws, &what)?;
                let (x, w) = (lw.dev(ins[0].unwrap(), &vals)?, lw.dev(ins[1].unwrap(), &vals)?);
                if g.g == 1 {
                    let bias = match ins.get(2).copied().flatten() {
                        Some(b) => Some(lw.dev(b, &vals)?),
                        None => None,
                    };
                    g.forward_slabs(&mut lw, x, w, bias, &label)?
                } else {
                    let col = g.im2col(&mut lw, x, &label)?;
                    let (m, k, cog) = (g.m(), g.k(), g.cog());
                    let y2 = g.gemm(&mut lw, col, false, w, true, (m, k, cog), (m * k, cog * k), &label);
                    // y[n, co, oh, ow] with co = group * cog + j.
                    let off = format!("((c1/{cog}LL)*{m}LL+(c0*{}LL+c2)*{}LL+c3)*{cog}LL+c1%{cog}LL", g.oh, g.ow);
                    let mut operands = vec![(y2, off)];
                    let expr = match ins.get(2).copied().flatten() {
                        Some(b) => {
                            operands.push((lw.dev(b, &vals)?, "c1".into()));
                            "__fadd_rn(v0, v1)"
                        }
                        None => "v0",
                    };
                    lw.emit(all_kept(&[g.n, g.co, g.oh, g.ow], operands, expr.into()), &format!("{label} (NCHW)"))?
                }
            }
            Op::GlobalAveragePool => {
                let xs = shape_of(ins[0])?;
                let x = lw.dev(ins[0].unwrap(), &vals)?;
                let il: usize = xs[2..].iter().product();
                let mut mr = MapReduce {
                    dims: xs.clone(),
                    kept: (0..xs.len()).map(|j| j < 2).collect(),
                    operands: vec![(x, bcast_off(&xs, &xs, 0))],
                    expr: "v0".into(),
                    guard: None,
                    post: String::new(),
                };
                mr.post = format!("acc / {il}.0");
                lw.emit(mr, &label)?
            }
            Op::BatchNorm { epsilon, training: false, .. } => {
                let xs = shape_of(ins[0])?;
                let mut operands = vec![(lw.dev(ins[0].unwrap(), &vals)?, bcast_off(&xs, &xs, 0))];
                for i in 1..5 {
                    let v = ins
                        .get(i)
                        .copied()
                        .flatten()
                        .ok_or_else(|| unsupported(format!("{what}: input {i} absent")))?;
                    operands.push((lw.dev(v, &vals)?, "c1".into()));
                }
                let expr = format!(
                    "((double)v0 - (double)v3) / sqrt((double)v4 + (double){}) * (double)v1 + (double)v2",
                    cu_f32(*epsilon)
                );
                lw.emit(all_kept(&xs, operands, expr), &label)?
            }
            Op::PRelu => {
                let (xs, ss) = (shape_of(ins[0])?, shape_of(ins[1])?);
                let (x, sl) = (lw.dev(ins[0].unwrap(), &vals)?, lw.dev(ins[1].unwrap(), &vals)?);
                lw.emit(map(&xs, vec![(x, &xs), (sl, &ss)], "v0 < 0.0f ? __fmul_rn(v1, v0) : v0".into()), &label)?
            }
            Op::MaxPool(pa) => {
                let xs = shape_of(ins[0])?;
                let x = lw.dev(ins[0].unwrap(), &vals)?;
                let pg = PoolGeo::of(pa, &xs, &oshape, &what)?;
                lw.emit_raw(
                    oshape.iter().product(),
                    vec![x],
                    &pg.max_fwd(),
                    oshape.iter().product::<usize>().div_ceil(256),
                    &label,
                )
            }
            Op::AveragePool(pa) => {
                let xs = shape_of(ins[0])?;
                let x = lw.dev(ins[0].unwrap(), &vals)?;
                let pg = PoolGeo::of(pa, &xs, &oshape, &what)?;
                pg.plain_average(&what)?;
                lw.emit_raw(
                    oshape.iter().product(),
                    vec![x],
                    &pg.avg_fwd(),
                    oshape.iter().product::<usize>().div_ceil(256),
                    &label,
                )
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
    split_k(&mut lw);
    let mut p = lw.p;
    reuse_buffers(&mut p);
    Ok(p)
}

/// Output tiles below which a GEMM is split along k (cuBLAS runs a GEMM's output tiles, about
/// 128 x 128 for fp32, one per SM: a policy's few rows against a long inner dimension, as in a
/// VLA layer's input gradient `[128, 4096] x [4096, 11008]^T` or a convolution's weight gradient
/// summed over every pixel of the batch, leave most of a large GPU idle).
const SPLIT_K_TILES: usize = 256;

/// Floats in one slab of an ungrouped convolution's columns (64 MiB): the batch is lowered in
/// slabs of images so that the columns, gigabytes for a whole image batch, never exist at once.
const SLAB_FLOATS: usize = 1 << 24;

/// Rewrites single GEMMs with few output tiles and a long inner dimension as split-K: the
/// partial products of `split` slices of k in one batched GEMM into a scratch buffer, then a
/// generated kernel that adds them in slice order (deterministic; the sum is reassociated,
/// within [`GRAD_TOL`] of the unsplit GEMM like any change of cuBLAS's order). Slices are at
/// least 256 long and divide k exactly (the most slices up to the target that do); the scratch
/// holds at most 64 partial products.
fn split_k(lw: &mut Lowerer) {
    let steps = std::mem::take(&mut lw.p.steps);
    for st in steps {
        let GStep::Gemm(mut g) = st else {
            lw.p.steps.push(st);
            continue;
        };
        let tiles = g.m.div_ceil(128) * g.n.div_ceil(128);
        let want = SPLIT_K_TILES.div_ceil(tiles).min(64).min(g.k / 256);
        let split = (2..=want).rev().find(|&s| g.k.is_multiple_of(s)).unwrap_or(1);
        if g.batch != 1 || g.off != [0; 3] || split < 2 {
            lw.p.steps.push(GStep::Gemm(g));
            continue;
        }
        let (c, len) = (g.c, g.m * g.n);
        let scratch = lw.buf(split * len);
        let accumulate = g.beta != 0.0;
        let label = g.label.clone();
        g.c = scratch;
        g.beta = 0.0;
        g.split = split;
        lw.p.steps.push(GStep::Gemm(g));
        let name = format!("g{}", lw.kernels);
        lw.kernels += 1;
        let start = if accumulate { "out[i]" } else { "0.0f" };
        lw.p.source += &format!(
            "// {label} (sum of {split} split-K slices)\n\
             extern \"C\" __global__ void {name}(float* __restrict__ out, const float* __restrict__ p0) {{\n\
             long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;\n  if (i >= {len}LL) return;\n\
             float acc = {start};\n  for (int s = 0; s < {split}; s++) acc = __fadd_rn(acc, p0[i + s * {len}LL]);\n\
             out[i] = acc;\n}}\n"
        );
        lw.p.steps.push(GStep::Kernel {
            name,
            out: c,
            ins: vec![scratch],
            grid: len.div_ceil(256) as u32,
            block: 256,
            label: format!("{label} (split-K sum)"),
            off: vec![],
        });
    }
}

/// Shares device buffers between values whose lifetimes do not overlap (greedy by size, best
/// fit): a value's buffer is taken at the first step that touches it and
/// given back after the last. Constants, inputs and outputs keep buffers of their own; a step's
/// result never shares with a buffer the same step reads (results are placed before the
/// step's dead inputs are given back).
pub fn reuse_buffers(p: &mut GraphProgram) {
    let n = p.bufs.len();
    let mut pinned = vec![false; n];
    for &(b, _) in &p.consts {
        pinned[b] = true;
    }
    for (_, b, _) in &p.inputs {
        pinned[*b] = true;
    }
    for (b, _) in &p.outputs {
        pinned[*b] = true;
    }
    let touched = |s: &GStep| -> Vec<usize> {
        match s {
            GStep::Kernel { out, ins, .. } => std::iter::once(*out).chain(ins.iter().copied()).collect(),
            GStep::Gemm(g) => vec![g.c, g.x, g.y],
        }
    };
    let (mut first, mut last) = (vec![usize::MAX; n], vec![0usize; n]);
    for (i, s) in p.steps.iter().enumerate() {
        for b in touched(s) {
            first[b] = first[b].min(i);
            last[b] = last[b].max(i);
        }
    }
    // Physical buffers: the pinned ones as they are, then shared ones.
    let mut phys: Vec<usize> = vec![];
    let mut map = vec![usize::MAX; n];
    for b in 0..n {
        if pinned[b] || first[b] == usize::MAX {
            map[b] = phys.len();
            phys.push(p.bufs[b]);
        }
    }
    // Greedy by size: the largest values first, each into the best-fitting shared buffer whose
    // values' lifetimes it does not overlap (a step's result and the values it reads overlap at
    // that step, so they never share), else a new buffer of its size. A buffer is never grown
    // after a larger value: placing in step order instead let a small, long-lived activation
    // take (and keep) a buffer grown for a large, short-lived one.
    let mut order: Vec<usize> = (0..n).filter(|&b| map[b] == usize::MAX).collect();
    order.sort_by_key(|&b| (std::cmp::Reverse(p.bufs[b]), first[b]));
    let mut lives: HashMap<usize, Vec<(usize, usize)>> = HashMap::new();
    for b in order {
        let (need, life) = (p.bufs[b], (first[b], last[b]));
        let pick = lives
            .iter()
            .filter(|(&f, ls)| phys[f] >= need && ls.iter().all(|&(a, z)| z < life.0 || life.1 < a))
            .min_by_key(|(&f, _)| (phys[f], f))
            .map(|(&f, _)| f);
        let f = pick.unwrap_or_else(|| {
            phys.push(need);
            phys.len() - 1
        });
        lives.entry(f).or_default().push(life);
        map[b] = f;
    }
    for s in &mut p.steps {
        match s {
            GStep::Kernel { out, ins, .. } => {
                *out = map[*out];
                ins.iter_mut().for_each(|b| *b = map[*b]);
            }
            GStep::Gemm(g) => {
                g.c = map[g.c];
                g.x = map[g.x];
                g.y = map[g.y];
            }
        }
    }
    p.consts.iter_mut().for_each(|(b, _)| *b = map[*b]);
    p.inputs.iter_mut().for_each(|(_, b, _)| *b = map[*b]);
    p.outputs.iter_mut().for_each(|(b, _)| *b = map[*b]);
    p.bufs = phys;
}

/// Clip's bounds (inputs 1 and 2 of `ins`), known on the host; absent ones unbounded.
fn clip_bounds(ins: &[Option<ValueRef>], vals: &HashMap<ValueRef, Val>, what: &str) -> Result<(f32, f32)> {
    let bound = |i: usize, d: f32| -> Result<f32> {
        match ins.get(i).copied().flatten() {
            None => Ok(d),
            Some(v) => match vals.get(&v) {
                Some(Val::Host(t)) => Ok(t.data.to_f32_vec()[0]),
                _ => Err(unsupported(format!("{what}: Clip bounds computed on the device (on the GPU)"))),
            },
        }
    };
    Ok((bound(1, f32::NEG_INFINITY)?, bound(2, f32::INFINITY)?))
}

/// A Reduce's axes from its `axes` input (known on the host), normalised against `rank`.
fn reduce_axes(
    v: Option<ValueRef>,
    vals: &HashMap<ValueRef, Val>,
    rank: usize,
    noop_with_empty_axes: bool,
    what: &str,
) -> Result<Vec<usize>> {
    match v.map(|v| vals.get(&v)) {
        Some(Some(Val::Host(t))) => t
            .data
            .to_i64_vec()
            .iter()
            .map(|&a| sqil_ir::ops::norm_axis(a, rank))
            .collect::<std::result::Result<_, _>>()
            .map_err(crate::Error::Ir),
        Some(_) => Err(unsupported(format!("{what}: Reduce axes computed on the device (on the GPU)"))),
        None if noop_with_empty_axes => Ok(vec![]),
        None => Ok((0..rank).collect()),
    }
}

struct MatMulGeo {
    m: usize,
    k: usize,
    n: usize,
    nb: usize,
    sa: usize,
    sb: usize,
}

/// Batched MatMul as strided GEMMs: equal batch dims, or a rank-2 operand shared by all (a
/// shared right operand folds the batch into the rows).
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
    let (sa, sb) = (stride(a, m * k)?, stride(b, k * n)?);
    if sb == 0 && sa != 0 {
        // A batch of row blocks against one shared matrix (a linear layer over tokens): one
        // GEMM over the stacked rows, not `nb` GEMMs of a few rows that each read all of B.
        return Some(MatMulGeo { m: nb * m, k, n, nb: 1, sa: 0, sb: 0 });
    }
    Some(MatMulGeo { m, k, n, nb, sa, sb })
}

/// FakeQuant forward: element-wise over x, the CPU's arithmetic bit for bit.
fn fake_quant_fwd(
    lw: &mut Lowerer,
    op: &Op,
    ins: &[Option<ValueRef>],
    vals: &HashMap<ValueRef, Val>,
    shape_of: &dyn Fn(Option<ValueRef>) -> Result<Vec<usize>>,
    label: &str,
) -> Result<usize> {
    let Op::FakeQuant { bits, signed, axis, block_size } = op else { return Err(unsupported("not a FakeQuant")) };
    let (Some(xv), Some(sv)) = (ins.first().copied().flatten(), ins.get(1).copied().flatten()) else {
        return Err(unsupported(format!("{label}: FakeQuant without its input or scale")));
    };
    let (xs, ss) = (shape_of(Some(xv))?, shape_of(Some(sv))?);
    let (x, s) = (lw.dev(xv, vals)?, lw.dev(sv, vals)?);
    let (lo, hi) = sqil_ir::ops::quant::fake_quant_range(*bits, *signed);
    let so = scale_off_in_x(&xs, &ss, *axis, *block_size)?;
    let mut operands = vec![(x, bcast_off(&xs, &xs, 0)), (s, so.clone())];
    let z = match ins.get(2).copied().flatten() {
        Some(zv) => {
            operands.push((lw.dev(zv, vals)?, so));
            "v2"
        }
        None => "0.0f",
    };
    let expr = format!(
        "__fmul_rn(__fsub_rn(fminf(fmaxf(__fadd_rn(rintf(__fdiv_rn(v0, v1)), {z}), {lo}.0f), {hi}.0f), {z}), v1)"
    );
    let mr =
        MapReduce { dims: xs.clone(), kept: vec![true; xs.len()], operands, expr, guard: None, post: "acc".into() };
    lw.emit(mr, label)
}

/// Quantized weights of at least this many elements are fake-quantized again where the backward
/// pass reads them rather than kept from the forward pass (what torch.compile's partitioner
/// does too): one element-wise pass more, a weight-sized buffer less per layer for the whole
/// step (a VLA layer's 0.8 GB). Smaller ones are kept.
const REMAT_ELEMS: usize = 1 << 20;

/// If `v` is a large FakeQuant of parameters (graph inputs or constants, alive all step anyway),
/// the FakeQuant emitted again here, as the backward pass's own copy.
fn rematerialized(
    lw: &mut Lowerer,
    g: &Graph,
    v: ValueRef,
    vals: &HashMap<ValueRef, Val>,
    shape_of: &dyn Fn(Option<ValueRef>) -> Result<Vec<usize>>,
) -> Result<Option<usize>> {
    let node = g.node(v.node);
    if !matches!(node.op, Op::FakeQuant { .. }) || shape_of(Some(v))?.iter().product::<usize>() < REMAT_ELEMS {
        return Ok(None);
    }
    let ins = g.inputs_of(v.node);
    let leaf = |u: &Option<ValueRef>| u.is_none_or(|u| matches!(g.node(u.node).op, Op::Input | Op::Const(_)));
    if !ins.iter().all(leaf) {
        return Ok(None);
    }
    let label = format!("{} (again for the backward pass)", g.describe(v.node));
    fake_quant_fwd(lw, &node.op, &ins, vals, shape_of, &label).map(Some)
}

/// A weight quantizer's two gradients in one pass, when the graph asks for both: node `n` is the
/// `Vjp` of a blocked FakeQuant (no zero point) whose output gradient `dy` feeds only it and its
/// sibling (the same inputs, the other `wrt`), with a block of scales or more and blocks of at
/// most 1024 (a thread per scale, as the separate step-gradient kernel runs such weights; where
/// the innermost axis is not blocked neighbouring threads read neighbouring elements). One kernel walks
/// each scale's block once: the input gradient (`dy` where the quantizer is not clipped, the
/// straight-through estimator) written over `dy` in place, and the LSQ step gradient summed in
/// the same order as the separate kernel. Two of the five passes over a weight-sized tensor and
/// one weight-sized buffer saved (a VLA layer's 0.8 GB). Returns ((this node's result, the
/// sibling's), the sibling, its shape).
#[allow(clippy::type_complexity)]
fn fused_quant_grads(
    lw: &mut Lowerer,
    g: &Graph,
    n: sqil_ir::NodeId,
    vals: &HashMap<ValueRef, Val>,
    shape_of: &dyn Fn(Option<ValueRef>) -> Result<Vec<usize>>,
    label: &str,
) -> Result<Option<((usize, usize), sqil_ir::NodeId, Vec<usize>)>> {
    let Op::Vjp { op, wrt, arity } = &g.node(n).op else { return Ok(None) };
    let Op::FakeQuant { bits, signed, axis, block_size } = &**op else { return Ok(None) };
    let ins = g.inputs_of(n);
    if *wrt > 1 || *arity != 2 || ins.len() != 3 || *block_size <= 0 {
        return Ok(None);
    }
    let (Some(xv), Some(sv), Some(dyv)) = (ins[0], ins[1], ins[2]) else { return Ok(None) };
    let uses = g.uses_of(dyv);
    let sibling = match uses.as_slice() {
        [(a, _), (b, _)] if *a == n || *b == n => {
            if *a == n {
                *b
            } else {
                *a
            }
        }
        _ => return Ok(None),
    };
    let same = matches!(&g.node(sibling).op, Op::Vjp { op: o2, wrt: w2, arity: 2 } if o2 == op && *w2 == 1 - *wrt);
    if !same || g.inputs_of(sibling) != ins || g.outputs.contains(&dyv) {
        return Ok(None);
    }
    // dy's buffer is overwritten: it must be a computed value's own (not an input, a constant,
    // or shared with an alias).
    let Some(Val::Dev(db)) = vals.get(&dyv) else { return Ok(None) };
    let db = *db;
    let shared = vals.iter().any(|(v, val)| *v != dyv && matches!(val, Val::Dev(b) if *b == db));
    if shared || lw.p.inputs.iter().any(|(_, b, _)| *b == db) || lw.p.consts.iter().any(|(b, _)| *b == db) {
        return Ok(None);
    }
    let (xs, ss) = (shape_of(Some(xv))?, shape_of(Some(sv))?);
    let (dims, kept, xo, so, guard, count) = quant_space(&xs, &ss, *axis, *block_size)?;
    let out_len: usize = dims.iter().zip(&kept).filter(|(_, k)| **k).map(|(d, _)| d).product();
    let red_len: usize = dims.iter().zip(&kept).filter(|(_, k)| !**k).map(|(d, _)| d).product();
    if guard.is_some() || out_len < 256 || red_len > 1024 {
        return Ok(None);
    }
    let (x, s) = (lw.dev(xv, vals)?, lw.dev(sv, vals)?);
    let (lo, hi) = sqil_ir::ops::quant::fake_quant_range(*bits, *signed);
    let qp = (hi as f64).max(1.0);
    let decompose = |idx: &str, which: bool| -> String {
        let mut t = format!("  {{ long long t = {idx};\n");
        for j in (0..dims.len()).rev().filter(|&j| kept[j] == which) {
            t += &format!("  c{j} = t % {}LL; t /= {}LL;\n", dims[j], dims[j]);
        }
        t + "  }\n"
    };
    let coords: Vec<String> = (0..dims.len()).map(|j| format!("c{j} = 0")).collect();
    let mut body = format!(
        "  long long o = (long long)blockIdx.x * blockDim.x + threadIdx.x;\n  if (o >= {out_len}LL) return;\n  long long {};\n",
        coords.join(", ")
    );
    body += &decompose("o", true);
    body += &format!("  float* ds = (float*)p2;\n  const float v1 = p1[{so}];\n  double acc = 0.0;\n");
    body += &format!("  for (long long r = 0; r < {red_len}LL; r++) {{\n");
    body += &decompose("r", false);
    body += &format!(
        "    long long i = {xo};\n    float v0 = p0[i], v2 = out[i];\n\
         float q = __fadd_rn(rintf(__fdiv_rn(v0, v1)), 0.0f);\n\
         acc += (double)v2 * (q < {lo}.0f ? (double)({lo}.0f) : (q > {hi}.0f ? (double)({hi}.0f) : (double)__fsub_rn(rintf(__fdiv_rn(v0, v1)), __fdiv_rn(v0, v1))));\n\
         out[i] = (q >= {lo}.0f && q <= {hi}.0f) ? v2 : 0.0f;\n  }}\n\
         ds[o] = (float)(acc / sqrt({count} * {qp:?}));\n"
    );
    let ds = lw.buf(ss.iter().product());
    let narrow = [xs.iter().product::<usize>(), out_len * red_len].iter().all(|&v| v < 1 << 31);
    let body = if narrow { narrow_indices(&body) } else { body };
    lw.emit_raw_into(
        db,
        vec![x, s, ds],
        &body,
        out_len.div_ceil(256),
        &format!("{label} (both quantizer gradients)"),
        vec![],
    );
    let (mine, theirs, sib_shape) = if *wrt == 0 { (db, ds, ss) } else { (ds, db, xs) };
    Ok(Some(((mine, theirs), sibling, sib_shape)))
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
        // Only f32 -> f32 Casts reach the backward pass (the forward lowering takes no other).
        Op::Cast { to: DType::F32, .. } if wrt == 0 => dy,
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
            let (lo, hi) = clip_bounds(fwd, vals, label)?;
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
            let axes = reduce_axes(fwd.get(1).copied().flatten(), vals, xs.len(), *noop_with_empty_axes, label)?;
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
                split: 1,
                off: [0; 3],
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
                    split: 1,
                    off: [0; 3],
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
                    split: 1,
                    off: [0; 3],
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
                    split: 1,
                    off: [0; 3],
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
        Op::Transpose { perm } if wrt == 0 => {
            let xs = shape_of(Some(input(0)?))?;
            let p = perm_of(perm, xs.len());
            let ys: Vec<usize> = p.iter().map(|&a| xs[a]).collect();
            // dx at x coordinates: dy at y coordinate j = x coordinate perm[j].
            let yc: Vec<String> = p.iter().map(|&a| format!("c{a}")).collect();
            lw.emit(all_kept(&xs, vec![(dy, offset(&yc, &ys))], "v0".into()), label)?
        }
        Op::Concat { axis } => {
            let ax = sqil_ir::ops::norm_axis(*axis, dys.len()).map_err(crate::Error::Ir)?;
            let mut start = 0;
            for v in fwd[..wrt].iter().flatten() {
                start += shape_of(Some(*v))?[ax];
            }
            slab(lw, dy, dys, oshape, ax, start, label)?
        }
        Op::Gather { axis } if wrt == 0 => {
            let xs = shape_of(Some(input(0)?))?;
            let ax = sqil_ir::ops::norm_axis(*axis, xs.len()).map_err(crate::Error::Ir)?;
            let (idx, is) = index_buffer(lw, fwd.get(1).copied().flatten(), vals, &what())?;
            let nidx: usize = is.iter().product();
            let r = xs.len();
            let mut dims = xs.clone();
            dims.push(nidx);
            let mut kept = vec![true; r];
            kept.push(false);
            let mut flat = xs.clone();
            flat[ax] = nidx;
            let mut dc = cs(r);
            dc[ax] = format!("c{r}");
            let q = format!("((long long)p0[c{r}] + ((long long)p0[c{r}] < 0 ? {}LL : 0LL))", xs[ax]);
            let mr = MapReduce {
                dims,
                kept,
                operands: vec![(idx, format!("c{r}")), (dy, offset(&dc, &flat))],
                expr: "(double)v1".into(),
                guard: Some(format!("{q} == c{ax}")),
                post: "acc".into(),
            };
            lw.emit(mr, label)?
        }
        Op::Softmax { axis, coerce_2d: false } if wrt == 0 => {
            let xs = shape_of(Some(input(0)?))?;
            let ax = sqil_ir::ops::norm_axis(*axis, xs.len()).map_err(crate::Error::Ir)?;
            let x = lw.dev(input(0)?, vals)?;
            softmax_rows(lw, x, Some(dy), &xs, ax, label)
        }
        Op::LayerNorm { axis, epsilon } if wrt <= 2 => {
            let xs = shape_of(Some(input(0)?))?;
            let ax = sqil_ir::ops::norm_axis(*axis, xs.len()).map_err(crate::Error::Ir)?;
            let d: usize = xs[ax..].iter().product();
            let rows = xs.iter().product::<usize>() / d.max(1);
            let x = lw.dev(input(0)?, vals)?;
            let sc = lw.dev(input(1)?, vals)?;
            if wrt == 0 {
                let body = ln_stats(d, *epsilon)
                    + &format!(
                        "  double m1 = 0.0, m2 = 0.0;\n\
                         for (long long j = threadIdx.x; j < {d}LL; j += 256) {{ double g = (double)p2[base + j] * (double)p1[j]; m1 += g; m2 += g * ((double)p0[base + j] - mean) * inv; }}\n\
                         m1 = sqil_block_sum(m1, sh) / {d}.0;\n  m2 = sqil_block_sum(m2, sh) / {d}.0;\n\
                         for (long long j = threadIdx.x; j < {d}LL; j += 256) {{ double g = (double)p2[base + j] * (double)p1[j]; double xh = ((double)p0[base + j] - mean) * inv; out[base + j] = (float)(inv * (g - m1 - xh * m2)); }}\n"
                    );
                lw.emit_raw(xs.iter().product(), vec![x, sc, dy], &body, rows, label)
            } else {
                let stats_body = ln_stats(d, *epsilon) + "  if (threadIdx.x == 0) { out[2 * blockIdx.x] = (float)mean; out[2 * blockIdx.x + 1] = (float)inv; }\n";
                let stats = lw.emit_raw(2 * rows, vec![x], &stats_body, rows, &format!("{label} (row statistics)"));
                let expr = if wrt == 1 { "(double)v1 * ((double)v0 - (double)v2) * (double)v3" } else { "(double)v1" };
                let mr = MapReduce {
                    dims: vec![rows, d],
                    kept: vec![false, true],
                    operands: vec![
                        (x, format!("c0*{d}LL+c1")),
                        (dy, format!("c0*{d}LL+c1")),
                        (stats, "2*c0".into()),
                        (stats, "2*c0+1".into()),
                    ],
                    expr: expr.into(),
                    guard: None,
                    post: "acc".into(),
                };
                lw.emit(mr, label)?
            }
        }
        Op::Conv(c) if wrt <= 2 => {
            let (xs, ws) = (shape_of(Some(input(0)?))?, shape_of(Some(input(1)?))?);
            let g = ConvGeo::of(c, &xs, &ws, label)?;
            if wrt == 2 {
                let mr = MapReduce {
                    dims: dys.to_vec(),
                    kept: vec![false, true, false, false],
                    operands: vec![(dy, bcast_off(dys, dys, 0))],
                    expr: "(double)v0".into(),
                    guard: None,
                    post: "acc".into(),
                };
                return lw.emit(mr, label);
            }
            if g.g == 1 {
                return if wrt == 1 {
                    let x = lw.dev(input(0)?, vals)?;
                    g.weight_grad_slabs(lw, x, dy, label)
                } else {
                    let w = lw.dev(input(1)?, vals)?;
                    Ok(g.input_grad_slabs(lw, w, dy, label))
                };
            }
            let dy2 = g.rows(lw, dy, label)?;
            let (m, k, cog) = (g.m(), g.k(), g.cog());
            if wrt == 1 {
                // dW[group] = dy2[group]^T col[group]: [cog, k] per group, W's layout.
                let x = lw.dev(input(0)?, vals)?;
                let col = g.im2col(lw, x, label)?;
                g.gemm(lw, dy2, true, col, false, (cog, m, k), (m * cog, m * k), label)
            } else {
                let w = lw.dev(input(1)?, vals)?;
                let dcol = g.gemm(lw, dy2, false, w, false, (m, cog, k), (m * cog, cog * k), label);
                // col2im: every (kh, kw) whose window row and column land on an output position.
                let cg = g.c / g.g;
                let th = format!("(c2+{}LL-c4*{}LL)", g.p[0], g.d[0]);
                let tw = format!("(c3+{}LL-c5*{}LL)", g.p[1], g.d[1]);
                let guard = format!(
                    "{th} >= 0 && {th} % {s0}LL == 0 && {th} / {s0}LL < {}LL && {tw} >= 0 && {tw} % {s1}LL == 0 && {tw} / {s1}LL < {}LL",
                    g.oh,
                    g.ow,
                    s0 = g.s[0],
                    s1 = g.s[1]
                );
                let off = format!(
                    "((c1/{cg}LL)*{m}LL+(c0*{}LL+{th}/{}LL)*{}LL+{tw}/{}LL)*{k}LL+((c1%{cg}LL)*{}LL+c4)*{}LL+c5",
                    g.oh, g.s[0], g.ow, g.s[1], g.kh, g.kw
                );
                let mr = MapReduce {
                    dims: vec![g.n, g.c, g.h, g.w, g.kh, g.kw],
                    kept: vec![true, true, true, true, false, false],
                    operands: vec![(dcol, off)],
                    expr: "(double)v0".into(),
                    guard: Some(guard),
                    post: "acc".into(),
                };
                lw.emit(mr, &format!("{label} (col2im)"))?
            }
        }
        Op::GlobalAveragePool if wrt == 0 => {
            let xs = shape_of(Some(input(0)?))?;
            let il: usize = xs[2..].iter().product();
            let mut ks = xs[..2].to_vec();
            ks.extend(std::iter::repeat_n(1, xs.len() - 2));
            lw.emit(map(&xs, vec![(dy, &ks)], format!("(double)v0 / {il}.0")), label)?
        }
        Op::BatchNorm { epsilon, training: false, .. } if wrt == 0 => {
            let xs = shape_of(Some(input(0)?))?;
            let sc = lw.dev(input(1)?, vals)?;
            let var = lw.dev(input(4)?, vals)?;
            let operands = vec![(sc, "c1".into()), (var, "c1".into()), (dy, bcast_off(&xs, &xs, 0))];
            let expr = format!("(double)v2 * (double)v0 / sqrt((double)v1 + (double){})", cu_f32(*epsilon));
            lw.emit(all_kept(&xs, operands, expr), label)?
        }
        Op::PRelu if wrt <= 1 => {
            let (xs, ss) = (shape_of(Some(input(0)?))?, shape_of(Some(input(1)?))?);
            let (x, sl) = (lw.dev(input(0)?, vals)?, lw.dev(input(1)?, vals)?);
            let operands =
                vec![(x, bcast_off(&xs, &xs, 0)), (sl, bcast_off(&ss, &xs, 0)), (dy, bcast_off(&xs, &xs, 0))];
            if wrt == 0 {
                lw.emit(all_kept(&xs, operands, "v0 < 0.0f ? (double)v2 * (double)v1 : (double)v2".into()), label)?
            } else {
                let mr = MapReduce {
                    dims: xs.clone(),
                    kept: unbroadcast_kept(&xs, &ss)?,
                    operands,
                    expr: "v0 < 0.0f ? (double)v2 * (double)v0 : 0.0".into(),
                    guard: None,
                    post: "acc".into(),
                };
                lw.emit(mr, label)?
            }
        }
        Op::MaxPool(pa) if wrt == 0 => {
            let xs = shape_of(Some(input(0)?))?;
            let x = lw.dev(input(0)?, vals)?;
            let pg = PoolGeo::of(pa, &xs, dys, label)?;
            lw.emit_raw(
                xs.iter().product(),
                vec![x, dy],
                &pg.max_vjp(),
                xs.iter().product::<usize>().div_ceil(256),
                label,
            )
        }
        Op::AveragePool(pa) if wrt == 0 => {
            let xs = shape_of(Some(input(0)?))?;
            let pg = PoolGeo::of(pa, &xs, dys, label)?;
            pg.plain_average(label)?;
            lw.emit_raw(xs.iter().product(), vec![dy], &pg.avg_vjp(), xs.iter().product::<usize>().div_ceil(256), label)
        }
        _ => return Err(unsupported(what())),
    })
}

/// A 2-D NCHW pooling window geometry.
struct PoolGeo {
    pl: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    k: [usize; 2],
    s: [usize; 2],
    d: [usize; 2],
    pb: [usize; 2],
    pads_zero: bool,
    ceil: bool,
}

impl PoolGeo {
    fn of(p: &sqil_ir::ops::PoolAttrs, xs: &[usize], ys: &[usize], what: &str) -> Result<PoolGeo> {
        if xs.len() != 4 || ys.len() != 4 || p.kernel_shape.len() != 2 {
            return Err(unsupported(format!("{what}: only 2-D pooling runs on the GPU")));
        }
        let (pb, pe, _) = p.geometry(&[Some(xs[2]), Some(xs[3])]).map_err(crate::Error::Ir)?;
        let two = |v: &[i64]| if v.is_empty() { [1, 1] } else { [v[0] as usize, v[1] as usize] };
        Ok(PoolGeo {
            pl: xs[0] * xs[1],
            h: xs[2],
            w: xs[3],
            oh: ys[2],
            ow: ys[3],
            k: [p.kernel_shape[0] as usize, p.kernel_shape[1] as usize],
            s: two(&p.strides),
            d: two(&p.dilations),
            pb: [pb[0].max(0) as usize, pb[1].max(0) as usize],
            pads_zero: pb.iter().chain(&pe).all(|&v| v == 0),
            ceil: p.ceil_mode,
        })
    }

    /// Averages over full windows only (no padding, no ceil-mode overhang): the divisor is the
    /// window size whatever `count_include_pad` says.
    fn plain_average(&self, what: &str) -> Result<()> {
        if !self.pads_zero || self.ceil {
            return Err(unsupported(format!("{what}: AveragePool with padding or ceil mode on the GPU")));
        }
        Ok(())
    }

    /// The window of output `(oh, ow)` visits `(ih, iw)` for kernel offsets `(kh, kw)`.
    fn window(&self) -> String {
        format!(
            "      long long ih = oh * {}LL - {}LL + kh * {}LL, iw = ow * {}LL - {}LL + kw * {}LL;\n",
            self.s[0], self.pb[0], self.d[0], self.s[1], self.pb[1], self.d[1]
        )
    }

    fn out_index(&self) -> String {
        format!(
            "  long long o = (long long)blockIdx.x * 256 + threadIdx.x;\n  if (o >= {}LL) return;\n\
             long long ow = o % {ow}LL, oh = (o / {ow}LL) % {}LL, pl = o / {};\n",
            self.pl * self.oh * self.ow,
            self.oh,
            self.oh * self.ow,
            ow = self.ow
        )
    }

    fn max_fwd(&self) -> String {
        format!(
            "{}  double best = 0.0; int found = 0;\n  for (long long kh = 0; kh < {}LL; kh++) for (long long kw = 0; kw < {}LL; kw++) {{\n{}\
             if (ih < 0 || ih >= {h}LL || iw < 0 || iw >= {w}LL) continue;\n\
             double v = (double)p0[pl * {}LL + ih * {w}LL + iw];\n      if (!found || v > best) {{ best = v; found = 1; }}\n  }}\n\
             out[o] = (float)best;\n",
            self.out_index(),
            self.k[0],
            self.k[1],
            self.window(),
            self.h * self.w,
            h = self.h,
            w = self.w
        )
    }

    /// The loop over the windows `(oh, ow)` that cover input `(jh, jw)` (through kernel offsets
    /// `(ch, cw)`), for the gradients.
    fn covering(&self) -> String {
        format!(
            "  long long jw = i % {w}LL, jh = (i / {w}LL) % {h}LL, pl = i / {hw}LL;\n  double acc = 0.0;\n\
             for (long long ch = 0; ch < {k0}LL; ch++) for (long long cw = 0; cw < {k1}LL; cw++) {{\n\
             long long th = jh + {p0}LL - ch * {d0}LL, tw = jw + {p1}LL - cw * {d1}LL;\n\
             if (th < 0 || tw < 0 || th % {s0}LL != 0 || tw % {s1}LL != 0) continue;\n\
             long long oh = th / {s0}LL, ow = tw / {s1}LL;\n    if (oh >= {oh}LL || ow >= {ow}LL) continue;\n",
            w = self.w,
            h = self.h,
            hw = self.h * self.w,
            k0 = self.k[0],
            k1 = self.k[1],
            p0 = self.pb[0],
            p1 = self.pb[1],
            d0 = self.d[0],
            d1 = self.d[1],
            s0 = self.s[0],
            s1 = self.s[1],
            oh = self.oh,
            ow = self.ow
        )
    }

    /// dx: every window that covers this input and whose (first) maximum it is adds its dy.
    fn max_vjp(&self) -> String {
        let (h, w) = (self.h, self.w);
        format!(
            "  long long i = (long long)blockIdx.x * 256 + threadIdx.x;\n  if (i >= {}LL) return;\n{}\
             double best = 0.0; int found = 0; long long bh = -1, bw = -1;\n\
             for (long long kh = 0; kh < {k0}LL; kh++) for (long long kw = 0; kw < {k1}LL; kw++) {{\n{}\
             if (ih < 0 || ih >= {h}LL || iw < 0 || iw >= {w}LL) continue;\n\
             double v = (double)p0[pl * {hw}LL + ih * {w}LL + iw];\n      if (!found || v > best) {{ best = v; found = 1; bh = ih; bw = iw; }}\n    }}\n\
             if (bh == jh && bw == jw) acc += (double)p1[(pl * {}LL + oh) * {}LL + ow];\n  }}\n  out[i] = (float)acc;\n",
            self.pl * h * w,
            self.covering(),
            self.window(),
            self.oh,
            self.ow,
            k0 = self.k[0],
            k1 = self.k[1],
            hw = h * w
        )
    }

    fn avg_fwd(&self) -> String {
        format!(
            "{}  double acc = 0.0;\n  for (long long kh = 0; kh < {}LL; kh++) for (long long kw = 0; kw < {}LL; kw++) {{\n{}\
             acc += (double)p0[pl * {}LL + ih * {}LL + iw];\n  }}\n  out[o] = (float)(acc / {}.0);\n",
            self.out_index(),
            self.k[0],
            self.k[1],
            self.window(),
            self.h * self.w,
            self.w,
            self.k[0] * self.k[1]
        )
    }

    fn avg_vjp(&self) -> String {
        format!(
            "  long long i = (long long)blockIdx.x * 256 + threadIdx.x;\n  if (i >= {}LL) return;\n{}\
             acc += (double)p0[(pl * {}LL + oh) * {}LL + ow] / {}.0;\n  }}\n  out[i] = (float)acc;\n",
            self.pl * self.h * self.w,
            self.covering(),
            self.oh,
            self.ow,
            self.k[0] * self.k[1]
        )
    }
}

/// Gather indices as a float buffer (exact below 2^24) and their shape: host indices are
/// uploaded once; indices computed on the device are not supported.
fn index_buffer(
    lw: &mut Lowerer,
    v: Option<ValueRef>,
    vals: &HashMap<ValueRef, Val>,
    what: &str,
) -> Result<(usize, Vec<usize>)> {
    let v = v.ok_or_else(|| unsupported(format!("{what}: no indices")))?;
    match vals.get(&v) {
        Some(Val::Host(t)) => {
            if let Some(&b) = lw.uploaded.get(&v) {
                return Ok((b, t.shape.clone()));
            }
            let data: Vec<f32> = t.data.to_i64_vec().iter().map(|&i| i as f32).collect();
            if t.data.to_i64_vec().iter().any(|&i| i.unsigned_abs() >= 1 << 24) {
                return Err(unsupported(format!("{what}: indices beyond 2^24 on the GPU")));
            }
            let b = lw.buf(data.len());
            lw.p.consts.push((b, data));
            lw.uploaded.insert(v, b);
            Ok((b, t.shape.clone()))
        }
        _ => Err(unsupported(format!("{what}: indices computed on the device (Gather on the GPU)"))),
    }
}

/// Strides of `shape` as a list of (coordinate expression, stride) terms joined into an offset.
fn offset(coords: &[String], shape: &[usize]) -> String {
    let st = strides(shape);
    let t: Vec<String> =
        coords.iter().zip(&st).zip(shape).filter(|(_, &d)| d != 1).map(|((c, s), _)| format!("({c})*{s}LL")).collect();
    if t.is_empty() {
        "0".into()
    } else {
        t.join("+")
    }
}

fn cs(n: usize) -> Vec<String> {
    (0..n).map(|j| format!("c{j}")).collect()
}

fn all_kept(dims: &[usize], operands: Vec<(usize, String)>, expr: String) -> MapReduce {
    MapReduce { dims: dims.to_vec(), kept: vec![true; dims.len()], operands, expr, guard: None, post: "acc".into() }
}

fn transpose_fwd(lw: &mut Lowerer, x: usize, xs: &[usize], perm: &[usize], label: &str) -> Result<usize> {
    let ys: Vec<usize> = perm.iter().map(|&p| xs[p]).collect();
    // y coordinate j reads x coordinate perm[j].
    let mut xc = vec![String::new(); xs.len()];
    for (j, &p) in perm.iter().enumerate() {
        xc[p] = format!("c{j}");
    }
    lw.emit(all_kept(&ys, vec![(x, offset(&xc, xs))], "v0".into()), label)
}

fn perm_of(perm: &Option<Vec<i64>>, rank: usize) -> Vec<usize> {
    perm.as_ref().map_or((0..rank).rev().collect(), |p| p.iter().map(|&a| a as usize).collect())
}

fn concat_fwd(lw: &mut Lowerer, parts: &[(usize, Vec<usize>)], ax: usize, out: &[usize], label: &str) -> Result<usize> {
    let mut operands = vec![];
    let mut expr = "0.0f".to_string();
    let mut start = 0;
    let mut arms = vec![];
    for (i, (b, shape)) in parts.iter().enumerate() {
        let mut c = cs(out.len());
        c[ax] = format!("c{ax}-{start}LL");
        operands.push((*b, offset(&c, shape)));
        start += shape[ax];
        arms.push((start, format!("p{i}[{}]", offset(&c, shape))));
    }
    for (end, load) in arms.into_iter().rev() {
        expr = format!("(c{ax} < {end}LL ? {load} : {expr})");
    }
    lw.emit(all_kept(out, operands, expr), label)
}

/// The slab `[start, start + shape[ax])` of `src` (shape `full`) along `ax`.
fn slab(
    lw: &mut Lowerer,
    src: usize,
    full: &[usize],
    shape: &[usize],
    ax: usize,
    start: usize,
    label: &str,
) -> Result<usize> {
    let mut c = cs(shape.len());
    c[ax] = format!("c{ax}+{start}LL");
    lw.emit(all_kept(shape, vec![(src, offset(&c, full))], "v0".into()), label)
}

/// Softmax along `ax` (and, with `dy`, its gradient `p * (dy - sum(dy * p))`): a block per row.
fn softmax_rows(lw: &mut Lowerer, x: usize, dy: Option<usize>, xs: &[usize], ax: usize, label: &str) -> usize {
    let d = xs[ax];
    let inner: usize = xs[ax + 1..].iter().product();
    let rows = xs.iter().product::<usize>() / d.max(1);
    let at = format!("base + j * {inner}LL");
    let mut body = format!(
        "  __shared__ double sh[256];\n  long long r = blockIdx.x;\n  long long base = (r / {inner}LL) * {}LL + r % {inner}LL;\n\
         double m = -1.0e308;\n  for (long long j = threadIdx.x; j < {d}LL; j += 256) m = fmax(m, (double)p0[{at}]);\n\
         m = sqil_block_max(m, sh);\n  double s = 0.0;\n  for (long long j = threadIdx.x; j < {d}LL; j += 256) s += exp((double)p0[{at}] - m);\n\
         s = sqil_block_sum(s, sh);\n",
        d * inner
    );
    let mut ins = vec![x];
    match dy {
        None => {
            body += &format!("  for (long long j = threadIdx.x; j < {d}LL; j += 256) out[{at}] = (float)(exp((double)p0[{at}] - m) / s);\n")
        }
        Some(g) => {
            ins.push(g);
            body += &format!(
                "  double t = 0.0;\n  for (long long j = threadIdx.x; j < {d}LL; j += 256) t += (double)p1[{at}] * (exp((double)p0[{at}] - m) / s);\n\
                 t = sqil_block_sum(t, sh);\n\
                 for (long long j = threadIdx.x; j < {d}LL; j += 256) {{ double p = exp((double)p0[{at}] - m) / s; out[{at}] = (float)(p * ((double)p1[{at}] - t)); }}\n"
            );
        }
    }
    lw.emit_raw(xs.iter().product(), ins, &body, rows, label)
}

/// LayerNorm rows of `d` values: the mean and 1/sqrt(var + eps) of row `r` as `mean`, `inv`.
fn ln_stats(d: usize, eps: f32) -> String {
    format!(
        "  __shared__ double sh[256];\n  long long base = (long long)blockIdx.x * {d}LL;\n  double mean = 0.0;\n\
         for (long long j = threadIdx.x; j < {d}LL; j += 256) mean += (double)p0[base + j];\n\
         mean = sqil_block_sum(mean, sh) / {d}.0;\n  double var = 0.0;\n\
         for (long long j = threadIdx.x; j < {d}LL; j += 256) {{ double u = (double)p0[base + j] - mean; var += u * u; }}\n\
         var = sqil_block_sum(var, sh) / {d}.0;\n  double inv = 1.0 / sqrt(var + (double){});\n",
        cu_f32(eps)
    )
}

/// An NCHW 2-D convolution's geometry; `g` groups of `c / g` input and `co / g` output channels
/// (im2col and the GEMMs batched over the groups).
struct ConvGeo {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    co: usize,
    g: usize,
    kh: usize,
    kw: usize,
    oh: usize,
    ow: usize,
    s: [usize; 2],
    d: [usize; 2],
    p: [usize; 2],
}

impl ConvGeo {
    fn of(c: &sqil_ir::ops::ConvAttrs, xs: &[usize], ws: &[usize], what: &str) -> Result<ConvGeo> {
        let g = c.group.max(1) as usize;
        if xs.len() != 4 || ws.len() != 4 || !xs[1].is_multiple_of(g) || !ws[0].is_multiple_of(g) || ws[1] * g != xs[1]
        {
            return Err(unsupported(format!("{what}: only 2-D convolutions (NCHW) run on the GPU")));
        }
        let (pb, _, out) = c.geometry(&[Some(xs[2]), Some(xs[3])], &[ws[2], ws[3]], false).map_err(crate::Error::Ir)?;
        let two = |v: &[i64]| if v.is_empty() { [1, 1] } else { [v[0] as usize, v[1] as usize] };
        if pb.iter().any(|&p| p < 0) {
            return Err(unsupported(format!("{what}: negative padding on the GPU")));
        }
        Ok(ConvGeo {
            n: xs[0],
            c: xs[1],
            h: xs[2],
            w: xs[3],
            co: ws[0],
            g,
            kh: ws[2],
            kw: ws[3],
            oh: out[0].unwrap_or(1),
            ow: out[1].unwrap_or(1),
            s: two(&c.strides),
            d: two(&c.dilations),
            p: [pb[0] as usize, pb[1] as usize],
        })
    }
    /// Rows of a group's GEMM (output positions).
    fn m(&self) -> usize {
        self.n * self.oh * self.ow
    }
    /// A group's reduction length.
    fn k(&self) -> usize {
        self.c / self.g * self.kh * self.kw
    }
    /// A group's output channels.
    fn cog(&self) -> usize {
        self.co / self.g
    }

    /// `template` with `{name}` replaced by this geometry's values (`w`, `h`, `c`, `hw`, `kh`,
    /// `kw`, `s0`, `s1`, `p0`, `p1`, `d0`, `d1`, `oh`, `ow`, `pp` = oh * ow, `kk` = k) and by
    /// `extra`'s: the slab kernels' bodies.
    fn text(&self, template: &str, extra: &[(&str, String)]) -> String {
        let g = self;
        let geo = [
            ("w", g.w),
            ("h", g.h),
            ("c", g.c),
            ("hw", g.h * g.w),
            ("kh", g.kh),
            ("kw", g.kw),
            ("s0", g.s[0]),
            ("s1", g.s[1]),
            ("p0", g.p[0]),
            ("p1", g.p[1]),
            ("d0", g.d[0]),
            ("d1", g.d[1]),
            ("oh", g.oh),
            ("ow", g.ow),
            ("pp", g.oh * g.ow),
            ("kk", g.k()),
        ];
        let mut out = template.to_string();
        for (k, v) in geo.iter().map(|(k, v)| (*k, v.to_string())).chain(extra.iter().map(|(k, v)| (*k, v.clone()))) {
            out = out.replace(&format!("{{{k}}}"), &v);
        }
        out
    }

    /// One GEMM (batch 1, no split) of this convolution's slab code.
    #[allow(clippy::too_many_arguments)]
    fn gemm1(
        lw: &mut Lowerer,
        (x, tx): (usize, bool),
        (y, ty): (usize, bool),
        c: usize,
        (m, n, k): (usize, usize, usize),
        beta: f32,
        label: &str,
    ) {
        lw.p.steps.push(GStep::Gemm(GemmStep {
            x,
            tx,
            y,
            ty,
            c,
            m,
            n,
            k,
            batch: 1,
            sx: 0,
            sy: 0,
            alpha: 1.0,
            beta,
            label: label.into(),
            split: 1,
            off: [0; 3],
        }));
    }

    /// Images per slab of the ungrouped path: a slab's columns (`[k, images, oh*ow]`) and its
    /// outputs or output gradients in channel-major order (`[co, images, oh*ow]`) each at most
    /// [`SLAB_FLOATS`], at least one image.
    fn chunk(&self) -> usize {
        let pp = self.oh * self.ow;
        let per = (self.k() * pp).max(self.co * pp).max(1);
        (SLAB_FLOATS / per).clamp(1, self.n.max(1))
    }

    /// (first image, images) of every slab.
    fn slabs(&self) -> Vec<(usize, usize)> {
        let c = self.chunk();
        (0..self.n).step_by(c).map(|i| (i, c.min(self.n - i))).collect()
    }

    /// The index type of this convolution's kernels: 32-bit where every offset fits.
    fn index_type(&self) -> &'static str {
        let pp = self.oh * self.ow;
        let most = (self.n * self.c * self.h * self.w)
            .max(self.n * self.co * pp)
            .max(self.chunk() * self.k().max(self.co) * pp);
        if most < 1 << 31 {
            "int"
        } else {
            "long long"
        }
    }

    /// Transposed im2col of images `i0..i0 + cnt` into `col`: `[c*kh*kw, cnt, oh*ow]`, one row
    /// per tap holding every output position of the slab (the image read and the columns written
    /// along output positions: both coalesced), zeros outside the image.
    fn im2col_t(&self, lw: &mut Lowerer, x: usize, col: usize, (i0, cnt): (usize, usize), label: &str) {
        let g = self;
        let (kk, pp, it) = (g.k(), g.oh * g.ow, g.index_type());
        let total = cnt * kk * pp;
        let body = g.text(
            "  {it} o = ({it})blockIdx.x * 256 + threadIdx.x;\n  if (o >= {total}) return;\n\
             \x20 {it} p = o % {pp}, t = o / {pp};\n  {it} b = t % {cnt}, kk = t / {cnt};\n\
             \x20 {it} ox = p % {ow}, oy = p / {ow};\n  {it} kx = kk % {kw}, t2 = kk / {kw};\n\
             \x20 {it} ky = t2 % {kh}, ci = t2 / {kh};\n\
             \x20 {it} iy = oy * {s0} - {p0} + ky * {d0}, ix = ox * {s1} - {p1} + kx * {d1};\n\
             \x20 out[o] = (iy >= 0 && iy < {h} && ix >= 0 && ix < {w}) ? p0[(b * {c} + ci) * {hw} + iy * {w} + ix] : 0.0f;\n",
            &[("it", it.into()), ("total", total.to_string()), ("cnt", cnt.to_string())],
        );
        let off = vec![0, i0 * g.c * g.h * g.w];
        lw.emit_raw_into(col, vec![x], &body, total.div_ceil(256), &format!("{label} (im2col slab)"), off);
    }

    /// Images `i0..i0 + cnt` of NCHW `src` (`[n, co, oh*ow]`) into `dst` as `[co, cnt, oh*ow]`
    /// (`to_nchw` false), or the reverse, adding `bias[c]` when given; whole rows of output
    /// positions move, so reads and writes are both coalesced.
    #[allow(clippy::too_many_arguments)]
    fn swap(
        &self,
        lw: &mut Lowerer,
        src: usize,
        dst: usize,
        (i0, cnt): (usize, usize),
        to_nchw: bool,
        bias: Option<usize>,
        label: &str,
    ) {
        let g = self;
        let (co, pp, it) = (g.co, g.oh * g.ow, g.index_type());
        let total = cnt * co * pp;
        // o runs over dst; (b, c, p) from it; the source element's offset.
        let (coords, from) = if to_nchw {
            (format!("{it} c = t % {co}, b = t / {co};"), format!("(c * {cnt} + b) * {pp} + p"))
        } else {
            (format!("{it} b = t % {cnt}, c = t / {cnt};"), format!("(b * {co} + c) * {pp} + p"))
        };
        let add = if bias.is_some() { " + p1[c]" } else { "" };
        let body = format!(
            "  {it} o = ({it})blockIdx.x * 256 + threadIdx.x;\n  if (o >= {total}) return;\n\
             \x20 {it} p = o % {pp}, t = o / {pp};\n  {coords}\n  out[o] = p0[{from}]{add};\n"
        );
        let base = i0 * co * pp;
        let (off, what) = if to_nchw { (vec![base, 0, 0], "NCHW slab") } else { (vec![0, base], "channel-major slab") };
        let ins = std::iter::once(src).chain(bias).collect();
        lw.emit_raw_into(dst, ins, &body, total.div_ceil(256), &format!("{label} ({what})"), off);
    }

    /// The ungrouped forward, a slab of images at a time: the columns, one GEMM
    /// `y [co, cnt*oh*ow] = W [co, k] x col [k, cnt*oh*ow]`, and the slab moved into NCHW with the
    /// bias added. Columns exist one slab at a time.
    fn forward_slabs(&self, lw: &mut Lowerer, x: usize, w: usize, bias: Option<usize>, label: &str) -> Result<usize> {
        let g = self;
        let (kk, pp, co, cb) = (g.k(), g.oh * g.ow, g.co, g.chunk());
        let y = lw.buf(g.n * co * pp);
        let col = lw.buf(cb * kk * pp);
        let yt = lw.buf(cb * co * pp);
        for (i0, cnt) in g.slabs() {
            g.im2col_t(lw, x, col, (i0, cnt), label);
            ConvGeo::gemm1(lw, (w, false), (col, false), yt, (co, cnt * pp, kk), 0.0, label);
            g.swap(lw, yt, y, (i0, cnt), true, bias, label);
        }
        Ok(y)
    }

    /// The ungrouped weight gradient, a slab at a time: the output gradient in channel-major
    /// order, the columns again, and `dW [co, k] (+)= dy [co, cnt*oh*ow] x col^T` (one GEMM,
    /// split along its long inner dimension by [`split_k`], accumulated over the slabs in order).
    fn weight_grad_slabs(&self, lw: &mut Lowerer, x: usize, dy: usize, label: &str) -> Result<usize> {
        let g = self;
        let (kk, pp, co, cb) = (g.k(), g.oh * g.ow, g.co, g.chunk());
        let col = lw.buf(cb * kk * pp);
        let dyt = lw.buf(cb * co * pp);
        let dw = lw.buf(co * kk);
        for (si, (i0, cnt)) in g.slabs().into_iter().enumerate() {
            g.swap(lw, dy, dyt, (i0, cnt), false, None, label);
            g.im2col_t(lw, x, col, (i0, cnt), label);
            let beta = if si == 0 { 0.0 } else { 1.0 };
            ConvGeo::gemm1(lw, (dyt, false), (col, true), dw, (co, kk, cnt * pp), beta, label);
        }
        Ok(dw)
    }

    /// The ungrouped input gradient, a slab at a time: the output gradient in channel-major
    /// order, `dcol [k, cnt*oh*ow] = W^T [k, co] x dy [co, cnt*oh*ow]` (one GEMM), then col2im
    /// (neighbouring threads read neighbouring output positions), each input element's taps
    /// summed in (kh, kw) order.
    fn input_grad_slabs(&self, lw: &mut Lowerer, w: usize, dy: usize, label: &str) -> usize {
        let g = self;
        let (kk, pp, co, cb) = (g.k(), g.oh * g.ow, g.co, g.chunk());
        let dcol = lw.buf(cb * kk * pp);
        let dyt = lw.buf(cb * co * pp);
        let dx = lw.buf(g.n * g.c * g.h * g.w);
        let it = g.index_type();
        for (i0, cnt) in g.slabs() {
            g.swap(lw, dy, dyt, (i0, cnt), false, None, label);
            ConvGeo::gemm1(lw, (w, true), (dyt, false), dcol, (kk, cnt * pp, co), 0.0, label);
            let total = cnt * g.c * g.h * g.w;
            let body = g.text(
                "  {it} o = ({it})blockIdx.x * 256 + threadIdx.x;\n  if (o >= {total}) return;\n\
                 \x20 {it} ix = o % {w}, t = o / {w};\n  {it} iy = t % {h}; t /= {h};\n  {it} ci = t % {c}, b = t / {c};\n\
                 \x20 double acc = 0.0;\n\
                 \x20 for (int ky = 0; ky < {kh}; ky++) {\n\
                 \x20   {it} ty = iy + {p0} - ky * {d0};\n    if (ty < 0 || ty % {s0} != 0 || ty / {s0} >= {oh}) continue;\n\
                 \x20   for (int kx = 0; kx < {kw}; kx++) {\n\
                 \x20     {it} tx = ix + {p1} - kx * {d1};\n      if (tx < 0 || tx % {s1} != 0 || tx / {s1} >= {ow}) continue;\n\
                 \x20     acc += (double)p0[(((ci * {kh} + ky) * {kw} + kx) * ({it}){cnt} + b) * {pp} + (ty / {s0}) * {ow} + tx / {s1}];\n\
                 \x20   }\n  }\n  out[o] = (float)acc;\n",
                &[("it", it.into()), ("total", total.to_string()), ("cnt", cnt.to_string())],
            );
            let off = vec![i0 * g.c * g.h * g.w, 0];
            lw.emit_raw_into(dx, vec![dcol], &body, total.div_ceil(256), &format!("{label} (col2im slab)"), off);
        }
        dx
    }

    /// im2col: `[g, n*oh*ow, c/g*kh*kw]`, zeros outside the image.
    fn im2col(&self, lw: &mut Lowerer, x: usize, label: &str) -> Result<usize> {
        let g = self;
        let cg = g.c / g.g;
        let dims = [g.g, g.n, g.oh, g.ow, cg, g.kh, g.kw];
        let ih = format!("(c2*{}LL-{}LL+c5*{}LL)", g.s[0], g.p[0], g.d[0]);
        let iw = format!("(c3*{}LL-{}LL+c6*{}LL)", g.s[1], g.p[1], g.d[1]);
        let off = format!("c1*{}LL+(c0*{cg}LL+c4)*{}LL+{ih}*{}LL+{iw}", g.c * g.h * g.w, g.h * g.w, g.w);
        let mut mr = all_kept(&dims, vec![(x, off)], "v0".into());
        mr.guard = Some(format!("{ih} >= 0 && {ih} < {}LL && {iw} >= 0 && {iw} < {}LL", g.h, g.w));
        lw.emit(mr, &format!("{label} (im2col)"))
    }

    /// dy `[n, co, oh, ow]` as `[g, n*oh*ow, co/g]`.
    fn rows(&self, lw: &mut Lowerer, dy: usize, label: &str) -> Result<usize> {
        let g = self;
        let off = format!("((c1*{}LL+c0*{}LL+c4)*{}LL+c2)*{}LL+c3", g.co, g.cog(), g.oh, g.ow);
        lw.emit(all_kept(&[g.g, g.n, g.oh, g.ow, g.cog()], vec![(dy, off)], "v0".into()), &format!("{label} (dy rows)"))
    }

    /// A GEMM batched over the groups.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        lw: &mut Lowerer,
        x: usize,
        tx: bool,
        y: usize,
        ty: bool,
        (m, k, n): (usize, usize, usize),
        (sx, sy): (usize, usize),
        label: &str,
    ) -> usize {
        let c = lw.buf(self.g * m * n);
        lw.p.steps.push(GStep::Gemm(GemmStep {
            x,
            tx,
            y,
            ty,
            c,
            m,
            n,
            k,
            batch: self.g,
            sx,
            sy,
            alpha: 1.0,
            beta: 0.0,
            label: label.into(),
            split: 1,
            off: [0; 3],
        }));
        c
    }
}
