"""Where Trajectory Diffuser's offline datasets come from: the table of names, the file, its download, Minari.

This file knows every dataset name (`DATASETS`: D4RL's locomotion, Adroit and Kitchen names and the bundled
stand-ins) with its evaluation environment, dims, episode limit and D4RL reference returns (`normalized_score`).
It finds a name's file, downloads it into D4RL's cache, and reads and validates D4RL's own hdf5 layout without
the `d4rl` package (`load_arrays`, `check_arrays`), giving the arrays that data.py splits into episodes.
`UsageError`, the one error class of every command, is defined here.

Sources, in order (`resolve_path`): `--dataset PATH`; the bundled stand-in dataset; the D4RL cache
($D4RL_DATASET_DIR, else ~/.d4rl/datasets) under the URL's file name; a download into that cache (`download`).
Kitchen data come from Minari (optional, imported lazily) unless a D4RL-layout file is passed, and so does any
name `minari:ID` (e.g. minari:mujoco/hopper/medium-v0): its dims, evaluation env and reference returns are read
off the Minari dataset (`minari_info`).

Shape legend: N = transitions, S = state dim, A = action dim.
Tests: python -m pytest test_all.py -k "data or minari"
CLI:   none of its own; python data.py --list prints the table, python data.py --env NAME loads one name
"""
from __future__ import annotations

import difflib
import json
import os
import pathlib
import tempfile
import urllib.request
from dataclasses import dataclass, fields

import h5py
import numpy as np


HERE = pathlib.Path(__file__).resolve().parent


class UsageError(Exception):
    """A user's mistake or a missing resource: a flag, a dataset name, file or download, a run directory, a
    checkpoint. The message is one line saying what to do; every command prints it and exits with code 2."""


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

# The bundled files' reference scores (datasets/README.md), written down once for every script and table: the data's
# mean normalized score, its best source (the mean of the best policy in a mix) or best episode, and a plain BC MLP.
BUNDLED_REFERENCES = {
    "halfcheetah-medium-sb3": {"data mean": 34.1, "best episode": 40.8, "BC": 39.4},
    "halfcheetah-medium-replay-sb3": {"data mean": 24.2, "best source": 38.3, "BC": 2.2},
    "hopper-medium-sb3": {"data mean": 20.6, "best episode": 26.8, "BC": 23.4},
}


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


_fetch = download  # inside resolve_path, the boolean argument `download` shadows the function


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


# ---------------------------------------------------------------------------------------------------------
# Minari
# ---------------------------------------------------------------------------------------------------------
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
