"""Gradients, vmap and compilation behaviour of the FK solver."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import growth.solver
from growth import FKParams, FKSimulator, GaussianSeed, Grid, soft_visible_masks, visible_masks

GRID = Grid((14, 12, 10), (1.0, 1.1, 1.3))


def _tissue(dtype):
    rng = np.random.default_rng(3)
    wm = rng.uniform(0.2, 1.0, GRID.shape)
    gm = 1.0 - wm
    wm[:2] = gm[:2] = 0.0  # some CSF
    return jnp.asarray(wm, dtype), jnp.asarray(gm, dtype)


def test_gradients_match_central_finite_differences():
    with jax.enable_x64(True):
        wm, gm = _tissue(jnp.float64)
        sim = FKSimulator.create(wm, gm, GRID, dw_max=0.5, t_max=12.0, dtype=jnp.float64)
        weights = jnp.asarray(np.random.default_rng(4).uniform(0, 1, GRID.shape))
        origin = jnp.array([7.3, 6.1, 5.9])
        c0 = np.asarray(sim.initial_density(origin))
        # No seed voxel sits on the 0.1 cut, where a finite difference would jump.
        assert np.all(np.abs(c0[c0 > 0] - 0.1) > 1e-4)

        def loss(theta):
            params = FKParams(dw=theta[0], rho=theta[1], ratio=theta[2])
            return jnp.sum(weights * sim(params, theta[3:6], theta[6]))

        theta = jnp.array([0.3, 0.08, 6.0, *origin, 11.35])
        grad = np.asarray(jax.grad(loss)(theta))
        names = ["dw", "rho", "ratio", "origin_x", "origin_y", "origin_z", "time"]
        for k, name in enumerate(names):
            eps = 1e-5 * max(1.0, abs(float(theta[k])))
            step = jnp.zeros_like(theta).at[k].set(eps)
            fd = (float(loss(theta + step)) - float(loss(theta - step))) / (2 * eps)
            assert grad[k] == pytest.approx(fd, rel=1e-4), name
            assert abs(fd) > 1e-6, name  # a real dependence, not 0 == 0


def test_parameter_sweep_compiles_once(monkeypatch):
    traces = []
    original = growth.solver.solve_fk

    def counting_solve(*args, **kwargs):
        traces.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(growth.solver, "solve_fk", counting_solve)
    wm, gm = _tissue(jnp.float32)
    sim = FKSimulator.create(wm, gm, GRID, dw_max=1.0, t_max=30.0)
    origin = jnp.array([7.0, 6.0, 6.0])
    results = [
        sim(FKParams(dw, rho, 10.0), origin, t)  # plain Python numbers: still traced
        for dw, rho, t in [(0.2, 0.05, 10.0), (0.5, 0.1, 20.0), (1.0, 0.02, 30.0)]
    ]
    assert len(traces) == 1
    assert not np.allclose(results[0], results[1])
    # A fresh simulator on other tissue with the same grid and step reuses the compiled solve.
    other = FKSimulator.create(jnp.flip(wm, 0), jnp.flip(gm, 0), GRID, dw_max=1.0, t_max=30.0)
    assert other.dt == sim.dt
    other(FKParams(jnp.float32(0.3), jnp.float32(0.1), jnp.float32(10.0)), origin, jnp.float32(5))
    assert len(traces) == 1


def test_vmap_over_parameters_matches_single_solves():
    wm, gm = _tissue(jnp.float32)
    sim = FKSimulator.create(wm, gm, GRID, dw_max=1.0, t_max=25.0)
    params = FKParams(
        dw=jnp.array([0.1, 0.4, 0.9, 1.0]),
        rho=jnp.array([0.2, 0.05, 0.1, 0.01]),
        ratio=jnp.array([10.0, 5.0, 20.0, 10.0]),
    )
    origins = jnp.array([[7.0, 6.0, 6.0], [5.0, 5.0, 5.0], [9.0, 6.0, 4.0], [7.0, 7.0, 7.0]])
    times = jnp.array([25.0, 10.0, 17.5, 5.0])
    batch = jax.vmap(sim)(params, origins, times)
    assert batch.shape == (4, *GRID.shape)
    for i in range(4):
        single = sim(jax.tree.map(lambda x: x[i], params), origins[i], times[i])
        np.testing.assert_allclose(batch[i], single, atol=1e-6)


def test_seed_shape_and_cut():
    seed = GaussianSeed()
    c0 = np.asarray(seed(Grid((21, 21, 21)), jnp.array([10.0, 10.0, 10.0])))
    assert c0.max() == pytest.approx(0.5)
    assert c0[c0 > 0].min() >= 0.1
    # Radius of the cut: 0.5 exp(-r^2 / (2 sigma^2)) = 0.1.
    r_cut = 3.2 * np.sqrt(2 * np.log(5))
    assert c0[10, 10, 10 + int(np.floor(r_cut))] > 0 and c0[10, 10, 10 + int(np.ceil(r_cut))] == 0


def test_imaging_model_hard_and_soft_thresholds():
    c = jnp.array([0.0, 0.05, 0.2, 0.59, 0.6, 0.95])
    core, edema = visible_masks(c, 0.6, 0.1)
    assert core.tolist() == [False, False, False, False, True, True]
    assert edema.tolist() == [False, False, True, True, False, False]
    soft_core, soft_edema = soft_visible_masks(c, 0.6, 0.1, width=1e-4)
    np.testing.assert_allclose(soft_core, [0, 0, 0, 0, 0.5, 1], atol=1e-6)
    np.testing.assert_allclose(soft_edema, [0, 0, 1, 1, 0.5, 0], atol=1e-6)
    grad = jax.grad(lambda u: jnp.sum(soft_visible_masks(c, u, 0.1)[0]))(0.6)
    assert float(grad) < 0  # raising the T1 threshold shrinks the core
