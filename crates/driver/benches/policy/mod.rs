//! A testdata policy as the GPU training benchmarks (`train_step`, `dp_step`) take it: W4A8
//! (RTN, weights in groups of 64) calibrated on its sample inputs, its training graph, and `rows`
//! rows of those inputs (repeated).

use sqil_driver::quantize::{run_quantize, QuantizeArgs};
use sqil_ir::{Graph, Tensor};
use sqil_passes::quant::{QuantConfig, Recipe};
use sqil_train::model::TrainGraph;
use std::path::PathBuf;

/// `testdata/policies`, from the crate or from the repository root.
pub fn root() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/policies");
    if root.exists() {
        root
    } else {
        PathBuf::from("testdata/policies")
    }
}

/// Policy `name`'s quantized simulation, its training graph and `rows` rows of each input.
pub fn w4a8(name: &str, rows: usize) -> (Graph, TrainGraph, Vec<(String, Tensor)>) {
    let root = root();
    let fp = sqil_driver::load_model(&root.join(format!("{name}.onnx"))).unwrap();
    let mut cfg = QuantConfig::default();
    cfg.apply_settings("wbits=4,abits=8,group=64").unwrap();
    let files: Vec<PathBuf> = (0..fp.inputs.len()).map(|i| root.join(format!("{name}.input{i}.npy"))).collect();
    let (sim, _, _) = run_quantize(&fp, &QuantizeArgs::in_memory(Recipe::Rtn, cfg, files.clone(), 64)).unwrap();
    let tg = sqil_train::model::train_graph_with(&sim, true, false).unwrap();
    let inputs = tg
        .policy_inputs
        .iter()
        .zip(&files)
        .map(|(n, p)| {
            let t = sqil_driver::npy::read(p).unwrap().cast(sqil_ir::DType::F32);
            let idx: Vec<usize> = (0..rows).map(|k| k % t.shape[0]).collect();
            (n.clone(), sqil_train::trainer::take_rows(&t, &idx))
        })
        .collect();
    (sim, tg, inputs)
}
