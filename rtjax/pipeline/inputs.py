"""The inputs of one case: a case folder -> validated masks and images on one grid.

`load_segmented_case` finds the files of a case folder (canonical names, BraTS names, or
explicit overrides), reads the tumour segmentation in its label convention and the tissue
maps, and completes what is missing: a case without `seg` is segmented from its T1c and
FLAIR by the shipped network (`rtjax.seg`), a case without `wm`/`gm` gets the MNI152 atlas
registered to it (`rtjax.anatomy.case_tissue`). Both say so in a warning and in the
returned file record. Everything is checked to lie on one grid.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from rtjax.anatomy import case_tissue
from rtjax.errors import InputError
from rtjax.io import check_same_grid, find_case_files, load_image, load_tumour_masks
from rtjax.labels import TumourMasks, get_convention, split_labels
from rtjax.seg.infer import load_weights as load_seg_weights
from rtjax.seg.infer import segment_case

__all__ = ["CASE_KINDS", "load_segmented_case", "segment_with_network", "load_run_inputs"]

#: How each optional file of a segmented case is read.
CASE_KINDS = {"wm": "probability", "gm": "probability", "brain_mask": "mask",
              "recurrence": "mask", "t1c": "intensity", "flair": "intensity"}


def segment_with_network(case_dir, overrides):
    """(masks, T1c image, description) from the shipped segmentation network, with a warning."""
    seg_weights = load_seg_weights()
    convention = get_convention("brats2021")
    label_array, _, reference = segment_case(case_dir, weights=seg_weights, labels=convention.name,
                                             overrides=overrides)
    source = f"rtjax.seg {seg_weights.version}"
    warnings.warn(f"{case_dir}: no seg; segmented from t1c and flair by {source} "
                  "(check the masks in segmentation.nii.gz)", stacklevel=3)
    return split_labels(label_array, convention), reference, source


def _check_present(case_dir, files, segment_missing: bool, atlas_tissue_dirs) -> None:
    """InputError for a missing seg (that cannot be segmented) or a missing tissue map."""
    if "seg" not in files and not (segment_missing and {"t1c", "flair"} <= set(files)):
        need = "" if not segment_missing else ", or t1c and flair to segment"
        raise InputError(case_dir, "no tumour segmentation 'seg' (seg.nii[.gz], *_seg or "
                         f"*-seg){need}; found {sorted(files) or 'no images'}")
    missing = [n for n in ("wm", "gm") if n not in files]
    if len(missing) == 1 or (missing and not atlas_tissue_dirs):
        names = " and ".join(f"{n}.nii.gz" for n in missing)
        atlas = ", or neither for the MNI152 atlas registered to the case" if atlas_tissue_dirs else ""
        raise InputError(case_dir, f"no tissue map(s) {missing}: give both wm and gm{atlas}; "
                         f"provide {names}")


def _separate_edema(case_dir, edema_path, masks: TumourMasks):
    """(edema image, path, masks with that edema outside the core): TUM/Lipkova data keep
    the FLAIR abnormality in its own file (a bare name is taken in the case folder)."""
    edema_path = Path(edema_path)
    if not edema_path.is_absolute() and edema_path.parent == Path("."):
        edema_path = Path(case_dir) / edema_path
    image = load_image(edema_path, kind="mask")
    masks = TumourMasks(necrosis=masks.necrosis, enhancing=masks.enhancing,
                        edema=image.data & ~masks.core)
    return image, edema_path, masks


def load_segmented_case(
    case_dir, *, labels: str, ignore_labels=(), overrides=None, extras=tuple(CASE_KINDS),
    atlas_tissue_dirs=(), segment_missing: bool = False,
):
    """Load a case folder that has `seg`, `wm` and `gm` (and those of `extras` among
    brain_mask, recurrence, t1c, flair that it has), all validated on one grid. An `edema`
    override gives the edema as a separate mask (TUM/Lipkova data), a bare file name being
    taken in the case folder.
    A case with neither `wm` nor `gm` gets the MNI152 atlas registered to it
    (`rtjax.anatomy.case_tissue`, written to `atlas_tissue_dirs[0]`, reused from any of
    them), with a warning and `files["tissue"]` naming its tissue.json.
    A case without `seg` is segmented from its `t1c` and `flair` by the segmentation
    network (`segment_with_network`, the shipped weights) when `segment_missing` is set,
    with a warning; its masks are then on the T1c grid (the T1c, loaded once, is also
    `images["t1c"]`) and `files["seg"]` reads "rtjax.seg <weights version>".

    Returns (files, convention, masks, images), images keyed by name with "seg" the
    reference grid.

    Raises:
        InputError: a missing `seg`, a missing tissue map without `atlas_tissue_dirs`,
            unknown labels, or images on different grids, naming the file or folder.
    """
    overrides = dict(overrides or {})
    edema_path = overrides.pop("edema", None)
    files = find_case_files(case_dir, overrides=overrides)
    _check_present(case_dir, files, segment_missing, atlas_tissue_dirs)
    convention = get_convention(labels)
    if "seg" not in files:
        masks, reference, files["seg"] = segment_with_network(case_dir, overrides)
        if convention.name not in ("brats2021", "brats2023"):
            convention = get_convention("brats2021")
        images = {"seg": reference, "t1c": reference}
    else:
        masks, reference = load_tumour_masks(files["seg"], convention, ignore=tuple(ignore_labels))
        images = {"seg": reference}
    wanted = {"wm", "gm", *extras}
    images.update({n: load_image(files[n], kind=k) for n, k in CASE_KINDS.items()
                   if n in files and n in wanted and n not in images})
    if edema_path is not None:
        images["edema"], files["edema"], masks = _separate_edema(case_dir, edema_path, masks)
    if "wm" not in files:
        tissue = case_tissue(case_dir, atlas_tissue_dirs[0], lesion=masks.whole,
                             overrides=overrides, reuse_dirs=atlas_tissue_dirs[1:])
        files["tissue"] = Path(Path(atlas_tissue_dirs[0]).name, "tissue.json")
        warnings.warn(f"{case_dir}: no wm/gm maps; using the MNI152 atlas registered to the "
                      f"case ({tissue.info['method']}), see {files['tissue']}", stacklevel=2)
        images.update(wm=tissue.wm, gm=tissue.gm)
    check_same_grid(images)
    return files, convention, masks, images


def load_run_inputs(case_dir, labels, ignore_labels, overrides, atlas_tissue_dirs=()):
    """`load_segmented_case` for `rtjax run` (segmenting a case without seg), requiring a
    tumour core: the standard CTV grows from it."""
    files, convention, masks, images = load_segmented_case(
        case_dir, labels=labels, ignore_labels=ignore_labels, overrides=overrides,
        atlas_tissue_dirs=atlas_tissue_dirs, segment_missing=True)
    if not masks.core.any():
        raise InputError(files["seg"], "no tumour core (necrosis or enhancing voxels): the "
                         "standard CTV grows from the core")
    return files, convention, masks, images
