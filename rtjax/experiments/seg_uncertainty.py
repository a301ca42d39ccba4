"""Does the segmentation network's uncertainty say when its masks are wrong? Per labelled
case: the network's whole-tumour volume, the reference's, their Dice, the held-out Dice of
the case's cross-validation fold (from the weights' own metrics.json, when it holds one)
and the mean uncertainty inside the network's whole tumour (the quantity the fit-quality
gate `rtjax.pipeline.quality.MAX_SEG_UNCERTAINTY` thresholds), with the Spearman
correlations of uncertainty and Dice. `uncertainty_rows(root)`; `format_uncertainty_table(rows)`.

The shipped members are the cross-validation folds, so each labelled case was in the
training data of all but one member: its Dice is optimistic against the held-out one.
"""

from __future__ import annotations

from pathlib import Path

import json

import numpy as np
from scipy.stats import spearmanr

from rtjax.io import load_image, load_tumour_masks
from rtjax.metrics import dice
from rtjax.pipeline.quality import segmentation_uncertainty
from rtjax.seg.cases import find_labelled_cases
from rtjax.seg.infer import load_weights, segment_arrays

__all__ = ["uncertainty_rows", "format_uncertainty_table"]


def _row(name: str, t1c_path: Path, flair_path: Path, weights, labels=None, convention=None, brain_path=None) -> dict:
    t1c, flair = load_image(t1c_path), load_image(flair_path)
    brain = load_image(brain_path, kind="mask").data if brain_path else None
    masks, unc = segment_arrays(t1c.data, flair.data, t1c.spacing, brain_mask=brain, weights=weights,
                                uncertainty=True)
    ml = t1c.voxel_volume_ml
    row = {"case": name, "network_wt_ml": float(masks.whole.sum()) * ml,
           "mean_uncertainty_in_wt": segmentation_uncertainty(unc, masks.whole),
           "reference_wt_ml": None, "dice_wt": None}
    if labels is not None:
        ref, _ = load_tumour_masks(labels, convention)
        row.update(reference_wt_ml=float(ref.whole.sum()) * ml, dice_wt=dice(masks.whole, ref.whole))
    return row


def uncertainty_rows(root, *, weights=None, unlabelled: dict[str, tuple[Path, Path]] | None = None,
                     progress=print) -> list[dict]:
    """One row per labelled case under `root` (`find_labelled_cases`) and per `unlabelled`
    name -> (T1c, FLAIR) pair: volumes in mL, Dice (labelled only), mean uncertainty."""
    w = load_weights(weights)
    metrics = Path(w.path) / "metrics.json" if w.path else None
    held_out = {r["case"]: r["dice_WT"] for r in json.loads(metrics.read_text()).get("cases", [])} \
        if metrics and metrics.is_file() else {}
    rows = []
    for case in find_labelled_cases(root):
        rows.append({**_row(case.name, case.t1c, case.flair, w, case.labels, case.convention, case.brain_mask),
                     "held_out_dice_wt": held_out.get(case.name)})
        progress(f"{case.name}: Dice WT {rows[-1]['dice_wt']:.3f}, uncertainty {rows[-1]['mean_uncertainty_in_wt']}")
    for name, (t1c, flair) in (unlabelled or {}).items():
        rows.append({**_row(name, Path(t1c), Path(flair), w), "held_out_dice_wt": None})
    return rows


def format_uncertainty_table(rows: list[dict]) -> str:
    """Markdown table of `uncertainty_rows`, then the Spearman correlation over the labelled rows."""
    def num(value, fmt):
        return "" if value is None else format(value, fmt)

    lines = ["| case | network WT (mL) | reference WT (mL) | Dice WT (ensemble) | Dice WT (held-out fold) "
             "| mean uncertainty in WT |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['network_wt_ml']:.1f} | {num(r['reference_wt_ml'], '.1f')} | "
              f"{num(r['dice_wt'], '.3f')} | {num(r.get('held_out_dice_wt'), '.3f')} | "
              f"{num(r['mean_uncertainty_in_wt'], '.3f')} |" for r in rows]
    for key, label in (("dice_wt", "Dice WT (ensemble)"), ("held_out_dice_wt", "Dice WT (held-out fold)")):
        scored = [r for r in rows if r.get(key) is not None and r["mean_uncertainty_in_wt"] is not None]
        if len(scored) >= 3:
            rho, p = spearmanr([r["mean_uncertainty_in_wt"] for r in scored], [r[key] for r in scored])
            lines.append(f"Spearman correlation of uncertainty and {label}: {rho:.2f} (p = {p:.2g}, n = {len(scored)})")
    return "\n".join(lines)
