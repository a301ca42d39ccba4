"""The demo, the benchmark table and the CLI surface."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import yaml
from typer.testing import CliRunner

from rtjax.atlas import atlas_tissue_paths
from rtjax.benchmark import benchmark_solver, format_table
from rtjax.cli import app
from rtjax.demo import DEMO_PATIENT, run_demo

REPO = Path(__file__).resolve().parent.parent


def test_demo_writes_every_output_on_the_atlas_grid(tmp_path):
    paths = run_demo(tmp_path / "demo", {"days": 60.0, "rho": 0.06})
    names = sorted(p.name for p in paths)
    assert names == ["density.nii.gz", "params.json", "report.png", "segmentation.nii.gz"]
    atlas = nib.load(atlas_tissue_paths("mni152")["wm"])
    seg = nib.load(tmp_path / "demo" / "segmentation.nii.gz")
    density = nib.load(tmp_path / "demo" / "density.nii.gz")
    for img in (seg, density):
        assert img.shape == atlas.shape
        np.testing.assert_allclose(img.affine, atlas.affine, atol=1e-6)
    assert seg.get_data_dtype() == np.uint8 and density.get_data_dtype() == np.float32
    labels = np.asarray(seg.dataobj)
    assert set(np.unique(labels)) <= {0, 1, 2, 4} and (labels == 4).any() and (labels == 2).any()
    d = np.asarray(density.dataobj)
    np.testing.assert_array_equal(labels == 2, (d >= 0.2) & (d < 0.6))  # edema band
    params = json.loads((tmp_path / "demo" / "params.json").read_text())
    assert params["patient"]["days"] == 60.0 and params["label_convention"] == "brats2021"
    assert params["volumes_ml"]["edema"] == (labels == 2).sum() / 1000.0
    assert not list((tmp_path / "demo").glob(".*"))  # no temporary files left


def test_demo_config_file_matches_the_built_in_patient():
    config = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    assert {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()} == DEMO_PATIENT


def test_benchmark_prints_jax_and_numpy_side_by_side():
    rows = benchmark_solver(jax_steps=4, numpy_steps=1, quick=True)
    assert [r.batch for r in rows] == [1, 4, 1]
    assert all(r.jax_rate > 0 for r in rows)
    assert rows[0].numpy_rate > 0 and rows[2].numpy_rate is None
    table = format_table(rows, "cpu")
    assert "ratio" in table and "vmap 4 params" in table and "anisotropic" in table


def test_cli_lists_its_commands():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("simulate", "benchmark", "demo", "version"):
        assert command in result.output
