"""Segmentation metrics in the field's usual definitions, in mm with the voxel spacing.

All functions take a prediction ``pred`` and a reference ``ref`` of one shape, boolean or
0/1 arrays (any other value is a ``ValueError``), and return a Python ``float``.
Surface-distance metrics need 3-D arrays (X, Y, Z) and the voxel ``spacing`` in mm, a
length-3 sequence of finite positive numbers (e.g. :attr:`rtjax.io.Image.spacing`).

Overlap (TP = |pred & ref|):

- Dice = 2 TP / (|pred| + |ref|), Jaccard = TP / |pred | ref|,
- precision = TP / |pred| (positive predictive value), recall = TP / |ref| (sensitivity).

Surfaces and distances (the definitions of medpy >= 0.5 and of panoptica's HD/HD95):

- The surface of a mask is its border voxels: the mask minus its binary erosion by the
  3-D **6-connectivity** (face-neighbour) structure, ``generate_binary_structure(3, 1)``;
  voxels outside the array count as background, so a mask touching the array edge has its
  edge voxels on the surface.
- The directed surface distances from pred to ref are, for each pred border voxel, the
  Euclidean distance in mm (``distance_transform_edt(sampling=spacing)``) from its centre
  to the centre of the nearest ref border voxel; likewise from ref to pred. The two sets
  are pooled into the *symmetric* surface distances.
- ``hausdorff`` (HD): the maximum of the pooled distances (= the larger directed maximum).
- ``hausdorff95`` (HD95): the **95th percentile of the pooled symmetric surface
  distances** (``numpy.percentile``, linear interpolation), as ``medpy.metric.binary.hd95``
  and panoptica compute it. DeepMind's ``surface-distance`` package instead takes the larger
  of the two directed 95th percentiles, weighted by surface-element area; the two values
  differ slightly on irregular shapes.
- ``mean_surface_distance`` (ASSD, Heimann et al. 2009): the mean of the pooled distances,
  (sum of pred->ref distances + sum of ref->pred distances) / (number of pred border voxels
  + number of ref border voxels), as ``medpy.metric.binary.assd`` (medpy >= 0.5).
  panoptica's ASSD is the mean of the two directed means, which differs when the two
  surfaces have different voxel counts.
- ``surface_dice`` (normalised surface Dice, Nikolov et al. 2021) at a tolerance tau in mm:
  the fraction of the pooled border voxels whose distance to the other surface is
  <= tau. Border voxels are counted, not surface-element areas as in ``surface-distance``.

Empty-mask policy (applied by every function; "empty" means no True voxel):

=====================  ==============  ===========================================
case                   overlap         distances (HD, HD95, mean)   surface Dice
=====================  ==============  ===========================================
both empty             all 1.0         0.0                          1.0
exactly one empty      all 0.0         +inf                         0.0
=====================  ==============  ===========================================

Both empty is a perfect answer (BraTS 2023's rule: Dice 1, HD95 0). Exactly one empty is a
total miss or a pure false positive: Dice and Jaccard are 0 by their formulas; precision
with an empty prediction and recall with an empty reference are 0/0 and are *defined* as 0
(scikit-learn's ``zero_division=0``); the other of the two is 0 by its formula. Distances
to a surface that does not exist are ``inf`` (panoptica's default), never NaN; BraTS
challenge tables instead cap them at the image diagonal (373.13 mm in BraTS space), which a
caller can do with ``min(value, cap)``.

Masks are cropped internally to the bounding box of pred | ref plus a one-voxel margin
before the erosion and distance transform; this leaves every result bit-identical (the
erosion sees the same neighbourhoods and the nearest border voxel always lies in the box)
and makes the metrics of a small tumour in a 240x240x155 volume fast.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from scipy.ndimage import binary_erosion, distance_transform_edt, generate_binary_structure

from rtjax.labels import TumourMasks

__all__ = [
    "METRIC_NAMES",
    "REGIONS",
    "SurfaceDistances",
    "binary_metrics",
    "dice",
    "hausdorff",
    "hausdorff95",
    "jaccard",
    "mean_surface_distance",
    "precision",
    "recall",
    "region_metrics",
    "surface_dice",
    "surface_distances",
]

#: BraTS evaluation regions, in the order :func:`region_metrics` reports them.
REGIONS: tuple[str, ...] = ("WT", "TC", "ET")

#: Keys of the dict returned by :func:`binary_metrics` (distances in mm).
METRIC_NAMES: tuple[str, ...] = (
    "dice",
    "jaccard",
    "precision",
    "recall",
    "hausdorff",
    "hausdorff95",
    "mean_surface_distance",
    "surface_dice",
)

# Face-neighbour (6-connectivity) structuring element for the border extraction.
_STRUCTURE = generate_binary_structure(3, 1)
# The percentile that defines HD95.
_HD_PERCENTILE = 95.0


# --------------------------------------------------------------------------- validation


def _as_mask(array: np.ndarray, name: str) -> np.ndarray:
    """``array`` as a bool array; ValueError unless it is boolean or holds only 0 and 1."""
    arr = np.asarray(array)
    if arr.dtype == bool:
        return arr
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"{name} must be a boolean or 0/1 array, got dtype {arr.dtype}")
    bad = (arr != 0) & (arr != 1)
    if bad.any():
        examples = ", ".join(f"{v:g}" for v in np.unique(arr[bad])[:5])
        raise ValueError(
            f"{name} must be a boolean or 0/1 array, found {int(bad.sum())} voxels with "
            f"other values (e.g. {examples})"
        )
    return arr != 0


def _masks(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validated boolean (pred, ref) of one shape."""
    p, r = _as_mask(pred, "pred"), _as_mask(ref, "ref")
    if p.shape != r.shape:
        raise ValueError(f"pred and ref must have the same shape, got {p.shape} and {r.shape}")
    return p, r


def _spacing(spacing: Sequence[float]) -> np.ndarray:
    """Voxel spacing as a float64 (3,) array of finite positive mm; ValueError otherwise."""
    try:
        arr = np.asarray(spacing, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"spacing must be 3 positive numbers in mm, got {spacing!r}") from err
    if arr.shape != (3,) or not np.isfinite(arr).all() or (arr <= 0).any():
        raise ValueError(f"spacing must be 3 finite positive numbers in mm, got {spacing!r}")
    return arr


def _tolerance(tolerance_mm: float) -> float:
    tol = float(tolerance_mm)
    if not math.isfinite(tol) or tol < 0:
        raise ValueError(f"tolerance_mm must be a finite number >= 0, got {tolerance_mm!r}")
    return tol


# --------------------------------------------------------------------------- overlap


def _counts(pred: np.ndarray, ref: np.ndarray) -> tuple[int, int, int]:
    """(TP, |pred|, |ref|) of validated masks."""
    p, r = _masks(pred, ref)
    return int(np.count_nonzero(p & r)), int(np.count_nonzero(p)), int(np.count_nonzero(r))


def _ratio(num: int, den: int, both_empty: bool) -> float:
    """num / den with the empty-mask policy: 1.0 if both masks are empty, 0.0 if den == 0."""
    if both_empty:
        return 1.0
    return num / den if den else 0.0


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice coefficient 2 |pred & ref| / (|pred| + |ref|), in [0, 1].

    Args:
        pred, ref: boolean or 0/1 arrays of one shape (any number of dimensions).

    Returns 1.0 when both are empty, 0.0 when exactly one is.
    """
    tp, n_pred, n_ref = _counts(pred, ref)
    return _ratio(2 * tp, n_pred + n_ref, n_pred + n_ref == 0)


def jaccard(pred: np.ndarray, ref: np.ndarray) -> float:
    """Jaccard index (IoU) |pred & ref| / |pred | ref|, in [0, 1].

    Args:
        pred, ref: boolean or 0/1 arrays of one shape (any number of dimensions).

    Returns 1.0 when both are empty, 0.0 when exactly one is.
    """
    tp, n_pred, n_ref = _counts(pred, ref)
    return _ratio(tp, n_pred + n_ref - tp, n_pred + n_ref == 0)


def precision(pred: np.ndarray, ref: np.ndarray) -> float:
    """Precision (positive predictive value) |pred & ref| / |pred|, in [0, 1].

    Args:
        pred, ref: boolean or 0/1 arrays of one shape (any number of dimensions).

    Returns 1.0 when both are empty, 0.0 when exactly one is (an empty prediction of a
    non-empty reference scores 0, not 0/0).
    """
    tp, n_pred, n_ref = _counts(pred, ref)
    return _ratio(tp, n_pred, n_pred + n_ref == 0)


def recall(pred: np.ndarray, ref: np.ndarray) -> float:
    """Recall (sensitivity) |pred & ref| / |ref|, in [0, 1].

    Args:
        pred, ref: boolean or 0/1 arrays of one shape (any number of dimensions).

    Returns 1.0 when both are empty, 0.0 when exactly one is (a non-empty prediction of an
    empty reference scores 0, not 0/0).
    """
    tp, n_pred, n_ref = _counts(pred, ref)
    return _ratio(tp, n_ref, n_pred + n_ref == 0)


# --------------------------------------------------------------------------- surfaces


class SurfaceDistances(NamedTuple):
    """Directed surface distances in mm, one per border voxel (C order of the crop).

    Attributes:
        pred_to_ref: (n_pred_border,) distance of each pred border voxel to the ref surface.
        ref_to_pred: (n_ref_border,) distance of each ref border voxel to the pred surface.

    When exactly one mask is empty its own array is empty and the other array is all
    ``inf``; when both are empty both arrays are empty.
    """

    pred_to_ref: np.ndarray
    ref_to_pred: np.ndarray

    @property
    def pooled(self) -> np.ndarray:
        """(n_pred_border + n_ref_border,) symmetric surface distances in mm."""
        return np.concatenate([self.pred_to_ref, self.ref_to_pred])

    @property
    def both_empty(self) -> bool:
        return self.pred_to_ref.size == 0 and self.ref_to_pred.size == 0

    @property
    def one_empty(self) -> bool:
        return (self.pred_to_ref.size == 0) != (self.ref_to_pred.size == 0)


def _crop_box(union: np.ndarray, margin: int = 1) -> tuple[slice, ...]:
    """Slices of the bounding box of ``union`` grown by ``margin`` voxels, clipped to it."""
    box = []
    for axis in range(union.ndim):
        others = tuple(a for a in range(union.ndim) if a != axis)
        hits = np.flatnonzero(union.any(axis=others))
        lo = max(int(hits[0]) - margin, 0)
        hi = min(int(hits[-1]) + 1 + margin, union.shape[axis])
        box.append(slice(lo, hi))
    return tuple(box)


def _border(mask: np.ndarray) -> np.ndarray:
    """Border voxels: ``mask`` minus its 6-connectivity erosion (outside = background)."""
    return mask & ~binary_erosion(mask, structure=_STRUCTURE, border_value=0)


def surface_distances(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]
) -> SurfaceDistances:
    """The directed surface distances between the borders of two 3-D masks, in mm.

    Args:
        pred, ref: (X, Y, Z) boolean or 0/1 arrays of one shape.
        spacing: (3,) voxel sizes in mm along the array axes.

    Returns:
        :class:`SurfaceDistances` (``pred_to_ref``, ``ref_to_pred``), float64 mm; see the
        module docstring for the border definition and the empty-mask cases.

    Raises:
        ValueError: masks not boolean/0-1, of different shapes or not 3-D; bad spacing.
    """
    p, r = _masks(pred, ref)
    sampling = _spacing(spacing)
    if p.ndim != 3:
        raise ValueError(f"surface metrics need 3-D masks, got shape {p.shape}")
    empty = np.zeros(0, dtype=np.float64)
    has_p, has_r = bool(p.any()), bool(r.any())
    if not (has_p or has_r):
        return SurfaceDistances(empty, empty.copy())
    box = _crop_box(p | r)
    p, r = p[box], r[box]
    p_border, r_border = _border(p), _border(r)
    if not has_r:
        return SurfaceDistances(np.full(int(p_border.sum()), np.inf), empty)
    if not has_p:
        return SurfaceDistances(empty, np.full(int(r_border.sum()), np.inf))
    to_ref = distance_transform_edt(~r_border, sampling=sampling)[p_border]
    to_pred = distance_transform_edt(~p_border, sampling=sampling)[r_border]
    return SurfaceDistances(to_ref.astype(np.float64), to_pred.astype(np.float64))


def _hausdorff(sd: SurfaceDistances) -> float:
    if sd.both_empty:
        return 0.0
    if sd.one_empty:
        return math.inf
    return float(max(sd.pred_to_ref.max(), sd.ref_to_pred.max()))


def _hausdorff95(sd: SurfaceDistances) -> float:
    if sd.both_empty:
        return 0.0
    if sd.one_empty:
        return math.inf
    return float(np.percentile(sd.pooled, _HD_PERCENTILE))


def _mean_surface_distance(sd: SurfaceDistances) -> float:
    if sd.both_empty:
        return 0.0
    if sd.one_empty:
        return math.inf
    total = float(sd.pred_to_ref.sum()) + float(sd.ref_to_pred.sum())
    return total / (sd.pred_to_ref.size + sd.ref_to_pred.size)


def _surface_dice(sd: SurfaceDistances, tolerance_mm: float) -> float:
    if sd.both_empty:
        return 1.0
    if sd.one_empty:
        return 0.0
    within = np.count_nonzero(sd.pred_to_ref <= tolerance_mm) + np.count_nonzero(
        sd.ref_to_pred <= tolerance_mm
    )
    return int(within) / (sd.pred_to_ref.size + sd.ref_to_pred.size)


def hausdorff(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> float:
    """Hausdorff distance in mm: the largest symmetric surface distance.

    Args:
        pred, ref: (X, Y, Z) boolean or 0/1 arrays of one shape.
        spacing: (3,) voxel sizes in mm.

    Returns 0.0 when both are empty, ``inf`` when exactly one is.
    """
    return _hausdorff(surface_distances(pred, ref, spacing))


def hausdorff95(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> float:
    """HD95 in mm: the 95th percentile of the pooled symmetric surface distances.

    This is ``medpy.metric.binary.hd95`` (and panoptica's HD95): the distances from pred's
    border to ref's and from ref's to pred's are pooled, then ``numpy.percentile(., 95)``
    with linear interpolation. Not the larger of the two directed 95th percentiles.

    Args:
        pred, ref: (X, Y, Z) boolean or 0/1 arrays of one shape.
        spacing: (3,) voxel sizes in mm.

    Returns 0.0 when both are empty, ``inf`` when exactly one is.
    """
    return _hausdorff95(surface_distances(pred, ref, spacing))


def mean_surface_distance(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> float:
    """Average symmetric surface distance (ASSD) in mm: the mean of the pooled distances.

    (sum over pred border of d(., ref surface) + sum over ref border of d(., pred surface))
    / (number of pred border voxels + number of ref border voxels), as
    ``medpy.metric.binary.assd``.

    Args:
        pred, ref: (X, Y, Z) boolean or 0/1 arrays of one shape.
        spacing: (3,) voxel sizes in mm.

    Returns 0.0 when both are empty, ``inf`` when exactly one is.
    """
    return _mean_surface_distance(surface_distances(pred, ref, spacing))


def surface_dice(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], tolerance_mm: float
) -> float:
    """Normalised surface Dice at ``tolerance_mm``, in [0, 1].

    The fraction of all border voxels (of pred and of ref together) that lie within
    ``tolerance_mm`` (inclusive) of the other mask's surface.

    Args:
        pred, ref: (X, Y, Z) boolean or 0/1 arrays of one shape.
        spacing: (3,) voxel sizes in mm.
        tolerance_mm: finite tolerance >= 0, in mm.

    Returns 1.0 when both are empty, 0.0 when exactly one is.
    """
    tol = _tolerance(tolerance_mm)
    return _surface_dice(surface_distances(pred, ref, spacing), tol)


# --------------------------------------------------------------------------- all at once


def binary_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float],
    *,
    tolerance_mm: float = 1.0,
) -> dict[str, float]:
    """Every metric of one pair of 3-D masks, with one surface-distance computation.

    Args:
        pred, ref: (X, Y, Z) boolean or 0/1 arrays of one shape.
        spacing: (3,) voxel sizes in mm.
        tolerance_mm: surface Dice tolerance in mm.

    Returns:
        ``{name: value}`` for each name in :data:`METRIC_NAMES`; distances in mm.
    """
    tol = _tolerance(tolerance_mm)
    p, r = _masks(pred, ref)
    sd = surface_distances(p, r, spacing)
    return {
        "dice": dice(p, r),
        "jaccard": jaccard(p, r),
        "precision": precision(p, r),
        "recall": recall(p, r),
        "hausdorff": _hausdorff(sd),
        "hausdorff95": _hausdorff95(sd),
        "mean_surface_distance": _mean_surface_distance(sd),
        "surface_dice": _surface_dice(sd, tol),
    }


def _regions(masks: TumourMasks) -> dict[str, np.ndarray]:
    return {"WT": masks.whole, "TC": masks.core, "ET": masks.enhancing}


def region_metrics(
    pred: TumourMasks,
    ref: TumourMasks,
    spacing: Sequence[float],
    *,
    tolerance_mm: float = 1.0,
) -> dict[str, dict[str, float]]:
    """Metrics per BraTS region: WT (whole tumour = core + edema), TC (tumour core =
    necrosis + enhancing) and ET (enhancing tumour).

    Args:
        pred, ref: tumour masks of one (X, Y, Z) shape.
        spacing: (3,) voxel sizes in mm.
        tolerance_mm: surface Dice tolerance in mm.

    Returns:
        ``{region: {metric: value}}`` for regions :data:`REGIONS` and metrics
        :data:`METRIC_NAMES` (see :func:`binary_metrics`); the empty-mask policy applies
        per region (e.g. a case with no enhancing tumour in either has ET Dice 1.0).

    Raises:
        ValueError: not TumourMasks, different shapes, bad spacing or tolerance.
    """
    for name, masks in (("pred", pred), ("ref", ref)):
        if not isinstance(masks, TumourMasks):
            raise ValueError(f"{name} must be TumourMasks, got {type(masks).__name__}")
    if pred.shape != ref.shape:
        raise ValueError(
            f"pred and ref tumour masks must have the same shape, got {pred.shape} and "
            f"{ref.shape}"
        )
    _spacing(spacing)
    _tolerance(tolerance_mm)
    pred_regions, ref_regions = _regions(pred), _regions(ref)
    return {
        region: binary_metrics(
            pred_regions[region], ref_regions[region], spacing, tolerance_mm=tolerance_mm
        )
        for region in REGIONS
    }
