"""One case through the pipeline: fit, density, CTVs, coverage, report; or the fit alone.

:func:`run_case` takes one case folder with a tumour segmentation ``seg`` and tissue maps
``wm``, ``gm`` (optional: ``brain_mask``, ``recurrence``, ``t1c`` / ``flair`` for the
figure), fits the growth model (:func:`rtjax.fit.fit_case`), builds the standard CTV
(``margin_mm`` from the tumour core, inside the brain) and the iso-volumetric model CTV
(the density cutoff whose volume matches the standard CTV within 1 %), and, when a
recurrence is given, their recurrence coverage. Every output is written on the input grid:

- ``segmentation.nii.gz``: the input labels re-encoded in the case's own label convention
  (``--labels``; ignored stray labels become background, BRATS 2015 non-enhancing tumour
  comes back as necrosis, see :func:`rtjax.labels.combine_labels`), uint8;
- ``density.nii.gz`` (float32), ``ctv_standard.nii.gz`` and ``ctv_model.nii.gz`` (uint8);
- ``params.json``: the fit, CTV volumes (mL), the cutoff, the resolved options, the inputs
  and :func:`rtjax.provenance.run_metadata`;
- ``coverage.json`` when a non-empty recurrence is given (:meth:`CaseCoverage.to_dict`);
- ``report.png``: orthogonal slices through the tumour;
- ``done.json``: the case summary, the marker that the case is complete.

Atomicity: everything is written into the sibling folder ``<out_dir>.partial``, which is
renamed to ``out_dir`` only when complete (``done.json`` included). An interrupted run
leaves at most a ``.partial`` folder, which the next run deletes; a folder without
``done.json`` is never trusted.

Missing inputs (:mod:`rtjax.pipeline.inputs`): a case without ``seg`` is segmented from its
``t1c`` and ``flair`` by the shipped network; a case without ``wm`` and ``gm`` gets the
MNI152 atlas registered to its t1/t1c (else to its brain_mask outline), written to
``tissue/`` and reused by a rerun. Both say so in a warning and in ``params.json``
(``inputs``).

:func:`fit_case_dir` is the fit alone (``rtjax fit``): ``density.nii.gz`` and
``params.json``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.ndimage import binary_fill_holes

from growth.fit import FitConfig
from rtjax.ctv import isovolumetric_cutoff, standard_ctv
from rtjax.errors import InputError
from rtjax.fit import CaseFit, fit_case
from rtjax.io import save_image
from rtjax.labels import combine_labels
from rtjax.pipeline.inputs import load_run_inputs, load_segmented_case
from rtjax.plotting import headless_pyplot, save_figure
from rtjax.provenance import run_metadata, write_json_atomic
from rtjax.study import case_coverage

__all__ = ["DONE", "run_case", "fit_case_dir", "save_case_report"]

#: The marker file of a complete case output.
DONE = "done.json"


def _brain(images) -> np.ndarray:
    if "brain_mask" in images:
        return images["brain_mask"].data.astype(bool)
    return binary_fill_holes(images["wm"].data + images["gm"].data > 0)


def _prepare_out(out_dir: Path) -> Path:
    """A fresh ``<out_dir>.partial`` (a stale one is deleted); refuses to later replace an
    existing ``out_dir`` that is not an rtjax case output."""
    if out_dir.exists() and not (out_dir / DONE).is_file() and any(out_dir.iterdir()):
        raise InputError(out_dir, f"output folder exists and is not an rtjax case output "
                         f"(no {DONE}); choose another --out or remove it")
    partial = out_dir.with_name(out_dir.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    return partial


def _commit(partial: Path, out_dir: Path) -> None:
    """Rename the complete ``partial`` folder to ``out_dir`` (replacing an earlier output)."""
    if out_dir.exists():
        old = out_dir.with_name(out_dir.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(out_dir, old)
        os.replace(partial, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(partial, out_dir)


def _target_volumes(masks, images, density, spacing, margin_mm: float):
    """(brain, standard CTV, cutoff, model CTV) of a fitted case."""
    brain = _brain(images)
    standard = standard_ctv(masks.core, brain, spacing, margin_mm)
    try:
        cutoff, model = isovolumetric_cutoff(density, standard, rtol=0.01)
    except ValueError as err:
        raise ValueError(f"iso-volumetric model CTV: the fitted density cannot match the "
                         f"{margin_mm:g} mm standard CTV's volume: {err}") from None
    return brain, standard, cutoff, model


def _ctv_record(masks, images, brain, standard, model, cutoff, margin_mm, vox_ml) -> dict:
    ml = lambda m: float(np.count_nonzero(m)) * vox_ml  # noqa: E731
    return {
        "margin_mm": float(margin_mm), "cutoff": cutoff,
        "core_volume_ml": ml(masks.core), "edema_volume_ml": ml(masks.edema),
        "brain_volume_ml": ml(brain), "brain_from": "brain_mask" if "brain_mask" in images
        else "wm + gm > 0, holes filled",
        "standard_volume_ml": ml(standard), "model_volume_ml": ml(model),
        "standard_voxels": int(standard.sum()), "model_voxels": int(model.sum()),
        "model_ctv": "iso-volumetric: density >= cutoff, volume within 1 % of the standard CTV",
    }


def _case_summary(case_id: str, ctv: dict, fit: CaseFit, coverage, written) -> dict:
    params = fit.info["scaled_parameters"]
    return {
        "case": case_id, "status": "done", "error": "",
        **{k: ctv[k] for k in ("core_volume_ml", "edema_volume_ml", "brain_volume_ml",
                               "margin_mm", "standard_volume_ml", "model_volume_ml", "cutoff")},
        **{k: params[k] for k in ("sqrt_dw_t_mm", "sqrt_rho_t", "dw_t_mm2", "rho_t", "u_t1", "u_fl")},
        **{k: fit.info[k] for k in ("dice_core", "dice_edema", "final_loss", "seconds")},
        "coverage": coverage,
        "outputs": sorted(p.name for p in written) + [DONE],
    }


def _background(images) -> np.ndarray:
    for name in ("t1c", "flair"):
        if name in images:
            return images[name].data
    return images["wm"].data + 0.5 * images["gm"].data


def _write_outputs(partial, case_id, masks, convention, images, fit, standard, model, ctv,
                   coverage, files, options) -> list[Path]:
    reference = images["seg"]
    written = [
        save_image(combine_labels(masks, convention), reference,
                   partial / "segmentation.nii.gz", kind="label"),
        save_image(fit.density, reference, partial / "density.nii.gz", kind="density"),
        save_image(standard, reference, partial / "ctv_standard.nii.gz", kind="mask"),
        save_image(model, reference, partial / "ctv_model.nii.gz", kind="mask"),
        write_json_atomic(partial / "params.json", {
            "case": case_id, "fit": fit.info, "loss_curve": fit.loss_curve, "ctv": ctv,
            "coverage": coverage, "options": options,
            "inputs": {k: str(v) for k, v in files.items()}, **run_metadata()}),
    ]
    if coverage is not None:
        written.append(write_json_atomic(partial / "coverage.json", coverage))
    recurrence = images["recurrence"].data if "recurrence" in images else None
    written.append(save_case_report(
        _background(images), fit.density, masks.core, masks.edema, standard, model,
        partial / "report.png", recurrence=recurrence,
        title=f"{case_id}: standard {ctv['standard_volume_ml']:.1f} mL, model cutoff {ctv['cutoff']:.3g}"))
    return written


def run_case(
    case_dir,
    out_dir,
    *,
    labels: str,
    ignore_labels: Sequence[int] = (),
    margin_mm: float = 15.0,
    overrides: Mapping[str, Any] | None = None,
    initial: str = "network",
    fit_iterations: int = 150,
    weights=None,
    progress: bool = True,
) -> dict[str, Any]:
    """The whole pipeline for one segmented case folder (see the module docstring).

    Args:
        case_dir: folder with ``seg``, ``wm``, ``gm`` [``brain_mask``, ``recurrence``,
            ``t1c``, ``flair``].
        out_dir: output folder (written via ``<out_dir>.partial``, then renamed).
        labels: label convention of ``seg`` (:data:`rtjax.labels.CONVENTIONS`).
        ignore_labels: stray label values to set to background explicitly.
        margin_mm: standard CTV margin from the tumour core, mm.
        overrides: canonical name -> file, as in :func:`rtjax.io.find_case_files`.
        initial: fit start, "network" or "heuristic".
        fit_iterations: refinement iterations at most.
        weights: inverse-network weights folder (default: shipped).

    Returns:
        The case summary (also ``done.json``): volumes (mL), cutoff, fitted parameters,
        coverage (or None) and the output file names.

    Raises:
        InputError: missing or inconsistent inputs, naming the file or folder.
        ValueError: the fit or the CTVs cannot be computed (e.g. no cutoff within 1 %).
    """
    case_dir, out_dir = Path(case_dir), Path(out_dir)
    case_id = case_dir.name
    partial = _prepare_out(out_dir)
    try:
        files, convention, masks, images = load_run_inputs(
            case_dir, labels, ignore_labels, overrides,
            atlas_tissue_dirs=(partial / "tissue", out_dir / "tissue"))
        reference = images["seg"]
        spacing, vox_ml = reference.spacing, reference.voxel_volume_ml
        fit = fit_case(masks, images["wm"].data, images["gm"].data, spacing, initial=initial,
                       weights=weights, config=FitConfig(max_iterations=int(fit_iterations)),
                       progress=progress)
        brain, standard, cutoff, model = _target_volumes(masks, images, fit.density, spacing, margin_mm)
        coverage = None
        if "recurrence" in images and images["recurrence"].data.any():
            coverage = case_coverage(case_id, images["recurrence"].data, masks.core, brain,
                                     fit.density, spacing, vox_ml, margin_mm=margin_mm).to_dict()
        ctv = _ctv_record(masks, images, brain, standard, model, cutoff, margin_mm, vox_ml)
        options = {"labels": convention.name, "ignore_labels": [int(v) for v in ignore_labels],
                   "margin_mm": float(margin_mm), "start": initial,
                   "iterations": int(fit_iterations),
                   "weights": None if weights is None else str(weights)}
        written = _write_outputs(partial, case_id, masks, convention, images, fit, standard,
                                 model, ctv, coverage, files, options)
        summary = _case_summary(case_id, ctv, fit, coverage, written)
        write_json_atomic(partial / DONE, summary)
        _commit(partial, out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return summary


def fit_case_dir(
    case_dir,
    out_dir,
    *,
    labels: str,
    ignore_labels=(),
    overrides=None,
    initial="network",
    progress: bool = True,
    **fit_options,
):
    """Fit one case folder (its `seg`, `wm`, `gm`; `overrides` names other files, and an
    `edema` override gives the edema as a separate mask, as in TUM/Lipkova data) and write
    `density.nii.gz` and `params.json` into `out_dir`; returns (CaseFit, paths).
    """
    files, convention, masks, images = load_segmented_case(
        case_dir, labels=labels, ignore_labels=ignore_labels, overrides=overrides, extras=(),
        atlas_tissue_dirs=(Path(out_dir) / "tissue",), segment_missing=True)
    reference = images["seg"]
    if masks.is_empty():
        raise InputError(files["seg"], "empty tumour: no core and no edema voxels to fit")
    result = fit_case(masks, images["wm"].data, images["gm"].data, reference.spacing,
                      initial=initial, progress=progress, **fit_options)
    index = np.asarray(result.info["origin_canonical_voxel"], float)
    world = reference.voxel_to_world(index)
    file_vox = np.linalg.solve(reference.original_affine, np.append(world, 1.0))[:3]
    result.info.update({
        "origin_world_mm": np.round(world, 3).tolist(),
        "origin_file_voxel": np.round(file_vox, 3).tolist(),
        "labels": convention.name,
        "ignored_labels": list(ignore_labels),
        "inputs": {k: str(v) for k, v in files.items()},
    })
    out_dir = Path(out_dir)
    paths = [
        save_image(result.density, reference, out_dir / "density.nii.gz", kind="density"),
        write_json_atomic(out_dir / "params.json", {**result.info, "loss_curve": result.loss_curve,
                                                     **run_metadata()}),
    ]
    return result, paths


def save_case_report(
    background: np.ndarray,
    density: np.ndarray,
    core: np.ndarray,
    edema: np.ndarray,
    standard: np.ndarray,
    model: np.ndarray,
    path,
    *,
    recurrence: np.ndarray | None = None,
    title: str = "",
) -> Path:
    """Axial, coronal and sagittal slices (canonical RAS arrays) through the tumour core's
    centre: the background image, density contours (0.01, 0.1, 0.3, 0.6), core / edema /
    recurrence outlines and both CTV outlines; written atomically as PNG."""
    plt = headless_pyplot()
    from matplotlib.lines import Line2D

    i, j, k = (int(round(v)) for v in np.argwhere(core).mean(axis=0))
    views = [("axial", lambda a: a[:, :, k].T), ("coronal", lambda a: a[:, j, :].T),
             ("sagittal", lambda a: a[i, :, :].T)]
    outlines = [("core", core, "lime", "-"), ("edema", edema, "cyan", "-"),
                ("standard CTV", standard, "yellow", "--"), ("model CTV", model, "red", "-")]
    if recurrence is not None:
        outlines.append(("recurrence", recurrence, "magenta", ":"))
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.8), constrained_layout=True)
    for ax, (name, cut) in zip(axes, views):
        ax.imshow(cut(background), cmap="gray", origin="lower")
        dens = cut(density)
        if dens.max() > 0.01:
            ax.contour(dens, levels=[0.01, 0.1, 0.3, 0.6], colors="orange", linewidths=0.6)
        for _, mask, colour, style in outlines:
            sl = cut(mask.astype(float))
            if sl.any():
                ax.contour(sl, levels=[0.5], colors=colour, linewidths=1.0, linestyles=style)
        ax.set_title(name)
        ax.axis("off")
    handles = [Line2D([], [], color=c, ls=s, label=n) for n, _, c, s in outlines]
    handles.append(Line2D([], [], color="orange", lw=0.6, label="density 0.01/0.1/0.3/0.6"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)
