"""The demo, the benchmark table and the CLI surface."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from rtjax.atlas import atlas_tissue_paths
from rtjax.cli import app
from rtjax.experiments.benchmark import benchmark_solver, format_table
from rtjax.experiments.demo import DEMO_PATIENT, demo_summary, run_demo
from rtjax.metrics import dice
from rtjax.seg.infer import DEFAULT_WEIGHTS

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_demo_runs_the_pipeline_on_the_synthetic_patient(tmp_path):
    out = tmp_path / "demo"
    patient = {"days": 150.0, "rho": 0.04, "recurrence_days": 60.0}
    paths = run_demo(out, patient, progress=False)
    names = {p.relative_to(out).as_posix() for p in paths}
    assert {"case/seg.nii.gz", "case/recurrence.nii.gz", "truth/density_true.nii.gz",
            "results/density.nii.gz", "results/ctv_standard.nii.gz", "results/ctv_model.nii.gz",
            "results/coverage.json", "results/params.json", "results/report.png"} <= names
    atlas = nib.load(atlas_tissue_paths("mni152")["wm"])
    seg = nib.load(out / "case" / "seg.nii.gz")
    for img in (seg, nib.load(out / "results" / "ctv_standard.nii.gz")):
        assert img.shape == atlas.shape
        np.testing.assert_allclose(img.affine, atlas.affine, atol=1e-6)
    assert seg.get_data_dtype() == np.uint8
    labels = np.asarray(seg.dataobj)
    assert set(np.unique(labels)) <= {0, 1, 2, 4} and (labels == 4).any() and (labels == 2).any()
    truth = np.asarray(nib.load(out / "truth" / "density_true.nii.gz").dataobj)
    np.testing.assert_array_equal(labels == 2, (truth >= 0.2) & (truth < 0.6))  # edema band
    standard = np.asarray(nib.load(out / "results" / "ctv_standard.nii.gz").dataobj) > 0
    model = np.asarray(nib.load(out / "results" / "ctv_model.nii.gz").dataobj) > 0
    assert abs(int(model.sum()) - int(standard.sum())) <= 0.01 * standard.sum()
    recurrence = np.asarray(nib.load(out / "case" / "recurrence.nii.gz").dataobj) > 0
    coverage = json.loads((out / "results" / "coverage.json").read_text())
    assert coverage["standard_coverage"] == (recurrence & standard).sum() / recurrence.sum()
    assert "recurrence coverage" in demo_summary(out)
    # rendered images on the case grid, segmented by the shipped network and scored
    t1c = np.asarray(nib.load(out / "case" / "t1c.nii.gz").dataobj)
    assert t1c.shape == atlas.shape and t1c.min() >= 0 and t1c[labels == 4].mean() > t1c[labels == 0].mean()
    network = json.loads((out / "network_segmentation" / "network.json").read_text())
    found = np.asarray(nib.load(out / "network_segmentation" / "segmentation.nii.gz").dataobj)
    assert network["dice_against_seg"]["WT"] == pytest.approx(dice(found > 0, labels > 0))
    assert network["dice_against_seg"]["WT"] > 0.8  # the shipped network finds the rendered tumour
    shipped = json.loads((DEFAULT_WEIGHTS / "metrics.json").read_text())["mean"]
    assert network["cross_validated_dice_real_cases"] == {r: shipped[f"dice_{r}"] for r in ("WT", "TC", "ET")}
    assert f"cross-validated on real BraTS cases: Dice WT {shipped['dice_WT']:.3f}" in demo_summary(out)
    assert not list(out.rglob(".*"))  # no temporary files left


def test_demo_config_file_matches_the_built_in_patient():
    config = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    assert {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()} == DEMO_PATIENT


@pytest.mark.slow
def test_benchmark_prints_jax_and_numpy_side_by_side():
    rows = benchmark_solver(jax_steps=4, numpy_steps=1, quick=True)
    by_name = {r.case: r for r in rows}
    assert [r.batch for r in rows] == [1, 4, 1, 1]  # CPU: no substep comparison rows
    assert all(r.jax_rate > 0 for r in rows)
    assert by_name["cube 64^3"].numpy_rate > 0
    assert by_name["cube 48^3 (fit working grid)"].numpy_rate > 0
    assert rows[-1].case.startswith("cube 64^3 anisotropic") and rows[-1].numpy_rate is None
    table = format_table(rows, "cpu")
    assert "ratio" in table and "vmap 4 params" in table and "anisotropic" in table


def test_cli_lists_its_commands():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("simulate", "benchmark", "demo", "version"):
        assert command in result.output
