"""Recurrence coverage: exact tiny arrays, monotone curves, exact smallest volumes, the
Wilcoxon test against scipy, cohort tables and figures, and the real GliODIL case."""

import csv
import io
import json
import math

import numpy as np
import pytest
from scipy import stats

from rtjax.ctv import density_family, margin_family, standard_ctv
from rtjax.io import load_image, load_tumour_masks
from rtjax.labels import LabelWarning
from rtjax.study import (
    CaseCoverage,
    CoverageCurve,
    case_coverage,
    cohort_table,
    coverage,
    coverage_curve,
    exact_coverage_curve,
    paired_test,
    plot_cohort,
    plot_coverage_curves,
    smallest_volume_for_coverage,
    write_cohort_csv,
)

# --------------------------------------------------------------------------- coverage


def test_coverage_on_exact_arrays():
    rec = np.zeros((4, 4, 1), bool)
    rec[0, :, 0] = True  # 4 recurrence voxels
    ctv = np.zeros_like(rec)
    ctv[0, :3, 0] = True  # 3 of them inside
    ctv[3, 3, 0] = True  # CTV outside the recurrence does not count
    assert coverage(rec, ctv) == 0.75
    assert coverage(rec, np.ones_like(rec)) == 1.0
    assert coverage(rec, np.zeros_like(rec)) == 0.0
    assert coverage(rec.astype(np.uint8), ctv.astype(np.float32)) == 0.75


def test_coverage_rejects_an_empty_recurrence_and_mismatched_shapes():
    with pytest.raises(ValueError, match="empty recurrence"):
        coverage(np.zeros((3, 3, 3), bool), np.ones((3, 3, 3), bool))
    with pytest.raises(ValueError, match="shape"):
        coverage(np.ones((3, 3, 3), bool), np.ones((3, 3, 2), bool))
    with pytest.raises(ValueError, match="boolean"):
        coverage(np.full((2, 2, 2), 0.5), np.ones((2, 2, 2), bool))


# --------------------------------------------------------------------------- curves


def _line(n):
    return np.zeros((1, 1, n), bool)


def test_smallest_volumes_on_a_constructed_density():
    # 40 voxels of distinct descending density; the recurrence is every other voxel
    # (indices 0, 2, ..., 38: 20 voxels). 95 % = 19 voxels needs the cutoff at index 36
    # (volume 37 voxels); 100 % needs index 38 (39 voxels). Voxel volume 0.5 mL.
    density = np.linspace(1.0, 0.025, 40).reshape(1, 1, 40)
    rec = _line(40)
    rec[..., ::2] = True
    curve = exact_coverage_curve(rec, density_family(density), 0.5)
    assert smallest_volume_for_coverage(curve, 0.95) == 18.5
    assert smallest_volume_for_coverage(curve, 1.0) == 19.5
    assert smallest_volume_for_coverage(curve, 0.5) == 9.5  # 10 voxels: index 18
    assert np.all(np.diff(curve.volumes_ml) > 0) and np.all(np.diff(curve.coverages) > 0)
    assert curve.coverages[-1] == 1.0 and curve.unit == "density"
    # A coarse sweep only bounds the exact answer from above.
    coarse = coverage_curve(rec, density_family(density), [0.5, 0.2, 0.01], 0.5)
    assert smallest_volume_for_coverage(coarse, 0.95) == 20.0  # all 40 voxels, >= 18.5
    assert smallest_volume_for_coverage(coarse, 1.0) == 20.0


def test_smallest_volumes_on_a_constructed_margin_family():
    # Core at index 0 of a line with 2 mm steps; recurrence at 6 mm and 10 mm.
    core, rec = _line(12), _line(12)
    core[..., 0] = True
    rec[..., [3, 5]] = True
    brain = np.ones(core.shape, bool)
    fam = margin_family(core, brain, (1.0, 1.0, 2.0))
    curve = exact_coverage_curve(rec, fam, 0.001)
    np.testing.assert_allclose(curve.parameters, [6.0, 10.0])
    assert smallest_volume_for_coverage(curve, 0.5) == pytest.approx(0.004)  # 4 voxels
    assert smallest_volume_for_coverage(curve, 1.0) == pytest.approx(0.006)  # 6 voxels
    brain[..., 5] = False  # a recurrence voxel outside the brain is never covered
    curve = exact_coverage_curve(rec, margin_family(core, brain, (1.0, 1.0, 2.0)), 0.001)
    assert smallest_volume_for_coverage(curve, 1.0) is None
    assert smallest_volume_for_coverage(curve, 0.5) == pytest.approx(0.004)
    with pytest.raises(ValueError, match="level"):
        smallest_volume_for_coverage(curve, 95)


def test_coverage_curves_are_monotone_and_match_explicit_masks():
    rng = np.random.default_rng(1)
    shape, spacing = (30, 28, 20), (1.0, 1.0, 1.5)
    x, y, z = np.meshgrid(*[np.arange(n) - n / 2 for n in shape], indexing="ij")
    density = np.exp(-(x**2 + y**2 + (1.5 * z) ** 2) / 60.0)
    core = density > 0.8
    brain = np.ones(shape, bool)
    rec = (density > 0.2) & (rng.random(shape) < 0.3) & (x > 0)
    margins = np.linspace(0, 20, 21)
    std = coverage_curve(rec, margin_family(core, brain, spacing), margins, 0.0015)
    assert np.all(np.diff(std.volumes_ml) >= 0) and np.all(np.diff(std.coverages) >= 0)
    explicit = coverage_curve(rec, lambda m: standard_ctv(core, brain, spacing, m), margins, 0.0015)
    np.testing.assert_allclose(std.volumes_ml, explicit.volumes_ml)
    np.testing.assert_allclose(std.coverages, explicit.coverages)
    cutoffs = np.linspace(0.9, 0.05, 18)
    model = coverage_curve(rec, density_family(density), cutoffs, 0.0015)
    assert np.all(np.diff(model.volumes_ml) >= 0) and np.all(np.diff(model.coverages) >= 0)
    assert model.name == "model" and std.name == "standard"
    json.dumps(model.to_dict())


# --------------------------------------------------------------------------- cohort


def _case(name, standard, model, v100=(300.0, 250.0)):
    return CaseCoverage(
        case_id=name, margin_mm=15.0, cutoff=0.1, recurrence_volume_ml=3.0,
        standard_volume_ml=350.0, model_volume_ml=349.0,
        standard_coverage=standard, model_coverage=model,
        standard_volume_ml_for_95=200.0, standard_volume_ml_for_100=v100[0],
        model_volume_ml_for_95=180.0, model_volume_ml_for_100=v100[1],
    )


COHORT = [
    _case(f"c{i}", s, m)
    for i, (s, m) in enumerate(
        [(0.80, 0.91), (0.95, 0.97), (1.00, 1.00), (0.70, 0.88), (0.60, 0.58),
         (0.85, 0.99), (0.90, 0.93), (0.75, 0.86)]
    )
]


def test_paired_test_matches_scipy_wilcoxon():
    model = [c.model_coverage for c in COHORT]
    standard = [c.standard_coverage for c in COHORT]
    expected = stats.wilcoxon(model, standard)
    result = paired_test(COHORT)
    assert result.statistic == pytest.approx(expected.statistic)
    assert result.p_value == pytest.approx(expected.pvalue)
    assert result.n == 8 and result.n_nonzero == 7 and result.note == ""
    assert result.median_difference == pytest.approx(np.median(np.subtract(model, standard)))
    json.dumps(result.to_dict())


def test_paired_test_on_degenerate_cohorts_gives_a_clear_result():
    one = paired_test(COHORT[:1])
    assert one.n == 1 and math.isnan(one.p_value) and "at least 2" in one.note
    none = paired_test([])
    assert none.n == 0 and math.isnan(none.median_difference)
    same = paired_test([_case("a", 0.9, 0.9), _case("b", 1.0, 1.0)])
    assert same.n == 2 and same.n_nonzero == 0 and math.isnan(same.statistic)
    assert "all paired differences are zero" in same.note and same.median_difference == 0.0


def test_cohort_table_round_trips_and_writes_atomically(tmp_path):
    cases = [*COHORT[:2], _case("no100", 0.9, 0.8, v100=(None, None))]
    text = cohort_table(cases)
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["case_id"] for r in rows] == ["c0", "c1", "no100"]
    assert float(rows[0]["model_coverage"]) == 0.91 and rows[2]["model_volume_ml_for_100"] == ""
    path = tmp_path / "out" / "cohort.csv"
    path.parent.mkdir()
    path.write_text("stale")
    assert write_cohort_csv(path, cases) == path
    assert path.read_text() == text
    assert [p.name for p in path.parent.iterdir()] == ["cohort.csv"]  # no temporary left
    assert json.loads(json.dumps(cases[2].to_dict()))["model_volume_ml_for_100"] is None


def test_figures_are_written(tmp_path):
    curve = CoverageCurve("standard", "mm", np.arange(3.0), np.array([1.0, 2.0, 4.0]),
                          np.array([0.2, 0.9, 1.0]))
    out = plot_coverage_curves([curve], tmp_path / "curves.png", points=[("iso", 2.0, 0.9)],
                               title="case")
    assert out.stat().st_size > 1000
    out = plot_cohort(COHORT, tmp_path / "cohort.png", title="cohort")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cohort.png", "curves.png"]


# --------------------------------------------------------------------------- real case


@pytest.fixture(scope="module")
def gliodil(data_dir):
    case = data_dir / "gliodil-patient001"
    with pytest.warns(LabelWarning):
        masks, labels = load_tumour_masks(case / "segm.nii.gz", "gliodil", ignore=(2,))
    images = {
        name: load_image(case / f"{name}.nii.gz", kind="mask")
        for name in ("brainMask", "segm_rec", "recurrencePrediction")
    }
    return masks, labels, images


def test_gliodil_coverage_of_the_standard_and_the_authors_model_ctv(gliodil):
    masks, labels, images = gliodil
    rec = images["segm_rec"].data
    prediction = images["recurrencePrediction"].data
    assert rec.sum() * labels.voxel_volume_ml == pytest.approx(3.0, abs=0.01)
    ours = standard_ctv(masks.core, images["brainMask"].data, labels.spacing, 15.0)
    assert coverage(rec, ours) == pytest.approx(1.0, abs=0.005)  # measured 1.0
    assert coverage(rec, prediction) == pytest.approx(0.992, abs=0.005)  # measured 0.99201
    # Same volume: 350.794 mL (standard) and 350.783 mL (their model CTV).
    assert ours.sum() * labels.voxel_volume_ml == pytest.approx(350.79, abs=0.01)
    assert prediction.sum() * labels.voxel_volume_ml == pytest.approx(350.78, abs=0.01)


def test_gliodil_case_coverage_with_the_binary_model_ctv_as_density(gliodil):
    masks, labels, images = gliodil
    result = case_coverage(
        "gliodil-patient001", images["segm_rec"].data, masks.core, images["brainMask"].data,
        images["recurrencePrediction"].data.astype(np.float32), labels.spacing,
        labels.voxel_volume_ml,
    )
    assert result.cutoff == 1.0  # the binary map's only cutoff; volumes match within 0.01 %
    assert result.standard_coverage == 1.0
    assert result.model_coverage == pytest.approx(0.99201, abs=1e-5)
    assert result.model_volume_ml == pytest.approx(350.783)
    # The margin family reaches 100 % at a smaller margin than 15 mm.
    assert result.standard_volume_ml_for_95 < result.standard_volume_ml_for_100 < 350.794
    assert result.model_volume_ml_for_95 == pytest.approx(350.783)
    assert result.model_volume_ml_for_100 is None  # 24 recurrence voxels have density 0
    json.dumps(result.to_dict())
