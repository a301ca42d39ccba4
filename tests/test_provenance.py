"""Outputs get the usual permissions (umask-respecting, 0644 with umask 022), not the 0600
of a temporary file, and atomic writes leave no temporary file behind."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from rtjax.io import Image, save_image
from rtjax.plotting import headless_pyplot, save_figure
from rtjax.provenance import atomic_write, file_mode, write_json_atomic, write_text_atomic


@pytest.fixture(params=[0o022, 0o027, 0o002])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_outputs_follow_the_umask(tmp_path, umask):
    expected = 0o666 & ~umask
    assert file_mode() == expected
    image = Image.from_array(np.zeros((4, 4, 4), np.float32), np.diag([1.0, 1.0, 2.0, 1.0]))
    plt = headless_pyplot()
    paths = [
        write_json_atomic(tmp_path / "params.json", {"a": 1}),
        write_text_atomic(tmp_path / "summary.csv", "a,b\n"),
        save_image(np.ones((4, 4, 4), bool), image, tmp_path / "mask.nii.gz", kind="mask"),
        save_figure(plt.figure(), tmp_path / "report.png"),
    ]
    for path in paths:
        assert _mode(path) == expected, (path.name, oct(_mode(path)))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = write_text_atomic(tmp_path / "done.json", "old")

    def broken(tmp):
        with open(tmp, "w") as handle:
            handle.write("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(target, broken)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["done.json"]
