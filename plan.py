"""Plan with a trained Trajectory Diffuser: the Planner (paper Alg. 1) and its evaluation.

One decision (paper Sec. 4, Fig. 2), for B environments x N candidates planned as one batch:
  1. the transformer rolls out H-1 future states from the last C (state, return-to-go) tokens (KV cache);
  2. the EMA denoiser refines that plan: noise it to level k, denoise k steps with guidance w;
  3. inverse dynamics turns the first two planned states (s_t, s_t+1) into a_t, clamped to the bounds;
  4. with N > 1 candidates the critic's softmax picks one plan per environment.
--planner transformer skips step 2 (k = 0); --planner diffusion replaces 1-2 by all T denoising steps from
pure noise (the Decision Diffuser baseline on the same network). After each step the target return drops
by r / rtg_scale, floored at rtg_floor of its start (official).

The checkpoint is the contract between training and planning: it holds each network's constructor arguments
(`model_args`), its weights, the normalizer and the settings. config.py rebuilds the networks from it; this file
never imports train.py (train.py imports this file, to evaluate).

    python plan.py --checkpoint RUN/checkpoint.pt --episodes 10 [--planner td|transformer|diffusion] [--json r.json]
    python bench.py --help     # the speed benchmark, the k x w sweep, the denoiser diagnostic, videos

B = environments, N = candidates, C = context, H = horizon, S = state dim, A = action dim.
Tests: python -m pytest test_all.py -k plan
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import data as D
from config import PlanConfig, build_networks, load_checkpoint
from data import UsageError
from inverse_dynamics import select_candidate
from fast import apply as use_fast_paths
from machine import pick_device, set_matmul_precision, set_threads
import sources

PROPOSALS = ("mean", "dropout")  # how the transformer proposes candidates (PlanConfig.proposals)

# ----------------------------------------------------------------------------------------------------
# The planner
# ----------------------------------------------------------------------------------------------------
class Planner:
    """Turns observations into actions: reset(n_envs), then act(obs, reward) once per environment step.
    The history of (state, return-to-go) tokens lives on the device; decide() is the algorithm."""

    def __init__(self, cfg: PlanConfig, nets: dict, normalizer, device="cpu", planner: str = "td"):
        if planner not in ("td", "transformer", "diffusion"):
            raise UsageError(f"unknown planner {planner!r}; choose td, transformer or diffusion")
        self.cfg, self.device, self.planner = cfg, torch.device(device), planner
        self.transformer, self.denoiser, self.invdyn = nets["transformer"], nets["ema"], nets["invdyn"]
        self.critic = nets.get("critic")
        for net in (self.transformer, self.denoiser, self.invdyn, self.critic):
            if isinstance(net, nn.Module):
                net.eval()
        self.normalizer = normalizer
        T = self.denoiser.n_timesteps
        # k is fixed by the planner: cfg.refine_steps (td), 0 (no refinement) or T (everything from noise)
        self.k = {"td": cfg.refine_steps, "transformer": 0, "diffusion": T}[planner]
        if not 0 <= self.k <= T:
            raise UsageError(f"--refine-steps {self.k} is outside 0..{T} (the diffusion steps T)")
        self.w, self.N, self.target = cfg.guidance, cfg.n_candidates, cfg.target_return
        if self.N > 1 and self.critic is None:
            raise UsageError(f"{self.N} candidates need the critic, but this checkpoint has none "
                             f"(trained with --no-use-critic); use --n-candidates 1")
        if cfg.proposals not in PROPOSALS:
            raise UsageError(f"unknown proposals {cfg.proposals!r}; choose {' or '.join(PROPOSALS)}")
        if cfg.temperature < 0 or cfg.sample_temperature < 0:
            raise UsageError(f"temperatures must be >= 0, got {cfg.temperature} and {cfg.sample_temperature}")
        self.set_bounds(-1.0, 1.0)
        self.reset(1)

    @classmethod
    def from_checkpoint(cls, path, device: str = "auto", planner: str = "td", fast: bool = False,
                        **settings) -> "Planner":
        """settings: PlanConfig fields that replace the checkpoint's (None = keep it), e.g. refine_steps=1.
        fast: swap in fast.py's CPU modules (the same functions, not bit-equal)."""
        dev = pick_device(device)
        ckpt = load_checkpoint(path, map_location=dev)
        known = {f.name for f in dataclasses.fields(PlanConfig)}
        bad = set(settings) - known
        if bad:
            raise UsageError(f"unknown planning setting(s) {sorted(bad)}; known: {sorted(known)}")
        cfg = PlanConfig(**{k: v for k, v in ckpt["config"].items() if k in known})
        cfg = dataclasses.replace(cfg, **{k: v for k, v in settings.items() if v is not None})
        nets = build_networks(ckpt["model_args"])
        for name, net in nets.items():
            if name in ckpt["models"]:  # an export for planning keeps the EMA denoiser, not the raw one
                net.load_state_dict(ckpt["models"][name], strict=True)
            net.to(dev)
            if fast:
                use_fast_paths(net)
        return cls(cfg, nets, D.Normalizer.from_state_dict(ckpt["normalizer"]), dev, planner)

    def set_bounds(self, low, high) -> None:
        """The action bounds executed actions are clamped to (the environment's action space)."""
        low = torch.as_tensor(np.asarray(low, dtype=np.float32))
        high = torch.as_tensor(np.asarray(high, dtype=np.float32))
        if bool((low > high).any()):
            raise UsageError("action bounds must satisfy low <= high")
        self.low, self.high = low.to(self.device), high.to(self.device)

    def reset(self, n_envs: int = 1) -> None:
        """Start n_envs new episodes: empty history, target return back to its start."""
        C, S = self.cfg.context, self.normalizer.mean.shape[-1]
        self.t = 0
        self.hist_s = torch.zeros(n_envs, C, S, device=self.device)  # (B, C, S) normalized states
        self.hist_r = torch.zeros(n_envs, C, 1, device=self.device)  # (B, C, 1) scaled returns-to-go
        self.R0 = self.target / self.cfg.rtg_scale
        self.R = torch.full((n_envs, 1), self.R0, device=self.device)  # (B, 1) current target
        # DEVIATION: the floor is R0 - (1 - rtg_floor) |R0|, which is the official R0 * rtg_floor for R0 >= 0; for a
        # negative target (data whose returns are negative) R0 * rtg_floor lies above R0 and would raise the target
        self.R_floor = self.R0 - (1.0 - self.cfg.rtg_floor) * abs(self.R0)

    @torch.no_grad()
    def act(self, obs, reward=None) -> np.ndarray:
        """obs (S,) or (B, S); reward: the rewards received since the previous call (None on the first).
        Returns the action(s), within the environment's bounds, shaped like obs."""
        single = np.ndim(obs) == 1
        obs = np.atleast_2d(np.asarray(obs, dtype=np.float32))
        if obs.shape[0] != self.hist_s.shape[0]:
            self.reset(obs.shape[0])
        if reward is not None:  # official: R <- max(R - r / scale, R0 * floor)
            r = torch.as_tensor(np.atleast_1d(reward), dtype=torch.float32, device=self.device)[:, None]
            self.R = torch.clamp(self.R - r / self.cfg.rtg_scale, min=self.R_floor)
        s = self.normalizer.normalize(torch.as_tensor(obs, device=self.device))  # (B, S)
        C = self.cfg.context
        if self.t >= C:  # the history is full: slide it one token left; positions stay 0..C-1
            self.hist_s = torch.roll(self.hist_s, -1, dims=1)
            self.hist_r = torch.roll(self.hist_r, -1, dims=1)
        i = min(self.t, C - 1)
        self.hist_s[:, i], self.hist_r[:, i] = s, self.R
        self.t += 1
        a = self.decide(self.hist_s[:, : i + 1], self.hist_r[:, : i + 1])
        a = a.float().cpu().numpy()
        return a[0] if single else a

    @torch.no_grad()
    def decide(self, hist_s: torch.Tensor, hist_r: torch.Tensor) -> torch.Tensor:
        """Alg. 1. hist_s (B, c, S), hist_r (B, c, 1), the last entry being now -> actions (B, A) on the device."""
        B, N, H = hist_s.shape[0], self.N, self.cfg.horizon
        s0 = hist_s[:, -1].repeat_interleave(N, 0)                          # (B*N, S) the current states
        # the denoiser's condition: a fixed discounted return (cfg.cond_target), or the current target R (official)
        cond = (torch.full((B * N, 1), float(self.cfg.cond_target), device=hist_s.device) if self.cfg.cond_target
                else hist_r[:, -1].repeat_interleave(N, 0))                 # (B*N, 1)
        w = self.w.repeat_interleave(N, 0) if torch.is_tensor(self.w) else self.w  # a (B,1,1) w in k x w sweeps
        if self.planner == "diffusion":                                     # (B*N, H, S), all T steps from noise
            x = self.denoiser.sample(s0, cond, w, temperature=self.cfg.sample_temperature)
        else:
            # 1. the transformer's plan. In eval mode the rollout is deterministic, so it runs once per environment
            # and the N candidates differ only by the refinement's noise (the official code rolls out N identical
            # copies). proposals="dropout" rolls out N plans with dropout on, N different plans.
            if self.cfg.proposals == "dropout":
                self.transformer.train()                                    # dropout on: a sample, not the mean
                future, _ = self.transformer.rollout(hist_s.repeat_interleave(N, 0), hist_r.repeat_interleave(N, 0),
                                                     H - 1)                 # (B*N, H-1, S)
                self.transformer.eval()
                x = torch.cat([s0[:, None], future], dim=1)                 # (B*N, H, S)
            else:
                future, _ = self.transformer.rollout(hist_s, hist_r, H - 1)  # (B, H-1, S)
                x = torch.cat([hist_s[:, -1:], future], dim=1).repeat_interleave(N, 0)  # (B*N, H, S)
            # 2. the diffusion optimizer: noise to level k, denoise k guided steps
            if self.k > 0:
                x = self.denoiser.refine(x, self.k, cond, w, add_noise=self.cfg.refine_noise,
                                         temperature=self.cfg.temperature)
        # 3. inverse dynamics on the first planned transition, clamped to the action space (DEVIATION: see
        # inverse_dynamics.InverseDynamics; the official code clamps in its training loss, not here)
        a = torch.clamp(self.invdyn(x[:, 0], x[:, 1]), self.low, self.high)  # (B*N, A)
        if N > 1:  # 4. the critic's softmax picks one candidate per environment
            q = self.critic(x[:, 0], a).view(B, N)                          # (B*N,) -> (B, N)
            idx = select_candidate(q, self.cfg.critic_temperature)          # (B,)
            a = a.view(B, N, -1)[torch.arange(B, device=a.device), idx]     # (B, N, A) -> (B, A)
        return a

    def calls_per_decision(self) -> int:
        """Sequential network calls in one decision: the transformer's prefill plus H-2 cached steps,
        k (or T) denoiser calls, inverse dynamics, and the critic when N > 1."""
        H = self.cfg.horizon
        core = self.denoiser.n_timesteps if self.planner == "diffusion" else (H - 1) + self.k
        return core + 1 + (1 if self.N > 1 else 0)


# ----------------------------------------------------------------------------------------------------
# Evaluation: B environments in lockstep, one batched planner call per step
# ----------------------------------------------------------------------------------------------------
def evaluate(planner: Planner, env_name: str, episodes: int, seed: int = 100, batch_envs: int = 10,
             progress: bool = True, seeds=None) -> dict:
    """Episode i resets with env seed seed + i (or seeds[i]); batch_envs episodes are planned together.
    An environment that terminates stops being stepped; its later actions and rewards are dropped.
    The diffusion noise and the candidate choice come from torch's generator seeded with `seed`, on a fork of
    its state: the caller's stream (a training run's noise and dropout) continues as if nothing had drawn."""
    with torch.random.fork_rng(devices=[planner.device] if planner.device.type == "cuda" else []):
        torch.manual_seed(seed)
        return _evaluate(planner, env_name, episodes, seed, batch_envs, progress, seeds)


def _evaluate(planner, env_name, episodes, seed, batch_envs, progress, seeds) -> dict:
    from tqdm import tqdm

    returns, plan_s, calls, decisions = [], 0.0, 0, 0
    info = sources.get_info(env_name)
    bar = tqdm(total=episodes * info.max_episode_steps, desc=f"eval {planner.planner}", disable=not progress,
               dynamic_ncols=True, unit="step")
    for start in range(0, episodes, batch_envs):
        n = min(batch_envs, episodes - start)
        ep_seeds = [seed + start + i if seeds is None else seeds[start + i] for i in range(n)]
        envs = [D.make_env(env_name, seed=sd, legacy_dynamics=planner.cfg.legacy_dynamics) for sd in ep_seeds]
        obs = np.stack([e.reset(seed=sd)[0] for e, sd in zip(envs, ep_seeds)])
        planner.set_bounds(envs[0].action_space.low, envs[0].action_space.high)
        planner.reset(n)
        ret, done, reward = np.zeros(n), np.zeros(n, bool), None
        while not done.all():
            t0 = time.perf_counter()
            actions = planner.act(obs, reward)
            plan_s += time.perf_counter() - t0
            active = int((~done).sum())
            calls, decisions = calls + 1, decisions + active
            reward = np.zeros(n)
            for i, env in enumerate(envs):
                if done[i]:
                    continue  # a finished episode keeps its last observation and is not stepped
                obs[i], reward[i], term, trunc, _ = env.step(actions[i])
                ret[i] += reward[i]
                done[i] = term or trunc
            bar.update(active)
        for env in envs:
            env.close()
        returns.extend(ret.tolist())
    bar.close()
    scored = sources.has_reference_scores(env_name)  # a Minari dataset without reference returns is scored raw only
    scores = [float(sources.normalized_score(env_name, r)) if scored else None for r in returns]
    return {"env": env_name, "planner": planner.planner, "episodes": episodes, "k": planner.k,
            "guidance": planner.w, "candidates": planner.N, "refine_noise": planner.cfg.refine_noise,
            "temperature": (planner.cfg.sample_temperature if planner.planner == "diffusion" else
                            planner.cfg.temperature), "proposals": planner.cfg.proposals,
            "critic_temperature": planner.cfg.critic_temperature,
            "target_return": planner.target, "legacy_dynamics": planner.cfg.legacy_dynamics,
            "return_mean": float(np.mean(returns)), "return_std": float(np.std(returns)),
            "normalized_score_mean": float(np.mean(scores)) if scored else None,
            "normalized_score_std": float(np.std(scores)) if scored else None,
            # one call plans every active environment: its latency, and that time shared among them
            "ms_per_call": 1000.0 * plan_s / max(1, calls), "ms_per_env_decision": 1000.0 * plan_s / max(1, decisions),
            "batch_envs": batch_envs, "returns": returns, "normalized_scores": scores}


def format_result(r: dict) -> str:
    score = ("no normalized score (no reference returns)" if r["normalized_score_mean"] is None else
             f"normalized score {r['normalized_score_mean']:.1f} ± {r['normalized_score_std']:.1f}")
    return (f"{r['env']} planner={r['planner']} k={r['k']} episodes={r['episodes']}: return "
            f"{r['return_mean']:.1f} ± {r['return_std']:.1f}, {score}, "
            f"{r['ms_per_call']:.2f} ms per call of up to {r['batch_envs']} environments "
            f"({r['ms_per_env_decision']:.2f} ms per environment)")


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------
def add_planner_flags(p: argparse.ArgumentParser) -> None:
    """The flags that pick a checkpoint and change its planning settings; they keep PlanConfig's names."""
    p.add_argument("--checkpoint", required=True, help="RUN/checkpoint.pt written by train.py")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|mps")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = the available cores")
    p.add_argument("--planner", default="td", choices=["td", "transformer", "diffusion"])
    for f in dataclasses.fields(PlanConfig):
        if f.name in ("env", "horizon", "context", "rtg_scale"):
            continue  # fixed by the trained networks
        flag, help_text = "--" + f.name.replace("_", "-"), f"{f.metadata['help']}; default: the checkpoint's"
        if f.type in ("bool", bool):
            p.add_argument(flag, default=None, action=argparse.BooleanOptionalAction, help=help_text)
        elif f.name == "proposals":
            p.add_argument(flag, default=None, choices=PROPOSALS, help=help_text)
        else:
            p.add_argument(flag, default=None, type={"int": int, "float": float}[str(f.type)], help=help_text)
    p.add_argument("--reduced-precision", action="store_true",
                   help="opt-in: bf16 inside oneDNN's CPU products where the CPU has bf16 units, TF32 on CUDA "
                        "(default: strict fp32; machine.set_matmul_precision)")
    p.add_argument("--fast", action=argparse.BooleanOptionalAction, default=False,
                   help="opt-in CPU speed paths (fast.py): the same functions as the plain modules, not bit-equal")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")


def planner_from_args(args, planner: str | None = None) -> Planner:
    known = {f.name for f in dataclasses.fields(PlanConfig)}
    settings = {k: v for k, v in vars(args).items() if k in known}
    return Planner.from_checkpoint(args.checkpoint, device=args.device, planner=planner or args.planner,
                                   fast=args.fast, **settings)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Evaluate a Trajectory Diffuser checkpoint.",
                                epilog="The speed benchmark, the k x w sweep, the denoiser diagnostic and videos: "
                                       "python bench.py --help")
    add_planner_flags(p)
    p.add_argument("--episodes", type=int, default=10, help="evaluation episodes")
    p.add_argument("--seed", type=int, default=100, help="episode i uses env seed seed + i")
    p.add_argument("--batch-envs", type=int, default=10, help="environments planned together per call")
    p.add_argument("--json", default=None, help="write the result as JSON here")
    args, rest = p.parse_known_args(argv)
    moved = [a for a in rest if a.split("=")[0] in ("--benchmark", "--sweep-k", "--diagnose", "--video",
                                                    "--cuda-graph", "--compile")]
    if moved:
        p.error(f"{moved[0].split('=')[0]} moved to bench.py: python bench.py {' '.join(argv or sys.argv[1:])}")
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    return D.run_cli(lambda: evaluate_cli(args), args.debug)


def evaluate_cli(args, prepare=None) -> None:
    """Evaluate the checkpoint args name; prepare(planner), if given, wraps it first (bench.py: compile, graphs)."""
    set_threads(args.threads)
    print("matmul:", set_matmul_precision(pick_device(args.device), args.reduced_precision, onednn=False))
    planner = planner_from_args(args)
    if prepare is not None:
        prepare(planner)
    res = evaluate(planner, planner.cfg.env, args.episodes, args.seed, args.batch_envs)
    for i, (r, s) in enumerate(zip(res["returns"], res["normalized_scores"])):
        print(f"  episode {i} (seed {args.seed + i}): return {r:9.1f}  normalized "
              + ("   n/a" if s is None else f"{s:6.1f}"))
    print(format_result(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
