#!/usr/bin/env bash
# The budget study: one 40k-step run per seed, planning-only copies kept along the way, every planner scored at
# every kept step. 2-core CPU protocol: each process single-threaded, at most two at a time.
#   bash scripts/reproduce/budget.sh train     # SEEDS x DATASETS, 40k steps, lr decaying over the whole run
#   bash scripts/reproduce/budget.sh evaluate  # transformer, td k=1, 5 and KBEST, diffusion from noise, seeds 1000+
#   bash scripts/reproduce/budget.sh diagnose  # diagnose.py --diagnose on each kept copy of seed 0
#   bash scripts/reproduce/budget.sh plot      # docs/budget.png, results/budget/summary.{md,json}
# Scores are written as JSON into results/budget/, runs into runs/budget/.
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac
cd "$(dirname "$0")/../.."
OUT=${OUT:-results/budget}; EP=${EP:-20}; DEP=${DEP:-10}; STEPS=${STEPS:-40000}
KEEP=${KEEP:-5000,10000,20000,40000}; KBEST=${KBEST:-2}
DIFF_STEPS=${DIFF_STEPS:-${KEEP//,/ }}  # steps where diffusion from noise is scored (each run costs ~8 CPU-minutes)
SEEDS=${SEEDS:-"0 1 2"}; DATASETS=${DATASETS:-halfcheetah-medium-replay-sb3}; JOBS=${JOBS:-2}
mkdir -p "$OUT" logs runs/budget
T="python train.py --fast --threads 1 --eval-episodes 0 --steps $STEPS --lr-decay-steps $STEPS --keep-at $KEEP"
P="python plan.py --fast --threads 1 --seed 1000"
case "${1:-}" in
train)
  for e in $DATASETS; do for s in $SEEDS; do
    echo "$T --env $e --seed $s --out runs/budget/$e-s$s > logs/budget-$e-s$s.log 2>&1"
  done; done | xargs -P "$JOBS" -I{} sh -c '{}' ;;
evaluate)
  for e in $DATASETS; do for s in $SEEDS; do for step in ${KEEP//,/ }; do
    c=runs/budget/$e-s$s/keep/step$step.pt; o=$OUT/${e}_s${s}_step${step}
    [ -f "$c" ] || continue
    [ -f "${o}_transformer.json" ] || echo "$P --checkpoint $c --planner transformer --episodes $EP --batch-envs $EP --json ${o}_transformer.json"
    [ -f "${o}_td_k1.json" ] || echo "$P --checkpoint $c --planner td --refine-steps 1 --episodes $EP --batch-envs $EP --json ${o}_td_k1.json"
    [ -f "${o}_td_k5.json" ] || echo "$P --checkpoint $c --planner td --refine-steps 5 --episodes $DEP --batch-envs $DEP --json ${o}_td_k5.json"
    [ -f "${o}_td_k$KBEST.json" ] || echo "$P --checkpoint $c --planner td --refine-steps $KBEST --episodes $DEP --batch-envs $DEP --json ${o}_td_k$KBEST.json"
    if [[ " $DIFF_STEPS " == *" $step "* ]] && [ ! -f "${o}_diffusion.json" ]; then echo "$P --checkpoint $c --planner diffusion --episodes $DEP --batch-envs $DEP --json ${o}_diffusion.json"; fi
  done; done; done | xargs -P "$JOBS" -I{} sh -c '{} > /dev/null' ;;
diagnose)
  for e in $DATASETS; do for step in ${KEEP//,/ }; do
    python diagnose.py --threads 1 --checkpoint runs/budget/$e-s0/keep/step$step.pt --diagnose $OUT/diagnose_${e}_step$step.png --ks 1,2,5,10,20
  done; done ;;
plot)
  python scripts/reproduce/plot_budget.py --results "$OUT" --datasets $DATASETS --png docs/budget.png ;;
*) echo "usage: $0 train|evaluate|diagnose|plot (--help)"; exit 2 ;;
esac
