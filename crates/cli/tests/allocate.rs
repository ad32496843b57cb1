//! `sqil allocate` end to end on the bundled hopper policy: the config it writes loads, keeps
//! the budget (average bits and bytes), and drives `sqil quantize`; the report and plot are
//! written; an impossible budget is an error that names the minimum.

use sqil_passes::quant::QuantConfig;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn sqil(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sqil")).args(args).current_dir(root()).output().expect("run sqil")
}

fn allocate(dir: &Path, budget: &str, method: &str) -> (QuantConfig, serde_json::Value) {
    let cfg = dir.join(format!("{budget}-{method}.toml"));
    let rep = dir.join(format!("{budget}-{method}.json"));
    let svg = dir.join(format!("{budget}-{method}.svg"));
    let o = sqil(&[
        "allocate",
        "testdata/policies/bc_hopper.onnx",
        "--demos",
        "testdata/demos/hopper.npz",
        "--budget",
        budget,
        "--alloc-method",
        method,
        "--alloc-states",
        "256",
        "--probes",
        "8",
        "-o",
        cfg.to_str().unwrap(),
        "--report",
        rep.to_str().unwrap(),
        "--plot",
        svg.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "allocate {budget} {method}: {}", String::from_utf8_lossy(&o.stderr));
    assert!(std::fs::read_to_string(&svg).unwrap().starts_with("<svg"));
    (QuantConfig::load(&cfg).unwrap(), serde_json::from_str(&std::fs::read_to_string(&rep).unwrap()).unwrap())
}

#[test]
fn allocations_keep_their_budgets_and_drive_quantize() {
    let dir = std::env::temp_dir().join(format!("sqil-allocate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for method in ["sqil", "hawq"] {
        let (cfg, rep) = allocate(&dir, "3bits", method);
        let layers = rep["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 3);
        let (mut bits, mut params) = (0u64, 0u64);
        for l in layers {
            let name = l["name"].as_str().unwrap();
            let b = cfg.layers[name].wbits.unwrap() as u64;
            assert_eq!(format!("W{b}"), l["chosen"].as_str().unwrap());
            bits += b * l["params"].as_u64().unwrap();
            params += l["params"].as_u64().unwrap();
        }
        assert!(bits as f64 <= 3.0 * params as f64, "{method}: {bits} bits for {params} params");
        assert!(!rep["pareto"].as_array().unwrap().is_empty());
    }
    // A size budget: the reported total (packed weights, scales, float constants) stays within it.
    let (_, rep) = allocate(&dir, "60KB", "sqil");
    assert!(rep["used"].as_f64().unwrap() <= 60e3, "used {}", rep["used"]);
    // The config drives quantize: the per-layer report shows the allocated bits.
    let cfg = dir.join("3bits-sqil.toml");
    let qrep = dir.join("q.json");
    let o = sqil(&[
        "quantize",
        "testdata/policies/bc_hopper.onnx",
        "--config",
        cfg.to_str().unwrap(),
        "--calib",
        "testdata/demos/hopper.npz",
        "-o",
        dir.join("q.onnx").to_str().unwrap(),
        "--report",
        qrep.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let q: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&qrep).unwrap()).unwrap();
    let c = QuantConfig::load(&cfg).unwrap();
    for l in q["layers"].as_array().unwrap() {
        assert_eq!(l["wbits"].as_u64().unwrap() as u8, c.layers[l["name"].as_str().unwrap()].wbits.unwrap());
    }
    // Below the cheapest allocation: an error naming it.
    let o = sqil(&[
        "allocate",
        "testdata/policies/bc_hopper.onnx",
        "--demos",
        "testdata/demos/hopper.npz",
        "--budget",
        "1bits",
        "-o",
        dir.join("x.toml").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("below the cheapest allocation"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}
