"""Ensembles of independently initialised `flax.nnx` networks stacked on a leading axis.

The members are created under `nnx.vmap` with split random streams, so one jitted call
evaluates (or trains) all of them; their spread is an uncertainty estimate.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from flax import nnx
from jaxtyping import Array

__all__ = ["create_ensemble", "ensemble_apply", "count_params"]


def create_ensemble(make: Callable[[nnx.Rngs], nnx.Module], members: int, seed: int = 0) -> nnx.Module:
    """`members` networks `make(rngs)`, independently initialised, stacked on axis 0."""

    @nnx.split_rngs(splits=members)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
        return make(rngs)

    return create(nnx.Rngs(seed))


def ensemble_apply(model: nnx.Module, x: Array, sequential: bool = False) -> Array:
    """Every member applied to the same batch: (members, batch, ...). `sequential`: one
    member after the other (`jax.lax.map`) instead of vectorised; the same numbers, and on
    a CPU much faster for convolutional members, whose vectorised convolution XLA runs
    several times slower than the members in turn (`python scripts/benchmark_seg.py`)."""
    if not sequential:
        return nnx.vmap(lambda m, xx: m(xx), in_axes=(0, None), out_axes=0)(model, x)
    graphdef, state = nnx.split(model)
    return jax.lax.map(lambda member: nnx.merge(graphdef, member)(x), state)


def count_params(model: nnx.Module) -> int:
    """Number of trainable parameters (all ensemble members together)."""
    return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
