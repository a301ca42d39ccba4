"""Training of the 2.5-D model on real labelled cases, k-fold by patient, on a CPU.

`train_slices(config, workdir)` finds the labelled cases (`rtjax.seg.cases`), caches them
on the working grid (npz), and trains one U-Net per fold on the other folds' patients:
random crops of axial slices (`crop` voxels, `tumour_fraction` of them through the tumour,
`copy_paste` of them with another training case's tumour pasted in),
rotation/scaling, flips, bias field, intensity scale/shift, gamma and noise; loss BCE + soft Dice over WT/TC/ET. Each fold
checkpoints (orbax) every `checkpoint_seconds` and resumes from its latest checkpoint; the
wall-clock budget `max_seconds` is split evenly over the folds. Then every held-out case is
segmented by its fold's model and scored on its original grid (Dice, HD95 per region), and
the fold models are exported as the ensemble (`workdir/weights`, the shipped layout); with
`final_steps`, one model per view is then trained on every case and exported as the
ensemble instead, the fold models beside it (`workdir/fold_weights`). Exports store float16
parameters (`WEIGHTS_DTYPE`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from rtjax.config import from_dict, read_yaml, to_dict
from rtjax.io import load_image, load_tumour_masks
from rtjax.ml import TrainCheckpoints, save_weights
from rtjax.provenance import write_json_atomic
from rtjax.seg.data import resolve_data_root
from rtjax.seg.cases import cached_case, find_labelled_cases, robust_normalise
from rtjax.seg.infer import load_weights
from rtjax.seg.model import REGIONS, UNet, masks_to_regions
from rtjax.seg.postprocessing import (candidate_dice, candidate_grid, choose_postprocessing, nested_estimate,
                                      postprocessed_regions, postprocessing_candidates, score_regions)
from rtjax.seg.slices import (ARCHITECTURE, MODALITIES, VIEWS, SliceModelConfig, SliceWeights, context_slices,
                              make_ensemble, to_view)
from rtjax.seg.synth import blur_axis

__all__ = ["SliceTrainConfig", "SliceSegConfig", "load_slice_config", "fold_of", "member_name", "cv_probs_name",
           "sample_batch",
           "paste_tumour",
           "blur_slices", "intensity_curves", "CURVE_KNOTS",
           "make_train_step", "train_slices", "pack_finished_models", "unpack_finished_models", "cv_table"]


@dataclass(frozen=True)
class SliceTrainConfig:
    """Training recipe.

    Attributes:
        data_root: folder searched for labelled cases (None: `RTJAX_DATA` / ../shared/data).
        cache_dir: npz cache (None: workdir/cache).
        folds: k of the k-fold split by patient (the k models are the shipped ensemble).
        batch: slices per step.
        crop: side of the square training crop, working voxels (multiple of the divisor).
        steps: steps per fold (the budget may stop a fold earlier).
        learning_rate: peak Adam learning rate (linear warm-up, cosine to 2 % of it).
        warmup_steps: warm-up steps.
        tumour_fraction: share of crops centred on a tumour voxel.
        copy_paste: share of crops that get a tumour pasted in from another training
            case (its slice's tumour voxels, all channels and regions, at the same place in
            the crop, inside the brain); 0 (the shipped runs) draws nothing extra.
        blur: share of crops given the look of a lower-resolution scan (`blur_slices`:
            Gaussian blur in-plane, sigma 0.5-1.5 working voxels per axis, and mixing of
            neighbouring context slices); 0 draws nothing extra.
        contrast: share of crops whose T1c and FLAIR are each remapped by a random monotonic
            piecewise-linear curve of the brain z-score (`intensity_curves`, the same for
            every context slice: another scanner's contrast); 0 draws nothing extra.
        soft_targets: train on the share of each working voxel in each region (partial
            volume of the original-grid masks, `PreparedCase.regions`) instead of the
            thresholded masks: the network learns where a boundary lies inside a working
            voxel, which the trilinear resampling back to the case's grid then uses.
        region_weights: weight of WT, TC and ET in the loss (BCE and soft Dice, each a
            weighted mean over the regions); equal weights: the plain mean.
        max_seconds: wall-clock budget of all models together (folds x views, plus views
            with `final_steps`), split evenly (None: `steps` only).
        checkpoint_seconds: checkpoint interval.
        log_every: steps between log lines.
        seed: sampling and initialisation seed.
        init_weights: warm start: a 2.5-D fold ensemble (a weights folder of k-fold models,
            e.g. a run's ``fold_weights``) whose member `fold % k` of a view initialises fold
            `fold` of that view when it has no checkpoint yet; k must divide `folds` (the
            round-robin split nests: every case held out by fold f is held out by its fold
            f % k, so the warm start never saw it); None: random initialisation.
        final_steps: after the cross-validation, train one model per view on every case for
            this many steps (warm-started from the view's fold-0 model) and export those as
            the ensemble (`weights/`: one member per view), the fold models beside them
            (`fold_weights/`), the cross-validation as their estimate; 0: export the fold
            models as the ensemble.
        keep_fractions, min_enhancing_ml, refine_enhancing, refine_against_edema,
            core_thresholds, enhancing_thresholds: post-processing candidates
            (`SliceModelConfig`; `refine_against_edema` only with `refine_enhancing`); the
            combination with the best mean held-out Dice goes into the exported weights
            (chosen on the same held-out cases it is scored on: a small optimism; cv.json
            also gives the nested estimate, each fold scored with the combination chosen on
            the other folds).
    """

    data_root: str | None = None
    cache_dir: str | None = None
    folds: int = 3
    batch: int = 16
    crop: int = 96
    steps: int = 2000
    learning_rate: float = 2e-3
    warmup_steps: int = 50
    tumour_fraction: float = 0.8
    copy_paste: float = 0.0
    blur: float = 0.0
    contrast: float = 0.0
    soft_targets: bool = False
    region_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
    max_seconds: float | None = None
    checkpoint_seconds: float = 180.0
    log_every: int = 25
    seed: int = 0
    init_weights: str | None = None
    final_steps: int = 0
    keep_fractions: tuple[float, ...] = (0.2,)
    min_enhancing_ml: tuple[float, ...] = (0.0,)
    refine_enhancing: tuple[bool, ...] = (False,)
    refine_against_edema: tuple[bool, ...] = (False,)
    core_thresholds: tuple[float, ...] = (0.5,)
    enhancing_thresholds: tuple[float, ...] = (0.5,)


@dataclass(frozen=True)
class SliceSegConfig:
    """A 2.5-D segmentation config (`configs/seg_slices.yaml`)."""

    architecture: str = ARCHITECTURE
    version: str = "dev"
    model: SliceModelConfig = field(default_factory=SliceModelConfig)
    train: SliceTrainConfig = field(default_factory=SliceTrainConfig)

    def __post_init__(self):
        if self.architecture != ARCHITECTURE:
            raise ValueError(f"architecture must be {ARCHITECTURE!r}")
        if self.train.crop % self.model.unet.divisor:
            raise ValueError(f"train.crop must be a multiple of {self.model.unet.divisor}")
        thresholds = (*self.train.core_thresholds, *self.train.enhancing_thresholds)
        if not all(0 < v < 1 for v in thresholds):
            raise ValueError(f"train.core_thresholds and train.enhancing_thresholds must lie strictly between 0 "
                             f"and 1, got {list(self.train.core_thresholds)} and "
                             f"{list(self.train.enhancing_thresholds)}")
        weights = self.train.region_weights
        if len(weights) != len(REGIONS) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"train.region_weights must be {len(REGIONS)} weights >= 0 ({', '.join(REGIONS)}) "
                             f"with a positive sum, got {list(weights)}")


def load_slice_config(path) -> SliceSegConfig:
    """Read a YAML 2.5-D config (overrides of the defaults); unknown keys are errors."""
    return from_dict(SliceSegConfig, read_yaml(path), str(path))


def fold_of(index: int, folds: int) -> int:
    """Fold of the `index`-th case in name order (round robin: every fold mixes sources)."""
    return index % folds


# --------------------------------------------------------------------------- batches


def _random_crop(rng, case, pool, crop: int):
    """(crop, crop, C) inputs and (crop, crop, 3) targets of a slice crop near a random
    voxel of `pool` (crop-centre candidates, (n, 3) as x, y, slice)."""
    cx, cy, cz = pool[rng.integers(len(pool))]
    x0 = int(np.clip(cx - crop // 2 + rng.integers(-crop // 4, crop // 4 + 1), 0, case["x"].shape[1] - crop))
    y0 = int(np.clip(cy - crop // 2 + rng.integers(-crop // 4, crop // 4 + 1), 0, case["x"].shape[2] - crop))
    return case["x"][cz, x0:x0 + crop, y0:y0 + crop], case["y"][cz, x0:x0 + crop, y0:y0 + crop]


def paste_tumour(x, y, donor_x, donor_y):
    """Crop `x`, `y` with the donor crop's whole-tumour voxels (any share of the whole
    tumour) pasted in where `x` is brain (non-zero): all input channels and regions there
    come from the donor."""
    where = (donor_y[..., :1] > 0) & (x != 0).any(-1, keepdims=True)
    return np.where(where, donor_x, x), np.where(where, donor_y, y)


def sample_batch(rng, cases, cfg: SliceSegConfig):
    """(b, crop, crop, C) inputs and (b, crop, crop, 3) targets, crops of random slices
    (`copy_paste` of them with another case's tumour pasted in)."""
    t, crop = cfg.train, cfg.train.crop
    xs, ys = [], []
    for _ in range(t.batch):
        index = rng.integers(len(cases))
        case = cases[index]
        x, y = _random_crop(rng, case, case["tumour"] if rng.random() < t.tumour_fraction else case["brain"], crop)
        if t.copy_paste > 0 and len(cases) > 1 and rng.random() < t.copy_paste:
            other = rng.integers(len(cases) - 1)
            donor = cases[other + (other >= index)]
            x, y = paste_tumour(x, y, *_random_crop(rng, donor, donor["tumour"], crop))
        xs.append(x)
        ys.append(y)
    return np.stack(xs), np.stack(ys).astype(np.float32)


def _train_view(case, cfg: SliceSegConfig, view: str = "axial") -> dict:
    """A case as slices of `view` padded to at least `crop` in-plane, with crop-centre pools
    and targets (float32: region shares with `train.soft_targets`, else 0/1 masks)."""
    crop = cfg.train.crop
    x = context_slices(to_view(case.x, view), cfg.model.context)
    targets = case.regions if cfg.train.soft_targets else case.region_masks
    y = np.moveaxis(to_view(targets.astype(np.float32), view), 2, 0)
    px, py = max(0, crop - x.shape[1]), max(0, crop - x.shape[2])
    pads = ((0, 0), (px // 2, px - px // 2), (py // 2, py - py // 2), (0, 0))
    x, y = np.pad(x, pads), np.pad(y, pads)
    brain = np.pad(np.moveaxis(to_view(case.brain, view), 2, 0), pads[:3])
    tumour = np.argwhere(y[..., 0] >= 0.5)[:, [1, 2, 0]]
    return {"x": x, "y": y, "tumour": tumour, "brain": np.argwhere(brain)[:, [1, 2, 0]]}


def warp_slices(x, angle, scale):
    """Rotate each sample of (b, X, Y, C) `x` by `angle` (b,) radians and scale it by
    `scale` (b,) about the slice centre (bilinear, zero outside)."""
    b, nx, ny = x.shape[:3]
    gx, gy = jnp.meshgrid(jnp.arange(nx) - (nx - 1) / 2, jnp.arange(ny) - (ny - 1) / 2, indexing="ij")

    def one(image, a, s):
        cos, sin = jnp.cos(a) / s, jnp.sin(a) / s
        coords = [cos * gx - sin * gy + (nx - 1) / 2, sin * gx + cos * gy + (ny - 1) / 2]
        sample = lambda channel: jax.scipy.ndimage.map_coordinates(channel, coords, order=1, cval=0.0)
        return jax.vmap(sample, in_axes=-1, out_axes=-1)(image)

    return jax.vmap(one)(x, angle, scale)


def _warp(key, x, y, max_degrees: float = 15.0, max_log_scale: float = 0.15):
    """The same random rotation (+-`max_degrees`) and scaling (log +-`max_log_scale`) of each
    sample of `x` and its targets `y` (which become soft at the edges)."""
    ka, ks = jax.random.split(key)
    b = x.shape[0]
    angle = jnp.deg2rad(max_degrees) * jax.random.uniform(ka, (b,), minval=-1.0, maxval=1.0)
    scale = jnp.exp(max_log_scale * jax.random.uniform(ks, (b,), minval=-1.0, maxval=1.0))
    return warp_slices(x, angle, scale), warp_slices(y, angle, scale)


def _bias_field(key, shape, strength: float = 0.3):
    """Smooth multiplicative fields (b, X, Y, C): exp of a random linear + quadratic
    polynomial in normalised in-plane coordinates, ~`strength` in log-amplitude."""
    b, nx, ny, c = shape
    u, v = jnp.meshgrid(jnp.linspace(-1, 1, nx), jnp.linspace(-1, 1, ny), indexing="ij")
    basis = jnp.stack([u, v, u * v, u ** 2 - 1 / 3, v ** 2 - 1 / 3])  # (5, X, Y)
    coeff = strength / 2 * jax.random.normal(key, (b, c, 5))
    return jnp.exp(jnp.einsum("bck,kxy->bxyc", coeff, basis))


def blur_slices(x, sigma_x, sigma_y, mix, modalities: int = 2, radius: int = 4):
    """The look of a lower-resolution scan: (b, X, Y, S * modalities) slice-major context
    stacks blurred in-plane by Gaussians of `sigma_x`, `sigma_y` (b,) voxels (zero padding), then each
    context slice mixed with its neighbours, weights `mix`, 1 - 2 `mix`, `mix` (b,)
    (edge slices repeated). Zero sigma and mix leave `x` unchanged."""
    in_plane = lambda image, sx, sy: blur_axis(blur_axis(image, sx, 0, radius, "constant"), sy, 1, radius, "constant")
    x = jax.vmap(in_plane)(x, sigma_x, sigma_y)
    b, nx, ny, channels = x.shape
    s = x.reshape(b, nx, ny, channels // modalities, modalities)
    below = jnp.concatenate([s[:, :, :, :1], s[:, :, :, :-1]], axis=3)
    above = jnp.concatenate([s[:, :, :, 1:], s[:, :, :, -1:]], axis=3)
    m = mix.reshape(b, 1, 1, 1, 1)
    return ((1 - 2 * m) * s + m * (below + above)).reshape(x.shape)


def _random_blur(key, x, share: float, modalities: int):
    """`blur_slices` on a random `share` of the samples (sigma 0.5-1.5 per axis, mix 0-0.3)."""
    kp, kx, ky, km = jax.random.split(key, 4)
    b = x.shape[0]
    on = jax.random.bernoulli(kp, share, (b,))
    sigma = lambda k: jnp.where(on, jax.random.uniform(k, (b,), minval=0.5, maxval=1.5), 0.0)
    mix = jnp.where(on, jax.random.uniform(km, (b,), maxval=0.3), 0.0)
    return blur_slices(x, sigma(kx), sigma(ky), mix, modalities)


#: Knots (brain z-scores) of the random intensity curves of `train.contrast`.
CURVE_KNOTS = tuple(float(k) for k in np.linspace(-4.0, 8.0, 7))


def intensity_curves(x, values, modalities: int = 2):
    """Each modality of (b, X, Y, S * modalities) slice-major stacks `x` mapped by its own
    piecewise-linear curve through (`CURVE_KNOTS`, `values` (b, modalities, knots)), the
    same for every context slice, continued linearly beyond the end knots."""
    knots = jnp.asarray(CURVE_KNOTS)
    b, nx, ny, channels = x.shape
    s = x.reshape(b, nx, ny, channels // modalities, modalities)
    slope_lo = (values[..., 1] - values[..., 0]) / (knots[1] - knots[0])  # (b, modalities)
    slope_hi = (values[..., -1] - values[..., -2]) / (knots[-1] - knots[-2])
    inner = jax.vmap(jax.vmap(lambda v, curve: jnp.interp(v, knots, curve), in_axes=(-1, 0), out_axes=-1))(s, values)
    lo = values[..., 0][:, None, None, None] + (s - knots[0]) * slope_lo[:, None, None, None]
    hi = values[..., -1][:, None, None, None] + (s - knots[-1]) * slope_hi[:, None, None, None]
    return jnp.where(s < knots[0], lo, jnp.where(s > knots[-1], hi, inner)).reshape(x.shape)


def _random_curves(key, x, share: float, modalities: int, spread: float = 0.35):
    """`intensity_curves` on a random `share` of the samples: monotonic curves through 0 whose
    segment slopes are log-normal (sigma `spread`); the other samples keep the identity."""
    kp, ks = jax.random.split(key)
    b, knots = x.shape[0], jnp.asarray(CURVE_KNOTS)
    on = jax.random.bernoulli(kp, share, (b, 1, 1))
    slopes = jnp.exp(jnp.where(on, spread * jax.random.normal(ks, (b, modalities, len(CURVE_KNOTS) - 1)), 0.0))
    rise = jnp.concatenate([jnp.zeros((b, modalities, 1)), jnp.cumsum(slopes * jnp.diff(knots), -1)], -1)
    zero = int(np.argmin(np.abs(np.asarray(CURVE_KNOTS))))  # the knot at z = 0 stays at 0
    return intensity_curves(x, rise - rise[..., zero:zero + 1], modalities)


def _augment(key, x, y, blur: float = 0.0, contrast: float = 0.0):
    """Rotation/scaling, flips, optionally blur (`blur` share of the samples) and random
    intensity curves (`contrast` share), bias field, per-channel intensity scale/shift, gamma
    on the positive part, noise (inputs are brain z-scores, 0 outside the brain)."""
    kw, kf1, kf2, ks, kb, kg, kn, kbias = jax.random.split(key, 8)
    b, c = x.shape[0], x.shape[-1]
    x, y = _warp(kw, x, y)
    flip1 = jax.random.bernoulli(kf1, 0.5, (b, 1, 1, 1))
    x, y = jnp.where(flip1, x[:, ::-1], x), jnp.where(flip1, y[:, ::-1], y)
    flip2 = jax.random.bernoulli(kf2, 0.5, (b, 1, 1, 1))
    x, y = jnp.where(flip2, x[:, :, ::-1], x), jnp.where(flip2, y[:, :, ::-1], y)
    inside = x != 0
    if blur > 0:  # its own key: runs without blur keep their random stream
        x = _random_blur(jax.random.fold_in(key, 8), x, blur, MODALITIES)
    if contrast > 0:
        x = _random_curves(jax.random.fold_in(key, 9), x, contrast, MODALITIES)
    scale = jnp.exp(0.15 * jax.random.normal(ks, (b, 1, 1, c)))
    shift = 0.15 * jax.random.normal(kb, (b, 1, 1, c))
    gamma = jnp.exp(0.2 * jax.random.normal(kg, (b, 1, 1, c)))
    x = jnp.where(x > 0, jnp.abs(x) ** gamma, x)
    x = x * scale * _bias_field(kbias, x.shape) + shift
    x = x + 0.05 * jax.random.normal(kn, x.shape)
    return jnp.where(inside, x, 0.0), y


def _loss(model, x, y, region_weights=(1.0, 1.0, 1.0)):
    """BCE + soft Dice (over the batch) of (b, X, Y, 3) region logits, each a mean over the
    regions weighted by `region_weights`."""
    logits = model(x)
    w = jnp.asarray(region_weights, jnp.float32) / sum(region_weights)
    bce = optax.sigmoid_binary_cross_entropy(logits, y).mean((0, 1, 2))
    p = jax.nn.sigmoid(logits)
    inter = (p * y).sum((0, 1, 2))
    soft_dice = 1.0 - (2 * inter + 1.0) / (p.sum((0, 1, 2)) + y.sum((0, 1, 2)) + 1.0)
    return (w * (bce + soft_dice)).sum()


def _make_step(graphdef, tx, blur: float = 0.0, contrast: float = 0.0, region_weights=(1.0, 1.0, 1.0)):
    @jax.jit
    def step(params, opt_state, key, x, y):
        x, y = _augment(key, x, y, blur, contrast)
        value, grads = jax.value_and_grad(lambda p: _loss(nnx.merge(graphdef, p), x, y, region_weights))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value
    return step


# --------------------------------------------------------------------------- folds


def _optimizer(t: SliceTrainConfig, steps: int | None = None):
    """Adam with linear warm-up and cosine decay to 2 % of the peak over `steps` (default
    `t.steps`)."""
    return optax.adam(optax.warmup_cosine_decay_schedule(0.0, t.learning_rate, t.warmup_steps, steps or t.steps,
                                                         t.learning_rate * 0.02))


def make_train_step(cfg: SliceSegConfig, steps: int | None = None):
    """`(step, optimizer)` of `cfg`'s recipe: the jitted `step(params, opt_state, key, x, y)
    -> (params, opt_state, loss)` on (b, crop, crop, C) inputs and (b, crop, crop, 3) targets
    (augmentation with `train.blur` and `train.contrast`, BCE + soft Dice weighted by
    `train.region_weights`, Adam over `steps`, default `train.steps`) and its optax optimizer."""
    t = cfg.train
    graphdef = nnx.split(nnx.eval_shape(lambda: UNet(cfg.model.unet, rngs=nnx.Rngs(0))))[0]
    tx = _optimizer(t, steps)
    return _make_step(graphdef, tx, t.blur, t.contrast, tuple(t.region_weights)), tx


#: Exported 2.5-D weights store their parameters in float16: half the size in the repository,
#: restored as float32 (rounding moves the region probabilities by about 1e-3).
WEIGHTS_DTYPE = jnp.float16

#: Mean Dice per region at which a model counts as BraTS-level here (the model card's limits).
DICE_TARGETS = {"WT": 0.85, "TC": 0.75, "ET": 0.70}

#: `member_name` fold of the model of a view trained on every case (`train.final_steps`).
FINAL = "final"


def member_name(view: str, fold: int | str) -> str:
    """Checkpoint folder (under the workdir) of the fold model of `view`: ``fold{k}`` for
    axial (as before views existed), ``{view}_fold{k}`` otherwise; `fold` `FINAL`: the
    view's model trained on every case, ``{view}_final``."""
    if fold == FINAL:
        return f"{view}_{FINAL}"
    return f"fold{fold}" if view == "axial" else f"{view}_fold{fold}"


def cv_probs_name(case_index: int, view: str, fold: int | str, step: int | str, suffix: str = "") -> str:
    """Cache file (under `workdir/cv_probs`) of held-out probabilities of the `case_index`-th
    case by the `view` model of `fold` at `step` (``*`` globs), as `member_name` names the
    model: ``case003_fold0_step2000.npz``, ``case003_coronal_fold0_step1000.npz``."""
    return f"case{case_index:03d}_{member_name(view, fold)}_step{step}{suffix}.npz"


def warm_start_params(path, cfg: SliceSegConfig, fold: int, view: str = "axial"):
    """Parameters that warm-start fold `fold` of `view`: member `fold % k` of the view (its
    first view's when it has no `view` models: e.g. axial weights start a coronal model) of
    the k-fold 2.5-D ensemble `path`, checked against `cfg` (same U-Net; k divides
    `train.folds`, so that the member never saw a case that fold `fold` holds out)."""
    weights = load_weights(path)
    if not isinstance(weights, SliceWeights) or weights.config.unet != cfg.model.unet:
        raise ValueError(f"{path}: train.init_weights must be 2.5-D weights with the same U-Net "
                         f"as the config ({cfg.model.unet})")
    views, k = weights.config.views, weights.config.folds
    if k < 2:
        raise ValueError(f"{path}: its members were trained on every case (one per view), so each saw the cases "
                         "a fold holds out; warm-start the folds from a fold ensemble (a run's fold_weights/)")
    if cfg.train.folds % k:
        raise ValueError(f"{path}: {k}-fold ensemble, but the config trains {cfg.train.folds} folds: a warm start "
                         f"needs a number of folds that {k} divides (fold f starts from member f % {k})")
    member = (views.index(view) if view in views else 0) * k + fold % k
    return jax.tree.map(lambda a: jnp.asarray(a[member]), weights.params)


def _train_fold(fold: int | str, cases: list[dict], cfg: SliceSegConfig, workdir: Path, seconds: float | None,
                step_fn, log, view: str = "axial", init=None, steps: int | None = None):
    """Train (or resume) the model of `view` and `fold` (`FINAL`: on every case) on `cases`
    for `steps` (default `train.steps`), starting from its checkpoint, else `init()`'s
    parameters (None: `train.init_weights`, else random). Returns (params, step)."""
    t, total = cfg.train, steps or cfg.train.steps
    name = (f"final model ({view})" if fold == FINAL else f"fold {fold}" if view == "axial"
            else f"fold {fold} ({view})")
    index = t.folds if fold == FINAL else fold  # seeds of the model trained on every case
    params = nnx.split(UNet(cfg.model.unet, rngs=nnx.Rngs(t.seed + index)))[1]
    opt_state = _optimizer(t, total).init(params)
    with TrainCheckpoints(workdir / member_name(view, fold), keep=2) as ckpt:
        step = ckpt.latest_step() or 0
        if step:
            params, opt_state = ckpt.restore(step, params, opt_state)
            log(f"{name}: resumed at step {step}")
        elif init is not None:
            params, source = init()
            log(f"{name}: warm start from {source}")
        elif t.init_weights:
            params = warm_start_params(t.init_weights, cfg, fold, view)
            log(f"{name}: warm start from {t.init_weights}")
        # axial keeps the random streams it had before views existed
        stream = [] if view == "axial" else [VIEWS[view] + 1]
        rng = np.random.default_rng([t.seed, index, step, *stream])
        key = jax.random.key(t.seed * 1000 + index)
        key = jax.random.fold_in(key, stream[0]) if stream else key
        start = last_ckpt = time.monotonic()
        losses = []
        while step < total and (seconds is None or time.monotonic() - start < seconds):
            x, y = sample_batch(rng, cases, cfg)
            params, opt_state, value = step_fn(params, opt_state, jax.random.fold_in(key, step), x, y)
            step += 1
            losses.append(float(value))
            if step % t.log_every == 0:
                rate = t.batch * len(losses) / (time.monotonic() - start)
                left = (total - step) * t.batch / rate / 60
                log(f"{name} step {step} loss {np.mean(losses[-t.log_every:]):.4f} ({rate:.1f} slices/s, "
                    f"~{left:.0f} min to step {total})")
            if time.monotonic() - last_ckpt > t.checkpoint_seconds:
                ckpt.save(step, params, opt_state)
                last_ckpt = time.monotonic()
        if step != ckpt.latest_step():
            ckpt.save(step, params, opt_state)
    return params, step


def _model_steps(cfg: SliceSegConfig, fold: int | str) -> int:
    return cfg.train.final_steps if fold == FINAL else cfg.train.steps


def _members(cfg: SliceSegConfig) -> list[tuple[str, int | str]]:
    """Every (view, fold) model a run of `cfg` trains: the fold models, then the final ones."""
    folds = [*range(cfg.train.folds), *([FINAL] if cfg.train.final_steps else [])]
    return [(view, fold) for view in cfg.model.views for fold in folds]


def _template_params(cfg: SliceSegConfig) -> nnx.State:
    return nnx.split(UNet(cfg.model.unet, rngs=nnx.Rngs(0)))[1]


def pack_finished_models(cfg: SliceSegConfig, workdir, out) -> list[str]:
    """Write each finished model of `workdir` (a checkpoint at its steps: `train.steps`, or
    `train.final_steps` for a final model) as ``out/<member>.npz``: its parameters in float16
    (`WEIGHTS_DTYPE`, as the export stores them) and its step. About 1 MB a model against
    2-5.5 MB for its checkpoint: a long run's finished models carried between sessions or
    machines (`unpack_finished_models` puts them back). Returns the member names written."""
    workdir, out = Path(workdir), Path(out)
    template = _template_params(cfg)
    opt_state = _optimizer(cfg.train).init(template)
    written = []
    for view, fold in _members(cfg):
        name, steps = member_name(view, fold), _model_steps(cfg, fold)
        if not (workdir / name).is_dir():
            continue
        with TrainCheckpoints(workdir / name) as ckpt:
            step = ckpt.latest_step()
            if step is None or step < steps:
                continue
            params, _ = ckpt.restore(step, _template_params(cfg), opt_state)
        flat = {jax.tree_util.keystr(path): np.asarray(leaf, WEIGHTS_DTYPE)
                for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(params))[0]}
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f"{name}.tmp.npz"
        np.savez_compressed(tmp, step=np.int64(step), version=np.str_(cfg.version), **flat)
        tmp.replace(out / f"{name}.npz")
        written.append(name)
    return written


def unpack_finished_models(cfg: SliceSegConfig, packed, workdir) -> list[str]:
    """Checkpoint each ``packed/<member>.npz`` (`pack_finished_models`) into `workdir` at its
    step, the parameters back in float32 and the Adam moments fresh (a finished model never
    uses them again), unless `workdir` already holds a checkpoint of that member at that
    step or later; the trainer then resumes it as finished. Returns the member names written."""
    packed, workdir = Path(packed), Path(workdir)
    known = {member_name(view, fold): fold for view, fold in _members(cfg)}
    files = sorted(packed.glob("*.npz"))
    unknown = [f.name for f in files if f.stem not in known]
    if unknown:
        raise ValueError(f"{packed}: {unknown} are not models of this config "
                         f"({cfg.train.folds} folds, views {list(cfg.model.views)})")
    written = []
    for path in files:
        name = path.stem
        template = _template_params(cfg)
        pure = nnx.to_pure_dict(template)
        with np.load(path) as stored:
            step = int(stored["step"])
            leaves = []
            for key_path, leaf in jax.tree_util.tree_flatten_with_path(pure)[0]:
                key = jax.tree_util.keystr(key_path)
                if key not in stored or stored[key].shape != leaf.shape:
                    raise ValueError(f"{path}: parameter {key} is missing or has another shape than the "
                                     f"config's U-Net ({cfg.model.unet})")
                leaves.append(jnp.asarray(stored[key], jnp.float32))
        if step < _model_steps(cfg, known[name]):
            raise ValueError(f"{path}: step {step} is short of the config's {_model_steps(cfg, known[name])}")
        nnx.replace_by_pure_dict(template, jax.tree.unflatten(jax.tree.structure(pure), leaves))
        with TrainCheckpoints(workdir / name) as ckpt:
            if (ckpt.latest_step() or 0) >= step:
                continue
            ckpt.save(step, template, _optimizer(cfg.train).init(template))
        written.append(name)
    return written


def _held_out_probabilities(weights: SliceWeights, case, path: Path):
    """Region probabilities (X, Y, Z, 3), brain mask, reference region masks, voxel size and
    brain-z-scored T1c of a held-out case on its original grid; the probabilities are
    cached in `path` (float16 npz)."""
    t1c = load_image(case.t1c)
    masks, _ = load_tumour_masks(case.labels, case.convention)
    if path.is_file():
        with np.load(path) as stored:
            probs, brain = stored["probs"].astype(np.float32), stored["brain"]
    else:
        brain = load_image(case.brain_mask, kind="mask").data if case.brain_mask else None
        probs, _, brain = weights.probabilities(t1c.data, load_image(case.flair).data, t1c.spacing, brain,
                                                tta=weights.config.tta)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path.with_suffix(".tmp.npz"), probs=probs.astype(np.float16), brain=brain)
        path.with_suffix(".tmp.npz").replace(path)
    return probs, brain, masks_to_regions(masks) > 0.5, t1c.spacing, robust_normalise(t1c.data, brain)


def _cross_validate(cfg: SliceSegConfig, found, fold_params: dict, steps: dict, ensemble_def, workdir: Path, log):
    """Score every held-out case with its fold's models (the mean of their probabilities
    over the views) under each post-processing candidate (Dice), choose the best by mean
    Dice, then score that choice with HD95 too. Returns (rows of the chosen
    post-processing, {candidate label: mean Dice per region}, the choice, the nested
    estimate (`nested_estimate`)). `fold_params`, `steps`: per (view, fold)."""
    t = cfg.train
    candidates = postprocessing_candidates(t)
    tta = "_tta" if cfg.model.tta else ""
    one_member = {(view, fold): SliceWeights(ensemble_def, _stack([params]),
                                             dataclasses.replace(cfg.model, views=(view,), members=1), cfg.version)
                  for (view, fold), params in fold_params.items()}
    cases = []
    for fold in range(t.folds):
        for i, case in enumerate(found):
            if fold_of(i, t.folds) != fold:
                continue
            per_view = [_held_out_probabilities(one_member[view, fold], case, workdir / "cv_probs" / cv_probs_name(
                i, view, fold, steps[view, fold], tta)) for view in cfg.model.views]
            probs = np.mean([p[0] for p in per_view], axis=0)
            cases.append((case, fold, (probs, *per_view[0][1:])))
            log(f"held-out probabilities: {case.name} (fold {fold})")
    dice_rows = {c: [] for c in candidates}
    for case, fold, (probs, brain, ref, spacing, t1c_z) in cases:
        for candidate, row in candidate_dice(probs, brain, ref, spacing, t1c_z, candidates).items():
            dice_rows[candidate].append(row)
    choice = choose_postprocessing(dice_rows)
    nested = nested_estimate(dice_rows, [fold for _, fold, _ in cases])
    rows = []
    for case, fold, (probs, brain, ref, spacing, t1c_z) in cases:
        got = postprocessed_regions(probs, brain, spacing, t1c_z, choice)
        rows.append({"case": case.name, **score_regions(got, ref, spacing), "fold": fold})
        log(json.dumps(rows[-1]))
    tuning = {c.label(): {region: float(np.mean([row[f"dice_{region}"] for row in dice_rows[c]]))
                          for region in REGIONS}
              for c in candidates}
    return rows, tuning, choice, nested


def _stack(params_list):
    return jax.tree.map(lambda *a: jnp.stack(a), *params_list)


def train_slices(cfg: SliceSegConfig, workdir, log=print, folds: list[int] | None = None,
                 views: list[str] | None = None, final: bool = False) -> dict:
    """Train the k fold models of every view, cross-validate, then (`train.final_steps`)
    train one model per view on every case; export `workdir/weights` (the final models, or
    the fold models without them) and `workdir/fold_weights` (the fold models, for warm
    starts), both with float16 parameters; returns the summary.

    `folds`, `views`: train only these folds / views (each model with its share of
    `max_seconds`) and stop before cross-validation, so that they can train in parallel
    processes on one workdir; `final`: train only the final models (of `views`), from the
    fold-0 checkpoints. A later call without any of them resumes every checkpoint,
    cross-validates and exports. Returns {"trained_folds", "trained_views", "steps"} then."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t = cfg.train
    root = resolve_data_root(t.data_root)
    if root is None:
        raise FileNotFoundError("no data root: set train.data_root or RTJAX_DATA")
    if final and not t.final_steps:
        raise ValueError("final models need train.final_steps > 0")
    found = find_labelled_cases(root)
    if len(found) < t.folds:
        raise ValueError(f"{len(found)} labelled cases under {root}: fewer than {t.folds} folds")
    chosen = sorted(set(folds)) if folds else list(range(t.folds))
    unknown = [f for f in chosen if f not in range(t.folds)]
    if unknown:
        raise ValueError(f"fold {unknown[0]} does not exist: train.folds is {t.folds} (folds 0-{t.folds - 1})")
    chosen_views = [v for v in cfg.model.views if not views or v in views]
    unknown = [v for v in views or () if v not in cfg.model.views]
    if unknown:
        raise ValueError(f"view {unknown[0]!r} is not in model.views {list(cfg.model.views)}")
    cache = Path(t.cache_dir) if t.cache_dir else workdir / "cache"
    log(f"{len(found)} labelled cases under {root}; caching on the {cfg.model.spacing} mm grid")
    prepared = [cached_case(c, cfg.model.spacing, cache) for c in found]
    models = (t.folds + (1 if t.final_steps else 0)) * len(cfg.model.views)
    seconds = None if t.max_seconds is None else t.max_seconds / models
    step_fn = make_train_step(cfg)[0]  # one compilation serves every fold
    final_step = functools.cache(lambda: make_train_step(cfg, t.final_steps)[0])
    train_final = lambda view: _train_final(view, prepared, cfg, workdir, seconds, final_step(), log)
    if final:
        steps = [train_final(view)[1] for view in chosen_views]
        return {"trained_folds": [FINAL], "trained_views": chosen_views, "steps": steps}
    fold_params, steps = {}, {}
    for view in chosen_views:
        slices = [_train_view(p, cfg, view) for p in prepared]
        for fold in chosen:
            train = [v for i, v in enumerate(slices) if fold_of(i, t.folds) != fold]
            fold_params[view, fold], steps[view, fold] = _train_fold(fold, train, cfg, workdir, seconds, step_fn, log,
                                                                     view)
    if folds or views:
        log(f"trained fold(s) {chosen} of view(s) {chosen_views}; run again without --fold/--view to "
            "cross-validate and export")
        return {"trained_folds": chosen, "trained_views": chosen_views, "steps": list(steps.values())}
    ensemble_def = nnx.split(nnx.eval_shape(lambda: make_ensemble(cfg.model, t.folds)))[0]
    rows, tuning, choice, nested = _cross_validate(cfg, found, fold_params, steps, ensemble_def, workdir, log)
    log(f"post-processing chosen on the held-out cases: {choice.label()}")
    summary = {"folds": t.folds, "views": list(cfg.model.views), "steps": list(steps.values()), "cases": rows,
               "mean": {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k not in ("case", "fold")},
               "postprocessing": {**choice._asdict(), "mean_dice": tuning, "nested_mean_dice": nested}}
    write_json_atomic(workdir / "cv.json", summary)
    config = to_dict(cfg)
    config["model"].update(members=len(fold_params), **choice._asdict())
    card = model_card(cfg, summary, [c.name for c in found])
    fold_ensemble = nnx.merge(ensemble_def, _stack(list(fold_params.values())))
    if not t.final_steps:
        summary["weights"] = str(save_weights(workdir / "weights", fold_ensemble, config, summary, model_card=card,
                                              dtype=WEIGHTS_DTYPE))
        return summary
    save_weights(workdir / "fold_weights", fold_ensemble, config, summary, model_card=card, dtype=WEIGHTS_DTYPE)
    finals = [train_final(view) for view in cfg.model.views]
    summary["final_steps"] = [step for _, step in finals]
    config["model"]["members"] = len(finals)
    final_def = nnx.split(nnx.eval_shape(lambda: make_ensemble(cfg.model, len(finals))))[0]
    summary["weights"] = str(save_weights(workdir / "weights", nnx.merge(final_def, _stack([p for p, _ in finals])),
                                          config, summary, model_card=model_card(cfg, summary, [c.name for c in found]),
                                          dtype=WEIGHTS_DTYPE))
    return summary


def _train_final(view: str, prepared, cfg: SliceSegConfig, workdir: Path, seconds, step_fn, log):
    """The model of `view` trained on every case for `train.final_steps` (`step_fn` on that
    schedule), warm-started from the view's fold-0 checkpoint. Returns (params, step)."""
    t = cfg.train
    fold0 = workdir / member_name(view, 0)

    def init():
        with TrainCheckpoints(fold0) as ckpt:
            step = ckpt.latest_step()
            if not step:
                raise FileNotFoundError(f"{fold0}: no fold-0 checkpoint of {view} to start its final model from; "
                                        "train the folds first")
            params = nnx.split(UNet(cfg.model.unet, rngs=nnx.Rngs(0)))[1]
            params, _ = ckpt.restore(step, params, _optimizer(t).init(params))
        return params, f"{fold0} (step {step})"

    return _train_fold(FINAL, [_train_view(p, cfg, view) for p in prepared], cfg, workdir, seconds, step_fn, log,
                       view, init=init, steps=t.final_steps)


def model_card(cfg: SliceSegConfig, summary: dict, cases: list[str]) -> str:
    """MODEL_CARD.md of exported 2.5-D weights: architecture, training, the post-processing
    chosen, the cross-validation table (`cv_table`) and the limits."""
    m, t, pp = cfg.model, cfg.train, summary["postprocessing"]
    sources = Counter(name.split("/")[0] for name in cases)
    mean = summary["mean"]
    pasted = f", {t.copy_paste:.0%} with a tumour pasted in from another case" if t.copy_paste else ""
    looks = "".join([f", a lower-resolution look ({t.blur:.0%} of the crops)" if t.blur else "",
                     f", random intensity curves ({t.contrast:.0%})" if t.contrast else ""])
    views = " + ".join(m.views)
    finals = summary.get("final_steps")
    if finals:
        members = f"{len(m.views)} (one per view)" if len(m.views) > 1 else "1"
    else:
        members = f"{t.folds}" if len(m.views) == 1 else f"{t.folds * len(m.views)} ({t.folds} folds x {len(m.views)} views)"
    targets = ("; soft targets (the share of each working voxel in each region)" if t.soft_targets else "")
    if finals:
        shipped = (f"The members are {'one model per view' if len(m.views) > 1 else 'one model'} trained on all "
                   f"{len(cases)} cases ({'/'.join(str(s) for s in finals)} steps, warm-started from the fold-0 "
                   f"model{'s' if len(m.views) > 1 else ''}); the cross-validation below estimates them (its fold "
                   f"models saw {1 - 1 / t.folds:.0%} of the cases), and the fold models are in the training "
                   "run's `fold_weights/`.")
    else:
        shipped = f"The members are the fold models{' of every view' if len(m.views) > 1 else ''}."
    grid = candidate_grid(t)
    more_choices = "".join(f" x {name} {values}" for name, values in list(grid.items())[2:] if len(values) > 1)
    threshold_rule = (f"; tumour core thresholded at {pp.get('core_threshold', 0.5):g} and enhancing tumour at "
                      f"{pp.get('enhancing_threshold', 0.5):g}"
                      if (pp.get("core_threshold", 0.5), pp.get("enhancing_threshold", 0.5)) != (0.5, 0.5) else "")
    nested = pp.get("nested_mean_dice")
    nested_text = (f" Scored with the post-processing chosen on the other folds instead (nested), the mean Dice is WT "
                   f"{nested['WT']:.3f}, TC {nested['TC']:.3f}, ET {nested['ET']:.3f}." if nested else "")
    refine_rule = (", the enhancing boundary refined on the case's own T1c (`rtjax.seg.model.refine_enhancing`"
                   f"{', weighed against its necrosis and its edema' if pp.get('refine_against_edema') else ''})"
                   if pp.get("refine_enhancing") else "")
    et_rule = (f"an enhancing region below {pp['min_enhancing_ml']:g} mL in all made necrosis"
               if pp["min_enhancing_ml"] > 0 else "enhancing regions kept whatever their size "
               "(the size rule did not raise the held-out Dice)")
    chosen_among = sum(len(values) > 1 for values in grid.values())
    steps = summary["steps"]
    steps_text = (f"{steps[0]} steps per fold model" if len(set(steps)) == 1
                  else f"{'/'.join(str(s) for s in steps)} steps")
    targets_text = ", ".join(f"{r} {target:.2f}" for r, target in DICE_TARGETS.items())
    short = [f"{r} {mean[f'dice_{r}']:.3f} < {target:.2f}" for r, target in DICE_TARGETS.items()
             if mean[f"dice_{r}"] < target]
    accuracy = (f"Below the BraTS-level mean Dice targets on {', '.join(short)}" if short
                else f"At the BraTS-level mean Dice targets ({targets_text}) on these {len(cases)} cases")
    return f"""# Segmentation model `{cfg.version}` (rtjax.seg)

**What it is.** An ensemble of {members} 2-D U-Nets (`rtjax.seg.model.UNet`, `spatial_dims: 2`,
widths {list(m.unet.widths)}, {m.unet.norm} norm) on {views} slices at {m.spacing:g} mm with
{m.context} neighbouring slices on each side as channels (T1c + FLAIR, {m.unet.in_channels}
channels), predicting the nested regions WT, TC, ET (sigmoids); members averaged and
thresholded at 0.5{' (the whole tumour; the other thresholds below)' if threshold_rule else ''}. Post-processing, chosen by held-out Dice among
keep_fraction {grid['keep_fraction']} x min_enhancing_ml {grid['min_enhancing_ml']}{more_choices}:
whole-tumour components below {pp['keep_fraction']:g} of the largest dropped{refine_rule}, {et_rule}{threshold_rule}.
Config: `config.yaml` (`architecture: slices`).

**Training.** `rtjax train-seg configs/seg_slices.yaml --workdir runs/seg_slices` on a 2-core
CPU: one model per fold (and view) of a {t.folds}-fold split by patient of the {len(cases)} real labelled
cases ({", ".join(f"{k} {v}" for k, v in sources.items())}), trained on the other folds only;
{steps_text} of {t.batch} random {t.crop} x {t.crop} slice
crops ({t.tumour_fraction:.0%} through the tumour{pasted}); BCE + soft Dice; rotation/scaling, flips,
bias field, intensity scale/shift, gamma, noise{looks}{targets}. {shipped}

**Cross-validation** (each case scored by the fold model{"s" if len(m.views) > 1 else ""} that never saw it, on its original
grid; Dice, HD95 in mm; TCGA-FG-6692 against the algorithm fusion): mean Dice WT
{mean['dice_WT']:.3f}, TC {mean['dice_TC']:.3f}, ET {mean['dice_ET']:.3f}. The post-processing was
chosen on these same held-out cases ({chosen_among} parameters), a small optimism.{nested_text}

{cv_table(summary)}

**Limits.** {accuracy}; stray
false-positive components far from the tumour on some cases; small enhancing regions
missed. Trained on {len(cases)} skull-stripped pre-operative cases in BraTS space: other
preprocessing, post-operative scans and other tumour types are untested. Check the masks
(`python -m rtjax.seg.figure`) before using them for a fit; give `rtjax run` an expert
`seg` when you have one.
"""



def cv_table(summary: dict) -> str:
    """Markdown table of a `train_slices` summary: Dice and HD95 (mm) per held-out case, mean."""
    head = "| case | fold | " + " | ".join(f"Dice {r}" for r in REGIONS) + " | " + \
        " | ".join(f"HD95 {r}" for r in REGIONS) + " |"
    lines = [head, "|" + "---|" * (2 + 2 * len(REGIONS))]

    def cells(row):
        return " | ".join([f"{row[f'dice_{r}']:.3f}" for r in REGIONS] + [f"{row[f'hd95_{r}']:.1f}" for r in REGIONS])

    for row in summary["cases"]:
        lines.append(f"| {row['case']} | {row['fold']} | {cells(row)} |")
    lines.append(f"| **mean** | | {cells(summary['mean'])} |")
    return "\n".join(lines)
