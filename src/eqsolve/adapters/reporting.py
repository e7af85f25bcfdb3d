"""How failures reach the user: one reporter for the forward and the adjoint solves.

A failure is a status in the returned arrays, and eagerly also a warning
(:class:`~eqsolve.core.solution.ConvergenceWarning`) or, with ``on_failure="raise"``, a
:class:`~eqsolve.core.solution.ConvergenceError` holding the solution. Every adapter reports
through these functions, so the messages say the same things in the same words.

Warnings point at the user's line: :func:`warn` skips the frames of eqsolve (and of the
framework machinery between the user and eqsolve: autograd's engine, JAX's callbacks), so
Python's default filter, which shows a warning once per *location*, does not swallow the
warnings of a second call site.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

from ..core.adjoint import AdjointInfo
from ..core.solution import (
    ConvergenceError,
    ConvergenceWarning,
    CouplingWarning,
    Solution,
    Status,
)

__all__ = [
    "deprecated_getattr", "report_adjoint", "report_coupling", "report_failures", "warn",
]

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: frames of these modules sit between the user's call and eqsolve's report
_PASS_THROUGH = ("torch", "jax", "jaxlib", "functools", "contextlib", "importlib")


def _is_internal(frame: Any) -> bool:
    if os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR + os.sep):
        return True
    module = str(frame.f_globals.get("__name__", ""))
    return module.split(".", 1)[0] in _PASS_THROUGH


def warn(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` attributed to the first frame outside eqsolve (the user's call)."""
    frame = sys._getframe(1)
    level = 2  # 1 is this function, 2 its caller
    while frame.f_back is not None and _is_internal(frame):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)


def _count(xp: Any, status: Any, code: Status) -> int:
    return int(xp.sum(xp.astype(status == int(code), xp.int32)))


def _failure_parts(
    xp: Any, status: Any, residual: Any, *, shortfall: str, nonfinite_hint: str
) -> list[str]:
    """One clause per kind of failure (empty when every sample converged)."""
    status = xp.reshape(status, (-1,))
    n = int(status.shape[0])
    n_max = _count(xp, status, Status.MAX_ITER)
    n_div = _count(xp, status, Status.DIVERGED)
    n_bad = _count(xp, status, Status.NONFINITE)
    parts = []
    if n_max:
        worst = float(xp.max(xp.reshape(residual, (-1,))[status == int(Status.MAX_ITER)]))
        parts.append(
            f"{n_max} of {n} samples {shortfall} (largest relative residual {worst:.3g})"
        )
    if n_div:
        parts.append(
            f"{n_div} of {n} samples diverged (the residual grew without bound, or the "
            "stopping rule held only because the iterate ran away: no fixed point determined "
            "to tol there)"
        )
    if n_bad:
        parts.append(f"{n_bad} of {n} samples hit NaN/inf{nonfinite_hint}")
    return parts


def _emit(message: str, on_failure: str, solution: Solution) -> None:
    if on_failure == "raise":
        raise ConvergenceError(message, solution)
    warn(message, ConvergenceWarning)


def report_failures(xp: Any, sol: Solution, on_failure: str, tol: float, max_iter: int) -> None:
    """Warn (or raise) for samples of a forward solve whose status is not CONVERGED."""
    parts = _failure_parts(
        xp, sol.status, sol.residual,
        shortfall=f"did not converge within max_iter={max_iter} to tol={tol:.3g}",
        nonfinite_hint=" and were stopped at their best finite iterate",
    )
    if parts:
        _emit("; ".join(parts) + " (see Solution.status)", on_failure, sol)


def report_adjoint(
    xp: Any, u: Any, info: AdjointInfo, *, method: str, tol: float, max_iter: int,
    on_failure: str,
) -> None:
    """Warn (or raise) for samples whose adjoint solve ``u = g + J^T u`` failed.

    Also called from a JAX host callback with NumPy arrays (``xp`` = NumPy).
    """
    parts = _failure_parts(
        xp, info.status, info.residual,
        shortfall=f"did not reach the adjoint tol={tol:.3g} within max_iter={max_iter}",
        nonfinite_hint=(
            " (a non-finite cotangent, or J_f(z*) with spectral radius >= 1 for the plain "
            "'neumann' iteration)"
        ),
    )
    if not parts:
        return
    message = (
        f"implicit backward (method={method!r}): " + "; ".join(parts)
        + ": the gradient of those samples is inexact. Try another method, a larger "
        "max_iter or on_failure='nan' in eqsolve.Implicit(...)"
    )
    adjoint = Solution(
        value=u, converged=info.converged, iterations=info.iterations,
        residual=info.residual, status=info.status, nfev=int(xp.max(info.iterations)) + 1,
    )
    _emit(message, on_failure, adjoint)


def report_coupling(xp: Any, reopened: Any) -> None:
    """Warn (:class:`CouplingWarning`) when stopped samples had to be re-opened."""
    flags = xp.reshape(reopened, (-1,))
    n = int(xp.sum(xp.astype(flags, xp.int32)))
    if n == 0:
        return
    warn(
        f"f does not treat the samples of the batch independently: {n} of {flags.shape[0]} "
        "samples that had stopped gave a different stopping-rule result when evaluated again "
        "at the same point while other samples moved (BatchNorm in the cell, a map acting "
        "across the batch axis, or a state that is one system). They were re-opened and "
        "every status holds at the returned values; pass batch_axis=None to solve the batch "
        "as one system",
        CouplingWarning,
    )


def deprecated_getattr(
    module: str, moved: dict[str, tuple[Callable[[], Any], str]]
) -> Callable[[str], Any]:
    """A module ``__getattr__`` serving renamed public names for one more release.

    ``moved`` maps an old name to ``(getter of its value, what to use instead)``; reading an
    old name warns (:class:`DeprecationWarning`, at the user's line) and returns the value.
    """

    def __getattr__(name: str) -> Any:
        if name in moved:
            value, instead = moved[name]
            warn(
                f"{module}.{name} is deprecated and will be removed in the next release; "
                f"use {instead}",
                DeprecationWarning,
            )
            return value()
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
