"""Initial conditions."""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
from jaxtyping import Array, Float

from growth.grid import Grid

__all__ = ["GaussianSeed"]


@dataclass(frozen=True)
class GaussianSeed:
    """c0 = amplitude exp(-r^2 / (2 sigma^2)), set to 0 where below `cutoff`.

    The defaults (sigma 3.2 mm, amplitude 0.5, cutoff 0.1) follow TumorGrowthToolkit.
    Hashable, so it is static under `jax.jit`; the origin is a traced argument, so the
    seed is differentiable with respect to it (the cut itself has zero derivative).

    Attributes:
        sigma: standard deviation, mm.
        amplitude: peak density, in (0, 1].
        cutoff: densities below this are set to 0 (0 keeps the whole Gaussian).
    """

    sigma: float = 3.2
    amplitude: float = 0.5
    cutoff: float = 0.1

    def __post_init__(self):
        if self.sigma <= 0:
            raise ValueError(f"seed sigma must be positive (mm), got {self.sigma}")
        if not 0 < self.amplitude <= 1:
            raise ValueError(f"seed amplitude must be in (0, 1], got {self.amplitude}")
        if not 0 <= self.cutoff < self.amplitude:
            raise ValueError(f"seed cutoff must be in [0, amplitude), got {self.cutoff}")

    def __call__(
        self, grid: Grid, origin_mm: Float[Array, "3"], dtype=jnp.float32
    ) -> Float[Array, "n0 n1 n2"]:
        """The seed on `grid`, centred at `origin_mm` (grid mm: voxel (0,0,0) at 0)."""
        origin = jnp.asarray(origin_mm, dtype=dtype)
        r2 = sum((x - origin[k]) ** 2 for k, x in enumerate(grid.coordinates(dtype)))
        c0 = self.amplitude * jnp.exp(-r2 / (2.0 * self.sigma**2))
        return jnp.where(c0 >= self.cutoff, c0, 0.0).astype(dtype)
