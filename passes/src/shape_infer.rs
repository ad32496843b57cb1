//! Shape inference: recomputes every node's output types from its inputs, in topological
//! order, so types refined upstream (a now-constant shape, a known dimension) flow down.
//!
//! Needs: a structurally valid graph. Keeps: dtypes and ranks; dimensions only become more
//! precise, except that a dimension declared by the model but not derivable stays as declared.

use crate::manager::{Pass, PassCtx};
use sqil_ir::{Dim, Graph, Result};

pub struct ShapeInfer;

impl Pass for ShapeInfer {
    fn name(&self) -> &'static str {
        "shape-infer"
    }

    fn run(&self, g: &mut Graph, cx: &mut PassCtx) -> Result<bool> {
        let mut changed = 0;
        for n in g.topo_order()? {
            let before: Vec<_> = g.node(n).outputs.iter().map(|v| v.ty.clone()).collect();
            g.reinfer(n)?;
            // Keep declared dimensions the rule cannot derive (e.g. a named batch from value_info).
            for (v, old) in g.node_mut(n).outputs.iter_mut().zip(&before) {
                if v.ty.rank() == old.rank() {
                    for (d, o) in v.ty.shape.iter_mut().zip(&old.shape) {
                        if *d == Dim::Unknown && *o != Dim::Unknown {
                            *d = o.clone();
                        }
                    }
                }
            }
            if g.node(n).outputs.iter().zip(&before).any(|(v, o)| v.ty != *o) {
                changed += 1;
            }
        }
        if changed > 0 {
            cx.notes.push(format!("shape-infer: refined {changed} node(s)"));
        }
        Ok(changed > 0)
    }
}
