//! Seeded random graphs for property tests (text round trip, passes preserving semantics).
//! Deterministic: the same seed gives the same graph and inputs.

use crate::graph::{Graph, Value, ValueRef};
use crate::ops::{BinaryOp, Op, UnaryOp};
use crate::shape::{Dim, ValueType};
use crate::tensor::{Data, Tensor};
use crate::{AttrMap, DType};
use std::collections::HashMap;

/// SplitMix64: a tiny, good-enough generator with no dependencies.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    /// Uniform in [-1, 1).
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    pub fn tensor(&mut self, shape: Vec<usize>, scale: f32) -> Tensor {
        let n = shape.iter().product();
        let v = (0..n)
            .map(|_| match self.below(40) {
                0 => -0.0,
                1 => 1e-40, // subnormal
                _ => self.unit() * scale,
            })
            .collect();
        Tensor::new(shape, Data::F32(v)).expect("sized")
    }
}

/// Element-wise functions the random graphs draw from: every op of the table but those whose
/// domain is restricted (they would make NaN and infinities the tests are not about).
fn unary_ops() -> Vec<UnaryOp> {
    let restricted = [UnaryOp::Log, UnaryOp::Sqrt, UnaryOp::Reciprocal];
    crate::ops::UNARY_OPS.iter().map(|d| d.op).filter(|u| !restricted.contains(u)).collect()
}

/// A random graph over one input `f32[N, d]` and the feeds for a batch of 3.
pub fn random_graph(seed: u64) -> (Graph, HashMap<String, Tensor>) {
    let mut r = Rng::new(seed);
    let mut g = Graph::new(format!("random {seed}"));
    let d0 = 2 + r.below(6);
    let x = g.add_input("obs", ValueType::new(DType::F32, vec![Dim::Sym("N".into()), Dim::Known(d0)]));
    // Live values with their feature width.
    let mut vals: Vec<(ValueRef, usize)> = vec![(x, d0)];
    let steps = 3 + r.below(10);
    let mut k = 0;
    let mut name = |r: &mut Rng, what: &str| {
        k += 1;
        match r.below(4) {
            0 => format!("/blk{k}/{what}:0"),
            1 => format!("{what} \"{k}\""),
            _ => format!("{what}_{k}"),
        }
    };
    for _ in 0..steps {
        let (v, d) = vals[r.below(vals.len())];
        let nm = name(&mut r, "v");
        let node = name(&mut r, "n");
        let op_kind = r.below(13);
        let out = match op_kind {
            0 => {
                let ops = unary_ops();
                let u = ops[r.below(ops.len())];
                // Keep Exp finite: feed it a squashed value.
                let src = if u == UnaryOp::Exp {
                    g.add_inferred(name(&mut r, "n"), Op::Unary(UnaryOp::Tanh), &[Some(v)], name(&mut r, "v")).unwrap()
                } else {
                    v
                };
                (g.add_inferred(node, Op::Unary(u), &[Some(src)], nm).unwrap(), d)
            }
            1 => {
                let o = [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul][r.below(3)];
                let shape = [vec![d], vec![1, d], vec![]][r.below(3)].clone();
                // Sometimes the constant is itself computed from constants (for const-fold).
                let c = if r.below(2) == 0 {
                    g.add_const(name(&mut r, "c"), r.tensor(shape, 1.0))
                } else {
                    let a = g.add_const(name(&mut r, "c"), r.tensor(shape.clone(), 1.0));
                    let b = g.add_const(name(&mut r, "c"), r.tensor(shape, 1.0));
                    g.add_inferred(name(&mut r, "n"), Op::Binary(BinaryOp::Mul), &[Some(a), Some(b)], name(&mut r, "v"))
                        .unwrap()
                };
                (g.add_inferred(node, Op::Binary(o), &[Some(v), Some(c)], nm).unwrap(), d)
            }
            2 => {
                let d2 = 1 + r.below(8);
                let w = g.add_const(name(&mut r, "w"), r.tensor(vec![d2, d], 0.5));
                let b = g.add_const(name(&mut r, "b"), r.tensor(vec![d2], 0.5));
                let op = Op::Gemm { alpha: 1.0 + r.unit() * 0.5, beta: 1.0, trans_a: false, trans_b: true };
                (g.add_inferred(node, op, &[Some(v), Some(w), Some(b)], nm).unwrap(), d2)
            }
            3 => {
                let d2 = 1 + r.below(8);
                let w = g.add_const(name(&mut r, "w"), r.tensor(vec![d, d2], 0.5));
                (g.add_inferred(node, Op::MatMul, &[Some(v), Some(w)], nm).unwrap(), d2)
            }
            4 => {
                let axis = [-1, 1][r.below(2)];
                let op = if r.below(2) == 0 {
                    Op::Softmax { axis, coerce_2d: false }
                } else {
                    Op::LogSoftmax { axis, coerce_2d: false }
                };
                (g.add_inferred(node, op, &[Some(v)], nm).unwrap(), d)
            }
            5 => {
                let s = g.add_const(name(&mut r, "s"), r.tensor(vec![d], 1.0));
                let b = g.add_const(name(&mut r, "b"), r.tensor(vec![d], 1.0));
                let op = Op::LayerNorm { axis: -1, epsilon: 1e-5 };
                (g.add_inferred(node, op, &[Some(v), Some(s), Some(b)], nm).unwrap(), d)
            }
            6 => {
                let lo = g.add_const(name(&mut r, "lo"), Tensor::scalar_f32(-0.5));
                let hi = g.add_const(name(&mut r, "hi"), Tensor::scalar_f32(0.75));
                (g.add_inferred(node, Op::Clip, &[Some(v), Some(lo), Some(hi)], nm).unwrap(), d)
            }
            7 => {
                let bits = [2u8, 3, 4, 8][r.below(4)];
                let s = g.add_const(name(&mut r, "scale"), Tensor::scalar_f32(0.05 + r.unit().abs() * 0.2));
                let op = Op::FakeQuant { bits, signed: r.below(2) == 0, axis: 1, block_size: 0 };
                (g.add_inferred(node, op, &[Some(v), Some(s)], nm).unwrap(), d)
            }
            8 => {
                let (w, dw) = vals[r.below(vals.len())];
                (g.add_inferred(node, Op::Concat { axis: 1 }, &[Some(v), Some(w)], nm).unwrap(), d + dw)
            }
            9 => {
                let shape = g.add_const(name(&mut r, "shape"), Tensor::from_i64(vec![2], vec![-1, d as i64]).unwrap());
                (g.add_inferred(node, Op::Reshape { allowzero: false }, &[Some(v), Some(shape)], nm).unwrap(), d)
            }
            10 => {
                let mut a = AttrMap::new();
                a.insert("alpha", crate::Attr::Float(0.1 + r.unit().abs()));
                let op =
                    if r.below(2) == 0 { Op::from_attrs("LeakyRelu", &a, 1) } else { Op::from_attrs("Elu", &a, 1) };
                (g.add_inferred(node, op.unwrap(), &[Some(v)], nm).unwrap(), d)
            }
            11 => {
                // Inference BatchNorm over features (for BatchNorm folding).
                let p = |r: &mut Rng, g: &mut Graph, what: &str, lo: f32| {
                    let t = r.tensor(vec![d], 0.5);
                    let t = Tensor::new(vec![d], Data::F32(t.data.to_f32_vec().iter().map(|v| v.abs() + lo).collect()))
                        .expect("sized");
                    g.add_const(what.to_string() + &r.next_u64().to_string(), t)
                };
                let (sc, bi, me, va) = (
                    p(&mut r, &mut g, "s", 0.5),
                    p(&mut r, &mut g, "b", -0.2),
                    p(&mut r, &mut g, "m", -0.3),
                    p(&mut r, &mut g, "var", 0.1),
                );
                let op = Op::BatchNorm { epsilon: 1e-5, momentum: 0.9, training: false };
                (g.add_inferred(node, op, &[Some(v), Some(sc), Some(bi), Some(me), Some(va)], nm).unwrap(), d)
            }
            _ => {
                // A dead branch, for dead-code elimination.
                let t = g.add_inferred(node, Op::Unary(UnaryOp::Tanh), &[Some(v)], nm).unwrap();
                let _ = g.add_node(
                    name(&mut r, "dead"),
                    Op::Identity,
                    &[Some(t)],
                    vec![Value { name: name(&mut r, "deadv"), ty: g.value(t).ty.clone() }],
                );
                (t, d)
            }
        };
        vals.push(out);
    }
    g.outputs.push(vals.last().expect("nonempty").0);
    if r.below(2) == 0 {
        let extra = vals[r.below(vals.len() - 1) + 1].0;
        if !g.outputs.contains(&extra) {
            g.outputs.push(extra);
        }
    }
    let feeds = HashMap::from([("obs".to_string(), r.tensor(vec![3, d0], 2.0))]);
    (g, feeds)
}

/// True if two output lists agree bit for bit (NaN included).
pub fn bitwise_equal(a: &[Tensor], b: &[Tensor]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.shape == y.shape && x.dtype() == y.dtype() && x.data.to_le_bytes() == y.data.to_le_bytes())
}
