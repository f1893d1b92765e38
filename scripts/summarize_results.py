"""Markdown tables of the results protocol from results/*.json (plan.py --json) and the CPU benchmark.

    python scripts/summarize_results.py --results results --bench results/bench_cpu.json
"""
import argparse
import json
import pathlib

import numpy as np

p = argparse.ArgumentParser()
p.add_argument("--results", default="results")
p.add_argument("--bench", default="results/bench_cpu.json")
args = p.parse_args()
res = pathlib.Path(args.results)
bench = {(r["planner"], r["k"]): r["ms_per_decision"]
         for r in json.loads(pathlib.Path(args.bench).read_text())["rows"] if r["batch"] == 1} \
    if pathlib.Path(args.bench).exists() else {}


def load(name):
    f = res / f"{name}.json"
    return json.loads(f.read_text()) if f.exists() else None


print("| planner | normalized score, mean ± std across seeds | per seed (mean ± std over episodes) | episodes per seed | ms per decision (CPU, batch 1) |")
print("|---|---|---|---|---|")
for label, stem in (("transformer (k = 0)", "transformer"), ("td (k = 5)", "td_k5"), ("diffusion (T = 100 from noise)", "diffusion")):
    runs = [load(f"s{s}_{stem}") for s in range(3)]
    runs = [r for r in runs if r]
    if not runs:
        continue
    means = np.array([r["normalized_score_mean"] for r in runs])
    per = ", ".join(f"{r['normalized_score_mean']:.1f} ± {r['normalized_score_std']:.1f}" for r in runs)
    k = runs[0]["k"]
    ms = bench.get((runs[0]["planner"], k))
    print(f"| {label} | **{means.mean():.1f} ± {means.std():.1f}** ({len(runs)} seeds) | {per} | {runs[0]['episodes']} | "
          f"{ms:.2f} |" if ms else f"| {label} | **{means.mean():.1f} ± {means.std():.1f}** | {per} | {runs[0]['episodes']} | |")

print()
print("| run | normalized score (mean ± std over episodes) | episodes |")
print("|---|---|---|")
for stem in sorted(f.stem for f in res.glob("*.json")):
    r = load(stem)
    if r and "normalized_score_mean" in r and not stem.startswith("s"):
        print(f"| {stem} ({r['planner']}, k={r['k']}, candidates={r['candidates']}, refine_noise={r['refine_noise']}, "
              f"causal={r['causal']}) | {r['normalized_score_mean']:.1f} ± {r['normalized_score_std']:.1f} | {r['episodes']} |")
print()
print("| seed 0, k | normalized score | ms per decision (CPU, batch 1) |")
print("|---|---|---|")
for f in sorted(res.glob("s0_td_k*.json"), key=lambda f: int(f.stem.split("_k")[-1])):
    r = json.loads(f.read_text())
    print(f"| {r['k']} | {r['normalized_score_mean']:.1f} ± {r['normalized_score_std']:.1f} | {bench.get(('td', r['k']), float('nan')):.2f} |")
