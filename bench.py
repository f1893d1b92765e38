"""How fast the planner is, and what k and w buy: the side-by-side benchmark and the k x w sweep. None of it is the
algorithm (that is plan.py); all of it uses it.

    python bench.py --checkpoint RUN/checkpoint.pt --benchmark [--device cuda] [--cuda-graph] [--compile] [--json B]
    python bench.py --checkpoint RUN/checkpoint.pt --sweep-k --ks 1,2,5,10 --guidances 1.0,1.2,2.0 --plot sweep.png
    python bench.py --checkpoint RUN/checkpoint.pt --episodes 10 --cuda-graph   # evaluate with graph replay

The denoiser diagnostic, videos and the planning-only export are diagnose.py's (bench.py still accepts
--diagnose, --video and --export and hands them on). CUDA-graph replay and torch.compile of a planner are
machine.py's (use_cuda_graphs, use_compile). Tests: python -m pytest test_all.py -k "speed or sweep"
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

import data as D
from machine import pick_device, set_matmul_precision, set_threads, use_compile, use_cuda_graphs
from config import PlanConfig, build_networks
from fast import apply as use_fast_paths
from plan import Planner, add_planner_flags, evaluate, evaluate_cli, format_result
from plots import plot_sweep


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


def reference_planner(kind: str, device, scale: str, n_candidates: int, fast: bool = True) -> Planner:
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
    if fast:  # fast.py's CPU modules
        nets = {k: use_fast_paths(v) for k, v in nets.items()}
    norm = D.Normalizer(np.zeros(S, np.float32), np.ones(S, np.float32))
    return Planner(cfg, nets, norm, device, planner=planner)


def benchmark(ckpt_path, device: str, decisions: int, ref_decisions: int, ks=(1, 2, 5, 10, 20),
              batches=(1, 10), reference_scale: str = "full", cuda_graph: bool = False, compile: bool = False,
              reference_only: bool = False, fast: bool = True) -> dict:
    dev = pick_device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{dev.type} ({torch.get_num_threads()} threads)"
    print(f"device: {name}   torch {torch.__version__}   cuda graphs: {'on' if cuda_graph else 'off'}   "
          f"compile: {'on' if compile else 'off'}   fast.py modules: {'on' if fast else 'off'}")
    rows = []
    if cuda_graph:
        check_cuda_graph(ckpt_path, device)

    def add(label, planner, batch, n, accelerate=True):
        if compile and accelerate:
            use_compile(planner)
        if cuda_graph and accelerate:
            use_cuda_graphs(planner)
        ms = time_decisions(planner, batch, n)
        rows.append({"planner": label, "decisions": n, "k": planner.k, "batch": batch, "ms_per_decision": ms,
                     "calls_per_decision": planner.calls_per_decision(), "candidates": planner.N,
                     "kernels_per_decision": count_kernels(planner, batch), "accelerated": accelerate and (compile or cuda_graph),
                     "fast_modules": label != "td-official-plain" and fast})

    base = Planner.from_checkpoint(ckpt_path, device=device)
    for batch in ([] if reference_only else batches):
        add("transformer", Planner.from_checkpoint(ckpt_path, device, "transformer", fast), batch, decisions)
        for k in ks:
            if k <= base.denoiser.n_timesteps:
                add("td", Planner.from_checkpoint(ckpt_path, device, fast=fast, refine_steps=k), batch, decisions)
        add("diffusion", Planner.from_checkpoint(ckpt_path, device, "diffusion", fast), batch, decisions)
    for n_cand in (32, 1):
        if compile or cuda_graph:  # the eager row beside the fast one, same run
            add("td-official", reference_planner("td-official", dev, reference_scale, n_cand, fast), 1, ref_decisions,
                False)
        add("td-official", reference_planner("td-official", dev, reference_scale, n_cand, fast), 1, ref_decisions)
    if fast:  # the plain modules beside fast.py's, same run
        add("td-official-plain", reference_planner("td-official", dev, reference_scale, 32, False), 1, ref_decisions)
    add("dd-reference", reference_planner("dd-reference", dev, reference_scale, 1, fast), 1, ref_decisions)

    diff = {r["batch"]: r["ms_per_decision"] for r in rows if r["planner"] == "diffusion"}
    print(f"\n{'planner':17s} {'mode':>5s} {'k/T':>4s} {'cand':>4s} {'batch':>5s} {'ms/decision':>12s} "
          f"{'decisions/s':>12s} {'calls':>6s} {'kernels':>8s} {'diffusion/this':>15s}")
    for r in rows:
        ratio = diff.get(r["batch"], float("nan")) / r["ms_per_decision"] if r["planner"] not in (
            "td-official", "td-official-plain", "dd-reference") else float("nan")
        print(f"{r['planner']:17s} {'graph' if r['accelerated'] else 'eager':>5s} {r['k']:4d} {r['candidates']:4d} "
              f"{r['batch']:5d} {r['ms_per_decision']:12.2f} {1000 / r['ms_per_decision']:12.1f} "
              f"{r['calls_per_decision']:6d} {r['kernels_per_decision']:8d} {ratio:15.1f}")
    official = [r for r in rows if r["planner"] == "td-official" and r["candidates"] == 32]
    if len(official) == 2:
        print(f"td-official (32 candidates): eager {official[0]['ms_per_decision']:.2f} ms, "
              f"{official[0]['kernels_per_decision']} kernels; compiled/graphed {official[1]['ms_per_decision']:.2f} ms, "
              f"{official[1]['kernels_per_decision']} kernels ({official[0]['ms_per_decision'] / official[1]['ms_per_decision']:.1f}x)")
    plain = next((r for r in rows if r["planner"] == "td-official-plain"), None)
    if plain:
        fast_row = next(r for r in rows if r["planner"] == "td-official" and r["candidates"] == 32)
        print(f"td-official (32 candidates): plain modules {plain['ms_per_decision']:.2f} ms, fast.py's "
              f"{fast_row['ms_per_decision']:.2f} ms ({plain['ms_per_decision'] / fast_row['ms_per_decision']:.2f}x)")
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
            cuda_graph: bool = False, guidances=None, endpoints: bool = True, fast: bool = True) -> list:
    """Score and time per (w, k): the paper's trade-off curve, one curve per guidance weight w, with the
    transformer (k = 0) and, if endpoints, diffusion from noise (k = T, at the checkpoint's w) beside them.
    All weights of one k are planned in one batch (row i has its own w), each on the same episode seeds, so
    a sweep costs one batched evaluation per k. ms_benchmark times each (k, w) alone at batch 1."""
    base = Planner.from_checkpoint(ckpt_path, device=device)
    ws = list(guidances or [base.w])
    runs = [("transformer", 0)] + [("td", k) for k in ks] + ([("diffusion", None)] if endpoints else [])
    results = []
    for planner, k in runs:
        p = Planner.from_checkpoint(ckpt_path, device=device, planner=planner, fast=fast, refine_steps=k)
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


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------
MOVED = ("--diagnose", "--video", "--export")  # diagnose.py's flags, still accepted here and handed on


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    moved = [a.split("=")[0] for a in argv if a.split("=")[0] in MOVED]
    if moved:
        print(f"bench.py: {moved[0]} is diagnose.py's now; running python diagnose.py {' '.join(argv)}", file=sys.stderr)
        import diagnose
        return diagnose.main(argv)
    p = argparse.ArgumentParser(description="Benchmark or sweep a Trajectory Diffuser checkpoint (or evaluate it "
                                            "with --cuda-graph / --compile).",
                                epilog="The denoiser diagnostic, videos and the planning-only export: "
                                       "python diagnose.py --help")
    add_planner_flags(p)
    what = p.add_mutually_exclusive_group()
    what.add_argument("--benchmark", action="store_true", help="time every planner side by side")
    what.add_argument("--sweep-k", action="store_true", help="score and time at each k (and w), with the endpoints")
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
    p.add_argument("--ks", default="1,2,5,10,20", help="k values for --benchmark and --sweep-k")
    p.add_argument("--guidances", default="", help="--sweep-k: guidance weights w, one curve each")
    p.add_argument("--no-endpoints", action="store_true", help="--sweep-k: skip the diffusion-from-noise row")
    p.add_argument("--plot", default=None, help="--sweep-k: write the score-vs-latency PNG here")
    p.set_defaults(fast=True)  # the benchmark times fast.py's modules; --no-fast times the plain ones
    args = p.parse_args(argv)
    return D.run_cli(lambda: run(args), args.debug)


def run(args) -> None:
    set_threads(args.threads)
    set_matmul_precision(pick_device(args.device), args.reduced_precision, onednn=False)
    ks = [int(k) for k in args.ks.split(",") if k]
    if args.benchmark:
        res = benchmark(args.checkpoint, args.device, args.decisions, args.reference_decisions, ks,
                        batches=[int(b) for b in args.batches.split(",")], reference_scale=args.reference_scale,
                        cuda_graph=args.cuda_graph, compile=args.compile, reference_only=args.reference_only,
                        fast=args.fast)
    elif args.sweep_k:
        res = sweep_k(args.checkpoint, args.device, args.episodes, args.seed, args.batch_envs, ks, args.plot,
                      cuda_graph=args.cuda_graph, endpoints=not args.no_endpoints, fast=args.fast,
                      guidances=[float(w) for w in args.guidances.split(",") if w] or None)
    else:
        def prepare(planner: Planner) -> Planner:
            if args.compile:
                use_compile(planner)
            if args.cuda_graph:
                use_cuda_graphs(planner)
            return planner
        evaluate_cli(args, prepare)  # plan.py's evaluation, with the planner compiled or graphed
        return
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
