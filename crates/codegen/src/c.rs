//! The C back end for firmware: a CPU plan becomes `policy.c` / `policy.h` in C99, for one
//! state at a time (batch 1).
//!
//! What the generated code is:
//! - weights as `static const` arrays: int4 layers in the packed block layout
//!   (`sqil_packed.h`, generated from the Rust definition) with their group scales and weight
//!   sums; other constants as f32;
//! - every buffer static: one float arena whose offsets are planned here from the values'
//!   lifetimes (first fit), one int8 buffer for quantized activations; no `malloc`, and no libc
//!   beyond `string.h` (`memcpy`) unless the policy has transcendental ops (`tanh`, `exp`, ...),
//!   which take `math.h`;
//! - int4 layers on the portable kernels of `kernels/c/sqil_q4.h` (copied in): W4A8 and W4A4 as
//!   int8 x int4 integer dot products with int32 sums per group and the runtime's float
//!   requantizing epilogue (bias and ReLU fused), with NEON paths behind `__ARM_NEON`.
//!
//! Agreement: the kernels repeat the runtime's reference kernels operation for operation, and
//! every other op repeats the IR's reference semantics (f32 arithmetic where the IR uses f32,
//! double where it uses f64), so with IEEE single precision and no FMA contraction (GCC's
//! default under `-std=c99`) a policy of int4 layers and exact f32 ops gives the runtime's bits.
//! Float matrix products (layers kept in float or at 8 bits) sum in k order where the runtime
//! uses a blocked GEMM, and the C library's `tanh`/`exp` may differ from Rust's by an ulp, so
//! those policies are held to [`C_TOL`].

mod moves;

use moves::Nest;
use sqil_ir::ops::{BinaryOp, Op};
use sqil_ir::{IrError, Result, Tensor};
use sqil_lower::{ActQuant, Step};
use sqil_runtime::Execute;
use sqil_runtime::Policy;
use std::collections::HashMap;
use std::fmt::Write;

/// The kernels every generated file contains.
pub const KERNELS: &str = include_str!("../../../kernels/c/sqil_q4.h");

/// Largest |C - runtime| on an output, relative to the largest |output|, for policies with float
/// matrix products or transcendental functions (see the module docs); policies of int4 layers
/// and exact f32 element-wise ops agree bit for bit.
pub const C_TOL: f32 = 1e-5;

/// A generated policy.
#[derive(Clone, Debug)]
pub struct CProgram {
    pub header: String,
    pub source: String,
    pub report: CReport,
}

/// Sizes of what the generated code holds.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct CReport {
    /// Packed int4 weights, their scales and weight sums (bytes).
    pub packed_weight_bytes: usize,
    /// Other constants (f32 bytes).
    pub const_bytes: usize,
    /// The static float arena (bytes) and int8 activation buffer (bytes).
    pub arena_bytes: usize,
    pub qbuf_bytes: usize,
    pub input_sizes: Vec<usize>,
    pub output_sizes: Vec<usize>,
    /// Whether the policy only uses ops the C code reproduces bit for bit.
    pub bit_exact: bool,
    /// Whether the code needs `math.h`.
    pub needs_libm: bool,
    /// The widths the integer layers' weights are stored at (2, 3: dense blocks; 4).
    pub weight_bits: Vec<u32>,
    pub steps: Vec<String>,
}

/// A C float literal that parses back to exactly `v` (`None` for inf and NaN, which C99 spells
/// only through `math.h`).
pub fn float_literal(v: f32) -> Option<String> {
    v.is_finite().then(|| format!("{v:e}f"))
}

/// `static const TY NAME[n] = { items };`, `per_line` items to a line (a single 0 when empty:
/// C has no zero-length arrays).
pub fn c_array(out: &mut String, ty: &str, name: &str, items: &[String], per_line: usize) {
    let _ = write!(out, "static const {ty} {name}[{}] = {{", items.len().max(1));
    for line in items.chunks(per_line.max(1)) {
        let _ = write!(out, "\n    {},", line.join(", "));
    }
    if items.is_empty() {
        out.push('0');
    }
    out.push_str("\n};\n");
}

fn flit(v: f32, what: &str) -> Result<String> {
    float_literal(v)
        .ok_or_else(|| IrError::Unsupported(format!("{what}: constant {v} has no C99 literal without math.h")))
}

fn dlit(v: f64) -> String {
    format!("{v:e}")
}

/// Where a value lives in the generated code.
#[derive(Clone, Debug)]
enum Loc {
    Input(usize),
    Arena(usize),
}

impl Loc {
    fn expr(&self) -> String {
        match self {
            Loc::Input(i) => format!("input{i}"),
            Loc::Arena(o) => format!("(sqil_arena + {o})"),
        }
    }
}

/// Lifetimes to offsets: first fit in one arena. `bufs`: (size, first step, last step).
fn plan_arena(bufs: &[(usize, usize, usize)]) -> (Vec<usize>, usize) {
    let mut order: Vec<usize> = (0..bufs.len()).collect();
    order.sort_by_key(|&i| (bufs[i].1, std::cmp::Reverse(bufs[i].0)));
    let mut placed: Vec<(usize, usize, usize, usize)> = vec![]; // offset, size, first, last
    let mut offs = vec![0usize; bufs.len()];
    let mut total = 0;
    for i in order {
        let (size, first, last) = bufs[i];
        let mut live: Vec<(usize, usize)> =
            placed.iter().filter(|p| p.2 <= last && first <= p.3).map(|p| (p.0, p.0 + p.1)).collect();
        live.sort();
        let mut at = 0;
        for (s, e) in live {
            if at + size <= s {
                break;
            }
            at = at.max(e);
        }
        offs[i] = at;
        total = total.max(at + size);
        placed.push((at, size, first, last));
    }
    (offs, total)
}

/// The 2-D window geometry the C kernels take (`ConvGeometry::kernel_params`), as C literals.
fn conv_geometry_items(channels: usize, g: &sqil_kernels_cpu::ConvGeometry) -> Vec<String> {
    g.kernel_params(channels).iter().map(|v| v.to_string()).collect()
}

/// `s` as a C identifier (every other character becomes `_`).
pub fn c_ident(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect()
}

struct Emitter {
    consts: String,
    body: String,
    const_bytes: usize,
    packed_bytes: usize,
    next_const: usize,
    exact: bool,
    libm: bool,
    /// The kernels used (`SQIL_USE_*` macros).
    uses: std::collections::BTreeSet<&'static str>,
    /// Whether a layer loops over rows (`sqil_r` is declared).
    row_loops: bool,
    /// Bytes of the int8 image buffer of the int4 convolutions, and floats of their per-position
    /// output buffer.
    qimg: usize,
    ctmp: usize,
    /// The weight widths the integer layers are stored at.
    bits: std::collections::BTreeSet<u32>,
}

/// The value Rust's `f64` sum starts from (`-0.0` since Rust 1.81, `0.0` before): the reference
/// pooling ops sum with `Iterator::sum`, and an all-zero window's sign depends on it.
fn sum_start() -> &'static str {
    if std::iter::empty::<f64>().sum::<f64>().is_sign_negative() {
        "-0.0"
    } else {
        "0.0"
    }
}

impl Emitter {
    /// A `static const int32_t` array of `items` (C literals), `per_line` to a line.
    fn int_array(&mut self, items: &[String], per_line: usize) -> String {
        let name = format!("sqil_c{}", self.next_const);
        self.next_const += 1;
        c_array(&mut self.consts, "int32_t", &name, items, per_line);
        self.const_bytes += 4 * items.len();
        name
    }

    fn const_array_f64(&mut self, v: &[f64]) -> String {
        let name = format!("sqil_c{}", self.next_const);
        self.next_const += 1;
        let items: Vec<String> = v.iter().map(|x| dlit(*x)).collect();
        c_array(&mut self.consts, "double", &name, &items, 6);
        self.const_bytes += 8 * v.len();
        name
    }

    fn const_array(&mut self, v: &[f32], what: &str) -> Result<String> {
        let name = format!("sqil_c{}", self.next_const);
        self.next_const += 1;
        let items = v.iter().map(|x| flit(*x, what)).collect::<Result<Vec<_>>>()?;
        c_array(&mut self.consts, "float", &name, &items, 8);
        self.const_bytes += 4 * v.len();
        Ok(name)
    }
}

/// The values of `t` broadcast to `shape` (numpy rules).
fn broadcast_to(t: &Tensor, shape: &[usize]) -> Vec<f32> {
    let v = t.data.to_f32_vec();
    sqil_ir::ops::broadcast_indices(&t.shape, shape).into_iter().map(|i| v[i]).collect()
}

/// Generates C for `policy` at batch 1; `prefix` names the API (`{prefix}_act`, `PREFIX_...`).
pub fn emit(policy: &Policy, prefix: &str) -> Result<CProgram> {
    let plan = &policy.plan;
    let prefix = c_ident(prefix);
    let upper = prefix.to_uppercase();
    // Shapes (and folded constants) from one traced run at batch 1.
    let mut feeds = vec![];
    for (i, shape) in policy.input_shapes().iter().enumerate() {
        let dims: Vec<usize> = shape
            .iter()
            .enumerate()
            .map(|(d, x)| if d == 0 { Some(1) } else { x.known() })
            .collect::<Option<_>>()
            .ok_or_else(|| {
                IrError::Unsupported(format!(
                    "input `{}`: the C back end needs every dimension but the batch known",
                    plan.inputs[i].0
                ))
            })?;
        let n = dims.iter().product();
        feeds.push(Tensor::from_f32(dims, vec![0.0; n])?);
    }
    let env = plan.trace(&feeds, 1)?;
    let step_names = plan.describe();
    let mut is_const = vec![false; plan.slots];
    for (s, _) in &plan.consts {
        is_const[*s] = true;
    }
    // Steps whose inputs are all constant are folded (their traced value becomes a constant), and
    // so is Shape: the code runs one state of known shape, so shape arithmetic (a transformer's
    // reshapes to heads) is all constant.
    let mut live_steps = vec![];
    for (i, st) in plan.steps.iter().enumerate() {
        if let Step::Op { op, inputs, outputs, .. } = st {
            if inputs.iter().flatten().all(|&s| is_const[s]) || matches!(op, Op::Shape { .. }) {
                outputs.iter().for_each(|&s| is_const[s] = true);
                continue;
            }
        }
        live_steps.push(i);
    }
    let shape_of = |s: usize| -> Result<&Tensor> {
        env[s].as_ref().ok_or_else(|| IrError::Internal(format!("slot {s} was not computed")))
    };
    // Buffers: every value a live step writes, live from its step to its last use.
    let n_steps = live_steps.len();
    let mut first_last: HashMap<usize, (usize, usize)> = HashMap::new();
    let mut writer: HashMap<usize, usize> = HashMap::new();
    for (pos, &i) in live_steps.iter().enumerate() {
        let (ins, outs): (Vec<usize>, Vec<usize>) = match &plan.steps[i] {
            Step::Q4Linear { x, y, .. } => (vec![*x], vec![*y]),
            Step::Op { inputs, outputs, .. } => (inputs.iter().flatten().copied().collect(), outputs.clone()),
        };
        for s in outs {
            first_last.insert(s, (pos, pos));
            writer.insert(s, i);
        }
        for s in ins {
            if let Some(e) = first_last.get_mut(&s) {
                e.1 = pos;
            }
        }
    }
    for s in &plan.outputs {
        if let Some(e) = first_last.get_mut(s) {
            e.1 = n_steps;
        }
    }
    let mut slots: Vec<usize> = first_last.keys().copied().collect();
    slots.sort();
    let mut bufs = vec![];
    for &s in &slots {
        let t = shape_of(s)?;
        if t.dtype() != sqil_ir::DType::F32 {
            return Err(IrError::Unsupported(format!(
                "step `{}` computes a {} value from the inputs: the C back end computes in f32 only",
                step_names[writer[&s]],
                t.dtype()
            )));
        }
        let (a, b) = first_last[&s];
        bufs.push((t.len(), a, b));
    }
    let (offs, arena) = plan_arena(&bufs);
    let mut loc: HashMap<usize, Loc> = slots.iter().zip(&offs).map(|(&s, &o)| (s, Loc::Arena(o))).collect();
    for (i, (_, s)) in plan.inputs.iter().enumerate() {
        loc.insert(*s, Loc::Input(i));
    }
    let mut em = Emitter {
        consts: String::new(),
        body: String::new(),
        const_bytes: 0,
        packed_bytes: 0,
        next_const: 0,
        exact: true,
        libm: false,
        uses: Default::default(),
        row_loops: false,
        qimg: 0,
        ctmp: 0,
        bits: Default::default(),
    };
    let mut qbuf = 0usize;
    let mut described = vec![];
    for &i in &live_steps {
        let step = &plan.steps[i];
        match step {
            Step::Q4Linear { name, layer, x, y, act, w, bias, relu, conv } => {
                // Int4 convolutions: 2-D, int8 activations (the plan makes no others).
                let conv_geo = match conv {
                    None => None,
                    Some(im) => match (im.geo.input.len(), act) {
                        (2, ActQuant::Int { .. }) => Some(im),
                        _ => {
                            return Err(IrError::Unsupported(format!(
                                "step `{}`: the C back end runs 2-D int4 convolutions only",
                                step_names[i]
                            )))
                        }
                    },
                };
                let id = c_ident(layer);
                // Integer-activation layers at the fewest bits that hold their weights (dense
                // sqil_block_q2 / _q3 for 2- and 3-bit layers); the float-activation kernel
                // reads Q4 blocks.
                let bits = match act {
                    ActQuant::Int { .. } => sqil_kernels_cpu::packed::narrowest_bits(w),
                    ActQuant::Float => 4,
                };
                let _ = writeln!(
                    em.consts,
                    "/* {name}: [{} x {}] int{bits} (sqil_block_q{bits}), groups of {} */",
                    w.n, w.k, w.group
                );
                let bytes = sqil_kernels_cpu::packed::dense_bytes(w, bits);
                let items: Vec<String> = bytes.iter().map(|q| format!("{q:#04x}")).collect();
                c_array(&mut em.consts, "uint8_t", &format!("sqil_w_{id}"), &items, 16);
                let scales = w.scales.iter().map(|v| flit(*v, name)).collect::<Result<Vec<_>>>()?;
                c_array(&mut em.consts, "float", &format!("sqil_s_{id}"), &scales, 8);
                em.packed_bytes += bytes.len() + w.scales.len() * 4;
                em.bits.insert(bits);
                let bias_expr = match bias {
                    Some(b) => em.const_array(b, name)?,
                    None => "0".into(),
                };
                let xe = loc[x].expr();
                let ye = loc[y].expr();
                // A MatMul over [..., rows, k] (a transformer's tokens): the kernels once per row.
                let rows = shape_of(*x)?.len() / w.k.max(1);
                let (open, ind, close, xoff, yoff) = if rows == 1 {
                    (String::new(), "", "", String::new(), String::new())
                } else {
                    (
                        format!("for (sqil_r = 0; sqil_r < {rows}; sqil_r++) {{\n        "),
                        "    ",
                        "\n    }",
                        format!(" + sqil_r * {}", w.k),
                        format!(" + sqil_r * {}", w.n),
                    )
                };
                em.row_loops |= rows > 1 && conv_geo.is_none();
                if let ActQuant::Int { .. } = act {
                    let sums: Vec<String> = w.sums.iter().map(|v| v.to_string()).collect();
                    c_array(&mut em.consts, "int32_t", &format!("sqil_ws_{id}"), &sums, 12);
                    em.packed_bytes += w.sums.len() * 4;
                    qbuf = qbuf.max(w.k_pad);
                    em.uses.insert("SQIL_USE_Q4Q8");
                }
                match (act, conv_geo) {
                    (ActQuant::Int { scale, zero, lo, hi }, Some(im)) => {
                        let gname = format!("sqil_g_{id}");
                        let mut geo = conv_geometry_items(im.channels, &im.geo);
                        geo.push(im.run.to_string());
                        c_array(&mut em.consts, "int32_t", &gname, &geo, 14);
                        em.qimg = em.qimg.max(im.channels * im.geo.input_len());
                        em.ctmp = em.ctmp.max(w.n);
                        em.uses.insert("SQIL_USE_CONV_Q4Q8");
                        let sc = flit(*scale, name)?;
                        let _ = writeln!(
                            em.body,
                            "    /* {name} */\n    sqil_conv_q4q8({xe}, {gname}, sqil_w_{id}, {bits}, sqil_s_{id}, sqil_ws_{id}, {}, {}, \
                             {}, {sc}, {zero}, {lo}, {hi}, {bias_expr}, {}, sqil_qimg, sqil_qbuf, sqil_ctmp, {ye});",
                            w.n,
                            w.k_pad,
                            w.group,
                            *relu as i32
                        );
                    }
                    (ActQuant::Int { scale, zero, lo, hi }, None) => {
                        em.uses.insert("SQIL_USE_Q4Q8_ROWS");
                        let sc = flit(*scale, name)?;
                        let _ = writeln!(
                            em.body,
                            "    /* {name} */\n    {open}sqil_quantize({xe}{xoff}, {}, {}, {sc}, {zero}, {lo}, {hi}, sqil_qbuf);\n    \
                             {ind}sqil_gemv_q4q8(sqil_w_{id}, {bits}, sqil_s_{id}, sqil_ws_{id}, {}, {}, {}, sqil_qbuf, {zero}, {sc}, \
                             {bias_expr}, {}, {ye}{yoff});\n    {ind}sqil_nan_rows({xe}{xoff}, {}, {ye}{yoff}, {});{close}",
                            w.k,
                            w.k_pad,
                            w.n,
                            w.k_pad,
                            w.group,
                            *relu as i32,
                            w.k,
                            w.n
                        );
                    }
                    (ActQuant::Float, _) => {
                        // The kernels' eight-lane fmaf arithmetic (`generic_gemv_q4f32`).
                        em.libm = true;
                        em.uses.insert("SQIL_USE_Q4F32");
                        let _ = writeln!(
                            em.body,
                            "    /* {name} */\n    {open}sqil_gemv_q4f32((const sqil_block_q4 *)(const void *)sqil_w_{id}, sqil_s_{id}, {}, {}, {}, {}, {xe}{xoff}, \
                             {bias_expr}, {}, {ye}{yoff});{close}",
                            w.n,
                            w.k,
                            w.k_pad,
                            w.group,
                            *relu as i32
                        );
                    }
                }
            }
            Step::Op { name, op, inputs, outputs, .. } => {
                emit_op(&mut em, &env, &is_const, &loc, name, op, inputs, outputs)?;
            }
        }
        described.push(step_names[i].clone());
    }
    // Outputs: copy out of the arena (or from wherever they are).
    let mut out_sizes = vec![];
    for (j, &s) in plan.outputs.iter().enumerate() {
        let t = shape_of(s)?;
        out_sizes.push(t.len());
        let src = match loc.get(&s) {
            Some(l) => l.expr(),
            None => em.const_array(&t.data.to_f32_vec(), "output")?,
        };
        let _ = writeln!(em.body, "    memcpy(output{j}, {src}, sizeof(float) * {});", t.len());
    }
    let in_sizes: Vec<usize> = feeds.iter().map(|t| t.len()).collect();
    let params: Vec<String> = (0..in_sizes.len())
        .map(|i| format!("const float *input{i}"))
        .chain((0..out_sizes.len()).map(|j| format!("float *output{j}")))
        .collect();
    let mut h = String::new();
    let guard = format!("{upper}_H");
    let _ = writeln!(h, "/* Generated by sqil (C back end): do not edit. */\n#ifndef {guard}\n#define {guard}\n");
    let _ = writeln!(h, "#define {upper}_INPUTS {}\n#define {upper}_OUTPUTS {}", in_sizes.len(), out_sizes.len());
    for (i, (n, _)) in in_sizes.iter().zip(&plan.inputs).enumerate() {
        let _ = writeln!(h, "#define {upper}_INPUT{i}_SIZE {n} /* {} */", plan.inputs[i].0);
    }
    for (j, n) in out_sizes.iter().enumerate() {
        let _ = writeln!(h, "#define {upper}_OUTPUT{j}_SIZE {n} /* {} */", plan.output_names[j]);
    }
    let _ = writeln!(
        h,
        "\n/* One state in, its actions out (f32, row-major). Uses static buffers: not reentrant. */\n\
         void {prefix}_act({});\n\n#endif /* {guard} */",
        params.join(", ")
    );
    let mut c = String::new();
    let _ = writeln!(
        c,
        "/* Generated by sqil (C back end): do not edit. C99; build with -std=c99 (GCC then does not\n \
         * contract a * b + c into FMA, which would change the results' last bits). */\n\
         #if defined(__clang__)\n#pragma STDC FP_CONTRACT OFF\n#endif\n#include <stdint.h>\n#include <string.h>"
    );
    if em.libm {
        c.push_str("#include <math.h>\n");
    }
    let _ = writeln!(c, "#include \"{prefix}.h\"\n");
    let packed_h = sqil_kernels_cpu::packed::c_header();
    // The packed-layout definitions without the include guard's own #include (already above).
    c.push_str(&packed_h);
    c.push('\n');
    for u in &em.uses {
        let _ = writeln!(c, "#define {u}");
    }
    c.push_str(KERNELS);
    c.push('\n');
    c.push_str(&em.consts);
    let _ = writeln!(c, "\nstatic float sqil_arena[{}];", arena.max(1));
    if em.qimg > 0 {
        let _ = writeln!(c, "static int8_t sqil_qimg[{}];\nstatic float sqil_ctmp[{}];", em.qimg, em.ctmp);
    }
    if qbuf > 0 {
        let _ = writeln!(c, "static int8_t sqil_qbuf[{qbuf}];");
    }
    let _ = writeln!(c, "\nvoid {prefix}_act({})\n{{", params.join(", "));
    if em.row_loops {
        c.push_str("    int32_t sqil_r;\n");
    }
    for i in 0..in_sizes.len() {
        // `inputI` not followed by a digit (`input1` is not a use of `input10`).
        let name = format!("input{i}");
        let used = em
            .body
            .match_indices(&name)
            .any(|(p, _)| !em.body[p + name.len()..].starts_with(|c: char| c.is_ascii_digit()));
        if !used {
            let _ = writeln!(c, "    (void)input{i};");
        }
    }
    c.push_str(&em.body);
    c.push_str("}\n");
    Ok(CProgram {
        header: h,
        source: c,
        report: CReport {
            packed_weight_bytes: em.packed_bytes,
            const_bytes: em.const_bytes,
            arena_bytes: 4 * arena,
            qbuf_bytes: qbuf + em.qimg + 4 * em.ctmp,
            input_sizes: in_sizes,
            output_sizes: out_sizes,
            bit_exact: em.exact,
            needs_libm: em.libm,
            weight_bits: em.bits.iter().copied().collect(),
            steps: described,
        },
    })
}

#[allow(clippy::too_many_arguments)]
fn emit_op(
    em: &mut Emitter,
    env: &[Option<Tensor>],
    is_const: &[bool],
    loc: &HashMap<usize, Loc>,
    node: &str,
    op: &Op,
    inputs: &[Option<usize>],
    outputs: &[usize],
) -> Result<()> {
    let what = format!("node `{node}` ({})", op.name());
    let unsupported = |why: &str| {
        IrError::Unsupported(format!(
            "{what}: not supported by the C back end ({why}); it handles int4 layers and convolutions, float \
             Gemm/MatMul/Conv, element-wise ops with broadcasting, Clip, Softmax and LayerNormalization over the \
             last axis, inference BatchNormalization, 2-D pooling, per-tensor FakeQuant, and data movement \
             (Transpose, Split, Slice, Gather, Expand, Concat, reshapes)"
        ))
    };
    let val = |s: usize| -> Result<&Tensor> {
        env[s].as_ref().ok_or_else(|| IrError::Internal(format!("{what}: slot {s} not computed")))
    };
    let y = outputs[0];
    let yt = val(y)?;
    let n = yt.len();
    let ye = loc[&y].expr();
    // A dynamic input of the output's own shape (element-wise operand), by position.
    let dyn_in = |j: usize| -> Result<String> {
        let s = inputs.get(j).copied().flatten().ok_or_else(|| unsupported("missing input"))?;
        if is_const[s] {
            return Err(unsupported("constant operand where a computed one was expected"));
        }
        Ok(loc[&s].expr())
    };
    let const_of = |j: usize| -> Option<&Tensor> {
        let s = inputs.get(j).copied().flatten()?;
        if is_const[s] {
            env[s].as_ref()
        } else {
            None
        }
    };
    let _ = writeln!(em.body, "    /* {what} */");
    let unary_f32 = |em: &mut Emitter, x: &str, f: &str| {
        let _ = writeln!(
            em.body,
            "    {{\n        int32_t i;\n        for (i = 0; i < {n}; i++) {{\n            float v = {x}[i];\n            \
             {ye}[i] = {f};\n        }}\n    }}"
        );
    };
    match op {
        Op::Identity | Op::Reshape { .. } | Op::Flatten { .. } | Op::Squeeze | Op::Unsqueeze => {
            let x = dyn_in(0)?;
            let _ = writeln!(em.body, "    memmove({ye}, {x}, sizeof(float) * {n});");
        }
        Op::Unary(u) => {
            // The op table's C expression: exact in f32, or through libm in f64 like the
            // interpreter (`sqil_ir::ops::unary`).
            let x = dyn_in(0)?;
            let def = u.def();
            if let sqil_ir::ops::UnaryOp::Sigmoid | sqil_ir::ops::UnaryOp::Tanh | sqil_ir::ops::UnaryOp::Softplus = u {
                // sqil's own definitions on `exp_nonpos`: exact, no libm.
                let name = def.name.to_lowercase();
                activation_c(em, &name);
                unary_f32(em, &x, &format!("(float)sqil_{name}((double)v)"));
                return Ok(());
            }
            if def.libm {
                em.libm = true;
                em.exact = false;
            }
            unary_f32(em, &x, &def.c_expr("v"));
        }
        Op::LeakyRelu { alpha } => {
            let x = dyn_in(0)?;
            unary_f32(em, &x, &format!("v < 0.0f ? (float)({} * (double)v) : v", dlit(*alpha as f64)));
        }
        Op::Elu { alpha } => {
            let x = dyn_in(0)?;
            activation_c(em, "elu");
            unary_f32(em, &x, &format!("(float)sqil_elu((double)v, {})", dlit(*alpha as f64)));
        }
        Op::Gelu { tanh } => {
            em.libm = true;
            em.exact = false;
            let x = dyn_in(0)?;
            let f = if *tanh {
                let c = dlit((2.0 / std::f64::consts::PI).sqrt());
                format!("(float)(0.5 * (double)v * (1.0 + tanh({c} * ((double)v + 0.044715 * (double)v * (double)v * (double)v))))")
            } else {
                format!("(float)(0.5 * (double)v * (1.0 + erf((double)v / {})))", dlit(std::f64::consts::SQRT_2))
            };
            unary_f32(em, &x, &f);
        }
        Op::Binary(b) => {
            let sym = match b {
                BinaryOp::Add => "+",
                BinaryOp::Sub => "-",
                BinaryOp::Mul => "*",
                BinaryOp::Div => "/",
                BinaryOp::Pow => return Err(unsupported("Pow")),
            };
            // Each operand a literal (constant scalars) or an array read through its broadcast
            // strides (constants at their own shape, not expanded).
            let mut terms: Vec<Result<String, usize>> = vec![];
            let mut arrays = vec![ye.clone()];
            let mut strides = vec![moves::strides(&yt.shape)];
            for inp in &inputs[..2] {
                let s = inp.ok_or_else(|| unsupported("missing input"))?;
                let t = val(s)?;
                if is_const[s] && t.len() == 1 {
                    terms.push(Ok(format!("({})", flit(t.data.to_f32_vec()[0], &what)?)));
                } else {
                    let arr = if is_const[s] { em.const_array(&t.data.to_f32_vec(), &what)? } else { loc[&s].expr() };
                    terms.push(Err(arrays.len()));
                    arrays.push(arr);
                    strides.push(moves::broadcast_strides(&t.shape, &yt.shape));
                }
            }
            let term = |t: &Result<String, usize>, idx: &[String]| match t {
                Ok(lit) => lit.clone(),
                Err(k) => format!("{}[{}]", arrays[*k], idx[*k]),
            };
            Nest::over(&yt.shape, strides).emit(&mut em.body, &|idx| {
                format!("{ye}[{}] = {} {sym} {};", idx[0], term(&terms[0], idx), term(&terms[1], idx))
            });
        }
        Op::PRelu => {
            // The IR's f64 product of two f32 values is exact: one rounding to f32, as here.
            let x = dyn_in(0)?;
            let s = inputs.get(1).copied().flatten().ok_or_else(|| unsupported("missing slope"))?;
            let st = val(s)?;
            let sarr = if is_const[s] { em.const_array(&st.data.to_f32_vec(), &what)? } else { loc[&s].expr() };
            let strides = vec![
                moves::strides(&yt.shape),
                moves::strides(&yt.shape),
                moves::broadcast_strides(&st.shape, &yt.shape),
            ];
            Nest::over(&yt.shape, strides).emit(&mut em.body, &|i| {
                format!(
                    "{ye}[{0}] = {x}[{1}] < 0.0f ? (float)((double){x}[{1}] * (double){sarr}[{2}]) : {x}[{1}];",
                    i[0], i[1], i[2]
                )
            });
        }
        Op::Clip => {
            let x = dyn_in(0)?;
            let bound = |j: usize| -> Result<Option<f32>> {
                match inputs.get(j).copied().flatten() {
                    None => Ok(None),
                    Some(_) => match const_of(j) {
                        Some(t) if t.len() == 1 => Ok(Some(t.data.to_f32_vec()[0])),
                        Some(t) if t.is_empty() => Ok(None),
                        _ => Err(unsupported("Clip bounds must be constant scalars")),
                    },
                }
            };
            let mut f = "v".to_string();
            if let Some(lo) = bound(1)? {
                let l = flit(lo, &what)?;
                f = format!("(v < {l} ? {l} : v)");
            }
            if let Some(hi) = bound(2)? {
                let h = flit(hi, &what)?;
                f = format!("({f} > {h} ? {h} : {f})");
            }
            unary_f32(em, &x, &f);
        }
        Op::FakeQuant { bits, signed, .. } => {
            let x = dyn_in(0)?;
            let (Some(s), z) = (const_of(1), const_of(2)) else { return Err(unsupported("computed scale")) };
            if s.len() != 1 || z.is_some_and(|z| z.len() != 1) {
                return Err(unsupported("only per-tensor activation quantizers"));
            }
            let (lo, hi) = sqil_ir::ops::quant::fake_quant_range(*bits, *signed);
            let sc = flit(s.data.to_f32_vec()[0], &what)?;
            let zp = flit(z.map_or(0.0, |z| z.data.to_f32_vec()[0]), &what)?;
            let f = format!(
                "(sqil_clampf(sqil_round_even(v / {sc}) + {zp}, {}, {}) - {zp}) * {sc}",
                flit(lo as f32, &what)?,
                flit(hi as f32, &what)?
            );
            em.uses.insert("SQIL_USE_FAKEQUANT");
            if !em.consts.contains("sqil_clampf") {
                em.consts.push_str(
                    "static float sqil_clampf(float v, float lo, float hi)\n{\n    \
                     if (v != v) {\n        return v;\n    }\n    return v < lo ? lo : (v > hi ? hi : v);\n}\n",
                );
            }
            unary_f32(em, &x, &f);
        }
        Op::MatMul if const_of(1).is_none() => {
            // Two computed operands (attention's scores and mixing): per broadcast batch, each
            // output one fmaf chain over k from +0, the IR's policy GEMM (`sgemm_chain`).
            let (a, b) = (val(inputs[0].expect("MatMul A"))?, val(inputs[1].expect("MatMul B"))?);
            let arr = |j: usize, t: &Tensor, em: &mut Emitter| -> Result<String> {
                match const_of(j) {
                    Some(_) => em.const_array(&t.data.to_f32_vec(), &what),
                    None => Ok(loc[&inputs[j].expect("checked")].expr()),
                }
            };
            let (ae, be) = (arr(0, a, em)?, arr(1, b, em)?);
            if a.rank() < 2 || b.rank() < 2 {
                return Err(unsupported("a computed vector operand"));
            }
            let (m, k, nn) = (a.shape[a.rank() - 2], a.shape[a.rank() - 1], b.shape[b.rank() - 1]);
            let (ab, bb) = (&a.shape[..a.rank() - 2], &b.shape[..b.rank() - 2]);
            let batch = &yt.shape[..yt.rank() - 2];
            let (ia, ib) = (sqil_ir::ops::broadcast_indices(ab, batch), sqil_ir::ops::broadcast_indices(bb, batch));
            let items: Vec<String> =
                ia.iter().zip(&ib).flat_map(|(x, y)| [(x * m * k).to_string(), (y * k * nn).to_string()]).collect();
            let name = em.int_array(&items, 12);
            em.libm = true; // fmaf
            let _ = writeln!(
                em.body,
                "    {{\n        int32_t q, i, j, t;\n        for (q = 0; q < {}; q++) {{\n            \
                 const float *qa = {ae} + {name}[2 * q], *qb = {be} + {name}[2 * q + 1];\n            \
                 for (i = 0; i < {m}; i++) {{\n                for (j = 0; j < {nn}; j++) {{\n                    float acc = 0.0f;\n                    \
                 for (t = 0; t < {k}; t++) {{\n                        acc = fmaf(qa[i * {k} + t], qb[t * {nn} + j], acc);\n                    }}\n                    \
                 {ye}[(q * {m} + i) * {nn} + j] = acc;\n                }}\n            }}\n        }}\n    }}",
                ia.len()
            );
        }
        Op::Gemm { .. } | Op::MatMul => {
            let (trans_b, bias, alpha, beta) = match op {
                Op::Gemm { alpha, beta, trans_a: false, trans_b } => (*trans_b, const_of(2), *alpha, *beta),
                Op::Gemm { .. } => return Err(unsupported("transposed A")),
                _ => (false, None, 1.0, 1.0),
            };
            if inputs.get(2).copied().flatten().is_some() && bias.is_none() {
                return Err(unsupported("computed bias"));
            }
            let x = dyn_in(0)?;
            let Some(w) = const_of(1) else { return Err(unsupported("computed weight")) };
            if w.rank() != 2 {
                return Err(unsupported("weight of rank other than 2"));
            }
            // The IR's arithmetic (`alpha * chain + beta * c`) when alpha and beta are 1, as in
            // every exported policy; otherwise they are folded into the weights and bias.
            em.exact &= alpha == 1.0 && beta == 1.0;
            em.libm = true; // fmaf
            em.uses.insert("SQIL_USE_F32");
            // Stored [k][n], alpha folded in (alpha = 1 in every exported policy).
            let (k, nn, wk, bb) = sqil_ir::ops::dense_weight_kn(w, trans_b, alpha, bias, beta);
            let wname = em.const_array(&wk, &what)?;
            let bname = match bb {
                Some(bb) => em.const_array(&bb, &what)?,
                None => "0".into(),
            };
            let rows = n / nn;
            let _ = writeln!(
                em.body,
                "    {{\n        int32_t r;\n        for (r = 0; r < {rows}; r++) {{\n            \
                 sqil_gemv_f32({wname}, {nn}, {k}, {x} + r * {k}, {bname}, {ye} + r * {nn});\n        }}\n    }}"
            );
        }
        Op::LayerNorm { axis, epsilon } => {
            if outputs.len() > 1 {
                return Err(unsupported("mean / inverse std outputs"));
            }
            let x = dyn_in(0)?;
            let xt = val(inputs[0].expect("checked"))?;
            let rank = xt.rank() as i64;
            if !(*axis == -1 || *axis == rank - 1) {
                return Err(unsupported("normalisation over more than the last axis"));
            }
            let inner = *xt.shape.last().unwrap_or(&1);
            let Some(scale) = const_of(1) else { return Err(unsupported("computed scale")) };
            let sname = em.const_array(&broadcast_to(scale, &[inner]), &what)?;
            let bterm = match const_of(2) {
                Some(b) => format!(" + (double){}[j]", em.const_array(&broadcast_to(b, &[inner]), &what)?),
                None if inputs.get(2).copied().flatten().is_some() => return Err(unsupported("computed bias")),
                None => " + 0.0".into(),
            };
            em.libm = true;
            em.exact = false;
            let _ = writeln!(
                em.body,
                "    {{\n        int32_t o, j;\n        for (o = 0; o < {}; o++) {{\n            \
                 const float *row = {x} + o * {inner};\n            double s[4] = {{0.0, 0.0, 0.0, 0.0}}, mean, var, r;\n            \
                 for (j = 0; j < {inner}; j++) s[j & 3] += (double)row[j];\n            \
                 mean = ((s[0] + s[1]) + (s[2] + s[3])) / {inner}.0;\n            s[0] = s[1] = s[2] = s[3] = 0.0;\n            \
                 for (j = 0; j < {inner}; j++) s[j & 3] += ((double)row[j] - mean) * ((double)row[j] - mean);\n            \
                 var = ((s[0] + s[1]) + (s[2] + s[3])) / {inner}.0;\n            r = 1.0 / sqrt(var + (double){});\n            \
                 for (j = 0; j < {inner}; j++) {ye}[o * {inner} + j] = (float)(((double)row[j] - mean) * r * \
                 (double){sname}[j]{bterm});\n        }}\n    }}",
                n / inner,
                flit(*epsilon, &what)?
            );
        }
        Op::Concat { .. } | Op::Transpose { .. } | Op::Split { .. } | Op::Slice | Op::Gather { .. } | Op::Expand => {
            let args: Vec<Option<&Tensor>> = inputs.iter().map(|s| s.and_then(|s| env[s].as_ref())).collect();
            let exprs: Vec<Option<String>> =
                inputs.iter().map(|s| s.filter(|&s| !is_const[s]).map(|s| loc[&s].expr())).collect();
            let outs = outputs.iter().map(|&o| Ok((loc[&o].expr(), val(o)?))).collect::<Result<Vec<_>>>()?;
            moves::emit_movement(em, &what, op, &args, &exprs, &outs)?;
        }
        Op::BatchNorm { epsilon, training: false, .. } if outputs.len() == 1 => {
            // Inference: y = (x - mean) * (scale / sqrt(var + eps)) + B per channel, in double as
            // the IR computes it; the per-channel factor is computed here, with the IR's operations.
            let x = dyn_in(0)?;
            let xt = val(inputs[0].expect("checked"))?;
            let chans = xt.shape.get(1).copied().unwrap_or(1);
            let per_channel = |j: usize| -> Result<Vec<f64>> {
                match const_of(j) {
                    Some(t) if t.len() == chans => Ok(t.data.to_f64_vec()),
                    _ => Err(unsupported("computed or mis-sized statistics")),
                }
            };
            let (scale, bias, mean, var) = (per_channel(1)?, per_channel(2)?, per_channel(3)?, per_channel(4)?);
            let k: Vec<f64> = scale.iter().zip(&var).map(|(s, v)| s / (v + *epsilon as f64).sqrt()).collect();
            let [m, k, b] = [mean, k, bias].map(|v| em.const_array_f64(&v));
            let inner = n / (xt.shape[0] * chans).max(1);
            let _ = writeln!(
                em.body,
                "    {{\n        int32_t c, j;\n        for (c = 0; c < {}; c++) {{\n            for (j = 0; j < {inner}; j++) {{\n                \
                 {ye}[c * {inner} + j] = (float)(((double){x}[c * {inner} + j] - {m}[c % {chans}]) * {k}[c % {chans}] + {b}[c % {chans}]);\n            \
                 }}\n        }}\n    }}",
                xt.shape[0] * chans
            );
        }
        Op::MaxPool(p) | Op::AveragePool(p) if outputs.len() == 1 => {
            let x = dyn_in(0)?;
            let xt = val(inputs[0].expect("checked"))?;
            if xt.rank() != 4 {
                return Err(unsupported("pooling other than 2-D"));
            }
            let (geo, counts) = p.windows(&xt.shape[2..])?;
            let gname = em.int_array(&conv_geometry_items(xt.shape[1], &geo), 13);
            let is_max = matches!(op, Op::MaxPool(_));
            let (div, div0) = if is_max || counts.iter().all(|&c| c == counts[0]) {
                ("0".to_string(), counts.first().copied().unwrap_or(1).max(1))
            } else {
                let items: Vec<String> = counts.iter().map(|c| c.max(&1).to_string()).collect();
                (em.int_array(&items, 16), 1)
            };
            em.uses.insert("SQIL_USE_POOL");
            let _ = writeln!(
                em.body,
                "    sqil_pool2d({x}, {gname}, {}, {}, {div}, {div0}, {}, {ye});",
                xt.shape[0] * xt.shape[1],
                is_max as i32,
                sum_start()
            );
        }
        Op::GlobalAveragePool => {
            let x = dyn_in(0)?;
            let xt = val(inputs[0].expect("checked"))?;
            let inner = xt.len() / n.max(1);
            let _ = writeln!(
                em.body,
                "    {{\n        int32_t p, j;\n        for (p = 0; p < {n}; p++) {{\n            double s = {};\n            \
                 for (j = 0; j < {inner}; j++) s += (double){x}[p * {inner} + j];\n            {ye}[p] = (float)(s / {inner}.0);\n        }}\n    }}",
                sum_start()
            );
        }
        Op::Conv(c) => {
            let x = dyn_in(0)?;
            let xt = val(inputs[0].expect("checked"))?;
            let Some(w) = const_of(1) else { return Err(unsupported("computed weight")) };
            if xt.rank() != 4 || xt.shape[0] != 1 {
                return Err(unsupported("convolutions other than 2-D on one image"));
            }
            let g = c.input_geometry(&xt.shape, &w.shape)?;
            let mut geo = conv_geometry_items(xt.shape[1], &g);
            geo.push(c.group.to_string());
            let gname = em.int_array(&geo, 14);
            let wname = em.const_array(&w.data.to_f32_vec(), &what)?;
            let bname = match const_of(2) {
                Some(b) => em.const_array(&b.data.to_f32_vec(), &what)?,
                None if inputs.get(2).copied().flatten().is_some() => return Err(unsupported("computed bias")),
                None => "0".into(),
            };
            // The IR's convolution: im2col, then the policy GEMM's chain (`sgemm_chain`).
            em.libm = true; // fmaf
            em.uses.insert("SQIL_USE_CONV_F32");
            let _ = writeln!(em.body, "    sqil_conv_f32({x}, {gname}, {wname}, {}, {bname}, {ye});", w.shape[0]);
        }
        Op::Softmax { axis, .. } => {
            // Over the last axis (with opset < 13's coercion that is the same rows), as the
            // runtime defines it: in double, max, sqil's exponential (`sqil_exp_nonpos`, the same
            // IEEE operations as the runtime's, no libm), four interleaved partial sums, each
            // exponential divided by their total.
            let x = dyn_in(0)?;
            let rank = yt.rank() as i64;
            if !(*axis == -1 || *axis == rank - 1) {
                return Err(unsupported("softmax over other than the last axis"));
            }
            let dim = *yt.shape.last().unwrap_or(&1);
            exp_nonpos_c(em);
            let _ = writeln!(
                em.body,
                "    {{\n        int32_t o, j;\n        for (o = 0; o < {}; o++) {{\n            \
                 const float *row = {x} + o * {dim};\n            double m = 0.0, s[4] = {{0.0, 0.0, 0.0, 0.0}}, tot;\n            \
                 int seen = 0;\n            \
                 /* The maximum, NaN skipped (a row of NaN gives NaN whatever m is). */\n            \
                 for (j = 0; j < {dim}; j++) if (row[j] == row[j] && (!seen || (double)row[j] > m)) {{ m = (double)row[j]; seen = 1; }}\n            \
                 for (j = 0; j < {dim}; j++) s[j & 3] += sqil_exp_nonpos((double)row[j] - m);\n            \
                 tot = (s[0] + s[1]) + (s[2] + s[3]);\n            \
                 for (j = 0; j < {dim}; j++) {ye}[o * {dim} + j] = (float)(sqil_exp_nonpos((double)row[j] - m) / tot);\n        }}\n    }}",
                n / dim.max(1)
            );
        }
        _ => return Err(unsupported("op")),
    }
    Ok(())
}

/// A self-test program for a generated policy: `states` (per state, per input, the values) run
/// through `{prefix}_act`, each output printed as hex bits on its own line (`out S J BITS`), and
/// compared with `expected` (the runtime's outputs): a summary line with the count of
/// bit-identical values and the largest difference relative to the largest |expected|; exit
/// status 1 if that exceeds `tol`. Uses `stdio.h` (hosted or semihosted targets).
pub fn selftest(prefix: &str, states: &[Vec<Vec<f32>>], expected: &[Vec<Vec<f32>>], tol: f32) -> Result<String> {
    let prefix = c_ident(prefix);
    let upper = prefix.to_uppercase();
    let (Some(s0), Some(e0)) = (states.first(), expected.first()) else {
        return Err(IrError::Invalid("selftest: no states".into()));
    };
    let (ni, no) = (s0.len(), e0.len());
    let mut c = String::new();
    let _ = writeln!(
        c,
        "/* Generated by sqil: self-test of {prefix}_act against the runtime's outputs. */\n\
         #include <stdint.h>\n#include <stdio.h>\n#include <string.h>\n#include \"{prefix}.h\"\n\n#define STATES {}\n",
        states.len()
    );
    for i in 0..ni {
        let _ = writeln!(c, "static const float in{i}[STATES][{upper}_INPUT{i}_SIZE] = {{");
        for s in states {
            let vals: Vec<String> = s[i].iter().map(|v| flit(*v, "selftest state")).collect::<Result<_>>()?;
            let _ = writeln!(c, "    {{{}}},", vals.join(", "));
        }
        c.push_str("};\n");
    }
    for j in 0..no {
        let _ = writeln!(c, "static const uint32_t want{j}[STATES][{upper}_OUTPUT{j}_SIZE] = {{");
        for e in expected {
            let vals: Vec<String> = e[j].iter().map(|v| format!("{:#010x}u", v.to_bits())).collect();
            let _ = writeln!(c, "    {{{}}},", vals.join(", "));
        }
        c.push_str("};\n");
        let _ = writeln!(c, "static float out{j}[{upper}_OUTPUT{j}_SIZE];");
    }
    let args: Vec<String> = (0..ni).map(|i| format!("in{i}[s]")).chain((0..no).map(|j| format!("out{j}"))).collect();
    let _ = writeln!(
        c,
        "\nstatic float absf(float v)\n{{\n    return v < 0.0f ? -v : v;\n}}\n\nint main(void)\n{{\n    \
         int s, j, same = 0, total = 0;\n    float maxdiff = 0.0f, maxabs = 1e-6f;\n    \
         for (s = 0; s < STATES; s++) {{\n        {prefix}_act({});",
        args.join(", ")
    );
    for j in 0..no {
        let _ = writeln!(
            c,
            "        for (j = 0; j < {upper}_OUTPUT{j}_SIZE; j++) {{\n            uint32_t bits;\n            float w;\n            \
             memcpy(&bits, &out{j}[j], 4);\n            memcpy(&w, &want{j}[s][j], 4);\n            \
             printf(\"out %d {j} %08lx\\n\", s, (unsigned long)bits);\n            same += bits == want{j}[s][j];\n            \
             total++;\n            if (absf(w) > maxabs) maxabs = absf(w);\n            \
             if (!(absf(out{j}[j] - w) <= maxdiff)) maxdiff = absf(out{j}[j] - w);\n        }}"
        );
    }
    let _ = writeln!(
        c,
        "    }}\n    printf(\"selftest: %d/%d outputs bit-identical, max rel diff %.3e\\n\", same, total, \
         (double)(maxdiff / maxabs));\n    return maxdiff / maxabs <= {} ? 0 : 1;\n}}",
        flit(tol, "tolerance")?
    );
    Ok(c)
}

/// Emits `sqil_exp_nonpos` (sqil's exponential for x <= 0: the runtime's IEEE operations, no
/// libm) once.
fn exp_nonpos_c(em: &mut Emitter) {
    if em.consts.contains("sqil_exp_nonpos") {
        return;
    }
    use sqil_kernels_cpu::generic::{EXP_LN2_HI, EXP_LN2_LO, EXP_MAGIC, EXP_TAYLOR};
    let taylor: Vec<String> = EXP_TAYLOR.iter().map(|c| format!("{c:?}")).collect();
    let _ = write!(
        em.consts,
        "/* e^x for x <= 0: x = n ln 2 + r, a degree-13 Taylor polynomial of e^r, times 2^n
              * from its bits; 0 at or below -708; NaN stays NaN (sqil_kernels_cpu::exp_nonpos). */
             static double sqil_exp_nonpos(double x)
{{
                 static const double c[14] = {{{}}};
                 double t, n, r, p, s;
    uint64_t b;
    int k;
                 if (!(x > -708.0)) {{
return x != x ? x : 0.0;
    }}
                 t = x * {:?} + {:?};
    n = t - {:?};
    r = (x - n * {:?}) - n * {:?};
                 p = c[13];
    for (k = 12; k >= 0; k--) {{
p = p * r + c[k];
    }}
                 memcpy(&b, &t, sizeof b);
    b = ((b - UINT64_C({:#x})) + 1023u) << 52;
                 memcpy(&s, &b, sizeof s);
    return p * s;
}}
",
        taylor.join(", "),
        std::f64::consts::LOG2_E,
        EXP_MAGIC,
        EXP_MAGIC,
        EXP_LN2_HI,
        EXP_LN2_LO,
        EXP_MAGIC.to_bits()
    );
}

/// Emits the C twin of one of sqil's activations on `exp_nonpos` (`sqil_kernels_cpu::generic::
/// {sigmoid, tanh, softplus, elu}`), once: the same double operations in the same order (C99
/// does not contract them into FMAs), so the firmware gives the runtime's bits, with no libm.
fn activation_c(em: &mut Emitter, name: &str) {
    use sqil_kernels_cpu::generic::{ATANH_SERIES, EXPM1_TAYLOR, TANH_SMALL, TANH_TAYLOR};
    exp_nonpos_c(em);
    let fname = format!("sqil_{name}");
    if em.consts.contains(&format!("double {fname}(")) {
        return;
    }
    let lit = |v: f64| format!("{v:?}");
    let body = match name {
        "sigmoid" => "double e = sqil_exp_nonpos(x < 0.0 ? x : -x);\n    return x >= 0.0 ? 1.0 / (1.0 + e) : e / (1.0 + e);".to_string(),
        "tanh" => format!(
            "double a = x < 0.0 ? -x : x, t, a2;\n    uint64_t bt, bx;\n    if (a < {}) {{\n        a2 = a * a;\n        \
             t = a + a * a2 * ({} + a2 * ({} + a2 * {}));\n    }} else {{\n        double e = sqil_exp_nonpos(-2.0 * a);\n        \
             t = (1.0 - e) / (1.0 + e);\n    }}\n    /* copysign(t, x) */\n    memcpy(&bt, &t, sizeof bt);\n    memcpy(&bx, &x, sizeof bx);\n    \
             bt = (bt & ~(UINT64_C(1) << 63)) | (bx & (UINT64_C(1) << 63));\n    memcpy(&t, &bt, sizeof t);\n    return t;",
            lit(TANH_SMALL), lit(TANH_TAYLOR[0]), lit(TANH_TAYLOR[1]), lit(TANH_TAYLOR[2])
        ),
        "softplus" => format!(
            "static const double c[18] = {{{}}};\n    double t = sqil_exp_nonpos(x < 0.0 ? x : -x), s, z, p;\n    int k;\n    \
             s = t / (2.0 + t);\n    z = s * s;\n    p = c[17];\n    for (k = 16; k >= 0; k--) {{\n        p = p * z + c[k];\n    }}\n    \
             return (x > 0.0 ? x : 0.0) + 2.0 * s * p;",
            ATANH_SERIES.iter().map(|&c| lit(c)).collect::<Vec<_>>().join(", ")
        ),
        _ => format!(
            "double m;\n    if (!(x < 0.0)) {{\n        return x;\n    }}\n    if (x > {}) {{\n        \
             m = x + x * x * ({} + x * ({} + x * ({} + x * {})));\n    }} else {{\n        m = sqil_exp_nonpos(x) - 1.0;\n    }}\n    \
             return alpha * m;",
            lit(-TANH_SMALL), lit(EXPM1_TAYLOR[0]), lit(EXPM1_TAYLOR[1]), lit(EXPM1_TAYLOR[2]), lit(EXPM1_TAYLOR[3])
        ),
    };
    let args = if name == "elu" { "double x, double alpha" } else { "double x" };
    let _ = write!(
        em.consts,
        "/* sqil_kernels_cpu::generic::{name} */\nstatic double {fname}({args})\n{{\n    {body}\n}}\n"
    );
}
