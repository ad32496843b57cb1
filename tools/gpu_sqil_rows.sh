#!/usr/bin/env bash
# The SQIL rows of the pickplace transformer and the pickplace-pixels CNN (docs/sqil.md), on the GPU
# machine: pixel demonstrations recorded there (EGL), `sqil compile --device cuda` through
# tools/qrd_table.py, closed-loop evaluation on its CPUs. Carry .gpu/sqil (a release build from
# here), .whl (metaworld 3.1.1 and its pure-Python needs, mujoco 3.3.0), .gl (EGL loaders, see the
# device notes) and demos/pickplace.npz.
#
#   GPU:  bash tools/gpu_sqil_rows.sh OUT STAGE...
#   STAGE: gpu-tests | transformer | pixels-default | pixels | eval-pixels
# Results of an earlier call carried back as demos/qrd-gpu (the unpacked qrd/ folder) continue:
# finished compiles are kept, unfinished ones resume from their checkpoints.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$1; shift
for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site MUJOCO_GL=egl PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
export SQIL_BIN=$PWD/.gpu/sqil SQIL_DEMOS_DIR=/tmp/demos SQIL_QRD_OUT=$out/qrd SQIL_COMPILE_FLAGS="--device cuda"
# One SIS cache for every compile of a policy (the same float policy and states).
export SQIL_CACHE_DIR=/tmp/sqil-cache
mkdir -p /tmp/demos "$out/qrd"
if [ -d demos/qrd-gpu ]; then cp -r demos/qrd-gpu/. "$out/qrd/"; fi
if [ -f demos/pickplace.npz ]; then cp demos/pickplace.npz /tmp/demos/; fi
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
        gpu-tests)
            # The GPU trainer's test binary (cargo test --release -p sqil-driver --test gpu_train
            # --no-run, carried as .gpu/gpu_train): a missing GPU is a failure here.
            SQIL_REQUIRE_GPU=1 .gpu/gpu_train --test-threads 1 2>&1 | tail -40 | tee "$out/gpu-tests.log" ;;
        transformer) python3 tools/qrd_table.py compile --tasks pickplace --policies bc_pickplace_transformer ;;
        pixels-default)
            pixels_demos
            python3 tools/qrd_table.py compile --tasks pickplace-pixels --configs W4A8 --variants default ;;
        pixels)
            # Three compiles at a time after the first (which fills the SIS cache); the widths
            # whose rows are missing first.
            pixels_demos
            python3 tools/qrd_table.py compile --tasks pickplace-pixels --configs W3A8 W4A4 W4A8 --jobs "${SQIL_COMPILE_JOBS:-3}" ;;
        eval-pixels)
            # Each model's 100 episodes over 8 processes (seeds in blocks of 13 / 12), two models at a time.
            python3 tools/qrd_table.py eval --tasks pickplace-pixels --jobs 2 --episode-jobs 8 --python python3 ;;
        *) echo "unknown stage $stage"; exit 2 ;;
    esac
done
}
timeout "${SQIL_STAGE_SECONDS:-520}" bash -c "$(declare -f stages pixels_demos); out=$out; stages $*" || echo "stages stopped: $?"
# What comes back (one file: the device returns few files): reports, logs, evaluations, QDQ
# models, artifacts, and the checkpoints of unfinished compiles; not the IR text.
for d in "$out"/qrd/*/; do if [ -f "$d/report.json" ]; then rm -f "$d/checkpoint.json"; fi; done
(cd "$out" && tar czf qrd.tgz --exclude '*.sqil' qrd && rm -rf qrd)
