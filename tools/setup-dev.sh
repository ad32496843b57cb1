#!/usr/bin/env bash
# The environment for regenerating testdata (tools/make_testdata.py): PyTorch (CPU use only,
# but PyPI's wheel brings about 2.5 GB of CUDA libraries), onnxruntime, pybullet. Not for CI.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x tools/.venv-dev/bin/python ] || python3 -m venv tools/.venv-dev
tools/.venv-dev/bin/python -m pip install -q --disable-pip-version-check -r tools/requirements-dev.txt
