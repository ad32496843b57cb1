"""The pip package: `pip install ./crates/python` into a fresh virtual environment (maturin from
PyPI builds the abi3 wheel; CI passes MATURIN_PEP517_ARGS="--profile dev" to reuse the test build),
then a five-line script compiles the bundled BC policy from its demonstrations and runs the
compiled artifact, and a bad path comes back as sqil.SqilError with sqil's message."""
import os
import pathlib
import subprocess
import venv

ROOT = pathlib.Path(__file__).resolve().parents[2]

SCRIPT = """
import sys, numpy as np, sqil
seen = {}
report = sqil.compile("testdata/policies/bc_hopper.onnx", "testdata/demos/hopper.npz", sys.argv[1], steps=30, states=500, val_states=200,
                      progress=lambda phase, done, total: seen.__setitem__(phase, (done, total)))
print("progress", sorted(seen.items()))
policy = sqil.load(sys.argv[1] + "/policy.bin")
actions = policy.act(np.zeros((4, 15), np.float32))
print("shipped", report["shipped"], "actions", actions.shape, policy.compiled)
try:
    sqil.compile("testdata/policies/bc_hopper.onnx", "no/such/demos.npz", sys.argv[1] + "/x")
except sqil.SqilError as e:
    print("error", e)
"""


def test_pip_install_then_compile_from_python(tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    env = dict(os.environ, MATURIN_PEP517_ARGS=os.environ.get("MATURIN_PEP517_ARGS", "--profile dev"))
    env.pop("PYTHONPATH", None)
    subprocess.run([str(py), "-m", "pip", "install", "-q", str(ROOT / "crates/python")], check=True, env=env,
                   cwd=ROOT)
    out = subprocess.run([str(py), "-c", SCRIPT, str(tmp_path / "out")], capture_output=True, text=True,
                         cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert any(l.startswith("fidelity") for l in lines), out.stdout  # compile's summary
    assert "shipped sqil@" in out.stdout or "shipped ptq:" in out.stdout, out.stdout
    assert "actions (4, 3) True" in out.stdout, out.stdout
    # The progress callback saw every long step run to its end.
    prog = [l for l in lines if l.startswith("progress ")][0]
    seen = dict(eval(prog[len("progress "):]))  # noqa: S307 - our own script's printed list
    assert seen["PTQ candidates"] == (4, 4), prog
    # Every phase ends with done == total (fine-tuning's total is the steps run when it stops early).
    assert all(d == t > 0 for d, t in seen.values()), prog
    assert {"SIS", "fine-tuning", "gptq weights"} <= set(seen), prog
    err = [l for l in lines if l.startswith("error ")]
    assert err and "no/such/demos.npz" in err[0], out.stdout
    # Installed from the wheel (site-packages), not from the source tree.
    where = subprocess.run([str(py), "-c", "import sqil; print(sqil.__file__)"], capture_output=True, text=True,
                           cwd=tmp_path, env=env).stdout
    assert "site-packages" in where, where
