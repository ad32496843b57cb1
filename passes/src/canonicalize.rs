//! `canonicalize`: local rewrites to the forms later passes and back ends expect.
//! - `Identity` and no-op `Reshape`/`Flatten` (output type = input type) are removed;
//! - `Reshape(Reshape(x, s1), s2)` becomes `Reshape(x, s2)` when `s2` has no 0 entries;
//! - `MatMul(x, W)` with a 2-D input and a constant 2-D `W`, and its bias `Add` when that
//!   is a constant of shape `[N]`, becomes `Gemm(x, W^T, b, transB=1)`: weights stored
//!   output-channel-major (the transpose folded into the constant), as the kernels want;
//! - `Gemm` with a constant `B` and `transB=0` gets `B^T` and `transB=1`.
//!
//! Needs: a verified graph, constants folded. Keeps: graph outputs and their names; numerics
//! within float rounding (a fused bias rounds once instead of twice).

use crate::{Pass, PassCtx};
use sqil_ir::{Graph, NodeId, Op, Result, Tensor, Value, ValueRef};

#[derive(Debug, Default)]
pub struct Canonicalize;

fn transpose2(t: &Tensor) -> Result<Tensor> {
    let (r, c) = (t.shape[0], t.shape[1]);
    let v = t.data.to_f32_vec();
    Tensor::from_f32(vec![c, r], (0..r * c).map(|i| v[(i % r) * c + i / r]).collect())
}

fn out(n: NodeId) -> ValueRef {
    ValueRef { node: n, slot: 0 }
}

/// Removes a single-input node whose output equals its input, unless it is the only carrier
/// of a graph output's name for a graph input.
fn bypass(g: &mut Graph, n: NodeId) -> bool {
    let Some(x) = g.inputs_of(n).first().copied().flatten() else { return false };
    let o = out(n);
    if g.outputs.contains(&o) && (matches!(g.node(x.node).op, Op::Input) || g.outputs.contains(&x)) {
        return false;
    }
    g.replace_uses(o, x);
    g.remove_node(n);
    true
}

impl Pass for Canonicalize {
    fn name(&self) -> &'static str {
        "canonicalize"
    }

    fn run(&self, g: &mut Graph, cx: &mut PassCtx) -> Result<bool> {
        let mut count = 0;
        for n in g.topo_order()? {
            if !g.g.contains_node(n) {
                continue;
            }
            let ins = g.inputs_of(n);
            let op = g.node(n).op.clone();
            match op {
                Op::Identity => count += bypass(g, n) as usize,
                Op::Reshape { .. } | Op::Flatten { .. } => {
                    let x = ins[0].expect("input");
                    let same = g.value(x).ty == g.value(out(n)).ty;
                    if same {
                        count += bypass(g, n) as usize;
                        continue;
                    }
                    // Reshape of a Reshape: skip the inner one.
                    if let (Op::Reshape { .. }, Some(s)) = (&op, ins.get(1).copied().flatten()) {
                        let inner = x.node;
                        let zero_free = g.const_value(s).is_some_and(|t| t.data.to_i64_vec().iter().all(|&d| d != 0));
                        if zero_free && matches!(g.node(inner).op, Op::Reshape { .. }) && x.slot == 0 {
                            let src = g.inputs_of(inner)[0].expect("input");
                            g.set_input(n, 0, src);
                            count += 1;
                        }
                    }
                }
                Op::MatMul => {
                    let (Some(x), Some(w)) = (ins[0], ins[1]) else { continue };
                    let Some(wt) = g.const_value(w).cloned() else { continue };
                    if wt.rank() != 2 || g.value(x).ty.rank() != 2 || !wt.dtype().is_float() {
                        continue;
                    }
                    // A following bias Add, if this MatMul has no other reader.
                    let o = out(n);
                    let uses = g.uses_of(o);
                    let bias = match uses.as_slice() {
                        [(a, slot)]
                            if !g.outputs.contains(&o) && g.node(*a).op == Op::Binary(sqil_ir::ops::BinaryOp::Add) =>
                        {
                            let other = g.inputs_of(*a)[1 - slot];
                            other
                                .and_then(|b| g.const_value(b).map(|t| (b, t.shape.clone())))
                                .filter(|(_, s)| s == &vec![wt.shape[1]])
                                .map(|(b, _)| (*a, b))
                        }
                        _ => None,
                    };
                    let name = g.node(n).name.clone();
                    let wt2 = g.add_const(format!("{name}.weight_t"), transpose2(&wt)?);
                    let (replaced, b) = match bias {
                        Some((add, b)) => (out(add), Some(b)),
                        None => (o, None),
                    };
                    let ty = g.value(replaced).ty.clone();
                    let vname = g.value(replaced).name.clone();
                    let gemm = Op::Gemm { alpha: 1.0, beta: 1.0, trans_a: false, trans_b: true };
                    let new = g.add_node(
                        format!("{name}.gemm"),
                        gemm,
                        &[Some(x), Some(wt2), b],
                        vec![Value { name: format!("{vname}.gemm"), ty }],
                    );
                    g.replace_uses(replaced, out(new));
                    if g.value(out(new)).name != vname {
                        g.value_mut(replaced).name = format!("{vname}.pre-canonical");
                        g.value_mut(out(new)).name = vname;
                    }
                    count += 1;
                }
                Op::Gemm { alpha, beta, trans_a, trans_b: false } => {
                    let Some(w) = ins[1] else { continue };
                    let Some(wt) = g.const_value(w).cloned() else { continue };
                    if !wt.dtype().is_float() {
                        continue;
                    }
                    let name = g.node(n).name.clone();
                    let wt2 = g.add_const(format!("{name}.weight_t"), transpose2(&wt)?);
                    g.set_input(n, 1, wt2);
                    g.node_mut(n).op = Op::Gemm { alpha, beta, trans_a, trans_b: true };
                    count += 1;
                }
                _ => {}
            }
        }
        if count > 0 {
            cx.notes.push(format!("canonicalize: {count} rewrite(s)"));
            crate::dce::Dce.run(g, cx)?;
        }
        Ok(count > 0)
    }
}
