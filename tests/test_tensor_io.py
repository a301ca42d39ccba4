"""rtjax.tensor_io: tensor files in every orientation, the real TractSeg peaks, DWI, resampling."""


import dipy.reconst.dti as dipy_dti
import nibabel as nib
import numpy as np
import pytest
from dipy.core.gradients import gradient_table
from dipy.io import read_bvals_bvecs as dipy_read_bvals_bvecs
from scipy.spatial.transform import Rotation

from growth.tensor import (
    components_to_matrix,
    eigh_field,
    fit_tensor_dwi,
    fractional_anisotropy,
    mean_diffusivity,
    tensor_from_direction,
)
from rtjax.errors import InputError
from rtjax.io import Image
from rtjax.tensor_io import (
    load_dwi,
    load_tensor_eigen,
    load_tensor_fa_peaks,
    load_tensor_fsl,
    read_bvals_bvecs,
    resample_tensor,
    save_tensor_fsl,
    voxel_frame,
)

SHAPE = (5, 6, 4)
W_DIR = np.array([0.48, 0.6, 0.64])  # a world direction, unit length, no zero component


def _affine(columns, spacing=(2.0, 1.5, 3.0), origin=(10.0, -20.0, 5.0)):
    a = np.eye(4)
    a[:3, :3] = np.asarray(columns, dtype=float) * np.asarray(spacing)
    a[:3, 3] = origin
    return a


OBLIQUE = Rotation.from_euler("xyz", [20, -15, 35], degrees=True).as_matrix()
AFFINES = {
    "LPS": _affine(np.diag([-1, -1, 1])),  # positive determinant: FSL flips x
    "permuted SRA": _affine([[0, 1, 0], [0, 0, 1], [1, 0, 0]]),
    "LAS": _affine(np.diag([-1, 1, 1])),
    "oblique PIL": _affine(OBLIQUE @ np.array([[0, 0, -1], [-1, 0, 0], [0, -1, 0]])),
}


def _world_field(affine):
    """A world tensor per stored voxel: direction W_DIR, FA 0.8, MD encoding the position."""
    ijk = np.indices(SHAPE).reshape(3, -1).T
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
    md = 1e-3 * (1.0 + 0.002 * (xyz @ np.array([1.0, 2.0, 3.0])))
    t6 = np.asarray(
        tensor_from_direction(np.full(len(ijk), 0.8), np.repeat(W_DIR[:, None], len(ijk), 1),
                              mean_diffusivity=md)
    ).astype(np.float64)
    return np.asarray(components_to_matrix(t6), dtype=np.float64).reshape(*SHAPE, 3, 3)


def _write_tensor(path, world_m, affine, frame="fsl", order=(0, 1, 2, 3, 4, 5)):
    """Write the world tensors with components in the stored voxel frame (FSL-flipped)."""
    r = voxel_frame(affine)
    if frame == "world":
        m = world_m
    else:
        q = r.T.copy()
        if frame == "fsl" and np.linalg.det(affine[:3, :3]) > 0:
            q[0] *= -1
        m = q @ world_m @ q.T
    comps = np.stack([m[..., 0, 0], m[..., 0, 1], m[..., 0, 2], m[..., 1, 1], m[..., 1, 2],
                      m[..., 2, 2]], axis=-1)[..., list(order)]
    nib.save(nib.Nifti1Image(comps.astype(np.float32), affine), path)
    return path


def _world_principal(t6, affine, ijk):
    """World principal direction of the canonical tensor at canonical voxel ijk."""
    m = np.asarray(components_to_matrix(t6[(slice(None), *ijk)]), dtype=np.float64)
    r = voxel_frame(affine)
    vals, vecs = np.linalg.eigh(r @ m @ r.T)
    return vecs[:, -1]


@pytest.mark.parametrize("name", list(AFFINES))
@pytest.mark.parametrize("frame", ["fsl", "world"])
def test_fsl_tensor_keeps_world_direction_and_position(tmp_path, name, frame):
    affine = AFFINES[name]
    path = _write_tensor(tmp_path / "tensor.nii.gz", _world_field(affine), affine, frame)
    t6, ref = load_tensor_fsl(path, frame=frame)
    assert t6.dtype == np.float32 and t6.shape == (6, *ref.shape)
    assert ref.path == path and ref.original_affine == pytest.approx(affine)
    codes = nib.aff2axcodes(ref.affine)
    assert codes == ("R", "A", "S")
    for ijk in [(0, 0, 0), (1, 2, 3), tuple(n - 1 for n in ref.shape)]:
        assert abs(_world_principal(t6, ref.affine, ijk) @ W_DIR) == pytest.approx(1.0, abs=1e-5)
        xyz = ref.voxel_to_world(np.array(ijk, dtype=float))
        md = 1e-3 * (1.0 + 0.002 * (xyz @ np.array([1.0, 2.0, 3.0])))
        assert float(mean_diffusivity(t6[(slice(None), *ijk)])) == pytest.approx(md, rel=1e-5)
    np.testing.assert_allclose(np.asarray(fractional_anisotropy(t6)), 0.8, atol=1e-4)


def test_fsl_convention_flips_x_for_positive_determinant(tmp_path):
    affine = AFFINES["LPS"]  # det > 0: the same file read as "voxel" mirrors x
    path = _write_tensor(tmp_path / "t.nii.gz", _world_field(affine), affine, "fsl")
    t6, ref = load_tensor_fsl(path, frame="voxel")
    direction = _world_principal(t6, ref.affine, (1, 1, 1))
    assert abs(direction @ (W_DIR * [-1, 1, 1])) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("name", ["LPS", "oblique PIL"])
def test_save_tensor_fsl_round_trip(tmp_path, name):
    affine = AFFINES[name]
    path = _write_tensor(tmp_path / "t.nii.gz", _world_field(affine), affine)
    t6, ref = load_tensor_fsl(path)
    out = save_tensor_fsl(t6, ref, tmp_path / "out" / "tensor.nii.gz")
    written = nib.load(out)
    np.testing.assert_allclose(written.affine, affine, atol=1e-5)
    np.testing.assert_allclose(written.get_fdata(), nib.load(path).get_fdata(), rtol=1e-5,
                               atol=1e-10)
    again, _ = load_tensor_fsl(out)
    np.testing.assert_allclose(again, t6, rtol=1e-5, atol=1e-10)


def test_tensor_file_errors_name_the_file(tmp_path):
    affine = AFFINES["LAS"]
    three_d = tmp_path / "fa.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.float32), affine), three_d)
    with pytest.raises(InputError, match=r"fa\.nii\.gz: 3-D .* 6 volumes"):
        load_tensor_fsl(three_d)
    five = tmp_path / "five.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((*SHAPE, 5), np.float32), affine), five)
    with pytest.raises(InputError, match=r"five\.nii\.gz: 5 volumes"):
        load_tensor_fsl(five)
    symmat = tmp_path / "symmat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((*SHAPE, 1, 6), np.float32), affine), symmat)
    with pytest.raises(InputError, match="lower-triangular"):
        load_tensor_fsl(symmat)
    data = np.tile(np.array([1, 0, 0, 1, 0, 1.0]), (*SHAPE, 1))
    data[0, 0, 0, 1] = np.nan
    data[1, 0, 0, 2] = np.inf
    nonfinite = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(data.astype(np.float32), affine), nonfinite)
    with pytest.raises(InputError, match=r"nan\.nii\.gz: 2 voxels with non-finite"):
        load_tensor_fsl(nonfinite)


def test_wrong_component_order_is_an_error_and_noise_is_clamped(tmp_path):
    affine = AFFINES["LAS"]
    world = _world_field(affine)
    # MRtrix order (D11, D22, D33, D12, D13, D23) read as FSL order: indefinite tensors
    mrtrix = _write_tensor(tmp_path / "mrtrix.nii.gz", world, affine, order=(0, 3, 5, 1, 2, 4))
    with pytest.raises(InputError, match=r"mrtrix\.nii\.gz: 120 of 120 non-zero voxels are not "
                                         r"positive semi-definite"):
        load_tensor_fsl(mrtrix)
    noisy = world.copy()
    lowest = np.linalg.eigvalsh(noisy[2, 2, 2])[0]
    noisy[2, 2, 2] -= (lowest + 1e-5) * np.eye(3)  # smallest eigenvalue -1e-5 against ~2e-3
    noisy[3, 3, 3] = -noisy[3, 3, 3]  # one clearly negative voxel: zeroed
    path = _write_tensor(tmp_path / "noisy.nii.gz", noisy, affine)
    with pytest.warns(UserWarning) as record:
        t6, ref = load_tensor_fsl(path)
    messages = " ".join(str(w.message) for w in record)
    assert "1 voxels with small negative eigenvalues" in messages
    assert "1 voxels that are not positive semi-definite set to zero" in messages
    vals = np.asarray(eigh_field(t6)[0])
    assert vals.min() >= -1e-9
    assert np.count_nonzero(np.all(t6 == 0, axis=0)) == 1


@pytest.mark.parametrize("single_file", [True, False])
def test_eigen_files_give_the_fsl_tensor(tmp_path, single_file):
    affine = AFFINES["LPS"]
    path = _write_tensor(tmp_path / "tensor.nii.gz", _world_field(affine), affine)
    stored = nib.load(path).get_fdata()
    m = np.stack([stored[..., [0, 1, 2]], stored[..., [1, 3, 4]], stored[..., [2, 4, 5]]], -2)
    vals, vecs = np.linalg.eigh(m)
    vals, vecs = vals[..., ::-1], vecs[..., ::-1]
    vec_paths = []
    for k in range(3):
        vec_paths.append(tmp_path / f"V{k + 1}.nii.gz")
        nib.save(nib.Nifti1Image(vecs[..., :, k].astype(np.float32), affine), vec_paths[-1])
    if single_file:
        lam = tmp_path / "L.nii.gz"
        nib.save(nib.Nifti1Image(vals.astype(np.float32), affine), lam)
    else:
        lam = [tmp_path / f"L{k + 1}.nii.gz" for k in range(3)]
        for k, p in enumerate(lam):
            nib.save(nib.Nifti1Image(vals[..., k].astype(np.float32), affine), p)
    t6, ref = load_tensor_eigen(lam, vec_paths)
    expected, ref_fsl = load_tensor_fsl(path)
    np.testing.assert_allclose(t6, expected, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(ref.affine, ref_fsl.affine)
    bad = tmp_path / "V_other_grid.nii.gz"
    nib.save(nib.Nifti1Image(vecs[..., :, 0].astype(np.float32), AFFINES["LAS"]), bad)
    with pytest.raises(InputError, match=r"V_other_grid\.nii\.gz: affine differs"):
        load_tensor_eigen(lam, [bad, *vec_paths[1:]])


# --------------------------------------------------------------------------- real peaks


@pytest.fixture(scope="module")
def tractseg(data_dir):
    folder = data_dir / "dti" / "tractseg"
    t6, fa_image = load_tensor_fa_peaks(folder / "FA.nii.gz", folder / "peaks.nii.gz")
    return folder, t6, fa_image


def _principal_world(t6, image, xyz):
    ijk = tuple(np.rint(image.world_to_voxel(np.asarray(xyz, dtype=float))).astype(int))
    return _world_principal(t6, image.affine, ijk), ijk


def test_tractseg_peaks_corpus_callosum_is_left_right(tractseg):
    _, t6, fa_image = tractseg
    assert fa_image.orientation == ("L", "A", "S") and t6.shape == (6, 73, 87, 73)
    for y in (-10.0, 0.0, 10.0):
        # the corpus callosum is the highest-FA voxel of the midline column above the ventricles
        column = [fa_image.world_to_voxel(np.array([0.0, y, z])) for z in np.arange(17.5, 28, 2.5)]
        ijk = max((tuple(np.rint(c).astype(int)) for c in column), key=lambda v: fa_image.data[v])
        assert fa_image.data[ijk] > 0.6
        direction = _world_principal(t6, fa_image.affine, ijk)
        assert abs(direction[0]) > 0.8, (y, ijk, direction)


def test_tractseg_peaks_internal_capsule_is_superior_inferior(tractseg):
    _, t6, fa_image = tractseg
    for xyz in [(-20, -15, 10), (-20, -10, 10), (20, -15, 10), (20, -10, 10)]:
        direction, ijk = _principal_world(t6, fa_image, xyz)
        assert fa_image.data[ijk] > 0.5
        assert abs(direction[2]) > 0.8, (xyz, direction)


def _continuity(t6, fa):
    """Mean |cos| between the principal direction and the one 1-2 voxels along it."""
    shape = np.array(t6.shape[1:])
    idx = np.argwhere(fa > 0.4)
    m = np.asarray(components_to_matrix(t6[:, idx[:, 0], idx[:, 1], idx[:, 2]]), np.float64)
    v = np.linalg.eigh(m)[1][..., -1]  # canonical frame = voxel axes of an isotropic grid
    oblique = np.sort(np.abs(v), axis=1)[:, 1] > 0.35
    field = np.zeros((*t6.shape[1:], 3))
    field[idx[:, 0], idx[:, 1], idx[:, 2]] = v
    scores = []
    for step in (-2.0, -1.0, 1.0, 2.0):
        q = np.rint(idx + step * v).astype(int)
        inside = np.all((q >= 0) & (q < shape), axis=1)
        q = np.clip(q, 0, shape - 1)
        other = field[q[:, 0], q[:, 1], q[:, 2]]
        keep = inside & oblique & (np.linalg.norm(other, axis=1) > 0)
        scores.append(np.abs(np.sum(other * v, axis=1))[keep].mean())
    return float(np.mean(scores))


def test_tractseg_peaks_are_in_the_world_frame(tractseg):
    """Oblique fibres continue along the peaks read in world axes, not in voxel axes."""
    folder, t6, fa_image = tractseg
    voxel, _ = load_tensor_fa_peaks(folder / "FA.nii.gz", folder / "peaks.nii.gz", frame="voxel")
    world_score = _continuity(t6, fa_image.data)
    voxel_score = _continuity(voxel, fa_image.data)
    assert world_score > 0.75 and world_score > voxel_score + 0.05, (world_score, voxel_score)


def test_fa_peaks_tensor_values_and_mask(tractseg):
    folder, t6, fa_image = tractseg
    mask = nib.load(folder / "nodif_brain_mask.nii.gz").get_fdata() > 0
    nonzero = np.any(t6 != 0, axis=0)
    inside = fa_image.from_canonical(nonzero)
    # FA 0 and no peak is background: all of the outside, and 41 voxels of the mask's rim
    assert not np.any(inside & ~mask) and np.count_nonzero(mask & ~inside) == 41
    md = np.asarray(mean_diffusivity(t6))
    np.testing.assert_allclose(md[np.any(t6 != 0, axis=0)], 7e-4, rtol=1e-5)
    sel = (fa_image.data > 0) & (fa_image.data < 0.999)
    np.testing.assert_allclose(np.asarray(fractional_anisotropy(t6))[sel], fa_image.data[sel],
                               atol=1e-4)
    masked, _ = load_tensor_fa_peaks(folder / "FA.nii.gz", folder / "peaks.nii.gz",
                                     mask_path=folder / "nodif_brain_mask.nii.gz")
    np.testing.assert_array_equal(fa_image.from_canonical(np.any(masked != 0, axis=0)), mask)
    np.testing.assert_array_equal(masked[:, nonzero], t6[:, nonzero])


# --------------------------------------------------------------------------- DWI


def test_load_dwi_fit_matches_dipy_in_canonical_orientation(data_dir):
    folder = data_dir / "dti" / "dipy-small-64D"
    bval, bvec = folder / "small_64D.bval", folder / "small_64D.bvec"
    dwi = load_dwi(folder / "small_64D.nii", bval, bvec, frame="voxel")
    assert dwi.reference.orientation == ("P", "L", "S") and dwi.data.shape == (10, 10, 10, 65)
    t6 = np.asarray(fit_tensor_dwi(dwi.data, dwi.bvals, dwi.bvecs))
    raw = nib.load(folder / "small_64D.nii").get_fdata()
    b, g = dipy_read_bvals_bvecs(str(bval), str(bvec))
    ref = dipy_dti.TensorModel(gradient_table(b, bvecs=g), min_signal=1e-6).fit(raw)
    mask = ref.evals[..., 2] > 2e-9
    fa = dwi.reference.from_canonical(np.asarray(fractional_anisotropy(t6)))
    np.testing.assert_allclose(fa[mask], ref.fa[mask], atol=1e-3)
    # principal directions: dipy's (stored voxel axes) -> world equals ours (canonical) -> world
    mine = np.stack([dwi.reference.from_canonical(c) for c in t6], axis=0)  # layout only
    r_can, r_raw = voxel_frame(dwi.reference.affine), voxel_frame(dwi.reference.original_affine)
    m = np.asarray(components_to_matrix(mine), np.float64)
    v_mine = np.linalg.eigh(np.einsum("ij,...jk,lk->...il", r_can, m, r_can))[1][..., -1]
    v_dipy = ref.evecs[..., :, 0] @ r_raw.T
    strong = mask & (ref.fa > 0.3)
    cos = np.abs(np.sum(v_mine * v_dipy, axis=-1))[strong]
    assert strong.sum() > 50 and cos.min() > 0.999


def test_gradient_tables(tmp_path):
    b = np.array([0, 5, 1000, 1000, 2000.0])
    g = np.array([[np.nan] * 3, [0, 0, 0], [1, 0, 0], [0, 0.6, 0.8], [0, 1.02, 0]])
    (tmp_path / "bvals").write_text(" ".join(map(str, b)))
    np.savetxt(tmp_path / "rows", g)
    np.savetxt(tmp_path / "fsl", g.T)
    for name in ("rows", "fsl"):
        bvals, bvecs = read_bvals_bvecs(tmp_path / "bvals", tmp_path / name)
        np.testing.assert_array_equal(bvals, b)
        np.testing.assert_allclose(bvecs, [[0, 0, 0], [0, 0, 0], [1, 0, 0], [0, 0.6, 0.8],
                                           [0, 1, 0]])
    with pytest.raises(InputError, match="5 b-values for an image of 6 volumes"):
        read_bvals_bvecs(tmp_path / "bvals", tmp_path / "rows", n_volumes=6)
    g[3] = [0, 0.5, 0.5]
    np.savetxt(tmp_path / "bad", g)
    with pytest.raises(InputError, match=r"bad: 1 diffusion-weighted volumes .* not a unit"):
        read_bvals_bvecs(tmp_path / "bvals", tmp_path / "bad")


def test_dwi_bvecs_follow_the_reorientation(tmp_path):
    """A fit of data written LPS with FSL bvecs recovers the world fibre direction."""
    affine = AFFINES["LPS"]
    rng = np.random.default_rng(0)
    g_world = rng.normal(size=(20, 3))
    g_world /= np.linalg.norm(g_world, axis=1, keepdims=True)
    b = np.r_[0.0, np.full(20, 1000.0)]
    world_m = _world_field(affine)
    g_all = np.r_[np.zeros((1, 3)), g_world]
    signal = 1000 * np.exp(-b * np.einsum("ni,...ij,nj->...n", g_all, world_m, g_all))
    fsl = g_all @ voxel_frame(affine)  # world -> stored voxel axes
    fsl[:, 0] *= -1  # FSL: x flipped for a positive determinant
    nib.save(nib.Nifti1Image(signal.astype(np.float32), affine), tmp_path / "dwi.nii.gz")
    dwi = load_dwi(tmp_path / "dwi.nii.gz", b, fsl)
    t6 = np.asarray(fit_tensor_dwi(dwi.data, dwi.bvals, dwi.bvecs))
    direction = _world_principal(t6, dwi.reference.affine, (2, 3, 1))
    assert abs(direction @ W_DIR) == pytest.approx(1.0, abs=1e-4)


# --------------------------------------------------------------------------- resampling


def _grid(affine, shape=(9, 8, 7)):
    return Image.from_array(np.zeros(shape, np.float32), affine)


def _uniform(image, direction, fa=0.7):
    """A uniform tensor field on ``image`` with the given world principal direction."""
    v = voxel_frame(image.affine).T @ direction
    n = int(np.prod(image.shape))
    t6 = tensor_from_direction(np.full(n, fa), np.repeat(v[:, None], n, 1), mean_diffusivity=1e-3)
    return np.asarray(t6).reshape(6, *image.shape)


def test_identity_resampling_is_exact():
    source = _grid(AFFINES["oblique PIL"])
    rng = np.random.default_rng(1)
    a = rng.normal(size=(*source.shape, 3, 3))
    m = a @ np.swapaxes(a, -1, -2)
    t6 = np.stack([m[..., i, j] for i, j in [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2)]])
    t6 = t6.astype(np.float32)
    np.testing.assert_allclose(resample_tensor(t6, source, source), t6, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("reorientation", ["ppd", "finite-strain"])
def test_resample_onto_rotated_and_flipped_grids_keeps_world_directions(reorientation):
    source = _grid(AFFINES["LAS"])
    t6 = _uniform(source, W_DIR)
    centre = source.voxel_to_world((np.array(source.shape) - 1) / 2)
    spin = np.eye(4)
    spin[:3, :3] = Rotation.from_euler("z", 30, degrees=True).as_matrix()
    spin[:3, 3] = centre - spin[:3, :3] @ centre
    flip = np.diag([1.0, -1.0, 1.0, 1.0])  # mirror the grid's y axis in place
    flip[:3, 3] = [0, 2 * centre[1], 0]
    for target_affine in (spin @ AFFINES["LAS"], flip @ AFFINES["oblique PIL"]):
        target = _grid(_centred(target_affine, centre, 5), (5, 5, 5))
        out = resample_tensor(t6, source, target, reorientation=reorientation)
        for ijk in [(2, 2, 2), (1, 2, 3), (3, 1, 2)]:
            assert abs(_world_principal(out, target.affine, ijk) @ W_DIR) == pytest.approx(
                1.0, abs=1e-5
            )
            assert float(fractional_anisotropy(out[(slice(None), *ijk)])) == pytest.approx(
                0.7, abs=1e-5
            )


def _centred(affine, centre, n):
    """``affine`` translated so that the centre of an n^3 grid lies at ``centre`` (world)."""
    out = affine.copy()
    out[:3, 3] += centre - (affine[:3, :3] @ np.full(3, (n - 1) / 2) + affine[:3, 3])
    return out


@pytest.mark.parametrize("reorientation", ["ppd", "finite-strain"])
def test_resample_with_a_transform_reorients(reorientation):
    grid = _grid(AFFINES["LAS"])
    t6 = _uniform(grid, W_DIR)
    centre = grid.voxel_to_world((np.array(grid.shape) - 1) / 2)
    rot = Rotation.from_euler("xz", [25, -40], degrees=True).as_matrix()
    shear = np.array([[1.0, 0.4, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.2]])
    for linear in (rot, shear):
        transform = np.eye(4)
        transform[:3, :3] = linear
        transform[:3, 3] = centre - linear @ centre
        out = resample_tensor(t6, grid, grid, transform=transform, reorientation=reorientation)
        got = _world_principal(out, grid.affine, (4, 4, 3))
        if linear is rot or reorientation == "ppd":  # PPD: e1 -> F e1 / |F e1|
            expected = linear @ W_DIR / np.linalg.norm(linear @ W_DIR)
        else:  # finite strain: the rotation of the polar decomposition
            u, _, vt = np.linalg.svd(linear)
            expected = u @ vt @ W_DIR
        assert abs(got @ expected) == pytest.approx(1.0, abs=1e-5)
        m = components_to_matrix(out[:, 4, 4, 3])
        np.testing.assert_allclose(np.linalg.eigvalsh(np.asarray(m, np.float64)),
                                   np.linalg.eigvalsh(np.asarray(components_to_matrix(
                                       t6[:, 4, 4, 3]), np.float64)), rtol=1e-4)
