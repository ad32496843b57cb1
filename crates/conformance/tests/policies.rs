//! The testdata policies through the whole front end: import, the reference interpreter
//! against onnxruntime's outputs (recorded by tools/make_testdata.py, graph optimisations off)
//! and against tract-onnx run live here; the text format round trip; the clean-up passes.

use ndarray::ArrayD;
use ndarray_npy::ReadNpyExt;
use sqil_conformance::{max_rel_diff, repo_root, PEER_ATOL, PEER_RTOL};
use sqil_ir::interp::Interpreter;
use sqil_ir::{Data, Graph, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn dir() -> PathBuf {
    repo_root().join("testdata/policies")
}

struct Case {
    name: String,
    graph: Graph,
    feeds: HashMap<String, Tensor>,
    inputs: Vec<Tensor>,
    ort: Vec<Tensor>,
    int4: bool,
}

fn read_npy(p: &Path) -> Tensor {
    let a = ArrayD::<f32>::read_npy(std::fs::File::open(p).unwrap()).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    Tensor::new(a.shape().to_vec(), Data::F32(a.iter().copied().collect())).unwrap()
}

fn cases() -> Vec<Case> {
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("manifest.json")).unwrap()).unwrap();
    let mut out = vec![];
    for m in manifest["models"].as_array().unwrap() {
        let f = m["file"].as_str().unwrap();
        let name = f.trim_end_matches(".onnx").to_string();
        let graph = sqil_onnx::load_model(&dir().join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        let npys = |kind: &str| -> Vec<Tensor> {
            (0..)
                .map(|k| dir().join(format!("{name}.{kind}{k}.npy")))
                .take_while(|p| p.exists())
                .map(|p| read_npy(&p))
                .collect()
        };
        let (inputs, ort) = (npys("input"), npys("ort"));
        let names: Vec<String> = graph.inputs.iter().map(|&i| graph.node(i).outputs[0].name.clone()).collect();
        assert_eq!(names.len(), inputs.len(), "{name}: inputs");
        assert!(!ort.is_empty(), "{name}: no onnxruntime reference outputs");
        let feeds = names.into_iter().zip(inputs.iter().cloned()).collect();
        let int4 = m["int4"].as_bool().unwrap_or(false);
        out.push(Case { name, graph, feeds, inputs, ort, int4 });
    }
    assert!(out.len() >= 9, "found {} policies", out.len());
    out
}

fn check_close(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.shape, want.shape, "{what}: shape");
    let (g, w) = (got.data.to_f64_vec(), want.data.to_f64_vec());
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        assert!((a - b).abs() <= PEER_ATOL + PEER_RTOL * b.abs(), "{what}: element {i}: {a} vs {b}");
    }
}

#[test]
fn interpreter_matches_onnxruntime() {
    for c in cases() {
        let got = Interpreter::new(&c.graph).unwrap().run(&c.feeds).unwrap_or_else(|e| panic!("{}: {e}", c.name));
        assert_eq!(got.len(), c.ort.len(), "{}", c.name);
        for (k, (g, w)) in got.iter().zip(&c.ort).enumerate() {
            check_close(&format!("{} output {k} vs onnxruntime", c.name), g, w);
        }
        println!("{:<24} vs onnxruntime: max rel diff {:.2e}", c.name, max_rel_diff(&got[0], &c.ort[0], 1e-3));
    }
}

/// Models tract-onnx 0.23 cannot analyse, with the reason; onnxruntime is their reference.
/// The test fails if tract starts loading one of them, so the list cannot go stale.
const TRACT_CANNOT_LOAD: &[(&str, &str)] = &[
    ("mlp_dynamo", "LayerNormalization with Mean and InvStdDev outputs fails its shape analysis"),
    ("transformer_dynamo", "shape analysis of the 4-D attention MatMul fails"),
];

#[test]
fn interpreter_matches_tract() {
    use tract_onnx::prelude::*;
    for c in cases() {
        if c.int4 {
            // tract cannot load int4 tensors: onnxruntime is the reference for these (above).
            continue;
        }
        let load = || -> TractResult<_> {
            let mut model = tract_onnx::onnx().model_for_path(dir().join(format!("{}.onnx", c.name)))?;
            for (k, t) in c.inputs.iter().enumerate() {
                model.set_input_fact(k, f32::fact(t.shape.clone()).into())?;
            }
            model.into_optimized()?.into_runnable()
        };
        let plan = match (load(), TRACT_CANNOT_LOAD.iter().find(|(n, _)| *n == c.name)) {
            (Ok(p), None) => p,
            (Err(e), Some((_, why))) => {
                println!("{:<24} vs tract: not comparable, tract fails ({why}): {e}", c.name);
                continue;
            }
            (Ok(_), Some(_)) => {
                panic!("{}: tract now loads this model: compare against it (drop it from TRACT_CANNOT_LOAD)", c.name)
            }
            (Err(e), None) => panic!("{}: tract fails: {e:?}", c.name),
        };
        let ins: TVec<TValue> = c
            .inputs
            .iter()
            .map(|t| tract_onnx::prelude::Tensor::from_shape(&t.shape, t.as_f32().unwrap()).unwrap().into())
            .collect();
        let outs = plan.run(ins).unwrap();
        let ours = Interpreter::new(&c.graph).unwrap().run(&c.feeds).unwrap();
        for (k, (o, t)) in ours.iter().zip(outs.iter()).enumerate() {
            let v = t.to_plain_array_view::<f32>().unwrap();
            let theirs = sqil_ir::Tensor::new(v.shape().to_vec(), Data::F32(v.iter().copied().collect())).unwrap();
            check_close(&format!("{} output {k} vs tract", c.name), o, &theirs);
            println!("{:<24} vs tract: max rel diff {:.2e}", c.name, max_rel_diff(o, &theirs, 1e-3));
        }
    }
}

#[test]
fn text_format_round_trips_every_policy() {
    for c in cases() {
        let text = sqil_ir::print_graph(&c.graph, &Default::default()).unwrap();
        let back = sqil_ir::parse_graph(&text).unwrap_or_else(|e| panic!("{}: {e}", c.name));
        sqil_ir::verify(&back).unwrap();
        assert!(sqil_ir::graphs_equal(&c.graph, &back).unwrap(), "{}: graph changed in the round trip", c.name);
        assert_eq!(
            sqil_ir::print_graph(&back, &Default::default()).unwrap(),
            text,
            "{}: text is not a fixed point",
            c.name
        );
        let a = Interpreter::new(&c.graph).unwrap().run(&c.feeds).unwrap();
        let b = Interpreter::new(&back).unwrap().run(&c.feeds).unwrap();
        assert_eq!(a, b, "{}: outputs differ after the round trip", c.name);
    }
}

#[test]
fn cleanup_passes_keep_outputs() {
    for c in cases() {
        let mut g = c.graph.clone();
        let before = g.op_count();
        let mut pm = sqil_passes::cleanup_pipeline();
        pm.run(&mut g, &mut sqil_passes::PassCtx::default()).unwrap_or_else(|e| panic!("{}: {e}", c.name));
        let a = Interpreter::new(&c.graph).unwrap().run(&c.feeds).unwrap();
        let b = Interpreter::new(&g).unwrap().run(&c.feeds).unwrap();
        for (x, y) in a.iter().zip(&b) {
            check_close(&format!("{} after clean-up", c.name), y, x);
        }
        assert!(g.op_count() <= before, "{}: clean-up added ops", c.name);
        println!("{:<24} ops {before} -> {}", c.name, g.op_count());
    }
}
