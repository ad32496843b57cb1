//! Whole policies on the GPU (`sqil_cuda::policy::GpuPolicy`): every testdata policy, quantized
//! W4A8 and W4A16, run per state by each path the policy has (one launch per step; the captured
//! graph with its copies; the persistent program, one kernel for the whole step list, launched
//! once and fed through host memory) gives the same
//! bits on every path, within `GPU_TOL` of the CPU runtime (bit for bit where the plan has no
//! reduction in another order). Skipped with a reason without a GPU; `SQIL_REQUIRE_GPU=1` makes
//! a missing GPU a failure, for the device check.

use sqil_cuda::policy::{GpuPolicy, Mode, GPU_TOL};
use sqil_driver::quantize::{run_quantize, QuantizeArgs};
use sqil_passes::quant::{QuantConfig, Recipe};
use sqil_runtime::Policy;
use std::path::PathBuf;

mod common;
use common::testdata_policies as policies;

fn quantized(name: &str, settings: &str) -> (Policy, Vec<sqil_ir::Tensor>) {
    let fp = sqil_driver::load_model(&policies().join(format!("{name}.onnx"))).unwrap();
    let calib: Vec<PathBuf> = (0..fp.inputs.len()).map(|i| policies().join(format!("{name}.input{i}.npy"))).collect();
    let mut config = QuantConfig::default();
    config.apply_settings(settings).unwrap();
    let qa = QuantizeArgs::in_memory(Recipe::Rtn, config, calib.clone(), 64);
    let p = Policy::from_graph(&run_quantize(&fp, &qa).unwrap().0).unwrap();
    let inputs = calib.iter().map(|f| sqil_driver::npy::read(f).unwrap().cast(sqil_ir::DType::F32)).collect();
    (p, inputs)
}

#[test]
fn every_path_computes_the_same_bits() {
    let Some(gpu) = common::gpu_or_skip("the GPU policy paths") else { return };
    for name in [
        "bc_hopper",
        "bc_lander",
        "bc_pickplace",
        "hopper_mlp",
        "humanoid_mlp",
        "mlp",
        "transformer",
        "bc_pickplace_transformer",
        "cnn",
        "bc_pickplace_pixels",
    ] {
        for settings in ["wbits=4,abits=8,group=32", "wbits=4,abits=float,group=32"] {
            let (p, inputs) = quantized(name, settings);
            let mut g = GpuPolicy::new(&gpu, &p).unwrap_or_else(|e| panic!("{name} {settings}: {e}"));
            let sizes = p.input_sizes();
            let rows = inputs.iter().zip(&sizes).map(|(t, d)| t.len() / d).min().unwrap().min(8);
            let (mut states, mut cpu) = (vec![], vec![]);
            for r in 0..rows {
                let per: Vec<Vec<f32>> =
                    inputs.iter().zip(&sizes).map(|(t, &d)| t.data.to_f32_vec()[r * d..(r + 1) * d].to_vec()).collect();
                let feeds: Vec<sqil_ir::Tensor> = per
                    .iter()
                    .zip(&inputs)
                    .map(|(v, t)| {
                        let mut shape = t.shape.clone();
                        shape[0] = 1;
                        sqil_ir::Tensor::from_f32(shape, v.clone()).unwrap()
                    })
                    .collect();
                cpu.push(p.run(&feeds).unwrap().remove(0).data.to_f32_vec());
                states.push(per.concat());
            }
            let run = |g: &mut GpuPolicy| -> Vec<Vec<f32>> {
                states.iter().map(|s| g.act(&gpu, s).unwrap_or_else(|e| panic!("{name}: {e}"))).collect()
            };
            let steps = run(&mut g);
            g.capture(&gpu).unwrap();
            let chosen = g.mode();
            g.set_mode(Mode::Graph).unwrap();
            assert_eq!(run(&mut g), steps, "{name} {settings}: graph replay differs from launches");
            assert!(g.has_persistent(), "{name} {settings}: {:?}", g.persist_why_not);
            g.set_mode(Mode::Persistent).unwrap();
            assert_eq!(run(&mut g), steps, "{name} {settings}: the persistent program differs from launches");
            // Over the other barrier (one cluster / the grid barrier) where the device has both.
            let (_, cluster) = g.persistent_grid().unwrap();
            if g.set_persistent_cluster(!cluster).is_ok() {
                assert_eq!(run(&mut g), steps, "{name} {settings}: the program with cluster={}", !cluster);
                g.set_persistent_cluster(cluster).unwrap();
            }
            // A bad observation is refused and leaves the program serving; stopping (another
            // path) and starting again gives the same bits.
            assert!(g.act(&gpu, &[0.0; 1]).is_err());
            assert_eq!(run(&mut g)[0], steps[0]);
            g.set_mode(Mode::Steps).unwrap();
            assert_eq!(run(&mut g), steps, "{name} {settings}: launches after the persistent program");
            g.set_mode(Mode::Persistent).unwrap();
            assert_eq!(run(&mut g), steps, "{name} {settings}: the restarted persistent program");
            g.set_mode(chosen).unwrap();
            let (mut worst, mut scale) = (0f32, 1e-6f32);
            for (r, got) in steps.iter().enumerate() {
                let want = &cpu[r];
                assert_eq!(got.len(), want.len(), "{name}");
                for (a, b) in got.iter().zip(want) {
                    scale = scale.max(b.abs());
                    worst = worst.max((a - b).abs());
                }
            }
            assert!(worst / scale <= GPU_TOL, "{name} {settings}: {} from the CPU", worst / scale);
            eprintln!(
                "{name} {settings}: {rows} states, chosen {chosen:?} {:?}, {:.1e} from the CPU",
                g.persistent_grid(),
                worst / scale
            );
        }
    }
}
