"""Diffusion tensors from files: FSL six-volume tensors, eigen-systems, FA + fibre peaks, DWI.

Every loader returns the tensor field as a float32 NumPy array ``(6, X, Y, Z)`` in the
component order of :mod:`growth.tensor` (xx, xy, xz, yy, yz, zz), on the RAS-canonical
grid of :mod:`rtjax.io`, with components expressed in the *canonical voxel frame*: the
orthonormal frame whose axis k is the world direction of canonical array axis k, i.e. the
k-th column of the canonical affine divided by its norm (:func:`voxel_frame`; for a
non-oblique image these are the world R, A, S axes; for an oblique one a rotated RAS
frame; for an affine with shear, the rotation of its polar decomposition). The world
tensor is ``R T R^T`` with ``R = voxel_frame(reference.affine)``.

Files give vector or tensor components in one of three frames (the ``frame`` arguments):

- ``"fsl"``: FSL's convention (``dtifit`` tensors and V1..V3, FSL ``bvecs``): the axes of
  the stored voxel array, except that the x component is negated when the header affine
  has a positive determinant (FSL treats every image as radiologically stored). For the
  usual LAS/LPI-radiological files (negative determinant) this equals ``"voxel"``.
- ``"voxel"``: the axes of the stored voxel array as they are (dipy's convention: dipy
  never reorients).
- ``"world"``: the scanner/world RAS+ axes of the NIfTI header (MRtrix's convention for
  ``dwi2tensor``, ``sh2peaks`` and its gradient tables).

TractSeg ``peaks`` files are MRtrix ``sh2peaks`` output, world frame. This was checked on
the real TractSeg test data (LAS, affine diag(-2.5, 2.5, 2.5)), where the world and voxel
frames differ by the sign of x, which only shows on oblique fibres: following each peak by
1-2 voxels and comparing with the peak found there, the mean |cos| over oblique voxels with
FA > 0.4 is 0.78 when the peaks are read in the world frame and at most 0.71 under any other
sign convention (voxel, or y or z flipped), and the world-frame peaks are the most nearly
perpendicular to the FA gradient (0.40 against >= 0.49). ``tests/test_tensor_io.py``
keeps that check.

Problems with a file are :class:`rtjax.errors.InputError` naming the file.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, io_orientation
from scipy import ndimage

from growth.tensor import tensor_from_direction
from rtjax.errors import InputError
from rtjax.io import (  # the private helpers: same package, same file checks and writes
    Image,
    _nifti_for,
    _nifti_suffix,
    _open_nifti,
    _read,
    _shape_3d,
    _write_atomic,
    load_image,
)

__all__ = [
    "FRAMES",
    "DWIData",
    "voxel_frame",
    "load_tensor_fsl",
    "save_tensor_fsl",
    "load_tensor_eigen",
    "load_tensor_fa_peaks",
    "read_bvals_bvecs",
    "load_dwi",
    "resample_tensor",
    "reorient_tensor",
]

PathLike = str | os.PathLike[str]

FRAMES = ("fsl", "voxel", "world")
REORIENTATIONS = ("ppd", "finite-strain")

# Typical adult white-matter mean diffusivity, mm^2/s (Pierpaoli et al. 1996: ~0.7e-3).
WHITE_MATTER_MD = 7e-4


# --------------------------------------------------------------------------- frames


def voxel_frame(affine: np.ndarray) -> np.ndarray:
    """The orthonormal frame of a grid's voxel axes, ``(3, 3)``: column k = world axis k.

    The orthogonal factor of the polar decomposition of ``affine[:3, :3]``; for an affine
    without shear (always the case for a qform) it is the matrix of the normalised columns.
    Vector components v in this frame are world components ``R v``.
    """
    u, _, vt = np.linalg.svd(np.asarray(affine, dtype=np.float64)[:3, :3])
    return u @ vt


def _polar_rotation(f: np.ndarray) -> np.ndarray:
    u, _, vt = np.linalg.svd(f)
    return u @ vt


def _signed_permutation(ornt: np.ndarray) -> np.ndarray:
    """P with v_canonical = P v_stored for a nibabel orientation transform (exact)."""
    p = np.zeros((3, 3))
    for in_axis, (out_axis, flip) in enumerate(ornt):
        p[int(out_axis), in_axis] = flip
    return p


def _check_frame(frame: str) -> None:
    if frame not in FRAMES:
        raise ValueError(f"unknown frame {frame!r}; expected one of {', '.join(FRAMES)}")


def _file_to_canonical(affine: np.ndarray, frame: str) -> np.ndarray:
    """Q with v_canonical_frame = Q v_file for components given in ``frame``."""
    _check_frame(frame)
    affine = np.asarray(affine, dtype=np.float64)
    ornt = io_orientation(affine)
    p = _signed_permutation(ornt)
    if frame == "world":
        stored = voxel_frame(affine)
        return p @ stored.T  # stored-voxel components, then the signed permutation
    if frame == "fsl" and np.linalg.det(affine[:3, :3]) > 0:
        return p @ np.diag([-1.0, 1.0, 1.0])
    return p


def _to_canonical_layout(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """(X, Y, Z, k) stored -> (k, Xc, Yc, Zc) canonical layout (values untouched)."""
    out = apply_orientation(data, io_orientation(affine))
    return np.ascontiguousarray(np.moveaxis(out, -1, 0))


def _rotate6(t6: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Q T Q^T for a (6, ...) NumPy field and one (3, 3) Q, in float64."""
    m = _matrix(t6)
    return _components(q @ m @ q.T)


def _matrix(t6: np.ndarray) -> np.ndarray:
    xx, xy, xz, yy, yz, zz = t6
    return np.stack(
        [np.stack([xx, xy, xz], -1), np.stack([xy, yy, yz], -1), np.stack([xz, yz, zz], -1)],
        axis=-2,
    )


def _eigh(t6: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 eigenvalues (3, ...) descending and eigenvectors (..., 3, 3) in columns."""
    vals, vecs = np.linalg.eigh(_matrix(np.asarray(t6, dtype=np.float64)))
    return np.moveaxis(vals[..., ::-1], -1, 0), vecs[..., ::-1]


def _from_eigen(vals: np.ndarray, vecs: np.ndarray) -> np.ndarray:
    """sum_k vals[k] v_k v_k^T as (6, ...) components (vals (3, ...), vecs (..., 3, 3))."""
    return _components(np.einsum("...ik,k...,...jk->...ij", vecs, vals, vecs))


def _components(m: np.ndarray) -> np.ndarray:
    s = 0.5 * (m + np.swapaxes(m, -1, -2))
    return np.stack([s[..., 0, 0], s[..., 0, 1], s[..., 0, 2], s[..., 1, 1], s[..., 1, 2],
                     s[..., 2, 2]], axis=0)


# --------------------------------------------------------------------------- reading


def _read_volumes(
    path: PathLike, n_volumes: int | None, what: str
) -> tuple[np.ndarray, nib.Nifti1Image, Path]:
    """A 4-D float64 array (X, Y, Z, k); k must equal ``n_volumes`` (or be a multiple of 3
    when ``n_volumes`` is None). Non-finite values are left to the caller."""
    path = Path(path)
    img = _open_nifti(path)
    shape = tuple(int(n) for n in img.shape)
    if len(shape) == 5 and shape[3] == 1 and shape[4] == 6 and n_volumes == 6:
        raise InputError(
            path,
            f"5-D image of shape {shape}: a NIfTI symmetric-matrix tensor (lower-triangular "
            "order Dxx, Dxy, Dyy, Dxz, Dyz, Dzz), not FSL's 4-D six volumes; convert it to "
            "FSL order (Dxx, Dxy, Dxz, Dyy, Dyz, Dzz) first",
        )
    expected = f"{n_volumes}" if n_volumes is not None else "3 x k"
    if len(shape) != 4:
        raise InputError(
            path,
            f"{len(shape)}-D image of shape {shape}; {what} must be 4-D with {expected} volumes",
        )
    k = shape[3]
    if (n_volumes is not None and k != n_volumes) or (n_volumes is None and k % 3):
        raise InputError(path, f"{k} volumes; {what} must be 4-D with {expected} volumes")
    return _read(img, path, raw=False), img, path


def _count_nonfinite(data: np.ndarray, path: Path, what: str) -> None:
    bad = ~np.isfinite(data)
    if bad.any():
        voxels = int(np.count_nonzero(bad.reshape(*data.shape[:3], -1).any(axis=-1)))
        raise InputError(path, f"{voxels} voxels with non-finite {what} values (NaN or inf)")


def _reference(img: nib.Nifti1Image, path: Path, stored3d: np.ndarray) -> Image:
    return Image.from_array(stored3d.astype(np.float32), img.affine, path=path, header=img.header)


def _check_grid(first: Image, other: Image, path: Path, atol_mm: float = 1e-3) -> None:
    if other.original_shape != first.original_shape:
        raise InputError(
            path,
            f"grid shape {other.original_shape} differs from shape {first.original_shape} "
            f"of {first.path}",
        )
    diff = float(np.max(np.abs(other.original_affine - first.original_affine)))
    if not diff <= atol_mm:
        raise InputError(path, f"affine differs from that of {first.path} by up to {diff:.4g} mm")


def _psd_clean(
    t6: np.ndarray, path: Path, *, psd_tolerance: float, max_non_psd_fraction: float
) -> np.ndarray:
    """Clamp small negative eigenvalues at 0 (warn), zero clearly indefinite voxels (warn),
    or raise if there are too many of those."""
    vals, vecs = _eigh(t6)
    scale = np.max(np.abs(vals), axis=0)
    nonzero = scale > 0
    negative = vals[2] < 0
    bad = negative & (vals[2] < -psd_tolerance * scale)
    small = negative & ~bad
    n_bad, n_nonzero = int(bad.sum()), int(nonzero.sum())
    if n_bad > max_non_psd_fraction * max(n_nonzero, 1):
        raise InputError(
            path,
            f"{n_bad} of {n_nonzero} non-zero voxels are not positive semi-definite "
            f"(smallest eigenvalue below -{psd_tolerance:g} x the largest |eigenvalue|); "
            "is this a diffusion tensor in FSL order (Dxx, Dxy, Dxz, Dyy, Dyz, Dzz)?",
        )
    if not (small.any() or bad.any()):
        return t6
    if small.any():
        warnings.warn(
            f"{path}: {int(small.sum())} voxels with small negative eigenvalues (noise) "
            "clamped at 0",
            stacklevel=3,
        )
    if bad.any():
        warnings.warn(
            f"{path}: {n_bad} voxels that are not positive semi-definite set to zero "
            "(no tensor)",
            stacklevel=3,
        )
    clamped = _from_eigen(np.maximum(vals, 0.0), vecs)
    out = np.where(small[None], clamped, t6)
    return np.where(bad[None], 0.0, out)


def _finish_tensor(
    stored: np.ndarray,
    img: nib.Nifti1Image,
    path: Path,
    frame: str,
    psd_tolerance: float,
    max_non_psd_fraction: float,
) -> tuple[np.ndarray, Image]:
    """(X, Y, Z, 6) stored tensor in ``frame`` -> canonical (6, ...) float32 + reference."""
    q = _file_to_canonical(img.affine, frame)
    t6 = _rotate6(_to_canonical_layout(stored, img.affine), q)
    t6 = _psd_clean(
        t6, path, psd_tolerance=psd_tolerance, max_non_psd_fraction=max_non_psd_fraction
    )
    md = (stored[..., 0] + stored[..., 3] + stored[..., 5]) / 3.0
    return t6.astype(np.float32), _reference(img, path, md)


# --------------------------------------------------------------------------- tensors


def load_tensor_fsl(
    path: PathLike,
    *,
    frame: str = "fsl",
    psd_tolerance: float = 0.1,
    max_non_psd_fraction: float = 0.01,
) -> tuple[np.ndarray, Image]:
    """Load a six-volume tensor image (FSL ``dtifit --save_tensor``: ``*_tensor.nii.gz``).

    Args:
        path: 4-D NIfTI with 6 volumes in FSL order (Dxx, Dxy, Dxz, Dyy, Dyz, Dzz), any
            unit (kept; ``dtifit`` writes mm^2/s).
        frame: the frame of the components in the file (module docstring; ``"fsl"`` for
            ``dtifit``, ``"world"`` for MRtrix tensors after reordering to FSL order).
        psd_tolerance: a voxel whose smallest eigenvalue is negative but above
            ``-psd_tolerance`` times its largest |eigenvalue| is noise: its negative
            eigenvalues are clamped at 0 (with a warning giving the count).
        max_non_psd_fraction: voxels with more negative eigenvalues are set to zero (with
            a warning) if they are at most this fraction of the non-zero voxels; more
            means the file is not a tensor in this order, an InputError.

    Returns:
        (t6, reference): the float32 tensor ``(6, X, Y, Z)`` on the canonical grid in the
        canonical voxel frame, and an :class:`Image` on the file's grid (data: mean
        diffusivity) to write outputs back with.

    Raises:
        InputError: unreadable file; not 4-D with 6 volumes; non-finite values (count);
            too many voxels that are not positive semi-definite (count).
    """
    stored, img, path = _read_volumes(path, 6, "a tensor image")
    _count_nonfinite(stored, path, "tensor")
    return _finish_tensor(stored, img, path, frame, psd_tolerance, max_non_psd_fraction)


def save_tensor_fsl(
    t6: np.ndarray, reference: Image, path: PathLike, *, frame: str = "fsl"
) -> Path:
    """Write a canonical tensor field as six FSL-order volumes on the reference's input grid.

    The inverse of :func:`load_tensor_fsl`: components are transformed from the canonical
    voxel frame to ``frame`` of the output file and the array to the input orientation.
    Written float32, atomically, with the header rules of :func:`rtjax.io.save_image`.
    """
    path = Path(path)
    suffix = _nifti_suffix(path.name)
    if suffix is None:
        raise ValueError(f"{path}: output must end in .nii or .nii.gz")
    t6 = np.asarray(t6, dtype=np.float64)
    if t6.shape != (6, *reference.shape):
        raise ValueError(
            f"{path}: expected a tensor of shape {(6, *reference.shape)}, got {t6.shape}"
        )
    if not np.isfinite(t6).all():
        raise ValueError(f"{path}: non-finite tensor values")
    q = _file_to_canonical(reference.original_affine, frame)
    file_frame = _rotate6(t6, q.T)  # q is orthogonal: its inverse is its transpose
    stored = np.stack([reference.from_canonical(c) for c in file_frame], axis=-1)
    _write_atomic(_nifti_for(stored.astype(np.float32), reference), path, suffix)
    return path


def load_tensor_eigen(
    eigenvalues: PathLike | Sequence[PathLike],
    eigenvectors: Sequence[PathLike],
    *,
    frame: str = "fsl",
    psd_tolerance: float = 0.1,
    max_non_psd_fraction: float = 0.01,
) -> tuple[np.ndarray, Image]:
    """Load a tensor given as eigenvalues and eigenvectors (FSL ``dtifit`` L1-L3, V1-V3).

    D = sum_k L_k V_k V_k^T.

    Args:
        eigenvalues: three 3-D files (L1, L2, L3), or one 4-D file with 3 volumes.
        eigenvectors: three 4-D files of 3 volumes (V1, V2, V3: the x, y, z components of
            the eigenvector of L1, L2, L3) in ``frame``. They are normalised; zero vectors
            (outside the dtifit mask) contribute nothing.
        frame, psd_tolerance, max_non_psd_fraction: as in :func:`load_tensor_fsl`
            (negative eigenvalues are judged the same way).

    Returns:
        (t6, reference) as :func:`load_tensor_fsl`; the reference is the first
        eigenvalue file's grid.

    Raises:
        InputError: wrong number of files or volumes, grids that differ, non-finite
            values, or too many clearly negative eigenvalues.
    """
    if isinstance(eigenvalues, str | os.PathLike):
        lam, img, first = _read_volumes(eigenvalues, 3, "an eigenvalue image")
        ref = _reference(img, first, lam[..., 0])
    else:
        paths = [Path(p) for p in eigenvalues]
        if len(paths) != 3:
            raise InputError(None, f"expected 3 eigenvalue files (L1, L2, L3), got {len(paths)}")
        vols = []
        for p in paths:
            nimg = _open_nifti(p)
            vol = _read(nimg, p, raw=False).reshape(_shape_3d(nimg.shape, p))
            _count_nonfinite(vol[..., None], p, "eigenvalue")
            image = _reference(nimg, p, vol)
            if vols:
                _check_grid(ref, image, p)
            else:
                img, ref = nimg, image
            vols.append(vol)
        lam = np.stack(vols, axis=-1)
        first = paths[0]
    _count_nonfinite(lam, first, "eigenvalue")
    vec_paths = [Path(p) for p in eigenvectors]
    if len(vec_paths) != 3:
        raise InputError(None, f"expected 3 eigenvector files (V1, V2, V3), got {len(vec_paths)}")
    vecs = []
    for p in vec_paths:
        v, vimg, p = _read_volumes(p, 3, "an eigenvector image")
        _check_grid(ref, _reference(vimg, p, v[..., 0]), p)
        _count_nonfinite(v, p, "eigenvector")
        norm = np.linalg.norm(v, axis=-1, keepdims=True)
        vecs.append(np.where(norm > 0, v / np.where(norm > 0, norm, 1.0), 0.0))
    v = np.stack(vecs, axis=-1)  # (X, Y, Z, 3 components, 3 eigenvectors): columns
    m = np.einsum("...ik,...k,...jk->...ij", v, lam, v)
    stored = np.moveaxis(_components(m), 0, -1)
    return _finish_tensor(stored, img, first, frame, psd_tolerance, max_non_psd_fraction)


def load_tensor_fa_peaks(
    fa_path: PathLike,
    peaks_path: PathLike,
    *,
    mean_diffusivity: float = WHITE_MATTER_MD,
    frame: str = "world",
    mask_path: PathLike | None = None,
) -> tuple[np.ndarray, Image]:
    """Build a tensor field from FA and the first fibre peak (e.g. TractSeg/MRtrix peaks).

    D = d_perp I + (d_par - d_perp) v v^T with the FA of the file and a uniform mean
    diffusivity (:func:`growth.tensor.tensor_from_direction`), v the first peak.

    Args:
        fa_path: 3-D FA map, values in [0, 1].
        peaks_path: 4-D peaks with 3k volumes (k peaks x (x, y, z)); only the first peak
            is used; NaN or zero where there is none (then the tensor is isotropic).
        mean_diffusivity: the MD given to every voxel, mm^2/s (default 7e-4, typical white
            matter); it sets the unit of the result. Tumour tensors only use the shape.
        frame: the frame of the peak vectors: ``"world"`` (MRtrix ``sh2peaks`` and
            TractSeg, verified on TractSeg's data: module docstring), ``"voxel"`` or
            ``"fsl"`` (FSL ``dyads``/V1).
        mask_path: optional brain mask on the same grid; outside it the tensor is zero.
            Without a mask, voxels with FA exactly 0 and no peak (the background of
            ``dtifit``/TractSeg output) are zero.

    Returns:
        (t6, reference): float32 ``(6, X, Y, Z)`` canonical tensor, and the FA image.

    Raises:
        InputError: unreadable files, FA outside [0, 1], peaks not 4-D with 3k volumes,
            grids that differ.
    """
    fa_image = load_image(fa_path, kind="intensity")
    fa = fa_image.data.astype(np.float64)
    lo, hi = float(fa.min()), float(fa.max())
    if lo < -1e-3 or hi > 1.0 + 1e-3:
        raise InputError(fa_image.path, f"FA values must lie in [0, 1], found [{lo:g}, {hi:g}]")
    peaks, img, path = _read_volumes(peaks_path, None, "a peaks image")
    _check_grid(fa_image, _reference(img, path, peaks[..., 0]), path)
    direction = _to_canonical_layout(peaks[..., :3], img.affine)
    direction = np.where(np.isfinite(direction).all(axis=0), direction, 0.0)
    direction = np.einsum("ij,j...->i...", _file_to_canonical(img.affine, frame), direction)
    fa = np.clip(fa, 0.0, 1.0)
    t6 = np.asarray(
        tensor_from_direction(fa.astype(np.float32), direction.astype(np.float32),
                              mean_diffusivity=mean_diffusivity)
    )
    has_peak = np.linalg.norm(direction, axis=0) > 0
    if mask_path is not None:
        mask_image = load_image(mask_path, kind="mask")
        _check_grid(fa_image, mask_image, mask_image.path)
        inside = mask_image.data
    else:
        inside = (fa > 0) | has_peak
    return np.where(inside[None], t6, 0.0).astype(np.float32), fa_image


# --------------------------------------------------------------------------- DWI


@dataclass(frozen=True, eq=False)
class DWIData:
    """Diffusion-weighted images ready for :func:`growth.tensor.fit_tensor_dwi`.

    Attributes:
        data: ``(X, Y, Z, n)`` float32 signals on the canonical grid.
        bvals: ``(n,)`` b-values, s/mm^2 (volumes at or below the b0 threshold keep their
            value but have a zero gradient, so they act as b = 0 in the fit).
        bvecs: ``(n, 3)`` unit gradient directions in the canonical voxel frame (zero rows
            for b0 volumes).
        reference: an :class:`Image` on the file's grid (data: the first volume).
    """

    data: np.ndarray
    bvals: np.ndarray
    bvecs: np.ndarray
    reference: Image


def _read_table(source, what: str) -> tuple[np.ndarray, Path | None]:
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if not path.is_file():
            raise InputError(path, f"{what} file not found")
        try:
            return np.loadtxt(path, dtype=np.float64, ndmin=2), path
        except ValueError as err:
            raise InputError(path, f"cannot read the {what} as numbers ({err})") from err
    return np.atleast_2d(np.asarray(source, dtype=np.float64)), None


def read_bvals_bvecs(
    bvals, bvecs, *, n_volumes: int | None = None, b0_threshold: float = 50.0
) -> tuple[np.ndarray, np.ndarray]:
    """Read and check a gradient table (files or arrays), in the file's own frame.

    ``bvals``: whitespace-separated numbers (one row or one column). ``bvecs``: 3 rows of n
    (FSL) or n rows of 3 (dipy/HCP layout); a square 3 x 3 table is read as FSL rows.
    Rows of volumes with b <= ``b0_threshold`` may hold anything (NaN included) and become
    zero vectors; the others must be finite with a length within 10 % of 1 and are
    normalised.

    Returns:
        (bvals (n,), bvecs (n, 3)).

    Raises:
        InputError: unreadable tables, counts that do not match (each other or
            ``n_volumes``), negative b-values, bad gradient vectors.
    """
    b, bpath = _read_table(bvals, "b-value")
    g, gpath = _read_table(bvecs, "b-vector")
    b = b.reshape(-1)
    if not np.isfinite(b).all() or (b < 0).any():
        raise InputError(bpath, "b-values must be finite and non-negative")
    n = b.size
    if g.shape[0] == 3 and g.shape[1] == n:
        g = g.T
    elif g.shape != (n, 3):
        raise InputError(gpath, f"b-vectors of shape {g.shape} do not match {n} b-values "
                         "(expected 3 x n or n x 3)")
    if n_volumes is not None and n != n_volumes:
        raise InputError(bpath, f"{n} b-values for an image of {n_volumes} volumes")
    weighted = b > b0_threshold
    g = np.where(weighted[:, None], g, 0.0)
    norm = np.linalg.norm(g, axis=1)
    bad = weighted & ~(np.isfinite(norm) & (np.abs(norm - 1.0) <= 0.1))
    if bad.any():
        raise InputError(
            gpath,
            f"{int(bad.sum())} diffusion-weighted volumes have a gradient direction that is "
            "not a unit vector (non-finite, or length off by more than 10 %)",
        )
    g = np.where(weighted[:, None], g / np.where(weighted, norm, 1.0)[:, None], 0.0)
    return b, g


def load_dwi(
    path: PathLike, bvals, bvecs, *, frame: str = "fsl", b0_threshold: float = 50.0
) -> DWIData:
    """Load a 4-D diffusion-weighted image and its gradient table for the tensor fit.

    The image is reoriented to the canonical grid and the gradient directions are
    transformed into the canonical voxel frame, so that
    ``fit_tensor_dwi(d.data, d.bvals, d.bvecs)`` gives a tensor in the layout of every
    other loader here.

    Args:
        path: 4-D NIfTI (X, Y, Z, n).
        bvals, bvecs: files or arrays (:func:`read_bvals_bvecs`).
        frame: frame of the b-vectors: ``"fsl"`` (FSL/dcm2niix ``.bvec``, default: image
            axes with x negated for a positive-determinant affine), ``"voxel"`` (image
            axes as stored; what dipy assumes, and the same as ``"fsl"`` for the usual
            negative-determinant files) or ``"world"`` (scanner RAS, MRtrix).
        b0_threshold: b-values at or below it are b0 volumes (dipy's default 50).

    Raises:
        InputError: unreadable files, not 4-D, non-finite signals, bad gradient tables.
    """
    path = Path(path)
    img = _open_nifti(path)
    if len(img.shape) != 4:
        raise InputError(
            path, f"{len(img.shape)}-D image of shape {img.shape}; a DWI series must be 4-D"
        )
    data = _read(img, path, raw=False, dtype=np.float32)
    _count_nonfinite(data, path, "signal")
    b, g = read_bvals_bvecs(bvals, bvecs, n_volumes=data.shape[3], b0_threshold=b0_threshold)
    q = _file_to_canonical(img.affine, frame)
    canonical = np.moveaxis(_to_canonical_layout(data, img.affine), 0, -1)
    return DWIData(
        data=np.ascontiguousarray(canonical, dtype=np.float32),
        bvals=b,
        bvecs=g @ q.T,
        reference=_reference(img, path, data[..., 0]),
    )


# --------------------------------------------------------------------------- resampling


def _snap(coords: np.ndarray, tol: float = 1e-6) -> np.ndarray:
    rounded = np.round(coords)
    return np.where(np.abs(coords - rounded) < tol, rounded, coords)


def resample_tensor(
    t6: np.ndarray,
    source: Image,
    target: Image,
    *,
    transform: np.ndarray | None = None,
    reorientation: str = "ppd",
) -> np.ndarray:
    """Resample a canonical tensor field from one grid onto another through world space.

    Each target voxel centre y (world, mm) samples the source at x = transform^-1 y:
    trilinear interpolation of the plain tensor components (a convex combination of
    positive semi-definite tensors, so it stays PSD and handles zero background tensors;
    log-Euclidean interpolation would avoid the slight "swelling" of averaged tensors but
    is undefined at the zero tensors outside the brain). Outside the source the tensor is
    zero. The interpolated tensors are then reoriented from the source's canonical voxel
    frame to the target's: the component map is F = R_t^T L R_s (R the :func:`voxel_frame`
    of each affine, L the linear part of ``transform``).

    When F is orthogonal (no transform, or a rigid one, on shear-free affines: any
    rotation, flip or axis permutation between the grids) the tensor is mapped exactly to
    F T F^T. Otherwise ``reorientation`` picks:

    - ``"ppd"`` (preservation of principal direction, Alexander et al. 2001, IEEE TMI
      20:1131): per voxel, e1 -> F e1 / |F e1|, e2 -> the unit part of F e2 perpendicular
      to that, e3 completes the frame; the eigenvalues are kept.
    - ``"finite-strain"``: the rotation Q of the polar decomposition F = Q S, T -> Q T Q^T.

    Args:
        t6: ``(6, *source.shape)`` canonical tensor of ``source``.
        source, target: the grids (their canonical affines are used).
        transform: optional ``(4, 4)`` world-to-world map taking source positions to
            target positions (e.g. an affine registration of the DTI to the patient);
            default identity (plain regridding of the same world).
        reorientation: ``"ppd"`` or ``"finite-strain"``.

    Returns:
        float32 ``(6, *target.shape)`` in the target's canonical voxel frame.
    """
    if reorientation not in REORIENTATIONS:
        raise ValueError(
            f"unknown reorientation {reorientation!r}; expected one of {REORIENTATIONS}"
        )
    t6 = np.asarray(t6, dtype=np.float64)
    if t6.shape != (6, *source.shape):
        raise ValueError(f"expected a tensor of shape {(6, *source.shape)}, got {t6.shape}")
    world = np.eye(4) if transform is None else np.asarray(transform, dtype=np.float64)
    if world.shape != (4, 4) or not np.isfinite(world).all():
        raise ValueError("transform must be a finite 4x4 matrix")
    # target voxel -> target world -> source world -> source voxel
    vox = np.linalg.inv(source.affine) @ np.linalg.inv(world) @ target.affine
    grid = np.indices(target.shape, dtype=np.float64).reshape(3, -1)
    coords = _snap(vox[:3, :3] @ grid + vox[:3, 3:4])
    sampled = np.stack(
        [
            ndimage.map_coordinates(c, coords, order=1, mode="constant", cval=0.0)
            for c in t6
        ]
    ).reshape(6, *target.shape)
    f = voxel_frame(target.affine).T @ world[:3, :3] @ voxel_frame(source.affine)
    if np.allclose(f @ f.T, np.eye(3), atol=1e-6):
        return _rotate6(sampled, f).astype(np.float32)
    if reorientation == "finite-strain":
        return _rotate6(sampled, _polar_rotation(f)).astype(np.float32)
    vals, vecs = _eigh(sampled)
    n1 = np.einsum("ij,...j->...i", f, vecs[..., 0])
    n1 /= np.linalg.norm(n1, axis=-1, keepdims=True)
    m2 = np.einsum("ij,...j->...i", f, vecs[..., 1])
    n2 = m2 - np.sum(m2 * n1, axis=-1, keepdims=True) * n1
    n2 /= np.linalg.norm(n2, axis=-1, keepdims=True)
    n3 = np.cross(n1, n2)
    return _from_eigen(vals, np.stack([n1, n2, n3], axis=-1)).astype(np.float32)


def reorient_tensor(
    t6: np.ndarray, source_affine: np.ndarray, target_affine: np.ndarray, linear: np.ndarray | None = None
) -> np.ndarray:
    """Re-express a tensor field already sampled on the target grid (e.g. warped component
    by component) from the source's canonical voxel frame in the target's.

    The component map is F = R_t^T L R_s (R the :func:`voxel_frame` of each affine, L the
    linear part of the source-world -> target-world map, default identity); the tensors
    become Q T Q^T with Q = F when F is orthogonal, else the rotation of its polar
    decomposition (finite strain). Returns float32 ``(6, ...)``.
    """
    linear = np.eye(3) if linear is None else np.asarray(linear, np.float64)
    f = voxel_frame(target_affine).T @ linear @ voxel_frame(source_affine)
    q = f if np.allclose(f @ f.T, np.eye(3), atol=1e-6) else _polar_rotation(f)
    return _rotate6(np.asarray(t6, np.float64), q).astype(np.float32)
