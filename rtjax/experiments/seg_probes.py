"""Probes behind numbers in docs/segmentation.md.

`threshold_rows(workdir)`: the held-out Dice per region at other probability thresholds than
0.5, and how much of the missed whole tumour of each case sits below 0.3 / 0.1, from the
cross-validation's cached probabilities (`WORKDIR/cv_probs`, written by `rtjax train-seg`).
`view_rows(workdir, root, subsets)`: the held-out Dice per region of the mean of the cached
probabilities of each subset of views (2.5-D models of several `model.views`), one case in
memory at a time.
`grid_round_trip(regions, spacing, work_spacing)` and `resolution_ceiling_rows(root)`: the
Dice a perfect network on the working grid would reach on the case's own grid, with targets
thresholded at half a working voxel (hard) or the share of each working voxel (soft).
`contrast_rows(workdir, root)`: the T1c brain z-score of each case's reference enhancing
tumour against its healthy brain (`reference_contrast`): where the reference ET is no
brighter than healthy brain, no model reading the T1c finds it.
`postprocessing_rows(workdir, root, candidates)`: per case, the reference enhancing
tumour's volume and, under each post-processing candidate, the volume called enhancing and
the Dice per region of the mean of the views' cached held-out probabilities (as
`rtjax train-seg` scores them; `case_postprocessing_row` for one case).
`bias_rows(demo_dir)`: the shipped network's Dice on the demo patient rendered with bias
fields of other strengths (`rtjax.seg.synth.RenderConfig.bias`), from a `rtjax demo` folder.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from rtjax.experiments.demo import DEMO_PATIENT, DEMO_RENDER
from rtjax.io import load_image, load_tumour_masks
from rtjax.metrics import dice
from rtjax.seg.cases import find_labelled_cases, robust_normalise
from rtjax.seg.grid import resample_to_shape, working_shape
from rtjax.seg.infer import apply_postprocessing, probs_to_case_masks, segment_arrays
from rtjax.seg.model import REGIONS, masks_to_regions
from rtjax.seg.postprocessing import Postprocessing, score_regions
from rtjax.seg.slice_train import cv_probs_name
from rtjax.seg.slices import VIEWS
from rtjax.seg.synth import render_case
from rtjax.simulate import load_tissue

__all__ = ["bias_rows", "case_postprocessing_row", "contrast_rows", "postprocessing_rows", "reference_contrast", "grid_round_trip", "held_out_cases", "missed_rows", "resolution_ceiling_rows", "subset_dice",
           "threshold_rows", "view_rows"]


def reference_contrast(t1c_z: np.ndarray, brain: np.ndarray, masks) -> dict[str, float]:
    """Mean of the brain-z-scored T1c `t1c_z` in the reference enhancing tumour and in the
    healthy brain (`brain` outside the reference whole tumour) of reference `TumourMasks`
    (NaN for an empty region)."""
    mean = lambda where: float(t1c_z[where].mean()) if where.any() else float("nan")
    return {"enhancing_z": mean(masks.enhancing), "healthy_z": mean(brain & ~masks.whole)}


def contrast_rows(workdir, root) -> list[dict]:
    """`reference_contrast` of every labelled case under `root` with cached held-out
    probabilities in `workdir`, in the brain that cache stored (as `rtjax train-seg` scored it)."""
    rows = []
    for i, case in enumerate(find_labelled_cases(root)):
        cached = _cached_probs(workdir, i)
        if cached is None:
            continue
        brain = cached[1]
        masks, _ = load_tumour_masks(case.labels, case.convention)
        rows.append({"case": case.name,
                     **reference_contrast(robust_normalise(load_image(case.t1c).data, brain), brain, masks)})
    return rows


def held_out_cases(workdir, root):
    """(name, probabilities (X, Y, Z, 3), brain, reference regions (X, Y, Z, 3) bool) of
    every labelled case under `root` with cached held-out (axial) probabilities in `workdir`."""
    out = []
    for i, case in enumerate(find_labelled_cases(root)):
        cached = _cached_probs(workdir, i)
        if cached is None:
            continue
        probs, brain = cached
        masks, _ = load_tumour_masks(case.labels, case.convention)
        out.append((case.name, probs, brain, masks_to_regions(masks) > 0.5))
    if not out:
        raise FileNotFoundError(f"{workdir}: no cv_probs/case*_fold*.npz (run `rtjax train-seg` there first)")
    return out


def _cached_probs(workdir, index: int, view: str = "axial"):
    """Held-out probabilities and brain of case `index` for `view` in `workdir/cv_probs`
    (the newest file), or None."""
    cached = list(Path(workdir, "cv_probs").glob(cv_probs_name(index, view, "*", "*")))
    if not cached:
        return None
    with np.load(max(cached, key=lambda p: p.stat().st_mtime)) as stored:
        return stored["probs"].astype(np.float32), stored["brain"]


def subset_dice(probs_by_view: dict, brain, ref, subsets, keep_fraction: float = 0.5) -> dict:
    """{subset: [Dice WT, TC, ET]} of the mean probabilities (X, Y, Z, 3) of each subset
    (a tuple of keys of `probs_by_view`) against boolean reference regions `ref`."""
    out = {}
    for subset in subsets:
        probs = np.mean([probs_by_view[v] for v in subset], axis=0)
        got = masks_to_regions(probs_to_case_masks(probs, brain, keep_fraction)) > 0.5
        out[subset] = [dice(got[..., k], ref[..., k]) for k in range(len(REGIONS))]
    return out


def _held_out_views(workdir, root, views):
    """(case, {view: held-out probabilities (X, Y, Z, 3)}, brain, reference `TumourMasks`) of
    every labelled case under `root` with cached probabilities of every one of `views`."""
    for i, case in enumerate(find_labelled_cases(root)):
        cached = {v: _cached_probs(workdir, i, v) for v in views}
        if any(c is None for c in cached.values()):
            continue
        masks, _ = load_tumour_masks(case.labels, case.convention)
        yield case, {v: c[0] for v, c in cached.items()}, next(iter(cached.values()))[1], masks


def case_postprocessing_row(probs, brain, masks, spacing, t1c_z, candidates) -> dict:
    """One case's reference ET volume (mL) and, per `Postprocessing` candidate (keyed by its
    label), the volume called enhancing (mL) and the Dice per region: region probabilities
    (X, Y, Z, 3), boolean brain, reference `TumourMasks`, voxel size (mm) and the
    brain-z-scored T1c on the same grid."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    ref = masks_to_regions(masks) > 0.5
    row = {"reference_et_ml": float(masks.enhancing.sum()) * voxel_ml}
    for candidate in candidates:
        got = apply_postprocessing(probs, brain, spacing, t1c_z, candidate)
        row[candidate.label()] = {"et_ml": float(got.enhancing.sum()) * voxel_ml,
                                  **score_regions(masks_to_regions(got) > 0.5, ref, spacing, False)}
    return row


def postprocessing_rows(workdir, root, candidates: list[Postprocessing], views=VIEWS) -> list[dict]:
    """`case_postprocessing_row` of every labelled case under `root` with cached held-out
    probabilities of every one of `views` in `workdir`, on the mean of the views (as
    `rtjax train-seg` scores them), named by "case"."""
    rows = []
    for case, probs_by_view, brain, masks in _held_out_views(workdir, root, views):
        t1c = load_image(case.t1c)
        probs = np.mean(list(probs_by_view.values()), axis=0)
        rows.append({"case": case.name, **case_postprocessing_row(probs, brain, masks, t1c.spacing,
                                                                  robust_normalise(t1c.data, brain), candidates)})
    if not rows:
        raise FileNotFoundError(f"{workdir}: no case has cached probabilities for every view of {list(views)}")
    return rows


def view_rows(workdir, root, subsets, keep_fraction: float = 0.5) -> list[dict]:
    """Mean held-out Dice per region of each subset of views (tuples of `VIEWS` names),
    over the cases with cached probabilities for every view used."""
    views = sorted({v for subset in subsets for v in subset})
    scores = {subset: [] for subset in subsets}
    for _, probs_by_view, brain, masks in _held_out_views(workdir, root, views):
        got = subset_dice(probs_by_view, brain, masks_to_regions(masks) > 0.5, subsets, keep_fraction)
        for subset, row in got.items():
            scores[subset].append(row)
    if not scores[subsets[0]]:
        raise FileNotFoundError(f"{workdir}: no case has cached probabilities for every view of {views}")
    return [{"views": "+".join(subset), "cases": len(rows),
             **{f"dice_{r}": float(np.mean([row[k] for row in rows])) for k, r in enumerate(REGIONS)}}
            for subset, rows in scores.items()]


def threshold_rows(cases, thresholds=(0.3, 0.35, 0.4, 0.45, 0.5), keep_fraction: float = 0.5) -> list[dict]:
    """Mean held-out Dice per region (and the lowest WT) at each threshold, `held_out_cases`."""
    rows = []
    for threshold in thresholds:
        scores = []
        for _, probs, brain, ref in cases:
            got = masks_to_regions(probs_to_case_masks(probs, brain, keep_fraction, threshold=threshold)) > 0.5
            scores.append([dice(got[..., k], ref[..., k]) for k in range(len(REGIONS))])
        scores = np.array(scores)
        rows.append({"threshold": threshold, "min_dice_WT": float(scores[:, 0].min()),
                     **{f"dice_{r}": float(scores[:, k].mean()) for k, r in enumerate(REGIONS)}})
    return rows


def missed_rows(cases, voxel_ml: float = 1e-3) -> list[dict]:
    """Per case: reference and network whole tumour (mL at 0.5), the missed whole tumour and
    the shares of it with probability below 0.3 and 0.1 (`voxel_ml`: the 1 mm grid's 0.001)."""
    rows = []
    for name, probs, brain, ref in cases:
        p = probs[..., 0] * brain
        missed = ref[..., 0] & (p < 0.5)
        rows.append({"case": name, "reference_ml": float(ref[..., 0].sum()) * voxel_ml,
                     "network_ml": float((p >= 0.5).sum()) * voxel_ml, "missed_ml": float(missed.sum()) * voxel_ml,
                     "missed_below_0.3": float((p[missed] < 0.3).mean()) if missed.any() else 0.0,
                     "missed_below_0.1": float((p[missed] < 0.1).mean()) if missed.any() else 0.0})
    return rows


def grid_round_trip(regions: np.ndarray, spacing, work_spacing: float) -> dict[str, np.ndarray]:
    """Boolean region masks (X, Y, Z, K) taken to the working grid (`resample_to_shape`,
    as `prepare_case`) and back (trilinear, thresholded at 0.5, as inference): "hard" from the
    working-grid masks (shares >= 0.5), "soft" from the shares themselves."""
    shape = regions.shape[:3]
    share = resample_to_shape(regions.astype(np.float32), working_shape(shape, spacing, work_spacing))
    back = lambda a: resample_to_shape(a, shape) >= 0.5
    return {"hard": back((share >= 0.5).astype(np.float32)), "soft": back(share)}


def resolution_ceiling_rows(root, work_spacing: float = 2.0) -> list[dict]:
    """Per labelled case under `root`: Dice per region of `grid_round_trip` (hard and soft
    targets) against the reference on the case's grid: what a network that reproduced its
    working-grid targets exactly would score."""
    rows = []
    for case in find_labelled_cases(root):
        masks, label_image = load_tumour_masks(case.labels, case.convention)
        ref = masks_to_regions(masks) > 0.5
        got = grid_round_trip(ref, label_image.spacing, work_spacing)
        rows.append({"case": case.name, **{f"{kind}_dice_{r}": dice(got[kind][..., k], ref[..., k])
                                           for kind in got for k, r in enumerate(REGIONS)}})
    return rows


def bias_rows(demo_dir, biases=(0.0, 0.1, 0.3), weights=None) -> list[dict]:
    """Dice WT/ET of the shipped network on the demo patient of `demo_dir` (its
    truth/density_true and case/seg) rendered as `DEMO_RENDER` with each bias-field strength."""
    demo_dir = Path(demo_dir)
    seg = load_image(demo_dir / "case" / "seg.nii.gz", kind="label").data
    density = load_image(demo_dir / "truth" / "density_true.nii.gz", kind="probability").data
    tissue = load_tissue(atlas="mni152")
    thresholds = (DEMO_PATIENT["u_fl"], DEMO_PATIENT["u_t1"], DEMO_PATIENT["u_necrosis"])
    rows = []
    for bias in biases:
        t1c, flair = render_case(density, tissue.wm.data, tissue.gm.data, tissue.reference.spacing, seed=0,
                                 thresholds=thresholds, config=dataclasses.replace(DEMO_RENDER, bias=float(bias)))
        masks, _ = segment_arrays(t1c, flair, tissue.reference.spacing, weights=weights)
        ml = tissue.reference.voxel_volume_ml
        rows.append({"bias": float(bias), "dice_WT": dice(masks.whole, seg > 0),
                     "dice_ET": dice(masks.enhancing, seg == 4),
                     "network_wt_ml": float(masks.whole.sum()) * ml, "reference_wt_ml": float((seg > 0).sum()) * ml})
    return rows
