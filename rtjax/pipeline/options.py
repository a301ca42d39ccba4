"""The options of a case or cohort run: defaults < a `--config` YAML < the command line.

`RunOptions` holds them with their units and checks every one of them when it is built,
before any work starts (so the library API validates as the command line does): each
problem is one line naming the option as it is spelled on the command line, and all of
them are reported together (`OptionsError`). `resolve_options` merges the three sources;
`parse_shard` reads `K/N`, `parse_names` the ``--names ROLE=PATTERN`` mapping.
A config file may spell names as on the command line (``margin-mm``) or as here
(``margin_mm``); unknown names are errors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path, PurePath
from typing import Any

from rtjax.config import ConfigError, read_yaml, to_dict
from rtjax.io import CANONICAL_NAMES
from rtjax.labels import CONVENTIONS
from rtjax.tensor_io import FRAMES

__all__ = [
    "MAX_CUTOFFS",
    "MAX_ANISOTROPY",
    "MAX_MARGIN_MM",
    "TENSOR_METHODS",
    "NAME_ROLES",
    "OptionsError",
    "RunOptions",
    "RUN_OPTIONS",
    "load_run_config",
    "parse_names",
    "parse_shard",
    "resolve_options",
]

#: The largest standard-CTV margin accepted, mm (clinical margins are 15-20 mm).
MAX_MARGIN_MM = 50.0
#: At most this many cutoff CTVs (the report tells six CTVs apart: standard, model, these).
MAX_CUTOFFS = 4
#: Roles a ``--names`` pattern may name: the case files of `rtjax.io` and a separate edema.
NAME_ROLES = tuple(CANONICAL_NAMES) + ("edema",)
#: The anisotropy r of the tumour tensor: at least 1 (isotropic), at most this.
MAX_ANISOTROPY = 25.0
#: Tumour tensor constructions (`growth.tumour_tensor`).
TENSOR_METHODS = ("scaled", "westin")


class OptionsError(ValueError):
    """Bad run options: ``problems`` holds one line per bad option (``str`` joins them)."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


def _number(value, kind):
    """``kind(value)`` for a real number (not a bool), else None."""
    if isinstance(value, bool):
        return None
    try:
        number = kind(value)
    except (TypeError, ValueError):
        return None
    if kind is int and (isinstance(value, float) and value != number):
        return None
    return number if kind is int or math.isfinite(number) else None


def _check_labels(labels) -> list[str]:
    if labels is None or labels in CONVENTIONS:
        return []
    return [f"--labels {labels!r}: unknown label convention; choose one of "
            f"{', '.join(CONVENTIONS)}"]


def _check_ignore(values, labels) -> tuple[tuple[int, ...], list[str]]:
    ints, problems = [], []
    for value in values or ():
        number = _number(value, int)
        if number is None or not 1 <= number <= 255:
            problems.append(f"--ignore-labels {value!r}: a label value is a whole number "
                            "from 1 to 255")
            continue
        convention = CONVENTIONS.get(labels)
        if convention is not None and number in convention.known_labels:
            group = next(g for g in ("necrosis", "enhancing", "edema")
                         if number in getattr(convention, g))
            problems.append(f"--ignore-labels {number}: label {number} is {group} in "
                            f"--labels {labels}, it cannot be ignored")
            continue
        ints.append(number)
    return tuple(dict.fromkeys(ints)), problems


def _check_cutoffs(values) -> tuple[tuple[float, ...], list[str]]:
    cutoffs, problems = [], []
    for value in values or ():
        number = _number(value, float)
        if number is None or not 0.0 < number < 1.0:
            problems.append(f"--cutoff {value!r}: a density cutoff is a number between 0 and 1 "
                            "(both excluded), e.g. 0.01 or 0.1")
            continue
        cutoffs.append(number)
    unique = tuple(sorted(set(cutoffs)))
    if len(unique) < len(cutoffs):
        problems.append("--cutoff: a cutoff is given twice")
    if len(unique) > MAX_CUTOFFS:
        problems.append(f"--cutoff: at most {MAX_CUTOFFS} cutoffs (the report tells the "
                        f"standard, the model and {MAX_CUTOFFS} cutoff CTVs apart), got {len(unique)}")
    return unique, problems


def _check_dti(frame, anisotropy, method, dti_atlas) -> tuple[tuple, tuple | None, list[str]]:
    """The DTI options: the frame of the files, r (one value fixed, two a fitted range),
    the tumour tensor construction and the population DTI (FA, PEAKS files)."""
    problems = []
    if frame is not None and frame not in FRAMES:
        problems.append(f"--tensor-frame {frame!r}: choose one of {', '.join(FRAMES)}")
    values = tuple(anisotropy) if isinstance(anisotropy, (list, tuple)) else (anisotropy,)
    numbers = [_number(v, float) for v in values]
    if not 1 <= len(values) <= 2 or any(n is None or not 1.0 <= n <= MAX_ANISOTROPY for n in numbers):
        problems.append(f"--anisotropy {' '.join(map(str, values))}: give r (fixed) or R_LO R_HI "
                        f"(fitted in that range), each from 1 to {MAX_ANISOTROPY:g}")
    elif len(numbers) == 2 and not numbers[0] < numbers[1]:
        problems.append(f"--anisotropy {numbers[0]:g} {numbers[1]:g}: the fitted range needs "
                        "R_LO < R_HI")
    if method not in TENSOR_METHODS:
        problems.append(f"--tensor-method {method!r}: choose one of {', '.join(TENSOR_METHODS)}")
    atlas = None
    if dti_atlas is not None:
        paths = tuple(str(v) for v in dti_atlas) if isinstance(dti_atlas, (list, tuple)) else ()
        if len(paths) != 2:
            problems.append(f"--dti-atlas {dti_atlas!r}: give two files, FA PEAKS (MNI152 frame)")
        else:
            missing = [p for p in paths if not Path(p).is_file()]
            if missing:
                problems.append(f"--dti-atlas: file(s) not found: {', '.join(missing)}")
            atlas = tuple(str(Path(p).absolute()) for p in paths)
    return tuple(n for n in numbers if n is not None), atlas, problems


def _check_names(names) -> tuple[dict[str, str], list[str]]:
    if names is None:
        return {}, []
    if not isinstance(names, Mapping):
        return {}, [f"--names: expected ROLE=PATTERN pairs (in a config: a mapping), got {names!r}"]
    out, problems = {}, []
    for role, pattern in names.items():
        role = str(role).strip().replace("-", "_").lower()
        if role not in NAME_ROLES:
            problems.append(f"--names {role}=...: unknown role {role!r}; roles are "
                            f"{', '.join(NAME_ROLES)}")
            continue
        if not isinstance(pattern, str) or not pattern.strip():
            problems.append(f"--names {role}=: give a file name or glob pattern, e.g. "
                            f"{role}=*{role}*.nii.gz")
            continue
        if PurePath(pattern).is_absolute() or ".." in PurePath(pattern).parts:
            problems.append(f"--names {role}={pattern}: a pattern is matched inside each case "
                            "folder; use a name, not a path")
            continue
        out[role] = pattern.strip()
    return out, problems


@dataclass(frozen=True)
class RunOptions:
    """What `rtjax run` / `rtjax cohort` do with each case; checked when built.

    Attributes:
        labels: label convention of the segmentation (`rtjax.labels.CONVENTIONS`).
        ignore_labels: stray label values set to background explicitly (1..255, not a
            label of the convention).
        margin_mm: standard CTV margin from the tumour core, mm, in (0, MAX_MARGIN_MM].
        start: fit start, "network" (the inverse network) or "heuristic".
        iterations: refinement iterations at most, > 0.
        cutoffs: density cutoffs in (0, 1) of extra model CTVs (``ctv_model_c<cutoff>``),
            at most MAX_CUTOFFS, kept sorted.
        rtstruct: also write ``rtstruct.dcm`` (a DICOM RT Structure Set).
        names: role -> file name or glob pattern inside each case folder (e.g.
            ``{"seg": "segm.nii.gz", "brain_mask": "brainMask*"}``) for data with its own
            file names.
        tensor_frame: the frame of the DTI files' components ("fsl", "voxel", "world";
            `rtjax.tensor_io`); None: "fsl" for a tensor, "world" for peaks.
        anisotropy: r of the tumour tensor when the case has DTI: (r,) fixed, or
            (r_lo, r_hi) fitted in that range; 1 <= r <= MAX_ANISOTROPY.
        tensor_method: the tumour tensor construction, "scaled" or "westin".
        dti_atlas: (FA, PEAKS) files of a population DTI in the MNI152 frame, carried to a
            case without its own DTI by the atlas registration; None: no atlas DTI.
        ensemble: also fit an ensemble (`rtjax.fit.fit_ensemble`) and write the
            probabilistic CTV (``ctv_probability``, ``density_mean``, ``density_sd``).

    Raises:
        OptionsError: one line per bad option, each naming it as on the command line.
    """

    labels: str | None = None
    ignore_labels: tuple[int, ...] = ()
    margin_mm: float = 15.0
    start: str = "network"
    iterations: int = 150
    cutoffs: tuple[float, ...] = ()
    rtstruct: bool = False
    names: dict[str, str] = field(default_factory=dict)
    tensor_frame: str | None = None
    anisotropy: tuple[float, ...] = (5.0,)
    tensor_method: str = "scaled"
    dti_atlas: tuple[str, ...] | None = None
    ensemble: bool = False

    def __post_init__(self):
        problems = _check_labels(self.labels)
        ignore, bad = _check_ignore(self.ignore_labels, self.labels)
        problems += bad
        margin = _number(self.margin_mm, float)
        if margin is None or not 0.0 < margin <= MAX_MARGIN_MM:
            problems.append(f"--margin-mm {self.margin_mm!r}: the standard CTV margin must be "
                            f"more than 0 and at most {MAX_MARGIN_MM:g} mm")
        cutoffs, bad = _check_cutoffs(self.cutoffs)
        problems += bad
        if self.start not in ("network", "heuristic"):
            problems.append(f"--start {self.start!r}: choose network or heuristic")
        iterations = _number(self.iterations, int)
        if iterations is None or iterations < 1:
            problems.append(f"--iterations {self.iterations!r}: give a whole number of at "
                            "least 1")
        if not isinstance(self.rtstruct, bool):
            problems.append(f"--rtstruct: expected true or false, got {self.rtstruct!r}")
        if not isinstance(self.ensemble, bool):
            problems.append(f"--ensemble: expected true or false, got {self.ensemble!r}")
        names, bad = _check_names(self.names)
        problems += bad
        anisotropy, dti_atlas, bad = _check_dti(self.tensor_frame, self.anisotropy,
                                                self.tensor_method, self.dti_atlas)
        problems += bad
        if problems:
            raise OptionsError(problems)
        for name, value in (("ignore_labels", ignore), ("margin_mm", margin),
                            ("iterations", iterations), ("cutoffs", cutoffs), ("names", names),
                            ("anisotropy", anisotropy), ("dti_atlas", dti_atlas)):
            object.__setattr__(self, name, value)


#: Option names a ``--config`` YAML may set, with their defaults (``labels`` has none).
RUN_OPTIONS: dict[str, Any] = to_dict(RunOptions())


def load_run_config(path) -> dict[str, Any]:
    """Read a YAML mapping of run options (names as on the command line, ``-`` or ``_``;
    ``cutoff`` for ``cutoffs``).

    Raises:
        ValueError: unreadable file, not a mapping, or unknown keys.
    """
    options = {str(k).replace("-", "_"): v for k, v in read_yaml(path).items()}
    if "cutoff" in options:
        options["cutoffs"] = options.pop("cutoff")
    for key in ("ignore_labels", "cutoffs"):
        if key in options and not isinstance(options[key], (list, tuple)):
            options[key] = [options[key]]
    names = {f.name for f in fields(RunOptions)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise ConfigError(f"{path}: unknown config key(s) {unknown}; valid keys: "
                          f"{', '.join(sorted(names))}")
    return options


def resolve_options(config_path=None, **given) -> dict[str, Any]:
    """The run options as a plain mapping: defaults < the ``config_path`` YAML < ``given``
    values that are not None (the command line wins; empty lists count as not given, and
    ``names`` from both are merged, the command line's winning per role). ``labels`` must
    end up set.

    Raises:
        OptionsError: bad values, one line each; ValueError: a bad config file.
    """
    options = dict(RUN_OPTIONS)
    if config_path is not None:
        options.update(load_run_config(config_path))
    names = dict(options.get("names") or {})
    given = {k: v for k, v in given.items() if v is not None and not (
        isinstance(v, (list, tuple, dict)) and not v)}
    names.update(given.pop("names", {}) or {})
    options.update(given)
    options["names"] = names
    problems = []
    if not options.get("labels"):
        problems.append("--labels: no label convention; pass --labels (" + ", ".join(CONVENTIONS)
                        + ") or set labels in the config")
    try:
        resolved = RunOptions(**options)
    except OptionsError as err:
        problems += err.problems
    if problems:
        raise OptionsError(problems)
    return to_dict(resolved)


def parse_names(pairs: Sequence[str] | None) -> dict[str, str]:
    """``["seg=segm.nii.gz", "brain_mask=brainMask*"]`` (the ``--names`` options) ->
    {role: pattern}; a role may be spelled with ``-`` (``brain-mask``).

    Raises:
        OptionsError: a pair that is not ROLE=PATTERN, or a role given twice.
    """
    names, problems = {}, []
    for pair in pairs or ():
        role, sep, pattern = str(pair).partition("=")
        role = role.strip().replace("-", "_").lower()
        if not sep or not role:
            problems.append(f"--names {pair!r}: expected ROLE=PATTERN, e.g. seg=segm.nii.gz")
        elif role in names:
            problems.append(f"--names: role {role!r} given twice")
        else:
            names[role] = pattern
    if problems:
        raise OptionsError(problems)
    return names


def parse_shard(shard: str | None) -> tuple[int, int] | None:
    """``"K/N"`` (1-based K) -> (K, N); None stays None."""
    if shard is None:
        return None
    try:
        k, n = (int(part) for part in str(shard).split("/"))
    except ValueError:
        raise ValueError(f"--shard {shard!r}: expected K/N with whole numbers, e.g. 1/4") from None
    if not (n >= 1 and 1 <= k <= n):
        raise ValueError(f"--shard {shard!r}: need 1 <= K <= N")
    return k, n
