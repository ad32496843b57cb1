//! Whole-policy gradient check against PyTorch autograd: the hopper BC policy at W4A8 (sqil's
//! own FakeQuant graph), the QRD loss on a fixed batch; `tools/make_grad_ref.py` wrote the same
//! computation's gradients with PyTorch into testdata/grad/. Every weight, bias and LSQ step
//! gradient must match within 1e-4 relative (to the tensor's largest entry).

use ndarray::ArrayD;
use ndarray_npy::NpzReader;
use sqil_ir::{parse_graph, Tensor};
use sqil_train::model::train_graph;
use std::collections::HashMap;
use std::fs::File;
use std::path::PathBuf;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/grad")
}

#[test]
fn gradients_match_pytorch_autograd() {
    let sim = parse_graph(&std::fs::read_to_string(dir().join("bc_hopper_w4a8.sqil")).unwrap()).unwrap();
    let tg = train_graph(&sim, true).unwrap();
    let mut z = NpzReader::new(File::open(dir().join("bc_hopper_w4a8.npz")).unwrap()).unwrap();
    let names = z.names().unwrap();
    let mut get = |key: &str| -> Tensor {
        let entry = names
            .iter()
            .find(|n| *n == key || **n == format!("{key}.npy"))
            .unwrap_or_else(|| panic!("no `{key}` in the reference"));
        let a: ArrayD<f32> = z.by_name(entry).unwrap();
        Tensor::from_f32(a.shape().to_vec(), a.iter().copied().collect()).unwrap()
    };
    let mut feeds = HashMap::new();
    feeds.insert("obs".to_string(), get("obs"));
    feeds.insert("train.target".to_string(), get("target"));
    feeds.insert("train.teacher".to_string(), get("teacher"));
    feeds.insert("train.alpha".to_string(), get("alpha"));
    for p in &tg.params {
        feeds.insert(p.name.clone(), p.value.clone());
    }
    let outs = sqil_ir::interp::run(&tg.graph, &feeds).unwrap();
    let loss = outs[0].data.to_f32_vec()[0];
    let want_loss = get("loss").data.to_f32_vec()[0];
    assert!((loss - want_loss).abs() < 1e-5 * want_loss.abs().max(1.0), "loss {loss} vs PyTorch {want_loss}");
    assert_eq!(tg.params.len(), 12);
    for (p, g) in tg.params.iter().zip(&outs[1..]) {
        let want = get(&format!("grad:{}", p.name));
        assert_eq!(g.shape, want.shape, "{}", p.name);
        let (a, b) = (g.data.to_f32_vec(), want.data.to_f32_vec());
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
        let err = a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale;
        eprintln!("{}: max relative error {err:.2e}", p.name);
        assert!(err < 1e-4, "{}: max relative error {err}", p.name);
    }
}
