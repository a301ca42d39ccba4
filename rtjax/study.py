"""Recurrence coverage of CTVs, per case and per cohort, with paired statistics and figures.

Coverage of a CTV = |recurrence inside the CTV| / |recurrence|, a fraction in [0, 1].

Empty-recurrence policy: coverage is undefined for a case without recurrence voxels, so
:func:`coverage` raises ``ValueError`` for it (a cohort run reports such a case and leaves it
out of the tables and statistics); it is never counted as 0 or 1.

Coverage curves follow a nested family of CTVs (the standard CTV over margins, the model CTV
over density cutoffs, :class:`rtjax.ctv.CTVFamily`): volume (mL) and coverage per parameter.
:func:`smallest_volume_for_coverage` reads the smallest volume reaching a coverage level off a
curve; on the curve of :func:`exact_coverage_curve` (whose parameters are the family's
breakpoints on the recurrence) it is exact.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from scipy import stats

from rtjax.ctv import (
    CTVFamily,
    density_family,
    isovolumetric_cutoff,
    margin_family,
    standard_ctv,
)
from rtjax.plotting import headless_pyplot, save_figure
from rtjax.provenance import write_text_atomic

__all__ = [
    "COVERAGE_LEVELS",
    "CaseCoverage",
    "CoverageCurve",
    "PairedTest",
    "case_coverage",
    "cohort_table",
    "coverage",
    "coverage_curve",
    "exact_coverage_curve",
    "paired_test",
    "plot_cohort",
    "plot_coverage_curves",
    "smallest_volume_for_coverage",
    "write_cohort_csv",
]

COVERAGE_LEVELS = (0.95, 1.0)
# Coverage is a ratio of voxel counts; this slack keeps 19/20 >= 0.95 true in floats.
_LEVEL_EPS = 1e-12


def _mask(array, name: str) -> np.ndarray:
    arr = np.asarray(array)
    if arr.dtype == bool:
        return arr
    if arr.dtype.kind not in "iuf" or not np.all((arr == 0) | (arr == 1)):
        raise ValueError(f"{name} must be a boolean mask (values 0/1)")
    return arr != 0


def _recurrence(recurrence) -> np.ndarray:
    rec = _mask(recurrence, "recurrence")
    if not rec.any():
        raise ValueError(
            "empty recurrence: coverage is undefined without recurrence voxels "
            "(policy: report the case separately, never count it as 0 or 1)"
        )
    return rec


def coverage(recurrence, ctv) -> float:
    """|recurrence & ctv| / |recurrence| (fraction in [0, 1]) for boolean masks of one shape.

    Raises:
        ValueError: empty recurrence (coverage undefined), or mismatched shapes.
    """
    rec = _recurrence(recurrence)
    target = _mask(ctv, "ctv")
    if rec.shape != target.shape:
        raise ValueError(f"recurrence {rec.shape} and CTV {target.shape} differ in shape")
    return float(np.count_nonzero(rec & target) / np.count_nonzero(rec))


# --------------------------------------------------------------------------- curves


@dataclass(frozen=True, eq=False)
class CoverageCurve:
    """Volume and coverage of a CTV family at each parameter (in the order given).

    Attributes:
        name: the family's name (e.g. ``"standard"``, ``"model"``).
        unit: the parameter's unit (``"mm"`` for margins, ``"density"`` for cutoffs).
        parameters: (P,) margins in mm or density cutoffs.
        volumes_ml: (P,) CTV volumes in mL.
        coverages: (P,) recurrence coverage fractions in [0, 1].
    """

    name: str
    unit: str
    parameters: np.ndarray
    volumes_ml: np.ndarray
    coverages: np.ndarray

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "unit": self.unit,
            "parameters": np.asarray(self.parameters).tolist(),
            "volumes_ml": np.asarray(self.volumes_ml).tolist(),
            "coverages": np.asarray(self.coverages).tolist(),
        }


def _check_voxel_volume(voxel_volume_ml: float) -> float:
    value = float(voxel_volume_ml)
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"voxel_volume_ml must be positive, got {voxel_volume_ml!r}")
    return value


def coverage_curve(
    recurrence,
    family: CTVFamily | Callable[[float], np.ndarray],
    parameters,
    voxel_volume_ml: float,
    *,
    name: str | None = None,
) -> CoverageCurve:
    """Volume (mL) and recurrence coverage of a CTV family at each parameter.

    Args:
        recurrence: boolean (X, Y, Z), not empty.
        family: a :class:`rtjax.ctv.CTVFamily` (counted from one sort, fast for many
            parameters), or any callable ``parameter -> bool mask``.
        parameters: margins (mm) or cutoffs, in any order (kept).
        voxel_volume_ml: volume of one voxel in mL (``Image.voxel_volume_ml``).
        name: the curve's name (default: the family's name, or ``"ctv"``).
    """
    rec = _recurrence(recurrence)
    vox = _check_voxel_volume(voxel_volume_ml)
    params = np.atleast_1d(np.asarray(parameters, dtype=np.float64))
    n_rec = np.count_nonzero(rec)
    if isinstance(family, CTVFamily):
        if family.shape != rec.shape:
            raise ValueError(f"recurrence {rec.shape} and family {family.shape} differ in shape")
        volumes = family.volumes(params)
        covered = family.counts_within(rec, params)
        label, unit = family.name, family.unit
    else:
        masks = (_mask(family(float(p)), "CTV") for p in params)
        pairs = [(np.count_nonzero(m), np.count_nonzero(m & rec)) for m in masks]
        volumes = np.array([v for v, _ in pairs], dtype=np.int64)
        covered = np.array([c for _, c in pairs], dtype=np.int64)
        label, unit = "ctv", ""
    return CoverageCurve(
        name=name or label,
        unit=unit,
        parameters=params,
        volumes_ml=volumes * vox,
        coverages=covered / n_rec,
    )


def exact_coverage_curve(
    recurrence, family: CTVFamily, voxel_volume_ml: float
) -> CoverageCurve:
    """The coverage curve at the family's breakpoints on the recurrence (the parameters at
    which coverage changes), ordered so the CTV grows: every attainable coverage appears at
    its smallest volume. Recurrence voxels outside every CTV of the family (outside the brain;
    zero density) are never covered."""
    rec = _recurrence(recurrence)
    return coverage_curve(rec, family, family.breakpoints(rec), voxel_volume_ml)


def smallest_volume_for_coverage(curve: CoverageCurve, level: float) -> float | None:
    """The smallest volume (mL) on ``curve`` whose coverage is >= ``level`` (a fraction in
    (0, 1], e.g. 0.95); ``None`` when no point of the curve reaches it."""
    level = float(level)
    if not 0 < level <= 1:
        raise ValueError(f"coverage level must be a fraction in (0, 1], got {level!r}")
    reached = np.asarray(curve.coverages) >= level - _LEVEL_EPS
    if not reached.any():
        return None
    return float(np.min(np.asarray(curve.volumes_ml)[reached]))


# --------------------------------------------------------------------------- one case


@dataclass(frozen=True)
class CaseCoverage:
    """Coverage of one case's recurrence by its standard and iso-volumetric model CTVs.

    Volumes in mL, coverages as fractions in [0, 1]. ``*_volume_ml_for_95`` / ``_for_100``
    are the smallest CTV volumes of each family (margin sweep, cutoff sweep) reaching 95 % /
    100 % coverage, ``None`` when the family never reaches it (recurrence outside the brain
    or at zero density).
    """

    case_id: str
    margin_mm: float
    cutoff: float
    recurrence_volume_ml: float
    standard_volume_ml: float
    model_volume_ml: float
    standard_coverage: float
    model_coverage: float
    standard_volume_ml_for_95: float | None
    standard_volume_ml_for_100: float | None
    model_volume_ml_for_95: float | None
    model_volume_ml_for_100: float | None

    def to_dict(self) -> dict:
        """Plain JSON-ready dict (the content of a case's coverage.json)."""
        return {k: (None if v is None else (v if isinstance(v, str) else float(v)))
                for k, v in asdict(self).items()}


def case_coverage(
    case_id: str,
    recurrence,
    core,
    brain,
    density,
    spacing,
    voxel_volume_ml: float,
    *,
    margin_mm: float = 15.0,
    rtol: float = 0.01,
) -> CaseCoverage:
    """Evaluate one case: standard CTV at ``margin_mm``, the model CTV at the cutoff that
    matches its volume within ``rtol``, their coverages, and the smallest volumes of each
    family reaching 95 % and 100 % coverage.

    Args:
        case_id: the case's name.
        recurrence, core, brain: boolean (X, Y, Z) masks on one canonical grid.
        density: float (X, Y, Z) tumour cell density in [0, 1] (a binary model CTV works too:
            its cutoff is then 1).
        spacing: voxel size in mm per axis.
        voxel_volume_ml: volume of one voxel in mL.

    Raises:
        ValueError: empty recurrence or core, or no cutoff matches the volume within rtol.
    """
    rec = _recurrence(recurrence)
    vox = _check_voxel_volume(voxel_volume_ml)
    standard = standard_ctv(core, brain, spacing, margin_mm)
    cutoff, model = isovolumetric_cutoff(density, standard, rtol=rtol)
    needed = {}
    for fam in (margin_family(core, brain, spacing), density_family(density)):
        curve = exact_coverage_curve(rec, fam, vox)
        for level in COVERAGE_LEVELS:
            key = f"{fam.name}_volume_ml_for_{round(level * 100)}"
            needed[key] = smallest_volume_for_coverage(curve, level)
    return CaseCoverage(
        case_id=str(case_id),
        margin_mm=float(margin_mm),
        cutoff=cutoff,
        recurrence_volume_ml=np.count_nonzero(rec) * vox,
        standard_volume_ml=np.count_nonzero(standard) * vox,
        model_volume_ml=np.count_nonzero(model) * vox,
        standard_coverage=coverage(rec, standard),
        model_coverage=coverage(rec, model),
        **needed,
    )


# --------------------------------------------------------------------------- cohort


def cohort_table(cases: Sequence[CaseCoverage]) -> str:
    """CSV text, one row per case, columns the :class:`CaseCoverage` fields (volumes in
    mL, coverages as fractions); ``None`` is an empty cell; floats to 12 significant digits
    (no float noise such as 1402.2930000000001)."""
    columns = [f.name for f in fields(CaseCoverage)]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    cell = lambda v: "" if v is None else format(v, ".12g") if isinstance(v, float) else v  # noqa: E731
    for case in cases:
        row = case.to_dict()
        writer.writerow([cell(row[c]) for c in columns])
    return buffer.getvalue()


def write_cohort_csv(path: str | Path, cases: Sequence[CaseCoverage]) -> Path:
    """Write :func:`cohort_table` to ``path`` atomically; returns the path."""
    return write_text_atomic(path, cohort_table(cases))


@dataclass(frozen=True)
class PairedTest:
    """Wilcoxon signed-rank test of model vs standard coverage at equal volume.

    Attributes:
        statistic: scipy's statistic (NaN when not computed).
        p_value: two-sided p-value (NaN when not computed).
        n: number of cases (pairs).
        n_nonzero: pairs with a non-zero difference (those the test ranks).
        median_difference: median of model - standard coverage (NaN when n == 0).
        note: why the test was not computed, else "".
    """

    statistic: float
    p_value: float
    n: int
    n_nonzero: int
    median_difference: float
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def paired_test(cases: Iterable[CaseCoverage]) -> PairedTest:
    """Paired Wilcoxon signed-rank test (``scipy.stats.wilcoxon``, two-sided, zero
    differences dropped) of model vs standard coverage at equal volume.

    Degenerate cohorts give a result, not an error: fewer than 2 cases, or no non-zero
    difference, return NaN statistic and p-value with a ``note`` saying why.
    """

    cases = list(cases)
    model = np.array([c.model_coverage for c in cases], dtype=np.float64)
    standard = np.array([c.standard_coverage for c in cases], dtype=np.float64)
    diff = model - standard
    n = len(cases)
    n_nonzero = int(np.count_nonzero(diff))
    median = float(np.median(diff)) if n else math.nan
    if n < 2:
        note = f"not tested: {n} case(s), a paired test needs at least 2"
        return PairedTest(math.nan, math.nan, n, n_nonzero, median, note)
    if n_nonzero == 0:
        note = "not tested: all paired differences are zero (identical coverages)"
        return PairedTest(math.nan, math.nan, n, n_nonzero, median, note)
    result = stats.wilcoxon(model, standard, zero_method="wilcox", alternative="two-sided")
    return PairedTest(float(result.statistic), float(result.pvalue), n, n_nonzero, median)


# --------------------------------------------------------------------------- figures


def plot_coverage_curves(
    curves: Sequence[CoverageCurve],
    path: str | Path,
    *,
    points: Sequence[tuple[str, float, float]] = (),
    title: str = "",
) -> Path:
    """Coverage (%) against CTV volume (mL), one line per curve, with optional marked
    ``points`` ``(label, volume_ml, coverage)`` (e.g. the iso-volumetric CTVs); written
    atomically (format from the suffix, PNG by default)."""
    plt = headless_pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5), constrained_layout=True)
    for curve in curves:
        order = np.argsort(curve.volumes_ml, kind="stable")
        ax.step(np.asarray(curve.volumes_ml)[order], 100 * np.asarray(curve.coverages)[order],
                where="post", label=curve.name)
    for label, volume, cov in points:
        ax.plot([volume], [100 * cov], "o", label=label)
    for level in COVERAGE_LEVELS:
        ax.axhline(100 * level, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("CTV volume (mL)")
    ax.set_ylabel("recurrence coverage (%)")
    ax.set_ylim(-2, 102)
    if title:
        ax.set_title(title)
    ax.legend(loc="lower right")
    return save_figure(fig, path)


def plot_cohort(cases: Sequence[CaseCoverage], path: str | Path, *, title: str = "") -> Path:
    """Cohort figure: paired coverages (standard vs model at equal volume, one line per
    case) and the volumes each family needs for 100 % coverage; written atomically."""
    plt = headless_pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.5), constrained_layout=True)
    for case in cases:
        left.plot([0, 1], [100 * case.standard_coverage, 100 * case.model_coverage],
                  "-o", color="tab:blue", alpha=0.6)
    left.set_xticks([0, 1], ["standard", "model (iso-volume)"])
    left.set_xlim(-0.3, 1.3)
    left.set_ylabel("recurrence coverage (%)")
    pairs = [(c.standard_volume_ml_for_100, c.model_volume_ml_for_100) for c in cases]
    pairs = [p for p in pairs if None not in p]
    if pairs:
        xs, ys = np.array(pairs).T
        right.plot(xs, ys, "o")
        hi = float(max(xs.max(), ys.max())) * 1.05
        right.plot([0, hi], [0, hi], color="grey", lw=0.8, ls="--")
    missing = len(cases) - len(pairs)
    if missing:
        right.text(0.02, 0.98, f"{missing} of {len(cases)} case(s) not shown: a CTV family "
                   "never covers the whole recurrence", transform=right.transAxes, va="top",
                   fontsize=8, gid="missing-note")
    right.set_xlabel("standard CTV volume for 100 % coverage (mL)")
    right.set_ylabel("model CTV volume for 100 % coverage (mL)")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)
