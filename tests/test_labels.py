"""Label conventions: exact splits, round trips, and loud failures on unexpected values."""

import pickle
import warnings

import numpy as np
import pytest

from rtjax.errors import InputError
from rtjax.labels import (
    CONVENTIONS,
    LabelWarning,
    TumourMasks,
    combine_labels,
    get_convention,
    split_labels,
)

# One voxel per role; per convention: (necrosis values, enhancing values, edema values).
EXPECTED = {
    "brats2021": ((1,), (4,), (2,)),
    "brats2023": ((1,), (3,), (2,)),
    "brats2015": ((1, 3), (4,), (2,)),
    "gliodil": ((4,), (1,), (3,)),
    "tum": ((4,), (1,), ()),
}


def test_input_error_names_the_file_and_pickles():
    err = InputError("case/seg.nii.gz", "bad labels")
    assert str(err) == "case/seg.nii.gz: bad labels"
    assert err.path == "case/seg.nii.gz" and err.problem == "bad labels"
    assert isinstance(err, ValueError)
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err) and again.path == err.path


def test_conventions_are_exactly_the_documented_ones():
    assert set(CONVENTIONS) == set(EXPECTED)
    for name, (necrosis, enhancing, edema) in EXPECTED.items():
        conv = CONVENTIONS[name]
        assert (conv.necrosis, conv.enhancing, conv.edema) == (necrosis, enhancing, edema)
        assert conv.known_labels == frozenset({0, *necrosis, *enhancing, *edema})
        assert conv.description


def test_get_convention_is_case_insensitive_and_lists_valid_names():
    assert get_convention("BraTS2021") is CONVENTIONS["brats2021"]
    assert get_convention(CONVENTIONS["tum"]) is CONVENTIONS["tum"]
    with pytest.raises(ValueError, match="brats2015.*brats2021.*brats2023.*gliodil.*tum"):
        get_convention("brats")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_split_is_exact_and_combine_inverts_it(name):
    necrosis, enhancing, edema = EXPECTED[name]
    values = [0, *necrosis, *enhancing, *edema, 0]
    labels = np.array(values, dtype=np.uint8).reshape(1, 1, -1)
    masks = split_labels(labels, name)
    flat = {g: getattr(masks, g).ravel().tolist() for g in ("necrosis", "enhancing", "edema")}
    assert flat["necrosis"] == [v in necrosis for v in values]
    assert flat["enhancing"] == [v in enhancing for v in values]
    assert flat["edema"] == [v in edema for v in values]
    assert masks.core.ravel().tolist() == [v in necrosis + enhancing for v in values]
    assert masks.whole.ravel().tolist() == [v != 0 for v in values]
    combined = combine_labels(masks, name)
    assert combined.dtype == np.uint8
    # Each group comes back as its first label (BRATS 2015 non-enhancing 3 -> 1).
    first = {v: grp[0] for grp in (necrosis, enhancing, edema) for v in grp}
    assert combined.ravel().tolist() == [first.get(v, 0) for v in values]
    again = split_labels(combined, name)
    for group in ("necrosis", "enhancing", "edema"):
        np.testing.assert_array_equal(getattr(again, group), getattr(masks, group))


def test_integer_valued_floats_are_accepted_fractions_are_not():
    masks = split_labels(np.array([[[0.0, 1.0, 2.0, 4.0]]], dtype=np.float32), "brats2021")
    assert masks.necrosis.tolist() == [[[False, True, False, False]]]
    with pytest.raises(InputError, match=r"seg\.nii: .*non-integer"):
        split_labels(np.array([0.0, 1.5]), "brats2021", source="seg.nii")


def test_unexpected_values_are_an_error_listing_counts_and_expected_values():
    labels = np.array([0, 1, 2, 2, 3, 7, 7, 7])
    with pytest.raises(InputError) as info:
        split_labels(labels, "brats2021", source="case/seg.nii.gz")
    message = str(info.value)
    assert message.startswith("case/seg.nii.gz: ")
    assert "3 (1 voxels)" in message and "7 (3 voxels)" in message
    assert "'brats2021'" in message and "0, 1, 2, 4" in message
    # No convention holds 3 and 7; 4 of 7 labelled voxels are far too many to be strays.
    assert "check --labels" in message and "--ignore-labels" not in message
    assert "too many to be strays" in message


def test_the_hint_names_a_fitting_convention_and_only_stray_values_to_ignore():
    # BraTS 2023 labels (3 = enhancing) read as brats2021: switch the convention, never drop 3.
    labels = np.array([0] * 50 + [1] * 30 + [2] * 40 + [3] * 30)
    with pytest.raises(InputError) as info:
        split_labels(labels, "brats2021")
    message = str(info.value)
    assert "the values fit --labels brats2023" in message and "--ignore-labels" not in message
    # GliODIL's 8 stray voxels of 2 among 2000 labelled ones: the command-line fix.
    labels = np.array([1] * 700 + [3] * 1000 + [4] * 292 + [2] * 8)
    with pytest.raises(InputError) as info:
        split_labels(labels, "gliodil")
    assert "drop them with --ignore-labels 2" in str(info.value)
    assert split_labels(labels, "gliodil", ignore=(2,)).edema.sum() == 1000


def test_ignored_values_become_background_with_a_warning():
    labels = np.array([0, 1, 2, 4, 9, 9])
    with pytest.warns(LabelWarning, match=r"seg\.nii: .*9 \(2 voxels\)"):
        masks = split_labels(labels, "brats2021", source="seg.nii", ignore=(9,))
    assert masks.whole.tolist() == [False, True, True, True, False, False]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an ignore value that is absent warns nothing
        split_labels(np.array([0, 1]), "brats2021", ignore=(9,))


def test_ignoring_a_label_of_the_convention_is_refused():
    with pytest.raises(ValueError, match="belong to convention"):
        split_labels(np.array([0, 2]), "brats2021", ignore=(2,))


def test_combine_refuses_edema_without_an_edema_label_and_overlaps():
    edema = np.array([[[True, False]]])
    none = np.zeros_like(edema)
    with pytest.raises(ValueError, match="no edema label"):
        combine_labels(TumourMasks(none, none, edema), "tum")
    assert combine_labels(TumourMasks(none, none, none), "tum").tolist() == [[[0, 0]]]
    with pytest.raises(ValueError, match="overlap"):
        combine_labels(TumourMasks(edema, edema, none), "brats2021")


def test_tumour_masks_check_shapes_and_emptiness():
    with pytest.raises(ValueError, match="one shape"):
        TumourMasks(np.zeros((2, 2), bool), np.zeros((2, 2), bool), np.zeros((2, 3), bool))
    empty = TumourMasks(*(np.zeros((2, 2, 2), bool),) * 3)
    assert empty.is_empty()
    edema_only = TumourMasks(empty.necrosis, empty.enhancing, np.ones((2, 2, 2), bool))
    assert not edema_only.is_empty() and not edema_only.core.any()
