//! The graph: a petgraph `StableDiGraph` of op nodes; an edge carries one value from an output
//! slot of its source to an input slot of its target.
//!
//! Graph inputs are `Input` nodes and initializers are `Const` nodes, so every value has exactly
//! one producer. Node indices stay valid across removals (the graph is "stable"), which lets
//! passes hold them while they rewrite.

use crate::error::{IrError, Result};
use crate::ops::Op;
use crate::shape::ValueType;
use petgraph::stable_graph::{NodeIndex, StableDiGraph};
use petgraph::visit::{EdgeRef, IntoEdgeReferences};
use petgraph::Direction;
use std::collections::HashMap;

pub type NodeId = NodeIndex;

/// One output of one node: the SSA value of the IR.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ValueRef {
    pub node: NodeId,
    pub slot: usize,
}

/// A named, typed output of a node.
#[derive(Clone, Debug, PartialEq)]
pub struct Value {
    pub name: String,
    pub ty: ValueType,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    /// The node's name (kept from ONNX; may be empty).
    pub name: String,
    pub op: Op,
    pub outputs: Vec<Value>,
}

/// Carries output `from` of the source node into input `to` of the target node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Edge {
    pub from: usize,
    pub to: usize,
}

#[derive(Clone, Debug, Default)]
pub struct Graph {
    pub name: String,
    pub g: StableDiGraph<Node, Edge>,
    /// The `Input` nodes, in signature order.
    pub inputs: Vec<NodeId>,
    /// The graph's results, in signature order; each is named by its value's name.
    pub outputs: Vec<ValueRef>,
}

impl Graph {
    pub fn new(name: impl Into<String>) -> Graph {
        Graph { name: name.into(), ..Graph::default() }
    }

    /// Adds a graph input named `name`.
    pub fn add_input(&mut self, name: impl Into<String>, ty: ValueType) -> ValueRef {
        let name = name.into();
        let n = self.g.add_node(Node { name: name.clone(), op: Op::Input, outputs: vec![Value { name, ty }] });
        self.inputs.push(n);
        ValueRef { node: n, slot: 0 }
    }

    /// Adds a constant whose value is named `name`.
    pub fn add_const(&mut self, name: impl Into<String>, t: crate::Tensor) -> ValueRef {
        let name = name.into();
        let ty = ValueType::fixed(t.dtype(), &t.shape);
        let n = self.g.add_node(Node { name: name.clone(), op: Op::Const(t), outputs: vec![Value { name, ty }] });
        ValueRef { node: n, slot: 0 }
    }

    /// Adds a node with the given inputs (`None` = absent optional input) and output values.
    pub fn add_node(
        &mut self,
        name: impl Into<String>,
        op: Op,
        inputs: &[Option<ValueRef>],
        outputs: Vec<Value>,
    ) -> NodeId {
        let n = self.g.add_node(Node { name: name.into(), op, outputs });
        for (to, v) in inputs.iter().enumerate() {
            if let Some(v) = v {
                self.g.add_edge(v.node, n, Edge { from: v.slot, to });
            }
        }
        n
    }

    /// Adds a single-output node whose type is inferred from its inputs.
    pub fn add_inferred(
        &mut self,
        name: impl Into<String>,
        op: Op,
        inputs: &[Option<ValueRef>],
        value_name: impl Into<String>,
    ) -> Result<ValueRef> {
        let tys: Vec<Option<ValueType>> = inputs.iter().map(|v| v.map(|v| self.value(v).ty.clone())).collect();
        let consts: Vec<Option<&crate::Tensor>> = inputs.iter().map(|v| v.and_then(|v| self.const_value(v))).collect();
        let ty_refs: Vec<Option<&ValueType>> = tys.iter().map(Option::as_ref).collect();
        let ty = op.infer(&ty_refs, &consts, 1)?.remove(0);
        let n = self.add_node(name, op, inputs, vec![Value { name: value_name.into(), ty }]);
        Ok(ValueRef { node: n, slot: 0 })
    }

    pub fn node(&self, n: NodeId) -> &Node {
        &self.g[n]
    }

    pub fn node_mut(&mut self, n: NodeId) -> &mut Node {
        &mut self.g[n]
    }

    pub fn value(&self, v: ValueRef) -> &Value {
        &self.g[v.node].outputs[v.slot]
    }

    pub fn value_mut(&mut self, v: ValueRef) -> &mut Value {
        &mut self.g[v.node].outputs[v.slot]
    }

    /// The tensor of a value produced by a `Const` node.
    pub fn const_value(&self, v: ValueRef) -> Option<&crate::Tensor> {
        match &self.g[v.node].op {
            Op::Const(t) => Some(t),
            _ => None,
        }
    }

    /// The node's inputs by slot; `None` for an absent optional input.
    pub fn inputs_of(&self, n: NodeId) -> Vec<Option<ValueRef>> {
        let mut v: Vec<Option<ValueRef>> = vec![];
        for e in self.g.edges_directed(n, Direction::Incoming) {
            let w = e.weight();
            if v.len() <= w.to {
                v.resize(w.to + 1, None);
            }
            v[w.to] = Some(ValueRef { node: e.source(), slot: w.from });
        }
        v
    }

    /// Every `(consumer node, input slot)` that reads value `v`.
    pub fn uses_of(&self, v: ValueRef) -> Vec<(NodeId, usize)> {
        let mut u: Vec<(NodeId, usize)> = self
            .g
            .edges_directed(v.node, Direction::Outgoing)
            .filter(|e| e.weight().from == v.slot)
            .map(|e| (e.target(), e.weight().to))
            .collect();
        u.sort();
        u
    }

    /// Makes every reader of `old` (nodes and graph outputs) read `new` instead. A graph output
    /// keeps its name: `new` is renamed unless it is a graph input, in which case an `Identity`
    /// carries the name.
    pub fn replace_uses(&mut self, old: ValueRef, new: ValueRef) {
        if old == new {
            return;
        }
        let edges: Vec<_> = self
            .g
            .edges_directed(old.node, Direction::Outgoing)
            .filter(|e| e.weight().from == old.slot)
            .map(|e| (e.id(), e.target(), e.weight().to))
            .collect();
        for (id, target, to) in edges {
            self.g.remove_edge(id);
            self.g.add_edge(new.node, target, Edge { from: new.slot, to });
        }
        if self.outputs.contains(&old) {
            let name = self.value(old).name.clone();
            let carrier = if matches!(self.g[new.node].op, Op::Input) || self.outputs.contains(&new) {
                let ty = self.value(new).ty.clone();
                self.value_mut(old).name = format!("{name}.replaced");
                let n = self.add_node(
                    format!("{name}.identity"),
                    Op::Identity,
                    &[Some(new)],
                    vec![Value { name: name.clone(), ty }],
                );
                ValueRef { node: n, slot: 0 }
            } else {
                self.value_mut(old).name = format!("{name}.replaced");
                self.value_mut(new).name = name;
                new
            };
            for o in self.outputs.iter_mut().filter(|o| **o == old) {
                *o = carrier;
            }
        }
    }

    /// Makes input `slot` of node `n` read `v` (replacing whatever it read before).
    pub fn set_input(&mut self, n: NodeId, slot: usize, v: ValueRef) {
        let old: Vec<_> =
            self.g.edges_directed(n, Direction::Incoming).filter(|e| e.weight().to == slot).map(|e| e.id()).collect();
        for id in old {
            self.g.remove_edge(id);
        }
        self.g.add_edge(v.node, n, Edge { from: v.slot, to: slot });
    }

    /// Removes a node and its edges; its values must have no remaining readers.
    pub fn remove_node(&mut self, n: NodeId) {
        self.inputs.retain(|&i| i != n);
        self.g.remove_node(n);
    }

    /// Nodes in a topological order (ties broken by node index, so the order is deterministic).
    pub fn topo_order(&self) -> Result<Vec<NodeId>> {
        let mut indeg: HashMap<NodeId, usize> = self.g.node_indices().map(|n| (n, 0)).collect();
        for e in self.g.edge_references() {
            *indeg.get_mut(&e.target()).expect("node exists") += 1;
        }
        let mut ready: std::collections::BTreeSet<NodeId> =
            indeg.iter().filter(|(_, &d)| d == 0).map(|(&n, _)| n).collect();
        let mut order = Vec::with_capacity(indeg.len());
        while let Some(n) = ready.pop_first() {
            order.push(n);
            for e in self.g.edges_directed(n, Direction::Outgoing) {
                let d = indeg.get_mut(&e.target()).expect("node exists");
                *d -= 1;
                if *d == 0 {
                    ready.insert(e.target());
                }
            }
        }
        if order.len() != self.g.node_count() {
            let stuck: Vec<String> =
                indeg.iter().filter(|(n, _)| !order.contains(n)).map(|(&n, _)| self.describe(n)).take(5).collect();
            return Err(IrError::Internal(format!("graph has a cycle through {}", stuck.join(", "))));
        }
        Ok(order)
    }

    /// "node `name` (Op)" for error messages.
    pub fn describe(&self, n: NodeId) -> String {
        let node = &self.g[n];
        if node.name.is_empty() {
            format!("{} node producing `{}`", node.op.name(), node.outputs.first().map_or("?", |v| v.name.as_str()))
        } else {
            format!("{} node `{}`", node.op.name(), node.name)
        }
    }

    /// Finds a value by name.
    pub fn find_value(&self, name: &str) -> Option<ValueRef> {
        self.g
            .node_indices()
            .find_map(|n| self.g[n].outputs.iter().position(|v| v.name == name).map(|slot| ValueRef { node: n, slot }))
    }

    /// Number of non-Input, non-Const nodes.
    pub fn op_count(&self) -> usize {
        self.g.node_weights().filter(|n| !matches!(n.op, Op::Input | Op::Const(_))).count()
    }

    /// Re-infers the output types of node `n` from its inputs and stores them.
    pub fn reinfer(&mut self, n: NodeId) -> Result<bool> {
        if matches!(self.g[n].op, Op::Input) {
            return Ok(false);
        }
        let ins = self.inputs_of(n);
        let tys: Vec<Option<ValueType>> = ins.iter().map(|v| v.map(|v| self.value(v).ty.clone())).collect();
        let ty_refs: Vec<Option<&ValueType>> = tys.iter().map(Option::as_ref).collect();
        let consts: Vec<Option<&crate::Tensor>> = ins.iter().map(|v| v.and_then(|v| self.const_value(v))).collect();
        let nout = self.g[n].outputs.len();
        let new =
            self.g[n].op.infer(&ty_refs, &consts, nout).map_err(|e| e.context(format!("in {}", self.describe(n))))?;
        let mut changed = false;
        for (v, t) in self.g[n].outputs.iter_mut().zip(new) {
            if v.ty != t {
                v.ty = t;
                changed = true;
            }
        }
        Ok(changed)
    }
}

/// Structural equality of two graphs: same signature, and the same nodes (name, op, outputs)
/// with the same wiring, compared in topological order. Node indices need not agree.
pub fn graphs_equal(a: &Graph, b: &Graph) -> Result<bool> {
    if a.name != b.name || a.inputs.len() != b.inputs.len() || a.outputs.len() != b.outputs.len() {
        return Ok(false);
    }
    let (oa, ob) = (a.topo_order()?, b.topo_order()?);
    if oa.len() != ob.len() {
        return Ok(false);
    }
    // Nodes are matched by value names, which are unique per graph.
    let key = |g: &Graph, v: ValueRef| g.value(v).name.clone();
    let mut bmap: HashMap<String, NodeId> = HashMap::new();
    for &n in &ob {
        for v in &b.g[n].outputs {
            bmap.insert(v.name.clone(), n);
        }
    }
    for &n in &oa {
        let na = &a.g[n];
        let Some(&m) = na.outputs.first().and_then(|v| bmap.get(&v.name)) else { return Ok(false) };
        let nb = &b.g[m];
        if na != nb {
            return Ok(false);
        }
        let ia: Vec<Option<String>> = a.inputs_of(n).into_iter().map(|v| v.map(|v| key(a, v))).collect();
        let ib: Vec<Option<String>> = b.inputs_of(m).into_iter().map(|v| v.map(|v| key(b, v))).collect();
        if ia != ib {
            return Ok(false);
        }
    }
    let names = |g: &Graph, vs: &[ValueRef]| vs.iter().map(|&v| key(g, v)).collect::<Vec<_>>();
    let ins = |g: &Graph| g.inputs.iter().map(|&n| g.g[n].outputs[0].name.clone()).collect::<Vec<_>>();
    Ok(names(a, &a.outputs) == names(b, &b.outputs) && ins(a) == ins(b))
}
