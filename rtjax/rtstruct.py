"""DICOM out: an RT Structure Set of a case's masks, and the MR series it refers to.

:func:`write_rtstruct` writes boolean masks (canonical arrays on an :class:`rtjax.io.Image`
grid) as ROIs of an RT Structure Set whose contours lie on the image planes of a referenced
series (:class:`ReferencedSeries`): the case's own DICOM series when it came as DICOM (from
the record of :func:`rtjax.dicom.convert_case_dicom`), or otherwise an MR series written
from the T1c NIfTI by :func:`write_mr_series`, so that the images and the structures import
into a planning system together. :func:`export_rtstruct` does this for a finished
``rtjax run`` output folder (``rtjax export-rtstruct OUT_DIR``).

Contours: on every slice each connected region of the mask becomes its outline along the
pixel edges (the boundary of the union of the pixel squares: shapely's union of the row
runs of the mask, collinear vertices dropped), holes as separate inner contours. Each point
is in patient (LPS) mm on the slice's plane: ImagePositionPatient + (column, row) index x
PixelSpacing along ImageOrientationPatient, indices at half-pixel edges. A reader that takes
a pixel as inside when its centre is inside the polygon, and reads a contour inside another
on the same plane as a hole (the even-odd rule; dicompyler-core subtracts contained
polygons the same way), gets the mask back exactly, and the polygons' area is the mask's
area.

Library: pydicom writes the datasets (RT Structure Set and MR Image Storage, with the
attributes of their IODs; dciodvfy finds no error in either). highdicom has no RT Structure
Set; rt-utils traces contours through the centres of the boundary pixels (half a pixel
inside the mask's edge, a 0.5 mm shell that a centre-inside reader may drop: up to 14 % of
a 2 cm sphere on a 1 mm grid), says itself that it handles holes poorly, needs OpenCV and
the series on disk, and has had no release since January 2023.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import shapely
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, RTStructureSetStorage, generate_uid
from pydicom.valuerep import format_number_as_ds

import rtjax
from rtjax.dicom import DICOM_DIR, SERIES_RECORD, dicom_affine
from rtjax.errors import InputError
from rtjax.io import Image, check_same_grid, load_image
from rtjax.labels import TumourMasks, get_convention, split_labels

__all__ = [
    "MR_SERIES_DIR",
    "RTSTRUCT_FILE",
    "ReferencedSeries",
    "case_rois",
    "export_rtstruct",
    "slice_contours",
    "write_mr_series",
    "write_rtstruct",
]

PathLike = str | os.PathLike[str]

RTSTRUCT_FILE = "rtstruct.dcm"
MR_SERIES_DIR = "mr_t1c"
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_GRID_ATOL_MM = 1e-3
_STORED_MAX = 4095  # 12-bit, as MR scanners store
# A case's edema in its own file, when its label convention has none (rtjax.pipeline.case).
_EDEMA_FILE = "edema.nii.gz"
_COLOURS = {"GTV": (255, 0, 0), "Edema": (255, 200, 0), "CTV_standard": (0, 128, 255),
            "CTV_model": (0, 200, 0)}
_CUTOFF_COLOURS = [(200, 0, 200), (0, 200, 200), (160, 80, 0), (128, 128, 255), (255, 128, 128)]
_CUTOFF_FILE = re.compile(r"^ctv_model_c(?P<cutoff>[0-9.eE+-]+)\.nii(\.gz)?$")


# --------------------------------------------------------------------------- the series


@dataclass(frozen=True, eq=False)
class ReferencedSeries:
    """The image series an RT Structure Set refers to: its UIDs and its slice planes.

    Attributes:
        series_instance_uid, study_instance_uid, frame_of_reference_uid, sop_class_uid.
        sop_instance_uids: (K,) the slices' SOPInstanceUIDs, in slice order.
        positions: (K, 3) their ImagePositionPatient, LPS mm.
        orientation: (6,) ImageOrientationPatient (row cosine, column cosine), LPS.
        pixel_spacing: (2,) PixelSpacing (between rows, between columns), mm.
        rows, columns: pixels per slice.
        patient: PatientName, PatientID, PatientBirthDate, PatientSex.
        study: StudyInstanceUID, StudyDate, StudyTime, StudyID, AccessionNumber,
            ReferringPhysicianName, StudyDescription.
    """

    series_instance_uid: str
    study_instance_uid: str
    frame_of_reference_uid: str
    sop_class_uid: str
    sop_instance_uids: tuple[str, ...]
    positions: np.ndarray
    orientation: np.ndarray
    pixel_spacing: np.ndarray
    rows: int
    columns: int
    patient: dict[str, str] = field(default_factory=dict)
    study: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_record(cls, entry: Mapping[str, Any]) -> ReferencedSeries:
        """From one role's entry of a :func:`rtjax.dicom.convert_case_dicom` record."""
        geometry, slices = entry["geometry"], entry["slices"]
        return cls(
            series_instance_uid=entry["series_instance_uid"],
            study_instance_uid=entry["study_instance_uid"],
            frame_of_reference_uid=entry["frame_of_reference_uid"],
            sop_class_uid=entry["sop_class_uid"],
            sop_instance_uids=tuple(s["sop_instance_uid"] for s in slices),
            positions=np.array([s["image_position_patient"] for s in slices], dtype=np.float64),
            orientation=np.asarray(geometry["image_orientation_patient"], dtype=np.float64),
            pixel_spacing=np.asarray(geometry["pixel_spacing"], dtype=np.float64),
            rows=int(geometry["rows"]), columns=int(geometry["columns"]),
            patient=dict(entry.get("patient", {})), study=dict(entry.get("study", {})))

    @property
    def shape(self) -> tuple[int, int, int]:
        """(columns, rows, slices): the array order of :attr:`affine`."""
        return (self.columns, self.rows, len(self.sop_instance_uids))

    @property
    def affine(self) -> np.ndarray:
        """(4, 4) RAS affine of voxel (column, row, slice)."""
        return dicom_affine(self.orientation, self.pixel_spacing, self.positions)

    def to_series_order(self, mask: np.ndarray, reference: Image) -> np.ndarray:
        """A canonical (X, Y, Z) array on ``reference`` as a (columns, rows, slices) array.

        Raises:
            InputError: ``reference``'s grid is not this series' grid.
        """
        template = Image.from_array(np.zeros(self.shape, dtype=bool), self.affine)
        diff = float(np.abs(template.affine - reference.affine).max())
        if template.shape != reference.shape or not diff <= _GRID_ATOL_MM:
            raise InputError(reference.path, f"the image grid (shape {reference.shape}) is not "
                             f"the grid of the referenced series {self.series_instance_uid} "
                             f"(shape {template.shape}, affines differ by up to {diff:.4g} mm)")
        return template.from_canonical(np.asarray(mask))


def _ds(value: float) -> str:
    return format_number_as_ds(float(value))


def _today() -> tuple[str, str]:
    now = _dt.datetime.now()
    return now.strftime("%Y%m%d"), now.strftime("%H%M%S")


def _file_meta(sop_class: str, sop_instance: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    return meta


def _patient_study(ds: pydicom.Dataset, patient: Mapping[str, str], study: Mapping[str, str],
                   study_uid: str) -> None:
    """Patient and General Study modules (type 2 attributes present, possibly empty)."""
    ds.SpecificCharacterSet = "ISO_IR 192"
    for tag in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex"):
        setattr(ds, tag, str(patient.get(tag, "")))
    date, time = _today()
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = str(study.get("StudyDate", "")) or date
    ds.StudyTime = str(study.get("StudyTime", "")) or time
    for tag in ("StudyID", "AccessionNumber", "ReferringPhysicianName", "StudyDescription"):
        setattr(ds, tag, str(study.get(tag, "")))


def _equipment(ds: pydicom.Dataset) -> None:
    ds.Manufacturer = "rtjax"
    ds.ManufacturerModelName = "rtjax"
    ds.SoftwareVersions = rtjax.__version__


def _mr_geometry(image: Image) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(orientation (6,), pixel_spacing (2,), positions (K, 3), LPS affine) of the image's
    original grid written as slices along its third axis."""
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ image.original_affine
    columns = lps[:3, :3]
    norms = np.linalg.norm(columns, axis=0)
    unit = columns / norms
    normal = np.cross(unit[:, 0], unit[:, 1])
    if abs(unit[:, 0] @ unit[:, 1]) > 1e-4 or abs(abs(unit[:, 2] @ normal) - 1) > 1e-4:
        raise InputError(image.path, "the image grid is sheared (its voxel axes are not "
                         "orthogonal): it cannot be written as a DICOM slice series")
    k = np.arange(image.original_shape[2])
    positions = lps[:3, 3] + k[:, None] * columns[:, 2]
    orientation = np.concatenate([unit[:, 0], unit[:, 1]])
    return orientation, np.array([norms[1], norms[0]]), positions, lps


def _quantise(data: np.ndarray) -> tuple[np.ndarray, float, float]:
    """12-bit stored values and (lo, hi): stored = round((value - lo) / (hi - lo) * 4095)."""
    lo, hi = float(np.min(data)), float(np.max(data))
    scale = _STORED_MAX / (hi - lo) if hi > lo else 0.0
    stored = np.clip(np.round((data - lo) * scale), 0, _STORED_MAX).astype(np.uint16)
    return stored, lo, hi


def write_mr_series(image: Image, out_dir: PathLike, *, patient: Mapping[str, str] | None = None,
                    study: Mapping[str, str] | None = None, study_uid: str | None = None,
                    frame_of_reference_uid: str | None = None,
                    series_description: str = "rtjax T1c", patient_position: str = "HFS"
                    ) -> ReferencedSeries:
    """Write ``image`` (e.g. the T1c) as a DICOM MR series, one file per slice of its third
    original axis (``MR0001.dcm``, ...), on its exact original grid.

    Intensities are stored as 12-bit values, a linear map of the image's range
    (stored = round((value - min) / (max - min) * 4095), said in ImageComments), with a
    window over the whole range; MR images carry no rescale slope/intercept (the MR IOD has
    none, and planning systems window the stored values). PatientPosition is
    ``patient_position`` (head first supine by default: it names the patient's position on
    the table and changes no coordinate). New Study, Series and Frame of Reference UIDs are
    made unless given. ``out_dir`` is created; it should be empty.

    Returns:
        The written series as a :class:`ReferencedSeries`.

    Raises:
        InputError: the grid is sheared (not representable as DICOM slices).
    """
    out_dir = Path(out_dir)
    patient, study = dict(patient or {}), {"StudyID": "1", **(study or {})}
    orientation, spacing, positions, lps = _mr_geometry(image)
    data = image.from_canonical(image.data)
    stored, lo, hi = _quantise(np.asarray(data, dtype=np.float64))
    study_uid = study_uid or str(study.get("StudyInstanceUID", "")) or generate_uid()
    frame_uid = frame_of_reference_uid or generate_uid()
    series_uid = generate_uid()
    normal = np.cross(orientation[:3], orientation[3:])
    thickness = float(np.linalg.norm(lps[:3, 2]))
    uids = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for k, position in enumerate(positions):
        uid = generate_uid()
        uids.append(uid)
        ds = pydicom.Dataset()
        ds.file_meta = _file_meta(MRImageStorage, uid)
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, uid
        _patient_study(ds, patient, study, study_uid)
        ds.Modality = "MR"
        ds.SeriesInstanceUID, ds.SeriesNumber = series_uid, 901
        ds.SeriesDescription = series_description
        ds.PatientPosition, ds.OperatorsName, ds.BodyPartExamined = patient_position, "", "BRAIN"
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_uid, ""
        _equipment(ds)
        ds.InstanceNumber = k + 1
        ds.ImageType = ["DERIVED", "SECONDARY", "OTHER"]
        ds.ImagePositionPatient = [_ds(v) for v in position]
        ds.ImageOrientationPatient = [_ds(v) for v in orientation]
        ds.PixelSpacing = [_ds(v) for v in spacing]
        ds.SliceThickness = _ds(thickness)
        ds.SpacingBetweenSlices = _ds(thickness)
        ds.SliceLocation = _ds(position @ normal)
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "RM", "NONE", ""
        ds.MRAcquisitionType, ds.EchoTime, ds.EchoTrainLength = "3D", "", ""
        ds.RepetitionTime = ""
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = int(stored.shape[1]), int(stored.shape[0])
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.WindowCenter, ds.WindowWidth = _ds((_STORED_MAX + 1) / 2), _ds(_STORED_MAX + 1)
        ds.ImageComments = (f"rtjax: stored = round((T1c - {lo:.6g}) / ({hi:.6g} - {lo:.6g}) "
                            f"* {_STORED_MAX})")[:10240]
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).astype("<u2").tobytes()
        ds.save_as(out_dir / f"MR{k + 1:04d}.dcm", enforce_file_format=True)
    return ReferencedSeries(
        series_instance_uid=series_uid, study_instance_uid=study_uid,
        frame_of_reference_uid=frame_uid, sop_class_uid=str(MRImageStorage),
        sop_instance_uids=tuple(uids),
        positions=np.array([[float(_ds(v)) for v in p] for p in positions]),
        orientation=np.array([float(_ds(v)) for v in orientation]),
        pixel_spacing=np.array([float(_ds(v)) for v in spacing]),
        rows=int(stored.shape[1]), columns=int(stored.shape[0]),
        patient={k: str(patient.get(k, "")) for k in ("PatientName", "PatientID",
                                                      "PatientBirthDate", "PatientSex")},
        study={**{k: str(v) for k, v in study.items()}, "StudyInstanceUID": study_uid})


# --------------------------------------------------------------------------- contours


def slice_contours(mask: np.ndarray) -> list[np.ndarray]:
    """The outlines of a 2-D mask along the pixel edges, as polygons in index coordinates.

    Args:
        mask: (C, R) boolean array, indexed [column, row].

    Returns:
        Closed polygons (N, 2) of (column, row) vertices at half-integer pixel edges, the
        first vertex not repeated: each region's outer boundary and each hole's boundary
        (even-odd rule), collinear vertices removed.
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return []
    padded = np.zeros((mask.shape[0] + 2, mask.shape[1]), dtype=np.int8)
    padded[1:-1] = mask
    edges = np.diff(padded, axis=0).T  # (R, C + 1): +1 where a run starts, -1 after it ends
    rows, starts = np.nonzero(edges == 1)
    _, stops = np.nonzero(edges == -1)
    boxes = shapely.box(starts - 0.5, rows - 0.5, stops - 0.5, rows + 0.5)
    union = shapely.simplify(shapely.union_all(boxes), 0.0)
    polygons = []
    for part in getattr(union, "geoms", [union]):
        if part.is_empty or part.geom_type != "Polygon":
            continue
        for ring in (part.exterior, *part.interiors):
            polygons.append(np.asarray(ring.coords, dtype=np.float64)[:-1])
    return polygons


# --------------------------------------------------------------------------- RT Structure Set


def _roi_type(name: str) -> str:
    if name.upper().startswith("GTV"):
        return "GTV"
    if name.upper().startswith("CTV"):
        return "CTV"
    return ""


def _colour(name: str, index: int) -> list[int]:
    for prefix, colour in _COLOURS.items():
        if name.startswith(prefix):
            return list(colour)
    return list(_CUTOFF_COLOURS[index % len(_CUTOFF_COLOURS)])


def _contour_items(mask_series: np.ndarray, series: ReferencedSeries) -> list[pydicom.Dataset]:
    row_cos, col_cos = series.orientation[:3], series.orientation[3:]
    row_mm, col_mm = series.pixel_spacing
    items = []
    for k in range(mask_series.shape[2]):
        for polygon in slice_contours(mask_series[:, :, k]):
            points = (series.positions[k] + polygon[:, :1] * col_mm * row_cos
                      + polygon[:, 1:] * row_mm * col_cos)
            image = pydicom.Dataset()
            image.ReferencedSOPClassUID = series.sop_class_uid
            image.ReferencedSOPInstanceUID = series.sop_instance_uids[k]
            item = pydicom.Dataset()
            item.ContourImageSequence = [image]
            item.ContourGeometricType = "CLOSED_PLANAR"
            item.NumberOfContourPoints = len(points)
            item.ContourData = [f"{v:.4f}" for v in points.ravel()]
            items.append(item)
    return items


def write_rtstruct(path: PathLike, rois: Mapping[str, np.ndarray], reference: Image,
                   referenced_series: ReferencedSeries, *, label: str = "rtjax",
                   description: str = "rtjax target volumes") -> Path:
    """Write masks as the ROIs of a DICOM RT Structure Set referring to a series.

    Args:
        path: the output file (written atomically).
        rois: ROI name -> boolean mask, canonical (X, Y, Z) arrays on ``reference``; an
            empty mask is an ROI without contours. Names: at most 64 characters.
        reference: the grid of the masks; it must be the series' grid.
        referenced_series: the series whose slice planes carry the contours (the case's
            DICOM series, or one written by :func:`write_mr_series`).
        label: StructureSetLabel (at most 16 characters).

    ROI types (RTROIInterpretedType): GTV* -> GTV, CTV* -> CTV, others empty. Contours:
    :func:`slice_contours` on each slice, in LPS mm on the slice's plane (module docstring).

    Raises:
        InputError: the masks' grid is not the referenced series' grid.
        ValueError: a mask of the wrong shape, or a bad ROI name.
    """
    path = Path(path)
    series = referenced_series
    for name, mask in rois.items():
        if np.shape(mask) != reference.shape:
            raise ValueError(f"ROI {name!r}: mask shape {np.shape(mask)} is not the reference "
                             f"shape {reference.shape}")
        if not name or len(name) > 64 or "\\" in name:
            raise ValueError(f"ROI name {name!r}: 1 to 64 characters, no backslash")
    uid = generate_uid()
    ds = pydicom.Dataset()
    ds.file_meta = _file_meta(RTStructureSetStorage, uid)
    ds.SOPClassUID, ds.SOPInstanceUID = RTStructureSetStorage, uid
    _patient_study(ds, series.patient, series.study, series.study_instance_uid)
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID, ds.SeriesNumber = generate_uid(), 902
    ds.SeriesDescription, ds.OperatorsName = description, ""
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = series.frame_of_reference_uid, ""
    _equipment(ds)
    ds.InstanceNumber = 1
    ds.StructureSetLabel = label[:16]
    ds.StructureSetName = label[:64]
    ds.StructureSetDescription = description
    ds.StructureSetDate, ds.StructureSetTime = _today()
    contour_images = []
    for sop in series.sop_instance_uids:
        item = pydicom.Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = series.sop_class_uid, sop
        contour_images.append(item)
    ref_series = pydicom.Dataset()
    ref_series.SeriesInstanceUID = series.series_instance_uid
    ref_series.ContourImageSequence = contour_images
    ref_study = pydicom.Dataset()
    ref_study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management
    ref_study.ReferencedSOPInstanceUID = series.study_instance_uid
    ref_study.RTReferencedSeriesSequence = [ref_series]
    frame = pydicom.Dataset()
    frame.FrameOfReferenceUID = series.frame_of_reference_uid
    frame.RTReferencedStudySequence = [ref_study]
    ds.ReferencedFrameOfReferenceSequence = [frame]
    ds.StructureSetROISequence, ds.ROIContourSequence, ds.RTROIObservationsSequence = [], [], []
    for number, (name, mask) in enumerate(rois.items(), start=1):
        roi = pydicom.Dataset()
        roi.ROINumber, roi.ReferencedFrameOfReferenceUID = number, series.frame_of_reference_uid
        roi.ROIName, roi.ROIGenerationAlgorithm = name, "AUTOMATIC"
        ds.StructureSetROISequence.append(roi)
        contour = pydicom.Dataset()
        contour.ReferencedROINumber = number
        contour.ROIDisplayColor = _colour(name, number)
        items = _contour_items(series.to_series_order(np.asarray(mask, dtype=bool), reference), series)
        if items:
            contour.ContourSequence = items
        ds.ROIContourSequence.append(contour)
        observation = pydicom.Dataset()
        observation.ObservationNumber, observation.ReferencedROINumber = number, number
        observation.ROIObservationLabel = name[:16]
        observation.RTROIInterpretedType, observation.ROIInterpreter = _roi_type(name), ""
        ds.RTROIObservationsSequence.append(observation)
    ds.ApprovalStatus = "UNAPPROVED"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        ds.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


# --------------------------------------------------------------------------- a case output


def _cutoff_files(case_out_dir: Path) -> list[tuple[str, Path]]:
    found = []
    for entry in sorted(case_out_dir.iterdir()):
        match = _CUTOFF_FILE.match(entry.name)
        if match and entry.is_file():
            found.append((match["cutoff"], entry))
    return sorted(found, key=lambda item: float(item[0]))


def case_rois(case_out_dir: PathLike) -> tuple[dict[str, np.ndarray], Image, dict[str, Any]]:
    """The ROIs of a finished ``rtjax run`` output folder, in canonical orientation.

    GTV (tumour core: necrosis + enhancing of ``segmentation.nii.gz``, read with the label
    convention in ``params.json["options"]["labels"]``), Edema (``edema.nii.gz`` when the
    convention has no edema label), ``CTV_standard_<margin>mm``
    (``ctv_standard.nii.gz``), ``CTV_model`` (``ctv_model.nii.gz``, iso-volumetric) and
    ``CTV_model_c<cutoff>`` for each ``ctv_model_c<cutoff>.nii.gz``.

    Returns:
        (rois, reference, params): masks by ROI name, the segmentation image (their grid)
        and params.json.

    Raises:
        InputError: a missing or unreadable file, or grids that differ.
    """
    out = Path(case_out_dir)
    params_path = out / "params.json"
    if not params_path.is_file():
        raise InputError(out, "not an rtjax run output: params.json not found")
    try:
        params = json.loads(params_path.read_text())
        convention = get_convention(params["options"]["labels"])
        margin = float(params["options"]["margin_mm"])
    except (ValueError, KeyError, TypeError) as err:
        raise InputError(params_path, f"no usable options.labels / options.margin_mm ({err})") from err
    for name in ("segmentation.nii.gz", "ctv_standard.nii.gz", "ctv_model.nii.gz"):
        if not (out / name).is_file():
            raise InputError(out, f"not a finished rtjax run output: {name} not found")
    seg = load_image(out / "segmentation.nii.gz", kind="label")
    masks = split_labels(seg.data, convention, source=seg.path)
    images = {"seg": seg,
              "standard": load_image(out / "ctv_standard.nii.gz", kind="mask"),
              "model": load_image(out / "ctv_model.nii.gz", kind="mask")}
    cutoffs = _cutoff_files(out)
    for cutoff, path in cutoffs:
        images[f"c{cutoff}"] = load_image(path, kind="mask")
    check_same_grid(images)
    if (out / _EDEMA_FILE).is_file() and not convention.edema:
        edema = load_image(out / _EDEMA_FILE, kind="mask")
        check_same_grid({"seg": seg, "edema": edema})
        masks = TumourMasks(necrosis=masks.necrosis, enhancing=masks.enhancing, edema=edema.data)
    rois = {"GTV": masks.core, "Edema": masks.edema,
            f"CTV_standard_{margin:g}mm": images["standard"].data,
            "CTV_model": images["model"].data}
    for cutoff, _ in cutoffs:
        rois[f"CTV_model_c{cutoff}"] = images[f"c{cutoff}"].data
    return rois, seg, params


def _series_record(out: Path, record_path: PathLike | None) -> tuple[Path, dict] | None:
    path = Path(record_path) if record_path is not None else out / DICOM_DIR / SERIES_RECORD
    if not path.is_file():
        if record_path is not None:
            raise InputError(path, "DICOM series record not found")
        return None
    try:
        record = json.loads(path.read_text())
        entry = record["series"][record["reference_role"]]
        ReferencedSeries.from_record(entry)
    except (ValueError, KeyError, TypeError) as err:
        raise InputError(path, f"not a usable DICOM series record ({err})") from err
    return path, entry


def _t1c_image(out: Path, params: Mapping[str, Any], t1c: PathLike | None) -> Image:
    if t1c is None:
        given = params.get("inputs", {}).get("t1c")
        if not given:
            raise InputError(out, "no DICOM series record and no T1c in params.json inputs to "
                             "write the MR series from; pass the T1c (--t1c)")
        t1c = Path(given)
        if not t1c.is_absolute() and not t1c.exists():
            t1c = out / t1c
    return load_image(t1c, kind="intensity")


def _replace_dir(new: Path, target: Path) -> None:
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old)
    else:
        os.replace(new, target)


def export_rtstruct(case_out_dir: PathLike, *, t1c: PathLike | None = None,
                    series_record: PathLike | None = None) -> dict[str, Any]:
    """Write ``rtstruct.dcm`` (and, for a NIfTI case, the MR series ``mr_t1c/``) into a
    finished ``rtjax run`` output folder.

    The RT Structure Set refers to the case's own DICOM series when the folder holds the
    record of :func:`rtjax.dicom.convert_case_dicom` (``dicom/dicom_series.json``, or
    ``series_record``), else to an MR series written from the T1c NIfTI (``t1c``, or
    ``params.json["inputs"]["t1c"]``), which must be on the outputs' grid. ROIs:
    :func:`case_rois`.

    Atomic: everything is built in a temporary folder inside ``case_out_dir``; an old
    ``rtstruct.dcm`` is removed before ``mr_t1c/`` is replaced and the new ``rtstruct.dcm``
    renamed into place, so an interruption never leaves an RT Structure Set beside a series
    it does not refer to.

    Returns:
        ``{"rtstruct": path, "mr_series": folder or None, "referenced_series": UID,
        "rois": {name: {"voxels", "volume_ml"}}}``.

    Raises:
        InputError: not a finished run output, no T1c and no record, grids that differ.
    """
    out = Path(case_out_dir)
    rois, reference, params = case_rois(out)
    record = _series_record(out, series_record)
    work = Path(tempfile.mkdtemp(prefix=".rtstruct.", dir=out))
    try:
        if record is not None:
            series, mr_dir = ReferencedSeries.from_record(record[1]), None
        else:
            image = _t1c_image(out, params, t1c)
            check_same_grid({"segmentation": reference, "t1c": image})
            case = str(params.get("case", out.name))
            series = write_mr_series(image, work / MR_SERIES_DIR,
                                     patient={"PatientName": case, "PatientID": case})
            mr_dir = out / MR_SERIES_DIR
        series.to_series_order(np.zeros(reference.shape, dtype=bool), reference)
        write_rtstruct(work / RTSTRUCT_FILE, rois, reference, series)
        target = out / RTSTRUCT_FILE
        target.unlink(missing_ok=True)
        if mr_dir is not None:
            _replace_dir(work / MR_SERIES_DIR, mr_dir)
        os.replace(work / RTSTRUCT_FILE, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ml = reference.voxel_volume_ml
    return {"rtstruct": target, "mr_series": mr_dir,
            "referenced_series": series.series_instance_uid,
            "rois": {name: {"voxels": int(np.count_nonzero(m)),
                            "volume_ml": float(np.count_nonzero(m)) * ml} for name, m in rois.items()}}
