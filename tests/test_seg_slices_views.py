"""The 2.5-D model's views, fold warm starts from a coarser split and the final models trained
on every case: tiny training runs on a synthetic labelled cohort (a module of its own, so that
it runs beside test_seg_slices.py on the other test worker)."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx

from rtjax.ml import TrainCheckpoints
from rtjax.seg.infer import load_weights
from rtjax.seg.model import UNet, UNetConfig
from rtjax.seg.slice_train import (SliceSegConfig, SliceTrainConfig, _optimizer, fold_of, member_name, train_slices,
                                   warm_start_params)
from rtjax.seg.slices import SliceModelConfig, SliceWeights
from seg_synthetic import synthetic_cohort

MODEL = SliceModelConfig(unet=UNetConfig(widths=(4, 8), norm="group", in_channels=10, spatial_dims=2),
                         members=2, batch=8)
TRAIN = SliceTrainConfig(folds=2, batch=4, crop=16, steps=2, warmup_steps=1, log_every=1, learning_rate=1e-2)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("labelled")
    return root, synthetic_cohort(root)


@pytest.fixture(scope="module")
def folds2(cohort, tmp_path_factory):
    """A 2-fold axial ensemble exported after 2 steps per fold."""
    run = tmp_path_factory.mktemp("folds2")
    train_slices(SliceSegConfig(version="test", model=MODEL, train=dataclasses.replace(TRAIN, data_root=str(cohort[0]))),
                 run, log=lambda _: None)
    return run / "weights"


@pytest.fixture(scope="module")
def images(cohort):
    """Random T1c, FLAIR inside the brain of case P2, and that brain."""
    brain = cohort[1]["P2"][1]
    rng = np.random.default_rng(1)
    t1c, flair = (np.where(brain, rng.normal(1.0, 0.3, brain.shape), 0.0) for _ in range(2))
    return t1c, flair, brain


def _leaf(params, member=None):
    leaf = np.asarray(jax.tree.leaves(params)[0])
    return leaf if member is None else leaf[member]


def test_views_train_alone_warm_start_from_the_axial_member_and_are_averaged(cohort, folds2, images, tmp_path):
    """Each coronal fold model warm-starts from the axial member of its fold, trains alone
    (--view), and the export holds folds x views members, view-major."""
    t1c, flair, brain = images
    two = SliceSegConfig(version="test", model=dataclasses.replace(MODEL, views=("axial", "coronal"), members=4),
                         train=dataclasses.replace(TRAIN, data_root=str(cohort[0]), init_weights=str(folds2)))
    lines = []
    part = train_slices(two, tmp_path / "views", log=lines.append, views=["coronal"])
    assert part["trained_views"] == ["coronal"] and part["steps"] == [2, 2]
    assert f"fold 1 (coronal): warm start from {folds2}" in lines
    assert (tmp_path / "views" / "coronal_fold1").is_dir() and not (tmp_path / "views" / "fold1").exists()
    with pytest.raises(ValueError, match="view 'sagittal' is not in model.views"):
        train_slices(two, tmp_path / "views", views=["sagittal"])
    summary = train_slices(two, tmp_path / "views")
    assert summary["views"] == ["axial", "coronal"] and summary["steps"] == [2, 2, 2, 2]
    assert not (tmp_path / "views" / "fold_weights").exists()  # no final models: the folds are the weights
    both = load_weights(tmp_path / "views" / "weights")
    assert both.config.views == ("axial", "coronal") and both.config.members == 4
    assert "4 (2 folds x 2 views)" in (tmp_path / "views" / "weights" / "MODEL_CARD.md").read_text()
    one_view = lambda params, view: SliceWeights(both.graphdef, params,
                                                 dataclasses.replace(both.config, views=(view,), members=2), "v")
    per_view = [one_view(both.view_params(v), v).probabilities(t1c, flair, (2.0,) * 3, brain)[0]
                for v in ("axial", "coronal")]
    np.testing.assert_allclose(both.probabilities(t1c, flair, (2.0,) * 3, brain)[0], np.mean(per_view, 0), atol=1e-6)
    # the models of one fold (one per view): the mean of their own predictions
    fold1 = both.fold_members(1)
    assert fold1.config.members == 2 and fold1.config.folds == 1
    single = lambda view: one_view(jax.tree.map(lambda a: a[np.array([1, 1])], both.view_params(view)), view)
    np.testing.assert_allclose(fold1.probabilities(t1c, flair, (2.0,) * 3, brain)[0],
                               np.mean([single(v).probabilities(t1c, flair, (2.0,) * 3, brain)[0]
                                        for v in ("axial", "coronal")], 0), atol=1e-6)
    with pytest.raises(ValueError, match="fold 2: this ensemble has 2 fold"):
        both.fold_members(2)
    # the coronal members see coronal slices: an axial model of the volume turned about x
    turned = one_view(both.view_params("coronal"), "axial").probabilities(
        *(np.moveaxis(a, 1, 2) for a in (t1c, flair)), (2.0,) * 3, np.moveaxis(brain, 1, 2))[0]
    np.testing.assert_allclose(np.moveaxis(turned, 2, 1), per_view[1], atol=1e-6)


def test_folds_warm_start_from_the_coarser_fold_that_also_held_their_cases_out(folds2):
    """Round-robin folds nest: every case fold f of 4 holds out is held out by fold f % 2 of
    2, so member f % 2 starts fold f; a split that 2 does not divide is refused."""
    assert all(fold_of(i, 4) % 2 == fold_of(i, 2) for i in range(40))
    weights = load_weights(folds2)
    four = SliceSegConfig(model=MODEL, train=dataclasses.replace(TRAIN, folds=4))
    for fold in range(4):
        np.testing.assert_array_equal(_leaf(warm_start_params(folds2, four, fold)), _leaf(weights.params, fold % 2))
    with pytest.raises(ValueError, match="that 2 divides"):
        warm_start_params(folds2, SliceSegConfig(model=MODEL, train=dataclasses.replace(TRAIN, folds=3)), 0)


def test_final_models_train_on_every_case_after_the_cv_and_ship_with_its_estimate(cohort, folds2, images, tmp_path):
    root, _ = cohort
    work = tmp_path / "w"
    cfg = SliceSegConfig(version="test", model=dataclasses.replace(MODEL, views=("axial", "coronal"), members=4),
                         train=dataclasses.replace(TRAIN, data_root=str(root), init_weights=str(folds2),
                                                   final_steps=3))
    with pytest.raises(FileNotFoundError, match="train the folds first"):
        train_slices(cfg, work, final=True, views=["coronal"])
    train_slices(cfg, work, folds=[0])  # fold 0 of both views, as a parallel process would
    lines = []
    part = train_slices(cfg, work, final=True, views=["coronal"], log=lines.append)
    assert part == {"trained_folds": ["final"], "trained_views": ["coronal"], "steps": [3]}
    assert f"final model (coronal): warm start from {work / 'coronal_fold0'} (step 2)" in lines
    lines = []
    summary = train_slices(cfg, work, log=lines.append)
    assert "final model (coronal): resumed at step 3" in lines and "final model (axial): resumed at step 3" not in lines
    assert summary["steps"] == [2, 2, 2, 2] and summary["final_steps"] == [3, 3]
    # shipped: one model per view; its CV estimate: the fold models' held-out scores
    final = load_weights(work / "weights")
    assert final.config.members == 2 and final.config.folds == 1 and final.config.views == ("axial", "coronal")
    metrics = json.loads((work / "weights" / "metrics.json").read_text())
    assert metrics["folds"] == 2 and len(metrics["cases"]) == 2 and metrics["final_steps"] == [3, 3]
    assert metrics["mean"] == json.loads((work / "cv.json").read_text())["mean"]
    card = (work / "weights" / "MODEL_CARD.md").read_text()
    assert "2 (one per view)" in card and "one model per view trained on all 2 cases" in card and "fold_weights/" in card
    template = nnx.split(UNet(MODEL.unet, rngs=nnx.Rngs(0)))[1]
    restore = lambda name, step: TrainCheckpoints(work / name).restore(step, template, _optimizer(TRAIN).init(template))[0]
    half = lambda a: a.astype(np.float16).astype(np.float32)  # exports store float16 parameters
    np.testing.assert_array_equal(_leaf(final.params, 1), half(_leaf(restore(member_name("coronal", "final"), 3))))
    # the fold models beside them, view-major
    folds = load_weights(work / "fold_weights")
    assert folds.config.members == 4 and folds.config.folds == 2
    np.testing.assert_array_equal(_leaf(folds.params, 3), half(_leaf(restore(member_name("coronal", 1), 2))))
    # a final ensemble cannot warm-start folds (its members saw every held-out case)
    with pytest.raises(ValueError, match="trained on every case"):
        warm_start_params(work / "weights", cfg, 0)
    t1c, flair, brain = images
    probs, spread, _ = final.probabilities(t1c, flair, (2.0,) * 3, brain)
    assert probs.shape == (*brain.shape, 3) and spread.shape == brain.shape and spread.max() > 0
