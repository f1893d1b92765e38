#!/usr/bin/env bash
# Every GPU number of docs/speed.md's GPU tables, as one script (about 9 minutes on an H100):
#   1. training throughput at the official sizes, batch 32: eager (300 steps), CUDA-graph replay and
#      torch.compile + CUDA-graph replay (2500 steps each, it/s logged in metrics.jsonl);
#   2. the planning benchmark: every planner on the trained checkpoint, eager; then the td-official and
#      dd-reference rows eager and fast (torch.compile + CUDA graphs) side by side in one run, with the kernels
#      each decision launches (torch.profiler).
# Usage: OUT=results/speed/gpu bash scripts/speed/gpu.sh   (VARIANTS="graph compiled", BENCH=0 or BENCH=eager run a
# part; each step has its own timeout, and one failing goes on)
set -uo pipefail
case "${1:-}" in -h|--help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac
cd "$(dirname "$0")/../.."
OUT=${OUT:-results/speed/gpu}; mkdir -p "$OUT"; RUN=${RUN:-/tmp/td_official}; STEPS=${STEPS:-2500}
VARIANTS=${VARIANTS:-"eager graph compiled"}; BENCH=${BENCH:-1}
OFFICIAL="--env halfcheetah-medium-sb3 --preset= --target-return 0 --device cuda --batch-size 32 --eval-episodes 0
  --save-every 100000 --log-every 100"
nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__)"
for name in $VARIANTS; do
  case $name in eager) steps=300; flags="";; graph) steps=$STEPS; flags="--cuda-graph";;
                compiled) steps=$STEPS; flags="--cuda-graph --compile";; esac
  rm -rf "$RUN-$name"
  timeout 200 python3 train.py $OFFICIAL --steps "$steps" $flags --out "$RUN-$name" 2>&1 \
    | grep -E "parameters|error|Error" | tail -8
  cp "$RUN-$name/metrics.jsonl" "$OUT/train_official_$name.jsonl" 2>/dev/null \
    && echo "train $name: $(grep '"loss"' "$OUT/train_official_$name.jsonl" | tail -n1)"
done
[ "$BENCH" = 0 ] && exit 0
CK=$(ls -d "$RUN"-*/checkpoint.pt | head -n1)
timeout 150 python3 bench.py --checkpoint "$CK" --benchmark --device cuda --batches 1 --ks 1,5 --decisions 50 \
  --reference-decisions 3 --json "$OUT/bench_gpu_eager.json" 2>&1 | grep -v Warn | tail -14
[ "$BENCH" = eager ] && exit 0
timeout 240 python3 bench.py --checkpoint "$CK" --benchmark --device cuda --compile --cuda-graph --reference-only \
  --decisions 50 --reference-decisions 20 --json "$OUT/bench_gpu_fast.json" 2>&1 | grep -v Warn | tail -16
