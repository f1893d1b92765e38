#!/usr/bin/env bash
# GPU numbers for the README's Speed section: training throughput at the official sizes (batch 32, with and
# without bf16 autocast), then the side-by-side benchmark, eager and with CUDA-graph replay.
# Usage: OUT=results bash scripts/gpu_speed.sh
set -euo pipefail
OUT=${OUT:-results}; mkdir -p "$OUT"; RUN=${RUN:-/tmp/td_official}
OFFICIAL="--env halfcheetah-medium-sb3 --device cuda --batch-size 32 --tf-half-dim 256 --tf-layers 4 --tf-ffn 512
  --unet-dim 64 --unet-mults 1,2,4,8 --n-candidates 32 --use-critic --eval-episodes 0 --log-every 500 --save-every 100000"
nvidia-smi -L || true
rm -rf "$RUN" "$RUN-amp"
python3 train.py $OFFICIAL --steps ${STEPS:-3000} --out "$RUN" 2>/dev/null | grep -E "parameters|device"
cp "$RUN/metrics.jsonl" "$OUT/train_official_fp32.jsonl"
python3 train.py $OFFICIAL --steps ${STEPS:-3000} --amp --out "$RUN-amp" 2>/dev/null | grep -E "device" || true
cp "$RUN-amp/metrics.jsonl" "$OUT/train_official_bf16.jsonl"
tail -n1 "$OUT"/train_official_*.jsonl
python3 plan.py --checkpoint "$RUN/checkpoint.pt" --benchmark --device cuda --json "$OUT/bench_gpu_eager.json" --decisions 50 --reference-decisions 10
python3 plan.py --checkpoint "$RUN/checkpoint.pt" --benchmark --device cuda --cuda-graph --json "$OUT/bench_gpu_graph.json" --decisions 50 --reference-decisions 10
