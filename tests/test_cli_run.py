"""`rtjax run` / `rtjax cohort` / `rtjax fit` as a new user meets them: every bad option,
input or output folder is refused with one line per problem naming the option or file,
exit code 2, no traceback, nothing written, and before any heavy work (the fit, the
segmentation network and the atlas registration are replaced by functions that fail the
test if they are called). Tiny hand-made cases (16^3 voxels, 2 mm), no fit runs here."""

from __future__ import annotations

import errno
import json
import os
import socket
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

import rtjax.pipeline.case
import rtjax.pipeline.inputs
from rtjax.cli import app, expand_multi_values
from rtjax.labels import TumourMasks, combine_labels

SHAPE = (16, 16, 16)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def _labels(convention: str, stray: int | None = None) -> np.ndarray:
    """A cube of enhancing tumour with a necrotic centre inside a shell of edema."""
    core = np.zeros(SHAPE, bool)
    core[6:10, 6:10, 6:10] = True
    necrosis = np.zeros(SHAPE, bool)
    necrosis[7:9, 7:9, 7:9] = True
    edema = np.zeros(SHAPE, bool)
    edema[4:12, 4:12, 4:12] = True
    seg = combine_labels(TumourMasks(necrosis=necrosis, enhancing=core & ~necrosis,
                                     edema=edema & ~core), convention)
    if stray is not None:
        seg[1, 1, 1] = stray
    return seg


def _save(path: Path, data, affine=AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), affine), path)
    return path


@pytest.fixture
def case(tmp_path) -> Path:
    """A case with canonical names (seg, wm, gm, recurrence)."""
    folder = tmp_path / "case"
    tissue = np.zeros(SHAPE, np.float32)
    tissue[1:15, 1:15, 1:15] = 0.5
    _save(folder / "seg.nii.gz", _labels("brats2021"))
    _save(folder / "wm.nii.gz", tissue)
    _save(folder / "gm.nii.gz", tissue)
    rec = np.zeros(SHAPE, np.uint8)
    rec[11, 6:10, 6:10] = 1
    _save(folder / "recurrence.nii.gz", rec)
    return folder


@pytest.fixture
def gliodil_like(tmp_path) -> Path:
    """A case named like GliODIL: segm (gliodil labels, 1 stray voxel of 2), brainMask,
    segm_rec; no tissue maps (so the atlas would be registered)."""
    folder = tmp_path / "gliodil"
    _save(folder / "segm.nii.gz", _labels("gliodil", stray=2))
    brain = np.zeros(SHAPE, np.uint8)
    brain[1:15, 1:15, 1:15] = 1
    _save(folder / "brainMask.nii.gz", brain)
    rec = np.zeros(SHAPE, np.uint8)
    rec[11, 6:10, 6:10] = 1
    _save(folder / "segm_rec.nii.gz", rec)
    return folder


@pytest.fixture(autouse=True)
def no_heavy_work(monkeypatch):
    """Fail the test if a fit, a network segmentation or an atlas registration starts."""

    def forbidden(*args, **kwargs):
        raise AssertionError("heavy work started before the error")

    monkeypatch.setattr(rtjax.pipeline.case, "fit_case", forbidden)
    monkeypatch.setattr(rtjax.pipeline.inputs, "segment_case", forbidden)
    monkeypatch.setattr(rtjax.pipeline.inputs, "case_tissue", forbidden)


def _invoke(args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert not isinstance(result.exception, AssertionError), result.exception
    return result


def _refused(args, *expected: str, out: Path | None = None):
    """The command exits 2 with one `error:` line per expected text (in order), no
    traceback, and writes nothing under `out`."""
    result = _invoke(args)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == len(expected), result.output
    for line, text in zip(errors, expected):
        assert text in line, (text, line)
    if out is not None:
        siblings = [p for p in out.parent.iterdir() if p.name.startswith(out.name)]
        assert siblings == ([out] if out.exists() else []), siblings
    return result


def test_option_errors_are_all_named_one_line_each(case, tmp_path):
    out = tmp_path / "out"
    _refused(["run", case, "--out", out, "--labels", "brats2021", "--margin-mm", "-5",
              "--cutoff", "0.1", "1.2", "--iterations", "0", "--start", "best"],
             "--margin-mm -5.0: the standard CTV margin must be more than 0 and at most 50 mm",
             "--cutoff 1.2:", "--start 'best'", "--iterations 0", out=out)
    _refused(["run", case, "--out", out, "--labels", "brats2021", "--margin-mm", "200"],
             "--margin-mm 200.0", out=out)
    _refused(["run", case, "--out", out, "--labels", "brats21"],
             "--labels 'brats21': unknown label convention; choose one of brats2021", out=out)
    _refused(["run", case, "--out", out], "--labels: no label convention", out=out)
    _refused(["run", case, "--out", out, "--labels", "gliodil", "--ignore-labels", "1"],
             "--ignore-labels 1: label 1 is enhancing in --labels gliodil", out=out)
    _refused(["run", case, "--out", out, "--labels", "brats2021", "--cutoff", "0"],
             "--cutoff 0.0: a density cutoff is a number between 0 and 1", out=out)
    _refused(["run", case, "--out", out, "--labels", "brats2021", "--names", "segm.nii.gz"],
             "--names 'segm.nii.gz': expected ROLE=PATTERN", out=out)
    _refused(["run", case, "--out", out, "--labels", "brats2021", "--names", "segm=x.nii.gz"],
             "--names segm=...: unknown role 'segm'", out=out)
    _refused(["run", case, "--out", out, "--labels", "brats2021", "--series", "t1c"],
             "--series 't1c': expected ROLE=SeriesInstanceUID", out=out)
    config = tmp_path / "run.yaml"
    config.write_text("labels: brats2021\nmargin: 15\n")
    _refused(["run", case, "--out", out, "--config", config], "unknown config key(s) ['margin']",
             out=out)
    _refused(["cohort", case.parent, "--out", out, "--labels", "brats2021", "--shard", "3/2"],
             "--shard '3/2': need 1 <= K <= N", out=out)
    _refused(["cohort", case.parent, "--out", out, "--labels", "brats2021", "--jobs", "2"],
             "--jobs: only 1 is supported", out=out)
    _refused(["fit", case, "--out", out, "--labels", "brats2021", "--iterations", "-3"],
             "--iterations -3", out=out)


def test_input_errors_name_the_file_before_any_heavy_work(case, gliodil_like, tmp_path):
    out = tmp_path / "out"
    _refused(["run", tmp_path / "nowhere", "--out", out, "--labels", "brats2021"],
             "nowhere: case folder not found", out=out)
    _refused(["run", case, "--out", out, "--labels", "brats2021", "--seg", "segm.nii.gz"],
             f"{case / 'segm.nii.gz'}: file given for --seg not found", out=out)
    # Data with its own names: no seg without --seg; the message says how to name it.
    _refused(["run", gliodil_like, "--out", out, "--labels", "gliodil"],
             "no tumour segmentation 'seg'", out=out)
    _refused(["run", gliodil_like, "--out", out, "--labels", "gliodil", "--names", "seg=tumour*"],
             "no file matches --names seg=tumour*", out=out)
    _refused(["run", gliodil_like, "--out", out, "--labels", "gliodil", "--names", "seg=segm*"],
             "--names seg=segm* matches 2 files (segm.nii.gz, segm_rec.nii.gz)", out=out)
    # The label hints are command-line words: the stray voxel of GliODIL ...
    result = _refused(["run", gliodil_like, "--out", out, "--labels", "gliodil", "--seg",
                       "segm.nii.gz", "--brain-mask", "brainMask.nii.gz"],
                      "unexpected label values 2 (1 voxels)", out=out)
    assert "drop them with --ignore-labels 2" in result.output and "ignore_labels=" not in result.output
    # ... and a wrong convention, which no --ignore-labels would fix.
    result = _refused(["run", gliodil_like, "--out", out, "--labels", "brats2021", "--seg",
                       "segm.nii.gz", "--brain-mask", "brainMask.nii.gz"],
                      "unexpected label values 3", out=out)
    assert "the values fit --labels brats2015 or --labels gliodil --ignore-labels 2" in result.output
    assert "do not ignore them" in result.output
    # A file on another grid is found from the headers, before the fit.
    shifted = AFFINE.copy()
    shifted[:3, 3] = 4.0
    _save(case / "recurrence.nii.gz", np.zeros(SHAPE, np.uint8), shifted)
    _refused(["run", case, "--out", out, "--labels", "brats2021"],
             f"{case / 'recurrence.nii.gz'}: affine differs from that of {case / 'seg.nii.gz'}", out=out)
    (case / "recurrence.nii.gz").unlink()
    (case / "gm.nii.gz").unlink()
    _refused(["run", case, "--out", out, "--labels", "brats2021"],
             "no tissue map(s) ['gm']: give both wm and gm", out=out)
    _refused(["run", case, "--out", out, "--labels", "brats2021", "--gm", case / "wm.nii.gz",
              "--rtstruct"], "--rtstruct needs a T1c", out=out)
    _refused(["fit", case, "--out", out, "--labels", "brats2021", "--wm", "white.nii.gz"],
             "file given for --wm not found", out=out)


def test_output_folder_errors(case, tmp_path):
    run = ["run", case, "--labels", "brats2021", "--out"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    for extra in ([], ["--overwrite"]):
        _refused([*run, mine, *extra], "--out exists, is not empty and is not an rtjax case output")
    assert (mine / "notes.txt").read_text() == "keep"
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "done.json").write_text("{}")
    _refused([*run, earlier], "--out holds an earlier rtjax output; pass --overwrite")
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        _refused([*run, read_only], f"{read_only}: --out is not writable (permission denied)")
        _refused([*run, read_only / "case"], f"cannot create --out: no permission to write in {read_only}")
    finally:
        read_only.chmod(0o755)
    assert not any(read_only.iterdir())
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    _refused([*run, a_file], "--out exists and is not a folder")
    _refused([*run, a_file / "out"], "is not a folder")
    # Another live process (here: this one) holds the output's lock.
    locked = tmp_path / "locked"
    (tmp_path / "locked.lock").write_text(json.dumps(
        {"pid": os.getpid(), "host": socket.gethostname(), "started": "2025-01-01T00:00:00+00:00"}))
    _refused([*run, locked], f"another rtjax process (pid {os.getpid()} on {socket.gethostname()}")
    assert not locked.exists() and not (tmp_path / "locked.partial").exists()


def test_cohort_output_folder_errors(case, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    _refused(["cohort", case.parent, "--out", mine, "--labels", "brats2021"],
             "--out exists, is not empty and is not an rtjax cohort output (no cohort.json)")


def test_filesystem_errors_are_one_line_and_leave_nothing(case, tmp_path, monkeypatch):
    """A disk that fills up while the outputs are written: one line, no .partial left."""

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "out.partial" / "x"))

    monkeypatch.setattr(rtjax.pipeline.case, "fresh_partial", full)
    out = tmp_path / "out"
    _refused(["run", case, "--out", out, "--labels", "brats2021"],
             f"{tmp_path / 'out.partial' / 'x'}: No space left on device", out=out)
    assert not (tmp_path / "out.lock").exists()


def test_several_values_after_one_flag():
    assert expand_multi_values(["CASE", "--cutoff", "0.01", "0.1", "--out", "O"]) == [
        "CASE", "--cutoff", "0.01", "--cutoff", "0.1", "--out", "O"]
    assert expand_multi_values(["--series", "t1c=1.2", "flair=1.3", "CASE"]) == [
        "--series", "t1c=1.2", "--series", "flair=1.3", "CASE"]
    assert expand_multi_values(["--names", "seg=segm*", "brain_mask=b*", "--cutoff", "0.1", "CASE"]) == [
        "--names", "seg=segm*", "--names", "brain_mask=b*", "--cutoff", "0.1", "CASE"]
    assert expand_multi_values(["--cutoff", "-0.5", "2", "--", "--cutoff", "3"]) == [
        "--cutoff", "-0.5", "--cutoff", "2", "--", "--cutoff", "3"]


def test_cohort_logs_a_filesystem_error_and_goes_on(case, tmp_path, monkeypatch):
    """A case that hits a filesystem error is one line on the terminal (the traceback goes
    to errors.log), and the next case still runs."""
    import rtjax.pipeline.cohort

    cohort_dir = case.parent
    (cohort_dir / "case2").symlink_to(case, target_is_directory=True)
    ran = []

    def fake_run_case(case_dir, out_dir, **kwargs):
        ran.append(case_dir.name)
        if case_dir.name == "case":
            raise PermissionError(errno.EACCES, "Permission denied", str(out_dir / "density.nii.gz"))
        out_dir.mkdir(parents=True)
        (out_dir / "done.json").write_text(json.dumps({"case": case_dir.name, "quality": "good"}))

    monkeypatch.setattr(rtjax.pipeline.cohort, "run_case", fake_run_case)
    out = tmp_path / "cohort_out"
    result = _invoke(["cohort", cohort_dir, "--out", out, "--labels", "brats2021", "--no-progress"])
    assert result.exit_code == 1 and ran == ["case", "case2"]
    assert "Traceback" not in result.output
    assert f"failed case: {out / 'case' / 'density.nii.gz'}: Permission denied" in result.output
    log = (out / "errors.log").read_text()
    assert "Permission denied" in log and "Traceback" in log
    assert "1 done (1 run now, 0 already done), 1 failed" in result.output


def test_a_cohort_output_of_an_earlier_rtjax_is_resumed(case, tmp_path):
    """An output folder without cohort.json whose finished cases carry no options (an
    earlier rtjax) is resumed as before: its finished cases are skipped."""
    from rtjax.pipeline import run_cohort

    out = tmp_path / "old_out"
    (out / "case").mkdir(parents=True)
    (out / "case" / "done.json").write_text(json.dumps({"case": "case", "status": "done"}))
    (out / "summary.csv").write_text("case,status\ncase,done\n")
    result = run_cohort(case.parent, out, labels="brats2021", progress=False)
    assert result.skipped == ["case"] and result.processed == [] and result.failed == []
    assert json.loads((out / "cohort.json").read_text())["options"]["labels"] == "brats2021"
