//! `sqil quantize`: PTQ of an ONNX policy with a named recipe, calibrated on demonstration
//! states; writes the QDQ ONNX model, optionally the FakeQuant IR (the exact simulation) and a
//! JSON report, and prints a per-layer table.

use crate::feeds::{policy_feeds, spread};
use sqil_ir::{print_graph, Graph, PrintOptions};
use sqil_passes::quant::{quantize, Feeds, QuantConfig, QuantReport, Recipe};
use sqil_passes::{PassCtx, PassManager};
use std::path::{Path, PathBuf};

pub struct QuantizeArgs {
    pub recipe: Recipe,
    pub config: QuantConfig,
    /// A demonstration file (.npz), or one .npy batch per graph input.
    pub calib: Vec<PathBuf>,
    pub calib_states: usize,
    pub out: PathBuf,
    pub ir_out: Option<PathBuf>,
    pub report_out: Option<PathBuf>,
    /// Also write the CPU artifact (plan + packed int4 weights).
    pub artifact_out: Option<PathBuf>,
}

impl QuantizeArgs {
    /// Arguments for the simulation graph alone (nothing written): `recipe` and `config`,
    /// calibrated on the first `calib_states` states of `calib`.
    pub fn in_memory(recipe: Recipe, config: QuantConfig, calib: Vec<PathBuf>, calib_states: usize) -> QuantizeArgs {
        QuantizeArgs {
            recipe,
            config,
            calib,
            calib_states,
            out: PathBuf::new(),
            ir_out: None,
            report_out: None,
            artifact_out: None,
        }
    }
}

/// Writes `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> crate::Result<()> {
    Ok(sqil_ir::write_atomic(path, bytes)?)
}

/// The float graph cleaned up, quantized, and its QDQ lowering.
pub fn run_quantize(fp: &Graph, a: &QuantizeArgs) -> crate::Result<(Graph, Graph, QuantReport)> {
    let fp = prepare_float(fp)?;
    let feeds = calibration_feeds(&fp, &a.calib, a.calib_states)?;
    let (mut sim, report) = quantize(&fp, &a.config, a.recipe, &feeds)?;
    PassManager::from_names(&["dce"]).and_then(|mut pm| pm.run(&mut sim, &mut PassCtx::default()))?;
    let mut lowered = sim.clone();
    PassManager::from_names(&["lower-quant", "dce"])
        .and_then(|mut pm| pm.run(&mut lowered, &mut PassCtx::default()))?;
    Ok((sim, lowered, report))
}

/// The float graph as quantization takes it: half precision widened to f32 (`widen-half`), shapes
/// inferred, a model that is already QDQ
/// dequantized to float (it is quantized afresh), and inference BatchNorms folded into the
/// Conv/Gemm before them (the weights that get quantized are the folded ones, as every deployment
/// toolchain does; an unfolded BatchNorm ran as a separate float op between the int4 convolution
/// and its ReLU).
pub fn prepare_float(fp: &Graph) -> crate::Result<Graph> {
    let mut fp = fp.clone();
    let dequantize = sqil_passes::const_fold::ConstFold { fold_dequantize: true, ..Default::default() };
    PassManager::new(vec![
        Box::new(sqil_passes::widen_half::WidenHalf),
        Box::new(sqil_passes::shape_infer::ShapeInfer),
        Box::new(dequantize),
        Box::new(sqil_passes::fold_batchnorm::FoldBatchNorm),
        Box::new(sqil_passes::dce::Dce),
    ])
    .run(&mut fp, &mut PassCtx::default())?;
    Ok(fp)
}

/// Calibration batches from a demonstration file (`.npz`, `n` states spread over it) or from
/// `.npy` files, one per graph input (one batch).
pub fn calibration_feeds(g: &Graph, paths: &[PathBuf], n: usize) -> crate::Result<Vec<Feeds>> {
    match paths {
        [] => Err("no calibration data given (--calib)".into()),
        [p] if p.extension().is_some_and(|e| e == "npz") => {
            let demos = sqil_data::Demos::load_with(p, &[])?;
            let steps = spread(demos.len(), n);
            Ok(policy_feeds(g, &demos, &steps, 256).map_err(|e| format!("{}: {e}", p.display()))?)
        }
        _ => {
            if paths.len() != g.inputs.len() {
                return Err(
                    format!("{} calibration .npy file(s) for {} graph input(s)", paths.len(), g.inputs.len()).into()
                );
            }
            let mut f = Feeds::new();
            for (p, &i) in paths.iter().zip(&g.inputs) {
                let t = crate::widened_feed(crate::npy::read(p)?);
                calibration_rows_ok(&t).map_err(|e| format!("{}: {e}", p.display()))?;
                f.insert(g.node(i).outputs[0].name.clone(), t);
            }
            Ok(vec![f])
        }
    }
}

/// A calibration batch must hold states (a leading dimension of at least one) and only finite
/// values: a NaN or infinity would become a quantizer's range and every scale after it (the error
/// names the first such value's row and column).
pub fn calibration_rows_ok(t: &sqil_ir::Tensor) -> Result<(), String> {
    let rows = t.shape.first().copied().unwrap_or(1);
    if rows == 0 || t.is_empty() {
        return Err(format!("no calibration states (shape {:?})", t.shape));
    }
    let per = t.len() / rows;
    for (i, v) in t.data.to_f32_vec().iter().enumerate() {
        if !v.is_finite() {
            return Err(format!("row {}, column {}: {v} (calibration data must be finite)", i / per, i % per));
        }
    }
    Ok(())
}

/// Runs `sqil quantize` and writes its files.
pub fn quantize_cmd(model: &Path, a: &QuantizeArgs) -> crate::Result<QuantReport> {
    // Every output checked before anything is written (a later one failing would leave the first).
    for out in [Some(&a.out), a.ir_out.as_ref(), a.report_out.as_ref(), a.artifact_out.as_ref()].into_iter().flatten() {
        crate::distinct_output(model, out)?;
        crate::ensure_writable_parent(out)?;
    }
    let fp = crate::load_model(model)?;
    let (sim, mut lowered, report) = run_quantize(&fp, a)?;
    // A half-precision model's QDQ export keeps its input and output types (a drop-in).
    sqil_passes::widen_half::restore_io_types(&mut lowered, &fp);
    sqil_codegen::onnx::save(&lowered, &a.out)?;
    if let Some(p) = &a.ir_out {
        let text = print_graph(&sim, &PrintOptions::default())?;
        write_atomic(p, text.as_bytes())?;
    }
    if let Some(p) = &a.report_out {
        let text = serde_json::to_string_pretty(&report)?;
        write_atomic(p, text.as_bytes())?;
    }
    if let Some(p) = &a.artifact_out {
        write_artifact(&sim, model, p)?;
    }
    Ok(report)
}

/// Lowers a quantized simulation graph for the CPU runtime (fusion, then the plan) and writes
/// the artifact (the fused graph and packed weights) to `out`; returns the lowered policy.
/// `source` names the model in errors.
pub fn write_artifact(sim: &Graph, source: &Path, out: &Path) -> crate::Result<sqil_lower::Lowered> {
    let (lowered, bytes) = encode_artifact(sim, source)?;
    sqil_runtime::artifact::save(out, &bytes)?;
    Ok(lowered)
}

/// The lowered policy of a simulation graph and its CPU artifact bytes (`source` names it in
/// errors).
pub fn encode_artifact(sim: &Graph, source: &Path) -> crate::Result<(sqil_lower::Lowered, Vec<u8>)> {
    let lowered = sqil_lower::lower(sim).map_err(|e| format!("{}: {e}", source.display()))?;
    let bytes = sqil_runtime::artifact::encode_lowered(&lowered.graph, &lowered.plan)?;
    Ok((lowered, bytes))
}

/// The per-layer table.
pub fn render(r: &QuantReport) -> String {
    let mut s = format!(
        "recipe {} ({}), {} calibration states\n{:<28} {:<6} {:>8} {:>3} {:>3} {:>21} {:>11} {:>11} {:>19}\n",
        r.recipe,
        r.label,
        r.calibration_states,
        "layer",
        "op",
        "params",
        "W",
        "A",
        "scales",
        "W rel mse",
        "out rel mse",
        "act range"
    );
    for l in &r.layers {
        let bits = |b: Option<u8>| b.map_or("fp".to_string(), |b| b.to_string());
        let act = l.act_range.map_or("-".to_string(), |(lo, hi)| format!("[{lo:.3}, {hi:.3}]"));
        s += &format!(
            "{:<28} {:<6} {:>8} {:>3} {:>3} {:>21} {:>11.3e} {:>11.3e} {:>19}\n",
            l.name,
            l.op,
            l.params,
            bits(l.wbits),
            bits(l.abits),
            format!("{:.2e}..{:.2e}", l.scale_min, l.scale_max),
            l.weight_rel_mse,
            l.output_rel_mse,
            act
        );
    }
    s += &format!("action mse vs float: {:.4e} (relative {:.4e})\n", r.action_mse, r.action_mse_rel);
    s
}
