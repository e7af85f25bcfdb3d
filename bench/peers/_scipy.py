"""scipy.optimize peers (NumPy): ``anderson``, ``broyden1``, ``newton_krylov``.

Each solves the whole batch as one flattened system ``F(z) = f(z) - z = 0`` (shape kept:
SciPy reshapes its iterate to ``z0``'s shape before calling ``F``). They stop when
``tol_norm(F) <= f_tol`` (``f_rtol``, ``x_tol``, ``x_rtol`` left at ``inf``), where the default
``tol_norm`` is the max-norm of ``F`` over every entry of every sample, and return the
``z`` that was tested. ``||F_b|| <= sqrt(n) max|F|`` (``n`` entries per sample), so the
"defaults" rows pass ``f_tol = tol * min_b ||f(z0)_b|| / sqrt(n)``; the "tuned" rows pass
``tol_norm = max_b ||F_b||`` (the per-sample 2-norm) with ``f_tol = tol * min_b ||f(z0)_b||``,
which removes the ``sqrt(n)``-vs-max slack. ``f(z0)`` is one untimed call of the raw ``f``.

``max_iter`` is passed as ``maxiter`` (nonlinear iterations; line-search and Krylov
evaluations come on top). A solve that reaches it raises ``scipy.optimize.NoConvergence``
carrying the last iterate; the row returns that iterate, and the runner's residual check
reports it as not converged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from ..case import Case
from ._common import PeerSolver, batch_size, round_sig, sample_size, scale_floor

#: SciPy's defaults of the hyperparameters we record (scipy.optimize._nonlin)
DEFAULTS: dict[str, dict[str, Any]] = {
    "anderson": {"alpha": None, "w0": 0.01, "M": 5, "line_search": "armijo"},
    # alpha=1, i.e. the initial Jacobian -I of F = f(z) - z when J_f ~ 0
    # (SciPy's default alpha=None scales it from |z0| / |F(z0)|)
    "broyden1": {
        "alpha": 1.0,
        "reduction_method": "restart",
        "max_rank": None,
        "line_search": "armijo",
    },
    "newton_krylov": {
        "method": "lgmres",
        "inner_maxiter": 20,
        "outer_k": 10,
        "rdiff": None,
        "line_search": "armijo",
    },
}

#: tuned settings: chosen on P1 (tanh), P2 (tanh-wide) and P4 (sym), float64
TUNED: dict[str, dict[str, Any]] = {
    # alpha=None scales the initial Jacobian -1/alpha by |z0|/|F(z0)|: from z0 = 0 that is
    # alpha = 0.5/||F(z0)|| ~ 1e-2 on P1, i.e. tiny first steps (626 f-evals). alpha=1 is
    # the right initial Jacobian -I of f(z) - z (P1: 18). M=10 instead of 5: P4 48 vs 58
    # f-evals, same on P1/P2. w0 and the line search made no difference.
    "anderson": {"alpha": 1.0, "w0": 0.01, "M": 10, "line_search": "armijo"},
    # no line search: the Armijo search rejected useful steps on P4 (82 vs 62 f-evals);
    # same counts on P1/P2.
    "broyden1": {
        "alpha": 1.0,
        "reduction_method": "restart",
        "max_rank": None,
        "line_search": None,
    },
    # inner GMRES instead of LGMRES: P4 93 vs 448 f-evals, P2 97 vs 126, P1 53 vs 65.
    "newton_krylov": {
        "method": "gmres",
        "inner_maxiter": 20,
        "rdiff": None,
        "line_search": "armijo",
    },
}

METHOD = {"anderson": "anderson", "broyden1": "broyden", "newton_krylov": "newton-krylov"}


def peers(case: Case, *, tol: float, max_iter: int) -> list[PeerSolver]:
    scale = scale_floor(case)  # one untimed call of the raw f
    n = sample_size(case)
    rows = []
    for name in ("anderson", "broyden1", "newton_krylov"):
        for variant, table in (("defaults", DEFAULTS), ("tuned", TUNED)):
            if name not in table:
                continue
            if variant == "defaults":
                stop = {"f_tol": round_sig(tol * scale / math.sqrt(n)), "tol_norm": "max-norm"}
            else:
                stop = {"f_tol": round_sig(tol * scale), "tol_norm": "per-sample 2-norm, max"}
            kwargs = {**stop, "maxiter": int(max_iter), **table[name]}
            rows.append(_row(case, name, variant, kwargs))
    return rows


def _row(case: Case, name: str, variant: str, settings: dict[str, Any]) -> PeerSolver:
    def make(f: Callable[[Any], Any]) -> Callable[[], Any]:
        import scipy.optimize as so

        solver = getattr(so, name)
        kwargs = {k: v for k, v in settings.items() if k != "tol_norm"}
        if settings["tol_norm"] != "max-norm":
            nb = batch_size(case)

            def per_sample(v: Any) -> float:
                return float(np.max(np.linalg.norm(np.reshape(v, (nb, -1)), axis=1)))

            kwargs["tol_norm"] = per_sample
        z0 = case.z0

        def F(z: Any) -> Any:
            return f(z) - z

        def solve() -> Any:
            try:
                return solver(F, z0, **kwargs)
            except so.NoConvergence as exc:  # max_iter reached: return the last iterate
                return np.reshape(np.asarray(exc.args[0]), np.shape(z0))

        return solve

    return PeerSolver(
        library="scipy",
        method=METHOD[name],
        variant=variant,
        settings=settings,
        make=make,
        grad=None,
        notes=f"whole batch as one system; stops when {settings['tol_norm']} of f(z)-z <= f_tol",
        call=f"scipy.optimize.{name}",
    )
