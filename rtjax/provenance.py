"""What every run records next to its outputs: versions, git revision, resolved config."""

from __future__ import annotations

import datetime as _dt
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["run_metadata", "write_json_atomic"]


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
    import jax

    from rtjax import __version__

    return {
        "rtjax_version": __version__,
        "git_revision": _git_revision(),
        "jax_version": jax.__version__,
        "jax_backend": jax.default_backend(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def write_json_atomic(path: str | Path, data: dict[str, Any]) -> Path:
    """Write `data` as indented JSON via a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2, default=_to_builtin)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _to_builtin(value):
    """JSON fallback for numpy scalars/arrays and paths."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
