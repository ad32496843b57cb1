//! A planned policy (`sqil_runtime::Plan`, the CPU plan) run on the GPU, one state at a time:
//! int4 layers on the `q4_gemv` kernels (fp16 activations, bias and ReLU fused), activation
//! quantizers and element-wise steps on `policy_ops.cu` (the observation stays fp32 up to its
//! first step, e.g. the normalisation), every buffer allocated once, the whole
//! step list captured once in a CUDA graph and replayed per action, with one copy in and one
//! copy out.
//!
//! Precision: activations are fp16 between steps (the CPU plan keeps f32), so actions agree with
//! the CPU runtime within fp16 rounding ([`GPU_TOL`]); a W4A8 activation quantizer can land on
//! the other side of a rounding boundary than on the CPU, which the tolerance covers for the
//! policies tested.

use crate::{pack_grouped, DeviceQ4, Gpu, HostQ4};
use cudarc::driver::{sys, CudaGraph, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};
use half::f16;
use sqil_ir::ops::{BinaryOp, Op, UnaryOp};
use sqil_ir::Tensor;
use sqil_runtime::plan::{ActQuant, Step};
use sqil_runtime::Policy;
use std::sync::Arc;

/// Largest |GPU - CPU runtime| on an action relative to the largest |action| that the GPU check
/// accepts (fp16 activations: 2^-11 relative per rounding, over a few layers).
pub const GPU_TOL: f32 = 2e-2;

/// A lowered step; `W`, `B`, `C` are the int4 weights, fp16 bias and fp32 constant as stored on
/// the host ([`Lowered`]) or on the device ([`GpuPolicy`]), `A` a generic kernel's constant array.
pub enum LStep<W, B, C, A> {
    /// int4 layer on buffer `x` into `y` (one row: the GEMV kernels).
    Q4 { w: W, bias: Option<B>, relu: bool, x: usize, y: usize },
    /// Activation quantizer `x` -> `y`.
    Quant { x: usize, y: usize, n: usize, s: f32, z: f32, lo: f32, hi: f32 },
    /// `y = x op c` (op 0 add, 1 sub, 2 mul, 3 div).
    Binary { x: usize, y: usize, c: C, n: usize, op: i32 },
    /// A binary step on the fp32 input values at `off`.
    BinaryIn { off: usize, y: usize, c: C, n: usize, op: i32 },
    /// The fp32 input values at `off` cast to fp16 (into buffer `y`).
    CastIn { off: usize, y: usize, n: usize },
    /// `y = clamp(f(x), lo, hi)` (op 0 relu, 1 tanh, 2 sigmoid, 3 neg, 4 identity).
    Unary { x: usize, y: usize, n: usize, op: i32, lo: f32, hi: f32 },
    /// Any other kernel of `policy_ops.cu`: its arguments in order, `threads` threads in blocks
    /// of 256.
    Kernel { name: &'static str, args: Vec<KArg<A>>, threads: usize },
}

/// A constant array argument of a generic kernel step, on the host.
#[derive(Clone, Debug)]
pub enum HostArr {
    F32(Vec<f32>),
    I32(Vec<i32>),
    U32(Vec<u32>),
    F16(Vec<f16>),
}

/// [`HostArr`] on the device.
pub enum DevArr {
    F32(CudaSlice<f32>),
    I32(CudaSlice<i32>),
    U32(CudaSlice<u32>),
    F16(CudaSlice<f16>),
}

/// An argument of a generic kernel step.
#[derive(Clone, Debug)]
pub enum KArg<A> {
    /// An fp16 activation buffer.
    Buf(usize),
    /// A constant array.
    Arr(A),
    /// A null pointer (an absent operand).
    Null,
    I32(i32),
    F32(f32),
}

/// A policy lowered for the GPU, independent of any device: fp16 buffers (sizes padded to 128),
/// the steps over them, the fp32 inputs (concatenated: one copy in) and the output buffer.
pub struct Lowered {
    pub bufs: Vec<usize>,
    pub steps: Vec<LStep<HostQ4, Vec<f16>, Vec<f32>, HostArr>>,
    /// The inputs' lengths, in order; they sit one after another in one fp32 buffer.
    pub in_lens: Vec<usize>,
    pub in_len: usize,
    pub output: usize,
    pub out_len: usize,
    pub describe: Vec<String>,
    /// Per lowered step, the kernel and the plan step it comes from (for profiles).
    pub labels: Vec<String>,
}

type GStep = LStep<DeviceQ4, CudaSlice<f16>, CudaSlice<f32>, DevArr>;

pub struct GpuPolicy {
    stream: Arc<CudaStream>,
    steps: Vec<GStep>,
    bufs: Vec<CudaSlice<f16>>,
    /// The observations, fp32, concatenated.
    input: CudaSlice<f32>,
    in_len: usize,
    output: usize,
    out_len: usize,
    graph: Option<CudaGraph>,
    /// One line per step (for reports).
    pub describe: Vec<String>,
    /// Per lowered step, its kernel and plan step.
    pub labels: Vec<String>,
}

fn err<E: std::fmt::Debug>(e: E) -> String {
    format!("{e:?}")
}

fn cfg(n: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: ((n as u32).div_ceil(256).max(1), 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

type HStep = LStep<HostQ4, Vec<f16>, Vec<f32>, HostArr>;

/// int4 weights in the CUDA layout: groups that are not 32, 64 or 128 (per-channel scales)
/// expand to 32.
fn cuda_weights(w: &sqil_kernels_cpu::PackedQ4) -> HostQ4 {
    let q: Vec<i8> = (0..w.n * w.k).map(|i| w.get(i / w.k, i % w.k)).collect();
    let kp = w.k.div_ceil(128) * 128;
    let group = if matches!(w.group, 32 | 64 | 128) { w.group } else { 32 };
    let groups = w.groups();
    let scales: Vec<f32> = (0..w.n * kp / group)
        .map(|i| {
            let (r, g) = (i / (kp / group), i % (kp / group));
            w.scales[r * groups + ((g * group) / w.group).min(groups - 1)]
        })
        .collect();
    pack_grouped(&q, &scales, w.n, w.k, group)
}

fn kernel(name: &'static str, threads: usize, args: Vec<KArg<HostArr>>) -> HStep {
    LStep::Kernel { name, args, threads }
}

fn f32_arr(v: Vec<f32>) -> KArg<HostArr> {
    KArg::Arr(HostArr::F32(v))
}

fn i32_arr<T: TryInto<i32> + Copy>(v: &[T]) -> KArg<HostArr> {
    KArg::Arr(HostArr::I32(v.iter().map(|&x| x.try_into().unwrap_or(i32::MAX)).collect()))
}

fn int(v: usize) -> KArg<HostArr> {
    KArg::I32(v as i32)
}

/// Lowers `policy` (one output, every input dimension but the batch known) for the GPU: the
/// plan's steps over fp16 buffers, int4 layers repacked in the CUDA layout.
pub fn lower(policy: &Policy) -> Result<Lowered, String> {
    let plan = &policy.plan;
    if plan.outputs.len() != 1 {
        return Err("the GPU policy has one output".into());
    }
    let mut feeds = vec![];
    for shape in policy.input_shapes() {
        let dims: Vec<usize> = shape
            .iter()
            .enumerate()
            .map(|(d, x)| if d == 0 { Some(1) } else { x.known() })
            .collect::<Option<_>>()
            .ok_or("the inputs' dimensions must be known")?;
        let n: usize = dims.iter().product();
        feeds.push(Tensor::from_f32(dims, vec![0.0; n]).map_err(err)?);
    }
    let in_lens: Vec<usize> = feeds.iter().map(|t| t.len()).collect();
    let in_offs: Vec<usize> = in_lens.iter().scan(0, |a, &n| Some(std::mem::replace(a, *a + n))).collect();
    let env = plan.trace(&feeds, 1).map_err(err)?;
    let mut slot_buf = vec![usize::MAX; plan.slots];
    let mut bufs: Vec<usize> = vec![];
    let new_buf = |len: usize, bufs: &mut Vec<usize>| {
        // Padded to 128 with zeros: the int4 kernels read whole groups of 128.
        bufs.push(len.div_ceil(128).max(1) * 128);
        bufs.len() - 1
    };
    let mut buf_for = |s: usize, bufs: &mut Vec<usize>| -> Result<usize, String> {
        if slot_buf[s] == usize::MAX {
            let len = env[s].as_ref().ok_or("a value was not computed")?.len();
            slot_buf[s] = new_buf(len, bufs);
        }
        Ok(slot_buf[s])
    };
    let mut is_const: Vec<bool> = {
        let mut c = vec![false; plan.slots];
        for (s, _) in &plan.consts {
            c[*s] = true;
        }
        c
    };
    let input_of = |s: usize| plan.inputs.iter().position(|(_, slot)| *slot == s);
    let mut cast_done = vec![false; plan.inputs.len()];
    let mut steps: Vec<HStep> = vec![];
    let mut describe = vec![];
    // The fp16 buffer of computed value `s` (an input is cast to fp16 on first use).
    macro_rules! dyn_buf {
        ($s:expr) => {{
            let s = $s;
            let b = buf_for(s, &mut bufs)?;
            if let Some(i) = input_of(s) {
                if !cast_done[i] {
                    steps.push(LStep::CastIn { off: in_offs[i], y: b, n: in_lens[i] });
                    cast_done[i] = true;
                }
            }
            b
        }};
    }
    let mut labels: Vec<String> = vec![];
    for (st, d) in plan.steps.iter().zip(plan.describe()) {
        // Label the steps lowered for the previous plan step.
        if let Some(prev) = describe.last() {
            while labels.len() < steps.len() {
                labels.push(format!("{}: {prev}", step_kernel(&steps[labels.len()])));
            }
        }
        let unsupported = |why: &str| format!("step `{d}`: not supported by the GPU policy ({why})");
        let val = |s: usize| env[s].as_ref().ok_or_else(|| unsupported("a value was not computed"));
        match st {
            Step::Q4Linear { x, y, act, w, bias, relu, conv, .. } => {
                let xt = val(*x)?;
                let mut xb = dyn_buf!(*x);
                // The activation quantizer: its own step before a GEMV, fused into the many-row
                // kernels (into im2col for a convolution); a zero scale means none.
                let quant = match act {
                    ActQuant::Int { scale, zero, lo, hi } => [*scale, *zero as f32, *lo as f32, *hi as f32],
                    ActQuant::Float => [0.0; 4],
                };
                let yb = buf_for(*y, &mut bufs)?;
                let h = cuda_weights(w);
                let bias16: Option<Vec<f16>> = bias.as_ref().map(|b| b.iter().map(|&v| f16::from_f32(v)).collect());
                let rows = match conv {
                    Some(im) => im.table.len() / im.geo.kernel_len().max(1),
                    None => xt.len() / w.k.max(1),
                };
                if conv.is_none() && rows == 1 {
                    if let ActQuant::Int { .. } = act {
                        let n = xt.len();
                        let qb = new_buf(n, &mut bufs);
                        let [s, z, lo, hi] = quant;
                        steps.push(LStep::Quant { x: xb, y: qb, n, s, z, lo, hi });
                        xb = qb;
                    }
                    steps.push(LStep::Q4 { w: h, bias: bias16, relu: *relu, x: xb, y: yb });
                } else {
                    let mut row_quant = quant;
                    // Many rows (tokens, or a convolution's output positions after im2col).
                    if let Some(im) = conv {
                        if im.geo.input.len() != 2 && im.geo.input.len() != 1 {
                            return Err(unsupported("convolutions of rank other than 1 or 2"));
                        }
                        let taps = im.geo.kernel_len();
                        let cols = new_buf(rows * w.k, &mut bufs);
                        let table: Vec<u32> = im.table.clone();
                        steps.push(kernel(
                            "sqil_im2col",
                            rows * w.k,
                            vec![
                                KArg::Buf(xb),
                                KArg::Arr(HostArr::U32(table)),
                                KArg::Buf(cols),
                                int(rows),
                                int(taps),
                                int(im.channels),
                                int(im.geo.input_len()),
                                KArg::F32(quant[0]),
                                KArg::F32(quant[1]),
                                KArg::F32(quant[2]),
                                KArg::F32(quant[3]),
                            ],
                        ));
                        xb = cols;
                        row_quant = [0.0; 4];
                    }
                    steps.push(kernel(
                        "sqil_q4_rows",
                        rows * w.n,
                        vec![
                            KArg::Arr(HostArr::U32(h.words.clone())),
                            KArg::Arr(HostArr::F16(h.scales.clone())),
                            KArg::Buf(xb),
                            bias16.map_or(KArg::Null, |b| KArg::Arr(HostArr::F16(b))),
                            KArg::Buf(yb),
                            int(rows),
                            int(w.n),
                            int(w.k),
                            int(h.k),
                            int(h.group),
                            KArg::I32(*relu as i32),
                            KArg::I32(conv.is_some() as i32),
                            KArg::F32(row_quant[0]),
                            KArg::F32(row_quant[1]),
                            KArg::F32(row_quant[2]),
                            KArg::F32(row_quant[3]),
                        ],
                    ));
                }
            }
            // Constant steps fold (their traced values are constants), and so does Shape: one
            // state of known shape makes a transformer's shape arithmetic constant.
            Step::Op { op, inputs, outputs, .. }
                if inputs.iter().flatten().all(|&s| is_const[s]) || matches!(op, Op::Shape { .. }) =>
            {
                outputs.iter().for_each(|&s| is_const[s] = true);
                continue;
            }
            Step::Op { op, inputs, outputs, .. } => {
                let y = outputs[0];
                let yt = val(y)?;
                let n = yt.len();
                let dynamic: Vec<usize> = inputs.iter().flatten().copied().filter(|&s| !is_const[s]).collect();
                let cval =
                    |j: usize| inputs.get(j).copied().flatten().filter(|&s| is_const[s]).and_then(|s| env[s].as_ref());
                let all = (f32::NEG_INFINITY, f32::INFINITY);
                // The MLP steps: one computed input, element-wise with constants.
                let simple = dynamic.len() == 1
                    && outputs.len() == 1
                    && match op {
                        Op::Binary(b) => *b != BinaryOp::Pow && inputs[0] == Some(dynamic[0]) && cval(1).is_some(),
                        Op::Unary(UnaryOp::Relu | UnaryOp::Tanh | UnaryOp::Sigmoid | UnaryOp::Neg) => true,
                        Op::Clip => inputs.iter().skip(1).flatten().all(|&s| is_const[s]),
                        Op::Identity | Op::Reshape { .. } | Op::Flatten { .. } | Op::Squeeze | Op::Unsqueeze => true,
                        _ => false,
                    };
                if simple {
                    let yb = buf_for(y, &mut bufs)?;
                    match op {
                        Op::Binary(b) => {
                            let c = cval(1).ok_or_else(|| unsupported("constant"))?;
                            let cv = c.data.to_f32_vec();
                            let full: Vec<f32> = sqil_ir::ops::broadcast_indices(&c.shape, &yt.shape)
                                .into_iter()
                                .map(|i| cv[i])
                                .collect();
                            let op = match b {
                                BinaryOp::Add => 0,
                                BinaryOp::Sub => 1,
                                BinaryOp::Mul => 2,
                                _ => 3,
                            };
                            // The first step on an input reads it in fp32 (the observation's
                            // normalisation keeps its low bits).
                            match input_of(dynamic[0]).filter(|&i| !cast_done[i]) {
                                Some(i) => steps.push(LStep::BinaryIn { off: in_offs[i], y: yb, c: full, n, op }),
                                None => {
                                    let x = dyn_buf!(dynamic[0]);
                                    steps.push(LStep::Binary { x, y: yb, c: full, n, op })
                                }
                            }
                        }
                        Op::Unary(u) => {
                            let x = dyn_buf!(dynamic[0]);
                            let op = match u {
                                UnaryOp::Relu => 0,
                                UnaryOp::Tanh => 1,
                                UnaryOp::Sigmoid => 2,
                                _ => 3,
                            };
                            steps.push(LStep::Unary { x, y: yb, n, op, lo: all.0, hi: all.1 });
                        }
                        Op::Clip => {
                            let x = dyn_buf!(dynamic[0]);
                            let b = |j| cval(j).map(|t: &Tensor| t.data.to_f32_vec()[0]);
                            let (lo, hi) = (b(1).unwrap_or(all.0), b(2).unwrap_or(all.1));
                            steps.push(LStep::Unary { x, y: yb, n, op: 4, lo, hi });
                        }
                        _ => {
                            let x = dyn_buf!(dynamic[0]);
                            steps.push(LStep::Unary { x, y: yb, n, op: 4, lo: all.0, hi: all.1 });
                        }
                    }
                } else {
                    let mut ctx = Generic { env: &env, is_const: &is_const, inputs, outputs, what: &d };
                    let mut bufs_of = vec![None; inputs.len()];
                    for (j, s) in inputs.iter().enumerate() {
                        if let Some(s) = s.filter(|&s| !is_const[s]) {
                            bufs_of[j] = Some(dyn_buf!(s));
                        }
                    }
                    let outs =
                        outputs.iter().map(|&o| buf_for(o, &mut bufs)).collect::<Result<Vec<usize>, String>>()?;
                    lower_generic(&mut ctx, op, &bufs_of, &outs, &mut steps)?;
                }
            }
        }
        describe.push(d);
    }
    if let Some(prev) = describe.last() {
        while labels.len() < steps.len() {
            labels.push(format!("{}: {prev}", step_kernel(&steps[labels.len()])));
        }
    }
    if input_of(plan.outputs[0]).is_some() {
        return Err("the policy's output is its input".into());
    }
    let output = buf_for(plan.outputs[0], &mut bufs)?;
    let out_len = env[plan.outputs[0]].as_ref().map_or(0, |t| t.len());
    let in_len = in_lens.iter().sum();
    Ok(Lowered { bufs, steps, in_lens, in_len, output, out_len, describe, labels })
}

/// The kernel a lowered step launches.
fn step_kernel<W, B, C, A>(s: &LStep<W, B, C, A>) -> &'static str {
    match s {
        LStep::Q4 { .. } => "sqil_q4_gemv",
        LStep::Quant { .. } => "sqil_fake_quant",
        LStep::Binary { .. } => "sqil_binary_const",
        LStep::BinaryIn { .. } => "sqil_binary_const_f32in",
        LStep::CastIn { .. } => "sqil_cast_f32_f16",
        LStep::Unary { .. } => "sqil_unary",
        LStep::Kernel { name, .. } => name,
    }
}

/// What [`lower_generic`] reads of the traced plan.
struct Generic<'a> {
    env: &'a [Option<Tensor>],
    is_const: &'a [bool],
    inputs: &'a [Option<usize>],
    outputs: &'a [usize],
    what: &'a str,
}

impl Generic<'_> {
    fn err(&self, why: &str) -> String {
        format!("step `{}`: not supported by the GPU policy ({why})", self.what)
    }

    fn val(&self, j: usize) -> Result<&Tensor, String> {
        self.inputs
            .get(j)
            .copied()
            .flatten()
            .and_then(|s| self.env[s].as_ref())
            .ok_or_else(|| self.err(&format!("input {j} missing")))
    }

    fn constant(&self, j: usize) -> Option<&Tensor> {
        let s = self.inputs.get(j).copied().flatten()?;
        if self.is_const[s] {
            self.env[s].as_ref()
        } else {
            None
        }
    }

    fn out(&self, o: usize) -> Result<&Tensor, String> {
        self.env[self.outputs[o]].as_ref().ok_or_else(|| self.err("output not computed"))
    }
}

/// Ops beyond the MLP subset, each as generic kernel steps of `policy_ops.cu`. `xb[j]`: the
/// buffer of computed input j; `yb`: the outputs' buffers.
fn lower_generic(
    g: &mut Generic,
    op: &Op,
    xb: &[Option<usize>],
    yb: &[usize],
    steps: &mut Vec<HStep>,
) -> Result<(), String> {
    let yt = g.out(0)?.clone();
    let n = yt.len();
    let x0 = || xb.first().copied().flatten().ok_or_else(|| g.err("the first input must be computed"));
    // An operand: a buffer, or a constant array (fp32), with a broadcast index table unless it
    // has the output's shape.
    let operand = |j: usize| -> Result<[KArg<HostArr>; 3], String> {
        let t = g.val(j)?;
        let idx = if t.shape == yt.shape {
            KArg::Null
        } else {
            i32_arr(&sqil_ir::ops::broadcast_indices(&t.shape, &yt.shape))
        };
        Ok(match xb.get(j).copied().flatten() {
            Some(b) => [KArg::Buf(b), KArg::Null, idx],
            None => [KArg::Null, f32_arr(t.data.to_f32_vec()), idx],
        })
    };
    match op {
        _ if sqil_ir::ops::movement::is_movement(op) => {
            use sqil_ir::ops::movement::{copy_sources, CopySrc};
            let args: Vec<Option<&Tensor>> = g.inputs.iter().map(|s| s.and_then(|s| g.env[s].as_ref())).collect();
            let computed: Vec<bool> = xb.iter().map(Option::is_some).collect();
            let src = copy_sources(op, &args, &computed, yb.len(), g.what).map_err(|e| e.to_string())?;
            for (o, &y) in yb.iter().enumerate() {
                let vals = g.out(o)?.data.to_f32_vec();
                let consts: Vec<usize> = (0..vals.len()).filter(|&i| src[o][i] == CopySrc::Const).collect();
                if !consts.is_empty() {
                    let v: Vec<f32> = consts.iter().map(|&i| vals[i]).collect();
                    steps.push(kernel(
                        "sqil_set_consts",
                        consts.len(),
                        vec![KArg::Buf(y), i32_arr(&consts), f32_arr(v), int(consts.len())],
                    ));
                }
                for (j, b) in xb.iter().enumerate() {
                    let Some(b) = b else { continue };
                    let pairs: Vec<usize> = src[o]
                        .iter()
                        .enumerate()
                        .filter_map(|(i, s)| match *s {
                            CopySrc::Input(jj, k) if jj == j => Some([i, k]),
                            _ => None,
                        })
                        .flatten()
                        .collect();
                    if !pairs.is_empty() {
                        let m = pairs.len() / 2;
                        steps.push(kernel(
                            "sqil_copy_pairs",
                            m,
                            vec![KArg::Buf(*b), KArg::Buf(y), i32_arr(&pairs), int(m)],
                        ));
                    }
                }
            }
        }
        Op::Binary(b) if *b != BinaryOp::Pow => {
            let code = match b {
                BinaryOp::Add => 0,
                BinaryOp::Sub => 1,
                BinaryOp::Mul => 2,
                _ => 3,
            };
            let mut args: Vec<KArg<HostArr>> = operand(0)?.into_iter().chain(operand(1)?).collect();
            args.extend([KArg::Buf(yb[0]), int(n), KArg::I32(code)]);
            steps.push(kernel("sqil_binary_bcast", n, args));
        }
        Op::PRelu => {
            let mut args: Vec<KArg<HostArr>> = operand(0)?.into_iter().chain(operand(1)?).collect();
            args.extend([KArg::Buf(yb[0]), int(n), KArg::I32(4)]);
            steps.push(kernel("sqil_binary_bcast", n, args));
        }
        Op::Unary(_) | Op::LeakyRelu { .. } | Op::Elu { .. } | Op::Gelu { .. } => {
            let (code, alpha) = match op {
                Op::Unary(UnaryOp::Exp) => (0, 0.0),
                Op::Unary(UnaryOp::Log) => (1, 0.0),
                Op::Unary(UnaryOp::Sqrt) => (2, 0.0),
                Op::Unary(UnaryOp::Erf) => (3, 0.0),
                Op::Unary(UnaryOp::Softplus) => (4, 0.0),
                Op::Gelu { tanh: false } => (5, 0.0),
                Op::Gelu { tanh: true } => (6, 0.0),
                Op::LeakyRelu { alpha } => (7, *alpha),
                Op::Elu { alpha } => (8, *alpha),
                Op::Unary(UnaryOp::Abs) => (9, 0.0),
                Op::Unary(UnaryOp::Reciprocal) => (10, 0.0),
                _ => return Err(g.err("this unary op")),
            };
            let args = vec![KArg::Buf(x0()?), KArg::Buf(yb[0]), int(n), KArg::I32(code), KArg::F32(alpha)];
            steps.push(kernel("sqil_unary_more", n, args));
        }
        Op::FakeQuant { bits, signed, .. } => {
            let (Some(s), z) = (g.constant(1), g.constant(2)) else { return Err(g.err("computed scale")) };
            if s.len() != 1 || z.is_some_and(|z| z.len() != 1) {
                return Err(g.err("only per-tensor activation quantizers"));
            }
            let (lo, hi) = sqil_ir::ops::quant::fake_quant_range(*bits, *signed);
            let z = z.map_or(0.0, |z| z.data.to_f32_vec()[0]);
            let (x, y) = (x0()?, yb[0]);
            steps.push(LStep::Quant { x, y, n, s: s.data.to_f32_vec()[0], z, lo: lo as f32, hi: hi as f32 });
        }
        Op::Softmax { axis, .. } | Op::LayerNorm { axis, .. } => {
            let rank = yt.rank() as i64;
            if !(*axis == -1 || *axis == rank - 1) {
                return Err(g.err("only over the last axis"));
            }
            let dim = *yt.shape.last().unwrap_or(&1);
            let rows = n / dim.max(1);
            let (x, y) = (x0()?, yb[0]);
            if let Op::LayerNorm { epsilon, .. } = op {
                if g.outputs.len() > 1 {
                    return Err(g.err("mean / inverse std outputs"));
                }
                let bcast = |t: &Tensor| -> Vec<f32> {
                    let v = t.data.to_f32_vec();
                    sqil_ir::ops::broadcast_indices(&t.shape, &[dim]).into_iter().map(|i| v[i]).collect()
                };
                let scale = g.constant(1).ok_or_else(|| g.err("computed scale"))?;
                let bias = match g.constant(2) {
                    Some(b) => f32_arr(bcast(b)),
                    None if g.inputs.get(2).copied().flatten().is_some() => return Err(g.err("computed bias")),
                    None => KArg::Null,
                };
                let args = vec![
                    KArg::Buf(x),
                    KArg::Buf(y),
                    f32_arr(bcast(scale)),
                    bias,
                    int(rows),
                    int(dim),
                    KArg::F32(*epsilon),
                ];
                steps.push(kernel("sqil_layernorm_rows", rows * 32, args));
            } else {
                steps.push(kernel(
                    "sqil_softmax_rows",
                    rows * 32,
                    vec![KArg::Buf(x), KArg::Buf(y), int(rows), int(dim)],
                ));
            }
        }
        Op::MatMul if g.constant(1).is_none() => {
            let (a, b) = (g.val(0)?, g.val(1)?);
            let (Some(ab), Some(bb)) = (xb[0], xb[1]) else { return Err(g.err("a constant left operand")) };
            if a.rank() < 2 || b.rank() < 2 {
                return Err(g.err("a computed vector operand"));
            }
            let (m, k, nn) = (a.shape[a.rank() - 2], a.shape[a.rank() - 1], b.shape[b.rank() - 1]);
            let batch = &yt.shape[..yt.rank() - 2];
            let ia = sqil_ir::ops::broadcast_indices(&a.shape[..a.rank() - 2], batch);
            let ib = sqil_ir::ops::broadcast_indices(&b.shape[..b.rank() - 2], batch);
            let offs: Vec<usize> = ia.iter().zip(&ib).flat_map(|(x, y)| [x * m * k, y * k * nn]).collect();
            let args = vec![
                KArg::Buf(ab),
                KArg::Buf(bb),
                KArg::Buf(yb[0]),
                i32_arr(&offs),
                int(ia.len()),
                int(m),
                int(k),
                int(nn),
            ];
            steps.push(kernel("sqil_bmm", n, args));
        }
        Op::Gemm { .. } | Op::MatMul => {
            let (trans_b, bias, alpha, beta) = match op {
                Op::Gemm { alpha, beta, trans_a: false, trans_b } => (*trans_b, g.constant(2), *alpha, *beta),
                Op::Gemm { .. } => return Err(g.err("transposed A")),
                _ => (false, None, 1.0, 1.0),
            };
            let w = g.constant(1).ok_or_else(|| g.err("computed weight"))?;
            if w.rank() != 2 {
                return Err(g.err("weight of rank other than 2"));
            }
            let (k, nn) = if trans_b { (w.shape[1], w.shape[0]) } else { (w.shape[0], w.shape[1]) };
            let wv = w.data.to_f32_vec();
            let wk: Vec<f32> =
                (0..k * nn).map(|i| alpha * if trans_b { wv[(i % nn) * k + i / nn] } else { wv[i] }).collect();
            let b = match bias {
                Some(b) => {
                    let v = b.data.to_f32_vec();
                    f32_arr(sqil_ir::ops::broadcast_indices(&b.shape, &[nn]).into_iter().map(|i| v[i] * beta).collect())
                }
                None if g.inputs.get(2).copied().flatten().is_some() => return Err(g.err("computed bias")),
                None => KArg::Null,
            };
            let rows = n / nn.max(1);
            let args = vec![KArg::Buf(x0()?), f32_arr(wk), b, KArg::Buf(yb[0]), int(rows), int(k), int(nn)];
            steps.push(kernel("sqil_linear_f32w", n * 32, args));
        }
        Op::Conv(c) => {
            let xt = g.val(0)?;
            let w = g.constant(1).ok_or_else(|| g.err("computed weight"))?;
            if xt.rank() != 4 || xt.shape[0] != 1 {
                return Err(g.err("convolutions other than 2-D on one image"));
            }
            let geo = c.input_geometry(&xt.shape, &w.shape).map_err(|e| e.to_string())?;
            let mut items = geo_items(xt.shape[1], &geo);
            items.push(c.group as i32);
            let bias = match g.constant(2) {
                Some(b) => f32_arr(b.data.to_f32_vec()),
                None if g.inputs.get(2).copied().flatten().is_some() => return Err(g.err("computed bias")),
                None => KArg::Null,
            };
            let args = vec![
                KArg::Buf(x0()?),
                KArg::Arr(HostArr::I32(items)),
                f32_arr(w.data.to_f32_vec()),
                bias,
                KArg::Buf(yb[0]),
                int(w.shape[0]),
            ];
            steps.push(kernel("sqil_conv2d_f32", n, args));
        }
        Op::MaxPool(p) | Op::AveragePool(p) if g.outputs.len() == 1 => {
            let xt = g.val(0)?;
            if xt.rank() != 4 {
                return Err(g.err("pooling other than 2-D"));
            }
            let (geo, counts) = p.windows(&xt.shape[2..]).map_err(|e| e.to_string())?;
            let is_max = matches!(op, Op::MaxPool(_));
            let (div, div0) = if is_max || counts.iter().all(|&c| c == counts[0]) {
                (KArg::Null, counts.first().copied().unwrap_or(1).max(1))
            } else {
                (i32_arr(&counts.iter().map(|&c| c.max(1)).collect::<Vec<_>>()), 1)
            };
            let args = vec![
                KArg::Buf(x0()?),
                KArg::Arr(HostArr::I32(geo_items(xt.shape[1], &geo))),
                KArg::Buf(yb[0]),
                int(xt.shape[0] * xt.shape[1]),
                KArg::I32(is_max as i32),
                div,
                int(div0),
            ];
            steps.push(kernel("sqil_pool2d", n, args));
        }
        Op::GlobalAveragePool => {
            let inner = g.val(0)?.len() / n.max(1);
            steps.push(kernel("sqil_mean_rows", n * 32, vec![KArg::Buf(x0()?), KArg::Buf(yb[0]), int(n), int(inner)]));
        }
        Op::BatchNorm { epsilon, training: false, .. } if g.outputs.len() == 1 => {
            let xt = g.val(0)?;
            let chans = xt.shape.get(1).copied().unwrap_or(1);
            let per = |j: usize| -> Result<Vec<f64>, String> {
                match g.constant(j) {
                    Some(t) if t.len() == chans => Ok(t.data.to_f64_vec()),
                    _ => Err(g.err("computed or mis-sized statistics")),
                }
            };
            let (scale, bias, mean, var) = (per(1)?, per(2)?, per(3)?, per(4)?);
            let k: Vec<f64> = scale.iter().zip(&var).map(|(s, v)| s / (v + *epsilon as f64).sqrt()).collect();
            let a: Vec<f32> = k.iter().map(|&v| v as f32).collect();
            let b: Vec<f32> = (0..chans).map(|c| (bias[c] - mean[c] * k[c]) as f32).collect();
            let inner = n / (xt.shape[0] * chans).max(1);
            let args = vec![KArg::Buf(x0()?), KArg::Buf(yb[0]), f32_arr(a), f32_arr(b), int(chans), int(inner), int(n)];
            steps.push(kernel("sqil_channel_affine", n, args));
        }
        _ => return Err(g.err("op")),
    }
    Ok(())
}

/// A 2-D window geometry as the kernels take it: channels, input h and w, kernel h and w,
/// strides, dilations, padding at the start, output h and w.
fn geo_items(channels: usize, g: &sqil_kernels_cpu::ConvGeometry) -> Vec<i32> {
    std::iter::once(channels)
        .chain(g.input.iter().copied())
        .chain(g.kernel.iter().copied())
        .chain(g.strides.iter().copied())
        .chain(g.dilations.iter().copied())
        .map(|v| v as i32)
        .chain(g.pads_begin.iter().map(|&v| v as i32))
        .chain(g.output.iter().map(|&v| v as i32))
        .collect()
}

impl GpuPolicy {
    /// Uploads `policy` (see [`lower`]).
    pub fn new(gpu: &Gpu, policy: &Policy) -> Result<GpuPolicy, String> {
        let l = lower(policy)?;
        let stream = gpu.ctx.new_stream().map_err(err)?;
        let bufs = l.bufs.iter().map(|&n| stream.alloc_zeros::<f16>(n)).collect::<Result<Vec<_>, _>>().map_err(err)?;
        let up = |c: &Vec<f32>| stream.clone_htod(c).map_err(err);
        let mut steps: Vec<GStep> = vec![];
        for st in l.steps {
            steps.push(match st {
                LStep::Q4 { w, bias, relu, x, y } => LStep::Q4 {
                    w: gpu.upload(&w)?,
                    bias: bias.map(|b| stream.clone_htod(&b)).transpose().map_err(err)?,
                    relu,
                    x,
                    y,
                },
                LStep::Quant { x, y, n, s, z, lo, hi } => LStep::Quant { x, y, n, s, z, lo, hi },
                LStep::Binary { x, y, c, n, op } => LStep::Binary { x, y, c: up(&c)?, n, op },
                LStep::BinaryIn { off, y, c, n, op } => LStep::BinaryIn { off, y, c: up(&c)?, n, op },
                LStep::CastIn { off, y, n } => LStep::CastIn { off, y, n },
                LStep::Unary { x, y, n, op, lo, hi } => LStep::Unary { x, y, n, op, lo, hi },
                LStep::Kernel { name, args, threads } => {
                    let args = args
                        .into_iter()
                        .map(|a| {
                            Ok(match a {
                                KArg::Arr(HostArr::F32(v)) => {
                                    KArg::Arr(DevArr::F32(stream.clone_htod(&v).map_err(err)?))
                                }
                                KArg::Arr(HostArr::I32(v)) => {
                                    KArg::Arr(DevArr::I32(stream.clone_htod(&v).map_err(err)?))
                                }
                                KArg::Arr(HostArr::U32(v)) => {
                                    KArg::Arr(DevArr::U32(stream.clone_htod(&v).map_err(err)?))
                                }
                                KArg::Arr(HostArr::F16(v)) => {
                                    KArg::Arr(DevArr::F16(stream.clone_htod(&v).map_err(err)?))
                                }
                                KArg::Buf(b) => KArg::Buf(b),
                                KArg::Null => KArg::Null,
                                KArg::I32(v) => KArg::I32(v),
                                KArg::F32(v) => KArg::F32(v),
                            })
                        })
                        .collect::<Result<Vec<_>, String>>()?;
                    LStep::Kernel { name, args, threads }
                }
            });
        }
        let input = stream.alloc_zeros::<f32>(l.in_len.max(1)).map_err(err)?;
        Ok(GpuPolicy {
            stream,
            steps,
            bufs,
            input,
            in_len: l.in_len,
            output: l.output,
            out_len: l.out_len,
            graph: None,
            describe: l.describe,
            labels: l.labels,
        })
    }

    /// Launches every step on the policy's stream (no copies).
    fn launch(&mut self, gpu: &Gpu) -> Result<(), String> {
        self.launch_steps(gpu, 0..self.steps.len())
    }

    /// Per lowered step, its label and its median time in microseconds over `iters` eager runs
    /// on `obs` (CUDA events around each step's launch).
    pub fn profile(&mut self, gpu: &Gpu, obs: &[f32], iters: usize) -> Result<Vec<(String, f64)>, String> {
        self.act(gpu, obs)?;
        let ev = || gpu.ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT)).map_err(err);
        let (a, b) = (ev()?, ev()?);
        let mut t = vec![vec![]; self.steps.len()];
        for _ in 0..iters.max(1) {
            for (i, ts) in t.iter_mut().enumerate() {
                a.record(&self.stream).map_err(err)?;
                self.launch_steps(gpu, i..i + 1)?;
                b.record(&self.stream).map_err(err)?;
                b.synchronize().map_err(err)?;
                ts.push(a.elapsed_ms(&b).map_err(err)? as f64 * 1e3);
            }
        }
        Ok(t.into_iter()
            .zip(&self.labels)
            .map(|(mut v, l)| {
                v.sort_by(f64::total_cmp);
                (l.clone(), v[v.len() / 2])
            })
            .collect())
    }

    /// Launches steps `range` on the policy's stream (no copies).
    fn launch_steps(&mut self, gpu: &Gpu, range: std::ops::Range<usize>) -> Result<(), String> {
        let quant = gpu.function("sqil_fake_quant")?;
        let bin = gpu.function("sqil_binary_const")?;
        let bin_in = gpu.function("sqil_binary_const_f32in")?;
        let cast = gpu.function("sqil_cast_f32_f16")?;
        let un = gpu.function("sqil_unary")?;
        let input_ptr = self.input.device_ptr(&self.stream).0;
        for st in &self.steps[range] {
            match st {
                LStep::Q4 { w, bias, relu, x, y } => {
                    let (xs, ys) = two(&mut self.bufs, *x, *y);
                    gpu.q4_gemv_on(&self.stream, w, xs, bias.as_ref(), ys, 1, *relu)?;
                }
                LStep::BinaryIn { off, y, c, n, op } => {
                    let (n32, m32) = (*n as i32, *n as i32);
                    let xin = input_ptr + 4 * *off as u64;
                    let mut l = self.stream.launch_builder(&bin_in);
                    l.arg(&xin).arg(&mut self.bufs[*y]).arg(c).arg(&n32).arg(&m32).arg(op);
                    // SAFETY: (x f32, y, c, n, m, op); x, y and c hold n values.
                    unsafe { l.launch(cfg(*n)) }.map_err(err)?;
                }
                LStep::CastIn { off, y, n } => {
                    let n32 = *n as i32;
                    let xin = input_ptr + 4 * *off as u64;
                    let mut l = self.stream.launch_builder(&cast);
                    l.arg(&xin).arg(&mut self.bufs[*y]).arg(&n32);
                    // SAFETY: (x f32, y, n); both hold n values.
                    unsafe { l.launch(cfg(*n)) }.map_err(err)?;
                }
                LStep::Quant { x, y, n, s, z, lo, hi } => {
                    let (xs, ys) = two(&mut self.bufs, *x, *y);
                    let n32 = *n as i32;
                    let mut l = self.stream.launch_builder(&quant);
                    l.arg(xs).arg(ys).arg(&n32).arg(s).arg(z).arg(lo).arg(hi);
                    // SAFETY: (x, y, n, s, z, lo, hi) as the kernel declares; both buffers hold n.
                    unsafe { l.launch(cfg(*n)) }.map_err(err)?;
                }
                LStep::Binary { x, y, c, n, op } => {
                    let (xs, ys) = two(&mut self.bufs, *x, *y);
                    let (n32, m32) = (*n as i32, *n as i32);
                    let mut l = self.stream.launch_builder(&bin);
                    l.arg(xs).arg(ys).arg(c).arg(&n32).arg(&m32).arg(op);
                    // SAFETY: (x, y, c, n, m, op); x, y and c hold n values.
                    unsafe { l.launch(cfg(*n)) }.map_err(err)?;
                }
                LStep::Unary { x, y, n, op, lo, hi } => {
                    let (xs, ys) = two(&mut self.bufs, *x, *y);
                    let n32 = *n as i32;
                    let mut l = self.stream.launch_builder(&un);
                    l.arg(xs).arg(ys).arg(&n32).arg(op).arg(lo).arg(hi);
                    // SAFETY: (x, y, n, op, lo, hi); both buffers hold n values.
                    unsafe { l.launch(cfg(*n)) }.map_err(err)?;
                }
                LStep::Kernel { name, args, threads } => {
                    let f = gpu.function(name)?;
                    // Every argument as the value the kernel receives: device pointers (0 for
                    // null), ints and floats.
                    enum V {
                        P(u64),
                        I(i32),
                        F(f32),
                    }
                    let vals: Vec<V> = args
                        .iter()
                        .map(|a| match a {
                            KArg::Buf(b) => V::P(self.bufs[*b].device_ptr(&self.stream).0),
                            KArg::Arr(DevArr::F32(d)) => V::P(d.device_ptr(&self.stream).0),
                            KArg::Arr(DevArr::I32(d)) => V::P(d.device_ptr(&self.stream).0),
                            KArg::Arr(DevArr::U32(d)) => V::P(d.device_ptr(&self.stream).0),
                            KArg::Arr(DevArr::F16(d)) => V::P(d.device_ptr(&self.stream).0),
                            KArg::Null => V::P(0),
                            KArg::I32(v) => V::I(*v),
                            KArg::F32(v) => V::F(*v),
                        })
                        .collect();
                    let mut l = self.stream.launch_builder(&f);
                    for v in &vals {
                        match v {
                            V::P(p) => l.arg(p),
                            V::I(i) => l.arg(i),
                            V::F(x) => l.arg(x),
                        };
                    }
                    // SAFETY: the lowering builds each kernel's argument list in the order and of
                    // the types `policy_ops.cu` declares; the buffers and arrays hold what the
                    // sizes passed beside them say (one thread per output, bounds-checked).
                    unsafe { l.launch(cfg(*threads)) }.map_err(|e| format!("{name}: {e:?}"))?;
                }
            }
        }
        Ok(())
    }

    /// Captures the step list in a CUDA graph (once); later [`GpuPolicy::act`] calls replay it.
    pub fn capture(&mut self, gpu: &Gpu) -> Result<(), String> {
        // Kernels load (and warm up) outside the capture.
        self.launch(gpu)?;
        self.stream.synchronize().map_err(err)?;
        // SAFETY: this context's buffers are all used from this one stream.
        unsafe { gpu.ctx.disable_event_tracking() };
        self.stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).map_err(err)?;
        let r = self.launch(gpu);
        let g = self
            .stream
            .end_capture(sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH)
            .map_err(err)?;
        r?;
        self.graph = Some(g.ok_or("empty CUDA graph")?);
        Ok(())
    }

    /// One state in (its inputs concatenated), its actions out: a copy in, the graph (or the
    /// steps), a copy out.
    pub fn act(&mut self, gpu: &Gpu, obs: &[f32]) -> Result<Vec<f32>, String> {
        if obs.len() != self.in_len {
            return Err(format!("{} values, the policy takes {}", obs.len(), self.in_len));
        }
        self.stream.memcpy_htod(obs, &mut self.input).map_err(err)?;
        match &self.graph {
            Some(g) => g.launch().map_err(err)?,
            None => self.launch(gpu)?,
        }
        let mut out = vec![f16::ZERO; self.bufs[self.output].len()];
        self.stream.memcpy_dtoh(&self.bufs[self.output], &mut out).map_err(err)?;
        self.stream.synchronize().map_err(err)?;
        Ok(out[..self.out_len].iter().map(|v| v.to_f32()).collect())
    }
}

/// Two distinct buffers, the first shared and the second mutable.
fn two(b: &mut [CudaSlice<f16>], x: usize, y: usize) -> (&CudaSlice<f16>, &mut CudaSlice<f16>) {
    assert_ne!(x, y, "a step reads and writes the same buffer");
    if x < y {
        let (l, r) = b.split_at_mut(y);
        (&l[x], &mut r[0])
    } else {
        let (l, r) = b.split_at_mut(x);
        (&r[0], &mut l[y])
    }
}
