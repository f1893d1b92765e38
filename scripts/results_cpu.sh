#!/usr/bin/env bash
# The results protocol on CPU, as run for the README (2 cores, every process single-threaded):
# seed 0 is the quickstart run itself (python train.py --env halfcheetah-medium-sb3); seeds 1 and 2 use the
# same recipe (plus the critic, for the candidate ablation); one no-mask run; the recipe on a mixed file.
# Phase 1 trains and evaluates seed 0; phase 2 evaluates the rest. JSON results go to results/.
set -uo pipefail
S0=${S0:-runs/halfcheetah-medium-sb3-s0}; R=${R:-runs/res}; OUT=${OUT:-results}; EP=${EP:-20}; DEP=${DEP:-10}
MIXED=${MIXED:-datasets/halfcheetah-mixed-bc.hdf5}
mkdir -p "$R" "$OUT"
T="python train.py --env halfcheetah-medium-sb3 --threads 1 --eval-episodes 0"
P="python plan.py --threads 1"
[ -f "$MIXED" ] || python scripts/make_mixed_dataset.py --out "$MIXED" > "$OUT/mixed_dataset.log" 2>&1
phase1() {
  $T --seed 1 --use-critic --eval-every 2500 --eval-episodes 5 --out $R/s1 > $R/s1.log 2>&1 &   # with the training curve
  $T --seed 2 --use-critic --out $R/s2 > $R/s2.log 2>&1 &
  $T --seed 0 --no-causal --out $R/nocausal > $R/nocausal.log 2>&1 &
  $T --seed 0 --dataset "$MIXED" --out $R/mixed > $R/mixed.log 2>&1 &
  $P --checkpoint $S0/checkpoint.pt --planner transformer --episodes $EP --json $OUT/s0_transformer.json > /dev/null 2>&1 &
  $P --checkpoint $S0/checkpoint.pt --planner diffusion --episodes $DEP --json $OUT/s0_diffusion.json > /dev/null 2>&1 &
  $P --checkpoint $S0/checkpoint.pt --no-refine-noise --episodes $EP --json $OUT/abl_no_noise.json > /dev/null 2>&1 &
  for k in 1 2 5 10 20; do
    $P --checkpoint $S0/checkpoint.pt --refine-steps $k --episodes $EP --json $OUT/s0_td_k$k.json > /dev/null 2>&1 &
  done
  wait
}
phase2() {
  for s in 1 2; do
    $P --checkpoint $R/s$s/checkpoint.pt --planner transformer --episodes $EP --json $OUT/s${s}_transformer.json > /dev/null 2>&1 &
    $P --checkpoint $R/s$s/checkpoint.pt --episodes $EP --json $OUT/s${s}_td_k5.json > /dev/null 2>&1 &
    $P --checkpoint $R/s$s/checkpoint.pt --planner diffusion --episodes $DEP --json $OUT/s${s}_diffusion.json > /dev/null 2>&1 &
  done
  $P --checkpoint $R/s1/checkpoint.pt --n-candidates 32 --episodes $EP --json $OUT/abl_candidates32_s1.json > /dev/null 2>&1 &
  $P --checkpoint $R/nocausal/checkpoint.pt --episodes $EP --json $OUT/abl_no_causal_td.json > /dev/null 2>&1 &
  $P --checkpoint $R/nocausal/checkpoint.pt --planner transformer --episodes $EP --json $OUT/abl_no_causal_transformer.json > /dev/null 2>&1 &
  $P --checkpoint $R/mixed/checkpoint.pt --episodes $EP --json $OUT/mixed_td.json > /dev/null 2>&1 &
  $P --checkpoint $R/mixed/checkpoint.pt --planner transformer --episodes $EP --json $OUT/mixed_transformer.json > /dev/null 2>&1 &
  wait
}
${1:-phase1}; [ "${1:-}" = "" ] && phase2
