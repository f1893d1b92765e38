"""Where a planning decision's time goes on this CPU: torch's profiler over batch-1 decisions.

For each planner it prints the median ms per decision, the aten operators dispatched per decision, and the
operators that took the most time, so overhead (many small operators) and arithmetic (a few large ones) can be
told apart. The rows: the transformer alone and td (k = 1) on a checkpoint, and td-official (the official sizes,
32 candidates, random weights; timing only). --compile adds the transformer's rollout through torch.compile
(inductor fuses our hand-written code; compiling takes about a minute per history length on a CPU).
Run it on an otherwise idle machine:
    python scripts/speed/profile_planning.py [--checkpoint PATH] [--threads 2] [--compile] [--no-fast]
"""
import argparse
import pathlib
import platform
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
from torch.profiler import profile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from bench import reference_planner  # noqa: E402
from plan import Planner  # noqa: E402


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def profile_decisions(planner: Planner, decisions: int = 20, top: int = 6) -> str:
    """Batch-1 decisions at a full history: median ms per decision, operators per decision, the top operators."""
    planner.reset(1)
    obs = np.zeros(planner.normalizer.mean.shape, np.float32)
    for _ in range(planner.cfg.context + 2):  # fill the history, warm up
        planner.act(obs)
    times = []
    for _ in range(decisions):
        t0 = time.perf_counter()
        planner.act(obs)
        times.append((time.perf_counter() - t0) * 1e3)
    with profile() as prof:
        for _ in range(5):
            planner.act(obs)
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events)
    calls = sum(e.count for e in events) / 5
    lines = [f"  {statistics.median(times):8.2f} ms per decision (median of {decisions}); {calls:.0f} aten operator "
             f"calls per decision (nested ones included), {total / 5 / calls:.1f} us of own time each on average"]
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]:
        lines.append(f"    {e.key:28s} {100 * e.self_cpu_time_total / total:5.1f}% of operator time, "
                     f"{e.count / 5:6.0f} calls per decision, {e.self_cpu_time_total / e.count:8.1f} us each")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="checkpoints/halfcheetah-medium-sb3/checkpoint.pt")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="also time the transformer's rollout compiled")
    p.add_argument("--fast", action=argparse.BooleanOptionalAction, default=True,
                   help="fast.py's CPU modules (default, as bench.py); --no-fast profiles the plain modules")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_model()}, {args.threads} threads, torch {torch.__version__}")
    print(f"modules: {'fast.py (--fast)' if args.fast else 'plain (--no-fast)'}")
    rows = [("transformer alone, " + args.checkpoint,
             Planner.from_checkpoint(args.checkpoint, "cpu", "transformer", args.fast)),
            ("td (k = 1), same checkpoint", Planner.from_checkpoint(args.checkpoint, "cpu", "td", args.fast)),
            ("td-official (32 candidates, k = 5)",
             reference_planner("td-official", torch.device("cpu"), "full", 32, args.fast))]
    for label, planner in rows:
        print(label)
        print(profile_decisions(planner))
    if args.compile:
        planner = Planner.from_checkpoint(args.checkpoint, "cpu", "transformer", args.fast)
        t0 = time.perf_counter()
        planner.transformer.rollout = torch.compile(planner.transformer.rollout, dynamic=False)
        planner.reset(1)
        obs = np.zeros(planner.normalizer.mean.shape, np.float32)
        for _ in range(planner.cfg.context + 2):  # one compile per history length 1..C
            planner.act(obs)
        print(f"transformer alone, rollout compiled ({time.perf_counter() - t0:.0f} s to compile every history length)")
        print(profile_decisions(planner))


if __name__ == "__main__":
    main()
