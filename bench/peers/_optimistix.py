"""optimistix peers (JAX): ``FixedPointIteration`` and ``Newton`` via ``optimistix.fixed_point``.

Both treat the whole ``(B, ...)`` batch as one system and test elementwise, with
``optimistix.max_norm`` by default (so one bad entry of one sample keeps all iterating):

* ``FixedPointIteration`` stops when ``max_i |z_i - f(z)_i| / (atol + rtol |f(z)_i|) < 1``
  and returns ``f(z)``. Since ``||F_b|| <= sqrt(n) atol + rtol ||f(z)_b||`` (``n`` entries per
  sample), the rows pass ``rtol = tol/2`` and ``atol = tol * min_b ||f(z0)_b|| / (2 sqrt(n))``,
  which implies the per-sample relative criterion (``f(z0)``: one untimed raw call in
  ``make``).
* ``Newton`` (a root finder; ``fixed_point`` hands it ``f(z) - z``) stops when both the step
  ``|dz_i| < atol + rtol |z_i|`` and the residual ``|f(z)_i - z_i| < atol`` (before the
  step) hold for every entry ("Cauchy termination": ``rtol`` plays no part in f-space). The
  rows pass ``rtol = tol`` and ``atol = tol * min_b ||f(z0)_b|| / sqrt(n)``.

``Newton`` evaluates ``f`` once per step (``jax.linearize``) and solves with the linearised
map. Its default linear solver (``lineax.AutoLinearSolver(well_posed=None)``) materialises the
dense Jacobian of the whole flattened batch (``n_total = B * n``) and LU-factorises it each
step; the "defaults" row refuses in ``make`` (``MemoryError``) when that matrix would exceed
``DENSE_JACOBIAN_LIMIT`` (P1: 16384^2 float64 = 2 GiB, ~3e12 flops per step). The "tuned"
row (method ``newton-krylov``) passes ``lineax.GMRES`` instead: matrix-free, one JVP of the
linearised ``f`` per GMRES iteration (JVPs are not counted as f-evaluations). Newton stops
at the first failed linear solve: on ``conv``, where ``J_f`` at ``z0 = 0`` has spectral radius
~35 (GroupNorm of a near-zero input), restarted GMRES(20) (and GMRES(50)) stagnates on the
first step, so that row returns ``z1`` unconverged. In ``grad``, optimistix's adjoint linear
solve raises (an ``EqxRuntimeError`` through a host callback) when GMRES fails.

``max_iter`` is passed as ``max_steps``; ``throw=False``, so running out of steps returns the
last iterate (the runner's check reports it) instead of raising inside the compiled code.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from ..case import Case
from ._common import (
    DENSE_JACOBIAN_LIMIT,
    PeerSolver,
    batch_size,
    itemsize,
    jax_precision_scope,
    round_sig,
    sample_size,
    scale_floor,
)

#: GMRES settings of the tuned Newton row (inexact Newton): see peers()
GMRES_RTOL = 0.1
GMRES_RESTART = 20


def peers(case: Case, *, tol: float, max_iter: int) -> list[PeerSolver]:
    scale = scale_floor(case)  # one untimed call of the raw f
    n = sample_size(case)
    fpi = fixed_point_settings(tol, scale, n)
    newton_atol = round_sig(tol * scale / math.sqrt(n))
    newton = {
        "rtol": float(tol),
        "atol": newton_atol,
        "norm": "max_norm",
        "kappa": 1e-2,
        "cauchy_termination": True,
    }
    return [
        _row(case, "FixedPointIteration", "picard", "defaults", fpi, tol, max_iter),
        _row(
            case,
            "Newton",
            "newton",
            "defaults",
            {**newton, "linear_solver": "AutoLinearSolver(well_posed=None)"},
            tol,
            max_iter,
        ),
        _row(
            case,
            "Newton",
            "newton-krylov",
            "tuned",
            {
                **newton,
                # Inexact Newton: each GMRES iteration costs a JVP of the linearised f, and
                # a loose inner solve still converges fast (P1: 5 Newton steps, P4: 8, at
                # rtol 1e-1 as at 1e-3; 1e-1 is the fastest). lineax's GMRES tests
                # |r_i| <= atol + rtol |b_i| entry by entry, so atol=0 asks for a relative
                # accuracy on near-zero entries it cannot reach: in float32 it stagnates
                # (P1 stopped at residual 5e-4 after 2 steps). atol = the Newton atol (the
                # outer target per entry) fixes that.
                "linear_solver": "GMRES",
                "gmres_rtol": GMRES_RTOL,
                "gmres_atol": newton_atol,
                "gmres_restart": GMRES_RESTART,
            },
            tol,
            max_iter,
        ),
    ]


def fixed_point_settings(tol: float, scale: float, n: int) -> dict[str, Any]:
    """``FixedPointIteration``'s tolerances for the per-sample relative rule (module
    docstring): ``scale = min_b ||f(z0)_b||``, ``n`` entries per sample."""
    return {
        "rtol": round_sig(tol / 2),
        "atol": round_sig(tol * scale / (2 * math.sqrt(n))),
        "norm": "max_norm",
        "damp": 0.0,
    }


def implicit_adjoint(tol: float, g_rms: float) -> Any:
    """``optimistix.ImplicitAdjoint`` with restarted ``lineax.GMRES``: ``rtol = tol`` and, as
    lineax tests entry by entry, ``atol = tol * rms(g)`` for the cotangent ``g``."""
    import lineax as lx
    import optimistix as optx

    atol = round_sig(tol * (g_rms if g_rms > 0 else 1.0))
    return optx.ImplicitAdjoint(
        linear_solver=lx.GMRES(rtol=float(tol), atol=atol, restart=GMRES_RESTART)
    )


def _linear_solver(settings: dict[str, Any]) -> Any:
    import lineax as lx

    if settings["linear_solver"] == "GMRES":
        return lx.GMRES(
            rtol=settings["gmres_rtol"],
            atol=settings["gmres_atol"],
            restart=settings["gmres_restart"],
        )
    return lx.AutoLinearSolver(well_posed=None)


def make_solver(name: str, settings: dict[str, Any]) -> Any:
    """The optimistix solver ``name`` with the row's ``settings``."""
    import optimistix as optx

    if name == "FixedPointIteration":
        return optx.FixedPointIteration(
            rtol=settings["rtol"], atol=settings["atol"], norm=optx.max_norm
        )
    return optx.Newton(
        rtol=settings["rtol"],
        atol=settings["atol"],
        norm=optx.max_norm,
        linear_solver=_linear_solver(settings),
    )


def _row(
    case: Case,
    name: str,
    method: str,
    variant: str,
    settings: dict[str, Any],
    tol: float,
    max_iter: int,
) -> PeerSolver:
    settings = {**settings, "max_steps": int(max_iter), "throw": False}
    dense = name == "Newton" and settings["linear_solver"] != "GMRES"

    def make(f: Callable[[Any], Any]) -> Callable[[], Any]:
        import jax
        import optimistix as optx

        if dense:
            _check_dense(case)
        solver = make_solver(name, settings)

        def solve(z0: Any) -> Any:
            sol: Any = optx.fixed_point(
                lambda y, _: f(y), solver, z0, max_steps=int(max_iter), throw=False
            )
            return sol.value

        run = jax.jit(solve)
        z0 = case.z0

        def call() -> Any:
            with jax_precision_scope(case):
                return run(z0)

        return call

    if name == "FixedPointIteration":
        notes = "whole batch; elementwise |z - f(z)| < atol + rtol |f(z)| (max norm)"
    else:
        notes = "whole batch; elementwise |f(z) - z| < atol and |dz| < atol + rtol |z| (max norm)"
    return PeerSolver(
        library="optimistix",
        method=method,
        variant=variant,
        settings=settings,
        make=make,
        grad=_make_grad(case, name, settings, tol, max_iter),
        notes=notes,
        call=f"optimistix.fixed_point(..., optimistix.{name}(...))",
    )


def _check_dense(case: Case) -> None:
    n_total = batch_size(case) * sample_size(case)
    nbytes = n_total * n_total * itemsize(case)
    if nbytes > DENSE_JACOBIAN_LIMIT:
        raise MemoryError(
            f"not run: optimistix Newton's default linear solver would materialise the dense "
            f"{n_total}x{n_total} Jacobian of the whole flattened batch "
            f"({nbytes / 2**30:.2f} GiB and an O(n^3) LU per step), over this benchmark's "
            f"{DENSE_JACOBIAN_LIMIT / 2**20:.0f} MiB limit; the newton-krylov row is the "
            "matrix-free alternative"
        )


def _make_grad(
    case: Case, name: str, settings: dict[str, Any], tol: float, max_iter: int
) -> Callable[[Any], Any]:
    """dL/dx by optimistix's ``ImplicitAdjoint`` with ``lineax.GMRES`` (the default dense
    solver would materialise the whole batch's Jacobian, like the forward): ``rtol = tol``
    and, as lineax tests entry by entry, ``atol = tol * rms(g)``."""
    cache: dict[float, Any] = {}

    def grad(g: Any) -> Any:
        import jax
        import jax.numpy as jnp
        import optimistix as optx

        g_rms = float(np.sqrt(np.mean(np.square(np.asarray(case.to_numpy(g), np.float64)))))
        key = round_sig(tol * (g_rms if g_rms > 0 else 1.0))
        if key not in cache:
            if name == "Newton" and settings["linear_solver"] != "GMRES":
                _check_dense(case)
            solver = make_solver(name, settings)
            adjoint = implicit_adjoint(tol, g_rms)

            def loss(x: Any, g: Any) -> Any:
                sol: Any = optx.fixed_point(
                    case.f_x,
                    solver,
                    case.z0,
                    args=x,
                    max_steps=int(max_iter),
                    adjoint=adjoint,
                    throw=False,
                )
                return jnp.sum(sol.value * g)

            cache[key] = jax.jit(jax.grad(loss))
        with jax_precision_scope(case):
            return cache[key](case.x, g)

    return grad
