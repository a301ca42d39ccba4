"""Training simulations for a learned inverse model (LearnMorph-Infer style).

Pure JAX: arrays in, arrays out, no files, no networks (the network itself lives in
`rtjax.inverse`). Three parts:

1. **Geometry.** `crop_around` resamples a patient's canonical arrays onto the network's
   fixed grid around a centre (trilinear or nearest, `jax.scipy.ndimage.map_coordinates`);
   `resample_affine` is the general form the generator uses for randomised anatomy.
2. **Training data.** `draw_cases` draws anatomy placement, parameters and thresholds on
   the host; `simulate_cases` grows the tumours with `FKSimulator`, `jax.vmap`ped over a
   batch that shares one grid and one step (one compile serves every batch), and crops
   them around the visible tumour; `iterate_simulations` streams accepted cases.
3. **Network inputs.** `masks_to_inputs` and `threshold_inputs` build the network's input
   channels and the visible centre of mass from masks or from a density.

Conventions
-----------
* Arrays are RAS-canonical; "grid mm" of an array is voxel index times spacing.
* The network grid has `net_shape` voxels of `net_spacing` mm per axis; its centre (index
  (n - 1) / 2, between voxels for even n) sits on the crop centre.
* Network input channels, channels-last: core, edema (binary, after resampling: a crop
  voxel is core where the resampled core fraction is >= 0.5 and edema where
  core + edema >= 0.5 but not core), wm, gm (probabilities).
* Targets (`TARGET_NAMES`): the origin in mm relative to the centre of mass of the visible
  tumour (core + edema) on the network grid, in the crop's (= the array's) axes;
  sqrt(Dw T) in mm; sqrt(rho T) (dimensionless); the thresholds u_T1 and u_FL.

Scaled simulation
-----------------
The FK solution depends on Dw, rho and T only through Dw T and rho T (Dg = Dw / ratio).
The generator therefore runs every case at a fixed reference diffusivity `d_ref`
(mm^2 per time unit) for a scaled time Dw T / d_ref with rho' = rho d_ref / Dw: the
number of steps grows with Dw T, and batches are sorted by Dw T so that a vmapped batch
does not wait long for its slowest member.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from growth.anisotropic import AnisotropicFKSimulator
from growth.grid import Grid, stable_time_step
from growth.imaging import visible_masks
from growth.seed import GaussianSeed
from growth.solver import FKParams, FKSimulator
from growth.tensor import rotate_tensor

__all__ = [
    "TARGET_NAMES",
    "SamplingRanges",
    "GeneratorConfig",
    "resample_affine",
    "crop_around",
    "network_grid_offsets",
    "draw_cases",
    "box_affine",
    "anatomy_box",
    "box_centre_mm",
    "simulate_box",
    "observe",
    "simulate_cases",
    "simulate_anisotropic_cases",
    "iterate_simulations",
    "threshold_inputs",
    "masks_to_inputs",
]

#: The network's outputs, in order (before normalisation).
TARGET_NAMES = ("origin_x_mm", "origin_y_mm", "origin_z_mm", "sqrt_dw_t", "sqrt_rho_t", "u_t1", "u_fl")


def _pair(value) -> tuple[float, float]:
    lo, hi = (float(v) for v in value)
    if not lo <= hi:
        raise ValueError(f"range must be (low, high) with low <= high, got {value}")
    return lo, hi


# --------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class SamplingRanges:
    """What the generator draws per case (units in the names; all draws independent).

    Attributes:
        dw: white-matter diffusivity Dw, mm^2/day, log-uniform.
        rho: proliferation rate, 1/day, log-uniform.
        radius_mm: target radius of the c = 0.5 front, mm, uniform; T follows from it.
        t_days: accepted growth times T, days (draws outside are redrawn).
        sqrt_dw_t_max: cap on sqrt(Dw T), mm (bounds the number of solver steps).
        sqrt_rho_t_min: floor on sqrt(rho T): below it the seed barely grows.
        u_t1: T1c threshold, uniform (core is c >= u_t1).
        u_fl: FLAIR threshold, uniform (edema is u_fl <= c < u_t1).
        ratio: Dw / Dg, fixed.
    """

    dw: tuple[float, float] = (0.02, 1.5)
    rho: tuple[float, float] = (0.005, 0.3)
    radius_mm: tuple[float, float] = (4.0, 22.0)
    t_days: tuple[float, float] = (20.0, 3000.0)
    sqrt_dw_t_max: float = 14.0
    sqrt_rho_t_min: float = 1.0
    u_t1: tuple[float, float] = (0.5, 0.85)
    u_fl: tuple[float, float] = (0.05, 0.5)
    ratio: float = 10.0

    def __post_init__(self):
        for f in ("dw", "rho", "radius_mm", "t_days", "u_t1", "u_fl"):
            object.__setattr__(self, f, _pair(getattr(self, f)))
        if self.dw[0] <= 0 or self.rho[0] <= 0:
            raise ValueError("dw and rho ranges must be positive")
        if self.u_fl[1] > self.u_t1[0]:
            raise ValueError("u_fl must stay below u_t1: need u_fl high <= u_t1 low")


@dataclass(frozen=True)
class GeneratorConfig:
    """Geometry and sampling of the training simulations (hashable: static under jit).

    Attributes:
        sim_shape: voxels per axis of the simulation box (a cube around the origin).
        sim_spacing: simulation voxel size, mm.
        net_shape: voxels per axis of the network grid.
        net_spacing: network voxel size, mm.
        ranges: the parameter and threshold distributions.
        flip_axes: array axes that are randomly flipped (0 = left-right).
        rotation_deg: maximum rotation angle of the anatomy jitter, degrees.
        scale_jitter: relative isotropic scale jitter (0.05: 0.95-1.05).
        origin_tissue_min: the origin is drawn among atlas voxels with wm + gm >= this.
        min_visible_voxels: a case needs this many simulation voxels with c >= u_fl high
            (so it is visible for every threshold draw); fewer: rejected.
        border_mm: the region c >= u_fl low must stay this far inside the network crop;
            a case touching the border is rejected.
        d_ref: reference diffusivity of the scaled simulation, mm^2 per time unit.
        seed_sigma: standard deviation of the Gaussian seed, mm.
    """

    sim_shape: int = 48
    sim_spacing: float = 2.0
    net_shape: int = 32
    net_spacing: float = 2.0
    ranges: SamplingRanges = field(default_factory=SamplingRanges)
    flip_axes: tuple[int, ...] = (0,)
    rotation_deg: float = 8.0
    scale_jitter: float = 0.05
    origin_tissue_min: float = 0.5
    min_visible_voxels: int = 8
    border_mm: float = 2.0
    d_ref: float = 1.0
    seed_sigma: float = 3.2

    def __post_init__(self):
        object.__setattr__(self, "flip_axes", tuple(int(a) for a in self.flip_axes))
        if isinstance(self.ranges, dict):
            object.__setattr__(self, "ranges", SamplingRanges(**self.ranges))
        if self.net_shape * self.net_spacing > self.sim_shape * self.sim_spacing:
            raise ValueError("the network crop must be smaller than the simulation box")

    @property
    def sim_grid(self) -> Grid:
        return Grid((self.sim_shape,) * 3, (self.sim_spacing,) * 3)

    @property
    def fov_mm(self) -> float:
        """Field of view of the network grid, mm."""
        return self.net_shape * self.net_spacing

    @property
    def dt(self) -> float:
        """Scaled time step (stable for tissue wm + gm <= 1 at d_ref)."""
        return stable_time_step(self.sim_grid, self.d_ref, 0.9)

    @property
    def t_scaled_max(self) -> float:
        return self.ranges.sqrt_dw_t_max**2 / self.d_ref

    @property
    def max_steps(self) -> int:
        return math.ceil(self.t_scaled_max / self.dt) + 1


# --------------------------------------------------------------------------- geometry


def resample_affine(
    volume: Float[Array, "n0 n1 n2"],
    matrix: Float[Array, "3 3"],
    offset: Float[Array, "3"],
    out_shape: tuple[int, int, int],
    *,
    order: int = 1,
    cval: float = 0.0,
) -> Float[Array, "m0 m1 m2"]:
    """Sample `volume` at input voxel coordinates `matrix @ j + offset` for every output
    voxel index j (order 1 trilinear, 0 nearest; `cval` outside the input)."""
    idx = jnp.meshgrid(*(jnp.arange(n, dtype=jnp.float32) for n in out_shape), indexing="ij")
    j = jnp.stack([i.ravel() for i in idx])
    # HIGHEST: on GPUs a float32 matmul defaults to TF32, ~1e-3 voxel errors in coordinates.
    coords = jnp.matmul(jnp.asarray(matrix, jnp.float32), j, precision=jax.lax.Precision.HIGHEST)
    coords = coords + jnp.asarray(offset, jnp.float32)[:, None]
    out = jax.scipy.ndimage.map_coordinates(
        jnp.asarray(volume), list(coords), order=order, mode="constant", cval=cval
    )
    return out.reshape(out_shape)


def network_grid_offsets(out_shape, out_spacing) -> tuple[Array, Array, Array]:
    """Per-axis mm offsets of the network grid's voxel centres from its centre."""
    out_shape = tuple(int(n) for n in np.broadcast_to(out_shape, (3,)))
    out_spacing = np.broadcast_to(np.asarray(out_spacing, np.float32), (3,))
    return tuple(
        (jnp.arange(n, dtype=jnp.float32) - (n - 1) / 2.0) * float(h)
        for n, h in zip(out_shape, out_spacing)
    )


def crop_around(
    arrays,
    centre_vox,
    spacing,
    out_shape,
    out_spacing,
    *,
    order: int = 1,
    cval: float = 0.0,
):
    """Resample arrays onto a grid of `out_shape` voxels of `out_spacing` mm centred on
    `centre_vox`, with the input's axes.

    Args:
        arrays: one 3-D array or a pytree (tuple, dict) of same-shaped 3-D arrays.
        centre_vox: the crop centre in (fractional) voxel indices of the input.
        spacing: input voxel size, mm (3 values or one).
        out_shape: output voxels per axis (3 values or one).
        out_spacing: output voxel size, mm (3 values or one).
        order: 1 trilinear, 0 nearest.
        cval: value outside the input.

    Output voxel j sits at (j - (m - 1) / 2) * out_spacing mm from the centre, that is at
    input voxel centre_vox + (j - (m - 1) / 2) * out_spacing / spacing.
    """
    out_shape = tuple(int(n) for n in np.broadcast_to(out_shape, (3,)))
    spacing = jnp.broadcast_to(jnp.asarray(spacing, jnp.float32), (3,))
    out_spacing = jnp.broadcast_to(jnp.asarray(out_spacing, jnp.float32), (3,))
    centre = jnp.asarray(centre_vox, jnp.float32)
    ratio = out_spacing / spacing
    half = (jnp.asarray(out_shape, jnp.float32) - 1.0) / 2.0
    matrix = jnp.diag(ratio)
    offset = centre - ratio * half
    return jax.tree.map(
        lambda a: resample_affine(a, matrix, offset, out_shape, order=order, cval=cval), arrays
    )


def _centre_of_mass_mm(mask: Array, spacing) -> tuple[Array, Array]:
    """Centre of mass (grid mm) of a non-negative weight array, and its total weight."""
    total = mask.sum()
    safe = jnp.where(total > 0, total, 1.0)
    com = []
    for k, n in enumerate(mask.shape):
        axes = tuple(a for a in range(3) if a != k)
        profile = mask.sum(axis=axes)
        com.append((profile * jnp.arange(n, dtype=mask.dtype)).sum() / safe * spacing[k])
    return jnp.stack(com), total


# --------------------------------------------------------------------------- sampling


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    """A random rotation by an angle up to `max_deg` about a uniformly random axis."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = np.deg2rad(rng.uniform(-max_deg, max_deg))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)


def _loguniform(rng, lo_hi, size):
    lo, hi = lo_hi
    return np.exp(rng.uniform(np.log(lo), np.log(hi), size))


def _scaled_growth_time(radius_over_lambda: np.ndarray) -> np.ndarray:
    """rho T from the Fisher front position with Bramson's correction,
    R / lambda = 2 rho T - 1.5 ln(rho T) (lambda = sqrt(D / rho)); solved for rho T >= 1."""
    target = np.maximum(radius_over_lambda, 2.0)
    s = np.maximum(target / 2.0, 1.0)
    for _ in range(30):  # Newton on f(s) = 2 s - 1.5 ln s - target (increasing for s > 0.75)
        s = s - (2 * s - 1.5 * np.log(s) - target) / (2 - 1.5 / s)
        s = np.maximum(s, 1.0)
    return s


def draw_cases(
    cfg: GeneratorConfig,
    tissue_mask: np.ndarray,
    atlas_spacing,
    rng: np.random.Generator,
    n: int,
) -> dict[str, np.ndarray]:
    """Draw `n` cases on the host: anatomy placement, parameters and thresholds.

    Dw and rho are log-uniform; T follows from a uniform target front radius through
    `_scaled_growth_time`; draws with T outside `t_days`, sqrt(Dw T) above its cap,
    sqrt(rho T) below its floor, or whose visible extent (front + 3 lambda) cannot fit the
    network crop are redrawn. The origin is a random atlas voxel with tissue (jittered
    within the voxel); the anatomy transform is a random flip, rotation and scale.

    Returns a dict of arrays with leading axis n: origin_atlas_mm (grid mm of the atlas),
    transform (3x3: box axes -> atlas axes, mm per mm), dw (mm^2/day), rho (1/day), t_days,
    sqrt_dw_t (mm), sqrt_rho_t, u_t1, u_fl.
    """
    r = cfg.ranges
    candidates = np.argwhere(tissue_mask)
    if len(candidates) == 0:
        raise ValueError("the atlas has no voxel with enough tissue for an origin")
    atlas_spacing = np.broadcast_to(np.asarray(atlas_spacing, float), (3,))
    out: dict[str, list] = {k: [] for k in ("dw", "rho", "t_days")}
    count = 0
    while count < n:
        m = max(4 * (n - count), 64)
        dw = _loguniform(rng, r.dw, m)
        rho = _loguniform(rng, r.rho, m)
        radius = rng.uniform(*r.radius_mm, m)
        lam = np.sqrt(dw / rho)
        rho_t = _scaled_growth_time(radius / lam)
        t = rho_t / rho
        ok = (
            (t >= r.t_days[0]) & (t <= r.t_days[1])
            & (np.sqrt(dw * t) <= r.sqrt_dw_t_max)
            & (np.sqrt(rho_t) >= r.sqrt_rho_t_min)
            & (radius + 3.0 * lam <= cfg.fov_mm / 2.0 - cfg.border_mm)
        )
        for key, value in (("dw", dw), ("rho", rho), ("t_days", t)):
            out[key].extend(value[ok][: n - count])
        count = len(out["dw"])
    dw, rho, t = (np.asarray(out[k], np.float64) for k in ("dw", "rho", "t_days"))
    vox = candidates[rng.integers(0, len(candidates), n)] + rng.uniform(-0.5, 0.5, (n, 3))
    transforms = []
    for _ in range(n):
        flip = np.ones(3)
        for axis in cfg.flip_axes:
            flip[axis] = rng.choice((-1.0, 1.0))
        scale = rng.uniform(1 - cfg.scale_jitter, 1 + cfg.scale_jitter)
        transforms.append(_rotation(rng, cfg.rotation_deg) @ np.diag(flip) * scale)
    return {
        "origin_atlas_mm": (vox * atlas_spacing).astype(np.float32),
        "transform": np.asarray(transforms, np.float32),
        "dw": dw.astype(np.float32),
        "rho": rho.astype(np.float32),
        "t_days": t.astype(np.float32),
        "sqrt_dw_t": np.sqrt(dw * t).astype(np.float32),
        "sqrt_rho_t": np.sqrt(rho * t).astype(np.float32),
        "u_t1": rng.uniform(*r.u_t1, n).astype(np.float32),
        "u_fl": rng.uniform(*r.u_fl, n).astype(np.float32),
    }


# --------------------------------------------------------------------------- simulation


def box_affine(
    cfg: GeneratorConfig,
    atlas_spacing,
    origin_atlas_mm: Float[Array, "3"],
    transform: Float[Array, "3 3"],
) -> tuple[Array, Array]:
    """(matrix, offset) of `resample_affine` from the simulation box (a cube of `sim_shape`
    voxels of `sim_spacing` mm centred on the origin, whose axes map to atlas mm through
    `transform`) to atlas voxel coordinates."""
    spacing = jnp.broadcast_to(jnp.asarray(atlas_spacing, jnp.float32), (3,))
    half = (cfg.sim_shape - 1) / 2.0
    matrix = (transform * cfg.sim_spacing) / spacing[:, None]
    corner = jnp.matmul(transform, jnp.full(3, half * cfg.sim_spacing), precision=jax.lax.Precision.HIGHEST)
    return matrix, (origin_atlas_mm - corner) / spacing


def anatomy_box(
    cfg: GeneratorConfig,
    atlas_wm: Array,
    atlas_gm: Array,
    atlas_spacing,
    origin_atlas_mm: Float[Array, "3"],
    transform: Float[Array, "3 3"],
) -> tuple[Array, Array]:
    """WM and GM on the simulation box (`box_affine`), trilinear.
    wm + gm is scaled down to at most 1 where interpolation overshoots."""
    n = cfg.sim_shape
    matrix, offset = box_affine(cfg, atlas_spacing, origin_atlas_mm, transform)
    wm = resample_affine(atlas_wm, matrix, offset, (n,) * 3)
    gm = resample_affine(atlas_gm, matrix, offset, (n,) * 3)
    wm, gm = jnp.clip(wm, 0.0, 1.0), jnp.clip(gm, 0.0, 1.0)
    total = wm + gm
    scale = jnp.where(total > 1.0, 1.0 / jnp.maximum(total, 1e-6), 1.0)
    return wm * scale, gm * scale


def box_centre_mm(cfg: GeneratorConfig) -> Array:
    """Grid mm of the simulation box's centre (where the drawn origin sits)."""
    return jnp.full(3, (cfg.sim_shape - 1) / 2.0 * cfg.sim_spacing, jnp.float32)


def simulate_box(
    cfg: GeneratorConfig,
    wm: Array,
    gm: Array,
    origin_mm: Float[Array, "3"],
    sqrt_dw_t,
    sqrt_rho_t,
) -> Float[Array, "n n n"]:
    """Density on the simulation box from scaled parameters (one case; vmap for batches).

    sqrt(Dw T) is clipped to (0, sqrt_dw_t_max] so the static step bound always holds.
    """
    a = jnp.clip(jnp.asarray(sqrt_dw_t, jnp.float32), 1e-3, cfg.ranges.sqrt_dw_t_max)
    b2 = jnp.maximum(jnp.asarray(sqrt_rho_t, jnp.float32), 0.0) ** 2
    t_scaled = a**2 / cfg.d_ref
    sim = FKSimulator(
        wm=wm, gm=gm, grid=cfg.sim_grid, dt=cfg.dt, max_steps=cfg.max_steps,
        seed=GaussianSeed(sigma=cfg.seed_sigma),
    )
    params = FKParams(dw=jnp.float32(cfg.d_ref), rho=b2 / t_scaled, ratio=jnp.float32(cfg.ranges.ratio))
    return sim(params, origin_mm, t_scaled)


def observe(cfg: GeneratorConfig, c, wm, gm, u_t1, u_fl) -> dict[str, Array]:
    """Crop one simulated case (density and tissue on the simulation box) to the network
    grid around its visible tumour (the centre of mass of c >= u_fl).

    The crop centre is that centre of mass moved by less than half a voxel so that the
    crop's first voxel is a voxel of the box: with equal spacings the crop copies the box
    exactly (no interpolation blur of steep profiles).

    Returns accepted (visible at every threshold draw, the widest visible region inside
    the crop with `border_mm` to spare, the crop inside the box), com_box_mm (the crop
    centre, box grid mm), and density, wm, gm on the network grid."""
    h = cfg.sim_spacing
    core, edema = visible_masks(c, u_t1, u_fl)
    com_mm, _ = _centre_of_mass_mm((core | edema).astype(jnp.float32), (h,) * 3)
    half = (cfg.net_shape - 1) / 2.0 * cfg.net_spacing / h  # crop half-width, box voxels
    centre_vox = jnp.round(com_mm / h - half) + half
    centre_mm = centre_vox * h
    # acceptance, for every threshold draw: visible even at the highest u_fl, and the
    # widest visible region (lowest u_fl) inside the crop with a margin
    enough = (c >= cfg.ranges.u_fl[1]).sum() >= cfg.min_visible_voxels
    widest = c >= cfg.ranges.u_fl[0]
    coords = jnp.stack(jnp.meshgrid(*(jnp.arange(cfg.sim_shape) * h,) * 3, indexing="ij"))
    reach = jnp.max(jnp.where(widest[None], jnp.abs(coords - centre_mm[:, None, None, None]), 0.0))
    fits = reach <= cfg.fov_mm / 2.0 - cfg.border_mm
    box = (cfg.sim_shape - 1) * h
    inside = jnp.all((centre_mm - cfg.fov_mm / 2.0 >= 0.0) & (centre_mm + cfg.fov_mm / 2.0 <= box))
    c_crop, wm_crop, gm_crop = crop_around(
        (c, wm, gm), centre_vox, h, cfg.net_shape, cfg.net_spacing
    )
    return {
        "accepted": enough & fits & inside,
        "com_box_mm": centre_mm,
        "density": c_crop,
        "wm": wm_crop,
        "gm": gm_crop,
    }


def _simulate_batch(cfg, atlas_wm, atlas_gm, atlas_spacing, cases):
    def one(origin, transform, a, b, u_t1, u_fl):
        wm, gm = anatomy_box(cfg, atlas_wm, atlas_gm, atlas_spacing, origin, transform)
        centre = box_centre_mm(cfg)
        c = simulate_box(cfg, wm, gm, centre, a, b)
        out = observe(cfg, c, wm, gm, u_t1, u_fl)
        out["origin_rel_mm"] = centre - out["com_box_mm"]
        mid = jnp.full((3, 1), (cfg.sim_shape - 1) / 2.0)
        out["tissue_at_origin"] = jax.scipy.ndimage.map_coordinates(wm + gm, list(mid), order=1)[0]
        return out

    return jax.vmap(one)(
        cases["origin_atlas_mm"], cases["transform"], cases["sqrt_dw_t"], cases["sqrt_rho_t"],
        cases["u_t1"], cases["u_fl"],
    )


_simulate_batch_jit = jax.jit(_simulate_batch, static_argnums=0)


def simulate_cases(cfg: GeneratorConfig, atlas_wm, atlas_gm, atlas_spacing, cases: dict) -> dict:
    """Simulate drawn cases (a batch from `draw_cases`) and crop them to the network grid.

    Returns per case (leading batch axis): accepted (bool), com_box_mm (centre of mass of
    the visible tumour in simulation-box grid mm; the crop centre), origin_rel_mm (origin
    minus that centre, mm), density/wm/gm on the network grid, tissue_at_origin.
    Rejected cases (visible tumour too small, touching the crop border, or crop leaving the
    simulation box) are flagged, not removed.
    """
    keys = ("origin_atlas_mm", "transform", "sqrt_dw_t", "sqrt_rho_t", "u_t1", "u_fl")
    batch = {k: jnp.asarray(cases[k]) for k in keys}
    return _simulate_batch_jit(cfg, jnp.asarray(atlas_wm), jnp.asarray(atlas_gm),
                               jnp.asarray(atlas_spacing, jnp.float32), batch)


def _box_tensor(cfg: GeneratorConfig, atlas_tensor, atlas_spacing, origin_atlas_mm, transform):
    """The shape tensor on the simulation box: components resampled (trilinear) and rotated
    into the box axes (v_box = Q^T v_atlas, Q the orthogonal part of `transform`)."""
    n = cfg.sim_shape
    matrix, offset = box_affine(cfg, atlas_spacing, origin_atlas_mm, transform)
    t6 = jnp.stack([resample_affine(t, matrix, offset, (n,) * 3) for t in atlas_tensor])
    q = transform / jnp.cbrt(jnp.abs(jnp.linalg.det(transform)))
    return rotate_tensor(t6, q.T)


def _anisotropic_box(cfg, atlas_wm, atlas_gm, atlas_tensor, atlas_spacing, origin, transform):
    wm, gm = anatomy_box(cfg, atlas_wm, atlas_gm, atlas_spacing, origin, transform)
    return wm, gm, _box_tensor(cfg, atlas_tensor, atlas_spacing, origin, transform)


_anisotropic_box_jit = jax.jit(_anisotropic_box, static_argnums=0)
_observe_jit = jax.jit(observe, static_argnums=0)


def simulate_anisotropic_cases(
    cfg: GeneratorConfig, atlas_wm, atlas_gm, atlas_tensor, atlas_spacing, cases: dict
) -> dict[str, np.ndarray]:
    """Like `simulate_cases`, but the white matter grows along a tensor field.

    D(x) = Dw [p_wm A(x) + p_gm / ratio I] (`growth.AnisotropicFKSimulator`), A the
    (6, *atlas shape) trace-3 shape tensor on the atlas grid, resampled and rotated into
    each case's box. One case at a time on the host (the stencil is built per anatomy),
    in scaled time as the isotropic generator. Returns numpy arrays, leading batch axis.
    """
    atlas_wm, atlas_gm = jnp.asarray(atlas_wm, jnp.float32), jnp.asarray(atlas_gm, jnp.float32)
    atlas_tensor = jnp.asarray(atlas_tensor, jnp.float32)
    spacing = jnp.broadcast_to(jnp.asarray(atlas_spacing, jnp.float32), (3,))
    centre = box_centre_mm(cfg)
    rows = []
    for k in range(len(cases["sqrt_dw_t"])):
        origin, transform = jnp.asarray(cases["origin_atlas_mm"][k]), jnp.asarray(cases["transform"][k])
        wm, gm, tensor = _anisotropic_box_jit(cfg, atlas_wm, atlas_gm, atlas_tensor, spacing,
                                              origin, transform)
        a = float(np.clip(cases["sqrt_dw_t"][k], 1e-3, cfg.ranges.sqrt_dw_t_max))
        t_scaled = a**2 / cfg.d_ref
        sim = AnisotropicFKSimulator.create(
            np.asarray(wm), np.asarray(gm), np.asarray(tensor), cfg.sim_grid,
            dw_max=cfg.d_ref, t_max=t_scaled, seed=GaussianSeed(sigma=cfg.seed_sigma),
        )
        b2 = float(cases["sqrt_rho_t"][k]) ** 2
        c = sim(FKParams(dw=cfg.d_ref, rho=b2 / t_scaled, ratio=cfg.ranges.ratio), centre, t_scaled)
        out = _observe_jit(cfg, c, wm, gm, jnp.float32(cases["u_t1"][k]), jnp.float32(cases["u_fl"][k]))
        out["origin_rel_mm"] = centre - out["com_box_mm"]
        rows.append(jax.device_get(out))
    return {key: np.stack([np.asarray(r[key]) for r in rows]) for key in rows[0]}


def iterate_simulations(
    cfg: GeneratorConfig,
    atlas_wm: np.ndarray,
    atlas_gm: np.ndarray,
    atlas_spacing,
    *,
    seed: int,
    batch_size: int = 16,
    pool_batches: int = 8,
    tensor=None,
) -> Iterator[dict[str, np.ndarray]]:
    """Stream accepted training cases forever, in batches of at most `batch_size`.

    Each round draws `pool_batches * batch_size` cases, sorts them by sqrt(Dw T) (cost of a
    vmapped batch is its slowest member) and simulates them batch by batch, the batches in
    random order (a consumer stopping within a pool still sees every Dw T); each yielded
    dict holds the accepted cases only: the `draw_cases` fields plus the `simulate_cases`
    outputs (as numpy). The same seed gives the same stream. With `tensor` (a (6, *atlas
    shape) white-matter shape tensor) the cases grow anisotropically
    (`simulate_anisotropic_cases`).
    """
    rng = np.random.default_rng(seed)
    tissue = (np.asarray(atlas_wm) + np.asarray(atlas_gm)) >= cfg.origin_tissue_min
    atlas_wm_j, atlas_gm_j = jnp.asarray(atlas_wm, jnp.float32), jnp.asarray(atlas_gm, jnp.float32)
    while True:
        pool = draw_cases(cfg, tissue, atlas_spacing, rng, pool_batches * batch_size)
        order = np.argsort(pool["sqrt_dw_t"])
        # batches in random order: a consumer that stops within a pool is not biased
        # towards small Dw T
        for start in rng.permutation(np.arange(0, len(order), batch_size)):
            idx = order[start : start + batch_size]
            cases = {k: v[idx] for k, v in pool.items()}
            if tensor is None:
                out = jax.device_get(simulate_cases(cfg, atlas_wm_j, atlas_gm_j, atlas_spacing, cases))
            else:
                out = simulate_anisotropic_cases(cfg, atlas_wm_j, atlas_gm_j, tensor, atlas_spacing, cases)
            keep = np.asarray(out.pop("accepted"))
            if keep.any():
                yield {**{k: v[keep] for k, v in cases.items()},
                       **{k: np.asarray(v)[keep] for k, v in out.items()}}


# --------------------------------------------------------------------------- inputs


def masks_to_inputs(core_frac, edema_frac, wm, gm, net_spacing) -> tuple[Array, Array]:
    """Network input (n, n, n, 4) from resampled mask fractions and tissue, and the
    centre of mass of the visible tumour in mm from the grid's centre.

    core = core_frac >= 0.5; edema = core_frac + edema_frac >= 0.5 and not core.
    """
    core = core_frac >= 0.5
    edema = (core_frac + edema_frac >= 0.5) & ~core
    return _inputs(core, edema, wm, gm, net_spacing)


def threshold_inputs(density, wm, gm, u_t1, u_fl, net_spacing) -> tuple[Array, Array]:
    """Network input and visible centre of mass (mm from the grid centre) from a density
    on the network grid, with thresholds u_t1, u_fl (the training-time view)."""
    core, edema = visible_masks(density, u_t1, u_fl)
    return _inputs(core, edema, wm, gm, net_spacing)


def _inputs(core, edema, wm, gm, net_spacing):
    n = core.shape
    spacing = (float(net_spacing),) * 3
    com, _ = _centre_of_mass_mm((core | edema).astype(jnp.float32), spacing)
    com = com - (jnp.asarray(n, jnp.float32) - 1.0) / 2.0 * jnp.asarray(spacing)
    x = jnp.stack([core.astype(jnp.float32), edema.astype(jnp.float32),
                   jnp.asarray(wm, jnp.float32), jnp.asarray(gm, jnp.float32)], axis=-1)
    return x, com
