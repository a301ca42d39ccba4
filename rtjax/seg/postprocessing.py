"""The post-processing of a 2.5-D model's probabilities, chosen by held-out Dice.

A `Postprocessing` is one candidate (the `SliceModelConfig` fields of the same names):
whole-tumour components kept (`keep_fraction`), the tumour-core and enhancing thresholds,
the enhancing boundary refined on the case's own T1c (`refine_enhancing`,
`refine_against_edema`) and small enhancing regions made necrosis (`min_enhancing_ml`).
`candidate_grid(train_config)` gives a config's candidate values per field,
`postprocessing_candidates(train_config)` their combinations, `candidate_dice` scores
every candidate on one held-out case, `choose_postprocessing` picks the best by mean Dice,
and `nested_estimate` scores each fold with the choice made on the other folds.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import numpy as np

from rtjax.metrics import dice, hausdorff95
from rtjax.seg.infer import apply_postprocessing, enhancing_voxels, probs_to_case_masks
from rtjax.seg.model import (REGIONS, main_components, masks_to_regions, refine_enhancing, restrict_masks,
                             small_enhancing_to_necrosis)

__all__ = ["Postprocessing", "candidate_grid", "postprocessing_candidates", "postprocessed_regions", "score_regions",
           "candidate_dice", "choose_postprocessing", "nested_estimate"]


class Postprocessing(NamedTuple):
    """One post-processing candidate (the `SliceModelConfig` fields of the same names)."""

    keep_fraction: float
    min_enhancing_ml: float
    refine_enhancing: bool
    core_threshold: float = 0.5
    enhancing_threshold: float = 0.5
    refine_against_edema: bool = False

    @classmethod
    def of(cls, fields) -> Postprocessing:
        """The candidate of the fields of the same names in the mapping `fields` (a
        `cv.json` "postprocessing", a weights config's "model"); absent ones default."""
        return cls(**{name: fields[name] for name in cls._fields if name in fields})

    @property
    def thresholds(self) -> tuple[float, float, float]:
        """Probability thresholds of WT, TC and ET (as `SliceModelConfig.thresholds`)."""
        return (0.5, self.core_threshold, self.enhancing_threshold)

    def label(self) -> str:
        return " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else f'{v:g}'}"
                        for k, v in self._asdict().items())


def candidate_grid(train) -> dict[str, list]:
    """{`Postprocessing` field: its candidate values} of `train` (a `SliceTrainConfig`:
    `keep_fractions`, `min_enhancing_ml`, `refine_enhancing`, `core_thresholds`,
    `enhancing_thresholds`, `refine_against_edema`), in the order of the fields."""
    return {"keep_fraction": [float(v) for v in train.keep_fractions],
            "min_enhancing_ml": [float(v) for v in train.min_enhancing_ml],
            "refine_enhancing": [bool(v) for v in train.refine_enhancing],
            "core_threshold": [float(v) for v in train.core_thresholds],
            "enhancing_threshold": [float(v) for v in train.enhancing_thresholds],
            "refine_against_edema": [bool(v) for v in train.refine_against_edema]}


def postprocessing_candidates(train) -> list[Postprocessing]:
    """Every combination of `candidate_grid(train)`, in order; `refine_against_edema` only
    with `refine_enhancing` (without it, one candidate)."""
    return list(dict.fromkeys(Postprocessing(k, e, r, c, h, a and r)
                              for k, e, r, c, h, a in itertools.product(*candidate_grid(train).values())))


def postprocessed_regions(probs, brain, spacing, t1c_z, pp: Postprocessing) -> np.ndarray:
    """Boolean (X, Y, Z, 3) WT/TC/ET of region probabilities (X, Y, Z, 3) under `pp`
    (`brain`: boolean; `spacing`: mm; `t1c_z`: the brain-z-scored T1c on the same grid)."""
    return masks_to_regions(apply_postprocessing(probs, brain, spacing, t1c_z, pp)) > 0.5


def score_regions(got, ref, spacing, with_hd95: bool = True) -> dict:
    """Dice (and HD95, mm) per region of boolean (X, Y, Z, 3) region masks."""
    row = {}
    for i, region in enumerate(REGIONS):
        row[f"dice_{region}"] = dice(got[..., i], ref[..., i])
        if with_hd95:
            row[f"hd95_{region}"] = hausdorff95(got[..., i], ref[..., i], spacing)
    return row


def candidate_dice(probs, brain, ref, spacing, t1c_z, candidates: list[Postprocessing]) -> dict:
    """{candidate: Dice per region} of one case: what `postprocessed_regions` +
    `score_regions` give for each, with the shared steps done once (the whole tumour and
    its main components do not depend on the TC/ET thresholds, nor the thresholds on the
    refinement)."""
    wanted = set(candidates)
    values = lambda name: list(dict.fromkeys(getattr(c, name) for c in candidates))
    whole = probs_to_case_masks(probs, brain, 0.0).whole
    main = {keep: main_components(whole, keep) if keep > 0 else whole for keep in values("keep_fraction")}
    refine_modes = list(dict.fromkeys((c.refine_enhancing, c.refine_against_edema) for c in candidates))
    out = {}
    for core, enhancing in itertools.product(values("core_threshold"), values("enhancing_threshold")):
        nested = probs_to_case_masks(probs, brain, 0.0, threshold=(0.5, core, enhancing))
        for keep, inside in main.items():
            kept = restrict_masks(nested, inside)
            for refine, against_edema in refine_modes:
                refined = (refine_enhancing(kept, probs[..., 2], t1c_z, threshold=enhancing,
                                            against_edema=against_edema) if refine else kept)
                for et_ml in values("min_enhancing_ml"):
                    candidate = Postprocessing(keep, et_ml, refine, core, enhancing, against_edema)
                    if candidate in wanted:
                        masks = small_enhancing_to_necrosis(refined, enhancing_voxels(et_ml, spacing))
                        out[candidate] = score_regions(masks_to_regions(masks) > 0.5, ref, spacing, False)
    return out


def choose_postprocessing(dice_rows: dict[tuple, list[dict]]) -> tuple:
    """The post-processing candidate (a `Postprocessing` or any key) whose held-out cases
    have the highest mean Dice over WT, TC and ET; ties go to the first candidate."""
    def mean_dice(rows):
        return float(np.mean([[r[f"dice_{region}"] for region in REGIONS] for r in rows]))
    return max(dice_rows, key=lambda k: mean_dice(dice_rows[k]))


def nested_estimate(dice_rows: dict[tuple, list[dict]], folds: list[int]) -> dict[str, float]:
    """Mean held-out Dice per region when each fold's cases are scored with the candidate
    `choose_postprocessing` picks on the other folds' cases (`folds[i]`: the fold of the
    i-th row of every candidate): the choice's optimism removed."""
    scores = []
    for fold in sorted(set(folds)):
        others = {c: [r for r, f in zip(rows, folds) if f != fold] for c, rows in dice_rows.items()}
        chosen = choose_postprocessing(others)
        scores += [r for r, f in zip(dice_rows[chosen], folds) if f == fold]
    return {region: float(np.mean([r[f"dice_{region}"] for r in scores])) for region in REGIONS}
