"""Synthetic labelled cases for the 2.5-D segmentation tests (a helper module, not tests)."""

from pathlib import Path

import nibabel as nib
import numpy as np

AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def save(path, data):
    nib.save(nib.Nifti1Image(np.asarray(data), AFFINE), str(path))


def synthetic_case(folder: Path, names: dict, et_label: int, seed: int = 0):
    """A 32 x 32 x 16 case at 2 mm: a bright-rimmed tumour in a brain, raw int16 intensities
    with a few 32767 outliers."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    g = np.indices((32, 32, 16)).astype(float)
    r_brain = np.sqrt(((g[0] - 16) / 13) ** 2 + ((g[1] - 16) / 13) ** 2 + ((g[2] - 8) / 7) ** 2)
    r = np.sqrt((g[0] - 14) ** 2 + (g[1] - 17) ** 2 + (2 * (g[2] - 8)) ** 2)
    brain = r_brain < 1
    labels = np.zeros((32, 32, 16), np.int16)
    labels[(r < 9) & brain] = 2
    labels[r < 5] = et_label
    labels[r < 3] = 1
    t1c = np.where(brain, 400 + 20 * rng.standard_normal(brain.shape), 0)
    t1c[labels == et_label] += 500
    flair = np.where(brain, 300 + 20 * rng.standard_normal(brain.shape), 0)
    flair[labels > 0] += 400
    t1c[16, 16, 8] = t1c[10, 12, 6] = 32767
    save(folder / names["t1c"], t1c.astype(np.int16))
    save(folder / names["flair"], flair.astype(np.int16))
    save(folder / names["seg"], labels)
    return labels, brain


BRATS21 = {"t1c": "P1_t1ce.nii.gz", "flair": "P1_flair.nii.gz", "seg": "P1_seg.nii.gz"}
BRATS23 = {"t1c": "P2-t1c.nii.gz", "flair": "P2-t2f.nii.gz", "seg": "P2-seg.nii.gz"}


def synthetic_cohort(root: Path) -> dict:
    """Two labelled cases under `root` (``download/P1`` in BraTS 2021 names, ``P2`` in BraTS
    2023 names) and an empty folder; returns {name: (labels, brain)}."""
    truth = {"download/P1": synthetic_case(root / "download" / "P1", BRATS21, 4, 0),
             "P2": synthetic_case(root / "P2", BRATS23, 3, 1)}
    (root / "empty" / "nothing").mkdir(parents=True)
    return truth
