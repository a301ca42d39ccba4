"""Held-out evaluation of the fit: the inverse network alone versus network + refinement.

Cases come from the training generator (`growth.inverse.iterate_simulations`) with a seed
the training never used; each is observed through its own thresholds, fitted with
`rtjax.fit.fit_case` (0 refinement iterations = the network alone), and the fitted density
is compared with the true one by Dice at several density levels.

The anisotropic held-out set (`anisotropic=True`) grows the truth along the white-matter
fibres of a real DTI (TractSeg's FA + first peak, `rtjax.simulate.load_shape_tensor`,
resampled onto the MNI152 atlas) with `growth.AnisotropicFKSimulator`, but fits it with the
isotropic model as usual: the drop against the isotropic table is the cost of that model
mismatch.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from growth.fit import FitConfig
from growth.inverse import iterate_simulations
from rtjax.atlas import atlas_arrays
from rtjax.data import data_root as default_root
from rtjax.fit import fit_case
from rtjax.inverse.weights import load_weights
from rtjax.labels import TumourMasks
from rtjax.metrics import dice
from rtjax.pipeline.case import fit_case_dir
from rtjax.simulate import load_shape_tensor, load_tissue

__all__ = [
    "LEVELS",
    "atlas_shape_tensor",
    "held_out_cases",
    "fit_held_out_case",
    "evaluate_fit",
    "format_fit_table",
    "benchmark_fit",
    "format_benchmark_table",
]

#: Density levels at which fitted and true densities are compared.
LEVELS = (0.001, 0.1, 0.25, 0.6)


def atlas_shape_tensor(data_root=None, anisotropy: float = 5.0) -> np.ndarray:
    """The trace-3 white-matter shape tensor (6, *MNI152 atlas shape), float32, from the
    TractSeg DTI in `data_root/dti/tractseg` (FA + first peak; identity outside its field
    of view), resampled onto the atlas of `rtjax.atlas.atlas_arrays`."""


    folder = Path(data_root or default_root()) / "dti" / "tractseg"
    shape = load_shape_tensor(load_tissue(atlas="mni152"), fa=folder / "FA.nii.gz",
                              peaks=folder / "peaks.nii.gz", anisotropy=anisotropy)
    return np.asarray(shape.components, np.float32)


def held_out_cases(cfg, n_cases: int, *, seed: int, tensor=None, atlas=None, batch_size: int = 8):
    """The first `n_cases` accepted held-out cases of the generator `cfg` (one dict per
    case: density, wm, gm on the network grid, sqrt_dw_t, sqrt_rho_t, u_t1, u_fl, ...),
    simulated `batch_size` at a time. With `tensor` (see `atlas_shape_tensor`) they grow
    anisotropically."""

    atlas_wm, atlas_gm, atlas_spacing = atlas if atlas is not None else atlas_arrays()
    stream = iterate_simulations(cfg, atlas_wm, atlas_gm, atlas_spacing, seed=seed,
                                 batch_size=batch_size, tensor=tensor)
    count = 0
    while count < n_cases:
        batch = next(stream)
        for i in range(min(len(batch["density"]), n_cases - count)):
            yield {k: v[i] for k, v in batch.items()}
            count += 1


def _observed_masks(case: dict):
    """A simulated case's masks as its thresholds show them (core = enhancing)."""

    truth = np.asarray(case["density"], np.float32)
    core = truth >= float(case["u_t1"])
    return TumourMasks(necrosis=np.zeros_like(core), enhancing=core,
                       edema=(truth >= float(case["u_fl"])) & ~core)


def fit_held_out_case(case: dict, spacing, *, weights, iterations: int | None = None,
                      fit_options=None) -> dict:
    """Fit one held-out case with the network alone and with refinement (`iterations` at
    most; None: the fit config's); Dice of the fitted against the true density at
    `LEVELS`, parameter errors and seconds per stage."""

    fit_options = dict(fit_options or {})
    config = fit_options.pop("config", None) or FitConfig()
    truth = np.asarray(case["density"], np.float32)
    masks = _observed_masks(case)
    row = {"sqrt_dw_t": float(case["sqrt_dw_t"]), "sqrt_rho_t": float(case["sqrt_rho_t"])}
    iterations = config.max_iterations if iterations is None else iterations
    for name, its in (("network", 0), ("refined", iterations)):
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit = fit_case(masks, case["wm"], case["gm"], spacing, initial="network",
                           weights=weights, config=dataclasses.replace(config, max_iterations=its),
                           **fit_options)
        est = fit.info["scaled_parameters"]
        row[name] = {
            "dice": [dice(fit.density >= u, truth >= u) for u in LEVELS],
            "sqrt_dw_t_error": abs(est["sqrt_dw_t_mm"] - row["sqrt_dw_t"]),
            "sqrt_rho_t_error": abs(est["sqrt_rho_t"] - row["sqrt_rho_t"]),
            "seconds": time.perf_counter() - start,
        }
    return row


def evaluate_fit(
    n_cases: int = 20,
    *,
    seed: int = 90_210,
    iterations: int | None = None,
    weights=None,
    anisotropic: bool = False,
    anisotropy: float = 5.0,
    deadline: float | None = None,
    fit_options=None,
    progress: bool = False,
) -> dict:
    """Per-case Dice at `LEVELS` and parameter errors for the network and the refinement.

    Args:
        n_cases: held-out cases (drawn with `seed`, which training never uses).
        iterations: refinement iterations at most (the "refined" row; the "network" row
            has 0); None: those of the fit config (`growth.fit.FitConfig`).
        weights: inverse-model weights (None: the shipped ones); their generator config
            draws the cases.
        anisotropic: grow the truth along the TractSeg DTI (see the module docstring).
        anisotropy: the shape tensor's anisotropy for that.
        deadline: a `time.perf_counter()` value after which no new case is started.
        fit_options: more keyword arguments of `rtjax.fit.fit_case` (e.g. `config`).
    """

    if iterations is None:
        iterations = (dict(fit_options or {}).get("config") or FitConfig()).max_iterations
    weights = load_weights(weights)
    cfg = weights.config.generator
    tensor = atlas_shape_tensor(anisotropy=anisotropy) if anisotropic else None
    spacing = (cfg.net_spacing,) * 3
    rows = []
    for case in held_out_cases(cfg, n_cases, seed=seed, tensor=tensor):
        if deadline is not None and time.perf_counter() >= deadline:
            break
        rows.append(fit_held_out_case(case, spacing, weights=weights, iterations=iterations,
                                      fit_options=fit_options))
        if progress:
            r = rows[-1]
            print(f"[fit] case {len(rows)}/{n_cases}: Dice network "
                  f"{np.round(r['network']['dice'], 3).tolist()} refined "
                  f"{np.round(r['refined']['dice'], 3).tolist()} "
                  f"({r['refined']['seconds']:.1f} s)", flush=True)
    return {"levels": list(LEVELS), "cases": rows, "seed": seed, "iterations": iterations,
            "weights_version": weights.version, "anisotropic": anisotropic,
            "anisotropy": anisotropy if anisotropic else None}


def format_fit_table(result: dict) -> str:
    """Mean Dice per level and mean parameter errors, network alone vs refined."""
    header = "stage      " + " ".join(f"Dice c>={u:<6}" for u in result["levels"])
    header += "  |sqrt(DwT)| err  |sqrt(rhoT)| err  s/case"
    kind = (f"anisotropic truth (DTI, anisotropy {result['anisotropy']:g}), isotropic fit"
            if result.get("anisotropic") else "isotropic truth and fit")
    lines = [f"{len(result['cases'])} held-out simulated cases (seed {result['seed']}, "
             f"weights {result['weights_version']}, {kind})", header]
    if not result["cases"]:
        return "\n".join(lines + ["(no case)"])
    for stage in ("network", "refined"):
        d = np.mean([c[stage]["dice"] for c in result["cases"]], axis=0)
        e_dw = np.mean([c[stage]["sqrt_dw_t_error"] for c in result["cases"]])
        e_rho = np.mean([c[stage]["sqrt_rho_t_error"] for c in result["cases"]])
        sec = np.mean([c[stage]["seconds"] for c in result["cases"]])
        lines.append(f"{stage:10s} " + " ".join(f"{v:<13.3f}" for v in d)
                     + f"  {e_dw:14.2f}  {e_rho:15.2f}  {sec:6.1f}")
    return "\n".join(lines)


def benchmark_fit(data_root=None, *, n_simulated: int = 2, seed: int = 31_337, fit_options=None) -> list[dict]:
    """Wall time of `rtjax fit` (network + refinement + final density) per case: the
    Lipkova patient (256^3, 1 mm, its own tissue; `data_root/lipkova-patient`) through
    `rtjax.pipeline.case.fit_case_dir`, and `n_simulated` held-out simulated cases through
    `rtjax.fit.fit_case`. The first case includes the compilation."""


    rows = []

    def record(name, seconds, info):
        rows.append({"case": name, "seconds": seconds, "iterations": info["iterations"],
                     "working_shape": info["working_shape"],
                     "working_spacing_mm": info["working_spacing_mm"],
                     "dice_core": info["dice_core"], "dice_edema": info["dice_edema"]})

    case = Path(data_root or default_root()) / "lipkova-patient"
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        fit, _ = fit_case_dir(case, out, labels="tum", ignore_labels=(2,), progress=False,
                              overrides={"seg": "tumT1c.nii.gz", "edema": "tumFLAIR.nii.gz",
                                         "wm": "WM.nii.gz", "gm": "GM.nii.gz"},
                              **dict(fit_options or {}))
        record("lipkova-patient (256^3, 1 mm)", time.perf_counter() - start, fit.info)
    weights = load_weights()
    cfg = weights.config.generator
    spacing = (cfg.net_spacing,) * 3
    for k, sim in enumerate(held_out_cases(cfg, n_simulated, seed=seed)):
        masks = _observed_masks(sim)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit = fit_case(masks, sim["wm"], sim["gm"], spacing, weights=weights,
                           **dict(fit_options or {}))
        record(f"simulated {k + 1} ({cfg.net_shape}^3, {cfg.net_spacing:g} mm)",
               time.perf_counter() - start, fit.info)
    return rows


def format_benchmark_table(rows: list[dict]) -> str:
    """One line per case: seconds, iterations, working grid and the re-simulated Dice."""
    lines = [f"{'case':34s} {'seconds':>8s} {'iters':>6s}  {'working grid':18s} "
             f"{'Dice core':>9s} {'Dice edema':>10s}"]
    for r in rows:
        grid = "x".join(str(n) for n in r["working_shape"]) + f" @ {r['working_spacing_mm'][0]:g} mm"
        lines.append(f"{r['case']:34s} {r['seconds']:8.1f} {r['iterations']:6d}  {grid:18s} "
                     f"{r['dice_core']:9.3f} {r['dice_edema']:10.3f}")
    return "\n".join(lines)
