"""Real labelled cases for segmentation training and validation, from any BraTS-like folder.

* `find_labelled_cases(root)`: every case folder under `root` (searched three levels deep)
  with T1c, FLAIR and reference labels, in any of the layouts of the project's shared data
  or of a user's BraTS download: BraTS 2017-2021 names (`<case>_t1ce`, `<case>_flair`,
  `<case>_seg`, labels 1/2/4), BraTS 2023 names (`<case>-t1c`, `-t2f`, `-seg`, labels
  1/2/3), `brats2015` (`T1c_subtrMeanDivStd`, `Flair_subtrMeanDivStd`, `OTMultiClass`, label
  3 = non-enhancing core) and the `tcga` layout (`t1c_bet`, `fla_bet`, `fusion_simple`).
* `robust_normalise(image, brain)`: intensities clipped to the brain's 0.5 - 99.5 percentiles
  (raw scanner scales differ ~30x and a few voxels sit at 32767), then z-scored in the brain;
  0 outside. Raw and pre-z-scored inputs come out alike.
* `prepare_case(case, spacing_mm)`: the case on the network's working grid (same field of
  view, isotropic `spacing_mm`): normalised T1c/FLAIR, the share of each working voxel in
  the WT/TC/ET regions (partial volume; >= 0.5 is the region mask), brain mask.
* `cached_case(case, spacing_mm, cache_dir)`: the same through an npz cache keyed by the
  files (path, size, mtime) and the preprocessing version, so epochs never re-read NIfTI.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rtjax.anatomy import foreground
from rtjax.errors import InputError
from rtjax.io import check_same_grid, find_case_files, load_image, load_tumour_masks
from rtjax.seg.data import SOURCES
from rtjax.seg.grid import resample_to_shape, working_shape
from rtjax.seg.model import masks_to_regions

__all__ = [
    "PREPROCESSING_VERSION",
    "LabelledCase",
    "PreparedCase",
    "find_labelled_cases",
    "robust_normalise",
    "normalise_pair",
    "prepare_case",
    "cached_case",
]

#: Bump when `prepare_case` changes: cached npz files of another version are rebuilt.
#: 2: regions are partial-volume shares (float), no longer masks.
PREPROCESSING_VERSION = 2
PERCENTILES = (0.5, 99.5)

@dataclass(frozen=True)
class LabelledCase:
    """The files of one labelled case; `name` is its folder relative to the searched root."""

    name: str
    t1c: Path
    flair: Path
    labels: Path
    convention: str
    brain_mask: Path | None = None

    @property
    def files(self) -> tuple[Path, ...]:
        return tuple(p for p in (self.t1c, self.flair, self.labels, self.brain_mask) if p is not None)


@dataclass(frozen=True)
class PreparedCase:
    """A case on the working grid (RAS-canonical, isotropic `spacing` mm).

    Attributes:
        name: as in `LabelledCase`.
        x: (X, Y, Z, 2) float32 normalised T1c, FLAIR.
        regions: (X, Y, Z, 3) float32 share of each working voxel in WT, TC, ET (the
            original-grid masks averaged; `region_masks` thresholds it at 0.5).
        brain: (X, Y, Z) bool.
        spacing: working voxel size, mm.
    """

    name: str
    x: np.ndarray
    regions: np.ndarray
    brain: np.ndarray
    spacing: float

    @property
    def region_masks(self) -> np.ndarray:
        """(X, Y, Z, 3) bool WT, TC, ET on the working grid (share >= 0.5)."""
        return self.regions >= 0.5


def _nifti(folder: Path, stem: str) -> Path | None:
    for suffix in (".nii.gz", ".nii"):
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    return None


def _case_in(folder: Path, root: Path) -> LabelledCase | None:
    name = folder.relative_to(root).as_posix()
    for spec in SOURCES.values():  # the fixed-name layouts of the shared data
        files = [_nifti(folder, s) for s in (spec.t1c, spec.flair, spec.labels)]
        if all(files):
            mask = _nifti(folder, spec.brain_mask) if spec.brain_mask else None
            return LabelledCase(name, *files, spec.convention, mask)
    try:
        found = find_case_files(folder)
    except InputError:
        return None
    if not all(k in found for k in ("t1c", "flair", "seg")):
        return None
    convention = "brats2023" if found["seg"].name.split(".")[0].endswith("-seg") else "brats2021"
    return LabelledCase(name, found["t1c"], found["flair"], found["seg"], convention, found.get("brain_mask"))


def find_labelled_cases(root: str | Path, depth: int = 3) -> list[LabelledCase]:
    """Every labelled case folder under `root` (itself included, `depth` levels down),
    sorted by name. Folders that hold no complete case are skipped silently."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "data folder not found")
    cases, frontier = [], [root]
    for _ in range(depth + 1):
        deeper = []
        for folder in frontier:
            case = _case_in(folder, root)
            if case is not None:
                cases.append(case)
            else:
                deeper += sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        frontier = deeper
    return sorted(cases, key=lambda c: c.name)


def robust_normalise(image: np.ndarray, brain: np.ndarray, percentiles=PERCENTILES) -> np.ndarray:
    """`image` clipped to the brain's `percentiles`, z-scored over the brain, 0 outside
    (float32, same shape). An empty brain gives zeros."""
    image = np.asarray(image, np.float32)
    brain = np.asarray(brain, bool)
    if not brain.any():
        return np.zeros_like(image)
    values = image[brain]
    lo, hi = np.percentile(values, percentiles)
    clipped = np.clip(values, lo, hi)
    out = np.zeros_like(image)
    out[brain] = (clipped - clipped.mean()) / max(float(clipped.std()), 1e-6)
    return out


def normalise_pair(t1c: np.ndarray, flair: np.ndarray, brain: np.ndarray | None = None):
    """(X, Y, Z, 2) network input of T1c and FLAIR and the brain mask used (given, else the
    non-background voxels of either image)."""
    if t1c.shape != flair.shape:
        raise ValueError(f"t1c and flair shapes differ: {t1c.shape} vs {flair.shape}")
    if brain is None:
        brain = foreground(np.asarray(t1c)) | foreground(np.asarray(flair))
    brain = np.asarray(brain, bool)
    return np.stack([robust_normalise(t1c, brain), robust_normalise(flair, brain)], axis=-1), brain


def prepare_case(case: LabelledCase, spacing_mm: float = 2.0) -> PreparedCase:
    """Load, check (one grid), normalise and resample one case to the working grid.

    Raises:
        InputError: a file is unreadable, the grids differ, or the labels are unknown/empty.
    """
    images = {"t1c": load_image(case.t1c), "flair": load_image(case.flair)}
    if case.brain_mask is not None:
        images["brain_mask"] = load_image(case.brain_mask, kind="mask")
    masks, label_image = load_tumour_masks(case.labels, case.convention)
    check_same_grid({**images, "labels": label_image})
    brain = images["brain_mask"].data if "brain_mask" in images else None
    x, brain = normalise_pair(images["t1c"].data, images["flair"].data, brain)
    shape = working_shape(x.shape[:3], images["t1c"].spacing, spacing_mm)
    regions = masks_to_regions(masks)
    return PreparedCase(
        name=case.name,
        x=resample_to_shape(x, shape),
        regions=np.clip(resample_to_shape(regions, shape), 0.0, 1.0),
        brain=resample_to_shape(brain.astype(np.float32), shape) >= 0.5,
        spacing=float(spacing_mm),
    )


def _cache_key(case: LabelledCase, spacing_mm: float) -> str:
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in case.files]
    blob = json.dumps([PREPROCESSING_VERSION, float(spacing_mm), case.convention, stats])
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def cached_case(case: LabelledCase, spacing_mm: float, cache_dir: str | Path) -> PreparedCase:
    """`prepare_case` through `cache_dir/<key>.npz` (written atomically on a miss)."""
    cache_dir = Path(cache_dir)
    path = cache_dir / f"{_cache_key(case, spacing_mm)}.npz"
    if path.is_file():
        with np.load(path) as z:
            return PreparedCase(case.name, z["x"].astype(np.float32), z["regions"].astype(np.float32), z["brain"],
                                float(spacing_mm))
    prepared = prepare_case(case, spacing_mm)
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".partial{os.getpid()}.npz")  # per process: folds may train in parallel
    np.savez(partial, x=prepared.x.astype(np.float16), regions=prepared.regions.astype(np.float16),
             brain=prepared.brain)
    partial.replace(path)
    stored = lambda a: a.astype(np.float16).astype(np.float32)  # exactly what a later cache hit returns
    return PreparedCase(case.name, stored(prepared.x), stored(prepared.regions), prepared.brain, prepared.spacing)
