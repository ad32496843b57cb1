//! `sqil inspect` reports the parameter counts PyTorch reports for every testdata policy
//! (numbers recorded by tools/make_testdata.py and tools/make_tasks.py in
//! testdata/policies/manifest.json).

use std::path::PathBuf;

fn policies() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/policies")
}

#[test]
fn parameter_counts_match_pytorch() {
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(policies().join("manifest.json")).unwrap()).unwrap();
    let models = manifest["models"].as_array().unwrap();
    assert!(models.len() >= 9, "manifest lists {} models", models.len());
    for m in models {
        let file = m["file"].as_str().unwrap();
        // Constant buffers (a BC policy's observation mean and std) are initializers in ONNX,
        // indistinguishable from parameters: the manifest records them separately.
        let want = (m["pytorch_parameters"].as_u64().unwrap() + m["pytorch_buffers"].as_u64().unwrap_or(0)) as usize;
        let g = sqil_onnx::load_model(&policies().join(file)).unwrap();
        let s = sqil_driver::inspect::summarise(&g).unwrap();
        assert_eq!(
            s.params, want,
            "{file}: sqil counts {} parameters, PyTorch {want} (parameters + buffers)",
            s.params
        );
        assert!(s.flops > 0, "{file}: no FLOPs counted");
    }
}

/// PyTorch's count for `Sequential(Linear(4, 8), ReLU, Linear(8, 8), ReLU, Linear(8, 1))` is
/// 40 + 72 + 9 = 121 (`sum(p.numel())`): the last bias has one element and counts. Exported as
/// Gemm (transB=1) or as MatMul + Add; a scalar literal (`y * 0.5`) is not a parameter.
#[test]
fn one_element_biases_count_and_literals_do_not() {
    use sqil_ir::ops::{BinaryOp, UnaryOp};
    use sqil_ir::{DType, Dim, Graph, Op, Tensor, ValueType};
    for matmul in [false, true] {
        let mut g = Graph::new("mlp");
        let mut h = g.add_input("x", ValueType::new(DType::F32, vec![Dim::Sym("N".into()), Dim::Known(4)]));
        for (l, (k, n)) in [(4, 8), (8, 8), (8, 1)].into_iter().enumerate() {
            let b = g.add_const(format!("b{l}"), Tensor::from_f32(vec![n], vec![0.1; n]).unwrap());
            h = if matmul {
                let w = g.add_const(format!("w{l}"), Tensor::from_f32(vec![k, n], vec![0.5; k * n]).unwrap());
                let m = g.add_inferred(format!("mm{l}"), Op::MatMul, &[Some(h), Some(w)], format!("m{l}")).unwrap();
                g.add_inferred(format!("add{l}"), Op::Binary(BinaryOp::Add), &[Some(m), Some(b)], format!("a{l}"))
                    .unwrap()
            } else {
                let w = g.add_const(format!("w{l}"), Tensor::from_f32(vec![n, k], vec![0.5; k * n]).unwrap());
                let op = Op::Gemm { alpha: 1.0, beta: 1.0, trans_a: false, trans_b: true };
                g.add_inferred(format!("fc{l}"), op, &[Some(h), Some(w), Some(b)], format!("y{l}")).unwrap()
            };
            if l < 2 {
                h = g.add_inferred(format!("relu{l}"), Op::Unary(UnaryOp::Relu), &[Some(h)], format!("r{l}")).unwrap();
            }
        }
        let half = g.add_const("half", Tensor::from_f32(vec![1], vec![0.5]).unwrap());
        let y = g.add_inferred("scale", Op::Binary(BinaryOp::Mul), &[Some(h), Some(half)], "y").unwrap();
        g.outputs = vec![y];
        let s = sqil_driver::inspect::summarise(&g).unwrap();
        assert_eq!(s.params, 121, "matmul export: {matmul}");
    }
}

#[test]
fn cli_reports_bad_files_in_one_line() {
    let exe = env!("CARGO_BIN_EXE_sqil");
    let dir = std::env::temp_dir().join(format!("sqil-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // A truncated model: the first 1000 bytes of a real one.
    let bytes = std::fs::read(policies().join("hopper_mlp.onnx")).unwrap();
    let cut = dir.join("truncated.onnx");
    std::fs::write(&cut, &bytes[..1000]).unwrap();
    for (path, needle) in [(cut.clone(), "truncated.onnx"), (dir.join("missing.onnx"), "missing.onnx")] {
        let out = std::process::Command::new(exe).arg("inspect").arg(&path).output().unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "one line expected: {err}");
        assert!(err.starts_with("error: ") && err.contains(needle), "{err}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn run_writes_outputs_matching_onnxruntime() {
    let exe = env!("CARGO_BIN_EXE_sqil");
    let out = std::env::temp_dir().join(format!("sqil-run-{}.npy", std::process::id()));
    let st = std::process::Command::new(exe)
        .args(["run", policies().join("hopper_mlp.onnx").to_str().unwrap(), "--input"])
        .arg(policies().join("hopper_mlp.input0.npy"))
        .arg("--output")
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success());
    let got = sqil_driver::npy::read(&out).unwrap();
    let want = sqil_driver::npy::read(&policies().join("hopper_mlp.ort0.npy")).unwrap();
    assert_eq!(got.shape, want.shape);
    for (a, b) in got.as_f32().unwrap().iter().zip(want.as_f32().unwrap()) {
        assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{a} vs {b}");
    }
    std::fs::remove_file(&out).ok();
}
