#!/usr/bin/env bash
# Train and evaluate every dataset of the paper in turn, at the official sizes and budget (1M steps each),
# on a machine that can reach D4RL (and Minari for Kitchen: pip install minari). Each run directory gets
# checkpoint.pt, metrics.jsonl, curves.png and a 10-episode evaluation; results/d4rl/<name>-s<seed>.json collects
# them. Each dataset's settings are its row of config.ENV_TABLE; locomotion names evaluate in D4RL's simulator
# dynamics by default (envs.py). No D4RL score has been measured by this project (README, D4RL).
# Usage: bash scripts/reproduce/d4rl_table.sh [--device cuda] [--steps N] [--seeds "0 1 2"]
set -euo pipefail
DEVICE=auto; STEPS=""; SEEDS="0"
while [ $# -gt 0 ]; do
  case $1 in --device) DEVICE=$2; shift 2;; --steps) STEPS="--steps $2"; shift 2;; --seeds) SEEDS=$2; shift 2;;
    -h|--help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0;;
    *) echo "unknown option $1"; exit 2;; esac
done
cd "$(dirname "$0")/../.."
NAMES="halfcheetah-medium-expert-v2 halfcheetah-medium-replay-v2 halfcheetah-medium-v2
hopper-medium-expert-v2 hopper-medium-replay-v2 hopper-medium-v2
walker2d-medium-expert-v2 walker2d-medium-replay-v2 walker2d-medium-v2
pen-human-v1 pen-cloned-v1 pen-expert-v1 hammer-human-v1 hammer-cloned-v1 hammer-expert-v1
door-human-v1 door-cloned-v1 door-expert-v1 relocate-human-v1 relocate-cloned-v1 relocate-expert-v1
kitchen-partial-v0 kitchen-mixed-v0"
mkdir -p results/d4rl
for name in $NAMES; do
  for seed in $SEEDS; do
    out=runs/$name-s$seed
    resume=""; [ -f $out/checkpoint.pt ] && resume="--resume"
    python train.py --env $name --seed $seed --device $DEVICE $STEPS --out $out $resume --eval-episodes 0
    python plan.py --checkpoint $out/checkpoint.pt --device $DEVICE --episodes 10 --json results/d4rl/$name-s$seed.json
  done
done
python - <<'PY'
import glob, json
for f in sorted(glob.glob("results/d4rl/*.json")):
    r = json.load(open(f))
    print(f"{f.split('/')[-1][:-5]:36s} {r['normalized_score_mean']:6.1f} ± {r['normalized_score_std']:5.1f}")
PY
