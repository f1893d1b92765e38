"""Roll out a mixed-quality HalfCheetah-v4 dataset in D4RL's hdf5 layout, to test that the recipe generalizes.

The behaviour policies are a behaviour-cloning MLP (2 x 256, trained here on the bundled
halfcheetah-medium-sb3 data) executed with Gaussian action noise of several sizes, plus a uniform random
policy: a spread from about medium quality down to random, as in D4RL's medium-replay and mixed files.

    python scripts/data/make_mixed_dataset.py --out datasets/halfcheetah-mixed-bc.hdf5
    python train.py --env halfcheetah-medium-sb3 --dataset datasets/halfcheetah-mixed-bc.hdf5 --out runs/mixed
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import h5py
import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
import data as D  # noqa: E402
import sources  # noqa: E402


def train_bc(d: D.OfflineData, steps: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    S, A = d.observations.shape[1], d.actions.shape[1]
    net = nn.Sequential(nn.Linear(S, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, A), nn.Tanh())
    opt = torch.optim.Adam(net.parameters(), lr=3e-4)
    x = d.normalizer.normalize(torch.as_tensor(d.observations))
    y = torch.as_tensor(d.actions)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(x), (256,), generator=g)
        loss = ((net(x[idx]) - y[idx]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="datasets/halfcheetah-mixed-bc.hdf5")
    p.add_argument("--noise", default="0.0,0.3,0.6,1.0", help="Gaussian action-noise stds of the BC policy")
    p.add_argument("--episodes-per-policy", type=int, default=20, help="episodes per noise level and for random")
    p.add_argument("--bc-steps", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    d = D.load("halfcheetah-medium-sb3")
    net = train_bc(d, args.bc_steps, args.seed)
    rng = np.random.default_rng(args.seed)
    policies = [("bc", float(s)) for s in args.noise.split(",")] + [("random", 0.0)]
    keys = ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts", "qpos", "qvel")
    buf = {k: [] for k in keys}
    returns, labels, ep_seed = [], [], 200_000
    for kind, noise in policies:
        for _ in range(args.episodes_per_policy):
            env = D.make_env("halfcheetah-medium-sb3", seed=ep_seed)
            obs, _ = env.reset(seed=ep_seed)
            ep_seed += 1
            total, done = 0.0, False
            while not done:
                if kind == "random":
                    a = rng.uniform(-1, 1, size=6)
                else:
                    with torch.no_grad():
                        a = net(d.normalizer.normalize(torch.as_tensor(obs, dtype=torch.float32))).numpy()
                    a = np.clip(a + noise * rng.normal(size=a.shape), -1, 1)
                u = env.unwrapped
                buf["qpos"].append(u.data.qpos.copy())
                buf["qvel"].append(u.data.qvel.copy())
                nxt, r, term, trunc, _ = env.step(a.astype(np.float32))
                for k, v in (("observations", obs), ("actions", a), ("rewards", r), ("next_observations", nxt),
                             ("terminals", term), ("timeouts", trunc and not term)):
                    buf[k].append(v)
                total += r
                obs, done = nxt, term or trunc
            env.close()
            returns.append(total)
            labels.append(f"{kind}{'' if kind == 'random' else f' noise {noise}'}")
            print(f"{labels[-1]:18s} return {total:8.1f}  normalized "
                  f"{float(sources.normalized_score('halfcheetah-medium-sb3', total)):5.1f}")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(out, "w") as f:
        for k in keys:
            arr = np.asarray(buf[k])
            arr = arr.astype(bool) if k in ("terminals", "timeouts") else arr.astype(np.float32)
            f.create_dataset(f"infos/{k}" if k in ("qpos", "qvel") else k, data=arr, compression="gzip", shuffle=True)
        f["metadata/env_id"] = "HalfCheetah-v4"
        f["metadata/policy"] = "BC MLP on halfcheetah-medium-sb3 with Gaussian action noise " + args.noise + ", plus random"
        f["metadata/episode_returns"] = np.asarray(returns, np.float32)
    norm = sources.normalized_score("halfcheetah-medium-sb3", np.asarray(returns))
    print(f"wrote {out}: {len(returns)} episodes, return mean {np.mean(returns):.1f}, "
          f"normalized mean {norm.mean():.1f} (min {norm.min():.1f}, max {norm.max():.1f})")


if __name__ == "__main__":
    main()
