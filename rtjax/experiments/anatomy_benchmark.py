"""Atlas tissue registration (rtjax.anatomy) on the real data: Dice and time per case.

- SRI24: the MNI152 atlas registered to SRI24 ``t1_stripped``; transferred tissue (argmax
  of background, csf, gm, wm after renormalisation and clipping to the t1 > 0 brain)
  against SRI24 ``tissues``; brain = the registered atlas brain mask > 0.5 against
  ``tissues`` > 0.
- SRI24 by its outline: the same, registered to the brain mask ``t1_stripped > 0`` only
  (the path for cases with no T1/T1c, e.g. gliodil-patient001).
- BRATS 2015 (T1c only): the registered atlas brain mask against the case's own
  ``brainmask`` (never fed to the registration), with the tumour (``OTMultiClass``)
  masked out of the cost.

Wall time is noisy on a shared machine; CPU time counts every thread of this process.
Run by `python scripts/benchmark_anatomy.py [--quick]` (RTJAX_DATA or ../shared/data).
"""

from __future__ import annotations

import time

import numpy as np

from rtjax.anatomy import case_brain_mask, normalise_tissue, register_atlas, tumour_cost_mask
from rtjax.data import data_root
from rtjax.io import load_image, load_tumour_masks
from rtjax.metrics import dice

__all__ = ["BRATS", "sri24_row", "brats_row", "benchmark_anatomy"]

BRATS = ("brats_2013_pat0001_1", "brats_2013_pat0002_1", "brats_2013_pat0005_1")


def timed(call):
    wall, cpu = time.perf_counter(), time.process_time()
    result = call()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def sri24_row(root, deformable, outline=False):
    folder = root / "atlas" / "sri24"
    target = load_image(folder / "t1_stripped.nii.gz")
    labels = load_image(folder / "tissues.nii.gz", kind="label").data
    brain, _ = case_brain_mask({"t1": target})
    fixed = target.with_data(brain) if outline else target
    reg, wall, cpu = timed(lambda: register_atlas(fixed, deformable=deformable, outline=outline))
    maps = normalise_tissue(reg.maps["wm"], reg.maps["gm"], reg.maps["csf"], brain)
    stack = np.stack([1.0 - sum(maps), maps[2], maps[1], maps[0]])  # 0 bg, 1 csf, 2 gm, 3 wm
    argmax = stack.argmax(axis=0)
    scores = {"brain": dice(reg.maps["brain"] > 0.5, labels > 0)}
    scores.update({name: dice(argmax == k, labels == k) for name, k in (("wm", 3), ("gm", 2), ("csf", 1))})
    return "SRI24 outline" if outline else "SRI24 t1_stripped", scores, wall, cpu


def brats_row(root, case, deformable):
    folder = root / "brats2015" / case
    target = load_image(folder / "T1c_subtrMeanDivStd.nii.gz")
    masks, _ = load_tumour_masks(folder / "OTMultiClass.nii.gz", "brats2015")
    given = load_image(folder / "brainmask.nii.gz", kind="mask").data
    cost = tumour_cost_mask(masks.whole, target.spacing)
    reg, wall, cpu = timed(lambda: register_atlas(target, cost_mask=cost, deformable=deformable))
    return case, {"brain": dice(reg.maps["brain"] > 0.5, given)}, wall, cpu


def benchmark_anatomy(quick: bool = False) -> None:
    """Print the table of the module docstring (rows as they finish)."""
    root = data_root()
    rows = []
    for deformable in (False, True):
        method = "affine+SyN" if deformable else "affine"
        rows.append((method, *sri24_row(root, deformable)))
        for case in BRATS[:1] if quick else BRATS:
            if deformable or case == BRATS[0]:
                rows.append((method, *brats_row(root, case, deformable)))
    rows.append(("affine+SyN", *sri24_row(root, True, outline=True)))
    print(f"{'method':<11} {'case':<22} {'brain':>6} {'wm':>6} {'gm':>6} {'csf':>6} {'wall s':>7} {'cpu s':>6}")
    for method, case, scores, wall, cpu in rows:
        cells = " ".join(f"{scores[k]:6.3f}" if k in scores else f"{'-':>6}" for k in ("brain", "wm", "gm", "csf"))
        print(f"{method:<11} {case:<22} {cells} {wall:7.1f} {cpu:6.1f}", flush=True)
