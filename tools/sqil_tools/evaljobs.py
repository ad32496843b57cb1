"""Closed-loop evaluation of many models in parallel: one `tools/eval.py` process per model (one
thread each), in the task's simulator venv, writing `eval.json` next to the model."""

import os
import pathlib
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from . import tasks

TOOLS = pathlib.Path(__file__).resolve().parent.parent
ROOT = TOOLS.parent


def evaluate_dirs(work, episodes, jobs, python=None):
    """`work`: (task name, model directory) pairs; each directory's model.onnx is evaluated with
    reset seeds 0..episodes-1 unless its eval.json exists."""
    todo = [(t, pathlib.Path(d)) for t, d in work if (pathlib.Path(d) / "model.onnx").exists() and not (pathlib.Path(d) / "eval.json").exists()]

    def one(job):
        t, d = job
        py = python or (str(ROOT / tasks.SIM_PYTHON[t]) if t in tasks.SIM_PYTHON else sys.executable)
        cmd = [py, str(TOOLS / "eval.py"), "--task", t, "--policy", str(d / "model.onnx"), "--episodes", str(episodes),
               "--seed", "0", "-o", str(d / "eval.json")]
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        print(r.stdout.strip().splitlines()[-1] if r.returncode == 0 else f"FAILED {d}: {r.stderr[-2000:]}", flush=True)

    with ThreadPoolExecutor(jobs) as ex:
        list(ex.map(one, todo))
