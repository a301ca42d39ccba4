"""Probabilistic CTVs (#13): `rtjax run --ensemble` fits the network's members and shifted
imaging thresholds as starts, keeps those that reproduce the masks almost as well, and
writes the per-voxel CTV probability with the mean and spread of the density."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from rtjax.labels import TumourMasks, combine_labels
from rtjax.pipeline.case import run_case

SHAPE = (24, 24, 24)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def _save(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), AFFINE), path)
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ensemble")
    r = np.linalg.norm(np.indices(SHAPE) - 11.5, axis=0) * 2.0  # mm from the centre
    core, edema = r <= 5.0, r <= 11.0
    seg = combine_labels(TumourMasks(necrosis=np.zeros(SHAPE, bool), enhancing=core,
                                     edema=edema & ~core), "brats2021")
    tissue = np.where(r <= 22.0, 0.5, 0.0).astype(np.float32)
    _save(folder / "case" / "seg.nii.gz", seg)
    _save(folder / "case" / "wm.nii.gz", tissue)
    _save(folder / "case" / "gm.nii.gz", tissue)
    _save(folder / "case" / "recurrence.nii.gz", ((r > 5.0) & (r <= 9.0)).astype(np.uint8))
    out = folder / "out"
    summary = run_case(folder / "case", out, labels="brats2021", ensemble=True, fit_iterations=6,
                       progress=False)
    return out, summary


@pytest.mark.slow
def test_ensemble_outputs_are_member_vote_fractions(run):
    out, summary = run
    params = json.loads((out / "params.json").read_text())
    ens = params["ensemble"]
    members = ens["members"]
    assert members[0]["start"] == "point" and members[0]["accepted"]
    assert [m["start"] for m in members[1:3]] == ["network member 0", "network member 1"]
    assert ens["accepted"] == sum(m["accepted"] for m in members) == len(ens["member_cutoffs"])
    probability = np.asarray(nib.load(out / "ctv_probability.nii.gz").dataobj)
    votes = probability * ens["accepted"]
    np.testing.assert_allclose(votes, np.round(votes), atol=1e-4)  # k / members
    assert probability.min() >= 0 and probability.max() <= 1
    mean = np.asarray(nib.load(out / "density_mean.nii.gz").dataobj)
    sd = np.asarray(nib.load(out / "density_sd.nii.gz").dataobj)
    assert 0 <= mean.min() and mean.max() <= 1 and sd.min() >= 0
    standard = np.asarray(nib.load(out / "ctv_standard.nii.gz").dataobj) > 0
    cov = json.loads((out / "coverage.json").read_text())["probabilistic"]
    # the ranked CTV has exactly the standard CTV's volume
    assert cov["ranked_at_standard_volume"]["volume_ml"] == pytest.approx(standard.sum() * 8e-3)
    assert cov["p>=0.9"]["volume_ml"] <= cov["p>=0.5"]["volume_ml"]
    assert 0 <= cov["p>=0.5"]["coverage"] <= 1
    assert params["options"]["ensemble"] is True
    assert {"ctv_probability.nii.gz", "density_mean.nii.gz", "density_sd.nii.gz"} <= set(summary["outputs"])
