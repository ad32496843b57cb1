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

/// Random values, none within 1e-3 of 0: central differences of step 1e-5 never straddle the kink
/// of Relu, Abs, LeakyRelu, Elu or PRelu.
fn t64(r: &mut Rng, shape: Vec<usize>, lo: f64) -> Tensor {
    let n = shape.iter().product();
    let v = (0..n).map(|_| r.unit() as f64 * 1.5 + lo).map(|v| if v.abs() < 1e-3 { 1e-3f64.copysign(v) } else { v });
    Tensor::new(shape, Data::F64(v.collect())).unwrap()
}

/// A random permutation of evenly spaced values in (-1.5, 1.5): no two within `3 / n` of each
/// other, so a central difference never moves the maximum of a window (MaxPool's kink at a tie).
fn distinct64(r: &mut Rng, shape: Vec<usize>) -> Tensor {
    let n: usize = shape.iter().product();
    let mut v: Vec<f64> = (0..n).map(|k| (k as f64 + 0.5) * 3.0 / n as f64 - 1.5).collect();
    for i in (1..n).rev() {
        v.swap(i, r.below(i + 1));
    }
    Tensor::new(shape, Data::F64(v)).unwrap()
}

/// Conv runs in f32 only; it is linear in each input, so wide central differences are exact up
/// to f32 rounding of the loss.
fn f32_feeds(feeds: &mut HashMap<String, Tensor>) {
    for t in feeds.values_mut() {
        *t = t.cast(DType::F32);
    }
}

/// A positional input of the op under test: a fed f64 value (shape, lower bound of its random
/// values), whose gradient is checked, a fed value of distinct, spread values (for max-like ops),
/// or a constant (indices, conditions, shapes).
enum Arg {
    In(Vec<usize>, f64),
    Distinct(Vec<usize>),
    Const(Tensor),
}

/// `loss = sum(op(inputs) * c)` with a random `c`; checks d loss / d input for every input.
fn check(op: Op, shapes: &[Vec<usize>], seed: u64, lo: &[f64]) {
    check_in(op, shapes, seed, lo, DType::F64)
}

fn check_in(op: Op, shapes: &[Vec<usize>], seed: u64, lo: &[f64], dt: DType) {
    let args: Vec<Arg> =
        shapes.iter().enumerate().map(|(i, s)| Arg::In(s.clone(), lo.get(i).copied().unwrap_or(0.0))).collect();
    check_args(op, &args, seed, dt)
}

fn check_args(op: Op, args: &[Arg], seed: u64, dt: DType) {
    let (h, tol) = if dt == DType::F64 { (1e-5, 1e-4) } else { (1e-1, 2e-3) };
    let mut r = Rng::new(seed);
    let mut g = Graph::new("check");
    let mut feeds = HashMap::new();
    let mut xs: Vec<ValueRef> = vec![];
    let mut operands: Vec<Option<ValueRef>> = vec![];
    for (i, a) in args.iter().enumerate() {
        match a {
            Arg::In(s, _) | Arg::Distinct(s) => {
                let name = format!("x{}", xs.len());
                let v = g.add_input(&name, ValueType::new(dt, s.iter().map(|&d| Dim::Known(d)).collect()));
                let t = match a {
                    Arg::In(_, lo) => t64(&mut r, s.clone(), *lo),
                    _ => distinct64(&mut r, s.clone()),
                };
                feeds.insert(name, t);
                xs.push(v);
                operands.push(Some(v));
            }
            Arg::Const(t) => operands.push(Some(g.add_const(format!("k{i}"), t.clone()))),
        }
    }
    let y = g.add_inferred("op", op.clone(), &operands, "y").unwrap();
    let yshape = g.value(y).ty.known_shape().unwrap().to_vec();
    let c = g.add_const("c", t64(&mut r, yshape, 0.0).cast(dt));
    if dt == DType::F32 {
        f32_feeds(&mut feeds);
    }
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
            let mut plus = feeds.clone();
            let mut v = base.clone();
            v[j] += h;
            plus.insert(name.clone(), Tensor::new(feeds[&name].shape.clone(), Data::F64(v.clone())).unwrap().cast(dt));
            let mut minus = feeds.clone();
            v[j] -= 2.0 * h;
            minus.insert(name.clone(), Tensor::new(feeds[&name].shape.clone(), Data::F64(v)).unwrap().cast(dt));
            let fd = (f(&plus) - f(&minus)) / (2.0 * h);
            // Backward values are f32: relative 1e-4 plus a little absolute slack.
            assert!(
                (fd - gv[j]).abs() <= tol * fd.abs().max(1.0),
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
        // Inference-mode BatchNormalization with constant statistics: the gradient of x only.
        let mut r = Rng::new(seed ^ 7);
        let c = |r: &mut Rng, lo: f64| Arg::Const(t64(r, vec![n], lo));
        let bn = Op::BatchNorm { epsilon: 1e-5, momentum: 0.9, training: false };
        let args = [Arg::In(vec![m, n, 3], 0.0), c(&mut r, 0.0), c(&mut r, 0.0), c(&mut r, 0.0), c(&mut r, 2.0)];
        check_args(bn, &args, seed, DType::F64);
        for op in [ReduceOp::Mean, ReduceOp::Sum] {
            check(Op::Reduce { op, keepdims: true, noop_with_empty_axes: false }, &[vec![m, n]], seed, &[0.0]);
        }
        check(Op::Identity, &[vec![m, n]], seed, &[0.0]);
    }
}

#[test]
fn f32_products_in_matmul_and_gemm_vjps_match_f64() {
    // f32 operands take the sgemm path; the same values in f64 take the f64 one.
    let mut r = Rng::new(9);
    // (op, A shape, B shape, dY shape)
    type Case = (Op, Vec<usize>, Vec<usize>, Vec<usize>);
    let cases: Vec<Case> = vec![
        (Op::MatMul, vec![2, 3, 5], vec![5, 4], vec![2, 3, 4]),
        (Op::MatMul, vec![2, 3, 5], vec![2, 5, 4], vec![2, 3, 4]),
        (Op::Gemm { alpha: 0.5, beta: 1.0, trans_a: true, trans_b: true }, vec![5, 3], vec![4, 5], vec![3, 4]),
        (Op::Gemm { alpha: 1.0, beta: 1.0, trans_a: false, trans_b: false }, vec![3, 5], vec![5, 4], vec![3, 4]),
    ];
    for (op, a, b, y) in cases {
        let (a64, b64, dy64) = (t64(&mut r, a, -0.7), t64(&mut r, b, -0.7), t64(&mut r, y, -0.7));
        let (a32, b32, dy32) = (a64.cast(DType::F32), b64.cast(DType::F32), dy64.cast(DType::F32));
        for wrt in 0..2 {
            let want = sqil_ir::ops::grad::vjp(&op, &[Some(&a64), Some(&b64)], &dy64, wrt).unwrap().data.to_f64_vec();
            let got = sqil_ir::ops::grad::vjp(&op, &[Some(&a32), Some(&b32)], &dy32, wrt).unwrap().data.to_f64_vec();
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= 1e-5 * w.abs().max(1.0), "{} wrt {wrt}: f32 {g} vs f64 {w}", op.name());
            }
        }
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

proptest! {
    #![proptest_config(ProptestConfig::with_cases(8))]

    #[test]
    fn layout_and_conv_grads(seed in any::<u64>(), m in 1usize..3, n in 2usize..5) {
        check(Op::Transpose { perm: Some(vec![1, 0, 2]) }, &[vec![m, n, 3]], seed, &[0.0]);
        check(Op::Transpose { perm: None }, &[vec![m, n]], seed, &[0.0]);
        check(Op::Concat { axis: 1 }, &[vec![m, n], vec![m, 2]], seed, &[0.0, 0.0]);
        for axis in [1i64, -1] {
            gather_check(axis, m, n, seed);
        }
        let mut a = sqil_ir::AttrMap::new();
        a.insert("strides", sqil_ir::Attr::Ints(vec![2, 1]));
        a.insert("pads", sqil_ir::Attr::Ints(vec![1, 0, 0, 1]));
        a.insert("kernel_shape", sqil_ir::Attr::Ints(vec![3, 2]));
        let conv = Op::from_attrs("Conv", &a, 1).unwrap();
        check_in(conv, &[vec![m, 2, n + 3, 4], vec![3, 2, 3, 2], vec![3]], seed, &[0.0; 3], DType::F32);
        a.insert("group", sqil_ir::Attr::Int(2));
        let grouped = Op::from_attrs("Conv", &a, 1).unwrap();
        check_in(grouped, &[vec![1, 4, n + 2, 3], vec![2, 2, 3, 2], vec![2]], seed, &[0.0; 3], DType::F32);
    }
}

fn ints(v: &[i64]) -> Tensor {
    Tensor::from_i64(vec![v.len()], v.to_vec()).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(8))]

    #[test]
    fn pooling_slicing_and_selection_grads(seed in any::<u64>(), m in 1usize..3, n in 3usize..6) {
        let pool = |name: &str, pads: Vec<i64>, include_pad: i64| {
            let mut a = sqil_ir::AttrMap::new();
            a.insert("kernel_shape", sqil_ir::Attr::Ints(vec![2, 3]));
            a.insert("strides", sqil_ir::Attr::Ints(vec![1, 2]));
            a.insert("pads", sqil_ir::Attr::Ints(pads));
            a.insert("count_include_pad", sqil_ir::Attr::Int(include_pad));
            Op::from_attrs(name, &a, 1).unwrap()
        };
        let img = vec![Arg::In(vec![m, 2, n, n + 1], 0.0)];
        check_args(pool("MaxPool", vec![0, 1, 1, 0], 0), &[Arg::Distinct(vec![m, 2, n, n + 1])], seed, DType::F64);
        check_args(pool("AveragePool", vec![0, 1, 1, 0], 0), &img, seed, DType::F64);
        check_args(pool("AveragePool", vec![1, 1, 1, 1], 1), &img, seed, DType::F64);
        check_args(Op::GlobalAveragePool, &img, seed, DType::F64);
        // Slice with negative start, step 2 and a reversed axis.
        let slice = [Arg::In(vec![m, n, 4], 0.0), Arg::Const(ints(&[1 - n as i64, 3])), Arg::Const(ints(&[i64::MAX, 0])),
            Arg::Const(ints(&[1, 2])), Arg::Const(ints(&[2, -1]))];
        check_args(Op::Slice, &slice, seed, DType::F64);
        check_args(Op::Expand, &[Arg::In(vec![n, 1], 0.0), Arg::Const(ints(&[m as i64, n as i64, 3]))], seed, DType::F64);
        let cond = Tensor::new(vec![n], Data::Bool((0..n).map(|i| !(i as u64).wrapping_add(seed).is_multiple_of(3)).collect())).unwrap();
        check_args(Op::Where, &[Arg::Const(cond), Arg::In(vec![m, n], 0.0), Arg::In(vec![n], 0.0)], seed, DType::F64);
        check(Op::PRelu, &[vec![m, n], vec![n]], seed, &[-0.75, 0.0]);
        check(Op::LogSoftmax { axis: -1, coerce_2d: false }, &[vec![m, n]], seed, &[0.0]);
    }
}

/// Gather with constant indices (one repeated, one negative): the gradient with respect to the data.
fn gather_check(axis: i64, m: usize, n: usize, seed: u64) {
    let mut r = Rng::new(seed);
    let mut g = Graph::new("gather");
    let x = g.add_input("x", ValueType::new(DType::F64, vec![Dim::Known(m), Dim::Known(n), Dim::Known(2)]));
    let idx = g.add_const("i", Tensor::from_i64(vec![3], vec![0, -1, 0]).unwrap());
    let y = g.add_inferred("gather", Op::Gather { axis }, &[Some(x), Some(idx)], "y").unwrap();
    let red = Op::Reduce { op: ReduceOp::Sum, keepdims: false, noop_with_empty_axes: false };
    let sq = g.add_inferred("sq", Op::Binary(BinaryOp::Mul), &[Some(y), Some(y)], "sq").unwrap();
    let loss = g.add_inferred("sum", red, &[Some(sq), None], "loss").unwrap();
    let xt = t64(&mut r, vec![m, n, 2], 0.0);
    let grads = grad(&mut g, loss, &[x]).unwrap();
    g.outputs = grads;
    let dx = run(&g, &HashMap::from([("x".to_string(), xt.clone())])).unwrap()[0].data.to_f64_vec();
    // d/dx sum(y^2) = 2 x times how often each element was gathered.
    let xv = xt.data.to_f64_vec();
    let ax = if axis < 0 { 2 } else { 1 };
    let dims = [m, n, 2];
    for (i, (&d, &v)) in dx.iter().zip(&xv).enumerate() {
        let pos = (i / [n * 2, 2, 1][ax]) % dims[ax];
        let count = if pos == 0 && dims[ax] - 1 == 0 {
            3.0
        } else if pos == 0 {
            2.0
        } else if pos == dims[ax] - 1 {
            1.0
        } else {
            0.0
        };
        assert!(
            (d - 2.0 * v * count).abs() < 1e-4 * (1.0 + v.abs()),
            "gather axis {axis} element {i}: {d} vs {}",
            2.0 * v * count
        );
    }
}

#[test]
fn split_gradient_reaches_through_the_used_outputs() {
    // y = Split(x)[0] * c0 + Split(x)[2] * c2 (output 1 unused): dx = [c0, 0, c2] slabs.
    let mut g = Graph::new("split");
    let x = g.add_input("x", ValueType::new(DType::F32, vec![Dim::Known(2), Dim::Known(6)]));
    let n = g.add_node(
        "split",
        Op::Split { axis: 1, outputs: 3 },
        &[Some(x)],
        (0..3)
            .map(|k| sqil_ir::Value {
                name: format!("s{k}"),
                ty: ValueType::new(DType::F32, vec![Dim::Known(2), Dim::Known(2)]),
            })
            .collect(),
    );
    let c0 = g.add_const("c0", Tensor::from_f32(vec![2], vec![1.0, 2.0]).unwrap());
    let c2 = g.add_const("c2", Tensor::from_f32(vec![2], vec![3.0, 4.0]).unwrap());
    let a =
        g.add_inferred("m0", Op::Binary(BinaryOp::Mul), &[Some(ValueRef { node: n, slot: 0 }), Some(c0)], "a").unwrap();
    let b =
        g.add_inferred("m2", Op::Binary(BinaryOp::Mul), &[Some(ValueRef { node: n, slot: 2 }), Some(c2)], "b").unwrap();
    let s = g.add_inferred("add", Op::Binary(BinaryOp::Add), &[Some(a), Some(b)], "s").unwrap();
    let red = Op::Reduce { op: ReduceOp::Sum, keepdims: false, noop_with_empty_axes: false };
    let loss = g.add_inferred("sum", red, &[Some(s), None], "loss").unwrap();
    let grads = grad(&mut g, loss, &[x]).unwrap();
    g.outputs = grads;
    let feeds = HashMap::from([("x".to_string(), Tensor::from_f32(vec![2, 6], vec![0.5; 12]).unwrap())]);
    let dx = run(&g, &feeds).unwrap()[0].data.to_f32_vec();
    assert_eq!(dx, vec![1.0, 2.0, 0.0, 0.0, 3.0, 4.0, 1.0, 2.0, 0.0, 0.0, 3.0, 4.0]);
}
