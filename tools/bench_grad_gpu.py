"""One QRD gradient step per testdata policy on the GPU, sqil against PyTorch, in one run:
forward with LSQ fake quantizers (weights 4-bit in groups of 64 along the input axis, layer
inputs 8-bit per tensor), the QRD loss (BC + alpha-weighted distillation), backward; no
optimizer on either side. fp32, TF32 off on both, the same batch.

    python tools/bench_grad_gpu.py --train-step PATH [--batch 256] [--policies bc_hopper,...]

sqil: `crates/driver/benches/train_step.rs` (binary built on the dev machine): the ratios use its
step on inputs already on the device (one CUDA-graph launch), the same work as the PyTorch loop
over device tensors; `sqil_with_copies` adds copying inputs and parameters in and loss and
gradients out every step. PyTorch: the ONNX
graph rebuilt as torch ops (`sqil_tools/onnx_torch.py`) with LSQ modules on every Gemm, MatMul
and Conv weight and input, eager and torch.compile (default mode), timed with CUDA syncs; peak
memory is `max_memory_allocated` (sqil: its buffers plus the 32 MiB cuBLAS workspace).
"""
import argparse
import json
import pathlib
import subprocess
import sys
import time

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_ddp_torch import OnnxLsq  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent


def peer(name, batch, compiled):
    dev = torch.device("cuda")
    model = OnnxLsq(ROOT / f"testdata/policies/{name}.onnx", dev)
    xs = []
    for i in range(len(model.m.graph.input)):
        a = np.load(ROOT / f"testdata/policies/{name}.input{i}.npy").astype(np.float32)
        xs.append(torch.tensor(a[np.arange(batch) % len(a)], device=dev))
    y0 = model(*xs).detach()
    target, teacher = torch.randn_like(y0), y0.clone()
    alpha = torch.ones(batch, *[1] * (y0.dim() - 1), device=dev)
    params = list(model.parameters())

    def step():
        out = model(*xs)
        d = ((out - teacher) ** 2).reshape(batch, -1).mean(1).reshape(alpha.shape)
        loss = ((out - target) ** 2).mean() + (alpha * d).mean()
        loss.backward()
        for p in params:
            p.grad = None

    f = torch.compile(step) if compiled else step
    for _ in range(3):
        f()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    n, t0 = 0, time.perf_counter()
    while n < 10 or time.perf_counter() - t0 < 2.0:
        f()
        n += 1
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / n
    return batch / dt, torch.cuda.max_memory_allocated() / 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-step", required=True)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--policies", default="bc_hopper,bc_pickplace_transformer,bc_pickplace_pixels")
    a = ap.parse_args()
    # The ONNX interpreter's shape arithmetic breaks dynamo's graphs, so each quantizer call site
    # is its own compiled frame: let every one of them compile rather than fall back to eager.
    torch._dynamo.config.cache_size_limit = 4096
    torch._dynamo.config.accumulated_cache_size_limit = 65536
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    out = subprocess.run([a.train_step, str(a.batch)], capture_output=True, text=True, check=True).stdout
    sq = {r["policy"]: r for r in (json.loads(l) for l in out.splitlines() if l.startswith("{"))}
    print(f"QRD gradient step, W4A8 g64 LSQ, batch {a.batch}, fp32 (TF32 off), {torch.cuda.get_device_name(0)}, "
          f"PyTorch {torch.__version__}")
    for name in a.policies.split(","):
        s = sq.get(name)
        row = {"policy": name, "batch": a.batch, "sqil_samples_s": s and s["gpu_device_samples_s"],
               "sqil_with_copies_samples_s": s and s["gpu_samples_s"],
               "sqil_mb": s and s["gpu_mb"], "cpu_interp_samples_s": s and s["cpu_interp_1thread_samples_s"]}
        for label, compiled in (("eager", False), ("compile", True)):
            try:
                sps, mb = peer(name, a.batch, compiled)
                row[f"torch_{label}_samples_s"], row[f"torch_{label}_mb"] = round(sps), round(mb, 1)
                if s:
                    row[f"ratio_vs_{label}"] = round(s["gpu_device_samples_s"] / sps, 2)
                    row[f"ratio_with_copies_vs_{label}"] = round(s["gpu_samples_s"] / sps, 2)
            except Exception as e:  # a peer that cannot run is reported, not fatal
                row[f"torch_{label}_error"] = str(e)[:200]
        print(json.dumps(row))


if __name__ == "__main__":
    main()
