"""Figures: orthogonal slices of a density with its visible masks."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["save_density_overview"]


def save_density_overview(
    background: np.ndarray,
    density: np.ndarray,
    core: np.ndarray,
    edema: np.ndarray,
    centre: tuple[int, int, int],
    path: str | Path,
    title: str = "",
) -> Path:
    """Axial, coronal and sagittal slices (canonical RAS arrays) through `centre`, with the
    density in colour and core/edema outlines; written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    i, j, k = centre
    views = [
        ("axial", lambda a: a[:, :, k].T),
        ("coronal", lambda a: a[:, j, :].T),
        ("sagittal", lambda a: a[i, :, :].T),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4), constrained_layout=True)
    for ax, (name, cut) in zip(axes, views):
        ax.imshow(cut(background), cmap="gray", origin="lower")
        shown = np.ma.masked_less(cut(density), 1e-3)
        image = ax.imshow(shown, cmap="inferno", vmin=0, vmax=1, origin="lower", alpha=0.8)
        ax.contour(cut(edema.astype(float)), levels=[0.5], colors="cyan", linewidths=0.8)
        ax.contour(cut(core.astype(float)), levels=[0.5], colors="lime", linewidths=0.8)
        ax.set_title(name)
        ax.axis("off")
    fig.colorbar(image, ax=axes, shrink=0.8, label="tumour cell density")
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
    return path
