"""Saliency-guided mixed precision against uniform bits and HAWQ-style allocation, each followed by
QRD fine-tuning, in closed loop. For each policy and budget (average weight bits, the size of
uniform W3 and W4), `sqil compile --budget Nbits --alloc-method M` allocates per-layer bits with
method M (sqil: SIS-weighted action error; hawq: Hessian trace of the unweighted distillation
loss times the weight error), then fine-tunes with SQIL exactly as tools/qrd_table.py does; the
uniform rows are tools/qrd_table.py's SQIL models at W3A8 and W4A8.

    tools/.venv-dev/bin/python tools/alloc_table.py compile
    tools/.venv-dev/bin/python tools/alloc_table.py eval --tasks hopper --jobs 2
    tools/.venv-dev/bin/python tools/alloc_table.py table      # docs/allocation.md, docs/allocation.json
"""

import argparse
import json
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from qrd_table import OUT as QRD, STATES, STEPS, sqil_bin  # noqa: E402
from sqil_tools import evaljobs  # noqa: E402

OUT = ROOT / "demos" / "alloc"
POLICIES = {"hopper": "bc_hopper", "pickplace": "bc_pickplace"}
BUDGETS = {"3bits": "W3A8", "4bits": "W4A8"}
METHODS = ["sqil", "hawq"]


def compile_all(task_names):
    for t in task_names:
        p = POLICIES[t]
        for budget in BUDGETS:
            for m in METHODS:
                out = OUT / f"{p}__{budget}__{m}"
                if (out / "report.json").exists():
                    continue
                cmd = [sqil_bin(), "compile", str(ROOT / "testdata" / "policies" / f"{p}.onnx"), "--demos",
                       str(ROOT / "demos" / f"{t}.npz"), "--wbits", "4", "--abits", "8", "--group", "64", "--init", "gptq",
                       "--recipe", "sqil", "--budget", budget, "--alloc-method", m, "--steps", str(STEPS), "--states",
                       str(STATES), "-o", str(out)]
                res = subprocess.run(cmd, capture_output=True, text=True)
                if res.returncode != 0:
                    raise SystemExit(f"{' '.join(cmd)}\n{res.stderr[-3000:]}")
                print(f"{p} {budget} {m}: {res.stderr.strip().splitlines()[-1]}", flush=True)


def evaluate(task_names, episodes, jobs, python):
    work = [(t, OUT / f"{POLICIES[t]}__{b}__{m}") for t in task_names for b in BUDGETS for m in METHODS]
    evaljobs.evaluate_dirs(work, episodes, jobs, python)


def cell(d):
    ev = d / "eval.json"
    if not ev.exists():
        return "-", None
    e = json.loads(ev.read_text())
    return f"{e['success_rate']:.2f} / {e['return_mean']:.0f}", e


def table():
    rows = []
    lines = [
        "# Saliency-guided bit allocation (closed loop)",
        "",
        "Made by `tools/alloc_table.py` (compile, eval, table). Weight bits per layer from {2, 3, 4, 8} under an",
        "average-bits budget equal to uniform W3 and W4 (groups of 64, 8-bit activations per tensor), allocated by",
        "`sqil compile --budget` with the exact knapsack DP on 1024 demonstration states, then the same GPTQ",
        f"initialisation and SQIL fine-tuning as docs/sqil.md ({STEPS} steps, {STATES} states). sqil: sensitivity = action",
        "error with only that layer quantized, weighted by the QRD weights (2 on the top-20% SIS states, else 1).",
        "hawq: HAWQ-v2/v3 sensitivity, Hutchinson trace of the Hessian of the unweighted distillation loss (32",
        "probes) / params x ||W_q - W||^2. Uniform: the SQIL models of docs/sqil.md. Closed loop: 50 episodes, reset",
        "seeds 0-49, onnxruntime on the QDQ ONNX. Cells: success rate / mean return; bits: per layer in graph order.",
        "",
        "| task | budget | uniform + QRD | sqil alloc + QRD | bits (sqil) | hawq alloc + QRD | bits (hawq) | measured action error after alloc (sqil / hawq, SIS-weighted) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t, p in POLICIES.items():
        for b, uni in BUDGETS.items():
            u, ue = cell(QRD / f"{p}__{uni}__sqil")
            row = {"task": t, "policy": p, "budget": b, "uniform": ue}
            cells, bits, errs = [], [], []
            for m in METHODS:
                d = OUT / f"{p}__{b}__{m}"
                c, e = cell(d)
                cells.append(c)
                a = json.loads((d / "allocation.json").read_text()) if (d / "allocation.json").exists() else None
                bits.append(" ".join(l["chosen"] for l in a["layers"]) + f" ({a['used']:.2f})" if a else "-")
                errs.append(f"{a['measured_error']:.2e}" if a else "-")
                row[m] = {"eval": e, "allocation": a and {k: a[k] for k in ("used", "predicted_error", "measured_error")},
                          "bits": a and [l["chosen"] for l in a["layers"]]}
            rows.append(row)
            lines.append(f"| {t} | {b} | {u} | {cells[0]} | {bits[0]} | {cells[1]} | {bits[1]} | {errs[0]} / {errs[1]} |")
    (ROOT / "docs" / "allocation.json").write_text(json.dumps(rows, indent=1) + "\n")
    text = "\n".join(lines) + "\n"
    extra = ROOT / "docs" / "allocation-findings.md"
    if extra.exists():
        text += "\n" + extra.read_text()
    (ROOT / "docs" / "allocation.md").write_text(text)
    print(text)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["compile", "eval", "table"])
    ap.add_argument("--tasks", nargs="+", default=list(POLICIES))
    ap.add_argument("--episodes", type=int, default=50)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--python", help="interpreter for evaluation (default: the task's venv)")
    a = ap.parse_args()
    if a.what == "compile":
        compile_all(a.tasks)
    elif a.what == "eval":
        evaluate(a.tasks, a.episodes, a.jobs, a.python)
    else:
        table()


if __name__ == "__main__":
    main()
