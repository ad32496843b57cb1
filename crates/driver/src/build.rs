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
pub fn load_policy(model: &Path) -> crate::Result<Policy> {
    if sqil_runtime::artifact::is_artifact(model) {
        Ok(Policy::load(model)?)
    } else {
        let g = crate::load_model(model)?;
        Ok(Policy::from_graph(&g).map_err(|e| format!("{}: {e}", model.display()))?)
    }
}

/// Writes `{prefix}.h`, `{prefix}.c` (and `selftest.c`, `c_report.json`) into `dir`. Everything
/// is generated (and the self-test inputs read and checked) before the first file is written, so
/// a failure leaves no partial set behind.
pub fn build_c(model: &Path, dir: &Path, a: &BuildC) -> crate::Result<CReport> {
    let policy = load_policy(model)?;
    let prog = emit(&policy, &a.prefix).map_err(|e| format!("{}: {e}", model.display()))?;
    let prefix = sqil_codegen::c::c_ident(&a.prefix);
    let selftest_src = if a.selftest.is_empty() {
        None
    } else {
        let batches: Vec<Tensor> = a.selftest.iter().map(|p| crate::npy::read(p)).collect::<Result<_, _>>()?;
        if batches.len() != policy.input_shapes().len() {
            return Err(format!(
                "--selftest: {} file(s) for {} policy input(s)",
                batches.len(),
                policy.input_shapes().len()
            )
            .into());
        }
        let (states, want) = selftest_vectors(&policy, &batches, a.states)?;
        Some(selftest(&prefix, &states, &want, C_TOL)?)
    };
    let json = serde_json::to_string_pretty(&prog.report)?;
    crate::ensure_writable_dir(dir)?;
    crate::quantize::write_atomic(&dir.join(format!("{prefix}.h")), prog.header.as_bytes())?;
    crate::quantize::write_atomic(&dir.join(format!("{prefix}.c")), prog.source.as_bytes())?;
    if let Some(src) = selftest_src {
        crate::quantize::write_atomic(&dir.join("selftest.c"), src.as_bytes())?;
    }
    crate::quantize::write_atomic(&dir.join("c_report.json"), json.as_bytes())?;
    Ok(prog.report)
}

/// Per state (the first `n` rows of each batch), its inputs and the runtime's outputs at batch 1.
#[allow(clippy::type_complexity)]
pub fn selftest_vectors(
    policy: &Policy,
    batches: &[Tensor],
    n: usize,
) -> crate::Result<(Vec<Vec<Vec<f32>>>, Vec<Vec<Vec<f32>>>)> {
    let rows = batches.iter().map(|b| b.shape.first().copied().unwrap_or(1)).min().unwrap_or(0).min(n);
    let (mut states, mut want) = (vec![], vec![]);
    for r in 0..rows {
        let mut feeds = vec![];
        for b in batches {
            let per = b.len() / b.shape[0];
            let mut shape = b.shape.clone();
            shape[0] = 1;
            let v = b.data.to_f32_vec()[r * per..(r + 1) * per].to_vec();
            feeds.push(Tensor::from_f32(shape, v)?);
        }
        let out = policy.run(&feeds)?;
        states.push(feeds.iter().map(|t| t.data.to_f32_vec()).collect());
        want.push(out.iter().map(|t| t.data.to_f32_vec()).collect());
    }
    Ok((states, want))
}

/// The trailer `sqil-policy` looks for at the end of its own executable.
pub const EXE_MAGIC: &[u8; 8] = b"SQILEXE\0";

/// The artifact bytes of a model: a CPU artifact as is (checked), else the planned simulation.
pub fn artifact_bytes(model: &Path) -> crate::Result<Vec<u8>> {
    if sqil_runtime::artifact::is_artifact(model) {
        let bytes = std::fs::read(model).map_err(|e| format!("{}: {e}", model.display()))?;
        sqil_runtime::load_artifact_bytes(&bytes, &model.display().to_string())?;
        return Ok(bytes);
    }
    crate::quantize::encode_artifact(&crate::load_model(model)?, model).map(|(_, bytes)| bytes)
}

/// `sqil build --target exe`: a copy of the runner with the policy's artifact appended; returns
/// the sizes (runner, artifact) and the runner copied. The runner is `runner` if given, else
/// `sqil-policy` beside this executable, else this executable itself (`sqil` runs an appended
/// policy as `sqil-policy` does: see [`crate::runner`]), so an installed `sqil` needs nothing else.
pub fn build_exe(model: &Path, out: &Path, runner: Option<&Path>) -> crate::Result<(usize, usize, PathBuf)> {
    // The model first: nothing is written for one that does not load.
    let art = artifact_bytes(model)?;
    let runner = match runner {
        Some(r) => r.to_path_buf(),
        None => {
            let me = std::env::current_exe().map_err(|e| format!("cannot locate sqil: {e}"))?;
            let beside = me.with_file_name(format!("sqil-policy{}", std::env::consts::EXE_SUFFIX));
            if beside.is_file() {
                beside
            } else {
                me
            }
        }
    };
    let mut bytes = std::fs::read(&runner).map_err(|e| {
        format!(
            "{}: {e} (the runner is built with sqil: `cargo build --release -p sqil`; or pass --runner)",
            runner.display()
        )
    })?;
    // Before strip, which would drop the appended policy without a word.
    if bytes.len() >= 16 && &bytes[bytes.len() - 8..] == EXE_MAGIC {
        return Err(format!("{}: already carries a policy; use the plain sqil-policy runner", runner.display()).into());
    }
    // Debug information is most of the runner's size (39 MB -> 2.4 MB): drop it with binutils'
    // `strip` where there is one (before the artifact goes on: strip rewrites the file).
    let tmp = out.with_extension("runner.tmp");
    if std::fs::write(&tmp, &bytes).is_ok()
        && std::process::Command::new("strip").arg(&tmp).output().is_ok_and(|o| o.status.success())
    {
        if let Ok(b) = std::fs::read(&tmp) {
            bytes = b;
        }
    }
    let _ = std::fs::remove_file(&tmp);
    let runner_len = bytes.len();
    bytes.extend(&art);
    bytes.extend((art.len() as u64).to_le_bytes());
    bytes.extend(EXE_MAGIC);
    crate::quantize::write_atomic(out, &bytes)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(out, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| format!("{}: {e}", out.display()))?;
    }
    Ok((runner_len, art.len(), runner))
}

/// `sqil build --target cuda`: one standalone `.cu` file (see `sqil_codegen::cuda`), with the
/// first `states` rows of `selftest` (one .npy per policy input; a state's inputs are
/// concatenated) and the CPU runtime's actions for them as its `--selftest` data.
pub fn build_cuda(model: &Path, out: &Path, selftest: &[PathBuf], states: usize) -> crate::Result<usize> {
    let policy = load_policy(model)?;
    // Per state, the inputs concatenated (the program reads them as one vector).
    let ts = selftest.iter().map(|p| crate::npy::read(p)).collect::<Result<Vec<_>, _>>()?;
    let (s, w) = if ts.is_empty() { (vec![], vec![]) } else { selftest_vectors(&policy, &ts, states)? };
    let (ins, want): (Vec<Vec<f32>>, Vec<Vec<f32>>) =
        (s.into_iter().map(|v| v.concat()).collect(), w.into_iter().map(|v| v.concat()).collect());
    let src = sqil_codegen::cuda::emit_cu(&policy, &ins, &want, sqil_cuda::lower::GPU_TOL)
        .map_err(|e| format!("{}: {e}", model.display()))?;
    crate::quantize::write_atomic(out, src.as_bytes())?;
    Ok(src.len())
}
