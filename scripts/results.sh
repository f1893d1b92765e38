#!/usr/bin/env bash
# The README's results protocol on the bundled halfcheetah-medium-sb3 data, all in one go:
#   3 seeds (the quickstart recipe, longer, with the critic trained for the candidate ablation),
#   one seed with the official no-mask transformer, and the quickstart recipe on a mixed-quality file;
#   then transformer / td / diffusion evaluations, the ablations and the k sweep.
# Usage: DEVICE=cuda STEPS=20000 OUT=results bash scripts/results.sh     (GPU: trains with --cuda-graph)
set -uo pipefail
DEVICE=${DEVICE:-cuda}; STEPS=${STEPS:-20000}; EP=${EP:-20}; DEP=${DEP:-10}; OUT=${OUT:-results}
R=${R:-runs/results}; MIXED=${MIXED:-datasets/halfcheetah-mixed-bc.hdf5}
mkdir -p "$OUT" "$R"
GRAPH=""; [ "$DEVICE" = cuda ] && GRAPH="--cuda-graph"
T="python3 train.py --env halfcheetah-medium-sb3 --device $DEVICE --threads 1 $GRAPH"
P="python3 bench.py --device $DEVICE --threads 1 $GRAPH"  # bench.py evaluates like plan.py, with --cuda-graph
[ -f "$MIXED" ] || python3 scripts/make_mixed_dataset.py --out "$MIXED" > "$OUT/mixed_dataset.log" 2>&1 &
for s in 0 1 2; do
  extra=""; [ $s = 0 ] && extra="--eval-every $((STEPS / 4))"
  $T --seed $s --steps $STEPS --lr-decay-steps $STEPS --use-critic --eval-episodes ${EVAL_EP:-10} $extra --out $R/s$s > $R/s$s.log 2>&1 &
done
$T --seed 0 --steps $STEPS --lr-decay-steps $STEPS --no-causal --eval-episodes 0 --out $R/nocausal > $R/nocausal.log 2>&1 &
wait
$T --seed 0 --dataset "$MIXED" --eval-episodes 0 ${MIXED_STEPS:+--steps $MIXED_STEPS} --out $R/mixed > $R/mixed.log 2>&1 &   # the quickstart recipe, unchanged
for s in 0 1 2; do
  $P --checkpoint $R/s$s/checkpoint.pt --planner transformer --episodes $EP --json "$OUT/s${s}_transformer.json" > /dev/null 2>&1 &
  $P --checkpoint $R/s$s/checkpoint.pt --planner td --episodes $EP --json "$OUT/s${s}_td.json" > /dev/null 2>&1 &
  $P --checkpoint $R/s$s/checkpoint.pt --planner diffusion --episodes $DEP --json "$OUT/s${s}_diffusion.json" > /dev/null 2>&1 &
done
$P --checkpoint $R/s0/checkpoint.pt --no-refine-noise --episodes $EP --json "$OUT/abl_no_noise.json" > /dev/null 2>&1 &
$P --checkpoint $R/s0/checkpoint.pt --n-candidates 32 --episodes $EP --json "$OUT/abl_candidates32.json" > /dev/null 2>&1 &
$P --checkpoint $R/nocausal/checkpoint.pt --episodes $EP --json "$OUT/abl_no_causal_td.json" > /dev/null 2>&1 &
$P --checkpoint $R/nocausal/checkpoint.pt --planner transformer --episodes $EP --json "$OUT/abl_no_causal_transformer.json" > /dev/null 2>&1 &
$P --checkpoint $R/s0/checkpoint.pt --sweep-k --ks 1,2,5,10,20 --episodes 10 --plot "$OUT/k_sweep.png" --json "$OUT/k_sweep.json" > "$OUT/k_sweep.log" 2>&1 &
wait
$P --checkpoint $R/mixed/checkpoint.pt --planner td --episodes $EP --json "$OUT/mixed_td.json" > /dev/null 2>&1 &
$P --checkpoint $R/mixed/checkpoint.pt --planner transformer --episodes $EP --json "$OUT/mixed_transformer.json" > /dev/null 2>&1 &
wait
cp $R/s0/curves.png "$OUT/curves_s0.png"; cp $R/s0/metrics.jsonl "$OUT/metrics_s0.jsonl"
python3 - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
for f in sorted(out.glob("*.json")):
    r = json.loads(f.read_text())
    if isinstance(r, dict) and "normalized_score_mean" in r:
        print(f"{f.stem:28s} {r['normalized_score_mean']:6.1f} ± {r['normalized_score_std']:4.1f}  ({r['episodes']} ep, "
              f"{r['ms_per_decision']:.2f} ms/decision)")
PY
