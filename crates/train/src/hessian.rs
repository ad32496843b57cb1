//! Per-layer Hessian traces for HAWQ-style bit allocation (Dong et al., HAWQ-v2/v3).
//!
//! The loss is the distillation distance of the policy from its own float outputs,
//! `L(W) = sum_s w_s mean_j (pi(s; W)_j - pi_fp(s)_j)^2 / sum_s w_s` (`w_s = 1`: HAWQ's unweighted
//! loss), at the float weights. Its trace per layer comes from Hutchinson's estimator,
//! `tr(H_l) = E[v_l . (H v)_l]` over Rademacher probes `v`, with the Hessian-vector product as a
//! central difference of gradients from the `grad` pass: `(g(W + eps v) - g(W - eps v)) / 2 eps`.

use crate::model::{alpha_type, make_input, weighted_distance};
use sqil_ir::interp::Interpreter;
use sqil_ir::testing::Rng;
use sqil_ir::{Graph, IrError, Result, Tensor, ValueRef};
use sqil_passes::grad::grad;
use sqil_passes::quant::layers::Layer;
use sqil_passes::quant::{observe, Feeds};

/// The estimate per layer and its standard error over probes.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Traces {
    pub trace: Vec<f64>,
    pub std_err: Vec<f64>,
    pub probes: usize,
    pub eps: f64,
}

/// Hutchinson traces of the (state-weighted) distillation loss for `layers` of `fp`, on the
/// states of `batches` with one weight per state.
pub fn hessian_traces(
    fp: &Graph,
    layers: &[Layer],
    batches: &[Feeds],
    weights: &[f32],
    probes: usize,
    seed: u64,
) -> Result<Traces> {
    let (teacher, _) = observe(fp, batches, &[])?;
    let mut g = fp.clone();
    if g.outputs.len() != 1 {
        return Err(IrError::Unsupported(format!("Hessian of a graph with {} outputs", g.outputs.len())));
    }
    let y = g.outputs[0];
    let yty = g.value(y).ty.clone();
    let t_in = g.add_input("hessian.teacher", yty.clone());
    let a_in = g.add_input("hessian.alpha", alpha_type(&yty));
    let loss = weighted_distance(&mut g, y, t_in, a_in)?;
    let mut w0 = vec![];
    for l in layers {
        w0.push(
            fp.const_value(l.w)
                .ok_or_else(|| IrError::Invalid(format!("layer `{}`: weight is not a constant", l.name)))?
                .clone(),
        );
        make_input(&mut g, l.w.node);
    }
    let wrt: Vec<ValueRef> = layers.iter().map(|l| l.w).collect();
    let grads = grad(&mut g, loss, &wrt)?;
    g.outputs = grads;
    sqil_ir::verify(&g).map_err(|e| e.context("the Hessian graph"))?;
    let it = Interpreter::new(&g)?;
    let names: Vec<String> = layers.iter().map(|l| g.value(l.w).name.clone()).collect();
    let total_w: f64 = weights.iter().map(|&w| w as f64).sum();
    if total_w <= 0.0 {
        return Err(IrError::Invalid("Hessian traces: state weights sum to zero".into()));
    }
    // Per-batch feeds: the policy inputs, the teacher rows and the state weights.
    let per_state = teacher.len() / teacher.shape[0].max(1);
    let tv = teacher.data.to_f32_vec();
    let mut fixed = vec![];
    let mut row = 0;
    for b in batches {
        let n = b.values().next().map_or(0, |t| t.shape[0]);
        let mut f = b.clone();
        let mut ts = teacher.shape.clone();
        ts[0] = n;
        f.insert("hessian.teacher".into(), Tensor::from_f32(ts, tv[row * per_state..(row + n) * per_state].to_vec())?);
        let mut ashape = vec![n];
        ashape.extend(std::iter::repeat_n(1, yty.rank() - 1));
        f.insert("hessian.alpha".into(), Tensor::from_f32(ashape, weights[row..row + n].to_vec())?);
        fixed.push((f, n));
        row += n;
    }
    // The full-data gradient at W: batch losses are means over their states.
    let gradient = |ws: &[Vec<f32>]| -> Result<Vec<Vec<f64>>> {
        let mut acc: Vec<Vec<f64>> = ws.iter().map(|w| vec![0f64; w.len()]).collect();
        for (f, n) in &fixed {
            let mut f = f.clone();
            for ((name, w), t) in names.iter().zip(ws).zip(&w0) {
                f.insert(name.clone(), Tensor::from_f32(t.shape.clone(), w.clone())?);
            }
            let outs = it.run(&f)?;
            for (a, o) in acc.iter_mut().zip(outs) {
                for (x, v) in a.iter_mut().zip(o.data.to_f64_vec()) {
                    *x += v * *n as f64 / total_w;
                }
            }
        }
        Ok(acc)
    };
    let base: Vec<Vec<f32>> = w0.iter().map(|t| t.data.to_f32_vec()).collect();
    let count: usize = base.iter().map(Vec::len).sum();
    let rms = (base.iter().flatten().map(|&v| (v as f64).powi(2)).sum::<f64>() / count.max(1) as f64).sqrt();
    let eps = 1e-3 * rms.max(1e-6);
    let mut rng = Rng::new(seed);
    let mut samples: Vec<Vec<f64>> = vec![vec![]; layers.len()];
    for _ in 0..probes.max(1) {
        let v: Vec<Vec<f32>> = base
            .iter()
            .map(|w| (0..w.len()).map(|_| if rng.next_u64() & 1 == 0 { 1.0 } else { -1.0 }).collect())
            .collect();
        let shifted = |sign: f32| -> Vec<Vec<f32>> {
            base.iter()
                .zip(&v)
                .map(|(w, v)| w.iter().zip(v).map(|(&a, &b)| a + sign * eps as f32 * b).collect())
                .collect()
        };
        let (gp, gm) = (gradient(&shifted(1.0))?, gradient(&shifted(-1.0))?);
        for l in 0..layers.len() {
            let vhv: f64 = (0..v[l].len()).map(|i| v[l][i] as f64 * (gp[l][i] - gm[l][i]) / (2.0 * eps)).sum();
            samples[l].push(vhv);
        }
    }
    let stats = |s: &[f64]| {
        let m = s.iter().sum::<f64>() / s.len() as f64;
        let var = s.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (s.len().max(2) - 1) as f64;
        (m, (var / s.len() as f64).sqrt())
    };
    let (trace, std_err) = samples.iter().map(|s| stats(s)).unzip();
    Ok(Traces { trace, std_err, probes: probes.max(1), eps })
}
