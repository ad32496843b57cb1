//! The e-graph language of fusion and the IR <-> e-graph mapping. Ops that fusion knows are
//! structured nodes (their attributes in an `a:` leaf); every other value is an opaque leaf
//! (`v:<node>:<slot>`), so rewrites never look inside what they cannot fuse. A `fused:` node
//! carries its kernel and stages (the IR's `Fused` encoding) in its symbol; its children are
//! the kernel's inputs.

use egg::{define_language, Id, Symbol};
use sqil_ir::ops::fused::{Arg, Fused, Stage};
use sqil_ir::ops::{BinaryOp, UnaryOp};
use sqil_ir::{Dim, Graph, NodeId, Op, Result, ValueRef};
use std::collections::HashMap;

define_language! {
    pub enum FuseLang {
        "gemm" = Gemm([Id; 4]),
        "matmul" = MatMul([Id; 3]),
        "conv" = Conv([Id; 4]),
        "add" = Add([Id; 2]),
        "relu" = Relu(Id),
        "tanh" = Tanh(Id),
        "sigmoid" = Sigmoid(Id),
        "gelu" = Gelu([Id; 2]),
        "leaky" = Leaky([Id; 2]),
        "clip" = Clip([Id; 3]),
        "dq" = Dq([Id; 4]),
        "q" = Q([Id; 4]),
        "none" = None,
        Fused(Symbol, Vec<Id>),
        Leaf(Symbol),
    }
}

/// What the rules need to know of an e-class of the input graph: how many readers its value
/// has (graph outputs count) and how many elements it holds (symbolic dims count as 1).
/// Classes made by rewrites start at zero and take the maximum on merge.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ClassInfo {
    pub uses: usize,
    pub elems: f64,
}

#[derive(Default)]
pub struct Info;

impl egg::Analysis<FuseLang> for Info {
    type Data = ClassInfo;

    fn make(_: &mut egg::EGraph<FuseLang, Info>, _: &FuseLang, _: Id) -> ClassInfo {
        ClassInfo::default()
    }

    fn merge(&mut self, a: &mut ClassInfo, b: ClassInfo) -> egg::DidMerge {
        let old = *a;
        a.uses = a.uses.max(b.uses);
        a.elems = a.elems.max(b.elems);
        egg::DidMerge(*a != old, b != *a)
    }
}

pub type EGraph = egg::EGraph<FuseLang, Info>;

/// An `a:` leaf symbol holding one op (encoded as a one-stage Fused).
pub fn op_symbol(op: &Op) -> Result<Symbol> {
    let f = Fused { kernel: "op".into(), stages: vec![Stage { op: op.clone(), args: vec![] }] };
    Ok(Symbol::from(format!("a:{}", f.encode()?)))
}

/// The op in an `a:` leaf.
pub fn symbol_op(s: Symbol) -> Option<Op> {
    let text = s.as_str().strip_prefix("a:")?;
    Fused::decode("op", text).ok().map(|f| f.stages.into_iter().next().expect("one stage").op)
}

pub fn fused_symbol(f: &Fused) -> Result<Symbol> {
    Ok(Symbol::from(format!("fused:{}:{}", f.kernel, f.encode()?)))
}

pub fn symbol_fused(s: Symbol) -> Option<Fused> {
    let text = s.as_str().strip_prefix("fused:")?;
    let (kernel, stages) = text.split_once(':')?;
    Fused::decode(kernel, stages).ok()
}

/// The e-graph of a graph, with the maps back to IR values.
pub struct Mapped {
    pub egraph: EGraph,
    /// The e-class of every IR value.
    pub class_of: HashMap<ValueRef, Id>,
    pub none: Id,
    /// The classes that opaque nodes (leaves) read: values the graph needs besides its outputs
    /// (the rewrites cannot see through a leaf to its inputs, so extraction roots them too).
    pub opaque_reads: Vec<Id>,
}

fn structured(op: &Op, a: Id, ins: &[Id], none: Id) -> Option<FuseLang> {
    let at = |i: usize| ins.get(i).copied().unwrap_or(none);
    Some(match op {
        Op::Gemm { .. } => FuseLang::Gemm([a, at(0), at(1), at(2)]),
        Op::MatMul => FuseLang::MatMul([a, at(0), at(1)]),
        Op::Conv(_) => FuseLang::Conv([a, at(0), at(1), at(2)]),
        Op::Binary(BinaryOp::Add) => FuseLang::Add([at(0), at(1)]),
        Op::Unary(UnaryOp::Relu) => FuseLang::Relu(at(0)),
        Op::Unary(UnaryOp::Tanh) => FuseLang::Tanh(at(0)),
        Op::Unary(UnaryOp::Sigmoid) => FuseLang::Sigmoid(at(0)),
        Op::Gelu { .. } => FuseLang::Gelu([a, at(0)]),
        Op::LeakyRelu { .. } => FuseLang::Leaky([a, at(0)]),
        Op::Clip => FuseLang::Clip([at(0), at(1), at(2)]),
        Op::DequantizeLinear { .. } => FuseLang::Dq([a, at(0), at(1), at(2)]),
        Op::QuantizeLinear { .. } => FuseLang::Q([a, at(0), at(1), at(2)]),
        _ => return None,
    })
}

/// Builds the e-graph of `g` (nodes in topological order).
pub fn build(g: &Graph) -> Result<Mapped> {
    let mut egraph = EGraph::default();
    let none = egraph.add(FuseLang::None);
    let mut class_of = HashMap::new();
    let mut opaque_reads = vec![];
    for n in g.topo_order()? {
        let node = g.node(n);
        let ins: Vec<Option<ValueRef>> = g.inputs_of(n);
        let in_ids: Vec<Id> = ins.iter().map(|v| v.map_or(none, |v| class_of[&v])).collect();
        let single = node.outputs.len() == 1 && ins.len() <= 4;
        let enode = if single {
            let a = egraph.add(FuseLang::Leaf(op_symbol_or_plain(&node.op)));
            structured(&node.op, a, &in_ids, none)
        } else {
            None
        };
        match enode {
            Some(e) => {
                let id = egraph.add(e);
                class_of.insert(ValueRef { node: n, slot: 0 }, id);
            }
            None => {
                opaque_reads.extend(in_ids.iter().copied().filter(|&c| c != none));
                for slot in 0..node.outputs.len() {
                    let id = egraph.add(FuseLang::Leaf(leaf_symbol(n, slot)));
                    class_of.insert(ValueRef { node: n, slot }, id);
                }
            }
        }
    }
    for (vr, &id) in &class_of {
        let v = g.value(*vr);
        let elems: f64 = v.ty.shape.iter().map(|d| if let Dim::Known(k) = d { *k as f64 } else { 1.0 }).product();
        let uses = g.uses_of(*vr).len() + g.outputs.iter().filter(|o| *o == vr).count();
        let info = &mut egraph[id].data;
        info.uses += uses; // values merged by hash-consing (CSE) add up
        info.elems = elems;
    }
    egraph.rebuild();
    Ok(Mapped { egraph, class_of, none, opaque_reads })
}

fn op_symbol_or_plain(op: &Op) -> Symbol {
    op_symbol(op).unwrap_or_else(|_| Symbol::from("a:?"))
}

pub fn leaf_symbol(n: NodeId, slot: usize) -> Symbol {
    Symbol::from(format!("v:{}:{slot}", n.index()))
}

/// The op held by an attribute class (its `a:` leaf).
pub fn attr_op(eg: &EGraph, a: Id) -> Option<Op> {
    eg[a].nodes.iter().find_map(|n| match n {
        FuseLang::Leaf(s) => symbol_op(*s),
        _ => None,
    })
}

/// The op and stage inputs an e-node stands for (structured nodes only): the op from its
/// attribute leaf, and its children as inputs.
pub fn as_stage(eg: &EGraph, node: &FuseLang) -> Option<(Op, Vec<Id>)> {
    let attr_op = |a: Id| attr_op(eg, a);
    Some(match node {
        FuseLang::Gemm([a, x, w, c]) => (attr_op(*a)?, vec![*x, *w, *c]),
        FuseLang::MatMul([a, x, w]) => (attr_op(*a)?, vec![*x, *w]),
        FuseLang::Conv([a, x, w, b]) => (attr_op(*a)?, vec![*x, *w, *b]),
        FuseLang::Add([x, y]) => (Op::Binary(BinaryOp::Add), vec![*x, *y]),
        FuseLang::Relu(x) => (Op::Unary(UnaryOp::Relu), vec![*x]),
        FuseLang::Tanh(x) => (Op::Unary(UnaryOp::Tanh), vec![*x]),
        FuseLang::Sigmoid(x) => (Op::Unary(UnaryOp::Sigmoid), vec![*x]),
        FuseLang::Gelu([a, x]) | FuseLang::Leaky([a, x]) => (attr_op(*a)?, vec![*x]),
        FuseLang::Clip([x, lo, hi]) => (Op::Clip, vec![*x, *lo, *hi]),
        FuseLang::Dq([a, x, s, z]) | FuseLang::Q([a, x, s, z]) => (attr_op(*a)?, vec![*x, *s, *z]),
        _ => return None,
    })
}

/// Stage arguments for e-class inputs: `none` becomes an absent input, others are numbered.
pub fn stage_args(eg: &EGraph, none: Id, ins: &[Id], inputs: &mut Vec<Id>) -> Vec<Option<Arg>> {
    ins.iter()
        .map(|&c| {
            let c = eg.find(c);
            if c == eg.find(none) {
                return None;
            }
            let k = inputs.iter().position(|&i| eg.find(i) == c).unwrap_or_else(|| {
                inputs.push(c);
                inputs.len() - 1
            });
            Some(Arg::Input(k))
        })
        .collect()
}
