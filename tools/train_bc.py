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


class CNNPolicy(torch.nn.Module):
    """Camera image (float [0, 1], [B, 3, 84, 84]) + proprioception [B, p] -> action. Encoder:
    3x3 convolutions (32 channels; strides 2, 1, 1, 1) with ReLU, then a spatial softmax that
    turns each of the 32 feature maps into the expected (x, y) of its activation (a keypoint,
    as in robomimic's image encoders: precise positions are what grasping needs), concatenated
    with the normalised proprioception, then two 256-unit ReLU layers."""

    def __init__(self, mean, std, act_dim, hidden=256, ch=32, size=84):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean))
        self.register_buffer("std", torch.as_tensor(std))
        c = torch.nn.Conv2d
        self.enc = torch.nn.Sequential(c(3, ch, 3, 2), torch.nn.ReLU(), c(ch, ch, 3, 1), torch.nn.ReLU(),
                                       c(ch, ch, 3, 1), torch.nn.ReLU(), c(ch, ch, 3, 1))
        side = (size - 3) // 2 + 1 - 6
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, side), torch.linspace(-1, 1, side), indexing="ij")
        self.register_buffer("grid", torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1))  # [side*side, 2]
        self.ch, self.side = ch, side
        self.head = torch.nn.Sequential(torch.nn.Linear(2 * ch + len(mean), hidden), torch.nn.ReLU(),
                                        torch.nn.Linear(hidden, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, act_dim))

    def forward(self, image, proprio):
        f = self.enc(image - 0.5)
        att = torch.softmax(f.reshape(-1, self.ch, self.side * self.side), dim=-1)
        keypoints = (att @ self.grid).reshape(-1, 2 * self.ch)
        return self.head(torch.cat([keypoints, (proprio - self.mean) / self.std], dim=1))


def random_shift(img, pad, g):
    """DrQ-style augmentation: pad by replicating edges, crop back at a random offset per image."""
    b, _, h, w = img.shape
    x = torch.nn.functional.pad(img, (pad, pad, pad, pad), mode="replicate")
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=g).to(img.device)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=g).to(img.device)
    rows = (dy[:, None] + torch.arange(h, device=img.device)[None])[:, None, :, None].expand(b, img.shape[1], h, w + 2 * pad)
    x = torch.gather(x, 2, rows)
    cols = (dx[:, None] + torch.arange(w, device=img.device)[None])[:, None, None, :].expand(b, img.shape[1], h, w)
    return torch.gather(x, 3, cols)


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
    ap.add_argument("--arch", choices=["mlp", "transformer", "cnn"], default="mlp")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="torch device for training (cuda on a GPU machine); export runs on CPU")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    d = np.load(a.demos)
    meta = json.loads(bytes(d["metadata"]))
    obs, act = torch.from_numpy(d["observations"]), torch.from_numpy(d["actions"])
    mean, std = obs.mean(0), obs.std(0).clamp_min(1e-3)
    if a.arch == "transformer":
        model = TransformerPolicy(mean, std, act.shape[1])
        x, y = windows(d["observations"], d["actions"], d["episode_starts"], model.hist, model.chunk)
        obs, act = torch.from_numpy(x), torch.from_numpy(y)
    elif a.arch == "cnn":
        model = CNNPolicy(mean, std, act.shape[1])
        images = torch.from_numpy(d["images"])  # uint8, converted per batch
    else:
        model = BCPolicy(mean, std, act.shape[1])
    dev = torch.device(a.device)
    model.to(dev)
    obs, act = obs.to(dev), act.to(dev)
    if a.arch == "cnn":
        images = images.to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=a.lr)
    steps = a.epochs * ((len(obs) + a.batch - 1) // a.batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(a.seed)
    for ep in range(a.epochs):
        perm = torch.randperm(len(obs), generator=g).to(dev)
        total = 0.0
        for i in range(0, len(obs), a.batch):
            idx = perm[i : i + a.batch]
            if a.arch == "cnn":
                img = random_shift(images[idx].float() / 255.0, 4, g)
                loss = torch.nn.functional.mse_loss(model(img, obs[idx]), act[idx])
            else:
                loss = torch.nn.functional.mse_loss(model(obs[idx]), act[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if ep % 10 == 9 or ep == a.epochs - 1 or a.arch == "cnn":
            print(f"epoch {ep + 1}: mse {total / len(obs):.5f}")
    model.eval()
    model.to("cpu")
    obs, act = obs.cpu(), act.cpu()
    if a.arch == "cnn":
        images = images.cpu()
    out = pathlib.Path(a.out)
    tmp = out.with_suffix(".tmp.onnx")
    names = {"transformer": (["history"], ["actions"]), "cnn": (["image", "proprio"], ["action"])}.get(a.arch, (["obs"], ["action"]))
    args = (images[:4].float() / 255.0, obs[:4]) if a.arch == "cnn" else (obs[:4],)
    torch.onnx.export(model, args, str(tmp), input_names=names[0], output_names=names[1], opset_version=17, dynamo=False,
                      dynamic_axes={n: {0: "batch"} for n in names[0] + names[1]})
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
