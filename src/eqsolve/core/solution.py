"""The result of a fixed-point solve, and the per-sample status codes."""

from __future__ import annotations

import enum
from typing import Any, NamedTuple


class Status(enum.IntEnum):
    """Why the iteration stopped for one sample (values of ``Solution.status``)."""

    #: the stopping rule ``||f(z) - z|| <= tol * ||f(z)|| + atol`` held.
    CONVERGED = 0
    #: ``max_iter`` iterations ran without the stopping rule holding.
    MAX_ITER = 1
    #: ``f(z)`` or the residual became NaN/inf; the best finite iterate is returned.
    NONFINITE = 2


class Solution(NamedTuple):
    """Result of :func:`eqsolve.fixed_point`.

    All per-sample fields have one entry per sample along the batch axis (shape ``(B,)``),
    or are 0-d when ``batch_axis=None``. They are arrays of the solve's backend, so a
    ``Solution`` can be returned from ``jax.jit``.

    Attributes:
        value: the returned iterate ``z`` (same structure, shape, dtype, device and array
            type as the -- possibly backend-converted -- ``z0``). For each sample it is the
            iterate with the lowest relative residual seen while that sample was active.
        converged: boolean, ``status == Status.CONVERGED``.
        iterations: integer, number of solver updates applied to each sample before it
            stopped (0 when ``z0`` already satisfied the stopping rule).
        residual: relative residual ``||f(z) - z|| / ||f(z)||`` of ``value`` (per sample).
        status: integer :class:`Status` code per sample.
        nfev: number of calls of ``f`` (each call evaluates the whole batch): ``1 + max
            iterations``. A Python int on eager backends, a 0-d array under JAX.
    """

    value: Any
    converged: Any
    iterations: Any
    residual: Any
    status: Any
    nfev: Any


class ConvergenceWarning(UserWarning):
    """Emitted (eagerly) when some samples did not converge or hit NaN/inf."""


class ConvergenceError(RuntimeError):
    """Raised instead of :class:`ConvergenceWarning` with ``on_failure="raise"``.

    The unconverged result is kept in ``.solution``.
    """

    def __init__(self, message: str, solution: Solution):
        super().__init__(message)
        self.solution = solution
