#!/usr/bin/env bash
# Builds sqil's Python package (crates/python: the extension module plus python/sqil) into
# tools/.binding/sqil/ for the repository's own tools; put tools/.binding on PYTHONPATH (tools/eval.py
# does) and `import sqil`. Users install it with `pip install ./crates/python` instead.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${1:-dev}
cargo build -p sqil-python --profile "$profile" --locked
dir=$([ "$profile" = dev ] && echo debug || echo "$profile")
rm -rf tools/.binding/sqil.tmp
mkdir -p tools/.binding/sqil.tmp
cp crates/python/python/sqil/*.py crates/python/python/sqil/*.pyi crates/python/python/sqil/py.typed tools/.binding/sqil.tmp/
cp "target/$dir/lib_sqil.so" tools/.binding/sqil.tmp/_sqil.so
rm -rf tools/.binding/sqil tools/.binding/sqil.so
mv tools/.binding/sqil.tmp tools/.binding/sqil
echo "built tools/.binding/sqil/ ($profile)"
