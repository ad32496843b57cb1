//! One arithmetic definition per lowered step, checked differentially: random graphs of three
//! families (MLPs with Gemm and MatMul + Add layers, CNNs with int4 convolutions, attention
//! blocks with Softmax and LayerNorm) x quantization configs (W2/W3/W4/W8; A4/A8/float;
//! per tensor, per channel, groups; raw observations quantized, in float or per-feature scaled)
//! x seeds x inputs (random, and on the input quantizer's rounding boundaries `x / s = m + 0.5`).
//!
//! - The simulation (the reference interpreter on the FakeQuant graph) and the CPU plan agree
//!   bit for bit on every output, with one and two threads, over a batch and one sample at a
//!   time: zero differing values in every run.
//! - The generated C (x86 here; aarch64 NEON + dot product under qemu-aarch64) agrees bit for bit
//!   on every output of every program. Its report promises it (by construction: int4 steps, the
//!   float GEMM / convolution chains, the weight-only kernel's lanes) for every program without
//!   libm functions, and every plan whose linear maps are all int4 steps must be such a program;
//!   programs with libm (Softmax's exp, erf) are checked bit for bit all the same.

use sqil_codegen::c::{emit, selftest, C_TOL};
use sqil_driver::build::selftest_vectors;
use sqil_ir::ops::{BinaryOp, UnaryOp};
use sqil_ir::testing::Rng;
use sqil_ir::{DType, Dim, Graph, Op, Tensor, ValueRef, ValueType};
use sqil_lower::Step;
use sqil_passes::quant::{quantize, QuantConfig, Recipe};
use sqil_runtime::{Execute, Policy, AHEAD, FUSED, IN_PASS};
use std::collections::HashMap;

mod common;
use common::{batch, build_and_run, check, cnn, conv_attrs, have};

/// k -> 64 (Gemm, ReLU) -> 48 (MatMul + Add, ReLU) -> 5 (Gemm).
fn mlp(r: &mut Rng, k: usize) -> Graph {
    let mut g = Graph::new("mlp");
    let x = g.add_input("x", ValueType::new(DType::F32, vec![batch(), Dim::Known(k)]));
    let gemm = Op::Gemm { alpha: 1.0, beta: 1.0, trans_a: false, trans_b: true };
    let (w1, b1) = (g.add_const("w1", r.tensor(vec![64, k], 0.4)), g.add_const("b1", r.tensor(vec![64], 0.1)));
    let h = g.add_inferred("fc1", gemm.clone(), &[Some(x), Some(w1), Some(b1)], "h").unwrap();
    let h = g.add_inferred("relu1", Op::Unary(UnaryOp::Relu), &[Some(h)], "a").unwrap();
    let w2 = g.add_const("w2", r.tensor(vec![64, 48], 0.3));
    let m = g.add_inferred("fc2", Op::MatMul, &[Some(h), Some(w2)], "m").unwrap();
    let b2 = g.add_const("b2", r.tensor(vec![48], 0.1));
    let m = g.add_inferred("fc2.bias", Op::Binary(BinaryOp::Add), &[Some(m), Some(b2)], "mb").unwrap();
    let m = g.add_inferred("relu2", Op::Unary(UnaryOp::Relu), &[Some(m)], "a2").unwrap();
    let (w3, b3) = (g.add_const("w3", r.tensor(vec![5, 48], 0.3)), g.add_const("b3", r.tensor(vec![5], 0.1)));
    let y = g.add_inferred("fc3", gemm, &[Some(m), Some(w3), Some(b3)], "y").unwrap();
    g.outputs.push(y);
    g
}

/// One attention block on [N, t, d]: Q, K, V projections, softmax(Q K^T * c) V, output
/// projection, residual, LayerNorm, a 4-action head per token. With more than one head, Q, K and V
/// split into heads as exporters write it (Reshape to [N, t, h, d / h], Transpose to heads first;
/// K^T by a second Transpose, or by one [0, 2, 3, 1]), and the heads' outputs put back (Transpose,
/// Reshape to [N, t, d]): the plan reads those Transposes through strides (`Fold`).
fn attention(r: &mut Rng, t: usize, d: usize, heads: usize) -> Graph {
    let mut g = Graph::new("attention");
    let x = g.add_input("x", ValueType::new(DType::F32, vec![batch(), Dim::Known(t), Dim::Known(d)]));
    let proj = |g: &mut Graph, r: &mut Rng, name: &str, x: ValueRef, n: usize| {
        let w = g.add_const(format!("{name}.w"), r.tensor(vec![d, n], 0.4));
        g.add_inferred(name, Op::MatMul, &[Some(x), Some(w)], format!("{name}.y")).unwrap()
    };
    let (q, k, v) = (proj(&mut g, r, "q", x, d), proj(&mut g, r, "k", x, d), proj(&mut g, r, "v", x, d));
    let shape = |g: &mut Graph, name: &str, dims: &[i64]| {
        g.add_const(name, Tensor::new(vec![dims.len()], sqil_ir::Data::I64(dims.to_vec())).unwrap())
    };
    let transpose = |g: &mut Graph, name: &str, x: ValueRef, perm: &[i64]| {
        g.add_inferred(name, Op::Transpose { perm: Some(perm.to_vec()) }, &[Some(x)], format!("{name}.y")).unwrap()
    };
    let (q, kt, v) = if heads == 1 {
        (q, transpose(&mut g, "kT", k, &[0, 2, 1]), v)
    } else {
        let hs = shape(&mut g, "heads", &[0, t as i64, heads as i64, (d / heads) as i64]);
        let split = |g: &mut Graph, name: &str, y: ValueRef| {
            let rs = Op::Reshape { allowzero: false };
            g.add_inferred(format!("{name}.split"), rs, &[Some(y), Some(hs)], format!("{name}.s")).unwrap()
        };
        let (qs, ks, vs) = (split(&mut g, "q", q), split(&mut g, "k", k), split(&mut g, "v", v));
        let kt = if heads == 2 {
            let kh = transpose(&mut g, "k.heads", ks, &[0, 2, 1, 3]);
            transpose(&mut g, "kT", kh, &[0, 1, 3, 2])
        } else {
            transpose(&mut g, "kT", ks, &[0, 2, 3, 1])
        };
        (transpose(&mut g, "q.heads", qs, &[0, 2, 1, 3]), kt, transpose(&mut g, "v.heads", vs, &[0, 2, 1, 3]))
    };
    let s = g.add_inferred("scores", Op::MatMul, &[Some(q), Some(kt)], "s").unwrap();
    let c = g.add_const("c", Tensor::from_f32(vec![], vec![1.0 / ((d / heads) as f32).sqrt()]).unwrap());
    let s = g.add_inferred("scale", Op::Binary(BinaryOp::Mul), &[Some(s), Some(c)], "sc").unwrap();
    let p = g.add_inferred("softmax", Op::Softmax { axis: -1, coerce_2d: false }, &[Some(s)], "p").unwrap();
    let mut a = g.add_inferred("mix", Op::MatMul, &[Some(p), Some(v)], "a").unwrap();
    if heads > 1 {
        let back = transpose(&mut g, "merge", a, &[0, 2, 1, 3]);
        let ms = shape(&mut g, "merged", &[0, t as i64, d as i64]);
        let rs = Op::Reshape { allowzero: false };
        a = g.add_inferred("merge.reshape", rs, &[Some(back), Some(ms)], "am").unwrap();
    }
    let o = proj(&mut g, r, "out", a, d);
    let res = g.add_inferred("residual", Op::Binary(BinaryOp::Add), &[Some(o), Some(x)], "res").unwrap();
    let (gamma, beta) = (g.add_const("ln.g", r.tensor(vec![d], 1.0)), g.add_const("ln.b", r.tensor(vec![d], 0.1)));
    let ln = Op::LayerNorm { axis: -1, epsilon: 1e-5 };
    let n = g.add_inferred("ln", ln, &[Some(res), Some(gamma), Some(beta)], "n").unwrap();
    let y = proj(&mut g, r, "head", n, 4);
    g.outputs.push(y);
    g
}

/// A MobileNet-class inverted residual block on [N, c, s, s]: Conv 1x1 to 24 + activation ->
/// depthwise Conv 3x3 (24 groups) + activation -> Conv 1x1 back to c -> + x -> Conv 3x3 stride 2
/// to 16 + ReLU -> Flatten -> Gemm 6; the activations Clip(0, 6) (MobileNetV2), HardSwish and
/// SiLU (MobileNetV3, EfficientNet; SiLU as Sigmoid and Mul, either order), or LeakyRelu (0.1)
/// as `act` says. The
/// plan runs each activation and the quantizer after it as the epilogue of the convolution before
/// (the int4 kernel's, the depthwise kernel's with its bias).
fn mobile(r: &mut Rng, c: usize, s: usize, act: usize) -> Graph {
    let mut g = Graph::new("mobile");
    let x = g.add_input("x", ValueType::new(DType::F32, vec![batch(), Dim::Known(c), Dim::Known(s), Dim::Known(s)]));
    let (lo, hi) = (
        g.add_const("lo", Tensor::from_f32(vec![], vec![0.0]).unwrap()),
        g.add_const("hi", Tensor::from_f32(vec![], vec![6.0]).unwrap()),
    );
    let clip = |g: &mut Graph, name: &str, h: ValueRef, k: usize| match (act + k) % 4 {
        0 => g.add_inferred(name, Op::Clip, &[Some(h), Some(lo), Some(hi)], format!("{name}.y")).unwrap(),
        1 => g.add_inferred(name, Op::Unary(UnaryOp::HardSwish), &[Some(h)], format!("{name}.y")).unwrap(),
        3 => g.add_inferred(name, Op::LeakyRelu { alpha: 0.1 }, &[Some(h)], format!("{name}.y")).unwrap(),
        _ => {
            let sig = g
                .add_inferred(format!("{name}.sig"), Op::Unary(UnaryOp::Sigmoid), &[Some(h)], format!("{name}.s"))
                .unwrap();
            let args = if k == 0 { [Some(h), Some(sig)] } else { [Some(sig), Some(h)] };
            g.add_inferred(name, Op::Binary(BinaryOp::Mul), &args, format!("{name}.y")).unwrap()
        }
    };
    let (w, b) = (g.add_const("w1", r.tensor(vec![24, c, 1, 1], 0.5)), g.add_const("b1", r.tensor(vec![24], 0.5)));
    let h = g.add_inferred("expand", conv_attrs(1, 1, 0), &[Some(x), Some(w), Some(b)], "e").unwrap();
    let h = clip(&mut g, "clip1", h, 0);
    let Op::Conv(mut dw) = conv_attrs(3, 1, 1) else { unreachable!() };
    dw.group = 24;
    let (w, b) = (g.add_const("wd", r.tensor(vec![24, 1, 3, 3], 0.5)), g.add_const("bd", r.tensor(vec![24], 0.5)));
    let h = g.add_inferred("depthwise", Op::Conv(dw), &[Some(h), Some(w), Some(b)], "d").unwrap();
    let h = clip(&mut g, "clip2", h, 1);
    let (w, b) = (g.add_const("w2", r.tensor(vec![c, 24, 1, 1], 0.3)), g.add_const("b2", r.tensor(vec![c], 0.1)));
    let h = g.add_inferred("project", conv_attrs(1, 1, 0), &[Some(h), Some(w), Some(b)], "p").unwrap();
    let h = g.add_inferred("residual", Op::Binary(BinaryOp::Add), &[Some(h), Some(x)], "res").unwrap();
    let (w, b) = (g.add_const("w3", r.tensor(vec![16, c, 3, 3], 0.2)), g.add_const("b3", r.tensor(vec![16], 0.1)));
    let h = g.add_inferred("down", conv_attrs(3, 2, 1), &[Some(h), Some(w), Some(b)], "dn").unwrap();
    let h = g.add_inferred("relu", Op::Unary(UnaryOp::Relu), &[Some(h)], "a").unwrap();
    let f = g.add_inferred("flat", Op::Flatten { axis: 1 }, &[Some(h)], "f").unwrap();
    let k = 16 * s.div_ceil(2) * s.div_ceil(2);
    let (w, b) = (g.add_const("w4", r.tensor(vec![6, k], 0.05)), g.add_const("b4", r.tensor(vec![6], 0.1)));
    let gemm = Op::Gemm { alpha: 1.0, beta: 1.0, trans_a: false, trans_b: true };
    let y = g.add_inferred("head", gemm, &[Some(f), Some(w), Some(b)], "y").unwrap();
    g.outputs.push(y);
    g
}

/// A tensor's values as bits, every NaN as one pattern (payloads may differ).
fn canon(t: &Tensor) -> Vec<u32> {
    t.data.to_f32_vec().iter().map(|v| if v.is_nan() { u32::MAX } else { v.to_bits() }).collect()
}

/// The scale and zero point of the first activation quantizer reading a graph input, if any.
fn input_quantizer(g: &Graph) -> Option<(f32, f32)> {
    g.topo_order().unwrap().into_iter().find_map(|n| match g.node(n).op {
        Op::FakeQuant { .. } => {
            let ins = g.inputs_of(n);
            let x = ins[0]?;
            matches!(g.node(x.node).op, Op::Input).then(|| {
                let s = g.const_value(ins[1].unwrap()).unwrap().data.to_f32_vec()[0];
                let z = ins.get(2).copied().flatten().map_or(0.0, |z| g.const_value(z).unwrap().data.to_f32_vec()[0]);
                (s, z)
            })
        }
        _ => None,
    })
}

const CONFIGS: [&str; 10] = [
    "wbits=4,abits=8,group=32",
    "wbits=4,abits=8,group=64,raw_input=quant",
    "wbits=3,abits=8,group=channel,raw_input=quant",
    "wbits=2,abits=4,group=32,raw_input=quant",
    "wbits=4,abits=4,group=channel,raw_input=scaled",
    "wbits=4,abits=float,group=32",
    "wbits=3,abits=8,group=32,asym=true,raw_input=quant",
    "wbits=4,abits=8,group=tensor,raw_input=quant",
    "wbits=8,abits=8,group=channel,raw_input=quant",
    "wbits=2,abits=8,group=channel",
];

/// Whether a config makes every linear map's input an integer.
fn all_int(spec: &str) -> bool {
    spec.contains("raw_input=quant") && !spec.contains("abits=float")
}

/// Whether every linear map of a plan is an integer int4 step (no float Gemm, MatMul or Conv left:
/// a weight the packed format cannot hold stays float).
fn integer_plan(plan: &sqil_lower::Plan) -> bool {
    plan.steps.iter().all(|s| match s {
        Step::Q4Linear { act, .. } => matches!(act, sqil_lower::ActQuant::Int { .. }),
        Step::Op { op, .. } => !matches!(op, Op::Gemm { .. } | Op::MatMul | Op::Conv(_)),
    })
}

#[test]
fn simulation_plan_and_c_agree_bit_for_bit() {
    // Reused output buffers come back as NaN: a kernel leaving a value unwritten cannot pass on
    // an earlier run's value.
    sqil_ir::pool::poison(true);
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let host_c = have(&cc);
    let aarch64 = have("aarch64-linux-gnu-gcc") && have("qemu-aarch64");
    let (mut int_steps, mut conv_steps, mut runs, mut c_exact, mut c_runs, mut c_integer) = (0, 0, 0, 0, 0, 0);
    let (mut ragged, mut padded, mut fused, mut inside, mut dequant, mut ahead, mut taps) = (0, 0, 0, 0, 0, 0, 0);
    let mut folded = 0;
    for family in ["mlp", "cnn", "attention", "mobile"] {
        for (ci, spec) in CONFIGS.iter().enumerate() {
            for seed in 0..2u64 {
                let mut r = Rng::new(seed * 131 + ci as u64 * 7 + family.len() as u64);
                let (g, sample): (Graph, Vec<usize>) = match family {
                    "mlp" => {
                        let k = [24, 64, 96][(seed as usize + ci) % 3];
                        (mlp(&mut r, k), vec![k])
                    }
                    "cnn" => {
                        let (c, s) = ([4, 8][ci % 2], [6, 7][seed as usize % 2]);
                        (cnn(&mut r, c, s), vec![c, s, s])
                    }
                    "mobile" => {
                        // 7 x 7: a small map, whose pointwise layers run four images side by
                        // side in the kernel's lanes.
                        let (c, s) = ([8, 16][ci % 2], [7, 9, 12][(seed as usize + ci) % 3]);
                        (mobile(&mut r, c, s, ci % 4), vec![c, s, s])
                    }
                    _ => (attention(&mut r, 5, 32, [1, 2, 4][(seed as usize + ci) % 3]), vec![5, 32]),
                };
                let per: usize = sample.iter().product();
                let shaped = |n: usize, v: Vec<f32>| Tensor::from_f32([&[n][..], &sample].concat(), v).unwrap();
                // Features of very different ranges, as raw observations are.
                let ranges: Vec<f32> = (0..per).map(|j| [0.05f32, 1.0, 20.0][j % 3]).collect();
                let calib: Vec<f32> = (0..128 * per).map(|i| r.unit() * ranges[i % per]).collect();
                let feeds = vec![HashMap::from([("x".to_string(), shaped(128, calib))])];
                let mut cfg = QuantConfig::default();
                cfg.apply_settings(spec).unwrap();
                let recipe = [Recipe::Rtn, Recipe::Gptq, Recipe::Mse][(seed as usize + ci) % 3];
                let what = format!("{family} seed {seed} `{spec}` {recipe:?}");
                let (sim, _) = quantize(&g, &cfg, recipe, &feeds).unwrap_or_else(|e| panic!("{what}: {e}"));
                let policy = Policy::from_graph(&sim).unwrap();
                let plan = &policy.plan;
                int_steps += plan.steps.iter().filter(|s| matches!(s, Step::Q4Linear { .. })).count();
                conv_steps += plan.steps.iter().filter(|s| matches!(s, Step::Q4Linear { conv: Some(_), .. })).count();
                // Groups the reduction length cuts short (96 columns in groups of 64): zero-padded.
                ragged += plan
                    .steps
                    .iter()
                    .filter(|s| matches!(s, Step::Q4Linear { w, .. } if w.groups() > 1 && w.k % w.group != 0))
                    .count();
                // Convolutions whose taps' runs are padded to whole groups (36 channels in 32s).
                padded += plan
                    .steps
                    .iter()
                    .filter(|s| matches!(s, Step::Q4Linear { conv: Some(im), .. } if im.run > im.channels))
                    .count();
                // Float Gemms on low-bit weights that run from the levels at small batches (the
                // batch of one below).
                dequant += plan.steps.iter().filter(|s| matches!(s, Step::Op { dequant: Some(_), .. })).count();
                // Depthwise Convs whose weights the plan laid out by tap for their kernel.
                taps += plan.steps.iter().filter(|s| matches!(s, Step::Op { taps: Some(_), .. })).count();
                // Random rows, and rows on the input quantizer's rounding boundaries.
                let mut rows: Vec<f32> = (0..24 * per).map(|i| r.unit() * ranges[i % per] * 1.5).collect();
                if let Some((s, z)) = input_quantizer(&sim) {
                    rows.extend((0..24 * per).map(|i| ((((i * 7919) % 200) as f32 - 100.0 - z) + 0.5) * s));
                }
                let n = rows.len() / per;
                let x = shaped(n, rows);
                // Steps a kernel runs as its epilogue (a Clip, a quantizer after a convolution).
                let paths = plan.paths(std::slice::from_ref(&x), 1).unwrap();
                fused += paths.iter().filter(|p| **p == FUSED).count();
                // Steps the step before ran in its own pass (a depthwise convolution after a
                // pointwise int4 one, a pointwise int4 one after a depthwise one).
                let desc = plan.describe();
                let is_transpose = |i: usize| desc[i].ends_with(": Transpose");
                inside += (0..paths.len()).filter(|&i| paths[i] == IN_PASS && !is_transpose(i)).count();
                // Input quantizers a float convolution ran on its image (image by image), and
                // Transposes a MatMul read through strides (or wrote its product in their order).
                ahead += (0..paths.len()).filter(|&i| paths[i] == AHEAD && !is_transpose(i)).count();
                folded +=
                    (0..paths.len()).filter(|&i| (paths[i] == AHEAD || paths[i] == IN_PASS) && is_transpose(i)).count();
                let want =
                    sqil_ir::interp::run(&sim, &HashMap::from([("x".to_string(), x.clone())])).unwrap().remove(0);
                let bits = |t: &Tensor| t.data.to_f32_vec().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                for threads in [1, 2] {
                    let got = plan.run(std::slice::from_ref(&x), threads).unwrap().remove(0);
                    let differ = bits(&got).iter().zip(bits(&want)).filter(|(a, b)| **a != *b).count();
                    assert_eq!(differ, 0, "{what} threads {threads}: {differ} of {} outputs differ", got.len());
                }
                // A NaN in the second state (the int8 quantizer cannot carry it: the plan marks the
                // outputs it reaches, and a pointwise step feeding a depthwise one leaves their
                // one-pass kernel for the two steps): the simulation's values, NaN where it has NaN.
                if family == "mobile" {
                    let mut v = x.data.to_f32_vec();
                    v[per + 1] = f32::NAN;
                    let bad = shaped(n, v);
                    let want = sqil_ir::interp::run(&sim, &HashMap::from([("x".to_string(), bad.clone())])).unwrap();
                    let got = plan.run(std::slice::from_ref(&bad), 1).unwrap();
                    assert!(canon(&want[0]).contains(&u32::MAX), "{what}: the NaN reached no action");
                    assert_eq!(canon(&got[0]), canon(&want[0]), "{what}: a NaN input");
                }
                // One sample at a time gives the batch's bits.
                let one = plan.run(&[shaped(1, x.data.to_f32_vec()[..per].to_vec())], 1).unwrap().remove(0);
                assert_eq!(bits(&one), bits(&want)[..one.len()].to_vec(), "{what}: batch of one");
                runs += 1;
                // The C back end: the first seed of every family x config, eight states.
                if seed != 0 || !host_c {
                    continue;
                }
                let prog = emit(&policy, "policy").unwrap_or_else(|e| panic!("{what}: {e}"));
                let exact = prog.report.bit_exact;
                if integer_plan(plan) {
                    assert!(exact, "{what}: an integer plan must be bit-exact in C: {:?}", plan.describe());
                    c_integer += 1;
                }
                let (ins, outs) = selftest_vectors(&policy, std::slice::from_ref(&x), 8).unwrap();
                let dir = std::env::temp_dir().join(format!("sqil-diff-{}-{family}-{ci}", std::process::id()));
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(dir.join("policy.h"), &prog.header).unwrap();
                std::fs::write(dir.join("policy.c"), &prog.source).unwrap();
                std::fs::write(dir.join("selftest.c"), selftest("policy", &ins, &outs, C_TOL).unwrap()).unwrap();
                let want_c: Vec<Vec<u32>> = outs.iter().map(|o| o[0].iter().map(|v| v.to_bits()).collect()).collect();
                // The self-test's expected values are the plan's; they are the simulation's too.
                assert_eq!(want_c.concat(), bits(&want)[..want_c.concat().len()].to_vec(), "{what}: plan per state");
                // Every program bit for bit, also those whose report cannot promise it (libm's exp
                // in double rounds to the interpreter's f32 here; the float layers are exact).
                let host = format!("host {what}");
                check(&host, &build_and_run(&dir, &cc, &[], &[], &host), true, &want_c);
                // aarch64: the integer configs (NEON dot product), every family.
                if aarch64 && all_int(spec) && ci % 2 == 1 {
                    let a64 = format!("aarch64 {what}");
                    let (flags, qemu) = (["-march=armv8.2-a+dotprod", "-static"], ["qemu-aarch64", "-cpu", "max"]);
                    let out = build_and_run(&dir, "aarch64-linux-gnu-gcc", &flags, &qemu, &a64);
                    check(&a64, &out, true, &want_c);
                }
                c_runs += 1;
                c_exact += exact as usize;
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
    }
    eprintln!("{runs} simulation == plan runs ({int_steps} int4 steps, {conv_steps} convolutions, {ragged} with a short last group, {padded} with padded runs, {fused} steps run as epilogues, {inside} steps in the pass of the step before, {dequant} float Gemms from weight levels, {taps} depthwise Convs with weights laid out by tap, {ahead} input quantizers run by the convolution after them, {folded} Transposes read through strides); C: {c_exact}/{c_runs} bit-exact programs");
    assert!(taps > 0, "no depthwise Conv had its weights laid out by tap");
    if sqil_kernels_cpu::isa() == sqil_kernels_cpu::Isa::Avx512Vnni {
        assert!(inside >= 8, "only {inside} steps ran in the pass of the step before");
    } else {
        eprintln!("no AVX-512 VNNI here: the one-pass pointwise + depthwise path is not checked");
    }
    assert!(fused >= 40, "only {fused} steps run as a kernel's epilogue");
    assert!(int_steps > 100 && conv_steps > 10, "only {int_steps} int4 steps, {conv_steps} convolutions planned");
    assert!(ragged >= 2, "only {ragged} int4 steps with a short last group");
    assert!(dequant >= 2, "only {dequant} float Gemms ran from their weight levels");
    assert!(ahead >= 4, "only {ahead} input quantizers ran inside the convolution after them");
    assert!(padded >= 4, "only {padded} convolutions with runs padded to whole groups");
    assert!(folded >= 20, "only {folded} Transposes read through strides by a MatMul");
    assert!(!host_c || c_integer >= 8, "only {c_integer} integer plans reached the C back end");
}

/// A pointwise int4 convolution feeding a depthwise one (x -> 1 x 1 to 16 channels -> Clip(0, 6)
/// -> 3 x 3 depthwise, stride 1 or 2 -> Clip), then nothing or a pointwise int4 convolution to 8
/// channels: the plan's outputs are the last convolution's own, so a NaN input shows exactly
/// which outputs the plan marks. Random states and states with a NaN each: the simulation's bits
/// (NaN where it has NaN), the steps in one pass on AVX-512 VNNI (where the NaN state leaves the
/// pass for the steps one by one).
#[test]
fn pointwise_into_depthwise_matches_the_simulation_with_nan_inputs() {
    sqil_ir::pool::poison(true);
    let mut inside = 0;
    for (seed, spec) in ["wbits=4,abits=8,group=32,raw_input=quant", "wbits=3,abits=8,group=channel,raw_input=quant"]
        .into_iter()
        .enumerate()
    {
        for (stride, tail) in [(1, false), (2, false), (1, true), (2, true)] {
            let mut r = Rng::new(seed as u64 * 11 + stride + 5 * tail as u64);
            let (c, s) = (8, 9);
            let mut g = Graph::new("pw_dw");
            let x = g
                .add_input("x", ValueType::new(DType::F32, vec![batch(), Dim::Known(c), Dim::Known(s), Dim::Known(s)]));
            let (lo, hi) = (
                g.add_const("lo", Tensor::from_f32(vec![], vec![0.0]).unwrap()),
                g.add_const("hi", Tensor::from_f32(vec![], vec![6.0]).unwrap()),
            );
            let (w, b) =
                (g.add_const("w1", r.tensor(vec![16, c, 1, 1], 0.5)), g.add_const("b1", r.tensor(vec![16], 0.5)));
            let h = g.add_inferred("expand", conv_attrs(1, 1, 0), &[Some(x), Some(w), Some(b)], "e").unwrap();
            let h = g.add_inferred("clip1", Op::Clip, &[Some(h), Some(lo), Some(hi)], "c1").unwrap();
            let Op::Conv(mut dw) = conv_attrs(3, stride as i64, 1) else { unreachable!() };
            dw.group = 16;
            let (w, b) =
                (g.add_const("wd", r.tensor(vec![16, 1, 3, 3], 0.5)), g.add_const("bd", r.tensor(vec![16], 0.5)));
            let h = g.add_inferred("depthwise", Op::Conv(dw), &[Some(h), Some(w), Some(b)], "d").unwrap();
            let mut y = g.add_inferred("clip2", Op::Clip, &[Some(h), Some(lo), Some(hi)], "c2").unwrap();
            if tail {
                let (w, b) =
                    (g.add_const("w2", r.tensor(vec![8, 16, 1, 1], 0.3)), g.add_const("b2", r.tensor(vec![8], 0.1)));
                y = g.add_inferred("project", conv_attrs(1, 1, 0), &[Some(y), Some(w), Some(b)], "y").unwrap();
            }
            g.outputs.push(y);
            let per = c * s * s;
            let shaped = |n: usize, v: Vec<f32>| Tensor::from_f32(vec![n, c, s, s], v).unwrap();
            let calib: Vec<f32> = (0..64 * per).map(|_| r.unit() * 2.0).collect();
            let feeds = vec![HashMap::from([("x".to_string(), shaped(64, calib))])];
            let mut cfg = QuantConfig::default();
            cfg.apply_settings(spec).unwrap();
            let (sim, _) = quantize(&g, &cfg, Recipe::Rtn, &feeds).unwrap();
            let plan = Policy::from_graph(&sim).unwrap().plan;
            let mut v: Vec<f32> = (0..4 * per).map(|_| r.unit() * 3.0).collect();
            // NaN in the second and fourth states (a corner and an inner position).
            v[per + 1] = f32::NAN;
            v[3 * per + 4 * s + 5] = f32::NAN;
            for x in [shaped(4, v.iter().map(|v| if v.is_nan() { 0.5 } else { *v }).collect()), shaped(4, v.clone())] {
                let want = sqil_ir::interp::run(&sim, &HashMap::from([("x".to_string(), x.clone())])).unwrap();
                let got = plan.run(std::slice::from_ref(&x), 1).unwrap();
                let (want, got) = (canon(&want[0]), canon(&got[0]));
                let nans = want.iter().filter(|&&v| v == u32::MAX).count();
                assert!(nans < want.len() / 2, "{spec} stride {stride}: {nans} NaN outputs");
                assert_eq!(got, want, "{spec} stride {stride}: {nans} NaN outputs expected");
                inside += plan.paths(std::slice::from_ref(&x), 1).unwrap().iter().filter(|p| **p == IN_PASS).count();
                // The last convolution is int4 (so its input quantizer is the depthwise's epilogue).
                assert!(
                    !tail || matches!(plan.steps.last(), Some(Step::Q4Linear { .. })),
                    "{spec}: {:?}",
                    plan.describe()
                );
            }
        }
    }
    if sqil_kernels_cpu::isa() == sqil_kernels_cpu::Isa::Avx512Vnni {
        // The NaN runs leave the pass (paths() runs the whole batch: the pass is all or nothing):
        // per NaN-free run the depthwise, and with the tail the last convolution too.
        assert_eq!(inside, 12, "{inside} steps ran in another's pass in the 8 NaN-free runs");
    } else {
        eprintln!("no AVX-512 VNNI here: the one-pass path is not taken");
    }
}
