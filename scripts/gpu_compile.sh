#!/usr/bin/env bash
# GPU: CUDA-graph training throughput at the official sizes, then the planning benchmark with
# torch.compile + CUDA-graph replay. Usage: OUT=results bash scripts/gpu_compile.sh
set -uo pipefail
OUT=${OUT:-results}; mkdir -p "$OUT"; RUN=${RUN:-/tmp/td_official}
OFFICIAL="--env halfcheetah-medium-sb3 --device cuda --batch-size 32 --tf-half-dim 256 --tf-layers 4 --tf-ffn 512
  --unet-dim 64 --unet-mults 1,2,4,8 --n-candidates 32 --use-critic --eval-episodes 0 --log-every 500 --save-every 100000"
rm -rf "$RUN-graph"
timeout 150 python3 train.py $OFFICIAL --steps ${STEPS:-3000} --cuda-graph --out "$RUN-graph" --debug 2>&1 | grep -v "it/s\]" | tail -25
cp "$RUN-graph/metrics.jsonl" "$OUT/train_official_graph.jsonl" && tail -n1 "$OUT/train_official_graph.jsonl"
CK="$RUN-graph/checkpoint.pt"
if [ ! -f "$CK" ]; then
  timeout 100 python3 train.py $OFFICIAL --steps 300 --out "$RUN-eager" >/dev/null 2>&1; CK="$RUN-eager/checkpoint.pt"
fi
timeout 330 python3 plan.py --checkpoint "$CK" --benchmark --device cuda --compile --cuda-graph --batches ${BATCHES:-1} \
  --ks ${KS:-5} --decisions 50 --reference-decisions 10 --json "$OUT/bench_gpu_compile_graph.json" 2>&1 | grep -v Warn | tail -30
