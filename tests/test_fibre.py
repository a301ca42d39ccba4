"""Anisotropic growth on the real whole-brain DTI (TractSeg FA + peaks)."""

import json

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from rtjax.cli import app
from rtjax.experiments.fibre_study import run_fibre_study, spread_along_fibre


def test_spread_ratio_of_an_analytic_ellipsoid():
    x = np.indices((41, 41, 41)).reshape(3, -1).T - 20.0
    v = np.array([1.0, 1.0, 0.0]) / np.sqrt(2)
    along = x @ v
    across2 = (x**2).sum(1) - along**2
    density = np.exp(-(along**2) / (2 * 6.0**2) - across2 / (2 * 3.0**2)).reshape(41, 41, 41)
    assert abs(spread_along_fibre(density, (1.0, 1.0, 1.0), v) - 2.0) < 0.02


@pytest.mark.slow
def test_tumour_in_the_corticospinal_tract_elongates_along_its_fibres(data_dir, tmp_path):
    (run,) = run_fibre_study(data_dir, tmp_path, tracts=("corticospinal tract",), days=100.0)
    assert abs(run.fibre_direction[2]) > 0.8  # superior-inferior fibres at the seed
    assert run.ratio_isotropic < 1.2
    assert run.ratio_anisotropic > 1.3 * run.ratio_isotropic
    saved = json.loads((tmp_path / "fibre_study.json").read_text())
    assert saved["runs"][0]["tract"] == "corticospinal tract"
    assert (tmp_path / "fibre_study.png").stat().st_size > 10_000


@pytest.mark.slow
def test_simulate_command_with_fa_and_peaks(data_dir, tmp_path):
    from rtjax.atlas import atlas_tissue_paths
    from rtjax.io import load_image, resample_image, save_image

    folder = data_dir / "dti" / "tractseg"
    fa = load_image(folder / "FA.nii.gz")
    brain = load_image(folder / "nodif_brain_mask.nii.gz", kind="mask").data
    for name, path in atlas_tissue_paths("mni152").items():
        on_grid = resample_image(load_image(path, kind="probability"), fa) * brain
        save_image(np.clip(on_grid, 0, 1), fa, tmp_path / f"{name}.nii.gz", kind="float")
    out = tmp_path / "density.nii.gz"
    args = ["simulate", "--no-progress", "--wm", tmp_path / "wm.nii.gz", "--gm",
            tmp_path / "gm.nii.gz", "--fa", folder / "FA.nii.gz", "--peaks",
            folder / "peaks.nii.gz", "--anisotropy", 3, "--origin-mm", -22.5, -16, 8,
            "--dw", 0.2, "--rho", 0.05, "--days", 60, "--out", out]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    written = nib.load(out)
    assert written.shape == nib.load(folder / "FA.nii.gz").shape
    density = np.asarray(written.dataobj)
    assert density.min() >= 0 and 0.5 < density.max() <= 1
    sidecar = json.loads((tmp_path / "density.json").read_text())
    assert sidecar["anisotropic"]["anisotropy"] == 3.0
    assert sidecar["anisotropic"]["stencil_offsets"] > 3
