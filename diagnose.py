"""Look at a trained checkpoint: what its denoiser learned, one episode on video, and the planning-only copy
that ships. The benchmark and the k x w sweep are bench.py's; evaluating a checkpoint is plan.py's.

    python diagnose.py --checkpoint RUN/checkpoint.pt --diagnose diagnose.png [--ks 1,2,5,10,20,40]
    python diagnose.py --checkpoint RUN/checkpoint.pt --video cheetah.gif     # or .mp4, or a .png strip of 6 frames
    python diagnose.py --checkpoint RUN/checkpoint.pt --export checkpoints/NAME/checkpoint.pt   # planning-only copy

Tests: python -m pytest test_all.py -k "diagnose or video or export"
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import matplotlib
import numpy as np
import torch

import data as D
from data import UsageError
import sources
from machine import atomic_write, pick_device, set_matmul_precision, set_threads, use_compile, use_cuda_graphs
from config import load_checkpoint, planning_copy
from plan import Planner, add_planner_flags, planner_from_args

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


# ----------------------------------------------------------------------------------------------------
# The denoiser diagnostic
# ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def diagnose(ckpt_path, png: str, device: str = "cpu", n_windows: int = 512, seed: int = 0,
             ks=(1, 2, 5, 10, 20, 40), targets=(0.5, 1.0)) -> dict:
    """What the denoiser has learned, measured on real windows of the checkpoint's own dataset.

    - eps-MSE per timestep t, of the model (conditioned on the window's own return) and of the trivial
      predictor eps_hat = sqrt(1 - ab_t) x_t, which is nearly exact at high noise: a net that cannot beat it
      there cannot start a chain from pure noise;
    - the guidance signal per t: rms(eps_c - eps_u) / rms(eps_c). Near 0, guidance has nothing to amplify;
    - the plan error against the data's own future states versus k: the transformer's rollout (k = 0), refined
      k steps, and sampled from pure noise (k = T), for the first planned step s_1 (what inverse dynamics reads)
      and all H - 1 future states, plus the plans' rms and how often the from-noise x_0 clamp binds;
    - the target effect: rms change of the plan when the condition moves between `targets`, same noise.
    Writes png and the same numbers as JSON beside it (png with .json)."""
    planner = Planner.from_checkpoint(ckpt_path, device=device)
    cfg, den, dev = planner.cfg, planner.denoiser, planner.device
    run = load_checkpoint(ckpt_path)["config"]  # the training settings: the data file, discounts, scales
    data = D.load(cfg.env, run["dataset"] or None, rtg_scale=cfg.rtg_scale, discount=run["discount"],
                  cond_discount=run["cond_discount"], download=False)
    data.normalizer = planner.normalizer  # the checkpoint's statistics, not a refit
    C, H, T = cfg.context, cfg.horizon, den.n_timesteps
    g = torch.Generator().manual_seed(seed)
    batch = D.WindowSampler(data, C + H - 1, device=dev).sample(4 * n_windows, g)
    full = batch["mask"].bool().all(1).nonzero().flatten()[:n_windows]  # windows with no padding
    hist_s, hist_r = batch["states"][full, :C], batch["rtg"][full, :C]  # (B, C, S), (B, C, 1)
    x0 = batch["states"][full, C - 1:]                                   # (B, H, S): now and H - 1 future states
    cond = batch["cond_rtg"][full, C - 1] / run["cond_scale"]              # (B, 1) the window's own condition
    B = x0.shape[0]
    ones, zeros = torch.ones(B, device=dev), torch.zeros(B, device=dev)
    torch.manual_seed(seed)
    per_t = {"t": [], "eps_mse_model": [], "eps_mse_uncond": [], "eps_mse_trivial": [], "cond_gap_ratio": [],
             "cond_gap_ratio_x0": []}
    for t in range(T):
        tt = torch.full((B,), t, device=dev, dtype=torch.long)
        noise = torch.randn_like(x0)
        x_t = den.q_sample(x0, tt, noise)
        x_t[:, 0] = x0[:, 0]  # inpainted, as in training
        out_c, out_u = den.model(x_t, tt, cond, ones), den.model(x_t, tt, cond, zeros)
        eps_c, eps_u = den.eps_from_output(x_t, tt, out_c), den.eps_from_output(x_t, tt, out_u)
        x0_c, x0_u = den.predict_x0(x_t, tt, out_c), den.predict_x0(x_t, tt, out_u)
        trivial = den.sqrt_one_minus_alphas_cumprod[t].float() * x_t

        def mse(e):
            return float(((e - noise)[:, 1:] ** 2).mean())
        per_t["t"].append(t)
        per_t["eps_mse_model"].append(mse(eps_c))
        per_t["eps_mse_uncond"].append(mse(eps_u))
        per_t["eps_mse_trivial"].append(mse(trivial))
        per_t["cond_gap_ratio"].append(float((eps_c - eps_u)[:, 1:].pow(2).mean().sqrt()
                                             / eps_c[:, 1:].pow(2).mean().sqrt()))
        per_t["cond_gap_ratio_x0"].append(float((x0_c - x0_u)[:, 1:].pow(2).mean().sqrt()
                                                / x0_c[:, 1:].pow(2).mean().sqrt()))
    future, _ = planner.transformer.rollout(hist_s, hist_r, H - 1)       # (B, H-1, S)
    tf_plan = torch.cat([x0[:, :1], future], dim=1)                      # (B, H, S)

    def plan_error(x, k):
        return {"k": k, "s1_mse": float(((x[:, 1] - x0[:, 1]) ** 2).mean()),
                "plan_mse": float(((x[:, 1:] - x0[:, 1:]) ** 2).mean()),
                "plan_rms": float(x[:, 1:].pow(2).mean().sqrt())}
    plans = [plan_error(tf_plan, 0)]
    for k in ks:
        if k < T:
            torch.manual_seed(seed)
            plans.append(plan_error(den.refine(tf_plan, k, cond, planner.w, add_noise=cfg.refine_noise,
                                                 temperature=cfg.temperature), k))
    torch.manual_seed(seed)
    alpha = cfg.sample_temperature  # from noise at the baseline's temperature (Decision Diffuser: 0.5)
    plans.append(plan_error(den.sample(x0[:, 0], cond, planner.w, temperature=alpha), T))
    clamped, den.clip_denoised = den.clip_denoised, False  # the chain without the x_0 clamp: is it needed?
    torch.manual_seed(seed)
    no_clamp = plan_error(den.sample(x0[:, 0], cond, planner.w, temperature=alpha), T)
    # how often the x_0 clamp binds at the first from-noise step (t = T - 1)
    x_T = alpha * torch.randn_like(x0)
    x_T[:, 0] = x0[:, 0]
    tT = torch.full((B,), T - 1, device=dev, dtype=torch.long)
    raw = den.predict_x0(x_T, tT, den.guided_output(x_T, tT, cond, planner.w))
    den.clip_denoised = clamped
    clamp_frac = float(((raw < den.x_low) | (raw > den.x_high))[:, 1:].float().mean())
    effect = {}
    for name, k in (("refine", max(planner.k, 1)), ("sample", T)):
        outs = []
        for c in targets:
            torch.manual_seed(seed)
            cc = torch.full((B, 1), float(c), device=dev)
            outs.append(den.sample(x0[:, 0], cc, planner.w, temperature=alpha) if k >= T else
                        den.refine(tf_plan, k, cc, planner.w, temperature=cfg.temperature))
        effect[f"{name}_k{k}"] = float((outs[-1] - outs[0])[:, 1:].pow(2).mean().sqrt())
    hi = [i for i in per_t["t"] if i >= int(0.9 * T)]
    summary = {
        "checkpoint": str(ckpt_path), "env": cfg.env, "windows": B, "guidance": planner.w, "T": T,
        "data_rms": float(x0[:, 1:].pow(2).mean().sqrt()),
        "eps_mse_model_t_ge_90pct": float(np.mean([per_t["eps_mse_model"][i] for i in hi])),
        "eps_mse_trivial_t_ge_90pct": float(np.mean([per_t["eps_mse_trivial"][i] for i in hi])),
        "cond_gap_ratio_mean": float(np.mean(per_t["cond_gap_ratio"])),
        "cond_gap_ratio_x0_mean": float(np.mean(per_t["cond_gap_ratio_x0"])),
        "x0_clamp_binds_at_T": clamp_frac, "from_noise_without_clamp": no_clamp,
        "target_effect_rms": effect, "targets": list(targets),
    }
    print(json.dumps(summary, indent=1))
    for r in plans:
        print(f"  k={r['k']:4d}  s1 MSE {r['s1_mse']:.4f}  plan MSE {r['plan_mse']:.4f}  plan rms {r['plan_rms']:.3f}")
    result = {"summary": summary, "per_t": per_t, "plan_error_vs_k": plans}
    Path(png).with_suffix(".json").write_text(json.dumps(result, indent=1))
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    ax[0].plot(per_t["t"], per_t["eps_mse_model"], label="model (conditional)")
    ax[0].plot(per_t["t"], per_t["eps_mse_uncond"], label="model (unconditional)", alpha=0.6)
    ax[0].plot(per_t["t"], per_t["eps_mse_trivial"], "--", label="trivial: sqrt(1-ab_t) x_t")
    ax[0].set_yscale("log"), ax[0].set_xlabel("timestep t"), ax[0].set_title("eps-MSE on real windows")
    ax[1].plot(per_t["t"], per_t["cond_gap_ratio"], label="rms(eps_c - eps_u) / rms(eps_c)")
    ax[1].plot(per_t["t"], per_t["cond_gap_ratio_x0"], label="rms(x0_c - x0_u) / rms(x0_c)")
    ax[1].set_xlabel("timestep t"), ax[1].set_title("guidance signal: conditional vs unconditional"), ax[1].legend()
    ks_ = [max(r["k"], 0.5) for r in plans]
    ax[2].plot(ks_, [r["s1_mse"] for r in plans], "o-", label="s1 (inverse dynamics input)")
    ax[2].plot(ks_, [r["plan_mse"] for r in plans], "s-", label="all H-1 future states")
    ax[2].set_xscale("log"), ax[2].set_yscale("log"), ax[2].set_xlabel("k (0.5 = transformer alone; T = from noise)")
    ax[2].set_title("plan error vs the data's future"), ax[2].legend()
    ax[0].legend()
    fig.suptitle(f"{cfg.env}: {Path(ckpt_path)}")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    print(f"wrote {png} and {Path(png).with_suffix('.json')}")
    return result


# ----------------------------------------------------------------------------------------------------
# Video
# ----------------------------------------------------------------------------------------------------
def render_video(planner: Planner, env_name: str, path: str, seed: int, max_steps: int) -> None:
    """One episode rendered offscreen (MUJOCO_GL=egl works headless) to a GIF or MP4 via imageio, or to a
    PNG strip of six frames."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    try:
        import imageio.v2 as imageio
    except ImportError:
        raise UsageError("--video needs imageio: pip install imageio (and imageio-ffmpeg for .mp4)") from None
    env = D.make_env(env_name, seed=seed, render_mode="rgb_array", legacy_dynamics=planner.cfg.legacy_dynamics)
    obs, _ = env.reset(seed=seed)
    renderer, model = getattr(env.unwrapped, "mujoco_renderer", None), getattr(env.unwrapped, "model", None)
    if renderer is not None and model is not None:  # follow the body with the model's tracking camera, if any
        import mujoco
        cam = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, "track")
        if cam >= 0:
            renderer.camera_id, renderer.camera_name = cam, None
    planner.reset(1)
    frames, reward, ret = [], None, 0.0
    for _ in range(max_steps):
        frames.append(env.render())
        obs, reward, term, trunc, _ = env.step(planner.act(obs, reward))
        ret += reward
        if term or trunc:
            break
    env.close()
    if path.endswith(".png"):  # a strip of 6 evenly spaced frames, every other pixel, for a README
        picks = np.linspace(0, len(frames) - 1, 6).astype(int)
        imageio.imwrite(path, np.concatenate([frames[i][::2, ::2] for i in picks], axis=1))
    else:
        imageio.mimsave(path, frames, **({"duration": 1000 / 30, "loop": 0} if path.endswith(".gif") else {"fps": 30}))
    print(f"wrote {path}: {len(frames)} frames, return {ret:.1f}, "
          f"normalized {float(sources.normalized_score(env_name, ret)):.1f}")


# ----------------------------------------------------------------------------------------------------
# The planning-only copy
# ----------------------------------------------------------------------------------------------------
def export_for_planning(src, dst) -> Path:
    """config.planning_copy of the checkpoint src, written to dst."""
    slim = planning_copy(load_checkpoint(src))
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(dst, lambda fh: torch.save(slim, fh))
    return dst


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="diagnose.py",
                                description="Diagnose the denoiser of, film, or export a Trajectory Diffuser checkpoint.",
                                epilog="The speed benchmark and the k x w sweep: python bench.py --help")
    add_planner_flags(p)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--diagnose", default=None, metavar="PNG",
                      help="measure the denoiser on real windows (eps-MSE and guidance signal per t, plan error "
                           "per k); writes PNG and a .json beside it")
    what.add_argument("--video", default=None, help="render one episode to .gif/.mp4 (or a .png strip of 6 frames)")
    what.add_argument("--export", default=None, metavar="DST",
                      help="write a planning-only copy of the checkpoint (no optimizer or raw denoiser) to DST")
    p.add_argument("--ks", default="1,2,5,10,20", help="--diagnose: the k values of the plan error")
    p.add_argument("--seed", type=int, default=100, help="--video: the episode's env seed")
    p.add_argument("--video-steps", type=int, default=300, help="--video: steps rendered")
    p.add_argument("--cuda-graph", action="store_true", help="--video: replay each decision as a CUDA graph (CUDA)")
    p.add_argument("--compile", action="store_true", help="--video: torch.compile the rollout and the U-Net")
    args = p.parse_args(argv)
    return D.run_cli(lambda: run(args), args.debug)


def run(args) -> None:
    set_threads(args.threads)
    set_matmul_precision(pick_device(args.device), args.reduced_precision, onednn=False)
    if args.export:
        print(f"wrote {export_for_planning(args.checkpoint, args.export)}")
    elif args.diagnose:
        diagnose(args.checkpoint, args.diagnose, device=args.device, ks=[int(k) for k in args.ks.split(",") if k])
    else:
        planner = planner_from_args(args)
        if args.compile:
            use_compile(planner)
        if args.cuda_graph:
            use_cuda_graphs(planner)
        render_video(planner, planner.cfg.env, args.video, args.seed, args.video_steps)


if __name__ == "__main__":
    sys.exit(main())
