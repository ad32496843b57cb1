//! `sqil bench`: latency and throughput of a model (reference interpreter) or a compiled CPU
//! artifact (runtime kernels) on seeded random inputs, one JSON line per batch size.

use sqil_ir::interp::Interpreter;
use sqil_ir::testing::Rng;
use sqil_ir::{DType, Dim, Graph, Tensor};
use sqil_runtime::Execute;
use std::path::Path;
use std::time::Instant;

/// Random inputs of `types` (each input's shape and element type) with the batch dimension set to
/// `batch`: uniform in [-1, 1), like an observation, as the input's element type (a float16
/// policy's in float16; an integer input's, such as token ids, truncated toward zero). (Not the
/// tests' `Rng::tensor`, whose edge cases include subnormal values: a float layer's FMAs on
/// subnormal operands take microcode assists on Intel cores, and timed with them the 4x1024 MLP's
/// float first layer ran 6x slower than on real observations.)
fn inputs(types: &[(Vec<Dim>, DType)], batch: usize, r: &mut Rng) -> Vec<Tensor> {
    types
        .iter()
        .map(|(s, dt)| {
            let shape: Vec<usize> =
                s.iter().enumerate().map(|(i, d)| if i == 0 { batch } else { d.known().unwrap_or(1) }).collect();
            let v = (0..shape.iter().product::<usize>()).map(|_| r.unit()).collect();
            Tensor::from_f32(shape, v).expect("sized").cast(*dt)
        })
        .collect()
}

pub fn bench(model: &Path, batches: &[usize], iters: usize, threads: usize, profile: bool) -> crate::Result<()> {
    let artifact = sqil_runtime::artifact::is_artifact(model);
    let (policy, graph): (Option<sqil_runtime::Policy>, Option<Graph>) = if artifact {
        let mut p = sqil_runtime::Policy::load(model)?;
        p.threads = threads;
        (Some(p), None)
    } else {
        (None, Some(crate::load_model(model)?))
    };
    let (types, names): (Vec<(Vec<Dim>, DType)>, Vec<String>) = match (&policy, &graph) {
        (Some(p), _) => (
            p.input_shapes().iter().cloned().zip(p.input_dtypes().iter().copied()).collect(),
            p.plan.inputs.iter().map(|(n, _)| n.clone()).collect(),
        ),
        (_, Some(g)) => g
            .inputs
            .iter()
            .map(|&i| {
                let v = &g.node(i).outputs[0];
                ((v.ty.shape.clone(), v.ty.dtype), v.name.clone())
            })
            .unzip(),
        _ => unreachable!("a model or an artifact"),
    };
    let interp = graph.as_ref().map(Interpreter::new).transpose()?;
    let mut r = Rng::new(0);
    for &b in batches {
        let x = inputs(&types, b, &mut r);
        let feeds: std::collections::HashMap<String, Tensor> = names.iter().cloned().zip(x.iter().cloned()).collect();
        let once = || -> crate::Result<()> {
            match (&policy, &interp) {
                (Some(p), _) => Ok(p.run(&x).map(|_| ())?),
                (_, Some(it)) => Ok(it.run(&feeds).map(|_| ())?),
                _ => unreachable!(),
            }
        };
        for _ in 0..(iters / 10).max(1) {
            once()?;
        }
        let mut times = Vec::with_capacity(iters);
        for _ in 0..iters.max(1) {
            let t = Instant::now();
            once()?;
            times.push(t.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        let mean = times.iter().sum::<f64>() / times.len() as f64;
        println!(
            "{{\"model\": {:?}, \"engine\": {:?}, \"batch\": {b}, \"threads\": {threads}, \"mean_us\": {:.2}, \"p50_us\": {:.2}, \"min_us\": {:.2}, \"samples_per_s\": {:.1}}}",
            model.display().to_string(),
            if artifact { "sqil-runtime" } else { "sqil-interpreter" },
            mean * 1e6,
            times[times.len() / 2] * 1e6,
            times[0] * 1e6,
            b as f64 / mean
        );
        if profile {
            let Some(p) = &policy else {
                return Err(format!(
                    "{}: --profile needs a compiled artifact (sqil compile/quantize --artifact)",
                    model.display()
                )
                .into());
            };
            let t = p.plan.profile(&x, threads, iters)?;
            let total: f64 = t.iter().map(|s| s.0).sum();
            let paths = p.plan.paths(&x, threads)?;
            for ((step, (mean, min)), path) in p.plan.describe().iter().zip(&t).zip(&paths) {
                println!(
                    "{{\"batch\": {b}, \"step\": {step:?}, \"path\": {path:?}, \"mean_us\": {:.2}, \"min_us\": {:.2}, \"share\": {:.3}}}",
                    mean * 1e6,
                    min * 1e6,
                    mean / total.max(f64::MIN_POSITIVE)
                );
            }
            // (An empty float sum is -0.0: `+ 0.0` prints it as 0.)
            let share = |which: &str| {
                t.iter().zip(&paths).filter(|(_, p)| **p == which).map(|(x, _)| x.0).sum::<f64>()
                    / total.max(f64::MIN_POSITIVE)
                    + 0.0
            };
            // The steps still on the reference path, named: what a fast path is missing for.
            let mut slow: Vec<&str> = p
                .plan
                .steps
                .iter()
                .zip(&paths)
                .filter(|(_, p)| **p == "reference (f64)")
                .filter_map(|(s, _)| match s {
                    sqil_runtime::Step::Op { op, .. } => Some(op.name()),
                    _ => None,
                })
                .collect();
            slow.sort_unstable();
            slow.dedup();
            println!(
                "{{\"batch\": {b}, \"reference_share\": {:.3}, \"reference_ops\": {slow:?}, \"f32_kernel_share\": {:.3}, \"int4_kernel_share\": {:.3}, \"data_movement_share\": {:.3}}}",
                share("reference (f64)"),
                share("f32 kernel"),
                share("int4 kernel"),
                share("data movement")
            );
        }
    }
    Ok(())
}
