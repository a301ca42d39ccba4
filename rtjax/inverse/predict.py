"""The inverse network's estimate for one case: masks + tissue -> FK parameters.

`predict` crops the case's canonical arrays onto the network grid around the visible
tumour, runs the ensemble (`rtjax.inverse.weights`) and maps the outputs back to the
case's grid mm, with the ensemble spread and warnings.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from growth.inverse import crop_around, masks_to_inputs
from rtjax.inverse.weights import InverseWeights, load_weights

__all__ = ["predict"]


def predict(core, edema, wm, gm, spacing, *, weights=None) -> dict[str, Any]:
    """The network's estimate for one case.

    Args:
        core, edema: boolean masks (tumour core = enhancing + necrosis; edema), canonical.
        wm, gm: tissue probabilities on the same grid.
        spacing: voxel size, mm (3 values).
        weights: None (shipped), a weights folder, or a loaded `InverseWeights`.

    Returns:
        origin_mm: the origin in grid mm of the input array (voxel index * spacing), (3,);
        origin_vox: the same in voxels; sqrt_dw_t (mm), sqrt_rho_t, u_t1, u_fl: ensemble
        means, clipped to the trained ranges; ensemble_spread: their standard deviations
        over members (origin_mm per axis); members: per-member values; crop_centre_vox;
        weights_version; warnings (e.g. a tumour larger than the network's field of view).

    Raises:
        ValueError: empty masks or mismatched shapes.
    """
    w = weights if isinstance(weights, InverseWeights) else load_weights(weights)
    gen = w.config.generator
    core, edema = np.asarray(core, bool), np.asarray(edema, bool)
    shapes = {np.shape(a) for a in (core, edema, wm, gm)}
    if len(shapes) != 1 or core.ndim != 3:
        raise ValueError(f"core, edema, wm, gm must be 3-D arrays of one shape, got {shapes}")
    spacing = np.broadcast_to(np.asarray(spacing, np.float64), (3,))
    visible = core | edema
    if not visible.any():
        raise ValueError("the tumour masks are empty: nothing to fit")
    centre_vox = np.argwhere(visible).mean(axis=0)
    crops = crop_around(
        tuple(jnp.asarray(a, jnp.float32) for a in (core, edema, wm, gm)),
        centre_vox, spacing, gen.net_shape, gen.net_spacing,
    )
    x, com = masks_to_inputs(*crops, gen.net_spacing)
    out = np.asarray(w.apply(x[None]))[:, 0, :].astype(np.float64)  # (members, 7)
    r = gen.ranges
    origin = centre_vox * spacing + np.asarray(com, np.float64) + out[:, :3]
    values = {
        "origin_mm": origin,
        "sqrt_dw_t": np.clip(out[:, 3], 0.1, r.sqrt_dw_t_max),
        "sqrt_rho_t": np.clip(out[:, 4], 0.1, None),
        "u_t1": np.clip(out[:, 5], *r.u_t1),
        "u_fl": np.clip(out[:, 6], *r.u_fl),
    }
    warnings = []
    border = np.asarray(x[..., 0] + x[..., 1] > 0)
    if border[[0, -1]].any() or border[:, [0, -1]].any() or border[:, :, [0, -1]].any():
        warnings.append(
            f"the visible tumour reaches the border of the network's {gen.fov_mm:g} mm field "
            "of view: it is larger than the training cases, the estimate is unreliable"
        )
    result = {
        "origin_mm": values["origin_mm"].mean(axis=0),
        "origin_vox": values["origin_mm"].mean(axis=0) / spacing,
        **{k: float(values[k].mean()) for k in ("sqrt_dw_t", "sqrt_rho_t", "u_t1", "u_fl")},
        "ensemble_spread": {
            "origin_mm": values["origin_mm"].std(axis=0),
            **{k: float(values[k].std()) for k in ("sqrt_dw_t", "sqrt_rho_t", "u_t1", "u_fl")},
        },
        "members": {k: v.tolist() for k, v in values.items()},
        "crop_centre_vox": centre_vox,
        "weights_version": w.version,
        "warnings": warnings,
    }
    return result
