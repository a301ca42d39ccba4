"""Tissue maps (rtjax.anatomy): ANTs <-> nibabel geometry, affine recovery, the case's own
maps, atlas registration on the real SRI24 and BraTS-space files, and `rtjax tissue`."""

import functools
import json

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from rtjax.anatomy import (
    FOREGROUND_FLOOR,
    ants_affine_to_ras,
    case_tissue,
    from_ants,
    normalise_tissue,
    register_atlas,
    registration_intensity,
    to_ants,
)
from rtjax.atlas import load_atlas
from rtjax.cli import app
from rtjax.errors import InputError
from rtjax.io import Image, load_image
from rtjax.metrics import dice

ants = pytest.importorskip("ants")


def _rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    i, j = [a for a in range(3) if a != axis]
    rot = np.eye(4)
    rot[i, i], rot[i, j], rot[j, i], rot[j, j] = c, -s, s, c
    return rot


def _affine(matrix, origin) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = matrix, origin
    return affine


AFFINES = {
    "LPS BraTS": _affine(np.diag([-1.0, -1.0, 1.0]), [0.0, 239.0, 0.0]),
    "RAS": _affine(np.diag([0.9, 1.3, 2.5]), [-90.0, -120.0, -60.0]),
    "oblique PSR": _rotation(0, 17.0)[:3, :3] @ _rotation(2, -8.0)[:3, :3]
    @ np.array([[0, 0, 1.2], [-0.8, 0, 0], [0, 2.0, 0]]),
}
AFFINES["oblique PSR"] = _affine(AFFINES["oblique PSR"], [12.5, -7.0, 30.0])


def _block_mean(image: Image, factor: int) -> Image:
    """A coarser image: mean over factor^3 blocks, the affine moved to the block centres."""
    shape = [n // factor for n in image.shape]
    data = image.data[: shape[0] * factor, : shape[1] * factor, : shape[2] * factor]
    data = data.reshape(shape[0], factor, shape[1], factor, shape[2], factor).mean(axis=(1, 3, 5))
    scale = np.diag([factor, factor, factor, 1.0])
    scale[:3, 3] = (factor - 1) / 2
    return Image.from_array(data.astype(np.float32), image.affine @ scale)


@pytest.fixture(scope="module")
def small_atlas():
    """The MNI152 atlas at 4 mm (49x58x47)."""
    return {name: _block_mean(img, 4) for name, img in load_atlas().images().items()}


# --------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("name", sorted(AFFINES))
def test_ants_conversion_round_trips_and_matches_ants_reader(name, tmp_path):
    affine = AFFINES[name]
    data = np.random.default_rng(0).random((6, 7, 8)).astype(np.float32)
    image = to_ants(data, affine)
    back, back_affine = from_ants(image)
    np.testing.assert_array_equal(back, data)
    np.testing.assert_allclose(back_affine, affine, atol=1e-5)
    # ANTs' own NIfTI reader is the reference for origin, spacing, direction and index order.
    path = tmp_path / "image.nii.gz"
    nib.Nifti1Image(data, affine).to_filename(path)
    read = ants.image_read(str(path))
    np.testing.assert_allclose(read.origin, image.origin, atol=1e-4)
    np.testing.assert_allclose(read.spacing, image.spacing, atol=1e-5)
    np.testing.assert_allclose(read.direction, image.direction, atol=1e-5)
    np.testing.assert_array_equal(read.numpy(), data)
    # A voxel's LPS physical point is its RAS world point with x and y negated.
    ijk = (2, 5, 3)
    ras = (affine @ [*ijk, 1.0])[:3]
    np.testing.assert_allclose(ants.transform_index_to_physical_point(image, ijk),
                               ras * [-1, -1, 1], atol=1e-4)


def test_ants_affine_file_reads_back_as_the_ras_matrix_written(tmp_path):
    """A RAS affine (shear, shift) written as an ANTs .mat with a non-zero centre reads
    back as itself, and maps points as ANTs' own transform does (with x, y negated)."""
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    ras = _affine([[0.98, -0.12, 0.05], [0.14, 1.05, -0.08], [-0.03, 0.1, 0.93]], [4.0, -6.5, 2.25])
    lps, centre = flip @ ras @ flip, np.array([12.0, -30.0, 18.0])
    written = ants.create_ants_transform(
        transform_type="AffineTransform", precision="double", dimension=3, matrix=lps[:3, :3],
        translation=lps[:3, 3] - centre + lps[:3, :3] @ centre, center=centre)
    path = tmp_path / "affine.mat"
    ants.write_transform(written, str(path))
    read = ants_affine_to_ras(path)
    np.testing.assert_allclose(read, ras, atol=1e-5)
    point = np.array([-20.0, 35.0, 10.0])
    moved = ants.read_transform(str(path)).apply_to_point(tuple(point * [-1, -1, 1]))
    np.testing.assert_allclose((read @ [*point, 1.0])[:3], np.multiply(moved, [-1, -1, 1]), atol=1e-4)


def test_known_affine_is_recovered(small_atlas):
    """The atlas T1 on a rotated, shifted header: the registration finds that transform."""
    moved = _rotation(0, 6.0) @ _rotation(2, -4.0)
    moved[:3, 3] = [5.0, -7.0, 4.0]
    t1 = small_atlas["t1"]
    target = Image.from_array(t1.data, moved @ t1.affine)
    reg = register_atlas(target, deformable=False, resolution_mm=None, atlas=small_atlas)
    residual = reg.affine_ras @ moved  # atlas world -> atlas world, identity if exact
    u, _, vt = np.linalg.svd(residual[:3, :3])
    angle = np.degrees(np.arccos(np.clip((np.trace(u @ vt) - 1) / 2, -1, 1)))
    centre = t1.voxel_to_world(np.argwhere(t1.data > 0).mean(axis=0))
    shift = np.linalg.norm((residual @ [*centre, 1.0])[:3] - centre)
    assert angle < 1.0 and shift < 1.0, (angle, shift)
    # The warped atlas brain lands on the target's own brain.
    assert dice(reg.maps["brain"] > 0.5, t1.data > 0) > 0.95


def test_normalised_tissue_is_a_partition_of_the_brain():
    rng = np.random.default_rng(1)
    wm, gm, csf = rng.uniform(-0.2, 1.2, (3, 9, 8, 7))
    brain = rng.random((9, 8, 7)) > 0.3
    out = normalise_tissue(wm, gm, csf, brain)
    total = sum(out)
    assert all(m.dtype == np.float32 and m.min() >= 0 and m.max() <= 1 for m in out)
    assert total.max() <= 1 + 1e-6 and not total[~brain].any()
    fine = brain & (np.clip(wm, 0, 1) + np.clip(gm, 0, 1) + np.clip(csf, 0, 1) <= 1)
    np.testing.assert_allclose(out[0][fine], np.clip(wm, 0, 1)[fine], rtol=1e-6)


def test_registration_intensity_keeps_the_darkest_tissue_apart_from_the_background():
    """A z-scored skull-stripped image, whose background is the darkest tissue's value
    minus a little (as in BRATS 2015): background 0, foreground in [FOREGROUND_FLOOR, 1]."""
    rng = np.random.default_rng(3)
    data = np.full((20, 22, 18), -3.6, np.float32)
    data[3:-3, 3:-3, 3:-3] = rng.normal(0.0, 1.0, (14, 16, 12)).clip(-3.5, 4.0)
    data[3:-3, 3:-3, 3] = -3.5  # a rim of CSF as dark as the image gets
    out = registration_intensity(data)
    inside = data != -3.6
    assert out.dtype == np.float32 and not out[~inside].any()
    assert out[inside].min() == pytest.approx(FOREGROUND_FLOOR) and out.max() == pytest.approx(1.0)
    # 32 Mattes bins over [0, 1]: the background sits beyond the Parzen window (4 bins).
    assert FOREGROUND_FLOOR * 32 > 4
    # Monotone inside: the order of the intensities is kept.
    order = np.argsort(data[inside], kind="stable")
    assert np.all(np.diff(out[inside][order]) >= 0)


# --------------------------------------------------------------------------- case folders

AFFINE = _affine(np.diag([-2.0, -2.0, 2.0]), [20.0, 30.0, -10.0])


def _save(path, data, affine=AFFINE):
    nib.Nifti1Image(np.asarray(data), affine).to_filename(path)
    return path


def _own_maps_case(folder):
    """A 12x14x10 case with t1c and its own wm, gm, csf (wm + gm + csf <= 1)."""
    folder.mkdir()
    rng = np.random.default_rng(2)
    maps = rng.dirichlet([1, 1, 1, 1], size=(12, 14, 10)).astype(np.float32)
    _save(folder / "t1c.nii.gz", rng.random((12, 14, 10)).astype(np.float32) + 1)
    for k, name in enumerate(("wm", "gm", "csf")):
        _save(folder / f"{name}.nii.gz", maps[..., k])
    return maps


def test_given_tissue_maps_are_used_as_they_are(tmp_path):
    maps = _own_maps_case(tmp_path / "case")
    tissue = case_tissue(tmp_path / "case", tmp_path / "out")
    for k, name in enumerate(("wm", "gm", "csf")):
        written = nib.load(tmp_path / "out" / f"{name}.nii.gz")
        np.testing.assert_array_equal(written.get_fdata(dtype=np.float32), maps[..., k])
        np.testing.assert_allclose(written.affine, AFFINE)
        np.testing.assert_array_equal(tissue.wm.from_canonical(getattr(tissue, name).data), maps[..., k])
    assert tissue.info["source"] == "case" and tissue.info["renormalised_voxels"] == 0


def test_a_result_in_a_reuse_dir_is_copied_not_recomputed(tmp_path):
    _own_maps_case(tmp_path / "case")
    first = case_tissue(tmp_path / "case", tmp_path / "first")
    said = []
    again = case_tissue(tmp_path / "case", tmp_path / "second", reuse_dirs=(tmp_path / "first",),
                        log=said.append)
    assert said[-1] == f"reusing the tissue maps in {tmp_path / 'first'}"
    assert again.info == first.info
    for name in ("wm.nii.gz", "gm.nii.gz", "csf.nii.gz", "brain_mask.nii.gz", "tissue.png", "tissue.json"):
        assert (tmp_path / "second" / name).read_bytes() == (tmp_path / "first" / name).read_bytes()
    assert not any(p.name.startswith(".") for p in (tmp_path / "second").iterdir())  # no temporaries


def test_tissue_map_on_another_grid_names_the_file(tmp_path):
    _own_maps_case(tmp_path / "case")
    shifted = AFFINE.copy()
    shifted[0, 3] += 2.0
    gm = tmp_path / "case" / "gm.nii.gz"
    _save(gm, nib.load(gm).get_fdata(), shifted)
    with pytest.raises(InputError) as err:
        case_tissue(tmp_path / "case", tmp_path / "out")
    assert err.value.path == gm


def test_one_tissue_map_without_the_other_is_an_error(tmp_path):
    _own_maps_case(tmp_path / "case")
    (tmp_path / "case" / "gm.nii.gz").unlink()
    with pytest.raises(InputError, match="no gm"):
        case_tissue(tmp_path / "case", tmp_path / "out")


# --------------------------------------------------------------------------- real files


def test_sri24_pbmap_headers_disagree_with_t1_stripped(data_dir, tmp_path):
    """The README's trap: pbmap_* headers mirror t1_stripped; such a case is refused."""
    sri = data_dir / "atlas" / "sri24"
    case = tmp_path / "case"
    case.mkdir()
    for name, source in (("t1", "t1_stripped"), ("wm", "pbmap_wm"), ("gm", "pbmap_gm")):
        (case / f"{name}.nii.gz").symlink_to(sri / f"{source}.nii.gz")
    with pytest.raises(InputError, match="affine differs") as err:
        case_tissue(case, tmp_path / "out")
    assert err.value.path.name == "wm.nii.gz"


def test_sri24_lands_on_a_brats_patient_through_the_affines(data_dir):
    """SRI24 (LAS header) resampled by ANTs onto a BraTS patient (LPS header) is flipped
    along axis 1 by index, as the README measured, and matches the patient's brain."""
    sri = load_image(data_dir / "atlas" / "sri24" / "t1_stripped.nii.gz")
    patient = load_image(data_dir / "brats2015" / "brats_2013_pat0001_1" / "brainmask.nii.gz", kind="mask")
    moved = ants.resample_image_to_target(to_ants(sri.data > 0, sri.affine),
                                          to_ants(patient.data, patient.affine),
                                          interp_type="nearestNeighbor").numpy() > 0.5
    raw_sri = np.squeeze(np.asarray(nib.load(sri.path).dataobj)) > 0
    raw_patient = np.asarray(nib.load(patient.path).dataobj) > 0
    np.testing.assert_array_equal(patient.from_canonical(moved), np.flip(raw_sri, axis=1))
    assert dice(moved, patient.data) > 0.9 > 0.8 > dice(raw_sri, raw_patient)


def test_atlas_registered_to_sri24_finds_its_brain(data_dir, small_atlas):
    """MNI152 -> SRI24 t1_stripped at 4 mm, affine only: brain Dice against SRI24's tissues
    (measured 0.973-0.975 over runs, ANTs samples the metric at random; 0.968-0.970 at 1 mm
    from a 2 mm registration in scripts/benchmark_anatomy.py)."""
    sri = data_dir / "atlas" / "sri24"
    target = _block_mean(load_image(sri / "t1_stripped.nii.gz"), 4)
    labels = load_image(sri / "tissues.nii.gz", kind="label")
    brain = _block_mean(labels.with_data((labels.data > 0).astype(np.float32)), 4)
    reg = register_atlas(target, deformable=False, resolution_mm=None, atlas=small_atlas)
    assert dice(reg.maps["brain"] > 0.5, brain.data > 0.5) > 0.95


def test_registration_intensity_of_a_brats_case_separates_its_csf_rim(data_dir):
    """BRATS 2015 pat0002 (z-scored T1c, a wide CSF rim): its dark rim is kept at or above
    FOREGROUND_FLOOR, apart from the background (0 everywhere outside its brain mask)."""
    case = data_dir / "brats2015" / "brats_2013_pat0002_1"
    t1c = load_image(case / "T1c_subtrMeanDivStd.nii.gz")
    brain = load_image(case / "brainmask.nii.gz", kind="mask").data.astype(bool)
    out = registration_intensity(t1c.data)
    assert not out[~brain].any()
    # A few mask voxels equal the background value (the stripped image is 0 there).
    inside = out[brain]
    assert np.mean(inside >= FOREGROUND_FLOOR) > 0.99 and np.mean(inside < 0.25) > 0.02


# --------------------------------------------------------------------------- command line


def _atlas_case(folder, small_atlas):
    """A 4 mm case: the atlas T1 shifted by 6 mm as t1c, a 10 mm tumour sphere as seg."""
    folder.mkdir()
    t1 = small_atlas["t1"]
    shifted = t1.affine.copy()
    shifted[:3, 3] += [6.0, 0.0, -4.0]
    _save(folder / "t1c.nii.gz", t1.data, shifted)
    centre = np.argwhere(t1.data > 0).mean(axis=0) + [6, 3, 2]
    sphere = np.linalg.norm((np.indices(t1.shape).T - centre).T, axis=0) * 4 <= 10
    _save(folder / "seg.nii.gz", sphere.astype(np.uint8), shifted)
    return folder


def test_cli_tissue_registers_the_atlas_and_reuses_its_output(tmp_path, small_atlas):
    case = _atlas_case(tmp_path / "case", small_atlas)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["tissue", str(case), "--out", str(out), "--affine-only"])
    assert result.exit_code == 0, result.output
    assert "registering the MNI152 atlas" in result.output
    info = json.loads((out / "tissue.json").read_text())
    assert info["source"] == "atlas" and info["tumour_masked"] and "ANTs Affine" in info["method"]
    wm, gm, csf = (load_image(out / f"{n}.nii.gz", kind="probability").data for n in ("wm", "gm", "csf"))
    brain = load_image(out / "brain_mask.nii.gz", kind="mask")
    np.testing.assert_allclose(brain.original_affine, nib.load(case / "t1c.nii.gz").affine)
    assert (wm + gm + csf).max() <= 1 + 1e-5 and not (wm + gm + csf)[~brain.data].any()
    assert dice(wm + gm + csf > 0.5, brain.data) > 0.9
    assert (out / "tissue.png").stat().st_size > 1000
    again = CliRunner().invoke(app, ["tissue", str(case), "--out", str(out), "--affine-only"])
    assert again.exit_code == 0 and "reusing the tissue maps" in again.output


def test_cli_tissue_own_maps_and_a_clear_error(tmp_path):
    _own_maps_case(tmp_path / "case")
    result = CliRunner().invoke(app, ["tissue", str(tmp_path / "case"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "tissue from the case" in result.output
    (tmp_path / "case" / "wm.nii.gz").unlink()
    (tmp_path / "case" / "gm.nii.gz").unlink()
    (tmp_path / "case" / "t1c.nii.gz").unlink()
    failed = CliRunner().invoke(app, ["tissue", str(tmp_path / "case"), "--out", str(tmp_path / "o2")])
    assert failed.exit_code == 2 and "no t1 or t1c" in failed.output


def test_case_with_only_a_brain_mask_is_registered_by_its_outline(tmp_path, small_atlas):
    """No t1/t1c (a GliODIL-style case: seg and brainMask only): the atlas brain is
    registered to the case's brain mask, with a warning, and tissue.json says so."""
    case = _atlas_case(tmp_path / "case", small_atlas)
    shifted = nib.load(case / "t1c.nii.gz").affine
    (case / "t1c.nii.gz").unlink()
    _save(case / "brain_mask.nii.gz", (small_atlas["brain"].data > 0.5).astype(np.uint8), shifted)
    with pytest.warns(UserWarning, match="only the brain outline"):
        tissue = case_tissue(case, tmp_path / "out", deformable=False)
    maps = [getattr(tissue, n).data for n in ("wm", "gm", "csf")]
    brain = load_image(case / "brain_mask.nii.gz", kind="mask").data
    assert all(m.min() >= 0 and m.max() <= 1 for m in maps)
    assert sum(maps).max() <= 1 + 1e-5 and not sum(maps)[~brain].any()
    assert dice(sum(maps) > 0.5, brain) > 0.9
    info = json.loads((tmp_path / "out" / "tissue.json").read_text())
    assert info["target"] == "brain_mask (no T1/T1c)" and "mean squares" in info["metric"]
    assert info["registered_to"].endswith("brain_mask.nii.gz") and info["tumour_masked"]
    # The outline alone recovers the 6 mm / -4 mm shift of _atlas_case (measured within 0.1 mm).
    affine = np.asarray(info["affine_case_to_atlas_ras"])
    np.testing.assert_allclose(affine[:3, 3], [-6.0, 0.0, 4.0], atol=1.0)
    np.testing.assert_allclose(affine[:3, :3], np.eye(3), atol=0.02)
    (case / "brain_mask.nii.gz").unlink()
    with pytest.raises(InputError, match="no t1 or t1c"):
        case_tissue(case, tmp_path / "out2")


def test_fit_loader_falls_back_to_the_atlas_and_caches_it(tmp_path, small_atlas, monkeypatch):
    import rtjax.anatomy
    from rtjax.pipeline.inputs import load_segmented_case

    affine_only = functools.partial(rtjax.anatomy.case_tissue, deformable=False)
    monkeypatch.setattr(rtjax.anatomy, "case_tissue", affine_only)
    case = _atlas_case(tmp_path / "case", small_atlas)
    with pytest.warns(UserWarning, match="MNI152 atlas registered"):
        files, _, masks, images = load_segmented_case(
            case, labels="brats2021", atlas_tissue_dirs=(tmp_path / "out" / "tissue",))
    assert files["tissue"].as_posix() == "tissue/tissue.json"
    assert images["wm"].shape == images["seg"].shape and (images["wm"].data > 0.5).any()
    json_file = tmp_path / "out" / "tissue" / "tissue.json"
    assert json.loads(json_file.read_text())["tumour_mask"] == "given tumour mask"
    stamp = json_file.stat().st_mtime_ns
    with pytest.warns(UserWarning):
        load_segmented_case(case, labels="brats2021", atlas_tissue_dirs=(tmp_path / "out" / "tissue",))
    assert json_file.stat().st_mtime_ns == stamp
    with pytest.raises(InputError, match="no tissue map"):
        load_segmented_case(case, labels="brats2021")
