#!/usr/bin/env bash
# Builds a venv with the ORIGINAL D4RL stack (gym 0.23.1 + mujoco-py 2.1.2.14 on the MuJoCo 2.1.0 binaries that the
# free-mujoco-py wheel carries + d4rl 1.1 without its deps), to check the project against D4RL's own code:
# its sequence splitting, its envs, its get_normalized_score. Locomotion only (Adroit needs mjrl, which is not on PyPI).
# usage: bash scripts/legacy_d4rl/setup.sh VENV_DIR
#   then: source VENV_DIR/env.sh; python -c "import d4rl.gym_mujoco"
set -eu
case "${1:-}" in -h|--help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac
V=$1
command -v apt-get >/dev/null && { dpkg -s libosmesa6-dev >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq libosmesa6-dev libglew-dev patchelf >/dev/null; }; }
python3 -m venv "$V"
"$V/bin/pip" install -q torch==2.13.0
"$V/bin/pip" install -q "gym==0.23.1" "mujoco-py==2.1.2.14" "cython<3" numpy h5py tqdm termcolor click
"$V/bin/pip" install -q --no-deps d4rl==1.1
mkdir -p "$V/dl" "$V/mj"
"$V/bin/pip" download -q --no-deps --ignore-requires-python free-mujoco-py==2.1.6 -d "$V/dl"
"$V/bin/python" -m zipfile -e "$V"/dl/free_mujoco_py-2.1.6-py3-none-any.whl "$V/mj"
cat > "$V/env.sh" <<ENV
export MUJOCO_PY_MUJOCO_PATH=$V/mj/mujoco_py/binaries/linux/mujoco210
export LD_LIBRARY_PATH=\$MUJOCO_PY_MUJOCO_PATH/bin:\${LD_LIBRARY_PATH:-}
source $V/bin/activate
ENV
. "$V/env.sh"
python -c "import mujoco_py" >/dev/null 2>&1   # compiles cymj once (~80 s)
python -c "import d4rl.gym_mujoco, gym; e = gym.make('halfcheetah-medium-v2'); e.reset(); print('legacy D4RL ok', e.get_normalized_score(4000.0))"
