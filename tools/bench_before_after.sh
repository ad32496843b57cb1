#!/usr/bin/env bash
# CPU benchmark of two sqil binaries on the same artifacts, interleaved rounds (this VM's speed
# drifts; the binaries take turns going first): `sqil bench` batch 1 and 64, one thread, on each
# artifact in DIR; prints one line per round x binary x artifact with min / p50 us per batch.
# NEW_DIR (default DIR) holds the new binary's artifacts of the same models, for a change that
# changes what an artifact holds (each binary then runs the artifacts it wrote).
#   bash tools/bench_before_after.sh OLD_SQIL NEW_SQIL DIR [ROUNDS] [NEW_DIR]
set -euo pipefail
old=$1 new=$2 dir=$3 rounds=${4:-2} newdir=${5:-$3}
for r in $(seq "$rounds"); do
    for art in "$dir"/*.bin; do
        # Alternate which binary runs first (the second of a pair ran a few percent slower here).
        order="old new"; [ $((r % 2)) = 0 ] && order="new old"
        for tag in $order; do
            bin=$old a=$art; [ $tag = new ] && bin=$new a=$newdir/$(basename "$art")
            taskset -c 1 "$bin" bench "$a" --batch 1,64 --iters 400 2>/dev/null | tools/.venv-dev/bin/python -c "
import json, sys
parts = []
for l in sys.stdin:
    d = json.loads(l)
    if 'batch' in d:
        parts.append('batch %d: min %.2f p50 %.2f' % (d['batch'], d.get('min_us', float('nan')), d.get('p50_us', float('nan'))))
print('$r', '$tag', '$(basename "$art")', '; '.join(parts))"
        done
    done
done
