"""The shared iteration: one evaluation of ``f`` per step, stopping rule, best iterate.

Every solver runs inside this loop; backends only decide *how* it is driven (a Python
``while`` on eager backends, ``lax.while_loop`` under JAX) through ``loop_init``,
``loop_step`` and the continuation test ``state.k < max_iter and any(state.active)``.

Stopping rule, per sample ``b`` of the ``(B, n)`` view, for the evaluated point ``z``:

    ||f(z) - z|| <= tol * ||f(z)|| + atol

The reported residual is the relative ``||f(z) - z|| / ||f(z)||`` of the returned point.

The 2-norms are not rescaled: a state whose norm overflows (entries ~1e154 in float64)
counts as non-finite.

Per-sample freezing: a sample stops (converged, or NaN/inf in its residual) the first time
the rule holds or a non-finite value appears. From then on its reported fields (best
iterate, residual, iteration count, status) never change, and the point it feeds to ``f``
is parked at its best iterate, so a batch gives each sample the result it gets alone.
Active samples all advance together, which is why one scalar step counter ``k`` is enough
to index every ring buffer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from .solution import Status
from .solver_base import FixedPointSolver


@dataclass(frozen=True)
class StopRule:
    """``||f(z) - z|| <= tol ||f(z)|| + atol`` within ``max_iter`` solver updates."""

    tol: float
    atol: float
    max_iter: int


class LoopState(NamedTuple):
    z: Any  # (B, n) last evaluated point
    g: Any  # (B, n) its residual f(z) - z
    best_z: Any  # (B, n) best iterate while active
    best_res: Any  # (B,) its relative residual
    active: Any  # (B,) bool: still iterating
    status: Any  # (B,) int32 Status code (MAX_ITER until something else happens)
    iterations: Any  # (B,) int32 updates applied while active
    k: Any  # updates done (Python int eagerly, 0-d int array under JAX)
    solver: Any  # the solver's own NamedTuple state


def _row_norm(xp: Any, a: Any) -> Any:
    """Per-row 2-norm ``sqrt(<a_b, a_b>)`` of a ``(B, n)`` array (no rescaling).

    ``vecdot`` rather than ``linalg.vector_norm``: on NumPy it is 3x cheaper per call, and
    both the eager fast path and the general step use this one formula, so they round alike.
    """
    return xp.sqrt(xp.vecdot(a, a))


def _measure(xp: Any, z: Any, fz: Any, rule: StopRule) -> tuple[Any, Any, Any, Any]:
    """Residual ``g``, relative residual, converged flags and finiteness flags."""
    g = fz - z
    g_norm = _row_norm(xp, g)
    f_norm = _row_norm(xp, fz)
    tiny = _limits(xp, z.dtype)[0]
    finite = xp.isfinite(g_norm) & xp.isfinite(f_norm)
    # divide finite values only (inf/inf would warn on NumPy); non-finite samples get NaN
    safe_f = xp.where(finite, f_norm, xp.ones_like(f_norm))
    rel = xp.where(finite, g_norm, xp.zeros_like(g_norm)) / xp.maximum(
        safe_f, xp.asarray(tiny, dtype=z.dtype)
    )
    rel = xp.where(finite, rel, xp.full_like(rel, float("nan")))
    converged = g_norm <= rule.tol * f_norm + rule.atol
    return g, rel, converged, finite


def loop_init(
    xp: Any, f: Callable[[Any], Any], z0: Any, solver: FixedPointSolver, rule: StopRule
) -> LoopState:
    """Evaluate ``f(z0)`` and build the initial state (``z0``: ``(B, n)``)."""
    fz = f(z0)
    g, rel, converged, finite = _measure(xp, z0, fz, rule)
    status = xp.where(
        converged,
        xp.full_like(rel, int(Status.CONVERGED), dtype=xp.int32),
        xp.full_like(rel, int(Status.MAX_ITER), dtype=xp.int32),
    )
    status = xp.where(finite, status, xp.full_like(status, int(Status.NONFINITE)))
    return LoopState(
        z=z0,
        g=g,
        best_z=xp.asarray(z0, copy=True),  # never hand the caller's array back as the value
        best_res=rel,
        active=finite & ~converged,
        status=status,
        iterations=xp.zeros_like(status),
        k=0,
        solver=solver.init(xp, z0, g),
    )


def propose_point(xp: Any, state: LoopState, solver: FixedPointSolver) -> Any:
    """The next point to evaluate: the solver's proposal, stopped samples parked at best."""
    proposal = solver.propose(xp, state.solver, state.z, state.g, state.k)
    return xp.where(state.active[:, None], proposal, state.best_z)


def record(
    xp: Any, state: LoopState, solver: FixedPointSolver, rule: StopRule, z: Any, fz: Any
) -> LoopState:
    """Record the evaluation ``fz = f(z)``: test, update best, statuses and solver history."""
    active = state.active
    g, rel, converged, finite = _measure(xp, z, fz, rule)

    improved = active & (rel < state.best_res)
    best_z = xp.where(improved[:, None], z, state.best_z)
    best_res = xp.where(improved, rel, state.best_res)

    newly_converged = active & converged & finite
    newly_nonfinite = active & ~finite
    status = xp.where(
        newly_converged, xp.full_like(state.status, int(Status.CONVERGED)), state.status
    )
    status = xp.where(newly_nonfinite, xp.full_like(status, int(Status.NONFINITE)), status)

    # the solver only ever records finite data: a sample that just hit NaN/inf is frozen, and
    # its history must not produce inf arithmetic (and NumPy warnings) in later steps
    bad = ~finite[:, None]
    z_rec = xp.where(bad, state.z, z)
    g_rec = xp.where(bad, state.g, g)
    return LoopState(
        z=z_rec,
        g=g_rec,
        best_z=best_z,
        best_res=best_res,
        active=active & ~newly_converged & ~newly_nonfinite,
        status=status,
        iterations=state.iterations + xp.astype(active, state.iterations.dtype),
        k=state.k + 1,
        solver=solver.update(xp, state.solver, state.z, state.g, z_rec, g_rec, state.k),
    )


def loop_step(
    xp: Any, f: Callable[[Any], Any], state: LoopState, solver: FixedPointSolver, rule: StopRule
) -> LoopState:
    """One iteration: propose, evaluate ``f`` once, record, test, update best."""
    z = propose_point(xp, state, solver)
    return record(xp, state, solver, rule, z, f(z))


def loop_step_all_active(
    xp: Any, f: Callable[[Any], Any], state: LoopState, solver: FixedPointSolver, rule: StopRule
) -> tuple[LoopState, bool]:
    """:func:`loop_step` for eager backends while every sample is active.

    Returns the new state and whether every sample is still active.

    Same result, bit for bit, with the bookkeeping that only matters once a sample stops
    skipped. The common step (every sample finite, none converged, every residual below its
    best) needs no ``(B, n)`` selection at all: nothing is parked, the best iterate *is*
    ``z``, and the solver records ``z`` and ``g`` as they are. One host read decides; any
    other step goes through :func:`record`, reusing the same ``f(z)`` (``f`` is still
    called once). On this project's ``tanh`` problem this cut the eager time outside ``f``
    per step several-fold (see the benchmark); under JAX the general step is traced instead.
    """
    z = solver.propose(xp, state.solver, state.z, state.g, state.k)
    fz = f(z)
    g = fz - z
    g_norm = _row_norm(xp, g)
    f_norm = _row_norm(xp, fz)
    # NaN/inf anywhere makes `ok` False (comparisons with NaN are False; an infinite norm
    # makes the sum infinite). Clipping g_norm keeps inf/inf (a NumPy warning) out of the
    # division; it changes no finite value.
    tiny, huge = _limits(xp, z.dtype)
    rel = xp.minimum(g_norm, huge) / xp.maximum(f_norm, tiny)
    bound = rule.tol * f_norm + rule.atol if rule.atol else rule.tol * f_norm
    ok = (g_norm > bound) & (rel < state.best_res) & xp.isfinite(g_norm + f_norm)
    if not bool(xp.all(ok)):
        new = record(xp, state, solver, rule, z, fz)
        return new, bool(xp.all(new.active))
    fast = LoopState(
        z=z,
        g=g,
        best_z=z,
        best_res=rel,
        active=state.active,
        status=state.status,
        iterations=state.iterations + 1,
        k=state.k + 1,
        solver=solver.update(xp, state.solver, state.z, state.g, z, g, state.k),
    )
    return fast, True


_LIMITS: dict[tuple[str, str, str], tuple[float, float]] = {}


def _limits(xp: Any, dtype: Any) -> tuple[float, float]:
    """``(finfo.smallest_normal, finfo.max)`` of ``dtype``, cached (``finfo`` is slow)."""
    # keyed by strings: dtype objects of different libraries must never be compared
    key = (type(dtype).__module__, type(dtype).__qualname__, str(dtype))
    value = _LIMITS.get(key)
    if value is None:
        info = xp.finfo(dtype)
        value = _LIMITS[key] = (float(info.smallest_normal), float(info.max))
    return value
