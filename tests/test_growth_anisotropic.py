"""The anisotropic (full-tensor) FK solver against analytic results and the isotropic one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from growth import FKParams, FKSimulator, GaussianSeed, Grid
from growth.anisotropic import AnisotropicFKSimulator, selling_decomposition, tensor_stencil


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


def test_thin_barriers_are_not_jumped_by_long_offsets():
    grid = Grid((24, 24, 6), (1.0, 1.0, 1.0))
    wm = np.ones(grid.shape, np.float32)
    wm[12] = 0.0  # a one-voxel CSF sheet
    direction = np.array([1.0, 0.5, 0.0]) / np.linalg.norm([1.0, 0.5, 0.0])
    matrix = 0.05 * np.eye(3) + 2.85 * np.outer(direction, direction)
    sim = AnisotropicFKSimulator.create(
        wm, 0 * wm, _uniform(matrix, grid.shape), grid, dw_max=1.0, t_max=60.0
    )
    assert max(max(abs(v) for v in e) for e in sim.offsets) >= 2  # long offsets in use
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
