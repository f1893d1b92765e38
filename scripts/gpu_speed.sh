#!/usr/bin/env bash
# Every GPU number of the README's Speed section, as one script (about 8 minutes on an H100):
#   1. training throughput at the official sizes, batch 32: eager (300 steps) and CUDA-graph replay (2500 steps,
#      it/s logged in metrics.jsonl);
#   2. the planning benchmark, eager rows and fast rows (torch.compile + CUDA graphs) in one run, with the
#      kernels each decision launches (torch.profiler).
# Usage: OUT=results/gpu bash scripts/gpu_speed.sh     (each step has its own timeout; one failing goes on)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu}; mkdir -p "$OUT"; RUN=${RUN:-/tmp/td_official}; STEPS=${STEPS:-2500}
OFFICIAL="--env halfcheetah-medium-sb3 --preset= --target-return 0 --device cuda --batch-size 32 --eval-episodes 0
  --log-every 500 --save-every 100000"
nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__)"
for variant in eager:300: graph:$STEPS:--cuda-graph; do
  IFS=: read -r name steps flags <<< "$variant"
  rm -rf "$RUN-$name"
  timeout 110 python3 train.py $OFFICIAL --steps "$steps" $flags --out "$RUN-$name" --log-every 100 2>&1 \
    | grep -E "parameters|error|Error" | tail -8
  cp "$RUN-$name/metrics.jsonl" "$OUT/train_official_$name.jsonl" 2>/dev/null \
    && echo "train $name: $(grep '"loss"' "$OUT/train_official_$name.jsonl" | tail -n1)"
done
CK="$RUN-graph/checkpoint.pt"; [ -f "$CK" ] || CK="$RUN-eager/checkpoint.pt"
timeout 100 python3 bench.py --checkpoint "$CK" --benchmark --device cuda --batches 1 --ks 1,5 --decisions 50 \
  --reference-decisions 10 --json "$OUT/bench_gpu_eager.json" 2>&1 | grep -v Warn | tail -14
timeout 240 python3 bench.py --checkpoint "$CK" --benchmark --device cuda --compile --cuda-graph --reference-only \
  --decisions 50 --reference-decisions 20 --json "$OUT/bench_gpu_fast.json" 2>&1 | grep -v Warn | tail -16
