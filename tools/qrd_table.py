"""SQIL, QAT, the best PTQ recipe and `sqil compile`'s default in closed loop, on every vector task.

For each policy at W4A8, W3A8, W4A4 and W2A8 (weights in groups of 64, activations per tensor,
the raw observation in float), `sqil compile` runs four ways, all on the same held-out split of
the demonstrations (whole episodes, compile's seed 0):
  ptq      --ship ptq                              the best PTQ recipe on the held-out states
  qat      --recipe qat  --ship finetuned          BC loss only, best held-out checkpoint
  sqil     --recipe sqil --ship finetuned          QRD (SIS top-p weighting), best held-out checkpoint
  default  (no flags)                              what a user gets: the best candidate of all
Then every model (and the float policy) runs the closed-loop evaluation with reset seeds 0-99,
disjoint from the demonstrations' (1000-1049): onnxruntime on the exported QDQ ONNX. Evaluation
returns only report; nothing here chooses a setting from them.

    tools/.venv-dev/bin/python tools/qrd_table.py compile [--tasks hopper ...]
    tools/.venv-dev/bin/python tools/qrd_table.py eval --jobs 2 [--tasks ...]
    tools/.venv-dev/bin/python tools/qrd_table.py table        # docs/sqil.md (+ docs/sqil-findings.md), docs/sqil.json
"""

import argparse
import json
import os
import pathlib
import platform
import sys

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from bench_recipes import RECIPES, closed_loop, run_compile, width_flags  # noqa: E402
from sqil_tools import evaljobs  # noqa: E402

OUT = pathlib.Path(os.environ.get("SQIL_QRD_OUT", ROOT / "demos" / "qrd"))
DEMOS = pathlib.Path(os.environ.get("SQIL_DEMOS_DIR", ROOT / "demos"))
# Extra `sqil compile` flags, e.g. "--device cuda" on the GPU machine (each report says its device).
COMPILE_FLAGS = os.environ.get("SQIL_COMPILE_FLAGS", "").split()
POLICIES = {"hopper": ["hopper_mlp", "bc_hopper"], "lander": ["bc_lander"],
            "pickplace": ["bc_pickplace", "bc_pickplace_transformer"], "pickplace-pixels": ["bc_pickplace_pixels"],
            "halfcheetah": ["halfcheetah_mlp"], "walker2d": ["walker2d_mlp"], "humanoid": ["humanoid_mlp"]}
# Policies run at fewer widths (their fine-tuning needs the GPU machine's time).
POLICY_CONFIGS = {"bc_pickplace_transformer": ["W4A8", "W3A8", "W4A4"], "bc_pickplace_pixels": ["W4A8", "W3A8", "W4A4"]}
CONFIGS = {w: width_flags(w) for w in ("W4A8", "W3A8", "W4A4", "W2A8")}
# ptq: the best PTQ recipe (every recipe tried on the held-out states); the others as the recipe
# benchmark (tools/bench_recipes.py) runs them.
VARIANTS = {"ptq": ["--ship", "ptq"], "qat": RECIPES["qat"], "sqil": RECIPES["sqil"], "default": RECIPES["default"]}
EPISODES = 100


def sqil_bin():
    return os.environ.get("SQIL_BIN", str(ROOT / "target" / "release" / "sqil"))


def configs(p):
    return POLICY_CONFIGS.get(p, list(CONFIGS))


def compile_all(task_names, variants, policies=None, only=None, jobs=1):
    """Every (policy, width, variant) compile, in the order of --configs and the variants. With
    jobs > 1, a policy's first compile runs alone (it fills the SIS cache the others read: the
    same float policy and states), then the rest `jobs` at a time."""
    work = []
    for t in task_names:
        for p in POLICIES[t]:
            if policies and p not in policies:
                continue
            for cfg in (only or configs(p)):
                if cfg not in configs(p):
                    continue
                for v, vflags in VARIANTS.items():
                    if v in variants:
                        work.append((t, p, cfg, v, [*CONFIGS[cfg], *vflags, *COMPILE_FLAGS]))

    def one(w):
        t, p, cfg, v, flags = w
        try:
            how, secs, last = run_compile(ROOT / "testdata" / "policies" / f"{p}.onnx", DEMOS / f"{t}.npz",
                                          OUT / f"{p}__{cfg}__{v}", flags)
        except RuntimeError as e:
            raise SystemExit(str(e))
        if how != "done before":
            print(f"{p} {cfg} {v} ({secs:.0f} s): {last[:200]}", flush=True)

    first, rest, seen = [], [], set()
    for w in work:
        (rest if w[1] in seen else first).append(w)
        seen.add(w[1])
    for w in first:
        one(w)
    if jobs <= 1:
        for w in rest:
            one(w)
    else:
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(jobs) as ex:
            list(ex.map(one, rest))


def same_model(task_names, variants):
    """Compile's default ships one of the other variants' models when its candidates match theirs
    (same split, same seeds): its evaluation is then that model's, copied, not run again."""
    for t in task_names:
        for p in POLICIES[t]:
            for c in configs(p):
                d = OUT / f"{p}__{c}__default"
                if "default" not in variants or not (d / "model.onnx").exists() or (d / "eval.json").exists():
                    continue
                for v in ("sqil", "ptq"):
                    o = OUT / f"{p}__{c}__{v}"
                    if (o / "eval.json").exists() and (o / "model.onnx").read_bytes() == (d / "model.onnx").read_bytes():
                        ev = json.loads((o / "eval.json").read_text())
                        ev["policy"], ev["same_model_as"] = str(d / "model.onnx"), v
                        (d / "eval.json").write_text(json.dumps(ev, indent=1) + "\n")
                        break


def evaluate(task_names, episodes, jobs, variants, policies=None, python=None, episode_jobs=1):
    work = []
    for t in task_names:
        for p in POLICIES[t]:
            if policies and p not in policies:
                continue
            fp = OUT / f"{p}__FP"
            fp.mkdir(parents=True, exist_ok=True)
            work.append((t, ROOT / "testdata" / "policies" / f"{p}.onnx", fp / "eval.json"))
            work += [(t, OUT / f"{p}__{c}__{v}" / "model.onnx", OUT / f"{p}__{c}__{v}" / "eval.json") for c in configs(p) for v in variants]
    # The other variants first; then compile's defaults, each copied where it is one of their
    # models and evaluated where it is not.
    evaljobs.evaluate([w for w in work if not w[1].parent.name.endswith("__default")], episodes, jobs, python, episode_jobs)
    same_model(task_names, variants)
    evaljobs.evaluate(work, episodes, jobs, python, episode_jobs)


def load(path):
    return json.loads(path.read_text()) if path.exists() else None


# Mean return with its 95% half-width, success rate with its Wilson interval.
summary = closed_loop


def cell(s, fp=None):
    if s is None:
        return "-"
    pct = f" ({100 * s['return_mean'] / fp['return_mean']:.0f}%)" if fp and fp["return_mean"] > 0 else ""
    return f"{s['return_mean']:.0f} ± {s['return_ci95']:.0f}{pct}, {s['success_rate']:.2f}"


def table():
    rows = []
    for t, ps in POLICIES.items():
        for p in ps:
            fp = summary(load(OUT / f"{p}__FP" / "eval.json"))
            for cfg in configs(p):
                line = {"task": t, "policy": p, "config": cfg, "fp": fp, "variants": {}}
                for v in VARIANTS:
                    d = OUT / f"{p}__{cfg}__{v}"
                    rep = load(d / "report.json")
                    if rep is None:
                        continue
                    line["variants"][v] = {"closed_loop": summary(load(d / "eval.json")), "shipped": rep["shipped"],
                                           "heldout": rep["heldout_after"], "heldout_ptq": rep["heldout_before"],
                                           "ptq_recipe": rep["init"], "plan_mismatch": rep.get("cpu_mismatch"),
                                           "seconds": rep["seconds"], "device": rep.get("device", "cpu")}
                rows.append(line)
    (ROOT / "docs" / "sqil.json").write_text(json.dumps(rows, indent=1) + "\n")

    def below(a, b):
        """a's interval lies wholly below b's."""
        return a and b and a["return_mean"] + a["return_ci95"] < b["return_mean"] - b["return_ci95"]

    lines = [
        "# SQIL, QAT, the best PTQ recipe and compile's default (closed loop)",
        "",
        "Made by `tools/qrd_table.py` (compile, eval, table; see its header for the four ways `sqil compile` runs).",
        f"Closed loop: {EPISODES} episodes, reset seeds 0-{EPISODES - 1}, onnxruntime on each model's QDQ ONNX. Cells: mean return",
        "± its 95% half-width (% of the float policy's mean), success rate. Held-out error: action MSE against the",
        "float policy after the action box's clip, on the held-out episodes' states, all of them and the critical",
        "(top-20% SIS) ones; PTQ is the best PTQ recipe on those states (named). Demonstrations: 50 episodes",
        "(reset seeds 1000-1049) per task, 5 held out by compile (its seed 0).",
        "",
        "| task | policy | config | FP | best PTQ | QAT | SQIL | compile default (shipped) | held-out all: PTQ / QAT / SQIL | critical: PTQ / QAT / SQIL |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    flags = {"default_below_ptq": [], "sqil_crit_lower": 0, "rows": 0, "w4a8_below_99": []}
    cuda = {l["policy"] for l in rows for v in l["variants"].values() if v.get("device") == "cuda"}
    for l in rows:
        v = l["variants"]
        cl = {k: v[k]["closed_loop"] if k in v else None for k in VARIANTS}
        ptq = f"{cell(cl['ptq'], l['fp'])} ({v['ptq']['ptq_recipe']})" if "ptq" in v else "-"
        dflt = f"{cell(cl['default'], l['fp'])} ({v['default']['shipped']})" if "default" in v else "-"
        allm = " / ".join(f"{v[k]['heldout']['all']:.2e}" if k in v else "-" for k in ("ptq", "qat", "sqil"))
        crit = " / ".join(f"{v[k]['heldout']['critical']:.2e}" if k in v else "-" for k in ("ptq", "qat", "sqil"))
        lines.append(f"| {l['task']} | {l['policy']} | {l['config']} | {cell(l['fp'])} | {ptq} | {cell(cl['qat'], l['fp'])} | "
                     f"{cell(cl['sqil'], l['fp'])} | {dflt} | {allm} | {crit} |")
        if "qat" in v and "sqil" in v:
            flags["rows"] += 1
            flags["sqil_crit_lower"] += v["sqil"]["heldout"]["critical"] < v["qat"]["heldout"]["critical"]
        if below(cl["default"], cl["ptq"]):
            flags["default_below_ptq"].append(f"{l['policy']} {l['config']}")
        if l["config"] == "W4A8" and cl["default"] and l["fp"] and l["fp"]["return_mean"] > 0 \
                and cl["default"]["return_mean"] < 0.99 * l["fp"]["return_mean"]:
            flags["w4a8_below_99"].append(f"{l['policy']} ({100 * cl['default']['return_mean'] / l['fp']['return_mean']:.0f}%)")
    lines += [
        "",
        "Checks (computed from the rows above):",
        f"- compile's default below the best PTQ recipe beyond the 95% intervals: {', '.join(flags['default_below_ptq']) or 'none'}.",
        f"- W4A8 rows where compile's default keeps less than 99% of the float mean return: {', '.join(flags['w4a8_below_99']) or 'none'}.",
        f"- SQIL's held-out critical-state error below QAT's: {flags['sqil_crit_lower']} of {flags['rows']} rows.",
        "",
        f"Compiles ran on this machine ({platform.machine()}, 2 cores) unless their report says `--device cuda`: "
        f"{', '.join(sorted(cuda)) or 'none'} compiled on one NVIDIA H200 (tools/gpu_sqil_rows.sh: training, SIS and "
        "scoring on the GPU). Closed-loop evaluation ran here, except pickplace-pixels: on the GPU machine's 16 cores "
        "with EGL rendering, each model's 100 episodes in 8 processes (blocks of seeds, each its own environment; "
        "Meta-World's task draw follows an environment's history, so pixel rows compare only with each other). "
        "The pixel task's demonstrations are 100 episodes (reset seeds 1000-1099, 10 held out), recorded there.",
    ]
    missing = [f"{l['policy']} {l['config']}" for l in rows if l["policy"] in POLICY_CONFIGS and len(l["variants"]) < len(VARIANTS)]
    if missing:
        lines.append(f"Not run yet (GPU time): {', '.join(missing)} (the other variants).")
    findings = ROOT / "docs" / "sqil-findings.md"
    if findings.exists():
        lines += ["", findings.read_text().rstrip()]
    (ROOT / "docs" / "sqil.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=["compile", "eval", "table"])
    ap.add_argument("--tasks", nargs="+", default=list(POLICIES))
    ap.add_argument("--episodes", type=int, default=EPISODES)
    ap.add_argument("--jobs", type=int, default=1, help="compiles (or models evaluated) at a time")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--policies", nargs="+", help="only these policies of the tasks")
    ap.add_argument("--configs", nargs="+", choices=list(CONFIGS), help="only these widths")
    ap.add_argument("--python", help="the simulators' Python (default: each task's venv)")
    ap.add_argument("--episode-jobs", type=int, default=1,
                    help="processes per model, each a block of the seeds (compare rows only at the same value)")
    a = ap.parse_args()
    {"compile": lambda: compile_all(a.tasks, a.variants, a.policies, a.configs, a.jobs),
     "eval": lambda: evaluate(a.tasks, a.episodes, a.jobs, a.variants, a.policies, a.python, a.episode_jobs),
     "table": table}[a.step]()


if __name__ == "__main__":
    main()
