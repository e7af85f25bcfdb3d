"""Measure one row: a solver (eqsolve's or a peer's) on one :class:`~bench.case.Case`.

For every row, in this order:

1. build the solve and call it once (warm-up; on JAX this compiles, and its time is reported
   as ``compile_s``);
2. time ``reps`` further calls (median, min-max), each synchronised;
3. one untimed call with an instrumented ``f`` (:mod:`bench.instrument`): the number
   of f-evaluations and the residual at each evaluated point, counted outside the solver;
4. check the answer of the timed runs independently: the problem's float64 residual
   ``||f(z)_b - z_b|| / ||f(z)_b||`` per sample; the row converged if every sample is within
   ``CONVERGED_SLACK x tol`` (the slack allows for solvers that test their residual in working
   precision or in another norm);
5. the floor ``nfev x (time of one f call)`` and the share of time outside ``f``,
   ``1 - floor / median``, with the f-call time measured in the same run.

With ``backward=True`` (torch and jax): the gradient ``dL/dx`` of ``L = sum(z* * g)``
against the dense float64 reference of the problem, the backward time alone and the bytes
held for backward.
"""

from __future__ import annotations

import math
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

import eqsolve

from .case import Case, Problem
from .instrument import instrument
from .timing import Timing, first_call, time_call

#: a row converged if every sample's float64 residual is at most this multiple of ``tol``
CONVERGED_SLACK = 2.0

#: eqsolve's solvers as rows, named by method (the peers use the same method names)
EQSOLVE_SOLVERS = ("auto", "picard", "anderson", "broyden")
DEFAULT_SOLVER = "auto"  # eqsolve.solve's default


class EqsolveSolve:
    """``make(f)`` for an eqsolve row: the forward solve, jitted as a whole on JAX.

    Keeps the :class:`~eqsolve.Solution` of its latest call in ``last_solution``, so the
    table reads eqsolve's own iteration count and ``nfev`` without solving again.
    """

    def __init__(self, case: Case, solver: str, tol: float, max_iter: int) -> None:
        self.case, self.solver, self.tol, self.max_iter = case, solver, tol, max_iter
        self.last_solution: Any = None

    def __call__(self, f: Callable[[Any], Any]) -> Callable[[], Any]:
        def run(z0: Any) -> Any:
            return eqsolve.solve(
                f,
                z0,
                solver=self.solver,
                tol=self.tol,
                max_iter=self.max_iter,
                on_failure="ignore",
            )

        solve = run
        if self.case.framework == "jax":
            import jax

            solve = jax.jit(run)

        def call() -> Any:
            self.last_solution = solve(self.case.z0)
            return self.last_solution.value

        return call


def measure_row(
    case: Case,
    problem: Problem,
    make: Callable[[Callable[[Any], Any]], Callable[[], Any]],
    *,
    tol: float,
    reps: int,
    f_call: Timing,
    row_budget_s: float | None = None,
    max_iter: int | None = None,
    caveat: str = "",
) -> dict[str, Any]:
    """Steps 1-5 of the module docstring for the solve built by ``make``.

    Never raises: an exception (a peer that cannot handle the case) is recorded as
    ``row["error"]`` (its whole first line). A row that does not converge gets
    ``row["reason"]``, from :func:`why_not_converged` (``max_iter``: the cap the solve was
    given; ``caveat``: a known failure mode of the row's settings, appended).
    """
    row: dict[str, Any] = {}
    with warnings.catch_warnings(record=True) as caught, np.errstate(all="ignore"):
        warnings.simplefilter("always")
        try:
            solve = make(case.f)
            z, first_s = first_call(solve, case.sync)
            if row_budget_s is not None and first_s * reps > row_budget_s:
                # a very slow row (tens of seconds per solve) gets fewer timed runs; the
                # table shows its run count. Its median barely matters next to rows 100x
                # faster.
                reps = max(2, int(row_budget_s // max(first_s, 1e-9)))
            timing = time_call(solve, case.sync, reps)
            f_counted, recorder = instrument(case, case.f)
            case.sync(make(f_counted)())
            nfev, history = recorder.nfev, [float(r) for r in recorder.history]
        except Exception as exc:  # noqa: BLE001 - a failing row is a result, not a crash
            row["error"] = error_line(exc)
            row["traceback"] = traceback.format_exc(limit=6)
        else:
            res = problem.residual(case.to_numpy(z))
            finite = bool(np.all(np.isfinite(res)))
            floor = nfev * f_call.median
            row.update(
                nfev=nfev,
                converged=finite and bool(np.max(res) <= CONVERGED_SLACK * tol),
                samples_converged=int(np.sum(np.isfinite(res) & (res <= CONVERGED_SLACK * tol))),
                samples=int(res.shape[0]),
                residual=float(np.max(res)) if finite else float("nan"),
                **timing.as_ms(),
                reps=timing.reps,
                first_call_s=first_s,
                compile_s=first_s - timing.median if case.framework == "jax" else None,
                floor_ms=1e3 * floor,
                x_floor=timing.median / floor if floor > 0 else None,
                outside_f=max(0.0, 1.0 - floor / timing.median) if timing.median > 0 else None,
                history=history,
            )
            if not row["converged"]:
                row["reason"] = why_not_converged(res, history, tol, max_iter, caveat)
    if caught:  # kept in the JSON, out of the printed tables
        row["warnings"] = sorted({f"{w.category.__name__}: {w.message}"[:200] for w in caught})
    return row


def error_line(exc: BaseException, limit: int = 1000) -> str:
    """``"Type: message"``: the message's first non-empty line, whole (cut only past
    ``limit`` characters, with an ellipsis)."""
    lines = [s.strip() for s in str(exc).splitlines() if s.strip()]
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def why_not_converged(
    residuals: np.ndarray,
    history: list[float],
    tol: float,
    max_iter: int | None = None,
    caveat: str = "",
) -> str:
    """One sentence on why a row's answer misses the criterion, from what was measured.

    ``residuals``: the float64 per-sample residuals of the answer; ``history``: the batch-max
    residual at each f-evaluation of the counting run. Says whether the solve diverged (a
    non-finite answer or evaluation), used up the iteration budget (at least ``max_iter``
    f-evaluations), or stopped on its own rule short of the tolerance, with the figures; then
    ``caveat``, the known cause where the row's settings have one.
    """
    res = np.asarray(residuals, dtype=np.float64)
    n, bad = int(res.size), int(np.sum(~(np.isfinite(res) & (res <= CONVERGED_SLACK * tol))))
    hist = np.array([np.nan if h is None else h for h in history], dtype=np.float64)
    nfev = len(hist)
    if not np.all(np.isfinite(res)):
        text = "diverged: "
        if np.isfinite(hist).all():
            text += "the answer is NaN/inf, though every point f was evaluated at was finite"
        else:
            first_bad = int(np.argmin(np.isfinite(hist)))  # index of the first NaN/inf
            text += f"the iterate became NaN/inf at f-evaluation {first_bad + 1} of {nfev}"
            text += _trend(hist[:first_bad])
        text += f"; {int(np.sum(~np.isfinite(res)))}/{n} samples of the answer are not finite"
    elif max_iter is not None and nfev >= max_iter:
        text = (
            f"hit the iteration budget ({nfev} f-evaluations >= max_iter={max_iter}) with "
            f"worst residual {np.max(res):.1e} > {CONVERGED_SLACK:g}x tol on {bad}/{n} samples"
            + _trend(hist)
        )
    else:
        text = (
            f"stopped after {nfev} f-evaluations short of the tolerance: worst residual "
            f"{np.max(res):.1e} > {CONVERGED_SLACK:g}x tol on {bad}/{n} samples" + _trend(hist)
        )
    return f"{text}. {caveat}" if caveat else text


def _trend(hist: np.ndarray) -> str:
    """`` (best 1e-5 at f-evaluation 33, then up to 3e+151)`` for a finite history; ``""``
    when it is empty or not finite anywhere."""
    finite = np.isfinite(hist)
    if not finite.any():
        return ""
    h = np.where(finite, hist, np.nan)
    j = int(np.nanargmin(h))
    text = f" (best {h[j]:.1e} at f-evaluation {j + 1}"
    peak = float(np.nanmax(h[j:]))
    if peak > 10 * h[j]:
        text += f", then up to {peak:.1e}"
    return text + ")"


# ------------------------------------------------------------------------------ backward


def measure_backward(
    case: Case,
    problem: Problem,
    *,
    solver: str | None,
    grad: Callable[[Any], Any] | None,
    tol: float,
    max_iter: int,
    reps: int,
) -> dict[str, Any]:
    """Gradient error, backward time and memory held for backward for one row.

    ``solver``: an eqsolve solver name (eqsolve's implicit adjoint, default backward
    settings), or ``None`` with ``grad`` given (a peer's own ``dL/dx``, timed forward +
    backward together since peers do not expose the two halves).
    """
    g = np.random.default_rng(1).standard_normal(case.to_numpy(case.z0).shape)
    try:
        ref = problem.reference_input_grad(g)
    except Exception as exc:  # noqa: BLE001
        return {"backward_error": f"reference failed: {error_line(exc)}"}
    try:
        if solver is not None and case.framework == "torch":
            out = _torch_backward(case, g, solver, tol, max_iter, reps)
        elif solver is not None and case.framework == "jax":
            out = _jax_backward(case, g, solver, tol, max_iter, reps)
        elif grad is not None:
            out = _peer_backward(case, g, grad, reps)
        else:
            return {}
    except Exception as exc:  # noqa: BLE001
        return {"backward_error": error_line(exc)}
    dx = out.pop("grad")
    out["grad_rel_error"] = float(np.linalg.norm(dx - ref) / np.linalg.norm(ref))
    return out


def _torch_backward(
    case: Case, g_np: np.ndarray, solver: str, tol: float, max_iter: int, reps: int
) -> dict[str, Any]:
    import torch

    import eqsolve.torch as et

    g = torch.as_tensor(g_np, dtype=case.z0.dtype, device=case.z0.device)
    x = case.x.detach().clone().requires_grad_(True)

    def forward() -> Any:
        sol = et.fixed_point(
            lambda z: case.f_x(z, x),
            case.z0,
            solver=solver,
            tol=tol,
            max_iter=max_iter,
            on_failure="ignore",
        )
        return (sol.value * g).sum()

    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward()
    (dx,) = torch.autograd.grad(loss, x)
    times = []
    for _ in range(max(1, reps)):
        loss = forward()  # a fresh graph each time: backward alone is timed
        t0 = time.perf_counter()
        case.sync(torch.autograd.grad(loss, x))
        times.append(time.perf_counter() - t0)
    return {
        "grad": dx.detach().cpu().numpy().astype(np.float64),
        "backward_ms": 1e3 * float(np.median(times)),
        "backward_min_ms": 1e3 * min(times),
        "backward_max_ms": 1e3 * max(times),
        "backward_bytes": saved,
        "backward_timed": "backward alone",
    }


def _jax_backward(
    case: Case, g_np: np.ndarray, solver: str, tol: float, max_iter: int, reps: int
) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    from eqsolve.jax import fixed_point

    g = jnp.asarray(g_np, dtype=case.z0.dtype)

    def loss(x: Any) -> Any:
        sol = fixed_point(
            case.f_x, case.z0, x, solver=solver, tol=tol, max_iter=max_iter, on_failure="ignore"
        )
        return jnp.sum(sol.value * g)

    forward = jax.jit(lambda x: jax.vjp(loss, x))
    backward = jax.jit(lambda vjp_fn: vjp_fn(jnp.ones((), dtype=case.z0.dtype))[0])
    _, vjp_fn = forward(case.x)
    saved = sum(
        int(leaf.nbytes) for leaf in jax.tree_util.tree_leaves(vjp_fn) if hasattr(leaf, "nbytes")
    )
    dx, _ = first_call(lambda: backward(vjp_fn), case.sync)
    t = time_call(lambda: backward(vjp_fn), case.sync, reps)
    return {
        "grad": np.asarray(dx, dtype=np.float64),
        "backward_ms": 1e3 * t.median,
        "backward_min_ms": 1e3 * t.min,
        "backward_max_ms": 1e3 * t.max,
        "backward_bytes": saved,
        "backward_timed": "backward alone (jitted vjp)",
    }


def _peer_backward(
    case: Case, g_np: np.ndarray, grad: Callable[[Any], Any], reps: int
) -> dict[str, Any]:
    if case.framework == "torch":
        import torch

        g: Any = torch.as_tensor(g_np, dtype=case.z0.dtype, device=case.z0.device)
    elif case.framework == "jax":
        import jax.numpy as jnp

        g = jnp.asarray(g_np, dtype=case.z0.dtype)
    else:
        g = g_np.astype(case.dtype)
    dx, _ = first_call(lambda: grad(g), case.sync)
    t = time_call(lambda: grad(g), case.sync, reps)
    return {
        "grad": np.asarray(case.to_numpy(dx), dtype=np.float64),
        "backward_ms": 1e3 * t.median,
        "backward_min_ms": 1e3 * t.min,
        "backward_max_ms": 1e3 * t.max,
        "backward_bytes": None,
        "backward_timed": "forward + backward (the peer's grad)",
    }


def finite_or_none(x: float | None) -> float | None:
    """JSON has no NaN/inf: ``None`` for them."""
    return None if x is None or not math.isfinite(x) else x
