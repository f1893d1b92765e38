"""Decision Diffuser's sampler, the refinement's temperature and dropout proposals, on the bundled data.

The study behind docs/results.md, "Decision Diffuser's sampler: td against DD on the same network" and "Proposals
worth optimizing". One set of checkpoints per dataset, trained with the critic on (--preset cpu --use-critic), and
every planner scored on the same networks:

    python scripts/optimizer_study.py train               # 3 seeds x 2 datasets, --use-critic, 2 jobs of 1 thread
    python scripts/optimizer_study.py select              # episode seeds 100+: choose td's alpha and the proposals' k
    python scripts/optimizer_study.py report              # episode seeds 1000+: the reported scores
    python scripts/optimizer_study.py timing              # ms per decision, one process, nothing else running
    python scripts/optimizer_study.py guidance            # rms(eps_c - eps_u) on real windows, per seed and t
    python scripts/optimizer_study.py summary             # the tables (markdown) from results/optimizer/*.json
    python scripts/optimizer_study.py select --dry-run    # print the commands only

Each evaluation is one `python plan.py ... --json results/optimizer/<env>_s<seed>_<name>.json`; a JSON that exists
is not run again, so an interrupted stage continues where it stopped. The settings chosen on seeds 100+ (td's alpha,
the proposals' k) are read back from the select stage's JSON by `report`, never typed in.
Tests: python -m pytest test_all.py -k optimizer_study
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import sources  # noqa: E402  (the reference scores, written down once)

OUT = ROOT / "results" / "optimizer"
HCMR, HOPPER = "halfcheetah-medium-replay-sb3", "hopper-medium-sb3"
SEEDS = (0, 1, 2)
ALPHAS = (0.0, 0.5, 1.0)      # td's temperature, chosen at k = 1 and k = 5 on seeds 100+
PROPOSAL_KS = (0, 1, 5, 20)  # dropout proposals, 8 candidates, the critic's argmax; k = 0 = no refinement
GUIDANCE_FROM_NOISE = (1.2, 2.0, 4.0)


def ckpt(env: str, seed: int) -> Path:
    return ROOT / "runs" / "optimizer" / f"{env}-s{seed}" / "checkpoint.pt"


def prop(n: int, k: int) -> str:
    """Flags of dropout proposals: n candidates, refined at k (k = 0: the transformer's), the critic's argmax."""
    planner = "transformer" if k == 0 else f"td --refine-steps {k}"
    return f"--planner {planner} --proposals dropout --n-candidates {n} --critic-temperature 0 --temperature 1"


def select_runs() -> dict[str, str]:
    """name -> plan.py flags, scored on episode seeds 100+ (10 episodes) to choose the defaults."""
    runs = {f"td_k{k}_a{a:g}": f"--planner td --refine-steps {k} --temperature {a}" for k in (1, 5) for a in ALPHAS}
    runs.update({f"prop8_k{k}": prop(8, k) for k in PROPOSAL_KS})
    return runs


def mean_score(env: str, name: str, stage: str) -> float | None:
    """The mean over training seeds of one run's mean score; None until every seed has its JSON."""
    scores = [load(env, s, name, stage) for s in SEEDS]
    if any(r is None for r in scores):
        return None
    return statistics.mean(r["normalized_score_mean"] for r in scores)


def chosen(env: str = HCMR) -> dict:
    """The settings chosen on seeds 100+: td's alpha (best mean of k = 1 and 5) and the proposals' k."""
    alpha = {a: [mean_score(env, f"td_k{k}_a{a:g}", "select") for k in (1, 5)] for a in ALPHAS}
    k = {k: mean_score(env, f"prop8_k{k}", "select") for k in PROPOSAL_KS}
    if any(v is None for vs in alpha.values() for v in vs):
        raise SystemExit("the select stage is not complete: python scripts/optimizer_study.py select")
    # the proposals' k is None until its runs are complete: report then runs every other row first
    return {"alpha": max(ALPHAS, key=lambda a: (statistics.mean(alpha[a]), a == 1.0)),
            "proposal_k": None if None in k.values() else max(k, key=lambda kk: k[kk]),
            "alpha_scores": alpha, "proposal_scores": k}


def report_runs(env: str) -> dict[str, tuple[str, int]]:
    """name -> (plan.py flags, episodes), scored on episode seeds 1000+, at the settings chosen on seeds 100+."""
    c = chosen()
    return report_flags(env, c["alpha"], c["proposal_k"])


def report_flags(env: str, alpha: float, k: int) -> dict[str, tuple[str, int]]:
    # every setting explicit: a checkpoint's own config (or a later default) must not change what a row means
    runs = {"transformer": ("--planner transformer", 20), "td": ("--planner td --temperature 1", 20)}
    if k is not None:
        runs[f"prop32_k{k}"] = (prop(32, k), 20)
    if alpha != 1.0:
        runs[f"td_a{alpha:g}"] = (f"--planner td --temperature {alpha}", 20)
    if env == HCMR:
        if k is not None:
            runs[f"prop8_k{k}"] = (prop(8, k), 20)
        for w in GUIDANCE_FROM_NOISE:  # Decision Diffuser's sampler at its alpha = 0.5 (w = 1.2: 10 episodes a seed,
            # the larger w: 5, as the probe that asked for them), and at DDPM's alpha = 1
            runs[f"dd_a0.5_w{w:g}"] = (f"--planner diffusion --sample-temperature 0.5 --guidance {w}", 10 if w == 1.2 else 5)
    else:  # hopper: Decision Diffuser's sampler at the row's w, both temperatures
        runs["dd_a0.5_w1.2"] = ("--planner diffusion --sample-temperature 0.5 --guidance 1.2", 10)
    runs["dd_a1_w1.2"] = ("--planner diffusion --sample-temperature 1 --guidance 1.2", 10)
    return runs


def json_path(env: str, seed: int, name: str, stage: str) -> Path:
    return OUT / stage / f"{env}_s{seed}_{name}.json"


def load(env, seed, name, stage):
    p = json_path(env, seed, name, stage)
    return json.loads(p.read_text()) if p.is_file() else None


def commands(stage: str, seeds=SEEDS, envs=(HCMR, HOPPER)) -> list[str]:
    cmds = []
    envs = (HCMR,) if stage == "select" else envs
    for env in envs:
        runs = ({n: (f, 10) for n, f in select_runs().items()} if stage == "select" else report_runs(env))
        seed0 = 100 if stage == "select" else 1000
        for s in seeds:
            c = ckpt(env, s)
            for name, (flags, episodes) in runs.items():
                out = json_path(env, s, name, stage)
                if out.is_file():
                    continue
                cmds.append(f"python plan.py --fast --threads 1 --checkpoint {c.relative_to(ROOT)} {flags} --seed {seed0} "
                            f"--episodes {episodes} --batch-envs {episodes} --json {out.relative_to(ROOT)}")
    return cmds


def train_commands() -> list[str]:
    cmds = []
    for env in (HCMR, HOPPER):
        for s in SEEDS:
            if ckpt(env, s).is_file():
                continue
            cmds.append(f"python train.py --fast --env {env} --use-critic --threads 1 --eval-episodes 0 --seed {s} "
                        f"--out {ckpt(env, s).parent.relative_to(ROOT)}")
    return cmds


def run_all(cmds: list[str], jobs: int, dry: bool) -> None:
    """Run shell commands, jobs at a time (one thread each: never more processes than cores)."""
    if dry:
        print("\n".join(cmds) or "(nothing left to run)")
        return
    (ROOT / "logs").mkdir(exist_ok=True)

    def one(i_cmd):
        i, cmd = i_cmd
        t0 = time.time()
        with open(ROOT / "logs" / f"optimizer_{i}.log", "w") as log:
            rc = subprocess.run(cmd, shell=True, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
        print(f"[{'ok' if rc == 0 else f'FAILED rc={rc}'} {time.time() - t0:6.0f} s] {cmd}", flush=True)
        return rc

    with ThreadPoolExecutor(jobs) as pool:
        failed = sum(rc != 0 for rc in pool.map(one, enumerate(cmds)))
    if failed:
        raise SystemExit(f"{failed} of {len(cmds)} commands failed; see logs/optimizer_*.log")


def timing(decisions: int) -> dict:
    """ms per decision (one environment, batch 1) of every planner on seed 0's checkpoints, in one process, side by
    side. Run it with nothing else on the machine."""
    import platform
    import torch
    from bench import time_decisions
    from plan import Planner
    torch.set_num_threads(1)
    c = chosen()
    settings = {"transformer": dict(planner="transformer"), "td": dict(planner="td", temperature=1.0),
                f"td_a{c['alpha']:g}": dict(planner="td", temperature=c["alpha"]),
                f"prop32_k{c['proposal_k']}": dict(planner="td" if c["proposal_k"] else "transformer",
                                                   refine_steps=c["proposal_k"] or None, proposals="dropout",
                                                   n_candidates=32, critic_temperature=0.0, temperature=1.0),
                "dd_a0.5_w1.2": dict(planner="diffusion", sample_temperature=0.5)}
    rows = {}
    for env in (HCMR, HOPPER):
        for name, kw in settings.items():
            if env == HOPPER and name.startswith("dd"):
                continue
            planner = Planner.from_checkpoint(ckpt(env, 0), device="cpu", fast=True, **kw)
            rows[f"{env}/{name}"] = time_decisions(planner, batch=1, decisions=decisions)
            print(f"{env:32s} {name:16s} {rows[f'{env}/{name}']:8.2f} ms per decision", flush=True)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
               platform.processor())
    out = {"cpu": cpu, "threads": 1, "batch": 1, "decisions": decisions, "ms_per_decision": rows}
    (OUT / "timing.json").write_text(json.dumps(out, indent=1))
    return out


@__import__("torch").no_grad()
def guidance_signal(env: str = HCMR, n_windows: int = 512, ts=(10, 50, 90)) -> dict:
    """How much the condition changes the denoiser's prediction, per training seed: rms(eps_c - eps_u) and its ratio
    to rms(eps_c), on real windows of the data noised to timestep t, conditioned on the target the planner asks for
    (cond_target 1: the data's best discounted return). Guidance w scales exactly this gap: eps_u + w (eps_c - eps_u)."""
    import torch
    import data as D
    from config import load_checkpoint
    from plan import Planner
    torch.set_num_threads(1)
    rows = {}
    for seed in SEEDS:
        planner = Planner.from_checkpoint(ckpt(env, seed), device="cpu")
        den, cfg = planner.denoiser, planner.cfg
        run = load_checkpoint(ckpt(env, seed))["config"]
        d = D.load(env, run["dataset"] or None, rtg_scale=cfg.rtg_scale, discount=run["discount"],
                   cond_discount=run["cond_discount"], download=False)
        d.normalizer = planner.normalizer
        batch = D.WindowSampler(d, cfg.horizon).sample(n_windows, torch.Generator().manual_seed(0))
        x0 = batch["states"]                                                  # (B, H, S)
        B = x0.shape[0]
        cond = torch.full((B, 1), float(cfg.cond_target))
        torch.manual_seed(0)
        for t in ts:
            tt = torch.full((B,), t, dtype=torch.long)
            x_t = den.q_sample(x0, tt)
            x_t[:, 0] = x0[:, 0]
            eps = [den.eps_from_output(x_t, tt, den.model(x_t, tt, cond, torch.full((B,), u)))[:, 1:] for u in (1., 0.)]
            gap, size = float((eps[0] - eps[1]).pow(2).mean().sqrt()), float(eps[0].pow(2).mean().sqrt())
            rows[f"s{seed}_t{t}"] = {"rms_gap": gap, "ratio": gap / size}
            print(f"seed {seed} t {t:3d}: rms(eps_c - eps_u) {gap:.4f}, / rms(eps_c) {gap / size:.4f}", flush=True)
    (OUT / "guidance_signal.json").write_text(json.dumps(rows, indent=1))
    return rows


def fmt(vals: list[float]) -> str:
    return f"{statistics.mean(vals):.1f} ± {statistics.pstdev(vals):.1f}" if len(vals) > 1 else f"{vals[0]:.1f}"


def table(env: str, stage: str, names: list[str]) -> str:
    """One row per planner: mean ± std across training seeds of the per-seed means, the per-seed means, the
    episodes, and the ms per environment decision of the scoring run (20 environments per call)."""
    ref = sources.BUNDLED_REFERENCES.get(env, {})
    lines = [f"| planner ({env}, seeds {'100' if stage == 'select' else '1000'}+) | score | per seed | seeds x "
             f"episodes | ms per env decision (batched) |", "|---|---|---|---|---|"]
    for name in names:
        rs = [load(env, s, name, stage) for s in SEEDS]
        rs = [r for r in rs if r is not None]
        if not rs:
            continue
        scores = [r["normalized_score_mean"] for r in rs]
        ms = statistics.mean(r["ms_per_env_decision"] for r in rs)
        lines.append(f"| {name} | {fmt(scores)} | {', '.join(f'{x:.1f}' for x in scores)} | {len(rs)}x"
                     f"{rs[0]['episodes']} | {ms:.1f} |")
    lines += [f"| {k} | {v} | | | |" for k, v in ref.items()]
    return "\n".join(lines)


LABELS = {"transformer": "transformer alone", "td": "td, k = 1, alpha = 1 (the official temperature)",
          "td_a0": "td, k = 1, alpha = 0 (the default)", "dd_a0.5_w1.2": "DD's sampler (from noise, alpha = 0.5, w = 1.2)",
          "dd_a1_w1.2": "from noise, alpha = 1"}


def label(name: str) -> str:
    if name.startswith("prop"):
        n, k = name[4:].split("_k")
        return f"dropout proposals: {n} candidates, k = {k}, critic"
    if name.startswith("td_a") and name not in LABELS:
        return f"td, alpha = {name[4:]}"
    if name.startswith("dd_a0.5_w") and name != "dd_a0.5_w1.2":
        return f"DD's sampler, w = {name[9:]}"  # alpha = 0.5
    return LABELS.get(name, name)


def plot(png: Path) -> None:
    """One panel per dataset: each planner's score per training seed (dots) and mean (bar) on seeds 1000+, the
    data's references as lines, and the ms per decision (batch 1, timing.json) in the label where measured."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    timing_ms = (json.loads((OUT / "timing.json").read_text())["ms_per_decision"]
                 if (OUT / "timing.json").is_file() else {})
    envs = [e for e in (HCMR, HOPPER) if load(e, 0, "td", "report")]
    fig, axes = plt.subplots(1, len(envs), figsize=(7 * len(envs), 4.6), squeeze=False)
    for ax, env in zip(axes[0], envs):
        names = [n for n in report_runs(env) if any(load(env, s, n, "report") for s in SEEDS)]
        for i, name in enumerate(names):
            scores = [r["normalized_score_mean"] for r in (load(env, s, name, "report") for s in SEEDS) if r]
            ax.barh(i, statistics.mean(scores), color="C0" if name.startswith(("td", "prop")) else
                    "C1" if name.startswith("dd") else "C7", alpha=0.6)
            ax.plot(scores, [i] * len(scores), "k.", ms=6)
            ms = timing_ms.get(f"{env}/{name}")
            ax.text(0.5, i, f"{statistics.mean(scores):.1f}" + (f"  ({ms:.0f} ms)" if ms else ""), va="center",
                    fontsize=8)
        ax.set_yticks(range(len(names)), [label(n) for n in names], fontsize=8)
        ax.invert_yaxis()
        for j, (ref, v) in enumerate(sources.BUNDLED_REFERENCES.get(env, {}).items()):
            ax.axvline(v, color=f"C{j + 2}", ls="--", lw=1, label=f"{ref} {v}")
        ax.set_xlabel("D4RL normalized score (episode seeds 1000+; dots: training seeds)")
        n_seeds = max(sum(bool(load(env, s, n, "report")) for s in SEEDS) for n in names)
        ax.set_title(f"{env} ({n_seeds} training seed{'s' if n_seeds > 1 else ''})", fontsize=10)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    print(f"wrote {png}")


def summary() -> str:
    parts = ["## select (episode seeds 100+)", table(HCMR, "select", list(select_runs()))]
    try:
        c = chosen()
        parts.append(f"chosen: td alpha = {c['alpha']:g}, proposals k = {c['proposal_k']}")
        for env in (HCMR, HOPPER):
            parts += [f"## report: {env} (episode seeds 1000+)", table(env, "report", list(report_runs(env)))]
    except SystemExit as e:
        parts.append(str(e))
    if (OUT / "timing.json").is_file():
        t = json.loads((OUT / "timing.json").read_text())
        parts.append(f"## ms per decision, batch 1, 1 thread ({t['cpu']})")
        parts += [f"- {k}: {v:.2f} ms" for k, v in t["ms_per_decision"].items()]
    text = "\n\n".join(parts) + "\n"
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "summary.md").write_text(text)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("stage", choices=["train", "select", "report", "timing", "guidance", "summary"])
    p.add_argument("--jobs", type=int, default=2, help="processes at a time, one thread each (default 2 = the cores)")
    p.add_argument("--dry-run", action="store_true", help="print the commands that are still to run, run none")
    p.add_argument("--decisions", type=int, default=200, help="timing: decisions timed per planner")
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="select/report: only these training seeds")
    p.add_argument("--envs", default=f"{HCMR},{HOPPER}", help="report: only these datasets")
    args = p.parse_args(argv)
    (OUT / "select").mkdir(parents=True, exist_ok=True)
    (OUT / "report").mkdir(parents=True, exist_ok=True)
    if args.stage == "train":
        run_all(train_commands(), args.jobs, args.dry_run)
    elif args.stage in ("select", "report"):
        run_all(commands(args.stage, [int(s) for s in args.seeds.split(",")], args.envs.split(",")), args.jobs,
                args.dry_run)
    elif args.stage == "timing":
        timing(args.decisions)
    elif args.stage == "guidance":
        guidance_signal()
    elif args.stage == "summary" and load(HCMR, 0, "td", "report"):
        plot(ROOT / "docs" / "optimizer.png")
    print(summary() if args.stage != "train" or args.dry_run is False else "", end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
