"""The anisotropic-step benchmark rows (rtjax.experiments.benchmark): both rates, their ratio, the table."""

import math

from rtjax.experiments.benchmark import (
    _smooth_random_tissue,
    _step_row,
    format_step_table,
    smooth_fibre_field,
)


def test_step_rows_measure_iso_and_aniso_side_by_side():
    wm, gm = _smooth_random_tissue((14, 14, 14))
    tensor = smooth_fibre_field((14, 14, 14))
    rows = [_step_row("forward", wm, gm, tensor, (2.0, 2.0, 2.0), steps=3, repeats=1),
            _step_row("value+grad", wm, gm, tensor, (2.0, 2.0, 2.0), steps=3, repeats=1,
                      dense_fraction=math.inf, gradient=True)]
    for row in rows:
        assert row.iso_rate > 0 and row.aniso_rate > 0 and row.iso_cpu_rate > 0
        assert row.ratio == row.iso_rate / row.aniso_rate
        assert row.offsets >= row.dense_rows >= 3
    assert rows[1].dense_rows == 3 and rows[1].sparse_pairs_per_voxel > rows[0].sparse_pairs_per_voxel
    table = format_step_table(rows, "cpu")
    assert "forward" in table and "value+grad" in table and "cpu ratio" in table
