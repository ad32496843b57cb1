"""A short closed-loop evaluation per task (the full table is tools/make_tasks.py): the experts
and the committed BC policies still succeed, and the eval JSON has what the docs promise."""

import pathlib
import sys

import numpy as np
import pytest

HERE = pathlib.Path(__file__).resolve().parent.parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from eval import evaluate  # noqa: E402
from sqil_tools.rollout import wilson  # noqa: E402


SIM_MODULE = {"hopper": "pybullet_envs_gymnasium", "lander": "Box2D", "pickplace": "metaworld",
              "pickplace-pixels": "metaworld"}


@pytest.mark.parametrize("task,episodes", [("hopper", 2), ("lander", 5), ("pickplace", 2), ("pickplace-pixels", 1)])
def test_expert_and_bc_succeed(task, episodes):
    # Meta-World lives in its own venv (tools/.venv-mw); tools/test.sh runs this file in both.
    pytest.importorskip(SIM_MODULE[task], reason=f"{task}'s simulator is not in this venv")
    for spec in ("expert", str(ROOT / "testdata" / "policies" / f"bc_{task.replace('-', '_')}.onnx")):
        r = evaluate(task, spec, episodes, 0)
        assert r["success_rate"] >= 0.8, r
        assert len(r["per_episode"]) == episodes and r["per_episode"][0]["seed"] == 0
        lo, hi = r["success_ci95"]
        assert 0.0 <= lo <= r["success_rate"] <= hi <= 1.0


def test_wilson_interval():
    lo, hi = wilson(49, 50)
    assert 0.89 < lo < 0.9 and 0.99 < hi <= 1.0
    assert wilson(0, 10)[0] == 0.0


def test_demos_subsets_follow_the_format():
    for task, od, ad in [("hopper", 15, 3), ("lander", 8, 2), ("pickplace", 39, 4), ("pickplace-pixels", 7, 4)]:
        d = np.load(ROOT / "testdata" / "demos" / f"{task}.npz")
        assert d["observations"].dtype == np.float32 and d["observations"].shape[1] == od
        assert d["actions"].shape == (len(d["observations"]), ad)
        assert d["episode_starts"][0] and d["episode_starts"].sum() == len(d["success"])


def test_pixel_demos_hold_frames():
    d = np.load(ROOT / "testdata" / "demos" / "pickplace-pixels.npz")
    assert d["images"].dtype == np.uint8 and d["images"].shape == (len(d["observations"]), 3, 84, 84)
    assert 20 < d["images"].mean() < 235  # a rendered scene, not a blank frame
