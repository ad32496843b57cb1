//! Lowering: a verified FakeQuant simulation graph (what `sqil quantize` and `sqil compile`
//! write) becomes the [`Plan`] every back end consumes: a static list of steps over numbered
//! value slots, int4 layers packed ([`Step::Q4Linear`]), constant subgraphs folded, each slot's
//! last reader, and whether a batch may run sample by sample. Nothing here executes a policy:
//! the CPU runtime (`sqil-runtime`) runs a plan, the C and CUDA back ends print it.
//!
//! The int4 steps' arithmetic is defined once, in `sqil_ir::lowered` (which nodes are such
//! steps, and how they compute); the reference interpreter uses the same definition, so the
//! simulation and every back end agree bit for bit on them.

pub mod plan;

pub use plan::{dequantized_weight, layer_weight, per_sample, ConvTable, Plan, Step, WeightLayout, PLAN_TOL};
pub use sqil_ir::lowered::ActQuant;
