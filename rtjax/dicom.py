"""DICOM series in: find the image series of a case folder, validate them, convert to NIfTI.

A case may arrive as DICOM instead of NIfTI: role subfolders (``t1c/``, ``flair/``, ...) of
single-frame ``.dcm`` files, or one folder of mixed series from which ``series`` (role ->
SeriesInstanceUID, ``--series t1c=UID``) picks. :func:`convert_case_dicom` converts them to
``<role>.nii.gz`` on the series' own grid (oblique and non-axial acquisitions keep their
geometry) and returns the files for :func:`rtjax.io.find_case_files` ``overrides`` plus a
record of the series (UIDs, patient and study, the ordered slice planes) that the pipeline
writes beside the case outputs (:data:`SERIES_RECORD`) and that :mod:`rtjax.rtstruct` uses to
reference the original series from an RT Structure Set.

Library: pydicom reads the files (headers, pixel data and its rescale); the geometry is the
standard DICOM -> NIfTI affine (nibabel's "DICOM orientation" documentation), checked in the
tests against the NIfTI a series was made from and against SimpleITK/GDCM reading the same
files. Why not a converter: rtjax must refuse a bad series with one error that names it and
write nothing, and the converters do otherwise: dicom2nifti silently drops slices without
pixel data and duplicate slices and keeps its checks as global switches that report bare
codes (``SLICE_INCREMENT_INCONSISTENT``); dcm2niix is a subprocess that warns and converts
across a missing slice; SimpleITK/GDCM sorts a series but reads across a gap with a warning.
The checks here (one series chosen, pixel data in every file, one orientation, size and
spacing, slices equally spaced along one line with no gap or duplicate, decodable pixels)
come before anything is written. Enhanced multi-frame files are refused with a clear error
(convert them with dcm2niix first). Compressed transfer syntaxes decode where pydicom has a
decoder (RLE natively; JPEG with pylibjpeg or python-gdcm installed).

Coordinates: DICOM patient coordinates are LPS mm, NIfTI world coordinates RAS mm; the
affine of a converted series maps voxel (column c, row r, slice k) to RAS mm.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError
from pydicom.misc import is_dicom

from rtjax.errors import InputError
from rtjax.io import Image, resample_image, save_image
from rtjax.provenance import write_json_atomic

__all__ = [
    "DICOM_DIR",
    "IMAGE_ROLES",
    "SERIES_RECORD",
    "SeriesInfo",
    "convert_case_dicom",
    "dicom_affine",
    "find_series",
    "has_dicom_series",
    "load_series",
    "parse_series",
    "read_series",
]

PathLike = str | os.PathLike[str]

# Image roles a DICOM series can fill (canonical names of rtjax.io).
IMAGE_ROLES = ("t1c", "flair", "t1", "t2")
# Where the pipeline keeps the converted NIfTI and the series record inside a case output.
DICOM_DIR = "dicom"
SERIES_RECORD = "dicom_series.json"
RECORD_FORMAT = "rtjax-dicom-series-1"

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_UNDEFINED_LENGTH = 0xFFFFFFFF
_DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# Orientation cosines, pixel spacing and slice steps that differ by more than these are
# "inconsistent"; a slice step off the median step vector by more than
# _STEP_ATOL_MM + _STEP_RTOL * |step| is a missing slice (or uneven spacing).
_COSINE_TOL = 1e-4
_SPACING_RTOL = 1e-4
_STEP_RTOL = 0.05
_STEP_ATOL_MM = 0.01
_PATIENT_TAGS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex")
_STUDY_TAGS = ("StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
               "ReferringPhysicianName", "StudyDescription")


# --------------------------------------------------------------------------- geometry


def dicom_affine(orientation: Sequence[float], pixel_spacing: Sequence[float],
                 positions: np.ndarray) -> np.ndarray:
    """The (4, 4) RAS affine of voxel (column c, row r, slice k) of a sorted slice stack.

    Args:
        orientation: ImageOrientationPatient (6,): row cosine (direction of increasing
            column index) then column cosine (direction of increasing row index), LPS.
        pixel_spacing: PixelSpacing (2,): (spacing between rows, between columns), mm.
        positions: (K, 2 <= K) ImagePositionPatient of the slices in order, LPS mm; the
            slice step is (last - first) / (K - 1).
    """
    cosines = np.asarray(orientation, dtype=np.float64).reshape(2, 3)
    positions = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    if len(positions) < 2:
        raise ValueError("a slice stack needs at least 2 slices for its slice step")
    row_mm, col_mm = (float(s) for s in pixel_spacing)
    lps = np.eye(4)
    lps[:3, 0] = cosines[0] * col_mm
    lps[:3, 1] = cosines[1] * row_mm
    lps[:3, 2] = (positions[-1] - positions[0]) / (len(positions) - 1)
    lps[:3, 3] = positions[0]
    return _LPS_TO_RAS @ lps


# --------------------------------------------------------------------------- finding series


@dataclass(frozen=True)
class SeriesInfo:
    """One DICOM series found in a folder (from the file headers).

    Attributes:
        uid: SeriesInstanceUID.
        folder: the folder searched.
        files: its files, sorted by name.
        modality, description, number: Modality, SeriesDescription, SeriesNumber.
    """

    uid: str
    folder: Path
    files: tuple[Path, ...]
    modality: str
    description: str
    number: int | None

    def __str__(self) -> str:
        number = "" if self.number is None else f" #{self.number}"
        what = f"{self.modality}{number} {self.description!r}".strip()
        return f"{self.uid} ({what}, {len(self.files)} files)"


def _dicom_files(folder: Path) -> list[Path]:
    """Files under ``folder`` (recursively, through linked folders, each folder once) that
    are DICOM: a DICM preamble, or ``.dcm``."""
    found, seen = [], set()
    for root, dirs, names in os.walk(folder, followlinks=True):
        seen.add(os.path.realpath(root))
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and os.path.realpath(os.path.join(root, d)) not in seen)
        for name in sorted(names):
            path = Path(root) / name
            if name.startswith(".") or not path.is_file():
                continue
            if name.lower().endswith(".dcm") or is_dicom(path):
                found.append(path)
    return found


def _truncated(ds: pydicom.Dataset) -> str | None:
    """The keyword of a top-level element whose value is shorter than its length (pydicom
    returns what it could read of a truncated file without an error), else None."""
    for elem in ds.elements():
        if (isinstance(elem, RawDataElement) and elem.value is not None
                and elem.length != _UNDEFINED_LENGTH and len(elem.value) < elem.length):
            return keyword_for_tag(elem.tag) or str(elem.tag)
    return None


def _read(path: Path, *, pixels: bool) -> pydicom.Dataset:
    """One DICOM file, or InputError naming it: unreadable, truncated or not DICOM."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=not pixels, force=True)
    except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, KeyError,
            AttributeError, OverflowError) as err:  # pydicom raises many types on corrupt data
        raise InputError(path, f"cannot read the DICOM file, truncated or corrupt ({err})") from err
    cut = _truncated(ds)
    if cut is not None:
        raise InputError(path, f"truncated DICOM file: the file ends inside {cut}")
    if "SOPClassUID" not in ds and "MediaStorageSOPClassUID" not in getattr(ds, "file_meta", {}):
        raise InputError(path, "not a readable DICOM file (no SOP Class UID): truncated or "
                         "not DICOM")
    return ds


def _group(files: Iterable[Path], folder: Path, *, pixels: bool
           ) -> tuple[list[SeriesInfo], dict[str, list[tuple[Path, pydicom.Dataset]]]]:
    groups: dict[str, list[tuple[Path, pydicom.Dataset]]] = {}
    for path in files:
        ds = _read(path, pixels=pixels)
        if str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", "")) == _DICOMDIR_CLASS:
            continue
        uid = str(ds.get("SeriesInstanceUID", "")).strip()
        if not uid:
            raise InputError(path, "DICOM file without a SeriesInstanceUID")
        groups.setdefault(uid, []).append((path, ds))
    infos = []
    for uid, members in groups.items():
        first = members[0][1]
        number = first.get("SeriesNumber")
        infos.append(SeriesInfo(
            uid=uid, folder=folder, files=tuple(p for p, _ in members),
            modality=str(first.get("Modality", "")), description=str(first.get("SeriesDescription", "")),
            number=None if number in (None, "") else int(number)))
    infos.sort(key=lambda s: (s.number is None, s.number or 0, s.uid))
    return infos, groups


def find_series(folder: PathLike) -> list[SeriesInfo]:
    """The DICOM series under ``folder`` (searched recursively; headers only), sorted by
    SeriesNumber. A file is DICOM if it has the DICM preamble or ends in ``.dcm``.

    Raises:
        InputError: the folder does not exist, or a DICOM file cannot be read.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "not a folder" if folder.exists() else "folder not found")
    return _group(_dicom_files(folder), folder, pixels=False)[0]


def has_dicom_series(case_dir: PathLike) -> bool:
    """Whether a case folder holds DICOM files (in role subfolders or anywhere below it)."""
    case_dir = Path(case_dir)
    return case_dir.is_dir() and bool(_dicom_files(case_dir))


# --------------------------------------------------------------------------- one series


def _listing(infos: Sequence[SeriesInfo]) -> str:
    return "; ".join(str(s) for s in infos)


def _source_files(source: PathLike | Sequence[PathLike]) -> tuple[Path, list[Path]]:
    if isinstance(source, (str, os.PathLike)):
        folder = Path(source)
        if not folder.is_dir():
            raise InputError(folder, "not a folder" if folder.exists() else "folder not found")
        files = _dicom_files(folder)
        if not files:
            raise InputError(folder, "no DICOM files (.dcm or with a DICM preamble) found")
        return folder, files
    files = [Path(p) for p in source]
    if not files:
        raise ValueError("no DICOM files given")
    for path in files:
        if not path.is_file():
            raise InputError(path, "file not found")
    return files[0].parent, files


def _value(ds: pydicom.Dataset, keyword: str, path: Path, where: str, count: int | None = None):
    value = ds.get(keyword)
    if value is None or value == "":
        raise InputError(path, f"{where}: missing {keyword}, needed for the image geometry")
    floats = np.atleast_1d(np.asarray(value, dtype=np.float64))
    if count is not None and floats.shape != (count,):
        raise InputError(path, f"{where}: {keyword} has {floats.size} values, expected {count}")
    if not np.isfinite(floats).all():
        raise InputError(path, f"{where}: {keyword} is not finite ({list(floats)})")
    return floats


def _check_slice(path: Path, ds: pydicom.Dataset, where: str) -> None:
    if not any(tag in ds for tag in _PIXEL_TAGS):
        raise InputError(path, f"{where}: no pixel data (not an image)")
    frames = ds.get("NumberOfFrames")
    if frames not in (None, "") and int(frames) > 1:
        raise InputError(path, f"{where}: a multi-frame file ({int(frames)} frames); only "
                         "single-frame series are read (convert enhanced DICOM with dcm2niix)")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise InputError(path, f"{where}: {ds.SamplesPerPixel} samples per pixel (colour); "
                         "expected a grey-scale image")


def _geometry(members: list[tuple[Path, pydicom.Dataset]], where: str):
    """Validate one series' slices and sort them: (order, orientation, spacing, positions)."""
    ref_path, ref = members[0]
    orientation = _value(ref, "ImageOrientationPatient", ref_path, where, 6)
    spacing = _value(ref, "PixelSpacing", ref_path, where, 2)
    size = (int(ref.Rows), int(ref.Columns)) if "Rows" in ref and "Columns" in ref else None
    if size is None:
        raise InputError(ref_path, f"{where}: missing Rows/Columns")
    frame = str(ref.get("FrameOfReferenceUID", ""))
    for path, ds in members:
        _check_slice(path, ds, where)
        cosines = _value(ds, "ImageOrientationPatient", path, where, 6)
        if np.abs(cosines - orientation).max() > _COSINE_TOL:
            raise InputError(path, f"{where}: inconsistent orientation: ImageOrientationPatient "
                             f"{list(cosines)} differs from {list(orientation)} of {ref_path.name}")
        this = _value(ds, "PixelSpacing", path, where, 2)
        if np.abs(this - spacing).max() > _SPACING_RTOL * spacing.max():
            raise InputError(path, f"{where}: inconsistent PixelSpacing {list(this)} "
                             f"(vs {list(spacing)} of {ref_path.name})")
        if (int(ds.get("Rows", 0)), int(ds.get("Columns", 0))) != size:
            raise InputError(path, f"{where}: inconsistent size {ds.get('Rows')}x"
                             f"{ds.get('Columns')} (vs {size[0]}x{size[1]} of {ref_path.name})")
        if str(ds.get("FrameOfReferenceUID", "")) != frame:
            raise InputError(path, f"{where}: inconsistent FrameOfReferenceUID")
    row, col = orientation[:3], orientation[3:]
    if (abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3
            or abs(row @ col) > 1e-3):
        raise InputError(ref_path, f"{where}: ImageOrientationPatient {list(orientation)} is not "
                         "two orthogonal unit vectors")
    if len(members) < 2:
        raise InputError(ref_path, f"{where}: a single slice, not a 3-D volume")
    positions = np.stack([_value(ds, "ImagePositionPatient", p, where, 3) for p, ds in members])
    normal = np.cross(row, col)
    order = np.argsort(positions @ normal, kind="stable")
    positions = positions[order]
    steps = np.diff(positions, axis=0)
    distance = steps @ normal
    names = [members[i][0].name for i in order]
    step = np.median(distance)
    tiny = np.flatnonzero(np.abs(distance) < max(_STEP_ATOL_MM, _STEP_RTOL * abs(step)))
    if tiny.size:
        i = int(tiny[0])
        raise InputError(members[order[i]][0].parent, f"{where}: two slices at the same "
                         f"position ({names[i]} and {names[i + 1]}): several echoes, phases or "
                         "repeated acquisitions in one series; pick or split the series")
    tol = _STEP_ATOL_MM + _STEP_RTOL * abs(step)
    expected = np.median(steps, axis=0)
    bad = np.flatnonzero(np.linalg.norm(steps - expected, axis=1) > tol)
    if bad.size:
        i = int(bad[0])
        what = "missing slice(s)" if distance[i] > step + tol else "uneven slice spacing"
        raise InputError(members[order[i]][0].parent, f"{where}: {what}: slices {names[i]} and "
                         f"{names[i + 1]} are {distance[i]:.4g} mm apart (step "
                         f"{np.linalg.norm(steps[i]):.4g} mm), the series' slice spacing is "
                         f"{step:.4g} mm")
    return order, orientation, spacing, positions


def _pixels(path: Path, ds: pydicom.Dataset, where: str) -> np.ndarray:
    try:
        array = ds.pixel_array
    except Exception as err:  # pydicom's decoders raise many types for bad or unsupported data
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", syntax)
        raise InputError(path, f"{where}: cannot decode the pixel data (transfer syntax "
                         f"{name}), truncated or unsupported ({err})") from err
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    return (array.astype(np.float32) * np.float32(slope) + np.float32(intercept))


def _common(ds: pydicom.Dataset, tags: Sequence[str]) -> dict[str, str]:
    return {tag: str(ds.get(tag, "")) for tag in tags}


def _record(info: SeriesInfo, members, order, orientation, spacing, positions) -> dict[str, Any]:
    first = members[order[0]][1]
    return {
        "series_instance_uid": info.uid,
        "study_instance_uid": str(first.get("StudyInstanceUID", "")),
        "frame_of_reference_uid": str(first.get("FrameOfReferenceUID", "")),
        "sop_class_uid": str(first.get("SOPClassUID", "")),
        "modality": info.modality,
        "series_description": info.description,
        "series_number": info.number,
        "source": str(info.folder),
        "geometry": {
            "rows": int(first.Rows), "columns": int(first.Columns),
            "pixel_spacing": [float(v) for v in spacing],
            "image_orientation_patient": [float(v) for v in orientation],
        },
        "slices": [{"sop_instance_uid": str(members[i][1].get("SOPInstanceUID", "")),
                    "image_position_patient": [float(v) for v in pos]}
                   for i, pos in zip(order, positions)],
        "patient": _common(first, _PATIENT_TAGS),
        "study": _common(first, _STUDY_TAGS),
    }


def _pick(infos: list[SeriesInfo], folder: Path, series_uid: str | None) -> SeriesInfo:
    if series_uid is not None:
        chosen = [s for s in infos if s.uid == str(series_uid).strip()]
        if not chosen:
            raise InputError(folder, f"no DICOM series with SeriesInstanceUID {series_uid}; "
                             f"found: {_listing(infos) or 'none'}")
        return chosen[0]
    if not infos:
        raise InputError(folder, "no DICOM image series found")
    if len(infos) > 1:
        raise InputError(folder, f"{len(infos)} DICOM series in one folder, choose one "
                         f"(--series ROLE=UID): {_listing(infos)}")
    return infos[0]


def read_series(source: PathLike | Sequence[PathLike], series_uid: str | None = None
                ) -> tuple[Image, dict[str, Any]]:
    """Read and validate one DICOM series: the image (RAS canonical, float32 after the
    rescale slope/intercept) and its record (UIDs, geometry, ordered slices, patient, study).

    Args:
        source: a folder (searched recursively) or a list of files.
        series_uid: the SeriesInstanceUID to read; needed when the files hold several series.

    The image's original grid is (column, row, slice) of the series, slices sorted along the
    slice normal; its affine is :func:`dicom_affine` (RAS mm). ``Image.path`` is the folder.

    Raises:
        InputError: naming the folder or file and the series: several series and no choice,
            an unknown UID, a truncated or unreadable file, a file without pixel data,
            inconsistent orientation, spacing, size or frame of reference, a single slice,
            duplicate positions, missing slices (a gap) or uneven spacing, undecodable pixels.
    """
    folder, files = _source_files(source)
    info = _pick(_group(files, folder, pixels=False)[0], folder, series_uid)
    members = [(path, _read(path, pixels=True)) for path in info.files]
    where = f"series {info.uid}" + (f" ({info.description})" if info.description else "")
    order, orientation, spacing, positions = _geometry(members, where)
    slices = [_pixels(members[i][0], members[i][1], where) for i in order]
    data = np.stack(slices, axis=-1).transpose(1, 0, 2)  # (columns, rows, slices)
    if not np.isfinite(data).all():
        raise InputError(folder, f"{where}: non-finite pixel values after rescaling")
    affine = dicom_affine(orientation, spacing, positions)
    image = Image.from_array(np.ascontiguousarray(data), affine, path=folder)
    return image, _record(info, members, order, orientation, spacing, positions)


def load_series(source: PathLike | Sequence[PathLike], series_uid: str | None = None) -> Image:
    """Read and validate one DICOM series as an :class:`rtjax.io.Image` (see :func:`read_series`)."""
    return read_series(source, series_uid)[0]


# --------------------------------------------------------------------------- a case


def parse_series(pairs: Sequence[str] | None) -> dict[str, str] | None:
    """``["t1c=1.2.3", "flair=1.2.4"]`` (the ``--series`` options) -> {role: UID}; None or
    empty -> None.

    Raises:
        ValueError: not ROLE=UID, an unknown role, or a role given twice.
    """
    if not pairs:
        return None
    series: dict[str, str] = {}
    for pair in pairs:
        role, sep, uid = str(pair).partition("=")
        role, uid = role.strip().lower(), uid.strip()
        if not sep or not uid:
            raise ValueError(f"--series {pair!r}: expected ROLE=SeriesInstanceUID")
        if role not in IMAGE_ROLES:
            raise ValueError(f"--series {pair!r}: unknown role {role!r}; expected "
                             f"{', '.join(IMAGE_ROLES)}")
        if role in series:
            raise ValueError(f"--series: role {role!r} given twice")
        series[role] = uid
    return series


def _role_sources(case_dir: Path, series: Mapping[str, str] | None) -> dict[str, tuple[Path, str | None]]:
    """role -> (folder, series UID or None) for the case's DICOM series."""
    if series:
        unknown = [r for r in series if r not in IMAGE_ROLES]
        if unknown:
            raise ValueError(f"unknown series role(s) {unknown}; expected {', '.join(IMAGE_ROLES)}")
        return {role: (case_dir, str(uid)) for role, uid in series.items()}
    sources = {}
    for entry in sorted(case_dir.iterdir()):
        role = entry.name.lower()
        if entry.is_dir() and role in IMAGE_ROLES:
            if role in sources:
                raise InputError(case_dir, f"two folders for {role!r}: {sources[role][0].name} "
                                 f"and {entry.name}")
            sources[role] = (entry, None)
    if not sources:
        where = "DICOM files but no role subfolder" if has_dicom_series(case_dir) else "no DICOM series"
        raise InputError(case_dir, f"{where} ({'/, '.join(IMAGE_ROLES)}/); put each series in "
                         "its role's subfolder or choose them with --series ROLE=UID")
    return sources


def convert_case_dicom(case_dir: PathLike, out_dir: PathLike,
                       series: Mapping[str, str] | None = None, *, reference: str = "t1c"
                       ) -> tuple[dict[str, Path], dict[str, Any]]:
    """Convert the DICOM series of a case folder to NIfTI: ``out_dir/<role>.nii.gz`` and the
    record ``out_dir/`` :data:`SERIES_RECORD`.

    Args:
        case_dir: a folder with role subfolders (``t1c/``, ``flair/``, ``t1/``, ``t2/``), one
            series each, or (with ``series``) DICOM files of several series anywhere below it.
        out_dir: where the NIfTI files and the record go (created).
        series: role -> SeriesInstanceUID, picking each role's series from all the DICOM files
            under ``case_dir``; None: the role subfolders.
        reference: the role whose grid the others are put on (trilinear resampling through
            the world coordinates, recorded as ``resampled_to``) when the grids differ; the
            first role found when that role is absent.

    Returns:
        (files, record): role -> NIfTI path, for :func:`rtjax.io.find_case_files` overrides;
        record: ``{"format", "reference_role", "series": {role: read_series record +
        "nifti", "resampled_to"}}``.

    Every series is read and validated before anything is written: a bad one raises its
    InputError and leaves ``out_dir`` untouched.
    """
    case_dir, out_dir = Path(case_dir), Path(out_dir)
    if not case_dir.is_dir():
        raise InputError(case_dir, "not a folder" if case_dir.exists() else "case folder not found")
    sources = _role_sources(case_dir, series)
    images, records = {}, {}
    for role, (folder, uid) in sources.items():
        try:
            images[role], records[role] = read_series(folder, uid)
        except InputError as err:
            raise InputError(err.path, f"{role}: {err.problem}") from err
    ref_role = reference if reference in images else next(iter(images))
    ref = images[ref_role]
    for role, image in images.items():
        resampled = not _same_grid(image, ref)
        if resampled:
            image = ref.with_data(resample_image(image, ref, order=1).astype(np.float32))
        records[role]["nifti"] = f"{role}.nii.gz"
        records[role]["resampled_to"] = ref_role if resampled else None
        images[role] = image
    files = {}
    for role, image in images.items():
        files[role] = save_image(image.data, image, out_dir / f"{role}.nii.gz", kind="float")
    record = {"format": RECORD_FORMAT, "reference_role": ref_role, "series": records}
    write_json_atomic(out_dir / SERIES_RECORD, record)
    return files, record


def _same_grid(image: Image, ref: Image, atol_mm: float = 1e-3) -> bool:
    return (image.original_shape == ref.original_shape
            and float(np.abs(image.original_affine - ref.original_affine).max()) <= atol_mm)
