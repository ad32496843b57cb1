//! Interpreter speed against tract-onnx (optimised plan), measured in the same run on the
//! testdata policies: `cargo bench -p sqil-conformance`. The interpreter is the correctness
//! oracle, not the deployment path; this keeps it from being needlessly slow.

use sqil_ir::interp::Interpreter;
use sqil_ir::{Data, Tensor};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tract_onnx::prelude::*;

/// Median time per call of `f` over repeated batches lasting about `budget` in total.
fn median(budget: Duration, mut f: impl FnMut()) -> Duration {
    f();
    let t = Instant::now();
    f();
    let once = t.elapsed().max(Duration::from_nanos(100));
    let reps = ((budget.as_secs_f64() / once.as_secs_f64()) as usize).clamp(5, 20_000);
    let mut times: Vec<Duration> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    times.sort();
    times[reps / 2]
}

fn main() {
    let dir = sqil_conformance::repo_root().join("testdata/policies");
    println!("{:<22} {:>6} {:>14} {:>14} {:>8}", "model", "batch", "sqil interp", "tract", "ratio");
    for (name, inputs) in [
        ("hopper_mlp", vec![vec![1usize, 15]]),
        ("hopper_mlp", vec![vec![64, 15]]),
        ("mlp", vec![vec![1, 39]]),
        ("cnn", vec![vec![1, 64, 64, 3], vec![1, 9]]),
        ("transformer", vec![vec![1, 8, 39]]),
    ] {
        let g = sqil_onnx::load_model(&dir.join(format!("{name}.onnx"))).unwrap();
        let interp = Interpreter::new(&g).unwrap();
        let tensors: Vec<Tensor> = inputs
            .iter()
            .map(|s| {
                Tensor::new(
                    s.clone(),
                    Data::F32((0..s.iter().product()).map(|i| ((i * 37 % 101) as f32) / 50.0 - 1.0).collect()),
                )
                .unwrap()
            })
            .collect();
        let feeds: HashMap<String, Tensor> =
            g.inputs.iter().map(|&i| g.node(i).outputs[0].name.clone()).zip(tensors.iter().cloned()).collect();
        let ours = median(Duration::from_millis(400), || {
            interp.run(&feeds).unwrap();
        });
        let mut model = tract_onnx::onnx().model_for_path(dir.join(format!("{name}.onnx"))).unwrap();
        for (k, t) in tensors.iter().enumerate() {
            model.set_input_fact(k, f32::fact(t.shape.clone()).into()).unwrap();
        }
        let plan = model.into_optimized().unwrap().into_runnable().unwrap();
        let ins: TVec<TValue> = tensors
            .iter()
            .map(|t| tract_onnx::prelude::Tensor::from_shape(&t.shape, t.as_f32().unwrap()).unwrap().into())
            .collect();
        let theirs = median(Duration::from_millis(400), || {
            plan.run(ins.clone()).unwrap();
        });
        println!(
            "{:<22} {:>6} {:>11.1} us {:>11.1} us {:>7.2}x",
            name,
            inputs[0][0],
            ours.as_secs_f64() * 1e6,
            theirs.as_secs_f64() * 1e6,
            ours.as_secs_f64() / theirs.as_secs_f64()
        );
    }
    println!("ratio = sqil interpreter time / tract time (lower is better); one thread each.");
}
