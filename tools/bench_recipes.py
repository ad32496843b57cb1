"""Recipe benchmark: one command that compares quantization recipes on your policy and data.

    tools/.venv-dev/bin/python tools/bench_recipes.py POLICY.onnx --demos DEMOS [--task TASK] \\
        [--recipes rtn gptq qat sqil] [--widths W4A8 W3A8 W4A4] [--budgets 3.5bits 2MB ...] \\
        [--episodes 100] [--jobs 2] [--compile-args "--device cuda"] -o OUT

A cell is one recipe at one width (and, with --budgets, one budget for per-layer bit allocation):
one `sqil compile` into OUT/cells/<cell>/, all on the same held-out split of the demonstrations.
Recipes: rtn, mse, awq, gptq (that PTQ recipe alone, `--init R --ship ptq`), qat (`--recipe qat
--ship finetuned`), sqil (`--recipe sqil --ship finetuned`), default (what `sqil compile` ships).
Widths: WnAm (A16 = float activations). Cells run --jobs at a time, the cores split between them;
the grid resumes cell by cell (a cell with report.json is done, one with checkpoint.json continues
with --resume).

With --task (a task of tools/sqil_tools/tasks.py), every cell's QDQ ONNX and the float policy run
--episodes closed-loop episodes, reset seeds 0..N-1 (tools/eval.py, in the task's simulator venv);
the held-out episodes of the demonstrations chose each cell's checkpoint, the evaluation seeds only
report. Without a task: held-out action error alone.

Writes OUT/results.json and OUT/report.html: one self-contained page (inline SVG, no network)
with the Pareto plot of size or latency against return (or held-out error), per-recipe bars with
95% intervals, the SIS histogram, per-layer bit widths and the per-layer report.
"""

import argparse
import html
import json
import math
import os
import pathlib
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

RECIPES = {
    "rtn": ["--init", "rtn", "--ship", "ptq"],
    "mse": ["--init", "mse", "--ship", "ptq"],
    "awq": ["--init", "awq", "--ship", "ptq"],
    "gptq": ["--init", "gptq", "--ship", "ptq"],
    "qat": ["--recipe", "qat", "--ship", "finetuned"],
    "sqil": ["--recipe", "sqil", "--ship", "finetuned"],
    "default": [],
}
COLORS = {"rtn": "#9e9e9e", "mse": "#8d6e63", "awq": "#ff9800", "gptq": "#3f51b5", "qat": "#009688",
          "sqil": "#e91e63", "default": "#212121", "fp": "#4caf50"}


def width_flags(w):
    """`W4A8` -> sqil compile flags; A16 means float activations."""
    u = w.upper()
    if not (u.startswith("W") and "A" in u):
        raise SystemExit(f"--widths: `{w}` is not like W4A8")
    wb, ab = u[1:].split("A", 1)
    if wb not in ("2", "3", "4", "8") or ab not in ("4", "8", "16"):
        raise SystemExit(f"--widths: `{w}`: weights take 2, 3, 4 or 8 bits, activations 4, 8 or 16 (float)")
    return ["--wbits", wb, "--abits", "float" if ab == "16" else ab]


def cell_name(recipe, width, budget):
    return f"{recipe}__{width}" + (f"__{budget}" if budget else "")


def sqil_bin():
    return os.environ.get("SQIL_BIN", str(ROOT / "target" / "release" / "sqil"))


def run_compile(policy, demos, out, flags):
    """One `sqil compile POLICY --demos DEMOS FLAGS -o OUT`, resumable: done when OUT/report.json
    exists, continued with --resume from OUT/checkpoint.json. Returns (how, seconds, the last line
    of its log); raises RuntimeError with that line when it fails. The table scripts compile
    through this too."""
    out = pathlib.Path(out)
    if (out / "report.json").exists():
        return "done before", 0.0, ""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sqil_bin(), "compile", str(policy), "--demos", str(demos), *flags, "-o", str(out)]
    if (out / "checkpoint.json").exists() and "ptq" not in flags:
        cmd.append("--resume")
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True)
    (out / "compile.log").write_text(r.stderr)
    last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"
    if r.returncode != 0 and not (out / "report.json").exists():
        raise RuntimeError(f"{out.name}: {last}")
    return "compiled", time.time() - t0, last


def compile_cell(a, recipe, width, budget, threads):
    out = pathlib.Path(a.out) / "cells" / cell_name(recipe, width, budget)
    flags = [*width_flags(width), *RECIPES[recipe], "--threads", str(threads),
             *(["--budget", budget] if budget else []), *a.compile_args.split()]
    how, secs, _ = run_compile(a.policy, a.demos, out, flags)
    return out, how, secs


def latency_us(policy_bin):
    r = subprocess.run([sqil_bin(), "bench", str(policy_bin), "--batch", "1", "--iters", "300"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        return None
    for line in r.stdout.splitlines():
        try:
            return json.loads(line)["mean_us"]
        except (ValueError, KeyError):
            continue
    return None


def closed_loop(ev):
    if ev is None:
        return None
    n = ev["episodes"]
    return {"return_mean": ev["return_mean"], "return_ci95": 1.96 * ev["return_std"] / math.sqrt(max(n - 1, 1)),
            "success_rate": ev["success_rate"], "success_ci95": ev["success_ci95"], "episodes": n}


def load(p):
    p = pathlib.Path(p)
    return json.loads(p.read_text()) if p.exists() else None


def run_grid(a):
    from tqdm import tqdm

    cells = [(r, w, b) for w in a.widths for b in (a.budgets or [None]) for r in a.recipes]
    jobs = max(1, min(a.jobs, len(cells)))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    failed = []
    with ThreadPoolExecutor(jobs) as ex, tqdm(total=len(cells), desc="cells", unit="cell") as bar:
        futs = {ex.submit(compile_cell, a, *c, threads): c for c in cells}
        for f in as_completed(futs):
            try:
                out, how, secs = f.result()
                bar.set_postfix_str(f"{out.name} {how}" + (f" in {secs:.0f} s" if secs else ""))
            except RuntimeError as e:
                failed.append(str(e))
                tqdm.write(f"failed: {e}")
            bar.update(1)
    if a.task:
        from sqil_tools import evaljobs

        fp_dir = pathlib.Path(a.out) / "fp"
        fp_dir.mkdir(parents=True, exist_ok=True)
        work = [(a.task, pathlib.Path(a.policy).resolve(), fp_dir / "eval.json")]
        work += [(a.task, pathlib.Path(a.out) / "cells" / cell_name(*c) / "model.onnx",
                  pathlib.Path(a.out) / "cells" / cell_name(*c) / "eval.json") for c in cells]
        print(f"closed loop: {len(work)} models x {a.episodes} episodes on {a.task}", flush=True)
        evaljobs.evaluate(work, a.episodes, max(1, a.eval_jobs), a.python)
    return cells, failed


def collect(a, cells):
    out = pathlib.Path(a.out)
    rows, sis_hist = [], None
    for r, w, b in cells:
        d = out / "cells" / cell_name(r, w, b)
        rep = load(d / "report.json")
        if rep is None:
            continue
        sis_hist = sis_hist or rep.get("sis_histogram")
        pb = d / "policy.bin"
        rows.append({
            "cell": d.name, "recipe": r, "width": w, "budget": b, "shipped": rep["shipped"], "ptq_recipe": rep["init"],
            "heldout": rep["heldout_after"], "size_bytes": pb.stat().st_size if pb.exists() else None,
            "latency_us": latency_us(pb) if pb.exists() else None, "seconds": rep["seconds"],
            "device": rep.get("device", "cpu"), "closed_loop": closed_loop(load(d / "eval.json")),
            "layers": [{k: l.get(k) for k in ("name", "op", "params", "wbits", "abits", "weight_rel_mse", "output_rel_mse")}
                       for l in rep["ptq"]["layers"]],
            "plan_matches": rep.get("cpu_mismatch") is None,
        })
    fp_bytes = pathlib.Path(a.policy).stat().st_size
    fp = closed_loop(load(out / "fp" / "eval.json")) if a.task else None
    res = {"policy": str(a.policy), "demos": str(a.demos), "task": a.task, "episodes": a.episodes if a.task else 0,
           "recipes": a.recipes, "widths": a.widths, "budgets": a.budgets, "compile_args": a.compile_args,
           "fp": {"closed_loop": fp, "onnx_bytes": fp_bytes}, "sis_histogram": sis_hist, "cells": rows,
           "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or platform.system()}"}
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(res, indent=1) + "\n")
    os.replace(tmp, out / "results.json")
    return res


# ---- the report: inline SVG ----

def esc(s):
    return html.escape(str(s))


class Plot:
    """A scatter/bar frame in SVG: linear or log axes, ticks, labels."""

    def __init__(self, w, h, x0, x1, y0, y1, xlog=False, ylog=False, xlabel="", ylabel="", title=""):
        self.w, self.h, self.m = w, h, (60, 20, 46, 50)  # left, right, top (title, legend), bottom
        self.xlog, self.ylog = xlog, ylog
        f = (lambda v: math.log10(max(v, 1e-30))) if xlog else float
        g = (lambda v: math.log10(max(v, 1e-30))) if ylog else float
        self.fx, self.fy = f, g
        self.x0, self.x1 = f(x0), f(x1)
        self.y0, self.y1 = g(y0), g(y1)
        if self.x1 <= self.x0:
            self.x1 = self.x0 + 1
        if self.y1 <= self.y0:
            self.y1 = self.y0 + 1
        self.parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" width="{w}" height="{h}" viewBox="0 0 {w} {h}">',
                      f'<rect x="0" y="0" width="{w}" height="{h}" fill="white"/>',
                      f'<text x="{w / 2}" y="18" text-anchor="middle" font-size="14" font-weight="bold">{esc(title)}</text>']
        l, r, t, b = self.m
        self.parts.append(f'<rect x="{l}" y="{t}" width="{w - l - r}" height="{h - t - b}" fill="none" stroke="#444"/>')
        for i in range(5):
            fx = self.x0 + (self.x1 - self.x0) * i / 4
            fy = self.y0 + (self.y1 - self.y0) * i / 4
            X, Y = self.X(fx, raw=True), self.Y(fy, raw=True)
            vx = 10 ** fx if xlog else fx
            vy = 10 ** fy if ylog else fy
            self.parts.append(f'<line x1="{X}" y1="{t}" x2="{X}" y2="{h - b}" stroke="#eee"/>'
                              f'<text x="{X}" y="{h - b + 14}" text-anchor="middle" font-size="10">{fmt(vx)}</text>')
            self.parts.append(f'<line x1="{l}" y1="{Y}" x2="{w - r}" y2="{Y}" stroke="#eee"/>'
                              f'<text x="{l - 4}" y="{Y + 3}" text-anchor="end" font-size="10">{fmt(vy)}</text>')
        self.parts.append(f'<text x="{(l + w - r) / 2}" y="{h - 12}" text-anchor="middle" font-size="12">{esc(xlabel)}</text>')
        self.parts.append(f'<text transform="translate(14,{(t + h - b) / 2}) rotate(-90)" text-anchor="middle" '
                          f'font-size="12">{esc(ylabel)}</text>')

    def X(self, v, raw=False):
        v = v if raw else self.fx(v)
        l, r, _, _ = self.m
        return l + (v - self.x0) / (self.x1 - self.x0) * (self.w - l - r)

    def Y(self, v, raw=False):
        v = v if raw else self.fy(v)
        _, _, t, b = self.m
        return self.h - b - (v - self.y0) / (self.y1 - self.y0) * (self.h - t - b)

    def add(self, s):
        self.parts.append(s)

    def svg(self):
        return "\n".join(self.parts + ["</svg>"])


def fmt(v):
    if v == 0:
        return "0"
    a = abs(v)
    return f"{v:.1e}" if a < 1e-2 or a >= 1e5 else (f"{v:.0f}" if a >= 100 else f"{v:.3g}")


def pad(lo, hi, log=False):
    if log:
        return lo / 1.5, hi * 1.5
    d = (hi - lo) or abs(hi) or 1.0
    return lo - 0.08 * d, hi + 0.08 * d


def metric(c, res):
    """(value, half-width or None, label, higher is better)."""
    if res["task"] and c["closed_loop"]:
        return c["closed_loop"]["return_mean"], c["closed_loop"]["return_ci95"], "mean return (closed loop)", True
    return c["heldout"]["all"], None, "held-out action MSE vs float", False


def pareto_svg(res, x_key):
    cells = [c for c in res["cells"] if c.get(x_key)]
    if not cells:
        return "<p>No cells.</p>"
    ms = [metric(c, res) for c in cells]
    label, higher = ms[0][2], ms[0][3]
    xs = [c[x_key] / (1024 if x_key == "size_bytes" else 1) for c in cells]
    ys = [m[0] for m in ms]
    fp = res["fp"]["closed_loop"] if res["task"] else None
    ylo, yhi = min(ys + ([fp["return_mean"]] if fp else [])), max(ys + ([fp["return_mean"]] if fp else []))
    ylog = not higher and ylo > 0
    x0, x1 = pad(min(xs), max(xs))
    y0, y1 = pad(ylo, yhi, ylog)
    xl = "policy.bin size (KB)" if x_key == "size_bytes" else "latency, batch 1, one thread (us)"
    p = Plot(620, 380, max(x0, 0), x1, y0, y1, ylog=ylog, xlabel=xl, ylabel=label,
             title=f"Pareto: {'size' if x_key == 'size_bytes' else 'latency'} vs {'return' if higher else 'error'}")
    if fp:
        Y = p.Y(fp["return_mean"])
        p.add(f'<line x1="{p.m[0]}" y1="{Y}" x2="{p.w - p.m[1]}" y2="{Y}" stroke="{COLORS["fp"]}" stroke-dasharray="6,4"/>'
              f'<text x="{p.w - p.m[1] - 4}" y="{Y - 4}" text-anchor="end" font-size="10" fill="{COLORS["fp"]}">float policy</text>')
    # The front: no other cell is at most as large and at least as good.
    pts = sorted(zip(xs, ys, cells), key=lambda t: (t[0], -t[1] if higher else t[1]))
    front, best = [], None
    for x, y, c in pts:
        if best is None or (y > best if higher else y < best):
            front.append((x, y))
            best = y
    if len(front) > 1:
        d = " ".join(f"{'M' if i == 0 else 'L'}{p.X(x):.1f},{p.Y(y):.1f}" for i, (x, y) in enumerate(front))
        p.add(f'<path d="{d}" fill="none" stroke="#999" stroke-width="1.5"/>')
    for (x, y, c), m in zip(zip(xs, ys, cells), ms):
        X, Y = p.X(x), p.Y(y)
        if m[1]:
            p.add(f'<line x1="{X}" y1="{p.Y(y - m[1])}" x2="{X}" y2="{p.Y(y + m[1])}" stroke="{COLORS.get(c["recipe"], "#000")}"/>')
        p.add(f'<circle cx="{X:.1f}" cy="{Y:.1f}" r="5" fill="{COLORS.get(c["recipe"], "#000")}" stroke="white">'
              f'<title>{esc(c["cell"])}: {fmt(y)}</title></circle>'
              f'<text x="{X + 7:.1f}" y="{Y - 6:.1f}" font-size="9">{esc(c["width"])}</text>')
    legend(p, sorted({c["recipe"] for c in cells}, key=list(COLORS).index))
    return p.svg()


def legend(p, recipes):
    x = p.m[0]
    for r in recipes:
        p.add(f'<rect x="{x}" y="{p.m[2] - 18}" width="10" height="10" fill="{COLORS.get(r, "#000")}"/>'
              f'<text x="{x + 13}" y="{p.m[2] - 9}" font-size="10">{esc(r)}</text>')
        x += 14 + 7 * len(r) + 10


def bars_svg(res):
    cells = res["cells"]
    if not cells:
        return "<p>No cells.</p>"
    groups = []
    for c in cells:
        key = c["width"] + (f" {c['budget']}" if c["budget"] else "")
        if key not in groups:
            groups.append(key)
    recipes = [r for r in res["recipes"] if any(c["recipe"] == r for c in cells)]
    ms = {(c["width"] + (f" {c['budget']}" if c["budget"] else ""), c["recipe"]): metric(c, res) for c in cells}
    label, higher = next(iter(ms.values()))[2:]
    vals = [v for v, h, *_ in ms.values()] + [v + (h or 0) for v, h, *_ in ms.values()]
    ylog = not higher and min(vals) > 0
    lo = 0 if higher else min(vals)
    fp = res["fp"]["closed_loop"] if res["task"] else None
    hi = max(vals + ([fp["return_mean"]] if fp else []))
    y0, y1 = (lo, hi * 1.1) if not ylog else pad(min(vals), hi, True)
    w = max(420, 90 + len(groups) * (len(recipes) * 22 + 30))
    title = "per recipe: mean return with 95% intervals" if higher else "per recipe: held-out action MSE (no interval)"
    p = Plot(w, 340, 0, 1, y0, y1, ylog=ylog, ylabel=label, title=title)
    p.parts = [s for s in p.parts if 'text-anchor="middle" font-size="10"' not in s]  # no x ticks
    inner = p.w - p.m[0] - p.m[1]
    gw = inner / len(groups)
    bw = min(22, (gw - 20) / max(len(recipes), 1))
    base = p.Y(y0) if ylog else p.Y(0)
    for gi, g in enumerate(groups):
        gx = p.m[0] + gi * gw + (gw - bw * len(recipes)) / 2
        p.add(f'<text x="{p.m[0] + gi * gw + gw / 2}" y="{p.h - p.m[3] + 14}" text-anchor="middle" font-size="11">{esc(g)}</text>')
        for ri, r in enumerate(recipes):
            m = ms.get((g, r))
            if m is None:
                continue
            v, h = m[0], m[1]
            x = gx + ri * bw
            Y = p.Y(v)
            p.add(f'<rect x="{x:.1f}" y="{min(Y, base):.1f}" width="{bw - 2:.1f}" height="{abs(base - Y):.1f}" '
                  f'fill="{COLORS.get(r, "#000")}"><title>{esc(r)} {esc(g)}: {fmt(v)}'
                  f'{" ± " + fmt(h) if h else ""}</title></rect>')
            if h:
                xc = x + (bw - 2) / 2
                p.add(f'<line x1="{xc}" y1="{p.Y(v - h)}" x2="{xc}" y2="{p.Y(v + h)}" stroke="black"/>'
                      f'<line x1="{xc - 3}" y1="{p.Y(v - h)}" x2="{xc + 3}" y2="{p.Y(v - h)}" stroke="black"/>'
                      f'<line x1="{xc - 3}" y1="{p.Y(v + h)}" x2="{xc + 3}" y2="{p.Y(v + h)}" stroke="black"/>')
    if fp:
        Y = p.Y(fp["return_mean"])
        p.add(f'<line x1="{p.m[0]}" y1="{Y}" x2="{p.w - p.m[1]}" y2="{Y}" stroke="{COLORS["fp"]}" stroke-dasharray="6,4"/>')
    legend(p, recipes)
    return p.svg()


def sis_svg(res):
    h = res["sis_histogram"]
    if not h:
        return "<p>No SIS histogram.</p>"
    counts = [c for _, c in h]
    top = h[-1][0]
    # Counts on a log axis: SIS is heavy-tailed, and the few important states are the point.
    p = Plot(620, 300, 0, top, 0.8, max(counts) * 1.5, ylog=True, xlabel="SIS (state importance)",
             ylabel="training states (log)", title="SIS histogram of the training states")
    wbin = top / len(h)
    for i, (edge, c) in enumerate(h):
        if c == 0:
            continue
        x = p.X(edge - wbin)
        p.add(f'<rect x="{x:.1f}" y="{p.Y(c):.1f}" width="{p.X(edge) - x - 1:.1f}" height="{p.Y(0.8) - p.Y(c):.1f}" '
              f'fill="#e91e63"><title>[{fmt(edge - wbin)}, {fmt(edge)}): {c}</title></rect>')
    return p.svg()


def bits_svg(res):
    cells = [c for c in res["cells"] if c["layers"]]
    if not cells:
        return "<p>No layers.</p>"
    layers = [l["name"] for l in cells[0]["layers"]]
    cw, rh, lw = 70, 18, min(260, 12 + 7 * max(len(n) for n in layers))
    w, h = lw + cw * len(cells) + 70, 60 + rh * len(layers) + 10
    shade = {2: "#b71c1c", 3: "#ef6c00", 4: "#fbc02d", 8: "#7cb342", None: "#cfd8dc"}
    s = [f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" width="{w}" height="{h}" viewBox="0 0 {w} {h}">',
         f'<rect width="{w}" height="{h}" fill="white"/>',
         f'<text x="{w / 2}" y="16" text-anchor="middle" font-size="14" font-weight="bold">per-layer weight bits / activation bits</text>']
    for ci, c in enumerate(cells):
        x = lw + ci * cw
        s.append(f'<text transform="translate({x + cw / 2},{54}) rotate(-30)" font-size="9">{esc(c["cell"])}</text>')
        by = {l["name"]: l for l in c["layers"]}
        for li, n in enumerate(layers):
            l = by.get(n, {})
            y = 60 + li * rh
            wb, ab = l.get("wbits"), l.get("abits")
            s.append(f'<rect x="{x}" y="{y}" width="{cw - 2}" height="{rh - 2}" fill="{shade.get(wb, "#90a4ae")}">'
                     f'<title>{esc(n)}: W{wb} A{ab or "float"}</title></rect>'
                     f'<text x="{x + cw / 2}" y="{y + 12}" text-anchor="middle" font-size="10">W{wb if wb else "f"}/A{ab or "f"}</text>')
    for li, n in enumerate(layers):
        s.append(f'<text x="{lw - 6}" y="{60 + li * rh + 12}" text-anchor="end" font-size="10">{esc(n[-36:])}</text>')
    return "\n".join(s + ["</svg>"])


def table(rows, cols):
    head = "".join(f"<th>{esc(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{esc(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render(res):
    cells = res["cells"]

    def cl(c):
        x = c["closed_loop"]
        return "-" if not x else (f"{x['return_mean']:.0f} ± {x['return_ci95']:.0f}, success {x['success_rate']:.2f} "
                                  f"[{x['success_ci95'][0]:.2f}, {x['success_ci95'][1]:.2f}]")

    rows = [[c["cell"], c["shipped"], f"{c['heldout']['all']:.3e}", f"{c['heldout']['critical']:.3e}", cl(c),
             f"{(c['size_bytes'] or 0) / 1024:.1f}", fmt(c["latency_us"]) if c["latency_us"] else "-",
             "yes" if c["plan_matches"] else "NO", f"{c['seconds']:.0f} ({c['device']})"] for c in cells]
    cells_table = table(rows, ["cell", "shipped", "held-out MSE", "critical MSE", "closed loop", "policy.bin KB",
                               "latency us", "artifact = simulation", "compile s"])
    layer_tables = []
    for c in cells:
        if c["recipe"] in ("default", "sqil") or len(cells) <= 4:
            lr = [[l["name"], l["op"], l["params"], l["wbits"], l["abits"] or "float",
                   fmt(l["weight_rel_mse"]) if l["weight_rel_mse"] is not None else "-",
                   fmt(l["output_rel_mse"]) if l["output_rel_mse"] is not None else "-"] for l in c["layers"]]
            layer_tables.append(f"<h3>{esc(c['cell'])}</h3>" + table(lr, ["layer", "op", "params", "W bits", "A bits",
                                                                           "weight rel MSE", "output rel MSE"]))
    fp = res["fp"]["closed_loop"]
    fp_line = (f"Float policy: {fp['return_mean']:.0f} ± {fp['return_ci95']:.0f}, success {fp['success_rate']:.2f} over "
               f"{fp['episodes']} episodes." if fp else "No task given: held-out action error only.")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>sqil recipe benchmark: {esc(pathlib.Path(res['policy']).name)}</title>
<style>
body {{ font-family: sans-serif; margin: 24px; color: #222; }}
table {{ border-collapse: collapse; font-size: 12px; margin: 8px 0 20px; }}
th, td {{ border: 1px solid #ccc; padding: 3px 6px; text-align: right; }}
th {{ background: #f3f3f3; }} td:first-child {{ text-align: left; }}
.plots {{ display: flex; flex-wrap: wrap; gap: 16px; }}
</style></head>
<body>
<h1>Recipe benchmark: {esc(pathlib.Path(res['policy']).name)}</h1>
<p>Demonstrations {esc(res['demos'])}; task {esc(res['task'] or '-')}; recipes {esc(', '.join(res['recipes']))};
widths {esc(', '.join(res['widths']))}{'; budgets ' + esc(', '.join(res['budgets'])) if res['budgets'] else ''};
extra compile flags: {esc(res['compile_args'] or 'none')}. Machine: {esc(res['machine'])}. {esc(fp_line)}
Held-out episodes of the demonstrations chose each cell's model; the closed-loop seeds only report.
Intervals: 95% (return: normal approximation; success: Wilson).</p>
<div class="plots">
{pareto_svg(res, 'size_bytes')}
{pareto_svg(res, 'latency_us')}
{bars_svg(res)}
{sis_svg(res)}
</div>
<h2>Cells</h2>
{cells_table}
<h2>Per-layer bit widths</h2>
{bits_svg(res)}
<h2>Per-layer report</h2>
{''.join(layer_tables)}
<script>
// A check the report test reads: every plot has been laid out with a non-empty box.
(function () {{
  var plots = document.querySelectorAll("svg.plot"), ok = 0;
  for (var i = 0; i < plots.length; i++) {{
    var b = plots[i].getBBox();
    if (b.width > 0 && b.height > 0) ok++;
    else console.error("sqil-report: plot " + i + " is empty");
  }}
  document.body.setAttribute("data-plots", plots.length);
  document.body.setAttribute("data-rendered", ok);
  console.log("sqil-report: rendered " + ok + " of " + plots.length + " plots");
}})();
</script>
</body></html>
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("policy", type=pathlib.Path)
    ap.add_argument("--demos", required=True, type=pathlib.Path)
    ap.add_argument("--task", help="closed-loop task (tools/sqil_tools/tasks.py); default: held-out error only")
    ap.add_argument("--recipes", nargs="+", default=["rtn", "gptq", "qat", "sqil"], choices=list(RECIPES))
    ap.add_argument("--widths", nargs="+", default=["W4A8", "W3A8", "W4A4"])
    ap.add_argument("--budgets", nargs="+", default=[], help="per-layer allocation budgets (sqil compile --budget)")
    ap.add_argument("--episodes", type=int, default=100)
    ap.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 1) // 2), help="cells compiled at once")
    ap.add_argument("--eval-jobs", type=int, default=os.cpu_count() or 1, help="models evaluated at once")
    ap.add_argument("--compile-args", default="", help="extra `sqil compile` flags for every cell, e.g. --device cuda")
    ap.add_argument("--python", help="the simulator's Python (default: the task's venv)")
    ap.add_argument("--report-only", action="store_true", help="rewrite results.json and report.html from the cells")
    ap.add_argument("-o", "--out", required=True, type=pathlib.Path)
    a = ap.parse_args(argv)
    for w in a.widths:
        width_flags(w)
    for p, what in ((a.policy, "policy"), (a.demos, "--demos")):
        if not p.exists():
            raise SystemExit(f"{p}: {what} not found")
    if a.task:
        from sqil_tools import tasks

        try:
            tasks.get(a.task)
        except Exception as e:  # noqa: BLE001 - the task registry's own message
            raise SystemExit(f"--task {a.task}: {e}")
    if not pathlib.Path(sqil_bin()).exists():
        raise SystemExit(f"{sqil_bin()}: no sqil binary (cargo build --release -p sqil, or set SQIL_BIN)")
    a.out.mkdir(parents=True, exist_ok=True)
    cells = [(r, w, b) for w in a.widths for b in (a.budgets or [None]) for r in a.recipes]
    failed = [] if a.report_only else run_grid(a)[1]
    res = collect(a, cells)
    tmp = a.out / "report.html.tmp"
    tmp.write_text(render(res))
    os.replace(tmp, a.out / "report.html")
    print(f"{len(res['cells'])} of {len(cells)} cells -> {a.out / 'results.json'}, {a.out / 'report.html'}")
    if failed:
        raise SystemExit("failed cells:\n" + "\n".join(failed))


if __name__ == "__main__":
    main()
