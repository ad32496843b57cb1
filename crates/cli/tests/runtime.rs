//! The CPU runtime against the exact simulation on every testdata policy and several configs:
//! the plan (int4 kernels where the layer allows, reference ops elsewhere) agrees with the
//! interpreter within `PLAN_TOL`, and an artifact written and read back runs bit-identically.

use sqil_driver::quantize::{run_quantize, QuantizeArgs};
use sqil_lower::Step;
use sqil_passes::quant::{QuantConfig, Recipe};
use sqil_runtime::Execute;
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
    let (mut q4_layers, mut q4_convs) = (0, 0);
    for name in names {
        let model = policies().join(format!("{name}.onnx"));
        let fp = sqil_driver::load_model(&model).unwrap();
        let inputs: Vec<PathBuf> =
            (0..fp.inputs.len()).map(|i| policies().join(format!("{name}.input{i}.npy"))).collect();
        let feeds: Vec<sqil_ir::Tensor> = inputs.iter().map(|p| sqil_driver::npy::read(p).unwrap()).collect();
        for spec in configs {
            // Integer inputs everywhere: these tests check the int8 activation paths.
            let mut cfg = QuantConfig { raw_input: sqil_passes::quant::RawInput::Quant, ..Default::default() };
            cfg.apply_settings(spec).unwrap();
            let qa = QuantizeArgs::in_memory(Recipe::Rtn, cfg, inputs.clone(), 256);
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
            // A convolutional policy's batch runs a few samples at a time (SAMPLE_CHUNK; the pixel
            // policy's eight states as two runs), with the same bits as the whole batch at once;
            // the others keep their batch together (batched GEMMs).
            let convolutional = matches!(name, "cnn" | "bc_pickplace_pixels");
            // Int4 steps (linear maps and convolutions) have one arithmetic definition
            // (sqil_ir::lowered) that the simulation runs too: every policy agrees bit for bit.
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&g), bits(&w), "{name} {spec}: plan vs simulation, bit for bit");
            assert_eq!(pol.plan.per_sample, convolutional, "{name} {spec}: per-sample execution");
            assert!(feeds[0].shape[0] > 1, "{name}: the test states are one sample");
            if convolutional {
                let whole = pol.plan.run_whole(&feeds, 1).unwrap();
                assert_eq!(
                    whole[0].data.to_f32_vec().iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    g.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "{name} {spec}: a few samples at a time differs from the whole batch"
                );
            }
            // A NaN in the first state's observation: the same actions are NaN as in the
            // simulation (FakeQuant keeps NaN; the int8 kernels cannot, so the plan marks them).
            let mut bad = feeds.clone();
            if let sqil_ir::tensor::Data::F32(v) = &mut bad[0].data {
                v[1] = f32::NAN;
            }
            let named_bad: std::collections::HashMap<String, sqil_ir::Tensor> =
                sim.inputs.iter().zip(&bad).map(|(&i, t)| (sim.node(i).outputs[0].name.clone(), t.clone())).collect();
            let want_bad = sqil_ir::interp::run(&sim, &named_bad).unwrap()[0].data.to_f32_vec();
            let got_bad = pol.run(&bad).unwrap()[0].data.to_f32_vec();
            let nan_mask = |v: &[f32]| v.iter().map(|x| x.is_nan()).collect::<Vec<_>>();
            assert!(want_bad.iter().any(|v| v.is_nan()), "{name} {spec}: the NaN did not reach an action");
            assert_eq!(
                nan_mask(&want_bad),
                nan_mask(&got_bad),
                "{name} {spec}: NaN actions differ from the simulation"
            );
            let q4 = pol.plan.steps.iter().filter(|s| matches!(s, Step::Q4Linear { .. })).count();
            let convs = pol.plan.steps.iter().filter(|s| matches!(s, Step::Q4Linear { conv: Some(_), .. })).count();
            // The plan comes from the fusion pass's graph: every policy has a layer with an
            // activation or bias after it, so some fused kernel runs.
            assert!(!pol.plan.kernels.is_empty(), "{name} {spec}: no fused kernel in the plan");
            eprintln!(
                "{name:<26} {spec:<30} int4 steps {q4:>2}/{:<3} (convolutions {convs}), fused kernels {} max rel diff {err:.1e}",
                pol.plan.steps.len(),
                pol.plan.kernels.len()
            );
            q4_layers += q4;
            q4_convs += convs;
            // Artifact round trip: identical results from the stored packed weights.
            let bytes = artifact::encode(&sim).unwrap().1;
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
            // The stored graph, its int4 weights put back from the packed ones, is still the exact
            // simulation: the interpreter gives the same bits as on the original graph.
            let (stored, _) = sqil_runtime::load_artifact(&path).unwrap();
            let named: std::collections::HashMap<String, sqil_ir::Tensor> = stored
                .inputs
                .iter()
                .zip(&feeds)
                .map(|(&i, t)| (stored.node(i).outputs[0].name.clone(), t.clone()))
                .collect();
            let resim = sqil_ir::interp::run(&stored, &named).unwrap();
            assert_eq!(
                resim[0].data.to_f32_vec().iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                w.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{name} {spec}: the artifact's graph no longer simulates the policy exactly"
            );
            let params: usize =
                pol.plan.steps.iter().map(|s| if let Step::Q4Linear { w, .. } = s { w.n * w.k } else { 0 }).sum();
            // Without the float copies the file is smaller than the full IR text alone by more
            // than the layers' f32 bytes (each printed weight takes over 4 characters).
            let full = sqil_ir::print_graph(&sim, &Default::default()).unwrap().len();
            assert!(
                bytes.len() + 4 * params < full,
                "{name} {spec}: artifact {} B, full IR text {full} B",
                bytes.len()
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
    assert!(q4_convs >= 8, "only {q4_convs} convolutions ran on int4 kernels");
}

/// The C ABI end to end: a C99 program (compiled `-Wall -Wextra -Werror`) loads an artifact
/// through `sqil.h` and libsqil_runtime, and its actions equal the Rust runtime's bit for bit.
#[test]
fn the_c_abi_runs_an_artifact() {
    let deps = std::env::current_exe().unwrap().parent().unwrap().to_path_buf();
    let lib = deps.join("libsqil_runtime.so");
    let cc = std::process::Command::new("cc").arg("--version").output();
    if cc.is_err() || !lib.exists() {
        eprintln!("skipping: needs a C compiler (`cc`) and {} (built with the runtime's cdylib)", lib.display());
        return;
    }
    let dir = std::env::temp_dir().join(format!("sqil-capi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fp = sqil_driver::load_model(&policies().join("bc_hopper.onnx")).unwrap();
    // Integer inputs everywhere: these tests check the int8 activation paths.
    let mut cfg = QuantConfig { raw_input: sqil_passes::quant::RawInput::Quant, ..Default::default() };
    cfg.apply_settings("wbits=4,abits=8,group=64").unwrap();
    let input = policies().join("bc_hopper.input0.npy");
    let qa = QuantizeArgs::in_memory(Recipe::Rtn, cfg, vec![input.clone()], 256);
    let (sim, _, _) = run_quantize(&fp, &qa).unwrap();
    let pol = Policy::from_graph(&sim).unwrap();
    artifact::save(&dir.join("policy.bin"), &artifact::encode(&sim).unwrap().1).unwrap();
    let obs = sqil_driver::npy::read(&input).unwrap();
    let batch = obs.shape[0];
    let want = pol.act(&obs.data.to_f32_vec(), batch).unwrap();
    let raw: Vec<u8> = obs.data.to_f32_vec().iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(dir.join("obs.f32"), raw).unwrap();
    let src = r#"#include <stdio.h>
#include <stdlib.h>
#include "sqil.h"
int main(int argc, char **argv) {
    (void)argc;
    SqilPolicy *p = sqil_policy_load(argv[1]);
    if (!p) { fprintf(stderr, "%s\n", sqil_last_error()); return 1; }
    size_t d = sqil_policy_obs_size(p), batch = (size_t)atoi(argv[3]);
    float *obs = malloc(sizeof(float) * d * batch), act[4096];
    FILE *f = fopen(argv[2], "rb");
    if (!f || fread(obs, sizeof(float), d * batch, f) != d * batch) return 2;
    fclose(f);
    int n = sqil_policy_act(p, obs, batch, act, 4096);
    if (n < 0) { fprintf(stderr, "%s\n", sqil_last_error()); return 3; }
    fwrite(act, sizeof(float), (size_t)n, stdout);
    sqil_policy_free(p);
    free(obs);
    return 0;
}
"#;
    std::fs::write(dir.join("main.c"), src).unwrap();
    let include = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../runtime/include");
    let out = std::process::Command::new("cc")
        .args(["-std=c99", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(&include)
        .arg(dir.join("main.c"))
        .arg("-L")
        .arg(&deps)
        .arg("-lsqil_runtime")
        .arg(format!("-Wl,-rpath,{}", deps.display()))
        .arg("-o")
        .arg(dir.join("main"))
        .output()
        .unwrap();
    assert!(out.status.success(), "cc: {}", String::from_utf8_lossy(&out.stderr));
    // The library the test just built: cargo's LD_LIBRARY_PATH for tests lists target/<profile>
    // too, where an older uplifted copy may sit, and it would win over the rpath.
    let run = std::process::Command::new(dir.join("main"))
        .env("LD_LIBRARY_PATH", &deps)
        .arg(dir.join("policy.bin"))
        .arg(dir.join("obs.f32"))
        .arg(batch.to_string())
        .output()
        .unwrap();
    assert!(run.status.success(), "C program: {}", String::from_utf8_lossy(&run.stderr));
    let got: Vec<f32> = run.stdout.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    assert_eq!(
        got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
    // A missing file is an error message through sqil_last_error, not a crash.
    let bad =
        std::process::Command::new(dir.join("main")).arg(dir.join("nope.bin")).arg("x").arg("1").output().unwrap();
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("nope.bin"));
    std::fs::remove_dir_all(&dir).ok();
}

/// `sqil build --target exe`: the standalone executable gives the runtime's actions bit for bit,
/// from .npy and from stdin lines, and names the bad line of malformed input.
#[test]
fn standalone_executable_runs_the_policy() {
    let dir = std::env::temp_dir().join(format!("sqil-exe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fp = sqil_driver::load_model(&policies().join("bc_lander.onnx")).unwrap();
    let input = policies().join("bc_lander.input0.npy");
    // Integer inputs everywhere: these tests check the int8 activation paths.
    let mut cfg = QuantConfig { raw_input: sqil_passes::quant::RawInput::Quant, ..Default::default() };
    cfg.apply_settings("wbits=4,abits=8,group=64").unwrap();
    let qa = QuantizeArgs::in_memory(Recipe::Rtn, cfg, vec![input.clone()], 256);
    let (sim, _, _) = run_quantize(&fp, &qa).unwrap();
    let ir = dir.join("model.sqil");
    std::fs::write(&ir, sqil_ir::print_graph(&sim, &Default::default()).unwrap()).unwrap();
    let exe = dir.join("policy_bin");
    let st = std::process::Command::new(env!("CARGO_BIN_EXE_sqil"))
        .args(["build", "--target", "exe", "--runner", env!("CARGO_BIN_EXE_sqil-policy"), "-o"])
        .arg(&exe)
        .arg(&ir)
        .output()
        .unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    let obs = sqil_driver::npy::read(&input).unwrap();
    let want = Policy::from_graph(&sim).unwrap().run(std::slice::from_ref(&obs)).unwrap()[0].data.to_f32_vec();
    // From .npy to .npy.
    let out = dir.join("actions.npy");
    let st = std::process::Command::new(&exe).arg("--input").arg(&input).arg("--output").arg(&out).output().unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    let got = sqil_driver::npy::read(&out).unwrap().data.to_f32_vec();
    assert_eq!(
        got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
    // From stdin, one state per line, to stdout lines (shortest round-trip decimals: exact).
    let d = obs.shape[1];
    let lines: String = obs
        .data
        .to_f32_vec()
        .chunks(d)
        .map(|r| r.iter().map(|v| format!("{v:?}")).collect::<Vec<_>>().join(", ") + "\n")
        .collect();
    let mut child = std::process::Command::new(&exe)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), lines.as_bytes()).unwrap();
    let res = child.wait_with_output().unwrap();
    assert!(res.status.success());
    let printed: Vec<f32> =
        String::from_utf8(res.stdout).unwrap().split_whitespace().map(|s| s.parse().unwrap()).collect();
    assert_eq!(
        printed.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
    // A short line is refused with its number.
    let mut child = std::process::Command::new(&exe)
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::io::Write::write_all(
        child.stdin.as_mut().unwrap(),
        format!("{}1 2 3\n", &lines[..lines.find('\n').unwrap() + 1]).as_bytes(),
    )
    .unwrap();
    let res = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success() && err.contains("line 2") && err.contains("3 numbers"), "{err}");
    // An installed sqil alone (no sqil-policy beside it, no build folder) builds the same
    // executable from itself: the copy runs the policy, bit for bit, not the compiler.
    let alone = dir.join("bin");
    std::fs::create_dir_all(&alone).unwrap();
    let sqil = alone.join("sqil");
    std::fs::copy(env!("CARGO_BIN_EXE_sqil"), &sqil).unwrap();
    let exe2 = dir.join("policy_bin2");
    let st = std::process::Command::new(&sqil)
        .args(["build", "--target", "exe", "-o"])
        .arg(&exe2)
        .arg(&ir)
        .output()
        .unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    assert!(String::from_utf8_lossy(&st.stdout).contains(&sqil.display().to_string()), "says which runner it copied");
    std::fs::remove_file(&sqil).unwrap();
    let out2 = dir.join("actions2.npy");
    let st = std::process::Command::new(&exe2).arg("--input").arg(&input).arg("--output").arg(&out2).output().unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    let got = sqil_driver::npy::read(&out2).unwrap().data.to_f32_vec();
    assert_eq!(
        got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
    let st = std::process::Command::new(&exe2).arg("--info").output().unwrap();
    assert!(st.status.success() && String::from_utf8_lossy(&st.stdout).contains("inputs:"));
    // A runner that already carries a policy is refused.
    let st = std::process::Command::new(env!("CARGO_BIN_EXE_sqil"))
        .args(["build", "--target", "exe", "--runner"])
        .arg(&exe2)
        .arg("-o")
        .arg(dir.join("policy_bin3"))
        .arg(&ir)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&st.stderr).contains("already carries a policy"));
    std::fs::remove_dir_all(&dir).ok();
}

/// Per-sample execution is decided from the graph: a convolutional policy qualifies; the same
/// policy with an op that mixes samples (a softmax over the batch axis) or without a symbolic
/// batch does not, and neither does a policy without convolutions.
#[test]
fn per_sample_execution_needs_independent_samples() {
    use sqil_ir::ops::Op;
    let cnn = sqil_driver::load_model(&policies().join("cnn.onnx")).unwrap();
    assert!(sqil_lower::per_sample(&cnn));
    let mut mixed = cnn.clone();
    let y = mixed.outputs[0];
    let s = mixed.add_inferred("mix", Op::Softmax { axis: 0, coerce_2d: false }, &[Some(y)], "mixed").unwrap();
    mixed.outputs = vec![s];
    assert!(!sqil_lower::per_sample(&mixed), "a softmax over the batch axis");
    // Gathering each sample's values by every sample's indices: [batch, batch, 4].
    let mut paired = cnn.clone();
    let idx =
        paired.add_inferred("idx", Op::Cast { to: sqil_ir::DType::I64, saturate: false }, &[Some(y)], "idx").unwrap();
    let gathered = paired.add_inferred("pairs", Op::Gather { axis: 1 }, &[Some(y), Some(idx)], "pairs").unwrap();
    let batch = paired.value(y).ty.shape[0].clone();
    assert_eq!(paired.value(gathered).ty.shape[..2], [batch.clone(), batch]);
    paired.outputs = vec![gathered];
    assert!(!sqil_lower::per_sample(&paired), "a value with the batch twice");
    let mut same_axis_ok = cnn.clone();
    let s = same_axis_ok.add_inferred("rows", Op::Softmax { axis: -1, coerce_2d: false }, &[Some(y)], "rows").unwrap();
    same_axis_ok.outputs = vec![s];
    assert!(sqil_lower::per_sample(&same_axis_ok), "a softmax over the last axis");
    let mut fixed = cnn.clone();
    for &i in &fixed.inputs.clone() {
        let shape = &mut fixed.node_mut(i).outputs[0].ty.shape;
        shape[0] = sqil_ir::Dim::Known(4);
    }
    assert!(!sqil_lower::per_sample(&fixed), "no symbolic batch");
    assert!(!sqil_lower::per_sample(&sqil_driver::load_model(&policies().join("bc_hopper.onnx")).unwrap()));
}

/// A transformer over a sequence of tokens (every MatMul over 16 rows per sample, a reduction
/// over the token axis) runs its batch a few samples at a time (five: a run of four, then one),
/// with the bits of the whole batch at once; with a head over one row per sample (an MLP's GEMM)
/// it keeps its batch together.
#[test]
fn token_sequences_run_sample_by_sample() {
    let vals = |n: usize, k: usize| {
        (0..n).map(|i| format!("{:.3}", ((i * 7 + k) % 11) as f32 / 11.0 - 0.45)).collect::<Vec<_>>().join(",")
    };
    let text = |head: bool| {
        let tail = if head {
            "  %p = ReduceMean[keepdims=0](%h, %ax) : f32[N,8]\n  %y = MatMul(%p, %w2) : f32[N,4]\n"
        } else {
            "  %o = MatMul(%h, %w2) : f32[N,16,4]\n  %y = ReduceMean[keepdims=1](%o, %ax) : f32[N,1,4]\n"
        };
        format!(
            "graph \"g\" (%x: f32[N,16,8]) -> (%y) {{\n\
             \x20 %w = Const[value=f32[8,8]{{{}}}] : f32[8,8]\n\
             \x20 %w2 = Const[value=f32[8,4]{{{}}}] : f32[8,4]\n\
             \x20 %ax = Const[value=i64[1]{{1}}] : i64[1]\n\
             \x20 %q = MatMul(%x, %w) : f32[N,16,8]\n\
             \x20 %s = Softmax[axis=-1](%q) : f32[N,16,8]\n\
             \x20 %ln = Const[value=f32[8]{{{}}}] : f32[8]\n\
             \x20 %h = LayerNormalization[axis=-1](%s, %ln) : f32[N,16,8]\n{tail}}}\n",
            vals(64, 1),
            vals(32, 2),
            vals(8, 3)
        )
    };
    let tokens = sqil_ir::parse_graph(&text(false)).unwrap();
    assert!(sqil_lower::per_sample(&tokens), "linear maps over 16 tokens per sample");
    let headed = sqil_ir::parse_graph(&text(true)).unwrap();
    assert!(!sqil_lower::per_sample(&headed), "a head over one row per sample");
    let x = sqil_ir::Tensor::from_f32(
        vec![5, 16, 8],
        (0..5 * 16 * 8).map(|i| ((i * 13) % 29) as f32 / 7.0 - 2.0).collect(),
    )
    .unwrap();
    let pol = Policy::from_graph(&tokens).unwrap();
    assert!(pol.plan.per_sample);
    let bits = |t: &sqil_ir::Tensor| t.data.to_f32_vec().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    let (one, whole) =
        (pol.run(std::slice::from_ref(&x)).unwrap(), pol.plan.run_whole(std::slice::from_ref(&x), 1).unwrap());
    assert_eq!(one[0].shape, vec![5, 1, 4]);
    const { assert!(5 > sqil_runtime::exec::SAMPLE_CHUNK, "the batch of five runs in more than one part") };
    assert_eq!(bits(&one[0]), bits(&whole[0]), "a few samples at a time vs the whole batch");
}

/// A float16 policy (tools/make_half_policies.py) runs on the interpreter in float16 within two
/// float16 units (at the largest action's magnitude: both round every op's result to float16, and
/// accumulate differently) of onnxruntime's float16 outputs; its artifact (`sqil quantize --artifact`,
/// computed in f32) takes float16 states as their exact f32 values, and refuses an integer array
/// naming the input; `sqil bench` times the float16 model.
#[test]
fn half_precision_policies_and_inputs() {
    use sqil_ir::DType;
    let dir = std::env::temp_dir().join(format!("sqil-half-run-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sqil = |args: &[&std::ffi::OsStr]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_sqil")).args(args).output().expect("run sqil")
    };
    let model = policies().join("bc_hopper_f16.onnx");
    let x16 = policies().join("bc_hopper_f16.input0.npy");
    let y = dir.join("y.npy");
    let o = sqil(&["run".as_ref(), model.as_ref(), "--input".as_ref(), x16.as_ref(), "--output".as_ref(), y.as_ref()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (got, want) = (
        sqil_driver::npy::read(&y).unwrap(),
        sqil_driver::npy::read(&policies().join("bc_hopper_f16.ort0.npy")).unwrap(),
    );
    assert_eq!((got.dtype(), &got.shape), (DType::F16, &want.shape));
    let want = want.data.to_f32_vec();
    let ulp = sqil_data::half::f16::EPSILON.to_f32() * want.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (a, b) in got.data.to_f32_vec().iter().zip(want) {
        assert!((a - b).abs() <= 2.0 * ulp, "interpreter {a} vs onnxruntime {b} (float16 unit {ulp})");
    }
    // The artifact of the float16 model: float16 states as their f32 values.
    let (q, art) = (dir.join("q.onnx"), dir.join("q.bin"));
    let o = sqil(&[
        "quantize".as_ref(),
        model.as_ref(),
        "--recipe".as_ref(),
        "rtn".as_ref(),
        "--calib".as_ref(),
        x16.as_ref(),
        "-o".as_ref(),
        q.as_ref(),
        "--artifact".as_ref(),
        art.as_ref(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let policy = Policy::load(&art).unwrap();
    let x = sqil_driver::npy::read(&x16).unwrap();
    assert_eq!(x.dtype(), DType::F16);
    let a = policy.run(std::slice::from_ref(&x)).unwrap();
    let b = policy.run(&[x.cast(DType::F32)]).unwrap();
    assert_eq!(a[0].data, b[0].data, "float16 states act otherwise than their f32 values");
    let e = policy.run(&[x.cast(DType::I64)]).unwrap_err().to_string();
    assert!(e.contains("input `obs`") && e.contains("expects f32") && e.contains("i64"), "{e}");
    // `sqil bench` feeds each input its own element type (float16 here).
    let o =
        sqil(&["bench".as_ref(), model.as_ref(), "--batch".as_ref(), "2".as_ref(), "--iters".as_ref(), "3".as_ref()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::remove_dir_all(&dir).ok();
}
