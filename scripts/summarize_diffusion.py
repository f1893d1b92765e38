"""Markdown tables of scripts/results_diffusion.sh's JSON results (plan.py --json).

    python scripts/summarize_diffusion.py [--results results/diffusion]

Per dataset: transformer, td and diffusion from noise, mean ± std across training seeds of the per-seed means
(episodes on seeds 1000+), beside the data's baselines; then the k x w sweep (episode seeds 100+) as a grid.
"""
import argparse
import json
import pathlib

import numpy as np

# from datasets/README.md: the data's mean, its best source (or best episode) and the BC reference
BASELINES = {
    "halfcheetah-medium-replay-sb3": {"data mean": 24.2, "best source (its mean)": 38.3, "BC MLP": 2.2},
    "halfcheetah-medium-sb3": {"data mean": 34.1, "best episode": 40.8, "BC MLP": 39.4},
    "hopper-medium-sb3": {"data mean": 20.6, "best episode": 26.8, "BC MLP": 23.4},
}

p = argparse.ArgumentParser()
p.add_argument("--results", default="results/diffusion")
args = p.parse_args()
res = pathlib.Path(args.results)


def load(f):
    return json.loads(f.read_text()) if f.exists() else None


for env, base in BASELINES.items():
    rows = []
    for planner in ("transformer", "td", "diffusion"):
        runs = [r for s in range(3) if (r := load(res / f"{env}_s{s}_{planner}.json"))]
        if not runs:
            continue
        means = np.array([r["normalized_score_mean"] for r in runs])
        fails = [sum(x < 0.5 * np.median(r["normalized_scores"]) for x in r["normalized_scores"]) for r in runs]
        per = "; ".join(f"s{s}: {r['normalized_score_mean']:.1f} ± {r['normalized_score_std']:.1f}"
                        for s, r in enumerate(runs))
        label = {"transformer": "transformer alone (k = 0)", "diffusion": f"diffusion from noise (T = {runs[0]['k']}, w = {runs[0]['guidance']:g})",
                 "td": f"**td** (k = {runs[0]['k']}, w = {runs[0]['guidance']:g})"}[planner]
        ms = np.mean([r.get("ms_per_env_decision", r.get("ms_per_decision")) for r in runs])
        rows.append(f"| {label} | **{means.mean():.1f} ± {means.std():.1f}** ({len(runs)} seeds) | {per} | "
                    f"{runs[0]['episodes']} | {ms:.1f} |")
    sweep = load(res / f"sweep_{env}.json")
    if not rows and not sweep:
        continue
    print(f"\n### {env}\n")
    if rows:
        print("| planner | normalized score, mean ± std across seeds | per seed: mean ± std over episodes | episodes per seed | ms per decision (eval, batched) |")
        print("|---|---|---|---|---|")
        print("\n".join(rows))
        for k, v in base.items():
            print(f"| {k} | {v} | | | |")
    if sweep:
        ks = sorted({r["k"] for r in sweep if r["planner"] == "td"})
        ws = sorted({r["guidance"] for r in sweep if r["planner"] == "td"})
        tf = next((r for r in sweep if r["planner"] == "transformer"), None)
        print(f"\nk x w sweep, seed 0, {sweep[0]['episodes']} episodes per cell on seeds 100+"
              + (f"; transformer alone {tf['normalized_score_mean']:.1f} (median {np.median(tf['normalized_scores']):.1f})" if tf else "")
              + "; each cell: mean (median):\n")
        print("| w \\ k | " + " | ".join(str(k) for k in ks) + " |")
        print("|---|" + "---|" * len(ks))
        for w in ws:
            cells = {r["k"]: r for r in sweep if r["planner"] == "td" and r["guidance"] == w}
            print(f"| {w:g} | " + " | ".join(
                f"{cells[k]['normalized_score_mean']:.1f} ({np.median(cells[k]['normalized_scores']):.1f})"
                if k in cells else "" for k in ks) + " |")
        print(f"| mean over w | " + " | ".join(f"{np.mean([r['normalized_score_mean'] for r in sweep if r['planner'] == 'td' and r['k'] == k]):.1f}" for k in ks) + " |")
