"""The shared loop of every adjoint solve: ``u = g + vjp(u)`` with a per-sample scaled rhs.

Its own module so that :mod:`eqsolve.core.gmres` (whose cycles run in this loop) and
:mod:`eqsolve.core.adjoint` (which picks the method) both import it and not each other.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from ._xp import scaled_norm
from .driver import Driver, python_driver
from .loop import StopRule
from .precision import widened, working_dtype
from .solution import Status
from .solver_base import FixedPointSolver


class AdjointInfo(NamedTuple):
    """Per-sample diagnostics of an adjoint solve (arrays of shape ``(B,)``)."""

    iterations: Any  # solver updates (vjp calls - 1 for the fixed-point methods)
    residual: Any  # relative residual ||g + J^T u - u|| / ||g + J^T u||
    converged: Any  # bool
    status: Any  # core.solution.Status codes


def solve_adjoint_loop(
    xp: Any,
    vjp: Callable[[Any], Any],
    g: Any,
    solver: FixedPointSolver,
    *,
    tol: float,
    max_iter: int,
    driver: Driver | None = None,
    vjps_per_update: int = 1,
) -> tuple[Any, AdjointInfo]:
    """Run ``solver`` in the shared loop on ``h(u) = g + vjp(u)`` (every adjoint method).

    The right-hand side is normalised per sample with a max-scaled norm (a float32 row of
    1e-30 has a plain 2-norm of 0) and the solution scaled back: the map is linear.
    ``info.iterations`` counts ``vjps_per_update`` VJPs per solver update (GMRES: the
    Arnoldi steps of one restart cycle). A float16/bfloat16 ``g`` is solved in float32 with
    the VJPs in ``g``'s dtype (:mod:`eqsolve.core.precision`); ``u`` comes back in it.
    """
    run = driver if driver is not None else python_driver(xp)
    wide = working_dtype(xp, g.dtype)
    if wide is not None:
        low = g.dtype
        u, info = solve_adjoint_loop(
            xp, widened(xp, vjp, low, wide), xp.astype(g, wide), solver, tol=tol,
            max_iter=max_iter, driver=driver, vjps_per_update=vjps_per_update,
        )
        return xp.astype(u, low), info
    norm = scaled_norm(xp, g)
    scale = xp.where(norm > 0, norm, xp.ones_like(norm))
    g_unit = g / scale[:, None]

    def h(u: Any) -> Any:
        return g_unit + vjp(u)

    state = run(h, g_unit, solver, StopRule(float(tol), 0.0, int(max_iter)))
    info = AdjointInfo(
        iterations=state.iterations * vjps_per_update,
        residual=state.best_res,
        converged=state.status == int(Status.CONVERGED),
        status=state.status,
    )
    return state.best_z * scale[:, None], info
