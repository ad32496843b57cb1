"""The recipe benchmark (tools/bench_recipes.py) end to end on hopper_mlp: a 2 x 2 grid compiled
(short fine-tuning), evaluated in closed loop (2 episodes), resumed without recompiling, and its
HTML report checked in headless Chromium: the page loads, logs no errors, every plot is laid out,
and the screenshot is not blank. Needs the sqil CLI (SQIL_BIN, default target/debug/sqil); the
browser check skips with a reason where Chromium is not installed (tools/setup-ci.sh installs it)."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

TOOLS = pathlib.Path(__file__).resolve().parent.parent
ROOT = TOOLS.parent
sys.path.insert(0, str(TOOLS))
os.environ.setdefault("SQIL_BIN", str(ROOT / "target" / "debug" / "sqil"))

import bench_recipes  # noqa: E402

ARGS = ["--demos", str(ROOT / "testdata" / "demos" / "hopper.npz"), "--task", "hopper", "--episodes", "2",
        "--recipes", "rtn", "sqil", "--widths", "W4A8", "W3A8", "--jobs", "2", "--eval-jobs", "2",
        "--compile-args", "--steps 150 --states 2000 --val-states 500"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    bench_recipes.main([str(ROOT / "testdata" / "policies" / "hopper_mlp.onnx"), *ARGS, "-o", str(out)])
    return out


def test_grid_compiles_evaluates_and_resumes(report):
    res = json.loads((report / "results.json").read_text())
    cells = {c["cell"]: c for c in res["cells"]}
    assert sorted(cells) == ["rtn__W3A8", "rtn__W4A8", "sqil__W3A8", "sqil__W4A8"]
    for c in cells.values():
        assert c["closed_loop"]["episodes"] == 2 and c["size_bytes"] > 0 and c["latency_us"] > 0
        assert c["plan_matches"], c["cell"]
        assert [l["wbits"] for l in c["layers"]] == [int(c["width"][1])] * len(c["layers"])
    assert res["fp"]["closed_loop"]["episodes"] == 2
    assert cells["rtn__W3A8"]["shipped"] == "ptq:rtn"
    # SQIL fine-tunes from the best PTQ recipe and keeps its best held-out checkpoint: at 3 bits it
    # is far below plain round-to-nearest on the held-out states.
    assert cells["sqil__W3A8"]["heldout"]["all"] < cells["rtn__W3A8"]["heldout"]["all"]
    assert len(res["sis_histogram"]) == 20
    # Resumed: every cell is done, nothing recompiles or re-evaluates.
    stamps = {p: p.stat().st_mtime_ns for p in report.glob("cells/*/*.json")}
    bench_recipes.main([str(ROOT / "testdata" / "policies" / "hopper_mlp.onnx"), *ARGS, "-o", str(report)])
    assert stamps == {p: p.stat().st_mtime_ns for p in report.glob("cells/*/*.json")}


def test_bad_width_is_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match="W5A8"):
        bench_recipes.main([str(ROOT / "testdata" / "policies" / "hopper_mlp.onnx"), "--demos",
                            str(ROOT / "testdata" / "demos" / "hopper.npz"), "--widths", "W5A8", "-o", str(tmp_path)])


def test_report_renders_in_chromium(report, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no Chromium (tools/setup-ci.sh installs the chromium package)")
    page = (report / "report.html").resolve().as_uri()
    common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "shot.png"
    r = subprocess.run(common + ["--window-size=1300,2200", "--enable-logging=stderr", "--v=0", f"--screenshot={shot}", page],
                       capture_output=True, text=True, timeout=120)
    console = [l for l in r.stderr.splitlines() if "CONSOLE" in l]
    assert any("sqil-report: rendered 5 of 5 plots" in l for l in console), r.stderr[-3000:]
    assert not [l for l in console if "sqil-report: rendered" not in l], console
    dom = subprocess.run(common + ["--dump-dom", page], capture_output=True, text=True, timeout=120).stdout
    assert 'data-plots="5" data-rendered="5"' in dom
    import numpy as np
    from PIL import Image

    px = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(int)
    inked = float((px != 255).any(axis=1).mean())
    sqil_pink = int((np.abs(px - [0xE9, 0x1E, 0x63]) < 12).all(axis=1).sum())
    assert inked > 0.03, f"screenshot nearly blank ({inked:.3%} inked)"
    assert sqil_pink > 200, "no sqil-coloured marks in the plots"


def test_table_scripts_import_and_share_the_benchmark():
    """The table scripts load (alloc_table.py imported constants qrd_table.py had dropped, unseen)
    and compile and summarise through the recipe benchmark's helpers."""
    import importlib

    mods = {m: importlib.import_module(m) for m in ("qrd_table", "alloc_table", "ptq_table", "artifact_table")}
    assert mods["qrd_table"].run_compile is bench_recipes.run_compile
    assert mods["qrd_table"].summary is bench_recipes.closed_loop
    assert mods["alloc_table"].run_compile is bench_recipes.run_compile
    assert mods["qrd_table"].CONFIGS["W4A4"] == ["--wbits", "4", "--abits", "4"]
