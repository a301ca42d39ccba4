"""Shared machinery of the learned models (segmentation and the inverse model).

Plain values in, plain values out: nothing here knows a stage's config type.

* `rtjax.ml.ensemble`: stacked `nnx` ensembles (`create_ensemble`, `ensemble_apply`,
  `count_params`).
* `rtjax.ml.checkpoints`: weights folders (the shipped layout) and resumable training
  checkpoints, one format for both models.
* `rtjax.ml.schedule`: learning-rate schedules and wall-clock budgets.
"""

from rtjax.ml.checkpoints import (
    CheckpointError,
    TrainCheckpoints,
    read_weights_config,
    restore_params,
    save_weights,
    tar_folder,
    to_single_device,
)
from rtjax.ml.ensemble import count_params, create_ensemble, ensemble_apply
from rtjax.ml.schedule import TimeBudget, learning_rate_factor, scale_by_factor

__all__ = [
    "CheckpointError",
    "TrainCheckpoints",
    "read_weights_config",
    "restore_params",
    "save_weights",
    "tar_folder",
    "to_single_device",
    "count_params",
    "create_ensemble",
    "ensemble_apply",
    "TimeBudget",
    "learning_rate_factor",
    "scale_by_factor",
]
