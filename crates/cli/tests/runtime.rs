//! The CPU runtime against the exact simulation on every testdata policy and several configs:
//! the plan (int4 kernels where the layer allows, reference ops elsewhere) agrees with the
//! interpreter within `PLAN_TOL`, and an artifact written and read back runs bit-identically.

use sqil::quantize::{run_quantize, QuantizeArgs};
use sqil_passes::quant::{QuantConfig, Recipe};
use sqil_runtime::plan::Step;
use sqil_runtime::{artifact, Policy, PLAN_TOL};
use std::path::PathBuf;

fn policies() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/policies")
}

#[test]
fn plans_agree_with_the_simulation_and_artifacts_round_trip() {
    let names = [
        "bc_hopper",
        "bc_lander",
        "bc_pickplace",
        "hopper_mlp",
        "mlp",
        "bc_pickplace_transformer",
        "transformer",
        "cnn",
        "bc_pickplace_pixels",
    ];
    let configs = [
        "wbits=4,abits=8,group=64",
        "wbits=4,abits=float,group=64",
        "wbits=4,abits=4,group=channel",
        "wbits=3,abits=8,group=32",
        "wbits=2,abits=8,group=channel",
    ];
    let mut q4_layers = 0;
    for name in names {
        let model = policies().join(format!("{name}.onnx"));
        let fp = sqil::load_model(&model).unwrap();
        let inputs: Vec<PathBuf> =
            (0..fp.inputs.len()).map(|i| policies().join(format!("{name}.input{i}.npy"))).collect();
        let feeds: Vec<sqil_ir::Tensor> = inputs.iter().map(|p| sqil::npy::read(p).unwrap()).collect();
        for spec in configs {
            let mut cfg = QuantConfig::default();
            cfg.apply_settings(spec).unwrap();
            let qa = QuantizeArgs {
                recipe: Recipe::Rtn,
                config: cfg,
                calib: inputs.clone(),
                calib_states: 256,
                out: PathBuf::new(),
                ir_out: None,
                report_out: None,
                artifact_out: None,
            };
            let (sim, _, _) = run_quantize(&fp, &qa).unwrap_or_else(|e| panic!("{name} {spec}: {e}"));
            let named: std::collections::HashMap<String, sqil_ir::Tensor> =
                sim.inputs.iter().zip(&feeds).map(|(&i, t)| (sim.node(i).outputs[0].name.clone(), t.clone())).collect();
            let want = sqil_ir::interp::run(&sim, &named).unwrap();
            let pol = Policy::from_graph(&sim).unwrap();
            let got = pol.run(&feeds).unwrap_or_else(|e| panic!("{name} {spec}: {e}"));
            let (w, g) = (want[0].data.to_f32_vec(), got[0].data.to_f32_vec());
            let scale = w.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
            let err = w.iter().zip(&g).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max) / scale;
            assert!(err <= PLAN_TOL, "{name} {spec}: plan vs simulation {err:.2e} (relative to max |action|)");
            let q4 = pol.plan.steps.iter().filter(|s| matches!(s, Step::Q4Linear { .. })).count();
            eprintln!("{name:<26} {spec:<30} int4 steps {q4:>2}/{:<3} max rel diff {err:.1e}", pol.plan.steps.len());
            q4_layers += q4;
            // Artifact round trip: identical results from the stored packed weights.
            let text = sqil_ir::print_graph(&sim, &Default::default()).unwrap();
            let bytes = artifact::encode(&text, &pol.plan);
            let dir = std::env::temp_dir().join(format!("sqil-rt-{}-{name}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("policy.bin");
            artifact::save(&path, &bytes).unwrap();
            let loaded = Policy::load(&path).unwrap();
            let again = loaded.run(&feeds).unwrap();
            assert_eq!(
                again[0].data.to_f32_vec().iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                g.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{name} {spec}: artifact result differs"
            );
            // A flipped payload byte is caught by the checksum.
            let mut bad = bytes.clone();
            let last = bad.len() - 1;
            bad[last] ^= 1;
            assert!(artifact::decode(&bad, "x").unwrap_err().to_string().contains("checksum"));
            std::fs::remove_dir_all(&dir).ok();
        }
    }
    assert!(q4_layers >= 40, "only {q4_layers} layers ran on int4 kernels");
}
