"""Writes testdata/demos/hopper.robomimic.hdf5: the bundled hopper demonstrations
(testdata/demos/hopper.npz) in robomimic's documented dataset layout, with h5py:

    data/                      attrs: total (steps), env_args (JSON)
    data/demo_<i>/             attrs: num_samples
    data/demo_<i>/obs/<key>    [T_i, ...] per observation key
    data/demo_<i>/actions      [T_i, A]
    data/demo_<i>/rewards      [T_i]
    data/demo_<i>/dones        [T_i] (1 at the last step)
    mask/train, mask/valid     demo names (filter keys)

The 15 observation values are split into keys `qpos` (the first 5) and `qvel` (the other 10),
so `sqil compile --obs-keys qpos,qvel` sees the same states as the .npz.

    tools/.venv-dev/bin/python tools/make_robomimic_demos.py
"""
import json
import pathlib

import h5py
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent


def main():
    d = np.load(ROOT / "testdata/demos/hopper.npz")
    obs, act, rew = d["observations"], d["actions"], d["rewards"]
    starts = np.flatnonzero(d["episode_starts"]).tolist() + [len(obs)]
    meta = json.loads(bytes(d["metadata"]).decode())
    out = ROOT / "testdata/demos/hopper.robomimic.hdf5"
    with h5py.File(out, "w") as f:
        data = f.create_group("data")
        data.attrs["total"] = len(obs)
        data.attrs["env_args"] = json.dumps({"env_name": meta.get("env_id", "hopper"), "type": 0, "env_kwargs": {}})
        names = []
        for i, (a, b) in enumerate(zip(starts[:-1], starts[1:])):
            g = data.create_group(f"demo_{i}")
            g.attrs["num_samples"] = b - a
            g.create_dataset("obs/qpos", data=obs[a:b, :5].astype(np.float64), compression="gzip")
            g.create_dataset("obs/qvel", data=obs[a:b, 5:].astype(np.float64), compression="gzip")
            g.create_dataset("actions", data=act[a:b].astype(np.float64), compression="gzip")
            g.create_dataset("rewards", data=rew[a:b].astype(np.float64))
            dones = np.zeros(b - a, dtype=np.int64)
            dones[-1] = 1
            g.create_dataset("dones", data=dones)
            names.append(f"demo_{i}")
        f.create_dataset("mask/train", data=np.array(names[:-1], dtype="S"))
        f.create_dataset("mask/valid", data=np.array(names[-1:], dtype="S"))
    print(f"wrote {out} ({out.stat().st_size} bytes, {len(names)} demos)")


if __name__ == "__main__":
    main()
