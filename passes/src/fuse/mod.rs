//! `fuse`: kernel fusion with equality saturation (egg). The graph becomes an e-graph (see
//! [`lang`]); the rules of [`rules`] add fused alternatives (GEMM/conv with bias, activation,
//! residual Add, DequantizeLinear operands and a requantizing QuantizeLinear epilogue); a
//! DAG-aware extraction ([`extract`]) picks the cheapest; chosen fused kernels replace their
//! chains in the graph as `Fused` nodes, whose semantics are the chains' own, bit for bit.
//!
//! Every run is bounded (iterations, e-nodes, time) and its stop reason goes to the pass notes.
//! Needs: a verified graph. Keeps: graph outputs and their values exactly; the result never
//! costs more than the input under the cost model (a launch plus the elements written per kernel).

pub mod extract;
pub mod lang;
pub mod rules;

use crate::{Pass, PassCtx};
use egg::{Id, Runner};
use lang::{symbol_fused, FuseLang};
use sqil_ir::{Graph, Op, Result, Value, ValueRef};
use std::collections::HashMap;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Fuse {
    pub iter_limit: usize,
    pub node_limit: usize,
    pub time_limit: Duration,
}

impl Default for Fuse {
    fn default() -> Self {
        Fuse { iter_limit: 12, node_limit: 20_000, time_limit: Duration::from_secs(2) }
    }
}

/// What a fusion run did.
#[derive(Debug, Clone)]
pub struct FuseReport {
    pub stop_reason: String,
    pub iterations: usize,
    pub enodes: usize,
    pub cost_before: f64,
    pub cost_after: f64,
    /// Kernel names of the fused nodes created.
    pub kernels: Vec<String>,
}

impl Fuse {
    /// Fuses `g` in place and reports.
    pub fn fuse(&self, g: &mut Graph) -> Result<FuseReport> {
        let mapped = lang::build(g)?;
        // Everything the graph needs: its outputs and what opaque nodes read.
        let mut roots: Vec<Id> = g.outputs.iter().map(|o| mapped.class_of[o]).collect();
        roots.extend(&mapped.opaque_reads);
        let original: Vec<(ValueRef, Id)> = mapped.class_of.iter().map(|(v, c)| (*v, *c)).collect();
        // Cost of the input: the original node of every class.
        let before = {
            let eg = &mapped.egraph;
            extract::extract(eg, |_| true).dag_cost(eg, &roots)
        };
        let runner = Runner::default()
            .with_egraph(mapped.egraph)
            .with_iter_limit(self.iter_limit)
            .with_node_limit(self.node_limit)
            .with_time_limit(self.time_limit)
            .run(&rules::rules());
        let eg = &runner.egraph;
        let stop_reason = format!("{:?}", runner.stop_reason.as_ref().expect("runner ran"));
        let ex = extract::extract(eg, |n| !matches!(n, FuseLang::Fused(..)));
        let after = ex.dag_cost(eg, &roots);
        let mut report = FuseReport {
            stop_reason,
            iterations: runner.iterations.len(),
            enodes: eg.total_size(),
            cost_before: before,
            cost_after: after,
            kernels: vec![],
        };
        if after >= before {
            report.cost_after = before;
            return Ok(report);
        }
        // Replace, in topological order, every value whose class chose a fused kernel.
        let value_class: HashMap<ValueRef, Id> = original.iter().map(|(v, c)| (*v, eg.find(*c))).collect();
        let mut final_value: HashMap<Id, ValueRef> = HashMap::new();
        for n in g.topo_order()? {
            for slot in 0..g.node(n).outputs.len() {
                let v = ValueRef { node: n, slot };
                let class = value_class[&v];
                final_value.entry(class).or_insert(v);
                let Some(FuseLang::Fused(sym, children)) = ex.choice.get(&class) else { continue };
                let Some(fused) = symbol_fused(*sym) else { continue };
                let inputs: Vec<Option<ValueRef>> =
                    children.iter().map(|c| final_value.get(&eg.find(*c)).copied()).collect();
                if inputs.iter().any(Option::is_none) {
                    continue; // an input the graph does not hold as a value (cannot happen for input classes)
                }
                let name = g.node(n).name.clone();
                let value = g.value(v).clone();
                g.node_mut(n).name = format!("{name}.prefusion");
                report.kernels.push(fused.kernel.clone());
                let tmp = format!("{}.fused", value.name);
                let f = g.add_node(name, Op::Fused(Box::new(fused)), &inputs, vec![Value { name: tmp, ty: value.ty }]);
                let fv = ValueRef { node: f, slot: 0 };
                // Readers and graph outputs move to the fused value, which takes the name.
                g.replace_uses(v, fv);
                if g.value(fv).name != value.name {
                    g.value_mut(v).name = format!("{}.prefusion", value.name);
                    g.value_mut(fv).name = value.name;
                }
                final_value.insert(class, fv);
            }
        }
        Ok(report)
    }
}

impl Pass for Fuse {
    fn name(&self) -> &'static str {
        "fuse"
    }

    fn run(&self, g: &mut Graph, cx: &mut PassCtx) -> Result<bool> {
        let r = self.fuse(g)?;
        cx.notes.push(format!(
            "fuse: stopped by {} after {} iterations, {} e-nodes; cost {} -> {}; kernels: {}",
            r.stop_reason,
            r.iterations,
            r.enodes,
            r.cost_before,
            r.cost_after,
            r.kernels.join(", ")
        ));
        if !r.kernels.is_empty() {
            crate::dce::Dce.run(g, cx)?;
        }
        Ok(!r.kernels.is_empty())
    }
}
