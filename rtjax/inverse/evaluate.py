"""Validation of a trained inverse model on held-out simulations.

`evaluate` compares the network's estimates with the truth (parameter errors) and the
density re-simulated from them with the true density (Dice at `DICE_LEVELS`), beside a
baseline that predicts the training mean (origin at the visible centre of mass).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from growth.inverse import TARGET_NAMES, anatomy_box, box_centre_mm, simulate_box, threshold_inputs
from rtjax.atlas import atlas_arrays
from rtjax.inverse.config import InverseConfig
from rtjax.metrics import dice
from rtjax.ml import ensemble_apply

__all__ = ["DICE_LEVELS", "network_outputs", "parameter_errors", "resimulated_dice", "evaluate"]

#: Density levels of the re-simulation Dice.
DICE_LEVELS = (0.001, 0.1, 0.25, 0.6)


def network_outputs(config: InverseConfig, model, mean, scale, val: dict):
    """Ensemble outputs in physical units (members, n, 7) for the held-out shards `val`,
    and the visible centre of mass of each case (n, 3) relative to the network grid's
    centre (mm)."""
    gen = config.generator
    n = len(val["dw"])
    density = jnp.asarray(val["density"], jnp.float32)
    wm = jnp.asarray(val["wm"], jnp.float32) / 255.0
    gm = jnp.asarray(val["gm"], jnp.float32) / 255.0
    x, com = jax.vmap(lambda d, w, g, u1, uf: threshold_inputs(d, w, g, u1, uf, gen.net_spacing))(
        density, wm, gm, jnp.asarray(val["u_t1"]), jnp.asarray(val["u_fl"]))
    apply = nnx.jit(ensemble_apply)
    preds = np.concatenate([np.asarray(apply(model, x[i : i + 16])) for i in range(0, n, 16)], axis=1)
    return preds * scale + mean, np.asarray(com)


def parameter_errors(preds: np.ndarray, com: np.ndarray, val: dict) -> dict:
    """Absolute (and relative, for the growth parameters) errors of the ensemble mean,
    mean and median over cases, and the mean ensemble spread per target."""
    pred = preds.mean(axis=0)
    truth = np.concatenate([
        val["origin_rel_mm"] - com,
        np.stack([val["sqrt_dw_t"], val["sqrt_rho_t"], val["u_t1"], val["u_fl"]], axis=1),
    ], axis=1)
    errors = {"origin_mm": np.linalg.norm(pred[:, :3] - truth[:, :3], axis=1)}
    for k, name in enumerate(TARGET_NAMES[3:], start=3):
        errors[name] = np.abs(pred[:, k] - truth[:, k])
    out = {name: {"mean": float(e.mean()), "median": float(np.median(e))} for name, e in errors.items()}
    for k, name in ((3, "sqrt_dw_t"), (4, "sqrt_rho_t")):
        rel = np.abs(pred[:, k] - truth[:, k]) / np.abs(truth[:, k])
        out[name]["mean_relative"] = float(rel.mean())
        out[name]["median_relative"] = float(np.median(rel))
    out["ensemble_spread_mean"] = {
        name: float(preds[:, :, k].std(axis=0).mean()) for k, name in enumerate(TARGET_NAMES)
    }
    return out


def _resimulator(config: InverseConfig, atlas):
    """jitted batch (atlas origin, transform, true a, b, estimated origin, a, b) ->
    (true density, estimated density) on the simulation boxes."""
    gen = config.generator
    atlas_wm, atlas_gm, atlas_spacing = (jnp.asarray(atlas[0]), jnp.asarray(atlas[1]), atlas[2])
    centre = box_centre_mm(gen)

    @jax.jit
    def resim(origin_atlas, transform, true_a, true_b, origin_box, a, b):
        def one(oa, tf, ta, tb, ob, pa, pb):
            w, g = anatomy_box(gen, atlas_wm, atlas_gm, atlas_spacing, oa, tf)
            return simulate_box(gen, w, g, centre, ta, tb), simulate_box(gen, w, g, ob, pa, pb)
        return jax.vmap(one)(origin_atlas, transform, true_a, true_b, origin_box, a, b)

    return resim


def resimulated_dice(config: InverseConfig, val: dict, estimators: dict, m: int, atlas) -> dict:
    """Mean and median Dice at `DICE_LEVELS` between the true densities of the first `m`
    held-out cases and those re-simulated from each estimator's (box origin, sqrt(Dw T),
    sqrt(rho T))."""
    resim = _resimulator(config, atlas)
    out = {}
    for label, (origin_box, a, b) in estimators.items():
        scores = {lvl: [] for lvl in DICE_LEVELS}
        for i in range(0, m, 8):
            j = min(i + 8, m)
            c_true, c_pred = resim(
                jnp.asarray(val["origin_atlas_mm"][i:j]), jnp.asarray(val["transform"][i:j]),
                jnp.asarray(val["sqrt_dw_t"][i:j]), jnp.asarray(val["sqrt_rho_t"][i:j]),
                jnp.asarray(origin_box[i:j]), jnp.asarray(a[i:j]), jnp.asarray(b[i:j]),
            )
            c_true, c_pred = np.asarray(c_true), np.asarray(c_pred)
            for k in range(j - i):
                for lvl in DICE_LEVELS:
                    scores[lvl].append(dice(c_true[k] >= lvl, c_pred[k] >= lvl))
        out[label] = {f"c>={lvl:g}": {"mean": float(np.mean(s)), "median": float(np.median(s))}
                      for lvl, s in scores.items()}
    return out


def evaluate(config: InverseConfig, model, mean, scale, val: dict, *, atlas=None) -> dict:
    """Parameter errors on the held-out cases `val` (shards of `rtjax.inverse.dataset`),
    and the re-simulation Dice on the first `train.val_resim_cases` of them, for the
    network and for the training-mean baseline."""
    preds, com = network_outputs(config, model, mean, scale, val)
    n = len(val["dw"])
    m = min(config.train.val_resim_cases, n)
    pred = preds.mean(axis=0)
    com_box = jnp.asarray(val["com_box_mm"]) + com  # visible COM on the network grid, box mm
    estimators = {
        "network": (com_box + pred[:, :3], pred[:, 3], pred[:, 4]),
        "baseline_mean": (com_box, np.full(n, float(mean[3])), np.full(n, float(mean[4]))),
    }
    atlas = atlas if atlas is not None else atlas_arrays()
    return {"val_cases": n, "resimulated_cases": m,
            "parameter_errors": parameter_errors(preds, com, val),
            "dice": resimulated_dice(config, val, estimators, m, atlas)}
