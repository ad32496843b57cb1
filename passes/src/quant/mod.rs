//! Post-training quantization: the config, the quantizable layers, FakeQuant placement, weight
//! recipes (RTN, MSE, AWQ, GPTQ) and activation calibration, and [`quantize`], which runs them
//! on calibration states and reports per layer.

pub mod allocate;
pub mod calibrate;
pub mod config;
pub mod insert;
pub mod layers;
pub mod sensitivity;
pub mod weights;

pub use config::{ActCalib, Granularity, QuantConfig, RawInput};
pub use weights::Recipe;

use insert::{insert_act_quant, insert_weight_quant};
use layers::{input_matrix, LayerKind};
use serde::Serialize;
use sqil_ir::interp::Interpreter;
use sqil_ir::{Graph, IrError, Op, Result, Tensor, Value, ValueRef, ValueType};
use std::collections::HashMap;
use weights::{awq, gptq, round_to_nearest, Quantizer};

/// Rows of a layer's input used by AWQ's search and GPTQ's Hessian.
const MAX_ROWS: usize = 4096;

/// Calibration inputs: one feed per batch, graph input name -> tensor.
pub type Feeds = HashMap<String, Tensor>;

#[derive(Clone, Debug, Serialize)]
pub struct LayerReport {
    pub name: String,
    pub op: String,
    pub params: usize,
    /// `None`: kept in float.
    pub wbits: Option<u8>,
    pub abits: Option<u8>,
    pub scale_min: f32,
    pub scale_max: f32,
    /// `||W - W_q||^2 / ||W||^2` of the effective weights (AWQ scaling undone).
    pub weight_rel_mse: f64,
    /// `||X W_q^T - X W^T||^2 / ||X W^T||^2` on calibration inputs (float inputs).
    pub output_rel_mse: f64,
    /// AWQ: range of the input-channel factors.
    pub awq_factor_range: Option<(f32, f32)>,
    pub act_range: Option<(f32, f32)>,
}

#[derive(Clone, Debug, Serialize)]
pub struct QuantReport {
    pub recipe: String,
    pub config: QuantConfig,
    pub label: String,
    pub calibration_states: usize,
    pub layers: Vec<LayerReport>,
    /// Mean squared difference of the first output (actions) vs the float model, on the
    /// calibration states.
    pub action_mse: f64,
    pub action_mse_rel: f64,
}

/// Tensors concatenated along axis 0 (batches of one value), as f32.
pub fn concat_batches(parts: Vec<Tensor>) -> Result<Tensor> {
    if parts.len() == 1 {
        return Ok(parts.into_iter().next().expect("one"));
    }
    let mut shape = parts[0].shape.clone();
    shape[0] = parts.iter().map(|t| t.shape[0]).sum();
    // One allocation of the final size (collecting a flat_map grew it by doubling: copies and
    // fresh pages of a calibration set's activations, gigabytes for an image policy).
    let mut data = Vec::with_capacity(parts.iter().map(|t| t.data.len()).sum());
    for t in &parts {
        data.extend_from_slice(&t.data.f32_cow());
    }
    Tensor::from_f32(shape, data)
}

/// Runs `g` on every batch, returning the first output and the `keep` values, each
/// concatenated along axis 0. Batches run on all the cores this process may use (each batch is
/// one independent interpreter run, so the result does not depend on how many).
pub fn observe(g: &Graph, calib: &[Feeds], keep: &[ValueRef]) -> Result<(Tensor, Vec<Tensor>)> {
    let it = Interpreter::new(g)?;
    let runs = sqil_ir::par::map(calib.len(), |i| it.run_keep(&calib[i], keep));
    let mut outs = vec![];
    let mut kept: Vec<Vec<Tensor>> = vec![vec![]; keep.len()];
    for r in runs {
        let (o, k) = r?;
        outs.push(o.into_iter().next().ok_or_else(|| IrError::Invalid("graph has no outputs".into()))?);
        for (slot, t) in k.into_iter().enumerate() {
            kept[slot].push(t);
        }
    }
    Ok((concat_batches(outs)?, kept.into_iter().map(concat_batches).collect::<Result<_>>()?))
}

fn rel(num: f64, den: f64) -> f64 {
    if den > 0.0 {
        num / den
    } else {
        num
    }
}

/// Quantizes a float graph (already cleaned up) with `recipe` under `cfg`, calibrating on
/// `calib`: weights first (from the float layer inputs), then activation ranges on the
/// weight-quantized graph. Returns the FakeQuant graph (the exact simulation) and a report.
pub fn quantize(fp: &Graph, cfg: &QuantConfig, recipe: Recipe, calib: &[Feeds]) -> Result<(Graph, QuantReport)> {
    Calibration::new(fp, cfg, calib)?.quantize(recipe)
}

/// The float graph observed once on the calibration states (its actions and the float input of
/// every layer `cfg` quantizes), for trying several recipes: each [`Calibration::quantize`] gives
/// what [`quantize`] gives for that recipe.
pub struct Calibration<'a> {
    fp: &'a Graph,
    cfg: &'a QuantConfig,
    calib: &'a [Feeds],
    fp_out: Tensor,
    fp_x: Vec<Tensor>,
}

impl<'a> Calibration<'a> {
    pub fn new(fp: &'a Graph, cfg: &'a QuantConfig, calib: &'a [Feeds]) -> Result<Calibration<'a>> {
        cfg.validate()?;
        if calib.is_empty() {
            return Err(IrError::Invalid("quantize: no calibration states".into()));
        }
        let mut g = fp.clone();
        let wsites = insert_weight_quant(&mut g, cfg)?;
        let xs: Vec<ValueRef> = wsites.iter().map(|s| s.layer.x).collect();
        let (fp_out, fp_x) = observe(fp, calib, &xs)?;
        Ok(Calibration { fp, cfg, calib, fp_out, fp_x })
    }

    /// Quantizes with `recipe`: weights first (from the observed float layer inputs), then
    /// activation ranges on the weight-quantized graph.
    pub fn quantize(&self, recipe: Recipe) -> Result<(Graph, QuantReport)> {
        let Calibration { fp, cfg, calib, fp_out, fp_x } = self;
        let (fp, cfg, calib) = (*fp, *cfg, *calib);
        let mut g = fp.clone();
        let wsites = insert_weight_quant(&mut g, cfg)?;
        let mut reports = vec![];
        // GPTQ over many layers takes a while: a live bar on a terminal (hidden elsewhere).
        let bar = indicatif::ProgressBar::new(wsites.len() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} layers  ETA {eta}")
                .expect("valid progress template"),
        );
        bar.set_message(format!("{} weights", recipe.name()));
        let phase = format!("{} weights", recipe.name());
        for (i, (site, x)) in wsites.iter().zip(fp_x.iter()).enumerate() {
            bar.inc(1);
            sqil_ir::progress::report(&phase, i as u64, wsites.len() as u64);
            let q = site.quantizer;
            let needs_rows = matches!(recipe, Recipe::Awq | Recipe::Gptq);
            let grouped_conv = matches!(site.layer.kind, LayerKind::Conv { group } if group != 1);
            let (rows, xm) = input_matrix(&g, &site.layer, x, MAX_ROWS).or_else(|e| {
                if grouped_conv {
                    Ok((0, vec![]))
                } else {
                    Err(e)
                }
            })?;
            // The raw observation with per-feature scales: the recipe quantizes `W * s` for inputs `x / s`.
            let smooth = (cfg.raw_input == config::RawInput::Scaled
                && rows > 0
                && matches!(site.layer.kind, LayerKind::Gemm { .. } | LayerKind::MatMul)
                && insert::is_raw_vector_input(&g, site.layer.x))
            .then(|| smooth_scales(&site.view, &xm, rows, &site.layer.channel_of_k()));
            let (view, xs) = match &smooth {
                Some(s) => {
                    let chan = site.layer.channel_of_k();
                    let k = site.view.k;
                    let mut v = site.view.clone();
                    v.w.iter_mut().enumerate().for_each(|(i, w)| *w *= s[chan[i % k]]);
                    (std::borrow::Cow::Owned(v), xm.iter().enumerate().map(|(i, x)| x / s[chan[i % k]]).collect())
                }
                None => (std::borrow::Cow::Borrowed(&site.view), xm.clone()),
            };
            let mut wq = match recipe {
                _ if needs_rows && rows == 0 => round_to_nearest(&view, q, true),
                Recipe::Rtn => round_to_nearest(&view, q, false),
                Recipe::Mse => round_to_nearest(&view, q, true),
                Recipe::Awq => awq(&view, q, &xs, rows, &site.layer.channel_of_k()),
                Recipe::Gptq => {
                    gptq(&view, q, &xs, rows, true).map_err(|e| e.context(format!("layer `{}`", site.layer.name)))?
                }
            };
            if let Some(s) = smooth {
                wq.act_scale = Some(match wq.act_scale.take() {
                    Some(a) => s.iter().zip(&a).map(|(x, y)| x * y).collect(),
                    None => s,
                });
            }
            site.set(&mut g, &wq)?;
            // Effective weights (AWQ factors undone) against the float ones.
            let chan = site.layer.channel_of_k();
            let k = site.view.k;
            let mut eff = weights::simulated(&site.view, q, &wq);
            if let Some(s) = &wq.act_scale {
                eff.iter_mut().enumerate().for_each(|(i, v)| *v /= s[chan[i % k]]);
                insert_input_scale(&mut g, &site.layer, s)?;
            }
            let w2: f64 = site.view.w.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / site.view.w.len() as f64;
            let out_err = if rows > 0 {
                let y = weights::matmul_nt(&xm, rows, &site.view.w, site.view.n, k);
                let yq = weights::matmul_nt(&xm, rows, &eff, site.view.n, k);
                let y2 = y.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / y.len() as f64;
                rel(weights::mse(&y, &yq), y2)
            } else {
                f64::NAN
            };
            let (smin, smax) = wq.scale.iter().fold((f32::INFINITY, 0f32), |(a, b), &s| (a.min(s), b.max(s)));
            reports.push(LayerReport {
                name: site.layer.name.clone(),
                op: g.node(site.layer.node).op.name().to_string(),
                params: site.view.w.len(),
                wbits: Some(site.bits),
                abits: None,
                scale_min: smin,
                scale_max: smax,
                weight_rel_mse: rel(weights::mse(&site.view.w, &eff), w2),
                output_rel_mse: out_err,
                awq_factor_range: wq
                    .act_scale
                    .as_ref()
                    .map(|s| s.iter().fold((f32::INFINITY, 0f32), |(a, b), &v| (a.min(v), b.max(v)))),
                act_range: None,
            });
        }
        bar.finish_and_clear();
        sqil_ir::progress::report(&phase, wsites.len() as u64, wsites.len() as u64);
        // Activation ranges on the weight-quantized graph (activations still float).
        let act_inputs = act_inputs(&g, cfg)?;
        let (_, observed) = observe(&g, calib, &act_inputs.iter().map(|a| a.0).collect::<Vec<_>>())?;
        let mut params = HashMap::new();
        let mut ranges = HashMap::new();
        for ((v, bits), t) in act_inputs.iter().zip(&observed) {
            let q = Quantizer { bits: *bits, symmetric: cfg.act_symmetric };
            let (s, z) = calibrate::calibrate(&t.data.f32_cow(), q, cfg.act_calib, cfg.percentile);
            let (qmin, qmax) = q.range();
            params.insert(*v, (s, z));
            ranges.insert(*v, ((qmin - z) * s, (qmax - z) * s));
        }
        let asites = insert_act_quant(&mut g, cfg, &params)?;
        for a in &asites {
            for l in &a.layers {
                if let Some(r) = reports.iter_mut().find(|r| &r.name == l) {
                    r.abits = Some(a.bits);
                    r.act_range = ranges.get(&a.input).copied();
                }
            }
        }
        let (q_out, _) = observe(&g, calib, &[])?;
        let (a, b) = (fp_out.data.to_f32_vec(), q_out.data.to_f32_vec());
        let action_mse = weights::mse(&a, &b);
        let a2 = a.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / a.len().max(1) as f64;
        let report = QuantReport {
            recipe: recipe.name().into(),
            config: cfg.clone(),
            label: cfg.label(),
            calibration_states: fp_out.shape.first().copied().unwrap_or(0),
            layers: reports,
            action_mse,
            action_mse_rel: rel(action_mse, a2),
        };
        Ok((g, report))
    }
}

/// SmoothQuant's per-input-channel factors at alpha 0.5: `s_c = sqrt(max|x_c| / max|W_c|)` over the
/// calibration rows and the weight's column, normalised to geometric mean 1 and kept in [1e-4, 1e4].
fn smooth_scales(v: &layers::WeightView, x: &[f32], rows: usize, chan: &[usize]) -> Vec<f32> {
    let (n, k) = (v.n, v.k);
    let channels = chan.iter().max().map_or(0, |c| c + 1);
    let (mut ax, mut aw) = (vec![0f32; channels], vec![0f32; channels]);
    for r in 0..rows {
        for kk in 0..k {
            ax[chan[kk]] = ax[chan[kk]].max(x[r * k + kk].abs());
        }
    }
    for r in 0..n {
        for kk in 0..k {
            aw[chan[kk]] = aw[chan[kk]].max(v.w[r * k + kk].abs());
        }
    }
    let s: Vec<f64> = ax.iter().zip(&aw).map(|(&a, &w)| ((a.max(1e-8) / w.max(1e-8)) as f64).sqrt()).collect();
    let geo = (s.iter().map(|v| v.ln()).sum::<f64>() / s.len().max(1) as f64).exp();
    s.iter().map(|v| (v / geo).clamp(1e-4, 1e4) as f32).collect()
}

/// The values that will get activation FakeQuants (with their bits), in graph order.
fn act_inputs(g: &Graph, cfg: &QuantConfig) -> Result<Vec<(ValueRef, u8)>> {
    let mut g2 = g.clone();
    let sites = insert_act_quant(&mut g2, cfg, &HashMap::new())?;
    Ok(sites.iter().map(|s| (s.input, s.bits)).collect())
}

/// AWQ: divides the layer's input by per-channel factors `s` (a `Mul` by `1/s` in front of it).
fn insert_input_scale(g: &mut Graph, layer: &layers::Layer, s: &[f32]) -> Result<()> {
    let x = g.inputs_of(layer.node)[0].expect("layer input");
    let rank = g.value(x).ty.rank();
    let shape = match layer.kind {
        LayerKind::Conv { .. } => {
            let mut v = vec![1; rank];
            v[1] = s.len();
            v
        }
        LayerKind::Gemm { trans_a: true, .. } => vec![s.len(), 1],
        _ => vec![s.len()],
    };
    let inv = g.add_const(
        format!("{}.awq.inv_scale", layer.name),
        Tensor::from_f32(shape, s.iter().map(|v| 1.0 / v).collect())?,
    );
    let ty: ValueType = g.value(x).ty.clone();
    let n = g.add_node(
        format!("{}.awq", layer.name),
        Op::Binary(sqil_ir::ops::BinaryOp::Mul),
        &[Some(x), Some(inv)],
        vec![Value { name: format!("{}.awq.x", layer.name), ty }],
    );
    g.set_input(layer.node, 0, ValueRef { node: n, slot: 0 });
    Ok(())
}
