"""PyTorch peer of `cargo bench -p sqil-driver --bench vla_step`: the same Llama-style decoder
layers (hidden 4096, 32 heads, SwiGLU 11008, RMSNorm, causal attention, no rotary embedding) over
embedded tokens, a mean-pooled action head, LSQ fake quantizers on every linear (weights 4-bit in
groups of 64 along the input axis, inputs 8-bit per tensor), the QRD loss, AdamW with global-norm
clipping; fp32 with TF32 off; eager and torch.compile; time per step and peak memory
(`max_memory_allocated`), one JSON line per (depth, mode).

    python tools/bench_vla_torch.py [--layers 1,2] [--batch 8] [--tokens 16]
"""
import argparse
import json
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_qat import LSQ  # noqa: E402

H, HEADS, MLP, ACT = 4096, 32, 11008, 7


class QLinear(torch.nn.Module):
    def __init__(self, k, n):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(n, k) / k ** 0.5)
        self.wq = LSQ(4, (n, k), 64)
        self.aq = LSQ(8, (1, k), 0)

    def forward(self, x):
        return torch.nn.functional.linear(self.aq(x), self.wq(self.w))


class Layer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (QLinear(H, H) for _ in range(4))
        self.gate, self.up, self.down = QLinear(H, MLP), QLinear(H, MLP), QLinear(MLP, H)

    @staticmethod
    def rms(x):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5)

    def forward(self, x, mask):
        b, t, _ = x.shape
        n = self.rms(x)
        hd = H // HEADS
        q, k, v = (f(n).reshape(b, t, HEADS, hd).transpose(1, 2) for f in (self.q, self.k, self.v))
        p = torch.softmax(q @ k.transpose(-1, -2) / hd ** 0.5 + mask, -1)
        x = x + self.o((p @ v).transpose(1, 2).reshape(b, t, H))
        n = self.rms(x)
        g = self.gate(n)
        return x + self.down(g * torch.sigmoid(g) * self.up(n))


class Vla(torch.nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layers = torch.nn.ModuleList(Layer() for _ in range(layers))
        self.head = QLinear(H, ACT)

    def forward(self, x, mask):
        for l in self.layers:
            x = l(x, mask)
        return self.head(x.mean(1))


def run(layers, batch, tokens, compiled):
    dev = torch.device("cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    m = Vla(layers).to(dev)
    for q in m.modules():
        if isinstance(q, LSQ):
            q.z = q.z.to(dev)
    mask = torch.triu(torch.full((tokens, tokens), -1e9, device=dev), 1)
    x = torch.randn(batch, tokens, H, device=dev)
    tgt, teacher = torch.randn(batch, ACT, device=dev), torch.randn(batch, ACT, device=dev)
    alpha = torch.ones(batch, 1, device=dev)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-5, weight_decay=0.0)
    fwd = torch.compile(m) if compiled else m

    def step():
        out = fwd(x, mask)
        loss = ((out - tgt) ** 2).mean() + (alpha * ((out - teacher) ** 2).mean(1, keepdim=True)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    n, t0 = 10, time.perf_counter()
    for _ in range(n):
        step()
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) * 1e3 / n
    peak = torch.cuda.max_memory_allocated() / 1e9
    del m, opt
    return ms, peak


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="1,2")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--modes", default="eager,compile")
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    for layers in [int(v) for v in a.layers.split(",")]:
        for mode in a.modes.split(","):
            ms, gb = run(layers, a.batch, a.tokens, mode == "compile")
            print(json.dumps({"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "mode": mode,
                              "layers": layers, "batch": a.batch, "tokens": a.tokens, "ms_per_step": round(ms, 2),
                              "peak_gb": round(gb, 2)}), flush=True)


if __name__ == "__main__":
    main()
