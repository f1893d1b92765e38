"""Offline datasets for Trajectory Diffuser: D4RL files, episodes, normalization, return-to-go windows.

This file is the only one that knows about datasets. It reads D4RL's own hdf5 layout without the `d4rl`
package, splits the data into episodes, computes returns-to-go (the condition of the paper's Transformer and
denoiser, Huang et al., ECCV 2024), normalizes states (the models only ever see normalized states) and
gathers the fixed-length training windows. Environments live in envs.py; `make_env` here only delegates.

Sources, in order (`resolve_path`): `--dataset PATH`; the bundled stand-in dataset; the D4RL cache
($D4RL_DATASET_DIR, else ~/.d4rl/datasets) under the URL's file name; a download into that cache.
Kitchen data come from Minari (optional, imported lazily) unless a D4RL-layout file is passed, and so does any
name `minari:ID` (e.g. minari:mujoco/hopper/medium-v0): its dims, evaluation env and reference returns are read
off the Minari dataset (`minari_info`).

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
import difflib
import json
import os
import pathlib
import sys
import tempfile
import urllib.request
from dataclasses import dataclass, field, fields

import h5py
import numpy as np
import torch

HERE = pathlib.Path(__file__).resolve().parent


class UsageError(Exception):
    """A user's mistake or a missing resource: a flag, a dataset name, file or download, a run directory, a
    checkpoint. The message is one line saying what to do; every command prints it and exits with code 2."""


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
# The table of datasets
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DatasetInfo:
    name: str
    family: str  # "locomotion" | "adroit" | "kitchen" | "minari" (an env rebuilt from a Minari dataset's spec)
    env_id: str  # gymnasium id of the evaluation environment (built by envs.py)
    obs_dim: int
    act_dim: int
    max_episode_steps: int
    ref_min: float  # D4RL reference scores (d4rl/infos.py), for the normalized score; nan = none (raw only)
    ref_max: float
    url: str | None  # D4RL download URL (d4rl/infos.py), None if the data do not come from D4RL's server
    source: str  # "d4rl" | "bundled" | "minari"
    filename: str  # D4RL cache file name, or the bundled file's path relative to this file; "" for Minari
    minari_id: str | None = None
    env_spec: str | None = None  # minari:ID names: the recorded gymnasium EnvSpec as JSON, to rebuild the env


D4RL_URL = "http://rail.eecs.berkeley.edu/datasets/offline_rl"
# family task -> (env id, obs dim, act dim, max episode steps, ref min, ref max); scores from d4rl/infos.py
LOCOMOTION = {
    "halfcheetah": ("HalfCheetah-v4", 17, 6, 1000, -280.178953, 12135.0),
    "hopper": ("Hopper-v4", 11, 3, 1000, -20.272305, 3234.3),
    "walker2d": ("Walker2d-v4", 17, 6, 1000, 1.629008, 4592.3),
}
ADROIT = {  # D4RL's Adroit episode limits: pen 100, the others 200
    "pen": ("AdroitHandPen-v1", 45, 24, 100, 96.262799, 3076.8331017826877),
    "hammer": ("AdroitHandHammer-v1", 46, 26, 200, -274.856578, 12794.134825156867),
    "door": ("AdroitHandDoor-v1", 39, 28, 200, -56.512833, 2880.5693087298737),
    "relocate": ("AdroitHandRelocate-v1", 39, 30, 200, -6.425911, 4233.877797728884),
}
# FrankaKitchen-v1: 59-d "observation" entry, 9-d action, 280 steps; score = tasks done (0..4)
KITCHEN = ("FrankaKitchen-v1", 59, 9, 280, 0.0, 4.0)


def _build_table() -> dict[str, DatasetInfo]:
    table = {}
    for task, (env_id, s, a, T, lo, hi) in LOCOMOTION.items():
        for kind in ("random", "medium", "medium-replay", "medium-expert", "expert"):
            fname = f"{task}_{kind.replace('-', '_')}-v2.hdf5"  # d4rl/infos.py naming
            table[f"{task}-{kind}-v2"] = DatasetInfo(
                f"{task}-{kind}-v2", "locomotion", env_id, s, a, T, lo, hi,
                f"{D4RL_URL}/gym_mujoco_v2/{fname}", "d4rl", fname)
    # DEVIATION: every Adroit task uses D4RL's maintained -v1 data; the official code mixes pen-v1 with -v0.
    for task, (env_id, s, a, T, lo, hi) in ADROIT.items():
        for kind in ("human", "cloned", "expert"):
            fname = f"{task}-{kind}-v1.hdf5"
            table[f"{task}-{kind}-v1"] = DatasetInfo(
                f"{task}-{kind}-v1", "adroit", env_id, s, a, T, lo, hi,
                f"{D4RL_URL}/hand_dapg_v1/{fname}", "d4rl", fname)
    # DEVIATION: Kitchen data are Minari's D4RL/kitchen/*-v2, re-simulated in FrankaKitchen-v1, because D4RL's
    # own 60-d kitchen files do not fit any environment that runs on a current MuJoCo; no D4RL URL is used.
    env_id, s, a, T, lo, hi = KITCHEN
    for kind in ("complete", "partial", "mixed"):
        table[f"kitchen-{kind}-v0"] = DatasetInfo(
            f"kitchen-{kind}-v0", "kitchen", env_id, s, a, T, lo, hi,
            None, "minari", "", f"D4RL/kitchen/{kind}-v2")
    # Stand-ins that ship with the project (datasets/README.md), real HalfCheetah-v4 rollouts of SAC policies:
    # medium (one policy) for halfcheetah-medium-v2, medium-replay (a random policy and three checkpoints).
    env_id, s, a, T, lo, hi = LOCOMOTION["halfcheetah"]
    for name in ("halfcheetah-medium-sb3", "halfcheetah-medium-replay-sb3"):
        table[name] = DatasetInfo(name, "locomotion", env_id, s, a, T, lo, hi, None, "bundled", f"datasets/{name}.hdf5")
    # Stand-in for hopper-medium-v2 (datasets/README.md: SAC on Hopper-v4, episodes end when the hopper falls).
    env_id, s, a, T, lo, hi = LOCOMOTION["hopper"]
    table["hopper-medium-sb3"] = DatasetInfo(
        "hopper-medium-sb3", "locomotion", env_id, s, a, T, lo, hi, None, "bundled", "datasets/hopper-medium-sb3.hdf5")
    return table


DATASETS: dict[str, DatasetInfo] = _build_table()


def get_info(name: str) -> DatasetInfo:
    if name in DATASETS:
        return DATASETS[name]
    if name.startswith(MINARI_PREFIX):
        if name not in _MINARI_INFOS:
            _MINARI_INFOS[name] = minari_info(name)
        return _MINARI_INFOS[name]
    close = difflib.get_close_matches(name, DATASETS.keys(), n=3)  # 3 names at difflib's default similarity
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise UsageError(f"unknown dataset name '{name}'; {hint}python data.py --list shows every name")


def normalized_score(name: str, ret):
    """D4RL normalized score: 100 * (R - min) / (max - min); works on floats and numpy arrays.
    nan for a dataset without reference returns (has_reference_scores is False)."""
    info = get_info(name)
    return 100.0 * (ret - info.ref_min) / (info.ref_max - info.ref_min)


def has_reference_scores(name: str) -> bool:
    info = get_info(name)
    return bool(np.isfinite(info.ref_min) and np.isfinite(info.ref_max) and info.ref_max > info.ref_min)


# ---------------------------------------------------------------------------------------------------------
# Finding the file: --dataset, bundled, D4RL cache, download
# ---------------------------------------------------------------------------------------------------------
def cache_dir() -> pathlib.Path:
    """D4RL's cache folder: $D4RL_DATASET_DIR, else ~/.d4rl/datasets (as d4rl itself resolves it)."""
    return pathlib.Path(os.environ.get("D4RL_DATASET_DIR", "~/.d4rl/datasets")).expanduser()


def resolve_path(name: str, path=None, download: bool = True) -> pathlib.Path:
    info = get_info(name)
    if path is not None:
        p = pathlib.Path(path).expanduser()
        if not p.is_file():
            raise UsageError(f"dataset file {p} does not exist; check the --dataset path")
        return p
    if info.source == "bundled":
        p = HERE / info.filename
        if not p.is_file():
            raise UsageError(f"bundled dataset {p} is missing; restore it from the repository or pass --dataset PATH")
        return p
    if info.source == "minari":
        raise UsageError(f"{name} is read through Minari ({info.minari_id}), not from a file; "
                        f"pass --dataset PATH for a D4RL-layout file with {info.obs_dim}-d observations")
    p = cache_dir() / info.filename
    if p.is_file():
        return p
    if not download or info.url is None:
        raise UsageError(f"{name} is not in the D4RL cache at {p}; place the file there or pass --dataset PATH")
    _fetch(info.url, p)
    return p


DOWNLOAD_CHUNK = 1 << 20  # 1 MiB per read: small enough for a smooth progress bar, large enough to be fast


def download(url: str, dest, timeout: float = 30.0) -> pathlib.Path:
    """Stream `url` to `dest` through a temporary file in the same folder; rename only once it is complete.

    The file counts as complete when its byte count equals Content-Length (when the server sends one) and
    h5py opens it, so an interrupted download never leaves a file that looks valid.
    """
    from tqdm import tqdm

    dest = pathlib.Path(dest)
    tmp = None
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            expected = resp.headers.get("Content-Length")
            expected = int(expected) if expected is not None else None
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
            got = 0
            with os.fdopen(fd, "wb") as f, tqdm(total=expected, unit="B", unit_scale=True, desc=dest.name) as bar:
                while chunk := resp.read(DOWNLOAD_CHUNK):
                    f.write(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
        if expected is not None and got != expected:
            raise OSError(f"got {got} of {expected} bytes")
        with h5py.File(tmp, "r") as h:
            list(h.keys())
        os.replace(tmp, dest)
        tmp = None
        return dest
    except Exception as e:  # any failure (network, disk, bad file) becomes one line with the manual fix
        reason = " ".join(str(e).split()) or type(e).__name__
        raise UsageError(f"could not download {url} ({reason}); place the file by hand at {dest} "
                        f"or pass --dataset PATH to a D4RL-layout hdf5 file") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


_fetch = download  # inside resolve_path and load, the boolean argument `download` shadows the function


# ---------------------------------------------------------------------------------------------------------
# Reading and validating a D4RL-layout file
# ---------------------------------------------------------------------------------------------------------
REQUIRED_KEYS = ("observations", "actions", "rewards", "terminals")


def _as_flags(x: np.ndarray, key: str, where: str) -> np.ndarray:
    """Flags may be stored as bool or as 0/1 numbers; anything else is an error."""
    if x.dtype == np.bool_:
        return x
    if not np.issubdtype(x.dtype, np.number) or not np.all((x == 0) | (x == 1)):
        raise UsageError(f"{where}: '{key}' must hold booleans or 0/1 values; the file is not in D4RL's layout")
    return x != 0


def _as_float(x: np.ndarray, key: str, where: str) -> np.ndarray:
    if x.dtype not in (np.float32, np.float64):
        raise UsageError(f"{where}: '{key}' has dtype {x.dtype}, expected float32 or float64")
    if not np.all(np.isfinite(x)):
        bad = int(np.size(x) - np.isfinite(x).sum())
        raise UsageError(f"{where}: '{key}' holds {bad} NaN/inf values; clean or re-download the file")
    return x.astype(np.float32, copy=False)


def check_arrays(raw: dict, info: DatasetInfo, where: str) -> dict:
    """Validate arrays read from a file (or converted from Minari) and return them in canonical dtypes."""
    for k in REQUIRED_KEYS:
        if raw.get(k) is None:
            raise UsageError(f"{where}: required key '{k}' is missing (needs {', '.join(REQUIRED_KEYS)})")
    out = {}
    for k in ("rewards", "terminals", "timeouts"):  # (N,) or (N, 1) -> (N,)
        if raw.get(k) is not None and raw[k].ndim == 2 and raw[k].shape[1] == 1:
            raw[k] = raw[k][:, 0]
    n = len(raw["observations"])
    for k, v in raw.items():
        if v is not None and (v.ndim == 0 or len(v) != n):
            raise UsageError(f"{where}: '{k}' has {len(v) if v.ndim else 0} rows but observations has {n}")
    if n == 0:
        raise UsageError(f"{where}: the dataset is empty (0 transitions)")
    for k, dim in (("observations", info.obs_dim), ("next_observations", info.obs_dim), ("actions", info.act_dim)):
        v = raw.get(k)
        if v is not None and (v.ndim != 2 or v.shape[1] != dim):
            hint = ("; D4RL's 60-d kitchen files do not fit FrankaKitchen-v1, omit --dataset to use Minari's data"
                    if info.family == "kitchen" and k != "actions" else "")
            raise UsageError(f"{where}: '{k}' has shape {v.shape}, but {info.name} ({info.env_id}) needs "
                            f"(N, {dim}){hint}")
    for k in ("rewards", "terminals", "timeouts"):
        if raw.get(k) is not None and raw[k].ndim != 1:
            raise UsageError(f"{where}: '{k}' has shape {raw[k].shape}, expected (N,)")
    for k in ("observations", "actions", "rewards", "next_observations"):
        out[k] = None if raw.get(k) is None else _as_float(np.asarray(raw[k]), k, where)
    for k in ("terminals", "timeouts"):
        out[k] = None if raw.get(k) is None else _as_flags(np.asarray(raw[k]), k, where)
    return out


def load_arrays(path, info: DatasetInfo) -> dict:
    """Read observations, actions, rewards, terminals (+ optional timeouts, next_observations) from hdf5."""
    path = pathlib.Path(path)
    where = str(path)
    if not path.is_file():
        raise UsageError(f"dataset file {path} does not exist; check the --dataset path")
    raw = {}
    try:
        with h5py.File(path, "r") as f:
            for k in REQUIRED_KEYS + ("timeouts", "next_observations"):
                if k in f:
                    if not isinstance(f[k], h5py.Dataset):
                        raise UsageError(f"{where}: '{k}' is a group, expected an array; not D4RL's layout")
                    raw[k] = f[k][()]
    except UsageError:
        raise
    except Exception as e:  # truncated or corrupt files fail inside h5py with OSError/KeyError/...
        reason = " ".join(str(e).split()) or type(e).__name__
        raise UsageError(f"{where}: cannot read the hdf5 file ({reason}); it is truncated or corrupt, "
                        f"delete it and download it again") from None
    return check_arrays(raw, info, where)


def _open_minari(dataset_id: str, name: str, download: bool = True):
    """minari.load_dataset, imported lazily (minari is optional), with one-line errors."""
    try:
        import minari
    except ImportError:
        raise UsageError(f"{name} needs the optional package minari (pip install minari), "
                        f"or pass --dataset PATH to a D4RL-layout file") from None
    try:
        return minari.load_dataset(dataset_id, download=download)
    except Exception as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise UsageError(f"could not load Minari dataset {dataset_id} ({reason}); run it once with network "
                        f"access (minari download {dataset_id}) or pass --dataset PATH") from None


def load_minari(info: DatasetInfo, download: bool = True) -> tuple[dict, str]:
    """Convert a Minari dataset (one record per episode) into D4RL-layout arrays."""
    ds = _open_minari(info.minari_id, info.name, download)
    try:
        episodes = list(ds.iterate_episodes())
    except Exception as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise UsageError(f"could not read the episodes of Minari dataset {info.minari_id} ({reason})") from None
    cols = {k: [] for k in ("observations", "next_observations", "actions", "rewards", "terminals", "timeouts")}
    for ep in episodes:
        obs = ep.observations["observation"] if isinstance(ep.observations, dict) else ep.observations
        obs = np.asarray(obs)  # (T + 1, S): Minari stores the final observation too
        T = len(ep.rewards)
        if T == 0:
            continue
        term = np.asarray(ep.terminations, dtype=bool).reshape(T)
        trunc = np.asarray(ep.truncations, dtype=bool).reshape(T).copy()
        trunc[-1] |= not term[-1]  # each Minari record is one whole episode: always end it here
        cols["observations"].append(obs[:T])
        cols["next_observations"].append(obs[1:T + 1])
        cols["actions"].append(np.asarray(ep.actions))
        cols["rewards"].append(np.asarray(ep.rewards).reshape(T))  # (T,) or (T, 1) -> (T,)
        cols["terminals"].append(term)
        cols["timeouts"].append(trunc)
    raw = {k: np.concatenate(v) if v else np.zeros(0) for k, v in cols.items()}
    where = f"minari:{info.minari_id}"
    return check_arrays(raw, info, where), getattr(getattr(ds, "spec", None), "data_path", where)


# Any Minari dataset by id: --env minari:ID, e.g. minari:mujoco/hopper/medium-v0. Its DatasetInfo is read off the
# dataset (dims from its spaces, the evaluation env from its recorded EnvSpec, reference returns from its
# metadata) once per process. Planning a checkpoint of such a run needs minari and the dataset locally too.
MINARI_PREFIX = "minari:"
_MINARI_INFOS: dict[str, DatasetInfo] = {}
MINARI_DEFAULT_EPISODE_STEPS = 1000  # only when the dataset records no env spec; it sizes the progress bar only


def _env_spec_json(spec) -> str | None:
    """An EnvSpec, or its JSON as Minari stores it, as JSON that this gymnasium's EnvSpec.from_json reads: keys
    that older or newer gymnasium versions wrote (e.g. autoreset, apply_api_compatibility) are dropped."""
    if spec is None:
        return None
    from gymnasium.envs.registration import EnvSpec
    d = json.loads(spec) if isinstance(spec, str) else json.loads(spec.to_json())
    known = {f.name for f in fields(EnvSpec) if f.init}
    return json.dumps({k: v for k, v in d.items() if k in known})


def _flat_dim(space, what: str, name: str) -> int:
    """The length of a flat Box space (a dict observation's 'observation' entry, as FrankaKitchen's)."""
    spaces = getattr(space, "spaces", None)
    if isinstance(spaces, dict) and "observation" in spaces:
        space = spaces["observation"]
    shape = getattr(space, "shape", None)
    if shape is None or len(shape) != 1 or type(space).__name__ != "Box":
        raise UsageError(f"{name}: its {what} space is {space}; only flat Box observations and actions are supported")
    return int(shape[0])


def minari_info(name: str) -> DatasetInfo:
    dataset_id = name[len(MINARI_PREFIX):]
    if not dataset_id:
        raise UsageError(f"'{name}' names no dataset; write minari:ID, e.g. minari:mujoco/hopper/medium-v0")
    ds = _open_minari(dataset_id, name)
    meta = dict(getattr(getattr(ds, "storage", None), "metadata", None) or {})
    # the evaluation env: the dataset's eval env spec if it has one (minari's recover_environment(eval_env=True)),
    # else the env it was collected in (recover_environment()); gym.make(spec) in envs.py is what both call
    spec = _env_spec_json(meta.get("eval_env_spec") or meta.get("env_spec") or getattr(ds, "env_spec", None))
    env_id, steps = "(no env spec recorded)", MINARI_DEFAULT_EPISODE_STEPS
    if spec is not None:
        from gymnasium.envs.registration import EnvSpec
        parsed = EnvSpec.from_json(spec)
        env_id, steps = parsed.id, parsed.max_episode_steps or MINARI_DEFAULT_EPISODE_STEPS
    obs_space, act_space = getattr(ds, "observation_space", None), getattr(ds, "action_space", None)
    if obs_space is None or act_space is None:
        obs_space, act_space = ds.spec.observation_space, ds.spec.action_space
    lo, hi = meta.get("ref_min_score"), meta.get("ref_max_score")  # D4RL-derived sets carry them
    lo, hi = (float(lo), float(hi)) if lo is not None and hi is not None else (float("nan"), float("nan"))
    return DatasetInfo(name, "minari", env_id, _flat_dim(obs_space, "observation", name),
                       _flat_dim(act_space, "action", name), int(steps), lo, hi, None, "minari", "",
                       minari_id=dataset_id, env_spec=spec)


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
