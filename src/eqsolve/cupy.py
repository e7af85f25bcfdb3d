"""``eqsolve.cupy``: fixed points on CuPy with fused GPU kernels, and implicit gradients.

>>> import eqsolve.cupy as ec                                          # doctest: +SKIP
>>> sol = ec.solve(f, z0, solver="anderson", sync_every=8)             # doctest: +SKIP
>>> sol, pullback = ec.fixed_point_with_pullback(f, z0, vjp=vjp)       # doctest: +SKIP
>>> u = pullback(g)        # u = g + J_f(z*)^T u; then dL/dtheta = u^T df/dtheta  # doctest: +SKIP

``eqsolve.fixed_point`` / ``eqsolve.solve`` on CuPy arrays already take the fused kernels
(one launch per iteration; see :mod:`eqsolve.backends.cupy.fused`); :func:`options` changes
that for a block of code (``fused=False``: the generic Array-API path). Arrays from torch or
JAX on the GPU go in and out through DLPack without copies (:func:`as_cupy`,
:func:`to_torch`, :func:`to_jax`). Every solve needs a CUDA GPU: without one, the ``cupy``
backend raises :class:`eqsolve.BackendUnavailableError`.
"""

from __future__ import annotations

from .adapters.backward import Implicit
from .adapters.cupy import (
    ADJOINT_METHODS,
    Pullback,
    as_cupy,
    fixed_point,
    fixed_point_with_pullback,
    solve,
    to_jax,
    to_torch,
)
from .backends.cupy.options import CupyOptions, options
from .core.adjoint import AdjointInfo
from .core.solution import ConvergenceError, ConvergenceWarning, Solution, Status

__all__ = [
    "ADJOINT_METHODS",
    "AdjointInfo",
    "ConvergenceError",
    "ConvergenceWarning",
    "CupyOptions",
    "Implicit",
    "Pullback",
    "Solution",
    "Status",
    "as_cupy",
    "fixed_point",  # deprecated: fixed_point_with_pullback
    "fixed_point_with_pullback",
    "options",
    "solve",
    "to_jax",
    "to_torch",
]
