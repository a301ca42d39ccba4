"""The learned inverse model: generator, crop geometry, network, checkpoints, shipped weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from growth.inverse import (
    GeneratorConfig,
    SamplingRanges,
    crop_around,
    draw_cases,
    masks_to_inputs,
    simulate_anisotropic_cases,
    simulate_cases,
    threshold_inputs,
)
from rtjax.inverse import (
    DEFAULT_WEIGHTS,
    InverseConfig,
    NetConfig,
    TrainConfig,
    config_from_dict,
    create_ensemble,
    export_weights,
    load_config,
    load_weights,
    predict,
)
from rtjax.inverse.train import train_and_evaluate
from rtjax.ml import count_params, ensemble_apply, learning_rate_factor

TINY_GEN = GeneratorConfig(
    sim_shape=24, sim_spacing=2.0, net_shape=16, net_spacing=2.0,
    ranges=SamplingRanges(radius_mm=(3.0, 7.0), sqrt_dw_t_max=5.0),
)
TINY_NET = NetConfig(net_shape=16, patch=4, widths=(8, 16), blocks=1, head=16, groups=4)


@pytest.fixture(scope="module")
def atlas():
    """A synthetic 'atlas': a tissue ball (wm 0.7, gm 0.3), 2 mm voxels."""
    n = 48
    idx = np.indices((n, n, n)).astype(np.float32)
    r = np.sqrt(((idx - (n - 1) / 2) ** 2).sum(0))
    inside = (r <= 21).astype(np.float32)
    return 0.7 * inside, 0.3 * inside, (2.0, 2.0, 2.0)


@pytest.fixture(scope="module")
def simulated(atlas):
    wm, gm, spacing = atlas
    rng = np.random.default_rng(0)
    cases = draw_cases(TINY_GEN, (wm + gm) >= 0.5, spacing, rng, 6)
    out = jax.device_get(simulate_cases(TINY_GEN, wm, gm, spacing, cases))
    return cases, out


# --------------------------------------------------------------------------- generator


def test_draws_cover_the_documented_ranges(atlas):
    wm, gm, spacing = atlas
    cases = draw_cases(TINY_GEN, (wm + gm) >= 0.5, spacing, np.random.default_rng(1), 200)
    r = TINY_GEN.ranges
    assert np.all((cases["dw"] >= r.dw[0]) & (cases["dw"] <= r.dw[1]))
    assert np.all((cases["rho"] >= r.rho[0]) & (cases["rho"] <= r.rho[1]))
    assert np.all((cases["t_days"] >= r.t_days[0]) & (cases["t_days"] <= r.t_days[1]))
    assert np.all((cases["u_t1"] >= 0.5) & (cases["u_t1"] <= 0.85))
    assert np.all((cases["u_fl"] >= 0.05) & (cases["u_fl"] <= 0.5))
    np.testing.assert_allclose(cases["sqrt_dw_t"] ** 2, cases["dw"] * cases["t_days"], rtol=1e-4)
    np.testing.assert_allclose(cases["sqrt_rho_t"] ** 2, cases["rho"] * cases["t_days"], rtol=1e-4)
    assert cases["sqrt_dw_t"].max() <= r.sqrt_dw_t_max
    # origins are atlas voxels with tissue
    vox = np.round(cases["origin_atlas_mm"] / np.asarray(spacing)).astype(int)
    assert np.all((wm + gm)[tuple(vox.T)] >= TINY_GEN.origin_tissue_min)
    # transforms: rotation x flip x scale within the jitter
    svals = np.linalg.svd(cases["transform"], compute_uv=False)
    assert np.all(np.abs(svals - 1) <= TINY_GEN.scale_jitter + 1e-5)


def test_generator_masks_obey_the_thresholds(simulated):
    cases, out = simulated
    density = jnp.asarray(out["density"])
    for k in range(len(cases["dw"])):
        c = density[k]
        u_t1, u_fl = float(cases["u_t1"][k]), float(cases["u_fl"][k])
        x, _ = threshold_inputs(c, out["wm"][k], out["gm"][k], u_t1, u_fl, TINY_GEN.net_spacing)
        core, edema = np.asarray(x[..., 0]), np.asarray(x[..., 1])
        c = np.asarray(c)
        np.testing.assert_array_equal(core == 1, c >= u_t1)
        np.testing.assert_array_equal(edema == 1, (c >= u_fl) & (c < u_t1))
        assert not np.any((core == 1) & (edema == 1))


def test_generator_origins_in_tissue_and_accepted_cases_fit_the_crop(simulated):
    cases, out = simulated
    assert np.all(out["tissue_at_origin"] > 0.5)
    ok = out["accepted"]
    assert ok.any()
    for k in np.flatnonzero(ok):
        c = out["density"][k]
        assert (c >= TINY_GEN.ranges.u_fl[1]).any()  # visible for every threshold draw
        widest = c >= TINY_GEN.ranges.u_fl[0]
        for axis in range(3):  # nothing visible on the crop's border
            assert not np.take(widest, [0, -1], axis=axis).any()
        # the crop centre is the visible centre of mass; the origin lies near it
        assert np.linalg.norm(out["origin_rel_mm"][k]) < TINY_GEN.fov_mm / 2


def _along_x_tensor(shape, anisotropy=6.0):
    """A trace-3 shape tensor field with its principal axis along array axis 0."""
    d = np.array([anisotropy, 1.0, 1.0]) * 3 / (anisotropy + 2)
    t6 = np.zeros((6, *shape), np.float32)
    t6[0], t6[3], t6[5] = d  # xx, yy, zz
    return t6


def _second_moments(c, spacing):
    idx = np.indices(c.shape).reshape(3, -1) * spacing
    w = c.reshape(-1) / c.sum()
    mean = idx @ w
    return ((idx - mean[:, None]) ** 2) @ w


def test_anisotropic_generator_obeys_thresholds_and_grows_along_the_fibres(atlas):
    wm, gm, spacing = atlas
    cases = draw_cases(TINY_GEN, (wm + gm) >= 0.5, spacing, np.random.default_rng(3), 2)
    tensor = _along_x_tensor(wm.shape)
    aniso = simulate_anisotropic_cases(TINY_GEN, wm, gm, tensor, spacing, cases)
    iso = jax.device_get(simulate_cases(TINY_GEN, wm, gm, spacing, cases))
    assert aniso["density"].shape == iso["density"].shape
    for k in range(2):
        c = aniso["density"][k]
        u_t1, u_fl = float(cases["u_t1"][k]), float(cases["u_fl"][k])
        x, _ = threshold_inputs(c, aniso["wm"][k], aniso["gm"][k], u_t1, u_fl, TINY_GEN.net_spacing)
        np.testing.assert_array_equal(np.asarray(x[..., 0]) == 1, c >= u_t1)
        np.testing.assert_array_equal(np.asarray(x[..., 1]) == 1, (c >= u_fl) & (c < u_t1))
        assert np.all((c >= 0) & (c <= 1))
        # the tissue is the isotropic generator's; the tumour is longer along x (rotations
        # of the anatomy are at most 8 degrees; the first case barely grows beyond its
        # seed), the isotropic one is not
        np.testing.assert_allclose(aniso["wm"][k], iso["wm"][k], atol=1e-5)
        m_aniso = _second_moments(c, TINY_GEN.net_spacing)
        m_iso = _second_moments(iso["density"][k], TINY_GEN.net_spacing)
        assert m_aniso[0] > 1.25 * m_aniso[1:].mean()
        assert m_iso[0] < 1.05 * m_iso[1:].mean()


# --------------------------------------------------------------------------- geometry


def test_crop_puts_a_known_blob_at_the_centre():
    spacing = np.array([1.0, 1.5, 3.0])
    shape = (40, 30, 20)
    centre = np.array([17, 11, 8])
    mm = np.stack(np.indices(shape), -1) * spacing
    blob = np.exp(-((mm - centre * spacing) ** 2).sum(-1) / (2 * 4.0**2)).astype(np.float32)
    crop = np.asarray(crop_around(jnp.asarray(blob), centre, spacing, (15, 15, 15), 2.0))
    assert crop.shape == (15, 15, 15)
    assert np.unravel_index(np.argmax(crop), crop.shape) == (7, 7, 7)
    np.testing.assert_allclose(crop[7, 7, 7], 1.0, atol=1e-6)
    # nearest-neighbour crop of a mask keeps the values binary
    mask = crop_around(jnp.asarray(blob > 0.5, jnp.float32), centre, spacing, 15, 2.0, order=0)
    assert set(np.unique(np.asarray(mask))) <= {0.0, 1.0}


def test_crop_round_trip_on_a_linear_pattern_with_anisotropic_spacing():
    spacing = np.array([0.9, 1.3, 2.5])
    shape = (50, 40, 24)
    mm = np.stack(np.indices(shape), -1) * spacing
    coeff = np.array([0.3, -0.2, 0.5])
    pattern = (mm @ coeff + 1.0).astype(np.float32)  # trilinear interpolation is exact
    centre_vox = np.array([24.3, 19.6, 11.2])
    out_shape, out_spacing = (16, 16, 16), 2.0
    crop = np.asarray(crop_around(jnp.asarray(pattern), centre_vox, spacing, out_shape, out_spacing))
    offsets = (np.arange(16) - 7.5) * out_spacing
    grid = np.stack(np.meshgrid(offsets, offsets, offsets, indexing="ij"), -1)
    expected = (centre_vox * spacing + grid) @ coeff + 1.0
    np.testing.assert_allclose(crop, expected, atol=2e-4)
    # and back: crop the crop onto the patient grid around the patient voxel of its centre
    back = np.asarray(crop_around(
        jnp.asarray(crop), np.full(3, 7.5) + (np.array([20, 15, 9]) - centre_vox) * spacing / out_spacing,
        out_spacing, (9, 9, 5), spacing,
    ))
    # output voxel j of `back` is patient voxel [20,15,9] + (j - (m-1)/2)
    patient = pattern[16:25, 11:20, 7:12]
    np.testing.assert_allclose(back, patient, atol=3e-4)


def test_simulation_box_samples_the_atlas_through_origin_and_transform():
    """Box voxel j sits at atlas mm origin + T (j h - centre): exact for a linear field."""
    from growth.inverse import _rotation, box_affine, box_centre_mm, resample_affine

    spacing = np.array([1.0, 1.5, 2.0])
    mm = np.stack(np.indices((100, 70, 50)), -1) * spacing
    coeff = np.array([0.3, -0.2, 0.5])
    field = (mm @ coeff + 1.0).astype(np.float32)
    origin = np.array([50.3, 52.1, 49.7])
    transform = 1.05 * _rotation(np.random.default_rng(0), 60.0) @ np.diag([1.0, -1.0, 1.0])
    matrix, offset = box_affine(TINY_GEN, spacing, jnp.asarray(origin, jnp.float32),
                                jnp.asarray(transform, jnp.float32))
    n, h = TINY_GEN.sim_shape, TINY_GEN.sim_spacing
    box = np.asarray(resample_affine(jnp.asarray(field), matrix, offset, (n,) * 3))
    box_mm = np.stack(np.indices((n,) * 3), -1) * h - np.asarray(box_centre_mm(TINY_GEN))
    expected = (origin + box_mm @ transform.T) @ coeff + 1.0
    np.testing.assert_allclose(box, expected, atol=2e-3)


def test_observe_copies_the_box_on_the_network_grid():
    """With equal spacings the crop is a block of box voxels, moved less than half a voxel
    from the visible centre of mass."""
    from growth.inverse import observe

    n, h = TINY_GEN.sim_shape, TINY_GEN.sim_spacing
    mm = np.stack(np.indices((n,) * 3), -1) * h
    c = np.exp(-((mm - np.array([21.3, 24.7, 19.1])) ** 2).sum(-1) / (2 * 5.0**2)).astype(np.float32)
    wm = np.random.default_rng(0).uniform(size=c.shape).astype(np.float32)
    out = observe(TINY_GEN, jnp.asarray(c), jnp.asarray(wm), jnp.asarray(1 - wm), 0.6, 0.2)
    visible = c >= 0.2
    com = (np.argwhere(visible) * h).mean(0)
    centre = np.asarray(out["com_box_mm"])
    assert np.all(np.abs(centre - com) <= h / 2 + 1e-5)
    start = np.round(centre / h - (TINY_GEN.net_shape - 1) / 2).astype(int)
    block = tuple(slice(s, s + TINY_GEN.net_shape) for s in start)
    np.testing.assert_allclose(np.asarray(out["density"]), c[block], atol=1e-6)
    np.testing.assert_allclose(np.asarray(out["wm"]), wm[block], atol=1e-6)
    assert bool(out["accepted"])


def test_box_tensor_is_the_atlas_tensor_in_box_axes():
    """A constant atlas tensor D becomes Q^T D Q on the box (Q = transform / its scale)."""
    from growth.inverse import _box_tensor, _rotation
    from growth.tensor import components_to_matrix

    atlas_tensor = _along_x_tensor((40, 40, 40))
    q = _rotation(np.random.default_rng(1), 60.0)
    box = _box_tensor(TINY_GEN, jnp.asarray(atlas_tensor), jnp.asarray([2.0, 2.0, 2.0]),
                      jnp.asarray([40.0, 40.0, 40.0]), jnp.asarray(1.05 * q, jnp.float32))
    d = np.asarray(components_to_matrix(jnp.asarray(atlas_tensor[:, 0, 0, 0])))
    centre = np.asarray(components_to_matrix(box[:, 6:18, 6:18, 6:18]))
    np.testing.assert_allclose(centre, np.broadcast_to(q.T @ d @ q, centre.shape), atol=1e-5)


# --------------------------------------------------------------------------- network


def test_network_shapes_and_parameter_count():
    model = create_ensemble(TINY_NET, members=2, seed=0)
    x = jnp.zeros((3, 16, 16, 16, 4))
    y = ensemble_apply(model, x)
    assert y.shape == (2, 3, 7)
    assert np.all(np.isfinite(np.asarray(y)))
    # embed 4^3*4 -> 8; block(8); conv 8 -> 16 stride 2; block(16); 2^3*16 -> 16 -> 7
    conv = lambda cin, cout: 27 * cin * cout + cout  # noqa: E731
    block = lambda w: 2 * conv(w, w) + 2 * (2 * w)  # noqa: E731  (two convs, two group norms)
    per_member = (256 * 8 + 8) + block(8) + conv(8, 16) + block(16) + (128 * 16 + 16) + (16 * 7 + 7)
    assert count_params(model) == 2 * per_member == 2 * 25135
    # members differ (independent initialisation)
    y = ensemble_apply(model, jax.random.uniform(jax.random.key(0), (1, 16, 16, 16, 4)))
    assert not np.allclose(y[0], y[1])


def test_configs_load_and_build():
    for name in ("inverse_cpu", "inverse_h100", "inverse_tiny"):
        cfg = load_config(f"configs/{name}.yaml")
        abstract = nnx.eval_shape(lambda: create_ensemble(cfg.net, cfg.train.members))
        assert count_params(abstract) * 4 <= 20e6  # the shipped weights stay under 20 MB
        assert cfg.net.net_shape == cfg.generator.net_shape
    with pytest.raises(ValueError, match="unknown keys"):
        config_from_dict({"train": {"stepz": 3}})


# --------------------------------------------------------------------------- training


def test_checkpoint_resume(tmp_path, atlas):
    cfg = InverseConfig(
        version="test", generator=TINY_GEN, net=TINY_NET,
        train=TrainConfig(members=2, train_cases=8, val_cases=2, val_resim_cases=2,
                          shard_size=8, sim_batch=8, batch_size=4, steps=5,
                          checkpoint_every=2, keep_checkpoints=3, log_every=1),
    )
    first = train_and_evaluate(cfg, tmp_path, stop_after=3, atlas=atlas)
    assert (first["start_step"], first["step"]) == (0, 3)
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [2, 3]
    assert (tmp_path / "config.yaml").is_file()
    second = train_and_evaluate(cfg, tmp_path, evaluate_at_end=False, atlas=atlas)
    assert (second["start_step"], second["step"]) == (3, 5)
    assert second["data_seconds"] < first["data_seconds"]  # shards reused, not regenerated
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [3, 4, 5]


def test_max_seconds_stops_training_and_still_exports_loadable_weights(tmp_path, atlas):
    cfg = InverseConfig(
        version="budget", generator=TINY_GEN, net=TINY_NET,
        train=TrainConfig(members=2, train_cases=64, val_cases=2, val_resim_cases=2,
                          shard_size=8, sim_batch=8, batch_size=4, steps=10**6,
                          checkpoint_every=10**6, log_every=50, max_seconds=12.0,
                          data_fraction=0.2, reserve_seconds=4.0),
    )
    out = train_and_evaluate(cfg, tmp_path, atlas=atlas)
    assert out["stopped_by"] == "time" and 0 < out["step"] < cfg.train.steps
    assert 8 <= out["train_cases"] <= 64  # generation also kept to its share of the budget
    assert out["metrics"]["stopped_by"] == "time" and out["metrics"]["steps"] == out["step"]
    loaded = load_weights(out["weights"])
    assert loaded.version == "budget"
    x = jax.random.uniform(jax.random.key(2), (1, 16, 16, 16, 4))
    assert np.all(np.isfinite(np.asarray(loaded.apply(x))))
    # the run was checkpointed where it stopped: a second call resumes there
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == out["step"]


def test_learning_rate_factor_warms_up_then_decays():
    assert learning_rate_factor(0, 0.0, 10) == 0.0
    assert learning_rate_factor(5, 0.0, 10) == 0.5
    assert learning_rate_factor(10, 0.0, 10) == pytest.approx(1.0)
    assert learning_rate_factor(10, 0.5, 10) == pytest.approx(0.51)
    assert learning_rate_factor(99, 1.0, 10) == pytest.approx(0.02)
    assert learning_rate_factor(99, 3.0, 10) == pytest.approx(0.02)


def test_export_and_load_weights_round_trip(tmp_path):
    cfg = InverseConfig(version="roundtrip", generator=TINY_GEN, net=TINY_NET,
                        train=TrainConfig(members=2))
    model = create_ensemble(TINY_NET, 2, seed=3)
    mean, scale = np.zeros(7, np.float32), np.ones(7, np.float32)
    path = export_weights(model, cfg, mean, scale, {"note": "test"}, tmp_path / "w")
    loaded = load_weights(path)
    assert loaded.version == "roundtrip"
    x = jax.random.uniform(jax.random.key(1), (1, 16, 16, 16, 4))
    np.testing.assert_allclose(loaded.apply(x), ensemble_apply(model, x), atol=1e-5)


# --------------------------------------------------------------------------- shipped weights


def _synthetic_case(spacing=(1.2, 1.2, 1.5), shape=(80, 80, 64), origin_vox=(41.0, 37.0, 30.0)):
    mm = np.stack(np.indices(shape), -1) * np.asarray(spacing)
    r = np.linalg.norm(mm - np.asarray(origin_vox) * np.asarray(spacing), axis=-1)
    core = r <= 7.0
    edema = (r <= 15.0) & ~core
    brain = np.linalg.norm(mm - mm.mean((0, 1, 2)), axis=-1) <= 45.0
    return core, edema, 0.7 * brain, 0.3 * brain, spacing, np.asarray(origin_vox)


@pytest.mark.skipif(not (DEFAULT_WEIGHTS / "config.yaml").is_file(), reason="no shipped weights")
def test_shipped_weights_predict_a_synthetic_case():
    weights = load_weights()
    assert weights.config.train.members >= 1
    core, edema, wm, gm, spacing, origin_vox = _synthetic_case()
    out = predict(core, edema, wm, gm, spacing)
    r = weights.config.generator.ranges
    assert out["weights_version"] == weights.version
    assert np.all(np.isfinite(out["origin_mm"])) and out["origin_mm"].shape == (3,)
    # a symmetric tumour: the origin lies inside the visible tumour
    assert np.linalg.norm(out["origin_mm"] - origin_vox * np.asarray(spacing)) < 15.0
    np.testing.assert_allclose(out["origin_vox"], out["origin_mm"] / np.asarray(spacing))
    assert 0.1 <= out["sqrt_dw_t"] <= r.sqrt_dw_t_max
    assert 0.1 <= out["sqrt_rho_t"] < 20.0
    assert r.u_t1[0] <= out["u_t1"] <= r.u_t1[1]
    assert r.u_fl[0] <= out["u_fl"] <= r.u_fl[1]
    spread = out["ensemble_spread"]
    assert np.all(np.isfinite(spread["origin_mm"])) and spread["sqrt_dw_t"] >= 0
    assert out["warnings"] == []
    with pytest.raises(ValueError, match="empty"):
        predict(np.zeros_like(core), np.zeros_like(edema), wm, gm, spacing)


def test_predict_warns_when_the_tumour_exceeds_the_field_of_view(tmp_path):
    cfg = InverseConfig(version="fov", generator=TINY_GEN, net=TINY_NET, train=TrainConfig(members=1))
    path = export_weights(create_ensemble(TINY_NET, 1), cfg, np.zeros(7, np.float32),
                          np.ones(7, np.float32), {}, tmp_path / "w")
    core, edema, wm, gm, spacing, _ = _synthetic_case()
    out = predict(core, edema, wm, gm, spacing, weights=path)  # 32 mm field of view
    assert out["warnings"] and "field of view" in out["warnings"][0]
    assert out["ensemble_spread"]["sqrt_dw_t"] == 0.0


def test_masks_to_inputs_binarises_resampled_fractions():
    core = jnp.array([0.6, 0.2, 0.0, 0.4]).reshape(1, 1, 4)
    edema = jnp.array([0.3, 0.4, 0.3, 0.0]).reshape(1, 1, 4)
    x, _ = masks_to_inputs(core, edema, core, edema, 2.0)
    np.testing.assert_array_equal(np.asarray(x[0, 0, :, 0]), [1, 0, 0, 0])
    np.testing.assert_array_equal(np.asarray(x[0, 0, :, 1]), [0, 1, 0, 0])
