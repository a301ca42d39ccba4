"""Orchestration: the inputs of a case, run options, the output folder, one case, a cohort.

* `rtjax.pipeline.inputs`: a case folder -> validated masks and images (files named by
  role or by glob patterns; segmenting a case without `seg`, registering the atlas to a
  case without tissue maps), checked before any heavy work.
* `rtjax.pipeline.options`: `RunOptions` (defaults < `--config` YAML < command line),
  every option checked when built.
* `rtjax.pipeline.outdir`: the output folder's checks, its lock and atomic commit.
* `rtjax.pipeline.quality`: the fit-quality gate.
* `rtjax.pipeline.case`: `run_case` (`rtjax run`) and `fit_case_dir` (`rtjax fit`).
* `rtjax.pipeline.cohort`: `run_cohort` (`rtjax cohort`).
"""

from rtjax.pipeline.case import DONE, cutoff_file, fit_case_dir, run_case
from rtjax.pipeline.cohort import SUMMARY_COLUMNS, CohortSummary, run_cohort
from rtjax.pipeline.inputs import case_overrides, check_case_inputs, load_segmented_case
from rtjax.pipeline.options import (
    RUN_OPTIONS,
    OptionsError,
    RunOptions,
    load_run_config,
    parse_names,
    parse_shard,
    resolve_options,
)
from rtjax.pipeline.outdir import OutputLock, OutputLocked, check_out_dir
from rtjax.pipeline.quality import MIN_DICE, MULTIFOCAL_MM, QualityWarning, assess_quality

__all__ = [
    "DONE",
    "cutoff_file",
    "fit_case_dir",
    "run_case",
    "SUMMARY_COLUMNS",
    "CohortSummary",
    "run_cohort",
    "case_overrides",
    "check_case_inputs",
    "load_segmented_case",
    "RUN_OPTIONS",
    "OptionsError",
    "RunOptions",
    "load_run_config",
    "parse_names",
    "parse_shard",
    "resolve_options",
    "OutputLock",
    "OutputLocked",
    "check_out_dir",
    "MIN_DICE",
    "MULTIFOCAL_MM",
    "QualityWarning",
    "assess_quality",
]
