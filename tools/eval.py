"""Closed-loop evaluation of a policy on a task, with fixed seeds; writes JSON.

    tools/.venv-dev/bin/python tools/eval.py --task hopper --policy testdata/policies/bc_hopper.onnx --episodes 50 --seed 0 -o out.json

POLICY: `expert`, an ONNX file (onnxruntime, graph optimisations off), or `sqil:PATH` (sqil's
Python binding). Episode i resets with seed SEED + i. --jobs N runs N processes, each a
contiguous block of the seeds with its own environment (Meta-World's task draw follows the
environment's history, so compare results only at the same --jobs).
"""

import argparse
import json
import os
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / ".binding"))
from sqil_tools import policies, tasks  # noqa: E402
from sqil_tools.rollout import run_episodes, run_in_blocks, wilson  # noqa: E402


def _block(job):
    task_name, policy_spec, n, seed = job
    task = tasks.get(task_name)
    return run_episodes(task, policies.load(policy_spec, task), n, seed)


def evaluate(task_name, policy_spec, episodes, seed, jobs=1):
    eps, sps, jobs = run_in_blocks(_block, (task_name, policy_spec), episodes, seed, jobs)
    rets = np.array([e["return"] for e in eps])
    k = sum(e["success"] for e in eps)
    lo, hi = wilson(k, len(eps))
    return {
        "task": task_name,
        "policy": policy_spec,
        "episodes": len(eps),
        "seed": seed,
        "jobs": jobs,
        "success_rate": k / len(eps),
        "success_ci95": [lo, hi],
        "return_mean": float(rets.mean()),
        "return_std": float(rets.std()),
        "steps_per_s": sps,
        "per_episode": [{k2: e[k2] for k2 in ("seed", "return", "steps", "success")} for e in eps],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", required=True)
    ap.add_argument("--policy", required=True)
    ap.add_argument("--episodes", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-o", "--out")
    ap.add_argument("--jobs", type=int, default=1, help="processes (contiguous blocks of seeds)")
    a = ap.parse_args()
    r = evaluate(a.task, a.policy, a.episodes, a.seed, a.jobs)
    text = json.dumps(r, indent=1)
    if a.out:
        tmp = a.out + ".tmp"
        pathlib.Path(tmp).write_text(text + "\n")
        os.replace(tmp, a.out)
    print(f"{a.task} {a.policy}: success {r['success_rate']:.2f} [{r['success_ci95'][0]:.2f}, {r['success_ci95'][1]:.2f}], "
          f"return {r['return_mean']:.1f} +- {r['return_std']:.1f} over {r['episodes']} episodes, {r['steps_per_s']:.0f} steps/s")


if __name__ == "__main__":
    main()
