#!/usr/bin/env bash
# A policy's persistent GPU program as SASS, on a machine without a GPU: the program's CUDA
# source (the `steps` example, --program), compiled by NVRTC as the runtime compiles it
# (compute_90, --fmad=false), then ptxas (sm_90) and cuobjdump from NVIDIA's PyPI wheels, in a
# venv under tools/. Shows where a step waits (loads behind a call, L1 invalidated by a barrier,
# registers); the tenth session found its three causes of latency this way before spending
# device time.
#
#   bash tools/sass.sh ARTIFACT.bin [OUT_DIR]   # OUT_DIR/program.{cu,ptx,cubin,sass}, registers on stdout
set -euo pipefail
cd "$(dirname "$0")/.."
art=${1:?usage: bash tools/sass.sh ARTIFACT.bin [OUT_DIR]}
out=${2:-target/sass/$(basename "$art" .bin)}
[ -f "$art" ] || { echo "sass.sh: $art: no such artifact" >&2; exit 2; }
venv=tools/.venv-sass
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q "nvidia-cuda-nvrtc==13.0.*" "nvidia-cuda-nvcc==13.0.*" nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm
fi
cu13=$(echo "$PWD"/$venv/lib/python3*/site-packages/nvidia/cu13)
mkdir -p "$out"
cargo run --release -q -p sqil-cuda --example steps -- --program "$art" | tail -n +2 > "$out/program.cu"
LD_LIBRARY_PATH="$cu13/lib" "$venv/bin/python" - "$out/program.cu" "$out/program.ptx" "$cu13/lib" <<'PY'
import ctypes, glob, sys
src, dst, lib = sys.argv[1:4]
n = ctypes.CDLL(sorted(glob.glob(f"{lib}/libnvrtc.so*"))[0])
prog = ctypes.c_void_p()
if n.nvrtcCreateProgram(ctypes.byref(prog), open(src, "rb").read(), b"program.cu", 0, None, None):
    sys.exit("sass.sh: nvrtcCreateProgram failed")
opts = [b"-std=c++17", b"-lineinfo", b"--fmad=false", b"-arch=compute_90"]
rc = n.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
size = ctypes.c_size_t()
n.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
log = ctypes.create_string_buffer(size.value)
n.nvrtcGetProgramLog(prog, log)
if rc:
    sys.exit(f"sass.sh: NVRTC: {log.value.decode(errors='replace')}")
n.nvrtcGetPTXSize(prog, ctypes.byref(size))
ptx = ctypes.create_string_buffer(size.value)
n.nvrtcGetPTX(prog, ptx)
open(dst, "wb").write(ptx.value)
PY
PATH="$cu13/bin:$PATH" ptxas -arch=sm_90 -v -o "$out/program.cubin" "$out/program.ptx" 2>&1 | grep -E "registers|spill"
PATH="$cu13/bin:$PATH" cuobjdump -sass "$out/program.cubin" > "$out/program.sass"
echo "$out/program.sass: $(grep -cE '^\s+/\*[0-9a-f]+\*/' "$out/program.sass") instructions"
