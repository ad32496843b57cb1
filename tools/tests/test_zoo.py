"""The benchmark zoo (tools/sqil_tools/zoo.py) through sqil: each model (MobileNetV2, MobileNetV3 with
its HardSigmoid gates, EfficientNet-B0, an ACT decoder, a diffusion 1-D U-Net step) imports and runs
in sqil's interpreter as onnxruntime (optimisations off) runs it; quantized W4A8 it compiles to a
CPU artifact whose `sqil bench --profile` names each step's path, with the ops that have f32 kernels
(depthwise Conv, the activations, LayerNormalization, Softmax, the reductions, ...) off the
reference path; and it lowers for the GPU (`sqil build --target cuda`, no device needed). Needs the
sqil CLI (SQIL_BIN, default target/debug/sqil)."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

# The Meta-World venv collects this file too (for its own tests) and has neither.
pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

HERE = pathlib.Path(__file__).resolve().parent.parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from sqil_tools import zoo  # noqa: E402

SQIL = os.environ.get("SQIL_BIN", str(ROOT / "target" / "debug" / "sqil"))
FAST = {"Conv", "Sigmoid", "Tanh", "Softplus", "Clip", "LayerNormalization", "Softmax", "ConvTranspose", "MatMul",
        "GlobalAveragePool", "ReduceMean", "HardSwish"}


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_zoo_model_runs_in_sqil_as_in_onnxruntime_and_off_the_reference_path(name, tmp_path):
    model = tmp_path / f"{name}.onnx"
    shapes = zoo.ZOO[name](model)
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal([2, *s[1:]]).astype(np.float32) for s in shapes]
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    outs = sess.run(None, {i.name: x for i, x in zip(sess.get_inputs(), xs)})
    want = outs[0]
    ins = []
    for i, x in enumerate(xs):
        np.save(tmp_path / f"x{i}.npy", x)
        ins += ["--input", str(tmp_path / f"x{i}.npy")]
    subprocess.run([SQIL, "run", str(model), *ins, "--output", str(tmp_path / "y.npy")], check=True, capture_output=True)
    got = np.load(tmp_path / "y.npy")
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))

    cal = []
    for i, s in enumerate(shapes):
        np.save(tmp_path / f"c{i}.npy", rng.standard_normal([8, *s[1:]]).astype(np.float32))
        cal += ["--calib", str(tmp_path / f"c{i}.npy")]
    art = tmp_path / "w4a8.bin"
    subprocess.run([SQIL, "quantize", str(model), "--recipe", "rtn", "--wbits", "4", "--abits", "8", "--group", "64", *cal,
                    "-o", str(tmp_path / "q.onnx"), "--artifact", str(art)], check=True, capture_output=True)
    r = subprocess.run([SQIL, "bench", str(art), "--batch", "1", "--iters", "2", "--profile"],
                       check=True, capture_output=True, text=True)
    lines = [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]
    steps = [l for l in lines if "step" in l]
    summary = next(l for l in lines if "reference_share" in l)
    inside = ("epilogue (fused)", "fused into the step before", "fused into the step after")
    paths = {"int4 kernel", "f32 kernel", "data movement", "reference (f64)", *inside}
    assert steps and {s["path"] for s in steps} <= paths
    # A step run inside another (its epilogue, its pass, its input) takes no time of its own.
    assert all(s["mean_us"] == 0 for s in steps if s["path"] in inside)
    on_reference = {s["step"].split(": ", 1)[-1] for s in steps if s["path"] == "reference (f64)"}
    assert not on_reference & FAST, f"{name}: {on_reference & FAST} on the reference path"
    assert set(summary["reference_ops"]) == on_reference
    shares = sum(summary[k] for k in ("reference_share", "f32_kernel_share", "int4_kernel_share", "data_movement_share"))
    assert abs(shares - 1.0) < 0.01

    # The artifact lowers for the GPU too (no device needed): a standalone CUDA file with one
    # launch per step, the outputs gathered into one action vector of every output's values.
    cu = tmp_path / "policy.cu"
    r = subprocess.run([SQIL, "build", str(art), "--target", "cuda", "-o", str(cu)], capture_output=True, text=True)
    assert r.returncode == 0, f"{name}: {r.stderr}"
    src = cu.read_text()
    assert src.count("<<<") > 0 and "cudaGraphLaunch" in src
    out_len = sum(o.size // o.shape[0] for o in outs)
    assert f"#define OUT_LEN {out_len}" in src, f"{name}: OUT_LEN is not {out_len}"

