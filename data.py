"""Offline datasets for Trajectory Diffuser: episodes, normalization, return-to-go windows, the data CLI.

This file turns a dataset's arrays (read by sources.py, which knows every name and where its data come from)
into what training uses. It splits the data into episodes, computes returns-to-go (the condition of the paper's
Transformer and denoiser, Huang et al., ECCV 2024), normalizes states (the models only ever see normalized
states) and gathers the fixed-length training windows. Environments live in envs.py; `make_env` here only
delegates, in the dynamics read off the data (`choose_dynamics`).

Window rule (`WindowSampler`), for a window of L steps inside an episode of n steps:
  - an episode that ends on a timeout (or where the data end) gives starts 0 .. max(n - L, 0);
    shorter than L, it gives start 0 only, padded;
  - an episode that ends on a terminal gives starts 0 .. n - 1: the padding after its last step is the
    absorbing terminal state, marked `terminal`;
  - padded steps repeat the last real (normalized) state, carry action 0 and rtg 0, and have mask 0;
  - `next_mask` is 1 only where the next state is known: a real step that is not the episode's last, or
    the last one when the file has next_observations. Use it for the inverse-dynamics loss.

Shape legend: N = transitions, E = episodes, B = batch, L = window length, S = state dim, A = action dim.
Tests: python -m pytest test_all.py -k data
CLI:   python data.py --list ;  python data.py --env halfcheetah-medium-sb3 [--dataset PATH]
"""
from __future__ import annotations

import argparse
import pathlib
import sys
from dataclasses import dataclass, field

import h5py
import numpy as np
import torch

from sources import (DATASETS, MINARI_PREFIX, DatasetInfo, UsageError, get_info, has_reference_scores, load_arrays,
                     load_minari, normalized_score, resolve_path)


def run_cli(fn, debug: bool = False) -> int:
    """The one main() wrapper of every command: run fn(); a UsageError (or a ValueError from a bad argument)
    becomes one line on stderr and exit code 2, unless --debug asks for the traceback."""
    try:
        fn()
    except (UsageError, ValueError) as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


# ---------------------------------------------------------------------------------------------------------
# Normalizer and returns-to-go
# ---------------------------------------------------------------------------------------------------------
class Normalizer:
    """Per-dimension Gaussian normalization over all dataset states: (x - mean) / std.

    It also keeps each dimension's range in normalized units (low, high: the data's min and max), which the
    denoiser clamps its x_0 predictions to; it travels with the checkpoint like mean and std.
    """

    # DEVIATION: the official code divides by (std + 1e-5) (fit(x, eps=1e-5)), which turns a constant dimension's
    # tiny evaluation-time drift into huge inputs. A floor of 1e-2 is small against D4RL state scales (0.1 to 10)
    # and caps that blow-up at 100x; a dimension this flat carries no signal the models could lose.
    STD_FLOOR = 1e-2

    def __init__(self, mean, std, low=None, high=None):
        def vec(v):
            return torch.as_tensor(np.asarray(v) if not torch.is_tensor(v) else v).detach().cpu().float()
        mean, std = vec(mean), vec(std)
        if mean.ndim != 1 or mean.shape != std.shape or not bool((std > 0).all()):
            raise ValueError(f"Normalizer needs 1-d mean and std of equal shape with std > 0, got "
                             f"{tuple(mean.shape)} and {tuple(std.shape)}")
        self.mean, self.std = mean, std
        # normalized range of the data; without it (a hand-made normalizer) the denoiser's default clamp applies
        self.low = None if low is None else vec(low)
        self.high = None if high is None else vec(high)
        self._np = (mean.numpy(), std.numpy())

    @classmethod
    def fit(cls, x, eps: float = 0.0) -> "Normalizer":
        """eps = 0: std floored at STD_FLOOR; eps > 0: std + eps (official)."""
        x = np.asarray(x, dtype=np.float64)  # (N, S); float64 so that the sums over N do not lose digits
        mean, std = x.mean(0), (x.std(0) + eps if eps > 0 else np.maximum(x.std(0), cls.STD_FLOOR))
        return cls(mean, std, (x.min(0) - mean) / std, (x.max(0) - mean) / std)

    def _stats(self, x):
        if torch.is_tensor(x):
            return self.mean.to(x.device, x.dtype), self.std.to(x.device, x.dtype)
        return self._np

    def normalize(self, x):  # (..., S) -> (..., S)
        mean, std = self._stats(x)
        return (x - mean) / std

    def unnormalize(self, x):  # (..., S) -> (..., S)
        mean, std = self._stats(x)
        return x * std + mean

    @property
    def n_floored(self) -> int:
        return int((self.std <= self.STD_FLOOR).sum())

    def state_dict(self) -> dict:
        d = {"mean": self.mean.clone(), "std": self.std.clone()}
        if self.low is not None:
            d.update(low=self.low.clone(), high=self.high.clone())
        return d

    @classmethod
    def from_state_dict(cls, d) -> "Normalizer":
        return cls(d["mean"], d["std"], d.get("low"), d.get("high"))


def returns_to_go(rewards, discount: float = 1.0) -> np.ndarray:
    """R_t = sum_{k >= t} discount^(k - t) r_k within one episode; float64, (T,) -> (T,)."""
    r = np.asarray(rewards, dtype=np.float64)
    if discount == 1.0:  # official: undiscounted (its --gamma is parsed and never used)
        return np.cumsum(r[::-1])[::-1].copy()
    out, acc = np.empty_like(r), 0.0
    for t in range(len(r) - 1, -1, -1):
        acc = r[t] + discount * acc
        out[t] = acc
    return out


# ---------------------------------------------------------------------------------------------------------
# Episodes
# ---------------------------------------------------------------------------------------------------------
def split_episodes(terminals, timeouts, max_steps: int | None):
    """Episode (starts, lengths) for flags of length N; a step with terminals | timeouts ends its episode.

    DEVIATION: the official loader calls qlearning_dataset, which drops every timeout transition, and then cuts
    every 1000 steps, so its windows straddle two episodes. Here episodes end exactly where the data say;
    a step flagged both terminal and timeout counts as terminal.
    Without a timeouts key (`timeouts` None), segments are also cut every `max_steps` steps, as Diffuser does.
    The data may end inside an episode: that last partial episode is kept.
    """
    n = len(terminals)
    done = terminals | timeouts if timeouts is not None else terminals.copy()
    ends = np.flatnonzero(done) + 1
    bounds = np.concatenate([[0], ends[ends < n], [n]])  # episode i = [bounds[i], bounds[i + 1])
    starts, lengths = bounds[:-1], np.diff(bounds)
    if timeouts is None and max_steps is not None and lengths.max() > max_steps:
        pieces = [(s + k, min(max_steps, l - k)) for s, l in zip(starts, lengths) for k in range(0, l, max_steps)]
        starts, lengths = (np.array(v) for v in zip(*pieces))
    return starts.astype(np.int64), lengths.astype(np.int64)


def split_official(arrays: dict, max_steps: int) -> tuple[dict, tuple]:
    """The official loader: d4rl.qlearning_dataset drops every timeout transition (and the data's last step),
    then the remaining transitions are cut every max_steps steps, whatever the terminals say. The pieces are
    marked non-terminal, so windows straddle episodes and only windows that fit inside a piece are drawn."""
    n = len(arrays["rewards"])
    keep = ~arrays["timeouts"] if arrays["timeouts"] is not None else np.ones(n, bool)
    keep[-1] = False
    arrays = {k: (v[keep] if isinstance(v, np.ndarray) else v) for k, v in arrays.items()}
    arrays["rows"] = np.flatnonzero(keep)
    starts = np.arange(0, int(keep.sum()), max_steps, dtype=np.int64)
    return arrays, (starts, np.minimum(max_steps, int(keep.sum()) - starts).astype(np.int64))


@dataclass
class OfflineData:
    info: DatasetInfo
    path: pathlib.Path
    observations: np.ndarray  # (N, S) float32, raw
    actions: np.ndarray  # (N, A) float32
    rewards: np.ndarray  # (N,) float32, raw
    rtg: np.ndarray  # (N,) float32, returns-to-go divided by rtg_scale
    cond_rtg: np.ndarray  # (N,) float32, raw returns-to-go discounted by cond_discount (the denoiser's condition)
    episode_starts: np.ndarray  # (E,) int64 index of each episode's first step
    episode_lengths: np.ndarray  # (E,) int64
    episode_terminal: np.ndarray  # (E,) bool: the episode ended on a terminal (not a timeout / data end)
    episode_returns: np.ndarray  # (E,) float64, raw undiscounted
    normalizer: Normalizer
    next_observations: np.ndarray | None = None  # (N, S) float32 raw, when the file has them
    rtg_scale: float = 1000.0
    discount: float = 1.0
    cond_discount: float = 1.0
    notes: list[str] = field(default_factory=list)
    rows: np.ndarray | None = None  # (N,) the file's row of each transition, where some were dropped

    def summary(self) -> str:
        info, R = self.info, self.episode_returns
        nR = normalized_score(info.name, R)
        scored = has_reference_scores(info.name)
        lines = [
            f"{info.name}: {info.env_id} ({info.family}), source {info.source}, from {self.path}",
            f"{len(self.observations)} transitions, {len(R)} episodes "
            f"({int(self.episode_terminal.sum())} end on a terminal), episode length "
            f"min {self.episode_lengths.min()} mean {self.episode_lengths.mean():.1f} max {self.episode_lengths.max()}",
            f"obs dim {info.obs_dim}, act dim {info.act_dim}, max episode steps {info.max_episode_steps}",
            f"return (raw):        mean {R.mean():.1f} std {R.std():.1f} min {R.min():.1f} max {R.max():.1f}",
            f"return (normalized): mean {nR.mean():.1f} std {nR.std():.1f} min {nR.min():.1f} max {nR.max():.1f}"
            if scored else "return (normalized): none, the dataset has no reference returns",
            f"returns-to-go: discount {self.discount}, divided by {self.rtg_scale}, "
            f"range [{self.rtg.min():.3f}, {self.rtg.max():.3f}]; denoiser condition: discount "
            f"{self.cond_discount}, raw range [{self.cond_rtg.min():.1f}, {self.cond_rtg.max():.1f}]",
            f"normalizer: mean in [{self.normalizer.mean.min():.3f}, {self.normalizer.mean.max():.3f}], "
            f"std in [{self.normalizer.std.min():.3f}, {self.normalizer.std.max():.3f}], "
            f"{self.normalizer.n_floored} dims at the std floor {Normalizer.STD_FLOOR}",
        ]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def load(name: str, path=None, rtg_scale: float = 1000.0, discount: float = 1.0, download: bool = True,
         cond_discount: float = 1.0, norm_eps: float = 0.0, episode_split: str = "ours") -> OfflineData:
    """Load, validate and split a dataset, and compute its returns-to-go and state normalizer.
    `discount` shapes the transformer's return-to-go, `cond_discount` the denoiser's condition; `norm_eps` and
    `episode_split` = "official" reproduce the official normalizer and loader (Normalizer.fit, split_official)."""
    info = get_info(name)
    if not (0.0 < discount <= 1.0 and 0.0 < cond_discount <= 1.0 and rtg_scale > 0):
        raise ValueError(f"need 0 < discount, cond_discount <= 1 and rtg_scale > 0, got discount {discount}, "
                         f"cond_discount {cond_discount}, rtg_scale {rtg_scale}")
    if info.source == "minari" and path is None:
        arrays, where = load_minari(info, download=download)
    else:
        where = resolve_path(name, path, download=download)
        arrays = load_arrays(where, info)
    notes = []
    if episode_split == "official":
        arrays, (starts, lengths) = split_official(arrays, info.max_episode_steps)
        notes.append(f"official episode split: timeout steps dropped, pieces of {info.max_episode_steps} steps")
    elif episode_split == "ours":
        starts, lengths = split_episodes(arrays["terminals"], arrays["timeouts"], info.max_episode_steps)
    else:
        raise UsageError(f"unknown --episode-split {episode_split!r}; choose ours or official")
    if arrays["timeouts"] is None:
        notes.append(f"no timeouts key: episodes also cut every {info.max_episode_steps} steps")
    if arrays["next_observations"] is None:
        notes.append("no next_observations key: the state after each episode's last step is unknown (next_mask 0)")
    terminal = arrays["terminals"][starts + lengths - 1] & (episode_split == "ours")  # (E,); official: none
    ended = terminal[-1] or (arrays["timeouts"][-1] if arrays["timeouts"] is not None
                             else lengths[-1] == info.max_episode_steps)
    if not ended:
        notes.append(f"the data end inside an episode: the last {lengths[-1]} steps form a partial episode")
    rtg = np.empty(len(arrays["rewards"]), dtype=np.float64)
    cond_rtg = np.empty_like(rtg)
    returns = np.empty(len(starts), dtype=np.float64)
    for e, (s, l) in enumerate(zip(starts, lengths)):
        rtg[s:s + l] = returns_to_go(arrays["rewards"][s:s + l], discount)
        cond_rtg[s:s + l] = returns_to_go(arrays["rewards"][s:s + l], cond_discount)
        returns[e] = arrays["rewards"][s:s + l].sum(dtype=np.float64)
    return OfflineData(
        info=info, path=pathlib.Path(where), observations=arrays["observations"], actions=arrays["actions"],
        rewards=arrays["rewards"], rtg=(rtg / rtg_scale).astype(np.float32), cond_rtg=cond_rtg.astype(np.float32),
        episode_starts=starts,
        episode_lengths=lengths, episode_terminal=terminal, episode_returns=returns,
        normalizer=Normalizer.fit(arrays["observations"], norm_eps), next_observations=arrays["next_observations"],
        rtg_scale=rtg_scale, discount=discount, cond_discount=cond_discount, notes=notes, rows=arrays.get("rows"))


# ---------------------------------------------------------------------------------------------------------
# Training windows
# ---------------------------------------------------------------------------------------------------------
class WindowSampler:
    """Windows of `length` steps, gathered by index arithmetic on tensors preloaded on `device`.

    The rule for valid starts and padding is in this file's docstring. DEVIATION: the official loader keeps only
    windows that fit entirely inside an episode, so a terminal episode's last steps and episodes shorter than the
    window are never trained on; here they are, padded as described and masked.
    """

    def __init__(self, data: OfflineData, length: int, device="cpu", next_normalizer=None):
        """next_normalizer: the next states' own normalizer (official inverse dynamics); None = the states'."""
        if length < 1:
            raise ValueError(f"window length must be >= 1, got {length}")
        self.length, self.device = length, torch.device(device)
        N = len(data.observations)
        starts, lengths, term = data.episode_starts, data.episode_lengths, data.episode_terminal
        ends = starts + lengths  # (E,) exclusive
        # next state of every step: next_observations, else the following step inside the same episode
        if data.next_observations is not None:
            nxt, known = data.next_observations, np.ones(N, dtype=bool)
        else:
            idx = np.arange(N)
            last = np.zeros(N, dtype=bool)
            last[ends - 1] = True
            nxt = data.observations[np.where(last, idx, np.minimum(idx + 1, N - 1))]  # last step: repeat itself
            known = ~last
        norm = data.normalizer

        def to(x, dtype=None):
            return torch.as_tensor(np.ascontiguousarray(x), dtype=dtype).to(self.device)

        self.states = to(norm.normalize(data.observations), torch.float32)  # (N, S)
        self.next_states = to((next_normalizer or norm).normalize(nxt), torch.float32)  # (N, S)
        self.next_known = to(known)  # (N,) bool
        self.actions = to(data.actions, torch.float32)  # (N, A)
        self.rtg = to(data.rtg, torch.float32)  # (N,)
        self.cond_rtg = to(data.cond_rtg, torch.float32)  # (N,)
        ep_of = np.repeat(np.arange(len(starts)), lengths)  # (N,) episode id of each step
        self.step_end = to(ends[ep_of], torch.int64)  # (N,) exclusive end of the step's episode
        self.step_terminal = to(term[ep_of])  # (N,) bool: the step's episode ends on a terminal
        # valid starts: terminal episodes 0..n-1, others 0..max(n-L, 0)
        counts = np.where(term, lengths, np.maximum(lengths - length, 0) + 1)  # (E,)
        offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        self.starts = torch.as_tensor(np.repeat(starts, counts) + offsets, dtype=torch.int64)  # (M,) on CPU
        self.offsets = torch.arange(length, device=self.device)  # (L,)

    def __len__(self) -> int:
        return len(self.starts)

    def sample(self, batch_size: int, generator: torch.Generator) -> dict:
        pick = torch.randint(len(self.starts), (batch_size,), generator=generator)  # CPU generator -> data order
        start = self.starts[pick].to(self.device)  # (B,)
        pos = start[:, None] + self.offsets[None, :]  # (B, 1) + (1, L) -> (B, L) global step index
        end = self.step_end[start][:, None]  # (B, 1)
        real = pos < end  # (B, L)
        idx = torch.minimum(pos, end - 1)  # (B, L): padded steps point at the episode's last step
        realf = real.float()
        return {
            "states": self.states[idx],  # (B, L, S), normalized
            "next_states": self.next_states[idx],  # (B, L, S)
            "actions": self.actions[idx] * realf[..., None],  # (B, L, A), 0 on padding
            "rtg": (self.rtg[idx] * realf)[..., None],  # (B, L, 1), scaled, 0 on padding
            "cond_rtg": (self.cond_rtg[idx] * realf)[..., None],  # (B, L, 1), raw discounted, 0 on padding
            "mask": realf,  # (B, L) 1 = real step
            "next_mask": (real & self.next_known[idx]).float(),  # (B, L) 1 = next state known
            "terminal": self.step_terminal[start][:, None] & (pos >= end - 1),  # (B, L) terminal step and after
            "start": start,  # (B,) global index of each window's first step
        }


# ---------------------------------------------------------------------------------------------------------
# Environments and the command line
# ---------------------------------------------------------------------------------------------------------
def legacy_by_default(name: str) -> bool:
    """The dynamics a name evaluates in when nothing else decides: mujoco-py's for D4RL's locomotion files (they
    were collected with it on MuJoCo 2.x), MuJoCo 3's for everything else."""
    import envs

    info = get_info(name)
    return info.source == "d4rl" and info.family == "locomotion" and info.env_id in envs.LEGACY_BODY_INERTIA


def choose_dynamics(data: OfflineData, n: int = 16) -> tuple[bool, str]:
    """The simulator read off the data: legacy_dynamics, and why, in words for the start-up line.

    A D4RL-layout file records infos/qpos and infos/qvel. From n recorded states inside episodes, one step with
    the recorded action is simulated under mujoco-py's dynamics and under MuJoCo 3's; the one that reproduces
    the recorded next observations is taken. Without those keys (or where neither reproduces them) the
    name's default stays (legacy_by_default)."""
    import envs

    name, info = data.info.name, data.info
    default = legacy_by_default(name)
    if info.env_id not in envs.LEGACY_BODY_INERTIA:
        return False, f"MuJoCo 3's ({info.env_id} has no legacy variant)"
    try:
        with h5py.File(data.path, "r") as f:
            qpos, qvel = f["infos/qpos"][()], f["infos/qvel"][()]
        if data.rows is not None:  # the official split dropped some rows of the file
            qpos, qvel = qpos[data.rows], qvel[data.rows]
    except (OSError, KeyError, TypeError, IndexError):
        qpos = None
    if qpos is None or len(qpos) != len(data.observations) or data.next_observations is None:
        return default, (f"{'mujoco-py' if default else 'MuJoCo 3'}'s, the default for {name} (the data record no "
                         f"infos/qpos, infos/qvel and next_observations to check it against)")
    last = np.zeros(len(data.observations), bool)
    last[data.episode_starts + data.episode_lengths - 1] = True  # the next state may be a reset or a fall
    idx = np.flatnonzero(~last)
    idx = idx[np.linspace(0, len(idx) - 1, n).astype(int)]
    arrays = (qpos[idx], qvel[idx], data.actions[idx], data.next_observations[idx])
    legacy, mujoco3 = (envs.one_step_error(info, *arrays, legacy_dynamics=x) for x in (True, False))
    errors = f"one simulated step misses the recorded next state by {legacy:.1e} in mujoco-py's, {mujoco3:.1e} in " \
             f"MuJoCo 3's dynamics"
    if min(legacy, mujoco3) > 1e-3 or max(legacy, mujoco3) < 10 * min(legacy, mujoco3):
        return default, f"{'mujoco-py' if default else 'MuJoCo 3'}'s, the default for {name} ({errors}: undecided)"
    return legacy < mujoco3, f"{'mujoco-py' if legacy < mujoco3 else 'MuJoCo 3'}'s, read off the data ({errors})"


def make_env(name: str, seed=None, legacy_dynamics: bool | None = None, **kwargs):
    """The evaluation environment for a dataset name (built by envs.py, imported only when needed), in the
    name's default dynamics (legacy_by_default) unless legacy_dynamics says otherwise."""
    import envs

    info = get_info(name)
    if info.family == "minari" and info.env_spec is None:
        raise UsageError(f"{name} records no environment spec, so it cannot be evaluated; train with --eval-episodes 0")
    if legacy_dynamics is None:
        legacy_dynamics = legacy_by_default(name)
    return envs.make_env(info, seed=seed, legacy_dynamics=legacy_dynamics, **kwargs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="List datasets, or load one and print its summary.")
    p.add_argument("--list", action="store_true", help="print every dataset name with env id, dims, source")
    p.add_argument("--env", help="dataset name, e.g. halfcheetah-medium-v2 or halfcheetah-medium-sb3, or minari:ID")
    p.add_argument("--dataset", help="path to a D4RL-layout hdf5 file (skips the cache and the download)")
    p.add_argument("--no-download", action="store_true", help="never download; fail if the file is not cached")
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    args = p.parse_args(argv)

    def run() -> None:
        if args.list:
            print(f"{'name':28s} {'env id':22s} {'obs':>4s} {'act':>4s} {'steps':>6s}  source")
            for info in DATASETS.values():
                src = f"minari {info.minari_id}" if info.minari_id else info.source
                print(f"{info.name:28s} {info.env_id:22s} {info.obs_dim:4d} {info.act_dim:4d} "
                      f"{info.max_episode_steps:6d}  {src}")
            print(f"{MINARI_PREFIX + 'ID':28s} any Minari dataset id, e.g. {MINARI_PREFIX}mujoco/hopper/medium-v0 "
                  f"(pip install minari); env and dims from the dataset")
        elif args.env:
            print(load(args.env, args.dataset, download=not args.no_download).summary())
        else:
            p.error("give --list or --env NAME")
    return run_cli(run, args.debug)

if __name__ == "__main__":
    sys.exit(main())
