"""The machine: devices, CPU threads, the precision of matrix products, files that survive a crash, and CUDA-graph
replay and torch.compile for the hot paths.

Nothing here is the algorithm; train.py, plan.py, bench.py and diagnose.py call these once at start-up (training
wraps its step in CudaGraphed with --cuda-graph; bench.py and diagnose.py wrap a planner with use_cuda_graphs and
use_compile).
Tests: python -m pytest test_all.py -k "precision or reliability"
"""
from __future__ import annotations

import os
import pathlib

import torch

from data import UsageError


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but this machine has no CUDA device; use --device cpu or auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError("--device mps was asked for, but MPS is not available here; use --device cpu or auto")
    if name not in ("cpu", "cuda", "mps"):
        raise UsageError(f"unknown --device {name!r}; choose auto, cpu, cuda or mps")
    return torch.device(name)


def matmul_probe_error() -> float:
    """The largest relative error, against float64, of a few fp32 products of the shapes training makes, under
    the current settings: about 2e-7 when they compute in fp32, about 2e-3 when they compute in bf16."""
    g = torch.Generator().manual_seed(0)
    errors = []
    for m, k, n in ((896, 128, 128), (512, 32, 96), (64, 256, 17)):  # (B*L, D) @ (D, D') as in the nets
        a, b, bias = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
        ref = a.double() @ b.double().T + bias.double()
        for out in (a @ b.T + bias, torch.nn.functional.linear(a, b, bias)):  # matmul and addmm paths
            errors.append(float((out.double() - ref).norm() / ref.norm()))
    return max(errors)


def set_matmul_precision(device: torch.device, reduced: bool = False, onednn: bool = True) -> str:
    """Strict fp32 matrix products by default, on every machine; returns what they compute in, for the start-up
    line ("matmul: ...").

    CPU. torch sends fp32 products to MKL, or to oneDNN when mkldnn.matmul.fp32_precision = "bf16". On the AMD
    EPYC CPUs measured here oneDNN's AVX-512 fp32 path is 2x faster than MKL's and exact (probe 2e-7), but
    the same setting lets oneDNN compute in bf16 on CPUs with AMX (probe 2.3e-3 on an Intel Xeon). So the
    oneDNN path is taken only where matmul_probe_error() shows it computes in fp32 (< 1e-5), else MKL. Before
    the probe, ONEDNN_MAX_CPU_ISA defaults to AVX512_CORE_BF16, which keeps oneDNN off AMX (on the Intel
    kind that brought the probe back to 4.9e-7); it acts only if no oneDNN primitive ran yet in this process.
    onednn=False (planning: its small batches ran faster on MKL; training with --no-onednn) keeps MKL. reduced=True
    allows bf16 inside oneDNN's products; whether it computes in bf16 depends on the CPU, and the probe says which.
    On an Intel CPU with AMX, also set ONEDNN_MAX_CPU_ISA=AVX512_CORE_AMX, or the default cap keeps it in fp32.
    CUDA. Strict: TF32 off for matmuls and cuDNN convolutions (torch's own default lets convolutions use TF32).
    reduced=True turns TF32 on for both (10-bit mantissa inputs, fp32 accumulation)."""
    if device.type == "cuda":
        mode = "tf32" if reduced else "ieee"
        torch.backends.cuda.matmul.fp32_precision = mode
        torch.backends.cudnn.conv.fp32_precision = mode
        return "tf32 (reduced precision, --reduced-precision)" if reduced else "fp32 (TF32 off)"
    if device.type != "cpu":
        return "the device's default"
    if not (onednn or reduced):
        torch.backends.mkldnn.matmul.fp32_precision = "ieee"
        return "fp32 (MKL)"
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"  # products go to oneDNN, bf16 allowed inside
    err = matmul_probe_error()
    if reduced:
        kind = "bf16" if err > 1e-5 else "bf16 allowed, computed in fp32 on this CPU"
        return f"{kind} (oneDNN, --reduced-precision; probe error {err:.1e})"
    if err < 1e-5:
        return f"fp32 (oneDNN, probe error {err:.1e})"
    torch.backends.mkldnn.matmul.fp32_precision = "ieee"  # oneDNN would compute in bf16 here: MKL, strict
    return f"fp32 (MKL; oneDNN's path computed in bf16 on this CPU, probe error {err:.1e})"


def set_threads(threads: int = 0, world_size: int = 1) -> int:
    """Match torch's CPU pool to the cores this process may use. An oversubscribed pool (more threads than
    free cores, e.g. two ranks each taking every core) was measured to slow a U-Net pass 100x."""
    if threads <= 0:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, cores // max(1, world_size))
    torch.set_num_threads(threads)
    return threads


def atomic_write(path: pathlib.Path, write) -> None:
    """Write a file so that a crash leaves the old one or the new one, never half: temp file, fsync, rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


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


def use_cuda_graphs(planner):
    """Replay each fixed-shape decision of a plan.Planner (one per batch size and history length) as a CUDA graph."""
    if planner.device.type != "cuda":
        raise UsageError("--cuda-graph needs a CUDA device")
    planner.decide = CudaGraphed(planner.decide)
    return planner


def use_compile(planner):
    """torch.compile a plan.Planner's two hot paths (the transformer rollout and the U-Net), so that inductor fuses
    their many small elementwise kernels; combine with use_cuda_graphs to replay the fused kernels. Only this
    planner's networks are wrapped: the hand-written code is what inductor compiles."""
    planner.transformer.rollout = torch.compile(planner.transformer.rollout, dynamic=False)
    planner.denoiser.model.forward = torch.compile(planner.denoiser.model.forward, dynamic=False)
    return planner
