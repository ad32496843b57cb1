//! Executes a lowered CPU plan ([`sqil_lower::Plan`]): slots filled step by step, int4 steps by
//! their one arithmetic definition (`sqil_ir::lowered::run_q4_layer`, the simulation's), every
//! other step by the IR op's reference semantics.

use sqil_ir::lowered::run_q4_layer;
use sqil_ir::ops::{BinaryOp, Op, Over, UnaryOp};
use sqil_ir::{Data, IrError, Result, Tensor};
use sqil_kernels_cpu::Post;
use sqil_lower::{Fold, Plan, Step};
use std::borrow::Cow;

/// Running a [`Plan`] on the CPU.
pub trait Execute {
    /// Runs the plan; `feeds` in the graph's input order. `threads` for large layers. A batch
    /// of a [`Plan::per_sample`] plan runs a few samples at a time ([`sample_chunk`]).
    fn run(&self, feeds: &[Tensor], threads: usize) -> Result<Vec<Tensor>>;
    /// Runs the plan on the whole batch at once.
    fn run_whole(&self, feeds: &[Tensor], threads: usize) -> Result<Vec<Tensor>>;
    /// Runs the plan and returns every slot's value (constants, inputs, step results; `None`
    /// for slots no step wrote): the shapes and values code generators and tests need.
    fn trace(&self, feeds: &[Tensor], threads: usize) -> Result<Vec<Option<Tensor>>>;
    /// Runs the plan `runs` times and returns each step's mean and minimum wall time in seconds
    /// (in the order of [`Plan::describe`]): where a policy's time goes (`sqil bench --profile`;
    /// the minimum is the steadier figure on a shared machine).
    fn profile(&self, feeds: &[Tensor], threads: usize, runs: usize) -> Result<Vec<(f64, f64)>>;
    /// Per step (in the order of [`Plan::describe`]), the implementation it runs on these
    /// inputs: `"int4 kernel"`, or for an op step [`sqil_ir::Op::cpu_path`] ("f32 kernel",
    /// "data movement", "reference (f64)").
    fn paths(&self, feeds: &[Tensor], threads: usize) -> Result<Vec<&'static str>>;
}

impl Execute for Plan {
    /// Runs the plan; `feeds` in the graph's input order. `threads` for large layers. A batch
    /// of a [`Plan::per_sample`] plan runs a few samples at a time ([`sample_chunk`]).
    fn run(&self, feeds: &[Tensor], threads: usize) -> Result<Vec<Tensor>> {
        if let Some(batch) = sample_by_sample(self, feeds) {
            let mut parts: Vec<Vec<Tensor>> = vec![vec![]; self.outputs.len()];
            for chunk in sample_runs(batch, sample_chunk(self)) {
                let n = chunk.len();
                let one = samples(feeds, batch, chunk)?;
                let outs = self.run_whole(&one, threads)?;
                // The run's inputs back to the pool: the next run's come from it (no fresh pages).
                one.into_iter().for_each(sqil_ir::pool::recycle);
                for (part, y) in parts.iter_mut().zip(outs) {
                    if y.shape.first() != Some(&n) {
                        return Err(IrError::Internal(format!(
                            "a run of {n} samples gave an output of shape {:?}",
                            y.shape
                        )));
                    }
                    part.push(y);
                }
            }
            return parts
                .into_iter()
                .map(|p| {
                    let mut shape = p[0].shape.clone();
                    shape[0] = batch;
                    Tensor::new(shape, Data::concat(&p.iter().map(|t| &t.data).collect::<Vec<_>>())?)
                })
                .collect();
        }
        self.run_whole(feeds, threads)
    }

    /// Runs the plan on the whole batch at once.
    fn run_whole(&self, feeds: &[Tensor], threads: usize) -> Result<Vec<Tensor>> {
        let mut env = exec(self, feeds, threads, None, false)?;
        self.outputs
            .iter()
            .map(|&s| env[s].take().map(Cow::into_owned).ok_or_else(|| IrError::Internal("output not computed".into())))
            .collect()
    }

    /// Runs the plan and returns every slot's value (constants, inputs, step results; `None`
    /// for slots no step wrote): the shapes and values code generators and tests need.
    fn trace(&self, feeds: &[Tensor], threads: usize) -> Result<Vec<Option<Tensor>>> {
        Ok(exec(self, feeds, threads, None, true)?.into_iter().map(|t| t.map(Cow::into_owned)).collect())
    }

    /// Runs the plan `runs` times and returns each step's mean and minimum wall time in seconds
    /// (in the order of [`Plan::describe`]): where a policy's time goes (`sqil bench --profile`;
    /// the minimum is the steadier figure on a shared machine).
    fn profile(&self, feeds: &[Tensor], threads: usize, runs: usize) -> Result<Vec<(f64, f64)>> {
        let mut stats = vec![(0.0, f64::INFINITY); self.steps.len()];
        let mut probe = Probe::new(self);
        // As `run` runs it: a per-sample plan's batch a few samples at a time (each step's time
        // the sum over the runs).
        let samples: Vec<Vec<Tensor>> = match sample_by_sample(self, feeds) {
            Some(batch) => {
                sample_runs(batch, sample_chunk(self)).map(|run| samples(feeds, batch, run)).collect::<Result<_>>()?
            }
            None => vec![],
        };
        for _ in 0..runs.max(1) {
            probe.times.fill(0.0);
            if samples.is_empty() {
                exec(self, feeds, threads, Some(&mut probe), false)?;
            }
            for one in &samples {
                exec(self, one, threads, Some(&mut probe), false)?;
            }
            for (st, t) in stats.iter_mut().zip(&probe.times) {
                st.0 += t / runs.max(1) as f64;
                st.1 = st.1.min(*t);
            }
        }
        Ok(stats)
    }

    fn paths(&self, feeds: &[Tensor], threads: usize) -> Result<Vec<&'static str>> {
        let env: Vec<Option<Cow<Tensor>>> =
            self.trace(feeds, threads)?.into_iter().map(|t| t.map(Cow::Owned)).collect();
        let mut paths: Vec<&'static str> = self
            .steps
            .iter()
            .map(|s| match s {
                Step::Q4Linear { .. } => "int4 kernel",
                Step::Op { op, inputs, outputs, .. } => {
                    let args: Vec<Option<&Tensor>> = inputs.iter().map(|s| s.and_then(|s| env[s].as_deref())).collect();
                    op.cpu_path(&args, outputs.len())
                }
            })
            .collect();
        // The steps another step ran in its own pass (no time of their own).
        let mut probe = Probe::new(self);
        exec(self, feeds, threads, Some(&mut probe), false)?;
        for (p, _) in paths.iter_mut().zip(&probe.inside).filter(|(_, &inside)| inside) {
            *p = IN_PASS;
        }
        for (p, _) in paths.iter_mut().zip(&probe.ahead).filter(|(_, &ahead)| ahead) {
            *p = AHEAD;
        }
        // The steps a kernel runs as its epilogue (no time of their own).
        for i in 0..self.steps.len() {
            if let Some(y) = epilogue_host(self, i, &env) {
                let (post, last, _) = epilogue(self, i, y, &env);
                if !post.is_empty() {
                    paths[i + 1..=last].fill(FUSED);
                }
            }
        }
        Ok(paths)
    }
}

/// The batch size where `run` takes `feeds` a few samples at a time ([`sample_chunk`])
/// ([`Plan::per_sample`], a batch of more than that leading every input).
fn sample_by_sample(plan: &Plan, feeds: &[Tensor]) -> Option<usize> {
    let batch = feeds.first().and_then(|t| t.shape.first().copied()).unwrap_or(0);
    let chunked = plan.per_sample && batch > sample_chunk(plan);
    (chunked && feeds.iter().all(|t| t.shape.first() == Some(&batch))).then_some(batch)
}

/// How many samples of `plan`'s batch run together: [`SAMPLE_CHUNK`], or
/// [`DEPTHWISE_SAMPLE_CHUNK`] for a plan with depthwise convolutions.
pub fn sample_chunk(plan: &Plan) -> usize {
    if plan.steps.iter().any(|s| matches!(s, Step::Op { taps: Some(_), .. })) {
        DEPTHWISE_SAMPLE_CHUNK
    } else {
        SAMPLE_CHUNK
    }
}

/// How many samples of a [`Plan::per_sample`] plan's batch run together. One at a time keeps
/// an image's activations in cache from step to step, but every step then works on one sample:
/// a squeeze-and-excitation block's layers are GEMVs that read their weights per sample, and
/// every call's fixed costs (laying out buffers, zeroing the depthwise padding) come per sample.
/// Four together, at batch 64 on this project's 2-vCPU Xeon (one thread, min of runs; the same
/// bits, as every op treats the samples independently): MobileNetV3 19.8 -> 17.7-18.7 ms,
/// EfficientNet-B0 46.7 -> 43.8, MobileNetV2 32.1 -> 30.0, the ACT decoder 87.8 -> 77.7,
/// ResNet-18 187 -> 183, the U-Net step the same, the pixel and PReLU CNNs 1-2% slower (their
/// activations are larger). Eight were as good on the MobileNets and 1-3% slower on the pixel
/// and PReLU CNNs; the whole batch 55% slower on the PReLU CNN.
pub const SAMPLE_CHUNK: usize = 4;

/// [`SAMPLE_CHUNK`] for a plan with depthwise convolutions (the MobileNets, EfficientNet): their
/// small maps keep eight images in the caches, and each call's fixed costs (a
/// squeeze-and-excitation block's GEMVs, laying out the depthwise buffers) come once per eight.
/// Eight against four on this project's 2-vCPU Emerald Rapids Xeon (one thread, three
/// interleaved rounds, min; the same bits), batch 16 | 64: MobileNetV3 3738 -> 3622 | 15253 ->
/// 14781 us, EfficientNet-B0 9690 -> 9447 | 39118 -> 38310, MobileNetV2 6476 -> 6399 | 26299 ->
/// 25862; on the plans without them 1-2% slower at batch 16 (the pixel CNN 7932 -> 8017, ResNet-18
/// 42827 -> 43577), which keep four.
pub const DEPTHWISE_SAMPLE_CHUNK: usize = 8;

/// The runs of `chunk` samples (the last one shorter) a batch of `batch` takes.
fn sample_runs(batch: usize, chunk: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    (0..batch).step_by(chunk).map(move |at| at..(at + chunk).min(batch))
}

/// Samples `range` of a batch of `batch` (every input's leading dimension), each input of shape
/// `[range.len(), ...]`; f32 values in buffers from the pool ([`sqil_ir::pool`]).
fn samples(feeds: &[Tensor], batch: usize, range: std::ops::Range<usize>) -> Result<Vec<Tensor>> {
    feeds
        .iter()
        .map(|t| {
            let per = t.len() / batch;
            let mut shape = t.shape.clone();
            shape[0] = range.len();
            let values = range.start * per..range.end * per;
            let data = match &t.data {
                Data::F32(v) => {
                    let mut part = sqil_ir::pool::f32_buffer(values.len());
                    sqil_kernels_cpu::copy_f32(&v[values], &mut part);
                    Data::F32(part)
                }
                other => other.range(values),
            };
            Tensor::new(shape, data)
        })
        .collect()
}

/// Whether step `i` (`op` on slots `inputs`) can run in place on its first input: an element-wise
/// op a vector kernel applies in registers ([`post_op`], [`Post::in_registers`]: a ReLU, a LeakyRelu, a Clip
/// with f32 scalar bounds or none, a FakeQuant with one scale and zero point) on f32 values, an
/// f32 Add, Sub, Mul or Div whose second input broadcasts over the first in a contiguous form
/// ([`Over`]: a bias, a residual, a gate), or a Reshape, whose input dies at this step and is
/// owned (not a constant or a caller's tensor). The result equals the op's (the same comparisons
/// and operations on the buffer; Reshape moves data).
fn in_place(plan: &Plan, op: &Op, inputs: &[Option<usize>], i: usize, env: &[Option<Cow<Tensor>>]) -> bool {
    let Some(Some(x)) = inputs.first() else { return false };
    if plan.last_use[*x] != i || inputs.iter().skip(1).flatten().any(|s| s == x) {
        return false;
    }
    let Some(Cow::Owned(t)) = &env[*x] else { return false };
    match op {
        Op::Reshape { .. } => inputs.len() == 2 && inputs[1].is_some_and(|s| env[s].is_some()),
        Op::Binary(BinaryOp::Add | BinaryOp::Sub | BinaryOp::Mul | BinaryOp::Div) => {
            let b = arg_of(inputs, env, 1);
            inputs.len() == 2
                && matches!(t.data, Data::F32(_))
                && b.is_some_and(|b| matches!(b.data, Data::F32(_)) && Over::of(&t.shape, &b.shape).is_some())
        }
        _ => matches!(t.data, Data::F32(_)) && post_op(op, inputs, env).is_some_and(Post::in_registers),
    }
}

/// A step's element-wise op on its first input as a [`Post`] op: a ReLU, a LeakyRelu, a HardSwish,
/// a Clip with f32 scalar bounds (or none), or a FakeQuant with one scale and zero point; its other inputs
/// computed already and none of them the first.
fn post_op(op: &Op, inputs: &[Option<usize>], env: &[Option<Cow<Tensor>>]) -> Option<Post> {
    let x = inputs.first().copied().flatten()?;
    if inputs[1..].iter().flatten().any(|&s| s == x || env[s].is_none()) {
        return None;
    }
    let arg = |k: usize| arg_of(inputs, env, k);
    match op {
        Op::Unary(UnaryOp::Relu) => Some(Post::Relu),
        Op::Unary(UnaryOp::HardSwish) => Some(Post::HardSwish),
        Op::LeakyRelu { alpha } => Some(Post::LeakyRelu(*alpha)),
        Op::Clip => sqil_ir::ops::clip_bounds_f32(arg(1), arg(2)).map(|(lo, hi)| Post::Clip(lo, hi)),
        Op::FakeQuant { bits, signed, block_size, .. } => {
            let s = arg(1).filter(|s| sqil_ir::ops::quant::one_scale(s, arg(2), *bits, *block_size))?;
            Some(sqil_ir::ops::quant::fake_quant_post(s, arg(2), *bits, *signed))
        }
        _ => None,
    }
}

/// What [`Execute::paths`] calls a step another step's kernel runs as its epilogue.
pub const FUSED: &str = "epilogue (fused)";

/// What [`Execute::paths`] calls a step that a later step ran on its own input: a float
/// convolution's input quantizer (image by image, by the convolution right after it), or a
/// Transpose a later MatMul reads through strides ([`Fold::View`]).
pub const AHEAD: &str = "fused into the step after";

/// Step `i` as the input quantizer of a float convolution right after it ([`post_op`]: a
/// FakeQuant with one scale and zero point, on f32 values) whose output only that convolution
/// reads, as its image: the op and the slot of the quantizer's input. The convolution then runs
/// it image by image ([`sqil_ir::ops::conv_with_table`]'s `pre`): the same values, without a
/// pass over the whole batch and its quantized copy.
fn input_quantizer(plan: &Plan, i: usize, env: &[Option<Cow<Tensor>>]) -> Option<(Post, usize)> {
    let Step::Op { op: op @ Op::FakeQuant { .. }, inputs, outputs, .. } = &plan.steps[i] else { return None };
    let Some(Step::Op { op: Op::Conv(_), inputs: conv_in, outputs: conv_out, .. }) = plan.steps.get(i + 1) else {
        return None;
    };
    let (x, q) = (inputs.first().copied().flatten()?, *outputs.first()?);
    let image_only = conv_in.first() == Some(&Some(q)) && conv_in[1..].iter().all(|s| *s != Some(q));
    // (The convolution then hosts its epilogue, as `epilogue_host` would with its image computed.)
    let hosts = conv_out.len() == 1 && conv_in.len() >= 2;
    if outputs.len() != 1 || !image_only || !hosts || plan.last_use[q] != i + 1 {
        return None;
    }
    let post = post_op(op, inputs, env).filter(|p| matches!(p, Post::FakeQuant { .. }))?;
    env[x].as_deref().filter(|t| matches!(t.data, Data::F32(_)))?;
    Some((post, x))
}

/// What [`Execute::paths`] calls a step that the step before it ran in its own pass (a depthwise
/// convolution after a pointwise int4 one, a pointwise int4 one after a depthwise one:
/// [`sqil_ir::lowered::run_depthwise_chain`]; a Transpose of a MatMul's product, which the MatMul
/// wrote in its order, [`Fold::Transposed`]); its time is that step's.
pub const IN_PASS: &str = "fused into the step before";

/// What a run records per step: wall time (seconds, added), and whether another step's kernel
/// ran it ([`IN_PASS`]).
struct Probe {
    times: Vec<f64>,
    inside: Vec<bool>,
    /// The steps the step after ran on its input in its own pass ([`AHEAD`]).
    ahead: Vec<bool>,
}

impl Probe {
    fn new(plan: &Plan) -> Probe {
        let n = plan.steps.len();
        Probe { times: vec![0.0; n], inside: vec![false; n], ahead: vec![false; n] }
    }
}

/// A pointwise int4 step that a depthwise Conv before it can feed in its own pass: the step's
/// index, its layer, its epilogue (its ReLU first) and that epilogue's last step and value.
struct PointwiseNext<'p> {
    step: usize,
    layer: sqil_ir::lowered::Q4Args<'p>,
    post: Vec<Post>,
    last: usize,
    out: usize,
}

/// The pointwise Q4 convolution step right after step `last` that reads value `v` where `v`
/// dies, if any (whether the pair takes the one-pass kernel is the kernel's to decide).
fn pointwise_after<'p>(
    plan: &'p Plan,
    last: usize,
    v: usize,
    env: &[Option<Cow<Tensor>>],
) -> Option<PointwiseNext<'p>> {
    let j = last + 1;
    let Some(Step::Q4Linear { x, y, act, w, bias, relu, conv: Some(im), .. }) = plan.steps.get(j) else { return None };
    if *x != v || plan.last_use[v] != j || !im.pointwise {
        return None;
    }
    let (mut post, end, out) = epilogue(plan, j, *y, env);
    if *relu {
        post.insert(0, Post::Relu);
    }
    Some(PointwiseNext { step: j, layer: (act, &**w, bias.as_deref(), Some(&**im)), post, last: end, out })
}

/// [`sqil_ir::lowered::run_depthwise_chain`] with the pointwise step after it where that takes
/// the one-pass path, else without it: the output and the step it ended with (`None`: the
/// depthwise's epilogue), or `None` where neither does.
fn chain<'p>(
    source: std::result::Result<(sqil_ir::lowered::Q4Args, &[Post], &Tensor), &Tensor>,
    dw: sqil_ir::lowered::DepthwiseLayer,
    then: Option<PointwiseNext<'p>>,
    threads: usize,
) -> Result<Option<(Tensor, Option<PointwiseNext<'p>>)>> {
    if let Some(n) = then {
        if let Some(t) = sqil_ir::lowered::run_depthwise_chain(source, dw, Some((n.layer, &n.post)), threads)? {
            return Ok(Some((t, Some(n))));
        }
    }
    // A depthwise alone gains nothing from the pass (it is the Conv step's own kernel).
    if source.is_err() {
        return Ok(None);
    }
    Ok(sqil_ir::lowered::run_depthwise_chain(source, dw, None, threads)?.map(|t| (t, None)))
}

/// A depthwise Conv that a pointwise int4 step can run in its own pass: the step's index, its
/// attributes, weight and bias slots, its epilogue and that epilogue's last step and value.
struct DepthwiseNext<'p> {
    step: usize,
    attrs: &'p sqil_ir::ops::ConvAttrs,
    taps: Option<&'p sqil_kernels_cpu::generic::DepthwiseTaps>,
    w: usize,
    b: Option<usize>,
    post: Vec<Post>,
    last: usize,
    out: usize,
}

/// The Conv step right after step `last` that reads value `v` (the end of an int4 step's
/// epilogue) as its input where `v` dies (no other step reads it, not an output), its weight and
/// bias computed already; whether it is depthwise, and the pair takes the one-pass kernel, is
/// [`sqil_ir::lowered::run_depthwise_chain`]'s to decide.
fn depthwise_after<'p>(
    plan: &'p Plan,
    last: usize,
    v: usize,
    env: &[Option<Cow<Tensor>>],
) -> Option<DepthwiseNext<'p>> {
    let j = last + 1;
    let Some(Step::Op { op: Op::Conv(attrs), inputs, outputs, taps, .. }) = plan.steps.get(j) else { return None };
    let ready = |k: usize| inputs.get(k).copied().flatten().filter(|&s| s != v && env[s].is_some());
    let b = match inputs.get(2).copied().flatten() {
        None => None,
        Some(_) => Some(ready(2)?),
    };
    if outputs.len() != 1 || inputs.first() != Some(&Some(v)) || plan.last_use[v] != j || inputs.len() > 3 {
        return None;
    }
    let w = ready(1)?;
    let (post, end, out) = epilogue(plan, j, outputs[0], env);
    Some(DepthwiseNext { step: j, attrs, taps: taps.as_deref(), w, b, post, last: end, out })
}

/// The output slot of step `i` if its kernel can apply element-wise ops to its outputs before
/// storing them ([`Post`]): an int4 step, or a float Conv of f32 values.
fn epilogue_host(plan: &Plan, i: usize, env: &[Option<Cow<Tensor>>]) -> Option<usize> {
    match &plan.steps[i] {
        Step::Q4Linear { y, .. } => Some(*y),
        Step::Op { op: Op::Conv(_), inputs, outputs, .. } if outputs.len() == 1 => {
            let x = arg_of(inputs, env, 0)?;
            (matches!(x.data, Data::F32(_)) && inputs.len() >= 2).then_some(outputs[0])
        }
        // A float Gemm or MatMul (a policy's float first layer): its epilogue over its output
        // while that is in cache, the step after it not dispatched.
        Step::Op { op: Op::Gemm { .. } | Op::MatMul, inputs, outputs, .. } if outputs.len() == 1 => {
            let (x, w) = (arg_of(inputs, env, 0)?, arg_of(inputs, env, 1)?);
            (matches!(x.data, Data::F32(_)) && matches!(w.data, Data::F32(_))).then_some(outputs[0])
        }
        _ => None,
    }
}

/// The element-wise steps right after step `i` (whose output is slot `y`) that its kernel runs
/// as its epilogue, as [`Post`] ops in order, the last such step (`i` if none) and the slot of the
/// value it ends with (`y` if none): each a ReLU, a LeakyRelu,
/// a HardSwish, a Clip with f32 scalar bounds (or none), a FakeQuant with one scale and zero point
/// or a SiLU (a Sigmoid and the Mul of the value by it: [`Post::Silu`]), reading
/// the value before it as its first input and nowhere else, where that value dies (read by no
/// later step, not an output), its other inputs computed already. The same conditions as
/// running in place ([`in_place`]), so the same operations on the same values: the same bits,
/// one pass over memory fewer per op.
fn epilogue(plan: &Plan, i: usize, y: usize, env: &[Option<Cow<Tensor>>]) -> (Vec<Post>, usize, usize) {
    let (mut post, mut cur, mut j) = (vec![], y, i + 1);
    while let Some(Step::Op { op, inputs, outputs, .. }) = plan.steps.get(j) {
        if outputs.len() != 1 || inputs.first() != Some(&Some(cur)) {
            break;
        }
        // SiLU: a Sigmoid of the value, then the product of the two, where both die.
        if let (
            Op::Unary(UnaryOp::Sigmoid),
            Some(Step::Op { op: Op::Binary(BinaryOp::Mul), inputs: m, outputs: mo, .. }),
        ) = (op, plan.steps.get(j + 1))
        {
            let s = outputs[0];
            if (m.as_slice() == [Some(cur), Some(s)] || m.as_slice() == [Some(s), Some(cur)])
                && mo.len() == 1
                && plan.last_use[cur] == j + 1
                && plan.last_use[s] == j + 1
            {
                post.push(Post::Silu);
                cur = mo[0];
                j += 2;
                continue;
            }
        }
        let Some(p) = post_op(op, inputs, env).filter(|_| plan.last_use[cur] == j) else { break };
        post.push(p);
        cur = outputs[0];
        j += 1;
    }
    (post, j - 1, cur)
}

/// Input `k` of a step's `inputs` as computed so far (absent if the step has none there).
fn arg_of<'e>(inputs: &[Option<usize>], env: &'e [Option<Cow<Tensor>>], k: usize) -> Option<&'e Tensor> {
    inputs.get(k).copied().flatten().and_then(|s| env[s].as_deref())
}

/// A folded Transpose's value ([`Fold::View`]): slot `src`'s f32 data read through `strides` as
/// the logical `shape`.
struct View {
    src: usize,
    shape: Vec<usize>,
    strides: Vec<usize>,
}

/// Step `i`, a [`Fold::View`] Transpose, as a view of its input (itself a view, or an f32 tensor
/// read contiguous); `None` (run as planned) where the input is neither or the permutation is
/// not one (the op then says so).
fn transpose_view(plan: &Plan, i: usize, env: &[Option<Cow<Tensor>>], views: &[(usize, View)]) -> Option<View> {
    let Step::Op { op: Op::Transpose { perm }, inputs, .. } = &plan.steps[i] else { return None };
    let x = inputs.first().copied().flatten()?;
    let (src, shape, strides) = match views.iter().find(|(s, _)| *s == x) {
        Some((_, v)) => (v.src, v.shape.clone(), v.strides.clone()),
        None => {
            let t = env[x].as_deref().filter(|t| matches!(t.data, Data::F32(_)))?;
            (x, t.shape.clone(), sqil_ir::tensor::strides_of(&t.shape))
        }
    };
    let p = sqil_ir::ops::transpose_perm(perm.as_deref(), shape.len()).ok()?;
    Some(View { src, shape: p.iter().map(|&a| shape[a]).collect(), strides: p.iter().map(|&a| strides[a]).collect() })
}

/// Step `i` as a MatMul reading folded Transposes through strides and, where it is
/// [`Fold::Transposed`], writing its product in the next step's order as that step's value
/// (`sqil_ir::ops::matmul_strided`: the same chains, so the bits of the planned steps): the last
/// step it covered; `None` to run it as planned, its views copied out first.
fn strided_matmul(
    plan: &Plan,
    i: usize,
    env: &mut [Option<Cow<Tensor>>],
    views: &mut Vec<(usize, View)>,
) -> Result<Option<usize>> {
    let Step::Op { op: Op::MatMul, name, inputs, outputs, .. } = &plan.steps[i] else { return Ok(None) };
    let view_of = |views: &[(usize, View)], s: &usize| views.iter().position(|(v, _)| v == s);
    let transposed = plan.folds[i] == Fold::Transposed;
    if !transposed && !inputs.iter().flatten().any(|s| view_of(views, s).is_some()) {
        return Ok(None);
    }
    let operand = |s: usize| -> Option<sqil_ir::ops::StridedF32<'_>> {
        match view_of(views, &s) {
            Some(k) => {
                let v = &views[k].1;
                let data = env[v.src].as_deref()?.as_f32().ok()?;
                Some(sqil_ir::ops::StridedF32 { data, shape: v.shape.clone(), strides: v.strides.clone() })
            }
            None => {
                let t = env[s].as_deref()?;
                let data = t.as_f32().ok()?;
                Some(sqil_ir::ops::StridedF32 {
                    data,
                    shape: t.shape.clone(),
                    strides: sqil_ir::tensor::strides_of(&t.shape),
                })
            }
        }
    };
    let ab = match (inputs.len(), outputs.len()) {
        (2, 1) => inputs[0].zip(inputs[1]).and_then(|(a, b)| Some((operand(a)?, operand(b)?))),
        _ => None,
    };
    let next_perm = |rank: usize| match plan.steps.get(i + 1) {
        Some(Step::Op { op: Op::Transpose { perm }, outputs: o, .. }) if o.len() == 1 => {
            sqil_ir::ops::transpose_perm(perm.as_deref(), rank).ok().map(|p| (p, o[0]))
        }
        _ => None,
    };
    let ready = ab.filter(|(a, b)| a.shape.len() >= 2 && b.shape.len() >= 2).and_then(|(a, b)| {
        let rank = a.shape.len().max(b.shape.len());
        match transposed {
            true => next_perm(rank).map(|p| (a, b, Some(p))),
            false => Some((a, b, None)),
        }
    });
    let Some((a, b, out)) = ready else {
        // Not on f32 values of rank 2 or more: the views copied out, the step run as planned.
        for s in inputs.iter().flatten() {
            if let Some(k) = view_of(views, s) {
                let (slot, v) = views.remove(k);
                let t = env[v.src]
                    .as_deref()
                    .ok_or_else(|| IrError::Internal(format!("node `{name}`: view source gone")))?;
                let st: Vec<isize> = v.strides.iter().map(|&d| d as isize).collect();
                let idx = sqil_ir::ops::strided_indices(&v.shape, &st, 0);
                env[slot] = Some(Cow::Owned(Tensor::new(v.shape.clone(), t.data.gather(&idx))?));
            }
        }
        return Ok(None);
    };
    let y = sqil_ir::ops::matmul_strided(&a, &b, out.as_ref().map(|(p, _)| &p[..]))
        .map_err(|e| e.context(format!("node `{name}` (MatMul)")))?;
    let (slot, last) = match out {
        Some((_, o)) => (o, i + 1),
        None => (outputs[0], i),
    };
    env[slot] = Some(Cow::Owned(y));
    // The views read here are done with; a source no view reads any more is dropped where no
    // later step reads it.
    let mut done = vec![];
    for s in inputs.iter().flatten() {
        if let Some(k) = view_of(views, s) {
            done.push(views.remove(k).1.src);
        }
    }
    for src in done {
        drop_dead(plan, env, views, src, last);
    }
    Ok(Some(last))
}

/// Drops slot `s`'s value where no step after `last` reads it and no folded Transpose's view reads
/// through it; its buffer serves a later output of the same size (this run's or the next's).
fn drop_dead(plan: &Plan, env: &mut [Option<Cow<Tensor>>], views: &[(usize, View)], s: usize, last: usize) {
    if plan.last_use[s] <= last && !views.iter().any(|(_, v)| v.src == s) {
        if let Some(Cow::Owned(t)) = env[s].take() {
            sqil_ir::pool::recycle(t);
        }
    }
}

/// Runs the plan with constants and inputs borrowed, not copied, and the int8 activation
/// buffers reused from the previous call on this thread; with `probe`, adds each step's wall
/// time to its entry and marks the steps another step's kernel ran; `keep_all` keeps every value
/// (no in-place steps, no steps run in another's pass, nothing dropped).
fn exec<'a>(
    plan: &'a Plan,
    feeds: &'a [Tensor],
    threads: usize,
    mut probe: Option<&mut Probe>,
    keep_all: bool,
) -> Result<Vec<Option<Cow<'a, Tensor>>>> {
    if feeds.len() != plan.inputs.len() {
        return Err(IrError::Invalid(format!("{} inputs given, the policy takes {}", feeds.len(), plan.inputs.len())));
    }
    let mut env: Vec<Option<Cow<'a, Tensor>>> = vec![None; plan.slots];
    for (s, t) in &plan.consts {
        env[*s] = Some(Cow::Borrowed(t));
    }
    for ((_, s), t) in plan.inputs.iter().zip(feeds) {
        env[*s] = Some(Cow::Borrowed(t));
    }
    // Folded Transposes' values (`Plan::folds`), by slot: at most a few live at once.
    let mut views: Vec<(usize, View)> = Vec::new();
    let mut i = 0;
    while i < plan.steps.len() {
        let start = probe.is_some().then(std::time::Instant::now);
        if !keep_all && plan.folds.get(i) == Some(&Fold::View) {
            if let Some(v) = transpose_view(plan, i, &env, &views) {
                // Its value a view (its source kept until the MatMul that reads it).
                let x = plan.steps[i].reads().next();
                views.retain(|(s, _)| Some(*s) != x);
                views.push((plan.steps[i].outputs_of()[0], v));
                // (No time of its own: the MatMul that reads it reads it in place.)
                if let Some(p) = probe.as_deref_mut() {
                    p.ahead[i] = true;
                }
                i += 1;
                continue;
            }
        }
        if !keep_all {
            if let Some(last) = strided_matmul(plan, i, &mut env, &mut views)? {
                for s in plan.steps[i..=last].iter().flat_map(Step::reads) {
                    drop_dead(plan, &mut env, &views, s, last);
                }
                if let Some(p) = probe.as_deref_mut() {
                    if last > i {
                        p.inside[last] = true;
                    }
                    if let Some(start) = start {
                        p.times[i] += start.elapsed().as_secs_f64();
                    }
                }
                i = last + 1;
                continue;
            }
        }
        // A float convolution's input quantizer, run by the convolution (the step after).
        let first = i;
        let pre = input_quantizer(plan, i, &env).filter(|_| !keep_all);
        if pre.is_some() {
            if let Some(p) = probe.as_deref_mut() {
                p.ahead[i] = true;
            }
            i += 1;
        }
        let step = &plan.steps[i];
        // The element-wise steps this step's kernel runs as its epilogue, and the slot of the
        // last one's value (the one this step then writes).
        // (With an input quantizer the convolution's image is the quantizer's f32 input.)
        let host = match (pre, step) {
            (Some(_), Step::Op { inputs, outputs, .. }) => {
                (outputs.len() == 1 && inputs.len() >= 2).then(|| outputs[0])
            }
            _ => epilogue_host(plan, i, &env),
        };
        let (post, mut last, out) = match host.filter(|_| !keep_all) {
            Some(y) => {
                let (post, last, out) = epilogue(plan, i, y, &env);
                (post, last, Some(out))
            }
            None => (vec![], i, None),
        };
        match step {
            Step::Q4Linear { name, x, y, act, w, bias, relu, conv, .. } => {
                let xt = env[*x].as_ref().ok_or_else(|| IrError::Internal(format!("{name}: input not computed")))?;
                // Its own ReLU first (no allocation when it is the whole chain: small policies).
                let with_relu: Vec<Post>;
                let post: &[Post] = match (*relu, post.is_empty()) {
                    (false, _) => &post,
                    (true, true) => &[Post::Relu],
                    (true, false) => {
                        with_relu = std::iter::once(Post::Relu).chain(post.iter().copied()).collect();
                        &with_relu
                    }
                };
                let v = out.unwrap_or(*y);
                // A depthwise Conv that alone reads the value: both in one pass where they can be.
                let next = depthwise_after(plan, last, v, &env).filter(|_| !keep_all && conv.is_some());
                let fused = match &next {
                    Some(d) => {
                        let (dw_w, dw_b) = (env[d.w].as_deref(), d.b.and_then(|b| env[b].as_deref()));
                        let dw = (dw_w.expect("checked by depthwise_after"), dw_b, d.attrs, &d.post[..], d.taps);
                        let layer = (act, &**w, bias.as_deref(), conv.as_deref());
                        // With the pointwise convolution the depthwise feeds, where it can.
                        let then = pointwise_after(plan, d.last, d.out, &env);
                        chain(Ok((layer, post, xt)), dw, then, threads)
                            .map_err(|e| e.context(format!("node `{name}` with the depthwise Conv after it")))?
                    }
                    None => None,
                };
                match (fused, next) {
                    (Some((t, then)), Some(d)) => {
                        if let Some(p) = probe.as_deref_mut() {
                            p.inside[d.step] = true;
                        }
                        (last, env[d.out]) = (d.last, Some(Cow::Owned(t)));
                        if let Some(n) = then {
                            if let Some(p) = probe.as_deref_mut() {
                                p.inside[n.step] = true;
                            }
                            (last, env[n.out]) = (n.last, env[d.out].take());
                        }
                    }
                    _ => {
                        let t = run_q4_layer(name, act, w, bias.as_deref(), conv.as_deref(), post, xt, threads)?;
                        env[v] = Some(Cow::Owned(t));
                    }
                }
            }
            Step::Op { op, inputs, outputs, .. } if !keep_all && in_place(plan, op, inputs, i, &env) => {
                let x = inputs[0].and_then(|s| env[s].take()).expect("checked by in_place").into_owned();
                let y = match op {
                    Op::Reshape { allowzero } => {
                        let spec = inputs[1].and_then(|s| env[s].as_deref()).expect("checked by in_place");
                        let shape = sqil_ir::ops::reshape_target(&x.shape, &spec.data.to_i64_vec(), *allowzero)?;
                        Tensor::new(shape, x.data)?
                    }
                    Op::Binary(o) => {
                        let Tensor { shape, data: Data::F32(mut v) } = x else { unreachable!("checked by in_place") };
                        let b = arg_of(inputs, &env, 1).and_then(|b| Some((b.as_f32().ok()?, &b.shape)));
                        let (b, bsh) = b.expect("checked by in_place");
                        if !sqil_ir::ops::binary_f32_in_place(*o, &mut v, &shape, b, bsh) {
                            return Err(IrError::Internal(format!("{} in place: not checked by in_place", op.name())));
                        }
                        Tensor::from_f32(shape, v)?
                    }
                    _ => {
                        let Tensor { shape, data: sqil_ir::tensor::Data::F32(mut v) } = x else {
                            unreachable!("checked by in_place")
                        };
                        let p = post_op(op, inputs, &env).ok_or_else(|| {
                            IrError::Internal(format!("{} in place: not checked by in_place", op.name()))
                        })?;
                        sqil_kernels_cpu::post_in_place(&mut v, &[p]);
                        Tensor::from_f32(shape, v)?
                    }
                };
                env[outputs[0]] = Some(Cow::Owned(y));
            }
            Step::Op { name, op, inputs, outputs, table, dequant, taps, .. } => {
                let mut args: Vec<Option<&Tensor>> = inputs.iter().map(|s| s.and_then(|s| env[s].as_deref())).collect();
                // The convolution's image before its quantizer (run per image inside it).
                let pre: Vec<Post> = match pre {
                    Some((p, x)) => {
                        args[0] = env[x].as_deref();
                        vec![p]
                    }
                    None => vec![],
                };
                // A depthwise Conv and the pointwise int4 step it alone feeds, in one pass.
                let then = match (op, out, args.as_slice()) {
                    (Op::Conv(c), Some(o), [Some(x), Some(w), b @ ..])
                        if !keep_all && b.len() <= 1 && pre.is_empty() =>
                    {
                        match pointwise_after(plan, last, o, &env) {
                            Some(n) => {
                                let dw = (*w, b.first().copied().flatten(), c, &post[..], taps.as_deref());
                                chain(Err(x), dw, Some(n), threads)
                                    .map_err(|e| e.context(format!("node `{name}` with the int4 step after it")))?
                            }
                            None => None,
                        }
                    }
                    _ => None,
                };
                if let Some((t, Some(n))) = then {
                    if let Some(p) = probe.as_deref_mut() {
                        p.inside[n.step] = true;
                    }
                    (last, env[n.out]) = (n.last, Some(Cow::Owned(t)));
                } else {
                    let res = match (op, table, args.as_slice()) {
                        // A float Gemm at a small batch from its weight's levels (checked by the
                        // plan to rebuild the constant bit for bit): the same chains, a quarter
                        // of the bytes read.
                        (&Op::Gemm { alpha, beta, trans_a: false, trans_b: false }, _, [Some(x), Some(_), c @ ..])
                            if dequant.is_some()
                                && pre.is_empty()
                                && x.rank() == 2
                                && x.shape[0] <= sqil_lower::plan::DEQUANT_MAX_ROWS
                                && matches!(x.data, sqil_ir::Data::F32(_)) =>
                        {
                            let w = dequant.as_deref().expect("checked in the guard");
                            sqil_ir::ops::gemm_dequant(x, w, c.first().copied().flatten(), alpha, beta).map(|y| vec![y])
                        }
                        // The reference Conv with its gather table kept (same arithmetic), its
                        // epilogue applied.
                        (Op::Conv(c), t, [Some(x), Some(w), b @ ..])
                            if out.is_some() || t.as_ref().is_some_and(|t| x.rank() > 1 && x.shape[1..] == t.0) =>
                        {
                            let t = t.as_ref().filter(|t| x.rank() > 1 && x.shape[1..] == t.0).map(|t| &t.1[..]);
                            sqil_ir::ops::conv_with_table(x, w, b.first().copied().flatten(), c, t, (&pre, &post))
                                .map(|y| vec![y])
                        }
                        // A float Gemm or MatMul with its epilogue (applied below).
                        (Op::Gemm { .. } | Op::MatMul, _, _) if pre.is_empty() => op.eval(&args, outputs.len()),
                        // (An epilogue or an input quantizer is planned only on a Conv, a Gemm or a
                        // MatMul with these inputs.)
                        _ if !(post.is_empty() && pre.is_empty()) => {
                            Err(IrError::Internal("an epilogue on a step that cannot run it".into()))
                        }
                        _ => op.eval(&args, outputs.len()),
                    }
                    .and_then(|mut res| {
                        // The Gemm's or MatMul's epilogue: the steps' own operations on each value
                        // in order (as they run in place), one pass over its output.
                        if matches!(op, Op::Gemm { .. } | Op::MatMul) && !post.is_empty() {
                            match res.first_mut().map(|t| &mut t.data) {
                                Some(Data::F32(v)) => sqil_kernels_cpu::post_in_place(v, &post),
                                _ => return Err(IrError::Internal("an epilogue on a non-f32 product".into())),
                            }
                        }
                        Ok(res)
                    })
                    .map_err(|e| e.context(format!("node `{name}` ({})", op.name())))?;
                    if let Some(out) = out {
                        env[out] = res.into_iter().next().map(Cow::Owned);
                    } else {
                        for (s, t) in outputs.iter().zip(res) {
                            env[*s] = Some(Cow::Owned(t));
                        }
                    }
                }
            }
        }
        // Values no later step reads are dropped now, their memory reused by later outputs (those
        // of the steps run as this one's epilogue too).
        if !keep_all {
            for s in plan.steps[first..=last].iter().flat_map(Step::reads) {
                drop_dead(plan, &mut env, &views, s, last);
            }
        }
        if let (Some(p), Some(start)) = (probe.as_deref_mut(), start) {
            p.times[i] += start.elapsed().as_secs_f64();
        }
        i = last + 1;
    }
    Ok(env)
}

#[cfg(test)]
mod tests {
    use sqil_ir::Tensor;

    /// A Clip or per-tensor FakeQuant whose input dies at it runs in place (and one whose input
    /// lives on does not), with the interpreter's bits: NaN, infinities, both bounds, values on
    /// the bounds and between levels, a subnormal.
    #[test]
    fn clip_and_fake_quant_in_place_equal_the_interpreter() {
        let text = "graph \"g\" (%x: f32[N,8]) -> (%y, %z, %q) {\n\
                    \x20 %lo = Const[value=f32[]{-1.0}] : f32[]\n\
                    \x20 %hi = Const[value=f32[]{0.5}] : f32[]\n\
                    \x20 %s = Const[value=f32[]{0.03}] : f32[]\n\
                    \x20 %zp = Const[value=f32[]{3.0}] : f32[]\n\
                    \x20 %n = Neg(%x) : f32[N,8]\n\
                    \x20 %y = Clip(%n, %lo, %hi) : f32[N,8]\n\
                    \x20 %m = Neg(%x) : f32[N,8]\n\
                    \x20 %c = Clip(%m, %lo) : f32[N,8]\n\
                    \x20 %z = Add(%c, %m) : f32[N,8]\n\
                    \x20 %r = Neg(%x) : f32[N,8]\n\
                    \x20 %q = FakeQuant[bits=8,signed=1](%r, %s, %zp) : f32[N,8]\n\
                    }\n";
        let g = sqil_ir::parse_graph(text).unwrap();
        let vals = [
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1.0,
            -0.5,
            0.5,
            -1.0,
            0.0,
            -0.0,
            3.0,
            -7.25,
            1e-40,
            0.25,
            -2.0,
            2.0,
            0.75,
        ];
        let x = Tensor::from_f32(vec![2, 8], vals.to_vec()).unwrap();
        let pol = crate::Policy::from_graph(&g).unwrap();
        let got = pol.run(std::slice::from_ref(&x)).unwrap();
        let feeds = [("x".to_string(), x)].into_iter().collect();
        let want = sqil_ir::interp::run(&g, &feeds).unwrap();
        for (a, b) in got.iter().zip(&want) {
            let bits = |t: &Tensor| t.data.to_f32_vec().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(a), bits(b));
        }
    }
}
