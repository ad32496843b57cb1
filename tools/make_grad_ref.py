"""Reference gradients from PyTorch autograd for the whole-policy gradient check of sqil's `grad`
pass: the hopper BC policy at W4A8 (weights 4-bit in groups of 64, layer inputs 8-bit per tensor),
quantized by `sqil quantize` (RTN), fine-tuning loss = QRD on a fixed batch. Writes
testdata/grad/bc_hopper_w4a8.sqil (sqil's FakeQuant graph) and testdata/grad/bc_hopper_w4a8.npz
(inputs, targets, and d loss / d parameter for every weight, bias and LSQ step, keyed by the
parameter's name in the graph).

    tools/.venv-dev/bin/python tools/make_grad_ref.py
"""

import pathlib
import subprocess
import tempfile

import numpy as np
import onnx
import torch
from onnx import numpy_helper

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "testdata" / "grad"
torch.set_num_threads(1)


def fake_quant(x, s, z, bits, group=None):
    """LSQ FakeQuant as sqil defines it: q = clamp(round_half_even(x / s) + z), (q - z) * s,
    straight-through rounding, step gradient scaled by 1 / sqrt(n * qmax)."""
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    n = min(group, x.shape[1]) if group else x.numel()  # elements sharing one step
    g = 1.0 / np.sqrt(n * hi)
    s = s * g + (s - s * g).detach()
    if group:
        k = x.shape[1]
        s = s.repeat_interleave(group, dim=1)[:, :k]
        z = z.repeat_interleave(group, dim=1)[:, :k]
    v = x / s
    r = torch.round(v).detach()
    q = r + z
    # The range test on the exact integer (not on v + (round(v) - v), which float rounding can push
    # past the bound).
    inside = (q >= lo) & (q <= hi)
    through = (v + (r - v).detach()) * s  # value round(v) * s; d/dx = 1, d/ds = round(v) - v
    clamped = (torch.clamp(q, lo, hi) - z) * s  # d/dx = 0, d/ds = bound - z
    return torch.where(inside, through, clamped)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    model = ROOT / "testdata" / "policies" / "bc_hopper.onnx"
    with tempfile.TemporaryDirectory() as tmp:
        q = pathlib.Path(tmp) / "q.onnx"
        subprocess.run([str(ROOT / "target" / "release" / "sqil"), "quantize", str(model), "--recipe", "rtn", "--wbits", "4",
                        "--abits", "8", "--group", "64", "--calib", str(ROOT / "testdata/demos/hopper.npz"), "-o", str(q),
                        "--ir", str(OUT / "bc_hopper_w4a8.sqil")], check=True, capture_output=True)
        qi = {t.name: numpy_helper.to_array(t) for t in onnx.load(q).graph.initializer}
    fi = {t.name: numpy_helper.to_array(t) for t in onnx.load(model).graph.initializer}
    gemms = [n for n in onnx.load(model).graph.node if n.op_type == "Gemm"]
    rng = np.random.default_rng(0)
    obs = np.load(ROOT / "testdata/demos/hopper.npz")["observations"][::97][:32].astype(np.float32)
    b = len(obs)
    target = rng.normal(size=(b, 3)).astype(np.float32) * 0.5
    teacher = rng.normal(size=(b, 3)).astype(np.float32) * 0.5
    alpha = np.where(rng.random((b, 1)) < 0.2, 2.0, 1.0).astype(np.float32)
    params = {}

    def p(name, value):
        params[name] = torch.tensor(np.asarray(value, dtype=np.float32), requires_grad=True)
        return params[name]

    h = (torch.tensor(obs) - torch.tensor(fi["mean"])) / torch.tensor(fi["std"])
    for i, n in enumerate(gemms):
        layer = n.name
        xs = p(f"{layer}.x.scale", qi[f"{layer}.x.fq.scale"])
        xz = torch.tensor(qi[f"{layer}.x.fq.zero_point"].astype(np.float32))
        w = p(f"{layer}.w.value", fi[n.input[1]])
        ws = p(f"{layer}.w.scale", qi[f"{layer}.w.fq.scale"])
        wz = torch.tensor(qi[f"{layer}.w.fq.zero_point"].astype(np.float32))
        bias = p(n.input[2], fi[n.input[2]])
        hx = fake_quant(h, xs, xz, 8)
        wq = fake_quant(w, ws, wz, 4, group=64)
        h = torch.nn.functional.linear(hx, wq, bias)
        if i + 1 < len(gemms):
            h = torch.relu(h)
    y = h
    loss = ((y - torch.tensor(target)) ** 2).mean() + (torch.tensor(alpha) * ((y - torch.tensor(teacher)) ** 2).mean(1, keepdim=True)).mean()
    loss.backward()
    out = {"obs": obs, "target": target, "teacher": teacher, "alpha": alpha, "loss": np.array([loss.item()], np.float32)}
    out.update({f"grad:{k}": v.grad.numpy() for k, v in params.items()})
    np.savez(OUT / "bc_hopper_w4a8.npz", **out)
    print(f"loss {loss.item():.6f}; {len(params)} parameter gradients -> {OUT}")


if __name__ == "__main__":
    main()
