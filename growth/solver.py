"""The Fisher-Kolmogorov forward solver.

    dc/dt = div(D(x) grad c) + rho c (1 - c),   no flux across the brain boundary.

Time stepping is a `diffrax.diffeqsolve` with a fixed step and the `LogisticSplitEuler`
solver: explicit Euler for the diffusion term, then the exact flow of the logistic reaction
(Lie splitting, first order). Below the explicit stability limit the diffusion step is a
convex combination of neighbours and the logistic flow maps [0, 1] into itself, so c stays
in [0, 1]; with D = 0 the solution is the exact logistic curve. Gradients flow through
diffrax's checkpointed adjoint.
"""

from __future__ import annotations

import abc
import math
from typing import ClassVar

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from growth.diffusion import (
    AbstractDiffusion,
    FaceCoefficients,
    FaceDiffusion,
    diffusion_operator,
    face_coefficients,
    tissue_diffusivity,
)
from growth.grid import Grid, stability_limit, stable_time_step
from growth.seed import GaussianSeed

__all__ = [
    "FKParams",
    "FKArgs",
    "AbstractFKSimulator",
    "LogisticSplitEuler",
    "logistic_flow",
    "fk_rhs",
    "check_time_step",
    "solve_fk",
    "default_substeps",
    "FKSimulator",
]


class FKParams(eqx.Module):
    """Growth parameters (scalars, or arrays with a leading batch axis under vmap).

    Attributes:
        dw: white-matter diffusivity Dw, mm^2/day.
        rho: proliferation rate, 1/day.
        ratio: Dw / Dg, dimensionless (default 10).
        anisotropy: the tumour-tensor anisotropy r (dimensionless, >= 1), used only by
            an `AnisotropicFKSimulator` built from a `TumourTensorFamily` (r traced);
            other simulators ignore it.
    """

    dw: Array
    rho: Array
    ratio: Array = 10.0
    anisotropy: Array | None = None


class FKArgs(eqx.Module):
    """What the right-hand side needs: the diffusion operator and rho (1/day)."""

    diffusion: AbstractDiffusion
    rho: Array


def logistic_flow(c: Array, rho, dt) -> Array:
    """Exact solution of dc/dt = rho c (1 - c) after time dt (maps [0, 1] into itself)."""
    growth = jnp.expm1(rho * dt)
    return c * (1.0 + growth) / (1.0 + c * growth)


def fk_rhs(c: Float[Array, "n0 n1 n2"], faces: FaceCoefficients, rho) -> Array:
    """The FK right-hand side div(D grad c) + rho c (1 - c), 1/day."""
    return diffusion_operator(c, faces) + rho * c * (1.0 - c)


class LogisticSplitEuler(diffrax.AbstractSolver):
    """Euler step of the diffusion term, then the exact logistic flow over the same step.

    The term is the diffusion vector field; `args` must carry `rho` (an `FKArgs`).

    With `substeps` k > 1, each diffrax step is split into k equal split steps: the same
    scheme with k times fewer loop iterations. (diffrax divides [0, T] into
    m = ceil(T / dt0) equal steps; with dt0 = k dt that is m k steps of T / (m k) <= dt,
    identical to k = 1 when T is a multiple of k dt.) On a GPU each loop iteration costs a
    round of kernel launches and a device-to-host sync, which dominate on small grids.
    """

    substeps: int = eqx.field(static=True, default=1)

    term_structure: ClassVar = diffrax.AbstractTerm
    interpolation_cls: ClassVar = diffrax.LocalLinearInterpolation

    def order(self, terms):
        return 1

    def init(self, terms, t0, t1, y0, args):
        return None

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        del solver_state, made_jump
        h = (t1 - t0) / self.substeps
        y1 = y0
        for _ in range(self.substeps):
            y1 = logistic_flow(y1 + h * terms.vf(t0, y1, args), args.rho, h)
        return y1, None, dict(y0=y0, y1=y1), None, diffrax.RESULTS.successful

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args) + args.rho * y0 * (1.0 - y0)


def default_substeps() -> int:
    """Split steps per solver loop iteration: 8 on accelerators (launch-bound loops),
    1 on the CPU (no loop overhead worth the longer compile)."""
    return 1 if jax.default_backend() == "cpu" else 8


def _diffusion_field(t, c, args: FKArgs):
    return args.diffusion(c)


def check_time_step(dt: float, grid: Grid, d_max: float) -> None:
    """Raise ValueError if `dt` (days) is above the stability limit for diffusivity d_max."""
    limit = stability_limit(grid, d_max)
    if dt > limit:
        raise ValueError(
            f"time step dt={dt:.4g} days is above the explicit stability limit "
            f"{limit:.4g} days for D_max={d_max:.4g} mm^2/day on spacing {grid.spacing} mm; "
            f"use growth.stable_time_step(grid, d_max) (= {stable_time_step(grid, d_max):.4g})"
        )


def solve_fk(
    c0: Float[Array, "n0 n1 n2"],
    diffusion: AbstractDiffusion | FaceCoefficients,
    rho,
    t_final,
    *,
    dt,
    max_steps: int,
    save_times: Array | None = None,
    progress: bool = False,
    substeps: int | None = None,
) -> Array:
    """Integrate the FK equation from c0 over [0, t_final] days at a fixed step dt.

    Args:
        c0: initial density in [0, 1].
        diffusion: the diffusion operator (an `AbstractDiffusion`), or the isotropic face
            coefficients from `face_coefficients` (1/day).
        rho: proliferation rate, 1/day.
        t_final: end time, days (traced: differentiable).
        dt: fixed step, days; above the stability limit the solve raises at run time.
        max_steps: static bound on the number of steps (>= ceil(t_final / dt)).
        save_times: optional increasing times (days, <= t_final) to save at.
        progress: show a tqdm progress bar (through diffrax's progress meter).
        substeps: split steps per loop iteration (`LogisticSplitEuler`); None chooses
            `default_substeps()`. Same scheme; step sizes differ by < substeps / n_steps.

    Returns:
        The density at t_final, or stacked densities at `save_times` (leading axis).
    """
    if not isinstance(diffusion, AbstractDiffusion):
        diffusion = FaceDiffusion(tuple(diffusion))
    dt = jnp.asarray(dt, dtype=c0.dtype)
    dt = eqx.error_if(
        dt,
        dt * diffusion.rate_bound() > 1.0 + 1e-6,
        "FK time step above the explicit stability limit (dt * max outflow rate > 1): "
        "choose dt <= growth.stable_time_step(grid, d_max)",
    )
    k = default_substeps() if substeps is None else int(substeps)
    saveat = diffrax.SaveAt(t1=True) if save_times is None else diffrax.SaveAt(ts=save_times)
    solution = diffrax.diffeqsolve(
        diffrax.ODETerm(_diffusion_field),
        LogisticSplitEuler(substeps=k),
        t0=jnp.zeros((), c0.dtype),
        t1=jnp.asarray(t_final, c0.dtype),
        dt0=k * dt,
        y0=c0,
        args=FKArgs(diffusion=diffusion, rho=jnp.asarray(rho, c0.dtype)),
        saveat=saveat,
        stepsize_controller=diffrax.ConstantStepSize(),
        max_steps=-(-max_steps // k) + (k > 1),
        progress_meter=diffrax.TqdmProgressMeter() if progress else diffrax.NoProgressMeter(),
    )
    return solution.ys[-1] if save_times is None else solution.ys


class AbstractFKSimulator(eqx.Module):
    """(params, origin, time) -> density for a fixed anatomy, step and step bound.

    Subclasses give the discretised diffusion operator for a parameter set and the
    initial density; calling one turns Python numbers into arrays first, so new values
    never recompile, and is `jax.vmap`-able and differentiable in all arguments.
    """

    @abc.abstractmethod
    def diffusion(self, params: FKParams) -> AbstractDiffusion:
        """The discretised diffusion operator for these parameters."""

    @abc.abstractmethod
    def initial_density(self, origin_mm) -> Array:
        """The seed at `origin_mm` (grid mm), zero outside tissue."""

    @property
    @abc.abstractmethod
    def dtype(self):
        """The floating dtype of the solve."""

    @property
    def t_max(self) -> float:
        """Longest simulated time this simulator is built for, days."""
        return self.dt * (self.max_steps - 1)

    def __call__(self, params: FKParams, origin_mm, t_final, save_times=None) -> Array:
        """Density after `t_final` days from a seed at `origin_mm` (grid mm, 3 values);
        with `save_times` (days), the densities at those times, stacked."""
        as_array = lambda x: jnp.asarray(x, self.dtype)  # noqa: E731
        return _simulate(
            self,
            jax.tree.map(as_array, params),
            as_array(origin_mm),
            as_array(t_final),
            None if save_times is None else as_array(save_times),
        )


@eqx.filter_jit
def _simulate(sim: AbstractFKSimulator, params: FKParams, origin_mm, t_final, save_times):
    return solve_fk(
        sim.initial_density(origin_mm),
        sim.diffusion(params),
        params.rho,
        t_final,
        dt=sim.dt,
        max_steps=sim.max_steps,
        save_times=save_times,
        progress=sim.progress,
        substeps=sim.substeps,
    )


class FKSimulator(AbstractFKSimulator):
    """A tissue-specific FK forward model: (params, origin, time) -> density.

    Build it once with `FKSimulator.create`; calling it with new parameter values never
    recompiles (the step and the step bound are fixed at creation), and it can be
    `jax.vmap`ped over parameters, origins and times and differentiated with respect to
    all of them.

    Attributes:
        wm, gm: tissue probabilities, shape `grid.shape`, in [0, 1].
        grid: the grid (spacing in mm).
        dt: fixed time step, days.
        max_steps: bound on steps per solve (t_final <= dt * max_steps).
        seed: the initial condition.
        progress: show a progress bar during each solve.
        substeps: split steps per solver loop iteration (None: `default_substeps()`).
    """

    wm: Array
    gm: Array
    grid: Grid = eqx.field(static=True)
    dt: float = eqx.field(static=True)
    max_steps: int = eqx.field(static=True)
    seed: GaussianSeed = eqx.field(static=True, default=GaussianSeed())
    progress: bool = eqx.field(static=True, default=False)
    substeps: int | None = eqx.field(static=True, default=None)

    @classmethod
    def create(
        cls,
        wm,
        gm,
        grid: Grid,
        *,
        dw_max: float,
        t_max: float,
        dt: float | None = None,
        safety: float = 0.9,
        seed: GaussianSeed = GaussianSeed(),
        dtype=jnp.float32,
        progress: bool = False,
    ) -> "FKSimulator":
        """Choose the step for diffusivities up to `dw_max` (mm^2/day) and times up to
        `t_max` (days); an explicit `dt` above the limit is refused with ValueError.

        The bound assumes ratio >= 1 (grey matter diffuses no faster than white).
        """
        wm = jnp.asarray(wm, dtype)
        gm = jnp.asarray(gm, dtype)
        for name, arr in (("wm", wm), ("gm", gm)):
            if arr.shape != grid.shape:
                raise ValueError(f"{name} has shape {arr.shape}, grid is {grid.shape}")
        d_max = float(dw_max) * float(jnp.max(wm + gm))
        if dt is None:
            dt = stable_time_step(grid, d_max, safety)
        else:
            check_time_step(float(dt), grid, d_max)
        # One step of slack: accumulated float32 times can fall a hair short of t_max.
        max_steps = math.ceil(float(t_max) / float(dt)) + 1
        return cls(
            wm=wm, gm=gm, grid=grid, dt=float(dt), max_steps=max_steps, seed=seed, progress=progress
        )

    @property
    def dtype(self):
        return self.wm.dtype

    def diffusivity(self, params: FKParams) -> Array:
        """D(x), mm^2/day."""
        return tissue_diffusivity(self.wm, self.gm, params.dw, params.ratio)

    def initial_density(self, origin_mm) -> Array:
        """The seed at `origin_mm` (grid mm), zero outside tissue."""
        c0 = self.seed(self.grid, origin_mm, self.wm.dtype)
        return jnp.where(self.wm + self.gm > 0, c0, 0.0)

    def diffusion(self, params: FKParams) -> FaceDiffusion:
        """The 6-neighbour flux-form operator for these parameters."""
        return FaceDiffusion(face_coefficients(self.diffusivity(params), self.grid))
