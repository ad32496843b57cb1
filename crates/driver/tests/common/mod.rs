//! Helpers the back-end tests share: strict C builds, the self-test's output parsed and checked,
//! cross tools found (or required, with `SQIL_REQUIRE_CROSS=1`); the testdata folder and the GPU
//! (or the reason a GPU test skips).
#![allow(dead_code)]

use sqil_codegen::c::C_TOL;
use sqil_ir::ops::{AutoPad, ConvAttrs, UnaryOp};
use sqil_ir::testing::Rng;
use sqil_ir::{DType, Dim, Graph, Op, ValueType};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The testdata policies: beside the crate where it was built, else `testdata/policies` under the
/// working directory (a test binary carried to another machine runs from the repository root).
pub fn testdata_policies() -> PathBuf {
    let built = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/policies");
    if built.exists() {
        built
    } else {
        PathBuf::from("testdata/policies")
    }
}

/// The first GPU, or `None` after printing why `what` skips (`SQIL_REQUIRE_GPU=1`: a missing GPU
/// fails the test instead, for the device run).
pub fn gpu_or_skip(what: &str) -> Option<sqil_cuda::Gpu> {
    match sqil_cuda::Gpu::new() {
        Ok(g) => Some(g),
        Err(e) => {
            assert!(std::env::var("SQIL_REQUIRE_GPU").as_deref() != Ok("1"), "no GPU and SQIL_REQUIRE_GPU=1: {e}");
            eprintln!("skipping {what}: {e}");
            None
        }
    }
}

/// Parses the self-test's `out S J BITS` lines into per-state output bits.
pub fn parse(stdout: &str) -> Vec<Vec<u32>> {
    let mut rows: Vec<Vec<u32>> = vec![];
    for l in stdout.lines().filter(|l| l.starts_with("out ")) {
        let f: Vec<&str> = l.split_whitespace().collect();
        let s: usize = f[1].parse().unwrap();
        if rows.len() <= s {
            rows.resize(s + 1, vec![]);
        }
        rows[s].push(u32::from_str_radix(f[3], 16).unwrap());
    }
    rows
}

/// Checks a self-test run: bit for bit if `exact`, else within C_TOL of the largest |output|.
pub fn check(what: &str, stdout: &str, exact: bool, want: &[Vec<u32>]) {
    let got = parse(stdout);
    assert_eq!(got.len(), want.len(), "{what}: {} states printed, {} expected\n{stdout}", got.len(), want.len());
    let f = |b: u32| f32::from_bits(b);
    let scale = want.iter().flatten().fold(1e-6f32, |m, &b| m.max(f(b).abs()));
    let (mut same, mut total, mut worst) = (0, 0, 0f32);
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g.len(), w.len(), "{what}: output size");
        for (&a, &b) in g.iter().zip(w) {
            same += (a == b) as usize;
            total += 1;
            worst = worst.max((f(a) - f(b)).abs() / scale);
        }
    }
    eprintln!("{what:<60} {same:>3}/{total:<3} bit-identical, max rel diff {worst:.1e}");
    if exact {
        assert_eq!(same, total, "{what}: the report says bit-exact, {same}/{total} outputs are");
    }
    assert!(worst <= C_TOL, "{what}: {worst:.2e} > C_TOL");
    assert!(stdout.contains("selftest: "), "{what}: no summary line");
}

pub fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{what}: {}\n{text}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    text
}

pub const STRICT: [&str; 8] =
    ["-std=c99", "-pedantic", "-O2", "-Wall", "-Wextra", "-Werror", "-Wshadow", "-Wconversion"];

/// Compiles `dir`'s policy.c + selftest.c with `compiler` (strict flags plus `flags`) and runs the
/// program, through `runner` if given; returns its output.
pub fn build_and_run(dir: &Path, compiler: &str, flags: &[&str], runner: &[&str], what: &str) -> String {
    let exe = dir.join(format!("selftest-{}", what.replace([' ', '/', ',', '='], "_")));
    run(
        Command::new(compiler)
            .args(STRICT)
            .args(flags)
            .arg(dir.join("policy.c"))
            .arg(dir.join("selftest.c"))
            .arg("-o")
            .arg(&exe)
            .arg("-lm"),
        &format!("{what}: {compiler}"),
    );
    match runner.split_first() {
        Some((r, args)) => run(Command::new(r).args(args).arg(&exe), &format!("{what}: {r}")),
        None => run(&mut Command::new(&exe), &format!("{what}: selftest")),
    }
}

pub fn have(tool: &str) -> bool {
    let ok = Command::new(tool).arg("--version").output().is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var("SQIL_REQUIRE_CROSS").as_deref() != Ok("1"),
            "{tool} is missing and SQIL_REQUIRE_CROSS=1"
        );
        eprintln!("skipping: {tool} not found (apt-get install gcc-arm-none-eabi libnewlib-arm-none-eabi gcc-aarch64-linux-gnu qemu-user qemu-system-arm)");
    }
    ok
}

/// The batch dimension of the generated graphs.
pub fn batch() -> Dim {
    Dim::Sym("N".into())
}

pub fn conv_attrs(k: i64, stride: i64, pad: i64) -> Op {
    Op::Conv(ConvAttrs {
        auto_pad: AutoPad::NotSet,
        dilations: vec![1, 1],
        group: 1,
        kernel_shape: vec![k, k],
        pads: vec![pad; 4],
        strides: vec![stride, stride],
        output_padding: vec![],
        output_shape: vec![],
    })
}

/// [N, c, s, s] -> Conv 3x3 to 40 + ReLU -> Conv 1x1 to 36 + ReLU -> Conv 3x3 stride 2 to 32 +
/// ReLU -> Flatten -> Gemm 6. 40 and 36 channels are not whole groups of 32 or 64: the 1 x 1
/// layer's last group is short, the 3 x 3 layer's runs are padded to whole groups.
pub fn cnn(r: &mut Rng, c: usize, s: usize) -> Graph {
    let mut g = Graph::new("cnn");
    let x = g.add_input("x", ValueType::new(DType::F32, vec![batch(), Dim::Known(c), Dim::Known(s), Dim::Known(s)]));
    let (w1, b1) = (g.add_const("w1", r.tensor(vec![40, c, 3, 3], 0.3)), g.add_const("b1", r.tensor(vec![40], 0.1)));
    let h = g.add_inferred("conv1", conv_attrs(3, 1, 1), &[Some(x), Some(w1), Some(b1)], "h1").unwrap();
    let h = g.add_inferred("relu1", Op::Unary(UnaryOp::Relu), &[Some(h)], "a1").unwrap();
    let (w, b) = (g.add_const("w1b", r.tensor(vec![36, 40, 1, 1], 0.2)), g.add_const("b1b", r.tensor(vec![36], 0.1)));
    let h = g.add_inferred("conv1b", conv_attrs(1, 1, 0), &[Some(h), Some(w), Some(b)], "h1b").unwrap();
    let h = g.add_inferred("relu1b", Op::Unary(UnaryOp::Relu), &[Some(h)], "a1b").unwrap();
    let (w2, b2) = (g.add_const("w2", r.tensor(vec![32, 36, 3, 3], 0.1)), g.add_const("b2", r.tensor(vec![32], 0.1)));
    let h = g.add_inferred("conv2", conv_attrs(3, 2, 1), &[Some(h), Some(w2), Some(b2)], "h2").unwrap();
    let h = g.add_inferred("relu2", Op::Unary(UnaryOp::Relu), &[Some(h)], "a2").unwrap();
    let f = g.add_inferred("flat", Op::Flatten { axis: 1 }, &[Some(h)], "f").unwrap();
    let k = 32 * s.div_ceil(2) * s.div_ceil(2);
    let (w3, b3) = (g.add_const("w3", r.tensor(vec![6, k], 0.05)), g.add_const("b3", r.tensor(vec![6], 0.1)));
    let gemm = Op::Gemm { alpha: 1.0, beta: 1.0, trans_a: false, trans_b: true };
    let y = g.add_inferred("head", gemm, &[Some(f), Some(w3), Some(b3)], "y").unwrap();
    g.outputs.push(y);
    g
}

/// A 1-D policy with the ops of a diffusion U-Net and a transformer head: [N, c, len] -> Conv1d 5
/// to 16 + Tanh -> Conv1d 3 to 12 + ReLU -> ConvTranspose1d 4 / 2 to 6 -> MaxPool1d 2, then two
/// outputs: ReduceMean over positions ([N, 6]) and a Gemm head on the flattened pool ([N, 3]).
pub fn conv1d(r: &mut Rng, c: usize, len: usize) -> Graph {
    let attrs = |k: i64, stride: i64, pad: i64| ConvAttrs {
        auto_pad: AutoPad::NotSet,
        dilations: vec![1],
        group: 1,
        kernel_shape: vec![k],
        pads: vec![pad; 2],
        strides: vec![stride],
        output_padding: vec![],
        output_shape: vec![],
    };
    let mut g = Graph::new("conv1d");
    let x = g.add_input("x", ValueType::new(DType::F32, vec![batch(), Dim::Known(c), Dim::Known(len)]));
    let (w, b) = (g.add_const("w1", r.tensor(vec![16, c, 5], 0.3)), g.add_const("b1", r.tensor(vec![16], 0.1)));
    let h = g.add_inferred("conv1", Op::Conv(attrs(5, 1, 2)), &[Some(x), Some(w), Some(b)], "h1").unwrap();
    let h = g.add_inferred("tanh1", Op::Unary(UnaryOp::Tanh), &[Some(h)], "a1").unwrap();
    let (w, b) = (g.add_const("w2", r.tensor(vec![12, 16, 3], 0.3)), g.add_const("b2", r.tensor(vec![12], 0.1)));
    let h = g.add_inferred("conv2", Op::Conv(attrs(3, 1, 1)), &[Some(h), Some(w), Some(b)], "h2").unwrap();
    let h = g.add_inferred("relu2", Op::Unary(UnaryOp::Relu), &[Some(h)], "a2").unwrap();
    let (w, b) = (g.add_const("w3", r.tensor(vec![12, 6, 4], 0.3)), g.add_const("b3", r.tensor(vec![6], 0.1)));
    let h = g.add_inferred("up", Op::ConvTranspose(attrs(4, 2, 1)), &[Some(h), Some(w), Some(b)], "h3").unwrap();
    let pool = sqil_ir::ops::PoolAttrs {
        auto_pad: AutoPad::NotSet,
        ceil_mode: false,
        count_include_pad: false,
        dilations: vec![],
        kernel_shape: vec![2],
        pads: vec![],
        strides: vec![2],
        storage_order: 0,
    };
    let h = g.add_inferred("pool", Op::MaxPool(pool), &[Some(h)], "p").unwrap();
    let axes = g.add_const("axes", sqil_ir::Tensor::from_i64(vec![1], vec![2]).unwrap());
    let mean = Op::Reduce { op: sqil_ir::ops::ReduceOp::Mean, keepdims: false, noop_with_empty_axes: false };
    let m = g.add_inferred("mean", mean, &[Some(h), Some(axes)], "m").unwrap();
    let f = g.add_inferred("flat", Op::Flatten { axis: 1 }, &[Some(h)], "f").unwrap();
    let k = 6 * len;
    let (w, b) = (g.add_const("w4", r.tensor(vec![3, k], 0.05)), g.add_const("b4", r.tensor(vec![3], 0.1)));
    let gemm = Op::Gemm { alpha: 1.0, beta: 1.0, trans_a: false, trans_b: true };
    let y = g.add_inferred("head", gemm, &[Some(f), Some(w), Some(b)], "y").unwrap();
    g.outputs.push(m);
    g.outputs.push(y);
    g
}

/// A token-wise MLP (a transformer's projections and feed-forward layers): [N, t, 12] -> MatMul
/// to 50 + Tanh -> to 40 + ReLU -> to 520 + Tanh -> to 64, every layer over the t tokens. After
/// the float first layer the int4 layers read 50 terms (a short last group), 40 (a short last
/// group, outputs not a multiple of 32) and 520 (the wide layer, its levels computed once).
pub fn tokens(r: &mut Rng, t: usize) -> Graph {
    let dims =
        [(12, 50, Some(UnaryOp::Tanh)), (50, 40, Some(UnaryOp::Relu)), (40, 520, Some(UnaryOp::Tanh)), (520, 64, None)];
    dense_stack(r, "tokens", vec![batch(), Dim::Known(t), Dim::Known(12)], &dims)
}

/// A stack of dense layers (MatMul, bias Add, then the activation where given) from input `x` of
/// `shape` (its last axis the first layer's k), as `(k, n, activation)` per layer.
pub fn dense_stack(r: &mut Rng, name: &str, shape: Vec<Dim>, dims: &[(usize, usize, Option<UnaryOp>)]) -> Graph {
    let mut g = Graph::new(name);
    let mut h = g.add_input("x", ValueType::new(DType::F32, shape));
    for (i, &(k, n, act)) in dims.iter().enumerate() {
        let w = g.add_const(format!("w{i}"), r.tensor(vec![k, n], 1.0 / (k as f32).sqrt()));
        let b = g.add_const(format!("b{i}"), r.tensor(vec![n], 0.2));
        h = g.add_inferred(format!("mm{i}"), Op::MatMul, &[Some(h), Some(w)], format!("m{i}")).unwrap();
        h = g
            .add_inferred(
                format!("add{i}"),
                Op::Binary(sqil_ir::ops::BinaryOp::Add),
                &[Some(h), Some(b)],
                format!("h{i}"),
            )
            .unwrap();
        if let Some(a) = act {
            h = g.add_inferred(format!("act{i}"), Op::Unary(a), &[Some(h)], format!("a{i}")).unwrap();
        }
    }
    g.outputs.push(h);
    g
}

/// Calibration feeds of a graph whose one input is `x`: a tensor of `shape` (its first axis the
/// states) of `r.unit()` values, drawn in order.
pub fn x_feeds(r: &mut Rng, shape: Vec<usize>) -> Vec<std::collections::HashMap<String, sqil_ir::Tensor>> {
    let v: Vec<f32> = (0..shape.iter().product()).map(|_| r.unit()).collect();
    vec![std::collections::HashMap::from([("x".to_string(), sqil_ir::Tensor::from_f32(shape, v).unwrap())])]
}

/// Testdata policy `name` quantized by RTN with `settings`, calibrated on its sample inputs
/// (`name.input{i}.npy`), as a runtime policy, and those inputs (f32).
pub fn testdata_rtn(name: &str, settings: &str) -> (sqil_runtime::Policy, Vec<sqil_ir::Tensor>) {
    let dir = testdata_policies();
    let fp = sqil_driver::load_model(&dir.join(format!("{name}.onnx"))).unwrap();
    let calib: Vec<PathBuf> = (0..fp.inputs.len()).map(|i| dir.join(format!("{name}.input{i}.npy"))).collect();
    let mut config = sqil_passes::quant::QuantConfig::default();
    config.apply_settings(settings).unwrap();
    let qa = sqil_driver::quantize::QuantizeArgs::in_memory(sqil_passes::quant::Recipe::Rtn, config, calib.clone(), 64);
    let p = sqil_runtime::Policy::from_graph(&sqil_driver::quantize::run_quantize(&fp, &qa).unwrap().0).unwrap();
    let inputs = calib.iter().map(|f| sqil_driver::npy::read(f).unwrap().cast(DType::F32)).collect();
    (p, inputs)
}

/// Row `r` of each of a policy's inputs (`sizes`: each input's values per row), in input order.
pub fn input_row(inputs: &[sqil_ir::Tensor], sizes: &[usize], r: usize) -> Vec<Vec<f32>> {
    inputs.iter().zip(sizes).map(|(t, &d)| t.data.to_f32_vec()[r * d..(r + 1) * d].to_vec()).collect()
}

/// Graph `g` quantized by RTN with `settings`, calibrated on `feeds`, as a runtime policy.
pub fn rtn(
    g: &Graph,
    settings: &str,
    feeds: &[std::collections::HashMap<String, sqil_ir::Tensor>],
) -> sqil_runtime::Policy {
    let mut cfg = sqil_passes::quant::QuantConfig::default();
    cfg.apply_settings(settings).unwrap();
    let (sim, _) = sqil_passes::quant::quantize(g, &cfg, sqil_passes::quant::Recipe::Rtn, feeds).unwrap();
    sqil_runtime::Policy::from_graph(&sim).unwrap()
}

/// A watchdog for a test that could hang (a launch waiting behind a running program): unless
/// something is sent on the returned channel (or it is dropped) within `secs`, the process exits
/// with a line naming `what`.
pub fn watchdog(what: &'static str, secs: u64) -> std::sync::mpsc::Sender<()> {
    let (done, wait) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = wait.recv_timeout(std::time::Duration::from_secs(secs))
        {
            eprintln!("{what}: no answer in {secs} s (a launch waits behind a program)");
            std::process::exit(101);
        }
    });
    done
}
