"""Tumour label conventions and the split of a label map into boolean tumour masks.

Label values are never literals elsewhere in rtjax: each data source has one
:class:`LabelConvention`, picked explicitly by name (never guessed from the data), and a
label map is turned into three disjoint boolean masks (necrosis, enhancing, edema) by
:func:`split_labels`. Values outside the convention are an error unless the caller names
them in ``ignore``; ignored voxels become background and a :class:`LabelWarning` says so.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from os import PathLike

import numpy as np

from rtjax.errors import InputError

__all__ = [
    "CONVENTIONS",
    "LabelConvention",
    "LabelWarning",
    "TumourMasks",
    "combine_labels",
    "get_convention",
    "split_labels",
]

_GROUPS = ("necrosis", "enhancing", "edema")


class LabelWarning(UserWarning):
    """Label voxels were explicitly ignored (set to background)."""


@dataclass(frozen=True)
class LabelConvention:
    """Which integer label values mean necrosis, enhancing tumour and edema.

    Each group is a tuple of label values (possibly empty, e.g. no edema label in the TUM
    T1c maps). 0 is always background. Groups must be disjoint and in 1..255.
    """

    name: str
    necrosis: tuple[int, ...]
    enhancing: tuple[int, ...]
    edema: tuple[int, ...]
    description: str

    def __post_init__(self) -> None:
        values = [*self.necrosis, *self.enhancing, *self.edema]
        if len(set(values)) != len(values):
            raise ValueError(f"label convention {self.name!r}: a label value is in two groups")
        if any(not 1 <= int(v) <= 255 for v in values):
            raise ValueError(f"label convention {self.name!r}: label values must be in 1..255")

    @property
    def known_labels(self) -> frozenset[int]:
        """All values a label map of this convention may hold, background 0 included."""
        return frozenset({0, *self.necrosis, *self.enhancing, *self.edema})


CONVENTIONS: dict[str, LabelConvention] = {
    c.name: c
    for c in (
        LabelConvention(
            name="brats2021",
            necrosis=(1,),
            enhancing=(4,),
            edema=(2,),
            description="BraTS 2017-2021: 1 necrotic/non-enhancing core (NCR), 2 edema (ED), "
            "4 enhancing tumour (ET).",
        ),
        LabelConvention(
            name="brats2023",
            necrosis=(1,),
            enhancing=(3,),
            edema=(2,),
            description="BraTS 2023 and later: 1 NCR, 2 ED, 3 ET.",
        ),
        LabelConvention(
            name="brats2015",
            necrosis=(1, 3),
            enhancing=(4,),
            edema=(2,),
            description="BRATS 2013-2015: 1 necrosis, 2 edema, 3 non-enhancing tumour, "
            "4 enhancing tumour. Non-enhancing tumour (3) is put in the necrosis group so "
            "that it counts in the tumour core, as BraTS 2017 did when it merged NCR and "
            "NET into label 1; combine_labels writes that group back as 1.",
        ),
        LabelConvention(
            name="gliodil",
            necrosis=(4,),
            enhancing=(1,),
            edema=(3,),
            description="GliODIL dataset (Weidner et al. 2024), verified on patient 1: "
            "1 enhancing, 3 edema, 4 necrosis.",
        ),
        LabelConvention(
            name="tum",
            necrosis=(4,),
            enhancing=(1,),
            edema=(),
            description="TUM / Lipkova GliomaSolver T1c maps: 1 enhancing rim, 4 necrotic "
            "core; no edema label (edema comes from a separate FLAIR mask).",
        ),
    )
}


def get_convention(name: str | LabelConvention) -> LabelConvention:
    """Look up a label convention by name (case-insensitive); a convention passes through."""
    if isinstance(name, LabelConvention):
        return name
    try:
        return CONVENTIONS[str(name).strip().lower()]
    except KeyError:
        valid = ", ".join(sorted(CONVENTIONS))
        raise ValueError(f"unknown label convention {name!r}; valid names: {valid}") from None


@dataclass(frozen=True)
class TumourMasks:
    """Disjoint boolean tumour masks on one grid, each of the same 3-D shape.

    ``core`` is necrosis | enhancing (BraTS TC), ``whole`` is core | edema (BraTS WT);
    ``enhancing`` is BraTS ET.
    """

    necrosis: np.ndarray
    enhancing: np.ndarray
    edema: np.ndarray

    def __post_init__(self) -> None:
        arrays = [np.asarray(getattr(self, g), dtype=bool) for g in _GROUPS]
        if len({a.shape for a in arrays}) != 1:
            shapes = ", ".join(f"{g} {a.shape}" for g, a in zip(_GROUPS, arrays))
            raise ValueError(f"tumour masks must share one shape, got {shapes}")
        for group, array in zip(_GROUPS, arrays):
            object.__setattr__(self, group, array)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.necrosis.shape

    @property
    def core(self) -> np.ndarray:
        """Tumour core: necrosis | enhancing."""
        return self.necrosis | self.enhancing

    @property
    def whole(self) -> np.ndarray:
        """Whole tumour: core | edema."""
        return self.core | self.edema

    def is_empty(self) -> bool:
        """True when no voxel is tumour (no core and no edema)."""
        return not self.whole.any()


def _value_counts(values: np.ndarray) -> dict[int, int]:
    """{value: voxel count} of an integer array (bincount when the range is small)."""
    if values.size == 0:
        return {}
    lo, hi = int(values.min()), int(values.max())
    if lo >= 0 and hi < 1 << 16:
        counts = np.bincount(values.ravel(), minlength=hi + 1)
        return {int(v): int(counts[v]) for v in np.flatnonzero(counts)}
    uniq, counts = np.unique(values, return_counts=True)
    return {int(v): int(c) for v, c in zip(uniq, counts)}


def _as_integer_labels(labels: np.ndarray, source: str | PathLike[str] | None) -> np.ndarray:
    """Check that ``labels`` holds integers; return an integer array."""
    arr = np.asarray(labels)
    if arr.dtype.kind in "iu":
        return arr
    if arr.dtype.kind != "f":
        raise InputError(source, f"label values must be integers, got dtype {arr.dtype}")
    bad = ~np.isfinite(arr)
    if bad.any():
        raise InputError(source, f"label map has {int(bad.sum())} non-finite voxels")
    frac = arr != np.round(arr)
    if frac.any():
        examples = ", ".join(f"{v:g}" for v in np.unique(arr[frac])[:5])
        raise InputError(
            source,
            f"label values must be integers, found {int(frac.sum())} non-integer voxels "
            f"(e.g. {examples})",
        )
    return arr.astype(np.int64)


def _format_counts(counts: dict[int, int]) -> str:
    return ", ".join(f"{v} ({n} voxels)" for v, n in sorted(counts.items()))


#: Unexpected values holding at most this fraction of the labelled voxels may be strays.
STRAY_FRACTION = 0.01


def _label_hint(counts, conv, unexpected, ignored) -> str:
    """What to do about unexpected label values, in command-line words: a convention that
    fits every value present, and ``--ignore-labels`` only for values so rare that they are
    stray voxels (dropping a real tumour label is never the fix)."""
    present = {v for v in counts if v != 0} - set(ignored)
    labelled = sum(n for v, n in counts.items() if v != 0)
    rare = {v for v in present if counts[v] <= STRAY_FRACTION * labelled}
    options = []
    for other in CONVENTIONS.values():
        if other.name == conv.name:
            continue
        if present <= other.known_labels:
            options.append(f"--labels {other.name}")
        elif present - rare <= other.known_labels:
            drop_other = " ".join(f"--ignore-labels {v}" for v in sorted(present - other.known_labels))
            options.append(f"--labels {other.name} {drop_other}")
    fits = " or ".join(options)
    stray = sorted(v for v, n in unexpected.items() if n <= STRAY_FRACTION * labelled)
    many = sorted(set(unexpected) - set(stray))
    drop = " ".join(f"--ignore-labels {v}" for v in stray)
    if not many:
        hints = [f"if they are stray voxels, drop them with {drop}"]
        if fits:
            hints.append(f"if the file follows another convention, use {fits}")
        return "; ".join(hints)
    hints = [f"the values fit {fits}: check which convention the file uses" if fits
             else f"check --labels (one of {', '.join(CONVENTIONS)})"]
    if stray:
        hints.append(f"if {', '.join(map(str, stray))} are stray voxels, drop them with {drop}")
    share = ", ".join(f"{v} ({100 * unexpected[v] / labelled:.0f} %)" for v in many)
    hints.append(f"label(s) {share} of the labelled voxels are too many to be strays: "
                 "do not ignore them")
    return "; ".join(hints)


def split_labels(
    labels: np.ndarray,
    convention: str | LabelConvention,
    *,
    source: str | PathLike[str] | None = None,
    ignore: Iterable[int] = (),
) -> TumourMasks:
    """Split an integer label map into necrosis / enhancing / edema masks.

    Args:
        labels: integer-valued array of any shape (floats holding integers are accepted).
        convention: a :class:`LabelConvention` or its name.
        source: the file the labels came from, used in errors and warnings.
        ignore: label values to set to background explicitly (e.g. a few stray voxels);
            a :class:`LabelWarning` reports each ignored value found and its voxel count.

    Raises:
        InputError: non-integer labels, or values that are neither in the convention nor
            in ``ignore``.
        ValueError: ``ignore`` names background or a label of the convention.
    """
    conv = get_convention(convention)
    ignored = {int(v) for v in ignore}
    clash = ignored & conv.known_labels
    if clash:
        raise ValueError(
            f"cannot ignore label(s) {sorted(clash)}: they belong to convention {conv.name!r}"
        )
    arr = _as_integer_labels(labels, source)
    counts = _value_counts(arr)
    unexpected = {v: n for v, n in counts.items() if v not in conv.known_labels | ignored}
    if unexpected:
        expected = ", ".join(str(v) for v in sorted(conv.known_labels))
        raise InputError(
            source,
            f"unexpected label values {_format_counts(unexpected)} for label convention "
            f"{conv.name!r} (expected {expected}); {_label_hint(counts, conv, unexpected, ignored)}",
        )
    dropped = {v: n for v, n in counts.items() if v in ignored}
    if dropped:
        where = f"{source}: " if source is not None else ""
        warnings.warn(
            f"{where}ignoring label values {_format_counts(dropped)}: set to background",
            LabelWarning,
            stacklevel=2,
        )
    return TumourMasks(
        necrosis=np.isin(arr, conv.necrosis),
        enhancing=np.isin(arr, conv.enhancing),
        edema=np.isin(arr, conv.edema),
    )


def combine_labels(masks: TumourMasks, convention: str | LabelConvention) -> np.ndarray:
    """Inverse of :func:`split_labels`: a uint8 label map of ``masks.shape``.

    Each group is written as its convention's first label value (so BRATS 2015
    non-enhancing tumour comes back as necrosis, 1).

    Raises:
        ValueError: the masks overlap, or a non-empty mask has no label in the convention
            (e.g. edema with ``tum``).
    """
    conv = get_convention(convention)
    groups = [getattr(masks, g) for g in _GROUPS]
    overlap = int((np.sum(groups, axis=0, dtype=np.int16) > 1).sum())
    if overlap:
        raise ValueError(f"tumour masks overlap in {overlap} voxels; cannot combine them")
    out = np.zeros(masks.shape, dtype=np.uint8)
    for group, mask in zip(_GROUPS, groups):
        values = getattr(conv, group)
        if not values:
            if mask.any():
                raise ValueError(
                    f"label convention {conv.name!r} has no {group} label, but the {group} "
                    f"mask has {int(mask.sum())} voxels"
                )
            continue
        out[mask] = values[0]
    return out
