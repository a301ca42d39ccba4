"""DTI in the pipeline (#12): a case's tensor or FA + peaks is validated like every other
input (one line naming the file, nothing written, before the fit), resampled onto the case
grid with the tensors rotated, and the fit then grows along the fibres; params.json records
the tensor source, its frame and r."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

import rtjax.pipeline.case
from rtjax.cli import app
from rtjax.io import load_image
from rtjax.labels import TumourMasks, combine_labels
from rtjax.pipeline.case import run_case
from rtjax.pipeline.inputs import load_case_dti

SHAPE = (20, 20, 20)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def _save(path: Path, data, affine=AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), affine), path)
    return path


def _fibre_tensor(direction=(1.0, 1.0, 0.0), shape=SHAPE) -> np.ndarray:
    """(X, Y, Z, 6) FSL-order tensors, principal direction `direction` (voxel axes of a
    positive-determinant RAS file: FSL negates x), eigenvalues (1.7, 0.3, 0.3) um^2/ms."""
    v = np.asarray(direction, float)
    v /= np.linalg.norm(v)
    v_fsl = v * np.array([-1.0, 1.0, 1.0])
    d = 0.3e-3 * np.eye(3) + 1.4e-3 * np.outer(v_fsl, v_fsl)
    six = np.array([d[0, 0], d[0, 1], d[0, 2], d[1, 1], d[1, 2], d[2, 2]], np.float32)
    return np.broadcast_to(six, (*shape, 6)).copy()


@pytest.fixture
def case(tmp_path) -> Path:
    """A small case: a cubic core in edema on uniform tissue, 2 mm voxels."""
    folder = tmp_path / "case"
    core = np.zeros(SHAPE, bool)
    core[8:12, 8:12, 8:12] = True
    edema = np.zeros(SHAPE, bool)
    edema[6:14, 6:14, 6:14] = True
    seg = combine_labels(TumourMasks(necrosis=np.zeros(SHAPE, bool), enhancing=core,
                                     edema=edema & ~core), "brats2021")
    tissue = np.zeros(SHAPE, np.float32)
    tissue[1:19, 1:19, 1:19] = 0.5
    _save(folder / "seg.nii.gz", seg)
    _save(folder / "wm.nii.gz", tissue)
    _save(folder / "gm.nii.gz", tissue)
    return folder


def _refused(args, text: str, out: Path):
    result = CliRunner().invoke(app, [str(a) for a in args])
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert result.exit_code == 2 and len(errors) == 1, result.output
    assert text in errors[0], errors[0]
    assert "Traceback" not in result.output
    assert not [p for p in out.parent.iterdir() if p.name.startswith(out.name)]
    return errors[0]


def test_bad_dti_inputs_are_refused_naming_the_file_before_the_fit(case, tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the fit started before the DTI error")

    monkeypatch.setattr(rtjax.pipeline.case, "fit_case", forbidden)
    out = tmp_path / "out"
    base = ["run", case, "--out", out, "--labels", "brats2021", "--no-progress"]
    good = _fibre_tensor()
    bad_cases = {
        "five.nii.gz": (good[..., :5], "six volumes"),
        "three.nii.gz": (good[..., :3], "six volumes"),
        "nan.nii.gz": (np.where(np.indices(SHAPE)[0][..., None] == 3, np.nan, good), "non-finite"),
        "indefinite.nii.gz": (good * np.array([1, 0, 0, -1, 0, 1], np.float32), "positive semi-definite"),
    }
    for name, (data, text) in bad_cases.items():
        path = _save(tmp_path / "dti" / name, data)
        line = _refused([*base, "--tensor", path], text, out)
        assert name in line
    # a DTI in another place of the world (a 200 mm shift) does not cover the tumour
    far = _save(tmp_path / "dti" / "far.nii.gz", good,
                np.array([[2.0, 0, 0, 200.0], [0, 2.0, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1]]))
    assert "far.nii.gz" in _refused([*base, "--tensor", far], "covers 0% of the tumour", out)
    fa = _save(tmp_path / "dti" / "fa.nii.gz", np.full(SHAPE, 0.5, np.float32))
    assert "fa.nii.gz" in _refused([*base, "--fa", fa], "give both --fa and --peaks", out)
    assert "--anisotropy 0.5" in _refused([*base, "--tensor", far, "--anisotropy", "0.5"],
                                          "--anisotropy", out)


def test_load_case_dti_rotates_into_the_case_frame(case, tmp_path):
    """A tensor stored on an LPS grid (x and y flipped) reaches the RAS-canonical case grid
    with the fibre direction's sign pattern preserved in world axes."""
    reference = load_image(case / "seg.nii.gz", kind="label")
    lps = np.diag([-2.0, -2.0, 2.0, 1.0])
    lps[:3, 3] = [38.0, 38.0, 0.0]  # the same world box as the case
    direction = np.array([1.0, 1.0, 0.0])
    v = direction / np.linalg.norm(direction)
    # the stored voxel axes of LPS are (-x, -y, z) in world; the affine's determinant is
    # positive, so FSL's convention negates the first component once more
    v_fsl = v * np.array([-1.0, -1.0, 1.0]) * np.array([-1.0, 1.0, 1.0])
    d = 0.3e-3 * np.eye(3) + 1.4e-3 * np.outer(v_fsl, v_fsl)
    six = np.array([d[0, 0], d[0, 1], d[0, 2], d[1, 1], d[1, 2], d[2, 2]], np.float32)
    path = _save(tmp_path / "lps_tensor.nii.gz", np.broadcast_to(six, (*SHAPE, 6)).copy(), lps)
    lesion = np.zeros(SHAPE, bool)
    lesion[8:12, 8:12, 8:12] = True
    t6, record = load_case_dti({"tensor": path}, reference, lesion)
    centre = t6[:, 10, 10, 10]
    m = np.array([[centre[0], centre[1], centre[2]], [centre[1], centre[3], centre[4]],
                  [centre[2], centre[4], centre[5]]])
    vals, vecs = np.linalg.eigh(m)
    assert abs(abs(vecs[:, -1] @ v) - 1.0) < 1e-4  # the world direction (1, 1, 0) / sqrt(2)
    assert record["frame"] == "fsl" and record["tumour_coverage"] == 1.0
    assert record["tensor"] == str(path)


@pytest.mark.slow
def test_run_with_a_tensor_fits_the_anisotropic_model_and_records_it(case, tmp_path):
    tensor = _save(case / "tensor.nii.gz", _fibre_tensor())
    out = tmp_path / "out"
    summary = run_case(case, out, labels="brats2021", initial="heuristic", fit_iterations=8,
                       anisotropy=(2.0, 8.0), progress=False)
    params = json.loads((out / "params.json").read_text())
    dti = params["fit"]["dti"]
    assert dti["tensor_given"] and dti["tensor"] == str(tensor) and dti["frame"] == "fsl"
    aniso = params["fit"]["anisotropic"]
    assert aniso["tensor_given"] and aniso["anisotropy_fitted"]
    assert 2.0 <= aniso["anisotropy"] <= 8.0 and aniso["anisotropy_bounds"] == [2.0, 8.0]
    assert params["options"]["anisotropy"] == [2.0, 8.0]
    assert summary["status"] == "done" and (out / "density.nii.gz").is_file()
