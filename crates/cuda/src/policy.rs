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
use cudarc::driver::{sys, CudaGraph, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
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
/// the host ([`Lowered`]) or on the device ([`GpuPolicy`]).
pub enum LStep<W, B, C> {
    /// int4 layer on buffer `x` into `y`.
    Q4 { w: W, bias: Option<B>, relu: bool, x: usize, y: usize },
    /// Activation quantizer `x` -> `y`.
    Quant { x: usize, y: usize, n: usize, s: f32, z: f32, lo: f32, hi: f32 },
    /// `y = x op c` (op 0 add, 1 sub, 2 mul, 3 div).
    Binary { x: usize, y: usize, c: C, n: usize, op: i32 },
    /// A binary step on the fp32 input.
    BinaryIn { y: usize, c: C, n: usize, op: i32 },
    /// The fp32 input cast to fp16 (into buffer `y`).
    CastIn { y: usize, n: usize },
    /// `y = clamp(f(x), lo, hi)` (op 0 relu, 1 tanh, 2 sigmoid, 3 neg, 4 identity).
    Unary { x: usize, y: usize, n: usize, op: i32, lo: f32, hi: f32 },
}

/// A policy lowered for the GPU, independent of any device: fp16 buffers (sizes padded to 128),
/// the steps over them, the fp32 input's length and the output buffer.
pub struct Lowered {
    pub bufs: Vec<usize>,
    pub steps: Vec<LStep<HostQ4, Vec<f16>, Vec<f32>>>,
    pub in_len: usize,
    pub output: usize,
    pub out_len: usize,
    pub describe: Vec<String>,
}

type GStep = LStep<DeviceQ4, CudaSlice<f16>, CudaSlice<f32>>;

pub struct GpuPolicy {
    stream: Arc<CudaStream>,
    steps: Vec<GStep>,
    bufs: Vec<CudaSlice<f16>>,
    /// The observation, fp32.
    input: CudaSlice<f32>,
    in_len: usize,
    output: usize,
    out_len: usize,
    graph: Option<CudaGraph>,
    /// One line per step (for reports).
    pub describe: Vec<String>,
}

fn err<E: std::fmt::Debug>(e: E) -> String {
    format!("{e:?}")
}

fn cfg(n: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: ((n as u32).div_ceil(256), 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

/// Lowers `policy` (single input, single output, every dimension but the batch known) for the
/// GPU: the plan's steps over fp16 buffers, int4 layers repacked in the CUDA layout.
pub fn lower(policy: &Policy) -> Result<Lowered, String> {
    let plan = &policy.plan;
    if plan.inputs.len() != 1 || plan.outputs.len() != 1 {
        return Err("the GPU policy takes one input and one output".into());
    }
    let dims: Vec<usize> = policy.input_shapes()[0]
        .iter()
        .enumerate()
        .map(|(d, x)| if d == 0 { Some(1) } else { x.known() })
        .collect::<Option<_>>()
        .ok_or("the input's dimensions must be known")?;
    let n_in: usize = dims.iter().product();
    let env = plan.trace(&[Tensor::from_f32(dims, vec![0.0; n_in]).map_err(err)?], 1).map_err(err)?;
    let mut slot_buf = vec![usize::MAX; plan.slots];
    let mut bufs: Vec<usize> = vec![];
    let mut buf_for = |s: usize, bufs: &mut Vec<usize>| -> Result<usize, String> {
        if slot_buf[s] == usize::MAX {
            let len = env[s].as_ref().ok_or("a value was not computed")?.len();
            // Padded to 128 with zeros: the int4 kernels read whole groups of 128.
            bufs.push(len.div_ceil(128) * 128);
            slot_buf[s] = bufs.len() - 1;
        }
        Ok(slot_buf[s])
    };
    let is_const: Vec<bool> = {
        let mut c = vec![false; plan.slots];
        for (s, _) in &plan.consts {
            c[*s] = true;
        }
        c
    };
    let in_slot = plan.inputs[0].1;
    let mut cast_done = false;
    let mut steps = vec![];
    let mut describe = vec![];
    for (st, d) in plan.steps.iter().zip(plan.describe()) {
        let unsupported = || format!("step `{d}`: not supported by the GPU policy yet");
        match st {
            Step::Q4Linear { conv: Some(_), .. } => return Err(unsupported()),
            Step::Q4Linear { x, y, act, w, bias, relu, conv: None, .. } => {
                if env[*x].as_ref().is_some_and(|t| t.len() != w.k) {
                    return Err(format!(
                        "step `{d}`: int4 layers over several rows (tokens) are not in the GPU policy yet"
                    ));
                }
                let mut xb = buf_for(*x, &mut bufs)?;
                if *x == in_slot && !cast_done {
                    steps.push(LStep::CastIn { y: xb, n: n_in });
                    cast_done = true;
                }
                if let ActQuant::Int { scale, zero, lo, hi } = act {
                    let n = env[*x].as_ref().map_or(0, |t| t.len());
                    bufs.push(n.div_ceil(128) * 128);
                    let qb = bufs.len() - 1;
                    let (s, z, lo, hi) = (*scale, *zero as f32, *lo as f32, *hi as f32);
                    steps.push(LStep::Quant { x: xb, y: qb, n, s, z, lo, hi });
                    xb = qb;
                }
                let yb = buf_for(*y, &mut bufs)?;
                // The packed ints and scales in the CUDA layout; groups that are not 32, 64 or 128
                // (per-channel scales) expand to 32.
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
                let bias = bias.as_ref().map(|b| b.iter().map(|&v| f16::from_f32(v)).collect());
                steps.push(LStep::Q4 {
                    w: pack_grouped(&q, &scales, w.n, w.k, group),
                    bias,
                    relu: *relu,
                    x: xb,
                    y: yb,
                });
            }
            Step::Op { op, inputs, outputs, .. } => {
                let y = outputs[0];
                let n = env[y].as_ref().map_or(0, |t| t.len());
                let dynamic: Vec<usize> = inputs.iter().flatten().copied().filter(|&s| !is_const[s]).collect();
                if dynamic.len() != 1 {
                    return Err(unsupported());
                }
                let x = buf_for(dynamic[0], &mut bufs)?;
                let yb = buf_for(y, &mut bufs)?;
                let from_input = dynamic[0] == in_slot;
                let is_binary = matches!(op, Op::Binary(b) if *b != BinaryOp::Pow);
                if from_input && !is_binary && !cast_done {
                    steps.push(LStep::CastIn { y: x, n: n_in });
                    cast_done = true;
                }
                let cval =
                    |j: usize| inputs.get(j).copied().flatten().filter(|&s| is_const[s]).and_then(|s| env[s].as_ref());
                let all = (f32::NEG_INFINITY, f32::INFINITY);
                match op {
                    Op::Binary(b) if *b != BinaryOp::Pow && inputs[0] == Some(dynamic[0]) => {
                        let c = cval(1).ok_or_else(unsupported)?;
                        let yt = env[y].as_ref().ok_or("not computed")?;
                        let cv = c.data.to_f32_vec();
                        let full: Vec<f32> =
                            sqil_ir::ops::broadcast_indices(&c.shape, &yt.shape).into_iter().map(|i| cv[i]).collect();
                        let op = match b {
                            BinaryOp::Add => 0,
                            BinaryOp::Sub => 1,
                            BinaryOp::Mul => 2,
                            _ => 3,
                        };
                        steps.push(if from_input {
                            LStep::BinaryIn { y: yb, c: full, n, op }
                        } else {
                            LStep::Binary { x, y: yb, c: full, n, op }
                        });
                    }
                    Op::Unary(u @ (UnaryOp::Relu | UnaryOp::Tanh | UnaryOp::Sigmoid | UnaryOp::Neg)) => {
                        let op = match u {
                            UnaryOp::Relu => 0,
                            UnaryOp::Tanh => 1,
                            UnaryOp::Sigmoid => 2,
                            _ => 3,
                        };
                        steps.push(LStep::Unary { x, y: yb, n, op, lo: all.0, hi: all.1 });
                    }
                    Op::Clip => {
                        let b = |j| cval(j).map(|t: &Tensor| t.data.to_f32_vec()[0]);
                        steps.push(LStep::Unary {
                            x,
                            y: yb,
                            n,
                            op: 4,
                            lo: b(1).unwrap_or(all.0),
                            hi: b(2).unwrap_or(all.1),
                        });
                    }
                    Op::Identity | Op::Reshape { .. } | Op::Flatten { .. } | Op::Squeeze | Op::Unsqueeze => {
                        steps.push(LStep::Unary { x, y: yb, n, op: 4, lo: all.0, hi: all.1 });
                    }
                    _ => return Err(unsupported()),
                }
            }
        }
        describe.push(d);
    }
    if plan.outputs[0] == in_slot {
        return Err("the policy's output is its input".into());
    }
    let output = buf_for(plan.outputs[0], &mut bufs)?;
    let out_len = env[plan.outputs[0]].as_ref().map_or(0, |t| t.len());
    Ok(Lowered { bufs, steps, in_len: n_in, output, out_len, describe })
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
                LStep::BinaryIn { y, c, n, op } => LStep::BinaryIn { y, c: up(&c)?, n, op },
                LStep::CastIn { y, n } => LStep::CastIn { y, n },
                LStep::Unary { x, y, n, op, lo, hi } => LStep::Unary { x, y, n, op, lo, hi },
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
        })
    }

    /// Launches every step on the policy's stream (no copies).
    fn launch(&mut self, gpu: &Gpu) -> Result<(), String> {
        let quant = gpu.function("sqil_fake_quant")?;
        let bin = gpu.function("sqil_binary_const")?;
        let bin_in = gpu.function("sqil_binary_const_f32in")?;
        let cast = gpu.function("sqil_cast_f32_f16")?;
        let un = gpu.function("sqil_unary")?;
        for st in &self.steps {
            match st {
                LStep::Q4 { w, bias, relu, x, y } => {
                    let (xs, ys) = two(&mut self.bufs, *x, *y);
                    gpu.q4_gemv_on(&self.stream, w, xs, bias.as_ref(), ys, 1, *relu)?;
                }
                LStep::BinaryIn { y, c, n, op } => {
                    let (n32, m32) = (*n as i32, *n as i32);
                    let mut l = self.stream.launch_builder(&bin_in);
                    l.arg(&self.input).arg(&mut self.bufs[*y]).arg(c).arg(&n32).arg(&m32).arg(op);
                    // SAFETY: (x f32, y, c, n, m, op); x, y and c hold n values.
                    unsafe { l.launch(cfg(*n)) }.map_err(err)?;
                }
                LStep::CastIn { y, n } => {
                    let n32 = *n as i32;
                    let mut l = self.stream.launch_builder(&cast);
                    l.arg(&self.input).arg(&mut self.bufs[*y]).arg(&n32);
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

    /// One state in, its actions out: a copy in, the graph (or the steps), a copy out.
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
