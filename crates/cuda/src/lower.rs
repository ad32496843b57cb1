//! A planned policy (`sqil_lower::Plan`) lowered for the GPU, one state at a time, independent of
//! any device (no cudarc here: `sqil-codegen` prints a lowered policy as a standalone `.cu` file,
//! `policy::GpuPolicy` runs one): every step a kernel of `policy_ops.cu` or an element-wise chain
//! generated for the policy, over f32 buffers.
//!
//! Arithmetic: the CPU runtime's. Int4 layers quantize their input as the CPU does, sum integers
//! exactly and apply the runtime's f32 epilogue product by product (`sqil_q4_int`), weight-only layers follow its eight-lane kernel
//! (`sqil_q4_w16`), float linear maps and convolutions its one fma chain per output; those steps
//! give the CPU's bits. Element-wise functions run in double and round once, like the reference
//! interpreter; sqil's own functions (sigmoid, tanh, softplus, ELU: `sqil_math.cuh`) by the
//! CPU's operations, the platform's (exp, log, erf, GELU) by CUDA's. Softmax, LayerNorm, the
//! pools and the Reduce ops follow the CPU's definitions (its summation order, in double; its
//! choice of maximum): actions agree with the CPU runtime within [`GPU_TOL`], which the
//! platform's functions need.

use crate::error::Result;
use sqil_ir::ops::{BinaryOp, Op};
use sqil_ir::Tensor;
use sqil_lower::{ActQuant, Step};
use sqil_runtime::Execute;
use sqil_runtime::Policy;

/// Largest |GPU - CPU runtime| on an action relative to the largest |action| that the GPU check
/// accepts: the int4 and linear steps are the CPU's bits, element-wise functions and reductions
/// differ in the last bits of f32.
pub const GPU_TOL: f32 = 1e-6;

/// A lowered step: a kernel (`policy_ops.cu`, or generated for the policy) with its arguments in
/// order, `threads` threads in blocks of 256; `A` a constant array as stored on the host
/// ([`HostArr`]) or on the device.
#[derive(Clone)]
pub enum LStep<A> {
    Kernel { name: String, args: Vec<KArg<A>>, threads: usize },
}

/// A constant array argument of a generic kernel step, on the host.
#[derive(Clone, Debug)]
pub enum HostArr {
    F32(Vec<f32>),
    I32(Vec<i32>),
    U32(Vec<u32>),
}

/// An argument of a generic kernel step.
#[derive(Clone, Debug)]
pub enum KArg<A> {
    /// An f32 activation buffer.
    Buf(usize),
    /// A constant array.
    Arr(A),
    /// A null pointer (an absent operand).
    Null,
    /// The fp32 inputs from this offset.
    In(usize),
    I32(i32),
    F32(f32),
}

/// A policy lowered for the GPU, independent of any device: fp16 buffers (sizes padded to 128),
/// the steps over them, the fp32 inputs (concatenated: one copy in) and the output buffer.
#[derive(Clone)]
pub struct Lowered {
    pub bufs: Vec<usize>,
    pub steps: Vec<LStep<HostArr>>,
    /// The inputs' lengths, in order; they sit one after another in one fp32 buffer.
    pub in_lens: Vec<usize>,
    pub in_len: usize,
    pub output: usize,
    /// The outputs' lengths, in order; they sit one after another in the output buffer.
    pub out_lens: Vec<usize>,
    pub out_len: usize,
    pub describe: Vec<String>,
    /// Per lowered step, the kernel and the plan step it comes from (for profiles).
    pub labels: Vec<String>,
    /// Generated kernels (fused element-wise chains): (name, CUDA source without fp16.cuh).
    pub sources: Vec<(String, String)>,
}

pub(crate) fn err<E: std::fmt::Debug>(e: E) -> crate::Error {
    crate::Error::Device(format!("{e:?}"))
}

type HStep = LStep<HostArr>;

/// Output channels from which an int4 layer's input levels are computed once by `sqil_levels`
/// (below, each output's warp quantizes the input as it reads it: one launch fewer).
const WIDE: usize = 512;

/// Groups per row from which, and outputs (rows x channels) up to which, an int4 layer on
/// integer activations takes a block per output (`sqil_q4_int_groups`) instead of a warp.
const GROUPS_LONG: usize = 16;
const OUTPUTS_FEW: usize = 1024;

/// Rows (tokens, a batch) from which an int4 layer on integer activations takes a thread per
/// output in tiles of 16 rows x 32 outputs (`sqil_q4_int_tile`: each input quantized once per 32
/// outputs, not once per output's warp) where its groups are whole words of four terms, 32 or more.
const TILE_ROWS: usize = 8;

/// Whether an int4 layer on integer activations over `rows` rows runs `sqil_q4_int_tile`.
fn tile_takes(rows: usize, w: &sqil_kernels_cpu::PackedQ4) -> bool {
    rows >= TILE_ROWS && w.group >= 32 && w.group.is_multiple_of(4)
}

/// Threads of a `sqil_q4_int_tile` launch over `rows` x `n` outputs.
fn tile_threads(rows: usize, n: usize) -> usize {
    rows.div_ceil(16) * n.div_ceil(32) * 256
}
/// Rows from which a float layer takes a thread per output in 32 x 32 tiles
/// (`sqil_linear_f32w_tile`) instead of a warp per output (whose shuffles, two per term, bound a
/// transformer's projections of its tokens).
const F32_TILE_ROWS: usize = 8;
/// A convolution with fewer output tiles than this many blocks splits its groups across blocks
/// (`sqil_q4_conv_int`'s split, `sqil_q4_conv_finish`): a ResNet's late stages (a 3 x 3 plane of
/// 512 channels is 32 tiles on 132 multiprocessors, each walking 4 608 terms).
const CONV_BLOCKS: usize = 264;
/// The fewest terms a split walks (two of the kernel's 128-term chunks).
const CONV_SPLIT_TERMS: usize = 256;

/// An int4 layer's weights for `sqil_q4_int` / `sqil_q4_w16`: per output channel a row of `k`
/// signed bytes, four to a word (a warp's lanes read consecutive bytes of one row).
fn int8_words(w: &sqil_kernels_cpu::PackedQ4) -> Vec<u32> {
    let k4 = w.k.div_ceil(4);
    let mut words = vec![0u32; w.n * k4];
    for c in 0..w.n {
        for kk in 0..w.k {
            words[c * k4 + kk / 4] |= (w.get(c, kk) as u8 as u32) << (8 * (kk % 4));
        }
    }
    words
}

fn kernel(name: &str, threads: usize, args: Vec<KArg<HostArr>>) -> HStep {
    LStep::Kernel { name: name.to_string(), args, threads }
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

/// Lowers `policy` (every input dimension but the batch known) for the GPU: the plan's steps over
/// f32 buffers, int4 layers repacked in the CUDA layout; several outputs are one action vector,
/// concatenated in order (one copy out).
///
/// Fewer launches than plan steps (a small policy's replay time is its launch count): reshapes
/// alias their input's buffer; data movement is deferred and composed (a transformer's Split ->
/// Reshape -> Transpose is one copy per head layout), materialised only where something else
/// reads it; a per-tensor activation quantizer (FakeQuant) is deferred into the input read of a
/// float Gemm / MatMul that consumes it. Which steps form one kernel with an int4 layer (its bias,
/// ReLU) is the plan's choice (`sqil_lower`, from the fusion pass); element-wise steps the plan
/// leaves separate are printed as generated kernels, consecutive ones merged into one.
pub fn lower(policy: &Policy) -> Result<Lowered> {
    let plan = &policy.plan;
    if plan.outputs.is_empty() {
        return Err("the policy has no output".into());
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
    let mut is_const = vec![false; plan.slots];
    for (s, _) in &plan.consts {
        is_const[*s] = true;
    }
    let mut reads = vec![0usize; plan.slots];
    plan.steps.iter().flat_map(Step::reads).chain(plan.outputs.iter().copied()).for_each(|s| reads[s] += 1);
    let mut l = Lowerer {
        reads,
        plan,
        env: &env,
        is_const,
        slot_buf: vec![usize::MAX; plan.slots],
        bufs: vec![],
        steps: vec![],
        cast_done: vec![false; plan.inputs.len()],
        in_offs,
        in_lens: in_lens.clone(),
        pending: Default::default(),
        what: String::new(),
        next_t: 0,
        sources: vec![],
        next_read: 0,
    };
    let mut describe = vec![];
    let mut labels: Vec<String> = vec![];
    for (st, d) in plan.steps.iter().zip(plan.describe()) {
        l.what = d.clone();
        match st {
            // Constant steps fold (their traced values are constants), and so does Shape: one
            // state of known shape makes a transformer's shape arithmetic constant.
            Step::Op { op, inputs, outputs, .. }
                if inputs.iter().flatten().all(|&s| l.is_const[s]) || matches!(op, Op::Shape { .. }) =>
            {
                outputs.iter().for_each(|&s| l.is_const[s] = true);
                continue;
            }
            Step::Q4Linear { x, y, act, w, bias, relu, conv, .. } => {
                l.q4(*x, *y, act, w, bias.as_deref(), *relu, conv.as_deref())?
            }
            Step::Op { op, inputs, outputs, .. } => l.op(op, inputs, outputs)?,
        }
        while labels.len() < l.steps.len() {
            labels.push(format!("{}: {d}", step_kernel(&l.steps[labels.len()])));
        }
        describe.push(d);
    }
    l.what = "the policy's output".into();
    let mut out_lens = vec![];
    for &out in &plan.outputs {
        if l.input_of(out).is_some() {
            return Err("the policy's output is its input".into());
        }
        out_lens.push(env[out].as_ref().map_or(0, |t| t.len()));
    }
    let output = if let [out] = plan.outputs[..] {
        l.dyn_buf(out)?
    } else {
        // Several outputs: copied one after another into one buffer (one copy out).
        let mut elems = vec![];
        for &out in &plan.outputs {
            if l.is_const[out] {
                elems.extend(l.val(out)?.data.to_f32_vec().into_iter().map(Elem::Const));
            } else {
                elems.extend(l.elems(out)?);
            }
        }
        let y = l.new_buf(elems.len());
        l.emit_copy(&elems, y);
        y
    };
    while labels.len() < l.steps.len() {
        labels.push(format!("{}: output", step_kernel(&l.steps[labels.len()])));
    }
    // A layer that took up a chain as its epilogue (`chain_into_last`) was renamed after its label.
    for (label, st) in labels.iter_mut().zip(&l.steps) {
        if let Some((_, what)) = label.split_once(": ") {
            *label = format!("{}: {what}", step_kernel(st));
        }
    }
    let out_len = out_lens.iter().sum();
    let in_len = in_lens.iter().sum();
    fit_cluster(&mut l.steps);
    Ok(Lowered {
        bufs: l.bufs,
        steps: l.steps,
        in_lens,
        in_len,
        output,
        out_len,
        out_lens,
        describe,
        labels,
        sources: l.sources,
    })
}

/// A value whose steps are deferred until something reads its buffer.
#[derive(Clone, Debug)]
enum Pending {
    /// Per output element, what it copies: a constant or (buffer, element).
    Copy(Vec<Elem>),
    /// `fq(x)`: buffer, length, quantizer (scale, zero, lo, hi).
    Quant(usize, usize, [f32; 4]),
    /// A chain of element-wise steps, one generated kernel when materialised.
    Expr(Expr),
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Elem {
    Const(f32),
    From(usize, usize),
    /// Element `k` of the policy's input (all inputs concatenated): read where it is, no cast step.
    In(usize),
}

/// The lowering's state: buffers per plan slot, the steps so far, deferred values.
struct Lowerer<'a> {
    plan: &'a sqil_lower::Plan,
    env: &'a [Option<Tensor>],
    is_const: Vec<bool>,
    slot_buf: Vec<usize>,
    bufs: Vec<usize>,
    steps: Vec<HStep>,
    cast_done: Vec<bool>,
    in_offs: Vec<usize>,
    in_lens: Vec<usize>,
    pending: std::collections::HashMap<usize, Pending>,
    /// The plan step being lowered (for errors).
    what: String,
    /// The next local of a fused element-wise chain (`tN`).
    next_t: usize,
    /// Generated kernels so far.
    sources: Vec<(String, String)>,
    /// Per slot, how many plan steps read its values (one more for a policy output; a reshape
    /// aliasing it, or a bias Add or Relu folded into the layer that wrote it, does not count).
    reads: Vec<usize>,
    /// The next number of a buffer read that a chain takes up (`Expr::reads`).
    next_read: usize,
}

impl<'a> Lowerer<'a> {
    fn err(&self, why: &str) -> crate::Error {
        crate::Error::Unsupported(format!("step `{}`: not supported by the GPU policy ({why})", self.what))
    }

    fn input_of(&self, s: usize) -> Option<usize> {
        self.plan.inputs.iter().position(|(_, slot)| *slot == s)
    }

    fn val(&self, s: usize) -> Result<&'a Tensor> {
        let env: &'a [Option<Tensor>] = self.env;
        env[s].as_ref().ok_or_else(|| self.err("a value was not computed"))
    }

    fn constant(&self, s: Option<usize>) -> Option<&'a Tensor> {
        let env: &'a [Option<Tensor>] = self.env;
        s.filter(|&s| self.is_const[s]).and_then(|s| env[s].as_ref())
    }

    /// A fresh buffer of `len` halves (padded to 128 with zeros: the int4 kernels read whole
    /// groups of 128).
    fn new_buf(&mut self, len: usize) -> usize {
        self.bufs.push(len.div_ceil(128).max(1) * 128);
        self.bufs.len() - 1
    }

    /// The buffer slot `s` is written to (allocated on first use).
    fn out_buf(&mut self, s: usize) -> Result<usize> {
        if self.slot_buf[s] == usize::MAX {
            let len = self.val(s)?.len();
            self.slot_buf[s] = self.new_buf(len);
        }
        Ok(self.slot_buf[s])
    }

    /// The buffer holding computed value `s`, with its deferred steps emitted and an input cast
    /// to fp16 on first use.
    fn dyn_buf(&mut self, s: usize) -> Result<usize> {
        if let Some(p) = self.pending.remove(&s) {
            let y = self.out_buf(s)?;
            match p {
                Pending::Quant(x, n, q) => {
                    let mut e = Expr::default();
                    let a = e.arg(EArg::Buf(x));
                    e.fake_quant(&a, q, &mut self.next_t);
                    self.emit_expr(e, y, n);
                }
                Pending::Copy(elems) => self.emit_copy(&elems, y),
                Pending::Expr(e) => {
                    let n = self.val(s)?.len();
                    self.emit_expr(e, y, n);
                }
            }
            return Ok(y);
        }
        let b = self.out_buf(s)?;
        if let Some(i) = self.input_of(s) {
            if !self.cast_done[i] {
                // The fp32 input cast to fp16: a generated kernel of one read.
                let mut e = Expr::default();
                e.result = e.arg(EArg::In(self.in_offs[i]));
                self.emit_expr(e, b, self.in_lens[i]);
                self.cast_done[i] = true;
            }
        }
        Ok(b)
    }

    /// The generated kernel of `e`, writing `n` values into buffer `y`.
    fn emit_expr(&mut self, e: Expr, y: usize, n: usize) {
        self.emit_expr_levels(e, y, n, None)
    }

    /// [`Self::emit_expr`], and with `levels` (buffer, quantizer) the values' int8 levels into
    /// that buffer too: the kernel takes (operands..., y, lv, n).
    fn emit_expr_levels(&mut self, mut e: Expr, y: usize, n: usize, levels: Option<(usize, [f32; 4])>) {
        if self.chain_into_last(&e, y, levels) {
            return;
        }
        e.levels = levels.map(|(_, q)| q);
        let (name, src) = e.render();
        if !self.sources.iter().any(|(k, _)| *k == name) {
            self.sources.push((name.clone(), src));
        }
        let mut args: Vec<KArg<HostArr>> = e
            .args
            .into_iter()
            .map(|a| match a {
                EArg::Buf(b) => KArg::Buf(b),
                EArg::In(off) => KArg::In(off),
                EArg::Const(v) => f32_arr(v),
            })
            .collect();
        args.push(KArg::Buf(y));
        if let Some((lv, _)) = levels {
            args.push(KArg::Buf(lv));
        }
        args.push(int(n));
        self.steps.push(kernel(&name, n, args));
    }

    /// Computed value `s` as an operand of the chain `e`: a deferred chain merged in, an input
    /// not yet cast read in fp32, else its buffer. Returns the C expression of its value.
    fn operand_expr(&mut self, e: &mut Expr, s: usize) -> Result<String> {
        if let Some(Pending::Expr(p)) = self.pending.get(&s).cloned() {
            return Ok(e.absorb(p));
        }
        let a = match self.input_of(s).filter(|&i| !self.cast_done[i]) {
            Some(i) => EArg::In(self.in_offs[i]),
            None => {
                let b = self.dyn_buf(s)?;
                e.reads.push((b, self.next_read));
                self.next_read += 1;
                EArg::Buf(b)
            }
        };
        Ok(e.arg(a))
    }

    /// What each element of computed value `s` copies, without emitting anything: a deferred
    /// copy's elements, else the value's own buffer element by element.
    fn elems(&mut self, s: usize) -> Result<Vec<Elem>> {
        if let Some(Pending::Copy(e)) = self.pending.get(&s) {
            return Ok(e.clone());
        }
        let n = self.val(s)?.len();
        if let Some(i) = self.input_of(s) {
            let off = self.in_offs[i];
            return Ok((0..n).map(|k| Elem::In(off + k)).collect());
        }
        let b = self.dyn_buf(s)?;
        Ok((0..n).map(|k| Elem::From(b, k)).collect())
    }

    /// Copy steps writing `elems` into buffer `y`: the constants, then one copy table per source
    /// buffer.
    fn emit_copy(&mut self, elems: &[Elem], y: usize) {
        let consts: Vec<(usize, f32)> = elems
            .iter()
            .enumerate()
            .filter_map(|(i, e)| if let Elem::Const(v) = e { Some((i, *v)) } else { None })
            .collect();
        if !consts.is_empty() {
            let (idx, v): (Vec<usize>, Vec<f32>) = consts.into_iter().unzip();
            let m = idx.len();
            self.steps.push(kernel("sqil_set_consts", m, vec![KArg::Buf(y), i32_arr(&idx), f32_arr(v), int(m)]));
        }
        // The sources (buffers, the input), in order; each one's (to, from) pairs.
        let mut srcs: Vec<(KArg<HostArr>, Vec<usize>)> = vec![];
        for (i, e) in elems.iter().enumerate() {
            let (src, k) = match *e {
                Elem::From(b, k) => (KArg::Buf(b), k),
                Elem::In(k) => (KArg::In(0), k),
                Elem::Const(_) => continue,
            };
            let same = |a: &KArg<HostArr>| match (a, &src) {
                (KArg::Buf(a), KArg::Buf(b)) => a == b,
                (KArg::In(_), KArg::In(_)) => true,
                _ => false,
            };
            match srcs.iter_mut().find(|(a, _)| same(a)) {
                Some((_, pairs)) => pairs.extend([i, k]),
                None => srcs.push((src, vec![i, k])),
            }
        }
        // Two sources to a step (a head's concatenation of features and the observation: one
        // launch), one for the last of an odd count.
        for two in srcs.chunks(2) {
            match two {
                [(a, pa), (b, pb)] => {
                    let (m0, m) = (pa.len() / 2, (pa.len() + pb.len()) / 2);
                    let pairs: Vec<usize> = pa.iter().chain(pb).copied().collect();
                    let args = vec![a.clone(), b.clone(), KArg::Buf(y), i32_arr(&pairs), int(m0), int(m)];
                    self.steps.push(kernel("sqil_copy_pairs2", m, args));
                }
                [(a, pa)] => {
                    let m = pa.len() / 2;
                    self.steps.push(kernel("sqil_copy_pairs", m, vec![a.clone(), KArg::Buf(y), i32_arr(pa), int(m)]));
                }
                _ => unreachable!("chunks of two"),
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn q4(
        &mut self,
        x: usize,
        y: usize,
        act: &ActQuant,
        w: &sqil_kernels_cpu::PackedQ4,
        bias: Option<&[f32]>,
        relu: bool,
        conv: Option<&sqil_ir::lowered::conv::Im2col>,
    ) -> Result<()> {
        // A convolution of one position reading one input position, every channel once (a
        // squeeze-and-excitation block's 1 x 1 layers on the pooled vector), is the linear map on
        // the channel vector: the same arithmetic, without a 32-position tile for one position.
        let conv = conv.filter(|im| !(im.table == [0] && im.run == im.channels && im.geo.input_len() == 1));
        let xlen = self.val(x)?.len();
        // The input's levels once: where the input is a deferred element-wise chain, that
        // chain's kernel writes them beside the values (no quantizer's division per term in the
        // layer, which reads levels).
        let mut levels_of_chain = None;
        if let ActQuant::Int { scale, zero, lo, hi } = *act {
            if matches!(self.pending.get(&x), Some(Pending::Expr(_))) {
                let Some(Pending::Expr(e)) = self.pending.remove(&x) else { unreachable!("checked above") };
                let (xb, lb) = (self.out_buf(x)?, self.new_buf(xlen));
                self.emit_expr_levels(e, xb, xlen, Some((lb, [scale, zero as f32, lo as f32, hi as f32])));
                levels_of_chain = Some(lb);
            }
        }
        let xb = self.dyn_buf(x)?;
        let yb = self.out_buf(y)?;
        // The levels of x: from its chain, else from the layer that just wrote x (its levels
        // epilogue), else one `sqil_levels` step.
        let levels = |l: &mut Self, scale: f32, q: &[KArg<HostArr>; 3]| -> usize {
            if let Some(lb) = levels_of_chain {
                return lb;
            }
            if let Some(lb) = l.levels_from_last(xb, xlen, scale, q) {
                return lb;
            }
            let lb = l.new_buf(xlen);
            let mut args = vec![KArg::Buf(xb), KArg::Buf(lb), int(xlen), KArg::F32(scale)];
            args.extend(q.iter().cloned());
            l.steps.push(kernel("sqil_levels", xlen, args));
            lb
        };
        let (wq, scales) = (KArg::Arr(HostArr::U32(int8_words(w))), f32_arr(w.scales.clone()));
        let bias = bias.map_or(KArg::Null, |b| f32_arr(b.to_vec()));
        let (rows, table, taps, channels, plane, run) = match conv {
            Some(im) => {
                let taps = im.geo.kernel_len().max(1);
                let table = KArg::Arr(HostArr::U32(im.table.clone()));
                (im.table.len() / taps, table, taps, im.channels, im.geo.input_len(), im.run)
            }
            None => (xlen / w.k.max(1), KArg::Null, 0, 0, 0, 0),
        };
        let dims = [int(rows), int(w.n), int(w.k), int(w.group), int(w.groups())];
        match *act {
            ActQuant::Int { scale, zero, lo, hi } => {
                let q = [zero as f32, lo as f32, hi as f32].map(KArg::F32);
                if conv.is_some() {
                    // The levels once (each is read by every window over it), then tiles of
                    // outputs (`sqil_q4_conv_int`).
                    let lb = levels(self, scale, &q);
                    // Tiles of 32 positions x 16 channels, 256 threads each; too few of them over
                    // long windows split the groups (whole groups of 32 terms or more).
                    let tiles = rows.div_ceil(32) * w.n.div_ceil(16);
                    let groups = w.groups();
                    let splits = if tiles < CONV_BLOCKS && groups > 1 && w.group.is_multiple_of(32) {
                        CONV_BLOCKS.div_ceil(tiles).min(w.k / CONV_SPLIT_TERMS).min(groups)
                    } else {
                        1
                    };
                    let gsplit = groups.div_ceil(splits.max(1));
                    let splits = groups.div_ceil(gsplit);
                    let (prod, flags) = if splits > 1 {
                        (Some(self.new_buf(groups * rows * w.n)), Some(self.new_buf(splits * rows)))
                    } else {
                        (None, None)
                    };
                    let buf = |b: Option<usize>| b.map_or(KArg::Null, KArg::Buf);
                    let mut args = vec![wq, scales, bias.clone(), KArg::Buf(lb), KArg::Buf(yb), table];
                    args.extend(dims);
                    args.extend([
                        KArg::F32(scale),
                        KArg::I32(relu as i32),
                        int(taps),
                        int(channels),
                        int(plane),
                        int(run),
                        int(if splits > 1 { gsplit } else { 0 }),
                        buf(prod),
                        buf(flags),
                    ]);
                    args.extend(no_levels_out());
                    self.steps.push(kernel("sqil_q4_conv_int", splits * tiles * 256, args));
                    if splits > 1 {
                        let mut args = vec![
                            buf(prod),
                            buf(flags),
                            bias,
                            KArg::Buf(yb),
                            int(rows),
                            int(w.n),
                            int(groups),
                            int(splits),
                            KArg::F32(scale),
                            KArg::I32(relu as i32),
                        ];
                        args.extend(no_levels_out());
                        self.steps.push(kernel("sqil_q4_conv_finish", rows * w.n, args));
                    }
                } else if w.n >= WIDE {
                    // A wide layer: the levels once (each input element is read by every output's
                    // warp), then one warp per output.
                    let lb = levels(self, scale, &q);
                    let mut args = vec![wq, scales, bias, KArg::Buf(lb), KArg::Buf(yb)];
                    args.extend(dims);
                    args.extend([KArg::F32(scale), KArg::I32(relu as i32)]);
                    if tile_takes(rows, w) {
                        // Scale 0 (x holds levels); the zero and range place them in bytes.
                        args.push(KArg::F32(0.0));
                        args.extend(q.clone());
                        self.steps.push(kernel("sqil_q4_int_tile", tile_threads(rows, w.n), args));
                    } else {
                        args.extend([0.0f32; 4].map(KArg::F32));
                        self.push_warp_layer("sqil_q4_int", args, rows * w.n);
                    }
                } else {
                    // The input's levels where the layer that just wrote it can write them too
                    // (its levels epilogue: no quantizer's division per term here, scale 0 says
                    // x holds levels; the tile takes the zero and range to place them in bytes),
                    // else the input quantized as it is read (one launch fewer). One warp per
                    // output, or for a few outputs over long rows a block per output, its warps
                    // on the groups (`sqil_q4_int_groups`).
                    let (xin, qs) = match levels_of_chain.or_else(|| self.levels_from_last(xb, xlen, scale, &q)) {
                        Some(lb) => (lb, 0.0),
                        None => (xb, scale),
                    };
                    let mut args = vec![wq, scales, bias, KArg::Buf(xin), KArg::Buf(yb)];
                    args.extend(dims);
                    args.extend([KArg::F32(scale), KArg::I32(relu as i32), KArg::F32(qs)]);
                    args.extend(q);
                    if w.groups() >= GROUPS_LONG && rows * w.n <= OUTPUTS_FEW {
                        self.steps.push(kernel("sqil_q4_int_groups", rows * w.n * 256, args));
                    } else if tile_takes(rows, w) {
                        self.steps.push(kernel("sqil_q4_int_tile", tile_threads(rows, w.n), args));
                    } else {
                        self.push_warp_layer("sqil_q4_int", args, rows * w.n);
                    }
                }
            }
            ActQuant::Float if conv.is_none() => {
                let mut args = vec![wq, scales, bias, KArg::Buf(xb), KArg::Buf(yb)];
                args.extend(dims);
                args.push(KArg::I32(relu as i32));
                // A warp per output.
                self.steps.push(kernel("sqil_q4_w16", rows * w.n * 32, args));
            }
            ActQuant::Float => return Err(self.err("an int4 convolution on float activations")),
        }
        Ok(())
    }

    fn op(&mut self, op: &Op, inputs: &[Option<usize>], outputs: &[usize]) -> Result<()> {
        let y = outputs[0];
        let yt = self.val(y)?.clone();
        let n = yt.len();
        let dynamic: Vec<usize> = inputs.iter().flatten().copied().filter(|&s| !self.is_const[s]).collect();
        let cval = |l: &Self, j: usize| l.constant(inputs.get(j).copied().flatten());
        match op {
            // Reshapes alias their input (a deferred copy stays deferred).
            Op::Identity | Op::Reshape { .. } | Op::Flatten { .. } | Op::Squeeze | Op::Unsqueeze
                if dynamic.len() == 1 =>
            {
                let x = dynamic[0];
                match self.pending.get(&x).cloned() {
                    Some(p) => {
                        self.pending.insert(y, p);
                    }
                    None => {
                        // y aliases x's buffer: this read is not one of x's values (a chain
                        // taking up y's reads may then take up the buffer's, `chain_into_last`).
                        self.slot_buf[y] = self.dyn_buf(x)?;
                        self.reads[x] = self.reads[x].saturating_sub(1);
                    }
                }
            }
            // Data movement: deferred, composed with the deferred copies it reads.
            _ if sqil_ir::ops::movement::is_movement(op) => {
                use sqil_ir::ops::movement::{copy_sources, CopySrc};
                let args: Vec<Option<&Tensor>> = inputs.iter().map(|s| s.and_then(|s| self.env[s].as_ref())).collect();
                let computed: Vec<bool> = inputs.iter().map(|s| s.is_some_and(|s| !self.is_const[s])).collect();
                let src = copy_sources(op, &args, &computed, outputs.len(), &self.what).map_err(|e| e.to_string())?;
                let mut from: Vec<Option<Vec<Elem>>> = vec![None; inputs.len()];
                for (j, s) in inputs.iter().enumerate() {
                    if let Some(s) = s.filter(|_| computed[j]) {
                        from[j] = Some(self.elems(s)?);
                    }
                }
                for (o, &yo) in outputs.iter().enumerate() {
                    let vals = self.val(yo)?.data.to_f32_vec();
                    let elems: Vec<Elem> = src[o]
                        .iter()
                        .enumerate()
                        .map(|(i, s)| match *s {
                            CopySrc::Const => Elem::Const(vals[i]),
                            CopySrc::Input(j, k) => from[j].as_ref().expect("computed input")[k],
                        })
                        .collect();
                    self.pending.insert(yo, Pending::Copy(elems));
                }
            }
            // A quantizer on a buffer: deferred into a float layer that reads it (or one step);
            // on a deferred chain or an input: the chain's last statement (below).
            Op::FakeQuant { bits, signed, .. }
                if dynamic.len() == 1
                    && inputs[0] == Some(dynamic[0])
                    && !matches!(self.pending.get(&dynamic[0]), Some(Pending::Expr(_)))
                    && self.input_of(dynamic[0]).is_none() =>
            {
                let (Some(s), z) = (cval(self, 1), cval(self, 2)) else { return Err(self.err("computed scale")) };
                if s.len() != 1 || z.is_some_and(|z| z.len() != 1) {
                    return Err(self.err("only per-tensor activation quantizers"));
                }
                let (lo, hi) = sqil_ir::ops::quant::fake_quant_range(*bits, *signed);
                let q = [s.data.to_f32_vec()[0], z.map_or(0.0, |z| z.data.to_f32_vec()[0]), lo as f32, hi as f32];
                let x = self.dyn_buf(dynamic[0])?;
                self.pending.insert(y, Pending::Quant(x, n, q));
            }
            // A bias Add or a Relu on what a float layer just wrote, read by nothing else: that
            // layer's epilogue (one generated step fewer, and an int4 layer after it quantizes the
            // values as it reads them).
            Op::Unary(sqil_ir::ops::UnaryOp::Relu) if dynamic.len() == 1 && self.fold_into_last(dynamic[0], None) => {
                self.slot_buf[y] = self.slot_buf[dynamic[0]];
                // The layer's buffer holds y now: nothing reads x's values.
                self.reads[dynamic[0]] = 0;
            }
            Op::Binary(BinaryOp::Add)
                if dynamic.len() == 1
                    && inputs.len() == 2
                    && self.val(dynamic[0])?.shape == yt.shape
                    && self
                        .fold_into_last(dynamic[0], inputs.iter().flatten().find(|&&s| self.is_const[s]).copied()) =>
            {
                self.slot_buf[y] = self.slot_buf[dynamic[0]];
                self.reads[dynamic[0]] = 0;
            }
            // Element-wise steps: deferred and chained into one generated kernel.
            _ if self.elementwise(op, inputs, y, &yt)? => {}
            _ => self.generic(op, inputs, outputs, &yt)?,
        }
        Ok(())
    }
}

fn binary_code(b: BinaryOp) -> i32 {
    match b {
        BinaryOp::Add => 0,
        BinaryOp::Sub => 1,
        BinaryOp::Mul => 2,
        _ => 3,
    }
}

/// Arguments of a layer's levels epilogue (`no_levels_out`), the last of a kernel's that has one.
const LEVELS_ARGS: usize = 5;

/// Where `sqil_linear_f32w` and `sqil_q4_int` take their outputs per warp (`opw`): just before
/// their levels epilogue.
fn opw_at(args: &[KArg<HostArr>]) -> usize {
    args.len() - LEVELS_ARGS - 1
}

/// Two outputs per warp for `sqil_linear_f32w` and `sqil_q4_int` layers of 129 to 256 outputs
/// (17 to 32 blocks of 256 threads, then 16 or fewer), four for `sqil_q4_int` layers of up to 512
/// (`sqil_q4_int_four`: a 512-wide hidden layer), and a thread per output for
/// `sqil_linear_f32w` layers of more outputs over at most [`THREAD_FORM_MAX_K`] terms (a first
/// layer from a short observation to a wide hidden layer: 7 -> 300 took 38 blocks), where that lets
/// the policy's persistent program fit one thread-block cluster of 16 (whose hardware barrier
/// costs a third of the grid barrier): every step then at most 16 blocks. Elsewhere (some step
/// needs more blocks all the same) pairs only lengthen the chains (the pick-place transformer
/// measured 2.6 us slower). The two outputs' sums are interleaved over the same loaded inputs in
/// the int kernel's lanes-per-group form (fewer than 32 groups); its group-per-lane form sums them
/// one after the other, a longer step, taken last; pairs are in one row (one row, or an even row
/// length). A thread per output runs the same chain alone.
fn fit_cluster(steps: &mut [HStep]) {
    // Per step, its outputs per warp (0: a thread per output) and threads where it changes.
    let fitted: Vec<Option<(i32, usize)>> = steps
        .iter()
        .map(|LStep::Kernel { name, args, .. }| {
            // (rows, k, n, groups): sqil_linear_f32w (x, w, bias, y, rows, k, n, ...), sqil_q4_int
            // (wq, scales, bias, x, y, rows, n, k, group, groups, ...).
            let at = |i: usize| match args[i] {
                KArg::I32(v) => v as usize,
                _ => 0,
            };
            let f32w = base_kernel(name) == "sqil_linear_f32w";
            let (rows, k, n, groups) = match base_kernel(name) {
                "sqil_linear_f32w" => (at(4), at(5), at(6), 1),
                "sqil_q4_int" => (at(5), at(7), at(6), at(9)),
                _ => return None,
            };
            let warps = rows * n;
            if warps <= 16 * 8 {
                return None;
            }
            let form = groups < 32;
            // `per` outputs per warp fit 16 blocks (four only in the int kernel).
            let fits = |per: usize| (rows == 1 || n.is_multiple_of(per)) && warps.div_ceil(per) <= 16 * 8;
            let per = |per: usize| Some((per as i32, warps.div_ceil(per) * 32));
            if fits(2) && form {
                per(2)
            } else if f32w && k <= THREAD_FORM_MAX_K && warps <= 16 * 256 {
                Some((0, warps))
            } else if !f32w && fits(4) && form {
                per(4)
            } else if fits(2) {
                // The sums one after the other (a longer step), where that completes the cluster.
                per(2)
            } else if !f32w && fits(4) {
                per(4)
            } else {
                None
            }
        })
        .collect();
    let most =
        steps.iter().zip(&fitted).map(|(LStep::Kernel { threads, .. }, f)| f.map_or(*threads, |f| f.1).div_ceil(256));
    if most.max().unwrap_or(0) > 16 {
        return;
    }
    for (LStep::Kernel { args, threads, .. }, f) in steps.iter_mut().zip(fitted) {
        if let Some((opw, t)) = f {
            *threads = t;
            let at = opw_at(args);
            args[at] = KArg::I32(opw);
        }
    }
}

/// Most terms of a `sqil_linear_f32w` layer that `fit_cluster` runs a thread per output: one
/// warp's batch of terms, whose chain a warp per output runs through shuffles on every lane.
pub const THREAD_FORM_MAX_K: usize = 32;

/// Where `sqil_linear_f32w` and `sqil_linear_f32w_tile` take their Relu flag.
const F32W_RELU: usize = 11;

/// A layer's levels epilogue, off: (levels buffer, scale, zero, lo, hi) for `sqil_put`
/// (`Lowerer::levels_from_last` sets them).
fn no_levels_out() -> [KArg<HostArr>; LEVELS_ARGS] {
    [KArg::Null, KArg::F32(0.0), KArg::F32(0.0), KArg::F32(0.0), KArg::F32(0.0)]
}

/// The kernel a lowered step launches.
fn step_kernel<A>(s: &LStep<A>) -> &str {
    match s {
        LStep::Kernel { name, .. } => name,
    }
}

impl<'a> Lowerer<'a> {
    fn ival(&self, inputs: &[Option<usize>], j: usize) -> Result<&'a Tensor> {
        let env: &'a [Option<Tensor>] = self.env;
        inputs
            .get(j)
            .copied()
            .flatten()
            .and_then(|s| env[s].as_ref())
            .ok_or_else(|| self.err(&format!("input {j} missing")))
    }

    /// A layer's bias (input 2) as a constant array argument, null when absent; a computed bias
    /// is refused.
    fn const_bias(&self, inputs: &[Option<usize>]) -> Result<KArg<HostArr>> {
        match self.iconst(inputs, 2) {
            Some(b) => Ok(f32_arr(b.data.to_f32_vec())),
            None if inputs.get(2).copied().flatten().is_some() => Err(self.err("computed bias")),
            None => Ok(KArg::Null),
        }
    }

    fn iconst(&self, inputs: &[Option<usize>], j: usize) -> Option<&'a Tensor> {
        let env: &'a [Option<Tensor>] = self.env;
        inputs.get(j).copied().flatten().filter(|&s| self.is_const[s]).and_then(|s| env[s].as_ref())
    }

    /// A warp-per-output layer (`sqil_linear_f32w`, `sqil_q4_int`) over `outputs` outputs: one
    /// output per warp (`fit_cluster` may pair them once every step is known), no levels
    /// epilogue (`levels_from_last` may set it).
    fn push_warp_layer(&mut self, name: &str, mut args: Vec<KArg<HostArr>>, outputs: usize) {
        args.push(int(1));
        args.extend(no_levels_out());
        self.steps.push(kernel(name, outputs * 32, args));
    }

    /// How many plan reads see the values in buffer `b`: those of every slot it holds (a
    /// reshape's output aliases its input's buffer).
    fn value_reads(&self, b: usize) -> usize {
        (0..self.slot_buf.len()).filter(|&s| self.slot_buf[s] == b).map(|s| self.reads[s]).sum()
    }

    /// Whether the chain `e` (writing `y`, and with `levels` their levels too) now runs as the
    /// epilogue of the last step: a warp-per-output layer (`sqil_linear_f32w`, `sqil_q4_int`)
    /// without one, that wrote the chain's one operand, which nothing else reads. That layer then
    /// writes the chain's values into `y` (and their levels) and is named
    /// `<layer>__e<hash>` (`SQIL_F32W_EPI`, `SQIL_Q4_INT_EPI`): one step and one round trip of the
    /// values through L2 fewer, the same bits (the chain's arithmetic on the same f32 values).
    fn chain_into_last(&mut self, e: &Expr, y: usize, levels: Option<(usize, [f32; 4])>) -> bool {
        let Some((epi, src)) = e.render_epilogue() else { return false };
        let [EArg::Buf(b)] = e.args[..] else { return false };
        let Some(LStep::Kernel { name, args, .. }) = self.steps.last() else { return false };
        let (y_at, mac) = match name.as_str() {
            "sqil_linear_f32w" => (3, "SQIL_F32W_EPI"),
            "sqil_q4_int" => (4, "SQIL_Q4_INT_EPI"),
            _ => return false,
        };
        let lv_at = args.len() - LEVELS_ARGS;
        // Every read of the values in b is the chain's.
        let taken = e.reads.iter().filter(|(x, _)| *x == b).count();
        if !matches!(args[y_at], KArg::Buf(o) if o == b)
            || !matches!(args[lv_at], KArg::Null)
            || self.value_reads(b) != taken
        {
            return false;
        }
        let kname = format!("{name}__e{}", &epi["sqil_epi_".len()..]);
        if !self.sources.iter().any(|(k, _)| *k == kname) {
            self.sources.push((kname.clone(), format!("{src}{mac}({kname}, {epi})\n")));
        }
        let LStep::Kernel { name, args, .. } = self.steps.last_mut().expect("checked above");
        *name = kname;
        args[y_at] = KArg::Buf(y);
        if let Some((lb, [scale, z, lo, hi])) = levels {
            args[lv_at] = KArg::Buf(lb);
            args[lv_at + 1..].clone_from_slice(&[scale, z, lo, hi].map(KArg::F32));
        }
        true
    }

    /// The levels of buffer `xb` (`xlen` values) with the quantizer (`scale`, zero, lo, hi) from
    /// the last step, where that step is a layer with a levels epilogue (`sqil_conv2d_f32`,
    /// `sqil_q4_conv_int` unsplit, `sqil_q4_conv_finish`, `sqil_linear_f32w`, `sqil_q4_int`) that
    /// wrote `xb` and no levels yet: it now
    /// writes them beside the values (the same `sqil_level` of each value `sqil_levels` would
    /// compute), into a fresh buffer, returned.
    fn levels_from_last(&mut self, xb: usize, xlen: usize, scale: f32, q: &[KArg<HostArr>; 3]) -> Option<usize> {
        let LStep::Kernel { name, args, .. } = self.steps.last()?;
        let y_at = match base_kernel(name) {
            "sqil_conv2d_f32" | "sqil_q4_conv_int" | "sqil_q4_int" => 4,
            "sqil_q4_conv_finish" | "sqil_linear_f32w" => 3,
            _ => return None,
        };
        // A split convolution's first step writes group products, not the values.
        let split = name == "sqil_q4_conv_int" && !matches!(args.get(args.len() - 8), Some(KArg::I32(0)));
        let lv_at = args.len().checked_sub(LEVELS_ARGS)?;
        if split || !matches!(args.get(y_at), Some(KArg::Buf(b)) if *b == xb) || !matches!(args[lv_at], KArg::Null) {
            return None;
        }
        let lb = self.new_buf(xlen);
        let LStep::Kernel { args, .. } = self.steps.last_mut()?;
        args[lv_at] = KArg::Buf(lb);
        args[lv_at + 1] = KArg::F32(scale);
        args[lv_at + 2..].clone_from_slice(q);
        Some(lb)
    }

    /// Whether computed value `x`, read by one step only (this one), is what the last step, a
    /// float layer (`sqil_linear_f32w`, `_tile`) without a Relu, wrote to its buffer; if so, that
    /// step now applies this step to its outputs: with `bias` (the constant slot of a bias Add,
    /// one value per output column, where the layer has none) the bias, which it adds as a Gemm's
    /// (`fl(s + b)`, the Add's bits), else the Relu (its last argument).
    fn fold_into_last(&mut self, x: usize, bias: Option<usize>) -> bool {
        if self.pending.contains_key(&x) || self.slot_buf[x] == usize::MAX {
            return false;
        }
        let b = self.slot_buf[x];
        // This step's read the only one of the buffer's values (a reshape of x, or x of a
        // reshape, read elsewhere too would see the folded values).
        if self.reads[x] != 1 || self.value_reads(b) != 1 {
            return false;
        }
        let env: &'a [Option<Tensor>] = self.env;
        let Some(LStep::Kernel { name, args, .. }) = self.steps.last_mut() else { return false };
        // Both kernels take the Relu flag at 11; sqil_linear_f32w's levels epilogue ends its
        // arguments, and a layer writing levels already writes them of what it computes now.
        if !matches!(name.as_str(), "sqil_linear_f32w" | "sqil_linear_f32w_tile")
            || !matches!(args.get(3), Some(KArg::Buf(o)) if *o == b)
            || !matches!(args.get(F32W_RELU), Some(KArg::I32(0)))
            || (name == "sqil_linear_f32w" && matches!(args.get(args.len() - LEVELS_ARGS), Some(KArg::Buf(_))))
        {
            return false;
        }
        match bias {
            None => {
                args[F32W_RELU] = KArg::I32(1);
                true
            }
            Some(c) => {
                let Some(t) = env[c].as_ref() else { return false };
                let n = match args.get(6) {
                    Some(KArg::I32(n)) => *n as usize,
                    _ => return false,
                };
                // One value per column: shape [n], [1, n], [1, 1, n], ...
                let per_column = t.shape.last() == Some(&n) && t.len() == n;
                if !per_column || !matches!(args[2], KArg::Null) {
                    return false;
                }
                args[2] = f32_arr(t.data.to_f32_vec());
                true
            }
        }
    }

    /// Defers an element-wise step as (part of) a fused chain; whether it could: operands are
    /// computed values of the output's shape (deferred chains merged, buffers read, an input not
    /// yet cast read in fp32) and constants (scalars as literals, arrays at the output's shape).
    fn elementwise(&mut self, op: &Op, inputs: &[Option<usize>], y: usize, yt: &Tensor) -> Result<bool> {
        let scalar = |l: &Self, j: usize| -> Option<Option<f32>> {
            match inputs.get(j).copied().flatten() {
                None => Some(None),
                Some(_) => l.iconst(inputs, j).filter(|t| t.len() == 1).map(|t| Some(t.data.to_f32_vec()[0])),
            }
        };
        let arity = match op {
            Op::Binary(b) if *b != BinaryOp::Pow => 2,
            Op::PRelu => 2,
            Op::Unary(_) | Op::LeakyRelu { .. } | Op::Elu { .. } | Op::Gelu { .. } => 1,
            Op::Clip if scalar(self, 1).is_some() && scalar(self, 2).is_some() => 1,
            Op::FakeQuant { .. } if scalar(self, 1).flatten().is_some() && scalar(self, 2).is_some() => 1,
            // A QDQ model's per-tensor QuantizeLinear / DequantizeLinear: the integers travel as
            // exact fp16 values (at most 16 bits) between them.
            Op::QuantizeLinear { .. } | Op::DequantizeLinear { .. }
                if scalar(self, 1).flatten().is_some() && scalar(self, 2).is_some() =>
            {
                1
            }
            Op::BatchNorm { epsilon, training: false, .. } if inputs.len() == 5 && yt.rank() >= 2 => {
                // Inference: one multiply-add per element with per-channel factors (computed here
                // in double, as the IR does), expanded to the output's shape.
                let chans = yt.shape[1];
                let mut per = vec![];
                for j in 1..5 {
                    match self.iconst(inputs, j) {
                        Some(t) if t.len() == chans => per.push(t.data.to_f64_vec()),
                        _ => return Ok(false),
                    }
                }
                let x = inputs[0].expect("checked");
                if self.is_const[x] || self.val(x)?.shape != yt.shape {
                    return Ok(false);
                }
                let inner = yt.len() / (yt.shape[0] * chans).max(1);
                let k: Vec<f64> = per[0].iter().zip(&per[3]).map(|(s, v)| s / (v + *epsilon as f64).sqrt()).collect();
                let a: Vec<f32> = (0..yt.len()).map(|i| k[(i / inner) % chans] as f32).collect();
                let b: Vec<f32> = (0..yt.len())
                    .map(|i| {
                        let c = (i / inner) % chans;
                        (per[1][c] - per[2][c] * k[c]) as f32
                    })
                    .collect();
                let mut e = Expr::default();
                let v = self.operand_expr(&mut e, x)?;
                let (ka, kb) = (e.arg(EArg::Const(a)), e.arg(EArg::Const(b)));
                let t = format!("t{}", self.next_t);
                self.next_t += 1;
                e.stmts.push(format!("float {t} = {v} * {ka} + {kb};"));
                e.result = t;
                self.pending.insert(y, Pending::Expr(e));
                return Ok(true);
            }
            _ => return Ok(false),
        };
        let mut computed = 0;
        for j in 0..arity {
            let Some(s) = inputs.get(j).copied().flatten() else { return Ok(false) };
            if !self.is_const[s] {
                computed += 1;
                if self.val(s)?.shape != yt.shape {
                    return Ok(false);
                }
            }
        }
        let dtype_ok = match op {
            Op::DequantizeLinear { .. } => true,
            _ => self.val(inputs[0].expect("checked"))?.dtype() == sqil_ir::DType::F32,
        };
        if computed == 0 || !dtype_ok {
            return Ok(false);
        }
        let mut e = Expr::default();
        let mut v: Vec<String> = vec![];
        for s in inputs.iter().take(arity) {
            let s = s.expect("checked");
            if self.is_const[s] {
                let t = self.val(s)?;
                let c = t.data.to_f32_vec();
                if t.len() == 1 {
                    v.push(cu_float(c[0]));
                } else {
                    let full = sqil_ir::ops::broadcast_indices(&t.shape, &yt.shape).into_iter().map(|i| c[i]).collect();
                    v.push(e.arg(EArg::Const(full)));
                }
            } else {
                v.push(self.operand_expr(&mut e, s)?);
            }
        }
        let t = format!("t{}", self.next_t);
        self.next_t += 1;
        let a = &v[0];
        let f = |x: f32| cu_float(x);
        let stmt = match op {
            Op::Binary(b) => {
                // Rounded intrinsics: never contracted into an fma, each op the CPU's f32 result.
                let f = match b {
                    BinaryOp::Add => "__fadd_rn",
                    BinaryOp::Sub => "__fsub_rn",
                    BinaryOp::Mul => "__fmul_rn",
                    BinaryOp::Div => "__fdiv_rn",
                    // Not an element-wise statement here (the chain's arity check keeps it out).
                    BinaryOp::Pow => return Ok(false),
                };
                format!("float {t} = {f}({a}, {});", v[1])
            }
            // In double and rounded once, as the interpreter evaluates them (a product of two
            // floats is exact in double).
            Op::PRelu => format!("float {t} = {a} < 0.0f ? __fmul_rn({a}, {}) : {a};", v[1]),
            Op::Unary(u) => format!("float {t} = {};", u.def().cuda_expr(a)),
            Op::LeakyRelu { alpha } => format!("float {t} = {a} < 0.0f ? (float)({} * (double){a}) : {a};", dl(*alpha)),
            Op::Elu { alpha } => {
                format!("float {t} = (float)sqil_elu((double){a}, {});", dl(*alpha))
            }
            Op::Gelu { tanh: false } => {
                format!("float {t} = (float)(0.5 * (double){a} * (1.0 + erf((double){a} / 1.4142135623730951)));")
            }
            Op::Gelu { tanh: true } => format!(
                "float {t} = (float)(0.5 * (double){a} * (1.0 + tanh(0.7978845608028654 * ((double){a} + 0.044715 * \
                 (double){a} * (double){a} * (double){a}))));"
            ),
            Op::Clip => {
                let (lo, hi) = (scalar(self, 1).flatten(), scalar(self, 2).flatten());
                let mut r = a.clone();
                if let Some(lo) = lo {
                    r = format!("({r} < {0} ? {0} : {r})", f(lo));
                }
                if let Some(hi) = hi {
                    r = format!("({r} > {0} ? {0} : {r})", f(hi));
                }
                format!("float {t} = {r};")
            }
            Op::FakeQuant { bits, signed, .. } => {
                let sc = scalar(self, 1).flatten().expect("checked");
                let z = scalar(self, 2).flatten().unwrap_or(0.0);
                let (lo, hi) = sqil_ir::ops::quant::fake_quant_range(*bits, *signed);
                e.stmts.push(fake_quant_stmts(&t, a, [sc, z, lo as f32, hi as f32]).0);
                fake_quant_stmts(&t, a, [sc, z, lo as f32, hi as f32]).1
            }
            Op::QuantizeLinear { .. } => {
                // The integer range of the output type (the zero point's, else the declared one).
                let (lo, hi): (f32, f32) = match yt.dtype() {
                    sqil_ir::DType::I8 => (-128.0, 127.0),
                    sqil_ir::DType::U8 => (0.0, 255.0),
                    sqil_ir::DType::I4 => (-8.0, 7.0),
                    sqil_ir::DType::U4 => (0.0, 15.0),
                    _ => return Ok(false),
                };
                let (sc, z) = (scalar(self, 1).flatten().expect("checked"), scalar(self, 2).flatten().unwrap_or(0.0));
                e.stmts.push(format!("float {t}_q = rintf({a} / {}) + {};", f(sc), f(z)));
                format!("float {t} = {t}_q < {0} ? {0} : ({t}_q > {1} ? {1} : {t}_q);", f(lo), f(hi))
            }
            Op::DequantizeLinear { .. } => {
                let (sc, z) = (scalar(self, 1).flatten().expect("checked"), scalar(self, 2).flatten().unwrap_or(0.0));
                format!("float {t} = ({a} - {}) * {};", f(z), f(sc))
            }
            _ => return Ok(false),
        };
        e.stmts.push(stmt);
        e.result = t;
        self.pending.insert(y, Pending::Expr(e));
        Ok(true)
    }

    /// Ops beyond the MLP subset, each as generic kernel steps of `policy_ops.cu`.
    fn generic(&mut self, op: &Op, inputs: &[Option<usize>], outputs: &[usize], yt: &Tensor) -> Result<()> {
        // Input 0 of a float layer may stay a deferred activation quantizer: the kernel applies
        // it as it reads (not a convolution's: it reads each input once per tap and channel).
        let fused_in = matches!(op, Op::Gemm { .. }) || (matches!(op, Op::MatMul) && self.iconst(inputs, 1).is_some());
        // Row-wise normalizations read input 0 once, where it is too.
        let rows_in = matches!(op, Op::LayerNorm { .. } | Op::Softmax { .. });
        let mut quant = [0.0f32; 4];
        let mut xb: Vec<Option<usize>> = vec![None; inputs.len()];
        // A float layer reading the policy's input: from the device copy of the observation
        // itself (offset), not from a buffer a copy step would fill first.
        let mut x_in: Option<usize> = None;
        for (j, s) in inputs.iter().enumerate() {
            let Some(s) = s.filter(|&s| !self.is_const[s]) else { continue };
            if j == 0 && (fused_in || rows_in) {
                if let Some(Pending::Quant(x, _, q)) = self.pending.get(&s).cloned().filter(|_| fused_in) {
                    xb[0] = Some(x);
                    quant = q;
                    continue;
                }
                if let Some(i) = self.input_of(s).filter(|_| !self.pending.contains_key(&s)) {
                    x_in = Some(self.in_offs[i]);
                    continue;
                }
            }
            xb[j] = Some(self.dyn_buf(s)?);
        }
        let yb = outputs.iter().map(|&o| self.out_buf(o)).collect::<Result<Vec<usize>>>()?;
        let [qs, qz, qlo, qhi] = quant;
        let qargs = [KArg::F32(qs), KArg::F32(qz), KArg::F32(qlo), KArg::F32(qhi)];
        let n = yt.len();
        let x0 = || xb.first().copied().flatten().ok_or_else(|| self.err("the first input must be computed"));
        // An operand: a buffer, or a constant array (fp32), with a broadcast index table unless it
        // has the output's shape.
        let operand = |j: usize| -> Result<[KArg<HostArr>; 3]> {
            let t = self.ival(inputs, j)?;
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
            Op::Binary(b) if *b != BinaryOp::Pow => {
                let code = binary_code(*b);
                let mut args: Vec<KArg<HostArr>> = operand(0)?.into_iter().chain(operand(1)?).collect();
                args.extend([KArg::Buf(yb[0]), int(n), KArg::I32(code)]);
                self.steps.push(kernel("sqil_binary_bcast", n, args));
            }
            Op::PRelu => {
                let mut args: Vec<KArg<HostArr>> = operand(0)?.into_iter().chain(operand(1)?).collect();
                args.extend([KArg::Buf(yb[0]), int(n), KArg::I32(4)]);
                self.steps.push(kernel("sqil_binary_bcast", n, args));
            }
            // Per-tensor quantizers with constant scales were lowered as element-wise steps.
            Op::FakeQuant { .. } => return Err(self.err("only per-tensor activation quantizers with constant scales")),
            Op::Softmax { axis, .. } | Op::LayerNorm { axis, .. } => {
                let rank = yt.rank() as i64;
                if !(*axis == -1 || *axis == rank - 1) {
                    return Err(self.err("only over the last axis"));
                }
                let dim = *yt.shape.last().unwrap_or(&1);
                let rows = n / dim.max(1);
                let x = match x_in {
                    Some(o) => KArg::In(o),
                    None => KArg::Buf(x0()?),
                };
                let y = yb[0];
                if let Op::LayerNorm { epsilon, .. } = op {
                    if outputs.len() > 1 {
                        return Err(self.err("mean / inverse std outputs"));
                    }
                    let bcast = |t: &Tensor| -> Vec<f32> {
                        let v = t.data.to_f32_vec();
                        sqil_ir::ops::broadcast_indices(&t.shape, &[dim]).into_iter().map(|i| v[i]).collect()
                    };
                    let scale = self.iconst(inputs, 1).ok_or_else(|| self.err("computed scale"))?;
                    let bias = match self.iconst(inputs, 2) {
                        Some(b) => f32_arr(bcast(b)),
                        None if inputs.get(2).copied().flatten().is_some() => return Err(self.err("computed bias")),
                        None => KArg::Null,
                    };
                    let args =
                        vec![x, KArg::Buf(y), f32_arr(bcast(scale)), bias, int(rows), int(dim), KArg::F32(*epsilon)];
                    self.steps.push(kernel("sqil_layernorm_rows", rows * 32, args));
                } else {
                    // The exponentials in double, kept for the division: rows x dim doubles.
                    let scratch = self.new_buf(2 * n);
                    let args = vec![x, KArg::Buf(y), KArg::Buf(scratch), int(rows), int(dim)];
                    if dim > 512 {
                        // Long rows (a spatial softmax): a block per row.
                        self.steps.push(kernel("sqil_softmax_rows_block", rows * 256, args));
                    } else {
                        self.steps.push(kernel("sqil_softmax_rows", rows * 32, args));
                    }
                }
            }
            Op::MatMul if self.iconst(inputs, 1).is_none() => {
                let (a, b) = (self.ival(inputs, 0)?, self.ival(inputs, 1)?);
                let (Some(ab), Some(bb)) = (xb[0], xb[1]) else { return Err(self.err("a constant left operand")) };
                if a.rank() < 2 || b.rank() < 2 {
                    return Err(self.err("a computed vector operand"));
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
                self.steps.push(kernel("sqil_bmm", n, args));
            }
            Op::Gemm { .. } | Op::MatMul => {
                let (trans_b, bias, alpha, beta) = match op {
                    Op::Gemm { alpha, beta, trans_a: false, trans_b } => {
                        (*trans_b, self.iconst(inputs, 2), *alpha, *beta)
                    }
                    Op::Gemm { .. } => return Err(self.err("transposed A")),
                    _ => (false, None, 1.0, 1.0),
                };
                let w = self.iconst(inputs, 1).ok_or_else(|| self.err("computed weight"))?;
                if w.rank() != 2 {
                    return Err(self.err("weight of rank other than 2"));
                }
                if bias.is_none() && inputs.get(2).copied().flatten().is_some() {
                    return Err(self.err("computed bias"));
                }
                let (k, nn, wk, bb) = sqil_ir::ops::dense_weight_kn(w, trans_b, alpha, bias, beta);
                let b = bb.map_or(KArg::Null, f32_arr);
                let rows = n / nn.max(1);
                let x = match x_in {
                    Some(o) => KArg::In(o),
                    None => KArg::Buf(x0()?),
                };
                let mut args = vec![x, f32_arr(wk), b, KArg::Buf(yb[0]), int(rows), int(k), int(nn)];
                args.extend(qargs);
                // No Relu (a Relu after it that reads nothing else sets this: `fold_into_last`).
                args.push(KArg::I32(0));
                if rows >= F32_TILE_ROWS {
                    // Many rows (tokens): tiles of 16 x 32 outputs, a thread per output.
                    let blocks = rows.div_ceil(16) * nn.div_ceil(32);
                    self.steps.push(kernel("sqil_linear_f32w_tile", blocks * 256, args));
                } else {
                    self.push_warp_layer("sqil_linear_f32w", args, n);
                }
            }
            Op::Conv(c) => {
                let xt = self.ival(inputs, 0)?;
                let w = self.iconst(inputs, 1).ok_or_else(|| self.err("computed weight"))?;
                if !(3..=4).contains(&xt.rank()) || xt.shape[0] != 1 {
                    return Err(self.err("convolutions other than 1-D or 2-D on one image"));
                }
                let geo = geo_2d(c.input_geometry(&xt.shape, &w.shape).map_err(|e| e.to_string())?);
                let mut items = geo_items(xt.shape[1], &geo);
                items.push(c.group as i32);
                let bias = self.const_bias(inputs)?;
                let mut args = vec![
                    KArg::Buf(x0()?),
                    KArg::Arr(HostArr::I32(items)),
                    f32_arr(w.data.to_f32_vec()),
                    bias,
                    KArg::Buf(yb[0]),
                    int(w.shape[0]),
                ];
                args.extend(no_levels_out());
                self.steps.push(kernel("sqil_conv2d_f32", n, args));
            }
            Op::MaxPool(p) | Op::AveragePool(p) if outputs.len() == 1 => {
                let xt = self.ival(inputs, 0)?;
                if !(3..=4).contains(&xt.rank()) {
                    return Err(self.err("pooling other than 1-D or 2-D"));
                }
                let (geo, counts) = p.windows(&xt.shape[2..]).map_err(|e| e.to_string())?;
                let geo = geo_2d(geo);
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
                self.steps.push(kernel("sqil_pool2d", n, args));
            }
            Op::ConvTranspose(c) => {
                let xt = self.ival(inputs, 0)?;
                let w = self.iconst(inputs, 1).ok_or_else(|| self.err("computed weight"))?;
                if !(3..=4).contains(&xt.rank()) || xt.shape[0] != 1 {
                    return Err(self.err("transposed convolutions other than 1-D or 2-D on one image"));
                }
                let geo = c.transpose_geometry(&xt.shape, &w.shape).map_err(|e| e.to_string())?;
                // The interpreter's col2im table, (tap, input position) -> output position,
                // inverted: per output position and tap, the input position or -1.
                let (kl, il, ol) = (geo.kernel_len(), geo.output_len(), geo.input_len());
                let mut inv = vec![-1i32; ol * kl];
                for (r, taps) in geo.gather_table().chunks_exact(il.max(1)).enumerate() {
                    for (j, t) in taps.iter().enumerate() {
                        if let Some(t) = t {
                            inv[t * kl + r] = j as i32;
                        }
                    }
                }
                let (group, c_in) = (c.group as usize, xt.shape[1]);
                let (cg, mg) = (c_in / group.max(1), w.shape[1]);
                let bias = self.const_bias(inputs)?;
                let args = vec![
                    KArg::Buf(x0()?),
                    KArg::Arr(HostArr::I32(inv)),
                    f32_arr(w.data.to_f32_vec()),
                    bias,
                    KArg::Buf(yb[0]),
                    int(mg * group),
                    int(cg),
                    int(mg),
                    int(kl),
                    int(il),
                    int(ol),
                ];
                self.steps.push(kernel("sqil_conv_transpose_f32", n, args));
            }
            Op::Reduce { op: r, noop_with_empty_axes, .. } => {
                let xt = self.ival(inputs, 0)?;
                let axes = match inputs.get(1).copied().flatten() {
                    None => None,
                    Some(_) => Some(self.iconst(inputs, 1).ok_or_else(|| self.err("computed axes"))?.data.to_i64_vec()),
                };
                let tables =
                    sqil_ir::ops::reduce_tables(&xt.shape, axes, *noop_with_empty_axes).map_err(|e| e.to_string())?;
                let code = match (r, &tables) {
                    // Nothing reduced: a copy, which the max of one element is, bit for bit.
                    (_, None) | (sqil_ir::ops::ReduceOp::Max, _) => 2,
                    (sqil_ir::ops::ReduceOp::Mean, _) => 0,
                    (sqil_ir::ops::ReduceOp::Sum, _) => 1,
                };
                let (base, off) = tables.unwrap_or_else(|| ((0..xt.len()).collect(), vec![0]));
                if base.len() != n {
                    return Err(self.err("outputs and slots disagree"));
                }
                self.steps.push(reduce_step(x0()?, yb[0], &base, &off, code));
            }
            Op::GlobalAveragePool => {
                // The interpreter's plane means: each plane's f64 sum in order from where Rust's
                // `sum` starts (-0), divided, rounded once (`sqil_reduce_f64`, op 3).
                let inner = self.ival(inputs, 0)?.len() / n.max(1);
                let start: f64 = std::iter::empty::<f64>().sum();
                let code = if start.is_sign_negative() { 3 } else { 0 };
                let base: Vec<usize> = (0..n).map(|p| p * inner).collect();
                let off: Vec<usize> = (0..inner).collect();
                self.steps.push(reduce_step(x0()?, yb[0], &base, &off, code));
            }
            _ => return Err(self.err("op")),
        }
        Ok(())
    }
}

/// A `sqil_reduce_f64` step: output i of buffer `y` from buffer `x`'s elements `base[i] +
/// off[j]` in order (`code`: 0 mean, 1 sum, 2 max, 3 mean from -0).
fn reduce_step(x: usize, y: usize, base: &[usize], off: &[usize], code: i32) -> HStep {
    let n = base.len();
    let args = vec![KArg::Buf(x), i32_arr(base), i32_arr(off), KArg::Buf(y), int(n), int(off.len()), KArg::I32(code)];
    kernel("sqil_reduce_f64", n, args)
}

/// A 1-D window geometry as a 2-D one of a single row (the kernels' form); 2-D as it is.
fn geo_2d(mut g: sqil_kernels_cpu::ConvGeometry) -> sqil_kernels_cpu::ConvGeometry {
    if g.input.len() == 1 {
        g.input.insert(0, 1);
        g.kernel.insert(0, 1);
        g.strides.insert(0, 1);
        g.dilations.insert(0, 1);
        g.pads_begin.insert(0, 0);
        g.output.insert(0, 1);
    }
    g
}

/// A 2-D window geometry as the kernels take it (`ConvGeometry::kernel_params`).
fn geo_items(channels: usize, g: &sqil_kernels_cpu::ConvGeometry) -> Vec<i32> {
    g.kernel_params(channels).into_iter().map(|v| v as i32).collect()
}

/// An element-wise computation deferred so that a chain of element-wise steps runs as one
/// generated kernel: statements over `float` locals (`tN`, unique in the lowering), each reading
/// operands through `$k$` placeholders for `args[k]` at the thread's element `i`.
#[derive(Clone, Debug, Default)]
struct Expr {
    stmts: Vec<String>,
    result: String,
    args: Vec<EArg>,
    /// Also write the result's int8 levels (`sqil_level`: scale, zero, lo, hi) into a second
    /// buffer, for the int4 layer that reads them (one launch and one pass fewer than
    /// `sqil_levels` after the chain).
    levels: Option<[f32; 4]>,
    /// The plan's reads of buffers this chain took up: (buffer, read), each read numbered once
    /// (`Lowerer::operand_expr`), so a chain absorbed twice counts them once.
    reads: Vec<(usize, usize)>,
}

/// An operand of a fused element-wise kernel.
#[derive(Clone, Debug, PartialEq)]
enum EArg {
    /// An fp16 buffer.
    Buf(usize),
    /// The fp32 inputs at this offset (an observation read before any cast).
    In(usize),
    /// An fp32 constant of the output's length.
    Const(Vec<f32>),
}

/// The kernel `name` is a form of: a layer with a generated epilogue (`sqil_q4_int__e<hash>`) is
/// its layer's kernel.
pub fn base_kernel(name: &str) -> &str {
    name.split_once("__e").map_or(name, |(b, _)| b)
}

/// An f32 attribute as an exact double literal for generated CUDA.
fn dl(v: f32) -> String {
    format!("{:e}", v as f64)
}

/// A float literal for generated CUDA: exact, inf and NaN included.
pub(crate) fn cu_float(v: f32) -> String {
    if v.is_finite() {
        format!("{v:e}f")
    } else {
        format!("__int_as_float({:#010x})", v.to_bits())
    }
}

/// The statements of `t = fq(a)` (scale, zero, lo, hi), FakeQuant's rounding.
fn fake_quant_stmts(t: &str, a: &str, [s, z, lo, hi]: [f32; 4]) -> (String, String) {
    let (s, z, lo, hi) = (cu_float(s), cu_float(z), cu_float(lo), cu_float(hi));
    (
        format!("float {t}_q = rintf({a} / {s}) + {z};"),
        format!("float {t} = (({t}_q < {lo} ? {lo} : ({t}_q > {hi} ? {hi} : {t}_q)) - {z}) * {s};"),
    )
}

impl Expr {
    /// Ends the chain with `fq(a)` (scale, zero, lo, hi), a fresh local from `next_t`.
    fn fake_quant(&mut self, a: &str, q: [f32; 4], next_t: &mut usize) {
        let t = format!("t{next_t}");
        *next_t += 1;
        let (st_q, st) = fake_quant_stmts(&t, a, q);
        self.stmts.extend([st_q, st]);
        self.result = t;
    }

    /// Argument `a` (a buffer or input once), as a placeholder.
    fn arg(&mut self, a: EArg) -> String {
        let k = match self.args.iter().position(|b| *b == a && !matches!(a, EArg::Const(_))) {
            Some(k) => k,
            None => {
                self.args.push(a);
                self.args.len() - 1
            }
        };
        format!("${k}$")
    }

    /// `$k$` placeholders in `s` renumbered through `map`.
    fn renumber(s: &str, map: &[usize]) -> String {
        let mut out = String::with_capacity(s.len());
        let mut rest = s;
        while let Some(p) = rest.find('$') {
            out.push_str(&rest[..p]);
            let tail = &rest[p + 1..];
            let end = tail.find('$').expect("closed placeholder");
            let k: usize = tail[..end].parse().expect("placeholder index");
            out.push_str(&format!("${}$", map[k]));
            rest = &tail[end + 1..];
        }
        out.push_str(rest);
        out
    }

    /// `other`'s statements and arguments merged into `self`'s (shared buffers once, shared
    /// statements once); returns `other`'s result name.
    fn absorb(&mut self, other: Expr) -> String {
        let map: Vec<usize> = other
            .args
            .into_iter()
            .map(|a| match self.args.iter().position(|b| *b == a) {
                Some(k) => k,
                None => {
                    self.args.push(a);
                    self.args.len() - 1
                }
            })
            .collect();
        for r in other.reads {
            if !self.reads.contains(&r) {
                self.reads.push(r);
            }
        }
        for st in other.stmts {
            let st = Expr::renumber(&st, &map);
            if !self.stmts.contains(&st) {
                self.stmts.push(st);
            }
        }
        other.result
    }

    /// The chain as the epilogue of the layer that writes its one operand (`render` otherwise):
    /// `struct NAME { f(x0) }` returning the result, for `SQIL_F32W_EPI` / `SQIL_Q4_INT_EPI`.
    /// None where it reads more than that operand or writes levels (the layer's levels epilogue
    /// does).
    fn render_epilogue(&self) -> Option<(String, String)> {
        if self.args.len() != 1 || self.levels.is_some() {
            return None;
        }
        let (body, r) = self.body();
        let code = format!("{body}    return {r};\n").replace("$0$", "x0");
        let hash = sqil_ir::fnv1a(sqil_ir::FNV1A_START, code.as_bytes());
        let name = format!("sqil_epi_{hash:016x}");
        // Guarded: the same chain after two layers is one struct in the program's source.
        let guard = format!("SQIL_EPI_{hash:016X}");
        let src = format!(
            "\n// Generated by sqil: an element-wise chain as a layer's epilogue.\n#ifndef {guard}\n#define {guard}\n\
             struct {name} {{\n    __device__ static __forceinline__ float f(const float x0)\n    {{\n{}    }}\n}};\n#endif\n",
            code.lines().map(|l| format!("    {l}\n")).collect::<String>()
        );
        Some((name, src))
    }

    /// The statements, locals renamed in order of definition (so equal chains give equal text),
    /// and the result's expression; operands as `$k$`.
    fn body(&self) -> (String, String) {
        let mut names: Vec<String> = vec![];
        for st in &self.stmts {
            let name = st.trim_start_matches("float ").split([' ', '=']).next().unwrap_or("").to_string();
            names.push(name);
        }
        let rename = |s: &str| -> String {
            let mut out = s.to_string();
            // Longest names first, so t12 is not rewritten through t1.
            let mut order: Vec<usize> = (0..names.len()).collect();
            order.sort_by_key(|&i| std::cmp::Reverse(names[i].len()));
            for &i in &order {
                out = out.replace(&names[i], &format!("v#{i}#"));
            }
            out.replace('#', "")
        };
        let mut body = String::new();
        for st in &self.stmts {
            body.push_str("    ");
            body.push_str(&rename(st));
            body.push('\n');
        }
        (body, rename(&self.result))
    }

    /// The CUDA source of a kernel computing this expression into `y[i]`, `i < n`, named
    /// `sqil_ew_` and a hash of its body (the same chain lowered twice is one kernel).
    fn render(&self) -> (String, String) {
        let (mut body, r) = self.body();
        body.push_str(&format!("    y[i] = {r};\n"));
        if let Some([s, z, lo, hi]) = self.levels {
            // `sqil_level` (sqil_math.cuh, every source's prelude): the levels kernel's bits.
            let (s, z, lo, hi) = (cu_float(s), cu_float(z), cu_float(lo), cu_float(hi));
            body.push_str(&format!("    lv[i] = sqil_level({r}, {s}, {z}, {lo}, {hi});\n"));
        }
        let params: Vec<String> = (0..self.args.len()).map(|k| format!("const float *__restrict__ a{k}")).collect();
        let mut code = body;
        for k in 0..self.args.len() {
            code = code.replace(&format!("${k}$"), &format!("a{k}[i]"));
        }
        let outs = if self.levels.is_some() {
            "float *__restrict__ y, float *__restrict__ lv"
        } else {
            "float *__restrict__ y"
        };
        let sig = format!("{}, {outs}, int n)", params.join(", "));
        let hash = sqil_ir::fnv1a(sqil_ir::fnv1a(sqil_ir::FNV1A_START, code.as_bytes()), sig.as_bytes());
        // A chain writing levels too ends in `_lv` (its outputs are then its last three
        // arguments: y, lv, n).
        let name = format!("sqil_ew_{hash:016x}{}", if self.levels.is_some() { "_lv" } else { "" });
        let src = format!(
            "\n// Generated by sqil: a fused chain of element-wise steps.\nSQIL_KERNEL void {name}(SQIL_VARGS {sig}\n{{\n    \
             const int i = SQIL_BX * SQIL_BDIM + SQIL_TX;\n    if (i >= n) {{\n        return;\n    }}\n{code}}}\n"
        );
        (name, src)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(t0: usize, buf: usize) -> Expr {
        // erf-GELU over one buffer, with locals numbered from t0.
        let mut e = Expr::default();
        let x = e.arg(EArg::Buf(buf));
        e.stmts.push(format!("float t{t0} = {x} / 1.4142135e0f;"));
        e.stmts.push(format!("float t{} = erff(t{t0});", t0 + 1));
        e.stmts.push(format!("float t{} = {x} * t{};", t0 + 2, t0 + 1));
        e.result = format!("t{}", t0 + 2);
        e
    }

    #[test]
    fn equal_chains_render_to_one_kernel_and_merges_share_operands() {
        let (a, b) = (chain(3, 7), chain(40, 9));
        let ((na, sa), (nb, _)) = (a.render(), b.render());
        assert_eq!(na, nb, "locals are renamed in order of definition");
        assert!(sa.contains("float v1 = erff(v0);") && sa.contains("y[i] = v2;"), "{sa}");
        // A chain reading its own buffer again: the buffer is one argument, shared statements once.
        let mut m = chain(3, 7);
        let r = m.absorb(chain(3, 7));
        assert_eq!(r, "t5");
        assert_eq!((m.args.len(), m.stmts.len()), (1, 3));
        let mut m = chain(3, 7);
        m.absorb(chain(10, 8));
        assert_eq!(m.args, vec![EArg::Buf(7), EArg::Buf(8)]);
        assert!(m.stmts[3].contains("$1$"), "the second chain's operand renumbered: {:?}", m.stmts);
    }

    #[test]
    fn float_literals_are_exact() {
        assert_eq!(cu_float(0.5), "5e-1f");
        assert_eq!(cu_float(f32::INFINITY), "__int_as_float(0x7f800000)");
        let v = 0.1f32;
        assert_eq!(cu_float(v).trim_end_matches('f').parse::<f32>().unwrap(), v);
    }
}
