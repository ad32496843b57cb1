//! Graph passes and the pass manager. Each pass is one file with a `//!` header saying what it
//! changes and which invariants it needs and keeps; every pass is listed once in [`registry`],
//! so tools can list, select or skip passes by name.

pub mod const_fold;
pub mod dce;
pub mod manager;
pub mod shape_infer;

pub use manager::{Pass, PassCtx, PassManager, PassStat};

/// Every pass, by its kebab-case name, in the default pipeline order.
pub fn registry() -> Vec<Box<dyn Pass>> {
    vec![Box::new(shape_infer::ShapeInfer), Box::new(const_fold::ConstFold::default()), Box::new(dce::Dce)]
}

/// The pass named `name`, if any.
pub fn pass_by_name(name: &str) -> Option<Box<dyn Pass>> {
    registry().into_iter().find(|p| p.name() == name)
}

/// The clean-up pipeline run after import: shape inference, constant folding, dead code.
pub fn cleanup_pipeline() -> PassManager {
    PassManager::new(registry())
}
