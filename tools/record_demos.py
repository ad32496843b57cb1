"""Records expert demonstrations into the .npz layout of docs/demos-format.md.

    tools/.venv-dev/bin/python tools/record_demos.py --task hopper --episodes 50 --seed 1000 -o demos/hopper.npz

--jobs N records in N processes, each a contiguous block of the seeds (`rollout.run_in_blocks`).
Each process makes its own environment: where an episode depends on more than its reset seed
(Meta-World's task draw follows the environment's history), the episodes differ from a
one-process recording; a recording repeats with the same --jobs.
"""

import argparse
import json
import os
import pathlib
import sys
from importlib.metadata import version

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from sqil_tools import tasks  # noqa: E402
from sqil_tools.rollout import run_episodes, run_in_blocks  # noqa: E402


def _record(job):
    name, n, seed = job
    task = tasks.get(name)
    return run_episodes(task, task.make_expert(), n, seed, record=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", required=True)
    ap.add_argument("--episodes", type=int, default=50)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--jobs", type=int, default=1, help="processes (contiguous blocks of seeds)")
    a = ap.parse_args()
    task = tasks.get(a.task)
    eps, sps, _ = run_in_blocks(_record, (a.task,), a.episodes, a.seed, a.jobs)
    space = task.make_env().action_space
    steps = [o for e in eps for o in e["trajectory"]["observations"]]
    images = None
    if isinstance(steps[0], dict):  # pixel task: proprioception as `observations`, frames as `images`
        images = np.stack([o["image"] for o in steps]).astype(np.uint8)
        steps = [o["proprio"] for o in steps]
    obs = np.stack(steps).astype(np.float32)
    act = np.concatenate([np.stack(e["trajectory"]["actions"]) for e in eps]).astype(np.float32)
    rew = np.concatenate([np.asarray(e["trajectory"]["rewards"]) for e in eps]).astype(np.float32)
    starts = np.zeros(len(obs), dtype=bool)
    starts[np.cumsum([0] + [e["steps"] for e in eps[:-1]])] = True
    meta = {
        "format": "sqil-demos/1",
        "task": task.name,
        "env_id": task.env_id,
        "env_kwargs": task.env_kwargs,
        "expert": task.expert_name,
        "seeds": [e["seed"] for e in eps],
        # JSON has no NaN: tasks judged by a success flag have no return threshold.
        "success_return": None if np.isnan(task.success_return) else task.success_return,
        "versions": {p: version(p) for p in ["gymnasium", "numpy"] + (["pybullet", "pybullet-envs-gymnasium"] if task.env_id.endswith("BulletEnv-v0") else {"lander": ["box2d"], "pickplace": ["metaworld", "mujoco"], "pickplace-pixels": ["metaworld", "mujoco"]}[task.name])},
        # The action space: the environment clips every executed action to it (and so did the
        # recording), so sqil compares actions after clipping.
        "action_low": [float(v) for v in space.low],
        "action_high": [float(v) for v in space.high],
    }
    if images is not None:
        meta["inputs"] = {"image": "images / 255 (uint8 [T, 3, H, W] -> float32)", "proprio": "observations"}
    out = pathlib.Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.npz")
    np.savez_compressed(
        tmp,
        observations=obs,
        actions=act,
        episode_starts=starts,
        rewards=rew,
        success=np.array([e["success"] for e in eps]),
        episode_returns=np.array([e["return"] for e in eps], dtype=np.float64),
        metadata=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
        **({"images": images} if images is not None else {}),
    )
    os.replace(tmp, out)
    rets = [e["return"] for e in eps]
    print(f"{task.name}: {len(eps)} episodes, {len(obs)} states, success {np.mean([e['success'] for e in eps]):.2f}, "
          f"return {np.mean(rets):.1f} +- {np.std(rets):.1f}, {sps:.0f} steps/s -> {out}")


if __name__ == "__main__":
    main()
