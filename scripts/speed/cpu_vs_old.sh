#!/usr/bin/env bash
# This checkout against an older commit (default 647e500: four optimizers and four backward passes per training
# step, one transformer rollout per candidate), side by side on the same machine, THREADS threads:
#   1. training throughput, the quickstart recipe, STEPS steps each, old and new alternating REPS times (it/s read
#      from each run's metrics.jsonl: the training loop only); the new tree trains with NEW_FLAGS (default --fast,
#      fast.py's CPU paths, which were the default before they became opt-in; NEW_FLAGS= times the plain modules);
#   2. the planning benchmark of both trees (td and the transformer at batch 1 on the checkpoints just trained,
#      and the td-official and dd-reference rows at the official sizes with random weights).
# Run it on an otherwise idle machine.   Usage: bash scripts/speed/cpu_vs_old.sh [flags for the new training run]
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac
cd "$(dirname "$0")/../.."
OLD=${OLD:-647e500}; STEPS=${STEPS:-600}; REPS=${REPS:-3}; THREADS=${THREADS:-2}; TMP=${TMP:-/tmp/td_bench_cpu}
CPU=$(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -1); [ -n "$CPU" ] || CPU=$(uname -m)
echo "CPU: $CPU ($(nproc) cores available, $THREADS threads)"
rm -rf "$TMP"; mkdir -p "$TMP"; git worktree prune
git worktree add --detach "$TMP/old" "$OLD" > /dev/null
ARGS="--env halfcheetah-medium-sb3 --steps $STEPS --log-every $STEPS --eval-episodes 0 --threads $THREADS"
rate() { python3 -c "import json,sys; print(json.loads(open(sys.argv[1]).read().splitlines()[-1])['it_per_s'])" "$1"; }
for r in $(seq "$REPS"); do
  (cd "$TMP/old" && python3 train.py $ARGS --out "$TMP/old_$r" > /dev/null 2>&1)
  python3 train.py $ARGS --out "$TMP/new_$r" ${NEW_FLAGS---fast} "$@" > /dev/null 2>&1
  echo "[$CPU] rep $r: old $(rate "$TMP/old_$r/metrics.jsonl") it/s, new $(rate "$TMP/new_$r/metrics.jsonl") it/s"
done
B="--batches 1 --ks 5 --decisions ${DECISIONS:-10} --reference-decisions ${REF_DECISIONS:-3} --threads $THREADS"
OLD_BENCH=plan.py; [ -f "$TMP/old/bench.py" ] && OLD_BENCH=bench.py  # the benchmark moved to bench.py after 647e500
(cd "$TMP/old" && python3 $OLD_BENCH --checkpoint "$TMP/old_1/checkpoint.pt" --benchmark $B --json "$TMP/old_bench.json" > /dev/null 2>&1)
python3 bench.py --checkpoint "$TMP/new_1/checkpoint.pt" --benchmark $B --json "$TMP/new_bench.json" > /dev/null 2>&1
git worktree remove --force "$TMP/old"
python3 - "$TMP" "$REPS" "$CPU" <<'PY'
import json, statistics, sys
tmp, reps, cpu = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def rate(p): return json.loads(open(p).read().splitlines()[-1])["it_per_s"]
old = [rate(f"{tmp}/old_{r}/metrics.jsonl") for r in range(1, reps + 1)]
new = [rate(f"{tmp}/new_{r}/metrics.jsonl") for r in range(1, reps + 1)]
print(f"[{cpu}] training, median it/s: old {statistics.median(old):.1f}, new {statistics.median(new):.1f}, "
      f"new/old {statistics.median(new) / statistics.median(old):.2f}x")
rows = {n: json.load(open(f"{tmp}/{n}_bench.json"))["rows"] for n in ("old", "new")}
def pick(rows, planner, k, cand):
    return [r for r in rows if r["planner"] == planner and r["k"] == k and r["candidates"] == cand and r["batch"] == 1][-1]
print(f"[{cpu}] {'planning, ms per decision':38s} {'old':>9s} {'new':>9s} {'old/new':>8s}")
for label, planner, k, cand in (("td (k = 5), checkpoint above", "td", 5, 1), ("transformer, checkpoint above", "transformer", 0, 1),
                                ("td-official, 32 candidates", "td-official", 5, 32), ("td-official, 1 candidate", "td-official", 5, 1),
                                ("dd-reference", "dd-reference", 200, 1)):
    a, b = (pick(rows[n], planner, k, cand)["ms_per_decision"] for n in ("old", "new"))
    print(f"{label:38s} {a:9.2f} {b:9.2f} {a / b:7.2f}x")
PY
