//! Per-layer sensitivity to quantization, and the bit-allocation problem built from it.
//!
//! The sensitivity of layer `l` at `b` weight bits is the weighted action error of the policy
//! with *only* `l` quantized (its weights at `b` bits by the PTQ recipe, its input in float):
//! `sum_s w_s * mean_j (pi_q(s)_j - pi_fp(s)_j)^2 / sum_s w_s`. With `w_s` the QRD weights
//! (beta on the top-SIS states, else 1) this is saliency-guided; with `w_s = 1` it is the plain
//! action error. Activation sensitivity at `a` bits is measured with the layer's weights at 8
//! bits and its input at `a` bits, minus the 8-bit-weights-only error.
//!
//! Costs: average weight bits (`n_l * b`), model bytes (packed weights, one f32 scale per group,
//! channel or tensor, plus everything left in float), or batch-1 latency from a [`CostModel`].

use super::allocate::{Allocation, Choice};
use super::config::{Granularity, LayerOverride, QuantConfig};
use super::layers::{find_layers, Layer, LayerKind};
use super::{observe, quantize, Feeds, Recipe};
use sqil_ir::{Graph, IrError, Result};

/// What the budget limits.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub enum Budget {
    /// Average bits per quantized weight.
    Bits(f64),
    /// Total model bytes.
    Bytes(f64),
    /// Estimated batch-1 latency in seconds.
    Seconds(f64),
}

impl Budget {
    /// `3.5bits`, `2MB`, `512KB`, `90000B`, `50us`, `1.5ms`.
    pub fn parse(s: &str) -> Result<Budget> {
        let t = s.trim();
        let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let v: f64 = num.trim().parse().map_err(|_| {
            IrError::Invalid(format!("budget `{s}`: expected a number and a unit, e.g. 3.5bits, 2MB, 50us"))
        })?;
        let b = match unit.trim().to_ascii_lowercase().as_str() {
            "bits" | "bit" | "b/w" => Budget::Bits(v),
            "b" | "bytes" => Budget::Bytes(v),
            "kb" => Budget::Bytes(v * 1e3),
            "mb" => Budget::Bytes(v * 1e6),
            "kib" => Budget::Bytes(v * 1024.0),
            "mib" => Budget::Bytes(v * 1024.0 * 1024.0),
            "s" => Budget::Seconds(v),
            "ms" => Budget::Seconds(v * 1e-3),
            "us" => Budget::Seconds(v * 1e-6),
            u => {
                return Err(IrError::Invalid(format!(
                    "budget `{s}`: unknown unit `{u}` (bits, B, KB, MB, KiB, MiB, s, ms, us)"
                )))
            }
        };
        if !(v > 0.0 && v.is_finite()) {
            return Err(IrError::Invalid(format!("budget `{s}` must be positive")));
        }
        Ok(b)
    }

    pub fn value(&self) -> f64 {
        match *self {
            Budget::Bits(v) | Budget::Bytes(v) | Budget::Seconds(v) => v,
        }
    }
}

/// A first, uncalibrated latency model for one CPU core: each layer costs its weight bytes over
/// the memory bandwidth plus its multiply-accumulates over a MAC rate that depends on the
/// activation precision, plus a fixed dispatch overhead. The back ends' benchmarks are meant
/// to calibrate these constants per target.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct CostModel {
    pub bytes_per_s: f64,
    /// MACs per second with 8-bit (or 4-bit) integer activations.
    pub int_macs_per_s: f64,
    /// MACs per second with float activations (weight-only quantization).
    pub float_macs_per_s: f64,
    pub overhead_s: f64,
}

impl Default for CostModel {
    fn default() -> Self {
        CostModel { bytes_per_s: 20e9, int_macs_per_s: 64e9, float_macs_per_s: 32e9, overhead_s: 0.2e-6 }
    }
}

/// One quantizable layer's measurements.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LayerSensitivity {
    pub name: String,
    pub op: String,
    pub params: usize,
    /// Multiply-accumulates per state (batch 1).
    pub macs: usize,
    pub scales: usize,
    /// `(bits, weighted action error, ||W_q - W||^2)` per candidate weight width.
    pub weight: Vec<(u8, f64, f64)>,
    /// `(bits, weighted action error)` per candidate activation width (0 = float, error 0).
    pub act: Vec<(u8, f64)>,
}

/// Runs quantized variants of one float graph on fixed states and scores their actions.
pub struct Measure<'a> {
    pub fp: &'a Graph,
    pub base: &'a QuantConfig,
    pub recipe: Recipe,
    pub calib: &'a [Feeds],
    pub eval: &'a [Feeds],
    /// One weight per evaluation state (in batch order).
    pub weights: &'a [f32],
    fp_out: Vec<f32>,
    act_dim: usize,
}

impl<'a> Measure<'a> {
    pub fn new(
        fp: &'a Graph,
        base: &'a QuantConfig,
        recipe: Recipe,
        calib: &'a [Feeds],
        eval: &'a [Feeds],
        weights: &'a [f32],
    ) -> Result<Measure<'a>> {
        let (out, _) = observe(fp, eval, &[])?;
        let states = out.shape.first().copied().unwrap_or(0);
        if states != weights.len() {
            return Err(IrError::Invalid(format!("{} state weights for {states} evaluation states", weights.len())));
        }
        let act_dim = out.len() / states.max(1);
        Ok(Measure { fp, base, recipe, calib, eval, weights, fp_out: out.data.to_f32_vec(), act_dim })
    }

    /// The weighted action error of the graph `cfg` quantizes to, and the quantize report.
    pub fn error(&self, cfg: &QuantConfig) -> Result<(f64, super::QuantReport)> {
        let (g, rep) = quantize(self.fp, cfg, self.recipe, self.calib)?;
        let (out, _) = observe(&g, self.eval, &[])?;
        let q = out.data.to_f32_vec();
        let (mut num, mut den) = (0f64, 0f64);
        for (s, &w) in self.weights.iter().enumerate() {
            let r = s * self.act_dim..(s + 1) * self.act_dim;
            let e: f64 = self.fp_out[r.clone()].iter().zip(&q[r]).map(|(&a, &b)| ((a - b) as f64).powi(2)).sum();
            num += w as f64 * e / self.act_dim as f64;
            den += w as f64;
        }
        Ok((num / den.max(1e-30), rep))
    }
}

/// The layers the base config quantizes (others stay in float and are not allocated).
pub fn allocatable_layers(fp: &Graph, base: &QuantConfig) -> Result<Vec<Layer>> {
    let all = find_layers(fp)?;
    let n = all.len();
    Ok(all
        .into_iter()
        .enumerate()
        .filter(|(i, l)| base.weight_bits(&l.name, *i == 0, *i + 1 == n).is_some())
        .map(|(_, l)| l)
        .collect())
}

/// `base` with only `layer` quantized, at the given widths (abits 0 = float input); every
/// other layer of the graph (`all`) float, inputs included.
fn only(base: &QuantConfig, all: &[String], layer: &str, wbits: u8, abits: u8) -> QuantConfig {
    let mut c = base.clone();
    c.layers = all
        .iter()
        .map(|n| {
            let o = if n == layer {
                LayerOverride { wbits: Some(wbits), abits: Some(abits), fp: false }
            } else {
                LayerOverride { wbits: None, abits: Some(0), fp: true }
            };
            (n.clone(), o)
        })
        .collect();
    c
}

/// Measures every allocatable layer at each weight width in `wbits` and activation width in
/// `abits` (0 = float); `progress` is told each layer's name as it finishes.
pub fn sensitivity(
    m: &Measure,
    layers: &[Layer],
    wbits: &[u8],
    abits: &[u8],
    mut progress: impl FnMut(&str),
) -> Result<Vec<LayerSensitivity>> {
    let all: Vec<String> = find_layers(m.fp)?.into_iter().map(|l| l.name).collect();
    let mut out = vec![];
    for l in layers {
        let mut weight = vec![];
        for &b in wbits {
            let (e, rep) = m
                .error(&only(m.base, &all, &l.name, b, 0))
                .map_err(|e| e.context(format!("layer `{}` at {b} bits", l.name)))?;
            let lr = rep
                .layers
                .iter()
                .find(|r| r.name == l.name)
                .ok_or_else(|| IrError::Internal(format!("no report for `{}`", l.name)))?;
            let w2 = m.fp.const_value(l.w).map_or(0.0, |t| t.data.to_f64_vec().iter().map(|v| v * v).sum::<f64>());
            weight.push((b, e, lr.weight_rel_mse * w2));
        }
        let mut act = vec![];
        let quantized_acts: Vec<u8> = abits.iter().copied().filter(|&a| a != 0).collect();
        if !quantized_acts.is_empty() {
            // The 8-bit-weights-only error: measured above when 8 is a candidate width.
            let w8 = match weight.iter().find(|w| w.0 == 8) {
                Some(w) => w.1,
                None => m.error(&only(m.base, &all, &l.name, 8, 0))?.0,
            };
            for &a in abits {
                let e = if a == 0 { 0.0 } else { (m.error(&only(m.base, &all, &l.name, 8, a))?.0 - w8).max(0.0) };
                act.push((a, e));
            }
        }
        let (n, k) = l.nk();
        out.push(LayerSensitivity {
            name: l.name.clone(),
            op: match l.kind {
                LayerKind::Conv { .. } => "Conv",
                LayerKind::Gemm { .. } => "Gemm",
                LayerKind::MatMul => "MatMul",
            }
            .into(),
            params: n * k,
            macs: n * k * output_positions(m.fp, l),
            scales: scales(l, m.base),
            weight,
            act,
        });
        progress(&l.name);
    }
    Ok(out)
}

/// Output positions per state a weight is applied at (Conv: output pixels; MatMul: rows per
/// batch item), from inferred shapes.
fn output_positions(g: &Graph, l: &Layer) -> usize {
    let y = &g.node(l.node).outputs[0].ty;
    let known: Vec<usize> = y.shape.iter().map(|d| d.known().unwrap_or(1)).collect();
    match l.kind {
        LayerKind::Conv { .. } => known.iter().skip(2).product(),
        _ if known.len() > 2 => known[1..known.len() - 1].iter().product(),
        _ => 1,
    }
}

/// Scale count of a layer's weight quantizer.
fn scales(l: &Layer, cfg: &QuantConfig) -> usize {
    let (n, k) = l.nk();
    match cfg.granularity {
        Granularity::Tensor => 1,
        Granularity::Channel => n,
        Granularity::Group => n * k.div_ceil(cfg.group),
    }
}

/// Where a layer's errors come from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ErrorSource<'a> {
    /// Measured action error (saliency-weighted or not, as measured).
    Measured,
    /// HAWQ-v2/v3: `trace(H_l) / n_l * ||W_q - W||^2`, with the per-layer Hessian traces.
    HessianTrace(&'a [f64]),
}

/// The allocation problem: per layer, one choice per (weight bits, activation bits) pair, with
/// its cost under `budget`'s measure and its error (weight and activation errors added).
/// `fixed_bytes` (everything not allocated: biases, float layers) is subtracted from a bytes
/// budget. Returns the choices and the budget in cost units.
pub fn problem(
    sens: &[LayerSensitivity],
    budget: Budget,
    source: ErrorSource,
    model: &CostModel,
    fixed_bytes: f64,
) -> Result<(Vec<Vec<Choice>>, f64)> {
    let total_params: usize = sens.iter().map(|s| s.params).sum();
    let mut layers = vec![];
    for (i, s) in sens.iter().enumerate() {
        let acts: Vec<(u8, f64)> = if s.act.is_empty() { vec![(255, 0.0)] } else { s.act.clone() };
        let mut choices = vec![];
        for &(wb, we, wsq) in &s.weight {
            for &(ab, ae) in &acts {
                let werr = match source {
                    ErrorSource::Measured => we,
                    ErrorSource::HessianTrace(tr) => tr[i] / s.params as f64 * wsq,
                };
                let bytes = (s.params * wb as usize).div_ceil(8) as f64 + 4.0 * s.scales as f64;
                let cost = match budget {
                    Budget::Bits(_) => (s.params * wb as usize) as f64,
                    Budget::Bytes(_) => bytes,
                    Budget::Seconds(_) => {
                        let rate = if ab == 0 { model.float_macs_per_s } else { model.int_macs_per_s };
                        bytes / model.bytes_per_s + s.macs as f64 / rate + model.overhead_s
                    }
                };
                let label = if ab == 255 {
                    format!("W{wb}")
                } else if ab == 0 {
                    format!("W{wb}A16")
                } else {
                    format!("W{wb}A{ab}")
                };
                choices.push(Choice { label, cost, error: werr + ae });
            }
        }
        layers.push(choices);
    }
    let b = match budget {
        Budget::Bits(v) => v * total_params as f64,
        Budget::Bytes(v) => v - fixed_bytes,
        Budget::Seconds(v) => v,
    };
    Ok((layers, b))
}

/// The config that realises an allocation (picks index into [`problem`]'s choices).
pub fn apply(base: &QuantConfig, sens: &[LayerSensitivity], choices: &[Vec<Choice>], a: &Allocation) -> QuantConfig {
    let mut c = base.clone();
    for ((s, ch), &k) in sens.iter().zip(choices).zip(&a.picks) {
        let (wb, ab) = parse_label(&ch[k].label);
        c.layers.insert(s.name.clone(), LayerOverride { wbits: Some(wb), abits: ab, fp: false });
    }
    c
}

fn parse_label(l: &str) -> (u8, Option<u8>) {
    let l = l.trim_start_matches('W');
    match l.split_once('A') {
        Some((w, a)) => (w.parse().unwrap_or(8), Some(if a == "16" { 0 } else { a.parse().unwrap_or(8) })),
        None => (l.parse().unwrap_or(8), None),
    }
}

/// Greedy refinement with re-measurement: starting from `a`, repeatedly tries moving one layer
/// up one option and another down one (or a single move down that saves cost) within the
/// budget, measuring the joint action error of each candidate, and keeps the best improvement;
/// stops when none improves or after `rounds`. Captures interactions the additive model misses.
pub fn refine(
    m: &Measure,
    sens: &[LayerSensitivity],
    choices: &[Vec<Choice>],
    budget: f64,
    a: &Allocation,
    rounds: usize,
) -> Result<(Allocation, f64, Vec<f64>)> {
    let order = |ch: &[Choice]| -> Vec<usize> {
        let mut o: Vec<usize> = (0..ch.len()).collect();
        o.sort_by(|&x, &y| ch[x].cost.total_cmp(&ch[y].cost));
        o
    };
    let orders: Vec<Vec<usize>> = choices.iter().map(|c| order(c)).collect();
    let mut cur = a.clone();
    let mut cur_err = m.error(&apply(m.base, sens, choices, &cur))?.0;
    let mut trace = vec![cur_err];
    for _ in 0..rounds {
        let mut best: Option<(Allocation, f64)> = None;
        for up in 0..choices.len() {
            let pu = orders[up].iter().position(|&k| k == cur.picks[up]).expect("pick");
            let Some(&nu) = orders[up].get(pu + 1) else { continue };
            for down in 0..choices.len() {
                if down == up {
                    continue;
                }
                let pd = orders[down].iter().position(|&k| k == cur.picks[down]).expect("pick");
                if pd == 0 {
                    continue;
                }
                let mut p = cur.picks.clone();
                p[up] = nu;
                p[down] = orders[down][pd - 1];
                let cand = super::allocate::summarise(choices, p);
                if cand.cost > budget * (1.0 + 1e-12) {
                    continue;
                }
                let e = m.error(&apply(m.base, sens, choices, &cand))?.0;
                if e < cur_err && best.as_ref().is_none_or(|b| e < b.1) {
                    best = Some((cand, e));
                }
            }
        }
        match best {
            Some((c, e)) => {
                cur = c;
                cur_err = e;
                trace.push(e);
            }
            None => break,
        }
    }
    Ok((cur, cur_err, trace))
}
