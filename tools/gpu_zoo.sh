#!/usr/bin/env bash
# The benchmark zoo (tools/sqil_tools/zoo.py) on the GPU: each model quantized W4A8 (RTN; GPTQ for
# the 4x1024 MLP; default raw input, group 32) and run by `sqil-cuda-bench policy` (max |GPU - CPU
# runtime| relative to the largest |action|, per-action time on each path), then the PyTorch peer
# on the same ONNX graph (`tools/bench_cuda_torch.py --policy`: f32 and f16, eager and CUDA graph,
# checked against onnxruntime), one JSON line each. The ONNX graphs are rebuilt on the GPU machine
# from the same seeds (the artifacts alone travel).
#
#   here:  bash tools/gpu_zoo.sh prepare .gpu/zoo                 # artifacts + states (needs sqil)
#   GPU:   bash tools/gpu_zoo.sh run .gpu/zoo BENCH_BIN [--profile] [--iters N] > out.jsonl
#          (MODELS="a b" for some, any builder of tools/sqil_tools/zoo.py: the MLPs td3_mlp sac_mlp
#          wide_mlp short_obs_mlp humanoid_td3_mlp too; SQIL=0 or TORCH=0 to leave out one side)
set -euo pipefail
cd "$(dirname "$0")/.."
mode=$1 dir=$2
MODELS=${MODELS:-"mlp_4x1024 prelu_cnn resnet18 mobilenet_v2 mobilenet_v3 efficientnet_b0 act_decoder diffusion_unet1d"}
TORCH=${TORCH:-1} SQIL=${SQIL:-1}
PY=${PYTHON:-python3}
onnx_and_states() {
    mkdir -p "$dir"
    $PY - "$dir" $MODELS <<'PY'
import sys, numpy as np
sys.path.insert(0, "tools")
from sqil_tools import zoo
d = sys.argv[1]
for name in sys.argv[2:]:
    shapes = getattr(zoo, name)(f"{d}/{name}.onnx")
    rng = np.random.default_rng(0)
    for i, s in enumerate(shapes):
        np.save(f"{d}/{name}.input{i}.npy", rng.standard_normal([8] + s[1:]).astype(np.float32))
PY
}
if [ "$mode" = prepare ]; then
    SQIL=${SQIL_BIN:-target/release/sqil}
    onnx_and_states
    for m in $MODELS; do
        recipe=rtn; [ $m = mlp_4x1024 ] && recipe=gptq
        calib=$(ls "$dir/$m".input*.npy | sed 's/^/--calib /' | tr '\n' ' ')
        $SQIL quantize "$dir/$m.onnx" --recipe $recipe --wbits 4 --abits 8 --group 32 $calib \
            -o "$dir/q.onnx" --artifact "$dir/$m.w4a8.bin" > /dev/null
    done
    rm -f "$dir"/*.onnx "$dir"/*.onnx.tmp
    ls "$dir"
    exit 0
fi
BENCH=$3
shift 3
onnx_and_states
for m in $MODELS; do
    [ "$SQIL" = 1 ] || continue
    $BENCH policy "$dir/$m.w4a8.bin" $(ls "$dir/$m".input*.npy) "$@" || echo "{\"policy\": \"$m.w4a8\", \"error\": true}"
done
for m in $MODELS; do
    [ "$TORCH" = 1 ] || continue
    $PY tools/bench_cuda_torch.py --policy "$dir/$m.onnx" || echo "{\"policy\": \"$m\", \"engine\": \"torch\", \"error\": true}"
done
