#!/usr/bin/env python
"""Mutation score of the test suite: one-line bugs planted in the project's own code, each run against the tests
that should catch it.

Each mutant replaces one substring (which must occur exactly once in its file) by another, in a temporary copy of
the working tree (the tracked files and the untracked ones git does not ignore, as they are now on disk, not as
committed). The copy is made once per job; a mutant is applied there, its tests run, and the file is put back. The
real tree is only read. A mutant is *killed* when its tests fail (or error, or time out), and *survives* when they
pass. Before the mutants, every test that any mutant names runs once on the unmutated copy and must pass, or a kill
would mean nothing.

    python scripts/mutants.py --list                 # every mutant, and a check that each still applies (exit 1 if not)
    python scripts/mutants.py                        # run them all, print a table
    python scripts/mutants.py --only 3,7-9 --jobs 2 --json results/mutants.json

Each mutant is (file, original substring, replacement, pytest -k expression, what it breaks); `expect` says why a
mutant is allowed to survive: "equivalent" (no test can tell it apart, with the argument) or "gpu" (observable
only on a CUDA machine). docs/reliability.md, "Mutation score", records the last run.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import platform
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTEST_FLAGS = ["-x", "-q", "-p", "no:cacheprovider", "--deselect", "test_all.py::test_walkthrough_quotes_are_verbatim"]


@dataclasses.dataclass(frozen=True)
class Mutant:
    file: str
    original: str
    replacement: str
    tests: str  # pytest -k expression
    what: str  # the bug, in a few words
    expect: str = "killed"  # or "equivalent: why" / "gpu: why"


M = Mutant
MUTANTS = [
    # ---------------------------------------------------------------- diffusion.py: the arithmetic
    M("diffusion.py", "nonzero = (t != 0).to(x.dtype)", "nonzero = (t >= 0).to(x.dtype)",
      "oracle_x0_eps_posterior", "the last reverse step (t = 0) adds noise"),
    M("diffusion.py", "(0.5 * log_var).exp()", "log_var.exp()",
      "step_noise_has_the_posterior_variance", "a step's noise std is the posterior variance, not its root"),
    M("diffusion.py", "torch.log(torch.cat([post_var[1:2], post_var[1:]]))",
      "torch.log(torch.cat([post_var[1:2], post_var[:-1]]))",
      "step_noise_has_the_posterior_variance", "step t's noise has step t-1's posterior variance"),
    M("diffusion.py", "post_var = betas * (1 - ab_prev) / (1 - ab)", "post_var = betas",
      "step_noise_has_the_posterior_variance", "noise variance beta_t instead of the posterior's beta~_t"),
    M("diffusion.py", "posterior_mean_coef1=betas * ab_prev.sqrt() / (1 - ab)",
      "posterior_mean_coef1=betas * ab.sqrt() / (1 - ab)",
      "oracle_x0_eps_posterior", "posterior mean: x_0's coefficient uses alpha_bar_t for alpha_bar_{t-1}"),
    M("diffusion.py", "posterior_mean_coef2=(1 - ab_prev) * alphas.sqrt() / (1 - ab)",
      "posterior_mean_coef2=(1 - ab_prev) * alphas / (1 - ab)",
      "oracle_x0_eps_posterior", "posterior mean: x_t's coefficient without its square root"),
    M("diffusion.py", "x0 = _at(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - _at(self.sqrt_recipm1_alphas_cumprod",
      "x0 = _at(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t + _at(self.sqrt_recipm1_alphas_cumprod",
      "oracle_x0_eps_posterior", "eps-prediction: x_0 with the sign of eps flipped"),
    M("diffusion.py", "x0 = _at(self.sqrt_alphas_cumprod, t, x_t) * x_t - _at(self.sqrt_one_minus_alphas_cumprod, t, x_t) * out",
      "x0 = _at(self.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t - _at(self.sqrt_alphas_cumprod, t, x_t) * out",
      "oracle_x0_eps_posterior", "v-prediction: x_0's two coefficients swapped"),
    M("diffusion.py", "return _at(self.sqrt_alphas_cumprod, t, x_t) * out + _at(self.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t",
      "return _at(self.sqrt_alphas_cumprod, t, x_t) * out - _at(self.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t",
      "oracle_x0_eps_posterior", "v-prediction: the implied eps with a sign flipped"),
    M("diffusion.py", "_at(self.sqrt_alphas_cumprod, t, x0) * noise - _at(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0",
      "_at(self.sqrt_alphas_cumprod, t, x0) * noise + _at(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0",
      "oracle_x0_eps_posterior", "v-prediction: the training target v with a sign flipped"),
    M("diffusion.py", "return torch.maximum(torch.minimum(x0, self.x_high.to(x0.dtype)), self.x_low.to(x0.dtype))",
      "return torch.minimum(x0, self.x_high.to(x0.dtype))",
      "oracle_x0_eps_posterior or both_bounds", "the x_0 clamp binds on the high side only"),
    M("diffusion.py", "def linear_beta_schedule(T, beta_start=1e-3, beta_end=2e-2, device=None):",
      "def linear_beta_schedule(T, beta_start=1e-3, beta_end=2e-3, device=None):",
      "oracle_x0_eps_posterior or method_builds", "the official linear schedule ends at 2e-3"),
    M("diffusion.py", "def cosine_beta_schedule(T, s=0.008, device=None):", "def cosine_beta_schedule(T, s=0.08, device=None):",
      "oracle_x0_eps_posterior", "the cosine schedule's offset s ten times too large"),
    # ---------------------------------------------------------------- diffusion.py: refinement and temperature
    M("diffusion.py", "torch.full((x.shape[0],), k - 1, device=x.device, dtype=torch.long)",
      "torch.full((x.shape[0],), min(k, self.n_timesteps - 1), device=x.device, dtype=torch.long)",
      "exactly_level_k", "refine noises the plan to level k + 1 (no index error: capped at T)"),
    M("diffusion.py", "ts = torch.arange(k - 1, -1, -1, device=x.device)", "ts = torch.arange(k, 0, -1, device=x.device)",
      "exactly_level_k", "the denoising chain runs k..1 instead of k-1..0"),
    M("diffusion.py", "x = self.q_sample(x_init, t, temperature * torch.randn_like(x_init))",
      "x = self.q_sample(x_init, t, torch.randn_like(x_init))",
      "exactly_level_k", "refine's initial noise ignores the temperature"),
    M("diffusion.py", "x = mean + nonzero * temperature * (0.5", "x = mean + nonzero * (0.5",
      "step_noise_has_the_posterior_variance", "a reverse step's noise ignores the temperature"),
    M("diffusion.py", "x = temperature * torch.randn(cond_state.shape[0]", "x = torch.randn(cond_state.shape[0]",
      "scales_exactly_the_noise", "sample's x_T ignores the temperature"),
    M("diffusion.py", "x = self.p_sample(x, ts[i].expand(x.shape[0]), returns, w, cond_state, temperature)",
      "x = self.p_sample(x, ts[i].expand(x.shape[0]), returns, w, cond_state)",
      "scales_exactly_the_noise", "the chain drops the temperature (every step at alpha = 1)"),
    M("diffusion.py", "return out_u + w * (out_c - out_u)", "return out_c + w * (out_c - out_u)",
      "diffusion_guidance", "guidance extrapolates from the conditional output"),
    M("diffusion.py", "if not torch.is_tensor(w) and w == 1.0:", "if False:",
      "diffusion_guidance or glue_diffusion or oracle or scales_exactly", "the w = 1 fast path removed",
      expect="equivalent: out_u + 1 * (out_c - out_u) = out_c up to float rounding (1e-7); one pass of 2B rows "
             "replaces one of B rows, the same number of net calls; only speed changes"),
    # ---------------------------------------------------------------- fast.py
    M("fast.py", "if L > c:  # every tap reaches an input somewhere", "if True:  # every tap reaches an input somewhere",
      "horizon_conv or fast_apply", "HorizonConv1d's trimmed-kernel path never taken",
      expect="equivalent: the trimmed path equals the full convolution up to float summation order "
             "(test_fast_horizon_conv_equals_conv1d); only speed changes"),
    M("fast.py", "return x * (n / (n + 2.0))", "return x * (n / (n + 1.0))", "fast_mish or fast_apply",
      "the exp-form Mish's denominator off by one"),
    M("fast.py", "return x / x.sum(dim=-1, keepdim=True)", "return x / x.sum(dim=-2, keepdim=True)",
      "fast_mish or fast_apply", "the fast softmax normalized over the queries"),
    M("fast.py", "keep = torch.rand_like(x) >= self.p", "keep = torch.rand_like(x) >= 1 - self.p", "fast_dropout",
      "the fast dropout keeps w.p. p"),
    M("fast.py", "            apply(child)", "            pass", "fast_apply", "fast.apply swaps only the top level's children"),
    M("fast.py", "return {**losses, **future.result()}", "return losses", "glue_fused",
      "the worker thread's losses dropped (the transformer's backward not waited for)"),
    # ---------------------------------------------------------------- transformer.py
    M("transformer.py", "return key_pos[None, :] > query_pos[:, None]", "return key_pos[None, :] > query_pos[:, None] + 1",
      "no_causal_leak or method_builds", "the causal mask lets each position see the next token"),
    M("transformer.py", "mask = causal_mask(pos, key_pos) if self.causal else None", "mask = causal_mask(pos, key_pos)",
      "no_causal_leak or method_builds", "causal=False (the official model) still masks"),
    M("transformer.py", "rtg = torch.cat([rtg, pred_r[:, -1:]], dim=1)", "rtg = torch.cat([rtg, rtg[:, -1:]], dim=1)",
      "transformer", "the uncached rollout feeds back the last return-to-go, not its prediction"),
    # ---------------------------------------------------------------- inverse_dynamics.py
    M("inverse_dynamics.py", "pred = pred.clamp(-1.0, 1.0) if clamp else pred", "pred = pred",
      "inverse_dynamics or method_builds", "the official loss's clamp ignored"),
    M("inverse_dynamics.py", "return (q.float() / temperature + gumbel).argmax(dim=-1)",
      "return (q.float() / temperature + gumbel).argmin(dim=-1)",
      "select_candidate", "the critic's softmax picks the worst candidates"),
    # ---------------------------------------------------------------- data.py
    M("data.py", "(x.max(0) - mean) / std)", "(x.max(0) - mean))",
      "both_bounds", "the normalizer's high bound not divided by the std"),
    M("data.py", "(x.min(0) - mean) / std", "(x.min(0) - x.mean()) / std",
      "both_bounds", "the normalizer's low bound about the global mean, not each dimension's"),
    M("data.py", "return x * std + mean", "return x * std - mean",
      "normalizer", "unnormalize subtracts the mean"),
    M("data.py", "x.std(0) + eps if eps > 0", "x.std(0) + 1e-2 if eps > 0",
      "both_bounds or method_builds", "the official normalizer's eps replaced by the floor"),
    M("data.py", "cond_rtg[s:s + l] = returns_to_go(arrays[\"rewards\"][s:s + l], cond_discount)",
      "cond_rtg[s:s + l] = returns_to_go(arrays[\"rewards\"][s:s + l], discount)",
      "method_builds", "the denoiser's condition ignores cond_discount"),
    M("data.py", "keep[-1] = False", "keep[-1] = keep[-1]",
      "method_builds", "the official split keeps the data's last step"),
    # ---------------------------------------------------------------- plan.py: the planner's wires
    M("plan.py", "else hist_r[:, -1].repeat_interleave(N, 0))", "else hist_r[:, 0].repeat_interleave(N, 0))",
      "hands_each_network or method_builds", "the denoiser conditioned on the history's first return-to-go"),
    M("plan.py", "torch.full((B * N, 1), float(self.cfg.cond_target), device=hist_s.device)",
      "torch.full((B * N, 1), 1.0, device=hist_s.device)",
      "hands_each_network", "cond_target ignored (always the data's best)"),
    M("plan.py", "self.R = torch.clamp(self.R - r / self.cfg.rtg_scale,", "self.R = torch.clamp(self.R - 0 * r / self.cfg.rtg_scale,",
      "hands_each_network", "the target return never decremented"),
    M("plan.py", "w = self.w.repeat_interleave(N, 0) if torch.is_tensor(self.w) else self.w",
      "w = self.w.repeat_interleave(N, 0) if torch.is_tensor(self.w) else 1.0",
      "hands_each_network or method_builds", "the guidance weight ignored"),
    M("plan.py", "self.k = {\"td\": cfg.refine_steps,", "self.k = {\"td\": max(1, cfg.refine_steps - 1),",
      "hands_each_network or glue_planner or method_builds", "one refinement step fewer than k"),
    M("plan.py", "add_noise=self.cfg.refine_noise,", "add_noise=True,",
      "hands_each_network or method_builds", "refine_noise ignored (the official plan is noised)"),
    M("plan.py", "temperature=self.cfg.temperature)", "temperature=self.cfg.sample_temperature)",
      "hands_each_network", "refinement at the sampler's temperature"),
    M("plan.py", "x = self.denoiser.sample(s0, cond, w, temperature=self.cfg.sample_temperature)",
      "x = self.denoiser.sample(s0, cond, w, temperature=1.0)",
      "hands_each_network or method_builds", "sample_temperature ignored"),
    M("plan.py", "self.transformer.train()", "self.transformer.eval()",
      "dropout_proposals", "dropout proposals rolled out with dropout off"),
    M("plan.py", "self.transformer.eval()", "pass",
      "dropout_proposals", "the transformer left in train mode after dropout proposals"),
    M("plan.py", "s0 = hist_s[:, -1].repeat_interleave(N, 0)", "s0 = hist_s[:, -1].repeat(N, 1)",
      "hands_each_network", "candidates' current states in the wrong order (env-minor instead of env-major)"),
    M("plan.py", "x = torch.cat([hist_s[:, -1:], future], dim=1).repeat_interleave(N, 0)",
      "x = torch.cat([hist_s[:, -1:], future], dim=1).repeat(N, 1, 1)",
      "hands_each_network", "the candidates are not each environment's plan repeated N times"),
    M("plan.py", "a = torch.clamp(self.invdyn(x[:, 0], x[:, 1]), self.low, self.high)",
      "a = torch.clamp(self.invdyn(x[:, 1], x[:, 2]), self.low, self.high)",
      "glue_planner", "inverse dynamics on the second planned transition"),
    M("plan.py", "with torch.random.fork_rng(devices=[planner.device] if planner.device.type == \"cuda\" else []):",
      "with torch.random.fork_rng(devices=[]):",
      "any_eval_terminated", "evaluation does not fork the CUDA generator",
      expect="gpu: on a CPU the device list is empty either way; on CUDA the evaluation would draw from the "
             "training's CUDA stream (test_reliability_eval_every_leaves_the_training_stream, on a GPU)"),
    # ---------------------------------------------------------------- config.py: --method official builds what it says
    M("config.py", "causal=cfg.causal),", "causal=True),", "method_builds", "model_args: the official transformer is causal"),
    M("config.py", "full_skip=cfg.unet_full_skip),", "full_skip=True),", "method_builds", "model_args: the official U-Net reads its skip"),
    M("config.py", "time_mult=cfg.unet_time_mult,", "time_mult=4,", "method_builds", "model_args: the official time MLP at width 4"),
    M("config.py", "schedule=cfg.schedule,", "schedule=\"cosine\",", "method_builds", "model_args: the official schedule is cosine"),
    M("config.py", "prediction=cfg.prediction,", "prediction=\"v\",", "method_builds", "model_args: the official net predicts v"),
    M("config.py", "clip_denoised=cfg.x0_clamp,", "clip_denoised=True,", "method_builds", "model_args: the official x_0 is clamped"),
    M("config.py", "x_low=normalizer.low.tolist(), x_high=normalizer.high.tolist()",
      "x_low=normalizer.high.tolist(), x_high=normalizer.low.tolist()",
      "both_bounds", "model_args: the clamp's bounds swapped"),
    M("config.py", "temperature=1.0, sample_temperature=1.0,", "temperature=1.0, sample_temperature=0.5,",
      "method_builds", "METHODS: the official sampler at DD's alpha"),
    M("config.py", "temperature=1.0, sample_temperature=1.0,", "temperature=0.0, sample_temperature=1.0,",
      "method_builds", "METHODS: the official refinement at alpha = 0"),
    M("config.py", "cond_drop_prob=0.5, refine_noise=False,", "cond_drop_prob=0.5, refine_noise=True,",
      "method_builds", "METHODS: the official refinement noises the plan"),
    M("config.py", "method_row[\"cond_scale\"] = given.get(\"rtg_scale\", Config.rtg_scale)", "method_row[\"cond_scale\"] = 0.0",
      "method_builds", "the official condition scale read off the data"),
    M("plan.py", "min=self.R_floor)", "min=self.R0 * self.cfg.rtg_floor)", "normalizes_slides_history",
      "the official floor R0 * rtg_floor, which raises a negative target"),
    # ---------------------------------------------------------------- train.py
    M("train.py", "            sum(losses.values()).backward()", "            losses[\"transformer\"].backward()",
      "glue_fused", "the plain step's backward reaches only the transformer"),
    M("train.py", "not (cfg.ema_copy_each_step and step < cfg.ema_start)", "not (False and step < cfg.ema_start)",
      "method_builds or ema_update", "ema_copy_each_step ignored"),
    M("train.py", "if g[\"name\"] != \"critic\" or cfg.critic_lr_decay else", "if True else",
      "method_builds", "critic_lr_decay ignored (the official critic's lr decays)"),
    M("train.py", "clamp=cfg.invdyn_clamp_loss)}", "clamp=False)}", "method_builds", "invdyn_clamp_loss ignored"),
    M("train.py", "if cfg.invdyn_next_own_stats and data.next_observations is not None:",
      "if False and data.next_observations is not None:", "method_builds", "invdyn_next_own_stats ignored"),
    M("train.py", "cfg.cond_scale = float(np.abs(data.cond_rtg).max()) or 1.0",
      "cfg.cond_scale = float(np.abs(data.rtg).max()) or 1.0",
      "method_builds", "the condition scale read off the transformer's return-to-go"),
    M("train.py", "win[\"cond_rtg\"][:, 0] / cfg.cond_scale", "win[\"cond_rtg\"][:, -1] / cfg.cond_scale",
      "train_step_losses or method_builds", "the denoiser trained on the window's last return-to-go"),
    # ---------------------------------------------------------------- machine.py: precision
    M("machine.py", "torch.backends.cudnn.conv.fp32_precision = mode", "torch.backends.cudnn.conv.fp32_precision = \"tf32\"",
      "read_back", "strict precision leaves TF32 on for cuDNN convolutions"),
    M("machine.py", "mode = \"tf32\" if reduced else \"ieee\"", "mode = \"ieee\" if reduced else \"ieee\"",
      "read_back", "--reduced-precision does not turn TF32 on"),
    M("machine.py", "torch.backends.mkldnn.matmul.fp32_precision = \"ieee\"  # oneDNN would compute in bf16 here",
      "torch.backends.mkldnn.matmul.fp32_precision = \"bf16\"  # oneDNN would compute in bf16 here",
      "read_back", "no fall-back to MKL where oneDNN computes in bf16"),
]


def check(mutants, root=ROOT) -> list[str]:
    """Problems that make a mutant stale: its file is missing, or its original occurs other than exactly once."""
    problems = []
    for i, m in enumerate(mutants):
        path = root / m.file
        if not path.is_file():
            problems.append(f"#{i}: {m.file} does not exist")
            continue
        n = path.read_text().count(m.original)
        if n != 1:
            problems.append(f"#{i}: {m.file}: the original {m.original!r} occurs {n} times (must be exactly once)")
        if "\n" in m.original or "\n" in m.replacement or m.original == m.replacement:
            problems.append(f"#{i}: not a one-line change")
        if not m.expect.startswith(("killed", "equivalent:", "gpu:")):
            problems.append(f"#{i}: expect must be killed, 'equivalent: why' or 'gpu: why'")
    return problems


def copy_tree(dst: Path) -> None:
    """The working tree as it is on disk: tracked files and untracked ones git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file() and not src.is_symlink():  # a file deleted in the working tree is not copied
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


def run_pytest(workdir: Path, expr: str, timeout: float) -> tuple[str, float, str]:
    """('passed' | 'failed' | 'error' | 'no tests' | 'timeout', seconds, output tail)."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", MUJOCO_GL=os.environ.get("MUJOCO_GL", "egl"),
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-m", "pytest", "test_all.py", *PYTEST_FLAGS, "-k", expr], cwd=workdir,
                           env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return "timeout", time.perf_counter() - t0, out[-2000:]
    status = {0: "passed", 1: "failed", 5: "no tests"}.get(p.returncode, "error")
    return status, time.perf_counter() - t0, (p.stdout + p.stderr)[-2000:]


def run_mutant(i: int, m: Mutant, workdir: Path, timeout: float) -> dict:
    path = workdir / m.file
    text = path.read_text()
    path.write_text(text.replace(m.original, m.replacement, 1))
    try:
        status, seconds, tail = run_pytest(workdir, m.tests, timeout)
    finally:
        path.write_text(text)
    result = {"passed": "survived", "failed": "killed", "error": "killed", "timeout": "killed"}.get(status, status)
    return {"index": i, "file": m.file, "what": m.what, "tests": m.tests, "expect": m.expect, "result": result,
            "pytest": status, "seconds": round(seconds, 1), "original": m.original, "replacement": m.replacement,
            "tail": tail if result != "killed" or status != "failed" else ""}


def parse_only(spec: str, n: int) -> list[int]:
    picked = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        picked += list(range(int(lo), int(hi or lo) + 1))
    bad = [i for i in picked if not 0 <= i < n]
    if bad:
        raise SystemExit(f"--only: no mutant {bad} (there are {n}, numbered 0..{n - 1})")
    return picked


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--list", action="store_true", help="list the mutants and check that each still applies; run nothing")
    p.add_argument("--only", default="", help="run these mutants only: indices and ranges, e.g. 3,7-9")
    p.add_argument("--jobs", type=int, default=1, help="mutants run in parallel, each in its own copy (default 1)")
    p.add_argument("--json", default="", help="write every result here, e.g. results/mutants.json")
    p.add_argument("--timeout", type=float, default=600, help="seconds per pytest run (a timeout counts as killed)")
    p.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of every named test")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # kill PID: the copies in the temp dir are removed

    problems = check(MUTANTS)
    if args.list:
        for i, m in enumerate(MUTANTS):
            note = "" if m.expect == "killed" else f"  [{m.expect.split(':')[0]}]"
            print(f"{i:3d}  {m.file:20s} {m.what}{note}\n     -k {m.tests}")
        print(f"{len(MUTANTS)} mutants")
        for problem in problems:
            print("stale:", problem, file=sys.stderr)
        return 1 if problems else 0
    if problems:
        print("stale mutants (fix them first):\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    picked = parse_only(args.only, len(MUTANTS)) if args.only else list(range(len(MUTANTS)))
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mutants-") as tmp:
        dirs, workdirs = [Path(tmp) / f"tree{j}" for j in range(max(1, args.jobs))], queue.Queue()
        for d in dirs:
            d.mkdir()
            copy_tree(d)
            workdirs.put(d)
        if not args.no_baseline:
            expr = " or ".join(f"({e})" for e in sorted({MUTANTS[i].tests for i in picked}))
            status, seconds, tail = run_pytest(dirs[0], expr, args.timeout * 3)
            print(f"baseline (unmutated): {status} in {seconds:.0f} s")
            if status != "passed":
                print(tail, file=sys.stderr)
                print("the unmutated tree fails the named tests: a kill would mean nothing", file=sys.stderr)
                return 1

        def job(i):
            d = workdirs.get()
            try:
                r = run_mutant(i, MUTANTS[i], d, args.timeout)
            finally:
                workdirs.put(d)
            print(f"#{i:<3d} {r['result']:9s} {r['seconds']:6.1f} s  {r['file']}: {r['what']}", flush=True)
            return r

        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            results = sorted(pool.map(job, picked), key=lambda r: r["index"])
    wall = time.perf_counter() - t_start

    print(f"\n{'#':>3}  {'result':9s} {'s':>6}  {'file':20s} mutant")
    for r in results:
        flag = "" if r["expect"] == "killed" else f"  ({r['expect'].split(':')[0]})"
        print(f"{r['index']:3d}  {r['result']:9s} {r['seconds']:6.1f}  {r['file']:20s} {r['what']}{flag}")
    killed = sum(r["result"] == "killed" for r in results)
    survivors = [r for r in results if r["result"] != "killed"]
    unexpected = [r for r in survivors if r["expect"] == "killed"]
    print(f"\nmutation score: {killed}/{len(results)} killed in {wall / 60:.1f} min ({args.jobs} job(s), "
          f"{os.cpu_count()} CPUs: {cpu_name()})")
    for r in survivors:
        print(f"  survivor #{r['index']} {r['file']}: {r['what']} -- {r['expect']}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "command": " ".join(["python", "scripts/mutants.py", *(argv if argv is not None else sys.argv[1:])]),
            "killed": killed, "total": len(results), "wall_s": round(wall, 1), "jobs": args.jobs,
            "cpu": cpu_name(), "cpus": os.cpu_count(), "results": results}, indent=2))
        print(f"wrote {args.json}")
    if unexpected:
        print(f"{len(unexpected)} mutant(s) survived that a test should kill: "
              + ", ".join(f"#{r['index']}" for r in unexpected), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
