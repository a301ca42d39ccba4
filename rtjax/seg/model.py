"""The segmentation network: a 3-D or 2-D (2.5-D) U-Net in Flax NNX, T1c + FLAIR -> WT / TC / ET.

Conventions
-----------
* Arrays are channels-last: images (batch, X, Y, Z, 2) with channels (T1c, FLAIR), each
  z-scored inside the brain (`normalise`) and 0 outside it.
* The network outputs three region logits per voxel, channels (WT, TC, ET): whole tumour
  (necrosis + enhancing + edema), tumour core (necrosis + enhancing), enhancing tumour.
  Their sigmoids are probabilities; `probs_to_masks` nests them (ET in TC in WT) and
  turns them into the disjoint necrosis / enhancing / edema masks of `rtjax.labels`.
* An ensemble is `members` independently initialised U-Nets stacked on a leading axis
  (`rtjax.ml.create_ensemble`); with flip test-time augmentation the
  spread of the region probabilities over members and flips is the uncertainty map.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np
from flax import nnx
from scipy import ndimage

from rtjax.anatomy import foreground
from rtjax.labels import TumourMasks
from rtjax.ml import count_params
from rtjax.ml import create_ensemble as _stack
from rtjax.ml import ensemble_apply as ensemble_logits  # (members, b, X, Y, Z, 3)

__all__ = [
    "REGIONS",
    "CHANNELS",
    "UNetConfig",
    "UNet",
    "create_ensemble",
    "ensemble_logits",
    "count_params",
    "zscore",
    "brain_mask_from_images",
    "normalise",
    "nest_regions",
    "probs_to_masks",
    "keep_main_components",
    "main_components",
    "restrict_masks",
    "region_thresholds",
    "small_enhancing_to_necrosis",
    "refine_enhancing",
    "masks_to_regions",
]

#: Output channels, in order.
REGIONS = ("WT", "TC", "ET")
#: Input channels, in order.
CHANNELS = ("t1c", "flair")


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of `UNet` (hashable: static under jit).

    Attributes:
        widths: channels per resolution level, finest first; len(widths) levels, so a
            patch side must be divisible by 2^(len(widths) - 1).
        norm: "group" (GroupNorm with `groups` groups) or "instance" (one group per
            channel).
        groups: groups of the group norm (clipped to divide the width).
        deep_supervision: extra 1x1x1 heads on the coarser decoder levels (training only).
        dtype: computation dtype, "float32" or "bfloat16" (parameters stay float32).
        in_channels: input channels (T1c, FLAIR; times the slices of a 2.5-D model).
        out_channels: region logits (WT, TC, ET).
        spatial_dims: 3 (volumes, (b, X, Y, Z, C)) or 2 (slices, (b, X, Y, C)).
    """

    widths: tuple[int, ...] = (8, 16, 32, 64)
    norm: str = "instance"
    groups: int = 8
    deep_supervision: bool = False
    dtype: str = "float32"
    in_channels: int = 2
    out_channels: int = 3
    spatial_dims: int = 3

    def __post_init__(self):
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims!r}")
        if len(self.widths) < 2:
            raise ValueError("a U-Net needs at least two levels (widths)")
        if self.norm not in ("group", "instance"):
            raise ValueError(f"norm must be 'group' or 'instance', got {self.norm!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")

    def kernel(self, side: int) -> tuple[int, ...]:
        """A kernel of `side` voxels along every spatial axis."""
        return (side,) * self.spatial_dims

    @property
    def divisor(self) -> int:
        """Patch sides must be multiples of this."""
        return 2 ** (len(self.widths) - 1)


# --------------------------------------------------------------------------- network


class _ConvNorm(nnx.Module):
    """Conv (3 per axis, optional stride 2) -> group/instance norm -> leaky ReLU."""

    def __init__(self, cin: int, cout: int, cfg: UNetConfig, *, stride: int = 1, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.dtype)
        groups = cout if cfg.norm == "instance" else math.gcd(cfg.groups, cout)
        self.conv = nnx.Conv(cin, cout, cfg.kernel(3), strides=stride, dtype=dtype, rngs=rngs)
        self.norm = nnx.GroupNorm(cout, num_groups=groups, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return nnx.leaky_relu(self.norm(self.conv(x)), 0.01)


class _Level(nnx.Module):
    """Two `_ConvNorm`s; the first may downsample (stride 2)."""

    def __init__(self, cin: int, cout: int, cfg: UNetConfig, *, stride: int, rngs: nnx.Rngs):
        self.a = _ConvNorm(cin, cout, cfg, stride=stride, rngs=rngs)
        self.b = _ConvNorm(cout, cout, cfg, rngs=rngs)

    def __call__(self, x):
        return self.b(self.a(x))


class UNet(nnx.Module):
    """U-Net: (batch, X, Y, Z, in_channels) -> (batch, X, Y, Z, out_channels) logits (or
    (batch, X, Y, C) slices with `spatial_dims` 2).

    Encoder level k > 0 starts with a stride-2 convolution; decoder levels upsample with a
    stride-2 transposed convolution, concatenate the skip and apply two convolutions.
    X, Y, Z must be multiples of `cfg.divisor`.
    """

    def __init__(self, cfg: UNetConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        w = cfg.widths
        dtype = jnp.dtype(cfg.dtype)
        self.encoder = nnx.List([
            _Level(cfg.in_channels if k == 0 else w[k - 1], w[k], cfg, stride=1 if k == 0 else 2, rngs=rngs)
            for k in range(len(w))
        ])
        self.ups = nnx.List([
            nnx.ConvTranspose(w[k + 1], w[k], cfg.kernel(2), strides=2, dtype=dtype, rngs=rngs)
            for k in range(len(w) - 1)
        ])
        self.decoder = nnx.List([_Level(2 * w[k], w[k], cfg, stride=1, rngs=rngs) for k in range(len(w) - 1)])
        self.head = nnx.Conv(w[0], cfg.out_channels, cfg.kernel(1), dtype=dtype, rngs=rngs)
        n_aux = len(w) - 2 if cfg.deep_supervision else 0
        self.aux_heads = nnx.List([
            nnx.Conv(w[k], cfg.out_channels, cfg.kernel(1), dtype=dtype, rngs=rngs) for k in range(1, 1 + n_aux)
        ])

    def features(self, x):
        """Decoder feature maps, finest first: [(b, X, Y, Z, w0), (b, X/2, .., w1), ...]."""
        skips = []
        for level in self.encoder:
            x = level(x)
            skips.append(x)
        outs = []
        x = skips[-1]
        for k in reversed(range(len(self.ups))):
            x = self.decoder[k](jnp.concatenate([self.ups[k](x), skips[k]], axis=-1))
            outs.append(x)
        return outs[::-1]

    def __call__(self, x):
        """Region logits (b, X, Y, Z, 3), float32."""
        return self.head(self.features(x)[0]).astype(jnp.float32)

    def deep_logits(self, x) -> list:
        """Main logits followed by the deep-supervision logits (each level halves X, Y, Z)."""
        feats = self.features(x)
        out = [self.head(feats[0])]
        out += [head(f) for head, f in zip(self.aux_heads, feats[1:])]
        return [o.astype(jnp.float32) for o in out]


def create_ensemble(cfg: UNetConfig, members: int, seed: int = 0) -> UNet:
    """`members` independently initialised U-Nets stacked on a leading axis."""
    return _stack(lambda rngs: UNet(cfg, rngs=rngs), members, seed)


# --------------------------------------------------------------------------- inputs


def zscore(image, mask, *, clip: float = 5.0):
    """Z-score of `image` over the voxels of `mask` (weights in [0, 1]), 0 outside the mask,
    clipped to [-clip, clip]. numpy in, numpy out; JAX in (e.g. under jit), JAX out."""
    xp = np if isinstance(image, np.ndarray) and isinstance(mask, np.ndarray) else jnp
    image = xp.asarray(image, xp.float32)
    w = xp.asarray(mask, xp.float32)
    n = xp.maximum(w.sum(dtype=xp.float32), 1.0)
    mean = (w * image).sum(dtype=xp.float32) / n
    std = xp.sqrt((w * (image - mean) ** 2).sum(dtype=xp.float32) / n)
    out = (image - mean) / xp.maximum(std, 1e-6)
    return xp.where(w > 0.5, xp.clip(out, -clip, clip), 0.0).astype(xp.float32)


def brain_mask_from_images(*images: np.ndarray) -> np.ndarray:
    """Brain voxels of skull-stripped images: the `rtjax.anatomy.foreground` (voxels that
    differ from the background value: 0 for raw images, the brain-z-scored minimum for
    pre-normalised ones such as BRATS 2015 `*_subtrMeanDivStd`) of any of them (boolean,
    same shape)."""

    return np.any([foreground(np.asarray(a)) for a in images], axis=0)


def normalise(t1c, flair, brain_mask=None) -> np.ndarray:
    """Network input from raw or pre-normalised T1c and FLAIR (same shape X, Y, Z).

    Each modality is z-scored inside the brain (`brain_mask`, or the non-background voxels
    of either image) and set to 0 outside; z-scoring a z-scored image changes nothing, so
    raw-intensity and pre-normalised inputs give the same result up to an affine map of
    intensities. Returns float32 (X, Y, Z, 2).
    """
    t1c, flair = np.asarray(t1c, np.float32), np.asarray(flair, np.float32)
    if t1c.shape != flair.shape:
        raise ValueError(f"t1c and flair shapes differ: {t1c.shape} vs {flair.shape}")
    mask = brain_mask_from_images(t1c, flair) if brain_mask is None else np.asarray(brain_mask, bool)
    return np.stack([zscore(t1c, mask), zscore(flair, mask)], axis=-1)


# --------------------------------------------------------------------------- outputs


def region_thresholds(threshold) -> tuple[float, float, float]:
    """(WT, TC, ET) probability thresholds from one for all regions or a (WT, TC, ET) triple."""
    t_wt, t_tc, t_et = np.broadcast_to(np.asarray(threshold, np.float64), (3,)).tolist()
    return t_wt, t_tc, t_et


def nest_regions(probs, threshold=0.5):
    """Boolean (…, 3) WT/TC/ET from region probabilities with ET in TC in WT enforced;
    `threshold`: one for all regions or (WT, TC, ET)."""
    t_wt, t_tc, t_et = region_thresholds(threshold)
    wt = probs[..., 0] >= t_wt
    tc = wt & (probs[..., 1] >= t_tc)
    et = tc & (probs[..., 2] >= t_et)
    return np.stack([np.asarray(wt), np.asarray(tc), np.asarray(et)], axis=-1)


def probs_to_masks(probs, threshold=0.5) -> TumourMasks:
    """Disjoint tumour masks from region probabilities (X, Y, Z, 3): enhancing = ET,
    necrosis = TC and not ET, edema = WT and not TC (`threshold`: as `nest_regions`)."""
    regions = nest_regions(np.asarray(probs), threshold)
    wt, tc, et = regions[..., 0], regions[..., 1], regions[..., 2]
    return TumourMasks(necrosis=tc & ~et, enhancing=et, edema=wt & ~tc)


def masks_to_regions(masks: TumourMasks) -> np.ndarray:
    """Region targets (X, Y, Z, 3) float32 in {0, 1}: WT, TC, ET."""
    return np.stack([masks.whole, masks.core, masks.enhancing], axis=-1).astype(np.float32)


def keep_main_components(masks: TumourMasks, min_fraction: float = 0.2) -> TumourMasks:
    """Drop small stray whole-tumour components: keep the largest connected component of
    WT (26-connectivity) and every other one of at least `min_fraction` of its size;
    necrosis/enhancing/edema outside them become background."""

    return restrict_masks(masks, main_components(masks.whole, min_fraction))


def main_components(whole: np.ndarray, min_fraction: float) -> np.ndarray:
    """The boolean whole-tumour mask `whole` without its small stray parts: the largest
    26-connected component and every other one of at least `min_fraction` of its size."""
    if not whole.any():
        return whole
    labels, _ = ndimage.label(whole, structure=np.ones((3, 3, 3), bool))
    sizes = np.bincount(labels.ravel())[1:]
    return np.isin(labels, np.flatnonzero(sizes >= min_fraction * sizes.max()) + 1)


def restrict_masks(masks: TumourMasks, inside: np.ndarray) -> TumourMasks:
    """`masks` with every class emptied outside the boolean `inside`."""
    return TumourMasks(necrosis=masks.necrosis & inside, enhancing=masks.enhancing & inside,
                       edema=masks.edema & inside)


def _logit(p):
    return np.log(p) - np.log1p(-p)


def _gaussian_log_likelihood(values: np.ndarray, sample: np.ndarray) -> np.ndarray:
    """Log-likelihood (up to a constant) of `values` under the normal fitted to `sample`."""
    mean, std = float(sample.mean()), float(sample.std()) + 1e-3
    return -0.5 * ((values - mean) / std) ** 2 - np.log(std)


def refine_enhancing(masks: TumourMasks, enhancing_prob: np.ndarray, t1c_z: np.ndarray,
                     min_voxels: int = 50, threshold: float = 0.5, against_edema: bool = False) -> TumourMasks:
    """The enhancing / necrosis boundary inside the core at the resolution of `t1c_z` (the
    brain-z-scored T1c on the masks' grid; the network works at 2 mm): a core voxel is
    enhancing when the network's log-odds of ET (`enhancing_prob`) minus those of
    `threshold` (the ET threshold: 0.5 adds nothing) plus the log-likelihood ratio of its
    T1c under two normals fitted to this case's own predicted enhancing and necrotic voxels
    is positive. `against_edema`: the non-enhancing side of that ratio is the likelier of
    the necrosis normal and a third normal fitted to the case's predicted edema (when it
    has `min_voxels`), so a core voxel is enhancing only where its T1c looks more like the
    enhancing tumour than like either (a dark necrotic core alone would call anything
    brighter than it enhancing). The core and the edema are unchanged; cases with fewer
    than `min_voxels` voxels in the enhancing or the necrotic class are left as they are."""
    core, enhancing = masks.core, masks.enhancing
    necrosis = core & ~enhancing
    if enhancing.sum() < min_voxels or necrosis.sum() < min_voxels:
        return masks
    t = np.asarray(t1c_z, np.float32)[core]
    p = np.clip(np.asarray(enhancing_prob, np.float32)[core], 1e-4, 1 - 1e-4)
    not_enhancing = _gaussian_log_likelihood(t, t1c_z[necrosis])
    if against_edema and masks.edema.sum() >= min_voxels:
        not_enhancing = np.maximum(not_enhancing, _gaussian_log_likelihood(t, t1c_z[masks.edema]))
    ratio = _gaussian_log_likelihood(t, t1c_z[enhancing]) - not_enhancing
    refined = np.zeros_like(core)
    refined[core] = _logit(p) - _logit(threshold) + ratio > 0
    return TumourMasks(necrosis=core & ~refined, enhancing=refined, edema=masks.edema)


def small_enhancing_to_necrosis(masks: TumourMasks, min_voxels: int) -> TumourMasks:
    """BraTS post-processing: a predicted enhancing region of fewer than `min_voxels` voxels
    in all is more often a false positive than a tiny enhancing tumour; it becomes necrosis
    (the core is kept, ET emptied)."""

    if min_voxels <= 0 or masks.enhancing.sum() >= min_voxels:
        return masks
    return TumourMasks(necrosis=masks.necrosis | masks.enhancing, enhancing=np.zeros_like(masks.enhancing),
                       edema=masks.edema)
