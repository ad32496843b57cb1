//! `grad`: reverse-mode automatic differentiation as a graph transformation. For a scalar
//! `loss` value and values `wrt` (parameters, usually graph inputs), appends the backward graph
//! — one `Vjp` node per (node, input) on a path from `wrt` to `loss`, gradients of values read
//! twice summed with `Add` — and returns the gradient values, in `wrt`'s order. The backward
//! graph is ordinary IR: the interpreter (and later the back ends) run it.
//!
//! Needs: a verified graph. Keeps: every existing node and value. Only float values carry
//! gradients; a multi-output node (Split) gets one output gradient per output.

use sqil_ir::ops::{BinaryOp, UnaryOp};
use sqil_ir::{Graph, IrError, Op, Result, Tensor, ValueRef};
use std::collections::{HashMap, HashSet};

/// Appends the gradients of `loss` with respect to `wrt`; returns their values.
pub fn grad(g: &mut Graph, loss: ValueRef, wrt: &[ValueRef]) -> Result<Vec<ValueRef>> {
    let order = g.topo_order()?;
    // Values that depend on some `wrt`.
    let mut live: HashSet<ValueRef> = wrt.iter().copied().collect();
    // Only float values carry gradients (shapes and indices computed from a live value do not).
    for &n in &order {
        if g.inputs_of(n).iter().flatten().any(|v| live.contains(v)) {
            for slot in 0..g.node(n).outputs.len() {
                if g.node(n).outputs[slot].ty.dtype.is_float() {
                    live.insert(ValueRef { node: n, slot });
                }
            }
        }
    }
    let lt = g.value(loss).ty.clone();
    let shape = lt.known_shape().ok_or_else(|| IrError::Invalid("grad: the loss needs a known shape".into()))?;
    if shape.iter().product::<usize>() != 1 {
        return Err(IrError::Invalid(format!("grad: the loss must be a scalar, got {lt}")));
    }
    let one = g.add_const("grad.seed", Tensor::from_f32(shape.to_vec(), vec![1.0])?);
    let mut adj: HashMap<ValueRef, ValueRef> = HashMap::from([(loss, one)]);
    let mut k = 0usize;
    for &n in order.iter().rev() {
        let node = g.node(n);
        let grads_out: Vec<(usize, ValueRef)> =
            (0..node.outputs.len()).filter_map(|s| adj.get(&ValueRef { node: n, slot: s }).map(|a| (s, *a))).collect();
        if grads_out.is_empty() {
            continue;
        }
        // One output gradient per output slot (absent where that output does not reach the loss).
        let dys: Vec<Option<ValueRef>> =
            (0..node.outputs.len()).map(|s| grads_out.iter().find(|(t, _)| *t == s).map(|(_, a)| *a)).collect();
        let op = node.op.clone();
        let ins = g.inputs_of(n);
        let label = if node.name.is_empty() { node.outputs[0].name.clone() } else { node.name.clone() };
        for (i, u) in ins.iter().enumerate() {
            let Some(u) = *u else { continue };
            if !live.contains(&u) {
                continue;
            }
            let mut args: Vec<Option<ValueRef>> = ins.clone();
            if op == Op::Unary(UnaryOp::Relu) {
                // Relu's gradient reads its output instead (positive exactly where the input is:
                // the same values), so the pre-activation need not stay alive for the backward
                // pass: one activation-sized buffer less per ReLU layer.
                args[0] = Some(ValueRef { node: n, slot: 0 });
            }
            args.extend(dys.iter().copied());
            k += 1;
            let vjp = Op::Vjp { op: Box::new(op.clone()), wrt: i, arity: ins.len() };
            let d = g
                .add_inferred(format!("grad.{label}.{i}"), vjp, &args, format!("grad{k}.{label}.{i}"))
                .map_err(|e| e.context(format!("differentiating {}", g.describe(n))))?;
            let total = match adj.get(&u) {
                Some(&prev) => {
                    k += 1;
                    g.add_inferred(
                        format!("grad.acc{k}"),
                        Op::Binary(BinaryOp::Add),
                        &[Some(prev), Some(d)],
                        format!("grad{k}.acc"),
                    )?
                }
                None => d,
            };
            adj.insert(u, total);
        }
    }
    wrt.iter()
        .map(|w| match adj.get(w) {
            Some(&d) => Ok(d),
            None => {
                let ty = g.value(*w).ty.clone();
                let s = ty
                    .known_shape()
                    .ok_or_else(|| IrError::Invalid(format!("grad: `{}` has no known shape", g.value(*w).name)))?;
                Ok(g.add_const(
                    format!("grad.zero.{}", g.value(*w).name),
                    Tensor::from_f32(s.to_vec(), vec![0.0; s.iter().product()])?,
                ))
            }
        })
        .collect()
}
