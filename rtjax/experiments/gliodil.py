"""The real longitudinal case gliodil-patient001 through `rtjax run`, compared with the
authors' own results (Weidner et al. 2024: their 15 mm standard CTV `standardPlan`, their
model CTV `recurrencePrediction` at the same volume).

The case has a segmentation (`segm`, GliODIL labels; the 8 stray voxels of label 2 are
ignored), a `brainMask`, a recurrence (`segm_rec`) and no T1 or tissue maps, so the tissue
comes from the MNI152 atlas registered to the brain mask by its outline only
(rtjax.anatomy). `run_gliodil_case(out_dir)` writes the case outputs and
`gliodil_comparison.json` into `out_dir` (`scripts/gliodil_case.py`).
"""

from __future__ import annotations

import json
from pathlib import Path

from rtjax.data import data_root
from rtjax.io import load_image
from rtjax.metrics import dice
from rtjax.pipeline.case import run_case
from rtjax.provenance import run_metadata, write_json_atomic
from rtjax.study import coverage

__all__ = ["CASE", "FILES", "AUTHORS_COVERAGE", "compare", "format_comparison", "run_gliodil_case"]

CASE = "gliodil-patient001"
#: Canonical case file -> the file in the data folder (none of its names is canonical).
FILES = {"seg": "segm.nii.gz", "brain_mask": "brainMask.nii.gz", "recurrence": "segm_rec.nii.gz"}
#: The authors' figures from the data README: recurrence coverage (%) of their CTVs.
AUTHORS_COVERAGE = {"standard": 100.0, "model": 99.2}


def compare(source: Path, out_dir: Path, summary: dict) -> dict:
    """Our CTVs against the authors' on the recurrence (the data grid, index-aligned)."""
    mask = lambda path: load_image(path, kind="mask")  # noqa: E731
    recurrence = mask(source / "segm_rec.nii.gz")
    vox = recurrence.voxel_volume_ml
    ml = lambda m: float(m.data.sum()) * vox  # noqa: E731
    ctv = {
        "ours_standard": mask(out_dir / "ctv_standard.nii.gz"),
        "ours_model": mask(out_dir / "ctv_model.nii.gz"),
        "authors_standard": mask(source / "standardPlan.nii.gz"),
        "authors_model": mask(source / "recurrencePrediction.nii.gz"),
    }
    ours = summary["coverage"]  # the content of coverage.json
    return {
        "case": CASE,
        "dice_standard_ours_vs_authors": dice(ctv["ours_standard"].data, ctv["authors_standard"].data),
        "dice_model_ours_vs_authors": dice(ctv["ours_model"].data, ctv["authors_model"].data),
        "volume_ml": {k: ml(v) for k, v in ctv.items()},
        "recurrence_volume_ml": ml(recurrence),
        "coverage_percent": {k: 100.0 * coverage(recurrence.data, v.data) for k, v in ctv.items()},
        "authors_reported_coverage_percent": AUTHORS_COVERAGE,
        "ours_smallest_volume_ml": {k: ours[k] for k in ours if "_volume_ml_for_" in k},
        "ours_cutoff": ours["cutoff"],
        "fit": {k: summary[k] for k in ("dice_core", "dice_edema", "final_loss", "sqrt_dw_t_mm",
                                        "sqrt_rho_t", "u_t1", "u_fl", "seconds")},
        "tissue": {k: json.loads((out_dir / "tissue" / "tissue.json").read_text())[k]
                   for k in ("target", "method", "metric")},
    }


def format_comparison(result: dict) -> str:
    """A plain-text table of :func:`compare`'s result."""
    vol, cov = result["volume_ml"], result["coverage_percent"]
    lines = [f"{'CTV':<18} {'volume mL':>10} {'coverage %':>11}"]
    lines += [f"{k:<18} {vol[k]:10.1f} {cov[k]:11.1f}" for k in vol]
    lines.append(f"Dice standard ours vs authors {result['dice_standard_ours_vs_authors']:.4f}, "
                 f"model {result['dice_model_ours_vs_authors']:.4f}")
    lines.append(f"recurrence {result['recurrence_volume_ml']:.2f} mL; smallest volumes (mL): "
                 + ", ".join(f"{k} {'never' if v is None else f'{v:.1f}'}"
                             for k, v in result["ours_smallest_volume_ml"].items()))
    fit = result["fit"]
    lines.append(f"fit: Dice core {fit['dice_core']:.3f}, edema {fit['dice_edema']:.3f}; "
                 f"tissue from {result['tissue']['target']}")
    return "\n".join(lines)


def run_gliodil_case(out_dir, data: str | Path | None = None) -> dict:
    """Run the case from `data` (default `rtjax.data.data_root()`) into `out_dir`, compare
    with the authors' CTVs, write `gliodil_comparison.json`; returns the comparison."""
    out_dir = Path(out_dir)
    source = Path(data or data_root()) / CASE
    summary = run_case(source, out_dir, labels="gliodil", ignore_labels=(2,),
                       margin_mm=15.0, overrides=FILES, overwrite=True)
    result = compare(source, out_dir, summary)
    write_json_atomic(out_dir / "gliodil_comparison.json", {**result, **run_metadata()})
    return result
