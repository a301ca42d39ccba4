"""The inputs of one case: a case folder -> validated masks and images on one grid.

`case_overrides` turns what the user named (explicit files per role, ``--seg`` ...;
glob patterns per role, ``--names seg=segm.nii.gz``) into the file overrides of
`rtjax.io.find_case_files`. `check_case_inputs` checks, before any heavy work, that the
files a run needs are there, readable and on one grid (headers only), in the order a user
would fix them. `load_segmented_case` finds the files of a case folder (canonical names,
BraTS names, or overrides), reads the tumour segmentation in its label convention and the
tissue maps, and completes what is missing: a case without `seg` is segmented from its T1c
and FLAIR by the shipped network (`rtjax.seg`, with its uncertainty), a case without
`wm`/`gm` gets the MNI152 atlas registered to it (`rtjax.anatomy.case_tissue`). Both say so
in a warning and in the returned file record.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path

from rtjax.anatomy import DTI_OUTPUT, case_tissue, target_image
from rtjax.errors import InputError
from rtjax.io import (
    check_files_on_one_grid,
    check_same_grid,
    find_case_files,
    header_shape,
    load_image,
    load_tumour_masks,
)
from rtjax.labels import TumourMasks, get_convention, split_labels
from rtjax.seg.infer import load_weights as load_seg_weights
from rtjax.seg.infer import segment_case
from rtjax.tensor_io import load_tensor_fa_peaks, load_tensor_fsl, resample_tensor

__all__ = ["CASE_KINDS", "DTI_MIN_COVERAGE", "case_overrides", "check_case_inputs", "check_dti_files",
           "load_case_dti", "load_segmented_case", "resolve_names", "segment_with_network",
           "load_run_inputs"]

#: The DTI must cover at least this fraction of the visible tumour (else it is on another
#: grid or in another space).
DTI_MIN_COVERAGE = 0.5

#: How each optional file of a segmented case is read.
CASE_KINDS = {"wm": "probability", "gm": "probability", "brain_mask": "mask",
              "recurrence": "mask", "t1c": "intensity", "flair": "intensity"}


def resolve_names(case_dir, names: Mapping[str, str] | None) -> dict[str, Path]:
    """role -> the one file of ``case_dir`` matching the role's glob pattern (a
    ``--names`` mapping, e.g. ``{"seg": "segm.nii.gz", "brain_mask": "brainMask*"}``).

    Raises:
        InputError: no file or more than one file matches a pattern (naming the case folder).
    """
    case_dir = Path(case_dir)
    files = {}
    for role, pattern in (names or {}).items():
        found = sorted(p for p in case_dir.glob(pattern)
                       if p.is_file() and not p.name.startswith("."))
        if not found:
            raise InputError(case_dir, f"no file matches --names {role}={pattern}")
        if len(found) > 1:
            listed = ", ".join(p.relative_to(case_dir).as_posix() for p in found[:4])
            raise InputError(case_dir, f"--names {role}={pattern} matches {len(found)} files "
                             f"({listed}); make the pattern match one file")
        files[role] = found[0]
    return files


def _given_file(case_dir: Path, role: str, value) -> Path:
    """A bare file name is taken in the case folder, any other path as given (absolute)."""
    path = Path(value).expanduser()
    if not path.is_absolute() and path.parent == Path("."):
        path = case_dir / path
    option = "--" + role.replace("_", "-")
    if not path.is_file():
        raise InputError(path, f"file given for {option} not found" if not path.exists()
                         else f"{option} is not a file")
    return path.absolute()


def case_overrides(case_dir, overrides: Mapping | None = None,
                   names: Mapping[str, str] | None = None) -> dict[str, Path]:
    """The file overrides of one case: ``names`` patterns resolved in ``case_dir``, then the
    explicit ``overrides`` (role -> file; a bare name is taken in the case folder), which
    win. Every file is checked to exist.

    Raises:
        InputError: the case folder does not exist, a pattern matches no file or several,
            or a named file does not exist.
    """
    case_dir = Path(case_dir)
    if not case_dir.is_dir():
        raise InputError(case_dir, "not a folder" if case_dir.exists() else "case folder not found")
    files = resolve_names(case_dir, names)
    files.update({role: _given_file(case_dir, role, value)
                  for role, value in (overrides or {}).items() if value is not None})
    return files


def _needed(files, *, extras, segment_missing: bool, atlas_tissue: bool) -> list[str]:
    """The files a run reads, in the order a user would check them."""
    needed = ["seg", "edema", "wm", "gm", *extras]
    if "seg" not in files and segment_missing:
        needed += ["t1c", "flair", "brain_mask"]
    if "wm" not in files and atlas_tissue:
        needed += ["t1", "t1c", "brain_mask", "seg"]
    return [n for n in dict.fromkeys(needed) if n in files]


def check_case_inputs(case_dir, overrides=None, *, extras=tuple(CASE_KINDS),
                      segment_missing: bool = False, atlas_tissue: bool = False
                      ) -> dict[str, Path]:
    """Find the files of a case folder and check, before any heavy work, that the run can
    use them: a segmentation (or T1c and FLAIR to segment), both tissue maps or neither
    (then, with ``atlas_tissue``, something to register the atlas to), every file it reads
    readable as NIfTI and all on one grid (from the headers alone).

    Returns:
        role -> file (an ``edema`` override included).

    Raises:
        InputError: the first problem, naming the file or folder.
    """
    overrides = dict(overrides or {})
    edema = overrides.pop("edema", None)
    files = find_case_files(case_dir, overrides=overrides)
    if edema is not None:
        files["edema"] = _given_file(Path(case_dir), "edema", edema)
    if "seg" not in files and not (segment_missing and {"t1c", "flair"} <= set(files)):
        need = ", or t1c and flair to segment" if segment_missing else ""
        raise InputError(case_dir, "no tumour segmentation 'seg' (seg.nii[.gz], *_seg or "
                         f"*-seg; or name it with --seg){need}; found {sorted(files) or 'no images'}")
    missing = [n for n in ("wm", "gm") if n not in files]
    if len(missing) == 1 or (missing and not atlas_tissue):
        names = " and ".join(f"{n}.nii.gz" for n in missing)
        atlas = ", or neither for the MNI152 atlas registered to the case" if atlas_tissue else ""
        raise InputError(case_dir, f"no tissue map(s) {missing}: give both wm and gm{atlas}; "
                         f"provide {names} (or name them with --wm / --gm)")
    if missing and target_image(files) is None:
        raise InputError(case_dir, "no wm/gm maps and no t1, t1c or brain_mask to register "
                         "the MNI152 atlas to; give wm and gm, or a t1c or brain_mask")
    check_files_on_one_grid({n: files[n] for n in _needed(
        files, extras=extras, segment_missing=segment_missing, atlas_tissue=atlas_tissue)})
    check_dti_files(files)
    return files


def check_dti_files(files: Mapping[str, Path]) -> None:
    """From the headers: a `tensor` has six volumes; `fa` (3-D) and `peaks` (4-D, 3k
    volumes) come together. The DTI may be on its own grid (it is resampled).

    Raises:
        InputError: naming the file.
    """
    if "tensor" in files:
        shape = header_shape(files["tensor"])
        if len(shape) != 4 or shape[3] != 6:
            raise InputError(files["tensor"], f"a DTI tensor has six volumes (FSL order Dxx, Dxy, "
                             f"Dxz, Dyy, Dyz, Dzz); this file has shape {shape}")
    if ("fa" in files) != ("peaks" in files):
        have, lack = ("fa", "peaks") if "fa" in files else ("peaks", "fa")
        raise InputError(files[have], f"{have} without {lack}: give both --fa and --peaks")
    if "fa" in files:
        if len(header_shape(files["fa"])) != 3:
            raise InputError(files["fa"], f"FA must be 3-D, got shape {header_shape(files['fa'])}")
        shape = header_shape(files["peaks"])
        if len(shape) != 4 or shape[3] % 3:
            raise InputError(files["peaks"], f"fibre peaks are 4-D with 3k volumes (k peaks x "
                             f"(x, y, z)); this file has shape {shape}")


def load_case_dti(files: Mapping[str, Path], reference, lesion, *, frame: str | None = None):
    """The case's DTI on its grid: its `tensor` (FSL six volumes), else `fa` + `peaks`,
    else the atlas DTI carried by the registration (`dti_atlas`), resampled onto
    ``reference``'s grid with the tensors rotated (`rtjax.tensor_io.resample_tensor`).

    Returns:
        (tensor (6, *grid) float32 in the canonical voxel frame, or None without DTI;
        the record for params.json: source files, frame, coverage of the tumour).

    Raises:
        InputError: unreadable, non-finite, not positive semi-definite, or not covering
            the tumour (another grid or space), naming the file.
    """
    if "tensor" in files:
        frame = frame or "fsl"
        t6, source = load_tensor_fsl(files["tensor"], frame=frame)
        record, where = {"tensor": str(files["tensor"])}, files["tensor"]
    elif "fa" in files:
        frame = frame or "world"
        t6, source = load_tensor_fa_peaks(files["fa"], files["peaks"], frame=frame)
        record, where = {"fa": str(files["fa"]), "peaks": str(files["peaks"])}, files["peaks"]
    elif "dti_atlas" in files:
        frame = "fsl"
        t6, source = load_tensor_fsl(files["dti_atlas"])
        record, where = {"atlas_dti": str(files["dti_atlas"])}, files["dti_atlas"]
    else:
        return None, {"tensor_given": False}
    on_case = resample_tensor(t6, source, reference)
    present = (on_case[0] + on_case[3] + on_case[5]) > 0
    covered = float(present[lesion].mean()) if lesion.any() else 1.0
    if covered < DTI_MIN_COVERAGE:
        raise InputError(where, f"the DTI covers {covered:.0%} of the tumour: is it on another "
                         "grid or in another space than the case (world coordinates differ)?")
    record.update({"tensor_given": True, "frame": frame, "tumour_coverage": round(covered, 4),
                   "resampled_from_shape": list(source.shape)})
    return on_case, record


def segment_with_network(case_dir, overrides, uncertainty: bool = False):
    """(masks, T1c image, description, uncertainty or None) from the shipped segmentation
    network, with a warning. The uncertainty is the spread of the ensemble's members
    (`rtjax.seg.infer`; no flips, so the masks are those of a plain segmentation and it
    costs no extra forward pass)."""
    seg_weights = load_seg_weights()
    convention = get_convention("brats2021")
    label_array, unc, reference = segment_case(case_dir, weights=seg_weights, labels=convention.name,
                                               overrides=overrides, uncertainty=uncertainty,
                                               tta=False)
    source = f"rtjax.seg {seg_weights.version}"
    warnings.warn(f"{case_dir}: no seg; segmented from t1c and flair by {source} "
                  "(check the masks in segmentation.nii.gz)", stacklevel=3)
    return split_labels(label_array, convention), reference, source, unc


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
    atlas_tissue_dirs=(), segment_missing: bool = False, seg_uncertainty: bool = False,
    atlas_dti=None,
):
    """Load a case folder that has `seg`, `wm` and `gm` (and those of `extras` among
    brain_mask, recurrence, t1c, flair that it has), all validated on one grid
    (:func:`check_case_inputs` first, before any heavy work). An `edema` override gives the
    edema as a separate mask (TUM/Lipkova data), a bare file name being taken in the case
    folder.
    A case with neither `wm` nor `gm` gets the MNI152 atlas registered to it
    (`rtjax.anatomy.case_tissue`, written to `atlas_tissue_dirs[0]`, reused from any of
    them), with a warning and `files["tissue"]` naming its tissue.json.
    A case without `seg` is segmented from its `t1c` and `flair` by the segmentation
    network (`segment_with_network`, the shipped weights) when `segment_missing` is set,
    with a warning; its masks are then on the T1c grid (the T1c, loaded once, is also
    `images["t1c"]`), `files["seg"]` reads "rtjax.seg <weights version>" and, with
    `seg_uncertainty`, `images["seg_uncertainty"]` holds the network's uncertainty.
    With `atlas_dti` (FA, PEAKS in the MNI152 frame) and no DTI of its own, the case gets
    the population DTI carried by the atlas registration: `files["dti_atlas"]`.

    Returns (files, convention, masks, images), images keyed by name with "seg" the
    reference grid.

    Raises:
        InputError: a missing `seg`, a missing tissue map without `atlas_tissue_dirs`,
            unknown labels, or images on different grids, naming the file or folder.
    """
    files = check_case_inputs(case_dir, overrides, extras=extras, segment_missing=segment_missing,
                              atlas_tissue=bool(atlas_tissue_dirs))
    overrides = {k: v for k, v in dict(overrides or {}).items() if k != "edema"}
    convention = get_convention(labels)
    if "seg" not in files:
        masks, reference, files["seg"], unc = segment_with_network(case_dir, overrides, seg_uncertainty)
        if convention.name not in ("brats2021", "brats2023"):
            convention = get_convention("brats2021")
        images = {"seg": reference, "t1c": reference}
        if unc is not None:
            images["seg_uncertainty"] = reference.with_data(unc)
    else:
        masks, reference = load_tumour_masks(files["seg"], convention, ignore=tuple(ignore_labels))
        images = {"seg": reference}
    wanted = {"wm", "gm", *extras}
    images.update({n: load_image(files[n], kind=k) for n, k in CASE_KINDS.items()
                   if n in files and n in wanted and n not in images})
    if "edema" in files:
        images["edema"], files["edema"], masks = _separate_edema(case_dir, files["edema"], masks)
    own_dti = any(n in files for n in ("tensor", "fa", "peaks"))
    atlas_dti = None if own_dti else atlas_dti
    if "wm" not in files or atlas_dti is not None:
        if not atlas_tissue_dirs:
            raise InputError(case_dir, "an atlas DTI needs a folder for the registration's outputs")
        tissue = case_tissue(case_dir, atlas_tissue_dirs[0], lesion=masks.whole,
                             overrides=overrides, reuse_dirs=atlas_tissue_dirs[1:],
                             atlas_dti=atlas_dti)
        files["tissue"] = Path(Path(atlas_tissue_dirs[0]).name, "tissue.json")
        if "wm" not in files:
            warnings.warn(f"{case_dir}: no wm/gm maps; using the MNI152 atlas registered to the "
                          f"case ({tissue.info['method']}), see {files['tissue']}", stacklevel=2)
            images.update(wm=tissue.wm, gm=tissue.gm)
        if atlas_dti is not None:
            files["dti_atlas"] = Path(atlas_tissue_dirs[0]) / DTI_OUTPUT
            warnings.warn(f"{case_dir}: no DTI of its own; using the population DTI "
                          f"{Path(atlas_dti[1]).name} carried by the atlas registration", stacklevel=2)
    check_same_grid(images)
    return files, convention, masks, images


def load_run_inputs(case_dir, labels, ignore_labels, overrides, atlas_tissue_dirs=(), atlas_dti=None):
    """`load_segmented_case` for `rtjax run` (segmenting a case without seg, with the
    network's uncertainty), requiring a tumour core: the standard CTV grows from it."""
    files, convention, masks, images = load_segmented_case(
        case_dir, labels=labels, ignore_labels=ignore_labels, overrides=overrides,
        atlas_tissue_dirs=atlas_tissue_dirs, segment_missing=True, seg_uncertainty=True,
        atlas_dti=atlas_dti)
    if not masks.core.any():
        raise InputError(files["seg"], "no tumour core (necrosis or enhancing voxels): the "
                         "standard CTV grows from the core")
    return files, convention, masks, images
