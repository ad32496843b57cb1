#!/usr/bin/env bash
# GPU policies against the CPU runtime, on the GPU machine: every testdata policy (and the 4x1024
# MLP) as a W4A8 artifact (default raw input: the first layer in float) and a W4A16 artifact, run
# by `sqil-cuda-bench policy` (max |GPU - CPU runtime| relative to the largest |action|, graph and
# eager replay time per action), one JSON line each.
#
#   here:  bash tools/gpu_policies.sh prepare .gpu/art          # artifacts + states (needs sqil)
#   GPU:   bash tools/gpu_policies.sh run .gpu/art BENCH_BIN > out.jsonl
set -euo pipefail
cd "$(dirname "$0")/.."
mode=$1 dir=$2
P=testdata/policies
POLICIES="bc_hopper bc_lander bc_pickplace hopper_mlp mlp halfcheetah_mlp walker2d_mlp humanoid_mlp cnn bc_pickplace_pixels transformer transformer_dynamo bc_pickplace_transformer mlp4x1024"
inputs() {
    if [ "$1" = mlp4x1024 ]; then echo "$dir/mlp4x1024.input0.npy"; return; fi
    ls $P/$1.input*.npy
}
model() {
    if [ "$1" = mlp4x1024 ]; then echo "$dir/mlp4x1024.onnx"; else echo "$P/$1.onnx"; fi
}
if [ "$mode" = prepare ]; then
    SQIL=${SQIL_BIN:-target/release/sqil}
    mkdir -p "$dir"
    ${PYTHON:-tools/.venv-dev/bin/python} - "$dir" <<'PY'
import sys, numpy as np, onnx
sys.path.insert(0, "tools")
from sqil_tools.zoo import mlp_4x1024
mlp_4x1024(f"{sys.argv[1]}/mlp4x1024.onnx")
np.save(f"{sys.argv[1]}/mlp4x1024.input0.npy", np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32))
PY
    for p in $POLICIES; do
        calib=$(inputs $p | sed 's/^/--calib /' | tr '\n' ' ')
        $SQIL quantize "$(model $p)" $calib --wbits 4 --abits 8 --group 32 -o "$dir/$p.w4a8.onnx" --artifact "$dir/$p.w4a8.bin" > /dev/null
        case $p in cnn|bc_pickplace_pixels) continue ;; esac
        $SQIL quantize "$(model $p)" $calib --wbits 4 --abits float --group 32 -o "$dir/$p.w4a16.onnx" --artifact "$dir/$p.w4a16.bin" > /dev/null
    done
    rm -f "$dir"/*.onnx.tmp "$dir"/*.w4a*.onnx "$dir"/mlp4x1024.onnx
    ls "$dir"
    exit 0
fi
BENCH=$3
for p in $POLICIES; do
    for cfg in w4a8 w4a16; do
        [ -f "$dir/$p.$cfg.bin" ] || continue
        $BENCH policy "$dir/$p.$cfg.bin" $(inputs $p) || echo "{\"policy\": \"$p.$cfg\", \"error\": true}"
    done
done
