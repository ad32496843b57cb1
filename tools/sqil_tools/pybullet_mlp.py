"""The pretrained locomotion MLPs shipped inside the `pybullet` wheel
(`pybullet_envs/examples/enjoy_TF_<Env>_2017may.py`, trained by the wheel's authors): weights read
with `ast` so the examples (which need gym and a GUI) never run, a numpy expert that is exactly
the example's `act`, and an ONNX export built with onnx.helper (no PyTorch needed)."""

import ast
import importlib.util
import pathlib

import numpy as np

# Environment -> the example's observation shift (`ob[i] += c` before the first layer).
SHIFTS = {
    "HopperBulletEnv-v0": {},
    "HalfCheetahBulletEnv-v0": {},
    "Walker2DBulletEnv-v0": {},
    "HumanoidBulletEnv-v0": {0: -1.4 + 0.8},
}


def source(env_id: str) -> pathlib.Path:
    # Locate the package without importing it (pybullet_envs/__init__ imports gym).
    pkg = pathlib.Path(importlib.util.find_spec("pybullet_envs").submodule_search_locations[0])
    return pkg / "examples" / f"enjoy_TF_{env_id.replace('-', '_')}_2017may.py"


def weights(env_id: str):
    """Weight arrays of the example's SmallReactivePolicy (obs-h1-h2-act, ReLU). Returns
    (weights, source path)."""
    src = source(env_id)
    tree = ast.parse(src.read_text())
    env = {"np": np}
    for node in tree.body:
        if isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) and t.id.startswith("weights_") for t in node.targets):
            exec(compile(ast.Module([node], []), str(src), "exec"), env)
    return {k: np.asarray(v, dtype=np.float32) for k, v in env.items() if k.startswith("weights_")}, src


class PretrainedMLP:
    """numpy forward pass, exactly the example's `act` (the shift applied to a copy)."""

    def __init__(self, env_id: str):
        self.w, _ = weights(env_id)
        self.shift = SHIFTS[env_id]

    def __call__(self, obs, env=None):
        w = self.w
        x = np.array(obs, dtype=np.float32, copy=True)
        for i, c in self.shift.items():
            x[..., i] += np.float32(c)
        x = np.maximum(x @ w["weights_dense1_w"] + w["weights_dense1_b"], 0)
        x = np.maximum(x @ w["weights_dense2_w"] + w["weights_dense2_b"], 0)
        return (x @ w["weights_final_w"] + w["weights_final_b"]).astype(np.float32)


def export_onnx(env_id: str, path: pathlib.Path, opset: int = 17):
    """The policy as ONNX: [N, obs] -> [N, act] (Add of the observation shift if the example has
    one, then MatMul + Add + Relu twice, MatMul + Add); unclipped actions, as the example returns."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w, src = weights(env_id)
    d_in, d_out = w["weights_dense1_w"].shape[0], w["weights_final_w"].shape[1]
    inits, nodes, x = [], [], "obs"
    shift = SHIFTS[env_id]
    if shift:
        s = np.zeros(d_in, np.float32)
        for i, c in shift.items():
            s[i] = c
        inits.append(numpy_helper.from_array(s, "obs_shift"))
        nodes.append(helper.make_node("Add", [x, "obs_shift"], ["obs_shifted"], name="shift"))
        x = "obs_shifted"
    for i, (wn, bn) in enumerate([("dense1", True), ("dense2", True), ("final", False)]):
        inits += [numpy_helper.from_array(w[f"weights_{wn}_w"], f"{wn}.weight"), numpy_helper.from_array(w[f"weights_{wn}_b"], f"{wn}.bias")]
        nodes.append(helper.make_node("MatMul", [x, f"{wn}.weight"], [f"{wn}.mm"], name=f"{wn}/MatMul"))
        y = "action" if wn == "final" else f"{wn}.pre"
        nodes.append(helper.make_node("Add", [f"{wn}.mm", f"{wn}.bias"], [y], name=f"{wn}/Add"))
        if bn:
            nodes.append(helper.make_node("Relu", [y], [f"{wn}.out"], name=f"{wn}/Relu"))
            x = f"{wn}.out"
    g = helper.make_graph(nodes, env_id.split("Bullet")[0].lower() + "_mlp",
                          [helper.make_tensor_value_info("obs", TensorProto.FLOAT, ["N", d_in])],
                          [helper.make_tensor_value_info("action", TensorProto.FLOAT, ["N", d_out])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], producer_name="sqil tools/sqil_tools/pybullet_mlp.py")
    m.ir_version = 8
    m.doc_string = f"pretrained weights from the pybullet wheel ({src.name}), trained by its authors"
    onnx.checker.check_model(m)
    tmp = pathlib.Path(str(path) + ".tmp")
    onnx.save(m, tmp)
    tmp.replace(path)
    return m
