"""Forward FK simulation on a case's own tissue maps or on the MNI152 atlas."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from growth import FKParams, FKSimulator, GaussianSeed, Grid, tumour_tensor
from growth.anisotropic import AnisotropicFKSimulator
from rtjax.atlas import atlas_tissue_paths
from rtjax.errors import InputError
from rtjax.io import Image, bounding_box, check_same_grid, find_case_files, load_image, save_image
from rtjax.provenance import run_metadata, write_json_atomic
from rtjax.tensor_io import load_tensor_fa_peaks, load_tensor_fsl, resample_tensor

__all__ = [
    "Tissue",
    "load_tissue",
    "resolve_origin",
    "SimulationResult",
    "ShapeTensor",
    "load_shape_tensor",
    "box_simulator",
    "simulate_density",
    "simulate_to_file",
]


@dataclass(frozen=True)
class Tissue:
    """White- and grey-matter probabilities on one grid (canonical RAS arrays in [0, 1]).

    Attributes:
        wm, gm: the tissue images; CSF voxels already removed (zero tissue).
        sources: where each map came from (path or atlas name), for provenance.
    """

    wm: Image
    gm: Image
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def reference(self) -> Image:
        """The image whose grid the outputs are written on."""
        return self.wm


def load_tissue(
    case_dir: str | Path | None = None,
    *,
    atlas: str | None = None,
    wm: str | Path | None = None,
    gm: str | Path | None = None,
    csf: str | Path | None = None,
) -> Tissue:
    """Load tissue maps from a case folder (its `wm`, `gm`, optional `csf`), an atlas, or
    explicit files (`wm`/`gm`/`csf` override the case's files).

    Where a CSF map is given, voxels whose CSF probability exceeds both WM and GM are
    removed from the growth domain (tissue set to 0).
    """
    if atlas is not None:
        if case_dir is not None or wm is not None or gm is not None:
            raise ValueError("give either an atlas or a case folder / explicit --wm --gm, not both")

        files = {k: Path(v) for k, v in atlas_tissue_paths(atlas).items()}
        sources = {k: f"atlas:{atlas}" for k in files}
    else:
        overrides = {k: v for k, v in (("wm", wm), ("gm", gm), ("csf", csf)) if v is not None}
        if case_dir is not None:
            files = find_case_files(case_dir, overrides=overrides)
        elif {"wm", "gm"} <= overrides.keys():
            files = {k: Path(v) for k, v in overrides.items()}
        else:
            raise ValueError("give a case folder (--tissue), an atlas (--atlas), or both --wm and --gm")
        where = case_dir if case_dir is not None else "the command line"
        for name in ("wm", "gm"):
            if name not in files:
                raise InputError(
                    where, f"no {name} map found (looked for {name}.nii[.gz]; pass --{name} FILE)"
                )
        sources = {k: str(v) for k, v in files.items() if k in ("wm", "gm", "csf")}
    images = {k: load_image(files[k], kind="probability") for k in ("wm", "gm", "csf") if k in files}
    check_same_grid(images)
    wm_img, gm_img = images["wm"], images["gm"]
    if "csf" in images:
        csf_data = images["csf"].data
        csf_wins = (csf_data > wm_img.data) & (csf_data > gm_img.data)
        wm_img = wm_img.with_data(np.where(csf_wins, 0.0, wm_img.data).astype(np.float32))
        gm_img = gm_img.with_data(np.where(csf_wins, 0.0, gm_img.data).astype(np.float32))
    if not np.any(wm_img.data + gm_img.data > 0):
        raise InputError(files["wm"], "tissue maps are empty (wm + gm is zero everywhere)")
    return Tissue(wm=wm_img, gm=gm_img, sources=sources)


def resolve_origin(
    reference: Image, *, origin_mm=None, origin_vox=None
) -> np.ndarray:
    """The seed origin as canonical (RAS) voxel indices, float, shape (3,).

    `origin_mm` is a world (scanner/MNI) coordinate in mm; `origin_vox` is a voxel index
    (i, j, k) of the input file as stored on disk (what a viewer shows). Exactly one.
    """
    if (origin_mm is None) == (origin_vox is None):
        raise ValueError("give exactly one of origin_mm (world mm) or origin_vox (file voxel)")
    if origin_vox is not None:
        ijk = np.append(np.asarray(origin_vox, float), 1.0)
        origin_mm = (reference.original_affine @ ijk)[:3]
    index = np.asarray(reference.world_to_voxel(np.asarray(origin_mm, float)), float)
    if np.any(index < -0.5) or np.any(index > np.asarray(reference.shape) - 0.5):
        raise ValueError(
            f"origin {np.round(np.asarray(origin_mm, float), 2).tolist()} mm lies outside the "
            f"image (canonical voxel {np.round(index, 2).tolist()}, shape {reference.shape})"
        )
    return index


@dataclass(frozen=True)
class SimulationResult:
    """A forward simulation: the density (canonical RAS, float32) and how it was made."""

    density: np.ndarray
    info: dict[str, Any]


@dataclass(frozen=True)
class ShapeTensor:
    """The white-matter growth shape tensor on the tissue grid, and where it came from.

    Attributes:
        components: (6, *grid) in the order xx, xy, xz, yy, yz, zz, canonical voxel
            frame, dimensionless with trace 3 (see `growth.tumour_tensor`).
        info: source files, anisotropy and construction, for provenance.
    """

    components: np.ndarray
    info: dict[str, Any]


def load_shape_tensor(
    tissue: Tissue,
    *,
    tensor: str | Path | None = None,
    fa: str | Path | None = None,
    peaks: str | Path | None = None,
    anisotropy: float = 5.0,
    method: str = "scaled",
) -> ShapeTensor:
    """Read DTI (an FSL dtifit six-volume `tensor`, or `fa` + `peaks`), resample it onto the
    tissue grid through the affines (tensors rotated with the grid, PPD), and build the
    trace-3 tumour shape tensor with the given anisotropy (`growth.tumour_tensor`).

    Voxels outside the DTI field of view get the identity (isotropic growth).
    """

    if (tensor is None) == (fa is None and peaks is None):
        raise ValueError("give either --tensor FILE or both --fa FILE and --peaks FILE")
    if tensor is None and (fa is None or peaks is None):
        raise ValueError("--fa and --peaks go together")
    if not np.isfinite(anisotropy) or anisotropy < 1:
        raise ValueError(f"anisotropy must be >= 1, got {anisotropy}")
    if tensor is not None:
        dti, source = load_tensor_fsl(tensor)
        sources = {"tensor": str(tensor)}
    else:
        dti, source = load_tensor_fa_peaks(fa, peaks)
        sources = {"fa": str(fa), "peaks": str(peaks)}
    dti = resample_tensor(dti, source, tissue.reference)
    shape = np.asarray(tumour_tensor(dti, anisotropy=anisotropy, method=method), np.float32)
    return ShapeTensor(
        components=shape,
        info={**sources, "anisotropy": anisotropy, "method": method},
    )


def box_simulator(tissue: Tissue, *, dw_max: float, t_max: float,
                  shape_tensor: ShapeTensor | None = None, seed=None, progress: bool = False):
    """An FK simulator on the bounding box of the tissue (exact: no density reaches voxels
    without tissue), built for Dw up to `dw_max` (mm^2/day) and times up to `t_max` (days):
    isotropic, or anisotropic along `shape_tensor` (on the tissue grid). `seed`: a
    `growth.GaussianSeed` (default: the simulator's). Building it once and calling it with
    new parameters never recompiles.

    Returns (sim, box): the simulator on the cropped grid and the box's slices.
    """

    wm, gm = tissue.wm.data, tissue.gm.data
    box = bounding_box(wm + gm > 0, pad=1)
    grid = Grid(tuple(s.stop - s.start for s in box), tissue.reference.spacing)
    options = dict(dw_max=dw_max, t_max=t_max, progress=progress,
                   **({} if seed is None else {"seed": seed}))
    if shape_tensor is None:
        return FKSimulator.create(wm[box], gm[box], grid, **options), box
    tensor = shape_tensor.components[(slice(None), *box)]
    return AnisotropicFKSimulator.create(wm[box], gm[box], tensor, grid, **options), box


def simulate_density(
    tissue: Tissue,
    *,
    dw: float,
    rho: float,
    days: float,
    ratio: float = 10.0,
    origin_mm=None,
    origin_vox=None,
    seed=None,
    shape_tensor: ShapeTensor | None = None,
    progress: bool = False,
) -> SimulationResult:
    """Grow a tumour from a Gaussian seed for `days` days on `tissue`.

    The solve runs on the bounding box of the tissue (exact: no density can reach voxels
    without tissue) and is embedded back into the full grid.

    Args:
        dw: white-matter diffusivity, mm^2/day (grey matter gets dw / ratio).
        rho: proliferation rate, 1/day.
        days: simulated time, days.
        origin_mm / origin_vox: the seed centre (see `resolve_origin`).
        seed: a `growth.GaussianSeed` (default sigma 3.2 mm, 0.5 peak, cut at 0.1).
        shape_tensor: anisotropic growth along fibres (`load_shape_tensor`); isotropic
            if None.
    """


    for name, value, low in (("dw", dw, 0.0), ("rho", rho, 0.0), ("days", days, 0.0)):
        if not np.isfinite(value) or value < low:
            raise ValueError(f"{name} must be a finite number >= {low}, got {value}")
    if not np.isfinite(ratio) or ratio < 1:
        raise ValueError(f"ratio = Dw/Dg must be >= 1, got {ratio}")
    ref = tissue.reference
    index = resolve_origin(ref, origin_mm=origin_mm, origin_vox=origin_vox)
    nearest = tuple(int(v) for v in np.clip(np.rint(index), 0, np.asarray(ref.shape) - 1))
    wm, gm = tissue.wm.data, tissue.gm.data
    if wm[nearest] + gm[nearest] <= 0:
        raise ValueError(
            f"the seed origin (canonical voxel {list(nearest)}) lies outside tissue "
            "(wm + gm = 0 there: CSF or background); choose an origin in the brain"
        )
    seed = seed or GaussianSeed()
    sim, box = box_simulator(tissue, dw_max=dw, t_max=days, shape_tensor=shape_tensor,
                             seed=seed, progress=progress)
    corner = np.array([s.start for s in box], float)
    grid = sim.grid
    start = time.perf_counter()
    origin_grid_mm = (index - corner) * np.asarray(grid.spacing)
    cropped = sim(FKParams(dw, rho, ratio), jnp.asarray(origin_grid_mm), days)
    density = np.zeros(ref.shape, np.float32)
    density[box] = np.asarray(cropped, dtype=np.float32)
    seconds = time.perf_counter() - start
    info = {
        "dw_mm2_per_day": dw,
        "dg_mm2_per_day": dw / ratio,
        "rho_per_day": rho,
        "ratio": ratio,
        "days": days,
        "origin_world_mm": np.asarray(ref.voxel_to_world(index), float).round(4).tolist(),
        "origin_canonical_voxel": index.round(4).tolist(),
        "seed": {"sigma_mm": seed.sigma, "amplitude": seed.amplitude, "cutoff": seed.cutoff},
        "time_step_days": sim.dt,
        "steps": int(np.ceil(days / sim.dt)) if days > 0 else 0,
        "grid_shape": list(ref.shape),
        "solved_box": [[s.start, s.stop] for s in box],
        "spacing_mm": list(grid.spacing),
        "tissue": tissue.sources,
        "anisotropic": None if shape_tensor is None else {
            **shape_tensor.info, "stencil_offsets": len(sim.offsets)},
        "seconds": round(seconds, 3),
        "tumour_volume_ml": {
            f"c>={u}": float((density >= u).sum() * grid.voxel_volume / 1000.0)
            for u in (0.001, 0.1, 0.25, 0.6)
        },
    }
    return SimulationResult(density=density, info=info)


def simulate_to_file(out: str | Path, tissue: Tissue, **kwargs) -> tuple[Path, Path]:
    """Run `simulate_density` and write the density on the tissue's grid plus a JSON
    sidecar (parameters, timings, versions); returns both paths."""

    out = Path(out)
    if not (out.name.endswith(".nii") or out.name.endswith(".nii.gz")):
        raise ValueError(f"{out}: the output must end in .nii or .nii.gz")
    result = simulate_density(tissue, **kwargs)
    density_path = save_image(result.density, tissue.reference, out, kind="density")
    stem = out.name[: -len(".nii.gz")] if out.name.endswith(".nii.gz") else out.name[: -len(".nii")]
    sidecar = write_json_atomic(out.with_name(stem + ".json"), {**result.info, **run_metadata()})
    return density_path, sidecar
