"""Synthetic cohort study: recurrence coverage of the standard, model and oracle CTVs.

The truth differs from the fitted model (or, in the anisotropic arms, only its DTI may). Each synthetic patient lives in the MNI152 atlas
(nilearn's WM/GM, the ICBM152 CSF map and brain mask, block-averaged to a coarser grid,
2 mm by default); the tumour grows from a random origin in brain tissue with random Dw, rho
and T (:class:`ParameterRanges`), anisotropically along the TractSeg DTI fibres
(``dti/tractseg`` FA + peaks, resampled onto the grid by
:func:`rtjax.simulate.load_shape_tensor`; isotropic outside the DTI brain mask, or
everywhere with ``isotropic_truth``). The imaging model with random thresholds gives the
visible necrosis / enhancing core / edema; the visible core is resected and the residual
tumour regrows for a random time, the recurrence being the new T1c-visible tumour outside
the cavity (:func:`rtjax.experiments.demo.simulate_recurrence`, the demo's model). The pipeline
(:func:`rtjax.pipeline.run_cohort`) then fits the *isotropic* model to each case.

Per patient, at equal volume (the 15 mm standard CTV's, within 1 %):

- standard CTV: core + 15 mm inside the brain;
- model CTV: fitted density >= the iso-volumetric cutoff;
- oracle CTV: *true* pre-operative density >= its iso-volumetric cutoff (what a perfect
  growth model would give with this CTV construction: the reference upper bound, though
  not a strict bound for every patient);

their recurrence coverages, the coverage-versus-volume curves of the families and the
smallest volumes covering 95 % / 100 % of the recurrence (:func:`rtjax.study.case_coverage`).

Fitted arms (``arms``): ``model`` is the isotropic fit; with anisotropic truth two more
arms fit the anisotropic model through the pipeline's DTI input (`rtjax run --tensor`,
r fitted in ``anisotropy_range``): ``anisotropic`` with the truth's own DTI (the TractSeg
tensor on the study grid, ``OUT_DIR/dti/subject_tensor.nii.gz``), ``mismatch`` with that
DTI perturbed (:func:`perturb_tensor`: every voxel's tensor rotated by a smooth random
rotation field of ``perturbation_deg`` degrees rms, ``dti/perturbed_tensor.nii.gz``),
because a real patient's DTI is noisy and never the one the tumour grew along. Each arm
also scores its fitted density against the true one (Dice at ``DICE_LEVELS``).
Cohort: one CSV row per patient, summary rows, paired Wilcoxon signed-rank tests (model vs
standard, oracle vs standard, oracle vs model; :func:`rtjax.study.paired_test`) and a figure.

Each patient is fitted as soon as it is generated. Output layout of
:func:`run_cohort_study` (resumable: finished patients and fits are kept)::

    OUT_DIR/study.json            settings, versions; a rerun must use the same settings
    OUT_DIR/cases/patient_NNN/    seg, wm, gm, csf, brain_mask, recurrence (`rtjax run` input)
    OUT_DIR/truth/patient_NNN/    density_true.nii.gz, patient.json (hidden parameters)
    OUT_DIR/results/              run_cohort's outputs (per case, summary.csv, statistics)
    OUT_DIR/results_<arm>/        the same for the anisotropic arms; OUT_DIR/dti/ their DTI
    OUT_DIR/cohort_study.csv      one row per patient
    OUT_DIR/cohort_study_summary.csv, cohort_study_statistics.json, cohort_study.png
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy.ndimage import distance_transform_edt, gaussian_filter
from tqdm import tqdm

from growth.tensor import components_to_matrix, matrix_to_components
from rtjax.atlas import atlas_tissue_paths
from rtjax.ctv import cutoff_ctvs, density_family, margin_family
from rtjax.data import data_root as default_data_root
from rtjax.experiments.demo import grow_density, simulate_recurrence, visible_tumour, write_case
from rtjax.fit import block_average
from rtjax.io import Image, check_same_grid, load_image, save_image
from rtjax.metrics import dice
from rtjax.pipeline import run_cohort
from rtjax.pipeline.inputs import load_segmented_case
from rtjax.plotting import headless_pyplot, save_figure
from rtjax.provenance import run_metadata, write_json_atomic, write_text_atomic
from rtjax.simulate import Tissue, box_simulator, load_shape_tensor, load_tissue, resolve_origin
from rtjax.study import case_coverage, exact_coverage_curve, paired_test
from rtjax.study import coverage as coverage_of
from rtjax.tensor_io import load_tensor_fa_peaks, resample_tensor, save_tensor_fsl

__all__ = [
    "FAMILIES",
    "ARMS",
    "DICE_LEVELS",
    "perturb_tensor",
    "ParameterRanges",
    "CohortAnatomy",
    "downsample_image",
    "load_cohort_anatomy",
    "origin_candidates",
    "sample_patient",
    "grow_tumour",
    "generate_patient",
    "generate_cohort",
    "PatientEvaluation",
    "evaluate_patient",
    "relative_coverage",
    "COMPARISONS",
    "TESTED",
    "cohort_tests",
    "summary_rows",
    "cutoff_rows",
    "format_cutoff_table",
    "write_study_outputs",
    "plot_cohort_study",
    "format_study_table",
    "run_cohort_study",
]

#: The three CTV families of the basic study (the isotropic fit's arm only).
FAMILIES = ("standard", "model", "oracle")
#: The fitted arms: the isotropic fit, and the anisotropic fit with the truth's DTI or a
#: perturbed one (the families between "model" and "oracle").
ARMS = ("model", "anisotropic", "mismatch")
#: Density levels of the Dice between each fitted and the true density.
DICE_LEVELS = (0.001, 0.1)

#: Relative volumes (CTV volume / the patient's standard CTV volume) of the mean curves.
RELATIVE_VOLUMES = np.linspace(0.0, 1.5, 301)

#: A second operating point below the standard volume, where a 15 mm margin's near-full
#: coverage no longer hides the differences: half the standard CTV's volume.
HALF_VOLUME = 0.5


@dataclass(frozen=True)
class ParameterRanges:
    """Ranges of the hidden parameters of a synthetic patient (glioblastoma-like).

    Attributes:
        dw: white-matter diffusivity, mm^2/day, sampled log-uniformly.
        rho: proliferation rate, 1/day, log-uniformly.
        days: growth time before the pre-operative scan, days, uniformly.
        recurrence_days: regrowth time after resection, days, uniformly.
        u_t1: density visible as core on T1c, uniformly.
        u_fl: density visible on FLAIR, uniformly.
        ratio: Dw / Dg (fixed).
        u_necrosis: density shown as necrosis (fixed).
        min_tissue: the origin's voxel has wm + gm >= this.
        min_depth_mm: the origin lies at least this far inside the brain mask, mm.
        core_ml: accepted visible core volume (necrosis + enhancing), mL; a patient outside
            this range, or with an empty recurrence, is drawn again.
        max_visible_ml: largest accepted visible tumour (core + edema), mL.
        max_draws: draws per patient before giving up.
    """

    dw: tuple[float, float] = (0.05, 0.25)
    rho: tuple[float, float] = (0.025, 0.05)
    days: tuple[float, float] = (150.0, 300.0)
    recurrence_days: tuple[float, float] = (30.0, 90.0)
    u_t1: tuple[float, float] = (0.55, 0.75)
    u_fl: tuple[float, float] = (0.15, 0.35)
    ratio: float = 10.0
    u_necrosis: float = 0.95
    min_tissue: float = 0.9
    min_depth_mm: float = 15.0
    core_ml: tuple[float, float] = (3.0, 80.0)
    max_visible_ml: float = 200.0
    max_draws: int = 8

    @property
    def t_max(self) -> float:
        """The longest simulated time, days (the simulator is built for it)."""
        return max(self.days[1], self.recurrence_days[1])


# --------------------------------------------------------------------------- anatomy


@dataclass(frozen=True, eq=False)
class CohortAnatomy:
    """The shared anatomy of the cohort on the study grid (canonical RAS arrays).

    Attributes:
        tissue: WM / GM probabilities (CSF-dominated voxels and voxels outside the brain
            mask removed); ``tissue.reference`` is the study grid.
        csf: (X, Y, Z) CSF probability.
        brain: (X, Y, Z) bool brain mask.
        shape_tensor: the DTI growth shape tensor, None for isotropic truth.
        dti: the DTI it was built from, (6, X, Y, Z) on the study grid (canonical voxel
            frame), None for isotropic truth.
    """

    tissue: Any
    csf: np.ndarray
    brain: np.ndarray
    shape_tensor: Any = None
    dti: np.ndarray | None = None

    @property
    def reference(self):
        return self.tissue.reference


def downsample_image(image, factor: int):
    """Block-average a canonical image by an integer `factor` per axis (zero-padded up to a
    multiple): a new Image of spacing `factor` x the old one whose voxel centres are the
    block centres (RAS, no original-geometry to return to)."""

    factor = int(factor)
    if factor < 1:
        raise ValueError(f"factor must be a positive integer, got {factor}")
    linear = image.affine[:3, :3]
    affine = np.eye(4)
    affine[:3, :3] = linear * factor
    affine[:3, 3] = image.affine[:3, 3] + linear @ np.full(3, (factor - 1) / 2)
    return Image.from_array(block_average(image.data, (factor,) * 3), affine)


def load_cohort_anatomy(
    data_root,
    *,
    factor: int = 2,
    isotropic: bool = False,
    anisotropy: float = 5.0,
):
    """The MNI152 anatomy on a `factor` mm grid, with the TractSeg DTI shape tensor.

    WM/GM come from nilearn (:func:`rtjax.atlas.atlas_tissue_paths`), CSF and the brain
    mask from ``atlas/mni152`` under `data_root` (same 1 mm grid); CSF-dominated voxels
    lose their tissue (:func:`rtjax.simulate.load_tissue`), then everything is
    block-averaged (brain: block fraction >= 0.5) and tissue outside the brain is removed.
    The tensor (``dti/tractseg`` FA + peaks) is resampled onto the grid with `anisotropy`
    (:func:`rtjax.simulate.load_shape_tensor`); skipped with `isotropic`.
    """

    root = Path(data_root)
    atlas = root / "atlas" / "mni152"
    csf_path = atlas / "mni_icbm152_csf_pbmap.nii.gz"
    paths = atlas_tissue_paths("mni152")
    fine = load_tissue(wm=paths["wm"], gm=paths["gm"], csf=csf_path)
    csf = load_image(csf_path, kind="probability")
    brain = load_image(atlas / "mni_icbm152_t1_brain_mask.nii.gz", kind="mask")
    check_same_grid({"wm": fine.wm, "csf": csf, "brain_mask": brain})
    coarse = {name: downsample_image(image, factor) for name, image in
              (("wm", fine.wm), ("gm", fine.gm), ("csf", csf), ("brain", brain))}
    inside = coarse["brain"].data >= 0.5
    tissue = Tissue(
        wm=coarse["wm"].with_data((coarse["wm"].data * inside).astype(np.float32)),
        gm=coarse["gm"].with_data((coarse["gm"].data * inside).astype(np.float32)),
        sources={**fine.sources, "csf": str(csf_path), "block_average": f"{factor} voxels"},
    )
    shape = dti = None
    if not isotropic:
        folder = root / "dti" / "tractseg"
        shape = load_shape_tensor(tissue, fa=folder / "FA.nii.gz",
                                  peaks=folder / "peaks.nii.gz", anisotropy=anisotropy)
        dti = resample_tensor(*load_tensor_fa_peaks(folder / "FA.nii.gz", folder / "peaks.nii.gz"),
                              tissue.reference)
    return CohortAnatomy(tissue=tissue, csf=np.clip(coarse["csf"].data, 0, 1).astype(np.float32),
                         brain=inside, shape_tensor=shape, dti=dti)


def perturb_tensor(t6: np.ndarray, spacing, *, degrees_rms: float = 25.0, smooth_mm: float = 6.0,
                   seed: int = 0) -> np.ndarray:
    """A noisy version of a DTI (6, X, Y, Z): every voxel's tensor rotated, Q D Q^T, by a
    smooth random rotation (rotation vector: white noise smoothed by a Gaussian of
    ``smooth_mm``, scaled to ``degrees_rms`` rms angle), eigenvalues kept."""
    rng = np.random.default_rng(seed)
    sigma = [smooth_mm / h for h in spacing]
    field = np.stack([gaussian_filter(rng.normal(size=t6.shape[1:]), sigma) for _ in range(3)])
    angle = np.linalg.norm(field, axis=0)
    field *= np.deg2rad(degrees_rms) / max(float(np.sqrt((angle**2).mean())), 1e-12)
    q = np.asarray(jax.vmap(_rotation_matrix)(jnp.asarray(field.reshape(3, -1).T)))
    m = np.asarray(components_to_matrix(jnp.asarray(t6))).reshape(-1, 3, 3)
    rotated = np.einsum("nij,njk,nlk->nil", q, m, q)
    return np.asarray(matrix_to_components(jnp.asarray(rotated.reshape(*t6.shape[1:], 3, 3))), np.float32)


def _rotation_matrix(w):
    """Rodrigues: the rotation by |w| radians about w (3,) -> (3, 3)."""
    theta = jnp.linalg.norm(w)
    k = w / jnp.maximum(theta, 1e-12)
    kx = jnp.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    return jnp.eye(3) + jnp.sin(theta) * kx + (1.0 - jnp.cos(theta)) * (kx @ kx)


def origin_candidates(anatomy: CohortAnatomy, ranges: ParameterRanges) -> np.ndarray:
    """Canonical voxel indices (N, 3) where a tumour may start: wm + gm >= min_tissue and
    at least min_depth_mm inside the brain mask."""

    tissue = anatomy.tissue.wm.data + anatomy.tissue.gm.data
    depth = distance_transform_edt(anatomy.brain, sampling=anatomy.reference.spacing)
    found = np.argwhere((tissue >= ranges.min_tissue) & (depth >= ranges.min_depth_mm))
    if not len(found):
        raise ValueError("no voxel qualifies as a tumour origin: relax min_tissue / min_depth_mm")
    return found


# --------------------------------------------------------------------------- patients


def _log_uniform(rng, bounds) -> float:
    lo, hi = (math.log(b) for b in bounds)
    return float(math.exp(rng.uniform(lo, hi)))


def sample_patient(rng: np.random.Generator, reference, candidates: np.ndarray,
                   ranges: ParameterRanges) -> dict:
    """Draw one patient's hidden parameters: a mapping with the keys of
    :data:`rtjax.experiments.demo.DEMO_PATIENT` (origin in world mm, at a random candidate voxel centre
    jittered within the voxel; dw mm^2/day, rho 1/day, days, thresholds)."""
    voxel = candidates[rng.integers(len(candidates))] + rng.uniform(-0.5, 0.5, 3)
    origin = np.asarray(reference.voxel_to_world(voxel), float)
    return {
        "origin_mm": tuple(round(float(v), 3) for v in origin),
        "dw": _log_uniform(rng, ranges.dw),
        "rho": _log_uniform(rng, ranges.rho),
        "ratio": float(ranges.ratio),
        "days": float(rng.uniform(*ranges.days)),
        "u_t1": float(rng.uniform(*ranges.u_t1)),
        "u_fl": float(rng.uniform(*ranges.u_fl)),
        "u_necrosis": float(ranges.u_necrosis),
        "recurrence_days": float(rng.uniform(*ranges.recurrence_days)),
    }


def grow_tumour(sim, box, reference, patient: dict) -> np.ndarray:
    """The patient's pre-operative density (X, Y, Z, float32): the simulator's Gaussian
    seed at the patient's origin grown for `days` (:func:`rtjax.experiments.demo.grow_density`, the
    solve the recurrence reuses) on `sim` (:func:`rtjax.simulate.box_simulator` on `box`)."""

    index = resolve_origin(reference, origin_mm=patient["origin_mm"])
    corner = np.array([s.start for s in box], float)
    seed = np.zeros(reference.shape, np.float32)
    seed[box] = np.asarray(sim.initial_density((index - corner) * np.asarray(reference.spacing)))
    return grow_density(sim, box, seed, patient, patient["days"])


def _rejection(masks, recurrence, voxel_ml: float, ranges: ParameterRanges) -> str:
    """Why a drawn patient is rejected ("" when accepted)."""
    core_ml = float(masks.core.sum()) * voxel_ml
    visible_ml = core_ml + float(masks.edema.sum()) * voxel_ml
    if not ranges.core_ml[0] <= core_ml <= ranges.core_ml[1]:
        return f"core {core_ml:.1f} mL outside {ranges.core_ml}"
    if visible_ml > ranges.max_visible_ml:
        return f"visible tumour {visible_ml:.1f} mL > {ranges.max_visible_ml}"
    if not recurrence.any():
        return "empty recurrence"
    return ""


def generate_patient(case_dir, truth_dir, anatomy: CohortAnatomy, sim, box,
                     candidates: np.ndarray, rng: np.random.Generator,
                     ranges: ParameterRanges) -> dict:
    """Draw patients until one is accepted, then write its truth (density_true.nii.gz,
    patient.json) and its case folder (written as a hidden sibling, renamed when complete).

    Returns the patient.json record. Raises RuntimeError after `ranges.max_draws` draws.
    """

    case_dir, truth_dir = Path(case_dir), Path(truth_dir)
    ref = anatomy.reference
    rejected = []
    for _ in range(ranges.max_draws):
        patient = sample_patient(rng, ref, candidates, ranges)
        density = grow_tumour(sim, box, ref, patient)
        masks = visible_tumour(density, patient)
        recurrence = simulate_recurrence(sim, box, density, masks.core, patient)
        reason = _rejection(masks, recurrence, ref.voxel_volume_ml, ranges)
        if not reason:
            break
        rejected.append({"patient": patient, "reason": reason})
    else:
        raise RuntimeError(f"{case_dir.name}: no acceptable patient in {ranges.max_draws} "
                           f"draws: {[r['reason'] for r in rejected]}")
    ml = lambda m: float(np.count_nonzero(m)) * ref.voxel_volume_ml  # noqa: E731
    record = {
        "case": case_dir.name, "patient": patient,
        "anisotropic": None if anatomy.shape_tensor is None else anatomy.shape_tensor.info,
        "volumes_ml": {"core": ml(masks.core), "edema": ml(masks.edema),
                       "necrosis": ml(masks.necrosis), "recurrence": ml(recurrence),
                       "density>=0.01": ml(density >= 0.01)},
        "rejected_draws": rejected,
        "units": {"dw": "mm^2/day", "rho": "1/day", "days": "days", "origin_mm": "world mm"},
    }
    save_image(density, ref, truth_dir / "density_true.nii.gz", kind="density")
    partial = case_dir.with_name(f".{case_dir.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    write_case(partial, ref, masks, anatomy.tissue, recurrence,
               csf=(anatomy.csf, "float"), brain_mask=(anatomy.brain, "mask"))
    write_json_atomic(truth_dir / "patient.json", record)
    os.replace(partial, case_dir)
    return record


def _case_name(index: int) -> str:
    return f"patient_{index:03d}"


def _generated(out_dir: Path, name: str) -> bool:
    return ((out_dir / "cases" / name).is_dir()
            and (out_dir / "truth" / name / "patient.json").is_file())


def generate_cohort(out_dir, n: int, anatomy: CohortAnatomy | Callable[[], CohortAnatomy], *,
                    seed: int = 0, ranges: ParameterRanges = ParameterRanges(),
                    after_each: Callable[[str], Any] | None = None,
                    progress: bool = True) -> list[str]:
    """Generate patients 0..n-1 into ``out_dir/cases`` and ``out_dir/truth``; a patient
    whose case folder and patient.json exist is kept. Patient i draws from
    ``np.random.default_rng([seed, i])``, so a patient does not depend on n.

    Args:
        anatomy: the anatomy, or a function loading it (only called if a patient is missing).
        after_each: called with each new case's name once it is written (e.g. to fit it).

    Returns the case names, sorted.
    """


    out_dir = Path(out_dir)
    names = [_case_name(i) for i in range(int(n))]
    todo = [i for i, name in enumerate(names) if not _generated(out_dir, name)]
    if todo:
        anatomy = anatomy if isinstance(anatomy, CohortAnatomy) else anatomy()
        sim, box = box_simulator(anatomy.tissue, dw_max=ranges.dw[1], t_max=ranges.t_max,
                                 shape_tensor=anatomy.shape_tensor)
        candidates = origin_candidates(anatomy, ranges)
        for i in tqdm(todo, desc="patients", unit="patient", disable=not progress):
            generate_patient(out_dir / "cases" / names[i], out_dir / "truth" / names[i],
                             anatomy, sim, box, candidates, np.random.default_rng([seed, i]),
                             ranges)
            if after_each is not None:
                after_each(names[i])
    return names


# --------------------------------------------------------------------------- evaluation


@dataclass(frozen=True, eq=False)
class PatientEvaluation:
    """One patient's coverages at equal volume and coverage-volume curves.

    Attributes:
        case: the case name.
        model, oracle: :class:`rtjax.study.CaseCoverage` of the isotropic fit's and of the
            true density (both carry the standard CTV's numbers).
        curves: family name -> exact :class:`rtjax.study.CoverageCurve`.
        truth: the hidden parameters (patient.json's ``patient``).
        fit: the isotropic fit's case summary (done.json).
        arms: the other fitted arms (``anisotropic``, ``mismatch``) -> CaseCoverage.
        arm_fits: those arms' case summaries.
        dice: fitted family -> Dice of its density against the true one at DICE_LEVELS.
        cutoffs: density family (fitted arms, oracle) -> [(cutoff, CTV volume mL, recurrence
            coverage fraction)] of its cutoff CTVs (``density >= c`` in the brain).
    """

    case: str
    model: Any
    oracle: Any
    curves: dict
    truth: dict = field(default_factory=dict)
    fit: dict = field(default_factory=dict)
    arms: dict = field(default_factory=dict)
    arm_fits: dict = field(default_factory=dict)
    dice: dict = field(default_factory=dict)
    cutoffs: dict = field(default_factory=dict)

    @property
    def families(self) -> tuple[str, ...]:
        """standard, the fitted arms (model first), oracle."""
        return ("standard", "model", *self.arms, "oracle")

    def coverage(self, family: str):
        """The CaseCoverage whose ``model_*`` fields are the family's (standard: any)."""
        return {"standard": self.model, "model": self.model, "oracle": self.oracle, **self.arms}[family]

    def _family_row(self, fam: str) -> dict[str, Any]:
        c = self.coverage(fam)
        prefix = "standard" if fam == "standard" else "model"
        row = {f"{fam}_coverage": getattr(c, f"{prefix}_coverage"),
               f"{fam}_volume_ml": getattr(c, f"{prefix}_volume_ml")}
        for level in ("95", "100"):
            row[f"{fam}_volume_ml_for_{level}"] = getattr(c, f"{prefix}_volume_ml_for_{level}")
        row[f"{fam}_coverage_at_half_volume"] = float(relative_coverage(
            self.curves[fam], self.model.standard_volume_ml, [HALF_VOLUME])[0])
        if fam in self.dice:
            row.update({f"{fam}_dice_c{lvl:g}": d for lvl, d in zip(DICE_LEVELS, self.dice[fam])})
        if fam not in ("standard", "oracle"):
            row[f"{fam}_cutoff"] = c.cutoff
        if fam in self.arm_fits:
            fit = self.arm_fits[fam]
            row.update({f"{fam}_anisotropy": fit.get("anisotropy"),
                        f"{fam}_dice_core": fit.get("dice_core"),
                        f"{fam}_dice_edema": fit.get("dice_edema")})
        return row

    def row(self) -> dict[str, Any]:
        """The flat table row (volumes mL, coverages as fractions, parameters in mm, days)."""
        m, o, t = self.model, self.oracle, self.truth
        row = {
            "case": self.case,
            "true_dw_mm2_per_day": t.get("dw"), "true_rho_per_day": t.get("rho"),
            "true_days": t.get("days"), "recurrence_days": t.get("recurrence_days"),
            "true_sqrt_dw_t_mm": math.sqrt(t["dw"] * t["days"]) if t else None,
            "true_sqrt_rho_t": math.sqrt(t["rho"] * t["days"]) if t else None,
            "fit_sqrt_dw_t_mm": self.fit.get("sqrt_dw_t_mm"),
            "fit_sqrt_rho_t": self.fit.get("sqrt_rho_t"),
            "dice_core": self.fit.get("dice_core"), "dice_edema": self.fit.get("dice_edema"),
            "core_volume_ml": self.fit.get("core_volume_ml"),
            "edema_volume_ml": self.fit.get("edema_volume_ml"),
            "recurrence_volume_ml": m.recurrence_volume_ml,
            "standard_volume_ml": m.standard_volume_ml,
            "model_volume_ml": m.model_volume_ml,
            "oracle_volume_ml": o.model_volume_ml,
            "model_cutoff": m.cutoff, "oracle_cutoff": o.cutoff,
            "standard_coverage": m.standard_coverage,
            "model_coverage": m.model_coverage,
            "oracle_coverage": o.model_coverage,
        }
        for level in ("95", "100"):
            row[f"standard_volume_ml_for_{level}"] = getattr(m, f"standard_volume_ml_for_{level}")
            row[f"model_volume_ml_for_{level}"] = getattr(m, f"model_volume_ml_for_{level}")
            row[f"oracle_volume_ml_for_{level}"] = getattr(o, f"model_volume_ml_for_{level}")
        for fam in self.families:
            row.update({k: v for k, v in self._family_row(fam).items() if k not in row})
        return row


def _arm_dir(out_dir: Path, arm: str) -> Path:
    return out_dir / ("results" if arm == "model" else f"results_{arm}")


def evaluate_patient(case_dir, result_dir, truth_dir, *, margin_mm: float = 15.0,
                     arm_dirs: dict | None = None, cutoffs: Sequence[float] = ()) -> PatientEvaluation:
    """Coverages and curves of one patient from its files: the case (seg, brain_mask,
    recurrence), the pipeline's fitted ``density.nii.gz`` (``result_dir``: the isotropic
    arm; ``arm_dirs``: arm -> result folder of the other arms) and the true density; with
    `cutoffs`, the volume and coverage of every density's cutoff CTVs."""

    case_dir, result_dir, truth_dir = Path(case_dir), Path(result_dir), Path(truth_dir)
    _, _, masks, images = load_segmented_case(case_dir, labels="brats2021",
                                              extras=("brain_mask", "recurrence"))
    results = {"model": result_dir, **{a: Path(d) for a, d in (arm_dirs or {}).items()}}
    fitted = {a: load_image(d / "density.nii.gz", kind="probability") for a, d in results.items()}
    truth = load_image(truth_dir / "density_true.nii.gz", kind="probability")
    check_same_grid({"seg": images["seg"], **{f"{a} density": f for a, f in fitted.items()},
                     "true density": truth})
    ref = images["seg"]
    rec, brain, core = images["recurrence"].data, images["brain_mask"].data, masks.core
    common = (rec, core, brain)
    spacing, vox = ref.spacing, ref.voxel_volume_ml
    coverages = {a: case_coverage(case_dir.name, *common, f.data, spacing, vox, margin_mm=margin_mm)
                 for a, f in fitted.items()}
    oracle = case_coverage(case_dir.name, *common, truth.data, spacing, vox, margin_mm=margin_mm)
    families = (margin_family(core, brain, spacing, name="standard"),
                *(density_family(f.data, name=a) for a, f in fitted.items()),
                density_family(truth.data, name="oracle"))
    curves = {f.name: exact_coverage_curve(rec, f, vox) for f in families}
    record = json.loads((truth_dir / "patient.json").read_text())
    fits = {a: json.loads((d / "done.json").read_text()) for a, d in results.items()}
    for a, d in results.items():
        params = json.loads((d / "params.json").read_text())
        fits[a]["anisotropy"] = params["fit"].get("anisotropic", {}).get("anisotropy")
    scores = {a: [dice(f.data >= lvl, truth.data >= lvl) for lvl in DICE_LEVELS]
              for a, f in fitted.items()}
    in_brain = rec.astype(bool) & brain.astype(bool)
    by_cutoff = {a: [(c, float(m.sum()) * vox, coverage_of(in_brain, m))
                     for c, m in cutoff_ctvs(d, brain, cutoffs).items()]
                 for a, d in {**{a: f.data for a, f in fitted.items()}, "oracle": truth.data}.items()}
    return PatientEvaluation(case=case_dir.name, model=coverages.pop("model"), oracle=oracle,
                             curves=curves, truth=record["patient"], fit=fits.pop("model"),
                             arms=coverages, arm_fits=fits, dice=scores,
                             cutoffs=by_cutoff if cutoffs else {})


def relative_coverage(curve, standard_volume_ml: float, relative=RELATIVE_VOLUMES) -> np.ndarray:
    """The best coverage a family reaches with at most ``relative * standard_volume_ml``
    mL (0 below its smallest CTV): the step function of an exact curve on a common axis.
    Returns coverages (fractions), shape of `relative`."""
    relative = np.asarray(relative, float)
    volumes = np.asarray(curve.volumes_ml, float)  # non-decreasing: the CTVs are nested
    if not volumes.size:
        return np.zeros(relative.shape)
    best = np.maximum.accumulate(np.asarray(curve.coverages, float))
    index = np.searchsorted(volumes, relative * standard_volume_ml, side="right")
    return np.where(index > 0, best[np.maximum(index - 1, 0)], 0.0)


# --------------------------------------------------------------------------- cohort


#: The paired comparisons (first, second) of :func:`cohort_tests` of the basic study.
COMPARISONS = (("model", "standard"), ("oracle", "standard"), ("oracle", "model"))


def comparisons(families: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """The paired comparisons of a study with these families: :data:`COMPARISONS`, and for
    each extra arm: arm vs standard, arm vs the isotropic model, oracle vs arm (and the
    DTI mismatch vs the matched anisotropic fit)."""
    extra = [f for f in families if f not in FAMILIES]
    out = list(COMPARISONS)
    for arm in extra:
        out += [(arm, "standard"), (arm, "model"), ("oracle", arm)]
    if {"anisotropic", "mismatch"} <= set(extra):
        out.append(("mismatch", "anisotropic"))
    return tuple(out)


#: Coverage columns the tests compare: at equal volume, and at half of it.
TESTED = {"equal_volume": "{}_coverage", "half_volume": "{}_coverage_at_half_volume"}


def cohort_tests(evaluations: Sequence[PatientEvaluation], key: str = "{}_coverage") -> dict:
    """Paired Wilcoxon signed-rank tests (:func:`rtjax.study.paired_test`) of the row values
    ``key.format(family)`` (coverages) for :func:`comparisons` of the families, named
    ``first_vs_second``, median_difference = first - second. paired_test compares the
    ``model_coverage`` and ``standard_coverage`` fields of CaseCoverage records: each
    patient's record gets the first family's value in the former, the second's in the
    latter."""

    rows = [e.row() for e in evaluations]
    families = evaluations[0].families if evaluations else FAMILIES

    def pairs(first: str, second: str) -> list:
        return [dataclasses.replace(e.model, model_coverage=r[key.format(first)],
                                    standard_coverage=r[key.format(second)])
                for e, r in zip(evaluations, rows)]

    return {f"{a}_vs_{b}": paired_test(pairs(a, b)) for a, b in comparisons(families)}


def _stat(values, fn) -> float | None:
    values = [v for v in values if v is not None]
    return float(fn(values)) if values else None


def summary_rows(rows: Sequence[dict], families: Sequence[str] = FAMILIES) -> list[dict]:
    """One row per family: mean / median / min coverage at equal volume, the mean
    coverage at half that volume, the mean equal volume (mL), the median smallest
    volumes (mL) for 95 % / 100 % coverage with how many patients reach them, and for a
    fitted family the mean Dice of its density against the true one. Coverages as
    fractions."""
    out = []
    for fam in families:
        cov = [r[f"{fam}_coverage"] for r in rows]
        out.append({
            "family": fam, "patients": len(rows),
            "mean_coverage": _stat(cov, np.mean), "median_coverage": _stat(cov, np.median),
            "min_coverage": _stat(cov, np.min),
            "mean_coverage_at_half_volume": _stat([r[f"{fam}_coverage_at_half_volume"]
                                                   for r in rows], np.mean),
            "full_coverage_patients": sum(c >= 1.0 - 1e-12 for c in cov),
            "mean_volume_ml": _stat([r[f"{fam}_volume_ml"] for r in rows], np.mean),
            **{f"median_volume_ml_for_{lv}": _stat([r[f"{fam}_volume_ml_for_{lv}"] for r in rows],
                                                   np.median) for lv in ("95", "100")},
            **{f"patients_reaching_{lv}": sum(r[f"{fam}_volume_ml_for_{lv}"] is not None
                                             for r in rows) for lv in ("95", "100")},
            **{f"mean_dice_c{lvl:g}": _stat([r.get(f"{fam}_dice_c{lvl:g}") for r in rows], np.mean)
               for lvl in DICE_LEVELS},
        })
    return out


def cutoff_rows(evaluations: Sequence[PatientEvaluation]) -> list[dict]:
    """One row per density family and cutoff (Metz et al.'s design: CTVs at fixed density
    cutoffs instead of a fixed volume): patients, mean / median CTV volume (mL) and mean /
    median / min recurrence coverage (fractions), beside the 15 mm standard CTV's mean
    volume and coverage over the same patients. Empty without cutoffs."""
    with_cutoffs = [e for e in evaluations if e.cutoffs]
    if not with_cutoffs:
        return []
    standard = {"standard_mean_volume_ml": float(np.mean([e.model.standard_volume_ml for e in with_cutoffs])),
                "standard_mean_coverage": float(np.mean([e.model.standard_coverage for e in with_cutoffs]))}
    rows = []
    for fam in with_cutoffs[0].cutoffs:
        for k, (cutoff, _, _) in enumerate(with_cutoffs[0].cutoffs[fam]):
            volumes = [e.cutoffs[fam][k][1] for e in with_cutoffs]
            covered = [e.cutoffs[fam][k][2] for e in with_cutoffs]
            rows.append({"family": fam, "cutoff": cutoff, "patients": len(with_cutoffs),
                         "mean_volume_ml": float(np.mean(volumes)), "median_volume_ml": float(np.median(volumes)),
                         "mean_coverage": float(np.mean(covered)), "median_coverage": float(np.median(covered)),
                         "min_coverage": float(np.min(covered)), **standard})
    return rows


def format_cutoff_table(rows: Sequence[dict]) -> str:
    """Plain text of :func:`cutoff_rows` (volumes mL, coverages %)."""
    if not rows:
        return ""
    lines = [f"{'family':12s} {'cutoff':>7s} {'mean mL':>8s} {'median mL':>9s} {'mean cov':>8s} "
             f"{'median cov':>10s} {'min cov':>7s}"]
    lines += [f"{r['family']:12s} {r['cutoff']:7g} {r['mean_volume_ml']:8.1f} {r['median_volume_ml']:9.1f} "
              f"{100 * r['mean_coverage']:8.1f} {100 * r['median_coverage']:10.1f} {100 * r['min_coverage']:7.1f}"
              for r in rows]
    lines.append(f"{'standard':12s} {'15 mm':>7s} {rows[0]['standard_mean_volume_ml']:8.1f} {'':9s} "
                 f"{100 * rows[0]['standard_mean_coverage']:8.1f}   (n = {rows[0]['patients']})")
    return "\n".join(lines)


def _csv_text(rows: Sequence[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    columns = list(rows[0]) if rows else []
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if row.get(c) is None else row.get(c) for c in columns])
    return buffer.getvalue()


def write_study_outputs(out_dir, evaluations: Sequence[PatientEvaluation], *,
                        title: str = "", settings: dict | None = None) -> dict[str, Path]:
    """Write the cohort table (one row per patient), the summary table, the tests (JSON)
    and the figure into `out_dir`; returns name -> path."""

    out_dir = Path(out_dir)
    rows = [e.row() for e in evaluations]
    families = evaluations[0].families if evaluations else FAMILIES
    tests = {name: cohort_tests(evaluations, key) for name, key in TESTED.items()}
    return {
        "table": write_text_atomic(out_dir / "cohort_study.csv", _csv_text(rows)),
        "summary": write_text_atomic(out_dir / "cohort_study_summary.csv",
                                     _csv_text(summary_rows(rows, families))),
        "statistics": write_json_atomic(out_dir / "cohort_study_statistics.json", {
            "test": "Wilcoxon signed-rank, two-sided, paired coverages at the 15 mm standard "
                    "CTV's volume (equal_volume) and at half of it (half_volume); "
                    "median_difference = first - second",
            **{name: {k: v.to_dict() for k, v in found.items()} for name, found in tests.items()},
            "cases": [e.case for e in evaluations], "settings": settings or {},
            **run_metadata()}),
        "figure": plot_cohort_study(evaluations, out_dir / "cohort_study.png", title=title),
        **({"cutoffs": write_text_atomic(out_dir / "cohort_study_cutoffs.csv", _csv_text(cutoffs))}
           if (cutoffs := cutoff_rows(evaluations)) else {}),
    }


_COLOURS = {"standard": "tab:orange", "model": "tab:blue", "anisotropic": "tab:purple",
            "mismatch": "tab:brown", "oracle": "tab:green"}
_TICKS = {"standard": "standard\n(margin)", "model": "model\n(isotropic fit)",
          "anisotropic": "model\n(anisotropic\nfit)", "mismatch": "model\n(anisotropic,\nnoisy DTI)",
          "oracle": "oracle\n(true density)"}


def _paired_panel(ax, rows: Sequence[dict], key: str, title: str, families=FAMILIES) -> None:
    """Per patient, the families' values of ``key.format(family)`` (fractions, shown in
    %) joined by a line; black bars at the means."""
    x = np.arange(len(families))
    for row in rows:
        ax.plot(x, [100 * row[key.format(f)] for f in families], "-", color="grey",
                alpha=0.45, lw=0.8)
    for k, fam in enumerate(families):
        values = np.array([100 * r[key.format(fam)] for r in rows])
        ax.plot(np.full(values.size, k), values, "o", color=_COLOURS[fam], alpha=0.8)
        if values.size:
            ax.hlines(values.mean(), k - 0.25, k + 0.25, color="black", lw=2)
    ax.set_xticks(x, [_TICKS[f] for f in families], fontsize=8)
    ax.set_xlim(-0.4, len(families) - 0.6)
    ax.set_ylim(-2, 102)
    ax.set_ylabel("recurrence coverage (%)")
    ax.set_title(title, fontsize=10)


def plot_cohort_study(evaluations: Sequence[PatientEvaluation], path, *, title: str = "") -> Path:
    """Left and middle: each patient's recurrence coverage by the standard, model and
    oracle CTVs at the standard 15 mm CTV's volume and at half of it (paired dots and
    lines, means as bars). Right: mean coverage against CTV volume relative to the
    patient's standard CTV (1 = equal volume), per family, with the interquartile band.
    Written atomically (PNG)."""

    plt = headless_pyplot()
    families = evaluations[0].families if evaluations else FAMILIES
    fig, (equal, half, right) = plt.subplots(1, 3, figsize=(5 * (1 + len(families) / 2.5), 4.8),
                                             constrained_layout=True)
    rows = [e.row() for e in evaluations]
    _paired_panel(equal, rows, "{}_coverage",
                  f"{len(rows)} patients at equal volume (15 mm CTV); bars: means", families)
    _paired_panel(half, rows, "{}_coverage_at_half_volume",
                  f"at {HALF_VOLUME:g} x the 15 mm CTV's volume", families)
    for fam in families:
        stack = np.array([relative_coverage(e.curves[fam], e.model.standard_volume_ml)
                          for e in evaluations]) * 100
        if not len(stack):
            continue
        right.plot(RELATIVE_VOLUMES, stack.mean(axis=0), color=_COLOURS[fam], label=fam)
        q1, q3 = np.percentile(stack, [25, 75], axis=0)
        right.fill_between(RELATIVE_VOLUMES, q1, q3, color=_COLOURS[fam], alpha=0.15, lw=0)
    for where in (HALF_VOLUME, 1.0):
        right.axvline(where, color="grey", lw=0.8, ls="--")
    for level in (95, 100):
        right.axhline(level, color="grey", lw=0.6, ls=":")
    right.set_xlabel("CTV volume / standard 15 mm CTV volume")
    right.set_ylabel("mean recurrence coverage (%)")
    right.set_ylim(-2, 102)
    right.legend(loc="lower right")
    right.set_title("coverage vs volume (band: interquartile range)", fontsize=10)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


_LETTERS = {"standard": "S", "model": "M", "anisotropic": "A", "mismatch": "X", "oracle": "O"}


def _table_columns(families=FAMILIES) -> list[tuple[str, str, float]]:
    """(header, row key, scale) of the printed table: volumes in mL, coverages in %;
    S / M / A / X / O: standard, isotropic model, anisotropic model, anisotropic model with
    the noisy DTI, oracle; density Dice (x 100) of the fitted families at c >= 0.1."""
    columns = [("core", "core_volume_ml", 1.0), ("rec", "recurrence_volume_ml", 1.0),
               ("CTV", "standard_volume_ml", 1.0)]
    groups = (("cov", "{}_coverage", 100.0), ("half", "{}_coverage_at_half_volume", 100.0),
              ("V95", "{}_volume_ml_for_95", 1.0), ("V100", "{}_volume_ml_for_100", 1.0))
    for header, key, scale in groups:
        columns += [(f"{header}{_LETTERS[fam]}", key.format(fam), scale) for fam in families]
    columns += [(f"D{_LETTERS[fam]}", f"{fam}_dice_c0.1", 100.0) for fam in families
                if fam not in ("standard", "oracle")]
    return columns


def format_study_table(evaluations: Sequence[PatientEvaluation]) -> str:
    """A plain-text table: per patient the core, recurrence and standard CTV volumes (mL);
    per family (S standard, M model, O oracle) the coverage (%) at equal volume (cov) and
    at half of it (half), and the smallest volumes (mL) covering 95 % and 100 %; then
    means and medians (volumes over the patients reaching the level) and the paired
    tests."""
    families = evaluations[0].families if evaluations else FAMILIES
    columns = _table_columns(families)
    width = max(len(h) for h, _, _ in columns) + 2

    def cell(value, scale: float) -> str:
        return f"{'-':>{width}s}" if value is None else f"{scale * value:{width}.1f}"

    rows = [e.row() for e in evaluations]
    head = f"{'':12s}" + "".join(f"{h:>{width}s}" for h, _, _ in columns)
    lines = [head, "-" * len(head)]
    lines += [f"{r['case']:12s}" + "".join(cell(r.get(k), sc) for _, k, sc in columns) for r in rows]
    if rows:
        lines.append("-" * len(head))
        for name, fn in (("mean", np.mean), ("median", np.median)):
            lines.append(f"{name:12s}" + "".join(cell(_stat([r.get(k) for r in rows], fn), sc)
                                                 for _, k, sc in columns))
        for where, key in TESTED.items():
            for name, test in cohort_tests(evaluations, key).items():
                p = "n/a" if math.isnan(test.p_value) else f"{test.p_value:.3g}"
                note = f" {test.note}" if test.note else ""
                lines.append(f"Wilcoxon {name.replace('_', ' ')}, {where.replace('_', ' ')}: "
                             f"median difference {100 * test.median_difference:+.1f} points, "
                             f"p = {p} (n = {test.n}, {test.n_nonzero} non-zero){note}")
    by_cutoff = format_cutoff_table(cutoff_rows(evaluations))
    return "\n".join(lines + (["", "cutoff CTVs (density >= c in the brain):", by_cutoff] if by_cutoff else []))


def _check_settings(out_dir: Path, settings: dict) -> None:
    """Record the settings in study.json; a rerun with other settings is refused."""

    path = out_dir / "study.json"
    if path.is_file():
        old = json.loads(path.read_text()).get("settings")
        if old != settings:
            raise ValueError(f"{path}: this folder was made with other settings {old}; "
                             f"choose another OUT_DIR (now: {settings})")
        return
    write_json_atomic(path, {"settings": settings, **run_metadata()})


def _arm_tensors(out_dir: Path, anatomy, arms, perturbation_deg: float, seed: int) -> dict[str, Path]:
    """arm -> the DTI file it is fitted with (written once into ``out_dir/dti``):
    anisotropic: the truth's own DTI; mismatch: :func:`perturb_tensor` of it."""
    wanted = {"anisotropic": "subject_tensor.nii.gz", "mismatch": "perturbed_tensor.nii.gz"}
    paths = {arm: out_dir / "dti" / wanted[arm] for arm in arms if arm in wanted}
    if all(path.is_file() for path in paths.values()):
        return paths
    anatomy = anatomy()
    if anatomy.dti is None:
        raise ValueError("the anisotropic arms need anisotropic truth (a DTI)")
    ref = anatomy.reference
    for arm, path in paths.items():
        t6 = anatomy.dti if arm == "anisotropic" else perturb_tensor(
            anatomy.dti, ref.spacing, degrees_rms=perturbation_deg, seed=seed)
        save_tensor_fsl(t6, ref, path)
    return paths


def run_cohort_study(
    n: int,
    out_dir,
    *,
    seed: int = 0,
    isotropic_truth: bool = False,
    data_root=None,
    factor: int = 2,
    anisotropy: float = 5.0,
    ranges: ParameterRanges = ParameterRanges(),
    margin_mm: float = 15.0,
    run_options: dict | None = None,
    arms: Sequence[str] = ("model",),
    anisotropy_range: tuple[float, float] = (2.0, 10.0),
    perturbation_deg: float = 25.0,
    progress: bool = True,
) -> list[PatientEvaluation]:
    """Generate `n` synthetic patients, fitting each as soon as it exists with the
    pipeline (:func:`rtjax.pipeline.run_cohort`, resumable) in every arm of `arms`
    (:data:`ARMS`: the isotropic ``model`` always; ``anisotropic`` / ``mismatch`` fit the
    anisotropic model with the truth's DTI or a perturbed one, r fitted in
    `anisotropy_range`; module docstring), evaluate them and write the study's tables and
    figure. `run_options` go to ``run_case`` (e.g. ``initial``, ``fit_iterations``).

    Resuming: rerun with the same settings (``study.json``; `n` may change: patient i
    does not depend on n, so a larger n extends the cohort and a smaller one reports its
    first n patients, though run_cohort also fits any other case folder present). Patients
    whose fit failed in some arm are left out (``results*/errors.log``). Returns the
    evaluations of patients 0..n-1 that are done, sorted by case."""

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    arms = ("model", *(a for a in arms if a != "model"))
    unknown = sorted(set(arms) - set(ARMS))
    if unknown or (isotropic_truth and len(arms) > 1):
        raise ValueError(f"arms must be among {ARMS} (the anisotropic ones need anisotropic "
                         f"truth), got {list(arms)}")
    settings = {"seed": int(seed), "isotropic_truth": bool(isotropic_truth),
                "factor_mm": int(factor), "anisotropy": float(anisotropy),
                "ranges": dataclasses.asdict(ranges), "margin_mm": float(margin_mm),
                "run_options": dict(run_options or {})}
    if len(arms) > 1:
        settings.update(arms=list(arms), anisotropy_range=list(anisotropy_range),
                        perturbation_deg=float(perturbation_deg))
    settings = json.loads(json.dumps(settings))  # tuples -> lists, as read back
    _check_settings(out_dir, settings)
    loaded = []

    def anatomy():
        if not loaded:
            loaded.append(load_cohort_anatomy(data_root or default_data_root(), factor=factor,
                                              isotropic=isotropic_truth, anisotropy=anisotropy))
        return loaded[0]

    tensors = _arm_tensors(out_dir, anatomy, arms, perturbation_deg, seed) if len(arms) > 1 else {}
    options = {"labels": "brats2021", "margin_mm": margin_mm, **(run_options or {})}
    per_arm = {arm: {**options, **({} if arm == "model" else
                                   {"overrides": {"tensor": tensors[arm]}, "anisotropy": anisotropy_range})}
               for arm in arms}

    def fit(bar):
        for arm in arms:
            run_cohort(out_dir / "cases", _arm_dir(out_dir, arm), progress=bar, **per_arm[arm])

    names = generate_cohort(out_dir, n, anatomy, seed=seed, ranges=ranges,
                            after_each=lambda _: fit(False), progress=progress)
    fit(progress)  # cases generated earlier but not fitted yet; nothing when all are done
    done = [name for name in names
            if all((_arm_dir(out_dir, a) / name / "done.json").is_file() for a in arms)]
    evaluations = [evaluate_patient(out_dir / "cases" / name, out_dir / "results" / name,
                                    out_dir / "truth" / name, margin_mm=margin_mm,
                                    arm_dirs={a: _arm_dir(out_dir, a) / name for a in arms[1:]},
                                    cutoffs=options.get("cutoffs", ()))
                   for name in done]
    truth = "isotropic" if isotropic_truth else f"anisotropic (DTI, r = {anisotropy:g})"
    fits = "isotropic fit" if len(arms) == 1 else "isotropic and anisotropic fits"
    write_study_outputs(out_dir, evaluations, settings=settings,
                        title=f"synthetic cohort, {truth} truth, {fits}")
    return evaluations
