"""Writes a small Minari dataset with Minari's own DataCollector: two episodes (at most 150 steps
each, reset seeds 0 and 1) of the pybullet Hopper's pretrained expert on HopperBulletEnv-v0,
stored with the HDF5 backend under testdata/demos/minari/hopper-expert-v0/ (MINARI_DATASETS_PATH),
and the same steps as an .npz of arrays (observations without each episode's final one,
actions, episode_starts) for the equivalence test (crates/cli/tests/compile.rs).

    tools/.venv-dev/bin/python tools/make_minari_demos.py
"""
import os
import pathlib
import shutil
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "testdata/demos/minari"
os.environ["MINARI_DATASETS_PATH"] = str(OUT)
sys.path.insert(0, str(ROOT / "tools"))

import gymnasium as gym  # noqa: E402
import minari  # noqa: E402
from minari import DataCollector  # noqa: E402

from sqil_tools import tasks  # noqa: E402


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    task = tasks.get("hopper")
    expert = task.make_expert()
    env = DataCollector(gym.wrappers.TimeLimit(task.make_env(), max_episode_steps=150), data_format="hdf5")
    for seed in (0, 1):
        obs, _ = env.reset(seed=seed)
        done = False
        while not done:
            obs, _, term, trunc, _ = env.step(np.asarray(expert(obs), dtype=np.float32))
            done = term or trunc
    ds = env.create_dataset(dataset_id="hopper/expert-v0", algorithm_name="pybullet pretrained MLP",
                            author="sqil tools/make_minari_demos.py")
    obs, act, starts = [], [], []
    for ep in ds.iterate_episodes():
        obs.append(ep.observations[:-1])
        act.append(ep.actions)
        starts.append(np.arange(len(ep.actions)) == 0)
    np.savez(OUT / "hopper-expert-v0.npz", observations=np.concatenate(obs).astype(np.float32),
             actions=np.concatenate(act).astype(np.float32), episode_starts=np.concatenate(starts))
    print(f"wrote {OUT} ({ds.total_episodes} episodes, {ds.total_steps} steps)")


if __name__ == "__main__":
    main()
