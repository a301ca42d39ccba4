"""The 2.5-D segmentation model: a 2-D U-Net on axial slices with neighbouring slices as
channels, sized for CPU training (see docs/segmentation.md for the measured throughput).

* `SliceModelConfig`: architecture (`UNetConfig` with `spatial_dims` 2), context slices,
  working spacing, post-processing.
* `context_slices(x, context)`: (X, Y, Z, C) -> (Z, X, Y, C * (2 * context + 1)) network
  inputs, the volume's edge slices repeated beyond its ends.
* `predict_volume(apply, x, ...)`: region probabilities (X, Y, Z, 3) of a working-grid volume,
  slice batches through `apply`.
* `SliceWeights`: a fold ensemble ready for inference (`probabilities` on a case's own grid).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rtjax.config import from_dict
from rtjax.ml import create_ensemble, ensemble_apply
from rtjax.seg.cases import normalise_pair
from rtjax.seg.grid import resample_to_shape, working_shape
from rtjax.seg.model import UNet, UNetConfig

__all__ = ["ARCHITECTURE", "MODALITIES", "TTA_FLIPS", "SliceModelConfig", "SliceWeights", "context_slices", "predict_volume",
           "make_ensemble"]

#: `architecture` value of a 2.5-D weights folder's config.yaml.
ARCHITECTURE = "slices"
#: Input images per context slice (T1c, FLAIR), interleaved slice-major in the channels.
MODALITIES = 2
#: Test-time flips of the 2.5-D model: the in-plane flips it was trained with (axes of
#: (X, Y, Z, C)); through-plane flips were never seen in training.
TTA_FLIPS = ((), (0,), (1,), (0, 1))


def _default_unet() -> UNetConfig:
    return UNetConfig(widths=(8, 16, 32, 64, 128), norm="group", in_channels=10, spatial_dims=2)


@dataclass(frozen=True)
class SliceModelConfig:
    """The 2.5-D model.

    Attributes:
        unet: the 2-D U-Net (`in_channels` = 2 modalities x (2 * context + 1) slices).
        context: neighbouring slices on each side given as channels.
        spacing: working grid spacing, mm (isotropic).
        members: ensemble members (the cross-validation folds).
        keep_fraction: post-processing: whole-tumour components smaller than this fraction
            of the largest are dropped.
        min_enhancing_ml: post-processing: a predicted enhancing region smaller than this
            in all, mL, becomes necrosis (0: never).
        batch: slices per network call at inference.
        tta: average over the in-plane `TTA_FLIPS` at inference by default (4 passes).
    """

    unet: UNetConfig = field(default_factory=_default_unet)
    context: int = 2
    spacing: float = 2.0
    members: int = 3
    keep_fraction: float = 0.2
    min_enhancing_ml: float = 0.0
    batch: int = 32
    tta: bool = False

    def __post_init__(self):
        if self.unet.spatial_dims != 2 or self.unet.in_channels != MODALITIES * (2 * self.context + 1):
            raise ValueError("unet: spatial_dims 2 and in_channels 2 * (2 * context + 1)")


def make_ensemble(cfg: SliceModelConfig, members: int | None = None, seed: int = 0) -> UNet:
    """`members` (default `cfg.members`) independently initialised 2-D U-Nets, stacked."""
    return create_ensemble(lambda rngs: UNet(cfg.unet, rngs=rngs), members or cfg.members, seed)


def context_slices(x: np.ndarray, context: int) -> np.ndarray:
    """(X, Y, Z, C) -> (Z, X, Y, C * (2 * context + 1)): slice z with its neighbours
    z - context .. z + context (edge slices repeated), channels slice-major."""
    padded = np.pad(x, ((0, 0), (0, 0), (context, context), (0, 0)), mode="edge")
    n = x.shape[2]
    stacked = np.stack([padded[:, :, k:k + n] for k in range(2 * context + 1)], axis=3)  # X,Y,Z,S,C
    return np.moveaxis(stacked.reshape(*x.shape[:3], -1), 2, 0)


def _pad_to(a: np.ndarray, divisor: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Zero-pad axes 1, 2 of (Z, X, Y, C) up to multiples of `divisor`."""
    px, py = (-a.shape[1]) % divisor, (-a.shape[2]) % divisor
    return np.pad(a, ((0, 0), (0, px), (0, py), (0, 0))), a.shape[1:3]


def predict_volume(apply: Callable, x: np.ndarray, context: int, divisor: int, batch: int = 32) -> np.ndarray:
    """Probabilities (X, Y, Z, 3) of a working-grid volume `x` (X, Y, Z, 2): `apply` maps
    (b, X', Y', C) slices to (b, X', Y', 3) probabilities."""
    slices, (nx, ny) = _pad_to(context_slices(np.asarray(x, np.float32), context), divisor)
    out = []
    for start in range(0, len(slices), batch):
        chunk = slices[start:start + batch]
        pad = batch - len(chunk)  # one compiled shape per volume size
        probs = np.asarray(apply(np.pad(chunk, ((0, pad), (0, 0), (0, 0), (0, 0)))))
        out.append(probs[:len(chunk)])
    return np.moveaxis(np.concatenate(out)[:, :nx, :ny], 0, 2)


@functools.cache
def _mean_probs_jit():
    def mean_probs(graphdef, params, x):
        logits = ensemble_apply(nnx.merge(graphdef, params), x)  # (K, b, X, Y, 3)
        p = jax.nn.sigmoid(logits)
        return jnp.concatenate([p.mean(0), p.std(0).max(-1, keepdims=True)], axis=-1)
    return jax.jit(mean_probs, static_argnums=0)


@dataclass(frozen=True)
class SliceWeights:
    """A 2.5-D ensemble for inference: graph, stacked parameters, config, source folder."""

    graphdef: Any
    params: Any
    config: SliceModelConfig
    version: str
    path: Any = None

    @classmethod
    def from_config_dict(cls, data: dict, restore: Callable, path=None) -> "SliceWeights":
        """From a weights folder's config mapping; `restore(abstract)` fills the parameters."""
        cfg = from_dict(SliceModelConfig, data["model"], "model")
        abstract = nnx.eval_shape(lambda: make_ensemble(cfg))
        graphdef, params = nnx.split(restore(abstract))
        return cls(graphdef, params, cfg, str(data.get("version", "dev")), path)

    def apply(self, slices: np.ndarray) -> np.ndarray:
        """(b, X, Y, C) slices -> (b, X, Y, 4): mean WT/TC/ET probabilities and the ensemble
        spread (max over regions of the standard deviation)."""
        return _mean_probs_jit()(self.graphdef, self.params, jnp.asarray(slices))

    def probabilities(self, t1c, flair, spacing, brain=None, tta: bool = False):
        """Region probabilities (X, Y, Z, 3) and spread (X, Y, Z) of raw or z-scored
        T1c/FLAIR (canonical arrays on one grid of voxel size `spacing` mm), on that grid;
        also returns the brain mask used. `tta`: average over the in-plane `TTA_FLIPS`
        (4 network passes instead of 1)."""
        x, brain = normalise_pair(t1c, flair, brain)
        cfg = self.config
        xw = resample_to_shape(x, working_shape(x.shape[:3], spacing, cfg.spacing))
        flipped = lambda a, axes: np.flip(a, axes) if axes else a
        outs = [flipped(predict_volume(self.apply, flipped(xw, axes), cfg.context, cfg.unet.divisor, cfg.batch), axes)
                for axes in (TTA_FLIPS if tta else ((),))]
        out = resample_to_shape(np.mean(outs, axis=0), x.shape[:3])
        return np.clip(out[..., :3], 0.0, 1.0), np.clip(out[..., 3], 0.0, None), brain
