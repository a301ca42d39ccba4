"""Clinical target volumes (CTVs): standard margins, anatomical constraints, density cutoffs.

Pure functions on canonical NumPy arrays; no file I/O. Every mask is a boolean (X, Y, Z)
array (any number of dimensions works), ``spacing`` is the voxel size in mm along each
axis (``Image.spacing``), and distances are measured between voxel centres in mm, so a
"15 mm margin" is 15 mm on any grid, never 15 voxels.

- Standard CTV: Euclidean distance to the tumour core <= margin, inside the brain
  (:func:`standard_ctv`), by ``scipy.ndimage.distance_transform_edt`` (exact).
- Anatomically constrained CTV: the distance is measured along paths that stay inside brain
  tissue (:func:`constrained_ctv`, :func:`geodesic_distance`), in the spirit of Shusharina
  et al., Radiother. Oncol. 2020. Where the straight segment from a voxel to its nearest core
  voxel stays in tissue, the geodesic distance *is* the Euclidean one and the exact value is
  used; elsewhere it is solved by fast marching (scikit-fmm, second order, barriers masked),
  floored at the Euclidean distance. So the constrained CTV differs from the standard one only
  where a barrier intervenes, never by discretisation alone.
- Model CTV: tumour cell density >= cutoff (:func:`model_ctv`); the iso-volumetric cutoff
  matches the volume of a target (usually the standard CTV) within 1 %
  (:func:`isovolumetric_cutoff`).
- Probabilistic CTV: over an ensemble of fitted densities, the fraction of members whose
  iso-volumetric CTV holds a voxel (:func:`ctv_probability`), and the CTV of a target volume
  ranked by that probability (ties by the mean density; :func:`probability_ranked_ctv`).
- Nested families of CTVs for sweeps and coverage curves (:class:`CTVFamily`,
  :func:`margin_family`, :func:`density_family`, :func:`margin_sweep`,
  :func:`cutoff_sweep`).

Distances within ``DISTANCE_TOL_MM`` (1e-6 mm) of the margin count as inside, so float
rounding never decides a voxel exactly on the margin.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import numpy as np
import skfmm
from scipy import ndimage

__all__ = [
    "DISTANCE_TOL_MM",
    "CTVFamily",
    "constrained_ctv",
    "ctv_probability",
    "cutoff_ctvs",
    "cutoff_sweep",
    "density_family",
    "euclidean_distance",
    "geodesic_distance",
    "isovolumetric_cutoff",
    "margin_family",
    "margin_sweep",
    "model_ctv",
    "probability_ranked_ctv",
    "standard_ctv",
]

DISTANCE_TOL_MM = 1e-6
# Densities may overshoot [0, 1] by float rounding within this tolerance.
_DENSITY_TOL = 1e-6


# --------------------------------------------------------------------------- validation


def _as_mask(array, name: str) -> np.ndarray:
    """A boolean array from bool or 0/1 values; anything else is a ValueError."""
    arr = np.asarray(array)
    if arr.dtype == bool:
        return arr
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"{name} must be a boolean mask, got dtype {arr.dtype}")
    mask = arr != 0
    if not np.all((arr == 0) | (arr == 1)):
        raise ValueError(f"{name} must be a boolean mask (values 0/1), got other values")
    return mask


def _check_spacing(spacing, ndim: int) -> tuple[float, ...]:
    sp = tuple(float(s) for s in np.atleast_1d(np.asarray(spacing, dtype=np.float64)))
    if len(sp) != ndim:
        raise ValueError(f"spacing must have {ndim} entries (mm per axis), got {len(sp)}")
    if not all(np.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing must be positive and finite (mm), got {sp}")
    return sp


def _check_margin(margin_mm: float, name: str = "margin_mm") -> float:
    margin = float(margin_mm)
    if not np.isfinite(margin) or margin < 0:
        raise ValueError(f"{name} must be a finite distance >= 0 mm, got {margin_mm!r}")
    return margin


def _check_core(core, name: str = "core") -> np.ndarray:
    core = _as_mask(core, name)
    if core.ndim == 0:
        raise ValueError(f"{name} must be an array, got a scalar")
    if not core.any():
        raise ValueError(
            f"empty {name}: a margin CTV needs at least one tumour-core voxel to grow from"
        )
    return core


def _check_same_shape(**arrays: np.ndarray) -> None:
    shapes = {name: np.shape(a) for name, a in arrays.items()}
    if len(set(shapes.values())) != 1:
        listed = ", ".join(f"{n} {s}" for n, s in shapes.items())
        raise ValueError(f"arrays must share one shape, got {listed}")


def _as_density(density) -> np.ndarray:
    arr = np.asarray(density)
    if arr.dtype.kind not in "iuf" or arr.ndim == 0:
        raise ValueError(f"density must be a real-valued array, got dtype {arr.dtype}")
    if arr.dtype.kind != "f":
        arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise ValueError("density has non-finite values (NaN or inf)")
    if arr.size:
        lo, hi = float(arr.min()), float(arr.max())
        if lo < -_DENSITY_TOL or hi > 1.0 + _DENSITY_TOL:
            raise ValueError(f"density values must lie in [0, 1], found [{lo:g}, {hi:g}]")
    return arr


# --------------------------------------------------------------------------- distances


def _crop(core: np.ndarray, spacing: Sequence[float], reach_mm: float | None):
    """Slices of the bounding box of ``core`` grown by ``reach_mm`` (+1 voxel), clipped."""
    if reach_mm is None:
        return tuple(slice(0, n) for n in core.shape)
    where = np.nonzero(core)
    slices = []
    for axis, (n, s) in enumerate(zip(core.shape, spacing)):
        pad = int(np.ceil(reach_mm / s)) + 1
        lo, hi = int(where[axis].min()), int(where[axis].max())
        slices.append(slice(max(lo - pad, 0), min(hi + pad + 1, n)))
    return tuple(slices)


def euclidean_distance(
    core, spacing, *, max_distance_mm: float | None = None, return_indices: bool = False
):
    """Euclidean distance (mm) from every voxel centre to the nearest core voxel centre.

    Args:
        core: boolean array (X, Y, Z), not empty.
        spacing: voxel size in mm per axis.
        max_distance_mm: if given, only a box around the core that holds every voxel within
            this distance is computed (faster); voxels outside it get ``inf``.
        return_indices: also return the (ndim, X, Y, Z) indices of each voxel's nearest
            core voxel (-1 outside the computed box).

    Returns:
        float64 distances of ``core.shape`` (0 on the core), and the indices if asked.
    """
    core = _check_core(core)
    sp = _check_spacing(spacing, core.ndim)
    if max_distance_mm is not None:
        max_distance_mm = _check_margin(max_distance_mm, "max_distance_mm")
    box = _crop(core, sp, max_distance_mm)
    out = np.full(core.shape, np.inf)
    result = ndimage.distance_transform_edt(~core[box], sampling=sp, return_indices=return_indices)
    if not return_indices:
        out[box] = result
        return out
    dist, idx = result
    out[box] = dist
    indices = np.full((core.ndim, *core.shape), -1, dtype=np.intp)
    for axis, sl in enumerate(box):
        indices[(axis, *box)] = idx[axis] + sl.start
    return out, indices


def standard_ctv(core, brain, spacing, margin_mm: float = 15.0) -> np.ndarray:
    """The standard margin CTV: within ``margin_mm`` (Euclidean, mm) of the core, in the brain.

    Args:
        core: boolean (X, Y, Z) tumour core (necrosis + enhancing), not empty.
        brain: boolean (X, Y, Z) brain mask.
        spacing: voxel size in mm per axis.
        margin_mm: margin in mm (default 15).

    Returns:
        bool (X, Y, Z): voxels whose centre lies within ``margin_mm`` (+1e-6 mm) of a core
        voxel centre and inside ``brain``, plus the core itself.

    Raises:
        ValueError: empty core, shape mismatch, bad spacing or margin.
    """
    core = _check_core(core)
    brain = _as_mask(brain, "brain")
    _check_same_shape(core=core, brain=brain)
    margin = _check_margin(margin_mm)
    dist = euclidean_distance(core, spacing, max_distance_mm=margin)
    return ((dist <= margin + DISTANCE_TOL_MM) & brain) | core


def _line_of_sight(points: np.ndarray, targets: np.ndarray, domain: np.ndarray) -> np.ndarray:
    """Whether the straight segment between each point and its target stays in ``domain``.

    ``points`` and ``targets`` are (N, ndim) voxel indices. The segment is sampled at steps
    of at most half a voxel along every axis and each sample is rounded to its voxel, so a
    barrier at least one voxel thick (face-connected) cannot be jumped.
    """
    n = len(points)
    visible = np.ones(n, dtype=bool)
    if n == 0:
        return visible
    delta = (targets - points).astype(np.float64)
    steps = int(np.ceil(2.0 * np.abs(delta).max()))
    alive = np.arange(n)
    for k in range(1, steps):
        t = k / steps
        sample = np.rint(points[alive] + t * delta[alive]).astype(np.intp)
        inside = domain[tuple(sample.T)]
        visible[alive[~inside]] = False
        alive = alive[inside]
        if alive.size == 0:
            break
    return visible


def _fast_marching_distance(
    core: np.ndarray, domain: np.ndarray, spacing: Sequence[float], max_distance_mm: float
) -> np.ndarray:
    """Fast-marching (scikit-fmm, 2nd order) distance (mm) from core voxel centres, inside
    ``domain`` only; ``inf`` outside the domain, where unreachable, or beyond
    ``max_distance_mm`` (+2 voxels)."""

    phi = np.where(core, 0.0, 1.0)  # exact zeros: the core voxel centres are the front
    barrier = ~(domain | core)
    band = max_distance_mm + 2.0 * max(spacing)
    dist = skfmm.distance(np.ma.MaskedArray(phi, barrier), dx=list(spacing), narrow=band)
    return np.ma.filled(np.ma.asarray(dist, dtype=np.float64), np.inf)


def geodesic_distance(
    core,
    tissue_domain,
    spacing,
    *,
    max_distance_mm: float,
) -> np.ndarray:
    """Shortest distance (mm) from the core along paths that stay inside ``tissue_domain``.

    Voxels outside ``tissue_domain`` (CSF, falx, skull, outside the head) are barriers; the
    core itself always counts as traversable. Where the straight segment from a voxel to its
    nearest core voxel stays in the domain (line of sight, sampled every half voxel), the
    geodesic distance equals the Euclidean one and the exact EDT value is returned; elsewhere
    the fast-marching solution (scikit-fmm, second order) floored at the Euclidean distance
    (a path is never shorter than the straight line). Fast marching is accurate to about a
    voxel (it overestimates near point-like sources and underestimates by up to ~0.6 voxel
    elsewhere); barriers should be at least one voxel thick and face-connected.

    Args:
        core: boolean (X, Y, Z), not empty.
        tissue_domain: boolean (X, Y, Z), where paths may run.
        spacing: voxel size in mm per axis.
        max_distance_mm: distances are computed up to here (mm); farther voxels get ``inf``.

    Returns:
        float64 (X, Y, Z): distance in mm; 0 on the core, ``inf`` outside the domain, where
        unreachable, or beyond ``max_distance_mm``.
    """
    core = _check_core(core)
    domain = _as_mask(tissue_domain, "tissue_domain")
    _check_same_shape(core=core, tissue_domain=domain)
    sp = _check_spacing(spacing, core.ndim)
    reach = _check_margin(max_distance_mm, "max_distance_mm")
    box = _crop(core, sp, reach)
    core_b = core[box]
    domain_b = domain[box] | core_b
    euclid, nearest = ndimage.distance_transform_edt(~core_b, sampling=sp, return_indices=True)
    geo = np.full(core_b.shape, np.inf)
    geo[core_b] = 0.0
    candidates = domain_b & ~core_b & (euclid <= reach + DISTANCE_TOL_MM)
    points = np.argwhere(candidates)
    targets = nearest[(slice(None), *points.T)].T
    visible = _line_of_sight(points, targets, domain_b)
    seen = tuple(points[visible].T)
    geo[seen] = euclid[seen]
    if not visible.all():
        hidden = tuple(points[~visible].T)
        marched = _fast_marching_distance(core_b, domain_b, sp, reach)
        value = np.maximum(marched[hidden], euclid[hidden])
        geo[hidden] = np.where(value <= reach + DISTANCE_TOL_MM, value, np.inf)
    out = np.full(core.shape, np.inf)
    out[box] = geo
    return out


def constrained_ctv(core, tissue_domain, spacing, margin_mm: float = 15.0) -> np.ndarray:
    """The anatomically constrained CTV: within ``margin_mm`` of the core along tissue paths.

    The distance is :func:`geodesic_distance`: paths cannot cross voxels outside
    ``tissue_domain`` (CSF, falx, skull: pass e.g. the white + grey matter mask). As a
    geodesic distance is never shorter than the Euclidean one, the result is a subset of
    ``standard_ctv(core, brain, spacing, margin_mm)`` for any ``brain`` containing
    ``tissue_domain``, and equal to ``standard_ctv(core, tissue_domain, ...)`` when the
    domain is convex (exactly: line-of-sight voxels use the exact Euclidean distance).

    Args:
        core: boolean (X, Y, Z) tumour core, not empty.
        tissue_domain: boolean (X, Y, Z), brain tissue paths may run through.
        spacing: voxel size in mm per axis.
        margin_mm: margin in mm (default 15).

    Returns:
        bool (X, Y, Z): the core plus the domain voxels within ``margin_mm`` along tissue.
    """
    margin = _check_margin(margin_mm)
    geo = geodesic_distance(core, tissue_domain, spacing, max_distance_mm=margin)
    return geo <= margin + DISTANCE_TOL_MM


# --------------------------------------------------------------------------- density CTVs


def model_ctv(density, cutoff: float) -> np.ndarray:
    """The model CTV: voxels whose tumour cell density (in [0, 1], any float dtype) is
    >= ``cutoff``. Returns bool of ``density.shape``."""
    arr = _as_density(density)
    cutoff = float(cutoff)
    if not np.isfinite(cutoff):
        raise ValueError(f"cutoff must be finite, got {cutoff!r}")
    return arr >= cutoff


def _target_voxels(target, shape: tuple[int, ...]) -> int:
    if np.ndim(target) == 0:
        value = float(target)
        if not value.is_integer() or value < 1:
            raise ValueError(f"target volume must be a positive number of voxels, got {target!r}")
        return int(value)
    mask = _as_mask(target, "target mask")
    if mask.shape != shape:
        raise ValueError(f"target mask {mask.shape} and density {shape} differ in shape")
    count = int(mask.sum())
    if count == 0:
        raise ValueError("target mask is empty: there is no volume to match")
    return count


def isovolumetric_cutoff(
    density, target, *, rtol: float = 0.01
) -> tuple[float, np.ndarray]:
    """The density cutoff whose model CTV has the target's volume within ``rtol``.

    Volumes are voxel counts on the density's grid. The cutoff is searched by bisection
    (``searchsorted``) on the sorted positive densities: of the two cutoffs whose volumes
    bracket the target (ties and plateaus make volumes jump), the closer one is taken (the
    larger volume on a tie). Cutoffs are in (0, 1]: a model CTV contains only voxels with
    density > 0.

    Args:
        density: float array in [0, 1].
        target: number of voxels, or a boolean mask (e.g. the standard CTV) of the same
            shape whose voxel count is matched.
        rtol: allowed relative volume difference (default 1 %).

    Returns:
        (cutoff, mask): the cutoff and ``density >= cutoff``.

    Raises:
        ValueError: no cutoff comes within ``rtol`` (the message gives the nearest
            achievable volumes and the achievable range), or bad inputs.
    """
    arr = _as_density(density)
    goal = _target_voxels(target, arr.shape)
    rtol = float(rtol)
    if not (np.isfinite(rtol) and rtol >= 0):
        raise ValueError(f"rtol must be >= 0, got {rtol!r}")
    values = np.sort(arr[arr > 0], axis=None)
    n = values.size
    if n == 0:
        raise ValueError("density is zero everywhere: no model CTV has a positive volume")
    # Smallest cutoff with volume >= goal (if any), and the next distinct value above it.
    options = []
    c_ge = values[max(n - goal, 0)]
    v_ge = n - int(np.searchsorted(values, c_ge, side="left"))
    options.append((c_ge, v_ge))
    above = int(np.searchsorted(values, c_ge, side="right"))
    if above < n:
        options.append((values[above], n - above))
    cutoff, volume = min(options, key=lambda o: (abs(o[1] - goal), -o[1]))
    if abs(volume - goal) > rtol * goal:
        low = [v for _, v in options if v < goal]
        high = [v for _, v in options if v >= goal]
        nearest = ", ".join(
            f"{v} voxels (cutoff {c:.6g})" for c, v in sorted(options, key=lambda o: o[1])
        )
        min_volume = n - int(np.searchsorted(values, values[-1], side="left"))
        reason = ""
        if goal > n:
            reason = f"; the density support (density > 0) has only {n} voxels"
        elif low and high:
            reason = "; the density has a plateau (tied values) across the target"
        raise ValueError(
            f"no cutoff in (0, 1] gives a model CTV within {rtol:.2%} of the target "
            f"{goal} voxels: the nearest achievable volumes are {nearest}; achievable "
            f"range [{min_volume}, {n}] voxels{reason}"
        )
    cutoff = float(cutoff)
    return cutoff, arr >= cutoff


# --------------------------------------------------------------------------- ensembles


def ctv_probability(densities, target, *, inside=None, rtol: float = 0.01) -> tuple[np.ndarray, list[float]]:
    """Per-voxel probability of belonging to the CTV over an ensemble of densities.

    Each member's iso-volumetric CTV (:func:`isovolumetric_cutoff` against ``target``,
    restricted to ``inside`` when given) is one vote; the probability is the fraction of
    members whose CTV holds the voxel.

    Args:
        densities: (members, X, Y, Z) densities in [0, 1] (or a sequence of them).
        target: the volume to match: a voxel count or a boolean mask (the standard CTV).
        inside: optional boolean mask (the brain) outside which no CTV reaches.
        rtol: volume tolerance of each member's cutoff.

    Returns:
        (probability float32 (X, Y, Z) in [0, 1] with values k / members, the members'
        cutoffs).
    """
    stack = [_as_density(d) for d in densities]
    if not stack:
        raise ValueError("ctv_probability needs at least one density")
    votes = np.zeros(stack[0].shape, np.int32)
    cutoffs = []
    keep = None if inside is None else _as_mask(inside, "inside")
    for density in stack:
        if density.shape != stack[0].shape:
            raise ValueError(f"member densities differ in shape: {density.shape} vs {stack[0].shape}")
        if keep is not None:
            density = np.where(keep, density, 0.0)
        cutoff, ctv = isovolumetric_cutoff(density, target, rtol=rtol)
        votes += ctv
        cutoffs.append(cutoff)
    return (votes / len(stack)).astype(np.float32), cutoffs


def probability_ranked_ctv(probability, mean_density, target) -> np.ndarray:
    """The CTV of exactly the target's voxel count holding the most probable voxels
    (ties broken by the mean density, then by voxel order): the probabilistic CTV at equal
    volume. Returns bool of ``probability.shape``."""
    probability = np.asarray(probability, np.float64)
    mean_density = _as_density(mean_density)
    if probability.shape != mean_density.shape:
        raise ValueError(f"probability {probability.shape} and mean density {mean_density.shape} differ")
    goal = _target_voxels(target, probability.shape)
    if goal > probability.size:
        raise ValueError(f"target {goal} voxels exceeds the grid ({probability.size} voxels)")
    order = np.lexsort((-mean_density.ravel(), -probability.ravel()))
    out = np.zeros(probability.size, bool)
    out[order[:goal]] = True
    return out.reshape(probability.shape)


# --------------------------------------------------------------------------- families


@dataclass(frozen=True, eq=False)
class CTVFamily:
    """A nested one-parameter family of CTVs defined by thresholding one field.

    ``kind="margin"``: CTV(p) = ``field <= p`` (+1e-6), p a margin in mm, growing with p.
    ``kind="cutoff"``: CTV(p) = ``field >= p``, p a density cutoff, shrinking as p grows.

    Attributes:
        name: a label for tables and plots, e.g. ``"standard"`` or ``"model"``.
        kind: ``"margin"`` or ``"cutoff"``.
        field: float array (X, Y, Z); ``inf`` never enters a margin CTV; a cutoff CTV
            only holds voxels with ``field > 0``.
        unit: the unit of the parameter (``"mm"`` or ``"density"``).
    """

    name: str
    kind: Literal["margin", "cutoff"]
    field: np.ndarray
    unit: str

    def __post_init__(self) -> None:
        if self.kind not in ("margin", "cutoff"):
            raise ValueError(f"kind must be 'margin' or 'cutoff', got {self.kind!r}")
        object.__setattr__(self, "field", np.asarray(self.field, dtype=np.float64))

    @property
    def shape(self) -> tuple[int, ...]:
        return self.field.shape

    def mask(self, parameter: float) -> np.ndarray:
        """The CTV (bool, ``self.shape``) at one margin (mm) or cutoff."""
        p = float(parameter)
        if self.kind == "margin":
            return self.field <= p + DISTANCE_TOL_MM
        return (self.field >= p) & (self.field > 0)

    @cached_property
    def _sorted(self) -> np.ndarray:
        return self._sorted_values(np.ones(self.shape, dtype=bool))

    def _sorted_values(self, where: np.ndarray) -> np.ndarray:
        values = self.field[where]
        values = values[np.isfinite(values)] if self.kind == "margin" else values[values > 0]
        return np.sort(values)

    def _count(self, values: np.ndarray, parameters) -> np.ndarray:
        p = np.asarray(parameters, dtype=np.float64)
        if self.kind == "margin":
            return np.searchsorted(values, p + DISTANCE_TOL_MM, side="right").astype(np.int64)
        return (values.size - np.searchsorted(values, p, side="left")).astype(np.int64)

    def volumes(self, parameters) -> np.ndarray:
        """Voxel counts (int64, shape of ``parameters``) of the CTVs at ``parameters``."""
        return self._count(self._sorted, parameters)

    def counts_within(self, selection, parameters) -> np.ndarray:
        """Voxel counts of ``CTV(p) & selection`` (int64) for each parameter."""
        selection = _as_mask(selection, "selection")
        _check_same_shape(field=self.field, selection=selection)
        return self._count(self._sorted_values(selection), parameters)

    def breakpoints(self, selection) -> np.ndarray:
        """The parameters at which ``CTV(p) & selection`` changes, sorted so that the CTV
        grows (ascending margins, descending cutoffs): the exact knots of a coverage curve."""
        selection = _as_mask(selection, "selection")
        _check_same_shape(field=self.field, selection=selection)
        values = np.unique(self._sorted_values(selection))
        return values if self.kind == "margin" else values[::-1]


def margin_family(
    core, brain, spacing, *, max_margin_mm: float | None = None, name: str = "standard"
) -> CTVFamily:
    """Standard CTVs for all margins: field = Euclidean distance (mm) to the core inside the
    brain, ``inf`` outside it, 0 on the core. ``family.mask(m) == standard_ctv(..., m)``.
    With ``max_margin_mm`` only margins up to it are valid (a cropped, faster transform)."""
    core = _check_core(core)
    brain = _as_mask(brain, "brain")
    _check_same_shape(core=core, brain=brain)
    dist = euclidean_distance(core, spacing, max_distance_mm=max_margin_mm)
    field = np.where(brain | core, dist, np.inf)
    return CTVFamily(name=name, kind="margin", field=field, unit="mm")


def density_family(density, *, name: str = "model") -> CTVFamily:
    """Model CTVs for all cutoffs in (0, 1]: ``family.mask(c) == model_ctv(density, c)``
    for c > 0."""
    return CTVFamily(name=name, kind="cutoff", field=_as_density(density), unit="density")


def margin_sweep(core, brain, spacing, margins_mm) -> np.ndarray:
    """Voxel counts (int64) of the standard CTV at each margin in ``margins_mm`` (mm)."""
    margins = np.asarray(margins_mm, dtype=np.float64)
    if margins.size and (not np.isfinite(margins).all() or margins.min() < 0):
        raise ValueError("margins_mm must be finite distances >= 0 mm")
    reach = float(margins.max()) if margins.size else 0.0
    return margin_family(core, brain, spacing, max_margin_mm=reach).volumes(margins)


def cutoff_ctvs(density, brain, cutoffs) -> dict[float, np.ndarray]:
    """Cutoff CTVs ``{c: density >= c inside the boolean brain}`` (X, Y, Z bool) for each
    cutoff c (Metz et al.: fixed density thresholds instead of a fixed volume)."""
    inside = np.where(np.asarray(brain, bool), np.asarray(density), 0)
    return {float(c): inside >= c for c in cutoffs}


def cutoff_sweep(density, cutoffs) -> np.ndarray:
    """Voxel counts (int64) of the model CTV ``density >= c`` for each cutoff c > 0."""
    c = np.asarray(cutoffs, dtype=np.float64)
    if c.size and (not np.isfinite(c).all() or c.min() <= 0):
        raise ValueError("cutoffs must be finite and > 0 (a model CTV needs density > 0)")
    return density_family(density).volumes(c)
