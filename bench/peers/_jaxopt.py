"""jaxopt peers (JAX): ``FixedPointIteration``, ``AndersonAcceleration``, ``Broyden``.

All three treat the whole ``(B, ...)`` batch as one vector: one stopping test, and (Anderson,
Broyden) one set of mixing coefficients / one Jacobian approximation for all samples.
They stop when ``error <= tol`` with ``error`` an absolute, whole-batch 2-norm:
``||f(z) - z||`` (FixedPointIteration, AndersonAcceleration; both return ``f(z)``, one
contraction step past the tested ``z``) or ``||fun(z)||`` of the root function
(Broyden; returns ``z``). These rows pass ``tol_abs = tol * min_b ||f(z0)_b||``: since
``||F_b|| <= ||F||``, it implies the per-sample relative criterion as long as
``||f(z*)_b|| >= min_b ||f(z0)_b||`` (``f(z0)`` is one untimed call of the raw ``f`` in
``make``). The price is up to ``sqrt(B)`` (whole-batch vs per-sample norm) of extra
tightness. ``Broyden`` is a root finder: it is given ``fun(z) = z - f(z)``, whose Jacobian
``I - J_f`` matches its initial inverse-Jacobian guess ``gamma * I`` with the default
``gamma = 1`` (the first step is a plain fixed-point step).

``max_iter`` is passed as ``maxiter``. jaxopt's ``AndersonAcceleration.init_state``
evaluates ``f(z0)`` for ``aux`` and drops it; XLA removes that call from the timed (raw
``f``) run, but the instrumented run keeps it, so its count is one more than what runs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from ..case import Case
from ._common import PeerSolver, jax_precision_scope, round_sig, scale_floor

#: jaxopt 0.8.5's own defaults for the hyperparameters we record
DEFAULTS: dict[str, dict[str, Any]] = {
    "FixedPointIteration": {},
    "AndersonAcceleration": {"history_size": 5, "mixing_frequency": 1, "beta": 1.0, "ridge": 1e-5},
    "Broyden": {"stepsize": 0.0, "history_size": None, "gamma": 1.0, "linesearch": "backtracking"},
}

#: tuned settings: chosen on P1 (tanh), P2 (tanh-wide) and P4 (sym)
TUNED: dict[str, dict[str, Any]] = {
    # ``ridge`` is absolute, added to the whole batch's residual Gram matrix: at 1e-5 it
    # dominates once the batch residual norm is ~3e-3 and Anderson degenerates to averaging
    # (P1: 38 f-evals vs 19 for plain iteration; P4: 580). ridge=1e-20 only guards exact
    # singularity: P1 20, P4 69 (m=5) / 53 (m=10) f-evals. The first history_size steps
    # are plain iteration in jaxopt, which costs nothing extra on P1 with 10.
    "AndersonAcceleration": {
        "history_size": 10,
        "mixing_frequency": 1,
        "beta": 1.0,
        "ridge": 1e-20,
    },
    # stepsize=0 (default) runs a backtracking line search every step (an evaluation of f
    # and its VJP): P1 37 f-evals vs 19 with the full quasi-Newton step (stepsize=1), which
    # these contractive problems accept. history_size=None keeps maxiter pairs and every
    # step multiplies by all of them, used or not: P1 takes ~6 s with maxiter=1000. 20
    # pairs: P1 ~35 ms. The trade-off is P4 (sym, ~70 steps): jaxopt overwrites the oldest
    # pair, and with fewer pairs than steps P4 diverges (NaN with 10/20/32, converges with
    # 50/64 at ~1 s per solve); the row keeps P1's choice and the runner reports P4 as it is,
    # with CAVEATS' explanation in the table.
    "Broyden": {"stepsize": 1.0, "history_size": 20, "gamma": 1.0},
    # FixedPointIteration has no hyperparameter: no tuned row.
}

#: why a row with these settings can fail (shown in the table when it does not converge)
CAVEATS: dict[tuple[str, str], str] = {
    ("Broyden", "tuned"): (
        "Known cause: history_size=20 (tuned on tanh) is a ring buffer: from step 21 jaxopt "
        "overwrites its oldest secant pair, and on problems needing more steps (sym: ~70) the "
        "iterate then blows up to NaN; history_size 50 or 64 converges on sym (71 / 66 steps)."
    ),
}

METHOD = {
    "FixedPointIteration": "picard",
    "AndersonAcceleration": "anderson",
    "Broyden": "broyden",
}


def peers(case: Case, *, tol: float, max_iter: int) -> list[PeerSolver]:
    tol_abs = round_sig(tol * scale_floor(case))  # one untimed call of the raw f
    rows = []
    for name in ("FixedPointIteration", "AndersonAcceleration", "Broyden"):
        for variant, table in (("defaults", DEFAULTS), ("tuned", TUNED)):
            if name in table:
                kwargs = settings(name, variant, tol=tol, tol_abs=tol_abs, max_iter=max_iter)
                rows.append(_row(case, name, variant, kwargs))
    return rows


def settings(
    name: str, variant: str, *, tol: float, tol_abs: float, max_iter: int
) -> dict[str, Any]:
    """The keyword arguments of a row (``variant`` "defaults" or "tuned"), JSON-serialisable;
    :func:`make_solver` turns them into the jaxopt solver."""
    table = DEFAULTS if variant == "defaults" else TUNED
    kwargs = {"tol": tol_abs, "maxiter": int(max_iter), **table[name]}
    if isinstance(kwargs.get("history_size"), int) and name == "Broyden":
        kwargs["history_size"] = min(kwargs["history_size"], int(max_iter))
    if variant == "tuned":
        # backward only: jaxopt's default implicit-diff solver is CG on the normal equations
        # at jax's default tol=1e-5 (gradient errors ~1e-5); the tuned rows solve the
        # adjoint system to the benchmark tolerance
        kwargs["implicit_diff_solve"] = "solve_gmres"
        kwargs["implicit_diff_tol"] = float(tol)
    return kwargs


def make_solver(name: str, f: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    """The jaxopt solver of :func:`settings` for the map ``f(z, *args)``."""
    import jaxopt
    from jaxopt.linear_solve import solve_gmres

    kwargs = dict(kwargs)
    if kwargs.pop("implicit_diff_solve", None) == "solve_gmres":
        tol = kwargs.pop("implicit_diff_tol")
        kwargs["implicit_diff_solve"] = functools.partial(solve_gmres, tol=tol)
    if name == "Broyden":
        return jaxopt.Broyden(fun=lambda z, *a: z - f(z, *a), **kwargs)
    return getattr(jaxopt, name)(fixed_point_fun=f, **kwargs)


def _row(case: Case, name: str, variant: str, kwargs: dict[str, Any]) -> PeerSolver:
    def make(f: Callable[[Any], Any]) -> Callable[[], Any]:
        import jax

        solver = make_solver(name, lambda z: f(z), kwargs)
        run = jax.jit(lambda z0: solver.run(z0).params)
        z0 = case.z0

        def solve() -> Any:
            with jax_precision_scope(case):
                return run(z0)

        return solve

    residual = "||z - f(z)||" if name == "Broyden" else "||f(z) - z||"
    return PeerSolver(
        library="jaxopt",
        method=METHOD[name],
        variant=variant,
        settings={**kwargs, "tol_rule": "tol * min_b ||f(z0)_b||"},
        make=make,
        grad=_make_grad(case, name, kwargs),
        notes=(
            f"whole batch as one system; stops when the whole-batch absolute 2-norm {residual}"
            " <= tol_abs = tol * min_b ||f(z0)_b||"
            + (
                "; the instrumented count includes init_state's f(z0), which XLA drops from"
                " the timed run"
                if name == "AndersonAcceleration"
                else ""
            )
            + " (jaxopt is no longer maintained)"
        ),
        call=f"jaxopt.{name}",
        caveat=CAVEATS.get((name, variant), ""),
    )


def _make_grad(case: Case, name: str, kwargs: dict[str, Any]) -> Callable[[Any], Any]:
    """dL/dx by jaxopt's implicit differentiation (``implicit_diff=True``, its default
    linear solver ``solve_normal_cg``) of ``z* = f_x(z*, x)``."""
    cache: dict[str, Any] = {}

    def grad(g: Any) -> Any:
        import jax
        import jax.numpy as jnp

        if "fn" not in cache:
            solver = make_solver(name, case.f_x, kwargs)

            def loss(x: Any, g: Any) -> Any:
                return jnp.sum(solver.run(case.z0, x).params * g)

            cache["fn"] = jax.jit(jax.grad(loss))
        with jax_precision_scope(case):
            return cache["fn"](case.x, g)

    return grad
