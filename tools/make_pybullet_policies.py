"""Exports the pretrained locomotion MLPs the pybullet wheel ships (besides Hopper, which
tools/make_testdata.py exports) to testdata/policies/<task>_mlp.onnx with onnxruntime reference
outputs on 8 states of their demonstrations (demos/<task>.npz, tools/record_demos.py), and
registers them in testdata/policies/manifest.json so every cross-check covers them.

    tools/.venv-dev/bin/python tools/make_pybullet_policies.py
"""

import hashlib
import json
import os
import pathlib
import sys
from importlib.metadata import version

import numpy as np
import onnxruntime as ort

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = ROOT / "testdata" / "policies"
sys.path.insert(0, str(HERE))
from sqil_tools.pybullet_mlp import export_onnx, source  # noqa: E402

POLICIES = {"halfcheetah": "HalfCheetahBulletEnv-v0", "walker2d": "Walker2DBulletEnv-v0", "humanoid": "HumanoidBulletEnv-v0"}


def main():
    man_path = OUT / "manifest.json"
    manifest = json.loads(man_path.read_text())
    for task, env_id in POLICIES.items():
        name = f"{task}_mlp"
        path = OUT / f"{name}.onnx"
        m = export_onnx(env_id, path)
        d = np.load(ROOT / "demos" / f"{task}.npz")
        x = d["observations"][np.arange(0, len(d["observations"]), 97)[:8]].astype(np.float32)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        y = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, {"obs": x})[0]
        np.save(OUT / f"{name}.input0.npy", x)
        np.save(OUT / f"{name}.ort0.npy", y)
        entry = {"file": path.name,
                 "made_by": f"pretrained weights from the pybullet {version('pybullet')} wheel ({source(env_id).name}), "
                            "exported by tools/make_pybullet_policies.py (onnx.helper)",
                 "opset": 17, "ir_version": m.ir_version,
                 "pytorch_parameters": int(sum(np.prod(i.dims) for i in m.graph.initializer)),  # the shift is a buffer
                 "inputs": {"obs": list(x.shape)}, "outputs": 1,
                 "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "source": "pybullet wheel, trained by its authors"}
        manifest["models"] = [e for e in manifest["models"] if e["file"] != path.name] + [entry]
        print(name, entry["pytorch_parameters"], "parameters")
    tmp = man_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, man_path)


if __name__ == "__main__":
    main()
