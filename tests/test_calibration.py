"""The calibration table of the probabilistic CTV on exact arrays."""

import numpy as np

from rtjax.experiments.calibration import reliability


def test_reliability_pools_voxels_by_probability_over_patients():
    p1 = np.array([0.0, 0.5, 0.5, 1.0, 1.0, 1.0])
    t1 = np.array([False, True, False, True, True, False])
    p2 = np.array([0.5, 1.0, 0.0])
    t2 = np.array([True, True, True])
    table = reliability([p1, p2], [t1, t2])
    assert table == [{"probability": 0.5, "voxels": 3, "in_true_ctv": 2 / 3},
                     {"probability": 1.0, "voxels": 4, "in_true_ctv": 3 / 4}]
