"""Whole-case and cohort runs (rtjax.pipeline, `rtjax run`, `rtjax cohort`) on a tiny
synthetic cohort: 28 x 28 x 24 voxels at 2 mm, tumours grown with the FK solver.

The runs start from the inverse network with 15 iterations: that reproduces these clean
synthetic tumours (Dice core ~0.9, edema ~0.97), so the fit-quality gate calls them good,
while a multifocal case of the cohort is called poor. (A heuristic start with 15
iterations does not: Dice 0.00, which the gate rightly calls poor.)"""

import csv
import json
import os
import shutil
import socket
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy.ndimage import binary_dilation, gaussian_filter
from typer.testing import CliRunner

from growth import FKParams, FKSimulator, Grid, visible_masks
from rtjax.cli import app
from rtjax.errors import InputError
from rtjax.labels import TumourMasks, combine_labels
from rtjax.pipeline import (
    OptionsError,
    QualityWarning,
    RunOptions,
    parse_names,
    parse_shard,
    resolve_options,
    run_case,
    run_cohort,
)
from rtjax.rtstruct import case_rois
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
FAST = dict(labels="brats2021", initial="network", fit_iterations=15, margin_mm=15.0)
OUTPUTS = ("segmentation.nii.gz", "density.nii.gz", "ctv_standard.nii.gz", "ctv_model.nii.gz",
           "params.json", "report.png", "report.html", "done.json")


def _anatomy(seed):
    rng = np.random.default_rng(seed)
    idx = np.indices(SHAPE).astype(float)
    centre = (np.array(SHAPE) - 1) / 2
    head = (((idx - centre[:, None, None, None]) / (np.array(SHAPE)[:, None, None, None] / 2 - 1.5)) ** 2).sum(0) <= 1
    wm = np.clip(gaussian_filter(rng.uniform(size=SHAPE), 2) * 4 - 1.2, 0, 1) + 0.3
    wm = np.where(head, np.clip(wm, 0, 1), 0).astype(np.float32)
    gm = np.where(head, 0.9 * (1 - wm), 0).astype(np.float32)
    return wm, gm, head


def _tumour(wm, gm, *origins_mm):
    """Core and edema of tumours grown from each origin (grid mm) and overlaid."""
    sim = FKSimulator.create(wm, gm, GRID, dw_max=DW_T, t_max=1.0)
    density = np.max([np.asarray(sim(FKParams(DW_T, RHO_T), np.asarray(o, float), 1.0))
                      for o in origins_mm], axis=0)
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


def _shell(core):
    return binary_dilation(core, iterations=2) & ~binary_dilation(core, iterations=1)


def _make_cohort(root):
    """Good cases a (RAS, recurrence), b (LPS, recurrence, t1c, a brain_mask that cuts off
    the tissue beside the tumour, so that the density and the recurrence reach outside the
    brain), c (no recurrence); m: a multifocal lesion (two tumours 28 mm apart); broken
    cases: missing gm, seg on another grid, empty tumour."""
    cases = {}
    for name, seed, origins, flip in (("a", 0, [(26.0, 28.0, 22.0)], False),
                                      ("b", 1, [(30.0, 26.0, 24.0)], True),
                                      ("c", 2, [(28.0, 30.0, 22.0)], False),
                                      ("m", 3, [(14.0, 28.0, 22.0), (42.0, 28.0, 22.0)], False)):
        wm, gm, head = _anatomy(seed)
        core, edema = _tumour(wm, gm, *origins)
        arrays = {"seg": _seg(core, edema), "wm": wm, "gm": gm}
        if name in ("a", "b"):
            arrays["recurrence"] = _shell(core).astype(np.uint8)
        if name == "b":
            beyond = np.argwhere(core)[:, 0].max() + 1  # the tissue past the core's +x edge
            brain = head.copy()
            brain[beyond:] = False
            arrays["brain_mask"] = brain.astype(np.uint8)
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


GOOD = ["case_a", "case_b", "case_c", "case_m"]
BROKEN = ["broken_empty", "broken_grid", "broken_missing_gm"]


COHORT = dict(FAST, cutoffs=(0.1, 0.3))
# The recorded options of an isotropic, single-fit run: no DTI, the default anisotropy.
ISOTROPIC_DEFAULTS = {"tensor_frame": None, "anisotropy": [5.0], "tensor_method": "scaled",
                      "dti_atlas": None, "ensemble": False}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    arrays = _make_cohort(root / "in")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_cohort(root / "in", root / "out", progress=False, **COHORT)
    return root, arrays, result, [w for w in caught if issubclass(w.category, QualityWarning)]


def _rows(path):
    with open(path) as handle:
        return {row["case"]: row for row in csv.DictReader(handle)}


def _load(path):
    return np.asarray(nib.load(path).dataobj)


def test_case_outputs_are_on_the_input_grid(cohort):
    root, arrays, _, _ = cohort
    out = root / "out" / "case_b"  # LPS storage, brain_mask, t1c, recurrence
    cutoffs = ("ctv_model_c0.1.nii.gz", "ctv_model_c0.3.nii.gz")
    assert sorted(p.name for p in out.iterdir()) == sorted((*OUTPUTS, *cutoffs, "coverage.json"))
    images = {n: nib.load(out / n) for n in (*OUTPUTS, *cutoffs) if n.endswith(".nii.gz")}
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
    brain = flip(arrays["b"]["brain_mask"]).astype(bool)  # as stored, like the outputs
    standard = data["ctv_standard.nii.gz"].astype(bool)
    model = data["ctv_model.nii.gz"].astype(bool)
    density = data["density.nii.gz"]
    assert np.all(standard[flip(core)]) and not np.any(standard & ~brain)
    assert abs(int(model.sum()) - int(standard.sum())) <= 0.01 * standard.sum()
    params = json.loads((out / "params.json").read_text())
    assert params["ctv"]["standard_volume_ml"] == pytest.approx(standard.sum() * 0.008)
    assert params["ctv"]["model_volume_ml"] == pytest.approx(model.sum() * 0.008)
    # The model CTVs are clipped to the brain, like the standard one: the fitted density
    # reaches past the brain mask here, the CTVs do not.
    cutoff = params["ctv"]["cutoff"]
    assert np.any((density >= cutoff) & ~brain)
    np.testing.assert_array_equal(model, (density >= cutoff) & brain)
    for c in (0.1, 0.3):
        ctv = data[f"ctv_model_c{c:g}.nii.gz"].astype(bool)
        np.testing.assert_array_equal(ctv, (density >= c) & brain)
        entry = next(e for e in params["ctv"]["cutoff_ctvs"] if e["cutoff"] == c)
        assert entry["volume_ml"] == pytest.approx(ctv.sum() * 0.008)
    assert params["options"] == {"labels": "brats2021", "ignore_labels": [], "margin_mm": 15.0,
                                 "start": "network", "iterations": 15, "cutoffs": [0.1, 0.3],
                                 "rtstruct": False, "names": {}, "series": {}, "weights": None,
                                 **ISOTROPIC_DEFAULTS}
    assert params["quality"] == "good" and params["quality_reasons"] == []
    assert params["git_revision"] is not None or "rtjax_version" in params
    # Inputs as absolute paths, whatever the working directory was.
    assert params["inputs"]["seg"] == str((root / "in" / "case_b" / "seg.nii.gz").absolute())
    assert all(Path(v).is_absolute() for v in params["inputs"].values())
    cov = json.loads((out / "coverage.json").read_text())
    recurrence = _load(root / "in" / "case_b" / "recurrence.nii.gz").astype(bool)
    inside = recurrence & brain
    assert (recurrence & ~brain).any() and inside.any()  # it pokes outside the brain
    assert cov["recurrence_outside_brain_ml"] == pytest.approx((recurrence & ~brain).sum() * 0.008)
    assert cov["standard_coverage"] == coverage(inside, standard) == 1.0
    assert cov["model_coverage"] == coverage(inside, model)
    for e in cov["cutoff_ctvs"]:
        assert e["coverage"] == coverage(inside, data[f"ctv_model_c{e['cutoff']:g}.nii.gz"])
    # Counted inside the brain, the whole recurrence is reachable: both 100 % volumes exist.
    assert cov["standard_volume_ml_for_100"] is not None and cov["model_volume_ml_for_100"] is not None
    assert not (root / "out" / "case_b.partial").exists()
    assert not (root / "out" / "case_b.lock").exists()
    assert not (root / "out" / "case_c" / "coverage.json").exists()
    html = (out / "report.html").read_text()
    assert "CTV model, density &gt;= 0.1" in html and "No warnings" not in html  # the recurrence warning
    assert "outside the brain mask" in html


def test_the_quality_gate_flags_the_multifocal_case_only(cohort):
    root, _, result, caught = cohort
    assert [str(w.message).split(":")[0] for w in caught] == ["case_m"]
    assert "multifocal" in str(caught[0].message)
    params = json.loads((root / "out" / "case_m" / "params.json").read_text())
    assert params["quality"] == "poor"
    assert any("multifocal: its core has 2 separate parts" in r for r in params["quality_reasons"])
    assert params["quality_checks"]["core_foci"] == 2 and params["quality_checks"]["core_gap_mm"] > 10
    assert (root / "out" / "case_m" / "ctv_model.nii.gz").is_file()  # outputs still written
    html = (root / "out" / "case_m" / "report.html").read_text()
    assert 'class="badge poor"' in html and "multifocal" in html
    rows = _rows(root / "out" / "summary.csv")
    assert rows["case_m"]["quality"] == "poor" and "multifocal" in rows["case_m"]["quality_reasons"]
    assert all(rows[c]["quality"] == "good" and rows[c]["quality_reasons"] == ""
               for c in ("case_a", "case_b", "case_c"))


def test_run_case_options_inputs_and_the_output_folder(cohort, tmp_path):
    root, _, _, _ = cohort
    with pytest.raises(OptionsError) as bad:
        run_case(root / "in" / "case_a", tmp_path / "o", labels="brats2021", margin_mm=200,
                 cutoffs=(1.5,), fit_iterations=0)
    assert [p.split(" ")[0] for p in bad.value.problems] == ["--margin-mm", "--cutoff", "--iterations"]
    with pytest.raises(InputError, match=r"broken_missing_gm.*give both wm and gm.*gm\.nii\.gz"):
        run_case(root / "in" / "broken_missing_gm", tmp_path / "x", **FAST)
    no_seg = tmp_path / "no_seg"
    _write(no_seg, {"wm": np.ones(SHAPE, np.float32)}, RAS)
    with pytest.raises(InputError, match=r"no_seg.*no tumour segmentation.*t1c and flair to segment"):
        run_case(no_seg, tmp_path / "y", **FAST)
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()
    # An existing folder that is not an rtjax output is never replaced, not even with overwrite.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    for overwrite in (False, True):
        with pytest.raises(InputError, match="not an rtjax case output"):
            run_case(root / "in" / "case_a", tmp_path / "mine", overwrite=overwrite, **FAST)
    # An earlier rtjax output is replaced only with overwrite.
    done = root / "out" / "case_c"
    copy = tmp_path / "earlier"
    shutil.copytree(done, copy)
    with pytest.raises(InputError, match="--overwrite"):
        run_case(root / "in" / "case_c", copy, **FAST)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_cohort_reports_broken_cases_and_finishes_the_others(cohort):
    root, _, result, _ = cohort
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
        assert float(rows[case]["model_c0.1_volume_ml"]) > float(rows[case]["model_c0.3_volume_ml"]) > 0
    assert rows["case_a"]["standard_coverage"] == "1" and rows["case_c"]["standard_coverage"] == ""
    assert rows["case_a"]["model_c0.1_coverage"] != "" and rows["case_c"]["model_c0.1_coverage"] == ""
    for case in ("case_a", "case_b"):  # the recurrence of b pokes outside its brain mask
        assert rows[case]["standard_volume_ml_for_100"] != "" and rows[case]["model_volume_ml_for_100"] != ""
    for case in BROKEN:
        assert rows[case]["status"] == "failed" and rows[case]["error"] == errors[case]
        assert not (out / case).exists() and not (out / f"{case}.partial").exists()
    log = (out / "errors.log").read_text()
    assert all(case in log for case in BROKEN)
    # No float noise: every number is written with at most 12 significant digits, and the
    # volumes are exact multiples of the 0.008 mL voxel.
    for row in rows.values():
        for key, cell in row.items():
            if cell and key not in ("case", "status", "error", "quality", "quality_reasons"):
                assert cell == format(float(cell), ".12g"), (key, cell)
    voxels = json.loads((out / "case_a" / "done.json").read_text())["standard_volume_ml"] / 0.008
    assert rows["case_a"]["standard_volume_ml"] == f"{round(voxels) * 8 / 1000:g}"
    # Two cases with recurrences: the cohort study, both with their 100 % volumes.
    stats = json.loads((out / "statistics.json").read_text())
    assert stats["n"] == 2 and stats["cases"] == ["case_a", "case_b"]
    assert (out / "cohort.png").stat().st_size > 0
    study = list(csv.DictReader(open(out / "coverage.csv")))
    assert all(r["standard_volume_ml_for_100"] and r["model_volume_ml_for_100"] for r in study)


def test_cohort_rerun_skips_done_cases_and_redoes_interrupted_ones(cohort):
    root, _, _, _ = cohort
    out = root / "out"
    before = {case: {p.name: p.stat().st_mtime_ns for p in (out / case).iterdir()}
              for case in ("case_a", "case_b", "case_m")}
    # Simulate an interrupted run of case_c: only a stale .partial with junk is left.
    shutil.rmtree(out / "case_c")
    (out / "case_c.partial").mkdir()
    (out / "case_c.partial" / "density.nii.gz").write_bytes(b"junk")
    (out / "case_c.partial" / "done.json").write_text("{}")
    again = run_cohort(root / "in", out, progress=False, **COHORT)
    assert again.skipped == ["case_a", "case_b", "case_m"] and again.processed == ["case_c"]
    assert sorted(c for c, _ in again.failed) == BROKEN
    for case, mtimes in before.items():
        assert {p.name: p.stat().st_mtime_ns for p in (out / case).iterdir()} == mtimes
    assert not (out / "case_c.partial").exists()
    assert sorted(p.name for p in (out / "case_c").iterdir()) == sorted(
        (*OUTPUTS, "ctv_model_c0.1.nii.gz", "ctv_model_c0.3.nii.gz"))
    nib.load(out / "case_c" / "density.nii.gz").get_fdata()  # a valid image, not the junk
    # Shards 1/2 and 2/2 together visit every case exactly once.
    seen = []
    for shard in ("1/2", "2/2"):
        part = run_cohort(root / "in", out, shard=shard, progress=False, **COHORT)
        seen += part.processed + part.skipped + [c for c, _ in part.failed]
        assert sorted(_rows(out / "summary.csv")) == sorted(GOOD + BROKEN)
    assert sorted(seen) == sorted(GOOD + BROKEN)
    assert sorted(r["case"] for r in part.rows) == sorted(GOOD + BROKEN)
    # A case another process is running (its lock held by a live process) is left to it.
    shutil.rmtree(out / "case_c")
    lock = out / "case_c.lock"
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "now"}))
    busy = run_cohort(root / "in", out, progress=False, **COHORT)
    assert busy.busy == ["case_c"] and "case_c" not in dict(busy.failed)
    assert _rows(out / "summary.csv")["case_c"]["status"] == "pending" and lock.is_file()
    lock.unlink()
    # Other options into the same output are refused (nothing runs) unless overwrite.
    with pytest.raises(InputError, match=r"other options \(cutoffs \[0.1, 0.3\] -> \[\]"):
        run_cohort(root / "in", out, progress=False, **FAST)


def test_options_shards_and_jobs(tmp_path):
    assert parse_shard("2/3") == (2, 3) and parse_shard(None) is None
    for bad in ("0/2", "3/2", "x", "1/0"):
        with pytest.raises(ValueError, match="shard"):
            parse_shard(bad)
    config = tmp_path / "run.yaml"
    config.write_text("labels: gliodil\nmargin-mm: 20\niterations: 30\ncutoff: 0.1\n"
                      "names:\n  seg: segm.nii.gz\n  brain-mask: brainMask*\n")
    options = resolve_options(config, labels=None, margin_mm=10.0, iterations=None,
                              names={"recurrence": "segm_rec.nii.gz"})
    assert options == {"labels": "gliodil", "ignore_labels": [], "margin_mm": 10.0,
                       "start": "network", "iterations": 30, "cutoffs": [0.1], "rtstruct": False,
                       "names": {"seg": "segm.nii.gz", "brain_mask": "brainMask*",
                                 "recurrence": "segm_rec.nii.gz"}, **ISOTROPIC_DEFAULTS}
    config.write_text("labels: gliodil\nmargins: 20\n")
    with pytest.raises(ValueError, match="unknown config key.*margins"):
        resolve_options(config)
    with pytest.raises(ValueError, match="--labels"):
        resolve_options(None)
    with pytest.raises(ValueError, match="one process per shard"):
        run_cohort(tmp_path, tmp_path / "out", jobs=2, **FAST)
    # Every bad value is named, one line each, in the order of the command line.
    with pytest.raises(OptionsError) as bad:
        RunOptions(labels="gliodil", ignore_labels=(1, 2), margin_mm=0, cutoffs=(0.1, 0.1, 1.0),
                   start="best", iterations=2.5, names={"segm": "x", "seg": "/abs/seg.nii.gz"})
    assert bad.value.problems == [
        "--ignore-labels 1: label 1 is enhancing in --labels gliodil, it cannot be ignored",
        "--margin-mm 0: the standard CTV margin must be more than 0 and at most 50 mm",
        "--cutoff 1.0: a density cutoff is a number between 0 and 1 (both excluded), e.g. 0.01 or 0.1",
        "--cutoff: a cutoff is given twice",
        "--start 'best': choose network or heuristic",
        "--iterations 2.5: give a whole number of at least 1",
        "--names segm=...: unknown role 'segm'; roles are t1c, flair, t1, t2, seg, wm, gm, csf, "
        "brain_mask, tensor, fa, peaks, recurrence, edema",
        "--names seg=/abs/seg.nii.gz: a pattern is matched inside each case folder; use a name, "
        "not a path",
    ]
    assert RunOptions(margin_mm=50, cutoffs=(0.3, 0.01)).cutoffs == (0.01, 0.3)
    with pytest.raises(OptionsError, match="at most 4 cutoffs"):
        RunOptions(cutoffs=(0.01, 0.1, 0.2, 0.3, 0.5))
    assert parse_names(["seg=segm.nii.gz", "brain-mask=brainMask*"]) == {
        "seg": "segm.nii.gz", "brain_mask": "brainMask*"}
    with pytest.raises(OptionsError, match="expected ROLE=PATTERN"):
        parse_names(["segm.nii.gz"])


def test_cohort_with_its_own_file_names(cohort, tmp_path):
    """A cohort named like GliODIL (segm, brainMask, segm_rec) runs through a --names mapping,
    and a pattern that matches no file or several is that case's logged error."""
    root, arrays, _, _ = cohort
    cohort_dir = tmp_path / "gliodil_like"
    for case, arr in (("p1", arrays["a"]), ("p2", arrays["c"])):
        _write(cohort_dir / case, {"segm": arr["seg"], "brainMask_v2": (arr["wm"] + arr["gm"] > 0).astype(np.uint8),
                                   "WM": arr["wm"], "GM": arr["gm"]}, RAS)
    nib.save(nib.Nifti1Image(arrays["a"]["recurrence"], RAS), cohort_dir / "p1" / "segm_rec.nii.gz")
    (cohort_dir / "p2" / "brainMask_v3.nii.gz").write_bytes((cohort_dir / "p2" / "brainMask_v2.nii.gz").read_bytes())
    names = {"seg": "segm.nii.gz", "brain_mask": "brainMask*", "recurrence": "segm_rec.nii.gz"}
    result = run_cohort(cohort_dir, tmp_path / "out", progress=False, names=names, **FAST)
    assert result.processed == ["p1"]
    assert dict(result.failed)["p2"].startswith(f"{cohort_dir / 'p2'}: ")
    assert "--names brain_mask=brainMask* matches 2 files" in dict(result.failed)["p2"]
    params = json.loads((tmp_path / "out" / "p1" / "params.json").read_text())
    assert params["inputs"]["seg"] == str(cohort_dir / "p1" / "segm.nii.gz")
    assert params["inputs"]["brain_mask"] == str(cohort_dir / "p1" / "brainMask_v2.nii.gz")
    assert params["options"]["names"] == names and params["coverage"]["standard_coverage"] == 1.0


def test_cli_run_and_cohort(cohort, tmp_path, monkeypatch):
    root, _, _, _ = cohort
    runner = CliRunner()
    monkeypatch.chdir(root / "in")  # relative paths on the command line
    ok = runner.invoke(app, ["run", "case_c", "--out", str(tmp_path / "c"),
                             "--labels", "brats2021", "--iterations", "15", "--margin-mm", "7",
                             "--cutoff", "0.05", "0.2", "--no-progress"])
    assert ok.exit_code == 0, ok.output
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == sorted(
        (*OUTPUTS, "ctv_model_c0.05.nii.gz", "ctv_model_c0.2.nii.gz"))
    params = json.loads((tmp_path / "c" / "params.json").read_text())
    assert params["options"]["margin_mm"] == 7.0 and params["options"]["cutoffs"] == [0.05, 0.2]
    assert params["inputs"]["seg"] == str(root / "in" / "case_c" / "seg.nii.gz")
    assert "fit quality: good" in ok.output and "at density >= 0.05" in ok.output
    again = runner.invoke(app, ["run", "case_c", "--out", str(tmp_path / "c"), "--labels", "brats2021"])
    assert again.exit_code == 2 and "pass --overwrite" in again.output
    bad = runner.invoke(app, ["run", "broken_missing_gm", "--out", str(tmp_path / "x"),
                              "--labels", "brats2021"])
    assert bad.exit_code == 2 and "broken_missing_gm" in bad.output and "gm.nii.gz" in bad.output
    grid = runner.invoke(app, ["run", "broken_grid", "--out", str(tmp_path / "y"),
                               "--labels", "brats2021"])
    assert grid.exit_code == 2 and "broken_grid" in grid.output and "seg.nii.gz" in grid.output
    # The cohort command, options from a YAML config; finished cases are skipped.
    config = tmp_path / "cohort.yaml"
    config.write_text("labels: brats2021\nstart: network\niterations: 15\nmargin_mm: 15\n"
                      "cutoffs: [0.3, 0.1]\n")
    done = runner.invoke(app, ["cohort", ".", "--out", str(root / "out"),
                               "--config", str(config), "--no-progress"])
    assert done.exit_code == 1, done.output  # broken cases -> exit 1, others reported done
    assert "4 done" in done.output and "broken_grid" in done.output
    assert "fit quality poor (see summary.csv, quality_reasons): case_m" in done.output
    assert "summary.csv" in done.output
    config.write_text("labels: brats2021\nshards: 2\n")
    unknown = runner.invoke(app, ["cohort", ".", "--out", str(tmp_path / "z"),
                                  "--config", str(config)])
    assert unknown.exit_code == 2 and "shards" in unknown.output
    shard = runner.invoke(app, ["cohort", ".", "--out", str(tmp_path / "z"),
                                "--labels", "brats2021", "--shard", "3/2"])
    assert shard.exit_code == 2 and "shard" in shard.output
    for result in (again, bad, grid, unknown, shard):
        assert "Traceback" not in result.output


def test_a_separate_edema_in_a_convention_without_edema_labels(cohort, tmp_path):
    """TUM/Lipkova data: the T1c labels (tum: 1 enhancing, 4 necrosis) and the FLAIR edema
    in its own file, here found by a --names pattern; the edema is written as edema.nii.gz
    (the tum label map has no edema label) and read back as the RTSTRUCT's Edema ROI."""
    root, arrays, _, _ = cohort
    c = arrays["c"]
    core, edema = c["seg"] == 4, c["seg"] == 2
    case = tmp_path / "tum_case"
    _write(case, {"tumT1c": combine_labels(TumourMasks(np.zeros_like(core), core, np.zeros_like(core)), "tum"),
                  "tumFLAIR": (edema | core).astype(np.uint8), "WM": c["wm"], "GM": c["gm"]}, RAS)
    out = tmp_path / "out"
    run_case(case, out, labels="tum", names={"seg": "tumT1c*", "edema": "tumFLAIR*"},
             initial="network", fit_iterations=15, progress=False)
    np.testing.assert_array_equal(_load(out / "edema.nii.gz").astype(bool), edema)
    assert set(np.unique(_load(out / "segmentation.nii.gz"))) == {0, 1}
    rois, _, _ = case_rois(out)
    np.testing.assert_array_equal(rois["Edema"], edema)
    np.testing.assert_array_equal(rois["GTV"], core)
