"""Segmentation metrics: exact tiny arrays, analytic spheres, every empty-mask case, and a
cross-check against medpy on the real TCGA-FG-6692 segmentations."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from rtjax import metrics as M
from rtjax.labels import TumourMasks

OVERLAP = (M.dice, M.jaccard, M.precision, M.recall)
DISTANCES = (M.hausdorff, M.hausdorff95, M.mean_surface_distance)
ANISO = (0.5, 1.0, 2.0)


def _box(shape, *slices) -> np.ndarray:
    out = np.zeros(shape, dtype=bool)
    out[slices] = True
    return out


# --------------------------------------------------------------------------- overlap


def test_overlap_hand_computed():
    # pred: 4 voxels, ref: 3 voxels, 2 in common.
    pred = np.zeros((3, 3, 3), dtype=bool)
    ref = np.zeros((3, 3, 3), dtype=bool)
    pred[0, 0, 0] = pred[0, 0, 1] = pred[0, 0, 2] = pred[1, 1, 1] = True
    ref[0, 0, 1] = ref[0, 0, 2] = ref[2, 2, 2] = True
    assert pred.sum() == 4 and ref.sum() == 3 and (pred & ref).sum() == 2
    assert M.dice(pred, ref) == pytest.approx(2 * 2 / 7, abs=1e-15)
    assert M.jaccard(pred, ref) == pytest.approx(2 / 5, abs=1e-15)
    assert M.precision(pred, ref) == pytest.approx(2 / 4, abs=1e-15)
    assert M.recall(pred, ref) == pytest.approx(2 / 3, abs=1e-15)
    # Swapping roles swaps precision and recall and keeps the symmetric ones.
    assert M.precision(ref, pred) == M.recall(pred, ref)
    assert M.dice(ref, pred) == M.dice(pred, ref)


def test_identical_masks_are_perfect():
    mask = _box((6, 7, 8), slice(1, 4), slice(2, 6), slice(3, 5))
    m = M.binary_metrics(mask, mask, ANISO, tolerance_mm=0.0)
    assert m == {
        "dice": 1.0,
        "jaccard": 1.0,
        "precision": 1.0,
        "recall": 1.0,
        "hausdorff": 0.0,
        "hausdorff95": 0.0,
        "mean_surface_distance": 0.0,
        "surface_dice": 1.0,
    }
    assert all(type(v) is float for v in m.values())


def test_zero_one_integer_and_float_masks_equal_bool():
    rng = np.random.default_rng(0)
    pred, ref = rng.random((2, 8, 9, 7)) < 0.4
    expected = M.binary_metrics(pred, ref, ANISO)
    for dtype in (np.uint8, np.int64, np.float32):
        assert M.binary_metrics(pred.astype(dtype), ref.astype(dtype), ANISO) == expected


# --------------------------------------------------------------------------- exact distances


@pytest.mark.parametrize("line_axis, shift_axis", [(0, 1), (0, 2), (2, 0), (1, 2)])
@pytest.mark.parametrize("k", [1, 3])
def test_line_shifted_sideways(line_axis, shift_axis, k):
    """A line of voxels and its copy k voxels away: every distance is k * h exactly."""
    shape = [12, 12, 12]
    index = [slice(None)] * 3
    index[line_axis] = slice(2, 10)
    other = 3 - line_axis - shift_axis
    index[other] = 5
    index[shift_axis] = 4
    pred = np.zeros(shape, dtype=bool)
    pred[tuple(index)] = True
    ref = np.roll(pred, k, axis=shift_axis)
    expected = k * ANISO[shift_axis]
    assert M.hausdorff(pred, ref, ANISO) == expected
    assert M.hausdorff95(pred, ref, ANISO) == expected
    assert M.mean_surface_distance(pred, ref, ANISO) == expected
    assert M.dice(pred, ref) == 0.0
    assert M.surface_dice(pred, ref, ANISO, expected - 1e-9) == 0.0
    assert M.surface_dice(pred, ref, ANISO, expected) == 1.0  # tolerance is inclusive
    assert M.surface_dice(pred, ref, ANISO, expected + 0.1) == 1.0


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_line_shifted_along_itself(axis):
    """An 8-voxel line shifted by 3 along itself: 5 voxels overlap, the ends are 1..3 h away."""
    n, k = 8, 3
    index = [4, 4, 4]
    index[axis] = slice(2, 2 + n)
    pred = np.zeros((16, 16, 16), dtype=bool)
    pred[tuple(index)] = True
    ref = np.roll(pred, k, axis=axis)
    h = ANISO[axis]
    assert M.hausdorff(pred, ref, ANISO) == k * h
    assert M.dice(pred, ref) == pytest.approx((n - k) / n)
    # Pooled distances: 2 * (n - k) zeros and 2 * (1 + 2 + 3) h.
    sd = M.surface_distances(pred, ref, ANISO)
    np.testing.assert_allclose(
        np.sort(sd.pooled), np.sort(np.r_[np.zeros(2 * (n - k)), 2 * [h, 2 * h, 3 * h]])
    )
    assert M.mean_surface_distance(pred, ref, ANISO) == pytest.approx(12 * h / (2 * n))
    pooled = np.r_[np.zeros(2 * (n - k)), [h, h, 2 * h, 2 * h, 3 * h, 3 * h]]
    assert M.hausdorff95(pred, ref, ANISO) == pytest.approx(np.percentile(pooled, 95))
    assert M.surface_dice(pred, ref, ANISO, 1.5 * h) == pytest.approx((2 * (n - k) + 2) / (2 * n))


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_box_shifted_hausdorff_is_shift(axis):
    """A solid 7x7x7 box shifted by 2 voxels: HD = 2 h along the shift axis."""
    pred = _box((16, 16, 16), slice(3, 10), slice(3, 10), slice(3, 10))
    ref = np.roll(pred, 2, axis=axis)
    assert M.hausdorff(pred, ref, ANISO) == 2 * ANISO[axis]
    assert M.dice(pred, ref) == pytest.approx(5 / 7)


def test_border_uses_six_connectivity():
    """A 3x3x3 cube's only interior voxel is its centre (26 border voxels)."""
    cube = _box((5, 5, 5), slice(1, 4), slice(1, 4), slice(1, 4))
    sd = M.surface_distances(cube, cube, (1, 1, 1))
    assert sd.pred_to_ref.size == 26
    # The centre of a 3-D plus has its 6 face neighbours but not its edge/corner ones:
    # interior with 6-connectivity (6 border voxels), border with 26-connectivity (7).
    cross = np.zeros((5, 5, 5), dtype=bool)
    cross[2, 2, 1:4] = cross[2, 1:4, 2] = cross[1:4, 2, 2] = True
    assert M.surface_distances(cross, cross, (1, 1, 1)).pred_to_ref.size == 6


def test_mask_touching_the_array_edge_has_edge_voxels_on_its_surface():
    full = np.ones((4, 4, 4), dtype=bool)
    assert M.surface_distances(full, full, (1, 1, 1)).pred_to_ref.size == 4**3 - 2**3
    inner = _box((4, 4, 4), slice(1, 4), slice(0, 4), slice(0, 4))
    assert M.hausdorff(inner, full, (2.0, 1.0, 1.0)) == 2.0


# --------------------------------------------------------------------------- analytic spheres


SPHERE_SPACING = (0.8, 0.8, 1.2)


def _concentric_spheres(r_in: float, r_out: float, spacing) -> tuple[np.ndarray, np.ndarray]:
    spacing = np.asarray(spacing)
    half = np.ceil((r_out + 3) / spacing).astype(int)
    axes = [np.arange(-n, n + 1) * h for n, h in zip(half, spacing)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    r = np.sqrt(x**2 + y**2 + z**2)
    return r <= r_in, r <= r_out


@pytest.mark.parametrize("radius, gap", [(12.0, 4.0), (10.0, 3.0), (15.0, 5.0)])
def test_concentric_spheres(radius, gap):
    """Spheres of radii R and R + d: HD, HD95 within one voxel's largest edge (1.2 mm) of d,
    the mean surface distance within half of it (0.6 mm); Dice within 2 % of
    2 R^3 / (R^3 + (R + d)^3)."""
    inner, outer = _concentric_spheres(radius, radius + gap, SPHERE_SPACING)
    h = max(SPHERE_SPACING)
    m = M.binary_metrics(inner, outer, SPHERE_SPACING, tolerance_mm=gap + h)
    assert abs(m["hausdorff"] - gap) <= h
    assert abs(m["hausdorff95"] - gap) <= h
    assert m["hausdorff95"] <= m["hausdorff"]
    assert abs(m["mean_surface_distance"] - gap) <= h / 2
    analytic = 2 * radius**3 / (radius**3 + (radius + gap) ** 3)
    assert m["dice"] == pytest.approx(analytic, rel=0.02)
    assert m["precision"] == 1.0  # the inner sphere lies inside the outer one
    assert m["surface_dice"] == 1.0  # every distance is within d + h
    assert M.surface_dice(inner, outer, SPHERE_SPACING, gap - 1.5 * h) == 0.0


# --------------------------------------------------------------------------- empty masks


EMPTY = np.zeros((6, 6, 6), dtype=bool)
BLOB = _box((6, 6, 6), slice(1, 4), slice(2, 5), slice(1, 3))


def test_both_empty():
    for f in OVERLAP:
        assert f(EMPTY, EMPTY) == 1.0
    for f in DISTANCES:
        assert f(EMPTY, EMPTY, ANISO) == 0.0
    assert M.surface_dice(EMPTY, EMPTY, ANISO, 1.0) == 1.0
    sd = M.surface_distances(EMPTY, EMPTY, ANISO)
    assert sd.pred_to_ref.size == sd.ref_to_pred.size == 0
    distances = ("hausdorff", "hausdorff95", "mean_surface_distance")
    expected = {name: 0.0 if name in distances else 1.0 for name in M.METRIC_NAMES}
    assert M.binary_metrics(EMPTY, EMPTY, ANISO) == expected


@pytest.mark.parametrize("pred, ref", [(EMPTY, BLOB), (BLOB, EMPTY)], ids=["pred", "ref"])
def test_exactly_one_empty(pred, ref):
    for f in OVERLAP:  # includes the 0/0 precision (empty pred) and recall (empty ref)
        assert f(pred, ref) == 0.0
    for f in DISTANCES:
        assert f(pred, ref, ANISO) == math.inf
    assert M.surface_dice(pred, ref, ANISO, 100.0) == 0.0
    m = M.binary_metrics(pred, ref, ANISO)
    assert not any(math.isnan(v) for v in m.values())
    sd = M.surface_distances(pred, ref, ANISO)
    non_empty = sd.ref_to_pred if pred is EMPTY else sd.pred_to_ref
    empty = sd.pred_to_ref if pred is EMPTY else sd.ref_to_pred
    assert empty.size == 0 and non_empty.size > 0 and np.isinf(non_empty).all()


def test_region_metrics_empty_regions():
    """A case without enhancing tumour in either mask scores ET as perfect; a missed ET
    scores 0 / inf."""
    shape = (10, 10, 10)
    edema = _box(shape, slice(2, 8), slice(2, 8), slice(2, 8))
    necrosis = _box(shape, slice(4, 6), slice(4, 6), slice(4, 6))
    edema &= ~necrosis
    no_et = TumourMasks(necrosis=necrosis, enhancing=np.zeros(shape, bool), edema=edema)
    out = M.region_metrics(no_et, no_et, (1, 1, 1))
    assert out["ET"]["dice"] == 1.0 and out["ET"]["hausdorff95"] == 0.0
    with_et = TumourMasks(necrosis=np.zeros(shape, bool), enhancing=necrosis, edema=edema)
    missed = M.region_metrics(no_et, with_et, (1, 1, 1))
    assert missed["ET"]["dice"] == 0.0 and missed["ET"]["recall"] == 0.0
    assert missed["ET"]["hausdorff"] == math.inf
    assert missed["TC"]["dice"] == 1.0 and missed["WT"]["dice"] == 1.0


# --------------------------------------------------------------------------- region metrics


def test_region_metrics_constructed_case():
    """Reference: a 6x6x6 edema cube around a 2x2x2 core (1 necrosis column + enhancing).
    Prediction: the same but with the edema cube grown by one slab along axis 0 and the
    necrosis relabelled as enhancing."""
    shape = (12, 12, 12)
    spacing = (2.0, 1.0, 1.0)
    core = _box(shape, slice(4, 6), slice(4, 6), slice(4, 6))
    nec = _box(shape, slice(4, 6), slice(4, 5), slice(4, 6))
    wt_ref = _box(shape, slice(2, 8), slice(2, 8), slice(2, 8))
    wt_pred = _box(shape, slice(2, 9), slice(2, 8), slice(2, 8))
    ref = TumourMasks(necrosis=nec, enhancing=core & ~nec, edema=wt_ref & ~core)
    pred = TumourMasks(necrosis=np.zeros(shape, bool), enhancing=core, edema=wt_pred & ~core)
    out = M.region_metrics(pred, ref, spacing, tolerance_mm=1.0)
    assert tuple(out) == M.REGIONS
    assert all(tuple(v) == M.METRIC_NAMES for v in out.values())
    # WT: 252 vs 216 voxels, all of ref inside pred.
    assert out["WT"]["dice"] == pytest.approx(2 * 216 / (252 + 216))
    assert out["WT"]["jaccard"] == pytest.approx(216 / 252)
    assert out["WT"]["precision"] == pytest.approx(216 / 252)
    assert out["WT"]["recall"] == 1.0
    assert out["WT"]["hausdorff"] == 2.0  # one slab of 2 mm along axis 0
    # TC is identical (necrosis + enhancing = the same core).
    assert out["TC"]["dice"] == 1.0 and out["TC"]["hausdorff"] == 0.0
    # ET: pred 8 voxels, ref 4 voxels (the other half of the core).
    assert out["ET"]["dice"] == pytest.approx(2 * 4 / 12)
    assert out["ET"]["precision"] == 0.5 and out["ET"]["recall"] == 1.0
    assert out["ET"]["hausdorff"] == 1.0
    pairs = {
        "WT": (pred.whole, ref.whole),
        "TC": (pred.core, ref.core),
        "ET": (pred.enhancing, ref.enhancing),
    }
    assert out == {r: M.binary_metrics(*pairs[r], spacing, tolerance_mm=1.0) for r in M.REGIONS}


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "call",
    [
        lambda: M.dice(np.zeros((3, 3, 3)), np.zeros((3, 3, 4))),
        lambda: M.dice(np.full((3, 3, 3), 2), np.zeros((3, 3, 3))),
        lambda: M.jaccard(np.zeros((2, 2, 2)), np.full((2, 2, 2), 0.5)),
        lambda: M.recall(np.zeros((2, 2, 2)), np.full((2, 2, 2), np.nan)),
        lambda: M.precision(np.array([["a"]]), np.array([["b"]])),
        lambda: M.hausdorff(BLOB, BLOB, (1.0, 1.0)),
        lambda: M.hausdorff(BLOB, BLOB, (1.0, 0.0, 1.0)),
        lambda: M.hausdorff95(BLOB, BLOB, (1.0, -1.0, 1.0)),
        lambda: M.mean_surface_distance(BLOB, BLOB, (1.0, np.nan, 1.0)),
        lambda: M.mean_surface_distance(BLOB, BLOB, "abc"),
        lambda: M.hausdorff(np.ones((4, 4)), np.ones((4, 4)), (1.0, 1.0, 1.0)),
        lambda: M.surface_dice(BLOB, BLOB, (1, 1, 1), -0.5),
        lambda: M.surface_dice(BLOB, BLOB, (1, 1, 1), math.inf),
        lambda: M.region_metrics(BLOB, BLOB, (1, 1, 1)),
    ],
)
def test_bad_inputs_raise_value_error(call):
    with pytest.raises(ValueError):
        call()


def test_region_metrics_rejects_different_shapes():
    a = TumourMasks(*(np.zeros((4, 4, 4), bool),) * 3)
    b = TumourMasks(*(np.zeros((4, 4, 5), bool),) * 3)
    with pytest.raises(ValueError, match="same shape"):
        M.region_metrics(a, b, (1, 1, 1))


# --------------------------------------------------------------------------- against medpy


@pytest.fixture(scope="module")
def medpy_binary():
    """medpy's binary metrics (test-only dependency): a hard failure in CI, a skip elsewhere."""
    try:
        from medpy.metric import binary
    except ImportError as err:
        if os.environ.get("CI"):
            pytest.fail(f"medpy is needed for the metric cross-checks: {err}")
        pytest.skip(f"medpy not installed: {err}")
    return binary


def _medpy(medpy_binary, pred, ref, spacing) -> dict[str, float]:
    return {
        "hausdorff": medpy_binary.hd(pred, ref, voxelspacing=spacing),
        "hausdorff95": medpy_binary.hd95(pred, ref, voxelspacing=spacing),
        "mean_surface_distance": medpy_binary.assd(pred, ref, voxelspacing=spacing),
        "dice": medpy_binary.dc(pred, ref),
    }


def _assert_matches_medpy(ours: dict, theirs: dict, label: str) -> None:
    for name, value in theirs.items():
        assert ours[name] == pytest.approx(value, rel=1e-6, abs=1e-12), (label, name)


@pytest.mark.parametrize("seed", range(4))
def test_random_blobs_match_medpy_including_array_edges(medpy_binary, seed):
    """Irregular masks that touch the array edges, anisotropic spacing, no cropping in medpy."""
    from scipy.ndimage import binary_opening

    rng = np.random.default_rng(seed)
    shape = (18, 22, 14)
    pred = binary_opening(rng.random(shape) < 0.55)
    ref = binary_opening(rng.random(shape) < 0.5)
    spacing = (0.7, 1.1, 2.3)
    ours = M.binary_metrics(pred, ref, spacing, tolerance_mm=1.5)
    _assert_matches_medpy(ours, _medpy(medpy_binary, pred, ref, spacing), f"seed {seed}")
    assert pred[0].any() or pred[-1].any()


TCGA_SEGS = ("hnfnetv1", "isen", "sanet0", "scan", "yixinmpl")


@pytest.fixture(scope="module")
def tcga(data_dir):
    from rtjax.io import load_tumour_masks

    case = data_dir / "tcga" / "TCGA-FG-6692"
    ref, image = load_tumour_masks(case / "fusion_simple.nii.gz", "brats2021")
    preds = {
        name: load_tumour_masks(case / f"seg_{name}-20.nii.gz", "brats2021")[0]
        for name in TCGA_SEGS
    }
    return ref, preds, image.spacing


def _crop(pred: np.ndarray, ref: np.ndarray, margin: int = 3):
    idx = np.argwhere(pred | ref)
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + 1 + margin, pred.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    return pred[box], ref[box]


@pytest.mark.parametrize("name", TCGA_SEGS)
@pytest.mark.parametrize("spacing", [None, (0.9, 1.1, 1.3)], ids=["header", "aniso"])
def test_tcga_segmentations_match_medpy(medpy_binary, tcga, name, spacing):
    """Each BraTS-2020 algorithm's segmentation against the fusion, per region: HD, HD95,
    ASSD and Dice equal medpy's to 1e-6 relative. medpy runs on a crop of the union's
    bounding box (+3 voxels), which the full-volume check below shows changes nothing;
    the anisotropic variant reinterprets the same voxels on a non-cubic grid."""
    ref, preds, header_spacing = tcga
    spacing = header_spacing if spacing is None else spacing
    ours = M.region_metrics(preds[name], ref, spacing)
    pred_regions = {"WT": preds[name].whole, "TC": preds[name].core, "ET": preds[name].enhancing}
    ref_regions = {"WT": ref.whole, "TC": ref.core, "ET": ref.enhancing}
    for region in M.REGIONS:
        p, r = _crop(pred_regions[region], ref_regions[region])
        _assert_matches_medpy(ours[region], _medpy(medpy_binary, p, r, spacing), f"{name} {region}")
        assert 0.5 < ours[region]["dice"] <= 1.0


def test_tcga_full_volume_matches_medpy(medpy_binary, tcga):
    """Internal cropping leaves results identical: medpy on the whole 240x240x155 volume."""
    ref, preds, spacing = tcga
    pred = preds["isen"].whole
    assert pred.shape == (240, 240, 155)
    expected = medpy_binary.hd95(pred, ref.whole, voxelspacing=spacing)
    assert M.hausdorff95(pred, ref.whole, spacing) == pytest.approx(expected, rel=1e-12)
