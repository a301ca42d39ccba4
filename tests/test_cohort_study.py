"""The synthetic cohort study (rtjax.experiments.cohort_study) on a tiny grid: the MNI152 atlas
block-averaged to 8 mm (25 x 30 x 24 voxels), two patients grown along the TractSeg DTI,
fitted by the pipeline with a short heuristic-start refinement."""

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from rtjax.ctv import isovolumetric_cutoff, standard_ctv
from rtjax.experiments.cohort_study import (
    FAMILIES,
    downsample_image,
    relative_coverage,
    run_cohort_study,
)
from rtjax.io import Image
from rtjax.study import CoverageCurve

pytestmark = pytest.mark.slow  # the module's cohort takes ~1.5 min to generate and fit

SHAPE = (25, 30, 24)
CASE_FILES = {"seg", "wm", "gm", "csf", "brain_mask", "recurrence"}
CUTOFFS = [0.01, 0.1]
FAST = {"initial": "heuristic", "fit_iterations": 5, "cutoffs": CUTOFFS}
SETTINGS = dict(seed=3, factor=8, run_options=FAST, progress=False)


@pytest.fixture(scope="module")
def study(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort_study")
    evaluations = run_cohort_study(2, out, data_root=data_dir, **SETTINGS)
    return out, evaluations


def _load(path):
    img = nib.load(path)
    return img, np.asarray(img.dataobj)


def _patient(out, case):
    """The case's arrays (the atlas grid is RAS: stored arrays are canonical) and truth."""
    arrays = {name: _load(out / "cases" / case / f"{name}.nii.gz")[1] for name in CASE_FILES}
    arrays["truth"] = _load(out / "truth" / case / "density_true.nii.gz")[1]
    record = json.loads((out / "truth" / case / "patient.json").read_text())
    return arrays, record["patient"]


def test_case_folders_are_valid_and_the_seg_obeys_the_thresholds(study):
    out, evaluations = study
    assert [e.case for e in evaluations] == ["patient_000", "patient_001"]
    for case in ("patient_000", "patient_001"):
        names = {p.name.removesuffix(".nii.gz") for p in (out / "cases" / case).iterdir()}
        assert names == CASE_FILES
        seg_img, _ = _load(out / "cases" / case / "seg.nii.gz")
        assert seg_img.shape == SHAPE and seg_img.get_data_dtype() == np.uint8
        np.testing.assert_allclose(np.abs(np.diag(seg_img.affine)[:3]), 8.0)
        a, p = _patient(out, case)
        c, seg = a["truth"], a["seg"]
        assert c.dtype == np.float32 and 0 <= c.min() and c.max() <= 1
        assert set(np.unique(seg)) <= {0, 1, 2, 4}
        np.testing.assert_array_equal(seg == 2, (c >= p["u_fl"]) & (c < p["u_t1"]))
        np.testing.assert_array_equal(np.isin(seg, (1, 4)), c >= p["u_t1"])
        np.testing.assert_array_equal(seg == 1, c >= p["u_necrosis"])
        brain = a["brain_mask"] > 0
        assert not (a["wm"] + a["gm"])[~brain].any()  # tissue only inside the brain
        assert not c[~brain].any()  # the tumour grows in tissue only
        assert 0.05 <= p["dw"] <= 0.25 and 0.025 <= p["rho"] <= 0.05


def test_the_recurrence_lies_outside_the_resection_cavity(study):
    out, _ = study
    for case in ("patient_000", "patient_001"):
        a, _ = _patient(out, case)
        recurrence, cavity = a["recurrence"] > 0, np.isin(a["seg"], (1, 4))
        assert recurrence.any() and cavity.any()
        assert not (recurrence & cavity).any()
        assert not (recurrence & (a["brain_mask"] == 0)).any()


def test_oracle_coverage_at_iso_volume_on_exact_arrays(study):
    out, evaluations = study
    for evaluation in evaluations:
        a, _ = _patient(out, evaluation.case)
        core, brain, rec = np.isin(a["seg"], (1, 4)), a["brain_mask"] > 0, a["recurrence"] > 0
        standard = standard_ctv(core, brain, (8.0, 8.0, 8.0), 15.0)
        cutoff, oracle = isovolumetric_cutoff(a["truth"], standard)
        assert evaluation.oracle.cutoff == cutoff
        assert abs(int(oracle.sum()) - int(standard.sum())) <= 0.01 * standard.sum()
        assert evaluation.oracle.model_coverage == (oracle & rec).sum() / rec.sum()
        assert evaluation.model.standard_coverage == (standard & rec).sum() / rec.sum()
        written = _load(out / "results" / evaluation.case / "ctv_standard.nii.gz")[1] > 0
        np.testing.assert_array_equal(written, standard)
        row = evaluation.row()
        assert row["oracle_volume_ml"] == pytest.approx(oracle.sum() * 0.512)  # 8 mm voxels
        # On the nested family, the best coverage within the oracle CTV's volume is its own.
        relative = row["oracle_volume_ml"] / row["standard_volume_ml"]
        best = relative_coverage(evaluation.curves["oracle"], row["standard_volume_ml"], [relative])
        assert best[0] == row["oracle_coverage"]


def test_cutoff_ctvs_on_exact_arrays_and_as_the_pipeline_reports_them(study):
    out, evaluations = study
    for evaluation in evaluations:
        a, _ = _patient(out, evaluation.case)
        brain, rec = a["brain_mask"] > 0, (a["recurrence"] > 0) & (a["brain_mask"] > 0)
        oracle = evaluation.cutoffs["oracle"]
        assert [c for c, _, _ in oracle] == CUTOFFS
        for cutoff, volume, covered in oracle:
            ctv = brain & (a["truth"] >= cutoff)
            assert volume == pytest.approx(ctv.sum() * 0.512)
            assert covered == (ctv & rec).sum() / rec.sum()
        reported = json.loads((out / "results" / evaluation.case / "coverage.json").read_text())["cutoff_ctvs"]
        assert [(e["cutoff"], e["volume_ml"], e["coverage"]) for e in reported] == \
            [(c, pytest.approx(v), pytest.approx(cov)) for c, v, cov in evaluation.cutoffs["model"]]
    with open(out / "cohort_study_cutoffs.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["family"], float(r["cutoff"])) for r in rows] == [(f, c) for f in ("model", "oracle") for c in CUTOFFS]
    assert float(rows[-1]["mean_coverage"]) == pytest.approx(np.mean([e.cutoffs["oracle"][1][2] for e in evaluations]))


def test_tables_have_one_row_per_patient_and_the_rerun_resumes(study, data_dir):
    out, evaluations = study
    with open(out / "cohort_study.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["case"] for r in rows] == ["patient_000", "patient_001"]
    assert float(rows[0]["oracle_coverage"]) == evaluations[0].oracle.model_coverage
    with open(out / "results" / "summary.csv") as handle:
        assert [r["status"] for r in csv.DictReader(handle)] == ["done", "done"]
    with open(out / "cohort_study_summary.csv") as handle:
        assert [r["family"] for r in csv.DictReader(handle)] == list(FAMILIES)
    stats = json.loads((out / "cohort_study_statistics.json").read_text())
    for where in ("equal_volume", "half_volume"):
        assert set(stats[where]) == {"model_vs_standard", "oracle_vs_standard", "oracle_vs_model"}
        assert stats[where]["oracle_vs_model"]["n"] == 2
    oracle_minus_model = [r["oracle_coverage"] - r["model_coverage"] for r in
                          (e.row() for e in evaluations)]
    assert stats["equal_volume"]["oracle_vs_model"]["median_difference"] == pytest.approx(
        np.median(oracle_minus_model))
    assert (out / "cohort_study.png").stat().st_size > 10_000
    seg = out / "cases" / "patient_000" / "seg.nii.gz"
    stamp = seg.stat().st_mtime_ns
    again = run_cohort_study(2, out, data_root=data_dir, **SETTINGS)
    assert seg.stat().st_mtime_ns == stamp  # nothing regenerated, nothing refitted
    assert [e.row() for e in again] == [e.row() for e in evaluations]
    with pytest.raises(ValueError, match="other settings"):
        run_cohort_study(2, out, data_root=data_dir, **{**SETTINGS, "seed": 4})


def test_relative_coverage_reads_the_step_function_of_a_curve():
    curve = CoverageCurve("model", "density", np.array([0.9, 0.5, 0.1]),
                          np.array([1.0, 2.0, 4.0]), np.array([0.2, 0.5, 1.0]))
    got = relative_coverage(curve, 2.0, np.array([0.0, 0.4, 0.5, 1.0, 1.9, 2.0, 3.0]))
    np.testing.assert_array_equal(got, [0.0, 0.0, 0.2, 0.5, 0.5, 1.0, 1.0])


def test_downsample_image_averages_blocks_and_centres_them():
    data = np.arange(4 * 6 * 2, dtype=np.float32).reshape(4, 6, 2)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = [-10.0, 5.0, 2.0]
    coarse = downsample_image(Image.from_array(data, affine), 2)
    assert coarse.shape == (2, 3, 1) and coarse.spacing == (2.0, 2.0, 2.0)
    assert coarse.data[1, 2, 0] == data[2:4, 4:6, 0:2].mean()
    np.testing.assert_allclose(coarse.voxel_to_world(np.array([1.0, 2.0, 0.0])),
                               [-10 + 2.5, 5 + 4.5, 2 + 0.5])


def test_perturbed_tensor_keeps_eigenvalues_and_turns_by_the_asked_angle():
    from rtjax.experiments.cohort_study import perturb_tensor

    shape = (12, 12, 12)
    v = np.array([1.0, 0.0, 0.0])
    d = 0.3 * np.eye(3) + 1.4 * np.outer(v, v)
    t6 = np.broadcast_to(np.array([d[0, 0], d[0, 1], d[0, 2], d[1, 1], d[1, 2], d[2, 2]])[:, None, None, None],
                         (6, *shape)).astype(np.float32)
    out = perturb_tensor(t6, (2.0, 2.0, 2.0), degrees_rms=20.0, smooth_mm=4.0, seed=1)
    m = np.stack([np.stack([out[0], out[1], out[2]], -1), np.stack([out[1], out[3], out[4]], -1),
                  np.stack([out[2], out[4], out[5]], -1)], -2).reshape(-1, 3, 3)
    vals, vecs = np.linalg.eigh(m)
    np.testing.assert_allclose(vals, np.broadcast_to([0.3, 0.3, 1.7], vals.shape), atol=1e-5)
    angles = np.degrees(np.arccos(np.clip(np.abs(vecs[:, :, -1] @ v), 0, 1)))
    # the principal axis turns by at most the rotation angle; its rms over voxels is below
    # the 20 degrees rms of the rotations and far above zero
    assert 5.0 < np.sqrt((angles**2).mean()) <= 20.5


def test_anisotropic_arms_fit_with_the_subject_and_the_perturbed_dti(data_dir, tmp_path):
    out = tmp_path / "arms"
    evaluations = run_cohort_study(1, out, data_root=data_dir, arms=("model", "anisotropic", "mismatch"),
                                   **SETTINGS)
    (evaluation,) = evaluations
    assert evaluation.families == ("standard", "model", "anisotropic", "mismatch", "oracle")
    for arm, name in (("anisotropic", "subject_tensor.nii.gz"), ("mismatch", "perturbed_tensor.nii.gz")):
        params = json.loads((out / f"results_{arm}" / "patient_000" / "params.json").read_text())
        assert params["fit"]["dti"]["tensor"] == str(out / "dti" / name)
        assert 2.0 <= params["fit"]["anisotropic"]["anisotropy"] <= 10.0
    row = evaluation.row()
    assert 0.0 <= row["anisotropic_dice_c0.1"] <= 1.0 and "mismatch_coverage_at_half_volume" in row
    stats = json.loads((out / "cohort_study_statistics.json").read_text())
    assert {"anisotropic_vs_model", "mismatch_vs_anisotropic"} <= set(stats["half_volume"])
    with open(out / "cohort_study_summary.csv") as handle:
        assert [r["family"] for r in csv.DictReader(handle)] == list(evaluation.families)
    # the isotropic arm's case folders hold no DTI, so it stays isotropic
    iso = json.loads((out / "results" / "patient_000" / "params.json").read_text())
    assert iso["fit"]["dti"] == {"tensor_given": False}
