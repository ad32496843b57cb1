"""SQIL on the quantized policy's own states (DAgger-style, the float policy as the teacher).

Fine-tuning on demonstration states fits the expert's state distribution; a quantized policy that
drifts off it meets states no demonstration contains (docs/sqil.md, the lander W4A4 finding).
Each round rolls out the current quantized policy (reset seeds 10000 + 1000 * round: disjoint
from the evaluation seeds 0-49), labels every visited state with the float policy's action,
aggregates those states with the demonstrations, and runs `sqil compile` again from the original
float model (same recipe, initialisation and budget as tools/qrd_table.py); SIS is recomputed
by the float policy over the aggregate. The result of each round is evaluated in closed loop.

    tools/.venv-dev/bin/python tools/dagger.py --task lander --policy bc_lander --config W4A4 --rounds 2
    tools/.venv-dev/bin/python tools/dagger.py --table        # prints the markdown rows of every run

Outputs under demos/dagger/<policy>__<config>__<recipe>/: round<k>.npz (aggregated states),
round<k>/ (the compiled model and report), round<k>/eval.json, summary.json.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from qrd_table import CONFIGS, OUT as QRD, STATES, STEPS, sqil_bin  # noqa: E402
from sqil_tools import policies, rollout, tasks  # noqa: E402

OUT = ROOT / "demos" / "dagger"


def save_demos(path, obs, act, starts, meta):
    """Writes the aggregate in the demos format (atomically); rewards are not used by training."""
    tmp = path.with_suffix(".tmp.npz")
    n_eps = int(starts.sum())
    np.savez_compressed(tmp, observations=obs, actions=act, episode_starts=starts, rewards=np.zeros(len(obs), np.float32),
                        success=np.zeros(n_eps, bool), episode_returns=np.zeros(n_eps, np.float64),
                        metadata=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
    os.replace(tmp, path)


def evaluate(task, model, out, episodes, python=None):
    py = python or (str(ROOT / tasks.SIM_PYTHON[task]) if task in tasks.SIM_PYTHON else sys.executable)
    subprocess.run([py, str(HERE / "eval.py"), "--task", task, "--policy", str(model), "--episodes", str(episodes),
                    "--seed", "0", "-o", str(out)], check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    r = json.loads(out.read_text())
    return r["success_rate"], r["return_mean"]


def run(a):
    task = tasks.get(a.task)
    fp = ROOT / "testdata" / "policies" / f"{a.policy}.onnx"
    d = np.load(ROOT / "demos" / f"{a.task}.npz")
    meta = json.loads(bytes(d["metadata"]).decode())
    obs, act, starts = d["observations"], d["actions"], d["episode_starts"]
    work = OUT / f"{a.policy}__{a.config}__{a.recipe}"
    work.mkdir(parents=True, exist_ok=True)
    student = QRD / f"{a.policy}__{a.config}__{a.recipe}" / "model.onnx"
    if not student.exists():
        raise SystemExit(f"{student}: run tools/qrd_table.py compile first (round 0 is its {a.recipe} model)")
    teacher = policies.load(str(fp), task)
    summary = {"task": a.task, "policy": a.policy, "config": a.config, "recipe": a.recipe, "rounds": []}
    s0 = json.loads((student.parent / "eval.json").read_text())
    summary["rounds"].append({"round": 0, "states": int(len(obs)), "success": s0["success_rate"], "return": s0["return_mean"]})
    for k in range(1, a.rounds + 1):
        eps, _ = rollout.run_episodes(task, policies.load(str(student), task), a.episodes, 10000 + 1000 * k, record=True)
        new = np.concatenate([np.stack(e["trajectory"]["observations"]) for e in eps]).astype(np.float32)
        label = np.stack([np.asarray(teacher(o, None), np.float32).reshape(-1) for o in new])
        st = np.zeros(len(new), bool)
        st[np.cumsum([0] + [e["steps"] for e in eps[:-1]])] = True
        obs, act, starts = np.concatenate([obs, new]), np.concatenate([act, label]), np.concatenate([starts, st])
        m = {**meta, "dagger": {"round": k, "student": str(student.relative_to(ROOT)), "teacher": str(fp.relative_to(ROOT)),
                                "rollout_seeds": [e["seed"] for e in eps], "rollout_success": float(np.mean([e["success"] for e in eps]))}}
        npz = work / f"round{k}.npz"
        save_demos(npz, obs, act, starts, m)
        out = work / f"round{k}"
        cmd = [sqil_bin(), "compile", str(fp), "--demos", str(npz), *CONFIGS[a.config], "--group", "64", "--init", "gptq",
               "--recipe", a.recipe, "--steps", str(STEPS), "--states", str(STATES), "--threads", str(a.threads), "-o", str(out)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)}\n{res.stderr[-3000:]}")
        student = out / "model.onnx"
        sr, ret = evaluate(a.task, student, out / "eval.json", a.eval_episodes, a.python)
        row = {"round": k, "states": int(len(obs)), "rollout_states": int(len(new)),
               "rollout_success": m["dagger"]["rollout_success"], "success": sr, "return": ret}
        summary["rounds"].append(row)
        print(json.dumps(row), flush=True)
        tmp = work / "summary.tmp.json"
        tmp.write_text(json.dumps(summary, indent=1))
        os.replace(tmp, work / "summary.json")


def table_lines():
    """The markdown table of every run under demos/dagger."""
    lines = ["| policy | config | recipe | round | training states | rollout success (student) | closed loop: success / return |",
             "|---|---|---|---|---|---|---|"]
    for f in sorted(OUT.glob("*/summary.json")):
        s = json.loads(f.read_text())
        for r in s["rounds"]:
            ro = f"{r['rollout_success']:.2f}" if "rollout_success" in r else "-"
            lines.append(f"| {s['policy']} | {s['config']} | {s['recipe']} | {r['round']} | {r['states']} | {ro} | "
                         f"{r['success']:.2f} / {r['return']:.0f} |")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task")
    ap.add_argument("--policy")
    ap.add_argument("--config", choices=list(CONFIGS))
    ap.add_argument("--recipe", default="sqil", choices=["qat", "distill", "sqil"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--episodes", type=int, default=50, help="rollout episodes per round")
    ap.add_argument("--eval-episodes", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2, help="sqil compile threads")
    ap.add_argument("--python", help="interpreter for evaluation (default: the task's venv)")
    ap.add_argument("--table", action="store_true")
    a = ap.parse_args()
    if a.table:
        return print("\n".join(table_lines()))
    if not (a.task and a.policy and a.config):
        ap.error("--task, --policy and --config are required")
    run(a)


if __name__ == "__main__":
    main()
