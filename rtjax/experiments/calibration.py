"""Calibration of the probabilistic CTV on the synthetic cohort (`rtjax run --ensemble`).

For the patients of a synthetic cohort study folder (:mod:`rtjax.experiments.cohort_study`:
``cases/``, ``truth/``), every case is run through the pipeline with the ensemble fit
(``results_ensemble/``, isotropic model, resumable), and then:

- **reliability**: voxels are grouped by their CTV probability p = k / members; within each
  group, the observed frequency is the fraction of voxels that belong to the *oracle* CTV
  (the true density's iso-volumetric CTV at the standard CTV's volume: the CTV a perfect
  model would draw). A calibrated probability has frequency ~ p. Pooled over patients.
- **regions**: per patient the volume of p >= 0.5 and p >= 0.9 and the fraction of the
  recurrence inside each, beside the fraction of members (0.5, 0.9) that region claims.
- **equal volume**: recurrence coverage of the probability-ranked CTV of the standard
  CTV's volume against the point estimate's iso-volumetric model CTV, paired Wilcoxon.

`run_calibration(study_dir, n)` writes ``calibration.json`` and ``calibration.csv`` into
the study folder and returns the result; `format_calibration` prints it.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import fields
from pathlib import Path

import numpy as np

from rtjax.ctv import isovolumetric_cutoff
from rtjax.io import load_image
from rtjax.pipeline import run_cohort
from rtjax.provenance import run_metadata, write_json_atomic, write_text_atomic
from rtjax.study import CaseCoverage, paired_test

__all__ = ["reliability", "patient_calibration", "run_calibration", "format_calibration"]


def reliability(probabilities, truths) -> list[dict]:
    """Pooled over patients: per distinct probability value p > 0, the voxel count and the
    fraction of those voxels in the true CTV (bool arrays of the same shapes)."""
    counts: dict[float, list[int]] = {}
    for p, t in zip(probabilities, truths):
        for value in np.unique(p[p > 0]):
            sel = p == value
            key = round(float(value), 4)
            n, hit = counts.get(key, [0, 0])
            counts[key] = [n + int(sel.sum()), hit + int((sel & t).sum())]
    return [{"probability": k, "voxels": n, "in_true_ctv": h / n} for k, (n, h) in sorted(counts.items())]


def patient_calibration(case_dir: Path, result_dir: Path, truth_dir: Path) -> dict:
    """One patient's arrays and numbers (module docstring)."""
    prob = load_image(result_dir / "ctv_probability.nii.gz", kind="probability").data
    truth = load_image(truth_dir / "density_true.nii.gz", kind="probability").data
    standard = load_image(result_dir / "ctv_standard.nii.gz", kind="mask").data
    brain = load_image(case_dir / "brain_mask.nii.gz", kind="mask").data
    _, oracle = isovolumetric_cutoff(np.where(brain, truth, 0.0), standard)
    coverage = json.loads((result_dir / "coverage.json").read_text())
    params = json.loads((result_dir / "params.json").read_text())
    probabilistic = coverage["probabilistic"]
    return {
        "case": case_dir.name, "members": params["ensemble"]["accepted"],
        "probability": prob, "oracle": oracle,
        "row": {
            "case": case_dir.name, "members": params["ensemble"]["accepted"],
            "standard_volume_ml": coverage["standard_volume_ml"],
            "model_coverage": coverage["model_coverage"],
            "ranked_coverage": probabilistic["ranked_at_standard_volume"]["coverage"],
            **{f"p{lv}_{k}": probabilistic[f"p>={lv}"][k] for lv in ("0.5", "0.9")
               for k in ("volume_ml", "coverage")},
        },
    }


def _csv(rows) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(list(rows[0]))
    for row in rows:
        writer.writerow([f"{v:.6g}" if isinstance(v, float) else v for v in row.values()])
    return buffer.getvalue()


def run_calibration(study_dir, n: int = 10, *, run_options: dict | None = None, progress: bool = True) -> dict:
    """Fit the first `n` patients of the study folder with the ensemble and measure the
    calibration (module docstring). Resumable (finished cases are kept)."""
    study_dir = Path(study_dir)
    names = sorted(p.name for p in (study_dir / "cases").iterdir() if p.is_dir() and not p.name.startswith("."))[:n]
    cohort = study_dir / "calibration_cases"
    cohort.mkdir(exist_ok=True)
    for name in names:  # the subset, as links: run_cohort runs every case of a folder
        link = cohort / name
        if not link.exists():
            link.symlink_to((study_dir / "cases" / name).resolve(), target_is_directory=True)
    out = study_dir / "results_ensemble"
    run_cohort(cohort, out, labels="brats2021", ensemble=True, progress=progress, **(run_options or {}))
    patients = [patient_calibration(study_dir / "cases" / name, out / name, study_dir / "truth" / name)
                for name in names if (out / name / "done.json").is_file()]
    rows = [p["row"] for p in patients]
    records = [CaseCoverage(**{**_coverage_fields(out / r["case"]), "model_coverage": r["ranked_coverage"],
                               "standard_coverage": r["model_coverage"]}) for r in rows]
    result = {
        "patients": rows,
        "reliability": reliability([p["probability"] for p in patients], [p["oracle"] for p in patients]),
        "ranked_vs_point": paired_test(records).to_dict() if len(records) >= 2 else None,
        "means": {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "case"} if rows else {},
        **run_metadata(),
    }
    write_json_atomic(study_dir / "calibration.json", result)
    if rows:
        write_text_atomic(study_dir / "calibration.csv", _csv(rows))
    return result


def _coverage_fields(result_dir: Path) -> dict:
    """The CaseCoverage fields of a case's coverage.json (paired_test reads two of them)."""
    data = json.loads((result_dir / "coverage.json").read_text())
    return {f.name: data[f.name] for f in fields(CaseCoverage) if f.name in data}


def format_calibration(result: dict) -> str:
    """Plain-text tables of :func:`run_calibration`'s result."""
    lines = ["probability  voxels  fraction in the true (oracle) CTV"]
    lines += [f"{r['probability']:11.3f} {r['voxels']:7d}  {r['in_true_ctv']:.3f}" for r in result["reliability"]]
    lines.append("")
    lines.append(f"{'case':12s} {'members':>7s} {'point cov':>9s} {'ranked cov':>10s} "
                 f"{'p>=0.5 mL':>9s} {'cov':>6s} {'p>=0.9 mL':>9s} {'cov':>6s}")
    for r in result["patients"]:
        lines.append(f"{r['case']:12s} {r['members']:7d} {100 * r['model_coverage']:9.1f} "
                     f"{100 * r['ranked_coverage']:10.1f} {r['p0.5_volume_ml']:9.1f} "
                     f"{100 * r['p0.5_coverage']:6.1f} {r['p0.9_volume_ml']:9.1f} {100 * r['p0.9_coverage']:6.1f}")
    test = result.get("ranked_vs_point")
    if test:
        lines.append(f"Wilcoxon ranked vs point at equal volume: median difference "
                     f"{100 * test['median_difference']:+.1f} points, p = {test['p_value']:.3g} (n = {test['n']})")
    return "\n".join(lines)
