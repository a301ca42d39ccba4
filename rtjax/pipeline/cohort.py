"""A cohort through the pipeline: every case folder, resumable, shardable, fault-tolerant.

:func:`run_cohort` runs every case folder of a cohort with :func:`rtjax.pipeline.case.run_case`;
its state lives on disk (``<case>/done.json`` for finished cases, ``<case>.error.json`` for
cases that failed, ``cohort.json`` for the options of the cohort), so that ``summary.csv``
always describes the whole cohort, whichever shard or run finished each case. A failing
case (a bad input, a filesystem error, a failed fit) is logged with its reason and the
others go on; a case that another process is running (its lock is held) is left to it.
Files with their own names are found through ``names`` (role -> glob pattern, e.g.
``{"seg": "segm.nii.gz", "brain_mask": "brainMask*"}``), matched in each case folder.
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

from rtjax.config import to_dict
from rtjax.errors import InputError
from rtjax.pipeline.case import DONE, run_case
from rtjax.pipeline.options import RunOptions, parse_shard
from rtjax.pipeline.outdir import OutputLocked
from rtjax.provenance import run_metadata, write_json_atomic, write_text_atomic
from rtjax.study import CaseCoverage, paired_test, plot_cohort, write_cohort_csv

__all__ = ["COHORT_RECORD", "SUMMARY_COLUMNS", "CohortSummary", "csv_value", "run_cohort"]

_ERROR_SUFFIX = ".error.json"
#: The cohort's record in its output folder: the options every case is run with.
COHORT_RECORD = "cohort.json"

SUMMARY_COLUMNS = (
    "case", "status", "error", "quality", "quality_reasons",
    "core_volume_ml", "edema_volume_ml", "brain_volume_ml",
    "margin_mm", "standard_volume_ml", "model_volume_ml", "cutoff",
    "recurrence_volume_ml", "recurrence_outside_brain_ml", "standard_coverage", "model_coverage",
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
        rows: one dict per case of the cohort (all shards), keys :data:`SUMMARY_COLUMNS`
            plus ``model_c<cutoff>_volume_ml`` / ``_coverage`` per cutoff.
        processed: cases run (successfully) in this call.
        skipped: cases of this shard already done before this call.
        busy: cases another process was running (their lock was held).
        failed: (case, error message) of the cases that failed in this call.
        files: summary.csv and, with >= 2 recurrence cases, coverage.csv,
            statistics.json, cohort.png.
    """

    out_dir: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    processed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


def csv_value(value) -> Any:
    """A CSV cell: "" for None, floats to 12 significant digits (no float noise such as
    1402.2930000000001), lists joined by "; ", anything else as it is."""
    if value is None:
        return ""
    if isinstance(value, float):
        return format(value, ".12g")
    if isinstance(value, (list, tuple)):
        return "; ".join(str(v) for v in value)
    return value


def _cutoff_columns(summary: dict) -> dict[str, Any]:
    """``model_c<cutoff>_volume_ml`` and ``model_c<cutoff>_coverage`` of a case summary."""
    row = {f"model_c{e['cutoff']:g}_volume_ml": e["volume_ml"]
           for e in summary.get("cutoff_ctvs") or ()}
    for e in (summary.get("coverage") or {}).get("cutoff_ctvs") or ():
        row[f"model_c{e['cutoff']:g}_coverage"] = e["coverage"]
    return row


def _case_row(case: str, out_dir: Path) -> dict[str, Any]:
    """The summary row of one case from its markers on disk."""
    done = out_dir / case / DONE
    error = out_dir / f"{case}{_ERROR_SUFFIX}"
    if done.is_file():
        summary = json.loads(done.read_text())
        row = {k: summary.get(k) for k in SUMMARY_COLUMNS}
        row.update({k: v for k, v in (summary.get("coverage") or {}).items() if k in SUMMARY_COLUMNS})
        row.update(_cutoff_columns(summary))
        row["status"], row["error"] = "done", ""
        return row
    if error.is_file():
        return {"case": case, "status": "failed", "error": json.loads(error.read_text())["error"]}
    return {"case": case, "status": "pending", "error": ""}


def _summary_csv(rows) -> str:
    extra = sorted({k for row in rows for k in row if k not in SUMMARY_COLUMNS},
                   key=lambda k: (float(k.split("_")[1][1:]), not k.endswith("_volume_ml")))
    columns = (*SUMMARY_COLUMNS, *extra)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([csv_value(row.get(c)) for c in columns])
    return buffer.getvalue()


def _run_options(case_options: dict) -> dict:
    """The cohort's resolved options (validated: :class:`RunOptions` raises on bad ones)."""
    names = {"initial": "start", "fit_iterations": "iterations"}
    given = {names.get(k, k): v for k, v in case_options.items()
             if names.get(k, k) in {f.name for f in fields(RunOptions)}}
    record = to_dict(RunOptions(**given))
    weights = case_options.get("weights")
    record["weights"] = None if weights is None else str(Path(weights).absolute())
    return record


def _done_with(case_dir: Path, options: dict) -> bool:
    """Whether a case output is finished, with these options (or by an rtjax from before
    options were recorded: taken as done, as it was then)."""
    done = case_dir / DONE
    if not done.is_file():
        return False
    recorded = json.loads(done.read_text()).get("run_options", "unrecorded")
    return recorded == "unrecorded" or recorded == {k: v for k, v in options.items() if k != "weights"}


def _earlier_cohort(out_dir: Path) -> bool:
    """Whether a folder without cohort.json holds a cohort run of an earlier rtjax (a summary
    or finished case folders), which is resumed as before."""
    return (out_dir / "summary.csv").is_file() or any(
        (d / DONE).is_file() for d in out_dir.iterdir() if d.is_dir())


def _check_cohort_out(out_dir: Path, options: dict, overwrite: bool) -> None:
    """Refuse an output folder that is not this cohort's (before any case runs)."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise InputError(out_dir, "--out exists and is not a folder")
    record = out_dir / COHORT_RECORD
    if record.is_file():
        before = json.loads(record.read_text()).get("options", {})
        changed = sorted(k for k in set(before) | set(options) if before.get(k) != options.get(k))
        if changed and not overwrite:
            what = ", ".join(f"{k} {before.get(k)!r} -> {options.get(k)!r}" for k in changed)
            raise InputError(out_dir, f"--out holds a cohort run with other options ({what}); "
                             "pass --overwrite to redo its cases with these, or choose another --out")
    elif any(out_dir.iterdir()) and not overwrite and not _earlier_cohort(out_dir):
        raise InputError(out_dir, f"--out exists, is not empty and is not an rtjax cohort output "
                         f"(no {COHORT_RECORD}); choose another --out (or pass --overwrite to "
                         "run the cohort into it, replacing case outputs made with other options)")


def _error_message(err: Exception) -> str:
    """One line for a failed case: an InputError as it is, a filesystem error as its file
    and reason, anything else with its type."""
    if isinstance(err, InputError):
        return str(err)
    if isinstance(err, OSError) and err.strerror:
        where = f"{err.filename}: " if err.filename is not None else ""
        return f"{where}{err.strerror}"
    return " ".join(f"{type(err).__name__}: {err}".split())


def run_cohort(
    cohort_dir,
    out_dir,
    *,
    shard: str | None = None,
    jobs: int = 1,
    progress: bool = True,
    overwrite: bool = False,
    **case_options,
) -> CohortSummary:
    """Run every case folder (sorted, hidden folders skipped) of ``cohort_dir`` into
    ``out_dir/<case>`` with :func:`run_case` (``case_options`` are its options, checked
    before any case runs; ``names`` maps roles to glob patterns matched in each case).

    Resumable: a case whose ``done.json`` was made with these options is skipped; a stale
    ``.partial`` is redone; a case another process is running (locked) is left to it. A
    failing case is recorded (``errors.log`` with its traceback when it is not a plain
    input error, ``<case>.error.json``, the summary) and the others go on.
    ``shard="K/N"`` runs the cases i (0-based, sorted) with i % N == K - 1.
    ``cohort.json`` records the options: a rerun with other options is refused unless
    ``overwrite``, which redoes the cases made with other options.
    At the end, ``summary.csv`` lists every case of the cohort (done / failed / pending,
    the fit quality, volumes and coverage per CTV) and, when >= 2 cases have coverage,
    ``coverage.csv``, ``statistics.json`` (Wilcoxon) and ``cohort.png`` are written.

    Raises:
        OptionsError: bad options.
        InputError: the cohort folder does not exist or has no case folder, or ``out_dir``
            is another cohort's or not a cohort output.
        ValueError: a bad shard, or jobs != 1 (run one process per shard instead).
    """
    if int(jobs) != 1:
        raise ValueError("--jobs: only 1 is supported: JAX already uses every core of a machine; "
                         "to parallelise, run one process per shard (--shard K/N)")
    options = _run_options(case_options)
    k_n = parse_shard(shard)
    cohort_dir, out_dir = Path(cohort_dir), Path(out_dir)
    if not cohort_dir.is_dir():
        raise InputError(cohort_dir, "cohort folder not found")
    skip = {out_dir.resolve()}
    cases = sorted(p.name for p in cohort_dir.iterdir()
                   if p.is_dir() and not p.name.startswith(".") and p.resolve() not in skip)
    if not cases:
        raise InputError(cohort_dir, "no case folders in the cohort folder")
    _check_cohort_out(out_dir, options, overwrite)
    mine = cases if k_n is None else [c for i, c in enumerate(cases) if i % k_n[1] == k_n[0] - 1]
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / COHORT_RECORD, {"cohort": str(cohort_dir.absolute()),
                                                "options": options, **run_metadata()})
    result = CohortSummary(out_dir=out_dir)
    bar = tqdm(mine, desc="cohort", unit="case", disable=not progress)
    for case in bar:
        bar.set_postfix(case=case)
        error_file = out_dir / f"{case}{_ERROR_SUFFIX}"
        if _done_with(out_dir / case, options):
            result.skipped.append(case)
            continue
        try:
            run_case(cohort_dir / case, out_dir / case, progress=False,
                     overwrite=(out_dir / case / DONE).is_file(), **case_options)
        except OutputLocked:
            result.busy.append(case)
            continue
        except Exception as err:  # noqa: BLE001 - one broken case must not stop the cohort
            message = _error_message(err)
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
