//! The trainable graph: a FakeQuant graph whose weights, LSQ step sizes (weights and
//! activations) and biases become graph inputs, with the QRD loss
//! `L = mean((y - a_demo)^2) + mean_b(alpha_b * mean((y_b - a_fp_b)^2))` appended and its
//! gradients (the `grad` pass) as outputs.
//!
//! With an action box (the environment clips every executed action to it), targets become
//! intervals: an action the environment clips to the box's upper bound is reached by every
//! `y >= high`, so the distance of `y` to a target is its distance to the interval `[lo, hi]`
//! of outputs that execute as the same action: `relu(y - hi) - relu(lo - y)` (`lo = hi = t`
//! inside the box, `[high, +big]` at the upper bound, `[-big, low]` at the lower). It is zero
//! exactly when the two actions execute the same, and its gradient never vanishes while they
//! differ (clipping `y` itself would stop the gradient of an output stuck outside the box).

use sqil_ir::ops::{BinaryOp, ReduceOp, UnaryOp};
use sqil_ir::{DType, Dim, Graph, IrError, NodeId, Op, Result, Tensor, ValueRef, ValueType};
use sqil_passes::grad::grad;

/// What a parameter is, for the optimizer (weight decay applies to weights only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ParamKind {
    Weight,
    Bias,
    /// An LSQ step size (kept positive).
    Step,
}

#[derive(Clone, Debug)]
pub struct Param {
    pub name: String,
    pub kind: ParamKind,
    /// The Const node in the inference graph that holds it.
    pub node: NodeId,
    pub value: Tensor,
}

#[derive(Clone)]
pub struct TrainGraph {
    /// Inputs: the policy's inputs, then `target`, `teacher`, `alpha`, then the parameters;
    /// outputs: loss, then one gradient per parameter.
    pub graph: Graph,
    pub params: Vec<Param>,
    pub policy_inputs: Vec<String>,
}

pub(crate) fn make_input(g: &mut Graph, n: NodeId) {
    g.node_mut(n).op = Op::Input;
    g.inputs.push(n);
}

/// The parameters of a FakeQuant graph: each quantized weight with its step, each activation
/// step (unless `act_steps` is false: they keep their calibrated ranges), and the bias of each
/// layer with a quantized weight.
pub fn find_params(g: &Graph, act_steps: bool) -> Vec<Param> {
    let mut out = vec![];
    let mut seen = std::collections::HashSet::new();
    let order = g.topo_order().unwrap_or_default();
    let mut push = |g: &Graph, v: ValueRef, kind: ParamKind, out: &mut Vec<Param>| {
        if let Some(t) = g.const_value(v) {
            if t.dtype() == DType::F32 && seen.insert(v.node) {
                out.push(Param { name: g.value(v).name.clone(), kind, node: v.node, value: t.clone() });
            }
        }
    };
    for &n in &order {
        if let Op::FakeQuant { .. } = g.node(n).op {
            let ins = g.inputs_of(n);
            let (x, s) = (ins[0].expect("x"), ins[1].expect("scale"));
            let weight = g.const_value(x).is_some();
            if weight {
                push(g, x, ParamKind::Weight, &mut out);
            }
            if weight || act_steps {
                push(g, s, ParamKind::Step, &mut out);
            }
        }
    }
    for &n in &order {
        if matches!(g.node(n).op, Op::Gemm { .. } | Op::Conv(_)) {
            let ins = g.inputs_of(n);
            let wq = ins.get(1).copied().flatten().is_some_and(|w| matches!(g.node(w.node).op, Op::FakeQuant { .. }));
            if let (true, Some(Some(b))) = (wq, ins.get(2)) {
                push(g, *b, ParamKind::Bias, &mut out);
            }
        }
    }
    out
}

/// Builds the trainable graph of a FakeQuant graph with one output (the action); `act_steps`:
/// also learn the activation quantizers' steps.
pub fn train_graph(sim: &Graph, act_steps: bool) -> Result<TrainGraph> {
    train_graph_with(sim, act_steps, false)
}

/// [`train_graph`]; with `intervals`, the targets are intervals (see the module header): the
/// inputs `train.target` / `train.teacher` hold their low ends and `train.target_hi` /
/// `train.teacher_hi` their high ends.
pub fn train_graph_with(sim: &Graph, act_steps: bool, intervals: bool) -> Result<TrainGraph> {
    let mut g = sim.clone();
    if g.outputs.len() != 1 {
        return Err(IrError::Unsupported(format!("training a graph with {} outputs", g.outputs.len())));
    }
    let policy_inputs: Vec<String> = g.inputs.iter().map(|&i| g.node(i).outputs[0].name.clone()).collect();
    let params = find_params(&g, act_steps);
    if params.is_empty() {
        return Err(IrError::Invalid("nothing to train: the graph has no FakeQuant weights".into()));
    }
    let y = g.outputs[0];
    let yty = g.value(y).ty.clone();
    let target = g.add_input("train.target", yty.clone());
    let teacher = g.add_input("train.teacher", yty.clone());
    let alpha = g.add_input("train.alpha", alpha_type(&yty));
    let his = if intervals {
        Some((g.add_input("train.target_hi", yty.clone()), g.add_input("train.teacher_hi", yty.clone())))
    } else {
        None
    };
    let bin = |g: &mut Graph, o: BinaryOp, a: ValueRef, b: ValueRef, n: &str| {
        g.add_inferred(format!("loss.{n}"), Op::Binary(o), &[Some(a), Some(b)], format!("loss.{n}"))
    };
    let mean = |g: &mut Graph, x: ValueRef, axes: Option<Vec<i64>>, n: &str| -> Result<ValueRef> {
        let a = match axes {
            Some(ax) => {
                let c = g.add_const(format!("loss.{n}.axes"), Tensor::from_i64(vec![ax.len()], ax)?);
                Some(c)
            }
            None => None,
        };
        let op = Op::Reduce { op: ReduceOp::Mean, keepdims: true, noop_with_empty_axes: false };
        g.add_inferred(format!("loss.{n}"), op, &[Some(x), a], format!("loss.{n}"))
    };
    let d1 = match his {
        Some((target_hi, _)) => interval_diff(&mut g, y, target, target_hi, "bc")?,
        None => bin(&mut g, BinaryOp::Sub, y, target, "bc_diff")?,
    };
    let s1 = bin(&mut g, BinaryOp::Mul, d1, d1, "bc_sq")?;
    let l_bc = mean(&mut g, s1, None, "bc")?;
    let l_kd = match his {
        Some((_, teacher_hi)) => {
            let d2 = interval_diff(&mut g, y, teacher, teacher_hi, "kd")?;
            weighted_square(&mut g, d2, alpha)?
        }
        None => weighted_distance(&mut g, y, teacher, alpha)?,
    };
    let loss = bin(&mut g, BinaryOp::Add, l_bc, l_kd, "total")?;
    for p in &params {
        make_input(&mut g, p.node);
    }
    let wrt: Vec<ValueRef> = params.iter().map(|p| ValueRef { node: p.node, slot: 0 }).collect();
    let grads = grad(&mut g, loss, &wrt)?;
    g.outputs = std::iter::once(loss).chain(grads).collect();
    sqil_ir::verify(&g).map_err(|e| e.context("the trainable graph"))?;
    Ok(TrainGraph { graph: g, params, policy_inputs })
}

/// Appends `relu(y - hi) - relu(lo - y)`: the signed distance of `y` to the interval `[lo, hi]`
/// (`y - t` when `lo = hi = t`).
fn interval_diff(g: &mut Graph, y: ValueRef, lo: ValueRef, hi: ValueRef, n: &str) -> Result<ValueRef> {
    let node = |g: &mut Graph, op: Op, ins: &[ValueRef], what: &str| {
        let ins: Vec<Option<ValueRef>> = ins.iter().copied().map(Some).collect();
        g.add_inferred(format!("loss.{n}_{what}"), op, &ins, format!("loss.{n}_{what}"))
    };
    let above = node(g, Op::Binary(BinaryOp::Sub), &[y, hi], "above")?;
    let above = node(g, Op::Unary(UnaryOp::Relu), &[above], "above_relu")?;
    let below = node(g, Op::Binary(BinaryOp::Sub), &[lo, y], "below")?;
    let below = node(g, Op::Unary(UnaryOp::Relu), &[below], "below_relu")?;
    node(g, Op::Binary(BinaryOp::Sub), &[above, below], "diff")
}

/// Appends `mean_b(alpha_b * mean((y_b - teacher_b)^2))` (the QRD distance term) to `g`.
pub fn weighted_distance(g: &mut Graph, y: ValueRef, teacher: ValueRef, alpha: ValueRef) -> Result<ValueRef> {
    let d2 = g.add_inferred("loss.kd_diff", Op::Binary(BinaryOp::Sub), &[Some(y), Some(teacher)], "loss.kd_diff")?;
    weighted_square(g, d2, alpha)
}

/// Appends `mean_b(alpha_b * mean(d_b^2))` for per-state differences `d`.
fn weighted_square(g: &mut Graph, d2: ValueRef, alpha: ValueRef) -> Result<ValueRef> {
    let rank = g.value(d2).ty.rank();
    let bin = |g: &mut Graph, o: BinaryOp, a: ValueRef, b: ValueRef, n: &str| {
        g.add_inferred(format!("loss.{n}"), Op::Binary(o), &[Some(a), Some(b)], format!("loss.{n}"))
    };
    let mean = |g: &mut Graph, x: ValueRef, axes: Option<Vec<i64>>, n: &str| -> Result<ValueRef> {
        let a = match axes {
            Some(ax) => Some(g.add_const(format!("loss.{n}.axes"), Tensor::from_i64(vec![ax.len()], ax)?)),
            None => None,
        };
        let op = Op::Reduce { op: ReduceOp::Mean, keepdims: true, noop_with_empty_axes: false };
        g.add_inferred(format!("loss.{n}"), op, &[Some(x), a], format!("loss.{n}"))
    };
    let s2 = bin(g, BinaryOp::Mul, d2, d2, "kd_sq")?;
    let per = if rank > 1 { mean(g, s2, Some((1..rank as i64).collect()), "kd_per_state")? } else { s2 };
    let w = bin(g, BinaryOp::Mul, per, alpha, "kd_weighted")?;
    mean(g, w, None, "kd")
}

/// The input `alpha` of a loss over `y`: `[batch, 1, ...]` of `y`'s rank.
pub fn alpha_type(y: &ValueType) -> ValueType {
    let mut ashape = vec![y.shape[0].clone()];
    ashape.extend(std::iter::repeat_n(Dim::Known(1), y.rank() - 1));
    ValueType::new(DType::F32, ashape)
}

/// The inference graph with trained parameter values written back.
pub fn with_params(sim: &Graph, params: &[Param]) -> Graph {
    let mut g = sim.clone();
    for p in params {
        g.node_mut(p.node).op = Op::Const(p.value.clone());
    }
    g
}
