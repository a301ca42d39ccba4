"""What every run records next to its outputs: versions, git revision, resolved config."""

from __future__ import annotations

import datetime as _dt
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable

import jax

from rtjax import __version__

__all__ = ["run_metadata", "file_mode", "atomic_write", "write_text_atomic", "write_json_atomic"]


def _git_revision() -> str | None:
    checkout = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(checkout), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def run_metadata() -> dict[str, Any]:
    """Package versions, git revision (None outside a checkout), JAX backend and time."""


    return {
        "rtjax_version": __version__,
        "git_revision": _git_revision(),
        "jax_version": jax.__version__,
        "jax_backend": jax.default_backend(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def file_mode() -> int:
    """The permission bits a plain new file gets here: 0o666 less the process umask
    (0o644 with the usual umask 022), as `open()` would give it."""
    return 0o666 & ~_umask()


def _umask() -> int:
    """The process umask, read without changing it where Linux exposes it (setting and
    restoring it would race with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[str], None], suffix: str = ".tmp") -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path`` (hidden name ending in
    ``suffix``), then rename it over ``path``; the temporary file never survives. The file
    gets the usual permissions (:func:`file_mode`, umask-respecting), not the 0600 of a
    temporary file, so that the rest of a research group can read the outputs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (newlines untranslated, flushed to disk) via :func:`atomic_write`."""

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())

    return atomic_write(path, write)


def write_json_atomic(path: str | Path, data: dict[str, Any]) -> Path:
    """Write `data` as indented JSON via a temporary file and an atomic rename."""
    return write_text_atomic(path, json.dumps(data, indent=2, default=_to_builtin) + "\n")


def _to_builtin(value):
    """JSON fallback for numpy scalars/arrays and paths."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
