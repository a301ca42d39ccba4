"""Held-out evaluation of the fit: the inverse network alone versus network + refinement.

Cases come from the training generator (`growth.inverse.iterate_simulations`) with a seed
the training never used; each is observed through its own thresholds, fitted with
`rtjax.fit.fit_case` (0 refinement iterations = the network alone), and the fitted density
is compared with the true one by Dice at several density levels.
"""

from __future__ import annotations

import time

import numpy as np

__all__ = ["LEVELS", "evaluate_fit", "format_fit_table"]

#: Density levels at which fitted and true densities are compared.
LEVELS = (0.001, 0.1, 0.25, 0.6)


def evaluate_fit(n_cases: int = 20, *, seed: int = 90_210, iterations: int = 100) -> dict:
    """Per-case Dice at `LEVELS` and parameter errors for the network and the refinement."""
    import warnings

    from growth.fit import FitConfig, dice
    from growth.inverse import iterate_simulations
    from rtjax.fit import fit_case
    from rtjax.inverse_model import load_atlas, load_weights
    from rtjax.labels import TumourMasks

    weights = load_weights()
    cfg = weights.config.generator
    atlas_wm, atlas_gm, atlas_spacing = load_atlas()
    stream = iterate_simulations(cfg, atlas_wm, atlas_gm, atlas_spacing, seed=seed, batch_size=8)
    rows = []
    spacing = (cfg.net_spacing,) * 3
    while len(rows) < n_cases:
        batch = next(stream)
        for i in range(len(batch["density"])):
            if len(rows) == n_cases:
                break
            truth = np.asarray(batch["density"][i], np.float32)
            u_t1, u_fl = float(batch["u_t1"][i]), float(batch["u_fl"][i])
            core = truth >= u_t1
            masks = TumourMasks(necrosis=np.zeros_like(core), enhancing=core,
                                edema=(truth >= u_fl) & ~core)
            row = {"sqrt_dw_t": float(batch["sqrt_dw_t"][i]), "sqrt_rho_t": float(batch["sqrt_rho_t"][i])}
            for name, its in (("network", 0), ("refined", iterations)):
                start = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    fit = fit_case(masks, batch["wm"][i], batch["gm"][i], spacing,
                                   initial="network", config=FitConfig(max_iterations=its))
                est = fit.info["scaled_parameters"]
                row[name] = {
                    "dice": [dice(fit.density >= u, truth >= u) for u in LEVELS],
                    "sqrt_dw_t_error": abs(est["sqrt_dw_t_mm"] - row["sqrt_dw_t"]),
                    "sqrt_rho_t_error": abs(est["sqrt_rho_t"] - row["sqrt_rho_t"]),
                    "seconds": time.perf_counter() - start,
                }
            rows.append(row)
    return {"levels": list(LEVELS), "cases": rows, "seed": seed, "iterations": iterations,
            "weights_version": weights.version}


def format_fit_table(result: dict) -> str:
    """Mean Dice per level and mean parameter errors, network alone vs refined."""
    header = "stage      " + " ".join(f"Dice c>={u:<6}" for u in result["levels"])
    header += "  |sqrt(DwT)| err  |sqrt(rhoT)| err  s/case"
    lines = [f"{len(result['cases'])} held-out simulated cases (seed {result['seed']}, "
             f"weights {result['weights_version']})", header]
    for stage in ("network", "refined"):
        d = np.mean([c[stage]["dice"] for c in result["cases"]], axis=0)
        e_dw = np.mean([c[stage]["sqrt_dw_t_error"] for c in result["cases"]])
        e_rho = np.mean([c[stage]["sqrt_rho_t_error"] for c in result["cases"]])
        sec = np.mean([c[stage]["seconds"] for c in result["cases"]])
        lines.append(f"{stage:10s} " + " ".join(f"{v:<13.3f}" for v in d)
                     + f"  {e_dw:14.2f}  {e_rho:15.2f}  {sec:6.1f}")
    return "\n".join(lines)
