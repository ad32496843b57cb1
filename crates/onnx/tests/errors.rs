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
    assert!(e.contains("beyond the end of the file (64 bytes)"), "{e}");
    std::fs::remove_dir_all(&d).ok();
}

/// mlp_dynamo.onnx's external data file, as `name` in a fresh folder `sub` of a fresh folder.
#[cfg(unix)]
fn model_in_subfolder(tag: &str) -> (PathBuf, PathBuf) {
    let d = tmp(tag);
    let sub = d.join("models").join("sub");
    std::fs::create_dir_all(&sub).unwrap();
    std::fs::copy(policies().join("mlp_dynamo.onnx"), sub.join("mlp_dynamo.onnx")).unwrap();
    (d, sub)
}

#[test]
#[cfg(unix)]
fn external_data_through_a_symlink_out_of_the_folder_is_refused() {
    let (d, sub) = model_in_subfolder("symlink");
    // The location is a plain name, so the text checks pass; the file it names is a symlink to
    // a file outside the model's folder (as /etc/passwd would be).
    let secret = d.join("secret.bin");
    std::fs::copy(policies().join("mlp_dynamo.onnx.data"), &secret).unwrap();
    std::os::unix::fs::symlink(&secret, sub.join("mlp_dynamo.onnx.data")).unwrap();
    let e = sqil_onnx::load_model(&sub.join("mlp_dynamo.onnx")).expect_err("must not read outside").to_string();
    assert!(e.contains("outside the model's folder") && e.contains("mlp_dynamo.onnx.data"), "{e}");
    // A symlink that stays inside the folder is fine.
    std::fs::remove_file(sub.join("mlp_dynamo.onnx.data")).unwrap();
    std::fs::copy(&secret, sub.join("real.data")).unwrap();
    std::os::unix::fs::symlink(sub.join("real.data"), sub.join("mlp_dynamo.onnx.data")).unwrap();
    sqil_onnx::load_model(&sub.join("mlp_dynamo.onnx")).expect("a symlink inside the folder loads");
    std::fs::remove_dir_all(&d).ok();
}

#[test]
#[cfg(unix)]
fn external_data_that_is_a_fifo_is_refused_without_blocking() {
    let (d, sub) = model_in_subfolder("fifo");
    let fifo = sub.join("mlp_dynamo.onnx.data");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status().map(|s| s.success()).unwrap_or(false);
    if !made {
        eprintln!("skipping: mkfifo is not available here");
        return;
    }
    // Opening a FIFO for reading blocks until a writer comes: the loader must not open it.
    let (tx, rx) = std::sync::mpsc::channel();
    let model = sub.join("mlp_dynamo.onnx");
    std::thread::spawn(move || tx.send(sqil_onnx::load_model(&model).map(|_| ()).map_err(|e| e.to_string())));
    let r = rx.recv_timeout(std::time::Duration::from_secs(20)).expect("the loader hung on a FIFO");
    let e = r.expect_err("a FIFO is not a tensor file");
    assert!(e.contains("not a regular file"), "{e}");
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
