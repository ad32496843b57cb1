"""Quantized ONNX export against sqil's own simulation: for every testdata policy at W8A8, W4A8
and W4A16 (and W3A8, W4A4 g32 for coverage), `sqil quantize` writes QDQ ONNX (opset 21) and the
FakeQuant IR; onnxruntime (graph optimisations off) on the ONNX must match sqil's interpreter on
the IR within 1e-5, and the compiled CPU artifact (`--artifact`, loaded by the binding onto the
runtime's int4 kernels) must match it within 1e-5 of the action scale. Needs the sqil CLI (SQIL_BIN,
default target/debug/sqil) and the binding."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest

HERE = pathlib.Path(__file__).resolve().parent.parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE / ".binding"))

import sqil  # noqa: E402

POLICIES = ROOT / "testdata" / "policies"
MODELS = [m["file"] for m in json.loads((POLICIES / "manifest.json").read_text())["models"]]
SQIL = os.environ.get("SQIL_BIN", str(ROOT / "target" / "debug" / "sqil"))
CONFIGS = {
    "W8A8": ["--wbits", "8", "--abits", "8", "--group", "channel"],
    "W4A8": ["--wbits", "4", "--abits", "8", "--group", "64"],
    "W4A16": ["--wbits", "4", "--abits", "float", "--group", "64"],
    "W3A8": ["--wbits", "3", "--abits", "8", "--group", "32", "--set", "wsym=false"],
    "W4A4": ["--wbits", "4", "--abits", "4", "--group", "32", "--set", "asym=true"],
}
RECIPE = {"W8A8": "rtn", "W4A8": "gptq", "W4A16": "awq", "W3A8": "mse", "W4A4": "rtn"}


def ort_run(path, inputs):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return s.run(None, {i.name: x for i, x in zip(s.get_inputs(), inputs)})


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("file", MODELS)
def test_qdq_export_matches_simulation(file, config, tmp_path):
    name = file[: -len(".onnx")]
    inputs = sorted(POLICIES.glob(f"{name}.input*.npy"))
    out, ir, art = tmp_path / "q.onnx", tmp_path / "q.sqil", tmp_path / "policy.bin"
    calib = [a for p in inputs for a in ("--calib", str(p))]
    r = subprocess.run([SQIL, "quantize", str(POLICIES / file), "--recipe", RECIPE[config], *CONFIGS[config], *calib,
                        "-o", str(out), "--ir", str(ir), "--artifact", str(art)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    xs = [np.load(p) for p in inputs]
    sim = sqil.Policy(str(ir)).run(*xs)
    got = ort_run(out, xs)
    assert len(sim) == len(got)
    for a, b in zip(sim, got):
        assert a.shape == b.shape
        assert np.abs(a - b).max() < 1e-5, f"{file} {config}: max |sim - ort| = {np.abs(a - b).max():.3g}"
    # The compiled CPU artifact, through the binding, runs the same policy (int4 kernels).
    compiled = sqil.Policy(str(art))
    assert compiled.compiled
    for a, b in zip(sim, compiled.run(*xs)):
        assert np.abs(a - b).max() <= 1e-5 * max(np.abs(a).max(), 1e-6), f"{file} {config}: artifact vs simulation"
    # The quantized model must differ from the float one (a test that can fail).
    fp = ort_run(POLICIES / file, xs)[0]
    assert np.abs(sim[0] - fp).max() > 0


def test_quantize_rejects_bad_settings(tmp_path):
    r = subprocess.run([SQIL, "quantize", str(POLICIES / "mlp.onnx"), "--wbits", "5", "--calib",
                        str(POLICIES / "mlp.input0.npy"), "-o", str(tmp_path / "x.onnx")], capture_output=True, text=True)
    assert r.returncode != 0 and "weight bits" in r.stderr
