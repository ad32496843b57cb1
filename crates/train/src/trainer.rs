//! The fine-tuning loop: seeded shuffled mini-batches, each split over threads (one
//! interpreter run of the trainable graph per slice, gradients averaged by slice size), AdamW,
//! progress with loss and ETA on stderr, and atomic JSON checkpoints every N steps that
//! `resume` continues from exactly. With a [`Validation`], the parameters are scored on held-out
//! states every `every` steps (and before the first): the best-scoring ones are kept (in the
//! checkpoint too) and returned, and training stops early after `patience` evaluations without
//! improvement.

use crate::model::{Param, TrainGraph};
use crate::optim::AdamW;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use sqil_ir::interp::Interpreter;
use sqil_ir::testing::Rng;
use sqil_ir::{fnv1a, FNV1A_START};
use sqil_ir::{IrError, Result, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

fn one() -> f64 {
    1.0
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainConfig {
    pub steps: usize,
    pub batch: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub warmup: usize,
    pub clip: f64,
    pub seed: u64,
    pub threads: usize,
    pub log_every: usize,
    pub checkpoint_every: usize,
    /// The learning rate of LSQ step sizes relative to `lr`.
    #[serde(default = "one")]
    pub step_lr_scale: f64,
    /// Stop (after a checkpoint) once this many steps are done; a later `resume` continues.
    #[serde(default)]
    pub stop_after: Option<usize>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            steps: 1000,
            batch: 256,
            lr: 1e-4,
            weight_decay: 0.0,
            warmup: 50,
            clip: 1.0,
            seed: 0,
            threads: 2,
            log_every: 100,
            checkpoint_every: 200,
            step_lr_scale: 1.0,
            stop_after: None,
        }
    }
}

/// Training data: the policy inputs of every state (batch axis first), the demonstrated
/// actions, the float policy's actions (the teacher, computed once) and the QRD weights.
/// With an action box, `target` and `teacher` are the low ends of intervals whose high ends
/// are `target_hi` and `teacher_hi` (see `model::train_graph_with`).
pub struct Dataset {
    pub inputs: Vec<(String, Tensor)>,
    pub target: Tensor,
    pub teacher: Tensor,
    pub alpha: Vec<f32>,
    pub target_hi: Option<Tensor>,
    pub teacher_hi: Option<Tensor>,
}

/// Scoring on held-out states during training (lower is better).
pub struct Validation<'a> {
    /// Evaluate every this many steps (and before the first step, and after the last).
    pub every: usize,
    /// Stop after this many evaluations in a row without a better score (0: never stop early).
    pub patience: usize,
    /// The score of a set of parameter values (in `TrainGraph::params` order).
    pub score: &'a (dyn Fn(&[Tensor]) -> Result<f64> + Sync),
}

/// The best-scoring parameters seen by a [`Validation`].
#[derive(Clone, Debug)]
pub struct Best {
    pub step: usize,
    pub score: f64,
    pub params: Vec<Tensor>,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.target.shape[0]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Rows `idx` of a tensor (batch axis 0).
pub fn take_rows(t: &Tensor, idx: &[usize]) -> Tensor {
    let per: usize = t.shape[1..].iter().product();
    let v = t.data.f32_cow();
    let mut out = Vec::with_capacity(idx.len() * per);
    for &i in idx {
        out.extend_from_slice(&v[i * per..(i + 1) * per]);
    }
    let mut shape = t.shape.clone();
    shape[0] = idx.len();
    Tensor::from_f32(shape, out).expect("sized")
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TrainLog {
    /// (step, mean loss over the logging window, learning rate)
    pub loss: Vec<(usize, f64, f64)>,
    pub seconds: f64,
    pub samples_per_s: f64,
    /// (step, validation score), when validated.
    #[serde(default)]
    pub val: Vec<(usize, f64)>,
    /// The step of the best validation score.
    #[serde(default)]
    pub best_step: Option<usize>,
    /// Where training stopped early (no better validation score for `patience` evaluations).
    #[serde(default)]
    pub stopped_at: Option<usize>,
}

type SavedParams = Vec<(String, Vec<usize>, Vec<f32>)>;

fn save_params<'a>(params: impl Iterator<Item = (&'a str, &'a Tensor)>) -> SavedParams {
    params.map(|(n, t)| (n.to_string(), t.shape.clone(), t.data.to_f32_vec())).collect()
}

#[derive(Serialize, Deserialize)]
struct Checkpoint {
    step: usize,
    params: Vec<(String, Vec<usize>, Vec<f32>)>,
    opt: AdamW,
    log: TrainLog,
    rng_draws: u64,
    perm: Vec<usize>,
    pos: usize,
    /// The best validated parameters so far: (step, score, values).
    #[serde(default)]
    best: Option<(usize, f64, SavedParams)>,
    /// Evaluations since the best one.
    #[serde(default)]
    since_best: usize,
    /// Training stopped early here; a resume returns at once.
    #[serde(default)]
    stopped: bool,
    /// The settings that shape the run; `--resume` refuses a checkpoint whose settings differ.
    /// (Absent in checkpoints written before they were recorded: those resume unchecked.)
    #[serde(default)]
    settings: Option<RunSettings>,
}

/// What a checkpoint must agree with to be continued: the training graph (its ops, quantizers and
/// parameter shapes: a fingerprint of its text with large constants elided), the data (a
/// fingerprint of every array), and the schedule (steps, batch, rates, clipping, seed, threads:
/// the threads split each batch's gradient sums, so they change the arithmetic).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct RunSettings {
    graph: String,
    data: String,
    steps: usize,
    batch: usize,
    lr: f64,
    step_lr_scale: f64,
    weight_decay: f64,
    warmup: usize,
    clip: f64,
    seed: u64,
    threads: usize,
}

impl RunSettings {
    fn of(tg: &TrainGraph, data: &Dataset, cfg: &TrainConfig) -> RunSettings {
        let text = sqil_ir::print_graph(&tg.graph, &sqil_ir::PrintOptions { elide_over: Some(16), splat: false })
            .unwrap_or_default();
        let mut h = fnv1a(FNV1A_START, text.as_bytes());
        for p in &tg.params {
            h = fnv1a(h, p.name.as_bytes());
            h = fnv1a(h, format!("{:?}", p.value.shape).as_bytes());
        }
        let mut dh = FNV1A_START;
        let mut arrays: Vec<&Tensor> = data.inputs.iter().map(|(_, t)| t).collect();
        arrays.extend([&data.target, &data.teacher]);
        arrays.extend(data.target_hi.iter().chain(data.teacher_hi.iter()));
        for t in arrays {
            dh = fnv1a(dh, format!("{:?}", t.shape).as_bytes());
            for v in t.data.to_f32_vec() {
                dh = fnv1a(dh, &v.to_bits().to_le_bytes());
            }
        }
        for a in &data.alpha {
            dh = fnv1a(dh, &a.to_bits().to_le_bytes());
        }
        RunSettings {
            graph: format!("{h:016x}"),
            data: format!("{dh:016x}"),
            steps: cfg.steps,
            batch: cfg.batch,
            lr: cfg.lr,
            step_lr_scale: cfg.step_lr_scale,
            weight_decay: cfg.weight_decay,
            warmup: cfg.warmup,
            clip: cfg.clip,
            seed: cfg.seed,
            threads: cfg.threads,
        }
    }

    /// The first setting that differs from `now`, named as the user knows it.
    fn mismatch(&self, now: &RunSettings) -> Option<String> {
        let d = |name: &str, a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| {
            Some(format!("{name}: the checkpoint was written with {a:?}, this run has {b:?}"))
        };
        if self.graph != now.graph {
            return Some(
                "the quantized model differs (another model, --wbits/--abits/--group, recipe or config)".into(),
            );
        }
        if self.data != now.data {
            return Some("the training data differ (another --demos, --states, --seed split or SIS setting)".into());
        }
        match () {
            _ if self.steps != now.steps => d("--steps", &self.steps, &now.steps),
            _ if self.batch != now.batch => d("--batch", &self.batch, &now.batch),
            _ if self.lr != now.lr => d("--lr", &self.lr, &now.lr),
            _ if self.step_lr_scale != now.step_lr_scale => d("--step-lr", &self.step_lr_scale, &now.step_lr_scale),
            _ if self.seed != now.seed => d("--seed", &self.seed, &now.seed),
            _ if self.threads != now.threads => d("--threads", &self.threads, &now.threads),
            _ if self.weight_decay != now.weight_decay || self.warmup != now.warmup || self.clip != now.clip => d(
                "the schedule (weight decay, warm-up, clipping)",
                &(self.weight_decay, self.warmup, self.clip),
                &(now.weight_decay, now.warmup, now.clip),
            ),
            _ => None,
        }
    }
}

/// One slice's loss, gradients (one per parameter) and row count.
type SliceResult = Result<(f64, Vec<Vec<f32>>, usize)>;

/// Loss and gradients on rows `idx`, with the rows split over threads.
fn step_grads(
    it: &Interpreter,
    tg: &TrainGraph,
    data: &Dataset,
    idx: &[usize],
    threads: usize,
) -> Result<(f64, Vec<Vec<f32>>)> {
    let chunks: Vec<&[usize]> = idx.chunks(idx.len().div_ceil(threads.max(1))).collect();
    let results: Vec<SliceResult> = std::thread::scope(|s| {
        let handles: Vec<_> = chunks
            .iter()
            .map(|c| {
                s.spawn(move || {
                    let feeds = batch_feeds(tg, data, c)?;
                    let outs = it.run(&feeds)?;
                    let loss = outs[0].data.to_f64_vec()[0];
                    let grads = outs[1..].iter().map(|t| t.data.to_f32_vec()).collect();
                    Ok((loss, grads, c.len()))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("training thread")).collect()
    });
    let mut loss = 0.0;
    let mut grads: Vec<Vec<f32>> = tg.params.iter().map(|p| vec![0f32; p.value.len()]).collect();
    for r in results {
        let (l, g, n) = r?;
        let w = n as f64 / idx.len() as f64;
        loss += l * w;
        for (acc, gi) in grads.iter_mut().zip(g) {
            for (a, b) in acc.iter_mut().zip(gi) {
                *a += b * w as f32;
            }
        }
    }
    Ok((loss, grads))
}

/// Loads parameter values saved in a checkpoint into `params`, checking names and shapes.
fn load_params(params: &mut [Param], saved: SavedParams, path: &std::path::Path) -> Result<()> {
    if saved.len() != params.len() {
        return Err(IrError::Invalid(format!(
            "{}: checkpoint has {} parameters, the model {}",
            path.display(),
            saved.len(),
            params.len()
        )));
    }
    for (p, (name, shape, v)) in params.iter_mut().zip(saved) {
        if p.name != name || p.value.shape != shape {
            return Err(IrError::Invalid(format!(
                "{}: checkpoint parameter `{name}` does not match `{}`",
                path.display(),
                p.name
            )));
        }
        p.value = Tensor::from_f32(shape, v)?;
    }
    Ok(())
}

/// What computes a step's loss and gradients: the CPU interpreter (the default: each batch split
/// over `TrainConfig::threads`) or another device (`sqil_driver` runs the same training graph on
/// the GPU). The optimizer, schedule, checkpoints and validation stay in [`train_with`].
pub trait GradEngine {
    /// The mean loss over rows `idx` of `data` and one gradient per parameter of `tg` (in
    /// `tg.params` order, at their current values).
    fn grads(&mut self, tg: &TrainGraph, data: &Dataset, idx: &[usize]) -> Result<(f64, Vec<Vec<f32>>)>;
    /// Where it runs, for logs and reports (`cpu`, `cuda:<GPU name>`).
    fn device(&self) -> String;
    /// The whole step where the engine keeps the parameters (the GPU: forward, backward and
    /// `opt`'s update on the device, `opt.step` advanced here): the batch's mean loss, or None
    /// where the engine only computes gradients and the caller updates. After such steps
    /// `tg.params` and `opt`'s moments are stale until [`GradEngine::read_back`].
    fn step(&mut self, _tg: &TrainGraph, _data: &Dataset, _idx: &[usize], _opt: &mut AdamW) -> Result<Option<f64>> {
        Ok(None)
    }
    /// Brings parameters and optimizer moments updated by [`GradEngine::step`] back into `tg`
    /// (`tg.params`) and `opt` (before validation, checkpoints and the end of training).
    fn read_back(&mut self, _params: &mut [Param], _opt: &mut AdamW) -> Result<()> {
        Ok(())
    }
}

/// The feeds of the training graph for rows `idx`: the policy inputs, targets, teachers (and
/// their high ends), QRD weights, and the parameters' current values.
pub fn batch_feeds(tg: &TrainGraph, data: &Dataset, idx: &[usize]) -> Result<HashMap<String, Tensor>> {
    let mut feeds: HashMap<String, Tensor> = HashMap::new();
    for (n, t) in &data.inputs {
        feeds.insert(n.clone(), take_rows(t, idx));
    }
    feeds.insert("train.target".into(), take_rows(&data.target, idx));
    feeds.insert("train.teacher".into(), take_rows(&data.teacher, idx));
    if let Some(t) = &data.target_hi {
        feeds.insert("train.target_hi".into(), take_rows(t, idx));
    }
    if let Some(t) = &data.teacher_hi {
        feeds.insert("train.teacher_hi".into(), take_rows(t, idx));
    }
    let mut ashape = vec![idx.len()];
    ashape.extend(std::iter::repeat_n(1, data.target.rank() - 1));
    feeds.insert("train.alpha".into(), Tensor::from_f32(ashape, idx.iter().map(|&i| data.alpha[i]).collect())?);
    for p in &tg.params {
        feeds.insert(p.name.clone(), p.value.clone());
    }
    Ok(feeds)
}

/// Trains `tg.params` in place. With `checkpoint`, writes it every `checkpoint_every` steps and
/// at the end; with `resume`, continues from it. With `val`, also returns the best-scoring
/// parameters (see [`Validation`]); `tg.params` end as the last step's either way.
pub fn train(
    tg: &mut TrainGraph,
    data: &Dataset,
    cfg: &TrainConfig,
    checkpoint: Option<&PathBuf>,
    resume: bool,
    val: Option<&Validation>,
) -> Result<(TrainLog, Option<Best>)> {
    train_with(tg, data, cfg, checkpoint, resume, val, None)
}

/// [`train`] with the step's loss and gradients from `engine` (None: the CPU interpreter).
pub fn train_with(
    tg: &mut TrainGraph,
    data: &Dataset,
    cfg: &TrainConfig,
    checkpoint: Option<&PathBuf>,
    resume: bool,
    val: Option<&Validation>,
    mut engine: Option<&mut dyn GradEngine>,
) -> Result<(TrainLog, Option<Best>)> {
    let n = data.len();
    if n == 0 {
        return Err(IrError::Invalid("no training states".into()));
    }
    if cfg.batch == 0 || cfg.steps == 0 {
        return Err(IrError::Invalid(format!(
            "training needs steps > 0 and batch > 0 (got {} and {})",
            cfg.steps, cfg.batch
        )));
    }
    let mut opt = AdamW::new(&tg.params, cfg.lr, cfg.weight_decay, cfg.warmup, cfg.steps, cfg.clip);
    opt.step_lr_scale = cfg.step_lr_scale;
    let mut log = TrainLog::default();
    let mut start = 0;
    let mut rng = Rng::new(cfg.seed);
    let mut draws = 0u64;
    let mut perm: Vec<usize> = (0..n).collect();
    let mut pos = n; // forces a shuffle at the first step
    let mut best: Option<Best> = None;
    let mut since_best = 0usize;
    let names: Vec<String> = tg.params.iter().map(|p| p.name.clone()).collect();
    let settings = RunSettings::of(tg, data, cfg);
    if let (true, Some(path)) = (resume, checkpoint) {
        if path.exists() {
            let text =
                std::fs::read_to_string(path).map_err(|e| IrError::Invalid(format!("{}: {e}", path.display())))?;
            let ck: Checkpoint = serde_json::from_str(&text)
                .map_err(|e| IrError::Invalid(format!("{}: bad checkpoint: {e}", path.display())))?;
            if let Some(why) = ck.settings.as_ref().and_then(|s| s.mismatch(&settings)) {
                return Err(IrError::Invalid(format!(
                    "{}: cannot resume: {why}; run without --resume (or with the same settings)",
                    path.display()
                )));
            }
            load_params(&mut tg.params, ck.params, path)?;
            if let Some((step, score, saved)) = ck.best {
                let mut tmp = tg.params.clone();
                load_params(&mut tmp, saved, path)?;
                best = Some(Best { step, score, params: tmp.into_iter().map(|p| p.value).collect() });
            }
            since_best = ck.since_best;
            opt = ck.opt;
            log = ck.log;
            start = ck.step;
            for _ in 0..ck.rng_draws {
                rng.next_u64();
            }
            draws = ck.rng_draws;
            if ck.perm.len() == n {
                perm = ck.perm;
                pos = ck.pos;
            }
            eprintln!("resumed from {} at step {start}", path.display());
            if ck.stopped {
                return Ok((log, best));
            }
        }
    }
    let it = Interpreter::new(&tg.graph)?;
    #[allow(clippy::too_many_arguments)]
    let save = |tg: &TrainGraph,
                opt: &AdamW,
                log: &TrainLog,
                step: usize,
                draws: u64,
                perm: &[usize],
                pos: usize,
                best: &Option<Best>,
                since_best: usize,
                stopped: bool|
     -> Result<()> {
        if let Some(path) = checkpoint {
            let ck = Checkpoint {
                step,
                params: save_params(tg.params.iter().map(|p: &Param| (p.name.as_str(), &p.value))),
                opt: opt.clone(),
                log: log.clone(),
                rng_draws: draws,
                perm: perm.to_vec(),
                pos,
                best: best
                    .as_ref()
                    .map(|b| (b.step, b.score, save_params(names.iter().map(|s| s.as_str()).zip(&b.params)))),
                since_best,
                stopped,
                settings: Some(settings.clone()),
            };
            sqil_ir::write_atomic(
                path,
                serde_json::to_string(&ck).map_err(|e| IrError::Internal(e.to_string()))?.as_bytes(),
            )?;
        }
        Ok(())
    };
    // Scores the current parameters; returns whether training should stop (patience spent).
    let validate = |tg: &TrainGraph,
                    step: usize,
                    log: &mut TrainLog,
                    best: &mut Option<Best>,
                    since: &mut usize|
     -> Result<bool> {
        let Some(v) = val else { return Ok(false) };
        let values: Vec<Tensor> = tg.params.iter().map(|p| p.value.clone()).collect();
        let score = (v.score)(&values)?;
        log.val.push((step, score));
        if best.as_ref().is_none_or(|b| score < b.score) {
            *best = Some(Best { step, score, params: values });
            log.best_step = Some(step);
            *since = 0;
        } else {
            *since += 1;
        }
        Ok(v.patience > 0 && *since >= v.patience)
    };
    let every = val.map_or(0, |v| v.every.max(1));
    if val.is_some() && start == 0 && log.val.is_empty() {
        validate(tg, 0, &mut log, &mut best, &mut since_best)?;
    }
    let t0 = Instant::now();
    let mut window = (0.0, 0usize);
    // A live bar on a terminal; elsewhere (logs, CI) one line every `log_every` steps.
    let bar = ProgressBar::new(cfg.steps as u64).with_position(start as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  {per_sec}  ETA {eta}")
            .expect("valid progress template"),
    );
    for step in start..cfg.steps {
        let mut idx = Vec::with_capacity(cfg.batch);
        while idx.len() < cfg.batch.min(n) {
            if pos >= n {
                for i in (1..n).rev() {
                    let j = rng.below(i + 1);
                    draws += 1;
                    perm.swap(i, j);
                }
                pos = 0;
            }
            idx.push(perm[pos]);
            pos += 1;
        }
        let on_device = match engine.as_deref_mut() {
            Some(e) => e.step(tg, data, &idx, &mut opt)?,
            None => None,
        };
        let loss = match on_device {
            Some(loss) => loss,
            None => {
                let (loss, grads) = match engine.as_deref_mut() {
                    Some(e) => e.grads(tg, data, &idx)?,
                    None => step_grads(&it, tg, data, &idx, cfg.threads)?,
                };
                if loss.is_finite() {
                    opt.update(&mut tg.params, &grads);
                }
                loss
            }
        };
        if !loss.is_finite() {
            return Err(IrError::Invalid(format!("training diverged at step {step} (loss {loss})")));
        }
        window.0 += loss;
        window.1 += 1;
        let done = step + 1;
        bar.set_position(done as u64);
        sqil_ir::progress::report("fine-tuning", done as u64, cfg.steps as u64);
        if done % cfg.log_every == 0 || done == cfg.steps {
            let mean = window.0 / window.1 as f64;
            log.loss.push((done, mean, opt.lr_at(step)));
            let el = t0.elapsed().as_secs_f64();
            let eta = el / (done - start) as f64 * (cfg.steps - done) as f64;
            bar.set_message(format!("loss {mean:.5}  lr {:.2e}", opt.lr_at(step)));
            if bar.is_hidden() {
                eprintln!(
                    "step {done}/{}  loss {mean:.5}  lr {:.2e}  {:.0} samples/s  ETA {eta:.0}s",
                    cfg.steps,
                    opt.lr_at(step),
                    ((done - start) * cfg.batch) as f64 / el
                );
            }
            window = (0.0, 0);
        }
        // Validation, checkpoints, a requested stop and the end all read the parameters.
        let due = (every > 0 && done % every == 0)
            || (cfg.checkpoint_every > 0 && done % cfg.checkpoint_every == 0)
            || cfg.stop_after == Some(done)
            || done == cfg.steps;
        if due {
            if let Some(e) = engine.as_deref_mut() {
                e.read_back(&mut tg.params, &mut opt)?;
            }
        }
        let stop = if every > 0 && (done % every == 0 || done == cfg.steps) {
            validate(tg, done, &mut log, &mut best, &mut since_best)?
        } else {
            false
        };
        if stop && done < cfg.steps {
            bar.finish_and_clear();
            // Finished early: the phase's total becomes the steps run.
            sqil_ir::progress::report("fine-tuning", done as u64, done as u64);
            log.stopped_at = Some(done);
            log.seconds += t0.elapsed().as_secs_f64();
            log.samples_per_s = ((done - start) * cfg.batch) as f64 / t0.elapsed().as_secs_f64().max(1e-9);
            eprintln!(
                "stopped early at step {done}: no better validation score in {} evaluations (best at step {})",
                since_best,
                log.best_step.unwrap_or(0)
            );
            save(tg, &opt, &log, done, draws, &perm, pos, &best, since_best, true)?;
            return Ok((log, best));
        }
        if cfg.checkpoint_every > 0 && done % cfg.checkpoint_every == 0 {
            save(tg, &opt, &log, done, draws, &perm, pos, &best, since_best, false)?;
        }
        if cfg.stop_after == Some(done) && done < cfg.steps {
            save(tg, &opt, &log, done, draws, &perm, pos, &best, since_best, false)?;
            log.seconds += t0.elapsed().as_secs_f64();
            return Ok((log, best));
        }
    }
    bar.finish_and_clear();
    log.seconds += t0.elapsed().as_secs_f64();
    log.samples_per_s = ((cfg.steps - start) * cfg.batch) as f64 / t0.elapsed().as_secs_f64().max(1e-9);
    save(tg, &opt, &log, cfg.steps, draws, &perm, pos, &best, since_best, false)?;
    Ok((log, best))
}
