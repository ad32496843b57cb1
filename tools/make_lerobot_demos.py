"""Writes testdata/demos/lerobot/hopper: the steps of testdata/demos/minari/hopper-expert-v0.npz
(two episodes of the pybullet Hopper expert) as a LeRobot dataset in the published v2.1 layout,
with pyarrow:

    meta/info.json                                   codebase_version, fps, features, data_path, ...
    meta/episodes.jsonl, meta/tasks.jsonl
    data/chunk-000/episode_000000.parquet            one row per frame: observation.state
                                                     (list<float32>), action (list<float32>),
                                                     timestamp, frame_index, episode_index,
                                                     index, task_index

    tools/.venv-dev/bin/python tools/make_lerobot_demos.py
"""
import json
import pathlib
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = pathlib.Path(__file__).resolve().parent.parent
FPS = 60


def episode_table(obs, act, a, b, e, fps, first=None):
    """One episode's frames (rows a..b) in LeRobot's v2.1 columns, `first` (name -> pyarrow array,
    e.g. a camera) before them."""
    n = b - a
    return pa.table({
        **(first or {}),
        "observation.state": pa.array([list(map(float, r)) for r in obs[a:b]], type=pa.list_(pa.float32())),
        "action": pa.array([list(map(float, r)) for r in act[a:b]], type=pa.list_(pa.float32())),
        "timestamp": pa.array(np.arange(n, dtype=np.float32) / fps),
        "frame_index": pa.array(np.arange(n, dtype=np.int64)),
        "episode_index": pa.array(np.full(n, e, dtype=np.int64)),
        "index": pa.array(np.arange(a, b, dtype=np.int64)),
        "task_index": pa.array(np.zeros(n, dtype=np.int64)),
    })


def info_v21(robot_type, episodes, frames, fps, obs_dim, act_dim, first=None):
    """meta/info.json of a v2.1 dataset with `episode_table`'s columns (`first`: name -> feature)."""
    return {
        "codebase_version": "v2.1",
        "robot_type": robot_type,
        "total_episodes": len(episodes),
        "total_frames": int(frames),
        "total_tasks": 1,
        "chunks_size": 1000,
        "fps": fps,
        "splits": {"train": f"0:{len(episodes)}"},
        "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
        "features": {
            **(first or {}),
            "observation.state": {"dtype": "float32", "shape": [int(obs_dim)], "names": None},
            "action": {"dtype": "float32", "shape": [int(act_dim)], "names": None},
            "timestamp": {"dtype": "float32", "shape": [1], "names": None},
            "frame_index": {"dtype": "int64", "shape": [1], "names": None},
            "episode_index": {"dtype": "int64", "shape": [1], "names": None},
            "index": {"dtype": "int64", "shape": [1], "names": None},
            "task_index": {"dtype": "int64", "shape": [1], "names": None},
        },
    }


def write_meta(out, info, episodes, task):
    """meta/info.json, meta/episodes.jsonl and meta/tasks.jsonl (one task)."""
    (out / "meta/info.json").write_text(json.dumps(info, indent=2))
    (out / "meta/episodes.jsonl").write_text("".join(json.dumps(e) + "\n" for e in episodes))
    (out / "meta/tasks.jsonl").write_text(json.dumps({"task_index": 0, "task": task}) + "\n")


def main():
    src = np.load(ROOT / "testdata/demos/minari/hopper-expert-v0.npz")
    obs, act, starts = src["observations"], src["actions"], src["episode_starts"]
    bounds = np.flatnonzero(starts).tolist() + [len(obs)]
    out = ROOT / "testdata/demos/lerobot/hopper"
    shutil.rmtree(out, ignore_errors=True)
    (out / "meta").mkdir(parents=True)
    (out / "data/chunk-000").mkdir(parents=True)
    episodes = []
    for e, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        pq.write_table(episode_table(obs, act, a, b, e, FPS), out / f"data/chunk-000/episode_{e:06d}.parquet")
        episodes.append({"episode_index": e, "tasks": ["hop forward"], "length": b - a})
    info = info_v21("hopper (pybullet)", episodes, len(obs), FPS, obs.shape[1], act.shape[1])
    write_meta(out, info, episodes, "hop forward")
    print(f"wrote {out} ({len(episodes)} episodes, {len(obs)} frames)")


if __name__ == "__main__":
    main()
