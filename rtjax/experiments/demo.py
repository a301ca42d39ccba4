"""`rtjax demo`: a synthetic patient grown in the MNI152 atlas, end to end on the CPU.

1. A tumour is grown with hidden parameters on the atlas tissue; the imaging model gives
   the visible necrosis, enhancing core and edema (the segmentation a clinic would have).
2. The visible core is resected and the residual (invisible) tumour regrows for
   `recurrence_days`; the recurrence is the new enhancing tumour outside the cavity.
3. MR-like T1c and FLAIR are rendered from the density and the atlas tissue
   (`rtjax.seg.synth.render_case`, fixed seed, `DEMO_RENDER`: no bias field, as a
   bias-corrected scan).
4. That case folder (`case/`: seg, wm, gm, t1c, flair, recurrence; the hidden truth in
   `truth/`) goes through `rtjax run`: the fit (inverse network + refinement), the standard
   15 mm CTV, the iso-volumetric model CTV and the recurrence coverage of both (`results/`).
5. The segmentation network segments the rendered images (`network_segmentation/`), scored
   against the imaging model's masks. The fit uses the case's `seg`, as a user's case with
   a seg would (`rtjax run` segments only a case without one).

The atlas is the patient's anatomy, so no registration is needed.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import yaml

from growth import FKParams, solve_fk, visible_masks
from rtjax.io import load_tumour_masks, save_image
from rtjax.labels import TumourMasks, combine_labels, get_convention, split_labels
from rtjax.metrics import dice
from rtjax.pipeline import run_case
from rtjax.provenance import write_json_atomic
from rtjax.seg.infer import load_weights, segment_case, write_segmentation
from rtjax.seg.synth import RenderConfig, render_case
from rtjax.simulate import box_simulator, load_tissue, simulate_density

__all__ = [
    "DEMO_PATIENT",
    "DEMO_RENDER",
    "load_patient_config",
    "visible_tumour",
    "grow_density",
    "regrow",
    "simulate_recurrence",
    "write_case",
    "segment_demo_case",
    "run_demo",
    "demo_summary",
]

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


#: How the demo patient's T1c and FLAIR are rendered: the training renderer's contrasts, blur
#: and noise without its random bias field, i.e. a bias-corrected scan (BraTS data are
#: N4-corrected). With the field (log-amplitude 0.3 at seed 0) the right cerebellum came out
#: brighter on FLAIR than the edema, the network took it for the tumour, and the
#: main-component rule then dropped the real one (Dice WT 0.000).
DEMO_RENDER = RenderConfig(bias=0.0)


def load_patient_config(path: str | Path) -> dict:
    """Read a YAML mapping that overrides keys of `DEMO_PATIENT`; unknown keys are errors."""

    with open(path) as handle:
        config = yaml.safe_load(handle) or {}
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a mapping of demo patient settings")
    unknown = sorted(set(config) - set(DEMO_PATIENT))
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; known: {sorted(DEMO_PATIENT)}")
    return config


def visible_tumour(density: np.ndarray, patient: dict):
    """The imaging model's segmentation of a density (X, Y, Z) in [0, 1]: core where
    c >= u_t1 (necrosis where c >= u_necrosis, enhancing elsewhere), edema where
    u_fl <= c < u_t1; thresholds from the `patient` mapping (keys of `DEMO_PATIENT`)."""

    core, edema = (np.asarray(m) for m in visible_masks(density, patient["u_t1"], patient["u_fl"]))
    necrosis = density >= patient["u_necrosis"]
    return TumourMasks(necrosis=necrosis, enhancing=core & ~necrosis, edema=edema)


def grow_density(sim, box, initial: np.ndarray, patient: dict, days: float) -> np.ndarray:
    """Grow a full-grid density `initial` (X, Y, Z) in [0, 1] for `days` days with the
    patient's dw, rho and ratio on `sim` (`rtjax.simulate.box_simulator` on `box`, built for at
    least `days`); returns the full-grid density, float32. Calls with new values reuse one
    compiled solve."""


    params = FKParams(jnp.float32(patient["dw"]), jnp.float32(patient["rho"]),
                      jnp.float32(patient["ratio"]))
    grown = solve_fk(jnp.asarray(initial[box], jnp.float32), sim.diffusion(params), params.rho,
                     days, dt=sim.dt, max_steps=sim.max_steps)
    out = np.zeros(initial.shape, np.float32)
    out[box] = np.asarray(grown)
    return out


def regrow(sim, box, density: np.ndarray, resected: np.ndarray, patient: dict) -> np.ndarray:
    """Grow the residual density (the `resected` voxels emptied) for the patient's
    `recurrence_days` (`grow_density`); returns the full-grid density, float32."""
    residual = np.where(resected, 0.0, density)
    return grow_density(sim, box, residual, patient, patient["recurrence_days"])


def simulate_recurrence(sim, box, density: np.ndarray, core: np.ndarray,
                        patient: dict) -> np.ndarray:
    """The recurrence after resection of the visible `core`: the residual tumour regrown
    (`regrow`) and seen on T1c (c >= u_t1), outside the resection cavity; bool (X, Y, Z)."""
    return (regrow(sim, box, density, core, patient) >= patient["u_t1"]) & ~core


def write_case(case_dir, reference, masks, tissue, recurrence, **extra) -> list[Path]:
    """Write a case folder that `rtjax run` reads: `seg` (BraTS 2021 labels), `wm`, `gm`,
    `recurrence`, and each `extra` name -> (array, save kind), e.g. `brain_mask` or `csf`.
    Arrays are canonical on `reference`'s grid; returns the paths written."""

    case_dir = Path(case_dir)
    images = {"seg": (combine_labels(masks, get_convention("brats2021")), "label"),
              "wm": (tissue.wm.data, "float"), "gm": (tissue.gm.data, "float"),
              "recurrence": (recurrence, "mask"), **extra}
    return [save_image(array, reference, case_dir / f"{name}.nii.gz", kind=kind)
            for name, (array, kind) in images.items()]


def segment_demo_case(case_dir, out_dir) -> list[Path]:
    """Segment a case folder's t1c/flair with the shipped network and score it against the
    folder's `seg` (BraTS 2021 labels): writes `segmentation.nii.gz` and `network.json`
    (Dice per region WT, TC, ET, the weights version and, when the weights carry one, their
    cross-validated mean Dice on real cases from their metrics.json) into `out_dir`."""

    weights = load_weights()
    metrics = Path(weights.path) / "metrics.json" if weights.path else None
    stored = json.loads(metrics.read_text()).get("mean", {}) if metrics and metrics.is_file() else {}
    cross_validated = {r: stored[f"dice_{r}"] for r in ("WT", "TC", "ET") if f"dice_{r}" in stored}
    labels, _, reference = segment_case(case_dir, weights=weights)
    found = split_labels(labels, "brats2021")
    given, _ = load_tumour_masks(Path(case_dir) / "seg.nii.gz", "brats2021")
    scores = {region: dice(getattr(found, attr), getattr(given, attr))
              for region, attr in (("WT", "whole"), ("TC", "core"), ("ET", "enhancing"))}
    return [*write_segmentation(out_dir, labels, None, reference),
            write_json_atomic(Path(out_dir) / "network.json",
                              {"weights_version": weights.version, "dice_against_seg": scores,
                               "cross_validated_dice_real_cases": cross_validated})]


def run_demo(out_dir: str | Path, patient: dict | None = None, *, progress: bool = True) -> list[Path]:
    """Simulate the demo patient, run the pipeline on it, write everything into `out_dir`.

    Returns the paths written (truth, case inputs and the pipeline's results).
    """

    patient = {**DEMO_PATIENT, **(patient or {})}
    out_dir = Path(out_dir)
    tissue = load_tissue(atlas="mni152")
    ref = tissue.reference
    truth = simulate_density(
        tissue, dw=patient["dw"], rho=patient["rho"], days=patient["days"],
        ratio=patient["ratio"], origin_mm=patient["origin_mm"], progress=progress,
    )
    density = truth.density
    masks = visible_tumour(density, patient)
    sim, box = box_simulator(tissue, dw_max=patient["dw"], t_max=patient["recurrence_days"])
    recurrence = simulate_recurrence(sim, box, density, masks.core, patient)
    t1c, flair = render_case(density, tissue.wm.data, tissue.gm.data, ref.spacing, seed=0,
                             thresholds=(patient["u_fl"], patient["u_t1"], patient["u_necrosis"]),
                             config=DEMO_RENDER)

    case = out_dir / "case"
    paths = [
        *write_case(case, ref, masks, tissue, recurrence, t1c=(t1c, "float"), flair=(flair, "float")),
        save_image(density, ref, out_dir / "truth" / "density_true.nii.gz", kind="density"),
        write_json_atomic(out_dir / "truth" / "patient.json",
                          {"patient": patient, "simulation": truth.info,
                           "recurrence_volume_ml": float(recurrence.sum() * np.prod(ref.spacing) / 1000)}),
    ]
    results = out_dir / "results"
    summary = run_case(case, results, labels="brats2021", overwrite=True, progress=progress)
    paths += [results / name for name in summary["outputs"]]
    paths += segment_demo_case(case, out_dir / "network_segmentation")
    return paths


def demo_summary(out_dir: str | Path) -> str:
    """A few lines on the demo's outcome: fit quality, CTV volumes and coverages."""

    done = json.loads((Path(out_dir) / "results" / "done.json").read_text())
    lines = [f"fit: Dice core {done['dice_core']:.3f}, edema {done['dice_edema']:.3f}; "
             f"standard CTV {done['standard_volume_ml']:.1f} mL, "
             f"model CTV {done['model_volume_ml']:.1f} mL (cutoff {done['cutoff']:.3g})"]
    coverage = done.get("coverage")
    if coverage:
        lines.append(f"recurrence coverage: standard {coverage['standard_coverage']:.3f}, "
                     f"model {coverage['model_coverage']:.3f}")
    network = Path(out_dir) / "network_segmentation" / "network.json"
    if network.exists():
        scores = json.loads(network.read_text())
        dice = scores["dice_against_seg"]
        real = scores.get("cross_validated_dice_real_cases") or {}
        on_real = (f"cross-validated on real BraTS cases: Dice WT {real['WT']:.3f}, TC {real['TC']:.3f}, "
                   f"ET {real['ET']:.3f} (docs/segmentation.md); " if len(real) == 3 else "")
        lines.append(f"segmentation network {scores['weights_version']}: {on_real}on the demo's rendered "
                     f"T1c/FLAIR against its seg: Dice WT {dice['WT']:.3f}, TC {dice['TC']:.3f}, "
                     f"ET {dice['ET']:.3f} (the fit above uses the case's seg, as a user's case with a "
                     "seg would)")
    return "\n".join(lines)
