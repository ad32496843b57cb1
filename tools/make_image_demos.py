"""Writes the camera-frame dataset fixtures from the first 64 steps of
testdata/demos/pickplace-pixels.npz (84x84 RGB frames + 7 proprioceptive values + 4 actions), cut
into two episodes of 32 steps:

    testdata/demos/pixels.robomimic.hdf5   robomimic's layout (h5py): data/demo_<i>/obs/agentview_image
                                           [T, 84, 84, 3] uint8 (HWC, as robomimic stores cameras),
                                           obs/robot0_proprio [T, 7], actions, rewards, dones
    testdata/demos/lerobot/pixels/         LeRobot v2.1 (pyarrow): observation.image as the `image`
                                           feature LeRobot writes (struct of PNG `bytes` and `path`,
                                           PNGs from Pillow), observation.state, action, indices
    testdata/demos/lerobot/pixels-video/   the same with observation.image as a `video` feature: one
                                           mp4 per episode at LeRobot's v2.1 video_path, encoded by
                                           ffmpeg losslessly (libx264rgb, qp 0) so decoding gives
                                           the frames back exactly
    testdata/demos/lerobot/pixels-video-v3/ the same in LeRobot's v3.0 layout: both episodes in one
                                           data file and one video file, each episode's offset in
                                           meta/episodes/ (videos/<key>/from_timestamp)

crates/data/tests/load.rs checks that both load to the same steps, actions and frames as the npz.

    tools/.venv-dev/bin/python tools/make_image_demos.py
"""
import io
import json
import pathlib
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from make_lerobot_demos import episode_table, info_v21, write_meta  # noqa: E402

STEPS, EPISODE = 64, 32


def main():
    d = np.load(ROOT / "testdata/demos/pickplace-pixels.npz")
    obs, act, rew = d["observations"][:STEPS], d["actions"][:STEPS], d["rewards"][:STEPS]
    img = d["images"][:STEPS]  # [T, 3, H, W]
    hwc = np.ascontiguousarray(img.transpose(0, 2, 3, 1))
    bounds = list(range(0, STEPS + 1, EPISODE))
    out = ROOT / "testdata/demos/pixels.robomimic.hdf5"
    with h5py.File(out, "w") as f:
        data = f.create_group("data")
        data.attrs["total"] = STEPS
        data.attrs["env_args"] = json.dumps({"env_name": "pick-place-v3 (pixels)", "type": 0, "env_kwargs": {}})
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            g = data.create_group(f"demo_{i}")
            g.attrs["num_samples"] = b - a
            g.create_dataset("obs/agentview_image", data=hwc[a:b], compression="gzip")
            g.create_dataset("obs/robot0_proprio", data=obs[a:b].astype(np.float32), compression="gzip")
            g.create_dataset("actions", data=act[a:b].astype(np.float32))
            g.create_dataset("rewards", data=rew[a:b].astype(np.float32))
            dones = np.zeros(b - a, dtype=np.int64)
            dones[-1] = 1
            g.create_dataset("dones", data=dones)
    print(f"wrote {out}")

    lr = ROOT / "testdata/demos/lerobot/pixels"
    shutil.rmtree(lr, ignore_errors=True)
    (lr / "meta").mkdir(parents=True)
    (lr / "data/chunk-000").mkdir(parents=True)
    img_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    episodes = []
    for e, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        pngs = []
        for t in range(a, b):
            buf = io.BytesIO()
            Image.fromarray(hwc[t]).save(buf, format="PNG")
            pngs.append({"bytes": buf.getvalue(), "path": f"frame_{t:06d}.png"})
        table = episode_table(obs, act, a, b, e, 80, first={"observation.image": pa.array(pngs, type=img_type)})
        pq.write_table(table, lr / f"data/chunk-000/episode_{e:06d}.parquet")
        episodes.append({"episode_index": e, "tasks": ["pick and place"], "length": b - a})
    h, w = hwc.shape[1:3]
    image = {"dtype": "image", "shape": [int(h), int(w), 3], "names": ["height", "width", "channel"]}
    info = info_v21("sawyer (Meta-World)", episodes, STEPS, 80, obs.shape[1], act.shape[1], {"observation.image": image})
    write_meta(lr, info, episodes, "pick and place")
    print(f"wrote {lr}")

    lv = ROOT / "testdata/demos/lerobot/pixels-video"
    shutil.rmtree(lv, ignore_errors=True)
    shutil.copytree(lr / "meta", lv / "meta")
    (lv / "data/chunk-000").mkdir(parents=True)
    for e in range(len(episodes)):
        t = pq.read_table(lr / f"data/chunk-000/episode_{e:06d}.parquet").drop_columns(["observation.image"])
        pq.write_table(t, lv / f"data/chunk-000/episode_{e:06d}.parquet")
        mp4 = lv / f"videos/chunk-000/observation.image/episode_{e:06d}.mp4"
        mp4.parent.mkdir(parents=True, exist_ok=True)
        a, b = bounds[e], bounds[e + 1]
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", "80",
                        "-i", "-", "-c:v", "libx264rgb", "-qp", "0", "-preset", "veryslow", str(mp4)],
                       input=hwc[a:b].tobytes(), check=True)
    info["features"]["observation.image"] = {"dtype": "video", "shape": [int(h), int(w), 3],
                                             "names": ["height", "width", "channel"],
                                             "info": {"video.fps": 80, "video.codec": "h264 (libx264rgb, lossless)",
                                                      "video.pix_fmt": "rgb24"}}
    info["video_path"] = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
    info["total_videos"] = len(episodes)
    (lv / "meta/info.json").write_text(json.dumps(info, indent=2))
    print(f"wrote {lv}")

    l3 = ROOT / "testdata/demos/lerobot/pixels-video-v3"
    shutil.rmtree(l3, ignore_errors=True)
    (l3 / "data/chunk-000").mkdir(parents=True)
    (l3 / "meta/episodes/chunk-000").mkdir(parents=True)
    tables = [pq.read_table(lv / f"data/chunk-000/episode_{e:06d}.parquet") for e in range(len(episodes))]
    pq.write_table(pa.concat_tables(tables), l3 / "data/chunk-000/file-000.parquet")
    mp4 = l3 / "videos/observation.image/chunk-000/file-000.mp4"
    mp4.parent.mkdir(parents=True)
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", "80",
                    "-i", "-", "-c:v", "libx264rgb", "-qp", "0", "-preset", "veryslow", str(mp4)],
                   input=hwc[:STEPS].tobytes(), check=True)
    key = "videos/observation.image"
    pq.write_table(pa.table({
        "episode_index": pa.array(range(len(episodes)), type=pa.int64()),
        "length": pa.array([e["length"] for e in episodes], type=pa.int64()),
        "data/chunk_index": pa.array([0] * len(episodes), type=pa.int64()),
        "data/file_index": pa.array([0] * len(episodes), type=pa.int64()),
        f"{key}/chunk_index": pa.array([0] * len(episodes), type=pa.int64()),
        f"{key}/file_index": pa.array([0] * len(episodes), type=pa.int64()),
        f"{key}/from_timestamp": pa.array([bounds[e] / 80 for e in range(len(episodes))], type=pa.float64()),
        f"{key}/to_timestamp": pa.array([bounds[e + 1] / 80 for e in range(len(episodes))], type=pa.float64()),
    }), l3 / "meta/episodes/chunk-000/file-000.parquet")
    pq.write_table(pa.table({"task_index": pa.array([0], type=pa.int64()), "task": ["pick and place"]}),
                   l3 / "meta/tasks.parquet")
    info3 = dict(info, codebase_version="v3.0", files_size_in_mb=100, data_files_size_in_mb=100,
                 data_path="data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
                 video_path="videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4")
    info3.pop("total_videos", None)
    (l3 / "meta/info.json").write_text(json.dumps(info3, indent=2))
    print(f"wrote {l3}")


if __name__ == "__main__":
    main()
