//! Lowering: a verified FakeQuant simulation graph (what `sqil quantize` and `sqil compile`
//! write) becomes the [`Plan`] every back end consumes: a static list of steps over numbered
//! value slots, int4 layers packed ([`Step::Q4Linear`]), constant subgraphs folded, each slot's
//! last reader, and whether a batch may run sample by sample. Nothing here executes a policy:
//! the CPU runtime (`sqil-runtime`) runs a plan, the C and CUDA back ends print it.
//!
//! Fusion is decided once, by the fusion pass (`sqil_passes::fuse`, equality saturation):
//! [`lower`] runs it on the simulation graph and plans the fused graph, whose `Fused` nodes
//! become the plan's fused kernels ([`Plan::kernels`]); nothing in lowering or in a back end
//! matches patterns of its own to fuse.
//!
//! The int4 steps' arithmetic is defined once, in `sqil_ir::lowered` (which nodes are such
//! steps, and how they compute); the reference interpreter uses the same definition, also on
//! fused nodes, so the simulation, the fused graph and every back end agree bit for bit.

pub mod plan;

pub use plan::{
    dequantized_weight, layer_key, layer_weight, per_sample, transpose_folds, ConvTable, Fold, Kernel, Plan, Step,
    WeightLayout, PLAN_TOL,
};
pub use sqil_ir::lowered::ActQuant;
use sqil_ir::{Graph, Result};
pub use sqil_passes::fuse::FuseReport;

/// A lowered policy: the fused simulation graph (what an artifact stores; the same values as
/// the input graph, bit for bit), its plan, and what fusion did.
pub struct Lowered {
    pub graph: Graph,
    pub plan: Plan,
    pub fusion: FuseReport,
}

/// Fuses `g` (a verified simulation graph) with the fusion pass and plans the result.
pub fn lower(g: &Graph) -> Result<Lowered> {
    let mut graph = g.clone();
    let fusion = sqil_passes::fuse::Fuse::default().fuse(&mut graph)?;
    if !fusion.kernels.is_empty() {
        sqil_passes::Pass::run(&sqil_passes::dce::Dce, &mut graph, &mut sqil_passes::PassCtx::default())?;
    }
    sqil_ir::verify(&graph)?;
    let plan = Plan::with_packed(&graph, &std::collections::HashMap::new())?;
    Ok(Lowered { graph, plan, fusion })
}
