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

import numpy as np
import torch

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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demos", required=True)
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    d = np.load(a.demos)
    meta = json.loads(bytes(d["metadata"]))
    obs, act = torch.from_numpy(d["observations"]), torch.from_numpy(d["actions"])
    mean, std = obs.mean(0), obs.std(0).clamp_min(1e-3)
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
    torch.onnx.export(model, (obs[:4],), str(tmp), input_names=["obs"], output_names=["action"], opset_version=17,
                      dynamo=False, dynamic_axes={"obs": {0: "batch"}, "action": {0: "batch"}})
    os.replace(tmp, out)
    info = {
        "task": meta["task"],
        "pytorch_parameters": sum(p.numel() for p in model.parameters()),
        "pytorch_buffers": sum(b.numel() for b in model.buffers()),
        "epochs": a.epochs,
        "seed": a.seed,
        "demo_states": len(obs),
    }
    pathlib.Path(str(out) + ".json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"{meta['task']}: BC policy with {sum(p.numel() for p in model.parameters())} parameters -> {out}")


if __name__ == "__main__":
    main()
