"""`rtjax demo`: a synthetic patient grown in the MNI152 atlas, end to end on the CPU.

1. A tumour is grown with hidden parameters on the atlas tissue; the imaging model gives
   the visible necrosis, enhancing core and edema (the segmentation a clinic would have).
2. The visible core is resected and the residual (invisible) tumour regrows for
   `recurrence_days`; the recurrence is the new enhancing tumour outside the cavity.
3. That case folder (`case/`: seg, wm, gm, recurrence; the hidden truth in `truth/`) goes
   through `rtjax run`: the fit (inverse network + refinement), the standard 15 mm CTV,
   the iso-volumetric model CTV and the recurrence coverage of both (`results/`).

Not yet in it: images rendered from the tumour and the segmentation network (the
segmentation is the imaging model's), and atlas registration (the atlas is the anatomy).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["DEMO_PATIENT", "load_patient_config", "run_demo", "demo_summary"]

#: The built-in synthetic patient: a left frontal white-matter tumour.
DEMO_PATIENT = {
    "origin_mm": (-28.0, 10.0, 24.0),
    "dw": 0.25,  # mm^2/day
    "rho": 0.03,  # 1/day
    "ratio": 10.0,
    "days": 200.0,
    "u_t1": 0.6,  # density visible as enhancing core on T1c
    "u_fl": 0.2,  # density visible as edema on FLAIR
    "u_necrosis": 0.95,  # saturated centre shown as necrosis
    "recurrence_days": 90.0,  # regrowth after resection of the visible core
}


def load_patient_config(path: str | Path) -> dict:
    """Read a YAML mapping that overrides keys of `DEMO_PATIENT`; unknown keys are errors."""
    import yaml

    with open(path) as handle:
        config = yaml.safe_load(handle) or {}
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a mapping of demo patient settings")
    unknown = sorted(set(config) - set(DEMO_PATIENT))
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; known: {sorted(DEMO_PATIENT)}")
    return config


def _regrow(tissue, density, resected, patient) -> np.ndarray:
    """Grow the residual density (the resected voxels emptied) for `recurrence_days`."""
    import jax.numpy as jnp

    from growth import FKParams, FKSimulator, Grid, solve_fk
    from rtjax.io import bounding_box

    wm, gm = tissue.wm.data, tissue.gm.data
    box = bounding_box(wm + gm > 0, pad=1)
    grid = Grid(tuple(s.stop - s.start for s in box), tissue.reference.spacing)
    sim = FKSimulator.create(wm[box], gm[box], grid, dw_max=patient["dw"],
                             t_max=patient["recurrence_days"])
    params = FKParams(jnp.float32(patient["dw"]), jnp.float32(patient["rho"]),
                      jnp.float32(patient["ratio"]))
    residual = np.where(resected, 0.0, density)[box].astype(np.float32)
    regrown = solve_fk(jnp.asarray(residual), sim.diffusion(params), params.rho,
                       patient["recurrence_days"], dt=sim.dt, max_steps=sim.max_steps)
    out = np.zeros_like(density)
    out[box] = np.asarray(regrown)
    return out


def run_demo(out_dir: str | Path, patient: dict | None = None, *, progress: bool = True) -> list[Path]:
    """Simulate the demo patient, run the pipeline on it, write everything into `out_dir`.

    Returns the paths written (truth, case inputs and the pipeline's results).
    """
    from growth import visible_masks
    from rtjax.io import save_image
    from rtjax.labels import TumourMasks, combine_labels, get_convention
    from rtjax.pipeline import run_case
    from rtjax.provenance import write_json_atomic
    from rtjax.simulate import load_tissue, simulate_density

    patient = {**DEMO_PATIENT, **(patient or {})}
    out_dir = Path(out_dir)
    tissue = load_tissue(atlas="mni152")
    ref = tissue.reference
    truth = simulate_density(
        tissue, dw=patient["dw"], rho=patient["rho"], days=patient["days"],
        ratio=patient["ratio"], origin_mm=patient["origin_mm"], progress=progress,
    )
    density = truth.density
    core, edema = (np.asarray(m) for m in visible_masks(density, patient["u_t1"], patient["u_fl"]))
    necrosis = density >= patient["u_necrosis"]
    masks = TumourMasks(necrosis=necrosis, enhancing=core & ~necrosis, edema=edema)
    regrown = _regrow(tissue, density, core, patient)
    recurrence = (regrown >= patient["u_t1"]) & ~core

    case = out_dir / "case"
    paths = [
        save_image(combine_labels(masks, get_convention("brats2021")), ref,
                   case / "seg.nii.gz", kind="label"),
        save_image(tissue.wm.data, ref, case / "wm.nii.gz", kind="float"),
        save_image(tissue.gm.data, ref, case / "gm.nii.gz", kind="float"),
        save_image(recurrence, ref, case / "recurrence.nii.gz", kind="mask"),
        save_image(density, ref, out_dir / "truth" / "density_true.nii.gz", kind="density"),
        write_json_atomic(out_dir / "truth" / "patient.json",
                          {"patient": patient, "simulation": truth.info,
                           "recurrence_volume_ml": float(recurrence.sum() * np.prod(ref.spacing) / 1000)}),
    ]
    results = out_dir / "results"
    summary = run_case(case, results, labels="brats2021", progress=progress)
    paths += [results / name for name in summary["outputs"]]
    return paths


def demo_summary(out_dir: str | Path) -> str:
    """A few lines on the demo's outcome: fit quality, CTV volumes and coverages."""
    import json

    done = json.loads((Path(out_dir) / "results" / "done.json").read_text())
    lines = [f"fit: Dice core {done['dice_core']:.3f}, edema {done['dice_edema']:.3f}; "
             f"standard CTV {done['standard_volume_ml']:.1f} mL, "
             f"model CTV {done['model_volume_ml']:.1f} mL (cutoff {done['cutoff']:.3g})"]
    coverage = done.get("coverage")
    if coverage:
        lines.append(f"recurrence coverage: standard {coverage['standard_coverage']:.3f}, "
                     f"model {coverage['model_coverage']:.3f}")
    return "\n".join(lines)
