"""Evaluation environments for every dataset, faithful to the D4RL environments the data came from.

D4RL's own environments need mujoco-py and old gym, which no longer install on a current stack, so the
datasets are evaluated on gymnasium + MuJoCo 3 + gymnasium-robotics, with wrappers where they differ:
  - locomotion: gymnasium HalfCheetah-v4 / Hopper-v4 / Walker2d-v4 (the XML and observations of D4RL's
    v3; v5 changes the healthy reward and Walker's foot friction), with actions clipped to [-1, 1] as
    D4RL's NormalizedBoxEnv does. `legacy_dynamics=True` makes MuJoCo 3 simulate them as mujoco-py on
    MuJoCo 2.1 did, the simulator that collected D4RL's files: its body masses, inertias and inertial frames
    (LEGACY_BODY_INERTIA), contact margin and converged constraint solve; train.py turns it on for D4RL's
    own locomotion names;
  - Adroit: gymnasium-robotics AdroitHand{Pen,Hammer,Door,Relocate}-v1 with D4RL's reward (hand-to-object
    sign, D4RL hand_manipulation_suite/*_v0.py) and D4RL's pen episode (100 steps, ends on a drop);
  - Kitchen: FrankaKitchen-v1 with the D4RL task list of each dataset, observation flattened to its 59-d
    "observation" entry (the layout of Minari's D4RL/kitchen/*-v2 data); return = tasks completed (0..4);
  - minari:ID datasets: the env recorded in the dataset (its EnvSpec), rebuilt with gym.make, unwrapped.

gymnasium is imported here; mujoco and gymnasium_robotics only when an env that needs them is built.
Seeding: make_env(info, seed) seeds the action space and passes `seed` to the first reset() that does not
bring its own; later resets continue the environment's own RNG stream. So one env built with seed s
replays the same sequence of episodes, and an evaluator that wants independent episodes builds one env per
seed (seed + i). Nothing here imports data.py: `info` is any object with the DatasetInfo fields.

Shape legend: S = observation dim (info.obs_dim), A = action dim (info.act_dim).
Tests: python -m pytest test_all.py -k envs
"""
import warnings

import gymnasium as gym
import numpy as np

# D4RL's Adroit step limits are the registered ones (pen 100, others 200) and come from info.max_episode_steps.
PEN_DROP_HEIGHT = 0.075  # from D4RL pen_v0.py, because the episode ends when obj_pos[2] < 0.075
HAND_TO_OBJECT_WEIGHT = 0.1  # from D4RL door/hammer/relocate_v0.py: reward = -0.1 * ||palm - object|| + ...

# Per Adroit env: the (MuJoCo object type, name) whose position enters D4RL's -0.1 * ||palm - object|| term.
# D4RL pen has no such term (its reward is the same in gymnasium-robotics; only its episode differs).
ADROIT_OBJECT = {
    "AdroitHandPen-v1": None,
    "AdroitHandHammer-v1": ("body", "Object"),  # hammer_v0.py: obj_pos = body_xpos['Object']
    "AdroitHandDoor-v1": ("site", "S_handle"),  # door_v0.py: handle_pos = site_xpos['S_handle']
    "AdroitHandRelocate-v1": ("body", "Object"),  # relocate_v0.py: obj_pos = body_xpos['Object']
}

# D4RL kitchen_envs.py: kitchen-complete-v0 and kitchen-partial-v0 are KitchenMicrowaveKettleLightSliderV0,
# kitchen-mixed-v0 is KitchenMicrowaveKettleBottomBurnerLightV0 (the same lists as Minari's D4RL/kitchen).
KITCHEN_TASKS = {
    "complete": ["microwave", "kettle", "light switch", "slide cabinet"],
    "partial": ["microwave", "kettle", "light switch", "slide cabinet"],
    "mixed": ["microwave", "kettle", "bottom burner", "light switch"],
}

# Body masses (kg), principal inertias (kg m^2, in the body's inertial frame) and, where they moved, the
# inertial frames (body_ipos, body_iquat) that mujoco-py 2.1.2.14 on MuJoCo 2.1.0, the simulator of D4RL's
# locomotion files, compiled for the gym XMLs, which are built from capsules of density 1000.
# Why they differ: MuJoCo's 2.1.2 changelog says that until then "capsule masses and inertias computed by the
# compiler's inertiafromgeom mechanism were approximated by a cylinder, formed by the capsule's cylindrical
# middle section, extended on both ends by half the capsule radius". So each capsule (radius r, half-length l)
# weighed as the solid cylinder of radius r and height h = 2l + r:
#   m = 1000 * pi * r^2 * h,   I_axis = m r^2 / 2,   I_across = m (3 r^2 + h^2) / 12.
# mujoco-py 2.1.2.14 still loads the MuJoCo 2.1.0 binaries, so it weighs capsules that way.
# Where the numbers come from: `python scripts/legacy_d4rl/reference.py table` printed them from mujoco-py's own
# compiled model (reprs, full precision); the test redoes them independently with MuJoCo 3's compile of the
# XML with every capsule replaced by that cylinder, and the two agree to the last bit (iquat to 7e-16).
#   - Hopper, Walker2d: each body holds one geom centred on its inertial frame, so only mass and inertia
#     change. Totals: Hopper 15.265 kg (MuJoCo 3: 15.820, 3.6% heavier), Walker2d 22.698 kg (23.677, 4.3%).
#   - HalfCheetah: settotalmass="14" rescales the masses to the same 14 kg total, but shares it out
#     differently (torso 6.360 here, 6.250 in MuJoCo 3). Its torso body holds two capsules (torso and head)
#     whose combined centre of mass and principal axes move with their relative weights, so the torso row
#     also carries mujoco-py's body_ipos and body_iquat (they differ by 3e-3 m and 1.4e-4).
# With these rows every numeric field of the compiled models equals mujoco-py's
# (`scripts/legacy_d4rl/reference.py compare` lists the ones that differ: none beyond 1e-12 relative).
# DEVIATION (simulator): D4RL's files are evaluated on MuJoCo 3, not on the mujoco-py they were collected with.
# legacy_dynamics=True (the default for their names) reproduces mujoco-py to round-off
# (docs/datasets.md#which-simulator-legacy-dynamics); legacy_dynamics=False keeps MuJoCo 3's exact capsule
# inertias, margins and solver, which D4RL's data never saw, and is right for data collected on MuJoCo 3 (the
# bundled -sb3 files).
# Each row: body: (mass, (Ixx, Iyy, Izz)) or (mass, (Ixx, Iyy, Izz), (ipos x, y, z), (iquat w, x, y, z)).
LEGACY_BODY_INERTIA = {
    "HalfCheetah-v4": {
        "torso": (6.360313315926893, (0.8944536067044809, 0.8835650219991468, 0.017617796193584532),
                  (0.14913793103448275, 0.0, 0.02485632183908046),
                  (0.5223010558765101, 0.47665669724685783, 0.47665669724685783, 0.5223010558765101)),
        "bthigh": (1.5352480417754566, (0.015255759791122711, 0.015255759791122711, 0.0016242924281984331)),
        "bshin": (1.5809399477806787, (0.016608301131418618, 0.016608301131418618, 0.0016726344647519582)),
        "bfoot": (1.069190600522193, (0.005444318537859005, 0.005444318537859005, 0.00113120365535248)),
        "fthigh": (1.425587467362924, (0.012318501305483029, 0.012318501305483029, 0.0015082715404699737)),
        "fshin": (1.1788511749347257, (0.007162699738903394, 0.007162699738903394, 0.00124722454308094)),
        "ffoot": (0.8498694516971277, (0.0028997545691905996, 0.0028997545691905996, 0.0008991618798955611)),
    },
    "Hopper-v4": {
        "torso": (3.534291735288517, (0.061850105367549015, 0.061850105367549015, 0.004417864669110647)),
        "thigh": (3.9269908169872427, (0.0842666779478513, 0.0842666779478513, 0.004908738521234054)),
        "leg": (2.7143360527015816, (0.06704410050172908, 0.06704410050172908, 0.0021714688421612654)),
        "foot": (5.0893800988154645, (0.0904637312564449, 0.0904637312564449, 0.009160884177867834)),
    },
    "Walker2d-v4": {
        "torso": (3.534291735288517, (0.061850105367549015, 0.061850105367549015, 0.004417864669110647)),
        "thigh": (3.9269908169872427, (0.0842666779478513, 0.0842666779478513, 0.004908738521234054)),
        "leg": (2.7143360527015816, (0.06704410050172908, 0.06704410050172908, 0.0021714688421612654)),
        "foot": (2.9405307237600464, (0.019211467395232305, 0.019211467395232305, 0.005292955302768083)),
        "thigh_left": (3.9269908169872427, (0.0842666779478513, 0.0842666779478513, 0.004908738521234054)),
        "leg_left": (2.7143360527015816, (0.06704410050172908, 0.06704410050172908, 0.0021714688421612654)),
        "foot_left": (2.9405307237600464, (0.019211467395232305, 0.019211467395232305, 0.005292955302768083)),
    },
}


# Contact margin: a contact between two geoms gets the larger of their margins in MuJoCo 2.1 and their sum in
# MuJoCo 3. Measured on Hopper's foot and floor: margins 0.001 and 0.001 give contact.includemargin 0.001 in
# mujoco-py and 0.002 in MuJoCo 3 (margins 0.003 and 0.001: 0.003 and 0.004), so there the contact engages
# earlier and pushes harder. In each of these XMLs every geom has the same margin m (Hopper 0.001, HalfCheetah and
# Walker2d 0; the test checks), so giving every geom m / 2 makes each sum equal the old maximum. With it,
# Hopper's episodes match mujoco-py through contact to 1e-13.
LEGACY_MARGIN_SCALE = 0.5

# Constraint solver: at the same tolerance (1e-8, the XMLs' default) MuJoCo 3's Newton solver stops at another
# point than MuJoCo 2.1's, which leaves ~1e-6 differences in the velocities at every step where a joint limit or
# a contact is active. mujoco-py's results are the converged solution: solved to 1e-15 (or to 0) instead, MuJoCo 3
# reproduces them to 1e-13 over whole episodes with contacts and limits (scripts/legacy_d4rl/reference.py compare).
# Newton converges in a few iterations, so this costs no measurable time per step.
LEGACY_SOLVER_TOLERANCE = 1e-15


# ----------------------------------------------------------------------------- entry point

def make_env(info, seed=None, legacy_dynamics=False, render_mode=None):
    """Build the evaluation env of dataset `info` (a DatasetInfo): obs (S,) float64, action (A,)."""
    if legacy_dynamics and info.env_id not in LEGACY_BODY_INERTIA:
        raise ValueError(f"legacy_dynamics is defined for {sorted(LEGACY_BODY_INERTIA)} only, not {info.env_id}")
    if info.family == "locomotion":
        env = _make(info, render_mode)
        if legacy_dynamics:
            set_legacy_dynamics(env.unwrapped.model, env.unwrapped.data, info.env_id)
        env = ClipAction(env)
    elif info.family == "adroit":
        import gymnasium_robotics

        gym.register_envs(gymnasium_robotics)
        if info.env_id not in ADROIT_OBJECT:
            raise ValueError(f"unknown Adroit env {info.env_id}; expected one of {sorted(ADROIT_OBJECT)}")
        env = D4RLAdroit(_make(info, render_mode), info.env_id)
    elif info.family == "kitchen":
        import gymnasium_robotics

        gym.register_envs(gymnasium_robotics)
        task_set = info.name.split("-")[1] if info.name.count("-") >= 2 else ""
        if task_set not in KITCHEN_TASKS:
            raise ValueError(f"cannot tell the kitchen tasks of {info.name!r}; expected kitchen-{{complete,partial,mixed}}-v0")
        env = KitchenObservation(_make(info, render_mode, tasks_to_complete=KITCHEN_TASKS[task_set]))
    elif info.family == "minari":
        env = _make_from_spec(info, render_mode)
        if legacy_dynamics:
            set_legacy_dynamics(env.unwrapped.model, env.unwrapped.data, info.env_id)
    else:
        raise ValueError(f"unknown env family {info.family!r} for {info.name}; "
                         f"expected locomotion, adroit, kitchen or minari")

    if env.observation_space.shape != (info.obs_dim,) or env.action_space.shape != (info.act_dim,):
        raise ValueError(f"{info.env_id} has obs {env.observation_space.shape} / action {env.action_space.shape}, "
                         f"but {info.name} is registered with ({info.obs_dim},) / ({info.act_dim},)")
    if seed is not None:
        env.action_space.seed(seed)
    return SeedFirstReset(env, seed)


def _make(info, render_mode, **kwargs):
    with warnings.catch_warnings():
        # The v4 locomotion envs are chosen on purpose (D4RL's XML and observations), so their
        # "out of date, use v5" DeprecationWarning is silenced.
        warnings.simplefilter("ignore", DeprecationWarning)
        return gym.make(info.env_id, max_episode_steps=info.max_episode_steps, render_mode=render_mode, **kwargs)


def _make_from_spec(info, render_mode):
    """A Minari dataset's env, rebuilt from its recorded EnvSpec (info.env_spec, JSON) exactly as minari's
    recover_environment does (gym.make(spec)), so it needs no minari import. No D4RL wrapper is applied: the data
    were recorded in this env as it is. A dict observation is flattened to its 'observation' entry, as the data are."""
    from gymnasium.envs.registration import EnvSpec

    spec = EnvSpec.from_json(info.env_spec)
    if "gymnasium_robotics" in str(spec.entry_point):
        import gymnasium_robotics

        gym.register_envs(gymnasium_robotics)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # a recorded v4 env warns that v5 exists
        env = gym.make(spec, render_mode=render_mode)
    spaces = getattr(env.observation_space, "spaces", None)
    if isinstance(spaces, dict) and "observation" in spaces:
        env = KitchenObservation(env)
    return env


# ----------------------------------------------------------------------------- wrappers

class SeedFirstReset(gym.Wrapper):
    """Pass `seed` to the first reset() that brings none; later resets continue the env's RNG stream."""

    def __init__(self, env, seed):
        super().__init__(env)
        self._pending_seed = seed

    def reset(self, *, seed=None, options=None):
        if seed is None:
            seed = self._pending_seed
        self._pending_seed = None
        return self.env.reset(seed=seed, options=options)


class ClipAction(gym.ActionWrapper):
    """Clip each action to the action space before the env sees it, as D4RL's locomotion envs do.

    D4RL wraps gym's mujoco-py env in NormalizedBoxEnv (d4rl/utils/wrappers.py), whose step() maps [-1, 1]
    to the env's bounds (the identity here: every actuator's ctrlrange is [-1, 1]) and clips. gymnasium's
    MuJoCo envs do not: MuJoCo clamps the control to ctrlrange, so the dynamics agree, but the reward's
    control cost is computed from the unclipped action. The action space is left as it is.
    """

    def action(self, action):
        return np.clip(action, self.action_space.low, self.action_space.high)


class D4RLAdroit(gym.Wrapper):
    """gymnasium-robotics Adroit v1 made to score like D4RL's hand_manipulation_suite.

    DEVIATION (simulator): the official code evaluates on D4RL's mujoco-py envs; this is gymnasium-robotics'
    port on MuJoCo 3, with its observations and resets written like D4RL's. Its reward is not: since
    gymnasium-robotics 1.2.1 the -v1 door, hammer and relocate rewards add +0.1 * ||palm - object|| where
    D4RL adds -0.1 * ||palm - object|| (gymnasium-robotics pull request #220; fixed only in the -v2 envs of
    1.4.3). Every other term is D4RL's, so step() adds -0.2 * ||palm - object|| from the same sim state.
    Pen's reward already equals D4RL's; its episode is made D4RL's: it terminates when the pen falls below
    PEN_DROP_HEIGHT (the 100-step limit is the TimeLimit from info.max_episode_steps).
    """

    def __init__(self, env, env_id):
        super().__init__(env)
        import mujoco

        model = env.unwrapped.model
        self._pen = env_id == "AdroitHandPen-v1"
        self._obj_body = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_BODY, "Object")
        self._palm = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_SITE, "S_grasp")
        target = ADROIT_OBJECT[env_id]
        self._target = None
        if target is not None and _gymnasium_robotics_has_sign_flip():
            kind = mujoco.mjtObj.mjOBJ_BODY if target[0] == "body" else mujoco.mjtObj.mjOBJ_SITE
            self._target = (target[0], mujoco.mj_name2id(model, kind, target[1]))

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        data = self.env.unwrapped.data
        if self._target is not None:
            kind, idx = self._target
            obj = data.xpos[idx] if kind == "body" else data.site_xpos[idx]
            # gymnasium-robotics: +0.1 d; D4RL: -0.1 d  ->  subtract 2 * 0.1 d
            reward = reward - 2 * HAND_TO_OBJECT_WEIGHT * float(np.linalg.norm(data.site_xpos[self._palm] - obj))
        if self._pen:
            terminated = terminated or bool(data.xpos[self._obj_body][2] < PEN_DROP_HEIGHT)  # D4RL pen_v0.py
        return obs, float(reward), terminated, truncated, info


def _gymnasium_robotics_has_sign_flip():
    """The +0.1 * ||palm - object|| bug is in gymnasium-robotics >= 1.2.1 (requirements pin 1.4.2)."""
    from importlib.metadata import version

    parts = [int(p) for p in version("gymnasium-robotics").split(".")[:3] if p.isdigit()]
    return tuple(parts) >= (1, 2, 1)


class KitchenObservation(gym.Wrapper):
    """FrankaKitchen-v1 (or any env with a dict observation) with its observation flattened to the 'observation' entry.

    The 59 numbers are robot joint positions (9) and velocities (9), then object positions (21) and
    velocities (20), the layout of Minari's D4RL/kitchen/*-v2 datasets.
    DEVIATION (from D4RL): D4RL's kitchen observations are 60-d (robot and object positions plus the goal),
    from a mujoco-py sim; Minari re-simulated the D4RL demonstrations in FrankaKitchen-v1, and the kitchen
    datasets are read from there, so the policy sees FrankaKitchen's observation.
    Reward: FrankaKitchen-v1 with remove_task_when_completed and terminate_on_tasks_completed (its defaults,
    as in D4RL's KitchenBase) gives 1 per task at the step it is completed, so the return is the number of
    tasks completed (0..4), D4RL's kitchen score before normalization.
    """

    def __init__(self, env):
        super().__init__(env)
        self.observation_space = env.observation_space["observation"]
        if not isinstance(self.observation_space, gym.spaces.Box):
            raise ValueError("FrankaKitchen-v1's 'observation' entry is not a Box")

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        return obs["observation"], info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        return obs["observation"], reward, terminated, truncated, info


# ----------------------------------------------------------------------------- legacy dynamics

def one_step_error(info, qpos, qvel, actions, next_obs, legacy_dynamics: bool) -> float:
    """Set the environment to recorded states (qpos, qvel: (N, nq), (N, nv)), take one step with the recorded
    actions (N, A) and return the largest |simulated - recorded| next observation (N, S), in the given dynamics.
    The dynamics a file came from reproduce it to float32 round-off; the other ones miss by far more."""
    env = make_env(info, seed=0, legacy_dynamics=legacy_dynamics)
    env.reset(seed=0)
    u = env.unwrapped
    err = 0.0
    for q, v, a, o in zip(qpos, qvel, actions, next_obs):
        u.set_state(np.asarray(q, np.float64), np.asarray(v, np.float64))
        obs = env.step(np.asarray(a, np.float64))[0]
        err = max(err, float(np.abs(obs - o).max()))
    env.close()
    return err



def set_legacy_dynamics(model, data, env_id):
    """Write LEGACY_BODY_INERTIA[env_id], LEGACY_MARGIN_SCALE and LEGACY_SOLVER_TOLERANCE into a compiled
    MjModel, then recompute what depends on them.

    mj_setConst redoes the compile-time quantities derived from the masses and inertial frames (subtree
    masses, dof_M0, dof/body inverse weights, actuator_acc0, the tracking cameras' reference), so the model
    equals one compiled with the old inertias.
    """
    import mujoco

    for body, (mass, inertia, *frame) in LEGACY_BODY_INERTIA[env_id].items():
        b = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_BODY, body)
        if b < 0:
            raise ValueError(f"{env_id} has no body {body!r}; its XML is not the one LEGACY_BODY_INERTIA was made for")
        model.body_mass[b] = mass
        model.body_inertia[b] = inertia
        if frame:  # the inertial frame moved too (HalfCheetah's two-capsule torso)
            model.body_ipos[b], model.body_iquat[b] = frame
    model.geom_margin[:] *= LEGACY_MARGIN_SCALE  # MuJoCo 2.1's max(m, m) = m as MuJoCo 3's m/2 + m/2
    model.opt.tolerance = LEGACY_SOLVER_TOLERANCE
    mujoco.mj_setConst(model, data)
