//! DAG-aware extraction in linear time. egg's tree-cost extractor counts a value read twice as
//! computed twice. Here a node costs its own cost plus each child's cost divided by the child's
//! readers in the input graph (a value read by two kernels is paid half by each: once overall),
//! relaxed to a fixed point over the classes in a post-order of the class graph (children first),
//! so a DAG settles in one pass and a second confirms it: linear in the e-graph's size (a chain
//! of 8000 nodes extracts in milliseconds; the former per-class sets of every needed class were
//! quadratic in memory and cubic in time on chains). The exact DAG cost of a choice (each needed
//! class once) is then one walk from the roots ([`Extraction::dag_cost`]); the pass keeps the
//! input when the result is not cheaper.

use super::lang::{EGraph, FuseLang};
use egg::{Id, Language};
use std::collections::{HashMap, HashSet};

/// The cost of running one e-node as a kernel: a launch plus writing its result (elements).
/// Leaves (inputs, constants, opaque values) and attribute/`none` nodes cost nothing here.
pub fn node_cost(eg: &EGraph, class: Id, node: &FuseLang) -> f64 {
    match node {
        FuseLang::Leaf(_) | FuseLang::None => 0.0,
        _ => 1.0 + eg[class].data.elems,
    }
}

pub struct Extraction {
    /// The chosen node of every class that has one.
    pub choice: HashMap<Id, FuseLang>,
}

impl Extraction {
    /// The DAG cost of computing all of `roots` with the chosen nodes: each needed class once.
    pub fn dag_cost(&self, eg: &EGraph, roots: &[Id]) -> f64 {
        let mut seen = HashSet::new();
        let mut stack: Vec<Id> = roots.iter().map(|r| eg.find(*r)).collect();
        let mut total = 0.0;
        while let Some(c) = stack.pop() {
            if !seen.insert(c) {
                continue;
            }
            let Some(n) = self.choice.get(&c) else { continue };
            total += node_cost(eg, c, n);
            stack.extend(n.children().iter().map(|k| eg.find(*k)));
        }
        total
    }
}

/// The classes in a post-order of the class graph (every node's children), children first where
/// the graph has no cycle.
fn post_order(eg: &EGraph) -> Vec<Id> {
    let mut state: HashMap<Id, bool> = HashMap::new(); // false: open, true: done
    let mut order = Vec::with_capacity(eg.number_of_classes());
    for class in eg.classes() {
        if state.contains_key(&class.id) {
            continue;
        }
        // Iterative DFS: (class, next child index over all its nodes' children).
        let kids = |id: Id| -> Vec<Id> {
            eg[id].iter().flat_map(|n| n.children().iter().map(|c| eg.find(*c))).collect::<Vec<_>>()
        };
        let mut stack: Vec<(Id, Vec<Id>, usize)> = vec![(class.id, kids(class.id), 0)];
        state.insert(class.id, false);
        while let Some((id, ks, i)) = stack.last_mut() {
            if *i < ks.len() {
                let k = ks[*i];
                *i += 1;
                if let std::collections::hash_map::Entry::Vacant(e) = state.entry(k) {
                    e.insert(false);
                    stack.push((k, kids(k), 0));
                }
            } else {
                state.insert(*id, true);
                order.push(*id);
                stack.pop();
            }
        }
    }
    order
}

/// Runs the extraction. `prefer` picks, among nodes of equal cost, the first in the class for
/// which it returns true (the input's own node, so ties keep the input).
pub fn extract(eg: &EGraph, prefer: impl Fn(&FuseLang) -> bool) -> Extraction {
    let order = post_order(eg);
    let mut cost: HashMap<Id, f64> = HashMap::new();
    let mut choice: HashMap<Id, FuseLang> = HashMap::new();
    // A DAG settles in the first pass; cycles (possible in an e-graph) get a bounded number more.
    for _ in 0..64 {
        let mut changed = false;
        for &id in &order {
            for node in eg[id].iter() {
                let mut total = node_cost(eg, id, node);
                let mut ok = true;
                for ch in node.children() {
                    let c = eg.find(*ch);
                    match cost.get(&c) {
                        Some(v) if c != id => total += v / (eg[c].data.uses.max(1) as f64),
                        _ => {
                            ok = false;
                            break;
                        }
                    }
                }
                if !ok {
                    continue;
                }
                let better = match cost.get(&id) {
                    None => true,
                    Some(&c) => total < c - 1e-9 || (total <= c + 1e-9 && prefer(node) && !prefer(&choice[&id])),
                };
                if better {
                    cost.insert(id, total);
                    choice.insert(id, node.clone());
                    changed = true;
                }
            }
        }
        if !changed {
            break;
        }
    }
    Extraction { choice }
}
