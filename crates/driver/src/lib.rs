//! sqil as a library (the driver): load a model, quantize it with a PTQ recipe, compile it (SIS,
//! QRD fine-tuning, candidate selection, lowering, artifacts), allocate bit widths, build back-end
//! outputs, benchmark. The `sqil` command line is clap over these functions; build scripts and the
//! Python package call them directly.

pub mod allocate;
pub mod bench;
pub mod build;
pub mod cache;
pub mod compile;
pub mod error;
pub mod feeds;
pub mod forward;
pub mod gpu_train;
pub mod inspect;
pub mod npy;
pub mod quantize;
pub mod runner;

pub use error::{Error, Result};
use sqil_ir::Graph;
use std::path::Path;

/// Loads an ONNX model or IR text (`.sqil`), by extension, and verifies it.
/// Creates `dir` if needed and checks that files can be written in it (a probe file written and
/// removed), so a run fails at its start rather than after its work.
pub fn ensure_writable_dir(dir: &Path) -> crate::Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: cannot create the output folder: {e}", dir.display()))?;
    probe_write(dir).map_err(|e| format!("{}: the output folder is not writable: {e}", dir.display()).into())
}

/// Writes and removes a probe file in `dir`: whether files can be created there.
fn probe_write(dir: &Path) -> std::io::Result<()> {
    let probe = dir.join(format!(".sqil-write-probe-{}", std::process::id()));
    std::fs::write(&probe, b"")?;
    std::fs::remove_file(&probe).ok();
    Ok(())
}

/// Checks that `path`'s folder exists and is writable (a probe file), so a command with several
/// outputs fails before writing the first rather than after.
pub fn ensure_writable_parent(path: &Path) -> crate::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(format!("{}: the folder {} does not exist", path.display(), dir.display()).into());
    }
    Ok(probe_write(dir).map_err(|e| format!("{}: cannot write there: {e}", path.display()))?)
}

/// Refuses an output path that names the same file as an input (`sqil quantize -o model.onnx`
/// would overwrite the model it reads).
pub fn distinct_output(input: &Path, output: &Path) -> crate::Result<()> {
    let same = match (input.canonicalize(), output.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same {
        return Err(
            format!("{}: the output would overwrite the input model; choose another path", output.display()).into()
        );
    }
    Ok(())
}

/// A model as the quantizing commands (`quantize`, `compile`, `allocate`) compute it: a
/// half-precision one (float16 or bfloat16 weights or values) widened to f32 (`widen-half`).
pub fn widened(g: &Graph) -> crate::Result<Graph> {
    let mut g = g.clone();
    sqil_passes::PassManager::new(vec![Box::new(sqil_passes::widen_half::WidenHalf)])
        .run(&mut g, &mut sqil_passes::PassCtx::default())?;
    Ok(g)
}

/// A calibration or demonstration batch for a widened model: float16 and bfloat16 arrays as f32
/// (exact); anything else as it is.
pub fn widened_feed(t: sqil_ir::Tensor) -> sqil_ir::Tensor {
    if t.dtype().is_half() {
        t.cast(sqil_ir::DType::F32)
    } else {
        t
    }
}

pub fn load_model(path: &Path) -> crate::Result<Graph> {
    if sqil_runtime::artifact::is_artifact(path) {
        return Err(format!(
            "{}: a compiled CPU artifact, not a model (run it with `sqil run` or `sqil bench`)",
            path.display()
        )
        .into());
    }
    if path.extension().is_some_and(|e| e == "bin") {
        return Err(format!(
            "{}: not a sqil artifact (no SQILCPU magic: empty, truncated or another format), and models are .onnx or .sqil",
            path.display()
        )
        .into());
    }
    let g = if path.extension().is_some_and(|e| e == "sqil") {
        let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::InvalidData => {
                format!("{}: not IR text (not valid UTF-8; .sqil files are sqil's text IR)", path.display())
            }
            _ => format!("{}: {e}", path.display()),
        })?;
        sqil_ir::parse_graph(&text).map_err(|e| format!("{}: {e}", path.display()))?
    } else {
        sqil_onnx::load_model(path)?
    };
    sqil_ir::verify_input(&g).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(g)
}
