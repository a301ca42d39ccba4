"""The segmentation probes behind docs/segmentation.md, on exact arrays."""

import numpy as np
import pytest

from rtjax.experiments.seg_probes import (case_postprocessing_row, grid_round_trip, missed_rows, reference_contrast,
                                         subset_dice, threshold_rows)
from rtjax.labels import TumourMasks
from rtjax.metrics import dice
from rtjax.seg.postprocessing import Postprocessing


def _case():
    """A 10 x 10 x 1 case: a 4 x 4 reference tumour; the network gives 0.45 to its first row
    and 0.05 to its second, 0.9 to the rest (and 0.9 to all three regions there)."""
    ref = np.zeros((10, 10, 1, 3), bool)
    ref[3:7, 3:7, 0] = True
    probs = np.where(ref, 0.9, 0.0).astype(np.float32)
    probs[3, 3:7, 0] = 0.45
    probs[4, 3:7, 0] = 0.05
    return "c", probs, np.ones((10, 10, 1), bool), ref


def test_threshold_rows_score_every_region_at_each_threshold():
    rows = threshold_rows([_case()], thresholds=(0.4, 0.5))
    assert [r["threshold"] for r in rows] == [0.4, 0.5]
    assert rows[0]["dice_WT"] == pytest.approx(2 * 12 / (12 + 16))  # 0.45 row kept at 0.4
    assert rows[1]["dice_WT"] == pytest.approx(2 * 8 / (8 + 16))
    assert rows[1]["min_dice_WT"] == rows[1]["dice_WT"]


def test_missed_rows_give_the_share_of_missed_tumour_below_each_probability():
    (row,) = missed_rows([_case()], voxel_ml=1.0)
    assert (row["reference_ml"], row["network_ml"], row["missed_ml"]) == (16.0, 8.0, 8.0)
    assert row["missed_below_0.3"] == 0.5 and row["missed_below_0.1"] == 0.5


def test_subset_dice_scores_the_mean_probabilities_of_each_subset_of_views():
    _, probs, brain, ref = _case()
    other = np.where(ref, 0.9, 0.0).astype(np.float32)
    other[5:7, 3:7, 0] = 0.2  # the second view misses the last two rows, sees the first two
    got = subset_dice({"axial": probs, "coronal": other}, brain, ref,
                      [("axial",), ("coronal",), ("axial", "coronal")])
    assert got[("axial",)][0] == pytest.approx(2 * 8 / (8 + 16))
    assert got[("coronal",)][0] == pytest.approx(2 * 8 / (8 + 16))
    # mean: first row (0.45 + 0.9) / 2, rows 5-6 (0.9 + 0.2) / 2 = 0.55 kept; second row 0.475 dropped
    assert got[("axial", "coronal")] == pytest.approx([2 * 12 / (12 + 16)] * 3)


def test_grid_round_trip_of_a_slab_is_exact_with_soft_targets_and_one_voxel_off_with_hard_ones():
    """A slab x = 4 .. 14 (1 mm voxels) through a 2 mm grid: its shares there are 0.125, 0.875,
    1, 1, 1, 1, 0.5 (working voxels 1-7); back on 1 mm the hard masks (voxels 2-7) give x = 4 .. 15,
    the shares give x = 4 .. 14 exactly."""
    ref = np.zeros((32, 4, 4, 1), bool)
    ref[4:15] = True
    got = grid_round_trip(ref, (1.0, 1.0, 1.0), 2.0)
    np.testing.assert_array_equal(got["soft"], ref)
    expected = np.zeros_like(ref)
    expected[4:16] = True
    np.testing.assert_array_equal(got["hard"], expected)
    assert dice(got["hard"], ref) == pytest.approx(2 * 11 / 23)


def test_reference_contrast_compares_the_reference_et_with_the_healthy_brain():
    z = np.arange(10, dtype=np.float32).reshape(10, 1, 1)
    brain = np.ones((10, 1, 1), bool)
    brain[9] = False
    region = lambda *i: np.isin(np.arange(10), i).reshape(10, 1, 1)
    masks = TumourMasks(necrosis=region(0), enhancing=region(1, 2), edema=region(3))
    assert reference_contrast(z, brain, masks) == {"enhancing_z": 1.5, "healthy_z": 6.0}  # 4 .. 8
    empty = TumourMasks(necrosis=region(), enhancing=region(), edema=region())
    assert np.isnan(reference_contrast(z, brain, empty)["enhancing_z"])


def test_case_postprocessing_row_gives_the_enhancing_volume_and_dice_of_each_candidate():
    """Ten 2 x 1 x 1 mm voxels (0.002 mL): the network gives 0.9 to WT on 0-7, TC on 0-5 and
    ET on 0-2; the reference has ET 0-3, necrosis 4-5, edema 6-7. At the default thresholds
    3 voxels are called enhancing (Dice ET 6/7); at an ET threshold of 0.95 none."""
    x = np.arange(10).reshape(10, 1, 1)
    probs = np.stack([(x < 8), (x < 6), (x < 3)], axis=-1).astype(np.float32) * 0.9
    region = lambda lo, hi: (x >= lo) & (x < hi)
    masks = TumourMasks(necrosis=region(4, 6), enhancing=region(0, 4), edema=region(6, 8))
    default, strict = Postprocessing(0.1, 0.0, False), Postprocessing(0.1, 0.0, False, 0.5, 0.95)
    row = case_postprocessing_row(probs, np.ones(x.shape, bool), masks, (2.0, 1.0, 1.0), np.zeros(x.shape),
                                  [default, strict])
    assert row["reference_et_ml"] == pytest.approx(0.008)
    assert row[default.label()] == pytest.approx({"et_ml": 0.006, "dice_WT": 1.0, "dice_TC": 1.0, "dice_ET": 6 / 7})
    assert row[strict.label()]["et_ml"] == 0.0 and row[strict.label()]["dice_ET"] == 0.0
    # a candidate read back from a cv.json "postprocessing" (other keys ignored, absent fields default)
    assert Postprocessing.of({"keep_fraction": 0.1, "min_enhancing_ml": 0.0, "refine_enhancing": False,
                              "enhancing_threshold": 0.95, "mean_dice": {}}) == strict
    assert strict.thresholds == (0.5, 0.5, 0.95)
