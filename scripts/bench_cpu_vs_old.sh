#!/usr/bin/env bash
# CPU training throughput of this checkout against an older commit (default 647e500, four optimizers and four
# backward passes per step), side by side on the same machine: the quickstart recipe, STEPS steps each,
# alternating old and new REPS times; it/s is read from each run's metrics.jsonl (the training loop only).
# Run it on an otherwise idle machine.   Usage: bash scripts/bench_train_cpu.sh [--amp]   (flags go to the new run)
set -euo pipefail
cd "$(dirname "$0")/.."
OLD=${OLD:-647e500}; STEPS=${STEPS:-600}; REPS=${REPS:-3}; THREADS=${THREADS:-2}; TMP=${TMP:-/tmp/td_bench_train}
rm -rf "$TMP"; mkdir -p "$TMP"
git worktree remove --force "$TMP/old" 2>/dev/null || true
git worktree add --detach "$TMP/old" "$OLD" >/dev/null
ARGS="--env halfcheetah-medium-sb3 --steps $STEPS --log-every $STEPS --eval-episodes 0 --threads $THREADS"
rate() { python3 -c "import json,sys; print(json.loads(open(sys.argv[1]).read().splitlines()[-1])['it_per_s'])" "$1"; }
for r in $(seq "$REPS"); do
  (cd "$TMP/old" && python3 train.py $ARGS --out "$TMP/old_$r" > /dev/null 2>&1)
  python3 train.py $ARGS --out "$TMP/new_$r" "$@" > /dev/null 2>&1
  echo "rep $r: old $(rate "$TMP/old_$r/metrics.jsonl") it/s, new $(rate "$TMP/new_$r/metrics.jsonl") it/s"
done
python3 - "$TMP" "$REPS" <<'PY'
import json, statistics, sys
tmp, reps = sys.argv[1], int(sys.argv[2])
def rate(p): return json.loads(open(p).read().splitlines()[-1])["it_per_s"]
old = [rate(f"{tmp}/old_{r}/metrics.jsonl") for r in range(1, reps + 1)]
new = [rate(f"{tmp}/new_{r}/metrics.jsonl") for r in range(1, reps + 1)]
print(f"median it/s: old {statistics.median(old):.1f}, new {statistics.median(new):.1f}, "
      f"new/old {statistics.median(new) / statistics.median(old):.2f}x")
PY
git worktree remove --force "$TMP/old"
