"""Loss curves of data-parallel fine-tuning at 1 vs N GPUs, overlaid: one SVG per model from the
JSON lines of `cargo bench -p sqil-driver --bench dp_step` and `tools/bench_ddp_torch.py` (the
lines with a `curve`: the loss of every step at one GPU count, same global batch, seed and steps).
No plotting library: the SVG is written directly.

    python tools/plot_dp_curves.py RESULTS.jsonl [...] --out docs/data/dp-curves   # -> PREFIX-MODEL.svg
"""
import argparse
import collections
import json
import math
import pathlib

W, H, PAD = 640, 360, 56
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#7f7f7f"]


def svg(model, curves):
    """`curves`: [(label, [loss per step])] on one log-scale axis."""
    vals = [v for _, c in curves for v in c if v > 0 and math.isfinite(v)]
    if not vals:
        return None
    lo, hi = math.log10(min(vals)), math.log10(max(vals))
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    steps = max(len(c) for _, c in curves)
    x = lambda i: PAD + (W - 2 * PAD) * (i / max(steps - 1, 1))  # noqa: E731
    y = lambda v: H - PAD - (H - 2 * PAD) * ((math.log10(v) - lo) / (hi - lo))  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2}" y="20" text-anchor="middle" font-size="14">{model}: QRD loss per step, 1 vs N GPUs</text>',
           f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - PAD}" y2="{H - PAD}" stroke="black"/>',
           f'<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{H - PAD}" stroke="black"/>',
           f'<text x="{W / 2}" y="{H - 16}" text-anchor="middle">step</text>',
           f'<text x="14" y="{H / 2}" text-anchor="middle" transform="rotate(-90 14 {H / 2})">loss (log)</text>']
    for k in range(5):
        v = 10 ** (lo + (hi - lo) * k / 4)
        out.append(f'<text x="{PAD - 4}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.3g}</text>')
    for k in range(5):
        i = round((steps - 1) * k / 4)
        out.append(f'<text x="{x(i):.1f}" y="{H - PAD + 16}" text-anchor="middle">{i + 1}</text>')
    for n, (label, c) in enumerate(curves):
        pts = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(c) if v > 0 and math.isfinite(v))
        col = COLOURS[n % len(COLOURS)]
        dash = ' stroke-dasharray="6 3"' if n % 2 else ""
        out.append(f'<polyline points="{pts}" fill="none" stroke="{col}" stroke-width="1.6"{dash}/>')
        out.append(f'<text x="{W - PAD - 150}" y="{PAD + 16 * n}" fill="{col}">{label}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", type=pathlib.Path)
    ap.add_argument("--out", type=pathlib.Path, required=True, help="prefix of the SVG files")
    a = ap.parse_args()
    by_model = collections.defaultdict(list)
    for p in a.results:
        for line in p.read_text().splitlines():
            if line.startswith("{") and '"curve"' in line:
                r = json.loads(line)
                by_model[r["model"]].append((f'{r.get("engine", "sqil")}, {r["gpus"]} GPU(s), batch {r["batch"]}',
                                             r["curve"]))
    for model, curves in sorted(by_model.items()):
        text = svg(model, sorted(curves))
        if text:
            dst = a.out.parent / f"{a.out.name}-{model}.svg"
            tmp = dst.with_suffix(".svg.tmp")
            tmp.write_text(text)
            tmp.replace(dst)
            print(dst)


if __name__ == "__main__":
    main()
