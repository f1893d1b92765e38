#!/usr/bin/env bash
# The diffusion-optimizer results protocol on a 2-core CPU, as run for the README (every process single-threaded,
# at most two at a time). Defaults (k, w) are chosen on evaluation seeds 100+ and reported on seeds 1000+.
#   bash scripts/results_diffusion.sh train      # 3 seeds x both bundled halfcheetah datasets (+ the eps ablation)
#   bash scripts/results_diffusion.sh diagnose   # bench.py --diagnose on every seed-0 checkpoint
#   bash scripts/results_diffusion.sh sweep      # k x w on seed 0 of each dataset, episode seeds 100+
#   bash scripts/results_diffusion.sh evaluate   # transformer, td, diffusion from noise on seeds 1000+
# JSON results go to results/diffusion/, runs to runs/. Hopper: DATASETS=hopper-medium-sb3 (sweep with --ks 0,1,2,5,10
# --guidances 1.0,1.2,2.0; then the td row with --refine-steps 1, the k the sweep chose).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/diffusion}; EP=${EP:-20}; DEP=${DEP:-10}; SWEEP_EP=${SWEEP_EP:-5}
DATASETS=${DATASETS:-"halfcheetah-medium-replay-sb3 halfcheetah-medium-sb3"}
mkdir -p "$OUT" logs
T="python train.py --threads 1 --eval-episodes 0"
P="python plan.py --threads 1"
B="python bench.py --threads 1"  # the diagnostic and the sweep
case "${1:-}" in
train)
  for e in $DATASETS; do
    for s in 0 1 2; do echo "$T --env $e --seed $s --out runs/$e-s$s"; done
  done | xargs -P 2 -I{} sh -c '{} > logs/$(echo "{}" | tr -c "a-z0-9-" _ | tail -c 60).log 2>&1'
  $T --env halfcheetah-medium-replay-sb3 --seed 0 --prediction eps --out runs/halfcheetah-medium-replay-sb3-eps-s0 ;;
diagnose)
  for e in $DATASETS; do
    $B --checkpoint runs/$e-s0/checkpoint.pt --diagnose docs/diagnose_$e.png --ks 1,2,5,10,20,40
  done
  $B --checkpoint runs/halfcheetah-medium-replay-sb3-eps-s0/checkpoint.pt --diagnose $OUT/diagnose_eps.png --ks 1,2,5,10,20,40 ;;
sweep)
  for e in $DATASETS; do
    echo "$B --checkpoint runs/$e-s0/checkpoint.pt --sweep-k --ks 1,2,5,10,20,40 --guidances 1.0,1.2,1.5,2.0,3.0 \
      --no-endpoints --episodes $SWEEP_EP --batch-envs $SWEEP_EP --seed 100 --json $OUT/sweep_$e.json --plot docs/sweep_$e.png"
  done | xargs -P 2 -I{} sh -c '{}' ;;
evaluate)
  for e in $DATASETS; do
    for s in 0 1 2; do
      c=runs/$e-s$s/checkpoint.pt
      echo "$P --checkpoint $c --planner transformer --episodes $EP --batch-envs $EP --seed 1000 --json $OUT/${e}_s${s}_transformer.json"
      echo "$P --checkpoint $c --planner td --episodes $EP --batch-envs $EP --seed 1000 --json $OUT/${e}_s${s}_td.json"
      echo "$P --checkpoint $c --planner diffusion --episodes $DEP --batch-envs $DEP --seed 1000 --json $OUT/${e}_s${s}_diffusion.json"
    done
  done | xargs -P 2 -I{} sh -c '{} > /dev/null' ;;
*) echo "usage: $0 train|diagnose|sweep|evaluate"; exit 2 ;;
esac
