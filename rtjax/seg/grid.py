"""The network's working grid: the same field of view at an isotropic working spacing.

Resampling aligns voxel edges (the field of view is kept), so going to the working grid
and back is a round trip up to interpolation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["working_shape", "resample_to_shape"]


def working_shape(shape, spacing, work_spacing: float) -> tuple[int, int, int]:
    """Grid shape at the working spacing (mm) covering the same field of view (rounded)."""
    return tuple(max(1, int(round(n * s / work_spacing))) for n, s in zip(shape, spacing))


def resample_to_shape(array: np.ndarray, shape) -> np.ndarray:
    """Resample (X, Y, Z[, C]) to `shape` (3 values) over the same field of view (voxel
    edges aligned, `jax.image.resize` "linear": trilinear, antialiased when shrinking);
    identity when the shape already matches. Returns float32 numpy."""

    shape = tuple(int(n) for n in shape)
    if tuple(array.shape[:3]) == shape:
        return np.asarray(array, np.float32)
    return np.asarray(_resize_jit()(jnp.asarray(array, jnp.float32), shape + tuple(array.shape[3:])))


@functools.cache
def _resize_jit():
    return jax.jit(lambda a, shape: jax.image.resize(a, shape, "linear"), static_argnums=1)
