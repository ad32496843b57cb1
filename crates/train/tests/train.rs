//! SIS against its closed form on a linear policy; QRD weights; fine-tuning lowers the QRD
//! loss; a run stopped at a checkpoint and resumed ends bit-identical to an uninterrupted run.

use sqil_ir::testing::Rng;
use sqil_ir::{DType, Dim, Graph, Op, Tensor, ValueType};
use sqil_passes::quant::{quantize, QuantConfig, Recipe};
use sqil_train::model::{train_graph, train_graph_with};
use sqil_train::sis::{parse_groups, qrd_alpha, sis, sis_with, ImagePerturb, SisConfig, VectorPerturb};
use sqil_train::trainer::{train, Dataset, TrainConfig, Validation};
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
    let data = Dataset {
        inputs: vec![("obs".into(), obs)],
        target: teacher.clone(),
        teacher,
        alpha: vec![1.0; n],
        target_hi: None,
        teacher_hi: None,
    };
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
    let (log, _) = train(&mut tg, &data, &cfg, None, false, None).unwrap();
    assert!(log.loss.last().unwrap().1 < 0.7 * log.loss[0].1, "loss {:?}", log.loss);

    let dir = std::env::temp_dir().join(format!("sqil-train-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ck = dir.join("ck.json");
    // Interrupted after 37 steps (checkpoint written there), then a fresh trainer resumes to 60.
    let mut a = train_graph(&sim, true).unwrap();
    train(&mut a, &data, &TrainConfig { stop_after: Some(37), ..cfg.clone() }, Some(&ck), false, None).unwrap();
    let mut b = train_graph(&sim, true).unwrap();
    train(&mut b, &data, &cfg, Some(&ck), true, None).unwrap();
    let mut c = train_graph(&sim, true).unwrap();
    train(&mut c, &data, &cfg, None, false, None).unwrap();
    for (p, q) in b.params.iter().zip(&c.params) {
        assert_eq!(p.value.data.to_f32_vec(), q.value.data.to_f32_vec(), "{}", p.name);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn validation_keeps_the_best_parameters_stops_early_and_resumes_stopped() {
    let (sim, data) = setup(2);
    let cfg = TrainConfig { steps: 100, batch: 64, lr: 3e-3, warmup: 5, checkpoint_every: 10, ..Default::default() };
    let tg0 = train_graph(&sim, true).unwrap();
    let init: Vec<Vec<f32>> = tg0.params.iter().map(|p| p.value.data.to_f32_vec()).collect();
    // A score that only grows as the parameters move: the best is the start (step 0), and with
    // patience 3 training stops at the third evaluation after it.
    let drift = |v: &[Tensor]| -> sqil_ir::Result<f64> {
        Ok(v.iter()
            .zip(&init)
            .flat_map(|(t, i)| t.data.to_f32_vec().into_iter().zip(i.clone()))
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum())
    };
    let val = Validation { every: 10, patience: 3, score: &drift };
    let dir = std::env::temp_dir().join(format!("sqil-val-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ck = dir.join("ck.json");
    let mut tg = train_graph(&sim, true).unwrap();
    let (log, best) = train(&mut tg, &data, &cfg, Some(&ck), false, Some(&val)).unwrap();
    let best = best.unwrap();
    assert_eq!((best.step, best.score), (0, 0.0));
    assert_eq!(log.stopped_at, Some(30), "{:?}", log.val);
    assert_eq!(log.val.iter().map(|v| v.0).collect::<Vec<_>>(), vec![0, 10, 20, 30]);
    for (b, i) in best.params.iter().zip(&init) {
        assert_eq!(&b.data.to_f32_vec(), i);
    }
    // A resume of a stopped run trains nothing more and returns the same best.
    let mut again = train_graph(&sim, true).unwrap();
    let (log2, best2) = train(&mut again, &data, &cfg, Some(&ck), true, Some(&val)).unwrap();
    assert_eq!(log2.stopped_at, Some(30));
    assert_eq!(best2.unwrap().step, 0);
    // The opposite score (the parameters' movement rewarded), no early stop: the best is the
    // lowest score logged, the evaluations run to the last step.
    let neg = |v: &[Tensor]| drift(v).map(|d| -d);
    let mut tg = train_graph(&sim, true).unwrap();
    let (log, best) =
        train(&mut tg, &data, &cfg, None, false, Some(&Validation { every: 25, patience: 0, score: &neg })).unwrap();
    let best = best.unwrap();
    let min = log.val.iter().cloned().fold((0, f64::INFINITY), |a, b| if b.1 < a.1 { b } else { a });
    assert_eq!((best.step, best.score), min);
    assert!(best.step > 0);
    assert_eq!(log.val.last().unwrap().0, 100);
    assert_eq!(neg(&best.params).unwrap(), best.score);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn interval_targets_measure_the_executed_action() {
    // A target clipped to the box's upper bound is met by every output above it; one inside
    // the box only by itself; the gradient is zero exactly when the executed actions agree.
    let (sim, data) = setup(3);
    let tg = train_graph_with(&sim, false, true).unwrap();
    let n = 4;
    let y = sqil_ir::interp::run(&sim, &HashMap::from([("obs".to_string(), take(&data.inputs[0].1, n))]))
        .unwrap()
        .remove(0);
    let yv = y.data.to_f32_vec();
    // Target: row 0 at the upper bound below y (interval [y - 1, BIG]: met), row 1 at the lower
    // bound above y (interval [-BIG, y + 0.5]: met), rows 2-3 inside the box at y + 0.25.
    let mut lo = vec![0f32; yv.len()];
    let mut hi = vec![0f32; yv.len()];
    for (i, &v) in yv.iter().enumerate() {
        let (l, h) = match i / 2 {
            0 => (v - 1.0, 1e30),
            1 => (-1e30, v + 0.5),
            _ => (v + 0.25, v + 0.25),
        };
        lo[i] = l;
        hi[i] = h;
    }
    let t = |v: Vec<f32>| Tensor::from_f32(y.shape.clone(), v).unwrap();
    let mut feeds = HashMap::from([("obs".to_string(), take(&data.inputs[0].1, n))]);
    feeds.insert("train.target".into(), t(lo.clone()));
    feeds.insert("train.target_hi".into(), t(hi.clone()));
    feeds.insert("train.teacher".into(), t(lo));
    feeds.insert("train.teacher_hi".into(), t(hi));
    feeds.insert("train.alpha".into(), Tensor::from_f32(vec![n, 1], vec![0.0; n]).unwrap());
    for p in &tg.params {
        feeds.insert(p.name.clone(), p.value.clone());
    }
    let loss = sqil_ir::interp::run(&tg.graph, &feeds).unwrap()[0].data.to_f64_vec()[0];
    // Only rows 2-3 contribute: mean over 8 entries of 4 * 0.25^2.
    assert!((loss - 4.0 * 0.0625 / 8.0).abs() < 1e-6, "loss {loss}");
}

fn take(t: &Tensor, n: usize) -> Tensor {
    let per = t.len() / t.shape[0];
    let mut shape = t.shape.clone();
    shape[0] = n;
    Tensor::from_f32(shape, t.data.to_f32_vec()[..n * per].to_vec()).unwrap()
}
