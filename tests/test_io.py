"""NIfTI I/O: geometry round trips, validation errors that name the file, atomic writes,
case-folder discovery, and the real data in ../shared/data."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from rtjax.errors import InputError
from rtjax.io import (
    CANONICAL_NAMES,
    Image,
    check_same_grid,
    find_case_files,
    load_case,
    load_image,
    load_tumour_masks,
    save_image,
)
from rtjax.labels import LabelWarning

SPACING = (0.9, 1.3, 2.5)
SHAPE = (5, 6, 7)
# Signed axis directions (columns) of the voxel axes, before the oblique rotation.
DIRECTIONS = {
    ("L", "P", "S"): [[-1, 0, 0], [0, -1, 0], [0, 0, 1]],
    ("P", "S", "R"): [[0, 0, 1], [-1, 0, 0], [0, 1, 0]],
}


def _rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    i, j = [a for a in range(3) if a != axis]
    rot = np.eye(3)
    rot[i, i], rot[i, j], rot[j, i], rot[j, j] = c, -s, s, c
    return rot


def oblique_affine(codes=("L", "P", "S"), spacing=SPACING) -> np.ndarray:
    """Rotated ~20 deg about x and z, non-RAS axes, anisotropic voxels."""
    linear = _rotation(2, 20) @ _rotation(0, 18) @ np.array(DIRECTIONS[codes], float)
    affine = np.eye(4)
    affine[:3, :3] = linear @ np.diag(spacing)
    affine[:3, 3] = (-12.5, 30.25, 7.0)
    return affine


def write_nifti(path, data, affine=None, *, qform_code=1, sform_code=1, nifti2=False,
                slope_inter=None) -> Path:
    affine = np.eye(4) if affine is None else affine
    cls = nib.Nifti2Image if nifti2 else nib.Nifti1Image
    img = cls(np.asarray(data), None)
    img.set_qform(affine, code=qform_code)
    img.set_sform(affine, code=sform_code)
    if slope_inter is not None:
        img.header.set_slope_inter(*slope_inter)
        img.to_filename(path)  # keeps the header's scaling as given
    else:
        nib.save(img, path)
    return Path(path)


def distinct_values(shape=SHAPE) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.permutation(np.prod(shape)).reshape(shape).astype(np.float32)


# --------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("codes", list(DIRECTIONS))
def test_load_reorients_to_ras_and_keeps_world_coordinates(tmp_path, codes):
    affine = oblique_affine(codes)
    assert nib.aff2axcodes(affine) == codes
    data = distinct_values()
    path = write_nifti(tmp_path / "t1c.nii.gz", data, affine)

    img = load_image(path)
    assert img.orientation == codes
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    assert img.original_shape == SHAPE and img.data.dtype == np.float32
    np.testing.assert_allclose(img.original_affine, affine, atol=1e-6)
    assert sorted(img.spacing) == pytest.approx(sorted(SPACING))
    assert img.voxel_volume_ml == pytest.approx(np.prod(SPACING) / 1000)

    # nibabel's own canonical image agrees exactly.
    canonical = nib.as_closest_canonical(nib.load(path))
    np.testing.assert_array_equal(img.data, canonical.get_fdata(dtype=np.float32))
    np.testing.assert_allclose(img.affine, canonical.affine, atol=1e-9)

    # The same voxel value sits at the same place in the world in both orientations.
    for ijk in [(0, 0, 0), (4, 5, 6), (1, 3, 2), (4, 0, 6)]:
        canonical_ijk = np.argwhere(img.data == data[ijk])[0]
        world = affine[:3, :3] @ np.array(ijk) + affine[:3, 3]
        np.testing.assert_allclose(img.voxel_to_world(canonical_ijk), world, atol=1e-4)
        np.testing.assert_allclose(img.world_to_voxel(world), canonical_ijk, atol=1e-4)
    # Spacing along each canonical axis is the voxel step in mm along that axis.
    for axis in range(3):
        step = img.voxel_to_world(np.eye(3)[axis]) - img.voxel_to_world(np.zeros(3))
        assert np.linalg.norm(step) == pytest.approx(img.spacing[axis])


@pytest.mark.parametrize("codes", list(DIRECTIONS))
def test_from_canonical_inverts_the_load_exactly(tmp_path, codes):
    data = distinct_values()
    img = load_image(write_nifti(tmp_path / "a.nii", data, oblique_affine(codes)))
    back = img.from_canonical(img.data)
    assert back.shape == SHAPE
    np.testing.assert_array_equal(back, data)
    with pytest.raises(ValueError, match="shape"):
        img.from_canonical(np.zeros((2, 2, 2)))


@pytest.mark.parametrize("codes", list(DIRECTIONS))
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_save_writes_the_input_grid_exactly(tmp_path, codes, suffix):
    affine = oblique_affine(codes)
    data = distinct_values()
    ref = load_image(write_nifti(tmp_path / "ref.nii.gz", data, affine, qform_code=0,
                                 sform_code=4))
    threshold = np.median(data)
    density = ref.data / ref.data.max()

    for kind, array, dtype, expected in [
        ("mask", ref.data > threshold, np.uint8, (data > threshold).astype(np.uint8)),
        ("density", density, np.float32, data / data.max()),
        ("label", (ref.data % 5).astype(np.int64), np.uint8, (data % 5).astype(np.uint8)),
        ("float", ref.data * -3.5, np.float32, data * -3.5),
    ]:
        out = save_image(array, ref, tmp_path / "out" / f"{kind}{suffix}", kind=kind)
        assert out == tmp_path / "out" / f"{kind}{suffix}"
        written = nib.load(out)
        assert written.shape == SHAPE
        assert written.get_data_dtype() == dtype
        raw = np.asarray(written.dataobj)
        assert raw.dtype == dtype
        np.testing.assert_array_equal(raw, expected.astype(dtype))
        header = written.header
        np.testing.assert_allclose(written.affine, affine, atol=1e-6)
        np.testing.assert_allclose(header.get_qform(), affine, atol=1e-6)
        np.testing.assert_allclose(header.get_sform(), affine, atol=1e-6)
        assert int(header["qform_code"]) == 1  # input had 0 -> scanner
        assert int(header["sform_code"]) == 4  # input's own code kept
        assert (written.dataobj.slope, written.dataobj.inter) == (1.0, 0.0)
        assert header.get_xyzt_units()[0] == "mm"
        assert header.get_zooms() == pytest.approx(SPACING, abs=1e-5)
        # And it loads back onto the same canonical grid.
        again = load_image(out, kind="mask" if kind == "mask" else "intensity")
        np.testing.assert_allclose(again.affine, ref.affine, atol=1e-6)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        f"{k}{suffix}" for k in ("mask", "density", "label", "float")
    )


def test_nifti2_and_trailing_singleton_are_accepted(tmp_path):
    data = distinct_values()
    img = load_image(write_nifti(tmp_path / "n2.nii", data, nifti2=True))
    np.testing.assert_array_equal(img.data, data)
    squeezed = load_image(write_nifti(tmp_path / "p.nii.gz", (data / data.max())[..., None]),
                          kind="probability")
    assert squeezed.shape == SHAPE and squeezed.original_shape == SHAPE


def test_with_data_keeps_geometry(tmp_path):
    ref = load_image(write_nifti(tmp_path / "a.nii.gz", distinct_values(), oblique_affine()))
    derived = ref.with_data(np.zeros(ref.shape, np.float32))
    assert derived.path is None and derived.shape == ref.shape
    np.testing.assert_array_equal(derived.affine, ref.affine)
    assert derived.orientation == ref.orientation
    with pytest.raises(ValueError, match="shape"):
        ref.with_data(np.zeros((2, 2, 2)))
    assert "LPS" in repr(ref)


# --------------------------------------------------------------------------- kinds


def test_label_kind_reads_integers_and_rejects_fractions(tmp_path):
    labels = np.array([0, 1, 2, 4] * 6, dtype=np.float32).reshape(2, 3, 4)
    img = load_image(write_nifti(tmp_path / "seg.nii.gz", labels), kind="label")
    assert img.data.dtype.kind == "i"
    np.testing.assert_array_equal(img.data, labels)
    raw = load_image(write_nifti(tmp_path / "u.nii.gz", labels.astype(np.uint16)), kind="label")
    assert raw.data.dtype == np.uint16
    bad = write_nifti(tmp_path / "bad.nii.gz", labels + 0.5)
    with pytest.raises(InputError, match=r"bad\.nii\.gz: .*non-integer"):
        load_image(bad, kind="label")


def test_mask_kind_applies_header_scaling(tmp_path):
    # Like brats2015 brainmask.nii.gz: int32 on disk, slope 2**-32, inter 0.5: raw
    # -2**31 is background; reading raw non-zero would mark every voxel.
    raw = np.full((2, 2, 2), -(2**31), dtype=np.int32)
    raw[0, 0, 0] = 2**31 - 128
    path = write_nifti(tmp_path / "m.nii.gz", raw, slope_inter=(2.0**-32, 0.5))
    mask = load_image(path, kind="mask")
    assert mask.data.dtype == bool and int(mask.data.sum()) == 1
    plain = load_image(write_nifti(tmp_path / "p.nii.gz", np.eye(3)[None] * 7), kind="mask")
    assert int(plain.data.sum()) == 3


def test_probability_kind(tmp_path):
    uint8 = np.array([0, 51, 255, 128] * 2, dtype=np.uint8).reshape(2, 2, 2)
    img = load_image(write_nifti(tmp_path / "gm.nii.gz", uint8), kind="probability")
    assert img.data.dtype == np.float32
    np.testing.assert_allclose(img.data, uint8 / 255.0, atol=1e-7)
    binary = load_image(write_nifti(tmp_path / "wm.nii.gz", (uint8 > 100).astype(np.uint8)),
                        kind="probability")
    np.testing.assert_array_equal(binary.data, uint8 > 100)
    with pytest.raises(InputError, match=r"csf\.nii\.gz: .*\[0, 1\].*1\.5"):
        load_image(write_nifti(tmp_path / "csf.nii.gz", np.full((2, 2, 2), 1.5)),
                   kind="probability")


# --------------------------------------------------------------------------- bad inputs


def test_missing_file(tmp_path):
    path = tmp_path / "nope.nii.gz"
    with pytest.raises(InputError, match="not found") as info:
        load_image(path)
    assert info.value.path == path and str(path) in str(info.value)


def test_non_nifti_and_garbage_files(tmp_path):
    (tmp_path / "x.mha").write_bytes(b"x")
    with pytest.raises(InputError, match=r"x\.mha: not a NIfTI"):
        load_image(tmp_path / "x.mha")
    (tmp_path / "g.nii").write_bytes(b"not a nifti at all" * 40)
    with pytest.raises(InputError, match=r"g\.nii: cannot read"):
        load_image(tmp_path / "g.nii")


@pytest.mark.parametrize("keep", [0.5, 0.9, 100])
def test_truncated_gz_is_an_input_error(tmp_path, keep):
    rng = np.random.default_rng(1)
    path = write_nifti(tmp_path / "t1c.nii.gz", rng.normal(size=(16, 16, 16)).astype(np.float32))
    blob = path.read_bytes()
    cut = int(len(blob) * keep) if keep < 1 else keep
    path.write_bytes(blob[:cut])
    for kind in ("intensity", "label", "mask", "probability"):
        with pytest.raises(InputError, match="t1c.nii.gz: cannot read") as info:
            load_image(path, kind=kind)
        assert str(path) in str(info.value)


def test_truncated_uncompressed_nii(tmp_path):
    path = write_nifti(tmp_path / "a.nii", distinct_values())
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(InputError, match=r"a\.nii: cannot read"):
        load_image(path)


def test_four_d_is_an_error(tmp_path):
    path = write_nifti(tmp_path / "dwi.nii.gz", np.zeros((3, 3, 3, 2), np.float32))
    with pytest.raises(InputError) as info:
        load_image(path)
    assert str(info.value) == f"{path}: 4-D (shape (3, 3, 3, 2)), expected a 3-D image"
    flat = write_nifti(tmp_path / "flat.nii.gz", np.zeros((3, 3), np.float32))
    with pytest.raises(InputError, match=r"2-D \(shape \(3, 3\)\)"):
        load_image(flat)


def test_non_finite_values_are_counted(tmp_path):
    data = np.ones((3, 3, 3), np.float32)
    data[0, 0, 0], data[1, 1, 1] = np.nan, np.inf
    path = write_nifti(tmp_path / "flair.nii.gz", data)
    for kind in ("intensity", "probability", "mask", "label"):
        with pytest.raises(InputError, match=r"flair\.nii\.gz: 2 non-finite"):
            load_image(path, kind=kind)


def test_grid_mismatches_name_both_files(tmp_path):
    affine = oblique_affine()
    a = load_image(write_nifti(tmp_path / "a.nii.gz", distinct_values(), affine))
    b = load_image(write_nifti(tmp_path / "b.nii.gz", distinct_values((5, 6, 8)), affine))
    shifted = affine.copy()
    shifted[0, 3] += 0.5
    c = load_image(write_nifti(tmp_path / "c.nii.gz", distinct_values(), shifted))
    check_same_grid({"t1c": a, "same": load_image(a.path)})
    with pytest.raises(InputError) as info:
        check_same_grid({"t1c": a, "flair": b})
    assert info.value.path == b.path
    message = str(info.value)
    assert str(a.path) in message and "(5, 6, 7)" in message and "(5, 6, 8)" in message
    with pytest.raises(InputError, match=r"c\.nii\.gz: affine differs .*a\.nii\.gz.* 0\.5 mm"):
        check_same_grid({"t1c": a, "flair": c})
    check_same_grid({"t1c": a, "flair": c}, atol_mm=0.6)


# --------------------------------------------------------------------------- atomic writes


def _no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if ".tmp" in p.name]


def test_failed_write_leaves_no_file_and_keeps_a_good_one(tmp_path):
    ref = load_image(write_nifti(tmp_path / "ref.nii.gz", distinct_values(), oblique_affine()))
    out = tmp_path / "res" / "density.nii.gz"
    bad = np.full(ref.shape, 0.5, np.float32)
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="1 non-finite"):
        save_image(bad, ref, out, kind="density")
    assert not out.exists()

    good = np.full(ref.shape, 0.25, np.float32)
    save_image(good, ref, out, kind="density")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        save_image(good + 1.0, ref, out, kind="density")
    np.testing.assert_array_equal(nib.load(out).get_fdata(), 0.25)
    assert _no_temp_files(out.parent)


def test_interrupted_write_removes_the_temp_file(tmp_path, monkeypatch):
    ref = load_image(write_nifti(tmp_path / "ref.nii.gz", distinct_values()))
    out = save_image(ref.data > 3, ref, tmp_path / "ctv.nii.gz", kind="mask")
    before = out.read_bytes()

    def broken(self, filename, **kwargs):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(nib.Nifti1Image, "to_filename", broken)
    with pytest.raises(OSError, match="disk full"):
        save_image(ref.data > 5, ref, out, kind="mask")
    assert out.read_bytes() == before
    assert _no_temp_files(tmp_path)


def test_save_rejects_bad_arrays(tmp_path):
    ref = load_image(write_nifti(tmp_path / "ref.nii.gz", distinct_values()))
    with pytest.raises(ValueError, match="shape"):
        save_image(np.zeros((2, 2, 2)), ref, tmp_path / "x.nii.gz", kind="mask")
    with pytest.raises(ValueError, match="0/1"):
        save_image(np.full(ref.shape, 2), ref, tmp_path / "x.nii.gz", kind="mask")
    with pytest.raises(ValueError, match="uint8"):
        save_image(np.full(ref.shape, 300), ref, tmp_path / "x.nii.gz", kind="label")
    with pytest.raises(ValueError, match="kind"):
        save_image(np.zeros(ref.shape), ref, tmp_path / "x.nii.gz", kind="probability")
    with pytest.raises(ValueError, match=r"\.nii"):
        save_image(np.zeros(ref.shape), ref, tmp_path / "x.npy", kind="float")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.nii.gz"]


# --------------------------------------------------------------------------- case folders


def _touch(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")


def test_brats2021_and_2023_names_are_recognised(tmp_path):
    b21 = tmp_path / "b21"
    _touch(b21, *(f"BraTS2021_00000_{m}.nii.gz" for m in ("t1ce", "flair", "t1", "t2", "seg")),
           "notes.txt", "._BraTS2021_00000_t1ce.nii.gz")
    files = find_case_files(b21)
    assert {k: v.name for k, v in files.items()} == {
        "t1c": "BraTS2021_00000_t1ce.nii.gz", "flair": "BraTS2021_00000_flair.nii.gz",
        "t1": "BraTS2021_00000_t1.nii.gz", "t2": "BraTS2021_00000_t2.nii.gz",
        "seg": "BraTS2021_00000_seg.nii.gz",
    }
    b23 = tmp_path / "b23"
    _touch(b23, *(f"BraTS-GLI-00001-000-{m}.nii" for m in ("t1c", "t2f", "t1n", "t2w", "seg")))
    assert {k: v.name[-8:] for k, v in find_case_files(b23).items()} == {
        "t1c": "-t1c.nii", "flair": "-t2f.nii", "t1": "-t1n.nii", "t2": "-t2w.nii",
        "seg": "-seg.nii",
    }


def test_canonical_names_and_overrides(tmp_path):
    case = tmp_path / "case"
    _touch(case, *(f"{n}.nii.gz" for n in CANONICAL_NAMES), "other.nii.gz")
    files = find_case_files(case)
    assert set(files) == set(CANONICAL_NAMES)
    assert files["wm"] == case / "wm.nii.gz"
    # Canonical names match in any letter case (the Lipkova patient has WM/GM) ...
    upper = tmp_path / "upper"
    _touch(upper, "WM.nii.gz", "Gm.nii")
    assert find_case_files(upper) == {"wm": upper / "WM.nii.gz", "gm": upper / "Gm.nii"}
    # ... so wm and WM side by side are ambiguous.
    _touch(case, "WM.nii.gz")
    with pytest.raises(InputError, match="ambiguous 'wm'"):
        find_case_files(case)
    # A bare name is inside the case folder; a path with a folder is used as given.
    files = find_case_files(case, {"wm": "WM.nii.gz", "gm": case / "other.nii.gz"})
    assert files["wm"] == case / "WM.nii.gz" and files["gm"] == case / "other.nii.gz"
    with pytest.raises(ValueError, match="white_matter"):
        find_case_files(case, {"white_matter": "WM.nii.gz"})
    with pytest.raises(InputError, match="absent.nii.gz: file given for 'wm' not found"):
        find_case_files(case, {"wm": "absent.nii.gz"})


def test_ambiguous_and_missing_folders(tmp_path):
    case = tmp_path / "case"
    _touch(case, "t1c.nii.gz", "BraTS2021_00000_t1ce.nii.gz", "flair.nii")
    with pytest.raises(InputError) as info:
        find_case_files(case)
    message = str(info.value)
    assert message.startswith(f"{case}: ")
    assert "BraTS2021_00000_t1ce.nii.gz" in message and "t1c.nii.gz" in message
    # An override settles it.
    assert find_case_files(case, {"t1c": "t1c.nii.gz"})["t1c"] == case / "t1c.nii.gz"
    with pytest.raises(InputError, match="case folder not found"):
        find_case_files(tmp_path / "nowhere")


def _synthetic_case(folder: Path, affine=None) -> Path:
    affine = oblique_affine() if affine is None else affine
    folder.mkdir(parents=True, exist_ok=True)
    data = distinct_values()
    write_nifti(folder / "t1c.nii.gz", data, affine)
    write_nifti(folder / "flair.nii.gz", data * 2, affine)
    labels = np.zeros(SHAPE, np.uint8)
    labels[1:3, 2:4, 3:5] = [[[1, 4], [4, 4]], [[2, 2], [4, 1]]]
    write_nifti(folder / "seg.nii.gz", labels, affine)
    write_nifti(folder / "wm.nii.gz", (data % 256).astype(np.uint8), affine)
    write_nifti(folder / "brain_mask.nii.gz", (data > 10).astype(np.int16), affine)
    write_nifti(folder / "tensor.nii.gz", np.zeros((*SHAPE, 6), np.float32), affine)
    return folder


def test_load_case_kinds_names_and_requirements(tmp_path):
    case_dir = _synthetic_case(tmp_path / "case")
    case = load_case(case_dir, require=("t1c", "seg"))
    assert list(case.images) == ["t1c", "flair", "seg", "wm", "brain_mask"]
    assert case.files["tensor"] == case_dir / "tensor.nii.gz"
    assert case.images["seg"].data.dtype == np.uint8
    assert case.images["brain_mask"].data.dtype == bool
    assert 0.0 <= case.images["wm"].data.min() and case.images["wm"].data.max() <= 1.0
    assert case.images["t1c"].data.dtype == np.float32

    only = load_case(case_dir, names=["flair"], require=["seg"])
    assert list(only.images) == ["flair", "seg"]
    with pytest.raises(ValueError, match="tensor"):
        load_case(case_dir, names=["tensor"])
    with pytest.raises(ValueError, match="unknown"):
        load_case(case_dir, names=["pet"])
    (case_dir / "flair.nii.gz").unlink()
    with pytest.raises(InputError) as info:
        load_case(case_dir, require=("t1c", "flair"))
    assert str(info.value) == (
        f"{case_dir}: missing required modality 'flair' (looked for flair.nii[.gz], *_flair, *-t2f)"
    )


def test_load_case_checks_the_grid(tmp_path):
    case_dir = _synthetic_case(tmp_path / "case")
    write_nifti(case_dir / "flair.nii.gz", distinct_values(), oblique_affine(spacing=(1, 1, 1)))
    with pytest.raises(InputError, match=r"flair\.nii\.gz: affine differs .*t1c\.nii\.gz"):
        load_case(case_dir)


def test_load_tumour_masks(tmp_path):
    case_dir = _synthetic_case(tmp_path / "case")
    masks, image = load_tumour_masks(case_dir / "seg.nii.gz", "brats2021")
    assert masks.shape == image.shape
    assert (int(masks.necrosis.sum()), int(masks.enhancing.sum()), int(masks.edema.sum())) == (
        2, 4, 2)
    with pytest.raises(InputError, match=r"seg\.nii\.gz: unexpected label values 2 \(2 voxels\)"):
        load_tumour_masks(case_dir / "seg.nii.gz", "tum")
    with pytest.warns(LabelWarning, match=r"seg\.nii\.gz: ignoring label values 2 \(2 voxels\)"):
        masks, _ = load_tumour_masks(case_dir / "seg.nii.gz", "tum", ignore=(2,))
    assert not masks.edema.any() and int(masks.core.sum()) == 6

    empty = write_nifti(tmp_path / "empty.nii.gz", np.zeros(SHAPE, np.uint8))
    with pytest.raises(InputError, match=r"empty\.nii\.gz: empty tumour mask"):
        load_tumour_masks(empty, "brats2021")
    masks, _ = load_tumour_masks(empty, "brats2021", require_tumour=False)
    assert masks.is_empty()


# --------------------------------------------------------------------------- real data

BRATS2015_OVERRIDES = {
    "t1c": "T1c_subtrMeanDivStd.nii.gz",
    "flair": "Flair_subtrMeanDivStd.nii.gz",
    "seg": "OTMultiClass.nii.gz",
    "brain_mask": "brainmask.nii.gz",
}


@pytest.fixture(scope="module")
def brats2015_case(data_dir):
    return load_case(data_dir / "brats2015/brats_2013_pat0001_1",
                     overrides=BRATS2015_OVERRIDES, require=("t1c", "flair", "seg"))


def test_real_brats2015_case_loads_on_one_ras_grid(brats2015_case):
    case = brats2015_case
    assert list(case.images) == ["t1c", "flair", "seg", "brain_mask"]
    for image in case.images.values():
        assert image.orientation == ("L", "P", "S")
        assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
        assert image.shape == (240, 240, 155)
        assert image.spacing == pytest.approx((1.0, 1.0, 1.0))
    # brainmask.nii.gz is int32 with scl_inter 0.5: raw non-zero would be the whole box.
    assert 0.1 < case.images["brain_mask"].data.mean() < 0.3


def test_real_brats2015_labels_split_and_write_back(brats2015_case, data_dir, tmp_path):
    path = data_dir / "brats2015/brats_2013_pat0001_1/OTMultiClass.nii.gz"
    masks, image = load_tumour_masks(path, "brats2015")
    assert masks.core.any() and masks.edema.any() and masks.enhancing.any()
    brain = brats2015_case.images["brain_mask"].data
    assert (masks.whole & brain).sum() > 0.99 * masks.whole.sum()  # same canonical grid
    with pytest.raises(InputError, match=r"OTMultiClass\.nii\.gz: unexpected label values 3"):
        load_tumour_masks(path, "brats2021")  # label 3 does not exist in BraTS 2021
    out = save_image(masks.whole, image, tmp_path / "whole.nii.gz", kind="mask")
    original = nib.load(path)
    written = nib.load(out)
    np.testing.assert_array_equal(np.asarray(written.dataobj),
                                  (np.asarray(original.dataobj) > 0).astype(np.uint8))
    np.testing.assert_allclose(written.affine, original.affine, atol=1e-6)


def test_real_gliodil_segm_needs_explicit_ignore(data_dir):
    path = data_dir / "gliodil-patient001/segm.nii.gz"
    with pytest.raises(InputError) as info:
        load_tumour_masks(path, "gliodil")
    assert str(path) in str(info.value) and "2 (8 voxels)" in str(info.value)
    with pytest.warns(LabelWarning, match=r"2 \(8 voxels\)"):
        masks, _ = load_tumour_masks(path, "gliodil", ignore=(2,))
    assert masks.core.any() and masks.edema.any()


def test_real_lipkova_t1c_needs_explicit_ignore(data_dir):
    path = data_dir / "lipkova-patient/tumT1c.nii.gz"
    expected = r"tumT1c\.nii\.gz: unexpected label values 2 \(11 voxels\)"
    with pytest.raises(InputError, match=expected):
        load_tumour_masks(path, "tum")
    with pytest.warns(LabelWarning, match=r"2 \(11 voxels\)"):
        masks, _ = load_tumour_masks(path, "tum", ignore=(2,))
    assert masks.enhancing.any() and masks.necrosis.any() and not masks.edema.any()


def test_real_atlas_probability_maps(data_dir):
    wm = load_image(data_dir / "atlas/sri24/pbmap_wm.nii.gz", kind="probability")
    assert wm.original_shape == (240, 240, 155) and wm.data.dtype == np.float32
    assert 0.0 <= wm.data.min() and 0.9 < wm.data.max() <= 1.0
    gm = load_image(data_dir / "atlas/mni152/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
                    kind="probability")
    assert gm.shape == (197, 233, 189)
    assert gm.data.min() == 0.0 and gm.data.max() == 1.0  # uint8 255 -> 1
    assert 0.05 < gm.data.mean() < 0.5


def test_resample_image_goes_through_world_coordinates():
    from rtjax.io import resample_image

    rng = np.random.default_rng(0)
    data = rng.uniform(size=(6, 7, 8)).astype(np.float32)
    affine = np.diag([2.0, 1.5, 1.0, 1.0])
    affine[:3, 3] = [-5.0, 3.0, 2.0]
    source = Image.from_array(data, affine)
    # Identity: exact.
    np.testing.assert_allclose(resample_image(source, source, order=1), data, atol=1e-6)
    # The same world grid stored LPS with permuted axes: nearest neighbour is a relabelling.
    flipped = np.array([[0, -2.0, 0, 5.0], [-1.5, 0, 0, 12.0], [0, 0, 1.0, 2.0], [0, 0, 0, 1]])
    stored = np.transpose(data[::-1, ::-1, :], (1, 0, 2))
    target = Image.from_array(stored, flipped)
    np.testing.assert_allclose(target.data, data, atol=0)  # canonical views agree
    np.testing.assert_allclose(resample_image(source, target, order=0), data, atol=0)
    # Half a voxel outside the field of view is cval.
    shifted = affine.copy()
    shifted[:3, 3] += [2.0 * 6, 0, 0]
    far = Image.from_array(data, shifted)
    assert np.all(resample_image(source, far, order=1, cval=-1.0) == -1.0)
