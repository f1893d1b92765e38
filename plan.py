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
                 n_candidates: int | None = None, target_return: float | None = None, env_bounds=None,
                 cond_target: float | None = None):
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
        # the denoiser's condition: a fixed discounted return, as Decision Diffuser conditions (cfg.cond_target)
        self.cond_target = cfg.cond_target if cond_target is None else cond_target
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
        s0 = hs[:, -1]                                    # (B*N, S)
        cond = torch.full((B * N, 1), float(self.cond_target), device=hs.device)  # (B*N, 1) denoiser condition
        w = self.w.repeat_interleave(N, 0) if torch.is_tensor(self.w) else self.w  # per-row (B,1,1) in sweeps
        if self.planner == "diffusion":
            x = self.denoiser.sample(s0, cond, w)         # (B*N, H, S), all T steps from noise
        else:
            future, _ = self.transformer.rollout(hs, hr, H - 1)          # (B*N, H-1, S)
            x = torch.cat([s0[:, None], future], dim=1)                  # (B*N, H, S)
            if self.k > 0:
                x = self.denoiser.refine(x, self.k, cond, w, add_noise=self.cfg.refine_noise)
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
             progress: bool = True, seeds=None) -> dict:
    """Episode i resets with env seed seed + i (or seeds[i]); batch_envs episodes are planned together."""
    import data as D
    from tqdm import tqdm

    torch.manual_seed(seed)  # the diffusion noise and the candidate choice
    returns, plan_s, decisions = [], 0.0, 0
    info = D.get_info(env_name)
    bar = tqdm(total=episodes * info.max_episode_steps, desc=f"eval {planner.planner}", disable=not progress,
               dynamic_ncols=True, unit="step")
    for start in range(0, episodes, batch_envs):
        n = min(batch_envs, episodes - start)
        ep_seeds = [seed + start + i if seeds is None else seeds[start + i] for i in range(n)]
        # the simulator the checkpoint's config resolved (legacy dynamics for D4RL's locomotion names)
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
    scored = D.has_reference_scores(env_name)  # a Minari dataset without reference returns is scored raw only
    scores = [float(D.normalized_score(env_name, r)) if scored else None for r in returns]
    return {"env": env_name, "planner": planner.planner, "episodes": episodes, "k": planner.k,
            "guidance": planner.w, "candidates": planner.N, "refine_noise": planner.cfg.refine_noise,
            "causal": planner.cfg.causal, "target_return": planner.target,
            "legacy_dynamics": planner.cfg.legacy_dynamics,
            "return_mean": float(np.mean(returns)), "return_std": float(np.std(returns)),
            "normalized_score_mean": float(np.mean(scores)) if scored else None,
            "normalized_score_std": float(np.std(scores)) if scored else None,
            "ms_per_decision": 1000.0 * plan_s / max(1, decisions), "returns": returns, "normalized_scores": scores}


def format_result(r: dict) -> str:
    score = ("no normalized score (no reference returns)" if r["normalized_score_mean"] is None else
             f"normalized score {r['normalized_score_mean']:.1f} ± {r['normalized_score_std']:.1f}")
    return (f"{r['env']} planner={r['planner']} k={r['k']} episodes={r['episodes']}: return "
            f"{r['return_mean']:.1f} ± {r['return_std']:.1f}, {score}, "
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
            cuda_graph: bool = False, guidances=None, endpoints: bool = True) -> list:
    """Score and time per (w, k): the paper's trade-off curve, one curve per guidance weight w, with the
    transformer (k = 0) and, if endpoints, diffusion from noise (k = T, at the checkpoint's w) beside them.
    All weights of one k are planned in one batch (row i has its own w), each on the same episode seeds, so
    a sweep costs one batched evaluation per k. ms_benchmark times each (k, w) alone at batch 1."""
    base = Planner.from_checkpoint(ckpt_path, device=device)
    ws = list(guidances or [base.w])
    runs = [("transformer", 0)] + [("td", k) for k in ks] + ([("diffusion", None)] if endpoints else [])
    results = []
    for planner, k in runs:
        p = Planner.from_checkpoint(ckpt_path, device=device, planner=planner, refine_steps=k)
        if cuda_graph:
            p.enable_cuda_graphs()
        sweep_w = planner == "td" and len(ws) > 1
        if planner == "td":  # one weight, or one per row: (len(ws) * E, 1, 1)
            p.w = torch.tensor(ws, device=p.device).repeat_interleave(episodes)[:, None, None] if sweep_w else ws[0]
        r = evaluate(p, base.cfg.env, episodes * (len(ws) if sweep_w else 1), seed,
                     episodes * len(ws) if sweep_w else batch_envs, progress=False,
                     seeds=[seed + i % episodes for i in range(episodes * len(ws))] if sweep_w else None)
        for j, w in enumerate(ws if planner == "td" else [p.w]):
            rows = slice(j * episodes, (j + 1) * episodes)
            one = dict(r, guidance=float(w), episodes=episodes, returns=r["returns"][rows],
                       normalized_scores=r["normalized_scores"][rows])
            for key, v in (("return", one["returns"]), ("normalized_score", one["normalized_scores"])):
                one[f"{key}_mean"], one[f"{key}_std"] = float(np.mean(v)), float(np.std(v))
            p.w = float(w)
            one["ms_benchmark"] = time_decisions(p, 1, 10)
            print(format_result(one), f"| w={w:g} | {one['ms_benchmark']:.2f} ms per decision at batch 1", flush=True)
            results.append(one)
    if plot:
        plot_sweep(results, plot)
    return results


def plot_sweep(results: list, png: str) -> None:
    plt = _pyplot()
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
    import data as D
    planner = Planner.from_checkpoint(ckpt_path, device=device)
    cfg, den, dev = planner.cfg, planner.denoiser, planner.device
    data = D.load(cfg.env, cfg.dataset or None, rtg_scale=cfg.rtg_scale, discount=cfg.discount,
                  cond_discount=cfg.cond_discount, download=False)
    data.normalizer = planner.normalizer  # the checkpoint's statistics, not a refit
    C, H, T = cfg.context, cfg.horizon, cfg.n_timesteps
    g = torch.Generator().manual_seed(seed)
    batch = D.WindowSampler(data, C + H - 1, device=dev).sample(4 * n_windows, g)
    full = batch["mask"].bool().all(1).nonzero().flatten()[:n_windows]  # windows with no padding
    hist_s, hist_r = batch["states"][full, :C], batch["rtg"][full, :C]  # (B, C, S), (B, C, 1)
    x0 = batch["states"][full, C - 1:]                                   # (B, H, S): now and H - 1 future states
    cond = batch["cond_rtg"][full, C - 1] / cfg.cond_scale               # (B, 1) the window's own condition
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
            plans.append(plan_error(den.refine(tf_plan, k, cond, planner.w, add_noise=cfg.refine_noise), k))
    torch.manual_seed(seed)
    plans.append(plan_error(den.sample(x0[:, 0], cond, planner.w), T))
    den.clip_denoised = False  # the same chain without the x_0 clamp: does sampling need it?
    torch.manual_seed(seed)
    no_clamp = plan_error(den.sample(x0[:, 0], cond, planner.w), T)
    den.clip_denoised = True
    # how often the x_0 clamp binds at the first from-noise step (t = T - 1)
    x_T = torch.randn_like(x0)
    x_T[:, 0] = x0[:, 0]
    tT = torch.full((B,), T - 1, device=dev, dtype=torch.long)
    den.clip_denoised = False
    raw = den.predict_x0(x_T, tT, den.guided_output(x_T, tT, cond, planner.w))
    den.clip_denoised = True
    clamp_frac = float(((raw < den.x_low) | (raw > den.x_high))[:, 1:].float().mean())
    effect = {}
    for name, k in (("refine", max(planner.k, 1)), ("sample", T)):
        outs = []
        for c in targets:
            torch.manual_seed(seed)
            cc = torch.full((B, 1), float(c), device=dev)
            outs.append(den.sample(x0[:, 0], cc, planner.w) if k >= T else den.refine(tf_plan, k, cc, planner.w))
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
    plt = _pyplot()
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


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


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
    p.add_argument("--cond-target", type=float, default=None,
                   help="the denoiser's return condition, in units of the data's best; default: the checkpoint's")
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
    p.add_argument("--ks", default="1,2,5,10,20", help="k values for --benchmark, --sweep-k and --diagnose")
    p.add_argument("--guidances", default="",
                   help="--sweep-k: guidance weights w, one curve each; default: the checkpoint's")
    p.add_argument("--no-endpoints", action="store_true", help="--sweep-k: skip the diffusion-from-noise row")
    p.add_argument("--diagnose", default=None, metavar="PNG",
                   help="measure the denoiser on real windows (eps-MSE and guidance signal per t, plan error per k); "
                        "writes PNG and a .json beside it")
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
                      cuda_graph=args.cuda_graph, endpoints=not args.no_endpoints,
                      guidances=[float(w) for w in args.guidances.split(",") if w] or None)
    elif args.diagnose:
        res = diagnose(args.checkpoint, args.diagnose, device=args.device, ks=ks)
    else:
        planner = Planner.from_checkpoint(args.checkpoint, device=args.device, planner=args.planner,
                                          refine_steps=args.refine_steps, guidance=args.guidance,
                                          n_candidates=args.candidates, target_return=args.target_return,
                                          cond_target=args.cond_target)
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
            print(f"  episode {i} (seed {args.seed + i}): return {r:9.1f}  normalized "
                  + ("   n/a" if s is None else f"{s:6.1f}"))
        print(format_result(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
