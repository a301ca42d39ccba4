"""NIfTI input and output: load, validate, reorient to RAS+, write back on the input grid.

rtjax computes on arrays in RAS+ canonical orientation (nibabel ``as_closest_canonical``
semantics: axes permuted and flipped so that the affine's closest world axes are R, A, S;
an oblique affine stays oblique). An :class:`Image` keeps the input's original affine,
shape and header so that every output is written back on the input's exact grid, in its
orientation, by :func:`save_image`.

Every problem with an input file is one :class:`rtjax.errors.InputError` naming the file.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation
from scipy.ndimage import map_coordinates

from rtjax.errors import InputError
from rtjax.labels import LabelConvention, TumourMasks, get_convention, split_labels
from rtjax.provenance import atomic_write

__all__ = [
    "bounding_box",
    "resample_image",
    "CANONICAL_NAMES",
    "DTI_NAMES",
    "header_shape",
    "LOAD_KINDS",
    "SAVE_KINDS",
    "Case",
    "Image",
    "check_files_on_one_grid",
    "check_same_grid",
    "find_case_files",
    "load_case",
    "load_image",
    "load_tumour_masks",
    "save_image",
]

PathLike = str | os.PathLike[str]

LOAD_KINDS = ("intensity", "probability", "label", "mask")
SAVE_KINDS = ("mask", "label", "density", "float")

# Probability maps and densities may overshoot [0, 1] by float rounding (or by the integer
# rounding of a header's scl_slope/scl_inter); within this tolerance they are clipped.
_UNIT_TOL = 1e-5
# Scaled mask values within this distance of 0 are background (header-scaling rounding:
# the MNI152 brain mask stores background as -1e-10).
_MASK_ZERO_TOL = 1e-6
# A scaled label value within this distance of an integer is that integer.
_LABEL_TOL = 1e-3
_READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, ImageFileError)


# --------------------------------------------------------------------------- Image


def _canonical_ornt(affine: np.ndarray) -> np.ndarray:
    """The axis permutation/flips taking an array on ``affine`` to RAS+ (as nibabel)."""
    return io_orientation(affine)


def _inverse_ornt(ornt: np.ndarray) -> np.ndarray:
    """The orientation transform undoing ``apply_orientation(., ornt)``."""
    inverse = np.empty_like(ornt)
    for in_axis, (out_axis, flip) in enumerate(ornt):
        inverse[int(out_axis)] = (in_axis, flip)
    return inverse


def _default_header(affine: np.ndarray, shape: tuple[int, ...]) -> nib.Nifti1Header:
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_sform(affine, code=1)
    header.set_xyzt_units("mm")
    return header


@dataclass(frozen=True, eq=False, repr=False)
class Image:
    """A 3-D image in RAS+ canonical orientation that remembers its input geometry.

    Attributes:
        data: (X, Y, Z) array in canonical orientation.
        affine: (4, 4) voxel-to-world (mm) affine of ``data``.
        path: the file it was loaded from (None for derived images).
        original_affine: (4, 4) affine of the input file.
        original_shape: (3,) shape of the input array.
        original_header: copy of the input's NIfTI header.
        orientation: axis codes of the input, e.g. ``('L', 'P', 'S')``.
    """

    data: np.ndarray
    affine: np.ndarray
    path: Path | None
    original_affine: np.ndarray
    original_shape: tuple[int, int, int]
    original_header: nib.Nifti1Header
    orientation: tuple[str, str, str]

    def __post_init__(self) -> None:
        if np.ndim(self.data) != 3:
            raise ValueError(f"Image data must be 3-D, got shape {np.shape(self.data)}")
        for name in ("affine", "original_affine"):
            aff = np.asarray(getattr(self, name), dtype=np.float64)
            if aff.shape != (4, 4) or not np.isfinite(aff).all():
                raise ValueError(f"Image {name} must be a finite 4x4 matrix")
            object.__setattr__(self, name, aff)

    @classmethod
    def from_array(
        cls,
        data: np.ndarray,
        affine: np.ndarray,
        *,
        path: PathLike | None = None,
        header: nib.Nifti1Header | None = None,
    ) -> Image:
        """Wrap a 3-D array given in the orientation of ``affine``, reorienting to RAS+."""
        data = np.asarray(data)
        affine = np.asarray(affine, dtype=np.float64)
        if data.ndim != 3:
            raise ValueError(f"expected a 3-D array, got shape {data.shape}")
        ornt = _canonical_ornt(affine)
        canonical = np.ascontiguousarray(apply_orientation(data, ornt))
        header = _default_header(affine, data.shape) if header is None else header.copy()
        return cls(
            data=canonical,
            affine=affine @ inv_ornt_aff(ornt, data.shape),
            path=None if path is None else Path(path),
            original_affine=affine,
            original_shape=tuple(int(n) for n in data.shape),
            original_header=header,
            orientation=tuple(nib.aff2axcodes(affine)),
        )

    def __repr__(self) -> str:
        spacing = ", ".join(f"{s:.3g}" for s in self.spacing)
        return (
            f"Image(path={str(self.path)!r}, shape={self.shape}, spacing=({spacing}) mm, "
            f"dtype={self.data.dtype}, orientation={''.join(self.orientation)})"
        )

    @property
    def shape(self) -> tuple[int, int, int]:
        """Canonical shape (X, Y, Z)."""
        return tuple(int(n) for n in self.data.shape)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel sizes in mm along the canonical axes (column norms of the affine)."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in mL (|det| of the affine's 3x3 part / 1000)."""
        return float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000.0

    def from_canonical(self, array: np.ndarray) -> np.ndarray:
        """Map a canonical (X, Y, Z) array back to the input orientation and shape."""
        array = np.asarray(array)
        if array.shape != self.shape:
            raise ValueError(f"expected an array of shape {self.shape}, got {array.shape}")
        inverse = _inverse_ornt(_canonical_ornt(self.original_affine))
        return np.ascontiguousarray(apply_orientation(array, inverse))

    def with_data(self, array: np.ndarray) -> Image:
        """A new Image on the same grid holding ``array`` (canonical, shape ``self.shape``).

        The new image has ``path=None``: it is derived data, not the file.
        """
        array = np.asarray(array)
        if array.shape != self.shape:
            raise ValueError(f"expected an array of shape {self.shape}, got {array.shape}")
        return Image(
            data=array,
            affine=self.affine,
            path=None,
            original_affine=self.original_affine,
            original_shape=self.original_shape,
            original_header=self.original_header,
            orientation=self.orientation,
        )

    def world_to_voxel(self, xyz_mm: np.ndarray) -> np.ndarray:
        """World coordinates (..., 3) in mm -> canonical voxel indices (..., 3), float."""
        return _apply_affine(np.linalg.inv(self.affine), xyz_mm)

    def voxel_to_world(self, ijk: np.ndarray) -> np.ndarray:
        """Canonical voxel indices (..., 3) -> world coordinates (..., 3) in mm."""
        return _apply_affine(self.affine, ijk)


def _apply_affine(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    points = np.asarray(points, dtype=np.float64)
    if points.shape[-1:] != (3,):
        raise ValueError(f"expected points of shape (..., 3), got {points.shape}")
    return points @ affine[:3, :3].T + affine[:3, 3]


# --------------------------------------------------------------------------- loading


def _nifti_suffix(name: str) -> str | None:
    lower = name.lower()
    for suffix in (".nii.gz", ".nii"):
        if lower.endswith(suffix):
            return name[-len(suffix) :]
    return None


def _open_nifti(path: Path) -> nib.Nifti1Image:
    """Open a NIfTI-1/2 file (header only), or raise InputError."""
    if not path.exists():
        raise InputError(path, "file not found")
    if not path.is_file():
        raise InputError(path, "not a file")
    if _nifti_suffix(path.name) is None:
        raise InputError(path, "not a NIfTI file (expected .nii or .nii.gz)")
    try:
        img = nib.load(path, mmap=False)
    except _READ_ERRORS as err:
        raise InputError(path, f"cannot read the NIfTI header ({err})") from err
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise InputError(path, f"not a NIfTI-1/2 image (nibabel read a {type(img).__name__})")
    return img


def _shape_3d(shape: tuple[int, ...], path: Path) -> tuple[int, int, int]:
    """The 3-D shape, dropping trailing singleton dimensions (e.g. (X, Y, Z, 1))."""
    dims = list(shape)
    while len(dims) > 3 and dims[-1] == 1:
        dims.pop()
    if len(dims) != 3:
        raise InputError(path, f"{len(shape)}-D (shape {tuple(shape)}), expected a 3-D image")
    return tuple(int(n) for n in dims)


def _has_scaling(img: nib.Nifti1Image) -> bool:
    proxy = img.dataobj
    return float(proxy.slope) != 1.0 or float(proxy.inter) != 0.0


def _read(img: nib.Nifti1Image, path: Path, *, raw: bool, dtype=np.float64) -> np.ndarray:
    """The voxel array: raw on-disk values, or scaled floats; InputError if unreadable."""
    try:
        if raw:
            return np.asarray(img.dataobj.get_unscaled())
        return np.asarray(img.get_fdata(dtype=dtype))
    except _READ_ERRORS as err:
        raise InputError(path, f"cannot read the image data, truncated or corrupt ({err})") from err


def _check_finite(data: np.ndarray, path: Path) -> None:
    if data.dtype.kind in "fc":
        bad = int(np.count_nonzero(~np.isfinite(data)))
        if bad:
            raise InputError(path, f"{bad} non-finite voxel values (NaN or inf)")


def _as_intensity(img: nib.Nifti1Image, path: Path) -> np.ndarray:
    data = _read(img, path, raw=False, dtype=np.float32)
    _check_finite(data, path)
    return data


def _as_probability(img: nib.Nifti1Image, path: Path) -> np.ndarray:
    """float32 in [0, 1]; unscaled integer maps with max in (1, 255] are divided by 255."""
    data = _read(img, path, raw=False)
    _check_finite(data, path)
    lo, hi = (float(data.min()), float(data.max())) if data.size else (0.0, 0.0)
    on_disk_integer = img.get_data_dtype().kind in "iu" and not _has_scaling(img)
    if on_disk_integer and 1.0 < hi <= 255.0 and lo >= 0.0:
        data = data / 255.0
        lo, hi = lo / 255.0, hi / 255.0
    if lo < -_UNIT_TOL or hi > 1.0 + _UNIT_TOL:
        raise InputError(
            path, f"probability values must lie in [0, 1], found range [{lo:g}, {hi:g}]"
        )
    return np.clip(data, 0.0, 1.0).astype(np.float32)


def _as_label(img: nib.Nifti1Image, path: Path) -> np.ndarray:
    """Integer labels from the raw data (scaling applied only if the header has one)."""
    scaled = _has_scaling(img)
    data = _read(img, path, raw=not scaled)
    if data.dtype.kind in "iu":
        return data
    if data.dtype.kind == "b":
        return data.astype(np.uint8)
    _check_finite(data, path)
    rounded = np.round(data)
    off = np.abs(data - rounded) > (_LABEL_TOL if scaled else 0.0)
    if off.any():
        examples = ", ".join(f"{v:g}" for v in np.unique(data[off])[:5])
        raise InputError(
            path,
            f"label values must be integers, found {int(off.sum())} non-integer voxels "
            f"(e.g. {examples})",
        )
    limits = np.iinfo(np.int32)
    if rounded.size and (rounded.min() < limits.min or rounded.max() > limits.max):
        raise InputError(path, "label values do not fit in int32")
    return rounded.astype(np.int32)


def _as_mask(img: nib.Nifti1Image, path: Path) -> np.ndarray:
    """Boolean mask: non-zero voxels (after the header's scaling, if any)."""
    if not _has_scaling(img):
        data = _read(img, path, raw=True)
        _check_finite(data, path)
        return data != 0
    data = _read(img, path, raw=False)
    _check_finite(data, path)
    return np.abs(data) > _MASK_ZERO_TOL


_READERS = {
    "intensity": _as_intensity,
    "probability": _as_probability,
    "label": _as_label,
    "mask": _as_mask,
}


def load_image(path: PathLike, *, kind: str = "intensity") -> Image:
    """Load a 3-D NIfTI-1/2 image (.nii or .nii.gz), validate it, reorient it to RAS+.

    Args:
        path: the file.
        kind: ``"intensity"`` (float32), ``"probability"`` (float32 in [0, 1]; unscaled
            integer maps such as the MNI152 uint8 GM/WM files, with a maximum in (1, 255],
            are taken as 0..255 and divided by 255; values within 1e-5 outside [0, 1] are
            clipped), ``"label"`` (integer array from the raw data, never scaled floats:
            the on-disk integer dtype, or int32 for integer-valued floats; a header
            scl_slope/scl_inter is applied only if present, then values must be within
            1e-3 of integers) or ``"mask"`` (bool, non-zero voxels; after the header's
            scaling if it has one, values within 1e-6 of 0 being background).

    A trailing singleton dimension (X, Y, Z, 1) is squeezed.

    Raises:
        InputError: missing, unreadable or truncated file; not 3-D; non-finite values;
            non-integer labels; probabilities outside [0, 1].
    """
    if kind not in _READERS:
        raise ValueError(f"unknown image kind {kind!r}; expected one of {', '.join(LOAD_KINDS)}")
    path = Path(path)
    img = _open_nifti(path)
    shape = _shape_3d(img.shape, path)
    data = _READERS[kind](img, path).reshape(shape)
    return Image.from_array(data, img.affine, path=path, header=img.header)


# --------------------------------------------------------------------------- saving


def _encode(array: np.ndarray, kind: str, path: Path) -> np.ndarray:
    """Validate ``array`` for ``kind`` and cast it to the on-disk dtype."""
    if kind == "mask":
        if array.dtype.kind != "b":
            values = np.unique(array)
            if not np.isin(values, (0, 1)).all():
                raise ValueError(f"{path}: mask values must be 0/1 or boolean, found {values[:6]}")
        return array.astype(np.uint8)
    if kind == "label":
        if array.dtype.kind not in "biuf":
            raise ValueError(f"{path}: labels must be integers, got dtype {array.dtype}")
        if array.dtype.kind == "f" and not np.array_equal(array, np.round(array)):
            raise ValueError(f"{path}: labels must be integer-valued (finite, no fractions)")
        if array.size and (array.min() < 0 or array.max() > 255):
            raise ValueError(
                f"{path}: labels must fit in uint8 (0..255), found range "
                f"[{array.min()}, {array.max()}]"
            )
        return array.astype(np.uint8)
    if array.dtype.kind not in "biuf":
        raise ValueError(f"{path}: expected a numeric array, got dtype {array.dtype}")
    out = array.astype(np.float32)
    bad = int(np.count_nonzero(~np.isfinite(out)))
    if bad:
        raise ValueError(f"{path}: {bad} non-finite values (NaN or inf) in the {kind} array")
    if kind == "density" and out.size:
        lo, hi = float(out.min()), float(out.max())
        if lo < -_UNIT_TOL or hi > 1.0 + _UNIT_TOL:
            raise ValueError(f"{path}: density values must lie in [0, 1], found [{lo:g}, {hi:g}]")
        out = np.clip(out, 0.0, 1.0)
    return out


def _nifti_for(data: np.ndarray, reference: Image) -> nib.Nifti1Image:
    """A NIfTI-1 image with a fresh header on the reference's original grid."""
    img = nib.Nifti1Image(data, None)
    header = reference.original_header
    codes = {}
    for key in ("qform_code", "sform_code"):
        code = int(header[key]) if header is not None and key in header else 0
        codes[key] = code if code > 0 else 1
    img.set_qform(reference.original_affine, code=codes["qform_code"])
    img.set_sform(reference.original_affine, code=codes["sform_code"])
    img.header.set_data_dtype(data.dtype)
    img.header.set_xyzt_units("mm")
    # Explicit no-scaling; img.to_filename (unlike nib.save) keeps it as written.
    img.header.set_slope_inter(1.0, 0.0)
    return img


def _write_atomic(img: nib.Nifti1Image, path: Path, suffix: str) -> None:
    """Write via :func:`rtjax.provenance.atomic_write` (a hidden temporary file beside
    ``path``, fsynced, renamed over it, usual permissions)."""

    def write(tmp: str) -> None:
        img.to_filename(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())

    atomic_write(path, write, suffix=f".tmp{suffix}")


def save_image(array: np.ndarray, reference: Image, path: PathLike, *, kind: str) -> Path:
    """Write a canonical array on the reference's original grid, orientation and affine.

    Args:
        array: (X, Y, Z) array in canonical orientation, shape ``reference.shape``.
        reference: the image whose input geometry the output takes.
        path: output file, ``.nii`` or ``.nii.gz``; parent folders are created.
        kind: ``"mask"`` (uint8 0/1; bool or 0/1 values), ``"label"`` (uint8, values
            0..255), ``"density"`` (float32 in [0, 1]; within 1e-5 outside is clipped) or
            ``"float"`` (float32, finite).

    The header is fresh: qform and sform both hold the original affine, with the input's
    codes where non-zero, else 1 (scanner); scl_slope 1, scl_inter 0; units mm. The file
    is written atomically (temporary file in the same folder, then ``os.replace``), so a
    failed or interrupted write leaves any existing file untouched.

    Returns:
        ``path`` as a Path.

    Raises:
        ValueError: wrong shape, unknown kind or suffix, or values invalid for ``kind``.
    """
    path = Path(path)
    if kind not in SAVE_KINDS:
        raise ValueError(f"unknown output kind {kind!r}; expected one of {', '.join(SAVE_KINDS)}")
    suffix = _nifti_suffix(path.name)
    if suffix is None:
        raise ValueError(f"{path}: output must end in .nii or .nii.gz")
    array = np.asarray(array)
    if array.shape != reference.shape:
        raise ValueError(
            f"{path}: array shape {array.shape} does not match the reference {reference.shape}"
        )
    data = reference.from_canonical(_encode(array, kind, path))
    _write_atomic(_nifti_for(data, reference), path, suffix)
    return path


# --------------------------------------------------------------------------- case folders

CANONICAL_NAMES = (
    "t1c",
    "flair",
    "t1",
    "t2",
    "seg",
    "wm",
    "gm",
    "csf",
    "brain_mask",
    "tensor",
    "fa",
    "peaks",
    "recurrence",
)

#: The DTI roles: read by `rtjax.tensor_io` onto the case grid, never by `load_case`.
DTI_NAMES = ("tensor", "fa", "peaks")

# Suffixes of the file stem (before .nii[.gz]) in BraTS 2017-2021 and BraTS 2023 naming.
_BRATS2021 = {"t1c": "_t1ce", "flair": "_flair", "t1": "_t1", "t2": "_t2", "seg": "_seg"}
_BRATS2023 = {"t1c": "-t1c", "flair": "-t2f", "t1": "-t1n", "t2": "-t2w", "seg": "-seg"}

_KIND_OF = {
    "t1c": "intensity",
    "flair": "intensity",
    "t1": "intensity",
    "t2": "intensity",
    "seg": "label",
    "wm": "probability",
    "gm": "probability",
    "csf": "probability",
    "brain_mask": "mask",
    "recurrence": "mask",
}


def _patterns(name: str) -> str:
    """Human-readable list of the file names that count as ``name``."""
    found = [f"{name}.nii[.gz]"]
    found += [f"*{table[name]}" for table in (_BRATS2021, _BRATS2023) if name in table]
    return ", ".join(found)


def _names_for_stem(stem: str) -> list[str]:
    names = [stem.lower()] if stem.lower() in CANONICAL_NAMES else []
    for table in (_BRATS2021, _BRATS2023):
        names += [name for name, end in table.items() if stem.endswith(end) and stem != end]
    return names


def _check_names(names: Iterable[str], what: str) -> None:
    unknown = [n for n in names if n not in CANONICAL_NAMES]
    if unknown:
        raise ValueError(
            f"unknown {what} {unknown}; expected names from {', '.join(CANONICAL_NAMES)}"
        )


def _resolve_override(case_dir: Path, name: str, value: PathLike) -> Path:
    """A bare file name is looked up in the case folder; any other path is used as given."""
    path = Path(value)
    if not path.is_absolute() and path.parent == Path("."):
        path = case_dir / path
    if not path.is_file():
        raise InputError(path, f"file given for {name!r} not found")
    return path


def find_case_files(
    case_dir: PathLike, overrides: Mapping[str, PathLike] | None = None
) -> dict[str, Path]:
    """Find the files of one case folder, keyed by canonical name.

    Recognised names (the stem before ``.nii`` / ``.nii.gz``): the canonical name itself
    in any letter case (``t1c.nii.gz``, ``WM.nii.gz``), BraTS 2017-2021 suffixes (``*_t1ce``,
    ``*_flair``, ``*_t1``, ``*_t2``, ``*_seg``) and BraTS 2023 suffixes (``*-t1c``,
    ``*-t2f``, ``*-t1n``, ``*-t2w``, ``*-seg``). Other files and hidden files are ignored.
    ``overrides`` maps canonical names to explicit files and wins over the search; a bare
    file name is taken inside ``case_dir``, any other path as given.

    Raises:
        InputError: the folder does not exist, two files match one name, or an override
            file does not exist.
        ValueError: an override key is not in :data:`CANONICAL_NAMES`.
    """
    case_dir = Path(case_dir)
    overrides = dict(overrides or {})
    _check_names(overrides, "override name(s)")
    if not case_dir.is_dir():
        problem = "not a folder" if case_dir.exists() else "case folder not found"
        raise InputError(case_dir, problem)
    matches: dict[str, list[Path]] = {}
    for entry in sorted(case_dir.iterdir()):
        suffix = _nifti_suffix(entry.name)
        if entry.name.startswith(".") or suffix is None or not entry.is_file():
            continue
        for name in _names_for_stem(entry.name[: -len(suffix)]):
            matches.setdefault(name, []).append(entry)
    files: dict[str, Path] = {}
    for name in CANONICAL_NAMES:
        if name in overrides:
            files[name] = _resolve_override(case_dir, name, overrides[name])
            continue
        found = matches.get(name, [])
        if len(found) > 1:
            listed = " and ".join(p.name for p in found)
            raise InputError(
                case_dir,
                f"ambiguous {name!r}: {listed} both match; remove one or pass an override",
            )
        if found:
            files[name] = found[0]
    return files


@dataclass
class Case:
    """One patient folder: the files found and the images loaded, keyed by canonical name."""

    path: Path
    images: dict[str, Image]
    files: dict[str, Path]


def load_case(
    case_dir: PathLike,
    *,
    names: Sequence[str] | None = None,
    require: Sequence[str] = (),
    overrides: Mapping[str, PathLike] | None = None,
) -> Case:
    """Find, load and cross-check the images of one case folder.

    Loads every file found (except the DTI files, :data:`DTI_NAMES`), or only ``names`` that are found, plus the
    ``require``d ones, which must exist. Kinds: t1c/flair/t1/t2 intensity, seg label,
    wm/gm/csf probability, brain_mask/recurrence mask. All loaded images must share one
    grid (:func:`check_same_grid`). ``Case.files`` lists every file found.

    Raises:
        InputError: a required modality is missing, a file is bad, or the grids differ.
        ValueError: unknown names, or ``"tensor"`` in ``names`` (tensor loading belongs to
            rtjax's tensor support, not to load_case).
    """
    names = None if names is None else list(names)
    _check_names([*(names or ()), *require], "modality name(s)")
    if names is not None and set(names) & set(DTI_NAMES):
        raise ValueError(
            f"load_case does not load {sorted(set(names) & set(DTI_NAMES))}: DTI is read by "
            "rtjax.tensor_io onto the case grid; use Case.files"
        )
    case_dir = Path(case_dir)
    files = find_case_files(case_dir, overrides)
    missing = [n for n in dict.fromkeys(require) if n not in files]
    if missing:
        problems = (f"missing required modality {n!r} (looked for {_patterns(n)})" for n in missing)
        raise InputError(case_dir, "; ".join(problems))
    wanted = list(files) if names is None else [*names, *require]
    to_load = [n for n in CANONICAL_NAMES if n in wanted and n in files and n not in DTI_NAMES]
    images = {n: load_image(files[n], kind=_KIND_OF[n]) for n in to_load}
    check_same_grid(images)
    return Case(path=case_dir, images=images, files=files)


def check_same_grid(images: Mapping[str, Image], *, atol_mm: float = 1e-3) -> None:
    """Check that all images share the original shape and affine (within ``atol_mm``).

    The first image is the reference.

    Raises:
        InputError: on the first differing image's path, naming the reference's path and
            both shapes, or the largest affine difference in mm.
    """
    items = list(images.items())
    if len(items) < 2:
        return
    ref_name, ref = items[0]
    ref_where = ref.path if ref.path is not None else f"<{ref_name}>"
    for name, image in items[1:]:
        label = "" if image.path is not None else f"{name!r}: "
        if image.original_shape != ref.original_shape:
            raise InputError(
                image.path,
                f"{label}grid shape {image.original_shape} differs from shape "
                f"{ref.original_shape} of {ref_where}",
            )
        diff = float(np.max(np.abs(image.original_affine - ref.original_affine)))
        if not diff <= atol_mm:
            raise InputError(
                image.path,
                f"{label}affine differs from that of {ref_where} by up to {diff:.4g} mm "
                f"(tolerance {atol_mm:g} mm)",
            )


@dataclass(frozen=True)
class _HeaderGrid:
    """The grid of a file from its header alone (what :func:`check_same_grid` compares)."""

    path: Path
    original_shape: tuple[int, int, int]
    original_affine: np.ndarray


def header_shape(path: PathLike) -> tuple[int, ...]:
    """The array shape a NIfTI file's header declares (no voxel data is read).

    Raises:
        InputError: a missing or unreadable file.
    """
    return tuple(int(n) for n in _open_nifti(Path(path)).shape)


def check_files_on_one_grid(files: Mapping[str, PathLike], *, atol_mm: float = 1e-3) -> None:
    """:func:`check_same_grid` from the files' headers alone (no voxel data is read), so
    that a pipeline can check its inputs before any heavy work. 4-D files are not allowed.

    Raises:
        InputError: a missing or unreadable file, not 3-D, or grids that differ.
    """
    grids = {}
    for name, path in files.items():
        path = Path(path)
        img = _open_nifti(path)
        grids[name] = _HeaderGrid(path, _shape_3d(img.shape, path), np.asarray(img.affine, float))
    check_same_grid(grids, atol_mm=atol_mm)


# --------------------------------------------------------------------------- tumours


def load_tumour_masks(
    path: PathLike,
    convention: str | LabelConvention,
    *,
    ignore: Iterable[int] = (),
    require_tumour: bool = True,
) -> tuple[TumourMasks, Image]:
    """Load a tumour label image and split it into canonical-orientation masks.

    Args:
        path: label image (.nii / .nii.gz).
        convention: a :class:`LabelConvention` or its name (never guessed).
        ignore: stray label values to set to background (with a warning).
        require_tumour: if True, a map with no tumour voxel is an error.

    Returns:
        (masks, image): the masks in canonical orientation, and the label image.
    """
    conv = get_convention(convention)
    image = load_image(path, kind="label")
    masks = split_labels(image.data, conv, source=image.path, ignore=ignore)
    if require_tumour and masks.is_empty():
        labels = ", ".join(str(v) for v in sorted(conv.known_labels - {0}))
        raise InputError(
            image.path,
            f"empty tumour mask: no voxel has a tumour label of convention {conv.name!r} "
            f"({labels})",
        )
    return masks, image


def resample_image(source: Image, target: Image, *, order: int = 1, cval: float = 0.0) -> np.ndarray:
    """`source`'s data on `target`'s grid (canonical arrays), through the world coordinates
    of both affines: spline interpolation of the given order (0 nearest, 1 trilinear);
    `cval` outside the source's field of view."""

    index = np.indices(target.shape, dtype=np.float64).reshape(3, -1).T
    world = _apply_affine(target.affine, index)
    source_index = _apply_affine(np.linalg.inv(source.affine), world)
    data = source.data.astype(np.float32) if source.data.dtype == bool else source.data
    values = map_coordinates(data, source_index.T, order=order, mode="constant", cval=cval)
    return values.reshape(target.shape)


def bounding_box(mask: np.ndarray, pad=0) -> tuple[slice, ...]:
    """Slices of the smallest box holding every True voxel of `mask`, grown by `pad` voxels
    per side (an int, or one per axis) and clipped to the array."""
    idx = np.argwhere(mask)
    if not len(idx):
        raise ValueError("bounding box of an empty mask")
    pad = np.broadcast_to(np.asarray(pad, int), (mask.ndim,))
    lo = np.maximum(idx.min(0) - pad, 0)
    hi = np.minimum(idx.max(0) + 1 + pad, mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
