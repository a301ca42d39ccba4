"""Tissue maps of a case: its own ``wm``/``gm``/``csf``, or the MNI152 atlas registered to it.

A case with its own white- and grey-matter maps keeps them (validated: probabilities in
[0, 1], on the grid of the case's images). A case without them gets the ICBM152 2009a
symmetric atlas that nilearn ships, registered to the case's T1 (else T1c) with ANTs
(antspyx; Mattes mutual information on :func:`registration_intensity`, which keeps the
background apart from the darkest tissue): affine, then SyN, both at ``resolution_mm`` (2 mm
by default), with the tumour (dilated by ``LESION_MARGIN_MM``) masked out of the similarity
cost, so the tissue inside the tumour is the atlas's. The atlas maps are warped straight
onto the case grid through both images' affines.

A case with no t1/t1c but a ``brain_mask`` (research cohorts that ship only masks) is
registered by its outline instead: the atlas ``brain`` to the case's brain mask, both
smoothed by ``OUTLINE_SMOOTHING_MM``, with mean squares (same affine-then-SyN path and
tumour masking). Only the brain's outline guides that registration: the atlas's interior
(ventricles, the wm/gm boundary) follows the outline's deformation, not the patient's
anatomy; :func:`case_tissue` warns and records the target in ``tissue.json``.

Atlas maps (all on the nilearn grid, 197x233x189, 1 mm, RAS):

- ``wm``, ``gm``: nilearn's probability maps (uint8 / 255);
- ``brain``: template T1 > 0 (the nilearn template is skull-stripped; this is the
  ICBM152 brain mask exactly);
- ``csf``: derived, ``brain * (1 - wm - gm)`` clipped to [0, 1] (ventricles and sulci).

The warped maps are renormalised (where wm + gm + csf > 1 they are divided by the sum) and
set to zero outside the case's brain mask: its ``brain_mask`` file, else the foreground
(voxels differing from the background value on the image's faces) of its skull-stripped
images with holes filled, else, when the images do not look skull-stripped, the
registered atlas brain mask.

Geometry: rtjax computes in RAS+ (nibabel), ANTs in LPS physical space. :func:`to_ants`
and :func:`from_ants` convert an array and its voxel-to-world affine both ways (the sign of
x and y flips); ANTs affine transforms come back as RAS 4x4 matrices
(:func:`ants_affine_to_ras`).

Outputs of :func:`case_tissue` (on the case's input grid): ``wm.nii.gz``, ``gm.nii.gz``,
``csf.nii.gz`` (float32), ``brain_mask.nii.gz`` (uint8), ``tissue.png`` and
``tissue.json`` (method, timings, versions, tumour masking, the cache key). A rerun with
the same inputs reuses them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
from scipy.ndimage import binary_fill_holes, gaussian_filter

from growth.tensor import TENSOR_COMPONENTS
from rtjax.atlas import load_atlas
from rtjax.ctv import euclidean_distance
from rtjax.errors import InputError
from rtjax.io import Image, check_same_grid, load_case, load_image, save_image
from rtjax.plotting import headless_pyplot
from rtjax.provenance import atomic_write, run_metadata, write_json_atomic
from rtjax.tensor_io import (
    load_tensor_fa_peaks,
    load_tensor_fsl,
    reorient_tensor,
    resample_tensor,
    save_tensor_fsl,
)

__all__ = [
    "FOREGROUND_FLOOR",
    "LESION_MARGIN_MM",
    "OUTLINE_SMOOTHING_MM",
    "AtlasRegistration",
    "CaseTissue",
    "ants_affine_to_ras",
    "case_brain_mask",
    "case_tissue",
    "foreground",
    "from_ants",
    "outline_intensity",
    "normalise_tissue",
    "register_atlas",
    "registration_intensity",
    "save_tissue_figure",
    "target_image",
    "to_ants",
    "tumour_cost_mask",
]

#: The tumour is dilated by this many mm before it is masked out of the similarity cost.
LESION_MARGIN_MM = 3.0
#: SyN iterations per level (shrink 4, 2, 1 of the registration grid).
SYN_ITERATIONS = (40, 20, 10)
#: :func:`registration_intensity` maps the foreground to [FOREGROUND_FLOOR, 1] and the
#: background to 0, so that the darkest tissue (CSF) stays apart from "no data" in the
#: 32-bin Mattes histogram (6 bins apart, beyond the cubic B-spline Parzen window).
FOREGROUND_FLOOR = 0.2
#: Gaussian sigma (mm) of the brain masks compared by an outline registration.
OUTLINE_SMOOTHING_MM = 2.0
# A skull-stripped image's foreground covers at most this fraction of its grid.
_STRIPPED_MAX_FRACTION = 0.6
# Bumped whenever the method changes, so that older caches are not reused.
_CACHE_VERSION = 3
_OUTPUTS = ("wm.nii.gz", "gm.nii.gz", "csf.nii.gz", "brain_mask.nii.gz", "tissue.png")
#: The population DTI on the case grid (FSL six volumes), with an atlas DTI.
DTI_OUTPUT = "dti_atlas.nii.gz"
_LPS = np.diag([-1.0, -1.0, 1.0])


# --------------------------------------------------------------------------- ANTs geometry


def to_ants(data: np.ndarray, affine: np.ndarray):
    """An ANTs image (float32) of a 3-D array on a RAS voxel-to-world ``affine`` (4x4, mm).

    ANTs physical space is LPS: origin and direction are those of the affine with x and y
    negated; spacing is the column norms. Shears cannot be represented (ValueError).
    """
    import ants

    matrix = _LPS @ np.asarray(affine, float)[:3, :3]
    spacing = np.linalg.norm(matrix, axis=0)
    direction = matrix / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        raise ValueError("affine has a shear: ANTs needs orthogonal voxel axes")
    return ants.from_numpy(
        np.asarray(data, np.float32),
        origin=tuple(float(v) for v in _LPS @ np.asarray(affine, float)[:3, 3]),
        spacing=tuple(float(v) for v in spacing),
        direction=direction,
    )


def from_ants(image) -> tuple[np.ndarray, np.ndarray]:
    """(array, RAS voxel-to-world affine (4x4, mm)) of an ANTs image: inverse of to_ants."""
    affine = np.eye(4)
    affine[:3, :3] = _LPS @ np.asarray(image.direction) @ np.diag(image.spacing)
    affine[:3, 3] = _LPS @ np.asarray(image.origin)
    return image.numpy(), affine


def ants_affine_to_ras(path: str | Path) -> np.ndarray:
    """An ANTs affine transform file (.mat) as a 4x4 RAS matrix mapping fixed-image world
    points (mm) to moving-image world points (mm), the direction ANTs stores."""
    import ants

    transform = ants.read_transform(str(path))
    params = np.asarray(transform.parameters, float)
    centre = np.asarray(transform.fixed_parameters, float)
    matrix, translation = params[:9].reshape(3, 3), params[9:12]
    lps = np.eye(4)
    lps[:3, :3] = matrix
    lps[:3, 3] = translation + centre - matrix @ centre
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    return flip @ lps @ flip


# --------------------------------------------------------------------------- atlas


@dataclass(frozen=True)
class AtlasRegistration:
    """The atlas registered to a target image.

    Attributes:
        maps: "wm", "gm", "csf", "brain" -> float32 canonical arrays on the target's grid
            (linear interpolation, not yet renormalised or clipped by a brain mask).
        affine_ras: (4, 4) target world (RAS mm) -> atlas world (RAS mm), the affine stage.
        info: method, resolution, timings (s).
    """

    maps: dict[str, np.ndarray]
    affine_ras: np.ndarray
    info: dict[str, Any]


def registration_intensity(data: np.ndarray) -> np.ndarray:
    """What the registration sees (float32): the :func:`foreground` rescaled linearly from
    its 0.5th and 99.5th percentiles to [``FOREGROUND_FLOOR``, 1] (clipped), the background
    0; for raw and z-scored images alike.

    The floor keeps dark tissue apart from the background: without it the CSF between the
    brain and the edge of a skull-stripped image shares the background's histogram bin,
    the outline of the stripped brain is invisible to mutual information where it runs
    through CSF, and the atlas brain stops short of it (BRATS 2015 pat0002, with a wide
    CSF rim: the registered atlas brain covered 92.0 % of the case's brain mask without
    the floor, 96.5 % with it)."""
    inside = foreground(data)
    if not inside.any():
        return np.zeros(data.shape, np.float32)
    lo, hi = np.percentile(data[inside], [0.5, 99.5])
    scaled = np.clip((data - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    floored = FOREGROUND_FLOOR + (1.0 - FOREGROUND_FLOOR) * scaled
    return np.where(inside, floored, 0.0).astype(np.float32)


def outline_intensity(mask: np.ndarray, spacing, sigma_mm: float = OUTLINE_SMOOTHING_MM) -> np.ndarray:
    """What an outline registration sees (float32 in [0, 1]): the brain ``mask`` (canonical
    (X, Y, Z), non-zero = brain) smoothed by a Gaussian of ``sigma_mm`` (``spacing`` in mm
    per axis), so that mean squares has a gradient across the boundary."""

    sigma = [sigma_mm / float(s) for s in spacing]
    smooth = gaussian_filter(np.asarray(mask != 0, np.float32), sigma, mode="constant")
    return np.clip(smooth, 0.0, 1.0).astype(np.float32)


def _resample(image, resolution_mm: float | None):
    """Linear resampling of an ANTs image to isotropic ``resolution_mm``; an image already
    that coarse (or ``resolution_mm`` None) is returned as is, never upsampled."""
    import ants

    if resolution_mm is None or min(image.spacing) >= resolution_mm - 1e-6:
        return image
    return ants.resample_image(image, (resolution_mm,) * 3, use_voxels=False, interp_type=0)


def register_atlas(
    target: Image,
    *,
    cost_mask: np.ndarray | None = None,
    deformable: bool = True,
    resolution_mm: float | None = 2.0,
    atlas: Mapping[str, Image] | None = None,
    outline: bool = False,
) -> AtlasRegistration:
    """Register the atlas T1 to ``target`` with ANTs and warp the atlas maps onto its grid.

    Args:
        target: the case image (T1 or T1c; a brain mask with ``outline``), canonical.
        cost_mask: boolean (X, Y, Z) on the target grid: voxels where the similarity cost
            is evaluated (the tumour excluded); None: everywhere.
        deformable: affine then SyN (``SYN_ITERATIONS``); False: affine only.
        resolution_mm: isotropic grid (mm) on which both images are registered; None:
            their own grids. The maps are always warped onto the target's own grid.
        atlas: "t1", "wm", "gm", "csf", "brain" images (default: the MNI152 atlas,
            :meth:`rtjax.atlas.Atlas.images`); every image but "t1" is warped (e.g. the
            components of a population DTI, :func:`atlas_dti_images`).
        outline: ``target`` is a brain mask: register the atlas "brain" to it, both
            :func:`outline_intensity`, with mean squares instead of mutual information.
    """
    import ants

    atlas = load_atlas().images() if atlas is None else atlas
    start = time.perf_counter()
    if outline:
        fixed = outline_intensity(target.data, target.spacing)
        brain = atlas["brain"]
        moving, moving_affine = outline_intensity(brain.data, brain.spacing), brain.affine
        metric = ("meansquares", "mean squares on the brain masks smoothed by "
                  f"{OUTLINE_SMOOTHING_MM:g} mm (outline only)")
    else:
        fixed = registration_intensity(target.data)
        moving, moving_affine = registration_intensity(atlas["t1"].data), atlas["t1"].affine
        metric = ("mattes", "Mattes mutual information")
    grid = to_ants(fixed, target.affine)  # the target's own grid, where the maps land
    fixed_low = _resample(grid, resolution_mm)
    moving_low = _resample(to_ants(moving, moving_affine), resolution_mm)
    mask = None
    if cost_mask is not None:
        mask = ants.resample_image_to_target(to_ants(np.asarray(cost_mask, np.float32), target.affine),
                                             fixed_low, interp_type="nearestNeighbor")
    method = "SyN" if deformable else "Affine"
    with tempfile.TemporaryDirectory(prefix="rtjax_ants_") as tmp:
        result = ants.registration(
            fixed_low, moving_low, type_of_transform=method, mask=mask,
            mask_all_stages=mask is not None, reg_iterations=SYN_ITERATIONS,
            aff_metric=metric[0], syn_metric=metric[0],
            outprefix=str(Path(tmp) / "atlas_"),
        )
        registered = time.perf_counter()
        transforms = result["fwdtransforms"]
        maps = {
            name: ants.apply_transforms(
                grid, to_ants(image.data, image.affine), transforms
            ).numpy().astype(np.float32)
            for name, image in atlas.items() if name != "t1"
        }
        affine_ras = ants_affine_to_ras(next(t for t in transforms if t.endswith(".mat")))
    info = {
        "method": f"ANTs {method}" + (" (affine, then SyN)" if deformable else ""),
        "metric": metric[1],
        "resolution_mm": resolution_mm,
        "syn_iterations": list(SYN_ITERATIONS) if deformable else None,
        "seconds": {"register": round(registered - start, 2),
                    "resample": round(time.perf_counter() - registered, 2)},
    }
    return AtlasRegistration(maps=maps, affine_ras=affine_ras, info=info)


# --------------------------------------------------------------------------- atlas DTI


def atlas_dti_images(fa, peaks, atlas_t1: Image) -> dict[str, Image]:
    """A population DTI (FA + first fibre peak, MNI152 world frame, e.g. TractSeg's) on the
    atlas grid, as six component images ``dti_xx`` ... ``dti_zz`` (the atlas's canonical
    voxel frame) for :func:`register_atlas` to warp."""
    dti, source = load_tensor_fa_peaks(fa, peaks)
    on_atlas = resample_tensor(dti, source, atlas_t1)
    return {f"dti_{c}": atlas_t1.with_data(on_atlas[k]) for k, c in enumerate(TENSOR_COMPONENTS)}


def registered_tensor(reg: AtlasRegistration, target: Image, atlas_t1: Image) -> np.ndarray:
    """The warped DTI components of ``reg`` as a tensor field (6, *target grid) in the
    target's canonical voxel frame: rotated by the affine stage (the local rotations of
    the deformable stage are not applied)."""
    t6 = np.stack([reg.maps[f"dti_{c}"] for c in TENSOR_COMPONENTS])
    return reorient_tensor(t6, atlas_t1.affine, target.affine, np.linalg.inv(reg.affine_ras[:3, :3]))


# --------------------------------------------------------------------------- tissue


def normalise_tissue(
    wm: np.ndarray, gm: np.ndarray, csf: np.ndarray, brain: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each map clipped to [0, 1], divided by wm + gm + csf where that exceeds 1, and set
    to 0 outside the boolean ``brain``; float32 arrays of the input shape."""
    maps = np.clip(np.stack([wm, gm, csf]).astype(np.float32), 0.0, 1.0)
    total = maps.sum(axis=0)
    maps = np.where(total > 1.0, maps / np.maximum(total, 1.0), maps) * brain
    return tuple(np.clip(m, 0.0, 1.0).astype(np.float32) for m in maps)


def foreground(data: np.ndarray) -> np.ndarray:
    """Voxels that differ from the background value, the most common value on the array's
    faces: 0 for raw skull-stripped images, the z-score of 0 for normalised ones."""
    faces = np.concatenate([np.take(data, i, axis=a).ravel()
                            for a in range(data.ndim) for i in (0, -1)])
    values, counts = np.unique(faces, return_counts=True)
    return data != values[np.argmax(counts)]


def _filled(mask: np.ndarray) -> np.ndarray:

    return binary_fill_holes(mask)


def case_brain_mask(
    images: Mapping[str, Image], fallback: np.ndarray | None = None
) -> tuple[np.ndarray, str]:
    """The case's brain (boolean canonical array) and where it came from: its
    ``brain_mask``; else the :func:`foreground` of its intensity images (t1c, flair, t1,
    t2), holes filled, when it covers at most 60 % of the grid (skull-stripped); else
    ``fallback`` (e.g. the registered atlas brain).

    Raises:
        InputError: no brain mask, no skull-stripped image and no fallback.
    """
    if "brain_mask" in images:
        return images["brain_mask"].data.astype(bool), str(images["brain_mask"].path)
    names = [n for n in ("t1c", "flair", "t1", "t2") if n in images]
    if names:
        inside = np.any([foreground(images[n].data) for n in names], axis=0)
        if inside.mean() <= _STRIPPED_MAX_FRACTION:
            return _filled(inside), f"foreground of {', '.join(names)}, holes filled"
    if fallback is not None:
        return np.asarray(fallback, bool), "registered atlas brain mask (images not skull-stripped)"
    where = next((images[n].path for n in images), None)
    raise InputError(where, "no brain_mask and no skull-stripped image to derive one from")


@dataclass(frozen=True)
class CaseTissue:
    """A case's tissue maps (canonical RAS float32 images in [0, 1], wm + gm + csf <= 1)
    and its brain mask (boolean image), all on the case grid.

    Attributes:
        info: provenance, as written to ``tissue.json``.
        dti: with an atlas DTI, its tensor field (6, *grid) carried to the case by the
            atlas registration (canonical voxel frame), else None.
    """

    wm: Image
    gm: Image
    csf: Image
    brain: Image
    info: dict[str, Any] = field(default_factory=dict)
    dti: np.ndarray | None = None


def _stat(path: Path | None) -> list | None:
    if path is None:
        return None
    stat = Path(path).stat()
    return [str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns]


def _digest(mask: np.ndarray | None) -> str | None:
    if mask is None:
        return None
    return hashlib.sha1(np.packbits(np.asarray(mask, bool)).tobytes()).hexdigest()


def _cached(folder: Path, key: dict, reference: Image) -> CaseTissue | None:
    """The tissue cached in ``folder`` under ``key``, or None."""
    try:
        info = json.loads((folder / "tissue.json").read_text())
    except (OSError, ValueError):
        return None
    if info.get("key") != key or not all((folder / n).is_file() for n in _OUTPUTS):
        return None
    try:
        maps = {n: load_image(folder / f"{n}.nii.gz", kind="probability") for n in ("wm", "gm", "csf")}
        brain = load_image(folder / "brain_mask.nii.gz", kind="mask")
        check_same_grid({"reference": reference, **maps, "brain": brain})
        dti = None
        if key.get("atlas_dti"):
            dti, dti_ref = load_tensor_fsl(folder / DTI_OUTPUT)
            check_same_grid({"reference": reference, "dti": dti_ref})
    except InputError:
        return None
    return CaseTissue(**maps, brain=brain, info=info, dti=dti)


def _copy_cache(source: Path, dest: Path) -> None:
    """Copy a cached result into ``dest``, tissue.json (the completion marker) last."""
    extra = (DTI_OUTPUT,) if (source / DTI_OUTPUT).is_file() else ()
    for name in (*_OUTPUTS, *extra, "tissue.json"):
        atomic_write(dest / name, lambda tmp, name=name: shutil.copy2(source / name, tmp))


def _lesion_of(images: Mapping[str, Image], lesion: np.ndarray | None) -> tuple[np.ndarray | None, str]:
    if lesion is not None:
        return np.asarray(lesion, bool), "given tumour mask"
    if "seg" in images:
        # Any non-zero label is tumour in every label convention.
        return images["seg"].data != 0, f"non-zero labels of {images['seg'].path}"
    return None, "none: the case has no seg, the whole image entered the registration cost"


def tumour_cost_mask(lesion: np.ndarray, spacing) -> np.ndarray:
    """Where the registration cost is evaluated: voxels farther than LESION_MARGIN_MM from
    the boolean ``lesion`` (canonical (X, Y, Z); ``spacing`` in mm per axis)."""

    if not lesion.any():
        return np.ones(lesion.shape, bool)
    return euclidean_distance(lesion, spacing, max_distance_mm=LESION_MARGIN_MM) > LESION_MARGIN_MM


def _versions() -> dict[str, str]:

    return {p: version(p) for p in ("antspyx", "nilearn", "nibabel", "numpy")}


def _say(log: Callable[[str], None] | None, message: str) -> None:
    if log is not None:
        log(message)


def case_tissue(
    case_dir: str | Path,
    out_dir: str | Path,
    *,
    lesion: np.ndarray | None = None,
    overrides: Mapping[str, str | Path] | None = None,
    deformable: bool = True,
    resolution_mm: float | None = 2.0,
    reuse_dirs: Sequence[str | Path] = (),
    atlas_dti: tuple[str | Path, str | Path] | None = None,
    log: Callable[[str], None] | None = None,
) -> CaseTissue:
    """Tissue maps for one case folder, written to ``out_dir`` (see the module docstring).

    The case's own ``wm`` and ``gm`` (and ``csf``; else csf = brain * (1 - wm - gm)) are
    used as they are when present (renormalised only where wm + gm + csf > 1, with a
    warning). Otherwise the MNI152 atlas is registered to the case's t1 (else t1c; else,
    with a warning, its ``brain_mask`` by the outline only, see :func:`target_image`), with
    ``lesion`` (canonical boolean array; default: the non-zero voxels of the case's
    ``seg``) masked out of the cost. A valid earlier result in ``out_dir`` or in one of
    ``reuse_dirs`` (copied into ``out_dir``) is reused. With ``atlas_dti`` (FA, PEAKS of a
    population DTI in the MNI152 frame) the DTI is carried to the case by the same
    registration (a registration of its own when the case has its own tissue maps) and
    written as ``dti_atlas.nii.gz`` (:func:`registered_tensor`).

    Raises:
        InputError: a bad or missing file, a tissue map off the images' grid, only one of
            wm/gm, or neither t1/t1c nor brain_mask to register the atlas to; it names the
            file or folder.
    """
    start = time.perf_counter()
    case_dir, out_dir = Path(case_dir), Path(out_dir)
    _say(log, f"loading {case_dir}")
    wanted = ["t1c", "flair", "t1", "t2", "seg", "wm", "gm", "csf", "brain_mask"]
    case = load_case(case_dir, names=wanted, overrides=overrides)
    images = case.images
    own = [n for n in ("wm", "gm") if n in images]
    if len(own) == 1:
        missing = "gm" if own == ["wm"] else "wm"
        raise InputError(images[own[0]].path, f"the case has {own[0]} but no {missing} map: "
                         f"give both, or neither to use the atlas")
    target = None if own else target_image(images)
    if not own and target is None:
        raise InputError(case_dir, "no tissue maps (wm, gm) and no t1 or t1c (nor a "
                         "brain_mask) to register the MNI152 atlas to")
    reference = images["wm"] if own else images[target]
    lesion, lesion_source = _lesion_of(images, lesion)
    if lesion is not None and lesion.shape != reference.shape:
        raise ValueError(f"lesion mask shape {lesion.shape} differs from the case grid {reference.shape}")
    key = {
        "version": _CACHE_VERSION, "own_maps": bool(own), "deformable": deformable,
        "resolution_mm": resolution_mm, "lesion_sha1": _digest(lesion),
        "inputs": {n: _stat(img.path) for n, img in images.items()
                   if n in ("t1", "t1c", "wm", "gm", "csf", "brain_mask")},
        "atlas_dti": None if atlas_dti is None else [_stat(Path(f)) for f in atlas_dti],
    }
    for folder in (out_dir, *map(Path, reuse_dirs)):
        cached = _cached(folder, key, reference)
        if cached is not None:
            _say(log, f"reusing the tissue maps in {folder}")
            if folder != out_dir:
                _copy_cache(folder, out_dir)
            return cached
    loaded = time.perf_counter()
    if own:
        tissue, info = _own_tissue(images, reference)
        if atlas_dti is not None:
            tissue["dti"], info["dti_atlas"] = _own_tissue_atlas_dti(
                case_dir, images, reference, lesion, atlas_dti, deformable, resolution_mm, log)
    else:
        outline = target == "brain_mask"
        if outline:
            warnings.warn(f"{case_dir}: no t1 or t1c; the MNI152 atlas is registered to the "
                          f"brain mask {images[target].path.name}, so only the brain outline "
                          "guided the registration (the tissue inside is the atlas's, not the "
                          "patient's)", stacklevel=2)
        if lesion is None:
            warnings.warn(f"{case_dir}: no tumour segmentation, the atlas registration cost "
                          "includes the tumour", stacklevel=2)
        _say(log, f"registering the MNI152 atlas to {images[target].path.name} "
                  f"({'affine, then SyN' if deformable else 'affine only'}, "
                  f"{resolution_mm or 'native'} mm){'' if lesion is not None else ', no tumour mask'}")
        cost = None if lesion is None else tumour_cost_mask(lesion, reference.spacing)
        atlas = load_atlas()
        dti_images = {} if atlas_dti is None else atlas_dti_images(*atlas_dti, atlas.t1)
        reg = register_atlas(reference, cost_mask=cost, deformable=deformable,
                             resolution_mm=resolution_mm, outline=outline,
                             atlas={**atlas.images(), **dti_images})
        _say(log, "renormalising and clipping the warped maps to the brain mask")
        brain, brain_from = case_brain_mask(images, fallback=reg.maps["brain"] > 0.5)
        wm, gm, csf = normalise_tissue(reg.maps["wm"], reg.maps["gm"], reg.maps["csf"], brain)
        tissue = {"wm": wm, "gm": gm, "csf": csf, "brain": brain}
        if atlas_dti is not None:
            tissue["dti"] = registered_tensor(reg, reference, atlas.t1)
        info = {
            "source": "atlas", "atlas": "ICBM152 2009a symmetric (nilearn), csf = brain * "
            "(1 - wm - gm), brain = template > 0", "registered_to": str(images[target].path),
            "target": "brain_mask (no T1/T1c)" if outline else target,
            **reg.info, "affine_case_to_atlas_ras": np.round(reg.affine_ras, 6).tolist(),
            "brain_mask": brain_from,
        }
        if atlas_dti is not None:
            info["dti_atlas"] = _dti_record(atlas_dti, "the tissue registration")
        info["seconds"] = {"load": round(loaded - start, 2), **info["seconds"]}
    info.update({"tumour_masked": lesion is not None and not own,
                 "tumour_mask": "not used (the case's own maps)" if own else lesion_source,
                 "versions": _versions(), **run_metadata(), "key": key})
    (out_dir / "tissue.json").unlink(missing_ok=True)  # the completion marker, written last
    result = _write(tissue, reference, images, out_dir, info, log)
    result.info["seconds"]["total"] = round(time.perf_counter() - start, 2)
    write_json_atomic(out_dir / "tissue.json", result.info)
    return result


def _dti_record(atlas_dti, how: str) -> dict:
    return {"fa": str(Path(atlas_dti[0]).absolute()), "peaks": str(Path(atlas_dti[1]).absolute()),
            "frame": "MNI152 world (peaks), resampled onto the atlas grid",
            "carried_by": how, "rotation": "the affine stage's (deformable stage: positions only)",
            "file": DTI_OUTPUT}


def _own_tissue_atlas_dti(case_dir, images, reference, lesion, atlas_dti, deformable,
                          resolution_mm, log):
    """A case with its own tissue maps and an atlas DTI: register the atlas to the case's
    t1 / t1c / brain_mask for the DTI alone. Returns (tensor, record)."""
    target = target_image(images)
    if target is None:
        raise InputError(case_dir, "--dti-atlas: no t1, t1c or brain_mask to register the "
                         "atlas DTI to")
    _say(log, f"registering the MNI152 atlas to {images[target].path.name} for the atlas DTI")
    atlas = load_atlas()
    cost = None if lesion is None else tumour_cost_mask(lesion, reference.spacing)
    reg = register_atlas(images[target], cost_mask=cost, deformable=deformable,
                         resolution_mm=resolution_mm, outline=target == "brain_mask",
                         atlas={"t1": atlas.t1, "brain": atlas.brain,
                                **atlas_dti_images(*atlas_dti, atlas.t1)})
    return registered_tensor(reg, reference, atlas.t1), _dti_record(atlas_dti, f"a registration to {target}")


def target_image(images: Mapping[str, Image]) -> str | None:
    """The name of the case image the atlas is registered to: "t1", else "t1c", else
    "brain_mask" (outline only), else None."""
    return next((n for n in ("t1", "t1c", "brain_mask") if n in images), None)


def _own_tissue(images: Mapping[str, Image], reference: Image) -> tuple[dict, dict]:
    """The case's own maps: csf derived when absent, renormalised only where needed."""
    brain, brain_from = case_brain_mask(
        images, fallback=_filled((images["wm"].data + images["gm"].data) > 0))
    wm, gm = images["wm"].data, images["gm"].data
    csf = images["csf"].data if "csf" in images else np.clip(brain - wm - gm, 0.0, 1.0)
    over = int(np.count_nonzero(wm + gm + csf > 1.0 + 1e-5))
    if over:
        warnings.warn(f"{reference.path}: wm + gm + csf exceed 1 in {over} voxels; "
                      "divided by their sum there", stacklevel=3)
        wm, gm, csf = normalise_tissue(wm, gm, csf, np.ones(wm.shape, bool))
    info = {"source": "case", "files": {n: str(images[n].path) for n in ("wm", "gm", "csf")
                                        if n in images},
            "csf": "given" if "csf" in images else "derived: brain * (1 - wm - gm)",
            "renormalised_voxels": over, "brain_mask": brain_from, "seconds": {}}
    maps = {"wm": wm, "gm": gm, "csf": csf, "brain": brain}
    return {k: v.astype(bool if k == "brain" else np.float32) for k, v in maps.items()}, info


def _write(tissue: dict, reference: Image, images: Mapping[str, Image], out_dir: Path,
           info: dict, log) -> CaseTissue:
    """Save the maps, brain mask and figure on the reference's input grid."""
    begin = time.perf_counter()
    _say(log, f"writing the tissue maps to {out_dir}")
    for name in ("wm", "gm", "csf"):
        save_image(tissue[name], reference, out_dir / f"{name}.nii.gz", kind="float")
    save_image(tissue["brain"], reference, out_dir / "brain_mask.nii.gz", kind="mask")
    if tissue.get("dti") is not None:
        save_tensor_fsl(tissue["dti"], reference, out_dir / DTI_OUTPUT)
    background = next((images[n].data for n in ("t1", "t1c", "flair", "t2") if n in images),
                      tissue["wm"] + 0.5 * tissue["gm"])
    save_tissue_figure(background, tissue["wm"], tissue["gm"], tissue["csf"],
                       out_dir / "tissue.png", title=f"tissue: {info['source']}")
    info["seconds"]["write"] = round(time.perf_counter() - begin, 2)
    wrap = {k: reference.with_data(v) for k, v in tissue.items() if k != "dti"}
    return CaseTissue(**wrap, info=info, dti=tissue.get("dti"))


def save_tissue_figure(
    background: np.ndarray, wm: np.ndarray, gm: np.ndarray, csf: np.ndarray, path,
    *, title: str = "",
) -> Path:
    """Axial, coronal and sagittal slices (canonical RAS arrays) through the brain's centre:
    the background in grey with wm (red), gm (green), csf (blue) overlaid; PNG, atomic."""

    plt = headless_pyplot()
    total = wm + gm + csf
    centre = np.round(np.argwhere(total > 0).mean(axis=0)).astype(int) if total.any() else \
        np.asarray(total.shape) // 2
    rgb = np.stack([wm, gm, csf], axis=-1)
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    for axis, ax in zip((2, 1, 0), axes):
        take = lambda a: np.take(a, centre[axis], axis=axis)  # noqa: E731
        ax.imshow(np.rot90(take(background)), cmap="gray")
        overlay = np.rot90(np.concatenate([take(rgb), 0.45 * take(total)[..., None]], axis=-1))
        ax.imshow(np.clip(overlay, 0.0, 1.0))
        ax.set_axis_off()
        ax.set_title(("axial", "coronal", "sagittal")[2 - axis])
    fig.suptitle(f"{title} (red wm, green gm, blue csf)")
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=80, bbox_inches="tight",
                                                          format="png"), ".png")
    finally:
        plt.close(fig)
