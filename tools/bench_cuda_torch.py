"""PyTorch FP16 peer for `sqil-cuda-bench` (run on the GPU machine, same shapes and method):
`F.linear` on fp16 weights at batch 1/4/16 with the L2 flushed (a 512 MiB zero fill) before each
timed call, CUDA events, median; and the Llama-style decoder linears (hidden 4096, MLP 11008) per
token, eager and replayed from a CUDA graph. One JSON line per measurement.

    python3 tools/bench_cuda_torch.py [--iters 50] [--layers 32]
    python3 tools/bench_cuda_torch.py --policy bc_hopper.onnx    # per-action latency of a policy

With --policy: the ONNX graph rebuilt as torch ops (sqil_tools/onnx_torch.py: MLPs, CNNs,
transformers), FP32 and FP16, eager and replayed from a CUDA graph, each call copying one state
(each input) in from the host and its actions out (what `sqil-cuda-bench policy` times).
"""
import argparse
import json

import torch
import torch.nn.functional as F


def timed(fn, iters, flush):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(3):
        fn()
    ts = []
    for _ in range(iters):
        flush.zero_()
        start.record()
        fn()
        end.record()
        end.synchronize()
        ts.append(start.elapsed_time(end) * 1e-3)
    ts.sort()
    return ts[len(ts) // 2]


def policy_bench(path, iters):
    import os
    import sys
    import time

    import onnx

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from sqil_tools.onnx_torch import build

    m = onnx.load(path)
    dims = [[d.dim_value for d in vi.type.tensor_type.shape.dim][1:] for vi in m.graph.input]
    name = torch.cuda.get_device_name(0)
    hosts = [torch.randn(1, *d).pin_memory() for d in dims]
    for dtype, label in ((torch.float32, "torch f32"), (torch.float16, "torch f16")):
        f = build(m, dtype, "cuda")
        xin = [torch.zeros(1, *d, device="cuda", dtype=dtype) for d in dims]

        def copy_in():
            for x, h in zip(xin, hosts):
                x.copy_(h.to(dtype), non_blocking=True)

        def act():
            # Several outputs: one action vector (sqil's GPU policy copies them out as one).
            outs = f(*xin)
            return outs[0] if len(outs) == 1 else torch.cat([o.reshape(-1) for o in outs])

        def eager():
            copy_in()
            return act().float().cpu()

        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                out = act()
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(g):
            out = act()

        def graph():
            copy_in()
            g.replay()
            return out.float().cpu()

        # The rebuilt graph computes the model: its f32 actions against onnxruntime's (no graph
        # optimisations) on the same state, where onnxruntime is installed.
        check = {}
        if dtype == torch.float32:
            try:
                import numpy as np
                import onnxruntime as ort

                so = ort.SessionOptions()
                so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
                sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
                feeds = {vi.name: h.numpy() for vi, h in zip(m.graph.input, hosts)}
                want = np.concatenate([o.reshape(-1) for o in sess.run(None, feeds)])
                got = eager().numpy().reshape(-1)
                check = {"max_rel_diff_vs_onnxruntime": float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-6))}
            except ImportError:
                pass
        for fn, mode in ((eager, "eager"), (graph, "graph")):
            for _ in range(20):
                fn()
            ts = []
            for _ in range(iters):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            ts.sort()
            print(json.dumps({"gpu": name, "engine": f"{label} {mode}", "policy": str(path),
                              "us": round(ts[len(ts) // 2] * 1e6, 2), **check}), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--policy")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--layers", type=int, default=32)
    a = ap.parse_args()
    if a.policy:
        return policy_bench(a.policy, max(a.iters, 500))
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(0)
    flush = torch.empty(512 << 20, dtype=torch.uint8, device=dev)
    for n, k in [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192)]:
        w = torch.randn(n, k, device=dev, dtype=torch.float16) * 0.02
        for b in (1, 4, 16):
            x = torch.randn(b, k, device=dev, dtype=torch.float16)
            t = timed(lambda: F.linear(x, w), a.iters, flush)
            print(json.dumps({"gpu": name, "engine": "torch f16", "shape": f"{k}->{n}", "batch": b, "us": round(t * 1e6, 2),
                              "gbs": round((n * k * 2 + b * (n + k) * 2) / t / 1e9)}), flush=True)
    h, m = 4096, 11008
    shapes = [(h, h)] * 4 + [(m, h), (m, h), (h, m)]
    ws = [torch.zeros(n, k, device=dev, dtype=torch.float16) for _ in range(a.layers) for (n, k) in shapes]
    x = torch.zeros(1, m, device=dev, dtype=torch.float16)

    def token():
        for w in ws:
            F.linear(x[:, : w.shape[1]], w)

    t = timed(token, 10, flush)
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        token()
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        token()
    tg = timed(g.replay, 10, flush)
    params = sum(n * k for (n, k) in shapes) * a.layers
    print(json.dumps({"gpu": name, "engine": "torch f16", "vla_layers": a.layers, "params": params,
                      "ms_per_token": round(t * 1e3, 3), "graph_ms_per_token": round(tg * 1e3, 3)}), flush=True)


if __name__ == "__main__":
    main()
