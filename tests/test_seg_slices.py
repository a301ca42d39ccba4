"""The 2.5-D segmentation model: real-case loader on every layout, normalisation, slices,
a tiny train -> checkpoint -> resume -> export -> segment round trip."""

import dataclasses
from pathlib import Path

import jax
import nibabel as nib
import numpy as np
import pytest
from flax import nnx
from typer.testing import CliRunner

from rtjax.cli import app
from rtjax.config import read_yaml
from rtjax.seg.cases import find_labelled_cases, prepare_case, robust_normalise
from rtjax.seg.infer import enhancing_voxels, load_weights, probs_to_case_masks, segment_arrays
from rtjax.seg.postprocessing import choose_postprocessing
from rtjax.seg.slice_train import (SliceSegConfig, SliceTrainConfig, _loss, fold_of,
                                   load_slice_config, paste_tumour, sample_batch, train_slices, warm_start_params,
                                   blur_slices, intensity_curves, CURVE_KNOTS, _augment,
                                   _random_curves, _train_view, make_train_step,
                                   pack_finished_models, unpack_finished_models)
from rtjax.experiments.seg_benchmark import trained_step_seconds
from rtjax.seg.slices import (TTA_FLIPS, SliceModelConfig, SliceWeights, combine_passes, context_slices, from_view,
                              predict_volume, to_view)
from rtjax.seg.model import UNet, UNetConfig
from seg_synthetic import synthetic_cohort

@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("labelled")
    return root, synthetic_cohort(root)


def test_cases_are_found_in_both_brats_namings_with_their_label_conventions(cohort):
    root, truth = cohort
    cases = find_labelled_cases(root)
    assert [c.name for c in cases] == ["P2", "download/P1"]
    assert [c.convention for c in cases] == ["brats2023", "brats2021"]
    for case in cases:
        labels, brain = truth[case.name]
        prepared = prepare_case(case, spacing_mm=2.0)  # already on the working grid
        et = 3 if case.convention == "brats2023" else 4
        np.testing.assert_array_equal(prepared.regions[..., 0], labels > 0)
        np.testing.assert_array_equal(prepared.regions[..., 1], (labels == 1) | (labels == et))
        np.testing.assert_array_equal(prepared.regions[..., 2], labels == et)
        np.testing.assert_array_equal(prepared.brain, brain)
        assert np.abs(prepared.x).max() < 6  # the 32767 outliers are clipped away


def test_a_1mm_case_on_the_2mm_grid_keeps_each_regions_share_and_soft_targets_use_it(tmp_path):
    """A slab of edema (x = 4 .. 15 mm) on a 1 mm grid: working voxels far inside have share
    1, far outside 0; across the edge at a working-voxel boundary (x = 4 mm) the shares are
    symmetric (they sum to 1), the edge that halves a working voxel (x = 15 mm) gives 0.5,
    and the volume is kept; soft targets train on these shares, hard ones on share >= 0.5."""
    folder = tmp_path / "P3"
    folder.mkdir()
    one_mm = lambda data, name: nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4)), str(folder / name))
    labels = np.zeros((32, 32, 32), np.int16)
    labels[4:15] = 2  # edema from x = 4 to 14 mm (11 voxels), so its far edge is mid-voxel at 2 mm
    brain = np.zeros(labels.shape, bool)
    brain[2:30, 2:30, 2:30] = True
    one_mm(np.where(brain, 100.0 + 50 * (labels > 0), 0).astype(np.int16), "P3_t1ce.nii.gz")
    one_mm(np.where(brain, 100.0 + 80 * (labels > 0), 0).astype(np.int16), "P3_flair.nii.gz")
    one_mm(labels, "P3_seg.nii.gz")
    prepared = prepare_case(find_labelled_cases(tmp_path)[0], spacing_mm=2.0)
    share = prepared.regions[:, 8, 8, 0]  # along x, away from the other edges
    assert prepared.regions.shape == (16, 16, 16, 3) and prepared.regions.dtype == np.float32
    np.testing.assert_allclose(share[[0, 3, 4, 5, 9, 10, 15]], [0, 1, 1, 1, 0, 0, 0], atol=1e-6)
    np.testing.assert_allclose(share[7], 0.5, atol=1e-6)  # 2 mm voxel 7 covers x = 14, 15 mm: half inside
    np.testing.assert_allclose([share[1] + share[2], share[6] + share[8]], [1, 1], atol=1e-6)
    assert 0 < share[1] < 0.5 < share[2] < 1
    np.testing.assert_allclose(share.sum() * 2, 11, atol=1e-5)  # 11 mm of edema along the line
    np.testing.assert_array_equal(prepared.region_masks, prepared.regions >= 0.5)
    assert not prepared.regions[..., 1:].any()
    hard, soft = (_train_view(prepared, SliceSegConfig(train=SliceTrainConfig(crop=16, soft_targets=flag)))
                  for flag in (False, True))
    # the slices run along z (axial view): y is (Z, X, Y, 3)
    np.testing.assert_array_equal(soft["y"][8, :, 8, 0], share)
    np.testing.assert_array_equal(hard["y"][8, :, 8, 0], (share >= 0.5).astype(np.float32))
    np.testing.assert_array_equal(hard["tumour"], soft["tumour"])


def test_robust_normalisation_ignores_outliers_and_the_scanner_scale():
    rng = np.random.default_rng(0)
    brain = np.zeros((20, 20, 20), bool)
    brain[2:18, 2:18, 2:18] = True
    image = np.where(brain, 100 + 10 * rng.standard_normal(brain.shape), 0)
    spiked = image.copy()
    spiked[5, 5, 5] = 32767
    a, b, c = (robust_normalise(i, brain) for i in (image, spiked, 30 * image))
    np.testing.assert_allclose(c, a, atol=1e-5)
    np.testing.assert_allclose(np.delete(b.ravel(), np.ravel_multi_index((5, 5, 5), b.shape)),
                               np.delete(a.ravel(), np.ravel_multi_index((5, 5, 5), a.shape)), atol=0.02)
    assert b[5, 5, 5] < 3.5 and np.all(a[~brain] == 0)
    assert abs(a[brain].mean()) < 1e-5 and abs(a[brain].std() - 1) < 1e-4


def test_context_slices_stack_neighbours_with_repeated_edges_and_predict_round_trips():
    x = np.arange(3 * 4 * 5 * 2, dtype=np.float32).reshape(3, 4, 5, 2)
    s = context_slices(x, 1)
    assert s.shape == (5, 3, 4, 6)
    np.testing.assert_array_equal(s[0], np.concatenate([x[:, :, 0], x[:, :, 0], x[:, :, 1]], -1))
    np.testing.assert_array_equal(s[4], np.concatenate([x[:, :, 3], x[:, :, 4], x[:, :, 4]], -1))
    # an `apply` that returns the centre slice's channels: the volume comes back unchanged
    out = predict_volume(lambda b: b[..., 2:5], x, context=1, divisor=4, batch=2)
    assert out.shape == (3, 4, 5, 3)
    np.testing.assert_array_equal(out[..., :2], x)
    assert fold_of(0, 3) == 0 and fold_of(4, 3) == 1
    # slices whose whole context is empty (outside the brain) are skipped and give 0
    sparse = np.zeros((3, 4, 9, 2), np.float32)
    sparse[..., 4, :] = 1.0
    seen = []
    out = predict_volume(lambda b: seen.append(len(b)) or b[..., 2:5] + 1.0, sparse, context=1, divisor=4, batch=2)
    assert seen == [2, 2]  # slices 3, 4, 5 in two calls of the batch size
    np.testing.assert_array_equal(out[..., 3, 0], 1.0)  # context (0, 0, 1): output 0 + 1
    np.testing.assert_array_equal(out[..., 4, 0], 2.0)
    np.testing.assert_array_equal(out[..., [0, 1, 2, 6, 7, 8], :], 0.0)


def test_the_recipe_step_fits_a_fixed_batch_and_the_benchmark_times_it():
    """`make_train_step` (augmentation, BCE + soft Dice, Adam) lowers the loss of one batch
    over a few steps; the benchmark times that same step."""
    model = SliceModelConfig(unet=UNetConfig(widths=(4, 8), norm="group", in_channels=10, spatial_dims=2))
    cfg = SliceSegConfig(model=model, train=SliceTrainConfig(batch=4, crop=16, steps=60, warmup_steps=1,
                                                             learning_rate=1e-2, blur=0.5, contrast=0.5))
    step, tx = make_train_step(cfg)
    x = np.zeros((4, 16, 16, 10), np.float32)
    x[:, 2:14, 2:14] = 1.0
    x[:, 5:10, 5:10] = 3.0  # a bright square: the tumour
    y = np.zeros((4, 16, 16, 3), np.float32)
    y[:, 5:10, 5:10] = 1.0
    params = nnx.split(UNet(model.unet, rngs=nnx.Rngs(0)))[1]
    state, losses = (params, tx.init(params)), []
    for i in range(60):
        *state, loss = step(*state, jax.random.key(i), x, y)
        losses.append(float(loss))
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])  # 1.49 -> 1.05 when written
    assert trained_step_seconds(cfg, repeats=1) > 0


def test_tiny_training_checkpoints_resumes_exports_and_segments(cohort, tmp_path, capsys):
    root, truth = cohort
    model = SliceModelConfig(unet=UNetConfig(widths=(4, 8), norm="group", in_channels=10, spatial_dims=2),
                             members=2, batch=8)
    train = SliceTrainConfig(data_root=str(root), folds=2, batch=4, crop=16, steps=3, warmup_steps=1,
                             log_every=1, learning_rate=1e-2)
    cfg = SliceSegConfig(version="test", model=model, train=train)
    # one fold alone (as a parallel process would), then the rest, cross-validation and export
    alone = train_slices(cfg, tmp_path / "run", folds=[1])
    assert alone == {"trained_folds": [1], "trained_views": ["axial"], "steps": [3]}
    assert not (tmp_path / "run" / "weights").exists() and not (tmp_path / "run" / "cv.json").exists()
    with pytest.raises(ValueError, match="fold 2 does not exist"):
        train_slices(cfg, tmp_path / "run", folds=[0, 2])
    lines = []
    first = train_slices(cfg, tmp_path / "run", log=lines.append)
    assert "fold 1: resumed at step 3" in lines and "fold 0: resumed at step 3" not in lines
    assert any(line.startswith("fold 0 step 2 loss") and line.endswith("min to step 3)") for line in lines)
    assert first["steps"] == [3, 3] and len(first["cases"]) == 2
    assert {r["fold"] for r in first["cases"]} == {0, 1}
    more = SliceSegConfig(version="test", model=model, train=SliceTrainConfig(**{**train.__dict__, "steps": 5}))
    lines = []
    second = train_slices(more, tmp_path / "run", log=lines.append)
    assert "fold 0: resumed at step 3" in lines and second["steps"] == [5, 5]
    weights = load_weights(tmp_path / "run" / "weights")
    assert isinstance(weights, SliceWeights) and weights.version == "test"
    # finished models packed (float16, as exported) and unpacked into a fresh workdir: resumed
    # as finished, exported to the same weights
    assert pack_finished_models(more, tmp_path / "run", tmp_path / "packed") == ["fold0", "fold1"]
    assert pack_finished_models(cfg, tmp_path / "run", tmp_path / "short") == ["fold0", "fold1"]  # 5 >= 3
    assert unpack_finished_models(more, tmp_path / "packed", tmp_path / "copy") == ["fold0", "fold1"]
    assert unpack_finished_models(more, tmp_path / "packed", tmp_path / "copy") == []  # already there
    lines = []
    copied = train_slices(more, tmp_path / "copy", log=lines.append)
    assert "fold 0: resumed at step 5" in lines and copied["steps"] == [5, 5]
    for a, b in zip(jax.tree.leaves(load_weights(tmp_path / "copy" / "weights").params), jax.tree.leaves(weights.params)):
        np.testing.assert_array_equal(a, b)
    longer = SliceSegConfig(version="test", model=model, train=SliceTrainConfig(**{**train.__dict__, "steps": 9}))
    with pytest.raises(ValueError, match="step 5 is short of the config's 9"):
        unpack_finished_models(longer, tmp_path / "packed", tmp_path / "other")
    three = SliceSegConfig(version="test", model=model, train=SliceTrainConfig(**{**train.__dict__, "folds": 1}))
    with pytest.raises(ValueError, match=r"\['fold1.npz'\] are not models of this config"):
        unpack_finished_models(three, tmp_path / "packed", tmp_path / "other")
    assert weights.config.members == 2
    card = (tmp_path / "run" / "weights" / "MODEL_CARD.md").read_text()
    assert "`test`" in card and card.count("| P2 | 0 |") == 1 and "| **mean** |" in card
    labels, brain = truth["P2"]
    masks, unc = segment_arrays(np.where(brain, 1.0, 0.0), np.where(brain, 1.0, 0.0), (2.0, 2.0, 2.0),
                                brain_mask=brain, weights=weights, uncertainty=True)
    assert masks.whole.shape == labels.shape and unc.shape == labels.shape
    assert not (masks.whole & ~brain).any()
    # flip TTA: the mean over the in-plane flips of the plain prediction of flipped inputs
    rng = np.random.default_rng(1)
    t1c, flair = (np.where(brain, rng.normal(1.0, 0.3, brain.shape), 0.0) for _ in range(2))
    plain = lambda axes: np.flip(weights.probabilities(np.flip(t1c, axes), np.flip(flair, axes), (2.0,) * 3,
                                                       np.flip(brain, axes))[0], axes)
    got = weights.probabilities(t1c, flair, (2.0,) * 3, brain, tta=True)[0]
    np.testing.assert_allclose(got, np.mean([plain(a) for a in TTA_FLIPS], axis=0), atol=1e-6)
    assert not np.allclose(got, plain(()), atol=1e-4)
    # warm start of a new workdir from the exported folds: member k initialises fold k
    member1 = warm_start_params(tmp_path / "run" / "weights", more, 1)
    np.testing.assert_array_equal(jax.tree.leaves(member1)[0], jax.tree.leaves(weights.params)[0][1])
    warm = SliceSegConfig(version="test", model=model, train=SliceTrainConfig(
        **{**train.__dict__, "steps": 2, "init_weights": str(tmp_path / "run" / "weights")}))
    lines = []
    train_slices(warm, tmp_path / "warm", log=lines.append)
    assert f"fold 1: warm start from {tmp_path / 'run' / 'weights'}" in lines
    with pytest.raises(ValueError, match="that 2 divides"):
        warm_start_params(tmp_path / "run" / "weights",
                          SliceSegConfig(model=model, train=SliceTrainConfig(folds=3)), 0)


def test_views_move_their_slice_axis_last_and_back_and_are_checked():
    a = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    assert to_view(a, "sagittal").shape == (3, 4, 2, 5) and to_view(a, "coronal").shape == (2, 4, 3, 5)
    np.testing.assert_array_equal(to_view(a, "coronal")[1, 2, :, 3], a[1, :, 2, 3])
    for view in ("axial", "coronal", "sagittal"):
        np.testing.assert_array_equal(from_view(to_view(a, view), view), a)
    with pytest.raises(ValueError, match="views: distinct names"):
        SliceModelConfig(views=("axial", "oblique"))
    with pytest.raises(ValueError, match="views: distinct names"):
        SliceModelConfig(views=("axial", "axial"))
    with pytest.raises(ValueError, match="multiple of the 2 views"):
        SliceModelConfig(views=("axial", "coronal"), members=3)
    assert SliceModelConfig(views=("axial", "coronal"), members=6).folds == 3


def test_combined_passes_give_the_mean_and_spread_over_all_members():
    rng = np.random.default_rng(0)
    members = rng.random((3, 4, 5, 3))  # 3 groups (views) of 4 members, 5 voxels, 3 regions
    passes = [np.concatenate([g.mean(0), g.std(0)], -1) for g in members]
    got = combine_passes(passes)
    everyone = members.reshape(12, 5, 3)
    np.testing.assert_allclose(got[..., :3], everyone.mean(0), atol=1e-12)
    np.testing.assert_allclose(got[..., 3], everyone.std(0).max(-1), atol=1e-12)
    np.testing.assert_array_equal(combine_passes(passes[:1])[..., 3], passes[0][..., 3:].max(-1))


def test_shipped_config_is_a_slices_config_with_the_shipped_architecture():
    path = Path(__file__).parents[1] / "configs" / "seg_slices.yaml"
    assert read_yaml(path)["architecture"] == "slices"  # what `rtjax train-seg` dispatches on
    cfg = load_slice_config(path)
    shipped = load_weights().config
    assert shipped.unet == cfg.model.unet and shipped.views == cfg.model.views
    # one final model per view when the recipe trains them, else every fold model of every view
    models_per_view = 1 if cfg.train.final_steps else cfg.train.folds
    assert shipped.members == models_per_view * len(cfg.model.views)


def test_postprocessing_drops_stray_components_and_relabels_a_small_enhancing_region():
    probs = np.zeros((20, 20, 20, 3), np.float32)
    probs[2:10, 2:10, 2:10, 0] = 0.9  # main tumour, 512 voxels
    probs[4:8, 4:8, 4:8, 1] = 0.9  # core, 64 voxels
    probs[5:7, 5:7, 5:7, 2] = 0.9  # enhancing, 8 voxels
    probs[14:18, 14:18, 14:18, 0] = 0.9  # stray component, 64 voxels (1/8 of the main one)
    brain = np.ones((20, 20, 20), bool)
    kept = probs_to_case_masks(probs, brain, 0.1)
    assert kept.whole.sum() == 512 + 64 and kept.enhancing.sum() == 8
    main = probs_to_case_masks(probs, brain, 0.2)
    assert main.whole.sum() == 512 and main.core.sum() == 64 and main.enhancing.sum() == 8
    relabelled = probs_to_case_masks(probs, brain, 0.2, min_enhancing_voxels=9)
    assert relabelled.enhancing.sum() == 0 and relabelled.necrosis.sum() == 64 and relabelled.core.sum() == 64
    np.testing.assert_array_equal(relabelled.edema, main.edema)
    assert probs_to_case_masks(probs, brain, 0.2, min_enhancing_voxels=8).enhancing.sum() == 8
    assert enhancing_voxels(0.1, (1.0, 1.0, 1.0)) == 100 and enhancing_voxels(0.1, (2.0, 2.0, 3.0)) == 9
    assert enhancing_voxels(0.0, (1.0, 1.0, 1.0)) == 0


def test_refine_enhancing_moves_the_core_boundary_to_where_the_t1c_says_and_keeps_the_core():
    """A 20-voxel core along x: voxels 0-9 bright on T1c (z about 2, enhancing), 10-19 dark
    (about -1, necrosis); the network's ET probability is 0.9 on 0-7, 0.55 on 8-11 (a blurred
    2 mm boundary) and 0.1 beyond, so it calls 0-11 enhancing. Voxels 10-11 look necrotic:
    their likelihood ratio under the case's own two classes outweighs the weak log-odds of
    0.55, and the boundary moves to 9 | 10; the others agree with their T1c and stay."""
    from rtjax.seg.model import probs_to_masks, refine_enhancing

    probs = np.zeros((24, 10, 1, 3), np.float32)  # ten copies along y
    probs[:20, ..., :2] = 1.0
    probs[20:, ..., 0] = 1.0  # edema
    probs[:8, ..., 2], probs[8:12, ..., 2], probs[12:20, ..., 2] = 0.9, 0.55, 0.1
    t1c = np.zeros((24, 10, 1), np.float32)
    t1c[:10], t1c[10:20] = 2.0, -1.0
    t1c[:20:2] += 0.15  # spread within each class
    masks = probs_to_masks(probs)
    assert masks.enhancing[:, 0, 0].tolist() == [True] * 12 + [False] * 12
    refined = refine_enhancing(masks, probs[..., 2], t1c)
    assert refined.enhancing[:, 0, 0].tolist() == [True] * 10 + [False] * 14
    np.testing.assert_array_equal(refined.core, masks.core)
    np.testing.assert_array_equal(refined.edema, masks.edema)
    # too few voxels in a class (80 necrotic): unchanged; the case-level entry point refines with t1c_z
    assert refine_enhancing(masks, probs[..., 2], t1c, min_voxels=81) is masks
    brain = np.ones(t1c.shape, bool)
    np.testing.assert_array_equal(probs_to_case_masks(probs, brain, 0.0, t1c_z=t1c).enhancing, refined.enhancing)
    np.testing.assert_array_equal(probs_to_case_masks(probs, brain, 0.0).enhancing, masks.enhancing)
    # an ET threshold t shifts the network's log-odds by -logit(t): the same as refining the
    # shifted probabilities; lower thresholds only add enhancing voxels
    logit = lambda q: np.log(q) - np.log1p(-q)
    for t in (0.3, 0.7):
        shifted = 1 / (1 + np.exp(-(logit(np.clip(probs[..., 2], 1e-4, 1 - 1e-4)) - logit(t))))
        np.testing.assert_array_equal(refine_enhancing(masks, probs[..., 2], t1c, threshold=t).enhancing,
                                      refine_enhancing(masks, shifted, t1c).enhancing)
    low = refine_enhancing(masks, probs[..., 2], t1c, threshold=0.01).enhancing  # log-odds + 4.6
    assert low[:, 0, 0].tolist() == [True] * 11 + [False] * 13  # voxel 10 (0.55) now outweighs its T1c
    # per-region thresholds (WT, TC, ET) at the case level
    per_region = probs_to_case_masks(probs, brain, 0.0, threshold=(0.5, 0.5, 0.95))
    assert per_region.enhancing[:, 0, 0].tolist() == [False] * 24
    np.testing.assert_array_equal(per_region.core, masks.core)


def test_refine_enhancing_against_edema_keeps_edema_like_core_voxels_out_of_the_enhancing_tumour():
    """Core voxels 0-9 bright on T1c (z about 2), 10-13 edema-like (0.3) with a weak ET
    probability 0.55, 14-23 a dark necrotic core (-2); edema 24-33 at about 0.3. Against the
    dark necrosis alone the edema-like voxels look enhancing and stay so; weighed against the
    case's edema too they become necrosis. Too little edema: the necrosis alone, as before."""
    from rtjax.seg.model import probs_to_masks, refine_enhancing

    probs = np.zeros((34, 10, 1, 3), np.float32)  # ten copies along y
    probs[:24, ..., :2] = 1.0
    probs[24:, ..., 0] = 1.0  # edema
    probs[:10, ..., 2], probs[10:14, ..., 2], probs[14:24, ..., 2] = 0.9, 0.55, 0.1
    t1c = np.zeros((34, 10, 1), np.float32)
    t1c[:10], t1c[10:14], t1c[14:24], t1c[24:] = 2.0, 0.3, -2.0, 0.3
    t1c[::2] += 0.15  # spread within each class
    masks = probs_to_masks(probs)
    called = [True] * 14 + [False] * 20
    assert refine_enhancing(masks, probs[..., 2], t1c).enhancing[:, 0, 0].tolist() == called
    refined = refine_enhancing(masks, probs[..., 2], t1c, against_edema=True)
    assert refined.enhancing[:, 0, 0].tolist() == [True] * 10 + [False] * 24
    np.testing.assert_array_equal(refined.core, masks.core)
    np.testing.assert_array_equal(refined.edema, masks.edema)
    assert refine_enhancing(masks, probs[..., 2], t1c, min_voxels=101, against_edema=True) is masks
    few_edema = probs_to_masks(np.where(np.arange(34)[:, None, None, None] < 29, probs, 0.0))  # 50 edema voxels
    assert refine_enhancing(few_edema, probs[..., 2], t1c, min_voxels=51, against_edema=True
                            ).enhancing[:, 0, 0].tolist() == called
    brain = np.ones(t1c.shape, bool)
    np.testing.assert_array_equal(
        probs_to_case_masks(probs, brain, 0.0, t1c_z=t1c, refine_against_edema=True).enhancing, refined.enhancing)


def test_nested_estimate_scores_each_fold_with_the_choice_of_the_other_folds():
    from rtjax.seg.postprocessing import Postprocessing, nested_estimate, postprocessing_candidates

    row = lambda d: {"dice_WT": d, "dice_TC": d, "dice_ET": d}
    a, b = Postprocessing(0.1, 0.0, False), Postprocessing(0.5, 0.0, True, 0.35, 0.4)
    rows = {a: [row(0.9), row(0.9), row(0.2), row(0.2)], b: [row(0.5)] * 4}
    assert choose_postprocessing(rows) == a  # 0.55 against 0.5 over all cases
    # fold 0 gets b (better on fold 1), fold 1 gets a (better on fold 0)
    assert nested_estimate(rows, [0, 0, 1, 1]) == pytest.approx({"WT": 0.35, "TC": 0.35, "ET": 0.35})
    assert b.label() == ("keep_fraction=0.5 min_enhancing_ml=0 refine_enhancing=true core_threshold=0.35 "
                         "enhancing_threshold=0.4 refine_against_edema=false")
    t = SliceTrainConfig(keep_fractions=(0.1, 0.5), core_thresholds=(0.5, 0.35), enhancing_thresholds=(0.4,))
    assert len(postprocessing_candidates(t)) == 4 and Postprocessing(0.5, 0.0, False, 0.35, 0.4) in \
        postprocessing_candidates(t)
    # against_edema only with refine: (no refine) + (refine) x (against or not) per keep
    t = SliceTrainConfig(keep_fractions=(0.1, 0.5), refine_enhancing=(False, True), refine_against_edema=(False, True))
    candidates = postprocessing_candidates(t)
    assert len(candidates) == 6 and len(set(candidates)) == 6
    assert Postprocessing(0.1, 0.0, True, 0.5, 0.5, True) in candidates
    assert not any(c.refine_against_edema and not c.refine_enhancing for c in candidates)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        SliceModelConfig(core_threshold=1.0)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):  # candidates too, before any training
        SliceSegConfig(train=SliceTrainConfig(core_thresholds=(0.3, 1.0)))
    assert SliceModelConfig(core_threshold=0.3).thresholds == (0.5, 0.3, 0.5)


def test_warp_slices_rotates_a_quarter_turn_exactly_and_scales_about_the_centre():
    from rtjax.seg.slice_train import warp_slices

    x = np.random.default_rng(0).random((2, 9, 9, 2)).astype(np.float32)
    turned = np.asarray(warp_slices(x, np.array([np.pi / 2, 0.0]), np.array([1.0, 1.0])))
    # output (i, j) samples x[8 - j, i]: a clockwise quarter turn of the array
    np.testing.assert_allclose(turned[0], np.rot90(x[0], k=-1, axes=(0, 1)), atol=1e-5)
    np.testing.assert_allclose(turned[1], x[1], atol=1e-6)
    zoomed = np.asarray(warp_slices(x[:1], np.array([0.0]), np.array([2.0])))
    assert zoomed[0, 4, 4] == pytest.approx(x[0, 4, 4])  # the centre is fixed
    assert zoomed[0, 6, 4] == pytest.approx(x[0, 5, 4])  # 2 voxels out sample 1 voxel out


def test_candidate_dice_equals_each_candidate_postprocessed_alone():
    """The cross-validation's shared-steps scoring of every candidate gives exactly the Dice
    of post-processing the case with each candidate on its own (`postprocessed_regions`)."""
    from scipy import ndimage

    from rtjax.seg.postprocessing import (candidate_dice, postprocessed_regions, postprocessing_candidates,
                                          score_regions)

    rng = np.random.default_rng(3)
    shape = (28, 26, 24)
    field = ndimage.gaussian_filter(rng.normal(size=shape + (3,)), (2, 2, 2, 0))
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    radius = np.sqrt((grid ** 2).sum(0))
    blob = np.stack([1 - radius, 0.7 - radius, 0.45 - radius], axis=-1) * 8 + field * 20
    probs = (1 / (1 + np.exp(-blob))).astype(np.float32)
    probs[3:6, 3:6, 3:6, 0] = 0.9  # a stray component
    brain = radius < 1.3
    ref = np.stack([radius < r for r in (0.9, 0.6, 0.6)], axis=-1)
    ref[..., 2] &= radius > 0.3
    t1c = (rng.normal(size=shape) + 2 * ref[..., 2]).astype(np.float32)
    t = SliceTrainConfig(keep_fractions=(0.1, 0.5), min_enhancing_ml=(0.0, 0.05), refine_enhancing=(False, True),
                         refine_against_edema=(False, True), core_thresholds=(0.5, 0.3),
                         enhancing_thresholds=(0.5, 0.4))
    candidates = postprocessing_candidates(t)
    scored = candidate_dice(probs, brain, ref, (1.0, 1.0, 1.0), t1c, candidates)
    assert list(scored) != [] and set(scored) == set(candidates)
    for candidate in candidates:
        alone = score_regions(postprocessed_regions(probs, brain, (1.0, 1.0, 1.0), t1c, candidate), ref,
                              (1.0, 1.0, 1.0), False)
        assert scored[candidate] == alone, candidate
    assert len({tuple(row.values()) for row in scored.values()}) > 4  # the candidates differ here


def test_postprocessing_choice_is_the_best_mean_dice_over_the_regions():
    rows = {(0.2, 0.0, False): [{"dice_WT": 0.8, "dice_TC": 0.6, "dice_ET": 0.5}] * 2,
            (1.0, 0.0, False): [{"dice_WT": 0.9, "dice_TC": 0.6, "dice_ET": 0.5},
                                {"dice_WT": 0.7, "dice_TC": 0.6, "dice_ET": 0.5}],
            (1.0, 0.5, True): [{"dice_WT": 0.9, "dice_TC": 0.6, "dice_ET": 0.6},
                               {"dice_WT": 0.7, "dice_TC": 0.6, "dice_ET": 0.5}]}
    assert choose_postprocessing(rows) == (1.0, 0.5, True)
    rows.pop((1.0, 0.5, True))
    assert choose_postprocessing(rows) == (0.2, 0.0, False)  # a tie goes to the first candidate


def test_uncertainty_table_reports_the_rank_correlation_of_uncertainty_and_dice():
    from rtjax.experiments.seg_uncertainty import format_uncertainty_table

    rows = [{"case": f"c{i}", "network_wt_ml": 10.0 * i, "reference_wt_ml": 9.0, "dice_wt": d,
             "held_out_dice_wt": h, "mean_uncertainty_in_wt": u, "held_out_uncertainty": hu}
            for i, (d, h, u, hu) in enumerate([(0.9, 0.5, 0.05, 0.3), (0.5, 0.8, 0.2, 0.1), (0.7, 0.6, 0.1, 0.2)])]
    rows.append({"case": "unlabelled", "network_wt_ml": 3.0, "reference_wt_ml": None, "dice_wt": None,
                 "mean_uncertainty_in_wt": 0.3})
    text = format_uncertainty_table(rows)
    assert "| c1 | 10.0 | 9.0 | 0.500 | 0.800 | 0.200 | 0.100 |" in text
    assert "| unlabelled | 3.0 |  |  |  | 0.300 |  |" in text
    assert "Spearman correlation of uncertainty and Dice WT (ensemble): -1.00" in text and "n = 3" in text
    assert "Spearman correlation of uncertainty and Dice WT (held-out fold): 1.00" in text
    assert "Spearman correlation of held-out uncertainty and Dice WT (held-out fold): -1.00" in text


def test_train_seg_refuses_fold_for_the_3d_model(tmp_path):
    config = Path(__file__).parents[1] / "configs" / "seg_tiny.yaml"
    result = CliRunner().invoke(app, ["train-seg", str(config), "--workdir", str(tmp_path / "w"), "--fold", "0"])
    assert result.exit_code != 0 and "--fold, --view and --final apply to the 2.5-D model" in result.output
    assert not (tmp_path / "w").exists()


def test_paste_tumour_takes_the_donor_tumour_only_inside_the_recipient_brain():
    x = np.zeros((4, 4, 2), np.float32)
    x[:, :3] = 1.0  # brain in columns 0-2
    y = np.zeros((4, 4, 3), np.uint8)
    donor_x = np.full((4, 4, 2), 5.0, np.float32)
    donor_y = np.zeros((4, 4, 3), np.uint8)
    donor_y[1:3, 1:4] = [1, 1, 0]  # tumour in rows 1-2, columns 1-3
    got_x, got_y = paste_tumour(x, y, donor_x, donor_y)
    want = np.zeros((4, 4), bool)
    want[1:3, 1:3] = True  # column 3 is outside the recipient's brain
    np.testing.assert_array_equal(got_x[..., 0], np.where(want, 5.0, x[..., 0]))
    np.testing.assert_array_equal(got_y[..., 0], want)
    np.testing.assert_array_equal(got_y[..., 2], 0)


def test_copy_paste_sampling_puts_the_donor_tumour_in_tumour_free_crops():
    crop = 8
    healthy = {"x": np.ones((2, crop, crop, 2), np.float32), "y": np.zeros((2, crop, crop, 3), np.uint8)}
    healthy["brain"] = np.argwhere(np.ones((crop, crop, 2)))
    healthy["tumour"] = healthy["brain"]  # crop centres only; this case has no tumour voxel
    donor_y = np.zeros((2, crop, crop, 3), np.uint8)
    donor_y[:, 2:6, 2:6] = 1
    donor = {"x": np.full((2, crop, crop, 2), 7.0, np.float32), "y": donor_y,
             "brain": healthy["brain"], "tumour": np.argwhere(donor_y[..., 0].transpose(1, 2, 0))}
    cfg = SliceSegConfig(model=SliceModelConfig(unet=UNetConfig(widths=(4, 8), in_channels=2, spatial_dims=2), context=0),
                         train=SliceTrainConfig(batch=64, crop=crop, copy_paste=1.0))
    x, y = sample_batch(np.random.default_rng(0), [healthy, donor], cfg)
    assert y[..., 0].sum((1, 2)).min() == 16  # every crop carries the donor's 4 x 4 tumour
    np.testing.assert_array_equal(x[y[..., 0] > 0], 7.0)
    plain = SliceSegConfig(model=cfg.model, train=SliceTrainConfig(batch=64, crop=crop))
    y_plain = sample_batch(np.random.default_rng(0), [healthy, donor], plain)[1]
    assert (y_plain[..., 0].sum((1, 2)) == 0).any()  # without it, the healthy case stays healthy


def test_blur_slices_spreads_an_impulse_by_the_gaussian_taps_along_the_chosen_axis():
    x = np.zeros((1, 15, 15, 2), np.float32)
    x[0, 7, 7, :] = 1.0
    got = np.asarray(blur_slices(x, np.array([1.0]), np.array([0.0]), np.array([0.0]), modalities=2))
    taps = np.exp(-0.5 * np.arange(-4, 5) ** 2)
    np.testing.assert_allclose(got[0, 3:12, 7, 0], taps / taps.sum(), rtol=1e-5)
    assert np.all(got[0, :, np.r_[0:7, 8:15]] == 0)  # nothing spreads along y at sigma 0
    np.testing.assert_array_equal(blur_slices(x, np.zeros(1), np.zeros(1), np.zeros(1)), x)


def test_blur_slices_mixes_each_context_slice_with_its_neighbours_per_modality():
    values = np.array([[1.0, 10.0], [2.0, 20.0], [4.0, 40.0]])  # 3 slices x (T1c, FLAIR)
    x = np.broadcast_to(values.reshape(1, 1, 1, 6), (1, 4, 4, 6)).astype(np.float32)
    got = np.asarray(blur_slices(x, np.zeros(1), np.zeros(1), np.array([0.25])))[0, 1, 1].reshape(3, 2)
    below, above = values[[0, 0, 1]], values[[1, 2, 2]]  # edge slices repeated
    np.testing.assert_allclose(got, 0.5 * values + 0.25 * (below + above), rtol=1e-6)


def test_augment_without_blur_keeps_its_random_stream_and_with_blur_changes_only_inputs():
    key = jax.random.key(3)
    x = np.asarray(jax.random.normal(jax.random.key(0), (4, 16, 16, 10)))
    y = (x[..., :3] > 1.0).astype(np.float32)
    plain, default = _augment(key, x, y), _augment(key, x, y, 0.0)
    blurred = _augment(key, x, y, 1.0)
    np.testing.assert_array_equal(plain[0], default[0])
    np.testing.assert_array_equal(plain[1], blurred[1])  # targets are never blurred
    assert not np.allclose(plain[0], blurred[0])


def test_intensity_curves_map_each_modality_by_its_own_curve_on_every_context_slice():
    knots = np.array(CURVE_KNOTS)
    x = np.linspace(-9.0, 12.0, 2 * 5 * 3 * 6, dtype=np.float32).reshape(2, 5, 3, 6)  # 3 slices x 2 modalities
    values = np.stack([np.stack([2 * knots, knots + 1]), np.stack([np.abs(knots), -knots])])  # (b, modality, knot)
    got = np.asarray(intensity_curves(x, values)).reshape(2, 5, 3, 3, 2)
    s = x.reshape(2, 5, 3, 3, 2)
    np.testing.assert_allclose(got[0, ..., 0], 2 * s[0, ..., 0], atol=1e-5)  # linear curves continue beyond the knots
    np.testing.assert_allclose(got[0, ..., 1], s[0, ..., 1] + 1, atol=1e-5)
    # |z| between the knots, then continued with the end slopes (-1 below -4, +1 above 8)
    np.testing.assert_allclose(got[1, ..., 0], np.abs(s[1, ..., 0]), atol=1e-5)
    np.testing.assert_allclose(got[1, ..., 1], -s[1, ..., 1], atol=1e-5)
    # any curve: np.interp between the end knots
    rng = np.random.default_rng(0)
    values = rng.normal(size=(2, 2, len(knots))).cumsum(-1)
    inside = rng.uniform(knots[0], knots[-1], size=x.shape).astype(np.float32)
    got = np.asarray(intensity_curves(inside, values)).reshape(2, 5, 3, 3, 2)
    s = inside.reshape(2, 5, 3, 3, 2)
    for b in range(2):
        for m in range(2):
            np.testing.assert_allclose(got[b, ..., m], np.interp(s[b, ..., m], knots, values[b, m]), atol=1e-5)


def test_random_contrast_curves_are_monotonic_keep_zero_and_are_shared_by_the_context_slices():
    ramp = np.linspace(-6.0, 10.0, 64, dtype=np.float32)
    x = np.broadcast_to(ramp[None, :, None, None], (8, 64, 2, 10)).copy()
    got = np.asarray(_random_curves(jax.random.key(5), x, 1.0, 2))
    assert (np.diff(got, axis=1) > 0).all()  # monotonic: the tissue order is kept
    s = got.reshape(8, 64, 2, 5, 2)
    np.testing.assert_array_equal(s, np.broadcast_to(s[:, :, :, :1], s.shape))  # one curve per modality
    assert not np.allclose(s[..., 0], s[..., 1]) and not np.allclose(got, x)
    zero = np.asarray(_random_curves(jax.random.key(5), np.zeros((8, 4, 4, 10), np.float32), 1.0, 2))
    np.testing.assert_allclose(zero, 0.0, atol=1e-6)
    np.testing.assert_allclose(_random_curves(jax.random.key(5), x, 0.0, 2), x, atol=1e-5)  # share 0: identity


def test_region_weights_weight_each_region_loss():
    class Fixed:  # a "model" whose logits are given
        def __init__(self, logits):
            self.logits = logits

        def __call__(self, x):
            return self.logits

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
    y = (rng.random((2, 8, 8, 3)) > 0.6).astype(np.float32)
    p = 1 / (1 + np.exp(-logits.astype(np.float64)))
    bce = -(y * np.log(p) + (1 - y) * np.log(1 - p)).mean((0, 1, 2))
    dice_loss = 1 - (2 * (p * y).sum((0, 1, 2)) + 1) / (p.sum((0, 1, 2)) + y.sum((0, 1, 2)) + 1)
    per_region = bce + dice_loss
    model = Fixed(jax.numpy.asarray(logits))
    np.testing.assert_allclose(float(_loss(model, None, y)), per_region.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(_loss(model, None, y, (0.0, 1.0, 0.0))), per_region[1], rtol=1e-5)
    np.testing.assert_allclose(float(_loss(model, None, y, (1.0, 2.0, 2.0))), (per_region * [1, 2, 2]).sum() / 5,
                               rtol=1e-5)
    with pytest.raises(ValueError, match="region_weights must be 3 weights"):
        SliceSegConfig(train=SliceTrainConfig(region_weights=(1.0, -1.0, 1.0)))
