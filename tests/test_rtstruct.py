"""RT Structure Set out: contours along the pixel edges, the MR series written from a NIfTI,
and round trips read back by a reader independent of the writer (pydicom for the RTSTRUCT,
SimpleITK/GDCM for the series geometry, matplotlib's point-in-polygon with the even-odd rule
of planning systems), on an axial grid, an oblique anisotropic one, and a DICOM-in series.

`pytest tests/test_rtstruct.py -s` prints the Dice / volume table of every round trip."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import matplotlib.path as mpath
import nibabel as nib
import numpy as np
import pydicom
import pytest
import shapely
import SimpleITK as sitk
from test_dicom import distinct, make_affine, write_series
from typer.testing import CliRunner

from rtjax.cli import app
from rtjax.dicom import DICOM_DIR, convert_case_dicom, read_series
from rtjax.errors import InputError
from rtjax.io import Image, load_image, save_image
from rtjax.labels import TumourMasks, combine_labels, get_convention
from rtjax.rtstruct import (
    MR_SERIES_DIR,
    RTSTRUCT_FILE,
    ReferencedSeries,
    case_rois,
    export_rtstruct,
    slice_contours,
    write_mr_series,
    write_rtstruct,
)

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
TABLE: list[tuple[str, str, float, float, float]] = []


# --------------------------------------------------------------------------- the reader


def even_odd_fill(polygons, shape) -> np.ndarray:
    """Pixels (C, R) whose centre lies inside an odd number of the (column, row) polygons."""
    centres = np.indices(shape).reshape(2, -1).T
    mask = np.zeros(len(centres), dtype=bool)
    for polygon in polygons:
        mask ^= mpath.Path(polygon).contains_points(centres)
    return mask.reshape(shape)


def read_back(rtstruct: Path, series_dir: Path):
    """ROI masks of an RT Structure Set on its series' grid, read without rtjax.

    Returns (masks {name: (slices, rows, columns) bool}, SimpleITK image of the series)."""
    ds = pydicom.dcmread(rtstruct)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.481.3" and ds.Modality == "RTSTRUCT"
    frame = ds.ReferencedFrameOfReferenceSequence[0]
    ref_series = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    reader = sitk.ImageSeriesReader()
    files = reader.GetGDCMSeriesFileNames(str(series_dir), ref_series.SeriesInstanceUID)
    assert files, "the referenced series is not in the folder"
    reader.SetFileNames(files)
    image = reader.Execute()
    slices = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    assert {s.FrameOfReferenceUID for s in slices} == {frame.FrameOfReferenceUID}
    assert {s.StudyInstanceUID for s in slices} == {ds.StudyInstanceUID}
    assert ds.PatientID == slices[0].PatientID
    sops = {s.SOPInstanceUID for s in slices}
    assert {c.ReferencedSOPInstanceUID for c in ref_series.ContourImageSequence} == sops
    # Patient (LPS) mm -> continuous index (column, row, slice), from SimpleITK's geometry.
    direction = np.array(image.GetDirection()).reshape(3, 3)
    to_index = np.linalg.inv(direction @ np.diag(image.GetSpacing()))
    origin = np.array(image.GetOrigin())
    size = image.GetSize()
    names = {r.ROINumber: r.ROIName for r in ds.StructureSetROISequence}
    masks = {}
    for roi in ds.ROIContourSequence:
        planes: dict[int, list[np.ndarray]] = {}
        for contour in roi.get("ContourSequence", []):
            assert contour.ContourGeometricType == "CLOSED_PLANAR"
            points = np.asarray(contour.ContourData, dtype=np.float64).reshape(-1, 3)
            assert len(points) == contour.NumberOfContourPoints
            index = (points - origin) @ to_index.T
            k = int(round(index[0, 2]))
            np.testing.assert_allclose(index[:, 2], k, atol=1e-3)  # on the slice plane
            assert contour.ContourImageSequence[0].ReferencedSOPInstanceUID == \
                slices[k].SOPInstanceUID
            planes.setdefault(k, []).append(index[:, :2])
        mask = np.zeros(size[::-1], dtype=bool)
        for k, polygons in planes.items():
            mask[k] = even_odd_fill(polygons, size[:2]).T
        masks[names[roi.ReferencedROINumber]] = mask
    return masks, image


def expected_on_series(mask: np.ndarray, reference: Image, image: sitk.Image) -> np.ndarray:
    """The canonical mask looked up at the centre of every voxel of the series (k, r, c)."""
    size = image.GetSize()
    index = np.indices(size[::-1]).reshape(3, -1).T[:, ::-1]  # (c, r, k)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    lps = index @ (direction @ np.diag(image.GetSpacing())).T + np.array(image.GetOrigin())
    ras = lps * [-1, -1, 1]
    voxel = np.round(reference.world_to_voxel(ras)).astype(int)
    assert np.all(voxel >= 0) and np.all(voxel < reference.shape)
    return mask[tuple(voxel.T)].reshape(size[::-1])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def check_round_trip(grid: str, rois, reference: Image, rtstruct: Path, series_dir: Path) -> None:
    masks, image = read_back(rtstruct, series_dir)
    assert list(masks) == list(rois)
    voxel_ml = float(np.prod(image.GetSpacing())) / 1000
    for name, mask in rois.items():
        expected = expected_on_series(mask, reference, image)
        assert np.count_nonzero(expected) == np.count_nonzero(mask)
        got = masks[name]
        d = dice(got, expected)
        v_ref, v_got = np.count_nonzero(expected) * voxel_ml, np.count_nonzero(got) * voxel_ml
        TABLE.append((grid, name, d, v_ref, v_got))
        assert d >= 0.98, (grid, name, d)
        assert abs(v_got - v_ref) <= 0.02 * v_ref, (grid, name, v_ref, v_got)


@pytest.fixture(scope="module", autouse=True)
def print_table():
    yield
    if TABLE:
        print("\n\nRTSTRUCT round trip (independent reader: pydicom + SimpleITK + even-odd "
              "point-in-polygon)")
        print(f"{'grid':<22} {'ROI':<20} {'Dice':>7} {'mask mL':>9} {'read mL':>9} {'diff %':>7}")
        for grid, name, d, v_ref, v_got in TABLE:
            print(f"{grid:<22} {name:<20} {d:7.4f} {v_ref:9.4f} {v_got:9.4f} "
                  f"{100 * (v_got - v_ref) / v_ref:7.2f}")


# --------------------------------------------------------------------------- masks


def ellipsoid(reference: Image, centre_mm, radii_mm) -> np.ndarray:
    world = reference.voxel_to_world(np.indices(reference.shape).reshape(3, -1).T)
    r = np.sum(((world - centre_mm) / radii_mm) ** 2, axis=1)
    return (r <= 1.0).reshape(reference.shape)


def target_rois(reference: Image) -> dict[str, np.ndarray]:
    """Nested tumour-like masks: core, an edema shell around it (holes on its middle
    slices), CTVs, and a cut-off CTV of two blobs, one with a concave notch."""
    centre = reference.voxel_to_world(np.array(reference.shape) / 2 - 0.5)
    core = ellipsoid(reference, centre, (5.0, 6.0, 7.0))
    whole = ellipsoid(reference, centre, (8.0, 9.0, 10.0))
    standard = ellipsoid(reference, centre, (11.0, 12.0, 12.0))
    model = ellipsoid(reference, centre + (1.0, -1.0, 0.5), (10.0, 13.0, 11.0))
    blob = ellipsoid(reference, centre + (-4.0, 3.0, 0.0), (4.0, 4.0, 6.0))
    notch = ellipsoid(reference, centre + (-6.0, 5.0, 0.0), (2.0, 2.0, 8.0))
    blob2 = ellipsoid(reference, centre + (6.0, -5.0, 2.0), (3.0, 3.0, 4.0))
    return {"GTV": core, "Edema": whole & ~core, "CTV_standard_15mm": standard,
            "CTV_model": model, "CTV_model_c0.01": (blob & ~notch) | blob2}


def t1c_image(affine, shape, seed=0) -> Image:
    rng = np.random.default_rng(seed)
    return Image.from_array(rng.normal(500.0, 80.0, shape).astype(np.float32), affine)


# --------------------------------------------------------------------------- contours


def test_slice_contours_follow_the_pixel_edges():
    single = np.zeros((3, 3), bool)
    single[1, 1] = True
    (square,) = slice_contours(single)
    assert sorted(map(tuple, square)) == [(0.5, 0.5), (0.5, 1.5), (1.5, 0.5), (1.5, 1.5)]
    ell = np.zeros((4, 4), bool)
    ell[0:3, 0] = ell[0, 0:3] = True
    (outline,) = slice_contours(ell)
    assert len(outline) == 6  # collinear vertices dropped
    ring = np.ones((5, 5), bool)
    ring[2, 2] = False
    outer, hole = slice_contours(ring)
    assert len(outer) == 4 and sorted(map(tuple, hole)) == [(1.5, 1.5), (1.5, 2.5), (2.5, 1.5), (2.5, 2.5)]
    diagonal = np.eye(2, dtype=bool)
    assert len(slice_contours(diagonal)) == 2
    assert slice_contours(np.zeros((4, 4), bool)) == []


@pytest.mark.parametrize("seed", range(5))
def test_even_odd_fill_of_the_contours_is_the_mask(seed):
    rng = np.random.default_rng(seed)
    mask = rng.random((17, 13)) < (0.3 + 0.1 * seed)
    polygons = slice_contours(mask)
    np.testing.assert_array_equal(even_odd_fill(polygons, mask.shape), mask)
    # The even-odd region of the rings (their symmetric difference) has the mask's area.
    region = functools.reduce(shapely.symmetric_difference, [shapely.Polygon(p) for p in polygons])
    assert region.area == pytest.approx(mask.sum())


# --------------------------------------------------------------------------- MR series


@pytest.mark.parametrize("grid", ["axial", "oblique"])
def test_mr_series_keeps_the_t1c_grid_and_intensities(tmp_path, grid):
    affine = (np.diag([-1.0, -1.0, 1.0, 1.0]) if grid == "axial"
              else make_affine("sagittal", spacing=(0.9, 1.3, 2.5)))
    if grid == "axial":
        affine[:3, 3] = (10.0, 20.0, -5.0)
    t1c = t1c_image(affine, (12, 10, 8))
    series = write_mr_series(t1c, tmp_path / "mr", patient={"PatientID": "X1"})
    files = sorted((tmp_path / "mr").iterdir())
    assert len(files) == 8
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "mr")))
    other = reader.Execute()
    direction = np.array(other.GetDirection()).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction @ np.diag(other.GetSpacing())
    lps[:3, 3] = other.GetOrigin()
    np.testing.assert_allclose(LPS @ lps, affine, atol=1e-5)
    np.testing.assert_allclose(series.affine, affine, atol=1e-5)
    values = sitk.GetArrayFromImage(other).transpose(2, 1, 0)
    original = t1c.from_canonical(t1c.data).astype(np.float64)
    lo, hi = original.min(), original.max()
    np.testing.assert_allclose(values, (original - lo) / (hi - lo) * 4095, atol=0.5 + 1e-6)
    assert values.min() == 0 and values.max() == 4095
    ds = pydicom.dcmread(files[0])
    assert ds.Modality == "MR" and ds.PatientID == "X1" and ds.SeriesInstanceUID == series.series_instance_uid
    # rtjax's own DICOM reader agrees with SimpleITK.
    image, record = read_series(tmp_path / "mr")
    np.testing.assert_allclose(image.affine, t1c.affine, atol=1e-5)
    assert [s["sop_instance_uid"] for s in record["slices"]] == list(series.sop_instance_uids)


def test_sheared_grid_cannot_be_a_dicom_series(tmp_path):
    affine = np.eye(4)
    affine[0, 2] = 0.5
    with pytest.raises(InputError, match="sheared"):
        write_mr_series(t1c_image(affine, (4, 4, 4)), tmp_path / "mr")


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("grid", ["axial 1 mm", "oblique 0.9x1.3x2.5 mm"])
def test_rtstruct_round_trip_on_the_mr_series(tmp_path, grid):
    if grid.startswith("axial"):
        affine = np.diag([-1.0, -1.0, 1.0, 1.0])  # BraTS-like LPS axial
        affine[:3, 3] = (15.5, 15.5, -12.0)
        shape = (32, 32, 28)
    else:
        affine = make_affine("sagittal", spacing=(0.9, 1.3, 2.5))
        shape = (32, 26, 14)
    t1c = t1c_image(affine, shape)
    rois = target_rois(t1c)
    assert all(m.sum() > 20 for m in rois.values())
    series = write_mr_series(t1c, tmp_path / "mr")
    path = write_rtstruct(tmp_path / "rtstruct.dcm", rois, t1c, series)
    check_round_trip(grid, rois, t1c, path, tmp_path / "mr")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_rtstruct_round_trip_on_a_dicom_input_series(tmp_path):
    """The case came as an oblique, non-axial DICOM series: the RTSTRUCT refers to it."""
    affine = make_affine("coronal", spacing=(1.1, 0.8, 2.0))
    data = distinct((30, 28, 14))
    write_series(tmp_path / "case" / "t1c", data, affine)
    files, record = convert_case_dicom(tmp_path / "case", tmp_path / "out" / DICOM_DIR)
    reference = load_image(files["t1c"])
    rois = target_rois(reference)
    series = ReferencedSeries.from_record(record["series"]["t1c"])
    assert series.series_instance_uid == record["series"]["t1c"]["series_instance_uid"]
    path = write_rtstruct(tmp_path / "rtstruct.dcm", rois, reference, series)
    check_round_trip("DICOM-in coronal obl.", rois, reference, path, tmp_path / "case" / "t1c")


def test_empty_roi_has_no_contours(tmp_path):
    t1c = t1c_image(np.diag([-1.0, -1.0, 1.0, 1.0]), (10, 10, 6))
    series = write_mr_series(t1c, tmp_path / "mr")
    rois = {"GTV": ellipsoid(t1c, t1c.voxel_to_world(np.array([5, 5, 3])), (3, 3, 2)),
            "Edema": np.zeros(t1c.shape, bool)}
    path = write_rtstruct(tmp_path / "rt.dcm", rois, t1c, series)
    ds = pydicom.dcmread(path)
    assert [r.ROIName for r in ds.StructureSetROISequence] == ["GTV", "Edema"]
    assert "ContourSequence" not in ds.ROIContourSequence[1]
    masks, image = read_back(path, tmp_path / "mr")
    assert not masks["Edema"].any()
    assert masks["GTV"].sum() == rois["GTV"].sum() > 0


def test_rtstruct_refuses_masks_on_another_grid(tmp_path):
    t1c = t1c_image(np.diag([-1.0, -1.0, 1.0, 1.0]), (8, 8, 6))
    series = write_mr_series(t1c, tmp_path / "mr")
    other = t1c_image(np.diag([-1.0, -1.0, 2.0, 1.0]), (8, 8, 6))
    with pytest.raises(InputError, match="not the grid of the referenced series"):
        write_rtstruct(tmp_path / "rt.dcm", {"GTV": other.data > 500}, other, series)
    with pytest.raises(ValueError, match="mask shape"):
        write_rtstruct(tmp_path / "rt.dcm", {"GTV": np.zeros((2, 2, 2), bool)}, t1c, series)
    assert not (tmp_path / "rt.dcm").exists()


# --------------------------------------------------------------------------- case outputs


def fake_run_output(out: Path, reference: Image, *, t1c_path: Path | None) -> dict:
    """The files of a finished `rtjax run` that export_rtstruct reads."""
    rois = target_rois(reference)
    masks = TumourMasks(necrosis=np.zeros_like(rois["GTV"]), enhancing=rois["GTV"],
                        edema=rois["Edema"])
    convention = get_convention("brats2021")
    save_image(combine_labels(masks, convention), reference, out / "segmentation.nii.gz", kind="label")
    save_image(rois["CTV_standard_15mm"], reference, out / "ctv_standard.nii.gz", kind="mask")
    save_image(rois["CTV_model"], reference, out / "ctv_model.nii.gz", kind="mask")
    save_image(rois["CTV_model_c0.01"], reference, out / "ctv_model_c0.01.nii.gz", kind="mask")
    save_image(rois["CTV_standard_15mm"] & rois["CTV_model"], reference,
               out / "ctv_model_c0.1.nii.gz", kind="mask")
    inputs = {"seg": "x"} if t1c_path is None else {"t1c": str(t1c_path)}
    (out / "params.json").write_text(json.dumps({
        "case": "case7", "options": {"labels": "brats2021", "margin_mm": 15.0}, "inputs": inputs}))
    return rois


def test_export_rtstruct_of_a_nifti_case_writes_the_mr_series(tmp_path):
    affine = make_affine("axial", spacing=(1.0, 1.2, 2.0), degrees=(8, 4))
    t1c = t1c_image(affine, (30, 26, 16))
    t1c_path = tmp_path / "case" / "t1c.nii.gz"
    t1c_path.parent.mkdir()
    nib.save(nib.Nifti1Image(t1c.from_canonical(t1c.data), affine), t1c_path)
    out = tmp_path / "out"
    out.mkdir()
    reference = load_image(t1c_path)
    rois = fake_run_output(out, reference, t1c_path=t1c_path)
    result = export_rtstruct(out)
    assert result["rtstruct"] == out / RTSTRUCT_FILE and result["mr_series"] == out / MR_SERIES_DIR
    names = ["GTV", "Edema", "CTV_standard_15mm", "CTV_model", "CTV_model_c0.01", "CTV_model_c0.1"]
    assert list(result["rois"]) == names
    masks, _ = read_back(out / RTSTRUCT_FILE, out / MR_SERIES_DIR)
    assert list(masks) == names
    expected = {**rois, "CTV_model_c0.1": rois["CTV_standard_15mm"] & rois["CTV_model"]}
    check_round_trip("export (NIfTI case)", {n: expected[n] for n in names}, reference,
                     out / RTSTRUCT_FILE, out / MR_SERIES_DIR)
    ds = pydicom.dcmread(out / RTSTRUCT_FILE)
    assert ds.PatientID == "case7"
    assert [o.RTROIInterpretedType for o in ds.RTROIObservationsSequence] == \
        ["GTV", "", "CTV", "CTV", "CTV", "CTV"]
    # A rerun replaces both, and leaves no temporary files.
    first_uid = result["referenced_series"]
    again = export_rtstruct(out)
    assert again["referenced_series"] != first_uid
    assert len(list((out / MR_SERIES_DIR).iterdir())) == 16
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def test_export_rtstruct_of_a_dicom_case_refers_to_its_series(tmp_path):
    affine = make_affine("sagittal", spacing=(0.9, 1.3, 2.5))
    write_series(tmp_path / "case" / "t1c", distinct((30, 26, 14)), affine)
    out = tmp_path / "out"
    files, record = convert_case_dicom(tmp_path / "case", out / DICOM_DIR)
    reference = load_image(files["t1c"])
    rois = fake_run_output(out, reference, t1c_path=None)
    result = export_rtstruct(out)
    assert result["mr_series"] is None and not (out / MR_SERIES_DIR).exists()
    assert result["referenced_series"] == record["series"]["t1c"]["series_instance_uid"]
    ds = pydicom.dcmread(out / RTSTRUCT_FILE)
    assert ds.PatientID == "P001" and ds.StudyInstanceUID == "1.2.3.4"
    masks, image = read_back(out / RTSTRUCT_FILE, tmp_path / "case" / "t1c")
    got = masks["CTV_model_c0.01"]
    assert dice(got, expected_on_series(rois["CTV_model_c0.01"], reference, image)) >= 0.98


def test_export_rtstruct_bad_outputs_write_nothing(tmp_path):
    with pytest.raises(InputError, match="params.json not found"):
        export_rtstruct(tmp_path)
    t1c = t1c_image(np.diag([-1.0, -1.0, 1.0, 1.0]), (20, 20, 12))
    out = tmp_path / "out"
    out.mkdir()
    fake_run_output(out, t1c, t1c_path=None)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(InputError, match="no T1c"):
        export_rtstruct(out)
    other = tmp_path / "t1c_other.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 13), np.float32), np.eye(4)), other)
    with pytest.raises(InputError, match="grid shape"):
        export_rtstruct(out, t1c=other)
    assert sorted(p.name for p in out.iterdir()) == before


def test_case_rois_reads_the_label_convention(tmp_path):
    t1c = t1c_image(np.diag([-1.0, -1.0, 1.0, 1.0]), (20, 20, 12))
    rois = fake_run_output(tmp_path, t1c, t1c_path=None)
    found, reference, params = case_rois(tmp_path)
    np.testing.assert_array_equal(found["GTV"], rois["GTV"])
    np.testing.assert_array_equal(found["Edema"], rois["Edema"])
    assert list(found)[-2:] == ["CTV_model_c0.01", "CTV_model_c0.1"]
    params_file = tmp_path / "params.json"
    params_file.write_text(json.dumps({"options": {"labels": "nope", "margin_mm": 15}}))
    with pytest.raises(InputError, match="options.labels"):
        case_rois(tmp_path)


def test_cli_export_rtstruct(tmp_path):
    t1c = t1c_image(np.diag([-1.0, -1.0, 1.0, 1.0]), (20, 20, 12))
    t1c_path = tmp_path / "t1c.nii.gz"
    nib.save(nib.Nifti1Image(t1c.from_canonical(t1c.data), np.diag([-1.0, -1.0, 1.0, 1.0])), t1c_path)
    out = tmp_path / "out"
    out.mkdir()
    fake_run_output(out, load_image(t1c_path), t1c_path=None)
    runner = CliRunner()
    result = runner.invoke(app, ["export-rtstruct", str(out), "--t1c", str(t1c_path)])
    assert result.exit_code == 0, result.output
    assert "rtstruct.dcm" in result.output and "GTV" in result.output
    assert (out / RTSTRUCT_FILE).is_file()
    result = runner.invoke(app, ["export-rtstruct", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "params.json not found" in result.output
