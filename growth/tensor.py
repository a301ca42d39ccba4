"""Symmetric 3x3 tensor fields: layout, eigen-analysis, DTI fitting and tumour tensors.

Layout. A tensor field is an array of shape ``(6, n0, n1, n2)`` (or any ``(6, ...)``,
including a plain ``(6,)``) holding the independent components in the FSL ``dtifit``
order ``(xx, xy, xz, yy, yz, zz)``, expressed in the axes of the array: x is array axis 0,
y axis 1, z axis 2. For rtjax images these are the RAS-canonical voxel axes; the world
direction of axis k is the k-th column of the canonical affine divided by its norm (for an
oblique, shear-free affine, a rotated RAS frame). ``growth`` itself knows nothing of
affines: :mod:`rtjax.tensor_io` puts file tensors into this frame.

Units. DTI tensors carry whatever unit their source has (mm^2/s from ``dtifit``, or the
reciprocal unit of the b-values for :func:`fit_tensor_dwi`). The tumour *shape* tensor
of :func:`tumour_tensor` is dimensionless with trace 3, so that ``Dw * shape`` has the
trace ``3 Dw`` of the isotropic white-matter tensor ``Dw I``.

Everything is vectorised over voxels and works under ``jit``/``vmap``. The floating dtype
follows the inputs (float32 by default; float64 when the inputs are float64 and
``jax_enable_x64`` is on); integer inputs are promoted to float32.
"""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

__all__ = [
    "TENSOR_COMPONENTS",
    "components_to_matrix",
    "matrix_to_components",
    "rotate_tensor",
    "eigh_field",
    "fractional_anisotropy",
    "mean_diffusivity",
    "tensor_from_direction",
    "tensor_from_eigen",
    "dti_design_matrix",
    "fit_tensor_dwi",
    "westin_measures",
    "tumour_tensor",
    "TumourTensorFamily",
    "tumour_tensor_family",
    "family_mixing",
]


# Full float32 products: on GPUs a float32 matmul defaults to TF32 (about 3 decimal digits).
_HIGHEST = jax.lax.Precision.HIGHEST
_mm = functools.partial(jnp.matmul, precision=_HIGHEST)

TENSOR_COMPONENTS = ("xx", "xy", "xz", "yy", "yz", "zz")
# (row, column) of each component in the 3x3 matrix.
_INDEX = ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2))
_FIT_METHODS = ("WLS", "LS")
_TUMOUR_METHODS = ("scaled", "westin")


def _float(x) -> Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    return x


def _check_t6(t6: Array) -> Array:
    t6 = _float(t6)
    if t6.ndim < 1 or t6.shape[0] != 6:
        raise ValueError(
            f"expected a tensor field of shape (6, ...) in the order {TENSOR_COMPONENTS}, "
            f"got shape {t6.shape}"
        )
    return t6


def _tiny(dtype) -> float:
    """A trace below this is a zero tensor (sqrt of the smallest normal float)."""
    return float(np.sqrt(np.finfo(np.dtype(dtype)).tiny))


# --------------------------------------------------------------------------- layout


def components_to_matrix(t6: Float[Array, "6 *spatial"]) -> Float[Array, "*spatial 3 3"]:
    """Components ``(6, ...)`` in the order (xx, xy, xz, yy, yz, zz) -> matrices ``(..., 3, 3)``.

    A plain ``(6,)`` gives one ``(3, 3)`` matrix.
    """
    xx, xy, xz, yy, yz, zz = _check_t6(t6)
    rows = (
        jnp.stack([xx, xy, xz], axis=-1),
        jnp.stack([xy, yy, yz], axis=-1),
        jnp.stack([xz, yz, zz], axis=-1),
    )
    return jnp.stack(rows, axis=-2)


def matrix_to_components(m: Float[Array, "*spatial 3 3"]) -> Float[Array, "6 *spatial"]:
    """Matrices ``(..., 3, 3)`` -> components ``(6, ...)`` (xx, xy, xz, yy, yz, zz).

    The off-diagonal components are the mean of the two mirrored entries, so a slightly
    asymmetric matrix (round-off) gives its symmetric part.
    """
    m = _float(m)
    if m.shape[-2:] != (3, 3):
        raise ValueError(f"expected matrices of shape (..., 3, 3), got {m.shape}")
    comps = [
        m[..., i, j] if i == j else 0.5 * (m[..., i, j] + m[..., j, i]) for i, j in _INDEX
    ]
    return jnp.stack(comps, axis=0)


def rotate_tensor(t6: Float[Array, "6 *spatial"], rotation) -> Float[Array, "6 *spatial"]:
    """The field with every tensor mapped to ``Q T Q^T``.

    Args:
        t6: tensor field ``(6, ...)``.
        rotation: ``(3, 3)`` matrix Q (one for all voxels) or ``(..., 3, 3)`` (one per
            voxel). Q maps old-frame vector components to new-frame components
            (``v_new = Q v_old``): a rotation, a signed permutation (axis flips and
            swaps), or any linear map (then the result is ``Q T Q^T`` all the same).
    """
    mat = components_to_matrix(t6)
    q = jnp.asarray(rotation, dtype=mat.dtype)
    return matrix_to_components(_mm(_mm(q, mat), jnp.swapaxes(q, -1, -2)))


# --------------------------------------------------------------------------- eigen-analysis


def eigh_field(
    t6: Float[Array, "6 *spatial"],
) -> tuple[Float[Array, "3 *spatial"], Float[Array, "*spatial 3 3"]]:
    """Eigen-decomposition of every tensor of a field.

    Returns:
        (eigenvalues, eigenvectors): eigenvalues ``(3, ...)`` in descending order
        (lambda1 >= lambda2 >= lambda3, same unit as ``t6``); eigenvectors ``(..., 3, 3)``
        with the unit eigenvector of eigenvalue k in column k (``vecs[..., :, k]``),
        components in the frame of the field. Eigenvector signs are arbitrary; within a
        repeated eigenvalue's eigenspace the basis is arbitrary.
    """
    vals, vecs = jnp.linalg.eigh(components_to_matrix(t6))
    vals = jnp.moveaxis(vals[..., ::-1], -1, 0)
    return vals, vecs[..., ::-1]


def mean_diffusivity(t6: Float[Array, "6 *spatial"]) -> Float[Array, "*spatial"]:
    """Mean diffusivity MD = trace / 3 = (lambda1 + lambda2 + lambda3) / 3, unit of ``t6``."""
    t6 = _check_t6(t6)
    return (t6[0] + t6[3] + t6[5]) / 3.0


def fractional_anisotropy(t6: Float[Array, "6 *spatial"]) -> Float[Array, "*spatial"]:
    """Fractional anisotropy in [0, 1] (dimensionless); 0 for a zero tensor.

    FA = sqrt(3/2) |D - MD I|_F / |D|_F, which equals the eigenvalue formula
    sqrt(1/2) sqrt((l1-l2)^2 + (l2-l3)^2 + (l3-l1)^2) / sqrt(l1^2 + l2^2 + l3^2) without an
    eigen-decomposition. (It may exceed 1 for an indefinite tensor; use eigenvalues
    clipped at 0 and :func:`tensor_from_eigen` first if the field may have them.)
    """
    t6 = _check_t6(t6)
    md = mean_diffusivity(t6)
    dev_sq = (t6[0] - md) ** 2 + (t6[3] - md) ** 2 + (t6[5] - md) ** 2
    off_sq = 2.0 * (t6[1] ** 2 + t6[2] ** 2 + t6[4] ** 2)
    norm_sq = t6[0] ** 2 + t6[3] ** 2 + t6[5] ** 2 + off_sq
    positive = norm_sq > 0
    ratio = (dev_sq + off_sq) / jnp.where(positive, norm_sq, 1.0)
    return jnp.where(positive, jnp.sqrt(1.5 * ratio), 0.0)


# --------------------------------------------------------------------------- construction


def tensor_from_eigen(
    eigenvalues: Float[Array, "3 *spatial"], eigenvectors: Float[Array, "*spatial 3 3"]
) -> Float[Array, "6 *spatial"]:
    """D = V diag(lambda) V^T per voxel.

    Args:
        eigenvalues: ``(3, ...)``, any order, any unit (the unit of the result).
        eigenvectors: ``(..., 3, 3)``, the eigenvector of ``eigenvalues[k]`` in column k
            (the convention of :func:`eigh_field`); unit length expected (not enforced:
            the result is sum_k lambda_k v_k v_k^T).
    """
    vals = _float(eigenvalues)
    vecs = jnp.asarray(eigenvectors, dtype=vals.dtype)
    if vals.shape[0] != 3 or vecs.shape[-2:] != (3, 3) or vecs.shape[:-2] != vals.shape[1:]:
        raise ValueError(
            f"expected eigenvalues (3, ...) and eigenvectors (..., 3, 3) over the same "
            f"voxels, got {vals.shape} and {vecs.shape}"
        )
    lam = jnp.moveaxis(vals, 0, -1)
    return matrix_to_components(jnp.einsum("...ik,...k,...jk->...ij", vecs, lam, vecs, precision=_HIGHEST))


def tensor_from_direction(
    fa: Float[Array, "*spatial"],
    direction: Float[Array, "3 *spatial"],
    *,
    mean_diffusivity: float | Array = 1.0,
) -> Float[Array, "6 *spatial"]:
    """A cylindrically symmetric tensor with a given FA, principal direction and MD.

    D = d_perp I + (d_par - d_perp) v v^T with v = direction / |direction| and, for
    MD = m and FA = f (clipped to [0, 1]):

        d_par  = m (1 + 2 f / sqrt(3 - 2 f^2)),
        d_perp = m (1 -   f / sqrt(3 - 2 f^2)).

    Derivation: with delta = d_par - d_perp, MD = m gives d_par = m + 2 delta / 3 and
    d_perp = m - delta / 3; the eigenvalue formula of FA then reads
    f^2 = delta^2 / (3 m^2 + 2 delta^2 / 3), so delta = 3 m f / sqrt(3 - 2 f^2) (prolate,
    delta >= 0). f = 0 gives m I; f = 1 gives d_perp = 0, d_par = 3 m.

    Args:
        fa: fractional anisotropy ``(...)``; non-finite values count as 0.
        direction: principal direction ``(3, ...)`` in the frame of the field (any
            length; it is normalised). A zero, non-finite or NaN direction (e.g. "no
            peak") gives the isotropic tensor m I.
        mean_diffusivity: m, a scalar or ``(...)`` field; the unit of the result.

    Returns:
        ``(6, ...)`` tensor field.
    """
    fa = _float(fa)
    v = jnp.asarray(direction, dtype=fa.dtype)
    if v.shape[0] != 3 or v.shape[1:] != fa.shape:
        raise ValueError(
            f"expected direction (3, ...) over the voxels of fa {fa.shape}, got {v.shape}"
        )
    m = jnp.asarray(mean_diffusivity, dtype=fa.dtype)
    finite = jnp.all(jnp.isfinite(v), axis=0)
    v = jnp.where(finite, v, 0.0)
    norm = jnp.sqrt(jnp.sum(v * v, axis=0))
    valid = finite & (norm > _tiny(fa.dtype))
    v = jnp.where(valid, v / jnp.where(valid, norm, 1.0), 0.0)
    f = jnp.clip(jnp.where(jnp.isfinite(fa), fa, 0.0), 0.0, 1.0)
    f = jnp.where(valid, f, 0.0)
    delta = 3.0 * m * f / jnp.sqrt(3.0 - 2.0 * f * f)
    d_perp = m - delta / 3.0
    outer = jnp.stack([v[i] * v[j] for i, j in _INDEX], axis=0)
    eye = jnp.asarray([1.0, 0.0, 0.0, 1.0, 0.0, 1.0], dtype=fa.dtype)
    eye = eye.reshape((6,) + (1,) * fa.ndim)
    return d_perp * eye + delta * outer


# --------------------------------------------------------------------------- DTI fit


def dti_design_matrix(bvals, bvecs) -> Float[Array, "n 7"]:
    """The log-linear DTI design matrix, ``(n, 7)``.

    Row i is ``[-b gx^2, -2b gx gy, -2b gx gz, -b gy^2, -2b gy gz, -b gz^2, 1]`` so that
    ``log S_i = X_i . (Dxx, Dxy, Dxz, Dyy, Dyz, Dzz, log S0)``.
    """
    b = _float(bvals).reshape(-1)
    g = jnp.asarray(bvecs, dtype=b.dtype)
    if g.shape != (b.shape[0], 3):
        raise ValueError(f"expected bvecs of shape ({b.shape[0]}, 3), got {g.shape}")
    cols = [-b * g[:, i] * g[:, j] * (1.0 if i == j else 2.0) for i, j in _INDEX]
    return jnp.stack([*cols, jnp.ones_like(b)], axis=1)


def _weighted_lstsq(x: Array, y: Array, w: Array | None) -> Array:
    """Per-voxel argmin |w (X beta - y)|^2; x (n, p), y (..., n), w (..., n) or None.

    The columns of X are scaled to unit norm first (b ~ 1000 against 1), and the normal
    equations are solved per voxel; for w = None one pseudo-inverse serves all voxels.
    """
    scale = jnp.linalg.norm(x, axis=0)
    scale = jnp.where(scale > 0, scale, 1.0)
    xs = x / scale
    if w is None:
        beta = _mm(y, jnp.linalg.pinv(xs).T)
    else:
        w2 = w * w
        normal = jnp.einsum("...n,ni,nj->...ij", w2, xs, xs, precision=_HIGHEST)
        rhs = jnp.einsum("...n,ni,...n->...i", w2, xs, y, precision=_HIGHEST)
        beta = jnp.linalg.solve(normal, rhs[..., None])[..., 0]
    return beta / scale


def fit_tensor_dwi(
    dwi: Float[Array, "*spatial n"],
    bvals: Float[Array, " n"],
    bvecs: Float[Array, "n 3"],
    *,
    method: str = "WLS",
    min_signal: float = 1e-6,
) -> Float[Array, "6 *spatial"]:
    """Log-linear least-squares diffusion tensor fit of diffusion-weighted signals.

    Model: log S_i = log S0 - b_i g_i^T D g_i, linear in (D, log S0); log S0 is a fitted
    parameter (the b = 0 volumes are rows like any other). Signals are clipped below at
    ``min_signal`` before the log.

    Methods (matching dipy's ``TensorModel(gtab, fit_method=...)``, whose default is
    ``"WLS"``):

    - ``"LS"`` (= dipy ``"LS"``/``"OLS"``): ordinary least squares on log S.
    - ``"WLS"`` (= dipy ``"WLS"``, Chung et al. 2006): an OLS fit, then least squares
      weighted by the squared OLS-predicted signal, w_i = exp(X_i beta_OLS)^2 (the
      variance of log S is ~ sigma^2 / S^2).

    Args:
        dwi: signals ``(..., n)``, any positive unit.
        bvals: b-values ``(n,)``, s/mm^2 (then D is in mm^2/s).
        bvecs: unit gradient directions ``(n, 3)`` in the frame the tensor should be
            expressed in (the array axes for the layout of this module); rows of b = 0
            volumes are ignored (any value, zeros customary).
        method: ``"WLS"`` or ``"LS"``.
        min_signal: lower clip of the signal before the log (dipy's ``min_signal``).

    Returns:
        ``(6, ...)`` tensor in (xx, xy, xz, yy, yz, zz) order, unit 1/[b]. Not forced to
        be positive semi-definite (noise can give negative eigenvalues).
    """
    if method not in _FIT_METHODS:
        raise ValueError(f"unknown fit method {method!r}; expected one of {_FIT_METHODS}")
    y = jnp.log(jnp.maximum(_float(dwi), min_signal))
    b = jnp.asarray(bvals, dtype=y.dtype).reshape(-1)
    if y.shape[-1] != b.shape[0]:
        raise ValueError(f"dwi has {y.shape[-1]} volumes but there are {b.shape[0]} b-values")
    g = jnp.where(b[:, None] > 0, jnp.nan_to_num(jnp.asarray(bvecs, dtype=y.dtype)), 0.0)
    x = dti_design_matrix(b, g)
    beta = _weighted_lstsq(x, y, None)
    if method == "WLS":
        w = jnp.exp(_mm(beta, x.T))
        beta = _weighted_lstsq(x, y, w)
    return jnp.moveaxis(beta[..., :6], -1, 0)


# --------------------------------------------------------------------------- tumour tensors


def westin_measures(
    eigenvalues: Float[Array, "3 *spatial"],
) -> tuple[Array, Array, Array]:
    """Westin's linear, planar and spherical measures (Westin et al. 2002), trace-normalised.

    For descending eigenvalues l1 >= l2 >= l3 >= 0 and t = l1 + l2 + l3:
    c_l = (l1 - l2) / t, c_p = 2 (l2 - l3) / t, c_s = 3 l3 / t; they lie in [0, 1] and sum
    to 1. A zero tensor gives (0, 0, 1) (spherical).
    """
    l1, l2, l3 = _float(eigenvalues)
    t = l1 + l2 + l3
    ok = t > _tiny(t.dtype)
    t = jnp.where(ok, t, 1.0)
    c_l = jnp.where(ok, (l1 - l2) / t, 0.0)
    c_p = jnp.where(ok, 2.0 * (l2 - l3) / t, 0.0)
    return c_l, c_p, 1.0 - c_l - c_p


def tumour_tensor(
    dti_t6: Float[Array, "6 *spatial"],
    *,
    anisotropy: float | Array,
    method: str = "scaled",
) -> Float[Array, "6 *spatial"]:
    """The dimensionless tumour-growth shape tensor from a DTI tensor field, trace 3.

    Per voxel, from the eigen-decomposition D = sum_k l_k e_k e_k^T (l1 >= l2 >= l3,
    eigenvalues clipped at 0) a tensor T = sum_k mu_k e_k e_k^T is built and normalised to
    trace 3: ``shape = 3 T / trace(T)``. Multiplied by the white-matter diffusivity Dw it
    has the trace 3 Dw of the isotropic white-matter tensor Dw I (trace-preserving: the
    anisotropy redistributes diffusion between directions, it does not add any).

    Methods, with r = ``anisotropy`` >= 1:

    - ``"scaled"`` (Jbabdi et al. 2005, MRM 54:616; the usual tumour-growth "r"): the
      principal eigenvalue is multiplied by r, the others kept: mu = (r l1, l2, l3). The
      ratio principal / second eigenvalue becomes r l1 / l2: r times that of the DTI
      tensor. r = 1 gives the measured tensor normalised to trace 3 (the "normalised DTI"
      construction); an isotropic DTI tensor with r = 1 gives the identity. Where l1 is
      (nearly) repeated, which of the tied directions gets the factor r is the
      eigen-solver's choice.
    - ``"westin"``: the shape is split by Westin's measures (:func:`westin_measures`) into
      its linear, planar and spherical parts, each replaced by an idealised tensor of
      anisotropy r: mu = c_l (r, 1, 1) + c_p (r, r, 1) + c_s (1, 1, 1), i.e.
      mu1 = 1 + (r - 1)(c_l + c_p), mu2 = 1 + (r - 1) c_p, mu3 = 1. A perfectly linear
      tensor gives diag(r, 1, 1) (principal / perpendicular ratio r), a planar one
      diag(r, r, 1), an isotropic one (or r = 1) the identity. Unlike "scaled", it is
      continuous in the tensor and independent of the eigenbasis within repeated
      eigenvalues.

    Voxels whose tensor is non-finite or has trace <= 0 after clipping (no data,
    background) get the identity (isotropic, trace 3).

    Args:
        dti_t6: ``(6, ...)`` DTI tensor field, any unit (only its shape is used).
        anisotropy: r >= 1, dimensionless; a Python float or a JAX scalar (traced values
            are not range-checked).
        method: ``"scaled"`` or ``"westin"``.

    Returns:
        ``(6, ...)`` dimensionless tensor field with trace exactly 3 (to rounding).
    """
    _check_method(method)
    _check_anisotropy(anisotropy)
    vals, vecs, valid = _tumour_eigen(dti_t6, method)
    mu = _tumour_mu(vals, anisotropy, method)
    return _normalised_shape(mu, vecs, valid)


def _check_method(method: str) -> None:
    if method not in _TUMOUR_METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {_TUMOUR_METHODS}")


def _check_anisotropy(anisotropy) -> None:
    if isinstance(anisotropy, int | float | np.number) and not anisotropy >= 1.0:
        raise ValueError(f"anisotropy must be >= 1, got {anisotropy}")


def _tumour_eigen(dti_t6, method: str):
    """Eigen-data the tumour tensor is built from: for "scaled" the clipped eigenvalues,
    for "westin" (c_l, c_p, c_s); the eigenvectors; and the valid-voxel mask."""
    _check_method(method)
    t6 = _check_t6(dti_t6)
    finite = jnp.all(jnp.isfinite(t6), axis=0)
    t6 = jnp.where(finite, t6, 0.0)
    vals, vecs = eigh_field(t6)
    vals = jnp.maximum(vals, 0.0)
    valid = finite & (jnp.sum(vals, axis=0) > _tiny(t6.dtype) * 1e3)
    if method == "westin":
        vals = jnp.stack(westin_measures(vals), axis=0)
    return vals, vecs, valid


def _tumour_mu(vals: Array, anisotropy, method: str) -> Array:
    """The unnormalised eigenvalues mu (3, ...) of the tumour tensor: affine in r."""
    r = jnp.asarray(anisotropy, dtype=vals.dtype)
    if method == "scaled":
        return jnp.stack([r * vals[0], vals[1], vals[2]], axis=0)
    c_l, c_p, _ = vals
    one = jnp.ones_like(c_l)
    return jnp.stack([one + (r - 1.0) * (c_l + c_p), one + (r - 1.0) * c_p, one], axis=0)


def _normalised_shape(mu: Array, vecs: Array, valid: Array) -> Array:
    mu_trace = jnp.sum(mu, axis=0)
    mu = 3.0 * mu / jnp.where(valid, mu_trace, 1.0)
    shape = tensor_from_eigen(mu, vecs)
    eye = jnp.asarray([1.0, 0.0, 0.0, 1.0, 0.0, 1.0], dtype=mu.dtype)
    eye = eye.reshape((6,) + (1,) * (mu.ndim - 1))
    return jnp.where(valid, shape, eye)


class TumourTensorFamily(eqx.Module):
    """`tumour_tensor(dti, r)` for every r in [r_lo, r_hi] from two fixed fields.

    Both constructions have eigenvalues mu(r) affine in r on fixed eigenvectors, so the
    unnormalised tensor is N(r) = (1 - s) N(r_lo) + s N(r_hi), s = (r - r_lo) / (r_hi -
    r_lo), and the trace-3 shape tensor 3 N(r) / tr N(r) is

        shape(r) = a(x, r) shape(r_lo) + (1 - a(x, r)) shape(r_hi),
        a(x, r) = (1 - s) t_lo(x) / ((1 - s) t_lo(x) + s t_hi(x)),   t = tr N,

    a non-negative combination of two fixed trace-3 fields for r in the range (trace
    kept): a solver can decompose `lo` and `hi` once and mix their stencil weights with
    `mixing(r)`, differentiably in r.

    Attributes:
        lo, hi: (6, ...) shape tensors at r_lo and r_hi (trace 3).
        trace_lo, trace_hi: (...) traces of the unnormalised tensors (1 where invalid).
        anisotropy_range: (r_lo, r_hi), r_lo < r_hi.
        method: the construction ("scaled" or "westin").
    """

    lo: Array
    hi: Array
    trace_lo: Array
    trace_hi: Array
    anisotropy_range: tuple[float, float] = eqx.field(static=True)
    method: str = eqx.field(static=True)

    def mixing(self, anisotropy) -> Array:
        """a(x, r), the weight of `lo` (the weight of `hi` is 1 - a); (...)."""
        return family_mixing(self.trace_lo, self.trace_hi, self.anisotropy_range, anisotropy)

    def __call__(self, anisotropy) -> Array:
        """The shape tensor (6, ...) at anisotropy r."""
        a = self.mixing(anisotropy)
        return a * self.lo + (1.0 - a) * self.hi


def family_mixing(trace_lo: Array, trace_hi: Array, anisotropy_range, anisotropy) -> Array:
    """a(x, r) of `TumourTensorFamily` from its traces and range (see there)."""
    r_lo, r_hi = anisotropy_range
    s = (jnp.asarray(anisotropy, trace_lo.dtype) - r_lo) / (r_hi - r_lo)
    low = (1.0 - s) * trace_lo
    return low / (low + s * trace_hi)


def tumour_tensor_family(
    dti_t6: Float[Array, "6 *spatial"],
    anisotropy_range: tuple[float, float],
    *,
    method: str = "scaled",
) -> TumourTensorFamily:
    """The family of `tumour_tensor(dti_t6, anisotropy=r, method=method)` for r in
    `anisotropy_range` (1 <= r_lo < r_hi), eigenvectors computed once."""
    r_lo, r_hi = (float(v) for v in anisotropy_range)
    _check_method(method)
    _check_anisotropy(r_lo)
    if not r_hi > r_lo:
        raise ValueError(f"anisotropy range must have r_lo < r_hi, got {anisotropy_range}")
    vals, vecs, valid = _tumour_eigen(dti_t6, method)
    mus = [_tumour_mu(vals, r, method) for r in (r_lo, r_hi)]
    traces = [jnp.where(valid, jnp.sum(mu, axis=0), 1.0) for mu in mus]
    lo, hi = (_normalised_shape(mu, vecs, valid) for mu in mus)
    return TumourTensorFamily(lo=lo, hi=hi, trace_lo=traces[0], trace_hi=traces[1],
                              anisotropy_range=(r_lo, r_hi), method=method)
