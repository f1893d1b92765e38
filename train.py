"""Train Trajectory Diffuser on a D4RL dataset: the glue between data.py and the three components.

Huang et al., "Diffusion Models as Optimizers for Efficient Planning in Offline RL", ECCV 2024
(arXiv 2407.16142). One training step updates four networks that share no parameters, from one window:
  - transformer.TrajectoryTransformer: next state + next return-to-go MSE on windows of C + H - 1 steps;
  - diffusion.GaussianDiffusion: v- (or eps-) MSE on the window's first H states, condition dropped w.p. 0.5;
  - inverse_dynamics.InverseDynamics: masked action MSE on (s_t, s_t+1);
  - inverse_dynamics.Critic (optional): Monte-Carlo return-to-go regression, to rank candidate plans.

    python train.py --env halfcheetah-medium-sb3            # offline quickstart on the bundled data
    python train.py --env halfcheetah-medium-v2             # official sizes, needs the D4RL file
    python train.py --env hopper-medium-v2 --dataset FILE --preset cpu   # your own file, CPU-sized recipe
    python train.py --env minari:mujoco/hopper/medium-v0 --preset cpu    # a Minari dataset (pip install minari)
    torchrun --nproc_per_node=2 train.py --env ... --device cpu   # data-parallel over processes
    python train.py --help                                  # every Config field is a flag

Reading order: the optimizer, the learning rate and the EMA; train(), one flat loop; then the run's
bookkeeping (run directory, resume, checkpoints, torchrun). Every setting, the per-dataset table and the
networks' construction are config.py's. A run directory (--out) holds checkpoint.pt
(everything needed to resume and to act), config.json, metrics.jsonl and curves.png.
Tests: python -m pytest test_all.py -k "train or cli or reliability"
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import data as D
import fast
from data import UsageError
import sources
from machine import CudaGraphed, atomic_write, pick_device, set_matmul_precision, set_threads
from config import Config, build_parser, model_args, resolve_config, target_from_data
from config import FORMAT_VERSION, PlanConfig, build_networks, load_checkpoint, planning_copy
from plan import Planner, evaluate, format_result

# ----------------------------------------------------------------------------------------------------
# The optimizer, the learning rate and the EMA (the networks and their model_args are config.py's)
# ----------------------------------------------------------------------------------------------------
TRAINED = ("transformer", "diffusion", "invdyn", "critic")  # "ema" follows "diffusion" and is not trained


def make_optimizer(cfg: Config, nets: dict, capturable: bool = False) -> torch.optim.Optimizer:
    """DEVIATION: one AdamW over every trained network, one parameter group each (official: AdamW with weight decay
    for the denoiser, Adam for the others; AdamW with weight_decay 0 is Adam, so the update is the same). One optimizer steps them all
    with one fused kernel per group, where per-network optimizers launch four times as many."""
    groups = [{"params": list(nets[k].parameters()), "name": k, "weight_decay": cfg.weight_decay if k == "diffusion"
               else 0.0} for k in TRAINED if k in nets]
    if capturable:  # CUDA-graph replay: the learning rate must live in a tensor the scheduler fills in place
        return torch.optim.AdamW(groups, lr=torch.tensor(cfg.lr, device="cuda"), capturable=True, foreach=True)
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=True)


def lr_lambda(cfg: Config):
    """Official: linear decay from lr to lr_final_frac * lr over lr_decay_steps, then constant."""
    def f(step: int) -> float:
        return 1.0 - (1.0 - cfg.lr_final_frac) * min(step, cfg.lr_decay_steps) / max(1, cfg.lr_decay_steps)
    return f


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, step: int, cfg: Config) -> None:
    """Official EMA: a plain copy before ema_start, then ema <- d * ema + (1 - d) * model every ema_every steps.
    Buffers (the noise schedule, the x_0 clamp) are constants and are copied."""
    if step % cfg.ema_every != 0 and not (cfg.ema_copy_each_step and step < cfg.ema_start):
        return
    if step < cfg.ema_start:
        ema.load_state_dict(model.state_dict())
        return
    for e, m in zip(ema.parameters(), model.parameters()):
        e.lerp_(m, 1.0 - cfg.ema_decay)


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------
def train(given: dict) -> Path:
    run = Run(given)  # the config, the device, torchrun, the run directory and resume: bookkeeping below
    cfg, device = run.cfg, run.device
    data = D.load(cfg.env, cfg.dataset or None, rtg_scale=cfg.rtg_scale, discount=cfg.discount,
                  cond_discount=cfg.cond_discount, norm_eps=cfg.norm_eps, episode_split=cfg.episode_split)
    if cfg.target_return <= 0:  # a target read off the data (resolved once, saved in the config)
        cfg.target_return = target_from_data(data.episode_returns)
    if cfg.cond_scale <= 0:  # the denoiser's condition scale, read off the data (resolved once, saved)
        cfg.cond_scale = float(np.abs(data.cond_rtg).max()) or 1.0
    if run.ckpt is not None:  # the checkpoint's normalizer, not a refit
        data.normalizer = D.Normalizer.from_state_dict(run.ckpt["normalizer"])
    elif "legacy_dynamics" not in given:  # the simulator the data came from: mujoco-py's or MuJoCo 3's
        cfg.legacy_dynamics, run.dynamics = D.choose_dynamics(data)
    # One window of C + H - 1 steps per sample: the transformer reads all of it; the denoiser, inverse dynamics
    # and the critic read its first H steps (a window of H starting at the same place).
    # DEVIATION: one gather per step (the official code draws the two window lengths independently). The H-windows
    # start where the longer windows can: in an episode that ends on a timeout, its last C - 1 starts are never
    # drawn for the denoiser (6 of 993 per 1000-step halfcheetah episode, C = 7), and a step's denoiser windows
    # share the transformer's.
    next_norm = None  # official: inverse dynamics reads next states normalized by their own statistics
    if cfg.invdyn_next_own_stats and data.next_observations is not None:
        next_norm = D.Normalizer.fit(data.next_observations, cfg.norm_eps)
    sampler = D.WindowSampler(data, cfg.context + cfg.horizon - 1, device=device, next_normalizer=next_norm)
    H = cfg.horizon

    torch.manual_seed(cfg.seed)  # every rank builds the same initial weights, the EMA copy included
    args = model_args(cfg, data.observations.shape[1], data.actions.shape[1], data.normalizer)
    nets = {k: m.to(device) for k, m in build_networks(args).items()}
    if cfg.fast:  # the CPU speed paths (fast.py): the same functions, not bit-equal
        nets = {k: fast.apply(m) for k, m in nets.items()}
    optimizer = make_optimizer(cfg, nets, capturable=cfg.cuda_graph)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [  # official: the critic's lr does not decay
        lr_lambda(cfg) if g["name"] != "critic" or cfg.critic_lr_decay else (lambda step: 1.0)
        for g in optimizer.param_groups])
    step, data_gen = run.restore(nets, optimizer, scheduler)  # step 0 and fresh seeds, or the checkpoint's
    run.announce(data, sampler, nets, step)

    def transformer_loss(batch: dict) -> dict:
        # L_tf = mean_t m_{t+1} (|s^_{t+1} - s_{t+1}|^2 + (R^_{t+1} - R_{t+1})^2), masked past the episode's end
        return {"transformer": nets["transformer"].loss(batch["states"], batch["rtg"], batch["mask"])[0]}

    def trajectory_losses(win: dict, draws) -> dict:
        # L_diff = E_{t,eps} |f_theta(x_t, t, y) - v_t|^2 (eps: DDPM Eq. 14), on x = s_{0:H}, with the condition
        # y = the discounted return-to-go at the window's first state, dropped w.p. cond_drop_prob
        losses = {"diffusion": nets["diffusion"].loss(win["states"], win["cond_rtg"][:, 0] / cfg.cond_scale, draws),
                  # L_inv = mean_t m_t |f(s_t, s_{t+1}) - a_t|^2, masked where s_{t+1} is unknown or padding
                  "invdyn": nets["invdyn"].loss(win["states"], win["next_states"], win["actions"], win["next_mask"],
                                                clamp=cfg.invdyn_clamp_loss)}
        if "critic" in nets:  # L_Q = mean_t m_t (Q(s_t, a_t) - R_t)^2, Monte-Carlo return-to-go, masked
            losses["critic"] = nets["critic"].loss(win["states"], win["actions"], win["rtg"][..., 0], win["mask"])
        return losses

    def train_step(batch: dict) -> dict:
        """The four losses, one backward and one optimizer step. The networks share no parameters, so the backward
        of the losses' sum gives every network exactly its own loss's gradient. Returns the losses."""
        win = {k: v[:, :H] for k, v in batch.items() if v.dim() >= 2}  # (B, H, .) the window's first H steps
        draws = nets["diffusion"].training_draws(win["states"])  # t, noise, condition mask: drawn first
        optimizer.zero_grad(set_to_none=True)
        if run.worker is None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp and device.type == "cuda"):
                losses = {**transformer_loss(batch), **trajectory_losses(win, draws)}
            sum(losses.values()).backward()
        else:  # --fast on a CPU: the same two parts, the transformer's forward and backward on a worker thread
            losses = run.worker((transformer_loss, batch), (trajectory_losses, win, draws))
        run.average_gradients(optimizer)  # torchrun: the mean over ranks
        if cfg.grad_clip > 0:
            for group in optimizer.param_groups:
                torch.nn.utils.clip_grad_norm_(group["params"], cfg.grad_clip)
        optimizer.step()
        return {k: v.detach() for k, v in losses.items()}

    transformer_loss, trajectory_losses, train_step = run.accelerate(transformer_loss, trajectory_losses, train_step)
    from tqdm import tqdm
    for m in nets.values():
        m.train()
    bar = tqdm(total=cfg.steps, initial=step, disable=run.rank > 0, dynamic_ncols=True, desc="train")
    t_log, acc, n_acc = time.time(), {}, 0
    keep_at = keep_steps(cfg.keep_at)  # a checkpoint is saved there too, and a planning-only copy kept
    while step < cfg.steps:
        batch = sampler.sample(cfg.batch_size, data_gen)  # (B, C + H - 1, .) windows
        losses = train_step(batch)
        scheduler.step()
        step += 1
        ema_update(nets["ema"], nets["diffusion"], step, cfg)
        acc, n_acc = {k: acc.get(k, 0.0) + v for k, v in losses.items()}, n_acc + 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            row = {k: float(v) / n_acc for k, v in acc.items()}
            ips = n_acc / max(1e-9, time.time() - t_log)  # it/s over the steps since the last row
            acc, n_acc, t_log = {}, 0, time.time()
            if not all(math.isfinite(v) for v in row.values()):
                run.save(step, nets, optimizer, scheduler, data.normalizer, data_gen, args)
                raise UsageError(f"a loss became non-finite at step {step} ({row}); lower --lr or check the data")
            bar.set_postfix({k[:4]: f"{v:.3g}" for k, v in row.items()} | {"it/s": f"{ips:.0f}"})
            run.log({"step": step, "loss": row, "lr": float(scheduler.get_last_lr()[0]), "it_per_s": ips})
        if (step % cfg.save_every == 0 or step in keep_at) and step < cfg.steps:
            run.save(step, nets, optimizer, scheduler, data.normalizer, data_gen, args)
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps and cfg.eval_episodes:
            run.evaluate(nets, data.normalizer, step)
            for m in nets.values():
                m.train()
    bar.close()
    run.save(step, nets, optimizer, scheduler, data.normalizer, data_gen, args)
    if cfg.eval_episodes > 0:
        run.evaluate(nets, data.normalizer, step)
    return run.finish(nets)


# ----------------------------------------------------------------------------------------------------
# Run bookkeeping: the run directory, resume, checkpoints, torchrun, metrics. Nothing here is the algorithm.
# ----------------------------------------------------------------------------------------------------
class Run:
    """One training run: its resolved config, device and process rank, its directory and its checkpoint.

    torchrun (WORLD_SIZE > 1): every rank builds the same initial weights, draws its own windows, dropout and
    diffusion noise, and averages its gradients with the others after each backward (one all-reduce of all
    of them), so the replicas stay equal; only rank 0 writes files and evaluates."""

    def __init__(self, given: dict):
        self.world, self.rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
        cfg = resolve_config(given)
        info = sources.get_info(cfg.env)  # unknown names fail here, before anything is written
        keep_steps(cfg.keep_at)
        if cfg.legacy_dynamics:
            from envs import LEGACY_BODY_INERTIA
            if info.env_id not in LEGACY_BODY_INERTIA:
                raise UsageError(f"--legacy-dynamics covers {', '.join(sorted(LEGACY_BODY_INERTIA))}, not "
                                 f"{info.env_id} ({cfg.env}); drop the flag")
        if cfg.cuda_graph and (pick_device(cfg.device).type != "cuda" or self.world > 1):
            raise UsageError("--cuda-graph needs a CUDA device and a single process (not torchrun)")
        self.device = pick_device(cfg.device)
        if self.world > 1:
            import torch.distributed as dist
            if self.device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.threads = set_threads(cfg.threads, self.world if self.device.type == "cpu" else 1)
        self.matmul = set_matmul_precision(self.device, cfg.reduced_precision, cfg.onednn)  # strict fp32 by default
        # --fast on a CPU with 2+ threads: the transformer's forward and backward on a worker thread (fast.py)
        self.worker = None
        if cfg.fast and self.device.type == "cpu" and self.world == 1 and self.threads >= 2:
            self.worker = fast.WorkerThreadStep(self.threads)
        self.out = check_run_dir(cfg)
        self.ckpt = None
        if cfg.resume:  # the checkpoint's config wins, except this invocation's machine and the budget given now
            self.ckpt = load_checkpoint(self.out / "checkpoint.pt")
            if self.ckpt.get("planning_only"):
                raise UsageError(f"--resume: {self.out}/checkpoint.pt is an export for planning (no optimizer "
                                 f"state); resume from the original run directory")
            old = Config(**{k: v for k, v in self.ckpt["config"].items() if k in Config.__dataclass_fields__})
            if old.env != cfg.env:
                raise UsageError(f"--resume: {self.out}/checkpoint.pt was trained on {old.env}, not {cfg.env}; "
                                 f"use --env {old.env} or another --out")
            # always now: this machine and invocation; now if given, else the checkpoint's: the budget, the data
            # file and the evaluation simulator (which changes no weight), so that a --preset run resumes alike
            now = {"resume", "device", "threads", "debug", "amp", "cuda_graph", "compile", "out", "fast",
                   "reduced_precision", "onednn"}
            keep = {"steps", "eval_episodes", "eval_every", "save_every", "dataset", "log_every", "batch_envs",
                    "legacy_dynamics", "keep_at"}
            cfg = dataclasses.replace(old, **{k: v for k, v in dataclasses.asdict(cfg).items()
                                              if k in now or (k in keep and k in given)})
        self.cfg = cfg
        flag = f"--{'' if cfg.legacy_dynamics else 'no-'}legacy-dynamics"  # train() reads it off the data if not given
        self.dynamics = f"{'mujoco-py' if cfg.legacy_dynamics else 'MuJoCo 3'}'s ({'resumed' if cfg.resume else flag})"

    def restore(self, nets, optimizer, scheduler) -> tuple[int, torch.Generator]:
        """The step to start from and the data-order generator: fresh, or the checkpoint's states. Each rank
        draws its own windows (data seed) and its own dropout and noise (torch seed), distinct per rank."""
        cfg, rank, world = self.cfg, self.rank, self.world
        step, data_gen = 0, torch.Generator().manual_seed(cfg.seed * 1000 + rank)
        if self.ckpt is not None:
            for k, m in nets.items():
                m.load_state_dict(self.ckpt["models"][k], strict=True)
            optimizer.load_state_dict(self.ckpt["optimizer"])
            scheduler.load_state_dict(self.ckpt["scheduler"])
            torch.set_rng_state(self.ckpt["rng"]["torch"])
            data_gen.set_state(self.ckpt["rng"]["data"])
            if "cuda" in self.ckpt["rng"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(self.ckpt["rng"]["cuda"])
            step = self.ckpt["step"]
        if rank:  # the checkpoint holds rank 0's streams; the other ranks take their own, per rank and step
            torch.manual_seed(cfg.seed + rank + world * step)
            data_gen.manual_seed(cfg.seed * 1000 + rank + world * step)
        if rank == 0 and step:  # metrics logged after the checkpoint we resume from belong to no run now
            path = self.out / "metrics.jsonl"
            rows = [line for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
            path.write_text("".join(line + "\n" for line in rows if json.loads(line)["step"] <= step))
        return step, data_gen

    def announce(self, data, sampler, nets, step: int) -> None:
        if self.rank:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.json").write_text(json.dumps(dataclasses.asdict(self.cfg), indent=2))
        print(data.summary())
        step_kind = ", the transformer's step on a worker thread" if self.worker else ""
        print(f"device {self.device} ({self.threads} CPU threads{step_kind}), world size {self.world}, "
              f"{'fast.py modules (--fast)' if self.cfg.fast else 'plain modules'}, "
              f"matmul: {self.matmul}{', bf16 autocast' if self.cfg.amp else ''}, "
              f"windows: {len(sampler)} of {sampler.length} steps")
        for k, m in nets.items():
            if k != "ema":
                print(f"  {k:12s} {sum(p.numel() for p in m.parameters()) / 1e6:7.3f} M parameters")
        print(f"evaluation dynamics: {self.dynamics}")
        print("config:", json.dumps(dataclasses.asdict(self.cfg)))
        if step:
            print(f"resuming from step {step}")

    def accelerate(self, transformer_loss, trajectory_losses, train_step):
        """--compile: inductor fuses each loss part's forward and backward (the hand-written code is what it
        compiles); --cuda-graph: the whole step replayed as one CUDA graph after 3 eager warm-up steps."""
        if self.cfg.compile:
            transformer_loss, trajectory_losses = torch.compile(transformer_loss), torch.compile(trajectory_losses)
        if self.cfg.cuda_graph:
            train_step = CudaGraphed(train_step, warmup=3)
        return transformer_loss, trajectory_losses, train_step

    def average_gradients(self, optimizer) -> None:
        """torchrun: replace every gradient by its mean over the ranks, in one all-reduce."""
        if self.world == 1:
            return
        import torch.distributed as dist
        params = [p for g in optimizer.param_groups for p in g["params"]]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat)
        flat /= self.world
        for p, g in zip(params, flat.split([p.numel() for p in params])):
            p.grad.copy_(g.view_as(p))

    def log(self, row: dict) -> None:
        if self.rank == 0:
            with open(self.out / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(row) + "\n")

    def save(self, step, nets, optimizer, scheduler, normalizer, data_gen, args) -> None:
        """checkpoint.pt, atomically (temp file, fsync, rename), loadable with weights_only=True; at a --keep-at
        step also keep/step<N>.pt, a planning-only copy (config.planning_copy) that later saves do not overwrite."""
        if self.rank:
            return
        rng = {"torch": torch.get_rng_state(), "data": data_gen.get_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        ckpt = {"format_version": FORMAT_VERSION, "config": dataclasses.asdict(self.cfg), "step": step,
                "model_args": args, "models": {k: m.state_dict() for k, m in nets.items()},
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "normalizer": normalizer.state_dict(), "rng": rng, "versions": {
                    "torch": str(torch.__version__), "python": platform.python_version(), "format": FORMAT_VERSION}}
        atomic_write(self.out / "checkpoint.pt", lambda fh: torch.save(ckpt, fh))
        if step in keep_steps(self.cfg.keep_at):
            (self.out / "keep").mkdir(exist_ok=True)
            atomic_write(self.out / "keep" / f"step{step}.pt", lambda fh: torch.save(planning_copy(ckpt), fh))

    def evaluate(self, nets, normalizer, step: int) -> None:
        """Rank 0 plans cfg.eval_episodes episodes with the EMA denoiser and logs the score."""
        if self.rank:
            return
        cfg = self.cfg
        torch.set_num_threads(self.threads)  # planning is one thread of work: give it every thread
        training_path = torch.backends.mkldnn.matmul.fp32_precision  # the path the start-up probe chose
        set_matmul_precision(self.device, cfg.reduced_precision, onednn=False)  # small planning batches: MKL
        planner = Planner(PlanConfig(**{f: getattr(cfg, f) for f in PlanConfig.__dataclass_fields__}), nets,
                          normalizer, self.device)
        res = evaluate(planner, cfg.env, cfg.eval_episodes, seed=cfg.eval_seed, batch_envs=cfg.batch_envs)
        print(f"[eval step {step}] {format_result(res)}")
        self.log({"step": step, "eval": res})
        torch.set_num_threads(self.worker.threads if self.worker else self.threads)
        torch.backends.mkldnn.matmul.fp32_precision = training_path  # back to it, without probing again

    def finish(self, nets) -> Path:
        if self.rank == 0:
            from plots import plot_curves  # matplotlib, imported once the run is done
            plot_curves(self.out / "metrics.jsonl", self.out / "curves.png")
            print(f"run directory: {self.out}  (python plan.py --checkpoint {self.out / 'checkpoint.pt'})")
        if self.world > 1:
            import torch.distributed as dist
            dist.barrier()
            dist.destroy_process_group()
        return self.out


def keep_steps(keep_at: str) -> set[int]:
    """--keep-at "5000,10000" -> {5000, 10000}, with a one-line error for anything but positive integers."""
    try:
        steps = {int(x) for x in str(keep_at).split(",") if x.strip()}
    except ValueError:
        steps = {0}
    if any(s <= 0 for s in steps):
        raise UsageError(f"--keep-at {keep_at!r}: give positive step numbers separated by commas, e.g. 5000,10000")
    return steps


def check_run_dir(cfg: Config) -> Path:
    """--out must be new, or hold the run that --resume continues: nothing is ever overwritten by mistake."""
    out = Path(cfg.out)
    ckpt, conf = out / "checkpoint.pt", out / "config.json"
    if cfg.resume:
        if not ckpt.is_file():
            raise UsageError(f"--resume: {ckpt} does not exist; start a new run without --resume")
        return out
    if ckpt.exists() or conf.exists():
        try:
            old_env = json.loads(conf.read_text()).get("env") if conf.exists() else "?"
        except (OSError, ValueError):
            old_env = "?"
        raise UsageError(f"--out {out} already holds a run (env {old_env}); pass --resume to continue it, "
                         f"or choose another --out (nothing was overwritten)")
    return out


def main(argv=None) -> int:
    given = vars(build_parser().parse_args(argv))
    return D.run_cli(lambda: train(given), given.get("debug", False))


if __name__ == "__main__":
    sys.exit(main())
