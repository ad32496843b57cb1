//! Saliency-guided bit allocation end to end on small graphs: a layer made far more sensitive
//! gets more bits; saliency weights move bits towards the layers that matter on the weighted
//! states; budgets hold; Hutchinson traces match the closed form of a linear layer.

use sqil_ir::testing::Rng;
use sqil_ir::{DType, Dim, Graph, Op, Tensor, ValueType};
use sqil_passes::quant::allocate::allocate;
use sqil_passes::quant::sensitivity::{
    allocatable_layers, apply, problem, sensitivity, Budget, CostModel, ErrorSource, Measure,
};
use sqil_passes::quant::{Feeds, QuantConfig, Recipe};
use sqil_train::hessian::hessian_traces;
use std::collections::HashMap;

const GEMM: Op = Op::Gemm { alpha: 1.0, beta: 1.0, trans_a: false, trans_b: true };

/// `fc3(relu(fc1(obs))) + fc2(obs)`, fc1 [16, 8], fc3 [2, 16], and a direct path fc2 [2, 8]
/// whose weights are 20x larger: its share of the action, and of the action error its rounding
/// causes, is far larger at every bit width.
fn mlp(r: &mut Rng) -> Graph {
    let mut g = Graph::new("mlp");
    let x = g.add_input("obs", ValueType::new(DType::F32, vec![Dim::Sym("N".into()), Dim::Known(8)]));
    let mut layer = |g: &mut Graph, name: &str, x, n: usize, k: usize, gain: f32| {
        let w = g.add_const(format!("{name}.w"), r.tensor(vec![n, k], 0.5 * gain));
        let b = g.add_const(format!("{name}.b"), r.tensor(vec![n], 0.1));
        g.add_inferred(name, GEMM, &[Some(x), Some(w), Some(b)], format!("{name}.y")).unwrap()
    };
    let h = layer(&mut g, "fc1", x, 16, 8, 1.0);
    let a = g.add_inferred("relu", Op::Unary(sqil_ir::ops::UnaryOp::Relu), &[Some(h)], "a").unwrap();
    let direct = layer(&mut g, "fc2", x, 2, 8, 20.0);
    let deep = layer(&mut g, "fc3", a, 2, 16, 1.0);
    let y = g.add_inferred("sum", Op::Binary(sqil_ir::ops::BinaryOp::Add), &[Some(deep), Some(direct)], "y").unwrap();
    g.outputs.push(y);
    g
}

fn feeds(r: &mut Rng, n: usize) -> Vec<Feeds> {
    vec![HashMap::from([("obs".to_string(), r.tensor(vec![n, 8], 1.5))])]
}

fn base() -> QuantConfig {
    let mut c = QuantConfig::default();
    c.apply_settings("abits=16 group=channel").unwrap();
    c
}

#[test]
fn the_sensitive_layer_gets_more_bits_and_budgets_hold() {
    let mut r = Rng::new(11);
    let g = mlp(&mut r);
    let f = feeds(&mut r, 256);
    let w = vec![1.0f32; 256];
    let cfg = base();
    let m = Measure::new(&g, &cfg, Recipe::Rtn, &f, &f, &w).unwrap();
    let layers = allocatable_layers(&g, &cfg).unwrap();
    let sens = sensitivity(&m, &layers, &[2, 3, 4, 8], &[], |_| {}).unwrap();
    // 8 bits is nearly lossless for every layer; the outlier layer is the most sensitive at 2 bits.
    for s in &sens {
        assert!(s.weight[3].1 < 0.01 * s.weight[0].1, "{}: {:?}", s.name, s.weight);
    }
    let names: Vec<&str> = sens.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["fc1", "fc2", "fc3"]);
    for b in 0..4 {
        assert!(sens[1].weight[b].1 > 10.0 * sens[0].weight[b].1.max(sens[2].weight[b].1), "{sens:?}");
    }
    for avg in [3.0, 4.0] {
        let (choices, b) =
            problem(&sens, Budget::Bits(avg), ErrorSource::Measured, &CostModel::default(), 0.0).unwrap();
        let a = allocate(&choices, b).unwrap();
        let params: usize = sens.iter().map(|s| s.params).sum();
        let bits: Vec<u8> = a.picks.iter().zip(&choices).map(|(&k, c)| c[k].label[1..].parse().unwrap()).collect();
        let used: usize = bits.iter().zip(&sens).map(|(&b, s)| b as usize * s.params).sum();
        assert!(used as f64 <= avg * params as f64, "budget {avg}: {bits:?}");
        assert!(
            bits[1] > bits[0] && bits[1] > bits[2],
            "budget {avg}: the outlier layer should get the most bits: {bits:?} {sens:?}"
        );
        // The config realises the allocation.
        let c = apply(&cfg, &sens, &choices, &a);
        assert_eq!(c.layers["fc2"].wbits, Some(bits[1]));
    }
}

#[test]
fn saliency_weights_move_bits_to_the_layer_the_weighted_states_need() {
    // Two heads read disjoint halves of the state (head0 dims 0-3, head1 dims 4-7). States of
    // kind A are large on dims 0-3, kind B on dims 4-7, so each head's weight error shows on its
    // own kind. Weighting only kind A (or only B) must give head0 (or head1) the extra bits.
    let mut r = Rng::new(5);
    let mut g = Graph::new("two");
    let x = g.add_input("obs", ValueType::new(DType::F32, vec![Dim::Sym("N".into()), Dim::Known(8)]));
    let mut outs = vec![];
    for i in 0..2 {
        let mut w = r.tensor(vec![4, 8], 0.5).data.to_f32_vec();
        w.iter_mut().enumerate().filter(|(j, _)| (j % 8) / 4 != i).for_each(|(_, v)| *v = 0.0);
        let w = g.add_const(format!("w{i}"), Tensor::from_f32(vec![4, 8], w).unwrap());
        outs.push(g.add_inferred(format!("head{i}"), GEMM, &[Some(x), Some(w), None], format!("y{i}")).unwrap());
    }
    let y = g.add_inferred("cat", Op::Concat { axis: 1 }, &[Some(outs[0]), Some(outs[1])], "y").unwrap();
    g.outputs.push(y);
    let mut v = r.tensor(vec![256, 8], 1.0).data.to_f32_vec();
    for (i, x) in v.iter_mut().enumerate() {
        let (row, dim) = (i / 8, i % 8);
        if (row < 128) == (dim < 4) {
            *x *= 20.0;
        }
    }
    let f = vec![HashMap::from([("obs".to_string(), Tensor::from_f32(vec![256, 8], v).unwrap())])];
    let cfg = base();
    let layers = allocatable_layers(&g, &cfg).unwrap();
    let bits_for = |w: &[f32]| -> Vec<String> {
        let m = Measure::new(&g, &cfg, Recipe::Rtn, &f, &f, w).unwrap();
        let sens = sensitivity(&m, &layers, &[2, 3, 4], &[], |_| {}).unwrap();
        let (choices, b) =
            problem(&sens, Budget::Bits(3.0), ErrorSource::Measured, &CostModel::default(), 0.0).unwrap();
        let a = allocate(&choices, b).unwrap();
        a.picks.iter().zip(&choices).map(|(&k, c)| c[k].label.clone()).collect()
    };
    let a: Vec<f32> = (0..256).map(|i| if i < 128 { 1.0 } else { 0.0 }).collect();
    let b: Vec<f32> = a.iter().map(|w| 1.0 - w).collect();
    assert_eq!(bits_for(&a), vec!["W4", "W2"], "weighting kind A");
    assert_eq!(bits_for(&b), vec!["W2", "W4"], "weighting kind B");
}

#[test]
fn hutchinson_traces_match_a_linear_layer_closed_form() {
    // y = x W^T: L = mean_s mean_j (x_s . dW_j)^2, so tr(H) = 2/N sum_s ||x_s||^2.
    let mut r = Rng::new(2);
    let mut g = Graph::new("lin");
    let x = g.add_input("obs", ValueType::new(DType::F32, vec![Dim::Sym("N".into()), Dim::Known(8)]));
    let w = g.add_const("w", r.tensor(vec![3, 8], 0.5));
    let y = g.add_inferred("fc", GEMM, &[Some(x), Some(w), None], "y").unwrap();
    g.outputs.push(y);
    let f = feeds(&mut r, 64);
    let xs = f[0]["obs"].data.to_f32_vec();
    let want = 2.0 / 64.0 * xs.iter().map(|&v| (v as f64).powi(2)).sum::<f64>();
    let layers = allocatable_layers(&g, &base()).unwrap();
    let t = hessian_traces(&g, &layers, &f, &[1.0; 64], 64, 1).unwrap();
    let rel = (t.trace[0] - want).abs() / want;
    assert!(rel < 0.05, "trace {} vs closed form {want} (std err {})", t.trace[0], t.std_err[0]);
}
