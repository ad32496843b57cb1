"""Behaviour cloning: trains a full-precision MLP policy on demonstrations and exports ONNX.

    tools/.venv-dev/bin/python tools/train_bc.py --demos demos/hopper.npz -o testdata/policies/bc_hopper.onnx

The network normalises observations with the demonstrations' mean and std (constants inside the
exported graph), then 2 hidden layers of 256 ReLU units, linear actions; MSE loss, Adam, cosine
learning rate, seeded, one thread.
"""

import argparse
import json
import os
import pathlib
import sys

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from sqil_tools.models import Block  # noqa: E402

torch.set_num_threads(1)


class BCPolicy(torch.nn.Module):
    def __init__(self, mean, std, act_dim, hidden=256):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean))
        self.register_buffer("std", torch.as_tensor(std))
        d = len(mean)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(d, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, act_dim)
        )

    def forward(self, obs):
        return self.net((obs - self.mean) / self.std)


class TransformerPolicy(torch.nn.Module):
    """History of `hist` observations (oldest first; the episode's first observation repeated
    before it starts) -> the next `chunk` actions, [batch, chunk, act_dim]."""

    def __init__(self, mean, std, act_dim, hist=4, chunk=4, d=64, layers=2):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean))
        self.register_buffer("std", torch.as_tensor(std))
        self.embed = torch.nn.Linear(len(mean), d)
        self.pos = torch.nn.Parameter(torch.randn(1, hist, d) * 0.02)
        self.blocks = torch.nn.ModuleList([Block(d, 4, 2 * d) for _ in range(layers)])
        self.norm = torch.nn.LayerNorm(d)
        self.head = torch.nn.Linear(d, act_dim * chunk)
        self.hist, self.chunk, self.act_dim = hist, chunk, act_dim

    def forward(self, history):
        x = self.embed((history - self.mean) / self.std) + self.pos
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x[:, -1])).reshape(-1, self.chunk, self.act_dim)


def windows(obs, act, starts, hist, chunk):
    """Training pairs for the transformer: per step, the last `hist` observations of its
    episode (padded with the first) and the next `chunk` actions (padded with the last)."""
    ep = np.cumsum(starts) - 1
    first = np.flatnonzero(starts)
    last = np.append(first[1:], len(obs)) - 1
    idx = np.arange(len(obs))
    h = np.maximum(idx[:, None] - np.arange(hist - 1, -1, -1)[None], first[ep][:, None])
    c = np.minimum(idx[:, None] + np.arange(chunk)[None], last[ep][:, None])
    return obs[h], act[c]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demos", required=True)
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arch", choices=["mlp", "transformer"], default="mlp")
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    d = np.load(a.demos)
    meta = json.loads(bytes(d["metadata"]))
    obs, act = torch.from_numpy(d["observations"]), torch.from_numpy(d["actions"])
    mean, std = obs.mean(0), obs.std(0).clamp_min(1e-3)
    if a.arch == "transformer":
        model = TransformerPolicy(mean, std, act.shape[1])
        x, y = windows(d["observations"], d["actions"], d["episode_starts"], model.hist, model.chunk)
        obs, act = torch.from_numpy(x), torch.from_numpy(y)
    else:
        model = BCPolicy(mean, std, act.shape[1])
    opt = torch.optim.Adam(model.parameters(), lr=a.lr)
    steps = a.epochs * ((len(obs) + a.batch - 1) // a.batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(a.seed)
    for ep in range(a.epochs):
        perm = torch.randperm(len(obs), generator=g)
        total = 0.0
        for i in range(0, len(obs), a.batch):
            idx = perm[i : i + a.batch]
            loss = torch.nn.functional.mse_loss(model(obs[idx]), act[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if ep % 10 == 9 or ep == a.epochs - 1:
            print(f"epoch {ep + 1}: mse {total / len(obs):.5f}")
    model.eval()
    out = pathlib.Path(a.out)
    tmp = out.with_suffix(".tmp.onnx")
    names = (["history"], ["actions"]) if a.arch == "transformer" else (["obs"], ["action"])
    torch.onnx.export(model, (obs[:4],), str(tmp), input_names=names[0], output_names=names[1], opset_version=17,
                      dynamo=False, dynamic_axes={names[0][0]: {0: "batch"}, names[1][0]: {0: "batch"}})
    os.replace(tmp, out)
    info = {
        "task": meta["task"],
        "pytorch_parameters": sum(p.numel() for p in model.parameters()),
        "pytorch_buffers": sum(b.numel() for b in model.buffers()),
        "epochs": a.epochs,
        "seed": a.seed,
        "demo_states": len(obs),
        "arch": a.arch,
    }
    pathlib.Path(str(out) + ".json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"{meta['task']}: BC policy with {sum(p.numel() for p in model.parameters())} parameters -> {out}")


if __name__ == "__main__":
    main()
