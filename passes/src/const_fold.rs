//! Constant folding: evaluates with the reference interpreter every node whose inputs are all
//! constants, and `Shape` of values whose shape is fully known, replacing them by `Const`s.
//!
//! Needs: a verified graph. Keeps: value names (the constant takes the folded value's name),
//! graph outputs, numerics (folding uses the same op semantics as the interpreter). Results
//! larger than `max_elements` are left unfolded, so a fold never bloats the model.
//! DequantizeLinear of constant integers (a quantized weight) is kept unless
//! `fold_dequantize` is set: folding it would undo the quantization.

use crate::manager::{Pass, PassCtx};
use sqil_ir::{Data, Graph, Op, Result, Tensor, ValueRef};

pub struct ConstFold {
    pub max_elements: usize,
    pub fold_dequantize: bool,
}

impl Default for ConstFold {
    fn default() -> Self {
        ConstFold { max_elements: 1 << 20, fold_dequantize: false }
    }
}

impl Pass for ConstFold {
    fn name(&self) -> &'static str {
        "const-fold"
    }

    fn run(&self, g: &mut Graph, cx: &mut PassCtx) -> Result<bool> {
        let mut folded = 0;
        for n in g.topo_order()? {
            let node = g.node(n);
            if !node.op.is_foldable() || (matches!(node.op, Op::DequantizeLinear { .. }) && !self.fold_dequantize) {
                continue;
            }
            let ins = g.inputs_of(n);
            let outs: Vec<Tensor> = if let (Op::Shape { start, end }, Some(Some(x))) = (&node.op, ins.first()) {
                let Some(shape) = g.value(*x).ty.known_shape() else { continue };
                let (s, e) = sqil_ir::ops::shape_range(shape.len(), *start, *end);
                vec![Tensor::new(vec![e - s], Data::I64(shape[s..e].iter().map(|&d| d as i64).collect()))?]
            } else {
                let consts: Option<Vec<Option<&Tensor>>> =
                    ins.iter().map(|v| v.map(|v| g.const_value(v)).map_or(Some(None), |c| c.map(Some))).collect();
                let Some(args) = consts else { continue };
                // An op reading no constant at all (none exist today) is left alone.
                if args.iter().all(Option::is_none) {
                    continue;
                }
                match node.op.eval(&args, node.outputs.len()) {
                    Ok(t) => t,
                    // Leave the node for run time to report, with its full context.
                    Err(_) => continue,
                }
            };
            if outs.iter().any(|t| t.len() > self.max_elements) {
                continue;
            }
            let names: Vec<String> = g.node(n).outputs.iter().map(|v| v.name.clone()).collect();
            let mut consts = vec![];
            for (slot, (t, name)) in outs.into_iter().zip(names).enumerate() {
                let c = g.add_const(format!("{name}.folded"), t);
                g.replace_uses(ValueRef { node: n, slot }, c);
                consts.push((c, name));
            }
            g.remove_node(n);
            // The folded node is gone: its constants take over the value names.
            for (c, name) in consts {
                g.node_mut(c.node).name = name.clone();
                g.value_mut(c).name = name;
            }
            folded += 1;
        }
        if folded > 0 {
            cx.notes.push(format!("const-fold: folded {folded} node(s)"));
        }
        Ok(folded > 0)
    }
}
