//! SIS against its closed form on a linear policy; QRD weights; fine-tuning lowers the QRD
//! loss; a run stopped at a checkpoint and resumed ends bit-identical to an uninterrupted run.

use sqil_ir::testing::Rng;
use sqil_ir::{DType, Dim, Graph, Op, Tensor, ValueType};
use sqil_passes::quant::{quantize, QuantConfig, Recipe};
use sqil_train::model::train_graph;
use sqil_train::sis::{qrd_alpha, sis};
use sqil_train::trainer::{train, Dataset, TrainConfig};
use std::collections::HashMap;

fn input(g: &mut Graph, d: usize) -> sqil_ir::ValueRef {
    g.add_input("obs", ValueType::new(DType::F32, vec![Dim::Sym("N".into()), Dim::Known(d)]))
}

#[test]
fn sis_matches_closed_form_on_a_linear_policy() {
    // y = x @ w with w = [1, 0, -2]: S(s, k) = 1/2 (w_k (x_k - mean_k))^2.
    let mut g = Graph::new("lin");
    let x = input(&mut g, 3);
    let w = g.add_const("w", Tensor::from_f32(vec![3, 1], vec![1.0, 0.0, -2.0]).unwrap());
    let y = g.add_inferred("mm", Op::MatMul, &[Some(x), Some(w)], "y").unwrap();
    g.outputs.push(y);
    let xs = vec![0.0f32, 5.0, 1.0, 2.0, -5.0, 3.0];
    let feeds = vec![HashMap::from([("obs".to_string(), Tensor::from_f32(vec![2, 3], xs.clone()).unwrap())])];
    let s = sis(&g, &feeds, 4).unwrap();
    let mean = [1.0f64, 0.0, 2.0];
    let wv = [1.0f64, 0.0, -2.0];
    for i in 0..2 {
        let want: f64 = (0..3).map(|k| 0.5 * (wv[k] * (xs[i * 3 + k] as f64 - mean[k])).powi(2)).sum::<f64>() / 3.0;
        assert!((s[i] - want).abs() < 1e-5, "state {i}: {} vs {want}", s[i]);
    }
    let (a, thr) = qrd_alpha(&[0.1, 0.5, 0.2, 0.9, 0.3], 0.2, 2.0);
    assert_eq!(a, vec![1.0, 1.0, 1.0, 2.0, 1.0]);
    assert_eq!(thr, 0.9);
}

fn setup(seed: u64) -> (Graph, Dataset) {
    let mut r = Rng::new(seed);
    let mut g = Graph::new("mlp");
    let x = input(&mut g, 6);
    let w1 = g.add_const("w1", r.tensor(vec![16, 6], 0.6));
    let b1 = g.add_const("b1", r.tensor(vec![16], 0.1));
    let gemm = Op::Gemm { alpha: 1.0, beta: 1.0, trans_a: false, trans_b: true };
    let h = g.add_inferred("fc1", gemm.clone(), &[Some(x), Some(w1), Some(b1)], "h").unwrap();
    let a = g.add_inferred("relu", Op::Unary(sqil_ir::ops::UnaryOp::Relu), &[Some(h)], "a").unwrap();
    let w2 = g.add_const("w2", r.tensor(vec![2, 16], 0.6));
    let y = g.add_inferred("fc2", gemm, &[Some(a), Some(w2), None], "y").unwrap();
    g.outputs.push(y);
    let n = 512;
    let obs = r.tensor(vec![n, 6], 1.5);
    let feeds = vec![HashMap::from([("obs".to_string(), obs.clone())])];
    let teacher = sqil_ir::interp::run(&g, &feeds[0]).unwrap().remove(0);
    let mut cfg = QuantConfig::default();
    cfg.apply_settings("wbits=3 abits=8 group=channel").unwrap();
    let (sim, _) = quantize(&g, &cfg, Recipe::Rtn, &feeds).unwrap();
    let data = Dataset { inputs: vec![("obs".into(), obs)], target: teacher.clone(), teacher, alpha: vec![1.0; n] };
    (sim, data)
}

#[test]
fn fine_tuning_lowers_the_loss_and_resume_is_exact() {
    let (sim, data) = setup(1);
    let cfg = TrainConfig {
        steps: 60,
        batch: 64,
        lr: 3e-3,
        warmup: 5,
        log_every: 20,
        checkpoint_every: 30,
        ..Default::default()
    };
    let mut tg = train_graph(&sim, true).unwrap();
    let log = train(&mut tg, &data, &cfg, None, false).unwrap();
    assert!(log.loss.last().unwrap().1 < 0.7 * log.loss[0].1, "loss {:?}", log.loss);

    let dir = std::env::temp_dir().join(format!("sqil-train-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ck = dir.join("ck.json");
    // Interrupted after 37 steps (checkpoint written there), then a fresh trainer resumes to 60.
    let mut a = train_graph(&sim, true).unwrap();
    train(&mut a, &data, &TrainConfig { stop_after: Some(37), ..cfg.clone() }, Some(&ck), false).unwrap();
    let mut b = train_graph(&sim, true).unwrap();
    train(&mut b, &data, &cfg, Some(&ck), true).unwrap();
    let mut c = train_graph(&sim, true).unwrap();
    train(&mut c, &data, &cfg, None, false).unwrap();
    for (p, q) in b.params.iter().zip(&c.params) {
        assert_eq!(p.value.data.to_f32_vec(), q.value.data.to_f32_vec(), "{}", p.name);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
