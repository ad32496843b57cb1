//! Gradient checks: for every differentiable op, the `grad` pass's backward graph against
//! central finite differences of the forward graph (inputs in f64, so differences are exact to
//! about 1e-9), over random shapes and values; plus the LSQ FakeQuant rule against its formula.

use proptest::prelude::*;
use sqil_ir::interp::run;
use sqil_ir::ops::{BinaryOp, ReduceOp, UnaryOp};
use sqil_ir::testing::Rng;
use sqil_ir::{DType, Data, Dim, Graph, Op, Tensor, ValueRef, ValueType};
use sqil_passes::grad::grad;
use std::collections::HashMap;

fn t64(r: &mut Rng, shape: Vec<usize>, lo: f64) -> Tensor {
    let n = shape.iter().product();
    Tensor::new(shape, Data::F64((0..n).map(|_| r.unit() as f64 * 1.5 + lo).collect())).unwrap()
}

/// `loss = sum(op(inputs) * c)` with a random `c`; checks d loss / d input for every input.
fn check(op: Op, shapes: &[Vec<usize>], seed: u64, lo: &[f64]) {
    let mut r = Rng::new(seed);
    let mut g = Graph::new("check");
    let mut feeds = HashMap::new();
    let mut xs: Vec<ValueRef> = vec![];
    for (i, s) in shapes.iter().enumerate() {
        let name = format!("x{i}");
        xs.push(g.add_input(&name, ValueType::new(DType::F64, s.iter().map(|&d| Dim::Known(d)).collect())));
        feeds.insert(name, t64(&mut r, s.clone(), lo.get(i).copied().unwrap_or(0.0)));
    }
    let y = g.add_inferred("op", op.clone(), &xs.iter().map(|v| Some(*v)).collect::<Vec<_>>(), "y").unwrap();
    let yshape = g.value(y).ty.known_shape().unwrap().to_vec();
    let c = g.add_const("c", t64(&mut r, yshape, 0.0));
    let p = g.add_inferred("mul", Op::Binary(BinaryOp::Mul), &[Some(y), Some(c)], "p").unwrap();
    let red = Op::Reduce { op: ReduceOp::Sum, keepdims: false, noop_with_empty_axes: false };
    let loss = g.add_inferred("sum", red, &[Some(p), None], "loss").unwrap();
    let mut gg = g.clone();
    let grads = grad(&mut gg, loss, &xs).unwrap();
    gg.outputs = grads.clone();
    sqil_ir::verify(&gg).unwrap();
    let got = run(&gg, &feeds).unwrap();
    g.outputs = vec![loss];
    let f = |feeds: &HashMap<String, Tensor>| run(&g, feeds).unwrap()[0].data.to_f64_vec()[0];
    for (i, gi) in got.iter().enumerate() {
        let name = format!("x{i}");
        let base = feeds[&name].data.to_f64_vec();
        let gv = gi.data.to_f64_vec();
        for j in 0..base.len() {
            let h = 1e-5;
            let mut plus = feeds.clone();
            let mut v = base.clone();
            v[j] += h;
            plus.insert(name.clone(), Tensor::new(feeds[&name].shape.clone(), Data::F64(v.clone())).unwrap());
            let mut minus = feeds.clone();
            v[j] -= 2.0 * h;
            minus.insert(name.clone(), Tensor::new(feeds[&name].shape.clone(), Data::F64(v)).unwrap());
            let fd = (f(&plus) - f(&minus)) / (2.0 * h);
            // Backward values are f32: relative 1e-4 plus a little absolute slack.
            assert!(
                (fd - gv[j]).abs() <= 1e-4 * fd.abs().max(1.0),
                "{} input {i}[{j}]: analytic {} vs numeric {fd}",
                op.name(),
                gv[j]
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    #[test]
    fn unary_and_activation_grads(seed in any::<u64>(), m in 1usize..4, n in 1usize..5) {
        for u in [UnaryOp::Relu, UnaryOp::Tanh, UnaryOp::Sigmoid, UnaryOp::Neg, UnaryOp::Exp, UnaryOp::Softplus, UnaryOp::Erf, UnaryOp::Abs] {
            check(Op::Unary(u), &[vec![m, n]], seed, &[0.0]);
        }
        for u in [UnaryOp::Log, UnaryOp::Sqrt, UnaryOp::Reciprocal] {
            check(Op::Unary(u), &[vec![m, n]], seed, &[2.0]);
        }
        check(Op::Gelu { tanh: false }, &[vec![m, n]], seed, &[0.0]);
        check(Op::Gelu { tanh: true }, &[vec![m, n]], seed, &[0.0]);
        check(Op::LeakyRelu { alpha: 0.1 }, &[vec![m, n]], seed, &[0.0]);
        check(Op::Elu { alpha: 0.7 }, &[vec![m, n]], seed, &[0.0]);
    }

    #[test]
    fn binary_grads_with_broadcasting(seed in any::<u64>(), m in 1usize..4, n in 1usize..5) {
        for b in [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul, BinaryOp::Div] {
            check(Op::Binary(b), &[vec![m, n], vec![n]], seed, &[0.0, 3.0]);
            check(Op::Binary(b), &[vec![m, 1], vec![m, n]], seed, &[0.0, 3.0]);
        }
        check(Op::Binary(BinaryOp::Pow), &[vec![m, n], vec![n]], seed, &[2.0, 0.0]);
    }

    #[test]
    fn gemm_and_matmul_grads(seed in any::<u64>(), m in 1usize..4, k in 1usize..5, n in 1usize..4) {
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            let a = if ta { vec![k, m] } else { vec![m, k] };
            let b = if tb { vec![n, k] } else { vec![k, n] };
            check(Op::Gemm { alpha: 0.7, beta: 1.3, trans_a: ta, trans_b: tb }, &[a, b, vec![n]], seed, &[0.0; 3]);
        }
        check(Op::MatMul, &[vec![m, k], vec![k, n]], seed, &[0.0; 2]);
        check(Op::MatMul, &[vec![2, m, k], vec![k, n]], seed, &[0.0; 2]);
        check(Op::MatMul, &[vec![2, m, k], vec![2, k, n]], seed, &[0.0; 2]);
    }

    #[test]
    fn normalisation_and_reduction_grads(seed in any::<u64>(), m in 1usize..4, n in 2usize..6) {
        check(Op::Softmax { axis: -1, coerce_2d: false }, &[vec![m, n]], seed, &[0.0]);
        check(Op::Softmax { axis: 0, coerce_2d: false }, &[vec![m, n]], seed, &[0.0]);
        check(Op::LayerNorm { axis: -1, epsilon: 1e-5 }, &[vec![m, n], vec![n], vec![n]], seed, &[0.0, 1.0, 0.0]);
        for op in [ReduceOp::Mean, ReduceOp::Sum] {
            check(Op::Reduce { op, keepdims: true, noop_with_empty_axes: false }, &[vec![m, n]], seed, &[0.0]);
        }
        check(Op::Identity, &[vec![m, n]], seed, &[0.0]);
    }
}

#[test]
fn lsq_fake_quant_gradients_follow_the_formula() {
    // x in three regimes around a 4-bit signed grid with step 0.5: inside, below, above.
    let x = Tensor::from_f32(vec![1, 4], vec![0.3, 1.6, -9.0, 9.0]).unwrap();
    let s = Tensor::from_f32(vec![1], vec![0.5]).unwrap();
    let dy = Tensor::from_f32(vec![1, 4], vec![1.0, 1.0, 1.0, 1.0]).unwrap();
    let op = Op::FakeQuant { bits: 4, signed: true, axis: 0, block_size: 0 };
    let dx = sqil_ir::ops::grad::vjp(&op, &[Some(&x), Some(&s)], &dy, 0).unwrap().data.to_f32_vec();
    assert_eq!(dx, vec![1.0, 1.0, 0.0, 0.0], "straight through inside the range only");
    let ds = sqil_ir::ops::grad::vjp(&op, &[Some(&x), Some(&s)], &dy, 1).unwrap().data.to_f32_vec()[0];
    // round(0.6) - 0.6 = 0.4, round(3.2) - 3.2 = -0.2, qmin = -8, qmax = 7; scale 1/sqrt(4 * 7).
    let want = (0.4 - 0.2 - 8.0 + 7.0) / (4.0f32 * 7.0).sqrt();
    assert!((ds - want).abs() < 1e-6, "{ds} vs {want}");
}
