"""Where the real test data lives (``RTJAX_DATA``, else ``../shared/data``)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["data_root", "DataNotFoundError"]


class DataNotFoundError(FileNotFoundError):
    """The real-data folder could not be located."""


def data_root() -> Path:
    """Return the folder with the real patient, atlas and DTI data.

    Looks at the ``RTJAX_DATA`` environment variable first, then at ``../shared/data``
    relative to the current directory and to the source checkout.
    """
    env = os.environ.get("RTJAX_DATA")
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise DataNotFoundError(f"RTJAX_DATA={env}: not a directory")
        return path
    checkout = Path(__file__).resolve().parent.parent
    for candidate in (Path.cwd() / ".." / "shared" / "data", checkout / ".." / "shared" / "data"):
        if candidate.is_dir():
            return candidate.resolve()
    raise DataNotFoundError(
        "real data not found: set RTJAX_DATA to the data folder (expected ../shared/data)"
    )
