//! The C firmware back end against the runtime: every MLP testdata policy x config generated,
//! compiled warning-free as C99 (`-Wall -Wextra -Werror -pedantic`), run, and compared with the
//! runtime's outputs (bit for bit where the report says the code is exact, else within
//! `C_TOL`); then the same code cross-compiled for aarch64 (NEON, and the dot-product
//! instructions) under qemu-aarch64, and for Cortex-M3 / M4 / M7 firmware under QEMU's MPS2
//! boards. Tools that are missing make the cross tests skip with a message, unless
//! `SQIL_REQUIRE_CROSS=1` (set by tools/test.sh, which installs them) makes that a failure.

use sqil_codegen::c::{emit, selftest, C_TOL};
use sqil_driver::build::selftest_vectors;
use sqil_driver::quantize::{run_quantize, QuantizeArgs};
use sqil_passes::quant::{QuantConfig, Recipe};
use sqil_runtime::Policy;
use std::path::{Path, PathBuf};
use std::process::Command;

mod common;
use common::{build_and_run, check, have, run, STRICT};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn policies() -> PathBuf {
    root().join("testdata/policies")
}

/// The quantized policy and its test states (one tensor per input file).
fn quantized(name: &str, spec: &str) -> (Policy, Vec<sqil_ir::Tensor>) {
    let model = policies().join(format!("{name}.onnx"));
    let fp = sqil_driver::load_model(&model).unwrap();
    let inputs: Vec<PathBuf> = (0..fp.inputs.len()).map(|i| policies().join(format!("{name}.input{i}.npy"))).collect();
    // Integer inputs everywhere: these tests check the int8 activation paths.
    let mut cfg = QuantConfig { raw_input: sqil_passes::quant::RawInput::Quant, ..Default::default() };
    cfg.apply_settings(spec).unwrap();
    let qa = QuantizeArgs::in_memory(Recipe::Rtn, cfg, inputs.clone(), 256);
    let (sim, _, _) = run_quantize(&fp, &qa).unwrap_or_else(|e| panic!("{name} {spec}: {e}"));
    (Policy::from_graph(&sim).unwrap(), inputs.iter().map(|p| sqil_driver::npy::read(p).unwrap()).collect())
}

/// Writes policy.c / policy.h / selftest.c for `name` x `spec` (its first `states` test states)
/// into a fresh directory.
fn generate_n(name: &str, spec: &str, tag: &str, states: usize) -> (PathBuf, bool, Vec<Vec<u32>>) {
    let (policy, inputs) = quantized(name, spec);
    let prog = emit(&policy, "policy").unwrap_or_else(|e| panic!("{name} {spec}: {e}"));
    // Integer layers of 2 and 3 bits are stored densely (the float-activation kernel reads Q4).
    for (bits, block) in [(2, "sqil_block_q2"), (3, "sqil_block_q3")] {
        let chosen = spec.contains(&format!("wbits={bits}")) && !spec.contains("abits=float");
        assert_eq!(prog.report.weight_bits.contains(&bits), chosen, "{name} {spec}: {:?}", prog.report.weight_bits);
        assert_eq!(prog.source.contains(&format!("int{bits} ({block})")), chosen, "{name} {spec}: {block}");
    }
    let (ins, want) = selftest_vectors(&policy, &inputs, states).unwrap();
    let dir =
        std::env::temp_dir().join(format!("sqil-c-{}-{tag}-{name}-{}", std::process::id(), spec.replace(',', "_")));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("policy.h"), &prog.header).unwrap();
    std::fs::write(dir.join("policy.c"), &prog.source).unwrap();
    std::fs::write(dir.join("selftest.c"), selftest("policy", &ins, &want, C_TOL).unwrap()).unwrap();
    let bits = want.iter().map(|o| o[0].iter().map(|v| v.to_bits()).collect()).collect();
    (dir, prog.report.bit_exact, bits)
}

fn generate(name: &str, spec: &str, tag: &str) -> (PathBuf, bool, Vec<Vec<u32>>) {
    generate_n(name, spec, tag, 8)
}

const POLICIES: [&str; 5] = ["bc_hopper", "bc_lander", "bc_pickplace", "hopper_mlp", "mlp"];
const CONFIGS: [&str; 5] = [
    "wbits=4,abits=8,group=64",
    "wbits=4,abits=float,group=64",
    "wbits=4,abits=4,group=channel",
    "wbits=3,abits=8,group=32",
    "wbits=2,abits=8,group=channel",
];

#[test]
fn generated_c_matches_the_runtime_on_every_mlp_policy() {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let mut exact_runs = 0;
    for name in POLICIES {
        for spec in CONFIGS {
            let (dir, exact, want) = generate(name, spec, "host");
            let what = format!("host {name} {spec}");
            check(&what, &build_and_run(&dir, &cc, &[], &[], &what), exact, &want);
            exact_runs += exact as usize;
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    // The int8-activation configs of the plain MLPs are the bit-exact ones.
    assert!(exact_runs >= 12, "only {exact_runs} bit-exact policy x config pairs");
}

/// The pixel CNN policy (84x84 image + proprioception): int4 convolutions through int8 im2col,
/// the first (3-channel) convolution and the spatial softmax in float, on the host and on aarch64
/// under QEMU. Bit for bit wherever the int4 layers decide it (the float convolution sums in
/// another order than the runtime's GEMM, so the report is not exact: C_TOL applies).
#[test]
fn generated_c_runs_the_pixel_cnn() {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let aarch64 = have("aarch64-linux-gnu-gcc") && have("qemu-aarch64");
    for spec in ["wbits=4,abits=8,group=64", "wbits=4,abits=4,group=channel"] {
        let name = "bc_pickplace_pixels";
        let (dir, exact, want) = generate_n(name, spec, "cnn", 3);
        let src = std::fs::read_to_string(dir.join("policy.c")).unwrap();
        assert!(src.contains("sqil_conv_q4q8(") && src.contains("sqil_conv_f32("), "{spec}: no int4 convolution");
        let what = format!("host {name} {spec}");
        check(&what, &build_and_run(&dir, &cc, &[], &[], &what), exact, &want);
        if aarch64 {
            let what = format!("aarch64 dotprod {name} {spec}");
            let (flags, qemu) = (["-march=armv8.2-a+dotprod", "-static"], ["qemu-aarch64", "-cpu", "max"]);
            check(&what, &build_and_run(&dir, "aarch64-linux-gnu-gcc", &flags, &qemu, &what), exact, &want);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// An int4 MatMul over `[batch, tokens, d]` (a transformer's projection): the C code runs the
/// kernels once per token, bit for bit with the runtime's batched kernel.
#[test]
fn generated_c_runs_int4_layers_over_tokens() {
    use sqil_ir::ops::UnaryOp;
    use sqil_ir::{DType, Dim, Graph, Op, Tensor, ValueType};
    let (t, d, o) = (5usize, 64usize, 24usize);
    let mut g = Graph::new("tokens");
    let x = g.add_input("x", ValueType::new(DType::F32, vec![Dim::Sym("N".into()), Dim::Known(t), Dim::Known(d)]));
    let wv: Vec<f32> = (0..d * o).map(|i| ((i * 37 % 101) as f32 / 50.0 - 1.0) * 0.3).collect();
    let w = g.add_const("w", Tensor::from_f32(vec![d, o], wv).unwrap());
    let h = g.add_inferred("proj", Op::MatMul, &[Some(x), Some(w)], "h").unwrap();
    let y = g.add_inferred("relu", Op::Unary(UnaryOp::Relu), &[Some(h)], "y").unwrap();
    g.outputs.push(y);
    let dir = std::env::temp_dir().join(format!("sqil-c-tokens-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let states: Vec<f32> = (0..8 * t * d).map(|i| ((i * 7919 % 997) as f32 / 498.5 - 1.0) * 2.0).collect();
    let input = dir.join("x.npy");
    sqil_driver::npy::write(&input, &Tensor::from_f32(vec![8, t, d], states).unwrap()).unwrap();
    // Integer inputs everywhere: these tests check the int8 activation paths.
    let mut cfg = QuantConfig { raw_input: sqil_passes::quant::RawInput::Quant, ..Default::default() };
    cfg.apply_settings("wbits=4,abits=8,group=32").unwrap();
    let (sim, _, _) = run_quantize(&g, &QuantizeArgs::in_memory(Recipe::Rtn, cfg, vec![input.clone()], 256)).unwrap();
    let policy = Policy::from_graph(&sim).unwrap();
    assert!(policy.plan.describe().iter().any(|s| s.contains("q4 x int")), "{:?}", policy.plan.describe());
    let prog = emit(&policy, "policy").unwrap();
    assert!(prog.source.contains("for (sqil_r = 0; sqil_r < 5;"), "no loop over the tokens");
    let (ins, want) = selftest_vectors(&policy, &[sqil_driver::npy::read(&input).unwrap()], 4).unwrap();
    std::fs::write(dir.join("policy.h"), &prog.header).unwrap();
    std::fs::write(dir.join("policy.c"), &prog.source).unwrap();
    std::fs::write(dir.join("selftest.c"), selftest("policy", &ins, &want, C_TOL).unwrap()).unwrap();
    let bits: Vec<Vec<u32>> = want.iter().map(|o| o[0].iter().map(|v| v.to_bits()).collect()).collect();
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let what = "host int4 MatMul over 5 tokens";
    check(what, &build_and_run(&dir, &cc, &[], &[], what), prog.report.bit_exact, &bits);
    assert!(prog.report.bit_exact);
    let _ = std::fs::remove_dir_all(&dir);
}

/// sqil's activations on its own exponential (Sigmoid, Tanh, Softplus, ELU) in C: the same double
/// operations as the runtime, so the report says bit-exact and every output is (no libm linked
/// for them). Inputs cover both branches of each definition: tiny values for the Taylor forms,
/// large ones for saturation, signed zeros.
#[test]
fn generated_c_computes_the_exp_nonpos_activations_bit_for_bit() {
    use sqil_ir::ops::UnaryOp;
    use sqil_ir::{DType, Dim, Graph, Op, Tensor, ValueType};
    let width = 24usize;
    let mut g = Graph::new("activations");
    let x = g.add_input("x", ValueType::new(DType::F32, vec![Dim::Sym("N".into()), Dim::Known(width)]));
    for (i, op) in
        [Op::Unary(UnaryOp::Sigmoid), Op::Unary(UnaryOp::Tanh), Op::Unary(UnaryOp::Softplus), Op::Elu { alpha: 0.7 }]
            .into_iter()
            .enumerate()
    {
        let y = g.add_inferred(format!("act{i}"), op, &[Some(x)], format!("y{i}")).unwrap();
        g.outputs.push(y);
    }
    let policy = Policy::from_graph(&g).unwrap();
    let prog = emit(&policy, "policy").unwrap();
    assert!(prog.report.bit_exact, "the report should say bit-exact");
    assert!(prog.source.contains("sqil_tanh") && !prog.source.contains("exp((double)"));
    let states = 8;
    let vals: Vec<f32> = (0..states * width)
        .map(|i| {
            let u = ((i * 7919 % 997) as f32 / 498.5 - 1.0) * if i % 2 == 0 { 1.0 } else { -1.0 };
            match i % 6 {
                0 => u * 1e-4,
                1 => u * 30.0,
                2 if i % 12 == 2 => -0.0,
                _ => u * 4.0,
            }
        })
        .collect();
    let dir = std::env::temp_dir().join(format!("sqil-c-activations-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let batch = Tensor::from_f32(vec![states, width], vals).unwrap();
    let (ins, want) = selftest_vectors(&policy, &[batch], states).unwrap();
    std::fs::write(dir.join("policy.h"), &prog.header).unwrap();
    std::fs::write(dir.join("policy.c"), &prog.source).unwrap();
    std::fs::write(dir.join("selftest.c"), selftest("policy", &ins, &want, C_TOL).unwrap()).unwrap();
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let what = "host Sigmoid, Tanh, Softplus, ELU";
    let out = build_and_run(&dir, &cc, &[], &[], what);
    // Every output of every state bit-identical (the selftest counts them).
    let total = states * width * 4;
    assert!(out.contains(&format!("selftest: {total}/{total} outputs bit-identical")), "{what}:\n{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The policies with convolutions, pooling, BatchNormalization and layout ops (`cnn`: Transpose,
/// MaxPool, AveragePool, GlobalAveragePool, PRelu) and the transformers (shape arithmetic folded
/// at the fixed state shape; Split, Gather, Transpose, attention's MatMul of two computed
/// operands, Softmax, LayerNorm, erf-GELU): on the host, and on aarch64 under QEMU.
#[test]
fn generated_c_runs_the_cnn_and_the_transformers() {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let aarch64 = have("aarch64-linux-gnu-gcc") && have("qemu-aarch64");
    for name in ["cnn", "transformer", "bc_pickplace_transformer", "transformer_dynamo"] {
        let spec = "wbits=4,abits=8,group=32";
        let (dir, exact, want) = generate_n(name, spec, "layout", 4);
        let what = format!("host {name} {spec}");
        check(&what, &build_and_run(&dir, &cc, &[], &[], &what), exact, &want);
        if aarch64 {
            let what = format!("aarch64 {name} {spec}");
            let (flags, qemu) = (["-march=armv8.2-a+dotprod", "-static"], ["qemu-aarch64", "-cpu", "max"]);
            check(&what, &build_and_run(&dir, "aarch64-linux-gnu-gcc", &flags, &qemu, &what), exact, &want);
        }
        // A transformer as Cortex-M7 firmware.
        if name == "bc_pickplace_transformer" && have("arm-none-eabi-gcc") && have("qemu-system-arm") {
            let out = cortex_m(&dir, "cortex-m7", &["-mfloat-abi=hard", "-mfpu=fpv5-d16"], "mps2-an500");
            check(&format!("cortex-m7 (mps2-an500) {name} {spec}"), &out, exact, &want);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn unsupported_ops_are_refused_with_the_node_named() {
    use sqil_ir::{DType, Dim, Graph, Op, ValueType};
    let mut g = Graph::new("logsoftmax");
    let x = g.add_input("x", ValueType::new(DType::F32, vec![Dim::Sym("N".into()), Dim::Known(6)]));
    let y = g.add_inferred("/head/LogSoftmax", Op::LogSoftmax { axis: -1, coerce_2d: false }, &[Some(x)], "y").unwrap();
    g.outputs.push(y);
    let err = emit(&Policy::from_graph(&g).unwrap(), "policy").unwrap_err().to_string();
    assert!(err.contains("`/head/LogSoftmax`") && err.contains("C back end"), "{err}");
}

const CROSS_CASES: [(&str, &str); 5] = [
    ("bc_hopper", "wbits=4,abits=8,group=64"),
    ("bc_lander", "wbits=4,abits=4,group=channel"),
    ("mlp", "wbits=4,abits=8,group=64"),
    ("bc_hopper", "wbits=3,abits=8,group=32"),
    ("bc_lander", "wbits=2,abits=8,group=channel"),
];

#[test]
fn aarch64_neon_and_dotprod_under_qemu() {
    if !have("aarch64-linux-gnu-gcc") || !have("qemu-aarch64") {
        return;
    }
    for (name, spec) in CROSS_CASES {
        let (dir, exact, want) = generate(name, spec, "a64");
        for (march, cpu) in [("armv8-a", "cortex-a53"), ("armv8.2-a+dotprod", "max")] {
            let what = format!("aarch64 {march} {name} {spec}");
            let march = format!("-march={march}");
            let out = build_and_run(
                &dir,
                "aarch64-linux-gnu-gcc",
                &[&march, "-static"],
                &["qemu-aarch64", "-cpu", cpu],
                &what,
            );
            check(&what, &out, exact, &want);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Builds `policy.c` + `selftest.c` as Cortex-M firmware and runs it on QEMU's MPS2 board.
fn cortex_m(dir: &Path, cpu: &str, fpu: &[&str], board: &str) -> String {
    let fw = root().join("tools/firmware");
    let elf = dir.join(format!("fw-{cpu}.elf"));
    let mut flags = vec![format!("-mcpu={cpu}"), "-mthumb".into()];
    flags.extend(fpu.iter().map(|s| s.to_string()));
    run(
        Command::new("arm-none-eabi-gcc")
            .args(&flags)
            .args(STRICT)
            .arg("-c")
            .arg(dir.join("policy.c"))
            .arg("-o")
            .arg(dir.join("policy.o")),
        "arm-none-eabi-gcc policy.c",
    );
    let size = run(Command::new("arm-none-eabi-size").arg(dir.join("policy.o")), "arm-none-eabi-size");
    eprintln!("{cpu} policy.o (text = flash, bss = RAM):\n{size}");
    run(
        Command::new("arm-none-eabi-gcc")
            .args(&flags)
            .args(["-O2", "--specs=rdimon.specs", "-T"])
            .arg(fw.join("mps2.ld"))
            .arg(fw.join("startup.c"))
            .arg(dir.join("policy.o"))
            .arg(dir.join("selftest.c"))
            .arg("-o")
            .arg(&elf)
            .arg("-lm"),
        "arm-none-eabi-gcc link",
    );
    run(
        Command::new("timeout")
            .args(["120", "qemu-system-arm", "-M", board, "-nographic", "-monitor", "none"])
            .args(["-semihosting-config", "enable=on,target=native", "-kernel"])
            .arg(&elf),
        &format!("qemu-system-arm -M {board}"),
    )
}

#[test]
fn cortex_m_firmware_under_qemu() {
    if !have("arm-none-eabi-gcc") || !have("qemu-system-arm") {
        return;
    }
    let boards: [(&str, &[&str], &str); 3] = [
        ("cortex-m3", &["-mfloat-abi=soft"], "mps2-an385"),
        ("cortex-m4", &["-mfloat-abi=hard", "-mfpu=fpv4-sp-d16"], "mps2-an386"),
        ("cortex-m7", &["-mfloat-abi=hard", "-mfpu=fpv5-d16"], "mps2-an500"),
    ];
    for (name, spec) in CROSS_CASES {
        let (dir, exact, want) = generate(name, spec, "m");
        for (cpu, fpu, board) in boards {
            let out = cortex_m(&dir, cpu, fpu, board);
            check(&format!("{cpu} ({board}) {name} {spec}"), &out, exact, &want);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
