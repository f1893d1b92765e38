"""Refinement at work: the Transformer's plan, the plan refined from level k, and the future the data recorded.

    python scripts/reproduce/plot_refinement.py --checkpoint checkpoints/halfcheetah-medium-sb3/checkpoint.pt --png docs/refinement.png

For one recorded episode of the checkpoint's own dataset and a few decision points t, the Transformer reads
the episode's recorded history (the last C states and returns-to-go up to t), rolls out H - 1 states, and the
denoiser refines that plan (noise to level k, k guided denoising steps, as Planner.decide does). Each panel
shows one state dimension: the recorded history, the recorded next H - 1 states, the Transformer's plan and the
refined plans (mean over noise draws, with the 10-90% band of the draws).

The numbers behind the picture go to a JSON file beside the PNG: over many random dataset windows, the mean
squared error (normalized state units) of each plan against the recorded future, per k, for
  - "own": the denoiser conditioned on the window's own discounted return-to-go (as diagnose.py --diagnose does);
  - "planner": conditioned on the planner's fixed target cfg.cond_target (what Planner.decide uses);
plus the error of the action inverse dynamics reads off each plan against the recorded action.
The windows come from the data the checkpoint was trained on: this measures fit, not generalization.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import matplotlib  # noqa: E402

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import data as D  # noqa: E402
from plan import Planner, load_checkpoint  # noqa: E402

# halfcheetah observation layout: qpos[1:] (8 values) then qvel (9 values)
HALFCHEETAH_DIMS = {0: "root height z (m)", 1: "root angle (rad)", 8: "forward velocity (m/s)"}


def load_setup(ckpt_path, device="cpu"):
    """The planner, its dataset (normalized with the checkpoint's statistics) and the training config."""
    planner = Planner.from_checkpoint(ckpt_path, device=device)
    run = load_checkpoint(ckpt_path)["config"]  # the training settings: the data file, discounts, scales
    cfg = planner.cfg
    data = D.load(cfg.env, run["dataset"] or None, rtg_scale=cfg.rtg_scale, discount=run["discount"],
                  cond_discount=run["cond_discount"], download=False)
    data.normalizer = planner.normalizer  # the checkpoint's statistics, not a refit
    return planner, data, run


@torch.no_grad()
def plans_for(planner, hist_s, hist_r, cond, ks, draws, seed=0):
    """hist_s (B, c, S), hist_r (B, c, 1), cond (B, 1) -> {k: (draws, B, H, S)} normalized plans; k = 0 is the
    Transformer's plan (deterministic, one draw), k = T is sampling from noise (Decision Diffuser baseline)."""
    den, H, w = planner.denoiser, planner.cfg.horizon, planner.w
    future, _ = planner.transformer.rollout(hist_s, hist_r, H - 1)            # (B, H-1, S)
    tf_plan = torch.cat([hist_s[:, -1:], future], dim=1)                      # (B, H, S)
    B = tf_plan.shape[0]
    out = {0: tf_plan[None]}
    for k in ks:
        if k == 0:
            continue
        torch.manual_seed(seed + k)
        x = tf_plan.repeat(draws, 1, 1)                                        # (draws*B, H, S)
        c = cond.repeat(draws, 1)
        if k >= den.n_timesteps:
            y = den.sample(x[:, 0], c, w)
        else:
            y = den.refine(x, k, c, w, add_noise=planner.cfg.refine_noise)
        out[k] = y.view(draws, B, H, -1)
    return out


@torch.no_grad()
def window_errors(planner, data, run, n_windows=200, ks=(0, 1, 2, 5, 10, 20, 100), draws=4, seed=0) -> dict:
    """Per-k errors of the plans against the recorded future over n_windows random full dataset windows."""
    cfg, dev = planner.cfg, planner.device
    C, H = cfg.context, cfg.horizon
    g = torch.Generator().manual_seed(seed)
    batch = D.WindowSampler(data, C + H - 1, device=dev).sample(4 * n_windows, g)
    full = batch["mask"].bool().all(1).nonzero().flatten()[:n_windows]       # windows with no padding
    hist_s, hist_r = batch["states"][full, :C], batch["rtg"][full, :C]       # (B, C, S), (B, C, 1)
    true = batch["states"][full, C - 1:]                                       # (B, H, S): now and the next H-1
    true_a = batch["actions"][full, C - 1]                                     # (B, A): the action taken now
    B = true.shape[0]
    conds = {"own": batch["cond_rtg"][full, C - 1] / run["cond_scale"],      # (B, 1) the window's own condition
             "planner": torch.full((B, 1), float(cfg.cond_target), device=dev)}

    def action(x):  # x (..., H, S) -> the clamped action inverse dynamics reads off the first transition
        return torch.clamp(planner.invdyn(x[..., 0, :], x[..., 1, :]), planner.low, planner.high)

    result = {"windows": B, "draws_per_window": draws, "ks": list(ks), "T": planner.denoiser.n_timesteps,
              "guidance": planner.w, "refine_noise": cfg.refine_noise, "units": "normalized state units",
              "action_mse_true_next_state": float((action(true) - true_a).pow(2).mean())}
    for name, cond in conds.items():
        plans = plans_for(planner, hist_s, hist_r, cond, ks, draws, seed)
        rows = []
        base = (plans[0][:, :, 1:] - true[None, :, 1:]).pow(2).mean((0, 2, 3))  # (B,) the Transformer's error
        for k in ks:
            x = plans[k]                                                       # (draws, B, H, S)
            per_window = (x[:, :, 1:] - true[None, :, 1:]).pow(2).mean((0, 2, 3))  # (B,)
            diff = per_window - base                                           # paired: same windows
            rows.append({
                "k": k,
                "plan_mse": float(per_window.mean()),
                "plan_mse_sem": float(per_window.std() / B ** 0.5),
                "plan_mse_minus_transformer": float(diff.mean()),
                "plan_mse_minus_transformer_sem": float(diff.std() / B ** 0.5),
                "windows_improved_frac": float((diff < 0).float().mean()),
                "s1_mse": float((x[:, :, 1] - true[None, :, 1]).pow(2).mean()),
                "last_state_mse": float((x[:, :, -1] - true[None, :, -1]).pow(2).mean()),
                "action_mse": float((action(x) - true_a[None]).pow(2).mean()),
                "move_from_transformer_rms": float((x[:, :, 1:] - plans[0][:, :, 1:]).pow(2).mean().sqrt()),
            })
        result[name] = rows
    return result


def pick_episode(data) -> int:
    """The full-length episode whose return is the median of the full-length ones (deterministic)."""
    full = np.flatnonzero(data.episode_lengths == data.episode_lengths.max())
    order = full[np.argsort(data.episode_returns[full])]
    return int(order[len(order) // 2])


@torch.no_grad()
def plot_refinement(ckpt_path, png, n_windows=200, draws_plot=32, points=(100, 450, 800), ks_plot=(1, 5),
                    dims=None, device="cpu", seed=0) -> dict:
    """Writes png (the decision points of one episode, plus plan error vs k) and png with .json (the numbers)."""
    planner, data, run = load_setup(ckpt_path, device)
    cfg, dev, norm = planner.cfg, planner.device, planner.normalizer
    C, H = cfg.context, cfg.horizon
    dims = dims or (HALFCHEETAH_DIMS if data.info.obs_dim == 17 and "halfcheetah" in cfg.env else
                    {0: "state dim 0", 1: "state dim 1", 2: "state dim 2"})
    numbers = window_errors(planner, data, run, n_windows=n_windows, seed=seed)
    ep = pick_episode(data)
    start, length = int(data.episode_starts[ep]), int(data.episode_lengths[ep])
    points = [p for p in points if C - 1 <= p <= length - H]
    obs = torch.as_tensor(data.observations[start:start + length], device=dev)  # (n, S) raw
    states = norm.normalize(obs)
    rtg = torch.as_tensor(data.rtg[start:start + length], device=dev)[:, None]
    cond_all = torch.as_tensor(data.cond_rtg[start:start + length], device=dev)[:, None] / run["cond_scale"]

    colors = {0: "tab:blue", 1: "tab:orange", 5: "tab:green", 2: "tab:purple", 10: "tab:red"}
    fig = plt.figure(figsize=(17, 9))
    grid = fig.add_gridspec(len(dims), len(points) + 1, width_ratios=[1] * len(points) + [1.15],
                            wspace=0.3, hspace=0.35)
    window_mse = {}
    for j, p in enumerate(points):
        hs, hr = states[p - C + 1: p + 1][None], rtg[p - C + 1: p + 1][None]  # (1, C, S), (1, C, 1)
        plans = plans_for(planner, hs, hr, cond_all[p: p + 1], (0,) + tuple(ks_plot), draws_plot, seed)
        raw = {k: norm.unnormalize(v[:, 0]).cpu().numpy() for k, v in plans.items()}  # (draws, H, S) raw
        true = obs[p: p + H].cpu().numpy()                                     # (H, S) raw
        tn = states[p: p + H]
        window_mse[p] = {k: float((v[:, 0, 1:] - tn[None, 1:]).pow(2).mean()) for k, v in plans.items()}
        past = obs[p - C + 1: p + 1].cpu().numpy()
        t_past, t_fut = np.arange(p - C + 1, p + 1), np.arange(p, p + H)
        for i, (d, label) in enumerate(dims.items()):
            ax = fig.add_subplot(grid[i, j])
            ax.plot(t_past, past[:, d], color="0.6", lw=1.5, label="recorded history (Transformer input)")
            ax.plot(t_fut, true[:, d], "k-o", ms=3.5, lw=2, label="recorded future (truth)")
            ax.plot(t_fut, raw[0][0, :, d], "--s", color=colors[0], ms=3.5, lw=1.5, label="Transformer plan (k = 0)")
            for k in ks_plot:
                y = raw[k][:, :, d]                                            # (draws, H)
                ax.plot(t_fut, y.mean(0), "-", color=colors.get(k, "tab:gray"), lw=1.5,
                        label=f"refined, k = {k} (mean of {draws_plot} draws; band 10-90%)")
                ax.fill_between(t_fut, np.percentile(y, 10, 0), np.percentile(y, 90, 0),
                                color=colors.get(k, "tab:gray"), alpha=0.18, lw=0)
            ax.axvline(p, color="0.8", lw=0.8, zorder=0)
            if i == 0:
                mse_txt = ", ".join(f"k={k}: {m:.2f}" for k, m in window_mse[p].items())
                ax.set_title(f"decision at t = {p}\nplan MSE {mse_txt}", fontsize=9)
            if j == 0:
                ax.set_ylabel(label)
            if i == len(dims) - 1:
                ax.set_xlabel("environment step")
            ax.tick_params(labelsize=8)
            ax.grid(alpha=0.3)

    # right column: the error over many windows, per k (condition: the window's own return; the planner's fixed
    # target gives the same numbers to within a few thousandths, in the JSON)
    ax = fig.add_subplot(grid[:, -1])
    rows = numbers["own"]
    kx = [max(r["k"], 0.5) for r in rows]
    ax.errorbar(kx, [r["plan_mse"] for r in rows], yerr=[r["plan_mse_sem"] for r in rows], fmt="o-", capsize=3,
                ms=4, color="tab:blue", label=f"plan, all {H - 1} future states")
    ax.plot(kx, [r["s1_mse"] for r in rows], "s-", ms=4, color="tab:orange", label="plan, first state s(t+1)")
    ax.plot(kx, [r["action_mse"] for r in rows], "^-", ms=4, color="tab:purple",
            label="action read off the plan (vs recorded action)")
    ax.axhline(numbers["action_mse_true_next_state"], color="tab:purple", ls=":", lw=1,
               label="action read off the TRUE next state")
    ax.set_xscale("log")
    ax.set_xticks(kx, [("TF" if r["k"] == 0 else str(r["k"])) for r in rows])
    ax.set_xlabel(f"refinement level k\n(TF = Transformer alone; {numbers['T']} = from pure noise)")
    by_k = {r["k"]: r for r in rows}
    note = "\n".join(f"k = {k}: plan moves {by_k[k]['move_from_transformer_rms']:.3f} rms,\n"
                     f"   MSE {by_k[k]['plan_mse_minus_transformer']:+.4f} ± {by_k[k]['plan_mse_minus_transformer_sem']:.4f}"
                     f" vs TF (paired)" for k in ks_plot if k in by_k)
    ax.text(0.03, 0.78, note, transform=ax.transAxes, fontsize=8, va="top", family="monospace",
            bbox=dict(boxstyle="round", fc="white", ec="0.7"))
    ax.set_ylabel("MSE vs the recorded data (normalized units)")
    ax.set_title(f"error over {numbers['windows']} dataset windows x {numbers['draws_per_window']} noise draws\n"
                 f"(condition: each window's own return; bars: standard error)", fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)

    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9, frameon=False)
    fig.suptitle(f"{cfg.env}: the Transformer's plan, refined from level k, against the recorded future "
                 f"(dataset episode {ep}, H = {H}, C = {C}, guidance w = {planner.w})", fontsize=12)
    fig.subplots_adjust(left=0.05, right=0.985, top=0.88, bottom=0.13)
    png = pathlib.Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)

    numbers.update(checkpoint=str(ckpt_path), env=cfg.env, episode=ep, decision_points=points,
                   window_mse_at_decision_points={str(p): {str(k): m for k, m in v.items()} for p, v in window_mse.items()})
    png.with_suffix(".json").write_text(json.dumps(numbers, indent=1))
    return numbers


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=str(ROOT / "checkpoints/halfcheetah-medium-sb3/checkpoint.pt"))
    p.add_argument("--png", default=str(ROOT / "docs/refinement.png"))
    p.add_argument("--windows", type=int, default=200, help="dataset windows for the error numbers")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = plot_refinement(args.checkpoint, args.png, n_windows=args.windows, seed=args.seed)
    print(f"{res['env']}: {res['windows']} windows x {res['draws_per_window']} draws, MSE vs the recorded future "
          f"(normalized units); action MSE with the true next state: {res['action_mse_true_next_state']:.4f}")
    for name in ("own", "planner"):
        print(f"  condition = {name}")
        for r in res[name]:
            print(f"    k={r['k']:4d}  plan MSE {r['plan_mse']:.4f} ± {r['plan_mse_sem']:.4f}  s1 MSE {r['s1_mse']:.4f}"
                  f"  action MSE {r['action_mse']:.4f}  moved {r['move_from_transformer_rms']:.3f} rms  minus TF "
                  f"{r['plan_mse_minus_transformer']:+.4f} ± {r['plan_mse_minus_transformer_sem']:.4f} "
                  f"(better in {100 * r['windows_improved_frac']:.0f}% of windows)")
    print(f"wrote {args.png} and {pathlib.Path(args.png).with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
