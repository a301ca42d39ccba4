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
For a `growth.TumourTensorFamily` (A(r) = a(x, r) A(r_lo) + (1 - a(x, r)) A(r_hi)) both
ends are decomposed and their weights mixed per solve, so r is traced as well.

Layout (`SellingField`, `CompactStencilDiffusion`). A voxel uses six offsets, but a whole
field uses dozens (37-125), and a dense row per offset costs about one axis of the
isotropic operator per step on a CPU. So only the offsets used by many voxels
(`DENSE_FRACTION`: in practice the 13 directions of the 3x3x3 cube) are dense rows of
pair weights, stored once per pair; the rare longer offsets are a sparse list of voxel
pairs (gather + scatter). `StencilDiffusion` is the previous all-dense operator, kept as
the reference the compact one is tested against.
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
from growth.tensor import TumourTensorFamily, family_mixing

__all__ = [
    "CUBE_OFFSETS",
    "DENSE_FRACTION",
    "selling_decomposition",
    "limit_condition",
    "SellingField",
    "selling_field",
    "CompactStencilDiffusion",
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


#: The 13 offset directions of the 3x3x3 cube (one of each pair {e, -e}), axes first.
CUBE_OFFSETS: tuple[Offset, ...] = (
    (1, 0, 0), (0, 1, 0), (0, 0, 1),
    (1, 1, 0), (1, -1, 0), (1, 0, 1), (1, 0, -1), (0, 1, 1), (0, 1, -1),
    (1, 1, 1), (1, 1, -1), (1, -1, 1), (1, -1, -1),
)


def _canonical(offsets: np.ndarray) -> np.ndarray:
    """The representative of {e, -e} whose first non-zero component is positive (..., 3)."""
    first = np.argmax(offsets != 0, axis=-1)
    lead = np.take_along_axis(offsets, first[..., None], axis=-1)
    return offsets * np.where(lead < 0, -1, 1)


def _voxel_matrices(tensors: np.ndarray, spacing, max_condition: float):
    """(6, *shape) tensors (mm^2/day) -> voxel-unit matrices of the voxels with a
    non-zero tensor, condition-limited, and their flat indices."""
    xx, xy, xz, yy, yz, zz = np.asarray(tensors, np.float64).reshape(6, -1)
    matrices = np.stack(
        [np.stack([xx, xy, xz], -1), np.stack([xy, yy, yz], -1), np.stack([xz, yz, zz], -1)], -2
    )
    present = np.flatnonzero(np.trace(matrices, axis1=1, axis2=2) > 0)
    limited, _ = limit_condition(matrices[present], max_condition)
    inv_h = 1.0 / np.asarray(spacing, np.float64)
    return limited * inv_h[None, :, None] * inv_h[None, None, :], present


class SellingField(eqx.Module):
    """Selling weights of K tensor fields on one grid, in the compact layout: dense rows
    for the offsets many voxels use (the axes always), and a sparse list of the voxel
    pairs (x, x + e) joined by the other offsets.

    Voxel weights lambda_e(x) are in 1/day per unit of the tensors (voxel units:
    D' = H^-1 D H^-1). A sparse pair is listed where both ends carry lambda_e > 0 in some
    field and the straight segment between them stays in tissue (`line_of_sight`); dense
    rows of offsets longer than one voxel are cut the same way when the operator is built.

    Attributes:
        dense: (K, len(dense_offsets), *shape) lambda_e(x) on `dense_offsets`.
        pair_lower, pair_upper: (P,) flat indices of x and x + e, sorted by x.
        lambda_lower, lambda_upper: (K, P) lambda_e at x and at x + e.
        dense_sight: per dense offset longer than one voxel, the (*shape) bool mask of x
            whose segment to x + e stays in tissue (None for the others).
        dense_offsets: the offsets of the dense rows (the three axes first).
        sparse_offsets: the offsets of the sparse pairs (for reporting).
    """

    dense: Array
    pair_lower: Array
    pair_upper: Array
    lambda_lower: Array
    lambda_upper: Array
    dense_sight: tuple[Array | None, ...]
    dense_offsets: tuple[Offset, ...] = eqx.field(static=True)
    sparse_offsets: tuple[Offset, ...] = eqx.field(static=True)

    @property
    def offsets(self) -> tuple[Offset, ...]:
        return self.dense_offsets + self.sparse_offsets


#: An offset goes into a dense row when at least this fraction of the voxels use it:
#: on CPU a dense row costs about as much as one axis of the isotropic operator, a
#: sparse pair (gather + scatter) about 13 times one voxel of it.
DENSE_FRACTION = 0.05


def _offset_keys(offsets: np.ndarray, span: int) -> np.ndarray:
    base = 2 * span + 1
    return ((offsets + span) * np.array([base * base, base, 1])).sum(-1)


def _key_offsets(keys: np.ndarray, span: int) -> np.ndarray:
    base = 2 * span + 1
    return np.stack([keys // (base * base), (keys // base) % base, keys % base], -1) - span


def selling_field(
    tensor_fields, spacing, tissue=None, *, max_condition: float = 25.0,
    dense_fraction: float = DENSE_FRACTION, dtype=jnp.float32,
) -> SellingField:
    """Decompose tensor fields (a sequence of (6, *shape), components xx, xy, xz, yy, yz,
    zz, mm^2/day) with Selling's reduction into the compact layout of `SellingField`.

    Tensors whose eigenvalue ratio exceeds `max_condition` are first limited to it
    (`limit_condition`, trace kept); zero tensors get zero weights. Offsets used by at
    least `dense_fraction` of the voxels (in any field) get dense rows, the others are
    sparse pairs; the three axes are always dense (`math.inf`: only they are). `tissue` (default: where any field is non-zero) cuts pairs whose
    segment leaves it.
    """
    fields = [np.asarray(t, np.float64) for t in tensor_fields]
    shape = fields[0].shape[1:]
    if any(t.shape != (6, *shape) for t in fields):
        raise ValueError(f"tensor fields must share one shape (6, *grid), got {[t.shape for t in fields]}")
    n = int(np.prod(shape))
    voxel, offset, weight, field = [], [], [], []
    for k, t in enumerate(fields):
        matrices, present = _voxel_matrices(t, spacing, max_condition)
        if not len(present):
            continue
        offsets, weights = selling_decomposition(matrices)
        used = weights.reshape(-1) > 0
        voxel.append(np.repeat(present, 6)[used])
        offset.append(_canonical(offsets).reshape(-1, 3)[used])
        weight.append(weights.reshape(-1)[used])
        field.append(np.full(int(used.sum()), k))
    voxel, weight, field = (np.concatenate(v) if v else np.zeros(0) for v in (voxel, weight, field))
    voxel, field = voxel.astype(np.int64), field.astype(np.int64)
    offset = np.concatenate(offset) if offset else np.zeros((0, 3), np.int64)
    span = max(int(np.abs(offset).max(initial=1)), 1)
    okey = _offset_keys(offset, span)
    # usage: distinct voxels per offset (over all fields)
    distinct = np.unique(okey * n + voxel)
    keys, counts = np.unique(distinct // n, return_counts=True)
    axes = list(CUBE_OFFSETS[:3])
    frequent = {tuple(int(v) for v in e) for e, c in zip(_key_offsets(keys, span), counts)
                if c >= dense_fraction * n}
    rank = {e: i for i, e in enumerate(CUBE_OFFSETS)}
    dense_offsets = tuple(axes) + tuple(sorted(frequent - set(axes),
                                               key=lambda e: (rank.get(e, 99), max(map(abs, e)), e)))
    row_of_key = {int(_offset_keys(np.array(e), span)): i for i, e in enumerate(dense_offsets)}
    row = np.array([row_of_key.get(int(k), -1) for k in okey], np.int64)
    dense = np.zeros((len(fields), len(dense_offsets), n))
    in_dense = row >= 0
    np.add.at(dense, (field[in_dense], row[in_dense], voxel[in_dense]), weight[in_dense])
    inside = (np.abs(np.sum(fields, axis=0)).sum(0) > 0) if tissue is None else np.asarray(tissue) > 0
    sparse = ~in_dense
    lower, upper, lam_lower, lam_upper, sparse_offsets = _sparse_pairs(
        voxel[sparse], offset[sparse], weight[sparse], field[sparse], len(fields), shape, inside)
    sight = tuple(jnp.asarray(m) if max(map(abs, e)) > 1 else None
                  for e, m in zip(dense_offsets, _dense_sight(inside, dense_offsets)))
    return SellingField(
        dense=jnp.asarray(dense.reshape(len(fields), len(dense_offsets), *shape), dtype),
        pair_lower=jnp.asarray(lower, jnp.int32),
        pair_upper=jnp.asarray(upper, jnp.int32),
        lambda_lower=jnp.asarray(lam_lower, dtype),
        lambda_upper=jnp.asarray(lam_upper, dtype),
        dense_sight=sight,
        dense_offsets=dense_offsets,
        sparse_offsets=sparse_offsets,
    )


def _dense_sight(inside: np.ndarray, offsets) -> list[np.ndarray]:
    """`line_of_sight` of each offset as a full-grid mask at the lower end x (False where
    x + e leaves the grid)."""
    masks = []
    for e, ok in zip(offsets, line_of_sight(inside, offsets)):
        lower, _ = _pair_slices(inside.shape, e)
        full = np.zeros(inside.shape, bool)
        full[lower] = ok
        masks.append(full)
    return masks


def _sparse_pairs(voxel, offset, weight, field, n_fields, shape, inside):
    """The pairs (x, x + e) of the sparse offsets with lambda_e > 0 at both ends (in the union
    of the fields) and tissue along the segment; their lambdas per field."""
    n = int(np.prod(shape))
    empty = (np.zeros(0, np.int64),) * 2 + (np.zeros((n_fields, 0)),) * 2 + ((),)
    if not len(voxel):
        return empty
    span = int(np.abs(offset).max())
    base = 2 * span + 1
    okey = ((offset + span) * np.array([base * base, base, 1])).sum(1)
    key = okey * n + voxel
    keys, inverse = np.unique(key, return_inverse=True)
    lam = np.zeros((n_fields, len(keys)))
    np.add.at(lam, (field, inverse), weight)
    kvox, kokey = keys % n, keys // n
    e = np.stack([kokey // (base * base), (kokey // base) % base, kokey % base], 1) - span
    x = np.stack(np.unravel_index(kvox, shape), 1)
    y = x + e
    valid = np.all((y >= 0) & (y < np.asarray(shape)), axis=1)
    partner_key = kokey * n + np.ravel_multi_index(tuple(np.where(valid[:, None], y, 0).T), shape)
    pos = np.minimum(np.searchsorted(keys, partner_key), len(keys) - 1)
    valid &= keys[pos] == partner_key
    valid[valid] = _segment_in_tissue(x[valid], e[valid], inside)
    lower, upper = kvox[valid], kvox[pos[valid]]
    order = np.argsort(lower, kind="stable")
    long_offsets = tuple(sorted({tuple(int(v) for v in row) for row in e[valid]}))
    return (lower[order], upper[order], lam[:, valid][:, order], lam[:, pos[valid]][:, order],
            long_offsets)


def _segment_in_tissue(x: np.ndarray, e: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """Per row, whether every voxel on the segment x -> x + e (sampled at each voxel
    step, as `line_of_sight`) has tissue; (M,) bool. x + e must be in the grid."""
    ok = np.ones(len(x), bool)
    steps = np.abs(e).max(1)
    for s in range(1, int(steps.max(initial=0))):
        active = s < steps
        point = x[active] + np.round(e[active] * s / steps[active, None]).astype(np.int64)
        ok[np.flatnonzero(active)] &= inside[tuple(point.T)]
    return ok


def _view(padded: Array, e, shape, halo: int = 1) -> Array:
    """The values at x + e for x in the grid, from an array zero-padded by `halo`."""
    return padded[tuple(slice(halo + d, halo + d + n) for d, n in zip(e, shape))]


def _halo(offsets) -> int:
    return max((max(abs(v) for v in e) for e in offsets), default=1)


def _negate(e):
    return tuple(-d for d in e)


class CompactStencilDiffusion(AbstractDiffusion):
    """div(D grad c) on a Selling stencil in the compact layout, 1/day.

    The weight of the pair (x, x + e) (the harmonic mean of lambda_e at both ends) is
    stored once. For the offsets of the dense rows it is an array (zero-padded by `halo`
    voxels, the weight at the lower end x), and every voxel receives

        sum_e w_e(x) (c(x+e) - c(x)) + w_e(x-e) (c(x-e) - c(x)),

    one elementwise pass over shifted views. The pairs of the other offsets are a sparse
    list: their flux w (c(upper) - c(lower)) is added at the lower and subtracted at the
    upper voxel. Both parts are flux differences, so mass is conserved; all weights are
    non-negative, so dt * max(outflow rate) <= 1 keeps explicit steps monotone.

    Attributes:
        dense: per dense offset, the padded pair weights (n0+2h, n1+2h, n2+2h), 1/day.
        pair_lower, pair_upper: (P,) flat voxel indices of the sparse pairs.
        pair_weight: (P,) their weights, 1/day.
        offsets: the offsets of `dense` (static).
    """

    dense: tuple[Array, ...]
    pair_lower: Array
    pair_upper: Array
    pair_weight: Array
    offsets: tuple[Offset, ...] = eqx.field(static=True)

    @classmethod
    def from_voxel_weights(cls, dense: Array, offsets, pair_lower, pair_upper, lambda_lower,
                           lambda_upper, sight=None) -> "CompactStencilDiffusion":
        """Pair weights as harmonic means of the voxel weights at both ends: `dense`
        (len(offsets), *shape) on the dense offsets, cut where `sight` (per offset a
        (*shape) mask at the lower end, or None) is False; `lambda_lower/upper` (P,) on
        the sparse pairs."""
        shape = dense.shape[1:]
        halo = _halo(offsets)
        rows = []
        for k, (row, e) in enumerate(zip(dense, offsets)):
            partner = _view(jnp.pad(row, halo), e, shape, halo)  # zero outside the grid
            w = harmonic_mean(row, partner)
            if sight is not None and sight[k] is not None:
                w = jnp.where(sight[k], w, 0.0)
            rows.append(jnp.pad(w, halo))
        return cls(dense=tuple(rows), pair_lower=pair_lower, pair_upper=pair_upper,
                   pair_weight=harmonic_mean(lambda_lower, lambda_upper), offsets=tuple(offsets))

    @property
    def halo(self) -> int:
        return _halo(self.offsets)

    def __call__(self, c):
        h = self.halo
        padded = jnp.pad(c, h)
        out = jnp.zeros_like(c)
        for w, e in zip(self.dense, self.offsets):
            back = _negate(e)
            out = out + _view(w, (0, 0, 0), c.shape, h) * (_view(padded, e, c.shape, h) - c)
            out = out + _view(w, back, c.shape, h) * (_view(padded, back, c.shape, h) - c)
        if self.pair_weight.size:
            flat = c.reshape(-1)
            flux = self.pair_weight * (flat[self.pair_upper] - flat[self.pair_lower])
            # Two scatters into zeros: faster on CPU than one, and than scattering into
            # the dense result (which would pull the dense pass into the scatter loop).
            extra = jnp.zeros_like(flat).at[self.pair_lower].add(flux).at[self.pair_upper].add(-flux)
            out = out + extra.reshape(c.shape)
        return out

    def outflow_rate(self) -> Array:
        """Per voxel, the sum of the weights of its pairs (1/day)."""
        h = self.halo
        shape = tuple(n - 2 * h for n in self.dense[0].shape)
        rate = sum(_view(w, (0, 0, 0), shape, h) + _view(w, _negate(e), shape, h)
                   for w, e in zip(self.dense, self.offsets))
        if self.pair_weight.size:
            rate = rate.reshape(-1).at[self.pair_lower].add(self.pair_weight)
            rate = rate.at[self.pair_upper].add(self.pair_weight).reshape(shape)
        return rate

    def rate_bound(self):
        return jnp.max(self.outflow_rate())


class AnisotropicFKSimulator(AbstractFKSimulator):
    """FK forward model with D(x) = Dw [p_wm A(x) + p_gm / ratio I]: (params, origin, time)
    -> density, like `growth.FKSimulator` (same call, vmap and gradients; Dw, rho, ratio,
    origin and time are traced).

    The white-matter shape tensor A is fixed at creation, or a `TumourTensorFamily`: then
    A(r) = a(x, r) A(r_lo) + (1 - a(x, r)) A(r_hi) and the anisotropy r
    (`FKParams.anisotropy`, within the family's range) is traced and differentiable too:
    both ends are decomposed once and their Selling weights mixed per solve.

    Attributes:
        selling: Selling weights of p_wm A (one field, or the family's two ends), 1/day
            per unit Dw (`SellingField`).
        gm_weights: (3, ...) p_gm / h_k^2 on the axes.
        family_traces: (2, ...) the family's `trace_lo`, `trace_hi` (None for a fixed
            tensor), for its mixing weight a(x, r).
        tissue: p_wm + p_gm, for masking the seed.
        anisotropy_range: the family's (r_lo, r_hi) (None for a fixed tensor).
    """

    selling: SellingField
    gm_weights: Array
    family_traces: Array | None
    tissue: Array
    grid: Grid = eqx.field(static=True)
    dt: float = eqx.field(static=True)
    max_steps: int = eqx.field(static=True)
    anisotropy_range: tuple[float, float] | None = eqx.field(static=True, default=None)
    seed: GaussianSeed = eqx.field(static=True, default=GaussianSeed())
    progress: bool = eqx.field(static=True, default=False)
    substeps: int | None = eqx.field(static=True, default=None)

    @classmethod
    def create(
        cls,
        wm,
        gm,
        shape_tensor: Float[np.ndarray, "6 n0 n1 n2"] | TumourTensorFamily,
        grid: Grid,
        *,
        dw_max: float,
        t_max: float,
        dt: float | None = None,
        safety: float = 0.9,
        seed: GaussianSeed = GaussianSeed(),
        dtype=jnp.float32,
        progress: bool = False,
        max_condition: float = 25.0,
        dense_fraction: float = DENSE_FRACTION,
    ) -> "AnisotropicFKSimulator":
        """Build the stencil and choose the step for Dw up to `dw_max` (mm^2/day, ratio
        >= 1, any r of a family) and times up to `t_max` (days). The step is `safety`
        times the exact monotonicity limit 1 / max_x(outflow rate); an explicit `dt`
        above it is refused.

        Args:
            wm, gm: tissue probabilities (grid.shape).
            shape_tensor: (6, *grid.shape) white-matter shape tensor A (xx, xy, xz, yy,
                yz, zz), dimensionless (trace 3 for a trace-preserving construction), or
                a `TumourTensorFamily` on the grid (r fitted).
            max_condition: eigenvalue ratios above this are limited (`limit_condition`).
            dense_fraction: offsets used by at least this fraction of the voxels get a
                dense row, the others are a sparse pair list (`selling_field`).
        """
        wm = np.asarray(wm, np.float64)
        gm = np.asarray(gm, np.float64)
        family = shape_tensor if isinstance(shape_tensor, TumourTensorFamily) else None
        ends = [family.lo, family.hi] if family is not None else [shape_tensor]
        ends = [np.asarray(t, np.float64) for t in ends]
        if wm.shape != grid.shape or gm.shape != grid.shape or any(
                t.shape != (6, *grid.shape) for t in ends):
            raise ValueError(
                f"shapes differ: grid {grid.shape}, wm {wm.shape}, gm {gm.shape}, "
                f"tensor {[t.shape for t in ends]} (expected (6, *grid))"
            )
        tissue = wm + gm
        selling = selling_field([t * wm[None] for t in ends], grid.spacing, tissue,
                                max_condition=max_condition, dense_fraction=dense_fraction,
                                dtype=dtype)
        inv_h2 = np.asarray([1.0 / h**2 for h in grid.spacing])
        sim = cls(
            selling=selling,
            gm_weights=jnp.asarray(gm[None] * inv_h2[:, None, None, None], dtype),
            family_traces=None if family is None else jnp.stack(
                [jnp.asarray(family.trace_lo, dtype), jnp.asarray(family.trace_hi, dtype)]),
            tissue=jnp.asarray(tissue, dtype),
            grid=grid,
            anisotropy_range=None if family is None else family.anisotropy_range,
            dt=1.0,
            max_steps=1,
            seed=seed,
            progress=progress,
        )
        # The fastest admissible case: Dw = dw_max, ratio = 1 (weights grow with both)
        # and, for a family, the larger of its two ends' weights everywhere.
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

    @property
    def offsets(self) -> tuple[Offset, ...]:
        """All stencil offsets in use (the dense rows', then the sparse pairs')."""
        return self.selling.offsets

    def _mixing(self, params: FKParams):
        """Per-field weights (K, *shape) of the white-matter stencil; None: the maximum
        over the fields (the step bound)."""
        if self.family_traces is None:
            return jnp.ones((1,) + self.grid.shape, self.dtype)
        if params.anisotropy is None:
            return None
        a = family_mixing(self.family_traces[0], self.family_traces[1], self.anisotropy_range,
                          params.anisotropy)
        return jnp.stack([a, 1.0 - a])

    def voxel_weights(self, params: FKParams):
        """lambda_e(x) of D = Dw [p_wm A + p_gm / ratio I], 1/day: on the dense offsets
        (len(selling.dense_offsets), *shape) and at both ends of the sparse pairs (P,)."""
        mix = self._mixing(params)
        field = self.selling
        if mix is None:
            dense, lower, upper = (jnp.max(a, axis=0) for a in
                                   (field.dense, field.lambda_lower, field.lambda_upper))
        else:
            dense = jnp.einsum("k...,kr...->r...", mix, field.dense)
            flat = mix.reshape(mix.shape[0], -1)
            lower = jnp.sum(flat[:, field.pair_lower] * field.lambda_lower, axis=0)
            upper = jnp.sum(flat[:, field.pair_upper] * field.lambda_upper, axis=0)
        # (a concatenation, not .at[:3].add: XLA constant-folds a scatter over all rows)
        dense = jnp.concatenate([dense[:3] + self.gm_weights / params.ratio, dense[3:]])
        return params.dw * dense, params.dw * lower, params.dw * upper

    def diffusion(self, params: FKParams) -> CompactStencilDiffusion:
        """The discretised operator for these parameters."""
        dense, lower, upper = self.voxel_weights(params)
        field = self.selling
        return CompactStencilDiffusion.from_voxel_weights(
            dense, field.dense_offsets, field.pair_lower, field.pair_upper, lower, upper,
            field.dense_sight,
        )

    def initial_density(self, origin_mm) -> Array:
        """The seed at `origin_mm` (grid mm), zero outside tissue."""
        c0 = self.seed(self.grid, origin_mm, self.tissue.dtype)
        return jnp.where(self.tissue > 0, c0, 0.0)


@eqx.filter_jit
def _rate_bound(sim: AnisotropicFKSimulator, params: FKParams) -> Array:
    params = jax.tree.map(lambda x: jnp.asarray(x, sim.tissue.dtype), params)
    return sim.diffusion(params).rate_bound()
