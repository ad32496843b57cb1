"""Builds the ONNX policies in testdata/policies/ and their reference data.

Material no one here wrote: the pretrained HopperBulletEnv-v0 MLP whose weights ship inside the
`pybullet` wheel (pybullet_envs/examples/enjoy_TF_HopperBulletEnv_v0_2017may.py). Plus PyTorch
exports, with fixed seeds and random weights, of an MLP, a CNN (NHWC input, Transpose inside)
and a transformer-encoder policy, to cover the op set; a QDQ int4/int8 model built with
onnx.helper; and variants exercising opset 11, Constant-node initializers and external data.

For every model: `<name>.input.npy` (a seeded batch) and `<name>.ort.npy` (onnxruntime outputs
with graph optimisations disabled), and an entry in manifest.json with the parameter count
PyTorch reports. Run: tools/.venv-dev/bin/python tools/make_testdata.py
"""

import hashlib
import json
import os
import pathlib

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from sqil_tools.hopper import hopper_weights
from sqil_tools.models import Block

torch.set_num_threads(1)
ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "testdata" / "policies"
MANIFEST = []


class HopperMLP(torch.nn.Module):
    def __init__(self, w):
        super().__init__()
        dims = [("dense1", 15, 128), ("dense2", 128, 64), ("final", 64, 3)]
        self.layers = torch.nn.ModuleList()
        for name, i, o in dims:
            lin = torch.nn.Linear(i, o)
            lin.weight.data = torch.from_numpy(w[f"weights_{name}_w"].T.copy())
            lin.bias.data = torch.from_numpy(w[f"weights_{name}_b"].copy())
            self.layers.append(lin)

    def forward(self, obs):
        x = torch.relu(self.layers[0](obs))
        x = torch.relu(self.layers[1](x))
        return self.layers[2](x)


class MLP(torch.nn.Module):
    """A behaviour-cloning MLP head: LayerNorm on the input, 2x256 hidden, tanh-squashed actions."""

    def __init__(self, obs=39, act=4):
        super().__init__()
        self.norm = torch.nn.LayerNorm(obs)
        self.fc1 = torch.nn.Linear(obs, 256)
        self.fc2 = torch.nn.Linear(256, 256)
        self.out = torch.nn.Linear(256, act)

    def forward(self, obs):
        x = self.norm(obs)
        x = torch.nn.functional.elu(self.fc1(x))
        x = torch.nn.functional.gelu(self.fc2(x), approximate="tanh")
        return torch.tanh(self.out(x)).clamp(-0.99, 0.99)


class CNN(torch.nn.Module):
    """Pixels (NHWC, as a camera gives them) plus proprioception -> actions."""

    def __init__(self, act=4, proprio=9):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 16, 5, stride=2, padding=2)
        self.bn1 = torch.nn.BatchNorm2d(16)
        self.c2 = torch.nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.dw = torch.nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.pw = torch.nn.Conv2d(32, 32, 1)
        self.pool = torch.nn.MaxPool2d(2)
        self.avg = torch.nn.AvgPool2d(2)
        self.fc = torch.nn.Linear(32 + proprio, 64)
        self.prelu = torch.nn.PReLU(64)
        self.head = torch.nn.Linear(64, act)

    def forward(self, image, proprio):
        x = image.permute(0, 3, 1, 2) / 255.0
        x = torch.relu(self.bn1(self.c1(x)))
        x = torch.nn.functional.leaky_relu(self.c2(x), 0.1)
        x = self.pool(x)
        x = torch.nn.functional.softplus(self.pw(self.dw(x)))
        x = self.avg(x)
        x = torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
        x = self.prelu(self.fc(torch.cat([x, proprio], dim=1)))
        return torch.sigmoid(self.head(x)) * 2 - 1


class Transformer(torch.nn.Module):
    """Observation history (8 steps) -> a chunk of 4 future actions."""

    def __init__(self, obs=39, act=4, d=64, hist=8, chunk=4, layers=2):
        super().__init__()
        self.embed = torch.nn.Linear(obs, d)
        self.pos = torch.nn.Parameter(torch.randn(1, hist, d) * 0.02)
        self.blocks = torch.nn.ModuleList([Block(d, 4, 128) for _ in range(layers)])
        self.norm = torch.nn.LayerNorm(d)
        self.head = torch.nn.Linear(d, act * chunk)
        self.act, self.chunk = act, chunk

    def forward(self, history):
        x = self.embed(history) + self.pos
        for b in self.blocks:
            x = b(x)
        last = self.norm(x[:, -1])
        return self.head(last).reshape(-1, self.chunk, self.act)


def params(m):
    return int(sum(p.numel() for p in m.parameters()))


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ort_run(path, feeds):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return s.run(None, feeds)


def save_refs(name, path, feeds):
    """Writes inputs and onnxruntime outputs: <name>.input<k>.npy, <name>.ort<k>.npy."""
    outs = ort_run(path, feeds)
    for k, v in enumerate(feeds.values()):
        np.save(OUT / f"{name}.input{k}.npy", v)
    for k, v in enumerate(outs):
        np.save(OUT / f"{name}.ort{k}.npy", v)
    return len(outs)


def jitter(model):
    """Random weights should look trained: no two parameters identical (exporters merge identical
    initializers, such as freshly initialised LayerNorm weights, into one)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def export(name, model, args, names, how, opset=17, dynamo=False, extra=None, fold=True):
    model.eval()
    path = OUT / f"{name}.onnx"
    dyn = {n: {0: "batch"} for n in names[0]}
    if dynamo:
        torch.onnx.export(model, args, str(path), input_names=names[0], output_names=names[1], dynamo=True,
                          external_data=True, dynamic_shapes=tuple({0: torch.export.Dim("batch", min=1, max=1024)} for _ in args),
                          optimize=True)
    else:
        torch.onnx.export(model, args, str(path), input_names=names[0], output_names=names[1], opset_version=opset,
                          dynamo=False, do_constant_folding=fold, dynamic_axes={**dyn, **{n: {0: "batch"} for n in names[1]}})
    m = onnx.load(str(path))
    onnx.checker.check_model(m)
    feeds = {n: a.detach().numpy() for n, a in zip(names[0], args)}
    n_out = save_refs(name, path, feeds)
    entry = {
        "file": path.name,
        "made_by": how,
        "opset": max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")),
        "ir_version": m.ir_version,
        "pytorch_parameters": params(model),
        "inputs": {n: list(a.shape) for n, a in feeds.items()},
        "outputs": n_out,
        "sha256": sha(path),
    }
    if dynamo:
        entry["external_data"] = path.name + ".data"
    entry.update(extra or {})
    MANIFEST.append(entry)
    return path


def constants_as_nodes(src, dst):
    """Same model with every initializer stored as a Constant node (as some exporters do)."""
    m = onnx.load(str(src))
    nodes = [helper.make_node("Constant", [], [t.name], value=t, name=f"const_{t.name}") for t in m.graph.initializer]
    del m.graph.initializer[:]
    rest = list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(nodes + rest)
    onnx.save(m, str(dst))


def int4_qdq(w):
    """The Hopper MLP with int4 block-quantised weights (DequantizeLinear, opset 21, block 16)
    and int8 QDQ on hidden activations: the shape of model sqil's QDQ export writes."""
    nodes, inits = [], []
    x = "obs"
    layers = [("dense1", 15, 128), ("dense2", 128, 64), ("final", 64, 3)]
    for li, (name, i, o) in enumerate(layers):
        W = w[f"weights_{name}_w"]  # [in, out]
        blk = 16
        pad = (-i) % blk
        Wp = np.pad(W, ((0, pad), (0, 0)))
        g = Wp.reshape(-1, blk, o)
        scale = (np.abs(g).max(axis=1) / 7.0).astype(np.float32)  # [in/blk, out]
        scale[scale == 0] = 1.0
        q = np.clip(np.rint(g / scale[:, None, :]), -8, 7).astype(np.int8).reshape(-1, o)[:i]
        inits += [
            numpy_helper.from_array(q, f"{name}.wq"),
            numpy_helper.from_array(scale, f"{name}.ws"),
            numpy_helper.from_array(w[f"weights_{name}_b"], f"{name}.b"),
        ]
        inits[-3].data_type = TensorProto.INT4
        inits[-3].raw_data = pack_int4(q)
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}.wq", f"{name}.ws"], [f"{name}.w"], axis=0, block_size=blk, name=f"{name}/dq_w"))
        nodes.append(helper.make_node("MatMul", [x, f"{name}.w"], [f"{name}.mm"], name=f"{name}/matmul"))
        nodes.append(helper.make_node("Add", [f"{name}.mm", f"{name}.b"], [f"{name}.y"], name=f"{name}/add"))
        x = f"{name}.y"
        if li < 2:
            nodes.append(helper.make_node("Relu", [x], [f"{name}.r"], name=f"{name}/relu"))
            a_scale = np.float32(0.05 if li == 0 else 0.1)
            inits += [numpy_helper.from_array(np.array(a_scale), f"{name}.as"), numpy_helper.from_array(np.array(0, dtype=np.uint8), f"{name}.azp")]
            nodes.append(helper.make_node("QuantizeLinear", [f"{name}.r", f"{name}.as", f"{name}.azp"], [f"{name}.q"], name=f"{name}/q_act"))
            nodes.append(helper.make_node("DequantizeLinear", [f"{name}.q", f"{name}.as", f"{name}.azp"], [f"{name}.dq"], name=f"{name}/dq_act"))
            x = f"{name}.dq"
    g = helper.make_graph(nodes, "hopper_w4a8", [helper.make_tensor_value_info("obs", TensorProto.FLOAT, ["batch", 15])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", 3])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], producer_name="sqil tools/make_testdata.py")
    m.ir_version = 10
    onnx.checker.check_model(m)
    return m


def pack_int4(q):
    flat = (q.astype(np.int16).ravel() & 0xF).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, 0)
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for f in OUT.iterdir():
        if not f.name.startswith("bc_") and f.name != "manifest.json":
            f.unlink()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    w, src = hopper_weights()
    hop = HopperMLP(w)
    # Observations on the scale the HopperBulletEnv produces (mostly within [-2, 2]).
    obs = torch.from_numpy(rng.normal(0, 1, (8, 15)).astype(np.float32))
    how = f"pretrained weights from the pybullet {pybullet_version()} wheel ({src.name}), exported by torch.onnx (TorchScript exporter)"
    p = export("hopper_mlp", hop, (obs,), (["obs"], ["action"]), how, opset=17, extra={"source": "pybullet wheel, trained by its authors"})
    export("hopper_mlp_opset11", hop, (obs,), (["obs"], ["action"]), how + ", opset 11", opset=11)
    constants_as_nodes(p, OUT / "hopper_mlp_constnodes.onnx")
    save_refs("hopper_mlp_constnodes", OUT / "hopper_mlp_constnodes.onnx", {"obs": obs.numpy()})
    MANIFEST.append({"file": "hopper_mlp_constnodes.onnx", "made_by": "hopper_mlp.onnx with every initializer moved into a Constant node",
                     "opset": 17, "pytorch_parameters": params(hop), "inputs": {"obs": [8, 15]}, "outputs": 1,
                     "sha256": sha(OUT / "hopper_mlp_constnodes.onnx")})
    q = int4_qdq(w)
    onnx.save(q, str(OUT / "hopper_w4a8_qdq.onnx"))
    save_refs("hopper_w4a8_qdq", OUT / "hopper_w4a8_qdq.onnx", {"obs": obs.numpy()})
    MANIFEST.append({"file": "hopper_w4a8_qdq.onnx", "made_by": "onnx.helper: the Hopper MLP with int4 weights (block 16 along the input axis, symmetric absmax) and uint8 QDQ activations, opset 21",
                     "opset": 21, "pytorch_parameters": params(hop), "inputs": {"obs": [8, 15]}, "outputs": 1, "int4": True,
                     "sha256": sha(OUT / "hopper_w4a8_qdq.onnx")})

    torch.manual_seed(1)
    mlp = jitter(MLP())
    x = torch.randn(8, 39)
    export("mlp", mlp, (x,), (["obs"], ["action"]), "torch.onnx TorchScript exporter, random weights (seed 1)")
    export("mlp_dynamo", mlp, (x,), (["obs"], ["action"]), "torch.onnx dynamo exporter with external data, random weights (seed 1)", dynamo=True)

    torch.manual_seed(2)
    cnn = jitter(CNN())
    with torch.no_grad():
        cnn.bn1.running_mean.uniform_(-0.1, 0.1)
        cnn.bn1.running_var.uniform_(0.5, 1.5)
    img = torch.randint(0, 256, (4, 64, 64, 3)).float()
    prop = torch.randn(4, 9)
    export("cnn", cnn, (img, prop), (["image", "proprio"], ["action"]), "torch.onnx TorchScript exporter without constant folding (keeps BatchNormalization), random weights (seed 2); NHWC image input", fold=False)

    torch.manual_seed(3)
    tf = jitter(Transformer())
    hist = torch.randn(4, 8, 39)
    export("transformer", tf, (hist,), (["history"], ["actions"]), "torch.onnx TorchScript exporter, random weights (seed 3)")
    export("transformer_dynamo", tf, (hist,), (["history"], ["actions"]), "torch.onnx dynamo exporter with external data, random weights (seed 3)", dynamo=True)

    old = json.loads((OUT / "manifest.json").read_text())["models"] if (OUT / "manifest.json").exists() else []
    keep = [e for e in old if e["file"].startswith("bc_")]  # made by tools/make_tasks.py
    (OUT / "manifest.json").write_text(json.dumps({"generator": "tools/make_testdata.py (bc_*: tools/make_tasks.py)",
                                                     "torch": torch.__version__, "onnx": onnx.__version__,
                                                     "onnxruntime": ort.__version__, "models": MANIFEST + keep}, indent=2) + "\n")
    for f in sorted(OUT.iterdir()):
        print(f"{f.stat().st_size:>9}  {f.name}")


def pybullet_version():
    from importlib.metadata import version

    return version("pybullet")


if __name__ == "__main__":
    main()
