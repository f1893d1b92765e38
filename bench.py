"""Speed and insight around the planner: CUDA graphs and torch.compile, the side-by-side benchmark, the k x w
sweep, the denoiser diagnostic and videos. None of it is the algorithm (that is plan.py); all of it uses it.

    python bench.py --checkpoint RUN/checkpoint.pt --benchmark [--device cuda] [--cuda-graph] [--compile] [--json b.json]
    python bench.py --checkpoint RUN/checkpoint.pt --sweep-k --ks 1,2,5,10 --guidances 1.0,1.2,2.0 --plot sweep.png
    python bench.py --checkpoint RUN/checkpoint.pt --diagnose diagnose.png
    python bench.py --checkpoint RUN/checkpoint.pt --video cheetah.gif
    python bench.py --checkpoint RUN/checkpoint.pt --export checkpoints/NAME/checkpoint.pt   # planning-only copy
    python bench.py --checkpoint RUN/checkpoint.pt --episodes 10 --cuda-graph   # evaluate with graph replay

CUDA-graph capture is written once here (CudaGraphed) and used by planning (use_cuda_graphs) and by training
(train.py --cuda-graph). Tests: python -m pytest test_all.py -k "speed or sweep or diagnose"
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import matplotlib
import numpy as np
import torch

import data as D
from data import UsageError
import sources
from machine import atomic_write, pick_device, set_matmul_precision, set_threads
from config import PlanConfig, build_networks, load_checkpoint, planning_copy
from plan import (Planner, add_planner_flags, evaluate, evaluate_cli, format_result,
                  planner_from_args)

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


# ----------------------------------------------------------------------------------------------------
# CUDA graphs and torch.compile
# ----------------------------------------------------------------------------------------------------
def _map(x, fn):
    """Apply fn to every tensor in x: a tensor, or a dict / tuple / list of them (nested)."""
    if torch.is_tensor(x):
        return fn(x)
    if isinstance(x, dict):
        return {k: _map(v, fn) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_map(v, fn) for v in x)
    return x


class CudaGraphed:
    """fn(*args), captured as one CUDA graph per input shape and replayed: fn(*args) -> tensors.

    A decision or a training step at these model sizes is over a thousand small kernels, so on a GPU it is
    bound by kernel launches, not arithmetic; replay removes the launches. The captured code is fn itself.
    The first `warmup` calls per shape run eagerly on a side stream (CUDA's requirement before capture: lazy
    initialisation, allocator pools) and return real results. Then fn is captured on static copies of the
    inputs; every call copies its inputs into them, replays, and returns a copy of the outputs. Python-side
    effects of fn (a counter, an `if` on a tensor's value) happen only while capturing; random draws from
    torch's CUDA generator do advance on every replay."""

    def __init__(self, fn, warmup: int = 2):
        self.fn, self.warmup, self.graphs, self.calls = fn, warmup, {}, {}
        self.side = torch.cuda.Stream()

    def __call__(self, *args):
        shapes = []
        _map(args, lambda t: shapes.append(tuple(t.shape)))
        key = tuple(shapes)
        self.calls[key] = self.calls.get(key, 0) + 1
        if self.calls[key] <= self.warmup:
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                out = self.fn(*args)
            torch.cuda.current_stream().wait_stream(self.side)
            return out
        if key not in self.graphs:
            static_in = _map(args, torch.clone)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self.fn(*static_in)
            self.graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = self.graphs[key]
        flat_in, flat_new = [], []
        _map(static_in, flat_in.append)
        _map(args, flat_new.append)
        for dst, src in zip(flat_in, flat_new):
            dst.copy_(src, non_blocking=True)
        graph.replay()
        return _map(static_out, torch.clone)


def use_cuda_graphs(planner: Planner) -> Planner:
    """Replay each fixed-shape decision (one per batch size and history length) as a CUDA graph."""
    if planner.device.type != "cuda":
        raise UsageError("--cuda-graph needs a CUDA device")
    planner.decide = CudaGraphed(planner.decide)
    return planner


def use_compile(planner: Planner) -> Planner:
    """torch.compile the two hot paths (the transformer rollout and the U-Net), so that inductor fuses their
    many small elementwise kernels; combine with use_cuda_graphs to replay the fused kernels. Only this
    planner's networks are wrapped: the hand-written code is what inductor compiles."""
    planner.transformer.rollout = torch.compile(planner.transformer.rollout, dynamic=False)
    planner.denoiser.model.forward = torch.compile(planner.denoiser.model.forward, dynamic=False)
    return planner


# ----------------------------------------------------------------------------------------------------
# Training curves and planning-only exports
# ----------------------------------------------------------------------------------------------------
def plot_curves(metrics_path: Path, png: Path) -> None:
    """Losses and evaluation score over steps, from metrics.jsonl."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
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


def export_for_planning(src, dst) -> Path:
    """config.planning_copy of the checkpoint src, written to dst."""
    slim = planning_copy(load_checkpoint(src))
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(dst, lambda fh: torch.save(slim, fh))
    return dst


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
    S = planner.normalizer.mean.shape[-1]
    hs = torch.randn(batch, C, S, generator=g).to(planner.device)           # (B, C, S) a normalized history
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


def count_kernels(planner: Planner, batch: int) -> int:
    """Kernels one decision launches: CUDA kernels on a GPU (a replayed graph still runs each of its kernels),
    operators on a CPU; counted by torch.profiler over one decision at full context."""
    from torch.profiler import ProfilerActivity, profile
    C, S = planner.cfg.context, planner.normalizer.mean.shape[-1]
    hs = torch.zeros(batch, C, S, device=planner.device)
    hr = torch.full((batch, C, 1), planner.R0, device=planner.device)
    cuda = planner.device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
        planner.decide(hs, hr)
        _sync(planner.device)
    events = prof.events()
    if cuda:
        return sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    return sum(1 for e in events if e.name.startswith("aten::") and e.cpu_parent is None)


def check_cuda_graph(ckpt_path, device: str) -> float:
    """The captured decision must compute what the eager one does, on fresh inputs after capture. Noise is
    drawn from another stream under capture, so the check uses the deterministic paths: the transformer
    plan, and one refine step from the plan taken as x_1 (no noise is added at t == 0)."""
    worst = 0.0
    for kw in ({"planner": "transformer"}, {"refine_steps": 1}):
        eager = Planner.from_checkpoint(ckpt_path, device=device, refine_noise=False, **kw)
        graph = use_cuda_graphs(Planner.from_checkpoint(ckpt_path, device=device, refine_noise=False, **kw))
        g = torch.Generator().manual_seed(1)
        C, S = eager.cfg.context, eager.normalizer.mean.shape[-1]
        hs = torch.randn(4, C, S, generator=g).to(eager.device)
        hr = torch.full((4, C, 1), eager.R0, device=eager.device)
        if eager.N > 1:  # the candidate draw is random: compare one candidate
            eager.N = graph.N = 1
        for _ in range(3):  # two eager warm-up calls, then the capture
            graph.decide(hs, hr)
        hs2 = torch.randn(4, C, S, generator=g).to(eager.device)  # replays on inputs the capture never saw
        diff = max((eager.decide(x, hr) - graph.decide(x, hr)).abs().max().item() for x in (hs2, hs))
        print(f"cuda graph vs eager ({kw}): max |diff| = {diff:.2e}")
        worst = max(worst, diff)
    if worst > 1e-3:
        raise RuntimeError(f"cuda graph output differs from eager by {worst:.2e}")
    return worst


def reference_planner(kind: str, device, scale: str, n_candidates: int) -> Planner:
    """Random-weight planners at published sizes, for timing only.
    td-official: the official halfcheetah configuration (H=8, k=5, w=1.1, 32 candidates with the critic, U-Net
    dim 64 (1,2,4,8), transformer 4 layers of width 512). dd-reference: Decision Diffuser's inference
    configuration (U-Net dim 128, mults (1,4,8), H=100, 200 steps, guidance) run through our sampler; DD itself
    makes two guidance passes per step where we make one batched pass, which can only favour DD here.
    scale='tiny' shrinks both to toy sizes so the test suite can exercise the code path quickly."""
    S, A, tiny = 17, 6, scale == "tiny"
    if kind == "td-official":
        H, T, planner = 8, 100, "td"
        tf = dict(half_dim=8, n_layer=1, ffn_dim=16) if tiny else dict(half_dim=256, n_layer=4, n_head=4, ffn_dim=512)
        unet = dict(dim=8, dim_mults=(1, 2)) if tiny else dict(dim=64, dim_mults=(1, 2, 4, 8))
    else:
        H, T, planner = (16, 4, "diffusion") if tiny else (100, 200, "diffusion")
        tf = dict(half_dim=8, n_layer=1, ffn_dim=16)  # unused: DD has no transformer
        unet = dict(dim=8, dim_mults=(1, 4)) if tiny else dict(dim=128, dim_mults=(1, 4, 8))
    model_args = {"transformer": dict(state_dim=S, max_len=2 * H - 2, **tf), "unet": dict(state_dim=S, horizon=H, **unet),
                  "diffusion": dict(horizon=H, state_dim=S, n_timesteps=T), "invdyn": dict(state_dim=S, action_dim=A),
                  "critic": dict(state_dim=S, action_dim=A)}
    cfg = PlanConfig(horizon=H, context=H - 1, refine_steps=5, guidance=1.1, n_candidates=n_candidates)
    torch.manual_seed(0)
    nets = {k: v.to(device) for k, v in build_networks(model_args).items()}
    norm = D.Normalizer(np.zeros(S, np.float32), np.ones(S, np.float32))
    return Planner(cfg, nets, norm, device, planner=planner)


def benchmark(ckpt_path, device: str, decisions: int, ref_decisions: int, ks=(1, 2, 5, 10, 20),
              batches=(1, 10), reference_scale: str = "full", cuda_graph: bool = False, compile: bool = False,
              reference_only: bool = False) -> dict:
    dev = pick_device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{dev.type} ({torch.get_num_threads()} threads)"
    print(f"device: {name}   torch {torch.__version__}   cuda graphs: {'on' if cuda_graph else 'off'}   "
          f"compile: {'on' if compile else 'off'}")
    rows = []
    if cuda_graph:
        check_cuda_graph(ckpt_path, device)

    def add(label, planner, batch, n, fast=True):
        if compile and fast:
            use_compile(planner)
        if cuda_graph and fast:
            use_cuda_graphs(planner)
        ms = time_decisions(planner, batch, n)
        rows.append({"planner": label, "decisions": n, "k": planner.k, "batch": batch, "ms_per_decision": ms,
                     "calls_per_decision": planner.calls_per_decision(), "candidates": planner.N,
                     "kernels_per_decision": count_kernels(planner, batch), "fast": fast and (compile or cuda_graph)})

    base = Planner.from_checkpoint(ckpt_path, device=device)
    for batch in ([] if reference_only else batches):
        add("transformer", Planner.from_checkpoint(ckpt_path, device=device, planner="transformer"), batch, decisions)
        for k in ks:
            if k <= base.denoiser.n_timesteps:
                add("td", Planner.from_checkpoint(ckpt_path, device=device, refine_steps=k), batch, decisions)
        add("diffusion", Planner.from_checkpoint(ckpt_path, device=device, planner="diffusion"), batch, decisions)
    for n_cand in (32, 1):
        if compile or cuda_graph:  # the eager row beside the fast one, same run
            add("td-official", reference_planner("td-official", dev, reference_scale, n_cand), 1, ref_decisions, False)
        add("td-official", reference_planner("td-official", dev, reference_scale, n_cand), 1, ref_decisions)
    add("dd-reference", reference_planner("dd-reference", dev, reference_scale, 1), 1, ref_decisions)

    diff = {r["batch"]: r["ms_per_decision"] for r in rows if r["planner"] == "diffusion"}
    print(f"\n{'planner':13s} {'mode':>5s} {'k/T':>4s} {'cand':>4s} {'batch':>5s} {'ms/decision':>12s} "
          f"{'decisions/s':>12s} {'calls':>6s} {'kernels':>8s} {'diffusion/this':>15s}")
    for r in rows:
        ratio = diff.get(r["batch"], float("nan")) / r["ms_per_decision"] if r["planner"] not in (
            "td-official", "dd-reference") else float("nan")
        print(f"{r['planner']:13s} {'fast' if r['fast'] else 'eager':>5s} {r['k']:4d} {r['candidates']:4d} "
              f"{r['batch']:5d} {r['ms_per_decision']:12.2f} {1000 / r['ms_per_decision']:12.1f} "
              f"{r['calls_per_decision']:6d} {r['kernels_per_decision']:8d} {ratio:15.1f}")
    official = [r for r in rows if r["planner"] == "td-official" and r["candidates"] == 32]
    if len(official) == 2:
        print(f"td-official (32 candidates): eager {official[0]['ms_per_decision']:.2f} ms, "
              f"{official[0]['kernels_per_decision']} kernels; fast {official[1]['ms_per_decision']:.2f} ms, "
              f"{official[1]['kernels_per_decision']} kernels ({official[0]['ms_per_decision'] / official[1]['ms_per_decision']:.1f}x)")
    td5 = next((r for r in rows if r["planner"] == "td" and r["k"] == 5 and r["batch"] == 1), None)
    if td5 and 1 in diff:
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
            use_cuda_graphs(p)
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
# Command line
# ----------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Benchmark, sweep, diagnose or film a Trajectory Diffuser checkpoint.")
    add_planner_flags(p)
    what = p.add_mutually_exclusive_group()
    what.add_argument("--benchmark", action="store_true", help="time every planner side by side")
    what.add_argument("--sweep-k", action="store_true", help="score and time at each k (and w), with the endpoints")
    what.add_argument("--diagnose", default=None, metavar="PNG",
                      help="measure the denoiser on real windows (eps-MSE and guidance signal per t, plan error "
                           "per k); writes PNG and a .json beside it")
    what.add_argument("--video", default=None, help="render one episode to .gif/.mp4 (or a .png strip of 6 frames)")
    what.add_argument("--export", default=None, metavar="DST",
                      help="write a planning-only copy of the checkpoint (no optimizer or raw denoiser) to DST")
    p.add_argument("--cuda-graph", action="store_true", help="replay each decision as a CUDA graph (CUDA only)")
    p.add_argument("--compile", action="store_true", help="torch.compile the rollout and the U-Net")
    p.add_argument("--episodes", type=int, default=10, help="evaluation episodes (no other action: evaluate)")
    p.add_argument("--seed", type=int, default=100, help="episode i uses env seed seed + i")
    p.add_argument("--batch-envs", type=int, default=10, help="environments planned together per call")
    p.add_argument("--json", default=None, help="write the result (or benchmark rows) as JSON here")
    p.add_argument("--decisions", type=int, default=20, help="benchmark: timed decisions per row")
    p.add_argument("--reference-decisions", type=int, default=3,
                   help="benchmark: timed decisions for td-official and dd-reference (DD is slow on CPU)")
    p.add_argument("--reference-scale", default="full", choices=["full", "tiny"],
                   help="benchmark: tiny stand-ins for the reference rows (tests only)")
    p.add_argument("--batches", default="1,10", help="benchmark: environments planned together, per row")
    p.add_argument("--reference-only", action="store_true", help="benchmark: only the td-official and dd-reference rows")
    p.add_argument("--ks", default="1,2,5,10,20", help="k values for --benchmark, --sweep-k and --diagnose")
    p.add_argument("--guidances", default="", help="--sweep-k: guidance weights w, one curve each")
    p.add_argument("--no-endpoints", action="store_true", help="--sweep-k: skip the diffusion-from-noise row")
    p.add_argument("--plot", default=None, help="--sweep-k: write the score-vs-latency PNG here")
    p.add_argument("--video-steps", type=int, default=300, help="steps rendered by --video")
    args = p.parse_args(argv)
    return D.run_cli(lambda: run(args), args.debug)


def run(args) -> None:
    set_threads(args.threads)
    set_matmul_precision(pick_device(args.device), args.reduced_precision, onednn=False)
    ks = [int(k) for k in args.ks.split(",") if k]
    if args.benchmark:
        res = benchmark(args.checkpoint, args.device, args.decisions, args.reference_decisions, ks,
                        batches=[int(b) for b in args.batches.split(",")], reference_scale=args.reference_scale,
                        cuda_graph=args.cuda_graph, compile=args.compile, reference_only=args.reference_only)
    elif args.sweep_k:
        res = sweep_k(args.checkpoint, args.device, args.episodes, args.seed, args.batch_envs, ks, args.plot,
                      cuda_graph=args.cuda_graph, endpoints=not args.no_endpoints,
                      guidances=[float(w) for w in args.guidances.split(",") if w] or None)
    elif args.diagnose:
        res = diagnose(args.checkpoint, args.diagnose, device=args.device, ks=ks)
    elif args.export:
        print(f"wrote {export_for_planning(args.checkpoint, args.export)}")
        return
    else:
        def prepare(planner: Planner) -> Planner:
            if args.compile:
                use_compile(planner)
            if args.cuda_graph:
                use_cuda_graphs(planner)
            return planner
        if args.video:
            planner = prepare(planner_from_args(args))
            render_video(planner, planner.cfg.env, args.video, args.seed, args.video_steps)
        else:
            evaluate_cli(args, prepare)  # plan.py's evaluation, with the planner compiled or graphed
        return
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
