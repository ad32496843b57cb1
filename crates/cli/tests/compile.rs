//! `sqil compile` end to end on the bundled bc_hopper policy and its demonstrations: held-out
//! episodes choose among every PTQ recipe and the fine-tuned checkpoints, what ships scores no
//! worse on them than the best PTQ candidate, the report lists every candidate; a final check
//! that finds a difference still writes every output and the report, then fails naming the
//! state and the layer.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn compile(out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "compile",
        "testdata/policies/bc_hopper.onnx",
        "--demos",
        "testdata/demos/hopper.npz",
        "--steps",
        "40",
        "--batch",
        "64",
        "--states",
        "600",
        "--val-states",
        "200",
        "--val-every",
        "10",
        "-o",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    Command::new(env!("CARGO_BIN_EXE_sqil")).args(&args).current_dir(root()).output().expect("run sqil")
}

fn report(out: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap()
}

/// A short, single-threaded compile of bc_hopper from `demos` (a file or folder, relative to the
/// repository) with the action box given and `extra` flags; asserts success and returns
/// policy.bin and the log. The dataset-format tests compare these bytes across formats.
fn compile_bytes(demos: &Path, extra: &[&str], out: &Path) -> (Vec<u8>, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_sqil"))
        .args(["compile", "testdata/policies/bc_hopper.onnx", "--demos"])
        .arg(demos)
        .args(["--steps", "30", "--batch", "64", "--action-box=-1,1", "--threads", "1"])
        .args(extra)
        .arg("-o")
        .arg(out)
        .current_dir(root())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}: {}", demos.display(), String::from_utf8_lossy(&o.stderr));
    (std::fs::read(out.join("policy.bin")).unwrap(), String::from_utf8_lossy(&o.stderr).to_string())
}

#[test]
fn compile_ships_the_best_held_out_candidate() {
    let dir = std::env::temp_dir().join(format!("sqil-compile-{}", std::process::id()));
    let out = dir.join("ok");
    let o = compile(&out, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let r = report(&out);
    let cands = r["candidates"].as_array().unwrap();
    let names: Vec<&str> = cands.iter().map(|c| c["name"].as_str().unwrap()).collect();
    for p in ["ptq:rtn", "ptq:mse", "ptq:awq", "ptq:gptq"] {
        assert!(names.contains(&p), "{names:?}");
    }
    assert!(names.iter().any(|n| n.starts_with("sqil@")), "{names:?}");
    let score = |c: &serde_json::Value| c["heldout"]["score"].as_f64().unwrap();
    let best_ptq = cands
        .iter()
        .filter(|c| c["name"].as_str().unwrap().starts_with("ptq:"))
        .map(score)
        .fold(f64::INFINITY, f64::min);
    let shipped: Vec<_> = cands.iter().filter(|c| c["chosen"] == true).collect();
    assert_eq!(shipped.len(), 1, "{cands:?}");
    assert_eq!(shipped[0]["name"], r["shipped"]);
    assert!(score(shipped[0]) <= best_ptq, "shipped {} vs best PTQ {best_ptq}", score(shipped[0]));
    // The artifact that shipped is what the report scored.
    assert!(
        (r["heldout_after"]["score"].as_f64().unwrap() - score(shipped[0])).abs() <= 1e-12 * score(shipped[0]).max(1.0)
    );
    // Held-out episodes are whole and disjoint from training; the demos' box was used.
    assert!(!r["split"]["validation_episodes"].as_array().unwrap().is_empty());
    assert_eq!(r["action_box"]["low"].as_array().unwrap().len(), 3);
    assert!(r["log"]["val"].as_array().unwrap().len() >= 2);
    // The artifact computes what the simulation computes, bit for bit, on every held-out state.
    assert_eq!(r["cpu_rel_diff"].as_f64(), Some(0.0));
    for f in ["model.sqil", "model.onnx", "model.fused.sqil", "policy.bin", "report.json"] {
        assert!(out.join(f).exists(), "{f}");
    }
    assert!(err.contains("shipped"), "the candidates table is printed: {err}");

    // A final check that fails (a budget nothing meets): every output is still written, and
    // the one-line error names the state and the layer.
    let bad = dir.join("bad");
    let o = compile(&bad, &["--plan-tol=-1", "--init", "gptq"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    let last = err.lines().last().unwrap_or("");
    assert!(last.contains("demonstration step") && last.contains("layer `"), "{last}");
    for f in ["model.sqil", "model.onnx", "model.fused.sqil", "policy.bin", "report.json", "checkpoint.json"] {
        assert!(bad.join(f).exists(), "{f}");
    }
    assert!(report(&bad)["cpu_mismatch"].is_string());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn compile_rejects_bad_split_and_box_flags() {
    let dir = std::env::temp_dir().join(format!("sqil-compile-flags-{}", std::process::id()));
    for (flags, want) in [
        (&["--val-frac", "0"][..], "--val-frac"),
        (&["--action-box", "1,-1"][..], "--action-box"),
        (&["--action-box", "x"][..], "--action-box"),
        (&["--steps", "0"][..], "--steps"),
        (&["--batch", "0"][..], "--batch"),
        (&["--states", "0"][..], "--states"),
        (&["--gpus", "2"][..], "--gpus 2: data-parallel fine-tuning needs --device cuda"),
        (&["--gpus", "0"][..], "--gpus"),
    ] {
        let o = compile(&dir.join("f"), flags);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(want), "{flags:?}: {err}");
        assert!(!err.contains("panicked"), "{flags:?}: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The same demonstrations as plain arrays (observations, actions, episode_starts; no metadata,
/// rewards, success or returns; float64 as numpy writes by default) compile to the same
/// policy.bin, bit for bit; states alone (no actions) compile too, the float policy's own actions
/// being the targets.
#[test]
fn plain_array_demos_compile_to_the_same_artifact() {
    use ndarray::{Array1, Array2};
    use ndarray_npy::{NpzReader, NpzWriter};
    let dir = std::env::temp_dir().join(format!("sqil-compile-plain-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut z = NpzReader::new(std::fs::File::open(root().join("testdata/demos/hopper.npz")).unwrap()).unwrap();
    let obs: Array2<f32> = z.by_name("observations.npy").unwrap();
    let act: Array2<f32> = z.by_name("actions.npy").unwrap();
    let starts: Array1<bool> = z.by_name("episode_starts.npy").unwrap();
    let plain = dir.join("plain.npz");
    let mut w = NpzWriter::new(std::fs::File::create(&plain).unwrap());
    w.add_array("observations", &obs.mapv(f64::from)).unwrap();
    w.add_array("actions", &act.mapv(f64::from)).unwrap();
    w.add_array("episode_starts", &starts).unwrap();
    w.finish().unwrap();
    let states = dir.join("states.npz");
    let mut w = NpzWriter::new(std::fs::File::create(&states).unwrap());
    w.add_array("observations", &obs).unwrap();
    w.add_array("episode_starts", &starts).unwrap();
    w.finish().unwrap();
    let big = ["--states", "500", "--val-states", "200"];
    let run = |demos: &Path, out: &Path| compile_bytes(demos, &big, out);
    let (full, _) = run(&root().join("testdata/demos/hopper.npz"), &dir.join("full"));
    let (same, _) = run(&plain, &dir.join("plain"));
    assert!(full == same, "plain arrays gave another policy.bin");
    let (_, log) = run(&states, &dir.join("states"));
    assert!(log.contains("no `actions`: the float policy's own actions are the targets"), "{log}");
    std::fs::remove_dir_all(&dir).ok();
}

/// The same demonstrations as a robomimic HDF5 dataset (written with h5py in robomimic's layout
/// by tools/make_robomimic_demos.py: observation keys `qpos` and `qvel`, float64, gzip) compile to
/// the same policy.bin as the .npz, bit for bit.
#[cfg(feature = "hdf5")]
#[test]
fn robomimic_hdf5_demos_compile_to_the_same_artifact() {
    let dir = std::env::temp_dir().join(format!("sqil-compile-h5-{}", std::process::id()));
    let run = |demos: &str, keys: &[&str], out: &Path| {
        compile_bytes(Path::new(demos), &[&["--states", "500", "--val-states", "200"][..], keys].concat(), out).0
    };
    let npz = run("testdata/demos/hopper.npz", &[], &dir.join("npz"));
    let h5 = run("testdata/demos/hopper.robomimic.hdf5", &["--obs-keys", "qpos,qvel"], &dir.join("h5"));
    assert!(npz == h5, "the robomimic dataset gave another policy.bin");
    // An unknown key is named, with the keys the file has.
    let o = Command::new(env!("CARGO_BIN_EXE_sqil"))
        .args(["compile", "testdata/policies/bc_hopper.onnx", "--demos", "testdata/demos/hopper.robomimic.hdf5"])
        .args(["--obs-keys", "qpos,nope", "--steps", "1", "-o"])
        .arg(dir.join("bad"))
        .current_dir(root())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("data/demo_0/obs/nope") && err.contains("qpos, qvel"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// A Minari dataset written by Minari's own DataCollector (tools/make_minari_demos.py: two
/// episodes of the pybullet Hopper expert, HDF5 backend) compiles, from its folder, to the same
/// policy.bin as the same steps as an .npz of arrays, bit for bit.
#[cfg(feature = "hdf5")]
#[test]
fn minari_dataset_compiles_to_the_same_artifact() {
    let dir = std::env::temp_dir().join(format!("sqil-compile-minari-{}", std::process::id()));
    let small = ["--states", "300", "--val-states", "100", "--val-frac", "0.5"];
    let run = |demos: &str, out: &Path| compile_bytes(Path::new(demos), &small, out).0;
    let npz = run("testdata/demos/minari/hopper-expert-v0.npz", &dir.join("npz"));
    let folder = run("testdata/demos/minari/hopper/expert-v0", &dir.join("minari"));
    let file = run("testdata/demos/minari/hopper/expert-v0/data/main_data.hdf5", &dir.join("file"));
    assert!(npz == folder && npz == file, "the Minari dataset gave another policy.bin");
    std::fs::remove_dir_all(&dir).ok();
}

/// A LeRobot dataset (v2.1 layout written with pyarrow by tools/make_lerobot_demos.py from the
/// Minari test steps) compiles to the same policy.bin as those steps as an .npz, bit for bit.
#[cfg(feature = "parquet")]
#[test]
fn lerobot_dataset_compiles_to_the_same_artifact() {
    let dir = std::env::temp_dir().join(format!("sqil-compile-lerobot-{}", std::process::id()));
    let small = ["--states", "300", "--val-states", "100", "--val-frac", "0.5"];
    let run = |demos: &str, out: &Path| compile_bytes(Path::new(demos), &small, out).0;
    let npz = run("testdata/demos/minari/hopper-expert-v0.npz", &dir.join("npz"));
    let lerobot = run("testdata/demos/lerobot/hopper", &dir.join("lerobot"));
    assert!(npz == lerobot, "the LeRobot dataset gave another policy.bin");
    std::fs::remove_dir_all(&dir).ok();
}

/// The library's `CompileArgs::new` is the command line's defaults: the two ways in (a build
/// script, the CLI) compile the same thing. A flag given changes only its field.
#[test]
fn library_defaults_are_the_command_lines() {
    let (model, cli) = sqil_cli::parse_compile(["compile", "m.onnx", "--demos", "d.npz", "-o", "out"]).unwrap();
    assert_eq!(model, std::path::PathBuf::from("m.onnx"));
    let lib = sqil_driver::compile::CompileArgs::new("d.npz", "out");
    assert_eq!(format!("{cli:?}"), format!("{lib:?}"));
    let (_, cli) =
        sqil_cli::parse_compile(["compile", "m.onnx", "--demos", "d.npz", "-o", "out", "--steps", "100"]).unwrap();
    let mut lib = sqil_driver::compile::CompileArgs::new("d.npz", "out");
    lib.train.steps = 100;
    lib.train.warmup = 5;
    assert_eq!(format!("{cli:?}"), format!("{lib:?}"));
    let e =
        sqil_cli::parse_compile(["compile", "m.onnx", "--demos", "d.npz", "-o", "out", "--steps", "0"]).unwrap_err();
    assert!(e.to_string().contains("steps"), "{e}");
}

#[test]
fn sis_scores_come_from_the_cache_the_second_time_with_the_same_bits() {
    let tmp = std::env::temp_dir().join(format!("sqil-sis-cache-{}", std::process::id()));
    let cache = tmp.join("cache");
    let c = cache.to_str().unwrap();
    let run = |name: &str, flags: &[&str]| {
        let out = tmp.join(name);
        let o = compile(&out, &[&["--ship", "ptq", "--threads", "1"], flags].concat());
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        (std::fs::read(out.join("policy.bin")).unwrap(), report(&out), String::from_utf8_lossy(&o.stderr).to_string())
    };
    let (first, r1, _) = run("a", &["--cache-dir", c]);
    assert_eq!(r1["sis_from_cache"], false);
    let (second, r2, log) = run("b", &["--cache-dir", c]);
    assert_eq!(r2["sis_from_cache"], true, "{log}");
    assert!(log.contains("from the cache"), "{log}");
    assert_eq!(first, second, "the same artifact from cached scores");
    assert_eq!(r1["sis_threshold"], r2["sis_threshold"]);
    // Other SIS settings are another key; --no-cache computes again.
    let (_, r3, _) = run("c", &["--cache-dir", c, "--sis-vector", "noise"]);
    assert_eq!(r3["sis_from_cache"], false);
    let (third, r4, _) = run("d", &["--no-cache"]);
    assert_eq!(r4["sis_from_cache"], false);
    assert_eq!(first, third);
    // A damaged cache file is recomputed, not trusted.
    for f in std::fs::read_dir(&cache).unwrap() {
        std::fs::write(f.unwrap().path(), b"sqilsis1garbage").unwrap();
    }
    let (_, r5, _) = run("e", &["--cache-dir", c]);
    assert_eq!(r5["sis_from_cache"], false);
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// A half-precision export of a policy (tools/make_half_policies.py: bc_hopper with float16
/// weights, inputs and outputs; and with float16 weights behind float32 inputs and outputs, Casts
/// at the boundary) compiles as the float32 model with the float16-rounded weights does: the
/// all-float16 one to the same policy.bin bit for bit, the Cast-bounded one to a policy with the
/// same actions. Its QDQ model.onnx keeps the float16 signature (a drop-in for the export): run on
/// float16 states it gives policy.bin's actions rounded to float16. Float16 demonstrations
/// compile as the same values in float64 do.
#[test]
fn half_precision_exports_and_demos_compile_as_their_values_in_f32() {
    use ndarray::{Array1, Array2};
    use ndarray_npy::{NpzReader, NpzWriter};
    use sqil_ir::DType;
    let dir = std::env::temp_dir().join(format!("sqil-compile-half-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let compile_model = |model: &str, demos: &Path, out: &Path| {
        let o = Command::new(env!("CARGO_BIN_EXE_sqil"))
            .args(["compile", model, "--demos"])
            .arg(demos)
            .args(["--steps", "30", "--batch", "64", "--action-box=-1,1", "--threads", "1", "-o"])
            .arg(out)
            .current_dir(root())
            .output()
            .unwrap();
        assert!(o.status.success(), "{model}: {}", String::from_utf8_lossy(&o.stderr));
        std::fs::read(out.join("policy.bin")).unwrap()
    };
    let run = |model: &Path, input: &str, out: &Path| {
        let o = Command::new(env!("CARGO_BIN_EXE_sqil"))
            .arg("run")
            .arg(model)
            .args(["--input", input, "--output"])
            .arg(out)
            .current_dir(root())
            .output()
            .unwrap();
        assert!(o.status.success(), "{}: {}", model.display(), String::from_utf8_lossy(&o.stderr));
        sqil_driver::npy::read(out).unwrap()
    };
    let hopper = root().join("testdata/demos/hopper.npz");
    let p = "testdata/policies/";
    let reference = compile_model(&format!("{p}bc_hopper_f16r.onnx"), &hopper, &dir.join("ref"));
    let half = compile_model(&format!("{p}bc_hopper_f16.onnx"), &hopper, &dir.join("half"));
    assert!(half == reference, "the float16 export gave another policy.bin than its weights in f32");
    compile_model(&format!("{p}bc_hopper_f16io32.onnx"), &hopper, &dir.join("io32"));
    let x32 = "testdata/policies/bc_hopper.input0.npy";
    let a_ref = run(&dir.join("ref/policy.bin"), x32, &dir.join("a_ref.npy"));
    let a_io32 = run(&dir.join("io32/policy.bin"), x32, &dir.join("a_io32.npy"));
    assert_eq!(a_ref.data, a_io32.data, "the Cast-bounded float16 export acts otherwise");
    // The QDQ export keeps float16 inputs and outputs.
    let x16 = "testdata/policies/bc_hopper_f16.input0.npy";
    let qdq = sqil_onnx::load_model(&dir.join("half/model.onnx")).unwrap();
    assert_eq!(qdq.value(sqil_ir::ValueRef { node: qdq.inputs[0], slot: 0 }).ty.dtype, DType::F16);
    assert_eq!(qdq.value(qdq.outputs[0]).ty.dtype, DType::F16);
    let q = run(&dir.join("half/model.onnx"), x16, &dir.join("q.npy"));
    let a16 = run(&dir.join("half/policy.bin"), x16, &dir.join("a16.npy"));
    assert_eq!(q.dtype(), DType::F16);
    assert_eq!(q.data, a16.cast(DType::F16).data, "model.onnx on float16 states is not policy.bin's actions");
    // Float16 demonstrations: the same artifact as their values in float64.
    let mut z = NpzReader::new(std::fs::File::open(&hopper).unwrap()).unwrap();
    let obs: Array2<f32> = z.by_name("observations.npy").unwrap();
    let act: Array2<f32> = z.by_name("actions.npy").unwrap();
    let starts: Array1<bool> = z.by_name("episode_starts.npy").unwrap();
    let h = |a: &Array2<f32>| a.mapv(|v| sqil_data::Half(sqil_data::half::f16::from_f32(v)));
    let wide = |a: &Array2<f32>| a.mapv(|v| f64::from(sqil_data::half::f16::from_f32(v)));
    for (name, f16) in [("d16.npz", true), ("d64.npz", false)] {
        let mut w = NpzWriter::new(std::fs::File::create(dir.join(name)).unwrap());
        if f16 {
            w.add_array("observations", &h(&obs)).unwrap();
            w.add_array("actions", &h(&act)).unwrap();
        } else {
            w.add_array("observations", &wide(&obs)).unwrap();
            w.add_array("actions", &wide(&act)).unwrap();
        }
        w.add_array("episode_starts", &starts).unwrap();
        w.finish().unwrap();
    }
    let m = format!("{p}bc_hopper.onnx");
    let d16 = compile_model(&m, &dir.join("d16.npz"), &dir.join("d16"));
    let d64 = compile_model(&m, &dir.join("d64.npz"), &dir.join("d64"));
    assert!(d16 == d64, "float16 demonstrations gave another policy.bin than their values in float64");
    std::fs::remove_dir_all(&dir).ok();
}
