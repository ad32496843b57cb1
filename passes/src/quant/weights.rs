//! Weight PTQ recipes on a `[N, K]` weight view: RTN (min-max round to nearest), MSE-clipped
//! RTN, AWQ-style activation-aware scaling, and GPTQ (Hessian-based error-compensating
//! rounding). All produce values that the layer's FakeQuant reproduces exactly: the quantizer
//! is `q = clamp(round_half_even(w / s) + z, qmin, qmax)`, `w' = (q - z) * s`, in f32.

use super::layers::WeightView;
use serde::{Deserialize, Serialize};
use sqil_ir::ops::quant::fake_quant_range;
use sqil_ir::{IrError, Result};

/// A named PTQ recipe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Recipe {
    Rtn,
    Mse,
    Awq,
    Gptq,
}

impl Recipe {
    pub const ALL: [Recipe; 4] = [Recipe::Rtn, Recipe::Mse, Recipe::Awq, Recipe::Gptq];

    pub fn parse(s: &str) -> Result<Recipe> {
        match s {
            "rtn" => Ok(Recipe::Rtn),
            "mse" => Ok(Recipe::Mse),
            "awq" => Ok(Recipe::Awq),
            "gptq" => Ok(Recipe::Gptq),
            _ => Err(IrError::Invalid(format!("unknown recipe `{s}` (known: rtn, mse, awq, gptq)"))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Recipe::Rtn => "rtn",
            Recipe::Mse => "mse",
            Recipe::Awq => "awq",
            Recipe::Gptq => "gptq",
        }
    }
}

/// A uniform integer quantizer with `bits` signed levels.
#[derive(Clone, Copy, Debug)]
pub struct Quantizer {
    pub bits: u8,
    pub symmetric: bool,
}

impl Quantizer {
    pub fn range(self) -> (f32, f32) {
        let (lo, hi) = fake_quant_range(self.bits, true);
        (lo as f32, hi as f32)
    }

    /// Scale and zero point covering `vals` shrunk by `ratio` (1 = full min-max range).
    pub fn params(self, vals: impl Iterator<Item = f32> + Clone, ratio: f32) -> (f32, f32) {
        let (qmin, qmax) = self.range();
        if self.symmetric {
            let amax = vals.fold(0f32, |m, v| m.max(v.abs())) * ratio;
            let s = amax / qmax;
            (if s > 0.0 && s.is_finite() { s } else { 1.0 }, 0.0)
        } else {
            let (lo, hi) = vals.fold((0f32, 0f32), |(a, b), v| (a.min(v), b.max(v)));
            let (lo, hi) = (lo * ratio, hi * ratio);
            let s = (hi - lo) / (qmax - qmin);
            let s = if s > 0.0 && s.is_finite() { s } else { 1.0 };
            (s, (qmin - lo / s).round_ties_even().clamp(qmin, qmax))
        }
    }

    /// `(q - z) * s` with `q = clamp(round_half_even(v / s) + z)`, exactly as FakeQuant does.
    #[inline]
    pub fn fq(self, v: f32, s: f32, z: f32) -> f32 {
        let (qmin, qmax) = self.range();
        (((v / s).round_ties_even() + z).clamp(qmin, qmax) - z) * s
    }
}

/// Result of a recipe on one layer.
#[derive(Clone, Debug)]
pub struct WeightQuant {
    /// `[N, K]` values to store (on the quantization grid after FakeQuant; for AWQ, the scaled weights).
    pub w: Vec<f32>,
    pub scale: Vec<f32>,
    pub zero: Vec<f32>,
    /// AWQ: per input channel, the factor the layer's input is divided by (weights multiplied).
    pub act_scale: Option<Vec<f32>>,
}

fn group_members(v: &WeightView) -> Vec<Vec<usize>> {
    let mut m = vec![vec![]; v.groups];
    for (i, &g) in v.group.iter().enumerate() {
        m[g].push(i);
    }
    m
}

/// Clipping ratios searched by the MSE recipes: 1.0 down to 0.5 in steps of 0.01.
fn ratios() -> impl Iterator<Item = f32> {
    (0..=50).map(|i| 1.0 - i as f32 * 0.01)
}

/// Per-group scale and zero point of `w`: min-max, or the clipping with the least squared error.
fn group_params(q: Quantizer, w: &[f32], members: &[Vec<usize>], mse: bool) -> (Vec<f32>, Vec<f32>) {
    members
        .iter()
        .map(|m| {
            let vals = m.iter().map(|&i| w[i]);
            if !mse {
                return q.params(vals, 1.0);
            }
            let mut best = (f64::INFINITY, (1.0, 0.0));
            for r in ratios() {
                let (s, z) = q.params(vals.clone(), r);
                let err: f64 = m.iter().map(|&i| ((w[i] - q.fq(w[i], s, z)) as f64).powi(2)).sum();
                if err < best.0 {
                    best = (err, (s, z));
                }
            }
            best.1
        })
        .unzip()
}

/// RTN (min-max) or MSE-clipped RTN.
pub fn round_to_nearest(v: &WeightView, q: Quantizer, mse: bool) -> WeightQuant {
    let members = group_members(v);
    let (scale, zero) = group_params(q, &v.w, &members, mse);
    WeightQuant { w: v.w.clone(), scale, zero, act_scale: None }
}

/// `y[r, n] = sum_k x[r, k] * w[n, k]` for `rows` rows.
pub fn matmul_nt(x: &[f32], rows: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
    let mut y = vec![0f32; rows * n];
    sqil_kernels_cpu::sgemm(rows, k, n, 1.0, x, (k, 1), w, (1, k), 0.0, &mut y, (n, 1));
    y
}

fn dequant(v: &WeightView, q: Quantizer, w: &[f32], scale: &[f32], zero: &[f32]) -> Vec<f32> {
    w.iter().zip(&v.group).map(|(&x, &g)| q.fq(x, scale[g], zero[g])).collect()
}

/// AWQ-style: per input channel c a factor `s_c = mean|x_c|^alpha` (normalised so that
/// `sqrt(max * min) = 1`); weights are multiplied and inputs divided by it, so salient input
/// channels get finer weight steps. `alpha` is searched on a 0.05 grid in [0, 1] for the least
/// output error on the calibration rows `x` (`[rows, K]`), then MSE clipping is applied.
pub fn awq(v: &WeightView, q: Quantizer, x: &[f32], rows: usize, chan: &[usize]) -> WeightQuant {
    let (n, k) = (v.n, v.k);
    let channels = chan.iter().max().map_or(0, |c| c + 1);
    let mut mean = vec![0f64; channels];
    let mut count = vec![0usize; channels];
    for r in 0..rows {
        for kk in 0..k {
            mean[chan[kk]] += x[r * k + kk].abs() as f64;
            count[chan[kk]] += 1;
        }
    }
    let mean: Vec<f64> = mean.iter().zip(&count).map(|(m, &c)| (m / c.max(1) as f64).max(1e-8)).collect();
    let reference = matmul_nt(x, rows, &v.w, n, k);
    let members = group_members(v);
    let mut best: Option<(f64, WeightQuant)> = None;
    for step in 0..=20 {
        let alpha = step as f64 * 0.05;
        let mut s: Vec<f64> = mean.iter().map(|m| m.powf(alpha)).collect();
        let (mx, mn) = s.iter().fold((0f64, f64::INFINITY), |(a, b), &v| (a.max(v), b.min(v)));
        let norm = (mx * mn).sqrt();
        s.iter_mut().for_each(|v| *v /= norm);
        let s32: Vec<f32> = s.iter().map(|&v| v as f32).collect();
        let ws: Vec<f32> = (0..n * k).map(|i| v.w[i] * s32[chan[i % k]]).collect();
        let (scale, zero) = group_params(q, &ws, &members, false);
        let deq = dequant(v, q, &ws, &scale, &zero);
        let xs: Vec<f32> = (0..rows * k).map(|i| x[i] / s32[chan[i % k]]).collect();
        let y = matmul_nt(&xs, rows, &deq, n, k);
        let err: f64 = y.iter().zip(&reference).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
        if best.as_ref().is_none_or(|b| err < b.0) {
            best = Some((err, WeightQuant { w: ws, scale, zero, act_scale: Some(s32) }));
        }
    }
    let mut wq = best.expect("searched").1;
    let (scale, zero) = group_params(q, &wq.w, &members, true);
    wq.scale = scale;
    wq.zero = zero;
    wq
}

/// Cholesky factor `L` (lower, row-major) of a symmetric positive definite `a` (`n x n`).
fn cholesky(a: &[f64], n: usize) -> Option<Vec<f64>> {
    let mut l = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            let mut s = a[i * n + j];
            for p in 0..j {
                s -= l[i * n + p] * l[j * n + p];
            }
            if i == j {
                if s <= 0.0 {
                    return None;
                }
                l[i * n + i] = s.sqrt();
            } else {
                l[i * n + j] = s / l[j * n + j];
            }
        }
    }
    Some(l)
}

/// Inverse of `L L^T` from the lower Cholesky factor.
fn inverse_from_cholesky(l: &[f64], n: usize) -> Vec<f64> {
    // Linv by forward substitution, then (L L^T)^-1 = Linv^T Linv.
    let mut li = vec![0f64; n * n];
    for i in 0..n {
        li[i * n + i] = 1.0 / l[i * n + i];
        for j in 0..i {
            let mut s = 0.0;
            for p in j..i {
                s -= l[i * n + p] * li[p * n + j];
            }
            li[i * n + j] = s / l[i * n + i];
        }
    }
    let mut inv = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            let s: f64 = (i..n).map(|p| li[p * n + i] * li[p * n + j]).sum();
            inv[i * n + j] = s;
            inv[j * n + i] = s;
        }
    }
    inv
}

/// GPTQ: quantizes columns k = 0..K in order; each column's rounding error is spread over the
/// columns not yet quantized through the inverse Hessian `H = X^T X` of the calibration rows
/// (damped by 1% of its mean diagonal). A group's scale is chosen (min-max or MSE clip) from
/// the current, already compensated weights when its first column is reached.
pub fn gptq(v: &WeightView, q: Quantizer, x: &[f32], rows: usize, mse: bool) -> Result<WeightQuant> {
    let (n, k) = (v.n, v.k);
    let mut h = vec![0f64; k * k];
    for r in 0..rows {
        let xr = &x[r * k..(r + 1) * k];
        for i in 0..k {
            let xi = xr[i] as f64;
            if xi == 0.0 {
                continue;
            }
            for j in 0..=i {
                h[i * k + j] += xi * xr[j] as f64;
            }
        }
    }
    for i in 0..k {
        for j in 0..i {
            h[j * k + i] = h[i * k + j];
        }
    }
    let mut w: Vec<f64> = v.w.iter().map(|&x| x as f64).collect();
    for i in 0..k {
        if h[i * k + i] == 0.0 {
            // A dead input: its weight never matters; quantize it as is.
            h[i * k + i] = 1.0;
        }
    }
    let damp = 0.01 * (0..k).map(|i| h[i * k + i]).sum::<f64>() / k as f64;
    for i in 0..k {
        h[i * k + i] += damp;
    }
    let l = cholesky(&h, k).ok_or_else(|| IrError::Internal("GPTQ: Hessian is not positive definite".into()))?;
    let hinv = inverse_from_cholesky(&l, k);
    // Upper Cholesky factor U of H^-1 (H^-1 = U^T U): U = L'^T with L' lower of H^-1.
    let lu =
        cholesky(&hinv, k).ok_or_else(|| IrError::Internal("GPTQ: inverse Hessian is not positive definite".into()))?;
    let u = |i: usize, j: usize| lu[j * k + i];
    let members = group_members(v);
    let mut scale = vec![0f32; v.groups];
    let mut zero = vec![0f32; v.groups];
    let mut done = vec![false; v.groups];
    for col in 0..k {
        let d = u(col, col);
        for row in 0..n {
            let gid = v.group[row * k + col];
            if !done[gid] {
                let w32: Vec<f32> = members[gid].iter().map(|&i| w[i] as f32).collect();
                let idx: Vec<usize> = (0..w32.len()).collect();
                let (s, z) = group_params(q, &w32, &[idx], mse);
                scale[gid] = s[0];
                zero[gid] = z[0];
                done[gid] = true;
            }
            let cur = w[row * k + col];
            let qv = q.fq(cur as f32, scale[gid], zero[gid]) as f64;
            let err = (cur - qv) / d;
            w[row * k + col] = qv;
            for j in col + 1..k {
                w[row * k + j] -= err * u(col, j);
            }
        }
    }
    Ok(WeightQuant { w: w.iter().map(|&x| x as f32).collect(), scale, zero, act_scale: None })
}

/// Sum of squared differences between two equal-length slices, over their length.
pub fn mse(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>() / a.len().max(1) as f64
}

/// The dequantized values a FakeQuant with these parameters produces from `wq.w`.
pub fn simulated(v: &WeightView, q: Quantizer, wq: &WeightQuant) -> Vec<f32> {
    dequant(v, q, &wq.w, &wq.scale, &wq.zero)
}
