#!/usr/bin/env bash
# The SQIL rows of the pickplace transformer and the pickplace-pixels CNN (docs/sqil.md), on the GPU
# machine: pixel demonstrations recorded there (EGL), `sqil compile --device cuda` through
# tools/qrd_table.py, closed-loop evaluation on its CPUs. Carry .gpu/sqil (a release build from
# here), .whl (metaworld 3.1.1 and its pure-Python needs, mujoco 3.3.0), .gl (EGL loaders, see the
# device notes) and demos/pickplace.npz.
#
#   GPU:  bash tools/gpu_sqil_rows.sh OUT STAGE...   STAGE: transformer | pixels-default | pixels | eval-pixels
set -euo pipefail
cd "$(dirname "$0")/.."
out=$1; shift
for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site MUJOCO_GL=egl PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
export SQIL_BIN=$PWD/.gpu/sqil SQIL_DEMOS_DIR=/tmp/demos SQIL_QRD_OUT=$out/qrd SQIL_COMPILE_FLAGS="--device cuda"
mkdir -p /tmp/demos "$out/qrd"
cp demos/pickplace.npz /tmp/demos/
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
nproc >> "$out/gpu.txt"
pixels_demos() {
    [ -f /tmp/demos/pickplace-pixels.npz ] || python3 tools/record_demos.py --task pickplace-pixels --episodes 100 \
        --seed 1000 --jobs 16 -o /tmp/demos/pickplace-pixels.npz 2>&1 | grep -v -i warn | tee "$out/demos-pixels.log"
}
# Stages stop at SQIL_STAGE_SECONDS (default 540) so that the results are packed inside the call.
stages() {
for stage in "$@"; do
    case $stage in
        transformer) python3 tools/qrd_table.py compile --tasks pickplace --policies bc_pickplace_transformer ;;
        pixels-default)
            pixels_demos
            python3 tools/qrd_table.py compile --tasks pickplace-pixels --configs W4A8 --variants default ;;
        pixels) pixels_demos; python3 tools/qrd_table.py compile --tasks pickplace-pixels ;;
        eval-pixels)
            # Each model's 100 episodes over 8 processes (seeds in blocks of 13 / 12), two models at a time.
            python3 tools/qrd_table.py eval --tasks pickplace-pixels --jobs 2 --episode-jobs 8 --python python3 ;;
        *) echo "unknown stage $stage"; exit 2 ;;
    esac
done
}
timeout "${SQIL_STAGE_SECONDS:-540}" bash -c "$(declare -f stages pixels_demos); out=$out; stages $*" || echo "stages stopped: $?"
# What comes back (one file: the device returns few files): reports, evaluations, QDQ models,
# artifacts; not the checkpoints or IR text.
(cd "$out" && tar czf qrd.tgz --exclude checkpoint.json --exclude '*.sqil' qrd && rm -rf qrd)
