//! Data-parallel QRD fine-tuning over the GPUs of one host (`sqil compile --device cuda --gpus
//! N`, `sqil_driver::gpu_train::DataParallel`: one training program per GPU, gradients summed by
//! NCCL once per step), in one run per model:
//!
//! - **throughput** at 1, 2, 4, ... GPUs (up to the machine's count) with the same rows per GPU
//!   (weak scaling, as PyTorch DistributedDataParallel is usually run): samples/s of whole steps
//!   (batch gathered on the host and copied in, forward, backward, the all-reduce, AdamW on every
//!   GPU) and the scaling efficiency `samples/s at N / (N x samples/s at 1)` (per GPU at the
//!   first count run, where `--gpus` leaves 1 out);
//! - **loss curves** at every count with the same global batch, seed and steps (what "the same
//!   result as one GPU" means), one JSON line per count with the loss of every step.
//!
//! The models: `pixels` (the pickplace-pixels CNN of testdata, W4A8 RTN) and `vla` (one
//! VLA-scale decoder layer, `vla::build`). fp32, TF32 off. `tools/bench_ddp_torch.py` is the
//! PyTorch DistributedDataParallel peer on the same models, batches and precision.
//!
//!     cargo bench -p sqil-driver --bench dp_step -- [--models pixels,vla] [--gpus 1,2,4]
//!         [--rows-per-gpu B] [--steps S] [--curve-steps C]
//!
//! Without a GPU or without NCCL it prints why and exits 0.

mod policy;
mod vla;

use sqil_driver::gpu_train::DataParallel;
use sqil_ir::testing::Rng;
use sqil_train::model::TrainGraph;
use sqil_train::optim::AdamW;
use sqil_train::trainer::{Dataset, GradEngine, TrainConfig};
use std::time::Instant;

/// The training graph and `rows` training rows of one model.
fn model(name: &str, rows: usize) -> (TrainGraph, Dataset) {
    let mut r = Rng::new(17);
    let (tg, inputs) = match name {
        "pixels" => {
            let (_, tg, ins) = policy::w4a8("bc_pickplace_pixels", rows);
            (tg, ins)
        }
        "vla" => {
            let (tokens, layers) = (16, 1);
            let tg = sqil_train::model::train_graph_with(&vla::build(layers, rows, tokens), true, false).unwrap();
            let t = r.tensor(vec![rows, tokens, vla::H], 1.0);
            let input = tg.policy_inputs[0].clone();
            (tg, vec![(input, t)])
        }
        other => panic!("--models: unknown model {other:?} (pixels, vla)"),
    };
    // Targets and teachers: random actions of the policy's width; QRD weights 1 or 2.
    let width = action_width(&tg);
    let target = r.tensor(vec![rows, width], 1.0);
    let teacher = r.tensor(vec![rows, width], 1.0);
    let alpha = (0..rows).map(|_| if r.below(5) == 0 { 2.0 } else { 1.0 }).collect();
    (tg, Dataset { inputs, target, teacher, alpha, target_hi: None, teacher_hi: None })
}

/// The width of the training graph's target input (`train.target`, `[N, width]`).
fn action_width(tg: &TrainGraph) -> usize {
    let g = &tg.graph;
    g.inputs
        .iter()
        .map(|i| &g.node(*i).outputs[0])
        .find(|v| v.name == "train.target")
        .and_then(|v| match v.ty.shape.last() {
            Some(sqil_ir::Dim::Known(k)) => Some(*k),
            _ => None,
        })
        .expect("the training graph has a [N, width] train.target input")
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opt_s = |f: &str, d: &str| -> String {
        args.iter().position(|a| a == f).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| d.to_string())
    };
    let models = opt_s("--models", "pixels,vla");
    let per: usize = opt_s("--rows-per-gpu", "32").parse().expect("--rows-per-gpu N");
    let steps: usize = opt_s("--steps", "20").parse().expect("--steps N");
    let curve_steps: usize = opt_s("--curve-steps", "50").parse().expect("--curve-steps N");
    let count = match sqil_cuda::Gpu::count() {
        Ok(n) if n > 0 => n,
        Ok(_) => return println!("skipping dp_step: no GPU"),
        Err(e) => return println!("skipping dp_step: no GPU ({e})"),
    };
    if !sqil_cuda::collective::nccl_present() {
        return println!("skipping dp_step: {}", sqil_cuda::collective::NCCL_MISSING);
    }
    if std::env::var_os("NCCL_NVLS_ENABLE").is_none() {
        std::env::set_var("NCCL_NVLS_ENABLE", "0");
    }
    let counts: Vec<usize> = opt_s("--gpus", "1,2,4,8")
        .split(',')
        .filter_map(|s| s.parse().ok())
        .filter(|&n| n >= 1 && n <= count)
        .collect();
    let gpu_name = sqil_cuda::Gpu::on(0).map(|g| g.name.clone()).unwrap_or_default();
    for name in models.split(',') {
        let most = *counts.iter().max().unwrap();
        let global = per * most;
        // Built once per model: the throughput runs read it, each curve trains a copy.
        let (tg, data) = model(name, global * 4);
        // Throughput: `per` rows per GPU, 3 warm-up steps, then `steps` timed.
        let mut one = None;
        for &n in &counts {
            let batch = per * n;
            let mut dp = DataParallel::new(None, n, &tg, batch).unwrap();
            let mut opt = AdamW::new(&tg.params, 1e-4, 0.0, 0, steps + 3, 1.0);
            let rows = |s: usize| -> Vec<usize> { (0..batch).map(|k| (s * batch + k) % data.len()).collect() };
            let mut loss = 0.0;
            for s in 0..3 {
                loss = dp.step(&tg, &data, &rows(s), &mut opt).unwrap().unwrap();
            }
            let t0 = Instant::now();
            for s in 3..3 + steps {
                loss = dp.step(&tg, &data, &rows(s), &mut opt).unwrap().unwrap();
            }
            let sps = (steps * batch) as f64 / t0.elapsed().as_secs_f64();
            // Per GPU at the first count run (1 unless --gpus leaves it out).
            let base = *one.get_or_insert(sps / n as f64);
            println!(
                "{{\"model\": \"{name}\", \"engine\": \"sqil\", \"gpu\": {gpu_name:?}, \"gpus\": {n}, \"rows_per_gpu\": {per}, \"batch\": {batch}, \"samples_s\": {sps:.1}, \"scaling_efficiency\": {:.3}, \"mode\": {:?}, \"last_loss\": {loss:.5}}}",
                sps / (n as f64 * base),
                dp.mode(),
            );
        }
        // Loss curves: the same global batch, seed and steps at every count.
        for &n in &counts {
            let mut tg = tg.clone();
            let cfg = TrainConfig {
                steps: curve_steps,
                batch: global,
                lr: 1e-4,
                warmup: 5,
                log_every: 1,
                checkpoint_every: 0,
                seed: 3,
                ..Default::default()
            };
            let mut dp = DataParallel::new(None, n, &tg, global).unwrap();
            let (log, _) =
                sqil_train::trainer::train_with(&mut tg, &data, &cfg, None, false, None, Some(&mut dp)).unwrap();
            let curve: Vec<String> = log.loss.iter().map(|(_, l, _)| format!("{l:.6e}")).collect();
            println!(
                "{{\"model\": \"{name}\", \"engine\": \"sqil\", \"gpu\": {gpu_name:?}, \"gpus\": {n}, \"batch\": {global}, \"curve\": [{}]}}",
                curve.join(", ")
            );
        }
    }
}
