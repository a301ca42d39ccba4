"""Inference: sliding-window U-Net ensemble with flip TTA, on a whole case.

* `load_weights(path=None)`: the shipped weights (`rtjax/weights/seg`) or another
  weights folder (`params/` orbax, `config.yaml`), restored into an `nnx.eval_shape`
  target (`rtjax.ml.restore_params`).
* `sliding_window(fn, x, ...)`: windows of `patch^3` voxels with overlap, blended with
  Gaussian or linear weights; `batch` windows per call bound the memory.
* `predict_regions(weights, x, spacing)`: WT/TC/ET probabilities (and the uncertainty) of
  a normalised case on its own grid; the network runs at its working resolution
  (`render.spacing`), the probabilities are resampled back (trilinear).
* `segment_arrays`, `segment_case` (case folder -> label map, uncertainty, reference
  image) and `write_segmentation` (NIfTI on the input grid).

Uncertainty: the voxel-wise standard deviation of the region probabilities over the
ensemble members and the TTA flips, maximum over the three regions (0 .. 0.5).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rtjax.io import load_case, save_image
from rtjax.labels import TumourMasks, combine_labels, get_convention
from rtjax.ml import read_weights_config, restore_params
from rtjax.seg.cases import normalise_pair
from rtjax.seg.config import SegConfig, config_from_dict
from rtjax.seg.grid import resample_to_shape, working_shape
from rtjax.seg.slices import ARCHITECTURE, SliceWeights
from rtjax.seg.model import (
    brain_mask_from_images,
    create_ensemble,
    ensemble_logits,
    keep_main_components,
    normalise,
    probs_to_masks,
    refine_enhancing,
    region_thresholds,
    small_enhancing_to_necrosis,
)

__all__ = [
    "DEFAULT_WEIGHTS",
    "SegWeights",
    "load_weights",
    "weights_from_model",
    "window_starts",
    "blend_weights",
    "window_shape",
    "sliding_window",
    "working_shape",
    "resample_to_shape",
    "predict_regions",
    "probs_to_case_masks",
    "apply_postprocessing",
    "enhancing_voxels",
    "segment_arrays",
    "segment_case",
    "write_segmentation",
]

#: The weights shipped inside the package.
DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "seg"


# --------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class SegWeights:
    """A segmentation ensemble ready for inference: graph, parameters (members stacked on
    the leading axis), config and where it came from."""

    graphdef: Any
    params: Any
    config: SegConfig
    path: Path | None

    @property
    def version(self) -> str:
        return self.config.version

    def probs(self, x, flips: tuple[tuple[int, ...], ...] = ((),), spread: bool = False):
        """(b, P, P, P, 2) -> mean probabilities (b, P, P, P, 3), and with `spread` the
        max-over-regions standard deviation over members and flips as a 4th channel."""
        return _ensemble_probs_jit()(self.graphdef, self.params, x, tuple(flips), bool(spread))


@functools.cache
def _ensemble_probs_jit():
    """One jitted `_ensemble_probs` for the process (its cache serves every SegWeights)."""

    return jax.jit(_ensemble_probs, static_argnums=(0, 3, 4))


def _ensemble_probs(graphdef, params, x, flips, spread):


    model = nnx.merge(graphdef, params)
    samples = []
    for axes in flips:
        xs = jnp.flip(x, axis=tuple(a + 1 for a in axes)) if axes else x
        p = jax.nn.sigmoid(ensemble_logits(model, xs))  # (K, b, P, P, P, 3)
        samples.append(jnp.flip(p, axis=tuple(a + 2 for a in axes)) if axes else p)
    p = jnp.concatenate(samples, axis=0)
    mean = p.mean(axis=0)
    if not spread:
        return mean
    return jnp.concatenate([mean, p.std(axis=0).max(axis=-1, keepdims=True)], axis=-1)


def weights_from_model(model, config: SegConfig, path=None) -> SegWeights:
    """Wrap a (stacked) `UNet` ensemble for inference."""

    graphdef, params = nnx.split(model)
    return SegWeights(graphdef=graphdef, params=params, config=config, path=path)


@functools.lru_cache(maxsize=4)
def _load_weights_cached(path: Path) -> SegWeights | SliceWeights:
    data = read_weights_config(path, "segmentation weights")
    if data.get("architecture") == ARCHITECTURE:
        return SliceWeights.from_config_dict(data, lambda abstract: restore_params(path, abstract), path)
    config = config_from_dict(data, f"{path / 'config.yaml'}")
    if jax.default_backend() == "cpu" and config.model.dtype != "float32":
        # parameters are float32 whatever the training dtype; bfloat16 convolutions are slow on CPUs
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, dtype="float32"))
    abstract = nnx.eval_shape(lambda: create_ensemble(config.model, config.train.members))
    graphdef, state = nnx.split(restore_params(path, abstract))
    return SegWeights(graphdef=graphdef, params=state, config=config, path=path)


def load_weights(path: str | Path | None = None) -> SegWeights | SliceWeights:
    """Load a weights folder (default: the shipped `rtjax/weights/seg`): a 3-D
    (`SegWeights`) or 2.5-D (`SliceWeights`, config `architecture: slices`) ensemble; cached."""
    return _load_weights_cached(Path(path or DEFAULT_WEIGHTS).resolve())


# --------------------------------------------------------------------------- windows


def window_starts(n: int, patch: int, overlap: float) -> list[int]:
    """Start indices of windows of `patch` covering 0..n-1 with at least the given overlap
    (the last window ends at n; n >= patch)."""
    if n <= patch:
        return [0]
    stride = max(1, int(patch * (1.0 - overlap)))
    count = math.ceil((n - patch) / stride) + 1
    return sorted({int(round(i * (n - patch) / (count - 1))) for i in range(count)})


def blend_weights(window, weighting: str = "gaussian") -> np.ndarray:
    """(w0, w1, w2) positive blending weights of a window (3 sides, or one for a cube): a
    Gaussian of sigma side/8 or a linear ramp (tent) per axis, highest in the centre."""
    sides = tuple(int(n) for n in np.broadcast_to(window, (3,)))
    profiles = []
    for n in sides:
        c = (np.arange(n) - (n - 1) / 2) / n
        if weighting == "gaussian":
            profiles.append(np.exp(-0.5 * (c / 0.125) ** 2))
        elif weighting == "linear":
            profiles.append(1.0 - np.abs(c) * 2 * (1 - 1 / n))
        else:
            raise ValueError(f"unknown weighting {weighting!r}")
    w = profiles[0][:, None, None] * profiles[1][None, :, None] * profiles[2][None, None, :]
    return np.maximum(w / w.max(), 1e-3).astype(np.float32)


def window_shape(shape, patch: int, divisor: int = 1) -> tuple[int, int, int]:
    """Window sides: `patch`, or the axis length rounded up to `divisor` when shorter
    (a small volume is covered by one window without padding it to a cube)."""
    return tuple(min(int(patch), -(-int(n) // divisor) * divisor) for n in shape)


def sliding_window(
    fn: Callable[[np.ndarray], np.ndarray],
    x: np.ndarray,
    patch: int,
    *,
    overlap: float = 0.25,
    batch: int = 1,
    weighting: str = "gaussian",
    divisor: int = 1,
) -> np.ndarray:
    """Apply `fn` ((b, w0, w1, w2, C) -> (b, w0, w1, w2, D)) over `x` (X, Y, Z, C) window by
    window, windows of `window_shape(x.shape, patch, divisor)`.

    `x` is zero-padded to at least the window per axis; overlapping outputs are averaged
    with `blend_weights`; the last window batch is padded with copies (one compiled
    shape). Returns (X, Y, Z, D) float32.
    """
    shape = x.shape[:3]
    win = window_shape(shape, patch, divisor)
    padded = tuple(max(n, w) for n, w in zip(shape, win))
    if padded != shape:
        x = np.pad(x, [(0, p - n) for p, n in zip(padded, shape)] + [(0, 0)])
    corners = list(itertools.product(*(window_starts(n, w, overlap) for n, w in zip(padded, win))))
    weight = blend_weights(win, weighting)[..., None]
    out = norm = None
    for i in range(0, len(corners), batch):
        chunk = corners[i : i + batch]
        tiles = np.stack([x[a : a + win[0], b : b + win[1], c : c + win[2]] for a, b, c in chunk])
        if len(chunk) < batch:
            tiles = np.concatenate([tiles, np.repeat(tiles[:1], batch - len(chunk), axis=0)])
        pred = np.asarray(fn(tiles), np.float32)
        if out is None:
            out = np.zeros((*padded, pred.shape[-1]), np.float32)
            norm = np.zeros((*padded, 1), np.float32)
        for (a, b, c), p in zip(chunk, pred):
            out[a : a + win[0], b : b + win[1], c : c + win[2]] += p * weight
            norm[a : a + win[0], b : b + win[1], c : c + win[2]] += weight
    out /= norm
    return out[: shape[0], : shape[1], : shape[2]]


# --------------------------------------------------------------------------- resolution


def predict_regions(
    weights: SegWeights,
    x: np.ndarray,
    spacing,
    *,
    uncertainty: bool = False,
    tta: bool | None = None,
    infer=None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Region probabilities of a normalised case.

    Args:
        weights: the ensemble.
        x: (X, Y, Z, 2) `normalise`d T1c/FLAIR.
        spacing: voxel size of x, mm.
        uncertainty: also return the uncertainty map.
        tta: flip test-time augmentation over `infer.tta_axes` (default: with uncertainty).
        infer: an `InferConfig` overriding the weights' one.

    Returns:
        probs (X, Y, Z, 3) float32 (WT, TC, ET), uncertainty (X, Y, Z) float32 or None.
    """
    cfg = weights.config
    inf = infer or cfg.infer
    tta = uncertainty if tta is None else tta
    flips = ((),) + tuple((a,) for a in inf.tta_axes) if tta else ((),)
    spread = uncertainty and (cfg.train.members > 1 or len(flips) > 1)
    shape = x.shape[:3]
    work = working_shape(shape, spacing, cfg.render.spacing)
    xw = resample_to_shape(np.asarray(x, np.float32), work)
    out = sliding_window(lambda t: weights.probs(t, flips, spread), xw, inf.patch,
                         overlap=inf.overlap, batch=inf.batch, weighting=inf.weighting,
                         divisor=cfg.model.divisor)
    out = resample_to_shape(out, shape)
    probs = np.clip(out[..., :3], 0.0, 1.0)
    if not uncertainty:
        return probs, None
    unc = out[..., 3] if spread else np.zeros(shape, np.float32)
    return probs, np.clip(unc, 0.0, None).astype(np.float32)


# --------------------------------------------------------------------------- cases


def probs_to_case_masks(probs: np.ndarray, brain: np.ndarray, keep_fraction: float,
                        min_enhancing_voxels: int = 0, threshold=0.5, t1c_z: np.ndarray | None = None,
                        refine_against_edema: bool = False):
    """Tumour masks of region probabilities (X, Y, Z, 3) thresholded at `threshold` (one
    for all regions or (WT, TC, ET)): none outside the boolean `brain`, small stray
    components dropped (`keep_main_components`, skipped when `keep_fraction` is 0), with
    `t1c_z` (the brain-z-scored T1c on the same grid) the enhancing boundary refined on it
    (`refine_enhancing`, with the ET threshold and `refine_against_edema` as its
    `against_edema`), an enhancing region of fewer than
    `min_enhancing_voxels` made necrosis (`small_enhancing_to_necrosis`)."""

    masks = probs_to_masks(probs * brain[..., None], threshold)
    masks = keep_main_components(masks, keep_fraction) if keep_fraction > 0 else masks
    masks = (refine_enhancing(masks, probs[..., 2], t1c_z, threshold=region_thresholds(threshold)[2],
                              against_edema=refine_against_edema)
             if t1c_z is not None else masks)
    return small_enhancing_to_necrosis(masks, min_enhancing_voxels)


def apply_postprocessing(probs: np.ndarray, brain: np.ndarray, spacing, t1c_z: np.ndarray, pp) -> TumourMasks:
    """Tumour masks of region probabilities (X, Y, Z, 3) under the 2.5-D post-processing
    `pp` (a `SliceModelConfig` or a `rtjax.seg.postprocessing.Postprocessing`: its
    `keep_fraction`, `min_enhancing_ml` (mL, on a grid of voxel size `spacing` mm),
    `thresholds`, `refine_enhancing` on the brain-z-scored T1c `t1c_z` and
    `refine_against_edema`), as `probs_to_case_masks` draws them."""
    return probs_to_case_masks(probs, brain, pp.keep_fraction, enhancing_voxels(pp.min_enhancing_ml, spacing),
                               threshold=pp.thresholds, t1c_z=t1c_z if pp.refine_enhancing else None,
                               refine_against_edema=pp.refine_against_edema)


def enhancing_voxels(min_enhancing_ml: float, spacing) -> int:
    """Voxels of `min_enhancing_ml` mL on a grid of voxel size `spacing` mm."""
    return int(np.ceil(min_enhancing_ml * 1000.0 / float(np.prod(spacing))))


def segment_arrays(t1c, flair, spacing, *, brain_mask=None, weights=None, uncertainty=False, tta=None):
    """Tumour masks (and uncertainty) of raw or pre-normalised T1c/FLAIR arrays (canonical).

    Returns (TumourMasks, uncertainty (X, Y, Z) float32 or None). Voxels outside the brain
    are never tumour; small stray components are dropped (`keep_fraction`), and for 2.5-D
    weights an enhancing region below `min_enhancing_ml` becomes necrosis. `tta`: flip
    test-time augmentation (3-D weights: by default with `uncertainty`; 2.5-D weights: the
    in-plane `TTA_FLIPS`, by default as their `model.tta`).
    """

    w = weights if isinstance(weights, (SegWeights, SliceWeights)) else load_weights(weights)
    if isinstance(w, SliceWeights):
        x, brain = normalise_pair(t1c, flair, brain_mask)
        probs, spread = w.normalised_probabilities(x, spacing, tta=w.config.tta if tta is None else bool(tta))
        masks = apply_postprocessing(probs, brain, spacing, x[..., 0], w.config)  # x[..., 0]: the z-scored T1c
        return masks, spread if uncertainty else None
    brain = brain_mask_from_images(t1c, flair) if brain_mask is None else np.asarray(brain_mask, bool)
    x = normalise(t1c, flair, brain)
    probs, unc = predict_regions(w, x, spacing, uncertainty=uncertainty, tta=tta)
    return probs_to_case_masks(probs, brain, w.config.infer.keep_fraction), unc


def segment_case(
    case_dir,
    *,
    weights=None,
    labels: str = "brats2021",
    uncertainty: bool = False,
    tta: bool | None = None,
    overrides=None,
):
    """Segment one case folder (T1c and FLAIR; brain_mask used if present).

    Returns:
        (label_array, uncertainty, reference): the uint8 label map in convention `labels`
        (canonical orientation, the reference's shape), the float32 uncertainty map or
        None, and the T1c `Image` whose grid the outputs are on (`save_image` writes them
        back on the input grid).

    Raises:
        InputError: missing T1c or FLAIR, grids differ, unreadable files or NaNs.
    """

    convention = get_convention(labels)
    case = load_case(case_dir, names=["t1c", "flair", "brain_mask"], require=["t1c", "flair"], overrides=overrides)
    ref = case.images["t1c"]
    brain = case.images["brain_mask"].data if "brain_mask" in case.images else None
    masks, unc = segment_arrays(ref.data, case.images["flair"].data, ref.spacing, brain_mask=brain,
                                weights=weights, uncertainty=uncertainty, tta=tta)
    return combine_labels(masks, convention), unc, ref


def write_segmentation(out_dir, label_array, uncertainty, reference) -> list[Path]:
    """Write `segmentation.nii.gz` (uint8) and, if given, `segmentation_uncertainty.nii.gz`
    (float32) on the reference's input grid, atomically. Returns the paths."""

    out_dir = Path(out_dir)
    paths = [save_image(label_array, reference, out_dir / "segmentation.nii.gz", kind="label")]
    if uncertainty is not None:
        paths.append(save_image(uncertainty, reference, out_dir / "segmentation_uncertainty.nii.gz", kind="float"))
    return paths
