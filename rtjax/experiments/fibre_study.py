"""Does a tumour seeded in a major tract elongate along the fibres?

On the whole-brain DTI of `dti/tractseg` (FA + fibre peaks, 2.5 mm, FSL-MNI space), with
the MNI152 WM/GM maps resampled onto that grid (inside its brain mask), a tumour is
grown isotropically and anisotropically from seeds in the corpus callosum and the
corticospinal tract. The spread is measured by the density-weighted second moments:
the standard deviation along the local fibre direction at the seed versus the mean of
the two perpendicular ones. Isotropic growth gives a ratio near 1 (up to the tissue's
shape); growth along fibres gives a ratio well above 1.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from growth import eigh_field
from rtjax.atlas import load_atlas
from rtjax.io import load_image, resample_image
from rtjax.plotting import headless_pyplot, save_figure
from rtjax.provenance import run_metadata, write_json_atomic
from rtjax.simulate import Tissue, load_shape_tensor, simulate_density

__all__ = ["TRACT_SEEDS", "FibreRun", "find_tract_seed", "spread_along_fibre", "run_fibre_study"]

#: Where to look for each tract's seed: world boxes (mm, FSL-MNI) and the dominant axis
#: of its fibres (0 = left-right, 2 = superior-inferior).
TRACT_SEEDS = {
    "corpus callosum": {"box": ((-3, 3), (-20, 20), (17.5, 27.5)), "axis": 0},
    "corticospinal tract": {"box": ((-30, -15), (-25, 0), (0, 15)), "axis": 2},
}


@dataclass(frozen=True)
class FibreRun:
    """One seed: the spread along/across the fibre for the isotropic and anisotropic runs."""

    tract: str
    seed_world_mm: tuple[float, float, float]
    fibre_direction: tuple[float, float, float]
    ratio_isotropic: float
    ratio_anisotropic: float
    volume_ml_isotropic: float
    volume_ml_anisotropic: float
    stencil_offsets: int


def find_tract_seed(fa_image, peaks_t6, tract: str) -> np.ndarray:
    """The canonical voxel of highest FA inside the tract's box whose principal direction
    lies along the tract's axis (|component| > 0.8)."""

    spec = TRACT_SEEDS[tract]
    index = np.indices(fa_image.shape).reshape(3, -1).T
    world = fa_image.voxel_to_world(index)
    inside = np.ones(len(index), bool)
    for k, (lo, hi) in enumerate(spec["box"]):
        inside &= (world[:, k] >= lo) & (world[:, k] <= hi)
    _, vectors = eigh_field(peaks_t6)
    principal = np.asarray(vectors)[..., :, 0].reshape(-1, 3)
    frame = _world_frame(fa_image)
    along = np.abs(principal @ frame.T)[:, spec["axis"]] > 0.8
    candidates = np.nonzero(inside & along)[0]
    if not len(candidates):
        raise ValueError(f"no {tract} voxel found in {spec['box']} mm")
    best = candidates[np.argmax(fa_image.data.reshape(-1)[candidates])]
    return index[best].astype(float)


def _world_frame(image) -> np.ndarray:
    """Rotation from the canonical voxel frame to world axes."""
    m = image.affine[:3, :3]
    return m / np.linalg.norm(m, axis=0)


def spread_along_fibre(density: np.ndarray, spacing, direction: np.ndarray) -> float:
    """sqrt(var along `direction` / mean var across it), density-weighted, in mm."""
    coords = np.indices(density.shape).reshape(3, -1).T * np.asarray(spacing)
    w = density.reshape(-1).astype(np.float64)
    mean = (coords * w[:, None]).sum(0) / w.sum()
    centred = coords - mean
    cov = np.einsum("na,nb,n->ab", centred, centred, w) / w.sum()
    v = direction / np.linalg.norm(direction)
    across = np.linalg.svd(np.eye(3) - np.outer(v, v))[0][:, :2]
    var_along = v @ cov @ v
    var_across = np.mean([u @ cov @ u for u in across.T])
    return float(np.sqrt(var_along / var_across))


def run_fibre_study(
    data_root: str | Path,
    out_dir: str | Path | None = None,
    *,
    dw: float = 0.2,
    rho: float = 0.05,
    days: float = 150.0,
    anisotropy: float = 5.0,
    tracts=tuple(TRACT_SEEDS),
) -> list[FibreRun]:
    """Run the isotropic/anisotropic comparison; with `out_dir`, write a figure and a JSON."""

    folder = Path(data_root) / "dti" / "tractseg"
    fa_path, peaks_path = folder / "FA.nii.gz", folder / "peaks.nii.gz"
    fa = load_image(fa_path, kind="intensity")
    brain = load_image(folder / "nodif_brain_mask.nii.gz", kind="mask").data
    atlas = load_atlas("mni152")
    maps = {}
    for name in ("wm", "gm"):
        on_grid = resample_image(getattr(atlas, name), fa, order=1)
        maps[name] = fa.with_data(np.clip(on_grid, 0, 1).astype(np.float32) * brain)
    tissue = Tissue(wm=maps["wm"], gm=maps["gm"], sources={"wm": "atlas:mni152", "gm": "atlas:mni152"})
    shape = load_shape_tensor(tissue, fa=fa_path, peaks=peaks_path, anisotropy=anisotropy)
    _, vectors = eigh_field(shape.components)
    principal = np.asarray(vectors)[..., :, 0]
    runs, densities = [], []
    for tract in tracts:
        seed = find_tract_seed(fa, shape.components, tract)
        direction = principal[tuple(seed.astype(int))]
        world_seed = tuple(float(v) for v in fa.voxel_to_world(seed))
        common = dict(dw=dw, rho=rho, days=days, origin_mm=world_seed)
        iso = simulate_density(tissue, **common)
        aniso = simulate_density(tissue, shape_tensor=shape, **common)
        voxel_ml = float(np.prod(fa.spacing)) / 1000
        runs.append(FibreRun(
            tract=tract,
            seed_world_mm=world_seed,
            fibre_direction=tuple(float(v) for v in _world_frame(fa) @ direction),
            ratio_isotropic=spread_along_fibre(iso.density, fa.spacing, direction),
            ratio_anisotropic=spread_along_fibre(aniso.density, fa.spacing, direction),
            volume_ml_isotropic=float((iso.density >= 0.1).sum() * voxel_ml),
            volume_ml_anisotropic=float((aniso.density >= 0.1).sum() * voxel_ml),
            stencil_offsets=int(aniso.info["anisotropic"]["stencil_offsets"]),
        ))
        densities.append((seed, iso.density, aniso.density))
    if out_dir is not None:
        _write_outputs(Path(out_dir), runs, densities, fa.data,
                       dict(dw=dw, rho=rho, days=days, anisotropy=anisotropy))
    return runs


def _write_outputs(out_dir: Path, runs, densities, background, settings) -> None:
    plt = headless_pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "fibre_study.json", {
        "settings": settings, "runs": [dataclasses.asdict(r) for r in runs], **run_metadata()})
    fig, axes = plt.subplots(len(runs), 2, figsize=(8, 4 * len(runs)), squeeze=False)
    for row, (run, (seed, iso, aniso)) in enumerate(zip(runs, densities)):
        k = int(seed[2]) if run.tract == "corpus callosum" else int(seed[0])
        cut = (lambda a: a[:, :, k].T) if run.tract == "corpus callosum" else (lambda a: a[k].T)
        for col, (name, density, ratio) in enumerate(
            (("isotropic", iso, run.ratio_isotropic), ("anisotropic", aniso, run.ratio_anisotropic))
        ):
            ax = axes[row, col]
            ax.imshow(cut(background), cmap="gray", origin="lower")
            ax.contour(cut(density), levels=[0.1, 0.5], colors=["cyan", "yellow"], linewidths=1)
            ax.set_title(f"{run.tract}, {name}: along/across {ratio:.2f}", fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    save_figure(fig, out_dir / "fibre_study.png", dpi=100)
