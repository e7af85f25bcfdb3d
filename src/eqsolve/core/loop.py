"""The shared iteration: one evaluation of ``f`` per step, stopping rule, best iterate.

Every solver runs inside this loop; backends only decide *how* it is driven (a Python
``while`` on eager backends, ``lax.while_loop`` under JAX) through ``loop_init``,
``loop_step`` and the continuation test ``state.k < max_iter and any(state.active)``, then
:func:`needs_verification` / :func:`verify` once after the loop.

The stopping rule and its arithmetic live in :mod:`eqsolve.core.measure`: per sample, the
residual test ``||f(z) - z|| <= tol ||f(z)|| + atol`` (measured by the rule ratio ``q``, the
best iterate being the one with the lowest ``q``) and the determinacy test that tells a
fixed point from a run-away iterate; norms are computed so that they neither underflow nor
overflow.

**The contract this module keeps.** For every sample, the reported ``status`` is CONVERGED
if and only if the rule holds at the returned point (``best_z``) *at the last evaluation of
``f``*, and ``best_res`` is that evaluation's relative residual. Three mechanisms make this
true even when ``f`` is not sample-independent (BatchNorm in a cell, a matrix acting across
the batch, a forgotten ``batch_axis=None``):

* a stopped sample is parked at its returned point and ``f`` evaluates it again at every
  step anyway (the batch is evaluated whole); the rule is checked there every time, its
  residual updated, and a sample whose rule no longer holds is re-opened (it iterates again;
  ``reopened`` records it, so the caller can warn that ``f`` couples the samples);
* active samples advance together, so one scalar step counter ``k`` indexes every ring
  buffer;
* when the loop ends with some sample whose last evaluated point is not its returned point
  (a budget that ran out on a non-monotone residual, a sample stopped by NaN/inf),
  :func:`verify` evaluates ``f`` once more on the returned batch and re-derives every
  status there. With an ``f`` that treats samples independently it changes no field but
  ``k``; it costs one call of ``f``, only on such exits.

Statuses (:class:`~eqsolve.core.solution.Status`): CONVERGED (rule holds), MAX_ITER (still
failing after ``max_iter`` updates), NONFINITE (NaN/inf appeared: the best finite iterate is
kept), DIVERGED (the residual grew ``RESIDUAL_GROWTH``-fold, or the residual test held only
by running away).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from ._xp import device_of
from .measure import (
    Branch,
    Measures,
    grew,
    growth_limit,
    host_branch,
    limits,
    measure,
    nested,
    plain_norm,
    rule_ratio,
    runaway,
    within_growth,
)
from .solution import Status
from .solver_base import FixedPointSolver

_CONVERGED, _MAX_ITER = int(Status.CONVERGED), int(Status.MAX_ITER)
_NONFINITE, _DIVERGED = int(Status.NONFINITE), int(Status.DIVERGED)


@dataclass(frozen=True)
class StopRule:
    """``||f(z) - z|| <= tol ||f(z)|| + atol`` (and determinacy) within ``max_iter`` updates.

    ``floor``: on backends that flush subnormal results to zero, the most that flushing can
    hide of ``||f(z) - z||`` (:func:`~eqsolve.core.measure.flush_floor`); 0 elsewhere.

    ``record_at``: iterations whose evaluated points the loop keeps in ``LoopState.trace``
    (the states of a fixed-point correction, :func:`trace_iterates`). Not part of the rule,
    but like it the loop's static configuration, which every driver passes through
    unchanged (and the JAX backend uses as part of its compile-cache key).
    """

    tol: float
    atol: float
    max_iter: int
    floor: float = 0.0
    record_at: tuple[int, ...] = ()


class LoopState(NamedTuple):
    z: Any  # (B, n) last recorded point (stopped samples: where they are parked)
    g: Any  # (B, n) its residual f(z) - z
    best_z: Any  # (B, n) the point each sample returns
    best_res: Any  # (B,) relative residual of best_z at its latest evaluation
    best_ratio: Any  # (B,) rule ratio q of best_z at its latest evaluation
    at_best: Any  # (B,) bool: the latest evaluation of this sample was at best_z
    active: Any  # (B,) bool: still iterating
    status: Any  # (B,) int32 Status code (MAX_ITER until something else happens)
    iterations: Any  # (B,) int32 updates applied while active
    reopened: Any  # (B,) bool: a stopped sample's status changed at a later evaluation
    k: Any  # evaluations of f so far, minus one (Python int eagerly, 0-d int under JAX)
    z0: Any  # (B, n) initial point (the determinacy test's secant base)
    g0: Any  # (B, n) its residual
    g_limit: Any  # (B,) the residual norm beyond which a sample DIVERGED (growth_limit)
    solver: Any  # the solver's own NamedTuple state
    trace: Any = None  # (S, B, n) the points of rule.record_at (trace_iterates), else None


def _full(xp: Any, like: Any, code: int) -> Any:
    return xp.full_like(like, code, dtype=xp.int32)


def loop_init(
    xp: Any,
    f: Callable[[Any], Any],
    z0: Any,
    solver: FixedPointSolver,
    rule: StopRule,
    branch: Branch[Any] | None = None,
) -> LoopState:
    """Evaluate ``f(z0)`` and build the initial state (``z0``: ``(B, n)``).

    ``branch`` (:data:`~eqsolve.core.measure.Branch`): skips the scaled norms where the plain
    ones are accurate (the same values; see :func:`~eqsolve.core.measure.measure`).
    """
    fz = f(z0)
    m = measure(xp, z0, fz, rule.tol, rule.atol, rule.floor, branch)
    converged = m.finite & (m.ratio <= 1)  # nothing moved yet: no determinacy test
    status = xp.where(converged, _full(xp, m.rel, _CONVERGED), _full(xp, m.rel, _MAX_ITER))
    status = xp.where(m.finite, status, _full(xp, status, _NONFINITE))
    return LoopState(
        z=z0,
        g=m.g,
        best_z=xp.asarray(z0, copy=True),  # never hand the caller's array back as the value
        best_res=m.rel,
        best_ratio=m.ratio,
        at_best=xp.ones_like(converged),
        active=status == _MAX_ITER,
        status=status,
        iterations=xp.zeros_like(status),
        reopened=xp.zeros_like(converged),
        k=0,
        z0=z0,
        g0=m.g,
        g_limit=growth_limit(xp, m.g_norm),
        solver=solver.init(xp, z0, m.g),
        trace=xp.stack([z0] * len(rule.record_at)) if rule.record_at else None,
    )


def trace_iterates(xp: Any, state: LoopState, rule: StopRule) -> LoopState:
    """Keep ``state.z`` in every slot ``i`` of ``state.trace`` with ``record_at[i] >= k``.

    So at the end slot ``i`` holds the point evaluated at iteration ``min(record_at[i], K)``
    (``K`` the loop's last iteration): the solver's own iterate ``z_{record_at[i]}``, or for
    a loop that ended earlier its last point -- where every stopped sample is parked at the
    value it returns. A sample that stopped before ``record_at[i]`` likewise holds its
    returned value there. Eagerly a slot past its iteration costs nothing; under JAX one
    ``(S, B, n)`` selection per step (only when states are requested).
    """
    if not rule.record_at:
        return state
    at = rule.record_at
    if isinstance(state.k, int):
        hit = [a >= state.k for a in at]
        if not any(hit):
            return state
        mask = xp.asarray(hit, device=device_of(state.z))
    else:
        mask = xp.asarray(at, dtype=xp.int32) >= state.k
    return state._replace(trace=xp.where(mask[:, None, None], state.z[None, ...], state.trace))


def propose_point(xp: Any, state: LoopState, solver: FixedPointSolver) -> Any:
    """The next point to evaluate: the solver's proposal, stopped samples parked at best."""
    proposal = solver.propose(xp, state.solver, state.z, state.g, state.k)
    return xp.where(state.active[:, None], proposal, state.best_z)


def record(
    xp: Any,
    state: LoopState,
    solver: FixedPointSolver,
    rule: StopRule,
    z: Any,
    fz: Any,
    *,
    update_solver: bool = True,
    branch: Branch[Any] | None = None,
) -> LoopState:
    """Record the evaluation ``fz = f(z)``: rule, statuses, best iterate, solver history.

    Stopped samples were evaluated at their returned point (``z == best_z`` there): their
    residual is updated and their status re-derived, and a converged one that fails the rule
    now is re-opened.

    ``branch`` (:data:`~eqsolve.core.measure.Branch`; eagerly, ``k`` a Python int,
    :func:`~eqsolve.core.measure.host_branch`): skips work that cannot change the result --
    the scaled norms where every plain one is accurate, the determinacy test where no sample
    newly meets the residual test, the frozen copies where every evaluation is finite.
    """
    if isinstance(state.k, int):
        branch = host_branch
    active = state.active
    parked = ~active
    m = measure(xp, z, fz, rule.tol, rule.atol, rule.floor, branch)
    holds = m.finite & (m.ratio <= 1)
    # the determinacy test is taken where a sample newly meets the residual test (a sample
    # parked as CONVERGED passed it when it stopped)
    claims = holds & (state.status != _CONVERGED)
    diverged = m.finite & grew(xp, m.g_norm, state.g_limit)

    def with_runaway() -> Any:
        away = runaway(xp, z, m, state.z0, state.g0, rule.tol, rule.atol, nested(branch))
        return diverged | (claims & away)

    if branch is None:
        diverged = with_runaway()
    else:
        diverged = branch(xp.any(claims), with_runaway, lambda: diverged)
    converged = holds & ~diverged

    improved = active & (m.ratio < state.best_ratio)  # NaN compares False
    at_best = improved | parked
    best_z = xp.where(improved[:, None], z, state.best_z)
    best_res = xp.where(at_best, m.rel, state.best_res)
    best_ratio = xp.where(at_best, m.ratio, state.best_ratio)

    # active samples that meet nothing stay MAX_ITER; so does a converged sample that stopped
    # meeting the rule (re-opened); NONFINITE and DIVERGED samples keep their status
    was_converged = state.status == _CONVERGED
    fallback = xp.where(active | was_converged, _full(xp, state.status, _MAX_ITER), state.status)
    status = xp.where(diverged, _full(xp, fallback, _DIVERGED), fallback)
    status = xp.where(m.finite, status, _full(xp, status, _NONFINITE))
    status = xp.where(converged, _full(xp, status, _CONVERGED), status)
    reopened = state.reopened | (parked & (status != state.status))

    # the solver only ever records finite data: a sample that just hit NaN/inf is frozen, and
    # its history must not produce inf arithmetic in later steps
    def frozen() -> tuple[Any, Any]:
        bad = ~m.finite[:, None]
        return xp.where(bad, state.z, z), xp.where(bad, state.g, m.g)

    if branch is None:
        z_rec, g_rec = frozen()
    else:
        z_rec, g_rec = branch(xp.all(m.finite), lambda: (z, m.g), frozen)
    solver_state = (
        solver.update(xp, state.solver, state.z, state.g, z_rec, g_rec, state.k)
        if update_solver
        else state.solver
    )
    return state._replace(
        z=z_rec,
        g=g_rec,
        best_z=best_z,
        best_res=best_res,
        best_ratio=best_ratio,
        at_best=at_best,
        active=(status == _MAX_ITER) & (active | was_converged),
        status=status,
        iterations=state.iterations + xp.astype(active, state.iterations.dtype),
        reopened=reopened,
        k=state.k + 1,
        solver=solver_state,
    )


def loop_step(
    xp: Any,
    f: Callable[[Any], Any],
    state: LoopState,
    solver: FixedPointSolver,
    rule: StopRule,
    branch: Branch[Any] | None = None,
) -> LoopState:
    """One iteration: propose, evaluate ``f`` once, record, test, update best."""
    z = propose_point(xp, state, solver)
    return trace_iterates(xp, record(xp, state, solver, rule, z, f(z), branch=branch), rule)


def needs_verification(xp: Any, state: LoopState) -> Any:
    """Per sample: its last evaluated point is not the point it returns (see :func:`verify`)."""
    return ~state.at_best


def verify(
    xp: Any,
    f: Callable[[Any], Any],
    state: LoopState,
    solver: FixedPointSolver,
    rule: StopRule,
    branch: Branch[Any] | None = None,
) -> LoopState:
    """Evaluate ``f`` once on the returned batch and re-derive every status there.

    Called by the drivers after the loop when :func:`needs_verification` holds for some
    sample. Every sample is treated as parked at its returned point: a MAX_ITER sample whose
    point meets the rule there is CONVERGED, a CONVERGED one that fails it is MAX_ITER.
    ``k`` counts the call; iteration counts and the solver state are unchanged.
    """
    parked = state._replace(active=xp.zeros_like(state.active))
    z = state.best_z
    out = record(xp, parked, solver, rule, z, f(z), update_solver=False, branch=branch)
    return out._replace(active=out.status == _MAX_ITER)


def loop_step_eager(
    xp: Any,
    f: Callable[[Any], Any],
    state: LoopState,
    solver: FixedPointSolver,
    rule: StopRule,
    all_active: bool,
) -> tuple[LoopState, bool, bool]:
    """:func:`loop_step` for eager backends, with shortcuts for the usual steps.

    Returns the new state, whether every sample is still active and whether some sample is.
    ``all_active``: every sample has been active at every step so far (the driver's first
    stretch; ``iterations`` is then left for :func:`settle_all_active`).

    Same result as :func:`loop_step`, bit for bit. The usual step has every sample finite
    with accurately representable norms, no active sample diverging and every active rule
    ratio below its best, and every stopped sample CONVERGED and still meeting the residual
    test at the returned point it is parked at. Then the best iterate *is* the evaluated
    point (a parked sample's point is its returned one), and the solver records ``z`` and
    ``g`` as they are: no ``(B, n)`` selection beyond the parking. Two kinds:

    * *quiet*: no active sample meets the residual test; nothing changes but the iterate.
      One host read decides.
    * *stopping*: some active samples meet it and pass the determinacy test; they become
      CONVERGED. A few more host reads decide (the determinacy test's norms, its verdict,
      whether some sample is still active).

    Any other step goes through :func:`record`, reusing the same ``f(z)`` (``f`` is still
    called once). Where samples stop at different steps (a DEQ's forward and adjoint solves
    end so), :func:`record` took five times the operations of a quiet step. Under JAX the
    general step is traced instead.
    """
    if all_active:
        z = solver.propose(xp, state.solver, state.z, state.g, state.k)
    else:
        z = propose_point(xp, state, solver)
    fz = f(z)
    g = fz - z
    lo, _ = limits(xp, z.dtype)
    g_norm = plain_norm(xp, g)
    f_norm = plain_norm(xp, fz)
    # rows with both norms >= lo (so > 0) are measure()'s values bit for bit, if also below
    # the upper limit; that one needs no test of its own: a norm beyond it is inf (the sum of
    # squares overflowed), and then the ratio is 0, inf or NaN, which the ratio tests reject
    # (1 < q < best for active samples, 0 < q <= 1 for the others). A parked sample may sit
    # at an exact zero fixed point (a zero cotangent): no 0/0 there (rows with ||f|| < lo
    # fail the test anyway, so their quotient does not matter)
    rel = g_norm / (f_norm if all_active else xp.maximum(f_norm, lo))
    ratio = rule_ratio(xp, g_norm, f_norm, rel, rule.tol, rule.atol, rule.floor, z)
    usual = (xp.minimum(g_norm, f_norm) >= lo) & within_growth(xp, g_norm, state.g_limit)
    below = ratio < state.best_ratio
    meets = None if all_active else (ratio <= 1) & (ratio > 0)  # the residual test holds
    parked = None if meets is None else meets & (state.status == _CONVERGED)
    quiet = usual & _by_activity(xp, state, (ratio > 1) & below, parked)
    if bool(xp.all(quiet)):
        new = _usual_step(xp, state, solver, z, g, rel, ratio, quiet, all_active)
        return trace_iterates(xp, new, rule), all_active, True
    stopping = usual & _by_activity(xp, state, (ratio > 0) & below, parked)
    if bool(xp.all(stopping)):
        # active rows meeting the test (below their best ratio, which is > 1 for an active
        # sample) claim convergence, as in record(); the determinacy test decides
        claims = (ratio <= 1) & (ratio > 0) if meets is None else state.active & meets
        m = Measures(g, g_norm, f_norm, rel, ratio, stopping)
        away = runaway(
            xp, z, m, state.z0, state.g0, rule.tol, rule.atol, host_branch, accurate=True
        )
        if not bool(xp.any(claims & away)):
            new = _usual_step(xp, state, solver, z, g, rel, ratio, stopping, all_active, claims)
            return trace_iterates(xp, new, rule), False, bool(xp.any(new.active))
    if all_active:
        state = settle_all_active(xp, state)
    new = trace_iterates(xp, record(xp, state, solver, rule, z, fz), rule)
    # the all-active stretch never resumes: settle_all_active counts from k = 0
    all_now = all_active and bool(xp.all(new.active))
    return new, all_now, all_now or bool(xp.any(new.active))


def _by_activity(xp: Any, state: LoopState, active_rows: Any, parked_rows: Any) -> Any:
    """``active_rows`` where the sample is active, else ``parked_rows`` (None: all active)."""
    if parked_rows is None:
        return active_rows
    return xp.where(state.active, active_rows, parked_rows)


def _usual_step(
    xp: Any,
    state: LoopState,
    solver: FixedPointSolver,
    z: Any,
    g: Any,
    rel: Any,
    ratio: Any,
    every: Any,
    all_active: bool,
    claims: Any = None,
) -> LoopState:
    """The state after a quiet or stopping step of :func:`loop_step_eager` (``claims``:
    the samples that stop CONVERGED; ``every``: an all-True ``(B,)`` array)."""
    status, active = state.status, state.active
    if claims is None and all_active:
        iterations = state.iterations  # left for settle_all_active
    else:
        if all_active:
            state = settle_all_active(xp, state)
        iterations = state.iterations + xp.astype(active, state.iterations.dtype)
    if claims is not None:
        status = xp.where(claims, _full(xp, status, _CONVERGED), status)
        active = active & ~claims
    return state._replace(
        z=z,
        g=g,
        best_z=z,
        best_res=rel,
        best_ratio=ratio,
        at_best=every,
        active=active,
        status=status,
        iterations=iterations,
        k=state.k + 1,
        solver=solver.update(xp, state.solver, state.z, state.g, z, g, state.k),
    )


def settle_all_active(xp: Any, state: LoopState) -> LoopState:
    """``state`` with its per-sample ``iterations`` brought up to date after fast steps.

    While every sample is active each step counts for every sample, so there
    ``iterations == k``: :func:`loop_step_eager` leaves the array as it was and this
    sets it, once, when the all-active stretch ends (the driver calls it where the loop ends
    inside that stretch).
    """
    return state._replace(iterations=xp.full_like(state.iterations, state.k))
