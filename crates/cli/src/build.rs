//! `sqil build --target c`: a quantized policy (simulation graph or CPU artifact) as C99 source
//! for firmware, with an optional self-test program over given states.

use sqil_codegen::c::{emit, selftest, CReport, C_TOL};
use sqil_ir::Tensor;
use sqil_runtime::Policy;
use std::path::{Path, PathBuf};

pub struct BuildC {
    pub prefix: String,
    /// One .npy batch per policy input: the states the self-test runs (first `states` rows).
    pub selftest: Vec<PathBuf>,
    pub states: usize,
}

/// Loads a CPU artifact, or plans a FakeQuant simulation graph (IR text or ONNX).
pub fn load_policy(model: &Path) -> Result<Policy, String> {
    if sqil_runtime::artifact::is_artifact(model) {
        Policy::load(model).map_err(|e| e.to_string())
    } else {
        let g = crate::load_model(model)?;
        Policy::from_graph(&g).map_err(|e| format!("{}: {e}", model.display()))
    }
}

/// Writes `{prefix}.h`, `{prefix}.c` (and `selftest.c`, `c_report.json`) into `dir`.
pub fn build_c(model: &Path, dir: &Path, a: &BuildC) -> Result<CReport, String> {
    let policy = load_policy(model)?;
    let prog = emit(&policy, &a.prefix).map_err(|e| format!("{}: {e}", model.display()))?;
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let prefix: String = a.prefix.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    crate::quantize::write_atomic(&dir.join(format!("{prefix}.h")), prog.header.as_bytes())?;
    crate::quantize::write_atomic(&dir.join(format!("{prefix}.c")), prog.source.as_bytes())?;
    if !a.selftest.is_empty() {
        let batches: Vec<Tensor> = a.selftest.iter().map(|p| crate::npy::read(p)).collect::<Result<_, _>>()?;
        if batches.len() != policy.input_shapes().len() {
            return Err(format!(
                "--selftest: {} file(s) for {} policy input(s)",
                batches.len(),
                policy.input_shapes().len()
            ));
        }
        let (states, want) = selftest_vectors(&policy, &batches, a.states)?;
        let src = selftest(&prefix, &states, &want, C_TOL).map_err(|e| e.to_string())?;
        crate::quantize::write_atomic(&dir.join("selftest.c"), src.as_bytes())?;
    }
    let json = serde_json::to_string_pretty(&prog.report).map_err(|e| e.to_string())?;
    crate::quantize::write_atomic(&dir.join("c_report.json"), json.as_bytes())?;
    Ok(prog.report)
}

/// Per state (the first `n` rows of each batch), its inputs and the runtime's outputs at batch 1.
#[allow(clippy::type_complexity)]
pub fn selftest_vectors(
    policy: &Policy,
    batches: &[Tensor],
    n: usize,
) -> Result<(Vec<Vec<Vec<f32>>>, Vec<Vec<Vec<f32>>>), String> {
    let rows = batches.iter().map(|b| b.shape.first().copied().unwrap_or(1)).min().unwrap_or(0).min(n);
    let (mut states, mut want) = (vec![], vec![]);
    for r in 0..rows {
        let mut feeds = vec![];
        for b in batches {
            let per = b.len() / b.shape[0];
            let mut shape = b.shape.clone();
            shape[0] = 1;
            let v = b.data.to_f32_vec()[r * per..(r + 1) * per].to_vec();
            feeds.push(Tensor::from_f32(shape, v).map_err(|e| e.to_string())?);
        }
        let out = policy.run(&feeds).map_err(|e| e.to_string())?;
        states.push(feeds.iter().map(|t| t.data.to_f32_vec()).collect());
        want.push(out.iter().map(|t| t.data.to_f32_vec()).collect());
    }
    Ok((states, want))
}
