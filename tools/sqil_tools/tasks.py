"""Benchmark tasks: environment, expert no one here wrote, and the success criterion.

- hopper: HopperBulletEnv-v0 (pybullet-envs-gymnasium 0.6.0); expert: the pretrained MLP in the
  pybullet wheel; success: episode return >= 1800 (about 80% of the expert's mean, 2230 over
  seeds 0-2). The critical moments are the touchdowns.
- lander: LunarLander-v3 continuous (gymnasium[box2d]); expert: gymnasium's `heuristic`;
  success: return > 200 (the environment's own "solved" bar). The touchdown is critical.
- pickplace: Meta-World pick-place-v3 (metaworld 3.1.1, its own venv tools/.venv-mw since it pins
  mujoco 3.3.0), 39-d state observations; expert: Meta-World's scripted SawyerPickPlaceV3Policy;
  success: the environment's `success` flag at any step of the 500-step episode. The grasp is
  the critical moment.
- halfcheetah, walker2d, humanoid: HalfCheetahBulletEnv-v0, Walker2DBulletEnv-v0 and
  HumanoidBulletEnv-v0, each with the pretrained MLP its example in the pybullet wheel ships
  (sqil_tools/pybullet_mlp.py); success: return >= about 80% of the expert's mean return over the
  demonstration episodes (rounded; docs/tasks.md).
- pickplace-pixels: the same task and expert, but the policy sees an 84x84 RGB camera image plus
  proprioception and the goal (sqil_tools/pixels.py); the object's position is only in the image.
"""

from dataclasses import dataclass
from typing import Callable

import gymnasium as gym
import numpy as np


@dataclass
class Task:
    name: str
    env_id: str
    env_kwargs: dict
    obs_dim: int
    act_dim: int
    success_return: float
    expert_name: str
    make_expert: Callable

    def make_env(self):
        if self.env_id.endswith("BulletEnv-v0"):
            import pybullet_envs_gymnasium  # noqa: F401  (registers the Bullet envs)
        if self.name.startswith("pickplace"):
            import metaworld  # noqa: F401  (registers Meta-World/MT1)
        env = gym.make(self.env_id, **self.env_kwargs)
        if self.name == "pickplace-pixels":
            from .pixels import PixelObs

            env = PixelObs(env)
        return env

    def success(self, ep_return: float, flagged: bool) -> bool:
        """`flagged`: the environment reported `info["success"]` at some step."""
        if self.name.startswith("pickplace"):
            return bool(flagged)
        return bool(ep_return >= self.success_return)


def _hopper_expert():
    from .hopper import HopperExpert

    return HopperExpert()


def _pybullet_expert(env_id):
    def make():
        from .pybullet_mlp import PretrainedMLP

        return PretrainedMLP(env_id)

    return make


def _lander_expert():
    from gymnasium.envs.box2d.lunar_lander import heuristic

    def act(obs, env):
        return np.asarray(heuristic(env.unwrapped, obs), dtype=np.float32)

    return act


def _pickplace_expert():
    from metaworld.policies.sawyer_pick_place_v3_policy import SawyerPickPlaceV3Policy

    pol = SawyerPickPlaceV3Policy()
    return lambda obs, env: np.asarray(pol.get_action(obs), dtype=np.float32)


def _pickplace_pixels_expert():
    act = _pickplace_expert()
    return lambda obs, env: act(env.state, env)


TASKS = {
    "hopper": Task("hopper", "HopperBulletEnv-v0", {}, 15, 3, 1800.0,
                   "pretrained MLP from the pybullet wheel (enjoy_TF_HopperBulletEnv_v0_2017may.py)", _hopper_expert),
    "lander": Task("lander", "LunarLander-v3", {"continuous": True}, 8, 2, 200.0,
                   "gymnasium.envs.box2d.lunar_lander.heuristic", _lander_expert),
    "pickplace": Task("pickplace", "Meta-World/MT1", {"env_name": "pick-place-v3", "seed": 0}, 39, 4, float("nan"),
                      "metaworld.policies.SawyerPickPlaceV3Policy (scripted)", _pickplace_expert),
    "pickplace-pixels": Task("pickplace-pixels", "Meta-World/MT1", {"env_name": "pick-place-v3", "seed": 0}, 7, 4,
                             float("nan"), "metaworld.policies.SawyerPickPlaceV3Policy (scripted, on the full state)",
                             _pickplace_pixels_expert),
    "halfcheetah": Task("halfcheetah", "HalfCheetahBulletEnv-v0", {}, 26, 6, 2000.0,
                        "pretrained MLP from the pybullet wheel (enjoy_TF_HalfCheetahBulletEnv_v0_2017may.py)",
                        _pybullet_expert("HalfCheetahBulletEnv-v0")),
    "walker2d": Task("walker2d", "Walker2DBulletEnv-v0", {}, 22, 6, 1700.0,
                     "pretrained MLP from the pybullet wheel (enjoy_TF_Walker2DBulletEnv_v0_2017may.py)",
                     _pybullet_expert("Walker2DBulletEnv-v0")),
    "humanoid": Task("humanoid", "HumanoidBulletEnv-v0", {}, 44, 17, 2000.0,
                     "pretrained MLP from the pybullet wheel (enjoy_TF_HumanoidBulletEnv_v0_2017may.py)",
                     _pybullet_expert("HumanoidBulletEnv-v0")),
}

# The Python that can run each task's simulator (Meta-World pins its own mujoco).
SIM_PYTHON = {"pickplace": "tools/.venv-mw/bin/python", "pickplace-pixels": "tools/.venv-mw/bin/python"}


def get(name: str) -> Task:
    if name not in TASKS:
        raise SystemExit(f"unknown task `{name}` (known: {', '.join(TASKS)})")
    return TASKS[name]
