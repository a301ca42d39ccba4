"""A cohort through the pipeline: every case folder, resumable, shardable, fault-tolerant.

:func:`run_cohort` runs every case folder of a cohort with :func:`rtjax.pipeline.case.run_case`;
its state lives on disk (``<case>/done.json`` for finished cases, ``<case>.error.json`` for
cases that failed), so that ``summary.csv`` always describes the whole cohort, whichever
shard or run finished each case. A failing case is logged and the others go on.
Parallelism: one process per shard (``--shard K/N``, e.g. a cluster array job); ``jobs`` > 1
is not supported, as JAX already uses every core of a machine.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import traceback
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from tqdm import tqdm

from rtjax.errors import InputError
from rtjax.pipeline.case import DONE, run_case
from rtjax.pipeline.options import parse_shard
from rtjax.provenance import run_metadata, write_json_atomic, write_text_atomic
from rtjax.study import CaseCoverage, paired_test, plot_cohort, write_cohort_csv

__all__ = ["SUMMARY_COLUMNS", "CohortSummary", "run_cohort"]

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
