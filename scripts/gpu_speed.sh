#!/usr/bin/env bash
# GPU numbers for the README's Speed section: training throughput at the official sizes (batch 32; eager,
# eager with bf16 autocast, and CUDA-graph replay), then the side-by-side planning benchmark, eager and
# with CUDA-graph replay. Usage: OUT=results bash scripts/gpu_speed.sh
set -euo pipefail
OUT=${OUT:-results}; mkdir -p "$OUT"; RUN=${RUN:-/tmp/td_official}; STEPS=${STEPS:-2000}
OFFICIAL="--env halfcheetah-medium-sb3 --device cuda --batch-size 32 --tf-half-dim 256 --tf-layers 4 --tf-ffn 512
  --unet-dim 64 --unet-mults 1,2,4,8 --n-candidates 32 --use-critic --eval-episodes 0 --log-every 500 --save-every 100000"
nvidia-smi -L || true
for variant in eager:"" bf16:"--amp" graph:"--cuda-graph"; do
  name=${variant%%:*}; flags=${variant#*:}
  rm -rf "$RUN-$name"
  python3 train.py $OFFICIAL --steps $STEPS $flags --out "$RUN-$name" 2>/dev/null | grep -E "parameters" || true
  cp "$RUN-$name/metrics.jsonl" "$OUT/train_official_$name.jsonl"
  echo "$name: $(tail -n1 "$OUT/train_official_$name.jsonl")"
done
python3 plan.py --checkpoint "$RUN-eager/checkpoint.pt" --benchmark --device cuda --cuda-graph --json "$OUT/bench_gpu_graph.json" --decisions 50 --reference-decisions 10
