"""Whole-case and cohort runs: a segmented case folder -> fit, density, CTVs, coverage, report.

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

Missing inputs: a case without ``seg`` is segmented from its ``t1c`` and ``flair`` by the
shipped network (:func:`rtjax.seg.infer.segment_case`; its masks are written as
``segmentation.nii.gz``). A case without ``wm`` and ``gm`` gets the MNI152 atlas registered
to its t1/t1c (else to its brain_mask outline) (:func:`rtjax.anatomy.case_tissue`), written to ``tissue/`` and reused by a
rerun. Both say so in a warning and in ``params.json`` (``inputs``).

:func:`run_cohort` runs every case folder of a cohort, resumable and shardable; its state
lives on disk (``<case>/done.json`` for finished cases, ``<case>.error.json`` for cases that
failed), so that ``summary.csv`` always describes the whole cohort, whichever shard or run
finished each case. Parallelism: one process per shard (``--shard K/N``, e.g. a cluster
array job); ``jobs`` > 1 is not supported, as JAX already uses every core of a machine.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import os
import shutil
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from rtjax.errors import InputError

__all__ = [
    "RUN_OPTIONS",
    "CohortSummary",
    "SUMMARY_COLUMNS",
    "load_run_config",
    "parse_shard",
    "resolve_options",
    "run_case",
    "run_cohort",
    "save_case_report",
]

#: Option names a ``--config`` YAML may set, with their defaults (``labels`` has none).
RUN_OPTIONS: dict[str, Any] = {
    "labels": None,
    "ignore_labels": [],
    "margin_mm": 15.0,
    "start": "network",
    "iterations": 150,
}

DONE = "done.json"
_ERROR_SUFFIX = ".error.json"

SUMMARY_COLUMNS = (
    "case", "status", "error",
    "core_volume_ml", "edema_volume_ml", "brain_volume_ml",
    "margin_mm", "standard_volume_ml", "model_volume_ml", "cutoff",
    "recurrence_volume_ml", "standard_coverage", "model_coverage",
    "standard_volume_ml_for_95", "standard_volume_ml_for_100",
    "model_volume_ml_for_95", "model_volume_ml_for_100",
    "sqrt_dw_t_mm", "sqrt_rho_t", "dw_t_mm2", "rho_t", "u_t1", "u_fl",
    "dice_core", "dice_edema", "final_loss", "seconds",
)


# --------------------------------------------------------------------------- options


def load_run_config(path) -> dict[str, Any]:
    """Read a YAML mapping of run options (names as on the command line, ``-`` or ``_``).

    Raises:
        ValueError: unreadable file, not a mapping, or unknown keys.
    """
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: cannot read the config: {err}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config must be a YAML mapping of option names to values")
    options = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(options) - set(RUN_OPTIONS))
    if unknown:
        raise ValueError(f"{path}: unknown config key(s) {unknown}; valid keys: "
                         f"{', '.join(sorted(RUN_OPTIONS))}")
    return options


def resolve_options(config_path=None, **given) -> dict[str, Any]:
    """The run options: defaults < the ``config_path`` YAML < ``given`` values that are not
    None (the command line wins). ``labels`` must end up set."""
    options = dict(RUN_OPTIONS)
    if config_path is not None:
        options.update(load_run_config(config_path))
    options.update({k: v for k, v in given.items() if v is not None})
    if not options.get("labels"):
        raise ValueError("no label convention: pass --labels (brats2021, brats2023, brats2015, "
                         "gliodil, tum) or set labels in the config")
    options["ignore_labels"] = [int(v) for v in options.get("ignore_labels") or []]
    options["margin_mm"] = float(options["margin_mm"])
    options["iterations"] = int(options["iterations"])
    if options["start"] not in ("network", "heuristic"):
        raise ValueError(f"start must be 'network' or 'heuristic', not {options['start']!r}")
    return options


def parse_shard(shard: str | None) -> tuple[int, int] | None:
    """``"K/N"`` (1-based K) -> (K, N); None stays None."""
    if shard is None:
        return None
    try:
        k, n = (int(part) for part in str(shard).split("/"))
    except ValueError:
        raise ValueError(f"shard must be K/N with integers, e.g. 1/4, not {shard!r}") from None
    if not (n >= 1 and 1 <= k <= n):
        raise ValueError(f"shard {shard!r}: need 1 <= K <= N")
    return k, n


# --------------------------------------------------------------------------- one case


def _load_inputs(case_dir: Path, labels, ignore_labels, overrides, atlas_tissue_dirs=()):
    from rtjax.fit import load_segmented_case

    files, convention, masks, images = load_segmented_case(
        case_dir, labels=labels, ignore_labels=ignore_labels, overrides=overrides,
        atlas_tissue_dirs=atlas_tissue_dirs, segment_missing=True)
    if not masks.core.any():
        raise InputError(files["seg"], "no tumour core (necrosis or enhancing voxels): the "
                         "standard CTV grows from the core")
    return files, convention, masks, images


def _brain(images) -> np.ndarray:
    from scipy.ndimage import binary_fill_holes

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
    from growth.fit import FitConfig
    from rtjax.ctv import isovolumetric_cutoff, standard_ctv
    from rtjax.fit import fit_case
    from rtjax.io import save_image
    from rtjax.labels import combine_labels
    from rtjax.provenance import run_metadata, write_json_atomic
    from rtjax.study import case_coverage

    case_dir, out_dir = Path(case_dir), Path(out_dir)
    case_id = case_dir.name
    partial = _prepare_out(out_dir)
    try:
        files, convention, masks, images = _load_inputs(
            case_dir, labels, ignore_labels, overrides,
            atlas_tissue_dirs=(partial / "tissue", out_dir / "tissue"))
        reference = images["seg"]
        spacing, vox_ml = reference.spacing, reference.voxel_volume_ml
        fit = fit_case(masks, images["wm"].data, images["gm"].data, spacing, initial=initial,
                       weights=weights, config=FitConfig(max_iterations=int(fit_iterations)),
                       progress=progress)
        density = fit.density
        brain = _brain(images)
        standard = standard_ctv(masks.core, brain, spacing, margin_mm)
        try:
            cutoff, model = isovolumetric_cutoff(density, standard, rtol=0.01)
        except ValueError as err:
            raise ValueError(f"iso-volumetric model CTV: the fitted density cannot match the "
                             f"{margin_mm:g} mm standard CTV's volume: {err}") from None
        coverage = None
        if "recurrence" in images and images["recurrence"].data.any():
            coverage = case_coverage(case_id, images["recurrence"].data, masks.core, brain,
                                     density, spacing, vox_ml, margin_mm=margin_mm).to_dict()
        ml = lambda m: float(np.count_nonzero(m)) * vox_ml  # noqa: E731
        ctv = {
            "margin_mm": float(margin_mm), "cutoff": cutoff,
            "core_volume_ml": ml(masks.core), "edema_volume_ml": ml(masks.edema),
            "brain_volume_ml": ml(brain), "brain_from": "brain_mask" if "brain_mask" in images
            else "wm + gm > 0, holes filled",
            "standard_volume_ml": ml(standard), "model_volume_ml": ml(model),
            "standard_voxels": int(standard.sum()), "model_voxels": int(model.sum()),
            "model_ctv": "iso-volumetric: density >= cutoff, volume within 1 % of the standard CTV",
        }
        options = {"labels": convention.name, "ignore_labels": [int(v) for v in ignore_labels],
                   "margin_mm": float(margin_mm), "start": initial,
                   "iterations": int(fit_iterations),
                   "weights": None if weights is None else str(weights)}
        written = [
            save_image(combine_labels(masks, convention), reference,
                       partial / "segmentation.nii.gz", kind="label"),
            save_image(density, reference, partial / "density.nii.gz", kind="density"),
            save_image(standard, reference, partial / "ctv_standard.nii.gz", kind="mask"),
            save_image(model, reference, partial / "ctv_model.nii.gz", kind="mask"),
            write_json_atomic(partial / "params.json", {
                "case": case_id, "fit": fit.info, "loss_curve": fit.loss_curve, "ctv": ctv,
                "coverage": coverage, "options": options,
                "inputs": {k: str(v) for k, v in files.items()}, **run_metadata()}),
        ]
        if coverage is not None:
            written.append(write_json_atomic(partial / "coverage.json", coverage))
        background = _background(images)
        recurrence = images["recurrence"].data if "recurrence" in images else None
        written.append(save_case_report(
            background, density, masks.core, masks.edema, standard, model,
            partial / "report.png", recurrence=recurrence,
            title=f"{case_id}: standard {ctv['standard_volume_ml']:.1f} mL, model cutoff {cutoff:.3g}"))
        params = fit.info["scaled_parameters"]
        summary = {
            "case": case_id, "status": "done", "error": "",
            **{k: ctv[k] for k in ("core_volume_ml", "edema_volume_ml", "brain_volume_ml",
                                   "margin_mm", "standard_volume_ml", "model_volume_ml",
                                   "cutoff")},
            **{k: params[k] for k in ("sqrt_dw_t_mm", "sqrt_rho_t", "dw_t_mm2", "rho_t",
                                      "u_t1", "u_fl")},
            **{k: fit.info[k] for k in ("dice_core", "dice_edema", "final_loss", "seconds")},
            "coverage": coverage,
            "outputs": sorted(p.name for p in written) + [DONE],
        }
        write_json_atomic(partial / DONE, summary)
        _commit(partial, out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return summary


def _background(images) -> np.ndarray:
    for name in ("t1c", "flair"):
        if name in images:
            return images[name].data
    return images["wm"].data + 0.5 * images["gm"].data


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    from rtjax.study import save_figure

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


# --------------------------------------------------------------------------- cohort


@dataclass
class CohortSummary:
    """The state of a cohort after :func:`run_cohort`.

    Attributes:
        out_dir: the cohort's output folder.
        rows: one dict per case of the cohort (all shards), keys :data:`SUMMARY_COLUMNS`.
        processed: cases run (successfully) in this call.
        skipped: cases of this shard already done before this call.
        failed: (case, error message) of the cases that failed in this call.
        files: summary.csv and, with >= 2 recurrence cases, coverage.csv,
            statistics.json, cohort.png.
    """

    out_dir: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    processed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


def _case_row(case: str, out_dir: Path) -> dict[str, Any]:
    """The summary row of one case from its markers on disk."""
    done = out_dir / case / DONE
    error = out_dir / f"{case}{_ERROR_SUFFIX}"
    if done.is_file():
        summary = json.loads(done.read_text())
        row = {k: summary.get(k) for k in SUMMARY_COLUMNS}
        row.update({k: v for k, v in (summary.get("coverage") or {}).items() if k in SUMMARY_COLUMNS})
        row["status"], row["error"] = "done", ""
        return row
    if error.is_file():
        return {"case": case, "status": "failed", "error": json.loads(error.read_text())["error"]}
    return {"case": case, "status": "pending", "error": ""}


def _summary_csv(rows) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(SUMMARY_COLUMNS)
    for row in rows:
        writer.writerow(["" if row.get(c) is None else row.get(c) for c in SUMMARY_COLUMNS])
    return buffer.getvalue()


def run_cohort(
    cohort_dir,
    out_dir,
    *,
    shard: str | None = None,
    jobs: int = 1,
    progress: bool = True,
    **case_options,
) -> CohortSummary:
    """Run every case folder (sorted, hidden folders skipped) of ``cohort_dir`` into
    ``out_dir/<case>`` with :func:`run_case` (``case_options`` are its options).

    Resumable: a case whose ``done.json`` exists is skipped; a stale ``.partial`` is redone.
    A failing case is recorded (``errors.log``, ``<case>.error.json``, the summary) and the
    others go on. ``shard="K/N"`` runs the cases i (0-based, sorted) with i % N == K - 1.
    At the end, ``summary.csv`` lists every case of the cohort (done / failed / pending) and,
    when >= 2 cases have coverage, ``coverage.csv``, ``statistics.json`` (Wilcoxon) and
    ``cohort.png`` are written.

    Raises:
        InputError: the cohort folder does not exist or has no case folder.
        ValueError: a bad shard, or jobs != 1 (run one process per shard instead).
    """
    from tqdm import tqdm

    from rtjax.provenance import run_metadata, write_json_atomic, write_text_atomic
    from rtjax.study import CaseCoverage, paired_test, plot_cohort, write_cohort_csv

    if int(jobs) != 1:
        raise ValueError("jobs > 1 is not supported: JAX already uses every core of a machine; "
                         "to parallelise, run one process per shard (--shard K/N)")
    cohort_dir, out_dir = Path(cohort_dir), Path(out_dir)
    if not cohort_dir.is_dir():
        raise InputError(cohort_dir, "cohort folder not found")
    k_n = parse_shard(shard)
    skip = {out_dir.resolve()}
    cases = sorted(p.name for p in cohort_dir.iterdir()
                   if p.is_dir() and not p.name.startswith(".") and p.resolve() not in skip)
    if not cases:
        raise InputError(cohort_dir, "no case folders in the cohort folder")
    mine = cases if k_n is None else [c for i, c in enumerate(cases) if i % k_n[1] == k_n[0] - 1]
    out_dir.mkdir(parents=True, exist_ok=True)
    result = CohortSummary(out_dir=out_dir)
    bar = tqdm(mine, desc="cohort", unit="case", disable=not progress)
    for case in bar:
        bar.set_postfix(case=case)
        error_file = out_dir / f"{case}{_ERROR_SUFFIX}"
        if (out_dir / case / DONE).is_file():
            result.skipped.append(case)
            continue
        try:
            run_case(cohort_dir / case, out_dir / case, progress=False, **case_options)
        except Exception as err:  # noqa: BLE001 - one broken case must not stop the cohort
            message = f"{type(err).__name__}: {err}" if not isinstance(err, InputError) else str(err)
            result.failed.append((case, message))
            stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            with open(out_dir / "errors.log", "a") as log:
                log.write(f"{stamp} {case}: {message}\n")
                if not isinstance(err, InputError):
                    log.write("".join("    " + line for line in
                                      traceback.format_exc().splitlines(keepends=True)))
            write_json_atomic(error_file, {"case": case, "error": message, "time": stamp})
            continue
        error_file.unlink(missing_ok=True)
        result.processed.append(case)
    bar.close()
    result.rows = [_case_row(case, out_dir) for case in cases]
    result.files.append(write_text_atomic(out_dir / "summary.csv", _summary_csv(result.rows)))
    studied = []
    for case in cases:
        done = out_dir / case / DONE
        coverage = json.loads(done.read_text()).get("coverage") if done.is_file() else None
        if coverage:
            names = {f.name for f in fields(CaseCoverage)}
            studied.append(CaseCoverage(**{k: v for k, v in coverage.items() if k in names}))
    if len(studied) >= 2:
        test = paired_test(studied)
        result.files += [
            write_cohort_csv(out_dir / "coverage.csv", studied),
            write_json_atomic(out_dir / "statistics.json", {
                "test": "Wilcoxon signed-rank, model vs standard coverage at equal volume",
                **test.to_dict(), "cases": [c.case_id for c in studied], **run_metadata()}),
            plot_cohort(studied, out_dir / "cohort.png",
                        title=f"{cohort_dir.name}: {len(studied)} cases with a recurrence"),
        ]
    return result
