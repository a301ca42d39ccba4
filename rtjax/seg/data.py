"""Real cases with reference labels, for fine-tuning and leave-one-out validation.

Sources (each a folder of case folders under the data root, the layout of the project's
shared data):

* `brats2015/*`: `T1c_subtrMeanDivStd`, `Flair_subtrMeanDivStd` (z-scored in the brain),
  `OTMultiClass` (expert labels, convention `brats2015`: 3 non-enhancing goes to the core),
  `brainmask`.
* `tcga/*`: raw `t1c_bet`, `fla_bet` and the fusion of five BraTS-2020 algorithms
  `fusion_simple` (convention `brats2021`) as the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rtjax.data import DataNotFoundError, data_root
from rtjax.io import check_same_grid, load_image, load_tumour_masks
from rtjax.labels import TumourMasks
from rtjax.seg.model import masks_to_regions, normalise

__all__ = ["CaseSpec", "SOURCES", "RealCase", "find_real_cases", "load_real_case", "resolve_data_root"]


@dataclass(frozen=True)
class CaseSpec:
    """File stems (before .nii.gz) and label convention of one source's case folders."""

    t1c: str
    flair: str
    labels: str
    convention: str
    brain_mask: str | None = None


SOURCES = {
    "brats2015": CaseSpec("T1c_subtrMeanDivStd", "Flair_subtrMeanDivStd", "OTMultiClass", "brats2015", "brainmask"),
    "tcga": CaseSpec("t1c_bet", "fla_bet", "fusion_simple", "brats2021"),
}


@dataclass(frozen=True)
class RealCase:
    """One labelled case in RAS-canonical orientation.

    Attributes:
        name: "source/folder".
        x: (X, Y, Z, 2) float32 network input (`normalise`d T1c, FLAIR).
        masks: the reference tumour masks.
        spacing: voxel size, mm.
        brain: (X, Y, Z) bool brain mask.
    """

    name: str
    x: np.ndarray
    masks: TumourMasks
    spacing: tuple[float, float, float]
    brain: np.ndarray

    @property
    def regions(self) -> np.ndarray:
        """(X, Y, Z, 3) float32 WT/TC/ET targets."""
        return masks_to_regions(self.masks)


def resolve_data_root(root: str | None) -> Path | None:
    """The data folder of a `DataConfig.root`: None -> `rtjax.data.data_root()` (None if
    absent), "none" -> None, else the path."""
    if root is not None and str(root).lower() == "none":
        return None
    if root is None:

        try:
            return data_root()
        except DataNotFoundError:
            return None
    return Path(root)


def _file(folder: Path, stem: str) -> Path:
    for suffix in (".nii.gz", ".nii"):
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    return folder / f"{stem}.nii.gz"


def find_real_cases(root: str | Path | None, sources=tuple(SOURCES)) -> list[tuple[str, Path, CaseSpec]]:
    """(name, folder, spec) of every complete case folder of `sources` under `root`, sorted."""
    if root is None:
        return []
    found = []
    for source in sources:
        spec = SOURCES[source]
        base = Path(root) / source
        if not base.is_dir():
            continue
        for folder in sorted(p for p in base.iterdir() if p.is_dir()):
            stems = [spec.t1c, spec.flair, spec.labels] + ([spec.brain_mask] if spec.brain_mask else [])
            if all(_file(folder, s).is_file() for s in stems):
                found.append((f"{source}/{folder.name}", folder, spec))
    return found


def load_real_case(name: str, folder: Path, spec: CaseSpec) -> RealCase:
    """Load, check (one grid) and normalise one case."""

    images = {"t1c": load_image(_file(folder, spec.t1c)), "flair": load_image(_file(folder, spec.flair))}
    if spec.brain_mask:
        images["brain_mask"] = load_image(_file(folder, spec.brain_mask), kind="mask")
    masks, label_image = load_tumour_masks(_file(folder, spec.labels), spec.convention)
    check_same_grid({**images, "labels": label_image})
    brain = images["brain_mask"].data if spec.brain_mask else None
    x = normalise(images["t1c"].data, images["flair"].data, brain)
    brain = brain if brain is not None else np.any(x != 0, axis=-1)
    return RealCase(name=name, x=x, masks=masks, spacing=images["t1c"].spacing, brain=np.asarray(brain, bool))
