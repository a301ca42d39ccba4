"""Orchestration: the inputs of a case, run options, one case, a cohort.

* `rtjax.pipeline.inputs`: a case folder -> validated masks and images (segmenting a case
  without `seg`, registering the atlas to a case without tissue maps).
* `rtjax.pipeline.options`: `RunOptions` (defaults < `--config` YAML < command line).
* `rtjax.pipeline.case`: `run_case` (`rtjax run`) and `fit_case_dir` (`rtjax fit`).
* `rtjax.pipeline.cohort`: `run_cohort` (`rtjax cohort`).
"""

from rtjax.pipeline.case import DONE, fit_case_dir, run_case, save_case_report
from rtjax.pipeline.cohort import SUMMARY_COLUMNS, CohortSummary, run_cohort
from rtjax.pipeline.inputs import load_segmented_case
from rtjax.pipeline.options import RUN_OPTIONS, RunOptions, load_run_config, parse_shard, resolve_options

__all__ = [
    "DONE",
    "fit_case_dir",
    "run_case",
    "save_case_report",
    "SUMMARY_COLUMNS",
    "CohortSummary",
    "run_cohort",
    "load_segmented_case",
    "RUN_OPTIONS",
    "RunOptions",
    "load_run_config",
    "parse_shard",
    "resolve_options",
]
