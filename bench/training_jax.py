"""JAX rows of the training-step workload: ``jax.jit(jax.value_and_grad(loss))`` of
``L = sum(c * z*)`` with respect to the cell's parameters, float32 (x64 off).

Rows: eqsolve's :data:`~bench.training_types.EQSOLVE_ROWS` (``eqsolve.jax.fixed_point``);
jaxopt ``AndersonAcceleration(implicit_diff=True)`` with its defaults and the tuned settings of
:mod:`bench.peers._jaxopt`; optimistix ``fixed_point`` with ``FixedPointIteration`` and
``ImplicitAdjoint(lineax.GMRES)`` (its dense default linear solver cannot fit the batch); the
floor, backprop through ``K`` unrolled applications of the cell (``lax.fori_loop`` with a
static trip count, ``K`` = eqsolve's forward f-evals). The absolute tolerances of the peers are
translated as in the forward benchmark (``tol * min_b ||f(z0)_b||``). """

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from .peers._common import floor_of, round_sig, row_norms, x64_off
from .peers._jaxopt import make_solver as jaxopt_solver
from .peers._jaxopt import settings as jaxopt_settings
from .peers._optimistix import fixed_point_settings, implicit_adjoint
from .peers._optimistix import make_solver as optimistix_solver
from .training_problems import TrainingProblem
from .training_types import EQSOLVE_ROWS, StepRow


def _arrays(pr: TrainingProblem) -> tuple[Any, dict[str, Any], Any, Any, Any]:
    import jax.numpy as jnp

    P = {k: jnp.asarray(v, dtype=jnp.float32) for k, v in pr.params.items()}
    x = jnp.asarray(pr.x, dtype=jnp.float32)
    c = jnp.asarray(pr.c, dtype=jnp.float32)
    return pr.cell("jax"), P, x, c, jnp.zeros_like(c)


def forward_fevals(pr: TrainingProblem, tol: float, max_iter: int) -> int:
    """f-evaluations of eqsolve's default forward solve on JAX: the floor's ``K``."""
    import eqsolve

    cell, P, x, _, z0 = _arrays(pr)
    with warnings.catch_warnings(), x64_off():
        warnings.simplefilter("ignore")
        sol = eqsolve.solve(lambda z: cell(z, P, x), z0, tol=tol, max_iter=max_iter)
    return int(sol.nfev)


def _to_numpy(out: Any) -> tuple[np.ndarray, dict[str, np.ndarray], int | None]:
    (_, (z, nfev)), grads = out
    g = {k: np.asarray(v, dtype=np.float64) for k, v in grads.items()}
    return np.asarray(z, dtype=np.float64), g, (None if nfev is None else int(nfev))


def rows(pr: TrainingProblem, tol: float, max_iter: int, K: int) -> list[StepRow]:
    """The JAX rows of one (problem, tolerance); each step is compiled on its first call."""
    import jax
    import jax.numpy as jnp

    import eqsolve.jax as ej

    cell, P, x, c, z0 = _arrays(pr)
    out: list[StepRow] = []

    def jitted(loss: Any) -> Any:
        step = jax.jit(jax.value_and_grad(loss, has_aux=True))

        def run() -> Any:
            # float32 rows trace and run with x64 off: the float64 references (the conv
            # cell's, on JAX when torch is absent) may have switched it on for the process
            with x64_off():
                return step(P)

        return run

    for method, backward, variant in EQSOLVE_ROWS:

        def eq_loss(P: Any, method: str = method, backward: str = backward) -> Any:
            sol = ej.fixed_point(cell, z0, P, x, solver=method, tol=tol, max_iter=max_iter,
                                 on_failure="ignore", backward=backward)
            return jnp.sum(sol.value * c), (sol.value, sol.nfev)

        out.append(StepRow("jax", "eqsolve", method, variant, jitted(eq_loss), _to_numpy,
                           {"solver": method, "tol": tol, "max_iter": max_iter,
                            "backward": backward}))

    # the peers' absolute tolerances from min_b ||f(z0)_b||, as in the forward benchmark
    scale = floor_of(row_norms(pr.base.f64(np.zeros(pr.c.shape))))
    for variant in ("defaults", "tuned"):
        kw = jaxopt_settings("AndersonAcceleration", variant, tol=tol,
                             tol_abs=round_sig(tol * scale), max_iter=max_iter)
        solver = jaxopt_solver("AndersonAcceleration", cell, {**kw, "implicit_diff": True})

        def jaxopt_loss(P: Any, solver: Any = solver) -> Any:
            res = solver.run(z0, P, x)
            return jnp.sum(res.params * c), (res.params, res.state.iter_num)

        out.append(StepRow("jax", "jaxopt", "anderson", variant, jitted(jaxopt_loss), _to_numpy,
                           {**kw, "implicit_diff": True}))

    n = int(np.prod(pr.c.shape[1:]))
    fpi = fixed_point_settings(tol, scale, n)
    g_rms = float(math.sqrt(float(np.mean(np.square(pr.c)))))
    adjoint = implicit_adjoint(tol, g_rms)
    fp_solver = optimistix_solver("FixedPointIteration", fpi)

    def optx_loss(P: Any) -> Any:
        import optimistix as optx

        sol = optx.fixed_point(lambda y, a: cell(y, a[0], a[1]), fp_solver, z0, args=(P, x),
                               max_steps=max_iter, adjoint=adjoint, throw=False)
        return jnp.sum(sol.value * c), (sol.value, sol.stats["num_steps"])

    out.append(StepRow("jax", "optimistix", "picard", "defaults", jitted(optx_loss), _to_numpy,
                       {**fpi, "max_steps": max_iter, "adjoint": "ImplicitAdjoint(GMRES)"}))

    def unrolled_loss(P: Any) -> Any:
        z = jax.lax.fori_loop(0, K, lambda _, z: cell(z, P, x), z0)
        return jnp.sum(z * c), (z, K)

    out.append(StepRow("jax", "unrolled", f"K={K}", "floor", jitted(unrolled_loss), _to_numpy,
                       {"K": K}))
    return out
