"""One strict YAML <-> frozen-dataclass loader for every configuration of the project.

The dataclass defaults are the truth; a YAML file holds only what differs from them
(`configs/*.yaml`). Reading is strict: an unknown key is an error naming where it is
(``config.train: unknown keys ['stpes']; known: [...]``), a nested mapping becomes the
nested dataclass of the field's type, and YAML lists become tuples (configs are hashable,
so they can be static arguments of `jax.jit`). A dataclass can take a few keys that are
not fields by listing them in a class attribute ``config_aliases`` (old name -> field).

* `from_dict(cls, data, where)`: mapping -> dataclass instance.
* `to_dict(config)`: dataclass -> plain YAML-able mapping (tuples as lists; a nested
  dataclass with its own ``to_dict()`` method is written by it).
* `overrides(config)`: only the values that differ from the defaults (what a config file
  should hold).
* `read_yaml(path)`, `write_yaml(path, data)`, `load_config(path, cls)`.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from rtjax.provenance import write_text_atomic

__all__ = [
    "ConfigError",
    "check_keys",
    "from_dict",
    "to_dict",
    "overrides",
    "read_yaml",
    "write_yaml",
    "load_config",
]

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration mapping or file is invalid (unknown key, wrong type or value)."""


def check_keys(cls, data: dict, where: str) -> None:
    """Raise ConfigError naming `where` when `data` has keys that dataclass `cls` lacks."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; known: {sorted(names)}")


@functools.cache
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _dataclass_type(hint):
    """The dataclass type named by a field's type hint (also inside `X | None`), or None."""
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        found = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a) and isinstance(a, type)]
        return found[0] if len(found) == 1 else None
    return None


def _plain_container(hint) -> bool:
    """Whether a hint asks for a list or dict as it is (not a tuple)."""
    return typing.get_origin(hint) in (list, dict) or hint in (list, dict)


def _convert(value, hint, where: str):
    nested = _dataclass_type(hint)
    if nested is not None and isinstance(value, dict):
        return from_dict(nested, value, where)
    if isinstance(value, list) and not _plain_container(hint):
        return tuple(_convert(v, None, where) for v in value)
    return value


def from_dict(cls: type[T], data: dict | None, where: str = "config") -> T:
    """Build dataclass `cls` from a mapping, strictly (see the module docstring).

    Raises:
        ConfigError: unknown keys, a value the dataclass rejects, or not a mapping.
    """
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    aliases = getattr(cls, "config_aliases", {})
    data = {aliases.get(k, k): v for k, v in data.items()}
    check_keys(cls, data, where)
    hints = _hints(cls)
    values = {k: _convert(v, hints.get(k), f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from None


def to_dict(config) -> dict:
    """Plain mapping of a dataclass config (nested dataclasses as mappings, tuples as lists)."""

    def plain(value):
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            if value is not config and callable(getattr(value, "to_dict", None)):
                return plain(value.to_dict())
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        return value

    return plain(config)


def overrides(config) -> dict:
    """The entries of `to_dict(config)` that differ from those of the class defaults."""

    def diff(value: dict, default: dict) -> dict:
        out = {}
        for key, v in value.items():
            d = default.get(key)
            if isinstance(v, dict) and isinstance(d, dict):
                sub = diff(v, d)
                if sub:
                    out[key] = sub
            elif v != d:
                out[key] = v
        return out

    return diff(to_dict(config), to_dict(type(config)()))


def read_yaml(path: str | Path) -> dict:
    """A YAML file's top-level mapping ({} for an empty file).

    Raises:
        ConfigError: unreadable, invalid YAML, or not a mapping (naming the file).
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a YAML mapping of names to values")
    return data


def write_yaml(path: str | Path, data: dict) -> Path:
    """Write `data` as YAML (key order kept), atomically, creating the parent folder."""
    return write_text_atomic(path, yaml.safe_dump(data, sort_keys=False))


def load_config(path: str | Path, cls: type[T]) -> T:
    """Read a YAML file of overrides into dataclass `cls`; errors name the file."""
    try:
        return from_dict(cls, read_yaml(path), "config")
    except ConfigError as err:
        message = str(err)
        raise ConfigError(message if message.startswith(str(path)) else f"{path}: {message}") from None
