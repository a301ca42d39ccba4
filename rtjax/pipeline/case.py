"""One case through the pipeline: fit, density, CTVs, coverage, report; or the fit alone.

:func:`run_case` takes one case folder with a tumour segmentation ``seg`` and tissue maps
``wm``, ``gm`` (optional: ``brain_mask``, ``recurrence``, ``t1c`` / ``flair`` for the
figure; any of them named explicitly by ``overrides`` or by glob patterns ``names``, or
DICOM series converted on entry), fits the growth model (:func:`rtjax.fit.fit_case`),
builds the standard CTV (``margin_mm`` from the tumour core, inside the brain), the
iso-volumetric model CTV (the density cutoff whose volume matches the standard CTV within
1 %, inside the brain) and a model CTV per requested density cutoff (inside the brain),
and, when a recurrence is given, their recurrence coverage. Every output is written on the
input grid:

- ``segmentation.nii.gz``: the input labels re-encoded in the case's own label convention
  (``--labels``; ignored stray labels become background, BRATS 2015 non-enhancing tumour
  comes back as necrosis, see :func:`rtjax.labels.combine_labels`), uint8; with
  ``segmentation_uncertainty.nii.gz`` when the network segmented the case, and
  ``edema.nii.gz`` when the edema came as its own file in a convention without an edema
  label (``--labels tum --edema ...``);
- ``density.nii.gz`` (float32, as fitted), ``ctv_standard.nii.gz``, ``ctv_model.nii.gz``
  and ``ctv_model_c<cutoff>.nii.gz`` per cutoff (uint8; model CTVs = density >= cutoff
  inside the brain);
- ``params.json``: the fit, its quality (``quality`` "good" / "poor", ``quality_reasons``,
  :mod:`rtjax.pipeline.quality`), CTV volumes (mL), the cutoffs, the resolved options, the
  inputs (absolute paths) and :func:`rtjax.provenance.run_metadata`;
- ``coverage.json`` when a non-empty recurrence is given (:meth:`CaseCoverage.to_dict`
  plus ``cutoff_ctvs``; the recurrence is counted inside the brain, the part outside
  recorded and warned about);
- ``report.png`` and ``report.html`` (:mod:`rtjax.report`);
- ``dicom/`` (converted NIfTI and ``dicom_series.json``) for a DICOM case, ``rtstruct.dcm``
  (and ``mr_t1c/`` for a NIfTI case) with ``rtstruct``;
- ``done.json``: the case summary, the marker that the case is complete.

Before any heavy work every option (:class:`rtjax.pipeline.options.RunOptions`), the
named files, the output folder (:func:`rtjax.pipeline.outdir.check_out_dir`) and the
case's files (:func:`rtjax.pipeline.inputs.check_case_inputs`) are checked, in that order.

Atomicity: everything is written into the sibling folder ``<out_dir>.partial``, which is
renamed to ``out_dir`` only when complete (``done.json`` included); ``<out_dir>.lock``
keeps a second process out meanwhile. An interrupted run leaves at most a ``.partial``
folder, which the next run deletes; a folder without ``done.json`` is never trusted.

Missing inputs (:mod:`rtjax.pipeline.inputs`): a case without ``seg`` is segmented from its
``t1c`` and ``flair`` by the shipped network; a case without ``wm`` and ``gm`` gets the
MNI152 atlas registered to its t1/t1c (else to its brain_mask outline), written to
``tissue/`` and reused by a rerun. Both say so in a warning, in ``params.json``
(``inputs``) and in the report.

:func:`fit_case_dir` is the fit alone (``rtjax fit``): ``density.nii.gz`` and
``params.json``.
"""

from __future__ import annotations

import contextlib
import shutil
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.ndimage import binary_fill_holes

from growth.fit import FitConfig
from rtjax.anatomy import target_image
from rtjax.config import to_dict
from rtjax.ctv import ctv_probability, cutoff_ctvs, isovolumetric_cutoff, probability_ranked_ctv, standard_ctv
from rtjax.dicom import DICOM_DIR, convert_case_dicom, has_dicom_series
from rtjax.errors import InputError
from rtjax.fit import CaseFit, fit_case, fit_ensemble
from rtjax.io import save_image
from rtjax.labels import TumourMasks, combine_labels
from rtjax.pipeline.inputs import (
    case_overrides,
    check_case_inputs,
    load_case_dti,
    load_run_inputs,
    load_segmented_case,
)
from rtjax.pipeline.options import RunOptions
from rtjax.pipeline.outdir import DONE, OutputLock, check_out_dir, commit, fresh_partial
from rtjax.pipeline.quality import QualityWarning, assess_quality, segmentation_uncertainty
from rtjax.provenance import run_metadata, write_json_atomic
from rtjax.report import background_image, case_figure, case_report_html, mask_volumes_ml
from rtjax.rtstruct import export_rtstruct
from rtjax.study import case_coverage
from rtjax.study import coverage as coverage_of

__all__ = ["DONE", "EDEMA_FILE", "cutoff_file", "run_case", "fit_case_dir"]

#: The edema of a case whose label convention has no edema label (given with --edema).
EDEMA_FILE = "edema.nii.gz"


def cutoff_file(cutoff: float) -> str:
    """The file name of the model CTV at a density cutoff: ``ctv_model_c<cutoff>.nii.gz``."""
    return f"ctv_model_c{cutoff:g}.nii.gz"


def _labelled(masks: TumourMasks, convention) -> TumourMasks:
    """The masks a label map of the convention can hold: a separate edema (TUM/Lipkova,
    whose convention has no edema label) goes to its own file, :data:`EDEMA_FILE`."""
    if convention.edema:
        return masks
    return TumourMasks(necrosis=masks.necrosis, enhancing=masks.enhancing,
                       edema=np.zeros_like(masks.edema))


def _brain(images) -> np.ndarray:
    if "brain_mask" in images:
        return images["brain_mask"].data.astype(bool)
    return binary_fill_holes(images["wm"].data + images["gm"].data > 0)


def _ml(mask, voxel_mm3: float) -> float:
    """Volume of a mask in mL, count x mm^3 / 1000 (no float noise for round voxel sizes)."""
    return float(np.count_nonzero(mask)) * voxel_mm3 / 1000.0


@contextlib.contextmanager
def _collected_warnings():
    """Shows warnings as usual and collects their messages (for the report)."""
    seen: list[str] = []
    with warnings.catch_warnings():
        previous = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            seen.append(str(message))
            previous(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield seen


def _target_volumes(masks, images, density, spacing, margin_mm: float, cutoffs):
    """(brain, density inside the brain, standard CTV, cutoff, model CTV, {cutoff: CTV})."""
    brain = _brain(images)
    inside = np.where(brain, density, np.float32(0))
    standard = standard_ctv(masks.core, brain, spacing, margin_mm)
    try:
        cutoff, model = isovolumetric_cutoff(inside, standard, rtol=0.01)
    except ValueError as err:
        raise ValueError(f"iso-volumetric model CTV: the fitted density cannot match the "
                         f"{margin_mm:g} mm standard CTV's volume: {err}") from None
    return brain, inside, standard, cutoff, model, cutoff_ctvs(inside, brain, cutoffs)


def _probabilistic(ensemble, standard, brain, images, mm3) -> dict:
    """The probabilistic CTV of an ensemble fit: mean / sd density, the CTV probability
    (fraction of accepted members whose iso-volumetric CTV holds the voxel), the members
    and, with a recurrence, the coverage of p >= 0.5, p >= 0.9 and of the
    probability-ranked CTV of the standard CTV's volume."""
    mean = np.where(brain, ensemble.mean, np.float32(0))
    probability, cutoffs = ctv_probability(ensemble.densities, standard, inside=brain)
    record = {"members": ensemble.members, "accepted": len(ensemble.densities),
              "member_cutoffs": cutoffs, "mean": mean,
              "sd": np.where(brain, ensemble.sd, np.float32(0)), "probability": probability,
              "coverage": None}
    if "recurrence" in images and (images["recurrence"].data & brain).any():
        recurrence = images["recurrence"].data.astype(bool) & brain
        ranked = probability_ranked_ctv(probability, mean, standard)
        record["coverage"] = {
            **{f"p>={level:g}": {"volume_ml": _ml(probability >= level, mm3),
                                 "coverage": coverage_of(recurrence, probability >= level)}
               for level in (0.5, 0.9)},
            "ranked_at_standard_volume": {"volume_ml": _ml(ranked, mm3),
                                          "coverage": coverage_of(recurrence, ranked)},
        }
    return record


def _ctv_record(masks, images, brain, standard, model, cutoff, by_cutoff, margin_mm, mm3) -> dict:
    return {
        "margin_mm": float(margin_mm), "cutoff": cutoff,
        "core_volume_ml": _ml(masks.core, mm3), "edema_volume_ml": _ml(masks.edema, mm3),
        "brain_volume_ml": _ml(brain, mm3), "brain_from": "brain_mask" if "brain_mask" in images
        else "wm + gm > 0, holes filled",
        "standard_volume_ml": _ml(standard, mm3), "model_volume_ml": _ml(model, mm3),
        "standard_voxels": int(standard.sum()), "model_voxels": int(model.sum()),
        "model_ctv": "iso-volumetric: density >= cutoff inside the brain, volume within 1 % "
                     "of the standard CTV",
        "cutoff_ctvs": [{"cutoff": c, "file": cutoff_file(c), "volume_ml": _ml(m, mm3),
                         "voxels": int(m.sum())} for c, m in by_cutoff.items()],
    }


def _coverage(case_id, images, masks, brain, inside, spacing, mm3, margin_mm, by_cutoff):
    """coverage.json's content (None without a recurrence): the recurrence inside the brain
    (no CTV reaches outside it), the part outside recorded and warned about."""
    if "recurrence" not in images or not images["recurrence"].data.any():
        return None
    recurrence = images["recurrence"].data.astype(bool)
    outside = recurrence & ~brain
    if outside.any():
        warnings.warn(f"{case_id}: {int(outside.sum())} recurrence voxels "
                      f"({_ml(outside, mm3):.2f} mL) lie outside the brain mask, where no CTV "
                      "reaches; coverage counts the recurrence inside the brain", stacklevel=3)
    recurrence &= brain
    if not recurrence.any():
        warnings.warn(f"{case_id}: the whole recurrence lies outside the brain mask; no "
                      "coverage", stacklevel=3)
        return None
    record = case_coverage(case_id, recurrence, masks.core, brain, inside, spacing,
                           mm3 / 1000.0, margin_mm=margin_mm).to_dict()
    record["recurrence_volume_ml"] = _ml(recurrence, mm3)
    record["recurrence_outside_brain_ml"] = _ml(outside, mm3)
    record["cutoff_ctvs"] = [{"cutoff": c, "volume_ml": _ml(m, mm3),
                              "coverage": coverage_of(recurrence, m)} for c, m in by_cutoff.items()]
    return record


def _case_summary(case_id: str, ctv: dict, fit: CaseFit, quality: dict, coverage, outputs,
                  options: RunOptions) -> dict:
    params = fit.info["scaled_parameters"]
    return {
        "case": case_id, "status": "done", "error": "", "run_options": to_dict(options),
        "quality": quality["quality"], "quality_reasons": quality["reasons"],
        **{k: ctv[k] for k in ("core_volume_ml", "edema_volume_ml", "brain_volume_ml",
                               "margin_mm", "standard_volume_ml", "model_volume_ml", "cutoff")},
        "cutoff_ctvs": ctv["cutoff_ctvs"],
        **{k: params[k] for k in ("sqrt_dw_t_mm", "sqrt_rho_t", "dw_t_mm2", "rho_t", "u_t1", "u_fl")},
        **{k: fit.info[k] for k in ("dice_core", "dice_edema", "final_loss", "seconds")},
        "coverage": coverage,
        "outputs": sorted(outputs) + [DONE],
    }


def _inputs_record(files, partial: Path | None = None, out_dir: Path | None = None) -> dict[str, str]:
    """Input files as absolute paths (those converted into ``partial``, e.g. from DICOM, at
    their final place in ``out_dir``); generated ones (a network segmentation, the atlas
    tissue folder of the output) as their description."""
    record = {}
    for key, value in files.items():
        if isinstance(value, Path) and key != "tissue":
            value = value.absolute()
            if partial is not None and value.is_relative_to(partial.absolute()):
                value = out_dir.absolute() / value.relative_to(partial.absolute())
        record[key] = str(value)
    return record


def _ctv_names(margin_mm, by_cutoff) -> dict[str, str]:
    names = {"standard": f"CTV standard {margin_mm:g} mm", "model": "CTV model (iso-volumetric)"}
    names.update({c: f"CTV model, density >= {c:g}" for c in by_cutoff})
    return names


def _report(partial, case_id, masks, images, files, fit, standard, model, by_cutoff, ctv,
            coverage, quality, margin_mm, seen_warnings, provenance) -> list[Path]:
    """report.png and report.html."""
    reference = images["seg"]
    names = _ctv_names(margin_mm, by_cutoff)
    ctvs = {names["standard"]: standard, names["model"]: model,
            **{names[c]: m for c, m in by_cutoff.items()}}
    volumes = mask_volumes_ml({"core": masks.core, "edema": masks.edema, **ctvs}, reference.affine)
    cov = None
    if coverage is not None:
        cov = {names["standard"]: coverage["standard_coverage"],
               names["model"]: coverage["model_coverage"],
               **{names[e["cutoff"]]: e["coverage"] for e in coverage["cutoff_ctvs"]}}
        volumes["recurrence"] = coverage["recurrence_volume_ml"]
    background, background_name = background_image(images, atlas_tissue="tissue" in files)
    recurrence = images["recurrence"].data if "recurrence" in images else None
    figure = case_figure(
        partial / "report.png", background=background, background_name=background_name,
        affine=reference.affine, density=fit.density, core=masks.core, edema=masks.edema,
        ctvs=ctvs, recurrence=recurrence, volumes_ml=volumes, coverage=cov,
        title=f"{case_id}: fit quality {quality['quality']}, model CTV density >= {ctv['cutoff']:.3g}")
    fit_quality = {"quality": quality["quality"], "reasons": quality["reasons"],
                   **{k: v for k, v in quality["checks"].items() if v is not None}}
    parameters = {**fit.info["scaled_parameters"], "cutoff": ctv["cutoff"]}
    page = case_report_html(
        partial / "report.html", case_id=case_id, figure_png=figure, volumes_ml=volumes,
        coverage=cov, fit_quality=fit_quality, warnings=list(dict.fromkeys(seen_warnings)),
        parameters={"fit": parameters, "options": provenance["options"]},
        provenance={k: v for k, v in provenance.items() if k != "options"})
    return [figure, page]


def _check_rtstruct_source(case_dir, files, dicom: bool) -> None:
    if not dicom and "t1c" not in files:
        raise InputError(case_dir, "--rtstruct needs a T1c (t1c.nii.gz, or name it with --t1c) "
                         "to write the MR series the structure set refers to")


def _as_tuple(value) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def _dti_fit_options(tensor, options: RunOptions) -> dict:
    """`fit_case` keywords of the anisotropic fit (none without a tensor): r fixed, or a
    (r_lo, r_hi) range to fit."""
    if tensor is None:
        return {}
    r = options.anisotropy
    return {"tensor": tensor, "anisotropy": r[0] if len(r) == 1 else tuple(r),
            "tensor_method": options.tensor_method}


def _check_dti_atlas_target(case_dir, files, options: RunOptions) -> None:
    """An atlas DTI is carried by a registration: the case needs a t1, t1c or brain_mask
    (unless it has DTI of its own, which then wins)."""
    if options.dti_atlas is None or any(n in files for n in ("tensor", "fa", "peaks")):
        return
    if target_image(files) is None:
        raise InputError(case_dir, "--dti-atlas: no t1, t1c or brain_mask to register the "
                         "atlas (and its DTI) to")


def run_case(
    case_dir,
    out_dir,
    *,
    labels: str,
    ignore_labels: Sequence[int] = (),
    margin_mm: float = 15.0,
    overrides: Mapping[str, Any] | None = None,
    names: Mapping[str, str] | None = None,
    series: Mapping[str, str] | None = None,
    cutoffs: Sequence[float] = (),
    rtstruct: bool = False,
    overwrite: bool = False,
    initial: str = "network",
    fit_iterations: int = 150,
    tensor_frame: str | None = None,
    anisotropy: float | Sequence[float] = 5.0,
    tensor_method: str = "scaled",
    dti_atlas: Sequence[str | Path] | None = None,
    ensemble: bool = False,
    weights=None,
    progress: bool = True,
) -> dict[str, Any]:
    """The whole pipeline for one case folder (see the module docstring).

    Args:
        case_dir: folder with ``seg``, ``wm``, ``gm`` [``brain_mask``, ``recurrence``,
            ``t1c``, ``flair``], or DICOM series (role subfolders, or ``series``).
        out_dir: output folder (written via ``<out_dir>.partial``, then renamed).
        labels: label convention of ``seg`` (:data:`rtjax.labels.CONVENTIONS`).
        ignore_labels: stray label values to set to background explicitly.
        margin_mm: standard CTV margin from the tumour core, mm, in (0, 50].
        overrides: role -> file (a bare name is taken in the case folder), e.g.
            ``{"seg": "segm.nii.gz"}``; an ``edema`` file gives the edema separately.
        names: role -> glob pattern matched in the case folder (one file each).
        series: role -> DICOM SeriesInstanceUID, picking each role's series from the DICOM
            files under ``case_dir`` (:func:`rtjax.dicom.parse_series`).
        cutoffs: density cutoffs in (0, 1) of extra model CTVs.
        rtstruct: also write ``rtstruct.dcm`` (:func:`rtjax.rtstruct.export_rtstruct`).
        overwrite: replace an earlier rtjax output in ``out_dir`` (else it is refused).
        initial: fit start, "network" or "heuristic".
        fit_iterations: refinement iterations at most.
        tensor_frame: frame of the case's DTI files ("fsl", "voxel", "world"; default
            "fsl" for a ``tensor``, "world" for ``fa`` + ``peaks``).
        anisotropy: r of the tumour tensor: a number (fixed) or (r_lo, r_hi) (fitted).
        tensor_method: "scaled" or "westin" (`growth.tumour_tensor`).
        dti_atlas: (FA, PEAKS) of a population DTI in the MNI152 frame for a case without
            its own DTI, carried to it by the atlas registration.
        ensemble: also fit an ensemble of starts (:func:`rtjax.fit.fit_ensemble`) and
            write ``density_mean``, ``density_sd`` and ``ctv_probability`` (the fraction of
            members whose iso-volumetric CTV holds the voxel); coverage.json then has the
            probabilistic CTVs' coverage (p >= 0.5, p >= 0.9, the probability-ranked CTV at
            the standard volume).
        weights: inverse-network weights folder (default: shipped).

    A case with DTI (its ``tensor``, or ``fa`` + ``peaks``, or ``dti_atlas``) is fitted
    with the anisotropic growth model along its fibres (`rtjax.fit.fit_case`).

    Returns:
        The case summary (also ``done.json``): volumes (mL), cutoffs, fit quality, fitted
        parameters, coverage (or None) and the output file names.

    Raises:
        OptionsError: bad options (all named, before anything else).
        InputError: missing or inconsistent inputs, or an output folder that cannot or
            must not be written, naming the file or folder (before any heavy work).
        ValueError: the fit or the CTVs cannot be computed (e.g. no cutoff within 1 %).
    """
    options = RunOptions(labels=labels, ignore_labels=tuple(ignore_labels), margin_mm=margin_mm,
                         start=initial, iterations=fit_iterations, cutoffs=tuple(cutoffs),
                         rtstruct=bool(rtstruct), names=dict(names or {}),
                         tensor_frame=tensor_frame, anisotropy=_as_tuple(anisotropy),
                         tensor_method=tensor_method,
                         dti_atlas=None if dti_atlas is None else tuple(str(p) for p in dti_atlas),
                         ensemble=bool(ensemble))
    case_dir, out_dir = Path(case_dir), Path(out_dir)
    given = case_overrides(case_dir, overrides, options.names)
    dicom = bool(series) or has_dicom_series(case_dir)
    check_out_dir(out_dir, overwrite=overwrite)
    if not dicom:
        files = check_case_inputs(case_dir, given, segment_missing=True, atlas_tissue=True)
        if options.rtstruct:
            _check_rtstruct_source(case_dir, files, dicom)
        _check_dti_atlas_target(case_dir, files, options)
    with OutputLock(out_dir), _collected_warnings() as seen:
        partial = fresh_partial(out_dir)
        try:
            summary = _run(case_dir, out_dir, partial, options, given, series, dicom, weights,
                           progress, seen)
            commit(partial, out_dir)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    return summary


def _run(case_dir, out_dir, partial, options: RunOptions, given, series, dicom, weights,
         progress, seen) -> dict:
    case_id = case_dir.name
    written = []
    if dicom:
        converted, _ = convert_case_dicom(case_dir, partial / DICOM_DIR, series)
        given = {**converted, **given}
        written.append(DICOM_DIR)
        files = check_case_inputs(case_dir, given, segment_missing=True, atlas_tissue=True)
        if options.rtstruct:
            _check_rtstruct_source(case_dir, files, dicom)
    files, convention, masks, images = load_run_inputs(
        case_dir, options.labels, options.ignore_labels, given,
        atlas_tissue_dirs=(partial / "tissue", out_dir / "tissue"), atlas_dti=options.dti_atlas)
    reference = images["seg"]
    spacing = reference.spacing
    mm3 = float(abs(np.linalg.det(reference.affine[:3, :3])))
    tensor, dti = load_case_dti(files, reference, masks.whole, frame=options.tensor_frame)
    config = FitConfig(max_iterations=options.iterations)
    fit_args = (masks, images["wm"].data, images["gm"].data, spacing)
    fit_kwargs = dict(weights=weights, config=config, progress=progress, **_dti_fit_options(tensor, options))
    if options.ensemble:
        ensemble = fit_ensemble(*fit_args, **fit_kwargs)
        fit = ensemble.point
    else:
        ensemble, fit = None, fit_case(*fit_args, initial=options.start, **fit_kwargs)
    fit.info["dti"] = dti
    brain, inside, standard, cutoff, model, by_cutoff = _target_volumes(
        masks, images, fit.density, spacing, options.margin_mm, options.cutoffs)
    coverage = _coverage(case_id, images, masks, brain, inside, spacing, mm3,
                         options.margin_mm, by_cutoff)
    probabilistic = None if ensemble is None else _probabilistic(ensemble, standard, brain, images, mm3)
    if probabilistic is not None:
        prob_coverage = probabilistic.pop("coverage")
        if coverage is not None and prob_coverage is not None:
            coverage["probabilistic"] = prob_coverage
    ctv = _ctv_record(masks, images, brain, standard, model, cutoff, by_cutoff,
                      options.margin_mm, mm3)
    unc = (segmentation_uncertainty(images["seg_uncertainty"].data, masks.whole)
           if "seg_uncertainty" in images else None)
    quality = assess_quality(fit.info, masks.core, spacing, seg_uncertainty=unc,
                             thresholds_fitted=config.fit_thresholds)
    if quality["quality"] == "poor":
        warnings.warn(QualityWarning(f"{case_id}: the fit is poor, do not trust its model CTV as "
                                     "it is: " + "; ".join(quality["reasons"])), stacklevel=2)
    run_options = {"labels": convention.name, "ignore_labels": list(options.ignore_labels),
                   "margin_mm": options.margin_mm, "start": options.start,
                   "iterations": options.iterations, "cutoffs": list(options.cutoffs),
                   "rtstruct": options.rtstruct, "names": dict(options.names),
                   "tensor_frame": options.tensor_frame, "anisotropy": list(options.anisotropy),
                   "tensor_method": options.tensor_method, "ensemble": options.ensemble,
                   "dti_atlas": None if options.dti_atlas is None else list(options.dti_atlas),
                   "series": dict(series or {}),
                   "weights": None if weights is None else str(Path(weights).absolute())}
    provenance = {"case": case_id, "inputs": _inputs_record(files, partial, out_dir),
                  "options": run_options,
                  **run_metadata()}
    images_out = [
        (combine_labels(_labelled(masks, convention), convention), "segmentation.nii.gz", "label"),
        (fit.density, "density.nii.gz", "density"),
        (standard, "ctv_standard.nii.gz", "mask"),
        (model, "ctv_model.nii.gz", "mask"),
        *((m, cutoff_file(c), "mask") for c, m in by_cutoff.items()),
    ]
    if probabilistic is not None:
        images_out += [(probabilistic.pop("mean"), "density_mean.nii.gz", "density"),
                       (probabilistic.pop("sd"), "density_sd.nii.gz", "density"),
                       (probabilistic.pop("probability"), "ctv_probability.nii.gz", "float")]
    if not convention.edema and masks.edema.any():
        images_out.append((masks.edema, EDEMA_FILE, "mask"))
    if "seg_uncertainty" in images:
        images_out.append((images["seg_uncertainty"].data, "segmentation_uncertainty.nii.gz", "float"))
    for array, name, kind in images_out:
        written.append(save_image(array, reference, partial / name, kind=kind).name)
    written.append(write_json_atomic(partial / "params.json", {
        "case": case_id, "quality": quality["quality"], "quality_reasons": quality["reasons"],
        "quality_checks": quality["checks"], "fit": fit.info, "loss_curve": fit.loss_curve,
        "ctv": ctv, "coverage": coverage, "ensemble": probabilistic,
        "warnings": list(dict.fromkeys(seen)),
        **provenance}).name)
    if coverage is not None:
        written.append(write_json_atomic(partial / "coverage.json", coverage).name)
    written += [p.name for p in _report(partial, case_id, masks, images, files, fit, standard,
                                        model, by_cutoff, ctv, coverage, quality,
                                        options.margin_mm, seen, provenance)]
    if "tissue" in files:
        written.append("tissue")
    if options.rtstruct:
        exported = export_rtstruct(partial)
        written.append(exported["rtstruct"].name)
        if exported["mr_series"] is not None:
            written.append(exported["mr_series"].name)
    summary = _case_summary(case_id, ctv, fit, quality, coverage, written, options)
    write_json_atomic(partial / DONE, summary)
    return summary


def fit_case_dir(
    case_dir,
    out_dir,
    *,
    labels: str,
    ignore_labels=(),
    overrides=None,
    names=None,
    initial="network",
    tensor_frame: str | None = None,
    anisotropy: float | Sequence[float] = 5.0,
    tensor_method: str = "scaled",
    dti_atlas: Sequence[str | Path] | None = None,
    progress: bool = True,
    **fit_options,
):
    """Fit one case folder (its `seg`, `wm`, `gm`; `overrides` names other files, `names`
    glob patterns, and an `edema` override gives the edema as a separate mask, as in
    TUM/Lipkova data) and write `density.nii.gz` and `params.json` (with the fit quality,
    :mod:`rtjax.pipeline.quality`) into `out_dir`; returns (CaseFit, paths). With DTI
    (the case's `tensor` or `fa` + `peaks`, or `dti_atlas`) the fit is anisotropic
    (options as in :func:`run_case`).
    """
    options = RunOptions(labels=labels, start=initial, tensor_frame=tensor_frame,
                         anisotropy=_as_tuple(anisotropy), tensor_method=tensor_method,
                         dti_atlas=None if dti_atlas is None else tuple(str(p) for p in dti_atlas))
    given = case_overrides(case_dir, overrides, names)
    files = check_case_inputs(case_dir, given, extras=(), segment_missing=True, atlas_tissue=True)
    _check_dti_atlas_target(case_dir, files, options)
    files, convention, masks, images = load_segmented_case(
        case_dir, labels=labels, ignore_labels=ignore_labels, overrides=given, extras=(),
        atlas_tissue_dirs=(Path(out_dir) / "tissue",), segment_missing=True,
        atlas_dti=options.dti_atlas)
    reference = images["seg"]
    if masks.is_empty():
        raise InputError(files["seg"], "empty tumour: no core and no edema voxels to fit")
    tensor, dti = load_case_dti(files, reference, masks.whole, frame=options.tensor_frame)
    result = fit_case(masks, images["wm"].data, images["gm"].data, reference.spacing,
                      initial=initial, progress=progress, **_dti_fit_options(tensor, options),
                      **fit_options)
    result.info["dti"] = dti
    index = np.asarray(result.info["origin_canonical_voxel"], float)
    world = reference.voxel_to_world(index)
    file_vox = np.linalg.solve(reference.original_affine, np.append(world, 1.0))[:3]
    config = fit_options.get("config") or FitConfig()
    quality = assess_quality(result.info, masks.core, reference.spacing,
                             thresholds_fitted=config.fit_thresholds)
    if quality["quality"] == "poor":
        warnings.warn(QualityWarning(f"{Path(case_dir).name}: the fit is poor: "
                                     + "; ".join(quality["reasons"])), stacklevel=2)
    result.info.update({
        "origin_world_mm": np.round(world, 3).tolist(),
        "origin_file_voxel": np.round(file_vox, 3).tolist(),
        "labels": convention.name,
        "ignored_labels": list(ignore_labels),
        "inputs": _inputs_record(files),
        "quality": quality["quality"],
        "quality_reasons": quality["reasons"],
        "quality_checks": quality["checks"],
    })
    out_dir = Path(out_dir)
    paths = [
        save_image(result.density, reference, out_dir / "density.nii.gz", kind="density"),
        write_json_atomic(out_dir / "params.json", {**result.info, "loss_curve": result.loss_curve,
                                                     **run_metadata()}),
    ]
    return result, paths
