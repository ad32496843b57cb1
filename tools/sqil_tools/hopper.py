"""The pretrained HopperBulletEnv-v0 policy shipped inside the `pybullet` wheel (see pybullet_mlp)."""

from .pybullet_mlp import PretrainedMLP, source, weights


def expert_source():
    return source("HopperBulletEnv-v0")


def hopper_weights():
    """Weight arrays of the example's SmallReactivePolicy (15-128-64-3, ReLU), read with `ast`
    so the example (which needs gym and a GUI) is never run. Returns (weights, source path)."""
    return weights("HopperBulletEnv-v0")


class HopperExpert(PretrainedMLP):
    """numpy forward pass, exactly the example's `act`."""

    def __init__(self):
        super().__init__("HopperBulletEnv-v0")
