"""Whole-case and cohort runs (rtjax.pipeline, `rtjax run`, `rtjax cohort`) on a tiny
synthetic cohort: 28 x 28 x 24 voxels at 2 mm, tumours grown with the FK solver."""

import csv
import json

import nibabel as nib
import numpy as np
import pytest
from scipy.ndimage import binary_dilation, gaussian_filter
from typer.testing import CliRunner

from growth import FKParams, FKSimulator, Grid, visible_masks
from rtjax.cli import app
from rtjax.errors import InputError
from rtjax.labels import TumourMasks, combine_labels
from rtjax.pipeline import parse_shard, resolve_options, run_case, run_cohort
from rtjax.study import coverage

SHAPE = (28, 28, 24)
GRID = Grid(SHAPE, (2.0, 2.0, 2.0))
RAS = np.diag([2.0, 2.0, 2.0, 1.0])
RAS[:3, 3] = [-27.0, -30.0, -20.0]
LPS = np.diag([-2.0, -2.0, 2.0, 1.0])  # stored flipped: outputs must come back LPS
LPS[:3, 3] = [27.0, 30.0, -20.0]
DW_T, RHO_T = 12.0, 5.0  # mm^2 and dimensionless: a core of a few mL
# An 8 mm margin: a 15 mm CTV would fill most of this tiny 50 mm head, beyond the reach of a
# small tumour's density (an explicit solver spreads one voxel per step).
FAST = dict(labels="brats2021", initial="heuristic", fit_iterations=15, margin_mm=15.0)
OUTPUTS = ("segmentation.nii.gz", "density.nii.gz", "ctv_standard.nii.gz", "ctv_model.nii.gz",
           "params.json", "report.png", "done.json")


def _anatomy(seed):
    rng = np.random.default_rng(seed)
    idx = np.indices(SHAPE).astype(float)
    centre = (np.array(SHAPE) - 1) / 2
    head = (((idx - centre[:, None, None, None]) / (np.array(SHAPE)[:, None, None, None] / 2 - 1.5)) ** 2).sum(0) <= 1
    wm = np.clip(gaussian_filter(rng.uniform(size=SHAPE), 2) * 4 - 1.2, 0, 1) + 0.3
    wm = np.where(head, np.clip(wm, 0, 1), 0).astype(np.float32)
    gm = np.where(head, 0.9 * (1 - wm), 0).astype(np.float32)
    return wm, gm, head


def _tumour(wm, gm, origin_mm):
    sim = FKSimulator.create(wm, gm, GRID, dw_max=DW_T, t_max=1.0)
    density = np.asarray(sim(FKParams(DW_T, RHO_T), np.asarray(origin_mm, float), 1.0))
    core, edema = (np.asarray(m) for m in visible_masks(density, 0.7, 0.2))
    return core, edema


def _write(folder, arrays, affine, flip=False):
    folder.mkdir(parents=True)
    for name, data in arrays.items():
        data = data[::-1, ::-1, :].copy() if flip else data
        nib.save(nib.Nifti1Image(data, affine), folder / f"{name}.nii.gz")


def _seg(core, edema):
    necrosis = np.zeros_like(core)
    return combine_labels(TumourMasks(necrosis=necrosis, enhancing=core, edema=edema), "brats2021")


def _make_cohort(root):
    """Good cases a (RAS, recurrence), b (LPS, recurrence, brain_mask, t1c), c (no
    recurrence); broken cases: missing gm, seg on another grid, empty tumour."""
    cases = {}
    for name, seed, origin, flip in (("a", 0, (26.0, 28.0, 22.0), False),
                                     ("b", 1, (30.0, 26.0, 24.0), True),
                                     ("c", 2, (28.0, 30.0, 22.0), False)):
        wm, gm, head = _anatomy(seed)
        core, edema = _tumour(wm, gm, origin)
        arrays = {"seg": _seg(core, edema), "wm": wm, "gm": gm}
        if name != "c":
            shell = binary_dilation(core, iterations=2) & ~binary_dilation(core, iterations=1)
            arrays["recurrence"] = shell.astype(np.uint8)
        if name == "b":
            arrays["brain_mask"] = head.astype(np.uint8)
            arrays["t1c"] = (wm * 300 + gm * 200 + 400 * core).astype(np.float32)
        _write(root / f"case_{name}", arrays, LPS if flip else RAS, flip)
        cases[name] = arrays
    a = cases["a"]
    _write(root / "broken_missing_gm", {"seg": a["seg"], "wm": a["wm"]}, RAS)
    _write(root / "broken_grid", {"wm": a["wm"], "gm": a["gm"]}, RAS)
    shifted = RAS.copy()
    shifted[:3, 3] += 5.0
    nib.save(nib.Nifti1Image(a["seg"], shifted), root / "broken_grid" / "seg.nii.gz")
    _write(root / "broken_empty", {"seg": np.zeros(SHAPE, np.uint8), "wm": a["wm"], "gm": a["gm"]}, RAS)
    return cases


GOOD = ["case_a", "case_b", "case_c"]
BROKEN = ["broken_empty", "broken_grid", "broken_missing_gm"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    arrays = _make_cohort(root / "in")
    result = run_cohort(root / "in", root / "out", progress=False, **FAST)
    return root, arrays, result


def _rows(path):
    with open(path) as handle:
        return {row["case"]: row for row in csv.DictReader(handle)}


def test_case_outputs_are_on_the_input_grid(cohort):
    root, arrays, _ = cohort
    out = root / "out" / "case_b"  # LPS storage, brain_mask, t1c, recurrence
    assert sorted(p.name for p in out.iterdir()) == sorted((*OUTPUTS, "coverage.json"))
    images = {n: nib.load(out / n) for n in OUTPUTS if n.endswith(".nii.gz")}
    for name, img in images.items():
        assert img.shape == SHAPE, name
        np.testing.assert_allclose(img.affine, LPS, err_msg=name)
        assert img.header["sform_code"] > 0 and img.header["qform_code"] > 0
        expected = np.float32 if name == "density.nii.gz" else np.uint8
        assert img.get_data_dtype() == expected, name
    data = {n: np.asarray(img.dataobj) for n, img in images.items()}
    flip = lambda a: a[::-1, ::-1, :]  # noqa: E731 - stored LPS -> the RAS arrays we made
    np.testing.assert_array_equal(flip(data["segmentation.nii.gz"]), arrays["b"]["seg"])
    core = flip(data["segmentation.nii.gz"]) == 4
    brain = flip(arrays["b"]["brain_mask"]).astype(bool)
    standard = data["ctv_standard.nii.gz"].astype(bool)
    model = data["ctv_model.nii.gz"].astype(bool)
    assert np.all(standard[flip(core)]) and not np.any(standard & ~flip(brain))
    assert abs(int(model.sum()) - int(standard.sum())) <= 0.01 * standard.sum()
    params = json.loads((out / "params.json").read_text())
    assert params["ctv"]["standard_volume_ml"] == pytest.approx(standard.sum() * 0.008)
    assert params["ctv"]["model_volume_ml"] == pytest.approx(model.sum() * 0.008)
    np.testing.assert_array_equal(model, data["density.nii.gz"] >= params["ctv"]["cutoff"])
    assert params["options"] == {"labels": "brats2021", "ignore_labels": [], "margin_mm": 15.0,
                                 "start": "heuristic", "iterations": 15, "weights": None}
    assert params["git_revision"] is not None or "rtjax_version" in params
    cov = json.loads((out / "coverage.json").read_text())
    recurrence = np.asarray(nib.load(root / "in" / "case_b" / "recurrence.nii.gz").dataobj)
    assert cov["standard_coverage"] == coverage(recurrence, standard)
    assert cov["model_coverage"] == coverage(recurrence, model)
    assert cov["standard_coverage"] == 1.0  # a shell 2 voxels outside the core, margin 8 mm
    assert not (root / "out" / "case_b.partial").exists()
    assert not (root / "out" / "case_c" / "coverage.json").exists()


def test_run_case_network_start_and_missing_stages(cohort, tmp_path):
    root, _, _ = cohort
    summary = run_case(root / "in" / "case_a", tmp_path / "a", labels="brats2021",
                       margin_mm=15.0, fit_iterations=15, progress=False)  # the inverse network's start
    params = json.loads((tmp_path / "a" / "params.json").read_text())
    assert params["fit"]["network"]["weights_version"]
    assert summary["coverage"]["standard_coverage"] == 1.0
    assert summary["model_volume_ml"] == pytest.approx(summary["standard_volume_ml"], rel=0.01)
    with pytest.raises(InputError, match=r"broken_missing_gm.*give both wm and gm.*gm\.nii\.gz"):
        run_case(root / "in" / "broken_missing_gm", tmp_path / "x", **FAST)
    no_seg = tmp_path / "no_seg"
    _write(no_seg, {"wm": np.ones(SHAPE, np.float32)}, RAS)
    with pytest.raises(InputError, match=r"no_seg.*no tumour segmentation.*t1c and flair to segment"):
        run_case(no_seg, tmp_path / "y", **FAST)
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()
    # An existing folder that is not an rtjax output is never replaced.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(InputError, match="not an rtjax case output"):
        run_case(root / "in" / "case_a", tmp_path / "mine", **FAST)


def test_cohort_reports_broken_cases_and_finishes_the_others(cohort):
    root, _, result = cohort
    out = root / "out"
    assert result.processed == GOOD and result.skipped == []
    assert sorted(c for c, _ in result.failed) == BROKEN
    errors = dict(result.failed)
    assert "gm" in errors["broken_missing_gm"] and "give both wm and gm" in errors["broken_missing_gm"]
    assert "affine differs" in errors["broken_grid"]
    assert "empty tumour" in errors["broken_empty"] and "seg.nii.gz" in errors["broken_empty"]
    rows = _rows(out / "summary.csv")
    assert sorted(rows) == sorted(GOOD + BROKEN)
    for case in GOOD:
        assert rows[case]["status"] == "done" and rows[case]["error"] == ""
        assert float(rows[case]["model_volume_ml"]) == pytest.approx(
            float(rows[case]["standard_volume_ml"]), rel=0.01)
        assert float(rows[case]["sqrt_dw_t_mm"]) > 0
    assert rows["case_a"]["standard_coverage"] == "1.0" and rows["case_c"]["standard_coverage"] == ""
    for case in BROKEN:
        assert rows[case]["status"] == "failed" and rows[case]["error"] == errors[case]
        assert not (out / case).exists() and not (out / f"{case}.partial").exists()
    log = (out / "errors.log").read_text()
    assert all(case in log for case in BROKEN)
    # Two cases with recurrences: the cohort study.
    stats = json.loads((out / "statistics.json").read_text())
    assert stats["n"] == 2 and stats["cases"] == ["case_a", "case_b"]
    assert (out / "cohort.png").stat().st_size > 0 and (out / "coverage.csv").is_file()


def test_cohort_rerun_skips_done_cases_and_redoes_interrupted_ones(cohort):
    root, _, _ = cohort
    out = root / "out"
    before = {case: {p.name: p.stat().st_mtime_ns for p in (out / case).iterdir()}
              for case in ("case_a", "case_b")}
    # Simulate an interrupted run of case_c: only a stale .partial with junk is left.
    import shutil

    shutil.rmtree(out / "case_c")
    (out / "case_c.partial").mkdir()
    (out / "case_c.partial" / "density.nii.gz").write_bytes(b"junk")
    (out / "case_c.partial" / "done.json").write_text("{}")
    again = run_cohort(root / "in", out, progress=False, **FAST)
    assert again.skipped == ["case_a", "case_b"] and again.processed == ["case_c"]
    assert sorted(c for c, _ in again.failed) == BROKEN
    for case, mtimes in before.items():
        assert {p.name: p.stat().st_mtime_ns for p in (out / case).iterdir()} == mtimes
    assert not (out / "case_c.partial").exists()
    assert sorted(p.name for p in (out / "case_c").iterdir()) == sorted(OUTPUTS)
    nib.load(out / "case_c" / "density.nii.gz").get_fdata()  # a valid image, not the junk
    # Shards 1/2 and 2/2 together visit every case exactly once.
    seen = []
    for shard in ("1/2", "2/2"):
        part = run_cohort(root / "in", out, shard=shard, progress=False, **FAST)
        seen += part.processed + part.skipped + [c for c, _ in part.failed]
        assert sorted(_rows(out / "summary.csv")) == sorted(GOOD + BROKEN)
    assert sorted(seen) == sorted(GOOD + BROKEN)
    assert sorted(r["case"] for r in part.rows) == sorted(GOOD + BROKEN)


def test_options_shards_and_jobs(tmp_path):
    assert parse_shard("2/3") == (2, 3) and parse_shard(None) is None
    for bad in ("0/2", "3/2", "x", "1/0"):
        with pytest.raises(ValueError, match="shard"):
            parse_shard(bad)
    config = tmp_path / "run.yaml"
    config.write_text("labels: gliodil\nmargin-mm: 20\niterations: 30\n")
    options = resolve_options(config, labels=None, margin_mm=10.0, iterations=None)
    assert options == {"labels": "gliodil", "ignore_labels": [], "margin_mm": 10.0,
                       "start": "network", "iterations": 30}
    config.write_text("labels: gliodil\nmargins: 20\n")
    with pytest.raises(ValueError, match="unknown config key.*margins"):
        resolve_options(config)
    with pytest.raises(ValueError, match="--labels"):
        resolve_options(None)
    with pytest.raises(ValueError, match="one process per shard"):
        run_cohort(tmp_path, tmp_path / "out", jobs=2, **FAST)


def test_cli_run_and_cohort(cohort, tmp_path):
    root, _, _ = cohort
    runner = CliRunner()
    ok = runner.invoke(app, ["run", str(root / "in" / "case_c"), "--out", str(tmp_path / "c"),
                             "--labels", "brats2021", "--start", "heuristic",
                             "--iterations", "15", "--margin-mm", "7", "--no-progress"])
    assert ok.exit_code == 0, ok.output
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == sorted(OUTPUTS)
    assert json.loads((tmp_path / "c" / "params.json").read_text())["options"]["margin_mm"] == 7.0
    bad = runner.invoke(app, ["run", str(root / "in" / "broken_missing_gm"), "--out",
                              str(tmp_path / "x"), "--labels", "brats2021"])
    assert bad.exit_code == 2 and "broken_missing_gm" in bad.output and "gm.nii.gz" in bad.output
    grid = runner.invoke(app, ["run", str(root / "in" / "broken_grid"), "--out",
                               str(tmp_path / "y"), "--labels", "brats2021"])
    assert grid.exit_code == 2 and "broken_grid" in grid.output and "seg.nii.gz" in grid.output
    # The cohort command, options from a YAML config; finished cases are skipped.
    config = tmp_path / "cohort.yaml"
    config.write_text("labels: brats2021\nstart: heuristic\niterations: 15\nmargin_mm: 8\n")
    done = runner.invoke(app, ["cohort", str(root / "in"), "--out", str(root / "out"),
                               "--config", str(config), "--no-progress"])
    assert done.exit_code == 1, done.output  # broken cases -> exit 1, others reported done
    assert "3 done" in done.output and "broken_grid" in done.output
    assert "summary.csv" in done.output
    config.write_text("labels: brats2021\nshards: 2\n")
    unknown = runner.invoke(app, ["cohort", str(root / "in"), "--out", str(tmp_path / "z"),
                                  "--config", str(config)])
    assert unknown.exit_code == 2 and "shards" in unknown.output
    shard = runner.invoke(app, ["cohort", str(root / "in"), "--out", str(tmp_path / "z"),
                                "--labels", "brats2021", "--shard", "3/2"])
    assert shard.exit_code == 2 and "shard" in shard.output
