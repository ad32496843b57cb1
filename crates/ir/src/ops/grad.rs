//! Vector-Jacobian products: for an op, its inputs, and the gradient `dy` of a loss with respect
//! to its (first) output, the gradient with respect to input `wrt`. The `grad` pass writes the
//! backward graph as `Vjp` nodes that call these rules, so the interpreter (and later the back
//! ends) run training with the same op semantics as inference.
//!
//! FakeQuant follows LSQ (Esser et al. 2020): straight-through rounding for `x` (zero gradient
//! where the value is clamped), and for the step size `s` the gradient `round(v) - v` inside the
//! range (`v = x / s`), the clamp bound `qmin - z` / `qmax - z` outside, scaled by
//! `1 / sqrt(n * qmax)` with `n` the number of elements sharing the step.
//!
//! Math in f64, results in f32.

use super::broadcast::broadcast_indices;
use super::quant::{fake_quant_range, param_index, round_even};
use super::{norm_axis, BinaryOp, Op, ReduceOp, UnaryOp};
use crate::error::{IrError, Result};
use crate::tensor::{Data, Tensor};

fn f64s(t: &Tensor) -> Vec<f64> {
    t.data.to_f64_vec()
}

fn out(shape: &[usize], v: Vec<f64>) -> Result<Tensor> {
    Tensor::from_f32(shape.to_vec(), v.into_iter().map(|x| x as f32).collect())
}

fn get<'a>(ins: &[Option<&'a Tensor>], i: usize) -> Result<&'a Tensor> {
    ins.get(i).copied().flatten().ok_or_else(|| IrError::Invalid(format!("Vjp: missing forward input {i}")))
}

/// Sums a gradient over the axes along which `shape` was broadcast to `g`'s shape.
pub fn unbroadcast(g: &[f64], gshape: &[usize], shape: &[usize]) -> Vec<f64> {
    let n: usize = shape.iter().product();
    if gshape == shape {
        return g.to_vec();
    }
    let idx = broadcast_indices(shape, gshape);
    let mut acc = vec![0f64; n];
    for (v, &i) in g.iter().zip(&idx) {
        acc[i] += v;
    }
    acc
}

/// Row-major matrix product `a [m, k] @ b [k, n]`, either operand possibly transposed in storage.
fn mm(a: &[f64], ta: bool, b: &[f64], tb: bool, m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut c = vec![0f64; m * n];
    let (sa, sb) = (if ta { (1, m) } else { (k, 1) }, if tb { (1, k) } else { (n, 1) });
    sqil_kernels_cpu::dgemm(m, k, n, 1.0, a, sa, b, sb, 0.0, &mut c, (n, 1));
    c
}

/// `alpha * a [m, k] @ b [k, n]` as a tensor of `shape`: in f32 (sgemm) when both operands are
/// f32, as PyTorch computes these gradients, else in f64.
#[allow(clippy::too_many_arguments)]
fn mm_t(
    a: &Tensor,
    ta: bool,
    b: &Tensor,
    tb: bool,
    m: usize,
    k: usize,
    n: usize,
    alpha: f64,
    shape: &[usize],
) -> Result<Tensor> {
    if let (Data::F32(av), Data::F32(bv)) = (&a.data, &b.data) {
        let mut c = vec![0f32; m * n];
        let (sa, sb) = (if ta { (1, m) } else { (k, 1) }, if tb { (1, k) } else { (n, 1) });
        sqil_kernels_cpu::sgemm(m, k, n, alpha as f32, av, sa, bv, sb, 0.0, &mut c, (n, 1));
        return Tensor::from_f32(shape.to_vec(), c);
    }
    out(shape, mm(&f64s(a), ta, &f64s(b), tb, m, k, n).into_iter().map(|x| x * alpha).collect())
}

/// A float type with a GEMM: `c = a [m, k] @ b [k, n]` with explicit (row, column) strides.
trait Gemm: Copy + Default {
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        m: usize,
        k: usize,
        n: usize,
        a: &[Self],
        sa: (usize, usize),
        b: &[Self],
        sb: (usize, usize),
        c: &mut [Self],
    );
}

impl Gemm for f32 {
    fn gemm(m: usize, k: usize, n: usize, a: &[f32], sa: (usize, usize), b: &[f32], sb: (usize, usize), c: &mut [f32]) {
        sqil_kernels_cpu::sgemm(m, k, n, 1.0, a, sa, b, sb, 0.0, c, (n, 1));
    }
}

impl Gemm for f64 {
    fn gemm(m: usize, k: usize, n: usize, a: &[f64], sa: (usize, usize), b: &[f64], sb: (usize, usize), c: &mut [f64]) {
        sqil_kernels_cpu::dgemm(m, k, n, 1.0, a, sa, b, sb, 0.0, c, (n, 1));
    }
}

/// Batched MatMul gradient before unbroadcasting: per batch item `t`, `dA_t = dY_t B_t^T`
/// (`wrt` 0) or `dB_t = A_t^T dY_t`, with `ai`/`bi` mapping the broadcast operands' elements.
#[allow(clippy::too_many_arguments)]
fn matmul_grad<T: Gemm>(
    av: &[T],
    bv: &[T],
    gv: &[T],
    ai: &[usize],
    bi: &[usize],
    nb: usize,
    (m, k, n): (usize, usize, usize),
    wrt: usize,
) -> Vec<T> {
    let mut full = vec![T::default(); if wrt == 0 { nb * m * k } else { nb * k * n }];
    for t in 0..nb {
        let gt = &gv[t * m * n..(t + 1) * m * n];
        if wrt == 0 {
            let bt: Vec<T> = (0..k * n).map(|i| bv[bi[t * k * n + i]]).collect();
            T::gemm(m, n, k, gt, (n, 1), &bt, (1, n), &mut full[t * m * k..(t + 1) * m * k]);
        } else {
            let at: Vec<T> = (0..m * k).map(|i| av[ai[t * m * k + i]]).collect();
            T::gemm(k, m, n, &at, (1, k), gt, (n, 1), &mut full[t * k * n..(t + 1) * k * n]);
        }
    }
    full
}

/// Softmax (`log` false) or LogSoftmax gradient along `axis`, with `p = softmax(x)`:
/// `p * (dy - sum(dy * p))`, or `dy - p * sum(dy)`.
fn softmax_grad(x: &Tensor, g: &[f64], axis: i64, log: bool) -> Result<Vec<f64>> {
    let xs = &x.shape;
    let ax = norm_axis(axis, xs.len())?;
    let (d, inner) = (xs[ax], xs[ax + 1..].iter().product::<usize>());
    let outer: usize = xs[..ax].iter().product();
    let xv = f64s(x);
    let mut r = vec![0f64; xv.len()];
    for o in 0..outer {
        for j in 0..inner {
            let at = |i: usize| (o * d + i) * inner + j;
            let mx = (0..d).map(|i| xv[at(i)]).fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = (0..d).map(|i| (xv[at(i)] - mx).exp()).collect();
            let s: f64 = e.iter().sum();
            if log {
                let gs: f64 = (0..d).map(|i| g[at(i)]).sum();
                (0..d).for_each(|i| r[at(i)] = g[at(i)] - e[i] / s * gs);
            } else {
                let dot: f64 = (0..d).map(|i| g[at(i)] * e[i] / s).sum();
                (0..d).for_each(|i| r[at(i)] = e[i] / s * (g[at(i)] - dot));
            }
        }
    }
    Ok(r)
}

/// The gradient with respect to input `wrt` of a multi-output op (Split), given the gradient of
/// each output (`None`: that output does not reach the loss).
pub fn vjp_multi(op: &Op, ins: &[Option<&Tensor>], dys: &[Option<&Tensor>], wrt: usize) -> Result<Tensor> {
    let x = get(ins, 0)?;
    match op {
        Op::Split { axis, .. } if wrt == 0 => {
            // Output k is the k-th slab along `axis`; its sizes come from the output gradients'
            // shapes, or the split input.
            let ax = norm_axis(*axis, x.rank())?;
            let sizes: Vec<usize> = match ins.get(1).copied().flatten() {
                Some(s) => s.data.to_i64_vec().iter().map(|&v| v as usize).collect(),
                None => {
                    let k = dys.len();
                    let base = x.shape[ax].div_ceil(k);
                    (0..k).map(|i| base.min(x.shape[ax].saturating_sub(i * base))).collect()
                }
            };
            let inner: usize = x.shape[ax + 1..].iter().product();
            let outer: usize = x.shape[..ax].iter().product();
            let d = x.shape[ax];
            let mut r = vec![0f64; x.len()];
            let mut start = 0;
            for (k, &sz) in sizes.iter().enumerate() {
                if let Some(Some(g)) = dys.get(k) {
                    let gv = f64s(g);
                    for o in 0..outer {
                        for i in 0..sz {
                            for j in 0..inner {
                                r[(o * d + start + i) * inner + j] = gv[(o * sz + i) * inner + j];
                            }
                        }
                    }
                }
                start += sz;
            }
            out(&x.shape, r)
        }
        _ => {
            let dy =
                dys.first().copied().flatten().ok_or_else(|| IrError::Invalid("Vjp: no output gradient".into()))?;
            if dys.len() > 1 && dys[1..].iter().any(Option::is_some) {
                return Err(IrError::Unsupported(format!("the gradient through extra outputs of {}", op.name())));
            }
            vjp(op, ins, dy, wrt)
        }
    }
}

/// The gradient with respect to input `wrt` of `op` at `inputs`, given the output gradient `dy`.
pub fn vjp(op: &Op, ins: &[Option<&Tensor>], dy: &Tensor, wrt: usize) -> Result<Tensor> {
    let g = f64s(dy);
    let x = get(ins, 0)?;
    let xs = &x.shape;
    let ew = |f: &dyn Fn(f64) -> f64| -> Result<Tensor> {
        let xv = f64s(x);
        out(xs, xv.iter().zip(&g).map(|(&a, &d)| d * f(a)).collect())
    };
    match op {
        Op::Identity | Op::Reshape { .. } | Op::Flatten { .. } | Op::Squeeze | Op::Unsqueeze if wrt == 0 => out(xs, g),
        // A float-to-float Cast passes the gradient through (straight through its rounding).
        Op::Cast { to, .. } if wrt == 0 && to.is_float() && x.dtype().is_float() => out(xs, g),
        Op::Transpose { perm } if wrt == 0 => {
            let r = xs.len();
            let perm: Vec<usize> =
                perm.as_ref().map_or((0..r).rev().collect(), |p| p.iter().map(|&a| a as usize).collect());
            // y[i] = x[perm-gathered]: scatter dy back through the same index map.
            let ys: Vec<usize> = perm.iter().map(|&p| xs[p]).collect();
            let xst = crate::tensor::strides_of(xs);
            let mut res = vec![0f64; x.len()];
            let mut pos = vec![0usize; r];
            for gv in g.iter() {
                let src: usize = (0..r).map(|d| pos[d] * xst[perm[d]]).sum();
                res[src] = *gv;
                for d in (0..r).rev() {
                    pos[d] += 1;
                    if pos[d] < ys[d] {
                        break;
                    }
                    pos[d] = 0;
                }
            }
            out(xs, res)
        }
        Op::Concat { axis } => {
            let ax = norm_axis(*axis, xs.len())?;
            let sizes: Vec<usize> = ins.iter().map(|t| t.map_or(0, |t| t.shape[ax])).collect();
            let start: usize = sizes[..wrt].iter().sum();
            let t = get(ins, wrt)?;
            let (d, sz) = (dy.shape[ax], sizes[wrt]);
            let inner: usize = dy.shape[ax + 1..].iter().product();
            let outer: usize = dy.shape[..ax].iter().product();
            let mut r = vec![0f64; t.len()];
            for o in 0..outer {
                for i in 0..sz {
                    for j in 0..inner {
                        r[(o * sz + i) * inner + j] = g[(o * d + start + i) * inner + j];
                    }
                }
            }
            out(&t.shape, r)
        }
        Op::Gather { axis } if wrt == 0 => {
            // y[o, idx..., i] = x[o, indices[idx], i]: scatter-add dy back.
            let ax = norm_axis(*axis, xs.len())?;
            let ind = get(ins, 1)?.data.to_i64_vec();
            let (outer, d, inner) =
                (xs[..ax].iter().product::<usize>(), xs[ax], xs[ax + 1..].iter().product::<usize>());
            let mut r = vec![0f64; x.len()];
            for o in 0..outer {
                for (k, &ix) in ind.iter().enumerate() {
                    let ix = if ix < 0 { ix + d as i64 } else { ix } as usize;
                    for j in 0..inner {
                        r[(o * d + ix) * inner + j] += g[(o * ind.len() + k) * inner + j];
                    }
                }
            }
            out(xs, r)
        }
        Op::Conv(c) if wrt <= 2 => super::linalg::conv_vjp(x, get(ins, 1)?, dy, c, wrt),
        Op::MaxPool(_) | Op::AveragePool(_) | Op::GlobalAveragePool if wrt == 0 => {
            out(xs, super::nn::pool_vjp(op, x, &g)?)
        }
        Op::Slice | Op::Expand if wrt == 0 => {
            // Pure data movement: run the op on the element indices of x to learn where each
            // output element came from, then scatter-add dy back.
            let ids = Tensor::from_i64(xs.clone(), (0..x.len() as i64).collect())?;
            let mut moved = ins.to_vec();
            moved[0] = Some(&ids);
            let src = op.eval(&moved, 1)?.remove(0).data.to_i64_vec();
            let mut r = vec![0f64; x.len()];
            for (&i, &d) in src.iter().zip(&g) {
                r[i as usize] += d;
            }
            out(xs, r)
        }
        Op::Where if wrt == 1 || wrt == 2 => {
            // dy flows to x where the condition holds, to y elsewhere.
            let t = get(ins, wrt)?;
            let cond = x.data.to_f64_vec();
            let ci = broadcast_indices(xs, &dy.shape);
            let take = |i: usize| (cond[ci[i]] != 0.0) == (wrt == 1);
            let masked: Vec<f64> = g.iter().enumerate().map(|(i, &d)| if take(i) { d } else { 0.0 }).collect();
            out(&t.shape, unbroadcast(&masked, &dy.shape, &t.shape))
        }
        Op::PRelu => {
            // y = x where x >= 0, else slope * x (slope broadcast to x).
            let slope = get(ins, 1)?;
            let (xv, sv) = (f64s(x), f64s(slope));
            let si = broadcast_indices(&slope.shape, xs);
            if wrt == 0 {
                out(xs, (0..xv.len()).map(|i| if xv[i] < 0.0 { g[i] * sv[si[i]] } else { g[i] }).collect())
            } else {
                let mut acc = vec![0f64; sv.len()];
                for i in 0..xv.len() {
                    if xv[i] < 0.0 {
                        acc[si[i]] += g[i] * xv[i];
                    }
                }
                out(&slope.shape, acc)
            }
        }
        Op::LogSoftmax { axis, coerce_2d: false } if wrt == 0 => out(xs, softmax_grad(x, &g, *axis, true)?),
        Op::BatchNorm { epsilon, training: false, .. } if wrt == 0 && xs.len() >= 2 => {
            // Inference mode is per-channel affine: dy * scale / sqrt(var + eps).
            let (sc, var) = (f64s(get(ins, 1)?), f64s(get(ins, 4)?));
            let (c, inner) = (xs[1], xs[2..].iter().product::<usize>());
            if sc.len() != c || var.len() != c {
                return Err(IrError::Invalid(format!(
                    "BatchNormalization: {} scales, {} variances for {c} channels",
                    sc.len(),
                    var.len()
                )));
            }
            let eps = *epsilon as f64;
            out(
                xs,
                (0..x.len())
                    .map(|i| {
                        let ch = (i / inner.max(1)) % c;
                        g[i] * sc[ch] / (var[ch] + eps).sqrt()
                    })
                    .collect(),
            )
        }
        Op::Unary(UnaryOp::Relu) if wrt == 0 && matches!((&x.data, &dy.data), (Data::F32(_), Data::F32(_))) => {
            let (Data::F32(xv), Data::F32(dv)) = (&x.data, &dy.data) else { unreachable!() };
            Tensor::from_f32(xs.clone(), xv.iter().zip(dv).map(|(&v, &d)| if v > 0.0 { d } else { 0.0 }).collect())
        }
        Op::Unary(u) => ew(&u.def().df),
        Op::LeakyRelu { alpha } => {
            let a = *alpha as f64;
            ew(&|x| if x < 0.0 { a } else { 1.0 })
        }
        Op::Elu { alpha } => {
            let a = *alpha as f64;
            ew(&|x| if x < 0.0 { a * x.exp() } else { 1.0 })
        }
        Op::Gelu { tanh: false } => ew(&|x| {
            let cdf = 0.5 * (1.0 + libm::erf(x / std::f64::consts::SQRT_2));
            cdf + x * (-x * x / 2.0).exp() / (2.0 * std::f64::consts::PI).sqrt()
        }),
        Op::Gelu { tanh: true } => ew(&|x| {
            let c = (2.0 / std::f64::consts::PI).sqrt();
            let u = c * (x + 0.044715 * x.powi(3));
            let t = u.tanh();
            0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * x * x)
        }),
        Op::Clip if wrt == 0 => {
            let lo = ins.get(1).copied().flatten().map(|t| t.data.to_f64_vec()[0]).unwrap_or(f64::NEG_INFINITY);
            let hi = ins.get(2).copied().flatten().map(|t| t.data.to_f64_vec()[0]).unwrap_or(f64::INFINITY);
            ew(&|x| if x >= lo && x <= hi { 1.0 } else { 0.0 })
        }
        Op::Binary(b) => {
            let (a, c) = (get(ins, 0)?, get(ins, 1)?);
            let shape = dy.shape.clone();
            let (ia, ic) = (broadcast_indices(&a.shape, &shape), broadcast_indices(&c.shape, &shape));
            let (av, cv) = (f64s(a), f64s(c));
            let full: Vec<f64> = (0..g.len())
                .map(|i| {
                    let (p, q) = (av[ia[i]], cv[ic[i]]);
                    g[i] * match (b, wrt) {
                        (BinaryOp::Add, _) => 1.0,
                        (BinaryOp::Sub, 0) => 1.0,
                        (BinaryOp::Sub, _) => -1.0,
                        (BinaryOp::Mul, 0) => q,
                        (BinaryOp::Mul, _) => p,
                        (BinaryOp::Div, 0) => 1.0 / q,
                        (BinaryOp::Div, _) => -p / (q * q),
                        (BinaryOp::Pow, 0) => q * p.powf(q - 1.0),
                        (BinaryOp::Pow, _) => p.powf(q) * p.ln(),
                    }
                })
                .collect();
            let target = if wrt == 0 { &a.shape } else { &c.shape };
            out(target, unbroadcast(&full, &shape, target))
        }
        Op::Gemm { alpha, beta, trans_a, trans_b } => {
            let (a, b) = (get(ins, 0)?, get(ins, 1)?);
            let (m, n) = (dy.shape[0], dy.shape[1]);
            let k = if *trans_a { a.shape[0] } else { a.shape[1] };
            let al = *alpha as f64;
            match wrt {
                // dA = alpha dY op(B)^T, stored as A is.
                0 if *trans_a => mm_t(b, *trans_b, dy, true, k, n, m, al, &a.shape), // dA [k,m] = op(B) dY^T
                0 => mm_t(dy, false, b, !*trans_b, m, n, k, al, &a.shape),
                1 if *trans_b => mm_t(dy, true, a, *trans_a, n, m, k, al, &b.shape), // dB [n,k] = dY^T op(A)
                1 => mm_t(a, !*trans_a, dy, false, k, m, n, al, &b.shape),
                _ => {
                    let c = get(ins, 2)?;
                    out(&c.shape, unbroadcast(&g, &dy.shape, &c.shape).into_iter().map(|x| x * *beta as f64).collect())
                }
            }
        }
        Op::MatMul => {
            let (a, b) = (get(ins, 0)?, get(ins, 1)?);
            if a.rank() < 2 || b.rank() < 2 {
                return Err(IrError::Unsupported("Vjp of MatMul with 1-D operands".into()));
            }
            let (m, k, n) = (a.shape[a.rank() - 2], a.shape[a.rank() - 1], b.shape[b.rank() - 1]);
            let batch: Vec<usize> = dy.shape[..dy.rank() - 2].to_vec();
            let nb: usize = batch.iter().product();
            let mut ash = batch.clone();
            ash.extend([m, k]);
            let mut bsh = batch.clone();
            bsh.extend([k, n]);
            let (ai, bi) = (broadcast_indices(&a.shape, &ash), broadcast_indices(&b.shape, &bsh));
            // f32 products (sgemm) when the values are f32, as PyTorch computes them; else f64.
            let full: Vec<f64> = match (&a.data, &b.data, &dy.data) {
                (Data::F32(av), Data::F32(bv), Data::F32(gv)) => {
                    matmul_grad(av, bv, gv, &ai, &bi, nb, (m, k, n), wrt).into_iter().map(f64::from).collect()
                }
                _ => matmul_grad(&f64s(a), &f64s(b), &g, &ai, &bi, nb, (m, k, n), wrt),
            };
            let (sh, target) = if wrt == 0 { (ash, &a.shape) } else { (bsh, &b.shape) };
            out(target, unbroadcast(&full, &sh, target))
        }
        Op::Reduce { op: r @ (ReduceOp::Mean | ReduceOp::Sum), keepdims, noop_with_empty_axes } if wrt == 0 => {
            let axes: Vec<usize> = match ins.get(1).copied().flatten() {
                Some(t) => t.data.to_i64_vec().iter().map(|&a| norm_axis(a, xs.len())).collect::<Result<_>>()?,
                None if *noop_with_empty_axes => return out(xs, g),
                None => (0..xs.len()).collect(),
            };
            let count: usize = axes.iter().map(|&a| xs[a]).product();
            let scale = if *r == ReduceOp::Mean { 1.0 / count.max(1) as f64 } else { 1.0 };
            // The reduced shape with kept (size-1) axes, broadcast back over x.
            let kept: Vec<usize> = (0..xs.len()).map(|d| if axes.contains(&d) { 1 } else { xs[d] }).collect();
            let _ = keepdims;
            let idx = broadcast_indices(&kept, xs);
            out(xs, idx.iter().map(|&i| g[i] * scale).collect())
        }
        Op::Softmax { axis, coerce_2d: false } if wrt == 0 => out(xs, softmax_grad(x, &g, *axis, false)?),
        Op::LayerNorm { axis, epsilon } => {
            let ax = norm_axis(*axis, xs.len())?;
            let d: usize = xs[ax..].iter().product();
            let rows = x.len() / d.max(1);
            let xv = f64s(x);
            let sc = get(ins, 1)?;
            let scv = f64s(sc);
            let si = broadcast_indices(&sc.shape, &xs[ax..]);
            let mut r = vec![0f64; if wrt == 0 { xv.len() } else { d }];
            for row in 0..rows {
                let xr = &xv[row * d..(row + 1) * d];
                let gr = &g[row * d..(row + 1) * d];
                let mean = xr.iter().sum::<f64>() / d as f64;
                let var = xr.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / d as f64;
                let inv = 1.0 / (var + *epsilon as f64).sqrt();
                let xhat: Vec<f64> = xr.iter().map(|v| (v - mean) * inv).collect();
                match wrt {
                    0 => {
                        let dxh: Vec<f64> = (0..d).map(|i| gr[i] * scv[si[i]]).collect();
                        let m1 = dxh.iter().sum::<f64>() / d as f64;
                        let m2 = dxh.iter().zip(&xhat).map(|(a, b)| a * b).sum::<f64>() / d as f64;
                        for i in 0..d {
                            r[row * d + i] = inv * (dxh[i] - m1 - xhat[i] * m2);
                        }
                    }
                    1 => (0..d).for_each(|i| r[i] += gr[i] * xhat[i]),
                    _ => (0..d).for_each(|i| r[i] += gr[i]),
                }
            }
            match wrt {
                0 => out(xs, r),
                1 => out(&sc.shape, unbroadcast(&r, &xs[ax..], &sc.shape)),
                _ => {
                    let b = get(ins, 2)?;
                    out(&b.shape, unbroadcast(&r, &xs[ax..], &b.shape))
                }
            }
        }
        Op::FakeQuant { bits, signed, axis, block_size } => {
            let s = get(ins, 1)?;
            let idx = param_index(xs, &s.shape, *axis, *block_size)?;
            let sv = s.data.to_f32_vec();
            let zv = ins.get(2).copied().flatten().map(|z| z.data.to_f32_vec());
            let (lo, hi) = fake_quant_range(*bits, *signed);
            let (lo, hi) = (lo as f32, hi as f32);
            let xv = x.data.to_f32_vec();
            match wrt {
                0 => out(
                    xs,
                    xv.iter()
                        .zip(&idx)
                        .zip(&g)
                        .map(|((&v, &i), &d)| {
                            let z = zv.as_ref().map_or(0.0, |z| z[i]);
                            let q = round_even(v / sv[i]) + z;
                            if q >= lo && q <= hi {
                                d
                            } else {
                                0.0
                            }
                        })
                        .collect(),
                ),
                1 => {
                    let mut acc = vec![0f64; sv.len()];
                    let mut count = vec![0usize; sv.len()];
                    for ((&v, &i), &d) in xv.iter().zip(&idx).zip(&g) {
                        let z = zv.as_ref().map_or(0.0, |z| z[i]);
                        let u = v / sv[i];
                        let q = round_even(u) + z;
                        let dq = if q < lo {
                            (lo - z) as f64
                        } else if q > hi {
                            (hi - z) as f64
                        } else {
                            (round_even(u) - u) as f64
                        };
                        acc[i] += d * dq;
                        count[i] += 1;
                    }
                    let qp = hi.max(1.0) as f64;
                    let v = acc.iter().zip(&count).map(|(a, &n)| a / (n.max(1) as f64 * qp).sqrt()).collect();
                    out(&s.shape, v)
                }
                _ => Err(IrError::Unsupported("Vjp of FakeQuant with respect to its zero point".into())),
            }
        }
        _ => Err(IrError::Unsupported(format!("the gradient of {} with respect to input {wrt}", op.name()))),
    }
}
