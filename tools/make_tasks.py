"""Builds every task's artefacts and docs/tasks.md, reproducibly:

1. records expert demonstrations (50 episodes, reset seeds 1000-1049) into demos/<task>.npz
   (git-ignored; the first episodes also go to testdata/demos/<task>.npz for tests),
2. trains the behaviour-cloned MLP (tools/train_bc.py) -> testdata/policies/bc_<task>.onnx,
3. evaluates expert and BC policy closed loop on 50 episodes with seeds 0-49 (disjoint from the
   demonstrations) and writes the table to docs/tasks.md and the JSON to docs/tasks.json.

    tools/.venv-dev/bin/python tools/make_tasks.py [--tasks hopper lander]
"""

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from sqil_tools import tasks  # noqa: E402

TEST_EPISODES = {"hopper": 4, "lander": 20, "pickplace": 3, "pickplace-pixels": 1}
# Expert episodes recorded per task (the pixel policy needs more data to learn where the object is).
DEMO_EPISODES = {"pickplace-pixels": 100}
# BC architectures per task: the MLP everywhere, plus a transformer (history 4 -> chunk of 4
# actions) on pickplace so attention, LayerNorm and GELU are covered.
ARCHS = {"pickplace": ["mlp", "transformer"], "pickplace-pixels": ["cnn"]}
# Extra training flags per architecture (the CNN trains in about a minute on a GPU with
# --device cuda, which the GPU machine ran; on this CPU it takes hours).
TRAIN_FLAGS = {"transformer": ["--epochs", 20], "cnn": ["--epochs", 60]}


def sh(*args, python=None):
    print("+", " ".join(map(str, args)), flush=True)
    subprocess.run([python or sys.executable, *map(str, args)], check=True)


def evaluate_in(python, task, spec, episodes, reuse=False):
    """Runs tools/eval.py under the simulator's Python and reads its JSON."""
    out = ROOT / "demos" / f"eval_{task}_{pathlib.Path(spec).stem}.json"
    if reuse and out.exists() and json.loads(out.read_text())["episodes"] == episodes:
        return json.loads(out.read_text())
    sh(HERE / "eval.py", "--task", task, "--policy", spec, "--episodes", episodes, "--seed", 0, "-o", out, python=python)
    return json.loads(out.read_text())


def subset(src, dst, episodes):
    """The first `episodes` episodes of a demo file, same layout."""
    d = dict(np.load(src))
    starts = np.flatnonzero(d["episode_starts"])
    end = starts[episodes] if episodes < len(starts) else len(d["episode_starts"])
    out = {k: d[k][:end] for k in ("observations", "actions", "episode_starts", "rewards", "images") if k in d}
    out.update(success=d["success"][:episodes], episode_returns=d["episode_returns"][:episodes])
    meta = json.loads(bytes(d["metadata"]))
    meta["seeds"] = meta["seeds"][:episodes]
    out["metadata"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    tmp = dst.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **out)
    os.replace(tmp, dst)


def register(policy: pathlib.Path, demos: pathlib.Path):
    """Adds the BC policy to testdata/policies/manifest.json with onnxruntime reference outputs
    on 8 demonstration states, so every cross-check covers it."""
    sys.path.insert(0, str(HERE))
    from make_testdata import save_refs, sha  # noqa: E402

    info = json.loads(pathlib.Path(str(policy) + ".json").read_text())
    d = np.load(demos)
    pick = np.arange(0, len(d["observations"]), 997)[:8]
    if info.get("arch") == "cnn":
        feeds = {"image": d["images"][pick].astype(np.float32) / 255.0, "proprio": d["observations"][pick].astype(np.float32)}
    elif info.get("arch") == "transformer":
        from train_bc import windows

        x, _ = windows(d["observations"], d["actions"], d["episode_starts"], 4, 4)
        feeds = {"history": x[pick].astype(np.float32)}
    else:
        feeds = {"obs": d["observations"][pick].astype(np.float32)}
    name = policy.name[: -len(".onnx")]
    outs = save_refs(name, policy, feeds)
    mpath = policy.parent / "manifest.json"
    m = json.loads(mpath.read_text())
    m["models"] = [e for e in m["models"] if e["file"] != policy.name]
    m["models"].append({
        "file": policy.name,
        "made_by": f"tools/train_bc.py --arch {info.get('arch', 'mlp')} on {info['demo_states']} expert states of task {info['task']} ({info['epochs']} epochs, seed {info['seed']}), torch.onnx TorchScript exporter",
        "opset": 17,
        "pytorch_parameters": info["pytorch_parameters"],
        "pytorch_buffers": info["pytorch_buffers"],
        "inputs": {k: list(v.shape) for k, v in feeds.items()},
        "outputs": outs,
        "sha256": sha(policy),
    })
    mpath.write_text(json.dumps(m, indent=2) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["hopper", "lander", "pickplace", "pickplace-pixels"])
    ap.add_argument("--episodes", type=int, default=50)
    ap.add_argument("--reuse-demos", action="store_true", help="keep existing demos/<task>.npz (same seeds, same content)")
    ap.add_argument("--reuse-policies", action="store_true", help="keep trained policies that exist (e.g. trained on a GPU)")
    ap.add_argument("--reuse-evals", action="store_true", help="keep evaluations in demos/eval_*.json that exist")
    ap.add_argument("--device", default="cpu", help="torch device for training")
    a = ap.parse_args()
    (ROOT / "demos").mkdir(exist_ok=True)
    (ROOT / "testdata" / "demos").mkdir(parents=True, exist_ok=True)
    # Rows of tasks not rerun now are kept from the last run.
    old = ROOT / "docs" / "tasks.json"
    rows = [r for r in (json.loads(old.read_text()) if old.exists() else []) if r["task"] not in a.tasks]
    for t in a.tasks:
        demos = ROOT / "demos" / f"{t}.npz"
        sim = str(ROOT / tasks.SIM_PYTHON[t]) if t in tasks.SIM_PYTHON else sys.executable
        if not (a.reuse_demos and demos.exists()):
            sh(HERE / "record_demos.py", "--task", t, "--episodes", DEMO_EPISODES.get(t, 50), "--seed", 1000, "-o", demos,
               python=sim)
        subset(demos, ROOT / "testdata" / "demos" / f"{t}.npz", TEST_EPISODES[t])
        specs = ["expert"]
        for arch in ARCHS.get(t, ["mlp"]):
            stem = f"bc_{t}" if arch in ("mlp", "cnn") else f"bc_{t}_{arch}"
            policy = ROOT / "testdata" / "policies" / (stem.replace("-", "_") + ".onnx")
            extra = ["--arch", arch, "--device", a.device] + TRAIN_FLAGS.get(arch, [])
            if not (a.reuse_policies and policy.exists()):
                sh(HERE / "train_bc.py", "--demos", demos, "-o", policy, *extra)
            register(policy, demos)
            specs.append(str(policy.relative_to(ROOT)))
        for spec in specs:
            r = evaluate_in(sim, t, spec if spec == "expert" else str(ROOT / spec), a.episodes, a.reuse_evals)
            r["policy"] = spec
            rows.append(r)
            print(f"{t:<8} {spec:<36} success {r['success_rate']:.2f} return {r['return_mean']:.1f}", flush=True)
    (ROOT / "docs" / "tasks.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = [
        "# Benchmark tasks",
        "",
        "Made by `tools/.venv-dev/bin/python tools/make_tasks.py` (expert demonstrations with reset seeds",
        f"1000-1049, evaluation with seeds 0-{a.episodes - 1}); machine: {platform.processor() or platform.machine()}, 2 cores.",
        "Per-episode results are in `docs/tasks.json`. Success: hopper return >= 1800, lander return > 200, pickplace and",
        "pickplace-pixels the env's success flag. pickplace-pixels: 100 demonstration episodes (seeds 1000-1099), 84x84",
        "camera images rendered with OSMesa here; its CNN was trained with `--device cuda` on an NVIDIA H200 (60 epochs, about a minute).",
        "",
        "| task | policy | episodes | success rate (95% CI) | return mean +- std | steps/s |",
        "|---|---|---|---|---|---|",
    ]
    order = ["hopper", "lander", "pickplace", "pickplace-pixels"]
    rows.sort(key=lambda r: (order.index(r["task"]) if r["task"] in order else 99, r["policy"] != "expert"))
    for r in rows:
        lo, hi = r["success_ci95"]
        lines.append(f"| {r['task']} | {r['policy']} | {r['episodes']} | {r['success_rate']:.2f} ({lo:.2f}-{hi:.2f}) | "
                     f"{r['return_mean']:.1f} +- {r['return_std']:.1f} | {r['steps_per_s']:.0f} |")
    (ROOT / "docs" / "tasks.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
