"""Tissue diffusivity and the conservative finite-volume diffusion operator.

The operator is the flux form of div(D grad c) on a cell-centred grid:

    (div D grad c)_i = sum_k [F_k(i+1/2) - F_k(i-1/2)] / h_k,
    F_k(i+1/2) = D_k(i+1/2) (c_{i+1} - c_i) / h_k,

with the face diffusivity D_k(i+1/2) the harmonic mean of the two cells. The harmonic
mean is zero whenever one side has no tissue, so no mass enters CSF or leaves the brain,
and the domain boundary carries no flux. Each face flux leaves one cell and enters its
neighbour, so the total mass is conserved exactly up to rounding.
"""

from __future__ import annotations

import abc

import equinox as eqx
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

from growth.grid import Grid

__all__ = [
    "AbstractDiffusion",
    "FaceDiffusion",
    "FaceCoefficients",
    "tissue_diffusivity",
    "harmonic_mean",
    "face_coefficients",
    "diffusion_operator",
]

#: Per-axis face coefficients D(i+1/2) / h_k^2, 1/day. Entry k has the grid's shape
#: with axis k one shorter (interior faces only: boundary faces carry no flux).
FaceCoefficients = tuple[Array, Array, Array]


def tissue_diffusivity(
    wm: Float[Array, "*s"], gm: Float[Array, "*s"], dw, ratio=10.0
) -> Float[Array, "*s"]:
    """D(x) = Dw (p_wm + p_gm / ratio), mm^2/day; zero where there is no tissue.

    Args:
        wm, gm: white- and grey-matter probabilities in [0, 1].
        dw: white-matter diffusivity Dw, mm^2/day.
        ratio: Dw / Dg (default 10).
    """
    return dw * (wm + gm / ratio)


def harmonic_mean(a: Array, b: Array) -> Array:
    """2ab / (a + b), defined as 0 where a + b == 0 (safe under autodiff)."""
    total = a + b
    positive = total > 0
    safe_total = jnp.where(positive, total, 1.0)
    return jnp.where(positive, 2.0 * a * b / safe_total, 0.0)


def face_coefficients(d_cell: Float[Array, "n0 n1 n2"], grid: Grid) -> FaceCoefficients:
    """Face diffusivities divided by h_k^2 along each axis, 1/day."""
    faces = []
    for k, h in enumerate(grid.spacing):
        n = d_cell.shape[k]
        lower = lax.slice_in_dim(d_cell, 0, n - 1, axis=k)
        upper = lax.slice_in_dim(d_cell, 1, n, axis=k)
        faces.append(harmonic_mean(lower, upper) / h**2)
    return tuple(faces)


def _axis_divergence(c: Array, coeff: Array, axis: int) -> Array:
    """Net inflow along one axis: F(i+1/2) - F(i-1/2), zero flux at both ends."""
    if c.shape[axis] < 2:
        return jnp.zeros_like(c)
    n = c.shape[axis]
    upper = lax.slice_in_dim(c, 1, n, axis=axis)
    lower = lax.slice_in_dim(c, 0, n - 1, axis=axis)
    flux = coeff * (upper - lower)
    pad_after = [(0, 0)] * c.ndim
    pad_before = [(0, 0)] * c.ndim
    pad_after[axis] = (0, 1)
    pad_before[axis] = (1, 0)
    return jnp.pad(flux, pad_after) - jnp.pad(flux, pad_before)


def diffusion_operator(c: Float[Array, "n0 n1 n2"], faces: FaceCoefficients) -> Array:
    """div(D grad c) in conservative flux form, 1/day (density per day)."""
    return sum(_axis_divergence(c, coeff, k) for k, coeff in enumerate(faces))


class AbstractDiffusion(eqx.Module):
    """A discretised, conservative, monotone diffusion operator c -> div(D grad c)."""

    @abc.abstractmethod
    def __call__(self, c: Float[Array, "n0 n1 n2"]) -> Float[Array, "n0 n1 n2"]:
        """div(D grad c), density per day."""

    @abc.abstractmethod
    def rate_bound(self) -> Array:
        """B (1/day) such that explicit Euler steps with dt * B <= 1 are monotone
        (the update is a convex combination of neighbours)."""


class FaceDiffusion(AbstractDiffusion):
    """Isotropic (scalar D) diffusion on the 6-neighbour stencil: see `diffusion_operator`."""

    faces: FaceCoefficients

    def __call__(self, c):
        return diffusion_operator(c, self.faces)

    def rate_bound(self):
        # Each voxel loses at most sum_k (D_k(i-1/2) + D_k(i+1/2)) / h_k^2 per day.
        return 2.0 * sum(jnp.max(f, initial=0.0) for f in self.faces if f.size)
