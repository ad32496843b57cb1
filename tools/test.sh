#!/usr/bin/env bash
# The test command (README, and .ci/run): sets up what the tests need, checks formatting and
# lints, then runs every test of the workspace, then the Python tests (binding, short
# closed-loop evaluations) in tools/tests.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
bash tools/setup-ci.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
cargo build -p sqil --locked  # the CLI the Python tests drive (SQIL_BIN)
bash tools/build_binding.sh
.venv-ci/bin/python -m pytest -q -rs -p no:cacheprovider tools/tests
tools/.venv-mw/bin/python -m pytest -q -rs -p no:cacheprovider tools/tests -k '(pickplace or pixel) and not qdq'
echo "tools/test.sh: all checks passed in $((SECONDS - start)) s"
