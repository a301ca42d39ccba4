"""The computational grid: shape and voxel spacing, and the explicit stability limit."""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

__all__ = ["Grid", "stability_limit", "stable_time_step"]


@dataclass(frozen=True)
class Grid:
    """A regular 3-D grid of cell-centred voxels.

    Attributes:
        shape: number of voxels along each axis.
        spacing: voxel size along each axis, mm.

    Hashable, so it can be a static argument of `jax.jit`.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __post_init__(self):
        shape = tuple(int(n) for n in self.shape)
        spacing = tuple(float(h) for h in self.spacing)
        if len(shape) != 3 or len(spacing) != 3:
            raise ValueError(f"Grid needs 3 axes, got shape {shape} and spacing {spacing}")
        if min(shape) < 1:
            raise ValueError(f"Grid shape must be positive, got {shape}")
        if min(spacing) <= 0 or not all(np.isfinite(spacing)):
            raise ValueError(f"Grid spacing must be positive and finite (mm), got {spacing}")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "spacing", spacing)

    @property
    def size(self) -> int:
        """Number of voxels."""
        return int(np.prod(self.shape))

    @property
    def voxel_volume(self) -> float:
        """Volume of one voxel, mm^3."""
        return float(np.prod(self.spacing))

    @property
    def active_axes(self) -> tuple[int, ...]:
        """Axes with more than one voxel (the ones diffusion acts along)."""
        return tuple(k for k, n in enumerate(self.shape) if n > 1)

    def coordinates(self, dtype=jnp.float32) -> tuple[Float[Array, "n0 1 1"], ...]:
        """Voxel-centre coordinates in mm, voxel (0, 0, 0) at the origin, broadcastable."""
        axes = []
        for k, (n, h) in enumerate(zip(self.shape, self.spacing)):
            shape = [1, 1, 1]
            shape[k] = n
            axes.append((jnp.arange(n, dtype=dtype) * h).reshape(shape))
        return tuple(axes)


def stability_limit(grid: Grid, d_max: float) -> float:
    """Largest stable explicit-Euler step for diffusion, days.

    dt <= 1 / (2 d_max sum_k 1/h_k^2) over the active axes: h^2 / (2 d D) on an isotropic
    grid of dimension d. At or below it the update is a convex combination of neighbours,
    so c stays in [0, 1].
    """
    if d_max <= 0:
        return float("inf")
    inv_h2 = sum(1.0 / grid.spacing[k] ** 2 for k in grid.active_axes)
    if inv_h2 == 0:
        return float("inf")
    return 1.0 / (2.0 * d_max * inv_h2)


def stable_time_step(grid: Grid, d_max: float, safety: float = 0.9) -> float:
    """A fixed step `safety` times the stability limit, days (0 < safety <= 1)."""
    if not 0 < safety <= 1:
        raise ValueError(f"safety factor must be in (0, 1], got {safety}")
    limit = stability_limit(grid, d_max)
    return safety * limit if np.isfinite(limit) else 1.0
