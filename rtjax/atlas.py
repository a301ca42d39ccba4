"""Built-in anatomy: the ICBM152 2009 (MNI152) tissue maps shipped inside nilearn."""

from __future__ import annotations

from pathlib import Path

__all__ = ["ATLASES", "atlas_tissue_paths"]

#: Atlas names accepted by `--atlas`.
ATLASES = ("mni152",)


def atlas_tissue_paths(name: str) -> dict[str, Path]:
    """Paths of an atlas's tissue probability maps: {"wm": ..., "gm": ...}.

    `mni152` is the ICBM152 2009a symmetric template (197x233x189, 1 mm, RAS) that the
    nilearn wheel ships: nothing is downloaded.
    """
    if name != "mni152":
        raise ValueError(f"unknown atlas {name!r}; available: {', '.join(ATLASES)}")
    from nilearn import datasets  # heavy import, only when an atlas is asked for

    paths = {"wm": Path(datasets.WM_MNI152_FILE_PATH), "gm": Path(datasets.GM_MNI152_FILE_PATH)}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"nilearn's MNI152 tissue maps are missing: {missing}")
    return paths
