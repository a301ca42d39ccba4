"""`rtjax simulate` end to end: real tissue, the MNI atlas, oblique files and bad input."""

import json

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from rtjax.cli import app

runner = CliRunner()


def _simulate(*args):
    return runner.invoke(app, ["simulate", "--no-progress", *map(str, args)])


def test_simulate_on_lipkova_patient_own_tissue(data_dir, tmp_path):
    case = data_dir / "lipkova-patient"
    wm_img = nib.load(case / "WM.nii.gz")
    wm = np.asarray(wm_img.dataobj)
    # A voxel deep in white matter, as a user would pick it in a viewer.
    ijk = np.array([147, 144, 80])
    assert wm[tuple(ijk)] > 0
    out = tmp_path / "density.nii.gz"
    result = _simulate("--tissue", case, "--origin-vox", *ijk, "--dw", 0.2, "--rho", 0.05,
                       "--days", 40, "--out", out)
    assert result.exit_code == 0, result.output
    written = nib.load(out)
    assert written.shape == wm_img.shape
    np.testing.assert_allclose(written.affine, wm_img.affine, atol=1e-6)
    assert written.get_data_dtype() == np.float32
    density = np.asarray(written.dataobj)
    assert 0.0 <= density.min() and density.max() <= 1.0
    peak = np.array(np.unravel_index(np.argmax(density), density.shape))
    assert np.abs(peak - ijk).max() <= 3  # heterogeneous tissue shifts the peak a little
    gm = np.asarray(nib.load(case / "GM.nii.gz").dataobj)
    assert np.all(density[(wm == 0) & (gm == 0)] == 0)
    sidecar = json.loads((tmp_path / "density.json").read_text())
    assert sidecar["dw_mm2_per_day"] == 0.2 and sidecar["days"] == 40
    assert sidecar["tissue"]["wm"].endswith("WM.nii.gz")
    assert sidecar["origin_canonical_voxel"] == [147.0, 144.0, 80.0]  # identity affine


def test_simulate_on_mni_atlas_puts_the_seed_at_the_world_coordinate(tmp_path):
    out = tmp_path / "mni.nii"
    origin_mm = np.array([-28.0, 10.0, 24.0])
    result = _simulate("--atlas", "mni152", "--origin-mm", *origin_mm, "--dw", 0.1,
                       "--rho", 0.1, "--days", 30, "--out", out)
    assert result.exit_code == 0, result.output
    img = nib.load(out)
    assert img.shape == (197, 233, 189)
    density = np.asarray(img.dataobj)
    peak = np.array(np.unravel_index(np.argmax(density), density.shape))
    peak_mm = nib.affines.apply_affine(img.affine, peak)
    assert np.abs(peak_mm - origin_mm).max() <= 1.0
    assert img.header["sform_code"] > 0 and img.header["qform_code"] > 0


def _oblique_lps_tissue(folder):
    """wm/gm on an oblique, LPS-ish, anisotropic grid, with CSF on one side."""
    angle = np.deg2rad(15)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([-1.2, -0.9, 1.5])
    affine[:3, 3] = [20.0, 15.0, -10.0]
    wm = np.full((24, 30, 18), 0.8, np.float32)
    gm = np.full_like(wm, 0.2)
    wm[:4] = gm[:4] = 0.0
    folder.mkdir()
    nib.save(nib.Nifti1Image(wm, affine), folder / "wm.nii.gz")
    nib.save(nib.Nifti1Image(gm, affine), folder / "gm.nii.gz")
    return affine


def test_origin_voxel_is_in_the_files_own_index_space(tmp_path):
    case = tmp_path / "case"
    affine = _oblique_lps_tissue(case)
    out = tmp_path / "density.nii.gz"
    result = _simulate("--tissue", case, "--origin-vox", 12, 10, 7, "--dw", 0.3, "--rho", 0.1,
                       "--days", 20, "--out", out)
    assert result.exit_code == 0, result.output
    img = nib.load(out)
    density = np.asarray(img.dataobj)
    np.testing.assert_allclose(img.affine, affine, atol=1e-6)
    assert np.unravel_index(np.argmax(density), density.shape) == (12, 10, 7)
    assert np.all(density[:4] == 0)
    # The same seed given in world mm gives the same density.
    out_mm = tmp_path / "density_mm.nii.gz"
    origin_mm = nib.affines.apply_affine(affine, [12, 10, 7])
    result = _simulate("--tissue", case, "--origin-mm", *origin_mm, "--dw", 0.3, "--rho", 0.1,
                       "--days", 20, "--out", out_mm)
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(np.asarray(nib.load(out_mm).dataobj), density, atol=1e-6)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--origin-vox", 2, 10, 7], "outside tissue"),
        (["--origin-vox", 99, 10, 7], "outside the image"),
        (["--origin-vox", 12, 10, 7, "--origin-mm", 0, 0, 0], "exactly one"),
        (["--origin-vox", 12, 10, 7, "--dw", -1], "dw must be"),
    ],
)
def test_bad_simulate_requests_fail_clearly_and_write_nothing(tmp_path, extra, message):
    case = tmp_path / "case"
    _oblique_lps_tissue(case)
    out = tmp_path / "density.nii.gz"
    args = ["--tissue", case, "--rho", 0.1, "--days", 5, "--out", out]
    if "--dw" not in extra:
        args += ["--dw", 0.3]
    result = _simulate(*args, *extra)
    assert result.exit_code == 2
    assert message in result.output
    assert list(tmp_path.iterdir()) == [case]


def test_missing_tissue_map_names_the_folder(tmp_path):
    case = tmp_path / "case"
    _oblique_lps_tissue(case)
    (case / "gm.nii.gz").unlink()
    result = _simulate("--tissue", case, "--origin-vox", 12, 10, 7, "--dw", 0.3, "--rho", 0.1,
                       "--days", 5, "--out", tmp_path / "d.nii.gz")
    assert result.exit_code == 2
    assert str(case) in result.output and "gm" in result.output


def test_solving_on_the_tissue_box_equals_solving_on_the_whole_grid(tmp_path):
    """simulate_density crops to the tissue's bounding box: exact, since no density can
    enter voxels without tissue."""
    import jax.numpy as jnp

    from growth import FKParams, FKSimulator, Grid
    from rtjax.simulate import load_tissue, simulate_density

    case = tmp_path / "case"
    _oblique_lps_tissue(case)
    wm = np.asarray(nib.load(case / "wm.nii.gz").dataobj)
    wm_pad = np.pad(wm, 6)  # background all around: the box is smaller than the grid
    affine = nib.load(case / "wm.nii.gz").affine
    padded = tmp_path / "padded"
    padded.mkdir()
    nib.save(nib.Nifti1Image(wm_pad, affine), padded / "wm.nii.gz")
    nib.save(nib.Nifti1Image(np.where(wm_pad > 0, 0.2, 0).astype(np.float32), affine), padded / "gm.nii.gz")
    tissue = load_tissue(padded)
    result = simulate_density(tissue, dw=0.3, rho=0.1, days=20, origin_vox=(18, 16, 13))
    assert result.info["solved_box"] != [[0, n] for n in tissue.reference.shape]
    ref = tissue.reference
    grid = Grid(ref.shape, ref.spacing)
    sim = FKSimulator.create(tissue.wm.data, tissue.gm.data, grid, dw_max=0.3, t_max=20.0)
    index = np.asarray(result.info["origin_canonical_voxel"])
    full = np.asarray(sim(FKParams(0.3, 0.1), jnp.asarray(index * np.asarray(ref.spacing)), 20.0))
    np.testing.assert_allclose(result.density, full, atol=1e-6)
