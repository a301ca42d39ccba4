"""Figures without a display: headless pyplot and atomic figure files.

matplotlib is imported lazily (it is heavy and only needed when a figure is drawn).
"""

from __future__ import annotations

from pathlib import Path

from rtjax.provenance import atomic_write

__all__ = ["headless_pyplot", "save_figure"]


def headless_pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, *, dpi: int = 110) -> Path:
    """Save a matplotlib figure atomically (format from the suffix, PNG by default) and
    close it."""
    plt = headless_pyplot()
    path = Path(path)
    suffix = path.suffix or ".png"
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format=suffix[1:]), suffix)
    finally:
        plt.close(fig)
