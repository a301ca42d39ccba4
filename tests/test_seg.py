"""Segmentation: U-Net shapes, overfitting, checkpoints, shipped weights against a stored
output, synthetic renderer invariants, sliding window, and the `rtjax segment` CLI.

Tiny grids (<= 32^3) and one tiny model per module keep this under a minute and a half."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from rtjax.labels import TumourMasks  # noqa: E402
from rtjax.metrics import dice  # noqa: E402
from rtjax.seg import infer, model, synth  # noqa: E402
from rtjax.seg.config import config_from_dict  # noqa: E402

TINY = {
    "version": "test",
    "model": {"widths": [4, 8], "norm": "instance"},
    "render": {"patch": 16, "spacing": 2.0},
    "train": {"members": 2},
    "infer": {"patch": 32, "overlap": 0.25, "batch": 1, "tta_axes": [0]},
}


@pytest.fixture(scope="module")
def cfg():
    return config_from_dict(TINY)


@pytest.fixture(scope="module")
def phantom():
    case = synth.phantom_case()
    t1c, flair = synth.render_case(case["density"], case["wm"], case["gm"], case["spacing"], seed=0)
    return {**case, "t1c": t1c, "flair": flair, "masks": synth.case_masks(case["density"])}


@pytest.fixture(scope="module")
def tiny_weights(cfg):
    return infer.weights_from_model(model.create_ensemble(cfg.model, cfg.train.members, seed=0), cfg)


def test_parameter_count_and_shapes():
    cfg = model.UNetConfig(widths=(4, 8, 16), deep_supervision=True)
    net = nnx.eval_shape(lambda: model.UNet(cfg, rngs=nnx.Rngs(0)))  # shapes only: no compute
    conv = lambda i, o, k=27: i * o * k + o  # noqa: E731
    norm = lambda c: 2 * c  # noqa: E731
    level = lambda i, o: conv(i, o) + conv(o, o) + 2 * norm(o)  # noqa: E731
    expected = (level(2, 4) + level(4, 8) + level(8, 16)  # encoder
                + conv(16, 8, 8) + conv(8, 4, 8)  # transposed convolutions
                + level(8, 4) + level(16, 8)  # decoder
                + conv(4, 3, 1) + conv(8, 3, 1))  # head, one deep-supervision head
    assert model.count_params(net) == expected
    graphdef, state = nnx.split(net)
    x = jax.ShapeDtypeStruct((2, 16, 16, 8, 2), jnp.float32)
    out = jax.eval_shape(lambda s, xx: nnx.merge(graphdef, s)(xx), state, x)
    deep = jax.eval_shape(lambda s, xx: nnx.merge(graphdef, s).deep_logits(xx), state, x)
    assert out.shape == (2, 16, 16, 8, 3) and out.dtype == jnp.float32
    assert [o.shape for o in deep] == [(2, 16, 16, 8, 3), (2, 8, 8, 4, 3)]
    ens = nnx.eval_shape(lambda: model.create_ensemble(cfg, 3))
    assert model.count_params(ens) == 3 * expected
    g_ens, s_ens = nnx.split(ens)
    out = jax.eval_shape(lambda s, xx: model.ensemble_logits(nnx.merge(g_ens, s), xx), s_ens, x)
    assert out.shape == (3, 2, 16, 16, 8, 3)


def test_members_in_turn_give_the_vectorised_ensemble_outputs():
    cfg = model.UNetConfig(widths=(4, 8), norm="group", groups=2, spatial_dims=2, in_channels=10)
    ens = model.create_ensemble(cfg, 3, seed=1)
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 10))
    together = model.ensemble_logits(ens, x)
    in_turn = model.ensemble_logits(ens, x, sequential=True)
    assert in_turn.shape == together.shape == (3, 2, 16, 16, 3)
    assert float(jnp.abs(together[0] - together[1]).max()) > 1e-3  # the members differ
    np.testing.assert_allclose(np.asarray(in_turn), np.asarray(together), rtol=1e-4, atol=1e-5)


def test_normalise_raw_and_prenormalised_agree(phantom):
    x_raw = model.normalise(phantom["t1c"], phantom["flair"])
    brain = model.brain_mask_from_images(phantom["t1c"], phantom["flair"])
    # a pre-normalised copy: z-scored in the brain, background at its own minimum
    pre = [np.where(brain, (a - a[brain].mean()) / a[brain].std(), 0.0) for a in (phantom["t1c"], phantom["flair"])]
    pre = [np.where(brain, p, p.min() - 1.0) for p in pre]
    x_pre = model.normalise(*pre)
    np.testing.assert_allclose(x_raw, x_pre, atol=1e-4)
    assert abs(x_raw[brain].mean()) < 1e-3 and np.all(x_raw[~brain] == 0)


def test_nested_masks_from_probabilities():
    probs = np.array([[0.9, 0.9, 0.9], [0.9, 0.2, 0.9], [0.2, 0.9, 0.9], [0.9, 0.9, 0.1]])[:, None, None, :]
    m = model.probs_to_masks(probs)
    assert m.enhancing[:, 0, 0].tolist() == [True, False, False, False]
    assert m.edema[:, 0, 0].tolist() == [False, True, False, False]
    assert m.necrosis[:, 0, 0].tolist() == [False, False, False, True]
    # per-region thresholds (WT, TC, ET): a core at 0.2 counts with a TC threshold of 0.15
    m = model.probs_to_masks(probs, (0.5, 0.15, 0.95))
    assert m.enhancing[:, 0, 0].tolist() == [False] * 4
    assert m.necrosis[:, 0, 0].tolist() == [True, True, False, True]


@pytest.mark.slow
def test_tiny_model_overfits_a_synthetic_case():
    import optax

    from rtjax.seg.train import region_loss

    case = synth.phantom_case(shape=20, tumour_radius_mm=9.0, front_width_mm=1.5, offset_mm=(0, 0, 0))
    ref = synth.case_masks(case["density"])
    t1c, flair = synth.render_case(case["density"], case["wm"], case["gm"], case["spacing"], seed=1)
    x = jnp.asarray(model.normalise(t1c, flair))[None]
    y = jnp.asarray(model.masks_to_regions(ref))[None]
    net = model.UNet(model.UNetConfig(widths=(8, 16)), rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(net, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(net, opt):
        loss, grads = nnx.value_and_grad(lambda m: region_loss(m(x), y))(net)
        opt.update(net, grads)
        return loss

    for _ in range(60):
        step(net, opt)
    pred = model.probs_to_masks(np.asarray(jax.nn.sigmoid(net(x)))[0])
    for p, r in ((pred.whole, ref.whole), (pred.core, ref.core), (pred.enhancing, ref.enhancing)):
        assert dice(p, r) > 0.9


def test_checkpoint_round_trip(tmp_path, cfg, tiny_weights, phantom):
    from rtjax.ml import TrainCheckpoints
    from rtjax.seg.train import _optimizer, export_weights

    params = tiny_weights.params
    out = export_weights(params, cfg, {"note": "test"}, tmp_path / "w")
    assert (out / "MODEL_CARD.md").is_file() and (out / "metrics.json").is_file()
    loaded = infer.load_weights(out)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert loaded.config == cfg
    # a training checkpoint (parameters + optimiser state) restores exactly
    opt_state = _optimizer(cfg).init(params)
    opt_state = jax.tree.map(lambda v: v + 1.0 if jnp.issubdtype(v.dtype, jnp.floating) else v, opt_state)
    manager = TrainCheckpoints(tmp_path / "ckpt", cfg.train.keep_checkpoints)
    manager.save(3, params, opt_state)
    blank = jax.tree.map(jnp.zeros_like, params)
    p2, o2 = manager.restore(manager.latest_step(), blank, _optimizer(cfg).init(blank))
    manager.close()
    for a, b in zip(jax.tree.leaves((params, opt_state)), jax.tree.leaves((p2, o2))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_shipped_weights_reproduce_the_stored_reference(phantom):
    from pathlib import Path

    ref_path = Path(__file__).parent / "data" / "seg_reference.npz"
    stored = np.load(ref_path)
    weights = infer.load_weights()
    assert weights.version == str(stored["version"])
    masks, _ = infer.segment_arrays(phantom["t1c"], phantom["flair"], phantom["spacing"], weights=weights)
    ref = TumourMasks(necrosis=stored["labels"] == 1, enhancing=stored["labels"] == 4, edema=stored["labels"] == 2)
    for p, r in ((masks.whole, ref.whole), (masks.core, ref.core), (masks.enhancing, ref.enhancing)):
        assert dice(p, r) > 0.99
    probs = weights.probabilities(phantom["t1c"], phantom["flair"], phantom["spacing"])[0]
    np.testing.assert_allclose(probs, stored["probs"].astype(np.float32), atol=2e-3)


def test_renderer_invariants():
    case = synth.phantom_case()
    masks = synth.case_masks(case["density"])
    normal_wm = (case["wm"] > 0.9) & ~masks.whole
    for seed in range(3):
        t1c, flair = synth.render_case(case["density"], case["wm"], case["gm"], case["spacing"], seed=seed)
        assert t1c[masks.enhancing].mean() > t1c[masks.necrosis].mean()
        assert flair[masks.edema].mean() > flair[normal_wm].mean()
        assert np.all(t1c >= 0) and np.all(flair >= 0)
    # training views: nested region targets, z-scored inputs
    bank = {k: jnp.asarray(case[k]) for k in ("density", "wm", "gm")}
    bank["brain"] = jnp.asarray(synth.brain_from_tissue(case["wm"], case["gm"]), jnp.float32)
    rcfg = synth.RenderConfig(patch=16, spacing=3.0, shift_mm=3.0)
    views = jax.jit(jax.vmap(lambda k: synth.render_sample(k, bank["density"], bank["wm"], bank["gm"],
                                                           bank["brain"], 2.0, rcfg)))
    x, y = views(jax.random.split(jax.random.key(0), 4))
    x, y = np.asarray(x), np.asarray(y)
    assert x.shape == (4, 16, 16, 16, 2) and y.shape == (4, 16, 16, 16, 3)
    assert np.all(y[..., 2] <= y[..., 1]) and np.all(y[..., 1] <= y[..., 0]) and y[..., 0].any()
    assert np.isfinite(x).all()


def test_sliding_window_equals_whole_volume(tiny_weights, phantom):
    x = model.normalise(phantom["t1c"], phantom["flair"])[:16, :24, :16]
    whole = np.asarray(tiny_weights.probs(jnp.asarray(x)[None]))[0]
    fn = lambda t: tiny_weights.probs(jnp.asarray(t))  # noqa: E731
    covered = infer.sliding_window(fn, x, 32, overlap=0.25, divisor=2)
    np.testing.assert_allclose(covered, whole, atol=1e-5)
    # overlapping windows of a voxel-wise function blend back to that function
    tiled = infer.sliding_window(lambda t: t * 2.0, x, 8, overlap=0.5, batch=3, weighting="linear")
    np.testing.assert_allclose(tiled, 2 * x, atol=1e-5)
    assert infer.window_starts(24, 8, 0.5) == [0, 4, 8, 12, 16]


def _write_case(folder, phantom, names=("t1c", "flair")):
    import nibabel as nib

    folder.mkdir(parents=True, exist_ok=True)
    affine = np.diag([-2.0, -2.0, 2.0, 1.0])  # LPS, like BraTS
    for name in names:
        data = np.flip(phantom[name], axis=(0, 1)).astype(np.int16)
        nib.save(nib.Nifti1Image(data, affine), folder / f"{name}.nii.gz")
    return folder


def test_cli_segment(tmp_path, phantom):
    import nibabel as nib
    from typer.testing import CliRunner

    from rtjax.cli import app

    runner = CliRunner()
    case = _write_case(tmp_path / "case", phantom)
    result = runner.invoke(app, ["segment", str(case), "--out", str(tmp_path / "out"), "--uncertainty"])
    assert result.exit_code == 0, result.output
    seg = nib.load(tmp_path / "out" / "segmentation.nii.gz")
    unc = nib.load(tmp_path / "out" / "segmentation_uncertainty.nii.gz")
    assert seg.get_data_dtype() == np.uint8 and unc.get_data_dtype() == np.float32
    assert seg.shape == (32, 32, 32) and np.allclose(seg.affine, np.diag([-2.0, -2.0, 2.0, 1.0]))
    assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 1, 2, 4}
    assert "volumes (mL)" in result.output
    # BraTS 2023 convention: enhancing is 3
    result = runner.invoke(app, ["segment", str(case), "--out", str(tmp_path / "out23"), "--labels", "brats2023",
                                 "--uncertainty"])
    assert result.exit_code == 0, result.output
    labels23 = np.asarray(nib.load(tmp_path / "out23" / "segmentation.nii.gz").dataobj)
    labels21 = np.asarray(seg.dataobj)
    assert set(np.unique(labels23)) <= {0, 1, 2, 3}
    np.testing.assert_array_equal(labels23 == 3, labels21 == 4)
    # missing FLAIR: a clear error, no output
    missing = _write_case(tmp_path / "no_flair", phantom, names=("t1c",))
    result = runner.invoke(app, ["segment", str(missing), "--out", str(tmp_path / "out2")])
    assert result.exit_code == 2
    assert "missing required modality 'flair'" in result.output
    assert not (tmp_path / "out2").exists()


def test_segment_case_errors(tmp_path, phantom):
    import nibabel as nib

    from rtjax.errors import InputError

    folder = _write_case(tmp_path / "grid", phantom, names=("t1c",))
    nib.save(nib.Nifti1Image(phantom["flair"][:, :, :30], np.diag([-2.0, -2.0, 2.0, 1.0])), folder / "flair.nii.gz")
    with pytest.raises(InputError, match="grid shape"):
        infer.segment_case(folder)
    bad = phantom["flair"].copy()
    bad[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(bad, np.diag([-2.0, -2.0, 2.0, 1.0])), folder / "flair.nii.gz")
    with pytest.raises(InputError, match="non-finite"):
        infer.segment_case(folder)


def test_run_segments_a_case_without_seg(tmp_path, data_dir):
    """`rtjax run` on a case with images and tissue but no seg uses the shipped network: a real
    BraTS case (brats2015 pat0001, every second voxel: a 2 mm grid) with flat tissue maps
    inside its brain mask (the shipped network is trained on real MRI and finds nothing on
    synthetic renderings)."""
    import json

    import nibabel as nib

    from rtjax.pipeline import run_case

    source = data_dir / "brats2015" / "brats_2013_pat0001_1"
    case = tmp_path / "case"
    case.mkdir()
    files = {"t1c": "T1c_subtrMeanDivStd.nii.gz", "flair": "Flair_subtrMeanDivStd.nii.gz",
             "brain_mask": "brainmask.nii.gz"}
    for role, name in files.items():
        img = nib.load(source / name)
        data = np.asarray(img.dataobj, np.float32)[::2, ::2, ::2]
        nib.save(nib.Nifti1Image(data, img.affine @ np.diag([2.0, 2.0, 2.0, 1.0])), case / f"{role}.nii.gz")
    brain = nib.load(case / "brain_mask.nii.gz")
    inside = np.asarray(brain.dataobj) > 0
    for name, fraction in (("wm", 0.6), ("gm", 0.4)):
        nib.save(nib.Nifti1Image(np.where(inside, fraction, 0.0).astype(np.float32), brain.affine), case / f"{name}.nii.gz")
    with pytest.warns(UserWarning, match="no seg; segmented from t1c and flair"):
        run_case(case, tmp_path / "out", labels="brats2021", initial="heuristic", fit_iterations=5,
                 margin_mm=10.0, progress=False)
    label_array, _, ref = infer.segment_case(case)
    assert np.isin(label_array, (1, 4)).sum() > 0  # a core to grow the CTV from
    direct = infer.write_segmentation(tmp_path / "direct", label_array, None, ref)[0]
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "out" / "segmentation.nii.gz").dataobj),
                                  np.asarray(nib.load(direct).dataobj))
    params = json.loads((tmp_path / "out" / "params.json").read_text())
    assert params["inputs"]["seg"] == f"rtjax.seg {infer.load_weights().version}"
