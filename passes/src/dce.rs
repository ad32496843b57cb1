//! Dead-code elimination: removes nodes none of whose values reach a graph output.
//!
//! Needs: a verified graph. Keeps: every graph input (even unused: it is part of the
//! signature) and every value a graph output depends on.

use crate::manager::{Pass, PassCtx};
use sqil_ir::{Graph, Op, Result};
use std::collections::HashSet;

pub struct Dce;

impl Pass for Dce {
    fn name(&self) -> &'static str {
        "dce"
    }

    fn run(&self, g: &mut Graph, cx: &mut PassCtx) -> Result<bool> {
        let mut live: HashSet<_> = g.outputs.iter().map(|v| v.node).collect();
        let mut stack: Vec<_> = live.iter().copied().collect();
        while let Some(n) = stack.pop() {
            for v in g.inputs_of(n).into_iter().flatten() {
                if live.insert(v.node) {
                    stack.push(v.node);
                }
            }
        }
        let dead: Vec<_> =
            g.g.node_indices().filter(|n| !live.contains(n) && !matches!(g.node(*n).op, Op::Input)).collect();
        for &n in &dead {
            g.remove_node(n);
        }
        if !dead.is_empty() {
            cx.notes.push(format!("dce: removed {} node(s)", dead.len()));
        }
        Ok(!dead.is_empty())
    }
}
