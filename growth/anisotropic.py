"""Anisotropic diffusion with a full tensor: a monotone, conservative stencil.

The operator div(D grad c) for a symmetric positive (semi-)definite tensor field D(x) is
discretised with Selling's decomposition (Fehrenbach & Mirebeau, "Sparse non-negative
stencils for anisotropic diffusion", J. Math. Imaging Vis. 2014). In voxel units,
D'(x) = H^-1 D(x) H^-1 with H = diag(spacing), and every 3x3 positive definite D' is

    D' = sum_{e in E(x)} lambda_e(x) e e^T,   lambda_e >= 0,  e integer offsets,

with six offsets per voxel found by Selling's reduction of an obtuse superbase. Then
div(D grad c) = sum_e d_e(lambda_e d_e c), each term a 1-D diffusion along the offset e,
discretised in flux form between the voxel pairs (x, x + e):

    (div D grad c)(x) = sum_e w_e(x, x+e) (c(x+e) - c(x)) + w_e(x-e, x) (c(x-e) - c(x)),

with w_e(x, x+e) the harmonic mean of lambda_e at both ends. All weights are non-negative,
so an explicit Euler step with dt * max_x(sum of its weights) <= 1 is a convex
combination of neighbours: c stays in [0, 1] at any anisotropy (FA 0.9 included), the
mixed derivatives are included exactly (the decomposition reproduces the full tensor,
not only its diagonal), and each pair flux leaves one voxel and enters the other, so
mass is conserved. A pair is cut (no flux) where the straight line between the two
voxels passes through a voxel without tissue, so long offsets cannot jump over thin CSF
or falx. For an isotropic tensor the decomposition is the 6-neighbour stencil and the
operator equals `growth.diffusion.diffusion_operator` exactly.

The tumour tensor is D(x) = Dw [p_wm(x) A(x) + p_gm(x) / ratio I], with A the trace-3
white-matter shape tensor from DTI (`growth.tensor.tumour_tensor`). Both parts are
decomposed separately once (their sum is still a non-negative decomposition), so Dw,
ratio and rho stay traced, differentiable and vmappable without rebuilding the stencil.
"""

from __future__ import annotations

import dataclasses
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from growth.diffusion import AbstractDiffusion, harmonic_mean
from growth.grid import Grid
from growth.seed import GaussianSeed
from growth.solver import AbstractFKSimulator, FKParams

__all__ = [
    "selling_decomposition",
    "limit_condition",
    "TensorStencil",
    "tensor_stencil",
    "StencilDiffusion",
    "line_of_sight",
    "AnisotropicFKSimulator",
]

Offset = tuple[int, int, int]
_PAIRS = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))
_AXES: tuple[Offset, ...] = ((1, 0, 0), (0, 1, 0), (0, 0, 1))


def _complement(i: int, j: int) -> tuple[int, int]:
    k, l = (m for m in range(4) if m not in (i, j))
    return k, l


def selling_decomposition(
    matrices: np.ndarray, max_iterations: int = 200
) -> tuple[np.ndarray, np.ndarray]:
    """Selling's decomposition of symmetric positive definite 3x3 matrices.

    Args:
        matrices: (N, 3, 3) symmetric positive definite (NumPy, float64 advised).

    Returns:
        offsets (N, 6, 3) int64 and weights (N, 6) >= 0 with
        sum_i weights[n, i] outer(offsets[n, i], offsets[n, i]) == matrices[n].
    """
    m = np.asarray(matrices, np.float64)
    n = m.shape[0]
    superbase = np.tile(np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [-1, -1, -1]]), (n, 1, 1))
    tol = 1e-12 * np.maximum(np.trace(m, axis1=1, axis2=2), 1e-300)
    for _ in range(max_iterations):
        products = _pair_products(m, superbase)
        worst = np.argmax(products, axis=1)
        active = products[np.arange(n), worst] > tol
        if not active.any():
            break
        for q, (i, j) in enumerate(_PAIRS):
            sel = active & (worst == q)
            if not sel.any():
                continue
            k, l = _complement(i, j)
            vi = superbase[sel, i].copy()
            superbase[sel, k] += vi
            superbase[sel, l] += vi
            superbase[sel, i] = -vi
    else:
        raise RuntimeError("Selling's reduction did not converge: is every tensor positive definite?")
    products = _pair_products(m, superbase)
    weights = np.maximum(-products, 0.0)
    offsets = np.stack(
        [np.cross(superbase[:, k], superbase[:, l]) for k, l in (_complement(i, j) for i, j in _PAIRS)],
        axis=1,
    )
    return offsets, weights


def _pair_products(m: np.ndarray, superbase: np.ndarray) -> np.ndarray:
    """<v_i, M v_j> for the six pairs (N, 6)."""
    mv = np.einsum("nab,nkb->nka", m, superbase)
    return np.stack([np.einsum("na,na->n", superbase[:, i], mv[:, j]) for i, j in _PAIRS], 1)


class TensorStencil(eqx.Module):
    """Per-voxel non-negative weights on a fixed set of integer offsets.

    Attributes:
        offsets: the offsets e (static), one of each pair {e, -e}.
        weights: (len(offsets), n0, n1, n2) lambda_e(x), 1/day (or per unit of a factor).
    """

    weights: Array
    offsets: tuple[Offset, ...] = eqx.field(static=True)


def limit_condition(matrices: np.ndarray, max_condition: float) -> tuple[np.ndarray, int]:
    """Raise eigenvalues below lambda_max / max_condition to that floor, keeping the trace
    and the eigenvectors; returns the matrices and how many were changed.

    Selling's offsets grow like sqrt(condition number), so a bound keeps the stencil
    compact; it also makes semi-definite tensors (FA 1) definite.
    """
    values, vectors = np.linalg.eigh(matrices)
    trace = values.sum(-1, keepdims=True)
    floor = values[..., -1:] / max_condition
    changed = (values < floor).any(-1)
    clamped = np.maximum(values, floor)
    clamped *= trace / np.maximum(clamped.sum(-1, keepdims=True), 1e-300)
    out = np.einsum("nij,nj,nkj->nik", vectors, clamped, vectors)
    return np.where(changed[:, None, None], out, matrices), int(changed.sum())


def tensor_stencil(
    tensors: Float[np.ndarray, "6 n0 n1 n2"],
    spacing,
    extra_offsets=_AXES,
    max_condition: float = 25.0,
) -> TensorStencil:
    """Decompose a tensor field (components xx, xy, xz, yy, yz, zz; mm^2/day) into
    non-negative weights on integer offsets; zero tensors get zero weights.

    `extra_offsets` are always included (default: the three axes), so stencils built on
    the same grid can be added row by row. Tensors whose eigenvalue ratio exceeds
    `max_condition` are first limited to it (`limit_condition`, trace kept).
    """
    t = np.asarray(tensors, np.float64)
    shape = t.shape[1:]
    xx, xy, xz, yy, yz, zz = t
    matrices = np.stack(
        [np.stack([xx, xy, xz], -1), np.stack([xy, yy, yz], -1), np.stack([xz, yz, zz], -1)], -2
    ).reshape(-1, 3, 3)
    present = np.trace(matrices, axis1=1, axis2=2) > 0
    limited, _ = limit_condition(matrices[present], max_condition)
    inv_h = 1.0 / np.asarray(spacing, np.float64)
    limited = limited * inv_h[None, :, None] * inv_h[None, None, :]
    offsets, weights = selling_decomposition(limited)
    flat = offsets.reshape(-1, 3)
    first = np.argmax(flat != 0, axis=1)
    sign = np.sign(flat[np.arange(len(flat)), first])
    canonical = flat * np.where(sign == 0, 1, sign)[:, None]
    used = weights.reshape(-1) > 0
    span = int(np.abs(canonical).max()) if len(canonical) else 1
    base = 2 * span + 1
    keys = ((canonical + span) * np.array([base * base, base, 1])).sum(1)
    unique_keys, inverse = np.unique(keys[used], return_inverse=True)
    unique = np.stack(
        [unique_keys // (base * base), (unique_keys // base) % base, unique_keys % base], 1
    ) - span
    order = [tuple(int(v) for v in e) for e in extra_offsets]
    order += [t for t in map(tuple, unique.tolist()) if t not in set(order)]
    position = {e: i for i, e in enumerate(order)}
    rows = np.array([position[tuple(e)] for e in unique.tolist()], np.int64)
    codes = np.zeros(len(flat), np.int64)
    codes[used] = rows[inverse.reshape(-1)]
    voxel = np.repeat(np.arange(offsets.shape[0]), 6)
    dense = np.zeros((len(order), offsets.shape[0]), np.float64)
    np.add.at(dense, (codes, voxel), weights.reshape(-1))
    index = position
    full = np.zeros((len(index), int(np.prod(shape))), np.float64)
    full[:, present] = dense
    return TensorStencil(
        weights=jnp.asarray(full.reshape(len(index), *shape), jnp.float32),
        offsets=tuple(index),
    )


def _pair_slices(shape, offset: Offset):
    """Slices of x (lower) and x + e (upper) over all pairs inside the grid."""
    lower, upper = [], []
    for n, e in zip(shape, offset):
        start, stop = max(0, -e), n - max(0, e)
        lower.append(slice(start, stop))
        upper.append(slice(start + e, stop + e))
    return tuple(lower), tuple(upper)


def _scatter(values: Array, region: tuple[slice, ...], shape) -> Array:
    """Place `values` (region-shaped) into a zero array of `shape`."""
    pads = [(s.start, n - s.stop) for s, n in zip(region, shape)]
    return jnp.pad(values, pads)


def line_of_sight(tissue: np.ndarray, offsets) -> tuple[np.ndarray, ...]:
    """For each offset, a boolean pair mask: True where every voxel on the straight line
    from x to x + e (sampled at each voxel step) has tissue. Region-shaped per offset."""
    inside = np.asarray(tissue) > 0
    masks = []
    for e in offsets:
        lower, _ = _pair_slices(inside.shape, e)
        steps = max(abs(v) for v in e)
        ok = np.ones([s.stop - s.start for s in lower], bool)
        for s in range(steps + 1):
            shift = [int(round(v * s / steps)) for v in e]
            ok &= inside[tuple(slice(sl.start + d, sl.stop + d) for sl, d in zip(lower, shift))]
        masks.append(ok)
    return tuple(masks)


class StencilDiffusion(AbstractDiffusion):
    """div(D grad c) on a multi-offset stencil with precomputed pair weights (1/day).

    The weight of the pair (x, x + e) is stored twice, at x (`forward`) and at x + e
    (`backward`), both zero where the partner lies outside the grid, so one step is a
    single elementwise pass over shifted views of the zero-padded density:

        out(x) = sum_e forward_e(x) (c(x+e) - c(x)) + backward_e(x) (c(x-e) - c(x)).

    Attributes:
        forward, backward: (n_offsets, n0, n1, n2) pair weights, 1/day.
        offsets: the offsets (static).
    """

    forward: Array
    backward: Array
    offsets: tuple[Offset, ...] = eqx.field(static=True)

    @classmethod
    def from_voxel_weights(cls, weights: Array, offsets, sight=None) -> "StencilDiffusion":
        """Pair weights as harmonic means of the voxel weights lambda_e at both ends,
        cut where `sight` (from `line_of_sight`) is False."""
        shape = tuple(weights.shape[1:])
        forward, backward = [], []
        for row, e in enumerate(offsets):
            lower, upper = _pair_slices(shape, e)
            w = harmonic_mean(weights[row][lower], weights[row][upper])
            if sight is not None:
                w = jnp.where(sight[row], w, 0.0)
            forward.append(_scatter(w, lower, shape))
            backward.append(_scatter(w, upper, shape))
        return cls(forward=jnp.stack(forward), backward=jnp.stack(backward), offsets=tuple(offsets))

    def __call__(self, c):
        halo = max(max(abs(v) for v in e) for e in self.offsets)
        padded = jnp.pad(c, halo)

        def shifted(e):
            return padded[tuple(slice(halo + d, halo + d + n) for d, n in zip(e, c.shape))]

        out = jnp.zeros_like(c)
        for row, e in enumerate(self.offsets):
            minus = tuple(-d for d in e)
            out = out + self.forward[row] * (shifted(e) - c)
            out = out + self.backward[row] * (shifted(minus) - c)
        return out

    def outflow_rate(self) -> Array:
        """Per voxel, the sum of the weights of its pairs (1/day)."""
        return jnp.sum(self.forward, axis=0) + jnp.sum(self.backward, axis=0)

    def rate_bound(self):
        return jnp.max(self.outflow_rate())


class AnisotropicFKSimulator(AbstractFKSimulator):
    """FK forward model with D(x) = Dw [p_wm A(x) + p_gm / ratio I]: (params, origin, time)
    -> density, like `growth.FKSimulator` (same call, vmap and gradients; Dw, rho, ratio,
    origin and time are traced; the white-matter shape tensor A is fixed at creation).

    Attributes:
        wm_weights: (n_offsets, ...) Selling weights of p_wm A, 1/day per unit Dw.
        gm_weights: (3, ...) p_gm / h_k^2 on the axis offsets (the first three rows).
        sight: per offset, the line-of-sight pair mask (tissue along the pair's segment).
        tissue: p_wm + p_gm, for masking the seed.
    """

    wm_weights: Array
    gm_weights: Array
    sight: tuple[Array, ...]
    tissue: Array
    grid: Grid = eqx.field(static=True)
    offsets: tuple[Offset, ...] = eqx.field(static=True)
    dt: float = eqx.field(static=True)
    max_steps: int = eqx.field(static=True)
    seed: GaussianSeed = eqx.field(static=True, default=GaussianSeed())
    progress: bool = eqx.field(static=True, default=False)
    substeps: int | None = eqx.field(static=True, default=None)

    @classmethod
    def create(
        cls,
        wm,
        gm,
        shape_tensor: Float[np.ndarray, "6 n0 n1 n2"],
        grid: Grid,
        *,
        dw_max: float,
        t_max: float,
        dt: float | None = None,
        safety: float = 0.9,
        seed: GaussianSeed = GaussianSeed(),
        dtype=jnp.float32,
        progress: bool = False,
    ) -> "AnisotropicFKSimulator":
        """Build the stencil and choose the step for Dw up to `dw_max` (mm^2/day, ratio
        >= 1) and times up to `t_max` (days). The step is `safety` times the exact
        monotonicity limit 1 / max_x(outflow rate); an explicit `dt` above it is refused.

        Args:
            wm, gm: tissue probabilities (grid.shape).
            shape_tensor: (6, *grid.shape) white-matter shape tensor A (xx, xy, xz, yy,
                yz, zz), dimensionless (trace 3 for a trace-preserving construction).
        """
        wm = np.asarray(wm, np.float64)
        gm = np.asarray(gm, np.float64)
        tensors = np.asarray(shape_tensor, np.float64)
        if wm.shape != grid.shape or gm.shape != grid.shape or tensors.shape != (6, *grid.shape):
            raise ValueError(
                f"shapes differ: grid {grid.shape}, wm {wm.shape}, gm {gm.shape}, "
                f"tensor {tensors.shape} (expected (6, *grid))"
            )
        stencil = tensor_stencil(tensors * wm[None], grid.spacing)
        inv_h2 = np.asarray([1.0 / h**2 for h in grid.spacing])
        gm_weights = gm[None] * inv_h2[:, None, None, None]
        tissue = wm + gm
        sight = line_of_sight(tissue, stencil.offsets)
        sim = cls(
            wm_weights=stencil.weights.astype(dtype),
            gm_weights=jnp.asarray(gm_weights, dtype),
            sight=tuple(jnp.asarray(m) for m in sight),
            tissue=jnp.asarray(tissue, dtype),
            grid=grid,
            offsets=stencil.offsets,
            dt=1.0,
            max_steps=1,
            seed=seed,
            progress=progress,
        )
        # The fastest admissible case: Dw = dw_max and ratio = 1 (weights grow with both).
        bound = float(_rate_bound(sim, FKParams(dw_max, 0.0, 1.0)))
        limit = 1.0 / bound if bound > 0 else 1.0
        if dt is None:
            dt = safety * limit
        elif dt > limit:
            raise ValueError(
                f"time step dt={dt:.4g} days is above the stability limit {limit:.4g} days of "
                f"this anisotropic stencil at Dw={dw_max} mm^2/day; use dt <= {limit:.4g}"
            )
        max_steps = math.ceil(float(t_max) / float(dt)) + 1
        return dataclasses.replace(sim, dt=float(dt), max_steps=max_steps)

    @property
    def dtype(self):
        return self.tissue.dtype

    def voxel_weights(self, params: FKParams) -> Array:
        """lambda_e(x) of D = Dw [p_wm A + p_gm / ratio I] per offset, 1/day."""
        weights = self.wm_weights
        weights = weights.at[:3].add(self.gm_weights / params.ratio)
        return params.dw * weights

    def diffusion(self, params: FKParams) -> StencilDiffusion:
        """The discretised operator for these parameters."""
        return StencilDiffusion.from_voxel_weights(
            self.voxel_weights(params), self.offsets, self.sight
        )

    def initial_density(self, origin_mm) -> Array:
        """The seed at `origin_mm` (grid mm), zero outside tissue."""
        c0 = self.seed(self.grid, origin_mm, self.tissue.dtype)
        return jnp.where(self.tissue > 0, c0, 0.0)


@eqx.filter_jit
def _rate_bound(sim: AnisotropicFKSimulator, params: FKParams) -> Array:
    params = jax.tree.map(lambda x: jnp.asarray(x, sim.tissue.dtype), params)
    return sim.diffusion(params).rate_bound()
