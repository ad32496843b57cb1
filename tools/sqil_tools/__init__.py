"""Python edges of sqil: tasks, experts, rollouts, policy drivers."""

import os

# MuJoCo picks its OpenGL platform when first imported: headless software rendering unless the
# caller chose (MUJOCO_GL=egl on a GPU machine). Set before anything imports mujoco.
os.environ.setdefault("MUJOCO_GL", "osmesa")
