#!/usr/bin/env bash
# The plain modules against fast.py's (--fast), side by side on this machine, in one run:
#   1. the quickstart, `python train.py --env halfcheetah-medium-sb3` (train 10k steps, then plan 10 episodes),
#      plain then --fast: wall time, the training rate (it/s from metrics.jsonl) and the score;
#   2. the planning benchmark's td-official rows (official sizes, random weights), plain and fast, in one process.
# Writes results/speed/fast_vs_plain_<cpu>.json and prints the ratios. Run it on an otherwise idle machine:
# about 15 minutes on 2 cores.   Usage: bash scripts/speed/fast_vs_plain.sh [extra train.py flags]
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac
cd "$(dirname "$0")/../.."
TMP=${TMP:-/tmp/td_fast_vs_plain}; THREADS=${THREADS:-2}
CPU=$(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -1); [ -n "$CPU" ] || CPU=$(uname -m)
CPU="$CPU (family $(lscpu | sed -n 's/^CPU family:[[:space:]]*//p' | head -1), model $(lscpu | sed -n 's/^Model:[[:space:]]*//p' | head -1))"
TAG=$(echo "$CPU" | awk '{print tolower($1)}')
OUT=${OUT:-results/speed/fast_vs_plain_${TAG}.json}
echo "CPU: $CPU ($(nproc) cores available, $THREADS threads); load before: $(cut -d' ' -f1-3 /proc/loadavg)"
rm -rf "$TMP"; mkdir -p "$TMP"
for arm in plain fast; do
  flag=""; [ "$arm" = fast ] && flag="--fast"
  t0=$(date +%s.%N)
  python3 train.py --env halfcheetah-medium-sb3 --threads "$THREADS" --out "$TMP/$arm" $flag "$@" > "$TMP/$arm.log" 2>&1
  t1=$(date +%s.%N)
  echo "$t0 $t1" > "$TMP/$arm.time"
  echo "[$CPU] quickstart $arm: $(python3 -c "print(f'{$t1 - $t0:.0f} s')")"
done
python3 bench.py --checkpoint "$TMP/plain/checkpoint.pt" --benchmark --reference-only --threads "$THREADS" \
  --reference-decisions "${REF_DECISIONS:-5}" --json "$TMP/bench.json" > "$TMP/bench.log" 2>&1
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "$TMP" "$CPU" "$THREADS" "$OUT" <<'PY'
import json, statistics, sys
tmp, cpu, threads, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
res = {"cpu": cpu, "threads": threads, "command": "python train.py --env halfcheetah-medium-sb3 [--fast]"}
for arm in ("plain", "fast"):
    t0, t1 = map(float, open(f"{tmp}/{arm}.time").read().split())
    rows = [json.loads(line) for line in open(f"{tmp}/{arm}/metrics.jsonl")]
    rates = [r["it_per_s"] for r in rows if "it_per_s" in r]
    ev = [r["eval"] for r in rows if "eval" in r][-1]
    res[arm] = {"wall_s": t1 - t0, "train_it_per_s_median": statistics.median(rates),
                "score": ev["normalized_score_mean"], "score_std": ev["normalized_score_std"], "episodes": ev["episodes"],
                "eval_ms_per_call": ev["ms_per_call"]}
bench = json.load(open(f"{tmp}/bench.json"))["rows"]
ms = {r["planner"]: r["ms_per_decision"] for r in bench if r["candidates"] == 32}
res["td_official_32_ms"] = {"plain": ms["td-official-plain"], "fast": ms["td-official"]}
p, f = res["plain"], res["fast"]
print(f"[{cpu}, {threads} threads]            plain      fast   plain/fast")
print(f"quickstart wall time (s)   {p['wall_s']:9.0f} {f['wall_s']:9.0f} {p['wall_s'] / f['wall_s']:9.2f}x")
print(f"training it/s (median)     {p['train_it_per_s_median']:9.1f} {f['train_it_per_s_median']:9.1f} "
      f"{f['train_it_per_s_median'] / p['train_it_per_s_median']:9.2f}x")
print(f"td-official ms/decision    {ms['td-official-plain']:9.1f} {ms['td-official']:9.1f} "
      f"{ms['td-official-plain'] / ms['td-official']:9.2f}x")
print(f"quickstart score (seeds 100-109, 1 training seed): plain {p['score']:.1f}, fast {f['score']:.1f}")
json.dump(res, open(out, "w"), indent=2)
print(f"wrote {out}")
PY
