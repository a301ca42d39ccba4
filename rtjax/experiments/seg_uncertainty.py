"""Does the segmentation network's uncertainty say when its masks are wrong? Per labelled
case: the network's whole-tumour volume, the reference's, their Dice, the held-out Dice of
the case's cross-validation fold (from the weights' own metrics.json, when it holds one)
and the mean uncertainty inside the network's whole tumour (the quantity the fit-quality
gate `rtjax.pipeline.quality.MAX_SEG_UNCERTAINTY` thresholds), with the Spearman
correlations of uncertainty and Dice. `uncertainty_rows(root)`; `format_uncertainty_table(rows)`.

The shipped members saw the labelled cases (fold models: all but one; final models: all),
so their Dice there is optimistic. With `held_out_weights` (a run's fold ensemble, e.g.
its `fold_weights/`) each labelled case is also segmented by the models of its own fold
(`SliceWeights.fold_members`: one per view, the size of a final ensemble), which never saw
it: the held-out Dice and uncertainty, the pair the gate's threshold is set from.
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


def _cv_cases(weights) -> list[dict]:
    """The cross-validation rows of a weights folder's metrics.json ([] without one)."""
    metrics = Path(weights.path) / "metrics.json" if weights.path else None
    return json.loads(metrics.read_text()).get("cases", []) if metrics and metrics.is_file() else []


def uncertainty_rows(root, *, weights=None, held_out_weights=None,
                     unlabelled: dict[str, tuple[Path, Path]] | None = None, progress=print) -> list[dict]:
    """One row per labelled case under `root` (`find_labelled_cases`) and per `unlabelled`
    name -> (T1c, FLAIR) pair: volumes in mL, Dice (labelled only), mean uncertainty of
    `weights`, the held-out Dice WT of the weights' metrics.json, and with `held_out_weights`
    (a fold ensemble whose metrics.json gives each case's fold) the held-out Dice and
    uncertainty of the case's fold models (`held_out_dice_wt`, `held_out_uncertainty`)."""
    w = load_weights(weights)
    held_out = {r["case"]: r["dice_WT"] for r in _cv_cases(w)}
    folds_w = load_weights(held_out_weights) if held_out_weights is not None else None
    fold_of_case = {r["case"]: r["fold"] for r in _cv_cases(folds_w)} if folds_w is not None else {}
    rows = []
    for case in find_labelled_cases(root):
        reference = (case.labels, case.convention, case.brain_mask)
        row = {**_row(case.name, case.t1c, case.flair, w, *reference), "held_out_dice_wt": held_out.get(case.name),
               "held_out_uncertainty": None}
        if case.name in fold_of_case:
            own = _row(case.name, case.t1c, case.flair, folds_w.fold_members(fold_of_case[case.name]), *reference)
            row.update(held_out_dice_wt=own["dice_wt"], held_out_uncertainty=own["mean_uncertainty_in_wt"])
        rows.append(row)
        progress(f"{case.name}: Dice WT {row['dice_wt']:.3f}, uncertainty {row['mean_uncertainty_in_wt']}, "
                 f"held out {row['held_out_dice_wt']}, {row['held_out_uncertainty']}")
    for name, (t1c, flair) in (unlabelled or {}).items():
        rows.append({**_row(name, Path(t1c), Path(flair), w), "held_out_dice_wt": None, "held_out_uncertainty": None})
    return rows


def format_uncertainty_table(rows: list[dict]) -> str:
    """Markdown table of `uncertainty_rows`, then the Spearman correlation over the labelled rows."""
    def num(value, fmt):
        return "" if value is None else format(value, fmt)

    lines = ["| case | network WT (mL) | reference WT (mL) | Dice WT (ensemble) | Dice WT (held-out fold) "
             "| mean uncertainty in WT | held-out uncertainty in WT |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['network_wt_ml']:.1f} | {num(r['reference_wt_ml'], '.1f')} | "
              f"{num(r['dice_wt'], '.3f')} | {num(r.get('held_out_dice_wt'), '.3f')} | "
              f"{num(r['mean_uncertainty_in_wt'], '.3f')} | {num(r.get('held_out_uncertainty'), '.3f')} |"
              for r in rows]
    pairs = (("mean_uncertainty_in_wt", "dice_wt", "uncertainty and Dice WT (ensemble)"),
             ("mean_uncertainty_in_wt", "held_out_dice_wt", "uncertainty and Dice WT (held-out fold)"),
             ("held_out_uncertainty", "held_out_dice_wt", "held-out uncertainty and Dice WT (held-out fold)"))
    for unc, key, label in pairs:
        scored = [r for r in rows if r.get(key) is not None and r.get(unc) is not None]
        if len(scored) >= 3:
            rho, p = spearmanr([r[unc] for r in scored], [r[key] for r in scored])
            lines.append(f"Spearman correlation of {label}: {rho:.2f} (p = {p:.2g}, n = {len(scored)})")
    return "\n".join(lines)
