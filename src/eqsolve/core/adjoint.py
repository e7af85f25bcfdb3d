"""Adjoint linear solves for implicit differentiation of a fixed point.

For ``z* = f(z*, theta)`` and a cotangent ``g = dL/dz*``, the implicit function theorem gives
``dL/dtheta = u^T df/dtheta`` where ``u`` solves the adjoint fixed point

    u = g + J_f(z*)^T u        i.e.   (I - J_f(z*)^T) u = g,

which needs only vector-Jacobian products ``v -> J_f(z*)^T v`` (``vjp``), batched per sample
on the ``(B, n)`` view. The fixed-point methods ("neumann" = plain iteration, i.e. the
truncated Neumann series ``sum_k (J^T)^k g``; "anderson"; "broyden"; "auto", the default,
plain iteration per sample until it contracts slowly, then Anderson) run the *forward*
solvers and loop of ``core`` on the linear map ``h(u) = g + vjp(u)``: one code path.

The right-hand side is normalised per sample (``g / ||g||``; solved; scaled back), so tiny
float32 cotangents cannot underflow the stopping rule or the Gram matrices.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .adjoint_loop import AdjointInfo, solve_adjoint_loop
from .driver import Driver
from .gmres import gmres_solve
from .solver_base import FixedPointSolver, make_solver

__all__ = ["FIXED_POINT_METHODS", "AdjointInfo", "adjoint_solve", "default_adjoint_tol",
           "solve_adjoint_loop"]

#: fixed-point methods and the forward solver each one reuses
FIXED_POINT_METHODS = {
    "auto": "auto", "neumann": "picard", "anderson": "anderson", "broyden": "broyden",
}


def default_adjoint_tol(forward_tol: float, dtype_eps: float) -> float:
    """Backward tolerance tied to the forward one, never below what the dtype can reach."""
    return max(forward_tol, 10.0 * dtype_eps)


def adjoint_solve(
    xp: Any,
    vjp: Callable[[Any], Any],
    g: Any,
    *,
    method: str | FixedPointSolver = "auto",
    tol: float = 1e-6,
    max_iter: int = 100,
    driver: Driver | None = None,
    **options: Any,
) -> tuple[Any, AdjointInfo]:
    """Solve ``u = g + vjp(u)`` per sample (``g``, ``u``: ``(B, n)``).

    Args:
        xp: Array-API namespace of ``g``.
        vjp: ``v -> J_f(z*)^T v`` on ``(B, n)`` arrays (per sample).
        g: cotangent ``dL/dz*``.
        method: "auto" (plain iteration per sample until it contracts slowly, then
            Anderson: the forward default's rule), "neumann", "anderson", "broyden" (forward
            solvers reused on the linear map), "gmres", or a configured solver object.
        tol: relative tolerance on ``||g + J^T u - u|| / ||g + J^T u||``.
        max_iter: maximum updates (fixed-point methods) or restart cycles (gmres).
        driver: loop driver (``Backend.run``); defaults to the Python loop.
        **options: hyperparameters of the chosen method (e.g. ``m`` for anderson).

    Returns:
        ``(u, info)`` with ``u`` of the dtype/shape of ``g``.
    """
    if isinstance(method, str) and method == "gmres":  # restarted GMRES (matrix-free, batched)
        return gmres_solve(xp, vjp, g, tol=tol, max_iter=max_iter, driver=driver, **options)
    if isinstance(method, str):
        if method not in FIXED_POINT_METHODS:
            raise ValueError(
                f"unknown adjoint method {method!r}; choose one of "
                f"{', '.join([*FIXED_POINT_METHODS, 'gmres'])}"
            )
        solver = make_solver(FIXED_POINT_METHODS[method], options)
    else:
        solver = make_solver(method, options)
    return solve_adjoint_loop(xp, vjp, g, solver, tol=tol, max_iter=max_iter, driver=driver)
