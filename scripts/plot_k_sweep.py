"""The score-versus-latency picture from separate evaluations and one benchmark run (both plan.py --json).

    python scripts/plot_k_sweep.py --results results --prefix s0 --bench results/bench_cpu.json --out docs/k_sweep.png

Scores: <prefix>_transformer.json, <prefix>_td_k<K>.json, <prefix>_diffusion.json. Latency: the benchmark's
batch-1 row of the same planner and k, so every point's time comes from one side-by-side run.
"""
import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import plan  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--results", default="results")
p.add_argument("--prefix", default="s0")
p.add_argument("--bench", required=True)
p.add_argument("--out", default="docs/k_sweep.png")
args = p.parse_args()
res = pathlib.Path(args.results)
rows = {(r["planner"], r["k"]): r["ms_per_decision"] for r in json.loads(pathlib.Path(args.bench).read_text())["rows"]
        if r["batch"] == 1}
files = [res / f"{args.prefix}_transformer.json"]
files += sorted(res.glob(f"{args.prefix}_td_k*.json"), key=lambda f: int(f.stem.split("_k")[-1]))
files += [res / f"{args.prefix}_diffusion.json"]
results = []
for f in files:
    r = json.loads(f.read_text())
    r["ms_benchmark"] = rows[(r["planner"], r["k"])]
    results.append(r)
    print(f"{r['planner']:12s} k={r['k']:3d}  {r['normalized_score_mean']:5.1f} ± {r['normalized_score_std']:4.1f}  "
          f"({r['episodes']} episodes)  {r['ms_benchmark']:8.2f} ms")
plan.plot_sweep(results, args.out)
