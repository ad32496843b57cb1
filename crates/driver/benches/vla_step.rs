//! A VLA-scale QRD fine-tuning step on the GPU: Llama-style decoder layers (hidden 4096, 32 heads,
//! SwiGLU MLP 11008, RMSNorm, causal attention; no rotary embedding) over a sequence of already
//! embedded tokens, an action head on the mean token, LSQ fake quantizers on every linear layer
//! (weights 4-bit in groups of 64 along the input axis, inputs 8-bit per tensor), the QRD loss, the
//! `grad` pass's backward graph, and AdamW on the device (parameters resident). For each depth:
//! time per step (batch copy in, one CUDA-graph launch, the optimizer) and device memory, one JSON
//! line; then the per-layer cost fitted and extrapolated to 32 layers.
//!
//!     cargo bench -p sqil-driver --bench vla_step -- [LAYERS,...] [--batch 8] [--tokens 16] [--profile]
//!
//! `--profile` adds each depth's steps timed one by one (eager, between CUDA events) on stderr.

mod vla;

use sqil_ir::testing::Rng;
use std::time::Instant;
use vla::{build, ACT, H};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag =
        |f: &str, d: usize| args.iter().position(|a| a == f).and_then(|i| args.get(i + 1)?.parse().ok()).unwrap_or(d);
    let (batch, tokens) = (flag("--batch", 8), flag("--tokens", 16));
    let depths: Vec<usize> = args
        .iter()
        .find(|a| a.chars().all(|c| c.is_ascii_digit() || c == ',') && a.contains(|c: char| c.is_ascii_digit()))
        .map(|a| a.split(',').filter_map(|s| s.parse().ok()).collect())
        .unwrap_or(vec![1, 2]);
    let gpu = match sqil_cuda::Gpu::new() {
        Ok(g) => g,
        Err(e) => {
            // Without a GPU: the first depth built, differentiated and lowered (what the device
            // run would execute), its size printed.
            let layers = depths[0];
            let tg = sqil_train::model::train_graph_with(&build(layers, batch, tokens), true, false).unwrap();
            let p = sqil_cuda::graph::lower_graph(&tg.graph, batch).unwrap();
            println!(
                "{{\"layers\": {layers}, \"params\": {}, \"steps\": {}, \"program_gb\": {:.2}, \"gpu\": null}}",
                tg.params.len(),
                p.steps.len(),
                p.bytes() as f64 / 1e9
            );
            let mut bufs: Vec<(usize, usize)> = p.bufs.iter().copied().enumerate().collect();
            bufs.sort_by_key(|b| std::cmp::Reverse(b.1));
            for (i, n) in bufs.iter().take(20) {
                let first = p.steps.iter().find_map(|s| match s {
                    sqil_cuda::graph::GStep::Kernel { out, ins, label, .. } if *out == *i || ins.contains(i) => {
                        Some(label.clone())
                    }
                    sqil_cuda::graph::GStep::Gemm(g) if g.c == *i || g.x == *i || g.y == *i => Some(g.label.clone()),
                    _ => None,
                });
                let kind = if p.inputs.iter().any(|x| x.1 == *i) {
                    "input"
                } else if p.outputs.iter().any(|x| x.0 == *i) {
                    "output"
                } else {
                    ""
                };
                eprintln!("buf {i} {:.1} MB {kind} first {first:?}", *n as f64 * 4e-6);
            }
            eprintln!("no GPU ({e}): lowered only");
            return;
        }
    };
    let mut rows = vec![];
    for &layers in &depths {
        let t0 = Instant::now();
        let sim = build(layers, batch, tokens);
        let tg = sqil_train::model::train_graph_with(&sim, true, false).unwrap();
        drop(sim);
        let p = sqil_cuda::graph::lower_graph(&tg.graph, batch).unwrap();
        let prog_bytes = p.bytes() + sqil_cuda::graph_exec::WORKSPACE;
        let (free0, total) = gpu.mem_info().unwrap();
        let mut gg = sqil_cuda::graph_exec::GpuGraph::new(&gpu, p).unwrap();
        for pm in &tg.params {
            gg.set_input(&pm.name, &pm.value.data.f32_cow()).unwrap();
        }
        let mut opt = gg.adamw(&gpu, &sqil_driver::gpu_train::adamw_params(&tg)).unwrap();
        let nparams: usize =
            tg.params.iter().filter(|p| p.kind == sqil_train::model::ParamKind::Weight).map(|p| p.value.len()).sum();
        let mut rr = Rng::new(9);
        let tok = rr.tensor(vec![batch, tokens, H], 1.0).data.to_f32_vec();
        let tgt = rr.tensor(vec![batch, ACT], 1.0).data.to_f32_vec();
        let teacher = rr.tensor(vec![batch, ACT], 1.0).data.to_f32_vec();
        let alpha: Vec<f32> = (0..batch).map(|i| if i % 5 == 0 { 2.0 } else { 1.0 }).collect();
        let setup_s = t0.elapsed().as_secs_f64();
        gg.capture().unwrap();
        let step = |gg: &mut sqil_cuda::graph_exec::GpuGraph, opt: &mut sqil_cuda::graph_exec::DeviceAdamW| {
            gg.set_input("tokens", &tok).unwrap();
            gg.set_input("train.target", &tgt).unwrap();
            gg.set_input("train.teacher", &teacher).unwrap();
            gg.set_input("train.alpha", &alpha).unwrap();
            gg.run().unwrap();
            gg.adamw_step(opt, [1e-5, 1e-6, 0.1, 0.001, 0.0, 1.0, 0.9, 0.999, 1e-8]).unwrap();
        };
        for _ in 0..2 {
            step(&mut gg, &mut opt);
        }
        gg.sync().unwrap();
        let (free1, _) = gpu.mem_info().unwrap();
        let n = 10;
        let t1 = Instant::now();
        for _ in 0..n {
            step(&mut gg, &mut opt);
        }
        gg.sync().unwrap();
        let ms = t1.elapsed().as_secs_f64() * 1e3 / n as f64;
        let loss = gg.output(0).unwrap()[0];
        let used = (free0 - free1) as f64 / 1e9;
        println!(
            "{{\"gpu\": {:?}, \"layers\": {layers}, \"batch\": {batch}, \"tokens\": {tokens}, \"weights_M\": {:.0}, \"ms_per_step\": {ms:.2}, \"samples_s\": {:.1}, \"device_gb_used\": {used:.2}, \"program_gb\": {:.2}, \"device_total_gb\": {:.0}, \"loss\": {loss:.4}, \"eager\": {:?}, \"setup_s\": {setup_s:.0}}}",
            gpu.name,
            nparams as f64 / 1e6,
            batch as f64 / ms * 1e3,
            prog_bytes as f64 / 1e9,
            total as f64 / 1e9,
            gg.eager_because,
        );
        if args.iter().any(|a| a == "--profile") {
            let prof = gg.profile(3).unwrap();
            eprintln!("profile, {layers} layers:\n{}", sqil_cuda::graph_exec::profile_table(&prof, 30));
        }
        rows.push((layers as f64, ms, used));
        drop(opt);
        drop(gg);
    }
    if rows.len() >= 2 {
        let (a, b) = (rows[0], rows[rows.len() - 1]);
        let per_ms = (b.1 - a.1) / (b.0 - a.0);
        let per_gb = (b.2 - a.2) / (b.0 - a.0);
        let (ms32, gb32) = (a.1 + per_ms * (32.0 - a.0), a.2 + per_gb * (32.0 - a.0));
        println!(
            "{{\"extrapolated_layers\": 32, \"per_layer_ms\": {per_ms:.2}, \"per_layer_gb\": {per_gb:.2}, \"ms_per_step\": {ms32:.0}, \"device_gb\": {gb32:.0}}}"
        );
    }
}
