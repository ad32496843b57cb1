#!/usr/bin/env bash
# Builds sqil's Python binding (crates/python) into tools/.binding/sqil.so; put tools/.binding on
# PYTHONPATH (tools/eval.py does) and `import sqil`.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${1:-dev}
cargo build -p sqil-python --profile "$profile" --locked
dir=$([ "$profile" = dev ] && echo debug || echo "$profile")
mkdir -p tools/.binding
cp "target/$dir/libsqil.so" tools/.binding/sqil.so.tmp
mv tools/.binding/sqil.so.tmp tools/.binding/sqil.so
echo "built tools/.binding/sqil.so ($profile)"
