//! `sqil compile`: the whole pipeline on a float policy and its demonstrations: canonicalise,
//! PTQ initialisation (calibrated quantizers), SIS of every training state with the float
//! policy, QRD fine-tuning with LSQ, lowering and fusion; writes the quantized model (FakeQuant
//! IR, QDQ ONNX, fused IR) and a JSON report.

use crate::feeds::{policy_feeds, spread};
use crate::quantize::{run_quantize, write_atomic, QuantizeArgs};
use serde::Serialize;
use sqil_data::Demos;
use sqil_ir::interp::Interpreter;
use sqil_ir::{print_graph, Graph, PrintOptions, Tensor};
use sqil_passes::quant::{concat_batches, QuantConfig, QuantReport, Recipe};
use sqil_passes::{PassCtx, PassManager};
use sqil_train::model::{train_graph, with_params};
use sqil_train::sis::{qrd_alpha, sis_with, SisConfig};
use sqil_train::trainer::{train, Dataset, TrainConfig, TrainLog};
use std::path::PathBuf;
use std::time::Instant;

/// How fine-tuning weighs the distillation term per state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FtRecipe {
    /// QRD: alpha = beta on the top `top` fraction of states by SIS, 1 elsewhere.
    Sqil,
    /// Plain QAT: behaviour cloning only (alpha = 0).
    Qat,
    /// Plain distillation: alpha = 1 everywhere.
    Distill,
    /// Continuous SIS weighting: alpha = SIS / mean(SIS), capped at 10.
    SisWeighted,
}

impl FtRecipe {
    pub fn parse(s: &str) -> Result<FtRecipe, String> {
        Ok(match s {
            "sqil" => FtRecipe::Sqil,
            "qat" => FtRecipe::Qat,
            "distill" => FtRecipe::Distill,
            "sis-weighted" => FtRecipe::SisWeighted,
            _ => return Err(format!("unknown recipe `{s}` (known: sqil, qat, distill, sis-weighted)")),
        })
    }
}

pub struct CompileArgs {
    pub demos: PathBuf,
    pub config: QuantConfig,
    pub init: Recipe,
    pub recipe: FtRecipe,
    pub beta: f64,
    pub top: f64,
    pub sis: SisConfig,
    pub max_states: usize,
    pub train: TrainConfig,
    pub out: PathBuf,
    pub resume: bool,
    /// Learn the activation quantizers' steps too (else they keep their calibrated ranges).
    pub act_steps: bool,
}

#[derive(Serialize)]
struct ErrorStats {
    all: f64,
    critical: f64,
}

#[derive(Serialize)]
struct Report {
    model: String,
    recipe: FtRecipe,
    init: String,
    label: String,
    states: usize,
    sis_threshold: f64,
    sis_histogram: Vec<(f64, usize)>,
    top: f64,
    beta: f64,
    act_steps: bool,
    train: TrainConfig,
    log: TrainLog,
    /// Action MSE against the float policy, on all training states and on the top-SIS ones.
    action_mse_before: ErrorStats,
    action_mse_after: ErrorStats,
    ptq: QuantReport,
    seconds: f64,
    fused_kernels: Vec<String>,
    /// Steps of the CPU plan (policy.bin) and its largest difference from the simulation on the
    /// first batch of states, relative to the largest |action|.
    cpu_plan: Vec<String>,
    cpu_rel_diff: f32,
}

/// Demonstrated actions for the policy's output layout: `[B, A]`, or `[B, C, A]` chunks of the
/// next C actions (the episode's last action repeated past its end).
fn targets(demos: &Demos, steps: &[usize], out_rank: usize, chunk: usize) -> Result<Tensor, String> {
    let a = demos.actions.ncols();
    let acts = demos.actions.as_slice().ok_or("demo actions are not contiguous")?;
    if out_rank == 2 {
        let v = steps.iter().flat_map(|&i| acts[i * a..(i + 1) * a].iter().copied()).collect();
        return Tensor::from_f32(vec![steps.len(), a], v).map_err(|e| e.to_string());
    }
    let ends: Vec<usize> = {
        let eps = demos.episodes();
        let mut e = vec![0; demos.len()];
        for r in eps {
            for i in r.clone() {
                e[i] = r.end - 1;
            }
        }
        e
    };
    let mut v = Vec::with_capacity(steps.len() * chunk * a);
    for &i in steps {
        for c in 0..chunk {
            let j = (i + c).min(ends[i]);
            v.extend_from_slice(&acts[j * a..(j + 1) * a]);
        }
    }
    Tensor::from_f32(vec![steps.len(), chunk, a], v).map_err(|e| e.to_string())
}

fn run_all(g: &Graph, batches: &[sqil_passes::quant::Feeds]) -> Result<Tensor, String> {
    let it = Interpreter::new(g).map_err(|e| e.to_string())?;
    let outs = batches
        .iter()
        .map(|b| it.run(b).map(|mut o| o.remove(0)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    concat_batches(outs).map_err(|e| e.to_string())
}

fn mse_rows(a: &Tensor, b: &Tensor, rows: Option<&[usize]>) -> f64 {
    let per: usize = a.shape[1..].iter().product();
    let (av, bv) = (a.data.to_f32_vec(), b.data.to_f32_vec());
    let all: Vec<usize> = (0..a.shape[0]).collect();
    let rows = rows.unwrap_or(&all);
    let s: f64 =
        rows.iter().flat_map(|&r| (0..per).map(move |j| r * per + j)).map(|i| ((av[i] - bv[i]) as f64).powi(2)).sum();
    s / (rows.len() * per).max(1) as f64
}

pub fn compile(model: &std::path::Path, a: &CompileArgs) -> Result<(), String> {
    let t0 = Instant::now();
    std::fs::create_dir_all(&a.out).map_err(|e| format!("{}: {e}", a.out.display()))?;
    let fp_in = crate::load_model(model)?;
    let qa = QuantizeArgs::in_memory(a.init, a.config.clone(), vec![a.demos.clone()], 2048);
    let (sim, _, ptq) = run_quantize(&fp_in, &qa)?;
    // The float policy as quantize saw it (same canonical form, same value names).
    let mut fp = fp_in.clone();
    sqil_passes::cleanup_pipeline().run(&mut fp, &mut PassCtx::default()).map_err(|e| e.to_string())?;
    let demos = Demos::load(&a.demos).map_err(|e| e.to_string())?;
    let steps = spread(demos.len(), a.max_states);
    let batches = policy_feeds(&fp, &demos, &steps, 256).map_err(|e| format!("{}: {e}", a.demos.display()))?;
    let teacher = run_all(&fp, &batches)?;
    let out_rank = teacher.rank();
    let target = targets(&demos, &steps, out_rank, if out_rank == 3 { teacher.shape[1] } else { 1 })?;
    eprintln!("SIS of {} states...", steps.len());
    let sis_batches =
        policy_feeds(&fp, &demos, &steps, if batches[0].values().any(|t| t.rank() == 4) { 8 } else { 64 })?;
    let scores = sis_with(&fp, &sis_batches, &a.sis).map_err(|e| e.to_string())?;
    let (top_alpha, thr) = qrd_alpha(&scores, a.top, a.beta);
    let critical: Vec<usize> = (0..scores.len()).filter(|&i| scores[i] >= thr).collect();
    let mean_sis = scores.iter().sum::<f64>() / scores.len() as f64;
    let alpha: Vec<f32> = match a.recipe {
        FtRecipe::Sqil => top_alpha,
        FtRecipe::Qat => vec![0.0; scores.len()],
        FtRecipe::Distill => vec![1.0; scores.len()],
        FtRecipe::SisWeighted => scores.iter().map(|&s| ((s / mean_sis.max(1e-12)) as f32).min(10.0)).collect(),
    };
    let mut inputs = vec![];
    for &i in &fp.inputs {
        let n = fp.node(i).outputs[0].name.clone();
        let t = concat_batches(batches.iter().map(|b| b[&n].clone()).collect()).map_err(|e| e.to_string())?;
        inputs.push((n, t));
    }
    let before = run_all(&sim, &batches)?;
    let data = Dataset { inputs, target, teacher: teacher.clone(), alpha };
    let mut tg = train_graph(&sim, a.act_steps).map_err(|e| e.to_string())?;
    let ck = a.out.join("checkpoint.json");
    let log = train(&mut tg, &data, &a.train, Some(&ck), a.resume).map_err(|e| e.to_string())?;
    let tuned = with_params(&sim, &tg.params);
    let after = run_all(&tuned, &batches)?;
    // Outputs: the simulation IR, QDQ ONNX, the fused IR.
    let mut lowered = tuned.clone();
    PassManager::from_names(&["lower-quant", "dce"])
        .and_then(|mut pm| pm.run(&mut lowered, &mut PassCtx::default()))
        .map_err(|e| e.to_string())?;
    sqil_codegen::onnx::save(&lowered, &a.out.join("model.onnx")).map_err(|e| e.to_string())?;
    write_atomic(
        &a.out.join("model.sqil"),
        print_graph(&tuned, &PrintOptions::default()).map_err(|e| e.to_string())?.as_bytes(),
    )?;
    let mut fused = lowered.clone();
    let f = sqil_passes::fuse::Fuse::default().fuse(&mut fused).map_err(|e| e.to_string())?;
    PassManager::from_names(&["dce"])
        .and_then(|mut pm| pm.run(&mut fused, &mut PassCtx::default()))
        .map_err(|e| e.to_string())?;
    write_atomic(
        &a.out.join("model.fused.sqil"),
        print_graph(&fused, &PrintOptions::default()).map_err(|e| e.to_string())?.as_bytes(),
    )?;
    // The CPU artifact (plan + packed int4 weights), checked against the simulation on the
    // first batch of training states.
    let plan = crate::quantize::write_artifact(&tuned, model, &a.out.join("policy.bin"))?;
    let cpu_plan = plan.describe();
    let cpu_rel_diff = {
        let feeds: Vec<Tensor> =
            tuned.inputs.iter().map(|&i| batches[0][&tuned.node(i).outputs[0].name].clone()).collect();
        let got = plan.run(&feeds, a.train.threads).map_err(|e| e.to_string())?.remove(0).data.to_f32_vec();
        // The simulation's actions on that batch: the first rows of `after`.
        let want = &after.data.to_f32_vec()[..got.len()];
        let scale = want.iter().fold(1e-12f32, |m, v| m.max(v.abs()));
        want.iter().zip(&got).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max) / scale
    };
    if cpu_rel_diff > sqil_runtime::PLAN_TOL {
        return Err(format!(
            "the CPU plan differs from the simulation by {cpu_rel_diff:.2e} (budget {:.0e}): a back-end bug",
            sqil_runtime::PLAN_TOL
        ));
    }
    let hist = {
        let mx = scores.iter().cloned().fold(0.0, f64::max).max(1e-12);
        let mut h = vec![0usize; 20];
        for &s in &scores {
            h[((s / mx * 20.0) as usize).min(19)] += 1;
        }
        h.into_iter().enumerate().map(|(i, c)| (mx * (i + 1) as f64 / 20.0, c)).collect()
    };
    let report = Report {
        model: model.display().to_string(),
        recipe: a.recipe,
        init: a.init.name().into(),
        label: a.config.label(),
        states: steps.len(),
        sis_threshold: thr,
        sis_histogram: hist,
        top: a.top,
        beta: a.beta,
        act_steps: a.act_steps,
        train: a.train.clone(),
        log,
        action_mse_before: ErrorStats {
            all: mse_rows(&before, &teacher, None),
            critical: mse_rows(&before, &teacher, Some(&critical)),
        },
        action_mse_after: ErrorStats {
            all: mse_rows(&after, &teacher, None),
            critical: mse_rows(&after, &teacher, Some(&critical)),
        },
        ptq,
        seconds: t0.elapsed().as_secs_f64(),
        fused_kernels: f.kernels,
        cpu_plan,
        cpu_rel_diff,
    };
    eprintln!(
        "action MSE vs float: all {:.3e} -> {:.3e}, top-SIS {:.3e} -> {:.3e} ({:.0} s)",
        report.action_mse_before.all,
        report.action_mse_after.all,
        report.action_mse_before.critical,
        report.action_mse_after.critical,
        report.seconds
    );
    write_atomic(
        &a.out.join("report.json"),
        serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?.as_bytes(),
    )?;
    Ok(())
}
