"""sqil from Python: compile, quantize and allocate policies, and run them.

    import sqil
    report = sqil.compile("policy.onnx", "demos.npz", "out/")         # the whole pipeline
    policy = sqil.load("out/policy.bin")                                # the compiled artifact
    actions = policy.act(observations)                                  # float32 [B, obs] -> [B, act]

Each function runs the `sqil` command of the same name (the same defaults, checks and messages:
`sqil <command> --help` lists the flags), with keyword arguments as flags: `steps=300` is
`--steps 300`, `device="cuda"` is `--device cuda`, `resume=True` is `--resume`, a list repeats the
flag. Paths may be str or os.PathLike; demonstrations and calibration states may also be numpy
arrays (written to a temporary file). Errors raise `sqil.SqilError` (a ValueError) with sqil's
one-line message. Logs go to stderr, as on the command line. Progress: `progress=` on every
function, a callable receiving `(phase, done, total)` after each unit of work of the long steps
(SIS states, GPTQ layers, PTQ candidates, fine-tuning steps), or True for tqdm bars (one per phase,
tqdm installed).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import numpy as np

from ._sqil import Policy, __version__, load
from ._sqil import _run, _set_progress

__all__ = ["Policy", "SqilError", "allocate", "build", "compile", "load", "quantize", "run", "__version__"]

PathLike = Union[str, "os.PathLike[str]"]


class SqilError(ValueError):
    """A sqil command failed; the message is sqil's (it names the file, node or flag)."""


def _flags(flags: Mapping[str, Any]) -> list[str]:
    out: list[str] = []
    for key, value in flags.items():
        name = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            out.append(name)
        elif isinstance(value, (list, tuple)):
            for v in value:
                out += [name, os.fspath(v) if isinstance(v, os.PathLike) else str(v)]
        else:
            out += [name, os.fspath(value) if isinstance(value, os.PathLike) else str(value)]
    return out


ProgressFn = Callable[[str, int, int], None]


class _TqdmBars:
    """`progress=True`: one tqdm bar per phase, closed when the phase completes."""

    def __init__(self) -> None:
        from tqdm.auto import tqdm

        self._tqdm = tqdm
        self._bars: dict = {}

    def __call__(self, phase: str, done: int, total: int) -> None:
        bar = self._bars.get(phase)
        if bar is None:
            bar = self._bars[phase] = self._tqdm(total=total, desc=phase)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
            del self._bars[phase]

    def close(self) -> None:
        for b in self._bars.values():
            b.close()


def run(*args: Any, progress: Union[None, bool, ProgressFn] = None, **flags: Any) -> None:
    """Runs any sqil command: `sqil.run("inspect", "model.onnx", ir=True)`."""
    argv = [os.fspath(a) if isinstance(a, os.PathLike) else str(a) for a in args] + _flags(flags)
    hook = _TqdmBars() if progress is True else (progress or None)
    if hook is not None and not callable(hook):
        raise TypeError("progress: a callable (phase, done, total), True for tqdm bars, or None")
    _set_progress(hook)
    try:
        _run(argv)
    except ValueError as e:
        raise SqilError(str(e)) from None
    finally:
        _set_progress(None)
        if isinstance(hook, _TqdmBars):
            hook.close()


def _as_file(data: Any, tmp: str, name: str) -> str:
    """A path for `data`: given as is, or numpy data written into `tmp` (.npy for an array,
    .npz for a mapping of arrays such as {"observations": ..., "actions": ...})."""
    if isinstance(data, (str, os.PathLike)):
        return os.fspath(data)
    if isinstance(data, Mapping):
        path = os.path.join(tmp, name + ".npz")
        np.savez(path, **{k: np.asarray(v) for k, v in data.items()})
        return path
    path = os.path.join(tmp, name + ".npy")
    np.save(path, np.asarray(data, dtype=np.float32))
    return path


def compile(model: PathLike, demos: Any, out: PathLike, **flags: Any) -> dict:
    """`sqil compile`: SIS, every PTQ recipe, QRD fine-tuning, the held-out choice, the CPU
    artifact. `demos`: a .npz path, or a mapping of arrays (`observations` required). Returns
    report.json as a dict, with the one-screen summary under "summary"."""
    with tempfile.TemporaryDirectory() as tmp:
        run("compile", model, "--demos", _as_file(demos, tmp, "demos"), "-o", out, **flags)
    return json.loads((Path(out) / "report.json").read_text())


def quantize(model: PathLike, calib: Any, out: PathLike, **flags: Any) -> Optional[dict]:
    """`sqil quantize`: post-training quantization to a QDQ ONNX model `out`. `calib`: a .npy path
    or an array of states (one input), or a list of them (one per input). With `report=PATH`
    returns that JSON report as a dict."""
    with tempfile.TemporaryDirectory() as tmp:
        calibs = calib if isinstance(calib, (list, tuple)) else [calib]
        paths = [_as_file(c, tmp, f"calib{i}") for i, c in enumerate(calibs)]
        run("quantize", model, *sum((["--calib", p] for p in paths), []), "-o", out, **flags)
    rep = flags.get("report")
    return json.loads(Path(rep).read_text()) if rep else None


def allocate(model: PathLike, demos: Any, budget: str, out: PathLike, **flags: Any) -> dict:
    """`sqil allocate`: per-layer bit widths under `budget` ("3.5bits", "2MB", "50us"), written
    as a quantization config `out` (.toml or .json); returns the allocation report as a dict."""
    with tempfile.TemporaryDirectory() as tmp:
        report = flags.pop("report", None) or os.path.join(tmp, "allocation.json")
        run("allocate", model, "--demos", _as_file(demos, tmp, "demos"), "--budget", budget, "-o", out,
            report=report, **flags)
        return json.loads(Path(report).read_text())


def build(model: PathLike, out: PathLike, target: str = "cpu", **flags: Any) -> None:
    """`sqil build`: a compiled model for `target` (cpu, exe, c, cuda) at `out`."""
    run("build", model, "--target", target, "-o", out, **flags)
