"""A plain-NumPy implementation of the same FK scheme, for benchmarks and cross-checks.

Written the way peer tools are (NumPy arrays, one Python loop over steps); it computes
exactly what `growth.solve_fk` computes: harmonic-mean face diffusivities, the flux-form
Euler diffusion step and the exact logistic flow.
"""

from __future__ import annotations

import numpy as np

__all__ = ["numpy_face_coefficients", "numpy_fk_step", "numpy_solve_fk"]


def numpy_face_coefficients(d_cell: np.ndarray, spacing) -> list[np.ndarray]:
    """Harmonic-mean face diffusivities / h_k^2 per axis (interior faces), 1/day."""
    faces = []
    for k, h in enumerate(spacing):
        n = d_cell.shape[k]
        a = np.take(d_cell, np.arange(n - 1), axis=k)
        b = np.take(d_cell, np.arange(1, n), axis=k)
        total = a + b
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(total > 0, 2 * a * b / np.where(total > 0, total, 1), 0)
        faces.append((mean / h**2).astype(d_cell.dtype))
    return faces


def numpy_fk_step(c: np.ndarray, faces, rho: float, dt: float) -> np.ndarray:
    """One step: Euler diffusion in flux form, then the exact logistic flow."""
    div = np.zeros_like(c)
    for k, coeff in enumerate(faces):
        if c.shape[k] < 2:
            continue
        flux = coeff * np.diff(c, axis=k)
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[k] = slice(0, -1)
        hi[k] = slice(1, None)
        div[tuple(lo)] += flux
        div[tuple(hi)] -= flux
    c = c + dt * div
    growth = np.expm1(rho * dt)
    return c * (1 + growth) / (1 + c * growth)


def numpy_solve_fk(c0, faces, rho: float, dt: float, n_steps: int) -> np.ndarray:
    """`n_steps` steps of `numpy_fk_step` from c0."""
    c = np.array(c0)
    for _ in range(n_steps):
        c = numpy_fk_step(c, faces, rho, dt)
    return c
