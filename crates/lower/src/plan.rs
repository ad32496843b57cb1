//! The CPU execution plan of a quantized policy: a static list of steps over numbered value
//! slots, built once from the FakeQuant simulation graph (the form `sqil quantize` and
//! `sqil compile` write).
//!
//! Layers whose weight is a FakeQuant of a constant at 2-4 bits (per channel, or in groups that
//! divide the reduction length) become [`Step::Q4Linear`]: packed int4 weights, and either an
//! int8/int4 activation quantizer folded into the step (W4A8, W4A4: integer GEMV) or float
//! activations (W4A16: weight-only GEMV), with the bias and a following ReLU fused into the
//! epilogue. The FakeQuant nodes they absorb disappear. Every other node runs as a
//! [`Step::Op`] with the reference semantics of the IR op.
//!
//! Agreement with the simulation: the integer kernels sum exactly where the simulation sums
//! dequantized f32 products, so outputs differ by f32 summation error ([`PLAN_TOL`] names the
//! budget the tests hold every policy to).

use sqil_ir::lowered::conv::{float_conv_table, Im2col};
use sqil_ir::lowered::{has_int_activations, linear_site, q4_layer, Q4Layer};
use sqil_ir::ops::fused::Arg;
use sqil_ir::ops::{Op, UnaryOp};
use sqil_ir::{Dim, Graph, IrError, NodeId, Result, Tensor, ValueRef};
use sqil_kernels_cpu::dequant::DequantRows;
use sqil_kernels_cpu::generic::DepthwiseTaps;
use sqil_kernels_cpu::PackedQ4;
use std::collections::HashMap;

/// Largest |plan - simulation| on an action, relative to the largest |action| of the batch, that
/// the tests accept. Observed on every testdata policy and config: 1e-8 to 9e-7 (f32 summation
/// order: the kernels sum integers exactly, the simulation sums dequantized f32 products). A
/// requantized activation landing on the other side of a rounding boundary would exceed it by
/// one quantization step of that activation; that has not occurred on the test inputs, and a
/// test failure there would name the policy and config.
pub const PLAN_TOL: f32 = 1e-5;

/// Rows up to which a float Gemm with a [`DequantRows`] weight runs from its levels: one byte per
/// weight read instead of four, the weights rebuilt in registers; a larger batch reuses each
/// weight over its rows, and the f32 constant's GEMM is faster.
pub const DEQUANT_MAX_ROWS: usize = 4;

pub use sqil_ir::lowered::ActQuant;

pub use sqil_ir::lowered::conv::ConvTable;

#[derive(Clone, Debug)]
pub enum Step {
    /// A linear map on packed int4 weights: a GEMV (GEMM for a batch), or with `conv` a
    /// convolution lowered through int8 im2col (`sqil_ir::lowered::conv`; int8 activations
    /// only). Its arithmetic is `sqil_ir::lowered::run_q4_layer`, the simulation's.
    Q4Linear {
        name: String,
        /// The layer's output value name: the key of its packed weights in an artifact.
        layer: String,
        x: usize,
        y: usize,
        act: ActQuant,
        /// Boxed: the weights' derived layouts made on first use make it the largest field.
        w: Box<PackedQ4>,
        bias: Option<Vec<f32>>,
        relu: bool,
        conv: Option<Box<Im2col>>,
    },
    Op {
        node: NodeId,
        /// The node's name (for reports and errors).
        name: String,
        op: Op,
        inputs: Vec<Option<usize>>,
        outputs: Vec<usize>,
        /// A float Conv's im2col gather table, built once, and the per-image input shape
        /// (`[C, spatial...]`) it was built for.
        table: Option<Box<ConvTable>>,
        /// A float Gemm's low-bit constant weight as levels and scales (checked to reproduce
        /// the constant bit for bit), for the small batches that read it from memory every call
        /// ([`DEQUANT_MAX_ROWS`]).
        dequant: Option<Box<DequantRows>>,
        /// A depthwise Conv's constant weight laid out by tap for its kernel (see
        /// [`depthwise_taps`]).
        taps: Option<Box<DepthwiseTaps>>,
    },
}

impl Step {
    /// The slots this step writes.
    pub fn outputs_of(&self) -> &[usize] {
        match self {
            Step::Q4Linear { y, .. } => std::slice::from_ref(y),
            Step::Op { outputs, .. } => outputs,
        }
    }

    /// The slots this step reads.
    pub fn reads(&self) -> impl Iterator<Item = usize> + '_ {
        let (x, inputs): (Option<usize>, &[Option<usize>]) = match self {
            Step::Q4Linear { x, .. } => (Some(*x), &[]),
            Step::Op { inputs, .. } => (None, inputs),
        };
        x.into_iter().chain(inputs.iter().flatten().copied())
    }
}

/// A planned policy: slots for every live value, constants preloaded, steps in order.
#[derive(Clone, Debug)]
pub struct Plan {
    pub inputs: Vec<(String, usize)>,
    pub outputs: Vec<usize>,
    pub output_names: Vec<String>,
    pub consts: Vec<(usize, Tensor)>,
    pub slots: usize,
    pub steps: Vec<Step>,
    /// Per step, the fused kernel (index into `kernels`) it belongs to.
    pub step_kernel: Vec<Option<usize>>,
    /// The fused kernels of the graph, as the fusion pass chose them.
    pub kernels: Vec<Kernel>,
    /// Per slot, the last step that reads it (`usize::MAX`: kept to the end, as outputs are):
    /// a step's dead inputs are dropped after it, and a ReLU or Reshape takes over its input's
    /// buffer when the input dies there (no copy, no fresh pages).
    pub last_use: Vec<usize>,
    /// Whether a batch runs a few samples at a time through the whole plan (see [`per_sample`];
    /// the runtime's `SAMPLE_CHUNK` samples): a convolutional policy whose every value keeps the
    /// batch as its leading dimension and whose every op treats the leading index independently.
    /// A few images' activations then stay in the core's cache from layer to layer (a layer at a
    /// time, a batch of 64 images' outputs spill to memory between layers). The same kernels, so
    /// the same bits.
    pub per_sample: bool,
    /// Per step, whether it runs as planned or folds into a MatMul's strides ([`Fold`]).
    pub folds: Vec<Fold>,
}

/// How a step folds a Transpose into a MatMul (see [`transpose_folds`]): the runtime reads the
/// transposed value through strides instead of copying it (attention's head split, K^T, and the
/// heads put back together), with the same arithmetic, so the same bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fold {
    /// Runs as planned.
    No,
    /// A Transpose whose value one later MatMul alone reads (directly, or through more such
    /// Transposes): not materialized; the MatMul reads its input through strides.
    View,
    /// A MatMul whose value the next step alone reads, a Transpose that is not itself a
    /// [`Fold::View`]: it writes its product in that order, as that step's value.
    Transposed,
}

/// Per step of `steps`, its [`Fold`]: a Transpose of one input whose value is read once, by a
/// MatMul (or by a Transpose folded the same way), is a view where its source lives on unchanged
/// until that MatMul (the Transpose is the source's last reader, or the source is read after the
/// MatMul: no step between takes it over in place); a MatMul whose value the next step, a
/// Transpose, alone reads writes it transposed. Plan outputs are always materialized.
pub fn transpose_folds(steps: &[Step], last_use: &[usize], outputs: &[usize]) -> Vec<Fold> {
    let slots = last_use.len();
    let mut readers = vec![0usize; slots];
    let mut producer = vec![usize::MAX; slots];
    for (i, st) in steps.iter().enumerate() {
        st.reads().for_each(|s| readers[s] += 1);
        if let Step::Op { outputs, .. } = st {
            outputs.iter().for_each(|&o| producer[o] = i);
        }
    }
    let once = |s: usize| readers[s] == 1 && !outputs.contains(&s);
    // A Transpose step's source slot, where it is one.
    let transpose_of = |t: usize, s: usize| -> Option<usize> {
        match steps.get(t)? {
            Step::Op { op: Op::Transpose { .. }, inputs, outputs, .. } if outputs[..] == [s] && inputs.len() == 1 => {
                inputs[0]
            }
            _ => None,
        }
    };
    let mut folds = vec![Fold::No; steps.len()];
    for (j, st) in steps.iter().enumerate() {
        let Step::Op { op: Op::MatMul, inputs, outputs, .. } = st else { continue };
        if inputs.len() != 2 || outputs.len() != 1 {
            continue;
        }
        for x in inputs.iter().flatten() {
            // The chain of Transposes back from the MatMul's input, each value read once.
            let (mut s, mut chain) = (*x, vec![]);
            while let Some(src) = (s < slots && once(s)).then(|| transpose_of(producer[s], s)).flatten() {
                chain.push(producer[s]);
                s = src;
            }
            // s: the chain's source, read by the chain's first step (its last element).
            if let Some(&first) = chain.last() {
                if last_use[s] == first || last_use[s] > j {
                    chain.iter().for_each(|&t| folds[t] = Fold::View);
                }
            }
        }
    }
    for (j, st) in steps.iter().enumerate() {
        let Step::Op { op: Op::MatMul, inputs, outputs, .. } = st else { continue };
        if inputs.len() == 2 && outputs.len() == 1 && once(outputs[0]) && folds.get(j + 1) == Some(&Fold::No) {
            let next = steps[j + 1].outputs_of();
            if next.len() == 1 && transpose_of(j + 1, next[0]) == Some(outputs[0]) {
                folds[j] = Fold::Transposed;
            }
        }
    }
    folds
}

/// Whether graph `g`'s batch can run one sample at a time: it has a convolution, every input's
/// leading dimension is one symbol (the batch), every value a computed node produces has that
/// symbol as its leading dimension and nowhere else (those computed from constants alone aside),
/// and every op is on a list of ops that treat the leading index
/// independently when it is the batch (element-wise ops, convolutions, pools, row-wise linear
/// algebra, normalizations and reshuffles along other axes). Anything else (a Shape, a reduction,
/// an axis-0 softmax, an unknown leading dimension) keeps the whole batch together. Without a
/// convolution, the same holds for a policy whose every linear map (MatMul, Gemm) reads at least
/// [`TOKENS_MIN`] rows per sample (a transformer over a sequence of tokens: a batch of 64 at 50
/// tokens had spilled its activations to memory between steps); a policy with a linear map over
/// one row per sample (an MLP) keeps its batch together as one GEMM.
pub fn per_sample(g: &Graph) -> bool {
    let lead = |v: ValueRef| g.value(v).ty.shape.first().cloned();
    let Some(Some(sym @ Dim::Sym(_))) = g.inputs.first().map(|&i| lead(ValueRef { node: i, slot: 0 })) else {
        return false;
    };
    if !g.inputs.iter().all(|&i| lead(ValueRef { node: i, slot: 0 }).as_ref() == Some(&sym)) {
        return false;
    }
    let mut conv = false;
    // Linear maps over sequences of tokens per sample, and any over fewer rows than that.
    let (mut tokens, mut short) = (false, false);
    let mut linear = |n: NodeId| {
        let rows = g.inputs_of(n).first().copied().flatten().map(|x| {
            let s = &g.value(x).ty.shape;
            let mid = s.get(1..s.len().saturating_sub(1)).unwrap_or(&[]);
            mid.iter().map(|d| if let Dim::Known(k) = d { *k } else { 0 }).product::<usize>()
        });
        if rows.is_some_and(|r| r >= TOKENS_MIN) {
            tokens = true;
        } else {
            short = true;
        }
    };
    let Ok(order) = g.topo_order() else { return false };
    // Nodes computed from constants only (a weight's quantizer): folded when planned.
    let mut fixed = std::collections::HashSet::new();
    for n in order {
        let node = g.node(n);
        let ins = g.inputs_of(n);
        if matches!(node.op, Op::Const(_))
            || (!matches!(node.op, Op::Input) && ins.iter().flatten().all(|v| fixed.contains(&v.node)))
        {
            fixed.insert(n);
            continue;
        }
        if matches!(node.op, Op::Input) {
            continue;
        }
        // The batch leads every computed value and appears nowhere else (a [batch, batch] value
        // pairs samples: a Gather by batched indices, a product with a transposed batch).
        let batch_only_first = |s: usize| {
            let shape = &g.value(ValueRef { node: n, slot: s }).ty.shape;
            shape.first() == Some(&sym) && !shape[1..].contains(&sym)
        };
        if !(0..node.outputs.len()).all(batch_only_first) {
            return false;
        }
        let rank = g.inputs_of(n).first().copied().flatten().map_or(0, |x| g.value(x).ty.shape.len() as i64);
        // An axis attribute names the batch axis if it normalizes to 0.
        let off0 = |axis: i64| axis.rem_euclid(rank.max(1)) != 0;
        let ok = match &node.op {
            // A fused kernel's stages: row-wise linear maps, convolutions and element-wise ops
            // (what the fusion rules build; anything else keeps the batch together).
            Op::Fused(f) => f.stages.iter().enumerate().all(|(k, st)| {
                conv |= matches!(st.op, Op::Conv(_));
                if k == 0 && matches!(st.op, Op::MatMul | Op::Gemm { .. }) {
                    linear(n);
                }
                matches!(
                    st.op,
                    Op::Conv(_)
                        | Op::MatMul
                        | Op::Gemm { trans_a: false, .. }
                        | Op::Unary(_)
                        | Op::Binary(_)
                        | Op::LeakyRelu { .. }
                        | Op::Gelu { .. }
                        | Op::Clip
                )
            }),
            Op::Conv(_) | Op::MaxPool(_) | Op::AveragePool(_) | Op::GlobalAveragePool => {
                conv |= matches!(node.op, Op::Conv(_));
                true
            }
            Op::Unary(_)
            | Op::Binary(_)
            | Op::LeakyRelu { .. }
            | Op::Elu { .. }
            | Op::Gelu { .. }
            | Op::PRelu
            | Op::Where
            | Op::Clip
            | Op::Reshape { .. }
            | Op::Squeeze
            | Op::Unsqueeze
            | Op::Identity
            | Op::Cast { .. }
            | Op::Expand => true,
            Op::MatMul => {
                linear(n);
                true
            }
            Op::Gemm { trans_a, .. } => {
                linear(n);
                !trans_a
            }
            Op::BatchNorm { training, .. } => !training,
            Op::Softmax { axis, .. } | Op::LogSoftmax { axis, .. } | Op::LayerNorm { axis, .. } => off0(*axis),
            // Over constant axes, none of them the batch's.
            Op::Reduce { .. } => g
                .inputs_of(n)
                .get(1)
                .copied()
                .flatten()
                .and_then(|a| g.const_value(a))
                .is_some_and(|t| !t.is_empty() && t.data.to_i64_vec().iter().all(|&a| off0(a))),
            Op::Flatten { axis } => *axis != 0,
            Op::Concat { axis } | Op::Split { axis, .. } | Op::Gather { axis } => off0(*axis),
            Op::Transpose { perm } => perm.as_ref().is_some_and(|p| p.first() == Some(&0)),
            Op::FakeQuant { axis, block_size, .. } | Op::QuantizeLinear { axis, block_size, .. } => {
                // Per tensor (constant parameters), or per channel on another axis.
                g.inputs_of(n).get(1).copied().flatten().is_some_and(|s| g.value(s).ty.shape.is_empty())
                    || (off0(*axis) && *block_size == 0)
            }
            Op::DequantizeLinear { axis, block_size } => {
                g.inputs_of(n).get(1).copied().flatten().is_some_and(|s| g.value(s).ty.shape.is_empty())
                    || (off0(*axis) && *block_size == 0)
            }
            _ => false,
        };
        if !ok {
            return false;
        }
    }
    conv || (tokens && !short)
}

/// Rows per sample from which a linear map's batch runs sample by sample (see [`per_sample`]):
/// each sample is then a GEMM of its own, and its activations stay in cache from step to step.
const TOKENS_MIN: usize = 8;

/// How a planned int4 layer's packed rows map to its float weight constant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightLayout {
    /// `[n, k]` (Gemm `trans_b`).
    Nk,
    /// `[k, n]` (MatMul, Gemm without `trans_b`).
    Kn,
    /// A Conv weight `[n, channels, kernel...]` (`taps` the kernel's size), packed in `(tap,
    /// channel)` order, each tap's run of channels padded as `sqil_ir::lowered::conv::conv_run`.
    Conv { channels: usize, taps: usize },
}

/// The key of the int4 layer at node `n` (a linear node, or a fused kernel whose first stage is
/// one): the name of its weight value, the FakeQuant of the float weight. Fusion leaves that value
/// alone, so the key is the same in the simulation graph and the fused graph an artifact stores.
pub fn layer_key(g: &Graph, n: NodeId) -> Option<String> {
    let (_, ins) = linear_site(g, n)?;
    ins.get(1).copied().flatten().map(|w| g.value(w).name.clone())
}

/// The float weight behind a planned int4 layer (named by its key, [`layer_key`]; artifacts of
/// versions 1 and 2 named it by the layer's output value): the Const node feeding the layer's
/// weight FakeQuant and its layout, if that constant serves only this layer (so an artifact may
/// store it packed only).
pub fn layer_weight(g: &Graph, layer: &str) -> Option<(NodeId, WeightLayout)> {
    let v = g.find_value(layer)?;
    let (n, fq) = if matches!(g.node(v.node).op, Op::FakeQuant { .. }) {
        match g.uses_of(v).as_slice() {
            [(u, _)] => (*u, v),
            _ => return None,
        }
    } else {
        (v.node, linear_site(g, v.node)?.1.get(1).copied().flatten()?)
    };
    let (op, ins) = linear_site(g, n)?;
    if ins.get(1).copied().flatten() != Some(fq) {
        return None;
    }
    let layout = match op {
        Op::Gemm { trans_b: true, .. } => WeightLayout::Nk,
        Op::Gemm { trans_b: false, .. } | Op::MatMul => WeightLayout::Kn,
        Op::Conv(_) => {
            let shape = g.value(fq).ty.known_shape()?;
            WeightLayout::Conv { channels: *shape.get(1)?, taps: shape.get(2..)?.iter().product() }
        }
        _ => return None,
    };
    if !matches!(g.node(fq.node).op, Op::FakeQuant { .. }) || g.uses_of(fq).len() != 1 {
        return None;
    }
    let c = g.inputs_of(fq.node).first().copied().flatten()?;
    (matches!(g.node(c.node).op, Op::Const(_)) && g.uses_of(c).len() == 1).then_some((c.node, layout))
}

/// The dequantized weights `q * scale` of a packed layer in the graph's layout: FakeQuant of them
/// gives back exactly the same values (|q| <= 8, so `q * s / s` rounds to `q`).
pub fn dequantized_weight(w: &PackedQ4, layout: WeightLayout) -> Vec<f32> {
    let trans_b = match layout {
        WeightLayout::Conv { channels, taps } => {
            return sqil_ir::lowered::conv::dequantized_conv_weight(w, channels, taps)
        }
        l => l == WeightLayout::Nk,
    };
    let groups = w.groups();
    let mut out = vec![0f32; w.n * w.k];
    for r in 0..w.n {
        for c in 0..w.k {
            let v = w.get(r, c) as f32 * w.scales[r * groups + c / w.group];
            out[if trans_b { r * w.k + c } else { c * w.n + r }] = v;
        }
    }
    out
}

/// A plan's constants by slot.
type Consts = Vec<(usize, Tensor)>;

/// Evaluates once, at planning time, every reference step whose inputs are all constants (the
/// FakeQuant of a weight no int4 kernel absorbed, a shape computation): their results become
/// constants and the steps disappear. Constants no remaining step reads are dropped.
fn fold_constants<T>(steps: Vec<(Step, T)>, consts: Consts, outputs: &[usize]) -> Result<(Vec<(Step, T)>, Consts)> {
    let mut known: HashMap<usize, Tensor> = consts.into_iter().collect();
    let mut kept = vec![];
    for (step, tag) in steps {
        if let Step::Op { name, op, inputs, outputs, .. } = &step {
            if inputs.iter().flatten().all(|s| known.contains_key(s)) {
                let args: Vec<Option<&Tensor>> = inputs.iter().map(|s| s.and_then(|s| known.get(&s))).collect();
                let res =
                    op.eval(&args, outputs.len()).map_err(|e| e.context(format!("node `{name}` ({})", op.name())))?;
                known.extend(outputs.iter().copied().zip(res));
                continue;
            }
        }
        kept.push((step, tag));
    }
    let mut read: std::collections::HashSet<usize> = outputs.iter().copied().collect();
    for (step, _) in &kept {
        read.extend(step.reads());
    }
    let mut consts: Consts = known.into_iter().filter(|(s, _)| read.contains(s)).collect();
    consts.sort_by_key(|(s, _)| *s);
    Ok((kept, consts))
}

/// A float Gemm's constant `trans_b` weight stored transposed (`[k, n]`, `trans_b` off): the
/// policy GEMM reads rows of its B operand (`sgemm_chain`; a transposed B is copied to rows on
/// every call), and the arithmetic, one chain per output over k, is the same either way.
fn weights_as_rows(steps: &mut [Step], consts: &mut Consts, next: &mut usize, outputs: &[usize]) {
    for step in steps.iter_mut() {
        let Step::Op { op: Op::Gemm { trans_a: false, trans_b: tb @ true, .. }, inputs, .. } = step else { continue };
        let Some(Some(ws)) = inputs.get(1).copied() else { continue };
        let Some(w) = consts.iter().find(|(s, _)| *s == ws).map(|(_, t)| t) else { continue };
        let sqil_ir::Data::F32(v) = &w.data else { continue };
        if w.rank() != 2 {
            continue;
        }
        let (n, k) = (w.shape[0], w.shape[1]);
        let rows: Vec<f32> = (0..k * n).map(|i| v[(i % n) * k + i / n]).collect();
        let Ok(t) = Tensor::from_f32(vec![k, n], rows) else { continue };
        consts.push((*next, t));
        inputs[1] = Some(*next);
        *next += 1;
        *tb = false;
    }
    // A Gemm's levels are kept only where they rebuild its constant rows bit for bit.
    for step in steps.iter_mut() {
        let Step::Op { op, inputs, dequant: dq @ Some(_), .. } = step else { continue };
        let rows = match (&*op, inputs.get(1).copied().flatten()) {
            (Op::Gemm { trans_b: false, .. }, Some(ws)) => consts.iter().find(|(s, _)| *s == ws).map(|(_, t)| t),
            _ => None,
        };
        let keep = rows.is_some_and(|t| {
            dq.as_ref()
                .is_some_and(|d| t.shape == [d.k, d.n] && matches!(&t.data, sqil_ir::Data::F32(v) if d.reproduces(v)))
        });
        if !keep {
            *dq = None;
        }
    }
    let mut read: std::collections::HashSet<usize> = outputs.iter().copied().collect();
    for step in steps.iter() {
        read.extend(step.reads());
    }
    consts.retain(|(s, _)| read.contains(s));
}

/// A depthwise Conv's constant weight (`[C, 1, kernel...]`, group C, 1-D or 2-D) laid out by tap
/// once, for the depthwise kernel that would otherwise lay it out on every call
/// ([`DepthwiseTaps`]; the same values, so the same bits).
fn depthwise_taps(steps: &mut [Step], consts: &Consts) {
    for step in steps.iter_mut() {
        let Step::Op { op: Op::Conv(c), inputs, taps, .. } = step else { continue };
        let Some(Some(ws)) = inputs.get(1).copied() else { continue };
        let Some(w) = consts.iter().find(|(s, _)| *s == ws).map(|(_, t)| t) else { continue };
        let sqil_ir::Data::F32(v) = &w.data else { continue };
        if !matches!(w.rank(), 3 | 4) || w.shape[1] != 1 || c.group < 1 || c.group as usize != w.shape[0] {
            continue;
        }
        *taps = DepthwiseTaps::new(v, w.shape[0], w.shape[2..].iter().product()).map(Box::new);
    }
}

/// A fused kernel of the plan (a `Fused` node of the fusion pass).
#[derive(Clone, Debug)]
pub struct Kernel {
    /// The fused node's name.
    pub node: String,
    /// The fusion pass's kernel name, e.g. `gemm+bias+relu`.
    pub kernel: String,
}

/// Slot numbering: one per value, fresh ones for the values inside fused kernels.
#[derive(Default)]
struct Slots {
    map: HashMap<ValueRef, usize>,
    next: usize,
}

impl Slots {
    fn of(&mut self, v: ValueRef) -> usize {
        let next = &mut self.next;
        *self.map.entry(v).or_insert_with(|| {
            *next += 1;
            *next - 1
        })
    }

    fn fresh(&mut self) -> usize {
        self.next += 1;
        self.next - 1
    }
}

/// The bias of a fused kernel's stage `st` when it is `Add(stage 0, c)` (either order) with `c` a
/// constant of `n` values along the last axis (shape `[.., n]`, ones before): an int4 step
/// computes `y + b[j]` in its epilogue, which is that Add exactly. With integer activations a
/// `-0.0` in `b` is made `+0.0`: that epilogue adds `+0.0` when it has no bias, so the unfused
/// steps give `(y + 0) + b`, the same as `y + b` for every `y` and `b` except `b = -0.0`, where
/// `(+-0 + 0) + -0 = +0 = +-0 + +0`. (The weight-only epilogue adds nothing without a bias.)
fn epilogue_bias(
    g: &Graph,
    ins: &[Option<ValueRef>],
    st: &sqil_ir::ops::fused::Stage,
    n: usize,
    act: &ActQuant,
) -> Option<Vec<f32>> {
    if !matches!(st.op, Op::Binary(sqil_ir::ops::BinaryOp::Add)) {
        return None;
    }
    let c = match st.args.as_slice() {
        [Some(Arg::Stage(0)), Some(Arg::Input(i))] | [Some(Arg::Input(i)), Some(Arg::Stage(0))] => *i,
        _ => return None,
    };
    let t = g.const_value(ins.get(c).copied().flatten()?)?;
    let shape_ok = t.shape.last() == Some(&n) && t.shape[..t.rank() - 1].iter().all(|&d| d == 1);
    if !shape_ok || t.dtype() != sqil_ir::DType::F32 {
        return None;
    }
    let int = matches!(act, ActQuant::Int { .. });
    Some(t.data.to_f32_vec().into_iter().map(|v| if int && v == 0.0 { 0.0 } else { v }).collect())
}

/// The node values a fused kernel's first stage reads (it reads no earlier stage).
fn stage_inputs(ins: &[Option<ValueRef>], args: &[Option<Arg>]) -> Result<Vec<Option<ValueRef>>> {
    args.iter()
        .map(|a| match a {
            None => Ok(None),
            Some(Arg::Input(i)) => Ok(ins.get(*i).copied().flatten()),
            Some(Arg::Stage(_)) => Err(IrError::Invalid("a fused kernel's first stage reads another stage".into())),
        })
        .collect()
}

impl Plan {
    /// Lowers `g` (a verified FakeQuant simulation graph): fuses it ([`crate::lower`]) and plans
    /// the fused graph, packing its int4 weights.
    pub fn new(g: &Graph) -> Result<Plan> {
        Ok(crate::lower(g)?.plan)
    }

    /// Plans `g` as it is (a fused graph from [`crate::lower`], an artifact's stored graph, or an
    /// unfused simulation graph, whose every node is then its own step), taking the packed weights
    /// of int4 layers from `packed` (by [`layer_key`], as an artifact stores them) where present;
    /// they must match the layer's shape and grouping.
    ///
    /// A `Fused` node (a kernel the fusion pass chose) becomes consecutive steps that
    /// [`Plan::kernels`] names: its first stage (an int4 step when it is one, with a ReLU right
    /// after it folded into the step's epilogue), then one step per later stage, the values between
    /// them never leaving the kernel's slots. Nothing else is fused here.
    pub fn with_packed(g: &Graph, packed: &HashMap<String, PackedQ4>) -> Result<Plan> {
        let order = g.topo_order()?;
        let mut slots = Slots::default();
        // Which nodes are int4 steps.
        let mut q4: HashMap<NodeId, (String, Q4Layer)> = HashMap::new();
        let exact_float = has_int_activations(g, &order);
        for &n in &order {
            let Some(key) = layer_key(g, n) else { continue };
            // Artifacts of versions 1 and 2 keyed a layer by its output value.
            let stored = packed.get(&key).or_else(|| packed.get(&g.node(n).outputs[0].name));
            if let Some(mut l) = q4_layer(g, n, stored.is_some(), exact_float)? {
                if let Some(p) = stored {
                    if (p.n, p.k, p.group) != (l.w.n, l.w.k, l.w.group) {
                        return Err(IrError::Invalid(format!(
                            "layer `{key}`: stored weights are [{} x {}] g{}, the graph's [{} x {}] g{}",
                            p.n, p.k, p.group, l.w.n, l.w.k, l.w.group
                        )));
                    }
                    l.w = p.clone();
                }
                q4.insert(n, (key, l));
            }
        }
        // Steps, built backwards from the outputs so absorbed quantizers are never computed.
        let mut needed: std::collections::HashSet<NodeId> = g.outputs.iter().map(|v| v.node).collect();
        let mut steps_rev: Vec<(Step, Option<usize>)> = vec![];
        let mut kernels = vec![];
        let mut consts = vec![];
        for &n in order.iter().rev() {
            if !needed.contains(&n) {
                continue;
            }
            let node = g.node(n);
            match &node.op {
                Op::Input => continue,
                Op::Const(t) => {
                    consts.push((slots.of(ValueRef { node: n, slot: 0 }), t.clone()));
                    continue;
                }
                _ => {}
            }
            let ins = g.inputs_of(n);
            let out = ValueRef { node: n, slot: 0 };
            let mut node_steps = vec![];
            let fused = match &node.op {
                Op::Fused(f) => Some(f.as_ref()),
                _ => None,
            };
            // The first stage (or the node itself).
            let mut next_stage = 1;
            let head_out = |slots: &mut Slots, last: bool| if last { slots.of(out) } else { slots.fresh() };
            let n_stages = fused.map_or(1, |f| f.stages.len());
            let mut stage_slot: Vec<usize> = vec![];
            if let Some((key, l)) = q4.get(&n) {
                needed.insert(l.x.node);
                let mut bias = l.bias.clone();
                // A constant bias Add (of a layer without one) and a ReLU right after the int4
                // step are its epilogue: the same arithmetic (see `epilogue_bias`).
                if let (Some(f), None, None) = (fused, &bias, &l.conv) {
                    if let Some(b) = f.stages.get(1).and_then(|s| epilogue_bias(g, &ins, s, l.w.n, &l.act)) {
                        bias = Some(b);
                        next_stage = 2;
                    }
                }
                let relu = fused.is_some_and(|f| {
                    f.stages.get(next_stage).is_some_and(|s| {
                        matches!(s.op, Op::Unary(UnaryOp::Relu)) && s.args == [Some(Arg::Stage(next_stage - 1))]
                    })
                });
                if relu {
                    next_stage += 1;
                }
                let y = head_out(&mut slots, next_stage >= n_stages);
                stage_slot.extend(std::iter::repeat_n(y, next_stage));
                node_steps.push(Step::Q4Linear {
                    name: node.name.clone(),
                    layer: key.clone(),
                    x: slots.of(l.x),
                    y,
                    act: l.act.clone(),
                    w: Box::new(l.w.clone()),
                    bias,
                    relu,
                    conv: l.conv.clone(),
                });
            } else {
                let (op, op_ins): (Op, Vec<Option<ValueRef>>) = match fused {
                    Some(f) => (f.stages[0].op.clone(), stage_inputs(&ins, &f.stages[0].args)?),
                    None => (node.op.clone(), ins.clone()),
                };
                for v in op_ins.iter().flatten() {
                    needed.insert(v.node);
                }
                let table = match (&op, op_ins.as_slice()) {
                    (Op::Conv(c), [Some(x), Some(w), ..]) => float_conv_table(g, c, *x, *w),
                    _ => None,
                };
                // A float Gemm on a FakeQuant of a constant weight: its levels and scales.
                let dequant = match (&op, op_ins.as_slice()) {
                    (&Op::Gemm { alpha: 1.0, trans_a: false, trans_b, .. }, [Some(_), Some(w), ..]) => {
                        match sqil_ir::lowered::q4_weight(g, *w, trans_b, false) {
                            Ok(Some((q, scales, n, k, group))) => {
                                DequantRows::new(&q, &scales, n, k, group).map(Box::new)
                            }
                            _ => None,
                        }
                    }
                    _ => None,
                };
                let outputs: Vec<usize> = if fused.is_some() {
                    vec![head_out(&mut slots, n_stages == 1)]
                } else {
                    (0..node.outputs.len()).map(|s| slots.of(ValueRef { node: n, slot: s })).collect()
                };
                stage_slot.push(outputs[0]);
                node_steps.push(Step::Op {
                    node: n,
                    name: node.name.clone(),
                    op,
                    table,
                    dequant,
                    taps: None,
                    inputs: op_ins.iter().map(|v| v.map(|v| slots.of(v))).collect(),
                    outputs,
                });
            }
            // The later stages of a fused kernel, one step each.
            if let Some(f) = fused {
                for (k, st) in f.stages.iter().enumerate().skip(next_stage) {
                    let mut inputs = vec![];
                    for a in &st.args {
                        inputs.push(match a {
                            None => None,
                            Some(Arg::Stage(j)) => Some(stage_slot[*j]),
                            Some(Arg::Input(i)) => {
                                let v = ins.get(*i).copied().flatten().ok_or_else(|| {
                                    IrError::Invalid(format!(
                                        "fused node `{}`: stage {k} reads input {i}, absent",
                                        node.name
                                    ))
                                })?;
                                needed.insert(v.node);
                                Some(slots.of(v))
                            }
                        });
                    }
                    let y = head_out(&mut slots, k + 1 == n_stages);
                    stage_slot.push(y);
                    node_steps.push(Step::Op {
                        node: n,
                        name: node.name.clone(),
                        op: st.op.clone(),
                        table: None,
                        dequant: None,
                        taps: None,
                        inputs,
                        outputs: vec![y],
                    });
                }
                kernels.push(Kernel { node: node.name.clone(), kernel: f.kernel.clone() });
            }
            let tag = fused.map(|_| kernels.len() - 1);
            steps_rev.extend(node_steps.into_iter().rev().map(|s| (s, tag)));
        }
        steps_rev.reverse();
        let inputs = g
            .inputs
            .iter()
            .map(|&i| (g.node(i).outputs[0].name.clone(), slots.of(ValueRef { node: i, slot: 0 })))
            .collect();
        let outputs: Vec<usize> = g.outputs.iter().map(|&o| slots.of(o)).collect();
        let (tagged, mut consts) = fold_constants(steps_rev, consts, &outputs)?;
        let (mut steps, mut step_kernel): (Vec<Step>, Vec<Option<usize>>) = tagged.into_iter().unzip();
        // Kernels in execution order (they were found walking backwards).
        kernels.reverse();
        step_kernel.iter_mut().flatten().for_each(|k| *k = kernels.len() - 1 - *k);
        weights_as_rows(&mut steps, &mut consts, &mut slots.next, &outputs);
        depthwise_taps(&mut steps, &consts);
        let output_names = g.outputs.iter().map(|&o| g.value(o).name.clone()).collect();
        let mut last_use = vec![usize::MAX; slots.next];
        for (i, step) in steps.iter().enumerate() {
            step.reads().for_each(|s| last_use[s] = i);
        }
        for &s in &outputs {
            last_use[s] = usize::MAX;
        }
        let folds = transpose_folds(&steps, &last_use, &outputs);
        Ok(Plan {
            inputs,
            outputs,
            output_names,
            consts,
            slots: slots.next,
            steps,
            step_kernel,
            kernels,
            last_use,
            per_sample: per_sample(g),
            folds,
        })
    }

    /// The fused kernels that run, one line each: the node, the kernel (the fusion pass's name,
    /// e.g. `gemm+bias+relu`) and the steps it runs as.
    pub fn kernels(&self) -> Vec<String> {
        let desc = self.describe();
        self.kernels
            .iter()
            .enumerate()
            .map(|(k, kn)| {
                let steps: Vec<&str> = (0..self.steps.len())
                    .filter(|&i| self.step_kernel[i] == Some(k))
                    .map(|i| desc[i].split_once(": ").map_or(desc[i].as_str(), |(_, d)| d))
                    .collect();
                format!("{}: {} as {}", kn.node, kn.kernel, steps.join(" -> "))
            })
            .collect()
    }

    /// Names and kinds of the steps (for reports).
    pub fn describe(&self) -> Vec<String> {
        self.steps
            .iter()
            .map(|s| match s {
                Step::Q4Linear { name, act, w, relu, conv, .. } => format!(
                    "{name}: q4 {}{} [{} x {}] g{}{}{}",
                    if conv.is_some() { "conv im2col " } else { "" },
                    if matches!(act, ActQuant::Float) { "x f32" } else { "x int" },
                    w.n,
                    w.k,
                    w.group,
                    match conv {
                        Some(im) if im.run > im.channels =>
                            format!(" (runs of {} channels padded to {})", im.channels, im.run),
                        _ => String::new(),
                    },
                    if *relu { " +relu" } else { "" }
                ),
                Step::Op { name, op, .. } if !name.is_empty() => format!("{name}: {}", op.name()),
                Step::Op { op, .. } => op.name().to_string(),
            })
            .collect()
    }
}
