//! Graph passes and the pass manager. Each pass is one file with a `//!` header saying what it
//! changes and which invariants it needs and keeps; every pass is listed once in [`registry`],
//! so tools can list, select or skip passes by name.

pub mod canonicalize;
pub mod const_fold;
pub mod dce;
pub mod fold_batchnorm;
pub mod fuse;
pub mod grad;
pub mod insert_fake_quant;
pub mod lower_quant;
pub mod manager;
pub mod quant;
pub mod shape_infer;
pub mod widen_half;

pub use manager::{Pass, PassCtx, PassManager, PassStat};

/// Every pass, by its kebab-case name: the clean-up pipeline first, then the others.
pub fn registry() -> Vec<Box<dyn Pass>> {
    vec![
        Box::new(shape_infer::ShapeInfer),
        Box::new(const_fold::ConstFold::default()),
        Box::new(dce::Dce),
        Box::new(fold_batchnorm::FoldBatchNorm),
        Box::new(canonicalize::Canonicalize),
        Box::new(insert_fake_quant::InsertFakeQuant::default()),
        Box::new(lower_quant::LowerQuant),
        Box::new(fuse::Fuse::default()),
        Box::new(widen_half::WidenHalf),
    ]
}

/// The clean-up passes (the default pipeline after import).
const CLEANUP: [&str; 3] = ["shape-infer", "const-fold", "dce"];

/// Canonicalisation: clean-up, BatchNorm folding, canonical forms, clean-up again.
pub const CANONICALIZE: [&str; 6] = ["shape-infer", "const-fold", "dce", "fold-batchnorm", "canonicalize", "dce"];

/// The pass named by `spec`: a name, or `name(settings)` for a configurable pass
/// (`insert-fake-quant(wbits=4 abits=8 group=64)`).
pub fn pass_by_name(spec: &str) -> sqil_ir::Result<Option<Box<dyn Pass>>> {
    let (name, args) = match spec.split_once('(') {
        Some((n, rest)) => {
            let args = rest
                .strip_suffix(')')
                .ok_or_else(|| sqil_ir::IrError::Invalid(format!("pass spec `{spec}`: missing `)`")))?;
            (n.trim(), Some(args))
        }
        None => (spec.trim(), None),
    };
    match (name, args) {
        ("insert-fake-quant", Some(a)) => {
            let mut config = quant::QuantConfig::default();
            config.apply_settings(a)?;
            Ok(Some(Box::new(insert_fake_quant::InsertFakeQuant { config })))
        }
        (_, Some(_)) => Err(sqil_ir::IrError::Invalid(format!("pass `{name}` takes no settings"))),
        (_, None) => Ok(registry().into_iter().find(|p| p.name() == name)),
    }
}

/// The clean-up pipeline run after import: shape inference, constant folding, dead code.
pub fn cleanup_pipeline() -> PassManager {
    PassManager::from_names(&CLEANUP).expect("clean-up passes are registered")
}
