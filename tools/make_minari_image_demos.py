"""Writes a small Minari dataset with camera frames, with Minari's own DataCollector: a toy
environment whose Dict observation has `camera` (a 12x16 RGB uint8 image of a point on a grid) and
`state` (the point's position, float32), two episodes of 20 seeded random steps, stored with the
HDF5 backend under testdata/demos/minari-pixels/ (MINARI_DATASETS_PATH), and the same steps as an
.npz (observations = state, images = camera as [T, 3, H, W], actions, episode_starts; each
episode's final observation dropped) for crates/data/tests/load.rs.

    tools/.venv-dev/bin/python tools/make_minari_image_demos.py
"""
import os
import pathlib
import shutil

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "testdata/demos/minari-pixels"
os.environ["MINARI_DATASETS_PATH"] = str(OUT)

import gymnasium as gym  # noqa: E402
from minari import DataCollector  # noqa: E402

H, W = 12, 16


class PointCamera(gym.Env):
    """A point moved by 2-D actions on a 12x16 grid, seen by a camera (its pixel lit, a gradient
    background) and by its coordinates."""

    def __init__(self):
        self.observation_space = gym.spaces.Dict({
            "camera": gym.spaces.Box(0, 255, (H, W, 3), np.uint8),
            "state": gym.spaces.Box(-np.inf, np.inf, (2,), np.float32),
        })
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.pos = np.zeros(2, np.float32)

    def _obs(self):
        img = np.zeros((H, W, 3), np.uint8)
        img[..., 0] = np.arange(W, dtype=np.uint8)[None, :] * 9
        img[..., 1] = np.arange(H, dtype=np.uint8)[:, None] * 13
        y, x = int(np.clip(self.pos[1], 0, H - 1)), int(np.clip(self.pos[0], 0, W - 1))
        img[y, x] = (255, 255, 255)
        return {"camera": img, "state": self.pos.copy()}

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.pos = self.np_random.uniform([0, 0], [W - 1, H - 1]).astype(np.float32)
        return self._obs(), {}

    def step(self, action):
        self.pos = np.clip(self.pos + 2 * np.asarray(action, np.float32), [0, 0], [W - 1, H - 1]).astype(np.float32)
        return self._obs(), -float(np.abs(self.pos - [W / 2, H / 2]).sum()), False, False, {}


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    env = DataCollector(gym.wrappers.TimeLimit(PointCamera(), max_episode_steps=20), data_format="hdf5")
    env.action_space.seed(7)
    for seed in (0, 1):
        env.reset(seed=seed)
        done = False
        while not done:
            _, _, term, trunc, _ = env.step(env.action_space.sample())
            done = term or trunc
    ds = env.create_dataset(dataset_id="point/pixels-v0", algorithm_name="uniform random actions",
                            author="sqil tools/make_minari_image_demos.py")
    obs, img, act, starts = [], [], [], []
    for ep in ds.iterate_episodes():
        obs.append(ep.observations["state"][:-1])
        img.append(ep.observations["camera"][:-1].transpose(0, 3, 1, 2))
        act.append(ep.actions)
        starts.append(np.arange(len(ep.actions)) == 0)
    np.savez(OUT / "point-pixels-v0.npz", observations=np.concatenate(obs).astype(np.float32),
             images=np.concatenate(img).astype(np.uint8), actions=np.concatenate(act).astype(np.float32),
             episode_starts=np.concatenate(starts))
    print(f"wrote {OUT} ({ds.total_episodes} episodes, {ds.total_steps} steps)")


if __name__ == "__main__":
    main()
