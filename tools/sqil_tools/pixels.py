"""pickplace-pixels: Meta-World pick-place-v3 seen through a camera.

Observation (a dict): `image`, uint8 [3, 84, 84] RGB from the `corner` camera (MuJoCo, rendered
offscreen: MUJOCO_GL=egl on a GPU machine, osmesa elsewhere; multisampling, shadows,
reflections and skybox off so that software rendering runs at about 60 frames/s), and
`proprio`, float32 [7]: hand position (3), gripper opening (1) and the goal position (3), i.e.
entries 0-3 and 36-38 of the 39-d state. The object's position is only in the image: the policy
must see where to grasp. The scripted expert acts on the full state, kept as `env.state`.
"""

import gymnasium as gym
import numpy as np

SIZE = 84
CAMERA = "corner"
PROPRIO = [0, 1, 2, 3, 36, 37, 38]


class PixelObs(gym.Wrapper):
    def __init__(self, env):
        super().__init__(env)
        import mujoco  # its GL platform was chosen on import (sqil_tools sets MUJOCO_GL)

        self._mj = mujoco
        m = env.unwrapped.model
        m.vis.quality.offsamples = 0
        m.vis.quality.shadowsize = 0
        self._renderer = mujoco.Renderer(m, SIZE, SIZE)
        self.state = None
        self.observation_space = gym.spaces.Dict({
            "image": gym.spaces.Box(0, 255, (3, SIZE, SIZE), np.uint8),
            "proprio": gym.spaces.Box(-np.inf, np.inf, (len(PROPRIO),), np.float32),
        })

    def _obs(self, state):
        self.state = np.asarray(state, dtype=np.float32)
        r = self._renderer
        r.update_scene(self.env.unwrapped.data, camera=CAMERA)
        for f in (self._mj.mjtRndFlag.mjRND_SHADOW, self._mj.mjtRndFlag.mjRND_REFLECTION, self._mj.mjtRndFlag.mjRND_SKYBOX):
            r.scene.flags[f] = 0
        img = r.render()
        return {"image": np.ascontiguousarray(img.transpose(2, 0, 1)), "proprio": self.state[PROPRIO]}

    def reset(self, **kw):
        obs, info = self.env.reset(**kw)
        return self._obs(obs), info

    def step(self, action):
        obs, r, term, trunc, info = self.env.step(action)
        return self._obs(obs), r, term, trunc, info

    def close(self):
        self._renderer.close()
        super().close()
