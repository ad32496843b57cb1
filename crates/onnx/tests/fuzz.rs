//! Robustness: corrupted models (random byte edits of real ones) must import to a graph or to
//! an error, never panic; a graph that imports must run (or fail) without panicking too.

use proptest::prelude::*;
use sqil_ir::interp::run;
use sqil_ir::{Dim, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;

fn model(name: &str) -> Vec<u8> {
    std::fs::read(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/policies").join(name)).unwrap()
}

fn check(bytes: &[u8]) {
    let Ok(g) = sqil_onnx::load_model_bytes(bytes, None) else { return };
    let feeds: HashMap<String, Tensor> = g
        .inputs
        .iter()
        .map(|&i| {
            let v = &g.node(i).outputs[0];
            let shape: Vec<usize> =
                v.ty.shape.iter().map(|d| if let Dim::Known(k) = d { (*k).min(64) } else { 2 }).collect();
            (v.name.clone(), Tensor::zeros(v.ty.dtype, shape))
        })
        .collect();
    // Bounded work: skip inputs whose declared shapes were corrupted to something huge.
    if feeds.values().all(|t| t.len() <= 1 << 16) {
        let _ = run(&g, &feeds);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn corrupted_models_never_panic(which in 0usize..3, edits in proptest::collection::vec((any::<u32>(), any::<u8>()), 1..8)) {
        let name = ["hopper_mlp.onnx", "hopper_w4a8_qdq.onnx", "cnn.onnx"][which];
        let mut bytes = model(name);
        for (pos, val) in edits {
            let p = pos as usize % bytes.len();
            bytes[p] = val;
        }
        check(&bytes);
    }
}
