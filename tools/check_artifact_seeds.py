"""Artifact == simulation on every demonstration state, over compile seeds (issue 19's check).

For each seed, `sqil compile MODEL --demos DEMOS --steps STEPS --seed S` (defaults otherwise),
then `sqil run` of OUT/model.sqil (the simulation, reference interpreter) and of OUT/policy.bin
(the CPU artifact) on every state of the demonstrations; the two action arrays must be equal bit
for bit. Prints one line per seed and a summary; exits non-zero on any failed compile or differing
state.

    tools/.venv-dev/bin/python tools/check_artifact_seeds.py \
        --model testdata/policies/bc_hopper.onnx --demos testdata/demos/hopper.npz --seeds 0-9 --steps 300
"""

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
SQIL = os.environ.get("SQIL_BIN", str(ROOT / "target" / "release" / "sqil"))


def seeds(spec):
    out = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--demos", required=True)
    ap.add_argument("--seeds", default="0-9")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--extra", default="", help="more compile flags, space separated")
    args = ap.parse_args()
    demos = np.load(args.demos)
    obs = demos["obs"] if "obs" in demos else demos["observations"]
    obs = np.ascontiguousarray(obs.reshape(obs.shape[0], -1) if obs.ndim == 2 else obs, dtype=np.float32)
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        states = tmp / "states.npy"
        np.save(states, obs)
        for s in seeds(args.seeds):
            out = tmp / f"seed{s}"
            t0 = time.time()
            cmd = [SQIL, "compile", args.model, "--demos", args.demos, "--steps", str(args.steps),
                   "--seed", str(s), "--output", str(out)] + args.extra.split()
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                failures += 1
                print(f"seed {s}: compile FAILED (exit {r.returncode}): {r.stderr.strip().splitlines()[-1:]}")
                continue
            acts = {}
            for name in ["model.sqil", "policy.bin"]:
                y = tmp / f"{name}.npy"
                subprocess.run([SQIL, "run", str(out / name), "--input", str(states), "--output", str(y)],
                               check=True, capture_output=True)
                acts[name] = np.load(y)
            a, b = acts["model.sqil"], acts["policy.bin"]
            differ = int((a.view(np.uint32) != b.view(np.uint32)).reshape(len(obs), -1).any(axis=1).sum())
            failures += differ > 0
            print(f"seed {s}: compile {time.time() - t0:5.1f} s, {len(obs)} states, "
                  f"{differ} differ between model.sqil and policy.bin")
    print(f"{len(seeds(args.seeds))} seeds, {failures} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
