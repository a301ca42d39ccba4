"""The fit-quality gate: when to distrust a case's model CTV, in plain words.

A fitted case is "poor" (its outputs are still written, with a warning on the terminal and
``quality: "poor"`` and the reasons in ``params.json``) when any of these holds:

- the re-simulated masks reproduce the observed ones poorly: Dice of the core or of the
  edema below :data:`MIN_DICE` (0.7) -- the model does not explain this lesion, so its
  density (and the model CTV) is not a personalised estimate;
- a fitted parameter ends at a bound of the fit (:class:`growth.fit.FitBounds`, within
  :data:`BOUND_TOL` of the box's width, on a log scale for sqrt(Dw T) and sqrt(rho T)):
  the optimum lies outside what the fit may reach;
- the lesion is multifocal: the core has parts (each at least :data:`MIN_FOCUS_ML`) more
  than :data:`MULTIFOCAL_MM` (10 mm) apart, which one seed cannot grow;
- the segmentation came from the network and its uncertainty is high: the mean voxel-wise
  uncertainty (the spread of the ensemble's members, 0 .. 0.5, `rtjax.seg.infer`) inside
  the segmented tumour above :data:`MAX_SEG_UNCERTAINTY`.

:func:`assess_quality` returns ``{"quality": "good" | "poor", "reasons": [...], "checks":
{...}}``; :class:`QualityWarning` is what the pipeline warns with.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy.ndimage import distance_transform_edt, label

from growth.fit import FitBounds
from rtjax.io import bounding_box

__all__ = [
    "BOUND_TOL",
    "MAX_SEG_UNCERTAINTY",
    "MIN_DICE",
    "MIN_FOCUS_ML",
    "MULTIFOCAL_MM",
    "QualityWarning",
    "assess_quality",
    "core_foci",
    "parameters_at_bounds",
    "segmentation_uncertainty",
]

#: Below this Dice of the re-simulated core or edema, the fit does not explain the lesion.
MIN_DICE = 0.7
#: Core parts further apart than this (mm, edge to edge) make the lesion multifocal.
MULTIFOCAL_MM = 10.0
#: Core parts smaller than this (mL) are specks, not foci.
MIN_FOCUS_ML = 0.1
#: A parameter within this fraction of its box's width of a bound is "at the bound".
BOUND_TOL = 0.01
#: Above this mean network uncertainty inside the segmented tumour the masks are unsure.
#: Set with the slices-cpu-0.2 ensemble; re-measured with slices-cpu-0.6 on the 22 labelled
#: cases (`python scripts/seg_uncertainty.py --held-out-weights rtjax/weights/seg_folds`,
#: docs/command-line.md): the spread of the fold models that never saw a case against its
#: held-out Dice WT, Spearman -0.35 (p = 0.11); above 0.25 sit 2 of the 22 (WT 0.713, and TC
#: 0.172), the BraTS 2023 case at 0.167. Left at 0.25, not re-fitted to 22 points.
MAX_SEG_UNCERTAINTY = 0.25

_CONNECTIVITY = np.ones((3, 3, 3), bool)  # 26-connected parts


class QualityWarning(UserWarning):
    """A case's fit (or its network segmentation) should not be trusted as it is."""


def core_foci(core: np.ndarray, spacing: Sequence[float], *, min_focus_ml: float = MIN_FOCUS_ML,
              gap_mm: float = MULTIFOCAL_MM) -> dict:
    """The separate foci of a tumour core.

    The core's 26-connected parts of at least ``min_focus_ml`` are grouped when they lie
    within ``gap_mm`` of each other (edge to edge, single linkage); each group is a focus.

    Returns:
        ``{"parts": parts kept, "foci": number of groups, "gap_mm": the smallest distance
        (mm) from the largest focus to another focus (None with one focus)}``.
    """
    core = np.asarray(core, bool)
    spacing = np.asarray(spacing, float)
    if not core.any():
        return {"parts": 0, "foci": 0, "gap_mm": None}
    box = bounding_box(core)
    parts, _ = label(core[box], structure=_CONNECTIVITY)
    sizes = np.bincount(parts.ravel())[1:] * float(np.prod(spacing)) / 1000.0
    kept = np.flatnonzero(sizes >= min_focus_ml) + 1
    if len(kept) <= 1:
        return {"parts": len(kept), "foci": len(kept), "gap_mm": None}
    big = np.isin(parts, kept)
    near = distance_transform_edt(~big, sampling=spacing) <= gap_mm / 2
    groups, _ = label(near, structure=_CONNECTIVITY)
    ids = np.unique(groups[big])
    if len(ids) <= 1:
        return {"parts": len(kept), "foci": 1, "gap_mm": None}
    volume = {g: int(np.count_nonzero(big & (groups == g))) for g in ids}
    largest = max(volume, key=volume.get)
    distance = distance_transform_edt(~(big & (groups == largest)), sampling=spacing)
    gap = float(distance[big & (groups != largest)].min())
    return {"parts": len(kept), "foci": len(ids), "gap_mm": round(gap, 2)}


def _fit_boxes(initial: Mapping, bounds: FitBounds) -> dict[str, tuple[float, float]]:
    """The boxes `growth.fit.refine` keeps each parameter in (its relative clip included)."""

    def relative(value, box):
        lo, hi = box
        if bounds.relative is not None:
            lo, hi = max(lo, value / bounds.relative), min(hi, value * bounds.relative)
        return (lo, hi) if lo < hi else tuple(box)

    return {"sqrt_dw_t_mm": relative(initial["sqrt_dw_t_mm"], bounds.sqrt_dw_t),
            "sqrt_rho_t": relative(initial["sqrt_rho_t"], bounds.sqrt_rho_t),
            "u_t1": tuple(bounds.u_t1), "u_fl": tuple(bounds.u_fl)}


_PLAIN_NAMES = {"sqrt_dw_t_mm": "sqrt(Dw T)", "sqrt_rho_t": "sqrt(rho T)",
                "u_t1": "the T1c threshold u_T1", "u_fl": "the FLAIR threshold u_FL"}


def parameters_at_bounds(info: Mapping, bounds: FitBounds | None = None, *,
                         tol: float = BOUND_TOL, thresholds_fitted: bool = True) -> list[str]:
    """Plain-words notes, one per fitted parameter that ended at a bound of the fit.

    Args:
        info: `rtjax.fit.CaseFit.info` (``scaled_parameters``, ``initial_estimate``).
        bounds: the fit's bounds (default `growth.fit.FitBounds()`, as `rtjax.fit` uses).
        tol: fraction of the box's width (log width for the growth parameters; the
            origin's allowed shift per axis) counted as "at the bound".
        thresholds_fitted: whether u_T1 / u_FL were fitted (else they are not checked).
    """
    bounds = bounds or FitBounds()
    final, initial = info["scaled_parameters"], info["initial_estimate"]
    notes = []
    for key, (lo, hi) in _fit_boxes(initial, bounds).items():
        if key in ("u_t1", "u_fl") and not thresholds_fitted:
            continue
        value = float(final[key])
        log = key in ("sqrt_dw_t_mm", "sqrt_rho_t")
        where = ((math.log(value / lo) / math.log(hi / lo)) if log
                 else (value - lo) / (hi - lo))
        if where <= tol or where >= 1 - tol:
            side, edge = ("lower", lo) if where <= tol else ("upper", hi)
            notes.append(f"{_PLAIN_NAMES[key]} = {value:.3g} ended at the {side} bound "
                         f"{edge:.3g} of the fit")
    shift = np.abs(np.subtract(final["origin_grid_mm"], initial["origin_grid_mm"]))
    if bounds.origin_mm > 0 and shift.max() >= (1 - tol) * bounds.origin_mm:
        notes.append(f"the seed moved {shift.max():.1f} mm from its starting point, the most "
                     f"the fit allows ({bounds.origin_mm:g} mm)")
    return notes


def segmentation_uncertainty(uncertainty: np.ndarray, whole: np.ndarray) -> float | None:
    """Mean network uncertainty inside the segmented tumour (None when it is empty)."""
    whole = np.asarray(whole, bool)
    if not whole.any():
        return None
    return float(np.asarray(uncertainty, np.float64)[whole].mean())


def assess_quality(
    fit_info: Mapping,
    core: np.ndarray,
    spacing: Sequence[float],
    *,
    seg_uncertainty: float | None = None,
    bounds: FitBounds | None = None,
    thresholds_fitted: bool = True,
    min_dice: float = MIN_DICE,
    gap_mm: float = MULTIFOCAL_MM,
    max_seg_uncertainty: float = MAX_SEG_UNCERTAINTY,
) -> dict:
    """The quality verdict of one fitted case (see the module docstring).

    Args:
        fit_info: `rtjax.fit.CaseFit.info` (``dice_core``, ``dice_edema``, parameters).
        core: the observed tumour core (canonical boolean array).
        spacing: voxel size, mm.
        seg_uncertainty: mean network uncertainty inside the tumour when the network
            segmented the case (:func:`segmentation_uncertainty`), else None.

    Returns:
        ``{"quality": "good" | "poor", "reasons": [plain-words str], "checks": {dice_core,
        dice_edema, min_dice, parameters_at_bounds, core_foci, core_gap_mm,
        multifocal_mm, seg_uncertainty, max_seg_uncertainty}}``.
    """
    reasons = []
    for name, key in (("core", "dice_core"), ("edema", "dice_edema")):
        value = float(fit_info[key])
        if value < min_dice:
            reasons.append(f"the growth model reproduces the segmented {name} poorly (Dice "
                           f"{value:.2f}, below {min_dice:g})")
    at_bounds = parameters_at_bounds(fit_info, bounds, thresholds_fitted=thresholds_fitted)
    reasons += at_bounds
    foci = core_foci(core, spacing, gap_mm=gap_mm)
    if foci["foci"] > 1:
        reasons.append(f"the lesion is multifocal: its core has {foci['foci']} separate parts, "
                       f"{foci['gap_mm']:.0f} mm apart (more than {gap_mm:g} mm), which one "
                       "seed cannot grow")
    if seg_uncertainty is not None and seg_uncertainty > max_seg_uncertainty:
        reasons.append(f"the network segmentation is uncertain (mean uncertainty "
                       f"{seg_uncertainty:.3f} inside the tumour, above {max_seg_uncertainty:g}); "
                       "check segmentation.nii.gz or give a seg")
    checks = {"dice_core": float(fit_info["dice_core"]), "dice_edema": float(fit_info["dice_edema"]),
              "min_dice": min_dice, "parameters_at_bounds": at_bounds,
              "core_foci": foci["foci"], "core_gap_mm": foci["gap_mm"], "multifocal_mm": gap_mm,
              "seg_uncertainty": seg_uncertainty, "max_seg_uncertainty": max_seg_uncertainty}
    return {"quality": "poor" if reasons else "good", "reasons": reasons, "checks": checks}
