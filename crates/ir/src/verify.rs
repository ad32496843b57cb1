//! The verifier: structural invariants (acyclic, no dangling or doubled edges, unique value
//! names, a well-formed signature) and types (every node's stored output types agree with what
//! its type rule infers). Passes run it after every change; a failure is an internal error.

use crate::error::{IrError, Result};
use crate::graph::Graph;
use crate::ops::Op;
use crate::shape::{Dim, ValueType};
use petgraph::visit::EdgeRef;
use petgraph::Direction;
use std::collections::HashSet;

/// [`verify`] on a graph read from the user's file (IR text, an artifact, an import): a broken
/// invariant there is the file's fault, not sqil's, so it is reported as invalid input
/// ("the graph is malformed: ...") rather than as an internal error.
pub fn verify_input(g: &Graph) -> Result<()> {
    fn to_invalid(e: IrError) -> IrError {
        match e {
            IrError::Internal(m) => IrError::Invalid(format!("the graph is malformed: {m}")),
            IrError::Context { context, source } => IrError::Context { context, source: Box::new(to_invalid(*source)) },
            e => e,
        }
    }
    verify(g).map_err(to_invalid)
}

/// Checks every invariant of `g`; the error names the first offending node or value.
pub fn verify(g: &Graph) -> Result<()> {
    let order = g.topo_order()?;
    let mut names = HashSet::new();
    for &n in &order {
        let node = g.node(n);
        let what = || g.describe(n);
        if let Some(k) = node.op.fixed_outputs() {
            if node.outputs.len() != k {
                return Err(IrError::Internal(format!(
                    "{} has {} outputs, its op has {k}",
                    what(),
                    node.outputs.len()
                )));
            }
        }
        if node.outputs.is_empty() {
            return Err(IrError::Internal(format!("{} has no outputs", what())));
        }
        for v in &node.outputs {
            if v.name.is_empty() || !names.insert(v.name.as_str()) {
                return Err(IrError::Internal(format!("{}: value name `{}` is empty or not unique", what(), v.name)));
            }
        }
        let mut slots = HashSet::new();
        for e in g.g.edges_directed(n, Direction::Incoming) {
            let src = g.node(e.source());
            if e.weight().from >= src.outputs.len() {
                return Err(IrError::Internal(format!(
                    "{} reads output {} of {}, which has {}",
                    what(),
                    e.weight().from,
                    g.describe(e.source()),
                    src.outputs.len()
                )));
            }
            if !slots.insert(e.weight().to) {
                return Err(IrError::Internal(format!("{} has two edges into input {}", what(), e.weight().to)));
            }
        }
        match &node.op {
            Op::Input => {
                if !slots.is_empty() || !g.inputs.contains(&n) {
                    return Err(IrError::Internal(format!("{} is not a well-formed graph input", what())));
                }
            }
            Op::Const(t) => {
                if node.outputs[0].ty != ValueType::fixed(t.dtype(), &t.shape) {
                    return Err(IrError::Internal(format!(
                        "{}: type {} disagrees with its tensor",
                        what(),
                        node.outputs[0].ty
                    )));
                }
            }
            op => {
                let ins = g.inputs_of(n);
                let tys: Vec<Option<&ValueType>> = ins.iter().map(|v| v.map(|v| &g.value(v).ty)).collect();
                let consts: Vec<_> = ins.iter().map(|v| v.and_then(|v| g.const_value(v))).collect();
                let inferred = op
                    .infer(&tys, &consts, node.outputs.len())
                    .map_err(|e| e.context(format!("verifying {}", what())))?;
                for (v, t) in node.outputs.iter().zip(&inferred) {
                    if !compatible(&v.ty, t) {
                        return Err(IrError::Internal(format!(
                            "{}: value `{}` is typed {} but its inputs give {}",
                            what(),
                            v.name,
                            v.ty,
                            t
                        )));
                    }
                }
            }
        }
    }
    for &i in &g.inputs {
        if !g.g.contains_node(i) || !matches!(g.node(i).op, Op::Input) {
            return Err(IrError::Internal("graph input list names a node that is not an Input".into()));
        }
    }
    for o in &g.outputs {
        if !g.g.contains_node(o.node) || o.slot >= g.node(o.node).outputs.len() {
            return Err(IrError::Internal(format!("graph output {o:?} does not exist")));
        }
    }
    Ok(())
}

/// A stored type is compatible with an inferred one if dtype and rank agree and no known
/// dimension contradicts another (stored types may be more precise than the rule).
fn compatible(stored: &ValueType, inferred: &ValueType) -> bool {
    stored.dtype == inferred.dtype
        && stored.rank() == inferred.rank()
        && stored.shape.iter().zip(&inferred.shape).all(|(a, b)| match (a, b) {
            (Dim::Known(x), Dim::Known(y)) => x == y,
            _ => true,
        })
}
