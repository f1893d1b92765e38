"""The ladder's table and picture, from the JSON scripts/reproduce/ladder.sh writes into results/ladder/.

    python scripts/reproduce/plot_ladder.py --results results/ladder --png docs/ladder.png --into docs/results.md

For every rung and planner: the mean score of each training seed, then the mean and std across seeds. Prints a
markdown table and what each rung moved against the one before it, measured against the spread across seeds
(also written to results/ladder/summary.md and into the marked blocks of the --into pages), and draws one group
of bars per rung (transformer alone, td at the rung's k and w, diffusion from noise), with the data's mean, its
best source and BC as lines.
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
import sources  # noqa: E402

RUNGS = {
    0: "official (--method official)",
    1: "+ causal mask",
    2: "+ data fixes (episodes, padding, one normalizer)",
    3: "+ noise before refining",
    4: "+ a denoiser that generates from noise",
    5: "+ discounted, fixed-target condition",
    6: "ours (k = 1, w = 1.2, 1 candidate, the rest)",
}
SHORT = {0: "official", 1: "+causal", 2: "+data", 3: "+noise", 4: "+denoiser", 5: "+condition", 6: "ours"}
PLANNERS = {"transformer": "transformer alone", "td": "td (rung's k, w)", "diffusion": "diffusion from noise"}
REFERENCE = sources.BUNDLED_REFERENCES["halfcheetah-medium-replay-sb3"]  # the ladder's file (ladder.sh ENV)


def collect(results: Path) -> dict:
    """{(rung, planner): {seed: result}}"""
    out = defaultdict(dict)
    for f in glob.glob(str(results / "r*_s*_*.json")):
        m = re.match(r"r(\d+)_s(\d+)_(\w+)\.json$", Path(f).name)
        if m:
            out[(int(m.group(1)), m.group(3))][int(m.group(2))] = json.loads(Path(f).read_text())
    if (2, "transformer") in out and (3, "td") in out:  # rung 3 plans with rung 2's checkpoints: the same
        out[(3, "transformer")] = out[(2, "transformer")]  # transformer (noise is a setting of refinement only)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default="results/ladder")
    p.add_argument("--png", default="docs/ladder.png")
    p.add_argument("--into", nargs="*", default=["docs/results.md"],
                   help="pages whose <!-- ladder: scores|moves --> ... <!-- /ladder --> blocks get the tables")
    args = p.parse_args()
    results = Path(args.results)
    data = collect(results)
    rungs = sorted({r for r, _ in data})
    lines = ["| rung | k, w, candidates | " + " | ".join(PLANNERS.values()) + " | td - transformer, same checkpoints |",
             "|---|---|" + "---|" * (len(PLANNERS) + 1)]
    summary = {}
    for r in rungs:
        cells, setting = [], ""
        for planner in PLANNERS:
            runs = dict(sorted(data.get((r, planner), {}).items()))  # by training seed
            if not runs:
                cells.append("n/a" if planner == "diffusion" and r < 4 else "not run")
                continue
            means = np.array([v["normalized_score_mean"] for v in runs.values()])
            eps = sorted({v["episodes"] for v in runs.values()})
            summary[f"{r}/{planner}"] = {"mean": float(means.mean()), "std": float(means.std()), "seeds": sorted(runs),
                                         "per_seed": [float(x) for x in means], "episodes_per_seed": eps,
                                         # failed episodes: below 30 (on the ladder, 90% of the others score 37 to 41)
                                         "episodes_below_30": int(sum((np.array(v["normalized_scores"]) < 30).sum()
                                                                      for v in runs.values())),
                                         "episodes": int(sum(len(v["normalized_scores"]) for v in runs.values()))}
            # from noise: its temperature alpha (runs scored before the setting existed sampled at alpha = 1)
            alpha = ("" if planner != "diffusion" else
                     ", α = " + "/".join(sorted({f"{v.get('temperature', 1.0):g}" for v in runs.values()})))
            cells.append(f"{means.mean():.1f} ± {means.std():.1f} ({len(runs)}x{'/'.join(map(str, eps))}{alpha})")
            if planner == "td":
                v = next(iter(runs.values()))
                setting = f"k = {v['k']}, w = {v['guidance']}, {v['candidates']}"
        # the optimizer's own gain: td and the transformer alone plan from the same checkpoint on the same
        # episode seeds, so their difference is paired per training seed
        tf = data.get((r, "transformer"), {}); td = data.get((r, "td"), {})
        paired = np.array([td[k]["normalized_score_mean"] - tf[k]["normalized_score_mean"] for k in sorted(td) if k in tf])
        if len(paired):
            summary[f"{r}/td-transformer"] = {"mean": float(paired.mean()), "std": float(paired.std()),
                                              "per_seed": [float(x) for x in paired]}
        cells.append(f"{paired.mean():+.1f} ± {paired.std():.1f}" if len(paired) else "")
        lines.append(f"| ({r}) {RUNGS[r]} | {setting} | " + " | ".join(cells) + " |")
    lines += [f"| {k} | | " + " | ".join(f"{v:.1f}" for _ in PLANNERS) + " | |" for k, v in REFERENCE.items()]
    blocks = {"scores": "\n".join(lines)}
    lines += ["", "What each rung moved (difference of the means across seeds against the larger std across seeds of the",
              "two rungs; 'beyond' = more than twice that spread):", "",
              "| rung | against | " + " | ".join(PLANNERS.values()) + " |", "|---|---|" + "---|" * len(PLANNERS)]
    for prev, r in zip(rungs, rungs[1:]):
        cells = []
        for planner in PLANNERS:
            a, b = summary.get(f"{prev}/{planner}"), summary.get(f"{r}/{planner}")
            if not a or not b:
                cells.append("")
                continue
            if r == 3 and planner == "transformer":
                cells.append("(rung 2's checkpoints)")
                continue
            delta, spread = b["mean"] - a["mean"], max(a["std"], b["std"])
            if min(len(a["seeds"]), len(b["seeds"])) < 2:
                verdict = "one seed: no spread"
            else:
                verdict = "beyond" if abs(delta) > 2 * spread else "within"
            summary[f"{r}-{prev}/{planner}"] = {"delta": delta, "spread": spread, "verdict": verdict}
            cells.append(f"{delta:+.1f} (spread {spread:.1f}, {verdict})")
        lines.append(f"| ({r}) {SHORT[r]} | ({prev}) {SHORT[prev]} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    blocks["moves"] = "\n".join(lines[len(blocks["scores"].splitlines()) + 4:])  # the second table alone
    print(text)
    (results / "summary.md").write_text(text + "\n")
    (results / "summary.json").write_text(json.dumps(summary, indent=1))
    for page in args.into:  # the tables between <!-- ladder: NAME --> and <!-- /ladder --> are rewritten
        page = Path(page)
        new = re.sub(r"(<!-- ladder: (\w+) -->\n)(?:.*?\n)?(<!-- /ladder -->)",
                     lambda m: m.group(1) + blocks[m.group(2)] + "\n" + m.group(3), page.read_text(), flags=re.S)
        page.write_text(new)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    # left: every rung on the full scale; right: the rungs whose transformer works, zoomed, without diffusion
    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(14, 4.8),
                                   gridspec_kw={"width_ratios": [3, 2]})
    working = [r for r in rungs if summary.get(f"{r}/transformer", {}).get("mean", 0) > 20]
    colors = dict(zip(PLANNERS, ("tab:blue", "tab:orange", "tab:green")))

    def bars(ax, rungs, planners):
        width = 0.8 / len(planners)
        for i, planner in enumerate(planners):
            shown = [r for r in rungs if summary.get(f"{r}/{planner}")]
            xs = [rungs.index(r) + (i - (len(planners) - 1) / 2) * width for r in shown]
            ax.bar(xs, [summary[f"{r}/{planner}"]["mean"] for r in shown], width, color=colors[planner],
                   yerr=[summary[f"{r}/{planner}"]["std"] for r in shown], capsize=3, label=PLANNERS[planner])
            for x, r in zip(xs, shown):
                per = summary[f"{r}/{planner}"]["per_seed"]
                ax.plot([x] * len(per), per, "k.", markersize=3)
        ax.set_xticks(range(len(rungs)), [f"({r}) {SHORT[r]}" for r in rungs], fontsize=8, rotation=20)

    bars(ax, rungs, list(PLANNERS))
    bars(zoom, working, ["transformer", "td"])
    lo = min(min(summary[f"{r}/{p}"]["per_seed"]) for r in working for p in ("transformer", "td")
             if f"{r}/{p}" in summary) if working else 30
    zoom.set_ylim(np.floor(lo) - 1, 41.5)
    for a in (ax, zoom):
        bottom, top = a.get_ylim()
        for (name, v), style in zip(REFERENCE.items(), (":", "--", "-.")):
            if bottom <= v <= top:
                a.axhline(v, color="gray", linestyle=style, linewidth=1)
                a.annotate(f"{name} {v:.1f}", (1.0, v), xycoords=("axes fraction", "data"), fontsize=8,
                           ha="right", va="bottom", color="gray")
    zoom.set_title("zoomed: the rungs whose transformer works", fontsize=9)
    ax.set_ylabel("D4RL normalized score (episode seeds 1000+)")
    n_seeds = max(len(v["seeds"]) for v in summary.values() if "seeds" in v)
    ax.set_title("halfcheetah-medium-replay-sb3, --preset cpu: from the published method to ours\n"
                 f"(bars: mean ± std over training seeds, at most {n_seeds}; dots: each seed)", fontsize=9)
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=3, bbox_to_anchor=(0.5, -0.06))
    fig.savefig(args.png, dpi=100, bbox_inches="tight")
    print(f"wrote {args.png}, {results / 'summary.md'}, {results / 'summary.json'}")


if __name__ == "__main__":
    main()
