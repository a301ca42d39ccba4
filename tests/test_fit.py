"""Fitting the growth model to masks: growth.fit and rtjax fit."""

import json

import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter
from typer.testing import CliRunner

from growth import FKParams, FKSimulator, Grid, visible_masks
from growth.fit import (
    FitConfig,
    FitEstimate,
    dice,
    hard_mask_loss,
    heuristic_estimate,
    mask_loss,
    refine,
    refine_multistart,
)
from rtjax.cli import app
from rtjax.fit import block_average, fill_lesion_tissue
from rtjax.labels import TumourMasks, combine_labels, get_convention

GRID = Grid((30, 30, 26), (2.0, 2.0, 2.0))
TRUTH = {"origin": np.array([29.0, 31.0, 25.0]), "dw_t": 36.0, "rho_t": 9.0, "u_t1": 0.7, "u_fl": 0.2}


def _tissue(shape, seed=0):
    rng = np.random.default_rng(seed)
    wm = np.clip(gaussian_filter(rng.uniform(size=shape), 2) * 4 - 1.2, 0, 1).astype(np.float32)
    wm = np.clip(wm + 0.3, 0, 1)
    return wm, (0.9 * (1 - wm)).astype(np.float32)


@pytest.fixture(scope="module")
def synthetic_case():
    wm, gm = _tissue(GRID.shape)
    sim = FKSimulator.create(wm, gm, GRID, dw_max=TRUTH["dw_t"], t_max=1.0)
    density = np.asarray(sim(FKParams(TRUTH["dw_t"], TRUTH["rho_t"]), TRUTH["origin"], 1.0))
    core, edema = (np.asarray(m) for m in visible_masks(density, TRUTH["u_t1"], TRUTH["u_fl"]))
    return wm, gm, density, core, edema


@pytest.mark.slow
def test_refinement_recovers_known_parameters(synthetic_case):
    wm, gm, density, core, edema = synthetic_case
    initial = heuristic_estimate(core, edema, GRID.spacing)
    # no prior: the heuristic start is not a calibrated estimate to stay near
    result = refine(core, edema, wm, gm, GRID, initial,
                    config=FitConfig(max_iterations=80, prior_weight=0.0))
    est = result.estimate
    assert result.loss_curve[-1] < 0.3 * result.loss_curve[0]
    assert np.linalg.norm(np.asarray(est.origin_mm) - TRUTH["origin"]) < 2.0  # mm
    assert float(est.sqrt_dw_t) ** 2 == pytest.approx(TRUTH["dw_t"], rel=0.35)
    assert float(est.sqrt_rho_t) ** 2 == pytest.approx(TRUTH["rho_t"], rel=0.35)
    assert result.dice_core > 0.95 and result.dice_edema > 0.9
    sim = FKSimulator.create(wm, gm, GRID, dw_max=float(est.sqrt_dw_t) ** 2, t_max=1.0)
    fitted = np.asarray(sim(est.params(), est.origin_mm, 1.0))
    for level in (0.001, 0.1, 0.25, 0.6):
        # the masks leave a valley of equally good (sqrt(DwT), sqrt(rhoT), u) fits: the
        # density between and below the thresholds is recovered only approximately
        assert dice(fitted >= level, density >= level) > 0.85, level


def test_early_stopping_keeps_the_best_iterate(synthetic_case):
    wm, gm, _, core, edema = synthetic_case
    initial = heuristic_estimate(core, edema, GRID.spacing)
    for select in ("soft", "hard"):
        result = refine(core, edema, wm, gm, GRID, initial,
                        config=FitConfig(max_iterations=60, patience=3, learning_rate=0.5,
                                         select=select))
        soft = np.asarray(result.loss_curve)
        hard = np.asarray(result.details["hard_loss_curve"])  # prior included
        criterion = soft if select == "soft" else hard + 0.01 * soft
        assert len(hard) == len(soft)
        assert result.best_loss == pytest.approx(criterion.min(), abs=1e-6)
        assert result.stopped_early == (len(result.loss_curve) < 60)


def test_hard_loss_is_zero_at_the_truth_and_the_soft_loss_is_biased(synthetic_case):
    wm, gm, density, core, edema = synthetic_case
    truth = FitEstimate(origin_mm=jnp.asarray(TRUTH["origin"], jnp.float32),
                        sqrt_dw_t=jnp.float32(np.sqrt(TRUTH["dw_t"])),
                        sqrt_rho_t=jnp.float32(np.sqrt(TRUTH["rho_t"])),
                        u_t1=jnp.float32(TRUTH["u_t1"]), u_fl=jnp.float32(TRUTH["u_fl"]))
    c, e = jnp.asarray(core, jnp.float32), jnp.asarray(edema, jnp.float32)
    assert float(hard_mask_loss(jnp.asarray(density), truth, c, e)) == pytest.approx(0.0, abs=1e-6)
    # a soft Dice is not 0 at the truth, less so for narrower soft masks
    wide = float(mask_loss(jnp.asarray(density), truth, c, e, FitConfig(soft_width=0.03)))
    narrow = float(mask_loss(jnp.asarray(density), truth, c, e, FitConfig(soft_width=0.03),
                             width_scale=0.2))
    assert 0.0 < narrow < wide
    with pytest.raises(ValueError, match="select"):
        FitConfig(select="best")


def test_multistart_keeps_the_start_with_the_lowest_loss(synthetic_case):
    wm, gm, _, core, edema = synthetic_case
    good = heuristic_estimate(core, edema, GRID.spacing)
    # same sqrt(Dw T): both starts share one compiled solver
    bad = FitEstimate(origin_mm=good.origin_mm + 8.0, sqrt_dw_t=good.sqrt_dw_t,
                      sqrt_rho_t=good.sqrt_rho_t / 2.0, u_t1=good.u_t1, u_fl=good.u_fl)
    config = FitConfig(max_iterations=6, patience=100)
    result = refine_multistart(core, edema, wm, gm, GRID, [bad, good], config=config)
    losses = result.details["start_losses"]
    assert len(losses) == 2 and result.details["start"] == int(np.argmin(losses))
    assert result.best_loss == min(losses)


def test_lesion_without_tissue_is_filled_from_its_surroundings():
    wm = np.full((9, 9, 9), 0.7, np.float32)
    gm = np.full_like(wm, 0.2)
    lesion = np.zeros(wm.shape, bool)
    lesion[3:6, 3:6, 3:6] = True
    wm[lesion] = gm[lesion] = 0
    filled_wm, filled_gm, count = fill_lesion_tissue(wm, gm, lesion)
    assert count == 27
    assert np.all(filled_wm[lesion] == 0.7) and np.all(filled_gm[lesion] == 0.2)
    assert fill_lesion_tissue(filled_wm, filled_gm, lesion)[2] == 0


def test_block_average_is_exact_on_blocks():
    a = np.arange(4 * 4 * 2, dtype=np.float32).reshape(4, 4, 2)
    out = block_average(a, (2, 2, 1))
    assert out.shape == (2, 2, 2)
    assert out[0, 0, 0] == np.mean(a[:2, :2, 0])


def _write_case(folder, seg, wm, gm, affine):
    folder.mkdir()
    for name, data in (("seg", seg), ("wm", wm), ("gm", gm)):
        nib.save(nib.Nifti1Image(data, affine), folder / f"{name}.nii.gz")


def test_fit_command_writes_density_and_params(synthetic_case, tmp_path):
    wm, gm, _, core, edema = synthetic_case
    masks = TumourMasks(necrosis=np.zeros_like(core), enhancing=core, edema=edema)
    seg = combine_labels(masks, get_convention("brats2023"))
    affine = np.diag([-2.0, -2.0, 2.0, 1.0])  # LPS storage: outputs must come back LPS
    stored = lambda a: a[::-1, ::-1, :].copy()  # noqa: E731
    _write_case(tmp_path / "case", stored(seg), stored(wm), stored(gm), affine)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["fit", str(tmp_path / "case"), "--out", str(out),
                                      "--labels", "brats2023", "--iterations", "40",
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    density = nib.load(out / "density.nii.gz")
    np.testing.assert_allclose(density.affine, affine)
    params = json.loads((out / "params.json").read_text())
    assert params["dice_core"] > 0.85 and params["dice_edema"] > 0.7
    assert params["network"]["weights_version"]
    assert len(params["loss_curve"]) == params["iterations"]
    # The origin comes back in the file's own voxel indices and in world mm.
    truth_file_vox = (np.array(GRID.shape) - 1 - TRUTH["origin"] / 2.0) * [1, 1, 0] + \
        TRUTH["origin"] / 2.0 * [0, 0, 1]
    assert np.abs(np.array(params["origin_file_voxel"]) - truth_file_vox).max() < 1.5
    # A wrong convention is refused with the file named.
    bad = CliRunner().invoke(app, ["fit", str(tmp_path / "case"), "--out", str(out / "x"),
                                   "--labels", "tum", "--no-progress"])
    assert bad.exit_code == 2 and "seg.nii.gz" in bad.output


def test_held_out_evaluation_reports_network_and_refined_rows():
    from rtjax.experiments.fit_evaluation import LEVELS, evaluate_fit, format_fit_table

    result = evaluate_fit(1, iterations=3)
    (case,) = result["cases"]
    for stage in ("network", "refined"):
        assert len(case[stage]["dice"]) == len(LEVELS)
        assert all(0.0 <= d <= 1.0 for d in case[stage]["dice"])
    table = format_fit_table(result)
    assert "network" in table and "refined" in table and "cpu-0.1" in table
