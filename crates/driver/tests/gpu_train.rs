//! Training graphs on the GPU (`sqil_cuda::graph`): every testdata policy's QRD training graph
//! (forward with LSQ FakeQuant, the backward graph, the loss) lowers at a fixed batch or is
//! refused with the op named; the generated kernels compile with NVRTC (skipped with a reason
//! without it); and, with a GPU, one step's loss and every gradient agree with the CPU
//! interpreter within `GRAD_TOL`, and training with the optimizer on the device follows the CPU
//! trainer and resumes exactly (skipped with a reason without one; `SQIL_REQUIRE_GPU=1` makes a
//! missing GPU a failure, for the device check).

use sqil_driver::quantize::{run_quantize, QuantizeArgs};
use sqil_ir::testing::Rng;
use sqil_ir::Tensor;
use sqil_passes::quant::{QuantConfig, Recipe};
use sqil_train::model::{train_graph_with, TrainGraph};
use std::collections::HashMap;

mod common;
use common::testdata_policies as policies;

/// Every testdata policy: the GPU trainer must take each of them.
const ALL: &[&str] = &[
    "bc_hopper",
    "bc_lander",
    "bc_pickplace",
    "hopper_mlp",
    "halfcheetah_mlp",
    "bc_pickplace_transformer",
    "bc_pickplace_pixels",
    "cnn",
];

fn train_graph(name: &str, settings: &str, intervals: bool) -> TrainGraph {
    let fp = sqil_driver::load_model(&policies().join(format!("{name}.onnx"))).unwrap();
    let mut cfg = QuantConfig::default();
    cfg.apply_settings(settings).unwrap();
    let inputs = (0..fp.inputs.len()).map(|i| policies().join(format!("{name}.input{i}.npy"))).collect();
    let (sim, _, _) = run_quantize(&fp, &QuantizeArgs::in_memory(Recipe::Rtn, cfg, inputs, 64)).unwrap();
    train_graph_with(&sim, true, intervals).unwrap()
}

/// A batch of `b` rows: the policy's inputs from its sample file (rows repeated), random
/// targets and teachers near the float actions, QRD weights 1 or 2.
fn feeds(name: &str, tg: &TrainGraph, b: usize, seed: u64) -> HashMap<String, Tensor> {
    let mut r = Rng::new(seed);
    let mut f = HashMap::new();
    for (i, n) in tg.policy_inputs.iter().enumerate() {
        let t = sqil_driver::npy::read(&policies().join(format!("{name}.input{i}.npy"))).unwrap();
        let rows = t.shape[0];
        let idx: Vec<usize> = (0..b).map(|k| k % rows).collect();
        f.insert(n.clone(), sqil_train::trainer::take_rows(&t.cast(sqil_ir::DType::F32), &idx));
    }
    let g = &tg.graph;
    for inp in &g.inputs {
        let v = &g.node(*inp).outputs[0];
        if f.contains_key(&v.name) || tg.params.iter().any(|p| p.name == v.name) {
            continue;
        }
        let shape: Vec<usize> =
            v.ty.shape.iter().map(|d| if let sqil_ir::Dim::Known(k) = d { *k } else { b }).collect();
        let len: usize = shape.iter().product();
        let data: Vec<f32> = if v.name == "train.alpha" {
            (0..len).map(|_| if r.below(5) == 0 { 2.0 } else { 1.0 }).collect()
        } else if v.name.ends_with("_hi") {
            // High ends at or above the low ends (filled below).
            vec![f32::NAN; len]
        } else {
            (0..len).map(|_| r.unit() * 2.0 - 1.0).collect()
        };
        f.insert(v.name.clone(), Tensor::from_f32(shape, data).unwrap());
    }
    for (hi, lo) in [("train.target_hi", "train.target"), ("train.teacher_hi", "train.teacher")] {
        if let (Some(h), Some(l)) = (f.get(hi), f.get(lo)) {
            let lv = l.data.to_f32_vec();
            let hv: Vec<f32> = lv.iter().enumerate().map(|(i, &x)| if i % 3 == 0 { x + 0.25 } else { x }).collect();
            let t = Tensor::from_f32(h.shape.clone(), hv).unwrap();
            f.insert(hi.to_string(), t);
        }
    }
    for p in &tg.params {
        f.insert(p.name.clone(), p.value.clone());
    }
    f
}

#[test]
fn training_graphs_lower_for_the_gpu_and_compile() {
    let nvrtc = sqil_cuda::nvrtc_present();
    if !nvrtc {
        assert!(std::env::var("SQIL_REQUIRE_NVRTC").as_deref() != Ok("1"), "NVRTC missing and SQIL_REQUIRE_NVRTC=1");
        eprintln!("NVRTC not found: lowering only, the generated kernels are not compiled");
    }
    let cache = std::env::temp_dir().join(format!("sqil-ptx-train-{}", std::process::id()));
    std::env::set_var("SQIL_CACHE", &cache);
    for name in ALL {
        for (settings, intervals) in [("wbits=4,abits=8,group=64", false), ("wbits=3,abits=8,group=16", true)] {
            let tg = train_graph(name, settings, intervals);
            match sqil_cuda::graph::lower_graph(&tg.graph, 64) {
                Ok(p) => {
                    assert_eq!(p.outputs.len(), tg.params.len() + 1, "{name}: loss and one gradient per parameter");
                    eprintln!(
                        "{name:<26} {settings:<26} {} steps ({} GEMMs), {:.1} MB of buffers",
                        p.steps.len(),
                        p.steps.iter().filter(|s| matches!(s, sqil_cuda::graph::GStep::Gemm(_))).count(),
                        p.bytes() as f64 / 1e6
                    );
                    if nvrtc {
                        let ptx =
                            sqil_cuda::compile("train_graph.cu", &sqil_cuda::full_source(&p.source), "compute_90")
                                .unwrap_or_else(|e| panic!("{name}: {e}\n{}", p.source));
                        assert!(ptx.contains(".visible .entry g0("));
                    }
                }
                Err(e) => panic!("{name} ({settings}): {e}"),
            }
        }
    }
    std::fs::remove_dir_all(&cache).ok();
}

/// An op the GPU lowering does not take is refused before anything runs, naming the node.
#[test]
fn ops_the_gpu_does_not_take_are_named() {
    use sqil_ir::{DType, Dim, Graph, Op, ValueType};
    let mut g = Graph::new("g");
    let x = g.add_input("x", ValueType::new(DType::F32, vec![Dim::Sym("N".into()), Dim::Known(4)]));
    let y = g.add_inferred("lsm", Op::LogSoftmax { axis: -1, coerce_2d: false }, &[Some(x)], "y").unwrap();
    g.outputs = vec![y];
    let e = sqil_cuda::graph::lower_graph(&g, 8).unwrap_err().to_string();
    assert!(e.contains("lsm") && e.contains("LogSoftmax on the GPU"), "{e}");
}

#[test]
fn one_training_step_on_the_gpu_matches_the_cpu() {
    let Some(gpu) = common::gpu_or_skip("the GPU comparison") else { return };
    let tol = sqil_cuda::graph::GRAD_TOL;
    for name in ALL {
        for (settings, intervals) in [("wbits=4,abits=8,group=64", false), ("wbits=3,abits=8,group=16", true)] {
            let tg = train_graph(name, settings, intervals);
            // Full batches for the MLPs; the CNNs and the transformer at 16 (the CPU reference is
            // the interpreter).
            let b = if name.starts_with("bc_pickplace_") || *name == "cnn" { 16 } else { 256 };
            let f = feeds(name, &tg, b, 7);
            let want = sqil_ir::interp::Interpreter::new(&tg.graph).unwrap().run(&f).unwrap();
            let prog = sqil_cuda::graph::lower_graph(&tg.graph, b).unwrap();
            let mut gg = sqil_cuda::graph_exec::GpuGraph::new(&gpu, prog).unwrap();
            gg.capture().unwrap();
            if let Some(why) = &gg.eager_because {
                eprintln!("{name}: not captured, eager: {why}");
            }
            let got = gg.run_feeds(&f).unwrap();
            let mut worst = 0f32;
            // A gradient that is zero in exact arithmetic (a bias in front of a softmax over
            // space) is rounding noise on both sides, and an LSQ step's gradient sums
            // dy * (round(x/s) - x/s) over a whole tensor, so a rounding difference upstream moves
            // it by about the terms' size, not its own (the pixel CNN's head input step: -1.2706e-6
            // vs -1.2607e-6 once the GEMMs were split along k, in a step whose largest gradient is
            // 1.9): tensors are compared relative to their own largest value, but never to less
            // than 1e-5 of the step's largest gradient.
            let floor = want[1..].iter().flat_map(|t| t.data.to_f32_vec()).fold(0f32, |m, v| m.max(v.abs())) * 1e-5;
            for (i, (w, g)) in want.iter().zip(&got).enumerate() {
                let (wv, gv) = (w.data.to_f32_vec(), g.data.to_f32_vec());
                assert_eq!(wv.len(), gv.len(), "{name}: output {i} size");
                let scale = wv.iter().fold(floor.max(1e-12), |m, v| m.max(v.abs()));
                let d = wv.iter().zip(&gv).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
                let what = if i == 0 { "loss".to_string() } else { format!("d/d {}", tg.params[i - 1].name) };
                assert!(
                    d <= tol,
                    "{name} ({settings}): {what}: GPU differs by {d:.2e} of its largest value ({gv:?} vs {wv:?})"
                );
                worst = worst.max(d);
            }
            if *name == "bc_hopper" {
                // The device optimizer: one AdamW update in place on the GPU against the CPU's
                // update from the same gradients (warm-up of one step, decay, clipping, LSQ steps).
                let mut cpu = tg.params.clone();
                let mut opt = sqil_train::optim::AdamW::new(&cpu, 1e-3, 0.01, 1, 10, 0.5);
                opt.step_lr_scale = 0.1;
                let grads: Vec<Vec<f32>> = got[1..].iter().map(|t| t.data.to_f32_vec()).collect();
                opt.update(&mut cpu, &grads);
                let mut dev = gg.adamw(&gpu, &sqil_driver::gpu_train::adamw_params(&tg)).unwrap();
                gg.adamw_step(&mut dev, [1e-3, 1e-4, 1.0 - 0.9, 1.0 - 0.999, 0.01, 0.5, 0.9, 0.999, 1e-8]).unwrap();
                for p in &cpu {
                    let (d, c) = (gg.read_input(&p.name).unwrap(), p.value.data.to_f32_vec());
                    let scale = c.iter().fold(1e-12f32, |m, v| m.max(v.abs()));
                    let diff = d.iter().zip(&c).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
                    assert!(diff <= 1e-6, "{name}: device AdamW on {} differs by {diff:.1e}", p.name);
                }
                eprintln!("{name}: device AdamW update matches the CPU's within 1e-6");
            }
            eprintln!(
                "{name:<20} {settings:<26} loss {:.6} (GPU) vs {:.6} (CPU); {} gradients, max rel diff {worst:.1e}",
                got[0].data.to_f32_vec()[0],
                want[0].data.to_f32_vec()[0],
                got.len() - 1
            );
        }
    }
}

/// `sqil compile --device cuda` runs its forward passes (the float policy's actions, SIS, scoring)
/// on the GPU: each testdata policy's float graph and SIS there against the interpreter.
#[test]
fn forward_passes_and_sis_on_the_gpu_match_the_cpu() {
    let gpu = match sqil_driver::forward::Forward::cuda() {
        Ok(g) => g,
        Err(e) => {
            assert!(std::env::var("SQIL_REQUIRE_GPU").as_deref() != Ok("1"), "no GPU and SQIL_REQUIRE_GPU=1: {e}");
            eprintln!("skipping the GPU forward comparison: {e}");
            return;
        }
    };
    let cpu = sqil_driver::forward::Forward::cpu();
    for name in ALL {
        let mut fp = sqil_driver::load_model(&policies().join(format!("{name}.onnx"))).unwrap();
        sqil_passes::cleanup_pipeline().run(&mut fp, &mut sqil_passes::PassCtx::default()).unwrap();
        let mut f = HashMap::new();
        for (i, &inp) in fp.inputs.iter().enumerate() {
            let t = sqil_driver::npy::read(&policies().join(format!("{name}.input{i}.npy"))).unwrap();
            f.insert(fp.node(inp).outputs[0].name.clone(), t.cast(sqil_ir::DType::F32));
        }
        let batches = vec![f];
        let (want, got) = (cpu.run_all(&fp, &batches, "test").unwrap(), gpu.run_all(&fp, &batches, "test").unwrap());
        let (wv, gv) = (want.data.to_f32_vec(), got.data.to_f32_vec());
        let scale = wv.iter().fold(1e-12f32, |m, v| m.max(v.abs()));
        let d = wv.iter().zip(&gv).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
        assert!(d <= 1e-4, "{name}: GPU forward differs by {d:.2e} of the largest action");
        let cfg = sqil_train::sis::SisConfig::default();
        let s_cpu = sqil_train::sis::sis_with(&fp, &batches, &cfg).unwrap();
        let mut r = gpu.runner(&fp, "SIS").unwrap();
        let s_gpu = sqil_train::sis::sis_run(&fp, &batches, &cfg, &mut |x| r.run(x)).unwrap();
        let top = s_cpu.iter().cloned().fold(1e-30f64, f64::max);
        for (i, (a, b)) in s_cpu.iter().zip(&s_gpu).enumerate() {
            assert!((a - b).abs() <= 1e-3 * top, "{name}: SIS of state {i}: GPU {b:.4e} vs CPU {a:.4e}");
        }
    }
}

/// `sqil compile --device cuda`'s trainer: the step and AdamW on the device, parameters and
/// moments resident, read back for checkpoints. Against the CPU trainer on the same data and
/// settings: every logged loss within 1% and the final parameters on the CPU's trajectory (their
/// distance from the CPU's under 5% of the CPU's distance travelled); and a run stopped at a
/// checkpoint and resumed on a fresh engine ends bit for bit where the uninterrupted one does.
#[test]
fn training_with_the_optimizer_on_the_gpu_follows_the_cpu_and_resumes_exactly() {
    let gpu_ok = common::gpu_or_skip("the device optimizer run").is_some();
    if !gpu_ok {
        return;
    }
    let (tg0, data, cfg) = hopper_run(64);
    let flat = |tg: &TrainGraph| -> Vec<f32> { tg.params.iter().flat_map(|p| p.value.data.to_f32_vec()).collect() };
    let dist = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>().sqrt();
    let mut cpu = tg0.clone();
    let (cpu_log, _) = sqil_train::trainer::train_with(&mut cpu, &data, &cfg, None, false, None, None).unwrap();
    let mut dev = tg0.clone();
    let mut engine = sqil_driver::gpu_train::GpuEngine::new(&dev, cfg.batch).unwrap();
    let (dev_log, _) =
        sqil_train::trainer::train_with(&mut dev, &data, &cfg, None, false, None, Some(&mut engine)).unwrap();
    drop(engine);
    assert_eq!(cpu_log.loss.len(), dev_log.loss.len());
    for ((s, a, _), (_, b, _)) in cpu_log.loss.iter().zip(&dev_log.loss) {
        assert!((a - b).abs() <= 1e-2 * a.abs().max(1e-9), "step {s}: loss {b} on the GPU, {a} on the CPU");
    }
    let (p0, pc, pd) = (flat(&tg0), flat(&cpu), flat(&dev));
    let travelled = dist(&p0, &pc);
    assert!(travelled > 0.0, "the CPU run did not move the parameters");
    assert!(
        dist(&pc, &pd) <= 0.05 * travelled,
        "device-optimizer parameters {:.3e} from the CPU's after travelling {travelled:.3e}",
        dist(&pc, &pd)
    );
    eprintln!("device optimizer: final parameters {:.2e} from the CPU's (travelled {travelled:.2e})", dist(&pc, &pd));
    // Stopped at step 20 with a checkpoint, resumed on a fresh engine.
    let dir = std::env::temp_dir().join(format!("sqil-devopt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ck = dir.join("ck.json");
    let mut part = tg0.clone();
    let mut e1 = sqil_driver::gpu_train::GpuEngine::new(&part, cfg.batch).unwrap();
    let first = sqil_train::trainer::TrainConfig { stop_after: Some(20), ..cfg.clone() };
    sqil_train::trainer::train_with(&mut part, &data, &first, Some(&ck), false, None, Some(&mut e1)).unwrap();
    drop(e1);
    let mut resumed = tg0.clone();
    let mut e2 = sqil_driver::gpu_train::GpuEngine::new(&resumed, cfg.batch).unwrap();
    sqil_train::trainer::train_with(&mut resumed, &data, &cfg, Some(&ck), true, None, Some(&mut e2)).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    assert!(flat(&resumed) == pd, "resumed on the GPU: {:.3e} from the uninterrupted run", dist(&flat(&resumed), &pd));
}

/// Data-parallel fine-tuning (`DataParallel`, `sqil compile --gpus N`): a group of one GPU
/// computes exactly the single-GPU trainer's parameters (its scale is 1 and NCCL's sum over one
/// rank is the identity); over every GPU of the machine (when it has two or more) the run
/// follows the single-GPU one within float rounding of the reordered batch sums, and a
/// checkpoint written on N GPUs resumes on one. Skipped with a reason without a GPU or without
/// NCCL (`SQIL_REQUIRE_NCCL=1` makes a missing NCCL a failure, for the multi-GPU run).
#[test]
fn data_parallel_training_follows_one_gpu_and_resumes_on_another_count() {
    if common::gpu_or_skip("data-parallel training").is_none() {
        return;
    }
    if !sqil_cuda::collective::nccl_present() {
        assert!(std::env::var("SQIL_REQUIRE_NCCL").as_deref() != Ok("1"), "NCCL not found and SQIL_REQUIRE_NCCL=1");
        eprintln!("skipping data-parallel training: {}", sqil_cuda::collective::NCCL_MISSING);
        return;
    }
    let (tg0, data, cfg) = hopper_run(63);
    let flat = |tg: &TrainGraph| -> Vec<f32> { tg.params.iter().flat_map(|p| p.value.data.to_f32_vec()).collect() };
    let dist = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>().sqrt();
    let run = |engine: &mut dyn sqil_train::trainer::GradEngine,
               ck: Option<(&std::path::PathBuf, bool, Option<usize>)>| {
        let mut tg = tg0.clone();
        let c = sqil_train::trainer::TrainConfig { stop_after: ck.and_then(|c| c.2), ..cfg.clone() };
        let (log, _) = sqil_train::trainer::train_with(
            &mut tg,
            &data,
            &c,
            ck.map(|c| c.0),
            ck.is_some_and(|c| c.1),
            None,
            Some(engine),
        )
        .unwrap();
        (tg, log)
    };
    let mut one = sqil_driver::gpu_train::GpuEngine::new(&tg0, cfg.batch).unwrap();
    let (single, single_log) = run(&mut one, None);
    drop(one);
    let travelled = dist(&flat(&tg0), &flat(&single));
    assert!(travelled > 0.0, "the single-GPU run did not move the parameters");
    // A group of one: the single GPU's bits.
    let mut g1 = sqil_driver::gpu_train::DataParallel::new(None, 1, &tg0, cfg.batch).unwrap();
    let (grouped, _) = run(&mut g1, None);
    drop(g1);
    assert!(
        flat(&grouped) == flat(&single),
        "a group of one: {:.3e} from one GPU",
        dist(&flat(&grouped), &flat(&single))
    );
    eprintln!("a group of one GPU: the single-GPU parameters bit for bit");
    let n = sqil_cuda::Gpu::count().unwrap();
    if n < 2 {
        eprintln!("skipping the multi-GPU half: this machine has {n} GPU");
        return;
    }
    let mut gn = sqil_driver::gpu_train::DataParallel::new(None, n, &tg0, cfg.batch).unwrap();
    let (multi, multi_log) = run(&mut gn, None);
    drop(gn);
    for ((s, a, _), (_, b, _)) in single_log.loss.iter().zip(&multi_log.loss) {
        assert!((a - b).abs() <= 1e-3 * a.abs().max(1e-9), "step {s}: loss {b} on {n} GPUs, {a} on one");
    }
    let d = dist(&flat(&multi), &flat(&single));
    assert!(d <= 0.01 * travelled, "{n} GPUs: parameters {d:.3e} from one GPU's after travelling {travelled:.3e}");
    eprintln!("{n} GPUs: final parameters {d:.2e} from one GPU's (travelled {travelled:.2e})");
    // Stopped at step 20 on N GPUs with a checkpoint, resumed on one.
    let dir = std::env::temp_dir().join(format!("sqil-ddp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ck = dir.join("ck.json");
    let mut gn = sqil_driver::gpu_train::DataParallel::new(None, n, &tg0, cfg.batch).unwrap();
    run(&mut gn, Some((&ck, false, Some(20))));
    drop(gn);
    let mut e1 = sqil_driver::gpu_train::GpuEngine::new(&tg0, cfg.batch).unwrap();
    let (resumed, _) = run(&mut e1, Some((&ck, true, None)));
    std::fs::remove_dir_all(&dir).ok();
    let d = dist(&flat(&resumed), &flat(&single));
    assert!(d <= 0.01 * travelled, "resumed on one GPU: {d:.3e} from the single-GPU run");
    eprintln!("{n} GPUs to step 20, resumed on one: {d:.2e} from the single-GPU run");
}

/// bc_hopper's W4A8 training graph, 512 random training rows and a 30-step schedule at `batch`
/// (checkpoints every 10 steps): the device-optimizer runs' setup.
fn hopper_run(batch: usize) -> (TrainGraph, sqil_train::trainer::Dataset, sqil_train::trainer::TrainConfig) {
    let name = "bc_hopper";
    let tg0 = train_graph(name, "wbits=4,abits=8,group=64", false);
    let f = feeds(name, &tg0, 512, 11);
    let data = sqil_train::trainer::Dataset {
        inputs: tg0.policy_inputs.iter().map(|n| (n.clone(), f[n].clone())).collect(),
        target: f["train.target"].clone(),
        teacher: f["train.teacher"].clone(),
        alpha: f["train.alpha"].data.to_f32_vec(),
        target_hi: None,
        teacher_hi: None,
    };
    let cfg = sqil_train::trainer::TrainConfig {
        steps: 30,
        batch,
        lr: 1e-3,
        warmup: 5,
        log_every: 1,
        checkpoint_every: 10,
        seed: 3,
        ..Default::default()
    };
    (tg0, data, cfg)
}

/// Training beside a policy serving from its persistent program in the same process: the
/// engine stops the program before its uploads (the policy takes its graph from its next
/// action), builds and drops its training programs, and the policy keeps its bits. A hang fails
/// the test (a watchdog ends the process).
#[test]
fn training_beside_a_running_policy_program() {
    let Some(gpu) = common::gpu_or_skip("training beside a policy's program") else { return };
    let done = common::watchdog("training_beside_a_running_policy_program", 120);
    use sqil_cuda::policy::{GpuPolicy, Mode};
    let gpu = std::sync::Arc::new(gpu);
    let (p, inputs) = common::testdata_rtn("hopper_mlp", "wbits=4,abits=8,group=32");
    let state = common::input_row(&inputs, &p.input_sizes(), 0).concat();
    let mut gp = GpuPolicy::new(&gpu, &p).unwrap();
    gp.capture(&gpu).unwrap();
    gp.set_mode(Mode::Persistent).unwrap();
    let before = gp.act(&gpu, &state).unwrap();
    let tg = train_graph("hopper_mlp", "wbits=4,abits=8,group=64", false);
    let engine = sqil_driver::gpu_train::GpuEngine::on(gpu.clone(), &tg, 64).unwrap();
    eprintln!("training engine beside the policy: {}", engine.mode());
    drop(engine);
    assert_eq!(gp.act(&gpu, &state).unwrap(), before, "the policy after the training engine");
    assert_ne!(gp.mode(), Mode::Persistent, "the policy's program was stopped for the training");
    gp.set_mode(Mode::Persistent).unwrap();
    assert_eq!(gp.act(&gpu, &state).unwrap(), before, "the policy back on its program");
    done.send(()).ok();
}
