//! The reference interpreter: runs any IR graph on concrete tensors, node by node in
//! topological order, freeing each value after its last use. It is the oracle every back end
//! is compared against, so it favours clarity and exactness; heavy ops still use real GEMMs.

use crate::error::{IrError, Result};
use crate::graph::{Graph, NodeId, ValueRef};
use crate::ops::Op;
use crate::tensor::Tensor;
use std::collections::HashMap;

/// A graph prepared for repeated runs (execution order and value lifetimes computed once).
pub struct Interpreter<'g> {
    g: &'g Graph,
    order: Vec<NodeId>,
    /// For each value, the position in `order` after which it is dead.
    last_use: HashMap<ValueRef, usize>,
    /// Gemm / MatMul / Conv nodes that are int4 steps, evaluated with the step's one arithmetic
    /// definition (`crate::lowered`), as every back end runs them.
    lowered: HashMap<NodeId, crate::lowered::Q4Layer>,
}

impl<'g> Interpreter<'g> {
    pub fn new(g: &'g Graph) -> Result<Interpreter<'g>> {
        let order = g.topo_order()?;
        let mut last_use = HashMap::new();
        for (pos, &n) in order.iter().enumerate() {
            for v in g.inputs_of(n).into_iter().flatten() {
                last_use.insert(v, pos);
            }
        }
        for o in &g.outputs {
            last_use.insert(*o, usize::MAX);
        }
        let exact_float = crate::lowered::has_int_activations(g, &order);
        let mut lowered = HashMap::new();
        for (pos, &n) in order.iter().enumerate() {
            if crate::lowered::linear_site(g, n).is_none() {
                continue;
            }
            // A weight the packed format cannot hold stays the reference op (as in the plan).
            if let Ok(Some(l)) = crate::lowered::q4_layer(g, n, false, exact_float) {
                // The step reads the value before the activation quantizer.
                let e = last_use.entry(l.x).or_insert(pos);
                *e = (*e).max(pos);
                lowered.insert(n, l);
            }
        }
        Ok(Interpreter { g, order, last_use, lowered })
    }

    /// Runs the graph; `feeds` maps input names to tensors. Returns the outputs in signature order.
    pub fn run(&self, feeds: &HashMap<String, Tensor>) -> Result<Vec<Tensor>> {
        Ok(self.run_keep(feeds, &[])?.0)
    }

    /// Runs the graph and also returns the values in `keep` (intermediate results a caller
    /// observes, e.g. for calibration), in the order given.
    pub fn run_keep(&self, feeds: &HashMap<String, Tensor>, keep: &[ValueRef]) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
        let g = self.g;
        let mut kept: HashMap<ValueRef, Tensor> = HashMap::new();
        let mut env: HashMap<ValueRef, Tensor> = HashMap::new();
        for &i in &g.inputs {
            let v = &g.node(i).outputs[0];
            let t = feeds
                .get(&v.name)
                .ok_or_else(|| IrError::Invalid(format!("no value fed for graph input `{}` ({})", v.name, v.ty)))?;
            if !v.ty.admits(t.dtype(), &t.shape) {
                return Err(IrError::Invalid(format!(
                    "graph input `{}` expects {}, got {}{:?}",
                    v.name,
                    v.ty,
                    t.dtype(),
                    t.shape
                )));
            }
        }
        for name in feeds.keys() {
            if !g.inputs.iter().any(|&i| g.node(i).outputs[0].name == *name) {
                return Err(IrError::Invalid(format!("`{name}` is not an input of the graph")));
            }
        }
        for (pos, &n) in self.order.iter().enumerate() {
            let node = g.node(n);
            let outs = match &node.op {
                Op::Input => vec![feeds[&node.outputs[0].name].clone()],
                _ if self.lowered.contains_key(&n) => {
                    let l = &self.lowered[&n];
                    let x = env
                        .get(&l.x)
                        .ok_or_else(|| IrError::Internal(format!("{}: input not computed", g.describe(n))))?;
                    let (name, conv) = (g.describe(n), l.conv.as_deref());
                    let mut y = crate::lowered::run_q4_layer(&name, &l.act, &l.w, l.bias.as_deref(), conv, &[], x, 1)?;
                    if let Op::Fused(f) = &node.op {
                        // The fused kernel's epilogue stages, on the int4 step's result.
                        let ins = g.inputs_of(n);
                        let args: Vec<Option<&Tensor>> = ins.iter().map(|v| v.and_then(|v| env.get(&v))).collect();
                        y = f.eval_after(y, &args).map_err(|e| e.context(format!("evaluating {}", g.describe(n))))?;
                    }
                    if self.last_use.get(&l.x) == Some(&pos) {
                        env.remove(&l.x);
                    }
                    vec![y]
                }
                op => {
                    let ins = g.inputs_of(n);
                    let args: Vec<Option<&Tensor>> = ins.iter().map(|v| v.map(|v| &env[&v])).collect();
                    let r = op
                        .eval(&args, node.outputs.len())
                        .map_err(|e| e.context(format!("evaluating {}", g.describe(n))))?;
                    if r.len() < node.outputs.len() {
                        return Err(IrError::Internal(format!(
                            "{} produced {} outputs, expected {}",
                            g.describe(n),
                            r.len(),
                            node.outputs.len()
                        )));
                    }
                    r
                }
            };
            for (slot, t) in outs.into_iter().enumerate().take(node.outputs.len()) {
                let v = ValueRef { node: n, slot };
                if keep.contains(&v) {
                    kept.insert(v, t.clone());
                }
                if self.last_use.contains_key(&v) {
                    env.insert(v, t);
                }
            }
            for v in g.inputs_of(n).into_iter().flatten() {
                if self.last_use.get(&v) == Some(&pos) {
                    env.remove(&v);
                }
            }
        }
        let outs = g.outputs.iter().map(|o| env[o].clone()).collect();
        let kept = keep
            .iter()
            .map(|v| kept.get(v).cloned().ok_or_else(|| IrError::Invalid(format!("kept value {v:?} was not computed"))))
            .collect::<Result<_>>()?;
        Ok((outs, kept))
    }
}

/// Runs `g` once; see [`Interpreter::run`].
pub fn run(g: &Graph, feeds: &HashMap<String, Tensor>) -> Result<Vec<Tensor>> {
    Interpreter::new(g)?.run(feeds)
}
