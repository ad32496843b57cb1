"""PyTorch DistributedDataParallel peer of `cargo bench -p sqil-driver --bench dp_step`: the same
models (`pixels`: testdata's pickplace-pixels CNN rebuilt from its ONNX graph with LSQ on every
weight and layer input, W4 groups of 64 / A8 per tensor; `vla`: one VLA-scale decoder layer of
`bench_vla_torch.py`), the QRD loss (BC + alpha-weighted distillation), AdamW with global-norm
clipping, fp32 with TF32 off, one process per GPU (NCCL, `NCCL_NVLS_ENABLE=0`):

- throughput at 1, 2, 4, ... GPUs with the same rows per GPU: samples/s of whole steps and the
  scaling efficiency `samples/s at N / (N x samples/s at 1)` (at the first count listed, per GPU);
- loss curves at every count with the same global batch, data and seed (each rank takes its
  contiguous shard of the global batch; the logged loss is the global batch's mean).

One JSON line per (model, count) and per curve, as `dp_step` prints them.

    python tools/bench_ddp_torch.py [--models pixels,vla] [--gpus 1,2,4] [--rows-per-gpu 32]
        [--steps 20] [--curve-steps 50] [--sqil DP_STEP_BINARY]

With `--sqil`, the sqil bench runs first (same arguments) and its lines are printed too, then one
line per (model, count) with the ratio of sqil's samples/s to DDP's.
"""
import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import onnx
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_qat import LSQ  # noqa: E402
from sqil_tools.onnx_torch import build  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent


class OnnxLsq(torch.nn.Module):
    """An ONNX policy as torch ops with an LSQ quantizer on every weight and layer input (also
    `bench_grad_gpu.py`'s peer); the parameters are made by the first call, which must come
    before an optimizer or DDP takes them."""

    def __init__(self, path, dev):
        super().__init__()
        self.m = onnx.load(path)
        self.mods = torch.nn.ModuleDict()
        self.params = torch.nn.ParameterDict()

        names = {}

        def key(k):
            # ModuleDict keys cannot hold dots: each call site's key numbered in order of first
            # use (replacing the dots could make two sites one).
            return names.setdefault(k, f"q{len(names)}")

        def wq(k, w, op, at):
            k = key(k)
            if k + "_w" not in self.mods:
                w2 = w.reshape(w.shape[0], -1) if op in ("Gemm", "Conv") else w.T
                if op == "Gemm" and not at.get("transB", 0):
                    w2 = w.T
                n = w2.shape[1]
                q = LSQ(4, w2.shape, 64 if n % 64 == 0 else n).to(dev)
                q.z = q.z.to(dev)
                self.mods[k + "_w"] = q
                self.params[k + "_p"] = torch.nn.Parameter(w.detach().clone())
            q, p = self.mods[k + "_w"], self.params[k + "_p"]
            if op == "Conv" or (op == "Gemm" and at.get("transB", 0)):
                return q(p.reshape(p.shape[0], -1)).reshape(p.shape)
            return q(p.T).T

        def aq(k, x):
            k = key(k)
            if k + "_a" not in self.mods:
                q = LSQ(8, (1, 1), 0, zero=True).to(dev)
                q.z = q.z.to(dev)
                self.mods[k + "_a"] = q
            return self.mods[k + "_a"](x)

        self.run = build(self.m, torch.float32, dev, wq, aq)

    def forward(self, *xs):
        return self.run(*xs)[0]


def make(name, rows, dev, seed):
    """The model (parameters made, the same on every rank) and `rows` rows of data."""
    g = torch.Generator().manual_seed(seed)
    if name == "pixels":
        path = ROOT / "testdata/policies/bc_pickplace_pixels.onnx"
        model = OnnxLsq(path, dev)
        xs = []
        for i in range(len(model.m.graph.input)):
            a = np.load(ROOT / f"testdata/policies/bc_pickplace_pixels.input{i}.npy").astype(np.float32)
            xs.append(torch.tensor(a[np.arange(rows) % len(a)]))
        with torch.no_grad():
            y = model(*[x[:1].to(dev) for x in xs])
        width = y.shape[-1]
    elif name == "vla":
        from bench_vla_torch import ACT, H, Vla

        torch.manual_seed(seed)
        model = Vla(1).to(dev)
        for q in model.modules():
            if isinstance(q, LSQ):
                q.z = q.z.to(dev)
        xs = [torch.randn(rows, 16, H, generator=g)]
        width = ACT
    else:
        raise SystemExit(f"--models: unknown model {name!r} (pixels, vla)")
    target = torch.randn(rows, width, generator=g)
    alpha = (torch.randint(0, 5, (rows, 1), generator=g) == 0).float() + 1.0
    with torch.no_grad():
        teacher = torch.cat([model(*[x[i:i + 64].to(dev) for x in xs], *extra(name, dev)).cpu()
                             for i in range(0, rows, 64)])
    return model, xs, target, teacher, alpha


def extra(name, dev):
    """The VLA layer's causal mask (an argument of its forward); nothing for the CNN."""
    if name == "vla":
        return [torch.triu(torch.full((16, 16), -1e9, device=dev), 1)]
    return []


def worker(rank, world, a, name, mode, out, port):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    backend = "gloo" if a.cpu else "nccl"
    dev = torch.device("cpu") if a.cpu else torch.device("cuda", rank)
    if not a.cpu:
        torch.cuda.set_device(dev)
    dist.init_process_group(backend, rank=rank, world_size=world)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    most = max(a.counts)
    global_rows = a.rows_per_gpu * most
    rows = global_rows * 4
    model, xs, target, teacher, alpha = make(name, rows, dev, 3)
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=None if a.cpu else [rank])
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-4, weight_decay=0.0)
    ex = extra(name, dev)

    def step(idx, batch):
        out = ddp(*[x[idx].to(dev, non_blocking=True) for x in xs], *ex)
        t, te, al = target[idx].to(dev), teacher[idx].to(dev), alpha[idx].to(dev)
        d = ((out - te) ** 2).reshape(len(idx), -1).mean(1, keepdim=True)
        # Each rank's mean over its shard, weighted by its share of the batch: DDP averages the
        # gradients over ranks, so the shares make the sum the global batch's mean.
        share = len(idx) * world / batch
        loss = (((out - t) ** 2).mean() + (al * d).mean()) * share
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ddp.parameters(), 1.0)
        opt.step()
        return loss.detach() / world

    def shard(lo, hi):
        n = hi - lo
        per, extra_rows = divmod(n, world)
        start = lo + rank * per + min(rank, extra_rows)
        return torch.arange(start, start + per + (rank < extra_rows)) % rows

    sync = (lambda: None) if a.cpu else torch.cuda.synchronize
    if mode == "throughput":
        batch = a.rows_per_gpu * world
        for s in range(3):
            step(shard(s * batch, (s + 1) * batch), batch)
        sync()
        dist.barrier()
        t0 = time.perf_counter()
        for s in range(3, 3 + a.steps):
            loss = step(shard(s * batch, (s + 1) * batch), batch)
        sync()
        dist.barrier()
        dt = time.perf_counter() - t0
        dist.all_reduce(loss)  # the last step's global mean loss
        if rank == 0:
            out.put({"samples_s": a.steps * batch / dt, "batch": batch, "last_loss": float(loss)})
    else:
        curve = []
        for s in range(a.curve_steps):
            loss = step(shard(s * global_rows, (s + 1) * global_rows), global_rows)
            dist.all_reduce(loss)
            curve.append(float(loss))
        if rank == 0:
            out.put({"curve": curve, "batch": global_rows})
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="pixels,vla")
    ap.add_argument("--gpus", default="1,2,4,8")
    ap.add_argument("--rows-per-gpu", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--curve-steps", type=int, default=50)
    ap.add_argument("--sqil", help="the dp_step bench binary: run first, its lines and the ratios printed")
    ap.add_argument("--cpu", action="store_true", help="gloo on the CPU (a check of this script, not a peer)")
    a = ap.parse_args()
    have = os.cpu_count() if a.cpu else torch.cuda.device_count()
    a.counts = [n for n in (int(v) for v in a.gpus.split(",")) if 1 <= n <= have]
    if not a.counts:
        raise SystemExit("bench_ddp_torch: no GPU")
    gpu = "cpu" if a.cpu else torch.cuda.get_device_name(0)
    sq = {}
    if a.sqil:
        args = [a.sqil, "--models", a.models, "--gpus", ",".join(map(str, a.counts)), "--rows-per-gpu",
                str(a.rows_per_gpu), "--steps", str(a.steps), "--curve-steps", str(a.curve_steps)]
        for line in subprocess.run(args, capture_output=True, text=True, check=True).stdout.splitlines():
            print(line, flush=True)
            if line.startswith("{"):
                r = json.loads(line)
                if "samples_s" in r:
                    sq[(r["model"], r["gpus"])] = r["samples_s"]
    ctx = mp.get_context("spawn")
    port = 29500
    for name in a.models.split(","):
        base = None
        for mode in ("throughput", "curve"):
            for n in a.counts:
                q, port = ctx.Queue(), port + 1
                mp.spawn(worker, args=(n, a, name, mode, q, port), nprocs=n, join=True)
                r = q.get()
                row = {"model": name, "engine": "torch-ddp", "gpu": gpu, "torch": torch.__version__, "gpus": n}
                if mode == "throughput":
                    base = base or r["samples_s"]
                    row.update(rows_per_gpu=a.rows_per_gpu, batch=r["batch"], samples_s=round(r["samples_s"], 1),
                               scaling_efficiency=round(r["samples_s"] / (n * base / a.counts[0]), 3),
                               last_loss=r["last_loss"])
                    if (name, n) in sq:
                        row["sqil_vs_ddp"] = round(sq[(name, n)] / r["samples_s"], 2)
                else:
                    row.update(batch=r["batch"], curve=[float(f"{v:.6e}") for v in r["curve"]])
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
