"""The options of a case or cohort run: defaults < a `--config` YAML < the command line.

`RunOptions` holds them with their units and checks them when it is built, before any
work starts; `resolve_options` merges the three sources; `parse_shard` reads `K/N`.
A config file may spell names as on the command line (``margin-mm``) or as here
(``margin_mm``); unknown names are errors.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from rtjax.config import ConfigError, read_yaml, to_dict
from rtjax.labels import CONVENTIONS

__all__ = ["RunOptions", "RUN_OPTIONS", "load_run_config", "resolve_options", "parse_shard"]


@dataclass(frozen=True)
class RunOptions:
    """What `rtjax run` / `rtjax cohort` do with each case.

    Attributes:
        labels: label convention of the segmentation (`rtjax.labels.CONVENTIONS`).
        ignore_labels: stray label values set to background explicitly.
        margin_mm: standard CTV margin from the tumour core, mm.
        start: fit start, "network" (the inverse network) or "heuristic".
        iterations: refinement iterations at most.
    """

    labels: str | None = None
    ignore_labels: tuple[int, ...] = ()
    margin_mm: float = 15.0
    start: str = "network"
    iterations: int = 150

    def __post_init__(self):
        object.__setattr__(self, "ignore_labels", tuple(int(v) for v in self.ignore_labels or ()))
        object.__setattr__(self, "margin_mm", float(self.margin_mm))
        object.__setattr__(self, "iterations", int(self.iterations))
        if self.start not in ("network", "heuristic"):
            raise ValueError(f"start must be 'network' or 'heuristic', not {self.start!r}")


#: Option names a ``--config`` YAML may set, with their defaults (``labels`` has none).
RUN_OPTIONS: dict[str, Any] = to_dict(RunOptions())


def load_run_config(path) -> dict[str, Any]:
    """Read a YAML mapping of run options (names as on the command line, ``-`` or ``_``).

    Raises:
        ValueError: unreadable file, not a mapping, or unknown keys.
    """
    options = {str(k).replace("-", "_"): v for k, v in read_yaml(path).items()}
    names = {f.name for f in fields(RunOptions)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise ConfigError(f"{path}: unknown config key(s) {unknown}; valid keys: "
                          f"{', '.join(sorted(names))}")
    return options


def resolve_options(config_path=None, **given) -> dict[str, Any]:
    """The run options as a plain mapping: defaults < the ``config_path`` YAML < ``given``
    values that are not None (the command line wins). ``labels`` must end up set."""
    options = dict(RUN_OPTIONS)
    if config_path is not None:
        options.update(load_run_config(config_path))
    options.update({k: v for k, v in given.items() if v is not None})
    if not options.get("labels"):
        raise ValueError("no label convention: pass --labels (" + ", ".join(CONVENTIONS)
                         + ") or set labels in the config")
    return to_dict(RunOptions(**options))


def parse_shard(shard: str | None) -> tuple[int, int] | None:
    """``"K/N"`` (1-based K) -> (K, N); None stays None."""
    if shard is None:
        return None
    try:
        k, n = (int(part) for part in str(shard).split("/"))
    except ValueError:
        raise ValueError(f"shard must be K/N with integers, e.g. 1/4, not {shard!r}") from None
    if not (n >= 1 and 1 <= k <= n):
        raise ValueError(f"shard {shard!r}: need 1 <= K <= N")
    return k, n
