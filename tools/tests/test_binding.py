"""sqil's Python binding against onnxruntime: same actions on every testdata policy, and the
same closed-loop results on a few seeded episodes. Needs tools/build_binding.sh first."""

import json
import pathlib
import sys

import numpy as np
import pytest

HERE = pathlib.Path(__file__).resolve().parent.parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE / ".binding"))
sys.path.insert(0, str(HERE))

import sqil  # noqa: E402
from eval import evaluate  # noqa: E402

POLICIES = ROOT / "testdata" / "policies"
MODELS = [m["file"] for m in json.loads((POLICIES / "manifest.json").read_text())["models"]]


@pytest.mark.parametrize("file", MODELS)
def test_binding_matches_onnxruntime(file):
    name = file[: -len(".onnx")]
    p = sqil.Policy(str(POLICIES / file))
    inputs = [np.load(f) for f in sorted(POLICIES.glob(f"{name}.input*.npy"))]
    refs = [np.load(f) for f in sorted(POLICIES.glob(f"{name}.ort*.npy"))]
    outs = p.run(*inputs)
    assert len(outs) == len(refs)
    for o, r in zip(outs, refs):
        assert o.shape == r.shape
        assert np.abs(o - r).max() < 1e-5


@pytest.mark.parametrize("task", ["hopper", "lander", "pickplace"])
def test_bc_policy_binding_equals_onnxruntime_in_closed_loop(task):
    pytest.importorskip({"hopper": "pybullet_envs_gymnasium", "lander": "Box2D", "pickplace": "metaworld"}[task],
                        reason=f"{task}'s simulator is not in this venv")
    policy = POLICIES / f"bc_{task}.onnx"
    x = np.random.default_rng(0).normal(size=(16, {"hopper": 15, "lander": 8, "pickplace": 39}[task])).astype(np.float32)
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ref = ort.InferenceSession(str(policy), so, providers=["CPUExecutionProvider"]).run(None, {"obs": x})[0]
    assert np.abs(sqil.Policy(str(policy)).act(x) - ref).max() < 1e-5
    episodes = 5 if task == "lander" else 2
    a = evaluate(task, str(policy), episodes, 0)
    b = evaluate(task, f"sqil:{policy}", episodes, 0)
    assert [e["success"] for e in a["per_episode"]] == [e["success"] for e in b["per_episode"]]
    for x, y in zip(a["per_episode"], b["per_episode"]):
        assert abs(x["return"] - y["return"]) <= 0.02 * abs(x["return"]) + 1.0, (x, y)


def test_load_and_call():
    p = sqil.load(str(POLICIES / "bc_pickplace_pixels.onnx"))
    assert p.input_names == ["image", "proprio"]
    x = [np.load(POLICIES / f"bc_pickplace_pixels.input{k}.npy") for k in range(2)]
    assert np.abs(p(*x) - np.load(POLICIES / "bc_pickplace_pixels.ort0.npy")).max() < 1e-5


def test_bad_paths_raise_value_error():
    with pytest.raises(ValueError, match="missing.onnx"):
        sqil.Policy("missing.onnx")
    p = sqil.Policy(str(POLICIES / "hopper_mlp.onnx"))
    with pytest.raises(ValueError, match="takes 1 input"):
        p.run()


def test_pixel_policy_binding_equals_onnxruntime_in_closed_loop():
    pytest.importorskip("metaworld", reason="pickplace-pixels' simulator is not in this venv")
    policy = POLICIES / "bc_pickplace_pixels.onnx"
    a = evaluate("pickplace-pixels", str(policy), 1, 0)
    b = evaluate("pickplace-pixels", f"sqil:{policy}", 1, 0)
    assert a["per_episode"][0]["success"] == b["per_episode"][0]["success"]
    assert abs(a["return_mean"] - b["return_mean"]) <= 0.02 * abs(a["return_mean"]) + 1.0
