"""Solver throughput: the JAX FK solver against a plain-NumPy version of the same scheme."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from scipy.ndimage import gaussian_filter

from growth import (
    FKParams,
    FKSimulator,
    GaussianSeed,
    Grid,
    default_substeps,
    fractional_anisotropy,
    stable_time_step,
    tumour_tensor,
    visible_masks,
)
from growth.anisotropic import DENSE_FRACTION, AnisotropicFKSimulator
from growth.fit import FIT_DENSE_FRACTION, FitConfig
from growth.reference import numpy_face_coefficients, numpy_solve_fk
from rtjax.atlas import load_atlas
from rtjax.fit import fit_case
from rtjax.labels import TumourMasks
from rtjax.simulate import load_shape_tensor, load_tissue
from rtjax.tensor_io import load_tensor_fa_peaks, resample_tensor

__all__ = [
    "benchmark_anisotropic_fit",
    "format_fit_timing",
    "BenchmarkRow",
    "benchmark_solver",
    "format_table",
    "brain_tissue_240",
    "StepRow",
    "benchmark_anisotropic_step",
    "format_step_table",
]


@dataclass(frozen=True)
class BenchmarkRow:
    """One line of the table: throughputs in voxel-steps per second."""

    case: str
    shape: tuple[int, int, int]
    batch: int
    jax_steps: int
    jax_rate: float
    numpy_steps: int
    numpy_rate: float | None

    @property
    def ratio(self) -> float | None:
        return None if not self.numpy_rate else self.jax_rate / self.numpy_rate


def _smooth_random_tissue(shape, seed=0):
    """WM/GM maps with structure (smoothed noise), for a synthetic cube."""

    rng = np.random.default_rng(seed)
    wm = gaussian_filter(rng.uniform(size=shape), 3)
    wm = np.clip((wm - wm.min()) / (np.ptp(wm) + 1e-12), 0, 1).astype(np.float32)
    return wm, (1 - wm).astype(np.float32)


def brain_tissue_240() -> tuple[np.ndarray, np.ndarray]:
    """The MNI152 WM/GM maps centred in a 240x240x155 (BraTS-sized) grid, 1 mm."""

    atlas = load_atlas("mni152")
    out = []
    for name in ("wm", "gm"):
        data = getattr(atlas, name).data
        target = np.zeros((240, 240, 155), np.float32)
        src, dst = [], []
        for n_src, n_dst in zip(data.shape, target.shape):
            if n_src <= n_dst:
                start = (n_dst - n_src) // 2
                src.append(slice(0, n_src))
                dst.append(slice(start, start + n_src))
            else:
                start = (n_src - n_dst) // 2
                src.append(slice(start, start + n_dst))
                dst.append(slice(0, n_dst))
        target[tuple(dst)] = data[tuple(src)]
        out.append(target)
    return out[0], out[1]


def _time(fn, repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _jax_rate(wm, gm, steps: int, batch: int, dw=0.5, rho=0.05, substeps=None) -> float:



    grid = Grid(wm.shape, (1.0, 1.0, 1.0))
    dt = stable_time_step(grid, dw * float((wm + gm).max()))
    t_final = steps * dt
    sim = FKSimulator.create(wm, gm, grid, dw_max=dw, t_max=t_final, dt=dt)
    sim = dataclasses.replace(sim, substeps=substeps)
    origin = jnp.asarray(np.asarray(grid.shape, np.float32) / 2)
    if batch == 1:
        run = lambda: sim(FKParams(dw, rho), origin, t_final).block_until_ready()  # noqa: E731
    else:
        params = FKParams(
            dw=jnp.linspace(0.5 * dw, dw, batch), rho=jnp.linspace(rho, 2 * rho, batch),
            ratio=jnp.full(batch, 10.0),
        )
        batched = jax.jit(jax.vmap(sim, in_axes=(0, None, None)))
        run = lambda: batched(params, origin, t_final).block_until_ready()  # noqa: E731
    run()  # compile
    return batch * wm.size * steps / _time(run, repeats=2)


def smooth_fibre_field(shape, fa_eigenvalues=(1.0, 0.15, 0.15), seed=0) -> np.ndarray:
    """A trace-3 shape tensor field (6, *shape) whose principal direction varies smoothly
    (smoothed random vectors), a stand-in for white-matter fibres."""

    rng = np.random.default_rng(seed)
    v = np.stack([gaussian_filter(rng.normal(size=shape), 6) for _ in range(3)])
    v /= np.linalg.norm(v, axis=0, keepdims=True) + 1e-12
    ev = np.asarray(fa_eigenvalues, float) * 3 / np.sum(fa_eigenvalues)
    perp, par = ev[1], ev[0]
    outer = v[:, None] * v[None, :]
    m = perp * np.eye(3)[:, :, None, None, None] + (par - perp) * outer
    return np.stack([m[0, 0], m[0, 1], m[0, 2], m[1, 1], m[1, 2], m[2, 2]]).astype(np.float32)


def _anisotropic_rate(wm, gm, steps: int, dw=0.5, rho=0.05) -> tuple[float, int]:
    """Voxel-steps/s of the anisotropic solver and the number of stencil offsets."""



    grid = Grid(wm.shape, (1.0, 1.0, 1.0))
    sim = AnisotropicFKSimulator.create(wm, gm, smooth_fibre_field(wm.shape), grid,
                                        dw_max=dw, t_max=0.0)
    sim = dataclasses.replace(sim, max_steps=steps + 1)
    t_final = steps * sim.dt
    origin = jnp.asarray(np.asarray(grid.shape, np.float32) / 2)
    run = lambda: sim(FKParams(dw, rho), origin, t_final).block_until_ready()  # noqa: E731
    run()  # compile
    return wm.size * steps / _time(run, repeats=2), len(sim.offsets)


def _numpy_rate(wm, gm, steps: int, dw=0.5, rho=0.05) -> float:

    grid = Grid(wm.shape, (1.0, 1.0, 1.0))
    d_cell = (dw * (wm + gm / 10.0)).astype(np.float32)
    faces = numpy_face_coefficients(d_cell, grid.spacing)
    dt = stable_time_step(grid, float(d_cell.max()))
    c0 = np.asarray(GaussianSeed()(grid, np.asarray(grid.shape, np.float32) / 2), np.float32)
    seconds = _time(lambda: numpy_solve_fk(c0, faces, rho, dt, steps))
    return wm.size * steps / seconds


def benchmark_solver(
    *, jax_steps: int = 100, numpy_steps: int = 5, batch: int = 16, quick: bool = False
) -> list[BenchmarkRow]:
    """Measure voxel-steps/s on a 128^3 cube, a 240x240x155 brain and a vmapped batch.

    `quick` shrinks the grids (64^3, batch 4) for a smoke run.
    """

    n = 64 if quick else 128
    batch = min(batch, 4) if quick else batch
    rows = []
    cube = _smooth_random_tissue((n, n, n))
    rows.append(BenchmarkRow(f"cube {n}^3", cube[0].shape, 1, jax_steps,
                             _jax_rate(*cube, jax_steps, 1), numpy_steps,
                             _numpy_rate(*cube, numpy_steps)))
    if not quick:
        brain = brain_tissue_240()
        rows.append(BenchmarkRow("MNI152 brain 240x240x155", brain[0].shape, 1, jax_steps,
                                 _jax_rate(*brain, jax_steps, 1), numpy_steps,
                                 _numpy_rate(*brain, numpy_steps)))
    rows.append(BenchmarkRow(f"cube {n}^3, vmap {batch} params", cube[0].shape, batch,
                             jax_steps, _jax_rate(*cube, jax_steps, batch), numpy_steps,
                             rows[0].numpy_rate))
    small = _smooth_random_tissue((48, 48, 48))
    rows.append(BenchmarkRow("cube 48^3 (fit working grid)", small[0].shape, 1, jax_steps,
                             _jax_rate(*small, jax_steps, 1), numpy_steps,
                             _numpy_rate(*small, numpy_steps)))
    if default_substeps() > 1:  # accelerators: the same solves at one step per loop iteration
        for name, tissue in ((f"cube {n}^3", cube), ("cube 48^3", small)):
            rows.append(BenchmarkRow(f"{name}, 1 step per iteration", tissue[0].shape, 1,
                                     jax_steps, _jax_rate(*tissue, jax_steps, 1, substeps=1),
                                     0, None))
    rate, n_offsets = _anisotropic_rate(*cube, jax_steps)
    rows.append(BenchmarkRow(f"cube {n}^3 anisotropic ({n_offsets} offsets)", cube[0].shape, 1,
                             jax_steps, rate, 0, None))
    return rows


def format_table(rows: list[BenchmarkRow], device: str) -> str:
    """A plain-text table; rates in mega voxel-steps per second (per parameter set x batch)."""
    header = f"FK solver throughput on {device} (M voxel-steps/s; ratio = JAX / NumPy)"
    lines = [header, "-" * len(header),
             f"{'case':34s} {'JAX steps':>9s} {'NumPy':>10s} {'JAX':>10s} {'ratio':>7s}"]
    for row in rows:
        numpy_col = f"{row.numpy_rate / 1e6:10.1f}" if row.numpy_rate else f"{'-':>10s}"
        ratio_col = f"{row.ratio:7.1f}" if row.ratio else f"{'-':>7s}"
        lines.append(f"{row.case:34s} {row.jax_steps:9d} {numpy_col} {row.jax_rate / 1e6:10.1f} {ratio_col}")
    lines.append("The vmap row counts all parameter sets; its NumPy column is the serial 1-set rate.")
    lines.append("Solves run several split steps per solver loop iteration on accelerators"
                 " (growth.default_substeps); '1 step per iteration' rows show the difference.")
    lines.append("The anisotropic row: full-tensor Selling stencil, smooth fibre field, FA ~0.8;"
                 " compare its JAX column with the isotropic cube's.")
    return "\n".join(lines)


@dataclass(frozen=True)
class StepRow:
    """Isotropic against anisotropic step cost on one grid (voxel-steps per second, by
    wall-clock time and by the process's CPU time)."""

    case: str
    shape: tuple[int, int, int]
    offsets: int
    dense_rows: int
    sparse_pairs_per_voxel: float
    steps: int
    iso_rate: float
    aniso_rate: float
    iso_cpu_rate: float
    aniso_cpu_rate: float

    @property
    def ratio(self) -> float:
        """How many isotropic steps one anisotropic step costs (wall clock)."""
        return self.iso_rate / self.aniso_rate

    @property
    def cpu_ratio(self) -> float:
        """The same by CPU time (steadier on a shared machine)."""
        return self.iso_cpu_rate / self.aniso_cpu_rate


def _interleaved_rates(runs: dict, voxels: int, steps: int, repeats: int) -> dict:
    """Best wall and CPU time of each run over `repeats` rounds, the runs alternating (a
    shared CPU slows them alike), as (wall, cpu) voxel-steps/s."""
    for run in runs.values():
        run()  # compile
    best = {name: [float("inf"), float("inf")] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            wall, cpu = time.perf_counter(), time.process_time()
            run()
            best[name][0] = min(best[name][0], time.perf_counter() - wall)
            best[name][1] = min(best[name][1], time.process_time() - cpu)
    return {name: (voxels * steps / w, voxels * steps / c) for name, (w, c) in best.items()}


def _step_row(case: str, wm, gm, tensor, spacing, steps: int, repeats: int, dw=0.5, rho=0.05,
              dense_fraction: float = DENSE_FRACTION, gradient: bool = False) -> StepRow:
    """One row; with `gradient`, the rates of a value-and-gradient solve (reverse mode
    through the steps, as in a fit) instead of a forward one."""
    grid = Grid(wm.shape, spacing)
    aniso = AnisotropicFKSimulator.create(wm, gm, tensor, grid, dw_max=dw, t_max=0.0,
                                          dense_fraction=dense_fraction)
    aniso = dataclasses.replace(aniso, max_steps=steps + 1)
    iso = FKSimulator.create(wm, gm, grid, dw_max=dw, t_max=steps * aniso.dt, dt=aniso.dt)
    t_final = steps * aniso.dt
    origin = jnp.asarray(np.asarray(grid.shape, np.float32) * np.asarray(spacing, np.float32) / 2)
    params = FKParams(dw, rho)
    if gradient:
        theta = jnp.asarray([dw, rho], jnp.float32)
        runs = {name: (lambda sim=sim: jax.block_until_ready(
            _soft_mask_loss_and_grad(sim, theta, origin, t_final))) for name, sim in
            (("iso", iso), ("aniso", aniso))}
    else:
        runs = {
            "iso": lambda: iso(params, origin, t_final).block_until_ready(),
            "aniso": lambda: aniso(params, origin, t_final).block_until_ready(),
        }
    rates = _interleaved_rates(runs, wm.size, steps, repeats)
    return StepRow(case, wm.shape, len(aniso.offsets), len(aniso.selling.dense_offsets),
                   int(aniso.selling.pair_lower.size) / wm.size, steps, rates["iso"][0],
                   rates["aniso"][0], rates["iso"][1], rates["aniso"][1])


def benchmark_anisotropic_step(*, steps: int = 100, repeats: int = 3, quick: bool = False,
                               tractseg_fa=None, tractseg_peaks=None) -> list[StepRow]:
    """The anisotropic step (Selling stencil) against the isotropic one, same grid, same
    step size, measured alternately in one run: a 128^3 cube at 1 mm and the fit working
    grid (48^3 at 2 mm) with a smooth fibre field (FA ~0.8); with the TractSeg FA and
    peaks given, also a 48^3 box at 2 mm of the real DTI (tumour tensor, r = 5), in the
    default layout and in the fit's (`growth.fit.FIT_DENSE_FRACTION`: axes dense only).

    `quick`: 64^3 instead of 128^3 and 24^3 instead of 48^3.
    """
    big, small = (64, 24) if quick else (128, 48)
    rows = []
    for n, h, name in ((big, 1.0, f"cube {big}^3, 1 mm"), (small, 2.0, f"fit grid {small}^3, 2 mm")):
        wm, gm = _smooth_random_tissue((n, n, n))
        rows.append(_step_row(f"{name}, fibre field", wm, gm, smooth_fibre_field((n, n, n)),
                              (h, h, h), steps, repeats))
    if tractseg_fa is not None and tractseg_peaks is not None:
        wm, gm, tensor = tractseg_box(tractseg_fa, tractseg_peaks, small)
        for layout, fraction in (("", DENSE_FRACTION), (", fit layout", FIT_DENSE_FRACTION)):
            rows.append(_step_row(f"fit grid {small}^3, 2 mm, TractSeg r=5{layout}", wm, gm,
                                  tensor, (2.0, 2.0, 2.0), steps, repeats,
                                  dense_fraction=fraction))
        for layout, fraction in (("", DENSE_FRACTION), (", fit layout", FIT_DENSE_FRACTION)):
            rows.append(_step_row(f"  same, value+grad{layout}", wm, gm, tensor, (2.0, 2.0, 2.0),
                                  steps, repeats, dense_fraction=fraction, gradient=True))
    return rows


@eqx.filter_jit
def _soft_mask_loss_and_grad(sim, theta, origin, t_final):
    """value and d/d(Dw, rho) of a smooth function of the density (as a fit's loss)."""
    def loss(theta):
        c = sim(FKParams(theta[0], theta[1]), origin, t_final)
        return jnp.sum(jax.nn.sigmoid((c - 0.2) / 0.01))
    return jax.value_and_grad(loss)(theta)


def tractseg_box(fa_path, peaks_path, n: int, anisotropy: float = 5.0):
    """A cube of n^3 voxels at 2 mm from the middle of the MNI152 atlas: WM/GM
    block-averaged from 1 mm, and the tumour shape tensor of the TractSeg FA + first peak
    (resampled onto the atlas, `growth.tumour_tensor`, r = `anisotropy`) averaged alike."""
    tissue = load_tissue(atlas="mni152")
    shape = load_shape_tensor(tissue, fa=fa_path, peaks=peaks_path, anisotropy=anisotropy)
    wm, gm = tissue.wm.data, tissue.gm.data
    centre = np.asarray(wm.shape) // 2
    box = tuple(slice(c - n, c + n) for c in centre)

    def coarse(a):
        a = np.asarray(a, np.float64)[box]
        return a.reshape(n, 2, n, 2, n, 2).mean(axis=(1, 3, 5))

    tensor = np.stack([coarse(shape.components[k] * wm) for k in range(6)])
    wm_c, gm_c = coarse(wm), coarse(gm)
    tensor = np.where(wm_c > 0, tensor / np.maximum(wm_c, 1e-12), np.eye(3)[np.triu_indices(3)][:, None, None, None])
    return wm_c.astype(np.float32), gm_c.astype(np.float32), tensor.astype(np.float32)


def format_step_table(rows: list[StepRow], device: str) -> str:
    """Isotropic and anisotropic step side by side (M voxel-steps/s) and their ratio."""
    header = f"Anisotropic vs isotropic FK step on {device} (M voxel-steps/s, same grid and dt)"
    lines = [header, "-" * len(header),
             f"{'case':46s} {'offsets':>7s} {'dense':>5s} {'pairs/vox':>9s} {'iso':>7s} "
             f"{'aniso':>7s} {'ratio':>6s} {'cpu ratio':>9s}"]
    for row in rows:
        lines.append(f"{row.case:46s} {row.offsets:7d} {row.dense_rows:5d} "
                     f"{row.sparse_pairs_per_voxel:9.3f} {row.iso_rate / 1e6:7.1f} "
                     f"{row.aniso_rate / 1e6:7.1f} {row.ratio:6.2f} {row.cpu_ratio:9.2f}")
    lines.append("ratio = iso rate / aniso rate: how many isotropic steps one anisotropic step costs"
                 " (wall clock; cpu ratio: by process CPU time). offsets: stencil offsets in use;"
                 " dense: offsets applied as dense rows; pairs/vox: sparse long-offset pairs per"
                 " voxel; value+grad rows: a solve and its gradient (reverse mode), the cost of"
                 " one fit iteration. The two runs alternate; best of the repeats.")
    return "\n".join(lines)


#: The synthetic patient of `benchmark_anisotropic_fit`: scaled-time growth (to t = 1)
#: along the TractSeg fibres from a seed in the left corticospinal tract.
FIT_TRUTH = {"sqrt_dw_t": 6.0, "sqrt_rho_t": 2.5, "anisotropy": 5.0, "u_t1": 0.65, "u_fl": 0.2,
             "seed_box_mm": ((-30, -15), (-25, 0), (5, 20))}


def _tractseg_case(fa_path, peaks_path):
    """MNI152 tissue (1 mm), the TractSeg DTI resampled onto it, and a tumour grown along
    its fibres (`FIT_TRUTH`, the truth's shape tensor at r = anisotropy)."""
    tissue = load_tissue(atlas="mni152")
    dti, source = load_tensor_fa_peaks(fa_path, peaks_path)
    dti = resample_tensor(dti, source, tissue.reference)
    wm, gm = tissue.wm.data.astype(np.float32), tissue.gm.data.astype(np.float32)
    index = np.indices(wm.shape).reshape(3, -1).T
    world = tissue.reference.voxel_to_world(index)
    inside = np.ones(len(index), bool)
    for k, (lo, hi) in enumerate(FIT_TRUTH["seed_box_mm"]):
        inside &= (world[:, k] >= lo) & (world[:, k] <= hi)
    score = (np.asarray(fractional_anisotropy(dti)) * wm).reshape(-1)
    seed = index[np.flatnonzero(inside)[np.argmax(score[inside])]]
    box = tuple(slice(max(0, c - 40), min(n, c + 40)) for c, n in zip(seed, wm.shape))
    spacing = tissue.reference.spacing
    grid = Grid(tuple(s.stop - s.start for s in box), spacing)
    shape = np.asarray(tumour_tensor(dti[(slice(None), *box)], anisotropy=FIT_TRUTH["anisotropy"]))
    a2 = FIT_TRUTH["sqrt_dw_t"] ** 2
    sim = AnisotropicFKSimulator.create(wm[box], gm[box], shape, grid, dw_max=a2, t_max=1.0)
    origin = (seed - np.array([s.start for s in box])) * np.asarray(spacing)
    density = np.zeros(wm.shape, np.float32)
    density[box] = np.asarray(sim(FKParams(a2, FIT_TRUTH["sqrt_rho_t"] ** 2), origin, 1.0))
    core, edema = (np.asarray(m) for m in visible_masks(density, FIT_TRUTH["u_t1"], FIT_TRUTH["u_fl"]))
    masks = TumourMasks(necrosis=np.zeros_like(core), enhancing=core, edema=edema)
    return masks, wm, gm, dti, spacing, density


def benchmark_anisotropic_fit(fa_path, peaks_path, *, anisotropy=(1.0, 10.0),
                              config: FitConfig | None = None) -> list[dict]:
    """Wall time of `rtjax.fit.fit_case` (network start, refinement, final density at
    1 mm) on a tumour grown along the TractSeg fibres in the MNI152 atlas: isotropic,
    and anisotropic with the DTI (r fitted in `anisotropy`). Each row: seconds, the
    stages' seconds, iterations, r, and the Dice of the fitted against the true density."""
    masks, wm, gm, dti, spacing, truth = _tractseg_case(fa_path, peaks_path)
    rows = []
    for name, options in (("isotropic", {}), ("anisotropic", {"tensor": dti, "anisotropy": anisotropy})):
        start = time.perf_counter()
        fit = fit_case(masks, wm, gm, spacing, config=config, **options)
        seconds = time.perf_counter() - start
        record = fit.info["anisotropic"]
        rows.append({
            "fit": name, "seconds": seconds, "iterations": fit.info["iterations"],
            "isotropic_stage_seconds": record.get("isotropic_stage", {}).get("seconds"),
            "anisotropy": record.get("anisotropy"), "working_shape": fit.info["working_shape"],
            "dice_core": fit.info["dice_core"], "dice_edema": fit.info["dice_edema"],
            "density_dice": [_dice(fit.density >= level, truth >= level) for level in (0.01, 0.1, 0.5)],
        })
    return rows


def _dice(a, b) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def format_fit_timing(rows: list[dict]) -> str:
    """One line per fit: seconds (isotropic stage), iterations, r, Dice of masks and density."""
    lines = [f"{'fit':12s} {'seconds':>8s} {'(iso stage)':>11s} {'iters':>5s} {'r':>5s} "
             f"{'working grid':>12s} {'Dice core':>9s} {'edema':>6s}  density Dice c>=0.01/0.1/0.5"]
    for r in rows:
        stage = f"{r['isotropic_stage_seconds']:.1f}" if r["isotropic_stage_seconds"] else "-"
        aniso = f"{r['anisotropy']:.2f}" if r["anisotropy"] else "-"
        grid = "x".join(map(str, r["working_shape"]))
        lines.append(f"{r['fit']:12s} {r['seconds']:8.1f} {stage:>11s} {r['iterations']:5d} {aniso:>5s} "
                     f"{grid:>12s} {r['dice_core']:9.3f} {r['dice_edema']:6.3f}  "
                     + "/".join(f"{d:.3f}" for d in r["density_dice"]))
    lines.append(f"Truth: {FIT_TRUTH}; scaled time, MNI152 1 mm, TractSeg FA + first peak. "
                 "Seconds include compilation.")
    return "\n".join(lines)
