"""The fit-quality gate (rtjax.pipeline.quality) on exact arrays, and the output lock
(rtjax.pipeline.outdir) across two processes."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import numpy as np
import pytest

from growth.fit import FitBounds
from rtjax.pipeline.outdir import OutputLock, OutputLocked, lock_path
from rtjax.pipeline.quality import (
    MIN_DICE,
    assess_quality,
    core_foci,
    parameters_at_bounds,
    segmentation_uncertainty,
)


def _balls(shape, spacing, centres_mm, radius_mm):
    idx = np.indices(shape).astype(float) * np.asarray(spacing, float)[:, None, None, None]
    out = np.zeros(shape, bool)
    for centre in centres_mm:
        out |= ((idx - np.asarray(centre, float)[:, None, None, None]) ** 2).sum(0) <= radius_mm**2
    return out


def test_core_foci_counts_parts_further_apart_than_10_mm():
    spacing = (1.0, 1.0, 2.0)  # anisotropic: distances in mm
    shape = (24, 24, 40)
    # Centres 30 mm apart along z, radius 3 mm: the facing voxel centres (z = 12 and 38 mm
    # on the 2 mm grid) are 26 mm apart.
    two = _balls(shape, spacing, [(12, 12, 10), (12, 12, 40)], 3.0)
    assert core_foci(two, spacing, min_focus_ml=0.05) == {"parts": 2, "foci": 2, "gap_mm": 26.0}
    # 8 mm apart (z = 12 and 20 mm): one seed can make that, one focus.
    near = _balls(shape, spacing, [(12, 12, 10), (12, 12, 22)], 3.0)
    assert core_foci(near, spacing, min_focus_ml=0.05) == {"parts": 2, "foci": 1, "gap_mm": None}
    # A chain 8 mm + 8 mm is one focus even though its ends are 28 mm apart (single linkage).
    chain = _balls(shape, spacing, [(12, 12, 10), (12, 12, 22), (12, 12, 34)], 3.0)
    assert core_foci(chain, spacing, min_focus_ml=0.05, gap_mm=7.0)["foci"] == 3
    assert core_foci(chain, spacing, min_focus_ml=0.05)["foci"] == 1
    # A speck far away is not a focus.
    speck = near.copy()
    speck[12, 12, 38] = True
    assert core_foci(speck, spacing, min_focus_ml=0.05)["foci"] == 1
    assert core_foci(np.zeros(shape, bool), spacing) == {"parts": 0, "foci": 0, "gap_mm": None}


def _info(**final):
    initial = {"origin_grid_mm": [10.0, 10.0, 10.0], "sqrt_dw_t_mm": 4.0, "sqrt_rho_t": 2.0,
               "u_t1": 0.675, "u_fl": 0.25}
    return {"scaled_parameters": {**initial, **final}, "initial_estimate": initial,
            "dice_core": 0.9, "dice_edema": 0.85}


def test_parameters_at_the_bounds_of_the_fit():
    assert parameters_at_bounds(_info(sqrt_dw_t_mm=5.0, u_t1=0.7)) == []
    # FitBounds: sqrt(Dw T) within a factor 4 of its start (box [1, 16] here).
    notes = parameters_at_bounds(_info(sqrt_dw_t_mm=15.9))
    assert notes == ["sqrt(Dw T) = 15.9 ended at the upper bound 16 of the fit"]
    notes = parameters_at_bounds(_info(sqrt_rho_t=0.5, u_fl=0.0502,
                                       origin_grid_mm=[10.0, 25.0, 10.0]))
    assert notes == ["sqrt(rho T) = 0.5 ended at the lower bound 0.5 of the fit",
                     "the FLAIR threshold u_FL = 0.0502 ended at the lower bound 0.05 of the fit",
                     "the seed moved 15.0 mm from its starting point, the most the fit allows (15 mm)"]
    assert parameters_at_bounds(_info(u_fl=0.0502), thresholds_fitted=False) == []
    wide = FitBounds(relative=None)
    assert parameters_at_bounds(_info(sqrt_dw_t_mm=15.9), wide) == []


def test_assess_quality_says_why_in_plain_words():
    core = _balls((20, 20, 20), (1, 1, 1), [(10, 10, 10)], 5.0)
    good = assess_quality(_info(), core, (1, 1, 1))
    assert good["quality"] == "good" and good["reasons"] == []
    assert good["checks"]["core_foci"] == 1 and good["checks"]["min_dice"] == MIN_DICE
    poor = assess_quality({**_info(), "dice_edema": 0.13}, core, (1, 1, 1), seg_uncertainty=0.32)
    assert poor["quality"] == "poor"
    assert poor["reasons"] == [
        "the growth model reproduces the segmented edema poorly (Dice 0.13, below 0.7)",
        "the network segmentation is uncertain (mean uncertainty 0.320 inside the tumour, above "
        "0.25); check segmentation.nii.gz or give a seg"]
    assert assess_quality(_info(), core, (1, 1, 1), seg_uncertainty=0.05)["quality"] == "good"
    unc = np.zeros((20, 20, 20), np.float32)
    unc[core] = 0.3
    assert segmentation_uncertainty(unc, core) == pytest.approx(0.3)
    assert segmentation_uncertainty(unc, np.zeros_like(core)) is None


_HOLDER = """
import sys, time
from rtjax.pipeline.outdir import OutputLock
with OutputLock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_the_lock_keeps_a_second_process_out_and_is_taken_over_when_its_holder_is_gone(tmp_path):
    out = tmp_path / "case"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputLocked, match=f"another rtjax process \\(pid {holder.pid} on "
                                               f"{socket.gethostname()}"):
            OutputLock(out).acquire()
    finally:
        holder.kill()
        holder.wait()
    # Killed without releasing: its lock file stays, but its process is gone.
    assert json.loads(lock_path(out).read_text())["pid"] == holder.pid
    with OutputLock(out) as lock:
        assert json.loads(lock.path.read_text())["pid"] != holder.pid
        with pytest.raises(OutputLocked):
            OutputLock(out).acquire()  # the same process twice is refused too
    assert not lock_path(out).exists()
    # A lock from another machine cannot be checked: it is respected.
    lock_path(out).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "t"}))
    with pytest.raises(OutputLocked, match="pid 1 on elsewhere"):
        OutputLock(out).acquire()
