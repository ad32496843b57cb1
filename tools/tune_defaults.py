"""The protocol that sets `sqil compile`'s fine-tuning defaults, on validation data only.

For every policy below and every width in WIDTHS, `sqil compile` runs with each candidate setting
(stage 1: learning rate x LSQ step learning rate x steps; stage 2: beta, then top-p, one at a
time, at stage 1's choice). Each run holds out whole demonstration episodes (compile's own split, seed 0) and
reports, on those held-out states, the errors of the best PTQ recipe and of the best fine-tuned
checkpoint (action MSE after the action box's clip). A setting's figure is the geometric mean over
(policy, width) of best fine-tuned error / best PTQ error; the lowest wins (ties within 1%: fewer
steps). The error is compile's selection score (critical states weighted by beta = 2, top 20%) in
stage 1, where beta and top-p are fixed; in stage 2, which varies them, that score would change
with what it compares, so there the error is the unweighted one over all held-out states. Closed-loop evaluation seeds are never run here.

    tools/.venv-dev/bin/python tools/tune_defaults.py            # runs what is missing, writes docs/data/defaults-protocol.json
"""

import argparse
import itertools
import json
import math
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
POLICIES = [
    ("hopper_mlp", "testdata/policies/hopper_mlp.onnx", "demos/hopper.npz"),
    ("bc_hopper", "testdata/policies/bc_hopper.onnx", "demos/hopper.npz"),
    ("bc_lander", "testdata/policies/bc_lander.onnx", "demos/lander.npz"),
    ("bc_pickplace", "testdata/policies/bc_pickplace.onnx", "demos/pickplace.npz"),
    ("humanoid_mlp", "testdata/policies/humanoid_mlp.onnx", "demos/humanoid.npz"),
    ("halfcheetah_mlp", "testdata/policies/halfcheetah_mlp.onnx", "demos/halfcheetah.npz"),
    ("walker2d_mlp", "testdata/policies/walker2d_mlp.onnx", "demos/walker2d.npz"),
]
WIDTHS = ["W4A8", "W3A8"]
BASE = {"lr": 1e-4, "step_lr": 1.0, "steps": 1500, "beta": 2.0, "top": 0.2}
STAGE1 = {"lr": [1e-4, 3e-4, 1e-3], "step_lr": [1.0, 0.1], "steps": [1500, 4000]}
# Stage 2 varies one of beta and top-p at a time around the paper's (2, 20%).
STAGE2 = [{"beta": 1.5}, {"beta": 2.0}, {"beta": 4.0}, {"top": 0.1}, {"top": 0.4}]


def key(s):
    return "_".join(f"{k}{s[k]:g}" for k in sorted(s))


def run(bin_, pol, width, s, work):
    name, onnx, demos = pol
    out = work / name / width / key(s)
    rep = out / "report.json"
    if rep.exists():
        return json.loads(rep.read_text())
    w, a = width[1:].split("A")
    cmd = [bin_, "compile", onnx, "--demos", demos, "--wbits", w, "--abits", a, "--lr", str(s["lr"]), "--step-lr", str(s["step_lr"]),
           "--steps", str(s["steps"]), "--beta", str(s["beta"]), "--top", str(s["top"]), "-o", str(out)]
    print("+", " ".join(cmd), flush=True)
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "failed", flush=True)
        if not rep.exists():
            return None
    return json.loads(rep.read_text())


def ratio(rep, key):
    c = rep["candidates"]
    ptq = min(x["heldout"][key] for x in c if x["name"].startswith("ptq:"))
    ft = [x["heldout"][key] for x in c if not x["name"].startswith("ptq:") and "(last)" not in x["name"]]
    return ft[0] / max(ptq, 1e-30)


def figure(bin_, pols, s, work, rows, key):
    rs = []
    for pol in pols:
        for width in WIDTHS:
            rep = run(bin_, pol, width, s, work)
            if rep is None:
                continue
            r = ratio(rep, key)
            rs.append(r)
            rows.append({"setting": s, "policy": pol[0], "width": width, "ratio": r, "ptq": rep["ptq"]["recipe"],
                         "heldout_ft": [x["heldout"] for x in rep["candidates"] if not x["name"].startswith("ptq:")][0],
                         "best_step": rep["log"]["best_step"], "stopped_at": rep["log"]["stopped_at"]})
    return math.exp(sum(math.log(max(r, 1e-30)) for r in rs) / max(len(rs), 1)), len(rs)


def choose(results):
    best = min(f for _, f, _ in results)
    ok = [(s, f) for s, f, _ in results if f <= best * 1.01]
    return min(ok, key=lambda x: (x[0]["steps"], x[1]))[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=str(ROOT / "target/release/sqil"))
    ap.add_argument("--work", default=str(ROOT / "demos/tune"))
    ap.add_argument("-o", "--out", default=str(ROOT / "docs/data/defaults-protocol.json"))
    a = ap.parse_args()
    work = pathlib.Path(a.work)
    pols = [p for p in POLICIES if (ROOT / p[2]).exists()]
    missing = [p[0] for p in POLICIES if p not in pols]
    if missing:
        print(f"no demonstrations for {missing} (tools/make_tasks.py records them); left out", flush=True)
    rows, stages = [], []
    res1 = []
    for vals in itertools.product(*STAGE1.values()):
        s = dict(BASE, **dict(zip(STAGE1, vals)))
        f, n = figure(a.bin, pols, s, work, rows, "score")
        res1.append((s, f, n))
        print(f"stage 1 {key(s)}: {f:.3f} over {n} runs", flush=True)
    s1 = choose(res1)
    res2 = []
    for change in STAGE2:
        s = dict(s1, **change)
        f, n = figure(a.bin, pols, s, work, rows, "all")
        res2.append((s, f, n))
        print(f"stage 2 {key(s)}: {f:.3f} over {n} runs", flush=True)
    s2 = choose(res2)
    stages = [{"stage": 1, "results": [{"setting": s, "figure": f, "runs": n} for s, f, n in res1], "chosen": s1},
              {"stage": 2, "results": [{"setting": s, "figure": f, "runs": n} for s, f, n in res2], "chosen": s2}]
    out = {"protocol": __doc__.strip().splitlines()[0], "policies": [p[0] for p in pols], "widths": WIDTHS,
           "criterion": "geometric mean over (policy, width) of best fine-tuned held-out error / best PTQ held-out error (stage 1: compile's score; stage 2: all-state MSE)",
           "stages": stages, "chosen": s2, "runs": rows}
    tmp = pathlib.Path(a.out + ".tmp")
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    os.replace(tmp, a.out)
    print("chosen:", s2)


if __name__ == "__main__":
    main()
