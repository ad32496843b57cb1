//! The VLA-scale decoder block of the benchmarks (`vla_step`, `dp_step`): Llama-style decoder
//! layers (hidden 4096, 32 heads, SwiGLU MLP 11008, RMSNorm, causal attention; no rotary
//! embedding) over already embedded tokens, an action head on the mean token, LSQ fake quantizers
//! on every linear layer (weights 4-bit in groups of 64 along the input axis, inputs 8-bit per
//! tensor). `tools/bench_vla_torch.py` is the same model in PyTorch.

use sqil_ir::ops::{BinaryOp, ReduceOp, UnaryOp};
use sqil_ir::testing::Rng;
use sqil_ir::{DType, Dim, Graph, Op, Tensor, ValueRef, ValueType};

pub const H: usize = 4096;
pub const HEADS: usize = 32;
pub const MLP: usize = 11008;
pub const ACT: usize = 7;

struct B<'a> {
    g: &'a mut Graph,
    k: usize,
}

impl B<'_> {
    fn name(&mut self, s: &str) -> String {
        self.k += 1;
        format!("{s}.{}", self.k)
    }
    fn op(&mut self, op: Op, ins: &[ValueRef], s: &str) -> ValueRef {
        let n = self.name(s);
        let ins: Vec<Option<ValueRef>> = ins.iter().map(|v| Some(*v)).collect();
        self.g.add_inferred(n.clone(), op, &ins, n).unwrap()
    }
    fn konst(&mut self, t: Tensor, s: &str) -> ValueRef {
        let n = self.name(s);
        self.g.add_const(n, t)
    }
    fn ints(&mut self, v: Vec<i64>) -> ValueRef {
        self.konst(Tensor::from_i64(vec![v.len()], v).unwrap(), "i")
    }
    fn bin(&mut self, b: BinaryOp, x: ValueRef, y: ValueRef) -> ValueRef {
        self.op(Op::Binary(b), &[x, y], "b")
    }
    /// LSQ-quantized `x @ w` for a weight `[k, n]` (groups of 64 along k) and a per-tensor 8-bit input.
    fn linear(&mut self, r: &mut Rng, x: ValueRef, k: usize, n: usize, s: &str) -> ValueRef {
        let w = r.tensor(vec![k, n], (1.0 / k as f32).sqrt());
        let wv = w.data.to_f32_vec();
        let mut sc = vec![0f32; k / 64 * n];
        for (i, &v) in wv.iter().enumerate() {
            let c = &mut sc[(i / n) / 64 * n + i % n];
            *c = c.max(v.abs() / 7.0);
        }
        sc.iter_mut().for_each(|c| *c = c.max(1e-6));
        let wc = self.konst(w, &format!("{s}.w"));
        let ws = self.konst(Tensor::from_f32(vec![k / 64, n], sc).unwrap(), &format!("{s}.ws"));
        let wq =
            self.op(Op::FakeQuant { bits: 4, signed: true, axis: 0, block_size: 64 }, &[wc, ws], &format!("{s}.wq"));
        let xs = self.konst(Tensor::from_f32(vec![1], vec![0.05]).unwrap(), &format!("{s}.as"));
        let xq = self.op(Op::FakeQuant { bits: 8, signed: true, axis: 0, block_size: 0 }, &[x, xs], &format!("{s}.aq"));
        self.op(Op::MatMul, &[xq, wq], s)
    }
    fn rmsnorm(&mut self, x: ValueRef) -> ValueRef {
        let sq = self.bin(BinaryOp::Mul, x, x);
        let ax = self.ints(vec![-1]);
        let ms =
            self.op(Op::Reduce { op: ReduceOp::Mean, keepdims: true, noop_with_empty_axes: false }, &[sq, ax], "ms");
        let eps = self.konst(Tensor::from_f32(vec![1], vec![1e-5]).unwrap(), "eps");
        let ms = self.bin(BinaryOp::Add, ms, eps);
        let r = self.op(Op::Unary(UnaryOp::Sqrt), &[ms], "rms");
        let y = self.bin(BinaryOp::Div, x, r);
        let gain = self.konst(Tensor::from_f32(vec![H], vec![1.0; H]).unwrap(), "gain");
        self.bin(BinaryOp::Mul, y, gain)
    }
}

pub fn build(layers: usize, b: usize, t: usize) -> Graph {
    let mut g = Graph::new("vla");
    let x0 =
        g.add_input("tokens", ValueType::new(DType::F32, vec![Dim::Sym("N".into()), Dim::Known(t), Dim::Known(H)]));
    let mut bl = B { g: &mut g, k: 0 };
    let mut r = Rng::new(5);
    let hd = H / HEADS;
    let mut mask = vec![0f32; t * t];
    for i in 0..t {
        for j in i + 1..t {
            mask[i * t + j] = -1e9;
        }
    }
    let mask = bl.konst(Tensor::from_f32(vec![t, t], mask).unwrap(), "mask");
    let inv = bl.konst(Tensor::from_f32(vec![1], vec![1.0 / (hd as f32).sqrt()]).unwrap(), "inv_sqrt_d");
    let mut x = x0;
    let _ = b;
    for l in 0..layers {
        let n = bl.rmsnorm(x);
        let heads = |bl: &mut B, v: ValueRef| {
            let s = bl.ints(vec![0, t as i64, HEADS as i64, hd as i64]);
            let v = bl.op(Op::Reshape { allowzero: false }, &[v, s], "heads");
            bl.op(Op::Transpose { perm: Some(vec![0, 2, 1, 3]) }, &[v], "t")
        };
        let q = bl.linear(&mut r, n, H, H, &format!("l{l}.q"));
        let k = bl.linear(&mut r, n, H, H, &format!("l{l}.k"));
        let v = bl.linear(&mut r, n, H, H, &format!("l{l}.v"));
        let (q, k, v) = (heads(&mut bl, q), heads(&mut bl, k), heads(&mut bl, v));
        let kt = bl.op(Op::Transpose { perm: Some(vec![0, 1, 3, 2]) }, &[k], "kt");
        let s = bl.op(Op::MatMul, &[q, kt], "scores");
        let s = bl.bin(BinaryOp::Mul, s, inv);
        let s = bl.bin(BinaryOp::Add, s, mask);
        let p = bl.op(Op::Softmax { axis: -1, coerce_2d: false }, &[s], "p");
        let o = bl.op(Op::MatMul, &[p, v], "attn");
        let o = bl.op(Op::Transpose { perm: Some(vec![0, 2, 1, 3]) }, &[o], "t");
        let sh = bl.ints(vec![0, t as i64, H as i64]);
        let o = bl.op(Op::Reshape { allowzero: false }, &[o, sh], "merge");
        let o = bl.linear(&mut r, o, H, H, &format!("l{l}.o"));
        x = bl.bin(BinaryOp::Add, x, o);
        let n2 = bl.rmsnorm(x);
        let gate = bl.linear(&mut r, n2, H, MLP, &format!("l{l}.gate"));
        let up = bl.linear(&mut r, n2, H, MLP, &format!("l{l}.up"));
        let sg = bl.op(Op::Unary(UnaryOp::Sigmoid), &[gate], "sig");
        let silu = bl.bin(BinaryOp::Mul, gate, sg);
        let a = bl.bin(BinaryOp::Mul, silu, up);
        let d = bl.linear(&mut r, a, MLP, H, &format!("l{l}.down"));
        x = bl.bin(BinaryOp::Add, x, d);
    }
    let ax = bl.ints(vec![1]);
    let m = bl.op(Op::Reduce { op: ReduceOp::Mean, keepdims: false, noop_with_empty_axes: false }, &[x, ax], "pool");
    let y = bl.linear(&mut r, m, H, ACT, "head");
    g.outputs = vec![y];
    g
}
