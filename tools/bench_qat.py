"""Fine-tuning throughput: sqil against PyTorch CPU on the same LSQ-QAT step (forward, backward,
AdamW) of the same model and batch, with the same thread count, in one run.

    tools/.venv-dev/bin/python tools/bench_qat.py [--threads 2] [--steps 300]
    python tools/bench_qat.py --device cuda [--batch 256]      # on a GPU machine

With `--device cuda` both sides train on the GPU in fp32 (TF32 off on both): sqil
`compile --device cuda` (the training graph lowered to cuBLAS + generated kernels, one CUDA graph
per step; optimizer on the CPU), PyTorch eager and torch.compile (mode max-autotune-no-cudagraphs
is not used: the default mode), each in its own process; peak GPU memory is PyTorch's
max_memory_allocated and sqil's training-graph buffers.

The model is the hopper BC policy (testdata/policies/bc_hopper.onnx: normalisation, 15-256-256-3
MLP) at W4A8: weights 4-bit in groups of 64 along the input axis, layer inputs 8-bit per tensor
(asymmetric), LSQ steps for both, QRD loss (BC + distillation). sqil runs `sqil compile --steps N`
and reports its training-loop samples/s; PyTorch runs the same step written with its autograd.
Each side runs in its own process, so the peak resident memory of each (`wait4`'s ru_maxrss: the
whole process, data loading included) is measured the same way.
"""

import argparse
import json
import os
import sys
import pathlib
import subprocess
import tempfile
import time

import numpy as np
import onnx
import torch
from onnx import numpy_helper

ROOT = pathlib.Path(__file__).resolve().parent.parent


class LSQ(torch.nn.Module):
    """LSQ fake quantizer: scale per group of `group` along the last axis (or per tensor)."""

    def __init__(self, bits, shape, group, zero=False):
        super().__init__()
        self.lo, self.hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        self.group = group
        n = shape[-1] // group if group else 1
        self.s = torch.nn.Parameter(torch.full((shape[0], n) if group else (1,), 0.05))
        self.z = torch.zeros_like(self.s) if not zero else torch.full_like(self.s, -128.0)
        self.g = 1.0 / np.sqrt((group if group else int(np.prod(shape))) * self.hi)

    def forward(self, x):
        s = self.s * self.g + (self.s - self.s * self.g).detach()  # gradient scaling
        if self.group:
            s = s.repeat_interleave(self.group, dim=1)
            z = self.z.repeat_interleave(self.group, dim=1)
        else:
            z = self.z
        v = x / s
        q = torch.clamp(v + (v.round() - v).detach() + z, self.lo, self.hi)
        return (q - z) * s


class QMLP(torch.nn.Module):
    def __init__(self, ws, bs, mean, std):
        super().__init__()
        self.mean, self.std = torch.tensor(mean), torch.tensor(std)
        self.w = torch.nn.ParameterList([torch.nn.Parameter(torch.tensor(w)) for w in ws])
        self.b = torch.nn.ParameterList([torch.nn.Parameter(torch.tensor(b)) for b in bs])
        self.wq = torch.nn.ModuleList([LSQ(4, w.shape, 64 if w.shape[1] % 64 == 0 else w.shape[1]) for w in ws])
        self.aq = torch.nn.ModuleList([LSQ(8, (1, w.shape[1]), 0, zero=True) for w in ws])

    def forward(self, x):
        h = (x - self.mean) / self.std
        for i in range(len(self.w)):
            h = torch.nn.functional.linear(self.aq[i](h), self.wq[i](self.w[i]), self.b[i])
            if i + 1 < len(self.w):
                h = torch.relu(h)
        return h


def torch_run(a):
    """The PyTorch side (a child process): prints its samples/s as JSON."""
    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    m = onnx.load(ROOT / "testdata/policies/bc_hopper.onnx")
    init = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    gemms = [n for n in m.graph.node if n.op_type == "Gemm"]
    ws = [init[n.input[1]].astype(np.float32) for n in gemms]
    bs = [init[n.input[2]].astype(np.float32) for n in gemms]
    d = np.load(ROOT / "demos/hopper.npz")
    obs, act = d["observations"][:20000].astype(np.float32), d["actions"][:20000].astype(np.float32)
    model = QMLP(ws, bs, init.get("mean", obs.mean(0)), init.get("std", obs.std(0)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    model = model.to(dev)
    model.mean, model.std = model.mean.to(dev), model.std.to(dev)
    for q in list(model.wq) + list(model.aq):
        q.z = q.z.to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    x, y = torch.tensor(obs, device=dev), torch.tensor(act, device=dev)
    teacher = y.clone()
    g = torch.Generator(device=dev).manual_seed(0)
    fwd = torch.compile(model) if a.compile else model
    for warm in (True, False):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20 if warm else a.steps):
            idx = torch.randint(0, len(x), (a.batch,), generator=g, device=dev)
            out = fwd(x[idx])
            loss = ((out - y[idx]) ** 2).mean() + ((out - teacher[idx]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    mem = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else 0.0
    print(json.dumps({"samples_per_s": a.steps * a.batch / dt, "gpu_mib": mem}))


def measured(cmd):
    """Runs `cmd`; returns (stdout, peak RSS in MiB) of that process alone (its own wait4 rusage)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if p.returncode != 0:
            raise SystemExit(f"{cmd[0]} failed ({p.returncode}):\n{err.read()[-2000:]}")
        return out.read(), ru.ru_maxrss / 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--sqil", default=str(ROOT / "target/release/sqil"))
    ap.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--torch-child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.torch_child:
        return torch_run(a)
    common = ["--threads", str(a.threads), "--steps", str(a.steps), "--batch", str(a.batch)]
    if a.device == "cuda":
        return gpu_main(a, common)
    out, torch_mib = measured([sys.executable, __file__, "--torch-child", *common])
    torch_sps = json.loads(out)["samples_per_s"]
    with tempfile.TemporaryDirectory() as tmp:
        _, sqil_mib = measured([str(ROOT / "target/release/sqil"), "compile", str(ROOT / "testdata/policies/bc_hopper.onnx"),
                                "--demos", str(ROOT / "demos/hopper.npz"), "--wbits", "4", "--abits", "8", "--group", "64",
                                "--init", "rtn", "--recipe", "distill", *common, "-o", tmp])
        rep = json.loads((pathlib.Path(tmp) / "report.json").read_text())
    sqil_sps = rep["log"]["samples_per_s"]
    print(f"LSQ-QAT step, bc_hopper W4A8 g64, batch {a.batch}, {a.threads} threads, {os.uname().machine}:")
    print(f"  throughput: sqil {sqil_sps:.0f} samples/s, PyTorch {torch.__version__} {torch_sps:.0f} samples/s, "
          f"ratio sqil/PyTorch {sqil_sps / torch_sps:.2f}")
    print(f"  peak RSS (whole process): sqil {sqil_mib:.0f} MiB, PyTorch {torch_mib:.0f} MiB, "
          f"ratio sqil/PyTorch {sqil_mib / torch_mib:.2f}")


def gpu_main(a, common):
    """sqil --device cuda against PyTorch eager and torch.compile on the GPU, in one run."""
    rows = {}
    for name, extra in (("PyTorch eager", []), ("torch.compile", ["--compile"])):
        out, _ = measured([sys.executable, __file__, "--torch-child", "--device", "cuda", *extra, *common])
        rows[name] = json.loads(out)
    with tempfile.TemporaryDirectory() as tmp:
        with tempfile.TemporaryFile("w+") as err:
            p = subprocess.run([a.sqil, "compile", str(ROOT / "testdata/policies/bc_hopper.onnx"),
                                "--demos", str(ROOT / "demos/hopper.npz"), "--wbits", "4", "--abits", "8", "--group", "64",
                                "--init", "rtn", "--recipe", "distill", "--device", "cuda", *common, "-o", tmp],
                               stderr=err, stdout=subprocess.DEVNULL, text=True)
            err.seek(0)
            log = err.read()
        if p.returncode != 0:
            raise SystemExit(f"sqil failed:\n{log[-3000:]}")
        rep = json.loads((pathlib.Path(tmp) / "report.json").read_text())
    mb = [l for l in log.splitlines() if l.startswith("fine-tuning on")]
    sqil_sps = rep["log"]["samples_per_s"]
    print(f"LSQ-QAT step on {torch.cuda.get_device_name(0)}, bc_hopper W4A8 g64, batch {a.batch}, fp32 (TF32 off):")
    print(f"  sqil --device cuda: {sqil_sps:.0f} samples/s ({mb[0] if mb else ''})")
    for name, r in rows.items():
        print(f"  {name} {torch.__version__}: {r['samples_per_s']:.0f} samples/s, peak {r['gpu_mib']:.1f} MiB; "
              f"ratio sqil/{name} {sqil_sps / r['samples_per_s']:.2f}")


if __name__ == "__main__":
    main()
