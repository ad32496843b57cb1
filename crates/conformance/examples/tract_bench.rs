//! tract f32 as a peer in the CPU benchmark (`tools/bench_cpu.py`): times an ONNX model on
//! random inputs with tract's optimized plan, one JSON line per batch size, the same fields as
//! `sqil bench`.
//!
//! ```text
//! cargo run --release -p sqil-conformance --example tract_bench -- MODEL.onnx [--batch 1,64] [--iters 200]
//! ```

use tract_onnx::prelude::*;

fn main() -> TractResult<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let model =
        args.first().ok_or_else(|| TractError::msg("usage: tract_bench MODEL.onnx [--batch 1,64] [--iters N]"))?;
    // Input shapes as the model declares them (sqil's importer), the batch dimension replaced.
    let g = sqil_onnx::load_model(std::path::Path::new(model)).map_err(|e| TractError::msg(e.to_string()))?;
    let shapes: Vec<Vec<Option<usize>>> =
        g.inputs.iter().map(|&i| g.node(i).outputs[0].ty.shape.iter().map(|d| d.known()).collect()).collect();
    let opt = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let batches: Vec<usize> =
        opt("--batch").unwrap_or_else(|| "1,64".into()).split(',').map(|s| s.parse()).collect::<Result<_, _>>()?;
    let iters: usize = opt("--iters").unwrap_or_else(|| "200".into()).parse()?;
    for &batch in &batches {
        let mut m = tract_onnx::onnx().model_for_path(model)?;
        // Every input: its declared shape with the first (batch) dimension set.
        let mut feeds = tvec![];
        for (i, shape) in shapes.iter().enumerate() {
            let dims: Vec<usize> =
                shape.iter().enumerate().map(|(d, x)| if d == 0 { batch } else { x.unwrap_or(1) }).collect();
            m.set_input_fact(i, f32::fact(&dims).into())?;
            let n: usize = dims.iter().product();
            let v: Vec<f32> = (0..n).map(|k| ((k * 7919 % 1000) as f32 / 500.0) - 1.0).collect();
            feeds.push(tract_ndarray::ArrayD::from_shape_vec(dims, v)?.into_tvalue());
        }
        let plan = m.into_optimized()?.into_runnable()?;
        for _ in 0..(iters / 10).max(1) {
            plan.run(feeds.clone())?;
        }
        let mut times = Vec::with_capacity(iters);
        for _ in 0..iters {
            let f = feeds.clone();
            let t = std::time::Instant::now();
            plan.run(f)?;
            times.push(t.elapsed().as_secs_f64() * 1e6);
        }
        let mean = times.iter().sum::<f64>() / iters as f64;
        times.sort_by(|a, b| a.total_cmp(b));
        println!(
            "{{\"model\": {model:?}, \"engine\": \"tract\", \"batch\": {batch}, \"threads\": 1, \"mean_us\": {mean:.2}, \"p50_us\": {:.2}, \"min_us\": {:.2}, \"samples_per_s\": {:.1}}}",
            times[iters / 2],
            times[0],
            batch as f64 * 1e6 / mean
        );
    }
    Ok(())
}
