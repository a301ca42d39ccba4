"""The imaging model: which tumour cell densities are visible on T1c and FLAIR.

Enhancing/core where c >= u_T1; edema where u_FL <= c < u_T1. LearnMorph-Infer samples
u_T1 in [0.5, 0.85] and u_FL in [0.05, 0.5].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

__all__ = ["visible_masks", "soft_visible_masks", "DEFAULT_SOFT_WIDTH"]

#: Width of the soft threshold, in density units.
DEFAULT_SOFT_WIDTH = 0.02


def visible_masks(
    c: Float[Array, "*s"], u_t1, u_fl
) -> tuple[Bool[Array, "*s"], Bool[Array, "*s"]]:
    """Hard masks (core, edema): core c >= u_t1, edema u_fl <= c < u_t1."""
    core = c >= u_t1
    return core, (c >= u_fl) & ~core


def soft_visible_masks(
    c: Float[Array, "*s"], u_t1, u_fl, width=DEFAULT_SOFT_WIDTH
) -> tuple[Float[Array, "*s"], Float[Array, "*s"]]:
    """Sigmoid versions of `visible_masks` for losses, values in [0, 1].

    core = s((c - u_t1) / width); edema = s((c - u_fl) / width) - core, with s the
    logistic sigmoid; as width -> 0 they tend to the hard masks.
    """
    core = jax.nn.sigmoid((c - u_t1) / width)
    above_fl = jax.nn.sigmoid((c - u_fl) / width)
    return core, jnp.clip(above_fl - core, 0.0, 1.0)
