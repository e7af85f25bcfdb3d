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


def _measure(xp: Any, z: Any, fz: Any, rule: StopRule) -> tuple[Any, Any, Any, Any]:
    """Residual ``g``, relative residual, converged flags and finiteness flags."""
    g = fz - z
    g_norm = xp.linalg.vector_norm(g, axis=1)
    f_norm = xp.linalg.vector_norm(fz, axis=1)
    tiny = float(xp.finfo(z.dtype).smallest_normal)
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


def loop_step(
    xp: Any, f: Callable[[Any], Any], state: LoopState, solver: FixedPointSolver, rule: StopRule
) -> LoopState:
    """One iteration: propose, evaluate ``f`` once, record, test, update best."""
    active = state.active
    proposal = solver.propose(xp, state.solver, state.z, state.g, state.k)
    z = xp.where(active[:, None], proposal, state.best_z)  # park stopped samples
    fz = f(z)
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
