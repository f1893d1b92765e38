#!/usr/bin/env bash
# The ladder: from the published method (--method official) to ours, one change per rung, each trained with
# --preset cpu on the same data and scored on episode seeds 1000+ (2-core CPU: single-threaded jobs, two at a time).
#   bash scripts/reproduce/ladder.sh train [RUNGS]     # default RUNGS="0 1 2 4 5 6" (rung 3 plans with rung 2's
#                                                      # checkpoints)
#   bash scripts/reproduce/ladder.sh evaluate [RUNGS]  # transformer alone and td (20 episodes), diffusion from
#                                                      # noise (10)
#   PLANNERS="transformer td" SEEDS="1 2" ...          # score only these planners, train or score only these seeds
# Then python scripts/reproduce/plot_ladder.py: the tables (into README.md and docs/results.md), docs/ladder.png.
# Scores are written as JSON into results/ladder/, runs into runs/ladder/.
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac
cd "$(dirname "$0")/../.."
ENV=${ENV:-halfcheetah-medium-replay-sb3}; SEEDS=${SEEDS:-"0 1 2"}; JOBS=${JOBS:-2}; EP=${EP:-20}; DEP=${DEP:-10}
OUT=${OUT:-results/ladder}; PLANNERS=${PLANNERS:-"transformer td diffusion"}  # which to score
mkdir -p "$OUT" logs runs/ladder
O="--method official"
rung_flags() {  # each rung adds one change (or one named group) to the one before
  case $1 in
    0) echo "$O" ;;                                                            # the published method
    1) echo "$O --causal" ;;                                                   # + causal mask
    2) echo "$O --causal --episode-split ours --norm-eps 0 --no-invdyn-next-own-stats" ;;  # + data fixes
    3) echo "$O --causal --episode-split ours --norm-eps 0 --no-invdyn-next-own-stats" ;;  # (+ noise: at planning)
    4) echo "$O --causal --episode-split ours --norm-eps 0 --no-invdyn-next-own-stats --schedule cosine \
--prediction v --unet-full-skip --x0-clamp --unet-time-mult 4" ;;             # + a denoiser that generates from noise
    5) echo "$(rung_flags 4) --cond-discount 0.99 --cond-scale 0 --cond-target 1" ;;  # + discounted, fixed target
    6) echo "" ;;                                                              # ours: k, w, 1 candidate, the rest
  esac
}
plan_flags() { [ "$1" -ge 3 ] && [ "$1" -le 5 ] && echo "--refine-noise" || true; }
has() { case " $PLANNERS " in *" $1 "*) return 0 ;; esac; return 1; }  # is planner $1 in PLANNERS?
train_of() { [ "$1" = 3 ] && echo 2 || echo "$1"; }
RUNGS=${2:-"0 1 2 4 5 6"}
case "${1:-}" in
train)
  for r in $RUNGS; do for s in $SEEDS; do
    [ -f runs/ladder/r$r-s$s/checkpoint.pt ] && continue
    echo "python train.py --fast --env $ENV --threads 1 --eval-episodes 0 --seed $s --out runs/ladder/r$r-s$s $(rung_flags $r) > logs/ladder-r$r-s$s.log 2>&1"
  done; done | xargs -P "$JOBS" -I{} sh -c '{}' ;;
evaluate)
  for r in $RUNGS; do for s in $SEEDS; do
    c=runs/ladder/r$(train_of $r)-s$s/checkpoint.pt; o=$OUT/r${r}_s$s; P="python plan.py --fast --threads 1 --seed 1000 --checkpoint $c $(plan_flags $r)"
    [ -f "$c" ] || continue
    # rung 3 plans with rung 2's checkpoints: its transformer alone is rung 2's (noise is a refinement setting)
    [ "$r" = 3 ] || ! has transformer || [ -f ${o}_transformer.json ] || echo "$P --planner transformer --episodes $EP --batch-envs $EP --json ${o}_transformer.json"
    ! has td || [ -f ${o}_td.json ] || echo "$P --planner td --episodes $EP --batch-envs $EP --json ${o}_td.json"
    # diffusion from noise only where the schedule reaches pure noise (cosine: rungs 4 and up), one plan per
    # decision on every rung (Decision Diffuser's baseline; 32 candidates from noise would cost 32 x 100 steps)
    [ "$r" -lt 4 ] || ! has diffusion || [ -f ${o}_diffusion.json ] || echo "$P --planner diffusion --n-candidates 1 --episodes $DEP --batch-envs $DEP --json ${o}_diffusion.json"
  done; done | xargs -P "$JOBS" -I{} sh -c '{} > /dev/null 2>&1' ;;
*) echo "usage: $0 train|evaluate [RUNGS] (--help)"; exit 2 ;;
esac
