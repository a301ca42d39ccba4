"""Learning-rate schedules computed on the host, and wall-clock budgets of training runs."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import jax
import optax

__all__ = ["learning_rate_factor", "scale_by_factor", "TimeBudget"]


def learning_rate_factor(step: int, progress: float, warmup_steps: int, end_factor: float = 0.02) -> float:
    """Multiplier of the peak learning rate: linear warm-up from 0 over `warmup_steps`
    steps, then a cosine from 1 down to `end_factor` over `progress` in [0, 1] (the
    fraction of the step count, or of the time budget, spent after the warm-up)."""
    if step < warmup_steps:
        return step / warmup_steps
    p = min(max(progress, 0.0), 1.0)
    return end_factor + (1.0 - end_factor) * 0.5 * (1.0 + math.cos(math.pi * p))


def scale_by_factor() -> optax.GradientTransformationExtraArgs:
    """An optax transformation that multiplies the updates by the `lr_factor` extra
    argument (the schedule is computed on the host: by step, or by the time budget)."""

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None, *, lr_factor=1.0, **extra):
        del params, extra
        return jax.tree.map(lambda u: u * lr_factor, updates), state

    return optax.GradientTransformationExtraArgs(init, update)


@dataclass(frozen=True)
class TimeBudget:
    """A wall-clock budget that started at `start` (`time.perf_counter()`); no limit when
    `seconds` is None (then every deadline is None and nothing is ever out of time)."""

    start: float
    seconds: float | None

    @classmethod
    def starting_now(cls, seconds: float | None) -> "TimeBudget":
        return cls(time.perf_counter(), None if seconds is None else float(seconds))

    def deadline(self, fraction: float = 1.0, reserve: float = 0.0) -> float | None:
        """The `time.perf_counter()` value after `fraction` of the budget less `reserve` s."""
        if self.seconds is None:
            return None
        return self.start + fraction * self.seconds - reserve

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @staticmethod
    def passed(deadline: float | None) -> bool:
        """Whether a deadline (None: never) has passed."""
        return deadline is not None and time.perf_counter() >= deadline

    @staticmethod
    def fraction_spent(since: float, deadline: float | None) -> float:
        """Fraction of the time from `since` to `deadline` spent (0 without a deadline)."""
        if deadline is None:
            return 0.0
        return (time.perf_counter() - since) / max(deadline - since, 1e-9)
