"""Fitting the growth model to one case: masks + tissue -> parameters and density.

The fit runs on a working grid around the tumour: the bounding box of the visible tumour
plus a margin, block-averaged to about `working_spacing_mm`, coarser for large boxes so
that it has at most about `max_working_voxels` per axis (masks become voxel fractions,
which the soft-Dice loss takes as they are). The starting point is the inverse network's
estimate when given, else `growth.fit.heuristic_estimate`; `growth.fit.refine` then
optimises it through the solver. The final density is simulated with the fitted
parameters at the case's own resolution on the same box and embedded in the full grid.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import jax.numpy as jnp
import numpy as np
from scipy.ndimage import distance_transform_edt
from tqdm import tqdm

from growth import Grid, visible_masks
from growth.anisotropic import DENSE_FRACTION
from growth.fit import (
    FitBounds,
    FitConfig,
    FitEstimate,
    heuristic_estimate,
    make_fit_simulator,
    refine,
    simulate_adaptive,
)
from growth.tensor import tumour_tensor, tumour_tensor_family
from rtjax.inverse.predict import predict
from rtjax.inverse.weights import load_weights
from rtjax.io import bounding_box
from rtjax.labels import TumourMasks
from rtjax.metrics import dice

__all__ = [
    "CaseFit",
    "fill_lesion_tissue",
    "tumour_box",
    "block_average",
    "network_estimate",
    "fit_case",
    "EnsembleFit",
    "fit_ensemble",
]


#: The final density takes at least this many steps, so its low-density tail (which sets
#: the iso-volumetric model CTV) reaches as far as that many voxels from the visible tumour.
FINAL_MIN_STEPS = 200


@dataclass
class CaseFit:
    """A fitted case: the density on the case's canonical grid and the record of the fit."""

    density: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)
    loss_curve: list[float] = field(default_factory=list)


def fill_lesion_tissue(wm: np.ndarray, gm: np.ndarray, lesion: np.ndarray):
    """Give lesion voxels without tissue the tissue of the nearest voxel outside the
    lesion that has some (segmentations often leave the tumour region empty).

    Returns wm, gm and the number of voxels filled.
    """
    empty = lesion & (wm + gm <= 0)
    if not empty.any():
        return wm, gm, 0
    source = (wm + gm > 0) & ~lesion
    if not source.any():
        raise ValueError("tissue maps are empty around the lesion: nothing to fill it from")
    _, nearest = distance_transform_edt(~source, return_indices=True)
    wm, gm = wm.copy(), gm.copy()
    idx = tuple(n[empty] for n in nearest)
    wm[empty], gm[empty] = wm[idx], gm[idx]
    return wm, gm, int(empty.sum())


def tumour_box(whole: np.ndarray, spacing, margin_mm: float) -> tuple[slice, ...]:
    """Bounding box of the visible tumour grown by `margin_mm` per side, within the grid."""
    return bounding_box(whole, pad=np.ceil(margin_mm / np.asarray(spacing, float)).astype(int))


def block_average(array: np.ndarray, factors) -> np.ndarray:
    """Mean over blocks of `factors` voxels (zero-padded up to a multiple)."""
    pads = [(0, (-n) % f) for n, f in zip(array.shape, factors)]
    padded = np.pad(array.astype(np.float32), pads)
    shape = []
    for n, f in zip(padded.shape, factors):
        shape += [n // f, f]
    return padded.reshape(shape).mean(axis=(1, 3, 5))


def network_estimate(core, edema, wm, gm, spacing, box, factors, weights=None, member: int | None = None):
    """The inverse network's estimate (full-grid arrays) as a `FitEstimate` on the working
    grid of `box` / `factors`, and the raw prediction (for params.json): the ensemble mean,
    or one `member`'s estimate."""
    raw = predict(core, edema, wm, gm, spacing, weights=weights)
    if member is not None:
        members = raw["members"]
        if not 0 <= member < len(members["sqrt_dw_t"]):
            raise ValueError(f"member {member}: the network has {len(members['sqrt_dw_t'])} members")
        raw = {**raw, **{k: np.asarray(v)[member] for k, v in members.items()}}
    full_vox = np.asarray(raw["origin_mm"], float) / np.asarray(spacing, float)
    corner = np.array([s.start for s in box], float)
    factors = np.asarray(factors, float)
    work_vox = (full_vox - corner - (factors - 1) / 2) / factors
    estimate = FitEstimate(
        origin_mm=jnp.asarray(work_vox * np.asarray(spacing) * factors, jnp.float32),
        sqrt_dw_t=jnp.asarray(raw["sqrt_dw_t"], jnp.float32),
        sqrt_rho_t=jnp.asarray(raw["sqrt_rho_t"], jnp.float32),
        u_t1=jnp.asarray(np.clip(raw["u_t1"], 0.51, 0.84), jnp.float32),
        u_fl=jnp.asarray(np.clip(raw["u_fl"], 0.06, 0.49), jnp.float32),
    )
    return estimate, raw


def fit_case(
    masks: TumourMasks,
    wm: np.ndarray,
    gm: np.ndarray,
    spacing,
    *,
    initial="network",
    weights=None,
    working_spacing_mm: float = 2.0,
    max_working_voxels: int = 48,
    margin_mm: float = 30.0,
    config=None,
    bounds=None,
    assumed_days: float = 365.0,
    progress: bool = False,
    tensor: np.ndarray | None = None,
    anisotropy: float | tuple[float, float] = 5.0,
    tensor_method: str = "scaled",
    member: int | None = None,
) -> CaseFit:
    """Fit the FK model to a case's masks on its tissue (canonical arrays, spacing in mm).

    Args:
        masks: the observed necrosis / enhancing / edema.
        wm, gm: tissue probabilities on the same grid.
        initial: "network" (the shipped inverse model, or `weights`), "heuristic" (from
            the masks alone; refined without the prior term), or a `growth.fit.FitEstimate`
            on the working grid.
        assumed_days: only Dw*T and rho*T are identifiable; Dw and rho are also reported
            for this T (days).
        tensor: optional (6, *grid) diffusion tensor on the same canonical grid
            (xx, xy, xz, yy, yz, zz in the canonical voxel frame, any unit: only its
            shape is used; e.g. `rtjax.tensor_io`). The growth is then anisotropic,
            D = Dw [p_wm A + p_gm / ratio I] with A = `growth.tumour_tensor(tensor, r,
            tensor_method)`: the isotropic fit (from `initial`) is refined a second time
            through the anisotropic solver. A ready trace-3 shape tensor is used as it
            is with anisotropy=1.
        anisotropy: r, fixed (a number), or (r_lo, r_hi) to fit r in that range.
        tensor_method: "scaled" or "westin" (`growth.tumour_tensor`).
        member: with initial "network", start from this ensemble member's estimate
            instead of the ensemble mean (`fit_ensemble`).
    """
    start = time.perf_counter()
    config = config or FitConfig()
    core, edema = masks.core, masks.edema
    whole = core | edema
    if not whole.any():
        raise ValueError("empty tumour: no core and no edema voxels to fit")
    spacing = np.asarray(spacing, float)
    wm, gm, filled = fill_lesion_tissue(np.asarray(wm, np.float32), np.asarray(gm, np.float32), whole)
    if filled:
        warnings.warn(
            f"{filled} tumour voxels had no tissue; filled from the nearest surrounding tissue",
            stacklevel=2,
        )
    box = tumour_box(whole, spacing, margin_mm)
    extent_mm = max((s.stop - s.start) * h for s, h in zip(box, spacing))
    target_mm = max(working_spacing_mm, extent_mm / max_working_voxels)
    factors = tuple(max(1, int(round(target_mm / h))) for h in spacing)
    work_spacing = tuple(float(h * f) for h, f in zip(spacing, factors))
    work = {name: block_average(a[box], factors) for name, a in
            (("core", core), ("edema", edema), ("wm", wm), ("gm", gm))}
    grid = Grid(work["core"].shape, work_spacing)
    network = None
    if isinstance(initial, str):
        if initial == "network":
            initial, network = network_estimate(core, edema, wm, gm, spacing, box, factors, weights,
                                                member)
        elif initial == "heuristic":
            initial = heuristic_estimate(work["core"] > 0.5, work["edema"] > 0.5, work_spacing)
            # the prior is for a calibrated (network) estimate, not for this rough guess
            config = dataclasses.replace(config, prior_weight=0.0)
        else:
            raise ValueError(f"initial must be 'network', 'heuristic' or a FitEstimate, not {initial!r}")
    bounds = bounds or FitBounds()
    bar = _progress_bar(config, progress)
    result = refine(
        work["core"], work["edema"], work["wm"], work["gm"], grid, initial,
        config=config, bounds=bounds,
        callback=None if bar is None else (lambda i, loss: bar.update(1) or bar.set_postfix(loss=f"{loss:.4f}")),
    )
    if bar is not None:
        bar.close()
    anisotropic = {"tensor_given": tensor is not None}
    native_tensor = None
    if tensor is not None:
        result, anisotropic = _anisotropic_refinement(
            result, initial, work, grid, _check_tensor(tensor, core.shape)[(slice(None), *box)],
            factors, anisotropy, tensor_method, config, bounds, progress)
        r = float(result.estimate.anisotropy)
        native_tensor = np.asarray(tumour_tensor(
            _check_tensor(tensor, core.shape)[(slice(None), *box)], anisotropy=r,
            method=tensor_method), np.float32)
    est = result.estimate
    # Working-grid mm -> native box index: block j covers native voxels f*j .. f*j+f-1.
    origin_work_vox = np.asarray(est.origin_mm) / np.asarray(work_spacing)
    origin_box_vox = origin_work_vox * np.asarray(factors) + (np.asarray(factors) - 1) / 2
    native = Grid(tuple(s.stop - s.start for s in box), tuple(spacing))
    # forward only: the layout that suits a plain solve
    sim = make_fit_simulator(wm[box], gm[box], native, float(est.sqrt_dw_t), native_tensor,
                             dense_fraction=DENSE_FRACTION)
    sim = dataclasses.replace(sim, max_steps=max(sim.max_steps, FINAL_MIN_STEPS + 1))
    box_density = simulate_adaptive(sim, est.params(config.ratio),
                                    jnp.asarray(origin_box_vox * spacing), min_steps=FINAL_MIN_STEPS)
    density = np.zeros(core.shape, np.float32)
    density[box] = np.asarray(box_density, np.float32)
    sim_core, sim_edema = (np.asarray(m) for m in visible_masks(density, est.u_t1, est.u_fl))
    edge = _box_edge_max(np.asarray(box_density), box, core.shape)
    if edge > 1e-3:
        warnings.warn(f"the fitted density reaches {edge:.3g} at the edge of the {margin_mm} mm "
                      "margin box; increase margin_mm", stacklevel=2)
    estimate = est.as_dict()
    corner = np.array([s.start for s in box], float)
    info = {
        "scaled_parameters": estimate,
        "T_convention": (
            "only Dw*T and rho*T are identifiable from one time point; dw_mm2_per_day and "
            f"rho_per_day are given for an assumed T = {assumed_days} days"
        ),
        "assumed_days": assumed_days,
        "dw_mm2_per_day": estimate["dw_t_mm2"] / assumed_days,
        "dg_mm2_per_day": estimate["dw_t_mm2"] / assumed_days / config.ratio,
        "rho_per_day": estimate["rho_t"] / assumed_days,
        "ratio": config.ratio,
        "origin_canonical_voxel": (corner + origin_box_vox).round(3).tolist(),
        "u_t1": estimate["u_t1"],
        "u_fl": estimate["u_fl"],
        "initial_estimate": result.initial.as_dict(),
        "network": None if network is None else {
            "weights_version": network.get("weights_version"),
            "ensemble_spread": _plain(network.get("ensemble_spread")),
            "warnings": list(network.get("warnings", [])),
        },
        "final_loss": result.best_loss,
        "iterations": len(result.loss_curve),
        "best_iteration": result.best_iteration,
        "stopped_early": result.stopped_early,
        "dice_core": dice(sim_core, core),
        "dice_edema": dice(sim_edema, edema),
        "dice_core_working_grid": result.dice_core,
        "dice_edema_working_grid": result.dice_edema,
        "working_spacing_mm": list(work_spacing),
        "working_shape": list(grid.shape),
        "fit_box": [[s.start, s.stop] for s in box],
        "lesion_voxels_filled_with_tissue": filled,
        "density_at_box_edge": edge,
        "anisotropic": anisotropic,
        "seconds": round(time.perf_counter() - start, 2),
    }
    return CaseFit(density=density, info=info, loss_curve=result.loss_curve)


def _check_tensor(tensor, shape) -> np.ndarray:
    tensor = np.asarray(tensor, np.float32)
    if tensor.shape != (6, *shape):
        raise ValueError(f"tensor has shape {tensor.shape}, expected (6, *{tuple(shape)}) on the case grid")
    if not np.isfinite(tensor).all():
        raise ValueError("tensor has non-finite values")
    return tensor


def _anisotropic_refinement(iso_result, initial, work, grid, box_tensor, factors, anisotropy,
                            method, config, bounds, progress):
    """Refine the isotropic fit again through the anisotropic solver on the working grid;
    returns that result and the record of the anisotropy for params.json."""
    work_tensor = np.stack([block_average(t, factors) for t in box_tensor])
    fitted = not np.isscalar(anisotropy)
    if fitted:
        r_range = tuple(float(v) for v in anisotropy)
        shape = tumour_tensor_family(work_tensor, r_range, method=method)
        start = iso_result.estimate.with_anisotropy(None)
        stage_config = config
        bounds = dataclasses.replace(bounds, anisotropy=r_range)
    else:
        r_range = None
        shape = np.asarray(tumour_tensor(work_tensor, anisotropy=float(anisotropy), method=method))
        start = iso_result.estimate.with_anisotropy(float(anisotropy))
        stage_config = dataclasses.replace(config, fit_anisotropy=False)
    bar = _progress_bar(config, progress)
    result = refine(
        work["core"], work["edema"], work["wm"], work["gm"], grid, start,
        config=stage_config, bounds=bounds, prior_centre=initial.with_anisotropy(
            None if fitted else float(anisotropy)), shape_tensor=shape,
        callback=None if bar is None else (lambda i, loss: bar.update(1) or bar.set_postfix(loss=f"{loss:.4f}")),
    )
    if bar is not None:
        bar.close()
    record = {
        "tensor_given": True,
        "tensor_method": method,
        "anisotropy": float(result.estimate.anisotropy),
        "anisotropy_fitted": fitted,
        "anisotropy_bounds": list(r_range) if fitted else None,
        "stencil_offsets": result.details["stencil_offsets"],
        "isotropic_stage": {
            "estimate": iso_result.estimate.as_dict(),
            "final_loss": iso_result.best_loss,
            "iterations": len(iso_result.loss_curve),
            "dice_core_working_grid": iso_result.dice_core,
            "dice_edema_working_grid": iso_result.dice_edema,
            "seconds": round(iso_result.seconds, 2),
        },
    }
    return result, record


def _box_edge_max(density: np.ndarray, box, shape) -> float:
    """Largest density on the faces of the box that are inside the grid (the grid's own
    faces are a true no-flux boundary, the box's inner faces are not)."""
    values = [0.0]
    for axis, (s, n) in enumerate(zip(box, shape)):
        if s.start > 0:
            values.append(float(np.take(density, 0, axis=axis).max()))
        if s.stop < n:
            values.append(float(np.take(density, -1, axis=axis).max()))
    return max(values)


def _progress_bar(config, enabled: bool):
    if not enabled:
        return None
    return tqdm(total=config.max_iterations, desc="fit", unit="it")


def _plain(value):
    """numpy values -> JSON-friendly Python values."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


@dataclass
class EnsembleFit:
    """An ensemble of fits of one case: the point fit and the members that reproduce the
    masks almost as well (densities on the case's canonical grid).

    Attributes:
        point: the usual fit (network ensemble mean as the start).
        densities: the accepted members' densities, the point fit's first.
        members: per candidate: its start ("point", "network member k", or the shifted
            thresholds), Dice of the re-simulated core / edema, whether it was accepted.
    """

    point: CaseFit
    densities: list[np.ndarray]
    members: list[dict[str, Any]]

    @property
    def mean(self) -> np.ndarray:
        """Per-voxel mean density over the accepted members, float32."""
        return np.mean(self.densities, axis=0).astype(np.float32)

    @property
    def sd(self) -> np.ndarray:
        """Per-voxel standard deviation of the density over the accepted members, float32."""
        return np.std(self.densities, axis=0).astype(np.float32)


def _mask_dice(info: dict) -> float:
    return 0.5 * (info["dice_core"] + info["dice_edema"])


def _shifted_start(point: CaseFit, du_t1: float, du_fl: float, bounds: FitBounds) -> FitEstimate:
    """The point fit's working-grid estimate with its imaging thresholds shifted (kept
    inside the bounds): a start on the valley of thresholds and growth parameters that
    reproduce one scan's masks almost equally well."""
    est = point.info["scaled_parameters"]
    lo_t1, hi_t1 = bounds.u_t1
    lo_fl, hi_fl = bounds.u_fl
    u_t1 = float(np.clip(est["u_t1"] + du_t1, lo_t1 + 0.01, hi_t1 - 0.01))
    u_fl = float(np.clip(est["u_fl"] + du_fl, lo_fl + 0.01, min(hi_fl, u_t1) - 0.01))
    return FitEstimate(origin_mm=jnp.asarray(est["origin_grid_mm"], jnp.float32),
                       sqrt_dw_t=jnp.float32(est["sqrt_dw_t_mm"]), sqrt_rho_t=jnp.float32(est["sqrt_rho_t"]),
                       u_t1=jnp.float32(u_t1), u_fl=jnp.float32(u_fl))


def fit_ensemble(
    masks: TumourMasks,
    wm: np.ndarray,
    gm: np.ndarray,
    spacing,
    *,
    weights=None,
    threshold_shift: float = 0.05,
    tolerance: float = 0.03,
    config=None,
    progress: bool = False,
    **fit_options,
) -> EnsembleFit:
    """An ensemble of fits for per-voxel probabilities (`rtjax.ctv.ctv_probability`).

    Candidates: the point fit (the network's ensemble mean as the start); a fit from each
    member of the inverse network's ensemble; and fits with the imaging thresholds held at
    the point fit's shifted by +-`threshold_shift` (u_T1, then u_FL; growth parameters and
    origin refined). One scan's masks are reproduced almost equally well along a valley of
    thresholds and growth parameters; a candidate whose mean re-simulated Dice (core,
    edema) is within `tolerance` of the point fit's is accepted. `fit_options` go to
    every `fit_case` (e.g. a tensor).
    """
    config = config or FitConfig()
    bounds = fit_options.pop("bounds", None) or FitBounds()
    common = dict(weights=weights, bounds=bounds, **fit_options)
    point = fit_case(masks, wm, gm, spacing, initial="network", config=config, progress=progress, **common)
    candidates = [(f"network member {k}", dict(initial="network", member=k, config=config))
                  for k in range(load_weights(weights).config.train.members)]
    fixed = dataclasses.replace(config, fit_thresholds=False)
    for name, du_t1, du_fl in (("u_t1 +", threshold_shift, 0.0), ("u_t1 -", -threshold_shift, 0.0),
                               ("u_fl +", 0.0, threshold_shift), ("u_fl -", 0.0, -threshold_shift)):
        candidates.append((f"thresholds {name}{threshold_shift:g}",
                           dict(initial=_shifted_start(point, du_t1, du_fl, bounds), config=fixed)))
    best = _mask_dice(point.info)
    densities = [point.density]
    members = [{"start": "point", "dice_core": point.info["dice_core"],
                "dice_edema": point.info["dice_edema"], "accepted": True}]
    for name, options in candidates:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the point fit already said it
            fit = fit_case(masks, wm, gm, spacing, **options, **common)
        accepted = _mask_dice(fit.info) >= best - tolerance
        members.append({"start": name, "dice_core": fit.info["dice_core"],
                        "dice_edema": fit.info["dice_edema"], "accepted": bool(accepted),
                        "u_t1": fit.info["u_t1"], "u_fl": fit.info["u_fl"],
                        "sqrt_dw_t_mm": fit.info["scaled_parameters"]["sqrt_dw_t_mm"],
                        "sqrt_rho_t": fit.info["scaled_parameters"]["sqrt_rho_t"]})
        if accepted:
            densities.append(fit.density)
    return EnsembleFit(point=point, densities=densities, members=members)
