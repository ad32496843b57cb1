//! ONNX conformance: runs the node tests of the onnx==1.22.0 wheel listed in
//! `testdata/onnx-node-tests.txt` through the importer and the reference interpreter.
//!
//! List format, one test per line: `name [rtol=X] [atol=X] [skip="reason"]`; `#` starts a
//! comment. Set `SQIL_ONNX_NODE_ALL=1` to run every test in the folder whose single node is an
//! op the importer supports and print a ready-to-paste list (used to (re)build the list file).

use sqil_conformance::{compare, onnx_node_dir, repo_root, ONNX_NODE_ATOL, ONNX_NODE_RTOL};
use sqil_ir::interp::Interpreter;
use sqil_ir::Tensor;
use std::collections::HashMap;
use std::path::Path;

struct Entry {
    name: String,
    rtol: f64,
    atol: f64,
    skip: Option<String>,
}

fn parse_list(text: &str) -> Vec<Entry> {
    let mut out = vec![];
    for (ln, line) in text.lines().enumerate() {
        let line = line.split_once('#').map_or(line, |(a, _)| a).trim();
        if line.is_empty() {
            continue;
        }
        let (name, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let mut e = Entry { name: name.to_string(), rtol: ONNX_NODE_RTOL, atol: ONNX_NODE_ATOL, skip: None };
        let mut rest = rest.trim();
        while !rest.is_empty() {
            let (k, v) = rest.split_once('=').unwrap_or_else(|| panic!("list line {}: bad flag `{rest}`", ln + 1));
            let (val, tail) = if let Some(q) = v.strip_prefix('"') {
                let end = q.find('"').unwrap_or_else(|| panic!("list line {}: unterminated quote", ln + 1));
                (&q[..end], &q[end + 1..])
            } else {
                v.split_once(char::is_whitespace).unwrap_or((v, ""))
            };
            match k.trim() {
                "rtol" => e.rtol = val.parse().expect("rtol is a number"),
                "atol" => e.atol = val.parse().expect("atol is a number"),
                "skip" => e.skip = Some(val.to_string()),
                other => panic!("list line {}: unknown flag `{other}`", ln + 1),
            }
            rest = tail.trim();
        }
        out.push(e);
    }
    out
}

/// Runs one node test folder; `Err` describes the failure.
fn run_case(dir: &Path, rtol: f64, atol: f64) -> Result<(), String> {
    let g = sqil_onnx::load_model(&dir.join("model.onnx")).map_err(|e| e.to_string())?;
    let interp = Interpreter::new(&g).map_err(|e| e.to_string())?;
    let input_names: Vec<String> = g.inputs.iter().map(|&i| g.node(i).outputs[0].name.clone()).collect();
    let mut sets: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    sets.sort();
    if sets.is_empty() {
        return Err("no test_data_set folders".into());
    }
    for set in sets {
        let load = |prefix: &str| -> Result<Vec<Tensor>, String> {
            let mut v = vec![];
            for k in 0.. {
                let p = set.join(format!("{prefix}_{k}.pb"));
                if !p.exists() {
                    break;
                }
                v.push(sqil_onnx::load_tensor_file(&p).map_err(|e| e.to_string())?.1);
            }
            Ok(v)
        };
        let (ins, outs) = (load("input")?, load("output")?);
        // Inputs are positional; initializer-backed inputs were made constants.
        let feeds: HashMap<String, Tensor> = input_names.iter().cloned().zip(ins).collect();
        let got = interp.run(&feeds).map_err(|e| e.to_string())?;
        if got.len() != outs.len() {
            return Err(format!("{} outputs, expected {}", got.len(), outs.len()));
        }
        for (k, (g, w)) in got.iter().zip(&outs).enumerate() {
            compare(g, w, rtol, atol)
                .map_err(|e| format!("{}: output {k}: {e}", set.file_name().unwrap().to_string_lossy()))?;
        }
    }
    Ok(())
}

#[test]
fn onnx_node_tests() {
    let Some(root) = onnx_node_dir() else {
        if std::env::var("SQIL_ALLOW_MISSING_ONNX").is_ok() {
            eprintln!("SKIP onnx_node_tests: onnx node tests not installed (run tools/setup-ci.sh)");
            return;
        }
        panic!("the onnx==1.22.0 node tests are not installed: run `tools/setup-ci.sh` (or set SQIL_ONNX_NODE_DIR, or SQIL_ALLOW_MISSING_ONNX=1 to skip)");
    };
    if std::env::var("SQIL_ONNX_NODE_ALL").is_ok() {
        return survey(&root);
    }
    let list = std::fs::read_to_string(repo_root().join("testdata/onnx-node-tests.txt"))
        .expect("testdata/onnx-node-tests.txt");
    let entries = parse_list(&list);
    let (mut passed, mut skipped, mut failed) = (0, 0, vec![]);
    for e in &entries {
        if let Some(why) = &e.skip {
            skipped += 1;
            eprintln!("skip {}: {why}", e.name);
            continue;
        }
        match run_case(&root.join(&e.name), e.rtol, e.atol) {
            Ok(()) => passed += 1,
            Err(msg) => failed.push(format!("{}: {msg}", e.name)),
        }
    }
    println!("onnx node tests: {passed} passed, {} failed, {skipped} skipped, {} listed", failed.len(), entries.len());
    assert!(failed.is_empty(), "{} node tests failed:\n{}", failed.len(), failed.join("\n"));
}

/// Runs every single-node test of a supported op and prints a list file body.
fn survey(root: &Path) {
    let supported = sqil_onnx::supported_ops();
    let mut dirs: Vec<_> = std::fs::read_dir(root).unwrap().filter_map(|e| e.ok()).map(|e| e.path()).collect();
    dirs.sort();
    let (mut ok, mut bad) = (0, 0);
    for d in dirs {
        let Ok(bytes) = std::fs::read(d.join("model.onnx")) else { continue };
        let Ok(m) = <onnx_protobuf::ModelProto as onnx_protobuf::Message>::parse_from_bytes(&bytes) else { continue };
        let nodes = &m.graph.node;
        if nodes.len() != 1 || !supported.contains(&nodes[0].op_type.as_str()) || !nodes[0].domain.is_empty() {
            continue;
        }
        let name = d.file_name().unwrap().to_string_lossy().to_string();
        match run_case(&d, ONNX_NODE_RTOL, ONNX_NODE_ATOL) {
            Ok(()) => {
                ok += 1;
                println!("{name}");
            }
            Err(msg) => {
                bad += 1;
                println!("{name} skip=\"{}\"", msg.replace('"', "'").lines().next().unwrap_or(""));
            }
        }
    }
    eprintln!("survey: {ok} pass, {bad} fail");
}
