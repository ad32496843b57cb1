"""The pretrained HopperBulletEnv-v0 policy shipped inside the `pybullet` wheel."""

import ast
import importlib.util
import pathlib

import numpy as np


def expert_source() -> pathlib.Path:
    # Locate the package without importing it (pybullet_envs/__init__ imports gym).
    pkg = pathlib.Path(importlib.util.find_spec("pybullet_envs").submodule_search_locations[0])
    return pkg / "examples" / "enjoy_TF_HopperBulletEnv_v0_2017may.py"


def hopper_weights():
    """Weight arrays of the example's SmallReactivePolicy (15-128-64-3, ReLU), read with `ast`
    so the example (which needs gym and a GUI) is never run. Returns (weights, source path)."""
    src = expert_source()
    tree = ast.parse(src.read_text())
    env = {"np": np}
    for node in tree.body:
        if isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) and t.id.startswith("weights_") for t in node.targets):
            exec(compile(ast.Module([node], []), str(src), "exec"), env)
    return {k: np.asarray(v, dtype=np.float32) for k, v in env.items() if k.startswith("weights_")}, src


class HopperExpert:
    """numpy forward pass, exactly the example's `act`."""

    def __init__(self):
        self.w, _ = hopper_weights()

    def __call__(self, obs, env=None):
        w = self.w
        x = np.maximum(obs @ w["weights_dense1_w"] + w["weights_dense1_b"], 0)
        x = np.maximum(x @ w["weights_dense2_w"] + w["weights_dense2_b"], 0)
        return (x @ w["weights_final_w"] + w["weights_final_b"]).astype(np.float32)
