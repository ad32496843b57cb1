"""Benchmark tasks: environment, expert no one here wrote, and the success criterion.

- hopper: HopperBulletEnv-v0 (pybullet-envs-gymnasium 0.6.0); expert: the pretrained MLP in the
  pybullet wheel; success: episode return >= 1800 (about 80% of the expert's mean, 2230 over
  seeds 0-2). The critical moments are the touchdowns.
- lander: LunarLander-v3 continuous (gymnasium[box2d]); expert: gymnasium's `heuristic`;
  success: return > 200 (the environment's own "solved" bar). The touchdown is critical.
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
        if self.name == "hopper":
            import pybullet_envs_gymnasium  # noqa: F401  (registers the Bullet envs)
        return gym.make(self.env_id, **self.env_kwargs)

    def success(self, ep_return: float, info: dict) -> bool:
        return bool(ep_return >= self.success_return)


def _hopper_expert():
    from .hopper import HopperExpert

    return HopperExpert()


def _lander_expert():
    from gymnasium.envs.box2d.lunar_lander import heuristic

    def act(obs, env):
        return np.asarray(heuristic(env.unwrapped, obs), dtype=np.float32)

    return act


TASKS = {
    "hopper": Task("hopper", "HopperBulletEnv-v0", {}, 15, 3, 1800.0,
                   "pretrained MLP from the pybullet wheel (enjoy_TF_HopperBulletEnv_v0_2017may.py)", _hopper_expert),
    "lander": Task("lander", "LunarLander-v3", {"continuous": True}, 8, 2, 200.0,
                   "gymnasium.envs.box2d.lunar_lander.heuristic", _lander_expert),
}


def get(name: str) -> Task:
    if name not in TASKS:
        raise SystemExit(f"unknown task `{name}` (known: {', '.join(TASKS)})")
    return TASKS[name]
