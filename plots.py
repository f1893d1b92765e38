"""Pictures written by the commands: a run's training curves (train.py writes RUN/curves.png) and the k x w
sweep's score-against-latency plot (bench.py --sweep-k --plot). Files only, no display.
Tests: python -m pytest test_all.py -k "curves or sweep"
"""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(metrics_path: Path, png: Path) -> None:
    """Losses and evaluation score over steps, from metrics.jsonl."""
    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    train_rows = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval" in r and r["eval"]["normalized_score_mean"] is not None]  # None: no references
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in (train_rows[0]["loss"] if train_rows else {}):
        axes[0].plot([r["step"] for r in train_rows], [r["loss"][name] for r in train_rows], label=name)
    axes[0].set_yscale("log"), axes[0].set_xlabel("step"), axes[0].set_title("training losses"), axes[0].legend()
    if evals:
        axes[1].errorbar([r["step"] for r in evals], [r["eval"]["normalized_score_mean"] for r in evals],
                         yerr=[r["eval"]["normalized_score_std"] for r in evals], marker="o", capsize=3)
    axes[1].set_xlabel("step"), axes[1].set_ylabel("D4RL normalized score"), axes[1].set_title("evaluation")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def plot_sweep(results: list, png: str) -> None:
    """Score against batch-1 latency, one curve per guidance weight w (labels: k), from bench.sweep_k's rows; the
    transformer alone and diffusion from noise as single points."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for w in sorted({r["guidance"] for r in results if r["planner"] == "td"}):
        td = [r for r in results if r["planner"] == "td" and r["guidance"] == w]
        ax.errorbar([r["ms_benchmark"] for r in td], [r["normalized_score_mean"] for r in td],
                    yerr=[r["normalized_score_std"] / max(1, len(r["returns"])) ** 0.5 for r in td],
                    marker="o", capsize=3, label=f"td, w={w:g}")
        for r in td:
            ax.annotate(f"{r['k']}", (r["ms_benchmark"], r["normalized_score_mean"]), textcoords="offset points",
                        xytext=(3, 3), fontsize=7)
    for r in results:
        if r["planner"] != "td":
            ax.errorbar([r["ms_benchmark"]], [r["normalized_score_mean"]],
                        yerr=[r["normalized_score_std"] / max(1, len(r["returns"])) ** 0.5],
                        marker="s" if r["planner"] == "transformer" else "^", capsize=3, linestyle="none",
                        label=f"{r['planner']} (k={r['k']})")
    ax.set_xscale("log"), ax.set_xlabel("ms per decision (batch 1)"), ax.set_ylabel("D4RL normalized score")
    ax.set_title(f"{results[0]['env']}: score vs latency (labels: k; bars: standard error)", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    print(f"wrote {png}")
