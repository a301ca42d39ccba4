"""DICOM in and RTSTRUCT out through `rtjax run` (#13): a case whose T1c and FLAIR arrive as
DICOM series (role subfolders, or one folder of mixed series picked by --series), converted
inside the atomic .partial folder, kept in the outputs, and an RT Structure Set written on
the finished output that refers to the case's own series. 28 x 28 x 24 voxels at 2 mm."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pydicom
import pytest
from scipy.ndimage import binary_dilation, gaussian_filter
from typer.testing import CliRunner

import rtjax.pipeline.case
from growth import FKParams, FKSimulator, Grid, visible_masks
from rtjax.cli import app
from rtjax.io import Image
from rtjax.labels import TumourMasks, combine_labels
from rtjax.pipeline import run_case
from rtjax.rtstruct import write_mr_series

SHAPE = (28, 28, 24)
AFFINE = np.diag([-2.0, -2.0, 2.0, 1.0])  # stored LPS, as DICOM is
AFFINE[:3, 3] = [27.0, 30.0, -20.0]


@pytest.fixture(scope="module")
def dicom_case(tmp_path_factory):
    """scans/a (T1c) and scans/b (FLAIR): two DICOM series in one folder; seg, wm, gm and
    recurrence as NIfTI on the same grid. Returns (case folder, {role: series UID})."""
    root = tmp_path_factory.mktemp("dicom")
    case = root / "case"
    rng = np.random.default_rng(5)
    idx = np.indices(SHAPE).astype(float)
    centre = (np.array(SHAPE) - 1) / 2
    head = (((idx - centre[:, None, None, None]) / (np.array(SHAPE)[:, None, None, None] / 2 - 1.5)) ** 2).sum(0) <= 1
    wm = np.where(head, np.clip(gaussian_filter(rng.uniform(size=SHAPE), 2) * 4 - 1.2, 0, 1) * 0.7 + 0.3, 0)
    wm = wm.astype(np.float32)
    gm = np.where(head, 0.9 * (1 - wm), 0).astype(np.float32)
    sim = FKSimulator.create(wm, gm, Grid(SHAPE, (2.0, 2.0, 2.0)), dw_max=12.0, t_max=1.0)
    density = np.asarray(sim(FKParams(12.0, 5.0), np.array([28.0, 28.0, 22.0]), 1.0))
    core, edema = (np.asarray(m) for m in visible_masks(density, 0.7, 0.2))
    seg = combine_labels(TumourMasks(np.zeros_like(core), core, edema), "brats2021")
    shell = binary_dilation(core, iterations=2) & ~binary_dilation(core, iterations=1)
    case.mkdir()
    for name, data in (("seg", seg), ("wm", wm), ("gm", gm), ("recurrence", shell.astype(np.uint8))):
        nib.save(nib.Nifti1Image(data, AFFINE), case / f"{name}.nii.gz")
    uids = {}
    for role, folder, data in (("t1c", "a", wm * 300 + gm * 200 + 400 * core),
                               ("flair", "b", wm * 200 + gm * 300 + 500 * (core | edema))):
        image = Image.from_array(data.astype(np.float32), AFFINE)
        uids[role] = write_mr_series(image, case / "scans" / folder,
                                     patient={"PatientID": "D1"}).series_instance_uid
    return case, uids


def test_run_a_dicom_case_with_series_uids_and_rtstruct(dicom_case, tmp_path):
    case, uids = dicom_case
    out = tmp_path / "out"
    summary = run_case(case, out, labels="brats2021", series=uids, rtstruct=True, cutoffs=(0.1,),
                       initial="network", fit_iterations=15, progress=False)
    names = sorted(p.name for p in out.iterdir())
    assert {"dicom", "rtstruct.dcm", "ctv_model_c0.1.nii.gz", "report.html"} <= set(names)
    assert "mr_t1c" not in names  # the structure set refers to the case's own series
    assert sorted(summary["outputs"]) == sorted(names)
    record = json.loads((out / "dicom" / "dicom_series.json").read_text())
    assert {r: record["series"][r]["series_instance_uid"] for r in ("t1c", "flair")} == uids
    converted = nib.load(out / "dicom" / "t1c.nii.gz")
    np.testing.assert_allclose(converted.affine, AFFINE, atol=1e-4)
    params = json.loads((out / "params.json").read_text())
    assert params["inputs"]["t1c"] == str(out.absolute() / "dicom" / "t1c.nii.gz")
    assert params["options"]["series"] == uids and params["options"]["rtstruct"] is True
    ds = pydicom.dcmread(out / "rtstruct.dcm")
    referenced = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]
    assert referenced.RTReferencedSeriesSequence[0].SeriesInstanceUID == uids["t1c"]
    assert [r.ROIName for r in ds.StructureSetROISequence] == [
        "GTV", "Edema", "CTV_standard_15mm", "CTV_model", "CTV_model_c0.1"]
    assert ds.PatientID == "D1"
    assert not (tmp_path / "out.partial").exists() and not (tmp_path / "out.lock").exists()


def test_dicom_role_folders_are_converted_inside_the_partial_folder(dicom_case, tmp_path, monkeypatch):
    """Role subfolders need no UIDs; the conversion lands in OUT.partial/dicom before the
    case's files are found, and a run that fails later leaves nothing behind."""
    case, _ = dicom_case
    roles = tmp_path / "roles"
    roles.mkdir()
    for name in ("seg", "wm", "gm"):
        (roles / f"{name}.nii.gz").symlink_to(case / f"{name}.nii.gz")
    (roles / "t1c").symlink_to(case / "scans" / "a", target_is_directory=True)
    (roles / "FLAIR").symlink_to(case / "scans" / "b", target_is_directory=True)
    seen = {}

    def stop(masks, wm, gm, spacing, **kwargs):
        partial = tmp_path / "out.partial" / "dicom"
        seen["files"] = sorted(p.name for p in partial.iterdir())
        raise KeyboardInterrupt

    monkeypatch.setattr(rtjax.pipeline.case, "fit_case", stop)
    with pytest.raises(KeyboardInterrupt):
        run_case(roles, tmp_path / "out", labels="brats2021", progress=False)
    assert seen["files"] == ["dicom_series.json", "flair.nii.gz", "t1c.nii.gz"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["roles"]
    # Mixed series without --series: one line that says what to do.
    result = CliRunner().invoke(app, ["run", str(case), "--out", str(tmp_path / "o"),
                                      "--labels", "brats2021"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "DICOM files but no role subfolder" in result.output and "--series ROLE=UID" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["roles"]
