"""Adjoint linear solves for implicit differentiation of a fixed point.

For ``z* = f(z*, theta)`` and a cotangent ``g = dL/dz*``, the implicit function theorem gives
``dL/dtheta = u^T df/dtheta`` where ``u`` solves the adjoint fixed point

    u = g + J_f(z*)^T u        i.e.   (I - J_f(z*)^T) u = g,

which needs only vector-Jacobian products ``v -> J_f(z*)^T v`` (``vjp``), batched per sample
on the ``(B, n)`` view. The fixed-point methods ("neumann" = plain iteration, i.e. the
truncated Neumann series ``sum_k (J^T)^k g``; "anderson"; "broyden") run the *forward*
solvers and loop of ``core`` on the linear map ``h(u) = g + vjp(u)``: one code path.

The right-hand side is normalised per sample (``g / ||g||``; solved; scaled back), so tiny
float32 cotangents cannot underflow the stopping rule or the Gram matrices.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from ._xp import scaled_norm
from .driver import Driver, python_driver
from .loop import StopRule
from .precision import widened, working_dtype
from .solution import Status
from .solver_base import FixedPointSolver, make_solver
from .validation import check_max_iter

#: fixed-point methods and the forward solver each one reuses
FIXED_POINT_METHODS = {"neumann": "picard", "anderson": "anderson", "broyden": "broyden"}


class AdjointInfo(NamedTuple):
    """Per-sample diagnostics of an adjoint solve (arrays of shape ``(B,)``)."""

    iterations: Any  # solver updates (vjp calls - 1 for the fixed-point methods)
    residual: Any  # relative residual ||g + J^T u - u|| / ||g + J^T u||
    converged: Any  # bool
    status: Any  # core.solution.Status codes


def default_adjoint_tol(forward_tol: float, dtype_eps: float) -> float:
    """Backward tolerance tied to the forward one, never below what the dtype can reach."""
    return max(forward_tol, 10.0 * dtype_eps)


def adjoint_solve(
    xp: Any,
    vjp: Callable[[Any], Any],
    g: Any,
    *,
    method: str | FixedPointSolver = "anderson",
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
        method: "neumann", "anderson", "broyden" (forward solvers reused on the linear map),
            "gmres", or a configured fixed-point solver object.
        tol: relative tolerance on ``||g + J^T u - u|| / ||g + J^T u||``.
        max_iter: maximum updates (fixed-point methods) or restart cycles (gmres).
        driver: loop driver (``Backend.run``); defaults to the Python loop.
        **options: hyperparameters of the chosen method (e.g. ``m`` for anderson).

    Returns:
        ``(u, info)`` with ``u`` of the dtype/shape of ``g``.
    """
    if isinstance(method, str) and method == "gmres":
        from .gmres import gmres_solve  # restarted GMRES (matrix-free, batched)

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


# --- argument checks shared by the framework adapters ------------------------------------
# (errors name the adapter-level argument: backward_tol, backward_max_iter, backward_options,
# phantom_steps, phantom_damping)


def check_backward_limits(tol: Any, max_iter: Any) -> tuple[float | None, int | None]:
    """``backward_tol`` (finite, > 0) and ``backward_max_iter`` (>= 1); ``None`` passes."""
    if tol is not None:
        if isinstance(tol, bool) or not isinstance(tol, numbers.Real):
            raise TypeError(f"backward_tol must be a real number or None, got {type(tol).__name__}")
        if not math.isfinite(tol) or tol <= 0:
            raise ValueError(f"backward_tol must be finite and > 0, got {tol!r}")
        tol = float(tol)
    if max_iter is not None:
        max_iter = check_max_iter(max_iter, "backward_max_iter")
    return tol, max_iter


def check_backward_options(method: str | FixedPointSolver, options: Any) -> dict[str, Any]:
    """``backward_options`` for an adjoint ``method``, checked now rather than in backward.

    Unknown option names (and bad values) raise exactly as the solver that ``adjoint_solve``
    would build raises them; GMRES options are checked against ``gmres_solve``'s keywords.
    """
    if options is None:
        checked: dict[str, Any] = {}
    elif isinstance(options, Mapping):
        checked = dict(options)
    else:
        raise TypeError(f"backward_options must be a dict, got {type(options).__name__}")
    if isinstance(method, FixedPointSolver):
        make_solver(method, checked)  # options with a configured object raise
    elif method in FIXED_POINT_METHODS:
        try:
            make_solver(FIXED_POINT_METHODS[method], checked)
        except TypeError as exc:
            raise TypeError(f"backward_options for backward={method!r}: {exc}") from None
    elif method == "gmres":
        from .gmres import gmres_solve

        params = inspect.signature(gmres_solve).parameters
        valid = {
            name
            for name, p in params.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
            and name not in ("tol", "max_iter", "driver")
        }
        unknown = sorted(set(checked) - valid)
        if unknown:
            raise TypeError(
                f"backward_options for backward='gmres': unknown option(s) "
                f"{', '.join(map(repr, unknown))}; valid options: {', '.join(sorted(valid))}"
            )
    return checked


def check_phantom(steps: Any, damping: Any) -> tuple[int, float]:
    """Phantom gradient settings: ``steps >= 1`` damped steps with ``damping`` in (0, 1]."""
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise TypeError(f"phantom_steps must be an int, got {type(steps).__name__}")
    if steps < 1:
        raise ValueError(f"phantom_steps must be >= 1, got {steps}")
    if isinstance(damping, bool) or not isinstance(damping, numbers.Real):
        raise TypeError(f"phantom_damping must be a real number, got {type(damping).__name__}")
    lam = float(damping)
    if not (math.isfinite(lam) and 0.0 < lam <= 1.0):
        raise ValueError(f"phantom_damping must be in (0, 1], got {damping!r}")
    return int(steps), lam
