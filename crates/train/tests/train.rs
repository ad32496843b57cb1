//! SIS against its closed form on a linear policy; QRD weights; fine-tuning lowers the QRD
//! loss; a run stopped at a checkpoint and resumed ends bit-identical to an uninterrupted run.

use sqil_ir::testing::Rng;
use sqil_ir::{DType, Dim, Graph, Op, Tensor, ValueType};
use sqil_passes::quant::{quantize, QuantConfig, Recipe};
use sqil_train::model::train_graph;
use sqil_train::sis::{parse_groups, qrd_alpha, sis, sis_with, ImagePerturb, SisConfig, VectorPerturb};
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

#[test]
fn sis_groups_noise_and_blur_follow_their_definitions() {
    // Linear policy y = x @ w, w = [1, 0, -2, 3].
    let mut g = Graph::new("lin");
    let x = input(&mut g, 4);
    let wv = [1.0f64, 0.0, -2.0, 3.0];
    let w = g.add_const("w", Tensor::from_f32(vec![4, 1], wv.iter().map(|&v| v as f32).collect()).unwrap());
    let y = g.add_inferred("mm", Op::MatMul, &[Some(x), Some(w)], "y").unwrap();
    g.outputs.push(y);
    let mut r = Rng::new(4);
    let n = 4000;
    let xs = r.tensor(vec![n, 4], 1.0).data.to_f32_vec();
    let feeds: Vec<_> = xs
        .chunks(400 * 4)
        .map(|c| HashMap::from([("obs".to_string(), Tensor::from_f32(vec![c.len() / 4, 4], c.to_vec()).unwrap())]))
        .collect();
    let col = |k: usize| xs.iter().skip(k).step_by(4).map(|&v| v as f64).collect::<Vec<_>>();
    let mean: Vec<f64> = (0..4).map(|k| col(k).iter().sum::<f64>() / n as f64).collect();
    let var: Vec<f64> = (0..4).map(|k| col(k).iter().map(|v| (v - mean[k]).powi(2)).sum::<f64>() / n as f64).collect();
    // Groups {0, 1, 2} and {3}: S(s, g) = 1/2 (sum_{k in g} w_k (x_k - mean_k))^2, two positions.
    let cfg = SisConfig { groups: parse_groups("0-2").unwrap(), ..SisConfig::default() };
    let s = sis_with(&g, &feeds, &cfg).unwrap();
    for i in [0, 1, 1999] {
        let d = |k: usize| wv[k] * (xs[i * 4 + k] as f64 - mean[k]);
        let want = (0.5 * (d(0) + d(1) + d(2)).powi(2) + 0.5 * d(3).powi(2)) / 2.0;
        assert!((s[i] - want).abs() < 1e-4 * want.max(1.0), "state {i}: {} vs {want}", s[i]);
    }
    assert!(parse_groups("3-1").is_err() && parse_groups("a").is_err());
    assert!(sis_with(&g, &feeds, &SisConfig { groups: vec![vec![7]], ..SisConfig::default() }).is_err());
    // Noise: E[S(s, k)] = 1/2 w_k^2 scale^2 var_k; the mean over states matches, and runs repeat.
    let noise = SisConfig { vector: VectorPerturb::Noise { scale: 0.5, seed: 3 }, ..SisConfig::default() };
    let s1 = sis_with(&g, &feeds, &noise).unwrap();
    assert_eq!(s1, sis_with(&g, &feeds, &noise).unwrap(), "seeded noise repeats");
    let want: f64 = (0..4).map(|k| 0.5 * wv[k] * wv[k] * 0.25 * var[k]).sum::<f64>() / 4.0;
    let got = s1.iter().sum::<f64>() / n as f64;
    assert!((got - want).abs() < 0.1 * want, "mean noise SIS {got} vs expected {want}");
    // Blur: a constant image blurs to itself (SIS 0); an edge does not.
    let mut gi = Graph::new("img");
    let im = gi.add_input(
        "img",
        sqil_ir::ValueType::new(DType::F32, vec![Dim::Sym("N".into()), Dim::Known(1), Dim::Known(8), Dim::Known(8)]),
    );
    let flat = gi.add_inferred("flat", Op::Flatten { axis: 1 }, &[Some(im)], "f").unwrap();
    let wi = gi.add_const("w", Tensor::from_f32(vec![64, 1], (0..64).map(|i| (i % 7) as f32 - 3.0).collect()).unwrap());
    let yi = gi.add_inferred("mm", Op::MatMul, &[Some(flat), Some(wi)], "y").unwrap();
    gi.outputs.push(yi);
    let blur = SisConfig { patch: 4, image: ImagePerturb::Blur { sigma: 1.0 }, ..SisConfig::default() };
    let constant =
        vec![HashMap::from([("img".to_string(), Tensor::from_f32(vec![1, 1, 8, 8], vec![0.7; 64]).unwrap())])];
    assert!(sis_with(&gi, &constant, &blur).unwrap()[0] < 1e-10);
    let edge: Vec<f32> = (0..64).map(|i| if i % 8 < 4 { 0.0 } else { 1.0 }).collect();
    let edged = vec![HashMap::from([("img".to_string(), Tensor::from_f32(vec![1, 1, 8, 8], edge).unwrap())])];
    assert!(sis_with(&gi, &edged, &blur).unwrap()[0] > 1e-3);
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
