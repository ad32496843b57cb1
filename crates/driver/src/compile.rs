//! `sqil compile`: the whole pipeline on a float policy and its demonstrations, chosen on
//! held-out episodes: canonicalise; split the demonstrations by episode into training states and
//! validation states; every PTQ recipe (or the one `--init` pins) calibrated on training states
//! and scored on the validation states; SIS of every state with the float policy; QRD
//! fine-tuning with LSQ from the best-scoring PTQ candidate, scored on the validation states at
//! regular steps (best-so-far kept, early stopping); the best candidate of all ships. Then
//! lowering, fusion and the CPU artifact, checked against the simulation. Writes the quantized
//! model (FakeQuant IR, QDQ ONNX, fused IR, policy.bin) and a JSON report with every
//! candidate's score (docs/training.md, "Validation inside compile").

use crate::feeds::{policy_feeds, spread};
use crate::forward::Forward;
use crate::quantize::write_atomic;
use serde::Serialize;
use sqil_data::{ActionBox, Demos};
use sqil_ir::interp::Interpreter;
use sqil_ir::testing::Rng;
use sqil_ir::{print_graph, Graph, PrintOptions, Tensor};
use sqil_passes::quant::{concat_batches, Feeds, QuantConfig, QuantReport, Recipe};
use sqil_passes::{PassCtx, PassManager};
use sqil_runtime::Execute;
use sqil_train::model::{train_graph_with, with_params, Param};
use sqil_train::sis::{qrd_alpha, sis_run, SisConfig};
use sqil_train::trainer::{train_with, Dataset, GradEngine, TrainConfig, TrainLog, Validation};
use std::path::{Path, PathBuf};
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
    pub fn parse(s: &str) -> crate::Result<FtRecipe> {
        Ok(match s {
            "sqil" => FtRecipe::Sqil,
            "qat" => FtRecipe::Qat,
            "distill" => FtRecipe::Distill,
            "sis-weighted" => FtRecipe::SisWeighted,
            _ => return Err(format!("unknown recipe `{s}` (known: sqil, qat, distill, sis-weighted)").into()),
        })
    }
}

/// What compile ships.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ship {
    /// The best candidate on the held-out states: fine-tuned if it beats the best PTQ one.
    Best,
    /// The best fine-tuned checkpoint, even if a PTQ candidate scores better (recipe studies).
    Finetuned,
    /// The best PTQ candidate, without fine-tuning.
    Ptq,
}

/// Where the action box comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum BoxSource {
    /// The demonstrations' metadata (`action_low`, `action_high`), if they give one.
    Metadata,
    /// No box: actions compare unclipped.
    None,
    /// `LOW,HIGH` on every action dimension.
    Given(String),
}

/// Everything `sqil compile` takes but the model. [`CompileArgs::new`] gives the command line's
/// defaults (a test checks they agree); set the public fields to change them.
#[derive(Clone, Debug)]
pub struct CompileArgs {
    pub demos: PathBuf,
    pub config: QuantConfig,
    /// The PTQ recipe that initialises fine-tuning; `None`: every recipe is tried and the best
    /// on the validation states is kept.
    pub init: Option<Recipe>,
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
    /// Fraction of the demonstration episodes held out for validation (at least one episode).
    pub val_frac: f64,
    /// At most this many validation states (spread evenly over the held-out episodes).
    pub val_states: usize,
    /// Score the fine-tuned weights every this many steps (0: 20 times over the run).
    pub val_every: usize,
    /// Stop fine-tuning after this many evaluations without a better score (0: never).
    pub patience: usize,
    pub action_box: BoxSource,
    /// Seed of the validation split (the training seed is `train.seed`).
    pub split_seed: u64,
    /// Budget of the CPU plan's difference from the simulation, relative to the largest |action|.
    pub plan_tol: f32,
    pub ship: Ship,
    /// Where the fine-tuning steps run (the optimizer, checkpoints and validation run on the CPU).
    pub device: crate::gpu_train::Device,
    /// GPUs the fine-tuning steps are spread over with `device` cuda (data-parallel, NCCL).
    pub gpus: usize,
    /// HDF5 (robomimic) demonstrations: the observation keys, in order (empty: every 1-D or 2-D
    /// key, sorted by name).
    pub obs_keys: Vec<String>,
    /// A folder that keeps SIS scores between compiles of the same policy, states and SIS
    /// settings ([`crate::cache`]; by default [`crate::cache::default_dir`]); `None`: computed
    /// every time.
    pub cache: Option<PathBuf>,
}

impl CompileArgs {
    /// `sqil compile --demos DEMOS -o OUT` at every default: W4A8 in groups of 64 with the raw
    /// observation in float, every PTQ recipe tried, SQIL (beta 2 on the top 20% of states by
    /// SIS) for 4000 steps at batch 256, lr 3e-4 (LSQ steps at 0.1x), 10% of the episodes held out
    /// to choose what ships, the best candidate shipped, on the CPU with 2 threads.
    pub fn new(demos: impl Into<PathBuf>, out: impl Into<PathBuf>) -> CompileArgs {
        let steps = 4000;
        CompileArgs {
            demos: demos.into(),
            config: QuantConfig::default(),
            init: None,
            recipe: FtRecipe::Sqil,
            beta: 2.0,
            top: 0.2,
            sis: SisConfig::default(),
            max_states: 20000,
            train: TrainConfig {
                steps,
                batch: 256,
                lr: 3e-4,
                step_lr_scale: 0.1,
                seed: 0,
                threads: 2,
                warmup: (steps / 20).max(1),
                ..Default::default()
            },
            out: out.into(),
            resume: false,
            act_steps: true,
            val_frac: 0.1,
            val_states: 5000,
            val_every: 0,
            patience: 8,
            action_box: BoxSource::Metadata,
            split_seed: 0,
            plan_tol: sqil_runtime::PLAN_TOL,
            ship: Ship::Best,
            device: crate::gpu_train::Device::Cpu,
            gpus: 1,
            obs_keys: vec![],
            cache: crate::cache::default_dir(),
        }
    }
}

/// Action error (mean squared, per action dimension, after clipping to the action box) against
/// the float policy.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct ErrorStats {
    /// All states.
    pub all: f64,
    /// The critical states (top `top` by SIS, the training states' threshold).
    pub critical: f64,
    /// The selection criterion: states weighted as QRD weighs them (beta on critical ones, 1
    /// elsewhere), i.e. `(all_noncrit_sum + beta * crit_sum) / (n_noncrit + beta * n_crit)`.
    pub score: f64,
}

/// One scored candidate of the selection.
#[derive(Clone, Debug, Serialize)]
pub struct Candidate {
    /// `ptq:<recipe>`, or `<ft recipe>@<step>` for fine-tuned weights.
    pub name: String,
    pub heldout: ErrorStats,
    pub chosen: bool,
}

#[derive(Serialize)]
struct Split {
    episodes: usize,
    validation_episodes: Vec<usize>,
    training_states: usize,
    validation_states: usize,
    critical_validation_states: usize,
}

#[derive(Serialize)]
struct Report {
    model: String,
    recipe: FtRecipe,
    init: String,
    label: String,
    /// What shipped: the name of the chosen candidate.
    shipped: String,
    /// Why, in one line.
    decision: String,
    candidates: Vec<Candidate>,
    split: Split,
    action_box: Option<ActionBox>,
    states: usize,
    sis_threshold: f64,
    /// The SIS scores came from the cache (`--cache-dir`), computed by an earlier compile.
    sis_from_cache: bool,
    sis_histogram: Vec<(f64, usize)>,
    top: f64,
    beta: f64,
    act_steps: bool,
    /// The training settings; `train.threads` is one of them: the threads split each batch's
    /// gradient sums, so runs repeat bit for bit only with the same seed and thread count.
    train: TrainConfig,
    /// What a rerun must keep to reproduce this one exactly (said here because --threads is
    /// usually thought of as speed only).
    reproducible_with: String,
    /// Where the fine-tuning steps ran.
    device: crate::gpu_train::Device,
    /// GPUs the steps were spread over (0 on the CPU).
    gpus: usize,
    log: TrainLog,
    /// Held-out action error of the best PTQ candidate and of what shipped.
    heldout_before: ErrorStats,
    heldout_after: ErrorStats,
    /// The same on the training states (the float policy's actions, clipped).
    action_mse_before: ErrorStats,
    action_mse_after: ErrorStats,
    ptq: QuantReport,
    seconds: f64,
    /// Wall seconds per phase, in order (where a long compile spends its time).
    phases: Vec<(String, f64)>,
    /// The fused kernels that run in policy.bin (the fusion pass's choice, as lowered).
    fused_kernels: Vec<String>,
    /// Steps of the CPU plan (policy.bin) and its largest difference from the simulation on the
    /// validation states, relative to the largest |action|.
    cpu_plan: Vec<String>,
    cpu_rel_diff: f32,
    /// Where the CPU plan and the simulation part, when they do beyond the budget.
    cpu_mismatch: Option<String>,
}

/// Demonstrated actions for the policy's output layout: `[B, A]`, or `[B, C, A]` chunks of the
/// next C actions (the episode's last action repeated past its end).
fn targets(
    demos: &Demos,
    actions: &ndarray::Array2<f32>,
    steps: &[usize],
    out_rank: usize,
    chunk: usize,
) -> crate::Result<Tensor> {
    let a = actions.ncols();
    let acts = actions.as_slice().ok_or("demo actions are not contiguous")?;
    if out_rank == 2 {
        let v = steps.iter().flat_map(|&i| acts[i * a..(i + 1) * a].iter().copied()).collect();
        return Ok(Tensor::from_f32(vec![steps.len(), a], v)?);
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
    Ok(Tensor::from_f32(vec![steps.len(), chunk, a], v)?)
}

/// Held-out episodes: `max(1, round(frac * E))` of the `E` episodes, chosen by a seeded shuffle
/// (with one episode, its last `frac` of steps). Returns (training steps, validation steps,
/// validation episode indices).
pub fn split_episodes(demos: &Demos, frac: f64, seed: u64) -> (Vec<usize>, Vec<usize>, Vec<usize>) {
    let eps = demos.episodes();
    if eps.len() == 1 {
        let n = demos.len();
        let k = ((n as f64 * frac).round() as usize).clamp(1, n.saturating_sub(1).max(1));
        let cut = n - k;
        return ((0..cut.max(1)).collect(), (cut..n).collect(), vec![0]);
    }
    let k = ((eps.len() as f64 * frac).round() as usize).clamp(1, eps.len() - 1);
    let mut order: Vec<usize> = (0..eps.len()).collect();
    let mut rng = Rng::new(seed ^ 0x5eed_5917);
    for i in (1..order.len()).rev() {
        let j = rng.below(i + 1);
        order.swap(i, j);
    }
    let mut val_eps: Vec<usize> = order[..k].to_vec();
    val_eps.sort_unstable();
    let (mut tr, mut va) = (vec![], vec![]);
    for (e, r) in eps.iter().enumerate() {
        if val_eps.binary_search(&e).is_ok() {
            va.extend(r.clone());
        } else {
            tr.extend(r.clone());
        }
    }
    (tr, va, val_eps)
}

/// Per-state action rows clipped to the box (a copy).
fn clipped(t: &Tensor, b: Option<&ActionBox>) -> Vec<f32> {
    let mut v = t.data.to_f32_vec();
    if let Some(b) = b {
        b.clip(&mut v);
    }
    v
}

/// Interval ends of clipped actions for the training loss (see `sqil_train::model`): inside the
/// box `[v, v]`, at the upper bound `[high, BIG]`, at the lower `[-BIG, low]`.
fn intervals(t: &Tensor, b: &ActionBox) -> crate::Result<(Tensor, Tensor)> {
    const BIG: f32 = 1e30;
    let v = clipped(t, Some(b));
    let a = b.low.len();
    let lo = v.iter().enumerate().map(|(i, &x)| if x <= b.low[i % a] { -BIG } else { x }).collect();
    let hi = v.iter().enumerate().map(|(i, &x)| if x >= b.high[i % a] { BIG } else { x }).collect();
    let mk = |d: Vec<f32>| Tensor::from_f32(t.shape.clone(), d);
    Ok((mk(lo)?, mk(hi)?))
}

/// Scores graphs on a fixed set of states against the float policy's clipped actions.
struct Scorer<'a> {
    fwd: &'a Forward,
    batches: &'a [Feeds],
    teacher: Vec<f32>,
    /// Per state: whether it is critical.
    critical: Vec<bool>,
    beta: f64,
    abox: Option<&'a ActionBox>,
}

impl<'a> Scorer<'a> {
    /// Scores against `teacher`'s actions (clipped to `abox`) on `batches`.
    fn new(
        fwd: &'a Forward,
        batches: &'a [Feeds],
        teacher: &Tensor,
        critical: Vec<bool>,
        beta: f64,
        abox: Option<&'a ActionBox>,
    ) -> Self {
        Scorer { fwd, batches, teacher: clipped(teacher, abox), critical, beta, abox }
    }

    fn stats(&self, out: &Tensor) -> ErrorStats {
        let y = clipped(out, self.abox);
        let n = self.critical.len();
        let per = y.len() / n.max(1);
        let (mut s_all, mut s_crit, mut n_crit) = (0.0, 0.0, 0usize);
        for i in 0..n {
            let e: f64 = (0..per).map(|j| ((y[i * per + j] - self.teacher[i * per + j]) as f64).powi(2)).sum::<f64>()
                / per.max(1) as f64;
            s_all += e;
            if self.critical[i] {
                s_crit += e;
                n_crit += 1;
            }
        }
        let w_crit = self.beta.max(1.0);
        let denom = (n - n_crit) as f64 + w_crit * n_crit as f64;
        ErrorStats {
            all: s_all / n.max(1) as f64,
            critical: if n_crit > 0 { s_crit / n_crit as f64 } else { f64::NAN },
            score: ((s_all - s_crit) + w_crit * s_crit) / denom.max(1.0),
        }
    }

    fn score(&self, g: &Graph) -> crate::Result<ErrorStats> {
        Ok(self.stats(&self.fwd.run_all(g, self.batches, "scoring")?))
    }
}

fn fmt_stats(s: &ErrorStats) -> String {
    format!("{:>10.3e} {:>10.3e} {:>10.3e}", s.all, s.critical, s.score)
}

/// The candidates table printed to stderr.
pub fn render_candidates(c: &[Candidate]) -> String {
    let mut s = format!("{:<18} {:>10} {:>10} {:>10}\n", "held-out", "all", "critical", "score");
    for x in c {
        s += &format!("{:<18} {}{}\n", x.name, fmt_stats(&x.heldout), if x.chosen { "  <- shipped" } else { "" });
    }
    s
}

/// Wall time per phase of a compile.
struct Phases {
    last: Instant,
    done: Vec<(String, f64)>,
}

impl Phases {
    fn mark(&mut self, name: &str) {
        let now = Instant::now();
        self.done.push((name.to_string(), (now - self.last).as_secs_f64()));
        self.last = now;
    }
}

pub fn compile(model: &Path, a: &CompileArgs) -> crate::Result<()> {
    let t0 = Instant::now();
    let mut phases = Phases { last: t0, done: vec![] };
    if !(a.val_frac > 0.0 && a.val_frac < 1.0) {
        return Err(format!("--val-frac must be in (0, 1) (got {})", a.val_frac).into());
    }
    if a.max_states == 0 || a.val_states == 0 {
        return Err("--states and --val-states must be > 0".into());
    }
    if a.gpus == 0 || (a.gpus > 1 && a.device != crate::gpu_train::Device::Cuda) {
        return Err(
            format!("--gpus {}: data-parallel fine-tuning needs --device cuda and at least one GPU", a.gpus).into()
        );
    }
    if a.gpus > a.train.batch {
        return Err(format!(
            "--gpus {} with --batch {}: every GPU needs at least one row of each batch",
            a.gpus, a.train.batch
        )
        .into());
    }
    let fp_in = crate::load_model(model)?;
    let fp_q = crate::quantize::prepare_float(&fp_in)?;
    // The float policy as quantize saw it (same canonical form, same value names).
    let mut fp = crate::widened(&fp_in)?;
    sqil_passes::cleanup_pipeline().run(&mut fp, &mut PassCtx::default())?;
    let demos = Demos::load_with(&a.demos, &a.obs_keys)?;
    // The action width: the demonstrations', else (states only) the float policy's output.
    let out_dims = match fp.value(fp.outputs[0]).ty.shape.last() {
        Some(sqil_ir::Dim::Known(k)) => Some(*k),
        _ => None,
    };
    let dims = match (&demos.actions, out_dims) {
        (Some(acts), Some(k)) if acts.ncols() != k => {
            return Err(format!(
                "{}: field `actions` has {} columns, the policy outputs {k} actions",
                a.demos.display(),
                acts.ncols()
            )
            .into())
        }
        (Some(acts), _) => acts.ncols(),
        (None, Some(k)) => k,
        (None, None) => {
            return Err(format!(
                "{}: no `actions`, and the policy's action width is not static: give the demonstrated actions",
                a.demos.display()
            )
            .into())
        }
    };
    let abox = match &a.action_box {
        BoxSource::None => None,
        BoxSource::Given(s) => Some(ActionBox::parse(s, dims).map_err(|e| format!("--action-box: {e}"))?),
        BoxSource::Metadata => demos.action_box(dims).map_err(|e| format!("{}: {e}", a.demos.display()))?,
    };
    // The inputs are valid: now the output folder, checked writable before any work.
    crate::ensure_writable_dir(&a.out)?;
    let (train_pool, val_pool, val_eps) = split_episodes(&demos, a.val_frac, a.split_seed);
    let steps: Vec<usize> = spread(train_pool.len(), a.max_states).into_iter().map(|i| train_pool[i]).collect();
    let vsteps: Vec<usize> = spread(val_pool.len(), a.val_states).into_iter().map(|i| val_pool[i]).collect();
    let feeds_of = |g: &Graph, s: &[usize], b: usize| {
        policy_feeds(g, &demos, s, b).map_err(|e| format!("{}: {e}", a.demos.display()))
    };
    let batches = feeds_of(&fp, &steps, 256)?;
    let vbatches = feeds_of(&fp, &vsteps, 256)?;
    let calib_steps: Vec<usize> = spread(steps.len(), 2048).into_iter().map(|i| steps[i]).collect();
    let calib = feeds_of(&fp_q, &calib_steps, 256)?;
    // Forward passes (teacher, SIS, scoring) run where fine-tuning does.
    let fwd = match a.device {
        crate::gpu_train::Device::Cuda => Forward::cuda()?,
        crate::gpu_train::Device::Cpu => Forward::cpu(),
    };
    let teacher = fwd.run_all(&fp, &batches, "the float policy")?;
    let vteacher = fwd.run_all(&fp, &vbatches, "the float policy")?;
    if let (None, Some(acts)) = (&abox, &demos.actions) {
        // A float policy whose actions leave the demonstrated range often was probably clipped
        // by its environment: say how to tell sqil.
        let (lo, hi) = acts.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| (l.min(v), h.max(v)));
        let tv = teacher.data.to_f32_vec();
        let out = tv.iter().filter(|&&v| v < lo || v > hi).count();
        if out * 100 > tv.len() {
            eprintln!(
                "note: {:.0}% of the float policy's actions lie outside the demonstrated range [{lo}, {hi}]; if the \
                 environment clips actions, give --action-box LOW,HIGH (or action_low/action_high in the demos' metadata)",
                100.0 * out as f64 / tv.len() as f64
            );
        }
    }
    let out_rank = teacher.rank();
    // Without demonstrated actions the float policy's own actions are the targets.
    let target = match &demos.actions {
        Some(acts) => targets(&demos, acts, &steps, out_rank, if out_rank == 3 { teacher.shape[1] } else { 1 })?,
        None => {
            eprintln!("note: {} has no `actions`: the float policy's own actions are the targets", a.demos.display());
            teacher.clone()
        }
    };
    // SIS of training and validation states together (one set of dataset means); the critical
    // threshold comes from the training states.
    phases.mark("load + teacher");
    eprintln!("SIS of {} + {} states...", steps.len(), vsteps.len());
    let sis_b = match (batches[0].values().any(|t| t.rank() == 4), a.device) {
        (true, crate::gpu_train::Device::Cpu) => 8,
        (true, crate::gpu_train::Device::Cuda) => 32,
        (false, _) => 64,
    };
    let all_steps: Vec<usize> = steps.iter().chain(&vsteps).copied().collect();
    let sis_batches = feeds_of(&fp, &all_steps, sis_b)?;
    let sis_key = match &a.cache {
        Some(_) => Some(crate::cache::sis_key(
            &fp,
            &sis_batches,
            &format!("{:?} on {} at batch {sis_b}", a.sis, fwd.device()),
        )?),
        None => None,
    };
    let cached =
        a.cache.as_deref().zip(sis_key.as_deref()).and_then(|(d, k)| crate::cache::load(d, k, all_steps.len()));
    let sis_cached = cached.is_some();
    let all_scores = match cached {
        Some(s) => {
            eprintln!(
                "SIS: the scores of these states from the cache ({})",
                a.cache.as_ref().expect("cache").display()
            );
            // The phase is done: progress watchers see it complete, as when it is computed.
            sqil_ir::progress::report("SIS", s.len() as u64, s.len() as u64);
            s
        }
        None => {
            let mut r = fwd.runner(&fp, "SIS")?;
            let s = sis_run(&fp, &sis_batches, &a.sis, &mut |f| r.run(f))?;
            if let (Some(d), Some(k)) = (&a.cache, &sis_key) {
                crate::cache::store(d, k, &s);
            }
            s
        }
    };
    phases.mark("SIS");
    let (scores, vscores) = all_scores.split_at(steps.len());
    let (top_alpha, thr) = qrd_alpha(scores, a.top, a.beta);
    let critical: Vec<bool> = scores.iter().map(|&s| s >= thr).collect();
    let vcritical: Vec<bool> = vscores.iter().map(|&s| s >= thr).collect();
    let mean_sis = scores.iter().sum::<f64>() / scores.len() as f64;
    let alpha: Vec<f32> = match a.recipe {
        FtRecipe::Sqil => top_alpha,
        FtRecipe::Qat => vec![0.0; scores.len()],
        FtRecipe::Distill => vec![1.0; scores.len()],
        FtRecipe::SisWeighted => scores.iter().map(|&s| ((s / mean_sis.max(1e-12)) as f32).min(10.0)).collect(),
    };
    let critical_vals = vcritical.iter().filter(|&&c| c).count();
    let val = Scorer::new(&fwd, &vbatches, &vteacher, vcritical, a.beta, abox.as_ref());
    let trs = Scorer::new(&fwd, &batches, &teacher, critical, a.beta, abox.as_ref());
    // PTQ candidates, calibrated on training states, scored on validation states.
    let recipes: Vec<Recipe> = match a.init {
        Some(r) => vec![r],
        None => vec![Recipe::Rtn, Recipe::Mse, Recipe::Awq, Recipe::Gptq],
    };
    let mut candidates: Vec<Candidate> = vec![];
    let mut best_ptq: Option<(Graph, QuantReport, ErrorStats)> = None;
    let n_recipes = recipes.len() as u64;
    // The float graph observed once for every recipe.
    let calibration =
        sqil_passes::quant::Calibration::new(&fp_q, &a.config, &calib).map_err(|e| format!("PTQ calibration: {e}"))?;
    for (ri, r) in recipes.into_iter().enumerate() {
        let (mut sim, rep) = calibration.quantize(r).map_err(|e| format!("PTQ {}: {e}", r.name()))?;
        PassManager::from_names(&["dce"]).and_then(|mut pm| pm.run(&mut sim, &mut PassCtx::default()))?;
        let s = val.score(&sim)?;
        eprintln!("PTQ {:<5} held-out action MSE {:.3e} (critical {:.3e})", r.name(), s.all, s.critical);
        sqil_ir::progress::report("PTQ candidates", ri as u64 + 1, n_recipes);
        candidates.push(Candidate { name: format!("ptq:{}", r.name()), heldout: s, chosen: false });
        if best_ptq.as_ref().is_none_or(|b| s.score < b.2.score) {
            best_ptq = Some((sim, rep, s));
        }
    }
    drop(calibration);
    let (sim, ptq, ptq_score) = best_ptq.ok_or("no PTQ recipe to try")?;
    let ptq_name = format!("ptq:{}", ptq.recipe);
    let before = fwd.run_all(&sim, &batches, "the PTQ candidate")?;
    phases.mark("PTQ");
    // Fine-tuning from the best PTQ candidate (unless only PTQ is asked for).
    let (tuned, shipped, decision, log) = if a.ship == Ship::Ptq {
        let d = format!("--ship ptq: the best PTQ candidate on the held-out states, {ptq_name}, without fine-tuning");
        (sim.clone(), ptq_name.clone(), d, TrainLog::default())
    } else {
        let mut inputs = vec![];
        for &i in &fp.inputs {
            let n = fp.node(i).outputs[0].name.clone();
            let t = concat_batches(batches.iter().map(|b| b[&n].clone()).collect())?;
            inputs.push((n, t));
        }
        let data = match &abox {
            Some(b) => {
                let (tl, th) = intervals(&target, b)?;
                let (fl, fh) = intervals(&teacher, b)?;
                Dataset { inputs, target: tl, teacher: fl, alpha, target_hi: Some(th), teacher_hi: Some(fh) }
            }
            None => Dataset { inputs, target, teacher: teacher.clone(), alpha, target_hi: None, teacher_hi: None },
        };
        let mut tg = train_graph_with(&sim, a.act_steps, abox.is_some())?;
        let proto: Vec<Param> = tg.params.clone();
        let with_values = |values: &[Tensor]| -> Graph {
            let ps: Vec<Param> =
                proto.iter().zip(values).map(|(p, v)| Param { value: v.clone(), ..p.clone() }).collect();
            with_params(&sim, &ps)
        };
        let score_fn = |values: &[Tensor]| -> sqil_ir::Result<f64> {
            val.score(&with_values(values)).map(|s| s.score).map_err(|e| sqil_ir::IrError::Invalid(e.to_string()))
        };
        let every = if a.val_every > 0 { a.val_every } else { (a.train.steps / 20).max(1) };
        let validation = Validation { every, patience: a.patience, score: &score_fn };
        let ck = a.out.join("checkpoint.json");
        let batch = a.train.batch.min(data.len());
        // On the GPU the forward passes use (and, with --gpus N, GPUs 1..N beside it).
        let mut engine: Option<Box<dyn GradEngine>> = match a.device {
            crate::gpu_train::Device::Cuda => {
                let first = fwd.gpu().expect("--device cuda opened the GPU").clone();
                let (e, bytes, mode): (Box<dyn GradEngine>, usize, String) = if a.gpus > 1 {
                    let dp = crate::gpu_train::DataParallel::new(Some(first), a.gpus, &tg, batch)?;
                    let (bytes, mode) = (dp.bytes(), dp.mode());
                    (Box::new(dp), bytes, mode)
                } else {
                    let g = crate::gpu_train::GpuEngine::on(first, &tg, batch)?;
                    let (bytes, mode) = (g.bytes(), g.mode());
                    (Box::new(g), bytes, mode)
                };
                eprintln!(
                    "fine-tuning on {} ({:.1} MB of buffers and cuBLAS workspace, {mode})",
                    e.device(),
                    bytes as f64 / 1e6
                );
                Some(e)
            }
            crate::gpu_train::Device::Cpu => None,
        };
        let engine = engine.as_deref_mut().map(|e| e as &mut dyn GradEngine);
        let (log, best) = train_with(&mut tg, &data, &a.train, Some(&ck), a.resume, Some(&validation), engine)?;
        let best = best.ok_or("fine-tuning gave no validated parameters")?;
        let recipe = serde_json::to_value(a.recipe).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default();
        let ft_name = format!("{recipe}@{}", best.step);
        let tuned_best = with_values(&best.params);
        let ft_score = val.score(&tuned_best)?;
        candidates.push(Candidate { name: ft_name.clone(), heldout: ft_score, chosen: false });
        let last_step = log.stopped_at.unwrap_or(a.train.steps);
        if best.step != last_step {
            let last = val.score(&with_params(&sim, &tg.params))?;
            candidates.push(Candidate { name: format!("{recipe}@{last_step} (last)"), heldout: last, chosen: false });
        }
        if a.ship == Ship::Finetuned {
            let d = format!(
                "--ship finetuned: the best fine-tuned checkpoint on the held-out states, {ft_name} (score {:.3e}; best PTQ {ptq_name} {:.3e})",
                ft_score.score, ptq_score.score
            );
            (tuned_best, ft_name, d, log)
        } else if best.step > 0 && ft_score.score < ptq_score.score {
            let d = format!(
                "fine-tuning ({ft_name}) beat the best PTQ candidate ({ptq_name}) on the held-out states: score {:.3e} vs {:.3e}",
                ft_score.score, ptq_score.score
            );
            (tuned_best, ft_name, d, log)
        } else {
            let d = format!(
                "fine-tuning did not beat the best PTQ candidate on the held-out states (score {:.3e} vs {:.3e}): shipping {ptq_name}",
                ft_score.score, ptq_score.score
            );
            (sim.clone(), ptq_name.clone(), d, log)
        }
    };
    phases.mark("fine-tuning");
    for c in &mut candidates {
        c.chosen = c.name == shipped;
    }
    eprint!("{}", render_candidates(&candidates));
    eprintln!("{decision}");
    let heldout_after = val.score(&tuned)?;
    let after = fwd.run_all(&tuned, &batches, "the shipped model")?;
    // Outputs: the simulation IR, QDQ ONNX, the fused IR.
    let mut lowered = tuned.clone();
    PassManager::from_names(&["lower-quant", "dce"])
        .and_then(|mut pm| pm.run(&mut lowered, &mut PassCtx::default()))?;
    // A half-precision model's QDQ export keeps its input and output types (a drop-in).
    sqil_passes::widen_half::restore_io_types(&mut lowered, &fp_in);
    sqil_codegen::onnx::save(&lowered, &a.out.join("model.onnx"))?;
    write_atomic(&a.out.join("model.sqil"), print_graph(&tuned, &PrintOptions::default())?.as_bytes())?;
    // The CPU artifact (the fused graph's plan + packed int4 weights), checked against the
    // simulation on the validation states; the fused graph it was planned from.
    let low = crate::quantize::write_artifact(&tuned, model, &a.out.join("policy.bin"))?;
    write_atomic(&a.out.join("model.fused.sqil"), print_graph(&low.graph, &PrintOptions::default())?.as_bytes())?;
    let plan = low.plan;
    let cpu_plan = plan.describe();
    let fused_kernels = plan.kernels();
    let (cpu_rel_diff, cpu_mismatch) = check_plan(&plan, &tuned, &vbatches, &vsteps, a.plan_tol)?;
    phases.mark("artifacts + check");
    let hist = {
        let mx = scores.iter().cloned().fold(0.0, f64::max).max(1e-12);
        let mut h = vec![0usize; 20];
        for &s in scores {
            h[((s / mx * 20.0) as usize).min(19)] += 1;
        }
        h.into_iter().enumerate().map(|(i, c)| (mx * (i + 1) as f64 / 20.0, c)).collect()
    };
    let report = Report {
        model: model.display().to_string(),
        recipe: a.recipe,
        init: ptq.recipe.clone(),
        label: a.config.label(),
        shipped,
        decision,
        candidates,
        split: Split {
            episodes: demos.episodes().len(),
            validation_episodes: val_eps,
            training_states: steps.len(),
            validation_states: vsteps.len(),
            critical_validation_states: critical_vals,
        },
        action_box: abox.clone(),
        states: steps.len(),
        sis_threshold: thr,
        sis_from_cache: sis_cached,
        sis_histogram: hist,
        top: a.top,
        beta: a.beta,
        act_steps: a.act_steps,
        reproducible_with: match a.device {
            crate::gpu_train::Device::Cpu => format!(
                "the same model, demonstrations, flags, --seed {} and --threads {} (threads split each batch's gradient sums)",
                a.train.seed, a.train.threads
            ),
            crate::gpu_train::Device::Cuda if a.gpus > 1 => format!(
                "the same model, demonstrations, flags, --seed {}, --device cuda and --gpus {} on the same kind of GPUs (cuBLAS's and NCCL's summation orders depend on the GPUs and their count)",
                a.train.seed, a.gpus
            ),
            crate::gpu_train::Device::Cuda => format!(
                "the same model, demonstrations, flags, --seed {} and --device cuda on the same kind of GPU (cuBLAS picks its summation order per GPU)",
                a.train.seed
            ),
        },
        device: a.device,
        gpus: if a.device == crate::gpu_train::Device::Cuda { a.gpus } else { 0 },
        train: a.train.clone(),
        log,
        heldout_before: ptq_score,
        heldout_after,
        action_mse_before: trs.stats(&before),
        action_mse_after: trs.stats(&after),
        ptq,
        seconds: t0.elapsed().as_secs_f64(),
        phases: phases.done,
        fused_kernels,
        cpu_plan,
        cpu_rel_diff,
        cpu_mismatch: cpu_mismatch.clone(),
    };
    eprintln!(
        "held-out action MSE vs float: all {:.3e} -> {:.3e}, critical {:.3e} -> {:.3e} ({:.0} s)",
        report.heldout_before.all,
        report.heldout_after.all,
        report.heldout_before.critical,
        report.heldout_after.critical,
        report.seconds
    );
    write_atomic(&a.out.join("report.json"), serde_json::to_string_pretty(&report)?.as_bytes())?;
    // Every output is written: a mismatch is reported, not a reason to lose the run.
    if let Some(m) = cpu_mismatch {
        return Err(format!(
            "{}: the CPU plan differs from the simulation by {cpu_rel_diff:.2e} (budget {:.0e}) {m}: a back-end bug; \
             every output and the report were written",
            a.out.display(),
            a.plan_tol
        )
        .into());
    }
    Ok(())
}

/// The CPU plan against the simulation on `batches` (demo steps `steps`): the largest difference
/// relative to the largest |action|, and where it is past `PLAN_TOL`: the state and the first
/// layer whose output differs.
fn check_plan(
    plan: &sqil_runtime::Plan,
    sim: &Graph,
    batches: &[Feeds],
    steps: &[usize],
    tol: f32,
) -> crate::Result<(f32, Option<String>)> {
    let it = Interpreter::new(sim)?;
    let names: Vec<String> = sim.inputs.iter().map(|&i| sim.node(i).outputs[0].name.clone()).collect();
    let (mut worst, mut at) = (0f32, None);
    let mut row0 = 0;
    // Batches on every core, each plan run on one thread (the plan's bits do not depend on it).
    let pairs = sqil_ir::par::map(batches.len(), |i| -> crate::Result<(Tensor, Tensor)> {
        let b = &batches[i];
        let feeds: Vec<Tensor> = names.iter().map(|n| b[n].clone()).collect();
        Ok((plan.run(&feeds, 1)?.remove(0), it.run(b)?.remove(0)))
    });
    for (b, pair) in batches.iter().zip(pairs) {
        let (got, want) = pair?;
        let (g, w) = (got.data.to_f32_vec(), want.data.to_f32_vec());
        let rows = got.shape[0];
        let per = g.len() / rows.max(1);
        let scale = w.iter().fold(1e-12f32, |m, v| m.max(v.abs()));
        for (i, (x, y)) in g.iter().zip(&w).enumerate() {
            let d = (x - y).abs() / scale;
            if d > worst || at.is_none() {
                worst = worst.max(d);
                at = Some((row0 + i / per.max(1), b, i / per.max(1)));
            }
        }
        row0 += rows;
    }
    if worst <= tol {
        return Ok((worst, None));
    }
    let Some((row, b, local)) = at else { return Ok((worst, None)) }; // no states
                                                                      // The state alone through both, every layer output compared.
    let one: Feeds = b
        .iter()
        .map(|(n, t)| {
            let per = t.len() / t.shape[0];
            let mut shape = t.shape.clone();
            shape[0] = 1;
            let v = t.data.to_f32_vec()[local * per..(local + 1) * per].to_vec();
            (n.clone(), Tensor::from_f32(shape, v).expect("one row"))
        })
        .collect();
    let feeds: Vec<Tensor> = names.iter().map(|n| one[n].clone()).collect();
    let trace = plan.trace(&feeds, 1)?;
    // Every int4 layer's output in the simulation, from one run.
    let layers: Vec<(&str, usize, bool, sqil_ir::ValueRef)> = plan
        .steps
        .iter()
        .filter_map(|s| match s {
            // The layer's output in the simulation: the value of the node reading its weight.
            sqil_lower::Step::Q4Linear { layer, y, relu, .. } => match sim.find_value(layer).map(|w| sim.uses_of(w)) {
                Some(u) if u.len() == 1 => {
                    Some((layer.as_str(), *y, *relu, sqil_ir::ValueRef { node: u[0].0, slot: 0 }))
                }
                _ => None,
            },
            _ => None,
        })
        .collect();
    let keep: Vec<sqil_ir::ValueRef> = layers.iter().map(|l| l.3).collect();
    let (_, kept) = it.run_keep(&one, &keep)?;
    let (mut first, mut layer) = (None, None);
    for (&(lname, y, relu, _), want) in layers.iter().zip(&kept) {
        let Some(Some(got)) = trace.get(y) else { continue };
        // The step's output has the fused ReLU applied; the layer's value does not.
        let g = got.data.to_f32_vec();
        let w: Vec<f32> = want.data.to_f32_vec().into_iter().map(|v| if relu && v < 0.0 { 0.0 } else { v }).collect();
        let scale = w.iter().fold(1e-12f32, |m, v| m.max(v.abs()));
        let d = g.iter().zip(&w).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max) / scale;
        if d > 0.0 && first.is_none() {
            first = Some(format!("layer `{lname}` (relative {d:.2e})"));
        }
        if d > tol {
            layer = Some(format!("layer `{lname}` (relative {d:.2e})"));
            break;
        }
    }
    let step = steps.get(row).copied().unwrap_or(row);
    Ok((
        worst,
        Some(format!(
            "at demonstration step {step}: the int4 layers' outputs first differ at {}, beyond the budget at {}",
            first.unwrap_or_else(|| "none of them".into()),
            layer.unwrap_or_else(|| "none of them (a later step)".into())
        )),
    ))
}

/// The one-screen summary of a finished compile in `out` (its report.json and policy.bin): what
/// was compiled and shipped, how faithful it is on the held-out states, the size float vs packed,
/// the CPU latency of policy.bin at batch 1 on one thread (measured now), and where the outputs are.
pub fn summary(model: &Path, out: &Path) -> crate::Result<String> {
    let rp = out.join("report.json");
    let text = std::fs::read_to_string(&rp).map_err(|e| format!("{}: {e}", rp.display()))?;
    let r: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", rp.display()))?;
    let f = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
    let s = |v: &serde_json::Value| v.as_str().unwrap_or("?").to_string();
    let g = crate::load_model(model)?;
    let float_bytes: usize = g
        .topo_order()?
        .iter()
        .filter_map(|&n| match &g.node(n).op {
            sqil_ir::Op::Const(t) if t.dtype().is_float() => Some(t.packed_bytes()),
            _ => None,
        })
        .sum();
    let bin = out.join("policy.bin");
    let bytes = std::fs::read(&bin).map_err(|e| format!("{}: {e}", bin.display()))?;
    let packed = bytes.len();
    let sqil_runtime::artifact::Decoded { ir, packed: layers, consts } =
        sqil_runtime::artifact::decode(&bytes, &bin.display().to_string())?;
    let const_bytes: usize = consts.values().map(|v| v.len() * 4).sum();
    let q4: usize = layers.values().map(|l| l.n * l.k).sum();
    let q4_bytes: usize = layers.values().map(|l| l.bytes()).sum();
    let mut policy = sqil_runtime::Policy::load(&bin)?;
    policy.threads = 1;
    let obs = vec![0f32; policy.input_sizes().iter().sum()];
    let mut lat = String::from("n/a (the policy takes several inputs: sqil bench OUT/policy.bin)");
    if policy.input_sizes().len() == 1 {
        for _ in 0..50 {
            policy.act(&obs, 1)?;
        }
        let t0 = std::time::Instant::now();
        let mut n = 0u32;
        while n < 200 || t0.elapsed().as_secs_f64() < 0.2 {
            policy.act(&obs, 1)?;
            n += 1;
        }
        lat = format!(
            "{:.1} us per action (policy.bin, batch 1, one thread, {:?} kernels)",
            t0.elapsed().as_secs_f64() * 1e6 / n as f64,
            sqil_kernels_cpu::isa()
        );
    }
    let (hb, ha) = (&r["heldout_before"], &r["heldout_after"]);
    let ptq = s(&r["init"]);
    let mismatch = match r["cpu_mismatch"].as_str() {
        Some(m) => format!("differs from the simulation: {m}"),
        None => format!("matches the simulation on the held-out states (max rel diff {:.1e})", f(&r["cpu_rel_diff"])),
    };
    let phases: Vec<String> = r["phases"]
        .as_array()
        .map(|v| {
            v.iter().filter_map(|p| Some(format!("{} {:.1} s", p.get(0)?.as_str()?, p.get(1)?.as_f64()?))).collect()
        })
        .unwrap_or_default();
    let time = format!("{:.1} s on {}: {}", f(&r["seconds"]), s(&r["device"]), phases.join(", "));
    let o = out.display();
    Ok(format!(
        "compiled   {} -> {o}\n\
         recipe     {} at {}; shipped {}\n\
         why        {}\n\
         fidelity   held-out action MSE vs the float policy: {:.3e} (best PTQ, {ptq}) -> {:.3e}; critical states {:.3e} -> {:.3e}\n\
         size       float weights {:.1} KB -> policy.bin {:.1} KB ({}): {} int4 layers, {q4} weights in {:.1} KB; float constants {:.1} KB; the graph as IR text, {:.1} KB\n\
         latency    {lat}\n\
         time       {time}\n\
         arithmetic policy.bin {mismatch}\n\
         outputs    {o}/policy.bin (sqil run / sqil bench / sqil build), {o}/model.onnx (QDQ ONNX), {o}/model.sqil, {o}/report.json\n",
        model.display(),
        s(&r["recipe"]),
        s(&r["label"]),
        s(&r["shipped"]),
        s(&r["decision"]),
        f(&hb["all"]),
        f(&ha["all"]),
        f(&hb["critical"]),
        f(&ha["critical"]),
        float_bytes as f64 / 1024.0,
        packed as f64 / 1024.0,
        if float_bytes >= packed {
            format!("{:.1}x smaller", float_bytes as f64 / packed.max(1) as f64)
        } else {
            format!("{:.1}x larger", packed as f64 / float_bytes.max(1) as f64)
        },
        layers.len(),
        q4_bytes as f64 / 1024.0,
        const_bytes as f64 / 1024.0,
        ir.len() as f64 / 1024.0,
    ))
}
