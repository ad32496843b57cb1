//! Samples/s of one QRD training step (forward with LSQ FakeQuant, backward, loss; the optimizer
//! excluded on both sides) per testdata policy: `sqil_cuda::graph` on the GPU (inputs and
//! parameters copied in, one CUDA-graph launch, loss and gradients copied out) against the CPU
//! interpreter on the same batch (one thread, the trainer splits a batch over `--threads`), in one
//! run; also the GPU step alone on inputs already on the device (`gpu_device_samples_s`: one
//! graph launch, what a PyTorch loop over device tensors times). Prints one JSON line per policy.
//!
//!     cargo bench -p sqil-driver --bench train_step [-- BATCH] [--only SUBSTRING] [--profile]
//!
//! `--profile` adds each GPU program's steps timed one by one (eager, between CUDA events) on
//! stderr.

mod policy;

use sqil_train::trainer::{batch_feeds, Dataset};
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let batch: usize = args.iter().find_map(|a| a.parse().ok()).unwrap_or(256);
    let only = args.iter().position(|a| a == "--only").and_then(|i| args.get(i + 1)).cloned().unwrap_or_default();
    let profile = args.iter().any(|a| a == "--profile");
    let gpu = match sqil_cuda::Gpu::new() {
        Ok(g) => Some(g),
        Err(e) => {
            eprintln!("no GPU ({e}): CPU only");
            None
        }
    };
    for name in
        ["bc_hopper", "bc_pickplace", "halfcheetah_mlp", "bc_pickplace_transformer", "bc_pickplace_pixels", "cnn"]
    {
        if !name.contains(only.as_str()) {
            continue;
        }
        // A dataset of the sample inputs repeated, zero targets (the arithmetic does not care).
        let (sim, tg, ins) = policy::w4a8(name, batch);
        let out = sqil_runtime::Policy::from_graph(&sim)
            .unwrap()
            .run(&ins.iter().map(|(_, t)| t.clone()).collect::<Vec<_>>())
            .unwrap()
            .remove(0);
        let data = Dataset {
            inputs: ins,
            target: out.clone(),
            teacher: out,
            alpha: vec![1.0; batch],
            target_hi: None,
            teacher_hi: None,
        };
        let idx: Vec<usize> = (0..batch).collect();
        let feeds = batch_feeds(&tg, &data, &idx).unwrap();
        let it = sqil_ir::interp::Interpreter::new(&tg.graph).unwrap();
        let time = |f: &mut dyn FnMut()| {
            f();
            let t0 = Instant::now();
            let mut n = 0;
            while n < 3 || t0.elapsed().as_secs_f64() < 1.0 {
                f();
                n += 1;
            }
            t0.elapsed().as_secs_f64() / n as f64
        };
        let cpu = time(&mut || {
            it.run(&feeds).unwrap();
        });
        let (gpu_s, mb, gname) = match &gpu {
            Some(g) => {
                let p = sqil_cuda::graph::lower_graph(&tg.graph, batch).unwrap();
                let mb = (p.bytes() + sqil_cuda::graph_exec::WORKSPACE) as f64 / 1e6;
                let mut gg = sqil_cuda::graph_exec::GpuGraph::new(g, p).unwrap();
                gg.capture().unwrap();
                let s = time(&mut || {
                    gg.run_feeds(&feeds).unwrap();
                });
                // The same step on inputs already on the device (what the PyTorch peer times).
                let dev_s = time(&mut || {
                    gg.run().unwrap();
                    gg.sync().unwrap();
                });
                if profile {
                    let prof = gg.profile(5).unwrap();
                    eprintln!("profile, {name}:\n{}", sqil_cuda::graph_exec::profile_table(&prof, 30));
                }
                (Some((s, dev_s)), mb, g.name.clone())
            }
            None => (None, 0.0, String::new()),
        };
        println!(
            "{{\"policy\": \"{name}\", \"batch\": {batch}, \"cpu_interp_1thread_samples_s\": {:.0}, \"gpu\": {:?}, \"gpu_samples_s\": {}, \"gpu_device_samples_s\": {}, \"gpu_mb\": {mb:.1}, \"ratio_gpu_cpu\": {}}}",
            batch as f64 / cpu,
            gname,
            gpu_s.map_or("null".into(), |s| format!("{:.0}", batch as f64 / s.0)),
            gpu_s.map_or("null".into(), |s| format!("{:.0}", batch as f64 / s.1)),
            gpu_s.map_or("null".into(), |s| format!("{:.1}", cpu / s.0)),
        );
    }
}
