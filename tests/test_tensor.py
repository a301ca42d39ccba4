"""growth.tensor: layout, eigen-analysis, closed forms, the DTI fit and tumour tensors."""

import dipy.reconst.dti as dipy_dti
import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest
from dipy.core.gradients import gradient_table
from dipy.io import read_bvals_bvecs
from scipy.spatial.transform import Rotation

from growth.tensor import (
    components_to_matrix,
    eigh_field,
    fit_tensor_dwi,
    fractional_anisotropy,
    matrix_to_components,
    mean_diffusivity,
    rotate_tensor,
    tensor_from_direction,
    tensor_from_eigen,
    tumour_tensor,
    westin_measures,
)


def _random_field(shape=(4, 3, 2), seed=0):
    """Random symmetric positive-definite tensors (6, *shape) and their matrices."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(*shape, 3, 3))
    m = a @ np.swapaxes(a, -1, -2) + 0.1 * np.eye(3)
    return np.asarray(matrix_to_components(m)), m


def _rotations(n, seed=1):
    return Rotation.random(n, random_state=seed).as_matrix()


# --------------------------------------------------------------------------- layout


def test_components_matrix_round_trip_and_order():
    t6, m = _random_field()
    np.testing.assert_allclose(np.asarray(components_to_matrix(t6)), m, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(matrix_to_components(components_to_matrix(t6))), t6)
    one = jnp.arange(1.0, 7.0)  # xx xy xz yy yz zz = 1..6
    expected = np.array([[1, 2, 3], [2, 4, 5], [3, 5, 6]], dtype=np.float32)
    np.testing.assert_array_equal(np.asarray(components_to_matrix(one)), expected)
    np.testing.assert_array_equal(np.asarray(matrix_to_components(expected)), np.arange(1, 7))
    with pytest.raises(ValueError, match=r"\(6, \.\.\.\)"):
        components_to_matrix(jnp.zeros((5, 2)))


def test_dtype_follows_inputs():
    t6 = np.eye(3)[[0, 0, 0, 1, 1, 2], [0, 1, 2, 1, 2, 2]]  # identity, float64
    assert tumour_tensor(t6.astype(np.float32), anisotropy=2.0).dtype == jnp.float32
    with jax.enable_x64(True):
        assert tumour_tensor(t6, anisotropy=2.0).dtype == jnp.float64
        assert fractional_anisotropy(t6).dtype == jnp.float64


def test_eigh_fa_md_against_closed_forms():
    lam = np.array([3.0, 2.0, 0.5])
    rot = _rotations(5)
    m = np.einsum("nik,k,njk->nij", rot, lam, rot)
    t6 = matrix_to_components(m)
    vals, vecs = eigh_field(t6)
    np.testing.assert_allclose(np.asarray(vals), np.repeat(lam[:, None], 5, 1), rtol=1e-5)
    for n in range(5):  # each eigenvector equals the rotated axis up to sign
        dots = np.abs(np.einsum("ik,ik->k", np.asarray(vecs[n]), rot[n]))
        np.testing.assert_allclose(dots, 1.0, atol=1e-5)
    fa_closed = np.sqrt(0.5 * ((3 - 2) ** 2 + (2 - 0.5) ** 2 + (0.5 - 3) ** 2) / (9 + 4 + 0.25))
    np.testing.assert_allclose(np.asarray(fractional_anisotropy(t6)), fa_closed, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(mean_diffusivity(t6)), lam.mean(), rtol=1e-6)
    assert float(fractional_anisotropy(jnp.zeros(6))) == 0.0
    iso = jnp.asarray([2.0, 0, 0, 2.0, 0, 2.0])
    assert float(fractional_anisotropy(iso)) == pytest.approx(0.0, abs=1e-7)
    line = jnp.asarray([1.0, 0, 0, 0, 0, 0])
    assert float(fractional_anisotropy(line)) == pytest.approx(1.0, abs=1e-6)


def test_rotate_and_tensor_from_eigen():
    t6, m = _random_field(seed=3)
    q = _rotations(1, seed=4)[0]
    np.testing.assert_allclose(
        np.asarray(components_to_matrix(rotate_tensor(t6, q))), q @ m @ q.T, rtol=1e-5, atol=1e-5
    )
    vals, vecs = eigh_field(t6)
    np.testing.assert_allclose(np.asarray(tensor_from_eigen(vals, vecs)), t6, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("md", [1.0, 7e-4])
def test_tensor_from_direction_recovers_fa_md_and_direction(md):
    fa = np.array([0.0, 0.1, 0.35, 0.6, 0.85, 0.99, 1.0], dtype=np.float32)
    v = _rotations(fa.size, seed=5)[:, :, 0].T * np.linspace(0.5, 3.0, fa.size)  # any length
    t6 = tensor_from_direction(fa, v, mean_diffusivity=md)
    np.testing.assert_allclose(np.asarray(fractional_anisotropy(t6)), fa, atol=2e-6)
    np.testing.assert_allclose(np.asarray(mean_diffusivity(t6)), md, rtol=2e-6)
    vals, vecs = eigh_field(t6)
    unit = v / np.linalg.norm(v, axis=0)
    dots = np.abs(np.einsum("in,ni->n", unit, np.asarray(vecs[..., 0])))
    np.testing.assert_allclose(dots[1:], 1.0, atol=1e-5)  # fa = 0 has no direction
    np.testing.assert_allclose(np.asarray(vals[1]), np.asarray(vals[2]), atol=1e-6 * md)


def test_tensor_from_direction_invalid_directions_are_isotropic():
    fa = jnp.full((4,), 0.8)
    v = jnp.asarray([[np.nan, 0.0, 1.0, np.inf], [0, 0, 0, 0], [0, 0, 0, 0]])
    t6 = np.asarray(tensor_from_direction(fa, v, mean_diffusivity=2.0))
    iso = np.array([2.0, 0, 0, 2.0, 0, 2.0])[:, None]
    np.testing.assert_allclose(t6[:, [0, 1, 3]], np.repeat(iso, 3, 1), rtol=1e-6)
    assert float(fractional_anisotropy(t6[:, 2])) == pytest.approx(0.8, abs=1e-6)


# --------------------------------------------------------------------------- tumour tensors


def _prolate_field():
    """Tensors with eigenvalues (l1, l2, l3) along random rotations, plus invalid voxels."""
    lam = np.array([[1.7, 0.4, 0.3], [1.0, 1.0, 1.0], [1.2, 0.9, 0.2], [2.0, 0.2, 0.2]]).T
    rot = _rotations(lam.shape[1], seed=6)
    t6 = np.asarray(tensor_from_eigen(lam * 1e-3, rot))  # mm^2/s scale
    invalid = np.stack([np.zeros(6), np.full(6, np.nan), -t6[:, 0]], axis=1)
    return np.concatenate([t6, invalid], axis=1).astype(np.float32), lam, rot


@pytest.mark.parametrize("method", ["scaled", "westin"])
@pytest.mark.parametrize("r", [1.0, 2.0, 10.0, 100.0])
def test_tumour_tensor_trace_direction_and_invalid(method, r):
    t6, lam, rot = _prolate_field()
    shape = np.asarray(tumour_tensor(t6, anisotropy=r, method=method))
    np.testing.assert_allclose(shape[0] + shape[3] + shape[5], 3.0, atol=1e-5)
    vals, vecs = eigh_field(shape)
    vals, vecs = np.asarray(vals), np.asarray(vecs)
    for n in (0, 2, 3):  # distinct principal eigenvalue: direction kept
        if r > 1 or method == "scaled":
            assert abs(vecs[n, :, 0] @ rot[n, :, 0]) == pytest.approx(1.0, abs=1e-5)
    assert np.all(vals >= -1e-6)
    np.testing.assert_allclose(shape[:, 4:], np.repeat(np.eye(3)[[0, 0, 0, 1, 1, 2],
                                                              [0, 1, 2, 1, 2, 2]][:, None], 3, 1),
                               atol=1e-6)  # zero, NaN and negative tensors -> identity
    if method == "westin" or r == 1.0:  # isotropic DTI -> identity
        np.testing.assert_allclose(shape[:, 1], [1, 0, 0, 1, 0, 1], atol=1e-5)
    else:  # "scaled" picks some direction of an isotropic tensor and stretches it by r
        np.testing.assert_allclose(vals[:, 1], np.array([r, 1, 1]) * 3 / (r + 2), rtol=1e-5)


def test_tumour_tensor_scaled_ratio_is_r_times_dti_ratio():
    t6, lam, _ = _prolate_field()
    ratios = []
    for r in (1.0, 3.0, 10.0):
        vals = np.asarray(eigh_field(tumour_tensor(t6, anisotropy=r))[0])
        ratios.append(vals[0] / vals[1])
    for n in (0, 2, 3):
        assert ratios[0][n] == pytest.approx(lam[0, n] / lam[1, n], rel=1e-4)
        assert ratios[1][n] == pytest.approx(3.0 * ratios[0][n], rel=1e-4)
        assert ratios[2][n] == pytest.approx(10.0 * ratios[0][n], rel=1e-4)
    # r = 1 is the measured tensor normalised to trace 3
    normalised = np.asarray(tumour_tensor(t6, anisotropy=1.0))[:, 0]
    np.testing.assert_allclose(normalised, t6[:, 0] * 3 / lam[:, 0].sum() / 1e-3, rtol=1e-4,
                               atol=1e-6)


def test_tumour_tensor_westin_construction():
    t6, lam, _ = _prolate_field()
    r = 5.0
    vals = np.asarray(eigh_field(tumour_tensor(t6, anisotropy=r, method="westin"))[0])
    c_l, c_p, c_s = (np.asarray(c) for c in westin_measures(lam))
    np.testing.assert_allclose(c_l + c_p + c_s, 1.0, rtol=1e-6)
    mu = np.stack([1 + (r - 1) * (c_l + c_p), 1 + (r - 1) * c_p, np.ones_like(c_l)])
    np.testing.assert_allclose(vals[:, :4], 3 * mu / mu.sum(0), rtol=1e-4)
    # a perfectly linear tensor gives principal / perpendicular ratio r
    line = tensor_from_direction(jnp.asarray(1.0), jnp.asarray([0.0, 0.6, 0.8]))
    lv = np.asarray(eigh_field(tumour_tensor(line, anisotropy=r, method="westin"))[0])
    assert lv[0] / lv[1] == pytest.approx(r, rel=1e-5)
    # r = 1 gives the identity whatever the DTI tensor
    ident = np.asarray(tumour_tensor(t6, anisotropy=1.0, method="westin"))
    np.testing.assert_allclose(ident, np.repeat(np.array([1, 0, 0, 1, 0, 1.0])[:, None], 7, 1),
                               atol=1e-5)


def test_tumour_tensor_argument_checks_and_jit():
    t6, _, _ = _prolate_field()
    with pytest.raises(ValueError, match="anisotropy"):
        tumour_tensor(t6, anisotropy=0.5)
    with pytest.raises(ValueError, match="method"):
        tumour_tensor(t6, anisotropy=2.0, method="nope")
    jitted = jax.jit(lambda r: tumour_tensor(t6, anisotropy=r))
    expected = np.asarray(tumour_tensor(t6, anisotropy=4.0))
    np.testing.assert_allclose(np.asarray(jitted(4.0)), expected, atol=1e-6)
    # the anisotropy is differentiable (e.g. fitted): the trace stays 3, d trace / dr = 0
    grad = jax.grad(lambda r: jnp.sum(tumour_tensor(t6, anisotropy=r)[jnp.array([0, 3, 5])]))(3.0)
    assert abs(float(grad)) < 1e-4


# --------------------------------------------------------------------------- DTI fit


@pytest.fixture(scope="module")
def small_64d(data_dir):
    folder = data_dir / "dti" / "dipy-small-64D"
    bvals, bvecs = read_bvals_bvecs(str(folder / "small_64D.bval"), str(folder / "small_64D.bvec"))
    data = nib.load(folder / "small_64D.nii").get_fdata()
    return data, bvals, bvecs


@pytest.mark.parametrize("method", ["WLS", "LS"])
def test_fit_matches_dipy(small_64d, method):
    data, bvals, bvecs = small_64d
    gtab = gradient_table(bvals, bvecs=bvecs)
    ref = dipy_dti.TensorModel(gtab, fit_method=method, min_signal=1e-6).fit(data)
    t6 = fit_tensor_dwi(data.astype(np.float32), bvals, np.nan_to_num(bvecs), method=method)
    fa, md = np.asarray(fractional_anisotropy(t6)), np.asarray(mean_diffusivity(t6))
    # dipy clips eigenvalues at 1e-9 before FA/MD: compare where the fit is positive definite
    mask = (data[..., 0] > 0) & (ref.evals[..., 2] > 2e-9)
    assert mask.sum() > 900
    np.testing.assert_allclose(fa[mask], ref.fa[mask], atol=1e-3)
    np.testing.assert_allclose(md[mask], ref.md[mask], atol=1e-3 * ref.md[mask].max())
    lower = np.moveaxis(np.asarray(t6), 0, -1)[..., [0, 1, 3, 2, 4, 5]]  # dipy's order
    np.testing.assert_allclose(lower[mask], ref.lower_triangular()[mask], atol=1e-6)


def test_fit_recovers_a_known_tensor():
    rng = np.random.default_rng(7)
    g = rng.normal(size=(30, 3))
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    bvals = np.r_[0.0, np.full(30, 1000.0)]
    bvecs = np.r_[np.zeros((1, 3)), g]
    true = np.asarray(tensor_from_direction(jnp.asarray([0.7]), jnp.asarray([[0.6], [0.0], [0.8]]),
                                            mean_diffusivity=8e-4))
    m = np.asarray(components_to_matrix(true))[0]
    signal = 900.0 * np.exp(-bvals * np.einsum("ni,ij,nj->n", bvecs, m, bvecs))
    for method in ("WLS", "LS"):
        t6 = np.asarray(fit_tensor_dwi(signal[None], bvals, bvecs, method=method))
        np.testing.assert_allclose(t6, true, atol=1e-7)  # float32: 1e-4 relative
