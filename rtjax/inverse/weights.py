"""Weights of the inverse model: export, load (cached) and the jitted ensemble call.

A weights folder is `rtjax.ml.checkpoints`' layout; its `config.yaml` holds the resolved
`InverseConfig` plus `normalisation` (the target mean and scale, `TARGET_NAMES` order).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from growth.inverse import TARGET_NAMES
from rtjax.config import to_dict
from rtjax.inverse.config import InverseConfig, config_from_dict
from rtjax.inverse.network import create_ensemble
from rtjax.ml import ensemble_apply, read_weights_config, restore_params, save_weights

__all__ = ["DEFAULT_WEIGHTS", "InverseWeights", "export_weights", "load_weights"]

#: The weights shipped inside the package.
DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "inverse"


def export_weights(model, config: InverseConfig, mean, scale, metrics: dict, out_dir) -> Path:
    """Write a weights folder: `params/`, `config.yaml` (with the target normalisation) and
    `metrics.json`; replaces an existing folder once complete."""
    normalisation = {"targets": list(TARGET_NAMES), "mean": [float(v) for v in mean],
                     "scale": [float(v) for v in scale]}
    return save_weights(out_dir, model, {**to_dict(config), "normalisation": normalisation}, metrics)


@dataclass(frozen=True)
class InverseWeights:
    """A loaded inverse model: the ensemble, its config and target normalisation."""

    model: Any
    config: InverseConfig
    mean: np.ndarray
    scale: np.ndarray
    path: Path

    @property
    def version(self) -> str:
        return self.config.version

    @functools.cached_property
    def apply(self):
        """jit-compiled (1, n, n, n, 4) -> (members, 1, 7) in physical units."""
        graphdef, state = nnx.split(self.model)
        mean, scale = self.mean, self.scale
        run = jax.jit(lambda st, x: ensemble_apply(nnx.merge(graphdef, st), x) * scale + mean)
        return lambda x: run(state, x)


@functools.lru_cache(maxsize=4)
def _load_weights_cached(path: Path) -> InverseWeights:
    data = read_weights_config(path, "inverse-model weights")
    norm = data.pop("normalisation")
    config = config_from_dict(data, f"{path / 'config.yaml'}")
    abstract = nnx.eval_shape(lambda: create_ensemble(config.net, config.train.members))
    model = restore_params(path, abstract)
    return InverseWeights(model=model, config=config, mean=np.asarray(norm["mean"], np.float32),
                          scale=np.asarray(norm["scale"], np.float32), path=path)


def load_weights(path: str | Path | None = None) -> InverseWeights:
    """Load a weights folder (default: the shipped `rtjax/weights/inverse`); cached."""
    return _load_weights_cached(Path(path or DEFAULT_WEIGHTS).resolve())
