#!/usr/bin/env bash
# The scores at the quickstart budget (--preset cpu, 10k steps) on the bundled files, the denoiser's diagnostics,
# the k x w sweeps and hopper: docs/results.md from "The denoiser" on. 2-core CPU protocol: every process
# single-threaded, JOBS at a time. Defaults (k, w) are chosen on episode seeds 100+ and reported on seeds 1000+.
#   bash scripts/reproduce/scores.sh train      # 3 seeds x DATASETS (+ the eps and undiscounted-condition runs)
#   bash scripts/reproduce/scores.sh diagnose   # diagnose.py --diagnose on each seed-0 checkpoint (and those two)
#   bash scripts/reproduce/scores.sh sweep      # k x w on seed 0 of each dataset, episode seeds 100+
#   bash scripts/reproduce/scores.sh evaluate   # transformer, td, diffusion from noise on seeds 1000+
#   bash scripts/reproduce/scores.sh current    # halfcheetah-medium-sb3 retrained with the current step, 5 seeds
#   bash scripts/reproduce/scores.sh summary    # the tables: scripts/reproduce/summarize_scores.py
#   bash scripts/reproduce/scores.sh earlier    # docs/results_earlier.md: the previous denoiser's protocol, run
#                                               # with the code that made it (commit 4e71186, a git worktree)
# Hopper: DATASETS=hopper-medium-sb3 (sweep: k 0,1,2,5,10 and w 1.0,1.2,2.0; evaluate scores td at k = 1, the row's
# default, into *_td_k1.json and at the official k = 5 into *_td.json, the names results.md cites).
# PRINT=1 lists the jobs instead of running them. JSON into OUT=results/diffusion/, runs into runs/.
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac
cd "$(dirname "$0")/../.."
ROOT=$PWD; OUT=${OUT:-results/diffusion}; EP=${EP:-20}; DEP=${DEP:-10}; SWEEP_EP=${SWEEP_EP:-5}; JOBS=${JOBS:-2}
DATASETS=${DATASETS:-"halfcheetah-medium-replay-sb3 halfcheetah-medium-sb3"}
mkdir -p "$OUT" logs
T="python train.py --fast --threads 1 --eval-episodes 0"
P="python plan.py --fast --threads 1 --seed 1000"
run_jobs() { if [ -n "${PRINT:-}" ]; then cat; else xargs -P "$JOBS" -I{} sh -c '{}'; fi; }  # PRINT=1: list only
log() { echo "logs/scores-$(echo -n "$1" | tr -c 'a-z0-9-' _ | tail -c 60).log"; }
RP=halfcheetah-medium-replay-sb3
case "${1:-}" in
train)
  { for e in $DATASETS; do for s in 0 1 2; do
      [ -f runs/$e-s$s/checkpoint.pt ] || echo "$T --env $e --seed $s --out runs/$e-s$s > $(log $e-s$s) 2>&1"
    done; done
    # the diagnostic's two comparisons, same data, budget and seed: eps-prediction, the undiscounted condition
    echo "$T --env $RP --seed 0 --prediction eps --out runs/$RP-eps-s0 > $(log eps) 2>&1"
    echo "$T --env $RP --seed 0 --cond-discount 1 --out runs/$RP-undiscounted-s0 > $(log undiscounted) 2>&1"
  } | run_jobs ;;
diagnose)
  D="python diagnose.py --threads 1 --ks 1,2,5,10,20,40"
  { for e in $DATASETS; do echo "$D --checkpoint runs/$e-s0/checkpoint.pt --diagnose docs/diagnose_$e.png"; done
    echo "$D --checkpoint runs/$RP-eps-s0/checkpoint.pt --diagnose $OUT/diagnose_eps.png"
    echo "$D --checkpoint runs/$RP-undiscounted-s0/checkpoint.pt --diagnose $OUT/diagnose_undiscounted.png"
  } | JOBS=1 run_jobs ;;
sweep)
  for e in $DATASETS; do
    ks=1,2,5,10,20,40; ws=1.0,1.2,1.5,2.0,3.0
    [[ $e == hopper* ]] && { ks=0,1,2,5,10; ws=1.0,1.2,2.0; }
    echo "python bench.py --threads 1 --checkpoint runs/$e-s0/checkpoint.pt --sweep-k --ks $ks --guidances $ws \
--no-endpoints --episodes $SWEEP_EP --batch-envs $SWEEP_EP --seed 100 --json $OUT/sweep_$e.json --plot docs/sweep_$e.png"
  done | run_jobs ;;
evaluate)
  for e in $DATASETS; do for s in 0 1 2; do
    c=runs/$e-s$s/checkpoint.pt; o=$OUT/${e}_s$s
    echo "$P --checkpoint $c --planner transformer --episodes $EP --batch-envs $EP --json ${o}_transformer.json"
    if [[ $e == hopper* ]]; then
      echo "$P --checkpoint $c --planner td --episodes $EP --batch-envs $EP --json ${o}_td_k1.json"
      echo "$P --checkpoint $c --planner td --refine-steps 5 --episodes $EP --batch-envs $EP --json ${o}_td.json"
    else
      echo "$P --checkpoint $c --planner td --episodes $EP --batch-envs $EP --json ${o}_td.json"
    fi
    echo "$P --checkpoint $c --planner diffusion --episodes $DEP --batch-envs $DEP --json ${o}_diffusion.json"
  done; done | sed 's/$/ > \/dev\/null/' | run_jobs ;;
current)  # "The same protocol with the current training step": halfcheetah-medium-sb3, seeds 0-4
  for s in 0 1 2 3 4; do
    r=runs/current/halfcheetah-medium-sb3-s$s; o=$OUT/new_halfcheetah-medium-sb3_s$s
    echo -n "{ [ -f $r/checkpoint.pt ] || $T --env halfcheetah-medium-sb3 --seed $s --out $r > $(log current-s$s) 2>&1; }"
    for p in transformer td; do echo -n " && $P --checkpoint $r/checkpoint.pt --planner $p --episodes $EP \
--batch-envs $EP --json ${o}_$p.json > /dev/null"; done
    echo
  done | run_jobs ;;
summary)
  python scripts/reproduce/summarize_scores.py --results "$OUT"
  python scripts/reproduce/summarize_scores.py --results "$OUT/ab_separate_windows" --failed-below 35 ;;
earlier)  # commit 4e71186's own scripts (./scripts/ in its worktree); JSON into results/earlier/, the k plot into docs/
  W=.regress/4e71186; E=$ROOT/results/earlier
  cat <<JOBS | JOBS=1 run_jobs
{ [ -d $W ] || git worktree add --detach $W 4e71186 > /dev/null; } && cd $W && { [ -f runs/halfcheetah-medium-sb3-s0/checkpoint.pt ] || python train.py --env halfcheetah-medium-sb3 \
--threads 1 > $ROOT/$(log earlier-s0) 2>&1; } && OUT=$E bash ./scripts/results_cpu.sh \
&& python plan.py --checkpoint runs/halfcheetah-medium-sb3-s0/checkpoint.pt --benchmark --threads 1 --decisions 10 \
--reference-decisions 2 --json $E/bench_cpu.json > $E/bench_cpu.log 2>&1 \
&& python ./scripts/plot_k_sweep.py --results $E --bench $E/bench_cpu.json --out $ROOT/docs/k_sweep.png \
&& python ./scripts/summarize_results.py --results $E --bench $E/bench_cpu.json
JOBS
  ;;
*) echo "usage: $0 train|diagnose|sweep|evaluate|current|summary|earlier (--help)"; exit 2 ;;
esac
