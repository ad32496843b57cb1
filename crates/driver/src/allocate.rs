//! `sqil allocate`: per-layer bit widths under a budget. Measures each layer's sensitivity (the
//! action error with only that layer quantized, weighted by the QRD weights of the SIS scores),
//! solves the multiple-choice knapsack exactly, optionally refines with re-measurement, and
//! writes a quantization config that `sqil quantize` and `sqil compile` read, plus a report
//! (per-layer table, Pareto curve of budget against predicted error) and an SVG plot.

use crate::feeds::{policy_feeds, spread};
use crate::quantize::write_atomic;
use serde::Serialize;
use sqil_data::Demos;
use sqil_ir::Graph;
use sqil_passes::quant::allocate::{allocate, pareto, Allocation, Choice};
use sqil_passes::quant::sensitivity::{
    allocatable_layers, apply, problem, refine, sensitivity, Budget, CostModel, ErrorSource, LayerSensitivity, Measure,
};
use sqil_passes::quant::{QuantConfig, Recipe};
use sqil_passes::PassCtx;
use sqil_train::hessian::{hessian_traces, Traces};
use sqil_train::sis::{qrd_alpha, sis_with, SisConfig};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Where the per-layer errors come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Action error with the QRD state weights (beta on the top-SIS states): saliency-guided.
    Sqil,
    /// Action error, every state weighted 1.
    Uniform,
    /// HAWQ-v2/v3: Hessian trace of the unweighted distillation loss times the weight error.
    Hawq,
}

impl Method {
    pub fn parse(s: &str) -> crate::Result<Method> {
        Ok(match s {
            "sqil" => Method::Sqil,
            "uniform" => Method::Uniform,
            "hawq" => Method::Hawq,
            _ => return Err(format!("unknown allocation method `{s}` (known: sqil, uniform, hawq)").into()),
        })
    }
}

pub struct AllocateArgs {
    pub demos: PathBuf,
    /// Everything but the per-layer widths (granularity, calibration, kept layers...).
    pub base: QuantConfig,
    pub recipe: Recipe,
    pub budget: Budget,
    pub method: Method,
    pub wbits: Vec<u8>,
    /// Candidate activation widths (0 = float); empty: the base config's.
    pub abits: Vec<u8>,
    pub states: usize,
    pub top: f64,
    pub beta: f64,
    pub sis: SisConfig,
    pub refine: usize,
    pub probes: usize,
    pub cost_model: CostModel,
}

#[derive(Serialize)]
pub struct LayerRow {
    pub name: String,
    pub op: String,
    pub params: usize,
    pub macs: usize,
    pub chosen: String,
    /// Per candidate: label, cost in budget units, predicted error.
    pub choices: Vec<Choice>,
    pub sensitivity: LayerSensitivity,
}

#[derive(Serialize)]
pub struct ParetoPoint {
    /// In the budget's unit (average bits, bytes or seconds).
    pub budget: f64,
    pub predicted_error: f64,
    pub bits: Vec<String>,
}

#[derive(Serialize)]
pub struct AllocReport {
    pub model: String,
    pub method: Method,
    pub budget: Budget,
    pub recipe: String,
    pub states: usize,
    pub sis_threshold: Option<f64>,
    pub layers: Vec<LayerRow>,
    /// The allocation's total in the budget's unit.
    pub used: f64,
    pub predicted_error: f64,
    /// The allocated config quantized as a whole and measured with the method's state weights
    /// (the Hessian methods with weight 1).
    pub measured_error: f64,
    pub refine_trace: Vec<f64>,
    pub hessian: Option<Traces>,
    pub pareto: Vec<ParetoPoint>,
    pub seconds: f64,
}

/// The float policy in the canonical form quantize and compile use.
fn canonical(model: &Path) -> crate::Result<Graph> {
    let mut fp = crate::widened(&crate::load_model(model)?)?;
    sqil_passes::cleanup_pipeline().run(&mut fp, &mut PassCtx::default())?;
    Ok(fp)
}

/// Bytes of every float constant that allocation does not size (biases, float layers...).
fn fixed_bytes(fp: &Graph, sens: &[LayerSensitivity]) -> f64 {
    let all: usize = fp
        .topo_order()
        .unwrap_or_default()
        .iter()
        .filter_map(|&n| match &fp.node(n).op {
            sqil_ir::Op::Const(t) if t.dtype().is_float() => Some(t.len()),
            _ => None,
        })
        .sum();
    4.0 * (all - sens.iter().map(|s| s.params).sum::<usize>().min(all)) as f64
}

/// Converts a total in DP cost units back to the budget's unit.
fn in_budget_units(budget: Budget, cost: f64, total_params: usize, fixed: f64) -> f64 {
    match budget {
        Budget::Bits(_) => cost / total_params.max(1) as f64,
        Budget::Bytes(_) => cost + fixed,
        Budget::Seconds(_) => cost,
    }
}

pub fn run_allocate(model: &Path, a: &AllocateArgs) -> crate::Result<(QuantConfig, AllocReport)> {
    let t0 = Instant::now();
    let fp = canonical(model)?;
    let demos = Demos::load_with(&a.demos, &[]).map_err(|e| format!("{}: {e}", a.demos.display()))?;
    let steps = spread(demos.len(), a.states);
    let batches = policy_feeds(&fp, &demos, &steps, 256).map_err(|e| format!("{}: {e}", a.demos.display()))?;
    let (weights, thr) = if a.method == Method::Sqil {
        eprintln!("SIS of {} states...", steps.len());
        let image = batches[0].values().any(|t| t.rank() == 4);
        let sb = policy_feeds(&fp, &demos, &steps, if image { 8 } else { 64 })?;
        let scores = sis_with(&fp, &sb, &a.sis)?;
        let (w, thr) = qrd_alpha(&scores, a.top, a.beta);
        (w, Some(thr))
    } else {
        (vec![1.0; steps.len()], None)
    };
    let m = Measure::new(&fp, &a.base, a.recipe, &batches, &batches, &weights)?;
    let layers = allocatable_layers(&fp, &a.base)?;
    if layers.is_empty() {
        return Err(format!("{}: no layer to allocate (all kept in float?)", model.display()).into());
    }
    let mut done = 0;
    let sens = sensitivity(&m, &layers, &a.wbits, &a.abits, |name| {
        done += 1;
        eprintln!("sensitivity {done}/{}: {name}", layers.len());
        sqil_ir::progress::report("sensitivity", done as u64, layers.len() as u64);
    })?;
    let hessian = if a.method == Method::Hawq {
        eprintln!("Hessian traces ({} probes)...", a.probes);
        Some(hessian_traces(&fp, &layers, &batches, &vec![1.0; steps.len()], a.probes, 0)?)
    } else {
        None
    };
    let source = match &hessian {
        Some(h) => ErrorSource::HessianTrace(&h.trace),
        None => ErrorSource::Measured,
    };
    let fixed = fixed_bytes(&fp, &sens);
    let (choices, b) = problem(&sens, a.budget, source, &a.cost_model, fixed)?;
    let total_params: usize = sens.iter().map(|s| s.params).sum();
    let best = allocate(&choices, b).map_err(|e| {
        format!("the budget ({}) cannot be met with {total_params} allocatable parameters: {e}", budget_text(a.budget))
    })?;
    let (alloc, measured, trace): (Allocation, f64, Vec<f64>) = if a.refine > 0 {
        refine(&m, &sens, &choices, b, &best, a.refine)?
    } else {
        let e = m.error(&apply(&a.base, &sens, &choices, &best))?.0;
        (best, e, vec![])
    };
    let cfg = apply(&a.base, &sens, &choices, &alloc);
    let pareto = pareto(&choices, 16)
        .into_iter()
        .map(|p| ParetoPoint {
            budget: in_budget_units(a.budget, p.cost, total_params, fixed),
            predicted_error: p.error,
            bits: p.picks.iter().zip(&choices).map(|(&k, c)| c[k].label.clone()).collect(),
        })
        .collect();
    let rows = sens
        .iter()
        .zip(&choices)
        .zip(&alloc.picks)
        .map(|((s, c), &k)| LayerRow {
            name: s.name.clone(),
            op: s.op.clone(),
            params: s.params,
            macs: s.macs,
            chosen: c[k].label.clone(),
            choices: c.clone(),
            sensitivity: s.clone(),
        })
        .collect();
    let report = AllocReport {
        model: model.display().to_string(),
        method: a.method,
        budget: a.budget,
        recipe: a.recipe.name().to_string(),
        states: steps.len(),
        sis_threshold: thr,
        layers: rows,
        used: in_budget_units(a.budget, alloc.cost, total_params, fixed),
        predicted_error: alloc.error,
        measured_error: measured,
        refine_trace: trace,
        hessian,
        pareto,
        seconds: t0.elapsed().as_secs_f64(),
    };
    Ok((cfg, report))
}

/// Whether a config path names JSON (`.json`) or TOML (`.toml`); any other extension is an error
/// (a `.yaml` path would otherwise receive TOML).
pub fn config_format(path: &Path) -> crate::Result<bool> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("json") => Ok(true),
        Some("toml") => Ok(false),
        _ => Err(format!("{}: a quantization config is written as .toml or .json", path.display()).into()),
    }
}

/// Writes a config as TOML or JSON (by extension: `.toml` or `.json`), atomically.
pub fn save_config(cfg: &QuantConfig, path: &Path) -> crate::Result<()> {
    let text = if config_format(path)? {
        serde_json::to_string_pretty(cfg)?
    } else {
        // TOML has no null: float activations are written as 16, which `QuantConfig::load` reads back.
        let c = QuantConfig { abits: cfg.abits.or(Some(16)), ..cfg.clone() };
        toml::to_string(&c).map_err(|e| format!("{}: {e}", path.display()))?
    };
    write_atomic(path, text.as_bytes())
}

/// A budget as the user gave it (`--budget`).
pub fn budget_text(b: Budget) -> String {
    match b {
        Budget::Bits(v) => format!("{v} average weight bits"),
        Budget::Bytes(v) => format!("{v:.0} bytes"),
        Budget::Seconds(v) => format!("{:.2} us batch-1 latency", v * 1e6),
    }
}

/// The per-layer table printed by `sqil allocate`.
pub fn render(r: &AllocReport) -> String {
    let mut s =
        format!("{}  method {:?}  budget {}  ({} states)\n", r.model, r.method, budget_text(r.budget), r.states);
    let labels: Vec<String> =
        r.layers.first().map(|l| l.choices.iter().map(|c| c.label.clone()).collect()).unwrap_or_default();
    s += &format!("{:<28} {:>8} {:>7}", "layer", "params", "chosen");
    for l in &labels {
        s += &format!(" {:>10}", l);
    }
    s += "\n";
    for l in &r.layers {
        s += &format!("{:<28} {:>8} {:>7}", l.name, l.params, l.chosen);
        for c in &l.choices {
            s += &format!(" {:>10.3e}", c.error);
        }
        s += "\n";
    }
    let amount = |v: f64| match r.budget {
        Budget::Bits(_) => format!("{v:.3} bits"),
        Budget::Bytes(_) => format!("{v:.0} B"),
        Budget::Seconds(_) => format!("{:.2} us", v * 1e6),
    };
    s += &format!(
        "used {} of {}; predicted error {:.4e}, measured {:.4e}\n",
        amount(r.used),
        amount(r.budget.value()),
        r.predicted_error,
        r.measured_error
    );
    s
}

/// Budget against predicted error (log scale), the chosen allocation marked, as SVG.
pub fn plot_svg(r: &AllocReport) -> String {
    let (w, h, pad) = (640.0, 400.0, 60.0);
    let pts: Vec<(f64, f64)> = r.pareto.iter().map(|p| (p.budget, p.predicted_error.max(1e-30).log10())).collect();
    let chosen = (r.used, r.predicted_error.max(1e-30).log10());
    let all: Vec<(f64, f64)> = pts.iter().copied().chain([chosen]).collect();
    let (x0, x1) = all.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (y0, y1) = all.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let sx = |x: f64| pad + (x - x0) / (x1 - x0).max(1e-12) * (w - 2.0 * pad);
    let sy = |y: f64| h - pad - (y - y0) / (y1 - y0).max(1e-12) * (h - 2.0 * pad);
    let unit = match r.budget {
        Budget::Bits(_) => "average weight bits",
        Budget::Bytes(_) => "model bytes",
        Budget::Seconds(_) => "estimated latency (s)",
    };
    let path: Vec<String> = pts.iter().map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y))).collect();
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <line x1=\"{pad}\" y1=\"{yb}\" x2=\"{xr}\" y2=\"{yb}\" stroke=\"black\"/>\n\
         <line x1=\"{pad}\" y1=\"{pad}\" x2=\"{pad}\" y2=\"{yb}\" stroke=\"black\"/>\n\
         <text x=\"{cx}\" y=\"{ty}\" text-anchor=\"middle\">{unit}</text>\n\
         <text x=\"15\" y=\"{cy}\" transform=\"rotate(-90 15 {cy})\" text-anchor=\"middle\">log10 predicted error ({:?})</text>\n\
         <polyline fill=\"none\" stroke=\"steelblue\" stroke-width=\"2\" points=\"{}\"/>\n",
        r.method,
        path.join(" "),
        yb = h - pad,
        xr = w - pad,
        cx = w / 2.0,
        ty = h - 15.0,
        cy = h / 2.0,
    );
    for &(x, y) in &pts {
        s += &format!("<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"steelblue\"/>\n", sx(x), sy(y));
    }
    for (v, anchor) in [(x0, "start"), (x1, "end")] {
        s += &format!("<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"{anchor}\">{v:.3}</text>\n", sx(v), h - pad + 15.0);
    }
    for v in [y0, y1] {
        s += &format!("<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{v:.2}</text>\n", pad - 4.0, sy(v) + 4.0);
    }
    s += &format!(
        "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"6\" fill=\"none\" stroke=\"crimson\" stroke-width=\"2\"/>\n\
         <text x=\"{:.1}\" y=\"{:.1}\" fill=\"crimson\">chosen</text>\n</svg>\n",
        sx(chosen.0),
        sy(chosen.1),
        sx(chosen.0) + 8.0,
        sy(chosen.1) - 8.0
    );
    s
}
