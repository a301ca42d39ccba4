"""The one atlas loader: the ICBM152 2009a (MNI152) template and tissue maps in nilearn.

* `atlas_tissue_paths(name)`: the WM / GM probability files.
* `load_atlas(name)`: T1 template, WM, GM, brain and CSF as canonical RAS `Image`s.
* `atlas_arrays(name)`: (wm, gm, spacing) arrays, what the simulation generators take.

Nothing is downloaded: nilearn's wheel ships the files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rtjax.io import Image, load_image

__all__ = ["ATLASES", "Atlas", "atlas_tissue_paths", "load_atlas", "atlas_arrays"]

#: Atlas names accepted by `--atlas`.
ATLASES = ("mni152",)


def _nilearn_datasets():
    from nilearn import datasets  # heavy import, only when an atlas is asked for

    return datasets


def atlas_tissue_paths(name: str) -> dict[str, Path]:
    """Paths of an atlas's tissue probability maps: {"wm": ..., "gm": ...}.

    `mni152` is the ICBM152 2009a symmetric template (197x233x189, 1 mm, RAS) that the
    nilearn wheel ships: nothing is downloaded.
    """
    if name != "mni152":
        raise ValueError(f"unknown atlas {name!r}; available: {', '.join(ATLASES)}")
    datasets = _nilearn_datasets()
    paths = {"wm": Path(datasets.WM_MNI152_FILE_PATH), "gm": Path(datasets.GM_MNI152_FILE_PATH)}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"nilearn's MNI152 tissue maps are missing: {missing}")
    return paths


@dataclass(frozen=True)
class Atlas:
    """An atlas on its own grid (canonical RAS images of one shape).

    Attributes:
        name: the atlas name.
        t1: the skull-stripped T1 template (intensity).
        wm, gm: tissue probabilities in [0, 1].
        brain: 1 inside the brain (t1 > 0), else 0 (float32).
        csf: brain - wm - gm, clipped to [0, 1].
    """

    name: str
    t1: Image
    wm: Image
    gm: Image
    brain: Image
    csf: Image

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in self.wm.spacing)

    def images(self) -> dict[str, Image]:
        """{"t1", "wm", "gm", "brain", "csf"} -> image."""
        return {"t1": self.t1, "wm": self.wm, "gm": self.gm, "brain": self.brain, "csf": self.csf}


def load_atlas(name: str = "mni152") -> Atlas:
    """Load a built-in atlas (see `Atlas`)."""
    paths = atlas_tissue_paths(name)
    t1 = load_image(_nilearn_datasets().MNI152_FILE_PATH, kind="intensity")
    wm = load_image(paths["wm"], kind="probability")
    gm = load_image(paths["gm"], kind="probability")
    brain = (t1.data > 0).astype(np.float32)
    csf = np.clip(brain - wm.data - gm.data, 0.0, 1.0)
    return Atlas(name=name, t1=t1, wm=wm, gm=gm, brain=t1.with_data(brain), csf=t1.with_data(csf))


def atlas_arrays(name: str = "mni152") -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """WM and GM probability arrays (RAS canonical) and spacing (mm) of a built-in atlas."""
    paths = atlas_tissue_paths(name)
    wm = load_image(paths["wm"], kind="probability")
    gm = load_image(paths["gm"], kind="probability")
    return wm.data, gm.data, tuple(float(s) for s in wm.spacing)
