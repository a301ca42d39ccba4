"""DICOM series in: synthetic oblique, non-axial, anisotropic series that the tests write with
pydicom from a NIfTI-style (array, affine), read back by rtjax.dicom and by SimpleITK/GDCM,
and bad series (gap, mixed series, no pixel data, truncated files, inconsistent slices) that
must raise one InputError naming the series and write nothing."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, RLELossless, generate_uid

from rtjax.dicom import (
    SERIES_RECORD,
    convert_case_dicom,
    dicom_affine,
    find_series,
    has_dicom_series,
    load_series,
    parse_series,
    read_series,
)
from rtjax.errors import InputError
from rtjax.io import find_case_files, load_case, load_image

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
SHAPE = (9, 7, 6)  # (columns, rows, slices) of the series


def rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    i, j = [a for a in range(3) if a != axis]
    rot = np.eye(3)
    rot[i, i], rot[i, j], rot[j, i], rot[j, j] = c, -s, s, c
    return rot


# Voxel axes (columns of the RAS affine) before rotation: axial LPS, sagittal (slices along
# R-L), coronal (slices along A-P), each then rotated ~20 deg about two axes (oblique).
AXES = {
    "axial": [[-1, 0, 0], [0, -1, 0], [0, 0, 1]],
    "sagittal": [[0, 0, -1], [-1, 0, 0], [0, 1, 0]],
    "coronal": [[-1, 0, 0], [0, 0, -1], [0, 1, 0]],
}


def make_affine(kind="sagittal", spacing=(0.9, 1.3, 2.5), degrees=(20, 18)) -> np.ndarray:
    """RAS affine: oblique, non-axial (unless kind='axial'), anisotropic voxels."""
    linear = rotation(2, degrees[0]) @ rotation(0, degrees[1]) @ np.array(AXES[kind], float)
    affine = np.eye(4)
    affine[:3, :3] = linear @ np.diag(spacing)
    affine[:3, 3] = (-12.5, 30.25, 7.0)
    return affine


def distinct(shape=SHAPE, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.prod(shape)).reshape(shape).astype(np.int16)


def write_series(folder, data, affine, *, uid=None, description="T1 post", study_uid="1.2.3.4",
                 frame_uid="1.2.3.5", slope=1.0, intercept=0.0, number=3, prefix="IM",
                 reverse_names=True, compress=False) -> list[Path]:
    """A classic single-frame MR series of ``data`` (columns, rows, slices) on the RAS
    ``affine`` (orthogonal axes), written with pydicom independently of rtjax; file names
    run against the slice order so that a reader must sort by position."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    uid = uid or generate_uid()
    lps = LPS @ affine
    norms = np.linalg.norm(lps[:3, :3], axis=0)
    iop = np.concatenate([lps[:3, 0] / norms[0], lps[:3, 1] / norms[1]])
    paths = []
    n = data.shape[2]
    for k in range(n):
        sop = generate_uid()
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, sop
        ds.PatientName, ds.PatientID = "Test^Patient", "P001"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, uid, frame_uid
        ds.Modality, ds.SeriesDescription, ds.SeriesNumber, ds.InstanceNumber = "MR", description, number, k + 1
        ds.ImagePositionPatient = [float(v) for v in lps[:3, 3] + k * lps[:3, 2]]
        ds.ImageOrientationPatient = [float(v) for v in iop]
        ds.PixelSpacing = [float(norms[1]), float(norms[0])]
        ds.SliceThickness = float(norms[2])
        ds.Rows, ds.Columns = data.shape[1], data.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.PixelData = np.ascontiguousarray(data[:, :, k].T).astype("<i2").tobytes()
        if compress:
            ds.compress(RLELossless)
        name = f"{prefix}{(n - k if reverse_names else k + 1):03d}.dcm"
        ds.save_as(folder / name, enforce_file_format=True)
        paths.append(folder / name)
    return paths


def sitk_read(folder, uid=None) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    names = reader.GetGDCMSeriesFileNames(str(folder), uid or "")
    reader.SetFileNames(names)
    return reader.Execute()


def sitk_affine(img: sitk.Image) -> np.ndarray:
    """RAS affine of SimpleITK's (x=column, y=row, z=slice) index, from its own geometry."""
    direction = np.array(img.GetDirection()).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction @ np.diag(img.GetSpacing())
    lps[:3, 3] = img.GetOrigin()
    return LPS @ lps


# --------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("kind", ["axial", "sagittal", "coronal"])
def test_series_keeps_the_geometry_of_the_nifti_it_came_from(tmp_path, kind):
    affine = make_affine(kind)
    data = distinct()
    write_series(tmp_path / "s", data, affine, slope=0.5, intercept=-100.0)
    nifti = tmp_path / "source.nii.gz"
    nib.save(nib.Nifti1Image(data.astype(np.float32) * 0.5 - 100.0, affine), nifti)

    image = load_series(tmp_path / "s")
    source = load_image(nifti)
    assert image.original_shape == SHAPE
    # Same voxels at the same world positions (canonical grids equal) ...
    np.testing.assert_allclose(image.affine, source.affine, atol=1e-5)
    np.testing.assert_array_equal(image.data, source.data)
    # ... and the series' own order: slices along the normal row x column cosine, so a
    # left-handed source (the coronal one) comes back with its slice axis reversed.
    expected, values = affine.copy(), data
    lps = LPS @ affine
    if np.cross(lps[:3, 0], lps[:3, 1]) @ lps[:3, 2] < 0:
        expected[:, 3] = affine @ [0, 0, SHAPE[2] - 1, 1]
        expected[:, 2] *= -1
        values = data[:, :, ::-1]
    assert (kind == "coronal") == (values is not data)
    np.testing.assert_allclose(image.original_affine, expected, atol=1e-5)
    np.testing.assert_array_equal(image.from_canonical(image.data), values * 0.5 - 100.0)
    assert image.orientation == tuple(nib.aff2axcodes(expected))
    assert sorted(image.spacing) == pytest.approx([0.9, 1.3, 2.5])

    # SimpleITK/GDCM reads the same files to the same grid and values.
    other = sitk_read(tmp_path / "s")
    np.testing.assert_allclose(sitk_affine(other), image.original_affine, atol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(other).transpose(2, 1, 0),
                                  image.from_canonical(image.data))


def test_dicom_affine_maps_each_slice_to_its_position(tmp_path):
    affine = make_affine("coronal", spacing=(0.7, 1.1, 3.0))
    write_series(tmp_path / "s", distinct(), affine)
    image, record = read_series(tmp_path / "s")
    positions = np.array([s["image_position_patient"] for s in record["slices"]])
    orientation = record["geometry"]["image_orientation_patient"]
    spacing = record["geometry"]["pixel_spacing"]
    ras = dicom_affine(orientation, spacing, positions)
    for k, pos in enumerate(positions):
        np.testing.assert_allclose(LPS[:3, :3] @ (ras @ [0, 0, k, 1])[:3], pos, atol=1e-6)
    # One pixel step along a row is one column spacing along the row cosine.
    step = LPS[:3, :3] @ (ras[:3, :3] @ [1, 0, 0])
    np.testing.assert_allclose(step, np.array(orientation[:3]) * spacing[1], atol=1e-9)


def test_record_lists_uids_and_slices_in_order(tmp_path):
    uid = generate_uid()
    paths = write_series(tmp_path / "s", distinct(), make_affine(), uid=uid)
    image, record = read_series(tmp_path / "s")
    assert record["series_instance_uid"] == uid
    assert record["study_instance_uid"] == "1.2.3.4"
    assert record["frame_of_reference_uid"] == "1.2.3.5"
    assert record["sop_class_uid"] == MRImageStorage
    assert record["patient"]["PatientID"] == "P001"
    written = [pydicom.dcmread(p).SOPInstanceUID for p in paths]  # slice order k = 0..
    assert [s["sop_instance_uid"] for s in record["slices"]] == written
    assert record["geometry"]["rows"] == SHAPE[1] and record["geometry"]["columns"] == SHAPE[0]
    json.dumps(record)  # plain JSON


def test_compressed_rle_series_reads_the_same(tmp_path):
    data = distinct()
    write_series(tmp_path / "raw", data, make_affine())
    write_series(tmp_path / "rle", data, make_affine(), compress=True)
    raw, rle = load_series(tmp_path / "raw"), load_series(tmp_path / "rle")
    np.testing.assert_array_equal(raw.data, rle.data)
    np.testing.assert_allclose(raw.affine, rle.affine)


def test_mixed_folder_needs_a_choice_and_a_choice_reads_it(tmp_path):
    a, b = generate_uid(), generate_uid()
    write_series(tmp_path / "mixed", distinct(seed=1), make_affine("axial"), uid=a, prefix="A", number=2)
    write_series(tmp_path / "mixed", distinct(seed=2), make_affine("sagittal"), uid=b, prefix="B",
                 description="FLAIR", number=5)
    infos = find_series(tmp_path / "mixed")
    assert [s.uid for s in infos] == [a, b] and [len(s.files) for s in infos] == [6, 6]
    with pytest.raises(InputError, match="2 DICOM series in one folder") as err:
        load_series(tmp_path / "mixed")
    assert a in str(err.value) and b in str(err.value) and "mixed" in str(err.value)
    np.testing.assert_array_equal(load_series(tmp_path / "mixed", b).from_canonical(
        load_series(tmp_path / "mixed", b).data), distinct(seed=2))
    with pytest.raises(InputError, match="no DICOM series with SeriesInstanceUID 9.9"):
        load_series(tmp_path / "mixed", "9.9")


# --------------------------------------------------------------------------- a case


def test_convert_case_role_folders_resamples_flair_onto_the_t1c_grid(tmp_path):
    case = tmp_path / "case"
    t1c_affine, flair_affine = make_affine("axial", spacing=(1.0, 1.0, 2.0)), make_affine(
        "sagittal", spacing=(1.2, 1.2, 1.5), degrees=(10, 5))
    flair_affine[:3, 3] = t1c_affine[:3, 3] + (1.0, -2.0, 0.5)
    write_series(case / "t1c", distinct(), t1c_affine)
    # A linear intensity field of the world position: trilinear resampling is exact for it.
    ijk = np.indices((16, 16, 12)).reshape(3, -1).T
    world = ijk @ flair_affine[:3, :3].T + flair_affine[:3, 3]
    field = (world @ [2.0, -1.0, 0.5] + 300.0).reshape(16, 16, 12)
    write_series(case / "FLAIR", np.round(field * 10).astype(np.int16), flair_affine, slope=0.1)
    assert has_dicom_series(case)

    files, record = convert_case_dicom(case, tmp_path / "out")
    assert set(files) == {"t1c", "flair"} and record["reference_role"] == "t1c"
    assert record["series"]["flair"]["resampled_to"] == "t1c"
    assert record["series"]["t1c"]["resampled_to"] is None
    assert json.loads((tmp_path / "out" / SERIES_RECORD).read_text()) == json.loads(json.dumps(record))
    t1c, flair = load_image(files["t1c"]), load_image(files["flair"])
    np.testing.assert_allclose(t1c.original_affine, t1c_affine, atol=1e-5)
    np.testing.assert_allclose(flair.original_affine, t1c_affine, atol=1e-5)
    centres = flair.voxel_to_world(np.indices(flair.shape).reshape(3, -1).T)
    src = np.linalg.inv(flair_affine) @ np.c_[centres, np.ones(len(centres))].T
    inside = np.all((src[:3] >= 0) & (src[:3] <= np.array([[15], [15], [11]])), axis=0)
    assert inside.sum() > 100
    expected = np.round((centres @ [2.0, -1.0, 0.5] + 300.0) * 10) / 10
    np.testing.assert_allclose(flair.data.ravel()[inside], expected[inside], atol=0.1)
    # The converted case loads as an ordinary NIfTI case.
    loaded = load_case(tmp_path / "out", names=["t1c", "flair"], require=["t1c"])
    assert set(loaded.images) == {"t1c", "flair"}
    assert find_case_files(tmp_path / "out")["t1c"] == files["t1c"]


def test_convert_case_from_one_mixed_folder_by_uid(tmp_path):
    a, b = generate_uid(), generate_uid()
    affine = make_affine("sagittal")
    write_series(tmp_path / "case" / "dump", distinct(seed=1), affine, uid=a, prefix="A")
    write_series(tmp_path / "case" / "dump", distinct(seed=2), affine, uid=b, prefix="B")
    with pytest.raises(InputError, match="no role subfolder"):
        convert_case_dicom(tmp_path / "case", tmp_path / "none")
    assert not (tmp_path / "none").exists()
    files, record = convert_case_dicom(tmp_path / "case", tmp_path / "out", {"t1c": b, "flair": a})
    assert record["series"]["t1c"]["series_instance_uid"] == b
    img = load_image(files["t1c"])
    np.testing.assert_array_equal(img.from_canonical(img.data), distinct(seed=2))
    np.testing.assert_allclose(img.original_affine, affine, atol=1e-5)
    with pytest.raises(ValueError, match="unknown series role"):
        convert_case_dicom(tmp_path / "case", tmp_path / "x", {"seg": a})


# --------------------------------------------------------------------------- bad series


def _bad_case(tmp_path, damage):
    """A case with a good flair/ and a damaged t1c/ series; returns (case, t1c uid)."""
    case = tmp_path / "case"
    uid = generate_uid()
    paths = write_series(case / "t1c", distinct(), make_affine(), uid=uid, reverse_names=False)
    write_series(case / "flair", distinct(seed=3), make_affine())
    damage(paths, case / "t1c", uid)
    return case, uid


def _edit(path, change):
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path, enforce_file_format=True)


def _second_series(paths, folder, uid):
    write_series(folder, distinct(seed=9), make_affine(), prefix="X", description="other")


def _truncate(keep):
    def damage(paths, folder, uid):
        raw = paths[2].read_bytes()
        paths[2].write_bytes(raw[:keep(len(raw))])
    return damage


BAD = {
    "missing slice": (lambda p, f, u: p[3].unlink(), "missing slice"),
    "mixed series": (_second_series, "2 DICOM series in one folder"),
    "no pixel data": (lambda p, f, u: _edit(p[1], lambda ds: delattr(ds, "PixelData")),
                      "no pixel data"),
    "truncated pixel data": (_truncate(lambda n: n - 30), "file ends inside PixelData"),
    "truncated header": (_truncate(lambda n: n // 2), "truncated DICOM file"),
    "truncated preamble": (_truncate(lambda n: 60), "truncated or not DICOM"),
    "inconsistent orientation": (lambda p, f, u: _edit(p[2], lambda ds: setattr(
        ds, "ImageOrientationPatient", [1, 0, 0, 0, 1, 0])), "inconsistent orientation"),
    "inconsistent size": (lambda p, f, u: _edit(p[4], lambda ds: (
        setattr(ds, "Rows", 3), setattr(ds, "PixelData", bytes(2 * 3 * SHAPE[0])))),
        "inconsistent size"),
    "duplicate position": (lambda p, f, u: _edit(p[4], lambda ds: setattr(
        ds, "ImagePositionPatient", pydicom.dcmread(p[3]).ImagePositionPatient)),
        "same position"),
    "single slice": (lambda p, f, u: [x.unlink() for x in p[1:]], "single slice"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_series_is_one_error_naming_it_and_writes_nothing(tmp_path, name):
    damage, message = BAD[name]
    case, uid = _bad_case(tmp_path, damage)
    out = tmp_path / "out"
    with pytest.raises(InputError, match=message) as err:
        convert_case_dicom(case, out)
    text = str(err.value)
    assert "t1c" in text and str(case / "t1c") in text
    if not name.startswith("truncated"):  # there the file holding the UID is unreadable
        assert uid in text
    assert not out.exists()


def test_missing_folder_and_empty_case(tmp_path):
    with pytest.raises(InputError, match="case folder not found"):
        convert_case_dicom(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty" / "t1c").mkdir(parents=True)
    with pytest.raises(InputError, match="no DICOM files"):
        convert_case_dicom(tmp_path / "empty", tmp_path / "out")
    assert not has_dicom_series(tmp_path / "empty")
    assert not (tmp_path / "out").exists()


def test_parse_series_options():
    assert parse_series(["t1c=1.2.3", " FLAIR = 1.2.4 "]) == {"t1c": "1.2.3", "flair": "1.2.4"}
    assert parse_series(None) is None and parse_series([]) is None
    for bad, message in [(["t1c"], "ROLE=SeriesInstanceUID"), (["seg=1.2"], "unknown role"),
                         (["t1c=1", "t1c=2"], "twice"), (["t1c="], "ROLE=")]:
        with pytest.raises(ValueError, match=message):
            parse_series(bad)
