"""PTQ baselines: every task policy quantized by every recipe (rtn, mse, awq, gptq) at W8A8,
W4A8, W4A4 and W3A8 with `sqil quantize`, then measured: action MSE against the float policy
on demonstration states that calibration did not use, and closed-loop success over seeded
episodes. These are the numbers SQIL must beat (docs/ptq.md).

    tools/.venv-dev/bin/python tools/ptq_table.py quantize            # QDQ ONNX + reports + action MSE
    tools/.venv-dev/bin/python tools/ptq_table.py eval --tasks hopper lander --jobs 2
    tools/.venv-dev/bin/python tools/ptq_table.py table               # docs/ptq.md, docs/ptq.json

Steps can run on different machines (the eval of Meta-World tasks ran on a 16-core machine):
every result is a file under demos/ptq/, and `table` reads whatever is there.
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
from sqil_tools import evaljobs  # noqa: E402

OUT = ROOT / "demos" / "ptq"
POLICIES = {
    "hopper": ["hopper_mlp", "bc_hopper"],
    "lander": ["bc_lander"],
    "pickplace": ["bc_pickplace", "bc_pickplace_transformer"],
    "pickplace-pixels": ["bc_pickplace_pixels"],
}
CONFIGS = {
    "W8A8": ["--wbits", "8", "--abits", "8", "--group", "channel"],
    "W4A8": ["--wbits", "4", "--abits", "8", "--group", "64"],
    "W4A4": ["--wbits", "4", "--abits", "4", "--group", "64"],
    "W3A8": ["--wbits", "3", "--abits", "8", "--group", "64"],
}
RECIPES = ["rtn", "mse", "awq", "gptq"]
CALIB_STATES = 2048
MSE_STATES = 4096


def sqil_bin():
    return os.environ.get("SQIL_BIN", str(ROOT / "target" / "release" / "sqil"))


def policy_inputs(sess, d, idx):
    """The policy's inputs for demo steps `idx` (same layouts as crates/driver/src/feeds.rs)."""
    ins = sess.get_inputs()
    obs = d["observations"]
    if [i.name for i in ins] == ["image", "proprio"]:
        return {"image": d["images"][idx].astype(np.float32) / 255.0, "proprio": obs[idx]}
    if len(ins[0].shape) == 3:
        h = ins[0].shape[1]
        starts = d["episode_starts"]
        first = np.maximum.accumulate(np.where(starts, np.arange(len(starts)), 0))
        win = np.maximum(idx[:, None] - np.arange(h - 1, -1, -1)[None], first[idx][:, None])
        return {ins[0].name: obs[win]}
    return {ins[0].name: obs[idx]}


def session(path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run_batched(sess, feeds, batch=512):
    n = len(next(iter(feeds.values())))
    return np.concatenate([sess.run(None, {k: v[i : i + batch] for k, v in feeds.items()})[0] for i in range(0, n, batch)])


def quantize(task_names):
    OUT.mkdir(parents=True, exist_ok=True)
    for t in task_names:
        demos = ROOT / "demos" / f"{t}.npz"
        d = dict(np.load(demos))
        n = len(d["observations"])
        # Evaluation states: evenly spread, offset from the calibration states.
        idx = np.unique(((np.arange(MSE_STATES) + 0.5) * n / MSE_STATES).astype(int).clip(0, n - 1))
        for p in POLICIES[t]:
            fp_path = ROOT / "testdata" / "policies" / f"{p}.onnx"
            fp = session(fp_path)
            feeds = policy_inputs(fp, d, idx)
            ref = run_batched(fp, feeds)
            for cfg, flags in CONFIGS.items():
                for r in RECIPES:
                    stem = OUT / f"{p}__{cfg}__{r}"
                    cmd = [sqil_bin(), "quantize", str(fp_path), "--recipe", r, *flags, "--calib", str(demos),
                           "--calib-states", str(CALIB_STATES), "-o", f"{stem}.onnx", "--report", f"{stem}.report.json"]
                    res = subprocess.run(cmd, capture_output=True, text=True)
                    if res.returncode != 0:
                        raise SystemExit(f"{' '.join(cmd)}\n{res.stderr}")
                    q = run_batched(session(f"{stem}.onnx"), feeds)
                    mse = float(np.mean((q - ref) ** 2))
                    json.dump({"policy": p, "task": t, "config": cfg, "recipe": r, "action_mse": mse,
                               "action_mse_rel": mse / float(np.mean(ref**2)), "states": int(len(idx))},
                              open(f"{stem}.mse.json", "w"))
                    print(f"{p:<26} {cfg} {r:<4} action mse {mse:.3e}", flush=True)


def evaluate(task_names, episodes, jobs, python):
    work = []
    for t in task_names:
        for p in POLICIES[t]:
            specs = [("FP", "-", ROOT / "testdata" / "policies" / f"{p}.onnx")]
            specs += [(c, r, OUT / f"{p}__{c}__{r}.onnx") for c in CONFIGS for r in RECIPES]
            work += [(t, path, OUT / f"{p}__{cfg}__{r}.eval.json") for cfg, r, path in specs]
    evaljobs.evaluate(work, episodes, jobs, python)


def table():
    rows = []
    for t, ps in POLICIES.items():
        for p in ps:
            fp = OUT / f"{p}__FP__-.eval.json"
            for cfg in ["FP", *CONFIGS]:
                for r in (["-"] if cfg == "FP" else RECIPES):
                    stem = OUT / f"{p}__{cfg}__{r}"
                    ev = json.loads(pathlib.Path(f"{stem}.eval.json").read_text()) if pathlib.Path(f"{stem}.eval.json").exists() else None
                    ms = json.loads(pathlib.Path(f"{stem}.mse.json").read_text()) if pathlib.Path(f"{stem}.mse.json").exists() else None
                    if ev is None and ms is None:
                        continue
                    rows.append({"task": t, "policy": p, "config": cfg, "recipe": r,
                                 "action_mse": ms["action_mse"] if ms else 0.0,
                                 "action_mse_rel": ms["action_mse_rel"] if ms else 0.0,
                                 "episodes": ev["episodes"] if ev else None,
                                 "success_rate": ev["success_rate"] if ev else None,
                                 "success_ci95": ev["success_ci95"] if ev else None,
                                 "return_mean": ev["return_mean"] if ev else None,
                                 "return_std": ev["return_std"] if ev else None})
            del fp
    (ROOT / "docs" / "ptq.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = [
        "# PTQ baselines",
        "",
        "Made by `tools/ptq_table.py` (quantize, eval, table). Each task policy quantized by `sqil quantize` with",
        f"every recipe; weights symmetric int (W8: per output channel; W4/W3: groups of 64 along the reduction axis),",
        f"activations asymmetric per tensor, min-max calibrated on {CALIB_STATES} demonstration states. Action MSE: against",
        f"the float policy on {MSE_STATES} other demonstration states (onnxruntime, graph optimisations off, on the",
        "exported QDQ ONNX). Closed loop: episodes with reset seeds 0..N-1, success as in docs/tasks.md.",
        "hopper and lander ran here; pickplace and pickplace-pixels on the GPU machine's 16 CPU cores (onnxruntime",
        "1.30 there), pixel frames rendered with EGL on its NVIDIA H200. EGL and this machine's OSMesa render slightly",
        "different pixels, so the pixel FP row is from the same EGL run (0.82 success here too, with another return).",
        "",
        "Readings: W8A8 is lossless everywhere. GPTQ is the strongest recipe at W4A8 and W3A8 (it keeps hopper,",
        "pickplace and the transformer at 0.98-1.00 where RTN falls to 0.00-0.04 at W3A8). W4A4 (4-bit activations,",
        "min-max, per tensor) breaks hopper (0.00-0.36) and pickplace (0.28-0.52) whatever the weight recipe: the",
        "activation quantizer, not the weights, is the bottleneck there. AWQ optimises weights alone and can hurt",
        "once activations are quantized (hopper W4A4: 0.00). The pixel CNN is the most fragile: 0.06-0.26 at W4A8",
        "and W4A4, 0.00-0.06 at W3A8; its spatial-softmax keypoints go through a MatMul with a coordinate grid,",
        "which uniform 4-bit quantizes too (a case for per-layer bits, issue 6).",
        "",
        "| task | policy | config | recipe | action MSE (rel.) | success (95% CI) | return |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        succ = "-" if r["success_rate"] is None else f"{r['success_rate']:.2f} ({r['success_ci95'][0]:.2f}-{r['success_ci95'][1]:.2f}), n={r['episodes']}"
        ret = "-" if r["return_mean"] is None else f"{r['return_mean']:.1f} +- {r['return_std']:.1f}"
        mse = "0" if r["config"] == "FP" else f"{r['action_mse']:.2e} ({r['action_mse_rel']:.1e})"
        lines.append(f"| {r['task']} | {r['policy']} | {r['config']} | {r['recipe']} | {mse} | {succ} | {ret} |")
    lines += ["", f"Machine for quantization and action MSE: {platform.machine()}, 2 cores."]
    (ROOT / "docs" / "ptq.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=["quantize", "eval", "table"])
    ap.add_argument("--tasks", nargs="+", default=list(POLICIES))
    ap.add_argument("--episodes", type=int, default=50)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--python", help="the Python that runs the simulators (default: per task)")
    a = ap.parse_args()
    if a.step == "quantize":
        quantize(a.tasks)
    elif a.step == "eval":
        evaluate(a.tasks, a.episodes, a.jobs, a.python)
    else:
        table()


if __name__ == "__main__":
    main()
