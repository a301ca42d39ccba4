"""The case report: a figure (``report.png``) and a one-page HTML report (``report.html``).

:func:`case_figure` draws axial, coronal and sagittal slices through the tumour core on
canonical RAS arrays: the upper row the structures (core, edema, every CTV, the recurrence)
on the background image, the lower row the fitted tumour cell density as a colour wash with
a labelled colour scale. Each panel carries its orientation letters, the slice position in
world mm (from the affine) and a 1 cm scale bar; pixels keep their physical aspect on
anisotropic grids. Beside the images: the legend, a text strip with the volumes and, when
a recurrence is known, the recurrence coverage of each CTV, and the density colour scale.

Display convention: radiological by default (axial and coronal slices show the patient's
right on the image's left, axial seen from the feet with anterior up, coronal seen from the
front with superior up; sagittal slices show anterior on the left and superior up);
``convention="neurological"`` shows the patient's right on the right. On an oblique grid
the slices follow the image axes and the letters name the nearest anatomical direction
(the figure says so).

:func:`case_report_html` writes one self-contained page (no external assets; the figure
embedded as base64) with the figure, the volumes and coverage table, the fit quality, the
warnings, the parameters and the provenance.

Typical use at the end of a case run (arrays canonical on ``reference``)::

    background, name = background_image(images, atlas_tissue=...)
    ctvs = {"CTV standard 15 mm": standard, "CTV model (iso-volumetric)": model}
    volumes = mask_volumes_ml({"core": core, "edema": edema, **ctvs}, reference.affine)
    case_figure(out / "report.png", background=background, background_name=name,
                affine=reference.affine, density=density, core=core, edema=edema, ctvs=ctvs,
                recurrence=recurrence, volumes_ml=volumes, coverage=coverage, title=case_id)
    case_report_html(out / "report.html", case_id=case_id, figure_png=out / "report.png", ...)
"""

from __future__ import annotations

import base64
import functools
import html
import itertools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rtjax.errors import InputError
from rtjax.io import bounding_box
from rtjax.plotting import headless_pyplot, save_figure
from rtjax.provenance import write_text_atomic

__all__ = [
    "BACKGROUND_NAMES",
    "CONVENTIONS",
    "CTV_STYLES",
    "DENSITY_LEVELS",
    "VIEWS",
    "background_image",
    "build_case_figure",
    "case_figure",
    "case_report_html",
    "core_centre",
    "display_slice",
    "is_oblique",
    "mask_volumes_ml",
    "orientation_letters",
    "report_html",
    "slice_position_mm",
]

#: Names of the possible backgrounds, keyed by where they come from.
BACKGROUND_NAMES = {
    "t1c": "T1c",
    "flair": "FLAIR",
    "tissue": "tissue map",
    "atlas": "registered atlas",
}

#: Display conventions: "radiological" (patient right on the image left) or "neurological".
CONVENTIONS = ("radiological", "neurological")

#: The three views: name -> (normal axis, row axis, column axis) of a canonical RAS array.
VIEWS = {
    "axial": (2, 1, 0),
    "coronal": (1, 2, 0),
    "sagittal": (0, 2, 1),
}
_WORLD_AXIS = "xyz"

#: Density levels of the colour scale (each band is [level, next level)).
DENSITY_LEVELS = (0.01, 0.1, 0.3, 0.6)

#: (colour, line style) of the CTVs, in the order given; colour and dash both differ.
CTV_STYLES = (
    ("#56B4E9", "--"),  # sky blue, dashed
    ("#00E676", "-"),  # green, solid
    ("#FF9F1C", "-."),  # orange, dash-dot
    ("#FFFFFF", ":"),  # white, dotted
    ("#F48FB1", (0, (6, 2, 1, 2, 1, 2))),  # pink, dash-dot-dot
    ("#B39DDB", (0, (1, 1))),  # lavender, densely dotted
)
_CORE = {"colour": "#FF1744", "width": 2.8}
_EDEMA = {"colour": "#FFEB3B", "width": 1.6}
_RECURRENCE = {"colour": "#FF00FF", "width": 1.4, "alpha": 0.28}
_CTV_WIDTH = 1.5
_DENSITY_CMAP = "viridis"
_DENSITY_ALPHA = 0.55
_GREY_HEADROOM = 0.3
_CROP_PAD_MM = 6.0
_SCALE_BAR_MM = 10.0
_OBLIQUE_TOL = 1e-3


# --------------------------------------------------------------------------- geometry


def _check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown display convention {convention!r}; expected one of "
                         f"{CONVENTIONS}")


def _check_view(view: str) -> None:
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; expected one of {tuple(VIEWS)}")


def _flip_columns(view: str, convention: str) -> bool:
    """Whether the column axis runs from high to low index (R or A on the left)."""
    return view == "sagittal" or convention == "radiological"


def display_slice(volume: np.ndarray, view: str, index: int,
                  convention: str = "radiological") -> np.ndarray:
    """The 2-D slice ``index`` (along the view's normal) of a canonical RAS (X, Y, Z) array,
    laid out for display: row 0 at the top (anterior for axial, superior otherwise), column
    0 at the left (patient right for axial/coronal in the radiological convention, left in
    the neurological one; anterior for sagittal). Shape (rows, columns)."""
    _check_view(view)
    _check_convention(convention)
    normal, row, _ = VIEWS[view]
    plane = np.take(np.asarray(volume), int(index), axis=normal)
    # After np.take the remaining axes keep their order; put the row axis first.
    remaining = [a for a in range(3) if a != normal]
    plane = plane if remaining.index(row) == 0 else plane.T
    plane = plane[::-1, :]
    return plane[:, ::-1] if _flip_columns(view, convention) else plane


def orientation_letters(view: str, convention: str = "radiological") -> dict[str, str]:
    """The anatomical direction at each edge of a :func:`display_slice`: keys ``left``,
    ``right``, ``top``, ``bottom``, values among R, L, A, P, S, I."""
    _check_view(view)
    _check_convention(convention)
    _, row, col = VIEWS[view]
    positive, negative = "RAS", "LPI"
    high, low = positive[col], negative[col]
    left, right = (high, low) if _flip_columns(view, convention) else (low, high)
    return {"left": left, "right": right, "top": positive[row], "bottom": negative[row]}


def core_centre(core: np.ndarray) -> tuple[int, int, int]:
    """The core voxel nearest the core's centre of mass (index space), so that every slice
    through it shows core even for a crescent or a multifocal lesion; (i, j, k)."""
    idx = np.argwhere(np.asarray(core, bool))
    if not len(idx):
        raise ValueError("the tumour core is empty: no slice to centre the report on")
    nearest = idx[np.argmin(((idx - idx.mean(axis=0)) ** 2).sum(axis=1))]
    return tuple(int(v) for v in nearest)


def slice_position_mm(affine: np.ndarray, ijk: Sequence[int]) -> tuple[float, float, float]:
    """World coordinates (x, y, z) in mm of voxel ``ijk`` under a (4, 4) affine."""
    affine = np.asarray(affine, float)
    return tuple(float(v) for v in affine[:3, :3] @ np.asarray(ijk, float) + affine[:3, 3])


def _spacing(affine: np.ndarray) -> np.ndarray:
    return np.linalg.norm(np.asarray(affine, float)[:3, :3], axis=0)


def is_oblique(affine: np.ndarray, tol: float = _OBLIQUE_TOL) -> bool:
    """Whether a canonical (RAS) affine's axes deviate from the world axes by more than
    ``tol`` in any direction cosine."""
    directions = np.asarray(affine, float)[:3, :3] / _spacing(affine)
    return bool(np.abs(directions - np.eye(3)).max() > tol)


def mask_volumes_ml(masks: Mapping[str, np.ndarray], affine: np.ndarray) -> dict[str, float]:
    """Volume in mL of each boolean mask (voxel count x |det affine| / 1000), same order."""
    voxel_ml = abs(float(np.linalg.det(np.asarray(affine, float)[:3, :3]))) / 1000.0
    return {name: float(np.count_nonzero(m)) * voxel_ml for name, m in masks.items()}


def background_image(images: Mapping[str, Any], *, atlas_tissue: bool) -> tuple[np.ndarray, str]:
    """The figure's background and its name: the T1c, else the FLAIR, else the tissue map
    WM + GM / 2, named "registered atlas" when the tissue came from atlas registration.

    Args:
        images: name -> :class:`rtjax.io.Image` (or canonical array), with ``wm`` and ``gm``
            when there is neither ``t1c`` nor ``flair``.
        atlas_tissue: the ``wm`` / ``gm`` are the registered atlas, not the patient's own.
    """
    data = {name: np.asarray(getattr(img, "data", img)) for name, img in images.items()}
    for name in ("t1c", "flair"):
        if name in data:
            return data[name], BACKGROUND_NAMES[name]
    if not {"wm", "gm"} <= set(data):
        raise ValueError("no background: the case has neither t1c, flair nor wm and gm")
    tissue = data["wm"].astype(np.float32) + 0.5 * data["gm"].astype(np.float32)
    return tissue, BACKGROUND_NAMES["atlas" if atlas_tissue else "tissue"]


# --------------------------------------------------------------------------- figure


def _as_mask(array, name: str, shape: tuple[int, ...]) -> np.ndarray:
    array = np.asarray(array)
    if array.shape != shape:
        raise ValueError(f"{name}: shape {array.shape} differs from the background's {shape}")
    return array.astype(bool)


def _check_coverage(coverage, ctv_names, volume_names) -> None:
    for name, value in (coverage or {}).items():
        if name not in ctv_names or name not in volume_names:
            raise ValueError(f"coverage: {name!r} is not a CTV with a volume "
                             f"(CTVs {list(ctv_names)}, volumes {list(volume_names)})")
        if not (0.0 <= float(value) <= 1.0):
            raise ValueError(f"coverage of {name!r} must be a fraction in [0, 1], got {value}")


def _check_inputs(background, affine, density, core, edema, ctvs, recurrence, volumes_ml,
                  coverage, density_levels):
    background = np.asarray(background, np.float32)
    if background.ndim != 3:
        raise ValueError(f"background must be 3-D, got shape {background.shape}")
    shape = background.shape
    affine = np.asarray(affine, float)
    if (affine.shape != (4, 4) or not np.isfinite(affine).all()
            or abs(np.linalg.det(affine[:3, :3])) == 0):
        raise ValueError("affine must be a finite, invertible (4, 4) matrix")
    density = np.asarray(density, np.float32)
    if density.shape != shape:
        raise ValueError(f"density: shape {density.shape} differs from the background's {shape}")
    if not np.isfinite(density).all():
        raise ValueError("density has non-finite values")
    if not ctvs:
        raise ValueError("ctvs: give at least one CTV (name -> mask)")
    if len(ctvs) > len(CTV_STYLES):
        raise ValueError(f"ctvs: at most {len(CTV_STYLES)} CTVs can be told apart, got {len(ctvs)}")
    masks = {"core": _as_mask(core, "core", shape), "edema": _as_mask(edema, "edema", shape)}
    ctv_masks = {str(n): _as_mask(m, f"CTV {n!r}", shape) for n, m in ctvs.items()}
    rec = None if recurrence is None else _as_mask(recurrence, "recurrence", shape)
    _check_coverage(coverage, list(ctv_masks), list(volumes_ml))
    levels = tuple(float(v) for v in density_levels)
    increasing = all(a < b for a, b in itertools.pairwise(levels))
    if not levels or not increasing or levels[0] <= 0 or levels[-1] >= 1:
        raise ValueError(f"density_levels must increase strictly within (0, 1), got {levels}")
    core_centre(masks["core"])  # raises on an empty core
    return background, affine, density, masks, ctv_masks, rec, levels


def _outside_value(background: np.ndarray) -> float:
    """The air's value: the median of the eight corner voxels."""
    return float(np.median(background[np.ix_(*[[0, n - 1] for n in background.shape])]))


def _foreground(background: np.ndarray) -> np.ndarray:
    """Voxels clearly brighter or darker than the corners (the head, not the air or its
    noise): more than 10 % of the 0.5-99.5th percentile range away from the corners' value."""
    lo, hi = np.percentile(background, [0.5, 99.5])
    return np.abs(background - _outside_value(background)) > 0.1 * max(float(hi - lo), 1e-12)


def _crop_box(foreground, density, masks, spacing, first_level) -> tuple[slice, ...]:
    """The box holding the head (0.2-99.8th percentile of its voxel coordinates per axis,
    robust to stray bright voxels in the air) and everything drawn, grown by a few mm."""
    drawn = density >= first_level
    for m in masks:
        drawn = drawn | m
    points = [np.argwhere(drawn)]
    head = np.argwhere(foreground)
    if len(head):
        points.append(np.percentile(head, [0.2, 99.8], axis=0).round().astype(int))
    points = np.concatenate([p for p in points if len(p)])
    corners = np.zeros(foreground.shape, bool)
    corners[tuple(points.min(axis=0))] = corners[tuple(points.max(axis=0))] = True
    return bounding_box(corners, pad=np.ceil(_CROP_PAD_MM / spacing).astype(int))


def _window(background: np.ndarray, foreground: np.ndarray) -> tuple[float, float]:
    """Grey window: from the air's value (or the foreground's 1st percentile if lower) to
    the foreground's 99.5th percentile, the top widened so that the brightest tissue is
    light grey, not white (coloured outlines stay visible)."""
    values = background[foreground] if foreground.any() else background.ravel()
    lo, hi = (float(v) for v in np.percentile(values, [1.0, 99.5]))
    lo = min(lo, _outside_value(background))
    hi = hi if hi > lo else lo + 1.0
    return lo, hi + _GREY_HEADROOM * (hi - lo)


def _letters(ax, letters: Mapping[str, str]) -> None:
    from matplotlib import patheffects

    halo = [patheffects.withStroke(linewidth=2.5, foreground="black")]
    spots = {"left": (0.015, 0.5, "left", "center"), "right": (0.985, 0.5, "right", "center"),
             "top": (0.5, 0.985, "center", "top"), "bottom": (0.5, 0.015, "center", "bottom")}
    for edge, (x, y, ha, va) in spots.items():
        ax.text(x, y, letters[edge], transform=ax.transAxes, ha=ha, va=va, color="white",
                fontsize=12, fontweight="bold", path_effects=halo, zorder=20,
                gid=f"orientation-{edge}")


def _scale_bar(ax) -> None:
    from matplotlib import patheffects
    from matplotlib.font_manager import FontProperties
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    bar = AnchoredSizeBar(ax.transData, _SCALE_BAR_MM, "1 cm", "lower right", pad=0.3,
                          borderpad=0.5, sep=2, color="white", frameon=False,
                          size_vertical=0.0, fontproperties=FontProperties(size=8.5))
    line = bar.size_bar.get_children()[0]
    line.set_linewidth(3.0)
    line.set_path_effects([patheffects.withStroke(linewidth=5, foreground="black")])
    bar.txt_label.get_children()[0].set_path_effects(
        [patheffects.withStroke(linewidth=2, foreground="black")])
    bar.set_gid("scale-bar")
    bar.set_zorder(20)
    ax.add_artist(bar)


def _outline(ax, plane, extent, colour, width, style, zorder, gid):
    if not plane.any():
        return None
    cs = ax.contour(plane.astype(np.float32), levels=[0.5], colors=[colour], linewidths=width,
                    linestyles=[style], extent=extent, origin="upper", zorder=zorder)
    cs.set_gid(gid)
    return cs


def _structure_rows(volumes_ml, coverage) -> list[str]:
    """The text strip: a header, then one line per structure with its volume and, when
    known, its recurrence coverage."""
    width = max(len("structure"), *(len(str(n)) for n in volumes_ml))
    lines = [f"{'structure':<{width}}  {'volume':>9}" + ("  coverage" if coverage else "")]
    for name, volume in volumes_ml.items():
        cov = f"  {100 * float(coverage[name]):6.1f} %" if coverage and name in coverage else ""
        lines.append(f"{name!s:<{width}}  {float(volume):6.1f} mL{cov}")
    lines.append("coverage: the fraction of the recurrence inside each CTV" if coverage
                 else "recurrence coverage: not known (no recurrence given)")
    return lines


def _footer(convention, world, centre, spacing, oblique, background_name) -> str:
    side = "left" if convention == "radiological" else "right"
    lines = [f"{convention.capitalize()} display: the patient's right on the image {side}. "
             "Slices through the core voxel nearest the core's centre, at "
             + ", ".join(f"{a} = {v:+.1f} mm" for a, v in zip(_WORLD_AXIS, world))
             + f" (voxel {centre[0]}, {centre[1]}, {centre[2]}); voxel size "
             + " x ".join(f"{s:.3g}" for s in spacing) + " mm."]
    if oblique:
        lines.append("Oblique image grid: the slices follow the image axes; the letters "
                     "name the nearest anatomical direction.")
    lines.append(f"Background: {background_name}. Lower row: the fitted tumour cell density "
                 "(colour bands) with the core outline.")
    return "\n".join(lines)


def _cut(volume, *, box, view, index, convention) -> np.ndarray:
    """The displayed slice of ``volume`` cropped to ``box`` (see :func:`display_slice`)."""
    return display_slice(volume[box], view, index, convention)


def _ctv_zorder(n: int, count: int) -> float:
    """Drawing order of CTV ``n`` of ``count``: solid lines lowest, then the broken ones,
    the first-listed on top, so that CTVs that coincide (e.g. the standard and an
    iso-volumetric CTV on a margin-like density) still show both colours."""
    solid = CTV_STYLES[n][1] == "-"
    return 4.0 + (0.0 if solid else 0.5) + 0.01 * (count - n)


def _draw_structures(ax, cut, extent, masks, ctv_masks, rec) -> None:
    if rec is not None and cut(rec).any():
        ax.contourf(cut(rec).astype(np.float32), levels=[0.5, 1.5], colors=[_RECURRENCE["colour"]],
                    alpha=_RECURRENCE["alpha"], extent=extent, origin="upper", zorder=2)
        _outline(ax, cut(rec), extent, _RECURRENCE["colour"], _RECURRENCE["width"], "-", 2.1,
                 "recurrence")
    _outline(ax, cut(masks["edema"]), extent, _EDEMA["colour"], _EDEMA["width"], "-", 3, "edema")
    for n, mask in enumerate(ctv_masks.values()):
        _outline(ax, cut(mask), extent, *CTV_STYLES[n][:1], _CTV_WIDTH, CTV_STYLES[n][1],
                 _ctv_zorder(n, len(ctv_masks)), f"ctv-{n}")
    _outline(ax, cut(masks["core"]), extent, _CORE["colour"], _CORE["width"], "-", 10, "core")


def _draw_density(ax, dens, extent, levels, bands, norm) -> None:
    if dens.max() < levels[0]:
        return
    bounds = (*levels, 1.0)
    ax.contourf(dens, levels=bounds, cmap=bands, norm=norm, alpha=_DENSITY_ALPHA,
                extent=extent, origin="upper", zorder=2).set_gid("density")
    ax.contour(dens, levels=levels, cmap=bands, norm=norm, linewidths=0.8,
               extent=extent, origin="upper", zorder=3)


def _legend_handles(ctv_names, has_recurrence: bool):
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Line2D([], [], color=_CORE["colour"], lw=_CORE["width"], label="core (GTV)"),
               Line2D([], [], color=_EDEMA["colour"], lw=_EDEMA["width"], label="edema")]
    handles += [Line2D([], [], color=colour, ls=style, lw=_CTV_WIDTH, label=name)
                for name, (colour, style) in zip(ctv_names, CTV_STYLES)]
    if has_recurrence:
        handles.append(Patch(facecolor=_RECURRENCE["colour"], alpha=0.6,
                             edgecolor=_RECURRENCE["colour"], label="recurrence"))
    return handles


def build_case_figure(
    *,
    background: np.ndarray,
    background_name: str,
    affine: np.ndarray,
    density: np.ndarray,
    core: np.ndarray,
    edema: np.ndarray,
    ctvs: Mapping[str, np.ndarray],
    recurrence: np.ndarray | None = None,
    volumes_ml: Mapping[str, float],
    coverage: Mapping[str, float] | None = None,
    title: str = "",
    convention: str = "radiological",
    density_levels: Sequence[float] = DENSITY_LEVELS,
):
    """The report figure (a matplotlib Figure; see :func:`case_figure` for the arguments)."""
    _check_convention(convention)
    background, affine, density, masks, ctv_masks, rec, levels = _check_inputs(
        background, affine, density, core, edema, ctvs, recurrence, volumes_ml, coverage,
        density_levels)
    plt = headless_pyplot()
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import BoundaryNorm, ListedColormap

    spacing = _spacing(affine)
    centre = core_centre(masks["core"])
    world = slice_position_mm(affine, centre)
    foreground = _foreground(background)
    drawn = (*masks.values(), *ctv_masks.values(), *(() if rec is None else (rec,)))
    box = _crop_box(foreground, density, drawn, spacing, levels[0])
    grey = _window(background, foreground)
    bounds = (*levels, 1.0)
    bands = ListedColormap(plt.get_cmap(_DENSITY_CMAP)(np.linspace(0.0, 1.0, len(levels))))
    norm = BoundaryNorm(bounds, bands.N)

    fig = plt.figure(figsize=(16.0, 10.0), layout="constrained")
    grid = fig.add_gridspec(3, 4, height_ratios=(1.0, 1.0, 0.16), width_ratios=(1, 1, 1, 0.8))
    for c, view in enumerate(VIEWS):
        normal, row, col = VIEWS[view]
        index = centre[normal] - box[normal].start
        cut = functools.partial(_cut, box=box, view=view, index=index, convention=convention)
        plane = cut(background)
        height, width = plane.shape[0] * spacing[row], plane.shape[1] * spacing[col]
        extent = (0.0, width, height, 0.0)
        position = f"{_WORLD_AXIS[normal]} = {world[normal]:+.1f} mm"
        for r, what in enumerate(("structures", "density")):
            ax = fig.add_subplot(grid[r, c])
            ax.set_gid(f"{what}-{view}")
            ax.imshow(plane, cmap="gray", vmin=grey[0], vmax=grey[1], extent=extent,
                      origin="upper", interpolation="nearest", zorder=0)
            ax.set_xlim(0.0, width)
            ax.set_ylim(height, 0.0)
            ax.set_xticks([])
            ax.set_yticks([])
            _letters(ax, orientation_letters(view, convention))
            _scale_bar(ax)
            lead = view if what == "structures" else f"density, {view}"
            ax.set_title(f"{lead}, {position}\nbackground: {background_name}", fontsize=10)
            if what == "structures":
                _draw_structures(ax, cut, extent, masks, ctv_masks, rec)
            else:
                _draw_density(ax, cut(density), extent, levels, bands, norm)
                _outline(ax, cut(masks["core"]), extent, _CORE["colour"], _CORE["width"], "-",
                         10, "core")

    side = fig.add_subplot(grid[0, 3])
    side.axis("off")
    legend = side.legend(handles=_legend_handles(ctv_masks, rec is not None), loc="upper left",
                         fontsize=9.5, title="outlines", title_fontsize=10, facecolor="#404040",
                         labelcolor="white", edgecolor="#404040", framealpha=1.0,
                         borderaxespad=0.0)
    legend.get_title().set_color("white")
    legend.set_gid("legend")
    rows = _structure_rows(volumes_ml, coverage)
    side.text(0.0, 0.0, "\n".join(rows), transform=side.transAxes, family="monospace",
              fontsize=min(8.5, 8.5 * 56 / max(len(r) for r in rows)), va="bottom", ha="left",
              gid="volumes")
    cell = fig.add_subplot(grid[1, 3])
    cell.axis("off")
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=bands),
                       cax=cell.inset_axes((0.0, 0.1, 0.07, 0.8)), ticks=bounds)
    bar.ax.set_yticklabels([f"{v:g}" for v in bounds])
    bar.set_label("tumour cell density (fraction of the carrying capacity)")
    bar.ax.set_gid("density-colourbar")
    foot = fig.add_subplot(grid[2, :])
    foot.axis("off")
    foot.text(0.0, 1.0, _footer(convention, world, centre, spacing, is_oblique(affine),
                                background_name),
              transform=foot.transAxes, fontsize=9, va="top", ha="left", gid="footer")
    if title:
        fig.suptitle(title, fontsize=13)
    return fig


def case_figure(
    path,
    *,
    background: np.ndarray,
    background_name: str,
    affine: np.ndarray,
    density: np.ndarray,
    core: np.ndarray,
    edema: np.ndarray,
    ctvs: Mapping[str, np.ndarray],
    recurrence: np.ndarray | None = None,
    volumes_ml: Mapping[str, float],
    coverage: Mapping[str, float] | None = None,
    title: str = "",
    convention: str = "radiological",
    density_levels: Sequence[float] = DENSITY_LEVELS,
) -> Path:
    """Write the report figure (PNG, atomically) and return its path.

    Args:
        path: output file (``report.png``).
        background: (X, Y, Z) canonical RAS image drawn in grey.
        background_name: what it is, shown in every panel title (:data:`BACKGROUND_NAMES`:
            "T1c", "FLAIR", "tissue map", "registered atlas").
        affine: (4, 4) canonical voxel-to-world affine (mm) of all arrays.
        density: (X, Y, Z) fitted tumour cell density in [0, 1].
        core, edema: (X, Y, Z) boolean masks; the core must not be empty.
        ctvs: CTV name -> (X, Y, Z) boolean mask, in legend order (at most
            ``len(CTV_STYLES)``), e.g. the standard, the iso-volumetric model and cutoff CTVs.
        recurrence: optional (X, Y, Z) boolean recurrence, drawn filled.
        volumes_ml: structure name -> volume in mL, the table's columns in order
            (:func:`mask_volumes_ml`).
        coverage: CTV name -> recurrence coverage fraction in [0, 1], or None when unknown.
        title: the figure's title (e.g. the case id).
        convention: "radiological" (default) or "neurological".
        density_levels: lower bounds of the density bands, increasing within (0, 1).

    Raises:
        ValueError: arrays of different shapes, an empty core, coverage outside [0, 1] or of
            an unknown CTV, too many CTVs, bad levels or affine.
    """
    fig = build_case_figure(
        background=background, background_name=background_name, affine=affine,
        density=density, core=core, edema=edema, ctvs=ctvs, recurrence=recurrence,
        volumes_ml=volumes_ml, coverage=coverage, title=title, convention=convention,
        density_levels=density_levels)
    return save_figure(fig, path)


# --------------------------------------------------------------------------- HTML

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

_CSS = """
@page { size: A4; margin: 10mm; }
* { box-sizing: border-box; }
body { font-family: "DejaVu Sans", Arial, Helvetica, sans-serif; font-size: 12px; color: #111;
       margin: 0 auto; max-width: 1180px; padding: 12px; }
h1 { font-size: 20px; margin: 0 0 4px 0; }
h2 { font-size: 14px; margin: 10px 0 4px 0; border-bottom: 1px solid #999; }
.sub { color: #444; margin-bottom: 8px; }
.warnings { background: #fff4ce; border: 2px solid #c98a00; padding: 6px 10px; margin: 6px 0; }
.warnings ul { margin: 2px 0 2px 18px; padding: 0; }
.nowarn { background: #e8f5e9; border: 1px solid #5a9a5e; padding: 4px 10px; margin: 6px 0; }
img.figure { width: 100%; height: auto; border: 1px solid #ccc; }
.cols { display: grid; grid-template-columns: 1fr 1fr; gap: 14px; }
table { border-collapse: collapse; width: 100%; }
th, td { border: 1px solid #bbb; padding: 2px 6px; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #eee; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 8px; font-weight: bold; }
.good { background: #c8e6c9; color: #1b5e20; }
.poor { background: #ffcdd2; color: #b71c1c; }
.unknown { background: #e0e0e0; color: #333; }
.small { font-size: 10px; }
.small td, .small th { padding: 1px 4px; }
@media print { body { max-width: none; padding: 0; } h2 { break-after: avoid; } }
"""


def _fmt(value: Any) -> str:
    """A value as short text: 4 significant digits for floats, plain otherwise."""
    if isinstance(value, bool) or value is None:
        return "-" if value is None else ("yes" if value else "no")
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value) if value else "none"
    return str(value)


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows = []
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            rows += _flatten(value, f"{name}.")
        else:
            rows.append((name, value))
    return rows


#: Plain-language names of the usual fit-quality keys (others are shown as they are).
_QUALITY_LABELS = {
    "dice_core": "Dice, re-simulated vs observed core",
    "dice_edema": "Dice, re-simulated vs observed edema",
}


def _key_value_table(mapping: Mapping[str, Any], css: str = "",
                     labels: Mapping[str, str] | None = None) -> str:
    if not mapping:
        return "<p>none recorded</p>"
    cls = f' class="{css}"' if css else ""
    labels = labels or {}
    rows = "".join(f"<tr><th>{html.escape(labels.get(k, k))}</th>"
                   f"<td>{html.escape(_fmt(v))}</td></tr>" for k, v in _flatten(mapping))
    return f"<table{cls}>{rows}</table>"


def _volumes_table(volumes_ml: Mapping[str, float], coverage: Mapping[str, float] | None) -> str:
    """Structure, volume and (when a recurrence is known) coverage, one row per structure."""
    head = "<tr><th>structure</th><th>volume (mL)</th>"
    head += "<th>recurrence coverage</th></tr>" if coverage else "</tr>"
    rows = []
    for name, volume in volumes_ml.items():
        cells = f"<td>{html.escape(str(name))}</td><td class=\"num\">{float(volume):.1f}</td>"
        if coverage:
            cov = f"{100 * float(coverage[name]):.1f} %" if name in coverage else "-"
            cells += f"<td class=\"num\">{cov}</td>"
        rows.append(f"<tr>{cells}</tr>")
    note = "" if coverage else "<p>Recurrence coverage: not known (no recurrence given).</p>"
    return f"<table>{head}{''.join(rows)}</table>{note}"


def _quality_section(fit_quality: Mapping[str, Any]) -> str:
    quality = str(fit_quality.get("quality", "unknown"))
    css = quality if quality in ("good", "poor") else "unknown"
    badge = f'<p>fit quality: <span class="badge {css}">{html.escape(quality)}</span></p>'
    reasons = [str(r) for r in fit_quality.get("reasons") or ()]
    listed = "".join(f"<li>{html.escape(r)}</li>" for r in reasons)
    listed = f"<ul>{listed}</ul>" if reasons else ""
    rest = {k: v for k, v in fit_quality.items() if k not in ("quality", "reasons")}
    return badge + listed + _key_value_table(rest, labels=_QUALITY_LABELS)


def _warnings_section(warnings: Sequence[str]) -> str:
    if not warnings:
        return '<div class="nowarn">No warnings.</div>'
    items = "".join(f"<li>{html.escape(str(w))}</li>" for w in warnings)
    return (f'<div class="warnings"><strong>Warnings ({len(warnings)})</strong>'
            f"<ul>{items}</ul></div>")


def _png_bytes(figure_png) -> bytes:
    if isinstance(figure_png, (bytes, bytearray)):
        data, source = bytes(figure_png), None
    else:
        source = Path(figure_png)
        try:
            data = source.read_bytes()
        except OSError as err:
            raise InputError(source, f"cannot read the report figure "
                             f"({err.strerror or err})") from None
    if not data.startswith(_PNG_SIGNATURE):
        raise InputError(source, "the report figure is not a PNG file")
    return data


def report_html(
    *,
    case_id: str,
    figure_png,
    volumes_ml: Mapping[str, float],
    coverage: Mapping[str, float] | None,
    fit_quality: Mapping[str, Any],
    warnings: Sequence[str],
    parameters: Mapping[str, Any],
    provenance: Mapping[str, Any],
) -> str:
    """The report page as a string (see :func:`case_report_html`)."""
    _check_coverage(coverage, list(volumes_ml), list(volumes_ml))
    encoded = base64.b64encode(_png_bytes(figure_png)).decode("ascii")
    case = html.escape(str(case_id))
    created = provenance.get("created")
    sub = f"rtjax {_fmt(provenance.get('rtjax_version'))}" + (
        f", created {created}" if created else "")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>rtjax case report: {case}</title>
<style>{_CSS}</style>
</head>
<body>
<h1>Case report: {case}</h1>
<div class="sub">{html.escape(sub)}. Research output of a tumour growth model; not a
treatment plan.</div>
{_warnings_section(warnings)}
<img class="figure" alt="axial, coronal and sagittal slices of case {case}"
 src="data:image/png;base64,{encoded}">
<div class="cols">
<section><h2>Volumes and recurrence coverage</h2>{_volumes_table(volumes_ml, coverage)}</section>
<section><h2>Fit quality</h2>{_quality_section(fit_quality)}</section>
</div>
<div class="cols">
<section><h2>Parameters</h2>{_key_value_table(parameters, "small")}</section>
<section><h2>Provenance</h2>{_key_value_table(provenance, "small")}</section>
</div>
</body>
</html>
"""


def case_report_html(
    path,
    *,
    case_id: str,
    figure_png,
    volumes_ml: Mapping[str, float],
    coverage: Mapping[str, float] | None,
    fit_quality: Mapping[str, Any],
    warnings: Sequence[str],
    parameters: Mapping[str, Any],
    provenance: Mapping[str, Any],
) -> Path:
    """Write the one-page, self-contained HTML report atomically and return its path.

    Args:
        path: output file (``report.html``).
        case_id: the case's name.
        figure_png: the report figure, a PNG file path or its bytes; embedded as base64.
        volumes_ml: structure name -> volume in mL (core, edema, each CTV, ...).
        coverage: CTV name -> recurrence coverage fraction in [0, 1]; None when unknown.
        fit_quality: e.g. ``dice_core``, ``dice_edema``, ``quality`` ("good" / "poor",
            shown as a badge) and ``reasons`` (list of str); other keys are listed too.
        warnings: plain-language warnings (atlas tissue, network segmentation, ...).
        parameters: the fit's parameters and the run options (nested mappings are
            flattened with dotted names).
        provenance: versions, git revision, creation time, inputs.

    Raises:
        InputError: the figure file cannot be read or is not a PNG (nothing is written).
        ValueError: a coverage outside [0, 1] or of a structure without a volume.
    """
    page = report_html(case_id=case_id, figure_png=figure_png, volumes_ml=volumes_ml,
                       coverage=coverage, fit_quality=fit_quality, warnings=warnings,
                       parameters=parameters, provenance=provenance)
    return write_text_atomic(path, page)
