"""The 2.5-D segmentation model: 2-D U-Nets on slices (axial, and optionally coronal and
sagittal: `VIEWS`) with neighbouring slices as channels, sized for CPU training (see
docs/segmentation.md for the measured throughput).

* `SliceModelConfig`: architecture (`UNetConfig` with `spatial_dims` 2), views, context
  slices, working spacing, post-processing.
* `to_view(a, view)` / `from_view(a, view)`: a canonical volume with the view's slice axis
  moved to axis 2, and back.
* `context_slices(x, context)`: (X, Y, Z, C) -> (Z, X, Y, C * (2 * context + 1)) network
  inputs, the volume's edge slices repeated beyond its ends.
* `predict_volume(apply, x, ...)`: per-slice outputs of a working-grid volume, slice batches
  through `apply` (slices with an empty context skipped).
* `combine_passes`: mean and spread over every member of several views (and flips).
* `SliceWeights`: a fold (x view) ensemble ready for inference (`probabilities` on a case's
  own grid; `fold_members` the models of one fold).
"""

from __future__ import annotations

import dataclasses
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

__all__ = ["ARCHITECTURE", "MODALITIES", "TTA_FLIPS", "VIEWS", "SliceModelConfig", "SliceWeights", "combine_passes",
           "context_slices", "from_view", "predict_volume", "make_ensemble", "to_view"]

#: `architecture` value of a 2.5-D weights folder's config.yaml.
ARCHITECTURE = "slices"
#: Input images per context slice (T1c, FLAIR), interleaved slice-major in the channels.
MODALITIES = 2
#: Test-time flips of the 2.5-D model: the in-plane flips it was trained with (axes of
#: (X, Y, Z, C)); through-plane flips were never seen in training.
TTA_FLIPS = ((), (0,), (1,), (0, 1))
#: Slice orientations: the canonical (RAS) axis each one slices along.
VIEWS = {"sagittal": 0, "coronal": 1, "axial": 2}


def _default_unet() -> UNetConfig:
    return UNetConfig(widths=(8, 16, 32, 64, 128), norm="group", in_channels=10, spatial_dims=2)


@dataclass(frozen=True)
class SliceModelConfig:
    """The 2.5-D model.

    Attributes:
        unet: the 2-D U-Net (`in_channels` = 2 modalities x (2 * context + 1) slices).
        views: slice orientations (`VIEWS` names), each with its own models; their
            probabilities are averaged.
        context: neighbouring slices on each side given as channels.
        spacing: working grid spacing, mm (isotropic).
        members: ensemble members, view-major: the cross-validation folds x `views`, or
            one model per view trained on every case (`folds` 1).
        keep_fraction: post-processing: whole-tumour components smaller than this fraction
            of the largest are dropped.
        min_enhancing_ml: post-processing: a predicted enhancing region smaller than this
            in all, mL, becomes necrosis (0: never).
        refine_enhancing: post-processing: the enhancing / necrosis boundary refined on the
            case's own T1c at its own resolution (`rtjax.seg.model.refine_enhancing`).
        refine_against_edema: with `refine_enhancing`, the enhancing tumour's T1c is
            weighed against the case's edema as well as its necrosis (`against_edema`).
        core_threshold, enhancing_threshold: probability thresholds of the tumour core (TC)
            and the enhancing tumour (ET; with `refine_enhancing`, its log-odds offset); the
            whole tumour's is 0.5.
        batch: slices per network call at inference.
        tta: average over the in-plane `TTA_FLIPS` at inference by default (4 passes).
    """

    unet: UNetConfig = field(default_factory=_default_unet)
    views: tuple[str, ...] = ("axial",)
    context: int = 2
    spacing: float = 2.0
    members: int = 3
    keep_fraction: float = 0.2
    min_enhancing_ml: float = 0.0
    refine_enhancing: bool = False
    refine_against_edema: bool = False
    core_threshold: float = 0.5
    enhancing_threshold: float = 0.5
    batch: int = 32
    tta: bool = False

    def __post_init__(self):
        if self.unet.spatial_dims != 2 or self.unet.in_channels != MODALITIES * (2 * self.context + 1):
            raise ValueError("unet: spatial_dims 2 and in_channels 2 * (2 * context + 1)")
        unknown = [v for v in self.views if v not in VIEWS]
        if unknown or not self.views or len(set(self.views)) != len(self.views):
            raise ValueError(f"views: distinct names among {list(VIEWS)}, got {list(self.views)}")
        if self.members % len(self.views):
            raise ValueError(f"members ({self.members}) must be a multiple of the {len(self.views)} views")
        if not (0 < self.core_threshold < 1 and 0 < self.enhancing_threshold < 1):
            raise ValueError(f"core_threshold ({self.core_threshold}) and enhancing_threshold "
                             f"({self.enhancing_threshold}) must lie strictly between 0 and 1")

    @property
    def thresholds(self) -> tuple[float, float, float]:
        """Probability thresholds of WT, TC and ET."""
        return (0.5, self.core_threshold, self.enhancing_threshold)

    @property
    def folds(self) -> int:
        """Members per view: the cross-validation folds, 1 for models trained on every case."""
        return self.members // len(self.views)


def make_ensemble(cfg: SliceModelConfig, members: int | None = None, seed: int = 0) -> UNet:
    """`members` (default `cfg.members`) independently initialised 2-D U-Nets, stacked."""
    return create_ensemble(lambda rngs: UNet(cfg.unet, rngs=rngs), members or cfg.members, seed)


def to_view(a: np.ndarray, view: str) -> np.ndarray:
    """Canonical (X, Y, Z, ...) array with the slice axis of `view` moved to axis 2."""
    return np.moveaxis(a, VIEWS[view], 2)


def from_view(a: np.ndarray, view: str) -> np.ndarray:
    """Inverse of `to_view`."""
    return np.moveaxis(a, 2, VIEWS[view])


def combine_passes(passes: list[np.ndarray]) -> np.ndarray:
    """(..., 6) mean and standard deviation per region of equal-sized member groups (views,
    flips) -> (..., 4): the mean over all members and their standard deviation (law of
    total variance: the mean over groups of their variance plus their mean's squared
    deviation from the overall mean), max over regions."""
    stack = np.stack(passes)
    mean = stack[..., :3].mean(0)
    var = (stack[..., 3:] ** 2 + (stack[..., :3] - mean) ** 2).mean(0)
    return np.concatenate([mean, np.sqrt(var).max(-1, keepdims=True)], axis=-1)


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
    """Per-slice outputs (X, Y, Z, K) of a working-grid volume `x` (X, Y, Z, 2), axial
    slices: `apply` maps (b, X', Y', C) slices to (b, X', Y', K) (e.g. probabilities).
    Slices whose whole context is 0 (outside the brain) are not passed through `apply`;
    their outputs are 0. Calls of `batch` slices (the last one padded): one compiled shape
    per in-plane size."""
    slices, (nx, ny) = _pad_to(context_slices(np.asarray(x, np.float32), context), divisor)
    occupied = np.flatnonzero(slices.reshape(len(slices), -1).any(-1))
    out = []
    for start in range(0, len(occupied), batch):
        chunk = slices[occupied[start:start + batch]]
        pad = batch - len(chunk)
        probs = np.asarray(apply(np.pad(chunk, ((0, pad), (0, 0), (0, 0), (0, 0)))))
        out.append(probs[:len(chunk)])
    if not out:
        out = [np.asarray(apply(np.zeros((batch, *slices.shape[1:]), np.float32)))[:0]]  # the output width K
    result = np.zeros((len(slices), *slices.shape[1:3], out[0].shape[-1]), np.float32)
    result[occupied] = np.concatenate(out)
    return np.moveaxis(result[:, :nx, :ny], 0, 2)


@functools.cache
def _mean_probs_jit():
    def mean_probs(graphdef, params, x):
        logits = ensemble_apply(nnx.merge(graphdef, params), x, sequential=True)  # (K, b, X, Y, 3)
        p = jax.nn.sigmoid(logits)
        return jnp.concatenate([p.mean(0), p.std(0)], axis=-1)
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

    def view_params(self, view: str):
        """Stacked parameters of the members of `view` (one per fold)."""
        if len(self.config.views) == 1:
            return self.params
        k, n = self.config.views.index(view), self.config.folds
        return jax.tree.map(lambda a: a[k * n:(k + 1) * n], self.params)

    def fold_members(self, fold: int) -> "SliceWeights":
        """The ensemble of the fold-`fold` member of every view (one per view, like final
        models): the models that never saw the cases this fold held out."""
        cfg = self.config
        if not 0 <= fold < cfg.folds:
            raise ValueError(f"fold {fold}: this ensemble has {cfg.folds} fold(s) per view")
        picked = [k * cfg.folds + fold for k in range(len(cfg.views))]
        return dataclasses.replace(self, params=jax.tree.map(lambda a: a[np.asarray(picked)], self.params),
                                   config=dataclasses.replace(cfg, members=len(cfg.views)))

    def apply(self, slices: np.ndarray, params=None) -> np.ndarray:
        """(b, X, Y, C) slices -> (b, X, Y, 6): mean WT/TC/ET probabilities over the members
        of `params` (default: all) and their standard deviation per region."""
        return _mean_probs_jit()(self.graphdef, self.params if params is None else params, jnp.asarray(slices))

    def working_probabilities(self, xw: np.ndarray, tta: bool = False) -> np.ndarray:
        """(X, Y, Z, 4) mean region probabilities and spread (`combine_passes`) of a
        normalised working-grid volume (X, Y, Z, 2): every view's members, `tta`: also
        over the in-plane `TTA_FLIPS` of each view."""
        cfg = self.config
        flipped = lambda a, axes: np.flip(a, axes) if axes else a
        passes = []
        for view in cfg.views:
            apply = functools.partial(self.apply, params=self.view_params(view))
            xv = to_view(xw, view)
            passes += [from_view(flipped(predict_volume(apply, flipped(xv, axes), cfg.context, cfg.unet.divisor,
                                                        cfg.batch), axes), view)
                       for axes in (TTA_FLIPS if tta else ((),))]
        return combine_passes(passes)

    def probabilities(self, t1c, flair, spacing, brain=None, tta: bool = False):
        """Region probabilities (X, Y, Z, 3) and spread (X, Y, Z) of raw or z-scored
        T1c/FLAIR (canonical arrays on one grid of voxel size `spacing` mm), on that grid;
        also returns the brain mask used. `tta`: average over the in-plane `TTA_FLIPS`
        (4 network passes per view instead of 1)."""
        x, brain = normalise_pair(t1c, flair, brain)
        return (*self.normalised_probabilities(x, spacing, tta), brain)

    def normalised_probabilities(self, x: np.ndarray, spacing, tta: bool = False):
        """Region probabilities (X, Y, Z, 3) and spread (X, Y, Z) of the network input `x`
        (X, Y, Z, 2) that `normalise_pair` made, on its grid of voxel size `spacing` mm."""
        xw = resample_to_shape(x, working_shape(x.shape[:3], spacing, self.config.spacing))
        out = resample_to_shape(self.working_probabilities(xw, tta), x.shape[:3])
        return np.clip(out[..., :3], 0.0, 1.0), np.clip(out[..., 3], 0.0, None)
