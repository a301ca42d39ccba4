"""The anisotropic (full-tensor) FK solver against analytic results and the isotropic one."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from growth import (
    FKParams,
    FKSimulator,
    GaussianSeed,
    Grid,
    tensor_from_direction,
    tumour_tensor,
    tumour_tensor_family,
)
from growth.anisotropic import (
    AnisotropicFKSimulator,
    StencilDiffusion,
    line_of_sight,
    selling_decomposition,
    tensor_stencil,
)


def _components(matrices: np.ndarray) -> np.ndarray:
    """(..., 3, 3) -> (6, ...) in the order xx, xy, xz, yy, yz, zz."""
    m = np.moveaxis(matrices, (-2, -1), (0, 1))
    return np.stack([m[0, 0], m[0, 1], m[0, 2], m[1, 1], m[1, 2], m[2, 2]])


def _uniform(matrix: np.ndarray, shape) -> np.ndarray:
    return _components(np.broadcast_to(matrix, (*shape, 3, 3)).copy())


def _random_rotations(rng, n):
    q, r = np.linalg.qr(rng.normal(size=(n, 3, 3)))
    return q * np.sign(np.diagonal(r, axis1=1, axis2=2))[:, None, :]


def _fa(eigenvalues):
    ev = np.asarray(eigenvalues, float)
    return np.sqrt(1.5 * ((ev - ev.mean()) ** 2).sum() / (ev**2).sum())


def test_selling_decomposition_reproduces_the_tensor_with_nonnegative_weights():
    rng = np.random.default_rng(0)
    rot = _random_rotations(rng, 500)
    eigen = np.array([1.0, 0.05, 0.03])
    matrices = np.einsum("nij,j,nkj->nik", rot, eigen, rot)
    offsets, weights = selling_decomposition(matrices)
    rebuilt = np.einsum("ni,nia,nib->nab", weights, offsets, offsets)
    np.testing.assert_allclose(rebuilt, matrices, atol=1e-12)
    assert (weights >= 0).all()
    # The identity decomposes onto the three axes.
    offsets, weights = selling_decomposition(np.eye(3)[None])
    used = {tuple(abs(o)) for o, w in zip(offsets[0], weights[0]) if w > 0}
    assert used == {(1, 0, 0), (0, 1, 0), (0, 0, 1)}


def _tissue(grid, seed=0):
    rng = np.random.default_rng(seed)
    wm = rng.uniform(0, 1, grid.shape)
    gm = (1 - wm) * rng.uniform(0.3, 1, grid.shape)
    csf = rng.uniform(0, 1, grid.shape) < 0.1
    wm[csf] = gm[csf] = 0
    return wm.astype(np.float32), gm.astype(np.float32)


def test_isotropic_tensor_reproduces_the_isotropic_solver():
    grid = Grid((20, 18, 16), (1.0, 1.2, 0.9))
    wm, gm = _tissue(grid)
    identity = _uniform(np.eye(3), grid.shape)
    params, origin = FKParams(0.6, 0.08, 7.0), jnp.array([10.0, 10.0, 7.0])
    aniso = AnisotropicFKSimulator.create(wm, gm, identity, grid, dw_max=0.6, t_max=60.0)
    iso = FKSimulator.create(wm, gm, grid, dw_max=0.6, t_max=60.0, dt=aniso.dt)
    assert aniso.offsets == ((1, 0, 0), (0, 1, 0), (0, 0, 1))
    diff = jnp.abs(aniso(params, origin, 60.0) - iso(params, origin, 60.0)).max()
    assert float(diff) < 1e-5


def test_gaussian_second_moments_grow_as_2dt_along_each_eigenvector():
    grid = Grid((41, 41, 41), (1.0, 1.0, 1.0))
    v1 = np.array([1.0, 1.0, 1.0]) / np.sqrt(3)  # principal axis along a diagonal
    v2 = np.array([1.0, -1.0, 0.0]) / np.sqrt(2)
    v3 = np.cross(v1, v2)
    eigen = np.array([1.0, 0.2, 0.2])  # mm^2/day
    matrix = sum(lam * np.outer(v, v) for lam, v in zip(eigen, (v1, v2, v3)))
    wm = np.ones(grid.shape, np.float32)
    t, sigma0 = 6.0, 2.0
    sim = AnisotropicFKSimulator.create(
        wm, 0 * wm, _uniform(matrix, grid.shape), grid, dw_max=1.0, t_max=t,
        seed=GaussianSeed(sigma=sigma0, cutoff=0.0),
    )
    centre = np.array([20.0, 20.0, 20.0])
    c = np.asarray(sim(FKParams(1.0, 0.0, 10.0), jnp.asarray(centre), t), np.float64)
    x = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in grid.shape], indexing="ij"), -1)
    x -= centre
    second = np.einsum("ijka,ijkb,ijk->ab", x, x, c) / c.sum()
    for lam, v in zip(eigen, (v1, v2, v3)):
        assert v @ second @ v - sigma0**2 == pytest.approx(2 * lam * t, rel=0.03)


def _anisotropic_field(grid, rng, eigen=(1.0, 0.1, 0.1)):
    """Random orientations per voxel, fixed eigenvalues, trace normalised to 3."""
    ev = np.asarray(eigen) * 3 / np.sum(eigen)
    rot = _random_rotations(rng, int(np.prod(grid.shape)))
    matrices = np.einsum("nij,j,nkj->nik", rot, ev, rot).reshape(*grid.shape, 3, 3)
    return _components(matrices)


def test_density_stays_nonnegative_and_bounded_at_fa_09():
    eigen = (1.0, 0.095, 0.095)
    assert _fa(eigen) > 0.89
    grid = Grid((14, 14, 14), (1.0, 1.0, 1.0))
    wm, gm = _tissue(grid, seed=1)
    field = _anisotropic_field(grid, np.random.default_rng(2), eigen)
    sim = AnisotropicFKSimulator.create(wm, gm, field, grid, dw_max=1.0, t_max=25.0, safety=1.0)
    c = sim(FKParams(1.0, 0.5, 10.0), jnp.array([7.0, 7.0, 7.0]), 25.0)
    assert float(c.min()) >= 0.0 and float(c.max()) <= 1.0
    assert float(c.max()) > 0.9


def test_mass_is_conserved_without_proliferation():
    grid = Grid((16, 14, 12), (1.0, 0.8, 1.3))
    wm, gm = _tissue(grid, seed=3)
    field = _anisotropic_field(grid, np.random.default_rng(4), (1.0, 0.3, 0.2))
    sim = AnisotropicFKSimulator.create(wm, gm, field, grid, dw_max=0.5, t_max=30.0)
    origin = jnp.array([8.0, 6.0, 7.0])
    c0 = np.asarray(sim.initial_density(origin), np.float64)
    c = np.asarray(sim(FKParams(0.5, 0.0, 10.0), origin, 30.0), np.float64)
    assert np.abs(c - c0).max() > 0.05
    assert abs(c.sum() - c0.sum()) / c0.sum() < 1e-5


def test_permuting_axes_of_tensor_and_seed_permutes_the_solution():
    grid = Grid((14, 12, 10), (1.0, 1.0, 1.0))
    rng = np.random.default_rng(5)
    wm, gm = _tissue(grid, seed=5)
    field = _anisotropic_field(grid, rng, (1.0, 0.3, 0.2))
    perm = (2, 0, 1)
    matrices = np.stack([
        np.stack([field[0], field[1], field[2]], -1),
        np.stack([field[1], field[3], field[4]], -1),
        np.stack([field[2], field[4], field[5]], -1),
    ], -2)
    permuted = np.transpose(matrices, (*perm, 3, 4))[..., perm, :][..., :, perm]
    pgrid = Grid(tuple(grid.shape[p] for p in perm))
    origin = np.array([7.0, 5.0, 4.0])
    params = FKParams(0.4, 0.1, 10.0)
    sim = AnisotropicFKSimulator.create(wm, gm, field, grid, dw_max=0.4, t_max=20.0)
    psim = AnisotropicFKSimulator.create(
        np.transpose(wm, perm), np.transpose(gm, perm), _components(permuted), pgrid,
        dw_max=0.4, t_max=20.0, dt=sim.dt,
    )
    c = sim(params, jnp.asarray(origin), 20.0)
    pc = psim(params, jnp.asarray(origin[list(perm)]), 20.0)
    np.testing.assert_allclose(np.transpose(np.asarray(c), perm), np.asarray(pc), atol=1e-6)


@pytest.mark.parametrize("dense_fraction", [0.0, 1.1])  # long offsets as dense rows / as pairs
def test_thin_barriers_are_not_jumped_by_long_offsets(dense_fraction):
    grid = Grid((24, 24, 6), (1.0, 1.0, 1.0))
    wm = np.ones(grid.shape, np.float32)
    wm[12] = 0.0  # a one-voxel CSF sheet
    direction = np.array([1.0, 0.5, 0.0]) / np.linalg.norm([1.0, 0.5, 0.0])
    matrix = 0.05 * np.eye(3) + 2.85 * np.outer(direction, direction)
    sim = AnisotropicFKSimulator.create(
        wm, 0 * wm, _uniform(matrix, grid.shape), grid, dw_max=1.0, t_max=60.0,
        dense_fraction=dense_fraction,
    )
    assert max(max(abs(v) for v in e) for e in sim.offsets) >= 2  # long offsets in use
    longest = max(max(abs(v) for v in e) for e in sim.selling.dense_offsets)
    assert (longest >= 2) == (dense_fraction == 0.0)
    c = np.asarray(sim(FKParams(1.0, 0.2, 10.0), jnp.array([6.0, 12.0, 3.0]), 60.0))
    assert c[:12].max() > 0.5
    assert np.all(c[12:] == 0.0)


def test_gradients_flow_through_the_anisotropic_solver():
    grid = Grid((10, 10, 8), (1.0, 1.0, 1.0))
    wm, gm = _tissue(grid, seed=6)
    with jax.enable_x64(True):
        field = _anisotropic_field(grid, np.random.default_rng(7), (1.0, 0.3, 0.3))
        sim = AnisotropicFKSimulator.create(wm, gm, field, grid, dw_max=0.5, t_max=10.0,
                                            dtype=jnp.float64)

        def loss(theta):
            return jnp.sum(sim(FKParams(theta[0], theta[1], theta[2]), theta[3:6], 10.0) ** 2)

        theta = jnp.array([0.3, 0.1, 6.0, 5.2, 4.9, 3.7])
        grad = np.asarray(jax.grad(loss)(theta))
        for k in range(6):
            eps = 1e-5 * max(1.0, abs(float(theta[k])))
            step = jnp.zeros_like(theta).at[k].set(eps)
            fd = (float(loss(theta + step)) - float(loss(theta - step))) / (2 * eps)
            assert grad[k] == pytest.approx(fd, rel=1e-4)


def test_stencil_weights_rebuild_the_tensor_in_voxel_units():
    grid = Grid((3, 3, 3), (1.0, 2.0, 0.5))
    matrix = np.array([[1.0, 0.3, 0.1], [0.3, 0.8, -0.2], [0.1, -0.2, 0.5]])
    stencil = tensor_stencil(_uniform(matrix, grid.shape), grid.spacing)
    offsets = np.array(stencil.offsets, float)
    weights = np.asarray(stencil.weights)[:, 1, 1, 1]
    rebuilt = np.einsum("i,ia,ib->ab", weights, offsets, offsets)
    h = np.diag(grid.spacing)
    np.testing.assert_allclose(h @ rebuilt @ h, matrix, rtol=1e-6, atol=1e-7)


def _reference_operator(wm, gm, field, grid, params):
    """The previous dense operator: every offset of the field as a full row at x and x+e."""
    stencil = tensor_stencil(field * wm[None], grid.spacing)
    weights = np.asarray(stencil.weights, np.float64).copy()
    inv_h2 = 1.0 / np.asarray(grid.spacing) ** 2
    weights[:3] += gm[None] / params.ratio * inv_h2[:, None, None, None]
    sight = line_of_sight(wm + gm, stencil.offsets)
    return StencilDiffusion.from_voxel_weights(jnp.asarray(params.dw * weights, jnp.float32),
                                               stencil.offsets, tuple(jnp.asarray(m) for m in sight))


@pytest.mark.parametrize("dense_fraction", [0.05, math.inf])  # default; the fit layout
def test_compact_operator_equals_the_dense_one_on_random_fields(dense_fraction):
    grid = Grid((13, 12, 11), (1.0, 1.3, 0.8))
    wm, gm = _tissue(grid, seed=8)
    field = _anisotropic_field(grid, np.random.default_rng(9), (1.0, 0.06, 0.05))
    params = FKParams(0.7, 0.0, 4.0)
    sim = AnisotropicFKSimulator.create(wm, gm, field, grid, dw_max=1.0, t_max=1.0,
                                        dense_fraction=dense_fraction)
    compact = sim.diffusion(params)
    reference = _reference_operator(wm, gm, field, grid, params)
    # (the reference also carries offsets no pair of voxels shares: all-zero rows)
    assert set(sim.offsets) <= set(reference.offsets)
    assert any(max(abs(v) for v in e) >= 2 for e in sim.offsets)
    assert compact.pair_weight.size > 0
    if dense_fraction > 1:
        assert len(compact.offsets) == 3
    c = jnp.asarray(np.random.default_rng(10).uniform(size=grid.shape), jnp.float32)
    scale = float(jnp.abs(reference(c)).max())
    np.testing.assert_allclose(np.asarray(compact(c)), np.asarray(reference(c)), atol=2e-6 * scale)
    np.testing.assert_allclose(np.asarray(compact.outflow_rate()),
                               np.asarray(reference.outflow_rate()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["scaled", "westin"])
def test_tensor_family_reproduces_the_tumour_tensor_over_its_range(method):
    rng = np.random.default_rng(11)
    dti = _anisotropic_field(Grid((5, 4, 3)), rng, (1.0, 0.5, 0.2)) * 1e-3
    dti[:, 0, 0, 0] = 0.0  # background: identity
    family = tumour_tensor_family(dti, (1.5, 7.0), method=method)
    for r in (1.5, 2.2, 4.0, 7.0):
        np.testing.assert_allclose(np.asarray(family(r)),
                                   np.asarray(tumour_tensor(dti, anisotropy=r, method=method)),
                                   atol=2e-6)
        a = np.asarray(family.mixing(r))
        assert np.all((a >= -1e-6) & (a <= 1 + 1e-6))
    with pytest.raises(ValueError, match="r_lo < r_hi"):
        tumour_tensor_family(dti, (3.0, 3.0))


def test_family_stencil_rebuilds_the_tensor_at_every_anisotropy():
    """The mixed Selling weights of a family reproduce wm * A(r) exactly (voxel units)."""
    grid = Grid((6, 5, 4), (1.0, 2.0, 1.5))
    rng = np.random.default_rng(12)
    wm = rng.uniform(0.2, 1.0, grid.shape).astype(np.float32)
    direction = rng.normal(size=(3, *grid.shape))
    dti = tensor_from_direction(jnp.full(grid.shape, 0.5), jnp.asarray(direction))
    family = tumour_tensor_family(dti, (1.0, 4.0))
    sim = AnisotropicFKSimulator.create(wm, 0 * wm, family, grid, dw_max=1.0, t_max=1.0,
                                        dense_fraction=0.0)
    offsets = np.array(sim.selling.dense_offsets, float)
    h = np.diag(grid.spacing)
    for r in (1.0, 2.5, 4.0):
        dense, _, _ = sim.voxel_weights(FKParams(1.0, 0.0, 10.0, anisotropy=r))
        rebuilt = np.einsum("e...,ea,eb->...ab", np.asarray(dense, np.float64), offsets, offsets)
        shape = np.asarray(family(r), np.float64) * wm[None]
        expected = np.stack([shape[[0, 1, 2]], shape[[1, 3, 4]], shape[[2, 4, 5]]], -1)
        expected = np.moveaxis(expected, 0, -2)
        np.testing.assert_allclose(h @ rebuilt @ h, expected, rtol=1e-5, atol=1e-6)


def test_dense_long_offset_rows_equal_the_dense_operator_across_a_csf_sheet():
    grid = Grid((14, 13, 5), (1.0, 1.0, 1.2))
    wm = np.full(grid.shape, 0.9, np.float32)
    wm[7] = 0.0  # one-voxel CSF sheet: long pairs across it are cut by line of sight
    gm = np.where(wm > 0, 0.05, 0.0).astype(np.float32)
    direction = np.array([1.0, 0.45, 0.1]) / np.linalg.norm([1.0, 0.45, 0.1])
    field = _uniform(0.05 * np.eye(3) + 2.85 * np.outer(direction, direction), grid.shape)
    params = FKParams(0.5, 0.0, 10.0)
    sim = AnisotropicFKSimulator.create(wm, gm, field, grid, dw_max=1.0, t_max=1.0,
                                        dense_fraction=0.0)
    compact = sim.diffusion(params)
    assert compact.pair_weight.size == 0 and max(max(map(abs, e)) for e in compact.offsets) >= 2
    reference = _reference_operator(wm, gm, field, grid, params)
    c = jnp.asarray(np.random.default_rng(13).uniform(size=grid.shape), jnp.float32)
    scale = float(jnp.abs(reference(c)).max())
    np.testing.assert_allclose(np.asarray(compact(c)), np.asarray(reference(c)), atol=2e-6 * scale)
