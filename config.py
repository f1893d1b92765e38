"""What a run is: every setting, and the checkpoint contract that carries them to planning.

- PlanConfig (the settings a decision needs) and Config (every flag of train.py, PlanConfig's included);
- the per-dataset table (ENV_TABLE), the CPU preset (PRESETS) and the method (METHODS: ours or the published
  one), resolved in this order:

      Config defaults < the dataset's row of ENV_TABLE < --preset < --method < flags given on the command line;

- model_args (each network's constructor arguments, saved in the checkpoint), build_networks (the networks they
  build) and load_checkpoint, so that plan.py acts from a checkpoint alone and never imports train.py.
Imports run one way: the components and data.py <- config.py <- plan.py <- train.py.
Tests: python -m pytest test_all.py -k config
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from data import UsageError
from diffusion import GaussianDiffusion, TemporalUnet
from inverse_dynamics import Critic, InverseDynamics
import sources
from transformer import TrajectoryTransformer

FORMAT_VERSION = 3  # bump when the checkpoint layout changes; older files are refused with a clear message


def setting(default, help):
    """A dataclass field with its --help text (train.py turns every field into a flag)."""
    return field(default=default, metadata={"help": help})


@dataclass
class PlanConfig:
    """The settings a decision needs. Config extends this with the training and model settings, and a
    checkpoint stores all of them; a planner reads back the fields below."""
    env: str = setting("halfcheetah-medium-v2", "dataset name (python data.py --list shows all), or minari:ID for "
                                                "a Minari dataset, e.g. minari:mujoco/hopper/medium-v0")
    horizon: int = setting(8, "H, planned states per decision (official halfcheetah 8)")
    # DEVIATION: the official transformer slides a window of H-1 tokens while it rolls out; here C history
    # tokens are prefilled and H-1 tokens generated into a KV cache, so training windows are C + H - 1 long.
    context: int = setting(0, "C, history tokens the transformer sees; 0 = H - 1 (the official context length)")
    refine_steps: int = setting(5, "k, diffusion steps that refine the transformer plan (official halfcheetah 5)")
    guidance: float = setting(1.1, "classifier-free guidance weight w (official halfcheetah 1.1)")
    target_return: float = setting(5300.0, "episode return the planner conditions on (official halfcheetah-medium "
                                           "5300); 0 = read off the data: its best episode return")
    rtg_scale: float = setting(1000.0, "returns-to-go are divided by this (official 1000)")
    rtg_floor: float = setting(1 / 3, "the decremented target never drops below this fraction of its start")
    # DEVIATION: the denoiser is conditioned on a fixed target, the best discounted return-to-go in the data
    # (Decision Diffuser's way), where the official code passes the transformer's decremented return-to-go.
    cond_target: float = setting(1.0, "the denoiser's condition while planning, in units of cond_scale (1 = the "
                                      "best discounted return-to-go in the data); 0 = the transformer's current, "
                                      "decremented return-to-go (official)")
    n_candidates: int = setting(32, "plans per decision, ranked by the critic (official 32)")
    critic_temperature: float = setting(1.0, "softmax temperature over critic values; 0 = argmax (official 1)")
    refine_noise: bool = setting(True, "noise the plan to level k before refining; --no-refine-noise = official")
    # DEVIATION: the refinement samples at alpha = 0 (the noise to level k and each step's noise switched off: a
    # deterministic denoising of the plan); the official code uses 1. Chosen on episode seeds 100+ by the best mean
    # over k = 1 and k = 5 (docs/results.md, "Decision Diffuser's sampler"): 38.4 at alpha = 0, 37.4 at 0.5, 37.5 at 1
    # on halfcheetah-medium-replay-sb3, 3 seeds; at the default k = 1 alpha moves the score by less than the spread.
    temperature: float = setting(0.0, "alpha of the refinement: the scale of the noise to level k and of each "
                                      "reverse step's noise (0 = deterministic, ours; 1 = DDPM, official)")
    # DEVIATION: diffusion from noise samples at Decision Diffuser's alpha = 0.5 (x_T = 0.5 z, each step's noise
    # halved); the official Trajectory Diffuser sampler uses 1. docs/results.md measures both.
    sample_temperature: float = setting(0.5, "alpha of diffusion from noise (--planner diffusion, the Decision "
                                             "Diffuser baseline): scales x_T and each step's noise (DD 0.5; the "
                                             "official code's sampler 1)")
    proposals: str = setting("mean", "the transformer's candidate plans: mean = one eval-mode rollout per "
                                     "environment, the N candidates differing only by refinement noise (ours); "
                                     "dropout = N rollouts with the transformer's dropout on (the official toy's "
                                     "sampler), so candidates differ before the optimizer sees them")
    legacy_dynamics: bool = setting(False, "evaluate in the dynamics of mujoco-py on MuJoCo 2.1 (envs.py), the "
                                           "simulator D4RL's locomotion data came from; on by default for D4RL's "
                                           "*-v2 locomotion names, --no-legacy-dynamics opts out")



# ----------------------------------------------------------------------------------------------------
# Configuration. Sizes and budget default to the official values for halfcheetah-medium-v2; the method defaults
# to ours, and METHODS["official"] holds the published method's choices. The planning settings (H, C, k, w, the
# targets) are PlanConfig's, inherited here.
# ----------------------------------------------------------------------------------------------------
@dataclass
class Config(PlanConfig):
    dataset: str = setting("", "path to a D4RL-layout hdf5 file; empty = bundled file, D4RL cache, or download")
    preset: str = setting("", "cpu = CPU-sized models and budget for any dataset (PRESETS below: 10k steps, small "
                              "nets, target read off the data); it overrides the dataset's row, explicit flags "
                              "override it; '' = none")
    method: str = setting("ours", "ours, or official = every method choice of the official code (METHODS below; "
                                  "sizes, budget and target stay the row's and the preset's); flags override it")
    out: str = setting("", "run directory; empty = runs/<env>-s<seed>")
    resume: bool = setting(False, "continue the run in --out from its checkpoint.pt")
    # DEVIATION: seeds are applied (torch, the data order, the environments); the official --seed is never used.
    seed: int = setting(0, "seed of torch (weights, noise, dropout) and of the data order")
    device: str = setting("auto", "auto|cpu|cuda|mps; auto picks cuda, then mps, then cpu")
    threads: int = setting(0, "torch CPU threads; 0 = the cores available to this process (per rank)")
    debug: bool = setting(False, "show Python tracebacks instead of one-line errors")
    # --- training (official: 1M iterations at batch 32) ---
    steps: int = setting(1_000_000, "training iterations (official 1M)")
    batch_size: int = setting(32, "windows per step (official 32)")
    lr: float = setting(2e-4, "learning rate (official: 2e-4 locomotion, 1e-4 Adroit/Kitchen)")
    lr_decay_steps: int = setting(100_000, "lr decays linearly to lr_final_frac over this many steps (official 100k)")
    lr_final_frac: float = setting(0.01, "final lr as a fraction of lr (official 1%)")
    weight_decay: float = setting(1e-4, "AdamW weight decay of the denoiser (official 1e-4; the others have none)")
    ema_decay: float = setting(0.995, "EMA decay of the denoiser (official 0.995)")
    ema_every: int = setting(2, "EMA update period in steps (official 2)")
    ema_start: int = setting(10_000, "before this step the EMA is a plain copy (official 10k)")
    # DEVIATION: before ema_start the EMA is copied every ema_every steps, one rule for the whole run (official:
    # a copy at every step); the EMA is a copy of the denoiser either way.
    ema_copy_each_step: bool = setting(False, "before ema_start, copy at every step (official) rather than every "
                                              "ema_every steps")
    grad_clip: float = setting(0.0, "max gradient norm per network; 0 = off (official: off)")
    log_every: int = setting(100, "steps between metrics.jsonl lines")
    save_every: int = setting(10_000, "steps between checkpoints (one is always written at the end)")
    keep_at: str = setting("", "comma-separated steps at which a planning-only copy is kept as keep/step<N>.pt "
                               "(for a learning curve from one run, e.g. 5000,10000,20000,40000); '' = none")
    eval_every: int = setting(0, "steps between evaluations during training; 0 = only at the end")
    eval_episodes: int = setting(10, "evaluation episodes at the end (official 10); 0 skips evaluation")
    eval_seed: int = setting(100, "first evaluation episode's env seed (episodes use eval_seed + i)")
    batch_envs: int = setting(10, "environments planned together in one batched call during evaluation")
    amp: bool = setting(False, "opt-in: bf16 autocast for the training forward passes (CUDA only; reduced precision)")
    cuda_graph: bool = setting(False, "capture the whole training step as one CUDA graph and replay it "
                                      "(CUDA, 1 process; machine.CudaGraphed)")
    compile: bool = setting(False, "torch.compile the losses (forward and backward fused by inductor); pair with "
                                   "--cuda-graph on CUDA")
    fast: bool = setting(False, "opt-in CPU speed paths (fast.py): exp-form Mish, trimmed convolutions, rand-mask "
                                "dropout, written-out softmax, and the transformer's step on a worker thread; the "
                                "same functions, not bit-equal to the plain path")
    reduced_precision: bool = setting(False, "opt-in: bf16 inside oneDNN's CPU matrix products (computes in bf16 "
                                             "only on CPUs with bf16 units, e.g. AMX), TF32 on CUDA; the start-up "
                                             "line says what was measured. Default: strict fp32 everywhere")
    onednn: bool = setting(True, "CPU: fp32 matrix products through oneDNN where a start-up probe shows them exact "
                                 "(about 2x MKL's on AVX-512 CPUs without AMX), else MKL; --no-onednn: MKL always. "
                                 "Both are fp32 and differ in summation order (docs/results.md, failed episodes)")
    # --- data ---
    discount: float = setting(1.0, "transformer return-to-go discount (official: undiscounted; its --gamma is unused)")
    # DEVIATION: the official denoiser is conditioned on the same undiscounted return-to-go as the transformer.
    # On single-policy data that number mostly encodes the time left in the episode, and the trained denoiser
    # ignored it: rms(eps_c - eps_u) was ~0.01 against rms(eps) 0.25-0.77, and w = 0, 1.1 or 3 gave the same
    # plans to 4 decimals. Decision Diffuser and CleanDiffuser condition on a discounted return (gamma 0.99),
    # which measures how well the next ~100 steps go; docs/results.md#the-denoiser has the measured gap with it.
    cond_discount: float = setting(0.99, "discount of the return-to-go the denoiser is conditioned on (DD: 0.99)")
    cond_scale: float = setting(0.0, "the denoiser's condition is that discounted return-to-go divided by this; "
                                     "0 = the largest magnitude in the data (resolved once, saved in the config)")
    norm_eps: float = setting(0.0, "state normalizer: 0 = (x - mean) / max(std, 1e-2) (ours); > 0 = (x - mean) / "
                                   "(std + norm_eps) (official 1e-5)")
    episode_split: str = setting("ours", "ours = episodes end at terminals or timeouts, windows past an end padded "
                                         "and masked; official = qlearning_dataset's transitions (timeout steps "
                                         "dropped) cut every max episode steps, windows that fit a piece only")
    # --- models (official sizes) ---
    tf_half_dim: int = setting(256, "transformer token half width: state and rtg each embed to this (official 256)")
    tf_layers: int = setting(4, "transformer layers (official 4)")
    tf_heads: int = setting(4, "transformer heads (official 4)")
    tf_ffn: int = setting(512, "transformer feed-forward width (official 512)")
    tf_dropout: float = setting(0.1, "transformer dropout (official 0.1)")
    causal: bool = setting(True, "causal attention mask; --no-causal reproduces the official bug (ablation)")
    unet_dim: int = setting(64, "U-Net base channels (official 64)")
    unet_mults: str = setting("1,2,4,8", "U-Net channel multipliers per level (official 1,2,4,8)")
    unet_time_mult: int = setting(4, "time-embedding MLP hidden width in units of unet_dim (Decision Diffuser 4: "
                                     "64->256->64; official Trajectory Diffuser 2: 64->128->64)")
    unet_full_skip: bool = setting(True, "the U-Net reads its full-resolution skip (official and DD: stored, never read)")
    x0_clamp: bool = setting(True, "clamp each predicted x_0 to the data's normalized range (official: no clamp)")
    n_timesteps: int = setting(100, "diffusion steps T (official 100)")
    schedule: str = setting("cosine", "cosine (full schedule, alpha_bar_T ~ 0) or linear (official 1e-3..2e-2)")
    cond_drop_prob: float = setting(0.5, "probability of dropping the return condition (official 0.5)")
    prediction: str = setting("v", "what the denoiser predicts: v (Salimans & Ho 2022) or eps (official, DD)")
    invdyn_hidden: int = setting(256, "inverse-dynamics MLP width (official 256)")
    invdyn_clamp_loss: bool = setting(False, "clamp the predicted action to [-1, 1] inside the loss (official)")
    # DEVIATION: inverse dynamics trains on next states in the states' normalization, the one it reads at execution
    # (two planned states); the official code normalizes next_observations by their own statistics.
    invdyn_next_own_stats: bool = setting(False, "train inverse dynamics on next states normalized by their own "
                                                 "statistics (official) rather than the states' normalizer")
    # DEVIATION: one lr schedule for every network; the official critic keeps its initial lr.
    critic_lr_decay: bool = setting(True, "the critic's lr decays with the others' (official: it stays constant)")
    critic_hidden: int = setting(128, "critic MLP width (official 128)")
    use_critic: bool = setting(True, "train the candidate critic (official: yes)")


# One table of per-dataset settings. Official rows come from the official code's main.py (commit 214039d);
# names the official table lacks take their family's medium (or partial) settings, as documented.
_LOCO = {  # env: (H, k, w, {quality: target return})
    "halfcheetah": (8, 5, 1.1, {"medium-expert": 12000, "medium-replay": 5300, "medium": 5300}),
    "hopper": (16, 5, 1.2, {"medium-expert": 3600, "medium-replay": 3100, "medium": 3100}),
    "walker2d": (32, 5, 1.1, {"medium-expert": 5100, "medium-replay": 4200, "medium": 4200}),
}
_ADROIT = {"pen": (16, 2, 1.3, 6000), "door": (32, 5, 1.2, 1500),
           "hammer": (32, 5, 1.2, 17000), "relocate": (32, 5, 1.2, 4000)}


def _build_env_table() -> dict[str, dict]:
    table = {}
    for env, (h, k, w, targets) in _LOCO.items():
        # random and expert are not in the official table: they take medium's H, k, w; expert conditions
        # on medium-expert's target (its data reach it), random on medium's (above all of its data).
        targets = dict(targets, expert=targets["medium-expert"], random=targets["medium"])
        for quality, target in targets.items():  # the evaluation's dynamics are read off the data (train())
            table[f"{env}-{quality}-v2"] = dict(horizon=h, refine_steps=k, guidance=w, target_return=target, lr=2e-4)
    for task, (h, k, w, target) in _ADROIT.items():
        for quality in ("human", "cloned", "expert"):
            table[f"{task}-{quality}-v1"] = dict(horizon=h, refine_steps=k, guidance=w, target_return=target, lr=1e-4)
    for name, target in (("partial", 500), ("mixed", 400), ("complete", 500)):  # complete takes partial's
        table[f"kitchen-{name}-v0"] = dict(horizon=32, refine_steps=5, guidance=1.2, target_return=target, lr=1e-4)
    # The bundled stand-ins: their family's horizon and the CPU preset (models, budget, a target read off the
    # data; the official targets lie above every episode of these files).
    # DEVIATION: k = 1, w = 1.2 on the bundled halfcheetah data (official halfcheetah: k = 5, w = 1.1), chosen by
    # the k x w sweep on episode seeds 100+ (docs/results.md#refinement-the-k-x-w-sweep): the score fell with k on
    # both files (medium-replay: 40.0 at k = 1 to 31.0 at k = 40, w = 1) and w moved it less than the episode
    # noise; k = 1, w = 1.2 had the best mean over the two files.
    for name in ("halfcheetah-medium-sb3", "halfcheetah-medium-replay-sb3"):
        table[name] = dict(horizon=8, refine_steps=1, guidance=1.2, preset="cpu")
    # DEVIATION: k = 1 on the bundled hopper data (official hopper: k = 5), from the k x w sweep on episode
    # seeds 100+ (results/diffusion/sweep_hopper-medium-sb3.json): 26.0 at k = 0, 25.6 at k = 1, 23.9 at k = 5,
    # 23.1 at k = 10 (w = 1.2 moved it by less than the episode noise).
    h, _, w, _ = _LOCO["hopper"]
    table["hopper-medium-sb3"] = dict(horizon=h, refine_steps=1, guidance=w, preset="cpu")
    return table


ENV_TABLE = _build_env_table()

# Presets: one named recipe that sizes the models and the budget, for any dataset (--preset NAME). The dataset's
# row keeps its planning settings (H, k, w); the preset overrides the rest of the row; explicit flags override both.
# "cpu": training plus a 10-episode evaluation of halfcheetah-medium-sb3 takes 5.5-6 minutes on 2 CPU cores (README).
# DEVIATION: lr 5e-4 at batch 64 (official 2e-4 at 32) so that 10k CPU steps suffice; smaller models; one
# candidate without the critic; the target is read off the data (target_from_data), because the official
# targets belong to D4RL's files and may lie above everything another file holds.
PRESETS = {
    "cpu": dict(steps=10_000, lr_decay_steps=10_000, ema_start=1_000, save_every=2_000, batch_size=64, lr=5e-4,
                tf_half_dim=64, tf_ffn=256, tf_layers=3, unet_dim=32, unet_mults="1,2,4", invdyn_hidden=256,
                n_candidates=1, use_critic=False, target_return=0),
}

# The method: "ours" is the Config defaults; "official" is every method choice of the official code at commit
# 214039d, bugs included. The family's official refine steps k and guidance w are added by resolve_config.
# docs/deviations.md lists each setting where the two differ, and a test keeps that list and this table equal.
METHODS = {
    "ours": {},
    "official": dict(
        causal=False,                                   # no causal mask is ever passed to the transformer
        schedule="linear", n_timesteps=100, prediction="eps",  # beta 1e-3..2e-2, eps-prediction
        unet_full_skip=False, unet_time_mult=2, x0_clamp=False,  # time MLP 64->128->64, no x_0 clamp
        cond_discount=1.0, cond_target=0.0,             # the transformer's return-to-go / 1000, decremented
        cond_drop_prob=0.5, refine_noise=False,         # the plan is taken as x_k, no noise added
        temperature=1.0, sample_temperature=1.0,        # DDPM's full noise when refining and from noise
        invdyn_clamp_loss=True, invdyn_next_own_stats=True,
        n_candidates=32, use_critic=True, critic_temperature=1.0, critic_lr_decay=False,
        ema_copy_each_step=True, norm_eps=1e-5, episode_split="official"),
}


def official_k_w(env: str) -> dict:
    """The official refine steps and guidance of the family a dataset name belongs to."""
    row = ENV_TABLE.get(env)
    if row is None or row.get("preset"):  # a stand-in, a Minari id or a user's name: its environment's family
        env_id = sources.get_info(env).env_id.lower()
        row = next((ENV_TABLE[r] for p, r in MINARI_FAMILY_ROWS.items() if env_id.startswith(p)), None)
    if row is None:
        raise UsageError(f"--method official: {env} belongs to no family of the official table; give "
                         f"--refine-steps K --guidance W")
    return {"refine_steps": row["refine_steps"], "guidance": row["guidance"]}


# A Minari dataset (--env minari:ID) takes the planning settings of the family its environment id names, with the
# target read off the data: the official targets are D4RL's, and Minari's data come from other policies and envs.
MINARI_FAMILY_ROWS = {  # lower-case env id prefix -> ENV_TABLE row
    "halfcheetah": "halfcheetah-medium-v2", "hopper": "hopper-medium-v2", "walker2d": "walker2d-medium-v2",
    "adroithandpen": "pen-human-v1", "adroithanddoor": "door-human-v1", "adroithandhammer": "hammer-human-v1",
    "adroithandrelocate": "relocate-human-v1", "frankakitchen": "kitchen-partial-v0",
}


def target_from_data(episode_returns) -> float:
    """The target return for target_return = 0: the best episode return in the training data.

    At an episode's first step the return-to-go is that episode's return, so the best return is the highest
    condition the models saw at the start of an episode and the highest the data show to be reachable. A
    higher target asks the models to extrapolate; a quantile (say the 90th) would ask for less than the data's
    best behaviour. One outlier episode can set it, which the decrement floor (rtg_floor) does not undo."""
    return float(np.max(episode_returns))


def build_parser() -> argparse.ArgumentParser:
    """Flags are built from the Config fields; their defaults are SUPPRESSed so that we know which were given."""
    presets = "; ".join(f"{name}: " + ", ".join(f"{k}={v}" for k, v in values.items()) for name, values in PRESETS.items())
    official = ", ".join(f"{k}={v}" for k, v in METHODS["official"].items())
    p = argparse.ArgumentParser(
        description="Train Trajectory Diffuser.", argument_default=argparse.SUPPRESS,
        epilog=f"Settings: Config defaults < the dataset's row of ENV_TABLE < --preset < flags given here. "
               f"Presets ({presets}). --method official sets {official}, and the family's official "
               f"refine_steps and guidance; cond_scale = rtg_scale. target_return=0 reads the target off the data: its best episode return, the "
               f"highest return-to-go the models saw at an episode's start. "
               f"Your own file on a CPU: --env hopper-medium-v2 --dataset FILE --preset cpu.".replace("%", "%%"))
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} (default {f.default})".replace("%", "%%")  # argparse formats help with %
        if f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            p.add_argument(flag, type={"int": int, "float": float, "str": str}[f.type], metavar=f.name.upper(),
                           help=help_text)
    return p


def env_row(env: str, given: dict) -> dict:
    """The env's row of ENV_TABLE; for minari:ID, the row of the family its recorded environment id names."""
    if not env.startswith("minari:"):
        return ENV_TABLE.get(env, {})  # an unknown name fails in sources.get_info with a suggestion
    env_id = sources.get_info(env).env_id
    for prefix, row in MINARI_FAMILY_ROWS.items():
        if env_id.lower().startswith(prefix):
            return dict(ENV_TABLE[row], target_return=0)
    if "horizon" not in given:
        raise UsageError(f"{env}: its environment {env_id} is none of the families with planning settings "
                         f"({', '.join(MINARI_FAMILY_ROWS)}); give them: --horizon H --refine-steps K --guidance W")
    return {"target_return": 0}


def resolve_config(given: dict) -> Config:
    """Config defaults < the env's table row < the preset (the row's, or --preset) < the method < flags given."""
    env = given.get("env", Config.env)
    row = env_row(env, given)
    preset, method = given.get("preset", row.get("preset", "")), given.get("method", "ours")
    if preset and preset not in PRESETS:
        raise UsageError(f"unknown --preset {preset!r}; choose {', '.join(PRESETS)} (or '' for none)")
    if method not in METHODS:
        raise UsageError(f"unknown --method {method!r}; choose {' or '.join(METHODS)}")
    method_row = dict(METHODS[method])
    if method == "official":  # the family's k and w; the condition is the transformer's scaled return-to-go
        if not ("refine_steps" in given and "guidance" in given):
            method_row.update(official_k_w(env))
        method_row["cond_scale"] = given.get("rtg_scale", Config.rtg_scale)
    cfg = Config(**{**row, **PRESETS.get(preset, {}), **method_row, **given})
    if cfg.context <= 0:
        cfg.context = cfg.horizon - 1
    if not cfg.out:  # a Minari id holds '/' and ':'; the run directory stays one folder
        cfg.out = os.path.join("runs", f"{cfg.env.replace(':', '-').replace('/', '-')}-s{cfg.seed}")
    return cfg


# ----------------------------------------------------------------------------------------------------
# The checkpoint contract: each network's constructor arguments (model_args) and the networks they build
# ----------------------------------------------------------------------------------------------------
def build_networks(model_args: dict) -> dict[str, nn.Module]:
    """The networks named in model_args (a checkpoint's "model_args"), on the CPU, plus "ema", a frozen copy of
    the denoiser that planning uses. The denoiser's x_0 clamp is a buffer: its weights bring their own."""
    unet = TemporalUnet(**model_args["unet"])
    denoiser = GaussianDiffusion(unet, **model_args["diffusion"])
    nets = {"transformer": TrajectoryTransformer(**model_args["transformer"]), "diffusion": denoiser,
            "ema": copy.deepcopy(denoiser).requires_grad_(False), "invdyn": InverseDynamics(**model_args["invdyn"])}
    if "critic" in model_args:
        nets["critic"] = Critic(**model_args["critic"])
    return nets


def load_checkpoint(path, map_location="cpu") -> dict:
    """Safe load (weights_only=True: a file from someone else cannot run code) with one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint {path} does not exist; train one with python train.py --out DIR "
                         f"(it writes DIR/checkpoint.pt)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        reason = ("it holds Python objects that a safe load (weights_only=True) refuses to build"
                  if type(e).__name__ == "UnpicklingError" else f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        raise UsageError(f"checkpoint {path} could not be read ({reason}); is it a train.py checkpoint?") from e
    version = ckpt.get("format_version") if isinstance(ckpt, dict) else None
    if version != FORMAT_VERSION:
        raise UsageError(f"checkpoint {path} has format version {version}, this code reads version "
                         f"{FORMAT_VERSION}; retrain it, or use the project version that wrote it")
    return ckpt


def planning_copy(ckpt: dict) -> dict:
    """A checkpoint that can act but not resume: the config, model_args, normalizer and the networks planning
    uses (transformer, EMA denoiser, inverse dynamics, critic), without optimizer, RNG or raw denoiser."""
    slim = {k: v for k, v in ckpt.items() if k not in ("models", "optimizer", "scheduler", "rng")}
    slim.update(models={k: v for k, v in ckpt["models"].items() if k != "diffusion"}, planning_only=True)
    return slim


def model_args(cfg: Config, state_dim: int, action_dim: int, normalizer) -> dict:
    """Constructor arguments of every network (build_networks builds them). The normalizer's per-dimension
    data range becomes the denoiser's x_0 clamp, a buffer that its state_dict then carries."""
    S, A = state_dim, action_dim
    args = {
        "transformer": dict(state_dim=S, half_dim=cfg.tf_half_dim, n_layer=cfg.tf_layers, n_head=cfg.tf_heads,
                            ffn_dim=cfg.tf_ffn, dropout=cfg.tf_dropout, max_len=cfg.context + cfg.horizon - 1,
                            causal=cfg.causal),
        "unet": dict(state_dim=S, dim=cfg.unet_dim, dim_mults=[int(m) for m in str(cfg.unet_mults).split(",")],
                     horizon=cfg.horizon, time_mult=cfg.unet_time_mult, full_skip=cfg.unet_full_skip),
        "diffusion": dict(horizon=cfg.horizon, state_dim=S, n_timesteps=cfg.n_timesteps, schedule=cfg.schedule,
                          cond_drop_prob=cfg.cond_drop_prob, prediction=cfg.prediction, clip_denoised=cfg.x0_clamp,
                          x_low=normalizer.low.tolist(), x_high=normalizer.high.tolist()),
        "invdyn": dict(state_dim=S, action_dim=A, hidden=cfg.invdyn_hidden),
    }
    if cfg.use_critic:
        args["critic"] = dict(state_dim=S, action_dim=A, hidden=cfg.critic_hidden)
    return args
