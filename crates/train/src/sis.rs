//! The state-importance score (SQIL): `S(s, k) = 1/2 ||pi(s) - pi(phi(s, k))||^2` and
//! `SIS(s) = mean_k S(s, k)`, with the full-precision policy. Perturbations `phi(s, k)`:
//! - a vector input `[B, D]` (or a history `[B, H, D]`): dimension k replaced by its dataset
//!   mean (in every history step);
//! - an image input `[B, C, H, W]`: the k-th `patch x patch` square occluded with the dataset's
//!   per-channel mean.
//!
//! For a multi-input policy the positions of all inputs are enumerated in turn. All
//! perturbations of a batch of states run in one interpreter call.

use sqil_ir::interp::Interpreter;
use sqil_ir::{Graph, IrError, Result, Tensor};
use std::collections::HashMap;

pub type Feeds = HashMap<String, Tensor>;

/// How one input is perturbed.
#[derive(Clone, Debug)]
enum Perturb {
    /// Columns of the last axis; `mean` per column.
    Columns { mean: Vec<f32> },
    /// Square patches of an image; `mean` per channel.
    Patches { mean: Vec<f32>, patch: usize },
}

impl Perturb {
    fn positions(&self, shape: &[usize]) -> usize {
        match self {
            Perturb::Columns { mean } => mean.len(),
            Perturb::Patches { patch, .. } => shape[2].div_ceil(*patch) * shape[3].div_ceil(*patch),
        }
    }

    /// Applies perturbation `k` to sample row `row` (a flat slice of one sample).
    fn apply(&self, shape: &[usize], k: usize, row: &mut [f32]) {
        match self {
            Perturb::Columns { mean } => {
                let d = mean.len();
                for h in 0..row.len() / d {
                    row[h * d + k] = mean[k];
                }
            }
            Perturb::Patches { mean, patch } => {
                let (c, hh, ww) = (shape[1], shape[2], shape[3]);
                let per_row = ww.div_ceil(*patch);
                let (py, px) = (k / per_row * patch, k % per_row * patch);
                for ch in 0..c {
                    for y in py..(py + patch).min(hh) {
                        for x in px..(px + patch).min(ww) {
                            row[(ch * hh + y) * ww + x] = mean[ch];
                        }
                    }
                }
            }
        }
    }
}

fn sample_len(t: &Tensor) -> usize {
    t.shape[1..].iter().product()
}

/// SIS of every state of `batches` (in order). `patch`: occlusion size for image inputs.
pub fn sis(fp: &Graph, batches: &[Feeds], patch: usize) -> Result<Vec<f64>> {
    let names: Vec<String> = fp.inputs.iter().map(|&i| fp.node(i).outputs[0].name.clone()).collect();
    // Dataset means per input.
    let mut perturb = vec![];
    for n in &names {
        let first = &batches.first().ok_or_else(|| IrError::Invalid("SIS: no states".into()))?[n];
        let image = first.rank() == 4;
        let (groups, inner): (usize, usize) = if image {
            (first.shape[1], first.shape[2] * first.shape[3])
        } else {
            (*first.shape.last().expect("rank >= 1"), 1)
        };
        let mut sum = vec![0f64; groups];
        let mut count = 0f64;
        for b in batches {
            let v = b[n].data.to_f32_vec();
            for (i, x) in v.iter().enumerate() {
                let gidx = if image { (i / inner) % groups } else { i % groups };
                sum[gidx] += *x as f64;
            }
            count += (v.len() / groups) as f64;
        }
        let mean: Vec<f32> = sum.iter().map(|s| (s / count.max(1.0)) as f32).collect();
        perturb.push(if image { Perturb::Patches { mean, patch } } else { Perturb::Columns { mean } });
    }
    let it = Interpreter::new(fp)?;
    let mut out = vec![];
    for b in batches {
        let bsz = b[&names[0]].shape[0];
        let base = it.run(b)?.remove(0);
        let positions: Vec<usize> = names.iter().zip(&perturb).map(|(n, p)| p.positions(&b[n].shape)).collect();
        let total: usize = positions.iter().sum();
        // Row r = sample i, position k (over all inputs): sample i with only that position perturbed.
        let mut feeds = Feeds::new();
        for (ni, n) in names.iter().enumerate() {
            let t = &b[n];
            let len = sample_len(t);
            let v = t.data.to_f32_vec();
            let mut big = Vec::with_capacity(bsz * total * len);
            for i in 0..bsz {
                let offset: usize = positions[..ni].iter().sum();
                for k in 0..total {
                    let mut row = v[i * len..(i + 1) * len].to_vec();
                    if k >= offset && k < offset + positions[ni] {
                        perturb[ni].apply(&t.shape, k - offset, &mut row);
                    }
                    big.extend(row);
                }
            }
            let mut shape = t.shape.clone();
            shape[0] = bsz * total;
            feeds.insert(n.clone(), Tensor::from_f32(shape, big)?);
        }
        let pert = it.run(&feeds)?.remove(0).data.to_f32_vec();
        let bv = base.data.to_f32_vec();
        let a = bv.len() / bsz;
        for i in 0..bsz {
            let mut s = 0f64;
            for k in 0..total {
                let r = i * total + k;
                s += 0.5 * (0..a).map(|j| ((bv[i * a + j] - pert[r * a + j]) as f64).powi(2)).sum::<f64>();
            }
            out.push(s / total as f64);
        }
    }
    Ok(out)
}

/// QRD weights: `beta` for the states at or above the `top` quantile of SIS (e.g. 0.2 = top
/// 20%, over the whole dataset), 1 elsewhere. Returns the weights and the threshold.
pub fn qrd_alpha(sis: &[f64], top: f64, beta: f64) -> (Vec<f32>, f64) {
    let mut sorted = sis.to_vec();
    sorted.sort_by(f64::total_cmp);
    let k = ((1.0 - top) * sorted.len() as f64).floor() as usize;
    let thr = sorted.get(k.min(sorted.len().saturating_sub(1))).copied().unwrap_or(0.0);
    (sis.iter().map(|&s| if s >= thr { beta as f32 } else { 1.0 }).collect(), thr)
}
