"""Markdown tables of a folder of plan.py / bench.py --sweep-k JSON results, beside the data's references.

    python scripts/reproduce/summarize_scores.py [--results results/diffusion]   # scores.sh summary runs this
    python scripts/reproduce/summarize_scores.py --results results/earlier --bench results/earlier/bench_cpu.json

Files named PREFIX_sSEED_PLANNER.json (scores.sh's `{dataset}_s0_td.json`, the current step's `new_..._s0_td.json`,
the earlier protocol's `s0_td_k5.json`) make one table per PREFIX: one row per PLANNER, the mean ± std across
training seeds of the per-seed means, each seed's mean ± std over episodes and its failed episodes (below
--failed-below), and the time per environment step in the batched evaluation (or, with --bench, the benchmark's
batch-1 row of the same planner and k), then the dataset's references (sources.BUNDLED_REFERENCES). Files without
a seed (`abl_no_noise.json`) are listed one per row. `sweep_DATASET.json` (bench.py --sweep-k) becomes the k x w
grid, each cell mean (median) over its episodes.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import sources  # noqa: E402


def label(r: dict) -> str:
    if r["planner"] == "transformer":
        return "transformer alone (k = 0)"
    if r["planner"] == "diffusion":
        return f"diffusion from noise (T = {r['k']}, w = {r['guidance']:g}, α = {r.get('temperature', 1.0):g})"
    extra = f", {r['candidates']} candidates" if r.get("candidates", 1) > 1 else ""
    return f"td (k = {r['k']}, w = {r['guidance']:g}{extra})"


def failed(r: dict, below: float) -> int:
    """Failed episodes: below `below` (the cheetah flips or stalls)."""
    return int((np.array(r["normalized_scores"]) < below).sum())


def ms(r: dict, bench: dict) -> str:
    if bench:
        v = bench.get((r["planner"], r["k"]))
        return f"{v:.2f}" if v is not None else ""
    v = r.get("ms_per_env_decision", r.get("ms_per_decision"))  # files written before plan.py timed per call
    return f"{v:.1f}" if v is not None else ""


def seed_tables(groups: dict, bench: dict, below: float) -> list:
    lines = []
    order = {"transformer": 0, "diffusion": 2}
    for prefix in sorted(groups):
        planners = groups[prefix]
        env = next(iter(next(iter(planners.values())).values()))["env"]
        lines += ["", f"### {prefix or 'seeds'} ({env})", "",
                  "| planner | normalized score, mean ± std across seeds | per seed: mean ± std over episodes "
                  "(failed) | episodes per seed | ms per decision (" + ("benchmark, batch 1" if bench else
                                                                          "eval, batched") + ") |",
                  "|---|---|---|---|---|"]
        for planner in sorted(planners, key=lambda p: (order.get(p, 1), next(iter(planners[p].values()))["k"], p)):
            runs = dict(sorted(planners[planner].items()))
            first = next(iter(runs.values()))
            means = np.array([r["normalized_score_mean"] for r in runs.values()])
            per = "; ".join(f"s{s}: {r['normalized_score_mean']:.1f} ± {r['normalized_score_std']:.1f} ({failed(r, below)})"
                            for s, r in runs.items())
            episodes = "/".join(str(e) for e in sorted({r["episodes"] for r in runs.values()}))
            lines.append(f"| {label(first)} | **{means.mean():.1f} ± {means.std():.1f}** ({len(runs)} seeds) | {per} "
                         f"| {episodes} | {ms(first, bench)} |")
        lines += [f"| {name} | {v} | | | |" for name, v in sources.BUNDLED_REFERENCES.get(env, {}).items()]
    return lines


def single_runs(runs: dict, below: float) -> list:
    if not runs:
        return []
    lines = ["", "| run | planner | normalized score (mean ± std over episodes) | failed | episodes |", "|---|---|---|---|---|"]
    for name, r in sorted(runs.items()):
        setting = f"{label(r)}, refine noise {r.get('refine_noise')}" + (
            f", causal {r['causal']}" if "causal" in r else "")  # files written before --method official
        lines.append(f"| {name} ({r['env']}) | {setting} | {r['normalized_score_mean']:.1f} ± "
                     f"{r['normalized_score_std']:.1f} | {failed(r, below)} | {r['episodes']} |")
    return lines


def sweep_grid(name: str, sweep: list) -> list:
    td = [r for r in sweep if r["planner"] == "td"]
    ks, ws = sorted({r["k"] for r in td}), sorted({r["guidance"] for r in td})
    tf = next((r for r in sweep if r["planner"] == "transformer"), None)
    lines = ["", f"`{name}`: k x w sweep, {sweep[0]['episodes']} episodes per cell"
             + (f"; transformer alone {tf['normalized_score_mean']:.1f} (median "
                f"{np.median(tf['normalized_scores']):.1f})" if tf else "") + "; each cell: mean (median):", "",
             "| w \\ k | " + " | ".join(str(k) for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for w in ws:
        cells = {r["k"]: r for r in td if r["guidance"] == w}
        lines.append(f"| {w:g} | " + " | ".join(
            f"{cells[k]['normalized_score_mean']:.1f} ({np.median(cells[k]['normalized_scores']):.1f})"
            if k in cells else "" for k in ks) + " |")
    lines.append("| mean over w | " + " | ".join(
        f"{np.mean([r['normalized_score_mean'] for r in td if r['k'] == k]):.1f}" for k in ks) + " |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default="results/diffusion", help="a folder of JSON results")
    p.add_argument("--bench", default=None, help="bench.py --benchmark JSON: batch-1 latency per (planner, k)")
    p.add_argument("--failed-below", type=float, default=30.0,
                   help="an episode below this normalized score counts as failed (results.md: 30; 35 on "
                        "halfcheetah-medium-sb3's side-by-side retraining)")
    args = p.parse_args()
    bench = {}
    if args.bench:
        bench = {(r["planner"], r["k"]): r["ms_per_decision"]
                 for r in json.loads(Path(args.bench).read_text())["rows"] if r["batch"] == 1}
    groups, singles, lines = defaultdict(lambda: defaultdict(dict)), {}, []
    for f in sorted(Path(args.results).glob("*.json")):
        r = json.loads(f.read_text())
        if f.stem.startswith("sweep_") and isinstance(r, list):
            lines += sweep_grid(f.stem[len("sweep_"):], r)
            continue
        if not (isinstance(r, dict) and "normalized_scores" in r):
            continue  # a diagnostic, a summary or a benchmark
        m = re.match(r"(?:(.+)_)?s(\d+)_(.+)$", f.stem)
        if m:
            groups[m.group(1) or ""][m.group(3)][int(m.group(2))] = r
        else:
            singles[f.stem] = r
    tables = seed_tables(groups, bench, args.failed_below) + single_runs(singles, args.failed_below) + lines
    print("\n".join(tables).lstrip("\n"))


if __name__ == "__main__":
    main()
