"""The inverse network: a small 3-D ResNet in `flax.nnx`, masks + tissue -> FK parameters.

Input (batch, n, n, n, 4), channels-last: core, edema (binary), wm, gm (probabilities) on
the network grid of `growth.inverse` (`crop_around`, `masks_to_inputs`); output the
normalised targets `growth.inverse.TARGET_NAMES` (origin relative to the visible centre of
mass, sqrt(Dw T), sqrt(rho T), u_T1, u_FL). An ensemble is several members stacked by
`rtjax.ml.create_ensemble`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from flax import nnx
from jaxtyping import Array, Float

from growth.inverse import TARGET_NAMES
from rtjax.ml import create_ensemble as _stack

__all__ = ["NetConfig", "InverseNet", "create_ensemble"]


@dataclass(frozen=True)
class NetConfig:
    """Architecture of `InverseNet`.

    The input (net_shape^3 x 4) is cut into patch^3 blocks (space-to-depth) and embedded
    linearly to widths[0] channels; each stage has `blocks` residual blocks (two 3x3x3
    convolutions with group norm); between stages a stride-2 convolution halves the grid.
    The last feature map is flattened (position-aware) into a `head`-wide hidden layer.
    `net_shape` always equals the generator's (`rtjax.inverse.config` sets it).
    """

    net_shape: int = 32
    patch: int = 4
    widths: tuple[int, ...] = (32, 64)
    blocks: int = 1
    head: int = 64
    groups: int = 8
    in_channels: int = 4
    outputs: int = len(TARGET_NAMES)

    def __post_init__(self):
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        if self.net_shape % (self.patch * 2 ** (len(self.widths) - 1)):
            raise ValueError("net_shape must be divisible by patch * 2^(stages - 1)")

    @property
    def final_shape(self) -> int:
        return self.net_shape // (self.patch * 2 ** (len(self.widths) - 1))


def _space_to_depth(x: Array, p: int) -> Array:
    b, n0, n1, n2, c = x.shape
    x = x.reshape(b, n0 // p, p, n1 // p, p, n2 // p, p, c)
    x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(b, n0 // p, n1 // p, n2 // p, p**3 * c)


class _ResBlock(nnx.Module):
    def __init__(self, width: int, groups: int, *, rngs: nnx.Rngs):
        g = math.gcd(groups, width)
        self.conv1 = nnx.Conv(width, width, (3, 3, 3), rngs=rngs)
        self.norm1 = nnx.GroupNorm(width, num_groups=g, rngs=rngs)
        self.conv2 = nnx.Conv(width, width, (3, 3, 3), rngs=rngs)
        self.norm2 = nnx.GroupNorm(width, num_groups=g, rngs=rngs)

    def __call__(self, x):
        h = nnx.gelu(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        return nnx.gelu(x + h)


class InverseNet(nnx.Module):
    """A small 3-D ResNet: (batch, n, n, n, 4) -> (batch, outputs) normalised targets."""

    def __init__(self, cfg: NetConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Linear(cfg.patch**3 * cfg.in_channels, cfg.widths[0], rngs=rngs)
        self.stages = nnx.List([
            nnx.List([_ResBlock(w, cfg.groups, rngs=rngs) for _ in range(cfg.blocks)])
            for w in cfg.widths
        ])
        self.downs = nnx.List([
            nnx.Conv(a, b, (3, 3, 3), strides=2, rngs=rngs)
            for a, b in zip(cfg.widths[:-1], cfg.widths[1:])
        ])
        flat = cfg.final_shape**3 * cfg.widths[-1]
        self.hidden = nnx.Linear(flat, cfg.head, rngs=rngs)
        self.out = nnx.Linear(cfg.head, cfg.outputs, rngs=rngs)

    def __call__(self, x: Float[Array, "b n n n c"]) -> Float[Array, "b o"]:
        x = nnx.gelu(self.embed(_space_to_depth(x, self.cfg.patch)))
        for k, stage in enumerate(self.stages):
            for block in stage:
                x = block(x)
            if k < len(self.downs):
                x = nnx.gelu(self.downs[k](x))
        x = nnx.gelu(self.hidden(x.reshape(x.shape[0], -1)))
        return self.out(x)


def create_ensemble(cfg: NetConfig, members: int, seed: int = 0) -> InverseNet:
    """`members` independently initialised networks stacked on a leading axis."""
    return _stack(lambda rngs: InverseNet(cfg, rngs=rngs), members, seed)
