#!/usr/bin/env bash
# Makes the Python environment the tests need: .venv-ci with the onnx==1.22.0 wheel, whose
# node tests the conformance suite runs, plus onnxruntime and the simulators for the short
# closed-loop tests. Idempotent; no PyTorch (that is tools/setup-dev.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv-ci/bin/python ]; then
  python3 -m venv .venv-ci
fi
.venv-ci/bin/python -m pip install -q --disable-pip-version-check -r tools/requirements-ci.txt
.venv-ci/bin/python -c "import onnx, os; d = os.path.join(os.path.dirname(onnx.__file__), 'backend/test/data/node'); assert os.path.isdir(d), d; print('onnx', onnx.__version__, 'node tests:', len(os.listdir(d)))"
# pickplace-pixels renders MuJoCo offscreen with OSMesa (no GPU in CI); the C back end's tests
# cross-compile for aarch64 and Cortex-M and run under QEMU.
pkgs=""
ldconfig -p | grep -q libOSMesa || pkgs="$pkgs libosmesa6"
command -v arm-none-eabi-gcc >/dev/null || pkgs="$pkgs gcc-arm-none-eabi libnewlib-arm-none-eabi"
command -v aarch64-linux-gnu-gcc >/dev/null || pkgs="$pkgs gcc-aarch64-linux-gnu libc6-dev-arm64-cross"
command -v qemu-aarch64 >/dev/null || pkgs="$pkgs qemu-user"
command -v qemu-system-arm >/dev/null || pkgs="$pkgs qemu-system-arm"
# The recipe benchmark's report is checked in a real headless browser.
command -v chromium >/dev/null || pkgs="$pkgs chromium"
# LeRobot cameras stored as video are decoded by the ffmpeg program.
command -v ffmpeg >/dev/null || pkgs="$pkgs ffmpeg"
# HDF5 (robomimic) demonstrations: sqil's `hdf5` feature links libhdf5.
[ -e /usr/include/hdf5/serial/hdf5.h ] || [ -e /usr/include/hdf5.h ] || pkgs="$pkgs libhdf5-dev pkg-config"
if [ -n "$pkgs" ]; then
  SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
  $SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends $pkgs
fi
# Meta-World pins its own mujoco: a venv of its own.
if [ ! -x tools/.venv-mw/bin/python ]; then
  python3 -m venv tools/.venv-mw
fi
tools/.venv-mw/bin/python -m pip install -q --disable-pip-version-check -r tools/requirements-mw.txt
