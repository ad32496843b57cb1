//! Helpers shared by the conformance suites: locating test material and comparing tensors
//! within named error budgets.

use sqil_ir::{Data, Tensor};
use std::path::PathBuf;

/// Tolerances of ONNX's own backend test runner (`assert_allclose(rtol=1e-3, atol=1e-7)`).
pub const ONNX_NODE_RTOL: f64 = 1e-3;
pub const ONNX_NODE_ATOL: f64 = 1e-7;
/// Budget for the interpreter against tract / onnxruntime on the testdata policies.
pub const PEER_RTOL: f64 = 1e-5;
pub const PEER_ATOL: f64 = 1e-6;

/// The repository root (two levels above this crate).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("repo root exists")
}

/// Where the onnx 1.22 wheel's node tests are: `$SQIL_ONNX_NODE_DIR`, else the CI venv.
pub fn onnx_node_dir() -> Option<PathBuf> {
    if let Ok(d) = std::env::var("SQIL_ONNX_NODE_DIR") {
        return Some(PathBuf::from(d));
    }
    let lib = repo_root().join(".venv-ci/lib");
    let py = std::fs::read_dir(&lib)
        .ok()?
        .filter_map(|e| e.ok())
        .find(|e| e.file_name().to_string_lossy().starts_with("python"))?;
    let d = py.path().join("site-packages/onnx/backend/test/data/node");
    d.is_dir().then_some(d)
}

/// Compares `got` to `want`: same dtype and shape; floats within `|g - w| <= atol + rtol * |w|`
/// (NaN matches NaN), everything else exactly. Returns a description of the first mismatch.
pub fn compare(got: &Tensor, want: &Tensor, rtol: f64, atol: f64) -> Result<(), String> {
    if got.dtype() != want.dtype() {
        return Err(format!("dtype {} != expected {}", got.dtype(), want.dtype()));
    }
    if got.shape != want.shape {
        return Err(format!("shape {:?} != expected {:?}", got.shape, want.shape));
    }
    if want.dtype().is_float() {
        let (g, w) = (got.data.to_f64_vec(), want.data.to_f64_vec());
        let mut worst: Option<(usize, f64)> = None;
        for (i, (a, b)) in g.iter().zip(&w).enumerate() {
            let ok = (a.is_nan() && b.is_nan()) || a == b || (a - b).abs() <= atol + rtol * b.abs();
            if !ok {
                let excess = (a - b).abs() / (atol + rtol * b.abs());
                if worst.is_none_or(|(_, e)| excess > e) {
                    worst = Some((i, excess));
                }
            }
        }
        if let Some((i, _)) = worst {
            return Err(format!("element {i}: {} vs expected {} (rtol {rtol}, atol {atol})", g[i], w[i]));
        }
        return Ok(());
    }
    let same = match (&got.data, &want.data) {
        (Data::Bool(a), Data::Bool(b)) => a == b,
        (a, b) => a.to_i64_vec() == b.to_i64_vec(),
    };
    if same {
        Ok(())
    } else {
        let (a, b) = (got.data.to_i64_vec(), want.data.to_i64_vec());
        let i = a.iter().zip(&b).position(|(x, y)| x != y).unwrap_or(0);
        Err(format!("element {i}: {} vs expected {}", a[i], b[i]))
    }
}

/// Largest relative difference `|g - w| / max(|w|, floor)` over two float tensors.
pub fn max_rel_diff(got: &Tensor, want: &Tensor, floor: f64) -> f64 {
    got.data
        .to_f64_vec()
        .iter()
        .zip(want.data.to_f64_vec())
        .map(|(g, w)| (g - w).abs() / w.abs().max(floor))
        .fold(0.0, f64::max)
}
