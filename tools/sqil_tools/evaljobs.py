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


def evaluate(work, episodes, jobs, python=None, episode_jobs=1):
    """`work`: (task name, model path, output json) triples; each model is evaluated with reset
    seeds 0..episodes-1 unless its output exists or the model does not. `episode_jobs` > 1 splits
    each model's seeds over that many processes (`eval.py --jobs`)."""
    todo = [(t, pathlib.Path(m), pathlib.Path(o)) for t, m, o in work if pathlib.Path(m).exists() and not pathlib.Path(o).exists()]

    def one(job):
        t, model, out = job
        py = python or (str(ROOT / tasks.SIM_PYTHON[t]) if t in tasks.SIM_PYTHON else sys.executable)
        cmd = [py, str(TOOLS / "eval.py"), "--task", t, "--policy", str(model), "--episodes", str(episodes),
               "--seed", "0", "-o", str(out)] + (["--jobs", str(episode_jobs)] if episode_jobs > 1 else [])
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        print(r.stdout.strip().splitlines()[-1] if r.returncode == 0 else f"FAILED {model}: {r.stderr[-2000:]}", flush=True)

    with ThreadPoolExecutor(jobs) as ex:
        list(ex.map(one, todo))


def evaluate_dirs(work, episodes, jobs, python=None):
    """`work`: (task name, model directory) pairs; each directory's model.onnx is evaluated into
    its eval.json."""
    evaluate([(t, pathlib.Path(d) / "model.onnx", pathlib.Path(d) / "eval.json") for t, d in work], episodes, jobs, python)
