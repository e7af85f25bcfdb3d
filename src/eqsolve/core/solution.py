"""The result of a fixed-point solve, and the per-sample status codes."""

from __future__ import annotations

import enum
from typing import Any, NamedTuple


class Status(enum.IntEnum):
    """Why the iteration stopped for one sample (values of ``Solution.status``)."""

    #: the stopping rule holds at the returned value: ``||f(z) - z|| <= tol ||f(z)|| + atol``
    #: and the fixed point is determined (not reached by running away; see ``DIVERGED``).
    CONVERGED = 0
    #: ``max_iter`` iterations ran without the stopping rule holding at the returned value.
    MAX_ITER = 1
    #: ``f(z)`` or the residual became NaN/inf; the best finite iterate is returned.
    NONFINITE = 2
    #: the iteration ran away: the residual grew 1e10-fold over its initial size, or the
    #: residual test held only because ``||f(z)||`` grew (the secant estimate of the distance
    #: to a fixed point, ``||g|| ||z - z0|| / ||g - g0||``, exceeds ``||f(z)|| + atol/tol``):
    #: ``f`` has no fixed point there, or none determined to ``tol``.
    DIVERGED = 3


class Solution(NamedTuple):
    """Result of :func:`eqsolve.fixed_point`.

    **Contract.** For every sample, ``status == CONVERGED`` if and only if the stopping rule
    holds at the returned ``value`` as last evaluated by the solver, and ``residual`` is the
    relative residual of that ``value``. The rule, per sample ``b`` (2-norms over the
    sample's entries, computed so that they neither underflow nor overflow):

        ||f(z_b) - z_b|| <= tol * ||f(z_b)|| + atol,

    and the fixed point it claims is determined (see :attr:`Status.DIVERGED`). The value
    of each sample is its iterate with the lowest ``||f(z) - z|| / (tol ||f(z)|| + atol)``;
    the last call of ``f`` is always made on the returned values, so the rule is checked at
    exactly what is returned even when ``f`` couples the samples. Anything else is a status
    (eagerly also a :class:`ConvergenceWarning`), never a silent wrong number.

    All per-sample fields have one entry per sample along the batch axis (shape ``(B,)``),
    or are 0-d when the state is one system (``batch_axis=None``, or a 1-D/0-D state with
    the default ``batch_axis="auto"``). They are arrays of the solve's backend, so a
    ``Solution`` can be returned from ``jax.jit``.

    Attributes:
        value: the returned iterate ``z`` (same structure, shape, dtype, device and array
            type as the -- possibly backend-converted -- ``z0``).
        converged: boolean, ``status == Status.CONVERGED``.
        iterations: integer, number of solver updates applied to each sample while it was
            iterating (0 when ``z0`` already satisfied the stopping rule).
        residual: relative residual ``||f(z) - z|| / ||f(z)||`` of ``value`` (per sample).
        status: integer :class:`Status` code per sample.
        nfev: number of calls of ``f`` (each call evaluates the whole batch): ``1 + max
            iterations``, plus one when the returned values had to be evaluated once more
            at the end (a budget that ran out on a non-monotone residual, NaN/inf). A Python
            int on eager backends, a 0-d array under JAX.
        states: ``None``, or with ``states=(k_1, ..., k_S)`` a tuple of ``S`` points like
            ``value``: the solver's own iterate at iteration ``k_i`` for each sample (its
            returned value if it stopped earlier), for a fixed-point correction loss (Bai,
            Koltun & Kolter, CVPR 2022). The torch and JAX adapters attach the chosen
            gradient to each.
    """

    value: Any
    converged: Any
    iterations: Any
    residual: Any
    status: Any
    nfev: Any
    states: Any = None


class ConvergenceWarning(UserWarning):
    """Emitted (eagerly) when some samples did not converge, diverged or hit NaN/inf."""


class CouplingWarning(ConvergenceWarning):
    """Emitted (eagerly) when ``f`` turned out not to treat the samples independently.

    A sample that had stopped was evaluated again at the same point and its stopping rule
    gave a different answer: ``f`` mixes samples along the batch axis (BatchNorm, a matrix
    acting across the batch, a 1-D state solved per entry). The solver re-opened such
    samples, so the statuses are still true at the returned values; pass
    ``batch_axis=None`` to solve the batch as one system.
    """


class ConvergenceError(RuntimeError):
    """Raised instead of :class:`ConvergenceWarning` with ``on_failure="raise"``.

    The unconverged result is kept in ``.solution``.
    """

    def __init__(self, message: str, solution: Solution):
        super().__init__(message)
        self.solution = solution
