//! Bad input gets one clear error naming the file, node or field; never a panic.

use onnx_protobuf::{Message, ModelProto, NodeProto, OperatorSetIdProto};
use std::path::PathBuf;

fn policies() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/policies")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sqil-onnx-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn every_unsupported_op_is_listed_at_once() {
    let mut m = ModelProto::parse_from_bytes(&std::fs::read(policies().join("hopper_mlp.onnx")).unwrap()).unwrap();
    let g = m.graph.as_mut().unwrap();
    for (i, op) in ["NonMaxSuppression", "Loop"].iter().enumerate() {
        let mut n = NodeProto::new();
        n.op_type = op.to_string();
        n.name = format!("bad{i}");
        n.input.push("obs".into());
        n.output.push(format!("junk{i}"));
        g.node.push(n);
    }
    let e = sqil_onnx::load_model_bytes(&m.write_to_bytes().unwrap(), None).unwrap_err().to_string();
    assert!(e.contains("2 unsupported node(s) at opset 17"), "{e}");
    assert!(e.contains("NonMaxSuppression (node `bad0`") && e.contains("Loop (node `bad1`"), "{e}");
}

#[test]
fn truncated_and_garbage_files_are_clear_errors() {
    let bytes = std::fs::read(policies().join("cnn.onnx")).unwrap();
    for cut in [0, 1, 17, 100, 1000, bytes.len() / 2, bytes.len() - 3] {
        let d = tmp("trunc");
        let p = d.join("model.onnx");
        std::fs::write(&p, &bytes[..cut]).unwrap();
        let e = sqil_onnx::load_model(&p).expect_err("a truncated model must not load").to_string();
        assert!(e.contains("model.onnx"), "cut at {cut}: {e}");
    }
    let e = sqil_onnx::load_model_bytes(b"this is not protobuf at all \xff\xff", None).unwrap_err().to_string();
    assert!(e.contains("not a valid ONNX model"), "{e}");
}

#[test]
fn missing_external_data_names_the_file() {
    let d = tmp("ext");
    std::fs::copy(policies().join("mlp_dynamo.onnx"), d.join("mlp_dynamo.onnx")).unwrap();
    let e = sqil_onnx::load_model(&d.join("mlp_dynamo.onnx")).unwrap_err().to_string();
    assert!(e.contains("mlp_dynamo.onnx.data"), "{e}");
    // A short data file: the offsets no longer fit.
    std::fs::write(d.join("mlp_dynamo.onnx.data"), [0u8; 64]).unwrap();
    let e = sqil_onnx::load_model(&d.join("mlp_dynamo.onnx")).unwrap_err().to_string();
    assert!(e.contains("outside"), "{e}");
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn opsets_out_of_range_are_refused() {
    let mut m = ModelProto::parse_from_bytes(&std::fs::read(policies().join("hopper_mlp.onnx")).unwrap()).unwrap();
    m.opset_import.clear();
    let mut o = OperatorSetIdProto::new();
    o.version = 7;
    m.opset_import.push(o);
    let e = sqil_onnx::load_model_bytes(&m.write_to_bytes().unwrap(), None).unwrap_err().to_string();
    assert!(e.contains("opset 7"), "{e}");
}

#[test]
fn imports_keep_node_names_and_symbolic_batch() {
    let g = sqil_onnx::load_model(&policies().join("cnn.onnx")).unwrap();
    let text = sqil_ir::print_graph(&g, &sqil_ir::PrintOptions { elide_over: Some(8), splat: false }).unwrap();
    assert!(text.contains("@\"/c1/Conv\""), "node names kept");
    assert!(text.contains("%image: f32[batch,64,64,3]"), "symbolic batch kept: {}", &text[..200]);
    assert!(text.contains("= Transpose[perm=[0, 3, 1, 2]]"), "NHWC input transposed");
}
