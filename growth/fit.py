"""Fitting the FK model to observed tumour masks by gradients through the solver.

Only the products Dw*T and rho*T are identifiable from one time point, so the fit works in
scaled time: it simulates to t = 1 with diffusivity Dw*T (mm^2) and proliferation rho*T
(dimensionless), and reports sqrt(Dw*T) (mm) and sqrt(rho*T) as LearnMorph-Infer does.
The unknowns are those two, the seed origin (mm) and the imaging thresholds u_T1, u_FL.
Each is mapped from an unconstrained variable onto a box (log-uniform for the growth
parameters), so optax's Adam can move freely while the estimate stays physical; the loss
is 1 - mean soft Dice of the simulated (sigmoid-thresholded) core and edema against the
observed masks, with soft masks that narrow over the run (wide ones find the basin, but
their optimum is biased towards steep profiles) plus a weak prior towards the starting
estimate (the masks of one time point are reproduced almost equally well along a valley of
thresholds and growth parameters; the prior picks the point nearest to the network's
estimate). The iterate with the best hard-mask Dice (plus prior) is kept, and the run
stops early when it has not improved for `patience` iterations. `refine_multistart` runs
several starts (e.g. ensemble members) and keeps the best.

Anisotropic fits (`refine(..., shape_tensor=...)`) run the same optimiser and losses
through `growth.AnisotropicFKSimulator`: with a fixed trace-3 shape tensor, or with a
`growth.TumourTensorFamily`, whose anisotropy r is then an eighth fitted variable
(log-uniform in the family's range; its stencil is decomposed once, so r stays traced).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float

from growth.anisotropic import AnisotropicFKSimulator
from growth.grid import Grid
from growth.imaging import soft_visible_masks, visible_masks
from growth.solver import AbstractFKSimulator, FKParams, FKSimulator, solve_fk
from growth.tensor import TumourTensorFamily

__all__ = [
    "FitEstimate",
    "FitBounds",
    "FitConfig",
    "FitResult",
    "heuristic_estimate",
    "soft_dice",
    "dice",
    "mask_loss",
    "hard_mask_loss",
    "FIT_DENSE_FRACTION",
    "make_fit_simulator",
    "simulate_adaptive",
    "refine",
    "refine_multistart",
]


class FitEstimate(eqx.Module):
    """A growth estimate in scaled time.

    Attributes:
        origin_mm: seed centre in grid mm (voxel index * spacing), shape (3,).
        sqrt_dw_t: sqrt(Dw * T), mm.
        sqrt_rho_t: sqrt(rho * T), dimensionless.
        u_t1: density threshold of the enhancing core on T1c.
        u_fl: density threshold of the edema on FLAIR.
        anisotropy: the tumour-tensor anisotropy r of an anisotropic fit (None:
            isotropic, or a fixed shape tensor without an r).
    """

    origin_mm: Array
    sqrt_dw_t: Array
    sqrt_rho_t: Array
    u_t1: Array
    u_fl: Array
    anisotropy: Array | None = None

    def params(self, ratio: float = 10.0) -> FKParams:
        """FK parameters for a simulation to t = 1 (Dw*T in mm^2, rho*T)."""
        return FKParams(dw=self.sqrt_dw_t**2, rho=self.sqrt_rho_t**2, ratio=ratio,
                        anisotropy=self.anisotropy)

    def as_dict(self) -> dict:
        """Plain floats, for JSON."""
        out = {
            "origin_grid_mm": [float(v) for v in np.asarray(self.origin_mm)],
            "sqrt_dw_t_mm": float(self.sqrt_dw_t),
            "sqrt_rho_t": float(self.sqrt_rho_t),
            "dw_t_mm2": float(self.sqrt_dw_t) ** 2,
            "rho_t": float(self.sqrt_rho_t) ** 2,
            "u_t1": float(self.u_t1),
            "u_fl": float(self.u_fl),
        }
        if self.anisotropy is not None:
            out["anisotropy"] = float(self.anisotropy)
        return out

    def with_anisotropy(self, anisotropy) -> "FitEstimate":
        """The same estimate with anisotropy r (None: without)."""
        value = None if anisotropy is None else jnp.asarray(anisotropy, jnp.float32)
        return eqx.tree_at(lambda e: e.anisotropy, self, value, is_leaf=lambda x: x is None)


@dataclass(frozen=True)
class FitBounds:
    """Boxes the estimate is kept in.

    Attributes:
        sqrt_dw_t: (low, high) of sqrt(Dw*T), mm.
        sqrt_rho_t: (low, high) of sqrt(rho*T).
        u_t1, u_fl: threshold ranges (LearnMorph-Infer's sampling ranges by default).
        origin_mm: how far the origin may move from the initial estimate, mm per axis.
        relative: also keep the growth parameters within this factor of the initial
            estimate (None: only the absolute boxes).
        anisotropy: (low, high) of the fitted tumour-tensor anisotropy r (the range of
            the `TumourTensorFamily` an anisotropic fit is given); not narrowed by
            `relative`.
    """

    sqrt_dw_t: tuple[float, float] = (0.5, 30.0)
    sqrt_rho_t: tuple[float, float] = (0.3, 10.0)
    u_t1: tuple[float, float] = (0.5, 0.85)
    u_fl: tuple[float, float] = (0.05, 0.5)
    origin_mm: float = 15.0
    relative: float | None = 4.0
    anisotropy: tuple[float, float] = (1.0, 10.0)


@dataclass(frozen=True)
class FitConfig:
    """Optimiser settings.

    The defaults (tuned on held-out simulated cases, see `rtjax.experiments.fit_evaluation`): Adam with
    a cosine decay to 0.2 of the step size, soft masks narrowing from 0.03 to 0.006 (wide
    soft masks are biased towards steep profiles), the iterate with the best hard-mask
    Dice kept, and a weak prior towards the starting estimate, which picks among the many
    parameter sets that reproduce the masks equally well (thresholds, sqrt(Dw T) and
    sqrt(rho T) trade off along a valley) the one nearest to the network's estimate.

    Attributes:
        max_iterations: Adam steps at most.
        learning_rate: Adam step size in the unconstrained variables.
        patience: stop after this many iterations without improvement.
        min_improvement: an improvement smaller than this does not count.
        soft_width: width of the sigmoid thresholds (density units).
        fit_thresholds: optimise u_T1 and u_FL too (else keep the initial ones).
        ratio: Dw / Dg.
        prior_weight: weight of a Gaussian prior around the initial estimate (0: none),
            added to 1 - soft Dice as prior_weight * mean(((theta - theta0) / scale)^2) / 2.
        prior_scales: its scales for (origin, mm per axis; log sqrt(Dw T); log sqrt(rho T);
            u_T1; u_FL).
        final_lr_fraction: the step size decays (cosine) to this fraction of
            `learning_rate` over `max_iterations` (1: constant).
        final_width_fraction: the soft-mask width shrinks geometrically to this fraction
            of itself over `max_iterations` (1: constant). Wide soft masks find the basin;
            their optimum is biased towards steep profiles (a soft Dice rewards sharp
            masks), narrow ones remove that bias.
        select: the criterion of the best iterate and of early stopping: "soft" (the
            loss) or "hard" (1 - mean hard Dice of core and edema, unbiased and
            comparable across widths; plus the prior term and 0.01 times the soft loss).
        fit_anisotropy: with a `TumourTensorFamily`, also fit its anisotropy r (else
            keep the initial estimate's r).
        anisotropy_prior_scale: the prior's scale for log r (with `prior_weight`).
    """

    max_iterations: int = 150
    learning_rate: float = 0.08
    patience: int = 60
    min_improvement: float = 1e-4
    soft_width: float = 0.03
    fit_thresholds: bool = True
    ratio: float = 10.0
    prior_weight: float = 0.05
    prior_scales: tuple[float, float, float, float, float] = (3.0, 0.5, 0.3, 0.1, 0.1)
    final_lr_fraction: float = 0.2
    final_width_fraction: float = 0.2
    select: str = "hard"
    fit_anisotropy: bool = True
    anisotropy_prior_scale: float = 0.5

    def __post_init__(self):
        if self.select not in ("soft", "hard"):
            raise ValueError(f"select must be 'soft' or 'hard', got {self.select!r}")
        object.__setattr__(self, "prior_scales", tuple(float(v) for v in self.prior_scales))


@dataclass
class FitResult:
    """The outcome of `refine`."""

    estimate: FitEstimate
    initial: FitEstimate
    loss_curve: list[float]
    best_loss: float
    best_iteration: int
    stopped_early: bool
    dice_core: float
    dice_edema: float
    seconds: float
    details: dict = field(default_factory=dict)


def _centre_of_mass(mask: np.ndarray, spacing) -> np.ndarray:
    idx = np.argwhere(mask)
    return idx.mean(0) * np.asarray(spacing, float)


def heuristic_estimate(core, edema, spacing, u_t1: float = 0.675, u_fl: float = 0.25) -> FitEstimate:
    """A starting point from the masks alone (when no inverse network is at hand).

    The origin is the core's centre of mass (of the whole tumour if no core). From the
    travelling-wave picture of the FK equation, the visible radius R ~ 2 sqrt(D rho) T and
    the edema shell thickness W ~ sqrt(D / rho) ln(u_T1 / u_FL), which give
    sqrt(Dw T) = sqrt(R W' / 2) and sqrt(rho T) = sqrt(R / (2 W')), W' = W / ln(u_T1/u_FL).
    """
    core = np.asarray(core, bool)
    whole = core | np.asarray(edema, bool)
    if not whole.any():
        raise ValueError("cannot fit an empty tumour (no core and no edema voxels)")
    voxel = float(np.prod(spacing))
    reference = core if core.any() else whole
    r_core = (3 * core.sum() * voxel / (4 * np.pi)) ** (1 / 3)
    r_whole = (3 * whole.sum() * voxel / (4 * np.pi)) ** (1 / 3)
    width = max(r_whole - r_core, float(min(spacing))) / np.log(u_t1 / u_fl)
    radius = max(r_core, float(min(spacing)))
    return FitEstimate(
        origin_mm=jnp.asarray(_centre_of_mass(reference, spacing), jnp.float32),
        sqrt_dw_t=jnp.asarray(np.sqrt(radius * width / 2), jnp.float32),
        sqrt_rho_t=jnp.asarray(np.sqrt(radius / (2 * width)), jnp.float32),
        u_t1=jnp.asarray(u_t1, jnp.float32),
        u_fl=jnp.asarray(u_fl, jnp.float32),
    )


def soft_dice(a: Array, b: Array, eps: float = 1e-6) -> Array:
    """2 sum(a b) / (sum a + sum b), for masks with values in [0, 1]."""
    return (2 * jnp.sum(a * b) + eps) / (jnp.sum(a) + jnp.sum(b) + eps)


def dice(a, b) -> float:
    """Hard Dice of two boolean arrays (1.0 when both are empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def _clip_box(initial: float, box: tuple[float, float], relative: float | None):
    lo, hi = box
    if relative is not None:
        lo, hi = max(lo, initial / relative), min(hi, initial * relative)
    if not lo < hi:
        lo, hi = box
    return lo, hi


class _Decoder(eqx.Module):
    """Maps unconstrained variables z (7,; 8 with a fitted anisotropy) to a bounded
    FitEstimate. The boxes are arrays (2,) (traced: a new case reuses the compiled step)."""

    origin0: Array
    dw_box: Array
    rho_box: Array
    u_t1_box: Array
    u_fl_box: Array
    fixed_u: Array
    r_box: Array
    fixed_r: Array | None
    origin_radius: float = eqx.field(static=True)
    fit_thresholds: bool = eqx.field(static=True)
    fit_anisotropy: bool = eqx.field(static=True)

    @classmethod
    def create(cls, origin0, origin_radius, dw_box, rho_box, u_t1_box, u_fl_box, fixed_u,
               fit_thresholds, r_box=(1.0, 1.0), fixed_r=None, fit_anisotropy=False) -> "_Decoder":
        box = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
        return cls(origin0=box(origin0), dw_box=box(dw_box), rho_box=box(rho_box),
                   u_t1_box=box(u_t1_box), u_fl_box=box(u_fl_box), fixed_u=box(fixed_u),
                   r_box=box(r_box), fixed_r=None if fixed_r is None else box(fixed_r),
                   origin_radius=float(origin_radius), fit_thresholds=bool(fit_thresholds),
                   fit_anisotropy=bool(fit_anisotropy))

    def __call__(self, z: Array) -> FitEstimate:
        def log_box(v, box):
            lo, hi = box
            return lo * (hi / lo) ** jax.nn.sigmoid(v)

        def lin_box(v, box):
            lo, hi = box
            return lo + (hi - lo) * jax.nn.sigmoid(v)

        if self.fit_thresholds:
            u_t1, u_fl = lin_box(z[5], self.u_t1_box), lin_box(z[6], self.u_fl_box)
        else:
            u_t1, u_fl = self.fixed_u[0], self.fixed_u[1]
        return FitEstimate(
            origin_mm=self.origin0 + self.origin_radius * jnp.tanh(z[:3]),
            sqrt_dw_t=log_box(z[3], self.dw_box),
            sqrt_rho_t=log_box(z[4], self.rho_box),
            u_t1=u_t1,
            u_fl=u_fl,
            anisotropy=log_box(z[7], self.r_box) if self.fit_anisotropy else self.fixed_r,
        )

    def encode(self, estimate: FitEstimate) -> Array:
        def logit(p):
            p = np.clip(p, 1e-4, 1 - 1e-4)
            return np.log(p / (1 - p))

        def inv_log_box(v, box):
            lo, hi = (float(b) for b in box)
            return logit(np.log(float(v) / lo) / np.log(hi / lo))

        def inv_lin_box(v, box):
            lo, hi = (float(b) for b in box)
            return logit((float(v) - lo) / (hi - lo))

        z = [
            0.0, 0.0, 0.0,
            inv_log_box(estimate.sqrt_dw_t, self.dw_box),
            inv_log_box(estimate.sqrt_rho_t, self.rho_box),
            inv_lin_box(estimate.u_t1, self.u_t1_box),
            inv_lin_box(estimate.u_fl, self.u_fl_box),
        ]
        if self.fit_anisotropy:
            z.append(inv_log_box(estimate.anisotropy, self.r_box))
        return jnp.asarray(z, jnp.float32)


#: The stencil layout of anisotropic fits: only the axes as dense rows, every other
#: offset as sparse pairs. Reverse-mode through dense rows is costly on CPU (each row's
#: weight cotangent is a full array per step): on a 48^3 TractSeg box one value+grad
#: solve took 0.39 s so against 1.32 s with the 13 cube directions dense (isotropic:
#: 0.16 s), the forward solve about the same either way.
FIT_DENSE_FRACTION = math.inf


def make_fit_simulator(wm, gm, grid: Grid, sqrt_dw_t_max: float, shape_tensor=None, *,
                       dense_fraction: float = FIT_DENSE_FRACTION) -> AbstractFKSimulator:
    """A simulator to scaled time 1 whose step is stable up to sqrt(Dw T) = sqrt_dw_t_max,
    rounded up to a power of sqrt(2) (the step and the step bound are static: fits of
    cases on grids of one shape then share their compiled solver).

    With `shape_tensor` ((6, *grid) trace-3 white-matter shape tensor, or a
    `TumourTensorFamily` on the grid) it is an `AnisotropicFKSimulator` with the stencil
    layout `dense_fraction` (`growth.selling_field`; the default suits gradients).
    """
    a_max = 2.0 ** (math.ceil(2.0 * math.log2(max(float(sqrt_dw_t_max), 1e-3)) - 1e-9) / 2.0)
    if shape_tensor is None:
        return FKSimulator.create(wm, gm, grid, dw_max=a_max**2, t_max=1.0)
    return AnisotropicFKSimulator.create(wm, gm, shape_tensor, grid, dw_max=a_max**2, t_max=1.0,
                                         dense_fraction=dense_fraction)


def simulate_adaptive(
    sim: AbstractFKSimulator, params: FKParams, origin_mm, safety: float = 0.9, min_steps: int = 1
) -> Array:
    """The density at scaled time 1 with a step chosen for *these* parameters.

    The step is `safety` times the monotonicity limit of the current diffusivity (held
    constant under differentiation), so small diffusivities take few steps, but at least
    `min_steps` (an explicit step moves the density's support by one voxel, so few steps
    truncate the far tail); `sim.max_steps` (>= min_steps) bounds the loop.
    """
    diffusion = sim.diffusion(params)
    rate = jax.lax.stop_gradient(diffusion.rate_bound())
    dt = jnp.minimum(safety / jnp.maximum(rate, safety), 1.0 / min_steps)
    return solve_fk(sim.initial_density(origin_mm), diffusion, params.rho, 1.0,
                    dt=dt, max_steps=sim.max_steps)


def _theta(estimate: FitEstimate, with_anisotropy: bool = False) -> Array:
    """The estimate as the vector the prior is measured in: origin (mm), log sqrt(Dw T),
    log sqrt(rho T), u_T1, u_FL (and log r)."""
    parts = [
        jnp.asarray(estimate.origin_mm, jnp.float32),
        jnp.log(jnp.stack([estimate.sqrt_dw_t, estimate.sqrt_rho_t])).astype(jnp.float32),
        jnp.stack([estimate.u_t1, estimate.u_fl]).astype(jnp.float32),
    ]
    if with_anisotropy:
        parts.append(jnp.log(jnp.asarray(estimate.anisotropy, jnp.float32))[None])
    return jnp.concatenate(parts)


def mask_loss(density, estimate: FitEstimate, core, edema, config: "FitConfig",
              width_scale=1.0) -> Array:
    """1 - mean soft Dice of the simulated (sigmoid-thresholded) against the observed core
    and edema; the soft width `config.soft_width` is multiplied by `width_scale`."""
    soft_core, soft_edema = soft_visible_masks(density, estimate.u_t1, estimate.u_fl,
                                               config.soft_width * width_scale)
    return _dice_loss(soft_core, soft_edema, core, edema)


def _dice_loss(sim_core, sim_edema, core, edema) -> Array:
    return 1.0 - 0.5 * (soft_dice(sim_core, core) + soft_dice(sim_edema, edema))


def hard_mask_loss(density, estimate: FitEstimate, core, edema) -> Array:
    """`mask_loss` with hard masks on both sides (observed fractions >= 0.5): the loss
    the soft one approximates, used to pick the best iterate."""
    sim_core, sim_edema = (m.astype(jnp.float32) for m in visible_masks(density, estimate.u_t1, estimate.u_fl))
    obs_core = (core >= 0.5).astype(jnp.float32)
    obs_edema = ((core + edema >= 0.5) & (core < 0.5)).astype(jnp.float32)
    return _dice_loss(sim_core, sim_edema, obs_core, obs_edema)


def _loss(z, decoder: _Decoder, sim: AbstractFKSimulator, core, edema, config: "FitConfig", theta0,
          width_scale):
    estimate = decoder(z)
    density = simulate_adaptive(sim, estimate.params(config.ratio), estimate.origin_mm)
    hard = hard_mask_loss(jax.lax.stop_gradient(density), jax.lax.stop_gradient(estimate),
                          core, edema)
    loss = mask_loss(density, estimate, core, edema, config, width_scale)
    if config.prior_weight > 0:
        scales = config.prior_scales[:1] * 3 + config.prior_scales[1:]
        if decoder.fit_anisotropy:
            scales += (config.anisotropy_prior_scale,)
        deviation = (_theta(estimate, decoder.fit_anisotropy) - theta0) / jnp.asarray(scales, jnp.float32)
        if not config.fit_thresholds:
            deviation = jnp.concatenate([deviation[:5], deviation[7:]])
        prior = config.prior_weight * 0.5 * jnp.mean(deviation**2)
        loss, hard = loss + prior, hard + jax.lax.stop_gradient(prior)
    return loss, hard


def _optimizer(config: FitConfig) -> optax.GradientTransformation:
    """Adam on clipped gradients, its step size decaying (cosine) to `final_lr_fraction`.
    Built from the (static, hashable) config inside `_step`: a new optimizer object per
    fit would be a new static argument and recompile the step for every case."""
    schedule = optax.cosine_decay_schedule(config.learning_rate, max(config.max_iterations, 1),
                                           alpha=config.final_lr_fraction)
    return optax.chain(optax.clip_by_global_norm(10.0), optax.adam(schedule))


@eqx.filter_jit
def _step(z, opt_state, decoder, sim, core, edema, config, theta0, width_scale):
    (loss, hard), grad = jax.value_and_grad(_loss, has_aux=True)(
        z, decoder, sim, core, edema, config, theta0, width_scale)
    grad = jnp.where(jnp.isfinite(grad), grad, 0.0)
    updates, opt_state = _optimizer(config).update(grad, opt_state, z)
    return optax.apply_updates(z, updates), opt_state, loss, hard


def refine(
    core: Float[Array, "n0 n1 n2"],
    edema: Float[Array, "n0 n1 n2"],
    wm: Float[Array, "n0 n1 n2"],
    gm: Float[Array, "n0 n1 n2"],
    grid: Grid,
    initial: FitEstimate,
    *,
    config: FitConfig = FitConfig(),
    bounds: FitBounds = FitBounds(),
    callback=None,
    prior_centre: FitEstimate | None = None,
    shape_tensor=None,
) -> FitResult:
    """Refine `initial` against the observed masks by Adam through the FK solver.

    Args:
        core, edema: observed masks (0/1 or soft) on `grid`.
        wm, gm: tissue probabilities on `grid`.
        initial: the starting estimate (network or `heuristic_estimate`, or an
            isotropic fit to start an anisotropic one from).
        callback: called as callback(iteration, loss) after each step (progress bars).
        prior_centre: the centre of the prior term (`FitConfig.prior_weight`); default
            `initial`.
        shape_tensor: None (isotropic), a (6, *grid) trace-3 white-matter shape tensor
            (anisotropic, fixed), or a `TumourTensorFamily` on the grid (anisotropic; its
            r is fitted within the family's range when `config.fit_anisotropy`, starting
            from `initial.anisotropy` or else the range's geometric mean, and otherwise
            fixed at `initial.anisotropy`).

    Returns:
        The best estimate, the loss curve and the hard Dice of the re-simulated masks.
    """
    start = time.perf_counter()
    core = jnp.asarray(core, jnp.float32)
    edema = jnp.asarray(edema, jnp.float32)
    initial, r_box, fit_r = _anisotropy_setup(initial, shape_tensor, config)
    decoder = _Decoder.create(
        origin0=jnp.asarray(initial.origin_mm, jnp.float32),
        origin_radius=float(bounds.origin_mm),
        dw_box=_clip_box(float(initial.sqrt_dw_t), bounds.sqrt_dw_t, bounds.relative),
        rho_box=_clip_box(float(initial.sqrt_rho_t), bounds.sqrt_rho_t, bounds.relative),
        u_t1_box=bounds.u_t1,
        u_fl_box=bounds.u_fl,
        fixed_u=(float(initial.u_t1), float(initial.u_fl)),
        fit_thresholds=config.fit_thresholds,
        r_box=r_box,
        fixed_r=None if fit_r else initial.anisotropy,
        fit_anisotropy=fit_r,
    )
    sim = make_fit_simulator(wm, gm, grid, float(decoder.dw_box[1]), shape_tensor)
    z = decoder.encode(initial)
    centre = initial if prior_centre is None else prior_centre
    if fit_r and centre.anisotropy is None:
        centre = centre.with_anisotropy(initial.anisotropy)
    theta0 = _theta(centre, fit_r)
    opt_state = _optimizer(config).init(z)
    best_z, best_loss, best_iteration, curve, hard_curve = z, np.inf, 0, [], []
    stopped_early = False
    for iteration in range(config.max_iterations):
        width_scale = config.final_width_fraction ** (iteration / max(config.max_iterations - 1, 1))
        new_z, opt_state, loss, hard = _step(
            z, opt_state, decoder, sim, core, edema, config, theta0, jnp.float32(width_scale),
        )
        loss, hard = float(loss), float(hard)  # the losses of z, before this update
        curve.append(loss)
        hard_curve.append(hard)
        # hard: plus a hundredth of the soft loss, which breaks ties while the masks do not
        # overlap at all (the hard loss is then flat at 1)
        criterion = hard + 0.01 * loss if config.select == "hard" else loss
        if criterion < best_loss - config.min_improvement:
            best_z, best_loss, best_iteration = z, criterion, iteration
        if callback is not None:
            callback(iteration, loss)
        if iteration - best_iteration >= config.patience:
            stopped_early = True
            break
        z = new_z
    estimate = decoder(best_z)
    density = simulate_adaptive(sim, estimate.params(config.ratio), estimate.origin_mm)
    sim_core, sim_edema = visible_masks(density, estimate.u_t1, estimate.u_fl)
    return FitResult(
        estimate=jax.tree.map(lambda x: x, estimate),
        initial=initial,
        loss_curve=curve,
        best_loss=float(best_loss),
        best_iteration=best_iteration,
        stopped_early=stopped_early,
        dice_core=dice(sim_core, np.asarray(core) > 0.5),
        dice_edema=dice(sim_edema, np.asarray(edema) > 0.5),
        seconds=time.perf_counter() - start,
        details={
            "hard_loss_curve": hard_curve,
            "sqrt_dw_t_box": [float(v) for v in decoder.dw_box],
            "sqrt_rho_t_box": [float(v) for v in decoder.rho_box],
            "time_step": sim.dt,
            "steps_per_solve": sim.max_steps,
            **_anisotropy_details(sim, r_box, fit_r),
        },
    )


def _anisotropy_setup(initial: FitEstimate, shape_tensor, config: FitConfig):
    """(initial with its r set, r box, whether r is fitted) for `refine`."""
    if not isinstance(shape_tensor, TumourTensorFamily):
        return initial, (1.0, 1.0), False
    lo, hi = shape_tensor.anisotropy_range
    r = initial.anisotropy
    if r is None:
        if not config.fit_anisotropy:
            raise ValueError("a TumourTensorFamily with fit_anisotropy=False needs "
                             "initial.anisotropy (the fixed r)")
        r = math.sqrt(lo * hi)
    r = float(np.clip(float(r), lo, hi))
    return initial.with_anisotropy(r), (lo, hi), bool(config.fit_anisotropy)


def _anisotropy_details(sim: AbstractFKSimulator, r_box, fit_r: bool) -> dict:
    if not isinstance(sim, AnisotropicFKSimulator):
        return {"anisotropic": False}
    return {
        "anisotropic": True,
        "anisotropy_fitted": fit_r,
        "anisotropy_box": [float(v) for v in r_box] if fit_r else None,
        "stencil_offsets": len(sim.offsets),
        "stencil_dense_rows": len(sim.selling.dense_offsets),
        "stencil_sparse_pairs": int(sim.selling.pair_lower.size),
    }


def refine_multistart(
    core, edema, wm, gm, grid: Grid, initials, *, config: FitConfig = FitConfig(),
    bounds: FitBounds = FitBounds(), prior_centre: FitEstimate | None = None,
    shape_tensor=None,
) -> FitResult:
    """`refine` from each of `initials` (e.g. the ensemble mean and each member); the
    result with the lowest loss wins. `details["start_losses"]` lists every start's best
    loss, `details["start"]` the winner's index; `seconds` is the total. The prior (if
    any) is centred on `prior_centre` (default: the first start) for every start, so
    that the losses compare. `shape_tensor` as in `refine`."""
    start = time.perf_counter()
    initials = list(initials)
    centre = initials[0] if prior_centre is None else prior_centre
    results = [refine(core, edema, wm, gm, grid, init, config=config, bounds=bounds,
                      prior_centre=centre, shape_tensor=shape_tensor) for init in initials]
    losses = [r.best_loss for r in results]
    best = int(np.argmin(losses))
    result = results[best]
    result.details = {**result.details, "start_losses": losses, "start": best}
    result.seconds = time.perf_counter() - start
    return result
