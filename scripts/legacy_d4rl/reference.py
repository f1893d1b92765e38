"""Reference numbers from D4RL's own simulator, and the gap that remains on MuJoCo 3.

D4RL's locomotion files were collected in gym's mujoco-py environments on MuJoCo 2.x. This script runs those
environments through D4RL's own code (d4rl 1.1, gym 0.23.1, mujoco-py 2.1.2.14 on the MuJoCo 2.1.0 binaries) and
prints what envs.py and test_all.py hold, then replays the same inputs on this project's environments. The first
three modes run in the legacy stack, the last in the project's environment:

    bash scripts/legacy_d4rl/setup.sh /tmp/legacy && source /tmp/legacy/env.sh   # about 90 s
    python scripts/legacy_d4rl/reference.py table              # compiled body masses, inertias, frames (envs.py)
    python scripts/legacy_d4rl/reference.py steps              # the reference cases of test_all.py
    python scripts/legacy_d4rl/reference.py episodes OUT.npz --data datasets/halfcheetah-medium-sb3.hdf5 [more.hdf5]
    deactivate
    python scripts/legacy_d4rl/reference.py compare OUT.npz    # replay OUT.npz on MuJoCo 3, today's and legacy dynamics

`steps` runs the STEPS cases below (in the air, at joint limits, landing on the floor) from fixed states with
fixed actions and prints inputs and outputs as Python literals. `episodes` runs whole episodes (1000 steps or
until the episode ends) from fixed states with fixed action sequences: uniform random actions and zero actions
from the XML pose plus gym's reset noise, drawn once here with numpy's Generator(EPISODE_SEED) and saved so that
both sides replay the same numbers, and the first episode of each --data file; it also saves every numeric
field of mujoco-py's compiled models. `compare` lists the model fields that differ and, per episode, how long
and how closely MuJoCo 3 follows mujoco-py, next to the floor that round-off alone sets (the same simulator,
started 1e-12 rad apart).
"""
import argparse
import pprint
import sys
import warnings
from pathlib import Path

import numpy as np

ENVS = ["halfcheetah-medium-v2", "hopper-medium-v2", "walker2d-medium-v2"]  # D4RL names; any quality, same env

# Reference cases, "ENV/free", "ENV/limit" and "ENV/contact" (record_steps checks each description):
# free: the root lifted clear of the floor (halfcheetah rootz +1.0 m; hopper/walker rootz 1.75, 0.5 m above the
# XML pose), joint angles well inside their ranges, velocities of every sign, five actions with some entries
# outside [-1, 1]. No contact and no joint limit is active at any MuJoCo step: the model alone.
# limit: lifted the same way, at rest, every joint just past one end of its range, inside the limit's soft zone
# (solimp width: halfcheetah 0.01 of 0.03 rad, pushed by half torque; hopper/walker 0.0005 of 0.001 rad, no
# torque): joint-limit constraints and no contact, so these pin the constraint solver (envs.py).
# contact: the XML pose (hopper/walker lowered 3 cm, feet 1 cm above the floor) at rest, twelve actions; the
# feet land within the first steps, so these pin contact handling too (Hopper's contact margin, envs.py).
STEPS = {
    "halfcheetah-medium-v2/free": dict(
        qpos=[0.0, 1.0, 0.1, 0.2, -0.3, 0.2, 0.3, -0.4, 0.1],
        qvel=[1.0, 0.5, -0.5, 2.0, -1.5, 1.0, -2.0, 1.5, -1.0],
        actions=[[0.5, -1.5, 0.25, 1.25, -0.75, 0.0], [-1.0, 0.8, 2.0, -0.3, 0.6, -1.2],
                 [0.9, 0.1, -0.6, -2.5, 1.0, 0.4], [-0.2, -0.9, 0.7, 0.3, -1.1, 1.5],
                 [1.3, 0.45, -0.35, 0.6, -0.05, -0.8]]),
    "hopper-medium-v2/free": dict(
        qpos=[0.0, 1.75, 0.05, -0.6, -0.8, 0.1],
        qvel=[0.5, 0.3, -0.4, -1.0, -1.0, 1.0],
        actions=[[0.5, -1.5, 0.25], [1.2, 0.8, -0.6], [-0.9, 0.1, 2.0], [0.3, -1.1, 0.7], [-0.4, 0.65, -0.95]]),
    "walker2d-medium-v2/free": dict(
        qpos=[0.0, 1.75, 0.05, -0.6, -0.8, 0.1, -0.4, -1.0, -0.2],
        qvel=[0.5, 0.3, -0.4, -1.0, -1.0, 1.0, -1.5, 0.5, -0.5],
        # smaller torques on the light legs, so that no velocity reaches the observation's +-10 clip
        actions=[[1.5, -0.2, 0.05, 0.1, -0.1, 0.0], [-0.2, 0.1, 0.1, -1.25, 0.15, -0.05],
                 [0.15, 0.05, -0.1, 0.2, 0.2, 0.05], [-2.0, -0.1, 0.05, 0.05, -0.2, 0.1],
                 [0.2, 0.05, -0.05, 0.1, -0.05, -0.1]]),
}
STEPS.update({  # ranges: halfcheetah bthigh .. 1.05, bshin .. .785, bfoot -.4 .., fthigh -1 .., fshin .. .87,
    # ffoot .. .5 (rad); hopper/walker thigh and leg -150 .. 0 degrees, foot -45 .. 45 degrees (0.785 rad)
    "halfcheetah-medium-v2/limit": dict(qpos=[0.0, 1.0, 0.0, 1.06, 0.795, -0.41, -1.01, 0.88, 0.51], qvel=[0.0] * 9,
                                        actions=[[0.5, 0.5, -0.5, -0.5, 0.5, 0.5]] * 8),
    "hopper-medium-v2/limit": dict(qpos=[0.0, 1.75, 0.0, 0.0005, 0.0005, 0.7859], qvel=[0.0] * 6,
                                   actions=[[0.0] * 3] * 8),
    "walker2d-medium-v2/limit": dict(qpos=[0.0, 1.75, 0.0, 0.0005, 0.0005, 0.7859, 0.0005, 0.0005, -0.7859],
                                     qvel=[0.0] * 9, actions=[[0.0] * 6] * 8),
})
for _name, _qpos, _A, _div in (("halfcheetah-medium-v2", [0.0] * 9, 6, 8),
                               ("hopper-medium-v2", [0.0, 1.22, 0.0, 0.0, 0.0, 0.0], 3, 8),
                               ("walker2d-medium-v2", [0.0, 1.22] + [0.0] * 7, 6, 16)):  # walker: gentler, see above
    STEPS[f"{_name}/contact"] = dict(  # actions ((3t + 5j) mod 9 - 4) / div, exact in binary
        qpos=_qpos, qvel=[0.0] * len(_qpos),
        actions=[[((3 * t + 5 * j) % 9 - 4) / _div for j in range(_A)] for t in range(12)])
EPISODE_SEED = 0  # numpy Generator seed of the episodes' initial-state noise and actions
EPISODE_STEPS = 1000  # D4RL's locomotion episode limit


# ----------------------------------------------------------------------------- legacy side (mujoco-py)

def legacy_env(name):
    """D4RL's environment (TimeLimit > NormalizedBoxEnv > gym's mujoco-py env) and its innermost mujoco env."""
    warnings.filterwarnings("ignore")
    import gym
    import d4rl.gym_mujoco  # noqa: F401  registers the *-v2 names

    from gym.envs.mujoco.mujoco_env import MujocoEnv

    env = gym.make(name)
    inner = env
    while not isinstance(inner, MujocoEnv):  # gym wrappers keep it in .env, D4RL's ProxyEnv in .wrapped_env
        inner = inner.env if isinstance(inner, gym.Wrapper) else inner.wrapped_env
    return env, inner


def print_table():
    """Body: (mass, principal inertia, inertial-frame position, inertial-frame quaternion), full precision."""
    for name in ENVS:
        _, inner = legacy_env(name)
        m = inner.sim.model
        print(f"# {name}")
        for b, body in enumerate(m.body_names):
            if b == 0:
                continue
            row = (float(m.body_mass[b]), tuple(map(float, m.body_inertia[b])),
                   tuple(map(float, m.body_ipos[b])), tuple(map(float, m.body_iquat[b])))
            print(f"{body!r}: {row!r},")


def run_steps(key, check=False):
    """STEPS[key] through D4RL's env: (observation after the last step, reward of each step, (MuJoCo steps
    with a contact, MuJoCo steps with another constraint, i.e. a joint limit)).

    check=True replaces gym's do_simulation (set ctrl, then sim.step() frame_skip times) by the same loop that
    also counts, after every MuJoCo step, the steps with a contact and the steps with a joint limit."""
    case = STEPS[key]
    env, inner = legacy_env(key.split("/")[0])
    env.reset()
    counts = [0, 0]
    if check:
        def do_simulation(ctrl, n_frames):
            inner.sim.data.ctrl[:] = ctrl
            for _ in range(n_frames):
                inner.sim.step()
                d = inner.sim.data
                counts[0] += d.ncon > 0
                counts[1] += d.nefc > 4 * d.ncon  # a contact makes at most 4 rows here (condim 3, pyramidal)
        inner.do_simulation = do_simulation
    inner.set_state(np.array(case["qpos"]), np.array(case["qvel"]))
    rewards = []
    for a in case["actions"]:
        obs, r, done, _ = env.step(np.array(a))
        assert not done, f"{key}: the episode ended"
        rewards.append(float(r))
    return list(map(float, obs)), rewards, tuple(counts)


def record_steps():
    """Each case's inputs, observation after the last step and rewards, printed as Python literals."""
    for key, case in STEPS.items():
        obs, rewards, _ = run_steps(key)
        obs_, rewards_, (contacts, limits) = run_steps(key, check=True)
        # the checking loop is gym's own; mujoco-py itself varies by ~1e-16 from run to run once a joint
        # limit is active (MuJoCo 2.1.0's solver), hence allclose
        assert np.allclose(obs + rewards, obs_ + rewards_, rtol=0, atol=1e-13)
        kind = key.split("/")[1]
        assert (contacts > 0) == (kind == "contact") and (kind != "free" or limits == 0) and \
            (kind != "limit" or limits > 0), f"{key}: {contacts} steps in contact, {limits} at a limit"
        n = len(rewards) * (5 if key.startswith("halfcheetah") else 4)  # frame_skip
        print(f"{key!r}: dict(  # MuJoCo steps with a contact {contacts} / with a joint limit {limits} / all {n}")
        for field, value in (("qpos", case["qpos"]), ("qvel", case["qvel"]), ("actions", case["actions"]),
                             ("obs", obs), ("rewards", rewards)):  # reprs (full precision), wrapped at 112 columns
            text = pprint.pformat(value, width=112 - len(field) - 5, compact=True)
            print(f"    {field}=" + text.replace("\n", "\n" + " " * (len(field) + 5)) + ",")
        print("),")


OPT_FIELDS = ["timestep", "gravity", "wind", "magnetic", "density", "viscosity", "impratio", "tolerance",
              "noslip_tolerance", "integrator", "cone", "jacobian", "solver", "iterations", "noslip_iterations"]


def episode_inputs(name, inner, files, rng):
    """{source: (qpos, qvel, actions)}: pseudo-random and zero actions from a slightly noisy XML pose, and
    the first episode of each data file (D4RL layout, with infos/qpos and infos/qvel) of this environment."""
    nq, nv, A = inner.model.nq, inner.model.nv, inner.action_space.shape[0]
    noise = (inner.init_qpos + rng.uniform(-0.005, 0.005, nq),  # gym's hopper/walker reset noise scale
             inner.init_qvel + rng.uniform(-0.005, 0.005, nv))
    inputs = {"random": (*noise, rng.uniform(-1.0, 1.0, (EPISODE_STEPS, A))),  # uniform actions in [-1, 1]
              "zero": (*noise, np.zeros((EPISODE_STEPS, A)))}  # no torque: the body settles or collapses
    import h5py

    for f in files:
        with h5py.File(f, "r") as h:
            env_id = h["metadata/env_id"][()].decode()
            if env_id.split("-")[0].lower() != name.split("-")[0]:  # HalfCheetah-v4 -> halfcheetah
                continue
            end = int(np.argmax(h["terminals"][:] | h["timeouts"][:])) + 1  # the first episode
            inputs[Path(f).stem] = (h["infos/qpos"][0], h["infos/qvel"][0], h["actions"][:end])
    return inputs


def record_episodes(path, files):
    """Run each episode in D4RL's env and save inputs, observations, rewards, contacts and the compiled model."""
    rng = np.random.default_rng(EPISODE_SEED)
    out = {}
    for name in ENVS:
        env, inner = legacy_env(name)
        m = inner.sim.model
        for f in dir(m):  # every numeric array of the compiled model, for `compare`
            v = getattr(m, f, None) if not f.startswith("_") else None
            if isinstance(v, np.ndarray) and v.dtype.kind in "fi":
                out[f"{name}/model/{f}"] = v.copy()
        for f in OPT_FIELDS:
            out[f"{name}/opt/{f}"] = np.array(getattr(m.opt, f), dtype=float)
        for source, (qpos, qvel, actions) in episode_inputs(name, inner, files, rng).items():
            env.reset()
            inner.set_state(qpos, qvel)
            obs, rewards, ncon = [inner._get_obs()], [], []
            for a in actions:
                o, r, done, _ = env.step(a)
                obs.append(o)
                rewards.append(r)
                ncon.append(inner.sim.data.ncon)
                if done:
                    break
            k = f"{name}/episode/{source}"
            out.update({f"{k}/qpos": qpos, f"{k}/qvel": qvel, f"{k}/actions": actions, f"{k}/obs": np.array(obs),
                        f"{k}/rewards": np.array(rewards), f"{k}/ncon": np.array(ncon)})
            print(f"{name} {source}: {len(rewards)} steps, return {sum(rewards):.3f}, "
                  f"first contact at step {int(np.argmax(np.array(ncon) > 0)) + 1}")
    np.savez(path, **out)
    print(f"wrote {path}")


# ----------------------------------------------------------------------------- project side (MuJoCo 3)

def compare(path):
    """Model fields that differ, then each saved episode replayed with today's and with legacy dynamics."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import data

    ref = np.load(path)
    for name in ENVS:
        for legacy in (False, True):
            m = data.make_env(name, legacy_dynamics=legacy).unwrapped.model
            differ = []
            for key in [k for k in ref.files if k.startswith(f"{name}/model/") or k.startswith(f"{name}/opt/")]:
                kind, f = key.split("/")[1:]
                ours = getattr(m.opt if kind == "opt" else m, f, None)
                if ours is None or np.size(ours) != ref[key].size or not ref[key].size:
                    continue  # a field only one of the two versions has (or one they lay out differently)
                d = np.abs(np.reshape(ours, ref[key].shape) - ref[key]).max()
                scale = max(1.0, np.abs(ref[key]).max())
                if d > 1e-12 * scale:
                    differ.append(f"{f} {d:.1e}")
            print(f"{name} {'legacy' if legacy else 'today'}: model fields that differ from mujoco-py's "
                  f"(beyond 1e-12 relative): {', '.join(differ) or 'none'}")
    print("(hopper's geom_margin differs on purpose: legacy dynamics halve it, see envs.LEGACY_MARGIN_SCALE)\n")
    sources = sorted({k.split("/")[2] for k in ref.files if k.split("/")[1] == "episode"})  # NAME/episode/SOURCE/x
    for name in ENVS:
        for source in sources:
            k = f"{name}/episode/{source}"
            if f"{k}/obs" not in ref.files:
                continue
            ep = (ref[f"{k}/qpos"].astype(float), ref[f"{k}/qvel"].astype(float), ref[f"{k}/actions"])
            legacy = rollout(data, name, True, *ep)
            kicked = ep[0].copy()
            kicked[2] += 1e-12  # the root's pitch, 1e-12 rad: how far round-off alone carries this episode
            rows = {"today's dynamics": (rollout(data, name, False, *ep), (ref[f"{k}/obs"], ref[f"{k}/rewards"])),
                    "legacy dynamics": (legacy, (ref[f"{k}/obs"], ref[f"{k}/rewards"])),
                    "floor: legacy, pitch + 1e-12 rad, vs legacy": (rollout(data, name, True, kicked, *ep[1:]), legacy)}
            contact = int(np.argmax(ref[f"{k}/ncon"] > 0)) + 1
            print(f"{name} {source} (mujoco-py: {len(ref[f'{k}/rewards'])} steps, first contact at step {contact})")
            for label, ((obs, rew), (obs_ref, rew_ref)) in rows.items():
                n = min(len(obs), len(obs_ref))
                diff = np.abs(obs[:n] - obs_ref[:n]).max(axis=1)  # (n,) max |obs diff| after each step
                together = int(np.argmax(diff > 1e-6)) if (diff > 1e-6).any() else n  # steps within 1e-6
                R, R_ref = float(rew.sum()), float(rew_ref.sum())
                print(f"    {label:44s} {len(rew):4d} steps; |obs diff| < 1e-6 for {together:4d} steps, max "
                      f"{diff.max():8.2e}; return {R:8.1f} vs {R_ref:8.1f} ({R - R_ref:+7.1f})")


def rollout(data, name, legacy, qpos, qvel, actions):
    """(obs (T+1, S), rewards (T,)) of this project's environment from (qpos, qvel) under fixed actions."""
    env = data.make_env(name, legacy_dynamics=legacy)
    env.reset(seed=0)
    env.unwrapped.set_state(qpos, qvel)
    obs, rewards = [env.unwrapped._get_obs()], []
    for a in actions:
        o, r, terminated, truncated, _ = env.step(a)
        obs.append(o)
        rewards.append(r)
        if terminated or truncated:
            break
    return np.array(obs), np.array(rewards)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["table", "steps", "episodes", "compare"])
    p.add_argument("path", nargs="?", default="legacy_episodes.npz", help="episodes: written; compare: read")
    p.add_argument("--data", nargs="*", default=[], help="episodes: D4RL-layout files whose first episode "
                                                         "(initial state and actions) is replayed too")
    args = p.parse_args()
    {"table": print_table, "steps": record_steps, "episodes": lambda: record_episodes(args.path, args.data),
     "compare": lambda: compare(args.path)}[args.mode]()
