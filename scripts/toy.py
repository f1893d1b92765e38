"""The paper's toy experiment, built from this project's own components: the diffusion model as an optimizer.

What it reproduces. The official Trajectory Diffuser repository has a one-dimensional toy: 500 trajectories of
length 64, 80% cos(2 pi 5 x) and 20% cos(2 pi 3 x) for x in [0, 1], plus N(0, 0.1^2) noise. A Transformer and a
diffusion model are each trained for 1000 Adam steps (lr 1e-3, batch 32); the Transformer, with dropout left on,
rolls out 256 trajectories from y0 = 1; the diffusion model refines them at level 20 of 100; a figure shows the
samples and their Fourier spectra before and after. This script does the same with `transformer.py` and
`diffusion.py` exactly as they are (imported, never copied or subclassed), and measures what the figure shows.

    python scripts/toy.py                       # the toy: results/toy/toy.json and docs/toy.png
    python scripts/toy.py --conditioned         # the return-conditioned variant: results/toy/toy_conditioned.json
    python scripts/toy.py --replot              # redraw docs/toy.png from the JSON files, no training
    python scripts/toy.py --mix 0.5 --freqs 4,2 --seed 1 --json /tmp/t.json --no-figure --threads 1

Time, at --threads 1 on the project's 2-core AMD EPYC machine while other training jobs kept it loaded (so these
are upper bounds): the default run 3 min 44 s wall (load average 2-4; 2.9 min of CPU time), --conditioned 19 min
(load 5-6) and 46 min (load 6-8) wall, 8-9 min of CPU time: more rows, and every guided step is a double batch.
Test: python -m pytest test_all.py -k toy_refinement (test_toy_refinement_repairs_off_data_plans: a reduced run
in-process, where refinement must pull the Transformer's dropout samples back onto the data's modes).

The models (sizes fixed here, small on purpose):
  * TrajectoryTransformer(state_dim=1, half_dim=32, n_layer=2, n_head=2, ffn_dim=64, dropout=0.1,
    max_len=length). Tokens are (state, return-to-go); without a condition the return is 0 everywhere. It reads
    y0 (one history token) and rolls out length - 1 states, so a plan is [y0, rollout] of the data's length.
  * TemporalUnet(state_dim=1, dim=32, dim_mults=(1, 2, 4)) inside GaussianDiffusion(horizon=length,
    state_dim=1, n_timesteps=100, schedule="cosine", prediction="v"), x0 clamped to the data's range, as
    train.py does. The first state is inpainted (GaussianDiffusion keeps it clean and out of the loss), so every
    sampler starts at y0 = 1 = cos(0); the data start at 1 plus noise.
  * Unconditioned run: the denoiser is trained with cond_drop_prob = 0 on returns that are all 0 and sampled
    with w = 1. A constant condition carries no information, so the "conditional" net is simply the
    unconditional one (the zero return adds one learned constant to the embedding), and w = 1 is its plain
    output in a single pass. Training with condition dropout here would only spend steps on a second, equal model.
  * --conditioned: each trajectory carries a return, 1 for the minority frequency (the second of --freqs) and 0
    for the majority (the first). The Transformer reads it as its return-to-go, constant along the trajectory;
    the denoiser is trained on it with condition dropout (cond_drop_prob = 0.25), for classifier-free guidance.

Samplers (rows). Unconditioned: "data" (the 500 training trajectories); "transformer" (eval mode: dropout off,
so all samples are the same plan); "transformer_dropout" (model.train() while rolling out, as the official toy
does); "refine": those dropout samples refined with GaussianDiffusion.refine at k = 5, 10, 20, 40, with
(add_noise=True, this project's default) and without (add_noise=False, the official variant) noising them to
level k first; "from_noise": GaussianDiffusion.sample at temperature alpha = 1 and 0.5.
Conditioned: "transformer" asked for return 0 (the plans to be optimized) and 1; "refine": the return-0 plans
refined toward return 1, refine(plans, k, returns=1, w, add_noise=True) for k in 5, 10, 20, 40, 60, 100 and
w in 1.2, 2, 4; "from_noise" asked for 1 at the same w, alpha = 1 (alpha = 0.5 was left out: in a first
seed-0 run it also gave 100% on the asked mode at every w, and cost a fifth of the run's time).

Metrics, on each sampler's samples (the clean modes are cos(2 pi f x) for f in --freqs):
  * rms to a mode = sqrt(mean over the trajectory's points of (y - mode)^2), first point included;
  * on_mode = fraction of samples within rms 0.2 of some mode; on_none = 1 - on_mode;
  * rms_to_mode = median over samples of the rms to the nearest mode;
  * mode_share = fraction of ALL samples whose nearest mode is each frequency (order of --freqs), on a mode or
    not: it says where the samples lean, on_mode says whether they arrived;
  * conditioned rows also: asked (the return asked for), w (guidance), on_asked = fraction of samples within
    rms 0.2 of the asked-for mode (return 1: the minority frequency; return 0: the majority).

Output: the JSON {"config": {...}, "seconds": total wall time, "timing": {...}, "rows": [...], "curves": {...}},
one row per sampler as {"planner", "k", "add_noise", "temperature", "on_mode", "rms_to_mode", "mode_share"}
(plus "asked", "w", "on_asked", "on_none" with --conditioned; fields that do not apply are null), and "curves"
holding, for the samplers the figure draws, 24 example trajectories and the mean |FFT| over all samples.
The same table goes to stdout.

The figure (--out, default docs/toy.png) is drawn from this run's JSON and from the other variant's JSON if that
file sits in the same folder under its default name (toy.json <-> toy_conditioned.json) with the same data
settings and seed; so after both default runs it holds both: the unconditioned rows (trajectories, then
spectra: data, Transformer with dropout, refined at k = 20 without and with noise first, diffusion from noise)
and the conditioned rows (the return-0 plans, those plans refined toward return 1 at k = 20 and 40 with w = 2,
the Transformer asked for 1, and heat maps of on_asked and on_none over k x w).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the components live in the repository root

import numpy as np  # noqa: E402
import torch  # noqa: E402

from diffusion import GaussianDiffusion, TemporalUnet  # noqa: E402
from transformer import TrajectoryTransformer  # noqa: E402

N_TRAJ = 500             # training trajectories, as in the official toy
BATCH, LR = 32, 1e-3     # Adam, both models
ON_MODE_RMS = 0.2        # a sample is "on" a mode when its rms to that clean curve is below this
N_EXAMPLES = 24          # example trajectories per figured sampler kept in the JSON
UNET_MULTS = (1, 2, 4)   # U-Net levels: the horizon must be divisible by 2 ** (levels - 1) = 4
REFINE_KS = (5, 10, 20, 40)                  # unconditioned refinement levels
COND_KS, COND_WS = (5, 10, 20, 40, 60, 100), (1.2, 2.0, 4.0)  # conditioned: levels x guidance weights
TEMPERATURES = (1.0, 0.5)                    # unconditioned from-noise sampling temperatures alpha
# conditioned: alpha = 1 only. In a first seed-0 run alpha = 0.5 also put 100% of samples on the asked mode at
# every w, and its three rows of 100 guided (double-batch) steps took a fifth of the run's time.
COND_TEMPERATURES = (1.0,)


class ToyError(ValueError):
    """A bad setting; main() prints it as one line."""


# ----------------------------------------------------------------------------- settings

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="The Trajectory Diffuser toy on this project's components.")
    p.add_argument("--freqs", default="5,3", help="mode frequencies, the majority first (default 5,3)")
    p.add_argument("--mix", type=float, default=0.8, help="share of the first frequency in the data, in (0, 1)")
    p.add_argument("--noise", type=float, default=0.1, help="std of the Gaussian noise added to the data")
    p.add_argument("--length", type=int, default=64, help="points per trajectory (divisible by 4)")
    p.add_argument("--steps", type=int, default=1000, help="Adam steps for each model")
    p.add_argument("--samples", type=int, default=256, help="samples per sampler")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--conditioned", action="store_true", help="the return-conditioned variant")
    p.add_argument("--json", default=None, help="results file (default results/toy/toy.json, "
                                                "or results/toy/toy_conditioned.json with --conditioned)")
    p.add_argument("--out", default="docs/toy.png", help="figure (default docs/toy.png)")
    p.add_argument("--no-figure", action="store_true", help="write no figure")
    p.add_argument("--replot", action="store_true", help="only redraw --out from the JSON file(s); no training")
    p.add_argument("--threads", type=int, default=0, help="torch threads, 0 = all cores")
    args = p.parse_args(argv)
    if args.json is None:
        args.json = f"results/toy/{'toy_conditioned' if args.conditioned else 'toy'}.json"
    return args


def check_args(args):
    """Validate the settings (ToyError with a one-line message) and return the frequencies as floats."""
    try:
        freqs = [float(f) for f in str(args.freqs).split(",")]
    except ValueError:
        raise ToyError(f"--freqs must be comma-separated numbers, got {args.freqs!r}") from None
    if len(freqs) < 2 or len(set(freqs)) != len(freqs) or min(freqs) <= 0:
        raise ToyError(f"--freqs needs at least two distinct positive frequencies, got {args.freqs!r}")
    if args.conditioned and len(freqs) != 2:
        raise ToyError(f"--conditioned needs exactly two frequencies (majority, minority), got {args.freqs!r}")
    if not 0.0 < args.mix < 1.0:
        raise ToyError(f"--mix is the majority's share and must lie strictly between 0 and 1, got {args.mix}")
    if args.noise < 0:
        raise ToyError(f"--noise must be >= 0, got {args.noise}")
    if args.length < 4 or max(freqs) >= args.length / 2:
        raise ToyError(f"--length {args.length} is too short: it needs >= 4 points and more than 2 per period "
                       f"of the highest frequency {max(freqs):g}")
    try:  # the U-Net's own check: the horizon halves at every level but the last
        TemporalUnet(1, dim=8, dim_mults=UNET_MULTS, horizon=args.length)
    except ValueError as e:
        raise ToyError(f"--length: {e}") from None
    for name in ("steps", "samples"):
        if getattr(args, name) < 1:
            raise ToyError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.threads < 0:
        raise ToyError(f"--threads must be >= 0 (0 = all cores), got {args.threads}")
    return freqs


# ----------------------------------------------------------------------------- data and metrics

def make_data(freqs, mix, noise, length, n, seed):
    """n noisy trajectories y = cos(2 pi f x) + noise on x = linspace(0, 1, length), f drawn with shares
    [mix, (1 - mix) / (F - 1), ...]. Returns x (L,), y (n, L), the frequency index of each (n,)."""
    g = torch.Generator().manual_seed(seed)  # its own stream: the data do not depend on --steps or the models
    shares = torch.tensor([mix] + [(1 - mix) / (len(freqs) - 1)] * (len(freqs) - 1))
    label = torch.multinomial(shares, n, replacement=True, generator=g)          # (n,)
    x = torch.linspace(0, 1, length)
    f = torch.tensor(freqs)[label]                                                # (n,)
    y = torch.cos(2 * torch.pi * f[:, None] * x[None, :])                         # (n, 1) * (1, L) -> (n, L)
    return x, y + noise * torch.randn(n, length, generator=g), label


def clean_modes(freqs, x):
    """The noise-free curves cos(2 pi f x), one per frequency: (F, L)."""
    return torch.cos(2 * torch.pi * torch.tensor(freqs)[:, None] * x[None, :])


def mode_metrics(y, modes, asked=None):
    """y (B, L) samples, modes (F, L) -> the metrics of the module docstring (floats, and a list per mode)."""
    rms = (y[:, None, :] - modes[None]).pow(2).mean(-1).sqrt()                    # (B, 1, L) - (1, F, L) -> (B, F)
    best, nearest = rms.min(dim=1)                                                # (B,), (B,)
    on = best < ON_MODE_RMS
    share = lambda mask: round(mask.float().mean().item(), 4)  # noqa: E731
    out = {"on_mode": share(on), "rms_to_mode": round(best.median().item(), 4),
           "mode_share": [share(nearest == i) for i in range(modes.shape[0])]}
    if asked is not None:  # conditioned: the asked-for mode is freqs[asked] (0: majority, 1: minority)
        out["on_asked"] = share(rms[:, asked] < ON_MODE_RMS)
        out["on_none"] = share(~on)
    return out


def mean_spectrum(y):
    """Mean |FFT| over samples, scaled so that a pure cosine of amplitude 1 peaks near 1: (B, L) -> (L//2 + 1,)."""
    return (torch.fft.rfft(y, dim=-1).abs() * 2 / y.shape[-1]).mean(0)


# ----------------------------------------------------------------------------- the two models

def build_models(length, data_y, cond_drop_prob):
    transformer = TrajectoryTransformer(state_dim=1, half_dim=32, n_layer=2, n_head=2, ffn_dim=64, dropout=0.1,
                                        max_len=length)
    unet = TemporalUnet(state_dim=1, dim=32, dim_mults=UNET_MULTS, horizon=length)
    diffusion = GaussianDiffusion(unet, horizon=length, state_dim=1, n_timesteps=100, schedule="cosine",
                                  prediction="v", cond_drop_prob=cond_drop_prob,
                                  x_low=data_y.min().reshape(1), x_high=data_y.max().reshape(1))  # the data's range
    return transformer, diffusion


def train(name, model_loss, params, y, ret, steps, progress=True):
    """steps Adam steps (lr 1e-3) on batches of 32 trajectories drawn with replacement.
    model_loss(states (B, L, 1), returns (B, 1)) -> scalar loss. Returns the last loss."""
    from tqdm import tqdm
    opt = torch.optim.Adam(params, lr=LR)
    bar = tqdm(range(steps), desc=f"train {name}", disable=not progress, dynamic_ncols=True, leave=False)
    for step in bar:
        idx = torch.randint(0, y.shape[0], (BATCH,))
        loss = model_loss(y[idx][..., None], ret[idx][:, None])                   # (B, L) -> (B, L, 1); (B,) -> (B, 1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    return loss.item()


@torch.no_grad()
def transformer_plans(transformer, n, length, ret, dropout):
    """n plans [y0 = 1, rollout of length - 1 states], asked for return-to-go ret. dropout=True keeps the
    model in train mode while rolling out (the official toy's source of diversity): (n, L)."""
    transformer.train(dropout)
    hist_s = torch.ones(n, 1, 1)                                                  # y0 = cos(0) = 1 at position 0
    hist_r = torch.full((n, 1, 1), float(ret))
    future, _ = transformer.rollout(hist_s, hist_r, length - 1)                   # (n, L-1, 1); rtg fed back too
    transformer.eval()
    return torch.cat([hist_s, future], dim=1)[..., 0]                             # (n, L, 1) -> (n, L)


# ----------------------------------------------------------------------------- the runs

def run(args, refine_ks=None, from_noise=True, progress=True):
    """Train both models on the toy data and evaluate every sampler. Returns the JSON-ready result dict.
    refine_ks / from_noise trim the sampler set (the test uses them); None means this variant's default levels."""
    freqs = check_args(args)
    t_start = time.perf_counter()
    x, y, label = make_data(freqs, args.mix, args.noise, args.length, N_TRAJ, args.seed)
    modes = clean_modes(freqs, x)
    # returns: unconditioned, 0 everywhere; conditioned, 1 for the minority frequency, 0 for the majority
    ret = (label == 1).float() if args.conditioned else torch.zeros(N_TRAJ)
    torch.manual_seed(args.seed)
    transformer, diffusion = build_models(args.length, y, cond_drop_prob=0.25 if args.conditioned else 0.0)

    def tf_loss(states, returns):  # the return-to-go token is the trajectory's return, constant along it
        return transformer.loss(states, returns[:, None, :].expand(-1, states.shape[1], 1))[0]

    t0 = time.perf_counter()
    tf_last = train("transformer", tf_loss, transformer.parameters(), y, ret, args.steps, progress)
    t1 = time.perf_counter()
    diff_last = train("diffusion", diffusion.loss, diffusion.parameters(), y, ret, args.steps, progress)
    t2 = time.perf_counter()
    transformer.eval()
    diffusion.eval()

    rows, curves = [], {}
    n = args.samples
    bar = None

    def add(samples, figured=False, **fields):
        """Measure one sampler, append its row, keep its curves if the figure draws it."""
        row = dict(planner=fields.pop("planner"), k=fields.pop("k", None), add_noise=fields.pop("add_noise", None),
                   temperature=fields.pop("temperature", None), **fields)
        asked = row.get("asked")
        row.update(mode_metrics(samples, modes, asked))
        rows.append(row)
        if figured:
            curves[row_label(row)] = {"examples": samples[:N_EXAMPLES].round(decimals=3).tolist(),
                                      "spectrum": mean_spectrum(samples).round(decimals=4).tolist(),
                                      "on_mode": row["on_mode"], "on_asked": row.get("on_asked"),
                                      "mode_share": row["mode_share"]}
        if bar is not None:
            bar.update(1)

    from tqdm import tqdm
    torch.manual_seed(args.seed + 1)  # the sampling stream, apart from training's
    if not args.conditioned:
        ks = REFINE_KS if refine_ks is None else refine_ks
        temps = TEMPERATURES if from_noise else ()
        bar = tqdm(total=3 + 2 * len(ks) + len(temps), desc="sample", disable=not progress, leave=False)
        zeros = torch.zeros(n, 1)
        add(y, figured=True, planner="data")
        add(transformer_plans(transformer, n, args.length, 0.0, dropout=False), planner="transformer")
        plans = transformer_plans(transformer, n, args.length, 0.0, dropout=True)  # (n, L)
        add(plans, figured=True, planner="transformer_dropout")
        for k in ks:
            for add_noise in (False, True):
                refined = diffusion.refine(plans[..., None], k, zeros, w=1.0, add_noise=add_noise)[..., 0]
                add(refined, figured=(k == 20), planner="refine", k=k, add_noise=add_noise, temperature=1.0)
        for alpha in temps:
            sampled = diffusion.sample(torch.ones(n, 1), zeros, w=1.0, temperature=alpha)[..., 0]
            add(sampled, figured=(alpha == 1.0), planner="from_noise", temperature=alpha)
    else:
        ks = COND_KS if refine_ks is None else refine_ks
        temps = COND_TEMPERATURES if from_noise else ()
        bar = tqdm(total=2 + len(ks) * len(COND_WS) + len(temps) * len(COND_WS), desc="sample",
                   disable=not progress, leave=False)
        ones = torch.ones(n, 1)
        for asked in (0, 1):  # eval mode: one deterministic plan per asked return
            add(transformer_plans(transformer, n, args.length, asked, dropout=False), figured=True,
                planner="transformer", asked=asked)
        plans = transformer_plans(transformer, n, args.length, 0.0, dropout=False)[..., None]  # return-0 plans
        for k in ks:
            for w in COND_WS:
                refined = diffusion.refine(plans, k, ones, w=w, add_noise=True)[..., 0]
                add(refined, figured=(k in (20, 40) and w == 2.0), planner="refine", k=k, add_noise=True,
                    temperature=1.0, asked=1, w=w)
        for alpha in temps:
            for w in COND_WS:
                sampled = diffusion.sample(ones, ones, w=w, temperature=alpha)[..., 0]
                add(sampled, planner="from_noise", temperature=alpha, asked=1, w=w)
    bar.close()
    t3 = time.perf_counter()
    config = dict(freqs=freqs, mix=args.mix, noise=args.noise, length=args.length, steps=args.steps,
                  samples=n, seed=args.seed, conditioned=args.conditioned, n_trajectories=N_TRAJ,
                  batch=BATCH, lr=LR, on_mode_rms=ON_MODE_RMS,
                  threads=torch.get_num_threads(), load_average_at_start=None, torch=torch.__version__,
                  final_loss={"transformer": round(tf_last, 5), "diffusion": round(diff_last, 5)})
    return {"config": config, "seconds": round(t3 - t_start, 1),
            "timing": {"train_transformer": round(t1 - t0, 1), "train_diffusion": round(t2 - t1, 1),
                       "sampling": round(t3 - t2, 1)},
            "rows": rows, "curves": curves}


# ----------------------------------------------------------------------------- reporting

def row_label(row):
    """A short readable name of a sampler, e.g. 'refine k=20 (noise first)', 'from noise a=0.5 w=2'."""
    p = row["planner"]
    if p == "refine":
        s = f"refine k={row['k']} ({'noise first' if row['add_noise'] else 'no noise'})"
    elif p == "from_noise":
        s = f"from noise a={row['temperature']:g}"
    else:
        s = p
    if row.get("asked") is not None:
        s += f" R={row['asked']}"
    if row.get("w") is not None:
        s += f" w={row['w']:g}"
    return s


def format_table(result):
    """The rows as a fixed-width text table."""
    cfg = result["config"]
    freqs = [f"{f:g}" for f in cfg["freqs"]]
    head = f"{'sampler':36s} {'on_mode':>7s} {'rms':>6s}  " + " ".join(f"share f={f:>3s}" for f in freqs)
    if cfg["conditioned"]:
        head += f" {'on_asked':>8s} {'on_none':>7s}"
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        line = f"{row_label(r):36s} {r['on_mode']:7.1%} {r['rms_to_mode']:6.3f}  " + \
               " ".join(f"{s:11.1%}" for s in r["mode_share"])
        if cfg["conditioned"]:
            line += f" {r['on_asked']:8.1%} {r['on_none']:7.1%}"
        lines.append(line)
    return "\n".join(lines)


def partner_json(path, result):
    """The other variant's JSON beside this one (toy.json <-> toy_conditioned.json), if it exists and was made
    from the same data and seed; else None."""
    path = pathlib.Path(path)
    other = path.with_name("toy.json" if result["config"]["conditioned"] else "toy_conditioned.json")
    if other == path or not other.is_file():
        return None
    res = json.loads(other.read_text())
    same = ("freqs", "mix", "noise", "length", "steps", "seed")
    if any(res["config"].get(key) != result["config"].get(key) for key in same):
        print(f"figure: {other} has other data settings or seed; left out")
        return None
    return res


def draw_figure(uncond, cond, out):
    """uncond / cond: result dicts (either may be None). Unconditioned: a row of trajectory panels and a row of
    their spectra. Conditioned: the same two rows for its figured samplers, and heat maps over k x w."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    parts = [r for r in (uncond, cond) if r is not None]
    cfg = parts[0]["config"]
    L, freqs = cfg["length"], cfg["freqs"]
    x = np.linspace(0, 1, L)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    n_cols = 5
    fig, axes = plt.subplots(2 * len(parts), n_cols, figsize=(3.3 * n_cols, 5.2 * len(parts)), squeeze=False)

    def traj_panel(ax, cur, title, asked=None):
        for yy in cur["examples"]:
            ax.plot(x, yy, color="k", lw=0.5, alpha=0.4)
        for f, c in zip(freqs, colors[1:]):  # the clean modes, dashed, over the samples
            ax.plot(x, np.cos(2 * np.pi * f * x), "--", color=c, lw=1.2, alpha=0.9, label=f"cos(2$\\pi${f:g}x)")
        frac = f"{cur['on_mode']:.0%} on a mode, {cur['mode_share'][1]:.0%} nearest f={freqs[1]:g}"
        if asked is not None:  # conditioned: return 1 asks for the minority (freqs[1]), 0 for the majority
            frac = f"{cur['on_asked']:.0%} on the R={asked} mode (f={freqs[asked]:g}), {1 - cur['on_mode']:.0%} on none"
        ax.set_title(f"{title}\n{frac}", fontsize=9)
        ax.set_ylim(-1.8, 1.8)
        ax.set_xlabel("x", fontsize=8)

    def spec_panel(ax, cur):
        spec = np.asarray(cur["spectrum"])
        ax.bar(np.arange(len(spec)), spec, color="0.3", width=0.8)
        for f, c in zip(freqs, colors[1:]):
            ax.axvline(f * (L / (L - 1)), color=c, ls="--", lw=1.2)  # linspace(0, 1, L) includes x = 1
        ax.set_xlim(-0.5, min(len(spec), 4 * max(freqs)) - 0.5)
        ax.set_ylim(0, 1.1)
        ax.set_xlabel("frequency (cycles over the trajectory)", fontsize=8)
        ax.set_title("mean |FFT|", fontsize=9)

    def draw_rows(row, cur, panels, label, asked_of=None):
        """Two rows of panels: the trajectories (row) and their spectra (row + 1), one column per (key, title)."""
        for col, (key, title) in enumerate(panels):
            if key not in cur:
                axes[row, col].axis("off")
                axes[row + 1, col].axis("off")
                continue
            traj_panel(axes[row, col], cur[key], title, asked_of[key] if asked_of else None)
            spec_panel(axes[row + 1, col], cur[key])
        axes[row, 0].legend(fontsize=7, loc="lower left")
        axes[row, 0].set_ylabel(f"{label}\ny", fontsize=9)

    row = 0
    if uncond is not None:
        cur = uncond["curves"]
        panels = [("data", "data"), ("transformer_dropout", "Transformer, dropout on"),
                  ("refine k=20 (no noise)", "refined k=20, no noise first\n(official)"),
                  ("refine k=20 (noise first)", "refined k=20, noise first\n(ours)"),
                  ("from noise a=1", "diffusion from noise, $\\alpha$=1")]
        draw_rows(row, cur, panels, f"unconditioned (seed {uncond['config']['seed']})")
        row += 2
    if cond is not None:
        cur = cond["curves"]
        asked_of = {row_label(r): r["asked"] for r in cond["rows"]}
        panels = [("transformer R=0", "Transformer asked R=0\n(the plan to optimize)"),
                  ("refine k=20 (noise first) R=1 w=2", "R=0 plan refined toward R=1\nk=20, w=2"),
                  ("refine k=40 (noise first) R=1 w=2", "R=0 plan refined toward R=1\nk=40, w=2"),
                  ("transformer R=1", "Transformer asked R=1")]
        draw_rows(row, cur, panels, f"return-conditioned (seed {cond['config']['seed']})", asked_of)
        refine = [r for r in cond["rows"] if r["planner"] == "refine"]
        ks = sorted({r["k"] for r in refine})
        ws = sorted({r["w"] for r in refine})
        for j, (field, title, cmap) in enumerate((("on_asked", "share on the asked (R=1) mode", "Greens"),
                                                  ("on_none", "share on no mode", "Reds"))):
            ax = axes[row + j, 4]
            grid = np.full((len(ws), len(ks)), np.nan)
            for r in refine:
                grid[ws.index(r["w"]), ks.index(r["k"])] = r[field]
            ax.imshow(grid, cmap=cmap, vmin=0, vmax=1, aspect="auto", origin="lower")
            for i in range(len(ws)):
                for m in range(len(ks)):
                    v = grid[i, m]
                    ax.text(m, i, f"{v:.0%}", ha="center", va="center", fontsize=8,
                            color="white" if v > 0.6 else "black")
            ax.set_xticks(range(len(ks)), [str(k) for k in ks], fontsize=8)
            ax.set_yticks(range(len(ws)), [f"{w:g}" for w in ws], fontsize=8)
            ax.set_xlabel("refinement level k", fontsize=8)
            ax.set_ylabel("guidance w", fontsize=8)
            ax.set_title(f"R=0 plans refined toward R=1:\n{title}", fontsize=9)
    for ax in axes.flat:
        ax.tick_params(labelsize=7)
    fig.suptitle(f"Toy: {cfg['mix']:.0%} cos(2$\\pi${freqs[0]:g}x), {1 - cfg['mix']:.0%} "
                 f"cos(2$\\pi${freqs[1]:g}x) + N(0, {cfg['noise']:g}$^2$); {cfg['steps']} Adam steps per model; "
                 f"on a mode = rms < {ON_MODE_RMS:g} to a clean curve (dashed)", fontsize=11)
    fig.tight_layout()
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def figure_from(json_path, result, out):
    """Draw `out` from this result and its partner JSON, if any; say which files went in."""
    partner = partner_json(json_path, result)
    uncond, cond = (partner, result) if result["config"]["conditioned"] else (result, partner)
    draw_figure(uncond, cond, out)
    used = [str(json_path)] + ([str(partner_json_path(json_path, result))] if partner else [])
    print(f"figure: {out} from {', '.join(used)}")


def partner_json_path(path, result):
    return pathlib.Path(path).with_name("toy.json" if result["config"]["conditioned"] else "toy_conditioned.json")


def to_json(result):
    """The result as JSON text, one row (and one example trajectory) per line so that diffs stay readable."""
    dump = json.dumps
    rows = ",\n  ".join(dump(r) for r in result["rows"])
    curves = []
    for name, c in result["curves"].items():
        examples = ",\n    ".join(dump(e) for e in c["examples"])
        rest = dump({key: v for key, v in c.items() if key != "examples"})[1:-1]
        curves.append(f'  {dump(name)}: {{{rest}, "examples": [\n    {examples}]}}')
    curves = ",\n".join(curves)
    return (f'{{"config": {dump(result["config"])},\n "seconds": {dump(result["seconds"])},\n'
            f' "timing": {dump(result["timing"])},\n "rows": [\n  {rows}],\n "curves": {{\n{curves}}}}}\n')


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.replot:
            if not pathlib.Path(args.json).is_file():
                raise ToyError(f"--replot: no results file {args.json}; run without --replot first")
            figure_from(args.json, json.loads(pathlib.Path(args.json).read_text()), args.out)
            return
        check_args(args)  # before anything else, so that a bad setting fails at once
        if args.threads:
            torch.set_num_threads(args.threads)
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        result = run(args)
    except ToyError as e:
        sys.exit(f"toy.py: error: {e}")
    result["config"]["load_average_at_start"] = load
    print(format_table(result))
    t = result["timing"]
    print(f"{result['seconds']:.0f} s on {result['config']['threads']} thread(s) (train transformer "
          f"{t['train_transformer']:.0f} s, diffusion {t['train_diffusion']:.0f} s, sampling {t['sampling']:.0f} s; "
          f"1-min load average at start {load})")
    path = pathlib.Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_json(result))
    print(f"results: {path}")
    if not args.no_figure:
        figure_from(path, result, args.out)


if __name__ == "__main__":
    main()
