//! DAG-aware extraction. egg's tree-cost extractor counts a value read twice as computed twice;
//! here every e-class carries the set of classes its best choice needs (with each one's own
//! cost), and a node's cost is the sum over the union of its children's sets, so a shared
//! value counts once. Greedy bottom-up to a fixed point (in the style of extraction-gym's
//! greedy-DAG extractor); the pass keeps the input when the result is not cheaper.

use super::lang::{EGraph, FuseLang};
use egg::{Id, Language};
use std::collections::{BTreeMap, HashMap};

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
    sets: HashMap<Id, BTreeMap<Id, f64>>,
}

impl Extraction {
    /// The DAG cost of computing all of `roots`: each needed class counted once.
    pub fn dag_cost(&self, eg: &EGraph, roots: &[Id]) -> f64 {
        let mut all: BTreeMap<Id, f64> = BTreeMap::new();
        for r in roots {
            if let Some(s) = self.sets.get(&eg.find(*r)) {
                all.extend(s.iter().map(|(k, v)| (*k, *v)));
            }
        }
        all.values().sum()
    }
}

/// Runs the greedy DAG extraction. `prefer` picks, among nodes of equal cost, the first in
/// the class for which it returns true (the input's own node, so ties keep the input).
pub fn extract(eg: &EGraph, prefer: impl Fn(&FuseLang) -> bool) -> Extraction {
    let mut sets: HashMap<Id, BTreeMap<Id, f64>> = HashMap::new();
    let mut choice: HashMap<Id, FuseLang> = HashMap::new();
    let mut cost: HashMap<Id, f64> = HashMap::new();
    loop {
        let mut changed = false;
        for class in eg.classes() {
            let id = class.id;
            for node in class.iter() {
                let kids: Option<Vec<&BTreeMap<Id, f64>>> =
                    node.children().iter().map(|c| sets.get(&eg.find(*c))).collect();
                let Some(kids) = kids else { continue };
                let mut set: BTreeMap<Id, f64> = BTreeMap::new();
                for k in kids {
                    set.extend(k.iter().map(|(a, b)| (*a, *b)));
                }
                if set.contains_key(&id) {
                    continue; // would read itself
                }
                set.insert(id, node_cost(eg, id, node));
                let total: f64 = set.values().sum();
                let better = match cost.get(&id) {
                    None => true,
                    Some(&c) => total < c - 1e-9 || (total <= c + 1e-9 && prefer(node) && !prefer(&choice[&id])),
                };
                if better {
                    cost.insert(id, total);
                    choice.insert(id, node.clone());
                    sets.insert(id, set);
                    changed = true;
                }
            }
        }
        if !changed {
            break;
        }
    }
    Extraction { choice, sets }
}
