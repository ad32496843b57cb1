//! One arithmetic definition per int4 linear step (`sqil_ir::lowered`): the simulation (the
//! reference interpreter on the FakeQuant graph) and the CPU plan agree bit for bit, on random
//! MLPs (Gemm and MatMul + Add layers, ReLU) under many quantization configs, on random inputs
//! and on inputs placed exactly on the input quantizer's rounding boundaries, with one and two
//! threads and over batches.

use sqil_ir::ops::{BinaryOp, UnaryOp};
use sqil_ir::testing::Rng;
use sqil_ir::{DType, Dim, Graph, Op, Tensor, ValueType};
use sqil_lower::Step;
use sqil_passes::quant::{quantize, QuantConfig, Recipe};
use sqil_runtime::Execute;
use sqil_runtime::Plan;
use std::collections::HashMap;

/// k -> 64 (Gemm, ReLU) -> 48 (MatMul + Add, ReLU) -> 5 (Gemm).
fn mlp(r: &mut Rng, k: usize) -> Graph {
    let mut g = Graph::new("mlp");
    let x = g.add_input("x", ValueType::new(DType::F32, vec![Dim::Sym("N".into()), Dim::Known(k)]));
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

#[test]
fn simulation_and_plan_agree_bit_for_bit() {
    let configs = [
        "wbits=4,abits=8,group=32",
        "wbits=4,abits=8,group=64,raw_input=quant",
        "wbits=3,abits=8,group=channel,raw_input=quant",
        "wbits=2,abits=4,group=32",
        "wbits=4,abits=4,group=channel,raw_input=scaled",
        "wbits=4,abits=float,group=32",
        "wbits=3,abits=8,group=32,asym=true",
    ];
    let mut int_steps = 0;
    for seed in 0..4u64 {
        for (ci, spec) in configs.iter().enumerate() {
            let mut r = Rng::new(seed * 31 + ci as u64);
            let k = [24, 64, 96][(seed as usize + ci) % 3];
            let g = mlp(&mut r, k);
            let ranges: Vec<f32> = (0..k).map(|j| [0.05f32, 1.0, 20.0][j % 3]).collect();
            let calib: Vec<f32> = (0..256 * k).map(|i| r.unit() * ranges[i % k]).collect();
            let feeds = vec![HashMap::from([("x".to_string(), Tensor::from_f32(vec![256, k], calib).unwrap())])];
            let mut cfg = QuantConfig::default();
            cfg.apply_settings(spec).unwrap();
            let recipe = [Recipe::Rtn, Recipe::Gptq, Recipe::Mse][(seed as usize + ci) % 3];
            let (sim, _) = quantize(&g, &cfg, recipe, &feeds).unwrap();
            let plan = Plan::new(&sim).unwrap();
            int_steps += plan.steps.iter().filter(|s| matches!(s, Step::Q4Linear { .. })).count();
            // Random rows, and rows on the input quantizer's rounding boundaries (x / s = m + 0.5).
            let mut rows: Vec<f32> = (0..64 * k).map(|i| r.unit() * ranges[i % k] * 1.5).collect();
            if let Some((s, z)) = input_quantizer(&sim) {
                rows.extend((0..64 * k).map(|i| ((((i * 7919) % 200) as f32 - 100.0 - z) + 0.5) * s));
            }
            let n = rows.len() / k;
            let x = Tensor::from_f32(vec![n, k], rows).unwrap();
            let want = sqil_ir::interp::run(&sim, &HashMap::from([("x".to_string(), x.clone())])).unwrap().remove(0);
            for threads in [1, 2] {
                let got = plan.run(std::slice::from_ref(&x), threads).unwrap().remove(0);
                let (a, b) = (got.data.to_f32_vec(), want.data.to_f32_vec());
                let differ = a.iter().zip(&b).filter(|(p, q)| p.to_bits() != q.to_bits()).count();
                assert_eq!(differ, 0, "seed {seed} `{spec}` threads {threads}: {differ} of {} outputs differ", a.len());
            }
            // One row at a time gives the batch's bits.
            let one = plan.run(&[Tensor::from_f32(vec![1, k], x.data.to_f32_vec()[..k].to_vec()).unwrap()], 1).unwrap();
            assert_eq!(
                one[0].data.to_f32_vec(),
                want.data.to_f32_vec()[..5].to_vec(),
                "seed {seed} `{spec}`: batch of one"
            );
        }
    }
    assert!(int_steps > 40, "only {int_steps} int4 steps planned");
}
