"""Plan with a trained Trajectory Diffuser: evaluation, the k sweep, the speed benchmark and videos.

One decision (paper Sec. 4, Fig. 2), for B environments x N candidates planned as one batch:
  1. the transformer rolls out H-1 future states from the last C (state, return-to-go) tokens (KV cache);
  2. the EMA denoiser refines that plan: noise it to level k, denoise k steps with guidance w;
  3. inverse dynamics turns the first two planned states (s_t, s_t+1) into a_t, clamped to the bounds;
  4. with N > 1 candidates the critic's softmax picks one plan per environment.
--planner transformer skips step 2 (k = 0); --planner diffusion replaces 1-2 by all T denoising steps from
pure noise (the Decision Diffuser baseline on the same network). After each step the target return drops
by r / rtg_scale, floored at rtg_floor of its start (official).

    python plan.py --checkpoint RUN/checkpoint.pt --episodes 10 [--planner td|transformer|diffusion] [--json r.json]
    python plan.py --checkpoint RUN/checkpoint.pt --benchmark [--device cuda] [--json b.json]
    python plan.py --checkpoint RUN/checkpoint.pt --sweep-k --episodes 10 --plot docs/k_sweep.png
    python plan.py --checkpoint RUN/checkpoint.pt --video cheetah.gif

B = environments, N = candidates, C = context, H = horizon, S = state dim, A = action dim.
Tests: python -m pytest test_all.py -k plan
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

import train as T
from inverse_dynamics import clamp_action, select_candidate


# ----------------------------------------------------------------------------------------------------
# The planner
# ----------------------------------------------------------------------------------------------------
class Planner:
    """Turns observations into actions. Everything it needs comes from a checkpoint; the history of
    (state, return-to-go) tokens lives on the device, so a decision copies only the new observation in."""

    def __init__(self, cfg: T.Config, models: dict, normalizer, device, dims: dict, planner: str = "td",
                 refine_steps: int | None = None, guidance: float | None = None,
                 n_candidates: int | None = None, target_return: float | None = None, env_bounds=None):
        if planner not in ("td", "transformer", "diffusion"):
            raise T.UsageError(f"unknown planner {planner!r}; choose td, transformer or diffusion")
        self.cfg, self.device, self.planner = cfg, torch.device(device), planner
        self.transformer, self.denoiser = models["transformer"].eval(), models["ema"].eval()
        self.invdyn, self.critic = models["invdyn"].eval(), models.get("critic")
        if self.critic is not None:
            self.critic.eval()
        self.normalizer = normalizer
        self.S, self.A = dims["state_dim"], dims["action_dim"]
        self.k = cfg.refine_steps if refine_steps is None else refine_steps
        if planner != "td":  # k is fixed by the planner: 0 (no refinement) or T (everything from noise)
            self.k = 0 if planner == "transformer" else cfg.n_timesteps
        if not 0 <= self.k <= cfg.n_timesteps:
            raise T.UsageError(f"--refine-steps {self.k} is outside 0..{cfg.n_timesteps} (the diffusion steps T)")
        self.w = cfg.guidance if guidance is None else guidance
        self.N = cfg.n_candidates if n_candidates is None else n_candidates
        if self.N > 1 and self.critic is None:
            raise T.UsageError(f"{self.N} candidates need the critic, but this checkpoint has none "
                               f"(trained with --no-use-critic); use --candidates 1")
        self.target = cfg.target_return if target_return is None else target_return
        self.set_bounds(*(env_bounds if env_bounds is not None else (-1.0, 1.0)))
        self.reset(1)

    def set_bounds(self, low, high) -> None:
        """The action bounds executed actions are clamped to; checked on the host, then kept on the device."""
        low = torch.as_tensor(np.asarray(low, dtype=np.float32))
        high = torch.as_tensor(np.asarray(high, dtype=np.float32))
        if bool((low > high).any()):
            raise T.UsageError("action bounds must satisfy low <= high")
        self.low, self.high = low.to(self.device), high.to(self.device)

    @classmethod
    def from_checkpoint(cls, path, device: str = "auto", **kwargs) -> "Planner":
        import data as D
        dev = T.pick_device(device)
        ckpt = T.load_checkpoint(path, map_location=dev)
        cfg = T.config_from_checkpoint(ckpt)
        models = T.build_models(cfg, ckpt["dims"]["state_dim"], ckpt["dims"]["action_dim"])
        for k, m in models.items():
            if k == "diffusion" and k not in ckpt["models"]:
                continue  # an export for planning keeps only the EMA denoiser, the one planning uses
            m.load_state_dict(ckpt["models"][k], strict=True)
            m.to(dev)
        normalizer = D.Normalizer.from_state_dict(ckpt["normalizer"])
        return cls(cfg, models, normalizer, dev, ckpt["dims"], **kwargs)

    def reset(self, n_envs: int = 1) -> None:
        """Start n_envs new episodes: empty history, target return back to its start."""
        C = self.cfg.context
        self.t = 0
        self.hist_s = torch.zeros(n_envs, C, self.S, device=self.device)  # (B, C, S) normalized states
        self.hist_r = torch.zeros(n_envs, C, 1, device=self.device)       # (B, C, 1) scaled returns-to-go
        self.R0 = self.target / self.cfg.rtg_scale
        self.R = torch.full((n_envs, 1), self.R0, device=self.device)      # (B, 1) current target

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
            self.R = torch.clamp(self.R - r / self.cfg.rtg_scale, min=self.R0 * self.cfg.rtg_floor)
        s = self.normalizer.normalize(torch.as_tensor(obs, device=self.device))  # (B, S)
        C = self.cfg.context
        if self.t >= C:  # slide the history one token left; positions stay 0..C-1
            self.hist_s = torch.roll(self.hist_s, -1, dims=1)
            self.hist_r = torch.roll(self.hist_r, -1, dims=1)
        i = min(self.t, C - 1)
        self.hist_s[:, i], self.hist_r[:, i] = s, self.R
        self.t += 1
        a = self.decide(self.hist_s[:, : i + 1], self.hist_r[:, : i + 1])
        a = a.float().cpu().numpy()
        return a[0] if single else a

    def enable_compile(self) -> None:
        """torch.compile the two hot paths (the transformer rollout and the U-Net), so that inductor fuses
        their many small elementwise kernels; combine with enable_cuda_graphs to replay the fused kernels.
        Only the planner's copies are wrapped; checkpoints and the hand-written code are unchanged."""
        self.transformer.rollout = torch.compile(self.transformer.rollout, dynamic=False)
        self.denoiser.model.forward = torch.compile(self.denoiser.model.forward, dynamic=False)

    def enable_cuda_graphs(self) -> None:
        """Capture each fixed-shape decision (one per batch size and history length c) as a CUDA graph and
        replay it. A decision is a dozen sequential network calls but over a thousand small kernels, so on
        a GPU the launch overhead dominates; replay removes it. The captured code is the same eager code."""
        if self.device.type != "cuda":
            raise T.UsageError("--cuda-graph needs a CUDA device")
        self._graphs = {}

    @torch.no_grad()
    def decide(self, hist_s: torch.Tensor, hist_r: torch.Tensor) -> torch.Tensor:
        """hist_s (B, c, S), hist_r (B, c, 1), the last entry being now -> actions (B, A) on the device."""
        graphs = getattr(self, "_graphs", None)
        if graphs is None:
            return self._decide(hist_s, hist_r)
        key = tuple(hist_s.shape)
        if key not in graphs:
            static_s, static_r = hist_s.clone(), hist_r.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm up outside the graph (allocator, lazy init)
                for _ in range(2):
                    self._decide(static_s, static_r)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self._decide(static_s, static_r)
            graphs[key] = (graph, static_s, static_r, static_out)
        graph, static_s, static_r, static_out = graphs[key]
        static_s.copy_(hist_s)
        static_r.copy_(hist_r)
        graph.replay()
        return static_out.clone()

    @torch.no_grad()
    def _decide(self, hist_s: torch.Tensor, hist_r: torch.Tensor) -> torch.Tensor:
        B, N, H = hist_s.shape[0], self.N, self.cfg.horizon
        hs = hist_s.repeat_interleave(N, 0)               # (B, c, S) -> (B*N, c, S)
        hr = hist_r.repeat_interleave(N, 0)               # (B, c, 1) -> (B*N, c, 1)
        s0, R = hs[:, -1], hr[:, -1]                      # (B*N, S), (B*N, 1)
        if self.planner == "diffusion":
            x = self.denoiser.sample(s0, R, self.w)       # (B*N, H, S), all T steps from noise
        else:
            future, _ = self.transformer.rollout(hs, hr, H - 1)          # (B*N, H-1, S)
            x = torch.cat([s0[:, None], future], dim=1)                  # (B*N, H, S)
            if self.k > 0:
                x = self.denoiser.refine(x, self.k, R, self.w, add_noise=self.cfg.refine_noise)
        a = clamp_action(self.invdyn(x[:, 0], x[:, 1]), self.low, self.high)  # (B*N, A)
        if N > 1:
            q = self.critic(x[:, 0], a).view(B, N)                       # (B*N,) -> (B, N)
            idx = select_candidate(q, self.cfg.critic_temperature)       # (B,)
            a = a.view(B, N, -1)[torch.arange(B, device=a.device), idx]  # (B, N, A) -> (B, A)
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
             progress: bool = True) -> dict:
    import data as D
    from tqdm import tqdm

    torch.manual_seed(seed)  # the diffusion noise and the candidate choice
    returns, plan_s, decisions = [], 0.0, 0
    info = D.get_info(env_name)
    bar = tqdm(total=episodes * info.max_episode_steps, desc=f"eval {planner.planner}", disable=not progress,
               dynamic_ncols=True, unit="step")
    for start in range(0, episodes, batch_envs):
        n = min(batch_envs, episodes - start)
        # the simulator the checkpoint's config resolved (legacy dynamics for D4RL's locomotion names)
        envs = [D.make_env(env_name, seed=seed + start + i, legacy_dynamics=planner.cfg.legacy_dynamics)
                for i in range(n)]
        obs = np.stack([e.reset(seed=seed + start + i)[0] for i, e in enumerate(envs)])
        planner.set_bounds(envs[0].action_space.low, envs[0].action_space.high)
        planner.reset(n)
        ret, done, reward = np.zeros(n), np.zeros(n, bool), None
        while not done.all():
            t0 = time.perf_counter()
            actions = planner.act(obs, reward)
            plan_s += time.perf_counter() - t0
            active = int((~done).sum())
            decisions += active
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
    scores = [float(D.normalized_score(env_name, r)) for r in returns]
    return {"env": env_name, "planner": planner.planner, "episodes": episodes, "k": planner.k,
            "guidance": planner.w, "candidates": planner.N, "refine_noise": planner.cfg.refine_noise,
            "causal": planner.cfg.causal, "target_return": planner.target,
            "legacy_dynamics": planner.cfg.legacy_dynamics,
            "return_mean": float(np.mean(returns)), "return_std": float(np.std(returns)),
            "normalized_score_mean": float(np.mean(scores)), "normalized_score_std": float(np.std(scores)),
            "ms_per_decision": 1000.0 * plan_s / max(1, decisions), "returns": returns, "normalized_scores": scores}


def format_result(r: dict) -> str:
    return (f"{r['env']} planner={r['planner']} k={r['k']} episodes={r['episodes']}: return "
            f"{r['return_mean']:.1f} ± {r['return_std']:.1f}, normalized score "
            f"{r['normalized_score_mean']:.1f} ± {r['normalized_score_std']:.1f}, "
            f"{r['ms_per_decision']:.2f} ms per decision")


# ----------------------------------------------------------------------------------------------------
# Speed benchmark: every planner timed side by side in one run
# ----------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def time_decisions(planner: Planner, batch: int, decisions: int, warmup: int = 2) -> float:
    """Median wall milliseconds of one decision (all candidates) for `batch` environments at full context.
    Returns ms per decision, i.e. per environment: the call time divided by the batch."""
    g = torch.Generator().manual_seed(0)
    C = planner.cfg.context
    hs = torch.randn(batch, C, planner.S, generator=g).to(planner.device)   # (B, C, S) a normalized history
    hr = torch.full((batch, C, 1), planner.R0, device=planner.device)        # (B, C, 1)
    for _ in range(warmup):
        planner.decide(hs, hr)
    times = []
    for _ in range(decisions):
        _sync(planner.device)
        t0 = time.perf_counter()
        planner.decide(hs, hr)
        _sync(planner.device)
        times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times) / batch


def check_cuda_graph(ckpt_path, device: str) -> float:
    """The captured decision must compute what the eager one does, on fresh inputs after capture. Noise is
    drawn from another stream under capture, so the check uses the deterministic paths: the transformer
    plan, and one refine step from the plan taken as x_1 (no noise is added at t == 0)."""
    worst = 0.0
    for kw in ({"planner": "transformer"}, {"refine_steps": 1}):
        eager = Planner.from_checkpoint(ckpt_path, device=device, **kw)
        eager.cfg.refine_noise = False
        graph = Planner.from_checkpoint(ckpt_path, device=device, **kw)
        graph.cfg.refine_noise = False
        graph.enable_cuda_graphs()
        g = torch.Generator().manual_seed(1)
        C = eager.cfg.context
        hs = torch.randn(4, C, eager.S, generator=g).to(eager.device)
        hr = torch.full((4, C, 1), eager.R0, device=eager.device)
        if eager.N > 1:  # the candidate draw is random: compare one candidate
            eager.N = graph.N = 1
        torch.manual_seed(0)
        a = eager.decide(hs, hr)
        graph.decide(hs, hr)
        hs2 = torch.randn(4, C, eager.S, generator=g).to(eager.device)  # replay on new inputs
        diff = (eager.decide(hs2, hr) - graph.decide(hs2, hr)).abs().max().item()
        diff = max(diff, (a - graph.decide(hs, hr)).abs().max().item())
        print(f"cuda graph vs eager ({kw}): max |diff| = {diff:.2e}")
        worst = max(worst, diff)
    if worst > 1e-3:
        raise RuntimeError(f"cuda graph output differs from eager by {worst:.2e}")
    return worst


def reference_planner(kind: str, device, scale: str, n_candidates: int) -> Planner:
    """Random-weight planners at published sizes, for timing only.
    td-official: the official halfcheetah configuration (H=8, k=5, 32 candidates with the critic, U-Net
    dim 64 (1,2,4,8), transformer 4x512). dd-reference: Decision Diffuser's inference configuration
    (U-Net dim 128, mults (1,4,8), H=100, 200 steps, guidance) run through our sampler; DD itself makes
    two guidance passes per step where we make one batched pass, which can only favour DD here.
    scale='tiny' shrinks both to toy sizes so the test suite can exercise the code path quickly."""
    import data as D
    S, A = 17, 6
    if kind == "td-official":
        cfg = T.Config(n_candidates=n_candidates, use_critic=True)
        if scale == "tiny":
            cfg = T.Config(n_candidates=n_candidates, use_critic=True, tf_half_dim=8, tf_layers=1, tf_ffn=16,
                           unet_dim=8, unet_mults="1,2", horizon=8)
        planner = "td"
    else:
        cfg = T.Config(horizon=100, unet_dim=128, unet_mults="1,4,8", n_timesteps=200, n_candidates=1,
                       use_critic=False, tf_half_dim=8, tf_layers=1, tf_ffn=16)
        if scale == "tiny":
            cfg = T.Config(horizon=16, unet_dim=8, unet_mults="1,4", n_timesteps=4, n_candidates=1,
                           use_critic=False, tf_half_dim=8, tf_layers=1, tf_ffn=16)
        planner = "diffusion"
    cfg.context = cfg.horizon - 1
    torch.manual_seed(0)
    models = T.build_models(cfg, S, A)
    for m in models.values():
        m.to(device)
    norm = D.Normalizer(np.zeros(S, np.float32), np.ones(S, np.float32))
    return Planner(cfg, models, norm, device, {"state_dim": S, "action_dim": A}, planner=planner)


def benchmark(ckpt_path, device: str, decisions: int, ref_decisions: int, ks=(1, 2, 5, 10, 20),
              batches=(1, 10), reference_scale: str = "full", cuda_graph: bool = False, compile: bool = False) -> dict:
    dev = T.pick_device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{dev.type} ({torch.get_num_threads()} threads)"
    print(f"device: {name}   torch {torch.__version__}   cuda graphs: {'on' if cuda_graph else 'off'}   "
          f"compile: {'on' if compile else 'off'}")
    rows = []
    if cuda_graph:
        check_cuda_graph(ckpt_path, device)

    def add(label, planner, batch, n):
        if compile:
            planner.enable_compile()
        if cuda_graph:
            planner.enable_cuda_graphs()
        ms = time_decisions(planner, batch, n)
        rows.append({"planner": label, "decisions": n, "k": planner.k, "batch": batch, "ms_per_decision": ms,
                     "calls_per_decision": planner.calls_per_decision(), "candidates": planner.N})

    base = Planner.from_checkpoint(ckpt_path, device=device)
    for batch in batches:
        add("transformer", Planner.from_checkpoint(ckpt_path, device=device, planner="transformer"), batch, decisions)
        for k in ks:
            if k <= base.cfg.n_timesteps:
                add("td", Planner.from_checkpoint(ckpt_path, device=device, refine_steps=k), batch, decisions)
        add("diffusion", Planner.from_checkpoint(ckpt_path, device=device, planner="diffusion"), batch, decisions)
    for n_cand in (32, 1):
        add("td-official", reference_planner("td-official", dev, reference_scale, n_cand), 1, ref_decisions)
    add("dd-reference", reference_planner("dd-reference", dev, reference_scale, 1), 1, ref_decisions)

    diff = {r["batch"]: r["ms_per_decision"] for r in rows if r["planner"] == "diffusion"}
    print(f"\n{'planner':13s} {'k/T':>4s} {'cand':>4s} {'batch':>5s} {'ms/decision':>12s} {'decisions/s':>12s} "
          f"{'calls':>6s} {'diffusion/this':>15s}")
    for r in rows:
        ratio = diff.get(r["batch"], float("nan")) / r["ms_per_decision"] if r["planner"] not in (
            "td-official", "dd-reference") else float("nan")
        print(f"{r['planner']:13s} {r['k']:4d} {r['candidates']:4d} {r['batch']:5d} {r['ms_per_decision']:12.2f} "
              f"{1000 / r['ms_per_decision']:12.1f} {r['calls_per_decision']:6d} {ratio:15.1f}")
    td5 = next((r for r in rows if r["planner"] == "td" and r["k"] == 5 and r["batch"] == 1), None)
    if td5:
        print(f"\ndiffusion / td(k=5) at batch 1: {diff[1] / td5['ms_per_decision']:.1f}x")
    dd = next(r for r in rows if r["planner"] == "dd-reference")
    for r in rows:
        if r["planner"] == "td-official":
            print(f"dd-reference / td-official ({r['candidates']} candidates): "
                  f"{dd['ms_per_decision'] / r['ms_per_decision']:.1f}x  "
                  f"(reference rows: random weights, timing only, {ref_decisions} decisions each)")
    return {"device": name, "torch": torch.__version__, "rows": rows}


def sweep_k(ckpt_path, device: str, episodes: int, seed: int, batch_envs: int, ks, plot: str | None,
            cuda_graph: bool = False) -> list:
    """Score and time per k: the paper's trade-off curve, with the transformer (k=0) and diffusion endpoints."""
    base = Planner.from_checkpoint(ckpt_path, device=device)
    results = []
    for planner, k in [("transformer", 0)] + [("td", k) for k in ks] + [("diffusion", None)]:
        p = Planner.from_checkpoint(ckpt_path, device=device, planner=planner, refine_steps=k)
        if cuda_graph:
            p.enable_cuda_graphs()
        r = evaluate(p, base.cfg.env, episodes, seed, batch_envs)
        r["ms_benchmark"] = time_decisions(p, 1, 10)
        print(format_result(r), f"| {r['ms_benchmark']:.2f} ms per decision at batch 1")
        results.append(r)
    if plot:
        plot_sweep(results, plot)
    return results


def plot_sweep(results: list, png: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    td = [r for r in results if r["planner"] == "td"]
    ax.errorbar([r["ms_benchmark"] for r in td], [r["normalized_score_mean"] for r in td],
                yerr=[r["normalized_score_std"] for r in td], marker="o", capsize=3, label="td (k refine steps)")
    for r in td:
        ax.annotate(f"k={r['k']}", (r["ms_benchmark"], r["normalized_score_mean"]), textcoords="offset points",
                    xytext=(4, 4))
    for r, mk in ((results[0], "s"), (results[-1], "^")):
        ax.errorbar([r["ms_benchmark"]], [r["normalized_score_mean"]], yerr=[r["normalized_score_std"]],
                    marker=mk, capsize=3, linestyle="none", label=f"{r['planner']} (k={r['k']})")
    ax.set_xscale("log"), ax.set_xlabel("ms per decision (batch 1)"), ax.set_ylabel("D4RL normalized score")
    ax.set_title(f"{results[0]['env']}: score vs latency"), ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    print(f"wrote {png}")


def render_video(planner: Planner, env_name: str, path: str, seed: int, max_steps: int) -> None:
    """One episode rendered offscreen (MUJOCO_GL=egl works headless) to a GIF or MP4 via imageio, or to a
    PNG strip of six frames."""
    import os
    os.environ.setdefault("MUJOCO_GL", "egl")
    try:
        import imageio.v2 as imageio
    except ImportError:
        raise T.UsageError("--video needs imageio: pip install imageio (and imageio-ffmpeg for .mp4)") from None
    import data as D
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
          f"normalized {float(D.normalized_score(env_name, ret)):.1f}")


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Plan with a Trajectory Diffuser checkpoint.")
    p.add_argument("--checkpoint", required=True, help="RUN/checkpoint.pt written by train.py")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|mps")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = the available cores")
    p.add_argument("--planner", default="td", choices=["td", "transformer", "diffusion"])
    p.add_argument("--episodes", type=int, default=10, help="evaluation episodes")
    p.add_argument("--seed", type=int, default=100, help="episode i uses env seed seed + i")
    p.add_argument("--batch-envs", type=int, default=10, help="environments planned together per call")
    p.add_argument("--refine-steps", type=int, default=None, help="k; default: the checkpoint's")
    p.add_argument("--guidance", type=float, default=None, help="w; default: the checkpoint's")
    p.add_argument("--candidates", type=int, default=None, help="plans per decision; default: the checkpoint's")
    p.add_argument("--target-return", type=float, default=None, help="default: the checkpoint's")
    p.add_argument("--refine-noise", default=None, action=argparse.BooleanOptionalAction,
                   help="--no-refine-noise: the official variant, the plan taken as x_k with no noise added")
    p.add_argument("--legacy-dynamics", default=None, action=argparse.BooleanOptionalAction,
                   help="evaluate in mujoco-py's dynamics (envs.py); default: the checkpoint's config")
    p.add_argument("--json", default=None, help="write the result (or benchmark rows) as JSON here")
    p.add_argument("--benchmark", action="store_true", help="time every planner side by side")
    p.add_argument("--decisions", type=int, default=20, help="benchmark: timed decisions per row")
    p.add_argument("--reference-decisions", type=int, default=3,
                   help="benchmark: timed decisions for td-official and dd-reference (DD is slow on CPU)")
    p.add_argument("--reference-scale", default="full", choices=["full", "tiny"],
                   help="benchmark: tiny stand-ins for the reference rows (tests only)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="capture each decision as a CUDA graph and replay it (CUDA only; checked against eager)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the rollout and the U-Net (fused kernels); pair with --cuda-graph on CUDA")
    p.add_argument("--batches", default="1,10", help="benchmark: environments planned together, per row")
    p.add_argument("--sweep-k", action="store_true", help="score and time at each k (and the endpoints)")
    p.add_argument("--ks", default="1,2,5,10,20", help="k values for --benchmark and --sweep-k")
    p.add_argument("--plot", default=None, help="--sweep-k: write the score-vs-latency PNG here")
    p.add_argument("--video", default=None, help="render one episode to this .gif/.mp4 (or a .png strip of 6 frames)")
    p.add_argument("--video-steps", type=int, default=300, help="steps rendered by --video")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except Exception as e:  # noqa: BLE001
        from data import DataError
        if args.debug or not isinstance(e, (T.UsageError, DataError)):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def run(args) -> None:
    T.set_threads(args.threads)
    ks = [int(k) for k in args.ks.split(",") if k]
    if args.benchmark:
        res = benchmark(args.checkpoint, args.device, args.decisions, args.reference_decisions, ks,
                        batches=[int(b) for b in args.batches.split(",")], reference_scale=args.reference_scale,
                        cuda_graph=args.cuda_graph, compile=args.compile)
    elif args.sweep_k:
        res = sweep_k(args.checkpoint, args.device, args.episodes, args.seed, args.batch_envs, ks, args.plot,
                      cuda_graph=args.cuda_graph)
    else:
        planner = Planner.from_checkpoint(args.checkpoint, device=args.device, planner=args.planner,
                                          refine_steps=args.refine_steps, guidance=args.guidance,
                                          n_candidates=args.candidates, target_return=args.target_return)
        if args.refine_noise is not None:
            planner.cfg.refine_noise = args.refine_noise
        if args.legacy_dynamics is not None:
            planner.cfg.legacy_dynamics = args.legacy_dynamics
        if args.compile:
            planner.enable_compile()
        if args.cuda_graph:
            planner.enable_cuda_graphs()
        if args.video:
            render_video(planner, planner.cfg.env, args.video, args.seed, args.video_steps)
            return
        res = evaluate(planner, planner.cfg.env, args.episodes, args.seed, args.batch_envs)
        for i, (r, s) in enumerate(zip(res["returns"], res["normalized_scores"])):
            print(f"  episode {i} (seed {args.seed + i}): return {r:9.1f}  normalized {s:6.1f}")
        print(format_result(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
