"""The budget study's picture and tables, from the JSON scripts/reproduce/budget.sh writes into results/budget/.

    python scripts/reproduce/plot_budget.py --results results/budget --datasets halfcheetah-medium-replay-sb3 --png docs/budget.png

For every dataset, kept step and planner: the mean score of each training seed, then the mean and std across
seeds. Prints a markdown table (also written to results/budget/summary.md) and draws score against training steps,
one line per planner with the spread across seeds, the data's mean, its best source and BC as horizontal lines,
and the wall time of each budget on a second axis.
"""
from __future__ import annotations

import argparse
import glob
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from sources import BUNDLED_REFERENCES as REFERENCE  # noqa: E402  the data's mean, best source or episode, BC
PLANNERS = ["transformer", "td_k1", "td_k2", "td_k5", "diffusion"]
LABEL = {"transformer": "transformer alone (k = 0)", "td_k1": "td, k = 1", "td_k2": "td, k = 2",
         "td_k5": "td, k = 5", "diffusion": "diffusion from noise (k = T)"}


def collect(results: Path) -> dict:
    """{(dataset, step, planner): {seed: (score mean over episodes, episodes)}}"""
    out = defaultdict(dict)
    for f in glob.glob(str(results / "*_s*_step*_*.json")):
        m = re.match(r"(.+)_s(\d+)_step(\d+)_(.+)\.json$", Path(f).name)
        if not m:
            continue
        env, seed, step, planner = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
        r = json.loads(Path(f).read_text())
        out[(env, step, planner)][seed] = (r["normalized_score_mean"], r["episodes"])
    return out


def first_step_error(results: Path, env: str) -> dict:
    """{step: {k: s1_mse}} from diagnose.py --diagnose on each kept copy of seed 0."""
    rows = {}
    for f in glob.glob(str(results / f"diagnose_{env}_step*.json")):
        step = int(re.search(r"step(\d+)\.json$", f).group(1))
        rows[step] = {r["k"]: r["s1_mse"] for r in json.loads(Path(f).read_text())["plan_error_vs_k"]}
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default="results/budget")
    p.add_argument("--datasets", nargs="+", default=["halfcheetah-medium-replay-sb3"])
    p.add_argument("--png", default="docs/budget.png")
    p.add_argument("--it-per-s", type=float, default=17.0,
                   help="training speed for the wall-time labels (one single-threaded run per core)")
    args = p.parse_args()
    results = Path(args.results)
    data = collect(results)
    summary, lines = {}, []
    for env in args.datasets:
        steps = sorted({s for (e, s, _) in data if e == env})
        lines += [f"### {env}", "", "| planner | " + " | ".join(f"{s // 1000}k steps" for s in steps) + " |",
                  "|---|" + "---|" * len(steps)]
        for planner in PLANNERS:
            cells = []
            for s in steps:
                seeds = data.get((env, s, planner), {})
                if not seeds:
                    cells.append("")
                    continue
                means = np.array([v[0] for v in seeds.values()])
                eps = sorted({v[1] for v in seeds.values()})
                summary[f"{env}/{s}/{planner}"] = {"mean": float(means.mean()), "std": float(means.std()),
                                                   "seeds": sorted(seeds), "episodes_per_seed": eps}
                cells.append(f"{means.mean():.1f} ± {means.std():.1f} ({len(seeds)}x{'/'.join(map(str, eps))})")
            if any(cells):
                lines.append(f"| {LABEL[planner]} | " + " | ".join(cells) + " |")
        lines += [f"| {k} | " + " | ".join(f"{v:.1f}" for _ in steps) + " |" for k, v in REFERENCE.get(env, {}).items()]
        err = first_step_error(results, env)
        if err:
            ks = sorted({k for row in err.values() for k in row})
            lines += ["", "First planned step's squared error against the data (seed 0, `diagnose.py --diagnose`):", "",
                      "| step | " + " | ".join(f"k = {k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
            lines += [f"| {s // 1000}k | " + " | ".join(f"{err[s].get(k, float('nan')):.4f}" for k in ks) + " |"
                      for s in sorted(err)]
            summary[f"{env}/first_step_error"] = {str(s): err[s] for s in sorted(err)}
        lines.append("")
    text = "\n".join(lines)
    print(text)
    (results / "summary.md").write_text(text + "\n")
    (results / "summary.json").write_text(json.dumps(summary, indent=1))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    # per dataset: the whole range (with the data's references), and a zoom on the planners that plan from the data
    fig, axes = plt.subplots(len(args.datasets), 2, figsize=(13, 4.8 * len(args.datasets)), squeeze=False)
    for row, env in zip(axes, args.datasets):
        steps = sorted({s for (e, s, _) in data if e == env})
        for ax, zoom in zip(row, (False, True)):
            for planner in PLANNERS:
                pts = [(s, np.array([v[0] for v in data[(env, s, planner)].values()])) for s in steps
                       if data.get((env, s, planner))]
                if not pts or (zoom and planner == "diffusion"):
                    continue
                x = np.array([s for s, _ in pts])
                m, sd = np.array([v.mean() for _, v in pts]), np.array([v.std() for _, v in pts])
                line, = ax.plot(x, m, marker="o", label=LABEL[planner])
                ax.fill_between(x, m - sd, m + sd, color=line.get_color(), alpha=0.15)
            for (name, v), style in zip(REFERENCE.get(env, {}).items(), (":", "--", "-.")):
                if zoom and not 30 < v < 45:
                    continue
                ax.axhline(v, color="gray", linestyle=style, linewidth=1)
                ax.annotate(f"{name} {v:.1f}", (0.01, v), xycoords=("axes fraction", "data"), fontsize=8,
                            ha="left", va="bottom", color="gray")
            ax.set_xscale("log", base=2)
            ax.set_xticks(steps, [f"{s // 1000}k\n{s / args.it_per_s / 60:.0f} min" for s in steps])
            ax.minorticks_off()
            ax.set_xlabel(f"training steps (lr decays over the whole run); wall time at {args.it_per_s:g} it/s, "
                          f"one CPU thread", fontsize=8)
            ax.set_ylabel("D4RL normalized score (episode seeds 1000+)")
            ax.set_title(f"{env}: mean ± std over training seeds" if not zoom else "the same, zoomed: "
                         "the transformer alone against td at k = 1, 2, 5", fontsize=10)
            ax.legend(fontsize=8, loc="lower right" if zoom else "center right")
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)
    print(f"wrote {args.png}, {results / 'summary.md'}, {results / 'summary.json'}")


if __name__ == "__main__":
    main()
