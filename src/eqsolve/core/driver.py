"""The Python-loop driver, shared by the eager backends (numpy, torch, cupy,
array_api_strict) and used by core routines (the adjoint solve) when no driver is given.

A driver is any callable ``driver(f, z0, solver, rule) -> LoopState`` that runs
``loop_init``, then ``loop_step`` while ``k < max_iter`` and some sample is active, then
``verify`` once where ``needs_verification`` says so (the returned batch must be the last
one evaluated); the JAX backend provides one built on ``lax.while_loop``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from .loop import (
    LoopState,
    StopRule,
    loop_init,
    loop_step,
    loop_step_eager,
    needs_verification,
    settle_all_active,
    verify,
)
from .measure import host_branch
from .solver_base import FixedPointSolver


class Driver(Protocol):
    def __call__(
        self, f: Callable[[Any], Any], z0: Any, solver: FixedPointSolver, rule: StopRule
    ) -> LoopState: ...


def run_python_loop(
    xp: Any, f: Callable[[Any], Any], z0: Any, solver: FixedPointSolver, rule: StopRule
) -> LoopState:
    """Iterate ``loop_step`` while some sample is active and ``k < max_iter``.

    One host read per iteration (which is almost free on the CPU) tells whether the step was
    quiet (:func:`~eqsolve.core.loop.loop_step_eager`: the same result without the
    per-sample selections); only after another step are ``any(active)`` and ``all(active)``
    read again.
    """
    state = loop_init(xp, f, z0, solver, rule, host_branch)
    all_active = bool(xp.all(state.active))
    any_active = all_active or bool(xp.any(state.active))
    while state.k < rule.max_iter and any_active:
        state, all_active, any_active = loop_step_eager(xp, f, state, solver, rule, all_active)
    if all_active:
        state = settle_all_active(xp, state)
    if bool(xp.any(needs_verification(xp, state))):
        state = verify(xp, f, state, solver, rule)
    return state


def python_driver(xp: Any) -> Driver:
    """``run_python_loop`` bound to namespace ``xp``, as a :class:`Driver`."""

    def drive(
        f: Callable[[Any], Any], z0: Any, solver: FixedPointSolver, rule: StopRule
    ) -> LoopState:
        return run_python_loop(xp, f, z0, solver, rule)

    return drive


def run_python_loop_synced(
    xp: Any,
    f: Callable[[Any], Any],
    z0: Any,
    solver: FixedPointSolver,
    rule: StopRule,
    any_active: Callable[[Any], bool],
) -> LoopState:
    """:func:`run_python_loop` where the "keep going" decision is shared by several processes.

    ``any_active(active)`` reduces this process's ``(B,)`` flags to one ``bool`` that is the
    same on every participating process (e.g. an all-reduce of ``any(active)`` over a
    ``torch.distributed`` group). It is called exactly once per iteration, and once more on
    the flags of :func:`~eqsolve.core.loop.needs_verification` after the loop, on every
    process, so all of them call ``f`` the same number of times: ``1 + k`` with the same
    ``k``. That
    is what a map ``f`` containing a collective (an all-reduce, SyncBatchNorm) needs; with
    per-process stopping, a process that stops early would leave the others waiting in
    ``f``'s collective forever.

    A process whose samples have all stopped keeps stepping: ``loop_step`` parks stopped
    samples at their best iterate and (for a sample-independent ``f``) its reported fields do
    not change, so its results are those of an unsynchronised solve; only the shared count
    ``k`` (and ``nfev``) grows.
    ``rule.max_iter`` must be the same on every process (it is checked before
    ``any_active``, so at ``k == max_iter`` no process reduces).
    """
    state = loop_init(xp, f, z0, solver, rule, host_branch)
    while state.k < rule.max_iter and any_active(state.active):
        state = loop_step(xp, f, state, solver, rule)
    if any_active(needs_verification(xp, state)):  # every process evaluates, or none does
        state = verify(xp, f, state, solver, rule)
    return state
