#!/usr/bin/env bash
# The test command (README, and .ci/run): sets up what the tests need, checks formatting and
# lints, then runs every test of the workspace, then the Python tests (binding, short
# closed-loop evaluations) in tools/tests.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
# Compiles keep SIS scores in a cache (crates/driver/src/cache.rs): the tests use their own, empty
# at the start, so that no result depends on an earlier run and nothing lands in ~/.cache.
SQIL_CACHE_DIR=$(mktemp -d)
export SQIL_CACHE_DIR
trap 'rm -rf "$SQIL_CACHE_DIR"' EXIT
bash tools/setup-ci.sh
cargo fmt --all -- --check
# Lints for every crate but the test-only conformance crate: linting it type-checks tract-onnx a
# second time (its tests build it anyway), about 5 minutes on 2 cores. Developers lint it with
# `cargo clippy --workspace --all-targets` before committing.
cargo clippy --workspace --exclude sqil-conformance --all-targets --locked -- -D warnings
# setup-ci.sh installed the cross compilers, QEMU, ffmpeg and the NVRTC wheel: their tests must run, not
# skip (NVRTC compiles every CUDA kernel with no GPU; GPU tests skip with a reason).
NVRTC_LIB=$(echo "$PWD"/.venv-ci/lib/python3*/site-packages/nvidia/cu13/lib)
SQIL_REQUIRE_CROSS=1 SQIL_REQUIRE_NVRTC=1 SQIL_REQUIRE_FFMPEG=1 LD_LIBRARY_PATH="$NVRTC_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" cargo test --workspace --locked --features sqil/hdf5,sqil/parquet
# A user's crate outside the workspace whose build.rs compiles a policy with sqil (the library
# API) and links the generated C; its test checks the C against the runtime bit for bit. A target
# folder of its own: its profile differs (sqil crates are not members there), and sharing one
# folder between the two would rebuild the same files back and forth.
(cd examples/build-script && cargo fmt -- --check && CARGO_TARGET_DIR=../../target/example-build-script cargo test --locked -q)
# The README's main command, in the dev profile `cargo test` just built (it broke once when a
# second binary joined the package: `default-run` keeps `cargo run -p sqil` unambiguous).
# Output to a file, then checked: `| grep -q` closed the pipe as soon as it matched, and the lines
# sqil still printed failed (exit 101, seen once under load before SIGPIPE got its default action).
cargo run --locked -q -p sqil -- compile testdata/policies/hopper_mlp.onnx --demos testdata/demos/hopper.npz -o out/hopper \
    > target/readme-compile.out 2> target/readme-compile.err || { tail -30 target/readme-compile.err; exit 1; }
grep -q "^fidelity" target/readme-compile.out
# Fuzzing smoke run: every reader target for a few seconds in child processes (aborts and hangs
# caught, not only panics); the long runs are documented in docs/fuzzing.md.
cargo run --locked -q -p sqil-fuzz -- all --seconds 4 --out target/fuzz-ci
# The Python tests drive target/debug/sqil (SQIL_BIN), which `cargo test` built for the CLI's tests.
test -x target/debug/sqil
bash tools/build_binding.sh
.venv-ci/bin/python -m pytest -q -rs -p no:cacheprovider tools/tests
tools/.venv-mw/bin/python -m pytest -q -rs -p no:cacheprovider tools/tests -k '(pickplace or pixel) and not qdq'
echo "tools/test.sh: all checks passed in $((SECONDS - start)) s"
