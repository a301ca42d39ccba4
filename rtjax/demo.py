"""`rtjax demo`: a synthetic patient grown in the MNI152 atlas, end to end on the CPU.

What it runs today: the forward FK model on the atlas tissue, the imaging model (which
densities show as enhancing core and as edema on T1c/FLAIR), and the outputs a case run
writes (density, segmentation, parameters, figure), on the atlas grid.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["DEMO_PATIENT", "load_patient_config", "run_demo"]

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


def run_demo(out_dir: str | Path, patient: dict | None = None) -> list[Path]:
    """Simulate the demo patient and write its outputs into `out_dir`; returns the paths."""
    from growth import visible_masks
    from rtjax.figures import save_density_overview
    from rtjax.io import save_image
    from rtjax.labels import TumourMasks, combine_labels, get_convention
    from rtjax.provenance import run_metadata, write_json_atomic
    from rtjax.simulate import load_tissue, simulate_density

    patient = {**DEMO_PATIENT, **(patient or {})}
    out_dir = Path(out_dir)
    tissue = load_tissue(atlas="mni152")
    result = simulate_density(
        tissue, dw=patient["dw"], rho=patient["rho"], days=patient["days"],
        ratio=patient["ratio"], origin_mm=patient["origin_mm"], progress=True,
    )
    density = result.density
    core, edema = (np.asarray(m) for m in visible_masks(density, patient["u_t1"], patient["u_fl"]))
    necrosis = density >= patient["u_necrosis"]
    masks = TumourMasks(necrosis=necrosis, enhancing=core & ~necrosis, edema=edema)
    labels = combine_labels(masks, get_convention("brats2021"))

    ref = tissue.reference
    paths = [
        save_image(density, ref, out_dir / "density.nii.gz", kind="density"),
        save_image(labels, ref, out_dir / "segmentation.nii.gz", kind="label"),
    ]
    voxel_ml = float(np.prod(ref.spacing)) / 1000.0
    summary = {
        "patient": patient,
        "label_convention": "brats2021",
        "volumes_ml": {
            "necrosis": float(necrosis.sum() * voxel_ml),
            "enhancing": float(masks.enhancing.sum() * voxel_ml),
            "edema": float(edema.sum() * voxel_ml),
        },
        "simulation": result.info,
        **run_metadata(),
    }
    paths.append(write_json_atomic(out_dir / "params.json", summary))
    centre = tuple(int(round(v)) for v in result.info["origin_canonical_voxel"])
    paths.append(save_density_overview(
        tissue.wm.data + 0.5 * tissue.gm.data, density, core, edema, centre,
        out_dir / "report.png",
        title=f"demo patient: Dw={patient['dw']} mm²/day, rho={patient['rho']}/day, "
              f"{patient['days']:.0f} days",
    ))
    return paths
