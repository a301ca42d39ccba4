"""Synthetic training patients: FK tumours in the MNI152 atlas, rendered as T1c and FLAIR.

Two parts:

1. **The tumour bank** (`build_bank`): tumours grown with the project's Fisher-Kolmogorov
   solver by `growth.inverse`'s generator (`iterate_simulations`: random origins in WM/GM,
   random Dw, rho, T, anatomy flips/rotations, vmapped batches), each a crop of density,
   WM, GM and brain mask around the visible tumour (`n^3` voxels of `h` mm). Built once
   (minutes on a CPU, seconds on a GPU) and kept on the device.
2. **The renderer** (pure JAX, jit/vmap-able; one call per training sample and step):
   a random view of a bank tumour (rotation, scale, flips, elastic displacement, shift)
   sampled on the training patch, thresholds drawn per sample (necrosis where the
   density saturates, c >= u_nec; enhancing rim u_t1 <= c < u_nec; edema
   u_fl <= c < u_t1), tissue and tumour classes painted with random contrasts (SynthSeg
   spirit, with the orderings that make the classes identifiable: enhancing bright and
   necrosis dark on T1c, edema bright on FLAIR), then a bias field, tumour texture, blur
   with a random resolution (one axis thicker), noise and gamma; z-scored in the brain.

`render_case` is the deterministic form for a whole case (the demo's synthetic patient):
arrays + spacing + seed in, raw-like (t1c, flair) arrays out.

Units: mm; densities in [0, 1]; intensities relative to white matter (= 1 before the
bias field; `render_case` scales them by `scale`).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from growth.imaging import visible_masks
from growth.inverse import anatomy_box, crop_around, iterate_simulations
from rtjax.atlas import atlas_arrays as load_atlas
from rtjax.labels import TumourMasks
from rtjax.provenance import atomic_write
from rtjax.seg.model import zscore

__all__ = [
    "CLASSES",
    "DEFAULT_THRESHOLDS",
    "RenderConfig",
    "blur_axis",
    "brain_from_tissue",
    "build_bank",
    "save_bank",
    "load_bank",
    "tumour_classes",
    "paint",
    "render_sample",
    "render_case",
    "case_masks",
    "phantom_case",
]

#: Painted classes, in the order of the contrast tables.
CLASSES = ("csf", "gm", "wm", "edema", "enhancing", "necrosis")

_T1C = {"csf": (0.2, 0.5), "gm": (0.65, 0.85), "wm": (1.0, 1.0), "edema": (0.6, 0.9),
        "enhancing": (1.35, 2.2), "necrosis": (0.2, 0.55)}
_FLAIR = {"csf": (0.15, 0.5), "gm": (1.05, 1.3), "wm": (1.0, 1.0), "edema": (1.45, 2.3),
          "enhancing": (1.15, 1.9), "necrosis": (0.5, 1.5)}


def _pair(v) -> tuple[float, float]:
    lo, hi = (float(x) for x in v)
    if lo > hi:
        raise ValueError(f"range must be (low, high) with low <= high, got {v}")
    return lo, hi


@dataclass(frozen=True)
class RenderConfig:
    """How a training sample is drawn from a bank tumour (hashable: static under jit).

    Attributes:
        patch: voxels per axis of the training patch.
        spacing: patch voxel size, mm (the network's working resolution).
        u_fl, u_t1, u_nec: threshold ranges (uniform): edema u_fl <= c < u_t1, enhancing
            u_t1 <= c < u_nec, necrosis c >= u_nec (u_nec > 1: no necrosis).
        soft_width: density width of the soft class boundaries used for painting.
        rotation_deg: maximum rotation angle (random axis), degrees.
        scale: isotropic scale range of the view.
        elastic_mm: amplitude of the smooth random displacement, mm.
        shift_mm: maximum shift of the patch centre from the tumour's centre, mm per axis.
        bias: log-amplitude of the smooth multiplicative bias field.
        texture: amplitude of the multiplicative tumour texture.
        noise: range of the Gaussian noise standard deviation (white matter = 1).
        blur_vox: range of the in-plane Gaussian blur sigma, patch voxels.
        slice_blur_vox: range of the blur sigma along one random axis (thick slices).
        gamma: standard deviation of log(gamma) of the intensity gamma.
        t1c, flair: per-class mean intensity ranges (white matter = 1), keys `CLASSES`.
    """

    patch: int = 48
    spacing: float = 2.0
    u_fl: tuple[float, float] = (0.05, 0.35)
    u_t1: tuple[float, float] = (0.45, 0.8)
    u_nec: tuple[float, float] = (0.9, 1.02)
    soft_width: float = 0.02
    rotation_deg: float = 15.0
    scale: tuple[float, float] = (0.85, 1.15)
    elastic_mm: float = 3.0
    shift_mm: float = 12.0
    bias: float = 0.3
    texture: float = 0.15
    noise: tuple[float, float] = (0.0, 0.06)
    blur_vox: tuple[float, float] = (0.0, 0.8)
    slice_blur_vox: tuple[float, float] = (0.0, 1.5)
    gamma: float = 0.15
    t1c: dict = field(default_factory=lambda: dict(_T1C))
    flair: dict = field(default_factory=lambda: dict(_FLAIR))

    def __post_init__(self):
        for name in ("u_fl", "u_t1", "u_nec", "scale", "noise", "blur_vox", "slice_blur_vox"):
            object.__setattr__(self, name, _pair(getattr(self, name)))
        for name in ("t1c", "flair"):
            table = {**(_T1C if name == "t1c" else _FLAIR), **dict(getattr(self, name))}
            if set(table) != set(CLASSES):
                raise ValueError(f"{name}: contrast keys must be {CLASSES}")
            # a tuple of pairs: hashable, so the config stays static under jit
            object.__setattr__(self, name, tuple((k, _pair(table[k])) for k in CLASSES))
        if self.u_fl[1] > self.u_t1[0] or self.u_t1[1] > self.u_nec[0]:
            raise ValueError("threshold ranges must be ordered: u_fl < u_t1 < u_nec")

    def contrast(self, modality: str) -> np.ndarray:
        """(len(CLASSES), 2) low/high mean intensity per class."""
        return np.asarray([v for _, v in getattr(self, modality)], np.float32)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        for name in ("t1c", "flair"):
            out[name] = {k: list(v) for k, v in getattr(self, name)}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


# --------------------------------------------------------------------------- bank


def brain_from_tissue(wm, gm, *, threshold: float = 0.2, closing_vox: int = 3) -> np.ndarray:
    """A brain mask (bool) from tissue probabilities: wm + gm >= threshold, closed and
    hole-filled (ventricles and sulci become brain, as in a skull-stripped image)."""

    mask = (np.asarray(wm) + np.asarray(gm)) >= threshold
    mask = ndimage.binary_closing(mask, iterations=closing_vox, border_value=0)
    return ndimage.binary_fill_holes(mask)


def _crop_brain_fn(gen):

    def one(atlas_brain, zeros, spacing, origin, transform, com_box_mm):
        box, _ = anatomy_box(gen, atlas_brain, zeros, spacing, origin, transform)
        return crop_around(box, com_box_mm / gen.sim_spacing, gen.sim_spacing, gen.net_shape, gen.net_spacing)

    return jax.jit(jax.vmap(one, in_axes=(None, None, None, 0, 0, 0)))


def build_bank(
    gen,
    n_cases: int,
    *,
    seed: int,
    atlas=None,
    sim_batch: int = 16,
    max_seconds: float | None = None,
    min_cases: int = 1,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Simulate a bank of tumours with `growth.inverse.iterate_simulations`.

    Args:
        gen: a `growth.inverse.GeneratorConfig` (simulation box, crop grid, parameters).
        n_cases: tumours wanted.
        seed: seed of the simulation stream (same seed, same bank).
        atlas: (wm, gm, spacing) or None for the built-in MNI152 atlas.
        sim_batch: simulations per vmapped batch.
        max_seconds: stop early (with at least `min_cases`) when this wall time is spent.

    Returns:
        density (N, n, n, n) float16; wm, gm, brain (N, n, n, n) uint8 (1/255 units);
        spacing () float32 (mm, = gen.net_spacing); the drawn parameters (dw, rho,
        t_days, ...) per case.
    """

    if atlas is None:

        atlas = load_atlas()
    atlas_wm, atlas_gm, atlas_spacing = atlas
    atlas_brain = brain_from_tissue(atlas_wm, atlas_gm).astype(np.float32)
    crop_brain = _crop_brain_fn(gen)
    brain_j, zeros_j = jnp.asarray(atlas_brain), jnp.zeros_like(jnp.asarray(atlas_brain))
    spacing_j = jnp.asarray(atlas_spacing, jnp.float32)
    start = time.perf_counter()
    parts, have = [], 0
    stream = iterate_simulations(gen, atlas_wm, atlas_gm, atlas_spacing, seed=seed, batch_size=sim_batch)
    while have < n_cases:
        batch = next(stream)
        brain = crop_brain(brain_j, zeros_j, spacing_j, jnp.asarray(batch["origin_atlas_mm"]),
                           jnp.asarray(batch["transform"]), jnp.asarray(batch["com_box_mm"]))
        parts.append({
            "density": batch["density"].astype(np.float16),
            **{k: np.round(np.clip(v, 0, 1) * 255).astype(np.uint8)
               for k, v in (("wm", batch["wm"]), ("gm", batch["gm"]), ("brain", np.asarray(brain)))},
            **{k: batch[k].astype(np.float32) for k in ("dw", "rho", "t_days", "u_t1", "u_fl")},
        })
        have += len(batch["dw"])
        elapsed = time.perf_counter() - start
        if progress:
            print(f"[bank] {min(have, n_cases)}/{n_cases} tumours ({elapsed:.0f} s)", flush=True)
        if max_seconds is not None and elapsed > max_seconds and have >= min_cases:
            break
    bank = {k: np.concatenate([p[k] for p in parts])[:n_cases] for k in parts[0]}
    bank["spacing"] = np.float32(gen.net_spacing)
    return bank


def save_bank(bank: dict, path) -> None:
    """Write a bank as an npz file (atomically)."""

    atomic_write(path, lambda tmp: np.savez(tmp, **bank), suffix=".npz")


def load_bank(path) -> dict[str, np.ndarray]:
    """Read a bank written by `save_bank`."""
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


# --------------------------------------------------------------------------- painting


def tumour_classes(density, u_fl, u_t1, u_nec):
    """Hard (necrosis, enhancing, edema) masks of a density for the given thresholds: the
    imaging model's `growth.imaging.visible_masks` with the core split at u_nec."""
    core, ede = visible_masks(density, u_t1, u_fl)
    nec = density >= u_nec
    return nec, core & ~nec, ede


def _smooth_field(key, shape, n_ctrl: int = 4):
    """A smooth random field of `shape`, ~N(0, 1) at n_ctrl^3 control points, trilinear."""
    ctrl = jax.random.normal(key, (n_ctrl,) * 3)
    return jax.image.resize(ctrl, shape, "linear")


def blur_axis(x, sigma, axis: int, radius: int = 4, mode: str = "edge"):
    """Gaussian blur of `x` along `axis` with a traced sigma (voxels), `radius` taps either
    side; `mode`: the padding (`jnp.pad`'s, "edge" or "constant" for zeros)."""
    offsets = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    w = jnp.exp(-0.5 * (offsets / jnp.maximum(sigma, 1e-3)) ** 2)
    w = w / w.sum()
    pad = [(0, 0)] * x.ndim
    pad[axis] = (radius, radius)
    # materialise the padded input: otherwise XLA fuses its producer into each of the taps
    # and recomputes it 2 * radius + 1 times per axis (81 times for a 2-axis blur)
    xp = jax.lax.optimization_barrier(jnp.pad(x, pad, mode=mode))
    n = x.shape[axis]
    return sum(w[i] * jax.lax.slice_in_dim(xp, i, i + n, axis=axis) for i in range(2 * radius + 1))


def _blur(x, sigmas):
    for axis in range(3):
        x = blur_axis(x, sigmas[axis], axis)
    return x


def paint(key, density, wm, gm, brain, thresholds, cfg: RenderConfig):
    """Raw-like T1c and FLAIR (white matter ~ 1, 0 outside the brain) of one view.

    Args:
        key: PRNG key (contrasts, bias, texture, blur, noise, gamma).
        density, wm, gm, brain: arrays of one 3-D shape; brain in [0, 1].
        thresholds: (u_fl, u_t1, u_nec).
        cfg: contrast ranges and artefact strengths.

    Returns:
        (t1c, flair), each of the input shape, float32.
    """
    u_fl, u_t1, u_nec = thresholds
    keys = jax.random.split(key, 10)
    shape = density.shape
    inside = brain >= 0.5
    wm = jnp.clip(wm, 0.0, 1.0)
    gm = jnp.clip(gm, 0.0, 1.0 - wm)
    csf = jnp.clip(brain - wm - gm, 0.0, 1.0)
    s = lambda u: jax.nn.sigmoid((density - u) / cfg.soft_width)  # noqa: E731
    m_ed, m_t1, m_nec = s(u_fl), s(u_t1), s(u_nec)
    texture = 1.0 + cfg.texture * _smooth_field(keys[0], shape, 8)
    out = []
    for k, modality in enumerate(("t1c", "flair")):
        table = jnp.asarray(cfg.contrast(modality))
        mu = jax.random.uniform(keys[1 + k], (len(CLASSES),), minval=table[:, 0], maxval=table[:, 1])
        tissue = csf * mu[0] + gm * mu[1] + wm * mu[2]
        rel = tissue / jnp.maximum(csf + gm + wm, 1e-3)
        img = tissue * (1 - m_ed) + m_ed * mu[3] * (0.75 + 0.25 * rel)  # edema keeps some anatomy
        img = img * (1 - m_t1) + m_t1 * mu[4] * texture
        img = img * (1 - m_nec) + m_nec * mu[5] * (2.0 - texture)
        bias = jnp.exp(cfg.bias * _smooth_field(keys[3 + k], shape, 4))
        img = img * bias
        sig = jax.random.uniform(keys[5 + k], (3,), minval=cfg.blur_vox[0], maxval=cfg.blur_vox[1])
        thick = jax.random.uniform(keys[7], (), minval=cfg.slice_blur_vox[0], maxval=cfg.slice_blur_vox[1])
        sig = sig.at[jax.random.randint(keys[8], (), 0, 3)].max(thick)
        img = _blur(img, sig)
        std = jax.random.uniform(keys[9], (), minval=cfg.noise[0], maxval=cfg.noise[1])
        img = img + std * jax.random.normal(jax.random.fold_in(keys[9], k), shape)
        gamma = jnp.exp(cfg.gamma * jax.random.normal(jax.random.fold_in(keys[0], k), ()))
        img = jnp.maximum(img, 0.0) ** gamma
        out.append(jnp.where(inside, img, 0.0).astype(jnp.float32))
    return tuple(out)


# --------------------------------------------------------------------------- training views


def _rotation(key, max_deg):
    """Random rotation matrix by an angle up to max_deg about a random axis (Rodrigues)."""
    k1, k2 = jax.random.split(key)
    axis = jax.random.normal(k1, (3,))
    axis = axis / jnp.maximum(jnp.linalg.norm(axis), 1e-6)
    angle = jnp.deg2rad(jax.random.uniform(k2, (), minval=-max_deg, maxval=max_deg))
    kx = jnp.array([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
    return jnp.eye(3) + jnp.sin(angle) * kx + (1 - jnp.cos(angle)) * (kx @ kx)


def _view_coordinates(key, bank_shape, bank_spacing, cfg: RenderConfig):
    """Bank voxel coordinates (3, P, P, P) of a random view centred near the crop centre."""
    keys = jax.random.split(key, 6)
    p = cfg.patch
    flips = jnp.where(jax.random.bernoulli(keys[0], 0.5, (3,)), -1.0, 1.0)
    scale = jax.random.uniform(keys[1], (), minval=cfg.scale[0], maxval=cfg.scale[1])
    matrix = _rotation(keys[2], cfg.rotation_deg) @ jnp.diag(flips) * scale
    centre = (jnp.asarray(bank_shape, jnp.float32) - 1) / 2 * bank_spacing
    centre = centre + jax.random.uniform(keys[3], (3,), minval=-cfg.shift_mm, maxval=cfg.shift_mm)
    grid = jnp.stack(jnp.meshgrid(*(jnp.arange(p, dtype=jnp.float32),) * 3, indexing="ij"))
    local = (grid - (p - 1) / 2) * cfg.spacing  # (3, P, P, P) mm
    mm = jnp.einsum("ij,j...->i...", matrix, local) + centre[:, None, None, None]
    disp = jnp.stack([_smooth_field(k, (p, p, p), 4) for k in jax.random.split(keys[4], 3)])
    mm = mm + cfg.elastic_mm * disp
    return mm / bank_spacing


def render_sample(key, density, wm, gm, brain, bank_spacing: float, cfg: RenderConfig):
    """One training sample from one bank tumour (pure JAX; vmap over bank items and keys).

    Args:
        key: PRNG key.
        density: (n, n, n) tumour cell density of the bank crop (any float dtype).
        wm, gm, brain: (n, n, n) uint8 (1/255 units) or float probabilities.
        bank_spacing: bank voxel size, mm (static).
        cfg: the view and painting distributions (static).

    Returns:
        x: (P, P, P, 2) float32 network input (T1c, FLAIR z-scored in the brain);
        y: (P, P, P, 3) float32 region targets (WT, TC, ET) in {0, 1}.
    """
    k_view, k_thr, k_paint = jax.random.split(key, 3)
    scale = 255.0 if wm.dtype == jnp.uint8 else 1.0
    vols = [jnp.asarray(v, jnp.float32) / (1.0 if i == 0 else scale)
            for i, v in enumerate((density, wm, gm, brain))]
    coords = _view_coordinates(k_view, density.shape, bank_spacing, cfg)
    sample = lambda v: jax.scipy.ndimage.map_coordinates(v, list(coords), order=1, mode="constant", cval=0.0)  # noqa: E731
    c, w, g, b = (sample(v) for v in vols)
    ks = jax.random.split(k_thr, 3)
    thresholds = tuple(jax.random.uniform(k, (), minval=lo, maxval=hi)
                       for k, (lo, hi) in zip(ks, (cfg.u_fl, cfg.u_t1, cfg.u_nec)))
    t1c, flair = paint(k_paint, c, w, g, b, thresholds, cfg)
    inside = b >= 0.5
    x = jnp.stack([zscore(t1c, inside), zscore(flair, inside)], axis=-1)
    nec, enh, ede = tumour_classes(jnp.where(inside, c, 0.0), *thresholds)
    y = jnp.stack([nec | enh | ede, nec | enh, enh], axis=-1).astype(jnp.float32)
    return x, y


# --------------------------------------------------------------------------- whole cases


#: Default thresholds (u_fl, u_t1, u_nec) of `render_case` and `case_masks`.
DEFAULT_THRESHOLDS = (0.2, 0.6, 0.95)


def case_masks(density, thresholds=DEFAULT_THRESHOLDS) -> TumourMasks:
    """The labels `render_case` paints: necrosis c >= u_nec, enhancing u_t1 <= c < u_nec,
    edema u_fl <= c < u_t1 (numpy, input shape)."""
    nec, enh, ede = tumour_classes(np.asarray(density), *thresholds)
    return TumourMasks(necrosis=nec, enhancing=enh, edema=ede)


def render_case(
    density,
    wm,
    gm,
    spacing,
    seed: int = 0,
    *,
    brain_mask=None,
    thresholds=DEFAULT_THRESHOLDS,
    scale: float = 1000.0,
    config: RenderConfig | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic MR-like T1c and FLAIR of a whole case (no geometric augmentation).

    Args:
        density: (X, Y, Z) tumour cell density in [0, 1].
        wm, gm: (X, Y, Z) tissue probabilities in [0, 1].
        spacing: voxel size, mm (3 values or one); blur and noise are set in voxels of a
            1 mm grid and scaled to this spacing.
        seed: the contrasts, bias field, texture and noise depend only on it.
        brain_mask: (X, Y, Z) bool; default `brain_from_tissue(wm, gm)`.
        thresholds: (u_fl, u_t1, u_nec); `case_masks` gives the matching labels.
        scale: white-matter intensity of the output (raw-like units).
        config: contrast and artefact ranges (default `RenderConfig()`).

    Returns:
        (t1c, flair): float32 arrays of the input shape, >= 0, 0 outside the brain.
    """
    cfg = config or RenderConfig()
    spacing = np.broadcast_to(np.asarray(spacing, np.float64), (3,))
    density, wm, gm = (np.asarray(a, np.float32) for a in (density, wm, gm))
    brain = brain_from_tissue(wm, gm) if brain_mask is None else np.asarray(brain_mask, bool)
    # blur ranges are for 1 mm voxels: a coarser grid is blurred less, in voxels
    blur = tuple(v / float(spacing.mean()) for v in cfg.blur_vox)
    slice_blur = tuple(v / float(spacing.mean()) for v in cfg.slice_blur_vox)
    cfg = dataclasses.replace(cfg, blur_vox=blur, slice_blur_vox=slice_blur)
    t1c, flair = _paint_jit(jax.random.key(int(seed)), jnp.asarray(density), jnp.asarray(wm),
                            jnp.asarray(gm), jnp.asarray(brain, jnp.float32),
                            tuple(float(t) for t in thresholds), cfg)
    return np.asarray(t1c) * scale, np.asarray(flair) * scale


_paint_jit = jax.jit(paint, static_argnums=(6,))


def phantom_case(shape=(32, 32, 32), spacing: float = 2.0, *, tumour_radius_mm: float = 14.0,
                 front_width_mm: float = 2.5, offset_mm=(6.0, -4.0, 2.0)) -> dict[str, np.ndarray]:
    """A small analytic brain with a tumour, for tests and examples (deterministic).

    A spherical brain (grey-matter shell of ~4 mm over white matter, a CSF ellipsoid as
    ventricle) and a tumour density c = 1 / (1 + exp((r - R) / w)) around a point offset
    from the centre, zero outside the tissue. Returns density, wm, gm (float32, `shape`)
    and spacing (3,) mm.
    """
    shape = tuple(int(n) for n in np.broadcast_to(shape, (3,)))
    idx = np.indices(shape, dtype=np.float32)
    centre = (np.asarray(shape, np.float32)[:, None, None, None] - 1) / 2
    mm = (idx - centre) * spacing
    r_brain = 0.45 * min(shape) * spacing
    r = np.sqrt((mm**2).sum(0))
    brain = np.clip(r_brain - r + 0.5, 0.0, 1.0)
    gm = np.clip(r - (r_brain - 4.0), 0.0, 1.0) * brain
    vent = (((mm[0] / 3.0) ** 2 + (mm[1] / 8.0) ** 2 + (mm[2] / 5.0) ** 2) <= 1.0).astype(np.float32)
    wm = np.clip(brain - gm - vent, 0.0, 1.0)
    gm = gm * (1 - vent)
    off = np.asarray(offset_mm, np.float32)[:, None, None, None]
    rt = np.sqrt(((mm - off) ** 2).sum(0))
    density = 1.0 / (1.0 + np.exp((rt - tumour_radius_mm) / front_width_mm))
    density = np.where(wm + gm > 0.05, density, 0.0)
    return {"density": density.astype(np.float32), "wm": wm.astype(np.float32), "gm": gm.astype(np.float32),
            "spacing": np.full(3, spacing, np.float32)}
