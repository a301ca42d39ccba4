"""Weights folders and training checkpoints: one format for every learned model.

**A weights folder** (what ships in `rtjax/weights/<model>` and what `--weights PATH`
takes): `params/` (an orbax checkpoint of the model's `nnx.Param` state as a pure dict),
`config.yaml` (the full resolved config, plus whatever the model needs beside it, e.g. the
inverse model's target normalisation), `metrics.json` and optionally `MODEL_CARD.md`.
`save_weights` writes it next to its final place and renames it over the old folder, so
an interrupted export never leaves a half-written folder that a loader would trust.
`restore_params` loads `params/` into an `nnx.eval_shape` target of the model.

**Training checkpoints** (`TrainCheckpoints`, an orbax `CheckpointManager`): per step a
composite of `params` (the model state as a pure dict) and `opt` (the optimizer state's
leaves keyed by their index in `jax.tree.leaves`, restored into the structure of a freshly
initialised optimizer state), for `nnx.Optimizer` states and plain optax states alike.
"""

from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from rtjax.config import read_yaml, write_yaml
from rtjax.provenance import atomic_write, write_json_atomic, write_text_atomic

__all__ = [
    "CheckpointError",
    "to_single_device",
    "save_weights",
    "read_weights_config",
    "restore_params",
    "tar_folder",
    "TrainCheckpoints",
]


class CheckpointError(FileNotFoundError):
    """A folder is not a weights folder (no `config.yaml` or no `params/`)."""


def to_single_device(tree):
    """Abstract arrays placed on the default device (a checkpoint written on a GPU then
    restores on a CPU-only machine)."""
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def save_weights(
    out_dir: str | Path,
    model: nnx.Module | nnx.State,
    config: dict,
    metrics: dict,
    *,
    model_card: str | None = None,
    dtype=None,
) -> Path:
    """Write a weights folder (see the module docstring) at `out_dir`, replacing an
    existing one only once the new one is complete. `model`: a module or its state (only
    the `nnx.Param` leaves are kept); `dtype` (e.g. float16): floating parameters stored in
    it, half the size (`restore_params` casts them back to the model's dtype)."""
    out_dir = Path(out_dir).resolve()
    state = nnx.state(model, nnx.Param) if isinstance(model, nnx.Module) else model
    if dtype is not None:
        state = jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, state)
    partial = out_dir.with_name(out_dir.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(partial / "params", nnx.to_pure_dict(state))
    write_yaml(partial / "config.yaml", config)
    write_json_atomic(partial / "metrics.json", metrics)
    if model_card is not None:
        write_text_atomic(partial / "MODEL_CARD.md", model_card)
    if out_dir.exists():
        old = out_dir.with_name(out_dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
        os.replace(partial, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(partial, out_dir)
    return out_dir


def read_weights_config(path: str | Path, kind: str = "weights") -> dict:
    """The `config.yaml` mapping of a weights folder.

    Raises:
        CheckpointError: `path` lacks `config.yaml` or `params/` (naming `kind`).
    """
    path = Path(path)
    if not (path / "config.yaml").is_file() or not (path / "params").is_dir():
        raise CheckpointError(f"{path} is not a {kind} folder (needs config.yaml and params/)")
    return read_yaml(path / "config.yaml")


def restore_params(path: str | Path, abstract: nnx.Module) -> nnx.Module:
    """The model of `abstract` (an `nnx.eval_shape` of its constructor) with the
    parameters of the weights folder `path`."""
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    target = to_single_device(nnx.to_pure_dict(params))
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(Path(path).resolve() / "params", target)
    nnx.replace_by_pure_dict(params, restored)
    return nnx.merge(graphdef, params, rest)


def tar_folder(folder: str | Path, out_path: str | Path, arcname: str) -> Path:
    """`folder` as a .tar.gz holding one top folder `arcname`, written atomically."""

    def write(tmp: str) -> None:
        with tarfile.open(tmp, "w:gz") as tar:
            tar.add(Path(folder), arcname=arcname)

    return atomic_write(out_path, write, suffix=".tar.gz")


def _indexed(leaves) -> dict[str, Any]:
    return {f"{i:05d}": leaf for i, leaf in enumerate(leaves)}


class TrainCheckpoints:
    """Resumable training checkpoints in `directory` (one step per sub-folder), the last
    `keep` kept; saves are synchronous (a checkpoint exists once `save` returns)."""

    def __init__(self, directory: str | Path, keep: int = 2):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(Path(directory).resolve(), options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params: nnx.State, opt_state) -> None:
        """Checkpoint the model state `params` and any optimizer state pytree at `step`."""
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(nnx.to_pure_dict(params)),
            opt=ocp.args.StandardSave(_indexed(jax.tree.leaves(opt_state))),
        ), force=True)
        self.manager.wait_until_finished()

    def restore(self, step: int, params: nnx.State, opt_state):
        """(params, opt_state) of `step`, in the structures of the given (fresh) ones;
        `params` is updated in place and returned."""
        leaves, treedef = jax.tree.flatten(opt_state)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(to_single_device(nnx.to_pure_dict(params))),
            opt=ocp.args.StandardRestore(to_single_device(_indexed(leaves))),
        ))
        nnx.replace_by_pure_dict(params, restored["params"])
        opt = jax.tree.unflatten(treedef, [restored["opt"][k] for k in sorted(restored["opt"])])
        return params, opt

    def close(self) -> None:
        self.manager.close()

    def __enter__(self) -> "TrainCheckpoints":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
