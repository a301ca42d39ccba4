"""CTVs: margins in mm on anisotropic grids, analytic spheres, anatomical barriers,
iso-volumetric cutoffs, sweeps, and the authors' 15 mm plan of the real GliODIL case."""

import numpy as np
import pytest

from rtjax.ctv import (
    CTVFamily,
    _fast_marching_distance,
    constrained_ctv,
    cutoff_sweep,
    density_family,
    euclidean_distance,
    geodesic_distance,
    isovolumetric_cutoff,
    margin_family,
    margin_sweep,
    model_ctv,
    standard_ctv,
)
from rtjax.io import load_image, load_tumour_masks
from rtjax.labels import LabelWarning


def _grid(shape, spacing, centre):
    """Physical offsets (mm) from ``centre`` (voxel index) along each axis, broadcastable."""
    return np.meshgrid(
        *[(np.arange(n) - c) * s for n, s, c in zip(shape, spacing, centre)],
        indexing="ij",
        sparse=True,
    )


def _dice(a, b):
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


# --------------------------------------------------------------------------- standard CTV


def test_single_voxel_margin_is_an_ellipsoid_of_voxels_in_mm():
    shape, spacing, centre = (41, 21, 15), (1.0, 2.0, 3.0), (20, 10, 7)
    core = np.zeros(shape, bool)
    core[centre] = True
    x, y, z = _grid(shape, spacing, centre)
    expected = x**2 + y**2 + z**2 <= 15.0**2  # exact: integer squares of mm offsets
    ctv = standard_ctv(core, np.ones(shape, bool), spacing, 15.0)
    np.testing.assert_array_equal(ctv, expected)
    # 15 mm reaches 15, 7 and 5 voxels along the three axes (ties on the margin included).
    assert ctv[:, 10, 7].sum() == 31 and ctv[20, :, 7].sum() == 15 and ctv[20, 10, :].sum() == 11
    voxels = x**2 / 1.0 + y**2 / 4.0 + z**2 / 9.0 <= 15.0**2  # "15 voxels": the wrong reading
    assert not np.array_equal(ctv, voxels)
    dist = euclidean_distance(core, spacing)
    np.testing.assert_allclose(dist, np.sqrt(x**2 + y**2 + z**2))


def test_standard_ctv_stays_in_the_brain_but_keeps_the_core():
    shape = (30, 30, 5)
    core = np.zeros(shape, bool)
    core[10:13, 10:13, 2] = True
    brain = np.zeros(shape, bool)
    brain[:, :20, :] = True
    brain[11, 11, 2] = False  # a core voxel outside the brain mask stays in the CTV
    ctv = standard_ctv(core, brain, (1.0, 1.0, 1.0), 10.0)
    assert not ctv[:, 20:, :].any()
    assert ctv[core].all()
    full = standard_ctv(core, np.ones(shape, bool), (1.0, 1.0, 1.0), 10.0)
    np.testing.assert_array_equal(ctv, (full & brain) | core)


@pytest.mark.parametrize("spacing, tol", [(1.0, 0.03), (0.5, 0.015)])
def test_sphere_margin_volume_matches_the_analytic_ball(spacing, tol):
    # A core ball of R = 10 mm grown by 15 mm: volume 4/3 pi 25^3 mm^3 = 65.45 mL. The
    # discrete core's outer voxel centres lie up to ~h inside the sphere, so the CTV is a
    # little small: measured -2.1 % at 1 mm and -0.8 % at 0.5 mm.
    radius, margin = 10.0, 15.0
    n = int(np.ceil(2 * (radius + margin + 3) / spacing))
    c = (n - 1) / 2
    x, y, z = _grid((n, n, n), (spacing,) * 3, (c, c, c))
    core = x**2 + y**2 + z**2 <= radius**2
    ctv = standard_ctv(core, np.ones((n, n, n), bool), (spacing,) * 3, margin)
    volume = ctv.sum() * spacing**3
    exact = 4.0 / 3.0 * np.pi * (radius + margin) ** 3
    assert abs(volume - exact) / exact < tol
    assert volume < exact


def test_empty_core_and_bad_inputs_are_clear_errors():
    brain = np.ones((5, 5, 5), bool)
    with pytest.raises(ValueError, match="empty core"):
        standard_ctv(np.zeros((5, 5, 5), bool), brain, (1, 1, 1))
    core = np.zeros((5, 5, 5), bool)
    core[2, 2, 2] = True
    with pytest.raises(ValueError, match="spacing"):
        standard_ctv(core, brain, (1, 1))
    with pytest.raises(ValueError, match="margin"):
        standard_ctv(core, brain, (1, 1, 1), -1.0)
    with pytest.raises(ValueError, match="shape"):
        standard_ctv(core, brain[:4], (1, 1, 1))
    with pytest.raises(ValueError, match="empty core"):
        constrained_ctv(np.zeros((5, 5, 5), bool), brain, (1, 1, 1))


# --------------------------------------------------------------------------- constrained CTV


def _wall_case():
    """A line core at (10, 20, :) and a 1-voxel wall x = 15 for y <= 30 (gap above)."""
    shape = (41, 41, 3)
    core = np.zeros(shape, bool)
    core[10, 20, :] = True
    tissue = np.ones(shape, bool)
    tissue[15, :31, :] = False
    return core, tissue


def _via(*points):
    return sum(float(np.hypot(*np.subtract(b, a))) for a, b in zip(points, points[1:]))


def test_constrained_margin_goes_around_a_wall():
    core, tissue = _wall_case()
    spacing, margin = (1.0, 1.0, 1.0), 18.0
    standard = standard_ctv(core, np.ones(core.shape, bool), spacing, margin)
    constrained = constrained_ctv(core, tissue, spacing, margin)
    assert (constrained & ~standard).sum() == 0
    assert not constrained[~tissue & ~core].any()
    # In front of the wall every voxel sees the core: identical to the standard CTV.
    np.testing.assert_array_equal(constrained[:15], standard[:15])
    # Just behind the wall: 6 mm away in a straight line, ~22 mm around the wall's end.
    assert standard[16, 20, 1] and not constrained[16, 20, 1]
    # Reached only through the gap, at a longer geodesic distance. Analytic bounds: the
    # path around a wall of zero thickness at x = 15 (lower) and around the wall's voxel
    # cells [14.5, 15.5] x (.., 30.5] (upper). Fast marching overestimates at the corner
    # (measured +2.2 mm at 1 mm spacing; it converges on refinement): allow 2.5 mm.
    geo = geodesic_distance(core, tissue, spacing, max_distance_mm=margin)
    lower = _via((10, 20), (15, 30), (17, 29))
    upper = _via((10, 20), (14.5, 30.5), (15.5, 30.5), (17, 29))
    assert constrained[17, 29, 1]
    assert np.hypot(7, 9) < lower <= geo[17, 29, 1] <= upper + 2.5
    assert np.isinf(geo[~tissue & ~core]).all()


def test_constrained_ctv_is_a_subset_of_the_standard_ctv_with_random_barriers():
    rng = np.random.default_rng(0)
    shape, spacing = (40, 30, 20), (1.0, 1.5, 2.5)
    brain = np.zeros(shape, bool)
    brain[2:-2, 2:-2, 2:-2] = True
    core = np.zeros(shape, bool)
    core[18:22, 13:16, 9:11] = True
    tissue = brain & (rng.random(shape) > 0.15)  # scattered CSF-like holes
    tissue[10, :, :] = False  # and a wall
    standard = standard_ctv(core, brain, spacing, 12.0)
    constrained = constrained_ctv(core, tissue, spacing, 12.0)
    assert not (constrained & ~standard).any()
    assert constrained.sum() < standard.sum()
    assert not constrained[:10].any()  # nothing behind the full wall
    assert constrained[core].all()


def test_constrained_equals_standard_on_a_convex_domain_exactly():
    shape, spacing = (40, 30, 24), (1.0, 1.25, 2.0)
    x, y, z = _grid(shape, spacing, (20, 15, 12))
    ball = x**2 + y**2 + z**2 <= 19.0**2  # convex tissue domain
    core = ((x - 3) ** 2 + y**2 + (z + 2) ** 2 <= 16) | ((x + 2) ** 2 + (y - 2) ** 2 <= 4) & (
        np.abs(z) < 2
    )
    for margin in (5.0, 15.0):
        np.testing.assert_array_equal(
            constrained_ctv(core, ball, spacing, margin), standard_ctv(core, ball, spacing, margin)
        )
    full = np.ones(shape, bool)
    np.testing.assert_array_equal(
        constrained_ctv(core, full, spacing), standard_ctv(core, full, spacing)
    )


def test_fast_marching_alone_differs_slightly_from_the_exact_edt():
    # Quantifies the discretisation the hybrid avoids where there is line of sight: on a
    # full domain, second-order fast marching from a ball core of radius 6 mm (1 mm grid)
    # underestimates the exact distance by up to 0.62 mm within 15 mm (never over), and
    # its 15 mm CTV has Dice 0.979 with the exact one (4 % more voxels).
    n = 51
    x, y, z = _grid((n, n, n), (1.0, 1.0, 1.0), (25, 25, 25))
    core = x**2 + y**2 + z**2 <= 36
    exact = euclidean_distance(core, (1, 1, 1))
    marched = _fast_marching_distance(core, np.ones(core.shape, bool), (1.0, 1.0, 1.0), 15.0)
    near = exact <= 15
    diff = marched[near] - exact[near]
    assert -0.65 < diff.min() and diff.max() <= 1e-9
    assert _dice(marched <= 15, exact <= 15) > 0.975


# --------------------------------------------------------------------------- density CTVs


def _smooth_density(shape=(40, 40, 40)):
    x, y, z = _grid(shape, (1.0, 1.0, 1.0), tuple((n - 1) / 2 for n in shape))
    return np.exp(-(x**2 + 1.5 * y**2 + 0.7 * z**2) / (2 * 8.0**2))


def test_model_ctv_is_a_threshold_for_any_float_density():
    density = np.array([[[0.0, 0.2, 0.5, 0.5, 1.0]]], dtype=np.float32)
    np.testing.assert_array_equal(model_ctv(density, 0.5), [[[0, 0, 1, 1, 1]]])
    np.testing.assert_array_equal(model_ctv(density.astype(np.float16), 0.2), [[[0, 1, 1, 1, 1]]])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model_ctv(density * 2, 0.5)
    with pytest.raises(ValueError, match="non-finite"):
        model_ctv(np.full((2, 2, 2), np.nan), 0.5)


def test_isovolumetric_cutoff_matches_a_smooth_density_within_one_percent():
    density = _smooth_density()
    core = np.zeros(density.shape, bool)
    core[18:22, 19:21, 19:22] = True
    target = standard_ctv(core, np.ones(density.shape, bool), (1, 1, 1), 8.0)
    for dtype in (np.float64, np.float32):
        cutoff, mask = isovolumetric_cutoff(density.astype(dtype), target)
        assert abs(mask.sum() - target.sum()) <= 0.01 * target.sum()
        np.testing.assert_array_equal(mask, model_ctv(density.astype(dtype), cutoff))
        assert 0 < cutoff < 1
    cutoff, mask = isovolumetric_cutoff(density, 1234)
    assert abs(mask.sum() - 1234) <= 12.34


def test_isovolumetric_cutoff_handles_plateaus_and_ties():
    # Four plateaus of 100, 300, 600, 1000 voxels (cumulative volumes 100, 400, 1000, 2000).
    values = np.repeat([0.9, 0.6, 0.3, 0.1], [100, 300, 600, 1000])
    density = np.concatenate([values, np.zeros(1000)]).reshape(10, 10, 30)
    cutoff, mask = isovolumetric_cutoff(density, 400)  # exactly on a plateau edge
    assert cutoff == 0.6 and mask.sum() == 400
    cutoff, mask = isovolumetric_cutoff(density, 996)  # within 1 % of the 1000 plateau
    assert cutoff == 0.3 and mask.sum() == 1000
    cutoff, mask = isovolumetric_cutoff(density, 1004)  # from above
    assert cutoff == 0.3 and mask.sum() == 1000
    with pytest.raises(ValueError, match=r"400 voxels .*1000 voxels.*range \[100, 2000\]"):
        isovolumetric_cutoff(density, 700)  # in the middle of a jump
    _, mask = isovolumetric_cutoff(density, 700, rtol=0.5)  # a loose tolerance accepts it
    assert mask.sum() in (400, 1000)


def test_isovolumetric_cutoff_errors_when_the_density_support_is_too_small():
    density = np.zeros((10, 10, 10))
    density[:1, :10, :10] = np.linspace(0.1, 1.0, 100).reshape(10, 10)
    with pytest.raises(ValueError, match=r"support \(density > 0\) has only 100 voxels"):
        isovolumetric_cutoff(density, 500)
    cutoff, mask = isovolumetric_cutoff(density, 101)  # 100 is within 1 % of 101
    assert mask.sum() == 100 and cutoff == pytest.approx(0.1)
    with pytest.raises(ValueError, match="zero everywhere"):
        isovolumetric_cutoff(np.zeros((3, 3, 3)), 5)
    with pytest.raises(ValueError, match="empty"):
        isovolumetric_cutoff(density, np.zeros(density.shape, bool))


# --------------------------------------------------------------------------- sweeps


def test_margin_and_cutoff_sweeps_are_monotone_and_match_the_masks():
    density = _smooth_density((30, 30, 30))
    core = density > 0.9
    brain = np.ones(density.shape, bool)
    brain[:, :, 25:] = False
    spacing = (1.0, 1.2, 0.8)
    margins = np.array([0.0, 2.5, 5.0, 10.0, 15.0])
    volumes = margin_sweep(core, brain, spacing, margins)
    assert np.all(np.diff(volumes) > 0)
    expected = [standard_ctv(core, brain, spacing, m).sum() for m in margins]
    np.testing.assert_array_equal(volumes, expected)
    cutoffs = np.array([0.9, 0.5, 0.2, 0.05])
    counts = cutoff_sweep(density, cutoffs)
    np.testing.assert_array_equal(counts, [model_ctv(density, c).sum() for c in cutoffs])
    assert np.all(np.diff(counts) > 0)
    with pytest.raises(ValueError, match="> 0"):
        cutoff_sweep(density, [0.0])


def test_families_reproduce_the_ctv_functions():
    density = _smooth_density((24, 24, 24))
    core = density > 0.95
    brain = density > 0.05
    fam = margin_family(core, brain, (1.0, 1.0, 1.5))
    assert isinstance(fam, CTVFamily) and fam.unit == "mm"
    for m in (0.0, 3.0, 7.5):
        np.testing.assert_array_equal(fam.mask(m), standard_ctv(core, brain, (1.0, 1.0, 1.5), m))
    dens = density_family(density)
    np.testing.assert_array_equal(dens.mask(0.4), model_ctv(density, 0.4))
    rec = np.zeros(density.shape, bool)
    rec[12, 12, 5:8] = True
    knots = dens.breakpoints(rec)
    assert np.all(np.diff(knots) < 0)  # cutoffs descend so that the CTV grows
    np.testing.assert_allclose(np.sort(knots), np.sort(np.unique(density[rec])))


# --------------------------------------------------------------------------- real case


@pytest.fixture(scope="module")
def gliodil(data_dir):
    case = data_dir / "gliodil-patient001"
    with pytest.warns(LabelWarning, match="2 \\(8 voxels\\)"):
        masks, labels = load_tumour_masks(case / "segm.nii.gz", "gliodil", ignore=(2,))
    brain = load_image(case / "brainMask.nii.gz", kind="mask")
    plan = load_image(case / "standardPlan.nii.gz", kind="mask")
    return masks, labels, brain, plan


def test_standard_ctv_reproduces_the_authors_15mm_plan(gliodil):
    masks, labels, brain, plan = gliodil
    assert labels.spacing == brain.spacing == plan.spacing
    ctv = standard_ctv(masks.core, brain.data, labels.spacing, 15.0)
    dice = _dice(ctv, plan.data)
    assert dice >= 0.99  # measured: 1.0 (identical masks, 350794 voxels = 350.8 mL)
    assert ctv.sum() * labels.voxel_volume_ml == pytest.approx(350.8, abs=0.5)
    assert _dice(standard_ctv(masks.core, brain.data, labels.spacing, 13.0), plan.data) < dice


# --------------------------------------------------------------------------- ensembles


def test_ctv_probability_counts_member_votes_exactly():
    from rtjax.ctv import ctv_probability, probability_ranked_ctv

    # three 1-D "densities" on 6 voxels; each member's 2-voxel iso-volumetric CTV is known
    members = np.array([[0.9, 0.8, 0.1, 0.0, 0.0, 0.0],
                        [0.9, 0.1, 0.8, 0.0, 0.0, 0.0],
                        [0.2, 0.9, 0.8, 0.0, 0.0, 0.0]])
    probability, cutoffs = ctv_probability(members, 2)
    np.testing.assert_allclose(probability, [2 / 3, 2 / 3, 2 / 3, 0, 0, 0])
    np.testing.assert_allclose(cutoffs, [0.8, 0.8, 0.8])
    # outside the brain no member's CTV reaches: voxel 0 is excluded
    inside = np.array([False, True, True, True, True, True])
    probability, _ = ctv_probability(members, 2, inside=inside)
    np.testing.assert_allclose(probability, [0, 1, 1, 0, 0, 0])
    # ranked CTV of 2 voxels: by probability, ties by the mean density
    mean = members.mean(axis=0)
    ranked = probability_ranked_ctv(np.array([1, 0.5, 0.5, 0, 0, 0]), mean, 2)
    np.testing.assert_array_equal(ranked, [True, True, False, False, False, False])
    with pytest.raises(ValueError, match="at least one"):
        ctv_probability([], 2)
