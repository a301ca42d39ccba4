"""The anisotropic fit: growth.fit.refine through the Selling stencil, and rtjax fit_case."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from growth import (
    FKParams,
    FKSimulator,
    Grid,
    tensor_from_direction,
    tumour_tensor_family,
    visible_masks,
)
from growth.anisotropic import AnisotropicFKSimulator
from growth.fit import FitConfig, FitEstimate, _step, heuristic_estimate, mask_loss, refine
from rtjax.fit import fit_case
from rtjax.labels import TumourMasks

GRID = Grid((26, 26, 24), (2.0, 2.0, 2.0))
DIRECTION = np.array([1.0, 0.5, 0.3]) / np.linalg.norm([1.0, 0.5, 0.3])  # off every grid axis
R_RANGE = (1.0, 8.0)
TRUTH = {"origin": np.array([26.0, 26.0, 23.0]), "dw_t": 25.0, "rho_t": 9.0, "u_t1": 0.7,
         "u_fl": 0.2, "r": 4.0}


def _tissue(shape, seed=0):
    rng = np.random.default_rng(seed)
    wm = np.clip(gaussian_filter(rng.uniform(size=shape), 2) * 4 - 1.2, 0, 1).astype(np.float32)
    wm = np.clip(wm + 0.3, 0, 1)
    return wm, (0.9 * (1 - wm)).astype(np.float32)


def _uniform_dti(shape, fa=0.6):
    direction = jnp.broadcast_to(jnp.asarray(DIRECTION, jnp.float32)[:, None, None, None], (3, *shape))
    return np.asarray(tensor_from_direction(jnp.full(shape, fa), direction))


@pytest.fixture(scope="module")
def anisotropic_case():
    """Masks of a tumour grown along a uniform off-axis fibre field with r = 4."""
    wm, gm = _tissue(GRID.shape)
    dti = _uniform_dti(GRID.shape)
    family = tumour_tensor_family(dti, R_RANGE)
    sim = AnisotropicFKSimulator.create(wm, gm, family, GRID, dw_max=TRUTH["dw_t"], t_max=1.0)
    params = FKParams(TRUTH["dw_t"], TRUTH["rho_t"], anisotropy=TRUTH["r"])
    density = np.asarray(sim(params, TRUTH["origin"], 1.0))
    core, edema = (np.asarray(m) for m in visible_masks(density, TRUTH["u_t1"], TRUTH["u_fl"]))
    return wm, gm, dti, family, core, edema


def test_anisotropic_fit_recovers_known_parameters_and_the_anisotropy(anisotropic_case):
    wm, gm, _, family, core, edema = anisotropic_case
    initial = heuristic_estimate(core, edema, GRID.spacing)  # r starts at sqrt(1 * 8)
    result = refine(core, edema, wm, gm, GRID, initial, shape_tensor=family,
                    config=FitConfig(max_iterations=70, prior_weight=0.0))
    est = result.estimate
    assert result.details["anisotropic"] and result.details["anisotropy_fitted"]
    assert result.details["anisotropy_box"] == list(R_RANGE)
    assert float(est.anisotropy) == pytest.approx(TRUTH["r"], rel=0.2)
    assert np.linalg.norm(np.asarray(est.origin_mm) - TRUTH["origin"]) < 2.0  # mm
    assert float(est.sqrt_dw_t) ** 2 == pytest.approx(TRUTH["dw_t"], rel=0.35)
    assert float(est.sqrt_rho_t) ** 2 == pytest.approx(TRUTH["rho_t"], rel=0.35)
    assert result.dice_core > 0.95 and result.dice_edema > 0.9
    assert est.as_dict()["anisotropy"] == pytest.approx(float(est.anisotropy))


def test_isotropic_tensor_gives_the_isotropic_fit():
    # uniform tissue around a CSF hole: the isotropic operator's step bound (2 sum_k max
    # face) equals the stencil's exact one, so both fits take the same steps
    grid = Grid((16, 16, 14), (2.0, 2.0, 2.0))
    wm = np.full(grid.shape, 0.8, np.float32)
    wm[1:4, 2:6, 1:4] = 0.0
    gm = np.where(wm > 0, 0.15, 0.0).astype(np.float32)
    origin = np.array([17.0, 16.0, 14.0])
    sim = FKSimulator.create(wm, gm, grid, dw_max=9.0, t_max=1.0)
    density = np.asarray(sim(FKParams(9.0, 9.0), origin, 1.0))
    core, edema = (np.asarray(m) for m in visible_masks(density, 0.7, 0.2))
    initial = heuristic_estimate(core, edema, grid.spacing)
    config = FitConfig(max_iterations=10, prior_weight=0.0)
    iso = refine(core, edema, wm, gm, grid, initial, config=config)
    identity = np.broadcast_to(np.array([1.0, 0, 0, 1, 0, 1], np.float32)[:, None, None, None],
                               (6, *grid.shape))
    fixed = refine(core, edema, wm, gm, grid, initial, config=config, shape_tensor=identity)
    # Westin's construction keeps an isotropic DTI isotropic for every r: r gets no
    # gradient beyond the round-off of the eigen-decomposition
    family = tumour_tensor_family(identity * 7e-4, R_RANGE, method="westin")
    fitted_r = refine(core, edema, wm, gm, grid, initial.with_anisotropy(3.0), config=config,
                      shape_tensor=family)
    assert fixed.details["stencil_offsets"] == 3 and not iso.details["anisotropic"]
    for result in (fixed, fitted_r):
        np.testing.assert_allclose(result.loss_curve, iso.loss_curve, rtol=1e-4, atol=1e-5)
        est = result.estimate
        np.testing.assert_allclose(np.asarray(est.origin_mm), np.asarray(iso.estimate.origin_mm),
                                   atol=0.01)
        for name in ("sqrt_dw_t", "sqrt_rho_t", "u_t1", "u_fl"):
            assert float(getattr(est, name)) == pytest.approx(float(getattr(iso.estimate, name)),
                                                              rel=1e-3), name
    assert float(fitted_r.estimate.anisotropy) == pytest.approx(3.0, rel=1e-3)


def test_fit_loss_gradient_matches_finite_differences_through_the_stencil():
    """d(soft-Dice loss)/d(Dw, rho, r, origin) through a family stencil that has sparse
    long-offset pairs and dense rows, in float64."""
    grid = Grid((12, 11, 10), (1.5, 1.5, 1.5))
    wm, gm = _tissue(grid.shape, seed=2)
    rng = np.random.default_rng(3)
    direction = gaussian_filter(rng.normal(size=(3, *grid.shape)), (0, 2, 2, 2))
    with jax.enable_x64(True):
        dti = tensor_from_direction(jnp.full(grid.shape, 0.85, jnp.float64), jnp.asarray(direction))
        family = tumour_tensor_family(dti, (1.5, 6.0))
        sim = AnisotropicFKSimulator.create(wm, gm, family, grid, dw_max=3.0, t_max=1.0,
                                            dtype=jnp.float64, dense_fraction=0.2)
        assert sim.selling.pair_lower.size > 0 and len(sim.selling.dense_offsets) > 3
        core = jnp.asarray(np.zeros(grid.shape), jnp.float64).at[5:8, 4:7, 4:6].set(1.0)
        edema = jnp.asarray(np.zeros(grid.shape), jnp.float64).at[3:10, 3:9, 2:8].set(1.0) - core
        config = FitConfig(soft_width=0.05)

        def loss(theta):
            est = FitEstimate(origin_mm=theta[3:6], sqrt_dw_t=jnp.sqrt(theta[0]),
                              sqrt_rho_t=jnp.sqrt(theta[1]), u_t1=jnp.float64(0.6),
                              u_fl=jnp.float64(0.2), anisotropy=theta[2])
            density = sim(est.params(), est.origin_mm, 1.0)
            return mask_loss(density, est, core, edema, config)

        theta = jnp.array([2.0, 6.0, 3.0, 9.1, 8.2, 7.3])
        grad = np.asarray(jax.grad(loss)(theta))
        for k in range(6):
            eps = 1e-5 * max(1.0, abs(float(theta[k])))
            step = jnp.zeros_like(theta).at[k].set(eps)
            fd = (float(loss(theta + step)) - float(loss(theta - step))) / (2 * eps)
            assert grad[k] == pytest.approx(fd, rel=1e-4, abs=1e-9), k
        assert abs(grad[2]) > 1e-4  # r moves the loss


def test_new_parameter_values_do_not_recompile_the_anisotropic_step(anisotropic_case):
    wm, gm, _, family, core, edema = anisotropic_case
    start = heuristic_estimate(core, edema, GRID.spacing)
    config = FitConfig(max_iterations=2, patience=10)
    refine(core, edema, wm, gm, GRID, start, config=config, shape_tensor=family)
    compiled = _step._cached._cache_size()
    other = FitEstimate(origin_mm=start.origin_mm + 3.0, sqrt_dw_t=start.sqrt_dw_t,
                        sqrt_rho_t=start.sqrt_rho_t * 1.3, u_t1=jnp.float32(0.6),
                        u_fl=jnp.float32(0.3), anisotropy=jnp.float32(2.0))
    refine(core, edema, wm, gm, GRID, other, config=config, shape_tensor=family)
    assert _step._cached._cache_size() == compiled


def test_fit_case_with_a_tensor_fits_r_and_records_it(anisotropic_case):
    wm, gm, dti, _, core, edema = anisotropic_case
    masks = TumourMasks(necrosis=np.zeros_like(core), enhancing=core, edema=edema)
    config = FitConfig(max_iterations=30)
    fit = fit_case(masks, wm, gm, GRID.spacing, initial="heuristic", config=config,
                   margin_mm=10.0, tensor=dti, anisotropy=R_RANGE)
    record = fit.info["anisotropic"]
    assert record["tensor_given"] and record["anisotropy_fitted"]
    assert record["anisotropy_bounds"] == list(R_RANGE)
    assert R_RANGE[0] <= record["anisotropy"] <= R_RANGE[1]
    assert record["tensor_method"] == "scaled" and record["stencil_offsets"] >= 3
    assert fit.info["scaled_parameters"]["anisotropy"] == record["anisotropy"]
    # the anisotropic stage starts from the isotropic fit and improves on it
    assert fit.info["dice_core_working_grid"] >= record["isotropic_stage"]["dice_core_working_grid"]
    assert fit.info["dice_core"] > 0.8
    iso = fit_case(masks, wm, gm, GRID.spacing, initial="heuristic", margin_mm=10.0,
                   config=FitConfig(max_iterations=2))
    assert iso.info["anisotropic"] == {"tensor_given": False}
    with pytest.raises(ValueError, match="tensor has shape"):
        fit_case(masks, wm, gm, GRID.spacing, initial="heuristic", config=config,
                 tensor=dti[:3], anisotropy=2.0)
